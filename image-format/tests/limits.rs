//! A reader never trusts a size: the section table is checked against the
//! chunk size, each chunk against the table before its bytes are read, a
//! blob against the cap before it is read into memory. A crafted image
//! with valid checksums cannot make it allocate more than that.

// Helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{image_in_vec, opts, Rng};
use image_format::format::{CHUNK_HEADER_LEN, MAX_BLOB, MAX_CHUNK};
use image_format::testing::{chunks, rewrite_manifest, zero_blob_image};
use image_format::{Error, Image, SectionEntry, SectionKind};

fn blob_image(data: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    image_in_vec(&mut bytes, opts(1, 4096), |w| {
        w.add_blob("b", data).unwrap()
    });
    bytes
}

fn open_err(bytes: &[u8]) -> Error {
    match Image::from_slice(bytes) {
        Ok(_) => panic!("the image opened"),
        Err(e) => e,
    }
}

/// Chunk header field offsets (see format::ChunkHeader).
const RAW_LEN: usize = 12;
const STORED_LEN: usize = 16;

#[test]
fn a_crafted_blob_is_refused_above_the_cap_before_anything_is_read() {
    // 6400 zero chunks, 150 KiB of store, claim 100 GiB.
    for (claim, threads) in [(MAX_BLOB + 1, 1), (100 << 30, 1), (100 << 30, 2)] {
        let bytes = zero_blob_image("b", MAX_CHUNK, claim);
        assert!(bytes.len() < 200 << 10);
        let mut img = Image::from_slice(&bytes).unwrap();
        img.set_threads(threads);
        let e = img.read_blob("b").unwrap_err();
        assert!(
            matches!(&e, Error::BlobTooLarge { section, raw_len, limit }
                if section == "b" && *raw_len == claim && *limit == MAX_BLOB),
            "{e}"
        );
        // Such an image is well formed: only the cap refuses it.
        img.verify().unwrap();
    }
    let bytes = zero_blob_image("b", MAX_CHUNK, MAX_BLOB);
    let got = Image::from_slice(&bytes).unwrap().read_blob("b").unwrap();
    assert_eq!(got.len() as u64, MAX_BLOB);
    assert!(got.iter().all(|&b| b == 0));
}

#[test]
fn the_writer_refuses_a_blob_the_reader_would_refuse() {
    let big = vec![0u8; MAX_BLOB as usize + 1];
    let mut bytes = Vec::new();
    image_in_vec(&mut bytes, opts(2, 1 << 20), |w| {
        let e = w.add_blob("big", &big).unwrap_err();
        assert!(
            matches!(&e, Error::BlobTooLarge { section, .. } if section == "big"),
            "{e}"
        );
        assert_eq!(w.position(), 4096, "nothing was written");
        w.add_blob("max", &big[1..]).unwrap();
    });
    let mut img = Image::from_slice(&bytes).unwrap();
    assert!(img.manifest().section("big").is_none());
    assert_eq!(img.read_blob("max").unwrap().len() as u64, MAX_BLOB);
}

#[test]
fn a_reader_never_hands_out_more_than_the_section_table_claims() {
    let data = Rng(5).bytes(10_000);
    for threads in [1, 2] {
        let mut bytes = blob_image(&data);
        rewrite_manifest(&mut bytes, |m| m.sections[0].raw_len -= 1);
        let mut img = Image::from_slice(&bytes).unwrap();
        img.set_threads(threads);
        let mut out = Vec::new();
        let e = img.copy_section("b", &mut out).unwrap_err();
        assert!(
            matches!(&e, Error::SectionSize { section } if section == "b"),
            "{e}"
        );
        assert!(
            out.len() < 10_000 - 1,
            "{} bytes handed out past a table of 9999",
            out.len()
        );
        assert_eq!(out, data[..out.len()]);
    }
}

#[test]
fn a_chunk_short_of_the_chunk_size_before_the_last_is_refused() {
    // Three zero chunks of 4096; the first made short, and the table's
    // length made to match the sum: only the chunk size rule catches it.
    let mut bytes = zero_blob_image("b", 4096, 3 * 4096);
    let (_, _, pos, _) = chunks(&bytes)[0].clone();
    let at = pos as usize + RAW_LEN;
    bytes[at..at + 4].copy_from_slice(&100u32.to_le_bytes());
    rewrite_manifest(&mut bytes, |m| m.sections[0].raw_len = 100 + 2 * 4096);
    let e = Image::from_slice(&bytes)
        .unwrap()
        .read_blob("b")
        .unwrap_err();
    assert!(
        matches!(&e, Error::SectionSize { section } if section == "b"),
        "{e}"
    );
}

#[test]
fn a_table_whose_lengths_disagree_with_its_chunk_count_is_refused_at_open() {
    // 3 full chunks of 4096 random (raw) bytes, then another section.
    let mut base = Vec::new();
    image_in_vec(&mut base, opts(1, 4096), |w| {
        w.add_blob("b", &Rng(6).bytes(3 * 4096)).unwrap();
        w.add_blob("c", &Rng(7).bytes(100)).unwrap();
    });
    type Edit = Box<dyn Fn(&mut Vec<SectionEntry>)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("raw length of 2 chunks", Box::new(|s| s[0].raw_len = 5000)),
        (
            "4 chunks for 3 chunks' bytes",
            Box::new(|s| s[0].chunks = 4),
        ),
        (
            "more stored bytes than its chunks can hold",
            Box::new(|s| {
                let next = s.remove(1);
                s[0].stored_len += next.stored_len;
            }),
        ),
    ];
    for (what, edit) in cases {
        let mut bytes = base.clone();
        rewrite_manifest(&mut bytes, |m| edit(&mut m.sections));
        let e = open_err(&bytes);
        assert!(
            matches!(&e, Error::SectionOutside { section, .. } if section == "b"),
            "{what}: {e}"
        );
    }
}

#[test]
fn a_chunk_claiming_more_than_the_chunk_size_is_refused_before_its_bytes_are_read() {
    // Raw chunks of 4096 stored bytes each; chunk 0 claims 5000, which
    // still fits in its section. Not resealed: a reader that read the
    // 5000 bytes first would find a checksum mismatch.
    let mut bytes = blob_image(&Rng(8).bytes(3 * 4096));
    let (_, _, pos, stored) = chunks(&bytes)[0].clone();
    assert_eq!(stored, 4096);
    let at = pos as usize + STORED_LEN;
    bytes[at..at + 4].copy_from_slice(&5000u32.to_le_bytes());
    let e = Image::from_slice(&bytes)
        .unwrap()
        .read_blob("b")
        .unwrap_err();
    assert!(
        matches!(&e, Error::ChunkHeader { section, chunk: 0, .. } if section == "b"),
        "{e}"
    );
}

#[test]
fn a_table_of_many_sections_is_checked_in_linear_time() {
    let mut bytes = blob_image(b"x");
    let n = 50_000;
    rewrite_manifest(&mut bytes, |m| {
        let end = m.sections[0].offset + m.sections[0].stored_len;
        for i in 0..n {
            m.sections.push(SectionEntry {
                name: format!("s{i:05}"),
                kind: SectionKind::Blob,
                raw_len: 0,
                stored_len: 0,
                chunks: 0,
                offset: end,
            });
        }
    });
    let started = Instant::now();
    let img = Image::from_slice(&bytes).unwrap();
    let took = started.elapsed();
    assert_eq!(img.manifest().sections.len(), n + 1);
    // Linear: well under a second; n^2/2 name comparisons take far longer.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // A repeated name among them is still found.
    let mut dup = bytes.clone();
    rewrite_manifest(&mut dup, |m| m.sections[n].name = "s00007".into());
    let e = open_err(&dup);
    assert!(
        matches!(&e, Error::SectionOutside { section, .. } if section == "s00007"),
        "{e}"
    );
}

#[test]
fn chunk_headers_are_what_the_crafted_images_are_made_of() {
    // The helper's images are what the writer would make: one header per
    // chunk, nothing stored.
    let bytes = zero_blob_image("z", 4096, 10_000);
    let c = chunks(&bytes);
    assert_eq!(c.len(), 3);
    assert!(c.iter().all(|(_, _, _, stored)| *stored == 0));
    assert_eq!(c[1].2 - c[0].2, CHUNK_HEADER_LEN as u64);
    let mut img = Image::from_slice(&bytes).unwrap();
    assert_eq!(img.read_blob("z").unwrap(), vec![0u8; 10_000]);
    img.verify().unwrap();
}
