//! The bootserver as a system service (bootserver/dist): its unit passes `systemd-analyze
//! verify`, the install script lays it out, and the server really works as an unprivileged user
//! holding only the capabilities the unit grants — DHCP, TFTP and HTTP answer a client on a
//! private LAN — while a server without them fails or degrades, saying why. Processes in
//! network namespaces; no QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{lab_dir, lab_file, project_root, Console, DhcpMode, Lab};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const UNIT: &str = "bootserver/dist/diskcast-bootserver.service";
/// `nobody`: any unprivileged user will do; the unit's `diskcast` need not exist here.
const UID: u32 = 65534;

fn unit_text() -> String {
    std::fs::read_to_string(project_root().join(UNIT)).unwrap()
}

/// The values of `key=` in the unit, split on spaces.
fn unit_values(key: &str) -> Vec<String> {
    unit_text()
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .flat_map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
        .collect()
}

/// The capabilities the unit grants, as setpriv names them (`net_bind_service`).
fn unit_capabilities() -> Vec<String> {
    let ambient = unit_values("AmbientCapabilities");
    assert_eq!(
        ambient,
        unit_values("CapabilityBoundingSet"),
        "the unit's ambient and bounding sets differ"
    );
    assert!(!ambient.is_empty(), "the unit grants no capabilities");
    ambient
        .iter()
        .map(|c| c.strip_prefix("CAP_").unwrap().to_ascii_lowercase())
        .collect()
}

fn tool(name: &str, package: &str) -> PathBuf {
    diskcast_qemu_tests::fixtures::tool(name, package)
}

/// A copy of the unit whose ExecStart points at `binary` (verify checks that it exists).
fn unit_for(binary: &Path, dir: &Path) -> PathBuf {
    let path = dir.join("diskcast-bootserver.service");
    std::fs::write(
        &path,
        unit_text().replace("/usr/local/bin/bootserver", &binary.display().to_string()),
    )
    .unwrap();
    path
}

fn scratch(name: &str) -> PathBuf {
    let dir = project_root().join(format!("target/lab-runs/{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn service_unit_verifies() {
    let dir = scratch("service_unit_verifies");
    let unit = unit_for(&lab_file("bootserver"), &dir);
    let analyze = tool("systemd-analyze", "systemd");
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify exits 0 even for unknown keys and bad values: it must say nothing at all.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
    // A unit with a mistake is caught the same way, so the check above means something.
    let broken = dir.join("broken.service");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&unit)
            .unwrap()
            .replace("ProtectSystem=strict", "ProtectSystem=stric"),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stric"),
        "a broken unit passed verify"
    );
    let security = Command::new(&analyze)
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let verdict = report.lines().last().unwrap_or("");
    eprintln!("systemd-analyze security: {verdict}");
    assert!(verdict.contains("OK"), "exposure worse than OK:\n{report}");
    for setting in [
        "User=diskcast",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/diskcast",
        "PrivateTmp=yes",
        "ExecStart=/usr/local/bin/bootserver serve --config /etc/diskcast/bootserver.toml",
    ] {
        assert!(
            unit_text().lines().any(|l| l == setting),
            "{setting} missing"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn install_script_lays_out_the_service() {
    let root = scratch("install_script_lays_out_the_service");
    let out = Command::new(project_root().join("scripts/install-bootserver"))
        .args(["--no-build", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install-bootserver:\n{said}");
    assert!(
        said.contains("systemd-analyze verify: the unit is clean"),
        "{said}"
    );
    assert!(said.contains("bootserver.toml: ok"), "{said}");
    for (path, same_as) in [
        ("usr/local/bin/bootserver", lab_file("bootserver")),
        (
            "usr/local/lib/diskcast/initramfs.img",
            lab_dir().join("initramfs.img"),
        ),
        (
            "usr/local/lib/diskcast/localboot.efi",
            lab_dir().join("localboot.efi"),
        ),
        (
            "etc/systemd/system/diskcast-bootserver.service",
            project_root().join(UNIT),
        ),
        (
            "etc/diskcast/bootserver.toml",
            project_root().join("bootserver/dist/bootserver.toml"),
        ),
        (
            "etc/sysctl.d/60-diskcast-bootserver.conf",
            project_root().join("bootserver/dist/60-diskcast-bootserver.conf"),
        ),
    ] {
        let installed = std::fs::read(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            installed == std::fs::read(&same_as).unwrap(),
            "{path} differs from its source"
        );
    }
    assert!(root.join("var/lib/diskcast").is_dir());
    // The config the admin edited is never overwritten.
    std::fs::write(root.join("etc/diskcast/bootserver.toml"), "# mine\n").unwrap();
    let again = Command::new(project_root().join("scripts/install-bootserver"))
        .args(["--no-build", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("keeping"));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/diskcast/bootserver.toml")).unwrap(),
        "# mine\n"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// Starts the lab's bootserver as [`UID`] holding exactly `caps` (ambient, inheritable and
/// bounding, no new privileges), as systemd does for the unit. Returns its console and where
/// its PID is written.
fn start_unprivileged(lab: &mut Lab, caps: &[String]) -> (Console, PathBuf) {
    let config = lab.bootserver_config(DhcpMode::Full, "");
    let state = lab.dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(UID), Some(UID)).unwrap();
    let pid_file = state.join("pid");
    let set: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = lab.command_in_lab("setpriv");
    cmd.args([
        &format!("--reuid={UID}"),
        &format!("--regid={UID}"),
        "--clear-groups",
        &format!("--inh-caps={set}"),
        &format!("--ambient-caps={set}"),
        &format!("--bounding-set={set}"),
        "--no-new-privs",
        "--",
        "sh",
        "-c",
        "echo $$ > \"$1\"; exec \"$2\" serve --config \"$3\"",
        "sh",
    ])
    .arg(&pid_file)
    .arg(lab_file("bootserver"))
    .arg(&config)
    .env("RUST_LOG", "info");
    let console = lab.start_helper("bootserver-unprivileged", cmd);
    (console, pid_file)
}

/// The capability bits of `names` (from linux/capability.h).
fn cap_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| match n.as_str() {
            "net_bind_service" => 1u64 << 10,
            "net_broadcast" => 1 << 11,
            "net_admin" => 1 << 12,
            "net_raw" => 1 << 13,
            other => panic!("add the bit of capability {other}"),
        })
        .fold(0, |a, b| a | b)
}

#[test]
fn bootserver_runs_unprivileged_with_only_the_units_capabilities() {
    let caps = unit_capabilities();
    let busybox = tool("busybox", "busybox");
    let curl = tool("curl", "curl");

    // Without any capability: refused at the first privileged port, saying what it needs.
    {
        let mut lab = Lab::new("service-nocaps");
        let (console, _) = start_unprivileged(&mut lab, &[]);
        let said = console
            .wait_for("error:", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no error without capabilities: {e}\n{}", console.text()));
        assert!(
            said.contains("port 67") && said.contains("CAP_NET_BIND_SERVICE"),
            "{said}"
        );
    }
    // Without CAP_NET_RAW: it serves, and says it cannot answer IPv6 router solicitations.
    if caps.iter().any(|c| c == "net_raw") {
        let mut lab = Lab::new("service-noraw");
        let (console, _) = start_unprivileged(&mut lab, &["net_bind_service".to_string()]);
        console
            .wait_for("bootserver ready", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", console.text()));
        // The log (stderr) is read by another thread than "ready" (stdout): wait for it.
        console
            .wait_for(
                "its raw ICMPv6 socket needs root or CAP_NET_RAW",
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("{e}\n{}", console.text()));
    }

    // With exactly the unit's capabilities: everything answers.
    let mut lab = Lab::new("service-caps");
    let (console, pid_file) = start_unprivileged(&mut lab, &caps);
    console
        .wait_for("bootserver ready", Duration::from_secs(30))
        .unwrap_or_else(|e| {
            panic!(
                "the bootserver did not start with {caps:?}: {e}\n{}",
                console.text()
            )
        });
    let text = console.text();
    assert!(!text.contains("not answering IPv6"), "{text}");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in\n{status}"))
            .to_string()
    };
    assert!(
        status.lines().any(|l| l.starts_with("Name:\tbootserver")),
        "{status}"
    );
    assert_eq!(field("Uid"), format!("{UID}\t{UID}\t{UID}\t{UID}"));
    assert_eq!(field("Gid"), format!("{UID}\t{UID}\t{UID}\t{UID}"));
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(
            u64::from_str_radix(&field(set), 16).unwrap(),
            cap_mask(&caps),
            "{set} of the running server"
        );
    }
    assert_eq!(field("NoNewPrivs"), "1");

    let client = lab.add_host("client", "10.77.0.50/24");
    // DHCP, as a BIOS PXE client asks (vendor class and architecture 0): an address and the
    // iPXE loader, leased only once the registry (written by the unprivileged user) has it.
    let script = lab.dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"udhcpc-event $1 ip=$ip siaddr=$siaddr boot_file=$boot_file bootfile=$bootfile\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dhcp = Lab::in_host(&client, &busybox)
        .args([
            "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "2", "-i", "eth0", "-s",
        ])
        .arg(&script)
        .args(["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&dhcp.stdout);
    let bound = said
        .lines()
        .find(|l| l.starts_with("udhcpc-event bound"))
        .unwrap_or_else(|| {
            panic!(
                "no DHCP lease from the unprivileged server:\n{said}{}\n{}",
                String::from_utf8_lossy(&dhcp.stderr),
                console.text()
            )
        });
    assert!(bound.contains("ip=10.77.0.1"), "{bound}");
    assert!(bound.contains("undionly.kpxe"), "{bound}");
    let leased = bound
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))
        .unwrap()
        .to_string();

    // TFTP: the loader, byte for byte.
    let loader = lab.dir.join("undionly.kpxe");
    let tftp = Lab::in_host(&client, &curl)
        .args(["-sS", "--fail", "tftp://10.77.0.1/undionly.kpxe", "-o"])
        .arg(&loader)
        .output()
        .unwrap();
    assert!(
        tftp.status.success(),
        "{}",
        String::from_utf8_lossy(&tftp.stderr)
    );
    assert!(
        std::fs::read(&loader).unwrap() == std::fs::read("/usr/lib/ipxe/undionly.kpxe").unwrap(),
        "the TFTP download differs"
    );

    // HTTP: the status lists the lease; a machine's iPXE script is served.
    let get = |path: &str| {
        let out = Lab::in_host(&client, &curl)
            .args(["-sS", "--fail"])
            .arg(format!("http://10.77.0.1:8080{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status = get("/status");
    assert!(status.contains(&leased), "{status}");
    let script = get("/boot/52:54:00:dc:00:77.ipxe");
    assert!(script.starts_with("#!ipxe"), "{script}");
    // What the server wrote belongs to the unprivileged user.
    let registry = std::fs::metadata(lab.dir.join("state/registry.sqlite")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&registry), UID);
}
