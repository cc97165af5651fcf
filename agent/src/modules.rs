//! Kernel module loading without udev: match the modaliases that devices publish in sysfs
//! against `modules.alias`, and load each match after its dependencies from `modules.dep`.
//!
//! Devices on virtio, SCSI and USB appear only after their bus driver loads, so
//! [`load_for_present_hardware`] rescans until a round finds nothing new.

use std::collections::{BTreeSet, HashMap, HashSet};
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
    #[error("module {module} is listed in modules.dep but {path} cannot be loaded")]
    Load {
        module: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `modules.alias` and `modules.dep` of one kernel, parsed.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    aliases: Vec<(String, String)>,
    /// module name → (path relative to the module directory, dependencies as module names)
    deps: HashMap<String, (PathBuf, Vec<String>)>,
}

/// Module names use `_` in the index but may be spelled with `-` in file names.
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

/// `kernel/drivers/net/virtio_net.ko.xz` → `virtio_net`.
pub fn module_name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize_name(stem)
}

impl ModuleIndex {
    pub fn parse(alias_text: &str, dep_text: &str) -> Self {
        let aliases = alias_text
            .lines()
            .filter_map(|line| {
                let mut words = line.split_ascii_whitespace();
                (words.next()? == "alias").then_some(())?;
                Some((words.next()?.to_string(), normalize_name(words.next()?)))
            })
            .collect();
        let deps = dep_text
            .lines()
            .filter_map(|line| {
                let (path, deps) = line.split_once(':')?;
                let deps = deps.split_ascii_whitespace().map(module_name_of).collect();
                Some((module_name_of(path), (PathBuf::from(path), deps)))
            })
            .collect();
        Self { aliases, deps }
    }

    pub fn read(module_dir: &Path) -> Result<Self, ModulesError> {
        let read = |name: &str| {
            let path = module_dir.join(name);
            fs::read_to_string(&path).map_err(|source| ModulesError::ReadIndex { path, source })
        };
        Ok(Self::parse(&read("modules.alias")?, &read("modules.dep")?))
    }

    pub fn contains(&self, module: &str) -> bool {
        self.deps.contains_key(&normalize_name(module))
    }

    pub fn path_of(&self, module: &str) -> Option<&Path> {
        self.deps
            .get(&normalize_name(module))
            .map(|(p, _)| p.as_path())
    }

    pub fn dependencies_of(&self, module: &str) -> &[String] {
        self.deps
            .get(&normalize_name(module))
            .map(|(_, d)| d.as_slice())
            .unwrap_or(&[])
    }

    /// Modules whose alias pattern matches `modalias` and that have a file in this tree
    /// (built-in modules have aliases but nothing to load).
    pub fn modules_for(&self, modalias: &str) -> BTreeSet<&str> {
        self.aliases
            .iter()
            .filter(|(pattern, module)| {
                self.deps.contains_key(module) && glob_match(pattern, modalias)
            })
            .map(|(_, module)| module.as_str())
            .collect()
    }

    /// Every module `module` needs, dependencies first, `module` last.
    pub fn load_order(&self, module: &str) -> Vec<String> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        self.visit(&normalize_name(module), &mut seen, &mut order);
        order
    }

    fn visit(&self, module: &str, seen: &mut HashSet<String>, order: &mut Vec<String>) {
        if !seen.insert(module.to_string()) {
            return;
        }
        for dep in self.dependencies_of(module) {
            self.visit(dep, seen, order);
        }
        order.push(module.to_string());
    }

    /// All modules listed in the tree.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.deps.keys().map(String::as_str)
    }
}

/// Shell-style glob as used by `modules.alias`: `*`, `?` and `[...]` classes.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    backtrack = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class_match(&p[pi..], t[ti]) {
                        if matched {
                            pi += next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == b'[' {
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match backtrack {
            Some((star, star_t)) => {
                pi = star + 1;
                ti = star_t + 1;
                backtrack = Some((star, star_t + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Matches one byte against a `[...]` class at the start of `p`; returns (matched, class length).
fn class_match(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(1), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&e| e != b']') {
            matched |= (p[i]..=p[i + 2]).contains(&c);
            i += 3;
        } else {
            matched |= p[i] == c;
            i += 1;
        }
    }
    None
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
    fn glob_matches_modalias_patterns() {
        assert!(glob_match(
            "pci:v00008086d0000100Esv*sd*bc*sc*i*",
            "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00"
        ));
        assert!(!glob_match(
            "pci:v00008086d0000100Esv*sd*bc*sc*i*",
            "pci:v00008086d0000100Fsv00001AF4sd00001100bc02sc00i00"
        ));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("x[0-9]y", "x5y"));
        assert!(!glob_match("x[!0-9]y", "x5y"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYbc"));
        assert!(!glob_match("a*b*c", "aXXbYYb"));
        assert!(glob_match("scsi:t-0x00*", "scsi:t-0x00"));
    }

    #[test]
    fn finds_modules_and_orders_dependencies_first() {
        let index = ModuleIndex::parse(ALIASES, DEPS);
        let virtio: Vec<_> = index
            .modules_for("pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00")
            .into_iter()
            .collect();
        assert_eq!(virtio, ["virtio_pci"]);
        let order = index.load_order("virtio_net");
        assert_eq!(order.last().map(String::as_str), Some("virtio_net"));
        let pos = |m: &str| order.iter().position(|x| x == m).unwrap();
        assert!(pos("failover") < pos("net_failover"));
        assert!(pos("virtio") < pos("virtio_net"));
        assert_eq!(
            index.path_of("sd-mod"),
            Some(Path::new("kernel/drivers/scsi/sd_mod.ko.xz"))
        );
        // An alias of a module with no file in the tree (built in) asks for nothing.
        assert!(index.modules_for("acpi:PNP0C0A:").is_empty());
    }

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
