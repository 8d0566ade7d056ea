//! A section's stream into chunks: a [`ChunkSink`] cuts what a producer
//! (walking a tree, or slicing a blob) feeds it into chunks of the chunk
//! size; each chunk is stored as zero, zstd or raw; an [`Output`] writes
//! them to the store in order. With several threads, workers compress in
//! parallel while the producer goes on, and a writer thread stores the
//! chunks in order.

use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use zerocopy::IntoBytes;

use crate::error::Error;
use crate::format::*;
use crate::store::{Store, IO_BUFFER};
use crate::workers::{self, Pool};

/// How sections are encoded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// Compression threads; 1 compresses on the calling thread.
    pub(crate) threads: usize,
    /// zstd level; `None` stores every chunk as it is (zero or raw).
    pub(crate) level: Option<i32>,
    /// Raw bytes per chunk, already within [`MIN_CHUNK`, `MAX_CHUNK`].
    pub(crate) chunk_size: usize,
}

/// Chunks written so far, by how they are stored.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counts {
    pub(crate) chunks: u64,
    pub(crate) zero: u64,
    pub(crate) raw: u64,
}

/// One section as encoded.
pub(crate) struct EncodedSection {
    /// Bytes of its stream before compression.
    pub(crate) raw_len: u64,
    pub(crate) chunks: u32,
    /// Where the section ends in the store.
    pub(crate) end: u64,
}

/// Runs `produce`, which feeds a section's stream to a sink, and writes
/// the section's chunks to `out`.
pub(crate) fn encode_section<'a, S, F>(
    out: Output<'_, S>,
    settings: Settings,
    produce: F,
) -> Result<EncodedSection, Error>
where
    S: Store,
    F: FnOnce(&mut ChunkSink<'a, '_>) -> Result<(), Error>,
{
    if settings.threads <= 1 {
        section_inline(out, settings, produce)
    } else {
        section_parallel(out, settings, produce)
    }
}

/// One thread: each chunk is compressed and written before the next.
fn section_inline<'a, S, F>(
    mut out: Output<'_, S>,
    settings: Settings,
    produce: F,
) -> Result<EncodedSection, Error>
where
    S: Store,
    F: FnOnce(&mut ChunkSink<'a, '_>) -> Result<(), Error>,
{
    let chunk_size = settings.chunk_size;
    let pool = Pool::new(4, chunk_size);
    let mut enc = Encoder::new(settings.level, pool.clone())?;
    let mut emit = |index: u32, data: Data<'a>| -> Result<(), Error> {
        let raw = data.as_slice();
        let (header, body) = enc.encode(index, raw);
        out.put(&header, body.as_slice(raw))?;
        body.recycle(&enc.pool);
        data.recycle(&enc.pool);
        Ok(())
    };
    let mut sink = ChunkSink::new(chunk_size, pool, &mut emit);
    produce(&mut sink)?;
    sink.finish()?;
    let (raw_len, chunks) = (sink.raw_len, sink.next);
    drop(sink);
    Ok(EncodedSection {
        raw_len,
        chunks,
        end: out.finish()?,
    })
}

/// Workers compress, a writer thread writes in order, and the calling
/// thread produces.
fn section_parallel<'a, S, F>(
    out: Output<'_, S>,
    settings: Settings,
    produce: F,
) -> Result<EncodedSection, Error>
where
    S: Store,
    F: FnOnce(&mut ChunkSink<'a, '_>) -> Result<(), Error>,
{
    let Settings {
        threads,
        level,
        chunk_size,
    } = settings;
    let pool = Pool::new(4 * threads + 8, chunk_size);
    // Check the level once here, so that workers cannot fail to start.
    Encoder::new(level, pool.clone())?;
    let mut out = out;
    std::thread::scope(|s| {
        let worker_pool = pool.clone();
        let (sub, results) = workers::start(
            s,
            threads,
            move || Encoder::new(level, worker_pool.clone()),
            |enc: &mut Result<Encoder, Error>, job: (u32, Data<'a>)| {
                let (index, data) = job;
                match enc {
                    Ok(enc) => {
                        let (header, body) = enc.encode(index, data.as_slice());
                        Ok(EncodedChunk { header, body, data })
                    }
                    Err(_) => Err(Error::Internal("a compression context failed")),
                }
            },
        );
        let writer_pool = pool.clone();
        let writer = s.spawn(move || -> Result<u64, Error> {
            while let Some(r) = results.next() {
                let e = r.map_err(|_| Error::Internal("a compression thread died"))??;
                out.put(&e.header, e.body.as_slice(e.data.as_slice()))?;
                e.body.recycle(&writer_pool);
                e.data.recycle(&writer_pool);
            }
            out.finish()
        });
        let mut emit = move |index: u32, data: Data<'a>| -> Result<(), Error> {
            sub.submit((index, data))
                .map_err(|_| Error::Internal("the store writer stopped"))
        };
        let mut sink = ChunkSink::new(chunk_size, pool, &mut emit);
        let produced = produce(&mut sink).and_then(|()| sink.finish());
        let (raw_len, chunks) = (sink.raw_len, sink.next);
        drop(sink);
        drop(emit); // closes the queue: workers and writer finish
        let end = writer
            .join()
            .map_err(|_| Error::Internal("the store writer panicked"))?;
        // A store error (full, say) explains why the producer stopped.
        let end = end?;
        produced?;
        Ok(EncodedSection {
            raw_len,
            chunks,
            end,
        })
    })
}

/// A chunk's raw bytes: copied out of a file, or borrowed from a blob.
pub(crate) enum Data<'a> {
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

impl Data<'_> {
    fn recycle(self, pool: &Pool) {
        if let Data::Owned(v) = self {
            pool.put(v);
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Data::Owned(v) => v,
            Data::Borrowed(b) => b,
        }
    }
}

/// What follows a chunk header in the store.
enum Body {
    Zero,
    Raw,
    Zstd(Vec<u8>),
}

impl Body {
    fn recycle(self, pool: &Pool) {
        if let Body::Zstd(v) = self {
            pool.put(v);
        }
    }

    fn as_slice<'r>(&'r self, raw: &'r [u8]) -> &'r [u8] {
        match self {
            Body::Zero => &[],
            Body::Raw => raw,
            Body::Zstd(c) => c,
        }
    }
}

struct EncodedChunk<'a> {
    header: ChunkHeader,
    body: Body,
    /// The raw bytes, which a raw body refers to.
    data: Data<'a>,
}

struct Encoder {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    pool: Pool,
}

impl Encoder {
    fn new(level: Option<i32>, pool: Pool) -> Result<Encoder, Error> {
        let zstd = match level {
            Some(level) => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(Error::io(format!("set up zstd at level {level}")))?,
            ),
            None => None,
        };
        Ok(Encoder { zstd, pool })
    }

    fn encode(&mut self, index: u32, raw: &[u8]) -> (ChunkHeader, Body) {
        let raw_len = raw.len() as u32;
        if is_zero(raw) {
            return (
                ChunkHeader::new(CHUNK_ZERO, index, raw_len, &[]),
                Body::Zero,
            );
        }
        let Some(zstd) = &mut self.zstd else {
            return (ChunkHeader::new(CHUNK_RAW, index, raw_len, raw), Body::Raw);
        };
        // Room for no more than the raw bytes: when zstd needs more, it
        // fails and the chunk is stored raw.
        let mut out = self.pool.get(raw.len());
        match zstd.compress_to_buffer(raw, &mut out) {
            Ok(n) if n < raw.len() => {
                let h = ChunkHeader::new(CHUNK_ZSTD, index, raw_len, &out);
                (h, Body::Zstd(out))
            }
            _ => {
                self.pool.put(out);
                (ChunkHeader::new(CHUNK_RAW, index, raw_len, raw), Body::Raw)
            }
        }
    }
}

/// True when every byte is zero; checks 64 bytes at a time, which the
/// compiler turns into a few vector instructions.
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Writes encoded chunks at the end of the image, in order.
pub(crate) struct Output<'s, S: Store> {
    w: BufWriter<&'s mut S>,
    pos: u64,
    capacity: u64,
    hasher: &'s mut blake3::Hasher,
    counts: &'s mut Counts,
}

impl<'s, S: Store> Output<'s, S> {
    /// Writes from `pos`, where `store` must already be positioned, and
    /// fails with [`Error::StoreTooSmall`] past `capacity`.
    pub(crate) fn new(
        store: &'s mut S,
        pos: u64,
        capacity: u64,
        hasher: &'s mut blake3::Hasher,
        counts: &'s mut Counts,
    ) -> Self {
        Output {
            // Chunk headers are gathered; a chunk's body, larger than the
            // buffer, goes to the store without a copy into it.
            w: BufWriter::with_capacity(IO_BUFFER, store),
            pos,
            capacity,
            hasher,
            counts,
        }
    }

    fn put(&mut self, header: &ChunkHeader, body: &[u8]) -> Result<(), Error> {
        let end = self.pos + (CHUNK_HEADER_LEN + body.len()) as u64;
        if end > self.capacity {
            return Err(Error::StoreTooSmall {
                needed: end,
                capacity: self.capacity,
            });
        }
        let io = |source| Error::Io {
            what: format!("write the store at offset {}", self.pos),
            source,
        };
        self.w.write_all(header.as_bytes()).map_err(io)?;
        self.w.write_all(body).map_err(io)?;
        // The digest takes the header alone: its crc32c stands for the body.
        self.hasher.update(header.as_bytes());
        self.counts.chunks += 1;
        match header.kind {
            CHUNK_ZERO => self.counts.zero += 1,
            CHUNK_RAW => self.counts.raw += 1,
            _ => {}
        }
        self.pos = end;
        Ok(())
    }

    fn finish(mut self) -> Result<u64, Error> {
        self.w.flush().map_err(Error::io("write the store"))?;
        Ok(self.pos)
    }
}

type Emit<'a, 'e> = dyn FnMut(u32, Data<'a>) -> Result<(), Error> + 'e;

/// Cuts a section's stream into chunks and hands each to `emit`.
pub(crate) struct ChunkSink<'a, 'e> {
    buf: Vec<u8>,
    size: usize,
    next: u32,
    raw_len: u64,
    pool: Pool,
    emit: &'e mut Emit<'a, 'e>,
}

impl<'a, 'e> ChunkSink<'a, 'e> {
    fn new(size: usize, pool: Pool, emit: &'e mut Emit<'a, 'e>) -> Self {
        ChunkSink {
            buf: Vec::new(),
            size,
            next: 0,
            raw_len: 0,
            pool,
            emit,
        }
    }

    fn emit(&mut self, data: Data<'a>) -> Result<(), Error> {
        let index = self.next;
        self.next = index
            .checked_add(1)
            .ok_or(Error::Internal("more than 2^32 chunks in a section"))?;
        self.raw_len += data.as_slice().len() as u64;
        (self.emit)(index, data)
    }

    fn emit_buffered(&mut self) -> Result<(), Error> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::take(&mut self.buf);
        self.emit(Data::Owned(full))
    }

    /// The buffer being filled, made once it is needed.
    fn buffer(&mut self) -> &mut Vec<u8> {
        if self.buf.capacity() == 0 {
            self.buf = self.pool.get(self.size);
        }
        &mut self.buf
    }

    pub(crate) fn write(&mut self, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let n = data.len().min(self.size - self.buf.len());
            self.buffer().extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.size {
                self.emit_buffered()?;
            }
        }
        Ok(())
    }

    /// Bytes that outlive the section: full chunks borrow them, no copy.
    /// A short tail is buffered like any write, so that every chunk but
    /// the section's last is full (which the reader checks).
    pub(crate) fn write_borrowed(&mut self, data: &'a [u8]) -> Result<(), Error> {
        if !self.buf.is_empty() {
            return self.write(data);
        }
        let mut full = data.chunks_exact(self.size);
        for chunk in &mut full {
            self.emit(Data::Borrowed(chunk))?;
        }
        self.write(full.remainder())
    }

    /// Exactly `len` bytes from `r`, read straight into chunk buffers.
    pub(crate) fn read_from(
        &mut self,
        r: &mut dyn Read,
        mut len: u64,
        path: &Path,
    ) -> Result<(), Error> {
        while len > 0 {
            let start = self.buf.len();
            let want = (self.size - start).min(len.min(usize::MAX as u64) as usize);
            self.buffer().resize(start + want, 0);
            let mut got = 0;
            while got < want {
                match r.read(&mut self.buf[start + got..start + want]) {
                    Ok(0) => {
                        return Err(Error::Io {
                            what: format!("read {}", path.display()),
                            source: io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the file shrank while it was being read",
                            ),
                        })
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Err(Error::Io {
                            what: format!("read {}", path.display()),
                            source,
                        })
                    }
                }
            }
            len -= want as u64;
            if self.buf.len() == self.size {
                self.emit_buffered()?;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Error> {
        self.emit_buffered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_but_the_last_is_full_whatever_the_writes() {
        let data = vec![1u8; 5000];
        let mut lens = Vec::new();
        let mut emit = |_: u32, d: Data<'_>| -> Result<(), Error> {
            lens.push(d.as_slice().len());
            Ok(())
        };
        let mut sink = ChunkSink::new(4096, Pool::new(2, 4096), &mut emit);
        sink.write_borrowed(&data).unwrap();
        sink.write(&[2u8; 3000]).unwrap();
        sink.write_borrowed(&data).unwrap();
        sink.finish().unwrap();
        drop(sink);
        assert_eq!(lens, [4096, 4096, 4096, 13_000 - 3 * 4096]);
    }

    #[test]
    fn zero_detection_sees_a_single_set_byte_anywhere() {
        for len in [0, 1, 63, 64, 65, 4096, 4099] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v));
            for i in 0..len {
                v[i] = 1;
                assert!(!is_zero(&v), "len {len} byte {i}");
                v[i] = 0;
            }
        }
    }

    #[test]
    fn encoder_picks_zero_zstd_or_raw() {
        let mut enc = Encoder::new(Some(1), Pool::new(1, 4096)).unwrap();
        let (h, b) = enc.encode(0, &[0u8; 8192]);
        assert_eq!((h.kind, b.as_slice(&[]).len()), (CHUNK_ZERO, 0));
        let (h, _) = enc.encode(1, &[7u8; 8192]);
        assert_eq!(h.kind, CHUNK_ZSTD);
        assert!(h.stored_len.get() < 100);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let (h, _) = enc.encode(2, &random);
        assert_eq!(h.kind, CHUNK_RAW);
        assert_eq!(h.stored_len.get(), 8192);
        // Without compression only zero chunks are told apart.
        let mut plain = Encoder::new(None, Pool::new(1, 4096)).unwrap();
        assert_eq!(plain.encode(0, &[0u8; 8192]).0.kind, CHUNK_ZERO);
        let (h, b) = plain.encode(1, &[7u8; 8192]);
        assert_eq!((h.kind, b.as_slice(&[7u8; 8192]).len()), (CHUNK_RAW, 8192));
    }
}
