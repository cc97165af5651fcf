//! `lab deploy`: does an image deploy and boot? For people who build golden images (Packer,
//! mkosi, mmdebstrap) and want CI to say so before a room of machines finds out.
//!
//! One command: a fresh bootserver store on the lab's private LAN, the image imported into it,
//! N QEMU machines with blank disks (at least the image's size) that network-boot, get a deploy
//! task each, write and verify their copy, reboot, boot their new disk through the lab's local
//! boot path (iPXE `sanboot` on BIOS, `localboot.efi` on UEFI), and print the expected text on
//! their serial console. Exit status 0 only when every machine did all of that.

use crate::{lab_file, DhcpMode, Firmware, Lab, VmSpec};
use diskcast_proto::image_file::valid_image_name;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

pub const USAGE: &str = "\
usage: lab deploy --image FILE [--vms N] [--uefi | --firmware bios|uefi|both] [--expect TEXT]
                  [--timeout S] [--copy-timeout S] [--disk-mib MIB] [--memory MIB] [--logs DIR]

  Imports FILE (a raw disk image) into a fresh bootserver store on a private virtual LAN,
  network-boots N QEMU machines (default 1) with blank disks and a deploy task each, lets them
  write and verify their copy, reboot and boot their new disk from the network-first boot order
  (the lab's local-boot path), and waits for TEXT on each serial console after that reboot.
  Exit status 0 only when every machine verified its copy and printed TEXT.

  --uefi               every machine boots with OVMF (UEFI); the default is SeaBIOS (BIOS)
  --firmware both      alternate: vm1 BIOS, vm2 UEFI, vm3 BIOS...
  --expect TEXT        what the image prints on its serial console (ttyS0, 115200) once booted;
                       without it, success is a verified copy and the server choosing local boot
  --timeout S          seconds each machine has, from the end of its copy, to reboot into its
                       disk and print TEXT (default 300)
  --copy-timeout S     seconds each machine has, from power-on, to verify its copy (default 900)
  --disk-mib MIB       size of each machine's disk (default: the image's size, rounded up)
  --memory MIB         memory of each machine (default 512)
  --logs DIR           also copy every console and the bootserver's log into DIR (CI artifacts)

  Consoles are kept as files under target/lab-runs/ (the run prints the directory). Runs as root
  (network namespace, tap devices); QEMU runs under TCG emulation, no KVM needed.";

/// What `lab deploy` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployArgs {
    pub image: PathBuf,
    pub vms: u8,
    pub firmware: FirmwareChoice,
    pub expect: Option<String>,
    pub timeout: Duration,
    pub copy_timeout: Duration,
    pub disk_mib: Option<u64>,
    pub memory_mib: u32,
    pub logs: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwareChoice {
    Bios,
    Uefi,
    Both,
}

impl FirmwareChoice {
    /// The firmware of machine `i` (from 1).
    pub fn of(self, i: u8) -> Firmware {
        match self {
            Self::Bios => Firmware::Bios,
            Self::Uefi => Firmware::Uefi,
            Self::Both if i % 2 == 1 => Firmware::Bios,
            Self::Both => Firmware::Uefi,
        }
    }
}

/// The most machines one run boots (each gets a MAC of its own in the lab's range).
pub const MAX_VMS: u8 = 32;

/// A bad command line: what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lab deploy: {}\n\n{USAGE}", self.0)
    }
}

fn number<T: std::str::FromStr>(option: &str, value: &str) -> Result<T, UsageError> {
    value
        .parse()
        .map_err(|_| UsageError(format!("{option} takes a whole number, not {value:?}")))
}

impl DeployArgs {
    /// Parses the arguments after `deploy`.
    pub fn parse(args: &[String]) -> Result<Self, UsageError> {
        let mut image = None;
        let mut vms = 1u8;
        let mut firmware = FirmwareChoice::Bios;
        let mut expect = None;
        let mut timeout = 300u64;
        let mut copy_timeout = 900u64;
        let mut disk_mib = None;
        let mut memory_mib = 512u32;
        let mut logs = None;
        let mut rest = args.iter();
        while let Some(option) = rest.next() {
            let mut value = || {
                rest.next()
                    .cloned()
                    .ok_or_else(|| UsageError(format!("{option} needs a value")))
            };
            match option.as_str() {
                "--image" => image = Some(PathBuf::from(value()?)),
                "--vms" => vms = number(option, &value()?)?,
                "--uefi" => firmware = FirmwareChoice::Uefi,
                "--firmware" => {
                    firmware = match value()?.as_str() {
                        "bios" => FirmwareChoice::Bios,
                        "uefi" => FirmwareChoice::Uefi,
                        "both" => FirmwareChoice::Both,
                        other => {
                            return Err(UsageError(format!(
                                "--firmware is bios, uefi or both, not {other:?}"
                            )))
                        }
                    }
                }
                "--expect" => {
                    let text = value()?;
                    if text.trim().is_empty() || text.contains('\n') {
                        return Err(UsageError(
                            "--expect takes a non-empty text of one line (what the image prints on its serial console)".into(),
                        ));
                    }
                    expect = Some(text);
                }
                "--timeout" => timeout = number(option, &value()?)?,
                "--copy-timeout" => copy_timeout = number(option, &value()?)?,
                "--disk-mib" => disk_mib = Some(number(option, &value()?)?),
                "--memory" => memory_mib = number(option, &value()?)?,
                "--logs" => logs = Some(PathBuf::from(value()?)),
                other => return Err(UsageError(format!("unknown option {other:?}"))),
            }
        }
        let image = image.ok_or_else(|| {
            UsageError("--image FILE is required: the raw disk image to deploy".into())
        })?;
        if !(1..=MAX_VMS).contains(&vms) {
            return Err(UsageError(format!("--vms is 1 to {MAX_VMS}, not {vms}")));
        }
        if timeout == 0 || copy_timeout == 0 {
            return Err(UsageError("timeouts are at least 1 second".into()));
        }
        if memory_mib < 256 {
            return Err(UsageError(format!(
                "--memory {memory_mib}: the agent needs at least 256 MiB"
            )));
        }
        Ok(Self {
            image,
            vms,
            firmware,
            expect,
            timeout: Duration::from_secs(timeout),
            copy_timeout: Duration::from_secs(copy_timeout),
            disk_mib,
            memory_mib,
            logs,
        })
    }
}

/// The image's size in bytes, or why it cannot be deployed.
pub fn image_size(image: &Path) -> Result<u64, String> {
    let meta = std::fs::metadata(image).map_err(|e| format!("--image {}: {e}", image.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "--image {}: not a regular file (give a raw disk image file; convert qcow2 and the like with `qemu-img convert -O raw`)",
            image.display()
        ));
    }
    if meta.len() == 0 {
        return Err(format!("--image {}: the file is empty", image.display()));
    }
    Ok(meta.len())
}

/// The name the image gets in the fresh store: its file name without extension when that is a
/// valid image name, else `image`.
pub fn store_name(image: &Path) -> String {
    image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| valid_image_name(s))
        .unwrap_or_else(|| "image".into())
}

/// Where one machine got to.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    /// Network-booting the agent, writing and verifying its copy.
    Copying,
    /// Copy verified (at this many seconds after power-on); rebooting into its disk.
    Rebooting { verified_after: f64 },
    /// TEXT seen (or local boot chosen, without --expect).
    Done {
        verified_after: f64,
        seen_after: f64,
    },
    /// `verified_after` when the copy verified before something else went wrong.
    Failed {
        verified_after: Option<f64>,
        why: String,
    },
}

/// One machine's row of the summary.
#[derive(Debug, Clone)]
pub struct Machine {
    pub name: String,
    pub mac: String,
    pub firmware: Firmware,
    pub stage: Stage,
    /// Index in the lab.
    vm: usize,
}

/// The marker the agent prints when its copy verified (pid1.rs).
const SLAVE_DONE: &str = "DISKCAST-SLAVE-DONE";
/// What the agent prints before it reboots, powers off or waits after a failure.
const AGENT_FAILED: &str = "diskcast: failed";

/// The console's text after the first line containing `marker`, if that line is there.
fn text_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let at = text.find(marker)?;
    let line_end = text[at..].find('\n').map_or(text.len(), |n| at + n + 1);
    Some(&text[line_end..])
}

/// A summary table: machine, firmware, MAC, verified, seconds, expected text seen.
pub fn summary_table(machines: &[Machine], expect: Option<&str>) -> String {
    let mut out = format!(
        "  {:<6} {:<9} {:<18} {:<9} {:>8} {:>8}  {}\n",
        "vm",
        "firmware",
        "mac",
        "verified",
        "copy s",
        "boot s",
        if expect.is_some() {
            "expect seen"
        } else {
            "local boot"
        }
    );
    for m in machines {
        let firmware = match m.firmware {
            Firmware::Bios => "BIOS",
            Firmware::Uefi => "UEFI",
            Firmware::UefiSecureBoot => "UEFI+SB",
        };
        let (verified, copy, boot, seen) = match &m.stage {
            Stage::Copying => ("no", "-".into(), "-".into(), "no"),
            Stage::Rebooting { verified_after } => {
                ("yes", format!("{verified_after:.1}"), "-".into(), "no")
            }
            Stage::Done {
                verified_after,
                seen_after,
            } => (
                "yes",
                format!("{verified_after:.1}"),
                format!("{seen_after:.1}"),
                "yes",
            ),
            Stage::Failed {
                verified_after: Some(after),
                ..
            } => ("yes", format!("{after:.1}"), "-".into(), "no"),
            Stage::Failed { .. } => ("no", "-".into(), "-".into(), "no"),
        };
        out.push_str(&format!(
            "  {:<6} {:<9} {:<18} {:<9} {:>8} {:>8}  {}\n",
            m.name, firmware, m.mac, verified, copy, boot, seen
        ));
    }
    out
}

/// The first `first` and the last `last` lines of `text`: where a boot went wrong is often
/// near its start, while the tail shows where it is stuck.
fn head_and_tail(text: &str, first: usize, last: usize) -> String {
    let count = text.lines().count();
    if count <= first + last {
        return tail(text, count);
    }
    let head: String = text
        .lines()
        .take(first)
        .map(|l| format!("    | {l}\n"))
        .collect();
    format!(
        "{head}    | ... {} lines ...\n{}",
        count - first - last,
        tail(text, last)
    )
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("    | {l}\n"))
        .collect()
}

/// Runs `lab deploy ARGS`; prints progress, the summary and the verdict.
pub fn run(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match DeployArgs::parse(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let size = match image_size(&args.image) {
        Ok(size) => size,
        Err(e) => {
            eprintln!("lab deploy: {e}");
            return ExitCode::from(2);
        }
    };
    let image_mib = size.div_ceil(1 << 20);
    let disk_mib = args.disk_mib.unwrap_or(image_mib);
    if disk_mib < image_mib {
        eprintln!(
            "lab deploy: --disk-mib {disk_mib} is smaller than the image ({image_mib} MiB): give at least {image_mib}"
        );
        return ExitCode::from(2);
    }
    if !is_root() {
        eprintln!(
            "lab deploy: run it as root: it creates a network namespace, a bridge and tap devices for the machines (in CI: a runner whose job is root)"
        );
        return ExitCode::from(2);
    }
    match deploy(&args, disk_mib) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("lab deploy: FAILED: {why}");
            ExitCode::FAILURE
        }
    }
}

/// Whether this process runs with effective user id 0 (read from /proc: no libc binding needed).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn deploy(args: &DeployArgs, disk_mib: u64) -> Result<(), String> {
    let mut lab = Lab::new("deploy");
    lab.on_done = "reboot";
    let started = Instant::now();
    println!(
        "lab deploy: namespace {}; consoles and logs in {}",
        lab.netns,
        lab.dir.display()
    );
    lab.start_bootserver(DhcpMode::Full, "");
    let name = store_name(&args.image);
    let config = lab.dir.join("bootserver.toml");
    let import = Command::new(lab_file("bootserver"))
        .args(["images", "--config"])
        .arg(&config)
        .arg("import")
        .arg(&args.image)
        .arg(&name)
        .output()
        .map_err(|e| format!("running bootserver images import: {e}"))?;
    if !import.status.success() {
        return Err(format!(
            "importing {} into the store failed:\n{}{}",
            args.image.display(),
            String::from_utf8_lossy(&import.stdout),
            String::from_utf8_lossy(&import.stderr)
        ));
    }
    print!("{}", String::from_utf8_lossy(&import.stdout));
    let mut machines: Vec<Machine> = (1..=args.vms)
        .map(|i| Machine {
            name: format!("vm{i}"),
            mac: format!("52:54:00:dc:00:{:02x}", 0x40 + i),
            firmware: args.firmware.of(i),
            stage: Stage::Copying,
            vm: 0,
        })
        .collect();
    let macs: Vec<&str> = machines.iter().map(|m| m.mac.as_str()).collect();
    print!("{}", lab.task(&["deploy", &name, "--to", &macs.join(",")]));
    println!(
        "lab deploy: {} machine(s) with {disk_mib} MiB disks network-boot for their tasks",
        args.vms
    );
    for (i, m) in (1u8..).zip(machines.iter_mut()) {
        m.vm = lab.boot_vm(
            VmSpec {
                memory_mib: args.memory_mib,
                ..VmSpec::new(&m.name, m.firmware, "virtio-net-pci", 0x40 + i)
            }
            .disk(disk_mib, &format!("DEPLOY-{i}"), "virtio-blk-pci")
            .rebooting(),
        );
    }
    watch(&mut lab, &mut machines, args);
    let tasks = lab.bootserver_cli(&["tasks", "--all"]);
    println!("lab deploy: the bootserver's record of the tasks:\n{tasks}");
    println!(
        "lab deploy: summary after {:.0} s (QEMU under TCG emulation):",
        started.elapsed().as_secs_f64()
    );
    print!("{}", summary_table(&machines, args.expect.as_deref()));
    let consoles: Vec<PathBuf> = machines
        .iter()
        .map(|m| lab.dir.join(format!("{}.console", m.name)))
        .collect();
    println!("lab deploy: consoles:");
    for path in &consoles {
        println!("  {}", path.display());
    }
    println!(
        "  {} (the bootserver)",
        lab.dir.join("bootserver-0.log").display()
    );
    if let Some(dir) = &args.logs {
        copy_logs(&lab.dir, dir, &consoles)?;
        println!(
            "lab deploy: consoles and the bootserver's log copied to {}",
            dir.display()
        );
    }
    let failures: Vec<String> = machines
        .iter()
        .filter_map(|m| match &m.stage {
            Stage::Done { .. } => None,
            Stage::Failed { why, .. } => Some(format!("{} ({}): {why}", m.name, m.mac)),
            other => Some(format!("{} ({}): unfinished ({other:?})", m.name, m.mac)),
        })
        .collect();
    if failures.is_empty() {
        println!(
            "lab deploy: OK: every machine verified its copy and {}",
            match &args.expect {
                Some(text) => format!("printed {text:?} after booting its new disk"),
                None => "rebooted into its local disk".into(),
            }
        );
        Ok(())
    } else {
        Err(failures.join("\n  "))
    }
}

fn copy_logs(from: &Path, to: &Path, consoles: &[PathBuf]) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("--logs {}: {e}", to.display()))?;
    for path in consoles
        .iter()
        .cloned()
        .chain([from.join("bootserver-0.log"), from.join("bootserver-0.out")])
    {
        if let Some(file) = path.file_name() {
            // A console that never opened has no file: nothing to copy.
            if path.exists() {
                std::fs::copy(&path, to.join(file))
                    .map_err(|e| format!("copying {} to {}: {e}", path.display(), to.display()))?;
            }
        }
    }
    Ok(())
}

/// Follows every machine until it is done or failed: its console, whether QEMU still runs, and
/// (without --expect) the bootserver's choice of local boot.
fn watch(lab: &mut Lab, machines: &mut [Machine], args: &DeployArgs) {
    loop {
        let server_log = lab.bootserver_log(0);
        for m in machines.iter_mut() {
            let vm = lab.vm(m.vm);
            let since_start = vm.started.elapsed().as_secs_f64();
            let text = vm.console.text();
            let exited = vm.wait_poweroff(Duration::ZERO).ok();
            let next = match &m.stage {
                Stage::Copying => {
                    if text_after(&text, SLAVE_DONE).is_some() {
                        println!(
                            "lab deploy: {} verified its copy after {since_start:.0} s; it reboots into its disk",
                            m.name
                        );
                        Some(Stage::Rebooting {
                            verified_after: since_start,
                        })
                    } else if text.contains(AGENT_FAILED) || exited.is_some() {
                        Some(Stage::Failed {
                            verified_after: None,
                            why: format!(
                                "the copy failed{}; the end of its console:\n{}",
                                task_reason(lab, &m.mac)
                                    .map_or(String::new(), |r| format!(": {r}")),
                                tail(&text, 12)
                            ),
                        })
                    } else if since_start > args.copy_timeout.as_secs_f64() {
                        Some(Stage::Failed {
                            verified_after: None,
                            why: format!(
                                "no verified copy within {} s of power-on (--copy-timeout); the end of its console:\n{}",
                                args.copy_timeout.as_secs(),
                                tail(&text, 12)
                            ),
                        })
                    } else {
                        None
                    }
                }
                Stage::Rebooting { verified_after } => {
                    let after = text_after(&text, SLAVE_DONE).unwrap_or("");
                    let seen = match &args.expect {
                        Some(expect) => after.contains(expect.as_str()),
                        None => {
                            server_log.contains(&format!("lab: {} boots its local disk", m.mac))
                        }
                    };
                    if seen {
                        println!(
                            "lab deploy: {} {} after {since_start:.0} s",
                            m.name,
                            match &args.expect {
                                Some(text) => format!("printed {text:?}"),
                                None => "was sent to its local disk".into(),
                            }
                        );
                        Some(Stage::Done {
                            verified_after: *verified_after,
                            seen_after: since_start,
                        })
                    } else if exited.is_some() {
                        Some(Stage::Failed {
                            verified_after: Some(*verified_after),
                            why: format!(
                                "verified its copy, then powered off instead of booting its disk; the end of its console:\n{}",
                                tail(after, 12)
                            ),
                        })
                    } else if since_start - verified_after > args.timeout.as_secs_f64() {
                        Some(Stage::Failed {
                            verified_after: Some(*verified_after),
                            why: match &args.expect {
                                Some(text) => format!(
                                    "verified its copy and rebooted, but {text:?} never appeared on its serial console within {} s (--timeout); what it printed after the reboot:\n{}",
                                    args.timeout.as_secs(),
                                    head_and_tail(after, 20, 12)
                                ),
                                None => format!(
                                    "verified its copy, but did not network-boot again to be sent to its local disk within {} s (--timeout)",
                                    args.timeout.as_secs()
                                ),
                            },
                        })
                    } else {
                        None
                    }
                }
                Stage::Done { .. } | Stage::Failed { .. } => None,
            };
            if let Some(stage) = next {
                if let Stage::Failed { why, .. } = &stage {
                    println!("lab deploy: {} FAILED: {why}", m.name);
                }
                m.stage = stage;
            }
        }
        let all_final = machines
            .iter()
            .all(|m| matches!(m.stage, Stage::Done { .. } | Stage::Failed { .. }));
        if all_final {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Why the bootserver's record says `mac`'s task failed, if it does.
fn task_reason(lab: &Lab, mac: &str) -> Option<String> {
    let tasks: serde_json::Value =
        serde_json::from_str(&lab.api_get("/api/v1/tasks?all=true")).ok()?;
    tasks
        .as_array()?
        .iter()
        .filter(|t| t["mac"] == mac)
        .find_map(|t| {
            let state = t["state"].as_str()?;
            (state != "verified").then(|| {
                format!(
                    "task {} {state}{}",
                    t["id"],
                    t["reason"]
                        .as_str()
                        .map_or(String::new(), |r| format!(" ({r})"))
                )
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_long_console_is_shown_by_its_start_and_its_end() {
        let text: String = (1..=40).map(|i| format!("line {i}\n")).collect();
        let shown = head_and_tail(&text, 3, 2);
        assert_eq!(
            shown,
            "    | line 1\n    | line 2\n    | line 3\n    | ... 35 lines ...\n    | line 39\n    | line 40\n"
        );
        assert_eq!(head_and_tail("a\nb\n", 3, 2), "    | a\n    | b\n");
    }

    #[test]
    fn the_command_line_is_read_with_defaults() {
        let parsed = DeployArgs::parse(&args("--image golden.raw")).unwrap();
        assert_eq!(parsed.image, PathBuf::from("golden.raw"));
        assert_eq!(parsed.vms, 1);
        assert_eq!(parsed.firmware, FirmwareChoice::Bios);
        assert_eq!(parsed.expect, None);
        assert_eq!(parsed.timeout, Duration::from_secs(300));
        let parsed = DeployArgs::parse(&args(
            "--image x.img --vms 3 --uefi --expect login: --timeout 20 --disk-mib 100 --logs out",
        ))
        .unwrap();
        assert_eq!(parsed.vms, 3);
        assert_eq!(parsed.firmware, FirmwareChoice::Uefi);
        assert_eq!(parsed.expect.as_deref(), Some("login:"));
        assert_eq!(parsed.timeout, Duration::from_secs(20));
        assert_eq!(parsed.disk_mib, Some(100));
        assert_eq!(parsed.logs, Some(PathBuf::from("out")));
        let both = DeployArgs::parse(&args("--image x --vms 3 --firmware both")).unwrap();
        let firmwares: Vec<Firmware> = (1..=3).map(|i| both.firmware.of(i)).collect();
        assert_eq!(firmwares, [Firmware::Bios, Firmware::Uefi, Firmware::Bios]);
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        for (line, says) in [
            ("", "--image FILE is required"),
            ("--image", "--image needs a value"),
            ("--image x --vms 0", "--vms is 1 to 32, not 0"),
            ("--image x --vms 40", "--vms is 1 to 32"),
            (
                "--image x --vms many",
                "--vms takes a whole number, not \"many\"",
            ),
            ("--image x --firmware coreboot", "bios, uefi or both"),
            ("--image x --timeout 0", "at least 1 second"),
            ("--image x --memory 64", "at least 256 MiB"),
            ("--image x --fast", "unknown option \"--fast\""),
        ] {
            let e = DeployArgs::parse(&args(line)).unwrap_err();
            assert!(e.0.contains(says), "{line:?}: {e}");
            assert!(e.to_string().contains("usage: lab deploy"), "{e}");
        }
        let e = DeployArgs::parse(&["--image".into(), "x".into(), "--expect".into(), " ".into()])
            .unwrap_err();
        assert!(e.0.contains("non-empty"), "{e}");
    }

    #[test]
    fn images_that_cannot_be_deployed_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("diskcast-deploy-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = image_size(&dir.join("nope.raw")).unwrap_err();
        assert!(missing.contains("nope.raw"), "{missing}");
        let not_file = image_size(&dir).unwrap_err();
        assert!(not_file.contains("not a regular file"), "{not_file}");
        let empty = dir.join("empty.raw");
        std::fs::write(&empty, b"").unwrap();
        assert!(image_size(&empty).unwrap_err().contains("empty"));
        let fine = dir.join("golden-2026.01.raw");
        std::fs::write(&fine, [1u8; 1000]).unwrap();
        assert_eq!(image_size(&fine), Ok(1000));
        assert_eq!(store_name(&fine), "golden-2026.01");
        assert_eq!(store_name(Path::new("/tmp/my image!.raw")), "image");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn text_is_looked_for_only_after_the_copy() {
        let console = "iPXE\nDISKCAST-READY role=slave\nlogin: (agent says)\nDISKCAST-SLAVE-DONE /dev/vda verified\nSeaBIOS\nlogin:";
        let after = text_after(console, SLAVE_DONE).unwrap();
        assert_eq!(after, "SeaBIOS\nlogin:");
        assert!(text_after("DISKCAST-READY", SLAVE_DONE).is_none());
    }

    #[test]
    fn the_summary_names_every_machine() {
        let machines = vec![
            Machine {
                name: "vm1".into(),
                mac: "52:54:00:dc:00:41".into(),
                firmware: Firmware::Bios,
                stage: Stage::Done {
                    verified_after: 31.26,
                    seen_after: 40.0,
                },
                vm: 0,
            },
            Machine {
                name: "vm2".into(),
                mac: "52:54:00:dc:00:42".into(),
                firmware: Firmware::Uefi,
                stage: Stage::Failed {
                    verified_after: Some(55.0),
                    why: "never printed".into(),
                },
                vm: 1,
            },
        ];
        let table = summary_table(&machines, Some("login:"));
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 3, "{table}");
        assert!(rows[0].contains("expect seen"));
        let cells = |row: &str| row.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            cells(rows[1]),
            [
                "vm1",
                "BIOS",
                "52:54:00:dc:00:41",
                "yes",
                "31.3",
                "40.0",
                "yes"
            ]
        );
        assert_eq!(
            cells(rows[2]),
            ["vm2", "UEFI", "52:54:00:dc:00:42", "yes", "55.0", "-", "no"]
        );
    }
}
