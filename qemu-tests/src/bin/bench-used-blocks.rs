//! "Send only used blocks": the Clonezilla way beside diskcast on the same emulated 1 Gbit/s LAN,
//! on a used disk: 3 GiB, an MBR, one ext4 partition with a Debian 12 install (mmdebstrap, with a
//! kernel and extlinux, so it boots) and 1.5 GiB of deleted random data in its free blocks.
//!
//! Per loss setting, interleaved run by run, each to the same receivers (own namespaces, the
//! sender's link limited to 1 Gbit/s with tbf, random UDP loss at every receiver with nftables):
//! - **pipeline**: the partition table and the MBR's boot code saved with `sfdisk --dump` and `dd`
//!   and restored on each target first (a file in the test dir stands for "sent beforehand"; its
//!   time counts), then `partclone.ext4 -c | zstd -1 -T0 | udp-sender` and, at each receiver,
//!   `udp-receiver | zstd -d | partclone.ext4 -r` onto the target's partition;
//! - **diskcast p2p**: `agent send IMAGE` to `agent receive TARGET`;
//! - **diskcast deploy**: `bootserver images import` once (timed apart), then `bootserver deploy`.
//!
//! Every copy is then checked the same way: the partition table and the MBR's boot code equal the
//! source's, the partition's boot sector and ldlinux.sys's block list equal the source's (what
//! extlinux needs to boot), `e2fsck -fn` clean, and every file, link, device and directory equal
//! to the source's (type, mode, owner, size, mtime, content). `--boot N` also boots N copies per
//! tool and loss (of the first run) in QEMU (TCG, under /tmp/diskcast-qemu.lock, a snapshot: the
//! copy is not changed) until Debian's login prompt; 0 skips that.
//!
//! `scripts/bench-used-blocks [--receivers 3] [--loss 0,5] [--runs 1] [--boot 1] [--keep]
//!  [--only pipeline,diskcast,deploy] [--udp-sender-opts "--max-bitrate 600m"]`
//!
//! The source disk is cached as target/bench/used-disk.img (delete it to rebuild). Loop devices
//! stand for disks (this kernel reads no partition tables: partitions are loop devices at the
//! partition's offset). Everything started is stopped and every loop device and mount removed,
//! also on failure; `--keep` keeps the copies, the image store and the Debian tree.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{project_root, Lab};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const DISK_SIZE: u64 = 3 << 30;
const PART_START_SECTOR: u64 = 2048;
const GARBAGE_MIB: u64 = 1536;
const ROOT_UUID: &str = "5e1ec7ed-d15c-4a57-9000-000000000001";
const DISK_ID: &str = "0x5e1ec7ed";
const STORE_NAME: &str = "used-disk";
const TOOL_TIMEOUT: Duration = Duration::from_secs(600);
const AFTER_SENDER: Duration = Duration::from_secs(60);
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const LOCK_WAIT: Duration = Duration::from_secs(1800);

// ---------------------------------------------------------------------------------------------
// Commands

fn describe(cmd: &Command) -> String {
    format!("{cmd:?}").replace('"', "")
}

/// Runs a command; its stdout, or why it failed.
fn try_run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{}: {e}", describe(cmd)))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} failed ({}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn must(cmd: &mut Command) -> String {
    try_run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).stdin(Stdio::null());
    c
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Starts `bash -o pipefail -c SCRIPT` in a host's namespace, in its own process group (stopped
/// as a whole by [`stop_group`]), output to `log`.
fn spawn_ns(netns: &str, script: &str, log: &Path) -> Child {
    let file = fs::File::create(log).unwrap();
    Command::new("ip")
        .args([
            "netns", "exec", netns, "bash", "-o", "pipefail", "-c", script,
        ])
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {script}: {e}"))
}

/// Kills the process group a child of ours leads (the pipeline behind it too), then reaps it.
fn stop_group(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .status();
    }
    let _ = child.wait();
}

/// Children of ours, each leading its process group: whatever still runs when this is dropped
/// (a failed run, a panic) is killed.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            stop_group(c);
        }
    }
}

/// Waits for every child; those still running at the deadline are killed (status `None`). The
/// last child is the sender: once it is gone, the receivers get [`AFTER_SENDER`] to finish (a
/// receiver udp-sender dropped may wait forever).
fn wait_all(children: &mut [Child], timeout: Duration) -> Vec<Option<ExitStatus>> {
    let mut deadline = Instant::now() + timeout;
    let mut sender_gone = false;
    let mut status: Vec<Option<ExitStatus>> = vec![None; children.len()];
    loop {
        for (c, s) in children.iter_mut().zip(status.iter_mut()) {
            if s.is_none() {
                *s = c.try_wait().ok().flatten();
            }
        }
        if status.iter().all(Option::is_some) {
            return status;
        }
        if !sender_gone && status.last().is_some_and(Option::is_some) {
            sender_gone = true;
            deadline = deadline.min(Instant::now() + AFTER_SENDER);
        }
        if Instant::now() > deadline {
            for (c, s) in children.iter_mut().zip(&status) {
                if s.is_none() {
                    stop_group(c);
                }
            }
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tx_bytes(netns: &str) -> u64 {
    let path = "/sys/class/net/eth0/statistics/tx_bytes";
    match try_run(&mut cmd("ip", &["netns", "exec", netns, "cat", path])) {
        Ok(text) => text.trim().parse().unwrap_or(0),
        Err(e) => {
            // Seen once on this shared machine: the namespace's file hidden for a while.
            eprintln!("warning: {e}");
            0
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Guards: loop devices and mounts go away when dropped, also while panicking.

/// A loop device over `file` from `offset`, `size` bytes long (a disk, or one partition of it).
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path, offset: u64, size: Option<u64>, read_only: bool) -> Self {
        let mut c = cmd(
            "losetup",
            &["--find", "--show", "--offset", &offset.to_string()],
        );
        if let Some(size) = size {
            c.args(["--sizelimit", &size.to_string()]);
        }
        if read_only {
            c.arg("--read-only");
        }
        let dev = must(c.arg(file)).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        Self { dev }
    }

    /// The first partition of a disk image, as its own partition table places it.
    fn partition(disk: &Path, read_only: bool) -> Self {
        let (start, size) = first_partition(disk);
        Self::attach(disk, start, Some(size), read_only)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for _ in 0..20 {
            if cmd("losetup", &["-d", &self.dev])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not detach {}", self.dev);
    }
}

struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn new(dev: &str, dir: &Path, options: &str) -> Self {
        Self::try_new(dev, dir, options).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_new(dev: &str, dir: &Path, options: &str) -> Result<Self, String> {
        fs::create_dir_all(dir).unwrap();
        match try_run(&mut cmd("mount", &["-o", options, dev, p(dir)])) {
            Ok(_) => Ok(Self { dir: dir.into() }),
            Err(e) => {
                let _ = fs::remove_dir(dir);
                Err(e)
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = cmd("umount", &[p(&self.dir)])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = cmd("umount", &["-l", p(&self.dir)]).status();
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// A partition mounted through its loop device; the mount goes first (fields drop in order).
struct Mounted {
    mount: Mount,
    _part: Loop,
}

/// Unmounts and detaches what a killed earlier run of this bench left under `work` or on `disk`,
/// and removes the namespaces of its labs (`dc-used-LOSS-PID...`) whose process is gone.
fn clean_leftovers(work: &Path, disk: &Path) {
    let names: Vec<String> = fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for name in names.iter().filter(|n| n.starts_with("dc-used-")) {
        let pid = name.split('-').nth(3).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            eprintln!("cleaning up an old namespace: {name}");
            let _ = cmd("ip", &["netns", "del", name]).status();
        }
    }
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut ours: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(p(work)))
        .collect();
    ours.reverse();
    for m in ours {
        eprintln!("cleaning up an old mount: {m}");
        let _ = cmd("umount", &["-l", m]).status();
    }
    let list =
        try_run(&mut cmd("losetup", &["-n", "-l", "-O", "NAME,BACK-FILE"])).unwrap_or_default();
    let disk_tmp = disk.with_extension("img.part");
    for line in list.lines() {
        let mut it = line.split_whitespace();
        let (Some(dev), Some(back)) = (it.next(), it.next()) else {
            continue;
        };
        if back.starts_with(p(work)) || back == p(disk) || back == p(&disk_tmp) {
            eprintln!("cleaning up an old loop device: {dev} on {back}");
            let _ = cmd("losetup", &["-d", dev]).status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Partition tables

fn partition_table(disk: &Path) -> serde_json::Value {
    let text = must(&mut cmd("sfdisk", &["-J", p(disk)]));
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let t = &mut v["partitiontable"];
    // Where the table was read from is no part of it.
    t.as_object_mut().unwrap().remove("device");
    for part in t["partitions"].as_array_mut().unwrap() {
        part.as_object_mut().unwrap().remove("node");
    }
    v
}

/// Byte offset and length of the first partition.
fn first_partition(disk: &Path) -> (u64, u64) {
    let t = partition_table(disk);
    let sector = t["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    let part = &t["partitiontable"]["partitions"][0];
    let start = part["start"].as_u64().expect("no first partition");
    let size = part["size"].as_u64().unwrap();
    (start * sector, size * sector)
}

fn read_at(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

// ---------------------------------------------------------------------------------------------
// The source disk

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `mmdebstrap` of Debian 12 with a kernel (through apt's own sources), kept as a directory.
fn debian_tree(tree: &Path, log: &Path) {
    let done = tree.with_extension("complete");
    if done.exists() {
        return;
    }
    let _ = fs::remove_dir_all(tree);
    eprintln!(
        "source: mmdebstrap --variant=important bookworm + linux-image-amd64 (a few minutes; log {})",
        log.display()
    );
    let started = Instant::now();
    let out = fs::File::create(log).unwrap();
    let status = Command::new("mmdebstrap")
        .args([
            "--variant=important",
            "--include=linux-image-amd64,systemd-sysv,udev,initramfs-tools",
            "bookworm",
            p(tree),
        ])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    assert!(status.success(), "mmdebstrap failed: see {}", log.display());
    eprintln!(
        "source: Debian tree made in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    fs::write(done, "").unwrap();
}

/// Builds the used disk at `path` (through `PATH.part`, renamed when complete).
fn build_source_disk(path: &Path, work: &Path, keep: bool) {
    let tree = work.join("debian-root");
    debian_tree(&tree, &work.join("mmdebstrap.log"));
    let boot = tree.join("boot");
    let find = |prefix: &str| {
        fs::read_dir(&boot)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}* in {}", boot.display()))
    };
    let (kernel, initrd) = (find("vmlinuz-"), find("initrd.img-"));
    fs::create_dir_all(boot.join("extlinux")).unwrap();
    fs::write(
        boot.join("extlinux/extlinux.conf"),
        format!(
            "DEFAULT debian\nPROMPT 0\nTIMEOUT 0\nLABEL debian\n  LINUX /boot/{kernel}\n  \
             INITRD /boot/{initrd}\n  APPEND root=UUID={ROOT_UUID} ro console=ttyS0,115200\n"
        ),
    )
    .unwrap();
    fs::write(
        tree.join("etc/fstab"),
        format!("UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"),
    )
    .unwrap();
    fs::write(tree.join("etc/hostname"), "used-disk\n").unwrap();

    let tmp = path.with_extension("img.part");
    let _ = fs::remove_file(&tmp);
    fs::File::create(&tmp).unwrap().set_len(DISK_SIZE).unwrap();
    let table =
        format!("label: dos\nlabel-id: {DISK_ID}\nstart={PART_START_SECTOR}, type=83, bootable\n");
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", p(&tmp)])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(table.as_bytes())
        .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    // The MBR's boot code: syslinux's, which starts the active partition's boot sector.
    let mbr = fs::read("/usr/lib/syslinux/mbr/mbr.bin").expect("syslinux-common's mbr.bin");
    fs::OpenOptions::new()
        .write(true)
        .open(&tmp)
        .unwrap()
        .write_all_at(&mbr[..440.min(mbr.len())], 0)
        .unwrap();

    let part = Loop::partition(&tmp, false);
    eprintln!("source: mkfs.ext4 -d (the Debian tree, no mounting)");
    must(&mut cmd(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "debian",
            "-U",
            ROOT_UUID,
            "-d",
            p(&tree),
            &part.dev,
        ],
    ));
    {
        let mnt = Mount::new(&part.dev, &work.join("mnt-build"), "rw");
        must(&mut cmd(
            "extlinux",
            &["--install", p(&mnt.dir.join("boot/extlinux"))],
        ));
        eprintln!(
            "source: writing {GARBAGE_MIB} MiB of random data into files, then deleting them"
        );
        let garbage = mnt.dir.join("garbage");
        fs::create_dir_all(&garbage).unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut buf = vec![0u8; 1 << 20];
        for f in 0..GARBAGE_MIB / 64 {
            let mut file = fs::File::create(garbage.join(format!("junk{f}"))).unwrap();
            for _ in 0..64 {
                for word in buf.chunks_exact_mut(8) {
                    word.copy_from_slice(&rng.next().to_le_bytes());
                }
                file.write_all(&buf).unwrap();
            }
            // On disk before it is deleted (delayed allocation would otherwise never write it).
            file.sync_all().unwrap();
        }
        fs::remove_dir_all(&garbage).unwrap();
        must(&mut cmd("sync", &["-f", p(&mnt.dir)]));
    }
    must(&mut cmd("e2fsck", &["-fn", &part.dev]));
    check_garbage(&tmp, &part.dev);
    drop(part);
    fs::rename(&tmp, path).unwrap();
    if !keep {
        let _ = fs::remove_dir_all(&tree);
        let _ = fs::remove_file(tree.with_extension("complete"));
    }
}

/// Samples free blocks of the file system: how much of its free space holds the deleted data.
fn check_garbage(disk: &Path, dev: &str) -> f64 {
    let dump = must(cmd("dumpe2fs", &[dev]).stderr(Stdio::null()));
    let block_size: u64 = dump
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let mut ranges = Vec::new();
    for line in dump.lines().skip_while(|l| !l.starts_with("Group ")) {
        if let Some(list) = line.trim_start().strip_prefix("Free blocks: ") {
            for r in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                ranges.push((a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()));
            }
        }
    }
    let free: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
    let (offset, _) = first_partition(disk);
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let samples = 4000;
    let mut dirty = 0;
    for _ in 0..samples {
        let mut i = rng.next() % free;
        let block = ranges
            .iter()
            .find_map(|(a, b)| {
                let n = b - a + 1;
                if i < n {
                    Some(a + i)
                } else {
                    i -= n;
                    None
                }
            })
            .unwrap();
        if read_at(disk, offset + block * block_size, block_size as usize)
            .iter()
            .any(|&b| b != 0)
        {
            dirty += 1;
        }
    }
    let share = f64::from(dirty) / f64::from(samples);
    let garbage = share * (free * block_size) as f64;
    eprintln!(
        "source: {:.2} GiB free in the file system; {:.0} % of {samples} sampled free blocks hold data: about {:.2} GiB of deleted data",
        (free * block_size) as f64 / f64::from(1 << 30),
        share * 100.0,
        garbage / f64::from(1 << 30)
    );
    assert!(
        garbage > 0.8 * (GARBAGE_MIB << 20) as f64,
        "the free blocks hold less deleted data than was written"
    );
    share
}

// ---------------------------------------------------------------------------------------------
// What a copy is checked against

struct Reference {
    disk: PathBuf,
    table: serde_json::Value,
    boot_code: Vec<u8>,
    boot_sector: Vec<u8>,
    ldlinux_blocks: String,
    /// The source's file system, mounted read-only.
    mounted: Mounted,
    files: u64,
}

fn ldlinux_blocks(dev: &str) -> String {
    must(cmd("debugfs", &["-R", "blocks /boot/extlinux/ldlinux.sys", dev]).stderr(Stdio::null()))
        .trim()
        .to_string()
}

impl Reference {
    fn new(disk: &Path, work: &Path) -> Self {
        let part = Loop::partition(disk, true);
        let (offset, _) = first_partition(disk);
        let blocks = ldlinux_blocks(&part.dev);
        assert!(!blocks.is_empty(), "no ldlinux.sys blocks in the source");
        let mount = Mount::new(&part.dev, &work.join("mnt-source"), "ro,noload");
        let mounted = Mounted { mount, _part: part };
        let files = compare_trees(&mounted.mount.dir, &mounted.mount.dir).unwrap();
        Self {
            disk: disk.into(),
            table: partition_table(disk),
            boot_code: read_at(disk, 0, 440),
            boot_sector: read_at(disk, offset, 1024),
            ldlinux_blocks: blocks,
            mounted,
            files,
        }
    }
}

/// Compares two trees: every entry's type, mode, owner, size, mtime, link target, device number
/// and content, both ways. The number of entries, or the first difference.
fn compare_trees(a: &Path, b: &Path) -> Result<u64, String> {
    let mut count = 0;
    let mut stack = vec![PathBuf::new()];
    let mut buf_a = vec![0u8; 1 << 20];
    let mut buf_b = vec![0u8; 1 << 20];
    while let Some(rel) = stack.pop() {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let (ma, mb) = (
            fs::symlink_metadata(&pa).map_err(|e| format!("{}: {e}", pa.display()))?,
            fs::symlink_metadata(&pb).map_err(|e| format!("{}: {e}", pb.display()))?,
        );
        count += 1;
        let what = |field: &str| format!("/{}: {field} differs", rel.display());
        if ma.mode() != mb.mode() {
            return Err(what("type or mode"));
        }
        if (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            return Err(what("owner"));
        }
        if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
            return Err(what("mtime"));
        }
        if ma.rdev() != mb.rdev() {
            return Err(what("device number"));
        }
        let ft = ma.file_type();
        if ft.is_dir() {
            let names = |d: &Path| -> Result<Vec<_>, String> {
                let mut v: Vec<_> = fs::read_dir(d)
                    .map_err(|e| format!("{}: {e}", d.display()))?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                v.sort();
                Ok(v)
            };
            let (na, nb) = (names(&pa)?, names(&pb)?);
            if na != nb {
                return Err(what("list of entries"));
            }
            stack.extend(na.into_iter().map(|n| rel.join(n)));
        } else if ft.is_symlink() {
            if fs::read_link(&pa).ok() != fs::read_link(&pb).ok() {
                return Err(what("link target"));
            }
        } else if ft.is_file() {
            if ma.len() != mb.len() {
                return Err(what("size"));
            }
            if pa == pb {
                continue;
            }
            let (mut fa, mut fb) = (
                fs::File::open(&pa).map_err(|e| e.to_string())?,
                fs::File::open(&pb).map_err(|e| e.to_string())?,
            );
            loop {
                let n = read_full(&mut fa, &mut buf_a)?;
                let m = read_full(&mut fb, &mut buf_b)?;
                if n != m || buf_a[..n] != buf_b[..m] {
                    return Err(what("content"));
                }
                if n == 0 {
                    break;
                }
            }
        }
    }
    Ok(count)
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> Result<usize, String> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).map_err(|e| e.to_string())? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[derive(Clone)]
struct CopyCheck {
    /// The tool's own word: exit status 0 (for the agent: its copy verified).
    transfer: bool,
    /// Partition table, MBR boot code, the partition's boot sector, ldlinux.sys's blocks.
    boot_structure: Result<(), String>,
    fsck: bool,
    files: Result<u64, String>,
    /// Booted to Debian's login prompt in QEMU (`None`: not tried).
    booted: Option<bool>,
}

impl CopyCheck {
    fn ok(&self) -> bool {
        self.transfer
            && self.boot_structure.is_ok()
            && self.fsck
            && self.files.is_ok()
            && self.booted != Some(false)
    }

    fn problems(&self) -> String {
        let mut v = Vec::new();
        if !self.transfer {
            v.push("the tool failed".to_string());
        }
        if let Err(e) = &self.boot_structure {
            v.push(e.clone());
        }
        if !self.fsck {
            v.push("e2fsck -fn not clean".into());
        }
        if let Err(e) = &self.files {
            v.push(format!("files: {e}"));
        }
        if self.booted == Some(false) {
            v.push("did not boot".into());
        }
        v.join("; ")
    }
}

fn verify_copy(
    target: &Path,
    reference: &Reference,
    work: &Path,
    transfer: bool,
    log: &Path,
) -> CopyCheck {
    let mut check = CopyCheck {
        transfer,
        boot_structure: Ok(()),
        fsck: false,
        files: Err("not checked".into()),
        booted: None,
    };
    if !target.exists() || fs::metadata(target).map(|m| m.len()).unwrap_or(0) < DISK_SIZE {
        check.boot_structure = Err("no full-size copy".into());
        return check;
    }
    let table = try_run(&mut cmd("sfdisk", &["-J", p(target)]));
    if table.is_err() || partition_table(target) != reference.table {
        check.boot_structure = Err("partition table differs".into());
        return check;
    }
    let (offset, _) = first_partition(target);
    let mut structure = Vec::new();
    if read_at(target, 0, 440) != reference.boot_code {
        structure.push("MBR boot code differs");
    }
    if read_at(target, offset, 1024) != reference.boot_sector {
        structure.push("the partition's boot sector differs");
    }
    let part = Loop::partition(target, true);
    let fsck = cmd("e2fsck", &["-fn", &part.dev]).output().unwrap();
    check.fsck = fsck.status.success();
    let mut text = String::from_utf8_lossy(&fsck.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&fsck.stderr));
    let _ = fs::write(log, text);
    if try_run(
        cmd(
            "debugfs",
            &["-R", "blocks /boot/extlinux/ldlinux.sys", &part.dev],
        )
        .stderr(Stdio::null()),
    )
    .map(|s| s.trim().to_string())
    .ok()
    .as_deref()
        != Some(reference.ldlinux_blocks.as_str())
    {
        structure.push("ldlinux.sys is not where the boot sector looks for it");
    }
    if !structure.is_empty() {
        check.boot_structure = Err(structure.join(", "));
    }
    check.files = match Mount::try_new(&part.dev, &work.join("mnt-copy"), "ro,noload") {
        Ok(mount) => {
            let copy = Mounted { mount, _part: part };
            compare_trees(&reference.mounted.mount.dir, &copy.mount.dir)
        }
        Err(_) => Err("the file system does not mount".into()),
    };
    check
}

/// Boots a copy (read-only: QEMU's snapshot) until Debian's login prompt.
fn boot_copy(target: &Path, log: &Path) -> (bool, f64) {
    const LOCKED: &[u8] = b"bench-used-blocks: QEMU lock taken";
    let file = fs::File::create(log).unwrap();
    // Other checkouts' QEMU tests hold the same lock, sometimes for minutes: the boot's own time
    // runs from when the lock is ours.
    let mut child = Command::new("flock")
        .args([
            "-w",
            &LOCK_WAIT.as_secs().to_string(),
            "/tmp/diskcast-qemu.lock",
            "sh",
            "-c",
            &format!("echo '{}'; exec \"$@\"", String::from_utf8_lossy(LOCKED)),
            "sh",
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-smp",
            "1",
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
            "-drive",
            &format!("file={},format=raw,if=virtio,snapshot=on", p(target)),
        ])
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .process_group(0)
        .spawn()
        .expect("starting qemu-system-x86_64");
    let mut started = None;
    let waiting_since = Instant::now();
    let booted = loop {
        let text = fs::read(log).unwrap_or_default();
        let says = |what: &[u8]| text.windows(what.len()).any(|w| w == what);
        if started.is_none() && says(LOCKED) {
            started = Some(Instant::now());
        }
        if says(b"login:") {
            break true;
        }
        // SeaBIOS, the syslinux MBR and the kernel giving up: no need to wait for the timeout.
        if says(b"No bootable device")
            || says(b"Boot failed")
            || says(b"Missing operating system")
            || says(b"Kernel panic")
            || says(b"Failed to load ldlinux")
        {
            break false;
        }
        let late = match started {
            Some(t) => t.elapsed() > BOOT_TIMEOUT,
            None => waiting_since.elapsed() > LOCK_WAIT + Duration::from_secs(5),
        };
        if late || child.try_wait().ok().flatten().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let seconds = started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    stop_group(&mut child);
    (booted, seconds)
}

// ---------------------------------------------------------------------------------------------
// The tools

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Pipeline,
    Diskcast,
    Deploy,
}

impl Tool {
    const ALL: [Tool; 3] = [Tool::Pipeline, Tool::Diskcast, Tool::Deploy];

    fn label(self) -> &'static str {
        match self {
            Tool::Pipeline => "partclone+zstd+udpcast",
            Tool::Diskcast => "diskcast p2p",
            Tool::Deploy => "diskcast deploy",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Tool::Pipeline => "pipeline",
            Tool::Diskcast => "diskcast",
            Tool::Deploy => "deploy",
        }
    }
}

struct RunResult {
    seconds: f64,
    /// Of `seconds`: saving and restoring the partition table and boot code (the pipeline).
    prep_seconds: f64,
    wire_bytes: u64,
    copies: Vec<CopyCheck>,
    /// What the tool said it took as used: partclone's "Space in use", the agent's data bytes.
    used: Option<String>,
    /// Copies to boot when every transfer is done: receiver index and where the copy was put.
    to_boot: Vec<(usize, PathBuf)>,
}

struct Bench {
    agent: PathBuf,
    /// diskcast's senders sign with this key (`--key`); its receivers trust only its public key
    /// (`--trust`), as a real deployment would since sessions are signed.
    key: PathBuf,
    public_key: String,
    bootserver: PathBuf,
    reference: Reference,
    /// The source's partition, read-only, not mounted (partclone's source).
    source_part: Loop,
    store: PathBuf,
    work: PathBuf,
    logs: PathBuf,
    keep: bool,
    boot: usize,
    /// Added to udp-sender's command line (`--udp-sender-opts`, e.g. Clonezilla's tuning advice
    /// `--max-bitrate 150m`); none by default, as Clonezilla's `udp_sender_extra_opt_default`.
    udp_sender_opts: String,
}

fn partclone_used(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.starts_with("Space in use:"))?;
    let blocks: u64 = line
        .split('=')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let block_size: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(format!(
        "{:.2} GB ({blocks} blocks of {block_size})",
        (blocks * block_size) as f64 / 1e9
    ))
}

fn agent_used(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.contains("image: ") && l.contains(" of data"))?;
    let rest = line.split("image: ").nth(1)?;
    Some(rest.split(", scanned").next()?.to_string())
}

impl Bench {
    /// One transfer to every receiver, then the checks; the first `boot` good copies are put
    /// aside to be booted at the end.
    fn run(
        &self,
        tool: Tool,
        sender: &str,
        receivers: &[String],
        tag: &str,
        boot: usize,
    ) -> RunResult {
        let dir = self
            .work
            .join("runs")
            .join(format!("{tag}-{}", tool.slug()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let n = receivers.len();
        let targets: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("rx{i}.img"))).collect();
        let log = |who: &str| self.logs.join(format!("{tag}-{}-{who}.log", tool.slug()));
        let min = n.to_string();
        let source = p(&self.reference.disk);

        // The pipeline restores the partition table and the MBR before the data comes.
        let prep_started = Instant::now();
        let mut rx_parts = Vec::new();
        if tool == Tool::Pipeline {
            let table = dir.join("source.sfdisk");
            let mbr = dir.join("source-mbr.bin");
            fs::write(&table, must(&mut cmd("sfdisk", &["--dump", source]))).unwrap();
            must(&mut cmd(
                "dd",
                &[
                    &format!("if={source}"),
                    &format!("of={}", p(&mbr)),
                    "bs=446",
                    "count=1",
                    "status=none",
                ],
            ));
            for t in &targets {
                fs::File::create(t).unwrap().set_len(DISK_SIZE).unwrap();
                must(
                    Command::new("sfdisk")
                        .args(["-q", p(t)])
                        .stdin(fs::File::open(&table).unwrap()),
                );
                must(&mut cmd(
                    "dd",
                    &[
                        &format!("if={}", p(&mbr)),
                        &format!("of={}", p(t)),
                        "bs=446",
                        "count=1",
                        "conv=notrunc",
                        "status=none",
                    ],
                ));
                rx_parts.push(Loop::partition(t, false));
            }
        }
        let prep_seconds = if tool == Tool::Pipeline {
            prep_started.elapsed().as_secs_f64()
        } else {
            0.0
        };

        let before = tx_bytes(sender);
        let mut rx = Procs(
            (0..n)
                .map(|i| {
                    let script = match tool {
                        Tool::Pipeline => format!(
                            "udp-receiver --interface eth0 --nokbd | zstd -d -q | \
                         partclone.ext4 -r -z 10485760 -s - -o {} -L {}",
                            rx_parts[i].dev,
                            p(&log(&format!("rx{i}-partclone")))
                        ),
                        Tool::Diskcast | Tool::Deploy => format!(
                            "exec {} receive -i eth0 --wait 120 --trust {} {}",
                            p(&self.agent),
                            self.public_key,
                            p(&targets[i])
                        ),
                    };
                    spawn_ns(&receivers[i], &script, &log(&format!("rx{i}")))
                })
                .collect(),
        );
        std::thread::sleep(Duration::from_millis(700));
        let started = Instant::now();
        let sender_log = log("sender");
        let script = match tool {
            Tool::Pipeline => format!(
                "partclone.ext4 -c -z 10485760 -s {} -o - -L {} | zstd -1 -T0 -q | \
                 udp-sender --interface eth0 --nokbd --min-receivers {min} --nopointopoint {}",
                self.source_part.dev,
                p(&log("sender-partclone")),
                self.udp_sender_opts
            ),
            Tool::Diskcast => format!(
                "exec {} send -i eth0 --min-receivers {min} --start-timeout 60 --key {} {source}",
                p(&self.agent),
                p(&self.key)
            ),
            Tool::Deploy => format!(
                "exec {} deploy {STORE_NAME} --store {} --key {} -i eth0 --min-receivers {min} --start-timeout 60",
                p(&self.bootserver),
                p(&self.store),
                p(&self.key)
            ),
        };
        rx.0.push(spawn_ns(sender, &script, &sender_log));
        let status = wait_all(&mut rx.0, TOOL_TIMEOUT);
        drop(rx);
        let seconds = started.elapsed().as_secs_f64() + prep_seconds;
        let wire_bytes = tx_bytes(sender).saturating_sub(before);
        drop(rx_parts);
        let sender_ok = status[n].is_some_and(|s| s.success());
        let used = match tool {
            Tool::Pipeline => partclone_used(&log("sender-partclone")),
            Tool::Diskcast => agent_used(&sender_log),
            Tool::Deploy => None,
        };
        let copies: Vec<CopyCheck> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let transfer = sender_ok && status[i].is_some_and(|s| s.success());
                verify_copy(
                    t,
                    &self.reference,
                    &self.work,
                    transfer,
                    &log(&format!("rx{i}-fsck")),
                )
            })
            .collect();
        // Booted after every transfer (the QEMU lock may be held by others for minutes): moved
        // aside until then.
        let queue = self.work.join("boot-queue");
        fs::create_dir_all(&queue).unwrap();
        let to_boot = copies
            .iter()
            .enumerate()
            .filter(|(_, c)| c.ok())
            .take(boot)
            .map(|(i, _)| {
                let kept = queue.join(format!("{tag}-{}-rx{i}.img", tool.slug()));
                fs::rename(&targets[i], &kept).unwrap();
                (i, kept)
            })
            .collect();
        if !self.keep {
            let _ = fs::remove_dir_all(&dir);
        }
        RunResult {
            seconds,
            prep_seconds,
            wire_bytes,
            copies,
            used,
            to_boot,
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn arg<'a>(args: &'a [String], name: &str, default: &'a str) -> &'a str {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, String::as_str)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let receivers: usize = arg(&args, "--receivers", "3")
        .parse()
        .expect("--receivers N");
    let losses: Vec<f64> = arg(&args, "--loss", "0,5")
        .split(',')
        .map(|v| v.parse().expect("--loss L,L"))
        .collect();
    let runs: usize = arg(&args, "--runs", "1").parse().expect("--runs N");
    let boot: usize = arg(&args, "--boot", "1").parse().expect("--boot N");
    let keep = args.iter().any(|a| a == "--keep");
    let udp_sender_opts = arg(&args, "--udp-sender-opts", "").to_string();
    let tools: Vec<Tool> = arg(&args, "--only", "pipeline,diskcast,deploy")
        .split(',')
        .map(|t| {
            *Tool::ALL
                .iter()
                .find(|x| x.slug() == t)
                .unwrap_or_else(|| panic!("--only: {t}? (pipeline, diskcast, deploy)"))
        })
        .collect();
    assert!(
        must(&mut cmd("id", &["-u"])).trim() == "0",
        "this bench needs root (loop devices, mounts, namespaces)"
    );
    let load_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let root = project_root();
    let bench_dir = root.join("target/bench");
    let work = bench_dir.join("used-blocks");
    let disk = bench_dir.join("used-disk.img");
    fs::create_dir_all(&work).unwrap();
    clean_leftovers(&work, &disk);
    let _ = fs::remove_dir_all(work.join("runs"));
    let _ = fs::remove_dir_all(work.join("boot-queue"));
    let logs = work.join("logs");
    let _ = fs::remove_dir_all(&logs);
    fs::create_dir_all(&logs).unwrap();

    if !disk.exists() {
        let started = Instant::now();
        build_source_disk(&disk, &work, keep);
        eprintln!(
            "source: built {} in {:.0} s",
            disk.display(),
            started.elapsed().as_secs_f64()
        );
    }
    let reference = Reference::new(&disk, &work);
    eprintln!(
        "source: {} ({} entries in its file system), table, boot code and extlinux recorded",
        disk.display(),
        reference.files
    );
    let source_part = Loop::partition(&disk, true);

    // The signing key of diskcast's senders, and the public key its receivers trust.
    let agent = diskcast_qemu_tests::host_agent();
    let key = work.join("bench.key");
    let _ = fs::remove_file(&key);
    must(&mut cmd(p(&agent), &["key", "new", p(&key)]));
    let public_key = must(&mut cmd(p(&agent), &["key", "show", p(&key)]))
        .trim()
        .to_string();

    // The image store, imported once; its time is reported apart.
    let store = work.join("store");
    let _ = fs::remove_dir_all(&store);
    let bootserver = root.join("target/release/bootserver");
    let (mut stored, mut import_seconds) = ("(not imported)".to_string(), 0.0);
    if tools.contains(&Tool::Deploy) {
        let started = Instant::now();
        let import = must(&mut cmd(
            p(&bootserver),
            &[
                "images",
                "--store",
                p(&store),
                "--key",
                p(&key),
                "import",
                p(&disk),
                STORE_NAME,
            ],
        ));
        import_seconds = started.elapsed().as_secs_f64();
        let show = must(&mut cmd(
            p(&bootserver),
            &["images", "--store", p(&store), "show", STORE_NAME],
        ));
        stored = show
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .map_or_else(|| import.trim().to_string(), |s| s.trim().to_string());
        eprintln!("import: {:.1} s, {}", import_seconds, import.trim());
    }

    let bench = Bench {
        agent,
        key,
        public_key,
        bootserver,
        reference,
        source_part,
        store,
        work: work.clone(),
        logs: logs.clone(),
        keep,
        boot,
        udp_sender_opts,
    };

    let mut rows: Vec<(f64, Tool, Vec<RunResult>)> = Vec::new();
    for &loss in &losses {
        let mut lab = Lab::new(&format!("used-{loss}"));
        let sender = lab.add_host("snd", "10.77.0.10/24");
        Lab::limit_egress(&sender, "eth0", 1000);
        let rx: Vec<String> = (0..receivers)
            .map(|i| lab.add_host(&format!("r{i}"), &format!("10.77.0.{}/24", 20 + i)))
            .collect();
        if loss > 0.0 {
            for r in &rx {
                Lab::add_ingress_loss(r, loss);
            }
        }
        let mut results: Vec<(Tool, Vec<RunResult>)> =
            tools.iter().map(|&t| (t, Vec::new())).collect();
        for run in 0..runs {
            for (tool, list) in &mut results {
                // Booting takes a minute a copy: the first run's copies only.
                let boot = if run == 0 { bench.boot } else { 0 };
                let r = bench.run(*tool, &sender, &rx, &format!("loss{loss}-run{run}"), boot);
                let ok = r.copies.iter().filter(|c| c.ok()).count();
                eprintln!(
                    "loss {loss}% run {run}: {}: {:.1} s, wire {:.2}x the disk, {ok}/{receivers} copies ok{}",
                    tool.label(),
                    r.seconds,
                    r.wire_bytes as f64 / DISK_SIZE as f64,
                    r.used.as_deref().map(|u| format!("; used: {u}")).unwrap_or_default()
                );
                for (i, c) in r.copies.iter().enumerate().filter(|(_, c)| !c.ok()) {
                    eprintln!("  rx{i}: {}", c.problems());
                }
                list.push(r);
            }
        }
        for (tool, list) in results {
            rows.push((loss, tool, list));
        }
        drop(lab);
    }

    for (_, tool, list) in &mut rows {
        for r in list.iter_mut() {
            for (i, copy) in std::mem::take(&mut r.to_boot) {
                let name = copy.file_stem().unwrap().to_string_lossy().into_owned();
                let (booted, secs) = boot_copy(&copy, &logs.join(format!("{name}-boot.log")));
                eprintln!(
                    "boot {} copy {name}: {} after {secs:.0} s",
                    tool.label(),
                    if booted { "login prompt" } else { "FAILED" }
                );
                r.copies[i].booted = Some(booted);
                if !keep {
                    let _ = fs::remove_file(&copy);
                }
            }
        }
    }

    println!(
        "\nused disk: {} ({:.2} GB, Debian 12 + 1.5 GiB deleted data), {receivers} receivers, sender link 1 Gbit/s (tbf), \
         median of {runs} run(s); MB/s = disk size / wall time",
        disk.display(),
        DISK_SIZE as f64 / 1e9
    );
    println!("| tool | loss | wall s | MB/s of disk | wire / disk | copies ok | ÷ pipeline |");
    println!("|---|---|---|---|---|---|---|");
    let med =
        |list: &[RunResult], f: &dyn Fn(&RunResult) -> f64| median(list.iter().map(f).collect());
    for (loss, tool, list) in &rows {
        let secs = med(list, &|r| r.seconds);
        let wire = med(list, &|r| r.wire_bytes as f64 / DISK_SIZE as f64);
        let total: usize = list.iter().map(|r| r.copies.len()).sum();
        let ok: usize = list
            .iter()
            .map(|r| r.copies.iter().filter(|c| c.ok()).count())
            .sum();
        let booted: usize = list
            .iter()
            .map(|r| r.copies.iter().filter(|c| c.booted == Some(true)).count())
            .sum();
        let pipeline = rows
            .iter()
            .find(|(l, t, _)| l == loss && *t == Tool::Pipeline)
            .map(|(_, _, l)| med(l, &|r| r.seconds));
        let ratio = match (tool, pipeline) {
            (Tool::Pipeline, _) | (_, None) => "–".to_string(),
            (_, Some(p)) => format!("{:.2}", secs / p),
        };
        println!(
            "| {} | {loss} % | {secs:.1} | {:.0} | {wire:.3} | {ok}/{total} ({booted} booted) | {ratio} |",
            tool.label(),
            DISK_SIZE as f64 / 1e6 / secs,
        );
    }
    let prep = median(
        rows.iter()
            .filter(|(_, t, _)| *t == Tool::Pipeline)
            .flat_map(|(_, _, l)| l.iter().map(|r| r.prep_seconds))
            .collect(),
    );
    let used = |tool: Tool| {
        rows.iter()
            .filter(|(_, t, _)| *t == tool)
            .flat_map(|(_, _, l)| l.iter().filter_map(|r| r.used.clone()))
            .next()
            .unwrap_or_else(|| "(not found in the log)".into())
    };
    println!(
        "\nused: partclone \"Space in use\" {}; diskcast p2p (agent send) {}; deploy store: {} (import {:.1} s, not in the deploy row)",
        used(Tool::Pipeline),
        used(Tool::Diskcast),
        stored,
        import_seconds
    );
    println!("pipeline wall time includes {prep:.2} s (median) for saving and restoring the partition table and MBR boot code");
    println!(
        "copies ok = the tool exited 0 (the agent: copy verified), partition table + MBR boot code + partition boot \
         sector + ldlinux.sys blocks equal to the source's, e2fsck -fn clean, all {} file system entries equal; \
         booted = QEMU reached Debian's login prompt (the first {boot} ok copies per tool and loss, first run)",
        bench.reference.files
    );
    println!(
        "load average (1, 5, 15 min) at the start: {}, at the end: {} (2 cores, shared)",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("logs: {}", logs.display());
    drop(bench);
    if keep {
        eprintln!(
            "kept: {} and the copies under {} and {}",
            disk.display(),
            work.join("runs").display(),
            work.join("boot-queue").display()
        );
    } else {
        let _ = fs::remove_dir_all(work.join("store"));
        let _ = fs::remove_dir(work.join("boot-queue"));
    }
}
