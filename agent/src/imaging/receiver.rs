//! The sans-IO receiver: waits for an announcement, joins with its disk geometry, collects the
//! manifest, assembles chunks block by block, checks each chunk's hash before handing it to be
//! written, asks for what it misses, and after the final flush reports the verified result.
//!
//! The caller feeds datagrams ([`Receiver::handle_datagram`]), completions of the disk actions it
//! was given ([`Receiver::chunk_written`], [`Receiver::zeroed`], [`Receiver::verified`],
//! [`Receiver::disk_failed`]) and the time ([`Receiver::poll`]); it carries out the returned
//! [`Action`]s in order.

use super::bits::BitSet;
use super::manifest::{ChunkKind, Hash, Manifest};
use super::wire::{
    Body, DataRef, Nak, Packet, ReceiverState, Verdict, ANNOUNCE_COMPRESSED,
    ANNOUNCE_FIRST_PASS_DONE, DATA_REPAIR, MAX_DATAGRAM,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Largest manifest a receiver accepts: about two million chunks, petabytes at 1 MiB chunks.
const MAX_MANIFEST_LEN: u32 = 64 << 20;

/// Chunk, block and manifest sizes an announcement may claim: a chunk within the manifest's
/// limits, blocks that fit a datagram and number at most 65536 per chunk (the wire's u16 index).
fn announced_geometry_is_sane(chunk_size: u32, block_size: u16, manifest_len: u32) -> bool {
    super::manifest::valid_chunk_size(chunk_size)
        && block_size >= 512
        && usize::from(block_size) <= MAX_DATAGRAM
        && (chunk_size as usize).div_ceil(usize::from(block_size)) <= 1 << 16
        && manifest_len <= MAX_MANIFEST_LEN
}

/// Bytes of NAKs that fit one status datagram next to its fixed fields.
const NAK_ROOM: usize = MAX_DATAGRAM - 80;
/// Status datagrams per interval at most.
const MAX_STATUS_DATAGRAMS: usize = 32;

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
        }
    }
}

/// Disk work and datagrams for the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send to the sender (unicast).
    Send(Vec<u8>),
    /// Decode and write a chunk (see [`ChunkWrite`]); report with [`Receiver::chunk_written`],
    /// or [`Receiver::chunk_rejected`] when it does not decode.
    Write(ChunkWrite),
    /// Make a range read as zeros; report with [`Receiver::zeroed`].
    Zero { offset: u64, len: u64 },
    /// Everything is written: flush, re-read the image, compare with the manifest, report with
    /// [`Receiver::verified`].
    FlushAndVerify { manifest: Box<Manifest> },
    /// The end: `Ok` only when the copy verified.
    Finished(Result<(), String>),
}

/// Arrivals of one chunk that fail their hash before the copy gives up.
const MAX_REJECTIONS: u32 = 4;

/// A complete chunk as it travelled. It is decoded (decompressed, its raw bytes checked against
/// the hash) at the disk side, so the network thread only assembles datagrams.
#[derive(Debug, PartialEq, Eq)]
pub struct ChunkWrite {
    pub chunk: u32,
    pub offset: u64,
    pub stored: Vec<u8>,
    pub kind: ChunkKind,
    pub raw_len: usize,
}

impl ChunkWrite {
    /// The raw bytes to write at `self.offset`, or why they cannot be trusted.
    pub fn decode(self) -> Result<Vec<u8>, super::codec::CodecError> {
        super::codec::decode_owned(self.chunk, &self.kind, self.stored, self.raw_len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Data not yet complete.
    Missing,
    /// Complete and verified, handed to the disk.
    Writing,
    Written,
    /// Nothing to receive (zero or absent).
    NotSent,
}

#[derive(Debug)]
struct Partial {
    data: Vec<u8>,
    have: BitSet,
}

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
    pub corrupt_chunks: u64,
    /// Data of a compressed image that came before the manifest (asked for again later).
    pub before_manifest: u64,
    /// Socket buffer overflows reported by the caller.
    pub overflow: u32,
}

#[derive(Debug, Clone)]
struct Geometry {
    image_size: u64,
    chunk_size: u32,
    block_size: u16,
    image_hash: Hash,
    compressed: bool,
}

#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    phase: Phase,
    started: Instant,
    session: Option<u32>,
    geometry: Option<Geometry>,
    last_heard: Instant,
    next_status: Instant,
    manifest_buf: Vec<u8>,
    manifest_have: BitSet,
    manifest: Option<Manifest>,
    chunks: Vec<ChunkState>,
    partial: HashMap<u32, Partial>,
    /// Complete chunks that arrived before the manifest.
    held: HashMap<u32, Vec<u8>>,
    /// How often each chunk arrived complete but damaged.
    rejections: HashMap<u32, u32>,
    pending_zero: u32,
    chunks_done: u32,
    data_chunks_left: u32,
    front: u32,
    first_pass_done: bool,
    highest_seq: u64,
    nak_cursor: u32,
    result: Option<Result<(), String>>,
    report_until: Option<Instant>,
    pub stats: ReceiverStats,
}

impl Receiver {
    pub fn new(cfg: ReceiverConfig, now: Instant) -> Self {
        Self {
            session: cfg.session,
            cfg,
            phase: Phase::Listening,
            started: now,
            geometry: None,
            last_heard: now,
            next_status: now,
            manifest_buf: Vec::new(),
            manifest_have: BitSet::new(0),
            manifest: None,
            chunks: Vec::new(),
            partial: HashMap::new(),
            held: HashMap::new(),
            rejections: HashMap::new(),
            pending_zero: 0,
            chunks_done: 0,
            data_chunks_left: 0,
            front: 0,
            first_pass_done: false,
            highest_seq: 0,
            nak_cursor: 0,
            result: None,
            report_until: None,
            stats: ReceiverStats::default(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn session(&self) -> Option<u32> {
        self.session
    }

    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// (chunks done, chunks in the image)
    pub fn progress(&self) -> (u32, u32) {
        (self.chunks_done, self.chunks.len() as u32)
    }

    pub fn image_size(&self) -> Option<u64> {
        self.geometry.as_ref().map(|g| g.image_size)
    }

    fn packet(&self, body: Body) -> Action {
        Action::Send(
            Packet {
                session: self.session.unwrap_or(0),
                body,
            }
            .emit(),
        )
    }

    fn join_packet(&self, refusal: u8) -> Action {
        self.packet(Body::Join {
            receiver: self.cfg.id,
            incarnation: self.cfg.incarnation,
            disk_size: self.cfg.disk_size,
            logical_block: self.cfg.logical_block,
            refusal,
            name: self.cfg.name.clone(),
            serial: self.cfg.serial.clone(),
        })
    }

    fn fail(&mut self, reason: String, out: &mut Vec<Action>) {
        if self.phase == Phase::Finished {
            return;
        }
        log::error!("receive failed: {reason}");
        if self.session.is_some() && self.phase != Phase::Listening {
            out.push(self.packet(Body::Done {
                receiver: self.cfg.id,
                ok: false,
                image_hash: [0; 32],
                reason: reason.clone(),
            }));
        }
        self.phase = Phase::Finished;
        out.push(Action::Finished(Err(reason)));
    }

    pub fn handle_datagram(&mut self, bytes: &[u8], now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        // The hot path: data is parsed in place, its payload copied once, into the chunk.
        if super::wire::is_data(bytes) {
            match super::wire::parse_data(bytes) {
                Err(_) => self.stats.malformed += 1,
                Ok((session, _)) if self.session.is_some_and(|s| s != session) => {
                    self.stats.foreign += 1
                }
                Ok((_, data)) => {
                    self.stats.datagrams += 1;
                    self.on_data(data, now, &mut out);
                }
            }
            return out;
        }
        let packet = match Packet::parse(bytes) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed += 1;
                return out;
            }
        };
        if self.session.is_some_and(|s| s != packet.session) {
            self.stats.foreign += 1;
            return out;
        }
        self.stats.datagrams += 1;
        match packet.body {
            Body::Announce {
                image_size,
                chunk_size,
                block_size,
                manifest_len,
                image_hash,
                front,
                seq,
                flags,
            } => {
                if self.phase == Phase::Listening {
                    // Everything sized from here on comes from the network: bound it before
                    // allocating anything.
                    if !announced_geometry_is_sane(chunk_size, block_size, manifest_len) {
                        self.stats.malformed += 1;
                        return out;
                    }
                    self.session = Some(packet.session);
                    self.geometry = Some(Geometry {
                        image_size,
                        chunk_size,
                        block_size,
                        image_hash,
                        compressed: flags & ANNOUNCE_COMPRESSED != 0,
                    });
                    if image_size > self.cfg.disk_size {
                        out.push(self.join_packet(1));
                        self.fail(
                            format!(
                                "target too small: {} bytes, the image needs {image_size} bytes; nothing was written",
                                self.cfg.disk_size
                            ),
                            &mut out,
                        );
                        return out;
                    }
                    self.manifest_buf = vec![0; manifest_len as usize];
                    self.manifest_have =
                        BitSet::new((manifest_len as usize).div_ceil(usize::from(block_size)));
                    self.phase = Phase::Joining;
                    self.next_status = now;
                }
                if self
                    .geometry
                    .as_ref()
                    .is_some_and(|g| g.image_hash != image_hash)
                {
                    self.stats.foreign += 1;
                    return out;
                }
                self.last_heard = now;
                self.highest_seq = self.highest_seq.max(seq);
                self.front = self.front.max(front);
                self.first_pass_done |= flags & ANNOUNCE_FIRST_PASS_DONE != 0;
            }
            Body::Welcome { receiver, verdict } if receiver == self.cfg.id => {
                self.last_heard = now;
                match (verdict, self.phase) {
                    (Verdict::Accepted, Phase::Joining) => {
                        log::info!("joined session {:08x}", packet.session);
                        self.phase = Phase::Receiving;
                    }
                    (Verdict::TooSmall, _) => self.fail(
                        format!(
                            "the sender refused this target as too small ({} bytes)",
                            self.cfg.disk_size
                        ),
                        &mut out,
                    ),
                    (Verdict::Late, Phase::Joining) => self.fail(
                        "the session was already ending when this receiver joined".into(),
                        &mut out,
                    ),
                    (Verdict::Dropped, phase) if phase != Phase::Reporting => {
                        let (done, total) = self.progress();
                        self.fail(
                            format!("the sender dropped this receiver (too slow or too lossy; {done} of {total} chunks done)"),
                            &mut out,
                        )
                    }
                    _ => {}
                }
            }
            Body::ManifestPart { offset, bytes } => {
                self.last_heard = now;
                self.manifest_part(offset, &bytes, &mut out);
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
                &mut out,
            ),
            Body::DoneAck { receiver }
                if receiver == self.cfg.id && self.phase == Phase::Reporting =>
            {
                self.finish_reporting(&mut out);
            }
            Body::End { aborted } => {
                if self.phase == Phase::Reporting {
                    self.finish_reporting(&mut out);
                } else if !matches!(
                    self.phase,
                    Phase::Listening | Phase::Finished | Phase::Verifying
                ) {
                    let why = if aborted {
                        "the sender aborted the session"
                    } else {
                        "the sender ended the session"
                    };
                    let (done, total) = self.progress();
                    self.fail(
                        format!("{why} before this copy was complete ({done} of {total} chunks)"),
                        &mut out,
                    );
                }
            }
            _ => {}
        }
        out
    }

    fn manifest_part(&mut self, offset: u32, bytes: &[u8], out: &mut Vec<Action>) {
        let Some(geometry) = &self.geometry else {
            return;
        };
        if self.manifest.is_some() || !matches!(self.phase, Phase::Receiving | Phase::Joining) {
            return;
        }
        let part_size = usize::from(geometry.block_size);
        let start = offset as usize;
        if !start.is_multiple_of(part_size) || start + bytes.len() > self.manifest_buf.len() {
            self.stats.malformed += 1;
            return;
        }
        self.manifest_buf[start..start + bytes.len()].copy_from_slice(bytes);
        self.manifest_have.insert(start / part_size);
        if self.manifest_have.count() < self.manifest_have.len() {
            return;
        }
        let expected_hash = geometry.image_hash;
        let manifest = match Manifest::decode(&self.manifest_buf) {
            Ok(m) if m.image_hash() == expected_hash && m.image_size == geometry.image_size => m,
            Ok(_) | Err(_) => {
                // A damaged or foreign manifest: start collecting it again.
                log::warn!("manifest did not match the announced image hash; fetching it again");
                self.manifest_have = BitSet::new(self.manifest_have.len());
                return;
            }
        };
        self.chunks = manifest
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
        self.data_chunks_left = self
            .chunks
            .iter()
            .filter(|s| **s == ChunkState::Missing)
            .count() as u32;
        // Zero chunks: one action per run of consecutive zero chunks.
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
            self.pending_zero += 1;
            out.push(Action::Zero {
                offset,
                len: last_offset + last_len as u64 - offset,
            });
        }
        self.manifest = Some(manifest);
        self.manifest_buf = Vec::new();
        for (chunk, data) in std::mem::take(&mut self.held) {
            self.complete_chunk(chunk, data, out);
        }
        self.check_complete(out);
    }

    fn data(&mut self, chunk: u32, block: u16, bytes: &[u8], out: &mut Vec<Action>) {
        let Some(geometry) = &self.geometry else {
            return;
        };
        if !matches!(self.phase, Phase::Receiving | Phase::Joining) {
            return;
        }
        // The geometry from the announcement is enough to place a block: a receiver still
        // missing part of the manifest keeps collecting data and checks it once the manifest is in.
        let chunk_size = u64::from(geometry.chunk_size);
        let offset = u64::from(chunk) * chunk_size;
        if offset >= geometry.image_size {
            self.stats.malformed += 1;
            return;
        }
        let len = match &self.manifest {
            Some(manifest) => manifest.wire_len(chunk),
            None if geometry.compressed => {
                // A compressed chunk's length is in the manifest.
                self.stats.before_manifest += 1;
                return;
            }
            None => (geometry.image_size - offset).min(chunk_size) as usize,
        };
        let known_done = match self.chunks.get(chunk as usize) {
            Some(state) => *state != ChunkState::Missing,
            None => self.held.contains_key(&chunk),
        };
        if known_done {
            self.stats.duplicates += 1;
            return;
        }
        let block_size = usize::from(geometry.block_size);
        let start = usize::from(block) * block_size;
        let expected_len = len.saturating_sub(start).min(block_size);
        if start >= len || bytes.len() != expected_len {
            self.stats.malformed += 1;
            return;
        }
        if !self.partial.contains_key(&chunk)
            && self.partial.len() + self.held.len() >= self.cfg.max_partial_chunks
        {
            self.stats.dropped_for_memory += 1;
            return;
        }
        let blocks = len.div_ceil(block_size);
        let partial = self.partial.entry(chunk).or_insert_with(|| Partial {
            data: vec![0; len],
            have: BitSet::new(blocks),
        });
        if !partial.have.insert(usize::from(block)) {
            self.stats.duplicates += 1;
            return;
        }
        partial.data[start..start + bytes.len()].copy_from_slice(bytes);
        if partial.have.count() < blocks {
            return;
        }
        let Some(partial) = self.partial.remove(&chunk) else {
            return;
        };
        if self.manifest.is_some() {
            self.complete_chunk(chunk, partial.data, out);
        } else {
            self.held.insert(chunk, partial.data);
        }
    }

    fn on_data(&mut self, data: DataRef<'_>, now: Instant, out: &mut Vec<Action>) {
        self.last_heard = now;
        self.highest_seq = self.highest_seq.max(data.seq);
        if data.flags & DATA_REPAIR == 0 {
            self.front = self.front.max(data.chunk);
        }
        self.data(data.chunk, data.block, data.bytes, out);
    }

    /// A chunk with every block in: hand it to the disk side, which checks it before writing.
    fn complete_chunk(&mut self, chunk: u32, stored: Vec<u8>, out: &mut Vec<Action>) {
        let Some(manifest) = &self.manifest else {
            return;
        };
        let kind = manifest.chunks[chunk as usize];
        if !kind.is_data() {
            self.stats.malformed += 1;
            return;
        }
        let (offset, raw_len) = manifest.chunk_range(chunk);
        self.chunks[chunk as usize] = ChunkState::Writing;
        out.push(Action::Write(ChunkWrite {
            chunk,
            offset,
            stored,
            kind,
            raw_len,
        }));
    }

    /// Chunk `chunk` did not decode to bytes with its hash (corrupt in a way the CRCs missed, or
    /// a rogue sender): nothing was written; it is asked for again.
    /// A chunk that keeps arriving damaged is damaged at the source: the copy fails instead of
    /// asking forever.
    pub fn chunk_rejected(&mut self, chunk: u32, why: &str) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(state) = self.chunks.get_mut(chunk as usize) else {
            return out;
        };
        if *state != ChunkState::Writing {
            return out;
        }
        *state = ChunkState::Missing;
        self.stats.corrupt_chunks += 1;
        let times = self.rejections.entry(chunk).or_insert(0);
        *times += 1;
        if *times >= MAX_REJECTIONS {
            let times = *times;
            self.fail(
                format!(
                    "{why}, {times} times: the sender's copy of this chunk is damaged \
                     (on a bootserver, `bootserver images verify` names the image's damage)"
                ),
                &mut out,
            );
        } else {
            log::warn!("{why}; asking for it again");
        }
        out
    }

    /// The caller wrote chunk `chunk`.
    pub fn chunk_written(&mut self, chunk: u32) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(state) = self.chunks.get_mut(chunk as usize) {
            if *state == ChunkState::Writing {
                *state = ChunkState::Written;
                self.chunks_done += 1;
                self.data_chunks_left -= 1;
            }
        }
        self.check_complete(&mut out);
        out
    }

    /// The caller zeroed one range it was asked to.
    pub fn zeroed(&mut self, len: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(manifest) = &self.manifest {
            self.chunks_done += len.div_ceil(u64::from(manifest.chunk_size)) as u32;
        }
        self.pending_zero = self.pending_zero.saturating_sub(1);
        self.check_complete(&mut out);
        out
    }

    /// A disk operation failed: the copy cannot complete.
    pub fn disk_failed(&mut self, reason: String) -> Vec<Action> {
        let mut out = Vec::new();
        self.fail(reason, &mut out);
        out
    }

    fn check_complete(&mut self, out: &mut Vec<Action>) {
        // `data_chunks_left` counts down only as chunks are written: zero means all are.
        if self.phase != Phase::Receiving || self.data_chunks_left > 0 || self.pending_zero > 0 {
            return;
        }
        let Some(manifest) = &self.manifest else {
            return;
        };
        self.phase = Phase::Verifying;
        out.push(Action::FlushAndVerify {
            manifest: Box::new(manifest.clone()),
        });
    }

    /// The caller flushed and re-read the image: `Ok(hash)` is the image hash computed from the
    /// disk, `Err` why it could not.
    pub fn verified(&mut self, result: Result<Hash, String>, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.phase != Phase::Verifying {
            return out;
        }
        let expected = self.geometry.as_ref().map_or([0; 32], |g| g.image_hash);
        let result = match result {
            Ok(hash) if hash == expected => Ok(()),
            Ok(_) => Err("the copy read back from the target does not match the image".to_string()),
            Err(e) => Err(e),
        };
        self.result = Some(result);
        self.phase = Phase::Reporting;
        self.report_until = Some(now + Duration::from_secs(10));
        self.next_status = now;
        out.extend(self.poll(now));
        out
    }

    fn finish_reporting(&mut self, out: &mut Vec<Action>) {
        self.phase = Phase::Finished;
        out.push(Action::Finished(
            self.result.clone().unwrap_or(Err("no result".into())),
        ));
    }

    /// Timers: status reports and NAKs, joining, and giving up on a silent sender.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match self.phase {
            Phase::Finished => return out,
            Phase::Listening => {
                if self
                    .cfg
                    .wait_timeout
                    .is_some_and(|t| now >= self.started + t)
                {
                    self.fail(
                        format!(
                            "no sender announced a session within {} s",
                            self.cfg.wait_timeout.map_or(0, |t| t.as_secs())
                        ),
                        &mut out,
                    );
                }
                return out;
            }
            Phase::Reporting => {
                if self.report_until.is_some_and(|t| now >= t) {
                    log::warn!("the sender did not acknowledge the result; finishing anyway");
                    self.finish_reporting(&mut out);
                    return out;
                }
            }
            _ => {
                if now.duration_since(self.last_heard) >= self.cfg.sender_timeout {
                    let (done, total) = self.progress();
                    self.fail(
                        format!(
                            "the sender went silent for {} s ({done} of {total} chunks done)",
                            self.cfg.sender_timeout.as_secs()
                        ),
                        &mut out,
                    );
                    return out;
                }
            }
        }
        if now < self.next_status {
            return out;
        }
        self.next_status = now + self.cfg.status_interval;
        match self.phase {
            Phase::Joining => out.push(self.join_packet(0)),
            Phase::Receiving | Phase::Verifying => out.extend(self.status()),
            Phase::Reporting => {
                let ok = matches!(self.result, Some(Ok(())));
                let reason = match &self.result {
                    Some(Err(e)) => e.clone(),
                    _ => String::new(),
                };
                let image_hash = if ok {
                    self.geometry.as_ref().map_or([0; 32], |g| g.image_hash)
                } else {
                    [0; 32]
                };
                out.push(self.packet(Body::Done {
                    receiver: self.cfg.id,
                    ok,
                    image_hash,
                    reason,
                }));
            }
            _ => {}
        }
        out
    }

    /// Status reports for this interval: one datagram, or several when the NAKs need the room
    /// (a receiver that asks for its repairs only a datagram at a time falls behind the sender).
    fn status(&mut self) -> Vec<Action> {
        let manifest_missing = match (&self.manifest, &self.geometry) {
            (Some(_), _) => u32::MAX,
            (None, Some(g)) => self.manifest_have_first_missing(g.block_size),
            (None, None) => 0,
        };
        let naks = if self.phase == Phase::Receiving {
            self.naks()
        } else {
            Vec::new()
        };
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
        let state = match self.phase {
            Phase::Verifying => ReceiverState::Verifying,
            _ => ReceiverState::Receiving,
        };
        batches
            .into_iter()
            .map(|naks| {
                self.packet(Body::Status {
                    receiver: self.cfg.id,
                    state,
                    chunks_done: self.chunks_done,
                    chunks_total: self.chunks.len() as u32,
                    highest_seq: self.highest_seq,
                    received: self.stats.datagrams,
                    overflow: self.stats.overflow,
                    manifest_missing,
                    naks,
                })
            })
            .collect()
    }

    fn manifest_have_first_missing(&self, block_size: u16) -> u32 {
        (0..self.manifest_have.len())
            .find(|&i| !self.manifest_have.contains(i))
            .map_or(u32::MAX, |i| (i * usize::from(block_size)) as u32)
    }

    /// NAKs for the chunks that are due (behind the first pass) and incomplete, as many as fit
    /// [`MAX_STATUS_DATAGRAMS`], starting where the previous status left off.
    fn naks(&mut self) -> Vec<Nak> {
        let Some(manifest) = &self.manifest else {
            return Vec::new();
        };
        let Some(geometry) = &self.geometry else {
            return Vec::new();
        };
        let due_end = if self.first_pass_done {
            self.chunks.len() as u32
        } else {
            self.front.min(self.chunks.len() as u32)
        };
        if due_end == 0 {
            return Vec::new();
        }
        let mut budget = NAK_ROOM * MAX_STATUS_DATAGRAMS;
        let mut naks = Vec::new();
        let block_size = usize::from(geometry.block_size);
        let start = if self.nak_cursor >= due_end {
            0
        } else {
            self.nak_cursor
        };
        let mut chunk = start;
        let mut visited = 0u32;
        while visited < due_end {
            if chunk >= due_end {
                chunk = 0;
            }
            let state = self.chunks[chunk as usize];
            if state == ChunkState::Missing {
                let nak = match self.partial.get(&chunk) {
                    Some(partial) => {
                        let blocks = manifest.chunk_range(chunk).1.div_ceil(block_size);
                        let mut missing = BitSet::new(blocks);
                        for b in 0..blocks {
                            if !partial.have.contains(b) {
                                missing.insert(b);
                            }
                        }
                        Nak::Blocks {
                            chunk,
                            bitmap: missing.to_bytes(),
                        }
                    }
                    None => {
                        let mut count = 1;
                        while chunk + count < due_end
                            && self.chunks[(chunk + count) as usize] == ChunkState::Missing
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
                    Nak::Blocks { .. } => 1,
                };
                naks.push(nak);
                visited += advance;
                chunk += advance;
            } else {
                visited += 1;
                chunk += 1;
            }
        }
        self.nak_cursor = chunk;
        naks
    }

    /// Socket buffer overflows counted by the kernel (SO_RXQ_OVFL), for the sender's pacing.
    pub fn set_overflow(&mut self, count: u32) {
        self.stats.overflow = count;
    }
}
