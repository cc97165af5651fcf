//! The built-in QEMU lab, interactively: a private LAN with the bootserver and VMs whose consoles
//! scroll by. No hardware needed.
//!
//! - default: peer-to-peer imaging — a master VM (its disk holds an ext4 file system, random and
//!   zero regions) multicasts its disk to N bare VMs that network-boot as slaves; afterwards the
//!   host compares every slave disk with the master's, byte for byte.
//! - `--client-server`: a reference VM network-boots in capture role and uploads its disk into the
//!   bootserver's image store; then N bare VMs network-boot and get the stored image by multicast.
//! - `--usb`: the master boots from the USB stick image (scripts/make-usb-stick) instead.
//! - `--inventory`: bare VMs network-boot into the agent, print their inventory and power off.
//! - `deploy --image FILE ...`: does an image deploy and boot? (see `lab_deploy`; for CI).
//!
//! Options: `--slaves N` (default 2), `--uefi`, `--secure-boot` (slaves under OVMF with Secure
//! Boot, through the signed chain), `--nic MODEL` (virtio, e1000, e1000e, rtl8139, vmxnet3),
//! `--disk MODEL` (virtio-blk, ahci, nvme, virtio-scsi, usb) for the slaves, `--e1000`.
//! scripts/lab builds everything first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{
    disk_model, make_source_disk, nic_model, DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT,
};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "deploy") {
        return diskcast_qemu_tests::lab_deploy::run(&args[1..]);
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: lab [--client-server | --usb | --inventory] [--slaves N] [--uefi | --secure-boot]\n  \
             \x20          [--nic virtio|e1000|e1000e|rtl8139|vmxnet3] [--disk virtio-blk|ahci|nvme|virtio-scsi|usb]\n  \
             lab deploy --image FILE [--vms N] [--uefi] [--expect TEXT] [--timeout S] (lab deploy --help)\n  \
             default: a master VM multicasts its disk to N network-booted slaves (N=2)\n  \
             --client-server: a VM captures its disk into the image store, then N bare VMs get it\n  \
             --usb: the master boots from the USB stick image\n  \
             --inventory: N bare VMs network-boot into the agent and print their inventory"
        );
        return ExitCode::SUCCESS;
    }
    let firmware = if args.iter().any(|a| a == "--secure-boot") {
        Firmware::UefiSecureBoot
    } else if args.iter().any(|a| a == "--uefi") {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args.get(i + 1).cloned().unwrap_or_default())
    };
    let nic = match value("--nic") {
        Some(name) => match nic_model(&name) {
            Some(model) => model,
            None => {
                eprintln!(
                    "lab: --nic {name:?} is not one of virtio, e1000, e1000e, rtl8139, vmxnet3"
                );
                return ExitCode::from(2);
            }
        },
        None if args.iter().any(|a| a == "--e1000") => "e1000",
        None => "virtio-net-pci",
    };
    let disk = match value("--disk") {
        Some(name) => {
            match disk_model(&name) {
                Some(model) => model,
                None => {
                    eprintln!("lab: --disk {name:?} is not one of virtio-blk, ahci, nvme, virtio-scsi, usb");
                    return ExitCode::from(2);
                }
            }
        }
        None => "virtio-blk-pci",
    };
    SLAVE_DISK.with(|d| d.set(disk));
    let count: u8 = args
        .iter()
        .position(|a| a == "--slaves" || a == "--vms")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--slaves takes a number"))
        .unwrap_or(2);
    if args.iter().any(|a| a == "--inventory") {
        inventory(firmware, nic, count)
    } else if args.iter().any(|a| a == "--client-server") {
        client_server(firmware, nic, count)
    } else {
        imaging(firmware, nic, count, args.iter().any(|a| a == "--usb"))
    }
}

thread_local! {
    /// The slaves' disk model (`--disk`).
    static SLAVE_DISK: std::cell::Cell<&'static str> = const { std::cell::Cell::new("virtio-blk-pci") };
}

/// Boots the slaves with the chosen disk model.
fn boot_slaves(lab: &mut Lab, firmware: Firmware, nic: &'static str, count: u8) -> Vec<usize> {
    lab.boot_bare_slaves_on(firmware, nic, SLAVE_DISK.with(std::cell::Cell::get), count)
}

/// The bootserver, giving the slaves the signed chain under Secure Boot.
fn start_bootserver(lab: &mut Lab, firmware: Firmware, slaves: u8) {
    let extra = if firmware == Firmware::UefiSecureBoot {
        Lab::signed_chain_for_slaves(slaves)
    } else {
        String::new()
    };
    lab.start_bootserver(DhcpMode::Full, &extra);
}

/// Firmware that can boot a VM directly or from its own disk: OVMF with Secure Boot refuses the
/// lab kernel outside the signed chain (Debian's key is trusted through shim only).
fn plain(firmware: Firmware) -> Firmware {
    if firmware == Firmware::UefiSecureBoot {
        Firmware::Uefi
    } else {
        firmware
    }
}

fn new_lab() -> Lab {
    let mut lab = Lab::new("lab");
    lab.echo = true;
    println!(
        "lab: namespace {}, logs in {}",
        lab.netns,
        lab.dir.display()
    );
    lab
}

/// Compares every slave's disk with `source`, prints the verdict, returns the exit code.
fn report(
    lab: &Lab,
    source: &Path,
    slaves: u8,
    done: bool,
    what: &str,
    started: Instant,
) -> ExitCode {
    let names: Vec<String> = (1..=slaves).map(|i| format!("slave{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut identical = 0;
    for (vm, same) in lab.first_disks_equal(&names, source) {
        println!(
            "lab: {vm}'s disk {} the {what}",
            if same {
                "is byte-for-byte identical to"
            } else {
                "DIFFERS from"
            }
        );
        identical += usize::from(same);
    }
    let ok = done && identical == usize::from(slaves);
    println!(
        "lab: {} in {:.0} s (under TCG emulation)",
        if ok {
            "imaging done: every slave holds a verified copy"
        } else {
            "imaging FAILED"
        },
        started.elapsed().as_secs_f64()
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn client_server(firmware: Firmware, nic: &'static str, slaves: u8) -> ExitCode {
    let mut lab = new_lab();
    let source = lab.dir.join("reference.img");
    make_source_disk(&source, 64);
    start_bootserver(&mut lab, firmware, slaves);
    print!(
        "{}",
        lab.task(&["capture", "52:54:00:dc:00:10", "--image", "golden"])
    );
    let started = Instant::now();
    println!("lab: step 1: the reference VM network-boots for its capture task");
    let reference = lab.boot_vm(
        VmSpec::new("reference", plain(firmware), nic, 0x10).disk_from(
            &source,
            "REF-1",
            "virtio-blk-pci",
        ),
    );
    let captured = lab.vm(reference).console.wait_for(
        "DISKCAST-CAPTURE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    let _ = lab.vm(reference).wait_poweroff(Duration::from_secs(120));
    if let Err(e) = captured {
        println!("lab: capture FAILED: {e}");
        return ExitCode::FAILURE;
    }
    let list = std::process::Command::new(diskcast_qemu_tests::lab_file("bootserver"))
        .args(["images", "--store"])
        .arg(lab.dir.join("state/images"))
        .arg("list")
        .output()
        .unwrap();
    println!(
        "lab: the image store now holds:\n{}",
        String::from_utf8_lossy(&list.stdout)
    );
    print!(
        "{}",
        lab.task(&["deploy", "golden", "--to", &Lab::slave_macs(slaves)])
    );
    println!("lab: step 2: the reference VM is off; {slaves} bare VMs network-boot and get the stored image");
    let slave_vms = boot_slaves(&mut lab, firmware, nic, slaves);
    let mut done = true;
    for &vm in &slave_vms {
        done &= lab
            .vm(vm)
            .console
            .wait_for(
                "DISKCAST-SLAVE-DONE",
                BOOT_TIMEOUT + Duration::from_secs(300),
            )
            .is_ok();
        let _ = lab.vm(vm).wait_poweroff(Duration::from_secs(120));
    }
    report(&lab, &source, slaves, done, "reference disk", started)
}

fn inventory(firmware: Firmware, nic: &'static str, count: u8) -> ExitCode {
    let mut lab = Lab::new("lab");
    lab.echo = true;
    println!(
        "lab: namespace {}, logs in {}",
        lab.netns,
        lab.dir.display()
    );
    let extra = if firmware == Firmware::UefiSecureBoot {
        (1..=count)
            .map(|i| {
                format!("[[machine]]\nmac = \"52:54:00:dc:00:{i:02x}\"\nuefi_chain = \"signed\"\n")
            })
            .collect()
    } else {
        String::new()
    };
    lab.start_bootserver(DhcpMode::Full, &extra);
    if firmware == Firmware::UefiSecureBoot {
        let macs: Vec<String> = (1..=count)
            .map(|i| format!("52:54:00:dc:00:{i:02x}"))
            .collect();
        lab.task(&["inventory", "--to", &macs.join(",")]);
    }
    let disk = SLAVE_DISK.with(std::cell::Cell::get);
    let vms: Vec<usize> = (1..=count)
        .map(|i| {
            lab.boot_vm(VmSpec::new(&format!("vm{i}"), firmware, nic, i).disk(
                256,
                &format!("LAB-DISK-{i}"),
                disk,
            ))
        })
        .collect();
    let mut ok = true;
    for vm in vms {
        let ready = lab.wait_ready(vm);
        println!(
            "lab: {} is up at {} ({} ms after the kernel started)",
            lab.vm(vm).spec.name,
            ready.get("address"),
            ready.get("uptime_ms")
        );
        ok &= matches!(lab.vm(vm).wait_poweroff(BOOT_TIMEOUT), Ok(status) if status.success());
    }
    println!(
        "lab: {}",
        if ok {
            "every VM booted from the network and printed its inventory"
        } else {
            "a VM did not power off cleanly"
        }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn imaging(firmware: Firmware, nic: &'static str, slaves: u8, usb: bool) -> ExitCode {
    let mut lab = new_lab();
    let source = lab.dir.join("golden.img");
    make_source_disk(&source, 64);
    start_bootserver(&mut lab, firmware, slaves);
    let started = Instant::now();
    // The master signs its session (the stick's key, or one on its command line); the slaves'
    // receive tasks trust that key.
    let key = lab.dir.join("master.key");
    let public = diskcast_qemu_tests::make_key(&key);
    print!(
        "{}",
        lab.task(&[
            "receive",
            "--to",
            &Lab::slave_macs(slaves),
            "--trust",
            &public
        ])
    );
    let secret =
        diskcast_proto::trust::SigningKey::from_key_file(&std::fs::read_to_string(&key).unwrap())
            .unwrap()
            .secret_hex();
    // The master boots the lab kernel directly, which OVMF with Secure Boot refuses: it runs
    // without (the USB stick's signed chain boots under Secure Boot).
    let master_firmware = if usb { firmware } else { plain(firmware) };
    let spec = VmSpec::new("master", master_firmware, nic, 0x10).disk_from(
        &source,
        "GOLDEN-1",
        "virtio-blk-pci",
    );
    let spec = if usb {
        let settings = lab.dir.join("diskcast.cfg");
        std::fs::write(
            &settings,
            format!("min_receivers = {slaves}\non_done = poweroff\non_error = poweroff\n"),
        )
        .unwrap();
        let stick = lab.dir.join("stick.img");
        let built = std::process::Command::new(
            diskcast_qemu_tests::project_root().join("scripts/make-usb-stick"),
        )
        .arg("--output")
        .arg(&stick)
        .arg("--settings")
        .arg(&settings)
        .arg("--key")
        .arg(&key)
        .status()
        .unwrap();
        assert!(built.success(), "make-usb-stick failed");
        spec.usb_stick(&stick)
    } else {
        spec.kernel(&format!(
            "console=ttyS0,115200 panic=-1 diskcast.role=master diskcast.min_receivers={slaves} \
             diskcast.on_done=poweroff diskcast.on_error=poweroff diskcast.sign={secret}"
        ))
    };
    let master = lab.boot_vm(spec);
    let slave_vms = boot_slaves(&mut lab, firmware, nic, slaves);
    let done = lab.vm(master).console.wait_for(
        "DISKCAST-MASTER-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    for vm in std::iter::once(master).chain(slave_vms.iter().copied()) {
        let _ = lab.vm(vm).wait_poweroff(Duration::from_secs(120));
    }
    report(&lab, &source, slaves, done.is_ok(), "master's", started)
}
