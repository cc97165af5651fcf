//! Wake-on-LAN: the magic packet (6 × 0xff, then the MAC 16 times) broadcast on the lab's
//! interface, a few times, since nothing confirms it arrived.

use super::LabError;
use diskcast_proto::mac::MacAddr;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

/// The UDP port magic packets go to ("discard"; the NIC looks at the payload only).
pub const WAKE_PORT: u16 = 9;
const REPEATS: usize = 3;

pub fn magic_packet(mac: MacAddr) -> [u8; 102] {
    let mut packet = [0xffu8; 102];
    for copy in packet[6..].chunks_mut(6) {
        copy.copy_from_slice(&mac.octets());
    }
    packet
}

/// Broadcasts magic packets for `macs` on `interface`.
pub fn wake(interface: &str, macs: &[MacAddr]) -> Result<(), LabError> {
    let err = |source| LabError::Wake {
        interface: interface.into(),
        source,
    };
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).map_err(err)?;
    socket.set_broadcast(true).map_err(err)?;
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(interface),
    )
    .map_err(|e| err(e.into()))?;
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, WAKE_PORT);
    for round in 0..REPEATS {
        for mac in macs {
            socket.send_to(&magic_packet(*mac), to).map_err(err)?;
        }
        if round + 1 < REPEATS {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    log::info!(
        "lab: woke {} machine(s) on {interface} ({} magic packets each)",
        macs.len(),
        REPEATS
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_magic_packet_is_six_ff_then_the_mac_sixteen_times() {
        let mac: MacAddr = "52:54:00:dc:00:10".parse().unwrap();
        let packet = magic_packet(mac);
        assert_eq!(&packet[..6], &[0xff; 6]);
        for copy in packet[6..].chunks(6) {
            assert_eq!(copy, &mac.octets());
        }
    }
}
