//! Changes made in place: state transitions touch only the superblock; a new
//! image first invalidates the old one; a wipe zeroes the used extent.

use std::io::SeekFrom;

use zerocopy::IntoBytes;

use crate::format::{RawSuperblock, BODY_OFFSET};
use crate::read::load_superblock;
use crate::{Error, State, Store};

pub(crate) fn write_superblock<S: Store>(store: &mut S, sb: &RawSuperblock) -> Result<(), Error> {
    store
        .seek(SeekFrom::Start(0))
        .and_then(|_| store.write_all(sb.as_bytes()))
        .and_then(|()| store.flush())
        .and_then(|()| store.sync())
        .map_err(Error::io("write the superblock"))
}

fn len<S: Store>(store: &mut S) -> Result<u64, Error> {
    store
        .seek(SeekFrom::End(0))
        .map_err(Error::io("find the size of the store"))
}

/// Moves the image to `state` (`written -> restoring -> restored|failed`),
/// touching only the superblock, and flushes. Refuses a store with no valid
/// superblock, and any move back (see [`State::can_become`]).
pub fn set_state<S: Store>(store: &mut S, state: State) -> Result<(), Error> {
    let store_len = len(store)?;
    let (mut raw, sb) = load_superblock(store, store_len)?;
    if !sb.state.can_become(state) {
        return Err(Error::BadTransition {
            from: sb.state,
            to: state,
        });
    }
    raw.state = (state as u32).into();
    raw.seal();
    write_superblock(store, &raw)
}

/// Makes whatever image is in the store unreadable by zeroing its
/// superblock (magic included), and flushes. Harmless on a store that holds
/// no image; an empty store stays empty.
pub fn invalidate<S: Store>(store: &mut S) -> Result<(), Error> {
    let n = len(store)?.min(BODY_OFFSET) as usize;
    store
        .seek(SeekFrom::Start(0))
        .and_then(|_| store.write_all(&[0u8; BODY_OFFSET as usize][..n]))
        .and_then(|()| store.flush())
        .and_then(|()| store.sync())
        .map_err(Error::io("invalidate the image in the store"))
}

/// Zeroes the image's whole extent (it holds process memory), then its
/// superblock, flushing after each. Without a valid superblock only the
/// superblock's block is zeroed: nothing says how far an image went.
pub fn wipe<S: Store>(store: &mut S) -> Result<(), Error> {
    let store_len = len(store)?;
    let end = match load_superblock(store, store_len) {
        Ok((_, sb)) => sb.total_len.min(store_len),
        Err(_) => BODY_OFFSET,
    };
    if end > BODY_OFFSET {
        let zeros = vec![0u8; 1 << 20];
        let mut pos = BODY_OFFSET;
        store
            .seek(SeekFrom::Start(pos))
            .map_err(Error::io("seek in the store"))?;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            store.write_all(&zeros[..n]).map_err(|source| Error::Io {
                what: format!("wipe the store at offset {pos}"),
                source,
            })?;
            pos += n as u64;
        }
        store
            .flush()
            .and_then(|()| store.sync())
            .map_err(Error::io("flush the wiped store"))?;
    }
    invalidate(store)
}
