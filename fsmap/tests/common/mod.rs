//! Helpers for the tests that build real images with Debian's tools.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use diskcast_fsmap::{used_map, Options, Report, UsedMap};
pub use std::fs::{self, File, OpenOptions};
pub use std::io::{Read, Seek, SeekFrom, Write};
pub use std::os::unix::fs::FileExt;
pub use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const MIB: u64 = 1 << 20;
pub const CHUNK: u32 = 1 << 20;
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "diskcast-fsmap-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Fails the test, saying which Debian package to install, if `tool` is missing.
pub fn need(tool: &str, package: &str) {
    let found = PATH.split(':').any(|d| Path::new(d).join(tool).is_file());
    assert!(found, "this test needs `{tool}`: install the Debian package `{package}` (apt-get install -y {package})");
}

/// Fails the test unless it runs as root (loop/FUSE mounts).
pub fn need_root(why: &str) {
    // SAFETY-free: read the effective uid from /proc.
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    assert!(root, "this test must run as root: {why}");
}

/// Runs a command, fails the test with its output if it fails; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let (ok, out, err) = try_run(cmd, args);
    assert!(ok, "`{cmd} {}` failed:\n{out}\n{err}", args.join(" "));
    out
}

/// Runs a command: (success, stdout, stderr).
pub fn try_run(cmd: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .env("PATH", PATH)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{cmd}` ({e}): is it installed?"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn sh(script: &str) -> String {
    run("bash", &["-euc", script])
}

/// A file of `size` bytes (sparse).
pub fn image(path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub fn write_file(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap();
}

/// Copies the file `src` into `disk` at byte `offset`.
pub fn put(disk: &Path, offset: u64, src: &Path) {
    let data = fs::read(src).unwrap();
    let f = OpenOptions::new().write(true).open(disk).unwrap();
    f.write_all_at(&data, offset).unwrap();
}

/// Copies `len` bytes at `offset` of `disk` into a new file `dst`.
pub fn extract(disk: &Path, offset: u64, len: u64, dst: &Path) {
    let mut f = File::open(disk).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    fs::write(dst, buf).unwrap();
}

pub fn map(disk: &Path, opts: &Options) -> (UsedMap, Report) {
    let f = File::open(disk).unwrap();
    used_map(&f, opts).unwrap()
}

pub fn exact() -> Options {
    Options {
        merge_gap: 0,
        ..Options::default()
    }
}

/// Copies `disk` to `dst`, overwriting every chunk the map does not use with 0xA5 (so nothing
/// can pass by reading zeros), as a receiver that skips them would leave them.
pub fn copy_used_only(disk: &Path, map: &UsedMap, dst: &Path) {
    fs::copy(disk, dst).unwrap();
    let size = fs::metadata(disk).unwrap().len();
    let f = OpenOptions::new().write(true).open(dst).unwrap();
    let junk = vec![0xA5u8; CHUNK as usize];
    for (i, used) in map.chunks(size, CHUNK).into_iter().enumerate() {
        if !used {
            let at = i as u64 * u64::from(CHUNK);
            let n = (size - at).min(u64::from(CHUNK)) as usize;
            f.write_all_at(&junk[..n], at).unwrap();
        }
    }
    drop(f);
    let mut f = OpenOptions::new().append(true).open(dst).unwrap();
    f.flush().unwrap();
}

/// Whether any byte of `[start, end)` is in the map.
pub fn overlaps(map: &UsedMap, start: u64, end: u64) -> bool {
    map.overlaps(start..end)
}

/// The value after `key` on the line of `text` that starts with it (trimmed).
pub fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .map(str::trim_start)
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no `{key}` in:\n{text}"))
        .trim()
}

pub fn num(text: &str, key: &str) -> u64 {
    let v = field(text, key);
    v.split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}

/// The used bytes of the map inside `[start, start + len)`.
pub fn used_in(map: &UsedMap, start: u64, len: u64) -> u64 {
    map.ranges()
        .iter()
        .map(|r| r.end.min(start + len).saturating_sub(r.start.max(start)))
        .sum()
}
pub mod build;
