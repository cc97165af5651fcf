//! Answers IPv6 Router Solicitations with a minimal Router Advertisement (no prefix, router
//! lifetime 0, no DHCPv6 flags). iPXE otherwise waits about 13–16 s for IPv6 autoconfiguration
//! on every network boot; this answer ends that wait at once. Hosts treat the advertisement as
//! coming from no router at all (lifetime 0), so it changes nothing else on the LAN.

use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn6,
};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

/// True for an ICMPv6 Router Solicitation (code 0).
pub fn is_router_solicitation(icmp: &[u8]) -> bool {
    icmp.len() >= 8 && icmp[0] == ROUTER_SOLICITATION && icmp[1] == 0
}

/// The advertisement: type 134, code 0, checksum (the kernel fills it in), hop limit 64, no
/// managed/other flags, router lifetime 0, reachable and retransmit timers unspecified.
pub fn router_advertisement() -> [u8; 16] {
    let mut ra = [0u8; 16];
    ra[0] = ROUTER_ADVERTISEMENT;
    ra[4] = 64;
    ra
}

#[derive(Debug, thiserror::Error)]
#[error("setting up the router advertisement socket on {interface}")]
pub struct AdvertError {
    interface: String,
    #[source]
    source: nix::Error,
}

pub fn open(interface: &str, ifindex: u32) -> Result<OwnedFd, AdvertError> {
    let fail = |source| AdvertError {
        interface: interface.into(),
        source,
    };
    let fd = socket::socket(
        AddressFamily::Inet6,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::IcmpV6,
    )
    .map_err(fail)?;
    socket::setsockopt(
        &fd,
        sockopt::BindToDevice,
        &std::ffi::OsString::from(interface),
    )
    .map_err(fail)?;
    // Neighbour Discovery messages must arrive with hop limit 255 or receivers drop them.
    socket::setsockopt(&fd, sockopt::Ipv6MulticastHops, &255).map_err(fail)?;
    let join = socket::Ipv6MembershipRequest::new(ALL_ROUTERS);
    let _ = ifindex;
    socket::setsockopt(&fd, sockopt::Ipv6AddMembership, &join).map_err(fail)?;
    Ok(fd)
}

/// Answers solicitations until the process ends (at most one answer every 200 ms).
pub fn serve(fd: OwnedFd, ifindex: u32) {
    let mut buf = [0u8; 1500];
    let mut last = Instant::now() - Duration::from_secs(1);
    let dest = SockaddrIn6::from(SocketAddrV6::new(ALL_NODES, 0, 0, ifindex));
    loop {
        let n = match socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("router solicitation receive: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !is_router_solicitation(&buf[..n]) || last.elapsed() < Duration::from_millis(200) {
            continue;
        }
        last = Instant::now();
        match socket::sendto(
            fd.as_raw_fd(),
            &router_advertisement(),
            &dest,
            MsgFlags::empty(),
        ) {
            Ok(_) => log::debug!("answered a router solicitation"),
            Err(e) => log::warn!("router advertisement not sent: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_solicitations_and_builds_a_lifetime_zero_advertisement() {
        assert!(is_router_solicitation(&[133, 0, 0x12, 0x34, 0, 0, 0, 0]));
        assert!(!is_router_solicitation(&[133, 1, 0, 0, 0, 0, 0, 0]));
        assert!(!is_router_solicitation(&[135, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!is_router_solicitation(&[133, 0]));
        let ra = router_advertisement();
        assert_eq!(ra[0], 134);
        assert_eq!(ra[5], 0, "no managed or other-config flag: no DHCPv6 wait");
        assert_eq!(
            &ra[6..8],
            &[0, 0],
            "router lifetime 0: not a default router"
        );
    }
}
