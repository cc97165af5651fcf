//! The bootserver's deploy sessions serve relays (process test, no QEMU): the server on subnet
//! A runs the session of a deploy task; a router forwards unicast and no multicast to subnet
//! B, where a relay (`agent relay`, named as a machine booted with `diskcast.role=relay` names
//! itself) subscribes to the session's relay port and re-multicasts it to a far receiver. The
//! far copy is the image, the relay's task is verified, and the server's sessions API lists the
//! relay and its local receiver.
//!
//! A task can name its relay (`task deploy --relay MAC`): the server's boot contract gives that
//! machine the relay role, the agents run what the contracts say, and the far machines' tasks
//! end in the registry from what the relay reported (verified; failed for one that never came).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diskcast_qemu_tests::{make_striped_image, output_of as wait, spawn_agent, DhcpMode, Lab};
use std::time::Duration;

const RELAY_MAC: &str = "52:54:00:dc:00:60";
const FAR_MAC: &str = "52:54:00:dc:00:61";
const RELAY_PORT: u16 = 7790;

/// Subnet B behind a router that forwards IPv4 but no multicast: a relay host and a far
/// receiver host on it, the image to deploy and the far receiver's disk (other bytes).
struct FarSubnet {
    relay_ns: String,
    far_ns: String,
    golden: std::path::PathBuf,
    far_disk: std::path::PathBuf,
}

trait WithFarSubnet {
    fn with_far_subnet(self) -> (Lab, FarSubnet);
}

impl WithFarSubnet for Lab {
    fn with_far_subnet(mut self) -> (Lab, FarSubnet) {
        self.add_subnet("br1");
        // The router namespace lives as long as the lab (it deletes its namespaces).
        let _router = self.add_router("router", "br1", "10.77.0.254/24", "10.78.0.1/24");
        let relay_ns = self.add_host_on("relay", "10.78.0.2/24", "br1", &["default via 10.78.0.1"]);
        let far_ns = self.add_host_on("far1", "10.78.0.11/24", "br1", &["default via 10.78.0.1"]);
        let dir = self.dir.clone();
        let golden = dir.join("golden.img");
        make_striped_image(&golden, 16, 5);
        let far_disk = dir.join("far1.img");
        make_striped_image(&far_disk, 16, 77);
        let far = FarSubnet {
            relay_ns,
            far_ns,
            golden,
            far_disk,
        };
        (self, far)
    }
}

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
/// (which issues the task's token) and report that it booted. Returns the kernel command line
/// the script boots the agent with (its boot contract).
fn boot_agent_of(lab: &Lab, mac: &str) -> String {
    let script = lab.api_get(&format!("/boot/{mac}.ipxe"));
    let (task, token) = (word(&script, "task"), word(&script, "token"));
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
    script
        .lines()
        .find(|l| l.starts_with("kernel "))
        .unwrap_or_else(|| panic!("no kernel line in the boot script:\n{script}"))
        .to_string()
}

#[test]
fn a_deploy_session_serves_a_relay_across_a_router_without_multicast_routing() {
    let (mut lab, far) = Lab::new("bs_relay").with_far_subnet();
    let FarSubnet {
        relay_ns,
        far_ns,
        golden,
        far_disk,
    } = far;

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
    let _ = boot_agent_of(&lab, RELAY_MAC);
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

/// `diskcast.KEY=` of a kernel command line (or a boot script holding one), as the agent
/// would read it.
fn word_or<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("diskcast.{key}=")))
}

fn word<'a>(cmdline: &'a str, key: &str) -> &'a str {
    word_or(cmdline, key).unwrap_or_else(|| panic!("no diskcast.{key} in the contract: {cmdline}"))
}

/// The tasks of `mac` once its latest one is final (verified, failed, ...), polled through the
/// API for up to two minutes.
fn final_task_of(lab: &Lab, mac: &str) -> serde_json::Value {
    let mut last = Vec::new();
    for _ in 0..480 {
        last = tasks_of(lab, mac);
        if let Some(t) = last.first() {
            if !["pending", "booted", "running"].contains(&t["state"].as_str().unwrap_or("")) {
                return t.clone();
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "{mac}'s task never ended: {last:#?}\n{}",
        lab.bootserver_log(0)
    );
}

#[test]
fn a_task_names_its_relay_and_the_far_machines_tasks_end_through_it() {
    const RELAY: &str = "52:54:00:dc:00:70";
    const FAR1: &str = "52:54:00:dc:00:71";
    // On subnet B too, but never boots: its task must end failed, never verified.
    const FAR2: &str = "52:54:00:dc:00:72";
    const PORT: u16 = 7791;
    let (mut lab, far) = Lab::new("bs_relay_task").with_far_subnet();
    let FarSubnet {
        relay_ns,
        far_ns,
        golden,
        far_disk,
    } = far;

    // Subnet B is behind the router; where its machines sit is known from their reservations
    // (as it would be from their first DHCP through the router).
    lab.start_bootserver(
        DhcpMode::Proxy,
        &format!(
            "\n[[image]]\nname = \"golden\"\nrelay_port = {PORT}\nstart_timeout = 20\n\
             [[subnet]]\nnetwork = \"10.78.0.0/24\"\nrouter = \"10.78.0.1\"\n\
             [[subnet.reservation]]\nmac = \"{RELAY}\"\naddress = \"10.78.0.2\"\n\
             [[subnet.reservation]]\nmac = \"{FAR1}\"\naddress = \"10.78.0.11\"\n\
             [[subnet.reservation]]\nmac = \"{FAR2}\"\naddress = \"10.78.0.12\"\n"
        ),
    );
    lab.bootserver_cli(&["images", "import", &golden.display().to_string(), "golden"]);

    // A relay nobody knows is refused, saying so, and creates nothing.
    let refused = Lab::in_host(&lab.netns, &diskcast_qemu_tests::lab_file("bootserver"))
        .args(["task", "--config"])
        .arg(lab.dir.join("bootserver.toml"))
        .args([
            "deploy",
            "golden",
            "--to",
            FAR1,
            "--relay",
            "52:54:00:dc:00:7f",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr).into_owned()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("relay 52:54:00:dc:00:7f is unknown"),
        "{said}"
    );
    assert!(
        tasks_of(&lab, FAR1).is_empty(),
        "a refused task was created"
    );

    let created = lab.task(&[
        "deploy",
        "golden",
        "--to",
        &format!("{FAR1},{FAR2}"),
        "--relay",
        RELAY,
    ]);
    assert!(created.contains("through relay"), "{created}");

    // The relay boots with the contract the server serves it: the relay role, the session's
    // relay port at the server, the server's key, its subnet's two machines to wait for.
    let relay_line = boot_agent_of(&lab, RELAY);
    assert_eq!(word(&relay_line, "role"), "relay", "{relay_line}");
    assert_eq!(
        word(&relay_line, "upstream"),
        format!("{}:{PORT}", lab.server_ip),
        "{relay_line}"
    );
    assert_eq!(word(&relay_line, "min_receivers"), "2", "{relay_line}");
    assert!(
        !relay_line.contains("diskcast.role=slave") && !relay_line.contains("diskcast.grow"),
        "{relay_line}"
    );
    let far_line = boot_agent_of(&lab, FAR1);
    assert_eq!(word(&far_line, "role"), "slave", "{far_line}");
    lab.bootservers_console(0)
        .wait_for(
            &format!("relays on port {PORT}, waiting for 1 machine(s)"),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("no session for the relay: {e}\n{}", lab.bootserver_log(0)));

    // The agents run what their contracts say, as the booted machines would (PID 1 names a
    // relay `relay MAC` and a slave by its MAC; the interface is the one that got an address).
    let group_of = |line: &str| {
        // The default group and port are not written out.
        (
            word_or(line, "group")
                .unwrap_or("239.255.77.77")
                .to_string(),
            word_or(line, "port").unwrap_or("7744").to_string(),
        )
    };
    let (far_group, far_port) = group_of(&far_line);
    let far = spawn_agent(
        &far_ns,
        &[
            "receive",
            "--interface",
            "eth0",
            "--group",
            &far_group,
            "--port",
            &far_port,
            "--name",
            FAR1,
            "--wait",
            "120",
            "--trust",
            word(&far_line, "trust"),
        ],
        Some(&far_disk),
    );
    let (relay_group, relay_port) = group_of(&relay_line);
    assert_eq!((&relay_group, &relay_port), (&far_group, &far_port));
    let relay = spawn_agent(
        &relay_ns,
        &[
            "relay",
            "--upstream",
            word(&relay_line, "upstream"),
            "--interface",
            "eth0",
            "--group",
            &relay_group,
            "--port",
            &relay_port,
            "--name",
            &format!("relay {RELAY}"),
            "--min-receivers",
            word(&relay_line, "min_receivers"),
            "--start-timeout",
            word(&relay_line, "start_timeout"),
            "--trust",
            word(&relay_line, "trust"),
        ],
        None,
    );
    let relay_out = wait(relay, "relay");
    let far_out = wait(far, "far receiver");
    assert!(relay_out.status.success(), "the relay failed");
    assert!(far_out.status.success(), "the far receiver failed");
    assert!(
        std::fs::read(&far_disk).unwrap() == std::fs::read(&golden).unwrap(),
        "the far copy differs from the image"
    );

    // The registry: the far machine's task verified from the relay's report, the relay's
    // own task verified (it wrote nothing), the machine that never came failed with why.
    let far1 = final_task_of(&lab, FAR1);
    assert_eq!(far1["state"], "verified", "{far1:#}");
    let relay_task = final_task_of(&lab, RELAY);
    assert_eq!(relay_task["state"], "verified", "{relay_task:#}");
    let far2 = final_task_of(&lab, FAR2);
    assert_eq!(far2["state"], "failed", "{far2:#}");
    let reason = far2["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(&format!("its relay {RELAY}")) && reason.contains("never joined"),
        "{far2:#}"
    );
    let log = lab.bootserver_log(0);
    assert!(
        log.contains(&format!(
            "lab: {FAR1} verified its copy of golden through relay {RELAY}"
        )),
        "{log}"
    );
}
