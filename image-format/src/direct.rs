//! Reading and writing a store around the page cache (`O_DIRECT`).
//!
//! Read through the page cache, a RAM store's bytes are copied twice (the
//! device into the cache, the cache into the reader) and the cache keeps
//! a third of the machine's memory busy with an image read once; under
//! emulation the cache's own work per page cost more than the copies.
//! With `O_DIRECT` the device copies straight into the reader's memory.
//! `O_DIRECT` reads whole aligned blocks into aligned memory: a
//! [`DirectReader`] reads a window of them at a time and serves reads of
//! any offset and length from it. Written through the cache, every page
//! of an image is a page of cache to allocate, dirty and write back, the
//! last of it in the frozen window's flush: a [`DirectWriter`] gathers
//! writes a window at a time and writes whole aligned blocks, reading
//! first the bytes of a block it only partly covers.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
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
        let (file, direct) = open_direct(path, false)?;
        Ok(DirectReader::new(file, direct))
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
            let at = start + filled as u64;
            match io_at(&self.file, &mut self.direct, |f| {
                f.read_at(&mut bytes[filled..], at)
            }) {
                Ok(0) => break,
                Ok(n) => filled += n,
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

/// Runs `op`, an I/O at an offset of `file`, again after a signal, and
/// through the cache once `O_DIRECT` is refused (a device whose blocks
/// are larger than ours).
fn io_at(
    file: &File,
    direct: &mut bool,
    mut op: impl FnMut(&File) -> io::Result<usize>,
) -> io::Result<usize> {
    loop {
        match op(file) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if *direct && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                buffered(file)?;
                *direct = false;
            }
            done => return done,
        }
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
        self.pos = seek_to(&mut self.file, self.pos, to)?;
        Ok(self.pos)
    }
}

/// Where `to` leads from `pos` in `file`, whose end is its size (a block
/// device's too); `file`'s own offset is not used.
fn seek_to(file: &mut File, pos: u64, to: SeekFrom) -> io::Result<u64> {
    let beyond = |base: u64, d: i64| {
        base.checked_add_signed(d)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))
    };
    match to {
        SeekFrom::Start(p) => Ok(p),
        SeekFrom::Current(d) => beyond(pos, d),
        SeekFrom::End(d) => beyond(file.seek(SeekFrom::End(0))?, d),
    }
}

/// Opens `path` with `O_DIRECT` (read and write as `write` says), or
/// without it where its file system refuses it; says which.
fn open_direct(path: &Path, write: bool) -> io::Result<(File, bool)> {
    let direct = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path);
    match direct {
        Ok(file) => Ok((file, true)),
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
            let file = OpenOptions::new().read(true).write(write).open(path)?;
            Ok((file, false))
        }
        Err(e) => Err(e),
    }
}

/// A block device written in aligned windows; `Read + Write + Seek` like
/// the device. For block devices only: it writes whole blocks, so a
/// regular file would grow to the next block.
pub struct DirectWriter {
    file: File,
    /// Whether `file` is (still) in `O_DIRECT` mode.
    direct: bool,
    /// A block device's size: its last block may be shorter than ours (a
    /// device of 512-byte sectors), and nothing is written past it.
    device_len: Option<u64>,
    window: Vec<Block>,
    /// Store offset of the window's first byte (a multiple of [`BLOCK`]).
    start: u64,
    /// The window's bytes written and not yet in the store: `lo..hi`, with
    /// `lo` inside the first block; empty when equal.
    lo: usize,
    hi: usize,
    pos: u64,
}

impl DirectWriter {
    /// Opens `path` read-write with `O_DIRECT`, or without it where its
    /// file system refuses it (the writes are the same, through the cache).
    pub fn open(path: &Path) -> io::Result<DirectWriter> {
        let (mut file, direct) = open_direct(path, true)?;
        let device_len = if file.metadata()?.file_type().is_block_device() {
            Some(file.seek(SeekFrom::End(0))?)
        } else {
            None
        };
        Ok(DirectWriter::new(file, direct, device_len))
    }

    fn new(file: File, direct: bool, device_len: Option<u64>) -> DirectWriter {
        DirectWriter {
            file,
            direct,
            device_len,
            window: vec![Block::new_zeroed(); WINDOW / BLOCK],
            start: 0,
            lo: 0,
            hi: 0,
            pos: 0,
        }
    }

    /// Whether writes go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The aligned block at `at` as the store has it: zeros past its end.
    fn read_block(&mut self, at: u64) -> io::Result<Block> {
        let mut block = Block::new_zeroed();
        let mut filled = 0;
        while filled < BLOCK {
            let from = at + filled as u64;
            match io_at(&self.file, &mut self.direct, |f| {
                f.read_at(&mut block.0[filled..], from)
            })? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(block)
    }

    /// Writes the window's pending bytes to the store, in whole blocks.
    fn flush_window(&mut self) -> io::Result<()> {
        if self.hi == self.lo {
            return Ok(());
        }
        let (lo, hi) = (self.lo, self.hi);
        let mut end = hi.div_ceil(BLOCK) * BLOCK;
        if let Some(len) = self.device_len {
            let room = len.saturating_sub(self.start);
            if hi as u64 > room {
                // As the device itself says of a write past its end.
                return Err(io::Error::from_raw_os_error(nix::libc::ENOSPC));
            }
            end = end.min(room as usize);
        }
        // The bytes of the first and the last block that were not written
        // this time stay as the store has them.
        if lo % BLOCK != 0 {
            let first = self.read_block(self.start)?;
            self.window.as_mut_bytes()[..lo].copy_from_slice(&first.0[..lo]);
        }
        if end > hi && hi % BLOCK != 0 {
            let at = hi - hi % BLOCK;
            let last = self.read_block(self.start + at as u64)?;
            self.window.as_mut_bytes()[hi..end].copy_from_slice(&last.0[hi - at..end - at]);
        }
        let mut done = 0;
        while done < end {
            let bytes = &self.window.as_bytes()[done..end];
            let at = self.start + done as u64;
            match io_at(&self.file, &mut self.direct, |f| f.write_at(bytes, at))? {
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                n => done += n,
            }
        }
        self.lo = 0;
        self.hi = 0;
        Ok(())
    }
}

impl Write for DirectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // The window goes on only where the last write ended.
        let at_end = self.hi > self.lo && self.pos == self.start + self.hi as u64;
        if !at_end || self.hi == WINDOW {
            self.flush_window()?;
            self.start = self.pos - self.pos % BLOCK as u64;
            self.lo = (self.pos - self.start) as usize;
            self.hi = self.lo;
        }
        let n = buf.len().min(WINDOW - self.hi);
        self.window.as_mut_bytes()[self.hi..self.hi + n].copy_from_slice(&buf[..n]);
        self.hi += n;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_window()
    }
}

impl Read for DirectWriter {
    /// Reads what was written, pending bytes included (they go first).
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.flush_window()?;
        let off = (self.pos % BLOCK as u64) as usize;
        let block = self.read_block(self.pos - off as u64)?;
        let len = self.file.seek(SeekFrom::End(0))?;
        let n = out
            .len()
            .min(BLOCK - off)
            .min(len.saturating_sub(self.pos) as usize);
        out[..n].copy_from_slice(&block.0[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for DirectWriter {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_to(&mut self.file, self.pos, to)?;
        Ok(self.pos)
    }
}

impl crate::Store for DirectWriter {
    fn sync(&mut self) -> io::Result<()> {
        self.flush_window()?;
        self.file.sync_all()
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        self.flush_window()?;
        crate::Store::zero_range(&mut self.file, offset, len)
    }
}

impl Drop for DirectWriter {
    /// What is still pending goes to the store; an error here has no one
    /// to tell (`flush` and `sync` say it).
    fn drop(&mut self) {
        let _ = self.flush_window();
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

    /// Writes of any offset and length, in order, backwards, across
    /// windows and over bytes already there, leave the store as the same
    /// writes leave a vector; the bytes around them stay.
    #[test]
    fn writes_anywhere_leave_the_store_as_a_vector() {
        let len = 3 * WINDOW;
        let mut model = pattern(len);
        let f = file_with(&model);
        let mut w = DirectWriter::open(f.path()).unwrap();
        let data = |n: usize, seed: u8| -> Vec<u8> {
            (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
        };
        let mut seed = 0u8;
        for (at, n) in [
            (0, 24),
            (24, 5000),
            (5024, WINDOW),
            (17, 3),
            (WINDOW - 5, 10),
            (2 * WINDOW + 4090, 12),
            (BLOCK, BLOCK),
            (len - 7, 7),
        ] {
            seed = seed.wrapping_add(1);
            let bytes = data(n, seed);
            w.seek(SeekFrom::Start(at as u64)).unwrap();
            w.write_all(&bytes).unwrap();
            model[at..at + n].copy_from_slice(&bytes);
        }
        // Read back through it, pending bytes first.
        w.seek(SeekFrom::Start(0)).unwrap();
        let mut got = Vec::new();
        w.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), len);
        assert!(got == model, "read back through the writer");
        crate::Store::sync(&mut w).unwrap();
        drop(w);
        assert!(std::fs::read(f.path()).unwrap() == model, "the file");
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), len as u64);
    }

    /// On a device whose size is not a multiple of the block, the last
    /// bytes are written without writing past its end, and a write past
    /// it fails as the device's own would.
    #[test]
    fn the_short_last_block_of_a_device_is_written_and_nothing_past_it() {
        let len = 3 * BLOCK + 512;
        let mut model = pattern(len);
        let f = file_with(&model);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        let mut w = DirectWriter::new(file, false, Some(len as u64));
        w.seek(SeekFrom::Start(3 * BLOCK as u64 + 100)).unwrap();
        w.write_all(&[9; 412]).unwrap();
        w.flush().unwrap();
        model[3 * BLOCK + 100..].fill(9);
        assert!(std::fs::read(f.path()).unwrap() == model);
        w.write_all(&[1]).unwrap();
        let e = w.flush().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::ENOSPC), "{e}");
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), len as u64);
    }

    /// Writes go on through the cache once `O_DIRECT` is turned off, and
    /// what is pending when it is dropped reaches the store.
    #[test]
    fn writes_go_on_once_o_direct_is_turned_off_and_on_drop() {
        let mut model = pattern(2 * WINDOW);
        let f = file_with(&model);
        let mut w = DirectWriter::open(f.path()).unwrap();
        w.seek(SeekFrom::Start(100)).unwrap();
        w.write_all(&[1; 300]).unwrap();
        w.flush().unwrap();
        buffered(&w.file).unwrap();
        w.direct = false;
        w.write_all(&[2; 5000]).unwrap();
        drop(w);
        model[100..400].fill(1);
        model[400..5400].fill(2);
        assert!(std::fs::read(f.path()).unwrap() == model);
    }

    /// An image written through it reads as one written through the file.
    #[test]
    fn an_image_written_through_it_verifies_and_unpacks() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("pages-1.img"), pattern(2 * WINDOW + 99)).unwrap();
        std::fs::write(src.path().join("core-1.img"), b"core").unwrap();
        let store = tempfile::NamedTempFile::new().unwrap();
        store.as_file().set_len(8 << 20).unwrap();
        let writer = DirectWriter::open(store.path()).unwrap();
        let mut w =
            crate::ImageWriter::create(writer, 8 << 20, crate::WriteOptions::default()).unwrap();
        w.add_tree("criu/a", src.path()).unwrap();
        w.sync().unwrap();
        w.add_blob("b", b"blob").unwrap();
        w.finish(crate::Manifest::default()).unwrap();
        let mut image = crate::Image::open(store.reopen().unwrap()).unwrap();
        assert!(image.verify().unwrap().is_ok());
        assert_eq!(image.read_blob("b").unwrap(), b"blob");
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
