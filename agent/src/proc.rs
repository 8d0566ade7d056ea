//! What `/proc` says about a process: parent, tracer, threads, open files,
//! mappings, namespaces, sockets.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;

/// A `key:\tvalue` field of `/proc/PID/status`.
pub fn status_field(pid: i32, key: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_field(&text, key)
}

pub fn parse_status_field(status: &str, key: &str) -> Option<String> {
    status.lines().find_map(|l| {
        l.strip_prefix(key)?
            .strip_prefix(':')
            .map(|v| v.trim().to_string())
    })
}

pub fn ppid(pid: i32) -> Option<i32> {
    status_field(pid, "PPid")?.parse().ok()
}

/// (process group, session) from `/proc/PID/stat`.
pub fn pgrp_and_session(pid: i32) -> Option<(i32, i32)> {
    parse_stat_ids(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

pub fn parse_stat_ids(stat: &str) -> Option<(i32, i32)> {
    // "pid (comm) state ppid pgrp session ...": comm may hold spaces and ')'.
    let mut f = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().skip(2);
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// Whether the process exists and has not exited: a zombie has, and so has
/// a process with no `/proc` entry.
pub fn is_running(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat_state(&s))
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// The state letter of `/proc/PID/stat` (R, S, D, Z, ...).
pub fn parse_stat_state(stat: &str) -> Option<char> {
    stat.get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

pub fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Thread ids of a process.
pub fn threads(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// (fd number, link target) of every open file descriptor.
pub fn fds(pid: i32) -> Vec<(i32, String)> {
    let mut v: Vec<(i32, String)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    v.sort();
    v
}

/// Every process on the machine, from /proc.
pub fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Paths of the files mapped into the process (`/proc/PID/maps`).
pub fn mapped_files(pid: i32) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut v: Vec<String> = text
        .lines()
        .filter_map(|l| {
            // address perms offset dev inode path (the path may hold spaces)
            let path = l.splitn(6, char::is_whitespace).nth(5)?.trim();
            path.starts_with('/').then(|| path.to_string())
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The namespace a process is in, e.g. `net:[4026531840]`.
pub fn namespace(pid: &str, kind: &str) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
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

/// TCP sockets of the system (this network namespace), IPv4 and IPv6.
pub fn tcp_sockets() -> Vec<TcpSocket> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        out.extend(parse_tcp_table(&fs::read_to_string(f).unwrap_or_default()));
    }
    out
}

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

/// Inodes of the sockets `pids` hold open.
pub fn socket_inodes(pids: &[i32]) -> HashSet<u64> {
    pids.iter()
        .flat_map(|p| fds(*p))
        .filter_map(|(_, link)| socket_inode(&link))
        .collect()
}

pub const TCP_SYN_RECV: u8 = 0x03;
pub const TCP_LISTEN: u8 = 0x0a;
pub const TCP_CLOSE: u8 = 0x07;

/// Unix sockets: inode -> bound path (if any), from `/proc/net/unix`.
pub fn unix_socket_paths() -> Vec<(u64, Option<PathBuf>)> {
    let text = fs::read_to_string("/proc/net/unix").unwrap_or_default();
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
pub fn rss_bytes(pid: i32) -> u64 {
    let pages: u64 = fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[cfg(test)]
mod tests {
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
        assert_eq!(parse_stat_ids("42 (a b) c) S 1 40 39 0 -1"), Some((40, 39)));
        assert_eq!(parse_stat_state("42 (a b) c) Z 1 40 39 0 -1"), Some('Z'));
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id() as i32;
        assert!(ppid(me).is_some());
        assert!(threads(me).contains(&me));
        assert!(!fds(me).is_empty());
        assert!(rss_bytes(me) > 0);
        assert!(is_running(me));
        assert!(namespace("self", "net").unwrap().starts_with("net:["));
    }
}
