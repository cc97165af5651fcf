//! Where a deploy session multicasts and how far: its group (one per image, so switches with
//! IGMP snooping keep concurrent sessions apart), the interface it leaves from and its TTL
//! (enough to cross the routers between the server and its machines' subnets).

use super::Lab;
use crate::config::{ImageSession, DERIVED_GROUPS};
use crate::subnets::site_of;
use diskcast_proto::mac::MacAddr;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

/// Groups given to images whose group is derived from their name, while they have machines to
/// serve: two names that hash to the same group must not share it at the same time.
#[derive(Debug, Default, Clone)]
pub struct Groups {
    given: Arc<Mutex<BTreeMap<String, Ipv4Addr>>>,
}

impl Groups {
    /// The group of `image`: the one it already has, else `derived` unless another image or
    /// `reserved` holds it, else the next free one of the derived range.
    pub fn group_for(&self, image: &str, derived: Ipv4Addr, reserved: &[Ipv4Addr]) -> Ipv4Addr {
        let Ok(mut given) = self.given.lock() else {
            return derived;
        };
        if let Some(group) = given.get(image) {
            return *group;
        }
        let taken = |g: Ipv4Addr| reserved.contains(&g) || given.values().any(|v| *v == g);
        let (first, last) = (u32::from(DERIVED_GROUPS.0), u32::from(DERIVED_GROUPS.1));
        let span = last - first + 1;
        let start = u32::from(derived).clamp(first, last) - first;
        let group = (0..span)
            .map(|step| Ipv4Addr::from(first + (start + step) % span))
            .find(|g| !taken(*g))
            .unwrap_or(derived);
        if group != derived {
            log::info!(
                "lab: image {image:?} multicasts on {group}: {derived}, the group its name gives, is in use"
            );
        }
        given.insert(image.to_string(), group);
        group
    }

    /// Forgets the groups of images no longer in `active`.
    pub fn keep_only(&self, active: &[&str]) {
        if let Ok(mut given) = self.given.lock() {
            given.retain(|image, _| active.contains(&image.as_str()));
        }
    }
}

/// A deploy session's network settings, decided when it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPlan {
    pub session: ImageSession,
    pub interface: String,
    pub ttl: u8,
    /// Machines it will not reach as configured, and what to change.
    pub warnings: Vec<String>,
}

impl Lab {
    /// How sessions of `image` run, with the group it multicasts on now.
    pub fn image_session(&self, image: &str) -> ImageSession {
        let mut session = self.config.image_session(image);
        if session.group_derived {
            let reserved: Vec<Ipv4Addr> = self
                .config
                .images
                .values()
                .filter(|i| !i.group_derived)
                .map(|i| i.group)
                .chain([self.config.agent.group])
                .collect();
            session.group = self
                .sessions
                .groups
                .group_for(image, session.group, &reserved);
        }
        session
    }

    /// The session of `image` for `machines`: its interface is the image's, else the one their
    /// subnets are reached through; its TTL the image's, else the largest their subnets need
    /// (1 when none says; the largest of the interface's subnets while some machine was never
    /// seen). Machines behind a router with TTL 1, or on another interface, are named in the
    /// warnings.
    pub fn session_plan(&self, image: &str, machines: &[MacAddr]) -> SessionPlan {
        let session = self.image_session(image);
        let placed: Vec<(MacAddr, &crate::subnets::Site)> = machines
            .iter()
            .filter_map(|mac| {
                let address = self.registry.machine(*mac).ok()??.address?;
                Some((*mac, site_of(&self.sites, address)?))
            })
            .collect();
        let mut interfaces: Vec<&str> = placed.iter().map(|(_, s)| s.interface.as_str()).collect();
        interfaces.sort_unstable();
        interfaces.dedup();
        let interface = session
            .interface
            .clone()
            .unwrap_or_else(|| match interfaces.as_slice() {
                [only] => (*only).to_string(),
                _ => self.config.interface.clone(),
            });
        // A machine not seen yet (its first boot is still to come) may sit on any subnet the
        // interface reaches, and a session's TTL is fixed when it starts: reach the farthest.
        let unseen = placed.len() < machines.len();
        let ttl = session
            .ttl
            .or_else(|| {
                let anywhere = self
                    .sites
                    .iter()
                    .filter(|s| unseen && s.interface == interface);
                placed
                    .iter()
                    .map(|(_, s)| *s)
                    .chain(anywhere)
                    .filter_map(|s| s.ttl)
                    .max()
            })
            .unwrap_or(1);
        let mut warnings = Vec::new();
        for (mac, site) in &placed {
            if site.interface != interface {
                warnings.push(format!(
                    "{mac} is on {} (reached through {}) but the session of {image} multicasts on {interface}: deploy it separately, or set `interface` in the [[image]] entry",
                    site.network, site.interface
                ));
            } else if !site.attached && ttl <= 1 {
                warnings.push(format!(
                    "{mac} sits behind a router ({}) and the session of {image} has TTL 1: its multicast will not cross the router; set `ttl` (routers on the way plus one) in the [[subnet]] or [[image]] entry",
                    site.network
                ));
            }
        }
        SessionPlan {
            session,
            interface,
            ttl,
            warnings,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn images_whose_names_give_the_same_group_get_different_ones() {
        let groups = Groups::default();
        let derived = Ipv4Addr::new(239, 255, 78, 9);
        let a = groups.group_for("a", derived, &[]);
        let b = groups.group_for("b", derived, &[]);
        assert_eq!(a, derived);
        assert_ne!(b, a);
        assert_eq!(groups.group_for("a", derived, &[]), a, "kept while in use");
        // A configured group is never handed out.
        let c = groups.group_for(
            "c",
            Ipv4Addr::new(239, 255, 78, 10),
            &[Ipv4Addr::new(239, 255, 78, 10)],
        );
        assert!(![a, b, Ipv4Addr::new(239, 255, 78, 10)].contains(&c));
        // The last of the range wraps around to the first.
        let last = groups.group_for("d", DERIVED_GROUPS.1, &[DERIVED_GROUPS.1]);
        assert_eq!(last, DERIVED_GROUPS.0);
        groups.keep_only(&["b"]);
        assert_eq!(
            groups.group_for("x", derived, &[]),
            derived,
            "a's group is free again"
        );
        assert_eq!(groups.group_for("b", derived, &[]), b);
    }

    pub(crate) fn lab(tag: &str, extra: &str) -> Lab {
        let dir = std::env::temp_dir().join(format!("diskcast-plan-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = include_str!("../../bootserver.example.toml")
            .replace("/var/lib/diskcast", &dir.display().to_string())
            + extra;
        let config =
            crate::config::Config::from_text(&text, std::path::Path::new("t.toml")).unwrap();
        std::fs::create_dir_all(&config.state_dir).unwrap();
        let store = crate::store::Store::open(&config.store_dir).unwrap();
        let registry = diskcast_registry::Registry::open_in(&config.state_dir).unwrap();
        let server = Ipv4Addr::new(10, 77, 0, 1);
        let key = crate::lab::server_key(&config.state_dir).unwrap();
        let mut lab = Lab::new(config.clone(), registry, store, server, key);
        let found = [
            crate::subnets::InterfaceAddress {
                interface: "br0".into(),
                address: server,
                prefix_len: 24,
            },
            crate::subnets::InterfaceAddress {
                interface: "eth1".into(),
                address: Ipv4Addr::new(10, 79, 0, 1),
                prefix_len: 24,
            },
        ];
        lab.sites = crate::subnets::resolve(&config, &found).unwrap();
        lab
    }

    pub(crate) fn at(lab: &Lab, mac: &str, address: [u8; 4]) -> MacAddr {
        let mac: MacAddr = mac.parse().unwrap();
        let sighting = diskcast_registry::Sighting {
            firmware: diskcast_registry::Firmware::Bios,
            address: Some(Ipv4Addr::from(address)),
            via: diskcast_registry::Via::Agent,
        };
        lab.registry.observe(mac, sighting, 1).unwrap();
        mac
    }

    pub(crate) const SUBNETS: &str =
        "\n[[subnet]]\nnetwork = \"10.78.0.0/24\"\nrange_start = \"10.78.0.100\"\n\
        range_end = \"10.78.0.199\"\nrouter = \"10.78.0.1\"\n\
        [[subnet]]\nnetwork = \"10.79.0.0/24\"\ninterface = \"eth1\"\n\
        range_start = \"10.79.0.100\"\nrange_end = \"10.79.0.199\"\n";

    #[test]
    fn ttl_and_interface_follow_the_machines_subnets_and_warn_when_they_cannot_reach() {
        let lab = lab("ttl", SUBNETS);
        let near = at(&lab, "52:54:00:00:00:01", [10, 77, 0, 100]);
        let far = at(&lab, "52:54:00:00:00:02", [10, 78, 0, 100]);
        let other = at(&lab, "52:54:00:00:00:03", [10, 79, 0, 100]);
        let unseen: MacAddr = "52:54:00:00:00:04".parse().unwrap();
        // On the server's link only: TTL 1 is right, nothing to say.
        let plan = lab.session_plan("golden", &[near, unseen]);
        assert_eq!((plan.interface.as_str(), plan.ttl), ("br0", 1));
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        // Behind a router with TTL 1: named, with what to set.
        let plan = lab.session_plan("golden", &[near, far]);
        assert_eq!(plan.ttl, 1);
        assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
        assert!(plan.warnings[0].contains("52:54:00:00:00:02") && plan.warnings[0].contains("ttl"));
        // Only machines on eth1: the session goes there.
        let plan = lab.session_plan("golden", &[other]);
        assert_eq!(plan.interface, "eth1");
        assert!(plan.warnings.is_empty());
        // Mixed interfaces: the main one, and the other machine is named.
        let plan = lab.session_plan("golden", &[near, other]);
        assert_eq!(plan.interface, "br0");
        assert!(plan
            .warnings
            .iter()
            .any(|w| w.contains("52:54:00:00:00:03") && w.contains("eth1")));

        // The subnet says how far it is; the image may say more.
        let lab = self::lab(
            "ttl-set",
            &SUBNETS.replace(
                "router = \"10.78.0.1\"\n",
                "router = \"10.78.0.1\"\nttl = 3\n",
            ),
        );
        let far = at(&lab, "52:54:00:00:00:02", [10, 78, 0, 100]);
        let plan = lab.session_plan("golden", &[far]);
        assert_eq!(plan.ttl, 3);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        // A machine never seen may boot on the far subnet: the session reaches it there too,
        // while machines all seen on the server's link keep TTL 1.
        let near = at(&lab, "52:54:00:00:00:01", [10, 77, 0, 100]);
        let unseen: MacAddr = "52:54:00:00:00:04".parse().unwrap();
        assert_eq!(lab.session_plan("golden", &[near, unseen]).ttl, 3);
        assert_eq!(lab.session_plan("golden", &[near]).ttl, 1);
        let lab = self::lab(
            "ttl-image",
            &format!("{SUBNETS}[[image]]\nname = \"golden\"\nttl = 5\n"),
        );
        let far = at(&lab, "52:54:00:00:00:02", [10, 78, 0, 100]);
        assert_eq!(lab.session_plan("golden", &[far]).ttl, 5);
    }
}
