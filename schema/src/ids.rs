//! Domain newtypes, so a site number is never confused with a snapshot number.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A site's code, as administrators and the thesis write it: `CPH`, `STG`, `GRC`.
/// One to eight ASCII letters or digits, upper case.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SiteCode(String);

impl SiteCode {
    /// Checks and wraps a site code.
    pub fn new(code: &str) -> Result<Self> {
        let ok = !code.is_empty()
            && code.len() <= 8
            && code
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        if ok {
            Ok(SiteCode(code.to_string()))
        } else {
            Err(Error::Catalog(format!(
                "bad site code {code:?}: use 1 to 8 upper-case letters or digits"
            )))
        }
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SiteCode {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        SiteCode::new(&s)
    }
}

impl From<SiteCode> for String {
    fn from(c: SiteCode) -> String {
        c.0
    }
}

impl fmt::Display for SiteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! number {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

number!(
    /// A site's number in the network: its bit in every sent-to bitmap and its
    /// code in the lock-site field. Numbers start at 1; 0 means "no site".
    SiteNo(u32)
);
number!(
    /// A refresh epoch (docs/protocol/refresh.md).
    Epoch(u64)
);
number!(
    /// The identifier of a tuple in the global snapshot (the thesis' TI).
    TupleId(i64)
);
number!(
    /// A local snapshot's number at a site.
    SnapshotNo(u32)
);
number!(
    /// The code of a user at a site; travels with fetches and lock requests.
    UserCode(u32)
);
