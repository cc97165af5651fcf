//! Builds the diskcast initramfs: a reproducible, gzip-compressed newc cpio archive holding the
//! agent as `/init`, `/dev/console`, and the kernel modules for lab hardware with their
//! dependencies, plus a `modules.dep` and `modules.alias` trimmed to what the archive holds,
//! the driver catalogue (`diskcast.drivers`: the PCI aliases of every network and storage
//! driver of the kernel, so the agent can name the module a controller lacks), and firmware
//! files an admin adds (`--firmware DIR`, under `/lib/firmware`).
//!
//! Modules are copied byte for byte: under Secure Boot the kernel is in lockdown and loads only
//! modules whose signature (appended by Debian's build) is intact.
//!
//! Reproducible: entries are sorted, inode numbers sequential, every time stamp zero.
#![forbid(unsafe_code)]

use diskcast_proto::modindex::{normalize_name, ModuleIndex};
use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("no kernel module tree under {0}/lib/modules (run scripts/fetch-kernel)")]
    NoModuleTree(PathBuf),
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the module index of {dir}")]
    Index {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("module {0} is not in the kernel tree (and no other module of the set needs it)")]
    UnknownModule(String),
    #[error("{path} is larger than the 4 GiB a newc entry can hold")]
    TooLarge { path: String },
    #[error("writing the archive to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Drivers for QEMU's devices and common lab hardware: NICs, disk controllers, USB sticks.
pub const DEFAULT_MODULES: &[&str] = &[
    // virtio (QEMU, most clouds)
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    // Intel and Realtek/Broadcom NICs found in lab PCs
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "r8169",
    "tg3",
    // QEMU's and VMware's other NIC models
    "8139cp",
    "8139too",
    "vmxnet3",
    // disks
    "ahci",
    "ata_piix",
    "nvme",
    "sd_mod",
    // NVMe disks behind Intel VMD ("RAID" mode of business laptops and desktops)
    "vmd",
    // USB sticks and their host controllers
    "xhci_pci",
    "ehci_pci",
    "uhci_hcd",
    "ohci_pci",
    "usb_storage",
    "uas",
];

/// Modules that are convenient but need not exist in every kernel build.
const OPTIONAL: &[&str] = &[
    "ata_piix", "uhci_hcd", "ohci_pci", "vmd", "8139too", "8139cp",
];

/// Where the drivers the catalogue lists live in the module tree: network and storage
/// controllers, and the buses disks hang on.
const CATALOGUE_DIRS: &[&str] = &[
    "/net/ethernet/",
    "/net/vmxnet3/",
    "/ata/",
    "/nvme/",
    "/scsi/",
    "/pci/controller/",
    "/virtio/",
    "/message/",
    "/block/",
    "/usb/host/",
];

pub use diskcast_proto::modindex::DRIVER_CATALOGUE;

#[derive(Debug, Clone)]
pub struct Spec {
    /// Root of an extracted kernel package: holds `lib/modules/<version>/`.
    pub kernel_root: PathBuf,
    /// Kernel version; the only one present when `None`.
    pub version: Option<String>,
    pub agent: PathBuf,
    pub modules: Vec<String>,
    /// Modules left out even when the set (or a dependency) names them.
    pub without: Vec<String>,
    /// Directories whose files go under `/lib/firmware` (keeping their relative paths).
    pub firmware: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub version: String,
    pub modules: Vec<String>,
    /// Firmware files packed.
    pub firmware_files: usize,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
}

/// One file or directory of the archive.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    Dir,
    File { mode: u32, data: Vec<u8> },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.into(),
        source,
    })
}

fn kernel_version(spec: &Spec) -> Result<String, InitramfsError> {
    if let Some(version) = &spec.version {
        return Ok(version.clone());
    }
    let dir = spec.kernel_root.join("lib/modules");
    let mut versions: Vec<String> = fs::read_dir(&dir)
        .map_err(|_| InitramfsError::NoModuleTree(spec.kernel_root.clone()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    versions
        .pop()
        .ok_or_else(|| InitramfsError::NoModuleTree(spec.kernel_root.clone()))
}

/// Resolves the module set with dependencies; returns module names sorted.
pub fn resolve(index: &ModuleIndex, wanted: &[String]) -> Result<BTreeSet<String>, InitramfsError> {
    let mut all = BTreeSet::new();
    for module in wanted {
        if !index.contains(module) {
            if OPTIONAL.contains(&normalize_name(module).as_str()) {
                log::info!("optional module {module} not in this kernel, skipped");
                continue;
            }
            return Err(InitramfsError::UnknownModule(module.clone()));
        }
        all.extend(index.load_order(module));
    }
    Ok(all)
}

/// Builds the archive into `out` and says what it holds.
pub fn build(spec: &Spec, out: &Path) -> Result<Summary, InitramfsError> {
    let version = kernel_version(spec)?;
    let module_dir = spec.kernel_root.join("lib/modules").join(&version);
    let read_index = |name: &str| {
        fs::read_to_string(module_dir.join(name)).map_err(|source| InitramfsError::Index {
            dir: module_dir.clone(),
            source,
        })
    };
    let index = ModuleIndex::parse(&read_index("modules.alias")?, &read_index("modules.dep")?);
    let mut modules = resolve(&index, &spec.modules)?;
    for left_out in &spec.without {
        modules.remove(&normalize_name(left_out));
    }

    let mut entries: std::collections::BTreeMap<String, Entry> = Default::default();
    let add_dirs = |entries: &mut std::collections::BTreeMap<String, Entry>, path: &str| {
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            entries.entry(prefix.clone()).or_insert(Entry::Dir);
        }
    };
    for dir in ["dev", "proc", "sys", "run", "tmp", "mnt"] {
        add_dirs(&mut entries, dir);
    }
    entries.insert(
        "dev/console".into(),
        Entry::CharDevice {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    );
    entries.insert(
        "init".into(),
        Entry::File {
            mode: 0o755,
            data: read(&spec.agent)?,
        },
    );

    let base = format!("lib/modules/{version}");
    let mut dep_lines = Vec::new();
    for module in &modules {
        let Some(rel) = index.path_of(module) else {
            continue;
        };
        let rel = rel.to_string_lossy().into_owned();
        let archive_path = format!("{base}/{rel}");
        if let Some(parent) = Path::new(&archive_path).parent() {
            add_dirs(&mut entries, &parent.to_string_lossy());
        }
        entries.insert(
            archive_path,
            Entry::File {
                mode: 0o644,
                data: read(&module_dir.join(&rel))?,
            },
        );
        let deps: Vec<String> = index
            .dependencies_of(module)
            .iter()
            .filter_map(|d| index.path_of(d).map(|p| p.to_string_lossy().into_owned()))
            .collect();
        dep_lines.push(format!("{rel}: {}", deps.join(" ")));
    }
    let alias_text = fs::read_to_string(module_dir.join("modules.alias")).map_err(|source| {
        InitramfsError::Read {
            path: module_dir.join("modules.alias"),
            source,
        }
    })?;
    let alias_lines: Vec<&str> = alias_text
        .lines()
        .filter(|line| {
            line.split_ascii_whitespace()
                .nth(2)
                .is_some_and(|m| modules.contains(&normalize_name(m)))
        })
        .collect();
    entries.insert(
        format!("{base}/modules.dep"),
        Entry::File {
            mode: 0o644,
            data: (dep_lines.join("\n") + "\n").into_bytes(),
        },
    );
    entries.insert(
        format!("{base}/modules.alias"),
        Entry::File {
            mode: 0o644,
            data: (alias_lines.join("\n") + "\n").into_bytes(),
        },
    );
    let catalogue: Vec<&str> = alias_text
        .lines()
        .filter(|line| {
            let mut words = line.split_ascii_whitespace();
            words.next() == Some("alias")
                && words.next().is_some_and(|a| a.starts_with("pci:"))
                && words
                    .next()
                    .and_then(|m| index.path_of(m))
                    .is_some_and(|p| {
                        let path = format!("/{}", p.to_string_lossy());
                        CATALOGUE_DIRS.iter().any(|dir| path.contains(dir))
                    })
        })
        .collect();
    entries.insert(
        format!("{base}/{DRIVER_CATALOGUE}"),
        Entry::File {
            mode: 0o644,
            data: (catalogue.join("\n") + "\n").into_bytes(),
        },
    );
    let mut firmware_files = 0;
    for dir in &spec.firmware {
        for (relative, data) in firmware_files_in(dir)? {
            let archive_path = format!("lib/firmware/{relative}");
            if let Some(parent) = Path::new(&archive_path).parent() {
                add_dirs(&mut entries, &parent.to_string_lossy());
            }
            entries.insert(archive_path, Entry::File { mode: 0o644, data });
            firmware_files += 1;
        }
    }

    let cpio = write_newc(&entries)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let write_err = |source| InitramfsError::Write {
        path: out.into(),
        source,
    };
    gz.write_all(&cpio).map_err(write_err)?;
    let compressed = gz.finish().map_err(write_err)?;
    let tmp = out.with_extension("tmp");
    fs::write(&tmp, &compressed)
        .and_then(|()| fs::rename(&tmp, out))
        .map_err(write_err)?;
    Ok(Summary {
        version,
        modules: modules.into_iter().collect(),
        firmware_files,
        uncompressed_bytes: cpio.len() as u64,
        compressed_bytes: compressed.len() as u64,
    })
}

/// Every regular file under `dir` (links followed), by path relative to it, sorted.
fn firmware_files_in(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, InitramfsError> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = fs::read_dir(&current).map_err(|source| InitramfsError::Read {
            path: current.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.is_file() {
                let relative = path
                    .strip_prefix(dir)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                found.push((relative, read(&path)?));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn write_newc(
    entries: &std::collections::BTreeMap<String, Entry>,
) -> Result<Vec<u8>, InitramfsError> {
    let io_err = |source| InitramfsError::Write {
        path: PathBuf::from("<memory>"),
        source,
    };
    let mut out = Vec::new();
    for (ino, (name, entry)) in entries.iter().enumerate() {
        let builder = cpio::newc::Builder::new(name)
            .ino(ino as u32 + 1)
            .uid(0)
            .gid(0)
            .mtime(0);
        let (builder, data): (_, &[u8]) = match entry {
            Entry::Dir => (builder.mode(0o040755).nlink(2), &[]),
            Entry::File { mode, data } => (builder.mode(0o100000 | mode).nlink(1), data),
            Entry::CharDevice { mode, major, minor } => (
                builder
                    .mode(0o020000 | mode)
                    .nlink(1)
                    .rdev_major(*major)
                    .rdev_minor(*minor),
                &[],
            ),
        };
        let size = u32::try_from(data.len())
            .map_err(|_| InitramfsError::TooLarge { path: name.clone() })?;
        let mut writer = builder.write(&mut out, size);
        writer.write_all(data).map_err(io_err)?;
        writer.finish().map_err(io_err)?;
    }
    cpio::newc::trailer(&mut out).map_err(io_err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_kernel(tag: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("diskcast-initramfs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = root.join("lib/modules/6.1.0-test");
        fs::create_dir_all(dir.join("kernel/net")).unwrap();
        fs::write(dir.join("kernel/net/virtio_net.ko"), b"virtio_net module").unwrap();
        fs::write(dir.join("kernel/net/failover.ko"), b"failover module").unwrap();
        fs::write(dir.join("kernel/net/unrelated.ko"), b"unrelated").unwrap();
        fs::write(
            dir.join("modules.dep"),
            "kernel/net/virtio_net.ko: kernel/net/failover.ko\nkernel/net/failover.ko:\nkernel/net/unrelated.ko:\n",
        )
        .unwrap();
        fs::write(
            dir.join("modules.alias"),
            "alias virtio:d00000001v* virtio_net\nalias pci:v1* unrelated\n",
        )
        .unwrap();
        fs::write(root.join("agent"), b"\x7fELF agent").unwrap();
        root
    }

    fn read_archive(path: &Path) -> Vec<(String, u32, Vec<u8>)> {
        let gz = fs::read(path).unwrap();
        let mut cpio = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut cpio).unwrap();
        let mut entries = Vec::new();
        let mut rest: &[u8] = &cpio;
        loop {
            let mut reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let (name, mode) = (reader.entry().name().to_string(), reader.entry().mode());
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut data).unwrap();
            entries.push((name, mode, data));
            rest = reader.finish().unwrap();
        }
        entries
    }

    #[test]
    fn archive_holds_init_console_and_resolved_modules_and_is_reproducible() {
        let root = fake_kernel("build");
        let spec = Spec {
            kernel_root: root.clone(),
            version: None,
            agent: root.join("agent"),
            modules: vec!["virtio-net".into(), "ata_piix".into()],
            without: vec![],
            firmware: vec![],
        };
        let out = root.join("initramfs.img");
        let summary = build(&spec, &out).unwrap();
        assert_eq!(summary.version, "6.1.0-test");
        assert_eq!(summary.modules, ["failover", "virtio_net"]);
        let first = fs::read(&out).unwrap();
        build(&spec, &out).unwrap();
        assert_eq!(first, fs::read(&out).unwrap(), "two builds differ");

        let entries = read_archive(&out);
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.0 == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        assert_eq!(find("init").1, 0o100755);
        assert_eq!(find("init").2, b"\x7fELF agent");
        assert_eq!(find("dev/console").1, 0o020600);
        let base = "lib/modules/6.1.0-test";
        let alias = String::from_utf8(find(&format!("{base}/modules.alias")).2.clone()).unwrap();
        assert_eq!(alias.trim(), "alias virtio:d00000001v* virtio_net");
        let index = ModuleIndex::parse(
            &alias,
            &String::from_utf8(find(&format!("{base}/modules.dep")).2.clone()).unwrap(),
        );
        assert_eq!(index.load_order("virtio_net"), ["failover", "virtio_net"]);
        assert!(entries.iter().all(|e| !e.0.contains("unrelated")));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn firmware_catalogue_and_left_out_modules() {
        let root = fake_kernel("firmware");
        let dir = root.join("lib/modules/6.1.0-test");
        fs::create_dir_all(dir.join("kernel/drivers/net/ethernet")).unwrap();
        fs::write(dir.join("kernel/drivers/net/ethernet/nic.ko"), b"nic").unwrap();
        let deps = fs::read_to_string(dir.join("modules.dep")).unwrap()
            + "kernel/drivers/net/ethernet/nic.ko:\n";
        fs::write(dir.join("modules.dep"), deps).unwrap();
        let aliases = fs::read_to_string(dir.join("modules.alias")).unwrap()
            + "alias pci:v000010ECd00008168sv*sd*bc*sc*i* nic\n";
        fs::write(dir.join("modules.alias"), aliases).unwrap();
        let firmware = root.join("fw");
        fs::create_dir_all(firmware.join("rtl_nic")).unwrap();
        fs::write(firmware.join("rtl_nic/rtl8168h-2.fw"), b"blob").unwrap();
        let spec = Spec {
            kernel_root: root.clone(),
            version: None,
            agent: root.join("agent"),
            modules: vec!["virtio-net".into(), "nic".into()],
            without: vec!["nic".into()],
            firmware: vec![firmware],
        };
        let out = root.join("initramfs.img");
        let summary = build(&spec, &out).unwrap();
        assert_eq!(summary.modules, ["failover", "virtio_net"], "nic left out");
        assert_eq!(summary.firmware_files, 1);
        let entries = read_archive(&out);
        let find = |name: &str| entries.iter().find(|e| e.0 == name).map(|e| e.2.clone());
        assert_eq!(
            find("lib/firmware/rtl_nic/rtl8168h-2.fw"),
            Some(b"blob".to_vec())
        );
        // The catalogue still knows what would drive the NIC: the agent names it.
        let catalogue =
            String::from_utf8(find(&format!("lib/modules/6.1.0-test/{DRIVER_CATALOGUE}")).unwrap())
                .unwrap();
        assert_eq!(
            catalogue.trim(),
            "alias pci:v000010ECd00008168sv*sd*bc*sc*i* nic"
        );
        assert!(entries.iter().all(|e| !e.0.ends_with("nic.ko")));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unknown_required_module_is_an_error() {
        let root = fake_kernel("unknown");
        let spec = Spec {
            kernel_root: root.clone(),
            version: None,
            agent: root.join("agent"),
            modules: vec!["e1000".into()],
            without: vec![],
            firmware: vec![],
        };
        let err = build(&spec, &root.join("out.img")).unwrap_err();
        assert!(
            matches!(err, InitramfsError::UnknownModule(ref m) if m == "e1000"),
            "{err}"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
