use diskcast_registry::{Firmware, MacAddr, NewTask, Registry, Sighting, TaskKind, Via};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "diskcast-registry-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A registry in a fresh directory (keep the TempDir alive as long as the registry).
pub fn registry(tag: &str) -> (TempDir, Registry) {
    let dir = TempDir::new(tag);
    let registry = Registry::open_in(dir.path()).unwrap();
    (dir, registry)
}

pub fn mac(n: u32) -> MacAddr {
    let [_, a, b, c] = n.to_be_bytes();
    MacAddr([0x52, 0x54, 0, a, b, c])
}

pub fn pxe(address: Option<Ipv4Addr>) -> Sighting {
    Sighting {
        firmware: Firmware::Uefi,
        address,
        via: Via::Pxe,
    }
}

pub fn deploy(mac: MacAddr, image: &str) -> NewTask {
    NewTask {
        mac,
        kind: TaskKind::Deploy {
            image: image.into(),
        },
        options: "{}".into(),
        timeout_secs: 600,
    }
}

/// A machine seen by PXE at time 100.
pub fn seen(registry: &Registry, n: u32) -> MacAddr {
    let mac = mac(n);
    registry.observe(mac, pxe(None), 100).unwrap();
    mac
}
