//! Boot-path scenarios: bare VMs network-boot from the bootserver into the agent.
//! Run by scripts/test (one at a time: the machine has two cores).

#![allow(clippy::unwrap_used)]
use diskcast_qemu_tests::{DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT};
use std::time::Duration;

fn boot_and_check(name: &str, firmware: Firmware, nic: &'static str, loader_hint: &str) {
    let mut lab = Lab::new(name);
    let server = lab.start_bootserver(DhcpMode::Full, "");
    let vm =
        lab.boot_vm(VmSpec::new(name, firmware, nic, 1).disk(64, "DC-DISK-1", "virtio-blk-pci"));
    let ready = lab.wait_ready(vm);
    assert_eq!(ready.get("role"), "inventory");
    assert_eq!(ready.get("mac"), "52:54:00:dc:00:01");
    assert!(ready.get("address").starts_with("10.77.0.1"), "{ready:?}");
    let status = lab.vm(vm).wait_poweroff(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "qemu exited with {status}");
    let log = lab.bootserver_log(server);
    assert!(
        log.contains(loader_hint),
        "bootserver log lacks {loader_hint:?}:\n{log}"
    );
    assert!(log.contains("GET /boot/initramfs.img 200"), "{log}");
}

#[test]
fn pxe_bios_e1000() {
    boot_and_check("pxe_bios_e1000", Firmware::Bios, "e1000", "ipxe/bios");
}

// The same UEFI PXE path boots the slaves of lab_tasks' `task_deploy_then_local_boot_uefi`.
#[test]
#[ignore = "scenario matrix: scripts/test --matrix"]
fn pxe_uefi_ovmf() {
    // OVMF's own PXE client fetches snponly.efi over TFTP, which then runs our script.
    boot_and_check(
        "pxe_uefi_ovmf",
        Firmware::Uefi,
        "virtio-net-pci",
        "got \"snponly.efi\"",
    );
}

/// Also the plain BIOS + virtio-net PXE path (what `boot_and_check` checks for other models).
#[test]
fn inventory_matches_vm() {
    let mut lab = Lab::new("inventory_matches_vm");
    let server = lab.start_bootserver(DhcpMode::Full, "");
    let spec = VmSpec::new("inventory", Firmware::Bios, "virtio-net-pci", 2)
        .disk(96, "DC-VIRTIO-96", "virtio-blk-pci")
        .disk(160, "DC-AHCI-160", "ide-hd");
    let vm = lab.boot_vm(spec);
    let ready = lab.wait_ready(vm);
    assert_eq!(ready.get("role"), "inventory");
    assert!(ready.get("address").starts_with("10.77.0.1"), "{ready:?}");
    let console = lab.vm(vm).console.text();
    let disk_line = |serial: &str| {
        console
            .lines()
            .find(|l| l.starts_with("inventory: disk") && l.contains(&format!("serial={serial:?}")))
            .unwrap_or_else(|| panic!("no inventory line for disk {serial}:\n{console}"))
            .to_string()
    };
    let virtio = disk_line("DC-VIRTIO-96");
    assert!(
        virtio.contains(&format!("size={}", 96u64 << 20)),
        "{virtio}"
    );
    assert!(
        virtio.contains("block=512") && virtio.contains("boot=no"),
        "{virtio}"
    );
    let ahci = disk_line("DC-AHCI-160");
    assert!(ahci.contains(&format!("size={}", 160u64 << 20)), "{ahci}");
    assert!(ahci.contains("model=\"QEMU HARDDISK\""), "{ahci}");
    let nic = console
        .lines()
        .find(|l| l.starts_with("inventory: nic"))
        .expect("a nic line");
    assert!(
        nic.contains("mac=52:54:00:dc:00:02")
            && nic.contains("driver=virtio_net")
            && nic.contains("link=up"),
        "{nic}"
    );
    assert!(
        console.contains("inventory: 2 disk(s), 1 nic(s)"),
        "{console}"
    );
    let status = lab.vm(vm).wait_poweroff(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "qemu exited with {status}");
    let log = lab.bootserver_log(server);
    assert!(log.contains("ipxe/bios"), "{log}");
    assert!(log.contains("GET /boot/initramfs.img 200"), "{log}");
}

#[test]
fn bootserver_restart_keeps_leases() {
    let mut lab = Lab::new("bootserver_restart_keeps_leases");
    let first_server = lab.start_bootserver(DhcpMode::Full, "");
    let vm = lab.boot_vm(VmSpec::new("first", Firmware::Bios, "virtio-net-pci", 3));
    let address = lab.wait_ready(vm).get("address").to_string();
    lab.vm(vm).wait_poweroff(Duration::from_secs(120)).unwrap();
    lab.kill_bootserver(first_server);

    let server = lab.start_bootserver(DhcpMode::Full, "");
    // The log (stderr) is read by another thread than "ready" (stdout): wait for it.
    lab.bootservers_console(server)
        .wait_for("leases: 1 known", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.bootserver_log(server)));
    // Another machine, booting beside it, must not get the address the first one holds, and the
    // first machine gets its own back (inventoried once as unknown, it now needs a task to run
    // the agent again).
    lab.task(&["inventory", "--to", "52:54:00:dc:00:03"]);
    let other = lab.boot_vm(VmSpec::new("other", Firmware::Bios, "virtio-net-pci", 4));
    let again = lab.boot_vm(VmSpec::new(
        "first-again",
        Firmware::Bios,
        "virtio-net-pci",
        3,
    ));
    let other_address = lab.wait_ready(other).get("address").to_string();
    assert_ne!(other_address, address);
    assert_eq!(lab.wait_ready(again).get("address"), address);
}

#[test]
fn proxydhcp_beside_dnsmasq() {
    let mut lab = Lab::new("proxydhcp_beside_dnsmasq");
    // The lab's own DHCP server: dnsmasq on another host of the LAN, addresses only.
    let host = lab.add_host("dhcp", "10.77.0.2/24");
    let mut dnsmasq = std::process::Command::new("ip");
    dnsmasq
        .args([
            "netns",
            "exec",
            &host,
            "dnsmasq",
            "--no-daemon",
            "--port=0",
            "--interface=eth0",
            "--bind-interfaces",
        ])
        .args([
            "--dhcp-range=10.77.0.200,10.77.0.220,255.255.255.0,10m",
            "--log-dhcp",
            "--user=root",
        ])
        .arg(format!(
            "--dhcp-leasefile={}",
            lab.dir.join("dnsmasq.leases").display()
        ))
        .arg(format!(
            "--pid-file={}",
            lab.dir.join("dnsmasq.pid").display()
        ));
    let dnsmasq_log = lab.start_helper("dnsmasq", dnsmasq);
    dnsmasq_log
        .wait_for("DHCP, IP range", Duration::from_secs(20))
        .unwrap();
    let server = lab.start_bootserver(DhcpMode::Proxy, "");
    let vm = lab.boot_vm(VmSpec::new("proxied", Firmware::Bios, "virtio-net-pci", 5));
    let ready = lab.wait_ready(vm);
    // dnsmasq gave the address (its range), the bootserver only the boot information.
    let address = ready.get("address");
    assert!(
        address.starts_with("10.77.0.2") && address.len() == "10.77.0.2xx".len(),
        "{ready:?}"
    );
    let log = lab.bootserver_log(server);
    assert!(
        log.contains("proxy Offer") || log.contains("boot server Ack"),
        "{log}"
    );
    assert!(
        !log.contains("Ack 10.77.0."),
        "the proxy must not hand out addresses:\n{log}"
    );
    lab.vm(vm).wait_poweroff(BOOT_TIMEOUT).unwrap();
}
