//! Proves from a wl-files log, and by probing the files while the workload
//! runs, that open files and their kernel state came through the upgrades:
//! - the common checks (one pid, seq from 0 without gap, monotonic time, at
//!   least N boots);
//! - the read offset in `source` carried on: record N read on line N, the
//!   offset just past it (no rewind, no skip);
//! - both O_APPEND descriptors kept their flag and `append.log` holds every
//!   line, alternating a/b, none overwritten;
//! - the open-but-deleted file kept its content on every line and is still
//!   open, deleted, in the process now (/proc/PID/fd);
//! - inotify events kept coming in every boot;
//! - the locks are still held: from this other process, flock(LOCK_EX|LOCK_NB)
//!   fails, F_GETLK names the workload's pid as the holder of the POSIX lock
//!   and F_OFD_GETLK finds the OFD lock.
//!
//! Run it while the workload runs (as root, to read /proc/PID/fd).
//!
//! Usage: `wl-files-check LOG [min boots, 2]`.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;

use nix::fcntl::{fcntl, FcntlArg, Flock, FlockArg};

use kupgrade_workloads::{
    advancing, all_ok, check_streams, checker_main, constant, whole_file_lock, Line, RECORD,
};

const RECORDS: u64 = 100_000;

fn check_log(
    lines: Vec<Line>,
    min_boots: usize,
) -> Result<(kupgrade_workloads::Stream, String), String> {
    let s = check_streams(lines, &[""], min_boots)?.remove(0);
    let dir = constant(&s, "dir")?.to_string();
    all_ok(&s, "append")?;
    all_ok(&s, "deleted")?;
    advancing(&s, "inotify")?;
    for l in &s.lines {
        let rec = l.str("rec")?;
        if rec != (l.seq % RECORDS).to_string() {
            return Err(format!(
                "line {}: read record {rec} where {} was due: the file offset moved",
                l.no,
                l.seq % RECORDS
            ));
        }
        let off: u64 = l.num("off")?;
        if off != (l.seq % RECORDS + 1) * RECORD as u64 {
            return Err(format!("line {}: offset {off} after record {rec}", l.no));
        }
    }
    Ok((s, dir))
}

fn open(path: &str) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))
}

/// The probes that need the workload alive.
fn probe(pid: u32, dir: &str, ticks: u64) -> Result<(), String> {
    let deleted = format!("{dir}/deleted (deleted)");
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("workload pid {pid} is not running ({e})"))?;
    if !fds
        .flatten()
        .any(|e| fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == deleted))
    {
        return Err(format!("pid {pid} no longer holds {deleted}"));
    }
    match Flock::lock(
        open(&format!("{dir}/flock"))?,
        FlockArg::LockExclusiveNonblock,
    ) {
        Ok(_) => return Err("flock: the lock was free, the workload lost it".into()),
        Err((_, e)) if e == nix::errno::Errno::EWOULDBLOCK => {}
        Err((_, e)) => return Err(format!("flock: {e}")),
    }
    let mut q = whole_file_lock();
    let posix = open(&format!("{dir}/posix"))?;
    fcntl(posix.as_raw_fd(), FcntlArg::F_GETLK(&mut q)).map_err(|e| format!("F_GETLK: {e}"))?;
    if i32::from(q.l_type) != nix::libc::F_WRLCK || q.l_pid != pid as i32 {
        return Err(format!(
            "POSIX lock: type {} held by pid {}, expected a write lock by {pid}",
            q.l_type, q.l_pid
        ));
    }
    let mut q = whole_file_lock();
    let ofd = open(&format!("{dir}/ofd"))?;
    fcntl(ofd.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut q))
        .map_err(|e| format!("F_OFD_GETLK: {e}"))?;
    if i32::from(q.l_type) != nix::libc::F_WRLCK {
        return Err("OFD lock: the lock was free, the workload lost it".into());
    }
    let text =
        fs::read_to_string(format!("{dir}/append.log")).map_err(|e| format!("append.log: {e}"))?;
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let want = format!("{:012} {}", i / 2, ["a", "b"][i % 2]);
        if *l != want {
            return Err(format!(
                "append.log line {}: {l:?} where {want:?} was due",
                i + 1
            ));
        }
    }
    if (lines.len() as u64) < 2 * ticks {
        return Err(format!(
            "append.log has {} lines for {ticks} ticks",
            lines.len()
        ));
    }
    Ok(())
}

fn check(lines: Vec<Line>, min_boots: usize) -> Result<String, String> {
    let (s, dir) = check_log(lines, min_boots)?;
    probe(s.pid, &dir, s.lines.len() as u64)?;
    Ok(format!(
        "in {dir}: read offset carried on to record {}, O_APPEND kept on both descriptors, deleted file intact and still open, \
         {} inotify events with some in every boot, flock, POSIX (held by pid {}) and OFD locks still held; {}",
        s.last().str("rec")?,
        s.last().str("inotify")?,
        s.pid,
        s.summary()
    ))
}

fn main() {
    checker_main("wl-files-check LOG [min boots]", check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn line(s: u64) -> String {
        format!(
            "rec={s} off={} append=ok deleted=ok inotify={} dir=/x",
            (s + 1) * 32,
            s * 2
        )
    }

    fn run(f: impl Fn(u64) -> String) -> Result<String, String> {
        check_log(
            parse_log(&testlog::lines("", 9, &testlog::boots(2, 5), f))?,
            2,
        )
        .map(|(s, _)| s.summary())
    }

    #[test]
    fn log_checks() {
        assert!(run(line).is_ok());
        assert!(run(|s| if s == 6 {
            line(s).replace("rec=6 ", "rec=7 ")
        } else {
            line(s)
        })
        .unwrap_err()
        .contains("offset moved"));
        assert!(run(|s| if s == 6 {
            line(s).replace("off=224", "off=0")
        } else {
            line(s)
        })
        .is_err());
        assert!(run(|s| if s == 6 {
            line(s).replace("append=ok", "append=BAD")
        } else {
            line(s)
        })
        .is_err());
        assert!(run(|s| if s == 6 {
            line(s).replace("deleted=ok", "deleted=BAD")
        } else {
            line(s)
        })
        .is_err());
        assert!(run(|s| line(s).replace(
            &format!("inotify={}", s * 2),
            &format!("inotify={}", s.min(5))
        ))
        .is_err());
    }

    #[test]
    fn probe_fails_without_the_workload() {
        let e = probe(u32::MAX - 1, "/nonexistent", 1).unwrap_err();
        assert!(e.contains("not running"), "{e}");
    }
}
