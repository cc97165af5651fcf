//! The admin's commands on the lab: `bootserver machines ...`, `task ...`, `tasks`, `token`,
//! `wake`. They work on the registry in the config's state directory directly (a running server
//! sees their changes at once; the file is shared safely), so they work with the server down too.

use crate::config::{Config, LocalBoot};
use crate::lab::boot::{task_label, TaskOptions};
use crate::lab::tasks::{check_label, TaskRequest};
use crate::lab::{parse_mac, Lab};
use crate::store::Store;
use clap::Subcommand;
use diskcast_registry::{MachinePatch, Registry, Task, TaskFilter};
use std::error::Error;

#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// Every machine the server knows or has seen.
    List,
    /// One machine: what it is, what it has, its recent tasks.
    Show { machine: String },
    /// Register a machine (known: it may get tasks) and name it, group it, say how it boots
    /// locally (sanboot, exit, grub) or which disk its tasks use.
    Set {
        machine: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        local_boot: Option<String>,
        #[arg(long)]
        disk: Option<String>,
    },
    /// Remove a machine and its task history.
    Forget { machine: String },
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Write a stored image to machines' disks, once; they then boot their new disk.
    Deploy {
        image: String,
        /// On disks larger than the image, extend the last GPT partition to the disk's end.
        #[arg(long)]
        grow_last_partition: bool,
        /// A machine (MAC or name) on a subnet behind a router that forwards no multicast: it
        /// boots as that subnet's relay (writing no disk) and the task's machines there join
        /// the session through it. Repeat for more subnets, one relay each.
        #[arg(long = "relay", value_name = "MAC")]
        relays: Vec<String>,
        #[command(flatten)]
        common: TaskArgs,
    },
    /// Read one machine's disk into the store under NAME.
    Capture {
        machine: String,
        #[arg(long)]
        image: String,
        /// Read every block, not only those the file systems use.
        #[arg(long)]
        all_blocks: bool,
        #[command(flatten)]
        common: TaskArgs,
    },
    /// Report machines' hardware (nothing is written).
    Inventory {
        #[command(flatten)]
        common: TaskArgs,
    },
    /// Receive a peer master's disk (a USB stick, or a machine with a master task).
    Receive {
        /// On disks larger than the image, extend the last GPT partition to the disk's end.
        #[arg(long)]
        grow_last_partition: bool,
        /// Join the session of the master with this public key (make-usb-stick prints the
        /// stick's; several separated by commas). Master tasks' and [security] trusted_keys
        /// are trusted too.
        #[arg(long, value_name = "KEY")]
        trust: Option<String>,
        /// Join any peer session, signed or not: any host on the network could write the disks.
        #[arg(long, conflicts_with = "trust")]
        trust_any: bool,
        #[command(flatten)]
        common: TaskArgs,
    },
    /// Multicast one machine's disk to machines with receive tasks.
    Master {
        machine: String,
        /// Read every block, not only those the file systems use.
        #[arg(long)]
        all_blocks: bool,
        #[arg(long)]
        min_receivers: Option<u32>,
        #[arg(long)]
        start_timeout: Option<u32>,
        #[arg(long)]
        rate: Option<u32>,
        #[command(flatten)]
        common: TaskArgs,
    },
    /// Everything about one task, with its history.
    Show { id: i64 },
    /// Cancel an open task: its machine boots its local disk again.
    Cancel { id: i64 },
}

#[derive(Debug, clap::Args)]
pub struct TaskArgs {
    /// The machines: MAC, NAME or @GROUP, several separated by commas.
    #[arg(long, default_value = "")]
    to: String,
    /// The disk to use: serial:SERIAL, name:DEVICE, size:SIZE or only.
    #[arg(long)]
    disk: Option<String>,
    /// Seconds of silence after which the task times out.
    #[arg(long)]
    timeout: Option<u64>,
    /// Send Wake-on-LAN packets to the machines.
    #[arg(long)]
    wake: bool,
}

fn registry(config: &Config) -> Result<Registry, Box<dyn Error>> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| format!("creating {}: {e}", config.state_dir.display()))?;
    Ok(Registry::open_location(
        &config.database,
        config.site.as_deref(),
    )?)
}

fn lab(config: Config) -> Result<Lab, Box<dyn Error>> {
    let registry = registry(&config)?;
    let store = Store::open(&config.store_dir)?;
    let server_ip = config.address.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let key = crate::lab::server_key(&config.state_dir)?;
    let https = crate::tls::advertised(&config)?;
    let mut lab = Lab::new(config, registry, store, server_ip, key);
    // What agents are told, so `script` shows what a machine would really boot.
    lab.https = https;
    Ok(lab)
}

fn ago(at: Option<u64>) -> String {
    match at {
        None => "never".into(),
        Some(at) => {
            let secs = crate::unix_now().saturating_sub(at);
            match secs {
                0..=119 => format!("{secs} s ago"),
                120..=7199 => format!("{} min ago", secs / 60),
                7200..=172_799 => format!("{} h ago", secs / 3600),
                _ => format!("{} days ago", secs / 86400),
            }
        }
    }
}

pub fn machines(config: Config, command: MachinesCommand) -> Result<(), Box<dyn Error>> {
    let registry = registry(&config)?;
    match command {
        MachinesCommand::List => {
            println!(
                "{:<18} {:<16} {:<12} {:<8} {:<15} {:<12} {:<11} task",
                "mac", "name", "group", "firmware", "address", "last seen", "registered"
            );
            for m in registry.machines()? {
                let task = registry.open_task_for(m.mac)?.map_or("-".to_string(), |t| {
                    format!("{} {} ({})", t.id, task_label(&t), t.state)
                });
                println!(
                    "{:<18} {:<16} {:<12} {:<8} {:<15} {:<12} {:<11} {task}",
                    m.mac.to_string(),
                    m.name.as_deref().unwrap_or("-"),
                    m.group
                        .as_deref()
                        .map_or("-".to_string(), |g| format!("@{g}")),
                    format!("{:?}", m.firmware).to_lowercase(),
                    m.address.map_or("-".into(), |a| a.to_string()),
                    ago(m.last_seen),
                    if m.known { "known" } else { "discovered" }
                );
            }
        }
        MachinesCommand::Show { machine } => {
            let mac = resolve_one(&registry, &machine)?;
            let m = registry
                .machine(mac)?
                .ok_or_else(|| format!("no machine {mac} in the registry"))?;
            println!("{}", serde_json::to_string_pretty(&m)?);
            for task in registry.tasks(TaskFilter {
                mac: Some(mac),
                limit: Some(10),
                ..TaskFilter::default()
            })? {
                print_task(&task);
            }
        }
        MachinesCommand::Set {
            machine,
            name,
            group,
            local_boot,
            disk,
        } => {
            let mac = resolve_one(&registry, &machine)?;
            for (what, value) in [("name", &name), ("group", &group)] {
                if let Some(text) = value {
                    check_label(what, text.trim_start_matches('@'))?;
                }
            }
            if let Some(method) = &local_boot {
                LocalBoot::parse(method).ok_or_else(|| {
                    format!("--local-boot {method:?} is not {}", LocalBoot::EXPECTED)
                })?;
            }
            if let Some(disk) = &disk {
                diskcast_proto::cmdline::DiskSelector::parse(disk).ok_or_else(|| {
                    format!(
                        "--disk {disk:?} is not {}",
                        diskcast_proto::cmdline::DiskSelector::EXPECTED
                    )
                })?;
            }
            registry.register(mac, name.as_deref(), group.as_deref(), crate::unix_now())?;
            let m = registry.set(
                mac,
                MachinePatch {
                    local_boot: local_boot.map(Some),
                    disk: disk.map(Some),
                    ..MachinePatch::default()
                },
            )?;
            println!(
                "{}: known{}{}",
                m.mac,
                m.name.map_or(String::new(), |n| format!(", named {n}")),
                m.group.map_or(String::new(), |g| format!(", in @{g}"))
            );
        }
        MachinesCommand::Forget { machine } => {
            let mac = resolve_one(&registry, &machine)?;
            registry.forget(mac)?;
            println!("forgot {mac}");
        }
    }
    Ok(())
}

fn resolve_one(
    registry: &Registry,
    target: &str,
) -> Result<diskcast_proto::mac::MacAddr, Box<dyn Error>> {
    if let Ok(mac) = parse_mac(target) {
        return Ok(mac);
    }
    let macs = registry.resolve(target)?;
    match macs.as_slice() {
        [mac] => Ok(*mac),
        _ => Err(format!("{target} names {} machines; name one", macs.len()).into()),
    }
}

fn print_task(t: &Task) {
    println!(
        "{:>5}  {:<18} {:<28} {:<10} {:<12}{}",
        t.id,
        t.mac.to_string(),
        task_label(t),
        t.state.to_string(),
        ago(Some(t.updated)),
        t.reason
            .as_ref()
            .map_or(String::new(), |r| format!("  {r}"))
    );
}

pub fn tasks(config: Config, all: bool) -> Result<(), Box<dyn Error>> {
    let registry = registry(&config)?;
    println!(
        "{:>5}  {:<18} {:<28} {:<10} {:<12}",
        "task", "mac", "what", "state", "updated"
    );
    for task in registry.tasks(TaskFilter {
        open_only: !all,
        limit: Some(200),
        ..TaskFilter::default()
    })? {
        print_task(&task);
    }
    Ok(())
}

pub fn task(config: Config, command: TaskCommand) -> Result<(), Box<dyn Error>> {
    let mut relays = Vec::new();
    let (kind, image, common, options, to) = match command {
        TaskCommand::Show { id } => {
            let registry = registry(&config)?;
            let task = registry.task(id)?.ok_or_else(|| format!("no task {id}"))?;
            print_task(&task);
            for event in registry.events(id)? {
                println!(
                    "       {}  {:?}  {}",
                    ago(Some(event.at)),
                    event.kind,
                    event.message
                );
            }
            return Ok(());
        }
        TaskCommand::Cancel { id } => {
            let task = registry(&config)?.cancel(id, crate::unix_now())?;
            println!(
                "task {} cancelled: {} boots its local disk again",
                task.id, task.mac
            );
            return Ok(());
        }
        TaskCommand::Deploy {
            image,
            grow_last_partition,
            relays: deploy_relays,
            common,
        } => {
            relays = deploy_relays;
            (
                "deploy",
                Some(image),
                common,
                TaskOptions {
                    grow_last_partition,
                    ..TaskOptions::default()
                },
                None,
            )
        }
        TaskCommand::Capture {
            machine,
            image,
            all_blocks,
            common,
        } => (
            "capture",
            Some(image),
            common,
            TaskOptions {
                all_blocks,
                ..TaskOptions::default()
            },
            Some(machine),
        ),
        TaskCommand::Inventory { common } => {
            ("inventory", None, common, TaskOptions::default(), None)
        }
        TaskCommand::Receive {
            grow_last_partition,
            trust,
            trust_any,
            common,
        } => (
            "receive",
            None,
            common,
            TaskOptions {
                grow_last_partition,
                trust: if trust_any { Some("any".into()) } else { trust },
                ..TaskOptions::default()
            },
            None,
        ),
        TaskCommand::Master {
            machine,
            all_blocks,
            min_receivers,
            start_timeout,
            rate,
            common,
        } => (
            "master",
            None,
            common,
            TaskOptions {
                min_receivers,
                start_timeout,
                rate,
                all_blocks,
                ..TaskOptions::default()
            },
            Some(machine),
        ),
    };
    let to = to.unwrap_or(common.to);
    if to.is_empty() {
        return Err("name the machines: --to MAC|NAME|@GROUP".into());
    }
    let request = TaskRequest {
        kind: kind.into(),
        image,
        to,
        options: TaskOptions {
            disk: common.disk,
            ..options
        },
        wake: common.wake,
        timeout: common.timeout,
        relays,
    };
    let lab = lab(config)?;
    for task in lab.create_tasks(&request, crate::unix_now())? {
        println!(
            "task {} for {}: {} — it runs when the machine network-boots{}",
            task.id,
            task.mac,
            task_label(&task),
            if request.wake { " (woken)" } else { "" }
        );
    }
    Ok(())
}

pub fn token(config: &Config) -> Result<(), Box<dyn Error>> {
    println!("{}", crate::lab::admin_token(&config.state_dir)?);
    Ok(())
}

pub fn wake(config: Config, target: &str) -> Result<(), Box<dyn Error>> {
    let registry = registry(&config)?;
    let macs = registry.resolve(target)?;
    crate::lab::wake::wake(&config.interface, &macs)?;
    println!(
        "sent Wake-on-LAN to {} machine(s) on {}",
        macs.len(),
        config.interface
    );
    Ok(())
}

/// What `mac` would boot now, without changing anything.
pub fn script(config: Config, mac: &str) -> Result<(), Box<dyn Error>> {
    let mac = parse_mac(mac)?;
    let lab = lab(config)?;
    print!("{}", lab.preview_script(mac)?);
    Ok(())
}
