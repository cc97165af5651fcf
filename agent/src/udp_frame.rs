//! IPv4 + UDP headers for the raw-socket DHCP client: the kernel gives and takes whole IP packets
//! on an `AF_PACKET`/`SOCK_DGRAM` socket before the interface has an address.

use std::net::Ipv4Addr;

const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const PROTO_UDP: u8 = 17;

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
    /// Parses an IPv4 packet; anything that is not a whole, unfragmented UDP datagram is `None`.
    pub fn parse(packet: &'a [u8]) -> Option<Self> {
        let version_ihl = *packet.first()?;
        let header_len = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || header_len < IPV4_HEADER || packet.len() < header_len {
            return None;
        }
        let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        let fragment = u16::from_be_bytes([packet[6], packet[7]]);
        let more_fragments_or_offset = fragment & 0x3fff;
        if packet[9] != PROTO_UDP
            || more_fragments_or_offset != 0
            || total_len < header_len + UDP_HEADER
            || total_len > packet.len()
            || checksum(&packet[..header_len]) != 0
        {
            return None;
        }
        let udp = &packet[header_len..total_len];
        let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        if udp_len < UDP_HEADER || udp_len > udp.len() {
            return None;
        }
        Some(Self {
            src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
            dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
            src_port: u16::from_be_bytes([udp[0], udp[1]]),
            dst_port: u16::from_be_bytes([udp[2], udp[3]]),
            payload: &udp[UDP_HEADER..udp_len],
        })
    }

    /// Emits the datagram as an IPv4 packet with valid header and UDP checksums.
    pub fn emit(&self) -> Vec<u8> {
        let udp_len = UDP_HEADER + self.payload.len();
        let total = IPV4_HEADER + udp_len;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&[0x45, 0x10]);
        out.extend_from_slice(&(total as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0]);
        out.extend_from_slice(&self.src.octets());
        out.extend_from_slice(&self.dst.octets());
        let header_sum = checksum(&out[..IPV4_HEADER]);
        out[10..12].copy_from_slice(&header_sum.to_be_bytes());

        out.extend_from_slice(&self.src_port.to_be_bytes());
        out.extend_from_slice(&self.dst_port.to_be_bytes());
        out.extend_from_slice(&(udp_len as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(self.payload);

        let mut pseudo = Vec::with_capacity(12 + udp_len);
        pseudo.extend_from_slice(&self.src.octets());
        pseudo.extend_from_slice(&self.dst.octets());
        pseudo.extend_from_slice(&[0, PROTO_UDP]);
        pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
        pseudo.extend_from_slice(&out[IPV4_HEADER..]);
        let udp_sum = match checksum(&pseudo) {
            0 => 0xffff,
            sum => sum,
        };
        out[IPV4_HEADER + 6..IPV4_HEADER + 8].copy_from_slice(&udp_sum.to_be_bytes());
        out
    }
}

/// The Internet checksum (RFC 1071); zero when computed over data that includes a valid checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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
    }
}
