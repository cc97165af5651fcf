use crate::common::{deploy, mac, pxe, registry, Backend};
use diskcast_registry::{EventKind, Lease, Progress, Report, Step, TaskFilter, TaskState};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn concurrent_writers_lose_nothing_and_never_see_busy(b: Backend) {
    const THREADS: u32 = 6;
    const TASKS: u32 = 10;
    let (dir, reg) = registry(b, "concurrent");
    let shared = mac(0xff_ffff);
    reg.observe(shared, pxe(None), 1).unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (reg, done) = (reg.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !done.load(Ordering::Relaxed) {
                reg.tasks(TaskFilter::default()).unwrap();
                reg.machines().unwrap();
                reg.leases().unwrap();
                reads += 1;
            }
            reads
        })
    };
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            // Half share this handle, half have their own connections (like other processes).
            let reg = if t % 2 == 0 { reg.clone() } else { dir.open() };
            std::thread::spawn(move || {
                for i in 0..TASKS {
                    let n = t * 1000 + i;
                    let now = u64::from(n) + 10;
                    let m = mac(n);
                    reg.observe(m, pxe(None), now).unwrap();
                    reg.observe(shared, pxe(None), now).unwrap();
                    let (task, _) = reg.create_task(deploy(m, "img"), now).unwrap();
                    for step in [
                        Step::Booted,
                        Step::Joined,
                        Step::Progress(Progress {
                            percent: 50.0,
                            mb_per_s: 1.0,
                            repairs: 0,
                        }),
                        Step::Verified,
                    ] {
                        reg.report(task.id, Report { at: now, step }).unwrap();
                    }
                    let lease = Lease {
                        mac: m,
                        address: Ipv4Addr::from(0x0a00_0000 | n),
                        expires: 10_000,
                    };
                    reg.put_lease(lease, now).unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);

    let tasks = reg.tasks(TaskFilter::default()).unwrap();
    assert_eq!(tasks.len(), (THREADS * TASKS) as usize);
    for task in &tasks {
        assert_eq!(task.state, TaskState::Verified);
        let kinds: Vec<_> = reg
            .events(task.id)
            .unwrap()
            .iter()
            .map(|e| e.kind)
            .collect();
        use EventKind::*;
        assert_eq!(kinds, [Created, Booted, Joined, Progress, Verified]);
    }
    assert_eq!(
        reg.machines().unwrap().len(),
        (THREADS * TASKS + 1) as usize
    );
    assert_eq!(reg.leases().unwrap().len(), (THREADS * TASKS) as usize);
    let last = (THREADS - 1) * 1000 + TASKS - 1 + 10;
    assert_eq!(
        reg.machine(shared).unwrap().unwrap().last_seen,
        Some(u64::from(last))
    );
}

/// Two sites (bootservers) on one registry race to start the same tasks: each task is claimed by
/// exactly one, the other is refused, and both see the same history.
fn two_sites_claim_each_task_exactly_once(b: Backend) {
    use diskcast_registry::{Error, Registry};
    const TASKS: u32 = 12;
    let (db, reg) = registry(b, "claims");
    let mut ids = Vec::new();
    for n in 0..TASKS {
        let m = mac(n);
        reg.observe(m, pxe(None), 1).unwrap();
        ids.push(reg.create_task(deploy(m, "img"), 1).unwrap().0.id);
    }
    let sites: Vec<_> = ["north", "south"]
        .into_iter()
        .map(|site| Registry::open_location(db.location(), Some(site)).unwrap())
        .collect();
    let racers: Vec<_> = sites
        .iter()
        .map(|site| {
            let (site, ids) = (site.clone(), ids.clone());
            std::thread::spawn(move || {
                ids.iter()
                    .map(|id| match site.issue_token(*id) {
                        Ok(_) => true,
                        Err(Error::ClaimedElsewhere { .. }) => false,
                        Err(e) => panic!("task {id}: {e:?}"),
                    })
                    .collect::<Vec<bool>>()
            })
        })
        .collect();
    let won: Vec<Vec<bool>> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    for (i, id) in ids.iter().enumerate() {
        assert!(won[0][i] != won[1][i], "task {id}: exactly one site wins");
        let task = reg.task(*id).unwrap().unwrap();
        let winner = if won[0][i] { "north" } else { "south" };
        assert_eq!(task.site.as_deref(), Some(winner));
        // The winner may start it again (the machine rebooted); the loser still may not.
        let (w, l) = if won[0][i] { (0, 1) } else { (1, 0) };
        sites[w].issue_token(*id).unwrap();
        let err = sites[l].issue_token(*id).unwrap_err();
        assert!(err.to_string().contains(winner), "{err}");
    }
}

crate::on_both_backends!(
    two_sites_claim_each_task_exactly_once,
    concurrent_writers_lose_nothing_and_never_see_busy,
);
