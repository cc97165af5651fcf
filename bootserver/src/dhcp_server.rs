//! Sans-IO DHCP server for booting: full mode (addresses plus boot information) and proxyDHCP
//! mode (boot information only, beside the lab's own DHCP server, on ports 67 and 4011).
//!
//! [`DhcpServer::handle_on`] takes one received payload, where it came from, the interface it
//! arrived on and the time, and returns the reply to send and whether the lease table changed.
//! Sockets and the lease file stay outside.
//!
//! Several subnets ([`Site`]s): a request relayed by a router (`giaddr` set, RFC 2131 4.1) is
//! answered from the pool of the subnet `giaddr` is in, unicast to the relay's port 67, with the
//! relay's option 82 copied back (RFC 3046 2.2); a request from the server's own link from the
//! pool of the subnet on the interface it arrived on. A relayed request from a subnet nobody
//! configured is logged and ignored, never answered from another pool.

use crate::classify::{classify, Arch, ClientKind};
use crate::config::{DhcpMode, UefiChain, UefiLoader};
use crate::leases::{Lease, LeaseTable};
use crate::subnets::Site;
use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode, UnknownOption};
use dhcproto::Encodable;
use diskcast_proto::dhcp::decode_message;
use diskcast_proto::mac::MacAddr;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

/// Decides per machine what a UEFI PXE client boots (iPXE or the signed chain). The edge backs it
/// with the config and the registry (a machine's group); tests with a fixed answer.
#[derive(Clone)]
pub struct ChainChooser(Arc<dyn Fn(MacAddr) -> UefiChain + Send + Sync>);

impl ChainChooser {
    pub fn new(choose: impl Fn(MacAddr) -> UefiChain + Send + Sync + 'static) -> Self {
        Self(Arc::new(choose))
    }

    /// The same chain for every machine.
    pub fn always(chain: UefiChain) -> Self {
        Self::new(move |_| chain)
    }

    pub fn choose(&self, mac: MacAddr) -> UefiChain {
        (self.0)(mac)
    }
}

impl Default for ChainChooser {
    fn default() -> Self {
        Self::always(UefiChain::Ipxe)
    }
}

impl std::fmt::Debug for ChainChooser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainChooser")
    }
}

/// The boot file a UEFI PXE client gets for the signed chain: shim, which then fetches
/// `grubx64.efi` from the same TFTP directory.
pub const SHIM_BOOT_FILE: &str = "shimx64.efi";
/// Everything the server needs to answer; built from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: DhcpMode,
    /// The subnets served, each with its pool and the server's address there.
    pub sites: Vec<Site>,
    pub lease_secs: u32,
    pub uefi_loader: UefiLoader,
    pub http_port: u16,
    /// iPXE or the signed chain, per UEFI machine.
    pub uefi_chain: ChainChooser,
}

impl Settings {
    /// URL of the iPXE script for one machine at the server's address `server`; the MAC is in
    /// the path so no iPXE expansion is needed.
    pub fn script_url(&self, server: Ipv4Addr, mac: &str) -> String {
        format!(
            "http://{server}:{}/boot/{}.ipxe",
            self.http_port,
            mac.replace(':', "-")
        )
    }

    /// The interface requests arrive on when the caller does not say (the first site's).
    pub fn primary_interface(&self) -> &str {
        self.sites.first().map_or("", |s| s.interface.as_str())
    }

    /// URL of the EFI loader UEFI HTTP boot clients at the server's address `server` fetch:
    /// iPXE, which then asks for its script.
    pub fn http_boot_url(&self, server: Ipv4Addr) -> String {
        format!(
            "http://{server}:{}/boot/{}",
            self.http_port,
            self.uefi_loader.file_name()
        )
    }
}

/// Which socket a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// 67: DHCP.
    Dhcp,
    /// 4011: PXE boot server discovery (the second half of proxyDHCP).
    PxeBoot,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Broadcast,
    Unicast(SocketAddrV4),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub payload: Vec<u8>,
    pub to: Destination,
}

/// A change to the lease table the edge must save before it sends the reply: a lease the
/// server cannot keep across a restart must not be granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    Granted { mac: MacAddr, lease: Lease },
    Released { mac: MacAddr },
    Declined { address: Ipv4Addr, until: u64 },
}

/// A network-booting machine (or an agent) asked: the lab records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub mac: MacAddr,
    pub kind: ClientKind,
    /// The address it was offered or given, if any.
    pub address: Option<Ipv4Addr>,
}

#[derive(Debug, Default)]
pub struct Handled {
    pub reply: Option<Reply>,
    pub seen: Option<Seen>,
    /// One line about what happened, for the log: MAC, xid, client kind, address, file.
    pub summary: Option<String>,
    pub lease_change: Option<LeaseChange>,
    /// The type of the reply, for the counters.
    sent: Option<MessageType>,
}

impl Handled {
    fn reply(message: &Message, to: Destination, summary: String) -> Self {
        Self {
            reply: Some(Reply {
                payload: encode(message),
                to,
            }),
            summary: Some(summary),
            lease_change: None,
            seen: None,
            sent: message.opts().msg_type(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub malformed: u64,
    pub ignored: u64,
    pub offers: u64,
    pub acks: u64,
    pub naks: u64,
    /// Relayed requests from a subnet no `[[subnet]]` describes (or on the wrong interface).
    pub unknown_relay: u64,
}

/// An address offered but not yet requested: held for this long so another client does not get it.
const OFFER_HOLD_SECS: u64 = 30;
/// A declined address (somebody else uses it) stays out of the pool this long.
pub const DECLINE_HOLD_SECS: u64 = 3600;
/// Largest DHCP message accepted; a datagram this long or longer may have been cut by the
/// receive buffer and is dropped.
pub const MAX_MESSAGE: usize = 4096;
/// The magic cookie that opens the options of every DHCP message (RFC 2131 3).
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
const COOKIE_AT: usize = 236;

#[derive(Debug)]
pub struct DhcpServer {
    settings: Settings,
    pub leases: LeaseTable,
    offers: HashMap<String, (Ipv4Addr, u64)>,
    pub stats: Stats,
}

/// Where the reply to `request` goes: a relay's port 67 when one forwarded it (RFC 2131 4.1),
/// else the client's link as a broadcast.
fn destination(request: &Message) -> Destination {
    if request.giaddr().is_unspecified() {
        Destination::Broadcast
    } else {
        Destination::Unicast(SocketAddrV4::new(request.giaddr(), 67))
    }
}

/// The data of option `code` in a raw DHCP message (several instances concatenated, RFC 3396),
/// for copying it back unchanged; `None` when absent or when the options do not parse.
fn raw_option(payload: &[u8], code: u8) -> Option<Vec<u8>> {
    let mut options = payload.get(COOKIE_AT + 4..)?;
    let mut found: Option<Vec<u8>> = None;
    while let Some((&tag, rest)) = options.split_first() {
        match tag {
            0 => options = rest,
            255 => break,
            _ => {
                let (&len, rest) = rest.split_first()?;
                let data = rest.get(..usize::from(len))?;
                if tag == code {
                    found.get_or_insert_with(Vec::new).extend_from_slice(data);
                }
                options = &rest[usize::from(len)..];
            }
        }
    }
    found
}

/// Option 82, Relay Agent Information: its code.
const RELAY_AGENT_INFORMATION: u8 = 82;

/// The boot file a client gets, if any.
fn boot_file(
    settings: &Settings,
    site: &Site,
    kind: ClientKind,
    mac: &str,
) -> Result<Option<String>, String> {
    Ok(match kind {
        ClientKind::Pxe(Arch::Bios) => Some("undionly.kpxe".into()),
        ClientKind::Pxe(Arch::Uefi64) => {
            let chain = mac
                .parse()
                .map_or(UefiChain::Ipxe, |mac| settings.uefi_chain.choose(mac));
            Some(match chain {
                UefiChain::Ipxe => settings.uefi_loader.file_name().into(),
                UefiChain::Signed => SHIM_BOOT_FILE.into(),
            })
        }
        ClientKind::Pxe(Arch::Other(code)) => {
            return Err(format!(
                "architecture {code} has no loader (only BIOS and x86-64 UEFI)"
            ))
        }
        ClientKind::Ipxe(_) => Some(settings.script_url(site.server, mac)),
        // Debian 12's signed GRUB cannot fetch over HTTP: HTTP boot always starts iPXE.
        ClientKind::Http(Arch::Uefi64) => Some(settings.http_boot_url(site.server)),
        ClientKind::Http(arch) => {
            return Err(format!(
                "HTTP boot for {arch} has no loader (only x86-64 UEFI)"
            ))
        }
        ClientKind::Agent | ClientKind::Other => None,
    })
}

impl DhcpServer {
    pub fn new(settings: Settings, leases: LeaseTable) -> Self {
        Self {
            settings,
            leases,
            offers: HashMap::new(),
            stats: Stats::default(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// [`Self::handle_on`] for a request that arrived on the first site's interface.
    pub fn handle(&mut self, payload: &[u8], from: SocketAddrV4, port: Port, now: u64) -> Handled {
        let interface = self.settings.primary_interface().to_string();
        self.handle_on(payload, from, port, &interface, now)
    }

    /// The site a request is answered from: the subnet its relay is in, or the one on the
    /// interface it arrived on; `Err` says why none.
    fn site_for(
        &self,
        request: &Message,
        from: SocketAddrV4,
        port: Port,
        interface: &str,
    ) -> Result<Site, String> {
        let sites = &self.settings.sites;
        let relay = request.giaddr();
        if !relay.is_unspecified() {
            let Some(site) = sites.iter().find(|s| s.contains(relay)) else {
                return Err(format!(
                    "relayed by {relay}, which is in no configured subnet (add a [[subnet]] for it)"
                ));
            };
            if site.interface != interface {
                return Err(format!(
                    "relayed by {relay} for {} but arrived on {interface}, not {} (set `interface` \
                     in its [[subnet]])",
                    site.network, site.interface
                ));
            }
            return Ok(site.clone());
        }
        // Port 4011 is unicast to us, from a client that has its address (possibly routed).
        let client = *from.ip();
        let routed = (port == Port::PxeBoot && !client.is_unspecified())
            .then(|| sites.iter().find(|s| s.contains(client)))
            .flatten();
        routed
            .or_else(|| {
                sites
                    .iter()
                    .find(|s| s.attached && s.interface == interface)
            })
            .cloned()
            .ok_or_else(|| format!("arrived on {interface}, which has no subnet of its own"))
    }

    pub fn handle_on(
        &mut self,
        payload: &[u8],
        from: SocketAddrV4,
        port: Port,
        interface: &str,
        now: u64,
    ) -> Handled {
        let cookie_ok = payload.get(COOKIE_AT..COOKIE_AT + 4) == Some(&MAGIC_COOKIE[..]);
        if payload.len() >= MAX_MESSAGE || !cookie_ok {
            self.stats.malformed += 1;
            return Handled {
                summary: Some(format!(
                    "dhcp: {} from {from} dropped",
                    if cookie_ok {
                        "oversized packet"
                    } else {
                        "packet without the DHCP magic cookie"
                    }
                )),
                ..Handled::default()
            };
        }
        let Some(request) = decode_message(payload) else {
            self.stats.malformed += 1;
            return Handled {
                summary: Some(format!("dhcp: malformed packet from {from} dropped")),
                ..Handled::default()
            };
        };
        if request.opcode() != Opcode::BootRequest
            || request.hlen() != 6
            || request.chaddr().len() < 6
        {
            self.stats.ignored += 1;
            return Handled::default();
        }
        let Some(kind) = request.opts().msg_type() else {
            self.stats.malformed += 1;
            return Handled::default();
        };
        let mut hardware = [0u8; 6];
        hardware.copy_from_slice(&request.chaddr()[..6]);
        let hardware = MacAddr(hardware);
        if !hardware.is_unicast_hardware() {
            // All zero, broadcast or multicast: no real NIC; nothing to lease or boot.
            self.stats.ignored += 1;
            return Handled {
                summary: Some(format!(
                    "dhcp: request from hardware address {hardware} ignored (not a NIC's)"
                )),
                ..Handled::default()
            };
        }
        let mac = hardware.to_string();
        let client = classify(&request);
        let site = match self.site_for(&request, from, port, interface) {
            Ok(site) => site,
            Err(why) => {
                let relayed = !request.giaddr().is_unspecified();
                if relayed {
                    self.stats.unknown_relay += 1;
                } else {
                    self.stats.ignored += 1;
                }
                return Handled {
                    summary: (relayed || client.wants_boot()).then(|| {
                        format!(
                            "dhcp: {mac} xid={:#010x} {client} {kind:?} {why}; ignored",
                            request.xid()
                        )
                    }),
                    ..Handled::default()
                };
            }
        };
        let relay_information = (!request.giaddr().is_unspecified())
            .then(|| raw_option(payload, RELAY_AGENT_INFORMATION))
            .flatten();
        let site = &site;
        let mut handled = match (self.settings.mode, port, kind) {
            (_, Port::PxeBoot, MessageType::Request) => {
                self.boot_ack(&request, site, &mac, client, from)
            }
            (DhcpMode::Full, Port::Dhcp, MessageType::Discover) => {
                self.offer(&request, site, &mac, client, now)
            }
            (DhcpMode::Full, Port::Dhcp, MessageType::Request) => {
                self.request(&request, site, &mac, client, now)
            }
            (DhcpMode::Full, Port::Dhcp, MessageType::Release) => {
                self.release(&request, hardware, now)
            }
            (DhcpMode::Full, Port::Dhcp, MessageType::Decline) => {
                self.decline(&request, hardware, now)
            }
            (DhcpMode::Proxy, Port::Dhcp, MessageType::Discover) if client.wants_boot() => {
                self.proxy_offer(&request, site, &mac, client)
            }
            _ => {
                self.stats.ignored += 1;
                Handled::default()
            }
        };
        if let (Some(reply), Some(info)) = (handled.reply.as_mut(), relay_information) {
            echo_relay_information(reply, info);
        }
        if !matches!(client, ClientKind::Other) {
            let address = handled
                .reply
                .as_ref()
                .and_then(|r| decode_message(&r.payload))
                .map(|m| m.yiaddr())
                .filter(|a| !a.is_unspecified());
            handled.seen = Some(Seen {
                mac: hardware,
                kind: client,
                address,
            });
        }
        match handled.sent {
            Some(MessageType::Offer) => self.stats.offers += 1,
            Some(MessageType::Ack) => self.stats.acks += 1,
            Some(MessageType::Nak) => self.stats.naks += 1,
            _ => {}
        }
        if handled.reply.is_none() && handled.summary.is_none() && client.wants_boot() {
            handled.summary = Some(format!(
                "dhcp: {mac} xid={:#010x} {client} {kind:?} on {port:?} ignored",
                request.xid()
            ));
        }
        handled
    }

    /// RELEASE: only the holder of a lease, naming its address in `ciaddr`, gives it up.
    fn release(&mut self, request: &Message, mac: MacAddr, now: u64) -> Handled {
        let key = mac.to_string();
        let holds = self
            .leases
            .leases
            .get(&key)
            .is_some_and(|l| l.address == request.ciaddr() && l.expires > now);
        if !holds {
            self.stats.ignored += 1;
            return Handled {
                summary: Some(format!(
                    "dhcp: {mac} xid={:#010x} tried to release {} which it does not hold; ignored",
                    request.xid(),
                    request.ciaddr()
                )),
                ..Handled::default()
            };
        }
        self.leases.leases.remove(&key);
        Handled {
            summary: Some(format!(
                "dhcp: {mac} xid={:#010x} released {}",
                request.xid(),
                request.ciaddr()
            )),
            lease_change: Some(LeaseChange::Released { mac }),
            ..Handled::default()
        }
    }

    /// DECLINE: the client found its offered address in use (RFC 2131 4.3.3). The address is
    /// kept out of the pool for a while, and the client asks again.
    fn decline(&mut self, request: &Message, mac: MacAddr, now: u64) -> Handled {
        let key = mac.to_string();
        let address = match request.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
            _ => Ipv4Addr::UNSPECIFIED,
        };
        let assigned = self.leases.leases.get(&key).map(|l| l.address) == Some(address)
            || self.offers.get(&key).map(|(a, _)| *a) == Some(address);
        if !assigned {
            self.stats.ignored += 1;
            return Handled {
                summary: Some(format!(
                    "dhcp: {mac} xid={:#010x} declined {address}, which it was not given; ignored",
                    request.xid()
                )),
                ..Handled::default()
            };
        }
        self.leases.leases.remove(&key);
        self.offers.remove(&key);
        let until = now + DECLINE_HOLD_SECS;
        self.leases.declined.insert(address, until);
        Handled {
            summary: Some(format!(
                "dhcp: {mac} xid={:#010x} declined {address} (in use by another host?); kept out of the pool for {} s",
                request.xid(),
                DECLINE_HOLD_SECS
            )),
            lease_change: Some(LeaseChange::Declined { address, until }),
            ..Handled::default()
        }
    }

    fn reserved_for(site: &Site, mac: &str) -> Option<Ipv4Addr> {
        let mac: MacAddr = mac.parse().ok()?;
        site.reservations.get(&mac).copied()
    }

    fn is_reserved_for_other(&self, address: Ipv4Addr, mac: &str) -> bool {
        let mac: Option<MacAddr> = mac.parse().ok();
        self.settings
            .sites
            .iter()
            .flat_map(|s| s.reservations.iter())
            .any(|(m, a)| *a == address && Some(*m) != mac)
    }

    fn taken_by_other(&self, address: Ipv4Addr, mac: &str, now: u64) -> bool {
        self.leases.is_declined(address, now)
            || self.leases.holder(address, now).is_some_and(|m| m != mac)
            || self
                .offers
                .iter()
                .any(|(m, (a, until))| *a == address && m != mac && *until > now)
            || self.is_reserved_for_other(address, mac)
    }

    /// The address this MAC gets on `site`: its reservation there, its previous lease or offer
    /// if on that subnet, or a free one from the site's range.
    fn address_for(&self, site: &Site, mac: &str, now: u64) -> Option<Ipv4Addr> {
        if let Some(reserved) = Self::reserved_for(site, mac) {
            return Some(reserved);
        }
        let in_pool = |address: Ipv4Addr| {
            site.range
                .is_some_and(|(start, end)| (start..=end).contains(&address))
        };
        if let Some(lease) = self.leases.leases.get(mac) {
            if in_pool(lease.address) && !self.taken_by_other(lease.address, mac, now) {
                return Some(lease.address);
            }
        }
        if let Some((address, until)) = self.offers.get(mac) {
            if *until > now && in_pool(*address) {
                return Some(*address);
            }
        }
        let (start, end) = site.range?;
        let candidates = || (u32::from(start)..=u32::from(end)).map(Ipv4Addr::from);
        // Never-used addresses first, so expired leases keep their owner as long as possible.
        candidates()
            .find(|a| !self.leases.ever_leased(*a) && !self.taken_by_other(*a, mac, now))
            .or_else(|| candidates().find(|a| !self.taken_by_other(*a, mac, now)))
    }

    fn offer(
        &mut self,
        request: &Message,
        site: &Site,
        mac: &str,
        client: ClientKind,
        now: u64,
    ) -> Handled {
        let Some(address) = self.address_for(site, mac, now) else {
            return Handled {
                summary: Some(format!(
                    "dhcp: {mac} xid={:#010x} {client}: address range of {} exhausted, no offer",
                    request.xid(),
                    site.network
                )),
                ..Handled::default()
            };
        };
        self.offers
            .insert(mac.into(), (address, now + OFFER_HOLD_SECS));
        self.address_reply(request, site, mac, client, MessageType::Offer, address)
    }

    fn request(
        &mut self,
        request: &Message,
        site: &Site,
        mac: &str,
        client: ClientKind,
        now: u64,
    ) -> Handled {
        let server_id = match request.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(id)) => Some(*id),
            _ => None,
        };
        if server_id.is_some_and(|id| id != site.server) {
            // The client took another server's offer.
            self.offers.remove(mac);
            self.stats.ignored += 1;
            return Handled::default();
        }
        let requested = match request.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
            _ => request.ciaddr(),
        };
        let assigned = self.address_for(site, mac, now);
        if assigned != Some(requested) || requested.is_unspecified() {
            if !site.contains(requested) && server_id.is_none() {
                // Not ours to judge (INIT-REBOOT on another network).
                self.stats.ignored += 1;
                return Handled::default();
            }
            let mut nak = self.base_reply(request, site, MessageType::Nak);
            nak.set_yiaddr(Ipv4Addr::UNSPECIFIED);
            if !request.giaddr().is_unspecified() {
                // The relay broadcasts it: the client has no address to be reached at.
                nak.set_flags(request.flags().set_broadcast());
            }
            let summary = format!(
                "dhcp: {mac} xid={:#010x} {client} asked for {requested} on {}, NAK",
                request.xid(),
                site.network
            );
            return Handled::reply(&nak, destination(request), summary);
        }
        self.offers.remove(mac);
        let lease = Lease {
            address: requested,
            expires: now + u64::from(self.settings.lease_secs),
        };
        self.leases.leases.insert(mac.into(), lease);
        let mut handled =
            self.address_reply(request, site, mac, client, MessageType::Ack, requested);
        handled.lease_change = mac
            .parse()
            .ok()
            .map(|mac| LeaseChange::Granted { mac, lease });
        handled
    }

    fn address_reply(
        &self,
        request: &Message,
        site: &Site,
        mac: &str,
        client: ClientKind,
        kind: MessageType,
        address: Ipv4Addr,
    ) -> Handled {
        let mut reply = self.base_reply(request, site, kind);
        reply.set_yiaddr(address);
        let lease_secs = self.settings.lease_secs;
        let opts = reply.opts_mut();
        opts.insert(DhcpOption::AddressLeaseTime(lease_secs));
        opts.insert(DhcpOption::Renewal(lease_secs / 2));
        opts.insert(DhcpOption::Rebinding(lease_secs / 8 * 7));
        opts.insert(DhcpOption::SubnetMask(site.network.netmask()));
        if let Some(router) = site.router {
            opts.insert(DhcpOption::Router(vec![router]));
        }
        if !site.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(site.dns.clone()));
        }
        let file = self.add_boot_options(&mut reply, site, mac, client);
        let summary = format!(
            "dhcp: {mac} xid={:#010x} {client} {kind:?} {address}{}{}",
            request.xid(),
            describe_relay(request),
            describe_file(&file)
        );
        Handled::reply(&reply, destination(request), summary)
    }

    /// proxyDHCP OFFER: no address, only the PXE vendor class and boot file.
    fn proxy_offer(
        &self,
        request: &Message,
        site: &Site,
        mac: &str,
        client: ClientKind,
    ) -> Handled {
        let mut reply = self.base_reply(request, site, MessageType::Offer);
        let file = self.add_boot_options(&mut reply, site, mac, client);
        let summary = format!(
            "dhcp: {mac} xid={:#010x} {client} proxy Offer{}{}",
            request.xid(),
            describe_relay(request),
            describe_file(&file)
        );
        Handled::reply(&reply, destination(request), summary)
    }

    /// Answer on port 4011: an ACK with the boot file, straight back to the client.
    fn boot_ack(
        &self,
        request: &Message,
        site: &Site,
        mac: &str,
        client: ClientKind,
        from: SocketAddrV4,
    ) -> Handled {
        let mut reply = self.base_reply(request, site, MessageType::Ack);
        let file = self.add_boot_options(&mut reply, site, mac, client);
        let to = if from.ip().is_unspecified() {
            Destination::Broadcast
        } else {
            Destination::Unicast(from)
        };
        let summary = format!(
            "dhcp: {mac} xid={:#010x} {client} boot server Ack{}",
            request.xid(),
            describe_file(&file)
        );
        Handled::reply(&reply, to, summary)
    }

    fn base_reply(&self, request: &Message, site: &Site, kind: MessageType) -> Message {
        let z = Ipv4Addr::UNSPECIFIED;
        let mut reply = Message::new_with_id(
            request.xid(),
            z,
            z,
            site.server,
            request.giaddr(),
            &request.chaddr()[..6],
        );
        reply
            .set_opcode(Opcode::BootReply)
            .set_flags(request.flags())
            .set_htype(request.htype());
        if kind == MessageType::Ack && !request.ciaddr().is_unspecified() {
            reply.set_ciaddr(request.ciaddr());
        }
        reply.opts_mut().insert(DhcpOption::MessageType(kind));
        reply
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier(site.server));
        reply
    }

    /// Adds the boot file and the options PXE firmware and iPXE look for; returns the file.
    fn add_boot_options(
        &self,
        reply: &mut Message,
        site: &Site,
        mac: &str,
        client: ClientKind,
    ) -> Result<Option<String>, String> {
        let file = boot_file(&self.settings, site, client, mac);
        if let Ok(Some(name)) = &file {
            // The header field holds 128 bytes; option 67 carries longer names.
            if name.len() < 128 {
                reply.set_fname_str(name);
            }
            reply
                .opts_mut()
                .insert(DhcpOption::BootfileName(name.as_bytes().to_vec()));
        }
        match client {
            ClientKind::Pxe(_) => {
                // PXE firmware accepts boot information only from offers that say "PXEClient";
                // option 43 sub-option 6 = 8: boot from the file in this offer, no discovery menu.
                reply
                    .opts_mut()
                    .insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
                reply
                    .opts_mut()
                    .insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
            }
            ClientKind::Ipxe(_) => {
                // iPXE's sub-option 176 (no-pxedhcp): do not wait for proxyDHCP offers.
                if self.settings.mode == DhcpMode::Full {
                    reply
                        .opts_mut()
                        .insert(DhcpOption::Unknown(UnknownOption::new(
                            OptionCode::from(175),
                            vec![176, 1, 1],
                        )));
                } else {
                    reply
                        .opts_mut()
                        .insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
                }
            }
            ClientKind::Http(_) => {
                // UEFI HTTP boot takes an offer only when it says "HTTPClient" (UEFI 2.x, 24.7).
                reply
                    .opts_mut()
                    .insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
            }
            ClientKind::Agent | ClientKind::Other => {}
        }
        file
    }
}

fn describe_relay(request: &Message) -> String {
    match request.giaddr() {
        relay if relay.is_unspecified() => String::new(),
        relay => format!(" via relay {relay}"),
    }
}

/// Copies the relay's option 82 into an encoded reply, unchanged and last (RFC 3046 2.2).
fn echo_relay_information(reply: &mut Reply, info: Vec<u8>) {
    let Ok(data_len) = u8::try_from(info.len()) else {
        // Longer than one option holds: the relay's own data is not ours to split.
        return;
    };
    if let Some(end) = reply.payload.iter().rposition(|&b| b == 255) {
        let mut option = vec![RELAY_AGENT_INFORMATION, data_len];
        option.extend_from_slice(&info);
        reply.payload.splice(end..end, option);
    }
}

fn describe_file(file: &Result<Option<String>, String>) -> String {
    match file {
        Ok(Some(name)) => format!(" file={name}"),
        Ok(None) => String::new(),
        Err(why) => format!(" no boot file: {why}"),
    }
}

fn encode(msg: &Message) -> Vec<u8> {
    // Replies are built from valid parts; encoding cannot fail for them.
    msg.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests;
