//! [`ImageWriter`], the writer's API: sections one after the other (each
//! encoded into chunks by [`crate::encode`]), then the manifest, then the
//! superblock. The old superblock is zeroed before the first byte of the
//! body, and the new one is written last, after a flush: a crash mid-write
//! never leaves a valid-looking image.

use std::io::SeekFrom;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::encode::{self, ChunkSink, Counts, EncodedSection, Output, Settings};
use crate::error::Error;
use crate::format::*;
use crate::manifest::{Manifest, SectionEntry, SectionKind};
use crate::state::State;
use crate::store::Store;
use crate::superblock::write_superblock;
use crate::tree;
use crate::workers;

#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Compression threads; 0 means one per core. 1 compresses inline, on
    /// the calling thread.
    pub threads: usize,
    /// Raw bytes per chunk, between 4 KiB and 16 MiB.
    pub chunk_size: usize,
    /// zstd level. Writing sits in the blackout: speed matters more than
    /// size, and negative levels are faster still.
    pub zstd_level: i32,
    /// Compress chunks (the default); without, chunks are stored raw
    /// (all-zero ones still as a header only): the fastest write, for a
    /// store with room for the raw bytes. [`ImageWriter::set_compress`]
    /// changes it between sections.
    pub compress: bool,
    /// Recorded in the superblock; the agent uses the creation time.
    pub generation: u64,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            threads: 0,
            chunk_size: 1 << 20,
            zstd_level: 1,
            compress: true,
            generation: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteSummary {
    /// Bytes of the image in the store, superblock included.
    pub total_len: u64,
    /// Bytes before compression, over all sections.
    pub raw_len: u64,
    /// Bytes of the sections as stored, chunk headers included.
    pub stored_len: u64,
    pub sections: usize,
    pub chunks: u64,
    /// Chunks stored as "all zero" (nothing but their header).
    pub zero_chunks: u64,
    /// Chunks stored uncompressed (compression did not help).
    pub raw_chunks: u64,
    pub elapsed: Duration,
    /// Of `elapsed`, the flush of what was written (sections and manifest)
    /// and of the superblock after it.
    pub flushes: Duration,
}

pub struct ImageWriter<S: Store> {
    store: S,
    capacity: u64,
    encoding: Settings,
    /// The level compressed sections use.
    zstd_level: i32,
    generation: u64,
    /// Where the next section starts.
    pos: u64,
    /// Over every byte written after the superblock.
    hasher: blake3::Hasher,
    counts: Counts,
    sections: Vec<SectionEntry>,
    started: Instant,
}

impl<S: Store> ImageWriter<S> {
    /// Starts an image in `store`, which can hold `capacity` bytes. Any
    /// earlier image is invalidated (and the store flushed) first.
    pub fn create(mut store: S, capacity: u64, opts: WriteOptions) -> Result<Self, Error> {
        // A superblock, a chunk and a small manifest.
        let needed = BODY_OFFSET + 4096;
        if capacity < needed {
            return Err(Error::StoreTooSmall { needed, capacity });
        }
        store
            .seek(SeekFrom::Start(0))
            .and_then(|_| store.write_all(&[0u8; BODY_OFFSET as usize]))
            .and_then(|()| store.sync())
            .map_err(Error::io("invalidate the old image in the store"))?;
        Ok(ImageWriter {
            store,
            capacity,
            zstd_level: opts.zstd_level,
            encoding: Settings {
                threads: workers::threads(opts.threads),
                level: opts.compress.then_some(opts.zstd_level),
                chunk_size: opts
                    .chunk_size
                    .clamp(MIN_CHUNK as usize, MAX_CHUNK as usize),
            },
            generation: opts.generation,
            pos: BODY_OFFSET,
            hasher: blake3::Hasher::new(),
            counts: Counts::default(),
            sections: Vec::new(),
            started: Instant::now(),
        })
    }

    /// Bytes used so far, superblock included.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Bytes left for sections and the manifest.
    pub fn remaining(&self) -> u64 {
        self.capacity.saturating_sub(self.pos)
    }

    /// Makes the sections written so far durable (the store's flush and
    /// sync, as [`finish`](Self::finish) does), so that `finish` pays only
    /// for what comes after: sections written while the workloads still run
    /// (pre-copy's rounds) leave nothing to flush to the frozen window.
    pub fn sync(&mut self) -> Result<(), Error> {
        self.store
            .flush()
            .and_then(|()| self.store.sync())
            .map_err(Error::io("flush the sections written so far to the store"))
    }

    /// Whether the sections added from now on are compressed: readers
    /// take either, chunk by chunk.
    pub fn set_compress(&mut self, compress: bool) {
        self.encoding.level = compress.then_some(self.zstd_level);
    }

    fn check_name(&self, name: &str) -> Result<(), Error> {
        if name.is_empty() || self.sections.iter().any(|s| s.name == name) {
            return Err(Error::BadSectionName(name.to_string()));
        }
        Ok(())
    }

    /// A section holding the file tree under `dir`: regular files (content,
    /// mode, owner, mtime), directories and symlinks. Any other file type is
    /// refused with an error naming it.
    pub fn add_tree(&mut self, name: &str, dir: &Path) -> Result<(), Error> {
        self.check_name(name)?;
        self.add_section(name, SectionKind::Tree, |sink| tree::write_tree(dir, sink))
    }

    /// A section holding `bytes`, at most [`MAX_BLOB`] of them (a reader
    /// holds a blob in memory).
    pub fn add_blob(&mut self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        self.check_name(name)?;
        if bytes.len() as u64 > MAX_BLOB {
            return Err(Error::BlobTooLarge {
                section: name.to_string(),
                raw_len: bytes.len() as u64,
                limit: MAX_BLOB,
            });
        }
        self.add_section(name, SectionKind::Blob, |sink| sink.write_borrowed(bytes))
    }

    /// Runs `produce`, which feeds the section's stream to a sink. On error
    /// the writer is as it was before: the next section overwrites what
    /// this one left.
    fn add_section<'a, F>(&mut self, name: &str, kind: SectionKind, produce: F) -> Result<(), Error>
    where
        F: FnOnce(&mut ChunkSink<'a, '_>) -> Result<(), Error>,
    {
        let (pos, hasher, counts) = (self.pos, self.hasher.clone(), self.counts);
        let result = self
            .store
            .seek(SeekFrom::Start(pos))
            .map_err(Error::io("seek in the store"))
            .and_then(|_| {
                let out = Output::new(
                    &mut self.store,
                    pos,
                    self.capacity,
                    &mut self.hasher,
                    &mut self.counts,
                );
                encode::encode_section(out, self.encoding, produce)
            });
        match result {
            Ok(EncodedSection {
                raw_len,
                chunks,
                end,
            }) => {
                self.sections.push(SectionEntry {
                    name: name.to_string(),
                    kind,
                    raw_len,
                    stored_len: end - pos,
                    chunks,
                    offset: pos,
                });
                self.pos = end;
                Ok(())
            }
            Err(e) => {
                (self.pos, self.hasher, self.counts) = (pos, hasher, counts);
                Err(e)
            }
        }
    }

    /// Writes the manifest (with the section table) and flushes, then writes
    /// the superblock and flushes again. Only then is the image valid.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<WriteSummary, Error> {
        manifest.sections = self.sections.clone();
        let json = serde_json::to_vec(&manifest).map_err(Error::ManifestParse)?;
        let end = self.pos + json.len() as u64;
        if end > self.capacity || json.len() as u64 > MAX_MANIFEST {
            return Err(Error::StoreTooSmall {
                needed: end,
                capacity: self.capacity,
            });
        }
        self.store
            .seek(SeekFrom::Start(self.pos))
            .and_then(|_| self.store.write_all(&json))
            .and_then(|()| self.store.flush())
            .map_err(Error::io("write the manifest to the store"))?;
        let flushing = Instant::now();
        self.store
            .sync()
            .map_err(Error::io("flush the image to the store"))?;
        let mut flushes = flushing.elapsed();
        self.hasher.update(&json);
        let mut sb = RawSuperblock {
            magic: MAGIC,
            major: FORMAT_MAJOR.into(),
            minor: FORMAT_MINOR.into(),
            state: (State::Written as u32).into(),
            generation: self.generation.into(),
            total_len: end.into(),
            manifest_offset: self.pos.into(),
            manifest_len: (json.len() as u64).into(),
            manifest_crc: crc32c::crc32c(&json).into(),
            chunk_size: (self.encoding.chunk_size as u32).into(),
            digest: *self.hasher.finalize().as_bytes(),
            reserved: [0; 4004],
            header_crc: 0.into(),
        };
        sb.seal();
        let flushing = Instant::now();
        write_superblock(&mut self.store, &sb)?;
        flushes += flushing.elapsed();
        Ok(WriteSummary {
            total_len: end,
            raw_len: self.sections.iter().map(|s| s.raw_len).sum(),
            stored_len: self.sections.iter().map(|s| s.stored_len).sum(),
            sections: self.sections.len(),
            chunks: self.counts.chunks,
            zero_chunks: self.counts.zero,
            raw_chunks: self.counts.raw,
            elapsed: self.started.elapsed(),
            flushes,
        })
    }
}
