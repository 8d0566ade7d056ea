//! The manifest: what the image holds, and the section table that says
//! where each section is. Stored as JSON after the last section (see
//! [`format`](mod@crate::format)); checked against the superblock when an
//! image is opened.

use std::fmt;

use contract::{PhaseTiming, WorkloadEntry};
use serde::{Deserialize, Serialize};

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
    /// A file tree (see the record format in [`format`](mod@crate::format)).
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
