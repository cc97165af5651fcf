//! Multicast imaging benchmark: diskcast, udpcast and uftp side by side on the same emulated LAN
//! (private namespaces, the sender's link limited to 1 Gbit/s with tbf, random loss at every
//! receiver with nftables, on datagrams: with loss the sender's interface cuts GSO sends into
//! datagrams as a NIC would), interleaved run by run. Prints MB/s, bytes on the wire relative to
//! the image, verified copies, and diskcast's ratio to the faster peer.
//!
//! `--with-deploy` adds client/server mode: the same image imported once into an image store
//! (zstd), then multicast from the store by `bootserver deploy`. `--content disk` makes the
//! image disk-like (a third zeros, a third text, a third random) instead of all random.
//!
//! Every tool runs with its manual's advice for speed: uftp in a closed group (`-H`, each
//! `uftpd -U id`) with quiet receivers (`-q`) and 16 MiB socket buffers (`-B`) on both sides;
//! udpcast with `--nokbd`, `--min-receivers N`, `--nopointopoint` (stays multicast with one
//! receiver) and 16 MiB receive buffers (`--rcvbuf`). Beside MB/s it prints CPU seconds per GB
//! of image for the sender and per receiver (from the kernel's accounting of the reaped
//! processes) and the peak resident memory of a receiver (VmHWM, sampled while it runs).
//!
//! `--unshaped` (one receiver, no rate limit, no loss) also measures the same veth path with one
//! TCP stream (iperf3) and the disk with `dd oflag=direct` of the same file, for the ratios the
//! README reports.
//!
//! `--mtu N` sets the MTU of every link of the emulated LAN (the hosts' interfaces, their veth
//! ends and the bridge), e.g. 9000 for jumbo frames: diskcast's sender sizes its datagrams by it
//! (`--block-size mtu`), and with `--unshaped` iperf3 and dd measure the same path.
//!
//! `--compare-agent PATH` runs a second peer-to-peer diskcast with another build of the agent
//! (e.g. main's, to measure a change before and after in the same interleaved run); with
//! `--with-deploy` each p2p column's ratio to deploy from the store is printed too.
//!
//! `scripts/bench-multicast [--size-mib 512] [--runs 1] [--receivers 1,3,8] [--loss 0,1,5]
//!  [--only-diskcast] [--with-deploy] [--content random|disk] [--unshaped]
//!  [--diskcast-args "--proactive-parity 0.05"] [--compare-agent PATH] [--mtu 9000]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{project_root, Lab};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Diskcast,
    /// Peer-to-peer diskcast with the agent given by `--compare-agent`.
    DiskcastCompared,
    Udpcast,
    Uftp,
    /// `bootserver deploy` from an image store.
    Deploy,
}

impl Tool {
    fn label(self) -> &'static str {
        match self {
            Tool::Diskcast => "diskcast p2p",
            Tool::DiskcastCompared => "diskcast p2p (compared agent)",
            Tool::Udpcast => "udpcast",
            Tool::Uftp => "uftp",
            Tool::Deploy => "diskcast deploy",
        }
    }

    fn is_peer(self) -> bool {
        matches!(self, Tool::Udpcast | Tool::Uftp)
    }
}

struct RunResult {
    /// Until the tool's processes ended.
    seconds: f64,
    /// Until every copy was on disk as well: `seconds` plus an fsync of each copy.
    durable_seconds: f64,
    wire_bytes: u64,
    verified: usize,
    /// CPU seconds (user + system) of the sender and of all receivers together.
    sender_cpu: f64,
    receivers_cpu: f64,
    /// Largest VmHWM of a receiver, KiB.
    receiver_peak_kib: u64,
    image_bytes: u64,
    /// diskcast's own session summary line (data rate, data sent).
    summary: Option<String>,
}

/// CPU seconds the reaped children used so far.
fn children_cpu() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// A running process's peak resident memory (VmHWM), KiB.
fn peak_kib(child: &Child) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Waits (and reaps) until every child exited, sampling their peak memory; kills them all at the
/// deadline. Returns whether they exited on their own.
fn wait_group(children: &mut [Child], deadline: Instant, peak: &mut u64) -> bool {
    let mut done = vec![false; children.len()];
    loop {
        for (c, d) in children.iter_mut().zip(done.iter_mut()) {
            if !*d {
                *peak = (*peak).max(peak_kib(c));
                *d = c.try_wait().ok().flatten().is_some();
            }
        }
        if done.iter().all(|d| *d) {
            return true;
        }
        if Instant::now() > deadline {
            for c in children.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn arg_list<T: std::str::FromStr>(args: &[String], name: &str, default: &str) -> Vec<T> {
    let value = args
        .iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |s| s.as_str());
    value
        .split(',')
        .map(|v| v.parse().ok().expect("bad number"))
        .collect()
}

fn tx_bytes(netns: &str) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "cat",
            "/sys/class/net/eth0/statistics/tx_bytes",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn spawn(netns: &str, program: &str, args: &[&str], log: &Path) -> Child {
    spawn_in(Path::new("/"), netns, program, args, log)
}

fn spawn_in(cwd: &Path, netns: &str, program: &str, args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new("ip")
        .current_dir(cwd)
        .args(["netns", "exec", netns, program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The key diskcast's senders sign with in the bench (made once in `dir`), and its public key.
fn bench_key(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("bench.key");
    if !path.exists() {
        diskcast_qemu_tests::make_key(&path);
    }
    let out = Command::new(diskcast_qemu_tests::host_agent())
        .args(["key", "show"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "agent key show failed: {out:?}");
    (
        path,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

/// What the diskcast runs are given: `--diskcast-args` and `--compare-agent`.
struct DiskcastSettings {
    args: Vec<String>,
    compared_agent: Option<String>,
    /// `--mtu` was given: every link has that MTU, so this build's sender is told to size its
    /// blocks by it (`--block-size mtu`; a `--compare-agent` build is left as it is).
    blocks_from_mtu: bool,
}

fn run_tool(
    tool: Tool,
    lab: &Lab,
    sender: &str,
    receivers: &[String],
    source: &Path,
    dir: &Path,
    diskcast: &DiskcastSettings,
) -> RunResult {
    let (diskcast_args, compared_agent) = (&diskcast.args, diskcast.compared_agent.as_deref());
    let agent = diskcast_qemu_tests::host_agent();
    let agent = match (tool, compared_agent) {
        (Tool::DiskcastCompared, Some(other)) => other,
        _ => agent.to_str().unwrap(),
    };
    let n = receivers.len();
    let targets: Vec<PathBuf> = (0..n)
        .map(|i| dir.join(format!("rx{i}")).join("source.img"))
        .collect();
    for t in &targets {
        let _ = std::fs::remove_dir_all(t.parent().unwrap());
        std::fs::create_dir_all(t.parent().unwrap()).unwrap();
    }
    let logs = lab.dir.join("bench-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = |name: &str| logs.join(format!("{tool:?}-{name}.log"));
    let before = tx_bytes(sender);
    let src = source.to_str().unwrap();
    let min = n.to_string();
    let (key, public) = bench_key(dir);
    let key = key.to_str().unwrap();
    let mut rx: Vec<Child> = receivers
        .iter()
        .zip(&targets)
        .enumerate()
        .map(|(i, (ns, target))| {
            let t = target.to_str().unwrap();
            let dest = target.parent().unwrap().to_str().unwrap();
            match tool {
                Tool::Diskcast | Tool::DiskcastCompared | Tool::Deploy => spawn(
                    ns,
                    agent,
                    &[
                        "receive", "-i", "eth0", "--wait", "120", "--trust", &public, t,
                    ],
                    &log(&format!("rx{i}")),
                ),
                Tool::Udpcast => spawn(
                    ns,
                    "udp-receiver",
                    &[
                        "--file",
                        t,
                        "--interface",
                        "eth0",
                        "--nokbd",
                        "--rcvbuf",
                        SOCKET_BUFFER,
                    ],
                    &log(&format!("rx{i}")),
                ),
                Tool::Uftp => spawn(
                    ns,
                    "uftpd",
                    &[
                        "-d",
                        "-q",
                        "-I",
                        "eth0",
                        "-U",
                        &uftp_id(i),
                        "-B",
                        SOCKET_BUFFER,
                        "-D",
                        dest,
                    ],
                    &log(&format!("rx{i}")),
                ),
            }
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let started = Instant::now();
    let store = dir.join("store");
    let bootserver = project_root().join("target/release/bootserver");
    let mut snd = match tool {
        Tool::Deploy => spawn(
            sender,
            bootserver.to_str().unwrap(),
            &[
                "deploy",
                "bench",
                "--store",
                store.to_str().unwrap(),
                "--key",
                key,
                "-i",
                "eth0",
                "--min-receivers",
                &min,
                "--start-timeout",
                "60",
            ],
            &log("sender"),
        ),
        Tool::Diskcast | Tool::DiskcastCompared => {
            let mut args: Vec<&str> = vec![
                "send",
                "-i",
                "eth0",
                "--min-receivers",
                &min,
                "--start-timeout",
                "60",
                "--key",
                key,
            ];
            if tool == Tool::Diskcast && diskcast.blocks_from_mtu {
                args.extend(["--block-size", "mtu"]);
            }
            args.extend(diskcast_args.iter().map(String::as_str));
            args.push(src);
            spawn(sender, agent, &args, &log("sender"))
        }
        Tool::Udpcast => spawn(
            sender,
            "udp-sender",
            &[
                "--file",
                src,
                "--interface",
                "eth0",
                "--nokbd",
                "--min-receivers",
                &min,
                "--nopointopoint",
            ],
            &log("sender"),
        ),
        // uftp sends the name it is given: a relative one, from the source's directory. A
        // closed group (-H) spares it the open group's announcements and waits.
        Tool::Uftp => {
            let ids: Vec<String> = (0..n).map(uftp_id).collect();
            spawn_in(
                source.parent().unwrap(),
                sender,
                "uftp",
                &[
                    "-I",
                    "eth0",
                    "-R",
                    "-1",
                    "-B",
                    SOCKET_BUFFER,
                    "-H",
                    &ids.join(","),
                    "source.img",
                ],
                &log("sender"),
            )
        }
    };
    let deadline = started + Duration::from_secs(150);
    let mut receiver_peak_kib = 0;
    let mut sender_peak = 0;
    let cpu_before = children_cpu();
    // Imaging is done when the copies are on disk (the machine reboots next). The peers write
    // through the page cache and leave the flush to whoever comes after them; diskcast's
    // receivers write with O_DIRECT, flush and read back before they exit, so this costs it
    // nothing. Returns the seconds from the start until the copies are on disk.
    let flush_copies = || {
        for target in &targets {
            if let Ok(file) = std::fs::File::open(target) {
                let _ = file.sync_all();
            }
        }
        started.elapsed().as_secs_f64()
    };
    let (seconds, durable_seconds, sender_cpu, receivers_cpu) = match tool {
        Tool::Uftp => {
            // uftpd never exits: the transfer ends when the sender does.
            wait_group(std::slice::from_mut(&mut snd), deadline, &mut sender_peak);
            let seconds = started.elapsed().as_secs_f64();
            let durable_seconds = flush_copies();
            let sender_done = children_cpu();
            for c in &rx {
                receiver_peak_kib = receiver_peak_kib.max(peak_kib(c));
            }
            std::thread::sleep(Duration::from_millis(300));
            for c in &mut rx {
                let _ = c.kill();
                let _ = c.wait();
            }
            (
                seconds,
                durable_seconds,
                sender_done - cpu_before,
                children_cpu() - sender_done,
            )
        }
        _ => {
            // Receivers first, then the sender, so the kernel's accounting splits them.
            wait_group(&mut rx, deadline, &mut receiver_peak_kib);
            let receivers_done = children_cpu();
            wait_group(
                std::slice::from_mut(&mut snd),
                deadline.max(Instant::now() + Duration::from_secs(5)),
                &mut sender_peak,
            );
            let seconds = started.elapsed().as_secs_f64();
            (
                seconds,
                flush_copies(),
                children_cpu() - receivers_done,
                receivers_done - cpu_before,
            )
        }
    };
    let wire_bytes = tx_bytes(sender) - before;
    let verified = targets.iter().filter(|t| same_file(t, source)).count();
    for t in &targets {
        let _ = std::fs::remove_dir_all(t.parent().unwrap());
    }
    RunResult {
        seconds,
        durable_seconds,
        wire_bytes,
        verified,
        sender_cpu,
        receivers_cpu,
        receiver_peak_kib,
        image_bytes: std::fs::metadata(source).map_or(1, |m| m.len()),
        // The session's summary line, and what the scan compressed.
        summary: std::fs::read_to_string(log("sender"))
            .ok()
            .and_then(|text| {
                let summary = text
                    .lines()
                    .find(|l| l.starts_with("session summary:"))
                    .map(|l| l.trim_start_matches("session summary: ").to_string())?;
                let compressed = text
                    .lines()
                    // Log lines carry a prefix (time, level).
                    .filter(|l| l.contains(" compressed ") || l.contains(" the session moved "))
                    .collect::<Vec<_>>()
                    .join("; ");
                Some(if compressed.is_empty() {
                    summary
                } else {
                    format!("{summary}; {compressed}")
                })
            }),
    }
}

/// Flushes every file system's dirty pages (`sync`).
fn sync_disks() {
    let _ = Command::new("sync").status();
}

/// Socket buffers the peers are given (their manuals advise large ones for fast links).
const SOCKET_BUFFER: &str = "16777216";

/// uftpd's client id for receiver `i` (a closed group names its members).
fn uftp_id(i: usize) -> String {
    format!("0x{:08x}", 0x100 + i)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

const USAGE: &str = "usage: scripts/bench-multicast [--size-mib 512] [--runs 1] [--receivers 1,3,8]
  [--loss 0,1,5] [--only-diskcast] [--with-deploy] [--content random|disk] [--unshaped]
  [--diskcast-args \"--proactive-parity 0.05\"] [--compare-agent PATH] [--mtu 9000]
Runs diskcast, udpcast and uftp side by side in private network namespaces (1 Gbit/s sender link,
random loss at every receiver) and prints MB/s, wire bytes, CPU per GB and verified copies.";

/// Refuses a command line the benchmark would misread: an unknown option (a typo would
/// otherwise run a long default benchmark), an option without its value, or a bad `--content`.
fn check_args(args: &[String]) -> Result<(), String> {
    const WITH_VALUE: [&str; 8] = [
        "--size-mib",
        "--runs",
        "--receivers",
        "--loss",
        "--compare-agent",
        "--content",
        "--mtu",
        "--diskcast-args",
    ];
    const FLAGS: [&str; 3] = ["--only-diskcast", "--with-deploy", "--unshaped"];
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        if FLAGS.contains(&arg.as_str()) {
            continue;
        }
        if !WITH_VALUE.contains(&arg.as_str()) {
            return Err(format!("unknown option {arg:?}"));
        }
        let value = rest.next().ok_or_else(|| format!("{arg} needs a value"))?;
        if arg == "--content" && value != "random" && value != "disk" {
            return Err(format!("--content is random or disk, not {value:?}"));
        }
    }
    Ok(())
}

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    // scripts/bench-multicast checks the command line before it builds the lab.
    let check_only = args.iter().any(|a| a == "--check-only");
    args.retain(|a| a != "--check-only");
    if let Err(why) = check_args(&args) {
        eprintln!("bench-multicast: {why}\n{USAGE}");
        std::process::exit(2);
    }
    if check_only {
        return;
    }
    let size_mib: Vec<u64> = arg_list(&args, "--size-mib", "512");
    let runs: Vec<usize> = arg_list(&args, "--runs", "1");
    let receiver_counts: Vec<usize> = arg_list(&args, "--receivers", "1,3,8");
    let losses: Vec<f64> = arg_list(&args, "--loss", "0,1,5");
    let mut tools: Vec<Tool> = if args.iter().any(|a| a == "--only-diskcast") {
        vec![Tool::Diskcast]
    } else {
        vec![Tool::Diskcast, Tool::Udpcast, Tool::Uftp]
    };
    let compared_agent: Option<String> = args
        .iter()
        .position(|a| a == "--compare-agent")
        .and_then(|i| args.get(i + 1))
        .cloned();
    if compared_agent.is_some() {
        tools.insert(1, Tool::DiskcastCompared);
    }
    let with_deploy = args.iter().any(|a| a == "--with-deploy");
    if with_deploy {
        tools.push(Tool::Deploy);
    }
    let disk_like = args
        .iter()
        .position(|a| a == "--content")
        .and_then(|i| args.get(i + 1))
        .is_some_and(|c| c == "disk");
    let size = size_mib[0] << 20;
    let unshaped = args.iter().any(|a| a == "--unshaped");
    let mtu: Option<u32> = args
        .iter()
        .position(|a| a == "--mtu")
        .and_then(|i| args.get(i + 1))
        .map(|m| m.parse().expect("--mtu takes a number of bytes, e.g. 9000"));
    let (receiver_counts, losses) = if unshaped {
        (vec![1], vec![0.0])
    } else {
        (receiver_counts, losses)
    };
    let diskcast_args: Vec<String> = args
        .iter()
        .position(|a| a == "--diskcast-args")
        .and_then(|i| args.get(i + 1))
        .map(|a| a.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let diskcast = DiskcastSettings {
        args: diskcast_args,
        compared_agent,
        blocks_from_mtu: mtu.is_some(),
    };
    let mut reference = None;

    let mut rows = Vec::new();
    for &n in &receiver_counts {
        for &loss in &losses {
            let mut lab = Lab::new(&format!("bench-{n}-{loss}"));
            let sender = lab.add_host("snd", "10.77.0.10/24");
            if !unshaped {
                Lab::limit_egress(&sender, "eth0", 1000);
            }
            let receivers: Vec<String> = (0..n)
                .map(|i| lab.add_host(&format!("r{i}"), &format!("10.77.0.{}/24", 20 + i)))
                .collect();
            if let Some(mtu) = mtu {
                lab.set_mtu(mtu);
            }
            if loss > 0.0 {
                // Loss is per frame on a real wire, so the sender's GSO sends are cut there.
                Lab::segment_on_send(&sender, "eth0");
                for r in &receivers {
                    Lab::add_ingress_loss(r, loss);
                }
            }
            let work = project_root().join("target/bench-multicast");
            std::fs::create_dir_all(&work).unwrap();
            let source_dir = work.join("src");
            std::fs::create_dir_all(&source_dir).unwrap();
            let source = source_dir.join("source.img");
            let mut data = vec![0u8; size as usize];
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            for (i, block) in data.chunks_mut(1 << 20).enumerate() {
                match (disk_like, i % 3) {
                    (true, 0) => {}
                    (true, 1) => block
                        .iter_mut()
                        .enumerate()
                        .for_each(|(j, b)| *b = b"usr/lib/x86_64-linux-gnu/libc.so "[j % 33]),
                    _ => block.iter_mut().for_each(|b| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        *b = (state >> 24) as u8;
                    }),
                }
            }
            std::fs::write(&source, data).unwrap();
            if with_deploy {
                let store = work.join("store");
                let _ = std::fs::remove_dir_all(&store);
                let (key, _) = bench_key(&work);
                let out = Command::new(project_root().join("target/release/bootserver"))
                    .args(["images", "--store", store.to_str().unwrap(), "--key"])
                    .arg(&key)
                    .arg("import")
                    .arg(&source)
                    .arg("bench")
                    .output()
                    .unwrap();
                assert!(out.status.success(), "import failed: {out:?}");
                eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
            }
            // The source and the store reach the disk before the first tool starts: their
            // writeback would otherwise slow whichever tool runs first (diskcast).
            sync_disks();
            let mut results: Vec<(Tool, Vec<RunResult>)> =
                tools.iter().map(|&t| (t, Vec::new())).collect();
            if unshaped {
                reference = Some(reference_figures(&sender, &receivers[0], &source, &work));
            }
            for run in 0..runs[0] {
                for (tool, list) in &mut results {
                    let r = run_tool(*tool, &lab, &sender, &receivers, &source, &work, &diskcast);
                    eprintln!(
                        "N={n} loss={loss}% run {run}: {tool:?}: {:.1} s, {:.1} MB/s on disk ({:.1} s, {:.1} MB/s at exit), wire {:.2}x, verified {}/{n}, cpu s/GB sender {:.2} receiver {:.2}, receiver peak {} KiB{}",
                        r.durable_seconds,
                        size as f64 / r.durable_seconds / 1e6,
                        r.seconds,
                        size as f64 / r.seconds / 1e6,
                        r.wire_bytes as f64 / size as f64,
                        r.verified,
                        r.sender_cpu / (size as f64 / 1e9),
                        r.receivers_cpu / n as f64 / (size as f64 / 1e9),
                        r.receiver_peak_kib,
                        r.summary.as_deref().map_or(String::new(), |s| format!("; {s}")),
                    );
                    list.push(r);
                }
            }
            let s: Vec<_> = results.iter().map(|(t, l)| (*t, summarize(l, n))).collect();
            rows.push((n, loss, s));
            drop(lab);
        }
    }
    println!(
        "\nimage {} MiB of {} data; sender link {}, MTU {}; median of {} run(s); MB/s = image / time until every copy \
         is on disk (the tools' run, then an fsync of each copy: the peers leave their writes in the page cache), \
         in brackets until the tools exited; with loss the sender's interface cuts GSO sends into datagrams \
         (loss per frame, as on a wire); wire = bytes the sender's interface sent / image; ok = runs with every copy verified; \
         cpu = CPU seconds per GB of image, sender / each receiver; peak = largest receiver RSS",
        size_mib[0],
        if disk_like { "disk-like (1/3 zero, 1/3 text, 1/3 random)" } else { "random" },
        if unshaped { "unshaped (veth)" } else { "1 Gbit/s (tbf)" },
        mtu.unwrap_or(1500),
        runs[0]
    );
    let header: Vec<String> = tools
        .iter()
        .map(|t| format!("{} MB/s (at exit; wire, ok; cpu; peak)", t.label()))
        .collect();
    println!(
        "| receivers | loss | {} | diskcast p2p / faster peer |",
        header.join(" | ")
    );
    println!("|---|---|{}---|", "---|".repeat(tools.len()));
    for (n, loss, s) in rows {
        let cells: Vec<String> = s
            .iter()
            .map(|(_, f)| {
                format!(
                    "{:.1} ({:.1}; {:.2}x, {}/{}; {:.2}/{:.2}; {} MiB)",
                    f.mbs,
                    f.exit_mbs,
                    f.wire,
                    f.ok,
                    f.total,
                    f.sender_cpu,
                    f.receiver_cpu,
                    f.peak_kib / 1024
                )
            })
            .collect();
        // Only a peer that verified every copy in every run sets a speed to beat.
        let ratio = |speed: fn(&Figures) -> f64| {
            let best_peer = s
                .iter()
                .filter(|(t, f)| t.is_peer() && f.ok == f.total)
                .map(|(_, f)| speed(f))
                .fold(0.0, f64::max);
            if best_peer > 0.0 {
                format!("{:.2}x", speed(&s[0].1) / best_peer)
            } else if s.iter().any(|(t, _)| t.is_peer()) {
                "no peer verified".into()
            } else {
                "-".into()
            }
        };
        println!(
            "| {n} | {loss}% | {} | {} (at exit {}) |",
            cells.join(" | "),
            ratio(|f| f.mbs),
            ratio(|f| f.exit_mbs)
        );
        if let Some((_, deploy)) = s.iter().find(|(t, _)| *t == Tool::Deploy) {
            for (tool, f) in s
                .iter()
                .filter(|(t, _)| matches!(t, Tool::Diskcast | Tool::DiskcastCompared))
            {
                println!(
                    "  {} / deploy from the store: {:.2}",
                    tool.label(),
                    f.mbs / deploy.mbs.max(f64::MIN_POSITIVE)
                );
            }
        }
        for (tool, f) in &s {
            if let Some(summary) = &f.summary {
                println!("  {}: {summary}", tool.label());
            }
        }
    }
    if let Some((tcp, dd)) = reference {
        println!(
            "\nsame path, same run: one TCP stream (iperf3) {tcp:.1} MB/s; dd oflag=direct of the image {dd:.1} MB/s"
        );
    }
}

struct Figures {
    /// MB/s until every copy was on disk.
    mbs: f64,
    /// MB/s until the tool's processes ended.
    exit_mbs: f64,
    wire: f64,
    ok: usize,
    total: usize,
    sender_cpu: f64,
    receiver_cpu: f64,
    peak_kib: u64,
    summary: Option<String>,
}

fn summarize(list: &[RunResult], n: usize) -> Figures {
    let size = |r: &RunResult| r.image_bytes as f64;
    Figures {
        mbs: median(
            list.iter()
                .map(|r| size(r) / r.durable_seconds / 1e6)
                .collect(),
        ),
        exit_mbs: median(list.iter().map(|r| size(r) / r.seconds / 1e6).collect()),
        wire: median(list.iter().map(|r| r.wire_bytes as f64 / size(r)).collect()),
        ok: list.iter().filter(|r| r.verified == n).count(),
        total: list.len(),
        sender_cpu: median(
            list.iter()
                .map(|r| r.sender_cpu / (size(r) / 1e9))
                .collect(),
        ),
        receiver_cpu: median(
            list.iter()
                .map(|r| r.receivers_cpu / n as f64 / (size(r) / 1e9))
                .collect(),
        ),
        peak_kib: list.iter().map(|r| r.receiver_peak_kib).max().unwrap_or(0),
        summary: list.last().and_then(|r| r.summary.clone()),
    }
}

/// One TCP stream over the same path (iperf3, 5 s) and `dd oflag=direct` of the image to the
/// receivers' file system, in MB/s.
fn reference_figures(sender: &str, receiver: &str, source: &Path, dir: &Path) -> (f64, f64) {
    let mut server = Command::new("ip")
        .args(["netns", "exec", receiver, "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 (scripts/setup installs it)");
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            sender,
            "iperf3",
            "-c",
            "10.77.0.20",
            "-t",
            "5",
            "-J",
        ])
        .output()
        .unwrap();
    let _ = server.wait();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let tcp = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 8e6;
    let target = dir.join("dd.img");
    let started = Instant::now();
    let status = Command::new("dd")
        .arg(format!("if={}", source.display()))
        .arg(format!("of={}", target.display()))
        .args(["bs=1M", "oflag=direct", "conv=fsync", "status=none"])
        .status()
        .unwrap();
    assert!(status.success(), "dd failed");
    let dd =
        std::fs::metadata(source).unwrap().len() as f64 / started.elapsed().as_secs_f64() / 1e6;
    let _ = std::fs::remove_file(&target);
    (tcp, dd)
}

#[cfg(test)]
mod tests {
    use super::check_args;

    fn line(text: &str) -> Vec<String> {
        std::iter::once("bench-multicast")
            .chain(text.split_whitespace())
            .map(String::from)
            .collect()
    }

    #[test]
    fn a_mistyped_or_incomplete_command_line_is_refused() {
        assert_eq!(
            check_args(&line(
                "--receivers 3,8 --loss 1,5 --only-diskcast --content disk"
            )),
            Ok(())
        );
        assert_eq!(
            check_args(&line("--reciever 3")),
            Err("unknown option \"--reciever\"".into())
        );
        assert_eq!(
            check_args(&line("--runs")),
            Err("--runs needs a value".into())
        );
        assert!(check_args(&line("--content disks"))
            .unwrap_err()
            .contains("random or disk"));
    }
}
