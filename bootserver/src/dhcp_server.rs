//! Sans-IO DHCP server for booting: full mode (addresses plus boot information) and proxyDHCP
//! mode (boot information only, beside the lab's own DHCP server, on ports 67 and 4011).
//!
//! [`DhcpServer::handle`] takes one received payload, where it came from and the time, and returns
//! the reply to send and whether the lease table changed. Sockets and the lease file stay outside.

use crate::classify::{classify, Arch, ClientKind};
use crate::config::{DhcpMode, UefiChain, UefiLoader};
use crate::leases::{Lease, LeaseTable};
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
    pub server: Ipv4Addr,
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
    pub netmask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: u32,
    /// MAC (canonical) → reserved address.
    pub reservations: HashMap<String, Ipv4Addr>,
    pub uefi_loader: UefiLoader,
    pub http_port: u16,
    /// iPXE or the signed chain, per UEFI machine.
    pub uefi_chain: ChainChooser,
}

impl Settings {
    /// URL of the iPXE script for one machine; the MAC is in the path so no iPXE expansion is needed.
    pub fn script_url(&self, mac: &str) -> String {
        format!(
            "http://{}:{}/boot/{}.ipxe",
            self.server,
            self.http_port,
            mac.replace(':', "-")
        )
    }

    /// URL of the EFI loader UEFI HTTP boot clients fetch: iPXE, which then asks for its script.
    pub fn http_boot_url(&self) -> String {
        format!(
            "http://{}:{}/boot/{}",
            self.server,
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

/// The boot file a client gets, if any.
fn boot_file(settings: &Settings, kind: ClientKind, mac: &str) -> Result<Option<String>, String> {
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
        ClientKind::Ipxe(_) => Some(settings.script_url(mac)),
        // Debian 12's signed GRUB cannot fetch over HTTP: HTTP boot always starts iPXE.
        ClientKind::Http(Arch::Uefi64) => Some(settings.http_boot_url()),
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

    pub fn handle(&mut self, payload: &[u8], from: SocketAddrV4, port: Port, now: u64) -> Handled {
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
        let mut handled = match (self.settings.mode, port, kind) {
            (_, Port::PxeBoot, MessageType::Request) => self.boot_ack(&request, &mac, client, from),
            (DhcpMode::Full, Port::Dhcp, MessageType::Discover) => {
                self.offer(&request, &mac, client, now)
            }
            (DhcpMode::Full, Port::Dhcp, MessageType::Request) => {
                self.request(&request, &mac, client, now)
            }
            (DhcpMode::Full, Port::Dhcp, MessageType::Release) => {
                self.release(&request, hardware, now)
            }
            (DhcpMode::Full, Port::Dhcp, MessageType::Decline) => {
                self.decline(&request, hardware, now)
            }
            (DhcpMode::Proxy, Port::Dhcp, MessageType::Discover) if client.wants_boot() => {
                self.proxy_offer(&request, &mac, client)
            }
            _ => {
                self.stats.ignored += 1;
                Handled::default()
            }
        };
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

    fn reserved_for(&self, mac: &str) -> Option<Ipv4Addr> {
        self.settings.reservations.get(mac).copied()
    }

    fn is_reserved_for_other(&self, address: Ipv4Addr, mac: &str) -> bool {
        self.settings
            .reservations
            .iter()
            .any(|(m, a)| *a == address && m != mac)
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

    /// The address this MAC gets: its reservation, its previous lease, or a free one.
    fn address_for(&self, mac: &str, now: u64) -> Option<Ipv4Addr> {
        if let Some(reserved) = self.reserved_for(mac) {
            return Some(reserved);
        }
        if let Some(lease) = self.leases.leases.get(mac) {
            if !self.taken_by_other(lease.address, mac, now) {
                return Some(lease.address);
            }
        }
        if let Some((address, until)) = self.offers.get(mac) {
            if *until > now {
                return Some(*address);
            }
        }
        let (start, end) = self.settings.range?;
        let candidates = || (u32::from(start)..=u32::from(end)).map(Ipv4Addr::from);
        // Never-used addresses first, so expired leases keep their owner as long as possible.
        candidates()
            .find(|a| !self.leases.ever_leased(*a) && !self.taken_by_other(*a, mac, now))
            .or_else(|| candidates().find(|a| !self.taken_by_other(*a, mac, now)))
    }

    fn in_subnet(&self, address: Ipv4Addr) -> bool {
        let mask = u32::from(self.settings.netmask);
        u32::from(address) & mask == u32::from(self.settings.server) & mask
    }

    fn offer(&mut self, request: &Message, mac: &str, client: ClientKind, now: u64) -> Handled {
        let Some(address) = self.address_for(mac, now) else {
            return Handled {
                summary: Some(format!(
                    "dhcp: {mac} xid={:#010x} {client}: address range exhausted, no offer",
                    request.xid()
                )),
                ..Handled::default()
            };
        };
        self.offers
            .insert(mac.into(), (address, now + OFFER_HOLD_SECS));
        self.address_reply(request, mac, client, MessageType::Offer, address)
    }

    fn request(&mut self, request: &Message, mac: &str, client: ClientKind, now: u64) -> Handled {
        let server_id = match request.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(id)) => Some(*id),
            _ => None,
        };
        if server_id.is_some_and(|id| id != self.settings.server) {
            // The client took another server's offer.
            self.offers.remove(mac);
            self.stats.ignored += 1;
            return Handled::default();
        }
        let requested = match request.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
            _ => request.ciaddr(),
        };
        let assigned = self.address_for(mac, now);
        if assigned != Some(requested) || requested.is_unspecified() {
            if !self.in_subnet(requested) && server_id.is_none() {
                // Not ours to judge (INIT-REBOOT on another network).
                self.stats.ignored += 1;
                return Handled::default();
            }
            let mut nak = self.base_reply(request, MessageType::Nak);
            nak.set_yiaddr(Ipv4Addr::UNSPECIFIED);
            let summary = format!(
                "dhcp: {mac} xid={:#010x} {client} asked for {requested}, NAK",
                request.xid()
            );
            return Handled::reply(&nak, Destination::Broadcast, summary);
        }
        self.offers.remove(mac);
        let lease = Lease {
            address: requested,
            expires: now + u64::from(self.settings.lease_secs),
        };
        self.leases.leases.insert(mac.into(), lease);
        let mut handled = self.address_reply(request, mac, client, MessageType::Ack, requested);
        handled.lease_change = mac
            .parse()
            .ok()
            .map(|mac| LeaseChange::Granted { mac, lease });
        handled
    }

    fn address_reply(
        &self,
        request: &Message,
        mac: &str,
        client: ClientKind,
        kind: MessageType,
        address: Ipv4Addr,
    ) -> Handled {
        let mut reply = self.base_reply(request, kind);
        reply.set_yiaddr(address);
        let s = &self.settings;
        let opts = reply.opts_mut();
        opts.insert(DhcpOption::AddressLeaseTime(s.lease_secs));
        opts.insert(DhcpOption::Renewal(s.lease_secs / 2));
        opts.insert(DhcpOption::Rebinding(s.lease_secs / 8 * 7));
        opts.insert(DhcpOption::SubnetMask(s.netmask));
        if let Some(router) = s.router {
            opts.insert(DhcpOption::Router(vec![router]));
        }
        if !s.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(s.dns.clone()));
        }
        let file = self.add_boot_options(&mut reply, mac, client);
        let summary = format!(
            "dhcp: {mac} xid={:#010x} {client} {kind:?} {address}{}",
            request.xid(),
            describe_file(&file)
        );
        Handled::reply(&reply, Destination::Broadcast, summary)
    }

    /// proxyDHCP OFFER: no address, only the PXE vendor class and boot file.
    fn proxy_offer(&self, request: &Message, mac: &str, client: ClientKind) -> Handled {
        let mut reply = self.base_reply(request, MessageType::Offer);
        let file = self.add_boot_options(&mut reply, mac, client);
        let summary = format!(
            "dhcp: {mac} xid={:#010x} {client} proxy Offer{}",
            request.xid(),
            describe_file(&file)
        );
        Handled::reply(&reply, Destination::Broadcast, summary)
    }

    /// Answer on port 4011: an ACK with the boot file, straight back to the client.
    fn boot_ack(
        &self,
        request: &Message,
        mac: &str,
        client: ClientKind,
        from: SocketAddrV4,
    ) -> Handled {
        let mut reply = self.base_reply(request, MessageType::Ack);
        let file = self.add_boot_options(&mut reply, mac, client);
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

    fn base_reply(&self, request: &Message, kind: MessageType) -> Message {
        let z = Ipv4Addr::UNSPECIFIED;
        let mut reply = Message::new_with_id(
            request.xid(),
            z,
            z,
            self.settings.server,
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
            .insert(DhcpOption::ServerIdentifier(self.settings.server));
        reply
    }

    /// Adds the boot file and the options PXE firmware and iPXE look for; returns the file.
    fn add_boot_options(
        &self,
        reply: &mut Message,
        mac: &str,
        client: ClientKind,
    ) -> Result<Option<String>, String> {
        let file = boot_file(&self.settings, client, mac);
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

/// The config's reservations as the settings keep them.
pub fn reservation_map(
    reservations: &std::collections::BTreeMap<MacAddr, Ipv4Addr>,
) -> HashMap<String, Ipv4Addr> {
    reservations
        .iter()
        .map(|(mac, address)| (mac.to_string(), *address))
        .collect()
}

#[cfg(test)]
mod tests;
