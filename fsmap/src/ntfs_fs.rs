//! NTFS: the cluster bitmap ($Bitmap), read with the `ntfs` crate.
//!
//! Used: every cluster $Bitmap marks (it covers the boot sector, $MFT, $MFTMirr, $LogFile and
//! all other metadata), and everything after the last cluster (the backup boot sector lives in
//! the partition's last sector, outside the volume). Refused (whole partition) unless forced:
//! $Volume's dirty flag.

use crate::io::{le16, Area, ReadAt};
use crate::map::{add_bitmap, RangeBuilder};
use crate::{FsmapError, Options};
use ntfs::structured_values::NtfsVolumeFlags;
use ntfs::{KnownNtfsFileRecordNumber, Ntfs};
use std::io::Read;

/// The largest part of $Bitmap read at once.
const BATCH_BYTES: u64 = 1 << 20;

/// Whether `boot` (the first sector) carries the NTFS OEM id.
pub(crate) fn probe(boot: &[u8]) -> bool {
    boot.get(3..11) == Some(b"NTFS    ")
}

/// The ntfs crate allocates a file (and index) record as large as the boot sector says, up to
/// 2 MiB × 127: refuse records over 64 KiB (real volumes use 1 KiB or 4 KiB) before it does.
fn check_record_sizes(boot: &[u8]) -> Result<(), FsmapError> {
    let sector = u64::from(le16(boot, 0x0B));
    let per_cluster = u64::from(boot.get(0x0D).copied().unwrap_or(0));
    // From 0xF4 (-12) on, a negative exponent: 2^n sectors per cluster.
    let cluster = if per_cluster > 0x80 {
        sector << (256 - per_cluster).min(20)
    } else {
        sector * per_cluster
    };
    for (what, at) in [("file record", 0x40), ("index record", 0x44)] {
        let info = boot.get(at).copied().unwrap_or(0) as i8;
        let size = if info > 0 {
            cluster * info as u64
        } else {
            1u64 << u32::from(info.unsigned_abs()).min(40)
        };
        if !(256..=65536).contains(&size) {
            return Err(FsmapError::unsupported(
                "NTFS boot sector",
                format!("{what} size {size}"),
            ));
        }
    }
    Ok(())
}

fn err(op: &'static str) -> impl FnOnce(ntfs::NtfsError) -> FsmapError {
    move |source| FsmapError::Ntfs { op, source }
}

/// Maps the used clusters of the NTFS volume filling `area` into `out` (absolute offsets).
pub(crate) fn map<D: ReadAt + ?Sized>(
    area: Area<'_, D>,
    opts: &Options,
    notes: &mut Vec<String>,
    out: &mut RangeBuilder,
) -> Result<(), FsmapError> {
    let mut boot = [0u8; 512];
    area.read("NTFS boot sector", 0, &mut boot)?;
    check_record_sizes(&boot)?;
    let mut fs = area.cursor();
    let ntfs = Ntfs::new(&mut fs).map_err(err("reading the boot sector"))?;
    let size = ntfs.size();
    if size > area.len {
        return Err(FsmapError::OutOfBounds {
            what: "NTFS volume",
            offset: area.start,
            len: size,
            limit: area.start.saturating_add(area.len),
        });
    }
    let cluster = u64::from(ntfs.cluster_size());
    if cluster == 0 {
        return Err(FsmapError::corrupt("NTFS boot sector", "cluster size 0"));
    }
    let clusters = size / cluster;

    let info = ntfs.volume_info(&mut fs).map_err(err("reading $Volume"))?;
    if info.flags().contains(NtfsVolumeFlags::IS_DIRTY) {
        let detail = "NTFS: the volume is marked dirty".to_string();
        if !opts.force_unclean {
            return Err(FsmapError::Unclean { detail });
        }
        notes.push(format!("{detail}; mapped anyway (forced)"));
    }

    let file = ntfs
        .file(&mut fs, KnownNtfsFileRecordNumber::Bitmap as u64)
        .map_err(err("reading the $Bitmap file record"))?;
    let item = file
        .data(&mut fs, "")
        .ok_or_else(|| FsmapError::corrupt("NTFS $Bitmap", "no data attribute"))?
        .map_err(err("finding $Bitmap's data"))?;
    let attribute = item
        .to_attribute()
        .map_err(err("reading $Bitmap's data attribute"))?;
    let value = attribute
        .value(&mut fs)
        .map_err(err("reading $Bitmap's data"))?;
    // Only the bits of existing clusters are read; a shorter bitmap leaves the rest used.
    let have = value.len().min(clusters.div_ceil(8));
    let mut reader = value.attach(&mut fs);
    let mut buf = vec![0u8; usize::try_from(BATCH_BYTES.min(have)).unwrap_or(0)];
    let mut done = 0u64;
    while done < have {
        let n = (have - done).min(BATCH_BYTES);
        let chunk = buf.get_mut(..n as usize).unwrap_or_default();
        reader
            .read_exact(chunk)
            .map_err(|source| FsmapError::Ntfs {
                op: "reading $Bitmap",
                source: ntfs::NtfsError::Io(source),
            })?;
        let first_bit = done * 8;
        let bits = (n * 8).min(clusters - first_bit);
        add_bitmap(chunk, bits, area.start + first_bit * cluster, cluster, out);
        done += n;
    }
    // Clusters the bitmap is too short for, the rest of the volume, and what follows it.
    out.add(
        area.start + (have * 8).min(clusters) * cluster,
        area.start + area.len,
    );
    Ok(())
}
