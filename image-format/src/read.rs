//! The reader: checks the superblock and the manifest against the store
//! before trusting any size, then streams one section at a time, checking
//! every chunk as it goes. Chunks are read in order by one thread and
//! decompressed by a pool of workers; the caller consumes them in order.

use std::fs::File;
use std::io::{self, BufReader, Cursor, Read, Seek, SeekFrom, Take, Write};
use std::path::Path;

use zerocopy::FromBytes;

use crate::format::*;
use crate::workers::{self, Pool, Results, Submitter};
use crate::{Error, Manifest, SectionEntry, SectionKind, State, Superblock};

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
    /// The whole-image digest (blake3 of everything after the superblock).
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

/// A store the reader can hand to its I/O thread.
trait ReadSend: Read + Send {}
impl<T: Read + Send> ReadSend for T {}

fn read_exact_at<R: Read + Seek>(
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

fn store_len<R: Seek>(store: &mut R) -> Result<u64, Error> {
    // Seeking to the end works for block devices, where metadata says 0.
    store
        .seek(SeekFrom::End(0))
        .map_err(Error::io("find the size of the store"))
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
pub(crate) fn check_superblock(raw: &RawSuperblock) -> Result<Superblock, Error> {
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

/// Checks the section table against the image: sections follow each other
/// from the end of the superblock to the manifest, and each can hold what
/// it claims.
fn check_sections(sb: &Superblock, m: &Manifest) -> Result<(), Error> {
    let outside = |s: &SectionEntry, detail: String| Error::SectionOutside {
        section: s.name.clone(),
        detail,
    };
    let mut expected = BODY_OFFSET;
    for (i, s) in m.sections.iter().enumerate() {
        if s.name.is_empty() || m.sections[..i].iter().any(|o| o.name == s.name) {
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
        let headers = u64::from(s.chunks) * CHUNK_HEADER_LEN as u64;
        if headers > s.stored_len {
            return Err(outside(
                s,
                format!("claims {} chunks in {} bytes", s.chunks, s.stored_len),
            ));
        }
        let most = u64::from(s.chunks) * u64::from(sb.chunk_size);
        if s.raw_len > most || s.raw_len < u64::from(s.chunks) {
            return Err(outside(
                s,
                format!("claims {} raw bytes in {} chunks", s.raw_len, s.chunks),
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

    /// The bytes of a blob section, every chunk checked.
    pub fn read_blob(&mut self, name: &str) -> Result<Vec<u8>, Error> {
        let s = self.section(name, SectionKind::Blob)?;
        self.with_section(&s, None, |st| {
            // The table's length is checked against the chunks as they come.
            let mut out = Vec::with_capacity(st.remaining().min(64 << 20) as usize);
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
        self.with_section(&s, None, |st| crate::tree::extract(st, &s.name, dest))
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

    /// Runs `consume` on the stream of one section. With `hasher`, every
    /// stored byte of the section goes into it, even past a damaged chunk.
    fn with_section<T>(
        &mut self,
        s: &SectionEntry,
        hasher: Option<&mut blake3::Hasher>,
        consume: impl FnOnce(&mut SectionStream<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.store
            .seek(SeekFrom::Start(s.offset))
            .map_err(Error::io(format!("seek to section {}", s.name)))?;
        let store: &mut (dyn ReadSend + '_) = &mut self.store;
        let pool = Pool::new(4 * self.threads + 8, self.superblock.chunk_size as usize);
        let frames = FrameReader {
            pool: pool.clone(),
            src: BufReader::with_capacity(1 << 20, store.take(s.stored_len)),
            section: &s.name,
            table: s,
            chunk_size: self.superblock.chunk_size,
            next: 0,
            pos: 0,
            raw: 0,
            hasher,
        };
        let decoder = || zstd::bulk::Decompressor::new().map_err(|e| e.to_string());
        if self.threads <= 1 {
            let mut st = SectionStream::new(
                s,
                pool.clone(),
                Source::Inline {
                    frames: Box::new(frames),
                    dctx: decoder(),
                },
            );
            let result = consume(&mut st);
            if let Source::Inline { mut frames, .. } = st.source {
                frames.drain();
            }
            return result;
        }
        let name = s.name.as_str();
        let worker_pool = pool.clone();
        std::thread::scope(|scope| {
            let (sub, results) = workers::start(
                scope,
                self.threads,
                decoder,
                move |d: &mut Dctx, f: Frame| decode(name, f, d, &worker_pool),
            );
            let producer = scope.spawn(move || read_frames(frames, sub));
            let mut st = SectionStream::new(s, pool, Source::Parallel(results));
            let result = consume(&mut st);
            // Stops the reading thread if the consumer stopped early.
            drop(st);
            producer
                .join()
                .map_err(|_| Error::Internal("the image reader panicked"))?;
            result
        })
    }
}

/// One chunk as stored, its header and checksum checked.
struct Frame {
    index: u32,
    kind: u8,
    raw_len: u32,
    stored: Vec<u8>,
}

struct FrameReader<'x> {
    src: BufReader<Take<&'x mut (dyn ReadSend + 'x)>>,
    section: &'x str,
    table: &'x SectionEntry,
    chunk_size: u32,
    next: u32,
    /// Stored bytes read so far.
    pos: u64,
    /// Raw bytes announced by the chunks read so far.
    raw: u64,
    hasher: Option<&'x mut blake3::Hasher>,
    pool: Pool,
}

impl FrameReader<'_> {
    fn bad_header(&self, detail: impl Into<String>) -> Error {
        Error::ChunkHeader {
            section: self.section.into(),
            chunk: self.next,
            detail: detail.into(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        self.src.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::Truncated {
                    what: format!("section {} at chunk {}", self.section, self.next),
                }
            } else {
                Error::Io {
                    what: format!("read section {} at chunk {}", self.section, self.next),
                    source: e,
                }
            }
        })?;
        if let Some(h) = self.hasher.as_deref_mut() {
            h.update(buf);
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// The next chunk, `None` after the last one (once the section's sizes
    /// are found to match the table).
    fn next(&mut self) -> Result<Option<Frame>, Error> {
        let t = self.table;
        if self.next == t.chunks {
            if self.pos != t.stored_len || self.raw != t.raw_len {
                return Err(Error::SectionSize {
                    section: t.name.clone(),
                });
            }
            return Ok(None);
        }
        let left = t.stored_len - self.pos;
        if left < CHUNK_HEADER_LEN as u64 {
            return Err(self.bad_header("it runs past the end of its section"));
        }
        let mut hb = [0u8; CHUNK_HEADER_LEN];
        self.read(&mut hb)?;
        let h = ChunkHeader::read_from_bytes(&hb).map_err(|_| self.bad_header("unreadable"))?;
        let stored_len = u64::from(h.stored_len.get());
        if stored_len > left - CHUNK_HEADER_LEN as u64 {
            return Err(self.bad_header(format!(
                "its {stored_len} stored bytes run past the end of its section"
            )));
        }
        // Bounded by the section, itself bounded by the store.
        let mut stored = self.pool.get(stored_len as usize);
        stored.resize(stored_len as usize, 0);
        self.read(&mut stored)?;
        if h.crc.get() != h.crc_with(&stored) {
            return Err(Error::ChunkChecksum {
                section: self.section.into(),
                chunk: self.next,
            });
        }
        let (kind, raw_len) = (h.kind, h.raw_len.get());
        if h.magic.get() != CHUNK_MAGIC {
            return Err(self.bad_header("bad magic"));
        }
        if h.index.get() != self.next {
            return Err(self.bad_header(format!("it says it is chunk {}", h.index.get())));
        }
        if raw_len == 0 || raw_len > self.chunk_size {
            return Err(self.bad_header(format!(
                "its raw length {raw_len} is 0 or above the chunk size {}",
                self.chunk_size
            )));
        }
        let consistent = match kind {
            CHUNK_RAW => stored_len == u64::from(raw_len),
            CHUNK_ZERO => stored_len == 0,
            CHUNK_ZSTD => stored_len > 0 && stored_len < u64::from(raw_len),
            _ => return Err(self.bad_header(format!("unknown kind {kind}"))),
        };
        if !consistent {
            return Err(self.bad_header(format!(
                "{stored_len} stored bytes do not fit kind {kind} with {raw_len} raw bytes"
            )));
        }
        let index = self.next;
        self.next += 1;
        self.raw += u64::from(raw_len);
        Ok(Some(Frame {
            index,
            kind,
            raw_len,
            stored,
        }))
    }

    /// Hashes what is left of the section, if hashing.
    fn drain(&mut self) {
        if let Some(h) = self.hasher.as_deref_mut() {
            // A read error here shows up as a digest mismatch.
            let _ = io::copy(&mut self.src, h);
        }
    }
}

/// The I/O thread: reads chunks in order; workers decompress the zstd ones.
fn read_frames(mut frames: FrameReader<'_>, sub: Submitter<Frame, Result<Piece, Error>>) {
    loop {
        let sent = match frames.next() {
            Ok(Some(f)) if f.kind == CHUNK_ZSTD => sub.submit(f),
            Ok(Some(f)) => sub.submit_done(Ok(trivial(f))),
            Ok(None) => break,
            Err(e) => {
                let _ = sub.submit_done(Err(e));
                break;
            }
        };
        if sent.is_err() {
            break;
        }
    }
    drop(sub);
    frames.drain();
}

/// A raw or zero chunk: nothing to decompress.
fn trivial(f: Frame) -> Piece {
    if f.kind == CHUNK_ZERO {
        Piece::Zeros(u64::from(f.raw_len))
    } else {
        Piece::Data(f.stored)
    }
}

fn decode(section: &str, f: Frame, dctx: &mut Dctx, pool: &Pool) -> Result<Piece, Error> {
    if f.kind != CHUNK_ZSTD {
        return Ok(trivial(f));
    }
    let fail = |detail: String| Error::Decompress {
        section: section.into(),
        chunk: f.index,
        detail,
    };
    let d = dctx.as_mut().map_err(|e| fail(e.clone()))?;
    let raw_len = f.raw_len as usize;
    // Room for raw_len and more: a frame longer than announced must fail
    // on the length check, whatever capacity the buffer happens to have.
    let mut out = pool.get(raw_len);
    let result = d.decompress_to_buffer(&f.stored[..], &mut out);
    pool.put(f.stored);
    result.map_err(|e| fail(e.to_string()))?;
    if out.len() != raw_len {
        return Err(fail(format!(
            "{} bytes where {raw_len} were expected",
            out.len()
        )));
    }
    Ok(Piece::Data(out))
}

/// A run of a section's stream.
pub(crate) enum Piece {
    Data(Vec<u8>),
    Zeros(u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Data(d) => d.len() as u64,
            Piece::Zeros(n) => *n,
        }
    }
}

type Dctx = Result<zstd::bulk::Decompressor<'static>, String>;

enum Source<'x> {
    Inline {
        frames: Box<FrameReader<'x>>,
        dctx: Dctx,
    },
    Parallel(Results<Result<Piece, Error>>),
}

/// The raw stream of one section, in order, as the consumer sees it.
pub(crate) struct SectionStream<'x> {
    source: Source<'x>,
    pool: Pool,
    section: String,
    raw_len: u64,
    /// Raw bytes handed out so far.
    offset: u64,
    data: Vec<u8>,
    at: usize,
    zeros: u64,
    ended: bool,
}

impl<'x> SectionStream<'x> {
    fn new(s: &SectionEntry, pool: Pool, source: Source<'x>) -> Self {
        SectionStream {
            source,
            pool,
            section: s.name.clone(),
            raw_len: s.raw_len,
            offset: 0,
            data: Vec::new(),
            at: 0,
            zeros: 0,
            ended: false,
        }
    }

    fn next_piece(&mut self) -> Result<Option<Piece>, Error> {
        if self.ended {
            return Ok(None);
        }
        let piece = match &mut self.source {
            Source::Inline { frames, dctx } => match frames.next()? {
                Some(f) => Some(decode(&self.section, f, dctx, &self.pool)?),
                None => None,
            },
            Source::Parallel(results) => match results.next() {
                Some(Ok(r)) => Some(r?),
                Some(Err(_)) => return Err(Error::Internal("a decompression thread died")),
                None => None,
            },
        };
        self.ended = piece.is_none();
        Ok(piece)
    }

    /// Makes the next piece current; false at the end of the stream.
    fn refill(&mut self) -> Result<bool, Error> {
        if self.zeros > 0 || self.at < self.data.len() {
            return Ok(true);
        }
        loop {
            match self.next_piece()? {
                None => return Ok(false),
                Some(Piece::Data(d)) if !d.is_empty() => {
                    let old = std::mem::replace(&mut self.data, d);
                    self.pool.put(old);
                    self.at = 0;
                    return Ok(true);
                }
                Some(Piece::Zeros(n)) if n > 0 => {
                    self.zeros = n;
                    return Ok(true);
                }
                Some(_) => {}
            }
        }
    }

    /// Raw bytes consumed so far.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Raw bytes left according to the section table.
    pub(crate) fn remaining(&self) -> u64 {
        self.raw_len.saturating_sub(self.offset)
    }

    /// Fills `buf`; false if the stream ended first.
    pub(crate) fn read_exact(&mut self, buf: &mut [u8]) -> Result<bool, Error> {
        let mut filled = 0;
        while filled < buf.len() {
            if !self.refill()? {
                return Ok(false);
            }
            let want = buf.len() - filled;
            let n = if self.zeros > 0 {
                let n = want.min(self.zeros.min(usize::MAX as u64) as usize);
                buf[filled..filled + n].fill(0);
                self.zeros -= n as u64;
                n
            } else {
                let n = want.min(self.data.len() - self.at);
                buf[filled..filled + n].copy_from_slice(&self.data[self.at..self.at + n]);
                self.at += n;
                n
            };
            filled += n;
            self.offset += n as u64;
        }
        Ok(true)
    }

    /// Copies up to `len` bytes into a new file, leaving holes for runs of
    /// zero chunks. Returns how many were copied: fewer if the stream ended.
    pub(crate) fn copy_to_file(
        &mut self,
        f: &mut File,
        len: u64,
        path: &Path,
    ) -> Result<u64, Error> {
        let io = |e| Error::Io {
            what: format!("write {}", path.display()),
            source: e,
        };
        let mut done = 0u64;
        let mut holes = false;
        while done < len && self.refill()? {
            let want = len - done;
            let n = if self.zeros > 0 {
                let n = want.min(self.zeros);
                f.seek(SeekFrom::Current(n as i64)).map_err(io)?;
                holes = true;
                self.zeros -= n;
                n
            } else {
                let n = want.min((self.data.len() - self.at) as u64) as usize;
                f.write_all(&self.data[self.at..self.at + n]).map_err(io)?;
                self.at += n;
                n as u64
            };
            done += n;
            self.offset += n;
        }
        if holes {
            f.set_len(done).map_err(io)?;
        }
        Ok(done)
    }

    /// True if nothing is left, once the stream's end (and its final size
    /// check) has been seen.
    pub(crate) fn at_end(&mut self) -> Result<bool, Error> {
        Ok(!self.refill()?)
    }

    /// Hands every remaining piece to `f`.
    fn for_each(&mut self, mut f: impl FnMut(&Piece)) -> Result<(), Error> {
        if self.zeros > 0 {
            f(&Piece::Zeros(std::mem::take(&mut self.zeros)));
        }
        if self.at < self.data.len() {
            f(&Piece::Data(self.data.split_off(self.at)));
            self.at = 0;
            self.data.clear();
        }
        while let Some(p) = self.next_piece()? {
            self.offset += p.len();
            f(&p);
            if let Piece::Data(d) = p {
                self.pool.put(d);
            }
        }
        Ok(())
    }
}
