//! The superblock, the image's one fixed-size record at offset 0: read and
//! checked before anything else is trusted, and the only part rewritten in
//! place. A state transition touches only the superblock; `invalidate`
//! zeroes it; `wipe_recorded` zeroes all the store may hold.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use contract::extent::{self, Extent};

use zerocopy::{FromBytes, IntoBytes};

use crate::error::Error;
use crate::format::{
    RawSuperblock, BODY_OFFSET, FORMAT_MAJOR, FORMAT_MINOR, MAGIC, MAX_CHUNK, MAX_MANIFEST,
};
use crate::state::State;
use crate::store::{read_exact_at, store_len, Store};

/// The superblock as read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub major: u16,
    pub minor: u16,
    pub state: State,
    pub generation: u64,
    /// Bytes from offset 0 to the end of the manifest.
    pub total_len: u64,
    pub manifest_offset: u64,
    pub manifest_len: u64,
    pub manifest_crc: u32,
    /// The largest raw length of a chunk.
    pub chunk_size: u32,
    /// blake3 of the chunk headers in image order, then the manifest.
    pub digest: [u8; 32],
    /// crc32c of the superblock.
    pub header_crc: u32,
}

impl Superblock {
    pub fn digest_hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Reads and checks the superblock: magic, version, checksum, state and
/// the consistency of its offsets. Nothing else of the image is read.
pub fn read_superblock<R: Read + Seek>(store: &mut R) -> Result<Superblock, Error> {
    let len = store_len(store)?;
    load_superblock(store, len).map(|(_, sb)| sb)
}

pub(crate) fn load_superblock<R: Read + Seek>(
    store: &mut R,
    store_len: u64,
) -> Result<(RawSuperblock, Superblock), Error> {
    let mut block = [0u8; BODY_OFFSET as usize];
    let head = store_len.min(BODY_OFFSET) as usize;
    if head < MAGIC.len() {
        return Err(Error::NoImage);
    }
    read_exact_at(store, 0, &mut block[..head], "superblock")?;
    if block[..MAGIC.len()] != MAGIC {
        return Err(Error::NoImage);
    }
    if head < block.len() {
        return Err(Error::Truncated {
            what: "the superblock".into(),
        });
    }
    let raw = RawSuperblock::read_from_bytes(&block).map_err(|_| Error::NoImage)?;
    let sb = check_superblock(&raw)?;
    Ok((raw, sb))
}

/// The checks, in an order that keeps their errors meaningful: a newer
/// major may lay out (and checksum) its superblock differently.
fn check_superblock(raw: &RawSuperblock) -> Result<Superblock, Error> {
    if raw.magic != MAGIC {
        return Err(Error::NoImage);
    }
    let (major, minor) = (raw.major.get(), raw.minor.get());
    if major != FORMAT_MAJOR {
        return Err(Error::UnknownMajor {
            found: major,
            supported: FORMAT_MAJOR,
        });
    }
    if raw.header_crc.get() != raw.crc() {
        return Err(Error::SuperblockChecksum);
    }
    if minor > FORMAT_MINOR {
        return Err(Error::NewerMinor {
            major,
            found: minor,
            supported: FORMAT_MINOR,
        });
    }
    let state = State::from_u32(raw.state.get()).ok_or(Error::UnknownState(raw.state.get()))?;
    let sb = Superblock {
        major,
        minor,
        state,
        generation: raw.generation.get(),
        total_len: raw.total_len.get(),
        manifest_offset: raw.manifest_offset.get(),
        manifest_len: raw.manifest_len.get(),
        manifest_crc: raw.manifest_crc.get(),
        chunk_size: raw.chunk_size.get(),
        digest: raw.digest,
        header_crc: raw.header_crc.get(),
    };
    if sb.chunk_size == 0 || sb.chunk_size > MAX_CHUNK {
        return Err(Error::BadSuperblock("its chunk size is 0 or above 16 MiB"));
    }
    if sb.manifest_offset < BODY_OFFSET {
        return Err(Error::BadSuperblock("the manifest overlaps the superblock"));
    }
    if sb.manifest_len == 0 || sb.manifest_len > MAX_MANIFEST {
        return Err(Error::BadSuperblock(
            "the manifest is empty or above 64 MiB",
        ));
    }
    if sb.manifest_offset.checked_add(sb.manifest_len) != Some(sb.total_len) {
        return Err(Error::BadSuperblock("the manifest does not end the image"));
    }
    Ok(sb)
}

pub(crate) fn write_superblock<S: Store>(store: &mut S, sb: &RawSuperblock) -> Result<(), Error> {
    store
        .seek(SeekFrom::Start(0))
        .and_then(|_| store.write_all(sb.as_bytes()))
        .and_then(|()| store.flush())
        .and_then(|()| store.sync())
        .map_err(Error::io("write the superblock"))
}

/// Moves the image to `state` (`written -> restoring -> restored|failed`),
/// touching only the superblock, and flushes. Refuses a store with no valid
/// superblock, and any move back (see [`State::can_become`]).
pub fn set_state<S: Store>(store: &mut S, state: State) -> Result<(), Error> {
    let store_len = store_len(store)?;
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
    let n = store_len(store)?.min(BODY_OFFSET) as usize;
    store
        .seek(SeekFrom::Start(0))
        .and_then(|_| store.write_all(&[0u8; BODY_OFFSET as usize][..n]))
        .and_then(|()| store.flush())
        .and_then(|()| store.sync())
        .map_err(Error::io("invalidate the image in the store"))
}

/// Zeroes whatever image data the store named `name` may hold (it is
/// process memory): up to the high-water mark recorded in `record_dir`
/// ([`contract::extent`]), or the image's end if its superblock reads and
/// it goes further, or all of the store when the mark is unknown (a damaged
/// superblock says nothing about how far its image went). Then records that
/// nothing is left. Returns where the wipe ended.
pub fn wipe_recorded<S: Store>(store: &mut S, name: &str, record_dir: &Path) -> Result<u64, Error> {
    let len = store_len(store)?;
    let image_end = load_superblock(store, len).ok().map(|(_, sb)| sb.total_len);
    let end = extent::wipe_end(Extent::read(record_dir).as_ref(), name, image_end, len);
    wipe_to(store, end)?;
    Extent {
        store: name.into(),
        dirty_bytes: Some(0),
    }
    .write(record_dir)
    .map_err(Error::io("record that the store is wiped"))?;
    Ok(end)
}

/// Zeroes the superblock (so that no image is readable from here on), then
/// `[BODY_OFFSET, end)` clamped to the store, and flushes. `end` may lie
/// past the current image: the tail of an older, larger one (the high-water
/// mark in `contract::extent`).
pub fn wipe_to<S: Store>(store: &mut S, end: u64) -> Result<(), Error> {
    invalidate(store)?;
    let len = store_len(store)?;
    let end = end.min(len);
    if end <= BODY_OFFSET {
        return Ok(());
    }
    // Whole pages for the device: past `end` to the page's end is past the
    // image too, and a block device's size is a whole number of them.
    let device_end = end.next_multiple_of(4096).min(len);
    let by_device = device_end % 4096 == 0
        && store
            .zero_range(BODY_OFFSET, device_end - BODY_OFFSET)
            .map_err(Error::io("zero the store"))?;
    if by_device {
        return store.sync().map_err(Error::io("flush the wiped store"));
    }
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
        .map_err(Error::io("flush the wiped store"))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    #[test]
    fn wipe_to_zeroes_up_to_the_end_given_past_the_image() {
        let mut bytes = vec![0xAAu8; 3 << 20];
        wipe_to(&mut Cursor::new(&mut bytes), 2 << 20).unwrap();
        assert!(bytes[..2 << 20].iter().all(|b| *b == 0));
        assert!(bytes[2 << 20..].iter().all(|b| *b == 0xAA));
        // Clamped to the store; a short store keeps working.
        let mut bytes = vec![0xAAu8; 10_000];
        wipe_to(&mut Cursor::new(&mut bytes), u64::MAX).unwrap();
        assert!(bytes.iter().all(|b| *b == 0));
    }

    /// Without a superblock that reads, the record says how far to wipe:
    /// its mark when it is about this store, else all of it; afterwards it
    /// says nothing is left.
    #[test]
    fn wipe_recorded_goes_to_the_mark_or_all_of_a_store_without_one() {
        let dir = std::env::temp_dir().join(format!("kupgrade-wipe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mark = |store: &str, dirty| {
            Extent {
                store: store.into(),
                dirty_bytes: dirty,
            }
            .write(&dir)
            .unwrap()
        };
        mark("/dev/pmem0", Some(2 << 20));
        let mut bytes = vec![0xAAu8; 3 << 20];
        let end = wipe_recorded(&mut Cursor::new(&mut bytes), "/dev/pmem0", &dir).unwrap();
        assert_eq!(end, 2 << 20);
        assert!(bytes[..2 << 20].iter().all(|b| *b == 0));
        assert!(bytes[2 << 20..].iter().all(|b| *b == 0xAA));
        assert_eq!(Extent::read(&dir).unwrap().dirty_bytes, Some(0));
        for (store, dirty) in [("/dev/pmem1", Some(1 << 20)), ("/dev/pmem0", None)] {
            mark(store, dirty);
            let mut bytes = vec![0xAAu8; 3 << 20];
            let end = wipe_recorded(&mut Cursor::new(&mut bytes), "/dev/pmem0", &dir).unwrap();
            assert_eq!(end, 3 << 20, "{store} {dirty:?}");
            assert!(bytes.iter().all(|b| *b == 0));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
