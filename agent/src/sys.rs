//! The agent's only `unsafe` code: thin wrappers over Linux system calls that neither std nor a
//! kept crate offers in the form PID 1 needs. Every block states why it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string holds a NUL byte"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// mount(2) with no data; an already mounted target (EBUSY) is fine.
pub fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    let (source, target, fstype) = (cstring(source)?, cstring(target)?, cstring(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is NULL.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    match check(ret) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other.map(drop),
    }
}

/// Inserts a kernel module from its file; a module that is already loaded is fine.
pub fn finit_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = cstring("")?;
    // SAFETY: finit_module takes an open fd, a NUL-terminated parameter string and flags; the file
    // and the string live until the call returns.
    let ret = unsafe {
        libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) as libc::c_int
    };
    match check(ret) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other.map(drop),
    }
}

#[derive(Debug, Clone, Copy)]
pub enum PowerAction {
    Reboot,
    PowerOff,
}

/// Flushes the file systems and resets or powers off the machine. Returns only on failure.
pub fn power(action: PowerAction) -> io::Error {
    let cmd = match action {
        PowerAction::Reboot => libc::RB_AUTOBOOT,
        PowerAction::PowerOff => libc::RB_POWER_OFF,
    };
    // SAFETY: sync has no arguments; reboot takes a plain command number.
    unsafe {
        libc::sync();
        libc::reboot(cmd);
    }
    io::Error::last_os_error()
}

/// A datagram socket for an ioctl on interfaces.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no pointer arguments; a non-negative result is a new fd we own.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; the kernel reads it as sockaddr_in.
    unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Sets IFF_UP on an interface.
pub fn interface_up(name: &str) -> io::Result<()> {
    set_interface_up(name, true)
}

/// Clears IFF_UP on an interface: its driver stops its queues.
pub fn interface_down(name: &str) -> io::Result<()> {
    set_interface_up(name, false)
}

fn set_interface_up(name: &str, up: bool) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq_for(name)?;
    // SAFETY: req is a valid ifreq naming the interface; SIOCGIFFLAGS fills ifru_flags.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    let flag = libc::IFF_UP as libc::c_short;
    // SAFETY: the union member was just written by the kernel as flags.
    unsafe {
        if up {
            req.ifr_ifru.ifru_flags |= flag;
        } else {
            req.ifr_ifru.ifru_flags &= !flag;
        }
    };
    // SAFETY: as above; SIOCSIFFLAGS reads ifru_flags.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// Assigns an IPv4 address and netmask (0.0.0.0 removes the address).
pub fn set_ipv4(name: &str, address: Ipv4Addr, netmask: Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(address);
    // SAFETY: req names the interface and holds an AF_INET address; the kernel only reads it.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) })?;
    if !address.is_unspecified() {
        req.ifr_ifru.ifru_netmask = sockaddr_in(netmask);
        // SAFETY: as above, with the netmask.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req) })?;
    }
    Ok(())
}

/// Adds a default route through `gateway`; an existing one is fine.
pub fn add_default_route(gateway: Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    // SAFETY: rtentry is plain old data for which all-zero bytes are valid.
    let mut route: libc::rtentry = unsafe { mem::zeroed() };
    route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_in(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: route is fully initialised and rt_dev is NULL (the kernel picks the interface).
    match check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &route) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other.map(drop),
    }
}

pub fn interface_index(name: &str) -> io::Result<u32> {
    let cname = cstring(name)?;
    // SAFETY: cname is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(cname.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        index => Ok(index),
    }
}

/// An `AF_PACKET`/`SOCK_DGRAM` socket that sends and receives whole IPv4 packets on one
/// interface, before that interface has an address.
#[derive(Debug)]
pub struct RawIpSocket {
    fd: OwnedFd,
    ifindex: i32,
}

const ETH_P_IP_BE: u16 = (libc::ETH_P_IP as u16).to_be();

impl RawIpSocket {
    pub fn open(interface: &str) -> io::Result<Self> {
        let ifindex = interface_index(interface)? as i32;
        // SAFETY: socket(2) has no pointer arguments.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_IP_BE),
            )
        })?;
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = Self::link_address(ifindex, [0; 6], 0);
        // SAFETY: addr is a valid sockaddr_ll and the length passed is its size.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(Self { fd, ifindex })
    }

    fn link_address(ifindex: i32, mac: [u8; 6], halen: u8) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain old data for which all-zero bytes are valid.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_IP_BE;
        addr.sll_ifindex = ifindex;
        addr.sll_halen = halen;
        addr.sll_addr[..6].copy_from_slice(&mac);
        addr
    }

    /// Sends an IPv4 packet to the Ethernet broadcast address.
    pub fn send_broadcast(&self, packet: &[u8]) -> io::Result<()> {
        let addr = Self::link_address(self.ifindex, [0xff; 6], 6);
        // SAFETY: packet and addr are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one IPv4 packet, or `None` after `timeout`.
    pub fn recv_timeout(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is one valid pollfd.
        if check(unsafe { libc::poll(&mut pfd, 1, millis) })? == 0 {
            return Ok(None);
        }
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(n as usize))
    }
}

/// Size in bytes of an open block device.
pub fn block_device_size(file: &std::fs::File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    check(unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) })?;
    Ok(size)
}

/// Logical block size of an open block device.
pub fn logical_block_size(file: &std::fs::File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
    check(unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size) })?;
    Ok(size as u32)
}

// From <linux/fs.h>: _IOR(0x12, 114, size_t) and _IO(0x12, 104).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

/// Zeroes a byte range of a block device (BLKZEROOUT); the device may do it without writing.
pub fn block_zero_out(file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) through the pointer, which is valid.
    check(unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) })?;
    Ok(())
}

// From <linux/fs.h>: _IO(0x12, 127).
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Tells a block device that a byte range holds nothing (BLKDISCARD): SSDs and thin volumes
/// free it. What reads there afterwards is up to the device.
pub fn block_discard(file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 (start, length) through the pointer, which is valid.
    check(unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) })?;
    Ok(())
}

// From <linux/fs.h>: _IO(0x12, 119).
const BLKDISCARD: libc::c_ulong = 0x1277;

/// The number of text rows of the terminal `fd` refers to (TIOCGWINSZ), when it is a terminal
/// that knows its size (a virtual console does; a serial line usually says 0).
pub fn terminal_rows(fd: std::os::fd::BorrowedFd<'_>) -> Option<u16> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which is valid; a descriptor
    // that is no terminal makes it fail with ENOTTY and write nothing.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (ret == 0 && size.ws_row > 0).then_some(size.ws_row)
}

/// A heap buffer aligned for O_DIRECT I/O.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is uniquely owned memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least 1) aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align.max(1))
            .unwrap_or_else(|_| std::alloc::Layout::new::<u8>());
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, layout }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        self.layout.size() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
