//! The one error type of the registry.

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
    #[error("opening registry database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "registry database {path} stays in journal mode {mode:?} instead of WAL; \
         keep the state directory on a local file system"
    )]
    NoWal { path: PathBuf, mode: String },
    #[error(
        "registry database {path} has schema version {found}, but this diskcast knows only up to \
         {known}: it was written by a newer diskcast; run that one, or restore a backup"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("migrating registry database {path} to schema version {version}")]
    Migrate {
        path: PathBuf,
        version: u32,
        #[source]
        source: rusqlite::Error,
    },
    /// A database error while doing `op` (e.g. "creating a task for 52:54:00:00:00:01").
    #[error("registry: {op}")]
    Db {
        op: String,
        #[source]
        source: rusqlite::Error,
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
    #[error("generating a task token")]
    Token {
        #[source]
        source: getrandom::Error,
    },
}

impl From<rusqlite::Error> for Error {
    /// A database error; the public method that saw it names its operation.
    fn from(source: rusqlite::Error) -> Self {
        Self::Db {
            op: String::new(),
            source,
        }
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

    /// A busy/locked database (another process held the write lock past the busy timeout).
    pub fn is_busy(&self) -> bool {
        let source = match self {
            Self::Db { source, .. } | Self::Open { source, .. } | Self::Migrate { source, .. } => {
                source
            }
            _ => return false,
        };
        matches!(
            source.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }
}
