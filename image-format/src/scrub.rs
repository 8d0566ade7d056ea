//! Zeroing a store up to an end the caller knows, which may lie past the
//! current image (the tail of an older, larger one: see the high-water mark
//! in `contract::extent`).

use std::io::SeekFrom;

use crate::{invalidate, Error, Store, BODY_OFFSET};

/// Zeroes the superblock (so that no image is readable from here on), then
/// `[BODY_OFFSET, end)`, clamped to the store, and flushes.
pub fn wipe_to<S: Store>(store: &mut S, end: u64) -> Result<(), Error> {
    invalidate(store)?;
    let store_len = store.seek(SeekFrom::End(0)).map_err(|source| Error::Io {
        what: "find the size of the store".into(),
        source,
    })?;
    let end = end.min(store_len);
    if end <= BODY_OFFSET {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut pos = BODY_OFFSET;
    let io = |what: String| move |source| Error::Io { what, source };
    store
        .seek(SeekFrom::Start(pos))
        .map_err(io("seek in the store".into()))?;
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        store
            .write_all(&zeros[..n])
            .map_err(io(format!("wipe the store at offset {pos}")))?;
        pos += n as u64;
    }
    store
        .flush()
        .and_then(|()| store.sync())
        .map_err(io("flush the wiped store".into()))
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
}
