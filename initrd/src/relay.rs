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
//! journald takes the sender of each message from its credentials
//! (`SCM_CREDENTIALS`), and the unit from the sender's cgroup: the relay
//! sends as the service's main process (root may name another PID), so the
//! lines are logged as the service's own, under its unit.

use std::cell::Cell;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use contract::journal::{JournalStream, JOURNAL_STDOUT, RELAY_DIR};
use nix::errno::Errno;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixCredentials};

use crate::log;

/// How often to look for journald's socket until it listens.
const RETRY: Duration = Duration::from_millis(250);

/// `kupgrade-init __journal-relay PID STREAM_JSON`, with the service's end
/// on stdin; its lines are sent as from `PID`.
pub fn main(args: &[String]) -> i32 {
    log::open_kmsg();
    let [pid, spec] = args else {
        log::line(&format!(
            "usage: kupgrade-init {} PID STREAM_JSON",
            contract::journal::RELAY_ARG
        ));
        return 2;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        log::line(&format!("journal relay: not a PID: {pid}"));
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
    let sender = Sender::as_pid(pid);
    relay(service, &sender, || {
        connect(&stream, Path::new(JOURNAL_STDOUT), &sender)
    });
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
pub fn relay(
    mut service: UnixStream,
    sender: &Sender,
    mut connect: impl FnMut() -> Option<UnixStream>,
) {
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
            if sender.send_all(j, &buf[..pending]).is_err() {
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

/// Who the journal is told sent the lines.
pub struct Sender {
    creds: Cell<UnixCredentials>,
}

impl Sender {
    /// As `pid`, with this process's user and group (root's, whose
    /// streams may name their unit in their introduction).
    pub fn as_pid(pid: i32) -> Self {
        Sender {
            creds: Cell::new(UnixCredentials::from(nix::libc::ucred {
                pid,
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
            })),
        }
    }

    /// Writes all of `data` to `s`, each message with these credentials.
    fn send_all(&self, s: &UnixStream, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let creds = self.creds.get();
            let cmsg = [ControlMessage::ScmCredentials(&creds)];
            let iov = [io::IoSlice::new(data)];
            match sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => data = &data[n..],
                Err(Errno::EINTR) => {}
                // The main process has exited (its workers may not have):
                // the kernel takes no credentials of a PID that is gone, so
                // the lines go on as the relay's own.
                Err(Errno::ESRCH) if creds.pid() != std::process::id() as i32 => {
                    self.creds.set(UnixCredentials::new());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// A stream to the journal at `journal`, introduced.
fn connect(stream: &JournalStream, journal: &Path, sender: &Sender) -> Option<UnixStream> {
    // Not there until the new journald's socket is (systemd makes it).
    let s = UnixStream::connect(journal).ok()?;
    sender.send_all(&s, stream.header().as_bytes()).ok()?;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    /// Sends as this process (no privilege needed for one's own PID).
    fn me() -> Sender {
        Sender::as_pid(std::process::id() as i32)
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
        let relay =
            std::thread::spawn(move || relay(relay_end, &me(), || connect(&stream(), &p, &me())));
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
        let relay =
            std::thread::spawn(move || relay(relay_end, &me(), || connect(&stream(), &p, &me())));
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

    /// journald takes the sender from each message's credentials: they
    /// name the service's process, not the relay.
    #[test]
    fn the_lines_are_sent_as_the_service_s_process() {
        use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: naming another PID needs root");
            return;
        }
        let mut service_process = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = service_process.id() as i32;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let listener = UnixListener::bind(&path).unwrap();
        let (mut svc, relay_end) = UnixStream::pair().unwrap();
        let p = path.clone();
        let relay = std::thread::spawn(move || {
            let sender = Sender::as_pid(pid);
            relay(relay_end, &sender, || connect(&stream(), &p, &sender))
        });
        let (journald, _) = listener.accept().unwrap();
        setsockopt(&journald, sockopt::PassCred, &true).unwrap();
        svc.write_all(b"tick 1\n").unwrap();
        drop(svc);
        let mut senders = Vec::new();
        let mut got = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!(UnixCredentials);
            let msg = recvmsg::<()>(
                journald.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .unwrap();
            if msg.bytes == 0 {
                break;
            }
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmCredentials(cred) = c {
                    senders.push(cred.pid());
                }
            }
            let n = msg.bytes;
            got.extend_from_slice(&buf[..n]);
        }
        relay.join().unwrap();
        let _ = service_process.kill();
        let _ = service_process.wait();
        assert!(
            String::from_utf8_lossy(&got).ends_with("tick 1\n"),
            "{got:?}"
        );
        assert!(!senders.is_empty());
        assert!(
            senders.iter().all(|p| *p == pid),
            "{senders:?}, service {pid}"
        );
    }

    /// Once the process it sends as is gone, the lines still go, as the
    /// relay's own.
    #[test]
    fn a_sender_that_has_exited_is_replaced_by_the_relay() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: naming another PID needs root");
            return;
        }
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id() as i32;
        gone.wait().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let sender = Sender::as_pid(pid);
        sender.send_all(&a, b"line\n").unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"line\n");
        assert_eq!(sender.creds.get().pid(), std::process::id() as i32);
    }
}
