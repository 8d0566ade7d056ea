//! Keeps a counter and a block of pseudo-random data in anonymous memory and
//! appends one line per tick to a log: `seq=N pid=P boot=ID mono_ms=T mem=ok`.
//! A restart would reset `seq`; lost memory would show `mem=BAD`.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Duration;

use kupgrade_workloads::{boot_id, mono_ms};

fn fill(buf: &mut [u64], seed: u64) {
    let mut x = seed;
    for v in buf.iter_mut() {
        // xorshift: cheap, deterministic, not compressible to nothing
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = x;
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(log), mib, tick_ms) = (
        args.next(),
        args.next().and_then(|s| s.parse::<usize>().ok()).unwrap_or(8),
        args.next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(100),
    ) else {
        eprintln!("usage: wl-counter LOG [MiB of anonymous memory] [tick ms]");
        std::process::exit(2);
    };
    let mut mem = vec![0u64; mib * 1024 * 1024 / 8];
    let seed = 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64;
    fill(&mut mem, seed);
    let mut expect = vec![0u64; mem.len()];
    fill(&mut expect, seed);
    drop(expect);
    let digest = mem.iter().fold(0u64, |a, v| a.rotate_left(5) ^ v);
    let mut out = match OpenOptions::new().create(true).append(true).open(&log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("wl-counter: cannot open {log}: {e}");
            std::process::exit(1);
        }
    };
    let pid = std::process::id();
    let mut seq: u64 = 0;
    loop {
        let now = mem.iter().fold(0u64, |a, v| a.rotate_left(5) ^ v);
        let state = if now == digest { "ok" } else { "BAD" };
        let line = format!("seq={seq} pid={pid} boot={} mono_ms={} mem={state}\n", boot_id(), mono_ms());
        if out.write_all(line.as_bytes()).is_err() {
            std::process::exit(1);
        }
        seq += 1;
        std::thread::sleep(Duration::from_millis(tick_ms));
    }
}
