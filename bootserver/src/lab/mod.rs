//! The unattended lab: which machine boots what, one-shot tasks, the deploy sessions they start,
//! and what their agents report.
//!
//! No disk is written without an order: a machine runs the agent only for an open task of its
//! own (created by an admin with `bootserver task ...` or the API), and only a task writes a
//! disk. A machine without one boots its local disk; a machine nobody registered is recorded as
//! discovered and, if the lab says so, inventoried once — never written.

pub mod boot;
pub mod checks;
pub mod relays;
pub mod session_plan;
pub mod sessions;
pub mod tasks;
pub mod wake;

use crate::config::Config;
use crate::store::Store;
use diskcast_proto::mac::MacAddr;
use diskcast_proto::trust::SigningKey;
use diskcast_registry::{Error as RegistryError, Registry};
use std::net::Ipv4Addr;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("no image {name:?} in the store: capture or import it first (`bootserver images list` shows what is there)")]
    NoImage { name: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{what} names {count} machines; it works on one machine only")]
    OneMachineOnly { what: &'static str, count: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("reading or creating the admin token {path}")]
    Token {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sending Wake-on-LAN packets on {interface}")]
    Wake {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server's signing key")]
    Key(#[from] diskcast_transport::keys::KeyFileError),
}

/// What the lab's parts share.
#[derive(Debug)]
pub struct Lab {
    pub config: Config,
    pub registry: Registry,
    /// Signs what it takes in with the server's key; trusts that and `[security]
    /// trusted_keys`.
    pub store: Store,
    pub server_ip: Ipv4Addr,
    pub sessions: sessions::Sessions,
    /// The server's key: signs stored images and deploy sessions; agents it boots trust it.
    pub key: SigningKey,
    /// Verifications of stored images asked for after they were stored.
    pub image_checks: checks::ImageChecks,
    /// The web console's logins (see `console::login`).
    pub logins: crate::console::login::Logins,
    /// The subnets served, as resolved against the server's interfaces (empty when that
    /// failed: then nothing is known about where machines sit).
    pub sites: Vec<crate::subnets::Site>,
    /// The HTTPS API agents are told to use, with the certificate they pin (`[https]`).
    pub https: Option<diskcast_proto::cmdline::HttpsApi>,
}

impl Lab {
    pub fn new(
        config: Config,
        registry: Registry,
        store: Store,
        server_ip: Ipv4Addr,
        key: SigningKey,
    ) -> Self {
        let store = store
            .with_signer(key.clone())
            .trusting(&config.security.trusted_keys);
        let sites = crate::subnets::interface_addresses()
            .and_then(|found| crate::subnets::resolve(&config, &found))
            .unwrap_or_default();
        Self {
            config,
            registry,
            store,
            server_ip,
            sessions: sessions::Sessions::default(),
            key,
            image_checks: checks::ImageChecks::default(),
            logins: crate::console::login::Logins::default(),
            sites,
            https: None,
        }
    }

    /// The key a peer master task signs its session with: derived from the server's key for
    /// that task only, so its secret (on the master's command line) is worth one task.
    pub fn master_key(&self, task: i64) -> SigningKey {
        self.key.derive(&format!("master task {task}"))
    }

    /// Registers the config's `[[machine]]` entries (known machines, their names, groups, disks
    /// and local-boot methods).
    pub fn register_configured_machines(&self, now: u64) -> Result<(), LabError> {
        for (mac, entry) in &self.config.machines {
            self.registry
                .register(*mac, entry.name.as_deref(), entry.group.as_deref(), now)?;
            let patch = diskcast_registry::MachinePatch {
                disk: entry.disk.as_ref().map(|d| Some(d.render())),
                local_boot: entry.local_boot.map(|m| Some(m.as_str().to_string())),
                ..Default::default()
            };
            if patch != diskcast_registry::MachinePatch::default() {
                self.registry.set(*mac, patch)?;
            }
        }
        Ok(())
    }
}

/// The server's signing key (`STATE_DIR/signing-key`, 0600): made on first use, then read.
/// `bootserver key show` prints its public half, which agents trust.
pub fn server_key(state_dir: &Path) -> Result<SigningKey, LabError> {
    std::fs::create_dir_all(state_dir).map_err(|source| {
        LabError::Key(diskcast_transport::keys::KeyFileError::Io {
            path: state_dir.into(),
            op: "creating the state directory",
            source,
        })
    })?;
    Ok(diskcast_transport::keys::load_or_create(
        &state_dir.join("signing-key"),
    )?)
}

/// The admin token: made once in the state directory (readable by root only), then read.
pub fn admin_token(state_dir: &Path) -> Result<String, LabError> {
    let path = state_dir.join("admin-token");
    let err = |source| LabError::Token {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::create_dir_all(state_dir).map_err(err)?;
    let token = random_hex();
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(err)?;
    Ok(token)
}

fn random_hex() -> String {
    let words = [
        diskcast_transport::random_u64(),
        diskcast_transport::random_u64(),
        diskcast_transport::random_u64(),
        diskcast_transport::random_u64(),
    ];
    words.iter().map(|w| format!("{w:016x}")).collect()
}

/// Equal secrets, compared in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The machine a `MAC` text names, for error messages that come from the network.
pub fn parse_mac(text: &str) -> Result<MacAddr, LabError> {
    text.parse()
        .map_err(|e: diskcast_proto::mac::MacParseError| LabError::Invalid(e.to_string()))
}
