//! A restored service's journal stream: the restore gives the service one
//! end of a socket pair in place of its connection to the old journald, and
//! this process, holding the other end on its stdin, forwards what the
//! service writes to the new journald (see [`contract::journal`]).
//!
//! It waits for journald's socket (systemd starts journald after this boot
//! has handed over to it; until then the service's lines wait in the socket
//! pair), introduces the stream as systemd did, and forwards until the
//! service's end closes. A journald that restarts is connected to again.
//!
//! The connection is made by a short-lived helper (`__journal-connect`), so
//! that the peer journald sees is gone by the first line: journald then
//! logs the stream under the unit its introduction names, as it does for
//! any client whose cgroup it cannot read.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use contract::journal::{JournalStream, JOURNAL_STDOUT, RELAY_DIR};

use crate::log;

/// kupgrade-init's hidden subcommand of the connecting helper.
pub const CONNECT_ARG: &str = "__journal-connect";

/// How often to look for journald's socket until it listens.
const RETRY: Duration = Duration::from_millis(250);

/// `kupgrade-init __journal-relay STREAM_JSON`, with the service's end on
/// stdin.
pub fn main(args: &[String]) -> i32 {
    log::open_kmsg();
    let [spec] = args else {
        log::line(&format!(
            "usage: kupgrade-init {} STREAM_JSON",
            contract::journal::RELAY_ARG
        ));
        return 2;
    };
    let Ok(stream) = serde_json::from_str::<JournalStream>(spec) else {
        log::line(&format!("journal relay: its stream does not parse: {spec}"));
        return 2;
    };
    let service = match io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            log::line(&format!(
                "journal relay for {}: no stream on stdin: {e}",
                stream.unit
            ));
            return 2;
        }
    };
    let record = record_path(&service);
    if let Some(path) = &record {
        // What the next upgrade's agent reads to carry the stream again.
        let _ = fs::create_dir_all(RELAY_DIR);
        let _ = fs::write(path, stream.record());
    }
    relay(service, || connect_by_helper(&stream));
    if let Some(path) = &record {
        let _ = fs::remove_file(path);
    }
    0
}

/// Its record, named by the inode of its end (the service's peer).
fn record_path(service: &UnixStream) -> Option<PathBuf> {
    let st = nix::sys::stat::fstat(service.as_raw_fd()).ok()?;
    Some(Path::new(RELAY_DIR).join(st.st_ino.to_string()))
}

/// Forwards `service` to the journal that `connect` reaches, until the
/// service's end closes.
pub fn relay(mut service: UnixStream, mut connect: impl FnMut() -> Option<UnixStream>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = 0;
    let mut out: Option<UnixStream> = None;
    loop {
        let Some(j) = out.as_mut() else {
            // Not read meanwhile: the service's lines wait in the pair.
            out = connect();
            if out.is_none() {
                std::thread::sleep(RETRY);
            }
            continue;
        };
        if pending > 0 {
            if j.write_all(&buf[..pending]).is_err() {
                // journald went away: the lines go to the next one.
                out = None;
                continue;
            }
            pending = 0;
        }
        match service.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending = n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A socket connected to journald, and the stream introduced, by a helper
/// process that has exited (and been reaped) when this returns.
fn connect_by_helper(stream: &JournalStream) -> Option<UnixStream> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    // No helper (and no PID spent) until journald's socket is there.
    if !Path::new(JOURNAL_STDOUT).exists() {
        return None;
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    let theirs = fd.try_clone().ok()?;
    let status = Command::new("/proc/self/exe")
        .arg0("kupgrade-init")
        .arg(CONNECT_ARG)
        .arg(serde_json::to_string(stream).ok()?)
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    status.success().then(|| UnixStream::from(fd))
}

/// `kupgrade-init __journal-connect STREAM_JSON`: connects the socket on
/// stdin to journald and introduces the stream.
pub fn connect_main(args: &[String]) -> i32 {
    let [spec] = args else { return 2 };
    let Ok(stream) = serde_json::from_str::<JournalStream>(spec) else {
        return 2;
    };
    let Ok(fd) = io::stdin().as_fd().try_clone_to_owned() else {
        return 2;
    };
    match introduce(fd, &stream, Path::new(JOURNAL_STDOUT)) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn introduce(fd: std::os::fd::OwnedFd, stream: &JournalStream, journal: &Path) -> io::Result<()> {
    use nix::sys::socket::{connect, UnixAddr};
    let addr = UnixAddr::new(journal).map_err(io::Error::from)?;
    connect(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    let mut s = UnixStream::from(fd);
    // journald sends nothing back but may read it as a hang-up.
    s.write_all(stream.header().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// What the helper does, in this process.
    fn direct(path: &Path) -> impl FnMut() -> Option<UnixStream> + '_ {
        move || {
            use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
            let fd = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            let ours = fd.try_clone().unwrap();
            introduce(fd, &stream(), path).ok()?;
            Some(UnixStream::from(ours))
        }
    }

    fn stream() -> JournalStream {
        JournalStream {
            inode: 1,
            identifier: "tick".into(),
            unit: "tick.service".into(),
            priority: 6,
            level_prefix: true,
            ..Default::default()
        }
    }

    /// A stand-in journald: what each connection sent, until it closed.
    fn accept_all(l: UnixListener, connections: usize) -> std::thread::JoinHandle<Vec<String>> {
        std::thread::spawn(move || {
            (0..connections)
                .map(|_| {
                    let (mut c, _) = l.accept().unwrap();
                    let mut got = String::new();
                    c.read_to_string(&mut got).unwrap();
                    got
                })
                .collect()
        })
    }

    #[test]
    fn lines_written_before_journald_listens_reach_it_after_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let (mut svc, relay_end) = UnixStream::pair().unwrap();
        svc.write_all(b"tick 1\ntick 2\n").unwrap();
        let p = path.clone();
        let relay = std::thread::spawn(move || relay(relay_end, direct(&p)));
        // journald comes later.
        std::thread::sleep(Duration::from_millis(300));
        let journald = accept_all(UnixListener::bind(&path).unwrap(), 1);
        svc.write_all(b"tick 3\n").unwrap();
        drop(svc);
        relay.join().unwrap();
        let got = journald.join().unwrap();
        assert_eq!(
            got,
            ["tick\ntick.service\n6\n1\n0\n0\n0\ntick 1\ntick 2\ntick 3\n"]
        );
    }

    #[test]
    fn a_journald_that_restarts_gets_the_header_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let listener = UnixListener::bind(&path).unwrap();
        let (mut svc, relay_end) = UnixStream::pair().unwrap();
        let p = path.clone();
        let relay = std::thread::spawn(move || relay(relay_end, direct(&p)));
        let (first, _) = listener.accept().unwrap();
        let mut first = io::BufReader::new(first);
        let mut header = String::new();
        for _ in 0..7 {
            io::BufRead::read_line(&mut first, &mut header).unwrap();
        }
        assert_eq!(header, stream().header());
        // journald goes; what the service writes next finds the new one.
        drop(first);
        drop(listener);
        fs::remove_file(&path).unwrap();
        let journald = accept_all(UnixListener::bind(&path).unwrap(), 1);
        // The first write after the close may still be taken by the old
        // socket's buffer; the ones after it go to the new journald.
        for i in 0..50 {
            if svc.write_all(format!("line {i}\n").as_bytes()).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(svc);
        relay.join().unwrap();
        let got = journald.join().unwrap();
        assert!(got[0].starts_with(&stream().header()), "{got:?}");
        assert!(got[0].contains("line 49\n"), "{got:?}");
    }
}
