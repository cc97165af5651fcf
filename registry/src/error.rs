//! The one error type of the registry.

use crate::db::DbError;
use crate::{MacAddr, TaskId, TaskState};
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// `Result` with the registry's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the registry. Each variant names what was being done and on
/// what (database path, MAC, task id).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `at` is the SQLite file, or the PostgreSQL URL without its password.
    #[error("opening registry database {at}")]
    Open {
        at: String,
        #[source]
        source: DbError,
    },
    #[error("cannot connect to registry database {at}: {why}")]
    Connect {
        at: String,
        why: &'static str,
        #[source]
        source: postgres::Error,
    },
    #[error("invalid registry database URL: {why}")]
    BadUrl { why: String },
    #[error(
        "registry database {path} stays in journal mode {mode:?} instead of WAL; \
         keep the state directory on a local file system"
    )]
    NoWal { path: PathBuf, mode: String },
    #[error(
        "registry database {at} has schema version {found}, but this diskcast knows only up to \
         {known}: it was written by a newer diskcast; run that one, or restore a backup"
    )]
    SchemaTooNew { at: String, found: u32, known: u32 },
    #[error("migrating registry database {at} to schema version {version}")]
    Migrate {
        at: String,
        version: u32,
        #[source]
        source: DbError,
    },
    /// A database error while doing `op` (e.g. "creating a task for 52:54:00:00:00:01").
    #[error("registry: {op}")]
    Db {
        op: String,
        #[source]
        source: DbError,
    },
    #[error("no machine {mac} in the registry (register it, or let it network-boot once)")]
    NoSuchMachine { mac: MacAddr },
    #[error("no machine is named {name:?}")]
    UnknownName { name: String },
    #[error("group @{group} has no machines")]
    EmptyGroup { group: String },
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("the name {name:?} is already used by {holder}")]
    NameTaken { name: String, holder: MacAddr },
    #[error("cannot forget {mac}: its task {task} is still {state}; cancel it first")]
    MachineBusy {
        mac: MacAddr,
        task: TaskId,
        state: TaskState,
    },
    #[error("{mac} already has task {task} ({state}); cancel it or let it finish first")]
    TaskOpen {
        mac: MacAddr,
        task: TaskId,
        state: TaskState,
    },
    #[error("no task {task}")]
    NoSuchTask { task: TaskId },
    #[error("task {task} is {from}: {action} is not allowed")]
    IllegalTransition {
        task: TaskId,
        from: TaskState,
        action: &'static str,
    },
    #[error("{what} is not valid JSON")]
    InvalidJson {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("address {address} is leased to {holder} until {expires}")]
    AddressTaken {
        address: Ipv4Addr,
        holder: MacAddr,
        expires: u64,
    },
    #[error("reading legacy lease file {path}")]
    LegacyRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "legacy lease file {path} is corrupt; fix it, or move it away to start without its \
         leases (machines then get new addresses)"
    )]
    LegacyCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("renaming legacy lease file {from} to {to} after importing it")]
    LegacyRename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "task {task} ({state}) was claimed by site {site:?}; it cannot be started at {here:?} \
         too (cancel it and create it again to move it)"
    )]
    ClaimedElsewhere {
        task: TaskId,
        state: TaskState,
        site: String,
        here: String,
    },
    #[error("generating a task token")]
    Token {
        #[source]
        source: getrandom::Error,
    },
}

impl From<DbError> for Error {
    /// A database error; the public method that saw it names its operation.
    fn from(source: DbError) -> Self {
        Self::Db {
            op: String::new(),
            source,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(source: rusqlite::Error) -> Self {
        DbError::from(source).into()
    }
}

impl From<postgres::Error> for Error {
    fn from(source: postgres::Error) -> Self {
        DbError::from(source).into()
    }
}

impl Error {
    /// Names the operation of a database error that does not have one yet.
    pub(crate) fn context(self, op: impl FnOnce() -> String) -> Self {
        match self {
            Self::Db { op: o, source } if o.is_empty() => Self::Db { op: op(), source },
            other => other,
        }
    }

    /// A busy/locked database (another process held the write lock past the busy timeout), or
    /// a PostgreSQL write that kept conflicting with other servers' writes.
    pub fn is_busy(&self) -> bool {
        match self {
            Self::Db { source, .. } | Self::Open { source, .. } | Self::Migrate { source, .. } => {
                source.is_busy()
            }
            _ => false,
        }
    }
}
