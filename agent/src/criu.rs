//! CRIU, run through its command line. The dump always leaves the original
//! tasks stopped (`--leave-stopped`), never killed: until the reboot, every
//! failure must be able to resume them untouched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::child::{self, Limits, TOOL_DEADLINE};
use crate::workload::Workload;

/// `criu check` probes the whole kernel: seconds under emulation.
const CHECK_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {criu}: install CRIU (apt-get install criu) or set `criu` in /etc/kupgrade/config.toml")]
    Missing {
        criu: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CRIU refused to checkpoint workload {workload}: {errors} (log: {log})")]
    Dump {
        workload: String,
        errors: String,
        log: PathBuf,
    },
    #[error("CRIU's checkpoint of workload {workload} (log: {log})")]
    DumpStopped {
        workload: String,
        log: PathBuf,
        #[source]
        source: child::Error,
    },
    #[error("CRIU refused to pre-dump workload {workload}: {errors} (log: {log})")]
    Predump {
        workload: String,
        errors: String,
        log: PathBuf,
    },
    #[error("CRIU's pre-dump of workload {workload} (log: {log})")]
    PredumpStopped {
        workload: String,
        log: PathBuf,
        #[source]
        source: child::Error,
    },
    #[error("{criu} {what}")]
    Stopped {
        criu: String,
        what: &'static str,
        #[source]
        source: child::Error,
    },
}

impl Error {
    /// The error of a CRIU run that did not end by itself.
    fn of_run(criu: &str, what: &'static str, e: child::Error) -> Error {
        match e {
            child::Error::Spawn { source, .. } => Error::Missing {
                criu: criu.into(),
                source,
            },
            e => Error::Stopped {
                criu: criu.into(),
                what,
                source: e,
            },
        }
    }
}

/// `criu dump` for `w`, after the pre-dump in `parent` (relative to `dir`)
/// if there was one; its restore counterpart is in the same place
/// ([`contract::criu`]), so both sides give the options that must match.
pub fn dump_args(w: &Workload, dir: &Path, parent: Option<&Path>, log: &Path) -> Vec<String> {
    let c = contract::criu::Checkpoint {
        workload: &w.entry(),
        images_dir: dir,
        log,
    };
    match parent {
        Some(p) => c.incremental_dump_args(p),
        None => c.dump_args(),
    }
}

/// Bytes of memory pages CRIU wrote into `dir` (its `pages-N.img` files):
/// for a pre-dump, what was dirtied since its parent.
pub fn pages_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("pages-") && name.ends_with(".img")
        })
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// `criu pre-dump` of `w` into `dir` (made afresh), after the pre-dump in
/// `parent` (relative to `dir`) if any, within `limits`. The tasks run on;
/// returns the bytes of pages written.
pub fn predump(
    criu: &str,
    w: &Workload,
    dir: &Path,
    parent: Option<&Path>,
    log: &Path,
    limits: Limits,
) -> Result<u64, Error> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).map_err(|source| Error::Missing {
        criu: criu.into(),
        source,
    })?;
    let args = contract::criu::Checkpoint {
        workload: &w.entry(),
        images_dir: dir,
        log,
    }
    .predump_args(parent);
    let out = child::run(Command::new(criu).args(args), None, limits).map_err(|e| match e {
        e @ child::Error::Spawn { .. } => Error::of_run(criu, "pre-dump", e),
        source => Error::PredumpStopped {
            workload: w.name.clone(),
            log: log.into(),
            source,
        },
    })?;
    if out.status.success() {
        Ok(pages_bytes(dir))
    } else {
        Err(Error::Predump {
            workload: w.name.clone(),
            errors: last_errors(log),
            log: log.into(),
        })
    }
}

/// The gist of a CRIU log file, for a one-line reason.
pub fn last_errors(log: &Path) -> String {
    contract::report::criu_errors(&fs::read_to_string(log).unwrap_or_default())
}

/// `criu dump` of `w` into `dir` (after the pre-dump in `parent`, relative
/// to `dir`), within `limits`: a CRIU that hangs is
/// killed, and its dump fails.
pub fn dump(
    criu: &str,
    w: &Workload,
    dir: &Path,
    parent: Option<&Path>,
    log: &Path,
    limits: Limits,
) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::Missing {
        criu: criu.into(),
        source,
    })?;
    let out = child::run(
        Command::new(criu).args(dump_args(w, dir, parent, log)),
        None,
        limits,
    )
    .map_err(|e| match e {
        e @ child::Error::Spawn { .. } => Error::of_run(criu, "dump", e),
        source => Error::DumpStopped {
            workload: w.name.clone(),
            log: log.into(),
            source,
        },
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Dump {
            workload: w.name.clone(),
            errors: last_errors(log),
            log: log.into(),
        })
    }
}

/// `criu --version`, e.g. `3.17.1`.
pub fn version(criu: &str) -> Result<String, Error> {
    let out = child::run(
        Command::new(criu).arg("--version"),
        None,
        Limits::deadline(TOOL_DEADLINE),
    )
    .map_err(|e| Error::of_run(criu, "--version", e))?;
    Ok(out
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .unwrap_or("unknown")
        .trim()
        .to_string())
}

/// Why `criu check` fails on this kernel.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Missing(#[from] Error),
    /// The installed CRIU predates something this kernel does: nothing can
    /// be checkpointed until CRIU `needed` or newer is installed.
    #[error(
        "`criu check` fails on this kernel: {detail} ({why}: CRIU {needed} or newer is needed)"
    )]
    NeedsNewer {
        detail: String,
        why: &'static str,
        needed: &'static str,
    },
    /// A feature CRIU tests is missing: only workloads using it are refused.
    #[error("`criu check` fails on this kernel: {0}")]
    Feature(String),
}

/// `criu check`: can CRIU work on this kernel at all?
pub fn check(criu: &str) -> Result<(), CheckError> {
    let out = child::run(
        Command::new(criu).arg("check"),
        None,
        Limits::deadline(CHECK_DEADLINE),
    )
    .map_err(|e| Error::of_run(criu, "check", e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(check_failure(&format!("{}{}", out.stdout(), out.stderr())))
}

/// Tells a CRIU too old for this kernel from a missing feature, by what
/// `criu check` printed.
fn check_failure(text: &str) -> CheckError {
    let detail = text
        .lines()
        .rfind(|l| l.contains("Error"))
        .unwrap_or(text.trim())
        .to_string();
    if text.contains("vvar") || text.contains("vclock") {
        return CheckError::NeedsNewer {
            detail,
            why: "this kernel has the [vvar_vclock] mapping, 6.13+",
            needed: "4.1",
        };
    }
    CheckError::Feature(detail)
}

/// Name of the nftables table CRIU's network lock creates for a dump.
pub fn lock_table(w: &Workload) -> String {
    format!("CRIU-{}", w.root_pid)
}

/// `nft list table inet CRIU-<pid>`, to re-install it in the new kernel.
pub fn save_lock_table(w: &Workload, limits: Limits) -> Option<String> {
    let out = child::run(
        Command::new("nft").args(["list", "table", "inet", &lock_table(w)]),
        None,
        limits,
    )
    .ok()?;
    out.status.success().then(|| out.stdout())
}

/// Why one step of undoing a dump failed for one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// The task exited since the dump (or since the cgroup was read): for
    /// the undo, that task is done.
    Vanished,
    Failed(String),
}

/// What undoing a dump does to the machine, apart so that its logic is
/// tested without root ([`RealTasks`] on the machine).
pub trait Tasks {
    /// The workload's processes now (its cgroup and those below).
    fn procs(&mut self, cgroup: &Path) -> Result<Vec<i32>, String>;
    /// Takes `pid`'s TCP sockets out of repair mode.
    fn repair_off(&mut self, pid: i32) -> Result<(), TaskError>;
    fn drop_lock_table(&mut self, w: &Workload) -> Result<(), String>;
    /// SIGCONT.
    fn cont(&mut self, pid: i32) -> Result<(), TaskError>;
}

/// Undoes a dump of `w` that we abandon: with `locked` (the workload has
/// connections), its TCP sockets out of repair mode while the lock still
/// holds back the peers, then the lock lifted; then every task continued
/// (CRIU left them stopped with --leave-stopped, and the cgroup thaw that
/// follows does not continue a SIGSTOP).
///
/// The tasks are the cgroup's at this moment (one forked after discovery is
/// one too). Every step runs whatever the others did; a task that has
/// exited is done. Returns what failed, each naming its task.
pub fn undump(t: &mut dyn Tasks, w: &Workload, locked: bool) -> Result<(), Vec<String>> {
    let mut failed = Vec::new();
    // Its cgroup may be gone with its last task; then the pids we know.
    let pids = t.procs(&w.cgroup).unwrap_or_else(|_| w.pids.clone());
    if locked {
        for &pid in &pids {
            if let Err(TaskError::Failed(e)) = t.repair_off(pid) {
                failed.push(format!("pid {pid}: {e}"));
            }
        }
        if let Err(e) = t.drop_lock_table(w) {
            failed.push(e);
        }
    }
    for &pid in &pids {
        if let Err(TaskError::Failed(e)) = t.cont(pid) {
            failed.push(format!("pid {pid}: cannot continue: {e}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed)
    }
}

/// [`Tasks`] on the running system.
#[derive(Default)]
pub struct RealTasks {
    /// Inodes of this network namespace's TCP sockets, read once.
    tcp: Option<std::collections::HashSet<u64>>,
    /// Sockets already out of repair mode (tasks share them).
    done: std::collections::HashSet<u64>,
}

impl Tasks for RealTasks {
    fn procs(&mut self, cgroup: &Path) -> Result<Vec<i32>, String> {
        crate::cgroup::procs(cgroup).map_err(|e| e.to_string())
    }

    fn repair_off(&mut self, pid: i32) -> Result<(), TaskError> {
        use nix::sys::socket::{getsockopt, setsockopt, sockopt::TcpRepair};
        use rustix::io::Errno;
        use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
        let tcp = self.tcp.get_or_insert_with(|| {
            crate::proc::tcp_sockets()
                .into_iter()
                .map(|s| s.inode)
                .collect()
        });
        let Some(p) = Pid::from_raw(pid) else {
            return Err(TaskError::Vanished);
        };
        let pidfd = match pidfd_open(p, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(Errno::SRCH) => return Err(TaskError::Vanished),
            Err(e) => return Err(TaskError::Failed(format!("pidfd_open: {e}"))),
        };
        let mut errors = Vec::new();
        // A task that exits while we look has no fds left to list.
        for (fd, link) in crate::proc::fds(pid) {
            let Some(ino) = crate::proc::socket_inode(&link) else {
                continue;
            };
            if !tcp.contains(&ino) || self.done.contains(&ino) {
                continue;
            }
            let sock = match pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) {
                Ok(sock) => sock,
                Err(Errno::SRCH) => return Err(TaskError::Vanished),
                // Closed since it was listed: nothing to undo.
                Err(Errno::BADF) => continue,
                Err(e) => {
                    errors.push(format!("fd {fd}: pidfd_getfd: {e}"));
                    continue;
                }
            };
            let res = getsockopt(&sock, TcpRepair)
                .map_err(|e| format!("fd {fd}: TCP_REPAIR: {e}"))
                .and_then(|on| {
                    if on != 0 {
                        setsockopt(&sock, TcpRepair, &0)
                            .map_err(|e| format!("fd {fd}: TCP_REPAIR off: {e}"))?;
                    }
                    Ok(())
                });
            match res {
                Ok(()) => {
                    self.done.insert(ino);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TaskError::Failed(errors.join("; ")))
        }
    }

    fn drop_lock_table(&mut self, w: &Workload) -> Result<(), String> {
        drop_lock_table(w)
    }

    fn cont(&mut self, pid: i32) -> Result<(), TaskError> {
        use nix::sys::signal::{kill, Signal};
        match kill(nix::unistd::Pid::from_raw(pid), Signal::SIGCONT) {
            Ok(()) => Ok(()),
            Err(nix::Error::ESRCH) => Err(TaskError::Vanished),
            Err(e) => Err(TaskError::Failed(e.to_string())),
        }
    }
}

/// Lifts CRIU's network lock for a dump we abandon.
pub fn drop_lock_table(w: &Workload) -> Result<(), String> {
    let out = child::run(
        Command::new("nft").args(["delete", "table", "inet", &lock_table(w)]),
        None,
        Limits::deadline(TOOL_DEADLINE),
    )
    .map_err(|e| crate::child::chain(&e))?;
    let err = out.stderr();
    // Already gone is what we want.
    if out.status.success() || err.contains("No such file") {
        Ok(())
    } else {
        Err(format!(
            "nft delete table inet {}: {}",
            lock_table(w),
            err.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(tcp: bool) -> Workload {
        Workload {
            name: "w".into(),
            cgroup: "/sys/fs/cgroup/kupgrade/w".into(),
            root_pid: 10001,
            pids: vec![10001],
            pid_namespace: false,
            ipc_namespace: false,
            tcp_established: tcp,
            memory_bytes: 0,
            ..Workload::default()
        }
    }

    #[test]
    fn dump_always_leaves_tasks_stopped_and_locks_only_for_tcp() {
        let a = dump_args(&wl(false), Path::new("/d"), None, Path::new("/l"));
        assert!(a.contains(&"--leave-stopped".to_string()));
        assert!(!a.contains(&"--tcp-established".to_string()));
        let a = dump_args(&wl(true), Path::new("/d"), None, Path::new("/l"));
        assert!(a
            .windows(2)
            .any(|p| p[0] == "--network-lock" && p[1] == "nftables"));
        assert_eq!(lock_table(&wl(true)), "CRIU-10001");
    }

    #[test]
    fn a_kernel_with_vvar_vclock_needs_a_newer_criu_other_failures_are_features() {
        let e = check_failure(
            "Warn  (criu/kerndat.c:1)\nError (criu/proc_parse.c:7): Unknown mapping [vvar_vclock]\nLooks bad\n",
        );
        match &e {
            CheckError::NeedsNewer { detail, needed, .. } => {
                assert_eq!(*needed, "4.1");
                assert!(detail.contains("Unknown mapping"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("CRIU 4.1 or newer is needed"), "{e}");
        let e = check_failure("Error (criu/cr-check.c:9): fdinfo doesn't contain the lock field\n");
        assert!(
            matches!(&e, CheckError::Feature(d) if d.contains("lock field")),
            "{e:?}"
        );
    }

    /// A machine for [`undump`]: what each task does, and what was done.
    #[derive(Default)]
    struct Machine {
        /// The cgroup now; `None` when it cannot be read.
        procs: Option<Vec<i32>>,
        vanished: Vec<i32>,
        repair_fails: Vec<i32>,
        cont_fails: Vec<i32>,
        lock_fails: bool,
        did: Vec<String>,
    }

    impl Tasks for Machine {
        fn procs(&mut self, _cgroup: &Path) -> Result<Vec<i32>, String> {
            self.procs.clone().ok_or_else(|| "cannot read".to_string())
        }
        fn repair_off(&mut self, pid: i32) -> Result<(), TaskError> {
            if self.vanished.contains(&pid) {
                return Err(TaskError::Vanished);
            }
            if self.repair_fails.contains(&pid) {
                return Err(TaskError::Failed("TCP_REPAIR off: EPERM".into()));
            }
            self.did.push(format!("repair off {pid}"));
            Ok(())
        }
        fn drop_lock_table(&mut self, _w: &Workload) -> Result<(), String> {
            if self.lock_fails {
                return Err("nft delete table inet CRIU-10001: busy".into());
            }
            self.did.push("drop lock".into());
            Ok(())
        }
        fn cont(&mut self, pid: i32) -> Result<(), TaskError> {
            if self.vanished.contains(&pid) {
                return Err(TaskError::Vanished);
            }
            if self.cont_fails.contains(&pid) {
                return Err(TaskError::Failed("EPERM".into()));
            }
            self.did.push(format!("cont {pid}"));
            Ok(())
        }
    }

    /// Discovered with 10001 and 10002; 10002 has exited since and 10003
    /// was forked.
    fn three() -> (Workload, Machine) {
        let w = Workload {
            pids: vec![10001, 10002],
            ..wl(true)
        };
        let m = Machine {
            procs: Some(vec![10001, 10003]),
            vanished: vec![10002],
            ..Machine::default()
        };
        (w, m)
    }

    #[test]
    fn undump_walks_the_cgroup_now_and_a_task_that_exited_is_done() {
        let (w, mut m) = three();
        undump(&mut m, &w, true).unwrap();
        assert_eq!(
            m.did,
            [
                "repair off 10001",
                "repair off 10003",
                "drop lock",
                "cont 10001",
                "cont 10003"
            ]
        );
        // Without connections there is no lock and no repair mode.
        let (w, mut m) = three();
        undump(&mut m, &w, false).unwrap();
        assert_eq!(m.did, ["cont 10001", "cont 10003"]);
    }

    #[test]
    fn undump_runs_every_step_and_reports_each_failure() {
        let (w, mut m) = three();
        m.repair_fails = vec![10001];
        m.lock_fails = true;
        m.cont_fails = vec![10003];
        let errors = undump(&mut m, &w, true).unwrap_err();
        // Repair of 10001 failed, yet the lock was tried and 10001 continued.
        assert_eq!(m.did, ["repair off 10003", "cont 10001"]);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("pid 10001") && errors[0].contains("TCP_REPAIR"));
        assert!(errors[1].contains("CRIU-10001"));
        assert!(errors[2].contains("pid 10003") && errors[2].contains("continue"));
    }

    #[test]
    fn undump_falls_back_to_the_discovered_pids_when_the_cgroup_is_unreadable() {
        let (w, mut m) = three();
        m.procs = None;
        undump(&mut m, &w, true).unwrap();
        assert_eq!(
            m.did,
            ["repair off 10001", "drop lock", "cont 10001"],
            "10002 has vanished"
        );
    }

    /// A CRIU that never returns (here: one that sleeps) is killed at the
    /// dump's deadline and the dump fails, so that the undo runs.
    #[test]
    fn a_hung_criu_dump_is_killed_at_its_deadline() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let criu = d.path().join("criu");
        fs::write(&criu, "#!/bin/sh\nexec sleep 100\n").unwrap();
        fs::set_permissions(&criu, fs::Permissions::from_mode(0o755)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.path().join("images");
        let log = d.path().join("dump.log");
        let criu = criu.display().to_string();
        std::thread::spawn(move || {
            let limits = crate::child::Limits::deadline(std::time::Duration::from_millis(300));
            let _ = tx.send(
                dump(&criu, &wl(true), &dir, None, &log, limits).map_err(|e| child::chain(&e)),
            );
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("criu dump still waited for after 10 s");
        let e = got.unwrap_err();
        assert!(
            e.contains("workload w") && e.contains("did not finish within 0.3 s"),
            "{e}"
        );
    }

    /// What a pre-dump wrote is its pages images, nothing else in the dir.
    #[test]
    fn pages_bytes_counts_only_the_pages_images() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("pages-1.img"), vec![0u8; 8192]).unwrap();
        fs::write(d.path().join("pages-2.img"), vec![0u8; 4096]).unwrap();
        fs::write(d.path().join("pagemap-10001.img"), vec![0u8; 100]).unwrap();
        fs::write(d.path().join("inventory.img"), vec![0u8; 50]).unwrap();
        assert_eq!(pages_bytes(d.path()), 12288);
        assert_eq!(pages_bytes(&d.path().join("none")), 0);
    }

    /// A CRIU that refuses the pre-dump is an error naming the workload and
    /// CRIU's reason, and the pre-dump is asked with memory tracking.
    #[test]
    fn a_refused_predump_says_why() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let criu = d.path().join("criu");
        let args = d.path().join("args");
        fs::write(
            &criu,
            format!(
                "#!/bin/sh\necho \"$@\" > {}\necho 'Error (criu/mem.c:1): soft-dirty tracking is not supported' > {}\nexit 1\n",
                args.display(),
                d.path().join("log").display()
            ),
        )
        .unwrap();
        fs::set_permissions(&criu, fs::Permissions::from_mode(0o755)).unwrap();
        let e = predump(
            &criu.display().to_string(),
            &wl(false),
            &d.path().join("pre/2"),
            Some(Path::new("../1")),
            &d.path().join("log"),
            Limits::deadline(std::time::Duration::from_secs(10)),
        )
        .unwrap_err();
        let e = child::chain(&e);
        assert!(
            e.contains("pre-dump workload w") && e.contains("soft-dirty"),
            "{e}"
        );
        let args = fs::read_to_string(args).unwrap();
        assert!(args.starts_with("pre-dump "), "{args}");
        assert!(
            args.contains("--track-mem --prev-images-dir ../1"),
            "{args}"
        );
    }

    #[test]
    fn last_errors_skip_probe_noise() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("dump.log");
        fs::write(
            &log,
            "(00.1) Error (criu/tun.c:84): tun: Unable to create tun: Operation not permitted\n(00.2) Error (criu/files.c:12): Can't dump io_uring\n",
        )
        .unwrap();
        assert_eq!(last_errors(&log), "Can't dump io_uring");
        assert_eq!(last_errors(&d.path().join("none")), "no error logged");
    }
}
