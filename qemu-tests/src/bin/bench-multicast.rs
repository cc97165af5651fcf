//! Multicast imaging benchmark: diskcast, udpcast and uftp side by side on the same emulated LAN
//! (private namespaces, the sender's link limited to 1 Gbit/s with tbf, random loss at every
//! receiver with nftables), interleaved run by run. Prints MB/s, bytes on the wire relative to
//! the image, verified copies, and diskcast's ratio to the faster peer.
//!
//! `--with-deploy` adds client/server mode: the same image imported once into an image store
//! (zstd), then multicast from the store by `bootserver deploy`. `--content disk` makes the
//! image disk-like (a third zeros, a third text, a third random) instead of all random.
//!
//! `scripts/bench-multicast [--size-mib 512] [--runs 1] [--receivers 1,3,8] [--loss 0,1,5]
//!  [--only-diskcast] [--with-deploy] [--content random|disk]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{project_root, Lab};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Diskcast,
    Udpcast,
    Uftp,
    /// `bootserver deploy` from an image store.
    Deploy,
}

impl Tool {
    fn label(self) -> &'static str {
        match self {
            Tool::Diskcast => "diskcast p2p",
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
    seconds: f64,
    wire_bytes: u64,
    verified: usize,
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

fn wait_all(children: &mut [Child], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if children
            .iter_mut()
            .all(|c| c.try_wait().ok().flatten().is_some())
        {
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
    let out = Command::new(project_root().join("target/release/agent"))
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

fn run_tool(
    tool: Tool,
    lab: &Lab,
    sender: &str,
    receivers: &[String],
    source: &Path,
    dir: &Path,
) -> RunResult {
    let agent = project_root().join("target/release/agent");
    let agent = agent.to_str().unwrap();
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
                Tool::Diskcast | Tool::Deploy => spawn(
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
                    &["--file", t, "--interface", "eth0", "--nokbd"],
                    &log(&format!("rx{i}")),
                ),
                Tool::Uftp => spawn(
                    ns,
                    "uftpd",
                    &["-d", "-I", "eth0", "-D", dest],
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
        Tool::Diskcast => spawn(
            sender,
            agent,
            &[
                "send",
                "-i",
                "eth0",
                "--min-receivers",
                &min,
                "--start-timeout",
                "60",
                "--key",
                key,
                src,
            ],
            &log("sender"),
        ),
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
        // uftp sends the name it is given: a relative one, from the source's directory.
        Tool::Uftp => spawn_in(
            source.parent().unwrap(),
            sender,
            "uftp",
            &["-I", "eth0", "-R", "-1", "source.img"],
            &log("sender"),
        ),
    };
    let seconds;
    match tool {
        Tool::Uftp => {
            // uftpd never exits: the transfer ends when the sender does.
            wait_all(std::slice::from_mut(&mut snd), Duration::from_secs(150));
            seconds = started.elapsed().as_secs_f64();
            std::thread::sleep(Duration::from_millis(300));
            for c in &mut rx {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        _ => {
            rx.push(snd);
            wait_all(&mut rx, Duration::from_secs(150));
            seconds = started.elapsed().as_secs_f64();
        }
    }
    let wire_bytes = tx_bytes(sender) - before;
    let verified = targets.iter().filter(|t| same_file(t, source)).count();
    for t in &targets {
        let _ = std::fs::remove_dir_all(t.parent().unwrap());
    }
    RunResult {
        seconds,
        wire_bytes,
        verified,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size_mib: Vec<u64> = arg_list(&args, "--size-mib", "512");
    let runs: Vec<usize> = arg_list(&args, "--runs", "1");
    let receiver_counts: Vec<usize> = arg_list(&args, "--receivers", "1,3,8");
    let losses: Vec<f64> = arg_list(&args, "--loss", "0,1,5");
    let mut tools: Vec<Tool> = if args.iter().any(|a| a == "--only-diskcast") {
        vec![Tool::Diskcast]
    } else {
        vec![Tool::Diskcast, Tool::Udpcast, Tool::Uftp]
    };
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

    let mut rows = Vec::new();
    for &n in &receiver_counts {
        for &loss in &losses {
            let mut lab = Lab::new(&format!("bench-{n}-{loss}"));
            let sender = lab.add_host("snd", "10.77.0.10/24");
            Lab::limit_egress(&sender, "eth0", 1000);
            let receivers: Vec<String> = (0..n)
                .map(|i| lab.add_host(&format!("r{i}"), &format!("10.77.0.{}/24", 20 + i)))
                .collect();
            if loss > 0.0 {
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
            let mut results: Vec<(Tool, Vec<RunResult>)> =
                tools.iter().map(|&t| (t, Vec::new())).collect();
            for run in 0..runs[0] {
                for (tool, list) in &mut results {
                    let r = run_tool(*tool, &lab, &sender, &receivers, &source, &work);
                    eprintln!(
                        "N={n} loss={loss}% run {run}: {tool:?}: {:.1} s, {:.1} MB/s, wire {:.2}x, verified {}/{n}",
                        r.seconds,
                        size as f64 / r.seconds / 1e6,
                        r.wire_bytes as f64 / size as f64,
                        r.verified
                    );
                    list.push(r);
                }
            }
            let summarize = |list: &Vec<RunResult>| {
                let mbs = median(list.iter().map(|r| size as f64 / r.seconds / 1e6).collect());
                let wire = median(
                    list.iter()
                        .map(|r| r.wire_bytes as f64 / size as f64)
                        .collect(),
                );
                let ok: usize = list.iter().filter(|r| r.verified == n).count();
                (mbs, wire, ok, list.len())
            };
            let s: Vec<_> = results.iter().map(|(t, l)| (*t, summarize(l))).collect();
            rows.push((n, loss, s));
            drop(lab);
        }
    }
    println!(
        "\nimage {} MiB of {} data; sender link 1 Gbit/s (tbf); median of {} run(s); MB/s = image / wall time",
        size_mib[0],
        if disk_like { "disk-like (1/3 zero, 1/3 text, 1/3 random)" } else { "random" },
        runs[0]
    );
    let header: Vec<String> = tools
        .iter()
        .map(|t| format!("{} MB/s (wire, ok)", t.label()))
        .collect();
    println!(
        "| receivers | loss | {} | diskcast p2p / faster peer |",
        header.join(" | ")
    );
    println!("|---|---|{}---|", "---|".repeat(tools.len()));
    for (n, loss, s) in rows {
        let cells: Vec<String> = s
            .iter()
            .map(|(_, (mbs, wire, ok, total))| format!("{mbs:.1} ({wire:.2}x, {ok}/{total})"))
            .collect();
        let ours = s[0].1 .0;
        // Only a peer that verified every copy in every run sets a speed to beat.
        let best_peer = s
            .iter()
            .filter(|(t, (_, _, ok, total))| t.is_peer() && ok == total)
            .map(|(_, (mbs, _, _, _))| *mbs)
            .fold(0.0, f64::max);
        let ratio = if best_peer > 0.0 {
            format!("{:.2}x", ours / best_peer)
        } else {
            "no peer verified".into()
        };
        println!("| {n} | {loss}% | {} | {ratio} |", cells.join(" | "));
    }
}
