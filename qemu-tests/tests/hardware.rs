//! Hardware the lab meets: Secure Boot (the signed shim → GRUB → kernel chain, and the firmware
//! refusing unsigned iPXE), UEFI HTTP boot without TFTP, NIC and disk models beyond virtio, and a
//! NIC whose driver the initramfs lacks.
//!
//! `scripts/test` runs the default ones; `scripts/test --matrix` adds the `#[ignore]`d scenario
//! matrix (every NIC and disk model imaged end to end, a Secure Boot slave).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{
    lab_dir, lab_file, make_source_disk, DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT,
};
use std::path::Path;
use std::time::{Duration, Instant};

/// `[[machine]]` entries giving these MACs the signed chain (appended after `[agent]`).
fn signed_machines(macs: &[&str]) -> String {
    macs.iter()
        .map(|mac| format!("[[machine]]\nmac = \"{mac}\"\nuefi_chain = \"signed\"\n"))
        .collect()
}

fn console_line<'a>(console: &'a str, needle: &str) -> &'a str {
    console
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} on the console:\n{console}"))
}

#[test]
fn secure_boot_uefi() {
    let mut lab = Lab::new("secure_boot_uefi");
    let signed = "52:54:00:dc:00:01";
    let server = lab.start_bootserver(DhcpMode::Full, &signed_machines(&[signed]));
    // A registered machine runs the agent only for a task.
    lab.task(&["inventory", "--to", signed]);
    let vm = lab.boot_vm(
        VmSpec::new("secure", Firmware::UefiSecureBoot, "virtio-net-pci", 1).disk(
            64,
            "SB-DISK-1",
            "virtio-blk-pci",
        ),
    );
    let ready = lab.wait_ready(vm);
    let boot_secs = lab.vm(vm).started.elapsed().as_secs_f64();
    assert_eq!(ready.get("role"), "inventory");
    assert_eq!(ready.get("mac"), signed);
    lab.vm(vm).wait_poweroff(Duration::from_secs(120)).unwrap();
    let console = lab.vm(vm).console.text();
    // The firmware enforced Secure Boot and the kernel knows it: lockdown is on.
    console_line(
        &console,
        "inventory: firmware uefi secure_boot=on lockdown=integrity",
    );
    // Lockdown refuses unsigned modules: every module loaded, the disk and NIC drivers included.
    let modules = console_line(&console, "modules: ");
    assert!(!modules.contains("failed"), "{modules}");
    assert!(
        modules.contains("virtio_net") && modules.contains("virtio_blk"),
        "{modules}"
    );
    console_line(&console, "inventory: disk vda");
    let log = lab.bootserver_log(server);
    for served in [
        "got \"shimx64.efi\"",
        "got \"grubx64.efi\"",
        "got \"/grub/grub.cfg-52:54:00:dc:00:01\"",
        "got \"/diskcast/vmlinuz\"",
        "got \"/diskcast/initramfs.img\"",
    ] {
        assert!(
            log.contains(served),
            "the bootserver never logged {served}:\n{log}"
        );
    }
    assert!(
        !log.contains("GET /boot/vmlinuz"),
        "the signed chain uses TFTP only"
    );

    // The same firmware given unsigned iPXE (this machine has no signed chain configured):
    // it fetches the loader and refuses to start it.
    let unsigned = lab.boot_vm(
        VmSpec::new("unsigned", Firmware::UefiSecureBoot, "virtio-net-pci", 2).disk(
            64,
            "SB-DISK-2",
            "virtio-blk-pci",
        ),
    );
    let refused = lab
        .vm(unsigned)
        .console
        .wait_for("Access Denied", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("unsigned iPXE was not refused: {e}"));
    let refused_secs = lab.vm(unsigned).started.elapsed().as_secs_f64();
    let log = lab.bootserver_log(server);
    let gave_ipxe = log
        .lines()
        .any(|l| l.contains("52:54:00:dc:00:02") && l.contains("file=snponly.efi"));
    assert!(gave_ipxe, "the unsigned machine was not given iPXE:\n{log}");
    assert!(log.contains("got \"snponly.efi\""), "{log}");
    let console = lab.vm(unsigned).console.text();
    assert!(
        !console.contains(diskcast_agent::READY_MARKER) && !console.contains("iPXE initialising"),
        "unsigned iPXE ran under Secure Boot:\n{console}"
    );
    eprintln!(
        "secure_boot_uefi: signed chain to {} in {boot_secs:.1} s; unsigned iPXE refused after \
         {refused_secs:.1} s: {refused}",
        diskcast_agent::READY_MARKER
    );
}

#[test]
fn uefi_http_boot() {
    let mut lab = Lab::new("uefi_http_boot");
    let server = lab.start_bootserver(DhcpMode::Full, "");
    let vm = lab.boot_vm(
        VmSpec::new("http", Firmware::Uefi, "virtio-net-pci", 3)
            .http_boot_only()
            .disk(64, "HTTP-DISK", "virtio-blk-pci"),
    );
    let ready = lab.wait_ready(vm);
    let secs = lab.vm(vm).started.elapsed().as_secs_f64();
    assert_eq!(ready.get("mac"), "52:54:00:dc:00:03");
    let status: serde_json::Value = serde_json::from_str(&lab.api_get("/status")).unwrap();
    assert_eq!(
        status["tftp"]["requests"], 0,
        "HTTP boot used TFTP: {status:#}"
    );
    let log = lab.bootserver_log(server);
    assert!(
        log.contains("http/uefi-x64"),
        "not classified as HTTP boot:\n{log}"
    );
    assert!(log.contains("GET /boot/snponly.efi 200"), "{log}");
    assert!(log.contains("GET /boot/initramfs.img 200"), "{log}");
    lab.vm(vm).wait_poweroff(Duration::from_secs(120)).unwrap();
    eprintln!(
        "uefi_http_boot: {} after {secs:.1} s",
        diskcast_agent::READY_MARKER
    );
}

/// Slaves with these (NIC, disk) models network-boot with `firmware` into deploy tasks of one
/// stored image; every disk must come out identical to it, and each slave's inventory must show
/// its disk on the expected controller.
fn image_models(name: &str, firmware: Firmware, models: &[(&'static str, &'static str)]) {
    let mut lab = Lab::new(name);
    let golden = lab.dir.join("golden.img");
    make_source_disk(&golden, 64);
    let extra = if firmware == Firmware::UefiSecureBoot {
        let macs: Vec<String> = (1..=models.len() as u8)
            .map(|i| format!("52:54:00:dc:00:{:02x}", 0x20 + i))
            .collect();
        signed_machines(&macs.iter().map(String::as_str).collect::<Vec<_>>())
    } else {
        String::new()
    };
    let server = lab.start_bootserver(DhcpMode::Full, &extra);
    lab.bootserver_cli(&["images", "import", &golden.display().to_string(), "golden"]);
    lab.task(&[
        "deploy",
        "golden",
        "--to",
        &Lab::slave_macs(models.len() as u8),
    ]);
    let started = Instant::now();
    let vms: Vec<usize> = models
        .iter()
        .enumerate()
        .map(|(i, (nic, disk))| {
            let n = i as u8 + 1;
            lab.boot_vm(
                VmSpec::new(&format!("slave{n}"), firmware, nic, 0x20 + n).disk(
                    64,
                    &format!("SLAVE-{n}"),
                    disk,
                ),
            )
        })
        .collect();
    lab.expect_done_and_off(
        &vms,
        "DISKCAST-SLAVE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    let names: Vec<String> = (1..=models.len()).map(|i| format!("slave{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for ((vm, same), (nic, disk)) in lab
        .first_disks_equal(&names, &golden)
        .into_iter()
        .zip(models)
    {
        assert!(same, "{vm} ({nic}, {disk}) does not hold the image");
    }
    for (&vm, (nic, disk)) in vms.iter().zip(models) {
        let console = lab.vm(vm).console.text();
        let expect = match *disk {
            "nvme" => "storage mode=nvme driver=nvme",
            "ide-hd" => "storage mode=sata-ahci driver=ahci",
            "scsi-hd" => "storage mode=scsi driver=virtio-pci",
            _ => "inventory: disk",
        };
        assert!(
            console.contains(expect),
            "{nic} + {disk}: no {expect:?} in the inventory:\n{console}"
        );
        let modules = console_line(&console, "modules: ");
        assert!(!modules.contains("failed"), "{nic} + {disk}: {modules}");
    }
    if firmware == Firmware::UefiSecureBoot {
        let log = lab.bootserver_log(server);
        assert!(log.contains("got \"/diskcast/initramfs.img\""), "{log}");
        for &vm in &vms {
            let console = lab.vm(vm).console.text();
            console_line(&console, "secure_boot=on lockdown=integrity");
        }
    }
    eprintln!(
        "{name}: {} slave(s) {models:?} imaged and verified in {:.0} s",
        models.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn nvme_and_scsi_targets() {
    image_models(
        "nvme_and_scsi_targets",
        Firmware::Bios,
        &[("e1000e", "nvme"), ("virtio-net-pci", "scsi-hd")],
    );
}

#[test]
#[ignore = "scenario matrix: scripts/test --matrix"]
fn matrix_other_models() {
    image_models(
        "matrix_other_models",
        Firmware::Bios,
        &[
            ("rtl8139", "ide-hd"),
            ("vmxnet3", "usb-storage"),
            ("e1000", "virtio-blk-pci"),
        ],
    );
}

#[test]
#[ignore = "scenario matrix: scripts/test --matrix"]
fn matrix_uefi_models() {
    // The lab starts NICs under OVMF without QEMU's iPXE option ROM, so only NICs OVMF drives
    // itself network-boot: virtio-net (e1000 has no OVMF driver without the ROM).
    image_models(
        "matrix_uefi_models",
        Firmware::Uefi,
        &[("virtio-net-pci", "nvme"), ("virtio-net-pci", "scsi-hd")],
    );
}

#[test]
#[ignore = "scenario matrix: scripts/test --matrix"]
fn secure_boot_slave_images() {
    image_models(
        "secure_boot_slave_images",
        Firmware::UefiSecureBoot,
        &[("virtio-net-pci", "virtio-blk-pci")],
    );
}

#[test]
fn missing_driver_named() {
    let mut lab = Lab::new("missing_driver_named");
    // The lab initramfs without the vmxnet3 driver.
    let initramfs = lab.dir.join("initramfs-without-vmxnet3.img");
    let kernel_root = lab_dir().join("kernel");
    let built = std::process::Command::new(lab_file("diskcast-initramfs"))
        .arg("--kernel-root")
        .arg(&kernel_root)
        .arg("--agent")
        .arg(lab_file("agent"))
        .args(["--without", "vmxnet3", "--output"])
        .arg(&initramfs)
        .output()
        .unwrap();
    assert!(built.status.success(), "{built:?}");
    let config = lab.bootserver_config(DhcpMode::Full, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &lab_file("initramfs.img").display().to_string(),
        &initramfs.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    lab.start_bootserver_with(Path::new(&config));
    let vm = lab.boot_vm(VmSpec::new("vmxnet3", Firmware::Bios, "vmxnet3", 4));
    let line = lab
        .vm(vm)
        .console
        .wait_for("would drive it", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("the missing driver was not named: {e}"));
    // VMware's vmxnet3: vendor 15ad, device 07b0.
    assert!(
        line.contains("15ad:07b0")
            && line.contains("module vmxnet3")
            && line.contains("--module vmxnet3"),
        "{line}"
    );
    assert!(line.contains("no network interface appeared"), "{line}");
    lab.vm(vm).wait_poweroff(Duration::from_secs(120)).unwrap();
}
