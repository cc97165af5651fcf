//! One-shot tasks, their state machine (see the crate documentation) and their event history.

use crate::db::{args, decode, DbError, Row, Sql};
use crate::{
    check_json, enum_col, machines, secs, unsecs, Error, MacAddr, Registry, Result, TextEnum,
};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A task's id (SQLite rowid, PostgreSQL identity; never reused).
pub type TaskId = i64;

/// What a task does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TaskKind {
    /// Write `image` to the machine's disk.
    Deploy { image: String },
    /// Read the machine's disk into `image`.
    Capture { image: String },
    /// Only report the machine's inventory.
    Inventory,
    /// Write what a peer master (a USB stick, a machine with a `master` task) multicasts.
    Receive,
    /// Multicast this machine's disk to peers with `receive` tasks.
    Master,
}

impl TaskKind {
    fn name(&self) -> &'static str {
        match self {
            Self::Deploy { .. } => "deploy",
            Self::Capture { .. } => "capture",
            Self::Inventory => "inventory",
            Self::Receive => "receive",
            Self::Master => "master",
        }
    }

    pub fn image(&self) -> Option<&str> {
        match self {
            Self::Deploy { image } | Self::Capture { image } => Some(image),
            Self::Inventory | Self::Receive | Self::Master => None,
        }
    }

    /// Writes the machine's disk.
    pub fn writes_disk(&self) -> bool {
        matches!(self, Self::Deploy { .. } | Self::Receive)
    }
}

/// Where a task is. `Pending`, `Booted` and `Running` are open; the others are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    /// Created; the machine has not booted into the agent yet.
    Pending,
    /// The agent booted and picked the task up.
    Booted,
    /// The agent is working (disk chosen, session joined, progress).
    Running,
    /// Finished successfully (deploy verified, capture stored, inventory reported).
    Verified,
    Failed,
    Cancelled,
    TimedOut,
}

impl TaskState {
    /// Pending, booted or running.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Pending | Self::Booted | Self::Running)
    }
}

impl TextEnum for TaskState {
    const ALL: &'static [Self] = &[
        Self::Pending,
        Self::Booted,
        Self::Running,
        Self::Verified,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];
    fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Booted => "booted",
            Self::Running => "running",
            Self::Verified => "verified",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed-out",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub mac: MacAddr,
    pub kind: TaskKind,
    /// JSON text (disk selector, grow_last_partition, wake, ...), interpreted by the bootserver.
    pub options: String,
    /// The task times out after this many seconds without a report ([`Registry::expire`]).
    pub timeout_secs: u64,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    pub id: TaskId,
    pub mac: MacAddr,
    pub kind: TaskKind,
    pub state: TaskState,
    /// Why it failed, timed out or was cancelled.
    pub reason: Option<String>,
    pub options: String,
    pub timeout_secs: u64,
    pub created: u64,
    /// Its last change.
    pub updated: u64,
    /// When it reached a final state.
    pub finished: Option<u64>,
    /// Its creation or last report from the agent: silence is counted from here.
    pub last_activity: u64,
    /// The site (bootserver) that started the task's machine, when sites are named.
    pub site: Option<String>,
}

/// The secret the agent of a task proves itself with: 32 random bytes as 64 hex digits. Only
/// [`Registry::create_task`] returns it; the registry keeps only its BLAKE3 hash. Deliberately not
/// `PartialEq` (secrets are compared by [`Registry::task_by_token`], in constant time) nor
/// `Display`, and its `Debug` hides it, so it does not end up in logs by accident.
#[derive(Clone)]
pub struct TaskToken(String);

impl TaskToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Debug for TaskToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TaskToken(<secret>)")
    }
}

/// The agent's progress in a deploy or capture.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// 0 to 100.
    pub percent: f64,
    pub mb_per_s: f64,
    /// Chunks repaired (re-sent or re-read) so far.
    pub repairs: u64,
}

/// What an agent reports about its task.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// It booted and picked the task up: pending → booted.
    Booted,
    /// It chose the disk to work on: booted → running.
    DiskChosen { disk: String },
    /// It joined the multicast session: booted → running.
    Joined,
    /// Progress (booted → running; kept as the task's one latest progress event).
    Progress(Progress),
    /// Success: running → verified (inventory tasks also from booted).
    Verified,
    /// Failure: any open state → failed.
    Failed { reason: String },
}

impl Step {
    fn describe(&self) -> &'static str {
        match self {
            Self::Booted => "a booted report",
            Self::DiskChosen { .. } => "a disk-chosen report",
            Self::Joined => "a joined report",
            Self::Progress(_) => "a progress report",
            Self::Verified => "a verified report",
            Self::Failed { .. } => "a failed report",
        }
    }
}

/// A report from the agent at time `at`.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub at: u64,
    pub step: Step,
}

/// What a [`TaskEvent`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Created,
    Booted,
    DiskChosen,
    Joined,
    Progress,
    Verified,
    Failed,
    Cancelled,
    TimedOut,
}

impl TextEnum for EventKind {
    const ALL: &'static [Self] = &[
        Self::Created,
        Self::Booted,
        Self::DiskChosen,
        Self::Joined,
        Self::Progress,
        Self::Verified,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];
    fn as_str(&self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Booted => "booted",
            Self::DiskChosen => "disk-chosen",
            Self::Joined => "joined",
            Self::Progress => "progress",
            Self::Verified => "verified",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed-out",
        }
    }
}

/// One line of a task's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskEvent {
    pub id: i64,
    pub task_id: TaskId,
    pub at: u64,
    pub kind: EventKind,
    pub message: String,
    pub progress: Option<Progress>,
}

/// Which tasks [`Registry::tasks`] lists (newest first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskFilter {
    pub open_only: bool,
    pub mac: Option<MacAddr>,
    pub limit: Option<u32>,
}

/// The state `step` takes a task of `kind` in state `from` to, if allowed.
fn next_state(kind: &TaskKind, from: TaskState, step: &Step) -> Option<TaskState> {
    use TaskState::*;
    match (from, step) {
        // A machine that restarts during its task boots into it again.
        (Pending | Booted | Running, Step::Booted) => Some(Booted),
        (Booted | Running, Step::DiskChosen { .. } | Step::Joined | Step::Progress(_)) => {
            Some(Running)
        }
        (Running, Step::Verified) => Some(Verified),
        (Booted, Step::Verified) if *kind == TaskKind::Inventory => Some(Verified),
        (Pending | Booted | Running, Step::Failed { .. }) => Some(Failed),
        _ => None,
    }
}

const COLUMNS: &str = "id, mac, kind, image, state, reason, options, timeout_secs, created, \
                       updated, finished, last_activity, site";
const OPEN: &str = "('pending', 'booted', 'running')";

fn from_row(row: &Row) -> Result<Task, DbError> {
    let kind = row.text(2)?;
    let image = row.opt_text(3)?;
    let kind = match (kind.as_str(), image) {
        ("deploy", Some(image)) => TaskKind::Deploy { image },
        ("capture", Some(image)) => TaskKind::Capture { image },
        ("inventory", None) => TaskKind::Inventory,
        ("receive", None) => TaskKind::Receive,
        ("master", None) => TaskKind::Master,
        _ => return Err(decode(2, format!("task kind {kind:?} with this image"))),
    };
    Ok(Task {
        id: row.int(0)?,
        mac: row.parsed(1)?,
        kind,
        state: enum_col(row, 4)?,
        reason: row.opt_text(5)?,
        options: row.text(6)?,
        timeout_secs: unsecs(row.int(7)?),
        created: unsecs(row.int(8)?),
        updated: unsecs(row.int(9)?),
        finished: row.opt_int(10)?.map(unsecs),
        last_activity: unsecs(row.int(11)?),
        site: row.opt_text(12)?,
    })
}

fn get(c: &mut dyn Sql, id: TaskId) -> Result<Option<Task>> {
    let sql = format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1");
    Ok(c.row(&sql, args![id])?.map(|r| from_row(&r)).transpose()?)
}

fn must_get(c: &mut dyn Sql, id: TaskId) -> Result<Task> {
    get(c, id)?.ok_or(Error::NoSuchTask { task: id })
}

/// The open task of `mac`, if any.
pub(crate) fn open_task_id(c: &mut dyn Sql, mac: MacAddr) -> Result<Option<(TaskId, TaskState)>> {
    let sql = format!("SELECT id, state FROM tasks WHERE mac = ?1 AND state IN {OPEN}");
    let found = c.row(&sql, args![mac.to_string()])?;
    Ok(found
        .map(|row| Ok::<_, DbError>((row.int(0)?, enum_col(&row, 1)?)))
        .transpose()?)
}

fn add_event(
    c: &mut dyn Sql,
    task: TaskId,
    at: u64,
    kind: EventKind,
    message: &str,
    progress: Option<&Progress>,
) -> Result<()> {
    let progress = progress
        .map(serde_json::to_string)
        .transpose()
        .map_err(|source| Error::InvalidJson {
            what: "progress",
            source,
        })?;
    c.exec(
        "INSERT INTO task_events (task_id, at, kind, message, progress)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        args![task, secs(at), kind.as_str(), message, progress],
    )?;
    Ok(())
}

/// Moves task `id` to `state` at `at` and records `event`.
fn transition(
    c: &mut dyn Sql,
    task: &Task,
    state: TaskState,
    reason: Option<&str>,
    at: u64,
    event: (EventKind, &str, Option<&Progress>),
    from_agent: bool,
) -> Result<()> {
    let finished = (!state.is_open()).then_some(secs(at));
    c.exec(
        "UPDATE tasks SET state = ?2, reason = coalesce(?3, reason), finished = ?4, updated = ?5,
             last_activity = CASE WHEN ?6 THEN greatest(last_activity, ?5)
                                  ELSE last_activity END
         WHERE id = ?1",
        args![
            task.id,
            state.as_str(),
            reason,
            finished,
            secs(at),
            from_agent
        ],
    )?;
    let (kind, message, progress) = event;
    add_event(c, task.id, at, kind, message, progress)
}

fn random_token() -> Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|source| Error::Token { source })?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        if !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

fn check_progress(task: TaskId, p: &Progress) -> Result<()> {
    let valid = (0.0..=100.0).contains(&p.percent) && p.mb_per_s.is_finite() && p.mb_per_s >= 0.0;
    if !valid {
        return Err(Error::Invalid {
            what: "progress",
            value: format!("task {task}: {p:?}"),
            why: "percent must be 0 to 100 and MB/s a number at least 0",
        });
    }
    Ok(())
}

/// Checks what can be checked without the database and draws the task's token.
fn prepare(new: &NewTask) -> Result<[u8; 32]> {
    check_json("task options", &new.options)?;
    if let Some(image) = new.kind.image() {
        if image.is_empty() || image.chars().any(char::is_control) {
            return Err(Error::Invalid {
                what: "image name",
                value: image.into(),
                why: "it is empty or has control characters",
            });
        }
    }
    random_token()
}

fn insert_task(c: &mut dyn Sql, new: &NewTask, hash: &blake3::Hash, now: u64) -> Result<Task> {
    let NewTask {
        mac,
        kind,
        options,
        timeout_secs,
    } = new;
    let mac = *mac;
    if machines::get(c, mac)?.is_none() {
        return Err(Error::NoSuchMachine { mac });
    }
    if let Some((task, state)) = open_task_id(c, mac)? {
        return Err(Error::TaskOpen { mac, task, state });
    }
    let id = c
        .row(
            "INSERT INTO tasks (mac, kind, image, state, options, timeout_secs,
                 created, updated, last_activity, token_hash)
             VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6, ?6, ?6, ?7)
             RETURNING id",
            args![
                mac.to_string(),
                kind.name(),
                kind.image(),
                options,
                secs(*timeout_secs),
                secs(now),
                hash.as_bytes(),
            ],
        )?
        .ok_or_else(|| decode(0, "INSERT returned no id"))?
        .int(0)?;
    let message = match kind.image() {
        Some(image) => format!("{} {image}", kind.name()),
        None => kind.name().to_owned(),
    };
    add_event(c, id, now, EventKind::Created, &message, None)?;
    must_get(c, id)
}

impl Registry {
    /// Creates a pending task and returns it with its token (the only time the token is
    /// available). Refused when the machine is unknown or already has an open task.
    pub fn create_task(&self, new: NewTask, now: u64) -> Result<(Task, TaskToken)> {
        let token = prepare(&new)?;
        let task = self.write(
            || format!("creating a {} task for {}", new.kind.name(), new.mac),
            |tx| insert_task(tx, &new, &blake3::hash(&token), now),
        )?;
        Ok((task, TaskToken(hex(&token))))
    }

    /// Creates several tasks (e.g. one per member of a group) all or none: one unknown or busy
    /// machine, or the same machine twice, refuses the whole list.
    pub fn create_tasks(&self, news: Vec<NewTask>, now: u64) -> Result<Vec<(Task, TaskToken)>> {
        let tokens = news.iter().map(prepare).collect::<Result<Vec<_>>>()?;
        let tasks = self.write(
            || format!("creating {} tasks", news.len()),
            |tx| {
                news.iter()
                    .zip(&tokens)
                    .map(|(new, token)| insert_task(tx, new, &blake3::hash(token), now))
                    .collect::<Result<Vec<_>>>()
            },
        )?;
        Ok(tasks
            .into_iter()
            .zip(tokens)
            .map(|(task, token)| (task, TaskToken(hex(&token))))
            .collect())
    }

    /// Applies an agent's report to task `id`: moves its state as the state machine allows,
    /// refreshes `last_activity`, and records the event (a progress event replaces the task's
    /// previous one). A report the state machine does not allow changes nothing.
    pub fn report(&self, id: TaskId, report: Report) -> Result<Task> {
        let Report { at, step } = report;
        if let Step::Progress(p) = &step {
            check_progress(id, p)?;
        }
        self.write(
            || format!("recording a report on task {id}"),
            |tx| {
                let task = must_get(tx, id)?;
                let state =
                    next_state(&task.kind, task.state, &step).ok_or(Error::IllegalTransition {
                        task: id,
                        from: task.state,
                        action: step.describe(),
                    })?;
                let progress_message;
                let (kind, message, progress, reason) = match &step {
                    Step::Booted => (EventKind::Booted, "the agent booted", None, None),
                    Step::DiskChosen { disk } => (EventKind::DiskChosen, disk.as_str(), None, None),
                    Step::Joined => (EventKind::Joined, "joined the session", None, None),
                    Step::Progress(p) => {
                        tx.exec(
                            "DELETE FROM task_events WHERE task_id = ?1 AND kind = 'progress'",
                            args![id],
                        )?;
                        progress_message = format!(
                            "{:.1}% at {:.1} MB/s, {} repairs",
                            p.percent, p.mb_per_s, p.repairs
                        );
                        (
                            EventKind::Progress,
                            progress_message.as_str(),
                            Some(p),
                            None,
                        )
                    }
                    Step::Verified => (EventKind::Verified, "verified", None, None),
                    Step::Failed { reason } => (
                        EventKind::Failed,
                        reason.as_str(),
                        None,
                        Some(reason.as_str()),
                    ),
                };
                transition(
                    tx,
                    &task,
                    state,
                    reason,
                    at,
                    (kind, message, progress),
                    true,
                )?;
                must_get(tx, id)
            },
        )
    }

    /// Cancels open task `id`.
    pub fn cancel(&self, id: TaskId, now: u64) -> Result<Task> {
        self.write(
            || format!("cancelling task {id}"),
            |tx| {
                let task = must_get(tx, id)?;
                if !task.state.is_open() {
                    return Err(Error::IllegalTransition {
                        task: id,
                        from: task.state,
                        action: "cancelling",
                    });
                }
                let event = (EventKind::Cancelled, "cancelled", None);
                transition(
                    tx,
                    &task,
                    TaskState::Cancelled,
                    Some("cancelled"),
                    now,
                    event,
                    false,
                )?;
                must_get(tx, id)
            },
        )
    }

    /// Times out the open tasks silent for more than their `timeout_secs` at `now`; returns them.
    pub fn expire(&self, now: u64) -> Result<Vec<Task>> {
        self.write(
            || "timing out silent tasks".into(),
            |tx| {
                let sql = format!(
                    "SELECT {COLUMNS} FROM tasks
                     WHERE state IN {OPEN} AND ?1 - last_activity > timeout_secs ORDER BY id"
                );
                let silent = tx
                    .rows(&sql, args![secs(now)])?
                    .iter()
                    .map(from_row)
                    .collect::<Result<Vec<_>, DbError>>()?;
                let mut expired = Vec::with_capacity(silent.len());
                for task in silent {
                    let reason = format!(
                        "no report for {} s (timeout {} s)",
                        now.saturating_sub(task.last_activity),
                        task.timeout_secs
                    );
                    let event = (EventKind::TimedOut, reason.as_str(), None);
                    transition(
                        tx,
                        &task,
                        TaskState::TimedOut,
                        Some(&reason),
                        now,
                        event,
                        false,
                    )?;
                    expired.push(must_get(tx, task.id)?);
                }
                Ok(expired)
            },
        )
    }

    /// Task `id`.
    pub fn task(&self, id: TaskId) -> Result<Option<Task>> {
        self.read(|| format!("reading task {id}"), |c| get(c, id))
    }

    /// The open (pending, booted or running) task of `mac`.
    pub fn open_task_for(&self, mac: MacAddr) -> Result<Option<Task>> {
        self.read(
            || format!("reading the open task of {mac}"),
            |c| match open_task_id(c, mac)? {
                Some((id, _)) => get(c, id),
                None => Ok(None),
            },
        )
    }

    /// Tasks, newest first.
    pub fn tasks(&self, filter: TaskFilter) -> Result<Vec<Task>> {
        self.read(
            || "listing tasks".into(),
            |c| {
                let sql = format!(
                    "SELECT {COLUMNS} FROM tasks
                     WHERE (NOT ?1 OR state IN {OPEN})
                       AND (CAST(?2 AS TEXT) IS NULL OR mac = ?2)
                     ORDER BY id DESC LIMIT ?3"
                );
                let limit = filter.limit.map_or(i64::MAX, i64::from);
                let mac = filter.mac.map(|m| m.to_string());
                let tasks = c
                    .rows(&sql, args![filter.open_only, mac, limit])?
                    .iter()
                    .map(from_row)
                    .collect::<Result<_, DbError>>()?;
                Ok(tasks)
            },
        )
    }

    /// A fresh token for open task `id`, replacing the one before: the bootserver issues one per
    /// boot of the task's machine, so the registry never holds a usable secret and an agent of an
    /// earlier boot can no longer report. A named site ([`Registry::open_location`]) claims
    /// the task; another site is then refused ([`Error::ClaimedElsewhere`]).
    pub fn issue_token(&self, id: TaskId) -> Result<TaskToken> {
        let token = random_token()?;
        self.write(
            || format!("issuing a token for task {id}"),
            |tx| {
                let task = must_get(tx, id)?;
                if !task.state.is_open() {
                    return Err(Error::IllegalTransition {
                        task: id,
                        from: task.state,
                        action: "issuing a token",
                    });
                }
                // With several sites on one registry, the first site to start a task's machine
                // claims the task: exactly one server carries it out (the write is serialized,
                // so two sites racing for it cannot both win). The machine booting again at the
                // same site is fine; to move the task, cancel it and create it again.
                if let (Some(here), Some(there)) = (self.site(), task.site.as_deref()) {
                    if here != there {
                        return Err(Error::ClaimedElsewhere {
                            task: id,
                            state: task.state,
                            site: there.into(),
                            here: here.into(),
                        });
                    }
                }
                tx.exec(
                    "UPDATE tasks SET token_hash = ?2, site = coalesce(?3, site) WHERE id = ?1",
                    args![id, blake3::hash(&token).as_bytes(), self.site()],
                )?;
                Ok(())
            },
        )?;
        Ok(TaskToken(hex(&token)))
    }

    /// The task this token belongs to (in any state); `None` for an unknown or malformed token.
    pub fn task_by_token(&self, token: &str) -> Result<Option<Task>> {
        let Some(bytes) = unhex32(token) else {
            return Ok(None);
        };
        let hash = blake3::hash(&bytes);
        self.read(
            || "looking up a task token".into(),
            |c| {
                let sql = format!("SELECT {COLUMNS}, token_hash FROM tasks WHERE token_hash = ?1");
                let found = c
                    .row(&sql, args![hash.as_bytes()])?
                    .map(|row| Ok::<_, DbError>((from_row(&row)?, row.blob(13)?)))
                    .transpose()?;
                // The index finds the row by hash; the secret-derived bytes are still compared
                // in constant time (blake3::Hash's equality) before the task is handed out.
                Ok(found.and_then(|(task, stored)| {
                    let stored = blake3::Hash::from_bytes(<[u8; 32]>::try_from(stored).ok()?);
                    (stored == hash).then_some(task)
                }))
            },
        )
    }

    /// The history of task `id`, oldest first (empty for an unknown task).
    pub fn events(&self, id: TaskId) -> Result<Vec<TaskEvent>> {
        self.read(
            || format!("reading the events of task {id}"),
            |c| {
                let events = c
                    .rows(
                        "SELECT id, task_id, at, kind, message, progress FROM task_events
                         WHERE task_id = ?1 ORDER BY id",
                        args![id],
                    )?
                    .iter()
                    .map(|row| {
                        let progress = row
                            .opt_text(5)?
                            .map(|p| serde_json::from_str(&p))
                            .transpose()
                            .map_err(|e| decode(5, e))?;
                        Ok(TaskEvent {
                            id: row.int(0)?,
                            task_id: row.int(1)?,
                            at: unsecs(row.int(2)?),
                            kind: enum_col(row, 3)?,
                            message: row.text(4)?,
                            progress,
                        })
                    })
                    .collect::<Result<_, DbError>>()?;
                Ok(events)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        let text = hex(&bytes);
        assert_eq!(text.len(), 64);
        assert_eq!(unhex32(&text), Some(bytes));
        assert_eq!(unhex32(&text.to_uppercase()), Some(bytes));
        assert_eq!(unhex32(&text[1..]), None);
        assert_eq!(unhex32(&format!("+{}", &text[1..])), None);
    }
}
