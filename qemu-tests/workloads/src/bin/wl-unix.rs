//! Unix domain sockets between two processes, with data in flight.
//!
//! The sender (the launched process) opens three channels to its receiver
//! child: a stream socketpair and a datagram socketpair (handed to the child
//! as its stdin and stdout, the safe way to pass descriptors), and a named
//! stream socket bound at `DIR/wl-unix-PID.sock` that the child connects to.
//! `DIR` is made if missing, mode 0750 and group 65534 (`nogroup`), as a
//! daemon's socket directory under `/run` is. The listener goes on
//! accepting: every later client gets one line, `hello from PID`, so that a
//! checker can prove the socket is reachable by its path.
//! Every tick it sends the next numbered 32-byte record (number, send time,
//! payload, checksum) on all three. The receiver takes record N from each
//! channel only once it is LAG ms old, so about LAG/TICK records always sit
//! in each socket's queue for CRIU to carry. Streams:
//! `src=sender sent=N` and `src=receiver stream=N dgram=N named=N sums=ok`.
//!
//! The sender's lines also give the directory's mode and owner as made
//! (`dir_mode=750 dir_owner=0:65534`).
//!
//! Usage: `wl-unix LOG [socket dir, /run] [tick ms, 100] [lag ms, 500]`.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::process::Stdio;
use std::time::Duration;

use kupgrade_workloads::{die, mono_ms, parse_record, record, spawn_role, Args, Ticker, RECORD};

const USAGE: &str = "wl-unix LOG [socket dir] [tick ms] [lag ms]";

fn sender(log: String, dir: String, tick: u64, lag: u64) {
    let (mut stream, stream_peer) =
        UnixStream::pair().unwrap_or_else(|e| die(format!("socketpair(STREAM): {e}")));
    let (dgram, dgram_peer) =
        UnixDatagram::pair().unwrap_or_else(|e| die(format!("socketpair(DGRAM): {e}")));
    if !std::path::Path::new(&dir).is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&dir)
            .unwrap_or_else(|e| die(format!("cannot make {dir}: {e}")));
        std::os::unix::fs::chown(&dir, Some(0), Some(65534))
            .unwrap_or_else(|e| die(format!("cannot chown {dir}: {e}")));
    }
    let made = std::fs::metadata(&dir).unwrap_or_else(|e| die(format!("stat {dir}: {e}")));
    let dir_meta = format!(
        "dir_mode={:o} dir_owner={}:{}",
        made.mode() & 0o7777,
        made.uid(),
        made.gid()
    );
    let path = format!("{dir}/wl-unix-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).unwrap_or_else(|e| die(format!("cannot bind {path}: {e}")));
    let child = spawn_role("receiver")
        .arg(&log)
        .arg(&path)
        .arg(lag.to_string())
        .stdin(Stdio::from(OwnedFd::from(stream_peer)))
        .stdout(Stdio::from(OwnedFd::from(dgram_peer)))
        .spawn();
    if let Err(e) = child {
        die(format!("cannot start the receiver: {e}"));
    }
    // The listener stays open: a listening named socket is part of the test.
    let (mut named, _) = listener
        .accept()
        .unwrap_or_else(|e| die(format!("accept on {path}: {e}")));
    std::thread::spawn(move || greet(listener));
    let mut out = Ticker::open_or_die(&log, Some("sender"));
    loop {
        let n = out.seq();
        let r = record(n, mono_ms());
        let sent = stream
            .write_all(&r)
            .and_then(|_| dgram.send(&r))
            .and_then(|_| named.write_all(&r));
        if let Err(e) = sent {
            die(format!("cannot send record {n}: {e}"));
        }
        out.tick_or_die(&format!("sent={n} path={path} {dir_meta}"));
        std::thread::sleep(Duration::from_millis(tick));
    }
}

/// Answers every later client of the named socket with one line.
fn greet(listener: UnixListener) {
    let hello = format!("hello from {}\n", std::process::id());
    for client in listener.incoming() {
        // A client that went away needs nothing more.
        let _ = client.and_then(|mut c| c.write_all(hello.as_bytes()));
    }
}

/// The numbers in a record, or `BAD` for a bad checksum or a short datagram.
fn check(r: &[u8; RECORD], len: usize) -> Option<(u64, u64)> {
    if len != RECORD {
        return None;
    }
    parse_record(r)
}

fn receiver(log: String, path: String, lag: u64) {
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .unwrap_or_else(|e| die(format!("dup: {e}")))
    };
    let mut stream = UnixStream::from(dup(std::io::stdin().as_fd()));
    let dgram = UnixDatagram::from(dup(std::io::stdout().as_fd()));
    let mut named = UnixStream::connect(&path)
        .unwrap_or_else(|e| die(format!("cannot connect to {path}: {e}")));
    let mut out = Ticker::open_or_die(&log, Some("receiver"));
    let mut r = [[0u8; RECORD]; 3];
    loop {
        let got = stream
            .read_exact(&mut r[0])
            .map(|_| RECORD)
            .and_then(|_| dgram.recv(&mut r[1]))
            .and_then(|len| named.read_exact(&mut r[2]).map(|_| len));
        let dlen =
            got.unwrap_or_else(|e| die(format!("receiving after {} records: {e}", out.seq())));
        let recs = [
            check(&r[0], RECORD),
            check(&r[1], dlen),
            check(&r[2], RECORD),
        ];
        let show = |i: usize| recs[i].map_or("BAD".to_string(), |(n, _)| n.to_string());
        let sent = recs.iter().flatten().map(|(_, t)| *t).max().unwrap_or(0);
        let wait = (sent + lag).saturating_sub(mono_ms());
        std::thread::sleep(Duration::from_millis(wait.min(lag)));
        let sums = if recs.iter().all(Option::is_some) {
            "ok"
        } else {
            "BAD"
        };
        out.tick_or_die(&format!(
            "stream={} dgram={} named={} sums={sums} lag_ms={}",
            show(0),
            show(1),
            show(2),
            mono_ms().saturating_sub(sent)
        ));
    }
}

fn main() {
    let mut args = Args::new(USAGE);
    match args.role().as_deref() {
        None => {
            let log = args.req();
            let dir = args.opt("/run".to_string());
            let tick = args.opt(100);
            let lag = args.opt(500);
            sender(log, dir, tick, lag)
        }
        Some("receiver") => receiver(args.req(), args.req(), args.req_as()),
        Some(other) => die(format!("unknown role {other}")),
    }
}
