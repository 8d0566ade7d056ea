//! Workloads: the process trees kupgrade preserves, one cgroup each, found
//! in the cgroup2 hierarchy and `/proc`. What would stop CRIU from
//! checkpointing them is in [`crate::refusal`].

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::config::{self, Config};
use crate::proc::{Namespace, Proc, TCP_CLOSE, TCP_LISTEN};
use crate::{cgroup, units};

pub use crate::refusal::{refusals, Refusal};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// Its root does not lead its session, whose leader has exited (a
    /// daemon that forked after `setsid`): CRIU takes it as a shell job.
    pub shell_job: bool,
    /// A process of it has a controlling terminal: restored running (see
    /// [`contract::WorkloadEntry::job_control`]).
    pub job_control: bool,
    /// Runtime state on tmpfs mounts that the config declares for it.
    pub runtime_paths: Vec<PathBuf>,
    /// Its connections to journald, carried as [`contract::journal`] says.
    pub journal_streams: Vec<contract::journal::JournalStream>,
    /// The systemd service it was declared by, adopted by that unit again
    /// after the restore.
    pub unit: Option<String>,
    /// That unit's `NotifyAccess=`, as systemd has it.
    pub notify_access: Option<String>,
    /// That unit's `WatchdogSec=`, when set.
    pub watchdog_usec: Option<u64>,
    /// That unit's file, when it is transient (see
    /// [`contract::WorkloadEntry::unit_file`]).
    pub unit_file: Option<String>,
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
            shell_job: self.shell_job,
            job_control: self.job_control,
            journal_streams: self.journal_streams.clone(),
            unit: self.unit.clone(),
            notify_access: self.notify_access.clone(),
            unit_file: self.unit_file.clone(),
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
    #[error("workload {name}: unit {unit} is not running (no populated cgroup of that name below {root}); start it with `systemctl start {unit}` or take it out of the config")]
    UnitNotRunning {
        name: String,
        unit: String,
        root: PathBuf,
    },
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
}

/// Builds the workload living in `cgroup`, on the running system.
pub fn inspect(name: &str, cgroup: &Path) -> Result<Workload, Error> {
    inspect_in(&Proc::host(), name, cgroup)
}

/// Builds the workload living in `cgroup`, its processes as `proc` shows them.
pub fn inspect_in(proc: &Proc, name: &str, cgroup: &Path) -> Result<Workload, Error> {
    // A process that exits while we look is no part of the tree: without
    // its parent it would read as a second root.
    let parents: Vec<(i32, i32)> = cgroup::procs(cgroup)?
        .into_iter()
        .filter_map(|p| Some((p, proc.ppid(p)?)))
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
    let foreign = |ns| proc.namespace(root_pid, ns) != proc.own_namespace(ns);
    let pid_namespace = foreign(Namespace::Pid);
    let ipc_namespace = foreign(Namespace::Ipc)
        && namespace_outsiders(proc, root_pid, Namespace::Ipc, &set).is_empty();
    let memory_bytes = cgroup::memory_current(cgroup)
        .unwrap_or_else(|| pids.iter().map(|p| proc.rss_bytes(*p)).sum());
    let shell_job = proc.stat(root_pid).is_some_and(|s| s.session != root_pid);
    let job_control = pids
        .iter()
        .any(|p| proc.stat(*p).is_some_and(|s| s.tty_nr != 0));
    Ok(Workload {
        name: name.into(),
        cgroup: cgroup.into(),
        root_pid,
        tcp_established: has_tcp_connections(proc, &pids),
        pids,
        pid_namespace,
        ipc_namespace,
        memory_bytes,
        shell_job,
        job_control,
        runtime_paths: Vec::new(),
        journal_streams: Vec::new(),
        unit: None,
        notify_access: None,
        watchdog_usec: None,
        unit_file: None,
    })
}

/// Processes outside `members` that share `pid`'s namespace `ns`.
fn namespace_outsiders(proc: &Proc, pid: i32, ns: Namespace, members: &HashSet<i32>) -> Vec<i32> {
    let Some(link) = proc.namespace(pid, ns) else {
        return Vec::new();
    };
    proc.all_pids()
        .into_iter()
        .filter(|p| !members.contains(p))
        .filter(|p| proc.namespace(*p, ns).as_ref() == Some(&link))
        .collect()
}

/// A TCP socket in any state but listen/close needs CRIU's --tcp-established.
fn has_tcp_connections(proc: &Proc, pids: &[i32]) -> bool {
    let inodes = proc.socket_inodes(pids);
    proc.tcp_sockets()
        .iter()
        .any(|s| inodes.contains(&s.inode) && s.state != TCP_LISTEN && s.state != TCP_CLOSE)
}

/// Every workload: those `kupgrade launch` started (in their cgroups, or as
/// transient units on systemd), then those the config declares. A broken one is returned as an error next to the good ones.
pub fn discover(cfg: &Config) -> Vec<Result<Workload, Error>> {
    use crate::refusal::Host;
    let host = crate::refusal::LiveHost::new();
    discover_in(
        host.proc(),
        Path::new(config::CGROUP_ROOT),
        Path::new(config::CGROUP_PARENT),
        Path::new(units::SYSTEMD_RUN),
        cfg,
    )
    .into_iter()
    .map(|w| {
        w.map(|w| {
            let props = w
                .unit
                .as_deref()
                .map(units::service_props)
                .unwrap_or_default();
            Workload {
                journal_streams: crate::refusal::journal_streams(&host, &w),
                notify_access: props.notify_access,
                watchdog_usec: props.watchdog_usec,
                ..w
            }
        })
    })
    .collect()
}

/// [`discover`] in a cgroup2 hierarchy at `cgroup_root`, with the launched
/// workloads' cgroups under `launched`, systemd's runtime directory at
/// `systemd_run`, and processes as `proc` shows them.
pub fn discover_in(
    proc: &Proc,
    cgroup_root: &Path,
    launched: &Path,
    systemd_run: &Path,
    cfg: &Config,
) -> Vec<Result<Workload, Error>> {
    let mut out = Vec::new();
    let mut names: Vec<String> = fs::read_dir(launched)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        let cg = launched.join(&n);
        // An emptied cgroup of a workload that has exited is not a workload.
        if cgroup::procs(&cg).is_ok_and(|p| p.is_empty()) {
            continue;
        }
        let declared = cfg.launched(&n).map(|d| d.runtime_paths.clone());
        out.push(inspect_in(proc, &n, &cg).map(|w| Workload {
            runtime_paths: declared.unwrap_or_default(),
            ..w
        }));
    }
    let declared_units: HashSet<&str> = cfg
        .workloads
        .iter()
        .filter_map(|d| d.unit.as_deref())
        .collect();
    for s in units::running_services(cgroup_root) {
        if declared_units.contains(s.unit.as_str()) {
            continue;
        }
        let Some(file) = units::carried_unit_file(systemd_run, &s.unit) else {
            continue;
        };
        let Some(name) = units::launched_name(&s.unit, &file) else {
            continue;
        };
        let declared = cfg.launched(&name).map(|d| d.runtime_paths.clone());
        out.push(inspect_in(proc, &name, &s.cgroup).map(|w| Workload {
            runtime_paths: declared.unwrap_or_default(),
            unit: Some(s.unit),
            unit_file: Some(file),
            ..w
        }));
    }
    for d in &cfg.workloads {
        let cg = match (&d.cgroup, &d.unit) {
            (Some(cgroup), _) if cgroup.is_absolute() => cgroup.clone(),
            (Some(cgroup), _) => cgroup_root.join(cgroup),
            (None, Some(unit)) => match units::cgroup_of(cgroup_root, unit) {
                Some(cg) => cg,
                None => {
                    out.push(Err(Error::UnitNotRunning {
                        name: d.name.clone(),
                        unit: unit.clone(),
                        root: cgroup_root.to_path_buf(),
                    }));
                    continue;
                }
            },
            (None, None) => continue,
        };
        let unit_file = d
            .unit
            .as_deref()
            .and_then(|u| units::carried_unit_file(systemd_run, u));
        out.push(inspect_in(proc, &d.name, &cg).map(|w| Workload {
            runtime_paths: d.runtime_paths.clone(),
            unit: d.unit.clone(),
            unit_file,
            ..w
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::fake::{FakeProc, Process};

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

    #[test]
    fn a_member_that_vanished_from_the_cgroup_is_not_a_second_tree() {
        let d = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let gone = vanished_pid();
        fs::write(d.path().join("cgroup.procs"), format!("{me}\n{gone}\n")).unwrap();
        let w = inspect("w", d.path()).unwrap();
        assert_eq!((w.root_pid, w.pids), (me, vec![me]));
    }

    fn cgroup_with(dir: &Path, pids: &str) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("cgroup.procs"), pids).unwrap();
        dir.to_path_buf()
    }

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0F02000A:1B58 0202000A:D2A4 01 00000000:00000000 00:00000000 00000000     0        0 900 1 0\n";

    #[test]
    fn a_tree_is_read_from_its_cgroup_and_proc() {
        let fake = FakeProc::new();
        fake.add(
            Process::new(100, "sh")
                .namespace(Namespace::Pid, "pid:[4026532400]")
                .namespace(Namespace::Ipc, "ipc:[4026532401]"),
        );
        fake.add(
            Process::new(101, "server")
                .parent(100)
                .fd(3, "socket:[900]")
                .namespace(Namespace::Ipc, "ipc:[4026532401]"),
        );
        fake.tcp(TCP);
        let cgroups = tempfile::tempdir().unwrap();
        // 102 exited after the cgroup was read: it is no second tree.
        let cg = cgroup_with(cgroups.path(), "100\n101\n102\n");
        fs::write(cg.join("memory.current"), "8388608\n").unwrap();
        let w = inspect_in(&fake.proc(), "w", &cg).unwrap();
        assert_eq!(
            w,
            Workload {
                name: "w".into(),
                cgroup: cg,
                root_pid: 100,
                pids: vec![100, 101],
                pid_namespace: true,
                ipc_namespace: true,
                tcp_established: true,
                memory_bytes: 8 << 20,
                shell_job: false,
                job_control: false,
                runtime_paths: vec![],
                journal_streams: vec![],
                unit: None,
                notify_access: None,
                watchdog_usec: None,
                unit_file: None,
            }
        );
    }

    #[test]
    fn a_root_whose_session_leader_has_exited_is_a_shell_job() {
        // 100 forked 101 after setsid and exited: 101 is the tree's root,
        // in 100's session and process group.
        let fake = FakeProc::new();
        fake.add(Process::new(101, "daemon").session(100, 100));
        fake.add(Process::new(102, "worker").parent(101).session(100, 100));
        let cgroups = tempfile::tempdir().unwrap();
        let cg = cgroup_with(cgroups.path(), "101\n102\n");
        let w = inspect_in(&fake.proc(), "w", &cg).unwrap();
        assert_eq!(w.root_pid, 101);
        assert!(w.shell_job);
        assert!(w.entry().shell_job);
        // A root leading its own session is not.
        let fake = FakeProc::new();
        fake.add(Process::new(101, "daemon"));
        let w = inspect_in(&fake.proc(), "w", &cg).unwrap();
        assert!(!w.shell_job && !w.entry().shell_job);
    }

    #[test]
    fn a_tree_with_a_controlling_terminal_has_job_control() {
        // A shell leading its session on /dev/pts/0, and its terminal
        // program (the master's holder) without one.
        let fake = FakeProc::new();
        fake.add(Process::new(101, "sh").controlling_pty(0));
        fake.add(Process::new(102, "term").parent(101).pty_master(3, 0));
        let cgroups = tempfile::tempdir().unwrap();
        let cg = cgroup_with(cgroups.path(), "101\n102\n");
        let w = inspect_in(&fake.proc(), "w", &cg).unwrap();
        assert!(w.job_control && w.entry().job_control);
        // No process with a controlling terminal: none.
        let fake = FakeProc::new();
        fake.add(Process::new(101, "sh"));
        fake.add(Process::new(102, "term").parent(101).pty_master(3, 0));
        let w = inspect_in(&fake.proc(), "w", &cg).unwrap();
        assert!(!w.job_control && !w.entry().job_control);
    }

    #[test]
    fn an_ipc_namespace_shared_outside_the_workload_is_not_its_own() {
        let fake = FakeProc::new();
        let ipc = "ipc:[4026532401]";
        fake.add(Process::new(100, "sh").namespace(Namespace::Ipc, ipc));
        fake.add(Process::new(50, "other").namespace(Namespace::Ipc, ipc));
        let cgroups = tempfile::tempdir().unwrap();
        let cg = cgroup_with(cgroups.path(), "100\n");
        let w = inspect_in(&fake.proc(), "w", &cg).unwrap();
        assert!(!w.ipc_namespace && !w.pid_namespace && !w.tcp_established);
    }

    #[test]
    fn discovery_finds_launched_and_declared_workloads_and_skips_emptied_ones() {
        let fake = FakeProc::new();
        fake.add(Process::new(100, "a"));
        fake.add(Process::new(200, "redis-server"));
        let root = tempfile::tempdir().unwrap();
        let launched = root.path().join("kupgrade");
        cgroup_with(&launched.join("a"), "100\n");
        cgroup_with(&launched.join("exited"), "");
        cgroup_with(&root.path().join("system.slice/redis.service"), "200\n");
        fake.add(Process::new(300, "memcached"));
        let memcached = cgroup_with(
            &root.path().join("system.slice/app.slice/memcached.service"),
            "300\n",
        );
        fs::write(memcached.join("cgroup.events"), "populated 1\n").unwrap();
        let cfg = Config {
            workloads: vec![
                config::DeclaredWorkload {
                    name: "redis".into(),
                    cgroup: Some("system.slice/redis.service".into()),
                    runtime_paths: vec!["/run/redis".into()],
                    ..Default::default()
                },
                config::DeclaredWorkload {
                    name: "cache".into(),
                    unit: Some("memcached.service".into()),
                    ..Default::default()
                },
                config::DeclaredWorkload {
                    name: "stopped".into(),
                    unit: Some("nginx.service".into()),
                    ..Default::default()
                },
                config::DeclaredWorkload {
                    name: "missing".into(),
                    cgroup: Some(root.path().join("nowhere")),
                    ..Default::default()
                },
                // Adds to the launched workload `a`; no workload of its own.
                config::DeclaredWorkload {
                    name: "a".into(),
                    cgroup: None,
                    runtime_paths: vec!["/run/a.d".into()],
                    ..Default::default()
                },
            ],
            ..Config::default()
        };
        let no_systemd = root.path().join("run-systemd");
        let found = discover_in(&fake.proc(), root.path(), &launched, &no_systemd, &cfg);
        let seen: Vec<Result<(String, i32), String>> = found
            .iter()
            .map(|r| match r {
                Ok(w) => Ok((w.name.clone(), w.root_pid)),
                Err(e) => Err(e.to_string()),
            })
            .collect();
        assert_eq!(seen.len(), 5, "{seen:?}");
        assert_eq!(seen[0], Ok(("a".into(), 100)));
        assert_eq!(seen[1], Ok(("redis".into(), 200)));
        assert_eq!(seen[2], Ok(("cache".into(), 300)));
        assert_eq!(found[2].as_ref().unwrap().cgroup, memcached);
        assert!(matches!(
            &found[3],
            Err(Error::UnitNotRunning { name, unit, .. }) if name == "stopped" && unit == "nginx.service"
        ));
        assert!(matches!(
            &found[4],
            Err(Error::Cgroup(cgroup::Error::Io { path, .. })) if path.ends_with("nowhere/cgroup.procs")
        ));
        let paths = |i: usize| found[i].as_ref().map(|w| w.runtime_paths.clone()).ok();
        assert_eq!(paths(0), Some(vec![PathBuf::from("/run/a.d")]));
        assert_eq!(paths(1), Some(vec![PathBuf::from("/run/redis")]));
    }

    #[test]
    fn launched_units_are_workloads_and_transient_units_carry_their_files() {
        let fake = FakeProc::new();
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("run-systemd");
        fs::create_dir_all(run.join("transient")).unwrap();
        let service = |unit: &str, pid: i32, file: Option<&str>| {
            fake.add(Process::new(pid, unit));
            let cg = cgroup_with(
                &root.path().join("system.slice").join(unit),
                &format!("{pid}\n"),
            );
            fs::write(cg.join("cgroup.events"), "populated 1\n").unwrap();
            if let Some(f) = file {
                fs::write(run.join("transient").join(unit), f).unwrap();
            }
        };
        let web = "[Unit]\nDescription=kupgrade workload web\n[Service]\nExecStart=/bin/web\n";
        service("kupgrade-web.service", 400, Some(web));
        // Transient, but not kupgrade launch's; and a unit on disk.
        service(
            "kupgrade-other.service",
            500,
            Some("[Unit]\nDescription=mine\n"),
        );
        service("adhoc.service", 600, Some("[Unit]\nDescription=adhoc\n"));
        service("ssh.service", 700, None);
        let cfg = Config {
            workloads: vec![
                config::DeclaredWorkload {
                    name: "adhoc".into(),
                    unit: Some("adhoc.service".into()),
                    ..Default::default()
                },
                config::DeclaredWorkload {
                    name: "ssh".into(),
                    unit: Some("ssh.service".into()),
                    ..Default::default()
                },
                config::DeclaredWorkload {
                    name: "web".into(),
                    runtime_paths: vec!["/run/web".into()],
                    ..Default::default()
                },
            ],
            ..Config::default()
        };
        let launched = root.path().join("kupgrade");
        let found: Vec<Workload> = discover_in(&fake.proc(), root.path(), &launched, &run, &cfg)
            .into_iter()
            .map(|w| w.unwrap())
            .collect();
        let seen: Vec<(&str, i32, Option<&str>, bool)> = found
            .iter()
            .map(|w| {
                (
                    w.name.as_str(),
                    w.root_pid,
                    w.unit.as_deref(),
                    w.unit_file.is_some(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("web", 400, Some("kupgrade-web.service"), true),
                ("adhoc", 600, Some("adhoc.service"), true),
                ("ssh", 700, Some("ssh.service"), false),
            ]
        );
        assert_eq!(found[0].unit_file.as_deref(), Some(web));
        assert_eq!(found[0].runtime_paths, vec![PathBuf::from("/run/web")]);
        assert_eq!(found[0].entry().unit_file.as_deref(), Some(web));
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
