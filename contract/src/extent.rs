//! How far the store may hold image bytes: its high-water mark, so that a
//! wipe also zeroes the tail of an older, larger image (an image's own
//! `total_len` says only how far it reaches itself).
//!
//! Kept in [`FILE`] under [`crate::report::DIR`] on the root file system,
//! which both kernels see: the agent marks the extent unknown before it
//! writes an image and records it once written (the furthest of the image's
//! end and the mark before; with no record at all, the image's end: a store
//! kupgrade never wrote to holds nothing of its own); whoever wipes the store
//! (the agent on an abort or `kupgrade resume`, `kupgrade-init` after a
//! restore) zeroes up to [`wipe_end`] and then records 0. The file holds two
//! lines:
//!
//! ```text
//! store=/dev/pmem0
//! dirty_bytes=12582912        (or: dirty_bytes=unknown)
//! ```

use std::fs;
use std::io::{self, Write};
use std::path::Path;

pub const FILE: &str = "store-extent";

/// What the record says about one store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The store's path, as configured.
    pub store: String,
    /// Bytes from its start that may hold image data; `None` when unknown
    /// (a write that did not finish, or never recorded): all of it.
    pub dirty_bytes: Option<u64>,
}

impl Extent {
    pub fn parse(text: &str) -> Option<Extent> {
        let mut store = None;
        let mut dirty = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("store", v)) => store = Some(v.to_string()),
                Some(("dirty_bytes", "unknown")) => dirty = Some(None),
                Some(("dirty_bytes", v)) => dirty = Some(Some(v.parse().ok()?)),
                _ => {}
            }
        }
        Some(Extent {
            store: store?,
            dirty_bytes: dirty?,
        })
    }

    pub fn to_text(&self) -> String {
        let dirty = match self.dirty_bytes {
            Some(n) => n.to_string(),
            None => "unknown".into(),
        };
        format!("store={}\ndirty_bytes={dirty}\n", self.store)
    }

    /// The record in `dir`, if there is one that can be read.
    pub fn read(dir: &Path) -> Option<Extent> {
        Extent::parse(&fs::read_to_string(dir.join(FILE)).ok()?)
    }

    /// Replaces the record in `dir`: a new file, flushed, renamed over the
    /// old one, so that a crash leaves one or the other.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("{FILE}.new"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(self.to_text().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(FILE))?;
        // The rename itself, durable.
        fs::File::open(dir)?.sync_all()
    }
}

/// Where a wipe of the store at `store` (`store_len` bytes, holding an
/// image that ends at `image_end` if it has a valid superblock) must end:
/// the recorded mark or the image's end, whichever is further; all of the
/// store when the mark is unknown or is about another store.
pub fn wipe_end(
    recorded: Option<&Extent>,
    store: &str,
    image_end: Option<u64>,
    store_len: u64,
) -> u64 {
    let mark = recorded
        .filter(|e| e.store == store)
        .and_then(|e| e.dirty_bytes);
    match mark {
        Some(n) => n.max(image_end.unwrap_or(0)).min(store_len),
        None => store_len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_garbage_is_no_record() {
        for dirty in [Some(0), Some(12 << 20), None] {
            let e = Extent {
                store: "/dev/pmem0".into(),
                dirty_bytes: dirty,
            };
            assert_eq!(Extent::parse(&e.to_text()), Some(e));
        }
        assert_eq!(Extent::parse(""), None);
        assert_eq!(Extent::parse("store=/dev/pmem0\n"), None);
        assert_eq!(Extent::parse("store=/x\ndirty_bytes=lots\n"), None);
        let d = std::env::temp_dir().join(format!("extent-test-{}", std::process::id()));
        let e = Extent {
            store: "/dev/pmem0".into(),
            dirty_bytes: Some(4096),
        };
        e.write(&d).unwrap();
        assert_eq!(Extent::read(&d), Some(e));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_wipe_reaches_the_mark_or_the_image_and_all_of_the_store_when_unknown() {
        let mark = |dirty| Extent {
            store: "/dev/pmem0".into(),
            dirty_bytes: dirty,
        };
        let mib = 1 << 20;
        // An older, larger image's tail is past the current image's end.
        let older = mark(Some(200 * mib));
        assert_eq!(
            wipe_end(Some(&older), "/dev/pmem0", Some(10 * mib), 256 * mib),
            200 * mib
        );
        let smaller = mark(Some(mib));
        assert_eq!(
            wipe_end(Some(&smaller), "/dev/pmem0", Some(10 * mib), 256 * mib),
            10 * mib
        );
        assert_eq!(
            wipe_end(Some(&mark(Some(0))), "/dev/pmem0", None, 256 * mib),
            0
        );
        // Never past the store.
        assert_eq!(
            wipe_end(Some(&mark(Some(999 * mib))), "/dev/pmem0", None, 256 * mib),
            256 * mib
        );
        for unknown in [
            None,
            Some(&mark(None)),
            Some(&Extent {
                store: "/dev/pmem1".into(),
                dirty_bytes: Some(0),
            }),
        ] {
            assert_eq!(
                wipe_end(unknown, "/dev/pmem0", Some(mib), 256 * mib),
                256 * mib
            );
        }
    }
}
