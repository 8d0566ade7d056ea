//! What would stop CRIU from checkpointing a workload, found before anything
//! is frozen: the kinds of refusal, the checks that find them, and the
//! sentence the user reads for each.
//!
//! The checks read a [`Host`]: a `/proc` tree (with its mount table), the
//! kernel's table of unix socket peers and the file types of paths.
//! [`LiveHost`] is the running system; the tests give a fake `/proc` and
//! fake tables.
//!
//! What the restore on the new kernel would find missing is refused here
//! too, before anything is frozen: a terminal whose other end stays behind,
//! a file or a socket's directory on an in-memory file system that kupgrade
//! does not carry (only tmpfs runtime state is carried, see
//! [`crate::runstate`]), a named FIFO on a tmpfs.
//!
//! A process that exits while the checks look at it is no finding: nothing
//! of it is left to checkpoint. Adding a refusal: a [`Kind`], its sentence
//! in `Kind::resource` and [`Kind::why`], a check in [`check`], a test.

use std::collections::{HashMap, HashSet};
use std::fmt;

use contract::journal::{self, JournalStream};

use crate::proc::{pts_index, socket_inode, Namespace, Proc, Stat};
use crate::runstate::{self, Mount};
use crate::unix_diag;
use crate::workload::Workload;

/// What the checks read of the machine.
pub trait Host {
    fn proc(&self) -> &Proc;
    /// Every connected unix socket: inode -> its peer's inode.
    fn unix_peers(&self) -> Result<HashMap<u64, u64>, unix_diag::Error>;
    /// Whether `path` is a character or block device.
    fn is_device(&self, path: &str) -> bool;
    /// What `path` is, without following a last symlink; `None` if nothing.
    fn file_kind(&self, path: &str) -> Option<FileKind>;
    /// The record of a journal stream whose journald (or relay) end is the
    /// socket `peer`, if it is one; for the workload's socket `inode`.
    fn journal_stream(&self, _peer: u64, _inode: u64) -> Option<JournalStream> {
        None
    }
}

/// The type of a file, as far as the checks care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Fifo,
    Other,
}

/// The running system: `/proc`, sock_diag, and `stat` of the path.
#[derive(Debug)]
pub struct LiveHost {
    proc: Proc,
}

impl LiveHost {
    pub fn new() -> Self {
        LiveHost { proc: Proc::host() }
    }
}

impl Default for LiveHost {
    fn default() -> Self {
        LiveHost::new()
    }
}

impl Host for LiveHost {
    fn proc(&self) -> &Proc {
        &self.proc
    }

    fn unix_peers(&self) -> Result<HashMap<u64, u64>, unix_diag::Error> {
        unix_diag::peers()
    }

    fn is_device(&self, path: &str) -> bool {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(path)
            .is_ok_and(|m| m.file_type().is_char_device() || m.file_type().is_block_device())
    }

    fn journal_stream(&self, peer: u64, inode: u64) -> Option<JournalStream> {
        // journald names its records DEVICE:INODE of its end; a relay, INODE.
        let suffix = format!(":{peer}");
        let journald = std::fs::read_dir(journal::JOURNALD_STREAMS_DIR)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(&suffix))
            .map(|e| e.path());
        let record = journald
            .unwrap_or_else(|| std::path::Path::new(journal::RELAY_DIR).join(peer.to_string()));
        JournalStream::from_record(inode, &std::fs::read_to_string(record).ok()?)
    }

    fn file_kind(&self, path: &str) -> Option<FileKind> {
        use std::os::unix::fs::FileTypeExt;
        let t = std::fs::symlink_metadata(path).ok()?.file_type();
        Some(if t.is_file() {
            FileKind::File
        } else if t.is_dir() {
            FileKind::Dir
        } else if t.is_fifo() {
            FileKind::Fifo
        } else {
            FileKind::Other
        })
    }
}

/// A group of processes with a leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Session,
    ProcessGroup,
}

impl Group {
    fn name(self) -> &'static str {
        match self {
            Group::Session => "session",
            Group::ProcessGroup => "process group",
        }
    }
}

/// Why a process of a workload cannot be checkpointed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A unix socket whose peer is outside the workload, held by that
    /// process if one was found.
    UnixPeerOutside {
        fd: i32,
        holder: Option<i32>,
    },
    /// Its session or process group is led by a running process outside.
    LeaderOutside {
        group: Group,
        leader: i32,
    },
    /// One of its threads is ptraced.
    Traced {
        tid: i32,
        tracer: i32,
    },
    IoUring {
        fd: i32,
    },
    /// An open device that holds state (not /dev/null and the like).
    Device {
        fd: i32,
        path: String,
    },
    /// A pseudo-terminal (`path`, or `/dev/tty` for the controlling one)
    /// whose master, `/dev/pts/N`'s other end, no member holds; held by
    /// `holder` if one was found. `pty` is `None` for a controlling
    /// terminal that is no pseudo-terminal, or none at all.
    TerminalOutside {
        fd: i32,
        path: String,
        pty: Option<u32>,
        holder: Option<i32>,
    },
    /// `/dev/tty` while a job other than the session leader's group holds
    /// the foreground of its terminal (CRIU 3.17 then finds no terminal
    /// to give the session).
    CttyForegroundJob {
        fd: i32,
        pty: u32,
        foreground: i32,
    },
    /// `/dev/tty` of a process that is not the first of the tree, in
    /// CRIU's order, to hold its terminal: `first` is.
    CttyNotFirst {
        fd: i32,
        pty: u32,
        first: i32,
    },
    /// `/dev/tty` open more than once in one process.
    CttyTwice {
        fds: Vec<i32>,
    },
    /// A file open (`fd`) or mapped (no fd) on an in-memory file system
    /// other than tmpfs, which the new boot will not have.
    NotCarried {
        fd: Option<i32>,
        path: String,
        fstype: String,
    },
    /// A named FIFO on a tmpfs, which CRIU reopens by its path.
    NamedFifo {
        fd: i32,
        path: String,
    },
    /// A unix socket bound in a directory of an in-memory file system
    /// other than tmpfs: the new boot will not have it to bind again.
    SocketDirNotCarried {
        fd: i32,
        path: String,
    },
    /// SysV shared memory attached while in the host's IPC namespace.
    SysvShmInHostIpc {
        keys: Vec<String>,
    },
    /// A socket that PID 1 holds too: systemd passed it (socket activation).
    SocketOfInit {
        fd: i32,
    },
    /// A namespace other than the host's (`link` as in `/proc/PID/ns/`).
    ForeignNamespace {
        namespace: Namespace,
        link: String,
    },
}

impl Kind {
    /// What is refused, naming the other processes involved as `proc`
    /// knows them now.
    fn resource(&self, proc: &Proc) -> String {
        match self {
            Kind::UnixPeerOutside { fd, holder } => {
                let who = holder
                    .map(|p| format!("pid {p} ({})", proc.comm(p)))
                    .unwrap_or_else(|| "a process outside it".into());
                format!("fd {fd} is a unix socket connected to {who}")
            }
            Kind::LeaderOutside { group, leader } => format!(
                "its {} is led by pid {leader} ({}) outside the workload",
                group.name(),
                proc.comm(*leader)
            ),
            Kind::Traced { tid, tracer } => {
                format!(
                    "thread {tid} traced by pid {tracer} ({})",
                    proc.comm(*tracer)
                )
            }
            Kind::IoUring { fd } => format!("fd {fd} is an io_uring"),
            Kind::Device { fd, path } => format!("fd {fd} is the device {path}"),
            Kind::TerminalOutside {
                fd,
                path,
                pty,
                holder,
            } => {
                let Some(n) = pty else {
                    return format!(
                        "fd {fd} is {path}, and its controlling terminal is not a pseudo-terminal of the workload"
                    );
                };
                let what = if path == "/dev/tty" {
                    format!("{path}, its controlling terminal /dev/pts/{n}")
                } else {
                    format!("the terminal {path}")
                };
                let other = holder
                    .map(|p| format!("held by pid {p} ({}) outside the workload", proc.comm(p)))
                    .unwrap_or_else(|| "outside the workload".into());
                format!("fd {fd} is {what}, whose other end is {other}")
            }
            Kind::CttyForegroundJob {
                fd,
                pty,
                foreground,
            } => format!(
                "fd {fd} is /dev/tty, and process group {foreground} holds the foreground of its terminal /dev/pts/{pty}"
            ),
            Kind::CttyNotFirst { fd, pty, first } => format!(
                "fd {fd} is /dev/tty, but pid {first} ({}) holds its terminal /dev/pts/{pty} before it in the tree",
                proc.comm(*first)
            ),
            Kind::CttyTwice { fds } => format!(
                "fds {} are all /dev/tty",
                fds.iter().map(i32::to_string).collect::<Vec<_>>().join(", ")
            ),
            Kind::NotCarried {
                fd: Some(fd),
                path,
                fstype,
            } => format!("fd {fd} is {path}, on {fstype}"),
            Kind::NotCarried {
                fd: None,
                path,
                fstype,
            } => format!("it maps {path}, on {fstype}"),
            Kind::NamedFifo { fd, path } => format!("fd {fd} is the named FIFO {path}, on a tmpfs"),
            Kind::SocketDirNotCarried { fd, path } => {
                format!("fd {fd} is a unix socket bound at {path}, in a directory of an in-memory file system")
            }
            Kind::SysvShmInHostIpc { keys } => format!(
                "SysV shared memory (key {}) attached in the host's IPC namespace",
                keys.join(", ")
            ),
            Kind::SocketOfInit { fd } => format!(
                "fd {fd} is a socket that pid 1 ({}) holds too, passed to it by socket activation",
                proc.comm(1)
            ),
            Kind::ForeignNamespace { namespace, link } => format!("{namespace} namespace {link}"),
        }
    }

    /// Why CRIU cannot carry it, and what to do.
    pub fn why(&self) -> &'static str {
        match self {
            Kind::UnixPeerOutside { .. } => "CRIU can only checkpoint both ends of a unix connection together: put the peer in the same workload",
            Kind::LeaderOutside { .. } => "CRIU needs the leader in the checkpoint: start the workload with setsid, or with `kupgrade launch`",
            Kind::Traced { .. } => "CRIU must ptrace every task itself; detach the debugger or strace first",
            Kind::IoUring { .. } => "CRIU cannot checkpoint io_uring instances",
            Kind::Device { .. } => "device state cannot be carried across a kernel; close it or run the workload without it",
            Kind::TerminalOutside { .. } => "CRIU carries a pseudo-terminal only with both its ends: run the program under a terminal of its own inside the workload (script, screen, tmux), or without one (`kupgrade launch`)",
            Kind::CttyForegroundJob { .. } => "CRIU 3.17 restores /dev/tty only while the session's leader is in the foreground of its terminal: upgrade while the shell waits at its prompt",
            Kind::CttyNotFirst { .. } => "CRIU 3.17 restores /dev/tty only in the first process of the tree to hold its terminal (the root first, then each child in turn): let the shell be the root with its terminal program below it, or close /dev/tty",
            Kind::CttyTwice { .. } => "CRIU 3.17's restore waits for ever on a process with /dev/tty open more than once (each of the files waits for the other, after the kexec): keep one open (kupgrade cannot tell copies of one file made by dup from two opens, and refuses both)",
            Kind::NotCarried { .. } => "the new boot will not have it (kupgrade carries the files of tmpfs mounts only) and CRIU reopens it by its path: keep it on a tmpfs or on disk",
            Kind::NamedFifo { .. } => "CRIU reopens a named FIFO by its path, and kupgrade carries only the regular files and directories of a tmpfs: keep the FIFO on disk, or use a pipe",
            Kind::SocketDirNotCarried { .. } => "CRIU binds the socket at its path again, and the new boot will not have that directory (kupgrade carries tmpfs mounts only): bind it on a tmpfs such as /run, or on disk",
            Kind::SysvShmInHostIpc { .. } => "CRIU carries SysV IPC only in a workload's own IPC namespace: start it with `kupgrade launch --ipc-namespace`",
            Kind::SocketOfInit { .. } => "the new systemd makes its sockets again at boot, while the restored service would hold the old one's address: run the service without its .socket unit (sockets a service opens itself are carried)",
            Kind::ForeignNamespace { namespace: Namespace::Ipc, .. } => "CRIU carries an IPC namespace only with everything in it: give the workload its own with `kupgrade launch --ipc-namespace`",
            Kind::ForeignNamespace { .. } => "kupgrade restores workloads into the host's namespaces and does not manage this one",
        }
    }
}

/// Something CRIU cannot checkpoint, found in a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub workload: String,
    pub pid: i32,
    /// The process's command name when the refusal was found.
    pub comm: String,
    pub kind: Kind,
    pub resource: String,
    pub why: String,
}

impl Refusal {
    fn new(proc: &Proc, workload: &str, pid: i32, kind: Kind) -> Self {
        Refusal {
            workload: workload.into(),
            pid,
            comm: proc.comm(pid),
            resource: kind.resource(proc),
            why: kind.why().into(),
            kind,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "workload {} (pid {} {}): {}: {}",
            self.workload, self.pid, self.comm, self.resource, self.why
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

/// The namespaces a workload must share with the host (its own PID
/// namespace is carried by CRIU, its own IPC namespace when declared).
const HOST_NAMESPACES: [Namespace; 6] = [
    Namespace::Net,
    Namespace::Mnt,
    Namespace::Ipc,
    Namespace::Uts,
    Namespace::User,
    Namespace::Cgroup,
];

/// What would make CRIU refuse the workload, on the running system.
pub fn refusals(w: &Workload) -> Vec<Refusal> {
    check(&LiveHost::new(), w)
}

/// What would make CRIU refuse the workload, as `host` shows it.
pub fn check(host: &impl Host, w: &Workload) -> Vec<Refusal> {
    let proc = host.proc();
    let members: HashSet<i32> = w.pids.iter().copied().collect();
    let host_namespaces: Vec<(Namespace, Option<String>)> = HOST_NAMESPACES
        .into_iter()
        .filter(|ns| !(*ns == Namespace::Ipc && w.ipc_namespace))
        .map(|ns| (ns, proc.own_namespace(ns)))
        .collect();
    let mounts = runstate::mounts(&proc.mountinfo());
    let masters = pty_masters(proc, &w.pids);
    let first_holders = first_pty_holders(proc, w);
    let bound: HashMap<u64, String> = proc
        .unix_socket_paths()
        .into_iter()
        .filter_map(|(ino, p)| Some((ino, p?.to_string_lossy().into_owned())))
        .collect();
    let mut found = unix_peers_outside(host, &w.pids);
    let init_sockets: HashSet<u64> = if members.contains(&1) {
        HashSet::new()
    } else {
        proc.fds(1)
            .into_iter()
            .filter_map(|(_, link)| socket_inode(&link))
            .collect()
    };
    for &pid in &w.pids {
        // Gone since discovery: nothing of it is left to refuse.
        let Some(stat) = proc.stat(pid) else {
            continue;
        };
        let mut add = |kind| found.push((pid, kind));
        leaders_outside(proc, &stat, &members).for_each(&mut add);
        if let Some(masters) = &masters {
            terminals_outside(proc, pid, &stat, masters)
                .into_iter()
                .for_each(&mut add);
            ctty_criu_refuses(proc, pid, &stat, masters, &first_holders)
                .into_iter()
                .for_each(&mut add);
        }
        files_not_carried(host, pid, &mounts)
            .into_iter()
            .for_each(&mut add);
        socket_dirs_not_carried(proc, pid, &bound, &mounts)
            .into_iter()
            .for_each(&mut add);
        // A zombie has no files, maps or namespaces left (those reads come
        // back empty), and CRIU does not seize it: a tracer does not matter.
        if !stat.has_exited() {
            for tid in proc.threads(pid) {
                if let Some(tracer) = proc.tracer(pid, tid) {
                    add(Kind::Traced { tid, tracer });
                }
            }
        }
        for (fd, link) in proc.fds(pid) {
            if socket_inode(&link).is_some_and(|i| init_sockets.contains(&i)) {
                add(Kind::SocketOfInit { fd });
            } else if link == "anon_inode:[io_uring]" {
                add(Kind::IoUring { fd });
            } else if holds_state(&link) && host.is_device(&link) {
                add(Kind::Device { fd, path: link });
            }
        }
        if !w.ipc_namespace {
            let keys = sysv_keys(&proc.mapped_files(pid));
            if !keys.is_empty() {
                add(Kind::SysvShmInHostIpc { keys });
            }
        }
        for (namespace, host_link) in &host_namespaces {
            // Unreadable: the process has exited while we looked.
            let Some(link) = proc.namespace(pid, *namespace) else {
                continue;
            };
            if Some(&link) != host_link.as_ref() {
                add(Kind::ForeignNamespace {
                    namespace: *namespace,
                    link,
                });
            }
        }
    }
    found
        .into_iter()
        .map(|(pid, kind)| Refusal::new(proc, &w.name, pid, kind))
        .collect()
}

/// Unix sockets of `pids` connected to a socket none of them holds, and
/// not to journald: `(pid, fd, own inode, peer inode)`.
fn connected_outside(host: &impl Host, pids: &[i32]) -> Vec<(i32, i32, u64, u64)> {
    let proc = host.proc();
    // Our own sockets before the peer table: a member that exits in between
    // has closed its end, and the table no longer names it as a peer.
    let sockets: Vec<(i32, i32, u64)> = pids
        .iter()
        .flat_map(|&pid| {
            proc.fds(pid)
                .into_iter()
                .filter_map(move |(fd, link)| Some((pid, fd, socket_inode(&link)?)))
        })
        .collect();
    let own: HashSet<u64> = sockets.iter().map(|s| s.2).collect();
    // Without sock_diag CRIU itself will say so, at the dump.
    let peers = host.unix_peers().unwrap_or_default();
    sockets
        .iter()
        .filter_map(|&(pid, fd, ino)| {
            let peer = *peers.get(&ino)?;
            (!own.contains(&peer)).then_some((pid, fd, ino, peer))
        })
        .collect()
}

/// The workload's connections to journald (or to a relay of an earlier
/// upgrade), one per socket however many fds and processes hold it.
pub fn journal_streams(host: &impl Host, w: &Workload) -> Vec<JournalStream> {
    let mut seen = HashSet::new();
    connected_outside(host, &w.pids)
        .into_iter()
        .filter(|&(_, _, ino, _)| seen.insert(ino))
        .filter_map(|(_, _, ino, peer)| host.journal_stream(peer, ino))
        .collect()
}

/// Unix sockets of `pids` connected to a socket none of them holds, other
/// than journal streams (carried by a relay).
fn unix_peers_outside(host: &impl Host, pids: &[i32]) -> Vec<(i32, Kind)> {
    let outside: Vec<(i32, i32, u64)> = connected_outside(host, pids)
        .into_iter()
        .filter(|&(_, _, ino, peer)| host.journal_stream(peer, ino).is_none())
        .map(|(pid, fd, _, peer)| (pid, fd, peer))
        .collect();
    if outside.is_empty() {
        return Vec::new();
    }
    let holders = socket_holders(host.proc(), outside.iter().map(|o| o.2).collect());
    outside
        .into_iter()
        .map(|(pid, fd, peer)| {
            let holder = holders.get(&peer).copied();
            (pid, Kind::UnixPeerOutside { fd, holder })
        })
        .collect()
}

/// Which process holds each of `inodes` (the first found).
fn socket_holders(proc: &Proc, inodes: HashSet<u64>) -> HashMap<u64, i32> {
    let mut out = HashMap::new();
    for pid in proc.all_pids() {
        for (_, link) in proc.fds(pid) {
            if let Some(ino) = socket_inode(&link).filter(|i| inodes.contains(i)) {
                out.entry(ino).or_insert(pid);
            }
        }
    }
    out
}

/// Leaders of a process's session and process group that CRIU cannot do
/// without: running ones outside the workload. One that has exited is no
/// matter: below the root, CRIU restores its ids with a helper task; the
/// root itself is dumped and restored as a shell job
/// ([`Workload::shell_job`]).
fn leaders_outside<'a>(
    proc: &'a Proc,
    stat: &Stat,
    members: &'a HashSet<i32>,
) -> impl Iterator<Item = Kind> + 'a {
    [
        (Group::Session, stat.session),
        (Group::ProcessGroup, stat.pgrp),
    ]
    .into_iter()
    .filter(|(_, leader)| !members.contains(leader))
    .filter(|(_, leader)| proc.is_running(*leader))
    .map(|(group, leader)| Kind::LeaderOutside { group, leader })
}

/// The pseudo-terminal multiplexers: opened, each gives a new master.
const PTY_MASTERS: &[&str] = &["/dev/ptmx", "/dev/pts/ptmx"];

/// A `/dev` path that may be a device with state of its own. Terminals
/// have checks of their own.
fn holds_state(link: &str) -> bool {
    link.starts_with("/dev/")
        && !HARMLESS_DEVICES.contains(&link)
        && !link.starts_with("/dev/shm/")
        && !link.starts_with("/dev/pts/")
        && !PTY_MASTERS.contains(&link)
        && link != "/dev/tty"
}

/// File systems in memory that the new boot starts empty (or with its own
/// device nodes) and that kupgrade does not carry, unlike tmpfs.
const VOLATILE_FS: &[&str] = &["ramfs", "devtmpfs"];

/// The mount of `path` if it is such a file system.
fn volatile<'a>(path: &str, mounts: &'a [Mount]) -> Option<&'a Mount> {
    runstate::mount_of(path, mounts).filter(|m| VOLATILE_FS.contains(&m.fstype.as_str()))
}

/// The pseudo-terminals whose masters the members hold; `None` when a
/// master's index cannot be read (then CRIU judges).
fn pty_masters(proc: &Proc, pids: &[i32]) -> Option<HashSet<u32>> {
    let mut out = HashSet::new();
    for &pid in pids {
        for (fd, link) in proc.fds(pid) {
            if PTY_MASTERS.contains(&link.as_str()) {
                out.insert(proc.pty_index(pid, fd)?);
            }
        }
    }
    Some(out)
}

/// A process holding the master of pseudo-terminal `index`.
fn pty_master_holder(proc: &Proc, index: u32) -> Option<i32> {
    proc.all_pids().into_iter().find(|&pid| {
        proc.fds(pid).into_iter().any(|(fd, link)| {
            PTY_MASTERS.contains(&link.as_str()) && proc.pty_index(pid, fd) == Some(index)
        })
    })
}

/// Terminals of `pid` whose other end is outside the workload.
fn terminals_outside(proc: &Proc, pid: i32, stat: &Stat, masters: &HashSet<u32>) -> Vec<Kind> {
    let outside = |fd: i32, path: &str, pty: Option<u32>| {
        let holder = pty.and_then(|n| pty_master_holder(proc, n));
        Kind::TerminalOutside {
            fd,
            path: path.into(),
            pty,
            holder,
        }
    };
    proc.fds(pid)
        .into_iter()
        .filter_map(|(fd, link)| {
            let pty = if link == "/dev/tty" {
                pts_index(stat.tty_nr)
            } else {
                link.strip_prefix("/dev/pts/")?.parse().ok()
            };
            if pty.is_some_and(|n| masters.contains(&n)) {
                return None;
            }
            Some(outside(fd, &link, pty))
        })
        .collect()
}

/// The members in the order CRIU dumps them: the root, then the subtree
/// of each of its children in turn, children by pid.
fn dump_order(proc: &Proc, w: &Workload) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for &pid in &w.pids {
        if let Some(stat) = proc.stat(pid) {
            children.entry(stat.ppid).or_default().push(pid);
        }
    }
    for c in children.values_mut() {
        c.sort_unstable();
    }
    let mut out = Vec::new();
    let mut stack = vec![w.root_pid];
    while let Some(pid) = stack.pop() {
        out.push(pid);
        if let Some(c) = children.get(&pid) {
            stack.extend(c.iter().rev());
        }
    }
    out
}

/// For each pseudo-terminal, the first member in dump order that holds it
/// in a way that tells CRIU its session: its master, or the slave as its
/// own controlling terminal.
fn first_pty_holders(proc: &Proc, w: &Workload) -> HashMap<u32, i32> {
    let mut first = HashMap::new();
    for pid in dump_order(proc, w) {
        let ctty = proc.stat(pid).and_then(|s| pts_index(s.tty_nr));
        for (fd, link) in proc.fds(pid) {
            let pty = if PTY_MASTERS.contains(&link.as_str()) {
                proc.pty_index(pid, fd)
            } else {
                link.strip_prefix("/dev/pts/")
                    .and_then(|n| n.parse().ok())
                    .filter(|n| Some(*n) == ctty)
            };
            if let Some(n) = pty {
                first.entry(n).or_insert(pid);
            }
        }
    }
    first
}

/// `/dev/tty` of `pid` on a pseudo-terminal of the workload that CRIU 3.17
/// cannot restore: its dump wants the session's leader in the foreground,
/// and the process holding `/dev/tty` to be the first to hold its terminal
/// ("ctty inheritance detected"); its restore deadlocks on two `/dev/tty`
/// files in one process (each waits for every other tty file first).
fn ctty_criu_refuses(
    proc: &Proc,
    pid: i32,
    stat: &Stat,
    masters: &HashSet<u32>,
    first: &HashMap<u32, i32>,
) -> Vec<Kind> {
    let Some(pty) = pts_index(stat.tty_nr).filter(|n| masters.contains(n)) else {
        return Vec::new();
    };
    let ctty_fds: Vec<i32> = proc
        .fds(pid)
        .into_iter()
        .filter(|(_, link)| link == "/dev/tty")
        .map(|(fd, _)| fd)
        .collect();
    let twice = (ctty_fds.len() > 1).then(|| Kind::CttyTwice {
        fds: ctty_fds.clone(),
    });
    let each = ctty_fds.into_iter().filter_map(|fd| {
        if stat.tpgid != stat.session {
            return Some(Kind::CttyForegroundJob {
                fd,
                pty,
                foreground: stat.tpgid,
            });
        }
        let by = *first.get(&pty)?;
        (by != pid).then_some(Kind::CttyNotFirst { fd, pty, first: by })
    });
    twice.into_iter().chain(each).collect()
}

/// Files of `pid`, open or mapped, that the new boot will not have: on an
/// in-memory file system kupgrade does not carry, or a named FIFO on a
/// tmpfs.
fn files_not_carried(host: &impl Host, pid: i32, mounts: &[Mount]) -> Vec<Kind> {
    let proc = host.proc();
    let held = proc.fds(pid).into_iter().map(|(fd, p)| (Some(fd), p));
    let mapped = proc.mapped_files(pid).into_iter().map(|p| (None, p));
    held.chain(mapped)
        .filter(|(_, p)| p.starts_with('/') && !p.ends_with(" (deleted)"))
        .filter_map(|(fd, path)| {
            let kind = host.file_kind(&path)?;
            let on = runstate::mount_of(&path, mounts)?;
            // Its mount point, at least, is there in the new boot.
            let in_memory = VOLATILE_FS.contains(&on.fstype.as_str()) && on.path != path;
            match (kind, fd) {
                (FileKind::Fifo, Some(fd)) if on.is_tmpfs() => Some(Kind::NamedFifo { fd, path }),
                (FileKind::File | FileKind::Dir | FileKind::Fifo, fd) if in_memory => {
                    Some(Kind::NotCarried {
                        fd,
                        fstype: on.fstype.clone(),
                        path,
                    })
                }
                _ => None,
            }
        })
        .collect()
}

/// Unix sockets of `pid` bound in a directory that an in-memory file
/// system other than tmpfs holds (its mount point itself will be there).
fn socket_dirs_not_carried(
    proc: &Proc,
    pid: i32,
    bound: &HashMap<u64, String>,
    mounts: &[Mount],
) -> Vec<Kind> {
    proc.fds(pid)
        .into_iter()
        .filter_map(|(fd, link)| {
            let path = bound.get(&socket_inode(&link)?)?;
            let dir = std::path::Path::new(path).parent()?.to_string_lossy();
            let m = volatile(&dir, mounts)?;
            (m.path.trim_end_matches('/') != dir.trim_end_matches('/')).then(|| {
                Kind::SocketDirNotCarried {
                    fd,
                    path: path.clone(),
                }
            })
        })
        .collect()
}

/// Keys of attached SysV segments: the kernel names one
/// `/SYSV<key in hex> (deleted)` in the maps.
fn sysv_keys(mapped: &[String]) -> Vec<String> {
    mapped
        .iter()
        .filter_map(|p| p.strip_prefix("/SYSV"))
        .map(|k| format!("0x{}", k.split(' ').next().unwrap_or(k)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::fake::{host_namespace, FakeProc, Process};
    use std::cell::Cell;
    use std::path::Path;

    /// A fake /proc with the sock_diag table, the devices and the file
    /// types a test gives; `exits_at_peer_lookup` is reaped when the checks
    /// ask for the table.
    struct FakeHost {
        fake: FakeProc,
        proc: Proc,
        peers: HashMap<u64, u64>,
        devices: Vec<&'static str>,
        files: HashMap<&'static str, FileKind>,
        exits_at_peer_lookup: Cell<Option<i32>>,
        /// Peer inode -> the record of the journal stream it serves.
        journal: HashMap<u64, &'static str>,
    }

    impl FakeHost {
        fn new() -> Self {
            let fake = FakeProc::new();
            FakeHost {
                proc: fake.proc(),
                fake,
                peers: HashMap::new(),
                devices: vec![
                    "/dev/kmsg",
                    "/dev/sda",
                    "/dev/null",
                    "/dev/pts/3",
                    "/dev/ptmx",
                    "/dev/tty",
                ],
                files: HashMap::new(),
                exits_at_peer_lookup: Cell::new(None),
                journal: HashMap::new(),
            }
        }

        fn file(mut self, path: &'static str, kind: FileKind) -> Self {
            self.files.insert(path, kind);
            self
        }

        fn with(self, p: Process) -> Self {
            self.fake.add(p);
            self
        }

        /// Connects two sockets (sock_diag lists both directions).
        fn pair(mut self, a: u64, b: u64) -> Self {
            self.peers.insert(a, b);
            self.peers.insert(b, a);
            self
        }
    }

    impl Host for FakeHost {
        fn proc(&self) -> &Proc {
            &self.proc
        }
        fn unix_peers(&self) -> Result<HashMap<u64, u64>, unix_diag::Error> {
            if let Some(pid) = self.exits_at_peer_lookup.take() {
                self.fake.remove(pid);
            }
            Ok(self.peers.clone())
        }
        fn is_device(&self, path: &str) -> bool {
            self.devices.contains(&path)
        }
        fn file_kind(&self, path: &str) -> Option<FileKind> {
            self.files.get(path).copied()
        }
        fn journal_stream(&self, peer: u64, inode: u64) -> Option<JournalStream> {
            JournalStream::from_record(inode, self.journal.get(&peer)?)
        }
    }

    /// Workload "w": root 100 and children 101, 102 in one session.
    fn workload(pids: &[i32]) -> Workload {
        Workload {
            name: "w".into(),
            cgroup: "/sys/fs/cgroup/kupgrade/w".into(),
            root_pid: pids[0],
            pids: pids.to_vec(),
            pid_namespace: false,
            ipc_namespace: false,
            tcp_established: false,
            memory_bytes: 0,
            ..Workload::default()
        }
    }

    fn root() -> Process {
        Process::new(100, "server")
    }

    fn child(pid: i32) -> Process {
        Process::new(pid, "worker").parent(100).session(100, 100)
    }

    fn kinds(r: &[Refusal]) -> Vec<(i32, Kind)> {
        r.iter().map(|r| (r.pid, r.kind.clone())).collect()
    }

    #[test]
    fn a_workload_with_nothing_to_refuse_has_no_refusals() {
        let host = FakeHost::new()
            .with(
                root()
                    .fd(0, "/dev/null")
                    .fd(1, "/dev/pts/3")
                    .fd(2, "pipe:[7]")
                    .fd(3, "socket:[500]")
                    .fd(4, "/dev/shm/queue")
                    .fd(5, "/var/log/server.log")
                    .fd(6, "anon_inode:[eventpoll]")
                    .fd(7, "/dev/not-a-device")
                    .fd(8, "/dev/tty")
                    .controlling_pty(3)
                    .thread(103, None)
                    .maps("55d0-55e0 r-xp 00000000 08:01 77 /usr/bin/server\n7f00-7f10 rw-s 00000000 00:1a 5 /dev/shm/queue\n"),
            )
            .with(child(101).fd(3, "socket:[501]").pty_master(4, 3))
            .pair(500, 501);
        assert_eq!(check(&host, &workload(&[100, 101])), vec![]);
    }

    #[test]
    fn a_connection_to_journald_is_no_refusal_but_a_stream_carried_once() {
        let mut host = FakeHost::new()
            // stdout and stderr on one socket, shared with a child; another
            // fd on a socket whose peer is no journal stream.
            .with(
                root()
                    .fd(1, "socket:[500]")
                    .fd(2, "socket:[500]")
                    .fd(4, "socket:[510]"),
            )
            .with(child(101).fd(1, "socket:[500]"))
            .with(Process::new(50, "systemd-journal").fd(9, "socket:[501]"))
            .pair(500, 501)
            .pair(510, 511);
        host.journal.insert(
            501,
            "PRIORITY=30\nLEVEL_PREFIX=1\nIDENTIFIER=tick\nUNIT=tick.service\n",
        );
        let w = workload(&[100, 101]);
        assert_eq!(
            kinds(&check(&host, &w)),
            vec![(
                100,
                Kind::UnixPeerOutside {
                    fd: 4,
                    holder: None
                }
            )]
        );
        let streams = journal_streams(&host, &w);
        assert_eq!(streams.len(), 1, "{streams:?}");
        assert_eq!(streams[0].inode, 500, "the workload's end");
        assert_eq!(streams[0].unit, "tick.service");
        assert_eq!(streams[0].identifier, "tick");
    }

    #[test]
    fn a_socket_systemd_passed_is_refused() {
        let host = FakeHost::new()
            .with(
                Process::new(1, "systemd")
                    .fd(40, "socket:[700]")
                    .fd(41, "socket:[701]"),
            )
            .with(root().fd(3, "socket:[700]").fd(4, "socket:[702]"));
        let r = check(&host, &workload(&[100]));
        assert_eq!(kinds(&r), vec![(100, Kind::SocketOfInit { fd: 3 })]);
        assert!(
            r[0].resource.contains("pid 1 (systemd) holds too"),
            "{}",
            r[0].resource
        );
        assert!(r[0].why.contains(".socket unit"));
    }

    #[test]
    fn a_unix_peer_outside_is_refused_with_its_holder() {
        let host = FakeHost::new()
            .with(root().fd(3, "socket:[500]").fd(4, "socket:[510]"))
            .with(Process::new(50, "journald").fd(9, "socket:[501]"))
            .pair(500, 501)
            // 511 is held by no process we can see (in flight, say).
            .pair(510, 511);
        let r = check(&host, &workload(&[100]));
        assert_eq!(
            kinds(&r),
            vec![
                (
                    100,
                    Kind::UnixPeerOutside {
                        fd: 3,
                        holder: Some(50)
                    }
                ),
                (
                    100,
                    Kind::UnixPeerOutside {
                        fd: 4,
                        holder: None
                    }
                ),
            ]
        );
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 100 server): fd 3 is a unix socket connected to pid 50 (journald): CRIU can only checkpoint both ends of a unix connection together: put the peer in the same workload"
        );
        assert_eq!(
            r[1].resource,
            "fd 4 is a unix socket connected to a process outside it"
        );
    }

    #[test]
    fn without_sock_diag_unix_peers_are_left_to_criu() {
        struct NoDiag(FakeHost);
        impl Host for NoDiag {
            fn proc(&self) -> &Proc {
                self.0.proc()
            }
            fn unix_peers(&self) -> Result<HashMap<u64, u64>, unix_diag::Error> {
                // ENOENT: no unix_diag module.
                Err(unix_diag::Error::Kernel(std::io::Error::from_raw_os_error(
                    2,
                )))
            }
            fn is_device(&self, path: &str) -> bool {
                self.0.is_device(path)
            }
            fn file_kind(&self, path: &str) -> Option<FileKind> {
                self.0.file_kind(path)
            }
        }
        let host = FakeHost::new()
            .with(root().fd(3, "socket:[500]"))
            .with(Process::new(50, "journald").fd(9, "socket:[501]"))
            .pair(500, 501);
        assert_eq!(check(&NoDiag(host), &workload(&[100])), vec![]);
    }

    #[test]
    fn a_member_exiting_during_the_peer_lookup_does_not_put_its_peer_outside() {
        // The table still names the exiting member's socket as the peer.
        let host = FakeHost::new()
            .with(root().fd(3, "socket:[500]"))
            .with(child(101).fd(3, "socket:[501]"))
            .pair(500, 501);
        host.exits_at_peer_lookup.set(Some(101));
        assert_eq!(check(&host, &workload(&[100, 101])), vec![]);
    }

    #[test]
    fn leaders_running_outside_the_workload_are_refused() {
        let host = FakeHost::new()
            .with(Process::new(90, "bash"))
            .with(root().session(90, 90))
            .with(child(101).session(90, 90));
        let r = check(&host, &workload(&[100, 101]));
        let session = Kind::LeaderOutside {
            group: Group::Session,
            leader: 90,
        };
        let pgrp = Kind::LeaderOutside {
            group: Group::ProcessGroup,
            leader: 90,
        };
        assert_eq!(
            kinds(&r),
            vec![
                (100, session.clone()),
                (100, pgrp.clone()),
                (101, session),
                (101, pgrp)
            ]
        );
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 100 server): its session is led by pid 90 (bash) outside the workload: CRIU needs the leader in the checkpoint: start the workload with setsid, or with `kupgrade launch`"
        );
        assert_eq!(
            r[1].resource,
            "its process group is led by pid 90 (bash) outside the workload"
        );
    }

    #[test]
    fn leaders_that_have_exited_are_not_refused_below_the_root() {
        // 101 made its own session and forked 102, then exited (and was
        // reaped); 103's process group leader 104 is a zombie.
        let host = FakeHost::new()
            .with(root())
            .with(child(102).session(101, 101))
            .with(child(103).session(104, 100))
            .with(Process::new(104, "sh").parent(1).session(104, 100).zombie());
        assert_eq!(check(&host, &workload(&[100, 102, 103])), vec![]);
    }

    #[test]
    fn a_root_whose_session_leader_has_exited_is_not_refused() {
        // A daemon that forked after setsid: CRIU takes it as a shell job.
        let host = FakeHost::new().with(root().session(99, 99));
        assert_eq!(check(&host, &workload(&[100])), vec![]);
    }

    #[test]
    fn a_terminal_whose_other_end_is_outside_is_refused_with_its_holder() {
        let host = FakeHost::new()
            .with(Process::new(50, "sshd").pty_master(7, 5))
            .with(
                root()
                    .fd(0, "/dev/pts/5")
                    .fd(3, "/dev/tty")
                    .controlling_pty(5),
            )
            // Its controlling terminal is none at all (a serial line, say).
            .with(child(101).fd(4, "/dev/tty"));
        let r = check(&host, &workload(&[100, 101]));
        let outside = |fd, path: &str, pty, holder| Kind::TerminalOutside {
            fd,
            path: path.into(),
            pty,
            holder,
        };
        assert_eq!(
            kinds(&r),
            vec![
                (100, outside(0, "/dev/pts/5", Some(5), Some(50))),
                (100, outside(3, "/dev/tty", Some(5), Some(50))),
                (101, outside(4, "/dev/tty", None, None)),
            ]
        );
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 100 server): fd 0 is the terminal /dev/pts/5, whose other end is held by pid 50 (sshd) outside the workload: CRIU carries a pseudo-terminal only with both its ends: run the program under a terminal of its own inside the workload (script, screen, tmux), or without one (`kupgrade launch`)"
        );
        assert_eq!(
            r[1].resource,
            "fd 3 is /dev/tty, its controlling terminal /dev/pts/5, whose other end is held by pid 50 (sshd) outside the workload"
        );
        assert_eq!(
            r[2].resource,
            "fd 4 is /dev/tty, and its controlling terminal is not a pseudo-terminal of the workload"
        );
    }

    #[test]
    fn a_pseudo_terminal_with_both_ends_in_the_workload_is_not_refused() {
        // The shell leads the tree on its terminal, with /dev/tty open and a
        // job of its own; the terminal program below it holds the master.
        let host = FakeHost::new()
            .with(
                root()
                    .fd(0, "/dev/pts/2")
                    .fd(1, "/dev/pts/2")
                    .fd(10, "/dev/tty")
                    .controlling_pty(2),
            )
            .with(child(101).pty_master(0, 2).fd(6, "/dev/pts/ptmx"))
            .with(
                Process::new(102, "sleep")
                    .parent(100)
                    .session(102, 100)
                    .fd(2, "/dev/pts/2")
                    .controlling_pty(2)
                    .foreground(100),
            );
        assert_eq!(check(&host, &workload(&[100, 101, 102])), vec![]);
    }

    /// CRIU 3.17's dump gives /dev/tty a terminal only from the first
    /// process, in its order, to hold that terminal, and only with the
    /// session's leader in the foreground.
    #[test]
    fn a_controlling_terminal_criu_cannot_restore_is_refused() {
        // A terminal program at the root holds the master; the shell below
        // it has /dev/tty open (as `script` or sshd and a login shell).
        let shell = || {
            Process::new(101, "sh")
                .parent(100)
                .fd(0, "/dev/pts/2")
                .fd(10, "/dev/tty")
                .controlling_pty(2)
        };
        let host = FakeHost::new().with(root().pty_master(5, 2)).with(shell());
        let r = check(&host, &workload(&[100, 101]));
        assert_eq!(
            kinds(&r),
            vec![(
                101,
                Kind::CttyNotFirst {
                    fd: 10,
                    pty: 2,
                    first: 100
                }
            )]
        );
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 101 sh): fd 10 is /dev/tty, but pid 100 (server) holds its terminal /dev/pts/2 before it in the tree: CRIU 3.17 restores /dev/tty only in the first process of the tree to hold its terminal (the root first, then each child in turn): let the shell be the root with its terminal program below it, or close /dev/tty"
        );
        // The shell running a command in the foreground.
        let host = FakeHost::new()
            .with(root().pty_master(5, 2))
            .with(shell().foreground(103))
            .with(
                Process::new(103, "make")
                    .parent(101)
                    .session(103, 101)
                    .fd(1, "/dev/pts/2")
                    .controlling_pty(2)
                    .foreground(103),
            );
        let r = check(&host, &workload(&[100, 101, 103]));
        assert_eq!(
            kinds(&r),
            vec![(
                101,
                Kind::CttyForegroundJob {
                    fd: 10,
                    pty: 2,
                    foreground: 103
                }
            )]
        );
        assert_eq!(
            r[0].resource,
            "fd 10 is /dev/tty, and process group 103 holds the foreground of its terminal /dev/pts/2"
        );
        // The shell as the root, but with /dev/tty open twice.
        let host = FakeHost::new()
            .with(
                root()
                    .fd(0, "/dev/pts/2")
                    .fd(3, "/dev/tty")
                    .fd(10, "/dev/tty")
                    .controlling_pty(2),
            )
            .with(child(101).pty_master(0, 2));
        let r = check(&host, &workload(&[100, 101]));
        assert_eq!(kinds(&r), vec![(100, Kind::CttyTwice { fds: vec![3, 10] })]);
        assert!(r[0]
            .to_string()
            .starts_with("workload w (pid 100 server): fds 3, 10 are all /dev/tty: CRIU 3.17's restore waits for ever"));
    }

    #[test]
    fn terminals_are_left_to_criu_when_a_masters_index_is_unreadable() {
        // fd 6 is a master whose fdinfo says no tty-index.
        let host = FakeHost::new().with(root().fd(6, "/dev/ptmx").fd(0, "/dev/pts/9"));
        assert_eq!(check(&host, &workload(&[100])), vec![]);
    }

    const MOUNTS: &str = "22 1 254:0 / / rw - ext4 /dev/vda rw\n\
                          24 22 0:6 / /dev rw - devtmpfs udev rw,mode=755\n\
                          25 24 0:21 / /dev/shm rw - tmpfs tmpfs rw,mode=1777\n\
                          26 22 0:22 / /run rw - tmpfs tmpfs rw,mode=755\n\
                          27 22 0:23 / /mnt/ram rw - ramfs ramfs rw\n";

    #[test]
    fn files_the_new_boot_will_not_have_are_refused() {
        let host = FakeHost::new()
            .with(
                root()
                    .fd(3, "/dev/shm/seg")
                    .fd(4, "/run/app.fifo")
                    .fd(5, "/var/lib/app.fifo")
                    .fd(6, "/mnt/ram/data")
                    .fd(7, "/dev/stash")
                    .fd(8, "/dev/null")
                    .fd(9, "/run/app.d")
                    .fd(10, "/dev")
                    .maps("7f00-7f10 r-xp 00000000 00:17 5 /mnt/ram/lib.so\n"),
            )
            .file("/dev/shm/seg", FileKind::File)
            .file("/run/app.fifo", FileKind::Fifo)
            .file("/var/lib/app.fifo", FileKind::Fifo)
            .file("/mnt/ram/data", FileKind::File)
            .file("/mnt/ram/lib.so", FileKind::File)
            .file("/dev/stash", FileKind::File)
            .file("/dev/null", FileKind::Other)
            .file("/run/app.d", FileKind::Dir)
            .file("/dev", FileKind::Dir);
        host.fake.mountinfo(MOUNTS);
        let r = check(&host, &workload(&[100]));
        let not_carried = |fd, path: &str, fstype: &str| Kind::NotCarried {
            fd,
            path: path.into(),
            fstype: fstype.into(),
        };
        assert_eq!(
            kinds(&r),
            vec![
                (
                    100,
                    Kind::NamedFifo {
                        fd: 4,
                        path: "/run/app.fifo".into()
                    }
                ),
                (100, not_carried(Some(6), "/mnt/ram/data", "ramfs")),
                (100, not_carried(Some(7), "/dev/stash", "devtmpfs")),
                (100, not_carried(None, "/mnt/ram/lib.so", "ramfs")),
            ]
        );
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 100 server): fd 4 is the named FIFO /run/app.fifo, on a tmpfs: CRIU reopens a named FIFO by its path, and kupgrade carries only the regular files and directories of a tmpfs: keep the FIFO on disk, or use a pipe"
        );
        assert_eq!(
            r[1].to_string(),
            "workload w (pid 100 server): fd 6 is /mnt/ram/data, on ramfs: the new boot will not have it (kupgrade carries the files of tmpfs mounts only) and CRIU reopens it by its path: keep it on a tmpfs or on disk"
        );
        assert_eq!(r[3].resource, "it maps /mnt/ram/lib.so, on ramfs");
    }

    #[test]
    fn a_socket_bound_where_the_new_boot_has_no_directory_is_refused() {
        let host = FakeHost::new().with(
            root()
                .fd(3, "socket:[600]")
                .fd(4, "socket:[601]")
                .fd(5, "socket:[602]")
                .fd(6, "socket:[603]")
                .fd(7, "socket:[604]")
                .fd(8, "socket:[605]"),
        );
        host.fake.mountinfo(MOUNTS);
        host.fake.unix(&[
            (600, "/dev/sub/app.sock"),
            (601, "/dev/log"),
            (602, "/run/app/app.sock"),
            (603, "/mnt/ram/x.sock"),
            (604, "/mnt/ram/d/x.sock"),
            (605, "/var/lib/app/app.sock"),
        ]);
        let r = check(&host, &workload(&[100]));
        assert_eq!(
            kinds(&r),
            vec![
                (
                    100,
                    Kind::SocketDirNotCarried {
                        fd: 3,
                        path: "/dev/sub/app.sock".into()
                    }
                ),
                (
                    100,
                    Kind::SocketDirNotCarried {
                        fd: 7,
                        path: "/mnt/ram/d/x.sock".into()
                    }
                ),
            ]
        );
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 100 server): fd 3 is a unix socket bound at /dev/sub/app.sock, in a directory of an in-memory file system: CRIU binds the socket at its path again, and the new boot will not have that directory (kupgrade carries tmpfs mounts only): bind it on a tmpfs such as /run, or on disk"
        );
    }

    #[test]
    fn a_traced_thread_is_refused_with_its_tracer() {
        let host = FakeHost::new()
            .with(Process::new(77, "gdb"))
            .with(root().thread(105, Some(77)))
            .with(child(101).traced_by(77));
        let r = check(&host, &workload(&[100, 101]));
        assert_eq!(
            kinds(&r),
            vec![
                (
                    100,
                    Kind::Traced {
                        tid: 105,
                        tracer: 77
                    }
                ),
                (
                    101,
                    Kind::Traced {
                        tid: 101,
                        tracer: 77
                    }
                ),
            ]
        );
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 100 server): thread 105 traced by pid 77 (gdb): CRIU must ptrace every task itself; detach the debugger or strace first"
        );
    }

    #[test]
    fn an_io_uring_is_refused() {
        let host = FakeHost::new().with(root().fd(5, "anon_inode:[io_uring]"));
        let r = check(&host, &workload(&[100]));
        assert_eq!(kinds(&r), vec![(100, Kind::IoUring { fd: 5 })]);
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 100 server): fd 5 is an io_uring: CRIU cannot checkpoint io_uring instances"
        );
    }

    #[test]
    fn a_device_with_state_is_refused_and_harmless_ones_are_not() {
        let host = FakeHost::new().with(
            root()
                .fd(0, "/dev/null")
                .fd(1, "/dev/pts/3")
                .pty_master(6, 3)
                .fd(2, "/dev/kmsg")
                .fd(3, "/dev/shm/x")
                .fd(4, "/dev/mqueue-not-a-device")
                .fd(5, "/dev/sda"),
        );
        let r = check(&host, &workload(&[100]));
        assert_eq!(
            kinds(&r),
            vec![
                (
                    100,
                    Kind::Device {
                        fd: 2,
                        path: "/dev/kmsg".into()
                    }
                ),
                (
                    100,
                    Kind::Device {
                        fd: 5,
                        path: "/dev/sda".into()
                    }
                ),
            ]
        );
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 100 server): fd 2 is the device /dev/kmsg: device state cannot be carried across a kernel; close it or run the workload without it"
        );
    }

    #[test]
    fn sysv_shared_memory_is_refused_only_in_the_host_ipc_namespace() {
        let maps = "7f10-7f20 rw-s 00000000 00:01 0 /SYSV00000000 (deleted)\n7f20-7f30 rw-s 00000000 00:01 1 /SYSV0000abcd (deleted)\n";
        let host = FakeHost::new().with(root().maps(maps));
        let r = check(&host, &workload(&[100]));
        assert_eq!(
            kinds(&r),
            vec![(
                100,
                Kind::SysvShmInHostIpc {
                    keys: vec!["0x00000000".into(), "0x0000abcd".into()]
                }
            )]
        );
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 100 server): SysV shared memory (key 0x00000000, 0x0000abcd) attached in the host's IPC namespace: CRIU carries SysV IPC only in a workload's own IPC namespace: start it with `kupgrade launch --ipc-namespace`"
        );
        // In its own IPC namespace, CRIU carries the segments and the namespace.
        let host = FakeHost::new().with(
            root()
                .maps(maps)
                .namespace(Namespace::Ipc, "ipc:[4026532300]"),
        );
        let own_ipc = Workload {
            ipc_namespace: true,
            ..workload(&[100])
        };
        assert_eq!(check(&host, &own_ipc), vec![]);
    }

    #[test]
    fn foreign_namespaces_are_refused_each_with_its_link() {
        let host = FakeHost::new().with(
            root()
                .namespace(Namespace::Net, "net:[4026532290]")
                .namespace(Namespace::Ipc, "ipc:[4026532291]")
                // Its own PID namespace is CRIU's to carry.
                .namespace(Namespace::Pid, "pid:[4026532292]"),
        );
        let r = check(&host, &workload(&[100]));
        assert_eq!(
            kinds(&r),
            vec![
                (
                    100,
                    Kind::ForeignNamespace {
                        namespace: Namespace::Net,
                        link: "net:[4026532290]".into()
                    }
                ),
                (
                    100,
                    Kind::ForeignNamespace {
                        namespace: Namespace::Ipc,
                        link: "ipc:[4026532291]".into()
                    }
                ),
            ]
        );
        assert_eq!(
            r[0].to_string(),
            "workload w (pid 100 server): net namespace net:[4026532290]: kupgrade restores workloads into the host's namespaces and does not manage this one"
        );
        assert_eq!(
            r[1].why,
            "CRIU carries an IPC namespace only with everything in it: give the workload its own with `kupgrade launch --ipc-namespace`"
        );
        assert_ne!(host_namespace(Namespace::Net), "net:[4026532290]");
    }

    #[test]
    fn members_that_have_exited_are_not_refused() {
        // 101 is gone (reaped); 102 is a zombie, still reported to the
        // debugger that traced it: no namespaces, no files, no task to seize.
        let host = FakeHost::new()
            .with(Process::new(77, "gdb"))
            .with(root())
            .with(child(102).traced_by(77).zombie());
        assert_eq!(check(&host, &workload(&[100, 101, 102])), vec![]);
    }

    #[test]
    fn a_refusal_keeps_the_name_its_process_had_when_found() {
        let host = FakeHost::new().with(root().fd(5, "anon_inode:[io_uring]"));
        let r = check(&host, &workload(&[100]));
        host.fake.remove(100);
        assert!(r[0]
            .to_string()
            .starts_with("workload w (pid 100 server): "));
    }

    // The same, on real processes of this machine.

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
        workload(&[&[me], others].concat())
    }

    #[test]
    fn a_member_that_has_exited_is_not_refused() {
        let gone = vanished_pid();
        let r = refusals(&me_and(&[gone]));
        assert!(r.iter().all(|r| r.pid != gone), "{r:?}");
    }

    #[test]
    fn live_leaders_that_have_exited_are_not_refused_below_the_root() {
        let orphan = Orphan::start();
        let stat = Proc::host().stat(orphan.0).unwrap();
        assert_eq!(stat.pgrp, stat.session);
        assert!(!Path::new(&format!("/proc/{}", stat.session)).exists());
        let r = refusals(&me_and(&[orphan.0]));
        assert!(r.iter().all(|r| r.pid != orphan.0), "{r:?}");
    }

    #[test]
    fn a_live_root_whose_session_leader_has_exited_is_carried_as_a_shell_job() {
        // CRIU dumps a tree only from a session leader, or with --shell-job.
        let orphan = Orphan::start();
        let cgroup = tempfile::tempdir().unwrap();
        std::fs::write(
            cgroup.path().join("cgroup.procs"),
            format!("{}\n", orphan.0),
        )
        .unwrap();
        let w = crate::workload::inspect("orphan", cgroup.path()).unwrap();
        assert_eq!(w.root_pid, orphan.0);
        assert!(w.shell_job);
        assert_eq!(refusals(&w), vec![]);
    }

    #[test]
    fn live_leaders_alive_outside_the_workload_are_still_refused() {
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
}
