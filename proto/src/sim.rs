//! Deterministic simulations of a whole session: one sender, N receivers, a lossy, reordering,
//! duplicating network with a virtual clock, and in-memory disks. Every copy is checked byte for
//! byte against the source.

use crate::manifest::Manifest;
use crate::receiver::{DiskDone, Event, Failure, Phase as RxPhase, Receiver, ReceiverConfig};
use crate::rng::XorShift as Rng;
use crate::sender::{ChunkSource, Outcome, Sender, SenderConfig};
use crate::wire::ReceiverState;
use std::collections::BinaryHeap;
use std::io::Cursor;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Where the sender multicasts from, as receivers see it.
fn sender_address() -> SocketAddr {
    SocketAddr::from(([10, 0, 255, 1], 40000))
}

/// The key simulated sessions are signed with; simulated receivers trust it.
fn session_key() -> crate::trust::SigningKey {
    crate::trust::SigningKey::from_seed([0x5e; 32])
}

struct MemSource {
    image: Vec<u8>,
    chunk_size: usize,
    /// Stored (possibly compressed) bytes per chunk, like an image store serves them.
    stored: Option<Vec<Vec<u8>>>,
}
impl ChunkSource for MemSource {
    fn chunk(&mut self, index: u32) -> std::io::Result<&[u8]> {
        if let Some(stored) = &self.stored {
            return Ok(&stored[index as usize]);
        }
        let start = index as usize * self.chunk_size;
        let end = (start + self.chunk_size).min(self.image.len());
        Ok(&self.image[start..end])
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    /// To the sender, from receiver `.0`.
    Sender(usize),
    Receiver(usize),
}

/// Receiver `i`'s address, as the sender sees it.
pub fn receiver_address(i: usize) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 7744))
}

#[derive(PartialEq, Eq)]
struct InFlight {
    at: Instant,
    order: u64,
    dest: Dest,
    bytes: Vec<u8>,
}
impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at).then(other.order.cmp(&self.order))
    }
}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

pub struct SimReceiver {
    pub rx: Receiver,
    pub disk: Vec<u8>,
    pub result: Option<Result<(), Failure>>,
    pub loss: f64,
    pub start_at: Duration,
    /// Stop hearing anything after this long (a receiver that falls off the network).
    pub deaf_after: Option<Duration>,
    pub writes: u64,
    /// First-pass data datagrams with these sequence numbers never reach this receiver.
    pub drop_first_pass_seqs: Option<std::ops::RangeInclusive<u64>>,
    /// A bounded socket buffer drained at a fixed pace (a slow machine): what does not fit is
    /// dropped and counted as the kernel's SO_RXQ_OVFL would count it. `None`: infinitely fast.
    pub socket: Option<SocketModel>,
    /// Its disk side's Reed–Solomon decoder, kept between chunks as the agent's writer keeps it.
    pub coder: crate::fec::Coder,
    /// A NIC that takes in only so many bytes per second and drops the rest before any socket
    /// sees them (no overflow is counted), like an rtl8139 under QEMU's TCG.
    pub nic: Option<NicModel>,
    /// A disk that writes only so fast behind a bounded queue. `None`: writes complete at once.
    pub disk_model: Option<DiskModel>,
}

/// A disk writing `rate` bytes per second behind a queue of `depth` chunk writes, like the
/// agent's writer thread: while the queue is full the network loop waits, reading nothing from
/// its socket (give the receiver a [`SocketModel`] too, or nothing waits).
pub struct DiskModel {
    pub rate: f64,
    pub depth: usize,
    /// Completions in the order the disk finishes them.
    pending: std::collections::VecDeque<(Instant, DiskDone)>,
    busy_until: Option<Instant>,
}

impl DiskModel {
    pub fn new(rate: f64, depth: usize) -> Self {
        Self {
            rate,
            depth,
            pending: std::collections::VecDeque::new(),
            busy_until: None,
        }
    }

    fn full(&self) -> bool {
        self.pending.len() >= self.depth
    }

    /// Queues a write of `len` bytes finishing with `done`.
    fn queue(&mut self, len: usize, done: DiskDone, now: Instant) {
        let start = self.busy_until.map_or(now, |t| t.max(now));
        let at = start + Duration::from_secs_f64(len as f64 / self.rate);
        self.busy_until = Some(at);
        self.pending.push_back((at, done));
    }
}

/// A slow NIC: a ring of `ring` bytes emptied at `rate` bytes per second; what does not fit
/// is lost without a trace.
pub struct NicModel {
    pub rate: f64,
    pub ring: f64,
    level: f64,
    last: Option<Instant>,
    pub dropped: u64,
}

impl NicModel {
    pub fn new(rate: f64, ring: f64) -> Self {
        Self {
            rate,
            ring,
            level: 0.0,
            last: None,
            dropped: 0,
        }
    }

    fn admit(&mut self, len: usize, now: Instant) -> bool {
        let elapsed = self
            .last
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        self.last = Some(now);
        self.level = (self.level - elapsed * self.rate).max(0.0);
        if self.level + len as f64 > self.ring {
            self.dropped += 1;
            return false;
        }
        self.level += len as f64;
        true
    }
}

/// A receiver's socket buffer: `capacity` datagrams, of which `per_step` are read every step.
pub struct SocketModel {
    pub capacity: usize,
    pub per_step: usize,
    queue: std::collections::VecDeque<(Vec<u8>, SocketAddr)>,
    pub overflows: u32,
}

impl SocketModel {
    pub fn new(capacity: usize, per_step: usize) -> Self {
        Self {
            capacity,
            per_step,
            queue: std::collections::VecDeque::new(),
            overflows: 0,
        }
    }
}

pub struct Sim {
    pub now: Instant,
    pub start: Instant,
    pub sender: Sender,
    pub sender_alive_for: Option<Duration>,
    source: MemSource,
    pub receivers: Vec<SimReceiver>,
    net: BinaryHeap<InFlight>,
    rng: Rng,
    order: u64,
    pub reorder: f64,
    pub duplicate: f64,
    pub latency: Duration,
    pub control_loss: f64,
    /// Group datagrams are lost in runs of this many (a UDP GSO send crossing an emulated bridge
    /// as one packet): one draw per run and receiver. 1: every datagram on its own.
    pub loss_run: u64,
    group_sent: u64,
    run_lost: Vec<bool>,
    run_started: Option<Instant>,
    pub restart: Option<(usize, Duration)>,
    /// What receivers sent to hosts other than the sender: (receiver, to, datagram).
    pub elsewhere: Vec<(usize, SocketAddr, Vec<u8>)>,
}

pub fn test_image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut image = vec![0u8; size];
    for (i, chunk) in image.chunks_mut(4096).enumerate() {
        // A mix of zero regions, random regions and repetitive text, like a real disk.
        match i % 7 {
            0 | 3 => {}
            5 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"filesystem data "[j % 16]),
            _ => rng.fill(chunk),
        }
    }
    image
}

impl Sim {
    pub fn new(
        image: Vec<u8>,
        chunk_size: u32,
        sender_cfg: SenderConfig,
        receivers: usize,
        loss: f64,
        seed: u64,
    ) -> Self {
        let manifest = Manifest::scan(
            &mut Cursor::new(&image),
            image.len() as u64,
            chunk_size,
            |_| {},
        )
        .unwrap();
        Self::with_manifest(image, manifest, None, sender_cfg, receivers, loss, seed)
    }

    /// A session serving zstd-compressed chunks, as a deploy from the image store does.
    pub fn compressed(
        image: Vec<u8>,
        chunk_size: u32,
        sender_cfg: SenderConfig,
        receivers: usize,
        loss: f64,
        seed: u64,
    ) -> Self {
        let mut chunks = Vec::new();
        let mut stored = Vec::new();
        for raw in image.chunks(chunk_size as usize) {
            let encoded = crate::codec::encode(raw, crate::codec::DEFAULT_LEVEL);
            chunks.push(encoded.kind);
            stored.push(encoded.stored.into_owned());
        }
        let manifest = Manifest {
            image_size: image.len() as u64,
            chunk_size,
            chunks,
            signature: Vec::new(),
        };
        Self::with_manifest(
            image,
            manifest,
            Some(stored),
            sender_cfg,
            receivers,
            loss,
            seed,
        )
    }

    fn with_manifest(
        image: Vec<u8>,
        manifest: Manifest,
        stored: Option<Vec<Vec<u8>>>,
        sender_cfg: SenderConfig,
        receivers: usize,
        loss: f64,
        seed: u64,
    ) -> Self {
        let start = Instant::now();
        let chunk_size = manifest.chunk_size;
        let sender = Sender::new(sender_cfg, manifest, start);
        let mut rng = Rng::new(seed.wrapping_add(1));
        let receivers = (0..receivers)
            .map(|i| {
                let cfg = Self::receiver_cfg(i, image.len() as u64);
                let mut garbage = vec![0u8; image.len()];
                rng.fill(&mut garbage);
                SimReceiver {
                    rx: Receiver::new(cfg, start),
                    disk: garbage,
                    result: None,
                    loss,
                    start_at: Duration::ZERO,
                    deaf_after: None,
                    writes: 0,
                    drop_first_pass_seqs: None,
                    socket: None,
                    coder: crate::fec::Coder::default(),
                    nic: None,
                    disk_model: None,
                }
            })
            .collect();
        Self {
            now: start,
            start,
            sender,
            sender_alive_for: None,
            source: MemSource {
                image,
                chunk_size: chunk_size as usize,
                stored,
            },
            receivers,
            net: BinaryHeap::new(),
            rng,
            order: 0,
            reorder: 0.0,
            duplicate: 0.0,
            latency: Duration::from_micros(300),
            control_loss: 0.0,
            loss_run: 1,
            group_sent: 0,
            run_lost: Vec::new(),
            run_started: None,
            restart: None,
            elsewhere: Vec::new(),
        }
    }

    pub fn receiver_cfg(i: usize, disk_size: u64) -> ReceiverConfig {
        ReceiverConfig {
            id: 1000 + i as u64,
            incarnation: i as u32,
            name: format!("rx{i}"),
            serial: format!("SN{i}"),
            disk_size,
            sender_timeout: Duration::from_secs(5),
            status_interval: Duration::from_millis(20),
            max_partial_chunks: 64,
            trust: crate::trust::Trust::Keys(vec![session_key().public()]),
            ..ReceiverConfig::default()
        }
    }

    pub fn image(&self) -> &[u8] {
        &self.source.image
    }

    fn send(&mut self, dest: Dest, bytes: Vec<u8>, loss: f64) {
        if self.rng.chance(loss) {
            return;
        }
        let copies = if self.rng.chance(self.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let jitter = if self.rng.chance(self.reorder) {
                Duration::from_micros(self.rng.below(3000))
            } else {
                Duration::ZERO
            };
            self.order += 1;
            self.net.push(InFlight {
                at: self.now + self.latency + jitter,
                order: self.order,
                dest,
                bytes: bytes.clone(),
            });
        }
    }

    fn active(&self, i: usize) -> bool {
        let r = &self.receivers[i];
        self.now >= self.start + r.start_at && r.result.is_none()
    }

    /// Carries out what receiver `i` asks for: datagrams onto the network, disk work on its
    /// in-memory disk (whose completion may ask for more), and its end.
    fn drain_receiver(&mut self, i: usize) {
        loop {
            if let Some(transmit) = self.receivers[i].rx.poll_transmit() {
                let crate::wire::Destination::Peer(to) = transmit.destination else {
                    panic!("receivers never send to the group");
                };
                if to != sender_address() {
                    // An answer to another host (a refusal to a rogue sender).
                    self.elsewhere.push((i, to, transmit.bytes));
                    continue;
                }
                let r = &self.receivers[i];
                let deaf = r.deaf_after.is_some_and(|d| self.now >= self.start + d);
                let loss = if deaf {
                    1.0
                } else {
                    self.control_loss.max(r.loss)
                };
                self.send(Dest::Sender(i), transmit.bytes, loss);
                continue;
            }
            let now = self.now;
            let r = &mut self.receivers[i];
            let Some(event) = r.rx.poll_event() else {
                return;
            };
            let done = match event {
                Event::Write(write) => {
                    let (chunk, offset) = (write.chunk, write.offset);
                    match write.decode_with(&mut r.coder) {
                        Ok(data) => {
                            r.disk[offset as usize..offset as usize + data.len()]
                                .copy_from_slice(&data);
                            r.writes += 1;
                            if let Some(disk) = &mut r.disk_model {
                                disk.queue(data.len(), DiskDone::Written { chunk }, now);
                                continue;
                            }
                            DiskDone::Written { chunk }
                        }
                        Err(e) => DiskDone::Rejected {
                            chunk,
                            why: e.to_string(),
                        },
                    }
                }
                Event::Zero { offset, len } => {
                    r.disk[offset as usize..(offset + len) as usize].fill(0);
                    DiskDone::Zeroed { len }
                }
                Event::FlushAndVerify { manifest } => DiskDone::Verified(
                    manifest
                        .read_back(&mut Cursor::new(&r.disk))
                        .map(|m| m.image_hash())
                        .map_err(|e| e.to_string()),
                ),
                Event::Finished(result) => {
                    r.result = Some(result);
                    continue;
                }
            };
            r.rx.handle_disk(done, now);
        }
    }

    /// A datagram arrives at receiver `i` from `from`: straight into the receiver, or into its
    /// bounded socket buffer.
    pub fn deliver(&mut self, i: usize, bytes: Vec<u8>, from: SocketAddr) {
        let now = self.now;
        let r = &mut self.receivers[i];
        if let Some(nic) = &mut r.nic {
            if !nic.admit(bytes.len(), now) {
                return;
            }
        }
        match &mut r.socket {
            Some(socket) if socket.queue.len() >= socket.capacity => {
                socket.overflows += 1;
                r.rx.set_overflow(socket.overflows);
            }
            Some(socket) => socket.queue.push_back((bytes, from)),
            None => {
                r.rx.handle_datagram(&bytes, from, self.now);
                self.drain_receiver(i);
            }
        }
    }

    /// A slow receiver reads what its pace allows from its socket buffer, nothing while it waits
    /// for its disk.
    fn read_socket(&mut self, i: usize) {
        for _ in 0..self.receivers[i].socket.as_ref().map_or(0, |s| s.per_step) {
            if self.receivers[i]
                .disk_model
                .as_ref()
                .is_some_and(DiskModel::full)
            {
                return;
            }
            let Some((bytes, from)) = self.receivers[i]
                .socket
                .as_mut()
                .and_then(|s| s.queue.pop_front())
            else {
                return;
            };
            if self.active(i) {
                self.receivers[i].rx.handle_datagram(&bytes, from, self.now);
                self.drain_receiver(i);
            }
        }
    }

    /// The writes receiver `i`'s disk finished by now are reported to it.
    fn finish_disk_writes(&mut self, i: usize) {
        let now = self.now;
        loop {
            let r = &mut self.receivers[i];
            let Some(disk) = &mut r.disk_model else {
                return;
            };
            if disk.pending.front().is_none_or(|(at, _)| *at > now) {
                return;
            }
            let Some((_, done)) = disk.pending.pop_front() else {
                return;
            };
            if r.result.is_none() {
                r.rx.handle_disk(done, now);
                self.drain_receiver(i);
            }
        }
    }

    /// A datagram from another host reaches the sender.
    pub fn inject_to_sender(&mut self, bytes: &[u8], from: SocketAddr) {
        self.sender.handle_datagram(bytes, from, self.now);
    }

    /// Runs until the sender ended and every receiver finished, or `limit` of virtual time passed.
    pub fn run(&mut self, limit: Duration) {
        self.run_inner(limit, &|_| false);
    }

    /// Runs until `stop` holds (or the session ends, or a minute of virtual time passed).
    pub fn run_until(&mut self, stop: impl Fn(&Sim) -> bool) {
        self.run_inner(Duration::from_secs(60), &stop);
    }

    fn run_inner(&mut self, limit: Duration, stop: &dyn Fn(&Sim) -> bool) {
        let step = Duration::from_micros(500);
        while self.now < self.start + limit && !stop(self) {
            let sender_alive = self
                .sender_alive_for
                .is_none_or(|d| self.now < self.start + d);
            // Both machines are driven only when they said they would have something to do:
            // a wrong `poll_timeout` stalls the simulation and fails the test.
            if sender_alive
                && self
                    .sender
                    .poll_timeout()
                    .is_some_and(|due| due <= self.now)
            {
                self.sender.handle_timeout(self.now);
                while let Some(transmit) = self.sender.poll_transmit(self.now, &mut self.source) {
                    let group = transmit.destination == crate::wire::Destination::Group;
                    if group && self.loss_run > 1 {
                        // A run ends after `loss_run` datagrams or with the step: one send
                        // gathers only what goes out back to back.
                        if self.group_sent.is_multiple_of(self.loss_run)
                            || self.run_started != Some(self.now)
                        {
                            self.group_sent = 0;
                            self.run_started = Some(self.now);
                            self.run_lost = (0..self.receivers.len())
                                .map(|i| {
                                    let loss = self.receivers[i].loss;
                                    self.rng.chance(loss)
                                })
                                .collect();
                        }
                        self.group_sent += 1;
                    }
                    for i in 0..self.receivers.len() {
                        let to_this_one = match transmit.destination {
                            crate::wire::Destination::Group => true,
                            crate::wire::Destination::Peer(addr) => addr == receiver_address(i),
                        };
                        if to_this_one {
                            let loss = match self.run_lost.get(i) {
                                Some(&lost) if group && self.loss_run > 1 => {
                                    if lost {
                                        1.0
                                    } else {
                                        0.0
                                    }
                                }
                                _ => self.receivers[i].loss,
                            };
                            self.send(Dest::Receiver(i), transmit.bytes.clone(), loss);
                        }
                    }
                }
            }
            while self.net.peek().is_some_and(|f| f.at <= self.now) {
                let Some(flight) = self.net.pop() else { break };
                match flight.dest {
                    Dest::Sender(from) if sender_alive => {
                        self.sender
                            .handle_datagram(&flight.bytes, receiver_address(from), self.now)
                    }
                    Dest::Sender(_) => {}
                    Dest::Receiver(i) => {
                        let r = &self.receivers[i];
                        let deaf = r.deaf_after.is_some_and(|d| self.now >= self.start + d);
                        let targeted = r.drop_first_pass_seqs.as_ref().is_some_and(|range| {
                            matches!(
                                crate::wire::Packet::parse(&flight.bytes),
                                Ok(crate::wire::Packet { body: crate::wire::Body::Data { seq, flags: 0, .. }, .. }) if range.contains(&seq)
                            )
                        });
                        if self.active(i) && !deaf && !targeted {
                            self.deliver(i, flight.bytes, sender_address());
                        }
                    }
                }
            }
            if let Some((i, at)) = self.restart {
                if self.now >= self.start + at {
                    // The machine reboots: a fresh receiver with the same identity, same disk.
                    self.restart = None;
                    let cfg = ReceiverConfig {
                        incarnation: 1_000_000 + i as u32,
                        ..Self::receiver_cfg(i, self.source.image.len() as u64)
                    };
                    self.receivers[i].rx = Receiver::new(cfg, self.now);
                }
            }
            for i in 0..self.receivers.len() {
                self.finish_disk_writes(i);
                self.read_socket(i);
                let due = self.receivers[i]
                    .rx
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now);
                if self.active(i) && due {
                    self.receivers[i].rx.handle_timeout(self.now);
                    self.drain_receiver(i);
                }
            }
            let receivers_done = self.receivers.iter().all(|r| r.result.is_some());
            let sender_done = !sender_alive || self.sender.phase() == crate::sender::Phase::Ended;
            if receivers_done && sender_done && self.net.is_empty() {
                return;
            }
            self.now += step;
        }
    }

    pub fn assert_all_copies_exact(&self) {
        for r in self.sender.receivers().filter(|r| r.failure.is_some()) {
            eprintln!("sender: receiver {} failed: {:?}", r.name, r.failure);
        }
        for (i, r) in self.receivers.iter().enumerate() {
            assert_eq!(
                r.result,
                Some(Ok(())),
                "receiver {i} did not finish with a verified copy"
            );
            assert!(
                r.disk == self.source.image,
                "receiver {i}'s disk differs from the image"
            );
        }
        assert_eq!(self.sender.outcome(), Some(&Outcome::AllDone));
        assert!(self
            .sender
            .receivers()
            .all(|r| r.state == ReceiverState::Done));
    }
}

fn cfg(min_receivers: u32) -> SenderConfig {
    SenderConfig {
        min_receivers,
        initial_rate: 50_000_000,
        max_rate: 100_000_000,
        receiver_timeout: Duration::from_secs(5),
        signing_key: Some(session_key()),
        address: sender_address(),
        ..SenderConfig::default()
    }
}

const CHUNK: u32 = 64 * 1024;

/// `cfg` held at 8 MB/s: slow enough in virtual time for receivers to join or restart mid-pass.
fn paced(cfg: SenderConfig) -> SenderConfig {
    SenderConfig {
        initial_rate: 8_000_000,
        max_rate: 8_000_000,
        ..cfg
    }
}

#[test]
fn lossless_session_copies_exactly_and_skips_zero_chunks() {
    let image = test_image(40 * CHUNK as usize + 1000, 1);
    let mut sim = Sim::new(image, CHUNK, cfg(3), 3, 0.0, 1);
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
    let manifest = sim.sender.manifest();
    let data = manifest.data_bytes();
    assert!(
        data < manifest.image_size,
        "some chunks are zero and are not sent"
    );
    // The sender knows where each receiver is, for its progress table.
    for r in sim.sender.receivers() {
        let index = (r.id - 1000) as usize;
        assert_eq!(r.address, Some(receiver_address(index)));
    }
    // No loss: nothing repaired, data sent once.
    assert_eq!(sim.sender.stats.repair_datagrams, 0);
    assert_eq!(sim.sender.stats.data_bytes, data);
    for r in &sim.receivers {
        assert_eq!(r.rx.stats.repaired_blocks, 0);
    }
}

#[test]
fn receivers_count_their_repairs_and_the_data_they_wrote() {
    let image = test_image(24 * CHUNK as usize, 11);
    let mut sim = Sim::new(image, CHUNK, cfg(3), 3, 0.05, 11);
    // What receiver 0's progress view would show along the way.
    let seen = std::cell::RefCell::new(Vec::new());
    sim.run_until(|s| {
        seen.borrow_mut().push(s.receivers[0].rx.data_written());
        false
    });
    sim.assert_all_copies_exact();
    let data = sim.sender.manifest().data_bytes();
    let seen = seen.into_inner();
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1] || w[1] == 0),
        "data written went backwards"
    );
    // Zero chunks are not data: the count moves a chunk at a time and ends at the data's size
    // (still shown while the receiver reports its result).
    assert_eq!(seen.iter().copied().max(), Some(data));
    assert!(seen.iter().all(|&w| w % u64::from(CHUNK) == 0));
    assert!(
        seen.iter().any(|&w| w > 0 && w < data),
        "never seen mid-way"
    );
    // Each receiver lost about 5 % of the first pass and got those blocks back as repairs.
    let repair_datagrams = sim.sender.stats.repair_datagrams;
    for (i, r) in sim.receivers.iter().enumerate() {
        let repaired = r.rx.stats.repaired_blocks;
        assert!(
            repaired > 0 && repaired <= repair_datagrams,
            "receiver {i}: {repaired} repaired blocks, {repair_datagrams} repairs sent"
        );
    }
}

#[test]
fn random_loss_from_0_to_20_percent_with_reordering_and_duplicates() {
    for (seed, loss, receivers) in [
        (2, 0.01, 1),
        (3, 0.05, 3),
        (4, 0.10, 5),
        (5, 0.20, 3),
        (6, 0.05, 10),
    ] {
        let image = test_image(24 * CHUNK as usize, seed);
        let mut sim = Sim::new(image, CHUNK, cfg(receivers as u32), receivers, loss, seed);
        sim.reorder = 0.05;
        sim.duplicate = 0.02;
        sim.run(Duration::from_secs(120));
        sim.assert_all_copies_exact();
        let sent = sim.sender.stats.data_bytes as f64 / sim.sender.manifest().data_bytes() as f64;

        // Each missing piece is sent once for everybody: the overhead stays near the union of losses.
        let union = 1.0 - (1.0 - loss).powi(receivers as i32);
        // Repair rounds: the union of first-pass losses, then the union of their losses, and so on.
        let expected = 1.0 / (1.0 - union);
        assert!(
            sent < expected + 0.15,
            "loss {loss} x{receivers}: sent {sent:.2}x the data, expected about {expected:.2}x"
        );
    }
}

#[test]
fn fifty_receivers_with_loss() {
    let image = test_image(12 * CHUNK as usize, 7);
    let mut sim = Sim::new(image, CHUNK, cfg(50), 50, 0.03, 7);
    sim.run(Duration::from_secs(120));
    sim.assert_all_copies_exact();
}

#[test]
fn late_joiner_gets_everything() {
    let image = test_image(32 * CHUNK as usize, 8);
    let mut sim = Sim::new(image, CHUNK, paced(cfg(1)), 2, 0.02, 8);
    // The first pass takes about 250 ms; the second receiver joins halfway through.
    sim.receivers[1].start_at = Duration::from_millis(120);
    sim.run(Duration::from_secs(120));
    sim.assert_all_copies_exact();
}

#[test]
fn receiver_restarted_mid_stream_still_finishes() {
    let image = test_image(32 * CHUNK as usize, 9);
    let mut sim = Sim::new(image, CHUNK, paced(cfg(2)), 2, 0.02, 9);
    sim.restart = Some((0, Duration::from_millis(120)));
    sim.run(Duration::from_secs(120));
    sim.assert_all_copies_exact();
}

#[test]
fn sender_death_makes_every_receiver_fail() {
    let image = test_image(64 * CHUNK as usize, 10);
    let mut sim = Sim::new(image, CHUNK, paced(cfg(2)), 2, 0.0, 10);
    sim.sender_alive_for = Some(Duration::from_millis(150));
    sim.run(Duration::from_secs(60));
    for r in &sim.receivers {
        let err = r.result.clone().expect("finished").expect_err("must fail");
        assert!(matches!(err, Failure::SenderSilent { .. }), "{err}");
        assert!(err.to_string().contains("went silent"), "{err}");
    }
}

#[test]
fn too_small_target_is_refused_on_both_sides_before_any_write() {
    let image = test_image(16 * CHUNK as usize, 11);
    let mut sim = Sim::new(
        image.clone(),
        CHUNK,
        SenderConfig {
            start_timeout: Some(Duration::from_secs(1)),
            ..cfg(2)
        },
        2,
        0.0,
        11,
    );
    // Receiver 1's disk is one byte short.
    let small = Sim::receiver_cfg(1, image.len() as u64 - 1);
    sim.receivers[1].rx = Receiver::new(small, sim.now);
    sim.run(Duration::from_secs(60));
    let err = sim.receivers[1].result.clone().unwrap().unwrap_err();
    assert!(err.to_string().contains("too small"), "{err}");
    assert_eq!(sim.receivers[1].writes, 0);
    assert_eq!(sim.receivers[0].result, Some(Ok(())));
    let report = sim.sender.receivers().find(|r| r.name == "rx1").unwrap();
    assert_eq!(report.state, ReceiverState::Failed);
    assert!(matches!(
        report.failure,
        Some(crate::sender::ReceiverFailure::TooSmall { .. })
    ));
    assert_eq!(sim.sender.outcome(), Some(&Outcome::SomeFailed));
}

#[test]
fn a_receiver_that_falls_off_is_dropped_and_ends_failed_while_others_finish() {
    let image = test_image(48 * CHUNK as usize, 12);
    let mut sender_cfg = paced(cfg(2));
    sender_cfg.receiver_timeout = Duration::from_secs(2);
    let mut sim = Sim::new(image, CHUNK, sender_cfg, 2, 0.01, 12);
    sim.receivers[1].deaf_after = Some(Duration::from_millis(30));
    sim.run(Duration::from_secs(60));
    assert_eq!(sim.receivers[0].result, Some(Ok(())));
    assert!(sim.receivers[0].disk == sim.image());
    let r1 = sim.receivers[1].result.clone().expect("finished");
    assert!(r1.is_err(), "the dropped receiver must fail, not succeed");
    let report = sim.sender.receivers().find(|r| r.name == "rx1").unwrap();
    assert_eq!(report.state, ReceiverState::Failed);
    assert!(matches!(
        report.failure,
        Some(crate::sender::ReceiverFailure::Silent { .. })
    ));
    assert_eq!(sim.sender.outcome(), Some(&Outcome::SomeFailed));
    assert_eq!(sim.receivers[0].rx.phase(), RxPhase::Finished);
}

#[test]
fn losing_the_tail_of_the_last_chunk_is_still_repaired() {
    // Nothing follows the last first-pass datagrams, so only the announcements tell the receiver
    // that they were sent: without that, its NAK would look older than the data forever.
    let image = test_image(8 * CHUNK as usize, 13);
    let mut sim = Sim::new(image, CHUNK, cfg(1), 1, 0.0, 13);
    let data_chunks = sim.sender.manifest().data_chunks().count() as u64;
    let last_seq =
        data_chunks * (u64::from(CHUNK)).div_ceil(u64::from(crate::wire::DEFAULT_BLOCK_SIZE));
    sim.receivers[0].drop_first_pass_seqs = Some(last_seq - 3..=last_seq);
    sim.run(Duration::from_secs(30));
    sim.assert_all_copies_exact();
}

/// Hand-made datagrams for tests that play one side of a session.
mod forge {
    use super::*;
    use crate::wire::{Body, Destination, Nak, Packet, Transmit, Verdict};

    pub fn join(session: u32, receiver: u64, incarnation: u32, disk_size: u64) -> Vec<u8> {
        Packet {
            session,
            body: Body::Join {
                receiver,
                incarnation,
                disk_size,
                logical_block: 512,
                refusal: 0,
                name: "rx".into(),
                serial: String::new(),
            },
        }
        .emit()
    }

    pub fn status(session: u32, receiver: u64, nonce: u64, done: u32, naks: Vec<Nak>) -> Vec<u8> {
        Packet {
            session,
            body: Body::Status {
                receiver,
                nonce,
                state: ReceiverState::Receiving,
                chunks_done: done,
                chunks_total: 8,
                highest_seq: u64::MAX,
                received: 0,
                overflow: 0,
                disk_rate: 0,
                manifest_missing: u32::MAX,
                naks,
            },
        }
        .emit()
    }

    pub fn done(session: u32, receiver: u64, nonce: u64, ok: bool, hash: [u8; 32]) -> Vec<u8> {
        Packet {
            session,
            body: Body::Done {
                receiver,
                nonce,
                ok,
                image_hash: hash,
                reason: if ok { String::new() } else { "forged".into() },
            },
        }
        .emit()
    }

    /// Every accepting Welcome the sender queued: (to whom, nonce).
    pub fn welcomes(sender: &mut Sender, now: Instant) -> Vec<(SocketAddr, u64)> {
        let mut source = super::MemSource {
            image: Vec::new(),
            chunk_size: 1,
            stored: None,
        };
        let mut found = Vec::new();
        while let Some(Transmit { destination, bytes }) = sender.poll_transmit(now, &mut source) {
            if let Ok(Packet {
                body:
                    Body::Welcome {
                        verdict: Verdict::Accepted,
                        nonce,
                        ..
                    },
                ..
            }) = Packet::parse(&bytes)
            {
                let Destination::Peer(to) = destination else {
                    panic!("a Welcome went to the group");
                };
                found.push((to, nonce));
            }
        }
        found
    }

    /// The nonce of the Welcome the sender queued for `to`, if any.
    pub fn welcome_nonce(sender: &mut Sender, now: Instant, to: SocketAddr) -> Option<u64> {
        welcomes(sender, now)
            .into_iter()
            .find(|(addr, _)| *addr == to)
            .map(|(_, nonce)| nonce)
    }
}

#[test]
fn a_repeated_join_is_welcomed_again_but_a_new_incarnation_starts_over() {
    let image = test_image(8 * CHUNK as usize, 14);
    let manifest =
        Manifest::scan(&mut Cursor::new(&image), image.len() as u64, CHUNK, |_| {}).unwrap();
    let t0 = Instant::now();
    let mut sender = Sender::new(cfg(1), manifest, t0);
    let at = receiver_address(0);
    sender.handle_datagram(&forge::join(1, 5, 77, u64::MAX), at, t0);
    let nonce = forge::welcome_nonce(&mut sender, t0, at).expect("welcomed");
    sender.handle_datagram(&forge::status(1, 5, nonce, 3, Vec::new()), at, t0);
    sender.handle_datagram(&forge::join(1, 5, 77, u64::MAX), at, t0);
    assert_eq!(forge::welcome_nonce(&mut sender, t0, at), Some(nonce));
    assert_eq!(
        sender.receivers().next().unwrap().chunks_done,
        3,
        "a repeated Join must not reset the receiver"
    );
    // While it still reports, a new incarnation's Join is not believed (it may be forged)...
    sender.handle_datagram(&forge::join(1, 5, 78, u64::MAX), at, t0);
    assert_eq!(sender.receivers().next().unwrap().chunks_done, 3);
    assert_eq!(forge::welcome_nonce(&mut sender, t0, at), None);
    // ...once the old one fell silent, the restarted receiver starts over.
    let later = t0 + Duration::from_millis(1500);
    sender.handle_datagram(&forge::join(1, 5, 78, u64::MAX), at, later);
    assert_eq!(
        sender.receivers().next().unwrap().chunks_done,
        0,
        "a restarted receiver starts over"
    );
    assert_ne!(forge::welcome_nonce(&mut sender, later, at), Some(nonce));
}

#[test]
fn forged_reports_joins_and_sender_datagrams_from_other_hosts_change_nothing() {
    let image = test_image(24 * CHUNK as usize, 31);
    let mut sim = Sim::new(image, CHUNK, paced(cfg(2)), 2, 0.0, 31);
    let attacker = SocketAddr::from(([10, 0, 9, 9], 7744));
    let session = sim.sender.session();
    let hash = sim.sender.image_hash();
    sim.run_until(|sim| sim.sender.stats.data_datagrams > 100);
    // A Done claiming receiver 0 verified, from the attacker's address with a guessed nonce.
    let victim = 1000;
    for nonce in [0, 1, u64::MAX] {
        sim.inject_to_sender(&forge::done(session, victim, nonce, true, hash), attacker);
        sim.inject_to_sender(&forge::done(session, victim, nonce, false, hash), attacker);
    }
    // A Join for the victim's id from elsewhere: neither "too small" for it, nor a takeover.
    sim.inject_to_sender(&forge::join(session, victim, 999, 1), attacker);
    // An End and a Welcome(Dropped) to the group, from the attacker.
    let end = crate::wire::Packet {
        session,
        body: crate::wire::Body::End {
            aborted: true,
            signature: Vec::new(),
        },
    }
    .emit();
    let dropped = crate::wire::Packet {
        session,
        body: crate::wire::Body::Welcome {
            receiver: victim,
            verdict: crate::wire::Verdict::Dropped,
            nonce: 0,
            signature: Vec::new(),
        },
    }
    .emit();
    for i in 0..2 {
        sim.deliver(i, end.clone(), attacker);
        sim.deliver(i, dropped.clone(), attacker);
    }
    let victim_report = sim.sender.receivers().find(|r| r.id == victim).unwrap();
    assert_eq!(victim_report.state, ReceiverState::Receiving);
    assert!(sim.sender.stats.forged >= 7, "{:?}", sim.sender.stats);
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
    assert!(sim.receivers.iter().all(|r| r.rx.stats.forged >= 2));
}

#[test]
fn joins_that_never_answer_do_not_satisfy_the_start_policy() {
    let image = test_image(8 * CHUNK as usize, 32);
    let manifest =
        Manifest::scan(&mut Cursor::new(&image), image.len() as u64, CHUNK, |_| {}).unwrap();
    let t0 = Instant::now();
    let mut sender = Sender::new(cfg(2), manifest, t0);
    // Two Joins from spoofed addresses that will never see their Welcome.
    for i in 0..2 {
        sender.handle_datagram(
            &forge::join(1, 50 + i, 1, u64::MAX),
            receiver_address(40 + i as usize),
            t0,
        );
    }
    sender.handle_timeout(t0 + Duration::from_millis(10));
    assert_eq!(sender.phase(), crate::sender::Phase::Waiting);
    // Once both answer from where they joined, with their nonces, the data starts.
    let welcomes = forge::welcomes(&mut sender, t0);
    assert_eq!(welcomes.len(), 2);
    for (i, (at, nonce)) in welcomes.into_iter().enumerate() {
        assert_eq!(at, receiver_address(40 + i));
        sender.handle_datagram(
            &forge::status(1, 50 + i as u64, nonce, 0, Vec::new()),
            at,
            t0,
        );
    }
    sender.handle_timeout(t0 + Duration::from_millis(20));
    assert_eq!(sender.phase(), crate::sender::Phase::Sending);
}

#[test]
fn a_receiver_asking_for_everything_neither_starves_the_others_nor_stays() {
    use crate::wire::Nak;
    let image = test_image(32 * CHUNK as usize, 33);
    let mut sim = Sim::new(image, CHUNK, paced(cfg(2)), 2, 0.0, 33);
    let session = sim.sender.session();
    let greedy = SocketAddr::from(([10, 0, 9, 10], 7744));
    let t0 = sim.now;
    sim.inject_to_sender(&forge::join(session, 77, 1, u64::MAX), greedy);
    let nonce = forge::welcome_nonce(&mut sim.sender, t0, greedy).expect("welcomed");
    let everything = vec![Nak::Chunks {
        start: 0,
        count: u32::MAX,
    }];
    let mut dropped_at = None;
    for step in 0..4000 {
        sim.inject_to_sender(
            &forge::status(session, 77, nonce, 0, everything.clone()),
            greedy,
        );
        sim.run_until(|s| s.now >= t0 + Duration::from_millis(5 * (step + 1)));
        let greedy_report = sim.sender.receivers().find(|r| r.id == 77).unwrap();
        if greedy_report.is_final() {
            dropped_at = Some(step);
            break;
        }
    }
    let report = sim.sender.receivers().find(|r| r.id == 77).unwrap();
    // It says it takes in nothing: as a congested receiver it may slow the session down to
    // the floor, and there it is dropped; or it is dropped for its requests first.
    assert!(
        matches!(
            report.failure,
            Some(
                crate::sender::ReceiverFailure::TooManyRepairs { .. }
                    | crate::sender::ReceiverFailure::TooSlow { .. }
            )
        ),
        "{report:?} (dropped at step {dropped_at:?})"
    );
    sim.run(Duration::from_secs(60));
    for r in &sim.receivers {
        assert_eq!(r.result, Some(Ok(())));
    }
    // Repairs alternate with the first pass while it runs: the honest receivers' data kept
    // flowing at no less than half the pace.
    assert!(sim.sender.stats.repair_datagrams > 0);
}

#[test]
fn repeating_a_request_while_its_repair_is_queued_is_not_counted_again() {
    use crate::wire::Nak;
    // A slow receiver repeats its NAKs at every status while the repair waits in the queue:
    // that costs no extra traffic and must not get it dropped as too lossy.
    let image = test_image(32 * CHUNK as usize, 35);
    let mut sim = Sim::new(image, CHUNK, paced(cfg(2)), 2, 0.0, 35);
    let session = sim.sender.session();
    let slow = SocketAddr::from(([10, 0, 9, 11], 7744));
    let t0 = sim.now;
    sim.inject_to_sender(&forge::join(session, 78, 1, u64::MAX), slow);
    let nonce = forge::welcome_nonce(&mut sim.sender, t0, slow).expect("welcomed");
    let blocks_per_chunk = CHUNK as u64 / 1400 + 1;
    sim.run_until(|s| s.sender.stats.data_datagrams > 2 * blocks_per_chunk);
    let first_chunk = vec![Nak::Chunks { start: 0, count: 1 }];
    for _ in 0..20_000 {
        sim.sender.handle_datagram(
            &forge::status(session, 78, nonce, 0, first_chunk.clone()),
            slow,
            sim.now,
        );
    }
    let report = sim.sender.receivers().find(|r| r.id == 78).unwrap();
    assert!(!report.is_final(), "{report:?}");
    assert!(
        report.repairs_requested <= blocks_per_chunk,
        "{} blocks counted for one chunk asked 20000 times",
        report.repairs_requested
    );
}

#[test]
fn stray_data_with_absurd_sequence_numbers_does_not_disable_repair_suppression() {
    // Three datagrams of the right session claiming sequence u64::MAX, before the real data:
    // believed, they would make every NAK look newer than any repair in flight.
    let run = |poison: bool| {
        let image = test_image(48 * CHUNK as usize, 34);
        let mut sim = Sim::new(image, CHUNK, cfg(3), 3, 0.05, 34);
        // A path longer than the status interval: without suppression, every status would ask
        // again for the repairs still on their way.
        sim.latency = Duration::from_millis(25);
        let session = sim.sender.session();
        sim.run_until(|s| {
            s.receivers
                .iter()
                .all(|r| r.rx.phase() == RxPhase::Receiving)
        });
        if poison {
            for i in 0..3 {
                for chunk in [0u32, 1, 2] {
                    let data = crate::wire::DataRef {
                        seq: u64::MAX,
                        chunk,
                        block: 0,
                        flags: 0,
                        bytes: &[0u8; 1408],
                    };
                    sim.deliver(i, crate::wire::emit_data(session, &data), sender_address());
                }
            }
        }
        sim.run(Duration::from_secs(120));
        sim.assert_all_copies_exact();
        sim.sender.stats.data_bytes as f64 / sim.sender.manifest().data_bytes() as f64
    };
    let clean = run(false);
    let poisoned = run(true);
    assert!(
        poisoned < clean * 1.1,
        "poisoned run sent {poisoned:.2}x the data, clean {clean:.2}x"
    );
}

/// One receiver of `chunks` chunks from a sender starting at and held to 40 MB/s.
fn one_receiver_at_40_mb_s(chunks: usize, seed: u64) -> Sim {
    let sender_cfg = SenderConfig {
        initial_rate: 40_000_000,
        max_rate: 40_000_000,
        ..cfg(1)
    };
    Sim::new(
        test_image(chunks * CHUNK as usize, seed),
        CHUNK,
        sender_cfg,
        1,
        0.0,
        seed,
    )
}

#[test]
fn a_slow_receiver_overflows_its_socket_and_the_sender_slows_down() {
    let mut sim = one_receiver_at_40_mb_s(64, 35);
    // Reads 4 datagrams per 0.5 ms step (~11 MB/s) into a 256-datagram buffer: a quarter of
    // the sender's ceiling.
    sim.receivers[0].socket = Some(SocketModel::new(256, 4));
    sim.run(Duration::from_secs(120));
    sim.assert_all_copies_exact();
    let overflows = sim.receivers[0].socket.as_ref().unwrap().overflows;
    assert!(overflows > 0, "the buffer must overflow");
    assert!(
        sim.sender.rate() < 30_000_000,
        "the sender kept its rate at {} B/s",
        sim.sender.rate()
    );
    let sent = sim.sender.stats.data_bytes as f64 / sim.sender.manifest().data_bytes() as f64;
    assert!(sent < 2.0, "sent {sent:.2}x the data");
}

#[test]
fn a_receiver_whose_disk_falls_behind_paces_the_sender_instead_of_overflowing() {
    // The link allows 40 MB/s, the receiver's disk writes 10 MB/s behind a queue of 16 chunks,
    // and its socket holds 512 datagrams (0.7 MB): the sender must learn the disk's rate from
    // the reports and stay near it, so the socket never overflows and nothing is sent twice.
    let mut sim = one_receiver_at_40_mb_s(48, 36);
    sim.receivers[0].socket = Some(SocketModel::new(512, 64));
    sim.receivers[0].disk_model = Some(DiskModel::new(10_000_000.0, 16));
    sim.run(Duration::from_secs(120));
    sim.assert_all_copies_exact();
    let overflows = sim.receivers[0].socket.as_ref().unwrap().overflows;
    assert_eq!(overflows, 0, "the receiver's socket overflowed");
    let sent = sim.sender.stats.data_bytes as f64 / sim.sender.manifest().data_bytes() as f64;
    assert!(sent < 1.05, "sent {sent:.2}x the data");
    assert!(
        sim.sender.rate() < 15_000_000,
        "the sender kept its rate at {} B/s",
        sim.sender.rate()
    );
}

#[test]
fn an_empty_image_is_never_reported_verified() {
    let mut sim = Sim::new(Vec::new(), CHUNK, cfg(1), 1, 0.0, 36);
    sim.run(Duration::from_secs(10));
    let result = sim.receivers[0].result.clone().expect("finished");
    assert_eq!(result, Err(Failure::EmptyImage));
}

#[test]
fn a_receiver_dropped_at_the_deadline_is_told_and_fails_at_once() {
    let image = test_image(48 * CHUNK as usize, 15);
    let sender_cfg = SenderConfig {
        deadline: Some(Duration::from_millis(200)),
        ..paced(cfg(2))
    };
    let mut sim = Sim::new(image, CHUNK, sender_cfg, 2, 0.0, 15);
    // The first pass alone takes about 400 ms: receiver 1 cannot finish by the deadline, and it
    // still reports, so the sender tells it.
    sim.receivers[1].loss = 0.3;
    sim.run(Duration::from_secs(60));
    let err = sim.receivers[1]
        .result
        .clone()
        .expect("finished")
        .expect_err("must fail");
    assert!(matches!(err, Failure::Dropped { .. }), "{err}");
    let report = sim.sender.receivers().find(|r| r.name == "rx1").unwrap();
    let failure = report.failure.as_ref().unwrap().to_string();
    assert!(
        failure.contains("not done 0.2 s after the data started"),
        "{report:?}"
    );
    assert_eq!(sim.sender.outcome(), Some(&Outcome::SomeFailed));
}

#[test]
fn announcements_claiming_huge_sizes_are_dropped_before_any_allocation() {
    use crate::wire::{Body, Packet};
    let announce = |chunk_size: u32, block_size: u16, manifest_len: u32| {
        Packet {
            session: 9,
            body: Body::Announce {
                image_size: u64::MAX,
                chunk_size,
                block_size,
                manifest_len,
                image_hash: [0; 32],
                front: 0,
                seq: 0,
                flags: 0,
                signature: Vec::new(),
            },
        }
        .emit()
    };
    let any = ReceiverConfig {
        trust: crate::trust::Trust::Any,
        ..ReceiverConfig::default()
    };
    let mut rx = Receiver::new(any, Instant::now());
    for bad in [
        announce(1 << 30, 1408, 100),
        announce(1 << 20, 1408, u32::MAX),
        announce(1 << 20, 1, 100),
    ] {
        rx.handle_datagram(&bad, sender_address(), Instant::now());
        assert!(rx.poll_transmit().is_none() && rx.poll_event().is_none());
    }
    assert_eq!(rx.stats.malformed, 3);
    assert_eq!(rx.phase(), RxPhase::Listening);
    assert_eq!(rx.session(), None);
}

#[test]
fn compressed_chunks_from_a_store_decompress_exactly_with_loss_and_a_late_joiner() {
    for (seed, loss) in [(21, 0.0), (22, 0.05), (23, 0.15)] {
        let image = test_image(96 * CHUNK as usize + 5000, seed);
        let mut sim = Sim::compressed(image, CHUNK, paced(cfg(2)), 3, loss, seed);
        // Reordering makes a receiver ask for blocks still on their way: only the lossless run,
        // which counts the bytes exactly, goes without it.
        sim.reorder = if loss > 0.0 { 0.05 } else { 0.0 };
        if loss > 0.0 {
            // The first pass of the compressed image takes about 450 ms: join halfway.
            sim.receivers[2].start_at = Duration::from_millis(220);
        }
        sim.run(Duration::from_secs(120));
        sim.assert_all_copies_exact();
        let manifest = sim.sender.manifest();
        assert!(manifest.is_compressed());
        assert!(
            manifest.stored_bytes() < manifest.data_bytes() * 3 / 4,
            "the test image compresses"
        );
        if loss == 0.0 {
            // Exactly the compressed bytes travel, once.
            assert_eq!(sim.sender.stats.data_bytes, manifest.stored_bytes());
        }
    }
}

#[test]
fn a_damaged_compressed_frame_is_refused_and_asked_for_again() {
    let image = test_image(8 * CHUNK as usize, 24);
    let mut sim = Sim::compressed(image, CHUNK, cfg(1), 1, 0.0, 24);
    // Corrupt one stored frame for the first pass only: CRCs pass (they are computed over the
    // corrupted bytes), so only the chunk hash after decompression can catch it.
    let victim = sim.sender.manifest().data_chunks().nth(1).unwrap();
    let good = sim.source.stored.as_ref().unwrap()[victim as usize].clone();
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x55;
    sim.source.stored.as_mut().unwrap()[victim as usize] = bad;
    sim.run_until(|sim| sim.sender.stats.data_datagrams > 200);
    sim.source.stored.as_mut().unwrap()[victim as usize] = good;
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
    assert!(sim.receivers[0].rx.stats.corrupt_chunks >= 1);
}

#[test]
fn a_chunk_damaged_at_the_source_fails_the_copy_instead_of_looping() {
    let image = test_image(8 * CHUNK as usize, 25);
    let mut sim = Sim::compressed(image, CHUNK, cfg(2), 2, 0.0, 25);
    let victim = sim.sender.manifest().data_chunks().nth(2).unwrap();
    let stored = &mut sim.source.stored.as_mut().unwrap()[victim as usize];
    let middle = stored.len() / 2;
    stored[middle] ^= 0x55;
    sim.run(Duration::from_secs(60));
    for (i, r) in sim.receivers.iter().enumerate() {
        let result = r
            .result
            .clone()
            .unwrap_or_else(|| panic!("receiver {i} never ended"));
        let why = result.expect_err("a copy with a damaged chunk must not succeed");
        assert!(matches!(why, Failure::DamagedAtSource { .. }), "{why}");
    }
}

/// A second host on the LAN running its own sender: same session id, group and port as the
/// real one, another image, another key (or none).
fn rogue_sender(sim: &Sim, key: Option<crate::trust::SigningKey>, at: SocketAddr) -> Sender {
    let image = test_image(4 * CHUNK as usize, 99);
    let manifest =
        Manifest::scan(&mut Cursor::new(&image), image.len() as u64, CHUNK, |_| {}).unwrap();
    let rogue_cfg = SenderConfig {
        session: sim.sender.session(),
        signing_key: key,
        address: at,
        ..cfg(1)
    };
    Sender::new(rogue_cfg, manifest, sim.now)
}

/// The rogue's announcements and whatever else it has to send now.
fn rogue_datagrams(rogue: &mut Sender, now: Instant) -> Vec<Vec<u8>> {
    let mut source = MemSource {
        image: vec![1; 4 * CHUNK as usize],
        chunk_size: CHUNK as usize,
        stored: None,
    };
    let mut out = Vec::new();
    rogue.handle_timeout(now);
    while let Some(t) = rogue.poll_transmit(now, &mut source) {
        out.push(t.bytes);
    }
    out
}

#[test]
fn a_rogue_sender_with_the_same_session_is_refused_before_any_write() {
    let image = test_image(24 * CHUNK as usize, 41);
    let mut sim = Sim::new(image, CHUNK, paced(cfg(2)), 2, 0.0, 41);
    let rogue_at = SocketAddr::from(([10, 0, 9, 66], 40000));
    let stranger = crate::trust::SigningKey::from_seed([0x66; 32]);
    // Unsigned, signed by another key, and the real sender's own announcement replayed from
    // the rogue's address: each reaches the receivers before the real sender says anything.
    let mut unsigned = rogue_sender(&sim, None, rogue_at);
    let mut foreign = rogue_sender(&sim, Some(stranger), rogue_at);
    let real_announce = {
        let mut real = rogue_sender(&sim, Some(session_key()), sender_address());
        rogue_datagrams(&mut real, sim.now).remove(0)
    };
    for _ in 0..3 {
        let mut datagrams = rogue_datagrams(&mut unsigned, sim.now);
        datagrams.extend(rogue_datagrams(&mut foreign, sim.now));
        datagrams.push(real_announce.clone());
        for bytes in datagrams {
            for i in 0..2 {
                sim.deliver(i, bytes.clone(), rogue_at);
            }
        }
    }
    for r in &sim.receivers {
        assert_eq!(
            r.rx.phase(),
            RxPhase::Listening,
            "a receiver joined the rogue"
        );
        assert_eq!(r.writes, 0);
        assert_eq!(r.rx.stats.untrusted, 5, "{:?}", r.rx.stats);
    }
    // Each receiver told the rogue once per refused session why (the replay counts as signed
    // by an unknown key: the signature binds the real sender's address).
    let refusals: Vec<u8> = sim
        .elsewhere
        .iter()
        .filter(|(_, to, _)| *to == rogue_at)
        .filter_map(|(_, _, bytes)| match crate::wire::Packet::parse(bytes) {
            Ok(crate::wire::Packet {
                body: crate::wire::Body::Join { refusal, .. },
                ..
            }) => Some(refusal),
            _ => None,
        })
        .collect();
    assert_eq!(
        refusals.len(),
        2,
        "one refusal per receiver and session: {refusals:?}"
    );
    // The rogue's own sender names the receivers that refused it.
    for (i, _, bytes) in std::mem::take(&mut sim.elsewhere) {
        unsigned.handle_datagram(&bytes, receiver_address(i), sim.now);
    }
    let refused: Vec<_> = unsigned
        .receivers()
        .filter_map(|r| r.failure.clone())
        .collect();
    assert_eq!(
        refused,
        vec![crate::sender::ReceiverFailure::Refused(crate::trust::Untrusted::Unsigned); 2]
    );
    // The real session then runs undisturbed, while the rogue goes on announcing.
    let mut spoiled = 0;
    sim.run_until(|s| s.sender.stats.data_datagrams > 50);
    for _ in 0..50 {
        for bytes in rogue_datagrams(&mut foreign, sim.now) {
            for i in 0..2 {
                sim.deliver(i, bytes.clone(), rogue_at);
                spoiled += 1;
            }
        }
        let until = sim.now + Duration::from_millis(20);
        sim.run_until(|s| s.now >= until);
    }
    assert!(spoiled > 0);
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
}

#[test]
fn forged_sender_datagrams_from_the_senders_own_address_are_dropped() {
    use crate::wire::{Body, Packet, Verdict};
    let image = test_image(24 * CHUNK as usize, 42);
    let mut sim = Sim::new(image, CHUNK, paced(cfg(2)), 2, 0.0, 42);
    let session = sim.sender.session();
    sim.run_until(|s| s.sender.stats.data_datagrams > 100);
    let hash = sim.sender.image_hash();
    let stranger = crate::trust::SigningKey::from_seed([0x77; 32]);
    let forged = |body: Body, key: Option<&crate::trust::SigningKey>, incarnation: Option<u32>| {
        let mut packet = Packet { session, body };
        if let Some(key) = key {
            let statement = crate::trust::datagram_statement(
                sender_address(),
                incarnation,
                &packet.signed_content(),
            );
            packet.set_signature(key.sign(&statement).to_vec());
        }
        packet.emit()
    };
    for (i, receiver) in [(0usize, 1000u64), (1, 1001)] {
        let incarnation = Some(i as u32);
        for key in [None, Some(&stranger)] {
            let datagrams = [
                forged(
                    Body::End {
                        aborted: true,
                        signature: Vec::new(),
                    },
                    key,
                    None,
                ),
                forged(
                    Body::Welcome {
                        receiver,
                        verdict: Verdict::Dropped,
                        nonce: 0,
                        signature: Vec::new(),
                    },
                    key,
                    incarnation,
                ),
                forged(
                    Body::DoneAck {
                        receiver,
                        signature: Vec::new(),
                    },
                    key,
                    incarnation,
                ),
                forged(
                    Body::Announce {
                        image_size: 24 * u64::from(CHUNK),
                        chunk_size: CHUNK,
                        block_size: crate::wire::DEFAULT_BLOCK_SIZE,
                        manifest_len: 100,
                        image_hash: hash,
                        front: u32::MAX,
                        seq: u64::MAX,
                        flags: crate::wire::ANNOUNCE_FIRST_PASS_DONE,
                        signature: Vec::new(),
                    },
                    key,
                    None,
                ),
            ];
            // From the sender's own address, as a host that forges it would send them.
            for bytes in datagrams {
                sim.deliver(i, bytes, sender_address());
            }
        }
        // A Welcome really signed by the sender's key, but for another run of this receiver.
        let replayed = forged(
            Body::Welcome {
                receiver,
                verdict: Verdict::Dropped,
                nonce: 0,
                signature: Vec::new(),
            },
            Some(&session_key()),
            Some(i as u32 + 500),
        );
        sim.deliver(i, replayed, sender_address());
    }
    for r in &sim.receivers {
        assert_eq!(r.rx.phase(), RxPhase::Receiving);
        assert_eq!(r.rx.stats.forged, 9, "{:?}", r.rx.stats);
    }
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
}

#[test]
fn an_unsigned_session_is_joined_only_by_receivers_that_trust_anyone() {
    let image = test_image(8 * CHUNK as usize, 43);
    let unsigned = SenderConfig {
        signing_key: None,
        ..cfg(1)
    };
    let mut sim = Sim::new(image.clone(), CHUNK, unsigned.clone(), 1, 0.0, 43);
    sim.receivers[0].rx = Receiver::new(
        ReceiverConfig {
            wait_timeout: Some(Duration::from_secs(2)),
            ..Sim::receiver_cfg(0, image.len() as u64)
        },
        sim.now,
    );
    sim.run(Duration::from_secs(10));
    let err = sim.receivers[0].result.clone().unwrap().unwrap_err();
    assert!(
        matches!(&err, Failure::NoSession { refused: Some(why), .. } if why.contains("unsigned")),
        "{err}"
    );
    assert_eq!(sim.receivers[0].writes, 0);
    assert!(sim.sender.receivers().all(|r| r
        .failure
        .as_ref()
        .is_some_and(|f| f.to_string().contains("unsigned"))));

    let mut sim = Sim::new(image.clone(), CHUNK, unsigned, 1, 0.0, 43);
    sim.receivers[0].rx = Receiver::new(
        ReceiverConfig {
            trust: crate::trust::Trust::Any,
            ..Sim::receiver_cfg(0, image.len() as u64)
        },
        sim.now,
    );
    sim.run(Duration::from_secs(30));
    sim.assert_all_copies_exact();
}

/// Wire bytes over data bytes for a session of `receivers` each losing `loss` of what reaches
/// them, independently: the figure the repair scheme is judged by. Printed, and bounded.
fn wire_ratio(receivers: usize, loss: f64, chunk: u32, chunks: usize, seed: u64) -> f64 {
    let mut image = vec![0u8; chunks * chunk as usize];
    Rng::new(seed).fill(&mut image);
    let sender_cfg = SenderConfig {
        min_receivers: receivers as u32,
        initial_rate: 400_000_000,
        max_rate: 400_000_000,
        ..cfg(receivers as u32)
    };
    let mut sim = Sim::new(image, chunk, sender_cfg, receivers, loss, seed);
    sim.run(Duration::from_secs(300));
    sim.assert_all_copies_exact();
    let ratio = sim.sender.stats.data_bytes as f64 / sim.sender.manifest().data_bytes() as f64;
    println!(
        "sim: {receivers} receivers x {:.0} % loss, {chunks} chunks of {} KiB: sent {ratio:.3}x the data",
        loss * 100.0,
        chunk >> 10
    );
    ratio
}

#[test]
fn two_hundred_receivers_at_one_percent_loss_cost_little_repair() {
    // Before parity repairs (exact blocks, the union of everybody's losses): 1.898x.
    let ratio = wire_ratio(200, 0.01, 1 << 20, 6, 200);
    assert!(ratio <= 1.05, "sent {ratio:.3}x the data");
}

#[test]
fn eight_receivers_at_five_percent_loss_cost_little_repair() {
    // Before parity repairs: 1.356x.
    let ratio = wire_ratio(8, 0.05, 1 << 20, 24, 8);
    assert!(ratio <= 1.10, "sent {ratio:.3}x the data");
}

#[test]
fn proactive_parity_completes_chunks_without_asking() {
    let image = test_image(24 * CHUNK as usize, 41);
    let sender_cfg = SenderConfig {
        proactive_parity: 0.12,
        ..cfg(3)
    };
    let mut sim = Sim::new(image, CHUNK, sender_cfg, 3, 0.04, 41);
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
    let stats = sim.sender.stats;
    let data_chunks = sim.sender.manifest().data_chunks().count() as u64;
    assert!(stats.parity_datagrams >= data_chunks, "{stats:?}");
    // Most chunks were rebuilt from the parity sent with them: few repairs were asked for.
    assert!(
        stats.repair_datagrams < stats.parity_datagrams / 2,
        "{stats:?}"
    );
}

#[test]
fn parity_beyond_the_code_or_of_the_wrong_size_is_dropped() {
    let image = test_image(4 * CHUNK as usize, 42);
    let mut sim = Sim::new(image, CHUNK, paced(cfg(1)), 1, 0.0, 42);
    sim.run_until(|s| s.receivers[0].rx.phase() == RxPhase::Receiving);
    let session = sim.sender.session();
    let blocks = (CHUNK as usize).div_ceil(1408);
    for (index, len) in [(crate::fec::recovery_count(blocks) as u16, 1408), (0, 1000)] {
        let parity = crate::wire::DataRef {
            seq: 1,
            chunk: 1,
            block: index,
            flags: 0,
            bytes: &vec![0u8; len],
        };
        sim.deliver(
            0,
            crate::wire::emit_parity(session, &parity),
            sender_address(),
        );
    }
    assert_eq!(sim.receivers[0].rx.stats.malformed, 2);
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
}

#[test]
fn parity_only_where_receivers_lose_different_blocks() {
    // One receiver: the union of losses is its own loss, parity would only add its decoding.
    let image = test_image(16 * CHUNK as usize, 43);
    let mut sim = Sim::new(image.clone(), CHUNK, cfg(1), 1, 0.05, 43);
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
    assert!(sim.sender.stats.repair_datagrams > 0);
    assert_eq!(sim.sender.stats.parity_datagrams, 0);
    // Several receivers, parity turned off by the operator: exact blocks only.
    let sender_cfg = SenderConfig {
        parity: false,
        ..cfg(3)
    };
    let mut sim = Sim::new(image, CHUNK, sender_cfg, 3, 0.05, 43);
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
    assert!(sim.sender.stats.repair_datagrams > 0);
    assert_eq!(sim.sender.stats.parity_datagrams, 0);
}

#[test]
fn losses_in_runs_as_a_bridge_drops_whole_gso_sends_are_repaired_with_parity() {
    // On the benchmark's emulated LAN a UDP GSO send (up to 40 datagrams) crosses the bridge
    // as one packet, so a receiver loses whole runs of blocks. Parity still serves every
    // receiver with one set of shards per chunk.
    let chunks = 24;
    let mut image = vec![0u8; chunks << 20];
    Rng::new(44).fill(&mut image);
    let mut sim = Sim::new(image, 1 << 20, cfg(8), 8, 0.05, 44);
    sim.loss_run = 40;
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
    let stats = sim.sender.stats;
    let ratio = stats.data_bytes as f64 / sim.sender.manifest().data_bytes() as f64;
    eprintln!("8 receivers x 5 % in runs of 40: sent {ratio:.3}x the data; {stats:?}");
    assert!(stats.parity_datagrams > 0, "{stats:?}");
    assert!(ratio <= 1.2, "sent {ratio:.3}x the data");
    // Every receiver rebuilt its chunks with one decoder, as the agent's disk writer does.
    for (i, r) in sim.receivers.iter().enumerate() {
        assert!(
            r.rx.stats.repaired_blocks > 0,
            "receiver {i} repaired nothing"
        );
        assert_eq!(r.coder.made, 1, "receiver {i}: {:?}", r.coder);
    }
}

#[test]
fn a_congested_receiver_that_waited_for_the_others_is_measured_from_the_data_on() {
    // The slow receiver joins at once; the session waits a second for the second receiver.
    // The time spent waiting must not count as time it took in nothing: its first cut must be
    // to about what its NIC takes (20 MB/s), not straight to the floor.
    let image = test_image(96 * CHUNK as usize, 54);
    let sender_cfg = SenderConfig {
        min_rate: 1_000_000,
        ..floored(2)
    };
    let mut sim = Sim::new(image, CHUNK, sender_cfg, 2, 0.0, 54);
    sim.receivers[0].nic = Some(NicModel::new(20e6, 32.0 * 1500.0));
    sim.receivers[1].start_at = Duration::from_secs(1);
    let lowest = run_noting_lowest_rate(&mut sim, Duration::from_secs(60));
    sim.assert_all_copies_exact();
    assert!(lowest > 5_000_000, "cut to {lowest} B/s");
}

/// Runs `sim` to its end, noting the lowest rate the sender paced at once the data started.
fn run_noting_lowest_rate(sim: &mut Sim, limit: Duration) -> u64 {
    let lowest = std::cell::Cell::new(u64::MAX);
    let start = sim.now;
    sim.run_inner(limit, &|s: &Sim| {
        if s.sender.data_started().is_some() && s.sender.phase() == crate::sender::Phase::Sending {
            lowest.set(lowest.get().min(s.sender.rate()));
        }
        s.sender.phase() == crate::sender::Phase::Ended
            && s.receivers.iter().all(|r| r.result.is_some())
            && s.now > start
    });
    lowest.get()
}

/// Sender settings for the slow-NIC tests: 100 MB/s ceiling, a floor of a tenth of it.
fn floored(min_receivers: u32) -> SenderConfig {
    SenderConfig {
        initial_rate: 100_000_000,
        max_rate: 100_000_000,
        min_rate: 10_000_000,
        ..cfg(min_receivers)
    }
}

#[test]
fn a_receiver_losing_most_datagrams_at_full_rate_slows_the_sender_and_completes() {
    // Its NIC takes in 20 MB/s: at the 100 MB/s ceiling it loses 80 % of the datagrams, at the
    // 10 MB/s floor none. No socket overflows: the loss itself is the only signal.
    // Large enough that the first window (the first 100 ms, at full rate) is not most of it.
    let image = test_image(384 * CHUNK as usize, 51);
    let mut sim = Sim::new(image, CHUNK, floored(1), 1, 0.0, 51);
    sim.receivers[0].nic = Some(NicModel::new(20e6, 32.0 * 1500.0));
    let lowest = run_noting_lowest_rate(&mut sim, Duration::from_secs(60));
    sim.assert_all_copies_exact();
    let nic_drops = sim.receivers[0].nic.as_ref().unwrap().dropped;
    assert!(nic_drops > 0, "the NIC must have lost datagrams");
    assert!(lowest >= 10_000_000, "rate went below the floor: {lowest}");
    let report = sim.sender.receivers().next().unwrap();
    let data_blocks = sim.sender.stats.data_datagrams - sim.sender.stats.repair_datagrams;
    // Far below what got the rtl8139 dropped (more than 4 copies of the image).
    assert!(
        report.repairs_requested < data_blocks,
        "{} repairs for {data_blocks} blocks",
        report.repairs_requested
    );
    let sent = sim.sender.stats.data_bytes as f64 / sim.sender.manifest().data_bytes() as f64;
    eprintln!(
        "slow NIC alone: {nic_drops} datagrams lost, {} repairs, sent {sent:.2}x the data, lowest rate {:.1} MB/s, last loss {:?} %",
        report.repairs_requested,
        lowest as f64 / 1e6,
        report.loss_percent
    );
    assert!(sent < 2.0, "sent {sent:.2}x the data");
}

#[test]
fn one_slow_nic_among_many_slows_the_others_no_further_than_the_floor() {
    let image = test_image(96 * CHUNK as usize, 52);
    let data = image.len() as f64;
    let mut sim = Sim::new(image, CHUNK, floored(12), 12, 0.01, 52);
    sim.receivers[7].nic = Some(NicModel::new(20e6, 32.0 * 1500.0));
    let lowest = run_noting_lowest_rate(&mut sim, Duration::from_secs(60));
    sim.assert_all_copies_exact();
    assert!(lowest >= 10_000_000, "rate went below the floor: {lowest}");
    // Everybody, the slow one included, was served within what the floor rate takes, with
    // room for repairs: the policy's bound on what one slow machine costs the others.
    let started = sim.sender.data_started().unwrap();
    let floor_time = data / 10e6;
    for r in sim.sender.receivers() {
        let took = r.finished_at.unwrap().duration_since(started).as_secs_f64();
        assert!(
            took < 2.0 * floor_time,
            "{} took {took:.2} s, the floor allows {floor_time:.2} s",
            r.name
        );
    }
}

#[test]
fn a_nic_too_slow_even_at_the_floor_is_dropped_with_its_reason_and_the_rest_speed_up() {
    // 2 MB/s: it loses 80 % at the 10 MB/s floor. Among 5 others it must go, saying why, and the
    // others must not stay at the floor for the rest of the session.
    let image = test_image(384 * CHUNK as usize, 53);
    let data = image.len() as f64;
    let mut sim = Sim::new(image, CHUNK, floored(6), 6, 0.0, 53);
    sim.receivers[2].nic = Some(NicModel::new(2e6, 32.0 * 1500.0));
    run_noting_lowest_rate(&mut sim, Duration::from_secs(60));
    let err = sim.receivers[2]
        .result
        .clone()
        .expect("finished")
        .expect_err("must be dropped");
    let report = sim.sender.receivers().find(|r| r.name == "rx2").unwrap();
    assert!(
        matches!(err, Failure::TooSlow { .. }),
        "{err}; the sender: {report:?}"
    );
    let shown = err.to_string();
    assert!(shown.contains("lowest rate"), "{shown}");
    let report = sim.sender.receivers().find(|r| r.name == "rx2").unwrap();
    let failure = report.failure.as_ref().unwrap();
    assert!(
        matches!(
            failure,
            crate::sender::ReceiverFailure::TooSlow {
                floor: 10_000_000,
                ..
            }
        ),
        "{failure:?}"
    );
    assert!(failure.to_string().contains("10.0 MB/s"), "{failure}");
    let started = sim.sender.data_started().unwrap();
    let dropped_after = report.finished_at.unwrap().duration_since(started);
    for (i, r) in sim.receivers.iter().enumerate() {
        if i != 2 {
            assert_eq!(r.result, Some(Ok(())), "receiver {i}");
        }
    }
    // Once it was gone the rate climbed back: the others finished well before the whole image
    // could have gone out at the floor.
    let last = sim
        .sender
        .receivers()
        .filter(|r| r.name != "rx2")
        .map(|r| r.finished_at.unwrap().duration_since(started))
        .max()
        .unwrap();
    eprintln!(
        "too slow at the floor: dropped after {:.2} s, others done after {:.2} s",
        dropped_after.as_secs_f64(),
        last.as_secs_f64()
    );
    assert!(
        last.as_secs_f64() < 0.75 * data / 10e6,
        "others done after {:.2} s; at the floor it takes {:.2} s",
        last.as_secs_f64(),
        data / 10e6
    );
}

#[test]
fn the_start_policy_stops_waiting_for_receivers_that_will_not_come() {
    // Three machines expected, a ten-minute start timeout; one machine's task fails before it
    // joins (no disk). Once the caller says so, the two that joined start at once.
    let image = test_image(16 * CHUNK as usize, 61);
    let sender_cfg = SenderConfig {
        start_timeout: Some(Duration::from_secs(600)),
        ..cfg(3)
    };
    let mut sim = Sim::new(image, CHUNK, sender_cfg, 2, 0.0, 61);
    sim.run_until(|s| {
        s.sender
            .receivers()
            .filter(|r| r.state == ReceiverState::Receiving)
            .count()
            == 2
            && s.now >= s.start + Duration::from_secs(1)
    });
    assert_eq!(sim.sender.phase(), crate::sender::Phase::Waiting);
    // Raising the count is not the caller's business: ignored.
    sim.sender.expect_fewer(5, sim.now);
    assert_eq!(sim.sender.min_receivers(), 3);
    let told = sim.now;
    sim.sender.expect_fewer(2, sim.now);
    assert_eq!(sim.sender.min_receivers(), 2);
    assert_eq!(sim.sender.phase(), crate::sender::Phase::Sending);
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
    let started = sim.sender.data_started().unwrap();
    assert_eq!(
        started, told,
        "the data started when the caller gave up on the third"
    );
}

#[test]
fn the_start_policy_still_waits_for_expected_receivers_that_have_not_joined() {
    let image = test_image(8 * CHUNK as usize, 62);
    let sender_cfg = SenderConfig {
        start_timeout: Some(Duration::from_secs(600)),
        ..cfg(4)
    };
    let mut sim = Sim::new(image, CHUNK, sender_cfg, 2, 0.0, 62);
    sim.run_until(|s| s.now >= s.start + Duration::from_secs(1));
    // One of four failed: three still expected, two joined: still waiting.
    sim.sender.expect_fewer(3, sim.now);
    sim.run_until(|s| s.now >= s.start + Duration::from_secs(2));
    assert_eq!(sim.sender.phase(), crate::sender::Phase::Waiting);
    // Once the session is sending, the count no longer matters.
    sim.sender.expect_fewer(2, sim.now);
    assert_eq!(sim.sender.phase(), crate::sender::Phase::Sending);
    sim.sender.expect_fewer(0, sim.now);
    sim.run(Duration::from_secs(60));
    sim.assert_all_copies_exact();
}

#[test]
fn a_session_whose_expected_receivers_all_failed_ends_at_once() {
    let image = test_image(8 * CHUNK as usize, 63);
    let manifest =
        Manifest::scan(&mut Cursor::new(&image), image.len() as u64, CHUNK, |_| {}).unwrap();
    let t0 = Instant::now();
    let sender_cfg = SenderConfig {
        start_timeout: Some(Duration::from_secs(600)),
        ..cfg(2)
    };
    let mut sender = Sender::new(sender_cfg, manifest, t0);
    sender.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(sender.phase(), crate::sender::Phase::Waiting);
    sender.expect_fewer(0, t0 + Duration::from_secs(2));
    assert_eq!(sender.outcome(), Some(&Outcome::NobodyExpected));
    let mut ended = false;
    while let Some(event) = sender.poll_event() {
        ended |= event == crate::sender::SenderEvent::Ended(Outcome::NobodyExpected);
    }
    assert!(ended);
}

#[test]
fn jumbo_and_largest_blocks_reach_every_receiver_through_loss_with_parity() {
    let chunks = 12;
    let mut image = vec![0u8; chunks << 20];
    Rng::new(61).fill(&mut image);
    for block_size in [8896, crate::wire::MAX_BLOCK_SIZE] {
        let sender_cfg = SenderConfig {
            block_size,
            ..cfg(4)
        };
        let mut sim = Sim::new(image.clone(), 1 << 20, sender_cfg, 4, 0.05, 61);
        sim.reorder = 0.05;
        sim.run(Duration::from_secs(120));
        sim.assert_all_copies_exact();
        let stats = sim.sender.stats;
        let ratio = stats.data_bytes as f64 / sim.sender.manifest().data_bytes() as f64;
        eprintln!(
            "blocks of {block_size}, 4 receivers x 5 %: sent {ratio:.3}x the data; {stats:?}"
        );
        assert!(stats.parity_datagrams > 0, "{block_size}: {stats:?}");
        // The first pass carried each chunk in blocks of the announced size.
        let per_chunk = (1usize << 20).div_ceil(usize::from(block_size)) as u64;
        assert_eq!(
            stats.data_datagrams - stats.repair_datagrams,
            chunks as u64 * per_chunk,
            "{block_size}: {stats:?}"
        );
    }
}
