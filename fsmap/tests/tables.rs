//! Partition tables: GPT and MBR (with logical partitions) holding real file systems, damaged
//! tables, and fitting a GPT to a larger disk.
#![allow(clippy::unwrap_used)]

mod common;

use common::build::*;
use common::*;
use diskcast_fsmap::{fit_gpt_to_disk, FsKind, FsmapError, GptFix, Options, TableKind};
use std::fs::{File, OpenOptions};

const SECTOR: u64 = 512;

/// A disk of `size` bytes full of garbage, partitioned by sfdisk with `script`.
fn disk(dir: &TempDir, name: &str, size: u64, script: &str) -> PathBuf {
    need("sfdisk", "fdisk");
    let path = dir.path(name);
    write_file(&path, &garbage(size as usize, 7));
    let script_path = dir.path(&format!("{name}.sfdisk"));
    write_file(&script_path, script.as_bytes());
    sh(&format!(
        "sfdisk --no-reread --no-tell-kernel -q {} < {}",
        path.display(),
        script_path.display()
    ));
    path
}

/// Every garbage block outside the partitions must be used.
fn assert_outside_used(disk: &Path, map: &diskcast_fsmap::UsedMap, parts: &[(u64, u64)]) {
    let data = fs::read(disk).unwrap();
    let mut outside = 0;
    for at in (0..data.len() - 16).step_by(512) {
        let at64 = at as u64;
        if &data[at..at + 16] == MARK && !parts.iter().any(|&(s, l)| at64 >= s && at64 < s + l) {
            outside += 1;
            assert!(
                map.overlaps(at64..at64 + 512),
                "garbage outside the partitions at byte {at} is not used"
            );
        }
    }
    assert!(
        outside > 100,
        "only {outside} garbage blocks outside the partitions"
    );
}

fn check_disk(dir: &TempDir, disk: &Path, table: TableKind, parts: &[(u32, u64, &Built, FsKind)]) {
    let (exact_map, report) = map(disk, &exact());
    let (default_map, _) = map(disk, &Options::default());
    assert_eq!(report.table, table, "{report:?}");
    let got: Vec<(u32, u64, u64, FsKind)> = report
        .partitions
        .iter()
        .map(|p| (p.index, p.start, p.len, p.fs))
        .collect();
    let want: Vec<(u32, u64, u64, FsKind)> = parts
        .iter()
        .map(|&(i, s, b, k)| (i, s, b.size, k))
        .collect();
    assert_eq!(got, want, "{report:?}");
    assert!(
        report.partitions.iter().all(|p| p.whole.is_none()),
        "{report:?}"
    );
    assert!(report.warnings.is_empty(), "{report:?}");
    let spans: Vec<(u64, u64)> = parts.iter().map(|&(_, s, b, _)| (s, b.size)).collect();
    assert_outside_used(disk, &exact_map, &spans);
    assert!(exact_map.overlaps(0..MIB));
    let copy = dir.path("copy.img");
    copy_used_only(disk, &default_map, &copy);
    for &(_, start, built, _) in parts {
        check(dir, built, disk, start, &exact_map, &default_map, &copy);
    }
}

#[test]
fn gpt_with_ext4_fat16_ntfs_swap() {
    let dir = TempDir::new("gpt");
    let ext = build_ext(&dir, "p1-ext4", 48 * MIB, "mkfs.ext4", &[], 16 << 20);
    let fat = build_fat(&dir, "p2-fat16", 24 * MIB, &["-F", "16"], 8 << 20);
    let ntfs = build_ntfs(&dir, "p3-ntfs", 32 * MIB, 0, false);
    let swap = build_swap(&dir, "p4-swap", 8 * MIB);
    let path = disk(
        &dir,
        "gpt.img",
        160 * MIB,
        "label: gpt\n\
         start=2048, size=98304, type=L\n\
         start=100352, size=49152, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n\
         start=149504, size=65536, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n\
         start=217088, size=16384, type=S\n",
    );
    let parts = [
        (1, 2048 * SECTOR, &ext, FsKind::Ext4),
        (2, 100352 * SECTOR, &fat, FsKind::Fat16),
        (3, 149504 * SECTOR, &ntfs, FsKind::Ntfs),
        (4, 217088 * SECTOR, &swap, FsKind::Swap),
    ];
    for &(_, start, b, _) in &parts {
        put(&path, start, &b.path);
    }
    check_disk(&dir, &path, TableKind::Gpt, &parts);
}

#[test]
fn mbr_with_extended_and_logical_partitions() {
    let dir = TempDir::new("mbr");
    let fat = build_fat(&dir, "p1-fat16", 16 * MIB, &["-F", "16"], 6 << 20);
    let ext = build_ext(&dir, "p5-ext4", 24 * MIB, "mkfs.ext4", &[], 8 << 20);
    let swap = build_swap(&dir, "p6-swap", 4 * MIB);
    let path = disk(
        &dir,
        "mbr.img",
        64 * MIB,
        "label: dos\n\
         start=2048, size=32768, type=6\n\
         start=36864, size=69632, type=5\n\
         start=38912, size=49152, type=83\n\
         start=90112, size=8192, type=82\n",
    );
    let parts = [
        (1, 2048 * SECTOR, &fat, FsKind::Fat16),
        (5, 38912 * SECTOR, &ext, FsKind::Ext4),
        (6, 90112 * SECTOR, &swap, FsKind::Swap),
    ];
    for &(_, start, b, _) in &parts {
        put(&path, start, &b.path);
    }
    check_disk(&dir, &path, TableKind::Mbr, &parts);
}

fn simple_gpt(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    disk(
        dir,
        name,
        size,
        "label: gpt\nstart=2048, size=40960, type=L\nstart=43008, size=40960, type=L\n",
    )
}

fn assert_whole_disk_damaged(path: &Path, what: &str) {
    let (m, report) = map(path, &exact());
    let size = fs::metadata(path).unwrap().len();
    assert_eq!(report.table, TableKind::Damaged, "{what}: {report:?}");
    assert_eq!(m.ranges(), std::slice::from_ref(&(0..size)), "{what}");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("damaged partition table")),
        "{what}: {report:?}"
    );
}

#[test]
fn damaged_gpt_is_copied_whole() {
    let dir = TempDir::new("damaged");
    // A flipped byte in the primary header: CRC mismatch.
    let path = simple_gpt(&dir, "crc.img", 64 * MIB);
    let (_, report) = map(&path, &exact());
    assert_eq!(report.table, TableKind::Gpt, "{report:?}");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 512 + 0x30).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], 512 + 0x30).unwrap();
    assert_whole_disk_damaged(&path, "bad header CRC");

    // Partitions past the end of a truncated image.
    let path = simple_gpt(&dir, "short.img", 64 * MIB);
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(30 * MIB)
        .unwrap();
    assert_whole_disk_damaged(&path, "partition past the end");

    // Overlapping partitions, with valid CRCs.
    let path = simple_gpt(&dir, "overlap.img", 64 * MIB);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.seek(SeekFrom::Start(512)).unwrap();
    let mut header = gptman::GPTHeader::read_from(&mut f).unwrap();
    let mut entries = header.read_partitions(&mut f, 512).unwrap();
    entries[1].starting_lba = 40000;
    header.write_into(&mut f, 512, &entries).unwrap();
    drop(f);
    assert_whole_disk_damaged(&path, "overlapping partitions");

    // A populated MBR beside a (stale) GPT.
    let gpt = disk(
        &dir,
        "stale.img",
        32 * MIB,
        "label: gpt\nstart=2048, size=20480, type=L\n",
    );
    let path = disk(
        &dir,
        "mixed.img",
        32 * MIB,
        "label: dos\nstart=2048, size=40960, type=83\n",
    );
    let mut sectors = vec![0u8; 33 * 512];
    File::open(&gpt)
        .unwrap()
        .read_exact_at(&mut sectors, 512)
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&sectors, 512)
        .unwrap();
    assert_whole_disk_damaged(&path, "MBR and GPT");

    // An MBR partition past the end of the disk.
    let path = disk(
        &dir,
        "mbr.img",
        32 * MIB,
        "label: dos\nstart=2048, size=40960, type=83\n",
    );
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    assert_whole_disk_damaged(&path, "MBR partition past the end");
}

#[test]
fn no_table_and_no_file_system_is_copied_whole() {
    let dir = TempDir::new("none");
    let path = dir.path("garbage.img");
    write_file(&path, &garbage(4 << 20, 3));
    let (m, report) = map(&path, &exact());
    assert_eq!(report.table, TableKind::None);
    assert_eq!(m.used_bytes(), 4 << 20);
    let (m, report) = diskcast_fsmap::used_map(&Vec::<u8>::new(), &Options::default()).unwrap();
    assert_eq!((m.used_bytes(), report.table), (0, TableKind::None));
}

fn sgdisk_clean(path: &Path) -> bool {
    let (_, out, err) = try_run("sgdisk", &["-v", path.to_str().unwrap()]);
    out.contains("No problems found") && !err.contains("Warning")
}

#[test]
fn fit_gpt_to_a_larger_disk() {
    need("sgdisk", "gdisk");
    let dir = TempDir::new("fit");
    let image = simple_gpt(&dir, "image.img", 64 * MIB);
    for grow in [false, true] {
        let path = dir.path(&format!("target-{grow}.img"));
        fs::copy(&image, &path).unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(96 * MIB).unwrap();
        assert!(
            !sgdisk_clean(&path),
            "sgdisk finds no problem before the fix"
        );
        let fix = fit_gpt_to_disk(&mut f, 64 * MIB, 96 * MIB, 512, grow).unwrap();
        drop(f);
        eprintln!("{fix}");
        let sectors = 96 * MIB / 512;
        let GptFix::Fitted {
            new_backup_lba,
            last_usable_lba,
            grown,
            protective_mbr,
            ..
        } = fix
        else {
            panic!("{fix:?}");
        };
        assert_eq!(new_backup_lba, sectors - 1);
        assert_eq!(last_usable_lba, sectors - 34);
        assert!(protective_mbr);
        assert_eq!(grown.is_some(), grow);
        let (ok, out, err) = try_run("sfdisk", &["--verify", path.to_str().unwrap()]);
        assert!(
            ok && out.contains("No errors detected") && err.is_empty(),
            "sfdisk --verify:\n{out}\n{err}"
        );
        assert!(
            sgdisk_clean(&path),
            "{}",
            run("sgdisk", &["-v", path.to_str().unwrap()])
        );
        let gpt = gptman::GPT::read_from(&mut File::open(&path).unwrap(), 512).unwrap();
        assert_eq!(gpt.header.last_usable_lba, sectors - 34);
        let last_end = gpt
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(_, p)| p.ending_lba)
            .max()
            .unwrap();
        if grow {
            assert_eq!(last_end, sectors - 34);
        } else {
            assert_eq!(last_end, 2048 + 2 * 40960 - 1);
        }
        // The protective MBR covers the new size.
        let mbr = fs::read(&path).unwrap();
        let count = u32::from_le_bytes(mbr[446 + 12..446 + 16].try_into().unwrap());
        assert_eq!(u64::from(count), sectors - 1);
        // The old backup header is gone from the middle of the disk.
        assert_ne!(&mbr[(64 * MIB - 512) as usize..][..8], b"EFI PART");
    }

    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    match fit_gpt_to_disk(&mut f, 64 * MIB, 32 * MIB, 512, false) {
        Err(e @ FsmapError::TargetTooSmall { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&(64 * MIB).to_string()) && text.contains(&(32 * MIB).to_string()),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    let mbr = disk(
        &dir,
        "mbr.img",
        16 * MIB,
        "label: dos\nstart=2048, size=8192, type=83\n",
    );
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mbr)
        .unwrap();
    assert_eq!(
        fit_gpt_to_disk(&mut f, 16 * MIB, 32 * MIB, 512, true).unwrap(),
        GptFix::NotGpt { mbr: true }
    );
}
