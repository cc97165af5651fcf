//! The tokio edge: the request socket, one task and one UDP socket per accepted read transfer,
//! the caps, the counters and the throttled log.
//!
//! Everything the request socket refuses (write requests, malformed requests, busy, missing
//! files, descriptor exhaustion) is answered with an ERROR packet from that socket. Anything else
//! sent there (garbage, ERROR, stray DATA, ACK or OACK) gets no answer. A repeated request from the same
//! client address and port while its transfer runs is dropped: the transfer retransmits itself.
//! Transfer sockets are connected to their client, so the kernel drops datagrams from anyone
//! else (instead of the ERROR 5 of RFC 1350), and an ICMP "port unreachable" ends the transfer.

use super::packet::{self, ErrorCode, Packet, Request, RequestKind};
use super::transfer::{Outcome, Transfer};
use super::{FileSource, TftpLimits};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    #[error("TFTP root {path} is not a readable directory")]
    Root {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("binding the TFTP socket {addr} (is another TFTP server running? ports below 1024 need root or CAP_NET_BIND_SERVICE)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("reading the TFTP socket's address")]
    LocalAddr {
        #[source]
        source: io::Error,
    },
    #[error("receiving on the TFTP socket {addr} failed {failures} times in a row")]
    Receive {
        addr: SocketAddr,
        failures: u32,
        #[source]
        source: io::Error,
    },
    #[error("{name:?} is missing or outside the TFTP root")]
    NotFound { name: String },
    #[error("{name:?} is {len} bytes, over the TFTP limit of {max}")]
    TooLarge { name: String, len: u64, max: u64 },
    #[error("reading {path}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening a transfer socket on {ip}")]
    TransferSocket {
        ip: IpAddr,
        #[source]
        source: io::Error,
    },
}

impl TftpError {
    /// EMFILE or ENFILE behind the error.
    pub fn is_descriptor_exhaustion(&self) -> bool {
        match self {
            Self::File { source, .. } | Self::TransferSocket { source, .. } => {
                is_descriptor_exhaustion(source)
            }
            _ => false,
        }
    }
}

fn is_descriptor_exhaustion(error: &io::Error) -> bool {
    use nix::errno::Errno;
    error
        .raw_os_error()
        .is_some_and(|code| code == Errno::EMFILE as i32 || code == Errno::ENFILE as i32)
}

/// Counters for `/status`, shared with the server through an `Arc`.
#[derive(Debug, Default)]
pub struct TftpStats {
    requests: AtomicU64,
    served: AtomicU64,
    refused_busy: AtomicU64,
    errors_sent: AtomicU64,
    client_errors: AtomicU64,
    timeouts: AtomicU64,
    io_errors: AtomicU64,
    active: AtomicUsize,
    peak_active: AtomicUsize,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TftpStatsSnapshot {
    /// Read and write requests received on the request socket (well-formed or not).
    pub requests: u64,
    /// Transfers whose last block was acknowledged.
    pub served: u64,
    /// Requests refused because a cap was reached.
    pub refused_busy: u64,
    /// ERROR packets sent, refusals included.
    pub errors_sent: u64,
    /// Transfers the client ended with an ERROR packet (size probes included).
    pub client_errors: u64,
    /// Transfers abandoned after `retries` timeouts.
    pub timeouts: u64,
    /// Transfers ended by a socket error (mostly ICMP port unreachable: the client went away).
    pub io_errors: u64,
    /// Transfers in flight now (each holds one socket).
    pub active: usize,
    /// Most transfers in flight at once since start.
    pub peak_active: usize,
}

impl TftpStats {
    pub fn snapshot(&self) -> TftpStatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        TftpStatsSnapshot {
            requests: get(&self.requests),
            served: get(&self.served),
            refused_busy: get(&self.refused_busy),
            errors_sent: get(&self.errors_sent),
            client_errors: get(&self.client_errors),
            timeouts: get(&self.timeouts),
            io_errors: get(&self.io_errors),
            active: self.active.load(Ordering::Relaxed),
            peak_active: self.peak_active.load(Ordering::Relaxed),
        }
    }
}

/// An error and its causes on one log line.
fn one_line_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Runs the TFTP server on a bound socket (port 69 in production) until an unrecoverable socket
/// error. Transfer sockets are bound to the same IP address, port 0.
pub async fn run(
    files: Arc<dyn FileSource>,
    socket: UdpSocket,
    limits: TftpLimits,
    stats: Arc<TftpStats>,
) -> Result<(), TftpError> {
    let addr = socket
        .local_addr()
        .map_err(|source| TftpError::LocalAddr { source })?;
    let shared = Arc::new(Shared {
        files,
        limits,
        stats,
        socket,
        local_ip: addr.ip(),
        slots: Mutex::new(Slots::default()),
        throttle: Mutex::new(Throttle::new(LOG_PERIOD)),
    });
    // Requests are at most 512 bytes by RFC 1350; options may stretch that a little.
    let mut buf = vec![0; 2048];
    let mut failures = 0;
    loop {
        match shared.socket.recv_from(&mut buf).await {
            Ok((len, peer)) => {
                failures = 0;
                shared.handle(&buf[..len], peer).await;
            }
            Err(source) => {
                failures += 1;
                if failures >= MAX_RECEIVE_FAILURES {
                    return Err(TftpError::Receive {
                        addr,
                        failures,
                        source,
                    });
                }
                shared.log(
                    log::Level::Warn,
                    Event::Receive,
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    || format!("tftp: receiving on {addr}: {source}"),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

const LOG_PERIOD: Duration = Duration::from_secs(60);
const MAX_RECEIVE_FAILURES: u32 = 100;
const BUSY: &str = "server busy, try again";

#[derive(Debug)]
struct Shared {
    files: Arc<dyn FileSource>,
    limits: TftpLimits,
    stats: Arc<TftpStats>,
    socket: UdpSocket,
    local_ip: IpAddr,
    slots: Mutex<Slots>,
    throttle: Mutex<Throttle>,
}

/// Transfers in flight, by client.
#[derive(Debug, Default)]
struct Slots {
    clients: HashSet<SocketAddr>,
    per_ip: HashMap<IpAddr, usize>,
}

enum Admission {
    Accepted(SlotGuard),
    Duplicate,
    Busy(String),
}

/// Holds one transfer's place in [`Slots`] until dropped.
#[derive(Debug)]
struct SlotGuard {
    shared: Arc<Shared>,
    peer: SocketAddr,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut slots = lock(&self.shared.slots);
        slots.clients.remove(&self.peer);
        let ip = self.peer.ip();
        if let Some(count) = slots.per_ip.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                slots.per_ip.remove(&ip);
            }
        }
        self.shared.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    async fn handle(self: &Arc<Self>, datagram: &[u8], peer: SocketAddr) {
        match packet::parse(datagram) {
            Ok(Packet::Request(request)) => {
                bump(&self.stats.requests);
                match request.kind {
                    RequestKind::Read => self.admit(request, peer).await,
                    RequestKind::Write => {
                        self.log(log::Level::Warn, Event::Write, peer.ip(), || {
                            format!(
                                "tftp: {peer} tried to write {:?}: this server is read-only",
                                request.filename
                            )
                        });
                        self.refuse(peer, ErrorCode::AccessViolation, "read-only server")
                            .await;
                    }
                }
            }
            // An ERROR is never answered (two peers could bounce them forever).
            Ok(Packet::Error { .. }) => {}
            // Stray DATA, ACK or OACK: tftp-hpa's client, for one, ACKs the ERROR refusing its
            // request. Answering would only start a ping-pong.
            Ok(other @ (Packet::Data { .. } | Packet::Ack { .. } | Packet::Oack(_))) => {
                self.log(log::Level::Debug, Event::NotRequest, peer.ip(), || {
                    format!("tftp: {peer} sent {other:?} to the request port; dropped")
                });
            }
            Err(error) if error.is_request() => {
                bump(&self.stats.requests);
                self.log(log::Level::Warn, Event::BadRequest, peer.ip(), || {
                    format!("tftp: {peer}: refused a request: {error}")
                });
                self.refuse(peer, error.reply_code(), &error.to_string())
                    .await;
            }
            Err(error) => self.log(log::Level::Debug, Event::NotRequest, peer.ip(), || {
                format!("tftp: {peer}: dropped a datagram: {error}")
            }),
        }
    }

    async fn admit(self: &Arc<Self>, request: Request, peer: SocketAddr) {
        match self.reserve(peer) {
            Admission::Accepted(guard) => {
                tokio::spawn(Arc::clone(self).transfer(request, peer, guard));
            }
            Admission::Duplicate => {
                log::debug!("tftp: {peer} repeated its request; its transfer is running");
            }
            Admission::Busy(why) => {
                bump(&self.stats.refused_busy);
                self.log(log::Level::Warn, Event::Busy, peer.ip(), || {
                    format!("tftp: {peer} refused for {:?}: {why}", request.filename)
                });
                self.refuse(peer, ErrorCode::NotDefined, BUSY).await;
            }
        }
    }

    fn reserve(self: &Arc<Self>, peer: SocketAddr) -> Admission {
        let mut slots = lock(&self.slots);
        if slots.clients.contains(&peer) {
            return Admission::Duplicate;
        }
        let (max, max_per_client) = (self.limits.max_transfers, self.limits.max_per_client);
        if slots.clients.len() >= max {
            return Admission::Busy(format!("{max} transfers in flight (the cap)"));
        }
        let from_ip = slots.per_ip.get(&peer.ip()).copied().unwrap_or(0);
        if from_ip >= max_per_client {
            return Admission::Busy(format!(
                "{from_ip} transfers in flight to this address (the cap)"
            ));
        }
        slots.clients.insert(peer);
        *slots.per_ip.entry(peer.ip()).or_default() += 1;
        let active = self.stats.active.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.peak_active.fetch_max(active, Ordering::Relaxed);
        Admission::Accepted(SlotGuard {
            shared: Arc::clone(self),
            peer,
        })
    }

    /// An ERROR packet from the request socket.
    async fn refuse(&self, peer: SocketAddr, code: ErrorCode, message: &str) {
        let datagram = packet::error_packet(code, message);
        match self.socket.send_to(&datagram, peer).await {
            Ok(_) => bump(&self.stats.errors_sent),
            Err(e) => log::debug!("tftp: sending an ERROR to {peer}: {e}"),
        }
    }

    /// One read transfer, from loading the file to the last ACK; `_slot` frees its place.
    async fn transfer(self: Arc<Self>, request: Request, peer: SocketAddr, _slot: SlotGuard) {
        let started = Instant::now();
        let name = request.filename.clone();
        let data = match self.load(&name, peer.ip()).await {
            Ok(data) => data,
            Err(error) => return self.refuse_for(peer, &error).await,
        };
        let socket = match UdpSocket::bind((self.local_ip, 0)).await {
            Ok(socket) => socket,
            Err(source) => {
                let error = TftpError::TransferSocket {
                    ip: self.local_ip,
                    source,
                };
                return self.refuse_for(peer, &error).await;
            }
        };
        if let Err(e) = socket.connect(peer).await {
            bump(&self.stats.io_errors);
            log::warn!("tftp: connecting a transfer socket to {peer}: {e}");
            return;
        }
        let mut transfer = Transfer::new(&request, data, &self.limits, Instant::now());
        let mut buf = vec![0; 2048];
        let mut socket_error = None;
        while socket_error.is_none() {
            while let Some(datagram) = transfer.poll_transmit() {
                if let Err(e) = socket.send(&datagram).await {
                    socket_error = Some(e);
                    break;
                }
            }
            let Some(deadline) = transfer.poll_timeout() else {
                break;
            };
            if socket_error.is_some() {
                break;
            }
            tokio::select! {
                received = socket.recv(&mut buf) => match received {
                    Ok(len) => transfer.handle_packet(&buf[..len], Instant::now()),
                    Err(e) => socket_error = Some(e),
                },
                () = tokio::time::sleep_until(deadline.into()) => {
                    transfer.handle_timeout(Instant::now());
                }
            }
        }
        self.report(&transfer, socket_error, peer, &name, started);
    }

    async fn load(&self, name: &str, client: IpAddr) -> Result<Arc<[u8]>, TftpError> {
        let (files, owned, max) = (
            Arc::clone(&self.files),
            name.to_owned(),
            self.limits.max_file_size,
        );
        let job = tokio::task::spawn_blocking(move || files.read(&owned, client, max));
        match job.await {
            Ok(result) => result,
            Err(join) => Err(TftpError::File {
                path: PathBuf::from(name),
                source: io::Error::other(join.to_string()),
            }),
        }
    }

    /// Refuses a request that failed after admission, with a reason the client can show.
    async fn refuse_for(&self, peer: SocketAddr, error: &TftpError) {
        let (code, message) = match error {
            TftpError::NotFound { .. } => (ErrorCode::FileNotFound, "file not found"),
            TftpError::TooLarge { .. } => {
                (ErrorCode::NotDefined, "file too large for TFTP, use HTTP")
            }
            _ if error.is_descriptor_exhaustion() => (ErrorCode::NotDefined, BUSY),
            _ => (ErrorCode::NotDefined, "server error"),
        };
        let chain = one_line_chain(error);
        if error.is_descriptor_exhaustion() {
            self.log(
                log::Level::Error,
                Event::Descriptors,
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                || {
                    format!(
                        "tftp: OUT OF FILE DESCRIPTORS serving {peer}: {chain}; raise `ulimit -n` \
                         or lower max_transfers ({})",
                        self.limits.max_transfers
                    )
                },
            );
        } else {
            self.log(log::Level::Warn, Event::Refused, peer.ip(), || {
                format!("tftp: {peer} refused: {chain}")
            });
        }
        self.refuse(peer, code, message).await;
    }

    fn report(
        &self,
        transfer: &Transfer,
        socket_error: Option<io::Error>,
        peer: SocketAddr,
        name: &str,
        started: Instant,
    ) {
        let secs = started.elapsed().as_secs_f64();
        let agreed = transfer.negotiated();
        if let Some(e) = socket_error {
            bump(&self.stats.io_errors);
            self.log(log::Level::Warn, Event::Socket, peer.ip(), || {
                format!("tftp: {peer} {name:?} ended after {secs:.1} s: {e}")
            });
            return;
        }
        match transfer.outcome() {
            Some(Outcome::Completed { bytes, .. }) => {
                bump(&self.stats.served);
                log::info!(
                    "tftp: {peer} got {name:?}: {bytes} bytes, blksize {}, windowsize {}, {secs:.2} s, {} retransmitted",
                    agreed.blksize,
                    agreed.windowsize,
                    transfer.retransmitted()
                );
            }
            Some(Outcome::ClientError {
                code,
                message,
                after_oack,
            }) => {
                bump(&self.stats.client_errors);
                let code = code.to_u16();
                if *after_oack {
                    log::debug!(
                        "tftp: {peer} ended {name:?} after the OACK (a size probe?): ERROR {code} {message:?}"
                    );
                } else {
                    log::info!("tftp: {peer} aborted {name:?}: ERROR {code} {message:?}");
                }
            }
            Some(Outcome::TimedOut { acked_blocks }) => {
                bump(&self.stats.timeouts);
                self.log(log::Level::Warn, Event::Timeout, peer.ip(), || {
                    format!(
                        "tftp: {peer} stopped answering during {name:?} ({acked_blocks} blocks \
                         acknowledged); gave up after {} x {:?}",
                        self.limits.retries, self.limits.timeout
                    )
                });
            }
            Some(Outcome::ProtocolError { reason }) => {
                bump(&self.stats.errors_sent);
                self.log(log::Level::Warn, Event::Protocol, peer.ip(), || {
                    format!("tftp: {peer} {name:?}: {reason}")
                });
            }
            None => {}
        }
    }

    /// Logs at most once per client and kind of event per minute, counting what it held back.
    fn log(&self, level: log::Level, event: Event, ip: IpAddr, message: impl FnOnce() -> String) {
        if !log::log_enabled!(level) {
            return;
        }
        let Some(suppressed) = lock(&self.throttle).admit(event, ip, Instant::now()) else {
            return;
        };
        let message = message();
        if suppressed > 0 {
            log::log!(
                level,
                "{message} ({suppressed} similar messages held back in the last minute)"
            );
        } else {
            log::log!(level, "{message}");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Event {
    Busy,
    BadRequest,
    Write,
    NotRequest,
    Refused,
    Descriptors,
    Timeout,
    Protocol,
    Socket,
    Receive,
}

/// Log throttling: one line per (event, client IP) per period; lines held back are counted and
/// reported with the next one. The table is bounded: when full, new clients share one entry.
#[derive(Debug)]
struct Throttle {
    period: Duration,
    last: HashMap<(Event, IpAddr), (Instant, u64)>,
}

const THROTTLE_ENTRIES: usize = 4096;

impl Throttle {
    fn new(period: Duration) -> Self {
        Self {
            period,
            last: HashMap::new(),
        }
    }

    /// `Some(held back since the last line)` if a line may be logged now.
    fn admit(&mut self, event: Event, ip: IpAddr, now: Instant) -> Option<u64> {
        let period = self.period;
        let mut key = (event, ip);
        if !self.last.contains_key(&key) && self.last.len() >= THROTTLE_ENTRIES {
            self.last
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < period);
            if self.last.len() >= THROTTLE_ENTRIES {
                key = (event, IpAddr::V4(Ipv4Addr::BROADCAST));
            }
        }
        match self.last.get_mut(&key) {
            Some((at, held)) if now.saturating_duration_since(*at) < period => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let suppressed = std::mem::take(held);
                *at = now;
                Some(suppressed)
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket as StdSocket;

    struct Fixture {
        addr: SocketAddr,
        stats: Arc<TftpStats>,
        dir: PathBuf,
        small: Vec<u8>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A server on 127.0.0.1, port 0, in a thread of its own, serving `small.bin` (100,000
    /// bytes) and `exact.bin` (4 x 1468 bytes).
    fn start(name: &str, limits: TftpLimits) -> Fixture {
        let dir = std::env::temp_dir().join(format!("diskcast-tftp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let small: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(dir.join("small.bin"), &small).unwrap();
        std::fs::write(dir.join("exact.bin"), &small[..4 * 1468]).unwrap();
        let root = super::super::ConfinedDir::new(&dir).unwrap();
        let stats = Arc::new(TftpStats::default());
        let server_stats = Arc::clone(&stats);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                tx.send(socket.local_addr().unwrap()).unwrap();
                run(Arc::new(root), socket, limits, server_stats).await
            })
        });
        let addr = rx.recv().unwrap();
        Fixture {
            addr,
            stats,
            dir,
            small,
        }
    }

    fn curl(fixture: &Fixture, file: &str, args: &[&str]) -> Vec<u8> {
        let out = fixture.dir.join(format!("out-{file}-{}", args.len()));
        let status = std::process::Command::new("curl")
            .args(["-s", "--max-time", "10", "-o"])
            .arg(&out)
            .args(args)
            .arg(format!("tftp://{}/{file}", fixture.addr))
            .status()
            .expect("curl (with TFTP support) must be installed to run this test");
        assert!(status.success(), "curl {file} {args:?}: {status}");
        let data = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        data
    }

    fn client(ip: Ipv4Addr) -> StdSocket {
        let socket = StdSocket::bind((ip, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        socket
    }

    fn rrq(name: &[u8], mode: &[u8], options: &[(&str, &str)]) -> Vec<u8> {
        let mut datagram = vec![0, 1];
        for field in [name, mode].into_iter().chain(
            options
                .iter()
                .flat_map(|(n, v)| [n.as_bytes(), v.as_bytes()]),
        ) {
            datagram.extend_from_slice(field);
            datagram.push(0);
        }
        datagram
    }

    fn receive(socket: &StdSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = vec![0; 2048];
        let (len, from) = socket.recv_from(&mut buf).expect("an answer");
        buf.truncate(len);
        (buf, from)
    }

    /// Waits up to `within` for `done` to hold on the counters.
    fn wait_for(
        stats: &TftpStats,
        within: Duration,
        done: impl Fn(&TftpStatsSnapshot) -> bool,
    ) -> TftpStatsSnapshot {
        let start = Instant::now();
        loop {
            let snapshot = stats.snapshot();
            if done(&snapshot) || start.elapsed() > within {
                return snapshot;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// UDP sockets (the kernel's count, `/proc/net/udp`) connected to one of `clients`: the
    /// server's transfer sockets for them, whatever else runs on the machine.
    fn sockets_connected_to(clients: &HashSet<SocketAddr>) -> usize {
        let table = std::fs::read_to_string("/proc/net/udp").unwrap();
        let parse = |field: &str| -> Option<SocketAddr> {
            // `0100007F:A1B2`: the IPv4 address as a native-endian u32, the port, both in hex.
            let (ip, port) = field.split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?.to_ne_bytes();
            Some(SocketAddr::from((ip, u16::from_str_radix(port, 16).ok()?)))
        };
        table
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().nth(2).and_then(parse))
            .filter(|remote| clients.contains(remote))
            .count()
    }

    #[test]
    fn curl_gets_byte_identical_files() {
        let fixture = start("curl", TftpLimits::default());
        assert_eq!(curl(&fixture, "small.bin", &[]), fixture.small);
        let big_blocks = ["--tftp-blksize", "1468"];
        assert_eq!(curl(&fixture, "small.bin", &big_blocks), fixture.small);
        // An exact multiple of the block size: ends with an empty block.
        assert_eq!(
            curl(&fixture, "exact.bin", &big_blocks),
            fixture.small[..4 * 1468]
        );
        let stats = wait_for(&fixture.stats, Duration::from_secs(2), |s| {
            s.served == 3 && s.active == 0
        });
        assert_eq!((stats.served, stats.active, stats.errors_sent), (3, 0, 0));
        // A refusal from the request port reaches curl as such: 68 is "TFTP: file not found".
        let started = Instant::now();
        let status = std::process::Command::new("curl")
            .args(["-s", "--max-time", "10", "-o", "/dev/null"])
            .arg(format!("tftp://{}/missing.bin", fixture.addr))
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(68), "{status}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn bad_requests_are_answered_with_an_error_from_the_request_port() {
        let fixture = start("bad", TftpLimits::default());
        let socket = client(Ipv4Addr::LOCALHOST);
        let long = vec![b'a'; 300];
        let cases: [(Vec<u8>, u16); 7] = [
            (rrq(b"\xff\xfe.bin", b"octet", &[]), 0),
            (rrq(&long, b"octet", &[]), 0),
            (rrq(b"small.bin", b"netascii", &[]), 4),
            (rrq(b"small.bin", b"octet", &[("blksize", "abc")]), 8),
            (
                [&[0, 2][..], &rrq(b"up.bin", b"octet", &[])[2..]].concat(),
                2,
            ),
            (rrq(b"missing.bin", b"octet", &[]), 1),
            (rrq(b"../small.bin", b"octet", &[]), 1),
        ];
        for (request, code) in &cases {
            socket.send_to(request, fixture.addr).unwrap();
            let (answer, from) = receive(&socket);
            assert_eq!(from, fixture.addr, "{request:?}");
            match packet::parse(&answer) {
                Ok(Packet::Error { code: got, message }) => {
                    assert_eq!(got.to_u16(), *code, "{request:?}: {message}");
                    assert!(!message.is_empty());
                }
                other => panic!("{request:?} got {other:?}"),
            }
        }
        // Garbage, ERROR and stray ACKs get no answer.
        for datagram in [&b"\0\x09junk"[..], b"\0\x05\0\0bye\0", b"\0\x04\0\x01"] {
            socket.send_to(datagram, fixture.addr).unwrap();
        }
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            socket.recv_from(&mut [0; 64]).is_err(),
            "no answer to garbage"
        );
        let stats = fixture.stats.snapshot();
        assert_eq!((stats.errors_sent, stats.requests, stats.active), (7, 7, 0));
    }

    #[test]
    fn a_size_probe_ends_at_the_clients_error_and_repeats_are_ignored() {
        let fixture = start("probe", TftpLimits::default());
        let socket = client(Ipv4Addr::LOCALHOST);
        let request = rrq(
            b"small.bin",
            b"octet",
            &[("tsize", "0"), ("blksize", "1468")],
        );
        socket.send_to(&request, fixture.addr).unwrap();
        socket.send_to(&request, fixture.addr).unwrap(); // a firmware's impatient repeat
        let (answer, transfer_port) = receive(&socket);
        assert_ne!(
            transfer_port, fixture.addr,
            "answered from a transfer ID of its own"
        );
        let Ok(Packet::Oack(options)) = packet::parse(&answer) else {
            panic!("expected an OACK, got {answer:?}");
        };
        assert_eq!(
            (options.tsize, options.blksize),
            (Some(100_000), Some(1468))
        );
        let probe_end = packet::error_packet(ErrorCode::OptionNegotiation, "tsize only");
        socket.send_to(&probe_end, transfer_port).unwrap();
        let stats = wait_for(&fixture.stats, Duration::from_secs(1), |s| s.active == 0);
        assert_eq!(
            (
                stats.client_errors,
                stats.active,
                stats.peak_active,
                stats.requests
            ),
            (1, 0, 1, 2)
        );
    }

    #[test]
    fn the_total_cap_refuses_with_an_error_and_frees_after_the_timeouts() {
        let limits = TftpLimits {
            max_transfers: 8,
            max_per_client: 100,
            timeout: Duration::from_millis(200),
            retries: 2,
            ..TftpLimits::default()
        };
        let fixture = start("cap", limits);
        let sockets: Vec<StdSocket> = (0..20).map(|_| client(Ipv4Addr::LOCALHOST)).collect();
        let request = rrq(b"small.bin", b"octet", &[]);
        for socket in &sockets {
            socket.send_to(&request, fixture.addr).unwrap();
        }
        let (mut data, mut busy) = (0, 0);
        for socket in &sockets {
            match packet::parse(&receive(socket).0) {
                Ok(Packet::Data { block: 1, .. }) => data += 1,
                Ok(Packet::Error { message, .. }) if message == BUSY => busy += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((data, busy), (8, 12));
        let stats = wait_for(&fixture.stats, Duration::from_secs(2), |s| s.timeouts == 8);
        assert_eq!(
            (stats.timeouts, stats.active, stats.refused_busy),
            (8, 0, 12)
        );
    }

    /// 700 never-acknowledged requests with `timeout=255` from 12 addresses and 700 ports: the
    /// server keeps answering, holds at most its caps, refuses the rest with an ERROR, and lets
    /// everything go after `retries x timeout`.
    #[test]
    fn a_flood_of_silent_clients_costs_bounded_sockets_and_time() {
        let limits = TftpLimits {
            timeout: Duration::from_millis(500),
            retries: 4,
            ..TftpLimits::default()
        };
        let (cap, per_client) = (limits.max_transfers, limits.max_per_client);
        let release = limits.timeout * limits.retries;
        let fixture = start("flood", limits);
        let addresses: Vec<Ipv4Addr> = (1..=12).map(|i| Ipv4Addr::new(127, 0, 1, i)).collect();
        let request = rrq(b"small.bin", b"octet", &[("timeout", "255")]);
        let (mut held, mut refused, mut most_sockets) = (Vec::new(), 0, 0);
        let mut clients = HashSet::new();
        let started = Instant::now();
        for batch in 0..7 {
            let sockets: Vec<StdSocket> = (0..100)
                .map(|i| client(addresses[(batch * 100 + i) % addresses.len()]))
                .collect();
            for socket in &sockets {
                clients.insert(socket.local_addr().unwrap());
                socket.send_to(&request, fixture.addr).unwrap();
            }
            for socket in sockets {
                let (answer, from) = receive(&socket);
                match packet::parse(&answer) {
                    // timeout alone is not acknowledged: no OACK, DATA 1 at once.
                    Ok(Packet::Data { block: 1, .. }) if from != fixture.addr => held.push(socket),
                    Ok(Packet::Error { message, .. })
                        if message == BUSY && from == fixture.addr =>
                    {
                        refused += 1
                    }
                    other => panic!("{other:?} from {from}"),
                }
            }
            most_sockets = most_sockets.max(sockets_connected_to(&clients));
            if batch == 3 {
                assert_eq!(
                    curl(&fixture, "small.bin", &[]),
                    fixture.small,
                    "mid-flood download"
                );
            }
        }
        let flood_took = started.elapsed();
        assert_eq!(held.len() + refused, 700, "every request was answered");
        // A counter moves once its ERROR is out: the client may be quicker.
        let stats = wait_for(&fixture.stats, Duration::from_secs(1), |s| {
            s.errors_sent >= refused as u64
        });
        assert_eq!(stats.refused_busy, refused as u64);
        assert!(stats.errors_sent >= refused as u64);
        assert!(
            stats.peak_active <= addresses.len() * per_client + 1 && stats.peak_active <= cap,
            "{stats:?}"
        );
        assert!(
            most_sockets <= stats.peak_active && most_sockets > 0,
            "{most_sockets} transfer sockets, {stats:?}"
        );
        let stats = wait_for(&fixture.stats, release + Duration::from_secs(2), |s| {
            s.active == 0
        });
        let released_after = started.elapsed() - flood_took;
        assert_eq!(stats.active, 0, "still holding transfers: {stats:?}");
        assert!(
            released_after <= release + Duration::from_secs(1),
            "released {released_after:?} after the flood"
        );
        assert_eq!(stats.timeouts, held.len() as u64, "{stats:?}");
        assert_eq!(stats.served, 1, "the mid-flood download");
        assert_eq!(
            sockets_connected_to(&clients),
            0,
            "every transfer socket closed"
        );
    }

    #[test]
    fn log_lines_are_throttled_per_client_and_event() {
        let mut throttle = Throttle::new(Duration::from_secs(60));
        let start = Instant::now();
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(throttle.admit(Event::Busy, ip, start), Some(0));
        for second in 1..60 {
            let at = start + Duration::from_secs(second);
            assert_eq!(throttle.admit(Event::Busy, ip, at), None);
        }
        assert_eq!(throttle.admit(Event::Timeout, ip, start), Some(0));
        assert_eq!(throttle.admit(Event::Busy, other, start), Some(0));
        let later = start + Duration::from_secs(60);
        assert_eq!(throttle.admit(Event::Busy, ip, later), Some(59));
        // A flood from ever new addresses fills the table, then shares one line a minute.
        let mut logged = 0;
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i));
            logged += usize::from(throttle.admit(Event::Busy, ip, later).is_some());
        }
        assert!(throttle.last.len() <= THROTTLE_ENTRIES + 1);
        assert!(logged <= THROTTLE_ENTRIES, "{logged}");
    }

    #[test]
    fn descriptor_exhaustion_is_recognised() {
        let emfile = io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        let enfile = io::Error::from_raw_os_error(nix::errno::Errno::ENFILE as i32);
        let other = io::Error::from_raw_os_error(nix::errno::Errno::EACCES as i32);
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for (source, expected) in [(emfile, true), (enfile, true), (other, false)] {
            let error = TftpError::TransferSocket { ip, source };
            assert_eq!(error.is_descriptor_exhaustion(), expected, "{error}");
        }
    }
}
