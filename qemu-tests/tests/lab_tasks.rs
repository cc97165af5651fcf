//! The unattended lab in QEMU: a machine imaged by a one-shot task boots its new disk afterwards
//! (BIOS and UEFI), a machine nobody registered is never written, and a failed task stays on
//! record across a server crash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::fixtures::make_bootable_disk;
use diskcast_qemu_tests::{make_source_disk, DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT};
use std::time::Duration;

const MARKER: &str = "DISKCAST-FIXTURE-BOOTED";
const PC: &str = "52:54:00:dc:00:30";

/// The state of the one task of `mac`, from the API.
fn task_of(lab: &Lab, mac: &str) -> serde_json::Value {
    let tasks: serde_json::Value =
        serde_json::from_str(&lab.api_get("/api/v1/tasks?all=true")).unwrap();
    let mine: Vec<&serde_json::Value> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["mac"] == mac)
        .collect();
    assert_eq!(mine.len(), 1, "{tasks:#}");
    mine[0].clone()
}

fn deploy_then_local_boot(name: &str, firmware: Firmware) {
    let mut lab = Lab::new(name);
    lab.on_done = "reboot";
    let image = lab.dir.join("bootable.img");
    make_bootable_disk(&image, 64, MARKER);
    lab.start_bootserver(DhcpMode::Full, "");
    lab.bootserver_cli(&["images", "import", &image.display().to_string(), "bootable"]);
    lab.task(&["deploy", "bootable", "--to", PC]);
    // Network first in its boot order, as imaging labs set them: it boots the agent for its
    // task, then, with the task done, its new disk.
    let vm = lab.boot_vm(
        VmSpec::new("pc", firmware, "virtio-net-pci", 0x30)
            .disk(64, "PC-DISK", "virtio-blk-pci")
            .rebooting(),
    );
    let console = lab.vm(vm).console.clone();
    console
        .wait_for(
            "DISKCAST-SLAVE-DONE",
            BOOT_TIMEOUT + Duration::from_secs(300),
        )
        .unwrap_or_else(|e| panic!("pc: {e}"));
    console
        .wait_for(MARKER, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("pc did not boot its new disk: {e}"));
    let log = lab.bootserver_log(0);
    assert!(
        log.contains(&format!(
            "lab: {PC} boots its local disk (no task for this machine)"
        )),
        "{log}"
    );
    assert_eq!(
        log.matches("lab: session for image \"bootable\"").count(),
        1,
        "a second session started:\n{log}"
    );
    let task = task_of(&lab, PC);
    assert_eq!(task["state"], "verified", "{task:#}");
    let disk = std::fs::read(lab.disk_path("pc", 0)).unwrap();
    assert!(
        disk == std::fs::read(&image).unwrap(),
        "the disk is not the image"
    );
}

#[test]
fn task_deploy_then_local_boot_bios() {
    deploy_then_local_boot("task_deploy_then_local_boot_bios", Firmware::Bios);
}

#[test]
fn task_deploy_then_local_boot_uefi() {
    deploy_then_local_boot("task_deploy_then_local_boot_uefi", Firmware::Uefi);
}

#[test]
fn unknown_machine_untouched() {
    let mut lab = Lab::new("unknown_machine_untouched");
    let golden = lab.dir.join("golden.img");
    make_source_disk(&golden, 64);
    // The stranger's disk holds something of its own.
    let own = lab.dir.join("stranger-own.img");
    make_bootable_disk(&own, 64, "STRANGER-OWN-OS");
    lab.start_bootserver(DhcpMode::Full, "");
    lab.bootserver_cli(&["images", "import", &golden.display().to_string(), "golden"]);
    lab.task(&["deploy", "golden", "--to", PC]);
    let pc = lab.boot_vm(
        VmSpec::new("pc", Firmware::Bios, "virtio-net-pci", 0x30).disk(
            64,
            "PC-DISK",
            "virtio-blk-pci",
        ),
    );
    let stranger = lab.boot_vm(
        VmSpec::new("stranger", Firmware::Bios, "virtio-net-pci", 0x66).disk_from(
            &own,
            "VISITOR",
            "virtio-blk-pci",
        ),
    );
    lab.expect_done_and_off(
        &[pc],
        "DISKCAST-SLAVE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    // The stranger ran no more than an inventory (the lab asks for that of unknown machines).
    let ready = lab.wait_ready(stranger);
    assert_eq!(ready.get("role"), "inventory");
    lab.vm(stranger)
        .wait_poweroff(Duration::from_secs(120))
        .unwrap();
    for (vm, same) in lab.first_disks_equal(&["pc"], &golden) {
        assert!(same, "{vm} was not imaged");
    }
    for (vm, same) in lab.first_disks_equal(&["stranger"], &own) {
        assert!(same, "{vm}'s disk changed");
    }
    let machine: serde_json::Value =
        serde_json::from_str(&lab.api_get("/api/v1/machines/52:54:00:dc:00:66")).unwrap();
    assert_eq!(machine["machine"]["known"], false, "{machine:#}");
    let tasks = machine["tasks"].as_array().unwrap();
    assert!(
        tasks.iter().all(|t| t["kind"]["kind"] == "inventory"),
        "{machine:#}"
    );
    assert_eq!(task_of(&lab, PC)["state"], "verified");
}

#[test]
fn failed_task_recorded_across_restart() {
    let mut lab = Lab::new("failed_task_recorded_across_restart");
    let golden = lab.dir.join("golden.img");
    make_source_disk(&golden, 64);
    let first = lab.start_bootserver(DhcpMode::Full, "");
    lab.bootserver_cli(&["images", "import", &golden.display().to_string(), "golden"]);
    lab.task(&["deploy", "golden", "--to", PC]);
    // Two disks and no disk named: the agent must refuse to guess.
    let vm = lab.boot_vm(
        VmSpec::new("pc", Firmware::Bios, "virtio-net-pci", 0x30)
            .disk(64, "DISK-A", "virtio-blk-pci")
            .disk(80, "DISK-B", "ide-hd"),
    );
    lab.vm(vm)
        .console
        .wait_for("several internal disks", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("pc: {e}"));
    lab.vm(vm).wait_poweroff(Duration::from_secs(120)).unwrap();
    // The session waiting for it stops waiting (instead of waiting out the start timeout), and
    // says why.
    let gave_up = format!("stops waiting for {PC}: its task ");
    let waited = std::time::Instant::now();
    let ended = "ended before it started: every machine it waited for failed";
    while !lab.bootserver_log(first).contains(ended) {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the session still waits for {PC}:\n{}",
            lab.bootserver_log(first)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = lab.bootserver_log(first);
    let line = log
        .lines()
        .find(|l| l.contains(&gave_up))
        .unwrap_or_else(|| panic!("no {gave_up:?} in\n{log}"));
    assert!(line.contains(" failed: "), "{line}");
    let check = |lab: &Lab| {
        let task = task_of(lab, PC);
        assert_eq!(task["state"], "failed", "{task:#}");
        let reason = task["reason"].as_str().unwrap();
        assert!(
            reason.contains("several internal disks")
                && reason.contains("DISK-A")
                && reason.contains("DISK-B"),
            "{reason}"
        );
        let machine: serde_json::Value =
            serde_json::from_str(&lab.api_get(&format!("/api/v1/machines/{PC}"))).unwrap();
        let inventory: serde_json::Value =
            serde_json::from_str(machine["machine"]["inventory"]["json"].as_str().unwrap())
                .unwrap();
        let serials: Vec<&str> = inventory["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["serial"].as_str().unwrap())
            .collect();
        assert_eq!(serials.len(), 2, "{inventory:#}");
        assert!(serials.contains(&"DISK-A") && serials.contains(&"DISK-B"));
    };
    check(&lab);
    // A crash, a restart: the record is still there.
    lab.kill_bootserver(first);
    lab.start_bootserver(DhcpMode::Full, "");
    check(&lab);
    let history = lab.bootserver_cli(&["tasks", "--all"]);
    assert!(history.contains("failed"), "{history}");
}
