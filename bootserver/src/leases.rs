//! The lease table of full DHCP mode, persisted as JSON so a restarted server hands every machine
//! the address it had. Written to a temporary file and renamed, so a crash never leaves half a file.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("reading lease file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lease file {path} is corrupt; move it away to start with no leases")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing lease file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub address: Ipv4Addr,
    /// Unix time in seconds.
    pub expires: u64,
}

/// MAC (canonical form) → lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTable {
    pub leases: BTreeMap<String, Lease>,
}

impl LeaseTable {
    pub fn load(path: &Path) -> Result<Self, LeaseError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| LeaseError::Corrupt {
                path: path.into(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(LeaseError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), LeaseError> {
        let write_err = |source| LeaseError::Write {
            path: path.into(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| write_err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, json).map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)
    }

    /// The MAC holding `address` with a lease still valid at `now`.
    pub fn holder(&self, address: Ipv4Addr, now: u64) -> Option<&str> {
        self.leases
            .iter()
            .find(|(_, l)| l.address == address && l.expires > now)
            .map(|(mac, _)| mac.as_str())
    }

    pub fn ever_leased(&self, address: Ipv4Addr) -> bool {
        self.leases.values().any(|l| l.address == address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_the_same_table() {
        let dir = std::env::temp_dir().join(format!("diskcast-leases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("leases.json");
        assert_eq!(LeaseTable::load(&path).unwrap(), LeaseTable::default());
        let mut table = LeaseTable::default();
        table.leases.insert(
            "52:54:00:00:00:01".into(),
            Lease {
                address: Ipv4Addr::new(10, 0, 0, 5),
                expires: 1000,
            },
        );
        table.save(&path).unwrap();
        assert_eq!(LeaseTable::load(&path).unwrap(), table);
        assert_eq!(
            table.holder(Ipv4Addr::new(10, 0, 0, 5), 999),
            Some("52:54:00:00:00:01")
        );
        assert_eq!(table.holder(Ipv4Addr::new(10, 0, 0, 5), 1000), None);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            LeaseTable::load(&path),
            Err(LeaseError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
