//! What a machine boots when its iPXE asks for its script: the agent for its open task, or its
//! local disk.

use super::{Lab, LabError};
use crate::config::{LocalBoot, UefiChain, UnknownMachines};
use crate::ipxe::BootScript;
use diskcast_proto::cmdline::{Blocks, BootConfig, DiskSelector, Role, TaskRef};
use diskcast_proto::mac::MacAddr;
use diskcast_proto::trust::{PublicKey, Trust};
use diskcast_registry::{Firmware, NewTask, Sighting, Task, TaskKind, Via};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// What a task was created with, beyond its kind: kept as JSON in the registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskOptions {
    /// The disk to work on (`serial:...`, `name:...`, `size:...`, `only`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// `master`: receivers to wait for, seconds to wait, MB/s at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_receivers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    /// `capture`, `master`: read every block, not only those the file systems use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_blocks: bool,
    /// `deploy`, `receive`: on a disk larger than the image, extend the last GPT partition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grow_last_partition: bool,
    /// `receive`: whose peer session the machines join: public keys separated by commas, or
    /// `any` (besides `[security] trusted_keys` and open master tasks' keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<String>,
    /// `deploy`, set by `--relay`: the machine sits behind this relay (its subnet's) and joins
    /// the session there; the session learns its result from the relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// `deploy`, set by `--relay`: this machine is the relay of its subnet for these machines.
    /// It boots the relay role and writes no disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relay_for: Vec<String>,
}

impl TaskOptions {
    /// A task's options as stored (checked when it was made). What a machine boots is decided
    /// from [`Self::read`] instead: options this server cannot read (a damaged row, or a newer
    /// diskcast's on a shared registry) must never turn a relay's task into one that writes its
    /// disk; for labels and grouping, unreadable options mean none.
    pub fn of(task: &Task) -> Self {
        Self::read(task).unwrap_or_default()
    }

    /// A task's options as stored, or why this server cannot read them.
    pub fn read(task: &Task) -> Result<Self, serde_json::Error> {
        serde_json::from_str(&task.options)
    }

    /// The task makes its machine a relay (it writes no disk).
    pub fn is_relay(&self) -> bool {
        !self.relay_for.is_empty()
    }
}

fn blocks(options: &TaskOptions) -> Blocks {
    if options.all_blocks {
        Blocks::All
    } else {
        Blocks::Used
    }
}

/// The answer to one machine's boot.
#[derive(Debug, Clone, PartialEq)]
pub enum BootPlan {
    /// The agent, carrying out `task`.
    Agent { task: Task, agent: Box<BootConfig> },
    /// No task: its local disk, by these methods on BIOS and UEFI.
    Local {
        bios: LocalBoot,
        uefi: LocalBoot,
        why: &'static str,
    },
}

impl Lab {
    /// The public keys of open master tasks (each signs with a key derived for it).
    pub fn open_master_keys(&self) -> Result<Vec<PublicKey>, LabError> {
        Ok(self
            .registry
            .tasks(diskcast_registry::TaskFilter {
                open_only: true,
                ..Default::default()
            })?
            .into_iter()
            .filter(|t| matches!(t.kind, TaskKind::Master))
            .map(|t| self.master_key(t.id).public())
            .collect())
    }

    /// Whose session a receive task's machine joins: the task's keys (or anyone), the
    /// config's trusted keys, and the open master tasks' keys.
    fn receive_trust(&self, options: &TaskOptions) -> Trust {
        let mut keys = match options.trust.as_deref().map(super::tasks::parse_task_trust) {
            Some(Ok(Trust::Any)) => return Trust::Any,
            Some(Ok(Trust::Keys(keys))) => keys,
            // Checked when the task was made.
            Some(Err(_)) | None => Vec::new(),
        };
        keys.extend(self.config.security.trusted_keys.iter().copied());
        match self.open_master_keys() {
            Ok(masters) => keys.extend(masters),
            Err(e) => log::error!(
                "lab: listing master tasks: {}",
                diskcast_proto::error_chain(&e)
            ),
        }
        keys.dedup();
        Trust::Keys(keys)
    }

    /// Decides what `mac` boots now (and records that it asked).
    pub fn boot_plan(&self, mac: MacAddr, now: u64) -> Result<BootPlan, LabError> {
        self.boot_plan_at(mac, now, self.server_ip)
    }

    /// [`Self::boot_plan`] for a machine that reaches the server at `server`.
    pub fn boot_plan_at(
        &self,
        mac: MacAddr,
        now: u64,
        server: Ipv4Addr,
    ) -> Result<BootPlan, LabError> {
        let machine = match self.registry.machine(mac)? {
            Some(machine) => machine,
            None => self.registry.observe(
                mac,
                Sighting {
                    firmware: Firmware::Unknown,
                    address: None,
                    via: Via::Ipxe,
                },
                now,
            )?,
        };
        let task = match self.registry.open_task_for(mac)? {
            Some(task) => Some(task),
            // A machine nobody registered is never given work that writes; the lab may want to
            // know what it has, once.
            None if !machine.known
                && self.config.lab.unknown_machines == UnknownMachines::Inventory
                && machine.inventory.is_none() =>
            {
                let (task, _) = self.registry.create_task(
                    NewTask {
                        mac,
                        kind: TaskKind::Inventory,
                        options: "{}".into(),
                        timeout_secs: self.config.lab.task_timeout.as_secs(),
                    },
                    now,
                )?;
                log::info!("lab: {mac} is unknown: inventory task {} for it", task.id);
                Some(task)
            }
            None => None,
        };
        let Some(task) = task else {
            let (bios, uefi) = self.local_boot(mac, machine.local_boot.as_deref());
            let why = if machine.known {
                "no task for this machine"
            } else {
                "this machine is not registered: nothing of it is touched"
            };
            return Ok(BootPlan::Local { bios, uefi, why });
        };
        let options = match TaskOptions::read(&task) {
            Ok(options) => options,
            Err(e) => {
                // Booting the agent with options half understood could write a disk nobody
                // ordered written (a relay's task read as a plain deploy): the local disk, and
                // the reason in the log, until the task is cancelled or this server updated.
                log::error!(
                    "lab: task {} of {mac} has options this server cannot read ({e}): {mac} \
                     boots its local disk; cancel the task, or update this server",
                    task.id
                );
                let (bios, uefi) = self.local_boot(mac, machine.local_boot.as_deref());
                return Ok(BootPlan::Local {
                    bios,
                    uefi,
                    why: "its task's options cannot be read by this server: nothing is written",
                });
            }
        };
        let token = self.registry.issue_token(task.id)?;
        let mut agent = self.agent_for(
            &task,
            &options,
            machine.disk.as_deref(),
            token.into_string(),
        );
        agent.server = Some(server);
        // A relay subscribes at the address its subnet reaches the server at.
        if let Some(upstream) = agent.upstream.as_mut() {
            upstream.set_ip(server);
        }
        Ok(BootPlan::Agent {
            task,
            agent: Box::new(agent),
        })
    }

    fn local_boot(&self, mac: MacAddr, registered: Option<&str>) -> (LocalBoot, LocalBoot) {
        match registered.and_then(LocalBoot::parse) {
            Some(method) => (method, method),
            None => self.config.local_boot(mac),
        }
    }

    /// The agent's settings for `task`: the role its kind means, where to report.
    fn agent_for(
        &self,
        task: &Task,
        options: &TaskOptions,
        machine_disk: Option<&str>,
        token: String,
    ) -> BootConfig {
        let a = &self.config.agent;
        let disk = options
            .disk
            .as_deref()
            .or(machine_disk)
            .and_then(DiskSelector::parse)
            .unwrap_or_else(|| a.disk.clone());
        let mut agent = BootConfig {
            role: Role::Inventory,
            server: Some(self.server_ip),
            on_error: a.on_error,
            on_done: a.on_done,
            log_level: a.log_level,
            disk,
            group: a.group,
            port: a.port,
            store_port: self.config.http_port,
            // With HTTPS on, reports and uploads carry their token over TLS to the pinned
            // certificate only (plain HTTP refuses them).
            https: self.https,
            task: Some(TaskRef {
                id: task.id as u64,
                token,
            }),
            ..BootConfig::default()
        };
        match &task.kind {
            TaskKind::Deploy { image } if options.is_relay() => {
                // The relay of its subnet: it receives the session by unicast from the
                // server's relay port and re-multicasts it on the same group and port, where
                // the task's machines of that subnet join it as if the server were local. It
                // waits for them (then, after the session's start timeout, starts with whoever
                // joined). No disk is chosen or written in this role.
                let session = self.image_session(image);
                agent.role = Role::Relay;
                agent.group = session.group;
                agent.port = session.port;
                agent.upstream = Some(std::net::SocketAddrV4::new(
                    self.server_ip,
                    crate::config::relay_port_for(session.group, session.relay_port),
                ));
                agent.min_receivers = options.relay_for.len().max(1) as u32;
                let start_timeout = session
                    .start_timeout
                    .unwrap_or(self.config.lab.start_timeout);
                agent.start_timeout_secs =
                    Some(u32::try_from(start_timeout.as_secs()).unwrap_or(u32::MAX));
                agent.rate_mbps = session.rate.map(|r| (r.mbps().ceil() as u32).max(1));
                agent.trust = Some(Trust::Keys(vec![self.key.public()]));
            }
            TaskKind::Deploy { image } => {
                let session = self.image_session(image);
                agent.role = Role::Slave;
                agent.group = session.group;
                agent.port = session.port;
                agent.grow_last_partition = options.grow_last_partition;
                // The server signs its deploy sessions; nobody else's are joined.
                agent.trust = Some(Trust::Keys(vec![self.key.public()]));
            }
            TaskKind::Receive => {
                agent.role = Role::Slave;
                agent.grow_last_partition = options.grow_last_partition;
                agent.trust = Some(self.receive_trust(options));
            }
            TaskKind::Capture { image } => {
                agent.role = Role::Capture;
                agent.image = Some(image.clone());
                agent.blocks = blocks(options);
            }
            TaskKind::Master => {
                agent.role = Role::Master;
                agent.sign = Some(self.master_key(task.id));
                agent.blocks = blocks(options);
                agent.min_receivers = options.min_receivers.unwrap_or(a.min_receivers).max(1);
                agent.start_timeout_secs = options.start_timeout.or(a.start_timeout_secs);
                agent.rate_mbps = options.rate.or(a.rate_mbps);
                agent.ttl = a.ttl;
            }
            TaskKind::Inventory => {}
        }
        agent
    }

    /// What `mac` would boot now, changing nothing (no token issued, no task created): for
    /// `bootserver script`.
    pub fn preview_script(&self, mac: MacAddr) -> Result<String, LabError> {
        let base_url = format!("http://{}:{}", self.server_ip, self.config.http_port);
        let machine = self.registry.machine(mac)?;
        let known = machine.as_ref().is_some_and(|m| m.known);
        match self.registry.open_task_for(mac)? {
            Some(task) => {
                let options = TaskOptions::of(&task);
                let disk = machine.as_ref().and_then(|m| m.disk.as_deref());
                // The real token is issued when the machine boots.
                let agent = self.agent_for(&task, &options, disk, "0".repeat(64));
                Ok(format!(
                    "# task {} ({}); the token is issued when the machine boots\n{}",
                    task.id,
                    task_label(&task),
                    BootScript {
                        base_url,
                        mac: mac.to_string(),
                        kernel_args: self.config.boot.kernel_args.clone(),
                        agent,
                    }
                    .render()
                ))
            }
            None => {
                let (bios, uefi) =
                    self.local_boot(mac, machine.as_ref().and_then(|m| m.local_boot.as_deref()));
                let why = if known {
                    "no task for this machine"
                } else if self.config.lab.unknown_machines == UnknownMachines::Inventory {
                    "unknown: it would run an inventory first"
                } else {
                    "this machine is not registered: nothing of it is touched"
                };
                Ok(local_boot_script(&base_url, why, bios, uefi))
            }
        }
    }

    /// The iPXE script for `mac`.
    pub fn boot_script(&self, mac: MacAddr, now: u64) -> Result<String, LabError> {
        self.boot_script_at(mac, now, self.server_ip)
    }

    /// The iPXE script for `mac`, which reached the server at `server`: the agent is told that
    /// address, the one its subnet reaches.
    pub fn boot_script_at(
        &self,
        mac: MacAddr,
        now: u64,
        server: Ipv4Addr,
    ) -> Result<String, LabError> {
        let base_url = format!("http://{server}:{}", self.config.http_port);
        Ok(match self.boot_plan_at(mac, now, server)? {
            BootPlan::Agent { task, agent } => {
                log::info!(
                    "lab: {mac} boots the agent for task {} ({})",
                    task.id,
                    task_label(&task)
                );
                BootScript {
                    base_url,
                    mac: mac.to_string(),
                    kernel_args: self.config.boot.kernel_args.clone(),
                    agent: *agent,
                }
                .render()
            }
            BootPlan::Local { bios, uefi, why } => {
                log::info!("lab: {mac} boots its local disk ({why})");
                local_boot_script(&base_url, why, bios, uefi)
            }
        })
    }
}

impl Lab {
    /// What `mac` boots on UEFI (iPXE or the signed chain), from the config and the group the
    /// registry knows for it. A registry failure means the config's answer without the group.
    pub fn uefi_chain(&self, mac: MacAddr) -> UefiChain {
        let group = match self.registry.machine(mac) {
            Ok(machine) => machine.and_then(|m| m.group),
            Err(e) => {
                log::warn!(
                    "lab: looking up {mac}'s group: {}",
                    diskcast_proto::error_chain(&e)
                );
                None
            }
        };
        self.config.uefi_chain(mac, group.as_deref())
    }

    /// The GRUB config of the signed chain for `mac`: the agent for its open task or its local
    /// disk, decided (and recorded) as for an iPXE script.
    pub fn grub_config(&self, mac: MacAddr, now: u64) -> Result<String, LabError> {
        Ok(match self.boot_plan(mac, now)? {
            BootPlan::Agent { task, agent } => {
                log::info!(
                    "lab: {mac} boots the agent for task {} ({}) through the signed chain",
                    task.id,
                    task_label(&task)
                );
                crate::grub::agent_config(&mac.to_string(), &self.config.boot.kernel_args, &agent)
                    .unwrap_or_else(|e| {
                        log::error!("lab: {mac} cannot boot the agent: {e}");
                        crate::grub::error_config(&mac.to_string(), &e.to_string())
                    })
            }
            BootPlan::Local { uefi, why, .. } => {
                log::info!("lab: {mac} boots its local disk ({why}) through the signed chain");
                crate::grub::local_config(&mac.to_string(), why, uefi)
            }
        })
    }
}

/// `deploy golden`, `capture REF-1`, `inventory`...
pub fn task_label(task: &Task) -> String {
    match &task.kind {
        TaskKind::Deploy { image } => {
            let options = TaskOptions::of(task);
            if options.is_relay() {
                format!(
                    "relay {image} to {} machine(s) of its subnet (writes no disk)",
                    options.relay_for.len()
                )
            } else if let Some(relay) = options.relay {
                format!("deploy {image} through relay {relay}")
            } else {
                format!("deploy {image}")
            }
        }
        TaskKind::Capture { image } => format!("capture as {image}"),
        TaskKind::Inventory => "inventory".into(),
        TaskKind::Receive => "receive from a peer master".into(),
        TaskKind::Master => "master: send its disk".into(),
    }
}

/// The iPXE script that hands a machine to its local disk: `sanboot` of the first BIOS disk, or
/// on UEFI (where iPXE cannot sanboot a local disk) a GRUB image that finds the disk's EFI
/// loader; `exit` returns to the firmware.
pub fn local_boot_script(base_url: &str, why: &str, bios: LocalBoot, uefi: LocalBoot) -> String {
    let step = |method: LocalBoot| match method {
        LocalBoot::Sanboot => "sanboot --no-describe --drive 0x80 || goto failed".to_string(),
        LocalBoot::Exit => "exit 1".to_string(),
        LocalBoot::Grub => format!("chain {base_url}/boot/localboot.efi || goto failed"),
    };
    format!(
        "#!ipxe\n\
         echo diskcast: {why}: booting its local disk\n\
         iseq ${{platform}} efi && goto efi ||\n\
         {bios}\n\
         goto failed\n\
         :efi\n\
         {uefi}\n\
         :failed\n\
         echo diskcast: booting the local disk failed\n\
         sleep 30\n\
         exit 1\n",
        bios = step(bios),
        uefi = step(uefi),
    )
}
