//! Kernel module loading without udev: match the modaliases that devices publish in sysfs
//! against `modules.alias`, and load each match after its dependencies from `modules.dep`.
//!
//! Devices on virtio, SCSI and USB appear only after their bus driver loads, so
//! [`load_for_present_hardware`] rescans until a round finds nothing new.

pub use diskcast_proto::modindex::ModuleIndex;
use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("reading module index {path}")]
    ReadIndex {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads `modules.alias` and `modules.dep` of the module tree at `module_dir`.
pub fn read_index(module_dir: &Path) -> Result<ModuleIndex, ModulesError> {
    let read = |name: &str| {
        let path = module_dir.join(name);
        fs::read_to_string(&path).map_err(|source| ModulesError::ReadIndex { path, source })
    };
    Ok(ModuleIndex::parse(
        &read("modules.alias")?,
        &read("modules.dep")?,
    ))
}

/// What [`load_for_present_hardware`] did.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub rounds: u32,
}

/// Collects the modalias of every device under `sys/bus/*/devices/*`.
pub fn present_modaliases(sys: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let Ok(buses) = fs::read_dir(sys.join("bus")) else {
        return found;
    };
    for bus in buses.flatten() {
        let Ok(devices) = fs::read_dir(bus.path().join("devices")) else {
            continue;
        };
        for device in devices.flatten() {
            if let Ok(alias) = fs::read_to_string(device.path().join("modalias")) {
                let alias = alias.trim();
                if !alias.is_empty() {
                    found.insert(alias.to_string());
                }
            }
        }
    }
    found
}

/// Loads the modules for every device present, repeating while loading makes new devices appear.
/// Call it again when devices may have appeared since (USB disks): it loads only what is new.
/// `load` inserts one module file (`finit_module` in the agent); "already loaded" must be `Ok`.
pub fn load_for_present_hardware(
    index: &ModuleIndex,
    module_dir: &Path,
    sys: &Path,
    settle: Duration,
    mut load: impl FnMut(&Path) -> std::io::Result<()>,
) -> LoadReport {
    let mut report = LoadReport::default();
    let mut attempted: HashSet<String> = HashSet::new();
    let mut seen_aliases = BTreeSet::new();
    let mut quiet_rounds = 0;
    while quiet_rounds < 2 && report.rounds < 50 {
        report.rounds += 1;
        let aliases = present_modaliases(sys);
        let new: Vec<&String> = aliases.difference(&seen_aliases).collect();
        let mut loaded_any = false;
        for alias in &new {
            for module in index.modules_for(alias) {
                for needed in index.load_order(module) {
                    // Loaded before (an earlier call) or built in: nothing to do, nothing to report.
                    if !attempted.insert(needed.clone())
                        || sys.join("module").join(needed.replace('-', "_")).exists()
                    {
                        continue;
                    }
                    let Some(path) = index.path_of(&needed) else {
                        continue;
                    };
                    match load(&module_dir.join(path)) {
                        Ok(()) => {
                            log::debug!("loaded module {needed} for {alias}");
                            report.loaded.push(needed);
                            loaded_any = true;
                        }
                        Err(e) => {
                            log::warn!("module {needed} (for {alias}) failed to load: {e}");
                            report.failed.push((needed, e.to_string()));
                        }
                    }
                }
            }
        }
        let changed = !new.is_empty();
        seen_aliases = aliases;
        if changed || loaded_any {
            quiet_rounds = 0;
        } else {
            quiet_rounds += 1;
        }
        std::thread::sleep(settle);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIASES: &str = "\
# Aliases extracted from modules themselves.
alias pci:v00001AF4d00001000sv*sd*bc*sc*i* virtio_pci
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000001v* virtio_net
alias pci:v00008086d0000100Esv*sd*bc*sc*i* e1000
alias scsi:t-0x00* sd_mod
alias acpi*:PNP0C0A:* battery
";
    const DEPS: &str = "\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/net/ethernet/intel/e1000/e1000.ko:
kernel/drivers/scsi/sd_mod.ko.xz: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
";

    #[test]
    fn loads_until_no_new_device_appears() {
        let dir = std::env::temp_dir().join(format!("diskcast-modules-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let pci = dir.join("bus/pci/devices/0000:00:03.0");
        fs::create_dir_all(&pci).unwrap();
        fs::write(
            pci.join("modalias"),
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00\n",
        )
        .unwrap();
        let index = ModuleIndex::parse(ALIASES, DEPS);
        let mut loaded = Vec::new();
        let virtio_dev = dir.join("bus/virtio/devices/virtio0");
        let report =
            load_for_present_hardware(&index, Path::new("/m"), &dir, Duration::ZERO, |path| {
                loaded.push(path.to_path_buf());
                // Loading the PCI transport makes the virtio device appear, as in the kernel.
                if path.ends_with("virtio_pci.ko") {
                    fs::create_dir_all(&virtio_dev)?;
                    fs::write(virtio_dev.join("modalias"), "virtio:d00000001v00001AF4")?;
                }
                Ok(())
            });
        assert!(
            report.loaded.contains(&"virtio_net".to_string()),
            "{report:?}"
        );
        assert!(loaded.iter().all(|p| p.starts_with("/m")));
        assert_eq!(
            loaded.iter().filter(|p| p.ends_with("virtio.ko")).count(),
            1
        );

        // Called again (waiting for a USB disk): what the kernel lists as loaded is skipped.
        for name in &report.loaded {
            fs::create_dir_all(dir.join("module").join(name)).unwrap();
        }
        let again =
            load_for_present_hardware(&index, Path::new("/m"), &dir, Duration::ZERO, |_| Ok(()));
        assert!(again.loaded.is_empty(), "{again:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
