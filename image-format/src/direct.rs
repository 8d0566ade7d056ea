//! Reading a store around the page cache (`O_DIRECT`).
//!
//! Read through the page cache, a RAM store's bytes are copied twice (the
//! device into the cache, the cache into the reader) and the cache keeps
//! a third of the machine's memory busy with an image read once; under
//! emulation the cache's own work per page cost more than the copies.
//! With `O_DIRECT` the device copies straight into the reader's memory.
//! `O_DIRECT` reads whole aligned blocks into aligned memory: a
//! [`DirectReader`] reads a window of them at a time and serves reads of
//! any offset and length from it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// The alignment `O_DIRECT` asks for, and more than any device's logical
/// block.
const BLOCK: usize = 4096;
/// Bytes read from the device at a time.
const WINDOW: usize = 1 << 20;

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

/// A read-only store, read in aligned windows; `Read + Seek` like the file.
pub struct DirectReader {
    file: File,
    /// Whether `file` was opened with `O_DIRECT`.
    direct: bool,
    window: Vec<Block>,
    /// Store offset of the window's first byte (a multiple of [`BLOCK`]).
    start: u64,
    /// Bytes of the window the last read filled.
    filled: usize,
    pos: u64,
}

impl DirectReader {
    /// Opens `path` read-only with `O_DIRECT`, or without it where its file
    /// system refuses it (the reads are the same, through the cache).
    pub fn open(path: &Path) -> io::Result<DirectReader> {
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(path);
        match direct {
            Ok(file) => Ok(DirectReader::new(file, true)),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                let file = File::open(path)?;
                Ok(DirectReader::new(file, false))
            }
            Err(e) => Err(e),
        }
    }

    fn new(file: File, direct: bool) -> DirectReader {
        DirectReader {
            file,
            direct,
            window: vec![Block::new_zeroed(); WINDOW / BLOCK],
            start: 0,
            filled: 0,
            pos: 0,
        }
    }

    /// Whether reads go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Reads the window holding `pos`; false at the end of the store.
    fn fill(&mut self) -> io::Result<bool> {
        let start = self.pos - self.pos % BLOCK as u64;
        let bytes = self.window.as_mut_bytes();
        let mut filled = 0;
        // Short only at the end of the store (or on a signal).
        while filled < bytes.len() {
            match self
                .file
                .read_at(&mut bytes[filled..], start + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A device whose blocks are larger than ours: read it
                // through the cache instead.
                Err(e) if self.direct && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    buffered(&self.file)?;
                    self.direct = false;
                }
                Err(e) => {
                    self.filled = 0;
                    return Err(e);
                }
            }
            // What an O_DIRECT read returns short of a block is the end.
            if filled % BLOCK != 0 {
                break;
            }
        }
        self.start = start;
        self.filled = filled;
        Ok(self.pos < start + filled as u64)
    }
}

/// Turns `O_DIRECT` off on an open file.
fn buffered(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
    Ok(())
}

impl Read for DirectReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let end = self.start + self.filled as u64;
        if (self.pos < self.start || self.pos >= end) && !self.fill()? {
            return Ok(0);
        }
        let at = (self.pos - self.start) as usize;
        let n = out.len().min(self.filled - at);
        out[..n].copy_from_slice(&self.window.as_bytes()[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for DirectReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let beyond = |base: u64, d: i64| {
            base.checked_add_signed(d)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))
        };
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => beyond(self.pos, d)?,
            // The file's end (a block device's size).
            SeekFrom::End(d) => beyond(self.file.seek(SeekFrom::End(0))?, d)?,
        };
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    /// Reads at odd offsets and of odd lengths, across windows and at the
    /// end, give the file's bytes.
    #[test]
    fn any_offset_and_length_reads_the_file_s_bytes() {
        let len = 3 * WINDOW + 12345;
        let bytes = pattern(len);
        let f = file_with(&bytes);
        let mut r = DirectReader::open(f.path()).unwrap();
        for (at, n) in [
            (0, 24),
            (1, BLOCK),
            (WINDOW - 3, 10),
            (5000, 2 * WINDOW + 17),
            (len - 100, 100),
            (17, 1),
        ] {
            r.seek(SeekFrom::Start(at as u64)).unwrap();
            let mut got = vec![0u8; n];
            r.read_exact(&mut got).unwrap();
            assert_eq!(got, bytes[at..at + n], "{n} bytes at {at}");
        }
        let mut all = Vec::new();
        r.seek(SeekFrom::Start(0)).unwrap();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all, bytes);
    }

    /// Reads go on through the cache once `O_DIRECT` is turned off, as
    /// after a device refused its alignment.
    #[test]
    fn reads_go_on_once_o_direct_is_turned_off() {
        let bytes = pattern(WINDOW + 5000);
        let f = file_with(&bytes);
        let mut r = DirectReader::open(f.path()).unwrap();
        let mut head = vec![0u8; 100];
        r.read_exact(&mut head).unwrap();
        buffered(&r.file).unwrap();
        r.direct = false;
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!([head, rest].concat(), bytes);
    }

    #[test]
    fn seeks_from_the_end_and_the_current_position_and_reads_past_the_end() {
        let bytes = pattern(10_000);
        let f = file_with(&bytes);
        let mut r = DirectReader::open(f.path()).unwrap();
        assert_eq!(r.seek(SeekFrom::End(0)).unwrap(), 10_000);
        assert_eq!(r.seek(SeekFrom::End(-10)).unwrap(), 9_990);
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        assert_eq!(b, bytes[9_990..9_994]);
        assert_eq!(r.seek(SeekFrom::Current(2)).unwrap(), 9_996);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, bytes[9_996..]);
        r.seek(SeekFrom::Start(20_000)).unwrap();
        assert_eq!(r.read(&mut b).unwrap(), 0);
        assert!(r.seek(SeekFrom::Current(-30_000)).is_err());
    }

    /// An image read through it opens and unpacks as through the file.
    #[test]
    fn an_image_reads_the_same_through_it() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("pages-1.img"), pattern(2 * WINDOW + 99)).unwrap();
        std::fs::write(src.path().join("core-1.img"), b"core").unwrap();
        let store = tempfile::NamedTempFile::new().unwrap();
        store.as_file().set_len(8 << 20).unwrap();
        let mut w = crate::ImageWriter::create(
            store.reopen().unwrap(),
            8 << 20,
            crate::WriteOptions::default(),
        )
        .unwrap();
        w.add_tree("criu/a", src.path()).unwrap();
        w.finish(crate::Manifest::default()).unwrap();
        let mut image = crate::Image::open(DirectReader::open(store.path()).unwrap()).unwrap();
        assert!(image.verify().unwrap().is_ok());
        let out = tempfile::tempdir().unwrap();
        image.extract_tree("criu/a", out.path()).unwrap();
        for name in ["pages-1.img", "core-1.img"] {
            assert_eq!(
                std::fs::read(out.path().join(name)).unwrap(),
                std::fs::read(src.path().join(name)).unwrap(),
                "{name}"
            );
        }
    }
}
