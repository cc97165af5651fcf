//! The built-in QEMU lab, interactively: a private LAN with the bootserver, and bare VMs that
//! network-boot into the agent while their consoles scroll by. No hardware needed.
//!
//! `cargo run -p diskcast-qemu-tests --bin lab -- [--uefi] [--e1000] [--vms N]`
//! (scripts/lab builds everything first and runs this).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: lab [--uefi] [--e1000] [--vms N]\n  boots N bare VMs (default 1) from the network into the diskcast agent");
        return ExitCode::SUCCESS;
    }
    let firmware = if args.iter().any(|a| a == "--uefi") {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };
    let nic = if args.iter().any(|a| a == "--e1000") {
        "e1000"
    } else {
        "virtio-net-pci"
    };
    let count: u8 = args
        .iter()
        .position(|a| a == "--vms")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--vms takes a number"))
        .unwrap_or(1);

    let mut lab = Lab::new("lab");
    lab.echo = true;
    println!(
        "lab: namespace {}, logs in {}",
        lab.netns,
        lab.dir.display()
    );
    lab.start_bootserver(DhcpMode::Full, "");
    let vms: Vec<usize> = (1..=count)
        .map(|i| {
            let spec = VmSpec::new(&format!("vm{i}"), firmware, nic, i).disk(
                256,
                &format!("LAB-DISK-{i}"),
                "virtio-blk-pci",
            );
            lab.boot_vm(spec)
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
        match lab.vm(vm).wait_poweroff(BOOT_TIMEOUT) {
            Ok(status) if status.success() => {}
            other => {
                println!(
                    "lab: {} did not power off cleanly: {other:?}",
                    lab.vm(vm).spec.name
                );
                ok = false;
            }
        }
    }
    println!("lab: done; every VM booted from the network and printed its inventory");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
