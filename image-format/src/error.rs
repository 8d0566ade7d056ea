//! The one error type of the codec: each kind of bad input or failed I/O
//! is its own variant, naming the section and chunk where there is one.

use std::fmt;
use std::io;

use crate::manifest::SectionKind;
use crate::state::State;

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
    #[error("section {section} holds {}, more than the {} a blob may hold", Size(*raw_len), Size(*limit))]
    BlobTooLarge {
        section: String,
        raw_len: u64,
        limit: u64,
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
