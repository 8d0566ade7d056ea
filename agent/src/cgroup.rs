//! cgroup v2 operations on a workload's cgroup: its processes, its memory,
//! and the freezer (`cgroup.freeze`, settled when `cgroup.events` says
//! `frozen 1`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proc::Proc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path} did not freeze within {ms} ms (a task in uninterruptible sleep?)")]
    FreezeTimeout { path: PathBuf, ms: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every process in `cgroup` and the cgroups below it.
pub fn procs(cgroup: &Path) -> Result<Vec<i32>, Error> {
    let mut out = Vec::new();
    let mut stack = vec![cgroup.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let file = dir.join("cgroup.procs");
        let text = fs::read_to_string(&file).map_err(io(&file))?;
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        for e in fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Bytes charged to the cgroup (`memory.current`), when the memory
/// controller is enabled for it.
pub fn memory_current(cgroup: &Path) -> Option<u64> {
    fs::read_to_string(cgroup.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn is_frozen(cgroup: &Path) -> Result<bool, Error> {
    let file = cgroup.join("cgroup.events");
    let text = fs::read_to_string(&file).map_err(io(&file))?;
    Ok(text.lines().any(|l| l.trim() == "frozen 1"))
}

/// Freezes the cgroup and waits until every task in it has stopped.
pub fn freeze(cgroup: &Path, timeout: Duration) -> Result<(), Error> {
    let file = cgroup.join("cgroup.freeze");
    fs::write(&file, "1").map_err(io(&file))?;
    let start = Instant::now();
    while !is_frozen(cgroup)? {
        if start.elapsed() > timeout {
            return Err(Error::FreezeTimeout {
                path: cgroup.to_path_buf(),
                ms: timeout.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

pub fn thaw(cgroup: &Path) -> Result<(), Error> {
    let file = cgroup.join("cgroup.freeze");
    fs::write(&file, "0").map_err(io(&file))
}

/// The cgroup of `pid` as `proc` shows it, absolute under the cgroup2 `root`.
pub fn of_pid(proc: &Proc, pid: i32, root: &Path) -> Option<PathBuf> {
    Some(root.join(proc.cgroup(pid)?.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procs_include_child_cgroups() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("cgroup.procs"), "12\n5\n").unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("sub/cgroup.procs"), "7\n").unwrap();
        assert_eq!(procs(d.path()).unwrap(), vec![5, 7, 12]);
    }

    #[test]
    fn the_cgroup_of_a_pid_is_its_v2_line_under_the_root() {
        let fake = crate::proc::fake::FakeProc::new();
        fake.add(crate::proc::fake::Process::new(40, "w"));
        fs::write(
            fake.path().join("40/cgroup"),
            "1:name=systemd:/old\n0::/kupgrade/w\n",
        )
        .unwrap();
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            of_pid(&fake.proc(), 40, root),
            Some(PathBuf::from("/sys/fs/cgroup/kupgrade/w"))
        );
        assert_eq!(of_pid(&fake.proc(), 41, root), None);
    }

    #[test]
    fn freeze_waits_for_the_event_and_times_out_with_the_path() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let err = freeze(d.path(), Duration::from_millis(20)).unwrap_err();
        assert!(matches!(err, Error::FreezeTimeout { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(d.path().join("cgroup.freeze")).unwrap(),
            "1"
        );
        fs::write(d.path().join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        freeze(d.path(), Duration::from_millis(20)).unwrap();
        thaw(d.path()).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("cgroup.freeze")).unwrap(),
            "0"
        );
    }
}
