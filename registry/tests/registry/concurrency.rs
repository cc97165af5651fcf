use crate::common::{deploy, mac, pxe, registry};
use diskcast_registry::{
    EventKind, Lease, Progress, Registry, Report, Step, TaskFilter, TaskState,
};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn concurrent_writers_lose_nothing_and_never_see_busy() {
    const THREADS: u32 = 6;
    const TASKS: u32 = 10;
    let (dir, reg) = registry("concurrent");
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
            let reg = if t % 2 == 0 {
                reg.clone()
            } else {
                Registry::open_in(dir.path()).unwrap()
            };
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
