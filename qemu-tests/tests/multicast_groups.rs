//! Two sessions of different images at the same time on one LAN (process test, no QEMU):
//! each has its own multicast group, the switch snoops IGMP, and every receiver gets only its
//! own session's datagrams — on the wire (nftables counters at each host's NIC) and at its
//! socket (the receiver's count of foreign datagrams), even where one host receives both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{make_key, make_striped_image, output_of as wait, spawn_agent, Lab};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const GROUP_A: &str = "239.255.78.1";
const GROUP_B: &str = "239.255.78.2";
/// Both sessions on the same port, as the bootserver's image sessions are: only the group
/// tells them apart.
const PORT: &str = "7745";

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Counts the datagrams of each group arriving at `netns`'s eth0, before anything filters them.
fn count_groups(netns: &str) {
    let script = format!(
        "table netdev diskcast_groups {{\n counter group_a {{}}\n counter group_b {{}}\n \
         chain ingress {{\n  type filter hook ingress device \"eth0\" priority 0;\n  \
         ip daddr {GROUP_A} udp dport {PORT} counter name \"group_a\"\n  \
         ip daddr {GROUP_B} udp dport {PORT} counter name \"group_b\"\n }}\n}}\n"
    );
    let mut child = Lab::in_host(netns, Path::new("nft"))
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "nft in {netns}");
}

fn counted(netns: &str, counter: &str) -> u64 {
    let text = run_ok(Lab::in_host(netns, Path::new("nft")).args([
        "list",
        "counter",
        "netdev",
        "diskcast_groups",
        counter,
    ]));
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {text}"))
}

/// The receiver's own count of datagrams of another session or sender, from its log.
fn foreign_at_socket(log: &str) -> u64 {
    const SAYS: &str = " foreign (another session or sender)";
    let line = log
        .lines()
        .find(|l| l.contains(SAYS))
        .unwrap_or_else(|| panic!("no foreign count in:\n{log}"));
    let before = &line[..line.find(SAYS).unwrap()];
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable foreign count: {line}"))
}

#[test]
fn two_sessions_on_one_lan_each_receiver_gets_only_its_own() {
    let mut lab = Lab::new("two_sessions");
    // The switch snoops IGMP; a querier on the LAN (a router's, here the server side's) keeps
    // its table of members.
    lab.ip("link set br0 type bridge mcast_snooping 1");
    let _querier = lab.start_igmp_querier(lab.server_ip);
    let sender = lab.add_host("snd", "10.77.0.10/24");
    let rx_a = lab.add_host("rxa", "10.77.0.11/24");
    let rx_b = lab.add_host("rxb", "10.77.0.12/24");
    let both = lab.add_host("both", "10.77.0.13/24");
    // A port marked as leading to a multicast router gets every group: it shows both sessions
    // were on the wire, and that the counters count.
    let monitor = lab.add_host("mon", "10.77.0.14/24");
    run_ok(
        lab.command_in_lab("bridge")
            .args(["link", "set", "dev", "v-mon", "mcast_router", "2"]),
    );
    for host in [&rx_a, &rx_b, &both, &monitor] {
        count_groups(host);
    }
    let (image_a, image_b) = (lab.dir.join("a.img"), lab.dir.join("b.img"));
    make_striped_image(&image_a, 24, 11);
    make_striped_image(&image_b, 24, 22);
    // One server signs both sessions, as the bootserver does: only the group tells them apart.
    let key = lab.dir.join("server.key");
    let public = make_key(&key);

    let receive = |host: &str, group: &str, name: &str, target: &Path| {
        spawn_agent(
            host,
            &[
                "receive",
                "--interface",
                "eth0",
                "--group",
                group,
                "--port",
                PORT,
                "--name",
                name,
                "--wait",
                "90",
                "--trust",
                &public,
            ],
            Some(target),
        )
    };
    let targets: Vec<_> = ["a1", "b1", "a2", "b2"]
        .iter()
        .map(|n| lab.dir.join(format!("{n}.img")))
        .collect();
    let receivers = vec![
        ("a1", receive(&rx_a, GROUP_A, "a1", &targets[0])),
        ("b1", receive(&rx_b, GROUP_B, "b1", &targets[1])),
        // One host in both sessions: its sockets share the port.
        ("a2", receive(&both, GROUP_A, "a2", &targets[2])),
        ("b2", receive(&both, GROUP_B, "b2", &targets[3])),
    ];
    // Their IGMP reports reach the switch before any session datagram does.
    std::thread::sleep(Duration::from_secs(3));
    let send = |image: &Path, group: &str| {
        spawn_agent(
            &sender,
            &[
                "send",
                "--interface",
                "eth0",
                "--group",
                group,
                "--port",
                PORT,
                "--min-receivers",
                "2",
                "--start-timeout",
                "60",
                "--rate",
                "100",
                "--key",
                key.to_str().unwrap(),
            ],
            Some(image),
        )
    };
    let senders = [send(&image_a, GROUP_A), send(&image_b, GROUP_B)];
    let sent: Vec<_> = senders
        .into_iter()
        .zip(["sender A", "sender B"])
        .map(|(child, what)| wait(child, what))
        .collect();
    let received: Vec<_> = receivers
        .into_iter()
        .map(|(name, child)| (name, wait(child, name)))
        .collect();

    for out in &sent {
        assert!(out.status.success(), "a sender failed");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .matches("verified")
                .count(),
            2
        );
    }
    let (a, b) = (
        std::fs::read(&image_a).unwrap(),
        std::fs::read(&image_b).unwrap(),
    );
    for ((name, out), target) in received.iter().zip(&targets) {
        assert!(out.status.success(), "receiver {name} failed");
        let expected = if name.starts_with('a') { &a } else { &b };
        assert!(
            std::fs::read(target).unwrap() == *expected,
            "{name}'s copy differs from its image"
        );
        let log = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            foreign_at_socket(&log),
            0,
            "{name} saw another session:\n{log}"
        );
    }
    // On the wire: the monitor saw both groups; each single-session host only its own.
    let seen = |host: &str| (counted(host, "group_a"), counted(host, "group_b"));
    let (mon_a, mon_b) = seen(&monitor);
    assert!(mon_a > 0 && mon_b > 0, "monitor saw A {mon_a}, B {mon_b}");
    let (a_at_a, b_at_a) = seen(&rx_a);
    let (a_at_b, b_at_b) = seen(&rx_b);
    eprintln!(
        "datagrams at the NICs: monitor A {mon_a} B {mon_b}; rxa A {a_at_a} B {b_at_a}; rxb A {a_at_b} B {b_at_b}"
    );
    assert!(a_at_a > 0 && b_at_b > 0);
    assert_eq!(
        b_at_a, 0,
        "session B's datagrams reached a host of session A only"
    );
    assert_eq!(
        a_at_b, 0,
        "session A's datagrams reached a host of session B only"
    );
}
