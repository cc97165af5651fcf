//! After a copy verified on a block device: discard what the image skipped as unused, and fit
//! a GPT to a disk larger than the image (backup header and table moved to the disk's end,
//! optionally the last partition grown). Both only touch what the image does not cover (the
//! skipped ranges, the sectors past the image) and the GPT headers, so they come after the
//! read-back check.

use super::disk::Kind;
use crate::sys;
use diskcast_fsmap::{fit_gpt_to_disk, FsmapError, GptFix};
use diskcast_proto::manifest::{ChunkKind, Manifest};
use diskcast_proto::units::human_size;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error("opening {path} to finish the copy")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the copy on {path} verified, but fitting its GPT to the disk failed")]
    Gpt {
        path: PathBuf,
        #[source]
        source: FsmapError,
    },
    #[error("the copy on {path} verified, but flushing the fitted GPT failed")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What happens to a verified copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct FinishOptions {
    pub grow_last_partition: bool,
    pub discard: bool,
}

/// Finishes a verified copy of `manifest` on `target`.
pub fn finish_copy(
    target: &Path,
    manifest: &Manifest,
    opts: FinishOptions,
) -> Result<Option<GptFix>, FitError> {
    let open_err = |source| FitError::Open {
        path: target.into(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(open_err)?;
    let kind = if file
        .metadata()
        .map_err(open_err)?
        .file_type()
        .is_block_device()
    {
        Kind::BlockDevice
    } else {
        Kind::File
    };
    if kind == Kind::File {
        if opts.grow_last_partition {
            log::warn!(
                "{} is an image file sized to the image: no partition to grow",
                target.display()
            );
        }
        return Ok(None);
    }
    if opts.discard {
        discard_absent(&file, target, manifest);
    }
    let disk_size = sys::block_device_size(&file).map_err(open_err)?;
    let sector_size = sys::logical_block_size(&file).map_err(open_err)?;
    if disk_size == manifest.image_size && !opts.grow_last_partition {
        return Ok(None);
    }
    let fix = fit_gpt_to_disk(
        &mut file,
        manifest.image_size,
        disk_size,
        u64::from(sector_size),
        opts.grow_last_partition,
    )
    .map_err(|source| FitError::Gpt {
        path: target.into(),
        source,
    })?;
    file.sync_all().map_err(|source| FitError::Sync {
        path: target.into(),
        source,
    })?;
    log::info!(
        "{} ({} for an image of {}): {fix}",
        target.display(),
        human_size(disk_size),
        human_size(manifest.image_size)
    );
    Ok(Some(fix))
}

/// Discards each run of absent chunks. A device that cannot discard keeps its old bytes there,
/// which is what an absent chunk allows: a warning, not a failure.
fn discard_absent(file: &File, target: &Path, manifest: &Manifest) {
    let mut discarded = 0u64;
    for (offset, len) in absent_runs(manifest) {
        if let Err(e) = sys::block_discard(file, offset, len) {
            log::warn!(
                "discarding {} at byte {offset} of {}: {e}; the unused ranges keep their old bytes",
                human_size(len),
                target.display()
            );
            return;
        }
        discarded += len;
    }
    log::info!(
        "discarded {} the image skipped as unused on {}",
        human_size(discarded),
        target.display()
    );
}

/// Byte ranges (offset, length) of consecutive absent chunks.
pub fn absent_runs(manifest: &Manifest) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for index in 0..manifest.chunk_count() {
        if manifest.chunks[index as usize] != ChunkKind::Absent {
            continue;
        }
        let (offset, len) = manifest.chunk_range(index);
        match runs.last_mut() {
            Some((start, run)) if *start + *run == offset => *run += len as u64,
            _ => runs.push((offset, len as u64)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_runs_merge_neighbours() {
        let kinds = [
            ChunkKind::Absent,
            ChunkKind::Absent,
            ChunkKind::Zero,
            ChunkKind::Absent,
            ChunkKind::Data([1; 32]),
            ChunkKind::Absent,
        ];
        let manifest = Manifest {
            image_size: 5 * 4096 + 100,
            chunk_size: 4096,
            chunks: kinds.to_vec(),
            signature: Vec::new(),
        };
        assert_eq!(
            absent_runs(&manifest),
            [(0, 8192), (3 * 4096, 4096), (5 * 4096, 100)]
        );
    }
}
