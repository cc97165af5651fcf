//! Several sites, one registry: two bootservers, each serving its own subnet from its own
//! network namespace, share one PostgreSQL registry (a real server the test starts: Debian's
//! `postgresql`, `initdb` in a temporary directory, reached by both over its unix socket). A
//! deploy task created at site A is carried out by site B for a machine (a QEMU VM) on B's
//! subnet, with the image B pulled from A's store (`images pull`); A sees the whole history.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{
    lab_file, make_source_disk, DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT,
};
use diskcast_registry::testing::TempPostgres;
use std::process::Command;
use std::time::Duration;

const FAR: &str = "52:54:00:dc:00:52";

/// Runs `bootserver ARGS` with `--config CONFIG` after its first word; its stdout.
fn bootserver(config: &std::path::Path, args: &[&str]) -> String {
    let (command, rest) = args.split_first().unwrap();
    let out = Command::new(lab_file("bootserver"))
        .arg(command)
        .arg("--config")
        .arg(config)
        .args(rest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bootserver {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ip ARGS` in namespace `netns` (site B's, which the lab does not manage).
fn ip_in(netns: &str, args: &str) {
    let status = Command::new("ip")
        .args(["netns", "exec", netns, "ip"])
        .args(args.split_whitespace())
        .status()
        .unwrap();
    assert!(status.success(), "ip {args} in {netns}");
}

#[test]
fn two_sites_one_registry() {
    let postgres = TempPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    postgres.create_db("registry").unwrap();
    let database = postgres.url("registry");

    let mut lab = Lab::new("two_sites");
    // Site B: its own namespace with one interface on its own switch (br1), where the machine is.
    lab.add_subnet("br1");
    let site_b = format!("{}-siteb", lab.netns);
    let _ = Command::new("ip").args(["netns", "del", &site_b]).output();
    assert!(Command::new("ip")
        .args(["netns", "add", &site_b])
        .status()
        .unwrap()
        .success());
    lab.ip(&format!(
        "link add v-siteb type veth peer name b0 netns {site_b}"
    ));
    lab.ip("link set v-siteb master br1 up");
    for args in [
        "link set lo up",
        "addr add 10.78.0.1/24 brd + dev b0",
        "link set b0 up",
    ] {
        ip_in(&site_b, args);
    }

    // Site A: the lab's own server on br0, with the shared registry.
    let config_a = lab.bootserver_config(DhcpMode::Full, "");
    let text = std::fs::read_to_string(&config_a).unwrap();
    let shared = format!("database = \"{database}\"\n");
    std::fs::write(&config_a, format!("{shared}site = \"A\"\n{text}")).unwrap();
    let text_b = text
        .replace("interface = \"br0\"", "interface = \"b0\"")
        .replace("address = \"10.77.0.1\"", "address = \"10.78.0.1\"")
        .replace("10.77.0.100", "10.78.0.100")
        .replace("10.77.0.149", "10.78.0.149")
        .replace(
            &lab.dir.join("state").display().to_string(),
            &lab.dir.join("state-b").display().to_string(),
        );
    assert!(
        text_b.contains("state-b") && text_b.contains("b0"),
        "{text_b}"
    );
    let config_b = lab.dir.join("site-b.toml");
    std::fs::write(&config_b, format!("{shared}site = \"B\"\n{text_b}")).unwrap();

    // check-config reaches the registry and says so.
    let checked = bootserver(&config_b, &["check-config"]);
    assert!(
        checked.contains("registry postgres://diskcast@/registry"),
        "{checked}"
    );

    let golden = lab.dir.join("golden.img");
    make_source_disk(&golden, 64);
    let golden_s = golden.display().to_string();
    lab.bootserver_cli(&["images", "import", &golden_s, "golden"]);
    lab.start_bootserver_with(&config_a);

    // The image reaches site B's store from site A over the sites' own link (a /30 between
    // the two servers' namespaces), checked against A's key chunk by chunk.
    lab.ip(&format!(
        "link add v-sitea type veth peer name a0 netns {site_b}"
    ));
    lab.ip("addr add 10.79.0.1/30 dev v-sitea");
    lab.ip("link set v-sitea up");
    for args in [
        "addr add 10.79.0.2/30 dev a0",
        "link set a0 up",
        "route add 10.77.0.0/24 via 10.79.0.1",
    ] {
        ip_in(&site_b, args);
    }
    // `key` takes its config after the subcommand (`key show --config`).
    let key_a = Command::new(lab_file("bootserver"))
        .args(["key", "show", "--config"])
        .arg(&config_a)
        .output()
        .unwrap();
    assert!(key_a.status.success(), "{key_a:?}");
    let key_a = String::from_utf8_lossy(&key_a.stdout).trim().to_string();
    let pulled = Command::new("ip")
        .args(["netns", "exec", &site_b])
        .arg(lab_file("bootserver"))
        .args(["images", "--config"])
        .arg(&config_b)
        .args([
            "pull",
            "http://10.77.0.1:8080/images/golden",
            "--trust",
            &key_a,
        ])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&pulled.stdout),
        String::from_utf8_lossy(&pulled.stderr)
    );
    assert!(pulled.status.success(), "site B's pull failed:\n{said}");
    assert!(said.contains("re-signed with this store's key"), "{said}");

    let b = lab.start_bootserver_in(&site_b, &config_b);

    // Created at site A, for a machine that only site B's subnet reaches.
    lab.task(&["deploy", "golden", "--to", FAR]);
    let listed = bootserver(&config_b, &["tasks"]);
    assert!(listed.contains(FAR), "site B sees A's task:\n{listed}");

    let far = lab.boot_vm_on(
        VmSpec::new("far", Firmware::Bios, "virtio-net-pci", 0x52).disk(
            64,
            "FAR",
            "virtio-blk-pci",
        ),
        "br1",
    );
    let ready = lab.wait_ready(far);
    assert!(
        ready.get("address").starts_with("10.78.0."),
        "the machine got {} instead of an address of site B's pool",
        ready.get("address")
    );
    lab.expect_done_and_off(
        &[far],
        "DISKCAST-SLAVE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    for (vm, same) in lab.first_disks_equal(&["far"], &golden) {
        assert!(same, "{vm}'s disk is not the image");
    }

    // Site A's API shows the task carried out, by site B, with its whole history.
    let tasks: serde_json::Value =
        serde_json::from_str(&lab.api_get("/api/v1/tasks?all=true")).unwrap();
    let task = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["mac"] == FAR)
        .unwrap_or_else(|| panic!("no task for {FAR} at site A: {tasks:#}"))
        .clone();
    assert_eq!(task["state"], "verified", "{task:#}");
    assert_eq!(task["site"], "B", "{task:#}");
    let history = lab.api_get(&format!("/api/v1/tasks/{}", task["id"]));
    for event in ["created", "booted", "verified"] {
        assert!(history.contains(event), "no {event} event at A: {history}");
    }
    // Only site B ran a session; A never started one for a machine it does not serve.
    let log_b = lab.bootserver_log(b);
    assert!(
        log_b.contains("lab: session for image \"golden\""),
        "{log_b}"
    );
    let log_a = lab.bootserver_log(0);
    assert!(!log_a.contains("lab: session for image"), "{log_a}");
    assert!(
        !log_a.contains(FAR) || !log_a.contains("Ack"),
        "A answered the far machine"
    );
    drop(lab);
    drop(postgres);
}
