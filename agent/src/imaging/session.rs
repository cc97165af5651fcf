//! The I/O edge of a session: wires [`Sender`] and [`Receiver`] to sockets, disks and the clock,
//! prints progress, and turns the outcome into a summary and an exit status.

use super::disk::{self, DiskDone, DiskError, DiskOp, Source, Target};
use super::manifest::DEFAULT_CHUNK_SIZE;
use super::net::{self, NetError};
use super::receiver::{Action, Receiver, ReceiverConfig};
use super::sender::{Outcome, Phase, ReceiverReport, Sender, SenderConfig};
use super::wire::ReceiverState;
use crate::inventory::human_size;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("socket I/O")]
    Io(#[from] std::io::Error),
    #[error("the source {path} is empty")]
    EmptySource { path: PathBuf },
    #[error("chunk size {0} must be a multiple of 4096 between 64 KiB and 64 MiB")]
    ChunkSize(u32),
    #[error("no receiver joined within the start timeout")]
    NoReceivers,
    #[error("reading the source failed: {0}")]
    Source(String),
    #[error("{failed} of {total} receivers failed")]
    ReceiversFailed { failed: usize, total: usize },
    #[error("{0}")]
    Receive(String),
    #[error("the disk writer stopped unexpectedly")]
    WriterGone,
}

#[derive(Debug, Clone)]
pub struct SendOptions {
    pub source: PathBuf,
    pub interface: Option<String>,
    pub group: Ipv4Addr,
    pub port: u16,
    pub ttl: u8,
    /// Upper bound of the data rate in bytes per second.
    pub max_rate: u64,
    pub min_receivers: u32,
    pub start_timeout: Option<Duration>,
    pub deadline: Option<Duration>,
    pub receiver_timeout: Duration,
    pub chunk_size: u32,
    pub session: Option<u32>,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            source: PathBuf::new(),
            interface: None,
            group: net::DEFAULT_GROUP,
            port: net::DEFAULT_PORT,
            ttl: 1,
            max_rate: 1_000_000_000,
            min_receivers: 1,
            start_timeout: None,
            deadline: None,
            receiver_timeout: Duration::from_secs(30),
            chunk_size: DEFAULT_CHUNK_SIZE,
            session: None,
        }
    }
}

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

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        bytes = (nanos ^ std::process::id()).to_be_bytes();
    }
    u32::from_be_bytes(bytes)
}

/// User and system CPU seconds this process used so far (from /proc/self/stat).
pub fn cpu_seconds() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return (0.0, 0.0);
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 100.0
    };
    (ticks(11), ticks(12))
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6
}

fn state_name(state: ReceiverState) -> &'static str {
    match state {
        ReceiverState::Joining => "joining",
        ReceiverState::Receiving => "receiving",
        ReceiverState::Verifying => "verifying",
        ReceiverState::Done => "done",
        ReceiverState::Failed => "FAILED",
    }
}

/// Reads the source, then multicasts it until every receiver is done or failed.
pub fn run_send(
    opts: &SendOptions,
    progress: impl FnMut(&Sender),
) -> Result<SendSummary, SessionError> {
    if !super::manifest::valid_chunk_size(opts.chunk_size) || opts.chunk_size < 64 << 10 {
        return Err(SessionError::ChunkSize(opts.chunk_size));
    }
    if !opts.group.is_multicast() {
        return Err(NetError::NotMulticast(opts.group).into());
    }
    let mut source = Source::open(&opts.source, opts.chunk_size)?;
    if source.size == 0 {
        return Err(SessionError::EmptySource {
            path: opts.source.clone(),
        });
    }
    // A wrong interface should fail now, not after reading a whole disk.
    net::interface_ipv4(opts.interface.as_deref())?;
    log::info!(
        "reading {} ({}) to list its chunks",
        opts.source.display(),
        human_size(source.size)
    );
    let scan_started = Instant::now();
    let manifest = source.scan(|_| {})?;
    log::info!(
        "image: {} in {} chunks, {} of data in {} chunks ({} zero), scanned in {:.1} s",
        human_size(manifest.image_size),
        manifest.chunk_count(),
        human_size(manifest.data_bytes()),
        manifest.data_chunks().count(),
        manifest
            .chunks
            .iter()
            .filter(|c| **c == super::manifest::ChunkKind::Zero)
            .count(),
        scan_started.elapsed().as_secs_f64()
    );
    multicast(opts, manifest, &mut source, progress)
}

/// Multicasts an image described by `manifest` whose chunks `source` serves (raw from a disk,
/// or stored, possibly compressed, from an image file) until every receiver is done or failed.
pub fn multicast(
    opts: &SendOptions,
    manifest: super::manifest::Manifest,
    source: &mut dyn super::sender::ChunkSource,
    mut progress: impl FnMut(&Sender),
) -> Result<SendSummary, SessionError> {
    if !opts.group.is_multicast() {
        return Err(NetError::NotMulticast(opts.group).into());
    }
    let (interface, address) = net::interface_ipv4(opts.interface.as_deref())?;
    let socket = net::sender_socket(&interface, address, opts.ttl)?;
    socket.set_nonblocking(true)?;
    let group = SocketAddrV4::new(opts.group, opts.port);
    let session = opts.session.unwrap_or_else(random_u32);
    let cfg = SenderConfig {
        session,
        min_receivers: opts.min_receivers,
        start_timeout: opts.start_timeout,
        deadline: opts.deadline,
        receiver_timeout: opts.receiver_timeout,
        max_rate: opts.max_rate,
        initial_rate: opts.max_rate.min(100_000_000),
        ..SenderConfig::default()
    };
    log::info!(
        "session {session:08x} on {group} via {interface} ({address}); waiting for {} receiver(s){}",
        opts.min_receivers,
        opts.start_timeout.map_or(String::new(), |t| format!(" or {} s", t.as_secs()))
    );
    let started = Instant::now();
    let mut sender = Sender::new(cfg, manifest, started);
    let mut buf = vec![0u8; 2048];
    let mut batch = net::GsoBatch::new(group);
    let mut next_progress = started + Duration::from_secs(1);
    loop {
        let mut now = Instant::now();
        let mut sent = 0u32;
        while let Some(datagram) = sender.poll_transmit(now, source) {
            batch.push(&socket, &datagram)?;
            sent += 1;
            if sent.is_multiple_of(64) {
                now = Instant::now();
                // Hear the receivers between bursts.
                while let Ok((n, from)) = socket.recv_from(&mut buf) {
                    sender.handle_datagram(&buf[..n], from, now);
                }
            }
        }
        batch.flush(&socket)?;
        if sender.phase() == Phase::Ended {
            break;
        }
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            sender.handle_datagram(&buf[..n], from, Instant::now());
        }
        let now = Instant::now();
        if now >= next_progress {
            progress(&sender);
            next_progress = now + Duration::from_secs(1);
        }
        let wake = sender.poll_timeout(now);
        if wake > now {
            net::wait_readable(&socket, wake - now);
        }
    }
    let outcome = sender.outcome().cloned().unwrap_or(Outcome::SomeFailed);
    let stats = sender.stats;
    let (user, system) = cpu_seconds();
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

/// The live table of a send: one line per receiver (name, address, state, percentage, rate,
/// repairs), then the total rate and the time left.
pub fn progress_table(sender: &Sender) -> Vec<String> {
    let now = Instant::now();
    let chunk = u64::from(sender.manifest().chunk_size);
    let mut lines = vec![format!(
        "  {:<20} {:<15} {:<10} {:>6}  {:>7}  {:>7}",
        "receiver", "address", "state", "done", "MB/s", "repairs"
    )];
    let mut seconds_left: f64 = 0.0;
    let mut active = 0;
    // Receivers count zero chunks as done once zeroed: progress and rates are about data.
    let manifest = sender.manifest();
    let data_chunks = manifest.data_chunks().count() as u32;
    let other_chunks = manifest.chunk_count() - data_chunks;
    for r in sender.receivers() {
        let data_done = r.chunks_done.saturating_sub(other_chunks).min(data_chunks);
        let pct = if r.state == ReceiverState::Done || data_chunks == 0 {
            100.0 * f64::from(u8::from(r.state == ReceiverState::Done))
        } else {
            100.0 * f64::from(data_done) / f64::from(data_chunks)
        };
        let elapsed = r.finished_at.unwrap_or(now).duration_since(r.joined_at);
        let rate = mb_per_s(u64::from(data_done) * chunk, elapsed);
        if !r.is_final() {
            active += 1;
            let left = u64::from(data_chunks - data_done) * chunk;
            if rate > 0.0 {
                seconds_left = seconds_left.max(left as f64 / 1e6 / rate);
            }
        }
        lines.push(format!(
            "  {:<20} {:<15} {:<10} {:5.1}%  {:7.1}  {:>7}{}",
            if r.name.is_empty() {
                format!("{:016x}", r.id)
            } else {
                r.name.clone()
            },
            r.address.map_or("-".to_string(), |a| a.ip().to_string()),
            state_name(r.state),
            pct,
            rate,
            r.repairs_requested,
            r.failure
                .as_ref()
                .map_or(String::new(), |f| format!("  ({f})"))
        ));
    }
    let total = match sender.data_started() {
        Some(started) => format!(
            "  total: {} receiver(s), {:.1} MB/s on the wire (limit {:.0}), {}",
            sender.receivers().count(),
            mb_per_s(sender.stats.data_bytes, now.duration_since(started)),
            sender.rate() as f64 / 1e6,
            if active == 0 {
                "all finished".to_string()
            } else if seconds_left > 0.0 {
                format!("about {seconds_left:.0} s left")
            } else {
                "time left unknown yet".to_string()
            }
        ),
        None => format!(
            "  waiting for receivers: {} joined, the start policy wants {}",
            sender.receivers().count(),
            sender.min_receivers()
        ),
    };
    lines.push(total);
    lines
}

impl SendSummary {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let secs = self.elapsed.as_secs_f64();
        out.push_str(&format!(
            "session summary: image {} ({} of data), waited {:.1} s for receivers, then {:.1} s: {:.1} MB/s of data, sent {:.2}x the data\n",
            human_size(self.image_size),
            human_size(self.data_bytes),
            self.waited.as_secs_f64(),
            secs,
            mb_per_s(self.data_bytes, self.elapsed),
            self.sent_bytes as f64 / self.data_bytes.max(1) as f64
        ));
        out.push_str(&format!(
            "  {:<20} {:<18} {:<10} {:>8} {:>9}  result\n",
            "receiver", "serial", "state", "seconds", "repairs"
        ));
        for r in &self.receivers {
            let secs = r.finished_at.map_or(String::from("-"), |f| {
                format!("{:.1}", f.duration_since(r.joined_at).as_secs_f64())
            });
            out.push_str(&format!(
                "  {:<20} {:<18} {:<10} {:>8} {:>9}  {}\n",
                if r.name.is_empty() {
                    format!("{:016x}", r.id)
                } else {
                    r.name.clone()
                },
                r.serial,
                state_name(r.state),
                secs,
                r.repairs_requested,
                match (&r.state, &r.failure) {
                    (ReceiverState::Done, _) => "verified".to_string(),
                    (_, Some(why)) => why.clone(),
                    _ => "unknown".to_string(),
                }
            ));
        }
        out
    }

    /// `Ok` only when every receiver verified its copy.
    pub fn result(&self) -> Result<(), SessionError> {
        match &self.outcome {
            Outcome::AllDone => Ok(()),
            Outcome::NoReceivers => Err(SessionError::NoReceivers),
            Outcome::SourceError(e) => Err(SessionError::Source(e.clone())),
            Outcome::SomeFailed => Err(SessionError::ReceiversFailed {
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

#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    pub target: PathBuf,
    pub interface: Option<String>,
    pub group: Ipv4Addr,
    pub port: u16,
    pub id: Option<u64>,
    pub name: String,
    pub serial: String,
    pub session: Option<u32>,
    pub wait_timeout: Option<Duration>,
    pub sender_timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            target: PathBuf::new(),
            interface: None,
            group: net::DEFAULT_GROUP,
            port: net::DEFAULT_PORT,
            id: None,
            name: String::new(),
            serial: String::new(),
            session: None,
            wait_timeout: None,
            sender_timeout: Duration::from_secs(30),
        }
    }
}

/// A receiver identity that survives a restart of the same machine writing the same target.
pub fn stable_receiver_id(name: &str, target: &std::path::Path) -> u64 {
    let hash = blake3::hash(format!("{name}\0{}", target.display()).as_bytes());
    u64::from_be_bytes(hash.as_bytes()[..8].try_into().unwrap_or_default())
}

/// Progress of a receive, for the caller's display.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveProgress {
    pub chunks_done: u32,
    pub chunks_total: u32,
    pub image_size: u64,
    pub elapsed: Duration,
    pub verifying: bool,
}

/// Joins a session and writes the image to the target; `Ok` only when the copy verified.
pub fn run_receive(
    opts: &ReceiveOptions,
    mut progress: impl FnMut(ReceiveProgress),
) -> Result<(), SessionError> {
    let target = Target::open(&opts.target)?;
    let (interface, address) = net::interface_ipv4(opts.interface.as_deref())?;
    let socket = net::receiver_socket(opts.group, opts.port, address)?;
    let cfg = ReceiverConfig {
        id: opts
            .id
            .unwrap_or_else(|| stable_receiver_id(&opts.name, &opts.target)),
        incarnation: random_u32(),
        name: opts.name.clone(),
        serial: opts.serial.clone(),
        disk_size: target.size,
        logical_block: target.logical_block,
        session: opts.session,
        sender_timeout: opts.sender_timeout,
        wait_timeout: opts.wait_timeout,
        ..ReceiverConfig::default()
    };
    log::info!(
        "waiting for a session on {}:{} via {interface} ({address}); target {} ({}{})",
        opts.group,
        opts.port,
        opts.target.display(),
        if target.size == u64::MAX {
            "file".to_string()
        } else {
            human_size(target.size)
        },
        if target.direct { ", O_DIRECT" } else { "" }
    );
    let started = Instant::now();
    let mut receiver = Receiver::new(cfg, started);
    let mut prepared = false;
    let (ops, done) = disk::spawn_writer(target, 16)?;
    let mut sender_addr: Option<SocketAddrV4> = None;
    let mut buf = vec![0u8; 64 << 10];
    let mut next_progress = started + Duration::from_secs(1);
    socket.set_nonblocking(true)?;
    net::enable_gro(&socket);
    loop {
        let mut actions = Vec::new();
        let mut received_any = false;
        for _ in 0..256 {
            match net::recv_counting_drops(&socket, &mut buf) {
                Ok(received) => {
                    received_any = true;
                    if let Some(drops) = received.drops {
                        receiver.set_overflow(drops);
                    }
                    let now = Instant::now();
                    let data = &buf[..received.len];
                    let segment = received.segment.unwrap_or(data.len()).max(1);
                    for datagram in data.chunks(segment) {
                        actions.extend(receiver.handle_datagram(datagram, now));
                    }
                    if sender_addr.is_none() && receiver.session().is_some() && data.len() >= 8 {
                        let session = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
                        if Some(session) == receiver.session() {
                            sender_addr = Some(received.from);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        while let Ok(finished) = done.try_recv() {
            let now = Instant::now();
            actions.extend(match finished {
                DiskDone::Written { chunk } => receiver.chunk_written(chunk),
                DiskDone::Rejected { chunk, why } => receiver.chunk_rejected(chunk, &why),
                DiskDone::Zeroed { len } => receiver.zeroed(len),
                DiskDone::Verified(result) => receiver.verified(result, now),
                DiskDone::Failed(reason) => receiver.disk_failed(reason),
            });
        }
        actions.extend(receiver.poll(Instant::now()));
        for action in actions {
            if !prepared && matches!(action, Action::Write { .. } | Action::Zero { .. }) {
                // An image file gets its final size before the first write.
                let image_size = receiver.image_size().unwrap_or(0);
                ops.send(DiskOp::Prepare { image_size })
                    .map_err(|_| SessionError::WriterGone)?;
                prepared = true;
            }
            match action {
                Action::Send(datagram) => {
                    if let Some(addr) = sender_addr {
                        let _ = socket.send_to(&datagram, addr);
                    }
                }
                Action::Write(write) => ops
                    .send(DiskOp::Write(write))
                    .map_err(|_| SessionError::WriterGone)?,
                Action::Zero { offset, len } => ops
                    .send(DiskOp::Zero { offset, len })
                    .map_err(|_| SessionError::WriterGone)?,
                Action::FlushAndVerify { manifest } => {
                    log::info!("all chunks written; flushing and reading the copy back");
                    ops.send(DiskOp::FlushAndVerify { manifest })
                        .map_err(|_| SessionError::WriterGone)?
                }
                Action::Finished(result) => {
                    let st = receiver.stats;
                    let (user, system) = cpu_seconds();
                    log::info!(
                        "received {} datagrams: {} duplicates, {} dropped for memory, {} corrupt chunks, {} kernel overflows; cpu {user:.2} s user, {system:.2} s system",
                        st.datagrams, st.duplicates, st.dropped_for_memory, st.corrupt_chunks, st.overflow
                    );
                    let (done_chunks, total) = receiver.progress();
                    progress(ReceiveProgress {
                        chunks_done: done_chunks,
                        chunks_total: total,
                        image_size: receiver.image_size().unwrap_or(0),
                        elapsed: started.elapsed(),
                        verifying: false,
                    });
                    return result.map_err(SessionError::Receive);
                }
            }
        }
        let now = Instant::now();
        if now >= next_progress {
            let (chunks_done, chunks_total) = receiver.progress();
            progress(ReceiveProgress {
                chunks_done,
                chunks_total,
                image_size: receiver.image_size().unwrap_or(0),
                elapsed: now.duration_since(started),
                verifying: receiver.phase() == super::receiver::Phase::Verifying,
            });
            next_progress = now + Duration::from_secs(1);
        }
        if !received_any {
            net::wait_readable(&socket, Duration::from_millis(5));
        }
    }
}
