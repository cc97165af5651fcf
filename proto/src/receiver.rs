//! The sans-IO receiver: waits for an announcement, joins with its disk geometry, collects the
//! manifest, assembles chunks block by block, hands each complete chunk to be checked and written,
//! asks for what it misses, and after the final flush reports the verified result.
//!
//! The contract, shared with the sender: the caller feeds datagrams
//! ([`Receiver::handle_datagram`]), completions of the disk work it was given
//! ([`Receiver::handle_disk`]) and the time ([`Receiver::handle_timeout`]); it takes datagrams
//! for the sender from [`Receiver::poll_transmit`] and disk work and the end from
//! [`Receiver::poll_event`], and sleeps until [`Receiver::poll_timeout`] or the next datagram.
//!
//! The states carry their own data: nothing about a session exists before its announcement, and
//! nothing about chunks survives the report.

use crate::bits::BitSet;
use crate::manifest::{ChunkKind, Hash, Manifest};
use crate::trust::{Trust, Untrusted};
use crate::wire::{
    Body, DataRef, Destination, Nak, Packet, ReceiverState, Transmit, Verdict, ANNOUNCE_COMPRESSED,
    ANNOUNCE_FIRST_PASS_DONE, ANNOUNCE_PARITY, DATA_REPAIR, MAX_BLOCK_SIZE, MAX_DATAGRAM,
    MIN_BLOCK_SIZE, REFUSAL_TOO_SMALL, REFUSAL_UNSIGNED, REFUSAL_UNTRUSTED_KEY,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Largest manifest a receiver accepts: about two million chunks, petabytes at 1 MiB chunks.
const MAX_MANIFEST_LEN: u32 = 64 << 20;

/// Chunk, block and manifest sizes an announcement may claim: a chunk within the manifest's
/// limits, blocks that fit a UDP datagram (fragmented above the MTU) and number at most 65536 per chunk (the wire's u16 index).
fn announced_geometry_is_sane(chunk_size: u32, block_size: u16, manifest_len: u32) -> bool {
    crate::manifest::valid_chunk_size(chunk_size)
        && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        && (chunk_size as usize).div_ceil(usize::from(block_size)) <= 1 << 16
        && manifest_len <= MAX_MANIFEST_LEN
}

/// Bytes of NAKs that fit one status datagram next to its fixed fields.
const NAK_ROOM: usize = MAX_DATAGRAM - 80;
/// Status datagrams per interval at most.
const MAX_STATUS_DATAGRAMS: usize = 32;
/// Arrivals of one chunk that fail their hash before the copy gives up.
const MAX_REJECTIONS: u32 = 4;
/// How long a verified (or failed) receiver repeats its result waiting for the sender's ack.
const REPORT_FOR: Duration = Duration::from_secs(10);
/// How far a Data datagram's sequence number may run ahead of the last announced one: far more
/// than any link carries in an announce interval, far less than a forged `u64::MAX`, which would
/// make every NAK look newer than any repair in flight.
const SEQ_SLACK: u64 = 1 << 22;
/// Sessions refused recently, by (session, sender): each is refused aloud once, not at every
/// announcement.
const REMEMBERED_REFUSALS: usize = 16;

#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Stable across restarts of the same machine and target, so a restarted receiver rejoins.
    pub id: u64,
    /// Different for every run of a receiver (random), so the sender tells a restart from a
    /// repeated Join.
    pub incarnation: u32,
    pub name: String,
    pub serial: String,
    pub disk_size: u64,
    pub logical_block: u32,
    /// Only this session, or the first one heard.
    pub session: Option<u32>,
    /// Chunks being assembled at once; more are dropped and asked for again later.
    pub max_partial_chunks: usize,
    pub status_interval: Duration,
    /// Give up when nothing is heard from the sender for this long (before and during the data).
    pub sender_timeout: Duration,
    /// Give up waiting for a first announcement after this long.
    pub wait_timeout: Option<Duration>,
    /// Whose sessions to join: announcements (and the sender's Welcome, DoneAck and End) that
    /// do not verify against these keys are refused or dropped before anything is written.
    /// The default trusts nobody.
    pub trust: Trust,
    /// Chunk writes the caller's disk side queues before it stops taking more (and its network
    /// loop waits, so the socket overflows): from half of that on, reports tell the sender the
    /// rate the disk writes at.
    pub disk_queue: usize,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            id: 1,
            incarnation: 0,
            name: String::new(),
            serial: String::new(),
            disk_size: u64::MAX,
            logical_block: 512,
            session: None,
            max_partial_chunks: 64,
            status_interval: Duration::from_millis(100),
            sender_timeout: Duration::from_secs(30),
            wait_timeout: None,
            trust: Trust::default(),
            disk_queue: DISK_QUEUE,
        }
    }
}

/// The agent's disk queue: chunk writes waiting for the disk (16 MiB of 1 MiB chunks).
pub const DISK_QUEUE: usize = 16;
/// The disk's rate is measured over windows at least this long: a flush or a read-back check
/// stalls writes for a moment, and a rate from that moment alone would stop the session.
const DISK_RATE_WINDOW: Duration = Duration::from_millis(250);

/// A measured disk rate older than this is forgotten (the disk was idle or nearly so since):
/// the next report waits for a new measurement rather than repeat it.
const DISK_RATE_MEMORY: Duration = Duration::from_secs(5);
/// Of a rate window, the disk must have been busy this long for its rate to be believed.
const DISK_MIN_BUSY: Duration = Duration::from_millis(50);

/// How the disk keeps up with the network: the chunk writes handed to it and not done yet, and
/// the rate at which it completes them (in bytes of chunks as they travel, what the sender paces).
/// The rate counts only the time writes were queued: over a whole window, the moments the disk
/// waited for the network would understate it, the sender would slow down to that, the disk
/// would wait longer, and the session would spiral down.
#[derive(Debug)]
struct DiskPace {
    queued: usize,
    /// The caller's queue (`ReceiverConfig::disk_queue`).
    limit: usize,
    window_start: Instant,
    window_bytes: u64,
    /// Time in this window with writes queued, besides the stretch since `busy_since`.
    busy: Duration,
    busy_since: Option<Instant>,
    /// Bytes per second of busy time, smoothed over the windows that had enough of it, and when
    /// it was last measured; `None` until one had.
    rate: Option<(f64, Instant)>,
    /// The queue was past half at the last report: a report is not hurried again for it.
    filling: bool,
}

impl DiskPace {
    fn new(now: Instant) -> Self {
        Self {
            queued: 0,
            limit: DISK_QUEUE,
            window_start: now,
            window_bytes: 0,
            busy: Duration::ZERO,
            busy_since: None,
            rate: None,
            filling: false,
        }
    }

    fn past_half(&self) -> bool {
        self.queued * 2 >= self.limit.max(2)
    }

    fn queued_one(&mut self, now: Instant) {
        if self.queued == 0 {
            self.busy_since = Some(now.max(self.window_start));
        }
        self.queued += 1;
    }

    fn written(&mut self, wire_bytes: usize, now: Instant) {
        self.queued = self.queued.saturating_sub(1);
        self.window_bytes += wire_bytes as u64;
        if self.queued == 0 {
            if let Some(since) = self.busy_since.take() {
                self.busy += now.saturating_duration_since(since);
            }
        }
    }

    /// What a report says: the disk's rate in kB/s while the queue is past half of `limit` (at
    /// least 1: a disk that wrote nothing in a busy window is still a limit), else 0 ("keeps up",
    /// also while no recent measurement exists).
    fn report(&mut self, now: Instant) -> u32 {
        if now.saturating_duration_since(self.window_start) >= DISK_RATE_WINDOW {
            let busy = self.busy
                + self
                    .busy_since
                    .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
            if busy >= DISK_MIN_BUSY {
                // A window that wrote nothing while busy is a stall, and counts: the disk is
                // then slower than any rate the session could keep.
                let sample = self.window_bytes as f64 / busy.as_secs_f64();
                let smoothed = match self.rate {
                    Some((rate, at)) if now.saturating_duration_since(at) < DISK_RATE_MEMORY => {
                        (rate + sample) / 2.0
                    }
                    _ => sample,
                };
                self.rate = Some((smoothed, now));
            }
            self.window_bytes = 0;
            self.busy = Duration::ZERO;
            self.window_start = now;
            if self.busy_since.is_some() {
                self.busy_since = Some(now);
            }
        }
        self.filling = self.past_half();
        match self.rate {
            Some((rate, at))
                if self.filling && now.saturating_duration_since(at) < DISK_RATE_MEMORY =>
            {
                ((rate / 1000.0) as u32).max(1)
            }
            _ => 0,
        }
    }
}

/// Disk work and the end of the copy, for the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Decode and write a chunk (see [`ChunkWrite`]); report with [`DiskDone::Written`], or
    /// [`DiskDone::Rejected`] when it does not decode.
    Write(ChunkWrite),
    /// Make a range read as zeros; report with [`DiskDone::Zeroed`].
    Zero { offset: u64, len: u64 },
    /// Everything is written: flush, re-read the image, compare with the manifest, report with
    /// [`DiskDone::Verified`].
    FlushAndVerify { manifest: Box<Manifest> },
    /// The end: `Ok` only when the copy verified.
    Finished(Result<(), Failure>),
}

/// What the disk side finished, fed back with [`Receiver::handle_disk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskDone {
    Written {
        chunk: u32,
    },
    /// The chunk did not decode to its hash; nothing was written.
    Rejected {
        chunk: u32,
        why: String,
    },
    Zeroed {
        len: u64,
    },
    /// The image hash computed from what the target holds after the final flush, or why it could
    /// not be read.
    Verified(Result<Hash, String>),
    /// A disk operation failed: the copy cannot complete.
    Failed(String),
}

/// Why a copy failed. A receiver ends with one of these, never with "complete".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The announced image does not fit this target; nothing was written.
    TargetTooSmall { disk_size: u64, image_size: u64 },
    /// The sender refused this target as too small.
    RefusedAsTooSmall { disk_size: u64 },
    /// The session was already ending when this receiver joined.
    TooLate,
    /// The sender gave up on this receiver.
    Dropped { chunks_done: u32, chunks_total: u32 },
    /// The sender gave up on this receiver because it lost most datagrams even at the session's
    /// lowest rate; it took in `received_percent` of what the sender numbered.
    TooSlow {
        chunks_done: u32,
        chunks_total: u32,
        received_percent: u8,
    },
    NoSession {
        waited: Duration,
        /// The last session refused meanwhile, and why, as the receiver said it.
        refused: Option<String>,
    },
    SenderSilent {
        timeout: Duration,
        chunks_done: u32,
        chunks_total: u32,
    },
    SenderEnded {
        aborted: bool,
        chunks_done: u32,
        chunks_total: u32,
    },
    /// The sender announced an image of zero bytes: there is nothing to copy or verify.
    EmptyImage,
    /// One chunk kept arriving damaged: the sender's copy is bad.
    DamagedAtSource { chunk: u32, times: u32, why: String },
    /// The copy read back after the final flush is not the image.
    ReadBackDiffers,
    /// Writing, zeroing, flushing or reading back failed (the disk side's words).
    Disk(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TargetTooSmall {
                disk_size,
                image_size,
            } => write!(
                f,
                "target too small: {disk_size} bytes, the image needs {image_size} bytes; nothing was written"
            ),
            Self::RefusedAsTooSmall { disk_size } => write!(
                f,
                "the sender refused this target as too small ({disk_size} bytes)"
            ),
            Self::TooLate => f.write_str("the session was already ending when this receiver joined"),
            Self::Dropped {
                chunks_done,
                chunks_total,
            } => write!(
                f,
                "the sender dropped this receiver (too slow or too lossy; {chunks_done} of {chunks_total} chunks done)"
            ),
            Self::TooSlow {
                chunks_done,
                chunks_total,
                received_percent,
            } => write!(
                f,
                "the sender dropped this receiver: it lost most datagrams even at the session's \
                 lowest rate (took in about {received_percent} % of them; {chunks_done} of \
                 {chunks_total} chunks done). Its NIC or network cannot keep up: image it in a \
                 session of its own, or lower the session's min_rate"
            ),
            Self::NoSession { waited, refused } => {
                write!(
                    f,
                    "no sender announced a session within {} s",
                    waited.as_secs()
                )?;
                if let Some(refused) = refused {
                    write!(f, " that this receiver trusts (refused: {refused})")?;
                }
                Ok(())
            }
            Self::SenderSilent {
                timeout,
                chunks_done,
                chunks_total,
            } => write!(
                f,
                "the sender went silent for {} s ({chunks_done} of {chunks_total} chunks done)",
                timeout.as_secs()
            ),
            Self::SenderEnded {
                aborted,
                chunks_done,
                chunks_total,
            } => write!(
                f,
                "the sender {} the session before this copy was complete ({chunks_done} of {chunks_total} chunks)",
                if *aborted { "aborted" } else { "ended" }
            ),
            Self::DamagedAtSource { chunk, times, why } => write!(
                f,
                "{why}, {times} times: the sender's chunk {chunk} does not match its manifest — \
                 its source changed after it was scanned (a disk in use), or its stored image is \
                 damaged (`bootserver images verify` names the damage)"
            ),
            Self::EmptyImage => f.write_str(
                "the sender announced an empty image (0 bytes): nothing was written; its source is broken",
            ),
            Self::ReadBackDiffers => {
                f.write_str("the copy read back from the target does not match the image")
            }
            Self::Disk(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for Failure {}

/// A complete chunk as it travelled. It is decoded (decompressed, its raw bytes checked against
/// the hash) at the disk side, so the network thread only assembles datagrams.
#[derive(Debug, PartialEq, Eq)]
pub struct ChunkWrite {
    pub chunk: u32,
    pub offset: u64,
    pub stored: Vec<u8>,
    pub kind: ChunkKind,
    pub raw_len: usize,
    /// Blocks lost on the way, to rebuild from parity first (`stored` holds zeros there).
    pub repair: Option<Box<crate::fec::Repair>>,
}

impl ChunkWrite {
    /// The raw bytes to write at `self.offset`, or why they cannot be trusted.
    pub fn decode(self) -> Result<Vec<u8>, crate::codec::CodecError> {
        self.decode_with(&mut crate::fec::Coder::default())
    }

    /// [`ChunkWrite::decode`] with a Reed–Solomon decoder kept between chunks (a disk writer
    /// keeps one, see [`crate::fec::Coder`]).
    pub fn decode_with(
        mut self,
        coder: &mut crate::fec::Coder,
    ) -> Result<Vec<u8>, crate::codec::CodecError> {
        if let Some(repair) = &self.repair {
            repair
                .rebuild_with(&mut self.stored, coder)
                .map_err(|source| crate::codec::CodecError::Rebuild {
                    chunk: self.chunk,
                    source,
                })?;
        }
        crate::codec::decode_owned(self.chunk, &self.kind, self.stored, self.raw_len)
    }

    /// The chunk as it travels (compressed or not, lost blocks rebuilt), once its decoded bytes
    /// matched their hash: what a relay keeps to serve its own receivers.
    pub fn verified_wire(mut self) -> Result<Vec<u8>, crate::codec::CodecError> {
        if let Some(repair) = self.repair.take() {
            repair.rebuild(&mut self.stored).map_err(|source| {
                crate::codec::CodecError::Rebuild {
                    chunk: self.chunk,
                    source,
                }
            })?;
        }
        crate::codec::decode_owned(self.chunk, &self.kind, self.stored.clone(), self.raw_len)?;
        Ok(self.stored)
    }
}

/// Where the receiver is, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Listening,
    Joining,
    Receiving,
    Verifying,
    Reporting,
    Finished,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverStats {
    pub datagrams: u64,
    pub malformed: u64,
    pub foreign: u64,
    pub duplicates: u64,
    pub dropped_for_memory: u64,
    /// Datagrams of the joined session from another address than its sender's, and the
    /// sender's datagrams whose signature does not verify.
    pub forged: u64,
    /// Announcements refused: unsigned, or not signed by a trusted key.
    pub untrusted: u64,
    pub corrupt_chunks: u64,
    /// Data of a compressed image that came before the manifest (asked for again later).
    pub before_manifest: u64,
    /// Socket buffer overflows reported by the caller.
    pub overflow: u32,
    /// Blocks this receiver lacked that came in a repair (a retransmission or a parity shard).
    pub repaired_blocks: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Data not yet complete.
    Missing,
    /// Complete, handed to the disk side.
    Writing,
    Written,
    /// Nothing to receive (zero or absent).
    NotSent,
}

#[derive(Debug)]
struct Partial {
    data: Vec<u8>,
    have: BitSet,
    /// Parity shards by index (see `fec.rs`): with the data blocks, any `blocks` complete it.
    parity: BTreeMap<u16, Vec<u8>>,
}

impl Partial {
    fn new(len: usize, blocks: usize) -> Self {
        Self {
            data: vec![0; len],
            have: BitSet::new(blocks),
            parity: BTreeMap::new(),
        }
    }

    fn shards(&self) -> usize {
        self.have.count() + self.parity.len()
    }
}

#[cfg(test)]
mod disk_pace_tests {
    use super::*;

    #[test]
    fn the_disk_rate_counts_busy_time_only_and_is_told_only_past_half_the_queue() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut pace = DiskPace::new(t0);
        // One chunk written in 10 ms, then the disk waits 300 ms for the network.
        pace.queued_one(t0);
        pace.written(1_000_000, ms(10));
        assert_eq!(pace.report(ms(310)), 0, "an empty queue keeps up");
        // Then 12 chunks queued at once, 4 written in the next 100 ms: 8 left, half of 16.
        for _ in 0..12 {
            pace.queued_one(ms(400));
        }
        for i in 1..=4 {
            pace.written(1_000_000, ms(400 + 25 * i));
        }
        // 4 MB in 250 ms of busy time: 16 MB/s, not the 4 MB per 250 ms window counted from
        // the window's start with the idle time in it.
        assert_eq!(pace.report(ms(650)), 16_000);
        // A busy window that wrote nothing is still a limit (the least there is), and below
        // half nothing is told.
        assert_eq!(pace.report(ms(1_000)), 8_000, "smoothed with the stall");
        pace.written(0, ms(1_010));
        assert_eq!(pace.report(ms(1_300)), 0);
    }
}

/// What the announcement told: enough to place blocks before the manifest is in.
#[derive(Debug, Clone)]
struct Geometry {
    image_size: u64,
    chunk_size: u32,
    block_size: u16,
    image_hash: Hash,
    compressed: bool,
}

/// The manifest: still being collected from its parts, or complete with a state per chunk.
#[derive(Debug)]
enum Chunks {
    Collecting {
        buf: Vec<u8>,
        have: BitSet,
        /// Complete chunks that arrived before the manifest.
        held: HashMap<u32, Vec<u8>>,
    },
    Known {
        manifest: Manifest,
        states: Vec<ChunkState>,
        /// Data chunks not written yet; zero means every one is.
        data_left: u32,
        /// Zero ranges handed out and not yet done.
        zero_pending: u32,
    },
}

/// One session from its announcement to the verified (or not) copy.
#[derive(Debug)]
struct Transfer {
    session: u32,
    sender: SocketAddr,
    /// From the sender's Welcome: what this receiver's reports carry.
    nonce: u64,
    /// The highest sequence number an announcement named.
    announced_seq: u64,
    geometry: Geometry,
    last_heard: Instant,
    next_status: Instant,
    chunks: Chunks,
    partial: HashMap<u32, Partial>,
    /// How often each chunk arrived complete but damaged.
    rejections: HashMap<u32, u32>,
    chunks_done: u32,
    /// The first pass has sent every chunk before this one.
    front: u32,
    first_pass_done: bool,
    highest_seq: u64,
    nak_cursor: u32,
    /// Bytes of the image's data chunks written so far (zeroed and absent chunks not counted).
    data_written: u64,
    /// The sender asks for parity requests (the latest announcement says so).
    parity_naks: bool,
    disk: DiskPace,
}

/// The verified or failed result, repeated until the sender acknowledges it.
#[derive(Debug)]
struct Report {
    session: u32,
    sender: SocketAddr,
    nonce: u64,
    image_hash: Hash,
    result: Result<(), Failure>,
    until: Instant,
    next_status: Instant,
    progress: (u32, u32),
    data_written: u64,
}

#[derive(Debug)]
enum State {
    Listening { since: Instant },
    Joining(Box<Transfer>),
    Receiving(Box<Transfer>),
    Verifying(Box<Transfer>),
    Reporting(Box<Report>),
    Finished(Result<(), Failure>),
}

/// Datagrams and events waiting for the caller.
#[derive(Debug, Default)]
struct Outbox {
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    state: State,
    out: Outbox,
    pub stats: ReceiverStats,
    /// Sessions refused (session, sender), most recent last; and the last refusal in words.
    refused: VecDeque<(u32, SocketAddr)>,
    last_refusal: Option<String>,
    /// The relay this receiver joined through (see `relay.rs`), once it did: the relay cannot
    /// sign for the sender, so its Welcome, DoneAck and End count unsigned. That trusts the
    /// relay with liveness only (it could end or drop this copy, as it could by going silent);
    /// what gets written is still bound by the sender's signed Announce through the image hash.
    relayed_by: Option<SocketAddr>,
}

fn packet(session: u32, body: Body) -> Vec<u8> {
    Packet { session, body }.emit()
}

impl Receiver {
    pub fn new(cfg: ReceiverConfig, now: Instant) -> Self {
        Self {
            cfg,
            state: State::Listening { since: now },
            out: Outbox::default(),
            stats: ReceiverStats::default(),
            refused: VecDeque::new(),
            last_refusal: None,
            relayed_by: None,
        }
    }

    /// Whether `packet` from `from` carries a signature this receiver trusts (always, when it
    /// trusts anyone). `incarnation`: for Welcome and DoneAck, whose signatures bind it.
    fn trusted(&self, packet: &Packet, from: SocketAddr) -> Result<(), Untrusted> {
        if self.cfg.trust.is_any() {
            return Ok(());
        }
        let incarnation = match packet.body {
            Body::Welcome { .. } | Body::DoneAck { .. } => Some(self.cfg.incarnation),
            _ => None,
        };
        let statement =
            crate::trust::datagram_statement(from, incarnation, &packet.signed_content());
        self.cfg
            .trust
            .check(&statement, packet.signature())
            .map(drop)
    }

    /// Refuses an announced session whose signature this receiver does not trust: says so in
    /// its log and to the sender, once per session, and keeps listening.
    fn refuse(&mut self, session: u32, from: SocketAddr, why: Untrusted) {
        self.stats.untrusted += 1;
        if self.refused.contains(&(session, from)) {
            return;
        }
        if self.refused.len() >= REMEMBERED_REFUSALS {
            self.refused.pop_front();
        }
        self.refused.push_back((session, from));
        let words = format!("session {session:08x} from {from}: {why}");
        log::warn!("refusing {words}; nothing written, still waiting for a trusted session");
        self.last_refusal = Some(words);
        let refusal = match why {
            Untrusted::Unsigned => REFUSAL_UNSIGNED,
            Untrusted::UnknownKey => REFUSAL_UNTRUSTED_KEY,
        };
        self.out.transmits.push_back(Transmit {
            destination: Destination::Peer(from),
            bytes: self.join_packet(session, refusal),
        });
    }

    pub fn phase(&self) -> Phase {
        match self.state {
            State::Listening { .. } => Phase::Listening,
            State::Joining(_) => Phase::Joining,
            State::Receiving(_) => Phase::Receiving,
            State::Verifying(_) => Phase::Verifying,
            State::Reporting(_) => Phase::Reporting,
            State::Finished(_) => Phase::Finished,
        }
    }

    fn transfer(&self) -> Option<&Transfer> {
        match &self.state {
            State::Joining(t) | State::Receiving(t) | State::Verifying(t) => Some(t),
            _ => None,
        }
    }

    /// How the copy ended, once it did.
    pub fn result(&self) -> Option<&Result<(), Failure>> {
        match &self.state {
            State::Finished(result) => Some(result),
            _ => None,
        }
    }

    /// The session joined (or being joined), once announced.
    pub fn session(&self) -> Option<u32> {
        match &self.state {
            State::Listening { .. } | State::Finished(_) => None,
            State::Reporting(r) => Some(r.session),
            State::Joining(t) | State::Receiving(t) | State::Verifying(t) => Some(t.session),
        }
    }

    pub fn manifest(&self) -> Option<&Manifest> {
        match &self.transfer()?.chunks {
            Chunks::Known { manifest, .. } => Some(manifest),
            Chunks::Collecting { .. } => None,
        }
    }

    /// (chunks done, chunks in the image)
    pub fn progress(&self) -> (u32, u32) {
        match &self.state {
            State::Reporting(r) => r.progress,
            _ => self.transfer().map_or((0, 0), Transfer::progress),
        }
    }

    pub fn image_size(&self) -> Option<u64> {
        self.transfer().map(|t| t.geometry.image_size)
    }

    /// The announced data bytes per datagram.
    pub fn block_size(&self) -> Option<u16> {
        self.transfer().map(|t| t.geometry.block_size)
    }

    /// Bytes of data chunks written to the disk so far, for rates (zeroed and absent chunks
    /// take no network time and are left out); 0 before the manifest and once finished.
    pub fn data_written(&self) -> u64 {
        match &self.state {
            State::Reporting(r) => r.data_written,
            _ => self.transfer().map_or(0, |t| t.data_written),
        }
    }

    /// The next datagram for the sender.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    /// The next piece of disk work, or the end.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.out.events.pop_front()
    }

    /// When [`Receiver::handle_timeout`] has something to do next: a status report, giving up on
    /// a silent sender, or the wait for a session running out. `None` while nothing is due
    /// without a datagram (waiting for a session without a limit), and once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Listening { since } => self.cfg.wait_timeout.map(|t| *since + t),
            State::Joining(t) | State::Receiving(t) | State::Verifying(t) => {
                Some(t.next_status.min(t.last_heard + self.cfg.sender_timeout))
            }
            State::Reporting(r) => Some(r.next_status.min(r.until)),
            State::Finished(_) => None,
        }
    }

    /// Socket buffer overflows counted by the kernel (SO_RXQ_OVFL), for the sender's pacing.
    pub fn set_overflow(&mut self, count: u32) {
        self.stats.overflow = count;
    }

    /// Ends the copy with `failure`: tells the sender (once a session is joined) and the caller.
    fn fail(&mut self, failure: Failure) {
        if matches!(self.state, State::Finished(_)) {
            return;
        }
        log::error!("receive failed: {failure}");
        let link = match &self.state {
            State::Joining(t) | State::Receiving(t) | State::Verifying(t) => {
                Some((t.session, t.sender, t.nonce))
            }
            State::Reporting(r) => Some((r.session, r.sender, r.nonce)),
            _ => None,
        };
        if let Some((session, to, nonce)) = link {
            self.out.transmits.push_back(Transmit {
                destination: Destination::Peer(to),
                bytes: packet(
                    session,
                    Body::Done {
                        receiver: self.cfg.id,
                        nonce,
                        ok: false,
                        image_hash: [0; 32],
                        reason: failure.to_string(),
                    },
                ),
            });
        }
        self.finish(Err(failure));
    }

    fn finish(&mut self, result: Result<(), Failure>) {
        self.out.events.push_back(Event::Finished(result.clone()));
        self.state = State::Finished(result);
    }

    fn join_packet(&self, session: u32, refusal: u8) -> Vec<u8> {
        packet(
            session,
            Body::Join {
                receiver: self.cfg.id,
                incarnation: self.cfg.incarnation,
                disk_size: self.cfg.disk_size,
                logical_block: self.cfg.logical_block,
                refusal,
                name: self.cfg.name.clone(),
                serial: self.cfg.serial.clone(),
            },
        )
    }

    /// The session, the sender (or relay) and this receiver's nonce, once joined: what a relay
    /// needs to report its own receivers upstream.
    pub fn link(&self) -> Option<(u32, SocketAddr, u64)> {
        match &self.state {
            State::Joining(t) | State::Receiving(t) | State::Verifying(t) => {
                Some((t.session, t.sender, t.nonce))
            }
            State::Reporting(r) => Some((r.session, r.sender, r.nonce)),
            _ => None,
        }
    }

    /// The sender's address once a session was announced.
    fn sender(&self) -> Option<SocketAddr> {
        match &self.state {
            State::Joining(t) | State::Receiving(t) | State::Verifying(t) => Some(t.sender),
            State::Reporting(r) => Some(r.sender),
            _ => None,
        }
    }

    /// Feeds one datagram received from `from`.
    pub fn handle_datagram(&mut self, bytes: &[u8], from: SocketAddr, now: Instant) {
        if self.sender().is_some_and(|sender| sender != from) {
            // Only the host that announced the session speaks for it: a stray or stale sender on
            // the group cannot end, drop, or feed this copy.
            self.stats.forged += 1;
            return;
        }
        let wanted = self.session().or(self.cfg.session);
        // The hot path: data is parsed in place, its payload copied once, into the chunk.
        if crate::wire::is_data(bytes) {
            match crate::wire::parse_data(bytes) {
                Err(_) => self.stats.malformed += 1,
                Ok((session, _)) if wanted.is_some_and(|s| s != session) => self.stats.foreign += 1,
                Ok((_, data)) => {
                    self.stats.datagrams += 1;
                    self.on_data(data, now);
                }
            }
            return;
        }
        if crate::wire::is_parity(bytes) {
            match crate::wire::parse_parity(bytes) {
                Err(_) => self.stats.malformed += 1,
                Ok((session, _)) if wanted.is_some_and(|s| s != session) => self.stats.foreign += 1,
                Ok((_, parity)) => {
                    self.stats.datagrams += 1;
                    self.on_parity(parity, now);
                }
            }
            return;
        }
        let packet = match Packet::parse(bytes) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        if wanted.is_some_and(|s| s != packet.session) {
            self.stats.foreign += 1;
            return;
        }
        self.stats.datagrams += 1;
        // What the sender says to this receiver or the group; a Welcome or DoneAck for another
        // receiver is ignored below anyway.
        let steering = match packet.body {
            Body::Announce { .. } | Body::End { .. } => true,
            Body::Welcome { receiver, .. } | Body::DoneAck { receiver, .. } => {
                receiver == self.cfg.id
            }
            _ => false,
        };
        if let Body::Relayed {
            front,
            seq,
            flags,
            origin,
            inner,
        } = &packet.body
        {
            let relay_state = (*front, *seq, *flags);
            self.on_relayed(packet.session, relay_state, *origin, inner, from, now);
            return;
        }
        if steering && self.relayed_by != Some(from) {
            if let Err(why) = self.trusted(&packet, from) {
                match (&self.state, &packet.body) {
                    (State::Listening { .. }, Body::Announce { .. }) => {
                        self.refuse(packet.session, from, why)
                    }
                    // Whatever its address: a sender's datagram without the sender's
                    // signature changes nothing.
                    _ => self.stats.forged += 1,
                }
                return;
            }
        }
        match packet.body {
            body @ Body::Announce { .. } => self.on_announce(packet.session, &body, from, now),
            Body::Welcome {
                receiver,
                verdict,
                nonce,
                ..
            } if receiver == self.cfg.id => self.on_welcome(verdict, nonce, now),
            Body::ManifestPart { offset, bytes } => {
                if let Some(t) = self.transfer_mut() {
                    t.last_heard = now;
                }
                self.manifest_part(offset, &bytes);
            }
            Body::Data {
                seq,
                chunk,
                block,
                flags,
                bytes,
            } => self.on_data(
                DataRef {
                    seq,
                    chunk,
                    block,
                    flags,
                    bytes: &bytes,
                },
                now,
            ),
            Body::DoneAck { receiver, .. } if receiver == self.cfg.id => {
                if let State::Reporting(_) = self.state {
                    self.end_report();
                }
            }
            Body::End { aborted, .. } => match &self.state {
                State::Reporting(_) => self.end_report(),
                State::Joining(t) | State::Receiving(t) => {
                    let (chunks_done, chunks_total) = t.progress();
                    self.fail(Failure::SenderEnded {
                        aborted,
                        chunks_done,
                        chunks_total,
                    });
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// An Announce (verified by the caller) from `from`: the sender, or the relay that
    /// re-multicasts it.
    fn on_announce(&mut self, session: u32, body: &Body, from: SocketAddr, now: Instant) {
        let Body::Announce {
            image_size,
            chunk_size,
            block_size,
            manifest_len,
            image_hash,
            front,
            seq,
            flags,
            signature: _,
        } = *body
        else {
            return;
        };
        if let State::Listening { .. } = self.state {
            // Everything sized from here on comes from the network: bound it before
            // allocating anything.
            if !announced_geometry_is_sane(chunk_size, block_size, manifest_len) {
                self.stats.malformed += 1;
                return;
            }
            if image_size == 0 {
                self.fail(Failure::EmptyImage);
                return;
            }
            if image_size > self.cfg.disk_size {
                self.out.transmits.push_back(Transmit {
                    destination: Destination::Peer(from),
                    bytes: self.join_packet(session, REFUSAL_TOO_SMALL),
                });
                self.fail(Failure::TargetTooSmall {
                    disk_size: self.cfg.disk_size,
                    image_size,
                });
                return;
            }
            let geometry = Geometry {
                image_size,
                chunk_size,
                block_size,
                image_hash,
                compressed: flags & ANNOUNCE_COMPRESSED != 0,
            };
            let mut transfer = Transfer::new(session, from, geometry, manifest_len, now);
            transfer.disk.limit = self.cfg.disk_queue;
            self.state = State::Joining(Box::new(transfer));
        }
        let Some(t) = self.transfer_mut() else {
            return;
        };
        if t.geometry.image_hash != image_hash {
            self.stats.foreign += 1;
            return;
        }
        t.last_heard = now;
        t.highest_seq = t.highest_seq.max(seq);
        t.announced_seq = t.announced_seq.max(seq);
        t.front = t.front.max(front);
        t.first_pass_done |= flags & ANNOUNCE_FIRST_PASS_DONE != 0;
        t.parity_naks = flags & ANNOUNCE_PARITY != 0;
    }

    /// A relay's re-multicast of the sender's Announce: the signature must verify for the
    /// sender's address (`origin`), as if this receiver had heard the sender itself; the relay
    /// then stands in for the sender (datagrams from it, reports to it).
    /// `relay_state`: the relay's own first-pass front, sequence number and flags, which stand
    /// in for the sender's (the relay's receivers are repaired by the relay, in its numbering).
    fn on_relayed(
        &mut self,
        session: u32,
        relay_state: (u32, u64, u8),
        origin: SocketAddr,
        inner: &[u8],
        from: SocketAddr,
        now: Instant,
    ) {
        let announce = match Packet::parse(inner) {
            Ok(p) if p.session == session && matches!(p.body, Body::Announce { .. }) => p,
            _ => {
                self.stats.malformed += 1;
                return;
            }
        };
        if let Err(why) = self.trusted(&announce, origin) {
            match self.state {
                State::Listening { .. } => self.refuse(session, from, why),
                _ => self.stats.forged += 1,
            }
            return;
        }
        let listening = matches!(self.state, State::Listening { .. });
        if !listening && self.relayed_by != Some(from) {
            // Joined directly from the sender: a relay's copy of the same session is not ours.
            self.stats.foreign += 1;
            return;
        }
        let Body::Announce {
            image_size,
            chunk_size,
            block_size,
            manifest_len,
            image_hash,
            ..
        } = announce.body
        else {
            return;
        };
        let (front, seq, flags) = relay_state;
        let body = Body::Announce {
            image_size,
            chunk_size,
            block_size,
            manifest_len,
            image_hash,
            front,
            seq,
            flags,
            signature: Vec::new(),
        };
        self.on_announce(session, &body, from, now);
        if listening && !matches!(self.state, State::Listening { .. }) {
            self.relayed_by = Some(from);
            log::info!("session {session:08x} from {origin} relayed by {from}");
        }
    }

    /// Moves the state out to change it by value; every caller puts a state back.
    fn take_state(&mut self) -> State {
        std::mem::replace(&mut self.state, State::Finished(Err(Failure::TooLate)))
    }

    fn transfer_mut(&mut self) -> Option<&mut Transfer> {
        match &mut self.state {
            State::Joining(t) | State::Receiving(t) | State::Verifying(t) => Some(t),
            _ => None,
        }
    }

    fn on_welcome(&mut self, verdict: Verdict, nonce: u64, now: Instant) {
        if let Some(t) = self.transfer_mut() {
            t.last_heard = now;
            t.nonce = nonce;
        }
        let joining = matches!(self.state, State::Joining(_));
        match verdict {
            Verdict::Accepted if joining => {
                self.state = match self.take_state() {
                    State::Joining(t) => {
                        log::info!("joined session {:08x}", t.session);
                        State::Receiving(t)
                    }
                    other => other,
                };
                // Everything may have arrived and been written while the Welcome was on its way.
                self.check_complete();
            }
            Verdict::TooSmall => self.fail(Failure::RefusedAsTooSmall {
                disk_size: self.cfg.disk_size,
            }),
            Verdict::Late if joining => self.fail(Failure::TooLate),
            Verdict::Dropped if !matches!(self.state, State::Reporting(_)) => {
                let (chunks_done, chunks_total) = self.progress();
                self.fail(Failure::Dropped {
                    chunks_done,
                    chunks_total,
                })
            }
            Verdict::TooSlow if !matches!(self.state, State::Reporting(_)) => {
                let (chunks_done, chunks_total) = self.progress();
                let numbered = self.transfer_mut().map_or(0, |t| t.highest_seq);
                let received_percent = (100 * self.stats.datagrams.min(numbered))
                    .checked_div(numbered)
                    .unwrap_or(0) as u8;
                self.fail(Failure::TooSlow {
                    chunks_done,
                    chunks_total,
                    received_percent,
                })
            }
            _ => {}
        }
    }

    fn on_data(&mut self, data: DataRef<'_>, now: Instant) {
        let max_partial = self.cfg.max_partial_chunks;
        let (State::Joining(t) | State::Receiving(t)) = &mut self.state else {
            return;
        };
        t.last_heard = now;
        let placed = t.data(&data, max_partial, &mut self.stats, &mut self.out);
        // Only a datagram that fits the image and whose sequence number is plausible may move
        // what this receiver believes was sent.
        if placed && data.seq <= t.announced_seq.saturating_add(SEQ_SLACK) {
            t.highest_seq = t.highest_seq.max(data.seq);
            if data.flags & DATA_REPAIR == 0 {
                t.front = t.front.max(data.chunk);
            }
        }
        self.check_complete();
    }

    /// A parity shard: `parity.block` is its index.
    fn on_parity(&mut self, parity: DataRef<'_>, now: Instant) {
        let max_partial = self.cfg.max_partial_chunks;
        let (State::Joining(t) | State::Receiving(t)) = &mut self.state else {
            return;
        };
        t.last_heard = now;
        let placed = t.parity(
            parity.chunk,
            parity.block,
            parity.bytes,
            max_partial,
            &mut self.stats,
            &mut self.out,
        );
        if placed && parity.seq <= t.announced_seq.saturating_add(SEQ_SLACK) {
            t.highest_seq = t.highest_seq.max(parity.seq);
        }
        self.check_complete();
    }

    fn manifest_part(&mut self, offset: u32, bytes: &[u8]) {
        let (State::Joining(t) | State::Receiving(t)) = &mut self.state else {
            return;
        };
        t.manifest_part(offset, bytes, &mut self.stats, &mut self.out);
        self.check_complete();
    }

    /// Feeds the completion of disk work handed out as an [`Event`].
    pub fn handle_disk(&mut self, done: DiskDone, now: Instant) {
        match done {
            DiskDone::Written { chunk } => {
                if let Some(t) = self.transfer_mut() {
                    t.chunk_written(chunk, now);
                }
                self.check_complete();
            }
            DiskDone::Rejected { chunk, why } => self.chunk_rejected(chunk, why, now),
            DiskDone::Zeroed { len } => {
                if let Some(t) = self.transfer_mut() {
                    t.zeroed(len);
                }
                self.check_complete();
            }
            DiskDone::Verified(result) => self.verified(result, now),
            DiskDone::Failed(why) => self.fail(Failure::Disk(why)),
        }
    }

    /// A chunk did not decode to bytes with its hash (corrupt in a way the CRCs missed, or a
    /// rogue sender): nothing was written; it is asked for again. A chunk that keeps arriving
    /// damaged is damaged at the source: the copy fails instead of asking forever.
    fn chunk_rejected(&mut self, chunk: u32, why: String, now: Instant) {
        let Some(t) = self.transfer_mut() else {
            return;
        };
        let Some(times) = t.chunk_rejected(chunk, now) else {
            return;
        };
        self.stats.corrupt_chunks += 1;
        if times >= MAX_REJECTIONS {
            self.fail(Failure::DamagedAtSource { chunk, times, why });
        } else {
            log::warn!("{why}; asking for it again");
        }
    }

    /// Every data chunk written and every zero range zeroed: flush and check the copy.
    fn check_complete(&mut self) {
        let State::Receiving(t) = &self.state else {
            return;
        };
        let Chunks::Known {
            manifest,
            data_left: 0,
            zero_pending: 0,
            ..
        } = &t.chunks
        else {
            return;
        };
        self.out.events.push_back(Event::FlushAndVerify {
            manifest: Box::new(manifest.clone()),
        });
        self.state = match self.take_state() {
            State::Receiving(t) => State::Verifying(t),
            other => other,
        };
    }

    fn verified(&mut self, result: Result<Hash, String>, now: Instant) {
        let State::Verifying(t) = &self.state else {
            return;
        };
        let result = match result {
            Ok(hash) if hash == t.geometry.image_hash => Ok(()),
            Ok(_) => Err(Failure::ReadBackDiffers),
            Err(e) => Err(Failure::Disk(e)),
        };
        self.state = State::Reporting(Box::new(Report {
            session: t.session,
            sender: t.sender,
            nonce: t.nonce,
            image_hash: t.geometry.image_hash,
            result,
            until: now + REPORT_FOR,
            next_status: now,
            progress: t.progress(),
            data_written: t.data_written,
        }));
        self.handle_timeout(now);
    }

    fn end_report(&mut self) {
        match self.take_state() {
            State::Reporting(r) => self.finish(r.result),
            other => self.state = other,
        }
    }

    /// Timers: status reports and NAKs, joining, and giving up on a silent sender.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Finished(_) => {}
            State::Listening { since } => {
                if let Some(wait) = self.cfg.wait_timeout {
                    if now >= *since + wait {
                        let refused = self.last_refusal.clone();
                        self.fail(Failure::NoSession {
                            waited: wait,
                            refused,
                        });
                    }
                }
            }
            State::Reporting(r) => {
                if now >= r.until {
                    log::warn!("the sender did not acknowledge the result; finishing anyway");
                    self.end_report();
                    return;
                }
                if now < r.next_status {
                    return;
                }
                r.next_status = now + self.cfg.status_interval;
                let ok = r.result.is_ok();
                let body = Body::Done {
                    receiver: self.cfg.id,
                    nonce: r.nonce,
                    ok,
                    image_hash: if ok { r.image_hash } else { [0; 32] },
                    reason: r
                        .result
                        .as_ref()
                        .err()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                };
                self.out.transmits.push_back(Transmit {
                    destination: Destination::Peer(r.sender),
                    bytes: packet(r.session, body),
                });
            }
            State::Joining(t) | State::Receiving(t) | State::Verifying(t) => {
                if now.duration_since(t.last_heard) >= self.cfg.sender_timeout {
                    let (chunks_done, chunks_total) = t.progress();
                    self.fail(Failure::SenderSilent {
                        timeout: self.cfg.sender_timeout,
                        chunks_done,
                        chunks_total,
                    });
                    return;
                }
                if now < t.next_status {
                    return;
                }
                t.next_status = now + self.cfg.status_interval;
                let (session, sender) = (t.session, t.sender);
                let datagrams = match &self.state {
                    State::Joining(_) => vec![self.join_packet(session, 0)],
                    _ => self.status(now),
                };
                for bytes in datagrams {
                    self.out.transmits.push_back(Transmit {
                        destination: Destination::Peer(sender),
                        bytes,
                    });
                }
            }
        }
    }

    /// Status reports for this interval: one datagram, or several when the NAKs need the room
    /// (a receiver that asks for its repairs only a datagram at a time falls behind the sender).
    fn status(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let receiving = matches!(self.state, State::Receiving(_));
        let (id, received, overflow) = (self.cfg.id, self.stats.datagrams, self.stats.overflow);
        let Some(t) = self.transfer_mut() else {
            return Vec::new();
        };
        let naks = if receiving { t.naks() } else { Vec::new() };
        let mut batches: Vec<Vec<Nak>> = vec![Vec::new()];
        let mut room = NAK_ROOM;
        for nak in naks {
            if nak.encoded_len() > room {
                batches.push(Vec::new());
                room = NAK_ROOM;
            }
            room -= nak.encoded_len();
            if let Some(batch) = batches.last_mut() {
                batch.push(nak);
            }
        }
        let state = if receiving {
            ReceiverState::Receiving
        } else {
            ReceiverState::Verifying
        };
        let (chunks_done, chunks_total) = t.progress();
        let manifest_missing = t.manifest_missing();
        let disk_rate = t.disk.report(now);
        batches
            .into_iter()
            .map(|naks| {
                packet(
                    t.session,
                    Body::Status {
                        receiver: id,
                        nonce: t.nonce,
                        state,
                        chunks_done,
                        chunks_total,
                        highest_seq: t.highest_seq,
                        received,
                        overflow,
                        disk_rate,
                        manifest_missing,
                        naks,
                    },
                )
            })
            .collect()
    }
}

impl Transfer {
    fn new(
        session: u32,
        sender: SocketAddr,
        geometry: Geometry,
        manifest_len: u32,
        now: Instant,
    ) -> Self {
        let parts = (manifest_len as usize).div_ceil(usize::from(geometry.block_size));
        Self {
            session,
            sender,
            nonce: 0,
            announced_seq: 0,
            geometry,
            last_heard: now,
            next_status: now,
            chunks: Chunks::Collecting {
                buf: vec![0; manifest_len as usize],
                have: BitSet::new(parts),
                held: HashMap::new(),
            },
            partial: HashMap::new(),
            rejections: HashMap::new(),
            chunks_done: 0,
            front: 0,
            first_pass_done: false,
            highest_seq: 0,
            nak_cursor: 0,
            data_written: 0,
            parity_naks: false,
            disk: DiskPace::new(now),
        }
    }

    fn progress(&self) -> (u32, u32) {
        let total = match &self.chunks {
            Chunks::Known { states, .. } => states.len() as u32,
            Chunks::Collecting { .. } => 0,
        };
        (self.chunks_done, total)
    }

    /// The first byte of the manifest still missing, or `u32::MAX` once it is complete.
    fn manifest_missing(&self) -> u32 {
        match &self.chunks {
            Chunks::Known { .. } => u32::MAX,
            Chunks::Collecting { have, .. } => (0..have.len())
                .find(|&i| !have.contains(i))
                .map_or(u32::MAX, |i| {
                    (i * usize::from(self.geometry.block_size)) as u32
                }),
        }
    }

    fn manifest_part(
        &mut self,
        offset: u32,
        bytes: &[u8],
        stats: &mut ReceiverStats,
        out: &mut Outbox,
    ) {
        let Chunks::Collecting { buf, have, .. } = &mut self.chunks else {
            return;
        };
        let part_size = usize::from(self.geometry.block_size);
        let start = offset as usize;
        if !start.is_multiple_of(part_size) || start + bytes.len() > buf.len() {
            stats.malformed += 1;
            return;
        }
        buf[start..start + bytes.len()].copy_from_slice(bytes);
        have.insert(start / part_size);
        if have.count() < have.len() {
            return;
        }
        let manifest = match Manifest::decode(buf) {
            Ok(m)
                if m.image_hash() == self.geometry.image_hash
                    && m.image_size == self.geometry.image_size =>
            {
                m
            }
            Ok(_) | Err(_) => {
                // A damaged or foreign manifest: start collecting it again.
                log::warn!("manifest did not match the announced image hash; fetching it again");
                *have = BitSet::new(have.len());
                return;
            }
        };
        let held = match &mut self.chunks {
            Chunks::Collecting { held, .. } => std::mem::take(held),
            Chunks::Known { .. } => HashMap::new(),
        };
        let states: Vec<ChunkState> = manifest
            .chunks
            .iter()
            .map(|k| {
                if k.is_data() {
                    ChunkState::Missing
                } else {
                    ChunkState::NotSent
                }
            })
            .collect();
        let data_left = states.iter().filter(|s| **s == ChunkState::Missing).count() as u32;
        // Zero chunks: one event per run of consecutive zero chunks.
        let mut zero_pending = 0;
        let mut index = 0usize;
        while index < manifest.chunks.len() {
            if manifest.chunks[index] != ChunkKind::Zero {
                if manifest.chunks[index] == ChunkKind::Absent {
                    self.chunks_done += 1;
                }
                index += 1;
                continue;
            }
            let run_start = index;
            while index < manifest.chunks.len() && manifest.chunks[index] == ChunkKind::Zero {
                index += 1;
            }
            let (offset, _) = manifest.chunk_range(run_start as u32);
            let (last_offset, last_len) = manifest.chunk_range(index as u32 - 1);
            zero_pending += 1;
            out.events.push_back(Event::Zero {
                offset,
                len: last_offset + last_len as u64 - offset,
            });
        }
        self.chunks = Chunks::Known {
            manifest,
            states,
            data_left,
            zero_pending,
        };
        for (chunk, data) in held {
            self.complete_chunk(chunk, data, None, stats, out);
        }
    }

    /// Where a block or shard of `chunk` goes: the chunk's length as it travels, whether it is
    /// already complete, and how many chunks are held for the manifest. `None` when it cannot be
    /// placed (counted).
    fn slot(&self, chunk: u32, stats: &mut ReceiverStats) -> Option<(usize, bool, usize)> {
        // The geometry from the announcement is enough to place a block: a receiver still
        // missing part of the manifest keeps collecting data and checks it once the manifest is in.
        let chunk_size = u64::from(self.geometry.chunk_size);
        let offset = u64::from(chunk) * chunk_size;
        if offset >= self.geometry.image_size {
            stats.malformed += 1;
            return None;
        }
        Some(match &self.chunks {
            Chunks::Known {
                manifest, states, ..
            } => (
                manifest.wire_len(chunk),
                states
                    .get(chunk as usize)
                    .is_some_and(|s| *s != ChunkState::Missing),
                0,
            ),
            Chunks::Collecting { .. } if self.geometry.compressed => {
                // A compressed chunk's length is in the manifest.
                stats.before_manifest += 1;
                return None;
            }
            Chunks::Collecting { held, .. } => (
                (self.geometry.image_size - offset).min(chunk_size) as usize,
                held.contains_key(&chunk),
                held.len(),
            ),
        })
    }

    /// Places one block; true when it fit the image (new, duplicate or held for memory).
    fn data(
        &mut self,
        data: &DataRef<'_>,
        max_partial: usize,
        stats: &mut ReceiverStats,
        out: &mut Outbox,
    ) -> bool {
        let (chunk, block, bytes) = (data.chunk, data.block, data.bytes);
        let Some((len, known_done, held_count)) = self.slot(chunk, stats) else {
            return false;
        };
        if known_done {
            stats.duplicates += 1;
            return true;
        }
        let block_size = usize::from(self.geometry.block_size);
        let start = usize::from(block) * block_size;
        let expected_len = len.saturating_sub(start).min(block_size);
        if start >= len || bytes.len() != expected_len {
            stats.malformed += 1;
            return false;
        }
        if !self.partial.contains_key(&chunk) && self.partial.len() + held_count >= max_partial {
            stats.dropped_for_memory += 1;
            return true;
        }
        let blocks = len.div_ceil(block_size);
        let partial = self
            .partial
            .entry(chunk)
            .or_insert_with(|| Partial::new(len, blocks));
        if !partial.have.insert(usize::from(block)) {
            stats.duplicates += 1;
            return true;
        }
        partial.data[start..start + bytes.len()].copy_from_slice(bytes);
        if data.flags & DATA_REPAIR != 0 {
            stats.repaired_blocks += 1;
        }
        if partial.shards() >= blocks {
            self.assemble(chunk, stats, out);
        }
        true
    }

    /// Places one parity shard; true when it fit the image (new, duplicate or held for memory).
    fn parity(
        &mut self,
        chunk: u32,
        index: u16,
        bytes: &[u8],
        max_partial: usize,
        stats: &mut ReceiverStats,
        out: &mut Outbox,
    ) -> bool {
        let Some((len, known_done, held_count)) = self.slot(chunk, stats) else {
            return false;
        };
        if known_done {
            stats.duplicates += 1;
            return true;
        }
        let block_size = usize::from(self.geometry.block_size);
        let blocks = len.div_ceil(block_size);
        if !crate::fec::usable(blocks, block_size)
            || usize::from(index) >= crate::fec::recovery_count(blocks)
            || bytes.len() != block_size
        {
            stats.malformed += 1;
            return false;
        }
        if !self.partial.contains_key(&chunk) && self.partial.len() + held_count >= max_partial {
            stats.dropped_for_memory += 1;
            return true;
        }
        let partial = self
            .partial
            .entry(chunk)
            .or_insert_with(|| Partial::new(len, blocks));
        if partial.parity.contains_key(&index) || partial.shards() >= blocks {
            stats.duplicates += 1;
            return true;
        }
        partial.parity.insert(index, bytes.to_vec());
        stats.repaired_blocks += 1;
        if partial.shards() >= blocks {
            self.assemble(chunk, stats, out);
        }
        true
    }

    /// A partial chunk with enough shards: handed on (or held until the manifest is in), with
    /// its parity when blocks are missing.
    fn assemble(&mut self, chunk: u32, stats: &mut ReceiverStats, out: &mut Outbox) {
        let Some(partial) = self.partial.remove(&chunk) else {
            return;
        };
        let repair = (partial.have.count() < partial.have.len()).then(|| {
            Box::new(crate::fec::Repair {
                block_size: usize::from(self.geometry.block_size),
                have: partial.have,
                parity: partial.parity,
            })
        });
        let data = match repair {
            None => partial.data,
            Some(repair) => {
                // Rebuilt here only when the manifest is still missing (rare: the chunk waits
                // anyway); otherwise on the disk side with the hash check.
                if let Chunks::Known { .. } = self.chunks {
                    self.complete_chunk(chunk, partial.data, Some(repair), stats, out);
                    return;
                }
                let mut data = partial.data;
                if repair.rebuild(&mut data).is_err() {
                    stats.corrupt_chunks += 1;
                    return;
                }
                data
            }
        };
        match &mut self.chunks {
            Chunks::Known { .. } => self.complete_chunk(chunk, data, None, stats, out),
            Chunks::Collecting { held, .. } => {
                held.insert(chunk, data);
            }
        }
    }

    /// A chunk with every block in: hand it to the disk side, which checks it before writing.
    fn complete_chunk(
        &mut self,
        chunk: u32,
        stored: Vec<u8>,
        repair: Option<Box<crate::fec::Repair>>,
        stats: &mut ReceiverStats,
        out: &mut Outbox,
    ) {
        let Chunks::Known {
            manifest, states, ..
        } = &mut self.chunks
        else {
            return;
        };
        let (Some(&kind), Some(state)) = (
            manifest.chunks.get(chunk as usize),
            states.get_mut(chunk as usize),
        ) else {
            stats.malformed += 1;
            return;
        };
        if !kind.is_data() {
            stats.malformed += 1;
            return;
        }
        let (offset, raw_len) = manifest.chunk_range(chunk);
        *state = ChunkState::Writing;
        self.disk.queued_one(self.last_heard);
        if !self.disk.filling && self.disk.past_half() {
            // The sender hears of a filling queue now, not at the next interval: by then the
            // network loop may already be waiting for the disk.
            self.next_status = self.last_heard.min(self.next_status);
        }
        out.events.push_back(Event::Write(ChunkWrite {
            chunk,
            offset,
            stored,
            kind,
            raw_len,
            repair,
        }));
    }

    fn chunk_written(&mut self, chunk: u32, now: Instant) {
        let Chunks::Known {
            manifest,
            states,
            data_left,
            ..
        } = &mut self.chunks
        else {
            return;
        };
        if let Some(state) = states.get_mut(chunk as usize) {
            if *state == ChunkState::Writing {
                *state = ChunkState::Written;
                self.chunks_done += 1;
                *data_left -= 1;
                self.data_written += manifest.chunk_range(chunk).1 as u64;
                self.disk.written(manifest.wire_len(chunk), now);
            }
        }
    }

    /// A chunk handed out did not decode: it is missing again. Returns how often that happened
    /// to it, or `None` when the chunk was not being written.
    fn chunk_rejected(&mut self, chunk: u32, now: Instant) -> Option<u32> {
        let Chunks::Known { states, .. } = &mut self.chunks else {
            return None;
        };
        let state = states.get_mut(chunk as usize)?;
        if *state != ChunkState::Writing {
            return None;
        }
        *state = ChunkState::Missing;
        self.disk.written(0, now);
        let times = self.rejections.entry(chunk).or_insert(0);
        *times += 1;
        Some(*times)
    }

    fn zeroed(&mut self, len: u64) {
        if let Chunks::Known {
            manifest,
            zero_pending,
            ..
        } = &mut self.chunks
        {
            self.chunks_done += len.div_ceil(u64::from(manifest.chunk_size)) as u32;
            *zero_pending = zero_pending.saturating_sub(1);
        }
    }

    /// NAKs for the chunks that are due (behind the first pass) and incomplete, as many as fit
    /// [`MAX_STATUS_DATAGRAMS`], starting where the previous status left off.
    fn naks(&mut self) -> Vec<Nak> {
        let Chunks::Known {
            manifest, states, ..
        } = &self.chunks
        else {
            return Vec::new();
        };
        let chunk_count = states.len() as u32;
        let due_end = if self.first_pass_done {
            chunk_count
        } else {
            self.front.min(chunk_count)
        };
        if due_end == 0 {
            return Vec::new();
        }
        let mut budget = NAK_ROOM * MAX_STATUS_DATAGRAMS;
        let mut naks = Vec::new();
        let block_size = usize::from(self.geometry.block_size);
        let mut chunk = if self.nak_cursor >= due_end {
            0
        } else {
            self.nak_cursor
        };
        let mut visited = 0u32;
        while visited < due_end {
            if chunk >= due_end {
                chunk = 0;
            }
            if states[chunk as usize] != ChunkState::Missing {
                visited += 1;
                chunk += 1;
                continue;
            }
            let nak = match self.partial.get(&chunk) {
                Some(partial)
                    if (self.parity_naks || !partial.parity.is_empty())
                        && crate::fec::usable(partial.have.len(), block_size)
                        && partial.have.len() - partial.have.count()
                            <= crate::fec::recovery_count(partial.have.len()) =>
                {
                    // Few blocks missing: any shards will do, so one parity datagram can serve
                    // every receiver missing some other block of this chunk.
                    let needed = partial.have.len().saturating_sub(partial.shards());
                    Nak::Shards {
                        chunk,
                        needed: needed.min(usize::from(u16::MAX)) as u16,
                    }
                }
                Some(partial) => {
                    let blocks = manifest.wire_len(chunk).div_ceil(block_size);
                    let mut missing = BitSet::new(blocks);
                    for b in (0..blocks).filter(|&b| !partial.have.contains(b)) {
                        missing.insert(b);
                    }
                    Nak::Blocks {
                        chunk,
                        bitmap: missing.to_bytes(),
                    }
                }
                None => {
                    let mut count = 1;
                    while chunk + count < due_end
                        && states[(chunk + count) as usize] == ChunkState::Missing
                        && !self.partial.contains_key(&(chunk + count))
                    {
                        count += 1;
                    }
                    Nak::Chunks {
                        start: chunk,
                        count,
                    }
                }
            };
            if nak.encoded_len() > budget {
                break;
            }
            budget -= nak.encoded_len();
            let advance = match &nak {
                Nak::Chunks { count, .. } => *count,
                Nak::Blocks { .. } | Nak::Shards { .. } => 1,
            };
            naks.push(nak);
            visited += advance;
            chunk += advance;
        }
        self.nak_cursor = chunk;
        naks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_blocks_up_to_the_largest_udp_datagram_are_accepted() {
        let chunk = 1 << 20;
        for block in [MIN_BLOCK_SIZE, 1408, 1472, 8896, MAX_BLOCK_SIZE] {
            assert!(announced_geometry_is_sane(chunk, block, 4096), "{block}");
        }
        for block in [0, MIN_BLOCK_SIZE - 1, MAX_BLOCK_SIZE + 1, u16::MAX] {
            assert!(!announced_geometry_is_sane(chunk, block, 4096), "{block}");
        }
    }
}
