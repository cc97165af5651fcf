//! The web console in a real browser (headless Chromium through WebDriver, inside the lab's
//! namespace): live progress of a deploy to two QEMU machines, a task created by clicking, the
//! token guarding reads and writes; and the page at phone width.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::browser::{Browser, Viewport};
use diskcast_qemu_tests::{DhcpMode, Firmware, Lab, BOOT_TIMEOUT};
use std::path::Path;
use std::time::{Duration, Instant};

/// `curl` inside the lab: the HTTP status and the body.
fn curl(lab: &Lab, args: &[&str]) -> (u16, String) {
    let out = lab
        .command_in_lab("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

fn url(lab: &Lab, path: &str) -> String {
    format!("http://{}:8080{path}", lab.server_ip)
}

/// A 64 MiB disk with `random_mib` of incompressible data in the middle and zeros around it.
fn make_random_disk(path: &Path, random_mib: usize) {
    let mut disk = vec![0u8; 64 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for byte in &mut disk[(8 << 20)..((8 + random_mib) << 20)] {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    std::fs::write(path, disk).unwrap();
}

/// `[mac, value, state]` of every progress bar on the page.
const BARS: &str = "[...document.querySelectorAll('#progress-rows progress')].map(p => \
                    [p.dataset.mac, p.value, p.closest('tr').dataset.state])";

fn bars(value: &serde_json::Value) -> Vec<(String, f64, String)> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b[0].as_str().unwrap().to_string(),
                b[1].as_f64().unwrap(),
                b[2].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn web_console_shows_live_progress() {
    let mut lab = Lab::new("web_console_live");
    let golden = lab.dir.join("golden.img");
    make_random_disk(&golden, 16);
    // 1 MB/s: the copy takes long enough to watch; reads need the token too.
    lab.start_bootserver(
        DhcpMode::Full,
        "[[image]]\nname = \"golden\"\nrate = 1\n[security]\npublic_reads = false\n",
    );
    lab.bootserver_cli(&["images", "import", &golden.display().to_string(), "golden"]);
    let macs: Vec<String> = Lab::slave_macs(2).split(',').map(String::from).collect();
    for (i, mac) in macs.iter().enumerate() {
        let name = format!("slave{}", i + 1);
        lab.bootserver_cli(&["machines", "set", mac, "--name", &name, "--group", "room"]);
    }
    let token = lab.bootserver_cli(&["token"]).trim().to_string();

    // Without the token: nothing to read, nothing to write.
    let (status, body) = curl(&lab, &[&url(&lab, "/api/v1/machines")]);
    assert_eq!(status, 401, "{body}");
    let task = r#"{"kind":"inventory","to":"@room"}"#;
    let post = [
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        task,
    ];
    let (status, body) = curl(
        &lab,
        &[&post[..], &[url(&lab, "/api/v1/tasks").as_str()]].concat(),
    );
    assert_eq!(status, 401, "{body}");

    let browser = Browser::start(
        &lab,
        Viewport::Desktop {
            width: 1280,
            height: 900,
        },
    );
    browser.open("/");
    browser.wait_until(
        "!document.getElementById('login').hidden",
        Duration::from_secs(30),
    );
    assert_eq!(
        browser.eval("document.querySelectorAll('#machine-rows tr').length"),
        0,
        "machines shown before logging in"
    );
    browser.type_into("#token", &token);
    browser.click("#login button[type=submit]");
    browser.wait_until(
        "document.body.classList.contains('admin') && \
         document.querySelectorAll('#machine-rows tr').length === 2 && \
         [...document.querySelectorAll('#image option')].some(o => o.value === 'golden')",
        Duration::from_secs(30),
    );
    // The login cookie alone does not make a write (a page elsewhere could send it).
    let forged = browser.eval(
        "fetch('/api/v1/tasks', {method: 'POST', headers: {'Content-Type': 'application/json'}, \
         body: JSON.stringify({kind: 'inventory', to: '@room'})}).then(r => r.status)",
    );
    assert_eq!(forged, 401);

    // Deploy golden to both machines by clicking.
    browser.click("#select-all");
    browser.select("#kind", "deploy");
    browser.select("#image", "golden");
    browser.click("#create");
    browser.wait_until(
        "document.getElementById('sessions').innerText.includes('golden') && \
         document.querySelectorAll('#task-rows tr').length === 2",
        Duration::from_secs(30),
    );
    let (status, tasks) = curl(
        &lab,
        &[
            "-H",
            &format!("Authorization: Bearer {token}"),
            &url(&lab, "/api/v1/tasks"),
        ],
    );
    assert_eq!(status, 200, "{tasks}");
    let tasks: serde_json::Value = serde_json::from_str(&tasks).unwrap();
    assert_eq!(tasks.as_array().unwrap().len(), 2, "{tasks:#}");
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["kind"]["image"] == "golden" && t["state"] == "pending"),
        "{tasks:#}"
    );

    // The machines boot into their tasks; the page shows their copies growing.
    let slaves = lab.boot_bare_slaves(Firmware::Bios, "virtio-net-pci", 2);
    let both_receiving = format!(
        "(() => {{ const b = {BARS}; return b.length === 2 && \
         b.every(([, v, s]) => s === 'receiving' && v > 0 && v < 90) && b; }})()"
    );
    let first = bars(&browser.wait_until(&both_receiving, BOOT_TIMEOUT + Duration::from_secs(300)));
    let row_text = browser.eval("document.querySelector('#progress-rows tr').innerText");
    // The second read: once every bar moved past its first value (no fixed pause, so a slow
    // host waits longer instead of failing); a bar that never grows fails here.
    let grown: Vec<String> = first
        .iter()
        .map(|(mac, before, _)| format!("b.some(([m, v]) => m === '{mac}' && v > {before})"))
        .collect();
    let second = bars(&browser.wait_until(
        &format!(
            "(() => {{ const b = {BARS}; return b.length === 2 && {} && b; }})()",
            grown.join(" && ")
        ),
        Duration::from_secs(300),
    ));
    eprintln!("progress bars: {first:?} then {second:?}; a row: {row_text}");
    for (mac, before, _) in &first {
        let (_, after, state) = second.iter().find(|(m, _, _)| m == mac).unwrap();
        assert!(
            after > before,
            "{mac}: the bar went from {before} to {after} ({state})"
        );
    }
    assert!(
        row_text.as_str().unwrap().contains("receiving"),
        "{row_text}"
    );
    browser.wait_until(
        &format!("(() => {{ const b = {BARS}; return b.length === 2 && b.every(([, v, s]) => s === 'verified' && v === 100); }})()"),
        Duration::from_secs(300),
    );
    let shot = lab.dir.join("console-desktop.png");
    browser.screenshot(&shot);
    eprintln!("screenshot: {}", shot.display());
    lab.expect_done_and_off(
        &slaves,
        "DISKCAST-SLAVE-DONE",
        BOOT_TIMEOUT + Duration::from_secs(300),
    );
    for (vm, same) in lab.first_disks_equal(&["slave1", "slave2"], &golden) {
        assert!(same, "{vm}'s disk is not the image");
    }
}

/// Takes task `mac`'s boot (its script carries the agent's token) and reports `steps` as its
/// agent would.
fn report_as_agent(lab: &Lab, mac: &str, steps: &[serde_json::Value]) {
    let (status, script) = curl(lab, &[&url(lab, &format!("/boot/{mac}.ipxe"))]);
    assert_eq!(status, 200, "{script}");
    let word = |key: &str| {
        script
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {script}"))
            .to_string()
    };
    let (task, token) = (word("diskcast.task="), word("diskcast.token="));
    for step in steps {
        let mut report = step.clone();
        report["mac"] = mac.into();
        report["task"] = task.parse::<u64>().unwrap().into();
        report["token"] = token.clone().into();
        let (status, body) = curl(
            lab,
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                &report.to_string(),
                &url(lab, "/api/v1/agent/report"),
            ],
        );
        assert_eq!(status, 204, "{report}: {body}");
    }
}

#[test]
fn web_console_fits_a_phone() {
    // No virtual machine: machines are registered, and two agents' reports are sent as an
    // agent sends them.
    let mut lab = Lab::new("web_console_phone");
    let golden = lab.dir.join("golden.img");
    make_random_disk(&golden, 1);
    lab.start_bootserver(DhcpMode::Full, "");
    lab.bootserver_cli(&["images", "import", &golden.display().to_string(), "golden"]);
    let machines = [
        ("52:54:00:dc:00:41", "room-2-physics-workstation-41"),
        ("52:54:00:dc:00:42", "pc-42"),
        ("52:54:00:dc:00:43", "pc-43"),
        ("52:54:00:dc:00:44", "pc-44"),
    ];
    for (mac, name) in machines {
        lab.bootserver_cli(&["machines", "set", mac, "--name", name, "--group", "physics"]);
    }
    lab.task(&[
        "deploy",
        "golden",
        "--to",
        "pc-42,room-2-physics-workstation-41",
    ]);
    lab.task(&["capture", "pc-43", "--image", "pc43-disk"]);
    lab.task(&["inventory", "--to", "pc-44"]);
    let inventory = serde_json::json!({
        "disks": [{"name": "vda", "size_bytes": 68_719_476_736u64, "logical_block": 512,
                   "model": "QEMU HARDDISK", "serial": "DC-VIRTIO-64G", "removable": false,
                   "boot_medium": false}],
        "nics": [{"name": "eth0", "mac": "52:54:00:dc:00:43", "driver": "virtio_net", "link": true}],
        "unclaimed_network_controllers": []
    });
    report_as_agent(
        &lab,
        "52:54:00:dc:00:43",
        &[
            serde_json::json!({"step": "booted", "inventory": inventory}),
            serde_json::json!({"step": "disk_chosen", "disk": "vda"}),
            serde_json::json!({"step": "progress", "percent": 42.5, "mb_per_s": 11.2, "repairs": 3}),
        ],
    );
    report_as_agent(
        &lab,
        "52:54:00:dc:00:44",
        &[
            serde_json::json!({"step": "booted", "inventory": inventory}),
            serde_json::json!({"step": "failed", "reason":
                "choosing the disk: several internal disks and no diskcast.disk: vda (serial \
                 DISK-A-0123456789, 64.0 GiB), sda (serial DISK-B-9876543210, 80.0 GiB); name one \
                 with `bootserver machines set pc-44 --disk serial:SERIAL`"}),
        ],
    );

    let browser = Browser::start(
        &lab,
        Viewport::Phone {
            width: 390,
            height: 844,
        },
    );
    browser.open("/");
    browser.wait_until(
        "document.querySelectorAll('#progress-rows tr').length === 4 && \
         document.querySelector('#progress-rows tr[data-mac=\"52:54:00:dc:00:43\"] progress').value === 42.5 && \
         document.getElementById('sessions').innerText.includes('golden') && \
         document.querySelectorAll('#image-rows tr').length === 1",
        Duration::from_secs(30),
    );
    // How long a change made elsewhere (the admin's command) takes to show: the registry is
    // looked at twice a second, then the page reads the API again.
    let started = Instant::now();
    lab.bootserver_cli(&["machines", "set", "pc-42", "--name", "pc-42-renamed"]);
    let command = started.elapsed();
    browser.wait_until(
        "document.getElementById('machine-rows').innerText.includes('pc-42-renamed')",
        Duration::from_secs(30),
    );
    eprintln!(
        "a rename by `bootserver machines set` showed in the page {:.2} s after the command ended",
        (started.elapsed() - command).as_secs_f64()
    );

    let layout = browser.eval(
        "(() => {
            const rows = [...document.querySelectorAll('#progress-rows tr')].map(tr => {
                const r = tr.getBoundingClientRect();
                const bar = tr.querySelector('progress').getBoundingClientRect();
                const cells = [...tr.querySelectorAll('td')].filter(td => getComputedStyle(td).display !== 'none');
                return {
                    left: r.left, right: r.right, bar: bar.width, barRight: bar.right,
                    font: parseFloat(getComputedStyle(tr.querySelector('.v')).fontSize),
                    clipped: cells.filter(td => td.scrollWidth > td.clientWidth + 1).length,
                    labels: cells.map(td => getComputedStyle(td, '::before').content).join(' '),
                    text: tr.innerText,
                };
            });
            return {
                width: window.innerWidth,
                scrollWidth: document.documentElement.scrollWidth,
                bodyWidth: document.body.scrollWidth,
                rows,
            };
        })()",
    );
    eprintln!("phone layout: {layout:#}");
    let shot = lab.dir.join("console-phone.png");
    browser.screenshot(&shot);
    eprintln!("screenshot: {}", shot.display());
    for section in ["machines", "tasks", "images"] {
        browser.eval(&format!(
            "document.getElementById('{section}').scrollIntoView() || true"
        ));
        browser.screenshot(&lab.dir.join(format!("console-phone-{section}.png")));
    }
    let width = layout["width"].as_f64().unwrap();
    assert_eq!(width, 390.0, "the phone viewport");
    assert!(
        layout["scrollWidth"].as_f64().unwrap() <= width
            && layout["bodyWidth"].as_f64().unwrap() <= width,
        "the page scrolls sideways: {layout:#}"
    );
    for row in layout["rows"].as_array().unwrap() {
        assert!(
            row["left"].as_f64().unwrap() >= 0.0 && row["right"].as_f64().unwrap() <= width,
            "a row leaves the screen: {row:#}"
        );
        assert!(
            row["bar"].as_f64().unwrap() >= 150.0 && row["barRight"].as_f64().unwrap() <= width,
            "a bar too small to read: {row:#}"
        );
        assert!(row["font"].as_f64().unwrap() >= 12.0, "{row:#}");
        assert_eq!(row["clipped"], 0, "cut-off text: {row:#}");
        let labels = row["labels"].as_str().unwrap();
        assert!(
            labels.contains("\"Progress\"") && labels.contains("\"State\""),
            "unlabelled: {row:#}"
        );
    }
    let rows: Vec<&str> = layout["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    assert!(
        rows.iter()
            .any(|t| t.contains("pc-43") && t.contains("42.5 %") && t.contains("11.2")),
        "{rows:#?}"
    );
    assert!(
        rows.iter().any(|t| t.contains("pc-44")
            && t.contains("failed")
            && t.contains("DISK-B-9876543210")),
        "the reason is not shown whole: {rows:#?}"
    );
}
