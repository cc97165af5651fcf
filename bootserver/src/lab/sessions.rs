//! Deploy sessions started by tasks: while machines have open deploy tasks for an image, a
//! session multicasts it to them. It starts when all of them joined (or after the start
//! timeout, with whoever did), reports each machine's progress and result into its task, and
//! ends; machines still left (they joined late, or failed) get the next session.

use super::boot::TaskOptions;
use super::Lab;
use crate::store::ImageSummary;
use diskcast_proto::mac::MacAddr;
use diskcast_proto::sender::{ReceiverFailure, Sender, SenderEvent};
use diskcast_proto::wire::ReceiverState;
use diskcast_registry::{Progress, Report, Step, TaskFilter, TaskId, TaskKind};
use diskcast_transport::send::{self, Observer, SendOptions};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Live views of the running sessions, by image: what the API and the web console show.
#[derive(Debug, Default, Clone)]
pub struct Sessions {
    running: Arc<Mutex<BTreeMap<String, SessionView>>>,
    /// Counts changes of the views; the console's event stream waits on it.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// The multicast group of each image with machines to serve.
    pub groups: super::session_plan::Groups,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionView {
    pub image: String,
    pub group: String,
    pub port: u16,
    /// The UDP port it serves relays on: machines on subnets the multicast does not reach
    /// subscribe there (`agent relay --upstream SERVER:PORT`, `diskcast.role=relay`).
    pub relay_port: u16,
    /// The interface it multicasts on and its TTL.
    pub interface: String,
    pub ttl: u8,
    /// Machines it will not reach as configured (behind a router with TTL 1, another interface).
    pub warnings: Vec<String>,
    /// `waiting` for its machines, `sending`, or `ended`.
    pub phase: &'static str,
    pub waiting_for: u32,
    /// Machines the session stopped waiting for, and why (their task failed or was cancelled
    /// before they joined).
    pub not_waiting_for: Vec<String>,
    pub rate_mbps: f64,
    pub receivers: Vec<ReceiverView>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReceiverView {
    pub mac: String,
    pub address: Option<String>,
    pub state: &'static str,
    pub percent: f64,
    pub mb_per_s: f64,
    pub repairs: u64,
    /// At the rate so far; `None` until data moved, and once final.
    pub seconds_left: Option<f64>,
    pub failure: Option<String>,
    /// It is a relay: it re-multicasts the session into its own subnet.
    pub relay: bool,
    /// A relay's local receiver: the relay (its name) it receives the session through.
    pub via: Option<String>,
}

impl Sessions {
    pub fn views(&self) -> Vec<SessionView> {
        self.running
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Wakes up whenever a view changes (a session's progress, about once a second).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn is_running(&self, image: &str) -> bool {
        self.running.lock().is_ok_and(|r| r.contains_key(image))
    }

    fn update(&self, view: SessionView) {
        if let Ok(mut running) = self.running.lock() {
            running.insert(view.image.clone(), view);
        }
        self.changed();
    }

    fn end(&self, image: &str) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(image);
        }
        self.changed();
    }
}

/// How often the manager looks for deploy tasks without a session.
const POLL: Duration = Duration::from_secs(2);
/// A task's progress is written to the registry at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Runs forever: starts a session for every image with open deploy tasks and none running, and
/// times out silent tasks.
pub fn manage(lab: Arc<Lab>) {
    let mut told_missing: HashMap<String, Instant> = HashMap::new();
    loop {
        let now = crate::unix_now();
        match lab.registry.expire(now) {
            Ok(expired) => {
                for task in expired {
                    log::warn!(
                        "lab: task {} for {} timed out ({} s without a word from the machine)",
                        task.id,
                        task.mac,
                        task.timeout_secs
                    );
                }
            }
            Err(e) => log::error!("lab: timing out tasks: {}", diskcast_proto::error_chain(&e)),
        }
        let open = lab.registry.tasks(TaskFilter {
            open_only: true,
            ..TaskFilter::default()
        });
        let open = match open {
            Ok(open) => open,
            Err(e) => {
                log::error!("lab: listing tasks: {}", diskcast_proto::error_chain(&e));
                std::thread::sleep(POLL);
                continue;
            }
        };
        let mut by_image: BTreeMap<String, SessionTasks> = BTreeMap::new();
        for task in open {
            // Sites sharing one registry each serve the tasks they claimed (their machine
            // network-booted there); a task another site carries out, or one no site's machine
            // has booted for yet, is not this site's to start a session for (or to fail).
            if let Some(here) = lab.registry.site() {
                if task.site.as_deref() != Some(here) {
                    continue;
                }
            }
            if let TaskKind::Deploy { image } = &task.kind {
                let options = TaskOptions::of(&task);
                let tasks = by_image.entry(image.clone()).or_default();
                match options.relay.as_deref().map(str::parse::<MacAddr>) {
                    Some(Ok(relay)) => tasks.far.push(FarTask {
                        mac: task.mac,
                        task: task.id,
                        relay,
                    }),
                    _ => {
                        if options.is_relay() {
                            tasks.relays.push(task.mac);
                        }
                        tasks.direct.push((task.mac, task.id));
                    }
                }
            }
        }
        // An image's group stays its own while machines wait for it or a session runs.
        let running: Vec<String> = lab.sessions.views().into_iter().map(|v| v.image).collect();
        let active: Vec<&str> = by_image
            .keys()
            .chain(&running)
            .map(String::as_str)
            .collect();
        lab.sessions.groups.keep_only(&active);
        for (image, mut machines) in by_image {
            if lab.sessions.is_running(&image) {
                continue;
            }
            // Machines behind a relay whose task ended (it relayed its session, failed or
            // timed out) have nothing left to carry the session to their subnet.
            fail_orphans(&lab, &image, &mut machines);
            if machines.direct.is_empty() {
                continue;
            }
            if lab.store.open_image(&image).is_err() {
                let recently = told_missing
                    .get(&image)
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
                if !recently {
                    log::warn!(
                        "lab: deploy tasks wait for image {image:?}, which is not in the store"
                    );
                    told_missing.insert(image, Instant::now());
                }
                continue;
            }
            // Where it will run is known before its thread plans the rest: relays may be
            // pointed at its relay port while the machines boot.
            let session = lab.image_session(&image);
            let view = SessionView {
                image: image.clone(),
                group: session.group.to_string(),
                port: session.port,
                relay_port: crate::config::relay_port_for(session.group, session.relay_port),
                phase: "waiting",
                waiting_for: machines.direct.len() as u32,
                ..SessionView::default()
            };
            lab.sessions.update(view);
            let lab = Arc::clone(&lab);
            let spawned = std::thread::Builder::new()
                .name(format!("deploy-{image}"))
                .spawn(move || {
                    run_session(&lab, &image, &machines);
                    lab.sessions.end(&image);
                });
            if let Err(e) = spawned {
                log::error!("lab: starting a deploy session: {e}");
            }
        }
        std::thread::sleep(POLL);
    }
}

/// The open deploy tasks of one image.
#[derive(Debug, Default)]
struct SessionTasks {
    /// Those whose machine joins the session itself: slaves the multicast reaches, and relays.
    direct: Vec<(MacAddr, TaskId)>,
    /// Of those, the relays' machines (behind routers: the multicast is not meant to reach
    /// them, they subscribe by unicast).
    relays: Vec<MacAddr>,
    /// Machines that join through their subnet's relay.
    far: Vec<FarTask>,
}

/// A deploy task whose machine joins the session through its subnet's relay.
#[derive(Debug, Clone, PartialEq)]
struct FarTask {
    mac: MacAddr,
    task: TaskId,
    relay: MacAddr,
}

/// Fails the far tasks of `image` whose relay has no open task of it any more (it ended its
/// session, failed, timed out or was cancelled) and drops them from `tasks`.
fn fail_orphans(lab: &Lab, image: &str, tasks: &mut SessionTasks) {
    let direct = tasks.direct.clone();
    tasks.far.retain(|far| {
        if direct.iter().any(|(mac, _)| *mac == far.relay) {
            return true;
        }
        let last = lab
            .registry
            .tasks(TaskFilter {
                mac: Some(far.relay),
                limit: Some(1),
                ..TaskFilter::default()
            })
            .ok()
            .and_then(|t| t.into_iter().next());
        // Still open but not among this site's (sites sharing a registry: no site has claimed
        // it yet, its machine has not booted): the far machine waits for it.
        if last.as_ref().is_some_and(|t| t.state.is_open()) {
            return true;
        }
        let reason = orphan_reason(far, last.as_ref());
        log::warn!(
            "lab: {} does not receive {image} (task {}): {reason}",
            far.mac,
            far.task
        );
        let step = Step::Failed { reason };
        if let Err(e) = lab.registry.report(
            far.task,
            Report {
                at: crate::unix_now(),
                step,
            },
        ) {
            log::error!(
                "lab: task {}: {}",
                far.task,
                diskcast_proto::error_chain(&e)
            );
        }
        false
    });
}

/// Why a far task fails when its relay's task (`last`, its latest) is no longer open.
fn orphan_reason(far: &FarTask, last: Option<&diskcast_registry::Task>) -> String {
    let relay = far.relay;
    let how = match last {
        Some(t) => match &t.reason {
            Some(reason) => format!("its task {} {}: {reason}", t.id, t.state),
            None => format!("its task {} {}", t.id, t.state),
        },
        None => "it has no task".into(),
    };
    format!(
        "its relay {relay} is done ({how}) and reported no result for it: it never joined the \
         relay's session on its subnet; check that it boots and reaches the relay, then create \
         the task again"
    )
}

/// One session of `image` for `tasks` (open deploy tasks, with their machines).
fn run_session(lab: &Lab, image: &str, all: &SessionTasks) {
    let tasks = all.direct.as_slice();
    let machines: Vec<MacAddr> = tasks.iter().map(|(mac, _)| *mac).collect();
    let machines = machines.as_slice();
    // Where the multicast must reach: the machines that join it there (relays subscribe by
    // unicast, far machines join their relay).
    let multicast_to: Vec<MacAddr> = machines
        .iter()
        .copied()
        .filter(|m| !all.relays.contains(m))
        .collect();
    let plan = lab.session_plan(image, &multicast_to);
    for warning in &plan.warnings {
        log::warn!("lab: {warning}");
    }
    let session = plan.session.clone();
    let mut opts = SendOptions::new(Some(plan.interface.clone()), session.group, session.port);
    opts.ttl = plan.ttl;
    opts.min_receivers = machines.len() as u32;
    opts.start_timeout = Some(
        session
            .start_timeout
            .unwrap_or(lab.config.lab.start_timeout),
    );
    opts.deadline = session.deadline;
    if let Some(rate) = session.rate {
        opts.max_rate = rate;
    }
    if let Some(rate) = session.min_rate {
        opts.min_rate = rate;
    }
    opts.signing_key = Some(lab.key.clone());
    // Relays on subnets the multicast does not reach subscribe to this port (the same rules
    // as `agent send --relay-port`: unicast copies only for subscribed relays).
    let relay_port = crate::config::relay_port_for(session.group, session.relay_port);
    opts.relay_port = Some(relay_port);
    // Its signature and every chunk are checked before any machine hears of it: an image
    // changed on disk, unsigned or signed by an unknown key is never sent, and the tasks that
    // wait for it fail saying why (instead of waiting for it forever).
    let mut stored = match lab.store.open_trusted(image) {
        Ok(stored) => stored,
        Err(e) => {
            let reason = diskcast_proto::error_chain(&e);
            log::error!("lab: image {image:?} is not deployed: {reason}");
            for mac in machines {
                let task = lab.registry.open_task_for(*mac).ok().flatten();
                if let Some(task) =
                    task.filter(|t| matches!(&t.kind, TaskKind::Deploy { image: i } if i == image))
                {
                    let step = Step::Failed {
                        reason: format!("image {image:?} is not deployed: {reason}"),
                    };
                    let at = crate::unix_now();
                    if let Err(e) = lab.registry.report(task.id, Report { at, step }) {
                        log::error!("lab: task {}: {}", task.id, diskcast_proto::error_chain(&e));
                    }
                }
            }
            return;
        }
    };
    log::info!(
        "lab: session for image {image:?} ({}) on {}:{} via {} with TTL {}, relays on port {relay_port}, waiting for {} machine(s)",
        ImageSummary::of(image, &stored).sizes(),
        session.group,
        session.port,
        plan.interface,
        plan.ttl,
        machines.len()
    );
    for far in &all.far {
        log::info!(
            "lab: {} receives {image} through relay {} (task {})",
            far.mac,
            far.relay,
            far.task
        );
    }
    let manifest = stored.manifest.clone();
    let mut observer = TaskObserver {
        lab,
        image,
        group: session.group.to_string(),
        port: session.port,
        relay_port,
        interface: plan.interface.clone(),
        ttl: plan.ttl,
        warnings: plan.warnings.clone(),
        waiting_for: machines.len() as u32,
        tasks,
        not_waiting_for: Vec::new(),
        last_progress: HashMap::new(),
        joined: Vec::new(),
        finished: Vec::new(),
        ignored_rows: Default::default(),
    };
    match send::multicast(&opts, manifest, &mut stored, &mut observer) {
        Ok(summary) if summary.outcome == diskcast_proto::sender::Outcome::NobodyExpected => {
            log::info!(
                "lab: session for image {image:?} ended before it started: every machine it waited for failed or was cancelled"
            );
        }
        Ok(summary) => {
            for line in summary.render().lines() {
                log::info!("lab: deploy {image}: {line}");
            }
        }
        Err(send::SendError::NobodyExpected) => log::info!(
            "lab: session for image {image:?} ended before it started: every machine it waited for failed or was cancelled"
        ),
        Err(e) => log::error!("lab: deploy {image}: {}", diskcast_proto::error_chain(&e)),
    }
}

/// Carries what the sender sees into the machines' tasks and the live view.
struct TaskObserver<'a> {
    lab: &'a Lab,
    image: &'a str,
    group: String,
    port: u16,
    relay_port: u16,
    interface: String,
    ttl: u8,
    warnings: Vec<String>,
    waiting_for: u32,
    /// The tasks the session was started for.
    tasks: &'a [(MacAddr, TaskId)],
    /// Those it stopped waiting for: machine, and why.
    not_waiting_for: Vec<(MacAddr, String)>,
    last_progress: HashMap<MacAddr, Instant>,
    joined: Vec<MacAddr>,
    /// Machines behind relays whose result was carried into their task.
    finished: Vec<MacAddr>,
    /// Rows of relays' reports that name no machine of theirs (logged once).
    ignored_rows: std::collections::HashSet<(String, String)>,
}

impl TaskObserver<'_> {
    /// The open deploy task of this image for the receiver called `name` (slaves are named by
    /// their MAC, relays booted for a task `relay MAC`).
    fn task_of(&self, name: &str) -> Option<(MacAddr, i64)> {
        let mac = machine_of(name)?;
        let task = self.lab.registry.open_task_for(mac).ok()??;
        match &task.kind {
            TaskKind::Deploy { image } if image == self.image => Some((mac, task.id)),
            _ => None,
        }
    }

    /// The open deploy task of this image of the machine a relay reported as `name`, when that
    /// task names `relay` as its relay. A relay's report is believed for its own subnet's
    /// machines only: the names in it are what joiners called themselves there, so a row under
    /// another machine's MAC (a near slave, another relay's machine, the relay itself) would
    /// otherwise close a task whose disk nobody wrote.
    fn far_task_of(&self, name: &str, relay: &str) -> Option<(MacAddr, i64)> {
        let relay = machine_of(relay)?;
        let mac = machine_of(name)?;
        let task = self.lab.registry.open_task_for(mac).ok()??;
        behind_relay(&task, self.image, relay).then_some((mac, task.id))
    }

    /// Carries what relays reported of their local receivers into those machines' tasks:
    /// joined, progress, and the result (verified, or failed with the reason).
    fn sync_downstream(&mut self, sender: &Sender, now: Instant) {
        let rows: Vec<(String, diskcast_proto::wire::DownstreamEntry)> = sender
            .receivers()
            .flat_map(|r| {
                r.downstream
                    .values()
                    .map(|d| (r.name.clone(), d.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (relay, d) in rows {
            let Some((mac, task)) = self.far_task_of(&d.name, &relay) else {
                if self.ignored_rows.insert((relay.clone(), d.name.clone())) {
                    log::warn!(
                        "lab: {relay} reported {:?}, which has no open task of {} behind it: not \
                         recorded",
                        d.name,
                        self.image
                    );
                }
                continue;
            };
            if self.finished.contains(&mac) {
                continue;
            }
            if !self.joined.contains(&mac) {
                self.joined.push(mac);
                self.report(task, Step::Joined);
            }
            match d.state {
                ReceiverState::Done => {
                    log::info!(
                        "lab: {mac} verified its copy of {} through {relay} (task {task})",
                        self.image
                    );
                    self.finished.push(mac);
                    self.report(task, Step::Verified);
                }
                ReceiverState::Failed => {
                    let why = if d.reason.is_empty() {
                        "failed".to_string()
                    } else {
                        d.reason.clone()
                    };
                    log::warn!(
                        "lab: {mac} failed to receive {} through {relay} (task {task}): {why}",
                        self.image
                    );
                    self.finished.push(mac);
                    self.report(
                        task,
                        Step::Failed {
                            reason: format!("{why} (reported by {relay})"),
                        },
                    );
                }
                _ => {
                    let due = self
                        .last_progress
                        .get(&mac)
                        .is_none_or(|t| now.duration_since(*t) >= PROGRESS_EVERY);
                    if due && d.chunks_done > 0 {
                        self.last_progress.insert(mac, now);
                        let total = f64::from(d.chunks_total.max(1));
                        let percent = (100.0 * f64::from(d.chunks_done) / total).min(100.0);
                        self.report(
                            task,
                            Step::Progress(Progress {
                                percent,
                                mb_per_s: 0.0,
                                repairs: 0,
                            }),
                        );
                    }
                }
            }
        }
    }

    fn report(&self, task: i64, step: Step) {
        let at = crate::unix_now();
        if let Err(e) = self.lab.registry.report(task, Report { at, step }) {
            // The agent reports the same steps; whoever comes second is told it is late.
            log::debug!("lab: task {task}: {}", diskcast_proto::error_chain(&e));
        }
    }
}

impl Observer for &mut TaskObserver<'_> {
    fn progress(&mut self, sender: &Sender) {
        let now = Instant::now();
        let manifest = sender.manifest();
        let data_chunks = manifest.data_chunks().count().max(1) as f64;
        let other_chunks = manifest.chunk_count() as usize - manifest.data_chunks().count();
        let mut receivers = Vec::new();
        let mut downstream = Vec::new();
        for r in sender.receivers() {
            downstream.extend(downstream_views(&r.name, r.downstream.values()));
            let data_done = (r.chunks_done as usize).saturating_sub(other_chunks) as f64;
            let percent = if r.state == ReceiverState::Done {
                100.0
            } else {
                (100.0 * data_done / data_chunks).min(100.0)
            };
            let seconds = r
                .finished_at
                .unwrap_or(now)
                .saturating_duration_since(r.joined_at)
                .as_secs_f64()
                .max(1e-3);
            let mb_per_s = data_done * f64::from(manifest.chunk_size) / seconds / 1e6;
            let data_left = (data_chunks - data_done).max(0.0) * f64::from(manifest.chunk_size);
            let seconds_left =
                (!r.is_final() && mb_per_s > 0.0).then(|| data_left / (mb_per_s * 1e6));
            receivers.push(ReceiverView {
                mac: r.name.clone(),
                address: r.address.map(|a| a.ip().to_string()),
                state: state_name(r.state),
                percent,
                mb_per_s,
                repairs: r.repairs_requested,
                seconds_left,
                failure: r.failure.as_ref().map(ToString::to_string),
                relay: r.relay,
                via: None,
            });
            if r.is_final() {
                continue;
            }
            let Some((mac, task)) = self.task_of(&r.name) else {
                continue;
            };
            if !self.joined.contains(&mac) {
                self.joined.push(mac);
                self.report(task, Step::Joined);
            }
            let due = self
                .last_progress
                .get(&mac)
                .is_none_or(|t| now.duration_since(*t) >= PROGRESS_EVERY);
            if due && sender.data_started().is_some() {
                self.last_progress.insert(mac, now);
                self.report(
                    task,
                    Step::Progress(Progress {
                        percent,
                        mb_per_s,
                        repairs: r.repairs_requested,
                    }),
                );
            }
        }
        self.sync_downstream(sender, now);
        self.lab.sessions.update(SessionView {
            image: self.image.to_string(),
            group: self.group.clone(),
            port: self.port,
            relay_port: self.relay_port,
            interface: self.interface.clone(),
            ttl: self.ttl,
            warnings: self.warnings.clone(),
            phase: if sender.data_started().is_some() {
                "sending"
            } else {
                "waiting"
            },
            waiting_for: self.waiting_for,
            not_waiting_for: self
                .not_waiting_for
                .iter()
                .map(|(mac, why)| format!("{mac}: {why}"))
                .collect(),
            rate_mbps: sender.rate() as f64 / 1e6,
            receivers: receivers.into_iter().chain(downstream).collect(),
        });
    }

    /// Machines whose task ended (failed, cancelled, timed out) before they joined will not
    /// come: the session stops waiting for them instead of waiting out the start timeout.
    fn still_expected(&mut self, sender: &Sender) -> Option<u32> {
        let lab = self.lab;
        let ended = closed_before_joining(self.tasks, &self.not_waiting_for, sender, |id| {
            lab.registry.task(id).ok().flatten()
        });
        if ended.is_empty() {
            return None;
        }
        for (mac, why) in ended {
            log::warn!(
                "lab: the session for image {:?} stops waiting for {mac}: {why}",
                self.image
            );
            self.not_waiting_for.push((mac, why));
        }
        self.waiting_for = (self.tasks.len() - self.not_waiting_for.len()) as u32;
        Some(self.waiting_for)
    }

    fn event(&mut self, sender: &Sender, event: &SenderEvent) {
        let SenderEvent::ReceiverFinished { receiver, result } = event else {
            return;
        };
        // A relay's last word on its receivers comes just before its own Done.
        self.sync_downstream(sender, Instant::now());
        let Some(name) = sender
            .receivers()
            .find(|r| r.id == *receiver)
            .map(|r| r.name.clone())
        else {
            return;
        };
        let Some((mac, task)) = self.task_of(&name) else {
            return;
        };
        match result {
            Ok(()) => {
                log::info!(
                    "lab: {mac} verified its copy of {} (task {task})",
                    self.image
                );
                self.report(task, Step::Verified);
            }
            Err(failure) => {
                log::warn!(
                    "lab: {mac} failed to receive {} (task {task}): {failure}",
                    self.image
                );
                let reason = match failure {
                    ReceiverFailure::Reported(why) => why.clone(),
                    other => other.to_string(),
                };
                self.report(task, Step::Failed { reason });
            }
        }
    }
}

/// Of the session's `tasks`, those (not yet in `known`) that closed before their machine joined
/// the session, with why: their machines will not come. A machine that joined is the sender's
/// business, whatever its task says.
fn closed_before_joining(
    tasks: &[(MacAddr, TaskId)],
    known: &[(MacAddr, String)],
    sender: &Sender,
    task: impl Fn(TaskId) -> Option<diskcast_registry::Task>,
) -> Vec<(MacAddr, String)> {
    let joined = |mac: &MacAddr| {
        sender
            .receivers()
            .any(|r| machine_of(&r.name) == Some(*mac) && !r.is_final())
    };
    tasks
        .iter()
        .filter(|(mac, _)| !known.iter().any(|(m, _)| m == mac) && !joined(mac))
        .filter_map(|&(mac, id)| {
            let task = task(id)?;
            if task.state.is_open() {
                return None;
            }
            let why = match &task.reason {
                Some(reason) => format!("its task {id} {}: {reason}", task.state),
                None => format!("its task {id} {}", task.state),
            };
            Some((mac, why))
        })
        .collect()
}

/// The machine a receiver's name stands for: slaves are named by their MAC, relays a machine
/// booted as `relay MAC`.
fn machine_of(name: &str) -> Option<MacAddr> {
    name.strip_prefix("relay ")
        .unwrap_or(name)
        .trim()
        .parse()
        .ok()
}

/// Whether `task` deploys `image` through `relay` (its options name that relay).
fn behind_relay(task: &diskcast_registry::Task, image: &str, relay: MacAddr) -> bool {
    let TaskKind::Deploy { image: its } = &task.kind else {
        return false;
    };
    let named = TaskOptions::of(task)
        .relay
        .and_then(|r| r.parse::<MacAddr>().ok());
    its == image && named == Some(relay)
}

/// Rows for a relay's local receivers (as it last reported them upstream), shown with the
/// relay's own row: what it got through, and where it stands.
fn downstream_views<'a>(
    relay: &str,
    entries: impl Iterator<Item = &'a diskcast_proto::wire::DownstreamEntry>,
) -> Vec<ReceiverView> {
    entries
        .map(|d| {
            let percent = if d.state == ReceiverState::Done {
                100.0
            } else {
                let total = f64::from(d.chunks_total.max(1));
                (100.0 * f64::from(d.chunks_done) / total).min(100.0)
            };
            ReceiverView {
                mac: d.name.clone(),
                address: None,
                state: state_name(d.state),
                percent,
                mb_per_s: 0.0,
                repairs: 0,
                seconds_left: None,
                failure: (!d.reason.is_empty()).then(|| d.reason.clone()),
                relay: false,
                via: Some(relay.to_string()),
            }
        })
        .collect()
}

fn state_name(state: ReceiverState) -> &'static str {
    match state {
        ReceiverState::Joining => "joining",
        ReceiverState::Receiving => "receiving",
        ReceiverState::Verifying => "verifying",
        ReceiverState::Done => "verified",
        ReceiverState::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskcast_proto::manifest::Manifest;
    use diskcast_proto::sender::SenderConfig;
    use diskcast_registry::TaskState;

    fn task(
        id: TaskId,
        mac: MacAddr,
        state: TaskState,
        reason: Option<&str>,
    ) -> diskcast_registry::Task {
        diskcast_registry::Task {
            id,
            mac,
            kind: TaskKind::Deploy {
                image: "golden".into(),
            },
            state,
            reason: reason.map(str::to_string),
            options: String::new(),
            timeout_secs: 600,
            created: 0,
            updated: 0,
            finished: None,
            last_activity: 0,
            site: None,
        }
    }

    fn join(sender: &mut Sender, mac: MacAddr, at: std::net::SocketAddr, now: Instant) {
        let join = diskcast_proto::wire::Packet {
            session: 1,
            body: diskcast_proto::wire::Body::Join {
                receiver: 7,
                incarnation: 1,
                disk_size: u64::MAX,
                logical_block: 512,
                refusal: 0,
                name: mac.to_string(),
                serial: String::new(),
            },
        };
        sender.handle_datagram(&join.emit(), at, now);
    }

    #[test]
    fn machines_whose_task_closed_before_joining_are_no_longer_waited_for() {
        let image = vec![7u8; 4096];
        let manifest =
            Manifest::scan(&mut std::io::Cursor::new(&image), 4096, 4096, |_| {}).unwrap();
        let now = Instant::now();
        let mut sender = Sender::new(
            SenderConfig {
                min_receivers: 4,
                ..SenderConfig::default()
            },
            manifest,
            now,
        );
        let macs: Vec<MacAddr> = (1..=4)
            .map(|i| format!("52:54:00:00:00:0{i}").parse().unwrap())
            .collect();
        let tasks: Vec<(MacAddr, TaskId)> = macs.iter().zip(1..).map(|(m, id)| (*m, id)).collect();
        // Machine 3 joined, then its task failed (the sender will say why it ends); machine 1's
        // task failed before it joined (no disk), machine 2's was cancelled, machine 4 still boots.
        join(&mut sender, macs[2], "10.0.0.3:7744".parse().unwrap(), now);
        let states = |id: TaskId| {
            Some(match id {
                1 => task(id, macs[0], TaskState::Failed, Some("no disk found")),
                2 => task(id, macs[1], TaskState::Cancelled, None),
                3 => task(id, macs[2], TaskState::Failed, Some("disk write error")),
                _ => task(id, macs[3], TaskState::Booted, None),
            })
        };
        let ended = closed_before_joining(&tasks, &[], &sender, states);
        assert_eq!(
            ended,
            vec![
                (macs[0], "its task 1 failed: no disk found".to_string()),
                (macs[1], "its task 2 cancelled".to_string()),
            ]
        );
        // Asked again, what is known is not reported twice.
        assert!(closed_before_joining(&tasks, &ended, &sender, states).is_empty());
        // The sender then waits for the two left: machine 3 (joined) and machine 4.
        sender.expect_fewer((tasks.len() - ended.len()) as u32, now);
        assert_eq!(sender.min_receivers(), 2);
        assert_eq!(sender.phase(), diskcast_proto::sender::Phase::Waiting);
    }

    #[test]
    fn relays_and_their_local_receivers_are_shown_and_matched_to_tasks() {
        let mac: MacAddr = "52:54:00:00:00:09".parse().unwrap();
        // A relay booted for a task names itself `relay MAC`; slaves are named by their MAC.
        assert_eq!(machine_of("relay 52:54:00:00:00:09"), Some(mac));
        assert_eq!(machine_of("52:54:00:00:00:09"), Some(mac));
        assert_eq!(machine_of("relay-b"), None);
        let entries = [
            diskcast_proto::wire::DownstreamEntry {
                id: 1,
                state: ReceiverState::Done,
                chunks_done: 10,
                chunks_total: 10,
                name: "52:54:00:00:00:0a".into(),
                reason: String::new(),
            },
            diskcast_proto::wire::DownstreamEntry {
                id: 2,
                state: ReceiverState::Failed,
                chunks_done: 5,
                chunks_total: 10,
                name: "52:54:00:00:00:0b".into(),
                reason: "disk write error".into(),
            },
        ];
        let rows = downstream_views("relay 52:54:00:00:00:09", entries.iter());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].mac, "52:54:00:00:00:0a");
        assert_eq!(rows[0].state, "verified");
        assert_eq!(rows[0].percent, 100.0);
        assert_eq!(rows[0].via.as_deref(), Some("relay 52:54:00:00:00:09"));
        assert_eq!(rows[1].state, "failed");
        assert_eq!(rows[1].percent, 50.0);
        assert_eq!(rows[1].failure.as_deref(), Some("disk write error"));
        assert!(!rows[1].relay);
    }

    #[test]
    fn a_relay_is_believed_only_for_the_machines_whose_task_names_it() {
        let relay: MacAddr = "52:54:00:00:00:09".parse().unwrap();
        let other: MacAddr = "52:54:00:00:00:0c".parse().unwrap();
        let far1: MacAddr = "52:54:00:00:00:0a".parse().unwrap();
        let mut far = task(1, far1, TaskState::Booted, None);
        far.options = format!(r#"{{"relay":"{relay}"}}"#);
        assert!(behind_relay(&far, "golden", relay));
        assert!(
            !behind_relay(&far, "golden", other),
            "another relay's machine"
        );
        assert!(!behind_relay(&far, "other-image", relay));
        // A near slave (or the relay itself) names no relay: a row under its MAC changes nothing.
        let near = task(2, far1, TaskState::Booted, None);
        assert!(!behind_relay(&near, "golden", relay));
        let mut relays_own = task(3, relay, TaskState::Booted, None);
        relays_own.options = format!(r#"{{"relay_for":["{far1}"]}}"#);
        assert!(!behind_relay(&relays_own, "golden", relay));
    }
}
