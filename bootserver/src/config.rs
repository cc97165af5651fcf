//! The bootserver's configuration: one TOML file (see `bootserver/bootserver.example.toml`),
//! with a few settings that flags can override.

use diskcast_proto::cmdline::{BootConfig, DiskSelector, Finish, Role};
use diskcast_proto::image_file::{valid_image_name, IMAGE_NAME_RULE};
use serde::Deserialize;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

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
    #[error("config: {0}")]
    Invalid(String),
}

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
pub struct Config {
    /// Interface the server listens on.
    pub interface: String,
    /// The server's own address on that interface; looked up when absent.
    pub address: Option<Ipv4Addr>,
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    #[serde(default = "default_tftp_port")]
    pub tftp_port: u16,
    /// Directory for leases and other state.
    pub state_dir: PathBuf,
    /// The image store (captures, imports, deploys); `STATE_DIR/images` when absent.
    pub store_dir: Option<PathBuf>,
    pub dhcp: DhcpConfig,
    pub boot: BootFiles,
    #[serde(default)]
    pub agent: AgentDefaults,
    #[serde(default, rename = "machine")]
    pub machines: Vec<Machine>,
    /// Stored images the server multicasts to slaves while it runs, one session after another.
    #[serde(default, rename = "deploy")]
    pub deploys: Vec<DeployConfig>,
}

/// `[[deploy]]`: serve one stored image to the slaves whose image it is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    pub image: String,
    /// Start once this many slaves joined...
    #[serde(default = "default_min_receivers")]
    pub min_receivers: u32,
    /// ...or this many seconds after the first joined.
    pub start_timeout: Option<u32>,
    /// MB/s at most.
    pub rate: Option<u32>,
    /// Drop slaves not done this many seconds after the data started (default: wait for all).
    pub deadline: Option<u32>,
    /// UDP port of this image's sessions (on the `[agent]` group); by default the agent's port
    /// plus one plus the entry's position, so every served image has its own.
    pub port: Option<u16>,
}

fn default_min_receivers() -> u32 {
    1
}

fn default_http_port() -> u16 {
    8080
}
fn default_tftp_port() -> u16 {
    69
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpConfig {
    #[serde(default)]
    pub mode: DhcpMode,
    /// First and last address handed out (full mode).
    pub range_start: Option<Ipv4Addr>,
    pub range_end: Option<Ipv4Addr>,
    #[serde(default = "default_netmask")]
    pub netmask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u32,
    #[serde(default, rename = "reservation")]
    pub reservations: Vec<Reservation>,
}

fn default_netmask() -> Ipv4Addr {
    Ipv4Addr::new(255, 255, 255, 0)
}
fn default_lease_secs() -> u32 {
    3600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    pub mac: String,
    pub address: Ipv4Addr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Where the iPXE loaders (undionly.kpxe, ipxe.efi, snponly.efi) are: the TFTP root.
    #[serde(default = "default_tftp_root")]
    pub tftp_root: PathBuf,
    #[serde(default)]
    pub uefi_loader: UefiLoader,
    /// Extra kernel parameters, e.g. `console=ttyS0,115200`.
    #[serde(default)]
    pub kernel_args: String,
    /// Answer IPv6 router solicitations (router lifetime 0) so iPXE does not wait ~15 s for one.
    #[serde(default = "default_true")]
    pub answer_router_solicitations: bool,
}

fn default_true() -> bool {
    true
}

fn default_tftp_root() -> PathBuf {
    PathBuf::from("/usr/lib/ipxe")
}

/// What every machine's agent is told unless its `[[machine]]` entry says otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentDefaults {
    #[serde(default = "default_role")]
    pub role: String,
    #[serde(default = "default_on_error")]
    pub on_error: String,
    #[serde(default = "default_on_done")]
    pub on_done: String,
    #[serde(default)]
    pub log: Option<String>,
    /// Which disk: `only`, `serial:SERIAL` or `name:DEVICE`.
    #[serde(default)]
    pub disk: Option<String>,
    /// Multicast session address and port.
    #[serde(default)]
    pub group: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub port: Option<u16>,
    /// Master: slaves to wait for, seconds to wait at most, MB/s at most.
    #[serde(default)]
    pub min_receivers: Option<u32>,
    #[serde(default)]
    pub start_timeout: Option<u32>,
    #[serde(default)]
    pub rate: Option<u32>,
    /// Capture: the name the image gets in the store.
    #[serde(default)]
    pub image: Option<String>,
}

impl Default for AgentDefaults {
    fn default() -> Self {
        Self {
            role: default_role(),
            on_error: default_on_error(),
            on_done: default_on_done(),
            log: None,
            disk: None,
            group: None,
            port: None,
            min_receivers: None,
            start_timeout: None,
            rate: None,
            image: None,
        }
    }
}

fn default_role() -> String {
    "inventory".into()
}
fn default_on_error() -> String {
    "shell".into()
}
fn default_on_done() -> String {
    "poweroff".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub mac: String,
    pub role: Option<String>,
    /// Overrides `[agent] disk` for this machine.
    pub disk: Option<String>,
    /// Overrides `[agent] image` (the name a capture is stored under).
    pub image: Option<String>,
}

/// A MAC address in canonical lower-case colon form.
pub fn canonical_mac(text: &str) -> Option<String> {
    let mac: diskcast_proto::mac::MacAddr = text.parse().ok()?;
    Some(mac.to_string())
}

pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Config {
    /// The multicast group every session uses (`[agent] group`, or the agent's default).
    pub fn session_group(&self) -> Ipv4Addr {
        self.agent.group.unwrap_or(BootConfig::default().group)
    }

    /// The UDP port of `[[deploy]]` entry `index`'s sessions.
    pub fn deploy_port(&self, index: usize) -> u16 {
        let base = self.agent.port.unwrap_or(BootConfig::default().port);
        self.deploys[index]
            .port
            .unwrap_or_else(|| base.wrapping_add(1).wrapping_add(index as u16))
    }

    pub fn store_dir(&self) -> PathBuf {
        self.store_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("images"))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if self.dhcp.mode == DhcpMode::Full {
            let (Some(start), Some(end)) = (self.dhcp.range_start, self.dhcp.range_end) else {
                return invalid("[dhcp] mode = \"full\" needs range_start and range_end".into());
            };
            if u32::from(start) > u32::from(end) {
                return invalid(format!(
                    "[dhcp] range_start {start} is after range_end {end}"
                ));
            }
            let mask = u32::from(self.dhcp.netmask);
            if u32::from(start) & mask != u32::from(end) & mask {
                return invalid(format!(
                    "[dhcp] range {start}-{end} spans more than one subnet of netmask {}",
                    self.dhcp.netmask
                ));
            }
        }
        if self.dhcp.lease_secs < 60 {
            return invalid(format!(
                "[dhcp] lease_secs = {} is too short (at least 60)",
                self.dhcp.lease_secs
            ));
        }
        for r in &self.dhcp.reservations {
            if canonical_mac(&r.mac).is_none() {
                return invalid(format!(
                    "[[dhcp.reservation]] mac {:?} is not a MAC address (write aa:bb:cc:dd:ee:ff)",
                    r.mac
                ));
            }
        }
        for m in &self.machines {
            if canonical_mac(&m.mac).is_none() {
                return invalid(format!(
                    "[[machine]] mac {:?} is not a MAC address (write aa:bb:cc:dd:ee:ff)",
                    m.mac
                ));
            }
        }
        self.agent_config_for(None, None)
            .map_err(ConfigError::Invalid)?;
        let mut ports = std::collections::BTreeMap::new();
        for (index, deploy) in self.deploys.iter().enumerate() {
            if !valid_image_name(&deploy.image) {
                return invalid(format!(
                    "[[deploy]] image {:?} is invalid: use {IMAGE_NAME_RULE}",
                    deploy.image
                ));
            }
            if deploy.min_receivers == 0 {
                return invalid(format!(
                    "[[deploy]] {}: min_receivers must be at least 1",
                    deploy.image
                ));
            }
            if self.deploys[..index]
                .iter()
                .any(|d| d.image == deploy.image)
            {
                return invalid(format!(
                    "[[deploy]] image {:?} is listed twice",
                    deploy.image
                ));
            }
            let port = self.deploy_port(index);
            if port == self.agent.port.unwrap_or(BootConfig::default().port) {
                return invalid(format!(
                    "[[deploy]] {} would use port {port}, the peer-to-peer masters' port: give it another `port`",
                    deploy.image
                ));
            }
            if let Some(other) = ports.insert(port, &deploy.image) {
                return invalid(format!(
                    "[[deploy]] {} and {other} would both use port {port}: give one a `port`",
                    deploy.image
                ));
            }
        }
        for m in &self.machines {
            self.agent_config_for(Some(&m.mac), None)
                .map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    /// The agent settings for one machine, rendered later onto its kernel command line.
    pub fn agent_config_for(
        &self,
        mac: Option<&str>,
        server: Option<Ipv4Addr>,
    ) -> Result<BootConfig, String> {
        let machine = mac.and_then(canonical_mac).and_then(|mac| {
            self.machines
                .iter()
                .find(|m| canonical_mac(&m.mac).as_deref() == Some(mac.as_str()))
        });
        let role_text = machine
            .and_then(|m| m.role.as_deref())
            .unwrap_or(&self.agent.role);
        let role: Role = role_text
            .parse()
            .map_err(|()| format!("role {role_text:?} is not {}", Role::EXPECTED))?;
        let finish = |what: &str, text: &str| -> Result<Finish, String> {
            text.parse()
                .map_err(|()| format!("[agent] {what} = {text:?} is not {}", Finish::EXPECTED))
        };
        let mut config = BootConfig {
            role,
            server,
            on_error: finish("on_error", &self.agent.on_error)?,
            on_done: finish("on_done", &self.agent.on_done)?,
            ..BootConfig::default()
        };
        let disk_text = machine
            .and_then(|m| m.disk.as_deref())
            .or(self.agent.disk.as_deref());
        if let Some(text) = disk_text {
            config.disk = DiskSelector::parse(text)
                .ok_or_else(|| format!("disk {text:?} is not {}", DiskSelector::EXPECTED))?;
        }
        if let Some(group) = self.agent.group {
            if !group.is_multicast() {
                return Err(format!(
                    "[agent] group = {group} is not a multicast address"
                ));
            }
            config.group = group;
        }
        config.port = self.agent.port.unwrap_or(config.port);
        config.min_receivers = self
            .agent
            .min_receivers
            .unwrap_or(config.min_receivers)
            .max(1);
        config.start_timeout_secs = self.agent.start_timeout;
        config.rate_mbps = self.agent.rate;
        config.store_port = self.http_port;
        let image = machine
            .and_then(|m| m.image.as_deref())
            .or(self.agent.image.as_deref());
        if let Some(name) = image {
            if !valid_image_name(name) {
                return Err(format!("image {name:?} is invalid: use {IMAGE_NAME_RULE}"));
            }
            config.image = Some(name.into());
        }
        // A slave whose image a [[deploy]] serves listens on that deploy's port; other slaves
        // wait for a peer master on the agent's port.
        if role == Role::Slave {
            if let Some(index) = self
                .deploys
                .iter()
                .position(|d| Some(&d.image) == config.image.as_ref())
            {
                config.port = self.deploy_port(index);
            }
        }
        if role == Role::Capture && config.image.is_none() {
            return Err(
                "role \"capture\" needs an image name: set [agent] image or the machine's image"
                    .into(),
            );
        }
        if let Some(level) = &self.agent.log {
            config.log_level = level
                .parse()
                .map_err(|_| format!("[agent] log = {level:?} is not a log level"))?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../bootserver.example.toml");

    #[test]
    fn capture_needs_an_image_name_and_renders_where_to_upload() {
        let mut config: Config = toml::from_str(EXAMPLE).unwrap();
        config.machines = vec![Machine {
            mac: "52:54:00:aa:bb:cc".into(),
            role: Some("capture".into()),
            disk: None,
            image: None,
        }];
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("needs an image name"), "{err}");
        config.machines[0].image = Some("golden".into());
        config.http_port = 8181;
        config.validate().unwrap();
        let agent = config
            .agent_config_for(Some("52:54:00:aa:bb:cc"), Some(Ipv4Addr::new(10, 77, 0, 1)))
            .unwrap();
        assert_eq!(agent.image.as_deref(), Some("golden"));
        let line = agent.render();
        assert!(
            line.contains("diskcast.image=golden") && line.contains("diskcast.store_port=8181")
        );
        assert_eq!(BootConfig::parse(&line), Ok(agent));
        config.machines[0].image = Some("../../etc".into());
        assert!(config.validate().is_err());

        let bad = format!("{EXAMPLE}\n[[deploy]]\nimage = \"a b\"\n");
        let config: Config = toml::from_str(&bad).unwrap();
        assert!(config.validate().is_err());
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
        let config: Config = toml::from_str(&text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.deploy_port(0), 7745);
        assert_eq!(config.deploy_port(1), 7746);
        let port_of = |mac: &str| config.agent_config_for(Some(mac), None).unwrap().port;
        assert_eq!(port_of("52:54:00:00:00:0a"), 7745);
        assert_eq!(port_of("52:54:00:00:00:0b"), 7746);
        // No image: waits for a peer master on the agent's port.
        assert_eq!(port_of("52:54:00:00:00:0c"), 7744);

        let clash = text.replace(
            "[[deploy]]\nimage = \"ubuntu\"\n",
            "[[deploy]]\nimage = \"ubuntu\"\nport = 7745\n",
        );
        let config: Config = toml::from_str(&clash).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("port 7745"), "{err}");
        let twice = format!("{text}[[deploy]]\nimage = \"win11\"\n");
        let config: Config = toml::from_str(&twice).unwrap();
        assert!(config.validate().is_err());
    }

    #[test]
    fn example_config_is_valid() {
        let config: Config = toml::from_str(EXAMPLE).unwrap();
        config.validate().unwrap();
        assert_eq!(config.dhcp.mode, DhcpMode::Full);
    }

    #[test]
    fn machine_role_overrides_default_and_renders_for_the_agent() {
        let mut config: Config = toml::from_str(EXAMPLE).unwrap();
        config.machines = vec![Machine {
            mac: "52-54-00-AA-BB-CC".into(),
            role: Some("slave".into()),
            disk: Some("serial:DISK-7".into()),
            image: None,
        }];
        config.agent.min_receivers = Some(4);
        let server = Some(Ipv4Addr::new(10, 77, 0, 1));
        let slave = config
            .agent_config_for(Some("52:54:00:aa:bb:cc"), server)
            .unwrap();
        assert_eq!(slave.role, Role::Slave);
        assert_eq!(slave.disk, DiskSelector::Serial("DISK-7".into()));
        assert_eq!(slave.min_receivers, 4);
        let other = config
            .agent_config_for(Some("52:54:00:aa:bb:cd"), server)
            .unwrap();
        assert_eq!(other.role, Role::Inventory);
        // What the bootserver renders, the agent parses back to the same settings.
        assert_eq!(BootConfig::parse(&slave.render()), Ok(slave));
    }

    #[test]
    fn bad_values_are_named() {
        let mut config: Config = toml::from_str(EXAMPLE).unwrap();
        config.agent.role = "painter".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("painter"), "{err}");
        let mut config: Config = toml::from_str(EXAMPLE).unwrap();
        config.dhcp.range_end = Some(Ipv4Addr::new(10, 77, 1, 200));
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("subnet"));
        let err = toml::from_str::<Config>(&EXAMPLE.replace("http_port", "htpp_port")).unwrap_err();
        assert!(err.to_string().contains("htpp_port"), "{err}");
    }
}
