//! Used maps of real file systems made by Debian's tools: ext2/3/4, FAT12/16/32, NTFS, swap, on
//! whole images and in GPT and MBR partition tables. Each checks the map against the file
//! system's own tool, that deleted garbage is not mapped, and that the file system still checks
//! clean and its files read back when every unused chunk is overwritten.
#![allow(clippy::unwrap_used)]

mod common;

use common::build::*;
use common::*;
use diskcast_fsmap::{FsKind, Options, TableKind, WhyWhole};

/// A whole-image ("superfloppy") file system: map, then every check.
fn superfloppy(built: &Built, want: FsKind) {
    let dir = TempDir::new("sf");
    let (exact_map, report) = map(&built.path, &exact());
    let (default_map, _) = map(&built.path, &Options::default());
    assert_eq!(report.table, TableKind::None, "{report:?}");
    assert_eq!(report.partitions.len(), 1, "{report:?}");
    assert_eq!(report.partitions[0].fs, want, "{report:?}");
    assert_eq!(report.partitions[0].whole, None, "{report:?}");
    assert!(report.warnings.is_empty(), "{report:?}");
    let copy = dir.path("copy.img");
    copy_used_only(&built.path, &default_map, &copy);
    check(&dir, built, &built.path, 0, &exact_map, &default_map, &copy);
}

/// The test covers groups whose bitmap is not initialised (and one with a superblock backup).
fn assert_block_uninit(b: &Built) {
    let out = run("dumpe2fs", &[b.path.to_str().unwrap()]);
    let uninit: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("Group") && l.contains("BLOCK_UNINIT"))
        .collect();
    assert!(
        uninit.iter().any(|l| l.starts_with("Group 5:")),
        "no BLOCK_UNINIT group 5 in:\n{out}"
    );
}

#[test]
fn ext4_default_metadata_csum_flex_bg() {
    let dir = TempDir::new("ext4");
    let b = build_ext(&dir, "ext4", 64 * MIB, "mkfs.ext4", &[], 20 << 20);
    assert_block_uninit(&b);
    superfloppy(&b, FsKind::Ext4);
}

#[test]
fn ext4_without_flex_bg() {
    let dir = TempDir::new("ext4noflex");
    let b = build_ext(
        &dir,
        "ext4-noflex",
        64 * MIB,
        "mkfs.ext4",
        &["-O", "^flex_bg"],
        20 << 20,
    );
    superfloppy(&b, FsKind::Ext4);
}

#[test]
fn ext4_uninit_bg_crc16_descriptors() {
    let dir = TempDir::new("ext4uninit");
    let b = build_ext(
        &dir,
        "ext4-uninit",
        64 * MIB,
        "mkfs.ext4",
        &["-O", "^metadata_csum,uninit_bg"],
        20 << 20,
    );
    assert_block_uninit(&b);
    superfloppy(&b, FsKind::Ext4);
}

#[test]
fn ext4_64bit_4k_blocks_meta_bg() {
    let dir = TempDir::new("ext4meta");
    let b = build_ext(
        &dir,
        "ext4-meta",
        96 * MIB,
        "mkfs.ext4",
        &[
            "-b",
            "4096",
            "-g",
            "4096",
            "-O",
            "64bit,meta_bg,^resize_inode",
        ],
        20 << 20,
    );
    superfloppy(&b, FsKind::Ext4);
}

#[test]
fn ext2_and_ext3() {
    let dir = TempDir::new("ext23");
    let b = build_ext(&dir, "ext2", 32 * MIB, "mkfs.ext2", &[], 10 << 20);
    superfloppy(&b, FsKind::Ext2);
    let b = build_ext(&dir, "ext3", 48 * MIB, "mkfs.ext3", &[], 10 << 20);
    superfloppy(&b, FsKind::Ext3);
}

#[test]
fn fat12_fat16_fat32() {
    let dir = TempDir::new("fat");
    let b = build_fat(&dir, "fat12", 8 * MIB, &["-F", "12"], 4 << 20);
    superfloppy(&b, FsKind::Fat12);
    let b = build_fat(&dir, "fat16", 48 * MIB, &["-F", "16"], 20 << 20);
    superfloppy(&b, FsKind::Fat16);
    let b = build_fat(
        &dir,
        "fat32",
        64 * MIB,
        &["-F", "32", "-s", "1", "-S", "512"],
        20 << 20,
    );
    superfloppy(&b, FsKind::Fat32);
}

#[test]
fn ntfs_with_files() {
    let dir = TempDir::new("ntfs");
    let b = build_ntfs(&dir, "ntfs", 64 * MIB, 20 << 20, true);
    superfloppy(&b, FsKind::Ntfs);
}

#[test]
fn swap_first_page_only() {
    let dir = TempDir::new("swap");
    let b = build_swap(&dir, "swap", 16 * MIB);
    superfloppy(&b, FsKind::Swap);
    let (m, _) = map(&b.path, &exact());
    assert_eq!(m.used_bytes(), 4096);
}

#[test]
fn unclean_ext4_is_copied_whole_unless_forced() {
    let dir = TempDir::new("unclean");
    let b = build_ext(&dir, "unclean", 32 * MIB, "mkfs.ext4", &[], 8 << 20);
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            "feature needs_recovery",
            b.path.to_str().unwrap(),
        ],
    );
    let (m, report) = map(&b.path, &exact());
    assert_eq!(m.used_bytes(), 32 * MIB);
    assert_eq!(
        report.partitions[0].whole,
        Some(WhyWhole::Unclean),
        "{report:?}"
    );
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("journal needs recovery")),
        "{report:?}"
    );

    let forced = Options {
        force_unclean: true,
        ..exact()
    };
    let (m, report) = map(&b.path, &forced);
    assert_eq!(report.partitions[0].whole, None, "{report:?}");
    assert!(m.used_bytes() < 16 * MIB, "{report:?}");
    assert!(
        report.warnings.iter().any(|w| w.contains("forced")),
        "{report:?}"
    );
}

/// Sets the dirty flag in $Volume's VOLUME_INFORMATION (found with the ntfs crate).
fn set_ntfs_dirty(path: &Path) {
    use ntfs::{
        structured_values::NtfsVolumeFlags, KnownNtfsFileRecordNumber, Ntfs, NtfsAttributeType,
    };
    let mut f = File::open(path).unwrap();
    let ntfs = Ntfs::new(&mut f).unwrap();
    let volume = ntfs
        .file(&mut f, KnownNtfsFileRecordNumber::Volume as u64)
        .unwrap();
    let mut attributes = volume.attributes();
    let mut at = None;
    while let Some(item) = attributes.next(&mut f) {
        let item = item.unwrap();
        let attribute = item.to_attribute().unwrap();
        if attribute.ty().unwrap() == NtfsAttributeType::VolumeInformation {
            at = attribute.position().value().map(|p| p.get());
        }
    }
    // The resident value's offset is at 0x14 of the attribute header; the flags at 10 of it.
    let at = at.unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut offset = [0u8; 2];
    f.read_exact_at(&mut offset, at + 0x14).unwrap();
    let flags_at = at + u64::from(u16::from_le_bytes(offset)) + 10;
    let mut flags = [0u8; 2];
    f.read_exact_at(&mut flags, flags_at).unwrap();
    let dirty = u16::from_le_bytes(flags) | NtfsVolumeFlags::IS_DIRTY.bits();
    f.write_all_at(&dirty.to_le_bytes(), flags_at).unwrap();
}

#[test]
fn dirty_ntfs_and_fat_are_copied_whole_unless_forced() {
    let dir = TempDir::new("dirty");
    let ntfs = build_ntfs(&dir, "ntfs", 16 * MIB, 0, false);
    let fat = build_fat(&dir, "fat", 16 * MIB, &["-F", "16"], 1 << 20);
    set_ntfs_dirty(&ntfs.path);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fat.path)
        .unwrap();
    f.write_all_at(&[1], 0x25).unwrap();
    for (b, word) in [(&ntfs, "volume is marked dirty"), (&fat, "dirty flag")] {
        let (m, report) = map(&b.path, &exact());
        assert_eq!(
            report.partitions[0].whole,
            Some(WhyWhole::Unclean),
            "{report:?}"
        );
        assert_eq!(m.used_bytes(), b.size);
        assert!(
            report.warnings.iter().any(|w| w.contains(word)),
            "{report:?}"
        );
        let (m, report) = map(
            &b.path,
            &Options {
                force_unclean: true,
                ..exact()
            },
        );
        assert_eq!(report.partitions[0].whole, None, "{report:?}");
        assert!(m.used_bytes() < b.size / 2, "{report:?}");
    }
}
