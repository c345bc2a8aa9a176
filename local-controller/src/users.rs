//! The people who may log in at a site's SQL endpoint, each with the user
//! code the global controller sees with their fetches and locks (its access
//! rules and audit trail name user codes).
//!
//! They live in a file of their own (`users.toml`, beside `site.toml`),
//! not in the site database, where any SQL client could read them.
//! Passwords are never kept: each user has a SCRAM-SHA-256 verifier in
//! PostgreSQL's format, `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:
//! <ServerKey>`, from which a password cannot be recovered and with which
//! the server cannot pose as the user. `snaps users add/remove` write the
//! file (atomically, owner-readable only).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use pgwire::api::auth::sasl::scram::{ScramSecret, gen_salted_password};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// PBKDF2 iterations of new verifiers (PostgreSQL's default).
pub const ITERATIONS: usize = 4096;

/// A user of the SQL endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The login name.
    pub name: String,
    /// The user code the global controller sees.
    pub code: String,
    /// The SCRAM-SHA-256 verifier.
    pub scram: String,
}

/// The users of a site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Users {
    /// Every user.
    #[serde(default, rename = "user")]
    pub users: Vec<User>,
}

const HEADER: &str = "# The users of this site's SQL endpoint: written by `snaps users add/remove`.\n\
# Each has a SCRAM-SHA-256 verifier (no password is kept) and the user code\n\
# the global controller sees with their fetches and locks.\n\n";

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {what}", path.display()))
}

/// Checks a login name or user code: printable, no commas (the audit trail
/// lists them), at most 64 characters.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == ',')
    {
        return Err(Error::Invalid(format!(
            "{what} {name:?}: 1 to 64 characters, no spaces, commas or control characters"
        )));
    }
    Ok(())
}

impl Users {
    /// Reads the file; a missing file has no users.
    pub fn load(path: &Path) -> Result<Users> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Users::default()),
            Err(e) => return Err(bad(path, e)),
        };
        let users: Users = toml::from_str(&text).map_err(|e| bad(path, e))?;
        for u in &users.users {
            check_name("user", &u.name).map_err(|e| bad(path, e))?;
            check_name("user code", &u.code).map_err(|e| bad(path, e))?;
            Verifier::parse(&u.scram).map_err(|e| bad(path, format!("user {}: {e}", u.name)))?;
        }
        Ok(users)
    }

    /// Writes the file atomically, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string(self).map_err(|e| bad(path, e))?;
        let tmp = path.with_extension("toml.tmp");
        let io = |e: std::io::Error| bad(path, e);
        {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut f = options.open(&tmp).map_err(io)?;
            f.write_all(HEADER.as_bytes()).map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The user logging in as `name`.
    pub fn get(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Adds a user, or replaces the password and code of one (a password
    /// change).
    pub fn add(&mut self, name: &str, code: &str, password: &str) -> Result<()> {
        check_name("user", name)?;
        check_name("user code", code)?;
        if password.chars().count() < 8 {
            return Err(Error::Invalid(
                "the password is shorter than 8 characters".into(),
            ));
        }
        let user = User {
            name: name.to_string(),
            code: code.to_string(),
            scram: Verifier::new(password)?.to_string(),
        };
        match self.users.iter_mut().find(|u| u.name == name) {
            Some(u) => *u = user,
            None => self.users.push(user),
        }
        Ok(())
    }

    /// Removes a user; whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.users.len();
        self.users.retain(|u| u.name != name);
        self.users.len() != before
    }
}

/// A SCRAM-SHA-256 verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    iterations: usize,
    salt: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; n];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut out)
        .map_err(|_| Error::Invalid("the system's random generator failed".into()))?;
    Ok(out)
}

impl Verifier {
    /// A verifier of `password` with a fresh random salt.
    pub fn new(password: &str) -> Result<Verifier> {
        Verifier::with_salt(password, random_bytes(16)?)
    }

    /// A verifier that no password matches: an unknown user goes through
    /// the same exchange as a known one and fails the same way, so the
    /// endpoint does not tell which login names exist.
    pub fn unmatchable() -> Result<Verifier> {
        Ok(Verifier {
            iterations: ITERATIONS,
            salt: random_bytes(16)?,
            stored_key: random_bytes(32)?,
            server_key: random_bytes(32)?,
        })
    }

    fn with_salt(password: &str, salt: Vec<u8>) -> Result<Verifier> {
        let salted = gen_salted_password(password, &salt, ITERATIONS);
        match ScramSecret::verifier_from_salted_password(salt, salted, ITERATIONS) {
            ScramSecret::Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            } => Ok(Verifier {
                iterations,
                salt,
                stored_key,
                server_key,
            }),
            ScramSecret::SaltedPassword { .. } => {
                Err(Error::Invalid("SCRAM: no verifier was derived".into()))
            }
        }
    }

    /// Reads PostgreSQL's verifier format.
    pub fn parse(text: &str) -> Result<Verifier> {
        let bad = || {
            Error::Invalid(
                "not a SCRAM-SHA-256 verifier (SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"
                    .into(),
            )
        };
        let rest = text.strip_prefix("SCRAM-SHA-256$").ok_or_else(bad)?;
        let (params, keys) = rest.split_once('$').ok_or_else(bad)?;
        let (iterations, salt) = params.split_once(':').ok_or_else(bad)?;
        let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
        let b64 = |s: &str| STANDARD.decode(s).map_err(|_| bad());
        let v = Verifier {
            iterations: iterations.parse().map_err(|_| bad())?,
            salt: b64(salt)?,
            stored_key: b64(stored)?,
            server_key: b64(server)?,
        };
        if v.iterations == 0 || v.stored_key.len() != 32 || v.server_key.len() != 32 {
            return Err(bad());
        }
        Ok(v)
    }

    /// The secret the SCRAM exchange checks a client's proof with.
    pub fn secret(&self) -> ScramSecret {
        ScramSecret::Verifier {
            salt: self.salt.clone(),
            iterations: self.iterations,
            stored_key: self.stored_key.clone(),
            server_key: self.server_key.clone(),
        }
    }
}

impl std::fmt::Display for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(&self.stored_key),
            STANDARD.encode(&self.server_key)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifiers_round_trip_and_differ_by_salt() {
        let a = Verifier::new("x-ray-2400").unwrap();
        let b = Verifier::new("x-ray-2400").unwrap();
        assert_ne!(a, b, "a fresh salt each time");
        assert_eq!(Verifier::parse(&a.to_string()).unwrap(), a);
        let same = Verifier::with_salt("x-ray-2400", a.salt.clone()).unwrap();
        assert_eq!(same, a);
        let other = Verifier::with_salt("x-ray-2401", a.salt.clone()).unwrap();
        assert_ne!(other.stored_key, a.stored_key);
        assert!(Verifier::parse("md5abc").is_err());
        assert!(Verifier::parse("SCRAM-SHA-256$4096:AAAA$AAAA:AAAA").is_err());
    }

    #[test]
    fn users_are_added_replaced_removed_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        let mut users = Users::load(&path).unwrap();
        assert!(users.users.is_empty());
        users.add("radiology", "RAD01", "film-badge-7").unwrap();
        users.add("clerk", "CLK01", "front-desk-3").unwrap();
        users.add("radiology", "RAD02", "film-badge-8").unwrap();
        assert!(users.add("bad name", "X", "long-enough").is_err());
        assert!(users.add("a", "B,C", "long-enough").is_err());
        assert!(users.add("a", "B", "short").is_err());
        users.save(&path).unwrap();
        let read = Users::load(&path).unwrap();
        assert_eq!(read, users);
        assert_eq!(read.get("radiology").unwrap().code, "RAD02");
        assert!(
            !std::fs::read_to_string(&path)
                .unwrap()
                .contains("film-badge")
        );
        let mut read = read;
        assert!(read.remove("clerk"));
        assert!(!read.remove("clerk"));
        std::fs::write(
            &path,
            "[[user]]\nname = \"x\"\ncode = \"y\"\nscram = \"plain\"\n",
        )
        .unwrap();
        let e = Users::load(&path).unwrap_err().to_string();
        assert!(e.contains("user x") && e.contains("SCRAM-SHA-256"), "{e}");
    }
}
