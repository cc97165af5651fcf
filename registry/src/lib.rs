//! Server state of a diskcast lab in one embedded SQLite file (`state_dir/registry.sqlite`):
//! the machines the bootserver knows, one-shot tasks for them with their history, and the DHCP
//! leases of full mode (which used to live in `leases.json`).
//!
//! Everything goes through [`Registry`], a typed layer: no SQL outside this crate. Time is always a
//! parameter (`now`, unix seconds), so callers and tests decide the clock.
//!
//! # Durability
//!
//! WAL journal, `synchronous=FULL` (a write whose call returned survives a crash or power loss),
//! `foreign_keys=ON`, a busy timeout of [`BUSY_TIMEOUT`], and every write in one
//! `BEGIN IMMEDIATE` transaction. [`Registry`] is `Clone + Send + Sync`: one connection for
//! writes and one read-only connection for reads (WAL lets reads proceed during a write), each
//! behind a mutex. Other processes may open the same file: they wait for each other's writes.
//!
//! # Schema (version [`SCHEMA_VERSION`], `PRAGMA user_version`)
//!
//! | table | what for |
//! |---|---|
//! | `machines` | one row per MAC: `name` (unique), `grp`, `first_seen`/`last_seen`, `firmware`, last `address` and how it booted (`last_via`), `known` (registered by an admin, else only discovered by network boot), `local_boot` override, `disk` selector, last `inventory` JSON and when |
//! | `tasks` | one-shot jobs: `kind` (deploy/capture/inventory) + `image`, `state`, `reason`, `options` JSON, `timeout_secs`, `created`/`updated`/`finished`/`last_activity`, `token_hash` (BLAKE3 of the agent's token). A partial unique index allows one open task per machine |
//! | `task_events` | the history of each task: every transition and report (`at`, `kind`, `message`, `progress` JSON); only the latest progress event of a task is kept |
//! | `leases` | DHCP leases of full mode: `mac` → `address` (unique) until `expires` |
//! | `declined` | addresses a client DECLINEd (RFC 2131), unusable `until` |
//! | `settings` | small key-value pairs (admin token hash, key ids, the legacy-import mark) |
//!
//! Migration 1 created `machines`, `leases`, `declined`, `settings`; migration 2 `tasks` and
//! `task_events`. A database newer than this code is refused ([`Error::SchemaTooNew`]).
//!
//! # Task states
//!
//! ```text
//!            Booted             DiskChosen | Joined | Progress          Verified
//!  pending ─────────► booted ───────────────────────────► running ───────────► verified
//!                       │                                   ↺ DiskChosen | Joined | Progress
//!                       └──── Verified (inventory tasks only) ───────────────► verified
//!
//!  pending | booted | running ── report Booted ──────────► booted     (the machine restarted)
//!  pending | booted | running ── report Failed{reason} ──► failed
//!                             ── cancel(id, now) ────────► cancelled
//!                             ── expire(now) ────────────► timed-out  (silent > timeout_secs)
//! ```
//!
//! `pending`, `booted` and `running` are open; `verified` (the one success state, also for
//! capture and inventory), `failed`, `cancelled` and `timed-out` are final. Anything else is
//! [`Error::IllegalTransition`]. `expire(now)` times out open tasks silent for more than their
//! `timeout_secs` (silence counts from the last report, or creation).
//!
//! Every transition and report appends a row to `task_events`, except that a progress report
//! replaces the task's previous progress event: a task's history stays a handful of rows however
//! often its agent reports, and still shows where it last was.
//!
//! # Tokens
//!
//! [`Registry::create_task`] draws 32 bytes from the OS (`getrandom`) and returns them once as 64
//! hex digits ([`TaskToken`]); the database keeps only their BLAKE3 hash. [`Registry::task_by_token`]
//! hashes what it is given, finds the row by hash, and compares the hashes in constant time.
#![forbid(unsafe_code)]

mod db;
mod error;
mod leases;
mod machines;
mod schema;
mod tasks;
pub mod testing;

pub use db::DbError;
pub use diskcast_proto::mac::{MacAddr, MacParseError};
pub use error::{Error, Result};
pub use leases::Lease;
pub use machines::{Firmware, Inventory, Machine, MachinePatch, Sighting, Via};
pub use schema::SCHEMA_VERSION;
pub use tasks::{
    EventKind, NewTask, Progress, Report, Step, Task, TaskEvent, TaskFilter, TaskId, TaskKind,
    TaskState, TaskToken,
};

use db::{args, Sql};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The database's file name in the bootserver's state directory.
pub const FILE_NAME: &str = "registry.sqlite";

/// How long a write waits for another connection's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a PostgreSQL write that conflicted with another server's is tried again.
const PG_ATTEMPTS: u32 = 20;

/// Where the registry lives: the `database` setting of the bootserver.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite file (the embedded default: `state_dir/registry.sqlite`).
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by several bootservers (`postgres://user@host/db`).
    Postgres(Box<PgUrl>),
}

impl Location {
    /// `postgres://...` or `postgresql://...` is PostgreSQL; anything else an SQLite path.
    pub fn parse(text: &str) -> Result<Self> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Ok(Self::Postgres(Box::new(PgUrl::parse(text)?)))
        } else {
            Ok(Self::Sqlite(text.into()))
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => write!(f, "{url}"),
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({self})")
    }
}

/// A PostgreSQL connection URL. Its `Display` and `Debug` leave the password out, so it can be
/// logged and shown in errors.
#[derive(Clone)]
pub struct PgUrl {
    config: postgres::Config,
    shown: String,
}

impl PartialEq for PgUrl {
    fn eq(&self, other: &Self) -> bool {
        self.shown == other.shown && self.config.get_password() == other.config.get_password()
    }
}
impl Eq for PgUrl {}

impl PgUrl {
    pub fn parse(text: &str) -> Result<Self> {
        let mut config: postgres::Config = text.parse().map_err(|e: postgres::Error| {
            // The parser's message never repeats the URL, so no password leaks through it.
            Error::BadUrl {
                why: format!("{e}; expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"),
            }
        })?;
        if config.get_hosts().is_empty() {
            return Err(Error::BadUrl {
                why: "it names no host (postgres://USER@HOST/DATABASE; a unix socket \
                      directory goes in ?host=/path)"
                    .into(),
            });
        }
        if config.get_dbname().is_none() {
            return Err(Error::BadUrl {
                why: "it names no database (postgres://USER@HOST/DATABASE)".into(),
            });
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("diskcast");
        let shown = show(&config);
        Ok(Self { config, shown })
    }

    /// The database's name.
    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or("")
    }
}

/// `postgres://user@host:port/db`, without the password.
fn show(config: &postgres::Config) -> String {
    let mut out = String::from("postgres://");
    if let Some(user) = config.get_user() {
        out.push_str(user);
        if config.get_password().is_some() {
            out.push_str(":***");
        }
        out.push('@');
    }
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if let [postgres::config::Host::Tcp(_)] = config.get_hosts() {
        out.push_str(&hosts.join(","));
        if let [port] = config.get_ports() {
            out.push_str(&format!(":{port}"));
        }
        out.push('/');
        out.push_str(config.get_dbname().unwrap_or(""));
    } else {
        out.push('/');
        out.push_str(config.get_dbname().unwrap_or(""));
        out.push_str("?host=");
        out.push_str(&hosts.join(","));
        if let [port] = config.get_ports() {
            out.push_str(&format!("&port={port}"));
        }
    }
    out
}

impl std::fmt::Display for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgUrl({})", self.shown)
    }
}

/// The registry: a handle on the database, cheap to clone and share between threads.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    location: Location,
    /// This bootserver's site name: recorded on the tasks it starts.
    site: Option<String>,
    backend: Backend,
}

enum Backend {
    Sqlite {
        writer: Mutex<Connection>,
        reader: Mutex<Connection>,
    },
    Postgres {
        /// `None` until connected, and again after the connection broke (reconnected lazily).
        client: Mutex<Option<postgres::Client>>,
    },
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("location", &self.inner.location)
            .finish_non_exhaustive()
    }
}

/// Why a PostgreSQL server could not be used, in words an admin can act on.
fn connect_hint(e: &postgres::Error) -> &'static str {
    use postgres::error::SqlState;
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            "authentication failed: check the user and password in `database` and the \
             server's pg_hba.conf"
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => {
            "the database does not exist: create it (createdb) or fix the name in `database`"
        }
        Some(_) => "the server refused the connection",
        None => {
            "the server cannot be reached: is PostgreSQL running and listening at that \
             address (and the firewall open)?"
        }
    }
}

fn pg_connect(url: &PgUrl) -> Result<postgres::Client> {
    // The sync client runs its own small runtime, which cannot start inside a tokio runtime
    // (the bootserver's async handlers): every PostgreSQL call runs on a thread of its own.
    std::thread::scope(|s| {
        s.spawn(|| url.config.connect(postgres::NoTls))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
    .map_err(|source| Error::Connect {
        at: url.to_string(),
        why: connect_hint(&source),
        source,
    })
}

impl Registry {
    /// Opens (creating if needed) the SQLite database at `path` and brings its schema up to
    /// date. The directory must exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_at_version(path.as_ref(), SCHEMA_VERSION)
    }

    /// Opens `state_dir/`[`FILE_NAME`]. Callers moving from `leases.json` then call
    /// [`Registry::import_legacy_leases`] with `state_dir/leases.json`.
    pub fn open_in(state_dir: impl AsRef<Path>) -> Result<Self> {
        Self::open(state_dir.as_ref().join(FILE_NAME))
    }

    /// Opens the registry at `location` (connecting to PostgreSQL, creating or upgrading the
    /// schema), recording `site` on the tasks this handle starts.
    pub fn open_location(location: &Location, site: Option<&str>) -> Result<Self> {
        let mut registry = match location {
            Location::Sqlite(path) => Self::open(path)?,
            Location::Postgres(url) => Self::open_postgres(url, SCHEMA_VERSION)?,
        };
        if let Some(site) = site {
            let inner = Arc::get_mut(&mut registry.inner).ok_or_else(|| Error::Invalid {
                what: "site",
                value: site.into(),
                why: "the registry is already shared",
            })?;
            inner.site = Some(site.to_owned());
        }
        Ok(registry)
    }

    /// Checks that the registry at `location` can be used, changing nothing: a PostgreSQL
    /// server is reached, logged in to, and its schema is not newer than this code (what
    /// `check-config` reports). Returns the schema version found there (0: empty, created on
    /// first start); `None` for SQLite, whose file is created on first start.
    pub fn probe(location: &Location) -> Result<Option<u32>> {
        let Location::Postgres(url) = location else {
            return Ok(None);
        };
        let mut client = pg_connect(url)?;
        let at = url.to_string();
        let found = std::thread::scope(|s| {
            s.spawn(|| -> Result<u32> {
                let mut tx = client.transaction().map_err(|source| Error::Open {
                    at: at.clone(),
                    source: source.into(),
                })?;
                schema::pg_version(&mut tx).map_err(|source| Error::Open {
                    at: at.clone(),
                    source: source.into(),
                })
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        if found > SCHEMA_VERSION {
            return Err(Error::SchemaTooNew {
                at,
                found,
                known: SCHEMA_VERSION,
            });
        }
        Ok(Some(found))
    }

    pub(crate) fn open_postgres(url: &PgUrl, version: u32) -> Result<Self> {
        let mut client = pg_connect(url)?;
        let at = url.to_string();
        std::thread::scope(|s| {
            s.spawn(|| schema::pg_migrate(&mut client, &at, version))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                location: Location::Postgres(Box::new(url.clone())),
                site: None,
                backend: Backend::Postgres {
                    client: Mutex::new(Some(client)),
                },
            }),
        })
    }

    pub(crate) fn open_at_version(path: &Path, version: u32) -> Result<Self> {
        let at = path.display().to_string();
        let open_err = |source: rusqlite::Error| Error::Open {
            at: at.clone(),
            source: source.into(),
        };
        let mut writer = Connection::open(path).map_err(open_err)?;
        writer.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = writer
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::NoWal {
                path: path.into(),
                mode,
            });
        }
        writer
            .pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        writer
            .pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        schema::migrate(&mut writer, &at, version)?;

        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        reader.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        Ok(Self {
            inner: Arc::new(Inner {
                location: Location::Sqlite(path.into()),
                site: None,
                backend: Backend::Sqlite {
                    writer: Mutex::new(writer),
                    reader: Mutex::new(reader),
                },
            }),
        })
    }

    /// Where the database is (a file, or a PostgreSQL URL without its password).
    pub fn location(&self) -> &Location {
        &self.inner.location
    }

    /// This handle's site name.
    pub fn site(&self) -> Option<&str> {
        self.inner.site.as_deref()
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<u32> {
        let op = || "reading the schema version".to_string();
        match &self.inner.backend {
            Backend::Sqlite { reader, .. } => lock(reader)
                .query_row("PRAGMA user_version", [], |row| row.get(0))
                .map_err(|e| Error::from(e).context(op)),
            Backend::Postgres { .. } => self.pg(op, false, |tx| {
                let tx = tx.as_pg();
                schema::pg_version(tx).map_err(Error::from)
            }),
        }
    }

    /// Runs `f` in one write transaction and commits: SQLite's `BEGIN IMMEDIATE` (writes one
    /// at a time), PostgreSQL's `SERIALIZABLE` (as if one at a time; a transaction that
    /// conflicted with another server's is run again). `f`'s error (or a failed commit) rolls
    /// everything back. `op` names the operation in errors.
    fn write<T: Send>(
        &self,
        op: impl FnOnce() -> String,
        f: impl Fn(&mut dyn Sql) -> Result<T> + Send + Sync,
    ) -> Result<T> {
        match &self.inner.backend {
            Backend::Sqlite { writer, .. } => {
                let mut conn = lock(writer);
                let mut run = || {
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let value = f(&mut db::Lite(&tx))?;
                    tx.commit()?;
                    Ok(value)
                };
                run().map_err(|e: Error| e.context(op))
            }
            Backend::Postgres { .. } => self.pg(op, true, |tx| f(tx)),
        }
    }

    /// Runs `f` in one read transaction (a consistent snapshot).
    fn read<T: Send>(
        &self,
        op: impl FnOnce() -> String,
        f: impl Fn(&mut dyn Sql) -> Result<T> + Send + Sync,
    ) -> Result<T> {
        match &self.inner.backend {
            Backend::Sqlite { reader, .. } => {
                let mut conn = lock(reader);
                let mut run = || {
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
                    let value = f(&mut db::Lite(&tx))?;
                    tx.finish()?;
                    Ok(value)
                };
                run().map_err(|e: Error| e.context(op))
            }
            Backend::Postgres { .. } => self.pg(op, false, |tx| f(tx)),
        }
    }

    /// Runs `f` in a PostgreSQL transaction on a thread of its own (see [`pg_connect`]),
    /// reconnecting first if the connection broke.
    fn pg<T: Send>(
        &self,
        op: impl FnOnce() -> String,
        write: bool,
        f: impl Fn(&mut db::PgTx<'_, '_>) -> Result<T> + Send + Sync,
    ) -> Result<T> {
        let (Backend::Postgres { client }, Location::Postgres(url)) =
            (&self.inner.backend, &self.inner.location)
        else {
            unreachable!("pg() is only called on a PostgreSQL registry")
        };
        let mut guard = client.lock().unwrap_or_else(PoisonError::into_inner);
        let slot: &mut Option<postgres::Client> = &mut guard;
        let run = move || -> Result<T> {
            if slot.as_ref().is_none_or(postgres::Client::is_closed) {
                *slot = None;
                *slot = Some(pg_connect(url)?);
            }
            let Some(client) = slot.as_mut() else {
                unreachable!("connected above")
            };
            let mut attempt = 0;
            loop {
                attempt += 1;
                let result = (|| -> Result<T> {
                    let level = if write {
                        postgres::IsolationLevel::Serializable
                    } else {
                        postgres::IsolationLevel::RepeatableRead
                    };
                    let mut tx = client
                        .build_transaction()
                        .isolation_level(level)
                        .read_only(!write)
                        .start()?;
                    let value = f(&mut db::PgTx(&mut tx))?;
                    tx.commit()?;
                    Ok(value)
                })();
                match result {
                    Err(e) if e.is_busy() && write && attempt < PG_ATTEMPTS => continue,
                    other => return other,
                }
            }
        };
        std::thread::scope(|s| {
            s.spawn(run)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
        .map_err(|e: Error| e.context(op))
    }

    /// A number that changes whenever a change was committed since the last call, by this
    /// handle's writes or by another process on the same database (the admin's commands,
    /// another site's bootserver): what a live view polls to know it should read again. Cheap:
    /// no table is read. On PostgreSQL it is the server's write-ahead log position, which also
    /// moves with other databases' writes (a needless re-read, never a missed change).
    pub fn data_version(&self) -> Result<i64> {
        let op = || "reading the data version".to_string();
        match &self.inner.backend {
            Backend::Sqlite { reader, .. } => lock(reader)
                .query_row("PRAGMA data_version", [], |row| row.get(0))
                .map_err(|e| Error::from(e).context(op)),
            Backend::Postgres { .. } => self.pg(op, false, |tx| {
                let row = tx
                    .row("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])?
                    .ok_or_else(|| db::decode(0, "no row"))?;
                Ok(row.int(0)?)
            }),
        }
    }

    // ---- settings -------------------------------------------------------------------------

    /// The value of setting `key`.
    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        self.read(
            || format!("reading setting {key:?}"),
            |c| get_setting(c, key),
        )
    }

    /// Sets `key` to `value`.
    pub fn put_setting(&self, key: &str, value: &str) -> Result<()> {
        self.write(
            || format!("writing setting {key:?}"),
            |tx| put_setting(tx, key, value),
        )
    }

    /// Removes `key`; whether it was there.
    pub fn remove_setting(&self, key: &str) -> Result<bool> {
        self.write(
            || format!("removing setting {key:?}"),
            |tx| Ok(tx.exec("DELETE FROM settings WHERE key = ?1", args![key])? > 0),
        )
    }
}

/// A poisoned mutex only means another thread panicked while holding it; its transaction was
/// rolled back when dropped, so the connection is still good.
fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn get_setting(c: &mut dyn Sql, key: &str) -> Result<Option<String>> {
    c.row("SELECT value FROM settings WHERE key = ?1", args![key])?
        .map(|row| row.text(0))
        .transpose()
        .map_err(Error::from)
}

fn put_setting(c: &mut dyn Sql, key: &str, value: &str) -> Result<()> {
    c.exec(
        "INSERT INTO settings (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        args![key, value],
    )?;
    Ok(())
}

/// Unix seconds to SQLite's i64 (saturating: nothing realistic is past year 292 billion).
fn secs(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// SQLite's i64 back to unix seconds (negative values, which this crate never writes, read as 0).
fn unsecs(t: i64) -> u64 {
    u64::try_from(t).unwrap_or(0)
}

/// Checks that `text` is JSON (`what` names it in the error).
fn check_json(what: &'static str, text: &str) -> Result<()> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(drop)
        .map_err(|source| Error::InvalidJson { what, source })
}

/// An enum stored as text.
trait TextEnum: Sized + 'static {
    const ALL: &'static [Self];
    fn as_str(&self) -> &'static str;
}

/// Reads column `idx` as a [`TextEnum`], failing the row on an unknown value (only possible if
/// someone edited the database by hand).
fn enum_col<T: TextEnum + Copy>(row: &db::Row, idx: usize) -> Result<T, DbError> {
    let text = row.text(idx)?;
    T::ALL
        .iter()
        .find(|v| v.as_str() == text)
        .copied()
        .ok_or_else(|| db::decode(idx, BadValue(text)))
}

#[derive(Debug, thiserror::Error)]
#[error("unexpected value {0:?} in the database")]
struct BadValue(String);

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "diskcast-registry-unit-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(FILE_NAME)
    }

    #[test]
    fn the_data_version_moves_with_every_commit_of_any_connection() {
        let path = temp_db("data-version");
        let reg = Registry::open(&path).unwrap();
        let first = reg.data_version().unwrap();
        assert_eq!(reg.data_version().unwrap(), first, "nothing changed");
        reg.put_setting("a", "1").unwrap();
        let after_own = reg.data_version().unwrap();
        assert_ne!(after_own, first, "this handle's write");
        // Another process (here: another handle on the same file), as `bootserver task` is.
        Registry::open(&path)
            .unwrap()
            .put_setting("b", "2")
            .unwrap();
        let after_other = reg.data_version().unwrap();
        assert_ne!(after_other, after_own, "another connection's write");
        reg.setting("a").unwrap();
        assert_eq!(
            reg.data_version().unwrap(),
            after_other,
            "reads change nothing"
        );
    }

    #[test]
    fn connections_are_wal_full_sync_with_foreign_keys_and_a_busy_timeout() {
        let path = temp_db("pragmas");
        let reg = Registry::open(&path).unwrap();
        let Backend::Sqlite { writer, reader } = &reg.inner.backend else {
            unreachable!("an SQLite registry")
        };
        let writer = lock(writer);
        let pragma = |name: &str| -> i64 {
            writer
                .query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
                .unwrap()
        };
        assert_eq!(pragma("synchronous"), 2, "FULL");
        assert_eq!(pragma("foreign_keys"), 1);
        assert_eq!(pragma("busy_timeout"), 10_000);
        let mode: String = writer
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(writer);
        let reader = lock(reader);
        let timeout: i64 = reader
            .query_row("PRAGMA busy_timeout", [], |row| row.get(0))
            .unwrap();
        assert_eq!(timeout, 10_000);
        assert!(
            reader.execute("DELETE FROM settings", []).is_err(),
            "read-only"
        );
        drop(reader);
        drop(reg);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_v1_database_is_upgraded_keeping_its_data() {
        let path = temp_db("upgrade");
        let mac = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let lease = Lease {
            mac,
            address: std::net::Ipv4Addr::new(10, 0, 0, 5),
            expires: 1000,
        };
        let v1 = Registry::open_at_version(&path, 1).unwrap();
        assert_eq!(v1.schema_version().unwrap(), 1);
        v1.register(mac, Some("pc01"), Some("lab"), 5).unwrap();
        v1.put_lease(lease, 0).unwrap();
        v1.put_setting("admin_token_hash", "h").unwrap();
        assert!(v1.tasks(TaskFilter::default()).is_err(), "no tasks in v1");
        drop(v1);

        let reg = Registry::open(&path).unwrap();
        assert_eq!(reg.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(SCHEMA_VERSION, 3);
        let machine = reg.machine(mac).unwrap().unwrap();
        assert_eq!(machine.name.as_deref(), Some("pc01"));
        assert_eq!(reg.lease_for(mac).unwrap(), Some(lease));
        assert_eq!(
            reg.setting("admin_token_hash").unwrap().as_deref(),
            Some("h")
        );
        let new = NewTask {
            mac,
            kind: TaskKind::Inventory,
            options: "{}".into(),
            timeout_secs: 60,
        };
        reg.create_task(new, 10).unwrap();
        // Opening a v2 database at v1 does not downgrade it.
        drop(reg);
        let again = Registry::open_at_version(&path, 1).unwrap();
        assert_eq!(again.schema_version().unwrap(), SCHEMA_VERSION);
        drop(again);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn errors_name_the_operation() {
        let path = temp_db("op");
        let reg = Registry::open_at_version(&path, 1).unwrap();
        let err = reg.task(7).unwrap_err();
        assert_eq!(err.to_string(), "registry: reading task 7");
        assert!(!err.is_busy());
        drop(reg);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
