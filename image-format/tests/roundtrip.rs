//! What goes in comes out: random trees and blobs, written with one or
//! several threads and small chunks, read back identical.

// Helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Cursor;
use std::os::unix::fs::MetadataExt;

use common::{build, image_in_vec, opts, snapshot, Node, Rng};
use image_format::{Image, ImageWriter, Manifest, SectionKind, WriteOptions};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Fill {
    Random(u64),
    Zero,
    Repeat(u8),
    /// Runs of zero, repeated and random 512-byte blocks.
    Mixed(u64),
}

fn fill(f: &Fill, len: usize) -> Vec<u8> {
    match f {
        Fill::Random(seed) => Rng(*seed | 1).bytes(len),
        Fill::Zero => vec![0; len],
        Fill::Repeat(b) => vec![*b; len],
        Fill::Mixed(seed) => {
            let mut r = Rng(*seed | 1);
            let mut v = Vec::with_capacity(len);
            while v.len() < len {
                let n = (512 * (1 + r.below(8)) as usize).min(len - v.len());
                match r.below(3) {
                    0 => v.extend(std::iter::repeat_n(0, n)),
                    1 => v.extend((0..n).map(|i| (i % 7) as u8)),
                    _ => v.extend(r.bytes(n)),
                }
            }
            v
        }
    }
}

fn fill_strategy() -> impl Strategy<Value = Fill> {
    prop_oneof![
        any::<u64>().prop_map(Fill::Random),
        Just(Fill::Zero),
        any::<u8>().prop_map(Fill::Repeat),
        any::<u64>().prop_map(Fill::Mixed),
    ]
}

const NAMES: &[&str] = &["a", "b", "dir x", "é", ".hidden", "pages-1.img", "z"];

#[derive(Clone, Debug)]
enum Kind {
    Dir(u32),
    File(usize, Fill, u32),
    Link(String),
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![
        prop::sample::select(vec![0o755u32, 0o700, 0o555, 0o1777]).prop_map(Kind::Dir),
        (
            // Up to three 4 KiB chunks and a bit.
            prop_oneof![Just(0usize), 0usize..13_000],
            fill_strategy(),
            prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o400, 0o4755, 0o000]),
        )
            .prop_map(|(n, f, m)| Kind::File(n, f, m)),
        prop::sample::select(vec!["../x", "/etc/passwd", "a/b", "."])
            .prop_map(|t| Kind::Link(t.to_string())),
    ]
}

/// A consistent tree from random entries: no entry under a file or link,
/// no path twice.
fn tree_strategy() -> impl Strategy<Value = Vec<(String, Node)>> {
    prop::collection::vec(
        (
            prop::collection::vec(prop::sample::select(NAMES.to_vec()), 1..4),
            kind_strategy(),
        ),
        0..14,
    )
    .prop_map(|entries| {
        let mut used = BTreeSet::new();
        let mut leaves = BTreeSet::new();
        let mut out = Vec::new();
        for (parts, kind) in entries {
            let path = parts.join("/");
            let blocked = (1..parts.len()).any(|i| leaves.contains(&parts[..i].join("/")));
            if used.contains(&path) || blocked {
                continue;
            }
            for i in 1..parts.len() {
                used.insert(parts[..i].join("/"));
            }
            used.insert(path.clone());
            let node = match kind {
                Kind::Dir(mode) => Node::Dir { mode },
                Kind::File(n, f, mode) => {
                    leaves.insert(path.clone());
                    Node::File {
                        data: fill(&f, n),
                        mode,
                    }
                }
                Kind::Link(target) => {
                    leaves.insert(path.clone());
                    Node::Link { target }
                }
            };
            out.push((path, node));
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn trees_and_blobs_come_back_identical(
        tree in tree_strategy(),
        blobs in prop::collection::vec((0usize..20_000, fill_strategy()), 0..4),
        threads in 1usize..4,
        chunk_size in prop::sample::select(vec![4096usize, 8192, 1 << 20]),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        build(&src, &tree);
        let before = snapshot(&src);
        let blobs: Vec<Vec<u8>> = blobs.iter().map(|(n, f)| fill(f, *n)).collect();

        let mut store = Vec::new();
        let total = image_in_vec(&mut store, opts(threads, chunk_size), |w| {
            w.add_tree("criu/app", &src).unwrap();
            for (i, b) in blobs.iter().enumerate() {
                w.add_blob(&format!("blob{i}"), b).unwrap();
            }
        });
        prop_assert_eq!(total as usize, store.len());

        let mut img = Image::from_slice(&store).unwrap();
        img.set_threads(threads);
        prop_assert_eq!(img.superblock().generation, 7);
        prop_assert_eq!(img.manifest().sections.len(), blobs.len() + 1);
        let report = img.verify().unwrap();
        prop_assert_eq!(report.sections.len(), blobs.len() + 1);

        let dest = tmp.path().join("dest");
        img.extract_tree("criu/app", &dest).unwrap();
        prop_assert_eq!(snapshot(&dest), before);
        for (i, b) in blobs.iter().enumerate() {
            prop_assert_eq!(&img.read_blob(&format!("blob{i}")).unwrap(), b);
        }
    }
}

#[test]
fn a_file_store_round_trips_with_every_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut r = Rng(42);
    let mut big = r.bytes(300_000);
    big[100_000..250_000].fill(0);
    build(
        &src,
        &[
            ("d/e/f".into(), Node::Dir { mode: 0o750 }),
            (
                "d/big".into(),
                Node::File {
                    data: big,
                    mode: 0o640,
                },
            ),
            (
                "empty".into(),
                Node::File {
                    data: vec![],
                    mode: 0o600,
                },
            ),
            (
                "link".into(),
                Node::Link {
                    target: "d/big".into(),
                },
            ),
        ],
    );
    let before = snapshot(&src);
    for threads in [1, 2, 3] {
        let path = tmp.path().join(format!("store{threads}"));
        let f = fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut w = ImageWriter::create(f, 64 << 20, opts(threads, 8192)).unwrap();
        w.add_tree("t", &src).unwrap();
        w.add_blob("b", b"hello").unwrap();
        w.add_blob("empty", b"").unwrap();
        let sum = w.finish(Manifest::default()).unwrap();
        assert_eq!(sum.sections, 3);
        assert!(sum.zero_chunks >= 10, "{sum:?}");
        assert!(sum.raw_chunks >= 10, "{sum:?}");
        assert_eq!(fs::metadata(&path).unwrap().len(), sum.total_len);

        let mut img = Image::open(fs::File::open(&path).unwrap()).unwrap();
        img.set_threads(threads);
        img.verify().unwrap();
        let dest = tmp.path().join(format!("dest{threads}"));
        img.extract_tree("t", &dest).unwrap();
        assert_eq!(snapshot(&dest), before);
        assert_eq!(img.read_blob("b").unwrap(), b"hello");
        assert_eq!(img.read_blob("empty").unwrap(), b"");
        let e = img.manifest().section("empty").unwrap();
        assert_eq!((e.chunks, e.raw_len, e.kind), (0, 0, SectionKind::Blob));
    }
}

#[test]
fn runs_of_zero_chunks_become_holes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut data = vec![0u8; 8 << 20];
    data[0] = 1;
    let last = data.len() - 1;
    data[last] = 1;
    build(&src, &[("pages".into(), Node::File { data, mode: 0o600 })]);
    let mut store = Vec::new();
    image_in_vec(&mut store, opts(2, 64 << 10), |w| {
        w.add_tree("t", &src).unwrap()
    });
    // 8 MiB of (mostly) zeros take next to nothing.
    assert!(store.len() < 64 << 10, "{} bytes", store.len());
    let mut img = Image::from_slice(&store).unwrap();
    let dest = tmp.path().join("dest");
    img.extract_tree("t", &dest).unwrap();
    let m = fs::metadata(dest.join("pages")).unwrap();
    assert_eq!(m.len(), 8 << 20);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "{} blocks allocated",
        m.blocks()
    );
    assert_eq!(snapshot(&dest), snapshot(&src));
}

#[test]
fn existing_directories_keep_their_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build(
        &src,
        &[
            ("dev/shm".into(), Node::Dir { mode: 0o755 }),
            (
                "dev/shm/seg".into(),
                Node::File {
                    data: b"x".to_vec(),
                    mode: 0o666,
                },
            ),
        ],
    );
    let mut store = Vec::new();
    image_in_vec(&mut store, WriteOptions::default(), |w| {
        w.add_tree("tmpfs", &src).unwrap()
    });
    let dest = tmp.path().join("root");
    build(&dest, &[("dev/shm".into(), Node::Dir { mode: 0o1777 })]);
    Image::from_slice(&store)
        .unwrap()
        .extract_tree("tmpfs", &dest)
        .unwrap();
    let m = fs::metadata(dest.join("dev/shm")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o1777);
    assert_eq!(fs::read(dest.join("dev/shm/seg")).unwrap(), b"x");
}

#[test]
fn reading_one_section_reads_no_other() {
    // A store whose other sections are garbage: only the asked one is read.
    let mut store = Vec::new();
    let mut r = Rng(9);
    let a = r.bytes(50_000);
    let b = r.bytes(50_000);
    image_in_vec(&mut store, opts(1, 4096), |w| {
        w.add_blob("a", &a).unwrap();
        w.add_blob("b", &b).unwrap();
    });
    let img = Image::from_slice(&store).unwrap();
    let sa = img.manifest().section("a").unwrap().clone();
    drop(img);
    for x in &mut store[sa.offset as usize..(sa.offset + sa.stored_len) as usize] {
        *x = 0xee;
    }
    let mut img = Image::open(Cursor::new(&store[..])).unwrap();
    assert_eq!(img.read_blob("b").unwrap(), b);
    assert!(img.read_blob("a").is_err());
}

/// Sections written without compression (a RAM store's frozen window) sit
/// beside compressed ones (pre-copy's) in one image: every chunk that is
/// not all zero is stored raw, and both kinds read back and verify.
#[test]
fn uncompressed_sections_mix_with_compressed_ones() {
    let compressible = b"a page of a process, much like the next one. ".repeat(4000);
    let mut zeros_and_text = vec![0u8; 64 << 10];
    zeros_and_text.extend_from_slice(&compressible);
    for threads in [1, 2] {
        let mut bytes = Vec::new();
        image_in_vec(&mut bytes, opts(threads, 4096), |w| {
            w.add_blob("packed", &compressible).unwrap();
            w.set_compress(false);
            let before = w.remaining();
            w.add_blob("plain", &zeros_and_text).unwrap();
            // Its raw bytes, the 16 zero chunks as headers, and a header
            // per other chunk.
            let used = before - w.remaining();
            assert!(used < zeros_and_text.len() as u64, "{used}");
            assert!(used >= compressible.len() as u64, "{used}");
            w.set_compress(true);
            w.add_blob("packed again", &compressible).unwrap();
        });
        let mut img = Image::from_slice(&bytes).unwrap();
        img.set_threads(threads);
        img.verify().unwrap();
        for (name, data) in [
            ("packed", &compressible),
            ("plain", &zeros_and_text),
            ("packed again", &compressible),
        ] {
            assert_eq!(&img.read_blob(name).unwrap(), data, "{name}");
        }
        let stored = |name: &str| img.manifest().section(name).unwrap().stored_len;
        assert!(stored("packed") * 10 < compressible.len() as u64);
        assert_eq!(stored("packed"), stored("packed again"));
        assert!(stored("plain") > compressible.len() as u64);
    }
}
