//! The boot medium (a USB stick labelled DISKCAST): read its settings file without mounting it.
//!
//! The FAT file system is read in user space (the `fatfs` crate) through a read-only view of the
//! partition, so the stick cannot change and the initramfs needs no FAT or codepage modules.

use crate::inventory::{has_boot_label, Disk, Inventory, BOOT_LABEL};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The settings file at the root of the stick's FAT file system.
pub const SETTINGS_FILE: &str = "diskcast.cfg";
/// The master's signing key (a secret: whoever holds the stick signs sessions slaves trust).
pub const KEY_FILE: &str = "diskcast.key";

#[derive(Debug, thiserror::Error)]
pub enum StickError {
    #[error("no disk with a FAT file system labelled {BOOT_LABEL} appeared within {0} s (was the machine booted from the diskcast stick?)")]
    NotFound(u64),
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: no {SETTINGS_FILE} at the root of the stick (rebuild the stick or add the file)"
    )]
    NoSettings { path: PathBuf },
    #[error("{path}: {name} is not UTF-8 text")]
    NotText { path: PathBuf, name: String },
}

/// A read-only window onto one partition of a device.
#[derive(Debug)]
struct ReadOnlyPartition {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for ReadOnlyPartition {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.file.read(&mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for ReadOnlyPartition {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the boot medium is read only",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for ReadOnlyPartition {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

/// Reads `SETTINGS_FILE` from the FAT file system starting at byte `start` of `device`.
pub fn read_settings(device: &Path, start: u64) -> Result<String, StickError> {
    read_file(device, start, SETTINGS_FILE)?.ok_or_else(|| StickError::NoSettings {
        path: device.into(),
    })
}

/// Reads file `name` (at most 64 KiB of UTF-8) from the root of the FAT file system starting at
/// byte `start` of `device`; `None` when there is no such file.
pub fn read_file(device: &Path, start: u64, name: &str) -> Result<Option<String>, StickError> {
    let io_err = |op| {
        let path = device.to_path_buf();
        move |source| StickError::Io { path, op, source }
    };
    let file = File::open(device).map_err(io_err("opening"))?;
    let len = crate::sys::block_device_size(&file)
        .or_else(|_| file.metadata().map(|m| m.len()))
        .map_err(io_err("reading the size"))?;
    let partition = ReadOnlyPartition {
        file,
        start,
        len: len.saturating_sub(start),
        pos: 0,
    };
    let fs = fatfs::FileSystem::new(partition, fatfs::FsOptions::new())
        .map_err(io_err("reading the FAT file system"))?;
    let mut settings = match fs.root_dir().open_file(name) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("opening a file on the stick")(e)),
    };
    let mut bytes = Vec::new();
    Read::by_ref(&mut settings)
        .take(64 << 10)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading a file on the stick"))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| StickError::NotText {
            path: device.into(),
            name: name.into(),
        })
}

/// The boot medium and the offset of its DISKCAST file system. USB disks appear a while after
/// their controller's driver loads, and their disk driver can only load then: `rescan` loads
/// drivers for new devices between looks.
pub fn find_boot_medium(
    sys: &Path,
    dev: &Path,
    wait: Duration,
    mut rescan: impl FnMut(),
) -> Result<(Disk, u64), StickError> {
    let deadline = Instant::now() + wait;
    loop {
        rescan();
        let inventory = Inventory::read(sys, dev);
        for disk in inventory.disks.iter().filter(|d| d.boot_medium) {
            let device = dev.join(&disk.name);
            let offsets =
                crate::inventory::partition_starts(&sys.join("block").join(&disk.name), &disk.name);
            if let Some(&start) = offsets
                .iter()
                .find(|&&offset| has_boot_label(&device, &[offset]))
            {
                return Ok((disk.clone(), start));
            }
        }
        if Instant::now() >= deadline {
            return Err(StickError::NotFound(wait.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FAT image made with mkfs.vfat + mcopy when the tools exist (they do after scripts/setup).
    fn fat_image_with(settings: Option<&str>) -> Option<PathBuf> {
        let dir = std::env::temp_dir().join(format!("diskcast-stick-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let image = dir.join(format!("fat-{}.img", settings.is_some()));
        let _ = std::fs::remove_file(&image);
        let ok = std::process::Command::new("mkfs.vfat")
            .args(["-C", "-n", BOOT_LABEL])
            .arg(&image)
            .arg("4096")
            .output()
            .ok()?
            .status
            .success();
        if !ok {
            return None;
        }
        if let Some(text) = settings {
            let source = dir.join(SETTINGS_FILE);
            std::fs::write(&source, text).ok()?;
            let ok = std::process::Command::new("mcopy")
                .arg("-i")
                .arg(&image)
                .arg(&source)
                .arg(format!("::{SETTINGS_FILE}"))
                .output()
                .ok()?
                .status
                .success();
            assert!(ok, "mcopy failed");
        }
        Some(image)
    }

    #[test]
    fn reads_the_settings_file_and_leaves_the_image_unchanged() {
        let Some(image) = fat_image_with(Some("min_receivers = 3\n")) else {
            panic!("mkfs.vfat is missing: run scripts/setup");
        };
        let before = std::fs::read(&image).unwrap();
        assert_eq!(read_settings(&image, 0).unwrap(), "min_receivers = 3\n");
        assert!(
            std::fs::read(&image).unwrap() == before,
            "the stick changed"
        );
        assert!(has_boot_label(&image, &[0]));

        // A stick without a key file: the master has no key (and says so), nothing fails here.
        assert_eq!(read_file(&image, 0, KEY_FILE).unwrap(), None);

        let empty = fat_image_with(None).unwrap();
        assert!(matches!(
            read_settings(&empty, 0),
            Err(StickError::NoSettings { .. })
        ));
        // Not a FAT file system at all.
        assert!(matches!(
            read_settings(&empty, 4096),
            Err(StickError::Io { .. })
        ));
    }
}
