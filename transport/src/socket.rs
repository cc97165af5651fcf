//! Sockets for a session: the sender's (multicasts, hears receivers' reports) and the receiver's
//! (joins the group, large buffer, counts kernel drops with SO_RXQ_OVFL).

use diskcast_proto::wire::{
    block_size_for_mtu, check_block_size, BlockSizeError, DATA_OVERHEAD, DEFAULT_BLOCK_SIZE,
    IPV4_UDP_HEADERS, MAX_UDP_PAYLOAD,
};
use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessageOwned, IpMembershipRequest, MsgFlags, SockFlag,
    SockType, SockaddrIn,
};
use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

const RECEIVE_BUFFER: usize = 64 << 20;
const SEND_BUFFER: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("listing network interfaces")]
    Interfaces(#[source] nix::Error),
    #[error("interface {0} has no IPv4 address (is it up and configured?)")]
    NoAddress(String),
    #[error("no network interface with an IPv4 address; name one with --interface")]
    NoInterface,
    #[error("setting up the {what} socket on {addr}")]
    Socket {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: nix::Error,
    },
    #[error("{0} is not a multicast address (use 224.0.0.0/4, e.g. 239.255.77.77)")]
    NotMulticast(Ipv4Addr),
}

/// The interface to use and its IPv4 address: the named one, or the first non-loopback one.
pub fn interface_ipv4(name: Option<&str>) -> Result<(String, Ipv4Addr), NetError> {
    let addrs: Vec<_> = nix::ifaddrs::getifaddrs()
        .map_err(NetError::Interfaces)?
        .collect();
    let with_v4 = addrs.iter().filter_map(|a| {
        let ip = a.address.as_ref()?.as_sockaddr_in()?.ip();
        Some((a.interface_name.clone(), ip))
    });
    let found: Vec<(String, Ipv4Addr)> = with_v4.collect();
    match name {
        Some(name) => found
            .into_iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| NetError::NoAddress(name.into())),
        None => found
            .into_iter()
            .find(|(_, ip)| !ip.is_loopback())
            .ok_or(NetError::NoInterface),
    }
}

/// The MTU of `interface` as the kernel reports it (`/sys/class/net/IF/mtu`), or why not.
pub fn interface_mtu(interface: &str) -> Result<u32, String> {
    if interface.is_empty() || interface.contains('/') || interface.starts_with('.') {
        return Err(format!("{interface:?} is not an interface name"));
    }
    let path = format!("/sys/class/net/{interface}/mtu");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{path} holds {:?}, not a number", text.trim()))
}

/// The block size a session sent out of `interface` uses, and why: `requested` (checked), or
/// for [`crate::send::BlockSize::FromMtu`] as much as the interface's MTU takes without IP
/// fragments ([`block_size_for_mtu`]), the size for a 1500-byte MTU when that is unknown.
pub fn choose_block_size(
    requested: crate::send::BlockSize,
    interface: &str,
) -> Result<(u16, String), BlockSizeError> {
    if let crate::send::BlockSize::Bytes(bytes) = requested {
        let block = check_block_size(u64::from(bytes))?;
        let why = match interface_mtu(interface) {
            Ok(mtu) if DATA_OVERHEAD + usize::from(block) + IPV4_UDP_HEADERS as usize > mtu as usize => format!(
                "as asked; above MTU {mtu} on {interface}, so every datagram travels as IP fragments"
            ),
            _ => "as asked".to_string(),
        };
        return Ok((block, why));
    }
    Ok(match interface_mtu(interface) {
        Ok(mtu) => (block_size_for_mtu(mtu), format!("MTU {mtu} on {interface}")),
        Err(e) => (
            DEFAULT_BLOCK_SIZE,
            format!("MTU of {interface} unknown ({e}); the size for MTU 1500"),
        ),
    })
}

fn new_udp(what: &'static str, addr: SocketAddrV4) -> Result<std::os::fd::OwnedFd, NetError> {
    socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| NetError::Socket {
        what,
        addr: addr.into(),
        source,
    })
}

/// The sender's socket: bound to the interface address (and `port`, 0 for any: relays need a
/// known one to subscribe to), multicasting out of that interface.
pub fn sender_socket(
    interface: &str,
    interface_addr: Ipv4Addr,
    port: u16,
    ttl: u8,
) -> Result<UdpSocket, NetError> {
    let addr = SocketAddrV4::new(interface_addr, port);
    let fail = |source| NetError::Socket {
        what: "sender",
        addr: addr.into(),
        source,
    };
    let fd = new_udp("sender", addr)?;
    let _ = socket::setsockopt(&fd, sockopt::SndBufForce, &SEND_BUFFER)
        .or_else(|_| socket::setsockopt(&fd, sockopt::SndBuf, &SEND_BUFFER));
    let _ = socket::setsockopt(&fd, sockopt::RcvBufForce, &(8 << 20))
        .or_else(|_| socket::setsockopt(&fd, sockopt::RcvBuf, &(8 << 20)));
    socket::setsockopt(&fd, sockopt::IpMulticastTtl, &ttl).map_err(fail)?;
    // Report ENOBUFS when the interface queue is full instead of dropping silently: the send loop
    // waits and retries, which paces the sender at the link's real speed.
    let _ = socket::setsockopt(&fd, sockopt::Ipv4RecvErr, &true);
    socket::setsockopt(&fd, sockopt::IpMulticastLoop, &true).map_err(fail)?;
    // Multicast leaves through this interface whatever the routing table says.
    socket::setsockopt(
        &fd,
        sockopt::BindToDevice,
        &std::ffi::OsString::from(interface),
    )
    .map_err(fail)?;
    socket::bind(fd.as_raw_fd(), &SockaddrIn::from(addr)).map_err(fail)?;
    Ok(UdpSocket::from(fd))
}

/// A receiver's socket: joined to `group` on the interface, with a large receive buffer.
pub fn receiver_socket(
    group: Ipv4Addr,
    port: u16,
    interface_addr: Ipv4Addr,
) -> Result<UdpSocket, NetError> {
    if !group.is_multicast() {
        return Err(NetError::NotMulticast(group));
    }
    let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    let fail = |source| NetError::Socket {
        what: "receiver",
        addr: addr.into(),
        source,
    };
    let fd = new_udp("receiver", addr)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(fail)?;
    let _ = socket::setsockopt(&fd, sockopt::RcvBufForce, &RECEIVE_BUFFER)
        .or_else(|_| socket::setsockopt(&fd, sockopt::RcvBuf, &RECEIVE_BUFFER));
    let _ = socket::setsockopt(&fd, sockopt::RxqOvfl, &1);
    socket::bind(fd.as_raw_fd(), &SockaddrIn::from(addr)).map_err(fail)?;
    let membership = IpMembershipRequest::new(group, Some(interface_addr));
    socket::setsockopt(&fd, sockopt::IpAddMembership, &membership).map_err(fail)?;
    // Only this group's datagrams: by default Linux hands a socket bound to the wildcard address
    // every group any socket of the host joined on that port (another session's, too).
    socket2::SockRef::from(&fd)
        .set_multicast_all_v4(false)
        .map_err(|e| {
            fail(nix::Error::from_raw(
                e.raw_os_error().unwrap_or(libc::EINVAL),
            ))
        })?;
    Ok(UdpSocket::from(fd))
}

/// A receiver's socket for its reports to the sender and the sender's answers to it: a port of
/// its own, so that two sessions received on one host (their group sockets share the session
/// port) never take each other's answers.
pub fn report_socket(interface_addr: Ipv4Addr) -> Result<UdpSocket, NetError> {
    let addr = SocketAddrV4::new(interface_addr, 0);
    UdpSocket::bind(addr).map_err(|e| NetError::Socket {
        what: "report",
        addr: addr.into(),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
    })
}

/// One receive: its length, its source, the kernel's count of datagrams dropped for lack of
/// buffer space (when reported), and the segment size when the kernel coalesced several datagrams
/// into this buffer (UDP GRO).
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddrV4,
    pub drops: Option<u32>,
    pub segment: Option<usize>,
}

/// Buffers for taking several receives off a socket in one system call (`recvmmsg`): each buffer
/// holds one datagram or, with UDP GRO, up to 64 KiB of datagrams the kernel coalesced. At high
/// rates the receiver otherwise spends a system call (and a wake-up) per 64 KiB.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    got: Vec<Received>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("buffers", &self.bufs.len())
            .field("received", &self.got.len())
            .finish()
    }
}

/// What one buffer of a [`RecvBatch`] holds: 64 KiB takes a coalesced GRO buffer.
const RECV_BUFFER: usize = 64 << 10;

impl RecvBatch {
    /// `count` buffers of 64 KiB each.
    pub fn new(count: usize) -> Self {
        Self {
            bufs: vec![vec![0u8; RECV_BUFFER]; count.max(1)],
            got: Vec::with_capacity(count.max(1)),
        }
    }

    /// Receives what the socket holds, up to one receive per buffer, without waiting; returns
    /// how many receives arrived (0 when nothing was waiting). Read them with [`RecvBatch::get`].
    pub fn recv(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        let Self { bufs, got } = self;
        got.clear();
        // The headers are made anew for every call: the kernel shrinks each header's control
        // length to what it used, and nix does not restore it, so reused headers would soon
        // have no room left for the GRO segment size and the drop counter.
        let cmsg = nix::cmsg_space!(u32, i32);
        let mut headers = socket::MultiHeaders::<SockaddrIn>::preallocate(bufs.len(), Some(cmsg));
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
            bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        let results = match socket::recvmmsg(
            socket.as_raw_fd(),
            &mut headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(results) => results,
            Err(nix::errno::Errno::EAGAIN) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        for msg in results {
            got.push(received_from(&msg));
        }
        Ok(got.len())
    }

    /// Receive `i` of the last [`RecvBatch::recv`]: its bytes and what the kernel said of it.
    pub fn get(&self, i: usize) -> Option<(&[u8], Received)> {
        let received = *self.got.get(i)?;
        let buf = self.bufs.get(i)?;
        Some((&buf[..received.len.min(buf.len())], received))
    }
}

fn received_from(msg: &socket::RecvMsg<'_, '_, SockaddrIn>) -> Received {
    let mut drops = None;
    let mut segment = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::RxqOvfl(n) => drops = Some(n),
                ControlMessageOwned::UdpGroSegments(size) if size > 0 => {
                    segment = Some(size as usize)
                }
                _ => {}
            }
        }
    }
    let from = msg
        .address
        .map_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), |a| {
            SocketAddrV4::new(a.ip(), a.port())
        });
    Received {
        len: msg.bytes,
        from,
        drops,
        segment,
    }
}

/// Waits until the socket is readable or `timeout` passes; true when readable.
pub fn wait_readable(socket: &UdpSocket, timeout: Duration) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        socket.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let spec = nix::sys::time::TimeSpec::from_duration(timeout);
    matches!(nix::poll::ppoll(&mut fds, Some(spec), None), Ok(n) if n > 0)
}

/// Segments per GSO send: 40 data datagrams of a 1500-byte MTU stay under the 64 KiB limit of
/// one UDP send...
const GSO_MAX_SEGMENTS: usize = 40;
/// ...which larger ones reach sooner: the payload of one send, all segments together.
const GSO_MAX_BYTES: usize = MAX_UDP_PAYLOAD;

/// Gathers equal-sized datagrams to the same destination into one UDP GSO send (UDP_SEGMENT):
/// one system call, and one packet through the kernel's stack until the NIC or the receiving
/// socket splits it. Falls back to one send per datagram where the kernel refuses GSO.
#[derive(Debug)]
pub struct GsoBatch {
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    /// The last datagram was shorter than the segment size: nothing may follow it in the batch.
    closed: bool,
    enabled: bool,
    dest: SocketAddrV4,
    /// Largest segment the kernel cuts from a GSO send: a segment must fit the MTU (the kernel
    /// refuses larger ones, with EMSGSIZE or on older kernels EINVAL), so bigger datagrams go one
    /// per send, as IP fragments.
    max_segment: usize,
}

fn is_queue_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
}

/// An ICMP error about an earlier unicast datagram from the same socket (a relay or receiver
/// that went away), which Linux reports at the next send with IP_RECVERR on: it says nothing
/// about this send, which is retried.
fn is_stale_unicast_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN)
    )
}

/// Stale errors reported in a row before a send gives up.
const STALE_ERRORS: u32 = 64;

impl GsoBatch {
    /// Batches for `dest` sent out of an interface with MTU `mtu` (`None`: unknown; a kernel
    /// refusing a segment then turns GSO off).
    pub fn new(dest: SocketAddrV4, mtu: Option<u32>) -> Self {
        Self {
            buf: Vec::with_capacity(64 << 10),
            segment: 0,
            count: 0,
            closed: false,
            enabled: true,
            dest,
            max_segment: mtu.map_or(usize::MAX, |m| {
                (m as usize).saturating_sub(IPV4_UDP_HEADERS as usize)
            }),
        }
    }

    /// Adds a datagram, sending the batch first when it cannot take it.
    pub fn push(&mut self, socket: &UdpSocket, datagram: &[u8]) -> std::io::Result<()> {
        let fits = self.count == 0
            || (!self.closed
                && datagram.len() <= self.segment
                && self.segment <= self.max_segment
                && self.count < GSO_MAX_SEGMENTS
                && self.buf.len() + datagram.len() <= GSO_MAX_BYTES);
        if !fits {
            self.flush(socket)?;
        }
        if self.count == 0 {
            self.segment = datagram.len();
        }
        self.closed = datagram.len() < self.segment;
        self.buf.extend_from_slice(datagram);
        self.count += 1;
        if !self.enabled {
            self.flush(socket)?;
        }
        Ok(())
    }

    /// Sends what is gathered. A full interface queue (ENOBUFS with IP_RECVERR) makes it wait and
    /// retry rather than lose the datagrams.
    pub fn flush(&mut self, socket: &UdpSocket) -> std::io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let mut stale = 0;
        loop {
            if self.count == 0 {
                break;
            }
            let result = if self.count == 1 || !self.enabled {
                self.send_each(socket)
            } else {
                self.send_gso(socket)
            };
            match result {
                Ok(()) => break,
                Err(e) if is_queue_full(&e) => std::thread::sleep(Duration::from_micros(200)),
                Err(e) if is_stale_unicast_error(&e) && stale < STALE_ERRORS => stale += 1,
                Err(e)
                    if self.enabled
                        && matches!(
                            e.raw_os_error(),
                            Some(
                                libc::EIO
                                    | libc::EINVAL
                                    | libc::EMSGSIZE
                                    | libc::ENOPROTOOPT
                                    | libc::EOPNOTSUPP
                            )
                        ) =>
                {
                    log::info!(
                        "UDP segmentation offload unavailable ({e}); sending datagrams one by one"
                    );
                    self.enabled = false;
                }
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        Ok(())
    }

    fn send_gso(&self, socket: &UdpSocket) -> std::io::Result<()> {
        let segment = self.segment as u16;
        let cmsg = [socket::ControlMessage::UdpGsoSegments(&segment)];
        let iov = [std::io::IoSlice::new(&self.buf)];
        let dest = SockaddrIn::from(self.dest);
        socket::sendmsg(
            socket.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            Some(&dest),
        )
        .map_err(std::io::Error::from)?;
        Ok(())
    }

    fn send_each(&mut self, socket: &UdpSocket) -> std::io::Result<()> {
        // Datagrams already sent are cut off the front so a retry after ENOBUFS resends none twice.
        while !self.buf.is_empty() {
            let len = self.segment.min(self.buf.len());
            socket.send_to(&self.buf[..len], self.dest)?;
            self.buf.drain(..len);
            self.count -= 1;
        }
        Ok(())
    }
}

/// Lets the kernel hand several datagrams of one GRO packet to a single receive.
pub fn enable_gro(socket: &UdpSocket) -> bool {
    socket::setsockopt(socket, sockopt::UdpGroSegment, &true).is_ok()
}

/// Waits until any of `fds` is readable or `timeout` passes; true when one is readable.
pub fn wait_readable_any(fds: &[std::os::fd::BorrowedFd<'_>], timeout: Duration) -> bool {
    let mut polled: Vec<nix::poll::PollFd<'_>> = fds
        .iter()
        .map(|fd| nix::poll::PollFd::new(*fd, nix::poll::PollFlags::POLLIN))
        .collect();
    let spec = nix::sys::time::TimeSpec::from_duration(timeout);
    matches!(nix::poll::ppoll(&mut polled, Some(spec), None), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn loopback_pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        (tx, rx)
    }

    fn dest(socket: &UdpSocket) -> SocketAddrV4 {
        match socket.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        }
    }

    #[test]
    fn a_batch_takes_several_datagrams_in_one_call_with_their_sources() {
        let (tx, rx) = loopback_pair();
        let mut batch = RecvBatch::new(4);
        assert_eq!(batch.recv(&rx).unwrap(), 0, "nothing waiting");
        for len in [100, 200, 300, 400, 500, 600] {
            tx.send_to(&vec![len as u8; len], rx.local_addr().unwrap())
                .unwrap();
        }
        let first = batch.recv(&rx).unwrap();
        assert_eq!(first, 4, "one call fills every buffer");
        for i in 0..first {
            let (data, received) = batch.get(i).unwrap();
            assert_eq!(data.len(), 100 * (i + 1));
            assert!(data.iter().all(|&b| b == data.len() as u8));
            assert_eq!(SocketAddr::V4(received.from), tx.local_addr().unwrap());
        }
        assert!(batch.get(first).is_none());
        assert_eq!(batch.recv(&rx).unwrap(), 2);
        assert_eq!(batch.get(1).unwrap().0.len(), 600);
    }

    #[test]
    fn jumbo_and_largest_datagrams_leave_whole_through_a_gso_batch() {
        let (tx, rx) = loopback_pair();
        let _ = socket2::SockRef::from(&rx).set_recv_buffer_size(4 << 20);
        let mut buf = vec![0u8; 64 << 10];
        // Loopback's MTU (65536) takes jumbo segments; an MTU of 1500 sends them one by one.
        for (mtu, size, count) in [
            (Some(65_536), 8_923, 9),
            (Some(1_500), 8_923, 3),
            (Some(65_536), MAX_UDP_PAYLOAD, 3),
            (None, 60_000, 2),
        ] {
            let mut gso = GsoBatch::new(dest(&rx), mtu);
            for i in 0..count {
                gso.push(&tx, &vec![i as u8; size]).unwrap();
            }
            gso.flush(&tx).unwrap();
            assert!(gso.enabled, "{mtu:?} {size}: GSO turned off");
            for i in 0..count {
                assert!(wait_readable(&rx, Duration::from_secs(5)));
                let (n, _) = rx.recv_from(&mut buf).unwrap();
                assert_eq!(n, size, "{mtu:?}: datagram {i}");
                assert!(
                    buf[..n].iter().all(|&b| b == i as u8),
                    "{mtu:?} {size}: {i}"
                );
            }
        }
    }

    #[test]
    fn coalesced_datagrams_keep_their_segment_size_call_after_call() {
        // A receive without control messages leaves a header with no room for them; the next
        // call must still learn the GRO segment size, or it would take 40 datagrams for one.
        let (tx, rx) = loopback_pair();
        if !enable_gro(&rx) {
            eprintln!("UDP GRO not available here; skipped");
            return;
        }
        let mut batch = RecvBatch::new(2);
        tx.send_to(&[1; 64], rx.local_addr().unwrap()).unwrap();
        assert_eq!(batch.recv(&rx).unwrap(), 1);
        assert_eq!(batch.get(0).unwrap().1.segment, None);
        for round in 0..3 {
            let mut gso = GsoBatch::new(dest(&rx), None);
            for i in 0..10u8 {
                gso.push(&tx, &[i; 1000]).unwrap();
            }
            gso.flush(&tx).unwrap();
            let mut datagrams = 0;
            while datagrams < 10 {
                assert!(wait_readable(&rx, Duration::from_secs(5)), "round {round}");
                for i in 0..batch.recv(&rx).unwrap() {
                    let (data, received) = batch.get(i).unwrap();
                    let segment = received.segment.unwrap_or(data.len());
                    assert_eq!(segment, 1000, "round {round}: {received:?}");
                    for part in data.chunks(segment) {
                        assert_eq!(part, [datagrams as u8; 1000]);
                        datagrams += 1;
                    }
                }
            }
        }
    }
}
