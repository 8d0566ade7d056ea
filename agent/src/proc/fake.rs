//! A small `/proc` tree in a temporary directory, shaped like the kernel's
//! where the probes read it: `PID/stat`, `PID/status`, `PID/comm`,
//! `PID/task/TID/status`, `PID/fd/N`, `PID/exe` and `PID/ns/KIND` as
//! symlinks, `PID/fdinfo/N`, `PID/maps`, `net/tcp`, `net/unix`, and `self`
//! (pid 1, in the host's namespaces, with its `mountinfo`).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::{Namespace, Proc};

/// The link of the host's namespace of `ns`, as `/proc/PID/ns/` shows it.
pub(crate) fn host_namespace(ns: Namespace) -> String {
    let index = Namespace::ALL.iter().position(|n| *n == ns).unwrap_or(0);
    format!("{ns}:[{}]", 4026531835 + index)
}

pub(crate) struct FakeProc {
    dir: tempfile::TempDir,
}

/// A process to add: running, its own session and group leader, in the
/// host's namespaces, with one thread and no open files until told.
#[derive(Clone, Debug)]
pub(crate) struct Process {
    pid: i32,
    comm: String,
    state: char,
    ppid: i32,
    pgrp: i32,
    session: i32,
    tty_nr: u32,
    tpgid: i32,
    exe: Option<String>,
    threads: Vec<(i32, Option<i32>)>,
    fds: Vec<(i32, String)>,
    fdinfo: Vec<(i32, String)>,
    maps: String,
    namespaces: Vec<(Namespace, String)>,
}

impl Process {
    pub fn new(pid: i32, comm: &str) -> Self {
        Process {
            pid,
            comm: comm.into(),
            state: 'S',
            ppid: 1,
            pgrp: pid,
            session: pid,
            tty_nr: 0,
            tpgid: -1,
            exe: None,
            threads: vec![(pid, None)],
            fds: Vec::new(),
            fdinfo: Vec::new(),
            maps: String::new(),
            namespaces: Namespace::ALL
                .iter()
                .map(|ns| (*ns, host_namespace(*ns)))
                .collect(),
        }
    }

    pub fn parent(mut self, ppid: i32) -> Self {
        self.ppid = ppid;
        self
    }

    pub fn session(mut self, pgrp: i32, session: i32) -> Self {
        self.pgrp = pgrp;
        self.session = session;
        self
    }

    /// A further thread, traced by `tracer` if given.
    pub fn thread(mut self, tid: i32, tracer: Option<i32>) -> Self {
        self.threads.push((tid, tracer));
        self
    }

    /// Traces the main thread.
    pub fn traced_by(mut self, tracer: i32) -> Self {
        self.threads[0].1 = Some(tracer);
        self
    }

    pub fn fd(mut self, fd: i32, target: &str) -> Self {
        self.fds.push((fd, target.into()));
        self
    }

    /// The master of pseudo-terminal `index`, open as `fd`.
    pub fn pty_master(mut self, fd: i32, index: u32) -> Self {
        self.fds.push((fd, "/dev/ptmx".into()));
        self.fdinfo.push((
            fd,
            format!("pos:\t0\nflags:\t02\nmnt_id:\t25\nino:\t2\ntty-index:\t{index}\n"),
        ));
        self
    }

    /// Its controlling terminal is `/dev/pts/index`, its session's leader
    /// in the foreground (call `session` first).
    pub fn controlling_pty(mut self, index: u32) -> Self {
        // Major 136 + index / 256, minor index % 256, as the kernel packs it.
        let (major, minor) = (136 + index / 256, index % 256);
        self.tty_nr = (major << 8) | (minor & 0xff) | ((minor & !0xff) << 12);
        self.tpgid = self.session;
        self
    }

    /// The process group in the foreground of its terminal.
    pub fn foreground(mut self, pgrp: i32) -> Self {
        self.tpgid = pgrp;
        self
    }

    pub fn exe(mut self, path: &str) -> Self {
        self.exe = Some(path.into());
        self
    }

    pub fn maps(mut self, text: &str) -> Self {
        self.maps = text.into();
        self
    }

    pub fn namespace(mut self, ns: Namespace, link: &str) -> Self {
        for (n, l) in &mut self.namespaces {
            if *n == ns {
                *l = link.into();
            }
        }
        self
    }

    /// Exited, not yet reaped: the kernel has dropped its files and
    /// namespaces, its stat, status and threads remain.
    pub fn zombie(mut self) -> Self {
        self.state = 'Z';
        self.fds.clear();
        self.namespaces.clear();
        self
    }
}

impl FakeProc {
    pub fn new() -> Self {
        let fake = FakeProc {
            dir: tempfile::tempdir().expect("a temporary directory"),
        };
        fake.add(Process::new(1, "init").parent(0));
        symlink("1", fake.dir.path().join("self")).expect("self link");
        fake
    }

    pub fn proc(&self) -> Proc {
        Proc::at(self.dir.path())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds `p`, in place of a process of the same pid (such as pid 1).
    pub fn add(&self, p: Process) {
        let dir = self.dir.path().join(p.pid.to_string());
        let _ = fs::remove_dir_all(&dir);
        let write = |rel: &str, text: &str| {
            let path = dir.join(rel);
            fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            fs::write(path, text).expect("write");
        };
        let status = |tracer: Option<i32>| {
            format!(
                "Name:\t{}\nState:\t{}\nTgid:\t{}\nPid:\t{}\nPPid:\t{}\nTracerPid:\t{}\n",
                p.comm,
                p.state,
                p.pid,
                p.pid,
                p.ppid,
                tracer.unwrap_or(0)
            )
        };
        write(
            "stat",
            &format!(
                "{} ({}) {} {} {} {} {} {} 4194560 0 0 0 0 0 0 0 0 20 0 1 0 100 1000 10\n",
                p.pid, p.comm, p.state, p.ppid, p.pgrp, p.session, p.tty_nr as i32, p.tpgid
            ),
        );
        write("status", &status(p.threads[0].1));
        write("comm", &format!("{}\n", p.comm));
        write("maps", &p.maps);
        for (tid, tracer) in &p.threads {
            write(&format!("task/{tid}/status"), &status(*tracer));
        }
        fs::create_dir_all(dir.join("fd")).expect("mkdir fd");
        for (fd, target) in &p.fds {
            symlink(target, dir.join("fd").join(fd.to_string())).expect("fd link");
        }
        for (fd, text) in &p.fdinfo {
            write(&format!("fdinfo/{fd}"), text);
        }
        if let Some(exe) = &p.exe {
            symlink(exe, dir.join("exe")).expect("exe link");
        }
        fs::create_dir_all(dir.join("ns")).expect("mkdir ns");
        for (ns, link) in &p.namespaces {
            symlink(link, dir.join("ns").join(ns.name())).expect("ns link");
        }
    }

    /// The process exits and is reaped: its entry goes.
    pub fn remove(&self, pid: i32) {
        fs::remove_dir_all(self.dir.path().join(pid.to_string())).expect("remove");
    }

    pub fn tcp(&self, table: &str) {
        fs::create_dir_all(self.dir.path().join("net")).expect("mkdir net");
        fs::write(self.dir.path().join("net/tcp"), table).expect("write tcp");
    }

    /// `net/unix`: one line per (inode, bound path).
    pub fn unix(&self, sockets: &[(u64, &str)]) {
        let mut table = String::from("Num       RefCount Protocol Flags    Type St Inode Path\n");
        for (inode, path) in sockets {
            table.push_str(&format!(
                "0000000000000000: 00000002 00000000 00010000 0001 01 {inode} {path}\n"
            ));
        }
        fs::create_dir_all(self.dir.path().join("net")).expect("mkdir net");
        fs::write(self.dir.path().join("net/unix"), table).expect("write unix");
    }

    /// What `self/mountinfo` says.
    pub fn mountinfo(&self, text: &str) {
        fs::write(self.dir.path().join("1/mountinfo"), text).expect("write mountinfo");
    }
}
