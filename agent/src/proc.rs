//! What `/proc` says about a process: parent, session, tracer, threads, open
//! files, mappings, namespaces, sockets.
//!
//! [`Proc`] reads a tree rooted at a directory: the host's `/proc`, or a
//! fake one that a test builds (see `fake`). The free functions are the host
//! instance's, for the callers that only ever look at the running system.
//!
//! A read that fails yields `None` or nothing: the process may have exited
//! while we looked, and its callers decide what that means.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

#[cfg(test)]
pub(crate) mod fake;

/// A `/proc` tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    root: PathBuf,
}

/// A kind of namespace, as `/proc/PID/ns/` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Namespace {
    Net,
    Mnt,
    Ipc,
    Uts,
    User,
    Cgroup,
    Pid,
}

impl Namespace {
    pub const ALL: [Namespace; 7] = [
        Namespace::Net,
        Namespace::Mnt,
        Namespace::Ipc,
        Namespace::Uts,
        Namespace::User,
        Namespace::Cgroup,
        Namespace::Pid,
    ];

    /// Its name under `/proc/PID/ns/`.
    pub const fn name(self) -> &'static str {
        match self {
            Namespace::Net => "net",
            Namespace::Mnt => "mnt",
            Namespace::Ipc => "ipc",
            Namespace::Uts => "uts",
            Namespace::User => "user",
            Namespace::Cgroup => "cgroup",
            Namespace::Pid => "pid",
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The fields of `/proc/PID/stat` that kupgrade uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// R, S, D, T, Z, X, ...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// The controlling terminal's device number, 0 for none.
    pub tty_nr: u32,
    /// The process group in the foreground of that terminal, -1 for none.
    pub tpgid: i32,
}

impl Stat {
    /// A zombie (or a task being reaped) has exited: only its pid remains.
    pub fn has_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

pub fn parse_stat(stat: &str) -> Option<Stat> {
    // "pid (comm) state ppid pgrp session ...": comm may hold spaces and ')'.
    let mut f = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    Some(Stat {
        state: f.next()?.chars().next()?,
        ppid: f.next()?.parse().ok()?,
        pgrp: f.next()?.parse().ok()?,
        session: f.next()?.parse().ok()?,
        // Printed as a signed int; the bits are the device number.
        tty_nr: f.next()?.parse::<i32>().ok()? as u32,
        tpgid: f.next()?.parse().ok()?,
    })
}

/// Majors of the pseudo-terminal slaves `/dev/pts/N` (UNIX98_PTY_SLAVE_MAJOR
/// and the seven after it).
const PTS_MAJORS: std::ops::Range<u32> = 136..144;

/// The index N of `/dev/pts/N` if `dev` (as `stat` gives `tty_nr`) is one.
pub fn pts_index(dev: u32) -> Option<u32> {
    let major = (dev >> 8) & 0xfff;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    PTS_MAJORS
        .contains(&major)
        .then(|| (major - PTS_MAJORS.start) * 256 + minor)
}

pub fn parse_status_field(status: &str, key: &str) -> Option<String> {
    status.lines().find_map(|l| {
        l.strip_prefix(key)?
            .strip_prefix(':')
            .map(|v| v.trim().to_string())
    })
}

/// Socket inode from an fd link `socket:[12345]`.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// One line of `/proc/net/tcp` or `tcp6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub inode: u64,
    /// The kernel's state: 01 established, 03 SYN_RECV, 0A listen, ...
    pub state: u8,
    pub local_port: u16,
    /// For a listening socket: connections waiting to be accepted.
    pub rx_queue: u32,
}

pub const TCP_SYN_RECV: u8 = 0x03;
pub const TCP_LISTEN: u8 = 0x0a;
pub const TCP_CLOSE: u8 = 0x07;

pub fn parse_tcp_table(text: &str) -> Vec<TcpSocket> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(TcpSocket {
                local_port: u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                rx_queue: u32::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Numeric entries of a directory (pids, tids, fds), sorted.
fn numbered(dir: &Path) -> Vec<i32> {
    let mut v: Vec<i32> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

impl Proc {
    /// The running system's `/proc`.
    pub fn host() -> Self {
        Proc::at("/proc")
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        Proc { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ROOT/PID/rel`.
    fn of(&self, pid: i32, rel: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(rel)
    }

    /// A `key:\tvalue` field of `/proc/PID/status`.
    pub fn status_field(&self, pid: i32, key: &str) -> Option<String> {
        parse_status_field(&fs::read_to_string(self.of(pid, "status")).ok()?, key)
    }

    pub fn ppid(&self, pid: i32) -> Option<i32> {
        self.status_field(pid, "PPid")?.parse().ok()
    }

    pub fn stat(&self, pid: i32) -> Option<Stat> {
        parse_stat(&fs::read_to_string(self.of(pid, "stat")).ok()?)
    }

    /// Whether the process exists and has not exited: a zombie has, and so
    /// has a process with no entry.
    pub fn is_running(&self, pid: i32) -> bool {
        self.stat(pid).is_some_and(|s| !s.has_exited())
    }

    /// Its command name; empty when it is gone.
    pub fn comm(&self, pid: i32) -> String {
        fs::read_to_string(self.of(pid, "comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// Thread ids of a process.
    pub fn threads(&self, pid: i32) -> Vec<i32> {
        numbered(&self.of(pid, "task"))
    }

    /// The pid tracing thread `tid` of `pid`, if any (`TracerPid`).
    pub fn tracer(&self, pid: i32, tid: i32) -> Option<i32> {
        let status = fs::read_to_string(self.of(pid, &format!("task/{tid}/status"))).ok()?;
        parse_status_field(&status, "TracerPid")?
            .parse()
            .ok()
            .filter(|t| *t != 0)
    }

    /// (fd number, link target) of every open file descriptor.
    pub fn fds(&self, pid: i32) -> Vec<(i32, String)> {
        let dir = self.of(pid, "fd");
        numbered(&dir)
            .into_iter()
            .filter_map(|fd| {
                let target = fs::read_link(dir.join(fd.to_string())).ok()?;
                Some((fd, target.to_string_lossy().into_owned()))
            })
            .collect()
    }

    /// Where the file open as `fd` can be read, whatever its path has become
    /// since (a magic link in the kernel's `/proc`, followed by no path).
    pub fn fd_path(&self, pid: i32, fd: i32) -> PathBuf {
        self.of(pid, &format!("fd/{fd}"))
    }

    /// `/proc/PID/fdinfo/FD`.
    pub fn fdinfo(&self, pid: i32, fd: i32) -> Option<String> {
        fs::read_to_string(self.of(pid, &format!("fdinfo/{fd}"))).ok()
    }

    /// The index N of the pseudo-terminal whose master `fd` is (the
    /// kernel prints `tty-index` in the fdinfo of a `/dev/ptmx` file).
    pub fn pty_index(&self, pid: i32, fd: i32) -> Option<u32> {
        parse_status_field(&self.fdinfo(pid, fd)?, "tty-index")?
            .parse()
            .ok()
    }

    /// Every process of the tree.
    pub fn all_pids(&self) -> Vec<i32> {
        numbered(&self.root)
    }

    /// Paths of the files mapped into the process (`/proc/PID/maps`).
    pub fn mapped_files(&self, pid: i32) -> Vec<String> {
        let mut v: Vec<String> = self.mappings(pid).into_iter().map(|(_, p)| p).collect();
        v.sort();
        v.dedup();
        v
    }

    /// (address range, path) of each file mapping, in the order of the maps.
    pub fn mappings(&self, pid: i32) -> Vec<(String, String)> {
        let text = fs::read_to_string(self.of(pid, "maps")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                // address perms offset dev inode path (the path may hold spaces)
                let mut f = l.splitn(6, char::is_whitespace);
                let range = f.next()?;
                let path = f.nth(4)?.trim();
                path.starts_with('/')
                    .then(|| (range.to_string(), path.to_string()))
            })
            .collect()
    }

    /// Where the file mapped at `range` can be read, whatever its path has
    /// become (`/proc/PID/map_files/RANGE`, readable by root only).
    pub fn map_file_path(&self, pid: i32, range: &str) -> PathBuf {
        self.of(pid, &format!("map_files/{range}"))
    }

    /// The file name of the program the process runs.
    pub fn exe_name(&self, pid: i32) -> Option<String> {
        let exe = fs::read_link(self.of(pid, "exe")).ok()?;
        Some(exe.file_name()?.to_string_lossy().into_owned())
    }

    /// The mounts the reader sees, as `/proc/self/mountinfo` lists them.
    pub fn mountinfo(&self) -> String {
        fs::read_to_string(self.root.join("self/mountinfo")).unwrap_or_default()
    }

    /// The namespace a process is in, e.g. `net:[4026531840]`.
    pub fn namespace(&self, pid: i32, ns: Namespace) -> Option<String> {
        self.ns_link(&pid.to_string(), ns)
    }

    /// The namespace of the process reading the tree (`self`).
    pub fn own_namespace(&self, ns: Namespace) -> Option<String> {
        self.ns_link("self", ns)
    }

    fn ns_link(&self, dir: &str, ns: Namespace) -> Option<String> {
        fs::read_link(self.root.join(dir).join("ns").join(ns.name()))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// The process's cgroup v2 path (the `0::` line), e.g. `/kupgrade/w`.
    pub fn cgroup(&self, pid: i32) -> Option<String> {
        let text = fs::read_to_string(self.of(pid, "cgroup")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_string)
    }

    /// TCP sockets of the reader's network namespace, IPv4 and IPv6.
    pub fn tcp_sockets(&self) -> Vec<TcpSocket> {
        ["net/tcp", "net/tcp6"]
            .iter()
            .flat_map(|f| {
                parse_tcp_table(&fs::read_to_string(self.root.join(f)).unwrap_or_default())
            })
            .collect()
    }

    /// Inodes of the sockets `pids` hold open.
    pub fn socket_inodes(&self, pids: &[i32]) -> HashSet<u64> {
        pids.iter()
            .flat_map(|p| self.fds(*p))
            .filter_map(|(_, link)| socket_inode(&link))
            .collect()
    }

    /// Unix sockets: inode -> bound path (if any), from `/proc/net/unix`.
    pub fn unix_socket_paths(&self) -> Vec<(u64, Option<PathBuf>)> {
        let text = fs::read_to_string(self.root.join("net/unix")).unwrap_or_default();
        text.lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let inode = f.get(6)?.parse().ok()?;
                let path = f.get(7).filter(|p| p.starts_with('/')).map(PathBuf::from);
                Some((inode, path))
            })
            .collect()
    }

    /// Resident memory of a process in bytes (`statm` resident pages).
    pub fn rss_bytes(&self, pid: i32) -> u64 {
        let pages: u64 = fs::read_to_string(self.of(pid, "statm"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }
}

/// (fd number, link target) of every open fd of a process on this machine.
pub fn fds(pid: i32) -> Vec<(i32, String)> {
    Proc::host().fds(pid)
}

/// Every process on this machine.
pub fn all_pids() -> Vec<i32> {
    Proc::host().all_pids()
}

pub fn comm(pid: i32) -> String {
    Proc::host().comm(pid)
}

pub fn mapped_files(pid: i32) -> Vec<String> {
    Proc::host().mapped_files(pid)
}

/// TCP sockets of this network namespace, IPv4 and IPv6.
pub fn tcp_sockets() -> Vec<TcpSocket> {
    Proc::host().tcp_sockets()
}

pub fn socket_inodes(pids: &[i32]) -> HashSet<u64> {
    Proc::host().socket_inodes(pids)
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeProc, Process};
    use super::*;

    #[test]
    fn status_fields_and_tcp_tables_parse() {
        let status = "Name:\tcat\nPPid:\t1\nTracerPid:\t42\n";
        assert_eq!(
            parse_status_field(status, "TracerPid").as_deref(),
            Some("42")
        );
        assert_eq!(parse_status_field(status, "Tracer"), None);
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0\n   1: 0F02000A:1B58 0202000A:D2A4 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0\n";
        let t = parse_tcp_table(tcp);
        assert_eq!(
            t.iter().map(|s| (s.inode, s.state)).collect::<Vec<_>>(),
            vec![(31337, TCP_LISTEN), (4242, 1)]
        );
        assert_eq!((t[0].local_port, t[1].local_port), (8080, 7000));
        assert_eq!(socket_inode("socket:[99]"), Some(99));
        let stat = parse_stat("42 (a b) c) S 1 40 39 34816 41").unwrap();
        assert_eq!((stat.pgrp, stat.session, stat.tpgid), (40, 39, 41));
        // 34816 = major 136, minor 0: /dev/pts/0.
        assert_eq!(pts_index(stat.tty_nr), Some(0));
        assert_eq!((stat.state, stat.ppid), ('S', 1));
        assert_eq!(pts_index(0), None);
        // /dev/pts/300: major 137, minor 44; /dev/tty1 is major 4.
        assert_eq!(pts_index((137 << 8) | 44), Some(300));
        assert_eq!(pts_index((4 << 8) | 1), None);
        assert!(parse_stat("42 (a b) c) Z 1 40 39 0 -1")
            .unwrap()
            .has_exited());
        assert_eq!(parse_stat("42 (cut) S 1"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id() as i32;
        let host = Proc::host();
        assert!(host.ppid(me).is_some());
        assert!(host.threads(me).contains(&me));
        assert!(!host.fds(me).is_empty());
        assert!(host.rss_bytes(me) > 0);
        assert!(host.is_running(me));
        assert!(host
            .own_namespace(Namespace::Net)
            .unwrap()
            .starts_with("net:["));
        assert_eq!(
            host.namespace(me, Namespace::Net),
            host.own_namespace(Namespace::Net)
        );
        assert!(host.cgroup(me).unwrap().starts_with('/'));
    }

    #[test]
    fn a_fake_tree_reads_like_the_host() {
        let fake = FakeProc::new();
        fake.add(
            Process::new(40, "daemon")
                .parent(7)
                .session(39, 38)
                .fd(0, "/dev/null")
                .fd(3, "socket:[900]")
                .thread(41, Some(77))
                .maps("7f00-7f10 r-xp 00000000 08:01 12 /usr/lib/libc.so.6\n7f10-7f20 rw-s 00000000 00:01 0 /SYSV0000002a (deleted)\n7f20-7f30 rw-p 00000000 00:00 0 [heap]\n"),
        );
        fake.add(Process::new(50, "zombie").zombie());
        fake.tcp("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 900 1 0\n");
        let p = fake.proc();
        assert_eq!(p.all_pids(), vec![1, 40, 50]);
        assert_eq!(p.ppid(40), Some(7));
        assert_eq!(
            p.stat(40),
            Some(Stat {
                state: 'S',
                ppid: 7,
                pgrp: 39,
                session: 38,
                tty_nr: 0,
                tpgid: -1
            })
        );
        assert_eq!(p.comm(40), "daemon");
        assert_eq!(p.threads(40), vec![40, 41]);
        assert_eq!((p.tracer(40, 40), p.tracer(40, 41)), (None, Some(77)));
        assert_eq!(
            p.fds(40),
            vec![(0, "/dev/null".into()), (3, "socket:[900]".into())]
        );
        assert_eq!(p.socket_inodes(&[40, 50]), HashSet::from([900]));
        assert_eq!(
            p.mapped_files(40),
            vec!["/SYSV0000002a (deleted)", "/usr/lib/libc.so.6"]
        );
        assert_eq!(
            p.namespace(40, Namespace::Net),
            p.own_namespace(Namespace::Net)
        );
        assert_eq!(p.tcp_sockets()[0].inode, 900);
        assert!(p.is_running(40));
        // A zombie is listed but has exited, and its namespaces are gone.
        assert!(!p.is_running(50));
        assert_eq!(p.namespace(50, Namespace::Net), None);
        // A pid with no entry: nothing, and no panic.
        assert!(!p.is_running(60));
        assert_eq!((p.stat(60), p.comm(60)), (None, String::new()));
        assert!(p.fds(60).is_empty() && p.threads(60).is_empty());
    }
}
