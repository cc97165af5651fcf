//! The registry survives `kill -9` at any moment: a child process (this test binary re-run on
//! `crash_child`) writes in a loop and prints each write after it returned; it is killed at random
//! moments, and every printed write must be in a database that passes `integrity_check`.

use crate::common::{mac, pxe, TempDir};
use diskcast_registry::{
    EventKind, Lease, NewTask, Progress, Registry, Report, Step, TaskKind, TaskState,
};
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DB_ENV: &str = "DISKCAST_REGISTRY_CRASH_DB";
const BASE_ENV: &str = "DISKCAST_REGISTRY_CRASH_BASE";
const ROUNDS: u32 = 25;

fn address(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 | n)
}

/// The child: does nothing unless run by `survives_kill_9_at_random_moments`.
#[test]
fn crash_child() {
    let (Ok(db), Ok(base)) = (std::env::var(DB_ENV), std::env::var(BASE_ENV)) else {
        return;
    };
    let base: u32 = base.parse().unwrap();
    let reg = Registry::open(&db).unwrap();
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| {
        writeln!(out, "C {line}").unwrap();
        out.flush().unwrap();
    };
    for n in base.. {
        let m = mac(n);
        let now = u64::from(n);
        reg.observe(m, pxe(None), now).unwrap();
        say(format!("machine {n}"));
        let new = NewTask {
            mac: m,
            kind: TaskKind::Deploy {
                image: format!("image-{n}"),
            },
            options: "{}".into(),
            timeout_secs: 600,
        };
        let (task, token) = reg.create_task(new, now).unwrap();
        say(format!("task {n} {} {}", task.id, token.as_str()));
        for step in [Step::Booted, Step::Joined] {
            reg.report(task.id, Report { at: now, step }).unwrap();
        }
        say(format!("joined {}", task.id));
        for percent in [25.0, 50.0, 75.0] {
            let p = Progress {
                percent,
                mb_per_s: 100.0,
                repairs: 0,
            };
            reg.report(
                task.id,
                Report {
                    at: now,
                    step: Step::Progress(p),
                },
            )
            .unwrap();
            say(format!("progress {} {percent}", task.id));
        }
        reg.report(
            task.id,
            Report {
                at: now,
                step: Step::Verified,
            },
        )
        .unwrap();
        say(format!("verified {}", task.id));
        let lease = Lease {
            mac: m,
            address: address(n),
            expires: now + 3600,
        };
        reg.put_lease(lease, now).unwrap();
        say(format!("lease {n}"));
    }
}

/// Checks one line the child printed against the database.
fn check(reg: &Registry, line: &str) {
    let words: Vec<&str> = line.split(' ').collect();
    let task = |word: &str| reg.task(word.parse().unwrap()).unwrap().unwrap();
    match words[..] {
        ["machine", n] => assert!(reg.machine(mac(n.parse().unwrap())).unwrap().is_some()),
        ["task", n, id, token] => {
            let t = task(id);
            assert_eq!(t.mac, mac(n.parse().unwrap()));
            assert_eq!(reg.task_by_token(token).unwrap().unwrap().id, t.id);
        }
        ["joined", id] => assert!(matches!(
            task(id).state,
            TaskState::Running | TaskState::Verified
        )),
        ["progress", id, percent] => {
            let events = reg.events(id.parse().unwrap()).unwrap();
            let latest = events
                .iter()
                .rev()
                .find(|e| e.kind == EventKind::Progress)
                .unwrap();
            assert!(latest.progress.unwrap().percent >= percent.parse().unwrap());
        }
        ["verified", id] => assert_eq!(task(id).state, TaskState::Verified),
        ["lease", n] => {
            let n: u32 = n.parse().unwrap();
            assert_eq!(reg.lease_for(mac(n)).unwrap().unwrap().address, address(n));
        }
        _ => panic!("unexpected line {line:?}"),
    }
}

#[test]
fn survives_kill_9_at_random_moments() {
    let started = Instant::now();
    let dir = TempDir::new("crash");
    let db = dir.path().join("registry.sqlite");
    let mut seed = u64::from(std::process::id()) | 1;
    seed ^= std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let seed0 = seed;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut committed, mut rounds_with_writes) = (0, 0);
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "crash::crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DB_ENV, &db)
            .env(BASE_ENV, (round * 100_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            // Only complete lines: a line cut by the kill was not reported.
            let mut lines = Vec::new();
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if let Some(done) = line.strip_suffix('\n') {
                    if let Some(reported) = done.strip_prefix("C ") {
                        lines.push(reported.to_owned());
                    }
                }
                line.clear();
            }
            lines
        });
        std::thread::sleep(Duration::from_millis(10 + random() % 90));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();

        let context = format!("round {round}, seed {seed0:#x}");
        if !db.exists() {
            assert!(lines.is_empty(), "{context}");
            continue;
        }
        let conn = rusqlite::Connection::open(&db).unwrap();
        let integrity: Vec<String> = conn
            .prepare("PRAGMA integrity_check")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(integrity, ["ok"], "{context}");
        drop(conn);
        let reg = Registry::open(&db).unwrap_or_else(|e| panic!("{context}: {e:?}"));
        for line in &lines {
            check(&reg, line);
        }
        committed += lines.len();
        rounds_with_writes += usize::from(!lines.is_empty());
    }
    eprintln!(
        "crash test: {ROUNDS} kills, {committed} reported writes all found, {:?}",
        started.elapsed()
    );
    assert!(
        rounds_with_writes >= ROUNDS as usize / 2,
        "{rounds_with_writes} rounds wrote"
    );
}
