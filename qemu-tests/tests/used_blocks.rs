//! Used-block imaging of a used lab disk (GPT with FAT32, ext4 and NTFS, each with the garbage
//! of deleted files in its free space) onto slaves whose disks are 1.5 times larger: only the
//! used blocks are captured, stored and sent, and every copy comes out with its GPT fitted to
//! its disk, clean file systems and every file intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::fixtures::{check_used_copy, make_used_disk, UsedDisk};
use diskcast_qemu_tests::{DhcpMode, Firmware, Lab, VmSpec, BOOT_TIMEOUT};
use std::time::Duration;

const SOURCE_MIB: u64 = 208;
const SLAVE_MIB: u64 = SOURCE_MIB * 3 / 2;

/// Two bare slaves (`slave1`, `slave2`, the MACs of [`Lab::slave_macs`]) with 1.5x disks.
fn boot_large_slaves(lab: &mut Lab) -> Vec<usize> {
    (1..=2u8)
        .map(|i| {
            lab.boot_vm(
                VmSpec::new(
                    &format!("slave{i}"),
                    Firmware::Bios,
                    "virtio-net-pci",
                    0x20 + i,
                )
                .disk(SLAVE_MIB, &format!("SLAVE-{i}"), "virtio-blk-pci"),
            )
        })
        .collect()
}

/// Slave 1 was asked to grow its last partition, slave 2 not: both must be correct copies.
fn check_slaves(lab: &Lab, source: &UsedDisk) {
    for (vm, grown) in [("slave1", true), ("slave2", false)] {
        let disk = lab.disk_path(vm, 0);
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), SLAVE_MIB << 20);
        check_used_copy(&disk, source, grown);
        eprintln!("{vm}: GPT fitted, file systems clean, every file intact (grown: {grown})");
    }
}

#[test]
fn used_blocks_to_larger_disk() {
    let mut lab = Lab::new("used_blocks_cs");
    let source_path = lab.dir.join("used.img");
    let source = make_used_disk(&source_path, SOURCE_MIB, 1);
    let tool_used = source.tool_used_bytes(&source_path);
    let garbage: u64 = source.partitions.iter().map(|p| p.garbage).sum();

    lab.start_bootserver(DhcpMode::Full, "");
    lab.task(&["capture", "52:54:00:dc:00:10", "--image", "used"]);
    let reference = lab.boot_vm(
        VmSpec::new("reference", Firmware::Bios, "virtio-net-pci", 0x10).disk_from(
            &source_path,
            "USED-1",
            "virtio-blk-pci",
        ),
    );
    lab.expect_done_and_off(
        &[reference],
        "DISKCAST-CAPTURE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    let images: serde_json::Value = serde_json::from_str(&lab.api_get("/api/v1/images")).unwrap();
    let image = &images[0];
    let used = image["used_bytes"].as_u64().unwrap();
    let data = image["data_bytes"].as_u64().unwrap();
    eprintln!(
        "disk {} bytes: the file systems' tools say {tool_used} used, {garbage} deleted; \
         the image holds {used} used bytes, {data} of data",
        source.size
    );
    // Chunks are 1 MiB: each used region may round up by one chunk at either end.
    let slack = tool_used / 20 + 6 * (1 << 20);
    assert!(
        used <= tool_used + slack,
        "the image keeps {used} bytes for {tool_used} used: garbage was captured"
    );
    assert!(
        used >= tool_used,
        "the image keeps less than the file systems use"
    );
    assert!(data + garbage / 2 < source.size, "garbage was captured");

    lab.task(&[
        "deploy",
        "used",
        "--to",
        "52:54:00:dc:00:21",
        "--grow-last-partition",
    ]);
    lab.task(&["deploy", "used", "--to", "52:54:00:dc:00:22"]);
    let slaves = boot_large_slaves(&mut lab);
    lab.expect_done_and_off(
        &slaves,
        "DISKCAST-SLAVE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    check_slaves(&lab, &source);
    // The GPT was fitted after the copy verified, and the slave said how much it skipped.
    let console = lab.vm(slaves[0]).console.text();
    assert!(console.contains("skipped as unused"), "{console}");
}

#[test]
fn used_blocks_to_larger_disk_p2p() {
    let mut lab = Lab::new("used_blocks_p2p");
    let source_path = lab.dir.join("used.img");
    let source = make_used_disk(&source_path, SOURCE_MIB, 2);
    lab.start_bootserver(DhcpMode::Full, "");
    // The master signs with a key of its own; the slaves' tasks trust it.
    let key = diskcast_proto::trust::SigningKey::from_seed([0x43; 32]);
    let trusted = key.public().to_string();
    lab.task(&[
        "receive",
        "--to",
        "52:54:00:dc:00:21",
        "--grow-last-partition",
        "--trust",
        &trusted,
    ]);
    lab.task(&["receive", "--to", "52:54:00:dc:00:22", "--trust", &trusted]);
    let master = lab.boot_vm(
        VmSpec::new("master", Firmware::Bios, "virtio-net-pci", 0x10)
            .disk_from(&source_path, "USED-2", "virtio-blk-pci")
            .kernel(&format!(
                "console=ttyS0,115200 panic=-1 diskcast.role=master diskcast.min_receivers=2 \
                 diskcast.on_done=poweroff diskcast.on_error=poweroff diskcast.sign={}",
                key.secret_hex()
            )),
    );
    let slaves = boot_large_slaves(&mut lab);
    lab.expect_done_and_off(
        &[master],
        "DISKCAST-MASTER-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    lab.expect_done_and_off(&slaves, "DISKCAST-SLAVE-DONE", Duration::from_secs(60));
    let console = lab.vm(master).console.text();
    assert!(console.contains("unused and skipped"), "{console}");
    check_slaves(&lab, &source);
}
