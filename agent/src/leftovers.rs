//! One `kupgrade go` at a time, and what one that died half-way left behind.
//!
//! `go` undoes its own work on every error and signal it can catch, but not
//! when it is killed (SIGKILL, the OOM killer, a crash): then workloads stay
//! frozen, CRIU's tasks stopped with their TCP sockets in repair mode behind
//! a network lock, new connections held back, file systems read-only, a
//! valid image in the store. `go` holds an flock for its whole run, which
//! the kernel drops when it dies; `kupgrade resume` takes it, finds what is
//! left and undoes it.

use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::child::{self, Limits};
use crate::config::{RUN_DIR, WORK_DIR};
use crate::remount::{self, Remounted};
use crate::store::Store;
use crate::workload::Workload;
use crate::{cgroup, criu, listen};

/// Held by `go` and `resume` for as long as they run.
#[derive(Debug)]
pub struct RunLock {
    _lock: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another `kupgrade go` or `kupgrade resume` is running: wait for it to finish")]
    Busy,
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

impl RunLock {
    pub fn take() -> Result<RunLock, LockError> {
        let _ = fs::create_dir_all(RUN_DIR);
        RunLock::at(&Path::new(RUN_DIR).join("go.lock"))
    }

    fn at(path: &Path) -> Result<RunLock, LockError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
        let open = |source| LockError::Open {
            path: path.into(),
            source,
        };
        // flock needs no write access: anyone who can open it could hold it
        // and keep `resume` out.
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(path)
            .map_err(open)?;
        if f.metadata().map_err(open)?.mode() & 0o077 != 0 {
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(open)?;
        }
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(RunLock { _lock: lock }),
            Err((_, nix::Error::EWOULDBLOCK)) => Err(LockError::Busy),
            Err((_, source)) => Err(LockError::Lock {
                path: path.into(),
                source,
            }),
        }
    }
}

/// Where `go` lists the mount points it made read-only, one per line, so
/// that `resume` can make them writable again.
pub fn remount_journal() -> PathBuf {
    Path::new(RUN_DIR).join("remounted-ro")
}

/// What an interrupted `go` left, each as a line for people.
#[derive(Debug, Default)]
pub struct Leftovers {
    pub frozen: Vec<String>,
    pub lock_tables: Vec<String>,
    pub connections_held: bool,
    pub read_only: Vec<Remounted>,
    /// A valid image written by this boot: only a `go` that did not reach
    /// the kexec leaves one.
    pub image_from_this_boot: bool,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.frozen.is_empty()
            && self.lock_tables.is_empty()
            && !self.connections_held
            && self.read_only.is_empty()
            && !self.image_from_this_boot
    }

    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for w in &self.frozen {
            out.push(format!("workload {w} is frozen"));
        }
        for t in &self.lock_tables {
            out.push(format!("CRIU's network lock inet {t} is in place"));
        }
        if self.connections_held {
            out.push(format!(
                "new TCP connections are held back (nftables table inet {})",
                listen::HOLD_TABLE
            ));
        }
        for m in &self.read_only {
            out.push(format!("{} was made read-only", m.target));
        }
        if self.image_from_this_boot {
            out.push("the store holds an image of this boot's workloads".into());
        }
        out
    }
}

fn nft_table_exists(name: &str) -> bool {
    child::run(
        Command::new("nft").args(["list", "table", "inet", name]),
        None,
        Limits::deadline(child::TOOL_DEADLINE),
    )
    .is_ok_and(|o| o.status.success())
}

/// Looks for what an interrupted `go` leaves. Only meaningful while no
/// `go` runs (hold a [`RunLock`]).
pub fn find(workloads: &[Workload], store: Option<&Store>) -> Leftovers {
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Leftovers {
        frozen: workloads
            .iter()
            .filter(|w| cgroup::is_frozen(&w.cgroup).unwrap_or(false))
            .map(|w| w.name.clone())
            .collect(),
        lock_tables: workloads
            .iter()
            .map(criu::lock_table)
            .filter(|t| nft_table_exists(t))
            .collect(),
        connections_held: nft_table_exists(listen::HOLD_TABLE),
        read_only: remount::read_journal(&remount_journal()),
        image_from_this_boot: store.is_some_and(|s| image_of_boot(s, &boot_id)),
    }
}

/// Whether the store holds a valid, not yet restored image from `boot_id`.
fn image_of_boot(store: &Store, boot_id: &str) -> bool {
    let Ok(f) = store.open_rw() else {
        return false;
    };
    image_format::Image::open(f).is_ok_and(|img| {
        img.superblock().state == image_format::State::Written && img.manifest().boot_id == boot_id
    })
}

/// CRIU processes running now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CriuRunning {
    /// Dumping into `go`'s work directory: left by a `go` that died (with
    /// the run lock held, no `go` runs), so nothing will use their dump.
    pub ours: Vec<i32>,
    /// Any other CRIU, which kupgrade leaves alone.
    pub others: Vec<i32>,
}

pub fn criu_processes() -> CriuRunning {
    let mut out = CriuRunning::default();
    for pid in crate::proc::all_pids() {
        if crate::proc::comm(pid) != "criu" {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if dumps_into(&cmdline, Path::new(WORK_DIR)) {
            out.ours.push(pid);
        } else {
            out.others.push(pid);
        }
    }
    out
}

/// Whether a `/proc/PID/cmdline` names a path under `dir`.
fn dumps_into(cmdline: &[u8], dir: &Path) -> bool {
    cmdline
        .split(|b| *b == 0)
        .map(|arg| Path::new(std::ffi::OsStr::from_bytes(arg)))
        .any(|arg| arg.starts_with(dir))
}

/// Kills the CRIU processes a dead `go` left (each with its process
/// group, which `go` made for it) and waits until they are gone: a hung
/// dump must not keep the workloads stopped. Returns those still there.
pub fn stop_criu(pids: &[i32]) -> Vec<i32> {
    use nix::sys::signal::{killpg, Signal};
    for &pid in pids {
        let _ = killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    let host = crate::proc::Proc::host();
    let start = Instant::now();
    loop {
        // Reaped by init, their new parent; a zombie is gone too.
        let left: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|p| host.comm(*p) == "criu" && host.is_running(*p))
            .collect();
        if left.is_empty() || start.elapsed() > Duration::from_secs(10) {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_run_at_a_time_and_the_lock_dies_with_its_holder() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("go.lock");
        let first = RunLock::at(&path).unwrap();
        let e = RunLock::at(&path).unwrap_err();
        assert!(matches!(e, LockError::Busy), "{e:?}");
        assert!(e.to_string().contains("is running"), "{e}");
        drop(first);
        RunLock::at(&path).unwrap();
    }

    /// flock needs no write access: a lock others can open, others can hold.
    #[test]
    fn only_root_can_open_the_run_lock() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("go.lock");
        let mode = || fs::metadata(&path).unwrap().mode() & 0o777;
        drop(RunLock::at(&path).unwrap());
        assert_eq!(mode(), 0o600);
        // One an older kupgrade left 0644 is tightened.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        drop(RunLock::at(&path).unwrap());
        assert_eq!(mode(), 0o600);
    }

    #[test]
    fn a_criu_dumping_into_the_work_dir_is_ours() {
        let ours = b"criu\0dump\0-t\x0010001\0-D\0/run/kupgrade/work/criu/web\0--leave-stopped\0";
        assert!(dumps_into(ours, Path::new(WORK_DIR)));
        let other = b"criu\0dump\0-D\0/var/tmp/mine\0";
        assert!(!dumps_into(other, Path::new(WORK_DIR)));
        // A prefix of the name is not the directory.
        let near = b"criu\0-D\0/run/kupgrade/workshop\0";
        assert!(!dumps_into(near, Path::new(WORK_DIR)));
        assert!(!dumps_into(b"", Path::new(WORK_DIR)));
    }

    #[test]
    fn nothing_found_is_empty_and_says_nothing() {
        let l = Leftovers::default();
        assert!(l.is_empty() && l.describe().is_empty());
        let l = Leftovers {
            frozen: vec!["web".into()],
            connections_held: true,
            ..Leftovers::default()
        };
        assert!(!l.is_empty());
        assert_eq!(l.describe().len(), 2);
        assert!(l.describe()[0].contains("workload web is frozen"));
    }
}
