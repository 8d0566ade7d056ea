//! File trees as a record stream (format in [`crate::format`]): written
//! from a directory, extracted under a destination that no record can
//! escape.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use zerocopy::{FromBytes, IntoBytes};

use crate::decode::SectionStream;
use crate::encode::ChunkSink;
use crate::error::Error;
use crate::format::*;

/// A transparent huge page on x86-64: files at least this large are sized
/// before they are written.
const HUGE_PAGE: u64 = 2 << 20;

fn kind_name(ft: &fs::FileType) -> &'static str {
    if ft.is_socket() {
        "socket"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

fn header(kind: u8, m: &fs::Metadata, path_len: u16) -> RecordHeader {
    RecordHeader {
        kind,
        mode: (m.mode() & 0o7777).into(),
        uid: m.uid().into(),
        gid: m.gid().into(),
        mtime_s: m.mtime().into(),
        mtime_ns: (m.mtime_nsec().clamp(0, 999_999_999) as u32).into(),
        path_len: path_len.into(),
    }
}

/// Serialises the tree under `root`: depth first, the entries of each
/// directory in byte order (so the same tree gives the same bytes), each
/// directory's record before its content.
pub(crate) fn write_tree(root: &Path, sink: &mut ChunkSink<'_, '_>) -> Result<(), Error> {
    let meta = fs::symlink_metadata(root).map_err(Error::io(format!("read {}", root.display())))?;
    if !meta.is_dir() {
        return Err(Error::UnsupportedFile {
            path: root.display().to_string(),
            kind: if meta.is_file() {
                "regular file as a tree's root"
            } else {
                kind_name(&meta.file_type())
            },
        });
    }
    // Relative paths of the directories still to walk, popped in order.
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let list_err = Error::io(format!("list {}", dir.display()));
        let mut names = fs::read_dir(&dir)
            .and_then(|d| {
                d.map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()
            })
            .map_err(list_err)?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut subdirs = Vec::new();
        for name in names {
            let child = rel.join(&name);
            let path = root.join(&child);
            let child_bytes = child.as_os_str().as_bytes();
            let Ok(path_len) = u16::try_from(child_bytes.len()) else {
                return Err(Error::UnsupportedFile {
                    path: path.display().to_string(),
                    kind: "path longer than 65535 bytes",
                });
            };
            let m = fs::symlink_metadata(&path)
                .map_err(Error::io(format!("read {}", path.display())))?;
            let ft = m.file_type();
            if ft.is_dir() {
                sink.write(header(REC_DIR, &m, path_len).as_bytes())?;
                sink.write(child_bytes)?;
                subdirs.push(child);
            } else if ft.is_file() {
                let mut f =
                    File::open(&path).map_err(Error::io(format!("open {}", path.display())))?;
                sink.write(header(REC_FILE, &m, path_len).as_bytes())?;
                sink.write(child_bytes)?;
                // Exactly the size announced, even if the file grows.
                sink.write(&m.len().to_le_bytes())?;
                sink.read_from(&mut f, m.len(), &path)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&path)
                    .map_err(Error::io(format!("read the link {}", path.display())))?;
                let target = target.as_os_str().as_bytes();
                let Ok(target_len) = u16::try_from(target.len()) else {
                    return Err(Error::UnsupportedFile {
                        path: path.display().to_string(),
                        kind: "symlink longer than 65535 bytes",
                    });
                };
                sink.write(header(REC_SYMLINK, &m, path_len).as_bytes())?;
                sink.write(child_bytes)?;
                sink.write(&target_len.to_le_bytes())?;
                sink.write(target)?;
            } else {
                return Err(Error::UnsupportedFile {
                    path: path.display().to_string(),
                    kind: kind_name(&ft),
                });
            }
        }
        // Reversed, so that the stack pops them in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    sink.write(&[REC_END])
}

/// A relative path made of plain names only: no `..`, no root, no `.`,
/// nothing empty, no NUL.
fn checked_relative(bytes: &[u8]) -> Option<&Path> {
    if bytes.is_empty() || bytes.contains(&0) || bytes.starts_with(b"/") {
        return None;
    }
    let p = Path::new(OsStr::from_bytes(bytes));
    let plain = bytes
        .split(|&b| b == b'/')
        .all(|part| !part.is_empty() && part != b"." && part != b"..");
    (plain && p.components().all(|c| matches!(c, Component::Normal(_)))).then_some(p)
}

fn system_time(s: i64, ns: u32) -> Option<SystemTime> {
    let ns = Duration::from_nanos(u64::from(ns.min(999_999_999)));
    if s >= 0 {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(s as u64))?
            .checked_add(ns)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(s.unsigned_abs()))?
            .checked_add(ns)
    }
}

/// Metadata applied once a directory's content is in place (creating files
/// in it changes its mtime; a read-only mode would stop them).
struct DirFixup {
    path: PathBuf,
    h: RecordHeader,
}

struct Extractor<'d> {
    section: String,
    dest: &'d Path,
    /// Symlinks this extraction made (relative): never written through.
    links: HashSet<PathBuf>,
    fixups: Vec<DirFixup>,
    root: bool,
}

impl Extractor<'_> {
    fn record_err(&self, offset: u64, detail: impl Into<String>) -> Error {
        Error::TreeRecord {
            section: self.section.clone(),
            offset,
            detail: detail.into(),
        }
    }

    fn escapes(&self, rel: &[u8]) -> Error {
        Error::PathEscapes {
            section: self.section.clone(),
            path: String::from_utf8_lossy(rel).into_owned(),
        }
    }

    /// Refuses a path that would go through a symlink this extraction made
    /// (`a -> /etc` then `a/passwd`); with `itself`, the path itself too.
    fn check_links(&self, rel: &Path, raw: &[u8], itself: bool) -> Result<(), Error> {
        let mut parents = rel.ancestors().skip(if itself { 0 } else { 1 });
        if parents.any(|a| !a.as_os_str().is_empty() && self.links.contains(a)) {
            return Err(self.escapes(raw));
        }
        Ok(())
    }

    fn owner_and_times(
        &self,
        path: &Path,
        h: &RecordHeader,
        file: Option<&File>,
    ) -> Result<(), Error> {
        let err = Error::io(format!("set the owner, mode or time of {}", path.display()));
        if self.root {
            let (uid, gid) = (Some(h.uid.get()), Some(h.gid.get()));
            match file {
                Some(f) => std::os::unix::fs::fchown(f, uid, gid),
                None => std::os::unix::fs::lchown(path, uid, gid),
            }
            .map_err(err)?;
        }
        let err = Error::io(format!("set the mode or time of {}", path.display()));
        match file {
            Some(f) => {
                // After chown, which clears set-user-ID bits.
                f.set_permissions(fs::Permissions::from_mode(h.mode.get() & 0o7777))
                    .map_err(err)?;
                if let Some(t) = system_time(h.mtime_s.get(), h.mtime_ns.get()) {
                    f.set_modified(t)
                        .map_err(Error::io(format!("set the time of {}", path.display())))?;
                }
            }
            None => {
                let is_link = h.kind == REC_SYMLINK;
                if !is_link {
                    fs::set_permissions(path, fs::Permissions::from_mode(h.mode.get() & 0o7777))
                        .map_err(err)?;
                }
                let mtime = TimeSpec::new(
                    h.mtime_s.get(),
                    i64::from(h.mtime_ns.get().min(999_999_999)),
                );
                utimensat(
                    None,
                    path,
                    &TimeSpec::UTIME_OMIT,
                    &mtime,
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(|e| Error::Io {
                    what: format!("set the time of {}", path.display()),
                    source: io::Error::from(e),
                })?;
            }
        }
        Ok(())
    }

    /// Makes room for a non-directory at `path`: removes a file or link
    /// there (never writes through it); refuses to replace a directory.
    fn clear(&self, path: &Path) -> Result<(), Error> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => Err(Error::Io {
                what: format!("replace {}", path.display()),
                source: io::Error::new(ErrorKind::AlreadyExists, "a directory is in the way"),
            }),
            Ok(_) => {
                fs::remove_file(path).map_err(Error::io(format!("replace {}", path.display())))
            }
            Err(_) => Ok(()),
        }
    }

    fn parent_dirs(&self, path: &Path) -> Result<(), Error> {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => {
                fs::create_dir_all(p).map_err(Error::io(format!("create {}", p.display())))
            }
            _ => Ok(()),
        }
    }

    fn dir(&mut self, rel: &Path, h: RecordHeader) -> Result<(), Error> {
        let path = self.dest.join(rel);
        // Whatever is there already keeps its mode and owner: `/dev/shm`
        // stays world-writable when an image holds a file in it.
        if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        self.parent_dirs(&path)?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(Error::io(format!("create {}", path.display())))?;
        self.fixups.push(DirFixup { path, h });
        Ok(())
    }

    fn file(
        &mut self,
        st: &mut SectionStream<'_>,
        rel: &Path,
        raw: &[u8],
        h: RecordHeader,
        at: u64,
    ) -> Result<(), Error> {
        let mut size = [0u8; 8];
        if !st.read_exact(&mut size)? {
            return Err(self.record_err(at, "the stream ends inside a file record"));
        }
        let size = u64::from_le_bytes(size);
        if size > st.remaining() {
            return Err(self.record_err(
                at,
                format!(
                    "{} claims {size} bytes, more than the section holds",
                    String::from_utf8_lossy(raw)
                ),
            ));
        }
        let path = self.dest.join(rel);
        self.parent_dirs(&path)?;
        self.clear(&path)?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(Error::io(format!("create {}", path.display())))?;
        // Sized before it is written: a tmpfs mounted `huge=within_size`
        // then backs it with 2 MiB pages, one allocation where 512 were.
        if size >= HUGE_PAGE {
            f.set_len(size)
                .map_err(Error::io(format!("size {}", path.display())))?;
        }
        let copied = st.copy_to_file(&mut f, size, &path)?;
        if copied != size {
            return Err(
                self.record_err(at, format!("{} is cut short", String::from_utf8_lossy(raw)))
            );
        }
        self.owner_and_times(&path, &h, Some(&f))
    }

    fn symlink(
        &mut self,
        st: &mut SectionStream<'_>,
        rel: &Path,
        h: RecordHeader,
        at: u64,
    ) -> Result<(), Error> {
        let mut len = [0u8; 2];
        if !st.read_exact(&mut len)? {
            return Err(self.record_err(at, "the stream ends inside a symlink record"));
        }
        let mut target = vec![0u8; usize::from(u16::from_le_bytes(len))];
        if !st.read_exact(&mut target)? {
            return Err(self.record_err(at, "the stream ends inside a symlink record"));
        }
        if target.is_empty() || target.contains(&0) {
            return Err(self.record_err(at, "a symlink has an empty target or a NUL in it"));
        }
        let path = self.dest.join(rel);
        self.parent_dirs(&path)?;
        self.clear(&path)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
            .map_err(Error::io(format!("create the link {}", path.display())))?;
        self.links.insert(rel.to_path_buf());
        self.owner_and_times(&path, &h, None)
    }
}

/// Recreates the tree of `section` under `dest`.
pub(crate) fn extract(st: &mut SectionStream<'_>, section: &str, dest: &Path) -> Result<(), Error> {
    fs::create_dir_all(dest).map_err(Error::io(format!("create {}", dest.display())))?;
    let mut x = Extractor {
        section: section.to_string(),
        dest,
        links: HashSet::new(),
        fixups: Vec::new(),
        root: nix::unistd::geteuid().is_root(),
    };
    let mut path_buf = Vec::new();
    loop {
        let at = st.offset();
        let mut kind = [0u8; 1];
        if !st.read_exact(&mut kind)? {
            return Err(x.record_err(at, "the stream ends before its end record"));
        }
        if kind[0] == REC_END {
            break;
        }
        let mut hb = [0u8; RECORD_HEADER_LEN];
        hb[0] = kind[0];
        if !st.read_exact(&mut hb[1..])? {
            return Err(x.record_err(at, "the stream ends inside a record"));
        }
        let h = RecordHeader::read_from_bytes(&hb)
            .map_err(|_| x.record_err(at, "unreadable record header"))?;
        path_buf.resize(usize::from(h.path_len.get()), 0);
        if !st.read_exact(&mut path_buf)? {
            return Err(x.record_err(at, "the stream ends inside a path"));
        }
        let raw = path_buf.clone();
        let rel = checked_relative(&raw).ok_or_else(|| x.escapes(&raw))?;
        match h.kind {
            REC_DIR => {
                x.check_links(rel, &raw, true)?;
                x.dir(rel, h)?;
            }
            REC_FILE => {
                x.check_links(rel, &raw, false)?;
                x.file(st, rel, &raw, h, at)?;
            }
            REC_SYMLINK => {
                x.check_links(rel, &raw, false)?;
                x.symlink(st, rel, h, at)?;
            }
            other => return Err(x.record_err(at, format!("unknown record kind {other}"))),
        }
    }
    let at = st.offset();
    if !st.at_end()? {
        return Err(x.record_err(at, "bytes follow the end record"));
    }
    // Deepest first: a parent's mtime is set after its children's.
    for d in std::mem::take(&mut x.fixups).into_iter().rev() {
        x.owner_and_times(&d.path, &d.h, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_pass() {
        for ok in ["a", "a/b", "a b/.c", "..a", "a..", "dir/file.txt"] {
            assert!(checked_relative(ok.as_bytes()).is_some(), "{ok}");
        }
        for bad in [
            "",
            "/",
            "/etc/passwd",
            "..",
            "a/../../b",
            "a/..",
            "./a",
            "a/./b",
            "a//b",
            "a/",
            "a\0b",
        ] {
            assert!(checked_relative(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn times_before_and_after_the_epoch() {
        assert_eq!(
            system_time(0, 5),
            Some(UNIX_EPOCH + Duration::from_nanos(5))
        );
        assert_eq!(
            system_time(-1, 0),
            UNIX_EPOCH.checked_sub(Duration::from_secs(1))
        );
    }
}
