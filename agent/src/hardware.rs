//! What the agent can tell an admin about hardware it cannot use: the firmware and Secure Boot
//! state, PCI network and storage controllers with the mode they run in (AHCI, NVMe, RAID,
//! Intel VMD...) and, for those no driver claimed, the module that would drive them; firmware
//! files a driver asked for and the initramfs lacks, with the Debian package that ships them.
//!
//! Every reader takes the sysfs root (or the kernel log's text) as a parameter so tests run on
//! fake trees.

use diskcast_proto::modindex::ModuleIndex;
use std::fmt;
use std::fs;
use std::path::Path;

/// The EFI global variable GUID: `SecureBoot-<this>` holds 4 attribute bytes and the state.
const SECURE_BOOT_VAR: &str = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
}

/// How the machine booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub firmware: Firmware,
    /// `None`: not UEFI, or its variables could not be read.
    pub secure_boot: Option<bool>,
    /// The kernel's lockdown mode (`none`, `integrity`, `confidentiality`) when securityfs says.
    pub lockdown: Option<String>,
}

impl Platform {
    /// Reads `sys/firmware/efi` (the `SecureBoot` variable when efivarfs is mounted at
    /// `efi/efivars`, else what the kernel logged at boot: `secureboot: Secure boot enabled`)
    /// and `sys/kernel/security/lockdown`.
    pub fn read(sys: &Path, kernel_log: &str) -> Self {
        let efi = sys.join("firmware/efi");
        let firmware = if efi.is_dir() {
            Firmware::Uefi
        } else {
            Firmware::Bios
        };
        let secure_boot = fs::read(efi.join("efivars").join(SECURE_BOOT_VAR))
            .ok()
            .and_then(|bytes| bytes.get(4).map(|&state| state == 1))
            .or_else(|| logged_secure_boot(kernel_log));
        let lockdown = fs::read_to_string(sys.join("kernel/security/lockdown"))
            .ok()
            .and_then(|text| parse_lockdown(&text));
        Self {
            firmware,
            secure_boot,
            lockdown,
        }
    }
}

/// What the kernel logged about Secure Boot at boot (x86: `secureboot: Secure boot enabled`).
fn logged_secure_boot(kernel_log: &str) -> Option<bool> {
    kernel_log.lines().rev().find_map(|line| {
        if line.contains("secureboot: Secure boot enabled") {
            Some(true)
        } else if line.contains("secureboot: Secure boot disabled") {
            Some(false)
        } else {
            None
        }
    })
}

/// `none [integrity] confidentiality` → `integrity`.
pub fn parse_lockdown(text: &str) -> Option<String> {
    text.split_ascii_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .map(str::to_string)
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on_off = |v: Option<bool>| match v {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown",
        };
        match self.firmware {
            Firmware::Bios => f.write_str("firmware bios secure_boot=off")?,
            Firmware::Uefi => write!(f, "firmware uefi secure_boot={}", on_off(self.secure_boot))?,
        }
        write!(
            f,
            " lockdown={}",
            self.lockdown.as_deref().unwrap_or("unknown")
        )
    }
}

/// What a PCI controller is, from its class code (and, for Intel VMD, its IDs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerKind {
    Network,
    /// A storage controller in this mode (`sata-ahci`, `nvme`, `raid`, `intel-vmd`...).
    Storage(&'static str),
}

/// Intel Volume Management Device IDs (the `vmd` driver's table, Linux 6.1 and newer parts):
/// NVMe disks behind it are invisible until `vmd` binds. Business laptops ship in this mode
/// ("RAID", "Intel RST" in the firmware setup).
const INTEL_VMD: [u16; 10] = [
    0x201d, 0x28c0, 0x467f, 0x4c3d, 0x7d0b, 0x9a0b, 0xa77f, 0xad0b, 0xb06f, 0xb60b,
];

/// The controller's kind, or `None` when it is neither network nor storage.
pub fn controller_kind(vendor: u16, device: u16, class: u32) -> Option<ControllerKind> {
    if vendor == 0x8086 && INTEL_VMD.contains(&device) {
        return Some(ControllerKind::Storage("intel-vmd"));
    }
    let (base, sub, interface) = ((class >> 16) as u8, (class >> 8) as u8, class as u8);
    match base {
        0x02 => Some(ControllerKind::Network),
        0x01 => Some(ControllerKind::Storage(match (sub, interface) {
            (0x00, _) => "scsi",
            (0x01, _) => "ide",
            (0x04, _) => "raid",
            (0x05, _) => "ata",
            (0x06, 0x01) => "sata-ahci",
            (0x06, _) => "sata",
            (0x07, _) => "sas",
            (0x08, 0x02) => "nvme",
            (0x08, _) => "nvm",
            (0x80, _) => "other",
            _ => "storage",
        })),
        _ => None,
    }
}

/// One PCI network or storage controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    /// `0000:00:03.0`
    pub slot: String,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub kind: ControllerKind,
    /// The driver bound to it, if any.
    pub driver: Option<String>,
    pub modalias: String,
}

fn hex_file(path: &Path) -> Option<u32> {
    let text = fs::read_to_string(path).ok()?;
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Every PCI network and storage controller under `sys/bus/pci/devices`, by slot.
pub fn read_controllers(sys: &Path) -> Vec<Controller> {
    let Ok(entries) = fs::read_dir(sys.join("bus/pci/devices")) else {
        return Vec::new();
    };
    let mut found: Vec<Controller> = entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let vendor = u16::try_from(hex_file(&path.join("vendor"))?).ok()?;
            let device = u16::try_from(hex_file(&path.join("device"))?).ok()?;
            let class = hex_file(&path.join("class"))?;
            let kind = controller_kind(vendor, device, class)?;
            let driver = fs::read_link(path.join("driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            Some(Controller {
                slot: entry.file_name().to_string_lossy().into_owned(),
                vendor,
                device,
                class,
                kind,
                driver,
                modalias: fs::read_to_string(path.join("modalias"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
            })
        })
        .collect();
    found.sort_by(|a, b| a.slot.cmp(&b.slot));
    found
}

impl Controller {
    pub fn ids(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor, self.device)
    }

    fn kind_text(&self) -> String {
        match self.kind {
            ControllerKind::Network => "network".into(),
            ControllerKind::Storage(mode) => format!("storage mode={mode}"),
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "controller {} {} class={:06x} {} driver={}",
            self.slot,
            self.ids(),
            self.class,
            self.kind_text(),
            self.driver.as_deref().unwrap_or("none")
        )
    }
}

/// The modules that would drive controllers, from two indexes: the initramfs's own (what it can
/// load) and the kernel's whole catalogue of PCI drivers (what it left out).
#[derive(Debug, Default)]
pub struct DriverCatalogue {
    pub packed: ModuleIndex,
    pub all: ModuleIndex,
    pub kernel: String,
}

impl DriverCatalogue {
    /// Why `controller` has no driver and what to do, in one sentence.
    pub fn explain(&self, controller: &Controller) -> String {
        let packed: Vec<&str> = self
            .packed
            .modules_for(&controller.modalias)
            .into_iter()
            .collect();
        let known: Vec<&str> = self
            .all
            .aliases_for(&controller.modalias)
            .into_iter()
            .collect();
        let what = match controller.kind {
            ControllerKind::Network => "network controller".to_string(),
            ControllerKind::Storage(mode) => format!("{mode} storage controller"),
        };
        let head = format!(
            "{what} {} {} (class {:06x}) has no driver",
            controller.slot,
            controller.ids(),
            controller.class
        );
        if !packed.is_empty() {
            return format!(
                "{head}: module {} is in the initramfs but did not bind it (see the module messages above)",
                packed.join(", ")
            );
        }
        if !known.is_empty() {
            let modules = known.join(", ");
            let args: Vec<String> = known.iter().map(|m| format!("--module {m}")).collect();
            return format!(
                "{head}: module {modules} would drive it and is not in this initramfs \
                 (rebuild it with diskcast-initramfs {})",
                args.join(" ")
            );
        }
        let hint = match controller.kind {
            ControllerKind::Storage("raid") | ControllerKind::Storage("intel-vmd") => {
                "; switch the firmware setup's SATA/NVMe mode from RAID (Intel RST/VMD) to AHCI"
            }
            _ => "",
        };
        format!(
            "{head}: no module of kernel {} knows it{hint}",
            if self.kernel.is_empty() {
                "this"
            } else {
                &self.kernel
            }
        )
    }
}

/// Network and storage controllers no driver claimed, each explained.
pub fn unclaimed(controllers: &[Controller], catalogue: &DriverCatalogue) -> Vec<String> {
    controllers
        .iter()
        .filter(|c| c.driver.is_none())
        .map(|c| catalogue.explain(c))
        .collect()
}

/// A firmware file a driver asked for and did not get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingFirmware {
    /// Who asked: `r8169 0000:02:00.0`.
    pub device: String,
    /// Relative to /lib/firmware: `rtl_nic/rtl8168h-2.fw`.
    pub file: String,
}

/// Firmware requests that failed, from the kernel log's text (`/dev/kmsg` records or `dmesg`
/// lines), each file once.
pub fn missing_firmware(log: &str) -> Vec<MissingFirmware> {
    let mut found: Vec<MissingFirmware> = Vec::new();
    for line in log.lines() {
        // A /dev/kmsg record: "4,523,1234567,-;r8169 0000:02:00.0: Direct firmware load ...".
        let message = line.split_once(';').map_or(line, |(_, m)| m);
        let parsed = message
            .split_once(": Direct firmware load for ")
            .and_then(|(device, rest)| Some((device, rest.split_once(" failed with error")?.0)))
            .or_else(|| {
                message
                    .split_once(": firmware: failed to load ")
                    .and_then(|(device, rest)| Some((device, rest.split_once(" (")?.0)))
            });
        if let Some((device, file)) = parsed {
            if !found.iter().any(|f| f.file == file) {
                found.push(MissingFirmware {
                    device: device.trim().to_string(),
                    file: file.trim().to_string(),
                });
            }
        }
    }
    found
}

/// The Debian package (bookworm, non-free-firmware) that ships a firmware file, for the
/// families lab NICs and disk controllers use.
pub fn firmware_package(file: &str) -> Option<&'static str> {
    const BY_PREFIX: [(&str, &str); 22] = [
        ("rtl_nic/", "firmware-realtek"),
        ("rtl_bt/", "firmware-realtek"),
        ("rtlwifi/", "firmware-realtek"),
        ("rtw88/", "firmware-realtek"),
        ("rtw89/", "firmware-realtek"),
        ("bnx2x/", "firmware-bnx2x"),
        ("bnx2/", "firmware-bnx2"),
        ("tigon/", "firmware-misc-nonfree"),
        ("qed/", "firmware-qlogic"),
        ("ql2", "firmware-qlogic"),
        ("qlogic/", "firmware-qlogic"),
        ("cxgb4/", "firmware-misc-nonfree"),
        ("intel/ice/", "firmware-misc-nonfree"),
        ("i915/", "firmware-misc-nonfree"),
        ("nvidia/", "firmware-misc-nonfree"),
        ("amdgpu/", "firmware-amd-graphics"),
        ("radeon/", "firmware-amd-graphics"),
        ("iwlwifi-", "firmware-iwlwifi"),
        ("ath10k/", "firmware-atheros"),
        ("ath11k/", "firmware-atheros"),
        ("brcm/", "firmware-brcm80211"),
        ("netronome/", "firmware-netronome"),
    ];
    BY_PREFIX
        .iter()
        .find(|(prefix, _)| file.starts_with(prefix))
        .map(|(_, package)| *package)
        .or(match file {
            "myri10ge_eth_z8e.dat" | "myri10ge_ethp_z8e.dat" => Some("firmware-myricom"),
            "phanfw.bin" => Some("firmware-netxen"),
            _ => None,
        })
}

impl MissingFirmware {
    /// What the console says about it: the file, who asked, where to get it, how to add it.
    pub fn advice(&self) -> String {
        let source = match firmware_package(&self.file) {
            Some(package) => format!("Debian's {package} package ships it"),
            None => format!("find its package with `apt-file search {}`", self.file),
        };
        format!(
            "firmware {} (asked for by {}) is not in the initramfs: {source}; add it with \
             diskcast-initramfs --firmware DIR (DIR holding {}, e.g. /lib/firmware)",
            self.file, self.device, self.file
        )
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
                std::env::temp_dir().join(format!("diskcast-hw-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn file(&self, rel: &str, content: impl AsRef<[u8]>) {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
        }
        fn pci(&self, slot: &str, vendor: &str, device: &str, class: &str, driver: Option<&str>) {
            let dev = format!("bus/pci/devices/{slot}");
            self.file(&format!("{dev}/vendor"), format!("0x{vendor}\n"));
            self.file(&format!("{dev}/device"), format!("0x{device}\n"));
            self.file(&format!("{dev}/class"), format!("0x{class}\n"));
            let alias = format!(
                "pci:v0000{}d0000{}sv00001AF4sd00001100bc{}sc{}i{}\n",
                vendor.to_uppercase(),
                device.to_uppercase(),
                &class[..2],
                &class[2..4],
                &class[4..6]
            );
            self.file(&format!("{dev}/modalias"), alias);
            if let Some(driver) = driver {
                let target = self.0.join("bus/pci/drivers").join(driver);
                fs::create_dir_all(&target).unwrap();
                std::os::unix::fs::symlink(target, self.0.join(&dev).join("driver")).unwrap();
            }
        }
    }
    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn platform_reads_secure_boot_and_lockdown() {
        let sys = FakeSys::new("platform");
        assert_eq!(
            Platform::read(&sys.0, "").to_string(),
            "firmware bios secure_boot=off lockdown=unknown"
        );
        // No efivarfs (Debian builds it as a module): what the kernel logged.
        sys.file("firmware/efi/systab", "");
        let log = "6,12,0,-;secureboot: Secure boot enabled\n";
        assert_eq!(Platform::read(&sys.0, log).secure_boot, Some(true));
        assert_eq!(Platform::read(&sys.0, "").secure_boot, None);
        sys.file(
            &format!("firmware/efi/efivars/{SECURE_BOOT_VAR}"),
            [6, 0, 0, 0, 1],
        );
        sys.file(
            "kernel/security/lockdown",
            "none [integrity] confidentiality\n",
        );
        let platform = Platform::read(&sys.0, "secureboot: Secure boot disabled");
        assert_eq!(platform.secure_boot, Some(true));
        assert_eq!(
            platform.to_string(),
            "firmware uefi secure_boot=on lockdown=integrity"
        );
        sys.file(
            &format!("firmware/efi/efivars/{SECURE_BOOT_VAR}"),
            [6, 0, 0, 0, 0],
        );
        assert_eq!(Platform::read(&sys.0, "").secure_boot, Some(false));
    }

    fn catalogue() -> DriverCatalogue {
        let all = ModuleIndex::parse(
            "alias pci:v000015ADd000007B0sv*sd*bc*sc*i* vmxnet3\n\
             alias pci:v00008086d00009A0Bsv*sd*bc*sc*i* vmd\n\
             alias pci:v*d*sv*sd*bc01sc08i02* nvme\n\
             alias pci:v*d*sv*sd*bc01sc06i01* ahci\n",
            "",
        );
        let packed = ModuleIndex::parse(
            "alias pci:v*d*sv*sd*bc01sc08i02* nvme\nalias pci:v*d*sv*sd*bc01sc06i01* ahci\n",
            "kernel/drivers/nvme/host/nvme.ko:\nkernel/drivers/ata/ahci.ko:\n",
        );
        DriverCatalogue {
            packed,
            all,
            kernel: "6.1.0-test".into(),
        }
    }

    #[test]
    fn controllers_show_their_mode_and_unclaimed_ones_name_their_module() {
        let sys = FakeSys::new("controllers");
        sys.pci("0000:00:03.0", "15ad", "07b0", "020000", None);
        sys.pci("0000:00:04.0", "1b36", "0010", "010802", Some("nvme"));
        sys.pci("0000:00:0e.0", "8086", "9a0b", "010400", None);
        sys.pci("0000:00:17.0", "8086", "2822", "010400", None);
        sys.pci("0000:00:1f.2", "8086", "2922", "010601", Some("ahci"));
        sys.pci("0000:00:02.0", "1234", "1111", "030000", None);
        let controllers = read_controllers(&sys.0);
        let lines: Vec<String> = controllers.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "controller 0000:00:03.0 15ad:07b0 class=020000 network driver=none",
                "controller 0000:00:04.0 1b36:0010 class=010802 storage mode=nvme driver=nvme",
                "controller 0000:00:0e.0 8086:9a0b class=010400 storage mode=intel-vmd driver=none",
                "controller 0000:00:17.0 8086:2822 class=010400 storage mode=raid driver=none",
                "controller 0000:00:1f.2 8086:2922 class=010601 storage mode=sata-ahci driver=ahci",
            ]
        );
        let unclaimed = unclaimed(&controllers, &catalogue());
        assert_eq!(unclaimed.len(), 3);
        assert!(
            unclaimed[0].contains("15ad:07b0")
                && unclaimed[0].contains("module vmxnet3 would drive it")
                && unclaimed[0].contains("--module vmxnet3"),
            "{}",
            unclaimed[0]
        );
        assert!(unclaimed[1].contains("intel-vmd storage controller 0000:00:0e.0 8086:9a0b"));
        assert!(
            unclaimed[1].contains("module vmd would drive it"),
            "{}",
            unclaimed[1]
        );
        assert!(
            unclaimed[2].contains("no module of kernel 6.1.0-test knows it")
                && unclaimed[2].contains("to AHCI"),
            "{}",
            unclaimed[2]
        );
    }

    #[test]
    fn missing_firmware_is_named_with_its_package() {
        let log = "\
6,339,5140900,-;r8169 0000:02:00.0: firmware: failed to load rtl_nic/rtl8168h-2.fw (-2)
4,340,5140901,-;r8169 0000:02:00.0: Direct firmware load for rtl_nic/rtl8168h-2.fw failed with error -2
4,341,5140902,-;bnx2x 0000:05:00.0: Direct firmware load for bnx2x/bnx2x-e2-7.13.21.0.fw failed with error -2
6,342,5140903,-;virtio_net virtio0 enp0s3: renamed from eth0
[    3.1] tg3 0000:01:00.0: Direct firmware load for tigon/tg3_tso5.bin failed with error -2
";
        let missing = missing_firmware(log);
        assert_eq!(
            missing,
            [
                MissingFirmware {
                    device: "r8169 0000:02:00.0".into(),
                    file: "rtl_nic/rtl8168h-2.fw".into()
                },
                MissingFirmware {
                    device: "bnx2x 0000:05:00.0".into(),
                    file: "bnx2x/bnx2x-e2-7.13.21.0.fw".into()
                },
                MissingFirmware {
                    device: "[    3.1] tg3 0000:01:00.0".into(),
                    file: "tigon/tg3_tso5.bin".into()
                },
            ]
        );
        let advice = missing[0].advice();
        assert!(
            advice.contains("rtl_nic/rtl8168h-2.fw")
                && advice.contains("r8169 0000:02:00.0")
                && advice.contains("firmware-realtek")
                && advice.contains("--firmware DIR"),
            "{advice}"
        );
        assert_eq!(
            firmware_package("tigon/tg3_tso5.bin"),
            Some("firmware-misc-nonfree")
        );
        assert!(MissingFirmware {
            device: "x".into(),
            file: "vendor/unknown.bin".into()
        }
        .advice()
        .contains("apt-file search vendor/unknown.bin"));
    }
}
