//! HTTPS for the API (`[https]`): the self-signed certificate made once and kept, curl and the
//! agent over TLS, the pin checked before any token or disk byte leaves the agent, plain HTTP
//! refusing credentials while still serving boot files. Processes in private namespaces; one
//! QEMU test boots a machine whose agent (PID 1) captures and reports over HTTPS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{
    lab_file, make_source_disk, output_of, spawn_agent, DhcpMode, Firmware, Lab, VmSpec,
    BOOT_TIMEOUT,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

const HTTPS: &str = "https://10.77.0.1:8443";

/// `bootserver key https`: the certificate's SHA-256 fingerprint.
fn fingerprint(lab: &Lab) -> String {
    let out = Command::new(lab_file("bootserver"))
        .args(["key", "https", "--config"])
        .arg(lab.dir.join("bootserver.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What OpenSSL says the certificate's fingerprint is, in our spelling.
fn openssl_fingerprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let (_, colons) = text.trim().split_once('=').unwrap();
    colons.replace(':', "").to_ascii_lowercase()
}

/// curl in the lab: status code and body.
fn curl(lab: &Lab, args: &[&str]) -> (u16, String) {
    let out = lab
        .command_in_lab("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn store_files(lab: &Lab) -> Vec<PathBuf> {
    match std::fs::read_dir(lab.dir.join("state/images")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn capture(host: &str, source: &Path, to: &str, extra: &[&str], token: &str) -> Child {
    let mut args = vec!["capture", "--to", to, "--name", "golden", "--token", token];
    args.extend_from_slice(extra);
    spawn_agent(host, &args, Some(source))
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn https_api_with_a_pinned_self_signed_certificate() {
    let mut lab = Lab::new("https_api");
    let config = lab.bootserver_config(DhcpMode::Full, "[https]\nport = 8443\n");
    lab.start_bootserver_with(&config);
    let host = lab.add_host("ref", "10.77.0.10/24");
    let source = lab.dir.join("reference.img");
    make_source_disk(&source, 32);
    let admin = lab.bootserver_cli(&["token"]).trim().to_string();
    let bearer = format!("Authorization: Bearer {admin}");

    // One fingerprint, whoever computes it: `key https`, the server's log, OpenSSL.
    let pin = fingerprint(&lab);
    let cert = lab.dir.join("state/https-cert.pem");
    assert_eq!(openssl_fingerprint(&cert), pin);
    assert!(
        lab.bootserver_log(0).contains(&pin),
        "the log names the fingerprint"
    );

    // curl trusts the generated certificate for the server's address.
    let cacert = cert.to_str().unwrap();
    let (status, body) = curl(
        &lab,
        &[
            "--cacert",
            cacert,
            "-H",
            &bearer,
            &format!("{HTTPS}/api/v1/tasks"),
        ],
    );
    assert_eq!(status, 200, "{body}");
    // A console login over HTTPS gets a cookie the browser keeps off plain HTTP.
    let login = lab
        .command_in_lab("curl")
        .args([
            "-sS",
            "-i",
            "--cacert",
            cacert,
            "-H",
            "Content-Type: application/json",
        ])
        .args(["--data", &format!(r#"{{"token":"{admin}"}}"#)])
        .arg(format!("{HTTPS}/api/v1/login"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&login.stdout).to_ascii_lowercase();
    assert!(
        head.contains("set-cookie: diskcast-console=") && head.contains("; secure"),
        "{head}"
    );

    // Plain HTTP: boot files and open reads as before; a token, a login or a write is refused
    // with the https:// URL.
    let plain = "http://10.77.0.1:8080";
    let (status, _) = curl(&lab, &["-o", "/dev/null", &format!("{plain}/boot/vmlinuz")]);
    assert_eq!(status, 200);
    let (status, _) = curl(&lab, &[&format!("{plain}/status")]);
    assert_eq!(status, 200);
    for (what, args) in [
        (
            "token",
            vec!["-H", &bearer, "http://10.77.0.1:8080/api/v1/tasks"],
        ),
        (
            "login",
            vec!["--data", "{}", "http://10.77.0.1:8080/api/v1/login"],
        ),
        (
            "cookie",
            vec![
                "-b",
                "diskcast-console=abc",
                "http://10.77.0.1:8080/api/v1/me",
            ],
        ),
    ] {
        let (status, body) = curl(&lab, &args);
        assert_eq!(status, 403, "{what}: {body}");
        assert!(
            body.contains("only over HTTPS") && body.contains(HTTPS),
            "{what}: {body}"
        );
    }

    // The boot contract: a machine's iPXE script (plain HTTP) tells its agent the HTTPS port and
    // the pin.
    lab.task(&["capture", "52:54:00:dc:00:10", "--image", "booted"]);
    let (status, script) = curl(&lab, &[&format!("{plain}/boot/52-54-00-dc-00-10.ipxe")]);
    assert_eq!(status, 200, "{script}");
    assert!(
        script.contains("diskcast.https_port=8443")
            && script.contains(&format!("diskcast.pin={pin}")),
        "{script}"
    );

    // A wrong pin: the agent stops after the handshake; the server never sees the upload.
    let wrong = "00".repeat(31) + "01";
    let out = output_of(
        capture(&host, &source, HTTPS, &["--pin", &wrong], &admin),
        "capture, wrong pin",
    );
    assert!(!out.status.success());
    assert!(
        said(&out).contains(&format!("fingerprint {pin}, not the pinned {wrong}")),
        "{}",
        said(&out)
    );
    assert!(!lab.bootserver_log(0).contains("receiving image"));
    assert!(store_files(&lab).is_empty(), "{:?}", store_files(&lab));

    // The token over plain HTTP: refused, and the agent is told where to go.
    let out = output_of(
        capture(&host, &source, "10.77.0.1:8080", &[], &admin),
        "capture in clear",
    );
    assert!(!out.status.success());
    assert!(said(&out).contains(HTTPS), "{}", said(&out));
    assert!(store_files(&lab).is_empty(), "{:?}", store_files(&lab));

    // The right pin: stored and verified.
    let out = output_of(
        capture(&host, &source, HTTPS, &["--pin", &pin], &admin),
        "capture over HTTPS",
    );
    assert!(out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("stored image golden"), "{}", said(&out));
    let verify = Command::new(lab_file("bootserver"))
        .args(["images", "--config"])
        .arg(lab.dir.join("bootserver.toml"))
        .args(["verify", "golden"])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", said(&verify));
    // A CA file works as well as a pin (the certificate names the server's address).
    let out = output_of(
        spawn_agent(
            &host,
            &[
                "capture", "--to", HTTPS, "--ca", cacert, "--name", "golden", "--token", &admin,
            ],
            Some(&source),
        ),
        "capture with --ca",
    );
    assert!(
        said(&out).contains("already exists"),
        "the TLS part worked, the store refused the name: {}",
        said(&out)
    );

    // A restart keeps the certificate: pinned agents keep working.
    lab.kill_bootserver(0);
    let n = lab.start_bootserver_with(&config);
    assert_eq!(fingerprint(&lab), pin);
    lab.bootservers_console(n)
        .wait_for(&pin, Duration::from_secs(5))
        .unwrap();
    let (status, body) = curl(
        &lab,
        &["--cacert", cacert, &format!("{HTTPS}/api/v1/images")],
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("golden"), "{body}");
}

#[test]
fn a_network_booted_capture_uploads_and_reports_over_https() {
    let mut lab = Lab::new("https_capture");
    let reference_disk = lab.dir.join("reference.img");
    make_source_disk(&reference_disk, 64);
    let config = lab.bootserver_config(DhcpMode::Full, "[https]\nport = 8443\n");
    lab.start_bootserver_with(&config);
    lab.task(&["capture", "52:54:00:dc:00:10", "--image", "golden"]);
    let reference = lab.boot_vm(
        VmSpec::new("reference", Firmware::Bios, "virtio-net-pci", 0x10).disk_from(
            &reference_disk,
            "REF-1",
            "virtio-blk-pci",
        ),
    );
    lab.expect_done_and_off(
        &[reference],
        "DISKCAST-CAPTURE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    let verify = Command::new(lab_file("bootserver"))
        .args(["images", "--config"])
        .arg(&config)
        .args(["verify", "golden"])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", said(&verify));
    // The task reached "verified" through the agent's reports, which plain HTTP would refuse.
    let tasks = lab.bootserver_cli(&["tasks", "--all"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.contains("capture as golden") && l.contains("verified")),
        "{tasks}"
    );
    let log = lab.bootserver_log(0);
    assert!(
        !log.contains("in clear"),
        "a request went over plain HTTP:\n{log}"
    );
}
