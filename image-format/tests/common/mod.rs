//! Shared helpers: building trees on disk, comparing them, writing images
//! into memory.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use image_format::{ImageWriter, Manifest, WriteOptions};

/// A small deterministic generator, so that failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One entry of a tree to build: a path and what it is.
#[derive(Clone, Debug)]
pub enum Node {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Link { target: String },
}

pub fn build(root: &Path, nodes: &[(String, Node)]) {
    fs::create_dir_all(root).unwrap();
    for (rel, node) in nodes {
        let p = root.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        match node {
            Node::Dir { .. } => fs::create_dir_all(&p).unwrap(),
            Node::File { data, mode } => {
                fs::write(&p, data).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
            }
            Node::Link { target } => std::os::unix::fs::symlink(target, &p).unwrap(),
        }
    }
    // Directory modes last, so that read-only ones do not stop the above.
    for (rel, node) in nodes {
        if let Node::Dir { mode } = node {
            fs::set_permissions(root.join(rel), fs::Permissions::from_mode(*mode)).unwrap();
        }
    }
}

/// What a tree holds, for comparison: per relative path, its kind, mode,
/// mtime and content (or link target).
pub fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            let desc = if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(root, &p, out);
                format!(
                    "dir {:o} {}.{}",
                    m.mode() & 0o7777,
                    m.mtime(),
                    m.mtime_nsec()
                )
            } else {
                let data = fs::read(&p).unwrap();
                format!(
                    "file {:o} {}.{} {} {}",
                    m.mode() & 0o7777,
                    m.mtime(),
                    m.mtime_nsec(),
                    data.len(),
                    blake3::hash(&data).to_hex()
                )
            };
            out.insert(rel, desc);
        }
    }
    walk(root, root, &mut out);
    out
}

pub fn opts(threads: usize, chunk_size: usize) -> WriteOptions {
    WriteOptions {
        threads,
        chunk_size,
        zstd_level: 1,
        compress: true,
        generation: 7,
    }
}

/// Writes an image into `buf` (a store in memory) with `build` adding its
/// sections; returns the image's total length.
pub fn image_in_vec(
    buf: &mut Vec<u8>,
    opts: WriteOptions,
    build: impl FnOnce(&mut ImageWriter<Cursor<&mut Vec<u8>>>),
) -> u64 {
    let mut w = ImageWriter::create(Cursor::new(buf), 1 << 30, opts).unwrap();
    build(&mut w);
    let manifest = Manifest {
        kernel_from: "6.1.0-1-cloud-amd64".into(),
        kernel_to: "6.1.0-2-cloud-amd64".into(),
        hostname: "test".into(),
        ..Manifest::default()
    };
    w.finish(manifest).unwrap().total_len
}
