//! A process tree meant to run in its own PID namespace (the harness starts
//! it with `kupgrade launch --pid-namespace`): the launched process starts
//! CHILDREN children and every process ticks on its own stream, logging its
//! pid in the namespace (`pid=`, from getpid) and its pid in every namespace
//! from the root down (`nspids=`, the NSpid line of /proc/self/status).
//! Streams: `src=parent children=N kids=P1,P2,..` and `src=child-I ppid=P`.
//!
//! Usage: `wl-pidns LOG [children, 3] [tick ms, 100]`.

use std::process::Stdio;
use std::time::Duration;

use kupgrade_workloads::{die, spawn_role, status_field, Args, Ticker};

fn nspids() -> String {
    let v = status_field("/proc/self/status", "NSpid").unwrap_or_default();
    v.split_whitespace().collect::<Vec<_>>().join(",")
}

fn tick_forever(mut out: Ticker, extra: &str, tick: u64) -> ! {
    loop {
        out.tick_or_die(&format!("{extra} nspids={}", nspids()));
        std::thread::sleep(Duration::from_millis(tick));
    }
}

fn main() {
    let mut args = Args::new("wl-pidns LOG [children] [tick ms]");
    match args.role().as_deref() {
        None => {
            let log = args.req();
            let n: usize = args.opt(3);
            let tick: u64 = args.opt(100);
            let mut kids = Vec::new();
            for i in 0..n {
                let child = spawn_role("child")
                    .arg(&log)
                    .arg(i.to_string())
                    .arg(tick.to_string())
                    .stdin(Stdio::null())
                    .spawn();
                match child {
                    Ok(c) => kids.push(c.id().to_string()),
                    Err(e) => die(format!("cannot start child {i}: {e}")),
                }
            }
            let out = Ticker::open_or_die(&log, Some("parent"));
            tick_forever(out, &format!("children={n} kids={}", kids.join(",")), tick)
        }
        Some("child") => {
            let (log, i, tick): (String, usize, u64) = (args.req(), args.req_as(), args.req_as());
            let out = Ticker::open_or_die(&log, Some(&format!("child-{i}")));
            let ppid = nix::unistd::getppid();
            tick_forever(out, &format!("ppid={ppid}"), tick)
        }
        Some(other) => die(format!("unknown role {other}")),
    }
}
