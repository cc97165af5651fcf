//! `lab deploy`, the one command CI runs on a golden image: the lab binary itself (what
//! `scripts/lab deploy` execs) on a small image that boots under BIOS and UEFI and prints a
//! marker, then with a text the image never prints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::fixtures::make_bootable_disk;
use diskcast_qemu_tests::project_root;
use std::path::Path;
use std::process::{Command, Output};

const MARKER: &str = "CI-IMAGE-BOOTED-OK";

fn lab_deploy(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_lab"))
        .arg("deploy")
        .args(args)
        .output()
        .expect("running lab deploy");
    eprintln!(
        "---- lab deploy {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn console(logs: &Path, vm: &str) -> String {
    std::fs::read_to_string(logs.join(format!("{vm}.console")))
        .unwrap_or_else(|e| panic!("{vm}'s console was not kept in {}: {e}", logs.display()))
}

/// The row of `vm` in the summary table, as cells.
fn summary_row(stdout: &str, vm: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .rfind(|cells| cells.first().is_some_and(|c| c == vm) && cells.len() == 7)
        .unwrap_or_else(|| panic!("no summary row for {vm} in:\n{stdout}"))
}

// One test: the cases must not run two labs at once.
#[test]
fn lab_deploy_command() {
    let dir = project_root().join(format!(
        "target/lab-runs/lab_deploy_command-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("ci-golden.raw");
    make_bootable_disk(&image, 40, MARKER);
    let image_arg = image.display().to_string();

    // A BIOS and a UEFI machine get the image, reboot, and boot it.
    let logs = dir.join("logs-ok");
    let ok = lab_deploy(&[
        "--image",
        &image_arg,
        "--vms",
        "2",
        "--firmware",
        "both",
        "--expect",
        MARKER,
        // Both VMs print it within a minute of their copy: a lost marker fails in minutes.
        "--timeout",
        "150",
        "--logs",
        &logs.display().to_string(),
    ]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "lab deploy failed:\n{stdout}");
    for (vm, firmware) in [("vm1", "BIOS"), ("vm2", "UEFI")] {
        let row = summary_row(&stdout, vm);
        assert_eq!(row[1], firmware, "{row:?}");
        assert_eq!(row[3], "yes", "{vm} not verified: {row:?}");
        assert_eq!(row[6], "yes", "{vm} did not print the marker: {row:?}");
        let text = console(&logs, vm);
        let done = text
            .find("DISKCAST-SLAVE-DONE")
            .unwrap_or_else(|| panic!("{vm}: no verified copy on its console"));
        assert!(
            text[done..].contains(MARKER),
            "{vm}: the marker is not after the copy"
        );
        // Slaves show their progress on their console: percent, rate and repairs, to the end
        // (this small image is copied between two refreshes).
        let last = text
            .lines()
            .rfind(|l| l.starts_with("slave: 100.0%") && l.contains(" repair"))
            .unwrap_or_else(|| panic!("{vm}: no final progress line with rate and repairs"));
        let rate: f64 = last
            .split(", ")
            .find_map(|part| part.strip_suffix(" MB/s"))
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("{vm}: no rate in {last:?}"));
        assert!(rate > 0.0, "{vm}: {last:?}");
    }
    assert!(
        std::fs::read_to_string(logs.join("bootserver-0.log"))
            .unwrap()
            .contains("boots its local disk"),
        "the bootserver's log was not kept"
    );
    assert!(stdout.contains("lab deploy: OK"), "{stdout}");

    // Text the image never prints: a failure naming the machine, kept short by --timeout; the
    // machine did boot its disk (its console shows the image's own marker).
    let logs = dir.join("logs-missing");
    let missing = lab_deploy(&[
        "--image",
        &image_arg,
        "--expect",
        "TEXT-THE-IMAGE-NEVER-PRINTS",
        "--timeout",
        "60",
        "--logs",
        &logs.display().to_string(),
    ]);
    assert_eq!(missing.status.code(), Some(1), "{:?}", missing.status);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("lab deploy: FAILED: vm1 (52:54:00:dc:00:41)")
            && stderr.contains("\"TEXT-THE-IMAGE-NEVER-PRINTS\" never appeared")
            && stderr.contains("within 60 s (--timeout)"),
        "{stderr}"
    );
    let row = summary_row(&String::from_utf8_lossy(&missing.stdout), "vm1");
    assert_eq!((row[3].as_str(), row[6].as_str()), ("yes", "no"), "{row:?}");
    assert!(
        console(&logs, "vm1").contains(MARKER),
        "vm1 did not boot its disk within --timeout: the case tests nothing"
    );

    // A command line that cannot work is refused before any machine starts.
    let bad = lab_deploy(&["--image", &dir.join("missing.raw").display().to_string()]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("missing.raw"));
    // Not root (a CI job as an ordinary user): told so before anything starts.
    let user = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_lab"))
        .args(["deploy", "--image", &image_arg])
        .output()
        .unwrap();
    assert_eq!(user.status.code(), Some(2), "{user:?}");
    assert!(
        String::from_utf8_lossy(&user.stderr).contains("run it as root"),
        "{user:?}"
    );
    let _ = std::fs::remove_file(&image);
}
