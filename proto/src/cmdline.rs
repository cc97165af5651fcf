//! The agent's settings on the kernel command line.
//!
//! Every setting lives under the `diskcast.` prefix so that it cannot collide with the kernel's own
//! parameters. The bootserver renders a [`BootConfig`] with [`BootConfig::render`]; the agent parses
//! the whole `/proc/cmdline` with [`BootConfig::parse`], ignoring everything without the prefix.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Prefix of every diskcast kernel parameter.
pub const PREFIX: &str = "diskcast.";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("unknown kernel parameter `{PREFIX}{key}` (known: {known})")]
    UnknownKey { key: String, known: &'static str },
    #[error("kernel parameter `{PREFIX}{key}` has no value: write `{PREFIX}{key}=VALUE`")]
    MissingValue { key: String },
    #[error(
        "kernel parameter `{PREFIX}{key}` is given twice: one machine must not get two answers"
    )]
    Duplicate { key: String },
    #[error("kernel parameter `{PREFIX}{key}={value}` is invalid: expected {expected}")]
    InvalidValue {
        key: String,
        value: String,
        expected: &'static str,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line} ({text:?})")]
pub struct SettingsFileError {
    pub line: usize,
    pub text: String,
    #[source]
    pub source: CmdlineError,
}

/// What the agent does once the machine is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Print the hardware inventory, then finish.
    #[default]
    Inventory,
    /// Receive an image from a multicast session onto the local disk.
    Slave,
    /// Multicast this machine's disk to the slaves.
    Master,
    /// Upload this machine's disk to the server's image store.
    Capture,
    /// Carry a session from a sender on another subnet (`diskcast.upstream=ADDRESS:PORT`) into
    /// this machine's subnet: receive it by unicast, re-multicast it (see `relay.rs`).
    Relay,
}

/// What PID 1 does when it cannot go on, or after its role finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Reboot,
    Poweroff,
    /// A minimal prompt on the console, so the cause stays on screen.
    Shell,
}

macro_rules! keyword_enum {
    ($ty:ty, $expected:literal, { $($variant:path => $word:literal),+ $(,)? }) => {
        impl $ty {
            pub const EXPECTED: &'static str = $expected;
            pub fn as_str(self) -> &'static str {
                match self { $($variant => $word),+ }
            }
        }
        impl FromStr for $ty {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match s { $($word => Ok($variant),)+ _ => Err(()) }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keyword_enum!(Role, "one of inventory, slave, master, capture, relay", {
    Role::Inventory => "inventory",
    Role::Slave => "slave",
    Role::Master => "master",
    Role::Capture => "capture",
    Role::Relay => "relay",
});

keyword_enum!(Finish, "one of reboot, poweroff, shell", {
    Finish::Reboot => "reboot",
    Finish::Poweroff => "poweroff",
    Finish::Shell => "shell",
});

/// Which blocks of a source disk are read and sent (master, capture).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Blocks {
    /// The blocks the file systems use, everything outside them, and every file system that
    /// is not cleanly unmounted or not understood, whole.
    #[default]
    Used,
    /// As `Used`, but file systems that were not cleanly unmounted are mapped too (only for
    /// disks known to be consistent: blocks a journal replay would write are missed).
    UsedTrustUnclean,
    /// Every block (only all-zero chunks are skipped).
    All,
}

keyword_enum!(Blocks, "one of used, used-trust-unclean, all", {
    Blocks::Used => "used",
    Blocks::UsedTrustUnclean => "used-trust-unclean",
    Blocks::All => "all",
});

/// Typed form of the `diskcast.*` kernel parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub role: Role,
    /// The bootserver's address (image store, status reports).
    pub server: Option<Ipv4Addr>,
    /// Network interface to use; by default the first one with a link.
    pub interface: Option<String>,
    /// What to do after a fatal error.
    pub on_error: Finish,
    /// What to do after the role finished successfully.
    pub on_done: Finish,
    /// Seconds to wait for a DHCP lease before giving up.
    pub dhcp_timeout_secs: u32,
    /// Log level of the console log: error, warn, info, debug, trace.
    pub log_level: log::LevelFilter,
    /// The disk to read (master, capture) or write (slave).
    pub disk: DiskSelector,
    /// Multicast session address.
    pub group: Ipv4Addr,
    pub port: u16,
    /// Master: start once this many slaves joined...
    pub min_receivers: u32,
    /// ...or this many seconds after starting, with whoever joined.
    pub start_timeout_secs: Option<u32>,
    /// Master: upper bound of the data rate in MB/s.
    pub rate_mbps: Option<u32>,
    /// Capture: the name the image gets in the server's store.
    pub image: Option<String>,
    /// Capture: the server's HTTP port, where the image store takes uploads.
    pub store_port: u16,
    /// Read more settings from `diskcast.cfg` on the boot medium (a USB stick), which an admin
    /// edits on any computer; they override the kernel command line.
    pub settings_from_boot_medium: bool,
    /// The bootserver's task this boot carries out, and the secret the agent's reports about it
    /// prove themselves with (reported to `server:store_port`).
    pub task: Option<TaskRef>,
    /// Master, capture: which blocks of the disk are read and sent.
    pub blocks: Blocks,
    /// Slave: after a verified copy onto a larger disk, extend the last GPT partition to the
    /// disk's end (its file system is grown by the installed system, as cloud images do).
    pub grow_last_partition: bool,
    /// Slave: whose sessions to join (`diskcast.trust=KEY[,KEY...]` or `any`). A slave without
    /// it refuses to start: it would otherwise write whatever any host on the LAN multicasts.
    pub trust: Option<crate::trust::Trust>,
    /// Master: the key its sessions are signed with (`diskcast.sign=SEED`, 64 hex digits; a
    /// secret, kept out of debug output).
    pub sign: Option<crate::trust::SigningKey>,
    /// Master: multicast TTL, the routers a session may cross plus one (1: this LAN only).
    pub ttl: u8,
    /// Relay: the sender's unicast address (its relay port), across the router.
    pub upstream: Option<std::net::SocketAddrV4>,
    /// The bootserver's HTTPS API: the agent reports and uploads to `https://server:PORT`
    /// instead of plain HTTP on `store_port`, and trusts only the certificate pinned here
    /// (`diskcast.https_port=PORT diskcast.pin=SHA256`, always as a pair).
    pub https: Option<HttpsApi>,
}

/// Where and how the agent reaches the bootserver's API over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpsApi {
    pub port: u16,
    /// SHA-256 of the server's certificate: the agent talks to nothing else, and sends neither
    /// token nor disk byte before the handshake proved it.
    pub pin: crate::trust::CertFingerprint,
}

/// A task of the bootserver's, as its agent knows it: `diskcast.task=ID` and `diskcast.token=HEX`.
#[derive(Clone, PartialEq, Eq)]
pub struct TaskRef {
    pub id: u64,
    /// 64 hex digits.
    pub token: String,
}

impl fmt::Debug for TaskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a secret: it stays out of logs and debug output.
        write!(f, "TaskRef {{ id: {}, token: … }}", self.id)
    }
}

/// A task token: 64 lower-case hex digits.
pub fn valid_token(token: &str) -> bool {
    token.len() == 64
        && token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Which disk a role works on. Device order is not stable, so labs name disks by serial.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DiskSelector {
    /// The only internal disk (not the boot medium, not removable); an error when there are several.
    #[default]
    Only,
    /// The disk with this serial number.
    Serial(String),
    /// The disk with this kernel name (`sda`, `nvme0n1`, `vda`).
    Name(String),
    /// The one internal disk of about this size (within 3 %), as written: `500G`, `64Mi`, `2T`.
    Size(String),
}

/// Bytes in a size like `500G` (decimal units K, M, G, T) or `64Mi` (binary Ki, Mi, Gi, Ti).
pub fn parse_size(text: &str) -> Option<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok().filter(|n: &f64| *n > 0.0)?;
    let scale: u64 = match unit {
        "" => 1,
        "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    let bytes = number * scale as f64;
    (bytes >= 1.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

impl DiskSelector {
    pub const EXPECTED: &'static str =
        "`only`, `serial:SERIAL`, `name:DEVICE` or `size:SIZE` (500G, 64Mi)";

    pub fn render(&self) -> String {
        match self {
            Self::Only => "only".into(),
            Self::Serial(serial) => format!("serial:{serial}"),
            Self::Name(name) => format!("name:{name}"),
            Self::Size(size) => format!("size:{size}"),
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text.split_once(':') {
            None if text == "only" => Some(Self::Only),
            Some(("serial", serial)) if !serial.is_empty() => Some(Self::Serial(serial.into())),
            Some(("name", name)) if !name.is_empty() && !name.contains('/') => {
                Some(Self::Name(name.into()))
            }
            Some(("size", size)) if parse_size(size).is_some() => Some(Self::Size(size.into())),
            _ => None,
        }
    }
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            role: Role::default(),
            server: None,
            interface: None,
            on_error: Finish::Shell,
            on_done: Finish::Poweroff,
            dhcp_timeout_secs: 60,
            log_level: log::LevelFilter::Info,
            disk: DiskSelector::Only,
            group: crate::wire::DEFAULT_GROUP,
            port: crate::wire::DEFAULT_PORT,
            min_receivers: 1,
            start_timeout_secs: None,
            rate_mbps: None,
            image: None,
            store_port: 8080,
            settings_from_boot_medium: false,
            task: None,
            blocks: Blocks::Used,
            grow_last_partition: false,
            trust: None,
            sign: None,
            ttl: 1,
            https: None,
            upstream: None,
        }
    }
}

const KNOWN_KEYS: &str =
    "role, server, interface, on_error, on_done, dhcp_timeout, log, disk, group, port, min_receivers, start_timeout, rate, image, store_port, settings, task, token, blocks, grow, trust, sign, ttl, https_port, pin, upstream";

/// `any`, or the keys joined by commas, as `diskcast.trust=` carries them.
pub fn render_trust(trust: &crate::trust::Trust) -> String {
    match trust {
        crate::trust::Trust::Any => "any".into(),
        crate::trust::Trust::Keys(keys) => keys
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
}

impl BootConfig {
    /// Parses a whole kernel command line; parameters without the `diskcast.` prefix are ignored.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut config = Self::default();
        let mut seen = std::collections::BTreeSet::new();
        for word in cmdline.split_ascii_whitespace() {
            let Some(setting) = word.strip_prefix(PREFIX) else {
                continue;
            };
            let (key, value) = match setting.split_once('=') {
                Some((key, value)) if !value.is_empty() => (key, value),
                Some((key, _)) => return Err(CmdlineError::MissingValue { key: key.into() }),
                None => {
                    return Err(CmdlineError::MissingValue {
                        key: setting.into(),
                    })
                }
            };
            if !seen.insert(key) {
                return Err(CmdlineError::Duplicate { key: key.into() });
            }
            config.set(key, value)?;
        }
        config.finish_task()?;
        Ok(config)
    }

    /// `task` and `token` come as a pair, and so do `https_port` and `pin`.
    fn finish_task(&mut self) -> Result<(), CmdlineError> {
        if let Some(https) = &self.https {
            if https.port == 0 {
                return Err(CmdlineError::MissingValue {
                    key: "https_port".into(),
                });
            }
            if https.pin.0 == [0; 32] {
                // An agent told to use HTTPS without knowing whom to trust would have to trust
                // anyone: refused rather than guessed.
                return Err(CmdlineError::MissingValue { key: "pin".into() });
            }
        }
        match &self.task {
            Some(task) if task.token.is_empty() => Err(CmdlineError::MissingValue {
                key: "token".into(),
            }),
            Some(task) if task.id == 0 => Err(CmdlineError::MissingValue { key: "task".into() }),
            _ => Ok(()),
        }
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), CmdlineError> {
        fn invalid(key: &str, value: &str, expected: &'static str) -> CmdlineError {
            CmdlineError::InvalidValue {
                key: key.into(),
                value: value.into(),
                expected,
            }
        }
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            // The kernel command line splits at spaces: a value with one cannot travel there.
            return Err(invalid(
                key,
                value,
                "a value without spaces or control characters",
            ));
        }
        match key {
            "role" => {
                self.role = value
                    .parse()
                    .map_err(|()| invalid(key, value, Role::EXPECTED))?
            }
            "server" => {
                self.server = Some(
                    value
                        .parse()
                        .map_err(|_| invalid(key, value, "an IPv4 address"))?,
                )
            }
            "interface" if value.len() > 15 || value.contains('/') => {
                return Err(invalid(
                    key,
                    value,
                    "an interface name (at most 15 bytes, no `/`)",
                ))
            }
            "interface" => self.interface = Some(value.into()),
            "on_error" => {
                self.on_error = value
                    .parse()
                    .map_err(|()| invalid(key, value, Finish::EXPECTED))?
            }
            "on_done" => {
                self.on_done = value
                    .parse()
                    .map_err(|()| invalid(key, value, Finish::EXPECTED))?
            }
            "dhcp_timeout" => {
                self.dhcp_timeout_secs = value
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| invalid(key, value, "a positive number of seconds"))?
            }
            "log" => {
                self.log_level = value.parse().map_err(|_| {
                    invalid(key, value, "one of off, error, warn, info, debug, trace")
                })?
            }
            "disk" => {
                self.disk = DiskSelector::parse(value)
                    .ok_or_else(|| invalid(key, value, DiskSelector::EXPECTED))?
            }
            "group" => {
                self.group = value
                    .parse()
                    .ok()
                    .filter(|g: &Ipv4Addr| g.is_multicast())
                    .ok_or_else(|| invalid(key, value, "an IPv4 multicast address"))?
            }
            "port" => {
                self.port = value
                    .parse()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| invalid(key, value, "a UDP port"))?
            }
            "ttl" => {
                self.ttl = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| invalid(key, value, "a multicast TTL from 1 to 255"))?
            }
            "min_receivers" => {
                self.min_receivers = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| invalid(key, value, "a positive number"))?
            }
            "start_timeout" => {
                self.start_timeout_secs = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| invalid(key, value, "a positive number of seconds"))?,
                )
            }
            "rate" => {
                self.rate_mbps = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| invalid(key, value, "MB/s, a positive number"))?,
                )
            }
            "image" => {
                if !crate::image_file::valid_image_name(value) {
                    return Err(invalid(key, value, crate::image_file::IMAGE_NAME_RULE));
                }
                self.image = Some(value.into())
            }
            "settings" => {
                self.settings_from_boot_medium = match value {
                    "boot-medium" => true,
                    "cmdline" => false,
                    _ => return Err(invalid(key, value, "`boot-medium` or `cmdline`")),
                }
            }
            "task" => {
                let id = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| invalid(key, value, "a task number"))?;
                self.task
                    .get_or_insert(TaskRef {
                        id: 0,
                        token: String::new(),
                    })
                    .id = id;
            }
            "token" => {
                if !valid_token(value) {
                    return Err(invalid(key, "…", "64 lower-case hex digits"));
                }
                self.task
                    .get_or_insert(TaskRef {
                        id: 0,
                        token: String::new(),
                    })
                    .token = value.into();
            }
            "blocks" => {
                self.blocks = value
                    .parse()
                    .map_err(|()| invalid(key, value, Blocks::EXPECTED))?
            }
            "grow" => {
                self.grow_last_partition = match value {
                    "last-partition" => true,
                    "none" => false,
                    _ => return Err(invalid(key, value, "`last-partition` or `none`")),
                }
            }
            "trust" => {
                self.trust = Some(if value == "any" {
                    crate::trust::Trust::Any
                } else {
                    let keys = crate::trust::parse_key_list(value).map_err(|_| {
                        invalid(
                            key,
                            value,
                            "`any` or public keys of 64 hex digits separated by commas",
                        )
                    })?;
                    if keys.is_empty() {
                        return Err(invalid(key, value, "at least one public key, or `any`"));
                    }
                    crate::trust::Trust::Keys(keys)
                })
            }
            "sign" => {
                self.sign = Some(
                    crate::trust::SigningKey::from_hex(value)
                        // The value is a secret: not echoed.
                        .map_err(|_| invalid(key, "…", "64 hex digits"))?,
                )
            }
            "https_port" => {
                let port = value
                    .parse()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| invalid(key, value, "a TCP port"))?;
                self.https_api().port = port;
            }
            "pin" => {
                let pin: crate::trust::CertFingerprint = value
                    .parse()
                    .ok()
                    .filter(|p: &crate::trust::CertFingerprint| p.0 != [0; 32])
                    .ok_or_else(|| invalid(key, value, crate::trust::CertFingerprint::EXPECTED))?;
                self.https_api().pin = pin;
            }
            "upstream" => {
                self.upstream = Some(value.parse().map_err(|_| {
                    invalid(
                        key,
                        value,
                        "the sender's IPv4 ADDRESS:PORT (e.g. 10.77.0.1:7745)",
                    )
                })?)
            }
            "store_port" => {
                self.store_port = value
                    .parse()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| invalid(key, value, "a TCP port"))?
            }
            _ => {
                return Err(CmdlineError::UnknownKey {
                    key: key.into(),
                    known: KNOWN_KEYS,
                })
            }
        }
        Ok(())
    }

    /// The HTTPS half being filled in (`https_port` and `pin` arrive one at a time).
    fn https_api(&mut self) -> &mut HttpsApi {
        self.https.get_or_insert(HttpsApi {
            port: 0,
            pin: crate::trust::CertFingerprint([0; 32]),
        })
    }

    /// Applies a settings file: `key = value` lines with the kernel parameters' keys (without the
    /// `diskcast.` prefix), `#` comments and blank lines. Errors name the line.
    pub fn apply_settings_file(&mut self, text: &str) -> Result<(), SettingsFileError> {
        // `task` and `token` come as a pair: a missing half is named at the line of the other.
        let mut task_line = None;
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = |source| SettingsFileError {
                line: index + 1,
                text: raw.trim().to_string(),
                source,
            };
            let (key, value) = line.split_once('=').ok_or_else(|| {
                at(CmdlineError::MissingValue {
                    key: line.to_string(),
                })
            })?;
            let (key, value) = (key.trim(), value.trim());
            let key = key.strip_prefix(PREFIX).unwrap_or(key);
            if value.is_empty() {
                return Err(at(CmdlineError::MissingValue { key: key.into() }));
            }
            self.set(key, value).map_err(at)?;
            if matches!(key, "task" | "token" | "https_port" | "pin") {
                task_line = Some((index + 1, raw.trim().to_string()));
            }
        }
        self.finish_task().map_err(|source| {
            let (line, text) = task_line.clone().unwrap_or_default();
            SettingsFileError { line, text, source }
        })
    }

    /// The settings an admin may put in a settings file, rendered as one (for a fresh stick).
    pub fn render_settings_file(&self) -> String {
        let mut out = String::new();
        for word in self.render().split(' ') {
            if let Some((key, value)) = word.strip_prefix(PREFIX).and_then(|kv| kv.split_once('='))
            {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        out
    }

    /// Renders the settings as kernel parameters; [`BootConfig::parse`] gives back the same value.
    pub fn render(&self) -> String {
        let mut words = vec![format!("{PREFIX}role={}", self.role)];
        if let Some(server) = self.server {
            words.push(format!("{PREFIX}server={server}"));
        }
        if let Some(interface) = &self.interface {
            words.push(format!("{PREFIX}interface={interface}"));
        }
        words.push(format!("{PREFIX}on_error={}", self.on_error));
        words.push(format!("{PREFIX}on_done={}", self.on_done));
        words.push(format!("{PREFIX}dhcp_timeout={}", self.dhcp_timeout_secs));
        words.push(format!(
            "{PREFIX}log={}",
            self.log_level.as_str().to_ascii_lowercase()
        ));
        let defaults = Self::default();
        if self.disk != defaults.disk {
            words.push(format!("{PREFIX}disk={}", self.disk.render()));
        }
        if self.group != defaults.group {
            words.push(format!("{PREFIX}group={}", self.group));
        }
        if self.port != defaults.port {
            words.push(format!("{PREFIX}port={}", self.port));
        }
        if self.ttl != defaults.ttl {
            words.push(format!("{PREFIX}ttl={}", self.ttl));
        }
        if self.min_receivers != defaults.min_receivers {
            words.push(format!("{PREFIX}min_receivers={}", self.min_receivers));
        }
        if let Some(secs) = self.start_timeout_secs {
            words.push(format!("{PREFIX}start_timeout={secs}"));
        }
        if let Some(rate) = self.rate_mbps {
            words.push(format!("{PREFIX}rate={rate}"));
        }
        if let Some(image) = &self.image {
            words.push(format!("{PREFIX}image={image}"));
        }
        if self.store_port != defaults.store_port {
            words.push(format!("{PREFIX}store_port={}", self.store_port));
        }
        if self.settings_from_boot_medium {
            words.push(format!("{PREFIX}settings=boot-medium"));
        }
        if self.blocks != defaults.blocks {
            words.push(format!("{PREFIX}blocks={}", self.blocks));
        }
        if self.grow_last_partition {
            words.push(format!("{PREFIX}grow=last-partition"));
        }
        if let Some(trust) = &self.trust {
            words.push(format!("{PREFIX}trust={}", render_trust(trust)));
        }
        if let Some(key) = &self.sign {
            words.push(format!("{PREFIX}sign={}", key.secret_hex()));
        }
        if let Some(https) = &self.https {
            words.push(format!("{PREFIX}https_port={}", https.port));
            words.push(format!("{PREFIX}pin={}", https.pin));
        }
        if let Some(upstream) = self.upstream {
            words.push(format!("{PREFIX}upstream={upstream}"));
        }
        if let Some(task) = &self.task {
            words.push(format!("{PREFIX}task={}", task.id));
            words.push(format!("{PREFIX}token={}", task.token));
        }
        words.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_then_parse_round_trips() {
        let config = BootConfig {
            role: Role::Slave,
            server: Some(Ipv4Addr::new(10, 77, 0, 1)),
            interface: Some("eth1".into()),
            on_error: Finish::Reboot,
            on_done: Finish::Shell,
            dhcp_timeout_secs: 17,
            log_level: log::LevelFilter::Debug,
            disk: DiskSelector::Serial("WD-123".into()),
            group: Ipv4Addr::new(239, 1, 2, 3),
            port: 9000,
            min_receivers: 8,
            start_timeout_secs: Some(300),
            rate_mbps: Some(90),
            image: Some("golden-2026.11".into()),
            store_port: 8181,
            settings_from_boot_medium: true,
            task: Some(TaskRef {
                id: 42,
                token: "ab".repeat(32),
            }),
            blocks: Blocks::UsedTrustUnclean,
            grow_last_partition: true,
            trust: Some(crate::trust::Trust::Keys(vec![
                crate::trust::SigningKey::from_seed([1; 32]).public(),
                crate::trust::SigningKey::from_seed([2; 32]).public(),
            ])),
            sign: Some(crate::trust::SigningKey::from_seed([3; 32])),
            ttl: 4,
            https: Some(HttpsApi {
                port: 8443,
                pin: crate::trust::CertFingerprint([0xc4; 32]),
            }),
            upstream: Some("10.77.0.10:7745".parse().unwrap()),
        };
        let line = format!(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 {} quiet",
            config.render()
        );
        assert_eq!(BootConfig::parse(&line), Ok(config));
        assert_eq!(
            BootConfig::parse(&BootConfig::default().render()),
            Ok(BootConfig::default())
        );
        let any = BootConfig::parse("diskcast.trust=any").unwrap();
        assert_eq!(any.trust, Some(crate::trust::Trust::Any));
        assert_eq!(BootConfig::parse(&any.render()), Ok(any));
    }

    #[test]
    fn the_https_api_needs_both_its_port_and_its_pin() {
        let pin = "5e".repeat(32);
        let both =
            BootConfig::parse(&format!("diskcast.https_port=8443 diskcast.pin={pin}")).unwrap();
        let https = both.https.unwrap();
        assert_eq!((https.port, https.pin.to_string()), (8443, pin.clone()));
        assert_eq!(BootConfig::parse(&both.render()), Ok(both.clone()));
        let mut file = BootConfig::default();
        file.apply_settings_file(&both.render_settings_file())
            .unwrap();
        assert_eq!(file, both);
        // Half of the pair is an error naming the missing half, never plain HTTP or "trust any".
        assert_eq!(
            BootConfig::parse("diskcast.https_port=8443"),
            Err(CmdlineError::MissingValue { key: "pin".into() })
        );
        assert_eq!(
            BootConfig::parse(&format!("diskcast.pin={pin}")),
            Err(CmdlineError::MissingValue {
                key: "https_port".into()
            })
        );
        let err = BootConfig::default()
            .apply_settings_file("https_port = 8443\n")
            .unwrap_err();
        assert_eq!(err.line, 1);
        for bad in [
            "diskcast.https_port=0",
            "diskcast.pin=12345",
            &format!("diskcast.pin={}", "00".repeat(32)),
        ] {
            assert!(
                matches!(
                    BootConfig::parse(bad),
                    Err(CmdlineError::InvalidValue { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_relay_role_and_its_upstream_round_trip_and_bad_upstreams_are_named() {
        let line = "diskcast.role=relay diskcast.upstream=10.77.0.10:7745 diskcast.trust=any \
                    diskcast.group=239.255.78.1 diskcast.min_receivers=3";
        let config = BootConfig::parse(line).unwrap();
        assert_eq!(config.role, Role::Relay);
        assert_eq!(config.upstream, Some("10.77.0.10:7745".parse().unwrap()));
        assert_eq!(BootConfig::parse(&config.render()), Ok(config));
        for bad in ["10.77.0.10", "sender:7745", "10.77.0.10:0x"] {
            let err = BootConfig::parse(&format!("diskcast.upstream={bad}")).unwrap_err();
            assert!(err.to_string().contains("ADDRESS:PORT"), "{err}");
        }
    }

    #[test]
    fn trusted_keys_and_the_signing_key_are_checked_and_the_secret_never_echoed() {
        let secret = crate::trust::SigningKey::from_seed([9; 32]);
        let config = BootConfig::parse(&format!("diskcast.sign={}", secret.secret_hex())).unwrap();
        assert!(!format!("{config:?}").contains(&secret.secret_hex()));
        for bad in [
            "diskcast.trust=",
            "diskcast.trust=,",
            "diskcast.trust=abcd",
            "diskcast.trust=anyone",
            "diskcast.sign=zz",
        ] {
            assert!(BootConfig::parse(bad).is_err(), "{bad}");
        }
        let err = BootConfig::parse(&format!("diskcast.sign={}x", &secret.secret_hex()[1..]))
            .unwrap_err()
            .to_string();
        assert!(!err.contains(&secret.secret_hex()[1..]), "{err}");
    }

    #[test]
    fn settings_file_applies_over_the_command_line_and_names_bad_lines() {
        let mut config =
            BootConfig::parse("diskcast.role=master diskcast.min_receivers=9").unwrap();
        config
            .apply_settings_file(
                "# lab 4 master\n\nmin_receivers = 2   # two rows\nstart_timeout=300\n\
                 diskcast.rate = 90\ndisk = serial:REF-1\non_done = reboot\n",
            )
            .unwrap();
        assert_eq!(config.role, Role::Master);
        assert_eq!(config.min_receivers, 2);
        assert_eq!(config.start_timeout_secs, Some(300));
        assert_eq!(config.rate_mbps, Some(90));
        assert_eq!(config.disk, DiskSelector::Serial("REF-1".into()));
        assert_eq!(config.on_done, Finish::Reboot);

        let err = config
            .apply_settings_file("rate = 90\nmin_receivers = many\n")
            .unwrap_err();
        assert_eq!(err.line, 2);
        assert!(matches!(err.source, CmdlineError::InvalidValue { .. }));
        let err = config.apply_settings_file("just words\n").unwrap_err();
        assert_eq!(err.line, 1);
        let err = config
            .apply_settings_file("interface = eth 0\n")
            .unwrap_err();
        assert!(matches!(err.source, CmdlineError::InvalidValue { .. }));
        let err = config.apply_settings_file("colour = red\n").unwrap_err();
        assert!(matches!(err.source, CmdlineError::UnknownKey { .. }));
        // Found by the settings_file fuzz target: a task without its token was accepted, then
        // rendered as `token =`, which no longer parsed.
        let err = BootConfig::default()
            .apply_settings_file("role = slave\ntask = 757\n")
            .unwrap_err();
        assert_eq!(err.line, 2);
        assert!(matches!(err.source, CmdlineError::MissingValue { ref key } if key == "token"));

        // A rendered settings file reads back to the same settings.
        let mut fresh = BootConfig::default();
        fresh
            .apply_settings_file(&config.render_settings_file())
            .unwrap();
        assert_eq!(fresh, config);
    }

    #[test]
    fn mutated_settings_files_never_panic_and_what_parses_round_trips() {
        let base = "min_receivers = 2\nstart_timeout = 300 # x\ndisk = serial:REF-1\n\
                    rate = 90\non_done = reboot\ngroup = 239.1.2.3\nimage = golden\n";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"= #\n:abcdefgs0123456789.-_\t";
        for _ in 0..20_000 {
            let mut bytes = base.as_bytes().to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                let c = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 => bytes[at] = c,
                    1 => bytes.insert(at, c),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            let Ok(text) = String::from_utf8(bytes) else {
                continue;
            };
            let mut config = BootConfig::default();
            if config.apply_settings_file(&text).is_ok() {
                let mut again = BootConfig::default();
                again
                    .apply_settings_file(&config.render_settings_file())
                    .unwrap_or_else(|e| panic!("{text:?} rendered badly: {e}"));
                assert_eq!(again, config, "{text:?}");
                assert_eq!(BootConfig::parse(&config.render()), Ok(config));
            }
        }
    }

    #[test]
    fn foreign_parameters_are_ignored() {
        let config = BootConfig::parse("root=/dev/sda1 ro initrd=initramfs.img").unwrap();
        assert_eq!(config, BootConfig::default());
    }

    #[test]
    fn a_task_needs_both_its_number_and_its_token() {
        let token = "0f".repeat(32);
        let both = BootConfig::parse(&format!("diskcast.task=7 diskcast.token={token}")).unwrap();
        assert_eq!(both.task.as_ref().map(|t| t.id), Some(7));
        assert!(
            !format!("{both:?}").contains(&token),
            "the token stays out of debug output"
        );
        assert!(BootConfig::parse("diskcast.task=7").is_err());
        assert!(BootConfig::parse(&format!("diskcast.token={token}")).is_err());
        assert!(BootConfig::parse("diskcast.task=7 diskcast.token=XYZ").is_err());
        let err = BootConfig::parse(&format!(
            "diskcast.task=7 diskcast.token={}",
            "G".repeat(64)
        ))
        .unwrap_err()
        .to_string();
        assert!(!err.contains("GGGG"), "a bad token is not echoed: {err}");
    }

    #[test]
    fn a_parameter_given_twice_or_a_bad_interface_is_an_error() {
        // "Last wins" would let a second `diskcast.role` hidden in a value take over.
        let err = BootConfig::parse("diskcast.role=inventory diskcast.role=slave").unwrap_err();
        assert_eq!(err, CmdlineError::Duplicate { key: "role".into() });
        assert!(BootConfig::parse("diskcast.interface=a-very-long-ifname0").is_err());
        assert!(BootConfig::parse("diskcast.interface=eth0").is_ok());
        let mut config = BootConfig::default();
        assert!(config
            .apply_settings_file("disk = serial:A\u{7}B\n")
            .is_err());
    }

    #[test]
    fn errors_name_the_parameter() {
        let err = BootConfig::parse("diskcast.role=painter").unwrap_err();
        assert!(err.to_string().contains("diskcast.role=painter"), "{err}");
        assert!(err.to_string().contains("inventory"), "{err}");
        let err = BootConfig::parse("diskcast.colour=red").unwrap_err();
        assert!(matches!(err, CmdlineError::UnknownKey { .. }));
        let err = BootConfig::parse("diskcast.server").unwrap_err();
        assert_eq!(
            err,
            CmdlineError::MissingValue {
                key: "server".into()
            }
        );
        let err = BootConfig::parse("diskcast.server=").unwrap_err();
        assert_eq!(
            err,
            CmdlineError::MissingValue {
                key: "server".into()
            }
        );
        let err = BootConfig::parse("diskcast.dhcp_timeout=0").unwrap_err();
        assert!(matches!(err, CmdlineError::InvalidValue { .. }));
        for bad in [
            "diskcast.group=10.0.0.1",
            "diskcast.disk=/dev/sda",
            "diskcast.disk=name:../x",
            "diskcast.min_receivers=0",
            "diskcast.image=../etc",
            "diskcast.store_port=0",
            "diskcast.blocks=some",
            "diskcast.grow=yes",
            "diskcast.ttl=0",
            "diskcast.ttl=256",
        ] {
            assert!(
                matches!(
                    BootConfig::parse(bad),
                    Err(CmdlineError::InvalidValue { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(parse_size("500G"), Some(500_000_000_000));
        assert_eq!(parse_size("64Mi"), Some(64 << 20));
        assert_eq!(parse_size("1.5T"), Some(1_500_000_000_000));
        for bad in ["", "G", "12X", "-5G", "0"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert!(BootConfig::parse("diskcast.disk=size:lots").is_err());
        assert_eq!(
            BootConfig::parse("diskcast.disk=size:500G").unwrap().disk,
            DiskSelector::Size("500G".into())
        );
        assert_eq!(
            BootConfig::parse("diskcast.disk=name:nvme0n1")
                .unwrap()
                .disk,
            DiskSelector::Name("nvme0n1".into())
        );
    }
}
