//! Peer-to-peer imaging in QEMU: a master VM (kernel + initramfs, role=master) multicasts its disk
//! to two bare VMs that network-boot from the bootserver as slaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{make_source_disk, DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT};
use std::time::Duration;

#[test]
fn p2p_master_to_slaves() {
    let mut lab = Lab::new("p2p_master_to_slaves");
    let source = lab.dir.join("golden.img");
    make_source_disk(&source, 64);
    lab.start_bootserver(DhcpMode::Full, "");
    // Every machine the bootserver boots is a slave; the master comes up from its own kernel.
    let config = lab.bootserver_config(DhcpMode::Full, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("role = \"inventory\"", "role = \"slave\"");
    std::fs::write(&config, text).unwrap();
    lab.kill_bootserver(0);
    lab.start_bootserver_with(&config);

    let master = lab.boot_vm(
        VmSpec::new("master", Firmware::Bios, "virtio-net-pci", 0x10)
            .disk_from(&source, "GOLDEN-1", "virtio-blk-pci")
            .kernel(
                "console=ttyS0,115200 panic=-1 diskcast.role=master diskcast.min_receivers=2 \
                 diskcast.on_done=poweroff diskcast.on_error=poweroff",
            ),
    );
    let slaves: Vec<usize> = (1..=2)
        .map(|i| {
            lab.boot_vm(
                VmSpec::new(
                    &format!("slave{i}"),
                    Firmware::Bios,
                    "virtio-net-pci",
                    0x20 + i,
                )
                .disk(64, &format!("SLAVE-{i}"), "virtio-blk-pci"),
            )
        })
        .collect();

    lab.vm(master)
        .console
        .wait_for(
            "DISKCAST-MASTER-DONE",
            BOOT_TIMEOUT + Duration::from_secs(300),
        )
        .unwrap_or_else(|e| panic!("master: {e}"));
    for &slave in &slaves {
        lab.vm(slave)
            .console
            .wait_for("DISKCAST-SLAVE-DONE", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("slave: {e}"));
    }
    for vm in std::iter::once(master).chain(slaves.iter().copied()) {
        let status = lab.vm(vm).wait_poweroff(Duration::from_secs(120)).unwrap();
        assert!(status.success());
    }
    let expected = std::fs::read(&source).unwrap();
    assert_eq!(
        std::fs::read(lab.disk_path("master", 0)).unwrap(),
        expected,
        "the master's disk changed"
    );
    for i in 1..=2 {
        let copy = std::fs::read(lab.disk_path(&format!("slave{i}"), 0)).unwrap();
        assert!(
            copy == expected,
            "slave{i}'s disk differs from the master's"
        );
    }
    let summary = lab.vm(master).console.text();
    let verified = summary
        .lines()
        .filter(|l| l.trim_end().ends_with(" verified") && l.contains("SLAVE-"))
        .count();
    assert_eq!(verified, 2, "{summary}");
}
