//! Machines: discovered by network boot ([`Registry::observe`]) or registered by an admin
//! ([`Registry::register`]), addressed as `MAC`, `NAME` or `@GROUP` ([`Registry::resolve`]).

use crate::db::{args, DbError, Row, Sql};
use crate::{
    check_json, enum_col, secs, tasks, unsecs, Error, MacAddr, Registry, Result, TextEnum,
};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// How a machine's firmware boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
    #[default]
    Unknown,
}

impl TextEnum for Firmware {
    const ALL: &'static [Self] = &[Self::Bios, Self::Uefi, Self::Unknown];
    fn as_str(&self) -> &'static str {
        match self {
            Self::Bios => "bios",
            Self::Uefi => "uefi",
            Self::Unknown => "unknown",
        }
    }
}

/// What the bootserver saw the machine do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// A firmware PXE request.
    Pxe,
    /// iPXE asking for its script.
    Ipxe,
    /// The agent talking to the server.
    Agent,
}

impl TextEnum for Via {
    const ALL: &'static [Self] = &[Self::Pxe, Self::Ipxe, Self::Agent];
    fn as_str(&self) -> &'static str {
        match self {
            Self::Pxe => "pxe",
            Self::Ipxe => "ipxe",
            Self::Agent => "agent",
        }
    }
}

/// One sighting of a machine on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sighting {
    /// [`Firmware::Unknown`] keeps what was known before.
    pub firmware: Firmware,
    /// `None` keeps the last known address.
    pub address: Option<Ipv4Addr>,
    pub via: Via,
}

/// The last inventory the agent reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inventory {
    /// JSON text, as the agent sent it.
    pub json: String,
    /// When it was recorded (unix seconds).
    pub at: u64,
}

/// A machine as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Machine {
    pub mac: MacAddr,
    pub name: Option<String>,
    /// Without the leading `@`.
    pub group: Option<String>,
    /// When the registry first heard of it (registration or first network boot).
    pub first_seen: u64,
    /// Its last network boot or agent contact; `None` if registered but never seen.
    pub last_seen: Option<u64>,
    pub firmware: Firmware,
    pub address: Option<Ipv4Addr>,
    pub last_via: Option<Via>,
    /// Registered by an admin (else only discovered).
    pub known: bool,
    /// How it boots its local disk, overriding the server's default (validated by the bootserver).
    pub local_boot: Option<String>,
    /// Disk selector for its tasks.
    pub disk: Option<String>,
    pub inventory: Option<Inventory>,
}

/// Changes to a machine: `None` leaves a field alone, `Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachinePatch {
    pub name: Option<Option<String>>,
    /// A leading `@` is dropped.
    pub group: Option<Option<String>>,
    pub local_boot: Option<Option<String>>,
    pub disk: Option<Option<String>>,
    pub known: Option<bool>,
}

const COLUMNS: &str = "mac, name, grp, first_seen, last_seen, firmware, address, last_via, known, \
                       local_boot, disk, inventory, inventory_at";

fn from_row(row: &Row) -> Result<Machine, DbError> {
    let last_via = row.opt_text(7)?;
    let inventory = row.opt_text(11)?;
    let address = row
        .opt_int(6)?
        .map(|a| u32::try_from(a).map(Ipv4Addr::from))
        .transpose()
        .map_err(|e| crate::db::decode(6, e))?;
    Ok(Machine {
        mac: row.parsed(0)?,
        name: row.opt_text(1)?,
        group: row.opt_text(2)?,
        first_seen: unsecs(row.int(3)?),
        last_seen: row.opt_int(4)?.map(unsecs),
        firmware: enum_col(row, 5)?,
        address,
        last_via: match last_via {
            None => None,
            Some(_) => Some(enum_col(row, 7)?),
        },
        known: row.bool(8)?,
        local_boot: row.opt_text(9)?,
        disk: row.opt_text(10)?,
        inventory: match inventory {
            None => None,
            Some(json) => Some(Inventory {
                json,
                at: unsecs(row.opt_int(12)?.unwrap_or(0)),
            }),
        },
    })
}

pub(crate) fn get(c: &mut dyn Sql, mac: MacAddr) -> Result<Option<Machine>> {
    let sql = format!("SELECT {COLUMNS} FROM machines WHERE mac = ?1");
    Ok(c.row(&sql, args![mac.to_string()])?
        .map(|r| from_row(&r))
        .transpose()?)
}

fn must_get(c: &mut dyn Sql, mac: MacAddr) -> Result<Machine> {
    get(c, mac)?.ok_or(Error::NoSuchMachine { mac })
}

fn query(c: &mut dyn Sql, filter: &str, arg: Option<&str>) -> Result<Vec<Machine>> {
    let sql = format!("SELECT {COLUMNS} FROM machines {filter} ORDER BY name IS NULL, name, mac");
    let rows = match arg {
        Some(arg) => c.rows(&sql, args![arg])?,
        None => c.rows(&sql, &[])?,
    };
    Ok(rows.iter().map(from_row).collect::<Result<_, DbError>>()?)
}

/// Refuses names and groups that would be ambiguous as a target (`MAC|NAME|@GROUP`, lists).
fn check_label(what: &'static str, value: &str) -> Result<()> {
    let why = if value.is_empty() {
        "it is empty"
    } else if value.len() > 64 {
        "it is longer than 64 bytes"
    } else if value.starts_with('@') {
        "a leading '@' marks groups"
    } else if value
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == ',')
    {
        "it has spaces, control characters or commas"
    } else if value.parse::<MacAddr>().is_ok() {
        "it reads as a MAC address"
    } else {
        return Ok(());
    };
    Err(Error::Invalid {
        what,
        value: value.into(),
        why,
    })
}

fn check_value(what: &'static str, value: &str) -> Result<()> {
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(Error::Invalid {
            what,
            value: value.into(),
            why: "it is empty or has control characters",
        });
    }
    Ok(())
}

fn group_name(group: &str) -> &str {
    group.strip_prefix('@').unwrap_or(group)
}

/// Refuses `name` when another machine than `mac` has it.
fn check_name_free(c: &mut dyn Sql, name: &str, mac: MacAddr) -> Result<()> {
    let holder: Option<MacAddr> = c
        .row("SELECT mac FROM machines WHERE name = ?1", args![name])?
        .map(|row| row.parsed(0))
        .transpose()?;
    match holder {
        Some(holder) if holder != mac => Err(Error::NameTaken {
            name: name.into(),
            holder,
        }),
        _ => Ok(()),
    }
}

impl Registry {
    /// Records that `mac` was seen (network boot or agent contact) at `now`: inserts it as
    /// discovered if new, else updates `last_seen`, firmware (unless unknown), address (if given)
    /// and `last_via`.
    pub fn observe(&self, mac: MacAddr, sighting: Sighting, now: u64) -> Result<Machine> {
        self.write(
            || format!("recording a sighting of {mac}"),
            |tx| {
                tx.exec(
                    "INSERT INTO machines (mac, first_seen, last_seen, firmware, address, last_via)
                     VALUES (?1, ?2, ?2, ?3, ?4, ?5)
                     ON CONFLICT (mac) DO UPDATE SET
                         last_seen = greatest(coalesce(machines.last_seen, 0),
                                              excluded.last_seen),
                         firmware = CASE excluded.firmware
                             WHEN 'unknown' THEN machines.firmware ELSE excluded.firmware END,
                         address = coalesce(excluded.address, machines.address),
                         last_via = excluded.last_via",
                    args![
                        mac.to_string(),
                        secs(now),
                        sighting.firmware.as_str(),
                        sighting.address.map(u32::from),
                        sighting.via.as_str(),
                    ],
                )?;
                must_get(tx, mac)
            },
        )
    }

    /// Marks `mac` as known (registered by an admin), creating it if new. A given `name` or
    /// `group` (leading `@` dropped) replaces the old one; `None` keeps it ([`Registry::set`]
    /// clears).
    pub fn register(
        &self,
        mac: MacAddr,
        name: Option<&str>,
        group: Option<&str>,
        now: u64,
    ) -> Result<Machine> {
        let group = group.map(group_name);
        if let Some(name) = name {
            check_label("machine name", name)?;
        }
        if let Some(group) = group {
            check_label("group", group)?;
        }
        self.write(
            || format!("registering {mac}"),
            |tx| {
                if let Some(name) = name {
                    check_name_free(tx, name, mac)?;
                }
                tx.exec(
                    "INSERT INTO machines (mac, first_seen, name, grp, known)
                     VALUES (?1, ?2, ?3, ?4, 1)
                     ON CONFLICT (mac) DO UPDATE SET
                         known = 1,
                         name = coalesce(excluded.name, machines.name),
                         grp = coalesce(excluded.grp, machines.grp)",
                    args![mac.to_string(), secs(now), name, group],
                )?;
                must_get(tx, mac)
            },
        )
    }

    /// Changes an existing machine.
    pub fn set(&self, mac: MacAddr, patch: MachinePatch) -> Result<Machine> {
        let MachinePatch {
            name,
            group,
            local_boot,
            disk,
            known,
        } = patch;
        let group = group.map(|g| g.map(|g| group_name(&g).to_owned()));
        if let Some(Some(name)) = &name {
            check_label("machine name", name)?;
        }
        if let Some(Some(group)) = &group {
            check_label("group", group)?;
        }
        if let Some(Some(local_boot)) = &local_boot {
            check_value("local boot method", local_boot)?;
        }
        if let Some(Some(disk)) = &disk {
            check_value("disk selector", disk)?;
        }
        self.write(
            || format!("changing {mac}"),
            |tx| {
                must_get(tx, mac)?;
                if let Some(Some(name)) = &name {
                    check_name_free(tx, name, mac)?;
                }
                tx.exec(
                    "UPDATE machines SET
                         name = CASE WHEN ?2 THEN ?3 ELSE name END,
                         grp = CASE WHEN ?4 THEN ?5 ELSE grp END,
                         local_boot = CASE WHEN ?6 THEN ?7 ELSE local_boot END,
                         disk = CASE WHEN ?8 THEN ?9 ELSE disk END,
                         known = coalesce(?10, known)
                     WHERE mac = ?1",
                    args![
                        mac.to_string(),
                        name.is_some(),
                        name.clone().flatten(),
                        group.is_some(),
                        group.clone().flatten(),
                        local_boot.is_some(),
                        local_boot.clone().flatten(),
                        disk.is_some(),
                        disk.clone().flatten(),
                        known,
                    ],
                )?;
                must_get(tx, mac)
            },
        )
    }

    /// Removes `mac` and its task history; refused while it has an open task. Its DHCP lease,
    /// if any, stays (leases are the DHCP server's business).
    pub fn forget(&self, mac: MacAddr) -> Result<()> {
        self.write(
            || format!("forgetting {mac}"),
            |tx| {
                if let Some((task, state)) = tasks::open_task_id(tx, mac)? {
                    return Err(Error::MachineBusy { mac, task, state });
                }
                match tx.exec(
                    "DELETE FROM machines WHERE mac = ?1",
                    args![mac.to_string()],
                )? {
                    0 => Err(Error::NoSuchMachine { mac }),
                    _ => Ok(()),
                }
            },
        )
    }

    /// The machine with this MAC.
    pub fn machine(&self, mac: MacAddr) -> Result<Option<Machine>> {
        self.read(|| format!("reading machine {mac}"), |c| get(c, mac))
    }

    /// The machine with this name.
    pub fn machine_by_name(&self, name: &str) -> Result<Option<Machine>> {
        self.read(
            || format!("looking up machine {name:?}"),
            |c| Ok(query(c, "WHERE name = ?1", Some(name))?.into_iter().next()),
        )
    }

    /// All machines: named ones by name, then the others by MAC.
    pub fn machines(&self) -> Result<Vec<Machine>> {
        self.read(|| "listing machines".into(), |c| query(c, "", None))
    }

    /// The machines of `group` (with or without the leading `@`).
    pub fn group_members(&self, group: &str) -> Result<Vec<Machine>> {
        let group = group_name(group);
        self.read(
            || format!("listing group @{group}"),
            |c| query(c, "WHERE grp = ?1", Some(group)),
        )
    }

    /// Stores the inventory (JSON text) the agent of `mac` reported at `now`.
    pub fn record_inventory(&self, mac: MacAddr, json: &str, now: u64) -> Result<Machine> {
        check_json("inventory", json)?;
        self.write(
            || format!("recording the inventory of {mac}"),
            |tx| {
                let changed = tx.exec(
                    "UPDATE machines SET inventory = ?2, inventory_at = ?3,
                         last_seen = greatest(coalesce(last_seen, 0), ?3)
                     WHERE mac = ?1",
                    args![mac.to_string(), json, secs(now)],
                )?;
                if changed == 0 {
                    return Err(Error::NoSuchMachine { mac });
                }
                must_get(tx, mac)
            },
        )
    }

    /// The machines a target names: `MAC` (whether or not the registry has it yet), `NAME`, or
    /// `@GROUP` (its members, never empty).
    pub fn resolve(&self, target: &str) -> Result<Vec<MacAddr>> {
        if let Some(group) = target.strip_prefix('@') {
            check_label("group", group)?;
            let members = self.group_members(group)?;
            if members.is_empty() {
                return Err(Error::EmptyGroup {
                    group: group.into(),
                });
            }
            return Ok(members.into_iter().map(|m| m.mac).collect());
        }
        if let Ok(mac) = target.parse::<MacAddr>() {
            return Ok(vec![mac]);
        }
        check_label("target", target)?;
        match self.machine_by_name(target)? {
            Some(m) => Ok(vec![m.mac]),
            None => Err(Error::UnknownName {
                name: target.into(),
            }),
        }
    }
}
