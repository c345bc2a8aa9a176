//! The status attributes SNAPS adds to tuples.
//!
//! * [`LocalStatus`] — appendix A: one byte on every tuple of a mapped relation
//!   at a site.
//! * [`GlobalStatus`] — appendix B: access rights, sent-to, lock site and user
//!   code on every tuple of the global snapshot. Its fixed fields pack exactly as
//!   the thesis' 48-bit word; the sent-to set is a [`SentTo`] bitmap of any length
//!   and is stored apart from the word when a network outgrows 31 sites.

use std::fmt;

use bitvec::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, SiteNo, UserCode};

/// Whether a tuple at a site is the site's own data or part of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TupleType {
    /// The site owns this tuple (bit value 0).
    Local,
    /// The tuple was copied from the global snapshot (bit value 1).
    Snapshot,
}

/// The site's current access rights on a tuple (appendix A, 2 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalRights {
    /// `00`: a read-write relation; no lock asked for yet in this epoch.
    Unknown,
    /// `01`: this site holds the lock until the next refresh.
    ReadWrite,
    /// `10`: another site holds the lock, or the relation is read-only.
    ReadOnly,
    /// `11`: deleted here; removed at the next refresh.
    Deleted,
}

/// Appendix A: the one-byte status of a tuple at a site.
///
/// Bit layout, most significant first, in the thesis' order:
///
/// ```text
///  7   6 5   4    3    2 1 0
/// [T] [R R] [N] [M] [J J J]
///  T tuple type  R rights  N new  M modified  J just-copied (0..=7)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalStatus {
    /// Local data or snapshot.
    pub tuple_type: TupleType,
    /// Current access rights.
    pub rights: LocalRights,
    /// Added at this site since the last refresh.
    pub new: bool,
    /// Changed at this site since the last refresh.
    pub modified: bool,
    /// Non-zero while a snapshot is being stored: the code of the user whose
    /// fetch copied the tuple (0 = not just copied).
    pub just_copied: u8,
}

impl LocalStatus {
    /// Status of a tuple the site itself has just inserted.
    pub fn new_local() -> LocalStatus {
        LocalStatus {
            tuple_type: TupleType::Local,
            rights: LocalRights::ReadWrite,
            new: true,
            modified: false,
            just_copied: 0,
        }
    }

    /// Packs into the appendix-A byte. Fails if `just_copied` exceeds 7.
    pub fn to_byte(self) -> Result<u8> {
        if self.just_copied > 7 {
            return Err(Error::Status(format!(
                "just-copied value {} does not fit 3 bits",
                self.just_copied
            )));
        }
        let t = matches!(self.tuple_type, TupleType::Snapshot) as u8;
        let r = match self.rights {
            LocalRights::Unknown => 0b00,
            LocalRights::ReadWrite => 0b01,
            LocalRights::ReadOnly => 0b10,
            LocalRights::Deleted => 0b11,
        };
        Ok(t << 7 | r << 5 | (self.new as u8) << 4 | (self.modified as u8) << 3 | self.just_copied)
    }

    /// Unpacks the appendix-A byte; every byte value is a valid status.
    pub fn from_byte(b: u8) -> LocalStatus {
        LocalStatus {
            tuple_type: if b & 0x80 != 0 {
                TupleType::Snapshot
            } else {
                TupleType::Local
            },
            rights: match (b >> 5) & 0b11 {
                0b00 => LocalRights::Unknown,
                0b01 => LocalRights::ReadWrite,
                0b10 => LocalRights::ReadOnly,
                _ => LocalRights::Deleted,
            },
            new: b & 0x10 != 0,
            modified: b & 0x08 != 0,
            just_copied: b & 0b111,
        }
    }
}

/// Access rights of a tuple in the global snapshot (appendix B, 2 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GlobalRights {
    /// `00`: a site holds the primary-copy lock.
    Locked,
    /// `01`: updatable, nobody holds the lock this epoch.
    ReadWrite,
    /// `10`: only the owner may change it.
    ReadOnly,
    /// `11`: a semi-join projection, visible to one request only.
    Temporary,
}

impl GlobalRights {
    /// The two-bit code of appendix B (`00` locked ... `11` temporary), also
    /// the stored form at the global controller.
    pub fn code(self) -> u8 {
        match self {
            GlobalRights::Locked => 0b00,
            GlobalRights::ReadWrite => 0b01,
            GlobalRights::ReadOnly => 0b10,
            GlobalRights::Temporary => 0b11,
        }
    }

    /// Reads a code written by [`GlobalRights::code`]; only the low two bits
    /// count.
    pub fn from_code(code: u8) -> GlobalRights {
        match code & 0b11 {
            0b00 => GlobalRights::Locked,
            0b01 => GlobalRights::ReadWrite,
            0b10 => GlobalRights::ReadOnly,
            _ => GlobalRights::Temporary,
        }
    }
}

/// The set of sites holding a copy of a global tuple, any number of sites.
#[derive(Clone, Default)]
pub struct SentTo(BitVec<u8, Lsb0>);

impl PartialEq for SentTo {
    fn eq(&self, other: &SentTo) -> bool {
        self.sites().eq(other.sites())
    }
}

impl Eq for SentTo {}

impl SentTo {
    /// The empty set.
    pub fn new() -> SentTo {
        SentTo::default()
    }

    /// Records that `site` holds a copy.
    pub fn insert(&mut self, site: SiteNo) {
        let i = site.0 as usize;
        if self.0.len() <= i {
            self.0.resize(i + 1, false);
        }
        self.0.set(i, true);
    }

    /// Records that `site` released its copy.
    pub fn remove(&mut self, site: SiteNo) {
        if let Some(mut bit) = self.0.get_mut(site.0 as usize) {
            *bit = false;
        }
    }

    /// Whether `site` holds a copy.
    pub fn contains(&self, site: SiteNo) -> bool {
        self.0.get(site.0 as usize).is_some_and(|b| *b)
    }

    /// No site holds a copy.
    pub fn is_empty(&self) -> bool {
        self.0.not_any()
    }

    /// The sites holding a copy, in order.
    pub fn sites(&self) -> impl Iterator<Item = SiteNo> + '_ {
        self.0.iter_ones().map(|i| SiteNo(i as u32))
    }

    /// Storage form: bit *i* of the bitmap is bit `i % 8` of byte `i / 8`;
    /// trailing zero bytes are dropped, so the empty set is zero bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = self.0.as_raw_slice().to_vec();
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        bytes
    }

    /// Reads the storage form written by [`SentTo::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> SentTo {
        SentTo(BitVec::from_slice(bytes))
    }
}

impl fmt::Debug for SentTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.sites()).finish()
    }
}

impl FromIterator<SiteNo> for SentTo {
    fn from_iter<I: IntoIterator<Item = SiteNo>>(iter: I) -> SentTo {
        let mut s = SentTo::new();
        for site in iter {
            s.insert(site);
        }
        s
    }
}

/// Appendix B: the status of a tuple in the global snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalStatus {
    /// Access rights.
    pub rights: GlobalRights,
    /// Sites holding a copy.
    pub sent_to: SentTo,
    /// Site holding the lock (the owner, for read-only relations).
    pub lock_site: Option<SiteNo>,
    /// User whose request placed a temporary tuple or is copying this one.
    pub user_code: Option<UserCode>,
}

impl GlobalStatus {
    /// Packs into the thesis' 48-bit word (in the low 48 bits of a `u64`),
    /// most significant field first:
    ///
    /// ```text
    /// 47 46 | 45 44  | 43 ........ 12 | 11 .. 6   | 5 .. 0
    ///  0  0 | rights | sent-to (32)   | lock site | user code
    /// ```
    ///
    /// Sent-to bit *i* (word bit `12 + i`) is site *i*. Fails, naming the
    /// field, when the status needs more than the thesis allowed: a site number
    /// of 32 or more in sent-to, or a lock site or user code above 63.
    pub fn pack_appendix_b(&self) -> Result<u64> {
        let rights = u64::from(self.rights.code());
        let mut sent: u64 = 0;
        for site in self.sent_to.sites() {
            if site.0 >= 32 {
                return Err(Error::Status(format!(
                    "sent-to site {site} does not fit the 32-bit appendix-B field"
                )));
            }
            sent |= 1 << site.0;
        }
        let six = |v: u32, what: &str| {
            if v < 64 {
                Ok(v as u64)
            } else {
                Err(Error::Status(format!("{what} {v} does not fit 6 bits")))
            }
        };
        let lock = six(self.lock_site.map_or(0, |s| s.0), "lock site")?;
        let user = six(self.user_code.map_or(0, |u| u.0), "user code")?;
        Ok(rights << 44 | sent << 12 | lock << 6 | user)
    }

    /// Unpacks the word written by [`GlobalStatus::pack_appendix_b`].
    pub fn unpack_appendix_b(word: u64) -> Result<GlobalStatus> {
        if word >> 46 != 0 {
            return Err(Error::Status(format!(
                "global status word {word:#x} has bits set above bit 45"
            )));
        }
        let rights = GlobalRights::from_code(((word >> 44) & 0b11) as u8);
        let sent = (word >> 12) & 0xffff_ffff;
        let sent_to = (0..32)
            .filter(|i| sent & (1 << i) != 0)
            .map(SiteNo)
            .collect();
        let lock = ((word >> 6) & 0x3f) as u32;
        let user = (word & 0x3f) as u32;
        Ok(GlobalStatus {
            rights,
            sent_to,
            lock_site: (lock != 0).then_some(SiteNo(lock)),
            user_code: (user != 0).then_some(UserCode(user)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Binary literals grouped by field: T RR N M JJJ.
    #[allow(clippy::unusual_byte_groupings)]
    #[test]
    fn local_status_bits_match_appendix_a() {
        let s = LocalStatus {
            tuple_type: TupleType::Snapshot,
            rights: LocalRights::ReadOnly,
            new: false,
            modified: true,
            just_copied: 5,
        };
        assert_eq!(s.to_byte().unwrap(), 0b1_10_0_1_101);
        assert_eq!(LocalStatus::new_local().to_byte().unwrap(), 0b0_01_1_0_000);
        let deleted = LocalStatus {
            rights: LocalRights::Deleted,
            ..LocalStatus::new_local()
        };
        assert_eq!(deleted.to_byte().unwrap() & 0b0110_0000, 0b0110_0000);
        let bad = LocalStatus {
            just_copied: 8,
            ..s
        };
        assert_eq!(
            bad.to_byte().unwrap_err().to_string(),
            "just-copied value 8 does not fit 3 bits"
        );
    }

    #[test]
    fn every_local_byte_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(LocalStatus::from_byte(b).to_byte().unwrap(), b);
        }
    }

    #[test]
    fn global_status_bits_match_appendix_b() {
        let s = GlobalStatus {
            rights: GlobalRights::Locked,
            sent_to: [SiteNo(1), SiteNo(3)].into_iter().collect(),
            lock_site: Some(SiteNo(3)),
            user_code: Some(UserCode(7)),
        };
        let w = s.pack_appendix_b().unwrap();
        assert_eq!(w, 0b1010 << 12 | 3 << 6 | 7);
        assert_eq!(GlobalStatus::unpack_appendix_b(w).unwrap(), s);
        let t = GlobalStatus {
            rights: GlobalRights::Temporary,
            ..s.clone()
        };
        assert_eq!(t.pack_appendix_b().unwrap() >> 44, 0b11);
        assert!(w < 1 << 46, "46 bits as the thesis says");
    }

    #[test]
    fn global_word_refuses_what_does_not_fit() {
        let s = GlobalStatus {
            rights: GlobalRights::ReadWrite,
            sent_to: [SiteNo(40)].into_iter().collect(),
            lock_site: None,
            user_code: None,
        };
        assert_eq!(
            s.pack_appendix_b().unwrap_err().to_string(),
            "sent-to site 40 does not fit the 32-bit appendix-B field"
        );
        let s = GlobalStatus {
            sent_to: SentTo::new(),
            lock_site: Some(SiteNo(64)),
            ..s
        };
        assert!(s.pack_appendix_b().is_err());
        assert!(GlobalStatus::unpack_appendix_b(1 << 47).is_err());
    }

    #[test]
    fn sent_to_is_not_limited_to_32_sites() {
        let mut s = SentTo::new();
        s.insert(SiteNo(1));
        s.insert(SiteNo(1000));
        assert!(s.contains(SiteNo(1000)) && s.contains(SiteNo(1)));
        assert!(!s.contains(SiteNo(999)) && !s.contains(SiteNo(5000)));
        s.remove(SiteNo(1000));
        assert_eq!(s.sites().collect::<Vec<_>>(), vec![SiteNo(1)]);
        assert_eq!(s.to_bytes(), vec![0b10]);
        s.remove(SiteNo(1));
        assert!(s.is_empty());
        assert!(s.to_bytes().is_empty());
    }

    proptest! {
        #[test]
        fn sent_to_bytes_round_trip(sites in proptest::collection::btree_set(0u32..3000, 0..40)) {
            let s: SentTo = sites.iter().copied().map(SiteNo).collect();
            let back = SentTo::from_bytes(&s.to_bytes());
            prop_assert_eq!(back.sites().collect::<Vec<_>>(), s.sites().collect::<Vec<_>>());
        }

        #[test]
        fn appendix_b_round_trips(rights in 0u8..4, sent in any::<u32>(), lock in 0u32..64, user in 0u32..64) {
            let s = GlobalStatus {
                rights: [GlobalRights::Locked, GlobalRights::ReadWrite, GlobalRights::ReadOnly, GlobalRights::Temporary][rights as usize],
                sent_to: (0..32).filter(|i| sent & (1 << i) != 0).map(SiteNo).collect(),
                lock_site: (lock != 0).then_some(SiteNo(lock)),
                user_code: (user != 0).then_some(UserCode(user)),
            };
            let w = s.pack_appendix_b().unwrap();
            prop_assert_eq!(GlobalStatus::unpack_appendix_b(w).unwrap(), s);
        }
    }
}
