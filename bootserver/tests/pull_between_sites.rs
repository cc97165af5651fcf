//! `bootserver images pull` between two sites: two bootservers in two network namespaces joined
//! by a veth pair (a private /24), each with its own state directory, key and store; the pulling
//! site runs the command in its namespace. Real processes, real HTTP; needs root (namespaces,
//! tc), as CI runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bootserver");
const SOURCE_IP: &str = "10.78.0.1";
const SINK_IP: &str = "10.78.0.2";
const CHUNK: usize = 1 << 20;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A disk: random (incompressible) chunks with a zero chunk now and then.
fn raw_disk(chunks: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut raw = vec![0u8; chunks * CHUNK + 4321];
    for (i, block) in raw.chunks_mut(CHUNK).enumerate() {
        if i % 7 != 3 {
            block.iter_mut().for_each(|b| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                *b = (state >> 33) as u8
            });
        }
    }
    raw
}

/// Two sites: `a` (the source, serving) and `b` (the puller, serving too).
struct Sites {
    tag: String,
    dir: PathBuf,
    servers: Vec<(String, Child)>,
}

impl Sites {
    fn new(tag: &str) -> Self {
        let pid = std::process::id();
        let tag = format!("dcp{tag}{pid}");
        let dir = std::env::temp_dir().join(format!("diskcast-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sites = Self {
            tag,
            dir,
            servers: Vec::new(),
        };
        for site in ["a", "b"] {
            let ns = sites.ns(site);
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            run(Command::new("ip").args(["netns", "add", &ns]));
        }
        let (a, b) = (sites.ns("a"), sites.ns("b"));
        for args in [
            vec![
                "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
                &b,
            ],
            vec!["-n", &a, "addr", "add", "10.78.0.1/24", "dev", "eth0"],
            vec!["-n", &b, "addr", "add", "10.78.0.2/24", "dev", "eth0"],
        ] {
            run(Command::new("ip").args(args));
        }
        for ns in [&a, &b] {
            for dev in ["lo", "eth0"] {
                run(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
            }
        }
        // The boot files are never asked for here; the config wants them to exist.
        for file in ["vmlinuz", "initramfs.img", "localboot.efi"] {
            std::fs::write(sites.dir.join(file), b"").unwrap();
        }
        for (site, ip) in [("a", SOURCE_IP), ("b", SINK_IP)] {
            let text = format!(
                "interface = \"eth0\"\naddress = \"{ip}\"\nhttp_port = 8080\nstate_dir = \"{state}\"\n\
                 [dhcp]\nmode = \"proxy\"\n\
                 [boot]\nkernel = \"{d}/vmlinuz\"\ninitramfs = \"{d}/initramfs.img\"\n\
                 tftp_root = \"/usr/lib/ipxe\"\nlocal_boot_efi = \"{d}/localboot.efi\"\n",
                state = sites.dir.join(site).display(),
                d = sites.dir.display(),
            );
            std::fs::write(sites.config(site), text).unwrap();
        }
        sites
    }

    fn ns(&self, site: &str) -> String {
        format!("{}{site}", self.tag)
    }

    fn config(&self, site: &str) -> PathBuf {
        self.dir.join(format!("{site}.toml"))
    }

    fn log(&self, site: &str) -> PathBuf {
        self.dir.join(format!("{site}.log"))
    }

    fn store(&self, site: &str) -> PathBuf {
        self.dir.join(site).join("images")
    }

    /// `bootserver ARGS` in `site`'s namespace (not waited for).
    fn command(&self, site: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(site), BIN]).args(args);
        cmd
    }

    /// `bootserver images --config SITE.toml ARGS` in `site`'s namespace.
    fn images(&self, site: &str, args: &[&str]) -> Output {
        let config = self.config(site);
        let mut all = vec!["images", "--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        self.command(site, &all).output().unwrap()
    }

    fn images_ok(&self, site: &str, args: &[&str]) -> String {
        let out = self.images(site, args);
        assert!(
            out.status.success(),
            "images {args:?} at {site} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Kills `site`'s server (SIGKILL, as a crash or a power cut would).
    fn kill_server(&mut self, site: &str) {
        for (_, child) in self.servers.iter_mut().filter(|(s, _)| s == site) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.servers.retain(|(s, _)| s != site);
    }

    /// Slows `site`'s outgoing link (a token bucket), so a pull is surely mid-way when it is cut.
    fn throttle(&self, site: &str, on: bool) {
        let ns = self.ns(site);
        let mut args = vec!["netns", "exec", &ns, "tc", "qdisc"];
        if on {
            args.extend([
                "replace", "dev", "eth0", "root", "tbf", "rate", "24mbit", "burst", "64kb",
                "latency", "400ms",
            ]);
        } else {
            args.extend(["del", "dev", "eth0", "root"]);
        }
        run(Command::new("ip").args(args));
    }

    fn serve(&mut self, site: &str) {
        let log = std::fs::File::create(self.log(site)).unwrap();
        let config = self.config(site);
        let child = self
            .command(site, &["serve", "--config", config.to_str().unwrap()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.servers.push((site.into(), child));
        self.wait_for_log(
            site,
            |log| log.contains("bootserver ready"),
            "the server's start",
        );
    }

    /// Waits (bounded, generously: this is not a speed check) for `site`'s log to satisfy `done`.
    fn wait_for_log(&self, site: &str, done: impl Fn(&str) -> bool, what: &str) {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(self.log(site)).unwrap_or_default();
            if done(&text) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "waited 120 s for {what} at {site}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Chunk requests `site` answered, by status.
    fn chunk_requests(&self, site: &str, status: &str) -> usize {
        std::fs::read_to_string(self.log(site))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("GET /images/") && l.contains("/chunks/"))
            .filter(|l| l.ends_with(&format!(" {status}")))
            .count()
    }

    /// Imports `raw` as `name` at site `a`; returns a's public key.
    fn import_at_source(&self, name: &str, raw: &[u8]) -> String {
        let path = self.dir.join(format!("{name}.raw"));
        std::fs::write(&path, raw).unwrap();
        self.images_ok(
            "a",
            &["import", "--all-blocks", path.to_str().unwrap(), name],
        );
        std::fs::remove_file(&path).unwrap();
        let config = self.config("a");
        run(&mut self.command("a", &["key", "show", "--config", config.to_str().unwrap()]))
            .trim()
            .to_string()
    }

    fn url(name: &str) -> String {
        format!("http://{SOURCE_IP}:8080/images/{name}")
    }

    fn exported(&self, site: &str, name: &str) -> Vec<u8> {
        let path = self.dir.join(format!("{site}-{name}.export"));
        self.images_ok(site, &["export", name, path.to_str().unwrap()]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        bytes
    }

    /// `images list`'s table (stdout; notes such as staged pulls go to stderr).
    fn listed(&self, site: &str) -> String {
        let out = self.images(site, &["list"]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for (_, child) in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for site in ["a", "b"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(site)])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn images_pull_between_sites() {
    let mut sites = Sites::new("ok");
    sites.serve("a");
    sites.serve("b");
    let raw = raw_disk(12, 1);
    let key = sites.import_at_source("golden", &raw);
    let said = sites.images_ok("b", &["pull", &Sites::url("golden"), "--trust", &key]);
    assert!(said.contains("re-signed with this store's key"), "{said}");
    // Verified and trusted at b (signed by b's own key), the same disk bytes, listed by b's server.
    sites.images_ok("b", &["verify", "golden"]);
    assert!(sites.exported("b", "golden") == raw);
    assert!(sites.exported("a", "golden") == raw);
    let listed = run(Command::new("ip").args([
        "netns",
        "exec",
        &sites.ns("b"),
        "curl",
        "-sS",
        "--fail-with-body",
        &format!("http://{SINK_IP}:8080/api/v1/images"),
    ]));
    assert!(listed.contains("\"golden\""), "{listed}");
    let stored = std::fs::read_dir(sites.store("b")).unwrap().count();
    assert_eq!(stored, 1, "something besides the image stayed in b's store");
    // A name that is not on the source; a source that is not there.
    let out = sites.images("b", &["pull", &Sites::url("nothing"), "--trust", &key]);
    assert!(
        !out.status.success() && text(&out).contains("no such image"),
        "{}",
        text(&out)
    );
    let out = sites.images(
        "b",
        &[
            "pull",
            "http://10.78.0.9:8080/images/golden",
            "--name",
            "x",
            "--trust",
            &key,
        ],
    );
    assert!(
        !out.status.success() && text(&out).contains("cannot reach"),
        "{}",
        text(&out)
    );
}

#[test]
fn images_pull_resumes_after_the_puller_is_killed() {
    let mut sites = Sites::new("resume");
    sites.serve("a");
    let chunks = 40;
    let raw = raw_disk(chunks, 2);
    let key = sites.import_at_source("golden", &raw);
    // Slow the source's link so the puller is surely mid-way when it is killed.
    sites.throttle("a", true);
    let config = sites.config("b");
    let mut puller: Child = sites
        .command(
            "b",
            &[
                "images",
                "--config",
                config.to_str().unwrap(),
                "pull",
                &Sites::url("golden"),
                "--trust",
                &key,
            ],
        )
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once a few chunks were served (and so, mostly, staged).
    sites.wait_for_log(
        "a",
        |_| sites.chunk_requests("a", "200") >= 8,
        "8 chunks served",
    );
    puller.kill().unwrap();
    puller.wait().unwrap();
    let stderr = BufReader::new(puller.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(stderr.contains("fetching"), "{stderr}");
    let first = sites.chunk_requests("a", "200");
    assert!(
        first < chunks,
        "the pull ended before it was killed: slow the link more"
    );
    assert!(
        !sites.listed("b").contains("golden"),
        "a half image is listed"
    );
    let note = text(&sites.images("b", &["list"]));
    assert!(note.contains("a pull of golden is staged"), "{note}");

    sites.throttle("a", false);
    let said = sites.images_ok("b", &["pull", &Sites::url("golden"), "--trust", &key]);
    let second = sites.chunk_requests("a", "200") - first;
    // `pulled golden: X chunks fetched (...), K already staged, of N; ...`
    let data_chunks: usize = said
        .split(", of ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no chunk count in:\n{said}"));
    eprintln!("first run: {first} chunks served before the kill; second run fetched {second} of {data_chunks}\n{said}");
    let resumed = said
        .lines()
        .find(|l| l.starts_with("resuming: "))
        .unwrap_or_else(|| panic!("the second run did not resume:\n{said}"));
    let staged: usize = resumed
        .trim_start_matches("resuming: ")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(staged >= 1, "{resumed}");
    assert!(
        second < data_chunks,
        "{second} chunks fetched again of {data_chunks}"
    );
    assert_eq!(staged + second, data_chunks, "{said}");
    sites.images_ok("b", &["verify", "golden"]);
    assert!(sites.exported("b", "golden") == raw);
}

#[test]
fn images_pull_of_a_tampered_chunk_fails_and_lists_nothing() {
    let mut sites = Sites::new("tamper");
    sites.serve("a");
    let raw = raw_disk(6, 3);
    let key = sites.import_at_source("golden", &raw);
    // One byte of the first stored chunk changed on the source's disk.
    let path = sites.store("a").join("golden.dcimg");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let out = sites.images("b", &["pull", &Sites::url("golden"), "--trust", &key]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("chunk 0 does not match the signed manifest"),
        "{said}"
    );
    assert!(!sites.listed("b").contains("golden"), "{said}");
    assert!(!Path::new(&sites.store("b").join("golden.dcimg")).exists());
}

#[test]
fn images_pull_with_the_wrong_key_is_refused_before_any_chunk() {
    let mut sites = Sites::new("key");
    sites.serve("a");
    let key = sites.import_at_source("golden", &raw_disk(4, 4));
    let other = "11".repeat(32);
    let out = sites.images("b", &["pull", &Sites::url("golden"), "--trust", &other]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("signed by {key}")) && said.contains(&other),
        "{said}"
    );
    // b's own key alone (the default: what b trusts) is not a's either.
    let out = sites.images("b", &["pull", &Sites::url("golden")]);
    assert!(
        !out.status.success() && text(&out).contains(&key),
        "{}",
        text(&out)
    );
    sites.wait_for_log(
        "a",
        |log| log.contains("/manifest 200"),
        "the manifest requests",
    );
    assert_eq!(sites.chunk_requests("a", "200"), 0, "chunks were fetched");
    assert!(!sites.listed("b").contains("golden"));
}

#[test]
fn images_pull_resumes_after_the_source_dies() {
    let mut sites = Sites::new("srcdie");
    sites.serve("a");
    let raw = raw_disk(30, 5);
    let key = sites.import_at_source("golden", &raw);
    sites.throttle("a", true);
    let config = sites.config("b");
    let puller = sites
        .command(
            "b",
            &[
                "images",
                "--config",
                config.to_str().unwrap(),
                "pull",
                &Sites::url("golden"),
                "--trust",
                &key,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sites.wait_for_log(
        "a",
        |_| sites.chunk_requests("a", "200") >= 6,
        "6 chunks served",
    );
    // The source crashes mid-pull: the puller fails, saying what to do, and lists nothing.
    sites.kill_server("a");
    let out = puller.wait_with_output().unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("run the same command again") || said.contains("continues a pull"),
        "{said}"
    );
    assert!(!sites.listed("b").contains("golden"), "{said}");
    sites.throttle("a", false);
    sites.serve("a");
    let said = sites.images_ok("b", &["pull", &Sites::url("golden"), "--trust", &key]);
    assert!(said.contains("resuming: "), "{said}");
    sites.images_ok("b", &["verify", "golden"]);
    assert!(sites.exported("b", "golden") == raw);
}
