//! Fitting a GPT to a target disk larger than the image written to it.
//!
//! An image's backup GPT sits at the image's end; on a larger disk it must move to the disk's
//! last sectors, and both headers must describe the new size. `gptman` reads and writes the
//! headers and entries (with their CRCs); its whole-table `GPT::read_from` is avoided for the
//! reasons given in the `table` module.

use crate::table::gpt_entries;
use crate::FsmapError;
use gptman::GPTHeader;
use std::fmt;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};

/// What [`fit_gpt_to_disk`] did, for a log line (`Display`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GptFix {
    /// The image holds no GPT: nothing was changed (`mbr`: it holds an MBR).
    NotGpt { mbr: bool },
    /// The GPT was rewritten for the target's size.
    Fitted {
        sector_size: u64,
        old_backup_lba: u64,
        new_backup_lba: u64,
        last_usable_lba: u64,
        /// The partition grown: entry number, old and new last LBA.
        grown: Option<(u32, u64, u64)>,
        /// Whether the protective MBR's size was updated (false: none, or a hybrid MBR whose
        /// 0xEE entry did not cover the image's end, or an MBR mbrman refuses).
        protective_mbr: bool,
    },
}

impl fmt::Display for GptFix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GptFix::NotGpt { mbr: true } => write!(f, "MBR partition table: nothing to fit"),
            GptFix::NotGpt { mbr: false } => write!(f, "no partition table: nothing to fit"),
            GptFix::Fitted {
                sector_size,
                old_backup_lba,
                new_backup_lba,
                last_usable_lba,
                grown,
                protective_mbr,
            } => {
                write!(
                    f,
                    "GPT ({sector_size}-byte sectors): backup header moved from LBA {old_backup_lba} to {new_backup_lba}, last usable LBA {last_usable_lba}"
                )?;
                if let Some((n, old, new)) = grown {
                    write!(f, ", partition {n} grown from last LBA {old} to {new}")?;
                }
                if *protective_mbr {
                    write!(f, ", protective MBR updated")?;
                }
                Ok(())
            }
        }
    }
}

fn read_at<R: Read + Seek>(
    disk: &mut R,
    what: &'static str,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), FsmapError> {
    disk.seek(SeekFrom::Start(offset))
        .and_then(|_| disk.read_exact(buf))
        .map_err(|source| FsmapError::Read {
            what,
            offset,
            source,
        })
}

fn write_at<W: Write + Seek>(
    disk: &mut W,
    what: &'static str,
    offset: u64,
    buf: &[u8],
) -> Result<(), FsmapError> {
    disk.seek(SeekFrom::Start(offset))
        .and_then(|_| disk.write_all(buf))
        .map_err(|source| FsmapError::Write {
            what,
            offset,
            source,
        })
}

/// Zeroes sectors `first..=last`.
fn zero<W: Write + Seek>(
    disk: &mut W,
    what: &'static str,
    ss: u64,
    first: u64,
    last: u64,
) -> Result<(), FsmapError> {
    let zeros = vec![0u8; ss as usize];
    for lba in first..=last {
        write_at(disk, what, lba * ss, &zeros)?;
    }
    Ok(())
}

/// After an image of `image_size` bytes was written to a target of `target_size` >=
/// `image_size` bytes: if the image holds a GPT, move the backup GPT header and entry array to
/// the target's end, fix both headers (backup LBA, last usable LBA) and their CRCs, and update
/// the protective MBR's size. With `grow_last_partition`, the partition that ends last is
/// extended to the new last usable LBA (its file system is not resized).
///
/// MBR disks are left alone (growing an MBR partition is not supported). The primary GPT must
/// be valid; a smaller target is an error naming both sizes.
pub fn fit_gpt_to_disk(
    disk: &mut (impl Read + Write + Seek),
    image_size: u64,
    target_size: u64,
    sector_size: u64,
    grow_last_partition: bool,
) -> Result<GptFix, FsmapError> {
    let ss = sector_size;
    if !ss.is_power_of_two() || !(512..=65536).contains(&ss) {
        return Err(FsmapError::SectorSize(ss));
    }
    if target_size < image_size {
        return Err(FsmapError::TargetTooSmall {
            image_size,
            target_size,
        });
    }
    let image_sectors = image_size / ss;
    let target_sectors = target_size / ss;
    let mut sector0 = [0u8; 512];
    if image_size < 512 {
        return Ok(GptFix::NotGpt { mbr: false });
    }
    read_at(disk, "the MBR", 0, &mut sector0)?;
    let has_mbr = sector0[510..] == [0x55, 0xAA];
    let mut sig = [0u8; 8];
    if image_sectors < 3 || {
        read_at(disk, "the GPT header", ss, &mut sig)?;
        &sig != b"EFI PART"
    } {
        return Ok(GptFix::NotGpt { mbr: has_mbr });
    }

    disk.seek(SeekFrom::Start(ss))
        .map_err(|source| FsmapError::Read {
            what: "the GPT header",
            offset: ss,
            source,
        })?;
    let primary = GPTHeader::read_from(disk).map_err(|source| FsmapError::Gpt {
        op: "reading the primary GPT header",
        source,
    })?;
    if primary.primary_lba != 1 {
        return Err(FsmapError::corrupt(
            "GPT header",
            format!("its own LBA is {}", primary.primary_lba),
        ));
    }
    let mut entries =
        gpt_entries(disk, &primary, ss, image_sectors).map_err(|detail| FsmapError::Corrupt {
            what: "GPT",
            detail,
        })?;
    let used: Vec<(usize, u64, u64)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.is_used())
        .map(|(i, e)| (i, e.starting_lba, e.ending_lba))
        .collect();
    if let Some((i, s, e)) = used
        .iter()
        .find(|(_, s, e)| s > e || *s < primary.first_usable_lba || *e > primary.last_usable_lba)
    {
        return Err(FsmapError::corrupt(
            "GPT",
            format!(
                "partition {} (LBA {s}..={e}) is outside the usable LBAs",
                i + 1
            ),
        ));
    }
    let array_sectors = (u64::from(primary.number_of_partition_entries) * 128).div_ceil(ss);
    let new_backup = target_sectors - 1;
    let new_last_usable = new_backup
        .checked_sub(array_sectors + 1)
        .filter(|&l| l >= primary.last_usable_lba)
        .ok_or_else(|| {
            FsmapError::corrupt("GPT", "the backup entry array does not fit the target")
        })?;
    let max_end = used.iter().map(|&(_, _, e)| e).max();

    let mut grown = None;
    if grow_last_partition {
        let last = used
            .iter()
            .filter(|&&(_, _, e)| Some(e) == max_end)
            .map(|&(i, _, e)| (i, e))
            .next();
        if let Some((i, old_end)) = last {
            if let Some(entry) = entries.get_mut(i).filter(|_| old_end < new_last_usable) {
                entry.ending_lba = new_last_usable;
                grown = Some((i as u32 + 1, old_end, new_last_usable));
            }
        }
    }

    let mut header = primary.clone();
    header.backup_lba = new_backup;
    header.last_usable_lba = new_last_usable;
    let mut backup = header.clone();
    backup.primary_lba = new_backup;
    backup.backup_lba = 1;
    backup.partition_entry_lba = new_last_usable + 1;

    // The new backup first (zeroed sectors, then entries and header), then the primary.
    zero(disk, "the backup GPT", ss, new_last_usable + 1, new_backup)?;
    backup
        .write_into(disk, ss, &entries)
        .map_err(|source| FsmapError::Gpt {
            op: "writing the backup GPT",
            source,
        })?;
    header
        .write_into(disk, ss, &entries)
        .map_err(|source| FsmapError::Gpt {
            op: "writing the primary GPT",
            source,
        })?;
    // The old backup (entries and header at the image's end), if it lies where no partition
    // was and the new one is not: no stale GPT signature in the middle of the disk.
    let old_first = primary.last_usable_lba + 1;
    let old_last = primary.backup_lba;
    if old_last < new_last_usable + 1
        && old_first <= old_last
        && old_last - old_first <= array_sectors
        && max_end.is_none_or(|e| e < old_first)
        && old_last < image_sectors
    {
        zero(disk, "the old backup GPT", ss, old_first, old_last)?;
    }
    disk.flush().map_err(|source| FsmapError::Write {
        what: "the GPT",
        offset: 0,
        source,
    })?;

    let protective_mbr =
        has_mbr && fit_protective_mbr(disk, &sector0, image_sectors, target_sectors)?;
    Ok(GptFix::Fitted {
        sector_size: ss,
        old_backup_lba: primary.backup_lba,
        new_backup_lba: new_backup,
        last_usable_lba: new_last_usable,
        grown,
        protective_mbr,
    })
}

/// Stretches the 0xEE entry to the target's end if it reached the image's end.
fn fit_protective_mbr(
    disk: &mut (impl Write + Seek),
    sector0: &[u8; 512],
    image_sectors: u64,
    target_sectors: u64,
) -> Result<bool, FsmapError> {
    let Ok(mut mbr) = mbrman::MBRHeader::read_from(&mut Cursor::new(&sector0[..])) else {
        return Ok(false);
    };
    let mut changed = false;
    for (_, e) in mbr.iter_mut() {
        let end = u64::from(e.starting_lba) + u64::from(e.sectors);
        if e.sys == 0xEE && e.starting_lba > 0 && (end >= image_sectors || e.sectors == u32::MAX) {
            e.sectors =
                u32::try_from(target_sectors - u64::from(e.starting_lba)).unwrap_or(u32::MAX);
            changed = true;
        }
    }
    if changed {
        let mut buf = Cursor::new(vec![0u8; 512]);
        mbr.write_into(&mut buf).map_err(|source| FsmapError::Mbr {
            op: "writing the protective MBR",
            offset: 0,
            source,
        })?;
        write_at(disk, "the protective MBR", 0, buf.get_ref())?;
    }
    Ok(changed)
}
