//! The kupgrade snapshot image: the codec that writes it to a store and
//! reads it back. What the image carries (workloads, device state) and the
//! rest of the contract between the two kernels live in `contract`.
//!
//! An image is one blob in a store (a `memmap=` RAM range seen as
//! `/dev/pmemN`, a file, or memory): a checksummed superblock, sections of
//! independently compressed and checksummed chunks, and a JSON manifest
//! holding the section table; [`format`](mod@format) has the layout and the
//! limits a reader holds an image to. The two sides are different builds:
//! major versions must match, an older minor is read.
//!
//! ```no_run
//! # fn main() -> Result<(), image_format::Error> {
//! use image_format::{Image, ImageWriter, Manifest, WriteOptions};
//! let store = std::fs::OpenOptions::new().read(true).write(true).open("/dev/pmem0")
//!     .map_err(|source| image_format::Error::Io { what: "open /dev/pmem0".into(), source })?;
//! let mut w = ImageWriter::create(store, 512 << 20, WriteOptions::default())?;
//! w.add_tree("criu/db", "/run/kupgrade/dump/db".as_ref())?;
//! w.add_blob("devstate", b"{}")?;
//! w.finish(Manifest::default())?;
//! # let store = std::fs::File::open("/dev/pmem0").unwrap();
//! let mut img = Image::open(store)?;
//! img.extract_tree("criu/db", "/tmp/db".as_ref())?;
//! # Ok(()) }
//! ```
//!
//! ## Modules
//!
//! From the bottom up; each uses only modules listed above it:
//!
//! ```text
//! format      the bytes on the store: layout, fixed-size records, limits
//! state       State, the life of an image (written -> restoring -> ...)
//! manifest    Manifest and its section table (JSON)
//! error       Error, one variant per kind of failure (and Size for messages)
//! store       the Store trait; positioned reads
//! direct      DirectReader, DirectWriter: a store read and written around
//!             the page cache (O_DIRECT)
//! workers     ordered thread pool and buffer pool
//! superblock  read, check and write the superblock; set_state, invalidate, wipe
//! encode      a section's stream -> chunks: ChunkSink, compression, ordered output
//! decode      chunks -> a section's stream: frame checks, decompression, SectionStream
//! tree        file trees <-> record streams (writes through encode, reads through decode)
//! write       ImageWriter: sections, then the manifest, then the superblock
//! read        Image: open and check, read_blob, extract_tree, check/verify
//! inspect     the inspector's text (kupgrade image inspect)
//! testing     helpers for tests and the fuzzer
//! ```

mod decode;
mod direct;
mod encode;
mod error;
pub mod format;
pub mod inspect;
mod manifest;
mod read;
mod state;
mod store;
mod superblock;
#[doc(hidden)]
pub mod testing;
mod tree;
mod workers;
mod write;

pub use direct::{DirectReader, DirectWriter};
pub use error::{Error, Size};
pub use format::{BODY_OFFSET, FORMAT_MAJOR, FORMAT_MINOR, MAGIC};
pub use manifest::{Manifest, SectionEntry, SectionKind};
pub use read::{Image, SectionReport, VerifyReport};
pub use state::{State, UnknownStateName};
pub use store::Store;
pub use superblock::{invalidate, read_superblock, set_state, wipe_recorded, wipe_to, Superblock};
pub use write::{ImageWriter, WriteOptions, WriteSummary};
