//! The kernel module index that the initramfs builder trims and the agent's loader reads:
//! `modules.alias` (modalias glob → module) and `modules.dep` (module file → dependencies),
//! parsed from their text. Reading the files is the caller's business.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The initramfs's driver catalogue, beside `modules.alias`: `alias` lines for the PCI aliases of
/// every network and storage driver of the kernel, packed or not, so the agent can name the
/// module a controller lacks.
pub const DRIVER_CATALOGUE: &str = "diskcast.drivers";

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

    /// Every module whose alias pattern matches `modalias`, whether or not this tree holds its
    /// file: what *would* drive a device (the catalogue of a whole kernel's drivers).
    pub fn aliases_for(&self, modalias: &str) -> BTreeSet<&str> {
        self.aliases
            .iter()
            .filter(|(pattern, _)| glob_match(pattern, modalias))
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
        // An alias of a module with no file in the tree (built in) asks for nothing...
        assert!(index.modules_for("acpi:PNP0C0A:").is_empty());
        // ...but is still what would drive the device.
        assert_eq!(
            index
                .aliases_for("acpi:PNP0C0A:")
                .into_iter()
                .collect::<Vec<_>>(),
            ["battery"]
        );
    }
}
