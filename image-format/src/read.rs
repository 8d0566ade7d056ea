//! [`Image`], the reader's API: opening checks the superblock, then the
//! manifest and its section table against the store, before any size is
//! trusted; each read then streams one section through the decoder
//! ([`crate::decode`]), checking every chunk as it goes.

use std::collections::HashSet;
use std::io::{Cursor, Read, Seek, Write};
use std::path::Path;

use crate::decode::{self, Piece, SectionStream};
use crate::error::Error;
use crate::format::{BODY_OFFSET, CHUNK_HEADER_LEN, MAX_BLOB};
use crate::manifest::{Manifest, SectionEntry, SectionKind};
use crate::store::{read_exact_at, store_len};
use crate::superblock::{load_superblock, Superblock};
use crate::tree;
use crate::workers;

/// An image opened from a store: its superblock and manifest are checked.
pub struct Image<R> {
    store: R,
    store_len: u64,
    superblock: Superblock,
    manifest: Manifest,
    threads: usize,
}

/// What checking one section found.
#[derive(Debug)]
pub struct SectionReport {
    pub name: String,
    pub kind: SectionKind,
    pub chunks: u32,
    pub raw_len: u64,
    pub stored_len: u64,
    /// Chunks stored as "all zero".
    pub zero_chunks: u32,
    pub result: Result<(), Error>,
}

/// What checking a whole image found: each section, then the digest.
#[derive(Debug)]
pub struct VerifyReport {
    pub sections: Vec<SectionReport>,
    /// The whole-image digest (blake3 of the chunk headers and the manifest).
    pub digest: Result<(), Error>,
    pub chunks: u64,
    pub raw_len: u64,
    pub stored_len: u64,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.digest.is_ok() && self.sections.iter().all(|s| s.result.is_ok())
    }
}

/// Checks the section table against the image: names are unique,
/// sections follow each other from the end of the superblock to the
/// manifest, and each one's lengths agree with its chunk count and the
/// chunk size (see the limits in [`format`](mod@crate::format)). Linear in
/// the number of sections.
fn check_sections(sb: &Superblock, m: &Manifest) -> Result<(), Error> {
    let outside = |s: &SectionEntry, detail: String| Error::SectionOutside {
        section: s.name.clone(),
        detail,
    };
    let chunk_size = u64::from(sb.chunk_size);
    let header = CHUNK_HEADER_LEN as u64;
    let mut names = HashSet::with_capacity(m.sections.len());
    let mut expected = BODY_OFFSET;
    for s in &m.sections {
        if s.name.is_empty() || !names.insert(s.name.as_str()) {
            return Err(outside(s, "has an empty or repeated name".into()));
        }
        if s.offset != expected {
            return Err(outside(
                s,
                format!("starts at {} where {expected} was expected", s.offset),
            ));
        }
        let end = s.offset.checked_add(s.stored_len);
        if end.is_none_or(|e| e > sb.manifest_offset) {
            return Err(outside(
                s,
                format!(
                    "runs past the manifest at {} ({} bytes at {})",
                    sb.manifest_offset, s.stored_len, s.offset
                ),
            ));
        }
        // Every chunk but the last holds the chunk size.
        let chunks = u64::from(s.chunks);
        if s.raw_len.div_ceil(chunk_size) != chunks {
            return Err(outside(
                s,
                format!(
                    "claims {} raw bytes in {} chunks of {chunk_size}",
                    s.raw_len, s.chunks
                ),
            ));
        }
        // Each chunk stores a header and at most the chunk size.
        if s.stored_len < chunks * header || s.stored_len > chunks * (header + chunk_size) {
            return Err(outside(
                s,
                format!("claims {} chunks in {} bytes", s.chunks, s.stored_len),
            ));
        }
        expected = s.offset + s.stored_len;
    }
    if expected != sb.manifest_offset {
        return Err(Error::SectionOutside {
            section: m
                .sections
                .last()
                .map_or("(none)".into(), |s| s.name.clone()),
            detail: format!(
                "is followed by {} unaccounted bytes before the manifest",
                sb.manifest_offset.saturating_sub(expected)
            ),
        });
    }
    Ok(())
}

impl<'a> Image<Cursor<&'a [u8]>> {
    /// An image held in memory.
    pub fn from_slice(bytes: &'a [u8]) -> Result<Self, Error> {
        Image::open(Cursor::new(bytes))
    }
}

impl Image<Cursor<Vec<u8>>> {
    pub fn from_vec(bytes: Vec<u8>) -> Result<Self, Error> {
        Image::open(Cursor::new(bytes))
    }
}

impl<R: Read + Seek + Send> Image<R> {
    /// Opens the image in `store`, checking the superblock, its sizes against
    /// the store's (found by seeking to the end, which works for block
    /// devices), the manifest and the section table. Chunks are checked
    /// when read.
    pub fn open(mut store: R) -> Result<Self, Error> {
        let store_len = store_len(&mut store)?;
        let (_, sb) = load_superblock(&mut store, store_len)?;
        if sb.total_len > store_len {
            return Err(Error::LengthExceedsStore {
                total: sb.total_len,
                store: store_len,
            });
        }
        // Bounded by MAX_MANIFEST and by the store.
        let mut json = vec![0u8; sb.manifest_len as usize];
        read_exact_at(&mut store, sb.manifest_offset, &mut json, "manifest")?;
        if crc32c::crc32c(&json) != sb.manifest_crc {
            return Err(Error::ManifestChecksum);
        }
        let manifest: Manifest = serde_json::from_slice(&json).map_err(Error::ManifestParse)?;
        check_sections(&sb, &manifest)?;
        Ok(Image {
            store,
            store_len,
            superblock: sb,
            manifest,
            threads: workers::threads(0),
        })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Size of the store, which may be larger than the image.
    pub fn store_len(&self) -> u64 {
        self.store_len
    }

    /// Decompression threads for the reads that follow; 0 (the default)
    /// means one per core, 1 reads everything on the calling thread.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = workers::threads(threads);
    }

    pub fn into_store(self) -> R {
        self.store
    }

    fn section(&self, name: &str, kind: SectionKind) -> Result<SectionEntry, Error> {
        let s = self
            .manifest
            .section(name)
            .ok_or_else(|| Error::NoSection(name.into()))?;
        if s.kind != kind {
            return Err(Error::WrongKind {
                section: name.into(),
                found: s.kind,
                expected: kind,
            });
        }
        Ok(s.clone())
    }

    /// The bytes of a blob section, every chunk checked. A section table
    /// claiming more than [`MAX_BLOB`] is refused before anything is read.
    pub fn read_blob(&mut self, name: &str) -> Result<Vec<u8>, Error> {
        let s = self.section(name, SectionKind::Blob)?;
        if s.raw_len > MAX_BLOB {
            return Err(Error::BlobTooLarge {
                section: s.name,
                raw_len: s.raw_len,
                limit: MAX_BLOB,
            });
        }
        self.with_section(&s, None, |st| {
            // The decoder never hands out more than the table's length.
            let mut out = Vec::with_capacity(st.remaining() as usize);
            st.for_each(|piece| match piece {
                Piece::Data(d) => out.extend_from_slice(d),
                Piece::Zeros(n) => out.resize(out.len() + *n as usize, 0),
            })?;
            Ok(out)
        })
    }

    /// Copies the raw bytes of any section to `out`, every chunk checked.
    pub fn copy_section(&mut self, name: &str, out: &mut dyn Write) -> Result<u64, Error> {
        let s = self
            .manifest
            .section(name)
            .cloned()
            .ok_or_else(|| Error::NoSection(name.into()))?;
        let zeros = [0u8; 64 << 10];
        self.with_section(&s, None, |st| {
            let mut result = Ok(());
            let mut n = 0u64;
            st.for_each(|piece| {
                if result.is_err() {
                    return;
                }
                result = match piece {
                    Piece::Data(d) => out.write_all(d),
                    Piece::Zeros(mut z) => {
                        let mut r = Ok(());
                        while z > 0 && r.is_ok() {
                            let k = z.min(zeros.len() as u64) as usize;
                            r = out.write_all(&zeros[..k]);
                            z -= k as u64;
                        }
                        r
                    }
                };
                n += piece.len();
            })?;
            result.map_err(Error::io(format!("write out section {}", s.name)))?;
            Ok(n)
        })
    }

    /// Recreates a tree section under `dest`, checking every chunk as it
    /// reads and reading no other section. A path that would land outside
    /// `dest` (`..`, absolute, through a symlink the tree made) is refused.
    /// Directories that already exist keep their mode, owner and time.
    pub fn extract_tree(&mut self, name: &str, dest: &Path) -> Result<(), Error> {
        let s = self.section(name, SectionKind::Tree)?;
        self.with_section(&s, None, |st| tree::extract(st, &s.name, dest))
    }

    /// Checks everything: each section's chunks (checksums, headers,
    /// decompression, sizes) and the whole-image digest, in one pass over
    /// the image. Goes on past a damaged section, so that the report names
    /// every one.
    pub fn check(&mut self) -> VerifyReport {
        let mut hasher = blake3::Hasher::new();
        let mut report = VerifyReport {
            sections: Vec::new(),
            digest: Ok(()),
            chunks: 0,
            raw_len: 0,
            stored_len: 0,
        };
        for s in self.manifest.sections.clone() {
            let mut zero_chunks = 0u32;
            let result = self.with_section(&s, Some(&mut hasher), |st| {
                st.for_each(|p| {
                    if matches!(p, Piece::Zeros(_)) {
                        zero_chunks += 1;
                    }
                })
            });
            report.chunks += u64::from(s.chunks);
            report.raw_len += s.raw_len;
            report.stored_len += s.stored_len;
            report.sections.push(SectionReport {
                name: s.name,
                kind: s.kind,
                chunks: s.chunks,
                raw_len: s.raw_len,
                stored_len: s.stored_len,
                zero_chunks,
                result,
            });
        }
        report.digest = self.finish_digest(hasher);
        report
    }

    fn finish_digest(&mut self, mut hasher: blake3::Hasher) -> Result<(), Error> {
        let sb = &self.superblock;
        let mut json = vec![0u8; sb.manifest_len as usize];
        read_exact_at(&mut self.store, sb.manifest_offset, &mut json, "manifest")?;
        hasher.update(&json);
        if *hasher.finalize().as_bytes() != sb.digest {
            return Err(Error::DigestMismatch);
        }
        Ok(())
    }

    /// [`check`](Self::check), failing with the first problem found.
    pub fn verify(&mut self) -> Result<VerifyReport, Error> {
        let mut report = self.check();
        for s in &mut report.sections {
            std::mem::replace(&mut s.result, Ok(()))?;
        }
        std::mem::replace(&mut report.digest, Ok(()))?;
        Ok(report)
    }

    /// Runs `consume` on the stream of one section (see
    /// [`decode::read_section`]).
    fn with_section<T>(
        &mut self,
        s: &SectionEntry,
        hasher: Option<&mut blake3::Hasher>,
        consume: impl FnOnce(&mut SectionStream<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let chunk_size = self.superblock.chunk_size;
        decode::read_section(
            &mut self.store,
            s,
            chunk_size,
            self.threads,
            hasher,
            consume,
        )
    }
}
