//! Which file system a partition holds, and its used map.

use crate::io::{Area, ReadAt};
use crate::map::{RangeBuilder, UsedMap};
use crate::{ext, fat, ntfs_fs, swap, FsKind, FsmapError, Options};

/// Every file system whose signature the area carries (more than one: ambiguous).
pub(crate) fn probe<D: ReadAt + ?Sized>(area: &Area<'_, D>) -> Vec<FsKind> {
    let mut found = Vec::new();
    let mut head = vec![0u8; usize::try_from(area.len.min(4096)).unwrap_or(0)];
    if area.read("file system signature", 0, &mut head).is_err() || head.len() < 512 {
        return found;
    }
    if let Some(sb) = head.get(1024..2048) {
        if ext::probe(sb) {
            found.push(ext::kind(sb));
        }
    }
    if ntfs_fs::probe(&head) {
        found.push(FsKind::Ntfs);
    }
    if head.get(..4) == Some(b"XFSB") {
        found.push(FsKind::Xfs);
    }
    if swap::probe(area).is_some() {
        found.push(FsKind::Swap);
    }
    if let Some(kind) = fat::probe(&head) {
        found.push(kind);
    }
    found
}

/// The file system of `area` and, unless something forbids it, its used ranges (absolute);
/// `notes` gets remarks that do not prevent mapping (a forced unclean file system).
pub(crate) fn map<D: ReadAt + ?Sized>(
    area: Area<'_, D>,
    opts: &Options,
    notes: &mut Vec<String>,
) -> (FsKind, Result<UsedMap, FsmapError>) {
    let found = probe(&area);
    let kind = match found.as_slice() {
        [] => {
            return (
                FsKind::Unknown,
                Err(FsmapError::unsupported("file system", "none recognised")),
            )
        }
        [kind] => *kind,
        many => {
            let names: Vec<String> = many.iter().map(ToString::to_string).collect();
            return (
                FsKind::Unknown,
                Err(FsmapError::corrupt(
                    "file system",
                    format!("ambiguous signatures: {}", names.join(", ")),
                )),
            );
        }
    };
    let mut out = RangeBuilder::new(opts.merge_gap);
    let result = match kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => ext::map(area, opts, notes, &mut out),
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => fat::map(area, opts, notes, &mut out),
        FsKind::Ntfs => ntfs_fs::map(area, opts, notes, &mut out),
        FsKind::Swap => swap::map(area, &mut out),
        FsKind::Xfs => Err(FsmapError::unsupported(
            "file system",
            "XFS is not interpreted",
        )),
        FsKind::Unknown => Err(FsmapError::unsupported("file system", "none recognised")),
    };
    (kind, result.map(|()| out.finish()))
}
