//! The relay's edge: [`diskcast_proto::relay::Relay`] driven over two sockets — one unicast
//! socket to the sender across the router, one multicasting into the relay's own subnet — with a
//! spool file holding the chunks it relays.
//!
//! The spool is a file, not memory: a relay carries a whole disk image, which may be larger than
//! its RAM, and it must serve its receivers' repairs of any chunk until the last one is done.
//! Chunks are appended as they arrive (in their wire form, compressed as they travelled) and read
//! back one chunk at a time; the page cache keeps recent ones in memory, so the cut-through path
//! (a chunk forwarded right after it arrived) rarely touches the disk. The file is deleted when
//! the relay ends.

use crate::socket::{self, NetError};
use diskcast_proto::receiver::{Failure, ReceiverConfig};
use diskcast_proto::relay::{Leg, Relay, RelayConfig, RelayEvent};
use diskcast_proto::sender::{ChunkSource, Outcome, ReceiverReport, SenderConfig};
use diskcast_proto::trust::Trust;
use diskcast_proto::units::Rate;
use diskcast_proto::wire::{Destination, MAX_UDP_PAYLOAD};
use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("relay socket {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("relay spool {path}: {source} (choose another directory with --spool-dir)")]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the relay's own copy failed: {0}")]
    Upstream(Failure),
    #[error("the relay's local session: {0}")]
    Local(Outcome),
}

#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The interface on the relay's subnet (default: the first with an IPv4 address).
    pub interface: Option<String>,
    /// The local group and port the relay multicasts to.
    pub group: Ipv4Addr,
    pub port: u16,
    pub ttl: u8,
    /// The sender's unicast address (its `--relay-port`).
    pub sender: SocketAddr,
    /// Whose sessions to relay: the relay checks them like any receiver.
    pub trust: Trust,
    pub id: u64,
    pub name: String,
    /// Start the local data once this many local receivers joined...
    pub min_receivers: u32,
    /// ...or this long after the manifest arrived, with whoever joined.
    pub start_timeout: Option<Duration>,
    pub max_rate: Rate,
    pub receiver_timeout: Duration,
    pub sender_timeout: Duration,
    /// Give up when no session was announced within this long.
    pub wait_timeout: Option<Duration>,
    /// Where the spool file goes.
    pub spool_dir: PathBuf,
}

/// How a relay ended.
#[derive(Debug, Clone)]
pub struct RelaySummary {
    pub upstream: Result<(), Failure>,
    pub local: Option<Outcome>,
    /// The local receivers.
    pub receivers: Vec<ReceiverReport>,
    /// Bytes received from the sender (everything on the upstream socket).
    pub upstream_bytes: u64,
    /// Bytes of chunks spooled.
    pub spooled: u64,
}

impl RelaySummary {
    /// `Ok` only when the relay's copy verified and every local receiver verified its copy.
    pub fn result(&self) -> Result<(), RelayError> {
        self.upstream.clone().map_err(RelayError::Upstream)?;
        match &self.local {
            Some(Outcome::AllDone) => Ok(()),
            Some(other) => Err(RelayError::Local(other.clone())),
            None => Err(RelayError::Local(Outcome::NoReceivers)),
        }
    }
}

/// Chunks kept in a file, appended as they arrive; read back one chunk at a time.
struct Spool {
    file: File,
    path: PathBuf,
    end: u64,
    at: HashMap<u32, (u64, usize)>,
    cached: Option<(u32, Vec<u8>)>,
}

impl Spool {
    fn create(dir: &Path) -> Result<Self, RelayError> {
        let path = dir.join(format!(
            "diskcast-relay-{}-{:08x}.spool",
            std::process::id(),
            crate::random_u64() as u32
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| RelayError::Spool {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            file,
            path,
            end: 0,
            at: HashMap::new(),
            cached: None,
        })
    }

    fn keep(&mut self, chunk: u32, bytes: &[u8]) -> std::io::Result<()> {
        if self.at.contains_key(&chunk) {
            return Ok(());
        }
        self.file.write_all_at(bytes, self.end)?;
        self.at.insert(chunk, (self.end, bytes.len()));
        self.end += bytes.len() as u64;
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ChunkSource for Spool {
    fn chunk(&mut self, index: u32) -> std::io::Result<&[u8]> {
        if self.cached.as_ref().is_none_or(|(c, _)| *c != index) {
            let (offset, len) = *self.at.get(&index).ok_or_else(|| {
                std::io::Error::other(format!("chunk {index} is not in the relay's spool"))
            })?;
            let mut buf = vec![0u8; len];
            self.file.read_exact_at(&mut buf, offset)?;
            self.cached = Some((index, buf));
        }
        Ok(self.cached.as_ref().map_or(&[][..], |(_, b)| b.as_slice()))
    }
}

const PROGRESS_EVERY: Duration = Duration::from_secs(1);
const LISTEN_EVERY: u32 = 64;

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> RelayError {
    move |source| RelayError::Io { what, source }
}

/// Relays one session: subscribes to the sender, re-multicasts what it receives on the local
/// group, serves the local receivers' repairs, and reports them upstream. `progress` sees the
/// relay about once a second.
pub fn run(opts: &RelayOptions, progress: impl FnMut(&Relay)) -> Result<RelaySummary, RelayError> {
    run_altering(opts, &mut |_, _| {}, progress)
}

/// [`run`], with `alter` applied to every chunk after it was checked and before it is spooled:
/// a hostile relay, for tests that show receivers refuse what a relay changed.
pub fn run_altering(
    opts: &RelayOptions,
    alter: &mut dyn FnMut(u32, &mut Vec<u8>),
    mut progress: impl FnMut(&Relay),
) -> Result<RelaySummary, RelayError> {
    if !opts.group.is_multicast() {
        return Err(NetError::NotMulticast(opts.group).into());
    }
    let (interface, address) = socket::interface_ipv4(opts.interface.as_deref())?;
    let upstream =
        UdpSocket::bind(SocketAddrV4::new(address, 0)).map_err(io("binding the upstream"))?;
    // Bursts from the sender arrive while a chunk is being checked: room for a few chunks.
    let _ = socket2::SockRef::from(&upstream).set_recv_buffer_size(16 << 20);
    let local = socket::sender_socket(&interface, address, 0, opts.ttl)?;
    upstream.set_nonblocking(true).map_err(io("setup"))?;
    local.set_nonblocking(true).map_err(io("setup"))?;
    let local_addr = local.local_addr().map_err(io("setup"))?;
    let group = SocketAddrV4::new(opts.group, opts.port);
    let mut spool = Spool::create(&opts.spool_dir)?;
    let max_rate = opts.max_rate.bytes_per_sec();
    let cfg = RelayConfig {
        upstream: ReceiverConfig {
            id: opts.id,
            incarnation: crate::random_u64() as u32,
            name: opts.name.clone(),
            serial: "relay".into(),
            disk_size: u64::MAX,
            sender_timeout: opts.sender_timeout,
            wait_timeout: opts.wait_timeout,
            trust: opts.trust.clone(),
            ..ReceiverConfig::default()
        },
        local: SenderConfig {
            min_receivers: opts.min_receivers,
            start_timeout: opts.start_timeout,
            receiver_timeout: opts.receiver_timeout,
            max_rate,
            initial_rate: max_rate.min(100_000_000),
            nonce_seed: crate::random_u64(),
            address: local_addr,
            ..SenderConfig::default()
        },
        sender: opts.sender,
        report_interval: Duration::from_millis(250),
    };
    log::info!(
        "relaying the session of {} onto {group} via {interface} ({address}); spool {}",
        opts.sender,
        spool.path.display()
    );
    let started = Instant::now();
    let mut relay = Relay::new(cfg, started);
    // The sender's data datagrams are as large as its blocks: up to a whole UDP datagram.
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD];
    let mut upstream_bytes = 0u64;
    let mut next_progress = started + PROGRESS_EVERY;
    let finished = loop {
        hear(&upstream, &local, &mut relay, &mut buf, &mut upstream_bytes);
        let now = Instant::now();
        if relay.poll_timeout().is_some_and(|t| t <= now) {
            relay.handle_timeout(now);
        }
        if let Some(done) = carry_out(&mut relay, &mut spool, alter)? {
            break done;
        }
        let mut sent = 0u32;
        let mut done = None;
        while let Some(t) = relay.poll_transmit(Instant::now(), &mut spool) {
            let (socket, to) = match (t.leg, t.transmit.destination) {
                (Leg::Upstream, Destination::Peer(to)) => (&upstream, to),
                (Leg::Upstream, Destination::Group) => continue,
                (Leg::Local, Destination::Peer(to)) => (&local, to),
                (Leg::Local, Destination::Group) => (&local, SocketAddr::V4(group)),
            };
            // A lost datagram is repaired or repeated like any other.
            let _ = socket.send_to(&t.transmit.bytes, to);
            sent += 1;
            if sent.is_multiple_of(LISTEN_EVERY) {
                hear(&upstream, &local, &mut relay, &mut buf, &mut upstream_bytes);
                done = carry_out(&mut relay, &mut spool, alter)?;
                if done.is_some() {
                    break;
                }
            }
        }
        if let Some(done) = done {
            break done;
        }
        if let Some(done) = carry_out(&mut relay, &mut spool, alter)? {
            break done;
        }
        let now = Instant::now();
        if now >= next_progress {
            progress(&relay);
            next_progress = now + PROGRESS_EVERY;
        }
        let wake = relay
            .poll_timeout()
            .map_or(next_progress, |t| t.min(next_progress));
        if wake > now {
            socket::wait_readable_any(&[upstream.as_fd(), local.as_fd()], wake - now);
        }
    };
    let (upstream_result, local_outcome) = finished;
    let receivers = relay
        .local()
        .map(|l| l.receivers().cloned().collect())
        .unwrap_or_default();
    Ok(RelaySummary {
        upstream: upstream_result,
        local: local_outcome,
        receivers,
        upstream_bytes,
        spooled: spool.end,
    })
}

/// Feeds what both sockets hold to the relay.
fn hear(
    upstream: &UdpSocket,
    local: &UdpSocket,
    relay: &mut Relay,
    buf: &mut [u8],
    upstream_bytes: &mut u64,
) {
    while let Ok((n, from)) = upstream.recv_from(buf) {
        *upstream_bytes += n as u64;
        relay.handle_upstream(&buf[..n], from, Instant::now());
    }
    while let Ok((n, from)) = local.recv_from(buf) {
        relay.handle_local(&buf[..n], from, Instant::now());
    }
}

type Finished = (Result<(), Failure>, Option<Outcome>);

/// Checks and spools the chunks the relay completed; returns how the relay ended, once it did.
fn carry_out(
    relay: &mut Relay,
    spool: &mut Spool,
    alter: &mut dyn FnMut(u32, &mut Vec<u8>),
) -> Result<Option<Finished>, RelayError> {
    while let Some(event) = relay.poll_event() {
        match event {
            RelayEvent::Keep(write) => {
                let chunk = write.chunk;
                match write.verified_wire() {
                    Ok(mut bytes) => {
                        alter(chunk, &mut bytes);
                        spool
                            .keep(chunk, &bytes)
                            .map_err(|source| RelayError::Spool {
                                path: spool.path.clone(),
                                source,
                            })?;
                        relay.handle_kept(chunk, Ok(()), Instant::now());
                    }
                    Err(e) => relay.handle_kept(chunk, Err(e.to_string()), Instant::now()),
                }
            }
            RelayEvent::Finished { upstream, local } => return Ok(Some((upstream, local))),
        }
    }
    Ok(None)
}

/// The summary printed when a relay ends: its own copy, then each local receiver.
pub fn render(summary: &RelaySummary) -> String {
    use diskcast_proto::wire::ReceiverState;
    let mut out = format!(
        "relay summary: upstream {}; {} received from the sender, {} spooled; local session: {}\n",
        match &summary.upstream {
            Ok(()) => "verified".to_string(),
            Err(e) => e.to_string(),
        },
        diskcast_proto::units::human_size(summary.upstream_bytes),
        diskcast_proto::units::human_size(summary.spooled),
        summary
            .local
            .as_ref()
            .map_or("never started".to_string(), ToString::to_string)
    );
    for r in &summary.receivers {
        out.push_str(&format!(
            "  {:<20} {}\n",
            crate::present::printable(&r.name),
            match (&r.state, &r.failure) {
                (ReceiverState::Done, _) => "verified".to_string(),
                (_, Some(why)) => crate::present::printable(&why.to_string()),
                _ => "unknown".to_string(),
            }
        ));
    }
    out
}
