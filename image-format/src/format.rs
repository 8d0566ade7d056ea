//! The on-store layout and its fixed-size records: the contract between the
//! agent that writes an image on the old kernel and `kupgrade-init` that
//! reads it on the new one. Everything is little-endian.
//!
//! ```text
//! offset                         what
//! ─────────────────────────────  ──────────────────────────────────────────────
//! 0                              superblock, one 4 KiB block (see RawSuperblock):
//!                                magic "KUPGIMG\0", format major.minor, state,
//!                                generation, total length, manifest offset,
//!                                length and crc32c, chunk size, blake3 digest
//!                                of the chunk headers and the manifest,
//!                                crc32c of the block
//! 4096 = BODY_OFFSET             section 0  ┌ chunk 0: header (24 B) + stored bytes
//!                                           │ chunk 1: header (24 B) + stored bytes
//!                                           └ ...
//!                                section 1  ...
//!                                ...        (sections follow each other with no gap)
//! manifest_offset                manifest: JSON, holds the section table
//!                                (name, kind, offset, raw and stored length,
//!                                chunk count of every section)
//! total_len = manifest end       end of the image; on a block device the stale
//!                                bytes of an older image may follow: never
//!                                read up to EOF, read up to total_len
//! ```
//!
//! Which module handles what (see the crate docs): the superblock
//! `superblock` (read, checked, rewritten in place), chunks `encode` and
//! `decode`, tree records `tree`, the manifest and its section table
//! `manifest`, checked against the superblock by `read` on open.
//!
//! The superblock, byte by byte (see [`RawSuperblock`]):
//!
//! ```text
//!    0  8  magic "KUPGIMG\0"          32  8  manifest_offset
//!    8  2  major                       40  8  manifest_len
//!   10  2  minor                       48  4  manifest_crc (crc32c of the manifest)
//!   12  4  state 1..4                  52  4  chunk_size (largest raw chunk)
//!   16  8  generation                  56 32  digest (blake3, see below)
//!   24  8  total_len                   88 4004 reserved, zero
//!                                    4092  4  header_crc (crc32c of bytes 0..4092)
//! ```
//!
//! A chunk header (see [`ChunkHeader`]), 24 bytes:
//!
//! ```text
//!    0  4  magic "CHNK"                12  4  raw_len (1..=chunk_size)
//!    4  1  kind: 0 raw, 1 zstd, 2 zero 16  4  stored_len (raw_len, < raw_len, 0)
//!    5  3  reserved, zero              20  4  crc32c of bytes 0..20 and the stored bytes
//!    8  4  index in its section
//! ```
//!
//! The manifest comes last because the writer streams: it knows the section
//! table only once every section is written. The superblock is written last
//! of all, after a flush, and the writer zeroes the old one before anything
//! else: a crash mid-write leaves no valid-looking image.
//!
//! A chunk holds at most `chunk_size` raw bytes of its section's stream. Its
//! header (see [`ChunkHeader`]) says how they are stored: compressed with
//! zstd, raw (when compression does not help, or the writer was asked not to
//! compress: `WriteOptions::compress`, `ImageWriter::set_compress`, per
//! section), or not at all when they are all zero. Its crc32c covers the header's first 20 bytes and the stored
//! bytes, so a chunk can be checked on its own while a section is read.
//!
//! Integrity, from the cheapest check to the most thorough: the superblock's
//! crc32c (every open), the manifest's crc32c (every open), each chunk's
//! crc32c (every read of its section), and the blake3 digest of every chunk
//! header in image order and then the manifest (`verify`). Each header
//! carries the crc32c of its stored bytes, so together they cover every byte
//! of `[0, total_len)`, and the digest ties the chunks to their places and
//! to this image. The digest hashes 24 bytes per chunk, not the chunk: a
//! hash of every byte bounded the write (BLAKE3 without SIMD ran at about
//! 100 MB/s in a TCG guest, a tenth of its memcpy; format 1 did that).
//!
//! ## Limits
//!
//! A reader checks every size against these before it allocates or reads
//! what the size covers, so that an image with valid checksums but crafted
//! sizes cannot make it allocate more than a bounded amount beyond the
//! store's own size:
//!
//! - Superblock: `0 < chunk_size <= MAX_CHUNK` (16 MiB), `0 < manifest_len
//!   <= MAX_MANIFEST` (64 MiB), the manifest ends the image and `total_len`
//!   fits in the store.
//! - Section table (checked on open, in linear time): names are non-empty
//!   and unique; sections tile `[BODY_OFFSET, manifest_offset)` in order;
//!   every chunk but the last of a section holds exactly `chunk_size` raw
//!   bytes, so `chunks = ceil(raw_len / chunk_size)`; and
//!   `chunks * 24 <= stored_len <= chunks * (24 + chunk_size)`.
//! - Chunk (checked as the section is read, before its stored bytes are
//!   read): its stored bytes fit in what is left of its section and in the
//!   chunk size; once its checksum holds, its raw length is the one the
//!   table gives it (the chunk size, or the rest for the last chunk). A
//!   section's stream therefore never runs past its table's `raw_len`, and
//!   no chunk buffer exceeds `chunk_size`.
//! - Blob: at most `MAX_BLOB` (64 MiB), which the writer refuses to exceed
//!   and `read_blob`, which holds a blob in memory, checks before reading.
//!   Tree sections stream into files (runs of zero chunks become holes);
//!   their size is bounded by the destination, not by the reader's memory.
//!
//! A reader's memory is then the manifest, a read buffer of at most 64 KiB,
//! the chunks in flight (a few per decompression thread, each at most
//! `chunk_size`) and a blob it returns. Nothing else scales with the image.
//!
//! Versions: the major must match; a reader takes any minor up to its own
//! (a minor only adds things an older reader may ignore, such as manifest
//! fields or superblock fields in the reserved area).
//!
//! ## Tree sections
//!
//! A tree section's raw stream is a sequence of records, depth first, each
//! directory before its content, names in byte order:
//!
//! ```text
//! record   = kind u8, mode u32, uid u32, gid u32, mtime_s i64, mtime_ns u32,
//!            path_len u16, path (bytes, relative, '/'-separated)
//!            then for a file:    size u64, content (size bytes)
//!                 for a symlink: target_len u16, target (bytes)
//!                 for a dir:     nothing
//! kind     = 1 directory | 2 regular file | 3 symlink
//! end      = kind u8 = 0, after the last record; nothing may follow it
//! ```
//!
//! A blob section's raw stream is the blob itself.

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const MAGIC: [u8; 8] = *b"KUPGIMG\0";
pub const FORMAT_MAJOR: u16 = 2;
pub const FORMAT_MINOR: u16 = 0;
/// Where the body starts; the superblock owns everything before.
pub const BODY_OFFSET: u64 = 4096;
/// "CHNK" in a little-endian u32.
pub const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"CHNK");
/// The largest chunk a writer makes and a reader accepts (see Limits).
pub const MAX_CHUNK: u32 = 16 << 20;
/// The smallest chunk a writer makes.
pub const MIN_CHUNK: u32 = 4 << 10;
/// No manifest is larger than this; a reader refuses larger claims.
pub const MAX_MANIFEST: u64 = 64 << 20;
/// The largest blob section: the writer refuses a larger blob, and
/// [`Image::read_blob`](crate::Image::read_blob), which holds a blob in
/// memory, refuses a larger claim before reading any of it.
pub const MAX_BLOB: u64 = 64 << 20;

/// The superblock as stored: one 4 KiB block at offset 0.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RawSuperblock {
    pub magic: [u8; 8],
    pub major: U16,
    pub minor: U16,
    /// 1 written, 2 restoring, 3 restored, 4 failed.
    pub state: U32,
    pub generation: U64,
    pub total_len: U64,
    pub manifest_offset: U64,
    pub manifest_len: U64,
    pub manifest_crc: U32,
    /// The largest raw length of any chunk.
    pub chunk_size: U32,
    /// blake3 of `[BODY_OFFSET, total_len)`.
    pub digest: [u8; 32],
    /// Zero in this version; covered by the header checksum.
    pub reserved: [u8; 4004],
    /// crc32c of every byte above.
    pub header_crc: U32,
}

const _: () = assert!(std::mem::size_of::<RawSuperblock>() == BODY_OFFSET as usize);

impl RawSuperblock {
    pub fn crc(&self) -> u32 {
        let bytes = self.as_bytes();
        crc32c::crc32c(&bytes[..bytes.len() - 4])
    }

    pub fn seal(&mut self) {
        self.header_crc = self.crc().into();
    }
}

/// How a chunk's bytes are stored.
pub const CHUNK_RAW: u8 = 0;
pub const CHUNK_ZSTD: u8 = 1;
/// All zero: nothing stored.
pub const CHUNK_ZERO: u8 = 2;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct ChunkHeader {
    pub magic: U32,
    pub kind: u8,
    pub reserved: [u8; 3],
    /// Index of the chunk in its section, from 0.
    pub index: U32,
    pub raw_len: U32,
    pub stored_len: U32,
    /// crc32c of the 20 bytes above, then of the stored bytes.
    pub crc: U32,
}

pub const CHUNK_HEADER_LEN: usize = std::mem::size_of::<ChunkHeader>();
const _: () = assert!(CHUNK_HEADER_LEN == 24);

impl ChunkHeader {
    pub fn new(kind: u8, index: u32, raw_len: u32, stored: &[u8]) -> ChunkHeader {
        let mut h = ChunkHeader {
            magic: CHUNK_MAGIC.into(),
            kind,
            reserved: [0; 3],
            index: index.into(),
            raw_len: raw_len.into(),
            stored_len: (stored.len() as u32).into(),
            crc: 0.into(),
        };
        h.crc = h.crc_with(stored).into();
        h
    }

    pub fn crc_with(&self, stored: &[u8]) -> u32 {
        let head = &self.as_bytes()[..CHUNK_HEADER_LEN - 4];
        crc32c::crc32c_append(crc32c::crc32c(head), stored)
    }
}

pub const REC_END: u8 = 0;
pub const REC_DIR: u8 = 1;
pub const REC_FILE: u8 = 2;
pub const REC_SYMLINK: u8 = 3;

/// The fixed part of a tree record, before its path.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RecordHeader {
    pub kind: u8,
    pub mode: U32,
    pub uid: U32,
    pub gid: U32,
    pub mtime_s: I64,
    pub mtime_ns: U32,
    pub path_len: U16,
}

pub const RECORD_HEADER_LEN: usize = std::mem::size_of::<RecordHeader>();
const _: () = assert!(RECORD_HEADER_LEN == 27);
