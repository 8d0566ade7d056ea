//! Changes made in place: state transitions touch only the superblock; a
//! new image first invalidates the old one; a wipe zeroes the used extent.

use std::io::SeekFrom;

use zerocopy::IntoBytes;

use crate::format::{RawSuperblock, BODY_OFFSET};
use crate::read::read_superblock;
use crate::{Error, State, Store};

fn io_err(source: std::io::Error) -> Error {
    Error::Io {
        what: "store".into(),
        source,
    }
}

pub(crate) fn write_superblock<S: Store>(store: &mut S, sb: &RawSuperblock) -> Result<(), Error> {
    store.seek(SeekFrom::Start(0)).map_err(io_err)?;
    store.write_all(sb.as_bytes()).map_err(io_err)?;
    store.sync().map_err(io_err)
}

/// Moves a valid image to `state` (e.g. `written -> restoring`), touching
/// only the superblock.
pub fn set_state<S: Store>(store: &mut S, state: State) -> Result<(), Error> {
    let (mut raw, _) = read_superblock(store)?;
    raw.state = (state as u32).into();
    raw.header_crc = raw.crc().into();
    write_superblock(store, &raw)
}

/// Makes whatever image is in the store unreadable (its superblock zeroed).
pub fn invalidate<S: Store>(store: &mut S) -> Result<(), Error> {
    store.seek(SeekFrom::Start(0)).map_err(io_err)?;
    store
        .write_all(&[0u8; BODY_OFFSET as usize])
        .map_err(io_err)?;
    store.sync().map_err(io_err)
}

/// Zeroes the image's whole extent (it holds process memory), superblock last.
pub fn wipe<S: Store>(store: &mut S) -> Result<(), Error> {
    let total = match read_superblock(store) {
        Ok((_, sb)) => sb.total_len,
        Err(_) => BODY_OFFSET,
    };
    let store_len = store.seek(SeekFrom::End(0)).map_err(io_err)?;
    let end = total.min(store_len);
    let zeros = vec![0u8; 1 << 20];
    let mut pos = BODY_OFFSET.min(end);
    store.seek(SeekFrom::Start(pos)).map_err(io_err)?;
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        store.write_all(&zeros[..n]).map_err(io_err)?;
        pos += n as u64;
    }
    invalidate(store)
}
