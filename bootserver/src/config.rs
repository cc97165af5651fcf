//! The bootserver's configuration: one TOML file (see `bootserver/bootserver.example.toml`).
//!
//! Two layers, as dora does it: [`file`] is the file's shape, strings and all, with the position
//! of every value; [`Config::from_file`] checks all of it at once and builds the typed [`Config`]
//! the server runs on — roles, disk selectors and MAC addresses parsed, ports assigned. Every
//! problem is reported, each with its line, and nothing is parsed again per request.

use diskcast_proto::cmdline::{BootConfig, DiskSelector, Finish, Role};
use diskcast_proto::image_file::{valid_image_name, IMAGE_NAME_RULE};
use diskcast_proto::mac::MacAddr;
use diskcast_proto::units::Rate;
use diskcast_proto::wire::{DEFAULT_GROUP, DEFAULT_PORT};
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use file::{DhcpMode, UefiLoader};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {path} has {} problem(s):\n{}", .issues.len(), Issues(.issues))]
    Invalid { path: PathBuf, issues: Vec<Issue> },
}

/// One problem in the config, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// 1-based; 0 when the problem is not at one place (a value given on the command line).
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "  {}", self.message),
            line => write!(f, "  line {line}: {}", self.message),
        }
    }
}

struct Issues<'a>(&'a [Issue]);

impl fmt::Display for Issues<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

/// The file's shape: what serde reads, with spans so problems can name their line.
pub mod file {
    use serde::Deserialize;
    use std::net::Ipv4Addr;
    use std::path::PathBuf;
    use toml::Spanned;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
    #[serde(rename_all = "lowercase")]
    pub enum DhcpMode {
        /// Hand out addresses and boot information.
        #[default]
        Full,
        /// Another server hands out addresses; answer PXE clients with boot information only.
        Proxy,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
    #[serde(rename_all = "lowercase")]
    pub enum UefiLoader {
        /// iPXE on the firmware's network stack (SNP): works on most firmware.
        #[default]
        Snponly,
        /// iPXE with its own drivers.
        Ipxe,
    }

    impl UefiLoader {
        pub fn file_name(self) -> &'static str {
            match self {
                Self::Snponly => "snponly.efi",
                Self::Ipxe => "ipxe.efi",
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ConfigFile {
        pub interface: Spanned<String>,
        pub address: Option<Ipv4Addr>,
        #[serde(default = "default_http_port")]
        pub http_port: u16,
        #[serde(default = "default_tftp_port")]
        pub tftp_port: u16,
        pub state_dir: PathBuf,
        pub store_dir: Option<PathBuf>,
        pub dhcp: Spanned<Dhcp>,
        pub boot: Boot,
        #[serde(default)]
        pub agent: Agent,
        #[serde(default, rename = "machine")]
        pub machines: Vec<Spanned<Machine>>,
        #[serde(default, rename = "deploy")]
        pub deploys: Vec<Spanned<Deploy>>,
    }

    fn default_http_port() -> u16 {
        8080
    }
    fn default_tftp_port() -> u16 {
        69
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Dhcp {
        #[serde(default)]
        pub mode: DhcpMode,
        pub range_start: Option<Ipv4Addr>,
        pub range_end: Option<Ipv4Addr>,
        #[serde(default = "default_netmask")]
        pub netmask: Ipv4Addr,
        pub router: Option<Ipv4Addr>,
        #[serde(default)]
        pub dns: Vec<Ipv4Addr>,
        #[serde(default = "default_lease_secs")]
        pub lease_secs: Spanned<u32>,
        #[serde(default, rename = "reservation")]
        pub reservations: Vec<Spanned<Reservation>>,
    }

    fn default_netmask() -> Ipv4Addr {
        Ipv4Addr::new(255, 255, 255, 0)
    }
    fn default_lease_secs() -> Spanned<u32> {
        Spanned::new(0..0, 3600)
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Reservation {
        pub mac: Spanned<String>,
        pub address: Ipv4Addr,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Boot {
        pub kernel: PathBuf,
        pub initramfs: PathBuf,
        #[serde(default = "default_tftp_root")]
        pub tftp_root: PathBuf,
        #[serde(default)]
        pub uefi_loader: UefiLoader,
        #[serde(default = "no_kernel_args")]
        pub kernel_args: Spanned<String>,
        #[serde(default = "default_true")]
        pub answer_router_solicitations: bool,
    }

    fn default_true() -> bool {
        true
    }
    fn no_kernel_args() -> Spanned<String> {
        Spanned::new(0..0, String::new())
    }
    fn default_tftp_root() -> PathBuf {
        PathBuf::from("/usr/lib/ipxe")
    }

    #[derive(Debug, Clone, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Agent {
        pub role: Option<Spanned<String>>,
        pub on_error: Option<Spanned<String>>,
        pub on_done: Option<Spanned<String>>,
        pub log: Option<Spanned<String>>,
        pub disk: Option<Spanned<String>>,
        pub group: Option<Spanned<Ipv4Addr>>,
        pub port: Option<u16>,
        pub min_receivers: Option<u32>,
        pub start_timeout: Option<u32>,
        pub rate: Option<u32>,
        pub image: Option<Spanned<String>>,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Machine {
        pub mac: Spanned<String>,
        pub role: Option<Spanned<String>>,
        pub disk: Option<Spanned<String>>,
        pub image: Option<Spanned<String>>,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Deploy {
        pub image: Spanned<String>,
        #[serde(default = "default_min_receivers")]
        pub min_receivers: u32,
        pub start_timeout: Option<u32>,
        pub rate: Option<u32>,
        pub deadline: Option<u32>,
        pub port: Option<u16>,
    }

    fn default_min_receivers() -> u32 {
        1
    }
}

/// The validated configuration the server runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub interface: String,
    /// The server's own address on that interface; looked up when absent.
    pub address: Option<Ipv4Addr>,
    pub http_port: u16,
    pub tftp_port: u16,
    /// Directory for leases and other state.
    pub state_dir: PathBuf,
    /// The image store (captures, imports, deploys).
    pub store_dir: PathBuf,
    pub dhcp: Dhcp,
    pub boot: Boot,
    /// What every machine's agent is told unless its `[[machine]]` entry says otherwise.
    pub agent: AgentPolicy,
    pub machines: BTreeMap<MacAddr, MachinePolicy>,
    /// Stored images the server multicasts, one session after another, each on its own port.
    pub deploys: Vec<Deploy>,
}

#[derive(Debug, Clone)]
pub struct Dhcp {
    pub mode: DhcpMode,
    /// First and last address handed out (full mode).
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
    pub netmask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: u32,
    pub reservations: BTreeMap<MacAddr, Ipv4Addr>,
}

#[derive(Debug, Clone)]
pub struct Boot {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Where the iPXE loaders (undionly.kpxe, ipxe.efi, snponly.efi) are: the TFTP root.
    pub tftp_root: PathBuf,
    pub uefi_loader: UefiLoader,
    /// Extra kernel parameters, e.g. `console=ttyS0,115200`.
    pub kernel_args: String,
    /// Answer IPv6 router solicitations (router lifetime 0) so iPXE does not wait ~15 s for one.
    pub answer_router_solicitations: bool,
}

#[derive(Debug, Clone)]
pub struct AgentPolicy {
    pub role: Role,
    pub on_error: Finish,
    pub on_done: Finish,
    pub log_level: log::LevelFilter,
    pub disk: DiskSelector,
    pub group: Ipv4Addr,
    pub port: u16,
    pub min_receivers: u32,
    pub start_timeout_secs: Option<u32>,
    pub rate_mbps: Option<u32>,
    pub image: Option<String>,
}

/// A `[[machine]]` entry: what differs for one machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachinePolicy {
    pub role: Option<Role>,
    pub disk: Option<DiskSelector>,
    pub image: Option<String>,
}

/// A `[[deploy]]` entry: one stored image served to its slaves.
#[derive(Debug, Clone)]
pub struct Deploy {
    pub image: String,
    pub min_receivers: u32,
    pub start_timeout: Option<Duration>,
    pub rate: Option<Rate>,
    pub deadline: Option<Duration>,
    /// UDP port of this image's sessions (on the agent's group).
    pub port: u16,
}

/// Collects problems with their lines while a file is checked.
struct Checker<'a> {
    text: &'a str,
    issues: Vec<Issue>,
}

impl Checker<'_> {
    fn line_of(&self, span: &std::ops::Range<usize>) -> usize {
        if span.is_empty() && span.start == 0 {
            return 0;
        }
        self.text[..span.start.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn report(&mut self, span: &std::ops::Range<usize>, message: String) {
        let line = self.line_of(span);
        self.issues.push(Issue { line, message });
    }

    /// Parses a spanned value, reporting `what` with its line when it does not parse.
    fn parse<T>(
        &mut self,
        value: &toml::Spanned<String>,
        what: &str,
        parse: impl FnOnce(&str) -> Option<T>,
        expected: &str,
    ) -> Option<T> {
        let parsed = parse(value.get_ref());
        if parsed.is_none() {
            self.report(
                &value.span(),
                format!("{what} = {:?} is not {expected}", value.get_ref()),
            );
        }
        parsed
    }

    /// A value the agent receives on its kernel command line: one word of printable ASCII.
    fn kernel_word(&mut self, value: &toml::Spanned<String>, what: &str) -> bool {
        let text = value.get_ref();
        let ok = !text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            self.report(
                &value.span(),
                format!(
                    "{what} = {text:?} cannot go on a kernel command line: no spaces or control characters"
                ),
            );
        }
        ok
    }

    fn image_name(&mut self, value: &toml::Spanned<String>, what: &str) -> Option<String> {
        self.parse(
            value,
            what,
            |s| valid_image_name(s).then(|| s.to_string()),
            &format!("a valid image name ({IMAGE_NAME_RULE})"),
        )
    }

    fn disk(&mut self, value: &toml::Spanned<String>, what: &str) -> Option<DiskSelector> {
        if !self.kernel_word(value, what) {
            return None;
        }
        self.parse(value, what, DiskSelector::parse, DiskSelector::EXPECTED)
    }
}

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME: usize = 15;

/// Why an interface name cannot be one, if it cannot.
pub fn interface_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_INTERFACE_NAME {
        return Some(format!(
            "interface {name:?} is not an interface name (1 to {MAX_INTERFACE_NAME} bytes)"
        ));
    }
    if name
        .bytes()
        .any(|b| !b.is_ascii_graphic() || b == b'/' || b == b':')
    {
        return Some(format!(
            "interface {name:?} is not an interface name (no spaces, `/` or `:`)"
        ));
    }
    None
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_text(&text, path)
    }

    /// Checks `text` (the file at `path`) completely and builds the typed config.
    pub fn from_text(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let shape: file::ConfigFile =
            toml::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.into(),
                source,
            })?;
        let mut checker = Checker {
            text,
            issues: Vec::new(),
        };
        let config = Self::from_file(shape, &mut checker);
        match config {
            Some(config) if checker.issues.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid {
                path: path.into(),
                issues: checker.issues,
            }),
        }
    }

    fn from_file(shape: file::ConfigFile, c: &mut Checker<'_>) -> Option<Self> {
        if let Some(problem) = interface_name_problem(shape.interface.get_ref()) {
            c.report(&shape.interface.span(), problem);
        }
        let dhcp = Self::check_dhcp(&shape.dhcp, c);
        if !shape.boot.kernel_args.get_ref().is_ascii()
            || shape
                .boot
                .kernel_args
                .get_ref()
                .bytes()
                .any(|b| b.is_ascii_control())
        {
            c.report(
                &shape.boot.kernel_args.span(),
                "[boot] kernel_args must be printable ASCII".into(),
            );
        }
        let agent = Self::check_agent(&shape.agent, c);
        let mut machines = BTreeMap::new();
        for entry in &shape.machines {
            let m = entry.get_ref();
            let Some(mac) = c.parse(
                &m.mac,
                "[[machine]] mac",
                |s| s.parse().ok(),
                "a MAC address (aa:bb:cc:dd:ee:ff)",
            ) else {
                continue;
            };
            let role = m
                .role
                .as_ref()
                .and_then(|r| c.parse(r, "[[machine]] role", |s| s.parse().ok(), Role::EXPECTED));
            let disk = m.disk.as_ref().and_then(|d| c.disk(d, "[[machine]] disk"));
            let image = m
                .image
                .as_ref()
                .and_then(|i| c.image_name(i, "[[machine]] image"));
            let policy = MachinePolicy { role, disk, image };
            if machines.insert(mac, policy).is_some() {
                c.report(&entry.span(), format!("[[machine]] {mac} is listed twice"));
            }
        }
        let deploys = Self::check_deploys(&shape.deploys, agent.as_ref(), c);
        let config = Config {
            interface: shape.interface.into_inner(),
            address: shape.address,
            http_port: shape.http_port,
            tftp_port: shape.tftp_port,
            store_dir: shape
                .store_dir
                .unwrap_or_else(|| shape.state_dir.join("images")),
            state_dir: shape.state_dir,
            dhcp: dhcp?,
            boot: Boot {
                kernel: shape.boot.kernel,
                initramfs: shape.boot.initramfs,
                tftp_root: shape.boot.tftp_root,
                uefi_loader: shape.boot.uefi_loader,
                kernel_args: shape.boot.kernel_args.into_inner(),
                answer_router_solicitations: shape.boot.answer_router_solicitations,
            },
            agent: agent?,
            machines,
            deploys,
        };
        // What each machine would be told must be complete (a capture needs its image name).
        for (mac, entry) in shape.machines.iter().filter_map(|e| {
            let mac: MacAddr = e.get_ref().mac.get_ref().parse().ok()?;
            Some((mac, e))
        }) {
            if let Err(why) = config.check_machine(Some(mac)) {
                c.report(&entry.span(), format!("[[machine]] {mac}: {why}"));
            }
        }
        if let Err(why) = config.check_machine(None) {
            c.report(&(0..0), format!("[agent]: {why}"));
        }
        Some(config)
    }

    fn check_dhcp(spanned: &toml::Spanned<file::Dhcp>, c: &mut Checker<'_>) -> Option<Dhcp> {
        let d = spanned.get_ref();
        let span = spanned.span();
        let mut range = None;
        match (d.mode, d.range_start, d.range_end) {
            (DhcpMode::Full, Some(start), Some(end)) => {
                let mask = u32::from(d.netmask);
                if u32::from(start) > u32::from(end) {
                    c.report(
                        &span,
                        format!("[dhcp] range_start {start} is after range_end {end}"),
                    );
                } else if u32::from(start) & mask != u32::from(end) & mask {
                    c.report(
                        &span,
                        format!(
                            "[dhcp] range {start}-{end} spans more than one subnet of netmask {}",
                            d.netmask
                        ),
                    );
                } else {
                    range = Some((start, end));
                }
            }
            (DhcpMode::Full, _, _) => c.report(
                &span,
                "[dhcp] mode = \"full\" needs range_start and range_end".into(),
            ),
            (DhcpMode::Proxy, start, end) => range = start.zip(end),
        }
        if *d.lease_secs.get_ref() < 60 {
            c.report(
                &d.lease_secs.span(),
                format!(
                    "[dhcp] lease_secs = {} is too short (at least 60)",
                    d.lease_secs.get_ref()
                ),
            );
        }
        let mut reservations = BTreeMap::new();
        for r in &d.reservations {
            let r = r.get_ref();
            if let Some(mac) = c.parse(
                &r.mac,
                "[[dhcp.reservation]] mac",
                |s| s.parse().ok(),
                "a MAC address (aa:bb:cc:dd:ee:ff)",
            ) {
                reservations.insert(mac, r.address);
            }
        }
        Some(Dhcp {
            mode: d.mode,
            range,
            netmask: d.netmask,
            router: d.router,
            dns: d.dns.clone(),
            lease_secs: *d.lease_secs.get_ref(),
            reservations,
        })
    }

    fn check_agent(a: &file::Agent, c: &mut Checker<'_>) -> Option<AgentPolicy> {
        let defaults = BootConfig::default();
        let finish = |c: &mut Checker<'_>, value: &Option<toml::Spanned<String>>, what, default| {
            value.as_ref().map_or(Some(default), |v| {
                c.parse(v, what, |s| s.parse().ok(), Finish::EXPECTED)
            })
        };
        let role = a.role.as_ref().map_or(Some(Role::default()), |r| {
            c.parse(r, "[agent] role", |s| s.parse().ok(), Role::EXPECTED)
        });
        let on_error = finish(c, &a.on_error, "[agent] on_error", defaults.on_error);
        let on_done = finish(c, &a.on_done, "[agent] on_done", defaults.on_done);
        let log_level = a.log.as_ref().map_or(Some(defaults.log_level), |l| {
            c.parse(
                l,
                "[agent] log",
                |s| s.parse().ok(),
                "a log level (error, warn, info, debug, trace)",
            )
        });
        let disk = a
            .disk
            .as_ref()
            .map_or(Some(DiskSelector::Only), |d| c.disk(d, "[agent] disk"));
        let group = match &a.group {
            Some(g) if !g.get_ref().is_multicast() => {
                c.report(
                    &g.span(),
                    format!("[agent] group = {} is not a multicast address", g.get_ref()),
                );
                None
            }
            Some(g) => Some(*g.get_ref()),
            None => Some(DEFAULT_GROUP),
        };
        let image = match &a.image {
            Some(i) => Some(c.image_name(i, "[agent] image")?),
            None => None,
        };
        Some(AgentPolicy {
            role: role?,
            on_error: on_error?,
            on_done: on_done?,
            log_level: log_level?,
            disk: disk?,
            group: group?,
            port: a.port.unwrap_or(DEFAULT_PORT),
            min_receivers: a.min_receivers.unwrap_or(1).max(1),
            start_timeout_secs: a.start_timeout,
            rate_mbps: a.rate,
            image,
        })
    }

    fn check_deploys(
        entries: &[toml::Spanned<file::Deploy>],
        agent: Option<&AgentPolicy>,
        c: &mut Checker<'_>,
    ) -> Vec<Deploy> {
        let p2p_port = agent.map_or(DEFAULT_PORT, |a| a.port);
        let mut deploys: Vec<Deploy> = Vec::new();
        let mut ports = BTreeMap::new();
        for (index, entry) in entries.iter().enumerate() {
            let d = entry.get_ref();
            let span = entry.span();
            let Some(image) = c.image_name(&d.image, "[[deploy]] image") else {
                continue;
            };
            if d.min_receivers == 0 {
                c.report(
                    &span,
                    format!("[[deploy]] {image}: min_receivers must be at least 1"),
                );
            }
            if deploys.iter().any(|other| other.image == image) {
                c.report(&span, format!("[[deploy]] image {image:?} is listed twice"));
            }
            let port = d
                .port
                .unwrap_or_else(|| p2p_port.wrapping_add(1).wrapping_add(index as u16));
            if port == p2p_port {
                c.report(
                    &span,
                    format!(
                        "[[deploy]] {image} would use port {port}, the peer-to-peer masters' port: give it another `port`"
                    ),
                );
            }
            if let Some(other) = ports.insert(port, image.clone()) {
                c.report(
                    &span,
                    format!(
                        "[[deploy]] {image} and {other} would both use port {port}: give one a `port`"
                    ),
                );
            }
            deploys.push(Deploy {
                image,
                min_receivers: d.min_receivers.max(1),
                start_timeout: d.start_timeout.map(|s| Duration::from_secs(s.into())),
                rate: d.rate.map(|r| Rate::from_mbps(f64::from(r))),
                deadline: d.deadline.map(|s| Duration::from_secs(s.into())),
                port,
            });
        }
        deploys
    }

    /// Why the settings for `mac` (or any machine without an entry) cannot be rendered, if so.
    fn check_machine(&self, mac: Option<MacAddr>) -> Result<(), String> {
        let agent = self.agent_config_for(mac, None);
        if agent.role == Role::Capture && agent.image.is_none() {
            return Err(
                "role \"capture\" needs an image name: set [agent] image or the machine's image"
                    .into(),
            );
        }
        Ok(())
    }

    /// Applies the command line's overrides and checks them like the file's values.
    pub fn override_with(
        &mut self,
        interface: Option<String>,
        mode: Option<DhcpMode>,
        state_dir: Option<PathBuf>,
    ) -> Result<(), ConfigError> {
        if let Some(interface) = interface {
            if let Some(problem) = interface_name_problem(&interface) {
                return Err(ConfigError::Invalid {
                    path: PathBuf::from("--interface"),
                    issues: vec![Issue {
                        line: 0,
                        message: problem,
                    }],
                });
            }
            self.interface = interface;
        }
        if let Some(mode) = mode {
            if mode == DhcpMode::Full && self.dhcp.range.is_none() {
                return Err(ConfigError::Invalid {
                    path: PathBuf::from("--mode"),
                    issues: vec![Issue {
                        line: 0,
                        message: "full mode needs [dhcp] range_start and range_end".into(),
                    }],
                });
            }
            self.dhcp.mode = mode;
        }
        if let Some(dir) = state_dir {
            self.state_dir = dir;
        }
        Ok(())
    }

    /// The multicast group every session uses.
    pub fn session_group(&self) -> Ipv4Addr {
        self.agent.group
    }

    /// The agent settings for one machine (its `[[machine]]` entry over `[agent]`), rendered
    /// later onto its kernel command line.
    pub fn agent_config_for(&self, mac: Option<MacAddr>, server: Option<Ipv4Addr>) -> BootConfig {
        let machine = mac.and_then(|mac| self.machines.get(&mac));
        let a = &self.agent;
        let role = machine.and_then(|m| m.role).unwrap_or(a.role);
        let image = machine
            .and_then(|m| m.image.clone())
            .or_else(|| a.image.clone());
        // A slave whose image a [[deploy]] serves listens on that deploy's port; other slaves
        // wait for a peer master on the agent's port.
        let port = match &image {
            Some(name) if role == Role::Slave => self
                .deploys
                .iter()
                .find(|d| &d.image == name)
                .map_or(a.port, |d| d.port),
            _ => a.port,
        };
        BootConfig {
            role,
            server,
            on_error: a.on_error,
            on_done: a.on_done,
            log_level: a.log_level,
            disk: machine
                .and_then(|m| m.disk.clone())
                .unwrap_or_else(|| a.disk.clone()),
            group: a.group,
            port,
            min_receivers: a.min_receivers,
            start_timeout_secs: a.start_timeout_secs,
            rate_mbps: a.rate_mbps,
            image,
            store_port: self.http_port,
            ..BootConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../bootserver.example.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text, Path::new("test.toml"))
    }

    fn mac(text: &str) -> MacAddr {
        text.parse().unwrap()
    }

    fn issues(text: &str) -> Vec<Issue> {
        match parse(text) {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn capture_needs_an_image_name_and_renders_where_to_upload() {
        let base = EXAMPLE.replace("http_port = 8080", "http_port = 8181");
        let text =
            format!("{base}\n[[machine]]\nmac = \"52:54:00:aa:bb:cc\"\nrole = \"capture\"\n");
        let found = issues(&text);
        assert!(
            found
                .iter()
                .any(|i| i.message.contains("needs an image name")),
            "{found:?}"
        );
        let config = parse(&format!("{text}image = \"golden\"\n")).unwrap();
        let agent = config.agent_config_for(
            Some(mac("52:54:00:aa:bb:cc")),
            Some(Ipv4Addr::new(10, 77, 0, 1)),
        );
        assert_eq!(agent.image.as_deref(), Some("golden"));
        let line = agent.render();
        assert!(
            line.contains("diskcast.image=golden") && line.contains("diskcast.store_port=8181")
        );
        assert_eq!(BootConfig::parse(&line), Ok(agent));
        assert!(parse(&format!("{text}image = \"../../etc\"\n")).is_err());
        assert!(parse(&format!("{EXAMPLE}\n[[deploy]]\nimage = \"a b\"\n")).is_err());
    }

    #[test]
    fn each_deployed_image_has_its_own_port_and_slaves_get_theirs() {
        let text = format!(
            "{EXAMPLE}\n[[machine]]\nmac = \"52:54:00:00:00:0a\"\nrole = \"slave\"\nimage = \"win11\"\n\
             [[machine]]\nmac = \"52:54:00:00:00:0b\"\nrole = \"slave\"\nimage = \"ubuntu\"\n\
             [[machine]]\nmac = \"52:54:00:00:00:0c\"\nrole = \"slave\"\n\
             [[deploy]]\nimage = \"win11\"\nmin_receivers = 4\n\
             [[deploy]]\nimage = \"ubuntu\"\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.deploys[0].port, 7745);
        assert_eq!(config.deploys[1].port, 7746);
        let port_of = |m: &str| config.agent_config_for(Some(mac(m)), None).port;
        assert_eq!(port_of("52:54:00:00:00:0a"), 7745);
        assert_eq!(port_of("52:54:00:00:00:0b"), 7746);
        // No image: waits for a peer master on the agent's port.
        assert_eq!(port_of("52:54:00:00:00:0c"), 7744);

        let clash = text.replace(
            "[[deploy]]\nimage = \"ubuntu\"\n",
            "[[deploy]]\nimage = \"ubuntu\"\nport = 7745\n",
        );
        let found = issues(&clash);
        assert!(
            found.iter().any(|i| i.message.contains("port 7745")),
            "{found:?}"
        );
        let twice = format!("{text}[[deploy]]\nimage = \"win11\"\n");
        assert!(parse(&twice).is_err());
    }

    #[test]
    fn example_config_is_valid() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(config.dhcp.mode, DhcpMode::Full);
        assert_eq!(config.store_dir, PathBuf::from("/var/lib/diskcast/images"));
    }

    #[test]
    fn machine_role_overrides_default_and_renders_for_the_agent() {
        let text = EXAMPLE.replace("# min_receivers = 1 ", "min_receivers = 4 ")
            + "\n[[machine]]\nmac = \"52-54-00-AA-BB-CC\"\nrole = \"slave\"\ndisk = \"serial:DISK-7\"\n";
        let config = parse(&text).unwrap();
        let server = Some(Ipv4Addr::new(10, 77, 0, 1));
        let slave = config.agent_config_for(Some(mac("52:54:00:aa:bb:cc")), server);
        assert_eq!(slave.role, Role::Slave);
        assert_eq!(slave.disk, DiskSelector::Serial("DISK-7".into()));
        assert_eq!(slave.min_receivers, 4);
        let other = config.agent_config_for(Some(mac("52:54:00:aa:bb:cd")), server);
        assert_eq!(other.role, Role::Inventory);
        // What the bootserver renders, the agent parses back to the same settings.
        assert_eq!(BootConfig::parse(&slave.render()), Ok(slave));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = EXAMPLE
            .replace("role = \"inventory\"", "role = \"painter\"")
            .replace("range_end = \"10.77.0.199\"", "range_end = \"10.77.1.200\"")
            + "\n[[machine]]\nmac = \"52:54:00:zz:00:01\"\n\
               [[machine]]\nmac = \"52:54:00:00:00:02\"\ndisk = \"sideways\"\n";
        let found = issues(&text);
        let line_of = |needle: &str| {
            text.lines()
                .position(|l| l.contains(needle))
                .map(|i| i + 1)
                .unwrap()
        };
        let expect = [
            ("painter", line_of("role = \"painter\"")),
            ("52:54:00:zz:00:01", line_of("52:54:00:zz:00:01")),
            ("sideways", line_of("sideways")),
            ("subnet", line_of("[dhcp]")),
        ];
        for (needle, line) in expect {
            assert!(
                found
                    .iter()
                    .any(|i| i.message.contains(needle) && i.line == line),
                "{needle} at line {line} not in {found:?}"
            );
        }
        let shown = parse(&text).unwrap_err().to_string();
        assert!(shown.contains("4 problem(s)"), "{shown}");
        let err = parse(&EXAMPLE.replace("http_port", "htpp_port")).unwrap_err();
        assert!(err.to_string().contains("not valid"), "{err}");
    }

    #[test]
    fn values_that_would_break_the_kernel_command_line_are_refused() {
        // A space would make the rest a kernel parameter of its own: `serial:WD` and then
        // `diskcast.role=master`.
        let text = EXAMPLE.replace(
            "# disk = \"only\"",
            "disk = \"serial:WD 123 diskcast.role=master\"",
        );
        let found = issues(&text);
        assert!(
            found
                .iter()
                .any(|i| i.message.contains("kernel command line")),
            "{found:?}"
        );
        let tab = EXAMPLE.replace("# disk = \"only\"", "disk = \"serial:WD\\t1\"");
        assert!(parse(&tab).is_err());
        let long = EXAMPLE.replace("interface = \"br0\"", "interface = \"a-very-long-ifname0\"");
        let found = issues(&long);
        assert!(
            found.iter().any(|i| i.message.contains("interface")),
            "{found:?}"
        );
        let mut config = parse(EXAMPLE).unwrap();
        assert!(config
            .override_with(Some("eth0 extra".into()), None, None)
            .is_err());
    }
}
