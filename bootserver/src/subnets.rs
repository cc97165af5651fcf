//! The subnets the server boots machines on, as it serves them ("sites"): each with the
//! interface that reaches it, the server's address its machines use, and whether a router stands
//! between (then its DHCP requests come through a relay, `ip helper-address`, with `giaddr` set).
//!
//! The config says what the subnets are; which of them sit on the server's own links is only
//! known from the interfaces' addresses, so [`resolve`] takes those as input and the edges look
//! them up ([`interface_addresses`]).

use crate::config::{Config, DhcpMode};
use diskcast_proto::mac::MacAddr;
pub use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SiteError {
    #[error("listing the server's network interfaces: {0}")]
    Interfaces(String),
    #[error(
        "interface {interface} (serving {network}) has no IPv4 address: configure one, or give \
         `address` (or the [[subnet]]'s `server_address`)"
    )]
    NoAddress { interface: String, network: String },
    #[error(
        "[[subnet]] {network} is behind a router (interface {interface} has no address in it) but \
         has no `router`: its machines could not reach the server; give the router's address on \
         that subnet"
    )]
    NoRouter { network: Ipv4Net, interface: String },
}

/// One IPv4 address of one of the server's interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

impl InterfaceAddress {
    pub fn network(&self) -> Option<Ipv4Net> {
        Ipv4Net::new(self.address, self.prefix_len)
            .ok()
            .map(|n| n.trunc())
    }
}

/// Every IPv4 address of every interface of this host (its network namespace).
pub fn interface_addresses() -> Result<Vec<InterfaceAddress>, SiteError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| SiteError::Interfaces(e.to_string()))?;
    Ok(addrs
        .filter_map(|a| {
            let address = a.address.as_ref()?.as_sockaddr_in()?.ip();
            let netmask = a
                .netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map_or(32, |m| u32::from(m.ip()).count_ones() as u8);
            Some(InterfaceAddress {
                interface: a.interface_name,
                address,
                prefix_len: netmask,
            })
        })
        .collect())
}

/// A subnet as the server serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub network: Ipv4Net,
    /// The server's interface its requests arrive on and its sessions leave from.
    pub interface: String,
    /// The server's address for its machines: DHCP server identifier, TFTP and HTTP.
    pub server: Ipv4Addr,
    /// On the server's own link; `false`: behind a router that relays DHCP.
    pub attached: bool,
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub reservations: BTreeMap<MacAddr, Ipv4Addr>,
    /// Multicast TTL a session needs to reach it, when configured.
    pub ttl: Option<u8>,
}

impl Site {
    /// A subnet on the server's own link `interface`, with nothing to hand out yet.
    pub fn on_link(interface: &str, network: Ipv4Net, server: Ipv4Addr) -> Self {
        Self {
            network: network.trunc(),
            interface: interface.into(),
            server,
            attached: true,
            range: None,
            router: None,
            dns: Vec::new(),
            reservations: BTreeMap::new(),
            ttl: None,
        }
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        self.network.contains(&address)
    }

    /// `10.78.0.0/24 via br0 (behind a router; server 10.77.0.1)`, for the log.
    pub fn describe(&self) -> String {
        format!(
            "{} via {} ({}; server {}{})",
            self.network,
            self.interface,
            if self.attached {
                "on the server's link"
            } else {
                "behind a router"
            },
            self.server,
            self.range
                .map_or(String::new(), |(a, b)| format!(", range {a}-{b}"))
        )
    }
}

/// The site `address` is on, if any.
pub fn site_of(sites: &[Site], address: Ipv4Addr) -> Option<&Site> {
    sites.iter().find(|s| s.contains(address))
}

/// The config's subnets as served, given the server's interface addresses: the `[dhcp]` subnet
/// on `interface` first (when it describes one), then each `[[subnet]]`.
pub fn resolve(config: &Config, found: &[InterfaceAddress]) -> Result<Vec<Site>, SiteError> {
    fn on<'a>(
        found: &'a [InterfaceAddress],
        interface: &'a str,
    ) -> impl Iterator<Item = &'a InterfaceAddress> + 'a {
        found
            .iter()
            .filter(move |a| a.interface == interface && !a.address.is_loopback())
    }
    let mut sites = Vec::new();
    let dhcp = &config.dhcp;
    // The old single-subnet form: `[dhcp]` describes the subnet of `interface`. A full-mode
    // config without a `[dhcp]` range lists every subnet as a `[[subnet]]`.
    if dhcp.range.is_some() || dhcp.mode == DhcpMode::Proxy {
        let server = match config.address {
            Some(address) => address,
            None => {
                on(found, &config.interface)
                    .next()
                    .ok_or_else(|| SiteError::NoAddress {
                        interface: config.interface.clone(),
                        network: "[dhcp]".into(),
                    })?
                    .address
            }
        };
        let base = dhcp.range.map_or(server, |(start, _)| start);
        let network = Ipv4Net::with_netmask(base, dhcp.netmask)
            .unwrap_or_else(|_| Ipv4Net::from(base))
            .trunc();
        sites.push(Site {
            network,
            interface: config.interface.clone(),
            server,
            attached: true,
            range: dhcp.range,
            router: dhcp.router,
            dns: dhcp.dns.clone(),
            reservations: dhcp.reservations.clone(),
            ttl: None,
        });
    }
    for subnet in &config.subnets {
        let interface = subnet
            .interface
            .clone()
            .unwrap_or_else(|| config.interface.clone());
        let local = on(found, &interface).find(|a| subnet.network.contains(&a.address));
        let attached = local.is_some()
            || subnet
                .server_address
                .is_some_and(|a| subnet.network.contains(&a));
        let configured = (interface == config.interface)
            .then_some(config.address)
            .flatten();
        let server = subnet
            .server_address
            .or(local.map(|a| a.address))
            .or(configured)
            .or(on(found, &interface).next().map(|a| a.address))
            .ok_or_else(|| SiteError::NoAddress {
                interface: interface.clone(),
                network: subnet.network.to_string(),
            })?;
        if !attached && subnet.router.is_none() && dhcp.mode == DhcpMode::Full {
            return Err(SiteError::NoRouter {
                network: subnet.network,
                interface,
            });
        }
        sites.push(Site {
            network: subnet.network,
            interface,
            server,
            attached,
            range: subnet.range,
            router: subnet.router,
            dns: subnet.dns.clone(),
            reservations: subnet.reservations.clone(),
            ttl: subnet.ttl,
        });
    }
    Ok(sites)
}

/// The interfaces the server listens on for DHCP, in order, each once.
pub fn interfaces(sites: &[Site], primary: &str) -> Vec<String> {
    let mut names = vec![primary.to_string()];
    for site in sites {
        if !names.contains(&site.interface) {
            names.push(site.interface.clone());
        }
    }
    names
}

/// The server's addresses its machines use (TFTP and HTTP listen on each), each once.
pub fn server_addresses(sites: &[Site]) -> Vec<(String, Ipv4Addr)> {
    let mut addresses: Vec<(String, Ipv4Addr)> = Vec::new();
    for site in sites {
        if !addresses.iter().any(|(_, a)| *a == site.server) {
            addresses.push((site.interface.clone(), site.server));
        }
    }
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = "interface = \"br0\"\nstate_dir = \"/tmp/x\"\n\
        [boot]\nkernel = \"k\"\ninitramfs = \"i\"\n";

    fn config(text: &str) -> Config {
        Config::from_text(&format!("{BASE}{text}"), Path::new("test.toml")).unwrap()
    }

    fn found(list: &[(&str, &str, u8)]) -> Vec<InterfaceAddress> {
        list.iter()
            .map(|(interface, address, prefix_len)| InterfaceAddress {
                interface: (*interface).into(),
                address: address.parse().unwrap(),
                prefix_len: *prefix_len,
            })
            .collect()
    }

    #[test]
    fn an_old_single_subnet_config_is_the_first_site() {
        let config = config(
            "[dhcp]\nrange_start = \"10.77.0.100\"\nrange_end = \"10.77.0.149\"\nrouter = \"10.77.0.254\"\n",
        );
        let sites = resolve(&config, &found(&[("br0", "10.77.0.1", 24)])).unwrap();
        assert_eq!(sites.len(), 1);
        let site = &sites[0];
        assert_eq!(site.network.to_string(), "10.77.0.0/24");
        assert_eq!(site.server, Ipv4Addr::new(10, 77, 0, 1));
        assert!(site.attached);
        assert_eq!(site.router, Some(Ipv4Addr::new(10, 77, 0, 254)));
        // Without the interface's address, a configured one does.
        let config = config_with_address();
        let sites = resolve(&config, &[]).unwrap();
        assert_eq!(sites[0].server, Ipv4Addr::new(10, 77, 0, 1));
        let no_address = resolve(
            &self::config("[dhcp]\nrange_start = \"10.77.0.100\"\nrange_end = \"10.77.0.149\"\n"),
            &[],
        );
        assert!(matches!(no_address, Err(SiteError::NoAddress { .. })));
    }

    fn config_with_address() -> Config {
        Config::from_text(
            &format!(
                "address = \"10.77.0.1\"\n{BASE}[dhcp]\nrange_start = \"10.77.0.100\"\nrange_end = \"10.77.0.149\"\n"
            ),
            Path::new("test.toml"),
        )
        .unwrap()
    }

    #[test]
    fn subnets_on_other_interfaces_and_behind_routers() {
        let config = config(
            "[dhcp]\nrange_start = \"10.77.0.100\"\nrange_end = \"10.77.0.149\"\n\
             [[subnet]]\nnetwork = \"10.78.0.0/24\"\nrange_start = \"10.78.0.100\"\nrange_end = \"10.78.0.149\"\n\
             router = \"10.78.0.1\"\nttl = 4\n\
             [[subnet]]\nnetwork = \"10.79.0.0/24\"\ninterface = \"eth1\"\n\
             range_start = \"10.79.0.10\"\nrange_end = \"10.79.0.20\"\n",
        );
        let sites = resolve(
            &config,
            &found(&[
                ("br0", "10.77.0.1", 24),
                ("eth1", "10.79.0.1", 24),
                ("lo", "127.0.0.1", 8),
            ]),
        )
        .unwrap();
        assert_eq!(sites.len(), 3);
        let relayed = site_of(&sites, Ipv4Addr::new(10, 78, 0, 120)).unwrap();
        assert!(!relayed.attached);
        assert_eq!(relayed.interface, "br0");
        assert_eq!(
            relayed.server,
            Ipv4Addr::new(10, 77, 0, 1),
            "reached through br0"
        );
        assert_eq!(relayed.ttl, Some(4));
        let other = site_of(&sites, Ipv4Addr::new(10, 79, 0, 15)).unwrap();
        assert!(other.attached);
        assert_eq!(other.server, Ipv4Addr::new(10, 79, 0, 1));
        assert_eq!(interfaces(&sites, "br0"), ["br0", "eth1"]);
        assert_eq!(
            server_addresses(&sites),
            [
                ("br0".to_string(), Ipv4Addr::new(10, 77, 0, 1)),
                ("eth1".to_string(), Ipv4Addr::new(10, 79, 0, 1))
            ]
        );
        // eth1 without an address: nothing to answer from.
        let missing = resolve(&config, &found(&[("br0", "10.77.0.1", 24)]));
        assert!(
            matches!(missing, Err(SiteError::NoAddress { ref interface, .. }) if interface == "eth1")
        );
    }

    #[test]
    fn a_relayed_subnet_without_a_router_is_refused() {
        let config = config(
            "[dhcp]\nrange_start = \"10.77.0.100\"\nrange_end = \"10.77.0.149\"\n\
             [[subnet]]\nnetwork = \"10.78.0.0/24\"\nrange_start = \"10.78.0.100\"\nrange_end = \"10.78.0.149\"\n",
        );
        let err = resolve(&config, &found(&[("br0", "10.77.0.1", 24)])).unwrap_err();
        assert!(err.to_string().contains("router"), "{err}");
    }

    #[test]
    fn every_subnet_may_be_a_subnet_entry() {
        let config = config(
            "[dhcp]\nmode = \"full\"\n\
             [[subnet]]\nnetwork = \"10.77.0.0/24\"\nrange_start = \"10.77.0.100\"\nrange_end = \"10.77.0.149\"\n",
        );
        let sites = resolve(&config, &found(&[("br0", "10.77.0.1", 24)])).unwrap();
        assert_eq!(sites.len(), 1);
        assert!(sites[0].attached);
    }
}
