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
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};

use crate::config::RUN_DIR;
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
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| LockError::Open {
                path: path.into(),
                source,
            })?;
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
    Command::new("nft")
        .args(["list", "table", "inet", name])
        .output()
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

/// CRIU processes still running: a dump that outlived the `go` that
/// started it must finish before anything is undone.
pub fn criu_processes() -> Vec<i32> {
    crate::proc::all_pids()
        .into_iter()
        .filter(|p| crate::proc::comm(*p) == "criu")
        .collect()
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
