//! Workloads: the process trees kupgrade preserves, one cgroup each, and
//! what would stop CRIU from checkpointing them, found before anything is
//! frozen.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::config::{self, Config};
use crate::{cgroup, proc};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub cgroup: PathBuf,
    /// The process whose parent is outside the cgroup: the tree CRIU dumps.
    pub root_pid: i32,
    pub pids: Vec<i32>,
    /// The tree runs in its own PID namespace (launched with --pid-namespace).
    pub pid_namespace: bool,
    /// The tree has an IPC namespace of its own, shared with nothing outside
    /// it (launched with --ipc-namespace): CRIU carries its SysV objects.
    pub ipc_namespace: bool,
    /// It holds TCP connections: dump with --tcp-established and a network lock.
    pub tcp_established: bool,
    /// Memory charged to it, or its resident set when the controller is off.
    pub memory_bytes: u64,
}

impl Workload {
    /// How the image records it for the restore.
    pub fn entry(&self) -> contract::WorkloadEntry {
        contract::WorkloadEntry {
            name: self.name.clone(),
            cgroup: self.cgroup.display().to_string(),
            root_pid: self.root_pid,
            pids: self.pids.clone(),
            section: contract::devstate::criu_section(&self.name),
            tcp_established: self.tcp_established,
            pid_namespace: self.pid_namespace,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("workload {name}: cgroup {cgroup} has no processes")]
    Empty { name: String, cgroup: PathBuf },
    #[error("workload {name}: cgroup {cgroup} holds {roots} separate process trees (pids {pids:?}); kupgrade checkpoints one tree per cgroup: give each its own cgroup")]
    SeveralTrees {
        name: String,
        cgroup: PathBuf,
        roots: usize,
        pids: Vec<i32>,
    },
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
}

/// Builds the workload living in `cgroup`.
pub fn inspect(name: &str, cgroup: &Path) -> Result<Workload, Error> {
    let pids = cgroup::procs(cgroup)?;
    if pids.is_empty() {
        return Err(Error::Empty {
            name: name.into(),
            cgroup: cgroup.into(),
        });
    }
    let set: HashSet<i32> = pids.iter().copied().collect();
    let roots: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|p| proc::ppid(*p).is_none_or(|pp| !set.contains(&pp)))
        .collect();
    if roots.len() != 1 {
        return Err(Error::SeveralTrees {
            name: name.into(),
            cgroup: cgroup.into(),
            roots: roots.len(),
            pids: roots,
        });
    }
    let root_pid = roots[0];
    let pid_namespace =
        proc::namespace(&root_pid.to_string(), "pid") != proc::namespace("self", "pid");
    let ipc_namespace = proc::namespace(&root_pid.to_string(), "ipc")
        != proc::namespace("self", "ipc")
        && namespace_outsiders(root_pid, "ipc", &set).is_empty();
    let memory_bytes = cgroup::memory_current(cgroup)
        .unwrap_or_else(|| pids.iter().map(|p| proc::rss_bytes(*p)).sum());
    Ok(Workload {
        name: name.into(),
        cgroup: cgroup.into(),
        root_pid,
        tcp_established: has_tcp_connections(&pids),
        pids,
        pid_namespace,
        ipc_namespace,
        memory_bytes,
    })
}

/// Processes outside `members` that share `pid`'s namespace of `kind`.
fn namespace_outsiders(pid: i32, kind: &str, members: &HashSet<i32>) -> Vec<i32> {
    let Some(ns) = proc::namespace(&pid.to_string(), kind) else {
        return Vec::new();
    };
    proc::all_pids()
        .into_iter()
        .filter(|p| !members.contains(p))
        .filter(|p| proc::namespace(&p.to_string(), kind).as_ref() == Some(&ns))
        .collect()
}

/// A TCP socket in any state but listen/close needs CRIU's --tcp-established.
fn has_tcp_connections(pids: &[i32]) -> bool {
    let inodes = proc::socket_inodes(pids);
    proc::tcp_sockets().iter().any(|s| {
        inodes.contains(&s.inode) && s.state != proc::TCP_LISTEN && s.state != proc::TCP_CLOSE
    })
}

/// Every workload: those `kupgrade launch` started, then those the config
/// declares. A broken one is returned as an error next to the good ones.
pub fn discover(cfg: &Config) -> Vec<Result<Workload, Error>> {
    let mut out = Vec::new();
    let mut names: Vec<String> = fs::read_dir(config::CGROUP_PARENT)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        let cg = Path::new(config::CGROUP_PARENT).join(&n);
        // An emptied cgroup of a workload that has exited is not a workload.
        if cgroup::procs(&cg).is_ok_and(|p| p.is_empty()) {
            continue;
        }
        out.push(inspect(&n, &cg));
    }
    for d in &cfg.workloads {
        let cg = if d.cgroup.is_absolute() {
            d.cgroup.clone()
        } else {
            Path::new(config::CGROUP_ROOT).join(&d.cgroup)
        };
        out.push(inspect(&d.name, &cg));
    }
    out
}

/// Something CRIU cannot checkpoint, found in a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub workload: String,
    pub pid: i32,
    pub resource: String,
    pub why: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "workload {} (pid {} {}): {}: {}",
            self.workload,
            self.pid,
            proc::comm(self.pid),
            self.resource,
            self.why
        )
    }
}

/// Character devices a checkpoint can carry: they hold no state.
const HARMLESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Finds what would make CRIU refuse the workload, before anything is frozen.
pub fn refusals(w: &Workload) -> Vec<Refusal> {
    let mut out = Vec::new();
    let refuse = |out: &mut Vec<Refusal>, pid, resource: String, why: &str| {
        out.push(Refusal {
            workload: w.name.clone(),
            pid,
            resource,
            why: why.to_string(),
        });
    };
    let my_ns = |kind| proc::namespace("self", kind);
    // Unix sockets: every peer must be inside the workload, or CRIU cannot
    // dump the connection. Without sock_diag, CRIU itself will say so.
    let peers = crate::unix_diag::peers().unwrap_or_default();
    let own = proc::socket_inodes(&w.pids);
    let mut outside: Vec<(i32, i32, u64)> = Vec::new();
    for &pid in &w.pids {
        for (fd, link) in proc::fds(pid) {
            let Some(ino) = proc::socket_inode(&link) else {
                continue;
            };
            if let Some(peer) = peers.get(&ino).filter(|p| !own.contains(p)) {
                outside.push((pid, fd, *peer));
            }
        }
    }
    if !outside.is_empty() {
        let owners = socket_owners(outside.iter().map(|o| o.2).collect());
        for (pid, fd, peer) in outside {
            let who = owners
                .get(&peer)
                .map(|p| format!("pid {p} ({})", proc::comm(*p)))
                .unwrap_or_else(|| "a process outside it".into());
            refuse(
                &mut out,
                pid,
                format!("fd {fd} is a unix socket connected to {who}"),
                "CRIU can only checkpoint both ends of a unix connection together: put the peer in the same workload",
            );
        }
    }
    let members: HashSet<i32> = w.pids.iter().copied().collect();
    for &pid in &w.pids {
        if let Some((pgrp, sid)) = proc::pgrp_and_session(pid) {
            for (what, leader) in [("session", sid), ("process group", pgrp)] {
                if !members.contains(&leader) {
                    refuse(
                        &mut out,
                        pid,
                        format!("its {what} is led by pid {leader} ({}) outside the workload", proc::comm(leader)),
                        "CRIU needs the leader in the checkpoint: start the workload with setsid, or with `kupgrade launch`",
                    );
                }
            }
        }
        for tid in proc::threads(pid) {
            let tracer = proc::status_field(tid, "TracerPid")
                .and_then(|t| t.parse::<i32>().ok())
                .unwrap_or(0);
            if tracer != 0 {
                refuse(
                    &mut out,
                    pid,
                    format!(
                        "thread {tid} traced by pid {tracer} ({})",
                        proc::comm(tracer)
                    ),
                    "CRIU must ptrace every task itself; detach the debugger or strace first",
                );
            }
        }
        for (fd, link) in proc::fds(pid) {
            if link == "anon_inode:[io_uring]" {
                refuse(
                    &mut out,
                    pid,
                    format!("fd {fd} is an io_uring"),
                    "CRIU cannot checkpoint io_uring instances",
                );
            } else if link.starts_with("/dev/")
                && !HARMLESS_DEVICES.contains(&link.as_str())
                && !link.starts_with("/dev/shm/")
                && !link.starts_with("/dev/pts/")
                && is_device(&link)
            {
                refuse(
                    &mut out,
                    pid,
                    format!("fd {fd} is the device {link}"),
                    "device state cannot be carried across a kernel; close it or run the workload without it",
                );
            }
        }
        if !w.ipc_namespace {
            // The kernel names an attached segment `/SYSV<key in hex> (deleted)`.
            let keys: Vec<String> = proc::mapped_files(pid)
                .iter()
                .filter_map(|p| p.strip_prefix("/SYSV"))
                .map(|k| format!("0x{}", k.split(' ').next().unwrap_or(k)))
                .collect();
            if !keys.is_empty() {
                refuse(
                    &mut out,
                    pid,
                    format!("SysV shared memory (key {}) attached in the host's IPC namespace", keys.join(", ")),
                    "CRIU carries SysV IPC only in a workload's own IPC namespace: start it with `kupgrade launch --ipc-namespace`",
                );
            }
        }
        for kind in ["net", "mnt", "ipc", "uts", "user", "cgroup"] {
            if kind == "ipc" && w.ipc_namespace {
                continue;
            }
            if proc::namespace(&pid.to_string(), kind) != my_ns(kind) {
                refuse(
                    &mut out,
                    pid,
                    format!(
                        "{kind} namespace {}",
                        proc::namespace(&pid.to_string(), kind).unwrap_or_default()
                    ),
                    if kind == "ipc" {
                        "CRIU carries an IPC namespace only with everything in it: give the workload its own with `kupgrade launch --ipc-namespace`"
                    } else {
                        "kupgrade restores workloads into the host's namespaces and does not manage this one"
                    },
                );
            }
        }
    }
    out
}

/// Which process holds each of `inodes` (the first found), from /proc/*/fd.
fn socket_owners(inodes: HashSet<u64>) -> std::collections::HashMap<u64, i32> {
    let mut out = std::collections::HashMap::new();
    for pid in proc::all_pids() {
        for (_, link) in proc::fds(pid) {
            if let Some(ino) = proc::socket_inode(&link).filter(|i| inodes.contains(i)) {
                out.entry(ino).or_insert(pid);
            }
        }
    }
    out
}

fn is_device(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(path)
        .is_ok_and(|m| m.file_type().is_char_device() || m.file_type().is_block_device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_with_two_trees_is_refused_with_their_pids() {
        let d = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        // Our own pid and pid 1: neither is the other's parent in the set.
        fs::write(d.path().join("cgroup.procs"), format!("1\n{me}\n")).unwrap();
        match inspect("w", d.path()) {
            Err(Error::SeveralTrees { roots: 2, pids, .. }) => assert_eq!(pids, vec![1, me]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_cgroup_is_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("cgroup.procs"), "").unwrap();
        assert!(matches!(inspect("w", d.path()), Err(Error::Empty { .. })));
    }

    #[test]
    fn this_test_process_is_one_tree_in_our_namespaces() {
        let d = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        fs::write(d.path().join("cgroup.procs"), format!("{me}\n")).unwrap();
        let w = inspect("me", d.path()).unwrap();
        assert_eq!(w.root_pid, me);
        assert!(!w.pid_namespace);
        assert!(w.memory_bytes > 0);
        // The test harness holds no io_uring, device or foreign namespace.
        let r = refusals(&w);
        assert!(r.iter().all(|r| !r.resource.contains("namespace")), "{r:?}");
    }
}
