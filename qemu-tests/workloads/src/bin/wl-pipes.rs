//! A process tree joined by a pipe, plus an orphan.
//!
//! The producer (the launched process) writes one numbered 32-byte record
//! per tick into a pipe to its consumer child: number, send time, payload and
//! a checksum. The consumer reads a record only once it is LAG ms old, so
//! that about LAG/TICK records always sit in the pipe (CRIU has to carry
//! them). A middle child starts a grandchild and exits at once: the
//! grandchild is re-parented to the producer, which made itself a child
//! subreaper so that the whole tree stays one tree (kupgrade dumps one tree
//! per cgroup; an orphan adopted by init would leave it). Each process logs
//! its own stream: `src=producer sent=N`, `src=consumer rec=N sum=ok ppid=P`,
//! `src=grandchild ppid=P orig_ppid=M`. Children are this program re-executed
//! with `--role`, never a bare fork.
//!
//! Usage: `wl-pipes LOG [tick ms, 100] [lag ms, 500]`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::Stdio;
use std::time::Duration;

use kupgrade_workloads::{die, mono_ms, parse_record, record, spawn_role, Args, Ticker, RECORD};

const USAGE: &str = "wl-pipes LOG [tick ms] [lag ms]";
fn ppid() -> i32 {
    nix::unistd::getppid().as_raw()
}

fn producer(log: String, tick: u64, lag: u64) {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        die(format!("cannot become a child subreaper: {e}"));
    }
    // Never waited for: the producer lives as long as the consumer does (a
    // dead consumer breaks the pipe and the producer dies of it).
    #[allow(clippy::zombie_processes)]
    let mut consumer = spawn_role("consumer")
        .arg(&log)
        .arg(lag.to_string())
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| die(format!("cannot start the consumer: {e}")));
    let Some(mut pipe) = consumer.stdin.take() else {
        die("no pipe to the consumer")
    };
    let middle = spawn_role("middle")
        .arg(&log)
        .arg(tick.to_string())
        .stdin(Stdio::null())
        .status();
    if !middle.as_ref().is_ok_and(|s| s.success()) {
        die(format!("the middle child failed: {middle:?}"));
    }
    let mut out = Ticker::open_or_die(&log, Some("producer"));
    loop {
        let n = out.seq();
        if let Err(e) = pipe.write_all(&record(n, mono_ms())) {
            die(format!("cannot write record {n}: {e}"));
        }
        out.tick_or_die(&format!("sent={n}"));
        std::thread::sleep(Duration::from_millis(tick));
    }
}

fn consumer(log: String, lag: u64) {
    // Unbuffered reads: std's stdin would read ahead and empty the pipe.
    let mut pipe = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .unwrap_or_else(|e| die(format!("no pipe on stdin: {e}")));
    let mut out = Ticker::open_or_die(&log, Some("consumer"));
    let mut r = [0u8; RECORD];
    loop {
        if let Err(e) = pipe.read_exact(&mut r) {
            die(format!(
                "pipe closed or broken after {} records: {e}",
                out.seq()
            ));
        }
        let Some((n, sent)) = parse_record(&r) else {
            out.tick_or_die(&format!("rec=? sum=BAD ppid={} lag_ms=0", ppid()));
            continue;
        };
        let wait = (sent + lag).saturating_sub(mono_ms());
        std::thread::sleep(Duration::from_millis(wait.min(lag)));
        out.tick_or_die(&format!(
            "rec={n} sum=ok ppid={} lag_ms={}",
            ppid(),
            mono_ms().saturating_sub(sent)
        ));
    }
}

fn middle(log: String, tick: u64) {
    let me = std::process::id().to_string();
    // Not waited for: the point is that it outlives us.
    if let Err(e) = spawn_role("grandchild")
        .arg(log)
        .arg(tick.to_string())
        .arg(me)
        .stdin(Stdio::null())
        .spawn()
    {
        die(format!("cannot start the grandchild: {e}"));
    }
}

fn grandchild(log: String, tick: u64, orig: i32) {
    for _ in 0..500 {
        if ppid() != orig {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = Ticker::open_or_die(&log, Some("grandchild"));
    loop {
        out.tick_or_die(&format!("ppid={} orig_ppid={orig}", ppid()));
        std::thread::sleep(Duration::from_millis(tick));
    }
}

fn main() {
    let mut args = Args::new(USAGE);
    match args.role().as_deref() {
        None => {
            let log = args.req();
            let tick = args.opt(100);
            let lag = args.opt(500);
            producer(log, tick, lag)
        }
        Some("consumer") => consumer(args.req(), args.req_as()),
        Some("middle") => middle(args.req(), args.req_as()),
        Some("grandchild") => grandchild(args.req(), args.req_as(), args.req_as()),
        Some(other) => die(format!("unknown role {other}")),
    }
}
