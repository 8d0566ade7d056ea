//! The workloads' runtime state on tmpfs mounts, which a new boot would not
//! have: the files they hold open or map, their pid files, their runtime
//! directories under `/run`, the directories of the unix sockets they bind
//! and the paths the config declares for them. [`plan`] finds them in a
//! `/proc` tree and its mount table; [`copy`] copies them, with owner, group,
//! mode and times, once the workloads are frozen. `kupgrade-init` mounts the
//! tmpfs mounts again and unpacks the copies before CRIU runs.
//!
//! What belongs to the rest of the system stays behind: a runtime directory
//! is one named after the workload or one of its programs (never one of the
//! init system's, see [`SYSTEM_RUN_DIRS`]), a pid file is one whose name
//! ends in `pid` and that holds the pid of one of the workload's processes.
//!
//! A file a workload holds is read through `/proc/PID/fd/N` or
//! `/proc/PID/map_files/RANGE`, the very file it holds, never by opening its
//! path again as root, and that path must still name the same file (device
//! and inode): else a user could swap the path for a symlink between the
//! kernel naming it and kupgrade opening it, and have a root-only file
//! copied into the image and handed back to the workload. Files found by
//! path are opened with `O_NOFOLLOW` and checked the same way.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use contract::devstate::TmpfsMount;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::proc::{socket_inode, Proc};
use crate::workload::Workload;

/// Directories under `/run` that the init system and the kernel's helpers
/// own, whatever a workload is called.
pub const SYSTEM_RUN_DIRS: &[&str] = &[
    "credentials",
    "initramfs",
    "kupgrade",
    "kupgrade-restore",
    "lock",
    "log",
    "mount",
    "netns",
    "shm",
    "systemd",
    "udev",
    "user",
];

/// Never carried, nor anything below: CRIU's cache of this kernel's
/// features, which it trusts on magic numbers alone and would take for the
/// new kernel's, and kupgrade's own state of this boot.
const NEVER_CARRIED: &[&str] = &[
    "/run/criu.kdat",
    crate::config::RUN_DIR,
    "/run/kupgrade-restore",
];

/// A pid file holds a pid and a newline, maybe some blanks.
const PID_FILE_MAX: u64 = 32;
/// How deep and how wide the search for pid files goes in each tmpfs.
const PID_FILE_DEPTH: usize = 4;
const PID_FILE_ENTRIES: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the copy of {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} no longer names the file the workload holds (it was moved or replaced while kupgrade copied it); run kupgrade go again", path.display())]
    Changed { path: PathBuf },
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub path: String,
    pub fstype: String,
    /// The superblock's options, without `rw`/`ro`.
    pub options: String,
}

impl Mount {
    pub fn is_tmpfs(&self) -> bool {
        self.fstype == "tmpfs"
    }

    fn holds(&self, path: &str) -> bool {
        let root = self.path.trim_end_matches('/');
        path == self.path || root.is_empty() || path.starts_with(&format!("{root}/"))
    }
}

/// Every mount, in the order they were mounted (parents first).
pub fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            let _source = r.next()?;
            let super_opts = r.next().unwrap_or("");
            let path = left.split_whitespace().nth(4)?;
            Some(Mount {
                path: unescape_mount_path(path),
                fstype: fstype.to_string(),
                options: super_opts
                    .split(',')
                    .filter(|o| *o != "rw" && *o != "ro")
                    .collect::<Vec<_>>()
                    .join(","),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(p: &str) -> String {
    p.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The mount `path` is on: the deepest one holding it, the last mounted of
/// those at the same place (the one that hides the others).
pub fn mount_of<'a>(path: &str, mounts: &'a [Mount]) -> Option<&'a Mount> {
    mounts
        .iter()
        .filter(|m| m.holds(path))
        .max_by_key(|m| m.path.trim_end_matches('/').len())
}

/// Where the content of a file to carry comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    /// A descriptor a workload holds.
    Fd { pid: i32, fd: i32 },
    /// A mapping a workload has.
    Mapped { pid: i32, range: String },
    /// The path itself, opened without following a symlink.
    Path,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Item {
    path: PathBuf,
    source: Source,
    /// A directory with all it holds, rather than the directory alone.
    tree: bool,
}

/// What [`copy`] carries, and the tmpfs mounts to mount again for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In mount order, with the tmpfs mounts above them: a tmpfs mounted
    /// later on a parent would hide them.
    pub mounts: Vec<TmpfsMount>,
    items: Vec<Item>,
}

impl Plan {
    /// The paths carried, sorted (the trees without what they hold).
    pub fn paths(&self) -> Vec<&Path> {
        self.items.iter().map(|i| i.path.as_path()).collect()
    }
}

/// Where to look besides `/proc`.
#[derive(Clone, Debug)]
pub struct Places<'a> {
    /// The runtime directory (`/run`), whose subdirectories named after a
    /// workload belong to it.
    pub run_dir: &'a Path,
    /// kupgrade's own scratch space, never carried.
    pub skip: &'a Path,
}

/// Finds the tmpfs state of `workloads`, as `proc` and its mount table show
/// it and the file tree holds it.
pub fn plan(proc: &Proc, workloads: &[Workload], places: &Places) -> Plan {
    let all = mounts(&proc.mountinfo());
    let carried = |p: &Path| -> bool {
        !p.starts_with(places.skip)
            && !NEVER_CARRIED.iter().any(|n| p.starts_with(n))
            && mount_of(&p.to_string_lossy(), &all).is_some_and(Mount::is_tmpfs)
    };
    let mut items = Vec::new();
    let mut add = |path: PathBuf, source: Source, tree: bool| {
        if is_plain_absolute(&path) && carried(&path) {
            items.push(Item { path, source, tree });
        }
    };
    for w in workloads {
        for &pid in &w.pids {
            for (fd, link) in proc.fds(pid) {
                // Deleted files are CRIU's business: it keeps their content.
                if !link.ends_with(" (deleted)") {
                    add(link.into(), Source::Fd { pid, fd }, false);
                }
            }
            for (range, path) in proc.mappings(pid) {
                if !path.ends_with(" (deleted)") {
                    add(path.into(), Source::Mapped { pid, range }, false);
                }
            }
        }
        for dir in socket_dirs(proc, &w.pids) {
            add(dir, Source::Path, false);
        }
        for dir in runtime_dirs(proc, w, places.run_dir) {
            add(dir, Source::Path, true);
        }
        for p in &w.runtime_paths {
            // The path's own symlinks are the file system's, carried or not.
            if let Ok(real) = fs::canonicalize(p) {
                add(real, Source::Path, true);
            }
        }
    }
    for m in all.iter().filter(|m| m.is_tmpfs()) {
        for path in pid_files(Path::new(&m.path), workloads) {
            add(path, Source::Path, false);
        }
    }
    // Descriptors first: what a workload holds wins over the same path
    // found again by name.
    items.sort_by(|a, b| {
        let by_name = |i: &Item| matches!(i.source, Source::Path);
        (&a.path, by_name(a)).cmp(&(&b.path, by_name(b)))
    });
    items.dedup_by(|later, first| later.path == first.path);
    Plan {
        mounts: mounts_for(&items, &all, places.run_dir),
        items,
    }
}

/// The tmpfs mounts holding `items` and the tmpfs mounts above those, in
/// mount order; and `run_dir` when it is a tmpfs, even with nothing carried
/// in it: the new boot's CRIU keeps its probe of the kernel's features there
/// (`criu.kdat`, only on a tmpfs), so that every `criu restore` after the
/// first skips the probe (0.3-0.5 s each under TCG). A distribution's
/// initramfs hands the real init a mounted `/run` just the same.
fn mounts_for(items: &[Item], all: &[Mount], run_dir: &Path) -> Vec<TmpfsMount> {
    let mut needed: Vec<&Mount> = all
        .iter()
        .filter(|m| m.is_tmpfs() && Path::new(&m.path) == run_dir)
        .collect();
    for i in items {
        let mut at = mount_of(&i.path.to_string_lossy(), all);
        while let Some(m) = at {
            if m.is_tmpfs() && !needed.contains(&m) {
                needed.push(m);
            }
            at = Path::new(&m.path)
                .parent()
                .and_then(|p| mount_of(&p.to_string_lossy(), all));
        }
    }
    all.iter()
        .filter(|m| needed.contains(m))
        .map(|m| TmpfsMount {
            path: m.path.clone(),
            options: m.options.clone(),
        })
        .collect()
}

/// An absolute path of plain names (what the kernel prints for an open
/// file, and nothing a crafted link could turn into `..`).
fn is_plain_absolute(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
}

/// The directories of the unix sockets `pids` have bound to a path.
fn socket_dirs(proc: &Proc, pids: &[i32]) -> Vec<PathBuf> {
    let held: HashSet<u64> = pids
        .iter()
        .flat_map(|&p| proc.fds(p))
        .filter_map(|(_, link)| socket_inode(&link))
        .collect();
    proc.unix_socket_paths()
        .into_iter()
        .filter(|(ino, _)| held.contains(ino))
        .filter_map(|(_, path)| {
            let dir = path?.parent()?.to_path_buf();
            // bind() followed the symlinks on the way; so does the restore.
            Some(fs::canonicalize(&dir).unwrap_or(dir))
        })
        .collect()
}

/// `RUN/NAME` for the workload's name and its programs' names, where that
/// is a directory (not a link) that the system does not own.
fn runtime_dirs(proc: &Proc, w: &Workload, run_dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<String> = vec![w.name.clone()];
    for &pid in &w.pids {
        names.push(proc.comm(pid));
        names.extend(proc.exe_name(pid));
    }
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| {
            !n.is_empty()
                && n != "."
                && n != ".."
                && !n.contains('/')
                && !SYSTEM_RUN_DIRS.contains(&n.as_str())
        })
        .map(|n| run_dir.join(n))
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()))
        .collect()
}

/// Pid files below `root` (on its file system only) that name a process
/// of one of `workloads` (its pids as the host sees them: not in a PID
/// namespace of its own).
fn pid_files(root: &Path, workloads: &[Workload]) -> Vec<PathBuf> {
    let Ok(top) = fs::symlink_metadata(root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut seen = 0;
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            seen += 1;
            if seen > PID_FILE_ENTRIES {
                return out;
            }
            let Ok(m) = e.metadata() else { continue };
            let path = e.path();
            if m.dev() != top.dev() {
                continue;
            }
            if m.is_dir() && depth + 1 < PID_FILE_DEPTH {
                stack.push((path, depth + 1));
                continue;
            }
            let named = e.file_name().to_string_lossy().ends_with("pid");
            if !m.is_file() || !named || m.len() > PID_FILE_MAX {
                continue;
            }
            let Some(pid) = read_pid(&path) else { continue };
            if workloads
                .iter()
                .any(|w| !w.pid_namespace && w.pids.contains(&pid))
            {
                out.push(path);
            }
        }
    }
    out
}

fn read_pid(path: &Path) -> Option<i32> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let mut text = String::new();
    io::Read::read_to_string(&mut io::Read::take(f, PID_FILE_MAX), &mut text).ok()?;
    text.trim().parse().ok().filter(|p| *p > 0)
}

/// Owner, mode and modification time of a copy.
#[derive(Clone, Copy, Debug)]
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: (i64, i64),
}

impl From<&Metadata> for Meta {
    fn from(m: &Metadata) -> Self {
        Meta {
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode() & 0o7777,
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
}

/// Copies what `plan` names below `dest` (at its absolute path there),
/// reading held files through `proc`. Returns whether anything was copied.
pub fn copy(proc: &Proc, plan: &Plan, dest: &Path) -> Result<bool, Error> {
    let mut c = Copier {
        dest,
        dirs: BTreeMap::new(),
        made: false,
        root: nix::unistd::geteuid().is_root(),
    };
    for item in &plan.items {
        c.item(proc, item)?;
    }
    let made = c.made;
    c.finish()?;
    Ok(made)
}

struct Copier<'a> {
    dest: &'a Path,
    /// Directories made, with the metadata to give them last (making their
    /// content changes their times; a read-only mode would stop it).
    dirs: BTreeMap<PathBuf, Meta>,
    /// Whether anything was copied.
    made: bool,
    /// Only root can give a copy its owner.
    root: bool,
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Read {
        path: path.into(),
        source,
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Write {
        path: path.into(),
        source,
    }
}

fn same_file(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

impl Copier<'_> {
    fn to(&self, path: &Path) -> PathBuf {
        self.dest.join(path.strip_prefix("/").unwrap_or(path))
    }

    fn item(&mut self, proc: &Proc, item: &Item) -> Result<(), Error> {
        let path = item.path.as_path();
        let Some(here) = self.parents(path)? else {
            return Ok(());
        };
        let via = match &item.source {
            Source::Fd { pid, fd } => proc.fd_path(*pid, *fd),
            Source::Mapped { pid, range } => proc.map_file_path(*pid, range),
            Source::Path => return self.by_path(path, &here, item.tree),
        };
        // Through the kernel's link to the file itself: no path is resolved.
        let Ok(held) = fs::metadata(&via) else {
            return Ok(());
        };
        if !same_file(&held, &here) {
            return Err(Error::Changed { path: path.into() });
        }
        if held.is_dir() {
            self.dir(path, &held)
        } else if held.is_file() {
            let f = open_quietly(&via, false).map_err(read_err(path))?;
            self.file(path, f)
        } else {
            // A FIFO or a device: the preflight refuses what cannot go.
            Ok(())
        }
    }

    /// Makes the copies of `path`'s parents, each a real directory at the
    /// source; returns `path`'s own metadata, `None` if it is gone.
    fn parents(&mut self, path: &Path) -> Result<Option<Metadata>, Error> {
        let mut at = PathBuf::from("/");
        for c in path.components().skip(1) {
            let m = match fs::symlink_metadata(&at) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(read_err(&at)(e)),
            };
            if !m.is_dir() {
                return Err(Error::Changed { path: path.into() });
            }
            // The root of the copy is ours: it keeps its own metadata.
            if at != Path::new("/") {
                self.dir(&at, &m)?;
            }
            at.push(c);
        }
        match fs::symlink_metadata(path) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_err(path)(e)),
        }
    }

    fn dir(&mut self, path: &Path, m: &Metadata) -> Result<(), Error> {
        if self.dirs.contains_key(path) {
            return Ok(());
        }
        let to = self.to(path);
        match fs::DirBuilder::new().mode(0o700).create(&to) {
            Ok(()) => self.made = true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && to.is_dir() => {}
            Err(e) => return Err(write_err(path)(e)),
        }
        self.dirs.insert(path.into(), Meta::from(m));
        Ok(())
    }

    /// A file, directory or tree found by its path.
    fn by_path(&mut self, path: &Path, m: &Metadata, tree: bool) -> Result<(), Error> {
        if m.is_dir() {
            self.dir(path, m)?;
            if tree {
                self.tree(path, m.dev())?;
            }
            Ok(())
        } else if m.is_file() {
            self.file_by_path(path, m)
        } else if m.file_type().is_symlink() && tree {
            self.symlink(path, m)
        } else {
            Ok(())
        }
    }

    fn file_by_path(&mut self, path: &Path, m: &Metadata) -> Result<(), Error> {
        let f = match open_quietly(path, true) {
            Ok(f) => f,
            // Gone, or replaced by a link since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                return Err(Error::Changed { path: path.into() })
            }
            Err(e) => return Err(read_err(path)(e)),
        };
        let opened = f.metadata().map_err(read_err(path))?;
        if !same_file(&opened, m) || !opened.is_file() {
            return Err(Error::Changed { path: path.into() });
        }
        self.file(path, f)
    }

    /// All a directory holds, on its own file system.
    fn tree(&mut self, dir: &Path, dev: u64) -> Result<(), Error> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(read_err(dir))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            let path = dir.join(n);
            let Ok(m) = fs::symlink_metadata(&path) else {
                continue;
            };
            if m.dev() == dev {
                self.by_path(&path, &m, true)?;
            }
        }
        Ok(())
    }

    fn symlink(&mut self, path: &Path, m: &Metadata) -> Result<(), Error> {
        let to = self.to(path);
        if fs::symlink_metadata(&to).is_ok() {
            return Ok(());
        }
        let target = fs::read_link(path).map_err(read_err(path))?;
        std::os::unix::fs::symlink(&target, &to).map_err(write_err(path))?;
        self.made = true;
        let meta = Meta::from(m);
        if self.root {
            std::os::unix::fs::lchown(&to, Some(meta.uid), Some(meta.gid))
                .map_err(write_err(path))?;
        }
        set_mtime(&to, meta.mtime).map_err(write_err(path))
    }

    /// Copies an opened file; the first copy of a path wins.
    fn file(&mut self, path: &Path, mut from: File) -> Result<(), Error> {
        let to = self.to(path);
        let m = from.metadata().map_err(read_err(path))?;
        let mut out = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&to)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(write_err(path)(e)),
        };
        self.made = true;
        io::copy(&mut from, &mut out).map_err(read_err(path))?;
        let meta = Meta::from(&m);
        if self.root {
            std::os::unix::fs::fchown(&out, Some(meta.uid), Some(meta.gid))
                .map_err(write_err(path))?;
        }
        // After chown, which clears the set-user-ID bits.
        out.set_permissions(fs::Permissions::from_mode(meta.mode))
            .map_err(write_err(path))?;
        set_mtime(&to, meta.mtime).map_err(write_err(path))
    }

    /// Gives the directories their owner, mode and time, deepest first.
    fn finish(self) -> Result<(), Error> {
        for (path, meta) in self.dirs.iter().rev() {
            let to = self.to(path);
            if self.root {
                std::os::unix::fs::lchown(&to, Some(meta.uid), Some(meta.gid))
                    .map_err(write_err(path))?;
            }
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode))
                .map_err(write_err(path))?;
            set_mtime(&to, meta.mtime).map_err(write_err(path))?;
        }
        Ok(())
    }
}

/// Opens for reading without blocking on a FIFO or taking a terminal;
/// `no_follow` refuses a symlink as the last component.
fn open_quietly(path: &Path, no_follow: bool) -> io::Result<File> {
    let mut flags = nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY;
    if no_follow {
        flags |= nix::libc::O_NOFOLLOW;
    }
    OpenOptions::new().read(true).custom_flags(flags).open(path)
}

fn set_mtime(path: &Path, (s, ns): (i64, i64)) -> io::Result<()> {
    utimensat(
        None,
        path,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::new(s, ns.clamp(0, 999_999_999)),
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::fake::{FakeProc, Process};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::symlink;
    use std::time::{Duration, UNIX_EPOCH};

    fn mountinfo(tmpfs: &[&Path]) -> String {
        let mut s = String::from("22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n");
        for (i, p) in tmpfs.iter().enumerate() {
            s.push_str(&format!(
                "{} 22 0:{} / {} rw,nosuid - tmpfs tmpfs rw,size=1024k,mode=755\n",
                30 + i,
                40 + i,
                p.display()
            ));
        }
        s
    }

    fn workload(pids: &[i32]) -> Workload {
        Workload {
            name: "w".into(),
            root_pid: pids[0],
            pids: pids.to_vec(),
            ..Workload::default()
        }
    }

    fn meta(p: &Path) -> Metadata {
        fs::symlink_metadata(p).unwrap()
    }

    fn write(p: &Path, text: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    /// The copy of `p` below `dest`.
    fn copy_of(dest: &Path, p: &Path) -> PathBuf {
        dest.join(p.strip_prefix("/").unwrap())
    }

    #[test]
    fn mounts_come_from_mountinfo_with_their_options() {
        let mi = "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                  25 22 0:21 / /run rw,nosuid,nodev - tmpfs tmpfs rw,size=100k,mode=755\n\
                  26 25 0:22 / /run/my\\040dir rw - tmpfs tmpfs rw,mode=700\n\
                  27 22 0:6 / /dev rw - devtmpfs udev rw,mode=755\n\
                  28 27 0:23 / /dev/shm rw - tmpfs tmpfs rw,size=10k\n\
                  29 27 0:24 / /dev/pts rw - devpts devpts rw,gid=5,mode=620\n\
                  30 27 0:25 / /dev/shm rw - tmpfs tmpfs rw,size=20k\n";
        let m = mounts(mi);
        assert_eq!(m.len(), 7);
        assert_eq!(
            m[1],
            Mount {
                path: "/run".into(),
                fstype: "tmpfs".into(),
                options: "size=100k,mode=755".into()
            }
        );
        assert_eq!(m[2].path, "/run/my dir");
        let on = |p: &str| mount_of(p, &m).map(|m| (m.path.as_str(), m.options.as_str()));
        assert_eq!(on("/run/my dir/x"), Some(("/run/my dir", "mode=700")));
        assert_eq!(on("/run/x"), Some(("/run", "size=100k,mode=755")));
        assert_eq!(on("/running").map(|m| m.0), Some("/"));
        // A devpts under a devtmpfs is neither; of two tmpfs mounted at the
        // same place, the later hides the earlier.
        assert_eq!(mount_of("/dev/pts/3", &m).unwrap().fstype, "devpts");
        assert_eq!(on("/dev/shm/seg"), Some(("/dev/shm", "size=20k")));
    }

    #[test]
    fn tmpfs_mounts_come_with_those_above_them_in_mount_order() {
        let all = mounts(
            "22 1 254:0 / / rw - ext4 /dev/vda rw\n\
             24 22 0:6 / /dev rw - devtmpfs udev rw\n\
             25 24 0:21 / /dev/shm rw - tmpfs tmpfs rw,mode=1777\n\
             26 22 0:22 / /run rw - tmpfs tmpfs rw,mode=755\n\
             27 26 0:23 / /run/user/1000 rw - tmpfs tmpfs rw,mode=700,uid=1000\n\
             28 22 0:24 / /tmp rw - tmpfs tmpfs rw,mode=1777\n",
        );
        // Sorted by path, the nested mount's file comes first.
        let items = ["/dev/shm/a", "/run/user/1000/b"].map(|p| Item {
            path: p.into(),
            source: Source::Path,
            tree: false,
        });
        let paths = |items: &[Item], run_dir: &str| -> Vec<String> {
            mounts_for(items, &all, Path::new(run_dir))
                .into_iter()
                .map(|m| format!("{} {}", m.path, m.options))
                .collect()
        };
        assert_eq!(
            paths(&items, "/run"),
            [
                "/dev/shm mode=1777",
                "/run mode=755",
                "/run/user/1000 mode=700,uid=1000"
            ]
        );
        // The runtime directory's tmpfs comes with nothing carried in it
        // (CRIU's probe cache of the new boot goes there); another does not.
        assert_eq!(paths(&[], "/run"), ["/run mode=755"]);
        assert!(paths(&[], "/tmp/nothing").is_empty());
        assert_eq!(paths(&items[..1], "/srv"), ["/dev/shm mode=1777"]);
    }

    #[test]
    fn what_no_workload_owns_or_no_one_may_carry_is_left() {
        let fake = FakeProc::new();
        fake.mountinfo(&mountinfo(&[Path::new("/run")]));
        fake.add(
            Process::new(100, "server")
                .fd(3, "/run/criu.kdat")
                .fd(4, "/run/gone (deleted)")
                .fd(5, "/run/kupgrade/tmpfs/x")
                .fd(6, "/run/../etc/shadow")
                .fd(7, "/etc/hostname"),
        );
        let places = Places {
            run_dir: Path::new("/nonexistent/run"),
            skip: Path::new("/run/kupgrade"),
        };
        let plan = plan(&fake.proc(), &[workload(&[100])], &places);
        assert_eq!(plan, Plan::default());
    }

    /// What a workload holds on a tmpfs comes through with its owner, its
    /// mode, its time and its directories'.
    #[test]
    fn held_files_are_copied_with_their_owner_mode_and_times() {
        let tmpfs = tempfile::tempdir().unwrap();
        let dir = tmpfs.path().join("app");
        let data = dir.join("data");
        write(&data, "state");
        fs::set_permissions(&data, fs::Permissions::from_mode(0o640)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o710)).unwrap();
        let when = UNIX_EPOCH + Duration::new(1_600_000_000, 5);
        File::open(&data).unwrap().set_modified(when).unwrap();
        let root = nix::unistd::geteuid().is_root();
        if root {
            std::os::unix::fs::chown(&data, Some(1234), Some(5678)).unwrap();
            std::os::unix::fs::chown(&dir, Some(1234), Some(1234)).unwrap();
        }
        let fake = FakeProc::new();
        fake.mountinfo(&mountinfo(&[tmpfs.path()]));
        fake.add(Process::new(100, "server").fd(3, &data.to_string_lossy()));
        let places = Places {
            run_dir: Path::new("/nonexistent/run"),
            skip: Path::new("/run/kupgrade"),
        };
        let plan = plan(&fake.proc(), &[workload(&[100])], &places);
        assert_eq!(plan.paths(), [data.as_path()]);
        assert_eq!(plan.mounts.len(), 1);
        assert_eq!(plan.mounts[0].path, tmpfs.path().to_string_lossy());
        let dest = tempfile::tempdir().unwrap();
        assert!(copy(&fake.proc(), &plan, dest.path()).unwrap());
        let (c, d) = (copy_of(dest.path(), &data), copy_of(dest.path(), &dir));
        assert_eq!(fs::read_to_string(&c).unwrap(), "state");
        assert_eq!(meta(&c).mode() & 0o7777, 0o640);
        assert_eq!(meta(&d).mode() & 0o7777, 0o710);
        assert_eq!(meta(&c).modified().unwrap(), when);
        assert_eq!(meta(&d).modified().unwrap(), meta(&dir).modified().unwrap());
        let owner = |m: Metadata| (m.uid(), m.gid());
        assert_eq!(owner(meta(&c)), owner(meta(&data)));
        assert_eq!(owner(meta(&d)), owner(meta(&dir)));
        if root {
            assert_eq!(owner(meta(&c)), (1234, 5678));
        }
    }

    /// A held file is read through the kernel's link to it; a path that no
    /// longer names it stops the copy, and nothing is read through a link
    /// put in its place.
    #[test]
    fn a_held_file_whose_path_was_swapped_for_a_link_is_not_read_through_it() {
        let tmpfs = tempfile::tempdir().unwrap();
        let secret = tmpfs.path().join("secret");
        write(&secret, "root only");
        let held = tmpfs.path().join("held");
        write(&held, "mine");
        let f = File::open(&held).unwrap();
        let me = std::process::id() as i32;
        let proc = Proc::host();
        let item = |path: &Path, source: Source| Plan {
            mounts: vec![],
            items: vec![Item {
                path: path.into(),
                source,
                tree: false,
            }],
        };
        let fd = Source::Fd {
            pid: me,
            fd: f.as_raw_fd(),
        };
        // Through /proc/self/fd, as it is.
        let dest = tempfile::tempdir().unwrap();
        copy(&proc, &item(&held, fd.clone()), dest.path()).unwrap();
        assert_eq!(
            fs::read_to_string(copy_of(dest.path(), &held)).unwrap(),
            "mine"
        );
        // Moved away, and a link to the secret put at its path.
        fs::rename(&held, tmpfs.path().join("moved")).unwrap();
        symlink(&secret, &held).unwrap();
        let dest = tempfile::tempdir().unwrap();
        match copy(&proc, &item(&held, fd), dest.path()) {
            Err(Error::Changed { path }) => assert_eq!(path, held),
            other => panic!("{other:?}"),
        }
        // Found by its name, the link is not followed either.
        let dest = tempfile::tempdir().unwrap();
        copy(&proc, &item(&held, Source::Path), dest.path()).unwrap();
        assert!(fs::symlink_metadata(copy_of(dest.path(), &held)).is_err());
    }

    /// A mapped file is read through `/proc/PID/map_files` (root only): here
    /// the test program's own mapping of itself.
    #[test]
    fn a_mapped_file_is_read_through_map_files() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: map_files needs root");
            return;
        }
        let me = std::process::id() as i32;
        let proc = Proc::host();
        let exe = fs::read_link("/proc/self/exe").unwrap();
        let (range, path) = proc
            .mappings(me)
            .into_iter()
            .find(|(_, p)| Path::new(p) == exe)
            .unwrap();
        let plan = Plan {
            mounts: vec![],
            items: vec![Item {
                path: path.into(),
                source: Source::Mapped { pid: me, range },
                tree: false,
            }],
        };
        let dest = tempfile::tempdir().unwrap();
        assert!(copy(&proc, &plan, dest.path()).unwrap());
        assert_eq!(meta(&copy_of(dest.path(), &exe)).len(), meta(&exe).len());
    }

    /// Pid files naming a member, runtime directories named after the
    /// workload's programs, its sockets' directories and its declared paths
    /// are carried, and a tmpfs that only a socket uses is mounted again;
    /// nothing else is.
    #[test]
    fn a_workloads_runtime_state_is_carried_and_the_systems_is_not() {
        let run = tempfile::tempdir().unwrap();
        let sockets = tempfile::tempdir().unwrap();
        let r = |p: &str| run.path().join(p);
        write(&r("w.pid"), "100\n");
        write(&r("other.pid"), "555\n");
        write(&r("counter"), "100\n");
        write(&r("deep/er/w2.pid"), "101");
        write(&r("kupgrade/w.pid"), "100\n");
        write(&r("server/state"), "s");
        write(&r("server/sub/x"), "x");
        symlink("state", r("server/link")).unwrap();
        write(&r("serverd/cache"), "c");
        write(&r("systemd/units"), "u");
        write(&r("unrelated/file"), "f");
        write(&r("decl/conf"), "d");
        write(&r("sock/dir/not-ours"), "n");
        fs::create_dir_all(sockets.path().join("only")).unwrap();
        fs::set_permissions(
            sockets.path().join("only"),
            fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        let fake = FakeProc::new();
        fake.mountinfo(&mountinfo(&[run.path(), sockets.path()]));
        fake.add(
            Process::new(100, "server")
                .exe("/usr/sbin/serverd")
                .fd(4, "socket:[700]")
                .fd(5, "socket:[701]"),
        );
        fake.add(Process::new(101, "systemd").parent(100));
        let sock_a = r("sock/dir/app.sock");
        let sock_b = sockets.path().join("only/app.sock");
        fake.unix(&[
            (700, &sock_a.to_string_lossy()),
            (701, &sock_b.to_string_lossy()),
            (702, &r("unrelated/x.sock").to_string_lossy()),
        ]);
        let w = Workload {
            runtime_paths: vec![r("decl"), r("missing")],
            ..workload(&[100, 101])
        };
        let skip = r("kupgrade");
        let places = Places {
            run_dir: run.path(),
            skip: &skip,
        };
        let plan = plan(&fake.proc(), &[w], &places);
        let mut want = vec![
            r("w.pid"),
            r("deep/er/w2.pid"),
            r("server"),
            r("serverd"),
            r("sock/dir"),
            r("decl"),
            sockets.path().join("only"),
        ];
        want.sort();
        assert_eq!(plan.paths(), want);
        let mounts: Vec<String> = plan.mounts.iter().map(|m| m.path.clone()).collect();
        assert_eq!(
            mounts,
            [run.path(), sockets.path()].map(|p| p.to_string_lossy().into_owned())
        );
        let dest = tempfile::tempdir().unwrap();
        assert!(copy(&fake.proc(), &plan, dest.path()).unwrap());
        let copied = |p: &Path| fs::symlink_metadata(copy_of(dest.path(), p)).is_ok();
        for p in [
            "w.pid",
            "deep/er/w2.pid",
            "server/state",
            "server/sub/x",
            "server/link",
            "serverd/cache",
            "sock/dir",
            "decl/conf",
        ] {
            assert!(copied(&r(p)), "{p} was not copied");
        }
        for p in [
            "other.pid",
            "counter",
            "kupgrade",
            "systemd",
            "unrelated",
            "sock/dir/not-ours",
            "missing",
        ] {
            assert!(!copied(&r(p)), "{p} was copied");
        }
        assert_eq!(
            fs::read_link(copy_of(dest.path(), &r("server/link"))).unwrap(),
            Path::new("state")
        );
        let only = copy_of(dest.path(), &sockets.path().join("only"));
        assert_eq!(meta(&only).mode() & 0o7777, 0o750);
        assert!(fs::read_dir(only).unwrap().next().is_none());
    }
}
