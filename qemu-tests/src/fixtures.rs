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
/// - BIOS: syslinux in it, with `SERIAL 0 115200`, `SAY marker`, `PROMPT 1`, `TIMEOUT 10` (with
///   `PROMPT 0` the serial line is cut); with no DEFAULT it then keeps returning to `boot:`;
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
        format!("SERIAL 0 115200\nSAY {marker}\nPROMPT 1\nTIMEOUT 10\n"),
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
        for line in [
            "SERIAL 0 115200",
            "SAY FIXTURE-MARKER-42",
            "PROMPT 1",
            "TIMEOUT 10",
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
