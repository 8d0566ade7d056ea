//! A unit's watchdog across the freeze. systemd kills a service whose pings
//! (`WATCHDOG=1`) stop for its `WatchdogSec=`; a frozen service sends none,
//! so a freeze longer than that has the old systemd kill it, and the signal
//! (SIGABRT) is pending in the checkpoint, delivered after the restore.
//!
//! Before its freeze, kupgrade turns the unit's watchdog off
//! (`WATCHDOG_USEC=0`, see sd_notify(3)), sent as the unit's main process
//! (root may give another PID in `SCM_CREDENTIALS`), and records the unit's
//! own value under `/run/kupgrade/watchdog/`. A thaw (an abort, or `kupgrade
//! resume` after a `go` that died) sets it back from that record, which
//! also restarts its timer. After a kexec the new systemd has the unit's
//! `WatchdogSec=` from its file.

use std::fs;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
    UnixCredentials,
};

use crate::config::RUN_DIR;

/// systemd's socket for its services' notifications.
pub const NOTIFY_SOCKET: &str = "/run/systemd/notify";

/// Where the notifications go and the unit's own values are kept.
#[derive(Clone, Debug)]
pub struct Watchdogs {
    pub socket: PathBuf,
    pub records: PathBuf,
}

impl Watchdogs {
    pub fn system() -> Self {
        Watchdogs {
            socket: NOTIFY_SOCKET.into(),
            records: Path::new(RUN_DIR).join("watchdog"),
        }
    }

    fn record(&self, unit: &str) -> PathBuf {
        self.records.join(unit)
    }

    /// Turns off the watchdog of `unit` (`usec` its `WatchdogSec=`), whose
    /// main process is `main_pid`.
    pub fn suspend(&self, unit: &str, main_pid: i32, usec: u64) -> io::Result<()> {
        fs::create_dir_all(&self.records)?;
        // Recorded first: a go that dies after the notification still finds it.
        let record = self.record(unit);
        fs::write(&record, format!("{usec}\n"))?;
        notify_as(&self.socket, main_pid, "WATCHDOG_USEC=0").inspect_err(|_| {
            // Not suspended: nothing for the thaw to set back.
            let _ = fs::remove_file(&record);
        })
    }

    /// Sets the watchdog of `unit` back to what [`Self::suspend`] recorded;
    /// `Ok(false)` when it was not suspended.
    pub fn restore(&self, unit: &str, main_pid: i32) -> io::Result<bool> {
        let path = self.record(unit);
        let usec = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        notify_as(&self.socket, main_pid, &format!("WATCHDOG_USEC={usec}"))?;
        fs::remove_file(&path)?;
        Ok(true)
    }
}

/// Sends `message` to systemd's notification socket as process `pid`.
fn notify_as(socket_path: &Path, pid: i32, message: &str) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(socket_path)?;
    let creds = UnixCredentials::from(nix::libc::ucred {
        pid,
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    });
    let iov = [IoSlice::new(message.as_bytes())];
    let cmsg = [ControlMessage::ScmCredentials(&creds)];
    sendmsg(fd.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{bind, recvmsg, setsockopt, sockopt, ControlMessageOwned};
    use std::os::fd::OwnedFd;

    /// A stand-in for systemd's socket, taking the senders' credentials.
    fn listener(path: &Path) -> OwnedFd {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        setsockopt(&fd, sockopt::PassCred, &true).unwrap();
        fd
    }

    fn received(fd: &OwnedFd) -> (String, i32) {
        let mut buf = [0u8; 256];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(UnixCredentials);
        let msg = recvmsg::<UnixAddr>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT,
        )
        .unwrap();
        let pid = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(c) => Some(c.pid()),
                _ => None,
            })
            .unwrap();
        let n = msg.bytes;
        (String::from_utf8_lossy(&buf[..n]).into_owned(), pid)
    }

    fn in_dir(dir: &Path) -> Watchdogs {
        Watchdogs {
            socket: dir.join("notify"),
            records: dir.join("records"),
        }
    }

    #[test]
    fn the_watchdog_is_turned_off_for_the_freeze_and_set_back_at_the_thaw() {
        let d = tempfile::tempdir().unwrap();
        let w = in_dir(d.path());
        let systemd = listener(&w.socket);
        let me = std::process::id() as i32;
        // Not suspended: nothing to set back, nothing sent.
        assert!(!w.restore("pulse.service", me).unwrap());
        w.suspend("pulse.service", me, 30_000_000).unwrap();
        assert_eq!(received(&systemd), ("WATCHDOG_USEC=0".into(), me));
        assert_eq!(
            fs::read_to_string(w.records.join("pulse.service")).unwrap(),
            "30000000\n"
        );
        assert!(w.restore("pulse.service", me).unwrap());
        assert_eq!(received(&systemd), ("WATCHDOG_USEC=30000000".into(), me));
        // Set back once.
        assert!(!w.records.join("pulse.service").exists());
        assert!(!w.restore("pulse.service", me).unwrap());
    }

    #[test]
    fn no_systemd_socket_is_an_error_that_leaves_nothing_to_set_back() {
        let d = tempfile::tempdir().unwrap();
        let w = in_dir(d.path());
        let me = std::process::id() as i32;
        assert!(w.suspend("pulse.service", me, 5_000_000).is_err());
        assert!(!w.records.join("pulse.service").exists());
        assert!(!w.restore("pulse.service", me).unwrap());
    }
}
