//! A network's configuration: the global schema, each global relation's mode,
//! and the sites with their local schemas, mapping files and key ranges.
//! Read from `network.toml`; paths in it are relative to its folder.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::identity::{IdentityConfig, IdentitySpec};
use crate::include::{IncludeConfig, IncludeEdge, include_edges};
use crate::summary::{SummaryConfig, SummarySpec};
use crate::{Catalog, Error, Result, SiteCode, SiteNo};

/// Whether sites other than a tuple's owner may update it (under a lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelationMode {
    /// Only the owner changes its tuples (visit reports).
    ReadOnly,
    /// Any site may change a tuple after taking its primary-copy lock
    /// (patient details).
    ReadWrite,
}

/// An inclusive range of integer keys a site draws new keys from, so keys
/// are unique network-wide without asking anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// Smallest key.
    pub first: i64,
    /// Largest key.
    pub last: i64,
}

impl KeyRange {
    /// How many keys the range holds.
    pub fn len(&self) -> i64 {
        self.last - self.first + 1
    }

    /// True when the range holds no key.
    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: i64) -> bool {
        (self.first..=self.last).contains(&key)
    }

    fn overlaps(&self, other: &KeyRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// One site of the network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Site code, e.g. `CPH`.
    pub code: SiteCode,
    /// The site's bit in sent-to bitmaps (1, 2, ...).
    pub number: SiteNo,
    /// Full name, e.g. `Christchurch Public Hospital`.
    pub name: String,
    /// True for the site that houses the global snapshot controller.
    #[serde(default)]
    pub home: bool,
    /// DDL of the site's own relations.
    pub local_schema: PathBuf,
    /// The site's mapping table (tab-separated rows).
    pub mapping: PathBuf,
    /// The site's mapping-qualification table, if it splits a relation.
    #[serde(default)]
    pub qualification: Option<PathBuf>,
    /// The default range new integer keys are drawn from.
    pub keys: KeyRange,
    /// Ranges for particular relations, by local relation name, where the
    /// default range would not fit the attribute (e.g. doctor codes that other
    /// sites store in an `i2`).
    #[serde(default)]
    pub key_ranges: BTreeMap<String, KeyRange>,
}

impl SiteConfig {
    /// The key range for new keys of `relation`.
    pub fn key_range(&self, relation: &str) -> KeyRange {
        self.key_ranges.get(relation).copied().unwrap_or(self.keys)
    }
}

/// A whole network, as read from `network.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Name of the network.
    pub name: String,
    /// DDL of the global snapshot's relations.
    pub global_schema: PathBuf,
    /// Mode of each global relation; relations not listed are read-only.
    #[serde(default)]
    pub relations: BTreeMap<String, RelationMode>,
    /// The sites.
    #[serde(rename = "site")]
    pub sites: Vec<SiteConfig>,
    /// What sites are told of each other's data at every distribution
    /// ([`crate::summary`]); none declared: nothing is.
    #[serde(default)]
    pub summaries: SummaryConfig,
    /// What a fetch of a relation's tuples brings along
    /// ([`crate::include`]); none declared: a fetch brings what it asks.
    #[serde(default)]
    pub includes: IncludeConfig,
    /// Which global relation holds people and which of its attributes
    /// identify them ([`crate::identity`]); none declared: `snaps_match`
    /// is refused.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    /// The folder the paths above are relative to.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl NetworkConfig {
    /// Reads `network.toml` from `path` (the file, or the folder holding it)
    /// and checks it: unique site codes and numbers, disjoint key ranges, modes
    /// only for relations of the global schema.
    pub fn load(path: &Path) -> Result<NetworkConfig> {
        let file = if path.is_dir() {
            path.join("network.toml")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
            path: file.clone(),
            source,
        })?;
        let mut config: NetworkConfig =
            toml::from_str(&text).map_err(|e| Error::Parse(format!("{}: {e}", file.display())))?;
        config.dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        config
            .check()
            .map_err(|e| Error::Catalog(format!("{}: {e}", file.display())))?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        let mut codes = BTreeSet::new();
        let mut numbers = BTreeSet::new();
        for site in &self.sites {
            if !codes.insert(&site.code) {
                return Err(Error::Catalog(format!(
                    "site {} is listed twice",
                    site.code
                )));
            }
            if site.number.0 == 0 || !numbers.insert(site.number) {
                return Err(Error::Catalog(format!(
                    "site {} has number {}: numbers start at 1 and are unique",
                    site.code, site.number
                )));
            }
            if site.keys.is_empty() {
                return Err(Error::Catalog(format!(
                    "site {} has an empty key range",
                    site.code
                )));
            }
        }
        if self.sites.iter().filter(|s| s.home).count() > 1 {
            return Err(Error::Catalog("more than one site is marked home".into()));
        }
        for (i, a) in self.sites.iter().enumerate() {
            for b in &self.sites[i + 1..] {
                let relations: BTreeSet<&String> =
                    a.key_ranges.keys().chain(b.key_ranges.keys()).collect();
                let clash = a.keys.overlaps(&b.keys)
                    || relations
                        .iter()
                        .any(|r| a.key_range(r).overlaps(&b.key_range(r)));
                if clash {
                    return Err(Error::Catalog(format!(
                        "key ranges of sites {} and {} overlap",
                        a.code, b.code
                    )));
                }
            }
        }
        let global = self.global_catalog()?;
        for relation in self.relations.keys() {
            if global.relation(relation).is_none() {
                return Err(Error::Catalog(format!(
                    "mode given for {relation}, which is not a global relation"
                )));
            }
        }
        self.summaries.specs(&global)?;
        include_edges(&self.includes, &global)?;
        if let Some(identity) = &self.identity {
            identity.spec(&global)?;
        }
        Ok(())
    }

    /// The identity section in effect, checked when the file was loaded;
    /// `None` when the network declares none.
    pub fn identity_spec(&self) -> Result<Option<IdentitySpec>> {
        self.identity
            .as_ref()
            .map(|i| i.spec(&self.global_catalog()?))
            .transpose()
    }

    /// The include trees' edges, checked when the file was loaded.
    pub fn include_edges(&self) -> Result<Vec<IncludeEdge>> {
        include_edges(&self.includes, &self.global_catalog()?)
    }

    /// The summaries in effect, checked when the file was loaded.
    pub fn summary_specs(&self) -> Result<Vec<SummarySpec>> {
        self.summaries.specs(&self.global_catalog()?)
    }

    /// Resolves a path from the configuration against its folder.
    pub fn path(&self, p: &Path) -> PathBuf {
        self.dir.join(p)
    }

    /// Reads the global schema.
    pub fn global_catalog(&self) -> Result<Catalog> {
        Catalog::from_file(&self.path(&self.global_schema))
    }

    /// Reads a site's local schema.
    pub fn local_catalog(&self, site: &SiteConfig) -> Result<Catalog> {
        Catalog::from_file(&self.path(&site.local_schema))
    }

    /// The site with code `code`.
    pub fn site(&self, code: &str) -> Result<&SiteConfig> {
        self.sites
            .iter()
            .find(|s| s.code.as_str() == code)
            .ok_or_else(|| {
                let known: Vec<&str> = self.sites.iter().map(|s| s.code.as_str()).collect();
                Error::Catalog(format!(
                    "unknown site {code} in network {} (sites: {})",
                    self.name,
                    known.join(", ")
                ))
            })
    }

    /// The mode of a global relation; read-only unless configured otherwise.
    pub fn mode(&self, global_relation: &str) -> RelationMode {
        self.relations
            .get(global_relation)
            .copied()
            .unwrap_or(RelationMode::ReadOnly)
    }
}
