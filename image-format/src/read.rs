//! The reader: checks the superblock and the manifest against the store
//! before trusting any size, then streams one section at a time, verifying
//! every chunk as it goes.

use std::fs;
use std::io::{self, Read, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use zerocopy::FromBytes;

use crate::format::*;
use crate::{Error, Manifest, SectionEntry, SectionKind, State, Store, Superblock};

pub struct Image<S: Store> {
    store: S,
    store_len: u64,
    superblock: Superblock,
    manifest: Manifest,
}

/// What a full verification found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub sections: usize,
    pub chunks: u64,
    pub raw_len: u64,
    pub stored_len: u64,
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.to_string(),
        source,
    }
}

/// Reads exactly `len` bytes at `offset`, telling truncation apart.
fn read_at<S: Store>(store: &mut S, offset: u64, len: usize, what: &str) -> Result<Vec<u8>, Error> {
    store.seek(SeekFrom::Start(offset)).map_err(io_err(what))?;
    let mut buf = vec![0u8; len];
    match store.read_exact(&mut buf) {
        Ok(()) => Ok(buf),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::Truncated {
            what: what.to_string(),
        }),
        Err(e) => Err(io_err(what)(e)),
    }
}

pub(crate) fn read_superblock<S: Store>(
    store: &mut S,
) -> Result<(RawSuperblock, Superblock), Error> {
    let bytes =
        read_at(store, 0, std::mem::size_of::<RawSuperblock>(), "superblock").map_err(|e| {
            if matches!(e, Error::Truncated { .. }) {
                Error::NoImage
            } else {
                e
            }
        })?;
    let raw = RawSuperblock::read_from_bytes(&bytes).map_err(|_| Error::NoImage)?;
    if raw.magic != MAGIC {
        return Err(Error::NoImage);
    }
    if raw.header_crc.get() != raw.crc() {
        return Err(Error::SuperblockChecksum);
    }
    if raw.major.get() != FORMAT_MAJOR {
        return Err(Error::UnknownMajor {
            found: raw.major.get(),
            supported: FORMAT_MAJOR,
        });
    }
    let state = State::from_u32(raw.state.get()).ok_or(Error::SuperblockChecksum)?;
    let sb = Superblock {
        major: raw.major.get(),
        minor: raw.minor.get(),
        state,
        generation: raw.generation.get(),
        total_len: raw.total_len.get(),
        manifest_offset: raw.manifest_offset.get(),
        manifest_len: raw.manifest_len.get(),
        digest: raw.digest,
    };
    Ok((raw, sb))
}

impl<S: Store> Image<S> {
    /// Opens the image in `store`, checking the superblock, its sizes against
    /// the store, the manifest and the section table.
    pub fn open(mut store: S) -> Result<Self, Error> {
        let store_len = store.seek(SeekFrom::End(0)).map_err(io_err("store"))?;
        let (raw, sb) = read_superblock(&mut store)?;
        if sb.total_len > store_len {
            return Err(Error::LengthExceedsStore {
                total: sb.total_len,
                store: store_len,
            });
        }
        let m_end = sb.manifest_offset.checked_add(sb.manifest_len);
        if sb.manifest_offset < BODY_OFFSET
            || m_end != Some(sb.total_len)
            || sb.manifest_len > MAX_MANIFEST
        {
            return Err(Error::SectionOutside {
                section: "manifest".into(),
            });
        }
        let json = read_at(
            &mut store,
            sb.manifest_offset,
            sb.manifest_len as usize,
            "manifest",
        )?;
        if crc32c::crc32c(&json) != raw.manifest_crc.get() {
            return Err(Error::ManifestChecksum);
        }
        let manifest: Manifest =
            serde_json::from_slice(&json).map_err(|e| Error::ManifestParse(e.to_string()))?;
        for s in &manifest.sections {
            let end = s.offset.checked_add(s.stored_len);
            if s.offset < BODY_OFFSET || end.is_none_or(|e| e > sb.manifest_offset) {
                return Err(Error::SectionOutside {
                    section: s.name.clone(),
                });
            }
        }
        Ok(Image {
            store,
            store_len,
            superblock: sb,
            manifest,
        })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn store_len(&self) -> u64 {
        self.store_len
    }

    pub fn into_store(self) -> S {
        self.store
    }

    fn section(&self, name: &str) -> Result<SectionEntry, Error> {
        self.manifest
            .sections
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Error::NoSection(name.into()))
    }

    fn reader(&mut self, name: &str) -> Result<SectionReader<'_, S>, Error> {
        let s = self.section(name)?;
        self.store
            .seek(SeekFrom::Start(s.offset))
            .map_err(io_err("store"))?;
        Ok(SectionReader {
            store: &mut self.store,
            section: s,
            chunk: 0,
            pos: 0,
            buf: Vec::new(),
            at: 0,
            raw_seen: 0,
            error: None,
        })
    }

    /// Every chunk's checksum and the whole-image digest.
    pub fn verify(&mut self) -> Result<VerifyReport, Error> {
        let mut report = VerifyReport {
            sections: 0,
            chunks: 0,
            raw_len: 0,
            stored_len: 0,
        };
        for s in self.manifest.sections.clone() {
            let mut r = self.reader(&s.name)?;
            io::copy(&mut r, &mut io::sink()).map_err(|e| r.take_error(e))?;
            r.finish()?;
            report.sections += 1;
            report.chunks += s.chunks as u64;
            report.raw_len += s.raw_len;
            report.stored_len += s.stored_len;
        }
        let mut hasher = blake3::Hasher::new();
        self.store
            .seek(SeekFrom::Start(BODY_OFFSET))
            .map_err(io_err("store"))?;
        let mut body = (&mut self.store).take(self.superblock.total_len - BODY_OFFSET);
        let n = io::copy(&mut body, &mut hasher).map_err(io_err("image"))?;
        if n != self.superblock.total_len - BODY_OFFSET {
            return Err(Error::Truncated {
                what: "image".into(),
            });
        }
        if *hasher.finalize().as_bytes() != self.superblock.digest {
            return Err(Error::DigestMismatch);
        }
        Ok(report)
    }

    pub fn read_blob(&mut self, name: &str) -> Result<Vec<u8>, Error> {
        let s = self.section(name)?;
        if s.kind != SectionKind::Blob {
            return Err(Error::Corrupt {
                section: name.into(),
                detail: "not a blob".into(),
            });
        }
        if s.raw_len > self.store_len.saturating_mul(64) {
            return Err(Error::Corrupt {
                section: name.into(),
                detail: "implausible length".into(),
            });
        }
        let mut r = self.reader(name)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).map_err(|e| r.take_error(e))?;
        r.finish()?;
        Ok(out)
    }

    /// Restores a tree section under `dest`, verifying as it reads and
    /// refusing any path that would land outside `dest`.
    pub fn extract_tree(&mut self, name: &str, dest: &Path) -> Result<(), Error> {
        let s = self.section(name)?;
        if s.kind != SectionKind::Tree {
            return Err(Error::Corrupt {
                section: name.into(),
                detail: "not a tree".into(),
            });
        }
        fs::create_dir_all(dest).map_err(io_err(&dest.display().to_string()))?;
        let mut r = self.reader(name)?;
        let result = extract(&mut r, &s, dest);
        match result {
            Ok(()) => r.finish(),
            // A chunk error surfaces as an io error inside the tree parser.
            Err(Error::Io { source, .. }) if r.error.is_some() => Err(r.take_error(source)),
            Err(e) => Err(e),
        }
    }
}

/// Streams the raw bytes of one section, chunk by chunk.
struct SectionReader<'a, S: Store> {
    store: &'a mut S,
    section: SectionEntry,
    chunk: u32,
    /// Stored bytes consumed in the section.
    pos: u64,
    buf: Vec<u8>,
    at: usize,
    raw_seen: u64,
    error: Option<Error>,
}

impl<S: Store> SectionReader<'_, S> {
    fn corrupt(&self, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            section: self.section.name.clone(),
            detail: detail.into(),
        }
    }

    fn next_chunk(&mut self) -> Result<bool, Error> {
        if self.chunk >= self.section.chunks {
            return Ok(false);
        }
        let (name, index) = (self.section.name.clone(), self.chunk);
        let bad_header = || Error::ChunkHeader {
            section: name.clone(),
            chunk: index,
        };
        if self.pos + CHUNK_HEADER_LEN > self.section.stored_len {
            return Err(bad_header());
        }
        let mut hb = [0u8; CHUNK_HEADER_LEN as usize];
        self.store.read_exact(&mut hb).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => Error::Truncated {
                what: format!("section {name} chunk {index}"),
            },
            _ => io_err("store")(e),
        })?;
        let h = ChunkHeader::read_from_bytes(&hb).map_err(|_| bad_header())?;
        let (raw_len, stored_len) = (h.raw_len.get(), h.stored_len.get() as u64);
        if h.magic.get() != CHUNK_MAGIC || h.index.get() != index || raw_len > MAX_CHUNK {
            return Err(bad_header());
        }
        self.pos += CHUNK_HEADER_LEN;
        if self.pos + stored_len > self.section.stored_len || stored_len > raw_len as u64 {
            return Err(bad_header());
        }
        let mut stored = vec![0u8; stored_len as usize];
        self.store
            .read_exact(&mut stored)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => Error::Truncated {
                    what: format!("section {name} chunk {index}"),
                },
                _ => io_err("store")(e),
            })?;
        self.pos += stored_len;
        if crc32c::crc32c(&stored) != h.crc.get() {
            return Err(Error::ChunkChecksum {
                section: name,
                chunk: index,
            });
        }
        self.buf = match h.kind {
            CHUNK_RAW if stored_len == raw_len as u64 => stored,
            CHUNK_ZERO if stored_len == 0 => vec![0u8; raw_len as usize],
            CHUNK_ZSTD => {
                let out = zstd::bulk::decompress(&stored, raw_len as usize).map_err(|e| {
                    Error::Decompress {
                        section: name.clone(),
                        chunk: index,
                        detail: e.to_string(),
                    }
                })?;
                if out.len() != raw_len as usize {
                    return Err(Error::Decompress {
                        section: name,
                        chunk: index,
                        detail: "wrong length".into(),
                    });
                }
                out
            }
            _ => return Err(bad_header()),
        };
        self.at = 0;
        self.raw_seen += raw_len as u64;
        self.chunk += 1;
        Ok(true)
    }

    /// After the last byte: the section must have ended where it said.
    fn finish(&mut self) -> Result<(), Error> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.chunk != self.section.chunks
            || self.pos != self.section.stored_len
            || self.raw_seen != self.section.raw_len
        {
            return Err(self.corrupt("its chunks do not add up to its recorded size"));
        }
        Ok(())
    }

    /// The chunk error behind an io error the tree parser saw, if any.
    fn take_error(&mut self, e: io::Error) -> Error {
        self.error.take().unwrap_or_else(|| io_err("section")(e))
    }
}

impl<S: Store> Read for SectionReader<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            match self.next_chunk() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    self.error = Some(e);
                    return Err(io::Error::other("bad chunk"));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn read_u<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// A relative path with no `..`, no root and nothing empty.
fn safe_join(dest: &Path, rel: &str, section: &str) -> Result<PathBuf, Error> {
    let p = Path::new(rel);
    let ok = !rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(Error::PathEscapes {
            section: section.into(),
            path: rel.into(),
        });
    }
    Ok(dest.join(p))
}

/// Refuses a path whose parents inside `dest` include a symlink: writing
/// through it could land outside `dest`.
fn no_link_on_the_way(dest: &Path, rel: &str, section: &str) -> Result<(), Error> {
    let mut cur = dest.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        cur.push(part);
        if fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::PathEscapes {
                section: section.into(),
                path: rel.into(),
            });
        }
    }
    Ok(())
}

fn extract<S: Store>(
    r: &mut SectionReader<'_, S>,
    s: &SectionEntry,
    dest: &Path,
) -> Result<(), Error> {
    let section = s.name.as_str();
    let io = |e: io::Error| Error::Io {
        what: format!("section {section}"),
        source: e,
    };
    let mut remaining = s.raw_len;
    loop {
        let [kind] = read_u::<1>(r).map_err(io)?;
        if kind == REC_END {
            return Ok(());
        }
        let mode = u32::from_le_bytes(read_u::<4>(r).map_err(io)?);
        let mtime = i64::from_le_bytes(read_u::<8>(r).map_err(io)?);
        let len = u16::from_le_bytes(read_u::<2>(r).map_err(io)?) as usize;
        let mut name = vec![0u8; len];
        r.read_exact(&mut name).map_err(io)?;
        let rel = String::from_utf8(name).map_err(|_| Error::Corrupt {
            section: section.into(),
            detail: "a path is not UTF-8".into(),
        })?;
        let path = safe_join(dest, &rel, section)?;
        no_link_on_the_way(dest, &rel, section)?;
        let fio = |e: io::Error| Error::Io {
            what: path.display().to_string(),
            source: e,
        };
        remaining = remaining.saturating_sub(15 + len as u64);
        match kind {
            REC_DIR => {
                fs::create_dir_all(&path).map_err(fio)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(fio)?;
            }
            REC_FILE => {
                let size = u64::from_le_bytes(read_u::<8>(r).map_err(io)?);
                if size > remaining {
                    return Err(Error::Corrupt {
                        section: section.into(),
                        detail: format!("{rel} claims {size} bytes"),
                    });
                }
                remaining -= size;
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(fio)?;
                }
                // Replace, never write through, whatever is there (a link).
                let _ = fs::remove_file(&path);
                let mut f = fs::File::create(&path).map_err(fio)?;
                let n = io::copy(&mut r.take(size), &mut f).map_err(io)?;
                if n != size {
                    return Err(Error::Corrupt {
                        section: section.into(),
                        detail: format!("{rel} is cut short"),
                    });
                }
                f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(fio)?;
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime.max(0) as u64);
                let _ = f.set_modified(t);
            }
            REC_SYMLINK => {
                let tlen = u16::from_le_bytes(read_u::<2>(r).map_err(io)?) as usize;
                let mut target = vec![0u8; tlen];
                r.read_exact(&mut target).map_err(io)?;
                let target = String::from_utf8(target).map_err(|_| Error::Corrupt {
                    section: section.into(),
                    detail: "a link target is not UTF-8".into(),
                })?;
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(fio)?;
                }
                let _ = fs::remove_file(&path);
                std::os::unix::fs::symlink(&target, &path).map_err(fio)?;
            }
            other => {
                return Err(Error::Corrupt {
                    section: section.into(),
                    detail: format!("unknown record {other}"),
                })
            }
        }
    }
}
