//! Helpers shared by the mapping crate's data-driven tests: reading a fixture
//! network and building a site's catalogs and mapping from its files, the way
//! the CLI and the local controller do.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use snaps_mapping::SiteMapping;
use snaps_schema::{Catalog, NetworkConfig};

/// The folder of the fixture network `name` (`figures`, `radiology`).
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures")).join(name)
}

/// One site of a network: its local catalog and its validated mapping.
#[derive(Debug, Clone)]
pub struct Site {
    /// The site code, `A` or `CPH`.
    pub code: String,
    /// The site's local schema.
    pub local: Catalog,
    /// The site's mapping onto the global schema.
    pub mapping: SiteMapping,
}

/// A fixture network with every site's mapping built.
#[derive(Debug, Clone)]
pub struct Network {
    /// The network configuration.
    pub config: NetworkConfig,
    /// The global schema.
    pub global: Catalog,
    /// The sites, in configuration order.
    pub sites: Vec<Site>,
}

impl Network {
    /// Loads the fixture network `name`, or says what is wrong with it.
    pub fn load(name: &str) -> Result<Network, String> {
        let dir = fixture_dir(name);
        let config = NetworkConfig::load(&dir)
            .map_err(|e| format!("load network {}: {e}", dir.display()))?;
        let global = config
            .global_catalog()
            .map_err(|e| format!("global schema of {name}: {e}"))?;
        let mut sites = Vec::new();
        for site in &config.sites {
            let code = site.code.as_str().to_string();
            let local = config
                .local_catalog(site)
                .map_err(|e| format!("local schema of site {code}: {e}"))?;
            let read = |p: &Path| {
                let path = config.path(p);
                std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))
            };
            let rows = read(&site.mapping)?;
            let quals = match &site.qualification {
                Some(q) => read(q)?,
                None => String::new(),
            };
            let mapping = SiteMapping::from_text(&rows, &quals, &local, &global)
                .map_err(|e| format!("mapping of site {code}: {e}"))?;
            sites.push(Site {
                code,
                local,
                mapping,
            });
        }
        Ok(Network {
            config,
            global,
            sites,
        })
    }

    /// The site with code `code`, or a message listing the known codes.
    pub fn site(&self, code: &str) -> Result<&Site, String> {
        self.sites.iter().find(|s| s.code == code).ok_or_else(|| {
            let known: Vec<&str> = self.sites.iter().map(|s| s.code.as_str()).collect();
            format!(
                "no site {code} in network {} (sites: {})",
                self.config.name,
                known.join(", ")
            )
        })
    }
}
