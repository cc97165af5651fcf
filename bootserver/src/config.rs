//! The bootserver's configuration: one TOML file (see `bootserver/bootserver.example.toml`).
//!
//! Two layers, as dora does it: [`file`] is the file's shape, strings and all, with the position
//! of every value; [`Config::from_file`] checks all of it at once and builds the typed [`Config`]
//! the server runs on — roles, disk selectors and MAC addresses parsed, ports assigned. Every
//! problem is reported, each with its line, and nothing is parsed again per request.

use diskcast_proto::cmdline::{BootConfig, DiskSelector, Finish};
use diskcast_proto::image_file::{valid_image_name, IMAGE_NAME_RULE};
use diskcast_proto::mac::MacAddr;
use diskcast_proto::units::Rate;
use diskcast_proto::wire::{DEFAULT_GROUP, DEFAULT_PORT};
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use file::{default_grub_net, default_shim};
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
        /// Where machines, tasks and leases live: an SQLite file (default
        /// `state_dir/registry.sqlite`) or `postgres://USER@HOST/DB`, shared by several sites.
        pub database: Option<Spanned<String>>,
        /// This bootserver's name among the sites sharing one PostgreSQL registry.
        pub site: Option<Spanned<String>>,
        pub dhcp: Spanned<Dhcp>,
        pub boot: Boot,
        #[serde(default)]
        pub agent: Agent,
        #[serde(default)]
        pub lab: Lab,
        #[serde(default, rename = "machine")]
        pub machines: Vec<Spanned<Machine>>,
        #[serde(default, rename = "image")]
        pub images: Vec<Spanned<Image>>,
        #[serde(default)]
        pub security: Security,
        /// `[https]`: the API, console and uploads over TLS as well (boot files stay on HTTP).
        pub https: Option<Spanned<Https>>,
        /// Gone: sessions start from tasks now. Read only to say how to migrate.
        #[serde(default, rename = "deploy")]
        pub deploys: Vec<Spanned<toml::Value>>,
        /// `[[subnet]]`: more subnets, on another interface or behind a router that relays DHCP.
        #[serde(default, rename = "subnet")]
        pub subnets: Vec<Spanned<Subnet>>,
    }

    /// `[[subnet]]`: one subnet the server boots machines on.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Subnet {
        /// `10.78.0.0/24`.
        pub network: Spanned<String>,
        /// The server's interface that reaches it, directly or through its router.
        pub interface: Option<Spanned<String>>,
        /// The address its machines reach the server at (default: the interface's address).
        pub server_address: Option<Ipv4Addr>,
        pub range_start: Option<Ipv4Addr>,
        pub range_end: Option<Ipv4Addr>,
        pub router: Option<Ipv4Addr>,
        #[serde(default)]
        pub dns: Vec<Ipv4Addr>,
        /// Multicast TTL a deploy session needs to reach it: routers on the way plus one.
        pub ttl: Option<Spanned<u8>>,
        #[serde(default, rename = "reservation")]
        pub reservations: Vec<Spanned<Reservation>>,
    }

    fn default_http_port() -> u16 {
        8080
    }

    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Security {
        /// Public keys besides the server's own that sign images and peer sessions.
        #[serde(default)]
        pub trusted_keys: Vec<Spanned<String>>,
        /// Reads of the API and /status without the admin token.
        pub public_reads: Option<bool>,
    }
    fn default_tftp_port() -> u16 {
        69
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Https {
        #[serde(default = "default_https_port")]
        pub port: Spanned<u16>,
        /// PEM certificate (chain) and its key; both or neither (then a self-signed one).
        pub cert: Option<Spanned<PathBuf>>,
        pub key: Option<Spanned<PathBuf>>,
    }

    fn default_https_port() -> Spanned<u16> {
        Spanned::new(0..0, 8443)
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
        #[serde(default = "default_local_boot_efi")]
        pub local_boot_efi: PathBuf,
        /// `ipxe` or `signed`: what UEFI PXE clients boot unless their machine or group says.
        pub uefi_chain: Option<Spanned<String>>,
        /// Groups whose UEFI machines get the signed chain.
        #[serde(default)]
        pub signed_chain_groups: Vec<Spanned<String>>,
        /// Microsoft-signed shim (Debian's shim-signed).
        #[serde(default = "default_shim")]
        pub shim: PathBuf,
        /// Debian-signed GRUB network image (Debian's grub-efi-amd64-signed).
        #[serde(default = "default_grub_net")]
        pub grub_net: PathBuf,
    }

    pub fn default_shim() -> PathBuf {
        PathBuf::from("/usr/lib/shim/shimx64.efi.signed")
    }
    pub fn default_grub_net() -> PathBuf {
        PathBuf::from("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed")
    }

    fn default_local_boot_efi() -> PathBuf {
        PathBuf::from("/usr/lib/diskcast/localboot.efi")
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
        /// Gone: a machine runs the agent only for a task. Read only to say how to migrate.
        pub role: Option<Spanned<String>>,
        /// Gone with `role`.
        pub image: Option<Spanned<String>>,
        pub on_error: Option<Spanned<String>>,
        pub on_done: Option<Spanned<String>>,
        pub log: Option<Spanned<String>>,
        pub disk: Option<Spanned<String>>,
        pub group: Option<Spanned<Ipv4Addr>>,
        pub port: Option<u16>,
        pub min_receivers: Option<u32>,
        pub start_timeout: Option<u32>,
        pub rate: Option<u32>,
        /// Master tasks: multicast TTL.
        pub ttl: Option<Spanned<u8>>,
    }

    /// `[lab]`: what happens to machines that network-boot.
    #[derive(Debug, Clone, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Lab {
        pub unknown_machines: Option<Spanned<String>>,
        pub local_boot_bios: Option<Spanned<String>>,
        pub local_boot_uefi: Option<Spanned<String>>,
        pub task_timeout: Option<u32>,
        pub start_timeout: Option<u32>,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Machine {
        pub mac: Spanned<String>,
        pub name: Option<Spanned<String>>,
        pub group: Option<Spanned<String>>,
        pub disk: Option<Spanned<String>>,
        pub local_boot: Option<Spanned<String>>,
        /// `ipxe` or `signed` (Secure Boot): what this machine boots on UEFI.
        pub uefi_chain: Option<Spanned<String>>,
        /// Gone: see `Agent::role`.
        pub role: Option<Spanned<String>>,
        /// Gone: see `Agent::role`.
        pub image: Option<Spanned<String>>,
    }

    /// `[[image]]`: how sessions of one stored image run.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Image {
        pub name: Spanned<String>,
        pub group: Option<Spanned<Ipv4Addr>>,
        pub port: Option<u16>,
        pub rate: Option<u32>,
        /// MB/s: the lowest rate its sessions slow down to for a machine that loses most
        /// datagrams (default 10); one that still does there is dropped.
        pub min_rate: Option<u32>,
        pub deadline: Option<u32>,
        pub start_timeout: Option<u32>,
        /// Multicast TTL of its sessions (default: what its machines' subnets need, else 1).
        pub ttl: Option<Spanned<u8>>,
        /// The interface its sessions multicast on (default: its machines' subnets' interface).
        pub interface: Option<Spanned<String>>,
        /// The UDP port its sessions serve relays on (default: derived from its group).
        pub relay_port: Option<Spanned<u16>>,
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
    /// The registry: `state_dir/registry.sqlite`, another SQLite file, or a PostgreSQL database
    /// shared with other sites. Its `Debug`/`Display` never show a password.
    pub database: diskcast_registry::Location,
    /// This bootserver's site name (recorded on the tasks it starts).
    pub site: Option<String>,
    pub dhcp: Dhcp,
    pub boot: Boot,
    /// What every agent is told: how to finish, which disk, the peer-to-peer session.
    pub agent: AgentPolicy,
    pub lab: LabPolicy,
    /// `[[machine]]` entries: registered in the registry at start.
    pub machines: BTreeMap<MacAddr, MachineEntry>,
    /// `[[image]]` entries: session settings per stored image.
    pub images: BTreeMap<String, ImageSession>,
    pub security: SecurityPolicy,
    /// `[https]`: the API, console and uploads over TLS; `None`: plain HTTP only (see README,
    /// "HTTPS").
    pub https: Option<HttpsPolicy>,
    /// `[[subnet]]` entries: subnets besides the one `[dhcp]` describes on `interface`.
    pub subnets: Vec<Subnet>,
}

/// A `[[subnet]]`: machines on it are booted by this server, either directly on one of its
/// interfaces or behind a router that relays their DHCP requests (`ip helper-address`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subnet {
    pub network: ipnet::Ipv4Net,
    /// The server's interface towards it; `None`: [`Config::interface`].
    pub interface: Option<String>,
    /// The address its machines reach the server at; `None`: the interface's address.
    pub server_address: Option<Ipv4Addr>,
    /// First and last address handed out (full mode).
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub reservations: BTreeMap<MacAddr, Ipv4Addr>,
    /// Multicast TTL a deploy session needs to reach it.
    pub ttl: Option<u8>,
}

/// `[security]`: whom the server trusts besides itself, and who may read.
#[derive(Debug, Clone)]
pub struct SecurityPolicy {
    /// Keys (besides the server's own, in `state_dir/signing-key`) whose image signatures the
    /// store accepts and whose peer sessions `receive` tasks' slaves join: a USB stick
    /// master's, an admin's.
    pub trusted_keys: Vec<diskcast_proto::trust::PublicKey>,
    /// `GET` of the API and `/status` without the admin token (default: open on the lab LAN).
    pub public_reads: bool,
}

/// `[https]`: a TLS listener for the API, the console and uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsPolicy {
    pub port: u16,
    pub identity: HttpsIdentity,
}

/// Which certificate the HTTPS listener presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpsIdentity {
    /// Self-signed, made once in `state_dir` and kept (`bootserver key https` prints its
    /// fingerprint, which the server pins in its agents).
    Generated,
    /// PEM files: the certificate (chain first) and its private key.
    Files { cert: PathBuf, key: PathBuf },
}

impl Default for SecurityPolicy {
    fn default() -> Self {
        Self {
            trusted_keys: Vec::new(),
            public_reads: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Dhcp {
    /// Where `[dhcp]` is in the file, for problems found later.
    span: std::ops::Range<usize>,
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
    /// The GRUB image UEFI machines chain to boot their local disk (`scripts/make-localboot-efi`).
    pub local_boot_efi: PathBuf,
    /// What UEFI PXE clients boot unless their machine or group says otherwise.
    pub uefi_chain: UefiChain,
    /// Groups whose UEFI machines boot the signed chain.
    pub signed_chain_groups: std::collections::BTreeSet<String>,
    /// The signed chain's first two stages (served over TFTP as `shimx64.efi`, `grubx64.efi`).
    pub shim: PathBuf,
    pub grub_net: PathBuf,
}

/// What a UEFI machine network-boots into before the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UefiChain {
    /// iPXE (`snponly.efi` or `ipxe.efi`) over TFTP, then the kernel over HTTP: unsigned, so
    /// refused by firmware with Secure Boot on.
    #[default]
    Ipxe,
    /// Secure Boot: Microsoft-signed shim, Debian-signed GRUB and kernel, all over TFTP.
    Signed,
}

impl UefiChain {
    pub const EXPECTED: &'static str = "ipxe or signed";

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ipxe => "ipxe",
            Self::Signed => "signed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "ipxe" => Some(Self::Ipxe),
            "signed" => Some(Self::Signed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentPolicy {
    pub on_error: Finish,
    pub on_done: Finish,
    pub log_level: log::LevelFilter,
    pub disk: DiskSelector,
    /// The peer-to-peer session (`receive` and `master` tasks, a USB master).
    pub group: Ipv4Addr,
    pub port: u16,
    /// A `master` task's start policy and rate, unless the task says otherwise.
    pub min_receivers: u32,
    pub start_timeout_secs: Option<u32>,
    pub rate_mbps: Option<u32>,
    /// A `master` task's multicast TTL.
    pub ttl: u8,
}

/// What a machine nobody registered gets when it network-boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownMachines {
    /// Its local disk: nothing of it is touched.
    LocalBoot,
    /// The agent's inventory (it reads, never writes), then its local disk.
    Inventory,
}

/// How iPXE hands a machine without a task to its local disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalBoot {
    /// BIOS: `sanboot --no-describe --drive 0x80` (the first disk's MBR).
    Sanboot,
    /// Return to the firmware, which tries the next boot device (works on some firmware only:
    /// OVMF opens its setup screen).
    Exit,
    /// UEFI: chain a small GRUB image that finds the local disk's EFI loader.
    Grub,
}

impl LocalBoot {
    pub const EXPECTED: &'static str = "sanboot, exit or grub";

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sanboot => "sanboot",
            Self::Exit => "exit",
            Self::Grub => "grub",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "sanboot" => Some(Self::Sanboot),
            "exit" => Some(Self::Exit),
            "grub" => Some(Self::Grub),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LabPolicy {
    pub unknown_machines: UnknownMachines,
    /// How machines boot locally, unless the registry says otherwise for one of them.
    pub local_boot_bios: LocalBoot,
    pub local_boot_uefi: LocalBoot,
    /// A task whose machine stays silent this long times out.
    pub task_timeout: Duration,
    /// A deploy session waits this long for all its tasks' machines, then starts with whoever
    /// joined.
    pub start_timeout: Duration,
}

/// A `[[machine]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineEntry {
    pub name: Option<String>,
    pub group: Option<String>,
    pub disk: Option<DiskSelector>,
    pub local_boot: Option<LocalBoot>,
    pub uefi_chain: Option<UefiChain>,
}

/// How the sessions of one stored image run.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSession {
    pub group: Ipv4Addr,
    /// The group was derived from the image's name (not configured): another may be used
    /// while an image whose name gives the same group has a session.
    pub group_derived: bool,
    pub port: u16,
    pub rate: Option<Rate>,
    /// The floor of the rate control (see [`diskcast_transport::send::SendOptions::min_rate`]).
    pub min_rate: Option<Rate>,
    pub deadline: Option<Duration>,
    pub start_timeout: Option<Duration>,
    /// Multicast TTL; `None`: what the machines' subnets need (else 1).
    pub ttl: Option<u8>,
    /// Interface to multicast on; `None`: the machines' subnets' interface.
    pub interface: Option<String>,
    /// The UDP port relays subscribe to (`diskcast.upstream=SERVER:PORT`); `None`: derived
    /// from the group when the session starts (see [`relay_port_for`]).
    pub relay_port: Option<u16>,
}

/// Where derived relay ports start: a session on the n-th group of [`DERIVED_GROUPS`] serves
/// relays on `RELAY_PORTS + n`, so concurrent sessions (whose groups differ) never share one and
/// a firewall can open one range.
pub const RELAY_PORTS: u16 = 7800;

/// Every port [`relay_port_for`] derives: configured relay ports stay out of it.
pub const DERIVED_RELAY_PORTS: std::ops::RangeInclusive<u16> =
    (RELAY_PORTS + 1)..=(RELAY_PORTS + 510 + 256);

/// The UDP port a session on `group` serves relays on: `configured`, else derived from the
/// group (a configured group outside the derived range maps into the ports past that range).
pub fn relay_port_for(group: Ipv4Addr, configured: Option<u16>) -> u16 {
    if let Some(port) = configured {
        return port;
    }
    let (first, last) = (u32::from(DERIVED_GROUPS.0), u32::from(DERIVED_GROUPS.1));
    let span = last - first + 1;
    let g = u32::from(group);
    let offset = if (first..=last).contains(&g) {
        g - first + 1
    } else {
        span + 1 + g % 256
    };
    RELAY_PORTS + offset as u16
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
        let dhcp = Self::check_dhcp(&shape.dhcp, !shape.subnets.is_empty(), c);
        let mut subnets = Self::check_subnets(&shape.subnets, shape.dhcp.get_ref().mode, c);
        let dhcp = dhcp.map(|d| Self::place_reservations(d, &mut subnets, shape.address, c));
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
        let uefi_chain = shape
            .boot
            .uefi_chain
            .as_ref()
            .map_or(Some(UefiChain::Ipxe), |v| {
                c.parse(
                    v,
                    "[boot] uefi_chain",
                    UefiChain::parse,
                    UefiChain::EXPECTED,
                )
            });
        let signed_chain_groups = shape
            .boot
            .signed_chain_groups
            .iter()
            .filter_map(|g| {
                c.parse(
                    g,
                    "[boot] signed_chain_groups",
                    |s| {
                        valid_label(s.trim_start_matches('@'))
                            .then(|| s.trim_start_matches('@').to_string())
                    },
                    "a group name (1 to 64 letters, digits, `.`, `_` or `-`)",
                )
            })
            .collect();
        let agent = Self::check_agent(&shape.agent, c);
        let lab = Self::check_lab(&shape.lab, c);
        let machines = Self::check_machines(&shape.machines, c);
        for deploy in &shape.deploys {
            c.report(
                &deploy.span(),
                "[[deploy]] is gone: a session starts when machines have deploy tasks for its image \
                 (`bootserver task deploy IMAGE --to MAC|NAME|@GROUP`); an image's session \
                 settings (rate, deadline, port, start_timeout) go in an [[image]] entry with \
                 `name = \"IMAGE\"`"
                    .into(),
            );
        }
        let images = Self::check_images(&shape.images, agent.as_ref(), c);
        let mut trusted_keys = Vec::new();
        for key in &shape.security.trusted_keys {
            match key.get_ref().parse() {
                Ok(key) => trusted_keys.push(key),
                Err(e) => c.report(&key.span(), format!("[security] trusted_keys: {e}")),
            }
        }
        let security = SecurityPolicy {
            trusted_keys,
            public_reads: shape.security.public_reads.unwrap_or(true),
        };
        let database = match &shape.database {
            None => Some(diskcast_registry::Location::Sqlite(
                shape.state_dir.join(diskcast_registry::FILE_NAME),
            )),
            Some(text) => match diskcast_registry::Location::parse(text.get_ref()) {
                Ok(location) => Some(location),
                Err(e) => {
                    c.report(&text.span(), format!("database: {e}"));
                    None
                }
            },
        };
        let site = match &shape.site {
            None => None,
            Some(name) => {
                let text = name.get_ref();
                if text.is_empty()
                    || text.len() > 64
                    || text.chars().any(|ch| ch.is_whitespace() || ch.is_control())
                {
                    c.report(
                        &name.span(),
                        format!(
                            "site {text:?}: a site name is 1 to 64 characters without spaces \
                             or control characters"
                        ),
                    );
                }
                Some(text.clone())
            }
        };
        if site.is_none() && matches!(database, Some(diskcast_registry::Location::Postgres(_))) {
            if let Some(text) = &shape.database {
                c.report(
                    &text.span(),
                    "database: a PostgreSQL registry is shared by several bootservers; give \
                     this one a `site = \"NAME\"` so tasks show where they ran and two sites \
                     never both start one"
                        .to_string(),
                );
            }
        }
        let https = shape
            .https
            .as_ref()
            .and_then(|h| Self::check_https(h, shape.http_port, c));
        Some(Config {
            database: database?,
            site,
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
                local_boot_efi: shape.boot.local_boot_efi,
                uefi_chain: uefi_chain?,
                signed_chain_groups,
                shim: shape.boot.shim,
                grub_net: shape.boot.grub_net,
            },
            agent: agent?,
            lab: lab?,
            machines,
            images,
            security,
            https,
            subnets,
        })
    }

    fn check_https(
        h: &toml::Spanned<file::Https>,
        http_port: u16,
        c: &mut Checker<'_>,
    ) -> Option<HttpsPolicy> {
        let section = h.span();
        let h = h.get_ref();
        let port = *h.port.get_ref();
        let port_span = if h.port.span().is_empty() {
            section.clone()
        } else {
            h.port.span()
        };
        if port == 0 {
            c.report(
                &port_span,
                "[https] port = 0: give the TCP port of the HTTPS listener (e.g. 8443)".into(),
            );
            return None;
        }
        if port == http_port {
            c.report(
                &port_span,
                format!("[https] port = {port} is also http_port: HTTPS needs a port of its own (plain HTTP keeps serving boot files)"),
            );
            return None;
        }
        let identity = match (&h.cert, &h.key) {
            (None, None) => HttpsIdentity::Generated,
            (Some(cert), Some(key)) => HttpsIdentity::Files {
                cert: cert.get_ref().clone(),
                key: key.get_ref().clone(),
            },
            (Some(given), None) | (None, Some(given)) => {
                c.report(
                    &given.span(),
                    "[https] cert and key come as a pair: give both PEM files, or neither for a self-signed certificate made in state_dir".into(),
                );
                return None;
            }
        };
        Some(HttpsPolicy { port, identity })
    }

    fn check_subnets(
        entries: &[toml::Spanned<file::Subnet>],
        mode: DhcpMode,
        c: &mut Checker<'_>,
    ) -> Vec<Subnet> {
        let mut subnets: Vec<Subnet> = Vec::new();
        for entry in entries {
            let s = entry.get_ref();
            let span = entry.span();
            let Some(network) = c.parse(
                &s.network,
                "[[subnet]] network",
                |text| text.parse::<ipnet::Ipv4Net>().ok(),
                "a network with its prefix length, like 10.78.0.0/24",
            ) else {
                continue;
            };
            let what = format!("[[subnet]] {network}");
            if network.trunc() != network {
                c.report(
                    &s.network.span(),
                    format!(
                        "{what}: host bits are set; did you mean {}?",
                        network.trunc()
                    ),
                );
                continue;
            }
            if let Some(other) = subnets.iter().find(|o| overlap(&o.network, &network)) {
                c.report(
                    &span,
                    format!("{what} overlaps [[subnet]] {}", other.network),
                );
                continue;
            }
            let interface =
                s.interface
                    .as_ref()
                    .and_then(|i| match interface_name_problem(i.get_ref()) {
                        Some(problem) => {
                            c.report(&i.span(), format!("{what}: {problem}"));
                            None
                        }
                        None => Some(i.get_ref().clone()),
                    });
            let outside = |address: Ipv4Addr| !network.contains(&address);
            let range = match (s.range_start, s.range_end) {
                (Some(start), Some(end)) if start > end => {
                    c.report(
                        &span,
                        format!("{what}: range_start {start} is after range_end {end}"),
                    );
                    None
                }
                (Some(start), Some(end)) if outside(start) || outside(end) => {
                    c.report(
                        &span,
                        format!("{what}: range {start}-{end} is not inside {network}"),
                    );
                    None
                }
                (Some(start), Some(end))
                    if network.prefix_len() < 31
                        && (start == network.network() || end == network.broadcast()) =>
                {
                    c.report(
                        &span,
                        format!(
                            "{what}: range {start}-{end} includes the network or broadcast address"
                        ),
                    );
                    None
                }
                (Some(start), Some(end)) => Some((start, end)),
                (None, None) => None,
                _ => {
                    c.report(
                        &span,
                        format!("{what}: give both range_start and range_end"),
                    );
                    None
                }
            };
            if let Some(router) = s.router.filter(|r| outside(*r)) {
                c.report(
                    &span,
                    format!("{what}: router {router} is not inside {network} (its machines reach it directly)"),
                );
            }
            let ttl = s.ttl.as_ref().and_then(|t| match *t.get_ref() {
                0 => {
                    c.report(&t.span(), format!("{what}: ttl = 0 reaches nobody (1: the server's own link, plus one per router)"));
                    None
                }
                ttl => Some(ttl),
            });
            let mut reservations = BTreeMap::new();
            for r in &s.reservations {
                let r = r.get_ref();
                let Some(mac) = c.parse(
                    &r.mac,
                    "[[subnet.reservation]] mac",
                    |text| text.parse().ok(),
                    "a MAC address (aa:bb:cc:dd:ee:ff)",
                ) else {
                    continue;
                };
                if outside(r.address) {
                    c.report(
                        &r.mac.span(),
                        format!(
                            "{what}: reservation {} for {mac} is not inside {network}",
                            r.address
                        ),
                    );
                    continue;
                }
                if reservations.insert(mac, r.address).is_some() {
                    c.report(&r.mac.span(), format!("{what}: {mac} is reserved twice"));
                }
            }
            if mode == DhcpMode::Full && range.is_none() && reservations.is_empty() {
                c.report(
                    &span,
                    format!(
                        "{what} hands out no address in full mode: give range_start and range_end"
                    ),
                );
            }
            subnets.push(Subnet {
                network,
                interface,
                server_address: s.server_address,
                range,
                router: s.router,
                dns: s.dns.clone(),
                reservations,
                ttl,
            });
        }
        subnets
    }

    /// The `[dhcp]` subnet must not overlap a `[[subnet]]`; a `[[dhcp.reservation]]` inside a
    /// `[[subnet]]` belongs to it. No address is reserved twice.
    fn place_reservations(
        mut dhcp: Dhcp,
        subnets: &mut [Subnet],
        address: Option<Ipv4Addr>,
        c: &mut Checker<'_>,
    ) -> Dhcp {
        let first = dhcp
            .range
            .map(|(start, _)| start)
            .or(address)
            .and_then(|a| ipnet::Ipv4Net::with_netmask(a, dhcp.netmask).ok())
            .map(|n| n.trunc());
        if let Some(first) = first {
            for s in subnets.iter().filter(|s| overlap(&s.network, &first)) {
                c.report(
                    &dhcp.span,
                    format!(
                        "[dhcp] serves {first}, which overlaps [[subnet]] {}: describe each subnet once",
                        s.network
                    ),
                );
            }
        }
        let in_first = |a: &Ipv4Addr| first.is_some_and(|n| n.contains(a));
        let reservations = std::mem::take(&mut dhcp.reservations);
        for (mac, reserved) in reservations {
            match subnets.iter_mut().find(|s| s.network.contains(&reserved)) {
                Some(subnet) if !in_first(&reserved) => {
                    subnet.reservations.entry(mac).or_insert(reserved);
                }
                _ => {
                    dhcp.reservations.insert(mac, reserved);
                }
            }
        }
        let mut seen: BTreeMap<Ipv4Addr, MacAddr> = BTreeMap::new();
        let all = dhcp
            .reservations
            .iter()
            .chain(subnets.iter().flat_map(|s| s.reservations.iter()));
        for (mac, reserved) in all {
            if let Some(other) = seen.insert(*reserved, *mac).filter(|o| o != mac) {
                c.report(
                    &dhcp.span,
                    format!("{reserved} is reserved for both {other} and {mac}"),
                );
            }
        }
        dhcp
    }

    fn check_lab(l: &file::Lab, c: &mut Checker<'_>) -> Option<LabPolicy> {
        let unknown_machines = match &l.unknown_machines {
            None => Some(UnknownMachines::LocalBoot),
            Some(v) => c.parse(
                v,
                "[lab] unknown_machines",
                |s| match s {
                    "local" => Some(UnknownMachines::LocalBoot),
                    "inventory" => Some(UnknownMachines::Inventory),
                    _ => None,
                },
                "local or inventory (never a role that writes a disk)",
            ),
        };
        let local = |c: &mut Checker<'_>, v: &Option<toml::Spanned<String>>, what, default| {
            v.as_ref().map_or(Some(default), |v| {
                c.parse(v, what, LocalBoot::parse, LocalBoot::EXPECTED)
            })
        };
        let local_boot_bios = local(
            c,
            &l.local_boot_bios,
            "[lab] local_boot_bios",
            LocalBoot::Sanboot,
        );
        let local_boot_uefi = local(
            c,
            &l.local_boot_uefi,
            "[lab] local_boot_uefi",
            LocalBoot::Grub,
        );
        Some(LabPolicy {
            unknown_machines: unknown_machines?,
            local_boot_bios: local_boot_bios?,
            local_boot_uefi: local_boot_uefi?,
            task_timeout: Duration::from_secs(u64::from(l.task_timeout.unwrap_or(1800).max(60))),
            start_timeout: Duration::from_secs(u64::from(l.start_timeout.unwrap_or(600).max(1))),
        })
    }

    fn check_machines(
        entries: &[toml::Spanned<file::Machine>],
        c: &mut Checker<'_>,
    ) -> BTreeMap<MacAddr, MachineEntry> {
        let mut machines = BTreeMap::new();
        for entry in entries {
            let m = entry.get_ref();
            for gone in [&m.role, &m.image].into_iter().flatten() {
                c.report(
                    &gone.span(),
                    "[[machine]] role and image are gone: what a machine does is a task \
                     (`bootserver task deploy IMAGE --to MAC`, `task capture MAC --image NAME`, \
                     `task master MAC`, `task receive --to MAC`), carried out once"
                        .into(),
                );
            }
            let Some(mac) = c.parse(
                &m.mac,
                "[[machine]] mac",
                |s| s.parse().ok(),
                "a MAC address (aa:bb:cc:dd:ee:ff)",
            ) else {
                continue;
            };
            let label = |c: &mut Checker<'_>, v: &Option<toml::Spanned<String>>, what: &str| {
                v.as_ref().and_then(|v| {
                    c.parse(
                        v,
                        what,
                        |s| valid_label(s).then(|| s.to_string()),
                        "1 to 64 letters, digits, `.`, `_` or `-`, not a MAC address",
                    )
                })
            };
            let entry_policy = MachineEntry {
                name: label(c, &m.name, "[[machine]] name"),
                group: label(c, &m.group, "[[machine]] group"),
                disk: m.disk.as_ref().and_then(|d| c.disk(d, "[[machine]] disk")),
                local_boot: m.local_boot.as_ref().and_then(|v| {
                    c.parse(
                        v,
                        "[[machine]] local_boot",
                        LocalBoot::parse,
                        LocalBoot::EXPECTED,
                    )
                }),
                uefi_chain: m.uefi_chain.as_ref().and_then(|v| {
                    c.parse(
                        v,
                        "[[machine]] uefi_chain",
                        UefiChain::parse,
                        UefiChain::EXPECTED,
                    )
                }),
            };
            if machines.insert(mac, entry_policy).is_some() {
                c.report(&entry.span(), format!("[[machine]] {mac} is listed twice"));
            }
        }
        machines
    }

    fn check_dhcp(
        spanned: &toml::Spanned<file::Dhcp>,
        has_subnets: bool,
        c: &mut Checker<'_>,
    ) -> Option<Dhcp> {
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
            // Every subnet may be a [[subnet]] of its own.
            (DhcpMode::Full, None, None) if has_subnets => {}
            (DhcpMode::Full, _, _) => c.report(
                &span,
                "[dhcp] mode = \"full\" needs range_start and range_end (or [[subnet]] entries)"
                    .into(),
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
            span: span.clone(),
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
        if let Some(role) = &a.role {
            c.report(
                &role.span(),
                format!(
                    "[agent] role = {:?} is gone: a machine runs the agent only for a task, once \
                     (`bootserver task deploy IMAGE --to @GROUP`, `task receive --to @GROUP` for \
                     a USB master's slaves, `task capture MAC --image NAME`, `task inventory \
                     TARGET`); machines without a task boot their local disk. To inventory \
                     machines nobody registered, set [lab] unknown_machines = \"inventory\"",
                    role.get_ref()
                ),
            );
        }
        if let Some(image) = &a.image {
            c.report(
                &image.span(),
                "[agent] image is gone: name the image in the task \
                 (`bootserver task capture MAC --image NAME`)"
                    .into(),
            );
        }
        let defaults = BootConfig::default();
        let finish = |c: &mut Checker<'_>, value: &Option<toml::Spanned<String>>, what, default| {
            value.as_ref().map_or(Some(default), |v| {
                c.parse(v, what, |s| s.parse().ok(), Finish::EXPECTED)
            })
        };
        let on_error = finish(c, &a.on_error, "[agent] on_error", defaults.on_error);
        // A machine that finished its task reboots: with no task left it boots its new disk.
        let on_done = finish(c, &a.on_done, "[agent] on_done", Finish::Reboot);
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
        let group = Self::check_group(a.group.as_ref(), "[agent] group", c);
        let ttl = Self::check_ttl(a.ttl.as_ref(), "[agent] ttl", c);
        Some(AgentPolicy {
            on_error: on_error?,
            on_done: on_done?,
            log_level: log_level?,
            disk: disk?,
            group: group?.unwrap_or(DEFAULT_GROUP),
            port: a.port.unwrap_or(DEFAULT_PORT),
            min_receivers: a.min_receivers.unwrap_or(1).max(1),
            start_timeout_secs: a.start_timeout,
            rate_mbps: a.rate,
            ttl: ttl?.unwrap_or(1),
        })
    }

    /// `Some(None)`: not given; `None`: given as 0 (reported).
    fn check_ttl(
        ttl: Option<&toml::Spanned<u8>>,
        what: &str,
        c: &mut Checker<'_>,
    ) -> Option<Option<u8>> {
        match ttl {
            Some(t) if *t.get_ref() == 0 => {
                c.report(
                    &t.span(),
                    format!(
                        "{what} = 0 reaches nobody (1: the server's own link, plus one per router)"
                    ),
                );
                None
            }
            Some(t) => Some(Some(*t.get_ref())),
            None => Some(None),
        }
    }

    /// `Some(None)`: not given; `None`: given but not a multicast address (reported).
    fn check_group(
        group: Option<&toml::Spanned<Ipv4Addr>>,
        what: &str,
        c: &mut Checker<'_>,
    ) -> Option<Option<Ipv4Addr>> {
        match group {
            Some(g) if !g.get_ref().is_multicast() => {
                c.report(
                    &g.span(),
                    format!("{what} = {} is not a multicast address", g.get_ref()),
                );
                None
            }
            Some(g) => Some(Some(*g.get_ref())),
            None => Some(None),
        }
    }

    fn check_images(
        entries: &[toml::Spanned<file::Image>],
        agent: Option<&AgentPolicy>,
        c: &mut Checker<'_>,
    ) -> BTreeMap<String, ImageSession> {
        let p2p_port = agent.map_or(DEFAULT_PORT, |a| a.port);
        let mut images = BTreeMap::new();
        for entry in entries {
            let i = entry.get_ref();
            let Some(name) = c.image_name(&i.name, "[[image]] name") else {
                continue;
            };
            let Some(group) = Self::check_group(i.group.as_ref(), "[[image]] group", c) else {
                continue;
            };
            let Some(ttl) = Self::check_ttl(i.ttl.as_ref(), "[[image]] ttl", c) else {
                continue;
            };
            let interface = match &i.interface {
                Some(value) => match interface_name_problem(value.get_ref()) {
                    Some(problem) => {
                        c.report(&value.span(), format!("[[image]] {name}: {problem}"));
                        continue;
                    }
                    None => Some(value.get_ref().clone()),
                },
                None => None,
            };
            let derived = session_for_image(&name, p2p_port);
            let session = ImageSession {
                ttl,
                interface,
                group_derived: group.is_none(),
                group: group.unwrap_or(derived.group),
                port: i.port.unwrap_or(derived.port),
                rate: i.rate.map(|r| Rate::from_mbps(f64::from(r))),
                min_rate: i.min_rate.map(|r| Rate::from_mbps(f64::from(r))),
                deadline: i.deadline.map(|s| Duration::from_secs(s.into())),
                start_timeout: i.start_timeout.map(|s| Duration::from_secs(s.into())),
                relay_port: i.relay_port.as_ref().map(|p| *p.get_ref()),
            };
            if let Some(port) = &i.relay_port {
                let taken = images.iter().find(|(_, s): &(&String, &ImageSession)| {
                    s.relay_port == Some(*port.get_ref())
                });
                if *port.get_ref() == 0 {
                    c.report(
                        &port.span(),
                        format!("[[image]] {name}: relay_port = 0 is not a port; give the UDP port relays subscribe to, or leave it out to derive one from the group"),
                    );
                } else if DERIVED_RELAY_PORTS.contains(port.get_ref()) {
                    c.report(
                        &port.span(),
                        format!(
                            "[[image]] {name}: relay_port = {} is in the range derived relay ports come from ({}-{}), where another image's session may take it: pick one outside it",
                            port.get_ref(),
                            DERIVED_RELAY_PORTS.start(),
                            DERIVED_RELAY_PORTS.end()
                        ),
                    );
                } else if let Some((other, _)) = taken {
                    c.report(
                        &port.span(),
                        format!("[[image]] {name}: relay_port = {} is also [[image]] {other}'s; their sessions may run at once: give each its own", port.get_ref()),
                    );
                }
            }
            if session.port == p2p_port && session.group == agent.map_or(DEFAULT_GROUP, |a| a.group)
            {
                c.report(
                    &entry.span(),
                    format!("[[image]] {name} would share the peer-to-peer session's group and port: give it another `group` or `port`"),
                );
            }
            if images.insert(name.clone(), session).is_some() {
                c.report(&entry.span(), format!("[[image]] {name:?} is listed twice"));
            }
        }
        images
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
            if mode == DhcpMode::Full && self.dhcp.range.is_none() && self.subnets.is_empty() {
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

    /// Where the sessions of stored image `name` run and how: its `[[image]]` entry, or a
    /// group of its own derived from its name (so switches with IGMP snooping keep concurrent
    /// sessions apart) on the port after the peer-to-peer one.
    pub fn image_session(&self, name: &str) -> ImageSession {
        self.images
            .get(name)
            .cloned()
            .unwrap_or_else(|| session_for_image(name, self.agent.port))
    }

    /// How `mac` boots its local disk on each firmware: its `[[machine]]` entry, else the lab's.
    pub fn local_boot(&self, mac: MacAddr) -> (LocalBoot, LocalBoot) {
        let entry = self.machines.get(&mac).and_then(|m| m.local_boot);
        (
            entry.unwrap_or(self.lab.local_boot_bios),
            entry.unwrap_or(self.lab.local_boot_uefi),
        )
    }
}

impl Config {
    /// What `mac` (in `group`, as the registry knows it) boots on UEFI: its `[[machine]]`
    /// entry, else the signed chain when its group is listed in `[boot] signed_chain_groups`,
    /// else `[boot] uefi_chain`.
    pub fn uefi_chain(&self, mac: MacAddr, group: Option<&str>) -> UefiChain {
        if let Some(chain) = self.machines.get(&mac).and_then(|m| m.uefi_chain) {
            return chain;
        }
        let group = group.or_else(|| self.machines.get(&mac).and_then(|m| m.group.as_deref()));
        if group.is_some_and(|g| self.boot.signed_chain_groups.contains(g)) {
            return UefiChain::Signed;
        }
        self.boot.uefi_chain
    }

    /// True when any machine may get the signed chain: its files must then exist.
    pub fn signed_chain_in_use(&self) -> bool {
        self.boot.uefi_chain == UefiChain::Signed
            || !self.boot.signed_chain_groups.is_empty()
            || self
                .machines
                .values()
                .any(|m| m.uefi_chain == Some(UefiChain::Signed))
    }
}

/// Machine names and groups: what the registry accepts (never a MAC, so `--to` is unambiguous).
pub fn valid_label(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && text.parse::<MacAddr>().is_err()
}

/// Where derived session groups come from: 239.255.78.1 to 239.255.79.254.
pub const DERIVED_GROUPS: (Ipv4Addr, Ipv4Addr) = (
    Ipv4Addr::new(239, 255, 78, 1),
    Ipv4Addr::new(239, 255, 79, 254),
);

/// The default session of an image: group 239.255.78.0/23 picked by its name's hash.
fn session_for_image(name: &str, p2p_port: u16) -> ImageSession {
    let hash = crc32fast::hash(name.as_bytes());
    let host = (hash % 510) as u16 + 1;
    ImageSession {
        group: Ipv4Addr::new(239, 255, 78 + (host >> 8) as u8, (host & 0xff) as u8),
        group_derived: true,
        port: p2p_port.wrapping_add(1),
        rate: None,
        min_rate: None,
        deadline: None,
        start_timeout: None,
        ttl: None,
        interface: None,
        relay_port: None,
    }
}

fn overlap(a: &ipnet::Ipv4Net, b: &ipnet::Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
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

    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn example_config_is_valid_and_safe_by_default() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(config.dhcp.mode, DhcpMode::Full);
        assert_eq!(config.store_dir, PathBuf::from("/var/lib/diskcast/images"));
        assert_eq!(config.lab.unknown_machines, UnknownMachines::LocalBoot);
        assert_eq!(config.agent.on_done, Finish::Reboot);
        assert!(config.security.public_reads, "reads stay open as they were");
    }

    #[test]
    fn the_registry_is_sqlite_in_the_state_dir_or_a_shared_postgres_with_a_site_name() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(
            config.database,
            diskcast_registry::Location::Sqlite(config.state_dir.join("registry.sqlite"))
        );
        assert_eq!(config.site, None);

        let shared = format!(
            "database = \"postgres://diskcast:pw-1234@db.lab/diskcast\"\nsite = \"north\"\n{EXAMPLE}"
        );
        let config = parse(&shared).unwrap();
        assert_eq!(config.site.as_deref(), Some("north"));
        assert_eq!(
            config.database.to_string(),
            "postgres://diskcast:***@db.lab:5432/diskcast",
            "the password is never shown"
        );
        assert!(!format!("{config:?}").contains("pw-1234"));

        let no_site = format!("database = \"postgres://diskcast@db.lab/diskcast\"\n{EXAMPLE}");
        let found = issues(&no_site);
        assert!(found[0].message.contains("site = "), "{found:?}");
        assert_eq!(found[0].line, 1);

        let bad = format!("database = \"postgres://diskcast@db.lab\"\nsite = \"a b\"\n{EXAMPLE}");
        let found = issues(&bad);
        assert!(
            found
                .iter()
                .any(|i| i.line == 1 && i.message.contains("names no database")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|i| i.line == 2 && i.message.contains("site \"a b\"")),
            "{found:?}"
        );
    }

    #[test]
    fn standing_destructive_roles_are_refused_with_how_to_migrate() {
        // What used to image every machine that network-booted.
        let old = format!(
            "{EXAMPLE}\n[[machine]]\nmac = \"52:54:00:aa:bb:cc\"\nrole = \"capture\"\nimage = \"golden\"\n\
             [[deploy]]\nimage = \"golden\"\n"
        )
        .replace("[agent]\n", "[agent]\nrole = \"slave\"\n");
        let found = issues(&old);
        let about = |needle: &str| found.iter().find(|i| i.message.contains(needle)).cloned();
        let agent = about("[agent] role").expect("[agent] role refused");
        assert!(agent.message.contains("bootserver task deploy"), "{agent}");
        assert_eq!(agent.line, line_of(&old, "role = \"slave\""));
        let machine = about("[[machine]] role and image are gone").expect("machine role refused");
        assert!(machine.message.contains("task capture"), "{machine}");
        let deploy = about("[[deploy]] is gone").expect("[[deploy]] refused");
        assert!(deploy.message.contains("[[image]]"), "{deploy}");
        assert_eq!(deploy.line, line_of(&old, "[[deploy]]"));
    }

    #[test]
    fn each_image_gets_a_session_of_its_own() {
        let text = format!("{EXAMPLE}\n[[image]]\nname = \"win11\"\nport = 7800\nrate = 90\n");
        let config = parse(&text).unwrap();
        let win = config.image_session("win11");
        assert_eq!(win.port, 7800);
        assert_eq!(win.rate, Some(Rate::from_mbps(90.0)));
        let (a, b) = (
            config.image_session("golden"),
            config.image_session("ubuntu"),
        );
        assert!(a.group.is_multicast() && b.group.is_multicast());
        assert_ne!(a.group, b.group, "two images, two groups");
        assert_ne!(a.group, config.agent.group, "never the peer-to-peer group");
        let clash =
            format!("{EXAMPLE}\n[[image]]\nname = \"x\"\ngroup = \"239.255.77.77\"\nport = 7744\n");
        assert!(issues(&clash)[0].message.contains("peer-to-peer"));
    }

    #[test]
    fn sessions_serve_relays_on_a_configured_or_derived_port() {
        let text = format!("{EXAMPLE}\n[[image]]\nname = \"win11\"\nrelay_port = 9100\n");
        let config = parse(&text).unwrap();
        let win = config.image_session("win11");
        assert_eq!(relay_port_for(win.group, win.relay_port), 9100);
        // Derived: one port per group of the derived range, so concurrent sessions (whose
        // groups differ) never share one; all in one range a firewall can open.
        let (first, last) = (u32::from(DERIVED_GROUPS.0), u32::from(DERIVED_GROUPS.1));
        let ports: std::collections::BTreeSet<u16> = (first..=last)
            .map(|g| relay_port_for(Ipv4Addr::from(g), None))
            .collect();
        assert_eq!(ports.len() as u32, last - first + 1);
        assert_eq!(relay_port_for(DERIVED_GROUPS.0, None), RELAY_PORTS + 1);
        let outside = relay_port_for(Ipv4Addr::new(239, 1, 2, 3), None);
        assert!(!ports.contains(&outside), "{outside}");
        for g in [Ipv4Addr::new(239, 0, 0, 0), Ipv4Addr::new(239, 0, 0, 255)] {
            assert!(DERIVED_RELAY_PORTS.contains(&relay_port_for(g, None)));
        }
        assert!(ports.iter().all(|p| DERIVED_RELAY_PORTS.contains(p)));
        let clash = format!("{EXAMPLE}\n[[image]]\nname = \"x\"\nrelay_port = 7801\n");
        let problems = issues(&clash);
        assert!(
            problems[0]
                .message
                .contains("in the range derived relay ports"),
            "{problems:?}"
        );
        assert_ne!(outside, DEFAULT_PORT);
        let golden = config.image_session("golden");
        assert!(!ports.contains(&DEFAULT_PORT) && !ports.contains(&golden.port));

        let zero = format!("{EXAMPLE}\n[[image]]\nname = \"x\"\nrelay_port = 0\n");
        let problems = issues(&zero);
        assert!(
            problems[0].message.contains("relay_port = 0"),
            "{problems:?}"
        );
        let twice = format!(
            "{EXAMPLE}\n[[image]]\nname = \"a\"\nrelay_port = 9100\n\
             [[image]]\nname = \"b\"\nrelay_port = 9100\n"
        );
        let problems = issues(&twice);
        assert!(
            problems[0]
                .message
                .contains("[[image]] b: relay_port = 9100 is also [[image]] a's"),
            "{problems:?}"
        );
        assert_eq!(problems[0].line, line_of(&twice, "name = \"b\"") + 1);
    }

    #[test]
    fn machines_are_registered_with_names_groups_and_local_boot() {
        let text = format!(
            "{EXAMPLE}\n[[machine]]\nmac = \"52-54-00-AA-BB-CC\"\nname = \"pc-12\"\ngroup = \"room-1\"\n\
             disk = \"serial:DISK-7\"\nlocal_boot = \"exit\"\n"
        );
        let config = parse(&text).unwrap();
        let entry = &config.machines[&mac("52:54:00:aa:bb:cc")];
        assert_eq!(entry.name.as_deref(), Some("pc-12"));
        assert_eq!(entry.disk, Some(DiskSelector::Serial("DISK-7".into())));
        assert_eq!(
            config.local_boot(mac("52:54:00:aa:bb:cc")),
            (LocalBoot::Exit, LocalBoot::Exit)
        );
        assert_eq!(
            config.local_boot(mac("52:54:00:aa:bb:cd")),
            (LocalBoot::Sanboot, LocalBoot::Grub)
        );
        let named_like_a_mac = text.replace("pc-12", "52:54:00:00:00:01");
        assert!(parse(&named_like_a_mac).is_err());
    }

    #[test]
    fn the_signed_chain_is_chosen_per_machine_group_or_for_every_uefi_client() {
        let text = format!(
            "{EXAMPLE}\n[[machine]]\nmac = \"52:54:00:00:00:01\"\nuefi_chain = \"signed\"\n\
             [[machine]]\nmac = \"52:54:00:00:00:02\"\ngroup = \"room-2\"\n"
        )
        .replace("[boot]\n", "[boot]\nsigned_chain_groups = [\"@room-2\"]\n");
        let config = parse(&text).unwrap();
        assert!(config.signed_chain_in_use());
        assert_eq!(config.boot.shim, default_shim());
        assert_eq!(
            config.uefi_chain(mac("52:54:00:00:00:01"), None),
            UefiChain::Signed
        );
        // Its group in the config, or the group the registry knows for a machine.
        assert_eq!(
            config.uefi_chain(mac("52:54:00:00:00:02"), None),
            UefiChain::Signed
        );
        assert_eq!(
            config.uefi_chain(mac("52:54:00:00:00:03"), Some("room-2")),
            UefiChain::Signed
        );
        assert_eq!(
            config.uefi_chain(mac("52:54:00:00:00:03"), None),
            UefiChain::Ipxe
        );
        let everyone =
            parse(&EXAMPLE.replace("[boot]\n", "[boot]\nuefi_chain = \"signed\"\n")).unwrap();
        assert_eq!(
            everyone.uefi_chain(mac("52:54:00:00:00:09"), None),
            UefiChain::Signed
        );
        assert!(!parse(EXAMPLE).unwrap().signed_chain_in_use());
        let bad = EXAMPLE.replace("[boot]\n", "[boot]\nuefi_chain = \"shim\"\n");
        let found = issues(&bad);
        assert!(found[0].message.contains("ipxe or signed"), "{found:?}");
        assert_eq!(found[0].line, line_of(&bad, "uefi_chain"));
    }

    #[test]
    fn https_needs_a_port_of_its_own_and_cert_and_key_as_a_pair() {
        assert_eq!(parse(EXAMPLE).unwrap().https, None, "off by default");
        let on = parse(&format!("{EXAMPLE}\n[https]\n")).unwrap();
        assert_eq!(
            on.https,
            Some(HttpsPolicy {
                port: 8443,
                identity: HttpsIdentity::Generated
            })
        );
        let files = parse(&format!(
            "{EXAMPLE}\n[https]\nport = 443\ncert = \"/etc/a.crt\"\nkey = \"/etc/a.key\"\n"
        ))
        .unwrap();
        assert_eq!(
            files.https,
            Some(HttpsPolicy {
                port: 443,
                identity: HttpsIdentity::Files {
                    cert: "/etc/a.crt".into(),
                    key: "/etc/a.key".into()
                }
            })
        );
        let text = format!("{EXAMPLE}\n[https]\ncert = \"/etc/a.crt\"\n");
        let found = issues(&text);
        assert!(
            found
                .iter()
                .any(|i| i.message.contains("come as a pair")
                    && i.line == line_of(&text, "/etc/a.crt")),
            "{found:?}"
        );
        let text = format!("{EXAMPLE}\n[https]\nport = 8080\n");
        let found = issues(&text);
        assert!(
            found.iter().any(|i| i.message.contains("also http_port")
                && Some(i.line) == text.lines().position(|l| l == "port = 8080").map(|n| n + 1)),
            "{found:?}"
        );
        let found = issues(&format!("{EXAMPLE}\n[https]\nport = 0\n"));
        assert!(
            found.iter().any(|i| i.message.contains("port = 0")),
            "{found:?}"
        );
        let err = parse(&format!("{EXAMPLE}\n[https]\nkey_file = \"x\"\n")).unwrap_err();
        assert!(err.to_string().contains("not valid"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = EXAMPLE
            .replace("on_error = \"shell\"", "on_error = \"explode\"")
            .replace("range_end = \"10.77.0.199\"", "range_end = \"10.77.1.200\"")
            .replace(
                "unknown_machines = \"local\"",
                "unknown_machines = \"slave\"",
            )
            + "\n[[machine]]\nmac = \"52:54:00:zz:00:01\"\n\
               [[machine]]\nmac = \"52:54:00:00:00:02\"\ndisk = \"sideways\"\n";
        let found = issues(&text);
        let expect = [
            ("explode", line_of(&text, "explode")),
            ("52:54:00:zz:00:01", line_of(&text, "52:54:00:zz:00:01")),
            ("sideways", line_of(&text, "sideways")),
            ("subnet", line_of(&text, "[dhcp]")),
            (
                "never a role that writes",
                line_of(&text, "unknown_machines"),
            ),
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
        assert!(shown.contains("5 problem(s)"), "{shown}");
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

    #[test]
    fn subnets_behind_routers_and_on_other_interfaces() {
        let text = format!(
            "{EXAMPLE}\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:07\"\naddress = \"10.78.0.7\"\n\
             [[subnet]]\nnetwork = \"10.78.0.0/24\"\nrange_start = \"10.78.0.100\"\n\
             range_end = \"10.78.0.199\"\nrouter = \"10.78.0.1\"\nttl = 3\n\
             [[subnet.reservation]]\nmac = \"52:54:00:00:00:08\"\naddress = \"10.78.0.8\"\n\
             [[subnet]]\nnetwork = \"10.79.0.0/16\"\ninterface = \"eth1\"\n\
             range_start = \"10.79.1.1\"\nrange_end = \"10.79.1.250\"\n\
             [[image]]\nname = \"golden\"\nttl = 4\ninterface = \"eth1\"\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.subnets.len(), 2);
        let far = &config.subnets[0];
        assert_eq!(far.network.to_string(), "10.78.0.0/24");
        assert_eq!(far.ttl, Some(3));
        assert_eq!(far.interface, None, "reached through the main interface");
        // The [dhcp] reservation inside the far subnet belongs to it.
        assert_eq!(
            far.reservations[&mac("52:54:00:00:00:07")],
            Ipv4Addr::new(10, 78, 0, 7)
        );
        assert_eq!(
            far.reservations[&mac("52:54:00:00:00:08")],
            Ipv4Addr::new(10, 78, 0, 8)
        );
        assert!(config.dhcp.reservations.is_empty());
        assert_eq!(config.subnets[1].interface.as_deref(), Some("eth1"));
        let golden = config.image_session("golden");
        assert_eq!(
            (golden.ttl, golden.interface.as_deref()),
            (Some(4), Some("eth1"))
        );
        assert!(golden.group_derived);
        // Every subnet as a [[subnet]]: [dhcp] keeps the mode and lease time only.
        let only = text
            .replace("range_start = \"10.77.0.100\"\n", "")
            .replace("range_end = \"10.77.0.199\"\n", "");
        assert!(parse(&only).unwrap().dhcp.range.is_none());
    }

    #[test]
    fn bad_subnets_are_refused_with_what_to_change() {
        let cases = [
            ("network = \"10.78.0.1/24\"\nrange_start = \"10.78.0.100\"\nrange_end = \"10.78.0.199\"", "did you mean 10.78.0.0/24"),
            ("network = \"10.78.0.0\"", "prefix length"),
            ("network = \"10.78.0.0/24\"\nrange_start = \"10.78.1.100\"\nrange_end = \"10.78.1.199\"", "not inside 10.78.0.0/24"),
            ("network = \"10.78.0.0/24\"\nrange_start = \"10.78.0.0\"\nrange_end = \"10.78.0.9\"", "network or broadcast"),
            ("network = \"10.78.0.0/24\"\nrange_start = \"10.78.0.100\"", "both range_start and range_end"),
            ("network = \"10.78.0.0/24\"", "hands out no address"),
            ("network = \"10.78.0.0/24\"\nrange_start = \"10.78.0.100\"\nrange_end = \"10.78.0.199\"\nrouter = \"10.77.0.254\"", "router 10.77.0.254 is not inside"),
            ("network = \"10.78.0.0/24\"\nrange_start = \"10.78.0.100\"\nrange_end = \"10.78.0.199\"\nttl = 0", "reaches nobody"),
            ("network = \"10.77.0.0/16\"\nrange_start = \"10.77.5.100\"\nrange_end = \"10.77.5.199\"", "overlaps [[subnet]] 10.77.0.0/16"),
            ("network = \"10.78.0.0/24\"\ninterface = \"a b\"\nrange_start = \"10.78.0.100\"\nrange_end = \"10.78.0.199\"", "not an interface name"),
            ("network = \"10.78.0.0/24\"\nrange_start = \"10.78.0.100\"\nrange_end = \"10.78.0.199\"\n[[subnet.reservation]]\nmac = \"52:54:00:00:00:01\"\naddress = \"10.79.0.1\"", "not inside"),
        ];
        for (subnet, expected) in cases {
            let text = format!("{EXAMPLE}\n[[subnet]]\n{subnet}\n");
            let found = issues(&text);
            assert!(
                found
                    .iter()
                    .any(|i| i.message.contains(expected) && i.line > 0),
                "{subnet:?}: {expected:?} not in {found:?}"
            );
        }
        // Twice the same range as a [[subnet]] on top of [dhcp]'s, and two machines for one address.
        let text = format!(
            "{EXAMPLE}\n[[subnet]]\nnetwork = \"10.78.0.0/23\"\nrange_start = \"10.78.0.100\"\nrange_end = \"10.78.0.199\"\n\
             [[subnet.reservation]]\nmac = \"52:54:00:00:00:01\"\naddress = \"10.78.0.5\"\n\
             [[subnet.reservation]]\nmac = \"52:54:00:00:00:02\"\naddress = \"10.78.0.5\"\n\
             [[subnet]]\nnetwork = \"10.77.0.0/25\"\nrange_start = \"10.77.0.10\"\nrange_end = \"10.77.0.19\"\n"
        );
        let found = issues(&text);
        for expected in ["reserved for both", "overlaps [[subnet]] 10.77.0.0/25"] {
            assert!(
                found.iter().any(|i| i.message.contains(expected)),
                "{expected:?} not in {found:?}"
            );
        }
        let zero = format!("{EXAMPLE}\n[[image]]\nname = \"x\"\nttl = 0\n");
        assert!(issues(&zero)[0].message.contains("reaches nobody"));
    }
}
