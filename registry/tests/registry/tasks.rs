use crate::common::{deploy, mac, registry, seen, Backend};
use diskcast_registry::{
    Error, EventKind, NewTask, Progress, Registry, Report, Step, Task, TaskFilter, TaskKind,
    TaskState,
};

fn report(reg: &Registry, task: &Task, at: u64, step: Step) -> Task {
    reg.report(task.id, Report { at, step }).unwrap()
}

fn progress(percent: f64) -> Step {
    Step::Progress(Progress {
        percent,
        mb_per_s: 110.5,
        repairs: 2,
    })
}

fn kinds(reg: &Registry, task: &Task) -> Vec<EventKind> {
    reg.events(task.id)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

fn a_deploy_goes_from_pending_to_verified_with_its_history(b: Backend) {
    let (_dir, reg) = registry(b, "deploy");
    let m = seen(&reg, 1);
    let mut new = deploy(m, "debian12");
    new.options = r#"{"disk":"/dev/sda","grow_last_partition":true}"#.into();
    let (task, _token) = reg.create_task(new, 1000).unwrap();
    assert_eq!(task.state, TaskState::Pending);
    assert_eq!(
        (
            task.created,
            task.updated,
            task.last_activity,
            task.finished
        ),
        (1000, 1000, 1000, None)
    );
    assert_eq!(
        task.options,
        r#"{"disk":"/dev/sda","grow_last_partition":true}"#
    );

    assert_eq!(
        report(&reg, &task, 1010, Step::Booted).state,
        TaskState::Booted
    );
    let disk = Step::DiskChosen {
        disk: "/dev/sda".into(),
    };
    assert_eq!(report(&reg, &task, 1011, disk).state, TaskState::Running);
    report(&reg, &task, 1012, Step::Joined);
    for (i, percent) in [10.0, 50.0, 99.5].into_iter().enumerate() {
        let t = report(&reg, &task, 1020 + i as u64, progress(percent));
        assert_eq!(
            (t.state, t.last_activity),
            (TaskState::Running, 1020 + i as u64)
        );
    }
    let done = report(&reg, &task, 1100, Step::Verified);
    assert_eq!(done.state, TaskState::Verified);
    assert_eq!((done.finished, done.updated), (Some(1100), 1100));

    use EventKind::*;
    assert_eq!(
        kinds(&reg, &task),
        [Created, Booted, DiskChosen, Joined, Progress, Verified],
        "one progress event: the latest"
    );
    let events = reg.events(task.id).unwrap();
    let last_progress = events.iter().find(|e| e.kind == Progress).unwrap();
    assert_eq!(last_progress.at, 1022);
    assert_eq!(last_progress.progress.unwrap().percent, 99.5);
    assert!(
        last_progress.message.contains("99.5%"),
        "{}",
        last_progress.message
    );
    assert_eq!(events[0].message, "deploy debian12");
    assert_eq!(events[2].message, "/dev/sda");
}

fn failure_cancel_and_inventory_reach_their_final_states(b: Backend) {
    let (_dir, reg) = registry(b, "finals");
    let (a, _) = reg.create_task(deploy(seen(&reg, 1), "x"), 10).unwrap();
    report(&reg, &a, 11, Step::Booted);
    let failed = report(
        &reg,
        &a,
        12,
        Step::Failed {
            reason: "no disk matches /dev/nvme*".into(),
        },
    );
    assert_eq!(failed.state, TaskState::Failed);
    assert_eq!(failed.reason.as_deref(), Some("no disk matches /dev/nvme*"));
    assert_eq!(failed.finished, Some(12));

    let (b, _) = reg.create_task(deploy(seen(&reg, 2), "x"), 10).unwrap();
    let cancelled = reg.cancel(b.id, 20).unwrap();
    assert_eq!(cancelled.state, TaskState::Cancelled);
    assert_eq!(
        cancelled.last_activity, 10,
        "a cancel is not agent activity"
    );
    assert_eq!(kinds(&reg, &b), [EventKind::Created, EventKind::Cancelled]);

    let inventory = NewTask {
        kind: TaskKind::Inventory,
        ..deploy(seen(&reg, 3), "unused")
    };
    let (c, _) = reg.create_task(inventory, 10).unwrap();
    assert_eq!(c.kind, TaskKind::Inventory);
    report(&reg, &c, 11, Step::Booted);
    assert_eq!(
        report(&reg, &c, 12, Step::Verified).state,
        TaskState::Verified
    );
}

/// Brings a new task of `kind` on a new machine to `state` (timeouts start at 100).
fn task_in(reg: &Registry, n: u32, kind: &TaskKind, state: TaskState) -> Task {
    let m = seen(reg, n);
    let new = NewTask {
        mac: m,
        kind: kind.clone(),
        options: "{}".into(),
        timeout_secs: if state == TaskState::TimedOut { 0 } else { 60 },
    };
    let (task, _) = reg.create_task(new, 100).unwrap();
    let go = |step| report(reg, &task, 100, step);
    let task = match state {
        TaskState::Pending => task,
        TaskState::Booted => go(Step::Booted),
        TaskState::Running => {
            go(Step::Booted);
            go(Step::Joined)
        }
        TaskState::Verified => {
            go(Step::Booted);
            go(Step::Joined);
            go(Step::Verified)
        }
        TaskState::Failed => go(Step::Failed { reason: "x".into() }),
        TaskState::Cancelled => reg.cancel(task.id, 100).unwrap(),
        TaskState::TimedOut => {
            let expired = reg.expire(101).unwrap();
            assert_eq!(expired.len(), 1);
            expired[0].clone()
        }
    };
    assert_eq!(task.state, state);
    task
}

fn every_transition_is_checked_and_final_states_are_final(b: Backend) {
    use TaskState::*;
    let (_dir, reg) = registry(b, "transitions");
    let deploy_kind = TaskKind::Deploy { image: "i".into() };
    let states = [
        Pending, Booted, Running, Verified, Failed, Cancelled, TimedOut,
    ];
    let actions = [
        "booted", "disk", "joined", "progress", "verified", "failed", "cancel",
    ];
    // What the crate documentation promises, written out independently.
    let expected = |kind: &TaskKind, from: TaskState, action: &str| -> Option<TaskState> {
        match (from, action) {
            // A machine restarting during its task boots into it again.
            (Pending | Booted | Running, "booted") => Some(Booted),
            (Booted | Running, "disk" | "joined" | "progress") => Some(Running),
            (Running, "verified") => Some(Verified),
            (Booted, "verified") if *kind == TaskKind::Inventory => Some(Verified),
            (Pending | Booted | Running, "failed") => Some(Failed),
            (Pending | Booted | Running, "cancel") => Some(Cancelled),
            _ => None,
        }
    };
    let mut n = 0;
    let mut refused = 0;
    for kind in [&deploy_kind, &TaskKind::Inventory] {
        for from in states {
            for action in actions {
                n += 1;
                let task = task_in(&reg, n, kind, from);
                let events_before = reg.events(task.id).unwrap();
                let step = match action {
                    "booted" => Some(Step::Booted),
                    "disk" => Some(Step::DiskChosen { disk: "sda".into() }),
                    "joined" => Some(Step::Joined),
                    "progress" => Some(progress(5.0)),
                    "verified" => Some(Step::Verified),
                    "failed" => Some(Step::Failed { reason: "r".into() }),
                    _ => None,
                };
                let got = match step {
                    Some(step) => reg.report(task.id, Report { at: 200, step }),
                    None => reg.cancel(task.id, 200),
                };
                let context = format!("{kind:?} {from} {action}");
                match (expected(kind, from, action), got) {
                    (Some(want), Ok(t)) => assert_eq!(t.state, want, "{context}"),
                    (
                        None,
                        Err(Error::IllegalTransition {
                            task: id, from: f, ..
                        }),
                    ) => {
                        refused += 1;
                        assert_eq!((id, f), (task.id, from), "{context}");
                        assert_eq!(reg.task(task.id).unwrap().unwrap(), task, "{context}");
                        assert_eq!(reg.events(task.id).unwrap(), events_before, "{context}");
                    }
                    (want, got) => panic!("{context}: expected {want:?}, got {got:?}"),
                }
            }
        }
    }
    // Allowed: 16 for a deploy, 17 for an inventory (verified straight from booted).
    assert_eq!(refused, 2 * 7 * 7 - (16 + 17));
    let err = reg
        .report(
            999,
            Report {
                at: 1,
                step: Step::Booted,
            },
        )
        .unwrap_err();
    assert!(matches!(err, Error::NoSuchTask { task: 999 }), "{err:?}");
    assert!(matches!(
        reg.cancel(999, 1),
        Err(Error::NoSuchTask { task: 999 })
    ));
}

fn a_machine_has_at_most_one_open_task(b: Backend) {
    let (_dir, reg) = registry(b, "one-open");
    let m = seen(&reg, 1);
    let (first, _) = reg.create_task(deploy(m, "a"), 10).unwrap();
    let err = reg.create_task(deploy(m, "b"), 11).unwrap_err();
    assert!(
        matches!(err, Error::TaskOpen { mac: x, task, state: TaskState::Pending }
            if x == m && task == first.id),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&format!("task {}", first.id)),
        "{err}"
    );
    report(&reg, &first, 12, Step::Booted);
    assert!(matches!(
        reg.create_task(deploy(m, "b"), 13),
        Err(Error::TaskOpen { .. })
    ));
    assert_eq!(reg.open_task_for(m).unwrap().unwrap().id, first.id);
    report(&reg, &first, 14, Step::Failed { reason: "r".into() });
    assert_eq!(reg.open_task_for(m).unwrap(), None);
    let (second, _) = reg.create_task(deploy(m, "b"), 15).unwrap();
    assert_ne!(second.id, first.id);
    assert_eq!(reg.open_task_for(m).unwrap().unwrap().id, second.id);

    let err = reg.create_task(deploy(mac(9), "a"), 10).unwrap_err();
    assert!(matches!(err, Error::NoSuchMachine { .. }), "{err:?}");
}

fn bad_options_images_and_progress_are_refused(b: Backend) {
    let (_dir, reg) = registry(b, "bad-input");
    let m = seen(&reg, 1);
    let mut new = deploy(m, "a");
    new.options = "{disk: sda}".into();
    assert!(matches!(
        reg.create_task(new, 1),
        Err(Error::InvalidJson { .. })
    ));
    assert!(matches!(
        reg.create_task(deploy(m, ""), 1),
        Err(Error::Invalid { .. })
    ));
    let (task, _) = reg.create_task(deploy(m, "a"), 1).unwrap();
    report(&reg, &task, 2, Step::Booted);
    for percent in [f64::NAN, -1.0, 100.5] {
        let err = reg
            .report(
                task.id,
                Report {
                    at: 3,
                    step: progress(percent),
                },
            )
            .unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{percent}: {err:?}");
    }
}

fn tokens_find_their_task_and_are_stored_only_hashed(b: Backend) {
    let (dir, reg) = registry(b, "tokens");
    let (a, token_a) = reg.create_task(deploy(seen(&reg, 1), "x"), 1).unwrap();
    let (b, token_b) = reg.create_task(deploy(seen(&reg, 2), "x"), 1).unwrap();
    assert_ne!(token_a.as_str(), token_b.as_str());
    assert_eq!(token_a.as_str().len(), 64);
    assert!(token_a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
    assert!(!format!("{token_a:?}").contains(token_a.as_str()));

    assert_eq!(
        reg.task_by_token(token_a.as_str()).unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        reg.task_by_token(token_b.as_str()).unwrap().unwrap().id,
        b.id
    );
    let upper = token_a.as_str().to_uppercase();
    assert_eq!(reg.task_by_token(&upper).unwrap().unwrap().id, a.id);
    let mut wrong = token_a.as_str().to_owned();
    wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
    for bad in [wrong.as_str(), "", "zz", &token_a.as_str()[1..]] {
        assert_eq!(reg.task_by_token(bad).unwrap(), None, "{bad:?}");
    }
    // Still found once final (the bootserver decides what a final task's agent may do).
    reg.cancel(b.id, 2).unwrap();
    assert_eq!(
        reg.task_by_token(token_b.as_str()).unwrap().unwrap().state,
        TaskState::Cancelled
    );

    // Neither the hex nor the raw token bytes are anywhere in the database (its files, or for
    // PostgreSQL a dump of the database).
    drop(reg);
    let mut bytes = Vec::new();
    if dir.is_sqlite() {
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
    } else {
        let dump = crate::common::pg_dump(dir.location());
        assert!(dump.contains("token_hash"), "the dump has the tasks table");
        bytes.extend(dump.into_bytes());
    }
    for token in [&token_a, &token_b] {
        let hex = token.as_str().as_bytes();
        let raw: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&token.as_str()[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert!(!bytes.windows(64).any(|w| w == hex));
        assert!(!bytes.windows(32).any(|w| w == raw.as_slice()));
    }
}

fn expire_times_out_tasks_silent_longer_than_their_timeout(b: Backend) {
    let (_dir, reg) = registry(b, "expire");
    let (quiet, _) = reg.create_task(deploy(seen(&reg, 1), "x"), 1000).unwrap();
    let (busy, _) = reg.create_task(deploy(seen(&reg, 2), "x"), 1000).unwrap();
    let (done, _) = reg.create_task(deploy(seen(&reg, 3), "x"), 1000).unwrap();
    reg.cancel(done.id, 1001).unwrap();
    // timeout_secs is 600.
    report(&reg, &busy, 1500, Step::Booted);
    assert_eq!(reg.expire(1600).unwrap(), vec![]);
    let expired = reg.expire(1601).unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].id, quiet.id);
    assert_eq!(expired[0].state, TaskState::TimedOut);
    assert_eq!(expired[0].finished, Some(1601));
    assert_eq!(
        expired[0].reason.as_deref(),
        Some("no report for 601 s (timeout 600 s)")
    );
    assert_eq!(
        kinds(&reg, &quiet),
        [EventKind::Created, EventKind::TimedOut]
    );
    assert_eq!(reg.expire(1700).unwrap(), vec![], "already final");
    let expired = reg.expire(2101).unwrap();
    assert_eq!(expired.iter().map(|t| t.id).collect::<Vec<_>>(), [busy.id]);
    let late = reg.report(
        quiet.id,
        Report {
            at: 2200,
            step: Step::Booted,
        },
    );
    assert!(matches!(
        late,
        Err(Error::IllegalTransition {
            from: TaskState::TimedOut,
            ..
        })
    ));
}

fn tasks_are_listed_newest_first_with_filters(b: Backend) {
    let (_dir, reg) = registry(b, "list");
    let (m1, m2) = (seen(&reg, 1), seen(&reg, 2));
    let (t1, _) = reg.create_task(deploy(m1, "a"), 1).unwrap();
    reg.cancel(t1.id, 2).unwrap();
    let (t2, _) = reg.create_task(deploy(m2, "a"), 3).unwrap();
    let (t3, _) = reg.create_task(deploy(m1, "b"), 4).unwrap();
    let ids = |filter| -> Vec<i64> { reg.tasks(filter).unwrap().iter().map(|t| t.id).collect() };
    assert_eq!(ids(TaskFilter::default()), [t3.id, t2.id, t1.id]);
    let open = TaskFilter {
        open_only: true,
        ..TaskFilter::default()
    };
    assert_eq!(ids(open), [t3.id, t2.id]);
    let of_m1 = TaskFilter {
        mac: Some(m1),
        ..TaskFilter::default()
    };
    assert_eq!(ids(of_m1), [t3.id, t1.id]);
    let last = TaskFilter {
        limit: Some(1),
        ..TaskFilter::default()
    };
    assert_eq!(ids(last), [t3.id]);
    let open_m1 = TaskFilter {
        open_only: true,
        mac: Some(m1),
        limit: Some(10),
    };
    assert_eq!(ids(open_m1), [t3.id]);
    assert_eq!(reg.task(t2.id).unwrap().unwrap(), t2);
    assert_eq!(reg.task(999).unwrap(), None);
}

fn tasks_for_a_group_are_created_all_or_none(b: Backend) {
    let (_dir, reg) = registry(b, "group-tasks");
    for n in 1..=3 {
        reg.register(mac(n), None, Some("room1"), 1).unwrap();
    }
    let news = |macs: Vec<_>| {
        macs.into_iter()
            .map(|m| deploy(m, "img"))
            .collect::<Vec<_>>()
    };
    let (busy, _) = reg.create_task(deploy(mac(2), "other"), 5).unwrap();
    let err = reg
        .create_tasks(news(reg.resolve("@room1").unwrap()), 10)
        .unwrap_err();
    assert!(
        matches!(err, Error::TaskOpen { task, .. } if task == busy.id),
        "{err:?}"
    );
    assert_eq!(
        reg.tasks(TaskFilter::default()).unwrap().len(),
        1,
        "none created"
    );
    assert!(matches!(
        reg.create_tasks(news(vec![mac(1), mac(1)]), 10),
        Err(Error::TaskOpen { .. })
    ));

    reg.cancel(busy.id, 6).unwrap();
    let created = reg
        .create_tasks(news(reg.resolve("@room1").unwrap()), 10)
        .unwrap();
    assert_eq!(created.len(), 3);
    for (task, token) in &created {
        assert_eq!(
            reg.task_by_token(token.as_str()).unwrap().as_ref(),
            Some(task)
        );
    }
}

fn a_token_issued_for_a_new_boot_replaces_the_old_one(b: Backend) {
    let (_dir, reg) = registry(b, "issue-token");
    let mac = seen(&reg, 1);
    let (task, first) = reg.create_task(deploy(mac, "golden"), 100).unwrap();
    let second = reg.issue_token(task.id).unwrap();
    assert!(reg.task_by_token(first.as_str()).unwrap().is_none());
    assert_eq!(
        reg.task_by_token(second.as_str()).unwrap().unwrap().id,
        task.id
    );
    reg.cancel(task.id, 200).unwrap();
    assert!(matches!(
        reg.issue_token(task.id),
        Err(Error::IllegalTransition { .. })
    ));
}

crate::on_both_backends!(
    a_deploy_goes_from_pending_to_verified_with_its_history,
    failure_cancel_and_inventory_reach_their_final_states,
    every_transition_is_checked_and_final_states_are_final,
    a_machine_has_at_most_one_open_task,
    bad_options_images_and_progress_are_refused,
    tokens_find_their_task_and_are_stored_only_hashed,
    expire_times_out_tasks_silent_longer_than_their_timeout,
    tasks_are_listed_newest_first_with_filters,
    tasks_for_a_group_are_created_all_or_none,
    a_token_issued_for_a_new_boot_replaces_the_old_one,
);
