//! Inputs the fuzzer found (tests/fixtures/fuzz/) replayed on every run,
//! and the seeds it starts from (../fuzz/seeds/read_image/).

// Helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;

use common::{build, image_in_vec, opts, Node, Rng};
use image_format::format::{MAX_BLOB, MAX_CHUNK};
use image_format::testing::{exercise, zero_blob_image};
use image_format::Error;

fn replay(dir: &Path) -> usize {
    let scratch = tempfile::tempdir().unwrap();
    let mut n = 0;
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    for e in entries {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "md") {
            continue;
        }
        let data = fs::read(&path).unwrap();
        // Must return, whatever the bytes.
        image_format::testing::fuzz_one(&data, &scratch.path().join("x"));
        n += 1;
    }
    n
}

#[test]
fn fuzzer_findings_and_seeds_are_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    replay(&root.join("tests/fixtures/fuzz"));
    let dir = root.join("../fuzz/seeds/read_image");
    let seeds = replay(&dir);
    assert!(seeds >= 4, "the fuzz seeds are missing");
    // A seed of another format version is refused at once and fuzzes
    // nothing: rewrite them (write_fuzz_seeds) when the format changes.
    for e in fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let data = fs::read(&path).unwrap();
        if let Err(e) = image_format::Image::from_slice(&data[1..]) {
            panic!("{} does not open: {e}", path.display());
        }
    }
}

#[test]
fn the_harness_reads_large_sections_under_the_production_caps() {
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("x");
    // A blob above the cap: read_blob itself refuses it.
    let bytes = zero_blob_image("big", MAX_CHUNK, MAX_BLOB + 1);
    let e = exercise(&bytes, 1, &scratch).unwrap_err();
    assert!(matches!(e, Error::BlobTooLarge { .. }), "{e}");
    // A tree holding a (sparse) file well above 64 MiB is extracted.
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::File::create(src.join("big"))
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let mut bytes = Vec::new();
    image_in_vec(&mut bytes, opts(2, 1 << 20), |w| {
        w.add_tree("t", &src).unwrap()
    });
    exercise(&bytes, 2, &scratch).unwrap();
    assert_eq!(fs::metadata(scratch.join("big")).unwrap().len(), 100 << 20);
}

/// Valid small images to start fuzzing from, and two large ones (a blob
/// claiming more than MAX_BLOB, a tree holding a 100 MiB sparse file); each
/// in every mode.
#[test]
#[ignore = "writes ../fuzz/seeds/read_image; run by hand"]
fn write_fuzz_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("../fuzz/seeds/read_image");
    fs::create_dir_all(&out).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut r = Rng(1);
    let mut mixed = r.bytes(600);
    mixed.extend([0u8; 4200]);
    mixed.extend(b"abc".repeat(500));
    build(
        &src,
        &[
            ("d".into(), Node::Dir { mode: 0o755 }),
            (
                "d/f".into(),
                Node::File {
                    data: mixed,
                    mode: 0o644,
                },
            ),
            (
                "e".into(),
                Node::File {
                    data: vec![],
                    mode: 0o600,
                },
            ),
            (
                "l".into(),
                Node::Link {
                    target: "d/f".into(),
                },
            ),
        ],
    );
    let images: Vec<(&str, Vec<u8>)> = vec![
        ("tree", {
            let mut b = Vec::new();
            image_in_vec(&mut b, opts(1, 4096), |w| w.add_tree("t", &src).unwrap());
            b
        }),
        ("blobs", {
            let mut b = Vec::new();
            image_in_vec(&mut b, opts(1, 4096), |w| {
                w.add_blob("z", &[0u8; 5000]).unwrap();
                w.add_blob("r", &r.bytes(300)).unwrap();
                w.add_blob("c", &b"x".repeat(5000)).unwrap();
            });
            b
        }),
        ("bigblob", zero_blob_image("big", MAX_CHUNK, MAX_BLOB + 1)),
        ("bigtree", {
            let sparse = tmp.path().join("sparse");
            fs::create_dir(&sparse).unwrap();
            fs::File::create(sparse.join("big"))
                .unwrap()
                .set_len(100 << 20)
                .unwrap();
            let mut b = Vec::new();
            // 1 MiB chunks: mostly zero chunks, two small zstd ones.
            image_in_vec(&mut b, opts(1, 1 << 20), |w| {
                w.add_tree("t", &sparse).unwrap()
            });
            b
        }),
    ];
    for (name, img) in images {
        for mode in [0u8, 1, 3] {
            let mut data = vec![mode];
            data.extend(&img);
            fs::write(out.join(format!("{name}-mode{mode}")), data).unwrap();
        }
    }
}
