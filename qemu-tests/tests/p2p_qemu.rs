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
    // The slaves have receive tasks; the master comes up from its own kernel.
    lab.start_bootserver(DhcpMode::Full, "");
    // The master signs with a key of its own; the slaves' tasks trust it.
    let key = diskcast_proto::trust::SigningKey::from_seed([0x42; 32]);
    lab.task(&[
        "receive",
        "--to",
        &Lab::slave_macs(2),
        "--trust",
        &key.public().to_string(),
    ]);

    let master = lab.boot_vm(
        VmSpec::new("master", Firmware::Bios, "virtio-net-pci", 0x10)
            .disk_from(&source, "GOLDEN-1", "virtio-blk-pci")
            .kernel(&format!(
                "console=ttyS0,115200 panic=-1 diskcast.role=master diskcast.min_receivers=2 \
                 diskcast.on_done=poweroff diskcast.on_error=poweroff diskcast.sign={}",
                key.secret_hex()
            )),
    );
    let slaves = lab.boot_bare_slaves(Firmware::Bios, "virtio-net-pci", 2);

    lab.expect_done_and_off(
        &[master],
        "DISKCAST-MASTER-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    lab.expect_done_and_off(&slaves, "DISKCAST-SLAVE-DONE", Duration::from_secs(60));
    for (vm, same) in lab.first_disks_equal(&["master", "slave1", "slave2"], &source) {
        assert!(same, "{vm}'s disk differs from the master's original");
    }
    let summary = lab.vm(master).console.text();
    let verified = summary
        .lines()
        .filter(|l| l.trim_end().ends_with(" verified") && l.contains("SLAVE-"))
        .count();
    assert_eq!(verified, 2, "{summary}");
}
