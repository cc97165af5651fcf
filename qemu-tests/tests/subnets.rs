//! Labs on several subnets, in QEMU: a machine behind a router that relays DHCP (Debian's
//! `dhcrelay`) network-boots from the server into the agent with an address of its own subnet,
//! and a deploy session with TTL 4 reaches it through the router (which forwards the image's
//! multicast with `smcroute`) and a machine on the server's own link alike.
//!
//! One lab run covers both `relayed_dhcp_boot` and `routed_multicast_deploy` of the issue: the
//! relayed boot is the first half of the routed deploy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{make_source_disk, DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT};
use std::time::Duration;

const NEAR: &str = "52:54:00:dc:00:21";
const FAR: &str = "52:54:00:dc:00:22";

/// The far subnet: its pool, its router, and how far multicast must travel to reach it.
const FAR_SUBNET: &str =
    "\n[[subnet]]\nnetwork = \"10.78.0.0/24\"\nrange_start = \"10.78.0.100\"\n\
    range_end = \"10.78.0.149\"\nrouter = \"10.78.0.1\"\nttl = 4\n";

#[test]
fn relayed_dhcp_boot_and_routed_multicast_deploy() {
    let mut lab = Lab::new("relayed_routed");
    lab.add_subnet("br1");
    let router = lab.add_router("router", "br1", "10.77.0.254/24", "10.78.0.1/24");
    let server = lab.server_ip;
    let relay = lab.start_dhcp_relay(&router, server);
    // Every group image sessions may get (239.255.78.0/23) is forwarded to the far side.
    lab.start_multicast_router(&router, "239.255.78.0/23");
    let golden = lab.dir.join("golden.img");
    make_source_disk(&golden, 64);
    lab.start_bootserver(DhcpMode::Full, FAR_SUBNET);
    lab.bootserver_cli(&["images", "import", &golden.display().to_string(), "golden"]);
    lab.task(&["deploy", "golden", "--to", &format!("{NEAR},{FAR}")]);

    let spec = |name: &str, suffix: u8| {
        VmSpec::new(name, Firmware::Bios, "virtio-net-pci", suffix).disk(
            64,
            &name.to_uppercase(),
            "virtio-blk-pci",
        )
    };
    let near = lab.boot_vm(spec("near", 0x21));
    let far = lab.boot_vm_on(spec("far", 0x22), "br1");

    // relayed_dhcp_boot: the far machine booted through the relay into the agent, with an
    // address from its own subnet's pool.
    let ready = lab.wait_ready(far);
    assert_eq!(ready.get("role"), "slave");
    let address: std::net::Ipv4Addr = ready.get("address").parse().unwrap();
    assert!(
        (100..=149).contains(&address.octets()[3]) && address.octets()[..3] == [10, 78, 0],
        "the far machine got {address}, not an address of 10.78.0.100-149"
    );
    let near_ready = lab.wait_ready(near);
    assert!(near_ready.get("address").starts_with("10.77.0."));
    let log = lab.bootserver_log(0);
    assert!(
        log.contains("dhcp: subnet 10.78.0.0/24 via br0 (behind a router"),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(FAR) && l.contains("via relay 10.78.0.1") && l.contains("Ack")),
        "no relayed ACK for {FAR} in the server's log"
    );
    assert!(
        !relay.text().is_empty(),
        "dhcrelay said nothing: did it run?"
    );

    // routed_multicast_deploy: one session, TTL 4 from the far subnet's entry, reaches both.
    lab.expect_done_and_off(
        &[near, far],
        "DISKCAST-SLAVE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    for (vm, same) in lab.first_disks_equal(&["near", "far"], &golden) {
        assert!(same, "{vm}'s disk is not the image");
    }
    // One session served both machines: started before either had booted, it already had the
    // far subnet's TTL (a second session would mean the first one never reached the far side).
    let log = lab.bootserver_log(0);
    let sessions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("lab: session for image \"golden\""))
        .collect();
    assert_eq!(sessions.len(), 1, "{log}");
    assert!(
        sessions[0].contains("via br0 with TTL 4"),
        "{}",
        sessions[0]
    );
    assert!(!log.contains("sits behind a router"), "{log}");
    let tasks: serde_json::Value =
        serde_json::from_str(&lab.api_get("/api/v1/tasks?all=true")).unwrap();
    for mac in [NEAR, FAR] {
        let task = tasks
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["mac"] == mac)
            .unwrap_or_else(|| panic!("no task for {mac}: {tasks:#}"));
        assert_eq!(task["state"], "verified", "{task:#}");
    }
}

/// A relayed DHCPDISCOVER by hand (RFC 2131 section 2): a PXE client `mac` behind relay `giaddr`.
fn relayed_discover(xid: u32, mac: [u8; 6], giaddr: std::net::Ipv4Addr) -> Vec<u8> {
    let mut packet = vec![0u8; 236];
    packet[..4].copy_from_slice(&[1, 1, 6, 1]); // BOOTREQUEST, Ethernet, 6-byte address, one hop
    packet[4..8].copy_from_slice(&xid.to_be_bytes());
    packet[24..28].copy_from_slice(&giaddr.octets());
    packet[28..34].copy_from_slice(&mac);
    packet.extend_from_slice(&[99, 130, 83, 99, 53, 1, 1]);
    let class = b"PXEClient:Arch:00000:UNDI:002001";
    packet.extend_from_slice(&[60, class.len() as u8]);
    packet.extend_from_slice(class);
    packet.extend_from_slice(&[93, 2, 0, 0, 255]);
    packet.resize(300, 0);
    packet
}

/// Bad input (process test, no VM): a relayed request whose relay is in no configured subnet is
/// logged, counted and left unanswered — no offer, no lease from another pool — while the same
/// request relayed from the far subnet is answered from its pool, unicast to the relay.
#[test]
fn a_relay_outside_every_subnet_is_logged_and_ignored() {
    use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
    let mut lab = Lab::new("unknown_relay");
    lab.add_subnet("br1");
    let router = lab.add_router("router", "br1", "10.77.0.254/24", "10.78.0.1/24");
    lab.start_bootserver(DhcpMode::Full, FAR_SUBNET);
    let server: Ipv4Addr = lab.server_ip.parse().unwrap();
    // The relay's side, as dhcrelay has it: port 67 in the router's namespace.
    let netns = std::path::Path::new("/run/netns").join(&router);
    let relay = std::thread::spawn(move || {
        let namespace = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        UdpSocket::bind("0.0.0.0:67").unwrap()
    })
    .join()
    .unwrap();
    relay
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let to = SocketAddrV4::new(server, 67);
    let stranger = [0x52, 0x54, 0, 0xdc, 0, 0x31];
    relay
        .send_to(
            &relayed_discover(0xbad, stranger, Ipv4Addr::new(192, 168, 5, 1)),
            to,
        )
        .unwrap();
    lab.bootservers_console(0)
        .wait_for(
            "relayed by 192.168.5.1, which is in no configured subnet",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("the stranger's request was not logged: {e}"));
    let status: serde_json::Value = serde_json::from_str(&lab.api_get("/status")).unwrap();
    assert_eq!(status["dhcp"]["unknown_relay"], 1, "{status:#}");
    assert_eq!(status["dhcp"]["offers"], 0, "{status:#}");

    // The far subnet's relay: answered, and the first datagram the relay gets is this answer
    // (an answer to the stranger would have been sent first).
    let known = [0x52, 0x54, 0, 0xdc, 0, 0x32];
    relay
        .send_to(
            &relayed_discover(0x600d, known, Ipv4Addr::new(10, 78, 0, 1)),
            to,
        )
        .unwrap();
    let mut reply = [0u8; 1500];
    let (len, from) = relay
        .recv_from(&mut reply)
        .expect("no offer for the far subnet's machine reached its relay");
    assert!(len > 240, "short reply from {from}");
    assert_eq!(reply[0], 2, "not a BOOTREPLY");
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0x600d);
    let offered = Ipv4Addr::new(reply[16], reply[17], reply[18], reply[19]);
    assert!(
        offered.octets()[..3] == [10, 78, 0] && (100..=149).contains(&offered.octets()[3]),
        "offered {offered}, not an address of the far subnet's pool"
    );
    let status: serde_json::Value = serde_json::from_str(&lab.api_get("/status")).unwrap();
    assert_eq!(status["dhcp"]["unknown_relay"], 1, "{status:#}");
    assert_eq!(status["dhcp"]["offers"], 1, "{status:#}");
    let leases = status["leases"].to_string();
    assert!(
        !leases.contains("dc:00:31"),
        "the stranger got a lease: {leases}"
    );
}
