//! Keeps a counter and a block of pseudo-random data in anonymous memory and
//! appends one line per tick to a log: `seq=N pid=P boot=ID mono_ms=T mem=ok`.
//! A restart would reset `seq`; lost memory would show `mem=BAD`.
//!
//! Usage: `wl-counter LOG [MiB of anonymous memory, 8] [tick ms, 100]`.

use std::time::Duration;

use kupgrade_workloads::{xorshift, Args, Ticker};

fn digest(mem: &[u64]) -> u64 {
    mem.iter().fold(0u64, |a, v| a.rotate_left(5) ^ v)
}

fn main() {
    let mut args = Args::new("wl-counter LOG [MiB of anonymous memory] [tick ms]");
    let log = args.req();
    let mib: usize = args.opt(8);
    let tick_ms: u64 = args.opt(100);
    let mut x = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mem: Vec<u64> = (0..mib * 1024 * 1024 / 8)
        .map(|_| xorshift(&mut x))
        .collect();
    let want = digest(&mem);
    let mut out = Ticker::open_or_die(&log, None);
    loop {
        let state = if digest(&mem) == want { "ok" } else { "BAD" };
        out.tick_or_die(&format!("mem={state}"));
        std::thread::sleep(Duration::from_millis(tick_ms));
    }
}
