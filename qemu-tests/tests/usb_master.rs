//! The master from a USB stick: a VM boots the stick built by scripts/make-usb-stick (syslinux
//! under SeaBIOS, shim and signed GRUB under OVMF, with or without Secure Boot) with an internal
//! source disk, reads the session settings
//! from diskcast.cfg on the stick, and multicasts the disk to two VMs that network-boot as slaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{
    make_source_disk, project_root, DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Builds the stick with test settings (two slaves, power off after).
/// The stick image and the public key its master signs with.
fn build_stick(lab: &Lab) -> (PathBuf, String) {
    let settings = lab.dir.join("diskcast.cfg");
    std::fs::write(
        &settings,
        "# test lab\nmin_receivers = 2\nstart_timeout = 600\ndisk = serial:SOURCE-1\n\
         on_done = poweroff\non_error = poweroff\n\
         # slow enough for the live table to show a few times\nrate = 3\n",
    )
    .unwrap();
    let stick = lab.dir.join("stick.img");
    let out = Command::new(project_root().join("scripts/make-usb-stick"))
        .arg("--output")
        .arg(&stick)
        .arg("--settings")
        .arg(&settings)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make-usb-stick failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    let public = said
        .lines()
        .find_map(|l| l.strip_prefix("public-key: "))
        .unwrap_or_else(|| panic!("make-usb-stick printed no public key: {said}"))
        .trim()
        .to_string();
    (stick, public)
}

fn master_from_stick_images_two_slaves(name: &str, firmware: Firmware) {
    let mut lab = Lab::new(name);
    let source = lab.dir.join("source.img");
    make_source_disk(&source, 64);
    let (stick, public) = build_stick(&lab);
    // Under Secure Boot the slaves need the signed chain too.
    let extra: String = if firmware == Firmware::UefiSecureBoot {
        (1..=2)
            .map(|i| {
                format!("[[machine]]\nmac = \"52:54:00:dc:00:2{i}\"\nuefi_chain = \"signed\"\n")
            })
            .collect()
    } else {
        String::new()
    };
    lab.start_bootserver(DhcpMode::Full, &extra);
    lab.task(&["receive", "--to", &Lab::slave_macs(2), "--trust", &public]);

    let master = lab.boot_vm(
        VmSpec::new("master", firmware, "virtio-net-pci", 0x10)
            .disk_from(&source, "SOURCE-1", "virtio-blk-pci")
            .usb_stick(&stick),
    );
    let slaves: Vec<usize> = (1..=2)
        .map(|i| {
            lab.boot_vm(
                VmSpec::new(&format!("slave{i}"), firmware, "virtio-net-pci", 0x20 + i).disk(
                    64,
                    &format!("SLAVE-{i}"),
                    "virtio-blk-pci",
                ),
            )
        })
        .collect();
    let console = &lab.vm(master).console;
    console
        .wait_for("settings: diskcast.cfg from", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("master: {e}"));
    console
        .wait_for("master: sending /dev/vda", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("master: {e}"));
    console
        .wait_for(
            "DISKCAST-MASTER-DONE",
            BOOT_TIMEOUT + Duration::from_secs(300),
        )
        .unwrap_or_else(|e| panic!("master: {e}"));
    lab.expect_done_and_off(&[master], "next: power off", Duration::from_secs(30));
    lab.expect_done_and_off(&slaves, "DISKCAST-SLAVE-DONE", Duration::from_secs(120));
    let text = lab.vm(master).console.text();
    // The live table showed each slave with its address, and the totals.
    for i in 1..=2 {
        let mac = format!("52:54:00:dc:00:2{i}");
        assert!(
            text.lines()
                .any(|l| l.contains(&mac) && l.contains(" 10.77.0.1") && l.contains('%')),
            "no live table line for {mac} with its address:\n{text}"
        );
    }
    assert!(text.contains("total: 2 receiver(s)"), "{text}");
    for (vm, same) in lab.first_disks_equal(&["master", "slave1", "slave2"], &source) {
        assert!(same, "{vm}'s disk differs from the source");
    }
    assert!(
        same_bytes(&stick, &lab.stick_path("master")),
        "the stick changed"
    );
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn usb_master_bios() {
    master_from_stick_images_two_slaves("usb_master_bios", Firmware::Bios);
}

#[test]
fn usb_master_uefi() {
    master_from_stick_images_two_slaves("usb_master_uefi", Firmware::Uefi);
}

#[test]
#[ignore = "scenario matrix: scripts/test --matrix"]
fn usb_master_secure_boot() {
    master_from_stick_images_two_slaves("usb_master_secure_boot", Firmware::UefiSecureBoot);
}
