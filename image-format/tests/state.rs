//! In-place changes: state transitions touch only the superblock,
//! invalidate kills the magic, wipe_recorded zeroes all the store may hold.

// Helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::Cursor;
use std::process::Command;

use common::{image_in_vec, opts, Rng};
use contract::extent::Extent;
use image_format::{
    invalidate, read_superblock, set_state, wipe_recorded, Error, Image, State, MAGIC,
};

fn sample() -> Vec<u8> {
    let mut bytes = Vec::new();
    let data = Rng(1).bytes(50_000);
    image_in_vec(&mut bytes, opts(2, 4096), |w| {
        w.add_blob("b", &data).unwrap();
        w.add_blob("z", &[0u8; 30_000]).unwrap();
    });
    bytes
}

fn state_of(bytes: &[u8]) -> State {
    Image::from_slice(bytes).unwrap().superblock().state
}

#[test]
fn written_restoring_then_restored_or_failed_touching_only_the_superblock() {
    for last in [State::Restored, State::Failed] {
        let mut bytes = sample();
        let body = bytes[4096..].to_vec();
        assert_eq!(state_of(&bytes), State::Written);
        set_state(&mut Cursor::new(&mut bytes), State::Restoring).unwrap();
        assert_eq!(state_of(&bytes), State::Restoring);
        set_state(&mut Cursor::new(&mut bytes), last).unwrap();
        assert_eq!(state_of(&bytes), last);
        assert_eq!(&bytes[4096..], &body[..], "the body changed");
        // The digest does not cover the superblock: still verifies.
        Image::from_slice(&bytes).unwrap().verify().unwrap();
        // Nothing goes back.
        for back in [State::Written, State::Restoring] {
            let e = set_state(&mut Cursor::new(&mut bytes), back).unwrap_err();
            assert!(
                matches!(e, Error::BadTransition { from, to } if from == last && to == back),
                "{e}"
            );
        }
        assert_eq!(state_of(&bytes), last);
    }
}

#[test]
fn a_restoring_image_is_never_written_again() {
    let mut bytes = sample();
    set_state(&mut Cursor::new(&mut bytes), State::Restoring).unwrap();
    assert!(set_state(&mut Cursor::new(&mut bytes), State::Written).is_err());
    assert_eq!(state_of(&bytes), State::Restoring);
}

#[test]
fn set_state_needs_a_valid_superblock() {
    let mut empty: Vec<u8> = vec![0; 8192];
    assert!(matches!(
        set_state(&mut Cursor::new(&mut empty), State::Restoring),
        Err(Error::NoImage)
    ));
    assert!(
        empty.iter().all(|&b| b == 0),
        "wrote to a store with no image"
    );
    let mut bytes = sample();
    bytes[100] ^= 1;
    let before = bytes.clone();
    assert!(matches!(
        set_state(&mut Cursor::new(&mut bytes), State::Restoring),
        Err(Error::SuperblockChecksum)
    ));
    assert_eq!(bytes, before);
}

#[test]
fn invalidate_kills_the_magic_and_nothing_else() {
    let mut bytes = sample();
    let body = bytes[4096..].to_vec();
    invalidate(&mut Cursor::new(&mut bytes)).unwrap();
    assert!(matches!(Image::from_slice(&bytes), Err(Error::NoImage)));
    assert_ne!(&bytes[..8], &MAGIC);
    assert_eq!(&bytes[4096..], &body[..]);
    let mut empty = Vec::new();
    invalidate(&mut Cursor::new(&mut empty)).unwrap();
    assert!(empty.is_empty());
}

#[test]
fn wipe_zeroes_the_extent_and_leaves_no_magic() {
    let record = tempfile::tempdir().unwrap();
    let mut bytes = sample();
    let total = bytes.len();
    // Recorded as holding image data up to the image's end: the stale
    // bytes after it belong to no image and are left as they are.
    Extent {
        store: "s".into(),
        dirty_bytes: Some(total as u64),
    }
    .write(record.path())
    .unwrap();
    bytes.extend_from_slice(&[0xaa; 10_000]);
    let end = wipe_recorded(&mut Cursor::new(&mut bytes), "s", record.path()).unwrap();
    assert_eq!(end, total as u64);
    assert!(bytes[..total].iter().all(|&b| b == 0));
    assert!(bytes[total..].iter().all(|&b| b == 0xaa));
    assert!(matches!(Image::from_slice(&bytes), Err(Error::NoImage)));
    assert!(matches!(
        read_superblock(&mut Cursor::new(&bytes)),
        Err(Error::NoImage)
    ));
    // Again, recorded clean, on a store with no image: only the superblock.
    bytes[..8].copy_from_slice(&MAGIC);
    bytes[5000] = 1;
    wipe_recorded(&mut Cursor::new(&mut bytes), "s", record.path()).unwrap();
    assert!(bytes[..4096].iter().all(|&b| b == 0));
    assert_eq!(bytes[5000], 1);
}

#[test]
fn state_changes_work_on_a_file_store() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    fs::write(&path, sample()).unwrap();
    let mut f = fs::File::options()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    set_state(&mut f, State::Restoring).unwrap();
    assert_eq!(read_superblock(&mut f).unwrap().state, State::Restoring);
    // No record of how far it holds image data: all of it is wiped.
    wipe_recorded(&mut f, "store", tmp.path()).unwrap();
    assert!(fs::read(&path).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn inspect_prints_everything_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    let mut bytes = Vec::new();
    let data = Rng(2).bytes(20_000);
    let mut w =
        image_format::ImageWriter::create(Cursor::new(&mut bytes), 1 << 20, opts(1, 4096)).unwrap();
    w.add_blob("devstate", b"{}").unwrap();
    w.add_blob("criu/db", &data).unwrap();
    let manifest = image_format::Manifest {
        kernel_from: "6.1.0-1".into(),
        kernel_to: "6.1.0-2".into(),
        workloads: vec![contract::WorkloadEntry {
            name: "db".into(),
            root_pid: 321,
            pids: vec![321, 322],
            section: "criu/db".into(),
            tcp_established: true,
            ..Default::default()
        }],
        phases: vec![
            contract::PhaseTiming {
                event: "frozen".into(),
                t_mono_ns: 1_000_000,
                t_real_ns: 0,
            },
            contract::PhaseTiming {
                event: "dumped".into(),
                t_mono_ns: 251_000_000,
                t_real_ns: 0,
            },
        ],
        ..Default::default()
    };
    w.finish(manifest).unwrap();
    fs::write(&path, &bytes).unwrap();

    let mut out = Vec::new();
    image_format::inspect::print(&path, true, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    for want in [
        "state      written",
        "format     2.0",
        "kernel     6.1.0-1 -> 6.1.0-2",
        "workload   db root pid 321 (2 processes)",
        "+    250.0 ms dumped",
        "section    criu/db",
        "verify     criu/db",
        "digest ok, 2 sections",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }

    let bin = env!("CARGO_BIN_EXE_kupgrade-image");
    let run = |args: &[&str]| Command::new(bin).args(args).output().unwrap();
    let p = path.to_str().unwrap();
    let ok = run(&["inspect", p, "--verify"]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("digest ok"));
    assert_eq!(run(&["inspect"]).status.code(), Some(2));
    assert_eq!(run(&["frobnicate", p]).status.code(), Some(2));

    // Damage one chunk of criu/db: the report names it, the exit code says it.
    let (_, _, pos, _) = image_format::testing::chunks(&bytes)
        .into_iter()
        .find(|c| c.0 == "criu/db" && c.1 == 3)
        .unwrap();
    bytes[pos as usize + 30] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let mut out = Vec::new();
    let e = image_format::inspect::print(&path, true, &mut out).unwrap_err();
    assert!(matches!(e, Error::ChunkChecksum { chunk: 3, .. }), "{e}");
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("criu/db, chunk 3: checksum mismatch"),
        "{text}"
    );
    assert!(
        text.contains("verify     devstate                 ok"),
        "{text}"
    );
    let bad = run(&["inspect", p, "--verify"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("chunk 3"));
    // Without --verify the damage is not looked for.
    assert!(run(&["inspect", p]).status.success());
    let none = run(&["inspect", "/nonexistent/store"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("No such file"));
}

/// A store that keeps, for each sync, how many bytes it made durable.
struct Unsynced {
    inner: Cursor<Vec<u8>>,
    pending: usize,
    syncs: Vec<usize>,
}

impl std::io::Read for Unsynced {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::io::Write for Unsynced {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pending += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Seek for Unsynced {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl image_format::Store for Unsynced {
    fn sync(&mut self) -> std::io::Result<()> {
        self.syncs.push(std::mem::take(&mut self.pending));
        Ok(())
    }
}

#[test]
fn sync_leaves_finish_only_what_came_after() {
    let early = Rng(3).bytes(200_000);
    let late = Rng(4).bytes(10_000);
    let mut store = Unsynced {
        inner: Cursor::new(Vec::new()),
        pending: 0,
        syncs: Vec::new(),
    };
    let mut w = image_format::ImageWriter::create(&mut store, 1 << 24, opts(1, 4096)).unwrap();
    w.add_blob("early", &early).unwrap();
    w.sync().unwrap();
    let synced_before_finish = w.position();
    w.add_blob("late", &late).unwrap();
    let summary = w.finish(image_format::Manifest::default()).unwrap();
    // create's invalidation, sync(), then finish's: none of them late.
    assert_eq!(store.syncs[0], 4096);
    assert_eq!(store.syncs[1] as u64, synced_before_finish - 4096);
    let after: usize = store.syncs[2..].iter().sum();
    assert_eq!(
        after as u64,
        summary.total_len - synced_before_finish + 4096
    );
    assert!(after < 20_000, "finish flushed {after} bytes");
    assert_eq!(store.pending, 0);
    let mut img = Image::from_slice(store.inner.get_ref()).unwrap();
    assert_eq!(img.read_blob("early").unwrap(), early);
    assert_eq!(img.read_blob("late").unwrap(), late);
}
