//! IPv4 + UDP headers for the raw-socket DHCP client: the kernel gives and takes whole IP packets
//! on an `AF_PACKET`/`SOCK_DGRAM` socket before the interface has an address.

//!
//! The header layouts and checksums are pnet's (`pnet_packet`); this module only decides what the
//! DHCP client accepts: a whole, unfragmented IPv4/UDP datagram with valid checksums.

use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::{self, Ipv4Flags, Ipv4Packet, MutableIpv4Packet};
use pnet_packet::udp::{self, MutableUdpPacket, UdpPacket};
use std::net::Ipv4Addr;

const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

/// A parsed IPv4/UDP datagram borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

impl<'a> UdpDatagram<'a> {
    /// Parses an IPv4 packet; anything that is not a whole, unfragmented UDP datagram with valid
    /// checksums is `None`.
    pub fn parse(packet: &'a [u8]) -> Option<Self> {
        let ip = Ipv4Packet::new(packet)?;
        let header_len = usize::from(ip.get_header_length()) * 4;
        let total_len = usize::from(ip.get_total_length());
        if ip.get_version() != 4
            || header_len < IPV4_HEADER
            || ip.get_next_level_protocol() != IpNextHeaderProtocols::Udp
            || ip.get_flags() & Ipv4Flags::MoreFragments != 0
            || ip.get_fragment_offset() != 0
            || total_len < header_len + UDP_HEADER
            || total_len > packet.len()
            || ipv4::checksum(&ip) != ip.get_checksum()
        {
            return None;
        }
        let segment = &packet[header_len..total_len];
        let datagram = UdpPacket::new(segment)?;
        let udp_len = usize::from(datagram.get_length());
        if udp_len < UDP_HEADER || udp_len > segment.len() {
            return None;
        }
        let (src, dst) = (ip.get_source(), ip.get_destination());
        let sum = datagram.get_checksum();
        // A zero UDP checksum means "not computed"; a checksum that computes to zero is sent as
        // all ones (RFC 768).
        if sum != 0 {
            let computed = udp::ipv4_checksum(&UdpPacket::new(&segment[..udp_len])?, &src, &dst);
            if sum != if computed == 0 { 0xffff } else { computed } {
                return None;
            }
        }
        Some(Self {
            src,
            dst,
            src_port: datagram.get_source(),
            dst_port: datagram.get_destination(),
            payload: &segment[UDP_HEADER..udp_len],
        })
    }

    /// Emits the datagram as an IPv4 packet with valid header and UDP checksums.
    pub fn emit(&self) -> Vec<u8> {
        let udp_len = UDP_HEADER + self.payload.len();
        let mut out = vec![0u8; IPV4_HEADER + udp_len];
        if let Some(mut datagram) = MutableUdpPacket::new(&mut out[IPV4_HEADER..]) {
            datagram.set_source(self.src_port);
            datagram.set_destination(self.dst_port);
            datagram.set_length(udp_len as u16);
            datagram.set_payload(self.payload);
            let sum = udp::ipv4_checksum(&datagram.to_immutable(), &self.src, &self.dst);
            datagram.set_checksum(if sum == 0 { 0xffff } else { sum });
        }
        if let Some(mut ip) = MutableIpv4Packet::new(&mut out) {
            ip.set_version(4);
            ip.set_header_length((IPV4_HEADER / 4) as u8);
            ip.set_dscp(4);
            ip.set_total_length((IPV4_HEADER + udp_len) as u16);
            ip.set_flags(Ipv4Flags::DontFragment);
            ip.set_ttl(64);
            ip.set_next_level_protocol(IpNextHeaderProtocols::Udp);
            ip.set_source(self.src);
            ip.set_destination(self.dst);
            let sum = ipv4::checksum(&ip.to_immutable());
            ip.set_checksum(sum);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_then_parse_round_trips() {
        let datagram = UdpDatagram {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::BROADCAST,
            src_port: 68,
            dst_port: 67,
            payload: b"odd-length payload",
        };
        let bytes = datagram.emit();
        assert_eq!(UdpDatagram::parse(&bytes), Some(datagram));
    }

    /// Found by the udp_frame fuzz target: a datagram whose checksum computes to zero travels
    /// with 0xffff, and parse refused it (the DHCP client would have dropped such a reply).
    #[test]
    fn a_checksum_that_computes_to_zero_is_sent_as_all_ones_and_accepted() {
        let unchecked = [
            0x45, 0x00, 0x00, 0x24, 0x00, 0x00, 0x00, 0x00, 0x45, 0x11, 0x00, 0x00, 0x00, 0x2f,
            0x8b, 0x01, 0x00, 0x00, 0xea, 0x99, 0x00, 0xff, 0xff, 0xf8, 0x00, 0x0d, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x12, 0x89, 0x3b, 0x00, 0x0e,
        ];
        let datagram = UdpDatagram::parse(&unchecked).expect("a datagram without a UDP checksum");
        let emitted = datagram.emit();
        assert_eq!(
            &emitted[26..28],
            &[0xff, 0xff],
            "its checksum computes to zero"
        );
        assert_eq!(
            UdpDatagram::parse(&emitted).map(|d| d.payload),
            Some(datagram.payload)
        );
    }

    #[test]
    fn rejects_truncated_corrupt_and_fragmented_packets() {
        let datagram = UdpDatagram {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::BROADCAST,
            src_port: 67,
            dst_port: 68,
            payload: &[1, 2, 3, 4],
        };
        let bytes = datagram.emit();
        for len in 0..bytes.len() {
            assert_eq!(UdpDatagram::parse(&bytes[..len]), None, "length {len}");
        }
        let mut corrupt = bytes.clone();
        corrupt[12] ^= 1;
        assert_eq!(UdpDatagram::parse(&corrupt), None);
        let mut fragment = bytes.clone();
        fragment[6] = 0x20; // more fragments
        assert_eq!(UdpDatagram::parse(&fragment), None);
        let mut payload_flip = bytes.clone();
        *payload_flip.last_mut().unwrap() ^= 0x40;
        assert_eq!(UdpDatagram::parse(&payload_flip), None, "UDP checksum");
        let mut no_checksum = bytes.clone();
        no_checksum[26..28].copy_from_slice(&[0, 0]);
        assert_eq!(
            UdpDatagram::parse(&no_checksum).map(|d| d.payload),
            Some(&[1, 2, 3, 4][..]),
            "a zero UDP checksum is allowed"
        );
    }
}
