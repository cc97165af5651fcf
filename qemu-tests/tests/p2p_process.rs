//! Process tests of a multicast session: `agent send` and `agent receive` as real processes in
//! private network namespaces (one host each, on a bridge), with image files as disks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{make_key, output_of as wait, spawn_agent, Lab, Noise};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A disk image with what real disks hold: zero regions, random data, repetitive text.
fn make_image(path: &Path, mib: usize, seed: u64) {
    let mut noise = Noise::new(seed);
    let mut image = vec![0u8; mib << 20];
    for (i, block) in image.chunks_mut(64 << 10).enumerate() {
        match i % 5 {
            0 => {}
            1 => block
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"lab machine data "[j % 17]),
            _ => noise.fill(block),
        }
    }
    std::fs::write(path, image).unwrap();
}

#[test]
fn p2p_send_to_three_receivers_one_with_5_percent_loss() {
    let mut lab = Lab::new("p2p_three_receivers");
    let sender = lab.add_host("snd", "10.77.0.10/24");
    let receivers: Vec<String> = (1..=3)
        .map(|i| lab.add_host(&format!("rx{i}"), &format!("10.77.0.{}/24", 10 + i)))
        .collect();
    Lab::add_ingress_loss(&receivers[0], 5.0);
    let source = lab.dir.join("source.img");
    make_image(&source, 48, 7);
    // One receiver writes over an old, different image: the zero regions must come out zero.
    let targets: Vec<PathBuf> = (1..=3)
        .map(|i| lab.dir.join(format!("target{i}.img")))
        .collect();
    make_image(&targets[2], 48, 99);
    let key = lab.dir.join("sender.key");
    let public = make_key(&key);

    let rx: Vec<_> = receivers
        .iter()
        .zip(&targets)
        .enumerate()
        .map(|(i, (ns, target))| {
            spawn_agent(
                ns,
                &[
                    "receive",
                    "--interface",
                    "eth0",
                    "--name",
                    &format!("rx{}", i + 1),
                    "--wait",
                    "60",
                    "--trust",
                    &public,
                ],
                Some(target),
            )
        })
        .collect();
    let send = spawn_agent(
        &sender,
        &[
            "send",
            "--interface",
            "eth0",
            "--min-receivers",
            "3",
            "--start-timeout",
            "60",
            "--rate",
            "200",
            "--key",
            key.to_str().unwrap(),
        ],
        Some(&source),
    );
    let send_out = wait(send, "sender");
    let rx_out: Vec<Output> = rx
        .into_iter()
        .enumerate()
        .map(|(i, c)| wait(c, &format!("receiver {}", i + 1)))
        .collect();

    assert!(send_out.status.success(), "sender failed");
    let summary = String::from_utf8_lossy(&send_out.stdout);
    assert_eq!(summary.matches("verified").count(), 3, "{summary}");
    let expected = std::fs::read(&source).unwrap();
    for (i, (out, target)) in rx_out.iter().zip(&targets).enumerate() {
        assert!(out.status.success(), "receiver {} failed", i + 1);
        assert!(
            std::fs::read(target).unwrap() == expected,
            "receiver {}'s copy differs from the source",
            i + 1
        );
    }
    // The lossy receiver needed repairs; the report says so.
    let lossy_line = summary
        .lines()
        .find(|l| l.trim_start().starts_with("rx1 "))
        .expect("rx1 in the summary");
    let repairs: u64 = lossy_line
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert!(repairs > 0, "{lossy_line}");
    drop(lab);
}

#[test]
fn p2p_receiver_refuses_a_too_small_disk_and_the_sender_fails_it() {
    let mut lab = Lab::new("p2p_too_small");
    let sender = lab.add_host("snd", "10.77.0.10/24");
    let receiver = lab.add_host("rx1", "10.77.0.11/24");
    let source = lab.dir.join("source.img");
    make_image(&source, 8, 3);
    // A loop device smaller than the image plays the too-small disk.
    let backing = lab.dir.join("small.img");
    std::fs::write(&backing, vec![0xa5u8; 4 << 20]).unwrap();
    let loop_dev = String::from_utf8(
        Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    assert!(
        loop_dev.starts_with("/dev/loop"),
        "losetup gave {loop_dev:?}"
    );
    let rx = spawn_agent(
        &receiver,
        // Unsigned on purpose: this test is about the size check, which --trust-any keeps.
        &[
            "receive",
            "--interface",
            "eth0",
            "--wait",
            "60",
            "--trust-any",
            &loop_dev,
        ],
        None,
    );
    let send = spawn_agent(
        &sender,
        &[
            "send",
            "--interface",
            "eth0",
            "--min-receivers",
            "1",
            "--start-timeout",
            "5",
        ],
        Some(&source),
    );
    let send_out = wait(send, "sender");
    let rx_out = wait(rx, "receiver");
    let untouched = std::fs::read(&backing).unwrap().iter().all(|&b| b == 0xa5);
    let _ = Command::new("losetup").args(["-d", &loop_dev]).status();
    assert!(!rx_out.status.success());
    assert!(String::from_utf8_lossy(&rx_out.stderr).contains("too small"));
    assert!(
        !send_out.status.success(),
        "the sender must not report success"
    );
    assert!(String::from_utf8_lossy(&send_out.stdout).contains("too small"));
    assert!(untouched, "nothing may be written to a too-small disk");
    std::thread::sleep(Duration::from_millis(10));
}

/// A loop device over a file, detached when dropped (also when the test fails).
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn over(backing: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .unwrap();
        let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(path.starts_with("/dev/loop"), "losetup gave {path:?}");
        LoopDevice { path }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

#[test]
fn used_blocks_to_larger_block_devices() {
    use diskcast_qemu_tests::fixtures::{check_used_copy, make_used_disk};
    let mut lab = Lab::new("p2p_used_blocks");
    let sender = lab.add_host("snd", "10.77.0.10/24");
    let receivers: Vec<String> = (1..=2)
        .map(|i| lab.add_host(&format!("rx{i}"), &format!("10.77.0.{}/24", 10 + i)))
        .collect();
    let source_path = lab.dir.join("used.img");
    let source = make_used_disk(&source_path, 208, 3);
    // Disks 1.5x larger, holding old bytes that unused ranges keep.
    let backings: Vec<PathBuf> = (1..=2)
        .map(|i| {
            let path = lab.dir.join(format!("large{i}.img"));
            make_image(&path, 312, 40 + i);
            path
        })
        .collect();
    let devices: Vec<LoopDevice> = backings.iter().map(|b| LoopDevice::over(b)).collect();
    let key = lab.dir.join("sender.key");
    let public = make_key(&key);
    let rx: Vec<_> = receivers
        .iter()
        .zip(&devices)
        .enumerate()
        .map(|(i, (ns, device))| {
            let mut args = vec![
                "receive",
                "--interface",
                "eth0",
                "--wait",
                "60",
                "--trust",
                &public,
            ];
            // One grows its last partition, the other discards what the image skipped.
            args.push(if i == 0 {
                "--grow-last-partition"
            } else {
                "--discard"
            });
            args.push(&device.path);
            spawn_agent(ns, &args, None)
        })
        .collect();
    let send = spawn_agent(
        &sender,
        &[
            "send",
            "--interface",
            "eth0",
            "--min-receivers",
            "2",
            "--start-timeout",
            "60",
            "--key",
            key.to_str().unwrap(),
        ],
        Some(&source_path),
    );
    let send_out = wait(send, "sender");
    let rx_out: Vec<Output> = rx
        .into_iter()
        .enumerate()
        .map(|(i, c)| wait(c, &format!("receiver {}", i + 1)))
        .collect();
    drop(devices);
    assert!(send_out.status.success(), "sender failed");
    let send_log = String::from_utf8_lossy(&send_out.stderr);
    let image_line = send_log
        .lines()
        .find(|l| l.contains("unused and skipped"))
        .unwrap_or_else(|| panic!("no image line in:\n{send_log}"));
    eprintln!("{image_line}");
    for (i, out) in rx_out.iter().enumerate() {
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "receiver {} failed:\n{log}", i + 1);
        assert!(log.contains("skipped as unused"), "{log}");
        assert!(log.contains("backup header moved"), "{log}");
    }
    check_used_copy(&backings[0], &source, true);
    check_used_copy(&backings[1], &source, false);
    // Both disks held random bytes: only the discarding one has the skipped ranges zeroed (a
    // loop device punches holes in its file).
    let zero_mib = |path: &Path| {
        std::fs::read(path)
            .unwrap()
            .chunks(1 << 20)
            .take(208)
            .filter(|c| c.iter().all(|&b| b == 0))
            .count()
    };
    let (kept, discarded) = (zero_mib(&backings[0]), zero_mib(&backings[1]));
    eprintln!("all-zero MiB in the image's range: {kept} without --discard, {discarded} with");
    assert!(discarded >= kept + 100, "{kept} vs {discarded}");
}

#[test]
fn rogue_sender_refused() {
    // Two hosts on the LAN announce sessions on the same group and port before the real sender
    // does: one signs with a key of its own, one signs nothing. The receivers trust only the
    // real sender's key.
    let mut lab = Lab::new("rogue_sender");
    let real = lab.add_host("real", "10.77.0.10/24");
    let rogues: Vec<String> = (1..=2)
        .map(|i| lab.add_host(&format!("rogue{i}"), &format!("10.77.0.{}/24", 30 + i)))
        .collect();
    let receivers: Vec<String> = (1..=2)
        .map(|i| lab.add_host(&format!("rx{i}"), &format!("10.77.0.{}/24", 10 + i)))
        .collect();
    let source = lab.dir.join("source.img");
    make_image(&source, 24, 5);
    let rogue_image = lab.dir.join("rogue.img");
    make_image(&rogue_image, 24, 66);
    let real_key = lab.dir.join("real.key");
    let trusted = make_key(&real_key);
    let rogue_key = lab.dir.join("rogue.key");
    make_key(&rogue_key);
    // The receivers' disks hold old data: a single block of the rogue's would show.
    let targets: Vec<PathBuf> = (1..=2)
        .map(|i| {
            let path = lab.dir.join(format!("target{i}.img"));
            make_image(&path, 24, 90 + i);
            path
        })
        .collect();

    let rogue_args = |key: Option<&Path>| {
        let mut args = vec![
            "send".to_string(),
            "--interface".into(),
            "eth0".into(),
            "--min-receivers".into(),
            "1".into(),
            // Long enough to be refused: the receivers listen from 2 s, the real session ends
            // about 3 s later.
            "--start-timeout".into(),
            "12".into(),
        ];
        if let Some(key) = key {
            args.extend(["--key".into(), key.display().to_string()]);
        }
        args
    };
    let signed_args = rogue_args(Some(&rogue_key));
    let unsigned_args = rogue_args(None);
    let rogue_procs: Vec<_> = [signed_args, unsigned_args]
        .iter()
        .zip(&rogues)
        .map(|(args, ns)| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn_agent(ns, &args, Some(&rogue_image))
        })
        .collect();
    // The rogues announce for a while before anyone listens.
    std::thread::sleep(Duration::from_secs(2));
    let rx: Vec<_> = receivers
        .iter()
        .zip(&targets)
        .map(|(ns, target)| {
            spawn_agent(
                ns,
                &[
                    "receive",
                    "--interface",
                    "eth0",
                    "--wait",
                    "60",
                    "--trust",
                    &trusted,
                ],
                Some(target),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let send = spawn_agent(
        &real,
        &[
            "send",
            "--interface",
            "eth0",
            "--min-receivers",
            "2",
            "--start-timeout",
            "60",
            "--rate",
            "50",
            "--key",
            real_key.to_str().unwrap(),
        ],
        Some(&source),
    );
    let send_out = wait(send, "real sender");
    let rx_out: Vec<Output> = rx
        .into_iter()
        .enumerate()
        .map(|(i, c)| wait(c, &format!("receiver {}", i + 1)))
        .collect();
    let rogue_out: Vec<Output> = rogue_procs
        .into_iter()
        .enumerate()
        .map(|(i, c)| wait(c, &format!("rogue {}", i + 1)))
        .collect();

    assert!(send_out.status.success(), "the real session failed");
    let summary = String::from_utf8_lossy(&send_out.stdout);
    assert_eq!(summary.matches("verified").count(), 2, "{summary}");
    let expected = std::fs::read(&source).unwrap();
    for (i, (out, target)) in rx_out.iter().zip(&targets).enumerate() {
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "receiver {} failed", i + 1);
        assert!(
            std::fs::read(target).unwrap() == expected,
            "receiver {}'s copy is not the real sender's image",
            i + 1
        );
        // It said why it refused each rogue, and counted what it dropped.
        assert!(log.contains("is unsigned"), "{log}");
        assert!(
            log.contains("not signed by a key this receiver trusts"),
            "{log}"
        );
        assert!(!log.contains(" 0 untrusted announcements refused"), "{log}");
    }
    // Each rogue failed, and its summary names the receivers that refused it.
    for (i, out) in rogue_out.iter().enumerate() {
        let summary = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "rogue {} reported success", i + 1);
        assert!(
            summary.contains("2 receiver(s) refused this session"),
            "rogue {}: {summary}",
            i + 1
        );
    }
}
