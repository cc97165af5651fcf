//! The sans-IO relay: carries a session across a router that forwards no multicast.
//!
//! A relay is a machine on the far subnet with two legs:
//!
//! - **upstream** it is a [`Receiver`] of the sender's session, reached by unicast: it
//!   subscribes ([`Body::Subscribe`]) to the sender's address, the sender then sends it a unicast
//!   copy of the group's announcements, and once the relay joined (its nonce confirmed from its
//!   address) a copy of everything — one copy of the data, whatever the number of receivers
//!   behind it. It asks for its own repairs like any receiver.
//! - **locally** it is a [`Sender`] (built with [`Sender::relaying`]) multicasting into its own
//!   subnet, with its own admission, NAK merging, parity and pacing: its receivers send their
//!   Joins, Status, NAKs and Done to the relay, never across the router.
//!
//! It works cut-through at chunk granularity: each chunk is hash-checked as it completes
//! upstream ([`RelayEvent::Keep`]: the caller checks and keeps its wire bytes with
//! [`crate::receiver::ChunkWrite::verified_wire`]) and is sent locally at once, while later chunks
//! are still arriving; local repairs are served from what the relay keeps.
//!
//! End-to-end verification is unchanged: the relay re-multicasts the sender's signed Announce
//! verbatim inside a [`Body::Relayed`], naming the sender's address the signature binds, so a
//! local receiver checks it against the keys it trusts as if it had heard the sender; the image
//! hash in it covers the manifest and the manifest every chunk. The relay cannot sign anything of
//! its own, so whatever it alters is refused chunk by chunk by the receivers, which end failed
//! (never verified) when a chunk keeps arriving damaged. Its unsigned Welcome, DoneAck and End
//! trust it with liveness only.
//!
//! The relay reports upstream once its local session ended: its own copy verified (every chunk
//! checked on arrival), and its local receivers' results in [`Body::Downstream`] datagrams, so
//! the sender's summary shows them.

use crate::manifest::Manifest;
use crate::receiver::{
    ChunkWrite, DiskDone, Event, Failure, Phase as RxPhase, Receiver, ReceiverConfig,
};
use crate::sender::{ChunkSource, Outcome, Phase as TxPhase, Sender, SenderConfig};
use crate::wire::{
    Body, DatagramType, Destination, DownstreamEntry, Packet, Transmit, MAX_DOWNSTREAM_ENTRIES,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The upstream receiver: identity, trust (the relay checks the session like any receiver),
    /// timeouts.
    pub upstream: ReceiverConfig,
    /// The local sender: start policy (`min_receivers`, `start_timeout`), rates, deadline. Its
    /// session and block size are the upstream one's; it never signs.
    pub local: SenderConfig,
    /// The sender's unicast address.
    pub sender: SocketAddr,
    /// How often to subscribe until joined, and to report the local receivers upstream.
    pub report_interval: Duration,
}

/// Which socket a relay datagram goes out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// To the sender, by unicast across the router.
    Upstream,
    /// Into the relay's own subnet: its group, or one of its receivers.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTransmit {
    pub leg: Leg,
    pub transmit: Transmit,
}

#[derive(Debug)]
pub enum RelayEvent {
    /// A chunk completed upstream: check it against its hash and keep its wire bytes (memory or
    /// a file), then report with [`Relay::handle_kept`]; it is served from there.
    Keep(ChunkWrite),
    /// Both legs are over.
    Finished {
        upstream: Result<(), Failure>,
        local: Option<Outcome>,
    },
}

#[derive(Debug)]
pub struct Relay {
    cfg: RelayConfig,
    upstream: Receiver,
    local: Option<Sender>,
    /// Chunks kept so far (handed to the local sender once it exists).
    kept: Vec<u32>,
    announce: Option<(SocketAddr, Vec<u8>)>,
    out: VecDeque<RelayTransmit>,
    events: VecDeque<RelayEvent>,
    next_subscribe: Instant,
    next_report: Instant,
    /// Every chunk is kept: the upstream receiver waits for the local session to end.
    upstream_complete: bool,
    reported: bool,
    upstream_result: Option<Result<(), Failure>>,
    finished: bool,
}

impl Relay {
    pub fn new(cfg: RelayConfig, now: Instant) -> Self {
        Self {
            upstream: Receiver::new(cfg.upstream.clone(), now),
            local: None,
            kept: Vec::new(),
            announce: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            next_subscribe: now,
            next_report: now,
            upstream_complete: false,
            reported: false,
            upstream_result: None,
            finished: false,
            cfg,
        }
    }

    pub fn upstream(&self) -> &Receiver {
        &self.upstream
    }

    /// The local session, once the manifest arrived.
    pub fn local(&self) -> Option<&Sender> {
        self.local.as_ref()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// A datagram on the upstream socket.
    pub fn handle_upstream(&mut self, bytes: &[u8], from: SocketAddr, now: Instant) {
        if from == self.cfg.sender
            && bytes.get(3).copied().and_then(DatagramType::from_code)
                == Some(DatagramType::Announce)
        {
            // Re-multicast verbatim: the local receivers check its signature themselves.
            self.announce = Some((from, bytes.to_vec()));
            if let Some(local) = &mut self.local {
                local.set_upstream_announce(from, bytes.to_vec());
            }
        }
        self.upstream.handle_datagram(bytes, from, now);
        self.drain(now);
    }

    /// A datagram on the local socket (a local receiver's Join, Status or Done).
    pub fn handle_local(&mut self, bytes: &[u8], from: SocketAddr, now: Instant) {
        if let Some(local) = &mut self.local {
            local.handle_datagram(bytes, from, now);
        }
        self.drain(now);
    }

    /// The caller checked (or failed to check) a chunk handed out with [`RelayEvent::Keep`].
    pub fn handle_kept(&mut self, chunk: u32, result: Result<(), String>, now: Instant) {
        match result {
            Ok(()) => {
                self.upstream.handle_disk(DiskDone::Written { chunk }, now);
                self.kept.push(chunk);
                if let Some(local) = &mut self.local {
                    local.set_available(chunk);
                }
            }
            Err(why) => self
                .upstream
                .handle_disk(DiskDone::Rejected { chunk, why }, now),
        }
        self.drain(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.upstream.handle_timeout(now);
        if let Some(local) = &mut self.local {
            local.handle_timeout(now);
        }
        let subscribing = matches!(self.upstream.phase(), RxPhase::Listening | RxPhase::Joining);
        if subscribing && now >= self.next_subscribe {
            self.next_subscribe = now + self.cfg.report_interval;
            let session = self.upstream.session().unwrap_or(0);
            self.out.push_back(RelayTransmit {
                leg: Leg::Upstream,
                transmit: Transmit {
                    destination: Destination::Peer(self.cfg.sender),
                    bytes: Packet {
                        session,
                        body: Body::Subscribe {
                            relay: self.cfg.upstream.id,
                        },
                    }
                    .emit(),
                },
            });
        }
        if self.local.is_some() && !self.reported && now >= self.next_report {
            self.next_report = now + self.cfg.report_interval;
            self.report_downstream();
        }
        self.drain(now);
    }

    /// The next datagram to send, from either leg.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        source: &mut dyn ChunkSource,
    ) -> Option<RelayTransmit> {
        if let Some(t) = self.out.pop_front() {
            return Some(t);
        }
        let Some(transmit) = self.local.as_mut()?.poll_transmit(now, source) else {
            // The local session's last End may just have gone out.
            self.check_finished();
            return None;
        };
        self.drain_local_events();
        Some(RelayTransmit {
            leg: Leg::Local,
            transmit,
        })
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        if !self.out.is_empty() || self.ready_to_report() {
            return Some(self.next_report.min(self.next_subscribe));
        }
        let mut next = self.upstream.poll_timeout();
        let mut add = |t: Option<Instant>| {
            next = match (next, t) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        add(self.local.as_ref().and_then(Sender::poll_timeout));
        if matches!(self.upstream.phase(), RxPhase::Listening | RxPhase::Joining) {
            add(Some(self.next_subscribe));
        }
        if self.local.is_some() && !self.reported {
            add(Some(self.next_report));
        }
        next
    }

    fn local_ended(&self) -> bool {
        self.local
            .as_ref()
            .is_some_and(|l| matches!(l.phase(), TxPhase::Ending | TxPhase::Ended))
    }

    fn ready_to_report(&self) -> bool {
        self.upstream_complete && !self.reported && self.local_ended()
    }

    /// The local receivers, as Downstream datagrams to the sender.
    fn report_downstream(&mut self) {
        let (Some(local), Some((session, sender, nonce))) = (&self.local, self.upstream.link())
        else {
            return;
        };
        let entries: Vec<DownstreamEntry> = local
            .receivers()
            .map(|r| DownstreamEntry {
                id: r.id,
                state: r.state,
                chunks_done: r.chunks_done,
                chunks_total: r.chunks_total,
                name: r.name.clone(),
                reason: r
                    .failure
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            })
            .collect();
        for batch in entries.chunks(MAX_DOWNSTREAM_ENTRIES) {
            self.out.push_back(RelayTransmit {
                leg: Leg::Upstream,
                transmit: Transmit {
                    destination: Destination::Peer(sender),
                    bytes: Packet {
                        session,
                        body: Body::Downstream {
                            receiver: self.cfg.upstream.id,
                            nonce,
                            entries: batch.to_vec(),
                        },
                    }
                    .emit(),
                },
            });
        }
    }

    fn drain_local_events(&mut self) {
        let Some(local) = &mut self.local else {
            return;
        };
        while let Some(event) = local.poll_event() {
            log::info!("relay, local session: {event:?}");
        }
    }

    /// Moves what the upstream receiver produced on, starts the local leg once the manifest is
    /// known, and reports upstream once the local leg ended.
    fn drain(&mut self, now: Instant) {
        loop {
            while let Some(t) = self.upstream.poll_transmit() {
                self.out.push_back(RelayTransmit {
                    leg: Leg::Upstream,
                    transmit: t,
                });
            }
            let Some(event) = self.upstream.poll_event() else {
                break;
            };
            match event {
                Event::Write(write) => self.events.push_back(RelayEvent::Keep(write)),
                // Zero chunks travel as a manifest entry: nothing to keep.
                Event::Zero { len, .. } => self.upstream.handle_disk(DiskDone::Zeroed { len }, now),
                Event::FlushAndVerify { .. } => self.upstream_complete = true,
                Event::Finished(result) => {
                    if let (Err(failure), Some(local)) = (&result, &mut self.local) {
                        local.abort(format!("the relay's upstream failed: {failure}"));
                    }
                    self.upstream_result = Some(result);
                }
            }
        }
        if self.local.is_none() {
            if let (Some(manifest), Some(session)) =
                (self.upstream.manifest(), self.upstream.session())
            {
                self.start_local(manifest.clone(), session, now);
            }
        }
        self.drain_local_events();
        if self.ready_to_report() {
            // The last word on the local receivers goes just before the relay's own Done.
            self.report_downstream();
            self.report_downstream();
            self.reported = true;
            let hash = self
                .local
                .as_ref()
                .map(Sender::image_hash)
                .unwrap_or_default();
            self.upstream.handle_disk(DiskDone::Verified(Ok(hash)), now);
            while let Some(t) = self.upstream.poll_transmit() {
                self.out.push_back(RelayTransmit {
                    leg: Leg::Upstream,
                    transmit: t,
                });
            }
            while let Some(event) = self.upstream.poll_event() {
                if let Event::Finished(result) = event {
                    self.upstream_result = Some(result);
                }
            }
        }
        self.check_finished();
    }

    /// Both legs over: the upstream receiver finished, the local session said its End.
    fn check_finished(&mut self) {
        let local_over = self
            .local
            .as_ref()
            .is_none_or(|l| l.phase() == TxPhase::Ended);
        if !self.finished && local_over {
            if let Some(upstream) = self.upstream_result.clone() {
                self.finished = true;
                self.events.push_back(RelayEvent::Finished {
                    upstream,
                    local: self.local.as_ref().and_then(|l| l.outcome().cloned()),
                });
            }
        }
    }

    fn start_local(&mut self, manifest: Manifest, session: u32, now: Instant) {
        // Far receivers size blocks by the sender's signed Announce, which the relay passes on
        // verbatim: its own leg must use the same blocks.
        let block_size = self
            .upstream
            .block_size()
            .unwrap_or(self.cfg.local.block_size);
        let cfg = SenderConfig {
            session,
            block_size,
            ..self.cfg.local.clone()
        };
        let mut local = Sender::relaying(cfg, manifest, now);
        if let Some((origin, announce)) = &self.announce {
            local.set_upstream_announce(*origin, announce.clone());
        }
        for &chunk in &self.kept {
            local.set_available(chunk);
        }
        log::info!(
            "relay: manifest received, re-multicasting session {session:08x} in blocks of {block_size} bytes"
        );
        self.local = Some(local);
    }
}

#[cfg(test)]
mod tests {
    //! A deterministic network: a sender with near receivers on subnet A, a relay and far
    //! receivers on subnet B, seeded loss on every link, a virtual clock. Only unicast crosses
    //! between the subnets.
    use super::*;
    use crate::receiver::Event;
    use crate::rng::XorShift;
    use crate::sender::Outcome;
    use crate::wire::ReceiverState;
    use std::collections::{BTreeMap, BinaryHeap};
    use std::io::Cursor;

    const CHUNK: u32 = 64 * 1024;

    fn key() -> crate::trust::SigningKey {
        crate::trust::SigningKey::from_seed([0x42; 32])
    }
    fn sender_addr() -> SocketAddr {
        SocketAddr::from(([10, 0, 1, 1], 7744))
    }
    fn relay_up() -> SocketAddr {
        SocketAddr::from(([10, 0, 2, 2], 40000))
    }
    fn relay_local() -> SocketAddr {
        SocketAddr::from(([10, 0, 2, 2], 7744))
    }
    fn near_addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 1, 10 + i as u8], 7744))
    }
    fn far_addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 2, 10 + i as u8], 7744))
    }

    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
    enum Node {
        Sender,
        Near(usize),
        RelayUp,
        RelayLocal,
        Far(usize),
    }

    #[derive(PartialEq, Eq)]
    struct Flight {
        at: Instant,
        order: u64,
        to: Node,
        from: SocketAddr,
        bytes: Vec<u8>,
    }
    impl Ord for Flight {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            o.at.cmp(&self.at).then(o.order.cmp(&self.order))
        }
    }
    impl PartialOrd for Flight {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }

    struct Image {
        bytes: Vec<u8>,
    }
    impl ChunkSource for Image {
        fn chunk(&mut self, index: u32) -> std::io::Result<&[u8]> {
            let start = index as usize * CHUNK as usize;
            let end = (start + CHUNK as usize).min(self.bytes.len());
            Ok(&self.bytes[start..end])
        }
    }

    /// What the relay keeps: in memory here.
    #[derive(Default)]
    struct Kept(BTreeMap<u32, Vec<u8>>);
    impl ChunkSource for Kept {
        fn chunk(&mut self, index: u32) -> std::io::Result<&[u8]> {
            self.0
                .get(&index)
                .map(Vec::as_slice)
                .ok_or_else(|| std::io::Error::other(format!("chunk {index} not kept")))
        }
    }

    struct Rx {
        rx: Receiver,
        disk: Vec<u8>,
        result: Option<Result<(), Failure>>,
        addr: SocketAddr,
    }

    struct Net {
        now: Instant,
        start: Instant,
        sender: Sender,
        image: Image,
        near: Vec<Rx>,
        relay: Relay,
        kept: Kept,
        /// Chunk the relay alters after checking it (a hostile relay).
        tamper: Option<u32>,
        far: Vec<Rx>,
        loss: f64,
        rng: XorShift,
        order: u64,
        flights: BinaryHeap<Flight>,
        /// Bytes sent from subnet A to subnet B (what crosses the router).
        crossing: u64,
        /// Datagrams the far receivers got from the sender directly (must stay 0).
        far_from_sender: u64,
    }

    fn rx_cfg(id: u64, size: u64) -> ReceiverConfig {
        ReceiverConfig {
            id,
            incarnation: id as u32,
            name: format!("rx{id}"),
            disk_size: size,
            sender_timeout: Duration::from_secs(5),
            status_interval: Duration::from_millis(20),
            trust: crate::trust::Trust::Keys(vec![key().public()]),
            ..ReceiverConfig::default()
        }
    }

    fn sender_cfg(min_receivers: u32) -> SenderConfig {
        SenderConfig {
            min_receivers,
            initial_rate: 50_000_000,
            max_rate: 100_000_000,
            receiver_timeout: Duration::from_secs(5),
            signing_key: Some(key()),
            address: sender_addr(),
            ..SenderConfig::default()
        }
    }

    impl Net {
        fn new(near_count: usize, far_count: usize, loss: f64, seed: u64) -> Self {
            let bytes = crate::sim::test_image(30 * CHUNK as usize + 777, seed);
            let size = bytes.len() as u64;
            let manifest = Manifest::scan(&mut Cursor::new(&bytes), size, CHUNK, |_| {}).unwrap();
            let now = Instant::now();
            let mut rng = XorShift::new(seed);
            let garbage = |rng: &mut XorShift| {
                let mut d = vec![0u8; bytes.len()];
                rng.fill(&mut d);
                d
            };
            let near = (0..near_count)
                .map(|i| Rx {
                    rx: Receiver::new(rx_cfg(100 + i as u64, size), now),
                    disk: garbage(&mut rng),
                    result: None,
                    addr: near_addr(i),
                })
                .collect();
            let far = (0..far_count)
                .map(|i| Rx {
                    rx: Receiver::new(rx_cfg(200 + i as u64, size), now),
                    disk: garbage(&mut rng),
                    result: None,
                    addr: far_addr(i),
                })
                .collect();
            let relay = Relay::new(
                RelayConfig {
                    upstream: ReceiverConfig {
                        name: "relay".into(),
                        ..rx_cfg(900, u64::MAX)
                    },
                    local: SenderConfig {
                        min_receivers: far_count as u32,
                        signing_key: None,
                        address: relay_local(),
                        ..sender_cfg(far_count as u32)
                    },
                    sender: sender_addr(),
                    report_interval: Duration::from_millis(100),
                },
                now,
            );
            Self {
                now,
                start: now,
                // The near receivers and the relay.
                sender: Sender::new(sender_cfg(near_count as u32 + 1), manifest, now),
                image: Image { bytes },
                near,
                relay,
                kept: Kept::default(),
                tamper: None,
                far,
                loss,
                rng,
                order: 0,
                flights: BinaryHeap::new(),
                crossing: 0,
                far_from_sender: 0,
            }
        }

        fn send(&mut self, to: Node, from: SocketAddr, bytes: Vec<u8>) {
            if self.rng.chance(self.loss) {
                return;
            }
            let jitter = Duration::from_micros(self.rng.below(400));
            self.order += 1;
            self.flights.push(Flight {
                at: self.now + Duration::from_micros(300) + jitter,
                order: self.order,
                to,
                from,
                bytes,
            });
        }

        /// Routes a datagram as the two subnets and the router would: the group stays on its
        /// subnet, unicast is forwarded.
        fn route(&mut self, from: Node, from_addr: SocketAddr, t: Transmit) {
            let on_a = matches!(from, Node::Sender | Node::Near(_));
            let targets: Vec<Node> = match t.destination {
                Destination::Group if on_a => (0..self.near.len()).map(Node::Near).collect(),
                Destination::Group => (0..self.far.len()).map(Node::Far).collect(),
                Destination::Peer(a) if a == sender_addr() => vec![Node::Sender],
                Destination::Peer(a) if a == relay_up() => vec![Node::RelayUp],
                Destination::Peer(a) if a == relay_local() => vec![Node::RelayLocal],
                Destination::Peer(a) => (0..self.near.len())
                    .filter(|&i| self.near[i].addr == a)
                    .map(Node::Near)
                    .chain(
                        (0..self.far.len())
                            .filter(|&i| self.far[i].addr == a)
                            .map(Node::Far),
                    )
                    .collect(),
            };
            for to in targets {
                let to_b = matches!(to, Node::RelayUp | Node::RelayLocal | Node::Far(_));
                if on_a && to_b {
                    self.crossing += t.bytes.len() as u64;
                    if matches!(to, Node::Far(_)) {
                        self.far_from_sender += 1;
                    }
                }
                self.send(to, from_addr, t.bytes.clone());
            }
        }

        fn drain_rx(&mut self, far: bool, i: usize) {
            let now = self.now;
            loop {
                let r = if far {
                    &mut self.far[i]
                } else {
                    &mut self.near[i]
                };
                let from = r.addr;
                if let Some(t) = r.rx.poll_transmit() {
                    let node = if far { Node::Far(i) } else { Node::Near(i) };
                    self.route(node, from, t);
                    continue;
                }
                let Some(event) = r.rx.poll_event() else {
                    return;
                };
                let done = match event {
                    Event::Write(w) => {
                        let (chunk, offset) = (w.chunk, w.offset as usize);
                        match w.decode() {
                            Ok(d) => {
                                r.disk[offset..offset + d.len()].copy_from_slice(&d);
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
                    Event::Finished(res) => {
                        r.result = Some(res);
                        continue;
                    }
                };
                r.rx.handle_disk(done, now);
            }
        }

        fn drain_relay(&mut self) {
            let now = self.now;
            loop {
                while let Some(event) = self.relay.poll_event() {
                    if let RelayEvent::Keep(w) = event {
                        let chunk = w.chunk;
                        let result = w.verified_wire().map(|mut bytes| {
                            if self.tamper == Some(chunk) {
                                bytes[10] ^= 0xff;
                            }
                            self.kept.0.insert(chunk, bytes);
                        });
                        self.relay
                            .handle_kept(chunk, result.map_err(|e| e.to_string()), now);
                    }
                }
                let Some(t) = self.relay.poll_transmit(now, &mut self.kept) else {
                    break;
                };
                let (node, addr) = match t.leg {
                    Leg::Upstream => (Node::RelayUp, relay_up()),
                    Leg::Local => (Node::RelayLocal, relay_local()),
                };
                self.route(node, addr, t.transmit);
            }
        }

        fn done(&self) -> bool {
            self.near
                .iter()
                .chain(&self.far)
                .all(|r| r.result.is_some())
                && self.sender.phase() == TxPhase::Ended
                && self.relay.is_finished()
        }

        fn run(&mut self, limit: Duration) {
            let step = Duration::from_micros(500);
            while self.now < self.start + limit && !(self.done() && self.flights.is_empty()) {
                if self.sender.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.sender.handle_timeout(self.now);
                    while let Some(t) = self.sender.poll_transmit(self.now, &mut self.image) {
                        self.route(Node::Sender, sender_addr(), t);
                    }
                }
                if self.relay.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.relay.handle_timeout(self.now);
                }
                self.drain_relay();
                while self.flights.peek().is_some_and(|f| f.at <= self.now) {
                    let Some(f) = self.flights.pop() else { break };
                    match f.to {
                        Node::Sender => self.sender.handle_datagram(&f.bytes, f.from, self.now),
                        Node::Near(i) => {
                            self.near[i].rx.handle_datagram(&f.bytes, f.from, self.now);
                            self.drain_rx(false, i);
                        }
                        Node::Far(i) => {
                            self.far[i].rx.handle_datagram(&f.bytes, f.from, self.now);
                            self.drain_rx(true, i);
                        }
                        Node::RelayUp => {
                            self.relay.handle_upstream(&f.bytes, f.from, self.now);
                            self.drain_relay();
                        }
                        Node::RelayLocal => {
                            self.relay.handle_local(&f.bytes, f.from, self.now);
                            self.drain_relay();
                        }
                    }
                }
                for far in [false, true] {
                    let n = if far { self.far.len() } else { self.near.len() };
                    for i in 0..n {
                        let r = if far {
                            &mut self.far[i]
                        } else {
                            &mut self.near[i]
                        };
                        if r.result.is_none() && r.rx.poll_timeout().is_some_and(|t| t <= self.now)
                        {
                            r.rx.handle_timeout(self.now);
                            self.drain_rx(far, i);
                        }
                    }
                }
                self.now += step;
            }
        }
    }

    fn assert_every_copy_exact(net: &Net) {
        for (i, r) in net.near.iter().chain(&net.far).enumerate() {
            assert_eq!(r.result, Some(Ok(())), "receiver {i} did not verify");
            assert!(r.disk == net.image.bytes, "receiver {i}'s disk differs");
        }
    }

    fn data_bytes(net: &Net) -> u64 {
        let m = net.sender.manifest();
        m.data_chunks().map(|c| m.wire_len(c) as u64).sum()
    }

    #[test]
    fn a_relay_carries_the_session_to_its_receivers_with_one_upstream_copy() {
        let mut net = Net::new(2, 3, 0.0, 1);
        net.run(Duration::from_secs(60));
        assert_every_copy_exact(&net);
        assert_eq!(
            net.far_from_sender, 0,
            "far receivers heard the sender directly"
        );
        assert_eq!(net.sender.outcome(), Some(&Outcome::AllDone));
        let data = data_bytes(&net);
        eprintln!("crossing {} bytes for {data} bytes of data", net.crossing);
        assert!(
            net.crossing <= data * 13 / 10,
            "{} bytes crossed the router for {data} bytes of data",
            net.crossing
        );
        // Without loss the relay repairs nothing: its receivers' NAKs are weighed against its
        // own sequence numbers, not the sender's (which would make chunks in flight look lost).
        for (i, r) in net.far.iter().enumerate() {
            eprintln!("far {i}: {:?}", r.rx.stats);
            assert_eq!(r.rx.stats.duplicates, 0, "far receiver {i} got repeats");
        }
        // The sender's view: the relay, and its three receivers verified, reported through it.
        let relay = net.sender.receivers().find(|r| r.relay).expect("the relay");
        assert_eq!(relay.state, ReceiverState::Done);
        assert_eq!(relay.downstream.len(), 3);
        assert!(relay
            .downstream
            .values()
            .all(|d| d.state == ReceiverState::Done));
    }

    #[test]
    fn a_relay_passes_the_senders_jumbo_blocks_on_whatever_its_own_default() {
        let mut net = Net::new(1, 2, 0.02, 6);
        let manifest = net.sender.manifest().clone();
        let cfg = SenderConfig {
            block_size: 8896,
            ..sender_cfg(2)
        };
        net.sender = Sender::new(cfg, manifest, net.now);
        net.run(Duration::from_secs(120));
        assert_every_copy_exact(&net);
        let local = net.relay.local().expect("the local leg");
        assert_eq!(local.block_size(), 8896);
        for (i, r) in net.far.iter().enumerate() {
            assert_eq!(
                r.rx.stats.malformed, 0,
                "far receiver {i}: {:?}",
                r.rx.stats
            );
        }
    }

    #[test]
    fn relayed_sessions_survive_seeded_loss_on_both_legs() {
        for (seed, loss) in [(2, 0.02), (3, 0.05), (4, 0.1)] {
            let mut net = Net::new(2, 3, loss, seed);
            net.run(Duration::from_secs(120));
            assert_every_copy_exact(&net);
            let data = data_bytes(&net);
            eprintln!("loss {loss}: crossing {} bytes for {data}", net.crossing);
            assert!(
                net.crossing <= data * 2,
                "loss {loss}: {} crossed",
                net.crossing
            );
            let relay = net.sender.receivers().find(|r| r.relay).expect("the relay");
            assert_eq!(relay.downstream.len(), 3, "loss {loss}");
        }
    }

    #[test]
    fn a_relay_that_alters_a_chunk_never_makes_a_far_receiver_verify() {
        let mut net = Net::new(1, 3, 0.0, 5);
        // A data chunk (not a zero one) the relay changes after checking it.
        let chunk = net.sender.manifest().data_chunks().nth(3).unwrap();
        net.tamper = Some(chunk);
        net.run(Duration::from_secs(120));
        assert!(net.relay.is_finished(), "the relay never ended");
        assert_eq!(net.near[0].result, Some(Ok(())));
        for (i, r) in net.far.iter().enumerate() {
            assert!(
                matches!(r.result, Some(Err(_))),
                "far receiver {i} must fail, not {:?}",
                r.result
            );
            assert!(
                r.rx.stats.corrupt_chunks > 0,
                "far receiver {i} refused the chunk"
            );
        }
        let relay = net.sender.receivers().find(|r| r.relay).expect("the relay");
        assert!(relay
            .downstream
            .values()
            .all(|d| d.state == ReceiverState::Failed));
    }

    #[test]
    fn a_relayed_announce_signed_by_an_untrusted_key_is_refused() {
        let mut net = Net::new(0, 1, 0.0, 6);
        net.far[0].rx = Receiver::new(
            ReceiverConfig {
                trust: crate::trust::Trust::Keys(vec![crate::trust::SigningKey::from_seed(
                    [9; 32],
                )
                .public()]),
                wait_timeout: Some(Duration::from_secs(3)),
                ..rx_cfg(200, u64::MAX)
            },
            net.now,
        );
        net.run(Duration::from_secs(20));
        assert!(matches!(
            net.far[0].result,
            Some(Err(Failure::NoSession { .. }))
        ));
        assert!(net.far[0].rx.stats.untrusted > 0);
    }
}
