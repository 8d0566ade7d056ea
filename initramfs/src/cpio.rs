//! A newc ("070701") cpio writer: the archive format the kernel unpacks
//! into the initramfs's root.

use std::collections::BTreeSet;

/// A newc archive being written in memory: entries in the order added,
/// each directory once, with fixed owners and times so that the same inputs
/// give the same bytes.
#[derive(Default)]
pub(crate) struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: fixed, so that the same inputs give the same bytes
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0,
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub(crate) fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_string()) {
            self.entry(name, 0o040755, (0, 0), &[]);
        }
    }

    pub(crate) fn parents(&mut self, path: &str) {
        let mut cur = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            self.dir(&cur.clone());
        }
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    pub(crate) fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Reads back (name, mode, data) from a newc archive.
    pub(crate) fn parse_cpio(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = vec![];
        let mut off = 0usize;
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).unwrap(), 16).unwrap();
        loop {
            assert_eq!(&b[..6], b"070701");
            let mode = hex(&b[14..22]);
            let size = hex(&b[54..62]) as usize;
            let namesize = hex(&b[94..102]) as usize;
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            let data_start = (off + 110 + namesize).div_ceil(4) * 4 - off;
            let data = b[data_start..data_start + size].to_vec();
            let next = (off + data_start + size).div_ceil(4) * 4 - off;
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode, data));
            b = &b[next..];
            off += next;
        }
    }

    #[test]
    fn cpio_round_trips_dirs_files_and_devices() {
        let mut c = Cpio::default();
        c.dir("dev");
        c.char_dev("dev/console", 5, 1);
        c.parents("a/b/c.ko");
        c.file("a/b/c.ko", 0o644, b"hello");
        c.file("init", 0o755, b"");
        let entries = parse_cpio(&c.finish());
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["dev", "dev/console", "a", "a/b", "a/b/c.ko", "init"]
        );
        assert_eq!(entries[4].2, b"hello");
        assert_eq!(entries[1].1, 0o020600);
        assert_eq!(entries[5].1, 0o100755);
    }
}
