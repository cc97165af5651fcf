//! The bootserver's deploy sessions serve relays (process test, no QEMU): the server on subnet
//! A runs the session of a deploy task; a router forwards unicast and no multicast to subnet
//! B, where a relay (`agent relay`, named as a machine booted with `diskcast.role=relay` names
//! itself) subscribes to the session's relay port and re-multicasts it to a far receiver. The
//! far copy is the image, the relay's task is verified, and the server's sessions API lists the
//! relay and its local receiver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{make_striped_image, output_of as wait, spawn_agent, DhcpMode, Lab};
use std::time::Duration;

const RELAY_MAC: &str = "52:54:00:dc:00:60";
const FAR_MAC: &str = "52:54:00:dc:00:61";
const RELAY_PORT: u16 = 7790;

fn tasks_of(lab: &Lab, mac: &str) -> Vec<serde_json::Value> {
    let tasks: serde_json::Value =
        serde_json::from_str(&lab.api_get("/api/v1/tasks?all=true")).unwrap();
    tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["mac"] == mac)
        .cloned()
        .collect()
}

/// What a machine's agent does when it network-boots for its task: fetch its iPXE script
/// (which issues the task's token) and report that it booted.
fn boot_agent_of(lab: &Lab, mac: &str) {
    let script = lab.api_get(&format!("/boot/{mac}.ipxe"));
    let word = |key: &str| -> String {
        script
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the boot script:\n{script}"))
            .to_string()
    };
    let (task, token) = (word("diskcast.task="), word("diskcast.token="));
    let report = format!(
        r#"{{"mac":"{mac}","task":{task},"token":"{token}","step":"booted","inventory":{{"disks":[],"nics":[],"unclaimed_network_controllers":[]}}}}"#
    );
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.netns,
            "curl",
            "-sS",
            "--fail-with-body",
        ])
        .args(["-H", "content-type: application/json", "--data", &report])
        .arg(format!("http://{}:8080/api/v1/agent/report", lab.server_ip))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the booted report was refused: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_deploy_session_serves_a_relay_across_a_router_without_multicast_routing() {
    let mut lab = Lab::new("bs_relay");
    lab.add_subnet("br1");
    let _router = lab.add_router("router", "br1", "10.77.0.254/24", "10.78.0.1/24");
    let relay_ns = lab.add_host_on("relay", "10.78.0.2/24", "br1", &["default via 10.78.0.1"]);
    let far_ns = lab.add_host_on("far1", "10.78.0.11/24", "br1", &["default via 10.78.0.1"]);
    let dir = lab.dir.clone();
    let golden = dir.join("golden.img");
    make_striped_image(&golden, 16, 5);
    let far_disk = dir.join("far1.img");
    make_striped_image(&far_disk, 16, 77);

    lab.start_bootserver(
        DhcpMode::Proxy,
        &format!("\n[[image]]\nname = \"golden\"\nrelay_port = {RELAY_PORT}\n"),
    );
    lab.bootserver_cli(&["images", "import", &golden.display().to_string(), "golden"]);
    // Agents the server boots trust its key; the hand-started relay and receiver are told it.
    let log = lab.bootserver_log(0);
    let public = log
        .split("the server's signing key is ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the server did not log its key:\n{log}"))
        .to_string();
    lab.task(&["deploy", "golden", "--to", RELAY_MAC]);
    boot_agent_of(&lab, RELAY_MAC);
    lab.bootservers_console(0)
        .wait_for(
            &format!("relays on port {RELAY_PORT}, waiting for 1 machine(s)"),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("no session: {e}\n{}", lab.bootserver_log(0)));

    // The far receiver listens on subnet B's group, which only the relay feeds; it is slow
    // (the relay's local rate), so the session is still running while the API is read.
    let far = spawn_agent(
        &far_ns,
        &[
            "receive",
            "--interface",
            "eth0",
            "--name",
            FAR_MAC,
            "--wait",
            "120",
            "--trust",
            &public,
        ],
        Some(&far_disk),
    );
    let relay = spawn_agent(
        &relay_ns,
        &[
            "relay",
            "--upstream",
            &format!("{}:{RELAY_PORT}", lab.server_ip),
            "--interface",
            "eth0",
            "--name",
            &format!("relay {RELAY_MAC}"),
            "--min-receivers",
            "1",
            "--start-timeout",
            "120",
            "--rate",
            "2",
            "--trust",
            &public,
        ],
        None,
    );

    // The session view lists the relay and, once the relay reported it, its local receiver.
    let mut seen = None;
    let mut last = String::new();
    for _ in 0..240 {
        last = lab.api_get("/api/v1/sessions");
        let sessions: serde_json::Value = serde_json::from_str(&last).unwrap();
        let golden = sessions
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["image"] == "golden")
            .cloned();
        if let Some(s) = golden {
            assert_eq!(s["relay_port"], RELAY_PORT, "{s:#}");
            let rows = s["receivers"].as_array().unwrap().clone();
            let relay_row = rows.iter().find(|r| r["relay"] == true);
            let far_row = rows.iter().find(|r| r["mac"] == FAR_MAC);
            if let (Some(relay_row), Some(far_row)) = (relay_row, far_row) {
                seen = Some((relay_row.clone(), far_row.clone()));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let relay_out = wait(relay, "relay");
    let far_out = wait(far, "far receiver");
    let (relay_row, far_row) =
        seen.unwrap_or_else(|| panic!("the API never listed the relay and its receiver: {last}"));
    assert_eq!(
        relay_row["mac"],
        format!("relay {RELAY_MAC}"),
        "{relay_row:#}"
    );
    assert_eq!(far_row["via"], format!("relay {RELAY_MAC}"), "{far_row:#}");
    assert_eq!(far_row["relay"], false, "{far_row:#}");

    assert!(relay_out.status.success(), "the relay failed");
    assert!(far_out.status.success(), "the far receiver failed");
    assert!(
        std::fs::read(&far_disk).unwrap() == std::fs::read(&golden).unwrap(),
        "the far copy differs from the image"
    );
    // The relay's task is verified by the server (from the session); the server's summary
    // names the far receiver behind the relay.
    let console = lab.bootservers_console(0);
    console
        .wait_for("lab: deploy golden:", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("no session summary: {e}\n{}", lab.bootserver_log(0)));
    let log = lab.bootserver_log(0);
    assert!(
        log.lines()
            .any(|l| l.contains("lab: deploy golden:") && l.contains(FAR_MAC)),
        "the summary does not name the far receiver:\n{log}"
    );
    let relay_tasks = tasks_of(&lab, RELAY_MAC);
    assert_eq!(relay_tasks.len(), 1, "{relay_tasks:#?}");
    assert_eq!(relay_tasks[0]["state"], "verified", "{relay_tasks:#?}");
}
