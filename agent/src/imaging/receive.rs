//! The receiver's edge: a multicast socket, a disk writer thread and the clock, joined to
//! [`Receiver`]. The loop sleeps until a datagram arrives, the disk finishes something, or the
//! receiver's next timer is due.

use super::disk::{self, DiskError, DiskOp, Target, WriterHandle};
use super::fit::FinishOptions;
use diskcast_proto::receiver::{Event, Failure, Phase, Receiver, ReceiverConfig};
use diskcast_proto::units::human_size;
use diskcast_proto::wire::{Destination, DEFAULT_GROUP, DEFAULT_PORT};
use diskcast_transport::present::ReceiveProgress;
use diskcast_transport::socket::{self, NetError};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("receiving on the session socket")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Failed(#[from] Failure),
    #[error("the disk writer stopped unexpectedly")]
    WriterGone,
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
    /// After the copy verified on a larger block device, grow its last GPT partition.
    pub grow_last_partition: bool,
    /// After the copy verified, discard the ranges the image skipped as unused.
    pub discard: bool,
    /// Whose sessions to join (the default trusts nobody).
    pub trust: diskcast_proto::trust::Trust,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            target: PathBuf::new(),
            interface: None,
            group: DEFAULT_GROUP,
            port: DEFAULT_PORT,
            id: None,
            name: String::new(),
            serial: String::new(),
            session: None,
            wait_timeout: None,
            sender_timeout: Duration::from_secs(30),
            grow_last_partition: false,
            discard: false,
            trust: diskcast_proto::trust::Trust::default(),
        }
    }
}

/// A receiver identity that survives a restart of the same machine writing the same target
/// (so the sender lets it start over instead of counting a new receiver), and differs between
/// machines: `machine` must hold something no clone shares, such as a MAC address.
pub fn stable_receiver_id(machine: &str, target: &std::path::Path) -> u64 {
    let hash = blake3::hash(format!("{machine}\0{}", target.display()).as_bytes());
    u64::from_be_bytes(hash.as_bytes()[..8].try_into().unwrap_or_default())
}

/// What tells this host from its clones when it receives on `interface`: host name and
/// `/etc/machine-id` (which cloned lab PCs often share) and the interface's MAC address (which
/// they do not). No randomness: a restarted receiver must keep its identity. `root` is `/` but
/// for tests.
pub fn machine_identity(root: &Path, host_name: &str, interface: &str) -> String {
    let read = |path: PathBuf| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let machine_id = read(root.join("etc/machine-id"));
    let mac = read(root.join("sys/class/net").join(interface).join("address"));
    format!("{host_name}\0{machine_id}\0{mac}")
}

/// How often the caller's progress view is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// System calls in one go before the disk and the timers get a turn, each taking up to
/// [`RECV_BUFFERS`] receives: 256 receives (16 MiB at most), the bound of the single-receive loop
/// before, so repair requests and status reports are not delayed further.
const RECEIVE_BATCH: usize = 16;
/// Receives per system call: 16 buffers of up to 64 KiB of GRO-coalesced datagrams (1 MiB).
const RECV_BUFFERS: usize = 16;

/// Joins a session and writes the image to the target; `Ok` only when the copy verified.
pub fn run_receive(
    opts: &ReceiveOptions,
    mut progress: impl FnMut(ReceiveProgress),
) -> Result<(), ReceiveError> {
    let target = Target::open(&opts.target)?;
    let (interface, address) = socket::interface_ipv4(opts.interface.as_deref())?;
    let socket = socket::receiver_socket(opts.group, opts.port, address)?;
    let reports = socket::report_socket(address)?;
    let cfg = ReceiverConfig {
        id: opts.id.unwrap_or_else(|| {
            let identity = machine_identity(Path::new("/"), &opts.name, &interface);
            stable_receiver_id(&identity, &opts.target)
        }),
        incarnation: diskcast_transport::random_u64() as u32,
        name: opts.name.clone(),
        serial: opts.serial.clone(),
        disk_size: target.size,
        logical_block: target.logical_block,
        session: opts.session,
        sender_timeout: opts.sender_timeout,
        wait_timeout: opts.wait_timeout,
        trust: opts.trust.clone(),
        ..ReceiverConfig::default()
    };
    match &opts.trust {
        diskcast_proto::trust::Trust::Any => log::warn!(
            "joining any session, signed or not: any host on this network can write this target"
        ),
        diskcast_proto::trust::Trust::Keys(keys) => log::info!(
            "joining only sessions signed by {}",
            keys.iter()
                .map(|k| k.short())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
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
    let finish = FinishOptions {
        grow_last_partition: opts.grow_last_partition,
        discard: opts.discard,
    };
    let writer = disk::spawn_writer(target, cfg.disk_queue, finish)?;
    socket.set_nonblocking(true)?;
    reports.set_nonblocking(true)?;
    socket::enable_gro(&socket);
    let mut session = ReceiveLoop {
        receiver: Receiver::new(cfg, started),
        socket,
        reports,
        writer,
        prepared: false,
        batch: socket::RecvBatch::new(RECV_BUFFERS),
    };
    let mut next_progress = started + PROGRESS_EVERY;
    let mut last_view: Option<ReceiveProgress> = None;
    // When the image's manifest was first known: rates count from there, not from the wait.
    let mut receiving_since: Option<Instant> = None;
    let mut snapshot = |receiver: &Receiver, now: Instant| {
        let (chunks_done, chunks_total) = receiver.progress();
        if chunks_total > 0 && receiving_since.is_none() {
            receiving_since = Some(now);
        }
        ReceiveProgress {
            chunks_done,
            chunks_total,
            image_size: receiver.image_size().unwrap_or(0),
            elapsed: now.duration_since(started),
            verifying: receiver.phase() == Phase::Verifying,
            data_written: receiver.data_written(),
            receiving_for: receiving_since.map_or(Duration::ZERO, |s| now.duration_since(s)),
            repairs: receiver.stats.repaired_blocks,
        }
    };
    loop {
        session.receive()?;
        session.disk_completions();
        let now = Instant::now();
        if session.receiver.poll_timeout().is_some_and(|t| t <= now) {
            session.receiver.handle_timeout(now);
        }
        if let Some(result) = session.carry_out()? {
            let stats = session.receiver.stats;
            let (user, system) = diskcast_transport::cpu_seconds();
            log::info!(
                "received {} datagrams: {} duplicates, {} dropped for memory, {} corrupt chunks, {} kernel overflows, {} untrusted announcements refused, {} forged datagrams dropped; {} foreign (another session or sender) and {} malformed dropped; cpu {user:.2} s user, {system:.2} s system",
                stats.datagrams, stats.duplicates, stats.dropped_for_memory, stats.corrupt_chunks, stats.overflow, stats.untrusted, stats.forged,
                stats.foreign, stats.malformed
            );
            // A finished receiver forgets its transfer: the last view stands, completed.
            let mut view = snapshot(&session.receiver, Instant::now());
            if let Some(last) = last_view.filter(|_| view.chunks_total == 0) {
                view = ReceiveProgress {
                    chunks_done: if result.is_ok() {
                        last.chunks_total
                    } else {
                        last.chunks_done
                    },
                    verifying: false,
                    elapsed: view.elapsed,
                    repairs: view.repairs,
                    ..last
                };
            }
            if view.chunks_total > 0 {
                progress(view);
            }
            return result.map_err(ReceiveError::Failed);
        }
        // Looked at every round (it is cheap), shown once a second: a small image may be
        // copied between two refreshes, and its rate and final view must still be right.
        let now = Instant::now();
        let view = snapshot(&session.receiver, now);
        if view.chunks_total > 0 {
            last_view = Some(view);
        }
        if now >= next_progress {
            progress(view);
            next_progress = now + PROGRESS_EVERY;
        }
        let wake = session
            .receiver
            .poll_timeout()
            .map_or(next_progress, |t| t.min(next_progress));
        if wake > now {
            socket::wait_readable_any(
                &[
                    session.socket.as_fd(),
                    session.reports.as_fd(),
                    session.writer.wake.as_fd(),
                ],
                wake - now,
            );
        }
    }
}

/// The receiver with its socket and disk.
struct ReceiveLoop {
    receiver: Receiver,
    /// The group's datagrams.
    socket: UdpSocket,
    /// Reports to the sender, and its answers.
    reports: UdpSocket,
    writer: WriterHandle,
    /// An image file was sized for the image.
    prepared: bool,
    batch: socket::RecvBatch,
}

impl ReceiveLoop {
    /// Feeds what the sockets hold (up to a batch each) to the receiver.
    fn receive(&mut self) -> Result<(), ReceiveError> {
        self.receive_from(false)?;
        self.receive_from(true)
    }

    fn receive_from(&mut self, reports: bool) -> Result<(), ReceiveError> {
        for _ in 0..RECEIVE_BATCH {
            let from = if reports { &self.reports } else { &self.socket };
            let count = self.batch.recv(from)?;
            let now = Instant::now();
            for i in 0..count {
                let Some((data, received)) = self.batch.get(i) else {
                    break;
                };
                if let (Some(drops), false) = (received.drops, reports) {
                    self.receiver.set_overflow(drops);
                }
                let segment = received.segment.unwrap_or(data.len()).max(1);
                for datagram in data.chunks(segment) {
                    self.receiver
                        .handle_datagram(datagram, received.from.into(), now);
                }
            }
            if count < RECV_BUFFERS {
                break;
            }
        }
        Ok(())
    }

    fn disk_completions(&mut self) {
        while let Some(done) = self.writer.try_done() {
            self.receiver.handle_disk(done, Instant::now());
        }
    }

    /// Sends what the receiver has for the sender and hands disk work to the writer; returns the
    /// result once the receiver finished.
    fn carry_out(&mut self) -> Result<Option<Result<(), Failure>>, ReceiveError> {
        while let Some(transmit) = self.receiver.poll_transmit() {
            // A lost report is repeated at the next status interval.
            if let Destination::Peer(to) = transmit.destination {
                let _ = self.reports.send_to(&transmit.bytes, to);
            }
        }
        while let Some(event) = self.receiver.poll_event() {
            let op = match event {
                Event::Finished(result) => return Ok(Some(result)),
                Event::Write(write) => DiskOp::Write(write),
                Event::Zero { offset, len } => DiskOp::Zero { offset, len },
                Event::FlushAndVerify { manifest } => {
                    log::info!("all chunks written; flushing and reading the copy back");
                    DiskOp::FlushAndVerify { manifest }
                }
            };
            if !self.prepared {
                // An image file gets its final size before the first write.
                let image_size = self.receiver.image_size().unwrap_or(0);
                self.send(DiskOp::Prepare { image_size })?;
                self.prepared = true;
            }
            self.send(op)?;
        }
        Ok(None)
    }

    fn send(&self, op: DiskOp) -> Result<(), ReceiveError> {
        self.writer
            .ops
            .send(op)
            .map_err(|_| ReceiveError::WriterGone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn cloned_hosts_get_different_ids_and_a_restart_keeps_its_own() {
        // Two lab PCs cloned from one image: same host name, same machine-id, same /dev/sda;
        // only their NICs differ.
        let root = std::env::temp_dir().join(format!("diskcast-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (nic, mac) in [("eth0", "52:54:00:00:00:01"), ("eth1", "52:54:00:00:00:02")] {
            let dir = root.join("sys/class/net").join(nic);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("address"), format!("{mac}\n")).unwrap();
        }
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/machine-id"), "0123456789abcdef\n").unwrap();
        let target = Path::new("/dev/sda");
        let pc_a = stable_receiver_id(&machine_identity(&root, "lab-pc", "eth0"), target);
        let pc_b = stable_receiver_id(&machine_identity(&root, "lab-pc", "eth1"), target);
        assert_ne!(pc_a, pc_b, "clones must not share a receiver id");
        let restarted = stable_receiver_id(&machine_identity(&root, "lab-pc", "eth0"), target);
        assert_eq!(pc_a, restarted, "a restart is the same receiver");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
