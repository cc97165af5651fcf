//! The built-in QEMU lab, interactively: a private LAN with the bootserver and VMs whose consoles
//! scroll by. No hardware needed.
//!
//! - default: peer-to-peer imaging — a master VM (its disk holds an ext4 file system, random and
//!   zero regions) multicasts its disk to N bare VMs that network-boot as slaves; afterwards the
//!   host compares every slave disk with the master's, byte for byte.
//! - `--inventory`: bare VMs network-boot into the agent, print their inventory and power off.
//!
//! Options: `--slaves N` (default 2), `--uefi`, `--e1000`. scripts/lab builds everything first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{make_source_disk, DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: lab [--inventory] [--slaves N] [--uefi] [--e1000]\n  \
             default: a master VM multicasts its disk to N network-booted slaves (N=2)\n  \
             --inventory: N bare VMs network-boot into the agent and print their inventory"
        );
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
        .position(|a| a == "--slaves" || a == "--vms")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--slaves takes a number"))
        .unwrap_or(2);
    if args.iter().any(|a| a == "--inventory") {
        inventory(firmware, nic, count)
    } else {
        imaging(firmware, nic, count)
    }
}

fn inventory(firmware: Firmware, nic: &'static str, count: u8) -> ExitCode {
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
            lab.boot_vm(VmSpec::new(&format!("vm{i}"), firmware, nic, i).disk(
                256,
                &format!("LAB-DISK-{i}"),
                "virtio-blk-pci",
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

fn imaging(firmware: Firmware, nic: &'static str, slaves: u8) -> ExitCode {
    let mut lab = Lab::new("lab");
    lab.echo = true;
    println!(
        "lab: namespace {}, logs in {}",
        lab.netns,
        lab.dir.display()
    );
    let source = lab.dir.join("golden.img");
    make_source_disk(&source, 64);
    let config = lab.bootserver_config(DhcpMode::Full, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("role = \"inventory\"", "role = \"slave\"");
    std::fs::write(&config, text).unwrap();
    lab.start_bootserver_with(&config);
    let started = Instant::now();
    let master = lab.boot_vm(
        VmSpec::new("master", firmware, nic, 0x10)
            .disk_from(&source, "GOLDEN-1", "virtio-blk-pci")
            .kernel(&format!(
            "console=ttyS0,115200 panic=-1 diskcast.role=master diskcast.min_receivers={slaves} \
             diskcast.on_done=poweroff diskcast.on_error=poweroff"
        )),
    );
    let slave_vms: Vec<usize> = (1..=slaves)
        .map(|i| {
            lab.boot_vm(
                VmSpec::new(&format!("slave{i}"), firmware, nic, 0x20 + i).disk(
                    64,
                    &format!("SLAVE-{i}"),
                    "virtio-blk-pci",
                ),
            )
        })
        .collect();
    let done = lab.vm(master).console.wait_for(
        "DISKCAST-MASTER-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    for vm in std::iter::once(master).chain(slave_vms.iter().copied()) {
        let _ = lab.vm(vm).wait_poweroff(Duration::from_secs(120));
    }
    let expected = std::fs::read(&source).unwrap();
    let mut identical = 0;
    for i in 1..=slaves {
        let same = std::fs::read(lab.disk_path(&format!("slave{i}"), 0))
            .map(|d| d == expected)
            .unwrap_or(false);
        println!(
            "lab: slave{i}'s disk {} the master's",
            if same {
                "is byte-for-byte identical to"
            } else {
                "DIFFERS from"
            }
        );
        identical += usize::from(same);
    }
    let ok = done.is_ok() && identical == usize::from(slaves);
    println!(
        "lab: {} in {:.0} s (power-on to last copy verified, under TCG emulation)",
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
