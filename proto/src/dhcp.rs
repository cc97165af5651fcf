//! Sans-IO DHCPv4 client (RFC 2131): INIT → SELECTING → REQUESTING → BOUND → RENEWING.
//!
//! The client never touches a socket or a clock. The caller feeds it received DHCP payloads and
//! the current time through [`DhcpClient::handle`], sends whatever [`Output::transmit`] holds as a
//! broadcast from port 68 to port 67, applies [`Output::event`] to the interface, and calls again
//! at [`Output::wakeup`] at the latest.
//!
//! Renewals are broadcast with `ciaddr` set (the REBINDING form): the agent sends raw frames with no
//! ARP, and every server answers that form.

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Decodes a DHCP message from untrusted bytes. dhcproto has assertions that malformed options
/// can trip (found by this project's garbage tests), so a panic in it counts as a malformed packet.
///
/// A hardware address length over the 16 bytes `chaddr` holds is refused here: dhcproto decodes
/// it, and its `chaddr()` accessor then slices out of bounds, a panic in every caller (found by
/// the dhcp_client fuzz target).
pub fn decode_message(bytes: &[u8]) -> Option<Message> {
    const HLEN_AT: usize = 2;
    const CHADDR_LEN: u8 = 16;
    if bytes.get(HLEN_AT).is_some_and(|&hlen| hlen > CHADDR_LEN)
        || has_option_of_impossible_length(bytes)
    {
        return None;
    }
    IN_GUARDED_DECODE.with(|flag| flag.set(true));
    let msg = std::panic::catch_unwind(|| Message::from_bytes(bytes).ok())
        .ok()
        .flatten();
    IN_GUARDED_DECODE.with(|flag| flag.set(false));
    msg
}

/// Options whose length dhcproto only checks with `debug_assert!`: with assertions on it panics
/// (caught below), without them it reads past the option and may accept the packet. Either way the
/// packet is malformed, in every build: (code, smallest length, largest length).
const LENGTH_CHECKED_OPTIONS: [(u8, u8, u8); 8] = [
    (80, 0, 0),    // rapid commit
    (81, 3, 255),  // client FQDN: flags and two rcodes, then the name
    (94, 3, 3),    // client network interface
    (151, 1, 255), // bulk leasequery status code
    (152, 4, 4),   // bulk leasequery times
    (153, 4, 4),
    (154, 4, 4),
    (155, 4, 4),
];

/// Walks the options field (after the fixed header and the magic cookie) for one of
/// [`LENGTH_CHECKED_OPTIONS`] with a length outside its bounds. Anything else, truncation
/// included, is left to dhcproto's decoder.
fn has_option_of_impossible_length(bytes: &[u8]) -> bool {
    const OPTIONS_START: usize = 240;
    let mut at = OPTIONS_START;
    while let Some(&code) = bytes.get(at) {
        match code {
            0 => at += 1,
            255 => return false,
            _ => {
                let Some(&len) = bytes.get(at + 1) else {
                    return false;
                };
                let out_of_bounds = LENGTH_CHECKED_OPTIONS
                    .iter()
                    .any(|&(c, min, max)| c == code && !(min..=max).contains(&len));
                if out_of_bounds {
                    return true;
                }
                at += 2 + usize::from(len);
            }
        }
    }
    false
}

thread_local! {
    static IN_GUARDED_DECODE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True inside [`decode_message`]: panic hooks use it to stay quiet about a panic that is caught
/// and counted as a malformed packet.
pub fn panic_is_guarded() -> bool {
    IN_GUARDED_DECODE.with(|flag| flag.get())
}

/// Vendor class the agent sends, so the bootserver never hands it a boot file.
pub const AGENT_VENDOR_CLASS: &[u8] = b"diskcast-agent";

const FIRST_RETRANSMIT: Duration = Duration::from_secs(1);
const MAX_RETRANSMIT: Duration = Duration::from_secs(8);
/// Offers and requests left unanswered this many times send the client back to DISCOVER.
const REQUEST_ATTEMPTS: u32 = 4;

/// An address configuration granted by a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub lease_time: Duration,
    pub renew_after: Duration,
    pub rebind_after: Duration,
}

impl Lease {
    pub fn prefix_len(&self) -> u8 {
        u32::from(self.netmask).count_ones() as u8
    }
}

/// What the caller must do to the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Configure (or keep) this address; sent on the first ACK and on every renewal.
    Bound(Lease),
    /// The lease expired without renewal: remove the address.
    Expired,
}

#[derive(Debug, Default)]
pub struct Output {
    /// A DHCP payload to broadcast from 0.0.0.0:68 (or from the leased address when renewing).
    pub transmit: Option<Vec<u8>>,
    pub event: Option<Event>,
    /// When to call [`DhcpClient::handle`] again if nothing arrives.
    pub wakeup: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Selecting,
    Requesting {
        offered: Ipv4Addr,
        server: Ipv4Addr,
        attempts: u32,
    },
    Bound {
        lease: Lease,
        since: Instant,
    },
    Renewing {
        lease: Lease,
        since: Instant,
    },
}

/// Counters of packets the client dropped, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub malformed: u64,
    pub unrelated: u64,
}

#[derive(Debug)]
pub struct DhcpClient {
    mac: [u8; 6],
    xid: u32,
    state: State,
    next_send: Instant,
    retransmit: Duration,
    started: Instant,
    pub dropped: Dropped,
}

impl DhcpClient {
    /// `xid_seed` varies the transaction ids between machines and boots (the MAC and a clock do).
    pub fn new(mac: [u8; 6], xid_seed: u32, now: Instant) -> Self {
        Self {
            mac,
            xid: xid_seed,
            state: State::Selecting,
            next_send: now,
            retransmit: FIRST_RETRANSMIT,
            started: now,
            dropped: Dropped::default(),
        }
    }

    pub fn lease(&self) -> Option<&Lease> {
        match &self.state {
            State::Bound { lease, .. } | State::Renewing { lease, .. } => Some(lease),
            _ => None,
        }
    }

    pub fn xid(&self) -> u32 {
        self.xid
    }

    /// Feeds one received DHCP payload (or none, on a timer) and returns what to do.
    pub fn handle(&mut self, packet: Option<&[u8]>, now: Instant) -> Output {
        let mut out = Output::default();
        if let Some(bytes) = packet {
            out.event = self.receive(bytes, now);
        }
        self.on_time(now, &mut out);
        out
    }

    fn receive(&mut self, bytes: &[u8], now: Instant) -> Option<Event> {
        let Some(msg) = decode_message(bytes) else {
            self.dropped.malformed += 1;
            return None;
        };
        if msg.opcode() != Opcode::BootReply
            || msg.xid() != self.xid
            || msg.chaddr().get(..6) != Some(&self.mac[..])
        {
            self.dropped.unrelated += 1;
            return None;
        }
        let server = match msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => *ip,
            _ => {
                self.dropped.malformed += 1;
                return None;
            }
        };
        match (msg.opts().msg_type(), &self.state) {
            (Some(MessageType::Offer), State::Selecting) => {
                self.state = State::Requesting {
                    offered: msg.yiaddr(),
                    server,
                    attempts: 0,
                };
                self.send_now(now);
                None
            }
            (Some(MessageType::Ack), State::Requesting { .. } | State::Renewing { .. }) => {
                let lease = lease_from(&msg, server)?;
                self.state = State::Bound {
                    lease: lease.clone(),
                    since: now,
                };
                Some(Event::Bound(lease))
            }
            (Some(MessageType::Nak), State::Requesting { .. } | State::Renewing { .. }) => {
                let was_bound = matches!(self.state, State::Renewing { .. });
                self.restart(now);
                was_bound.then_some(Event::Expired)
            }
            _ => {
                self.dropped.unrelated += 1;
                None
            }
        }
    }

    fn on_time(&mut self, now: Instant, out: &mut Output) {
        match self.state.clone() {
            State::Bound { lease, since } => {
                let renew_at = since + lease.renew_after;
                if now < renew_at {
                    out.wakeup = Some(renew_at);
                    return;
                }
                self.state = State::Renewing { lease, since };
                self.xid = self.xid.wrapping_add(1);
                self.send_now(now);
            }
            State::Renewing { lease, since } if now >= since + lease.lease_time => {
                self.restart(now);
                out.event = Some(Event::Expired);
            }
            _ => {}
        }
        if now >= self.next_send {
            if let State::Requesting { attempts, .. } = &mut self.state {
                *attempts += 1;
                if *attempts > REQUEST_ATTEMPTS {
                    self.restart(now);
                }
            }
            out.transmit = Some(self.message());
            self.next_send = now + self.retransmit;
            self.retransmit = (self.retransmit * 2).min(MAX_RETRANSMIT);
        }
        let mut wakeup = self.next_send;
        if let State::Renewing { lease, since } = &self.state {
            wakeup = wakeup.min(*since + lease.lease_time);
        }
        out.wakeup = Some(wakeup);
    }

    fn send_now(&mut self, now: Instant) {
        self.next_send = now;
        self.retransmit = FIRST_RETRANSMIT;
    }

    fn restart(&mut self, now: Instant) {
        self.state = State::Selecting;
        self.xid = self.xid.wrapping_add(1);
        self.send_now(now);
    }

    fn message(&self) -> Vec<u8> {
        let unspecified = Ipv4Addr::UNSPECIFIED;
        let mut msg = Message::new_with_id(
            self.xid,
            unspecified,
            unspecified,
            unspecified,
            unspecified,
            &self.mac,
        );
        msg.set_opcode(Opcode::BootRequest)
            .set_htype(HType::Eth)
            .set_flags(Flags::default().set_broadcast());
        let secs = self
            .next_send
            .saturating_duration_since(self.started)
            .as_secs();
        msg.set_secs(u16::try_from(secs).unwrap_or(u16::MAX));
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::ClassIdentifier(AGENT_VENDOR_CLASS.to_vec()));
        opts.insert(DhcpOption::MaxMessageSize(1500));
        opts.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::AddressLeaseTime,
            OptionCode::Renewal,
            OptionCode::Rebinding,
        ]));
        match &self.state {
            State::Selecting => {
                opts.insert(DhcpOption::MessageType(MessageType::Discover));
            }
            State::Requesting {
                offered, server, ..
            } => {
                opts.insert(DhcpOption::MessageType(MessageType::Request));
                opts.insert(DhcpOption::RequestedIpAddress(*offered));
                opts.insert(DhcpOption::ServerIdentifier(*server));
            }
            State::Bound { lease, .. } | State::Renewing { lease, .. } => {
                opts.insert(DhcpOption::MessageType(MessageType::Request));
                msg.set_ciaddr(lease.address);
            }
        }
        // Encoding a message we built ourselves cannot fail: every option is well-formed.
        msg.to_vec().unwrap_or_default()
    }
}

fn lease_from(msg: &Message, server: Ipv4Addr) -> Option<Lease> {
    let opts = msg.opts();
    let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(secs)) => *secs,
        _ => 3600,
    };
    let lease_time = Duration::from_secs(u64::from(lease_secs));
    let seconds = |code, default: Duration| match opts.get(code) {
        Some(DhcpOption::Renewal(s)) | Some(DhcpOption::Rebinding(s)) => {
            Duration::from_secs(u64::from(*s))
        }
        _ => default,
    };
    let netmask = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => *mask,
        _ => Ipv4Addr::new(255, 255, 255, 0),
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(routers)) => routers.first().copied(),
        _ => None,
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(servers)) => servers.clone(),
        _ => Vec::new(),
    };
    if msg.yiaddr().is_unspecified() {
        return None;
    }
    Some(Lease {
        address: msg.yiaddr(),
        netmask,
        router,
        server,
        dns,
        lease_time,
        renew_after: seconds(OptionCode::Renewal, lease_time / 2),
        rebind_after: seconds(OptionCode::Rebinding, lease_time * 7 / 8),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const OFFERED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

    fn reply(request: &[u8], kind: MessageType, lease_secs: u32) -> Vec<u8> {
        let req = Message::from_bytes(request).unwrap();
        let mut msg = Message::new_with_id(
            req.xid(),
            Ipv4Addr::UNSPECIFIED,
            OFFERED,
            SERVER,
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        msg.set_opcode(Opcode::BootReply);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(SERVER));
        opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        opts.insert(DhcpOption::Router(vec![SERVER]));
        opts.insert(DhcpOption::AddressLeaseTime(lease_secs));
        msg.to_vec().unwrap()
    }

    fn msg_type(bytes: &[u8]) -> MessageType {
        Message::from_bytes(bytes)
            .unwrap()
            .opts()
            .msg_type()
            .unwrap()
    }

    #[test]
    fn discover_offer_request_ack_then_renew() {
        let t0 = Instant::now();
        let mut client = DhcpClient::new(MAC, 7, t0);
        let out = client.handle(None, t0);
        let discover = out.transmit.unwrap();
        assert_eq!(msg_type(&discover), MessageType::Discover);

        let out = client.handle(Some(&reply(&discover, MessageType::Offer, 100)), t0);
        let request = out.transmit.unwrap();
        assert_eq!(msg_type(&request), MessageType::Request);
        let parsed = Message::from_bytes(&request).unwrap();
        assert_eq!(
            parsed.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(OFFERED))
        );

        let out = client.handle(Some(&reply(&request, MessageType::Ack, 100)), t0);
        let Some(Event::Bound(lease)) = out.event else {
            panic!("expected a lease, got {:?}", out.event)
        };
        assert_eq!(lease.address, OFFERED);
        assert_eq!(lease.prefix_len(), 24);
        assert_eq!(lease.router, Some(SERVER));
        assert_eq!(out.wakeup, Some(t0 + Duration::from_secs(50)));
        assert!(out.transmit.is_none());

        // T1: the client renews with its address in ciaddr.
        let t1 = t0 + Duration::from_secs(50);
        let renew = client.handle(None, t1).transmit.unwrap();
        let parsed = Message::from_bytes(&renew).unwrap();
        assert_eq!(parsed.ciaddr(), OFFERED);
        let out = client.handle(Some(&reply(&renew, MessageType::Ack, 100)), t1);
        assert!(matches!(out.event, Some(Event::Bound(_))));
        assert_eq!(out.wakeup, Some(t1 + Duration::from_secs(50)));
    }

    #[test]
    fn retransmits_with_backoff_and_expires_unrenewed_lease() {
        let t0 = Instant::now();
        let mut client = DhcpClient::new(MAC, 1, t0);
        let first = client.handle(None, t0);
        assert!(first.transmit.is_some());
        assert!(client
            .handle(None, t0 + Duration::from_millis(500))
            .transmit
            .is_none());
        assert!(client
            .handle(None, t0 + Duration::from_secs(1))
            .transmit
            .is_some());
        let out = client.handle(None, t0 + Duration::from_secs(2));
        assert!(out.transmit.is_none());
        assert_eq!(out.wakeup, Some(t0 + Duration::from_secs(3)));

        let t = t0 + Duration::from_secs(3);
        let discover = client.handle(None, t).transmit.unwrap();
        let request = client
            .handle(Some(&reply(&discover, MessageType::Offer, 10)), t)
            .transmit
            .unwrap();
        client.handle(Some(&reply(&request, MessageType::Ack, 10)), t);
        // Nobody answers the renewals: the lease ends and the client starts over.
        let mut now = t;
        let mut expired = false;
        for _ in 0..100 {
            now += Duration::from_millis(500);
            if client.handle(None, now).event == Some(Event::Expired) {
                expired = true;
                break;
            }
        }
        assert!(expired);
        assert!(now >= t + Duration::from_secs(10));
        assert!(client.lease().is_none());
    }

    #[test]
    fn foreign_and_garbage_packets_are_counted_and_dropped() {
        let t0 = Instant::now();
        let mut client = DhcpClient::new(MAC, 9, t0);
        let discover = client.handle(None, t0).transmit.unwrap();
        client.handle(Some(b"\x02\x01garbage"), t0);
        let mut other = Message::from_bytes(&reply(&discover, MessageType::Offer, 10)).unwrap();
        other.set_xid(12345);
        client.handle(Some(&other.to_vec().unwrap()), t0);
        assert_eq!(
            client.dropped,
            Dropped {
                malformed: 1,
                unrelated: 1
            }
        );
        assert!(client.lease().is_none());
    }

    /// Found by the dhcp_client and dhcp_server fuzz targets: dhcproto asserts the length of some
    /// options (here the bulk-leasequery time, option 153, with length 0) instead of refusing them;
    /// in a release build it would read on past the option. Malformed in every build.
    #[test]
    fn an_option_whose_length_dhcproto_asserts_is_a_malformed_packet() {
        let t0 = Instant::now();
        let mut client = DhcpClient::new(MAC, 9, t0);
        let discover = client.handle(None, t0).transmit.unwrap();
        let mut offer = reply(&discover, MessageType::Offer, 10);
        let end = offer.iter().rposition(|&b| b == 255).unwrap();
        offer.splice(end..end, [153, 0]);
        assert!(decode_message(&offer).is_none());
        client.handle(Some(&offer), t0);
        assert_eq!(client.dropped.malformed, 1);
        assert!(client.lease().is_none());
    }

    /// Found by the dhcp_client fuzz target: `chaddr()` panicked on a message claiming a
    /// hardware address longer than the 16-byte field.
    #[test]
    fn a_hardware_address_longer_than_its_field_is_a_malformed_packet() {
        let t0 = Instant::now();
        let mut client = DhcpClient::new(MAC, 9, t0);
        let discover = client.handle(None, t0).transmit.unwrap();
        let mut offer = reply(&discover, MessageType::Offer, 10);
        offer[2] = 173;
        assert!(decode_message(&offer).is_none());
        client.handle(Some(&offer), t0);
        assert_eq!(client.dropped.malformed, 1);
        assert!(client.lease().is_none());
    }

    #[test]
    fn nak_sends_the_client_back_to_discover() {
        let t0 = Instant::now();
        let mut client = DhcpClient::new(MAC, 3, t0);
        let discover = client.handle(None, t0).transmit.unwrap();
        let request = client
            .handle(Some(&reply(&discover, MessageType::Offer, 10)), t0)
            .transmit
            .unwrap();
        let out = client.handle(Some(&reply(&request, MessageType::Nak, 10)), t0);
        assert_eq!(msg_type(&out.transmit.unwrap()), MessageType::Discover);
    }
}
