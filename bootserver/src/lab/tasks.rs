//! Creating tasks: what `bootserver task ...` and `POST /api/v1/tasks` both do.

use super::boot::TaskOptions;
use super::{Lab, LabError};
use crate::config::valid_label;
use diskcast_proto::cmdline::DiskSelector;
use diskcast_proto::image_file::valid_image_name;
use diskcast_proto::mac::MacAddr;
use diskcast_registry::{NewTask, Task, TaskKind};
use serde::Deserialize;

/// What to create, as an admin asks for it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// `deploy`, `capture`, `inventory`, `receive`, `master`.
    pub kind: String,
    /// `deploy`: the stored image; `capture`: the name the image gets.
    #[serde(default)]
    pub image: Option<String>,
    /// Machines: `MAC`, `NAME` or `@GROUP`, several separated by commas.
    pub to: String,
    #[serde(default)]
    pub options: TaskOptions,
    /// Send Wake-on-LAN packets to the machines.
    #[serde(default)]
    pub wake: bool,
    /// Seconds of silence after which the task times out (default: the lab's).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// `deploy`: machines (MAC or name) that relay the session into their subnets, at most one
    /// per subnet; the task's machines on a relay's subnet join the session there (see
    /// `relays.rs`).
    #[serde(default)]
    pub relays: Vec<String>,
}

impl Lab {
    /// Creates one task per machine the request names, all or none, and wakes them if asked.
    /// Every machine named explicitly becomes known: naming it is the order.
    pub fn create_tasks(&self, request: &TaskRequest, now: u64) -> Result<Vec<Task>, LabError> {
        let kind = self.task_kind(request)?;
        check_options(&kind, &request.options)?;
        if matches!(kind, TaskKind::Receive)
            && request.options.trust.is_none()
            && self.config.security.trusted_keys.is_empty()
            && self.open_master_keys()?.is_empty()
        {
            return Err(LabError::Invalid(
                "a receive task's machines must know whose session to join: give the peer \
                 master's public key (--trust KEY: make-usb-stick prints the stick's), list it \
                 in [security] trusted_keys, create the master task first, or --trust-any"
                    .into(),
            ));
        }
        let macs = self.resolve_targets(&request.to)?;
        let relays = self.resolve_relays(&request.relays)?;
        if !relays.is_empty() && !matches!(kind, TaskKind::Deploy { .. }) {
            return Err(LabError::Invalid(format!(
                "relays are for deploy tasks (the server's sessions); a {} task names none",
                request.kind
            )));
        }
        let assignments = super::relays::assign(&relays, &macs, |mac| {
            self.place(mac).unwrap_or_else(|e| {
                log::warn!(
                    "lab: looking up where {mac} sits: {}",
                    diskcast_proto::error_chain(&e)
                );
                super::relays::Place::Unplaced
            })
        })?;
        if matches!(kind, TaskKind::Capture { .. } | TaskKind::Master) && macs.len() > 1 {
            return Err(LabError::OneMachineOnly {
                what: if matches!(kind, TaskKind::Master) {
                    "a master task"
                } else {
                    "a capture task"
                },
                count: macs.len(),
            });
        }
        for mac in macs.iter().chain(&relays) {
            let known = self.registry.machine(*mac)?.is_some_and(|m| m.known);
            if !known {
                self.registry.register(*mac, None, None, now)?;
            }
        }
        let json = |options: &TaskOptions| {
            serde_json::to_string(options)
                .map_err(|e| LabError::Invalid(format!("task options: {e}")))
        };
        let timeout_secs = request
            .timeout
            .unwrap_or(self.config.lab.task_timeout.as_secs())
            .max(60);
        let mut news = Vec::new();
        for mac in &macs {
            let relay = assignments.iter().find(|a| a.machines.contains(mac));
            let options = TaskOptions {
                relay: relay.map(|a| a.relay.to_string()),
                ..request.options.clone()
            };
            news.push(NewTask {
                mac: *mac,
                kind: kind.clone(),
                options: json(&options)?,
                timeout_secs,
            });
        }
        // A relay's task: the same image, the relay role (its disk options do not apply).
        for a in &assignments {
            let options = TaskOptions {
                relay_for: a.machines.iter().map(ToString::to_string).collect(),
                ..TaskOptions::default()
            };
            news.push(NewTask {
                mac: a.relay,
                kind: kind.clone(),
                options: json(&options)?,
                timeout_secs,
            });
        }
        let tasks: Vec<Task> = self
            .registry
            .create_tasks(news, now)?
            .into_iter()
            .map(|(task, _)| task)
            .collect();
        for task in &tasks {
            log::info!(
                "lab: task {} for {}: {}",
                task.id,
                task.mac,
                super::boot::task_label(task)
            );
        }
        if let TaskKind::Deploy { image } = &kind {
            let near: Vec<MacAddr> = macs
                .iter()
                .copied()
                .filter(|m| !assignments.iter().any(|a| a.machines.contains(m)))
                .collect();
            for warning in self.session_plan(image, &near).warnings {
                log::warn!("lab: {warning}");
            }
        }
        if request.wake {
            super::wake::wake(&self.config.interface, &macs)?;
        }
        Ok(tasks)
    }

    /// The machines `to` names (`MAC`, `NAME` or `@GROUP`, several separated by commas), each
    /// once, in order; at least one.
    pub fn resolve_targets(&self, to: &str) -> Result<Vec<MacAddr>, LabError> {
        let mut macs: Vec<MacAddr> = Vec::new();
        for target in to.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            for mac in self.registry.resolve(target)? {
                if !macs.contains(&mac) {
                    macs.push(mac);
                }
            }
        }
        if macs.is_empty() {
            return Err(LabError::Invalid(
                "no machine named: give MAC, NAME or @GROUP".into(),
            ));
        }
        Ok(macs)
    }

    fn task_kind(&self, request: &TaskRequest) -> Result<TaskKind, LabError> {
        let image = || -> Result<String, LabError> {
            match &request.image {
                Some(name) if valid_image_name(name) => Ok(name.clone()),
                Some(name) => Err(LabError::Invalid(format!(
                    "image {name:?} is not a valid image name ({})",
                    diskcast_proto::image_file::IMAGE_NAME_RULE
                ))),
                None => Err(LabError::Invalid(format!(
                    "a {} task needs an image",
                    request.kind
                ))),
            }
        };
        Ok(match request.kind.as_str() {
            "deploy" => {
                let image = image()?;
                if self.store.open_image(&image).is_err() {
                    return Err(LabError::NoImage { name: image });
                }
                TaskKind::Deploy { image }
            }
            "capture" => {
                let image = image()?;
                self.store.check_free(&image)?;
                TaskKind::Capture { image }
            }
            "inventory" => TaskKind::Inventory,
            "receive" => TaskKind::Receive,
            "master" => TaskKind::Master,
            other => {
                return Err(LabError::Invalid(format!(
                    "task kind {other:?} is not deploy, capture, inventory, receive or master"
                )))
            }
        })
    }
}

fn check_options(kind: &TaskKind, options: &TaskOptions) -> Result<(), LabError> {
    let reads = matches!(kind, TaskKind::Capture { .. } | TaskKind::Master);
    let writes = matches!(kind, TaskKind::Deploy { .. } | TaskKind::Receive);
    if options.all_blocks && !reads {
        return Err(LabError::Invalid(
            "all_blocks is for capture and master tasks (what is read)".into(),
        ));
    }
    if options.grow_last_partition && !writes {
        return Err(LabError::Invalid(
            "grow_last_partition is for deploy and receive tasks (what is written)".into(),
        ));
    }
    if let Some(disk) = &options.disk {
        let one_word = !disk.is_empty() && disk.bytes().all(|b| b.is_ascii_graphic());
        if !one_word || DiskSelector::parse(disk).is_none() {
            return Err(LabError::Invalid(format!(
                "disk {disk:?} is not {}",
                DiskSelector::EXPECTED
            )));
        }
    }
    if options.relay.is_some() || !options.relay_for.is_empty() {
        return Err(LabError::Invalid(
            "relay and relay_for are set by the server from the task's relays (`--relay MAC`, \
             `\"relays\": [...]`), not given as options"
                .into(),
        ));
    }
    if options.min_receivers == Some(0) {
        return Err(LabError::Invalid("min_receivers must be at least 1".into()));
    }
    if let Some(trust) = &options.trust {
        if !matches!(kind, TaskKind::Receive) {
            return Err(LabError::Invalid(
                "trust is for receive tasks (whose peer master they join); deploy sessions are signed by the server"
                    .into(),
            ));
        }
        parse_task_trust(trust)?;
    }
    Ok(())
}

/// A receive task's `trust` option: `any`, or public keys separated by commas.
pub fn parse_task_trust(text: &str) -> Result<diskcast_proto::trust::Trust, LabError> {
    if text == "any" {
        return Ok(diskcast_proto::trust::Trust::Any);
    }
    let keys = diskcast_proto::trust::parse_key_list(text)
        .map_err(|e| LabError::Invalid(format!("trust {text:?}: {e}")))?;
    if keys.is_empty() {
        return Err(LabError::Invalid(
            "trust needs a public key (64 hex digits) or `any`".into(),
        ));
    }
    Ok(diskcast_proto::trust::Trust::Keys(keys))
}

/// A name or group given to a machine: what the registry accepts, checked before it is asked.
pub fn check_label(what: &str, text: &str) -> Result<(), LabError> {
    if valid_label(text) {
        Ok(())
    } else {
        Err(LabError::Invalid(format!(
            "{what} {text:?} is not 1 to 64 letters, digits, `.`, `_` or `-` (and not a MAC address)"
        )))
    }
}
