//! Boot-time benchmark: seconds from VM start to the agent's ready line, diskcast's bootserver
//! against dnsmasq + iPXE (DHCP and TFTP, the usual set-up) serving the same kernel and initramfs,
//! for BIOS and UEFI, interleaved run by run on the same emulated LAN.
//!
//! `scripts/bench-boot [RUNS]` (default 3). Prints medians and the ratio.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{lab_dir, DhcpMode, Firmware, Lab, VmSpec};
use std::fs;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Server {
    Diskcast,
    Dnsmasq,
}

fn dnsmasq_tftp_root(lab: &Lab) -> std::path::PathBuf {
    let root = lab.dir.join("dnsmasq-tftp");
    fs::create_dir_all(&root).unwrap();
    for file in ["undionly.kpxe", "snponly.efi"] {
        fs::copy(format!("/usr/lib/ipxe/{file}"), root.join(file)).unwrap();
    }
    for file in ["vmlinuz", "initramfs.img"] {
        fs::copy(lab_dir().join(file), root.join(file)).unwrap();
    }
    // The same kernel line the bootserver renders, so only the serving differs.
    fs::write(
        root.join("boot.ipxe"),
        "#!ipxe\nkernel tftp://10.77.0.1/vmlinuz initrd=initramfs.img console=ttyS0,115200 panic=-1 \
         diskcast.role=inventory diskcast.on_error=poweroff diskcast.on_done=poweroff\n\
         initrd tftp://10.77.0.1/initramfs.img\nboot\n",
    )
    .unwrap();
    root
}

fn boot_once(server: Server, firmware: Firmware, run: usize) -> Option<f64> {
    let mut lab = Lab::new(&format!("bench-{run}"));
    match server {
        Server::Diskcast => {
            lab.start_bootserver(DhcpMode::Full, "");
        }
        Server::Dnsmasq => {
            let root = dnsmasq_tftp_root(&lab);
            let mut cmd = lab.command_in_lab("dnsmasq");
            cmd.args([
                "--no-daemon",
                "--port=0",
                "--interface=br0",
                "--bind-interfaces",
                "--user=root",
            ])
            .args(["--dhcp-range=10.77.0.100,10.77.0.149,10m", "--enable-tftp"])
            .arg(format!("--tftp-root={}", root.display()))
            .arg(format!(
                "--dhcp-leasefile={}",
                lab.dir.join("dnsmasq.leases").display()
            ))
            .args([
                "--dhcp-userclass=set:ipxe,iPXE",
                "--dhcp-match=set:efi64,option:client-arch,7",
            ])
            .args(["--dhcp-match=set:efi64,option:client-arch,9"])
            .args([
                "--dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe",
                "--dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi",
            ])
            .args(["--dhcp-boot=tag:ipxe,boot.ipxe"]);
            let log = lab.start_helper("dnsmasq", cmd);
            log.wait_for("TFTP root", Duration::from_secs(20)).unwrap();
        }
    }
    let vm = lab.boot_vm(VmSpec::new("bench", firmware, "virtio-net-pci", 1));
    let ready = lab.vm(vm).console.wait_for(
        diskcast_agent::READY_MARKER,
        diskcast_qemu_tests::BOOT_TIMEOUT,
    );
    let elapsed = lab.vm(vm).started.elapsed().as_secs_f64();
    match ready {
        Ok(_) => Some(elapsed),
        Err(e) => {
            eprintln!("{server:?} {firmware:?} run {run}: {e}");
            None
        }
    }
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    Some(values[values.len() / 2])
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("RUNS is a number"))
        .unwrap_or(3);
    let cases = [Firmware::Bios, Firmware::Uefi];
    let mut results: Vec<(Firmware, Server, Vec<f64>)> = Vec::new();
    for firmware in cases {
        for server in [Server::Diskcast, Server::Dnsmasq] {
            results.push((firmware, server, Vec::new()));
        }
    }
    for run in 1..=runs {
        for (firmware, server, times) in &mut results {
            if let Some(t) = boot_once(*server, *firmware, run) {
                println!("run {run}: {firmware:?} {server:?}: ready after {t:.1} s");
                times.push(t);
            }
        }
    }
    println!("\nseconds from VM start to DISKCAST-READY (median of {runs}, TCG)");
    println!("| firmware | diskcast bootserver | dnsmasq + iPXE (TFTP) | ratio |");
    println!("|---|---|---|---|");
    for firmware in cases {
        let mut get = |server| {
            let times = &mut results
                .iter_mut()
                .find(|(f, s, _)| *f == firmware && *s == server)
                .unwrap()
                .2;
            (median(times), times.len())
        };
        let (ours, n_ours) = get(Server::Diskcast);
        let (theirs, n_theirs) = get(Server::Dnsmasq);
        let fmt = |m: Option<f64>, n| {
            m.map_or("failed".into(), |m| format!("{m:.1} ({n}/{runs} booted)"))
        };
        let ratio = ours
            .zip(theirs)
            .map_or("-".into(), |(o, t)| format!("{:.2}× faster", t / o));
        println!(
            "| {firmware:?} | {} | {} | {ratio} |",
            fmt(ours, n_ours),
            fmt(theirs, n_theirs)
        );
    }
}
