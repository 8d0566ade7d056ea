//! Damage anywhere is caught: a flipped byte, a truncated store, a write
//! that died half-way over an older image. Never a panic, never a wrong
//! read that says Ok.

// Helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;

use common::{build, image_in_vec, opts, snapshot, Node, Rng};
use image_format::{Error, Image, ImageWriter, Manifest, SectionKind, Store};
use proptest::prelude::*;

struct Sample {
    bytes: Vec<u8>,
    tree: BTreeMap<String, String>,
    blobs: BTreeMap<String, Vec<u8>>,
    _tmp: tempfile::TempDir,
}

/// A small image with every kind of chunk: raw, zstd, zero, several per
/// section, a tree and blobs.
fn sample() -> Sample {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut r = Rng(5);
    let mut mixed = r.bytes(4000);
    mixed.extend(vec![0u8; 8192]);
    mixed.extend(std::iter::repeat_n(b"abcdefgh".as_slice(), 600).flatten());
    build(
        &src,
        &[
            ("d".into(), Node::Dir { mode: 0o750 }),
            (
                "d/pages".into(),
                Node::File {
                    data: mixed,
                    mode: 0o600,
                },
            ),
            (
                "empty".into(),
                Node::File {
                    data: vec![],
                    mode: 0o644,
                },
            ),
            (
                "l".into(),
                Node::Link {
                    target: "d/pages".into(),
                },
            ),
        ],
    );
    let mut blobs = BTreeMap::new();
    blobs.insert("random".to_string(), r.bytes(5000));
    blobs.insert("zeros".to_string(), vec![0u8; 9000]);
    blobs.insert("text".to_string(), b"{\"hostname\":\"x\"}".repeat(300));
    let mut bytes = Vec::new();
    image_in_vec(&mut bytes, opts(1, 4096), |w| {
        w.add_tree("tree", &src).unwrap();
        for (name, b) in &blobs {
            w.add_blob(name, b).unwrap();
        }
    });
    Sample {
        tree: snapshot(&src),
        bytes,
        blobs,
        _tmp: tmp,
    }
}

/// Every read of a damaged image either fails or returns exactly what was
/// written; `verify` always fails.
fn check_damaged(s: &Sample, bytes: &[u8], scratch: &Path, what: &str) {
    let mut img = match Image::from_slice(bytes) {
        Ok(img) => img,
        Err(_) => return,
    };
    img.set_threads(1);
    assert!(img.verify().is_err(), "{what}: verify passed");
    for (name, b) in &s.blobs {
        if let Ok(got) = img.read_blob(name) {
            assert_eq!(&got, b, "{what}: blob {name} read wrong but Ok");
        }
    }
    let _ = std::fs::remove_dir_all(scratch);
    if img.extract_tree("tree", scratch).is_ok() {
        assert_eq!(
            snapshot(scratch),
            s.tree,
            "{what}: tree extracted wrong but Ok"
        );
    }
}

#[test]
fn the_sample_is_sound() {
    let s = sample();
    let mut img = Image::from_slice(&s.bytes).unwrap();
    let report = img.verify().unwrap();
    let kinds: Vec<u32> = report.sections.iter().map(|r| r.zero_chunks).collect();
    assert!(kinds.iter().sum::<u32>() >= 3, "{kinds:?}");
    assert!(report.chunks >= 10);
}

#[test]
fn flipping_any_byte_of_the_image_is_caught() {
    let s = sample();
    let scratch = s._tmp.path().join("scratch");
    let mut bytes = s.bytes.clone();
    for i in 0..bytes.len() {
        let mask = 1u8 << (i % 8);
        bytes[i] ^= mask;
        check_damaged(&s, &bytes, &scratch, &format!("byte {i} ^ {mask:#x}"));
        bytes[i] ^= mask;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_damage_is_caught(
        hits in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
    ) {
        let s = sample();
        let scratch = s._tmp.path().join("scratch");
        let mut bytes = s.bytes.clone();
        for (at, mask) in &hits {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        if bytes != s.bytes {
            check_damaged(&s, &bytes, &scratch, &format!("{hits:?}"));
        }
    }
}

/// Offsets worth cutting at: the superblock, every chunk header and body,
/// every section's end, the manifest.
fn boundaries(bytes: &[u8]) -> Vec<usize> {
    let mut cuts = vec![0, 1, 7, 8, 9, 4095, 4096, 4097];
    for (_, _, pos, stored) in image_format::testing::chunks(bytes) {
        let pos = pos as usize;
        cuts.extend([pos, pos + 1, pos + 23, pos + 24, pos + 24 + stored as usize]);
    }
    let img = Image::from_slice(bytes).unwrap();
    let m = img.superblock().manifest_offset as usize;
    cuts.extend([m - 1, m, m + 1, bytes.len() - 1]);
    cuts.retain(|&c| c < bytes.len());
    cuts
}

#[test]
fn truncation_at_every_boundary_and_at_random_points_is_refused() {
    let s = sample();
    let mut cuts = boundaries(&s.bytes);
    let mut r = Rng(77);
    cuts.extend((0..200).map(|_| r.below(s.bytes.len() as u64) as usize));
    for cut in cuts {
        let e = match Image::from_slice(&s.bytes[..cut]) {
            Ok(_) => panic!("an image cut at {cut} opened"),
            Err(e) => e,
        };
        assert!(
            matches!(
                e,
                Error::NoImage | Error::Truncated { .. } | Error::LengthExceedsStore { .. }
            ),
            "cut at {cut}: {e}"
        );
    }
}

#[test]
fn a_cut_image_over_a_stale_one_is_refused_whatever_follows() {
    // On a block device nothing ends at a cut: stale bytes follow. Keep the
    // new image's head and an older image's tail.
    let s = sample();
    let mut older = Vec::new();
    let mut r = Rng(3);
    let big = r.bytes(s.bytes.len() * 2);
    image_in_vec(&mut older, opts(2, 4096), |w| {
        w.add_blob("random", &big).unwrap()
    });
    let scratch = s._tmp.path().join("scratch");
    for cut in boundaries(&s.bytes) {
        if cut < 4096 {
            continue;
        }
        let mut mixed = s.bytes[..cut].to_vec();
        mixed.extend_from_slice(&older[cut..]);
        if mixed[..s.bytes.len()] != s.bytes[..] {
            check_damaged(&s, &mixed, &scratch, &format!("cut at {cut}"));
        }
    }
}

#[test]
fn stale_bytes_after_a_smaller_image_are_ignored() {
    let s = sample();
    let mut store = Vec::new();
    let mut r = Rng(11);
    let big = r.bytes(200_000);
    image_in_vec(&mut store, opts(2, 4096), |w| {
        w.add_blob("old", &big).unwrap()
    });
    let old_len = store.len();
    store[..s.bytes.len()].copy_from_slice(&s.bytes);
    assert_eq!(store.len(), old_len);
    let mut img = Image::from_slice(&store).unwrap();
    assert_eq!(img.superblock().total_len as usize, s.bytes.len());
    img.verify().unwrap();
    assert_eq!(img.read_blob("random").unwrap(), s.blobs["random"]);
}

/// A store that fails every write after `budget` bytes, like a machine
/// that dies mid-write.
struct Dying<'a> {
    inner: Cursor<&'a mut Vec<u8>>,
    budget: usize,
}

impl Read for Dying<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Dying<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::Error::other("the machine died"));
        }
        let n = buf.len().min(self.budget);
        let n = self.inner.write(&buf[..n])?;
        self.budget -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Dying<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl Store for Dying<'_> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn write_new(store: Dying<'_>, threads: usize, data: &[u8]) -> Result<(), Error> {
    let mut w = ImageWriter::create(store, 1 << 30, opts(threads, 4096))?;
    w.add_blob("new", data)?;
    w.add_blob("zeros", &[0u8; 20_000])?;
    w.finish(Manifest::default()).map(|_| ())
}

#[test]
fn a_write_that_dies_anywhere_never_leaves_a_readable_stale_image() {
    let mut r = Rng(21);
    let old_data = r.bytes(30_000);
    let new_data = r.bytes(30_000);
    let mut old = Vec::new();
    image_in_vec(&mut old, opts(1, 4096), |w| {
        w.add_blob("old", &old_data).unwrap()
    });

    // How many bytes a complete write takes.
    let mut full = old.clone();
    let all = usize::MAX / 2;
    write_new(
        Dying {
            inner: Cursor::new(&mut full),
            budget: all,
        },
        1,
        &new_data,
    )
    .unwrap();
    let written = {
        let mut probe = old.clone();
        let mut n = 0;
        // Find the smallest budget that succeeds.
        let (mut lo, mut hi) = (0usize, 1 << 24);
        while lo < hi {
            let mid = (lo + hi) / 2;
            probe.clone_from(&old);
            if write_new(
                Dying {
                    inner: Cursor::new(&mut probe),
                    budget: mid,
                },
                1,
                &new_data,
            )
            .is_ok()
            {
                hi = mid;
                n = mid;
            } else {
                lo = mid + 1;
            }
        }
        n
    };
    assert!(written > 30_000);

    let mut budgets: Vec<usize> = (0..written).step_by(61).collect();
    budgets.extend([
        1,
        7,
        8,
        4095,
        4096,
        4097,
        written - 4097,
        written - 4096,
        written - 1,
    ]);
    for threads in [1, 2] {
        for &budget in &budgets {
            let mut store = old.clone();
            let result = write_new(
                Dying {
                    inner: Cursor::new(&mut store),
                    budget,
                },
                threads,
                &new_data,
            );
            assert!(result.is_err(), "budget {budget} of {written}");
            match Image::from_slice(&store) {
                // A superblock cut half-way fails its checksum.
                Err(Error::NoImage | Error::SuperblockChecksum) => {}
                // Nothing was written at all: the old image is intact.
                Ok(mut img) if budget == 0 => {
                    assert!(img.manifest().section("old").is_some());
                    img.verify().unwrap();
                }
                Ok(img) => panic!(
                    "budget {budget}: an image opened: {:?}",
                    img.manifest()
                        .sections
                        .iter()
                        .map(|s| &s.name)
                        .collect::<Vec<_>>()
                ),
                Err(e) => panic!("budget {budget}: {e} instead of no image"),
            }
        }
    }
}

#[test]
fn a_writer_dropped_before_finish_leaves_no_image() {
    let mut store = Vec::new();
    image_in_vec(&mut store, opts(1, 4096), |w| {
        w.add_blob("old", b"old").unwrap()
    });
    assert!(Image::from_slice(&store).is_ok());
    let mut w = ImageWriter::create(Cursor::new(&mut store), 1 << 30, opts(2, 4096)).unwrap();
    w.add_blob("new", &[1u8; 50_000]).unwrap();
    drop(w);
    assert!(matches!(Image::from_slice(&store), Err(Error::NoImage)));
}

#[test]
fn a_section_whose_chunks_were_swapped_is_caught() {
    let mut r = Rng(8);
    let data = r.bytes(3 * 4096);
    let mut bytes = Vec::new();
    image_in_vec(&mut bytes, opts(1, 4096), |w| {
        w.add_blob("b", &data).unwrap()
    });
    let chunks = image_format::testing::chunks(&bytes);
    let (_, _, p0, s0) = chunks[0].clone();
    let (_, _, p1, s1) = chunks[1].clone();
    assert_eq!(s0, s1);
    let len = 24 + s0 as usize;
    let c0 = bytes[p0 as usize..p0 as usize + len].to_vec();
    let c1 = bytes[p1 as usize..p1 as usize + len].to_vec();
    bytes[p0 as usize..p0 as usize + len].copy_from_slice(&c1);
    bytes[p1 as usize..p1 as usize + len].copy_from_slice(&c0);
    let mut img = Image::from_slice(&bytes).unwrap();
    let e = img.read_blob("b").unwrap_err();
    assert!(
        matches!(&e, Error::ChunkHeader { section, chunk: 0, .. } if section == "b"),
        "{e}"
    );
    // Even with every checksum recomputed, the index gives it away.
    image_format::testing::reseal(&mut bytes);
    let mut img = Image::from_slice(&bytes).unwrap();
    assert!(img.read_blob("b").is_err());
    assert_eq!(img.manifest().sections[0].kind, SectionKind::Blob);
}
