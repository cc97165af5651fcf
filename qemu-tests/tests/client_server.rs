//! Client/server mode: capture a disk into the bootserver's image store, then deploy the stored
//! image to machines that never saw the reference machine.
//!
//! The process tests run `agent capture`, `bootserver deploy` and `agent receive` as processes in
//! private namespaces; the QEMU test does the whole thing with network-booted VMs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{
    lab_file, make_source_disk, output_of as finish, spawn_agent, DhcpMode, Firmware, Lab, VmSpec,
    BOOT_TIMEOUT,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `bootserver images ...` on the lab's store, with the server's key (`--config`).
fn images(lab: &Lab, args: &[&str]) -> Output {
    let child = Command::new(lab_file("bootserver"))
        .arg("images")
        .arg("--config")
        .arg(lab.dir.join("bootserver.toml"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish(child, &format!("images {args:?}"))
}

/// The lab server's public key (`bootserver key show`).
fn server_key(lab: &Lab) -> String {
    let out = Command::new(lab_file("bootserver"))
        .args(["key", "show", "--config"])
        .arg(lab.dir.join("bootserver.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn store_dir(lab: &Lab) -> PathBuf {
    lab.dir.join("state/images")
}

fn listed_names(lab: &Lab) -> Vec<String> {
    let out = images(lab, &["list"]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

fn capture(lab_host: &str, source: &Path, name: &str, token: &str) -> Child {
    spawn_agent(
        lab_host,
        &[
            "capture",
            "--to",
            "10.77.0.1:8080",
            "--name",
            name,
            "--token",
            token,
        ],
        Some(source),
    )
}

#[test]
fn capture_from_a_host_then_deploy_from_the_store_to_two_receivers() {
    let mut lab = Lab::new("cs_process");
    lab.start_bootserver(DhcpMode::Full, "");
    let reference = lab.add_host("ref", "10.77.0.10/24");
    let receivers: Vec<String> = (1..=2)
        .map(|i| lab.add_host(&format!("rx{i}"), &format!("10.77.0.{}/24", 20 + i)))
        .collect();
    Lab::add_ingress_loss(&receivers[1], 3.0);
    let source = lab.dir.join("reference.img");
    make_source_disk(&source, 64);
    let admin = lab.bootserver_cli(&["token"]).trim().to_string();
    let server_key = server_key(&lab);

    // Without the admin token, nothing is stored.
    let refused = finish(
        capture(&reference, &source, "golden", &"0".repeat(64)),
        "capture",
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    assert!(listed_names(&lab).is_empty());

    // An interrupted capture leaves nothing listed and no partial file.
    let big = lab.dir.join("big.img");
    let status = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=384", "status=none"])
        .arg(format!("of={}", big.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let mut cut = capture(&reference, &big, "golden", &admin);
    lab.bootservers_console(0)
        .wait_for("store: receiving image \"golden\"", Duration::from_secs(30))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    cut.kill().unwrap();
    let _ = cut.wait();
    lab.bootservers_console(0)
        .wait_for("nothing stored", Duration::from_secs(30))
        .unwrap();
    assert!(listed_names(&lab).is_empty(), "a broken capture was listed");
    let leftovers: Vec<_> = std::fs::read_dir(store_dir(&lab)).unwrap().collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");

    // The retry succeeds.
    let out = finish(capture(&reference, &source, "golden", &admin), "capture");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("stored image golden"));
    assert_eq!(listed_names(&lab), ["golden"]);
    assert!(images(&lab, &["verify", "golden"]).status.success());
    // The same name again is refused, clearly.
    let again = finish(
        capture(&reference, &source, "golden", &admin),
        "capture again",
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // Export gives back the disk.
    let exported = lab.dir.join("exported.img");
    assert!(
        images(&lab, &["export", "golden", exported.to_str().unwrap()])
            .status
            .success()
    );
    assert!(std::fs::read(&exported).unwrap() == std::fs::read(&source).unwrap());

    // Deploy from the store: the reference machine is not involved.
    let targets: Vec<PathBuf> = (1..=2)
        .map(|i| lab.dir.join(format!("target{i}.img")))
        .collect();
    let rx: Vec<_> = receivers
        .iter()
        .zip(&targets)
        .map(|(ns, target)| {
            spawn_agent(
                ns,
                &[
                    "receive",
                    "--interface",
                    "eth0",
                    "--wait",
                    "60",
                    "--trust",
                    &server_key,
                ],
                Some(target),
            )
        })
        .collect();
    let deploy = lab
        .command_in_lab(lab_file("bootserver").to_str().unwrap())
        .args([
            "deploy",
            "golden",
            "--interface",
            "br0",
            "--min-receivers",
            "2",
        ])
        .arg("--config")
        .arg(lab.dir.join("bootserver.toml"))
        .args(["--start-timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deploy_out = finish(deploy, "deploy");
    let expected = std::fs::read(&source).unwrap();
    for (i, (child, target)) in rx.into_iter().zip(&targets).enumerate() {
        let out = finish(child, &format!("receiver {}", i + 1));
        assert!(out.status.success(), "receiver {} failed", i + 1);
        assert!(
            std::fs::read(target).unwrap() == expected,
            "receiver {}'s copy differs",
            i + 1
        );
    }
    assert!(deploy_out.status.success());

    // A deploy that dies mid-way (a server restart): the receiver ends failed and says so, and
    // the store is untouched.
    let target = lab.dir.join("interrupted.img");
    let rx = spawn_agent(
        &receivers[0],
        &[
            "receive",
            "--interface",
            "eth0",
            "--wait",
            "60",
            "--sender-timeout",
            "5",
            "--trust",
            &server_key,
        ],
        Some(&target),
    );
    let mut deploy = lab
        .command_in_lab(lab_file("bootserver").to_str().unwrap())
        .args(["deploy", "golden", "--interface", "br0", "--rate", "1"])
        .arg("--config")
        .arg(lab.dir.join("bootserver.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    deploy.kill().unwrap();
    let _ = deploy.wait();
    let out = finish(rx, "receiver of the killed deploy");
    assert!(
        !out.status.success(),
        "a receiver of a dead deploy reported success"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("copy verified"));
    assert!(images(&lab, &["verify", "golden"]).status.success());
}

#[test]
fn client_server_capture_then_deploy() {
    let mut lab = Lab::new("client_server_capture");
    let reference_disk = lab.dir.join("reference.img");
    make_source_disk(&reference_disk, 64);
    // The reference machine has a capture task; the slaves get deploy tasks once it is stored.
    lab.start_bootserver(DhcpMode::Full, "");
    lab.task(&["capture", "52:54:00:dc:00:10", "--image", "golden"]);

    let reference = lab.boot_vm(
        VmSpec::new("reference", Firmware::Bios, "virtio-net-pci", 0x10).disk_from(
            &reference_disk,
            "REF-1",
            "virtio-blk-pci",
        ),
    );
    lab.expect_done_and_off(
        &[reference],
        "DISKCAST-CAPTURE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    assert_eq!(listed_names(&lab), ["golden"]);
    let show = images(&lab, &["show", "golden"]);
    let show = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(show.contains("origin:         capture"), "{show}");
    assert!(show.contains("REF-1"), "{show}");
    assert!(images(&lab, &["verify", "golden"]).status.success());
    let raw_size = std::fs::metadata(&reference_disk).unwrap().len();
    let stored_size = std::fs::metadata(store_dir(&lab).join("golden.dcimg"))
        .unwrap()
        .len();
    eprintln!("stored {stored_size} bytes for a {raw_size}-byte disk");
    assert!(stored_size < raw_size / 2, "the image is not compressed");

    // The reference machine is gone; two bare machines boot and get the stored image.
    let tasks = lab.bootserver_cli(&["tasks", "--all"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.contains("capture as golden") && l.contains("verified")),
        "{tasks}"
    );
    lab.task(&["deploy", "golden", "--to", &Lab::slave_macs(2)]);
    let started = Instant::now();
    let slaves = lab.boot_bare_slaves(Firmware::Bios, "virtio-net-pci", 2);
    lab.expect_done_and_off(
        &slaves,
        "DISKCAST-SLAVE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    eprintln!(
        "slaves booted and verified in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for (vm, same) in lab.first_disks_equal(&["reference", "slave1", "slave2"], &reference_disk) {
        assert!(same, "{vm}'s disk differs from the reference disk");
    }
}
