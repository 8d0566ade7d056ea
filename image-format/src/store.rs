//! Where an image lives: the [`Store`] trait, and positioned reads that
//! turn a short read into [`Error::Truncated`].

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::error::Error;

/// The buffer between the chunk stream and the store, each way: it gathers
/// chunk headers, and being smaller than a chunk (1 MiB by default) lets
/// the bodies bypass it, one copy fewer per byte.
pub(crate) const IO_BUFFER: usize = 64 << 10;

/// Where an image is written: a block device, a file, or memory. Readers
/// need only `Read + Seek + Send`.
pub trait Store: Read + Write + Seek + Send {
    /// Makes what was written durable (fsync; for a raw block device this
    /// flushes the page cache in front of it).
    fn sync(&mut self) -> io::Result<()>;

    /// Zeroes `len` bytes at `offset` (both multiples of 4096) in the
    /// device itself, without passing zeros through the page cache in front
    /// of it. `Ok(false)` when this store cannot: the caller writes zeros.
    fn zero_range(&mut self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
}

impl Store for std::fs::File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }

    /// On a block device, `fallocate(FALLOC_FL_ZERO_RANGE)`: the kernel
    /// drops the range from the page cache and zeroes it in the device
    /// (WRITE_ZEROES where the device has it, zero pages otherwise: for
    /// pmem one copy, where written zeros cost two and the page cache).
    /// Not on a regular file: a file system may only mark its blocks
    /// unwritten and leave the old bytes on the disk.
    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        use nix::errno::Errno;
        use nix::fcntl::{fallocate, FallocateFlags};
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileTypeExt;
        if !self.metadata()?.file_type().is_block_device() {
            return Ok(false);
        }
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(false);
        };
        let mode = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(self.as_raw_fd(), mode, offset, len) {
            Ok(()) => Ok(true),
            // An older kernel, or a device that wants larger blocks.
            Err(Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENODEV) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

impl Store for io::Cursor<Vec<u8>> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Store for io::Cursor<&mut Vec<u8>> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Store for io::Cursor<&mut [u8]> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Store + ?Sized> Store for &mut S {
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).zero_range(offset, len)
    }
}

impl<S: Store + ?Sized> Store for Box<S> {
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).zero_range(offset, len)
    }
}

/// Size of the store, found by seeking to its end (which works for block
/// devices, where metadata says 0).
pub(crate) fn store_len<R: Seek>(store: &mut R) -> Result<u64, Error> {
    store
        .seek(SeekFrom::End(0))
        .map_err(Error::io("find the size of the store"))
}

/// Reads exactly `buf.len()` bytes at `offset`; an early end of the store
/// is [`Error::Truncated`] naming `what`.
pub(crate) fn read_exact_at<R: Read + Seek>(
    store: &mut R,
    offset: u64,
    buf: &mut [u8],
    what: &str,
) -> Result<(), Error> {
    store
        .seek(SeekFrom::Start(offset))
        .map_err(Error::io(format!("seek to the {what}")))?;
    store.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated { what: what.into() }
        } else {
            Error::Io {
                what: format!("read the {what}"),
                source: e,
            }
        }
    })
}
