//! CRIU, run through its command line. The dump always leaves the original
//! tasks stopped (`--leave-stopped`), never killed: until the reboot, every
//! failure must be able to resume them untouched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::workload::Workload;

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
    #[error("`criu check` fails on this kernel: {0}")]
    Check(String),
}

/// `criu dump` for `w`; its restore counterpart is in the same place
/// ([`contract::criu`]), so both sides give the options that must match.
pub fn dump_args(w: &Workload, dir: &Path, log: &Path) -> Vec<String> {
    contract::criu::Checkpoint {
        workload: &w.entry(),
        images_dir: dir,
        log,
    }
    .dump_args()
}

/// The gist of a CRIU log file, for a one-line reason.
pub fn last_errors(log: &Path) -> String {
    contract::report::criu_errors(&fs::read_to_string(log).unwrap_or_default())
}

pub fn dump(criu: &str, w: &Workload, dir: &Path, log: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::Missing {
        criu: criu.into(),
        source,
    })?;
    let status = Command::new(criu)
        .args(dump_args(w, dir, log))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a Ctrl-C meant for kupgrade must not reach
        // CRIU half-way; kupgrade decides how to stop.
        .process_group(0)
        .status()
        .map_err(|source| Error::Missing {
            criu: criu.into(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Dump {
            workload: w.name.clone(),
            errors: last_errors(log),
            log: log.into(),
        })
    }
}

use std::os::unix::process::CommandExt;

/// `criu --version`, e.g. `3.17.1`.
pub fn version(criu: &str) -> Result<String, Error> {
    let out = Command::new(criu)
        .arg("--version")
        .output()
        .map_err(|source| Error::Missing {
            criu: criu.into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .unwrap_or("unknown")
        .trim()
        .to_string())
}

/// `criu check`: can CRIU work on this kernel at all?
pub fn check(criu: &str) -> Result<(), Error> {
    let out = Command::new(criu)
        .arg("check")
        .output()
        .map_err(|source| Error::Missing {
            criu: criu.into(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut why = text
        .lines()
        .rfind(|l| l.contains("Error"))
        .unwrap_or(text.trim())
        .to_string();
    if text.contains("vvar") || text.contains("vclock") {
        why.push_str(
            " (this kernel has the [vvar_vclock] mapping, 6.13+: CRIU 4.1 or newer is needed)",
        );
    }
    Err(Error::Check(why))
}

/// Name of the nftables table CRIU's network lock creates for a dump.
pub fn lock_table(w: &Workload) -> String {
    format!("CRIU-{}", w.root_pid)
}

/// `nft list table inet CRIU-<pid>`, to re-install it in the new kernel.
pub fn save_lock_table(w: &Workload) -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", "inet", &lock_table(w)])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Takes the workload's TCP sockets out of repair mode. A dump with
/// `--leave-stopped` leaves them in it (CRIU expects the tasks to be killed
/// and restored elsewhere); a dump we abandon must undo that before the
/// tasks run again, while the lock table still holds back the peers.
pub fn repair_off(w: &Workload) -> Result<usize, String> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt::TcpRepair};
    use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
    let tcp: std::collections::HashSet<u64> = crate::proc::tcp_sockets()
        .into_iter()
        .map(|s| s.inode)
        .collect();
    let mut done = std::collections::HashSet::new();
    let mut errors = Vec::new();
    for &pid in &w.pids {
        let Some(p) = Pid::from_raw(pid) else {
            continue;
        };
        let pidfd = match pidfd_open(p, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                errors.push(format!("pid {pid}: pidfd_open: {e}"));
                continue;
            }
        };
        for (fd, link) in crate::proc::fds(pid) {
            let Some(ino) = crate::proc::socket_inode(&link) else {
                continue;
            };
            if !tcp.contains(&ino) || done.contains(&ino) {
                continue;
            }
            let res = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())
                .map_err(|e| format!("pidfd_getfd: {e}"))
                .and_then(|sock| {
                    if getsockopt(&sock, TcpRepair).map_err(|e| e.to_string())? != 0 {
                        setsockopt(&sock, TcpRepair, &0)
                            .map_err(|e| format!("TCP_REPAIR off: {e}"))?;
                    }
                    Ok(())
                });
            match res {
                Ok(()) => {
                    done.insert(ino);
                }
                Err(e) => errors.push(format!("pid {pid} fd {fd}: {e}")),
            }
        }
    }
    if errors.is_empty() {
        Ok(done.len())
    } else {
        Err(errors.join("; "))
    }
}

/// Lifts CRIU's network lock for a dump we abandon.
pub fn drop_lock_table(w: &Workload) -> Result<(), String> {
    let out = Command::new("nft")
        .args(["delete", "table", "inet", &lock_table(w)])
        .output()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
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
        let a = dump_args(&wl(false), Path::new("/d"), Path::new("/l"));
        assert!(a.contains(&"--leave-stopped".to_string()));
        assert!(!a.contains(&"--tcp-established".to_string()));
        let a = dump_args(&wl(true), Path::new("/d"), Path::new("/l"));
        assert!(a
            .windows(2)
            .any(|p| p[0] == "--network-lock" && p[1] == "nftables"));
        assert_eq!(lock_table(&wl(true)), "CRIU-10001");
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
