//! Telling the bootserver how the task goes (`POST /api/v1/agent/report`): booted with this
//! hardware, this disk chosen, joined, progress, verified, failed and why. A report that does not
//! get through is logged, never fatal: the imaging itself must not depend on the server's API.

use crate::http_client::Endpoint;
use crate::inventory::Inventory;
use diskcast_proto::cmdline::BootConfig;
use diskcast_proto::mac::MacAddr;
use diskcast_proto::report::{AgentReport, DiskReport, InventoryReport, NicReport, ReportStep};
use std::time::{Duration, Instant};

/// Where and as whom this agent reports; `None` when it runs no task of a bootserver's.
#[derive(Debug, Clone)]
pub struct Reporter {
    server: Endpoint,
    mac: MacAddr,
    task: u64,
    token: String,
}

/// The path reports go to.
pub const REPORT_PATH: &str = "/api/v1/agent/report";
const TIMEOUT: Duration = Duration::from_secs(5);
/// Progress is reported at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Reporter {
    pub fn new(config: &BootConfig, mac: &str) -> Option<Self> {
        let task = config.task.as_ref()?;
        let server = config.server?;
        Some(Self {
            server: crate::pid1::api_endpoint(config, server),
            mac: mac.parse().ok()?,
            task: task.id,
            token: task.token.clone(),
        })
    }

    /// Sends one report; final ones (verified, failed) are tried a few times.
    pub fn send(&self, step: ReportStep) {
        let attempts = match step {
            ReportStep::Verified | ReportStep::Failed { .. } => 3,
            _ => 1,
        };
        let report = AgentReport {
            mac: self.mac,
            task: Some(self.task),
            token: self.token.clone(),
            step,
        };
        let Ok(json) = serde_json::to_string(&report) else {
            return;
        };
        for attempt in 1..=attempts {
            match crate::http_client::post_json(&self.server, REPORT_PATH, &json, TIMEOUT) {
                Ok((status, _)) if status < 300 => return,
                Ok((status, body)) => {
                    log::warn!(
                        "report to {}: the server answered {status}: {body}",
                        self.server
                    );
                    return;
                }
                Err(e) if attempt < attempts => {
                    log::debug!("report to {}: {e}; trying again", self.server);
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => log::warn!(
                    "report to {} did not get through: {}",
                    self.server,
                    diskcast_proto::error_chain(&e)
                ),
            }
        }
    }
}

/// Progress reports at most every few seconds.
#[derive(Debug)]
pub struct Throttle {
    last: Option<Instant>,
}

impl Throttle {
    pub fn new() -> Self {
        Self { last: None }
    }

    /// True when a report is due now (and counts it as sent).
    pub fn due(&mut self) -> bool {
        let due = self.last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
        if due {
            self.last = Some(Instant::now());
        }
        due
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

/// The inventory as reports carry it.
pub fn inventory_report(inventory: &Inventory, unclaimed: Vec<String>) -> InventoryReport {
    InventoryReport {
        disks: inventory
            .disks
            .iter()
            .map(|d| DiskReport {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
                logical_block: d.logical_block_size,
                model: d.model.clone(),
                serial: d.serial.clone(),
                removable: d.removable,
                boot_medium: d.boot_medium,
            })
            .collect(),
        nics: inventory
            .nics
            .iter()
            .map(|n| NicReport {
                name: n.name.clone(),
                mac: n.mac.clone(),
                driver: n.driver.clone(),
                link: n.link,
            })
            .collect(),
        unclaimed_network_controllers: unclaimed,
        platform: None,
        controllers: Vec::new(),
    }
}
