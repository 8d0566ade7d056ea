//! The kupgrade snapshot image: the codec that writes it to a store and
//! reads it back. What the image carries (workloads, device state) and the
//! rest of the contract between the two kernels live in `contract`.
//!
//! An image is one blob in a store (a `memmap=` RAM range seen as
//! `/dev/pmemN`, a file, or memory): a checksummed superblock, sections of
//! independently compressed and checksummed chunks, and a JSON manifest
//! holding the section table; [`format`](mod@format) has the layout. The two sides are
//! different builds: major versions must match, an older minor is read.
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

pub mod format;
pub mod inspect;
mod read;
mod scrub;
mod state;
#[doc(hidden)]
pub mod testing;
mod tree;
mod workers;
mod write;

use std::fmt;
use std::io::{self, Read, Seek, Write};
use std::str::FromStr;

use contract::{PhaseTiming, WorkloadEntry};
use serde::{Deserialize, Serialize};

pub use format::{BODY_OFFSET, FORMAT_MAJOR, FORMAT_MINOR, MAGIC};
pub use read::{read_superblock, Image, SectionReport, VerifyReport};
pub use scrub::wipe_to;
pub use state::{invalidate, set_state, wipe};
pub use write::{ImageWriter, WriteOptions, WriteSummary};

/// Where an image is written: a block device, a file, or memory. Readers
/// need only `Read + Seek + Send`.
pub trait Store: Read + Write + Seek + Send {
    /// Makes what was written durable (fsync; for a raw block device this
    /// flushes the page cache in front of it).
    fn sync(&mut self) -> io::Result<()>;
}

impl Store for std::fs::File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}

impl Store for io::Cursor<Vec<u8>> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Store for io::Cursor<&mut Vec<u8>> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Store for io::Cursor<&mut [u8]> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Store + ?Sized> Store for &mut S {
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }
}

/// The life of an image: only a `Written` one is ever restored.
/// `written -> restoring -> restored | failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Written = 1,
    Restoring = 2,
    Restored = 3,
    Failed = 4,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Written,
        State::Restoring,
        State::Restored,
        State::Failed,
    ];

    pub fn from_u32(v: u32) -> Option<State> {
        State::ALL.into_iter().find(|s| *s as u32 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Written => "written",
            State::Restoring => "restoring",
            State::Restored => "restored",
            State::Failed => "failed",
        }
    }

    /// Whether an image may move from `self` to `to`. Nothing goes back to
    /// `written`: an image that a restore has started on is never restored
    /// a second time. Setting the state it already has is allowed.
    pub fn can_become(self, to: State) -> bool {
        use State::*;
        self == to
            || matches!(
                (self, to),
                (Written, Restoring) | (Written, Failed) | (Restoring, Restored | Failed)
            )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| format!("unknown image state {s:?}"))
    }
}

/// The superblock as read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub major: u16,
    pub minor: u16,
    pub state: State,
    pub generation: u64,
    /// Bytes from offset 0 to the end of the manifest.
    pub total_len: u64,
    pub manifest_offset: u64,
    pub manifest_len: u64,
    pub manifest_crc: u32,
    /// The largest raw length of a chunk.
    pub chunk_size: u32,
    /// blake3 of `[BODY_OFFSET, total_len)`.
    pub digest: [u8; 32],
    /// crc32c of the superblock.
    pub header_crc: u32,
}

impl Superblock {
    pub fn digest_hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(default)]
pub struct Manifest {
    /// Release of the kernel the image was written on (`uname -r`).
    pub kernel_from: String,
    /// Release of the kernel meant to restore it.
    pub kernel_to: String,
    pub boot_id: String,
    pub machine_id: String,
    pub hostname: String,
    pub created_unix_ns: u64,
    pub workloads: Vec<WorkloadEntry>,
    pub phases: Vec<PhaseTiming>,
    /// The section table, in store order; filled in by the writer.
    pub sections: Vec<SectionEntry>,
}

impl Manifest {
    pub fn section(&self, name: &str) -> Option<&SectionEntry> {
        self.sections.iter().find(|s| s.name == name)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SectionKind {
    /// A file tree (see the record format in [`format`](mod@format)).
    Tree,
    /// Bytes.
    Blob,
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SectionKind::Tree => "tree",
            SectionKind::Blob => "blob",
        })
    }
}

/// One row of the section table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SectionEntry {
    pub name: String,
    pub kind: SectionKind,
    /// Length of the section's stream before compression.
    pub raw_len: u64,
    /// Bytes in the store, chunk headers included.
    pub stored_len: u64,
    pub chunks: u32,
    /// Offset of its first chunk in the store.
    pub offset: u64,
}

/// A byte count printed for people: `64 MiB`, `1.5 GiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} bytes", self.0)
        } else if v.fract() == 0.0 {
            write!(f, "{v:.0} {}", UNITS[unit])
        } else {
            write!(f, "{v:.1} {}", UNITS[unit])
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {what}")]
    Io {
        /// What was being done, and to what: "read the store", "open /x".
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no kupgrade image in this store")]
    NoImage,
    #[error("the image has format {found}.x but this build reads {supported}.x: restore it with the kupgrade that wrote it")]
    UnknownMajor { found: u16, supported: u16 },
    #[error("the image has format {major}.{found}, newer than this build reads ({major}.{supported}): use a newer kupgrade")]
    NewerMinor {
        major: u16,
        found: u16,
        supported: u16,
    },
    #[error("the superblock checksum does not match: the image header is damaged")]
    SuperblockChecksum,
    #[error("the superblock holds an unknown state {0}")]
    UnknownState(u32),
    #[error("the superblock is inconsistent: {0}")]
    BadSuperblock(&'static str),
    #[error("the image claims {total} bytes but the store holds only {store}")]
    LengthExceedsStore { total: u64, store: u64 },
    #[error("the image is truncated: {what} ends early")]
    Truncated { what: String },
    #[error("the manifest checksum does not match: the manifest is damaged")]
    ManifestChecksum,
    #[error("the manifest does not parse")]
    ManifestParse(#[source] serde_json::Error),
    #[error("the section table is damaged: section {section:?} {detail}")]
    SectionOutside { section: String, detail: String },
    #[error("the image has no section {0:?}")]
    NoSection(String),
    #[error("section {section} is a {found}, not a {expected}")]
    WrongKind {
        section: String,
        found: SectionKind,
        expected: SectionKind,
    },
    #[error("section {section}, chunk {chunk}: damaged chunk header: {detail}")]
    ChunkHeader {
        section: String,
        chunk: u32,
        detail: String,
    },
    #[error("section {section}, chunk {chunk}: checksum mismatch")]
    ChunkChecksum { section: String, chunk: u32 },
    #[error("section {section}, chunk {chunk}: cannot decompress: {detail}")]
    Decompress {
        section: String,
        chunk: u32,
        detail: String,
    },
    #[error("section {section}: its chunks do not add up to the section table's sizes")]
    SectionSize { section: String },
    #[error("section {section}: damaged tree record at byte {offset}: {detail}")]
    TreeRecord {
        section: String,
        offset: u64,
        detail: String,
    },
    #[error("the image digest does not match: some bytes changed")]
    DigestMismatch,
    #[error("section {section}: path {path:?} would land outside the destination")]
    PathEscapes { section: String, path: String },
    #[error(
        "{path}: a {kind} cannot go into an image (only regular files, directories and symlinks)"
    )]
    UnsupportedFile { path: String, kind: &'static str },
    #[error("section name {0:?} is empty or already used")]
    BadSectionName(String),
    #[error("the store holds {} but the image needs at least {}: reserve a bigger store", Size(*capacity), Size(*needed))]
    StoreTooSmall { needed: u64, capacity: u64 },
    #[error("the image is {from}: it cannot become {to}")]
    BadTransition { from: State, to: State },
    #[error("the image writer stopped: {0}")]
    Internal(&'static str),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_print_parse_and_only_move_forward() {
        for s in State::ALL {
            assert_eq!(s.to_string().parse::<State>().unwrap(), s);
            assert_eq!(State::from_u32(s as u32), Some(s));
            assert!(s.can_become(s));
            if s != State::Written {
                assert!(!s.can_become(State::Written), "{s} -> written");
            }
        }
        assert_eq!(State::Restoring.to_string(), "restoring");
        assert!(State::Written.can_become(State::Restoring));
        assert!(State::Restoring.can_become(State::Restored));
        assert!(State::Restoring.can_become(State::Failed));
        assert!(!State::Restored.can_become(State::Restoring));
        assert!(!State::Failed.can_become(State::Restored));
        assert_eq!(State::from_u32(0), None);
        assert_eq!(State::from_u32(5), None);
    }

    #[test]
    fn sizes_print_for_people() {
        assert_eq!(Size(0).to_string(), "0 bytes");
        assert_eq!(Size(1023).to_string(), "1023 bytes");
        assert_eq!(Size(64 << 20).to_string(), "64 MiB");
        assert_eq!(Size(3 << 29).to_string(), "1.5 GiB");
    }

    #[test]
    fn store_too_small_says_what_to_do() {
        let e = Error::StoreTooSmall {
            needed: 210 << 20,
            capacity: 64 << 20,
        };
        assert_eq!(
            e.to_string(),
            "the store holds 64 MiB but the image needs at least 210 MiB: reserve a bigger store"
        );
    }
}
