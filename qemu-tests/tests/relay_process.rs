//! Relays, as processes in network namespaces: two subnets joined by a router namespace that
//! forwards IPv4 unicast and no multicast at all (no smcroute). The sender and two near
//! receivers sit on subnet A; a relay (`agent relay`) and three far receivers on subnet B. The
//! relay receives the session by unicast across the router and re-multicasts it on B, serving
//! its receivers' repairs; what crosses the router is measured on the router's interfaces.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{make_key, output_of as wait, spawn_agent, Lab, Noise};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const RELAY_PORT: &str = "7745";

/// Mostly random data (incompressible, and sent raw below) with some text: every 1 MiB chunk
/// holds data, so one copy of the data is the image's size.
fn make_image(path: &Path, mib: usize, seed: u64) {
    let mut noise = Noise::new(seed);
    let mut image = vec![0u8; mib << 20];
    for (i, block) in image.chunks_mut(64 << 10).enumerate() {
        match i % 5 {
            1 => block
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"far subnet data "[j % 16]),
            _ => noise.fill(block),
        }
    }
    std::fs::write(path, image).unwrap();
}

/// A byte counter of an interface in the router's namespace.
fn router_counter(router: &str, interface: &str, counter: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", router, "cat"])
        .arg(format!("/sys/class/net/{interface}/statistics/{counter}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

struct TwoSubnets {
    lab: Lab,
    router: String,
    sender: String,
    near: Vec<String>,
    relay: String,
    far: Vec<String>,
}

/// Subnet A (10.77.0.0/24, br0): the sender and `near` receivers; subnet B (10.78.0.0/24, br1):
/// the relay and `far` receivers; a router between them with forwarding on and no multicast
/// routing.
fn two_subnets(name: &str, near: usize, far: usize) -> TwoSubnets {
    let mut lab = Lab::new(name);
    lab.add_subnet("br1");
    let router = lab.add_router("router", "br1", "10.77.0.254/24", "10.78.0.1/24");
    let sender = lab.add_host_on(
        "snd",
        "10.77.0.10/24",
        "br0",
        &["10.78.0.0/24 via 10.77.0.254"],
    );
    let near = (1..=near)
        .map(|i| lab.add_host(&format!("near{i}"), &format!("10.77.0.{}/24", 10 + i)))
        .collect();
    let relay = lab.add_host_on("relay", "10.78.0.2/24", "br1", &["default via 10.78.0.1"]);
    let far = (1..=far)
        .map(|i| {
            lab.add_host_on(
                &format!("far{i}"),
                &format!("10.78.0.{}/24", 10 + i),
                "br1",
                &["default via 10.78.0.1"],
            )
        })
        .collect();
    TwoSubnets {
        lab,
        router,
        sender,
        near,
        relay,
        far,
    }
}

fn receive(ns: &str, name: &str, wait_s: &str, public: &str, target: &Path) -> std::process::Child {
    spawn_agent(
        ns,
        &[
            "receive",
            "--interface",
            "eth0",
            "--name",
            name,
            "--wait",
            wait_s,
            "--trust",
            public,
        ],
        Some(target),
    )
}

fn send(net: &TwoSubnets, min_receivers: &str, key: &Path, source: &Path) -> std::process::Child {
    spawn_agent(
        &net.sender,
        &[
            "send",
            "--interface",
            "eth0",
            "--min-receivers",
            min_receivers,
            "--start-timeout",
            "120",
            "--rate",
            "200",
            "--no-compress",
            "--relay-port",
            RELAY_PORT,
            "--key",
            key.to_str().unwrap(),
        ],
        Some(source),
    )
}

#[test]
fn relay_without_multicast_routing() {
    let net = two_subnets("relay_no_mroute", 2, 3);
    let dir = net.lab.dir.clone();
    let source = dir.join("source.img");
    let size_mib = 24;
    make_image(&source, size_mib, 11);
    let image_size = (size_mib << 20) as u64;
    let key = dir.join("sender.key");
    let public = make_key(&key);
    let far_targets: Vec<PathBuf> = (1..=3).map(|i| dir.join(format!("far{i}.img"))).collect();
    for target in &far_targets {
        make_image(target, size_mib, 99);
    }
    let sender = send(&net, "3", &key, &source);

    // Without the relay the far receivers hear nothing: the router forwards no multicast.
    let before_far = router_counter(&net.router, "r-far", "tx_bytes");
    let unrelayed: Vec<_> = net
        .far
        .iter()
        .zip(&far_targets)
        .enumerate()
        .map(|(i, (ns, t))| receive(ns, &format!("far{}", i + 1), "5", &public, t))
        .collect();
    for (i, child) in unrelayed.into_iter().enumerate() {
        let out = wait(child, &format!("far receiver {} without a relay", i + 1));
        assert!(
            !out.status.success(),
            "far receiver {} succeeded without a relay",
            i + 1
        );
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("no sender announced a session within 5 s"),
            "{said}"
        );
    }
    let leaked = router_counter(&net.router, "r-far", "tx_bytes") - before_far;
    assert!(
        leaked < 64 << 10,
        "{leaked} bytes reached subnet B while only the sender announced"
    );
    let garbage = std::fs::read(&far_targets[0]).unwrap();

    // With the relay.
    let near_targets: Vec<PathBuf> = (1..=2).map(|i| dir.join(format!("near{i}.img"))).collect();
    let near_rx: Vec<_> = net
        .near
        .iter()
        .zip(&near_targets)
        .enumerate()
        .map(|(i, (ns, t))| receive(ns, &format!("near{}", i + 1), "120", &public, t))
        .collect();
    let far_rx: Vec<_> = net
        .far
        .iter()
        .zip(&far_targets)
        .enumerate()
        .map(|(i, (ns, t))| receive(ns, &format!("far{}", i + 1), "120", &public, t))
        .collect();
    let crossed_before = router_counter(&net.router, "r-far", "tx_bytes");
    let back_before = router_counter(&net.router, "r-near", "tx_bytes");
    let relay = spawn_agent(
        &net.relay,
        &[
            "relay",
            "--upstream",
            &format!("10.77.0.10:{RELAY_PORT}"),
            "--interface",
            "eth0",
            "--name",
            "relay-b",
            "--min-receivers",
            "3",
            "--start-timeout",
            "120",
            "--rate",
            "200",
            "--trust",
            &public,
        ],
        None,
    );
    let send_out = wait(sender, "sender");
    let relay_out = wait(relay, "relay");
    let near_out: Vec<_> = near_rx
        .into_iter()
        .enumerate()
        .map(|(i, c)| wait(c, &format!("near receiver {}", i + 1)))
        .collect();
    let far_out: Vec<_> = far_rx
        .into_iter()
        .enumerate()
        .map(|(i, c)| wait(c, &format!("far receiver {}", i + 1)))
        .collect();
    let crossed = router_counter(&net.router, "r-far", "tx_bytes") - crossed_before;
    let back = router_counter(&net.router, "r-near", "tx_bytes") - back_before;

    assert!(relay_out.status.success(), "the relay failed");
    assert!(send_out.status.success(), "the sender failed");
    let expected = std::fs::read(&source).unwrap();
    assert_ne!(garbage, expected);
    for (i, (out, target)) in near_out
        .iter()
        .chain(&far_out)
        .zip(near_targets.iter().chain(&far_targets))
        .enumerate()
    {
        assert!(out.status.success(), "receiver {} failed", i + 1);
        assert!(
            std::fs::read(target).unwrap() == expected,
            "{}'s copy differs from the source",
            target.display()
        );
    }
    // The sender's summary: two near receivers, the relay, and the relay's three receivers.
    let summary = String::from_utf8_lossy(&send_out.stdout);
    let relayed: Vec<&str> = summary
        .lines()
        .filter(|l| l.trim_start().starts_with("via relay-b"))
        .collect();
    assert_eq!(relayed.len(), 3, "{summary}");
    assert!(relayed.iter().all(|l| l.ends_with("verified")), "{summary}");
    assert!(summary.contains("relayed: its copy verified"), "{summary}");
    for name in ["near1", "near2", "far1", "far2", "far3"] {
        assert!(
            summary.contains(name),
            "{name} missing from the summary:\n{summary}"
        );
    }
    // One copy crossed the router (each far receiver served by unicast would be three).
    eprintln!(
        "router: {crossed} bytes onto subnet B for an image of {image_size} bytes ({:.3}x), {back} bytes back",
        crossed as f64 / image_size as f64
    );
    assert!(
        crossed * 10 <= image_size * 13,
        "{crossed} bytes crossed the router for {image_size} bytes of data"
    );
    assert!(
        crossed >= image_size,
        "only {crossed} bytes crossed: the data did not?"
    );
    drop(net);
}

#[test]
fn a_relay_that_alters_a_chunk_never_makes_a_far_receiver_verify() {
    let net = two_subnets("relay_hostile", 0, 2);
    let dir = net.lab.dir.clone();
    let source = dir.join("source.img");
    make_image(&source, 8, 5);
    let key = dir.join("sender.key");
    let public = make_key(&key);
    let targets: Vec<PathBuf> = (1..=2).map(|i| dir.join(format!("far{i}.img"))).collect();
    let sender = send(&net, "1", &key, &source);
    let far_rx: Vec<_> = net
        .far
        .iter()
        .zip(&targets)
        .enumerate()
        .map(|(i, (ns, t))| receive(ns, &format!("far{}", i + 1), "120", &public, t))
        .collect();
    // The hostile relay: the real relay code in the relay's namespace, flipping a byte of
    // chunk 3 after checking it and before serving it.
    let netns = Path::new("/run/netns").join(&net.relay);
    let trust =
        diskcast_proto::trust::Trust::Keys(diskcast_proto::trust::parse_key_list(&public).unwrap());
    let relay = std::thread::spawn(move || {
        let namespace = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let opts = diskcast_transport::relay::RelayOptions {
            interface: Some("eth0".into()),
            group: diskcast_proto::wire::DEFAULT_GROUP,
            port: diskcast_proto::wire::DEFAULT_PORT,
            ttl: 1,
            sender: format!("10.77.0.10:{RELAY_PORT}").parse().unwrap(),
            trust,
            id: 0x4e71,
            name: "evil-relay".into(),
            min_receivers: 2,
            start_timeout: Some(Duration::from_secs(120)),
            max_rate: diskcast_proto::units::Rate::from_mbps(200.0),
            receiver_timeout: Duration::from_secs(30),
            sender_timeout: Duration::from_secs(30),
            wait_timeout: Some(Duration::from_secs(120)),
            spool_dir: std::env::temp_dir(),
        };
        let mut alter = |chunk: u32, bytes: &mut Vec<u8>| {
            if chunk == 3 {
                bytes[100] ^= 0x5a;
            }
        };
        diskcast_transport::relay::run_altering(&opts, &mut alter, |_| {}).unwrap()
    });
    let send_out = wait(sender, "sender");
    let relay_summary = relay.join().unwrap();
    eprintln!("{}", diskcast_transport::relay::render(&relay_summary));
    let expected = std::fs::read(&source).unwrap();
    for (i, (child, target)) in far_rx.into_iter().zip(&targets).enumerate() {
        let out = wait(child, &format!("far receiver {}", i + 1));
        assert!(
            !out.status.success(),
            "far receiver {} reported success",
            i + 1
        );
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("does not match its manifest"), "{said}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("copy verified"));
        assert!(std::fs::read(target).unwrap() != expected);
    }
    // The relay's own copy was fine; its receivers' failures reach the sender, which fails.
    assert!(relay_summary.upstream.is_ok());
    assert!(relay_summary.result().is_err());
    assert!(!send_out.status.success(), "the sender reported success");
    let summary = String::from_utf8_lossy(&send_out.stdout);
    let relayed: Vec<&str> = summary
        .lines()
        .filter(|l| l.trim_start().starts_with("via evil-relay"))
        .collect();
    assert_eq!(relayed.len(), 2, "{summary}");
    assert!(relayed.iter().all(|l| l.contains("FAILED")), "{summary}");
    drop(net);
}
