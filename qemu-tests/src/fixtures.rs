//! Disk images for the scenarios: a local disk that boots under both firmwares and says so.
//!
//! Built with sfdisk, mkfs.vfat, mtools, syslinux and grub-mkstandalone on an image file: no loop
//! devices, no mounts, no root. A missing tool is a test failure naming the Debian package.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the FAT32 partition starts, in 512-byte sectors (1 MiB).
pub const FIXTURE_PART_START: u64 = 2048;
/// The FAT label of [`make_bootable_disk`]'s partition.
pub const FIXTURE_LABEL: &str = "DCLOCAL";

const MBR_BIN: &str = "/usr/lib/syslinux/mbr/mbr.bin";
const GRUB_EFI_DIR: &str = "/usr/lib/grub/x86_64-efi";

/// Finds `tool` on PATH or in the sbin directories (not on a normal user's PATH); panics naming
/// the Debian package that provides it.
pub fn tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("{tool} is missing: install the Debian package {package} (scripts/setup)")
    })
}

fn need_file(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install the Debian package {package} (scripts/setup)"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The mtools image argument for the fixture's partition: `PATH@@OFFSET`.
pub fn fixture_fat(path: &Path) -> String {
    format!("{}@@{}", path.display(), FIXTURE_PART_START * 512)
}

/// Makes a raw disk image of `size_mib` MiB (at least 40) that prints `marker` on the serial
/// console when it boots, under SeaBIOS and under OVMF:
///
/// - an MBR with syslinux's boot code and one active FAT32 partition (type `c`, from 1 MiB,
///   labelled [`FIXTURE_LABEL`]);
/// - BIOS: syslinux in it, whose config says `marker`, shows `boot:` for a second and then reloads
///   itself (`DEFAULT again`, `LABEL again`, `CONFIG /syslinux.cfg`), so the marker comes again
///   every second. Once was not enough: twice a CI run's console lost the one line (never
///   reproduced here, not even with both cores busy; SeaBIOS's serial console renders
///   syslinux's screen lazily), and a `SERIAL` directive only adds a second writer on the same
///   port that interleaves with it;
/// - UEFI: `\EFI\BOOT\BOOTX64.EFI`, a standalone GRUB whose grub.cfg echoes `marker` on the
///   serial port and the console, then sleeps.
///
/// `marker` is one line of letters, digits, spaces and `-_.:=/`. Under OVMF it may show twice
/// (GRUB writes to the port and OVMF copies its console there too).
pub fn make_bootable_disk(path: &Path, size_mib: u64, marker: &str) {
    assert!(
        size_mib >= 40,
        "a FAT32 partition needs at least 40 MiB of disk"
    );
    assert!(
        !marker.trim().is_empty()
            && marker
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || " -_.:=/".contains(c)),
        "marker {marker:?}: use letters, digits, spaces and -_.:=/ only"
    );
    let sfdisk = tool("sfdisk", "fdisk");
    let mkfs = tool("mkfs.vfat", "dosfstools");
    let mcopy = tool("mcopy", "mtools");
    let mmd = tool("mmd", "mtools");
    let syslinux = tool("syslinux", "syslinux");
    let grub = tool("grub-mkstandalone", "grub-common");
    need_file(MBR_BIN, "syslinux-common");
    need_file(GRUB_EFI_DIR, "grub-efi-amd64-bin");

    let work = path.with_extension("fixture.d");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let _ = fs::remove_file(path);
    let file = fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.set_len(size_mib << 20).unwrap();

    let table = format!("label: dos\nstart={FIXTURE_PART_START}, type=c, bootable\n");
    let mut child = Command::new(&sfdisk)
        .arg("--quiet")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running sfdisk: {e}"));
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), table.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // syslinux's MBR code: the first 440 bytes, before the disk signature and the table.
    let mbr = fs::read(MBR_BIN).unwrap();
    file.write_all_at(&mbr[..440.min(mbr.len())], 0).unwrap();
    drop(file);

    let part_kib = (size_mib << 10) - FIXTURE_PART_START / 2;
    run(Command::new(&mkfs)
        .args(["-F", "32", "-s", "1", "-n", FIXTURE_LABEL, "--offset"])
        .arg(FIXTURE_PART_START.to_string())
        .arg(path)
        .arg(part_kib.to_string()));
    run(Command::new(&syslinux)
        .arg("--offset")
        .arg((FIXTURE_PART_START * 512).to_string())
        .arg("--install")
        .arg(path));

    let syslinux_cfg = work.join("syslinux.cfg");
    fs::write(
        &syslinux_cfg,
        format!(
            "SAY {marker}\nPROMPT 1\nTIMEOUT 10\nDEFAULT again\nLABEL again\n  CONFIG /syslinux.cfg\n"
        ),
    )
    .unwrap();
    let grub_cfg = work.join("grub.cfg");
    fs::write(
        &grub_cfg,
        format!(
            "serial --unit=0 --speed=115200\nterminal_output serial console\n\
             echo '{marker}'\nsleep 600\n"
        ),
    )
    .unwrap();
    let efi = work.join("BOOTX64.EFI");
    let modules = "normal echo sleep serial terminal";
    run(Command::new(&grub)
        .args(["-O", "x86_64-efi", "-o"])
        .arg(&efi)
        .arg(format!("--modules={modules}"))
        .arg(format!("--install-modules={modules}"))
        .args(["--locales=", "--fonts=", "--themes="])
        .arg(format!("boot/grub/grub.cfg={}", grub_cfg.display())));

    let fat = fixture_fat(path);
    run(Command::new(&mmd).args(["-i", &fat, "::/EFI", "::/EFI/BOOT"]));
    run(Command::new(&mcopy)
        .args(["-i", &fat])
        .arg(&efi)
        .arg("::/EFI/BOOT/BOOTX64.EFI"));
    run(Command::new(&mcopy)
        .args(["-i", &fat])
        .arg(&syslinux_cfg)
        .arg("::/syslinux.cfg"));
    let _ = fs::remove_dir_all(&work);
}

/// A file system of [`make_used_disk`]: where it lies and what it must keep.
#[derive(Debug, Clone)]
pub struct UsedPartition {
    pub kind: FsKind,
    /// Byte offset and length of the partition (and of its file system).
    pub start: u64,
    pub len: u64,
    /// Files in the root directory and the BLAKE3 hash of each one's bytes.
    pub files: Vec<(String, [u8; 32])>,
    /// Bytes of the files written, then deleted, whose garbage stays in free space.
    pub garbage: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Fat32,
    Ext4,
    Ntfs,
}

/// A GPT disk made by [`make_used_disk`].
#[derive(Debug, Clone)]
pub struct UsedDisk {
    pub size: u64,
    pub partitions: Vec<UsedPartition>,
}

impl UsedDisk {
    /// The bytes the file systems' own tools say are in use, plus everything outside the
    /// partitions (table, gaps, backup table): what a used-block copy must carry.
    pub fn tool_used_bytes(&self, disk: &Path) -> u64 {
        let work = disk.with_extension("used.d");
        fs::create_dir_all(&work).unwrap();
        let mut used = self.size - self.partitions.iter().map(|p| p.len).sum::<u64>();
        for (i, part) in self.partitions.iter().enumerate() {
            let image = work.join(format!("part{}.img", i + 1));
            extract(disk, part.start, part.len, &image);
            used += fs_tool_used(part.kind, &image);
        }
        let _ = fs::remove_dir_all(&work);
        used
    }
}

/// Incompressible bytes from a seed (xorshift).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

const MIB: u64 = 1 << 20;

/// Makes a used lab disk of `size_mib` MiB (at least 208): a GPT with a FAT32 EFI system
/// partition (40 MiB), an ext4 (96 MiB) and an NTFS (64 MiB) partition, each holding kept files
/// and the garbage of a large file written and deleted (as a used disk's free space holds).
/// Built on image files with mkfs.vfat/mtools, mkfs.ext4/debugfs and mkntfs/ntfs-3g (a FUSE
/// mount: root), then placed at their offsets.
pub fn make_used_disk(path: &Path, size_mib: u64, seed: u64) -> UsedDisk {
    assert!(size_mib >= 208, "the used disk needs at least 208 MiB");
    let layout = [
        (FsKind::Fat32, 40 * MIB, 8 * MIB, 24 * MIB),
        (FsKind::Ext4, 96 * MIB, 24 * MIB, 56 * MIB),
        (FsKind::Ntfs, 64 * MIB, 12 * MIB, 36 * MIB),
    ];
    let work = path.with_extension("fixture.d");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let _ = fs::remove_file(path);
    let disk = fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    disk.set_len(size_mib * MIB).unwrap();

    let mut table = String::from("label: gpt\n");
    let mut start = MIB;
    let mut partitions = Vec::new();
    for (n, &(kind, len, kept, garbage)) in layout.iter().enumerate() {
        let type_ = match kind {
            FsKind::Fat32 => "U",
            FsKind::Ext4 => "L",
            FsKind::Ntfs => "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        };
        table += &format!("start={}, size={}, type={type_}\n", start / 512, len / 512);
        let image = work.join(format!("part{}.img", n + 1));
        let files = build_fs(kind, &image, len, kept, garbage, seed + n as u64, &work);
        let bytes = fs::read(&image).unwrap();
        disk.write_all_at(&bytes, start).unwrap();
        partitions.push(UsedPartition {
            kind,
            start,
            len,
            files,
            garbage,
        });
        start += len;
    }
    drop(disk);
    sfdisk_write(path, &table);
    let _ = fs::remove_dir_all(&work);
    UsedDisk {
        size: size_mib * MIB,
        partitions,
    }
}

fn sfdisk_write(path: &Path, table: &str) {
    let mut child = Command::new(tool("sfdisk", "fdisk"))
        .arg("--quiet")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running sfdisk: {e}"));
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), table.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes one file system on `image`: three kept files of `kept` bytes in all, and a file of
/// `garbage` bytes written between them and deleted. Returns the kept files' names and hashes.
fn build_fs(
    kind: FsKind,
    image: &Path,
    len: u64,
    kept: u64,
    garbage: u64,
    seed: u64,
    work: &Path,
) -> Vec<(String, [u8; 32])> {
    let file = fs::File::create(image).unwrap();
    file.set_len(len).unwrap();
    drop(file);
    let sizes = [kept / 8, kept / 2, kept - kept / 8 - kept / 2];
    let files: Vec<(String, PathBuf, [u8; 32])> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let name = format!("keep{i}.bin");
            let data = random_bytes(size as usize, seed * 10 + i as u64);
            let path = work.join(format!(
                "{}-{name}",
                image.file_stem().unwrap().to_string_lossy()
            ));
            fs::write(&path, &data).unwrap();
            (name, path, *blake3::hash(&data).as_bytes())
        })
        .collect();
    let big = work.join("big.bin");
    fs::write(&big, random_bytes(garbage as usize, seed * 10 + 9)).unwrap();
    let img = image.to_str().unwrap();
    // Kept file 0, then the garbage, then the others: the garbage lies between used blocks.
    let order: Vec<(&str, &Path)> = std::iter::once((files[0].0.as_str(), files[0].1.as_path()))
        .chain(std::iter::once(("big.bin", big.as_path())))
        .chain(files[1..].iter().map(|(n, p, _)| (n.as_str(), p.as_path())))
        .collect();
    match kind {
        FsKind::Fat32 => {
            run(Command::new(tool("mkfs.vfat", "dosfstools"))
                .args(["-F", "32", "-s", "1", "-n", "DCESP"])
                .arg(img));
            for (name, src) in &order {
                run(Command::new(tool("mcopy", "mtools"))
                    .args(["-i", img])
                    .arg(src)
                    .arg(format!("::{name}")));
            }
            run(Command::new(tool("mdel", "mtools")).args(["-i", img, "::big.bin"]));
        }
        FsKind::Ext4 => {
            run(Command::new(tool("mkfs.ext4", "e2fsprogs"))
                .args(["-F", "-q", "-E", "nodiscard", "-L", "dcroot"])
                .arg(img));
            let mut cmds = String::new();
            for (name, src) in &order {
                cmds += &format!("write {} {name}\n", src.display());
            }
            cmds += "rm big.bin\n";
            let script = work.join("debugfs.cmds");
            fs::write(&script, cmds).unwrap();
            run(Command::new(tool("debugfs", "e2fsprogs"))
                .arg("-w")
                .arg("-f")
                .arg(&script)
                .arg(img));
        }
        FsKind::Ntfs => {
            run(Command::new(tool("mkntfs", "ntfs-3g"))
                .args(["-F", "-Q", "-q", "-L", "dcdata"])
                .arg(img));
            let mnt = work.join("mnt");
            fs::create_dir_all(&mnt).unwrap();
            run(Command::new(tool("ntfs-3g", "ntfs-3g")).arg(img).arg(&mnt));
            let copied = order
                .iter()
                .try_for_each(|(name, src)| fs::copy(src, mnt.join(name)).map(drop));
            run(Command::new("umount").arg(&mnt));
            copied.unwrap();
            run(Command::new(tool("ntfs-3g", "ntfs-3g")).arg(img).arg(&mnt));
            let removed = fs::remove_file(mnt.join("big.bin"));
            run(Command::new("umount").arg(&mnt));
            removed.unwrap();
        }
    }
    let _ = fs::remove_file(&big);
    files.into_iter().map(|(n, _, h)| (n, h)).collect()
}

fn extract(disk: &Path, offset: u64, len: u64, to: &Path) {
    let src = fs::File::open(disk).unwrap();
    let mut bytes = vec![0u8; len as usize];
    src.read_exact_at(&mut bytes, offset)
        .unwrap_or_else(|e| panic!("reading {} at {offset}: {e}", disk.display()));
    fs::write(to, bytes).unwrap();
}

/// Bytes in use as the file system's own tool reports them (dumpe2fs, fsck.vfat, ntfsinfo).
fn fs_tool_used(kind: FsKind, image: &Path) -> u64 {
    let img = image.to_str().unwrap();
    let num = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"))
    };
    match kind {
        FsKind::Ext4 => {
            let out = run(Command::new(tool("dumpe2fs", "e2fsprogs")).args(["-h", img]));
            (num(&out, "Block count:") - num(&out, "Free blocks:")) * num(&out, "Block size:")
        }
        FsKind::Ntfs => {
            let out = run(Command::new(tool("ntfsinfo", "ntfs-3g")).args(["-m", img]));
            (num(&out, "Volume Size in Clusters:") - num(&out, "Free Clusters:"))
                * num(&out, "Cluster Size:")
        }
        FsKind::Fat32 => {
            let out = run(Command::new(tool("fsck.vfat", "dosfstools")).args(["-n", "-v", img]));
            // "DCESP: 5 files, 16384/81184 clusters" and "512 bytes per cluster".
            let clusters: u64 = out
                .lines()
                .find(|l| l.contains(" clusters") && l.contains('/'))
                .and_then(|l| l.rsplit(", ").next())
                .and_then(|c| c.split('/').next())
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no cluster count in:\n{out}"));
            let cluster: u64 = out
                .lines()
                .find(|l| l.contains("bytes per cluster"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no cluster size in:\n{out}"));
            num(&out, "Data area starts at byte") + clusters * cluster
        }
    }
}

/// Checks a copy of `source` on `copy` (possibly a larger disk): `sfdisk --verify` is clean,
/// every partition starts where it did (the last may have grown, with `grown`), each file
/// system passes its checker read-only, and every kept file has its hash.
pub fn check_used_copy(copy: &Path, source: &UsedDisk, grown: bool) {
    let sfdisk = tool("sfdisk", "fdisk");
    let verify = Command::new(&sfdisk)
        .arg("--verify")
        .arg(copy)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success()
            && said.contains("No errors detected")
            && !said.contains("not on the end"),
        "sfdisk --verify {}:\n{said}",
        copy.display()
    );
    let dump = run(Command::new(&sfdisk).arg("--json").arg(copy));
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let parts = dump["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), source.partitions.len(), "{dump}");
    let copy_size = fs::metadata(copy).unwrap().len();
    let last_lba = dump["partitiontable"]["lastlba"].as_u64().unwrap();
    assert_eq!(
        (last_lba + 34) * 512,
        copy_size,
        "the GPT's last usable sector is not the disk's: {dump}"
    );
    let work = copy.with_extension("check.d");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    for (i, (part, got)) in source.partitions.iter().zip(parts).enumerate() {
        let start = got["start"].as_u64().unwrap() * 512;
        let len = got["size"].as_u64().unwrap() * 512;
        assert_eq!(start, part.start, "partition {} moved", i + 1);
        let last = i + 1 == source.partitions.len();
        if grown && last {
            assert_eq!(
                start + len,
                (last_lba + 1) * 512,
                "the last partition did not grow"
            );
        } else {
            assert_eq!(len, part.len, "partition {} changed size", i + 1);
        }
        let image = work.join(format!("part{}.img", i + 1));
        extract(copy, part.start, part.len, &image);
        let img = image.to_str().unwrap();
        let out = work.join("out.bin");
        match part.kind {
            FsKind::Ext4 => {
                run(Command::new(tool("e2fsck", "e2fsprogs")).args(["-fn", img]));
            }
            FsKind::Ntfs => {
                run(Command::new(tool("ntfsfix", "ntfs-3g")).args(["-n", img]));
            }
            FsKind::Fat32 => {
                let said = run(Command::new(tool("fsck.vfat", "dosfstools")).args(["-n", img]));
                assert!(!said.contains("Dirty"), "fsck.vfat -n {img}:\n{said}");
            }
        }
        for (name, hash) in &part.files {
            let _ = fs::remove_file(&out);
            let o = out.to_str().unwrap();
            match part.kind {
                FsKind::Ext4 => {
                    run(Command::new(tool("debugfs", "e2fsprogs"))
                        .arg("-R")
                        .arg(format!("dump /{name} {o}"))
                        .arg(img));
                }
                FsKind::Ntfs => {
                    let bytes = Command::new(tool("ntfscat", "ntfs-3g"))
                        .arg(img)
                        .arg(format!("/{name}"))
                        .output()
                        .unwrap()
                        .stdout;
                    fs::write(&out, bytes).unwrap();
                }
                FsKind::Fat32 => {
                    run(Command::new(tool("mcopy", "mtools"))
                        .args(["-n", "-i", img])
                        .arg(format!("::{name}"))
                        .arg(o));
                }
            }
            let got = fs::read(&out).unwrap_or_default();
            assert!(
                blake3::hash(&got).as_bytes() == hash,
                "partition {} ({:?}): /{name} differs on {}",
                i + 1,
                part.kind,
                copy.display()
            );
        }
    }
    let _ = fs::remove_dir_all(&work);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootable_disk_layout() {
        let dir = crate::project_root().join("target/lab-runs/fixtures");
        fs::create_dir_all(&dir).unwrap();
        let disk = dir.join(format!("bootable-{}.img", std::process::id()));
        make_bootable_disk(&disk, 64, "FIXTURE-MARKER-42");
        assert_eq!(fs::metadata(&disk).unwrap().len(), 64 << 20);

        // One active FAT32 (LBA) partition from 1 MiB to the end.
        let dump = run(Command::new(tool("sfdisk", "fdisk"))
            .arg("--dump")
            .arg(&disk));
        let parts: Vec<&str> = dump.lines().filter(|l| l.contains(" : start=")).collect();
        assert_eq!(parts.len(), 1, "{dump}");
        let part = parts[0].replace(' ', "");
        assert!(part.contains("start=2048,"), "{dump}");
        assert!(
            part.contains(&format!("size={},", (64 << 11) - 2048)),
            "{dump}"
        );
        assert!(part.contains("type=c,bootable"), "{dump}");
        assert!(dump.contains("label: dos"), "{dump}");

        // syslinux's MBR code, and syslinux in the partition's boot sector.
        let image = fs::read(&disk).unwrap();
        assert_eq!(&image[..440], &fs::read(MBR_BIN).unwrap()[..440]);
        assert_eq!(&image[510..512], &[0x55, 0xaa]);
        let boot_sector = &image[1 << 20..(1 << 20) + 512];
        assert!(
            boot_sector.windows(8).any(|w| w == b"SYSLINUX"),
            "no syslinux in the partition's boot sector"
        );
        assert_eq!(&boot_sector[0x52..0x5a], b"FAT32   ");
        drop(image);

        let fat = fixture_fat(&disk);
        let mtools = |program: &str, args: &[&str]| {
            run(Command::new(tool(program, "mtools"))
                .args(["-i", &fat])
                .args(args))
        };
        let listing = mtools("mdir", &["-/", "-b", "-a", "::/"]);
        for file in [
            "::/ldlinux.sys",
            "::/ldlinux.c32",
            "::/syslinux.cfg",
            "::/EFI/BOOT/BOOTX64.EFI",
        ] {
            assert!(
                listing.lines().any(|l| l.eq_ignore_ascii_case(file)),
                "{file} missing from the partition:\n{listing}"
            );
        }
        assert!(mtools("mlabel", &["-s", "::"]).contains(FIXTURE_LABEL));
        let cfg = mtools("mtype", &["::/syslinux.cfg"]);
        assert!(
            !cfg.contains("SERIAL"),
            "a SERIAL directive doubles the output on SeaBIOS's serial console:\n{cfg}"
        );
        for line in [
            "SAY FIXTURE-MARKER-42",
            "PROMPT 1",
            "TIMEOUT 10",
            "DEFAULT again",
            "LABEL again",
            "  CONFIG /syslinux.cfg",
        ] {
            assert!(cfg.lines().any(|l| l == line), "{line:?} not in\n{cfg}");
        }
        // A PE image whose embedded grub.cfg echoes the marker.
        let efi = dir.join(format!("bootx64-{}.efi", std::process::id()));
        mtools(
            "mcopy",
            &["-o", "::/EFI/BOOT/BOOTX64.EFI", &efi.display().to_string()],
        );
        let efi_bytes = fs::read(&efi).unwrap();
        assert_eq!(&efi_bytes[..2], b"MZ");
        let echo = b"echo 'FIXTURE-MARKER-42'\n";
        assert!(
            efi_bytes.windows(echo.len()).any(|w| w == echo),
            "the EFI loader does not embed the marker"
        );
        let _ = fs::remove_file(&efi);
        let _ = fs::remove_file(&disk);
    }
}
