//! Which bytes of a disk must be copied: file-system-aware "used" maps (as partclone and
//! Clonezilla do), and GPT repair after an image is written to a larger disk.
//!
//! diskcast otherwise skips only all-zero chunks, so the garbage of deleted files in free space
//! is captured and multicast. [`used_map`] reads, read-only, the partition table and each file
//! system's allocation metadata of a raw device or image and returns the byte ranges that hold
//! anything; the rest may be skipped (left as it is, or zeroed, on the target).
//!
//! # What is used
//!
//! - Everything outside partitions: the first MiB (MBR, GPT, boot loader code such as GRUB's
//!   core image), gaps between partitions, EBRs, the backup GPT at the end of the disk.
//! - In a partition whose file system is recognised and clean: the blocks its allocation map
//!   marks, its metadata, and whatever lies after the file system's end inside the partition.
//!   - ext2/3/4 ([`FsKind::Ext4`] …): block bitmaps, plus every group's superblock backup,
//!     descriptors, reserved GDT blocks, bitmaps and inode table (also computed for
//!     `BLOCK_UNINIT` groups, as the kernel does). The journal is allocated in the bitmaps.
//!   - FAT12/16/32: reserved sectors, FATs, the FAT12/16 root directory, and every cluster
//!     whose FAT entry is not 0.
//!   - NTFS: the clusters marked in `$Bitmap` (which covers all metadata files), and the
//!     backup boot sector after the volume.
//!   - Linux swap: the first page only (the signature page); the rest is free by definition.
//! - Everything else, copied whole: partitions of unknown or unsupported file systems (XFS,
//!   btrfs, LVM, ...), and any file system that is not clean or not trusted.
//!
//! # What is conservative
//!
//! The map never guesses. A damaged partition table (bad CRC, overlapping partitions or
//! partitions outside the disk) makes the whole disk used; no table and no file system on the
//! whole disk, too. A file system is copied whole, with a warning in the [`Report`], when its
//! journal needs recovery or it was not cleanly unmounted (ext: `needs_recovery`, state not
//! clean, errors; NTFS: `$Volume` dirty; FAT: dirty flags) unless [`Options::force_unclean`];
//! when its metadata points outside its partition; when ext group descriptor checksums do not
//! match; when it uses a feature this crate does not interpret (ext bigalloc, unknown
//! incompat/ro_compat features, hibernation image in swap); when several signatures match; and
//! on read errors. Free gaps shorter than [`Options::merge_gap`] are counted as used.
//!
//! Metadata is untrusted input: every read is bounded by the partition it belongs to, sizes
//! taken from headers are checked against the partition before anything is allocated, and the
//! arithmetic is checked. Memory is bounded by the number of used ranges, at most one per
//! `merge_gap` of disk.

#![forbid(unsafe_code)]

mod chunks;
mod error;
mod ext;
mod fat;
mod fs;
mod gpt_fit;
mod io;
mod map;
mod ntfs_fs;
mod swap;
mod table;

pub use chunks::chunks_to_read;
pub use error::FsmapError;
pub use gpt_fit::{fit_gpt_to_disk, GptFix};
pub use io::ReadAt;
pub use map::UsedMap;

use io::Area;
use map::RangeBuilder;
use std::fmt;

/// The kind of partition table found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// A GUID partition table (possibly with a hybrid MBR, which is ignored).
    Gpt,
    /// An MBR partition table, with its logical partitions.
    Mbr,
    /// No partition table: a file system on the whole disk (a "superfloppy", reported as
    /// partition 0), or nothing recognised (then the whole disk is used).
    None,
    /// A table that cannot be trusted: the whole disk is used.
    Damaged,
}

/// The file system found in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Fat12,
    Fat16,
    Fat32,
    Ntfs,
    Xfs,
    Swap,
    Unknown,
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Fat12 => "FAT12",
            FsKind::Fat16 => "FAT16",
            FsKind::Fat32 => "FAT32",
            FsKind::Ntfs => "NTFS",
            FsKind::Xfs => "XFS",
            FsKind::Swap => "swap",
            FsKind::Unknown => "unknown",
        })
    }
}

/// Why a partition is copied whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhyWhole {
    /// No file system recognised (not a warning: e.g. a BIOS boot or MSR partition).
    UnknownFs,
    /// Not cleanly unmounted or the journal needs recovery (see [`Options::force_unclean`]).
    Unclean,
    /// Metadata (or the file system's size) points outside the partition.
    OutOfBounds,
    /// A feature or file system this crate does not interpret.
    Unsupported,
    /// Inconsistent metadata (bad checksum, impossible geometry, ambiguous signatures).
    Corrupt,
    /// A read failed.
    ReadError,
}

impl WhyWhole {
    fn of(e: &FsmapError) -> Self {
        match e {
            FsmapError::Unclean { .. } => WhyWhole::Unclean,
            FsmapError::OutOfBounds { .. } => WhyWhole::OutOfBounds,
            FsmapError::Unsupported { .. } => WhyWhole::Unsupported,
            FsmapError::Read { .. } | FsmapError::Size(_) => WhyWhole::ReadError,
            FsmapError::Ntfs {
                source: ntfs::NtfsError::Io(io),
                ..
            } => {
                if io.kind() == std::io::ErrorKind::UnexpectedEof {
                    // The ntfs crate read past the partition's end.
                    WhyWhole::OutOfBounds
                } else {
                    WhyWhole::ReadError
                }
            }
            FsmapError::Partition { source, .. } => WhyWhole::of(source),
            _ => WhyWhole::Corrupt,
        }
    }
}

/// One partition (or the whole-disk file system) and what was found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReport {
    /// GPT entry number (from 1), MBR primary 1-4 or logical 5.., 0 for a whole-disk file system.
    pub index: u32,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    pub fs: FsKind,
    /// Bytes of the partition in the used map.
    pub used_bytes: u64,
    /// `Some` when the partition is copied whole, with why.
    pub whole: Option<WhyWhole>,
}

/// What [`used_map`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub table: TableKind,
    /// Sorted by start.
    pub partitions: Vec<PartitionReport>,
    /// Everything that made the map more conservative than it could be, and forced mappings.
    pub warnings: Vec<String>,
}

/// How [`used_map`] decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Map a file system that is not clean (journal needs recovery, dirty flag) as if it were,
    /// instead of copying it whole. Blocks the journal would still write may then be missed:
    /// only for images of file systems known to be consistent.
    pub force_unclean: bool,
    /// Free gaps shorter than this between used ranges count as used. This bounds the map's
    /// memory (at most one range per `merge_gap` of disk); a gap shorter than a chunk can never
    /// free a whole chunk, so the default (1 MiB, diskcast's chunk) loses nothing at chunk
    /// granularity. 0 keeps the exact ranges.
    pub merge_gap: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            force_unclean: false,
            merge_gap: 1 << 20,
        }
    }
}

/// Maps the bytes of `disk` that must be copied.
///
/// Errors only when the disk's size or first sector cannot be read; anything wrong inside the
/// table or a file system makes the map more conservative and is told in
/// [`Report::warnings`].
pub fn used_map<D: ReadAt + ?Sized>(
    disk: &D,
    opts: &Options,
) -> Result<(UsedMap, Report), FsmapError> {
    let size = disk.size().map_err(FsmapError::Size)?;
    let mut warnings = Vec::new();
    let (table, parts) = match table::read(disk, size, &mut warnings)? {
        table::Table::Gpt(parts) => (TableKind::Gpt, parts),
        table::Table::Mbr(parts) => (TableKind::Mbr, parts),
        table::Table::Superfloppy => (
            TableKind::None,
            vec![table::Part {
                index: 0,
                start: 0,
                len: size,
            }],
        ),
        table::Table::None => {
            if size > 0 {
                warnings.push(
                    "no partition table and no known file system: the whole disk is used".into(),
                );
            }
            let report = Report {
                table: TableKind::None,
                partitions: Vec::new(),
                warnings,
            };
            return Ok((UsedMap::whole(size), report));
        }
        table::Table::Damaged(why) => {
            warnings.push(format!(
                "damaged partition table ({why}): the whole disk is used"
            ));
            let report = Report {
                table: TableKind::Damaged,
                partitions: Vec::new(),
                warnings,
            };
            return Ok((UsedMap::whole(size), report));
        }
    };

    let mut all = RangeBuilder::new(opts.merge_gap);
    let mut partitions = Vec::with_capacity(parts.len());
    let mut pos = 0u64;
    for p in parts {
        // Outside any partition: used.
        all.add(pos, p.start);
        pos = pos.max(p.start + p.len);
        let area = Area::new(disk, p.start, p.len);
        let mut notes = Vec::new();
        let (fs, result) = fs::map(area, opts, &mut notes);
        let where_ = format!(
            "partition {} ({fs}, bytes {}..{})",
            p.index,
            p.start,
            p.start + p.len
        );
        warnings.extend(notes.into_iter().map(|n| format!("{where_}: {n}")));
        let (used_bytes, whole) = match result {
            Ok(map) => {
                all.extend(map.ranges());
                (map.used_bytes(), None)
            }
            Err(e) => {
                let why = if fs == FsKind::Unknown && matches!(e, FsmapError::Unsupported { .. }) {
                    WhyWhole::UnknownFs
                } else {
                    let e = FsmapError::Partition {
                        index: p.index,
                        start: p.start,
                        source: Box::new(e),
                    };
                    warnings.push(format!(
                        "{where_} is copied whole: {}",
                        diskcast_proto::error_chain(&e)
                    ));
                    WhyWhole::of(&e)
                };
                all.add(p.start, p.start + p.len);
                (p.len, Some(why))
            }
        };
        partitions.push(PartitionReport {
            index: p.index,
            start: p.start,
            len: p.len,
            fs,
            used_bytes,
            whole,
        });
    }
    all.add(pos, size);
    Ok((
        all.finish(),
        Report {
            table,
            partitions,
            warnings,
        },
    ))
}
