//! Chunks back into a section's stream: each chunk's header and checksum
//! are checked as it is read, zstd chunks are decompressed (by a pool of
//! workers when there are several threads), and the consumer takes the
//! section's raw stream in order from a [`SectionStream`].

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Take, Write};
use std::path::Path;

use zerocopy::FromBytes;

use crate::error::Error;
use crate::format::*;
use crate::manifest::SectionEntry;
use crate::store::IO_BUFFER;
use crate::workers::{self, Pool, Results, Submitter};

/// A store the reader can hand to its I/O thread.
trait ReadSend: Read + Send {}
impl<T: Read + Send> ReadSend for T {}

/// Runs `consume` on the raw stream of section `s` of `store`, whose chunks
/// hold at most `chunk_size` raw bytes, decompressing on `threads` threads
/// (1: on the calling one). With `hasher`, every chunk header of the
/// section goes into it (the image digest), even past a damaged chunk.
///
/// `s` must have passed the section table check (its chunk count is what
/// its raw length and `chunk_size` make): each chunk's sizes are then
/// checked against the table before its bytes are read, so the stream
/// never runs past the table's raw length and no buffer exceeds a chunk.
pub(crate) fn read_section<R, T>(
    store: &mut R,
    s: &SectionEntry,
    chunk_size: u32,
    threads: usize,
    hasher: Option<&mut blake3::Hasher>,
    consume: impl FnOnce(&mut SectionStream<'_>) -> Result<T, Error>,
) -> Result<T, Error>
where
    R: Read + Seek + Send,
{
    store
        .seek(SeekFrom::Start(s.offset))
        .map_err(Error::io(format!("seek to section {}", s.name)))?;
    let store: &mut (dyn ReadSend + '_) = store;
    let pool = Pool::new(4 * threads + 8, chunk_size as usize);
    let frames = FrameReader {
        pool: pool.clone(),
        // No bigger than the section: a table of many small sections must
        // not cost a large buffer each.
        src: BufReader::with_capacity(
            (IO_BUFFER as u64).min(s.stored_len) as usize,
            store.take(s.stored_len),
        ),
        section: &s.name,
        table: s,
        chunk_size,
        next: 0,
        pos: 0,
        hasher,
    };
    let decoder = || zstd::bulk::Decompressor::new().map_err(|e| e.to_string());
    if threads <= 1 {
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
        let (sub, results) =
            workers::start(scope, threads, decoder, move |d: &mut Dctx, f: Frame| {
                decode(name, f, d, &worker_pool)
            });
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

    /// Reads `buf` in full; into the digest too when it is a chunk header.
    fn read(&mut self, buf: &mut [u8], header: bool) -> Result<(), Error> {
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
        if header {
            if let Some(h) = self.hasher.as_deref_mut() {
                h.update(buf);
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// The raw length the table gives chunk `next`: the chunk size, but for
    /// the last chunk, which holds the rest.
    fn expected_raw_len(&self) -> u64 {
        let before = u64::from(self.next) * u64::from(self.chunk_size);
        let rest = self.table.raw_len.saturating_sub(before);
        rest.min(u64::from(self.chunk_size))
    }

    /// The next chunk, `None` after the last one (once the section's sizes
    /// are found to match the table).
    fn next(&mut self) -> Result<Option<Frame>, Error> {
        let t = self.table;
        if self.next == t.chunks {
            if self.pos != t.stored_len {
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
        self.read(&mut hb, true)?;
        let h = ChunkHeader::read_from_bytes(&hb).map_err(|_| self.bad_header("unreadable"))?;
        let stored_len = u64::from(h.stored_len.get());
        if stored_len > left - CHUNK_HEADER_LEN as u64 {
            return Err(self.bad_header(format!(
                "its {stored_len} stored bytes run past the end of its section"
            )));
        }
        // Checked before the checksum, which needs the bytes read: no chunk
        // stores more than its raw length, at most the chunk size.
        if stored_len > u64::from(self.chunk_size) {
            return Err(self.bad_header(format!(
                "its {stored_len} stored bytes are more than the chunk size {}",
                self.chunk_size
            )));
        }
        // A zero chunk stores nothing: no chunk-sized buffer for it.
        let mut stored = if stored_len == 0 {
            Vec::new()
        } else {
            self.pool.get_len(stored_len as usize)
        };
        self.read(&mut stored, false)?;
        if h.crc.get() != h.crc_with(&stored) {
            let chunk = self.next;
            // Past it, so that a drain goes on with the next chunk.
            self.next += 1;
            return Err(Error::ChunkChecksum {
                section: self.section.into(),
                chunk,
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
        if u64::from(raw_len) != self.expected_raw_len() {
            return Err(Error::SectionSize {
                section: t.name.clone(),
            });
        }
        let index = self.next;
        self.next += 1;
        Ok(Some(Frame {
            index,
            kind,
            raw_len,
            stored,
        }))
    }

    /// Hashes the headers of the chunks left in the section, if hashing:
    /// past a chunk whose checksum fails, up to one that cannot be read
    /// (then the digest does not match either).
    fn drain(&mut self) {
        if self.hasher.is_none() {
            return;
        }
        while let Ok(Some(_)) | Err(Error::ChunkChecksum { .. }) = self.next() {}
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
    pub(crate) fn len(&self) -> u64 {
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
    pub(crate) fn for_each(&mut self, mut f: impl FnMut(&Piece)) -> Result<(), Error> {
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
