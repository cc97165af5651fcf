//! The QEMU lab: a private network namespace with a bridge, the bootserver on it, and VMs under
//! TCG attached through tap devices. Everything started is killed by PID and the namespace is
//! removed when the [`Lab`] is dropped; a failed test prints every console log.
//!
//! This is test code: a failure to set the lab up is a test failure, so it panics with the reason.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

pub mod browser;
pub mod fixtures;
pub mod lab_deploy;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// OVMF with Microsoft's Secure Boot keys enrolled (Debian's ovmf package).
pub const SECURE_BOOT_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd";
pub const SECURE_BOOT_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

/// Under TCG on a shared 2-core machine boots take 10–30 s; allow a wide margin.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn lab_dir() -> PathBuf {
    project_root().join("target/lab")
}

pub fn lab_file(name: &str) -> PathBuf {
    let path = lab_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-lab (or scripts/test) first",
        path.display()
    );
    path
}

fn run_with_input(cmd: &mut Command, input: &str) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The xorshift64 stream test images draw their incompressible bytes from: the same seed gives
/// the same bytes, so a test can make a disk and its expected copy independently.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn byte(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as u8
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        buf.iter_mut().for_each(|b| *b = self.byte());
    }
}

/// An image of `mib` MiB of noise from `seed` in which every fourth 64 KiB block is zero: every
/// 1 MiB chunk holds data, and the zero runs are there for the skipping code to find.
pub fn make_striped_image(path: &Path, mib: usize, seed: u64) {
    let mut noise = Noise::new(seed);
    let mut image = vec![0u8; mib << 20];
    for (i, block) in image.chunks_mut(64 << 10).enumerate() {
        if i % 4 != 0 {
            noise.fill(block);
        }
    }
    fs::write(path, image).unwrap();
}

/// Makes a source disk with what real disks hold: an ext4 file system with files (made by
/// `mkfs.ext4 -d`, no mounting), a region of random bytes, a region of text, and zeros.
pub fn make_source_disk(path: &Path, size_mib: u64) {
    let tree = path.with_extension("tree");
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/hostname"), "golden-image\n").unwrap();
    fs::write(tree.join("README"), "diskcast test image\n".repeat(1000)).unwrap();
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut random = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    fs::write(tree.join("random.bin"), random(3 << 20)).unwrap();
    let file = fs::File::create(path).unwrap();
    file.set_len(size_mib << 20).unwrap();
    let fs_mib = size_mib / 2;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(path)
        .arg(format!("{fs_mib}M")));
    use std::os::unix::fs::FileExt;
    // Random bytes and text past the file system, then zeros to the end.
    file.write_all_at(&random(4 << 20), (fs_mib + 4) << 20)
        .unwrap();
    file.write_all_at(&b"plain text region ".repeat(50_000), (fs_mib + 10) << 20)
        .unwrap();
    let _ = fs::remove_dir_all(&tree);
}

/// The agent for process tests: the lab's static build (`target/lab/agent`, made by
/// scripts/build-lab), the same binary the VMs boot, so one release build serves both.
pub fn host_agent() -> PathBuf {
    let path = lab_file("agent");
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-lab",
        path.display()
    );
    path
}

/// Makes a signing key file at `path` (`agent key new`) and returns its public key.
pub fn make_key(path: &Path) -> String {
    let _ = fs::remove_file(path);
    run(Command::new(host_agent()).args(["key", "new"]).arg(path))
        .trim()
        .to_string()
}

/// Starts `agent ARGS [PATH]` on host `netns` (see [`Lab::add_host`]) with its output piped,
/// for [`output_of`].
pub fn spawn_agent(netns: &str, args: &[&str], path: Option<&Path>) -> Child {
    let mut cmd = Lab::in_host(netns, &host_agent());
    cmd.args(args);
    if let Some(path) = path {
        cmd.arg(path);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting the agent in {netns}: {e}"))
}

/// Waits for a child that was started with piped output and prints what it said.
pub fn output_of(child: Child, what: &str) -> std::process::Output {
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "---- {what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `line` without carriage returns and terminal control sequences (`ESC [ ... final`, `ESC x`):
/// SeaBIOS's serial console moves its cursor with them, and one inside a marker would hide it
/// from a search.
fn without_terminal_controls(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                // `ESC [` starts a sequence that ends with a byte in `@`..=`~`; any other escape
                // is two characters. A control character (the line's `\n`) ends either early
                // and is kept: a cut sequence must not join two lines.
                match chars.peek() {
                    Some('[') => {
                        chars.next();
                        while let Some(&next) = chars.peek() {
                            if next.is_control() {
                                break;
                            }
                            chars.next();
                            if ('@'..='~').contains(&next) {
                                break;
                            }
                        }
                    }
                    Some(next) if !next.is_control() => {
                        chars.next();
                    }
                    _ => {}
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Output of a child process collected line by line, with waiting for a line.
#[derive(Clone, Default)]
pub struct Console {
    inner: Arc<(Mutex<Captured>, Condvar)>,
    /// Prefix to echo every line with on stdout (the interactive lab), or `None`.
    echo: Option<Arc<str>>,
}

/// What a console has captured, and how many of its streams are still open.
#[derive(Default)]
struct Captured {
    text: String,
    open_streams: usize,
}

impl Console {
    fn attach(&self, stream: impl Read + Send + 'static, log_file: PathBuf) {
        let inner = Arc::clone(&self.inner);
        self.inner.0.lock().unwrap().open_streams += 1;
        let echo = self.echo.clone();
        std::thread::spawn(move || {
            let mut file = fs::File::create(&log_file).ok();
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                let text = without_terminal_controls(&String::from_utf8_lossy(&line));
                if let Some(f) = file.as_mut() {
                    let _ = std::io::Write::write_all(f, text.as_bytes());
                }
                if let Some(prefix) = &echo {
                    print!("{prefix}{text}");
                }
                let (lock, cvar) = &*inner;
                lock.lock().unwrap().text.push_str(&text);
                cvar.notify_all();
                line.clear();
            }
            let (lock, cvar) = &*inner;
            lock.lock().unwrap().open_streams -= 1;
            cvar.notify_all();
        });
    }

    pub fn text(&self) -> String {
        self.inner.0.lock().unwrap().text.clone()
    }

    /// Waits until a line containing `needle` appears; returns that line. Fails at once when
    /// every stream closed without it (the VM or process ended).
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.inner;
        let mut captured = lock.lock().unwrap();
        loop {
            if let Some(line) = captured.text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if captured.open_streams == 0 && !captured.text.is_empty() {
                return Err(format!(
                    "the output ended without a line containing {needle:?}; its end:\n{}",
                    tail(&captured.text, 15)
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no line containing {needle:?} within {} s; the output ends with:\n{}",
                    timeout.as_secs(),
                    tail(&captured.text, 15)
                ));
            }
            captured = cvar.wait_timeout(captured, deadline - now).unwrap().0;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS with QEMU's iPXE option ROM on the NIC.
    Bios,
    /// OVMF with its own PXE client: QEMU's iPXE ROM is switched off.
    Uefi,
    /// OVMF with Secure Boot enforced and Microsoft's keys enrolled (Debian's
    /// `OVMF_CODE_4M.ms.fd` and a fresh copy of `OVMF_VARS_4M.ms.fd`) on a q35 machine with SMM;
    /// QEMU's iPXE ROM is off.
    UefiSecureBoot,
}

/// The disk devices the lab can give a VM (`DiskSpec::device`).
pub const DISK_MODELS: [&str; 5] = ["virtio-blk-pci", "ide-hd", "nvme", "scsi-hd", "usb-storage"];
/// The NIC models the lab can give a VM (QEMU device names).
pub const NIC_MODELS: [&str; 5] = ["virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3"];

/// Maps a short model name (`virtio`, `ahci`, `virtio-scsi`, `usb`...) or a QEMU device name to
/// the device the lab uses, for `scripts/lab --nic/--disk`.
pub fn nic_model(name: &str) -> Option<&'static str> {
    match name {
        "virtio" | "virtio-net" => Some("virtio-net-pci"),
        other => NIC_MODELS.iter().copied().find(|m| *m == other),
    }
}

/// See [`nic_model`].
pub fn disk_model(name: &str) -> Option<&'static str> {
    match name {
        "virtio" | "virtio-blk" => Some("virtio-blk-pci"),
        "ahci" | "sata" => Some("ide-hd"),
        "virtio-scsi" | "scsi" => Some("scsi-hd"),
        "usb" => Some("usb-storage"),
        other => DISK_MODELS.iter().copied().find(|m| *m == other),
    }
}

#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub size_mib: u64,
    pub serial: String,
    /// QEMU device (one of [`DISK_MODELS`]): `virtio-blk-pci`, `ide-hd` on an AHCI controller,
    /// `nvme`, `scsi-hd` on a virtio-scsi controller, or `usb-storage` on xHCI.
    pub device: &'static str,
    /// Initial content (copied); blank when `None`.
    pub content: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub enum Boot {
    /// Firmware network boot from the bootserver.
    Network,
    /// `-kernel`/`-initrd` with this command line (the lab's kernel and initramfs).
    Kernel { append: String },
    /// From a USB stick image (a copy of it, attached as USB storage on an xHCI controller).
    Usb { stick: PathBuf },
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub firmware: Firmware,
    pub nic_model: &'static str,
    pub mac: String,
    pub disks: Vec<DiskSpec>,
    pub memory_mib: u32,
    pub boot: Boot,
    /// A reboot restarts the VM (else QEMU exits, which tests see as the end).
    pub reboots: bool,
    /// OVMF's `opt/org.tianocore/...` switches (`-fw_cfg`), e.g. `IPv4PXESupport=no`.
    pub ovmf_options: Vec<(String, String)>,
}

impl VmSpec {
    pub fn new(name: &str, firmware: Firmware, nic_model: &'static str, mac_suffix: u8) -> Self {
        Self {
            name: name.into(),
            firmware,
            nic_model,
            mac: format!("52:54:00:dc:00:{mac_suffix:02x}"),
            disks: Vec::new(),
            memory_mib: 512,
            boot: Boot::Network,
            reboots: false,
            ovmf_options: Vec::new(),
        }
    }

    /// UEFI HTTP boot only: OVMF's PXE (IPv4 and IPv6) switched off, so it neither tries TFTP
    /// nor waits a minute for PXE before HTTP.
    pub fn http_boot_only(mut self) -> Self {
        for option in ["IPv4PXESupport", "IPv6PXESupport"] {
            self.ovmf_options.push((option.into(), "no".into()));
        }
        self
    }

    /// The VM restarts when it reboots, as a real machine does.
    pub fn rebooting(mut self) -> Self {
        self.reboots = true;
        self
    }

    pub fn disk(mut self, size_mib: u64, serial: &str, device: &'static str) -> Self {
        self.disks.push(DiskSpec {
            size_mib,
            serial: serial.into(),
            device,
            content: None,
        });
        self
    }

    /// A disk that starts as a copy of `content`.
    pub fn disk_from(mut self, content: &Path, serial: &str, device: &'static str) -> Self {
        let size_mib = fs::metadata(content).unwrap().len().div_ceil(1 << 20);
        self.disks.push(DiskSpec {
            size_mib,
            serial: serial.into(),
            device,
            content: Some(content.into()),
        });
        self
    }

    /// Boots from a copy of the USB stick image `stick` (see [`Lab::stick_path`]).
    pub fn usb_stick(mut self, stick: &Path) -> Self {
        self.boot = Boot::Usb {
            stick: stick.into(),
        };
        self
    }

    /// Boots the lab kernel directly with `append` (no network boot).
    pub fn kernel(mut self, append: &str) -> Self {
        self.boot = Boot::Kernel {
            append: append.into(),
        };
        self
    }
}

pub struct Vm {
    pub spec: VmSpec,
    pub console: Console,
    /// When QEMU was started.
    pub started: Instant,
    child: Child,
}

impl Vm {
    /// Waits for the machine to power itself off; returns QEMU's exit status.
    pub fn wait_poweroff(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} still running after {} s",
                    self.spec.name,
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Parsed `DISKCAST-READY` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub fields: Vec<(String, String)>,
}

impl Ready {
    pub fn parse(line: &str) -> Self {
        let rest = line
            .split(diskcast_agent::READY_MARKER)
            .nth(1)
            .unwrap_or("");
        let fields = rest
            .split_ascii_whitespace()
            .filter_map(|w| {
                w.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Self { fields }
    }

    pub fn get(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// A running IGMP querier ([`Lab::start_igmp_querier`]).
pub struct IgmpQuerier {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for IgmpQuerier {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub struct Bootserver {
    pub console: Console,
    child: Child,
}

pub struct Lab {
    pub name: String,
    pub netns: String,
    pub dir: PathBuf,
    pub server_ip: &'static str,
    vms: Vec<Vm>,
    bootservers: Vec<Bootserver>,
    helpers: Vec<(String, Child, Console)>,
    taps: u32,
    /// Echo consoles to stdout, for the interactive lab.
    pub echo: bool,
    /// What agents do when their task is done: `poweroff` (tests look at the machine then) or
    /// `reboot` (into the new disk).
    pub on_done: &'static str,
    _serial: MutexGuard<'static, ()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpMode {
    Full,
    Proxy,
}

impl Lab {
    pub fn new(name: &str) -> Self {
        let serial = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            run(Command::new("id").arg("-u")).trim() == "0",
            "the QEMU lab needs root (network namespaces, tap devices)"
        );
        let netns = format!(
            "dc-{}-{}",
            name.chars().take(20).collect::<String>(),
            std::process::id()
        );
        let dir = project_root().join("target/lab-runs").join(&netns);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        run(Command::new("ip").args(["netns", "add", &netns]));
        let lab = Self {
            name: name.into(),
            netns,
            dir,
            server_ip: "10.77.0.1",
            vms: Vec::new(),
            bootservers: Vec::new(),
            helpers: Vec::new(),
            taps: 0,
            echo: false,
            on_done: "poweroff",
            _serial: serial,
        };
        for args in [
            "link set lo up",
            "link add br0 type bridge mcast_snooping 0",
            "addr add 10.77.0.1/24 brd + dev br0",
            "link set br0 up",
        ] {
            lab.ip(args);
        }
        lab
    }

    /// Runs `ip ARGS` inside the lab's namespace.
    pub fn ip(&self, args: &str) -> String {
        run(Command::new("ip")
            .args(["netns", "exec", &self.netns, "ip"])
            .args(args.split_whitespace()))
    }

    fn ns_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// Writes the bootserver config for this lab and returns its path. Machines power off when
    /// their task ends (tests look at them then); machines nobody registered run an inventory
    /// once. `extra` goes into `[agent]` and may add sections after it.
    pub fn bootserver_config(&self, mode: DhcpMode, extra: &str) -> PathBuf {
        let mode = match mode {
            DhcpMode::Full => "full",
            DhcpMode::Proxy => "proxy",
        };
        let text = format!(
            "interface = \"br0\"\naddress = \"{ip}\"\nhttp_port = 8080\nstate_dir = \"{state}\"\n\
             [dhcp]\nmode = \"{mode}\"\nrange_start = \"10.77.0.100\"\nrange_end = \"10.77.0.149\"\nlease_secs = 600\n\
             [boot]\nkernel = \"{kernel}\"\ninitramfs = \"{initrd}\"\ntftp_root = \"/usr/lib/ipxe\"\n\
             kernel_args = \"console=ttyS0,115200 panic=-1\"\nlocal_boot_efi = \"{local_efi}\"\n\
             [lab]\nunknown_machines = \"inventory\"\n\
             [agent]\non_error = \"poweroff\"\non_done = \"{on_done}\"\n{extra}\n",
            ip = self.server_ip,
            state = self.dir.join("state").display(),
            kernel = lab_file("vmlinuz").display(),
            initrd = lab_file("initramfs.img").display(),
            local_efi = lab_dir().join("localboot.efi").display(),
            on_done = self.on_done,
        );
        let path = self.dir.join("bootserver.toml");
        fs::write(&path, text).unwrap();
        path
    }

    /// Runs `bootserver ARGS --config CONFIG` in the lab (the admin's commands: tasks,
    /// machines, images); panics with its output unless it succeeds.
    pub fn bootserver_cli(&self, args: &[&str]) -> String {
        // The config belongs to the command (`task`, `images`...), before its subcommand.
        let (command, rest) = args.split_first().expect("a bootserver command");
        let out = self
            .ns_command(&lab_file("bootserver"))
            .arg(command)
            .arg("--config")
            .arg(self.dir.join("bootserver.toml"))
            .args(rest)
            .output()
            .expect("running bootserver");
        assert!(
            out.status.success(),
            "bootserver {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `bootserver task ARGS`: one-shot work for machines.
    pub fn task(&self, args: &[&str]) -> String {
        let mut all = vec!["task"];
        all.extend_from_slice(args);
        self.bootserver_cli(&all)
    }

    /// `GET path` from the bootserver's HTTP API, inside the lab; the body.
    pub fn api_get(&self, path: &str) -> String {
        run(self
            .ns_command(Path::new("curl"))
            .args(["-sS", "--fail-with-body"])
            .arg(format!("http://{}:8080{path}", self.server_ip)))
    }

    /// Starts the bootserver and waits until it listens.
    pub fn start_bootserver(&mut self, mode: DhcpMode, extra: &str) -> usize {
        let config = self.bootserver_config(mode, extra);
        self.start_bootserver_with(&config)
    }

    /// Starts the bootserver with a config file and waits until it listens.
    pub fn start_bootserver_with(&mut self, config: &Path) -> usize {
        let netns = self.netns.clone();
        self.start_bootserver_in(&netns, config)
    }

    /// [`Lab::start_bootserver_with`] in namespace `netns` (another site's server).
    pub fn start_bootserver_in(&mut self, netns: &str, config: &Path) -> usize {
        let mut child = Lab::in_host(netns, &lab_file("bootserver"))
            .args(["serve", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("DISKCAST_BOOTSERVER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the bootserver");
        let console = self.console("bootserver | ");
        let n = self.bootservers.len();
        console.attach(
            child.stdout.take().unwrap(),
            self.dir.join(format!("bootserver-{n}.out")),
        );
        console.attach(
            child.stderr.take().unwrap(),
            self.dir.join(format!("bootserver-{n}.log")),
        );
        self.bootservers.push(Bootserver {
            console: console.clone(),
            child,
        });
        console
            .wait_for("bootserver ready", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("bootserver did not start: {e}\n{}", console.text()));
        n
    }

    pub fn bootservers_console(&self, n: usize) -> Console {
        self.bootservers[n].console.clone()
    }

    pub fn bootserver_log(&self, n: usize) -> String {
        self.bootservers[n].console.text()
    }

    /// Stops a bootserver the hard way (SIGKILL), as a crash or power cut would.
    pub fn kill_bootserver(&mut self, n: usize) {
        let server = &mut self.bootservers[n];
        let _ = server.child.kill();
        let _ = server.child.wait();
    }

    /// Starts a helper process inside the namespace (dnsmasq and the like).
    pub fn start_helper(&mut self, name: &str, mut cmd: Command) -> Console {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let console = self.console(&format!("{name} | "));
        console.attach(
            child.stdout.take().unwrap(),
            self.dir.join(format!("{name}.out")),
        );
        console.attach(
            child.stderr.take().unwrap(),
            self.dir.join(format!("{name}.log")),
        );
        self.helpers.push((name.into(), child, console.clone()));
        console
    }

    /// A second namespace wired to the lab's bridge through a veth pair: another machine on the LAN.
    pub fn add_host(&mut self, host: &str, address: &str) -> String {
        let netns = format!("{}-{host}", self.netns);
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        run(Command::new("ip").args(["netns", "add", &netns]));
        let peer = format!("v-{host}");
        self.ip(&format!(
            "link add {peer} type veth peer name eth0 netns {netns}"
        ));
        self.ip(&format!("link set {peer} master br0 up"));
        for args in [
            "link set lo up".to_string(),
            format!("addr add {address} brd + dev eth0"),
            "link set eth0 up".into(),
        ] {
            run(Command::new("ip")
                .args(["netns", "exec", &netns, "ip"])
                .args(args.split_whitespace()));
        }
        netns
    }

    /// Sets the MTU of every link of the lab's LAN: each host's `eth0` (namespaces made by
    /// [`Lab::add_host`]), the `v-*` veth ends on the bridge, and `br0` itself (e.g. 9000 for
    /// jumbo frames; veths and bridges take up to 65535).
    pub fn set_mtu(&self, mtu: u32) {
        let prefix = format!("{}-", self.netns);
        let namespaces = run(Command::new("ip").args(["netns", "list"]));
        for host in namespaces
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|ns| ns.starts_with(&prefix))
        {
            run(Command::new("ip").args([
                "-n",
                host,
                "link",
                "set",
                "eth0",
                "mtu",
                &mtu.to_string(),
            ]));
        }
        let links = self.ip("-o link show");
        let veths = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter_map(|n| n.split('@').next())
            .filter(|n| n.starts_with("v-"));
        for veth in veths {
            self.ip(&format!("link set {veth} mtu {mtu}"));
        }
        self.ip(&format!("link set br0 mtu {mtu}"));
    }

    /// [`Lab::add_host`] on another bridge (a subnet made by [`Lab::add_subnet`]), with `routes`
    /// (`ip route add` arguments, e.g. `default via 10.78.0.1`) to reach other subnets.
    pub fn add_host_on(
        &mut self,
        host: &str,
        address: &str,
        bridge: &str,
        routes: &[&str],
    ) -> String {
        let netns = format!("{}-{host}", self.netns);
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        run(Command::new("ip").args(["netns", "add", &netns]));
        let peer = format!("v-{host}");
        self.ip(&format!(
            "link add {peer} type veth peer name eth0 netns {netns}"
        ));
        self.ip(&format!("link set {peer} master {bridge} up"));
        let mut commands = vec![
            "link set lo up".to_string(),
            format!("addr add {address} brd + dev eth0"),
            "link set eth0 up".into(),
        ];
        commands.extend(routes.iter().map(|r| format!("route add {r}")));
        for args in commands {
            run(Command::new("ip")
                .args(["netns", "exec", &netns, "ip"])
                .args(args.split_whitespace()));
        }
        netns
    }

    /// Runs a command inside another namespace of this lab (one made by [`Lab::add_host`]).
    pub fn in_host(netns: &str, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]).arg(program);
        cmd
    }

    /// Drops `percent` of the UDP datagrams arriving in a host's namespace (nftables: this kernel
    /// has no netem).
    pub fn add_ingress_loss(netns: &str, percent: f64) {
        let per_10000 = (percent * 100.0).round() as u32;
        let script = format!(
            "table inet diskcast_loss {{\n chain input {{\n  type filter hook input priority 0;\n  \
             meta l4proto udp numgen random mod 10000 < {per_10000} drop\n }}\n}}\n"
        );
        run_with_input(
            Command::new("ip").args(["netns", "exec", netns, "nft", "-f", "-"]),
            &script,
        );
    }

    /// Makes a host's interface cut UDP segmentation-offload sends into datagrams as it sends
    /// them (`gso_max_segs 1`), as a physical NIC puts separate frames on the wire. A veth
    /// otherwise carries a 64 KiB GSO send to the receivers' namespaces whole, and
    /// [`Lab::add_ingress_loss`] drops it as one: a run of ~45 datagrams instead of one.
    pub fn segment_on_send(netns: &str, interface: &str) {
        run(Command::new("ip").args([
            "-n",
            netns,
            "link",
            "set",
            "dev",
            interface,
            "gso_max_segs",
            "1",
        ]));
    }

    /// Limits a host's outgoing rate with a token bucket (an emulated link speed).
    pub fn limit_egress(netns: &str, interface: &str, mbit: u32) {
        run(Command::new("ip")
            .args([
                "netns", "exec", netns, "tc", "qdisc", "replace", "dev", interface, "root", "tbf",
            ])
            .args([
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "256kb",
                "latency",
                "20ms",
            ]));
    }

    fn new_tap(&mut self, bridge: &str) -> String {
        let tap = format!("tap{}", self.taps);
        self.taps += 1;
        self.ip(&format!("tuntap add dev {tap} mode tap"));
        self.ip(&format!("link set {tap} master {bridge} up"));
        tap
    }

    /// Starts an IGMP querier on `bridge` in the lab's namespace: a general query (IGMPv2) every
    /// second from `address`, as a lab's router or switch sends them. A bridge that snoops IGMP
    /// forwards a group only to its members while a querier is present (on this kernel the
    /// bridge's own `mcast_querier` does not make it so). Stops when the returned value drops.
    pub fn start_igmp_querier(&self, address: &str) -> IgmpQuerier {
        let netns = Path::new("/run/netns").join(&self.netns);
        let address: std::net::Ipv4Addr = address.parse().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let namespace = fs::File::open(&netns).unwrap();
            nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::from(2)),
            )
            .unwrap();
            socket.set_multicast_if_v4(&address).unwrap();
            socket.set_multicast_ttl_v4(1).unwrap();
            // Type 0x11 (membership query), max response 1 s, group 0 (general), checksum.
            let mut query = [0x11u8, 10, 0, 0, 0, 0, 0, 0];
            let sum = query
                .chunks(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum::<u32>();
            let checksum = !((sum & 0xffff) + (sum >> 16)) as u16;
            query[2..4].copy_from_slice(&checksum.to_be_bytes());
            let all_hosts = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(224, 0, 0, 1), 0);
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = socket.send_to(&query, &all_hosts.into());
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        IgmpQuerier {
            stop,
            thread: Some(thread),
        }
    }

    /// Another subnet's switch: a bridge in the lab's namespace that the server has no address
    /// on, so it reaches the machines there only through a router ([`Lab::add_router`]). VMs
    /// join it with [`Lab::boot_vm_on`].
    pub fn add_subnet(&mut self, bridge: &str) {
        self.ip(&format!("link add {bridge} type bridge mcast_snooping 0"));
        self.ip(&format!("link set {bridge} up"));
    }

    /// A router namespace between br0 (its address `near`, e.g. `10.77.0.254/24`) and the
    /// subnet bridge `bridge` (its address `far`, e.g. `10.78.0.1/24`): it forwards IPv4, and
    /// the server's namespace routes the far subnet through it. Its interfaces are `r-near`
    /// and `r-far`; returns its namespace, for [`Lab::start_dhcp_relay`] and
    /// [`Lab::start_multicast_router`].
    pub fn add_router(&mut self, name: &str, bridge: &str, near: &str, far: &str) -> String {
        let netns = format!("{}-{name}", self.netns);
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        run(Command::new("ip").args(["netns", "add", &netns]));
        for (side, bridge) in [("near", "br0"), ("far", bridge)] {
            let peer = format!("v-{name}-{side}");
            self.ip(&format!(
                "link add {peer} type veth peer name r-{side} netns {netns}"
            ));
            self.ip(&format!("link set {peer} master {bridge} up"));
        }
        let in_router = |args: &[&str]| {
            run(Command::new("ip")
                .args(["netns", "exec", &netns])
                .args(args));
        };
        for args in [
            "link set lo up".to_string(),
            format!("addr add {near} brd + dev r-near"),
            format!("addr add {far} brd + dev r-far"),
            "link set r-near up".into(),
            "link set r-far up".into(),
        ] {
            in_router(
                &["ip"]
                    .into_iter()
                    .chain(args.split_whitespace())
                    .collect::<Vec<_>>(),
            );
        }
        for sysctl in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.r-near.rp_filter=0",
            "net.ipv4.conf.r-far.rp_filter=0",
        ] {
            in_router(&["sysctl", "-q", "-w", sysctl]);
        }
        let far_net = format!(
            "{}/{}",
            network_of(far),
            far.split_once('/').map_or("24", |(_, len)| len)
        );
        let gateway = near.split_once('/').map_or(near, |(a, _)| a);
        self.ip(&format!("route add {far_net} via {gateway}"));
        netns
    }

    /// Runs Debian's `dhcrelay` in router `netns`: DHCP requests on its far side are relayed to
    /// `server` with `giaddr` set, the answers back (measured: /work/shared/DESIGN.md section 8).
    pub fn start_dhcp_relay(&mut self, netns: &str, server: &str) -> Console {
        let pid_file = self.dir.join(format!("{netns}-dhcrelay.pid"));
        let mut cmd = Lab::in_host(netns, Path::new("dhcrelay"));
        cmd.args(["-d", "-4", "-iu", "r-near", "-id", "r-far", "-pf"])
            .arg(&pid_file)
            .arg(server);
        self.start_helper("dhcrelay", cmd)
    }

    /// Runs `smcrouted` in router `netns`, forwarding multicast for `groups` (`G/LEN`) from
    /// its near side to its far side (its control socket and pid file are the lab's own: the
    /// defaults in /run are shared by every namespace).
    pub fn start_multicast_router(&mut self, netns: &str, groups: &str) -> Console {
        let conf = self.dir.join(format!("{netns}-smcroute.conf"));
        fs::write(
            &conf,
            format!(
                "phyint r-near enable
phyint r-far enable
mroute from r-near group {groups} to r-far
"
            ),
        )
        .unwrap();
        let mut cmd = Lab::in_host(netns, Path::new("smcrouted"));
        cmd.args(["-n", "-N", "-f"])
            .arg(&conf)
            .args(["-i", &format!("smcroute-{}", std::process::id()), "-u"])
            .arg(self.dir.join(format!("{netns}-smcroute.sock")))
            .arg("-P")
            .arg(self.dir.join(format!("{netns}-smcroute.pid")));
        self.start_helper("smcrouted", cmd)
    }

    /// Creates a VM's disks and starts it network-booting.
    pub fn boot_vm(&mut self, spec: VmSpec) -> usize {
        self.boot_vm_on(spec, "br0")
    }

    /// [`Lab::boot_vm`] with the VM's NIC on `bridge` (see [`Lab::add_subnet`]).
    pub fn boot_vm_on(&mut self, spec: VmSpec, bridge: &str) -> usize {
        let tap = self.new_tap(bridge);
        let mut cmd = self.ns_command(Path::new("qemu-system-x86_64"));
        cmd.args([
            "-accel",
            "tcg",
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
        ]);
        if !spec.reboots {
            cmd.arg("-no-reboot");
        }
        cmd.args(["-m", &spec.memory_mib.to_string(), "-smp", "1"])
            .args([
                "-netdev",
                &format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            ]);
        if let Boot::Kernel { append } = &spec.boot {
            cmd.args(["-kernel", &lab_file("vmlinuz").display().to_string()])
                .args(["-initrd", &lab_file("initramfs.img").display().to_string()])
                .args(["-append", append]);
        }
        let nic = match spec.firmware {
            Firmware::Bios => format!(
                "{},netdev=net0,mac={},bootindex=1",
                spec.nic_model, spec.mac
            ),
            Firmware::Uefi => {
                cmd.args(["-bios", "/usr/share/ovmf/OVMF.fd"]);
                format!(
                    "{},netdev=net0,mac={},bootindex=1,romfile=",
                    spec.nic_model, spec.mac
                )
            }
            Firmware::UefiSecureBoot => {
                let vars = self.dir.join(format!("{}-OVMF_VARS.fd", spec.name));
                fs::copy(SECURE_BOOT_VARS, &vars)
                    .unwrap_or_else(|e| panic!("{SECURE_BOOT_VARS}: {e} (run scripts/setup)"));
                cmd.args(["-machine", "q35,smm=on"])
                    .args(["-global", "driver=cfi.pflash01,property=secure,value=on"])
                    .args([
                        "-drive",
                        &format!("if=pflash,format=raw,unit=0,readonly=on,file={SECURE_BOOT_CODE}"),
                    ])
                    .args([
                        "-drive",
                        &format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                    ]);
                format!(
                    "{},netdev=net0,mac={},bootindex=1,romfile=",
                    spec.nic_model, spec.mac
                )
            }
        };
        cmd.args(["-device", &nic]);
        for (name, value) in &spec.ovmf_options {
            cmd.args([
                "-fw_cfg",
                &format!("name=opt/org.tianocore/{name},string={value}"),
            ]);
        }
        if let Boot::Usb { stick } = &spec.boot {
            let copy = self.stick_path(&spec.name);
            fs::copy(stick, &copy).unwrap();
            cmd.args(["-device", "qemu-xhci,id=xhci"])
                .args([
                    "-drive",
                    &format!("file={},format=raw,if=none,id=stick", copy.display()),
                ])
                .args(["-device", "usb-storage,bus=xhci.0,drive=stick,bootindex=0"]);
        }
        let has = |device: &str| spec.disks.iter().any(|d| d.device == device);
        if has("ide-hd") {
            cmd.args(["-device", "ahci,id=ahci"]);
        }
        if has("scsi-hd") {
            cmd.args(["-device", "virtio-scsi-pci,id=scsi"]);
        }
        if has("usb-storage") && !matches!(spec.boot, Boot::Usb { .. }) {
            cmd.args(["-device", "qemu-xhci,id=xhci"]);
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            let path = self.disk_path(&spec.name, i);
            match &disk.content {
                Some(content) => {
                    fs::copy(content, &path).unwrap();
                }
                None => fs::File::create(&path)
                    .unwrap()
                    .set_len(disk.size_mib << 20)
                    .unwrap(),
            }
            cmd.args([
                "-drive",
                &format!("file={},format=raw,if=none,id=d{i}", path.display()),
            ]);
            let device = match disk.device {
                "ide-hd" => format!("ide-hd,drive=d{i},bus=ahci.{i},serial={}", disk.serial),
                "scsi-hd" => format!("scsi-hd,drive=d{i},bus=scsi.0,serial={}", disk.serial),
                "usb-storage" => {
                    format!("usb-storage,drive=d{i},bus=xhci.0,serial={}", disk.serial)
                }
                other => format!("{other},drive=d{i},serial={}", disk.serial),
            };
            cmd.args(["-device", &device]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qemu-system-x86_64 (run scripts/setup)");
        let console = self.console(&format!("{} | ", spec.name));
        console.attach(
            child.stdout.take().unwrap(),
            self.dir.join(format!("{}.console", spec.name)),
        );
        console.attach(
            child.stderr.take().unwrap(),
            self.dir.join(format!("{}.qemu.log", spec.name)),
        );
        self.vms.push(Vm {
            spec,
            console,
            started: Instant::now(),
            child,
        });
        self.vms.len() - 1
    }

    /// The MACs `boot_bare_slaves` gives its VMs, as `--to` takes them.
    pub fn slave_macs(count: u8) -> String {
        (1..=count)
            .map(|i| format!("52:54:00:dc:00:{:02x}", 0x20 + i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Boots `count` bare VMs (`slave1`...) that network-boot, each with a blank 64 MiB disk.
    pub fn boot_bare_slaves(
        &mut self,
        firmware: Firmware,
        nic: &'static str,
        count: u8,
    ) -> Vec<usize> {
        self.boot_bare_slaves_on(firmware, nic, "virtio-blk-pci", count)
    }

    /// [`Lab::boot_bare_slaves`] with another disk model (one of [`DISK_MODELS`]).
    pub fn boot_bare_slaves_on(
        &mut self,
        firmware: Firmware,
        nic: &'static str,
        disk: &'static str,
        count: u8,
    ) -> Vec<usize> {
        (1..=count)
            .map(|i| {
                self.boot_vm(
                    VmSpec::new(&format!("slave{i}"), firmware, nic, 0x20 + i).disk(
                        64,
                        &format!("SLAVE-{i}"),
                        disk,
                    ),
                )
            })
            .collect()
    }

    /// Config lines (after `[agent]`) that give the slaves of [`Lab::slave_macs`] the signed
    /// chain, for Secure Boot.
    pub fn signed_chain_for_slaves(count: u8) -> String {
        (1..=count)
            .map(|i| {
                format!(
                    "[[machine]]\nmac = \"52:54:00:dc:00:{:02x}\"\nuefi_chain = \"signed\"\n",
                    0x20 + i
                )
            })
            .collect()
    }

    /// Waits for every VM in `vms` to print `marker` and then power off cleanly.
    pub fn expect_done_and_off(&mut self, vms: &[usize], marker: &str, timeout: Duration) {
        for &vm in vms {
            let name = self.vms[vm].spec.name.clone();
            self.vms[vm]
                .console
                .wait_for(marker, timeout)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for &vm in vms {
            let name = self.vms[vm].spec.name.clone();
            let status = self.vms[vm]
                .wait_poweroff(Duration::from_secs(120))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(status.success(), "{name} did not power off cleanly");
        }
    }

    /// True when the first disk of every VM named in `vms` equals `expected` byte for byte.
    pub fn first_disks_equal(&self, vms: &[&str], expected: &Path) -> Vec<(String, bool)> {
        let expected = fs::read(expected).unwrap();
        vms.iter()
            .map(|vm| {
                let same = fs::read(self.disk_path(vm, 0)).is_ok_and(|d| d == expected);
                (vm.to_string(), same)
            })
            .collect()
    }

    /// The stick image the VM called `vm` booted from (a copy of the one given).
    pub fn stick_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}-stick.img"))
    }

    /// The image file behind disk `index` of the VM called `vm`.
    pub fn disk_path(&self, vm: &str, index: usize) -> PathBuf {
        self.dir.join(format!("{vm}-disk{index}.img"))
    }

    fn console(&self, prefix: &str) -> Console {
        Console {
            echo: self.echo.then(|| Arc::from(prefix)),
            ..Console::default()
        }
    }

    pub fn vm(&mut self, n: usize) -> &mut Vm {
        &mut self.vms[n]
    }

    /// Runs `program` inside the lab's namespace.
    pub fn command_in_lab(&self, program: &str) -> Command {
        self.ns_command(Path::new(program))
    }

    /// Waits for the VM's agent to report ready and returns the parsed line.
    pub fn wait_ready(&mut self, n: usize) -> Ready {
        let vm = &self.vms[n];
        match vm
            .console
            .wait_for(diskcast_agent::READY_MARKER, BOOT_TIMEOUT)
        {
            Ok(line) => Ready::parse(&line),
            Err(e) => panic!("{}: {e}", vm.spec.name),
        }
    }

    fn dump_logs(&self) {
        eprintln!(
            "==== lab {} failed; logs in {} ====",
            self.name,
            self.dir.display()
        );
        for (i, server) in self.bootservers.iter().enumerate() {
            eprintln!(
                "---- bootserver {i} ----\n{}",
                tail(&server.console.text(), 80)
            );
        }
        for (name, _, console) in &self.helpers {
            eprintln!("---- {name} ----\n{}", tail(&console.text(), 60));
        }
        for vm in &self.vms {
            eprintln!(
                "---- console of {} ----\n{}",
                vm.spec.name,
                tail(&vm.console.text(), 120)
            );
        }
    }
}

/// `10.78.0.0` for `10.78.0.1/24`.
fn network_of(cidr: &str) -> std::net::Ipv4Addr {
    let (address, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let address: std::net::Ipv4Addr = address.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    std::net::Ipv4Addr::from(u32::from(address) & mask)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for vm in &mut self.vms {
            let _ = vm.child.kill();
            let _ = vm.child.wait();
        }
        for server in &mut self.bootservers {
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        for (_, child, _) in &mut self.helpers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let hosts: Vec<String> = fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for ns in hosts
            .iter()
            .filter(|n| n.starts_with(&format!("{}-", self.netns)))
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        if !std::thread::panicking() {
            // Disk images are large; keep the logs of passing runs only.
            if let Ok(entries) = fs::read_dir(&self.dir) {
                for entry in entries.flatten() {
                    if entry.path().extension().is_some_and(|e| e == "img") {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::without_terminal_controls;

    #[test]
    fn terminal_controls_are_dropped_from_console_lines() {
        assert_eq!(
            without_terminal_controls("\u{1b}c\u{1b}[?7l\u{1b}[2J\u{1b}[0mSeaBIOS\r\n"),
            "SeaBIOS\n"
        );
        assert_eq!(
            without_terminal_controls("MARK\u{1b}[25;05HER-BOOTED\u{1b}[0;1m ok"),
            "MARKER-BOOTED ok"
        );
        assert_eq!(without_terminal_controls("cut \u{1b}[12\n"), "cut \n");
        assert_eq!(without_terminal_controls("lone \u{1b}\n"), "lone \n");
        assert_eq!(
            without_terminal_controls("charset \u{1b}(ok\n"),
            "charset ok\n"
        );
        assert_eq!(without_terminal_controls("plain text\n"), "plain text\n");
    }
}
