//! Wake-on-LAN on the wire: `bootserver task ... --wake` broadcasts magic packets on the lab's
//! interface, and another host on that LAN receives them (a process test, no QEMU).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{DhcpMode, Lab};
use nix::sched::{setns, CloneFlags};
use std::net::UdpSocket;
use std::sync::mpsc;
use std::time::Duration;

const MACS: [[u8; 6]; 2] = [
    [0x52, 0x54, 0x00, 0xdc, 0x00, 0x31],
    [0x52, 0x54, 0x00, 0xdc, 0x00, 0x32],
];

fn magic(mac: [u8; 6]) -> Vec<u8> {
    let mut packet = vec![0xff; 6];
    for _ in 0..16 {
        packet.extend_from_slice(&mac);
    }
    packet
}

#[test]
fn wake_broadcasts_magic_packets_on_the_lab_interface() {
    let mut lab = Lab::new("wake_on_lan");
    let watcher = lab.add_host("watch", "10.77.0.50/24");
    lab.bootserver_config(DhcpMode::Full, "");
    let (bound_tx, bound_rx) = mpsc::channel();
    let listener = std::thread::spawn(move || {
        // This thread alone moves into the watcher's namespace.
        let ns = std::fs::File::open(format!("/run/netns/{watcher}")).unwrap();
        setns(&ns, CloneFlags::CLONE_NEWNET).unwrap();
        let socket = UdpSocket::bind("0.0.0.0:9").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        bound_tx.send(()).unwrap();
        let mut packets = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok((len, _)) = socket.recv_from(&mut buf) {
            packets.push(buf[..len].to_vec());
        }
        packets
    });
    bound_rx.recv().unwrap();
    let macs = MACS
        .iter()
        .map(|m| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
        .collect::<Vec<_>>()
        .join(",");
    let said = lab.task(&["inventory", "--to", &macs, "--wake"]);
    eprintln!("{said}");
    let packets = listener.join().unwrap();
    for mac in MACS {
        let seen = packets.iter().filter(|p| **p == magic(mac)).count();
        assert!(seen >= 3, "{seen} magic packets for {mac:02x?}");
    }
    assert!(
        packets.iter().all(|p| MACS.iter().any(|&m| *p == magic(m))),
        "something else arrived on port 9: {packets:02x?}"
    );
}
