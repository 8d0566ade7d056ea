//! N threads, each advancing its own counter (kept on its own stack and
//! published through an atomic). The main thread logs every tick the TIDs
//! that the threads got from gettid(), the TIDs the kernel lists in
//! /proc/self/task and all counters:
//! `threads=N tids=T1,.. tasks=P,T1,.. counters=C1,..`.
//! A restore that lost a thread, renumbered one or restarted the process
//! would show in these fields (checked by wl-threads-check).
//!
//! Usage: `wl-threads LOG [threads, 4] [tick ms, 100]`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kupgrade_workloads::{die, Args, Ticker};

struct Slot {
    tid: AtomicU32,
    counter: AtomicU64,
}

fn join(v: impl IntoIterator<Item = impl ToString>) -> String {
    v.into_iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// TIDs of this process as the kernel lists them.
fn tasks() -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

fn main() {
    let mut args = Args::new("wl-threads LOG [threads] [tick ms]");
    let log = args.req();
    let n: usize = args.opt(4);
    let tick_ms: u64 = args.opt(100);
    if n == 0 {
        die("need at least one thread");
    }
    let slots: Arc<Vec<Slot>> = Arc::new(
        (0..n)
            .map(|_| Slot {
                tid: AtomicU32::new(0),
                counter: AtomicU64::new(0),
            })
            .collect(),
    );
    for i in 0..n {
        let slots = Arc::clone(&slots);
        let spawned = std::thread::Builder::new()
            .name(format!("counter-{i}"))
            .spawn(move || {
                slots[i]
                    .tid
                    .store(nix::unistd::gettid().as_raw() as u32, Ordering::SeqCst);
                // The thread's own state lives on its stack; the atomic only shows it.
                let mut mine: u64 = 0;
                loop {
                    mine += 1;
                    slots[i].counter.store(mine, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        if let Err(e) = spawned {
            die(format!("cannot start thread {i}: {e}"));
        }
    }
    while slots.iter().any(|s| s.tid.load(Ordering::SeqCst) == 0) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let tids = join(slots.iter().map(|s| s.tid.load(Ordering::SeqCst)));
    let mut out = Ticker::open_or_die(&log, None);
    loop {
        let counters = join(slots.iter().map(|s| s.counter.load(Ordering::SeqCst)));
        out.tick_or_die(&format!(
            "threads={n} tids={tids} tasks={} counters={counters}",
            join(tasks())
        ));
        std::thread::sleep(Duration::from_millis(tick_ms));
    }
}
