//! Partition tables: GPT through `gptman`, MBR through `mbrman`.
//!
//! Both crates' whole-table readers (`GPT::read_from`, `MBR::read_from`) can panic or overflow
//! on crafted tables (an unwrap in their alignment guess when every partition starts at LBA 0;
//! unchecked `u32`/`u64` sums of start sectors; an assertion on the entry size). So we use their
//! sector-level parsers (`GPTHeader::read_from` with its CRC check, `read_partitions` with the
//! entry array CRC, `MBRHeader` for the MBR and each EBR) after validating the fields those
//! parsers trust, and walk the EBR chain here with checked arithmetic. mbrman does parse
//! logical partitions correctly; only its robustness against hostile input is the reason.
//!
//! MBR sectors are taken as 512 bytes. A GPT is looked for with 512- and 4096-byte sectors.

use crate::io::{Area, ReadAt};
use crate::{fs, FsmapError};
use gptman::{GPTHeader, GPTPartitionEntry};
use std::io::{Cursor, Seek, SeekFrom};

/// The most GPT entries accepted (the usual is 128).
const MAX_GPT_ENTRIES: u32 = 4096;
/// The most logical partitions followed in an EBR chain.
const MAX_LOGICAL: usize = 1024;
const MBR_SECTOR: u64 = 512;
const GPT_PROTECTIVE: u8 = 0xEE;

/// One partition of the disk, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    /// GPT entry number (from 1), MBR primary 1-4 or logical 5..; 0 for a whole-disk file system.
    pub(crate) index: u32,
    pub(crate) start: u64,
    pub(crate) len: u64,
}

#[derive(Debug)]
pub(crate) enum Table {
    Gpt(Vec<Part>),
    Mbr(Vec<Part>),
    /// No partition table, a file system on the whole disk.
    Superfloppy,
    /// No partition table, no file system recognised.
    None,
    Damaged(String),
}

/// Reads the partition table of a disk of `size` bytes.
pub(crate) fn read<D: ReadAt + ?Sized>(
    disk: &D,
    size: u64,
    warnings: &mut Vec<String>,
) -> Result<Table, FsmapError> {
    let whole = Area::new(disk, 0, size);
    if size < MBR_SECTOR {
        return Ok(Table::None);
    }
    let mut sector0 = [0u8; MBR_SECTOR as usize];
    whole.read("the first sector", 0, &mut sector0)?;
    let mbr = mbrman::MBRHeader::read_from(&mut Cursor::new(&sector0[..]));
    let protective = mbr
        .as_ref()
        .is_ok_and(|h| h.iter().any(|(_, e)| e.sys == GPT_PROTECTIVE));
    if protective {
        return Ok(gpt(&whole, warnings));
    }
    if gpt_signature(&whole).is_some() {
        // A GPT without a protective MBR: used if there is no MBR table (as gptman does), but
        // beside a populated MBR it may be stale (Linux would use the MBR): no guess.
        let populated = mbr
            .as_ref()
            .is_ok_and(|h| h.iter().any(|(_, e)| e.is_used()));
        return Ok(if populated {
            Table::Damaged(
                "both a populated MBR (without a protective entry) and a GPT header".into(),
            )
        } else {
            gpt(&whole, warnings)
        });
    }
    let fs_found = !fs::probe(&whole).is_empty();
    let parts = match mbr {
        Err(mbrman::Error::InvalidSignature) => {
            return Ok(if fs_found {
                Table::Superfloppy
            } else {
                Table::None
            })
        }
        Err(e) => Err(format!("the MBR: {e}")),
        Ok(header) => mbr_partitions(&whole, &header),
    };
    Ok(match (parts, fs_found) {
        (Ok(parts), _) if !parts.is_empty() => Table::Mbr(parts),
        // A boot sector whose code area reads as an empty or invalid table.
        (_, true) => Table::Superfloppy,
        (Ok(parts), false) => Table::Mbr(parts),
        (Err(why), false) => Table::Damaged(why),
    })
}

/// The sector size at whose LBA 1 a GPT header signature is.
fn gpt_signature<D: ReadAt + ?Sized>(whole: &Area<'_, D>) -> Option<u64> {
    [512u64, 4096].into_iter().find(|&ss| {
        let mut sig = [0u8; 8];
        whole.read("GPT header", ss, &mut sig).is_ok() && &sig == b"EFI PART"
    })
}

/// The partitions of a GPT, or why the table cannot be trusted.
fn gpt<D: ReadAt + ?Sized>(whole: &Area<'_, D>, warnings: &mut Vec<String>) -> Table {
    let Some(ss) = gpt_signature(whole) else {
        return Table::Damaged("a protective MBR but no GPT header".into());
    };
    match gpt_read(whole, ss) {
        Ok((header, parts)) => {
            if let Some(w) = gpt_backup_warning(whole, ss, &header) {
                warnings.push(w);
            }
            Table::Gpt(parts)
        }
        Err(why) => Table::Damaged(why),
    }
}

/// Reads and checks the primary GPT header and its entries (sector size `ss`).
pub(crate) fn gpt_read<D: ReadAt + ?Sized>(
    whole: &Area<'_, D>,
    ss: u64,
) -> Result<(GPTHeader, Vec<Part>), String> {
    let mut cursor = whole.cursor();
    let _ = cursor.seek(SeekFrom::Start(ss));
    let header =
        GPTHeader::read_from(&mut cursor).map_err(|e| format!("the primary GPT header: {e}"))?;
    let entries = gpt_entries(&mut cursor, &header, ss, whole.len / ss)?;
    let mut parts = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.is_unused() {
            continue;
        }
        let n = i + 1;
        if e.starting_lba > e.ending_lba
            || e.starting_lba < header.first_usable_lba
            || e.ending_lba > header.last_usable_lba
        {
            return Err(format!(
                "GPT partition {n} (LBA {}..={}) is outside the usable LBAs {}..={}",
                e.starting_lba, e.ending_lba, header.first_usable_lba, header.last_usable_lba
            ));
        }
        parts.push(Part {
            index: n as u32,
            start: e.starting_lba * ss,
            len: (e.ending_lba - e.starting_lba + 1) * ss,
        });
    }
    no_overlap(&mut parts, "GPT")?;
    Ok((header, parts))
}

/// Checks the header fields gptman trusts, then reads the entry array (and checks its CRC).
pub(crate) fn gpt_entries<R: std::io::Read + Seek>(
    reader: &mut R,
    header: &GPTHeader,
    ss: u64,
    disk_sectors: u64,
) -> Result<Vec<GPTPartitionEntry>, String> {
    let n = header.number_of_partition_entries;
    if header.size_of_partition_entry != 128 || n == 0 || n > MAX_GPT_ENTRIES {
        return Err(format!(
            "unsupported GPT entry array: {n} entries of {} bytes",
            header.size_of_partition_entry
        ));
    }
    let array_sectors = (u64::from(n) * 128).div_ceil(ss);
    let array_ok = header
        .partition_entry_lba
        .checked_add(array_sectors)
        .is_some_and(|end| header.partition_entry_lba >= 2 && end <= disk_sectors);
    if !array_ok
        || header.last_usable_lba >= disk_sectors
        || header.first_usable_lba > header.last_usable_lba.saturating_add(1)
        || header.first_usable_lba < 2
    {
        return Err(format!(
            "GPT header fields out of the disk's {disk_sectors} sectors: entries at LBA {}, usable LBAs {}..={}",
            header.partition_entry_lba, header.first_usable_lba, header.last_usable_lba
        ));
    }
    header
        .read_partitions(reader, ss)
        .map_err(|e| format!("the GPT entries: {e}"))
}

fn gpt_backup_warning<D: ReadAt + ?Sized>(
    whole: &Area<'_, D>,
    ss: u64,
    header: &GPTHeader,
) -> Option<String> {
    let at = header.backup_lba.checked_mul(ss)?;
    let mut cursor = whole.cursor();
    let _ = cursor.seek(SeekFrom::Start(at));
    match GPTHeader::read_from(&mut cursor) {
        Ok(_) => None,
        Err(e) => Some(format!(
            "the backup GPT header at LBA {} is not valid ({e})",
            header.backup_lba
        )),
    }
}

/// Sorts by start and refuses overlaps.
fn no_overlap(parts: &mut [Part], table: &str) -> Result<(), String> {
    parts.sort_by_key(|p| p.start);
    for w in parts.windows(2) {
        if let [a, b] = w {
            if a.start + a.len > b.start {
                return Err(format!(
                    "{table} partitions {} and {} overlap",
                    a.index, b.index
                ));
            }
        }
    }
    Ok(())
}

/// The primary and logical partitions of an MBR, or why they cannot be trusted.
fn mbr_partitions<D: ReadAt + ?Sized>(
    whole: &Area<'_, D>,
    header: &mbrman::MBRHeader,
) -> Result<Vec<Part>, String> {
    let sectors = whole.len / MBR_SECTOR;
    let mut primaries = Vec::new();
    let mut extended = None;
    for (i, e) in header.iter() {
        if e.is_unused() {
            continue;
        }
        let start = u64::from(e.starting_lba);
        let end = start + u64::from(e.sectors);
        if start == 0 || e.sectors == 0 || end > sectors {
            return Err(format!(
                "MBR partition {i} (sectors {start}..{end}) is empty or outside the disk's {sectors} sectors"
            ));
        }
        let part = Part {
            index: i as u32,
            start: start * MBR_SECTOR,
            len: u64::from(e.sectors) * MBR_SECTOR,
        };
        if e.is_extended() {
            if extended.is_some() {
                return Err("two extended partitions in the MBR".into());
            }
            extended = Some(part.clone());
        }
        primaries.push(part);
    }
    no_overlap(&mut primaries, "MBR")?;
    let mut parts: Vec<Part> = match &extended {
        Some(x) => primaries
            .into_iter()
            .filter(|p| p.index != x.index)
            .collect(),
        None => primaries,
    };
    if let Some(x) = extended {
        let mut logical = logical_partitions(whole, &x)?;
        no_overlap(&mut logical, "logical")?;
        parts.extend(logical);
        parts.sort_by_key(|p| p.start);
    }
    Ok(parts)
}

/// Walks the EBR chain of the extended partition `x`.
fn logical_partitions<D: ReadAt + ?Sized>(
    whole: &Area<'_, D>,
    x: &Part,
) -> Result<Vec<Part>, String> {
    let ext_start = x.start / MBR_SECTOR;
    let ext_sectors = x.len / MBR_SECTOR;
    let mut parts = Vec::new();
    let mut rel = 0u64;
    loop {
        if parts.len() >= MAX_LOGICAL {
            return Err(format!("more than {MAX_LOGICAL} logical partitions"));
        }
        if rel >= ext_sectors {
            return Err(format!(
                "an EBR at sector {} is outside the extended partition",
                ext_start + rel
            ));
        }
        let ebr_lba = ext_start + rel;
        let mut sector = [0u8; MBR_SECTOR as usize];
        whole
            .read("EBR", ebr_lba * MBR_SECTOR, &mut sector)
            .map_err(|e| diskcast_proto::error_chain(&e))?;
        let ebr = match mbrman::MBRHeader::read_from(&mut Cursor::new(&sector[..])) {
            Ok(ebr) => ebr,
            // An empty extended partition need not hold an EBR (as in mbrman).
            Err(_) if rel == 0 && sector.iter().all(|&b| b == 0) => break,
            Err(e) => return Err(format!("the EBR at sector {ebr_lba}: {e}")),
        };
        let (first, link) = (&ebr.partition_1, &ebr.partition_2);
        if first.is_used() && first.sectors > 0 {
            let start = ebr_lba + u64::from(first.starting_lba);
            let end = start + u64::from(first.sectors);
            if first.starting_lba == 0 || end > ext_start + ext_sectors {
                return Err(format!(
                    "logical partition {} (sectors {start}..{end}) is outside the extended partition",
                    parts.len() + 5
                ));
            }
            parts.push(Part {
                index: (parts.len() + 5) as u32,
                start: start * MBR_SECTOR,
                len: u64::from(first.sectors) * MBR_SECTOR,
            });
        }
        if link.is_unused() || link.starting_lba == 0 {
            break;
        }
        let next = u64::from(link.starting_lba);
        if !link.is_extended() || next <= rel {
            return Err(format!(
                "the EBR at sector {ebr_lba} links to sector {} (type {:#x})",
                ext_start + next,
                link.sys
            ));
        }
        rel = next;
    }
    Ok(parts)
}
