//! FAT12/16/32: BPB and the first FAT.
//!
//! Our own small reader: the `fatfs` crate (0.3.6, already a workspace dependency) offers files
//! and directories over `Read + Write + Seek`, but neither the BPB's fields nor the FAT's entries,
//! which are all that is needed here.
//!
//! Used: the reserved sectors (boot sector, FSInfo, backup boot sector), every FAT, the root
//! directory region (FAT12/16), every cluster whose entry in the first FAT is not 0 (allocated,
//! end of chain, bad or reserved), and whatever lies after the last whole cluster.
//! Refused (whole partition) unless forced: the dirty flag of the boot sector or a cleared
//! "clean shutdown" bit in FAT entry 1.

use crate::io::{le16, le32, Area, ReadAt};
use crate::map::RangeBuilder;
use crate::{FsKind, FsmapError, Options};

/// The largest part of the FAT read at once.
const BATCH_BYTES: u64 = 1 << 20;

#[derive(Debug)]
struct Bpb {
    kind: FsKind,
    cluster_bytes: u64,
    fats_start: u64,
    fat_bytes: u64,
    /// First byte of cluster 2.
    data_start: u64,
    clusters: u64,
    /// Total size in bytes.
    size: u64,
    dirty: bool,
}

/// The FAT flavour if `boot` (the first 512 bytes) holds a plausible FAT boot sector and BPB.
pub(crate) fn probe(boot: &[u8]) -> Option<FsKind> {
    parse(boot).ok().map(|b| b.kind)
}

fn parse(b: &[u8]) -> Result<Bpb, FsmapError> {
    let bad = |detail: String| FsmapError::corrupt("FAT boot sector", detail);
    if b.len() < 512 || le16(b, 510) != 0xAA55 || !matches!(b.first(), Some(0xEB | 0xE9)) {
        return Err(bad("no boot signature or jump".into()));
    }
    let bps = u64::from(le16(b, 0x0B));
    let spc = u64::from(b.get(0x0D).copied().unwrap_or(0));
    let reserved = u64::from(le16(b, 0x0E));
    let fats = u64::from(b.get(0x10).copied().unwrap_or(0));
    let root_entries = u64::from(le16(b, 0x11));
    let total = match le16(b, 0x13) {
        0 => u64::from(le32(b, 0x20)),
        n => u64::from(n),
    };
    let media = b.get(0x15).copied().unwrap_or(0);
    let fat_sectors = match le16(b, 0x16) {
        0 => u64::from(le32(b, 0x24)),
        n => u64::from(n),
    };
    if !matches!(bps, 512 | 1024 | 2048 | 4096)
        || !spc.is_power_of_two()
        || spc > 128
        || reserved == 0
        || !(1..=4).contains(&fats)
        || !(media == 0xF0 || media >= 0xF8)
        || fat_sectors == 0
        || total == 0
    {
        return Err(bad(format!(
            "BPB: {bps} bytes/sector, {spc} sectors/cluster, {reserved} reserved, {fats} FATs, media {media:#x}"
        )));
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let data_sector = reserved + fats * fat_sectors + root_sectors;
    if data_sector >= total {
        return Err(bad(format!(
            "data starts at sector {data_sector} of {total}"
        )));
    }
    let clusters = (total - data_sector) / spc;
    let kind = match clusters {
        0..4085 => FsKind::Fat12,
        4085..65525 => FsKind::Fat16,
        _ => FsKind::Fat32,
    };
    let fat32 = kind == FsKind::Fat32;
    if fat32 != (root_entries == 0) || (fat32 && le16(b, 0x16) != 0) {
        return Err(bad(format!(
            "{root_entries} root entries with {clusters} clusters"
        )));
    }
    let entry_bits = match kind {
        FsKind::Fat12 => 12,
        FsKind::Fat16 => 16,
        _ => 32,
    };
    let fat_bytes = fat_sectors * bps;
    if fat_bytes * 8 / entry_bits < clusters + 2 {
        return Err(bad(format!(
            "a FAT of {fat_sectors} sectors is too small for {clusters} clusters"
        )));
    }
    let dirty_at = if fat32 { 0x41 } else { 0x25 };
    Ok(Bpb {
        kind,
        cluster_bytes: spc * bps,
        fats_start: reserved * bps,
        fat_bytes: (fats * fat_sectors) * bps,
        data_start: data_sector * bps,
        clusters,
        size: total * bps,
        dirty: b.get(dirty_at).is_some_and(|f| f & 1 == 1),
    })
}

/// Maps the used clusters of the FAT file system filling `area` into `out` (absolute offsets).
pub(crate) fn map<D: ReadAt + ?Sized>(
    area: Area<'_, D>,
    opts: &Options,
    notes: &mut Vec<String>,
    out: &mut RangeBuilder,
) -> Result<(), FsmapError> {
    let boot = area.read_vec("FAT boot sector", 0, 512)?;
    let bpb = parse(&boot)?;
    if bpb.size > area.len {
        return Err(FsmapError::OutOfBounds {
            what: "FAT file system",
            offset: area.start,
            len: bpb.size,
            limit: area.start.saturating_add(area.len),
        });
    }
    let fat = area.sub("FAT", bpb.fats_start, bpb.fat_bytes)?;
    let entries = bpb.clusters + 2;
    let (entry_num, entry_den) = match bpb.kind {
        FsKind::Fat12 => (3, 2),
        FsKind::Fat16 => (2, 1),
        _ => (4, 1),
    };

    let mut dirty = Vec::new();
    if bpb.dirty {
        dirty.push("the boot sector's dirty flag is set");
    }
    let mut first = [0u8; 8];
    fat.read("FAT", 0, &mut first)?;
    let clean_bit = match bpb.kind {
        FsKind::Fat16 => u32::from(le16(&first, 2)) & 0x8000,
        FsKind::Fat32 => le32(&first, 4) & 0x0800_0000,
        _ => 1,
    };
    if clean_bit == 0 {
        dirty.push("FAT entry 1 says it was not shut down cleanly");
    }
    if !dirty.is_empty() {
        let detail = format!("FAT: {}", dirty.join(", "));
        if !opts.force_unclean {
            return Err(FsmapError::Unclean { detail });
        }
        notes.push(format!("{detail}; mapped anyway (forced)"));
    }

    // Boot sector, reserved sectors, FATs, root directory.
    out.add(area.start, area.start + bpb.data_start);
    let cluster_at = |c: u64| area.start + bpb.data_start + (c - 2) * bpb.cluster_bytes;
    // Whole batches of entries (even counts, so FAT12 pairs never straddle two batches).
    let per_batch = BATCH_BYTES / entry_num * entry_den;
    let mut e = 0u64;
    while e < entries {
        let n = (entries - e).min(per_batch);
        let offset = e * entry_num / entry_den;
        let len = (n * entry_num).div_ceil(entry_den);
        let buf = fat.read_vec("FAT", offset, len)?;
        for i in 0..n {
            let c = e + i;
            if c < 2 {
                continue;
            }
            let at = (i * entry_num / entry_den) as usize;
            let value = match bpb.kind {
                FsKind::Fat12 => {
                    let v = le16(&buf, at);
                    u32::from(if c % 2 == 1 { v >> 4 } else { v & 0xFFF })
                }
                FsKind::Fat16 => u32::from(le16(&buf, at)),
                _ => le32(&buf, at) & 0x0FFF_FFFF,
            };
            if value != 0 {
                out.add(cluster_at(c), cluster_at(c + 1));
            }
        }
        e += n;
    }
    // A partial cluster at the end, and anything after the file system.
    out.add(cluster_at(entries), area.start + area.len);
    Ok(())
}
