//! Relays a deploy task names (`bootserver task deploy IMAGE --to ... --relay MAC`): on a subnet
//! behind a router that forwards no multicast, one machine boots as the relay of the session
//! (`diskcast.role=relay diskcast.upstream=SERVER:RELAY_PORT`) and re-multicasts it there; the
//! task's machines on that subnet boot as ordinary slaves of the same group and join it.
//!
//! The relay's own task is a deploy task of the image whose options list the machines it
//! relays to (`relay_for`): its boot contract gives it the relay role, never the slave role,
//! so its disk is never written. The far machines' tasks name their relay (`relay`): the
//! session waits for the relay (not for them) and completes their tasks from what the relay
//! reports of its local receivers.

use super::{Lab, LabError};
use crate::subnets::{site_of, Ipv4Net};
use diskcast_proto::mac::MacAddr;
use std::net::Ipv4Addr;

/// Where a machine sits, as far as the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Never seen here and not in the config.
    Unknown,
    /// Known, but where it sits is not: no address seen, no reservation.
    Unplaced,
    /// Last seen at this address, which is in no subnet the server serves.
    Outside(Ipv4Addr),
    /// On this served subnet; `attached`: on the server's own link.
    On { network: Ipv4Net, attached: bool },
}

/// One relay of a task and the task's machines on its subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAssignment {
    pub relay: MacAddr,
    pub network: Ipv4Net,
    pub machines: Vec<MacAddr>,
}

/// Checks the relays a deploy task names against its targets and gives each relay the targets
/// on its subnet. Every rule broken is named with the machine and what to do instead.
pub fn assign(
    relays: &[MacAddr],
    targets: &[MacAddr],
    place: impl Fn(MacAddr) -> Place,
) -> Result<Vec<RelayAssignment>, LabError> {
    let mut assignments: Vec<RelayAssignment> = Vec::new();
    for &relay in relays {
        if assignments.iter().any(|a| a.relay == relay) {
            continue;
        }
        if targets.contains(&relay) {
            return Err(LabError::Invalid(format!(
                "{relay} is named both as a relay and as a target: a relay carries the session \
                 into its subnet and writes no disk; image it in a later task, or name another \
                 machine of its subnet as the relay"
            )));
        }
        let network = match place(relay) {
            Place::Unknown => {
                return Err(LabError::Invalid(format!(
                    "relay {relay} is unknown: it never booted here and no [[machine]] or \
                     reservation names it; name a machine on the far subnet that booted once \
                     (an inventory task), or list it in the config"
                )))
            }
            Place::Unplaced => {
                return Err(LabError::Invalid(format!(
                    "where relay {relay} sits is not known (no address seen, no reservation): \
                     boot it once (an inventory task) or give it a [[subnet.reservation]]"
                )))
            }
            Place::Outside(address) => {
                return Err(LabError::Invalid(format!(
                    "relay {relay} was last seen at {address}, which is in no subnet the server \
                     serves: add a [[subnet]] for it"
                )))
            }
            Place::On {
                network,
                attached: true,
            } => {
                return Err(LabError::Invalid(format!(
                    "relay {relay} is on {network}, the server's own link: the session's \
                     multicast reaches that subnet directly, no relay is needed; name a machine \
                     behind the router"
                )))
            }
            Place::On { network, .. } => network,
        };
        if let Some(other) = assignments.iter().find(|a| a.network == network) {
            return Err(LabError::Invalid(format!(
                "relays {} and {relay} are both on {network}: name one relay per subnet",
                other.relay
            )));
        }
        let machines: Vec<MacAddr> = targets
            .iter()
            .copied()
            .filter(|t| matches!(place(*t), Place::On { network: n, .. } if n == network))
            .collect();
        if machines.is_empty() {
            return Err(LabError::Invalid(format!(
                "relay {relay} is on {network}, where none of the task's machines is known to \
                 be: it would relay to nobody (a machine never seen counts as on the server's \
                 link; boot it once or give it a reservation)"
            )));
        }
        assignments.push(RelayAssignment {
            relay,
            network,
            machines,
        });
    }
    Ok(assignments)
}

impl Lab {
    /// Where `mac` sits: the subnet of the address it was last seen at, else of its reservation.
    pub fn place(&self, mac: MacAddr) -> Result<Place, LabError> {
        let machine = self.registry.machine(mac)?;
        let on = |network: Ipv4Net, attached: bool| Place::On { network, attached };
        if let Some(address) = machine.as_ref().and_then(|m| m.address) {
            return Ok(site_of(&self.sites, address)
                .map_or(Place::Outside(address), |s| on(s.network, s.attached)));
        }
        if let Some(site) = self
            .sites
            .iter()
            .find(|s| s.reservations.contains_key(&mac))
        {
            return Ok(on(site.network, site.attached));
        }
        if machine.is_some() || self.config.machines.contains_key(&mac) {
            return Ok(Place::Unplaced);
        }
        Ok(Place::Unknown)
    }

    /// The relays `--relay` names: each a MAC or a machine's name.
    pub fn resolve_relays(&self, relays: &[String]) -> Result<Vec<MacAddr>, LabError> {
        let mut macs = Vec::new();
        for text in relays.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
            let mac = match text.parse::<MacAddr>() {
                Ok(mac) => mac,
                Err(_) => match self.registry.resolve(text)?.as_slice() {
                    [one] => *one,
                    _ => {
                        return Err(LabError::Invalid(format!(
                            "relay {text:?} names no single machine: give its MAC or its name"
                        )))
                    }
                },
            };
            if !macs.contains(&mac) {
                macs.push(mac);
            }
        }
        Ok(macs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        format!("52:54:00:00:00:{n:02x}").parse().unwrap()
    }

    const NEAR: &str = "10.77.0.0/24";
    const FAR_B: &str = "10.78.0.0/24";
    const FAR_C: &str = "10.79.0.0/24";

    /// Machines 1-2 on the server's link, 3-5 on B, 6-7 on C, 8 unplaced, 9 unknown, 10
    /// outside every subnet.
    fn place(m: MacAddr) -> Place {
        let on = |n: &str, attached| Place::On {
            network: n.parse().unwrap(),
            attached,
        };
        match m.octets()[5] {
            1 | 2 => on(NEAR, true),
            3..=5 => on(FAR_B, false),
            6 | 7 => on(FAR_C, false),
            8 => Place::Unplaced,
            10 => Place::Outside(Ipv4Addr::new(192, 168, 5, 5)),
            _ => Place::Unknown,
        }
    }

    fn err(relays: &[u8], targets: &[u8]) -> String {
        let relays: Vec<MacAddr> = relays.iter().map(|n| mac(*n)).collect();
        let targets: Vec<MacAddr> = targets.iter().map(|n| mac(*n)).collect();
        match assign(&relays, &targets, place) {
            Ok(a) => panic!("accepted: {a:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn each_relay_gets_the_targets_on_its_subnet() {
        let targets = [1, 4, 5, 7, 8].map(mac);
        let a = assign(&[mac(3), mac(6), mac(3)], &targets, place).unwrap();
        assert_eq!(
            a,
            vec![
                RelayAssignment {
                    relay: mac(3),
                    network: FAR_B.parse().unwrap(),
                    machines: vec![mac(4), mac(5)],
                },
                RelayAssignment {
                    relay: mac(6),
                    network: FAR_C.parse().unwrap(),
                    // The relay is not its own target.
                    machines: vec![mac(7)],
                },
            ]
        );
        // No relay: nothing to check.
        assert!(assign(&[], &targets, place).unwrap().is_empty());
    }

    #[test]
    fn bad_relays_are_refused_naming_the_machine_and_what_to_do() {
        let e = err(&[9], &[4]);
        assert!(e.contains("relay 52:54:00:00:00:09 is unknown"), "{e}");
        let e = err(&[8], &[4]);
        assert!(
            e.contains("where relay 52:54:00:00:00:08 sits is not known"),
            "{e}"
        );
        assert!(e.contains("reservation"), "{e}");
        let e = err(&[10], &[4]);
        assert!(e.contains("192.168.5.5") && e.contains("[[subnet]]"), "{e}");
        let e = err(&[1], &[2, 4]);
        assert!(e.contains("the server's own link"), "{e}");
        let e = err(&[3, 5], &[4]);
        assert!(
            e.contains("relays 52:54:00:00:00:03 and 52:54:00:00:00:05 are both on 10.78.0.0/24"),
            "{e}"
        );
        let e = err(&[3], &[3, 4]);
        assert!(e.contains("both as a relay and as a target"), "{e}");
        assert!(e.contains("writes no disk"), "{e}");
        let e = err(&[6], &[1, 4]);
        assert!(e.contains("relay to nobody"), "{e}");
    }

    mod lab {
        use crate::lab::session_plan::tests::{at, lab, SUBNETS};
        use crate::lab::tasks::TaskRequest;
        use diskcast_proto::cmdline::{BootConfig, Role};
        use diskcast_proto::mac::MacAddr;
        use diskcast_proto::trust::Trust;

        fn request(to: &str, relays: &[&str]) -> TaskRequest {
            TaskRequest {
                kind: "deploy".into(),
                image: Some("golden".into()),
                to: to.into(),
                options: Default::default(),
                wake: false,
                timeout: None,
                relays: relays.iter().map(|r| (*r).to_string()).collect(),
            }
        }

        fn contract(lab: &crate::lab::Lab, mac: MacAddr) -> BootConfig {
            let script = lab.boot_script(mac, 10).unwrap();
            let line = script
                .lines()
                .find(|l| l.starts_with("kernel "))
                .unwrap_or_else(|| panic!("no kernel line:\n{script}"));
            BootConfig::parse(line).unwrap()
        }

        #[test]
        fn a_task_with_a_relay_boots_it_as_the_relay_and_its_subnet_as_slaves() {
            let lab = lab("relay-contract", SUBNETS);
            lab.store
                .import("golden", &mut &vec![7u8; 1 << 20][..], "test", 3)
                .unwrap();
            let near = at(&lab, "52:54:00:00:00:01", [10, 77, 0, 100]);
            let relay = at(&lab, "52:54:00:00:00:02", [10, 78, 0, 100]);
            let far1 = at(&lab, "52:54:00:00:00:03", [10, 78, 0, 101]);
            let far2 = at(&lab, "52:54:00:00:00:04", [10, 78, 0, 102]);
            let to = format!("{near},{far1},{far2}");

            // What is wrong is named, and nothing is created.
            let refused = |relays: &[&str], want: &str| {
                let e = lab.create_tasks(&request(&to, relays), 5).unwrap_err();
                assert!(e.to_string().contains(want), "{e}");
                assert!(lab.registry.open_task_for(far1).unwrap().is_none());
            };
            refused(&["52:54:00:00:00:99"], "relay 52:54:00:00:00:99 is unknown");
            refused(
                &[&near.to_string()],
                "is named both as a relay and as a target",
            );
            refused(&[&relay.to_string(), &far1.to_string()], "is named both");
            let other = at(&lab, "52:54:00:00:00:05", [10, 78, 0, 103]);
            refused(
                &[&relay.to_string(), &other.to_string()],
                "are both on 10.78.0.0/24",
            );
            let beside = at(&lab, "52:54:00:00:00:06", [10, 77, 0, 106]);
            refused(&[&beside.to_string()], "the server's own link");
            let mut inventory = request(&to, &[&relay.to_string()]);
            inventory.kind = "inventory".into();
            inventory.image = None;
            let e = lab.create_tasks(&inventory, 5).unwrap_err();
            assert!(e.to_string().contains("relays are for deploy tasks"), "{e}");
            let mut by_hand = request(&to, &[]);
            by_hand.options.relay_for = vec![far1.to_string()];
            let e = lab.create_tasks(&by_hand, 5).unwrap_err();
            assert!(e.to_string().contains("set by the server"), "{e}");

            let tasks = lab
                .create_tasks(&request(&to, &[&relay.to_string()]), 5)
                .unwrap();
            assert_eq!(tasks.len(), 4, "three targets and their relay");
            let session = lab.image_session("golden");
            let relay_port = crate::config::relay_port_for(session.group, session.relay_port);

            // The relay: its role, the server's relay port, the server's key, its subnet's
            // machines to wait for, the session's group; no disk of it is ever chosen.
            let c = contract(&lab, relay);
            assert_eq!(c.role, Role::Relay);
            assert_eq!(
                c.upstream,
                Some(std::net::SocketAddrV4::new(lab.server_ip, relay_port))
            );
            assert_eq!(c.min_receivers, 2);
            assert_eq!((c.group, c.port), (session.group, session.port));
            assert_eq!(c.trust, Some(Trust::Keys(vec![lab.key.public()])));
            assert_eq!(
                c.start_timeout_secs,
                Some(lab.config.lab.start_timeout.as_secs() as u32)
            );
            assert!(!c.grow_last_partition);
            assert!(c.task.is_some(), "it reports on its own task");
            // Reached at another address (its subnet's), it subscribes there.
            let script = lab
                .boot_script_at(relay, 11, std::net::Ipv4Addr::new(10, 78, 0, 1))
                .unwrap();
            assert!(
                script.contains(&format!("diskcast.upstream=10.78.0.1:{relay_port}")),
                "{script}"
            );
            // The far machines and the near one: ordinary slaves of the same group.
            for mac in [near, far1, far2] {
                let c = contract(&lab, mac);
                assert_eq!(c.role, Role::Slave, "{mac}");
                assert_eq!((c.group, c.port), (session.group, session.port));
                assert_eq!(c.upstream, None);
            }
            let labels: Vec<String> = lab
                .registry
                .tasks(Default::default())
                .unwrap()
                .iter()
                .map(crate::lab::boot::task_label)
                .collect();
            assert!(
                labels.contains(
                    &"relay golden to 2 machine(s) of its subnet (writes no disk)".into()
                ),
                "{labels:?}"
            );
            assert!(
                labels.contains(&format!("deploy golden through relay {relay}")),
                "{labels:?}"
            );
            assert!(labels.contains(&"deploy golden".to_string()), "{labels:?}");
        }

        #[test]
        fn a_task_whose_options_this_server_cannot_read_boots_the_local_disk() {
            // A relay's task as a newer diskcast on a shared registry might write it: read as
            // a plain deploy it would make the relay a slave and write its disk.
            let lab = lab("unreadable-options", SUBNETS);
            let relay = at(&lab, "52:54:00:00:00:02", [10, 78, 0, 100]);
            lab.registry
                .create_task(
                    diskcast_registry::NewTask {
                        mac: relay,
                        kind: diskcast_registry::TaskKind::Deploy {
                            image: "golden".into(),
                        },
                        options: r#"{"relay_for":["52:54:00:00:00:03"],"relay_mode":"v2"}"#.into(),
                        timeout_secs: 600,
                    },
                    5,
                )
                .unwrap();
            match lab.boot_plan(relay, 10).unwrap() {
                crate::lab::boot::BootPlan::Local { why, .. } => {
                    assert!(why.contains("cannot be read"), "{why}")
                }
                plan => panic!("an unreadable task booted the agent: {plan:?}"),
            }
        }
    }
}
