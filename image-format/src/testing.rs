//! Helpers for tests and the fuzzer: not part of the format's API.
//!
//! [`reseal`] recomputes every checksum of an image after a test or the
//! fuzzer changed it, so that the change reaches the code behind the
//! checksums (section table, chunk headers, decompression, tree records).

use std::io::Cursor;
use std::path::Path;

use zerocopy::{FromBytes, IntoBytes};

use crate::error::Error;
use crate::format::*;
use crate::manifest::{Manifest, SectionEntry, SectionKind};
use crate::read::Image;
use crate::state::State;

fn superblock(bytes: &[u8]) -> Option<RawSuperblock> {
    RawSuperblock::read_from_bytes(bytes.get(..BODY_OFFSET as usize)?).ok()
}

fn range(bytes: &[u8], offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= bytes.len()).then_some(start..end)
}

/// Every chunk the section table leads to, as far as it can be followed:
/// (section, chunk index, offset of its header, stored length).
pub fn chunks(bytes: &[u8]) -> Vec<(String, u32, u64, u64)> {
    let mut out = Vec::new();
    let Some(sb) = superblock(bytes) else {
        return out;
    };
    let Some(m) = range(bytes, sb.manifest_offset.get(), sb.manifest_len.get()) else {
        return out;
    };
    let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes[m]) else {
        return out;
    };
    for s in &manifest.sections {
        let mut pos = s.offset;
        for i in 0..s.chunks {
            let Some(h) = range(bytes, pos, CHUNK_HEADER_LEN as u64) else {
                break;
            };
            let Ok(h) = ChunkHeader::read_from_bytes(&bytes[h]) else {
                break;
            };
            let stored = u64::from(h.stored_len.get());
            out.push((s.name.clone(), i, pos, stored));
            match pos.checked_add(CHUNK_HEADER_LEN as u64 + stored) {
                Some(p) => pos = p,
                None => break,
            }
        }
    }
    out
}

/// Recomputes the chunk checksums, the manifest checksum, the digest and
/// the superblock checksum, each where the image's own fields lead.
pub fn reseal(bytes: &mut [u8]) {
    for (_, _, pos, stored) in chunks(bytes) {
        let Some(hr) = range(bytes, pos, CHUNK_HEADER_LEN as u64) else {
            continue;
        };
        let Some(sr) = range(bytes, pos + CHUNK_HEADER_LEN as u64, stored) else {
            continue;
        };
        let Ok(mut h) = ChunkHeader::read_from_bytes(&bytes[hr.clone()]) else {
            continue;
        };
        h.crc = h.crc_with(&bytes[sr]).into();
        bytes[hr].copy_from_slice(h.as_bytes());
    }
    let Some(mut sb) = superblock(bytes) else {
        return;
    };
    if let Some(m) = range(bytes, sb.manifest_offset.get(), sb.manifest_len.get()) {
        sb.manifest_crc = crc32c::crc32c(&bytes[m]).into();
    }
    let mut digest = blake3::Hasher::new();
    for (_, _, pos, _) in chunks(bytes) {
        if let Some(hr) = range(bytes, pos, CHUNK_HEADER_LEN as u64) {
            digest.update(&bytes[hr]);
        }
    }
    if let Some(m) = range(bytes, sb.manifest_offset.get(), sb.manifest_len.get()) {
        digest.update(&bytes[m]);
    }
    sb.digest = *digest.finalize().as_bytes();
    sb.seal();
    bytes[..BODY_OFFSET as usize].copy_from_slice(sb.as_bytes());
}

/// Replaces the manifest of the image in `bytes` by what `edit` makes of
/// it (the image is cut at its end) and reseals.
pub fn rewrite_manifest(bytes: &mut Vec<u8>, edit: impl FnOnce(&mut Manifest)) {
    let Some(mut sb) = superblock(bytes) else {
        return;
    };
    let Some(m) = range(bytes, sb.manifest_offset.get(), sb.manifest_len.get()) else {
        return;
    };
    let Ok(mut manifest) = serde_json::from_slice::<Manifest>(&bytes[m.clone()]) else {
        return;
    };
    edit(&mut manifest);
    let Ok(json) = serde_json::to_vec(&manifest) else {
        return;
    };
    bytes.truncate(m.start);
    bytes.extend_from_slice(&json);
    sb.manifest_len = (json.len() as u64).into();
    sb.total_len = (bytes.len() as u64).into();
    bytes[..BODY_OFFSET as usize].copy_from_slice(sb.as_bytes());
    reseal(bytes);
}

/// A crafted image whose one blob `name` is `raw_len` zero bytes in zero
/// chunks of `chunk_size`, every checksum valid: each chunk costs 24 bytes
/// of store and claims up to `chunk_size` raw bytes.
pub fn zero_blob_image(name: &str, chunk_size: u32, raw_len: u64) -> Vec<u8> {
    let size = u64::from(chunk_size.max(1));
    let chunks = raw_len.div_ceil(size);
    let mut bytes = vec![0u8; BODY_OFFSET as usize];
    for i in 0..chunks {
        let raw = (raw_len - i * size).min(size) as u32;
        let h = ChunkHeader::new(CHUNK_ZERO, i as u32, raw, &[]);
        bytes.extend_from_slice(h.as_bytes());
    }
    let manifest = Manifest {
        sections: vec![SectionEntry {
            name: name.into(),
            kind: SectionKind::Blob,
            raw_len,
            stored_len: chunks * CHUNK_HEADER_LEN as u64,
            chunks: chunks as u32,
            offset: BODY_OFFSET,
        }],
        ..Manifest::default()
    };
    // serde_json fails only on a map with non-string keys; a Manifest has
    // no map.
    let json = serde_json::to_vec(&manifest).unwrap_or_default();
    let manifest_offset = bytes.len() as u64;
    bytes.extend_from_slice(&json);
    let sb = RawSuperblock {
        magic: MAGIC,
        major: FORMAT_MAJOR.into(),
        minor: FORMAT_MINOR.into(),
        state: (State::Written as u32).into(),
        generation: 0.into(),
        total_len: (bytes.len() as u64).into(),
        manifest_offset: manifest_offset.into(),
        manifest_len: (json.len() as u64).into(),
        manifest_crc: 0.into(),
        chunk_size: chunk_size.into(),
        digest: [0; 32],
        reserved: [0; 4004],
        header_crc: 0.into(),
    };
    bytes[..BODY_OFFSET as usize].copy_from_slice(sb.as_bytes());
    reseal(&mut bytes);
    bytes
}

/// Everything a reader does with an image: open, check, read every blob,
/// extract every tree under `scratch`, whatever their size: the limits
/// that bound the reader (see [`format`](mod@crate::format)) are the ones
/// production uses, with no others added here.
pub fn exercise(bytes: &[u8], threads: usize, scratch: &Path) -> Result<(), Error> {
    let mut img = Image::open(Cursor::new(bytes))?;
    img.set_threads(threads);
    let report = img.check();
    let _ = report.is_ok();
    let mut first = None;
    for s in img.manifest().sections.clone() {
        let r = match s.kind {
            SectionKind::Blob => img.read_blob(&s.name).map(|_| ()),
            SectionKind::Tree => {
                let _ = std::fs::remove_dir_all(scratch);
                img.extract_tree(&s.name, scratch)
            }
        };
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    match first {
        Some(e) => Err(e),
        None => img.verify().map(|_| ()),
    }
}

/// One fuzz input: the first byte picks the mode (bit 0: reseal the
/// checksums first, so that the input reaches the parsers behind them;
/// bit 1: two decompression threads), the rest is the store.
pub fn fuzz_one(data: &[u8], scratch: &Path) {
    let Some((&mode, store)) = data.split_first() else {
        return;
    };
    let mut bytes = store.to_vec();
    if mode & 1 == 1 {
        reseal(&mut bytes);
    }
    let threads = if mode & 2 == 2 { 2 } else { 1 };
    let _ = exercise(&bytes, threads, scratch);
}
