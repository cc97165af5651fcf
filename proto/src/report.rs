//! What the agent tells the bootserver about the task it runs (`POST /api/v1/agent/report`,
//! JSON), and the inventory it sends once booted. Both sides serialize these same types.

use crate::mac::MacAddr;
use serde::{Deserialize, Serialize};

/// One report. `task` and `token` come from the kernel command line; a machine the server
/// boots for inventory without a task (an unknown machine, when the lab says so) reports with
/// `task: None` and the discovery token the server gave it for its MAC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    pub mac: MacAddr,
    pub task: Option<u64>,
    pub token: String,
    #[serde(flatten)]
    pub step: ReportStep,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum ReportStep {
    /// The agent is up; what the machine has.
    Booted { inventory: InventoryReport },
    /// The disk the task works on.
    DiskChosen { disk: String },
    /// It joined the multicast session.
    Joined,
    Progress {
        percent: f64,
        mb_per_s: f64,
        repairs: u64,
    },
    /// The task's work is done and checked (a copy verified, a capture stored).
    Verified,
    /// It failed; the error chain as the console shows it.
    Failed { reason: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReport {
    pub disks: Vec<DiskReport>,
    pub nics: Vec<NicReport>,
    /// PCI network and storage controllers no loaded driver claimed, each with its IDs and the
    /// module that would drive it.
    pub unclaimed_network_controllers: Vec<String>,
    /// `firmware uefi secure_boot=on lockdown=integrity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// PCI network and storage controllers: IDs, class, mode (AHCI, NVMe, RAID, Intel VMD),
    /// driver.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    pub name: String,
    pub size_bytes: u64,
    pub logical_block: u32,
    pub model: String,
    pub serial: String,
    pub removable: bool,
    pub boot_medium: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicReport {
    pub name: String,
    pub mac: String,
    pub driver: String,
    pub link: bool,
}

/// Longest report body the server reads: an inventory of hundreds of disks fits.
pub const MAX_REPORT_BYTES: usize = 256 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_as_json_with_the_step_named() {
        let report = AgentReport {
            mac: "52:54:00:00:00:01".parse().unwrap(),
            task: Some(7),
            token: "ab".repeat(32),
            step: ReportStep::Progress {
                percent: 42.5,
                mb_per_s: 97.0,
                repairs: 3,
            },
        };
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"step\":\"progress\""), "{json}");
        assert_eq!(serde_json::from_str::<AgentReport>(&json).unwrap(), report);
        let booted = AgentReport {
            task: None,
            step: ReportStep::Booted {
                inventory: InventoryReport {
                    disks: vec![DiskReport {
                        name: "vda".into(),
                        size_bytes: 1 << 30,
                        logical_block: 512,
                        ..DiskReport::default()
                    }],
                    ..InventoryReport::default()
                },
            },
            ..report
        };
        let json = serde_json::to_string(&booted).unwrap();
        assert_eq!(serde_json::from_str::<AgentReport>(&json).unwrap(), booted);
        assert!(serde_json::from_str::<AgentReport>("{\"step\":\"exploded\"}").is_err());
    }
}
