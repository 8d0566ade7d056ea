//! Where an image lives: the [`Store`] trait, and positioned reads that
//! turn a short read into [`Error::Truncated`].

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::error::Error;

/// Where an image is written: a block device, a file, or memory. Readers
/// need only `Read + Seek + Send`.
pub trait Store: Read + Write + Seek + Send {
    /// Makes what was written durable (fsync; for a raw block device this
    /// flushes the page cache in front of it).
    fn sync(&mut self) -> io::Result<()>;
}

impl Store for std::fs::File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
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
