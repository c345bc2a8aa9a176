//! The radiology network of the thesis (`fixtures/radiology`), compiled into
//! the binary, so `snaps demo` runs from any folder and from a binary
//! installed with `cargo install`.

use std::path::Path;

use anyhow::{Context, Result};

/// Every file of the network folder, by its path inside it.
const RADIOLOGY: &[(&str, &str)] = &[
    ("README.md", include_str!("../fixtures/radiology/README.md")),
    (
        "network.toml",
        include_str!("../fixtures/radiology/network.toml"),
    ),
    (
        "global.sql",
        include_str!("../fixtures/radiology/global.sql"),
    ),
    ("local.sql", include_str!("../fixtures/radiology/local.sql")),
    (
        "global.example.toml",
        include_str!("../fixtures/radiology/global.example.toml"),
    ),
    (
        "CPH/mapping.tsv",
        include_str!("../fixtures/radiology/CPH/mapping.tsv"),
    ),
    (
        "CPH/qualification.tsv",
        include_str!("../fixtures/radiology/CPH/qualification.tsv"),
    ),
    (
        "STG/mapping.tsv",
        include_str!("../fixtures/radiology/STG/mapping.tsv"),
    ),
    (
        "STG/qualification.tsv",
        include_str!("../fixtures/radiology/STG/qualification.tsv"),
    ),
    (
        "GRC/mapping.tsv",
        include_str!("../fixtures/radiology/GRC/mapping.tsv"),
    ),
    (
        "GRC/qualification.tsv",
        include_str!("../fixtures/radiology/GRC/qualification.tsv"),
    ),
];

/// The folder commands default to (`--network`).
pub const DEFAULT_NETWORK: &str = "fixtures/radiology";

/// Loads the network in `folder`. The default folder, missing (a binary
/// run outside the checkout), is the built-in radiology network, written
/// once to the system's temporary folder.
pub fn load_network(folder: &Path) -> Result<snaps_schema::NetworkConfig> {
    let folder = if folder == Path::new(DEFAULT_NETWORK) && !folder.exists() {
        let dir =
            std::env::temp_dir().join(format!("snaps-radiology-{}", env!("CARGO_PKG_VERSION")));
        write_radiology(&dir)?;
        dir
    } else {
        folder.to_path_buf()
    };
    snaps_schema::NetworkConfig::load(&folder)
        .with_context(|| format!("load network {}", folder.display()))
}

/// Writes the radiology network into `dir` unless it holds a network.toml
/// already (an administrator's edits there are kept).
pub fn write_radiology(dir: &Path) -> Result<()> {
    if dir.join("network.toml").exists() {
        return Ok(());
    }
    for (name, text) in RADIOLOGY {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_network_loads_and_equals_the_checkout() {
        let dir = tempfile::tempdir().unwrap();
        write_radiology(dir.path()).unwrap();
        let written = snaps_schema::NetworkConfig::load(dir.path()).unwrap();
        let checkout = snaps_schema::NetworkConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/radiology"),
        )
        .unwrap();
        assert_eq!(written.sites.len(), checkout.sites.len());
        // Every file of the checkout's folder is in the binary.
        let mut files = Vec::new();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/radiology");
        for entry in walk(&root) {
            files.push(
                entry
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/"),
            );
        }
        files.sort();
        let mut embedded: Vec<String> = RADIOLOGY.iter().map(|(n, _)| n.to_string()).collect();
        embedded.sort();
        assert_eq!(files, embedded);
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
