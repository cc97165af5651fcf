//! The sender's edge: a multicast socket, the clock, and [`Sender`] driven over them until every
//! receiver is done or failed.

use crate::socket::{self, NetError};
use diskcast_proto::manifest::{Manifest, DEFAULT_CHUNK_SIZE};
use diskcast_proto::sender::{
    ChunkSource, Outcome, Phase, ReceiverReport, Sender, SenderConfig, SenderEvent,
};
use diskcast_proto::units::Rate;
use diskcast_proto::wire::{Destination, ReceiverState};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("multicasting on the session socket")]
    Io(#[from] std::io::Error),
    #[error("no receiver joined within the start timeout")]
    NoReceivers,
    #[error("no receiver joined, and none of those the session waited for will come any more")]
    NobodyExpected,
    #[error("the image is empty (0 bytes): there is nothing to send")]
    EmptyImage,
    #[error("reading the source failed: {0}")]
    Source(String),
    #[error("{failed} of {total} receivers failed")]
    ReceiversFailed { failed: usize, total: usize },
    #[error("--block-size: {0}")]
    BlockSize(#[from] diskcast_proto::wire::BlockSizeError),
}

/// How a sender runs a session: where, how fast, and when to start and give up.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Interface to multicast on; the first with an IPv4 address when `None`.
    pub interface: Option<String>,
    pub group: Ipv4Addr,
    pub port: u16,
    pub ttl: u8,
    /// Upper bound of the data rate.
    pub max_rate: Rate,
    /// How far a machine that loses most datagrams may slow the session down; one that still
    /// does at this rate is dropped, saying so.
    pub min_rate: Rate,
    /// Start once this many receivers joined...
    pub min_receivers: u32,
    /// ...or this long after starting, with whoever joined.
    pub start_timeout: Option<Duration>,
    /// Drop receivers not done this long after the data started ("drop" policy).
    pub deadline: Option<Duration>,
    pub receiver_timeout: Duration,
    pub chunk_size: u32,
    /// Session id; random when `None`.
    pub session: Option<u32>,
    /// Signs the session; receivers that trust its public key join it. `None`: an unsigned
    /// session, which only receivers that trust anyone (`--trust-any`) join.
    pub signing_key: Option<diskcast_proto::trust::SigningKey>,
    /// Parity repairs (when at least two receivers take part); `false`: exact blocks only.
    pub parity: bool,
    /// Parity shards sent with each chunk in the first pass, as a fraction of its blocks (0:
    /// parity only on request), for networks known to lose that much.
    pub proactive_parity: f64,
    /// zstd level a sender reading a raw disk compresses its chunks with; `None` sends them raw.
    /// (An image store's chunks travel as they are stored.)
    pub compress: Option<i32>,
    /// The UDP port of the sender's own socket: relays on subnets the group does not reach
    /// subscribe to ADDRESS:PORT (see `diskcast_proto::relay`). `None`: any free port.
    pub relay_port: Option<u16>,
    /// Data bytes per datagram. The default fits a 1500-byte MTU: the sender cannot know the
    /// MTU of every receiver's link (PXE-booted machines stay at 1500, and a switch port or
    /// router with a smaller MTU drops larger frames without a word to the sender).
    pub block_size: BlockSize,
}

/// How big a session's data blocks are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSize {
    /// As much as the sending interface's MTU takes without IP fragments (1408 at MTU 1500,
    /// 8896 at 9000): for a LAN where every receiver has that MTU too (jumbo frames).
    FromMtu,
    Bytes(u16),
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::Bytes(diskcast_proto::wire::DEFAULT_BLOCK_SIZE)
    }
}

impl SendOptions {
    /// A session on `group:port` via `interface` with every other setting at its default: no
    /// rate below the ceiling, start with the first receiver, wait for every receiver.
    pub fn new(interface: Option<String>, group: Ipv4Addr, port: u16) -> Self {
        Self {
            interface,
            group,
            port,
            ttl: 1,
            max_rate: Rate::DEFAULT_CEILING,
            min_rate: Rate::DEFAULT_FLOOR,
            min_receivers: 1,
            start_timeout: None,
            deadline: None,
            receiver_timeout: Duration::from_secs(30),
            chunk_size: DEFAULT_CHUNK_SIZE,
            session: None,
            signing_key: None,
            parity: true,
            proactive_parity: 0.0,
            compress: Some(DEFAULT_WIRE_LEVEL),
            relay_port: None,
            block_size: BlockSize::default(),
        }
    }
}

/// Parses a `--block-size BYTES|mtu` option: an even number of bytes a data datagram can
/// carry, or `mtu` for as much as the interface's MTU takes.
pub fn parse_block_size(text: &str) -> Result<BlockSize, String> {
    if text.trim().eq_ignore_ascii_case("mtu") {
        return Ok(BlockSize::FromMtu);
    }
    let bytes: u64 = text.trim().parse().map_err(|_| {
        format!("{text:?} is neither a number of bytes (e.g. 1408 or 8896) nor \"mtu\"")
    })?;
    diskcast_proto::wire::check_block_size(bytes)
        .map(BlockSize::Bytes)
        .map_err(|e| e.to_string())
}

/// zstd level for chunks compressed as they are read for the wire: level 1 compresses a typical
/// disk nearly as well as level 3 at about twice the speed.
pub const DEFAULT_WIRE_LEVEL: i32 = 1;

/// What a finished send reports.
#[derive(Debug, Clone)]
pub struct SendSummary {
    /// Waiting for receivers before the data started.
    pub waited: Duration,
    pub image_size: u64,
    pub data_bytes: u64,
    pub sent_bytes: u64,
    pub elapsed: Duration,
    pub receivers: Vec<ReceiverReport>,
    pub outcome: Outcome,
}

impl SendSummary {
    /// `Ok` only when every receiver verified its copy.
    pub fn result(&self) -> Result<(), SendError> {
        let downstream = self.receivers.iter().flat_map(|r| r.downstream.values());
        let downstream_failed = downstream
            .clone()
            .filter(|d| d.state != ReceiverState::Done)
            .count();
        match &self.outcome {
            // A relay verified its own copy; its receivers must have verified theirs too.
            Outcome::AllDone if downstream_failed > 0 => Err(SendError::ReceiversFailed {
                failed: downstream_failed,
                total: self.receivers.len() + downstream.count(),
            }),
            Outcome::AllDone => Ok(()),
            Outcome::NoReceivers => Err(SendError::NoReceivers),
            Outcome::NobodyExpected => Err(SendError::NobodyExpected),
            Outcome::SourceFailed { .. } => Err(SendError::Source(self.outcome.to_string())),
            Outcome::SomeFailed => Err(SendError::ReceiversFailed {
                failed: self
                    .receivers
                    .iter()
                    .filter(|r| r.state != ReceiverState::Done)
                    .count(),
                total: self.receivers.len(),
            }),
        }
    }
}

/// What a caller watches of a running session: the sender about once a second, and each event
/// as it happens. A closure `FnMut(&Sender)` watches progress only.
pub trait Observer {
    fn progress(&mut self, _sender: &Sender) {}
    fn event(&mut self, _sender: &Sender, _event: &SenderEvent) {}
    /// While the session waits for its receivers (about once a second): how many it should
    /// still wait for, when the caller learned that some will not come. `None`: no change.
    fn still_expected(&mut self, _sender: &Sender) -> Option<u32> {
        None
    }
}

impl<F: FnMut(&Sender)> Observer for F {
    fn progress(&mut self, sender: &Sender) {
        self(sender)
    }
}

/// How often the caller's progress view is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Datagrams sent between two looks at the receivers' reports.
const LISTEN_EVERY: u32 = 64;

/// Multicasts an image described by `manifest` whose chunks `source` serves (raw from a disk,
/// or stored, possibly compressed, from an image file) until every receiver is done or failed.
/// `observer` sees the sender about once a second and every event.
pub fn multicast(
    opts: &SendOptions,
    manifest: Manifest,
    source: &mut dyn ChunkSource,
    mut observer: impl Observer,
) -> Result<SendSummary, SendError> {
    if manifest.image_size == 0 {
        return Err(SendError::EmptyImage);
    }
    if !opts.group.is_multicast() {
        return Err(NetError::NotMulticast(opts.group).into());
    }
    let (interface, address) = socket::interface_ipv4(opts.interface.as_deref())?;
    let (block_size, why) = socket::choose_block_size(opts.block_size, &interface)?;
    let socket =
        socket::sender_socket(&interface, address, opts.relay_port.unwrap_or(0), opts.ttl)?;
    socket.set_nonblocking(true)?;
    // Receivers see the socket's own address: the signatures bind it.
    let local = socket.local_addr()?;
    let group = SocketAddrV4::new(opts.group, opts.port);
    let session = opts.session.unwrap_or_else(|| crate::random_u64() as u32);
    let max_rate = opts.max_rate.bytes_per_sec();
    let cfg = SenderConfig {
        session,
        min_receivers: opts.min_receivers,
        start_timeout: opts.start_timeout,
        deadline: opts.deadline,
        receiver_timeout: opts.receiver_timeout,
        max_rate,
        min_rate: opts.min_rate.bytes_per_sec(),
        initial_rate: max_rate.min(100_000_000),
        nonce_seed: crate::random_u64(),
        signing_key: opts.signing_key.clone(),
        address: local,
        parity: opts.parity,
        proactive_parity: opts.proactive_parity,
        block_size,
        ..SenderConfig::default()
    };
    match &opts.signing_key {
        Some(key) => log::info!("session signed with key {}", key.public()),
        None => log::warn!(
            "the session is unsigned: only receivers that trust any sender (--trust-any, diskcast.trust=any) join it"
        ),
    }
    log::info!(
        "session {session:08x} on {group} via {interface} ({address}); waiting for {} receiver(s){}",
        opts.min_receivers,
        opts.start_timeout
            .map_or(String::new(), |t| format!(" or {} s", t.as_secs()))
    );
    log::info!("data blocks of {block_size} bytes ({why})");
    let started = Instant::now();
    let mut sender = Sender::new(cfg, manifest, started);
    let mut buf = vec![0u8; 2048];
    let mut batch = socket::GsoBatch::new(group, socket::interface_mtu(&interface).ok());
    let mut next_progress = started + PROGRESS_EVERY;
    let hear = |sender: &mut Sender, buf: &mut [u8]| {
        while let Ok((n, from)) = socket.recv_from(buf) {
            sender.handle_datagram(&buf[..n], from, Instant::now());
        }
    };
    loop {
        let mut now = Instant::now();
        sender.handle_timeout(now);
        let mut sent = 0u32;
        while let Some(transmit) = sender.poll_transmit(now, source) {
            match transmit.destination {
                Destination::Group => batch.push(&socket, &transmit.bytes)?,
                // Replies to one receiver: lost ones are asked for again.
                Destination::Peer(to) => {
                    let _ = socket.send_to(&transmit.bytes, to);
                }
            }
            sent += 1;
            if sent.is_multiple_of(LISTEN_EVERY) {
                hear(&mut sender, &mut buf);
                now = Instant::now();
            }
        }
        batch.flush(&socket)?;
        while let Some(event) = sender.poll_event() {
            log::debug!("session {session:08x}: {event:?}");
            observer.event(&sender, &event);
        }
        if sender.phase() == Phase::Ended {
            break;
        }
        hear(&mut sender, &mut buf);
        let now = Instant::now();
        if now >= next_progress {
            observer.progress(&sender);
            if sender.phase() == Phase::Waiting {
                if let Some(expected) = observer.still_expected(&sender) {
                    sender.expect_fewer(expected, now);
                }
            }
            next_progress = now + PROGRESS_EVERY;
        }
        let wake = sender
            .poll_timeout()
            .map_or(next_progress, |t| t.min(next_progress));
        if wake > now {
            socket::wait_readable(&socket, wake - now);
        }
    }
    let outcome = sender.outcome().cloned().unwrap_or(Outcome::SomeFailed);
    let stats = sender.stats;
    let (user, system) = crate::cpu_seconds();
    log::info!(
        "sent {} data datagrams ({} first pass, {} repairs), {} manifest datagrams; {} malformed and {} foreign datagrams dropped; cpu {user:.2} s user, {system:.2} s system",
        stats.data_datagrams,
        stats.data_datagrams - stats.repair_datagrams,
        stats.repair_datagrams,
        stats.manifest_datagrams,
        stats.malformed,
        stats.foreign
    );
    let data_started = sender.data_started().unwrap_or(started);
    Ok(SendSummary {
        waited: data_started.duration_since(started),
        elapsed: data_started.elapsed(),
        image_size: sender.manifest().image_size,
        data_bytes: sender.manifest().data_bytes(),
        sent_bytes: stats.data_bytes,
        receivers: sender.receivers().cloned().collect(),
        outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_options_are_checked_with_what_to_give() {
        assert_eq!(parse_block_size("1408"), Ok(BlockSize::Bytes(1408)));
        assert_eq!(parse_block_size("65480"), Ok(BlockSize::Bytes(65480)));
        assert_eq!(parse_block_size("mtu"), Ok(BlockSize::FromMtu));
        assert_eq!(
            SendOptions::new(None, Ipv4Addr::LOCALHOST, 1).block_size,
            BlockSize::Bytes(1408)
        );
        for (bad, says) in [
            ("1409", "even"),
            ("256", "give 512 to 65480 bytes"),
            ("65482", "give 512 to 65480 bytes"),
            ("100000", "give 512 to 65480 bytes"),
            ("9k", "neither a number of bytes"),
            ("-1", "neither a number of bytes"),
        ] {
            let e = parse_block_size(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
