//! A daemon in the old style: it forks after `setsid` and forks again, so
//! that the process left (the tree's root) is in a session and a process
//! group whose leader has exited; it writes its pid file under `/run`,
//! reloads its configuration on SIGHUP, and has a worker in a second
//! orphaned session below it.
//!
//! The launched process spawns `--role session`, which calls setsid,
//! spawns `--role daemon` and exits; the launched process waits for the pid
//! file to name a running process, then exits. The daemon makes itself a
//! child subreaper, makes the pid file's directory (mode 0750) and writes
//! its pid there, reads CONF (writing `initial` into it if it is missing),
//! and spawns `--role session worker`, which calls setsid, spawns
//! `--role worker` and exits: the worker is re-parented to the daemon, in a
//! session and group whose leader is gone, which CRIU restores with a
//! helper.
//!
//! Streams, one line a tick:
//!
//! ```text
//! src=daemon config=VALUE reloads=N pidfile=ok|missing|PID sid=S pgid=G
//! src=worker sid=S pgid=G
//! ```
//!
//! `pidfile` is what the pid file says at each tick (`ok`: this process).
//! On SIGHUP the daemon reads CONF again and counts the reload.
//!
//! Usage: `wl-daemon LOG PIDFILE CONF [tick ms, 200]`.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpgrp, getsid, setsid, Pid};

use kupgrade_workloads::{die, spawn_role, Args, Ticker};

const USAGE: &str = "wl-daemon LOG PIDFILE CONF [tick ms]";

fn ids() -> String {
    let sid = getsid(None).map(|p| p.as_raw()).unwrap_or(-1);
    format!("sid={sid} pgid={}", getpgrp())
}

fn read_pid(path: &str) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_conf(path: &str) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => s.split_whitespace().next().unwrap_or("").to_string(),
        Err(_) => {
            if let Err(e) = std::fs::write(path, "initial\n") {
                die(format!("cannot write {path}: {e}"));
            }
            "initial".into()
        }
    }
}

/// The launched process: starts the daemon two forks away, returns once
/// its pid file names a running process.
fn launcher(args: Vec<String>, pidfile: &str) {
    let started = spawn_role("session").args(&args).spawn();
    if let Err(e) = started.and_then(|mut c| c.wait()) {
        die(format!("cannot start the daemon: {e}"));
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let running = read_pid(pidfile).is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if running {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    die(format!("the daemon wrote no pid to {pidfile}"));
}

/// Leads a new session just long enough to start `role` in it.
fn session(role: &str, args: Vec<String>) {
    if let Err(e) = setsid() {
        die(format!("setsid: {e}"));
    }
    if let Err(e) = spawn_role(role).args(args).spawn() {
        die(format!("cannot start {role}: {e}"));
    }
}

fn daemon(log: &str, pidfile: &str, conf: &str, tick: u64) {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        die(format!("PR_SET_CHILD_SUBREAPER: {e}"));
    }
    let hup = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone()) {
        die(format!("cannot handle SIGHUP: {e}"));
    }
    if let Some(dir) = Path::new(pidfile).parent() {
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir);
        if let Err(e) = made {
            die(format!("cannot make {}: {e}", dir.display()));
        }
    }
    let me = std::process::id();
    if let Err(e) = std::fs::write(pidfile, format!("{me}\n")) {
        die(format!("cannot write {pidfile}: {e}"));
    }
    let mut config = read_conf(conf);
    let worker = spawn_role("session")
        .args(["worker", log, &tick.to_string()])
        .spawn()
        .and_then(|mut c| c.wait());
    if let Err(e) = worker {
        die(format!("cannot start the worker: {e}"));
    }
    let mut out = Ticker::open_or_die(log, Some("daemon"));
    let mut reloads = 0u64;
    loop {
        if hup.swap(false, Ordering::Relaxed) {
            config = read_conf(conf);
            reloads += 1;
        }
        let pf = match read_pid(pidfile) {
            Some(p) if p == me as i32 => "ok".to_string(),
            Some(p) => p.to_string(),
            None => "missing".to_string(),
        };
        out.tick_or_die(&format!(
            "config={config} reloads={reloads} pidfile={pf} {}",
            ids()
        ));
        // Reap whatever is re-parented here (the worker never exits).
        while let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
            waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG))
        {}
        std::thread::sleep(Duration::from_millis(tick));
    }
}

fn worker(log: &str, tick: u64) {
    let mut out = Ticker::open_or_die(log, Some("worker"));
    loop {
        out.tick_or_die(&ids());
        std::thread::sleep(Duration::from_millis(tick));
    }
}

fn main() {
    let mut args = Args::new(USAGE);
    match args.role().as_deref() {
        None => {
            let (log, pidfile, conf) = (args.req(), args.req(), args.req());
            let tick: u64 = args.opt(200);
            let pass = vec![
                "daemon".into(),
                log,
                pidfile.clone(),
                conf,
                tick.to_string(),
            ];
            launcher(pass, &pidfile)
        }
        Some("session") => {
            let role = args.req();
            session(&role, args.rest())
        }
        Some("daemon") => {
            let (log, pidfile, conf) = (args.req(), args.req(), args.req());
            daemon(&log, &pidfile, &conf, args.req_as())
        }
        Some("worker") => {
            let log = args.req();
            worker(&log, args.req_as())
        }
        Some(other) => die(format!("unknown role {other}")),
    }
}
