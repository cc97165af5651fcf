//! The crate's one error type.

use std::io;

/// Everything that can go wrong while mapping a disk or fitting its GPT.
///
/// Inside [`crate::used_map`], errors of one partition's file system do not escape: that
/// partition is copied whole and the error becomes a warning of the [`crate::Report`]. What
/// escapes is what makes the whole disk unreadable (its size, its first sectors).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsmapError {
    /// The size of the disk or image could not be read.
    #[error("reading the size of the disk")]
    Size(#[source] io::Error),
    /// A read failed (including a short read at the end of a file).
    #[error("reading {what} at byte {offset}")]
    Read {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// A write (or seek) failed while fitting a GPT.
    #[error("writing {what} at byte {offset}")]
    Write {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// On-disk metadata points outside the partition (or disk) it belongs to.
    #[error(
        "{what} at byte {offset} (+{len} bytes) lies outside its area, which ends at byte {limit}"
    )]
    OutOfBounds {
        what: &'static str,
        offset: u64,
        len: u64,
        limit: u64,
    },
    /// On-disk metadata is inconsistent.
    #[error("{what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// A feature this crate does not interpret (the partition is then copied whole).
    #[error("unsupported {what}: {detail}")]
    Unsupported { what: &'static str, detail: String },
    /// The file system was not cleanly unmounted: its allocation maps may not be final.
    #[error("file system not clean: {detail}")]
    Unclean { detail: String },
    /// gptman refused the GPT.
    #[error("{op}")]
    Gpt {
        op: &'static str,
        #[source]
        source: gptman::Error,
    },
    /// mbrman refused a sector of the MBR partition table (MBR or EBR).
    #[error("{op} at byte {offset}")]
    Mbr {
        op: &'static str,
        offset: u64,
        #[source]
        source: mbrman::Error,
    },
    /// The ntfs crate refused the volume.
    #[error("NTFS: {op}")]
    Ntfs {
        op: &'static str,
        #[source]
        source: ntfs::NtfsError,
    },
    /// `fit_gpt_to_disk` was given a target smaller than the image.
    #[error("the target ({target_size} bytes) is smaller than the image ({image_size} bytes)")]
    TargetTooSmall { image_size: u64, target_size: u64 },
    /// `fit_gpt_to_disk` was given a sector size that is not a power of two in 512..=65536.
    #[error("invalid sector size {0} (expected a power of two from 512 to 65536)")]
    SectorSize(u64),
    /// An error of one partition, with where it is.
    #[error("partition {index} at byte {start}")]
    Partition {
        index: u32,
        start: u64,
        #[source]
        source: Box<FsmapError>,
    },
}

impl FsmapError {
    pub(crate) fn corrupt(what: &'static str, detail: impl Into<String>) -> Self {
        FsmapError::Corrupt {
            what,
            detail: detail.into(),
        }
    }

    pub(crate) fn unsupported(what: &'static str, detail: impl Into<String>) -> Self {
        FsmapError::Unsupported {
            what,
            detail: detail.into(),
        }
    }
}
