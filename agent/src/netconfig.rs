//! The DHCP client's I/O edge: picks an interface, brings it up, runs [`DhcpClient`] over a raw
//! socket until a lease is bound, applies it, and keeps renewing it in a background thread.

use crate::inventory::{self, Nic};
use crate::sys::{self, RawIpSocket};
use crate::udp_frame::UdpDatagram;
use diskcast_proto::dhcp::{DhcpClient, Event, Lease};
use diskcast_proto::mac::MacAddr;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no network interface appeared; PCI network controllers present: {controllers}")]
    NoInterface { controllers: String },
    #[error("interface {name} named by diskcast.interface does not exist (present: {present})")]
    UnknownInterface { name: String, present: String },
    #[error("no interface has a link after {secs} s (present: {present}); check the cable or switch port")]
    NoLink { secs: u64, present: String },
    #[error("bringing up interface {name}")]
    InterfaceUp {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening a raw socket on {name}")]
    RawSocket {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no DHCP lease on {name} after {secs} s ({sent} requests sent); is a DHCP server on this network?")]
    NoLease { name: String, secs: u32, sent: u32 },
    #[error("configuring {address}/{prefix} on {name}")]
    Configure {
        name: String,
        address: Ipv4Addr,
        prefix: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} has no usable MAC address ({mac:?})")]
    BadMac { name: String, mac: String },
}

fn names(nics: &[Nic]) -> String {
    if nics.is_empty() {
        return "none".into();
    }
    nics.iter()
        .map(|n| n.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Brings every interface up and returns the wanted one (or the first with a link) once it has a link.
pub fn choose_interface(
    sys: &Path,
    wanted: Option<&str>,
    link_timeout: Duration,
) -> Result<Nic, NetError> {
    let deadline = Instant::now() + link_timeout;
    // Drivers may register their interface a moment after the module loads.
    let mut nics = inventory::read_nics(sys);
    while nics.is_empty() && Instant::now() < deadline.min(Instant::now() + Duration::from_secs(5))
    {
        std::thread::sleep(Duration::from_millis(100));
        nics = inventory::read_nics(sys);
    }
    if nics.is_empty() {
        let controllers = inventory::pci_network_controllers(sys);
        let controllers = if controllers.is_empty() {
            "none".into()
        } else {
            format!(
                "{} (their driver is probably missing from the initramfs)",
                controllers.join("; ")
            )
        };
        return Err(NetError::NoInterface { controllers });
    }
    if let Some(name) = wanted {
        if !nics.iter().any(|n| n.name == name) {
            return Err(NetError::UnknownInterface {
                name: name.into(),
                present: names(&nics),
            });
        }
    }
    for nic in nics.iter().filter(|n| wanted.is_none_or(|w| w == n.name)) {
        sys::interface_up(&nic.name).map_err(|source| NetError::InterfaceUp {
            name: nic.name.clone(),
            source,
        })?;
    }
    loop {
        let nics = inventory::read_nics(sys);
        if let Some(nic) = nics
            .iter()
            .find(|n| n.link && wanted.is_none_or(|w| w == n.name))
        {
            return Ok(nic.clone());
        }
        if Instant::now() >= deadline {
            return Err(NetError::NoLink {
                secs: link_timeout.as_secs(),
                present: names(&nics),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A bound lease on an interface, renewed by a background thread for as long as the agent runs.
#[derive(Debug, Clone)]
pub struct Configured {
    pub interface: String,
    pub lease: Lease,
}

fn apply(interface: &str, lease: &Lease) -> Result<(), NetError> {
    let fail = |source| NetError::Configure {
        name: interface.into(),
        address: lease.address,
        prefix: lease.prefix_len(),
        source,
    };
    sys::set_ipv4(interface, lease.address, lease.netmask).map_err(fail)?;
    if let Some(router) = lease.router {
        if let Err(e) = sys::add_default_route(router) {
            log::warn!("default route via {router} not added: {e}");
        }
    }
    Ok(())
}

/// One step of the client: wait for a packet or the next timer, feed it, send what it asks.
fn step(
    client: &mut DhcpClient,
    socket: &RawIpSocket,
    wakeup: Instant,
    sent: &mut u32,
) -> Option<Event> {
    let mut buf = [0u8; 2048];
    let wait = wakeup
        .saturating_duration_since(Instant::now())
        .min(Duration::from_millis(500));
    let packet = match socket.recv_timeout(&mut buf, wait) {
        Ok(Some(n)) => UdpDatagram::parse(&buf[..n])
            .filter(|d| d.dst_port == 68)
            .map(|d| d.payload.to_vec()),
        Ok(None) => None,
        Err(e) => {
            log::debug!("dhcp receive: {e}");
            None
        }
    };
    let out = client.handle(packet.as_deref(), Instant::now());
    if let Some(payload) = out.transmit {
        let src = client.lease().map_or(Ipv4Addr::UNSPECIFIED, |l| l.address);
        let frame = UdpDatagram {
            src,
            dst: Ipv4Addr::BROADCAST,
            src_port: 68,
            dst_port: 67,
            payload: &payload,
        }
        .emit();
        match socket.send_broadcast(&frame) {
            Ok(()) => *sent += 1,
            Err(e) => log::warn!("dhcp send: {e}"),
        }
    }
    out.event
}

/// Gets a lease on `nic`, configures it and starts the renewal thread.
pub fn configure(nic: &Nic, timeout: Duration) -> Result<Configured, NetError> {
    let mac = nic
        .mac
        .parse::<MacAddr>()
        .map(MacAddr::octets)
        .map_err(|_| NetError::BadMac {
            name: nic.name.clone(),
            mac: nic.mac.clone(),
        })?;
    let socket = RawIpSocket::open(&nic.name).map_err(|source| NetError::RawSocket {
        name: nic.name.clone(),
        source,
    })?;
    let seed = u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let started = Instant::now();
    let mut client = DhcpClient::new(mac, seed, started);
    let mut sent = 0;
    let lease = loop {
        if started.elapsed() >= timeout {
            return Err(NetError::NoLease {
                name: nic.name.clone(),
                secs: timeout.as_secs() as u32,
                sent,
            });
        }
        let wakeup = Instant::now() + Duration::from_millis(200);
        if let Some(Event::Bound(lease)) = step(&mut client, &socket, wakeup, &mut sent) {
            break lease;
        }
    };
    apply(&nic.name, &lease)?;
    log::info!(
        "dhcp: {} is {}/{} from server {} (lease {} s, xid {:#010x})",
        nic.name,
        lease.address,
        lease.prefix_len(),
        lease.server,
        lease.lease_time.as_secs(),
        client.xid()
    );
    let interface = nic.name.clone();
    std::thread::Builder::new()
        .name("dhcp-renew".into())
        .spawn(move || keep_lease(&interface, client, socket))
        .map_err(|source| NetError::RawSocket {
            name: nic.name.clone(),
            source,
        })?;
    Ok(Configured {
        interface: nic.name.clone(),
        lease,
    })
}

fn keep_lease(interface: &str, mut client: DhcpClient, socket: RawIpSocket) {
    let mut sent = 0;
    let mut wakeup = Instant::now();
    loop {
        let event = step(&mut client, &socket, wakeup, &mut sent);
        wakeup = Instant::now() + Duration::from_secs(1);
        match event {
            Some(Event::Bound(lease)) => {
                log::info!(
                    "dhcp: renewed {} on {interface} for {} s",
                    lease.address,
                    lease.lease_time.as_secs()
                );
                if let Err(e) = apply(interface, &lease) {
                    log::error!("{e}");
                }
            }
            Some(Event::Expired) => {
                log::error!("dhcp: lease on {interface} expired; address removed, asking again");
                let _ = sys::set_ipv4(interface, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED);
            }
            None => {}
        }
    }
}
