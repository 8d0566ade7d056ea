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
    // A process that exits while we look is no part of the tree: without
    // its parent it would read as a second root.
    let parents: Vec<(i32, i32)> = cgroup::procs(cgroup)?
        .into_iter()
        .filter_map(|p| Some((p, proc::ppid(p)?)))
        .collect();
    let pids: Vec<i32> = parents.iter().map(|(p, _)| *p).collect();
    if pids.is_empty() {
        return Err(Error::Empty {
            name: name.into(),
            cgroup: cgroup.into(),
        });
    }
    let set: HashSet<i32> = pids.iter().copied().collect();
    let roots: Vec<i32> = parents
        .iter()
        .filter(|(_, pp)| !set.contains(pp))
        .map(|(p, _)| *p)
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
    // Our own sockets first: a member that exits after this closes its end,
    // and the peer table read next no longer names it.
    let own = proc::socket_inodes(&w.pids);
    let peers = crate::unix_diag::peers().unwrap_or_default();
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
        // A process that has exited since discovery holds nothing to refuse.
        let Some((pgrp, sid)) = proc::pgrp_and_session(pid) else {
            continue;
        };
        for (what, leader) in [("session", sid), ("process group", pgrp)] {
            if members.contains(&leader) {
                continue;
            }
            if proc::is_running(leader) {
                refuse(
                    &mut out,
                    pid,
                    format!("its {what} is led by pid {leader} ({}) outside the workload", proc::comm(leader)),
                    "CRIU needs the leader in the checkpoint: start the workload with setsid, or with `kupgrade launch`",
                );
            } else if what == "session" && pid == w.root_pid {
                // CRIU dumps a tree only from a session leader.
                refuse(
                    &mut out,
                    pid,
                    format!("it does not lead its own session: its leader, pid {leader}, has exited"),
                    "CRIU checkpoints a process tree only from the leader of its session: start the workload with setsid, or with `kupgrade launch`",
                );
            }
            // Below the root, CRIU restores the ids of a leader that has
            // exited with a helper task.
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
            // Unreadable: the process has exited while we looked.
            let Some(ns) = proc::namespace(&pid.to_string(), kind) else {
                continue;
            };
            if Some(&ns) != my_ns(kind).as_ref() {
                refuse(
                    &mut out,
                    pid,
                    format!("{kind} namespace {ns}"),
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

    /// The pid of a child that has exited and been reaped: no such process.
    fn vanished_pid() -> i32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        c.wait().unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        pid
    }

    /// A `sleep` whose session and process group leader (the shell that
    /// started it in a new session) has exited. Killed when dropped.
    struct Orphan(i32);
    impl Orphan {
        fn start() -> Self {
            let out = std::process::Command::new("setsid")
                .args(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
                .output()
                .unwrap();
            assert!(out.status.success());
            let pid = String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            Orphan(pid)
        }
    }
    impl Drop for Orphan {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    fn me_and(others: &[i32]) -> Workload {
        let me = std::process::id() as i32;
        Workload {
            name: "w".into(),
            cgroup: "/sys/fs/cgroup/kupgrade/w".into(),
            root_pid: me,
            pids: [&[me], others].concat(),
            pid_namespace: false,
            ipc_namespace: false,
            tcp_established: false,
            memory_bytes: 0,
        }
    }

    #[test]
    fn a_member_that_has_exited_is_not_refused() {
        let gone = vanished_pid();
        let r = refusals(&me_and(&[gone]));
        assert!(r.iter().all(|r| r.pid != gone), "{r:?}");
    }

    #[test]
    fn leaders_that_have_exited_are_not_refused_below_the_root() {
        let orphan = Orphan::start();
        let (pgrp, sid) = proc::pgrp_and_session(orphan.0).unwrap();
        assert_eq!(pgrp, sid);
        assert!(!Path::new(&format!("/proc/{sid}")).exists());
        let r = refusals(&me_and(&[orphan.0]));
        assert!(r.iter().all(|r| r.pid != orphan.0), "{r:?}");
    }

    #[test]
    fn a_root_whose_session_leader_has_exited_is_refused_as_such() {
        // CRIU dumps a tree only from a session leader (without --shell-job).
        let orphan = Orphan::start();
        let (_, sid) = proc::pgrp_and_session(orphan.0).unwrap();
        let w = Workload {
            root_pid: orphan.0,
            pids: vec![orphan.0],
            ..me_and(&[])
        };
        let r = refusals(&w);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            r[0].resource,
            format!("it does not lead its own session: its leader, pid {sid}, has exited")
        );
    }

    #[test]
    fn leaders_alive_outside_the_workload_are_still_refused() {
        use std::io::BufRead;
        // The shell leads a new session, starts a sleep in it, and waits.
        let mut leader = std::process::Command::new("setsid")
            .args(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!; read x"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(leader.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let member = Orphan(line.trim().parse().unwrap());
        let r = refusals(&me_and(&[member.0]));
        leader.kill().unwrap();
        leader.wait().unwrap();
        let mine: Vec<&str> = r
            .iter()
            .filter(|r| r.pid == member.0)
            .map(|r| r.resource.as_str())
            .collect();
        let lead = leader.id();
        assert_eq!(
            mine,
            vec![
                format!("its session is led by pid {lead} (sh) outside the workload"),
                format!("its process group is led by pid {lead} (sh) outside the workload"),
            ]
        );
    }

    #[test]
    fn a_member_that_vanished_from_the_cgroup_is_not_a_second_tree() {
        let d = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let gone = vanished_pid();
        fs::write(d.path().join("cgroup.procs"), format!("{me}\n{gone}\n")).unwrap();
        let w = inspect("w", d.path()).unwrap();
        assert_eq!((w.root_pid, w.pids), (me, vec![me]));
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
