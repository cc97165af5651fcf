//! Sending a disk or image file from this machine (the peer master, `agent send`): read it once
//! to list its chunks, then multicast it with `diskcast-transport`.

use super::disk::{DiskError, ScanReport, Source, WireCompression};
use diskcast_fsmap::chunks_to_read;
use diskcast_proto::cmdline::Blocks;
use diskcast_proto::manifest::{valid_chunk_size, ChunkKind};
use diskcast_proto::sender::Sender;
use diskcast_proto::units::human_size;
use diskcast_transport::send::{self, SendError, SendOptions, SendSummary};
use diskcast_transport::socket::{self, NetError};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("the source {path} is empty")]
    Empty { path: PathBuf },
    #[error("chunk size {0} must be a multiple of 4096 between 64 KiB and 64 MiB")]
    ChunkSize(u32),
}

/// Reads `source`, then multicasts it until every receiver is done or failed.
pub fn run_send(
    source: &Path,
    opts: &SendOptions,
    blocks: Blocks,
    progress: impl FnMut(&Sender),
) -> Result<SendSummary, SourceError> {
    if !valid_chunk_size(opts.chunk_size) || opts.chunk_size < 64 << 10 {
        return Err(SourceError::ChunkSize(opts.chunk_size));
    }
    if !opts.group.is_multicast() {
        return Err(NetError::NotMulticast(opts.group).into());
    }
    let mut disk = Source::open(source, opts.chunk_size)?;
    if disk.size == 0 {
        return Err(SourceError::Empty {
            path: source.into(),
        });
    }
    // A wrong interface should fail now, not after reading a whole disk.
    socket::interface_ipv4(opts.interface.as_deref())?;
    log::info!(
        "reading {} ({}) to list its chunks",
        source.display(),
        human_size(disk.size)
    );
    let scan_started = Instant::now();
    let used = chunks_to_read(&disk, source, opts.chunk_size, blocks);
    let mut judged_rate = 0;
    let (manifest, report) = match opts.compress {
        Some(level) => {
            let (interface, _) = socket::interface_ipv4(opts.interface.as_deref())?;
            judged_rate = link_rate(&interface, opts.max_rate.bytes_per_sec());
            let compression = WireCompression {
                level,
                link_rate: judged_rate,
                budget: frame_budget(),
            };
            disk.scan_for_wire(used.as_deref(), compression)?
        }
        None => (disk.scan(used.as_deref(), |_| {})?, ScanReport::default()),
    };
    if report.compressed_chunks > 0 || report.batches_raw_for_cpu > 0 {
        log::info!(
            "compressed {} chunks from {} to {}; {} batches sent raw because compressing cost more time than the link saves, {} for memory{}",
            report.compressed_chunks,
            human_size(report.raw_bytes),
            human_size(report.stored_bytes),
            report.batches_raw_for_cpu,
            report.batches_raw_for_memory,
            report.break_even_rate.map_or(String::new(), |rate| format!(
                " (compressing pays below {:.0} MB/s of link here; judged against {:.0} MB/s)",
                rate / 1e6,
                judged_rate as f64 / 1e6
            )),
        );
    }
    log::info!(
        "image: {} in {} chunks, {} of data in {} chunks ({} zero, {} unused and skipped), scanned in {:.1} s",
        human_size(manifest.image_size),
        manifest.chunk_count(),
        human_size(manifest.data_bytes()),
        manifest.data_chunks().count(),
        manifest
            .chunks
            .iter()
            .filter(|c| **c == ChunkKind::Zero)
            .count(),
        human_size(manifest.absent_bytes()),
        scan_started.elapsed().as_secs_f64()
    );
    let summary = send::multicast(opts, manifest, &mut disk, progress)?;
    if let Some(hint) = rate_hint(&report, &summary) {
        log::info!("{hint}");
    }
    Ok(summary)
}

/// When the session ran slower than the rate at which compressing paid, while the scan left
/// batches raw (it judged against a faster link): says so, and what to pass next time. The scan
/// must decide before the first datagram (a chunk's form is in the signed manifest), so it cannot
/// use the rate the session then achieves.
fn rate_hint(report: &ScanReport, summary: &SendSummary) -> Option<String> {
    let break_even = report.break_even_rate?;
    let seconds = summary.elapsed.as_secs_f64();
    if report.batches_raw_for_cpu == 0 || seconds <= 0.0 {
        return None;
    }
    let achieved = summary.sent_bytes as f64 / seconds;
    (achieved < break_even).then(|| {
        format!(
            "the session moved {:.0} MB/s, below the {:.0} MB/s at which compressing paid here: {} batches went raw that would have paid; `--rate {:.0}` tells the next scan this link's rate",
            achieved / 1e6,
            break_even / 1e6,
            report.batches_raw_for_cpu,
            achieved / 1e6
        )
    })
}

/// Bytes per second the link carries: the interface's speed when the driver reports one, never
/// more than the rate ceiling.
fn link_rate(interface: &str, ceiling: u64) -> u64 {
    let speed_mbit = std::fs::read_to_string(format!("/sys/class/net/{interface}/speed"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|&mbit| mbit > 0);
    match speed_mbit {
        Some(mbit) => ceiling.min(mbit as u64 * 1_000_000 / 8),
        None => ceiling,
    }
}

/// Memory for compressed frames: a quarter of what the kernel says is available (256 MiB when
/// it does not say).
fn frame_budget() -> usize {
    let available_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemAvailable:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        });
    available_kib.map_or(256 << 20, |kib| (kib * 1024 / 4) as usize)
}
