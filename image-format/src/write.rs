//! The writer: sections are cut into chunks, compressed in parallel on all
//! cores, and written in order; the superblock goes last, after a flush, so
//! that a crash mid-write never leaves a valid-looking image.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use zerocopy::IntoBytes;

use crate::format::*;
use crate::{Error, Manifest, SectionEntry, SectionKind, State, Store};

#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Compression threads; 0 means one per core.
    pub threads: usize,
    pub chunk_size: usize,
    /// zstd level: it sits in the blackout, so speed matters most.
    pub zstd_level: i32,
    pub generation: u64,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            threads: 0,
            chunk_size: 1 << 20,
            zstd_level: 1,
            generation: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteSummary {
    pub total_len: u64,
    /// Bytes before compression, over all sections.
    pub raw_len: u64,
    /// Bytes of chunks as stored.
    pub stored_len: u64,
    pub elapsed: Duration,
}

pub struct ImageWriter<S: Store> {
    store: S,
    capacity: u64,
    opts: WriteOptions,
    pos: u64,
    hasher: blake3::Hasher,
    sections: Vec<SectionEntry>,
    started: Instant,
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.to_string(),
        source,
    }
}

impl<S: Store> ImageWriter<S> {
    /// Starts an image in `store` of `capacity` bytes. Any earlier image is
    /// invalidated first.
    pub fn create(mut store: S, capacity: u64, opts: WriteOptions) -> Result<Self, Error> {
        if capacity < BODY_OFFSET + 4096 {
            return Err(Error::StoreTooSmall {
                needed: BODY_OFFSET + 4096,
                capacity,
            });
        }
        crate::state::invalidate(&mut store)?;
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            opts.threads
        };
        let chunk_size = opts.chunk_size.clamp(4096, MAX_CHUNK as usize);
        Ok(ImageWriter {
            store,
            capacity,
            opts: WriteOptions {
                threads,
                chunk_size,
                ..opts
            },
            pos: BODY_OFFSET,
            hasher: blake3::Hasher::new(),
            sections: Vec::new(),
            started: Instant::now(),
        })
    }

    fn check_name(&self, name: &str) -> Result<(), Error> {
        if name.is_empty() || self.sections.iter().any(|s| s.name == name) {
            return Err(Error::BadSectionName(name.to_string()));
        }
        Ok(())
    }

    /// A section holding a file tree: regular files (content, mode, mtime),
    /// directories and symlinks. Other file types are refused.
    pub fn add_tree(&mut self, name: &str, dir: &Path) -> Result<(), Error> {
        self.check_name(name)?;
        let dir = dir.to_path_buf();
        self.add_section(name, SectionKind::Tree, move |out| write_tree(&dir, out))
    }

    pub fn add_blob(&mut self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        self.check_name(name)?;
        self.add_section(name, SectionKind::Blob, |out| {
            out.write_all(bytes).map_err(io_err("blob"))
        })
    }

    /// Runs `produce`, which writes the section's raw bytes; they are cut
    /// into chunks that worker threads compress while the producer goes on,
    /// and a writer thread stores them in order.
    fn add_section<F>(&mut self, name: &str, kind: SectionKind, produce: F) -> Result<(), Error>
    where
        F: FnOnce(&mut dyn Write) -> Result<(), Error>,
    {
        let offset = self.pos;
        let opts = self.opts.clone();
        let capacity = self.capacity;
        let store = &mut self.store;
        let hasher = &mut self.hasher;
        let start_pos = self.pos;
        let (raw_len, chunks, end) = std::thread::scope(|s| -> Result<(u64, u32, u64), Error> {
            let (job_tx, job_rx) = mpsc::sync_channel::<(u32, Vec<u8>)>(opts.threads * 2);
            let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
            let (done_tx, done_rx) = mpsc::sync_channel::<(u32, Vec<u8>)>(opts.threads * 2);
            for _ in 0..opts.threads {
                let (rx, tx) = (job_rx.clone(), done_tx.clone());
                let level = opts.zstd_level;
                s.spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    let Ok((index, raw)) = job else { return };
                    if tx.send((index, encode_chunk(index, &raw, level))).is_err() {
                        return;
                    }
                });
            }
            drop(done_tx);
            // The writer: stores finished chunks in index order.
            let writer = s.spawn(move || -> Result<u64, Error> {
                let mut pending = BTreeMap::new();
                let mut next = 0u32;
                let mut pos = start_pos;
                store.seek(SeekFrom::Start(pos)).map_err(io_err("store"))?;
                let mut out = io::BufWriter::with_capacity(4 << 20, &mut *store);
                for (index, bytes) in done_rx {
                    pending.insert(index, bytes);
                    while let Some(bytes) = pending.remove(&next) {
                        let end = pos + bytes.len() as u64;
                        if end > capacity {
                            return Err(Error::StoreTooSmall {
                                needed: end,
                                capacity,
                            });
                        }
                        out.write_all(&bytes).map_err(io_err("store"))?;
                        hasher.update(&bytes);
                        pos = end;
                        next += 1;
                    }
                }
                out.flush().map_err(io_err("store"))?;
                Ok(pos)
            });
            let mut chunker = Chunker {
                buf: Vec::with_capacity(opts.chunk_size),
                size: opts.chunk_size,
                next: 0,
                raw: 0,
                tx: job_tx,
            };
            let produced =
                produce(&mut chunker).and_then(|()| chunker.flush_chunk().map_err(io_err("chunk")));
            let (raw, n) = (chunker.raw, chunker.next);
            drop(chunker); // closes the job channel: workers and writer finish
            let end = writer.join().map_err(|_| Error::Io {
                what: "writer".into(),
                source: io::Error::other("thread panicked"),
            })?;
            // A writer failure (store full) explains a producer failure (channel closed).
            let end = end?;
            produced?;
            Ok((raw, n, end))
        })?;
        self.pos = end;
        self.sections.push(SectionEntry {
            name: name.to_string(),
            kind,
            raw_len,
            stored_len: end - offset,
            chunks,
            offset,
        });
        Ok(())
    }

    /// Writes the manifest, flushes, then writes the superblock and flushes
    /// again. Only then is the image valid.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<WriteSummary, Error> {
        manifest.sections = self.sections.clone();
        let json =
            serde_json::to_vec(&manifest).map_err(|e| Error::ManifestParse(e.to_string()))?;
        let end = self.pos + json.len() as u64;
        if end > self.capacity {
            return Err(Error::StoreTooSmall {
                needed: end,
                capacity: self.capacity,
            });
        }
        self.store
            .seek(SeekFrom::Start(self.pos))
            .map_err(io_err("store"))?;
        self.store.write_all(&json).map_err(io_err("store"))?;
        self.hasher.update(&json);
        self.store.sync().map_err(io_err("store"))?;
        let mut sb = RawSuperblock {
            magic: MAGIC,
            major: FORMAT_MAJOR.into(),
            minor: FORMAT_MINOR.into(),
            state: (State::Written as u32).into(),
            generation: self.opts.generation.into(),
            total_len: end.into(),
            manifest_offset: self.pos.into(),
            manifest_len: (json.len() as u64).into(),
            manifest_crc: crc32c::crc32c(&json).into(),
            reserved: 0.into(),
            digest: *self.hasher.finalize().as_bytes(),
            header_crc: 0.into(),
        };
        sb.header_crc = sb.crc().into();
        crate::state::write_superblock(&mut self.store, &sb)?;
        let raw_len = self.sections.iter().map(|s| s.raw_len).sum();
        let stored_len = self.sections.iter().map(|s| s.stored_len).sum();
        Ok(WriteSummary {
            total_len: end,
            raw_len,
            stored_len,
            elapsed: self.started.elapsed(),
        })
    }
}

/// Header + stored bytes of one chunk.
fn encode_chunk(index: u32, raw: &[u8], level: i32) -> Vec<u8> {
    let (kind, stored): (u8, std::borrow::Cow<[u8]>) = if raw.iter().all(|&b| b == 0) {
        (CHUNK_ZERO, std::borrow::Cow::Borrowed(&[]))
    } else {
        match zstd::bulk::compress(raw, level) {
            Ok(c) if c.len() < raw.len() => (CHUNK_ZSTD, std::borrow::Cow::Owned(c)),
            _ => (CHUNK_RAW, std::borrow::Cow::Borrowed(raw)),
        }
    };
    let h = ChunkHeader {
        magic: CHUNK_MAGIC.into(),
        kind,
        reserved: [0; 3],
        index: index.into(),
        raw_len: (raw.len() as u32).into(),
        stored_len: (stored.len() as u32).into(),
        crc: crc32c::crc32c(&stored).into(),
    };
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN as usize + stored.len());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&stored);
    out
}

/// Cuts a byte stream into chunk jobs.
struct Chunker {
    buf: Vec<u8>,
    size: usize,
    next: u32,
    raw: u64,
    tx: mpsc::SyncSender<(u32, Vec<u8>)>,
}

impl Chunker {
    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.size));
        self.tx
            .send((self.next, full))
            .map_err(|_| io::Error::other("the image writer stopped"))?;
        self.next += 1;
        Ok(())
    }
}

impl Write for Chunker {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.raw += n as u64;
        if self.buf.len() == self.size {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn write_record(out: &mut dyn Write, kind: u8, mode: u32, mtime: i64, rel: &str) -> io::Result<()> {
    out.write_all(&[kind])?;
    out.write_all(&mode.to_le_bytes())?;
    out.write_all(&mtime.to_le_bytes())?;
    out.write_all(&(rel.len() as u16).to_le_bytes())?;
    out.write_all(rel.as_bytes())
}

/// Serialises `root` depth first, directories before their content, in name
/// order so that the same tree gives the same bytes.
fn write_tree(root: &Path, out: &mut dyn Write) -> Result<(), Error> {
    let meta = fs::symlink_metadata(root).map_err(|source| Error::Io {
        what: root.display().to_string(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(Error::UnsupportedFile {
            path: root.display().to_string(),
        });
    }
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(|source| Error::Io {
                what: dir.display().to_string(),
                source,
            })?
            .collect::<Result<_, _>>()
            .map_err(|source| Error::Io {
                what: dir.display().to_string(),
                source,
            })?;
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in entries {
            let name = e
                .file_name()
                .into_string()
                .map_err(|n| Error::UnsupportedFile {
                    path: format!("{}/{} (not UTF-8)", dir.display(), n.to_string_lossy()),
                })?;
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let path = root.join(&child);
            if child.len() > u16::MAX as usize {
                return Err(Error::UnsupportedFile {
                    path: path.display().to_string(),
                });
            }
            let m = fs::symlink_metadata(&path).map_err(|source| Error::Io {
                what: path.display().to_string(),
                source,
            })?;
            let mode = m.permissions().mode() & 0o7777;
            let io = |source| Error::Io {
                what: path.display().to_string(),
                source,
            };
            if m.is_dir() {
                write_record(out, REC_DIR, mode, m.mtime(), &child).map_err(io)?;
                subdirs.push(child);
            } else if m.is_file() {
                write_record(out, REC_FILE, mode, m.mtime(), &child).map_err(io)?;
                let mut f = fs::File::open(&path).map_err(io)?;
                out.write_all(&m.len().to_le_bytes()).map_err(io)?;
                // Exactly the size announced, even if the file changes.
                let copied = io::copy(&mut (&mut f).take(m.len()), out).map_err(io)?;
                if copied != m.len() {
                    return Err(Error::Io {
                        what: path.display().to_string(),
                        source: io::Error::other("the file shrank while it was being written"),
                    });
                }
            } else if m.file_type().is_symlink() {
                let target = fs::read_link(&path).map_err(io)?;
                let target = target.to_str().ok_or_else(|| Error::UnsupportedFile {
                    path: path.display().to_string(),
                })?;
                write_record(out, REC_SYMLINK, 0o777, m.mtime(), &child).map_err(io)?;
                out.write_all(&(target.len() as u16).to_le_bytes())
                    .map_err(io)?;
                out.write_all(target.as_bytes()).map_err(io)?;
            } else {
                return Err(Error::UnsupportedFile {
                    path: path.display().to_string(),
                });
            }
        }
        // Reverse so that the stack pops them in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    out.write_all(&[REC_END]).map_err(io_err("tree"))
}
