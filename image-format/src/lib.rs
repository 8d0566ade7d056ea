//! The kupgrade snapshot image and the types that both sides of a kexec
//! (the agent on the old kernel, `kupgrade-init` on the new one) agree on.
//!
//! An image is one blob in a store (a `memmap=` RAM range seen as
//! `/dev/pmemN`, a file, or memory): a checksummed superblock, sections of
//! independently compressed and checksummed chunks, and a JSON manifest; see
//! [`format`](crate::format) for the layout. Major versions must match;
//! an older minor is read.

pub mod cmdline;
pub mod devstate;
pub mod events;
pub mod report;

pub mod format;
pub mod inspect;
mod read;
mod state;
mod write;

use std::fmt;
use std::io::{self, Read, Seek, Write};

use serde::{Deserialize, Serialize};

pub use format::{BODY_OFFSET, FORMAT_MAJOR, FORMAT_MINOR, MAGIC};
pub use read::{Image, VerifyReport};
pub use state::{invalidate, set_state, wipe};
pub use write::{ImageWriter, WriteOptions, WriteSummary};

/// Where an image is kept: a block device, a file, or memory.
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

impl<S: Store + ?Sized> Store for &mut S {
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }
}

/// The life of an image: only a `Written` one is ever restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Written = 1,
    Restoring = 2,
    Restored = 3,
    Failed = 4,
}

impl State {
    fn from_u32(v: u32) -> Option<State> {
        Some(match v {
            1 => State::Written,
            2 => State::Restoring,
            3 => State::Restored,
            4 => State::Failed,
            _ => return None,
        })
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Written => "written",
            State::Restoring => "restoring",
            State::Restored => "restored",
            State::Failed => "failed",
        })
    }
}

/// The superblock as read, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub major: u16,
    pub minor: u16,
    pub state: State,
    pub generation: u64,
    pub total_len: u64,
    pub manifest_offset: u64,
    pub manifest_len: u64,
    pub digest: [u8; 32],
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(default)]
pub struct Manifest {
    pub kernel_from: String,
    pub kernel_to: String,
    pub boot_id: String,
    pub machine_id: String,
    pub hostname: String,
    pub created_unix_ns: u64,
    pub workloads: Vec<WorkloadEntry>,
    pub phases: Vec<PhaseTiming>,
    /// Filled in by the writer.
    pub sections: Vec<SectionEntry>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct WorkloadEntry {
    pub name: String,
    pub cgroup: String,
    pub root_pid: i32,
    pub pids: Vec<i32>,
    /// The section holding its CRIU images.
    pub section: String,
    pub tcp_established: bool,
    pub pid_namespace: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PhaseTiming {
    pub event: String,
    pub t_mono_ns: u64,
    pub t_real_ns: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SectionKind {
    Tree,
    Blob,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SectionEntry {
    pub name: String,
    pub kind: SectionKind,
    pub raw_len: u64,
    pub stored_len: u64,
    pub chunks: u32,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no kupgrade image in this store (no magic)")]
    NoImage,
    #[error(
        "the image has format {found}.x; this build reads {supported}.x: use a matching kupgrade"
    )]
    UnknownMajor { found: u16, supported: u16 },
    #[error("the superblock checksum does not match: the image header is damaged")]
    SuperblockChecksum,
    #[error("the image claims {total} bytes but the store holds only {store}")]
    LengthExceedsStore { total: u64, store: u64 },
    #[error("the image is truncated: {what} ends early")]
    Truncated { what: String },
    #[error("the manifest checksum does not match: the manifest is damaged")]
    ManifestChecksum,
    #[error("the manifest does not parse: {0}")]
    ManifestParse(String),
    #[error("section {section} points outside the image")]
    SectionOutside { section: String },
    #[error("no section {0:?} in the image")]
    NoSection(String),
    #[error("section {section}, chunk {chunk}: the chunk header is damaged")]
    ChunkHeader { section: String, chunk: u32 },
    #[error("section {section}, chunk {chunk}: checksum mismatch")]
    ChunkChecksum { section: String, chunk: u32 },
    #[error("section {section}, chunk {chunk}: cannot decompress: {detail}")]
    Decompress {
        section: String,
        chunk: u32,
        detail: String,
    },
    #[error("section {section} is damaged: {detail}")]
    Corrupt { section: String, detail: String },
    #[error("the image digest does not match: some bytes changed")]
    DigestMismatch,
    #[error("section {section}: path {path:?} would land outside the destination")]
    PathEscapes { section: String, path: String },
    #[error("{path}: only regular files, directories and symlinks can go into an image")]
    UnsupportedFile { path: String },
    #[error("section name {0:?} is empty or used twice")]
    BadSectionName(String),
    #[error("the store holds {capacity} bytes but the image needs at least {needed}: reserve a bigger store")]
    StoreTooSmall { needed: u64, capacity: u64 },
}
