//! `GET /api/v1/events`: what changed, as Server-Sent Events, so the console never reloads.
//!
//! - `sessions`: the live views of the running sessions (the same JSON as `GET
//!   /api/v1/sessions`), whenever one changes — each machine's progress about once a second;
//! - `registry`: machines or tasks changed (the registry's data version moved: a report, a new
//!   task, a machine that booted, or an admin's command in another process); read them again;
//! - `store`: the image store changed (an image stored or deleted, a check done); read it again.
//!
//! Each stream sends all three when it opens, so a page that (re)connects reads everything once.

use crate::lab::Lab;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How often each stream looks at the registry and the store.
const LOOK_EVERY: Duration = Duration::from_millis(500);

pub async fn events(
    State(lab): State<Arc<Lab>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let feed = Feed::new(lab);
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        let event = feed.next().await;
        Some((Ok(event), feed))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// What the store looks like from outside: its directory's modification time (an image linked
/// or removed) and the checks recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StoreVersion {
    modified: Option<SystemTime>,
    checks: u64,
}

/// One client's stream.
struct Feed {
    lab: Arc<Lab>,
    sessions: tokio::sync::watch::Receiver<u64>,
    sessions_open: bool,
    registry: Option<i64>,
    store: Option<StoreVersion>,
    queue: VecDeque<Event>,
    look: tokio::time::Interval,
}

impl Feed {
    fn new(lab: Arc<Lab>) -> Self {
        let mut sessions = lab.sessions.subscribe();
        sessions.borrow_and_update();
        let mut look = tokio::time::interval(LOOK_EVERY);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut feed = Self {
            lab,
            sessions,
            sessions_open: true,
            registry: None,
            store: None,
            queue: VecDeque::new(),
            look,
        };
        feed.queue.push_back(feed.sessions_event());
        feed
    }

    async fn next(&mut self) -> Event {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return event;
            }
            tokio::select! {
                changed = self.sessions.changed(), if self.sessions_open => {
                    if changed.is_err() {
                        self.sessions_open = false;
                        continue;
                    }
                    self.sessions.borrow_and_update();
                    let event = self.sessions_event();
                    self.queue.push_back(event);
                }
                _ = self.look.tick() => self.look_around(),
            }
        }
    }

    fn sessions_event(&self) -> Event {
        let views = self.lab.sessions.views();
        match Event::default().event("sessions").json_data(&views) {
            Ok(event) => event,
            Err(e) => {
                log::error!("console: the session views do not serialize: {e}");
                Event::default().event("sessions").data("[]")
            }
        }
    }

    fn look_around(&mut self) {
        match self.lab.registry.data_version() {
            Ok(version) if Some(version) != self.registry => {
                self.registry = Some(version);
                self.queue
                    .push_back(Event::default().event("registry").data(version.to_string()));
            }
            Ok(_) => {}
            Err(e) => log::warn!("console: {}", diskcast_proto::error_chain(&e)),
        }
        let store = StoreVersion {
            modified: std::fs::metadata(self.lab.store.dir())
                .and_then(|m| m.modified())
                .ok(),
            checks: self.lab.image_checks.changes(),
        };
        if Some(store) != self.store {
            self.store = Some(store);
            self.queue.push_back(
                Event::default()
                    .event("store")
                    .data(store.checks.to_string()),
            );
        }
    }
}
