//! What hardware the machine has: disks and network interfaces, read from sysfs.
//!
//! Every reader takes the sysfs root as a parameter so tests run on a fake tree. The printed form
//! (`Display`) is one stable line per device that tests and operators can grep.

pub use diskcast_proto::units::human_size;
use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    pub logical_block_size: u32,
    pub model: String,
    pub serial: String,
    pub removable: bool,
    /// The medium this system booted from (a diskcast USB stick); never a target.
    pub boot_medium: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    pub driver: String,
    pub link: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
}

/// FAT volume label of the partition a diskcast boot stick carries.
pub const BOOT_LABEL: &str = "DISKCAST";

fn read_trimmed(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn is_disk_name(name: &str) -> bool {
    const SKIP: [&str; 6] = ["loop", "ram", "zram", "sr", "fd", "dm-"];
    !SKIP.iter().any(|prefix| name.starts_with(prefix))
}

/// The serial number, wherever this kind of device publishes it.
fn disk_serial(block: &Path) -> String {
    let direct = ["serial", "device/serial"]
        .iter()
        .find_map(|file| read_trimmed(&block.join(file)));
    if let Some(serial) = direct {
        return serial;
    }
    // SCSI and ATA (through libata's translation) answer VPD page 0x80: a 4-byte header, then ASCII.
    if let Ok(page) = fs::read(block.join("device/vpd_pg80")) {
        if page.len() > 4 && page[1] == 0x80 {
            let len = usize::from(u16::from_be_bytes([page[2], page[3]]));
            let text = String::from_utf8_lossy(&page[4..page.len().min(4 + len)]);
            let serial = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
            if !serial.is_empty() {
                return serial.to_string();
            }
        }
    }
    String::new()
}

/// Reads every whole disk under `sys/block`. `dev` is where the device nodes are, to look for the
/// boot stick's label.
pub fn read_disks(sys: &Path, dev: &Path) -> Vec<Disk> {
    let Ok(entries) = fs::read_dir(sys.join("block")) else {
        return Vec::new();
    };
    let mut disks: Vec<Disk> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_disk_name(&name) {
                return None;
            }
            let block = entry.path();
            let sectors: u64 = read_trimmed(&block.join("size"))?.parse().ok()?;
            if sectors == 0 {
                return None;
            }
            let partitions = partition_starts(&block, &name);
            Some(Disk {
                size_bytes: sectors * 512,
                logical_block_size: read_trimmed(&block.join("queue/logical_block_size"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(512),
                model: read_trimmed(&block.join("device/model")).unwrap_or_default(),
                serial: disk_serial(&block),
                removable: read_trimmed(&block.join("removable")).as_deref() == Some("1"),
                boot_medium: has_boot_label(&dev.join(&name), &partitions),
                name,
            })
        })
        .collect();
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    disks
}

/// Byte offsets of the disk's partitions (and 0 for a file system on the whole disk).
pub fn partition_starts(block: &Path, name: &str) -> Vec<u64> {
    let mut starts = vec![0];
    if let Ok(entries) = fs::read_dir(block) {
        for entry in entries.flatten() {
            let part = entry.file_name().to_string_lossy().into_owned();
            if part.starts_with(name) {
                if let Some(start) =
                    read_trimmed(&entry.path().join("start")).and_then(|s| s.parse::<u64>().ok())
                {
                    starts.push(start * 512);
                }
            }
        }
    }
    starts
}

/// True when a FAT file system labelled [`BOOT_LABEL`] starts at one of `offsets` of `device`.
pub fn has_boot_label(device: &Path, offsets: &[u64]) -> bool {
    let Ok(mut file) = fs::File::open(device) else {
        return false;
    };
    offsets.iter().any(|&offset| {
        let mut sector = [0u8; 512];
        if file.seek(SeekFrom::Start(offset)).is_err() || file.read_exact(&mut sector).is_err() {
            return false;
        }
        fat_label(&sector).is_some_and(|label| label == BOOT_LABEL)
    })
}

/// The volume label of a FAT12/16 or FAT32 boot sector.
pub fn fat_label(sector: &[u8; 512]) -> Option<String> {
    if sector[510..512] != [0x55, 0xaa] {
        return None;
    }
    // The extended boot signature 0x29 sits at 0x26 (FAT12/16) or 0x42 (FAT32), the label 5 bytes on.
    let label_at = [(0x42, 0x47), (0x26, 0x2b)]
        .into_iter()
        .find(|&(sig, _)| sector[sig] == 0x29)?
        .1;
    let label = String::from_utf8_lossy(&sector[label_at..label_at + 11]);
    Some(label.trim_end().to_string())
}

/// Reads the network interfaces under `sys/class/net`, loopback left out.
pub fn read_nics(sys: &Path) -> Vec<Nic> {
    let Ok(entries) = fs::read_dir(sys.join("class/net")) else {
        return Vec::new();
    };
    let mut nics: Vec<Nic> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            // Only interfaces backed by a device: no loopback, bridges or tunnels.
            if name == "lo" || !path.join("device").exists() {
                return None;
            }
            let driver = fs::read_link(path.join("device/driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            Some(Nic {
                mac: read_trimmed(&path.join("address")).unwrap_or_default(),
                link: read_trimmed(&path.join("carrier")).as_deref() == Some("1"),
                driver,
                name,
            })
        })
        .collect();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// `vendor:device` of every PCI network controller (class 0x02), for the "no NIC" message.
pub fn pci_network_controllers(sys: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(sys.join("bus/pci/devices")) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let class = read_trimmed(&path.join("class"))?;
            if !class.starts_with("0x02") {
                return None;
            }
            let id = |file| {
                read_trimmed(&path.join(file)).map(|s| s.trim_start_matches("0x").to_string())
            };
            Some(format!(
                "{} {}:{} (class {class})",
                entry.file_name().to_string_lossy(),
                id("vendor")?,
                id("device")?
            ))
        })
        .collect();
    found.sort();
    found
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("no disk with {what} (disks present: {present})")]
    NotFound { what: String, present: String },
    #[error("refusing disk {name}: it is the medium this system booted from")]
    BootMedium { name: String },
    #[error("no internal disk found (disks present: {present})")]
    NoInternalDisk { present: String },
    #[error(
        "several internal disks match ({present}); choose one with diskcast.disk=serial:SERIAL"
    )]
    Ambiguous { present: String },
}

fn describe_disks<'a>(disks: impl Iterator<Item = &'a Disk>) -> String {
    let list: Vec<String> = disks
        .map(|d| {
            let mut text = format!("{} {}", d.name, human_size(d.size_bytes));
            if !d.serial.is_empty() {
                text.push_str(&format!(" serial {}", d.serial));
            }
            if d.boot_medium {
                text.push_str(" (boot medium)");
            } else if d.removable {
                text.push_str(" (removable)");
            }
            text
        })
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join("; ")
    }
}

/// Picks the disk a role works on. Never the boot medium; with no explicit choice, only when
/// exactly one internal disk exists (device order is not stable, so guessing could wipe the
/// wrong disk).
pub fn select_disk<'a>(
    disks: &'a [Disk],
    selector: &crate::cmdline::DiskSelector,
) -> Result<&'a Disk, SelectError> {
    use crate::cmdline::DiskSelector;
    let present = || describe_disks(disks.iter());
    let found = match selector {
        DiskSelector::Serial(serial) => {
            disks
                .iter()
                .find(|d| &d.serial == serial)
                .ok_or_else(|| SelectError::NotFound {
                    what: format!("serial {serial}"),
                    present: present(),
                })?
        }
        DiskSelector::Name(name) => {
            disks
                .iter()
                .find(|d| &d.name == name)
                .ok_or_else(|| SelectError::NotFound {
                    what: format!("name {name}"),
                    present: present(),
                })?
        }
        DiskSelector::Size(text) => {
            let wanted = crate::cmdline::parse_size(text).unwrap_or(0) as f64;
            let matching: Vec<&Disk> = disks
                .iter()
                .filter(|d| !d.boot_medium && !d.removable)
                .filter(|d| (d.size_bytes as f64 - wanted).abs() <= wanted * 0.03)
                .collect();
            match matching.len() {
                1 => matching[0],
                0 => {
                    return Err(SelectError::NotFound {
                        what: format!("size {text} (within 3 %)"),
                        present: present(),
                    })
                }
                _ => {
                    return Err(SelectError::Ambiguous {
                        present: describe_disks(matching.into_iter()),
                    })
                }
            }
        }
        DiskSelector::Only => {
            let internal: Vec<&Disk> = disks
                .iter()
                .filter(|d| !d.boot_medium && !d.removable)
                .collect();
            match internal.len() {
                1 => internal[0],
                0 => return Err(SelectError::NoInternalDisk { present: present() }),
                _ => {
                    return Err(SelectError::Ambiguous {
                        present: describe_disks(internal.into_iter()),
                    })
                }
            }
        }
    };
    if found.boot_medium {
        return Err(SelectError::BootMedium {
            name: found.name.clone(),
        });
    }
    Ok(found)
}

impl Inventory {
    pub fn read(sys: &Path, dev: &Path) -> Self {
        Self {
            disks: read_disks(sys, dev),
            nics: read_nics(sys),
        }
    }
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

impl fmt::Display for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "disk {} size={} ({}) block={} model={:?} serial={:?} removable={} boot={}",
            self.name,
            self.size_bytes,
            human_size(self.size_bytes),
            self.logical_block_size,
            self.model,
            self.serial,
            yes_no(self.removable),
            yes_no(self.boot_medium)
        )
    }
}

impl fmt::Display for Nic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nic {} mac={} driver={} link={}",
            self.name,
            self.mac,
            if self.driver.is_empty() {
                "?"
            } else {
                &self.driver
            },
            if self.link { "up" } else { "down" }
        )
    }
}

impl fmt::Display for Inventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "inventory: {} disk(s), {} nic(s)",
            self.disks.len(),
            self.nics.len()
        )?;
        for disk in &self.disks {
            writeln!(f, "inventory: {disk}")?;
        }
        for nic in &self.nics {
            writeln!(f, "inventory: {nic}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct FakeSys(PathBuf);
    impl FakeSys {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("diskcast-inv-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn file(&self, rel: &str, content: impl AsRef<[u8]>) {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
        }
    }
    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_disks_with_serials_from_each_source() {
        let sys = FakeSys::new("disks");
        sys.file("block/vda/size", "16777216\n");
        sys.file("block/vda/serial", "VIRTIO-SN1\n");
        sys.file("block/vda/queue/logical_block_size", "512\n");
        sys.file("block/vda/removable", "0\n");
        sys.file("block/sda/size", "2048\n");
        sys.file("block/sda/device/model", "QEMU HARDDISK   \n");
        let mut page = vec![0, 0x80, 0, 12];
        page.extend_from_slice(b"  ATA-SN-2  ");
        sys.file("block/sda/device/vpd_pg80", page);
        sys.file("block/sda/queue/logical_block_size", "4096\n");
        sys.file("block/sda/removable", "1\n");
        sys.file("block/loop0/size", "100\n");
        sys.file("block/sr0/size", "100\n");
        let disks = read_disks(&sys.0, Path::new("/nonexistent"));
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].name, "sda");
        assert_eq!(disks[0].serial, "ATA-SN-2");
        assert_eq!(disks[0].model, "QEMU HARDDISK");
        assert_eq!(disks[0].logical_block_size, 4096);
        assert!(disks[0].removable);
        assert_eq!(disks[1].serial, "VIRTIO-SN1");
        assert_eq!(disks[1].size_bytes, 8 << 30);
        assert!(disks[1].to_string().contains("size=8589934592 (8.0 GiB)"));
    }

    #[test]
    fn finds_the_boot_label_on_a_partition() {
        let sys = FakeSys::new("label");
        let mut image = vec![0u8; 4096];
        let part = &mut image[1024..1536];
        part[0x42] = 0x29;
        part[0x47..0x52].copy_from_slice(b"DISKCAST   ");
        part[510] = 0x55;
        part[511] = 0xaa;
        sys.file("dev/sdb", &image);
        assert!(has_boot_label(&sys.0.join("dev/sdb"), &[0, 1024]));
        assert!(!has_boot_label(&sys.0.join("dev/sdb"), &[0]));
        sys.file("block/sdb/size", "8\n");
        sys.file("block/sdb/sdb1/start", "2\n");
        let disks = read_disks(&sys.0, &sys.0.join("dev"));
        assert!(disks[0].boot_medium);
    }

    fn disk(name: &str, serial: &str, removable: bool, boot: bool) -> Disk {
        Disk {
            name: name.into(),
            size_bytes: 1 << 30,
            logical_block_size: 512,
            model: String::new(),
            serial: serial.into(),
            removable,
            boot_medium: boot,
        }
    }

    #[test]
    fn disk_selection_never_guesses_and_never_takes_the_boot_medium() {
        use crate::cmdline::DiskSelector;
        let disks = vec![
            disk("sda", "USB1", true, true),
            disk("vda", "A", false, false),
            disk("vdb", "B", false, false),
        ];
        assert_eq!(
            select_disk(&disks, &DiskSelector::Serial("B".into()))
                .unwrap()
                .name,
            "vdb"
        );
        assert_eq!(
            select_disk(&disks, &DiskSelector::Name("vda".into()))
                .unwrap()
                .name,
            "vda"
        );
        let err = select_disk(&disks, &DiskSelector::Only).unwrap_err();
        assert!(matches!(err, SelectError::Ambiguous { .. }), "{err}");
        assert!(
            err.to_string().contains("vda") && err.to_string().contains("serial B"),
            "{err}"
        );
        assert_eq!(
            select_disk(&disks, &DiskSelector::Serial("USB1".into())),
            Err(SelectError::BootMedium { name: "sda".into() })
        );
        assert!(matches!(
            select_disk(&disks, &DiskSelector::Serial("C".into())),
            Err(SelectError::NotFound { .. })
        ));
        assert_eq!(
            select_disk(&disks[..2], &DiskSelector::Only).unwrap().name,
            "vda"
        );
        assert!(matches!(
            select_disk(&disks[..1], &DiskSelector::Only),
            Err(SelectError::NoInternalDisk { .. })
        ));

        // By size: 1 GiB disks are "1.07G" in decimal units; vdb is made 500 GB.
        let mut sized = disks.clone();
        sized[2].size_bytes = 500_107_862_016;
        assert_eq!(
            select_disk(&sized, &DiskSelector::Size("500G".into()))
                .unwrap()
                .name,
            "vdb"
        );
        assert_eq!(
            select_disk(&sized, &DiskSelector::Size("1Gi".into()))
                .unwrap()
                .name,
            "vda"
        );
        assert!(matches!(
            select_disk(&sized, &DiskSelector::Size("2T".into())),
            Err(SelectError::NotFound { .. })
        ));
        // The stick is 1 GiB too, but never matches.
        assert!(matches!(
            select_disk(&disks, &DiskSelector::Size("1Gi".into())),
            Err(SelectError::Ambiguous { .. })
        ));
    }

    #[test]
    fn lists_pci_network_controllers() {
        let sys = FakeSys::new("pci");
        sys.file("bus/pci/devices/0000:00:03.0/class", "0x020000\n");
        sys.file("bus/pci/devices/0000:00:03.0/vendor", "0x10ec\n");
        sys.file("bus/pci/devices/0000:00:03.0/device", "0x8168\n");
        sys.file("bus/pci/devices/0000:00:04.0/class", "0x010802\n");
        assert_eq!(
            pci_network_controllers(&sys.0),
            ["0000:00:03.0 10ec:8168 (class 0x020000)"]
        );
    }
}
