//! The on-store layout and its fixed-size records.
//!
//! ```text
//! 0        superblock (little-endian, crc32c over itself), padded to 4 KiB
//! 4096     section 0: chunk, chunk, ...     each chunk = header (24 B) + stored bytes
//!          section 1: chunk, ...
//!          ...
//! m        manifest (JSON, with the section table), crc32c in the superblock
//! total    end of the image; stale bytes of an earlier image may follow
//! ```
//!
//! The whole-image digest (blake3) covers `[4096, total)`. A chunk stores
//! at most `chunk_size` raw bytes, compressed with zstd, or raw when that
//! does not help, or nothing when they are all zero.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const MAGIC: [u8; 8] = *b"KUPGIMG\0";
pub const FORMAT_MAJOR: u16 = 1;
pub const FORMAT_MINOR: u16 = 0;
/// Where the body starts; the superblock owns everything before.
pub const BODY_OFFSET: u64 = 4096;
pub const CHUNK_MAGIC: u32 = 0x4b4e_4843; // "CHNK"
/// No chunk holds more than this raw; a reader refuses larger claims.
pub const MAX_CHUNK: u32 = 64 << 20;
/// No manifest is larger than this; a reader refuses larger claims.
pub const MAX_MANIFEST: u64 = 64 << 20;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RawSuperblock {
    pub magic: [u8; 8],
    pub major: U16,
    pub minor: U16,
    pub state: U32,
    pub generation: U64,
    pub total_len: U64,
    pub manifest_offset: U64,
    pub manifest_len: U64,
    pub manifest_crc: U32,
    pub reserved: U32,
    pub digest: [u8; 32],
    /// crc32c of every byte above.
    pub header_crc: U32,
}

impl RawSuperblock {
    pub fn crc(&self) -> u32 {
        let bytes = self.as_bytes();
        crc32c::crc32c(&bytes[..bytes.len() - 4])
    }
}

pub const CHUNK_RAW: u8 = 0;
pub const CHUNK_ZSTD: u8 = 1;
pub const CHUNK_ZERO: u8 = 2;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct ChunkHeader {
    pub magic: U32,
    pub kind: u8,
    pub reserved: [u8; 3],
    pub index: U32,
    pub raw_len: U32,
    pub stored_len: U32,
    /// crc32c of the stored bytes (of nothing for a zero chunk).
    pub crc: U32,
}

pub const CHUNK_HEADER_LEN: u64 = std::mem::size_of::<ChunkHeader>() as u64;

const _: () = assert!(std::mem::size_of::<RawSuperblock>() == 92);
const _: () = assert!(std::mem::size_of::<ChunkHeader>() == 24);

// Tree records (the raw stream of a tree section):
//   u8 kind (1 dir, 2 file, 3 symlink, 0 end)  u32 mode  i64 mtime (s)
//   u16 path length  path (relative, '/'-separated)
//   file: u64 size, content    symlink: u16 length, target
pub const REC_END: u8 = 0;
pub const REC_DIR: u8 = 1;
pub const REC_FILE: u8 = 2;
pub const REC_SYMLINK: u8 = 3;
