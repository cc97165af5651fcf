//! Numbered migrations. Migration `n` (1-based) takes the database from `PRAGMA user_version`
//! `n - 1` to `n`, inside one `BEGIN IMMEDIATE` transaction with the version bump, so a crash
//! leaves either the old or the new schema, and two processes opening at once do not both apply it.
//! Never edit a released migration: add one.

use crate::{Error, Result};
use rusqlite::{Connection, TransactionBehavior};
use std::path::Path;

/// v1: machines, DHCP leases, declined addresses, settings (what replaces `leases.json`).
const V1: &str = "
CREATE TABLE machines (
    mac          TEXT PRIMARY KEY,        -- aa:bb:cc:dd:ee:ff
    name         TEXT UNIQUE,
    grp          TEXT,
    first_seen   INTEGER NOT NULL,        -- unix seconds: registered or first network boot
    last_seen    INTEGER,                 -- last network boot or agent contact
    firmware     TEXT NOT NULL DEFAULT 'unknown' CHECK (firmware IN ('bios', 'uefi', 'unknown')),
    address      INTEGER,                 -- last IPv4, as u32
    last_via     TEXT CHECK (last_via IN ('pxe', 'ipxe', 'agent')),
    known        INTEGER NOT NULL DEFAULT 0 CHECK (known IN (0, 1)),
    local_boot   TEXT,
    disk         TEXT,
    inventory    TEXT,                    -- JSON from the agent
    inventory_at INTEGER
) STRICT;
CREATE INDEX machines_grp ON machines (grp) WHERE grp IS NOT NULL;

CREATE TABLE leases (
    mac     TEXT PRIMARY KEY,
    address INTEGER NOT NULL UNIQUE,
    expires INTEGER NOT NULL
) STRICT;

CREATE TABLE declined (
    address INTEGER PRIMARY KEY,
    until   INTEGER NOT NULL
) STRICT;

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
";

/// v2: one-shot tasks and their history.
const V2: &str = "
CREATE TABLE tasks (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    mac           TEXT NOT NULL REFERENCES machines (mac) ON DELETE CASCADE,
    kind          TEXT NOT NULL CHECK (kind IN ('deploy', 'capture', 'inventory', 'receive', 'master')),
    image         TEXT,
    state         TEXT NOT NULL CHECK (state IN
                      ('pending', 'booted', 'running', 'verified', 'failed', 'cancelled', 'timed-out')),
    reason        TEXT,
    options       TEXT NOT NULL DEFAULT '{}',
    timeout_secs  INTEGER NOT NULL,
    created       INTEGER NOT NULL,
    updated       INTEGER NOT NULL,
    finished      INTEGER,
    last_activity INTEGER NOT NULL,
    token_hash    BLOB NOT NULL UNIQUE    -- BLAKE3 of the token; the token itself is not stored
) STRICT;
-- At most one open task per machine, enforced by the database too.
CREATE UNIQUE INDEX tasks_one_open ON tasks (mac) WHERE state IN ('pending', 'booted', 'running');
CREATE INDEX tasks_mac ON tasks (mac, id);

CREATE TABLE task_events (
    id       INTEGER PRIMARY KEY,
    task_id  INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    at       INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    message  TEXT NOT NULL,
    progress TEXT                          -- JSON {percent, mb_per_s, repairs}
) STRICT;
CREATE INDEX task_events_task ON task_events (task_id, id);
";

pub(crate) const MIGRATIONS: &[&str] = &[V1, V2];

/// The schema version this code writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the database to version `target` (≤ [`SCHEMA_VERSION`]). Refuses a newer database.
pub(crate) fn migrate(conn: &mut Connection, path: &Path, target: u32) -> Result<()> {
    apply(conn, path, MIGRATIONS, target)
}

fn apply(conn: &mut Connection, path: &Path, migrations: &[&str], target: u32) -> Result<()> {
    let known = u32::try_from(migrations.len()).unwrap_or(u32::MAX);
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| Error::Open {
                path: path.into(),
                source,
            })?;
        let found: u32 = tx
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|source| Error::Open {
                path: path.into(),
                source,
            })?;
        if found > known {
            return Err(Error::SchemaTooNew {
                path: path.into(),
                found,
                known,
            });
        }
        if found >= target.min(known) {
            return Ok(());
        }
        let version = found + 1;
        let migrate_err = |source| Error::Migrate {
            path: path.into(),
            version,
            source,
        };
        let Some(sql) = migrations.get(found as usize) else {
            return Ok(()); // found < known: not reached
        };
        tx.execute_batch(sql).map_err(migrate_err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(migrate_err)?;
        tx.commit().map_err(migrate_err)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_version(conn: &Connection) -> u32 {
        conn.query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn a_failing_migration_leaves_the_previous_version_whole() {
        let path = Path::new(":memory:");
        let mut conn = Connection::open_in_memory().unwrap();
        let broken = [V1, "CREATE TABLE half (a); CREATE TABLE broken ("];
        let err = apply(&mut conn, path, &broken, 2).unwrap_err();
        assert!(matches!(err, Error::Migrate { version: 2, .. }), "{err:?}");
        assert_eq!(user_version(&conn), 1);
        let half: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'half'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(half, 0, "rolled back with its version bump");
        // Fixed, it applies; applying again is a no-op.
        apply(&mut conn, path, MIGRATIONS, SCHEMA_VERSION).unwrap();
        apply(&mut conn, path, MIGRATIONS, SCHEMA_VERSION).unwrap();
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
    }
}
