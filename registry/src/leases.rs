//! DHCP leases of full mode, declined addresses, and the one-time import of `leases.json`.

use crate::db::{args, decode, DbError, Row, Sql};
use crate::{get_setting, put_setting, secs, unsecs, Error, MacAddr, Registry, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

/// An address handed to a MAC until `expires` (unix seconds). An address has at most one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mac: MacAddr,
    pub address: Ipv4Addr,
    pub expires: u64,
}

/// The setting that marks `leases.json` as imported (so a crash between the commit and the
/// rename, or a restored file, never imports stale leases twice).
const LEGACY_MARK: &str = "registry.legacy_leases_imported";

/// `leases.json` as the bootserver wrote it before the registry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyFile {
    leases: BTreeMap<MacAddr, LegacyLease>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyLease {
    address: Ipv4Addr,
    expires: u64,
}

fn from_row(row: &Row) -> Result<Lease, DbError> {
    let address = u32::try_from(row.int(1)?).map_err(|e| decode(1, e))?;
    Ok(Lease {
        mac: row.parsed(0)?,
        address: Ipv4Addr::from(address),
        expires: unsecs(row.int(2)?),
    })
}

fn one(row: Option<Row>) -> Result<Option<Lease>> {
    Ok(row.map(|r| from_row(&r)).transpose()?)
}

fn by_address(c: &mut dyn Sql, address: Ipv4Addr) -> Result<Option<Lease>> {
    one(c.row(
        "SELECT mac, address, expires FROM leases WHERE address = ?1",
        args![u32::from(address)],
    )?)
}

/// Writes `lease`, dropping any other MAC's (expired) lease on the same address.
fn upsert(c: &mut dyn Sql, lease: &Lease) -> Result<()> {
    c.exec(
        "DELETE FROM leases WHERE address = ?1 AND mac != ?2",
        args![u32::from(lease.address), lease.mac.to_string()],
    )?;
    c.exec(
        "INSERT INTO leases (mac, address, expires) VALUES (?1, ?2, ?3)
         ON CONFLICT (mac) DO UPDATE SET address = excluded.address, expires = excluded.expires",
        args![
            lease.mac.to_string(),
            u32::from(lease.address),
            secs(lease.expires)
        ],
    )?;
    Ok(())
}

impl Registry {
    /// All leases, by address.
    pub fn leases(&self) -> Result<Vec<Lease>> {
        self.read(
            || "listing leases".into(),
            |c| {
                let rows = c.rows(
                    "SELECT mac, address, expires FROM leases ORDER BY address",
                    &[],
                )?;
                Ok(rows.iter().map(from_row).collect::<Result<_, DbError>>()?)
            },
        )
    }

    /// The lease of `mac` (expired or not).
    pub fn lease_for(&self, mac: MacAddr) -> Result<Option<Lease>> {
        self.read(
            || format!("reading the lease of {mac}"),
            |c| {
                one(c.row(
                    "SELECT mac, address, expires FROM leases WHERE mac = ?1",
                    args![mac.to_string()],
                )?)
            },
        )
    }

    /// The MAC holding `address` with a lease still valid at `now` (`expires > now`).
    pub fn holder(&self, address: Ipv4Addr, now: u64) -> Result<Option<MacAddr>> {
        self.read(
            || format!("looking up the holder of {address}"),
            |c| {
                Ok(by_address(c, address)?
                    .filter(|l| l.expires > now)
                    .map(|l| l.mac))
            },
        )
    }

    /// Whether `address` has a lease row at all (expired or not): the DHCP server hands out
    /// never-used addresses first, so a machine away for a while still gets its address back.
    pub fn ever_leased(&self, address: Ipv4Addr) -> Result<bool> {
        self.read(
            || format!("looking up leases of {address}"),
            |c| Ok(by_address(c, address)?.is_some()),
        )
    }

    /// Grants or renews `lease`. Refused while another MAC holds the address at `now`; another
    /// MAC's expired lease on it is dropped.
    pub fn put_lease(&self, lease: Lease, now: u64) -> Result<()> {
        self.write(
            || format!("leasing {} to {}", lease.address, lease.mac),
            |tx| {
                if let Some(other) = by_address(tx, lease.address)? {
                    if other.mac != lease.mac && other.expires > now {
                        return Err(Error::AddressTaken {
                            address: lease.address,
                            holder: other.mac,
                            expires: other.expires,
                        });
                    }
                }
                upsert(tx, &lease)
            },
        )
    }

    /// Drops the lease of `mac` (DHCPRELEASE); whether it had one.
    pub fn release(&self, mac: MacAddr) -> Result<bool> {
        self.write(
            || format!("releasing the lease of {mac}"),
            |tx| Ok(tx.exec("DELETE FROM leases WHERE mac = ?1", args![mac.to_string()])? > 0),
        )
    }

    /// Drops leases expired for at least `keep_secs` at `now`, and declines that are over;
    /// returns how many rows went.
    pub fn prune_expired(&self, now: u64, keep_secs: u64) -> Result<usize> {
        let cutoff = secs(now.saturating_sub(keep_secs));
        self.write(
            || "pruning expired leases".into(),
            |tx| {
                let leases = tx.exec("DELETE FROM leases WHERE expires <= ?1", args![cutoff])?;
                let declined =
                    tx.exec("DELETE FROM declined WHERE until <= ?1", args![secs(now)])?;
                Ok(usize::try_from(leases + declined).unwrap_or(usize::MAX))
            },
        )
    }

    /// Marks `address` unusable until `until` (a client DECLINEd it: someone else uses it).
    pub fn decline(&self, address: Ipv4Addr, until: u64) -> Result<()> {
        self.write(
            || format!("declining {address}"),
            |tx| {
                tx.exec(
                    "INSERT INTO declined (address, until) VALUES (?1, ?2)
                     ON CONFLICT (address) DO UPDATE
                         SET until = greatest(declined.until, excluded.until)",
                    args![u32::from(address), secs(until)],
                )?;
                Ok(())
            },
        )
    }

    /// Whether `address` is declined at `now`.
    pub fn is_declined(&self, address: Ipv4Addr, now: u64) -> Result<bool> {
        self.read(
            || format!("checking whether {address} is declined"),
            |c| {
                let until: Option<i64> = c
                    .row(
                        "SELECT until FROM declined WHERE address = ?1",
                        args![u32::from(address)],
                    )?
                    .map(|row| row.int(0))
                    .transpose()?;
                Ok(until.is_some_and(|u| unsecs(u) > now))
            },
        )
    }

    /// Imports the pre-registry lease file (`state_dir/leases.json`) once, in one transaction,
    /// then renames it to `leases.json.migrated`. Returns `None` when there is no file, else the
    /// number of leases imported (0 when it had been imported before and was only renamed now).
    /// When two MACs had the same address, the later-expiring lease wins.
    pub fn import_legacy_leases(&self, path: impl AsRef<Path>) -> Result<Option<usize>> {
        let path = path.as_ref();
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::LegacyRead {
                    path: path.into(),
                    source,
                })
            }
        };
        let imported = self.write(
            || format!("importing legacy leases from {}", path.display()),
            |tx| {
                if get_setting(tx, LEGACY_MARK)?.is_some() {
                    return Ok(0);
                }
                let file: LegacyFile =
                    serde_json::from_slice(&bytes).map_err(|source| Error::LegacyCorrupt {
                        path: path.into(),
                        source,
                    })?;
                let mut leases: Vec<Lease> = file
                    .leases
                    .into_iter()
                    .map(|(mac, l)| Lease {
                        mac,
                        address: l.address,
                        expires: l.expires,
                    })
                    .collect();
                leases.sort_by_key(|l| l.expires);
                for lease in &leases {
                    upsert(tx, lease)?;
                }
                put_setting(tx, LEGACY_MARK, &path.display().to_string())?;
                Ok(leases.len())
            },
        )?;
        let mut to = path.as_os_str().to_owned();
        to.push(".migrated");
        std::fs::rename(path, &to).map_err(|source| Error::LegacyRename {
            from: path.into(),
            to: to.into(),
            source,
        })?;
        Ok(Some(imported))
    }
}
