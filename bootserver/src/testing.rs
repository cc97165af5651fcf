//! Helpers for tests that need the real thing.

use std::path::{Path, PathBuf};

/// A tmpfs of `size` (e.g. `"512k"`) mounted on a fresh directory, unmounted when dropped: a
/// disk that really fills up. Tests using it run as root, as CI does.
pub struct TinyFs {
    dir: PathBuf,
}

impl TinyFs {
    pub fn mount(tag: &str, size: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("diskcast-tinyfs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            mounted,
            "mounting a tmpfs on {} failed: run the tests as root",
            dir.display()
        );
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes zeros into a file until the file system is full.
    pub fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut filler = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        while std::io::Write::write_all(&mut filler, &[0u8; 4096]).is_ok() {}
        path
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A whole HTTP side of the server (boot files, scripts, status, uploads, API) on 127.0.0.1
/// with its state in a fresh directory, the example config plus `extra`. Returns its address,
/// the lab and the admin token.
pub fn web_server(
    tag: &str,
    extra: &str,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<crate::lab::Lab>,
    String,
) {
    use crate::config::Config;
    use crate::dhcp_server::{DhcpServer, Settings};
    use crate::leases::LeaseTable;
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};
    let dir = std::env::temp_dir().join(format!("diskcast-web-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = include_str!("../bootserver.example.toml")
        .replace("/var/lib/diskcast", &dir.display().to_string())
        + extra;
    let config = Config::from_text(&text, Path::new("test.toml")).unwrap();
    std::fs::create_dir_all(&config.state_dir).unwrap();
    let store = crate::store::Store::open(&config.store_dir).unwrap();
    let registry = diskcast_registry::Registry::open_in(&config.state_dir).unwrap();
    let token = crate::lab::admin_token(&config.state_dir).unwrap();
    let mut site = crate::subnets::Site::on_link(
        &config.interface,
        ipnet::Ipv4Net::new(Ipv4Addr::new(10, 77, 0, 0), 24).unwrap(),
        Ipv4Addr::new(10, 77, 0, 1),
    );
    site.range = config.dhcp.range;
    let settings = Settings {
        mode: config.dhcp.mode,
        sites: vec![site],
        lease_secs: 600,
        uefi_loader: config.boot.uefi_loader,
        http_port: config.http_port,
        uefi_chain: Default::default(),
    };
    let key = crate::lab::server_key(&config.state_dir).unwrap();
    let lab = Arc::new(crate::lab::Lab::new(
        config,
        registry,
        store,
        Ipv4Addr::new(10, 77, 0, 1),
        key,
    ));
    lab.register_configured_machines(1).unwrap();
    let state = Arc::new(crate::web::WebState::new(
        Arc::clone(&lab),
        Arc::new(Mutex::new(DhcpServer::new(settings, LeaseTable::default()))),
        Default::default(),
        token.clone().into(),
    ));
    let api = crate::api::ApiState {
        lab: Arc::clone(&lab),
        admin_token: token.clone().into(),
    };
    let addr = crate::http::tests::start(crate::web::router(state, api), Default::default());
    (addr, lab, token)
}
