//! Each kind of bad input gets its own error, naming the section and chunk
//! where there is one.

// Helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::Cursor;
use std::os::unix::net::UnixListener;

use common::{build, image_in_vec, opts, Node, Rng};
use image_format::format::{CHUNK_HEADER_LEN, REC_DIR, REC_END, REC_FILE, REC_SYMLINK};
use image_format::testing::{chunks, reseal, rewrite_manifest};
use image_format::{
    Error, Image, ImageWriter, Manifest, SectionKind, WriteOptions, FORMAT_MAJOR, FORMAT_MINOR,
};

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

fn read_err(bytes: &[u8], section: &str) -> Error {
    let mut img = Image::from_slice(bytes).unwrap();
    img.read_blob(section).unwrap_err()
}

/// Superblock field offsets (see format::RawSuperblock).
const MAJOR: usize = 8;
const MINOR: usize = 10;
const STATE: usize = 12;
const CHUNK_SIZE: usize = 52;

#[test]
fn a_store_without_magic_holds_no_image() {
    for bytes in [
        vec![],
        vec![0u8; 3],
        vec![0u8; 10_000],
        Rng(1).bytes(10_000),
    ] {
        let e = open_err(&bytes);
        assert!(matches!(e, Error::NoImage), "{e}");
        assert_eq!(e.to_string(), "no kupgrade image in this store");
    }
}

#[test]
fn a_store_cut_inside_the_superblock_is_truncated() {
    let bytes = blob_image(b"x");
    assert!(matches!(open_err(&bytes[..100]), Error::Truncated { .. }));
}

#[test]
fn another_major_is_refused_before_anything_else() {
    let mut bytes = blob_image(b"x");
    bytes[MAJOR..MAJOR + 2].copy_from_slice(&(FORMAT_MAJOR + 1).to_le_bytes());
    // Whatever a future major's checksum is, the version speaks first.
    let e = open_err(&bytes);
    assert!(
        matches!(e, Error::UnknownMajor { found, .. } if found == FORMAT_MAJOR + 1),
        "{e}"
    );
    reseal(&mut bytes);
    assert!(matches!(open_err(&bytes), Error::UnknownMajor { .. }));
}

#[test]
fn a_newer_minor_is_refused_and_older_ones_are_read() {
    let mut bytes = blob_image(b"x");
    bytes[MINOR..MINOR + 2].copy_from_slice(&(FORMAT_MINOR + 1).to_le_bytes());
    reseal(&mut bytes);
    let e = open_err(&bytes);
    assert!(
        matches!(e, Error::NewerMinor { found, .. } if found == FORMAT_MINOR + 1),
        "{e}"
    );
    for minor in 0..=FORMAT_MINOR {
        bytes[MINOR..MINOR + 2].copy_from_slice(&minor.to_le_bytes());
        reseal(&mut bytes);
        let img = Image::from_slice(&bytes).unwrap();
        assert_eq!(img.superblock().minor, minor);
    }
}

#[test]
fn a_damaged_superblock_fails_its_checksum() {
    let mut bytes = blob_image(b"x");
    bytes[2000] ^= 1; // reserved space is covered too
    assert!(matches!(open_err(&bytes), Error::SuperblockChecksum));
    bytes[2000] ^= 1;
    bytes[STATE] = 3;
    assert!(matches!(open_err(&bytes), Error::SuperblockChecksum));
}

#[test]
fn an_unknown_state_and_a_bad_chunk_size_are_refused() {
    let mut bytes = blob_image(b"x");
    bytes[STATE] = 9;
    reseal(&mut bytes);
    assert!(matches!(open_err(&bytes), Error::UnknownState(9)));
    let mut bytes = blob_image(b"x");
    bytes[CHUNK_SIZE..CHUNK_SIZE + 4].copy_from_slice(&0u32.to_le_bytes());
    reseal(&mut bytes);
    assert!(matches!(open_err(&bytes), Error::BadSuperblock(_)));
}

#[test]
fn an_image_longer_than_its_store_is_refused() {
    let bytes = blob_image(&[1u8; 10_000]);
    let n = bytes.len() as u64;
    let e = open_err(&bytes[..bytes.len() - 1]);
    assert!(
        matches!(e, Error::LengthExceedsStore { total, store } if total == n && store == n - 1),
        "{e}"
    );
}

#[test]
fn a_damaged_or_unparsable_manifest_is_refused() {
    let mut bytes = blob_image(b"x");
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    assert!(matches!(open_err(&bytes), Error::ManifestChecksum));
    let img_len = bytes.len();
    let mut bytes = blob_image(b"x");
    let m = Image::from_slice(&bytes)
        .unwrap()
        .superblock()
        .manifest_offset as usize;
    for b in &mut bytes[m..img_len] {
        *b = b'#';
    }
    reseal(&mut bytes);
    let e = open_err(&bytes);
    assert!(matches!(e, Error::ManifestParse(_)), "{e}");
    assert_eq!(e.to_string(), "the manifest does not parse");
}

#[test]
fn a_section_table_pointing_outside_the_image_is_refused() {
    let base = blob_image(&[1u8; 10_000]);
    type Edit = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<Edit> = vec![
        Box::new(|m| m.sections[0].offset += 1 << 40),
        Box::new(|m| m.sections[0].stored_len += 1 << 20),
        Box::new(|m| m.sections[0].stored_len = u64::MAX),
        Box::new(|m| m.sections[0].offset = 0),
        Box::new(|m| m.sections[0].chunks = u32::MAX),
        Box::new(|m| m.sections[0].raw_len = u64::MAX),
        Box::new(|m| {
            let s = m.sections[0].clone();
            m.sections.push(s);
        }),
        Box::new(|m| m.sections.clear()),
    ];
    for (i, edit) in cases.iter().enumerate() {
        let mut bytes = base.clone();
        rewrite_manifest(&mut bytes, |m| edit(m));
        let e = open_err(&bytes);
        assert!(matches!(e, Error::SectionOutside { .. }), "case {i}: {e}");
    }
}

#[test]
fn a_damaged_chunk_names_its_section_and_index() {
    let mut r = Rng(2);
    let data = r.bytes(4 * 4096);
    let mut bytes = Vec::new();
    image_in_vec(&mut bytes, opts(1, 4096), |w| {
        w.add_blob("first", b"fine").unwrap();
        w.add_blob("criu/db", &data).unwrap();
    });
    let (_, _, pos, _) = chunks(&bytes)
        .into_iter()
        .find(|c| c.0 == "criu/db" && c.1 == 1)
        .unwrap();
    bytes[pos as usize + CHUNK_HEADER_LEN + 100] ^= 4;
    let e = read_err(&bytes, "criu/db");
    assert!(
        matches!(&e, Error::ChunkChecksum { section, chunk: 1 } if section == "criu/db"),
        "{e}"
    );
    assert_eq!(e.to_string(), "section criu/db, chunk 1: checksum mismatch");
    // The other section is unharmed; verify names the damaged one.
    let mut img = Image::from_slice(&bytes).unwrap();
    assert_eq!(img.read_blob("first").unwrap(), b"fine");
    let report = img.check();
    assert!(report.sections[0].result.is_ok());
    assert!(matches!(
        report.sections[1].result,
        Err(Error::ChunkChecksum { chunk: 1, .. })
    ));
    // The digest hashes the headers, the damaged chunk's and those after it,
    // which are intact: the chunk's own checksum catches the changed byte.
    assert!(report.digest.is_ok());
    assert!(!report.is_ok());
}

#[test]
fn a_chunk_header_that_runs_off_its_section_is_refused() {
    let mut bytes = blob_image(&Rng(3).bytes(3 * 4096));
    let (_, _, pos, _) = chunks(&bytes)[1].clone();
    let at = pos as usize + 16; // stored_len
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = read_err(&bytes, "b");
    assert!(matches!(e, Error::ChunkHeader { chunk: 1, .. }), "{e}");
}

#[test]
fn a_chunk_that_does_not_decompress_is_refused() {
    let text = b"compressible text ".repeat(1000);
    let mut bytes = blob_image(&text);
    let (_, _, pos, stored) = chunks(&bytes)[2].clone();
    assert!(stored < 4096, "chunk 2 should be compressed");
    let body = pos as usize + CHUNK_HEADER_LEN;
    for (i, b) in bytes[body..body + stored as usize].iter_mut().enumerate() {
        *b = (i * 31) as u8;
    }
    reseal(&mut bytes);
    let e = read_err(&bytes, "b");
    assert!(
        matches!(&e, Error::Decompress { section, chunk: 2, .. } if section == "b"),
        "{e}"
    );
}

#[test]
fn a_consistent_forgery_is_caught_by_the_digest_alone() {
    let data = Rng(4).bytes(3 * 4096);
    let mut bytes = blob_image(&data);
    let sb = bytes[..4096].to_vec();
    let (_, _, pos, _) = chunks(&bytes)[0].clone();
    bytes[pos as usize + CHUNK_HEADER_LEN] ^= 1;
    reseal(&mut bytes);
    // Put back the superblock, with its digest of the true body.
    bytes[..4096].copy_from_slice(&sb);
    let mut img = Image::from_slice(&bytes).unwrap();
    assert!(img.read_blob("b").is_ok(), "chunk checks cannot see it");
    assert!(matches!(img.verify(), Err(Error::DigestMismatch)));
}

#[test]
fn chunks_that_do_not_add_up_to_the_table_are_refused() {
    let mut bytes = blob_image(&Rng(5).bytes(10_000));
    rewrite_manifest(&mut bytes, |m| m.sections[0].raw_len -= 1);
    let e = read_err(&bytes, "b");
    assert!(
        matches!(&e, Error::SectionSize { section } if section == "b"),
        "{e}"
    );
}

#[test]
fn missing_sections_and_wrong_kinds_are_named() {
    let bytes = blob_image(b"x");
    let mut img = Image::from_slice(&bytes).unwrap();
    assert!(matches!(img.read_blob("nope"), Err(Error::NoSection(s)) if s == "nope"));
    let e = img.extract_tree("b", "/nonexistent".as_ref()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::WrongKind {
                found: SectionKind::Blob,
                expected: SectionKind::Tree,
                ..
            }
        ),
        "{e}"
    );
}

/// One tree record: kind, mode, uid, gid, mtime, path, then `extra`.
fn rec(kind: u8, path: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend(0o755u32.to_le_bytes());
    v.extend(0u32.to_le_bytes());
    v.extend(0u32.to_le_bytes());
    v.extend(1_700_000_000i64.to_le_bytes());
    v.extend(0u32.to_le_bytes());
    v.extend((path.len() as u16).to_le_bytes());
    v.extend(path);
    v.extend(extra);
    v
}

fn file_rec(path: &[u8], content: &[u8]) -> Vec<u8> {
    let mut extra = (content.len() as u64).to_le_bytes().to_vec();
    extra.extend(content);
    rec(REC_FILE, path, &extra)
}

fn link_rec(path: &[u8], target: &[u8]) -> Vec<u8> {
    let mut extra = (target.len() as u16).to_le_bytes().to_vec();
    extra.extend(target);
    rec(REC_SYMLINK, path, &extra)
}

/// An image whose tree section holds exactly `stream`.
fn tree_image(stream: &[u8]) -> Vec<u8> {
    let mut bytes = blob_image(stream);
    rewrite_manifest(&mut bytes, |m| m.sections[0].kind = SectionKind::Tree);
    bytes
}

fn extract_err(stream: &[u8], dest: &std::path::Path) -> Error {
    let bytes = tree_image(stream);
    Image::from_slice(&bytes)
        .unwrap()
        .extract_tree("b", dest)
        .unwrap_err()
}

#[test]
fn the_crafted_stream_helper_makes_a_tree_that_extracts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = rec(REC_DIR, b"d", &[]);
    s.extend(file_rec(b"d/f", b"content"));
    s.extend(link_rec(b"l", b"d/f"));
    s.push(REC_END);
    let bytes = tree_image(&s);
    Image::from_slice(&bytes)
        .unwrap()
        .extract_tree("b", tmp.path())
        .unwrap();
    assert_eq!(fs::read(tmp.path().join("l")).unwrap(), b"content");
}

#[test]
fn paths_escaping_the_destination_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let dest = tmp.path().join("dest");
    let outside_b = outside.as_os_str().as_encoded_bytes().to_vec();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            [file_rec(b"../evil", b"x"), vec![REC_END]].concat(),
            "../evil",
        ),
        (
            [file_rec(b"/tmp/evil", b"x"), vec![REC_END]].concat(),
            "/tmp/evil",
        ),
        (
            [file_rec(b"a/../../evil", b"x"), vec![REC_END]].concat(),
            "a/../../evil",
        ),
        ([rec(REC_DIR, b"./a", &[]), vec![REC_END]].concat(), "./a"),
        (
            [
                link_rec(b"l", &outside_b),
                file_rec(b"l/evil", b"x"),
                vec![REC_END],
            ]
            .concat(),
            "l/evil",
        ),
        (
            [
                link_rec(b"l", b".."),
                rec(REC_DIR, b"l", &[]),
                vec![REC_END],
            ]
            .concat(),
            "l",
        ),
        (
            [
                link_rec(b"l", b"../outside"),
                link_rec(b"l/x", b"y"),
                vec![REC_END],
            ]
            .concat(),
            "l/x",
        ),
    ];
    for (stream, path) in cases {
        let _ = fs::remove_dir_all(&dest);
        let e = extract_err(&stream, &dest);
        assert!(
            matches!(&e, Error::PathEscapes { section, path: p } if section == "b" && p == path),
            "{path}: {e}"
        );
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "{path} wrote outside"
        );
    }
}

#[test]
fn bad_tree_records_are_refused_with_their_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<Vec<u8>> = vec![
        rec(9, b"x", &[]),
        [rec(REC_DIR, b"d", &[]), vec![REC_END, 0]].concat(),
        [file_rec(b"f", b"abc")].concat(), // no end record
        {
            // A file claiming more than the section holds.
            let mut r = rec(REC_FILE, b"f", &u64::MAX.to_le_bytes());
            r.push(REC_END);
            r
        },
        [link_rec(b"l", b""), vec![REC_END]].concat(),
    ];
    for (i, stream) in cases.iter().enumerate() {
        let dest = tmp.path().join(format!("d{i}"));
        let e = extract_err(stream, &dest);
        assert!(matches!(e, Error::TreeRecord { .. }), "case {i}: {e}");
    }
}

#[test]
fn special_files_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build(
        &src,
        &[(
            "ok".into(),
            Node::File {
                data: b"x".to_vec(),
                mode: 0o644,
            },
        )],
    );
    let _sock = UnixListener::bind(src.join("app.sock")).unwrap();
    let mut w =
        ImageWriter::create(Cursor::new(Vec::new()), 1 << 20, WriteOptions::default()).unwrap();
    let e = w.add_tree("t", &src).unwrap_err();
    assert!(
        matches!(&e, Error::UnsupportedFile { path, kind: "socket" } if path.ends_with("app.sock")),
        "{e}"
    );
    assert!(e.to_string().contains("app.sock"));
    let e = w.add_tree("u", &src.join("ok")).unwrap_err();
    assert!(matches!(e, Error::UnsupportedFile { .. }), "{e}");
    let e = w.add_tree("v", &src.join("missing")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

#[test]
fn section_names_must_be_new_and_not_empty() {
    let mut w =
        ImageWriter::create(Cursor::new(Vec::new()), 1 << 20, WriteOptions::default()).unwrap();
    w.add_blob("a", b"1").unwrap();
    assert!(matches!(
        w.add_blob("a", b"2"),
        Err(Error::BadSectionName(_))
    ));
    assert!(matches!(
        w.add_blob("", b"2"),
        Err(Error::BadSectionName(_))
    ));
}

#[test]
fn a_store_too_small_is_refused_up_front_and_when_exceeded() {
    let e = ImageWriter::create(Cursor::new(Vec::new()), 5000, WriteOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(e, Error::StoreTooSmall { capacity: 5000, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("reserve a bigger store"), "{e}");

    let random = Rng(6).bytes(100_000);
    for threads in [1, 2] {
        let mut store = Vec::new();
        let mut w =
            ImageWriter::create(Cursor::new(&mut store), 60_000, opts(threads, 4096)).unwrap();
        let e = w.add_blob("big", &random).unwrap_err();
        assert!(
            matches!(e, Error::StoreTooSmall { needed, capacity: 60_000 } if needed > 60_000),
            "{e}"
        );
        // The writer is as it was: a smaller section still fits.
        w.add_blob("small", &random[..10_000]).unwrap();
        w.finish(Manifest::default()).unwrap();
        let mut img = Image::from_slice(&store).unwrap();
        assert_eq!(img.manifest().sections.len(), 1);
        assert_eq!(img.read_blob("small").unwrap(), &random[..10_000]);
        img.verify().unwrap();
    }
    // The manifest counts too.
    let mut w = ImageWriter::create(Cursor::new(Vec::new()), 8192 + 100, opts(1, 4096)).unwrap();
    w.add_blob("b", &[0u8; 10]).unwrap();
    let m = Manifest {
        hostname: "h".repeat(10_000),
        ..Manifest::default()
    };
    assert!(matches!(w.finish(m), Err(Error::StoreTooSmall { .. })));
}

#[test]
fn every_error_message_is_distinct() {
    let errors = [
        Error::NoImage.to_string(),
        Error::UnknownMajor {
            found: 2,
            supported: 1,
        }
        .to_string(),
        Error::NewerMinor {
            major: 1,
            found: 2,
            supported: 0,
        }
        .to_string(),
        Error::SuperblockChecksum.to_string(),
        Error::ChunkChecksum {
            section: "s".into(),
            chunk: 1,
        }
        .to_string(),
        Error::DigestMismatch.to_string(),
        Error::LengthExceedsStore { total: 2, store: 1 }.to_string(),
        Error::Truncated { what: "x".into() }.to_string(),
        Error::ManifestChecksum.to_string(),
        Error::SectionOutside {
            section: "s".into(),
            detail: "d".into(),
        }
        .to_string(),
        Error::Decompress {
            section: "s".into(),
            chunk: 1,
            detail: "d".into(),
        }
        .to_string(),
        Error::PathEscapes {
            section: "s".into(),
            path: "p".into(),
        }
        .to_string(),
        Error::ChunkHeader {
            section: "s".into(),
            chunk: 1,
            detail: "d".into(),
        }
        .to_string(),
        Error::SectionSize {
            section: "s".into(),
        }
        .to_string(),
        Error::BlobTooLarge {
            section: "s".into(),
            raw_len: 2,
            limit: 1,
        }
        .to_string(),
    ];
    let unique: std::collections::BTreeSet<_> = errors.iter().collect();
    assert_eq!(unique.len(), errors.len());
}
