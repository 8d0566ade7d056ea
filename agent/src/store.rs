//! Where the image lives across the kexec: a `memmap=SIZE!ADDR` RAM range
//! exposed as `/dev/pmemN` (the default), or a file on disk.
//!
//! The store holds process memory: a file store is root's alone (created
//! 0600, never through a symlink, refused when it is anything but a regular
//! file of ours), a device store must be a block device, and [`Store::wipe`]
//! zeroes it up to its high-water mark ([`contract::extent`]).

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use contract::extent::{self, Extent};

use crate::config::Config;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Pmem,
    Device,
    File,
}

#[derive(Clone, Debug)]
pub struct Store {
    pub path: PathBuf,
    pub kind: Kind,
    pub capacity: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no store: no /dev/pmemN exists. Reserve RAM that survives kexec by adding {suggestion} to the kernel command line (then reboot once), or set store = \"file:/var/lib/kupgrade/store.img\" in /etc/kupgrade/config.toml")]
    NoPmem { suggestion: String },
    #[error("cannot open the store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the store {path} is not a block device: name a /dev/pmemN (or another block device) in `store`, or use file:PATH")]
    NotBlockDevice { path: PathBuf },
    #[error("the file store {path} is not a regular file (a symlink, a directory, a device?): remove it, or name another path in `store`")]
    NotRegular { path: PathBuf },
    #[error("the file store {path} {why}: it would hold process memory; remove it and let kupgrade create it")]
    NotOurs { path: PathBuf, why: String },
    #[error("cannot wipe the store {path}")]
    Wipe {
        path: PathBuf,
        #[source]
        source: image_format::Error,
    },
    #[error("cannot record how far the store {path} holds image data in {record}")]
    Record {
        path: PathBuf,
        record: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store {path} is {have} MiB but the image needs about {need} MiB: reserve more, e.g. {suggestion}")]
    TooSmall {
        path: PathBuf,
        have: u64,
        need: u64,
        suggestion: String,
    },
}

impl Store {
    /// Resolves the configured store without writing to it.
    pub fn locate(cfg: &Config) -> Result<Store, Error> {
        if let Some(file) = cfg.store.strip_prefix("file:") {
            let path = PathBuf::from(file);
            // Config::parse refuses sizes that overflow.
            let capacity = cfg.store_file_mib.saturating_mul(1 << 20);
            return Ok(Store {
                path,
                kind: Kind::File,
                capacity,
            });
        }
        let path = if cfg.store == "auto" {
            first_pmem(Path::new("/dev")).ok_or_else(|| Error::NoPmem {
                suggestion: suggest_memmap(256 << 20),
            })?
        } else {
            PathBuf::from(&cfg.store)
        };
        let mut f = File::open(&path).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        ensure_block_device(&f, &path)?;
        let capacity = f.seek(SeekFrom::End(0)).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        let kind = if path.to_string_lossy().contains("pmem") {
            Kind::Pmem
        } else {
            Kind::Device
        };
        Ok(Store {
            path,
            kind,
            capacity,
        })
    }

    /// Opens for reading and writing; a file store is created at its size,
    /// 0600, in a directory made 0700 if there is none.
    /// A handle to write an image with: around the page cache on a block
    /// device (`O_DIRECT`, see [`image_format::DirectWriter`]: no cache to
    /// fill and write back in the frozen window), the file itself for a
    /// file store.
    pub fn open_writer(&self) -> Result<Box<dyn image_format::Store>, Error> {
        if self.kind == Kind::File {
            return Ok(Box::new(self.open_rw()?));
        }
        let w = image_format::DirectWriter::open(&self.path).map_err(|source| Error::Open {
            path: self.path.clone(),
            source,
        })?;
        Ok(Box::new(w))
    }

    pub fn open_rw(&self) -> Result<File, Error> {
        let err = |source| Error::Open {
            path: self.path.clone(),
            source,
        };
        if self.kind == Kind::File {
            if let Some(dir) = self.path.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(err)?;
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&self.path)
                .map_err(|e| match e.raw_os_error() {
                    // What O_NOFOLLOW says of a symlink.
                    Some(nix::libc::ELOOP) => Error::NotRegular {
                        path: self.path.clone(),
                    },
                    _ => err(e),
                })?;
            self.ensure_ours(&f)?;
            if f.metadata().map_err(err)?.len() < self.capacity {
                f.set_len(self.capacity).map_err(err)?;
            }
            return Ok(f);
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(err)?;
        ensure_block_device(&f, &self.path)?;
        Ok(f)
    }

    /// A file store must be a regular file of ours that nobody else can
    /// reach: a looser mode (an older kupgrade made it 0644) is tightened.
    fn ensure_ours(&self, f: &File) -> Result<(), Error> {
        let err = |source| Error::Open {
            path: self.path.clone(),
            source,
        };
        let meta = f.metadata().map_err(err)?;
        let not_ours = |why: String| Error::NotOurs {
            path: self.path.clone(),
            why,
        };
        if !meta.file_type().is_file() {
            return Err(Error::NotRegular {
                path: self.path.clone(),
            });
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(not_ours(format!("belongs to uid {}, not {me}", meta.uid())));
        }
        if meta.nlink() > 1 {
            return Err(not_ours(format!(
                "has {} hard links: another name can reach it",
                meta.nlink()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(err)?;
        }
        Ok(())
    }

    /// Zeroes whatever image data the store may hold (it is process memory):
    /// up to the high-water mark recorded in `record_dir`, or the image's
    /// end if further, or all of it when the mark is unknown; then records
    /// that nothing is left. Returns the bytes zeroed.
    pub fn wipe(&self, record_dir: &Path) -> Result<u64, Error> {
        let mut f = self.open_rw()?;
        let name = self.path.display().to_string();
        image_format::wipe_recorded(&mut f, &name, record_dir).map_err(|source| Error::Wipe {
            path: self.path.clone(),
            source,
        })
    }

    /// Whether the record in `record_dir` says the store may hold image data
    /// (a write that did not finish, or bytes not wiped since). Without a
    /// record, no: kupgrade never wrote an image there that it knows of.
    pub fn holds_image_data(&self, record_dir: &Path) -> bool {
        let name = self.path.display().to_string();
        Extent::read(record_dir)
            .filter(|e| e.store == name)
            .is_some_and(|e| e.dirty_bytes != Some(0))
    }

    /// Before an image is written: how far the store held image data
    /// before, and from now on unknown (a write that does not finish leaves
    /// the whole store to wipe). With no record at all, nothing: as in
    /// [`Store::holds_image_data`], kupgrade never wrote an image there
    /// that it knows of, so the wipe after the restore stops at this
    /// image's end instead of zeroing all of a store it never touched. A
    /// record that cannot be read, or is another store's, says nothing
    /// about this one: unknown.
    pub fn writing(&self, record_dir: &Path) -> Result<Option<u64>, Error> {
        let name = self.path.display().to_string();
        let before = match Extent::read(record_dir) {
            Some(e) if e.store == name => e.dirty_bytes,
            None if !record_dir.join(extent::FILE).exists() => Some(0),
            _ => None,
        };
        self.record(record_dir, None)?;
        Ok(before)
    }

    /// After an image of `total_len` bytes was written over what
    /// [`Store::writing`] returned.
    pub fn written(
        &self,
        record_dir: &Path,
        before: Option<u64>,
        total_len: u64,
    ) -> Result<(), Error> {
        // Unknown before stays unknown: an older image may reach further.
        self.record(record_dir, before.map(|b| b.max(total_len)))
    }

    fn record(&self, record_dir: &Path, dirty_bytes: Option<u64>) -> Result<(), Error> {
        Extent {
            store: self.path.display().to_string(),
            dirty_bytes,
        }
        .write(record_dir)
        .map_err(|source| Error::Record {
            path: self.path.clone(),
            record: record_dir.join(extent::FILE),
            source,
        })
    }

    /// Refuses a store smaller than the estimated image.
    pub fn ensure_fits(&self, estimate: u64) -> Result<(), Error> {
        if estimate <= self.capacity {
            return Ok(());
        }
        Err(Error::TooSmall {
            path: self.path.clone(),
            have: self.capacity >> 20,
            need: estimate.div_ceil(1 << 20),
            suggestion: suggest_memmap(estimate),
        })
    }
}

/// A `pmem` or device store is a block device: not a file or a character
/// device that a mistyped `store` names.
fn ensure_block_device(f: &File, path: &Path) -> Result<(), Error> {
    let meta = f.metadata().map_err(|source| Error::Open {
        path: path.into(),
        source,
    })?;
    if meta.file_type().is_block_device() {
        Ok(())
    } else {
        Err(Error::NotBlockDevice { path: path.into() })
    }
}

fn first_pmem(dev: &Path) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dev)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.starts_with("pmem") && n[4..].chars().all(|c| c.is_ascii_digit()) && n.len() > 4
        })
        .collect();
    v.sort();
    v.into_iter().next()
}

/// The image is compressed, but assume the worst: memory pages that do not
/// compress, plus CRIU's metadata and kupgrade's own overhead.
pub fn estimate_image_bytes(workload_memory: u64) -> u64 {
    workload_memory + workload_memory / 10 + (16 << 20)
}

/// A `memmap=SIZE!ADDR` for at least `need` bytes, placed in the largest
/// System RAM range of `/proc/iomem` (root sees real addresses).
pub fn suggest_memmap(need: u64) -> String {
    let iomem = fs::read_to_string("/proc/iomem").unwrap_or_default();
    suggest_memmap_from(&iomem, need)
}

/// Where Debian's GRUB takes the kernel command line from.
pub const GRUB_DEFAULTS: &str = "/etc/default/grub";

/// How to make the reservation `memmap` (a `memmap=SIZE!ADDR`) last: with
/// GRUB's `/etc/default/grub` (its text), the exact `GRUB_CMDLINE_LINUX`
/// line to write (what it has, an older `memmap=` replaced) and the
/// `update-grub` to run; without, the key to add.
pub fn reservation_fix(memmap: &str, grub_defaults: Option<&str>) -> String {
    let Some(text) = grub_defaults else {
        return format!(
            "add {memmap} to the kernel command line (in the boot loader's configuration) and reboot once"
        );
    };
    // The last assignment wins when grub-mkconfig sources the file.
    let current = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("GRUB_CMDLINE_LINUX="))
        .next_back()
        .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        .unwrap_or_default();
    let mut words: Vec<&str> = current
        .split_whitespace()
        .filter(|w| !w.starts_with("memmap="))
        .collect();
    words.push(memmap);
    format!(
        "in {GRUB_DEFAULTS}, set GRUB_CMDLINE_LINUX=\"{}\", then run update-grub and reboot once",
        words.join(" ")
    )
}

pub fn suggest_memmap_from(iomem: &str, need: u64) -> String {
    const ALIGN: u64 = 128 << 20;
    let size = need.div_ceil(ALIGN).max(2) * ALIGN;
    let mib = size >> 20;
    let ranges: Vec<(u64, u64)> = iomem
        .lines()
        .filter(|l| !l.starts_with(' ') && l.contains(": System RAM"))
        .filter_map(|l| {
            let (a, b) = l.split(':').next()?.trim().split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()? + 1,
            ))
        })
        .filter(|(a, b)| b > a && *b > 0)
        .collect();
    // Leave the bottom 1 GiB of a range to the kernel and the initramfs.
    let pick = ranges
        .iter()
        .map(|&(a, b)| (a.max(1 << 30).div_ceil(ALIGN) * ALIGN, b))
        .filter(|&(a, b)| b > a && b - a >= size)
        .max_by_key(|&(a, b)| b - a);
    match pick {
        Some((start, _)) => format!("memmap={mib}M!{}M", start >> 20),
        None => format!(
            "memmap={mib}M!ADDR (ADDR: a free System RAM address from /proc/iomem, read as root)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memmap_suggestion_uses_large_ram_above_1g() {
        let iomem = "00001000-0009fbff : System RAM\n00100000-bffdffff : System RAM\n  01000000-01ffffff : Kernel code\n100000000-23fffffff : System RAM\n";
        assert_eq!(suggest_memmap_from(iomem, 300 << 20), "memmap=384M!4096M");
        assert!(suggest_memmap_from("", 1).contains("ADDR"));
        // unprivileged readers see zeros
        assert!(suggest_memmap_from("00000000-00000000 : System RAM\n", 1).contains("ADDR"));
    }

    #[test]
    fn the_fix_is_the_exact_grub_line_and_update_grub() {
        let grub = "GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"console=ttyS0 memmap=64M!4096M rd.lvm.lv=vg/root\"\n";
        assert_eq!(
            reservation_fix("memmap=512M!4096M", Some(grub)),
            "in /etc/default/grub, set GRUB_CMDLINE_LINUX=\"console=ttyS0 rd.lvm.lv=vg/root memmap=512M!4096M\", then run update-grub and reboot once"
        );
        assert_eq!(
            reservation_fix("memmap=256M!4096M", Some("GRUB_CMDLINE_LINUX=\"\"\n")),
            "in /etc/default/grub, set GRUB_CMDLINE_LINUX=\"memmap=256M!4096M\", then run update-grub and reboot once"
        );
        assert!(
            reservation_fix("memmap=256M!4096M", Some("GRUB_TIMEOUT=5\n"))
                .contains("GRUB_CMDLINE_LINUX=\"memmap=256M!4096M\"")
        );
        assert_eq!(
            reservation_fix("memmap=256M!4096M", None),
            "add memmap=256M!4096M to the kernel command line (in the boot loader's configuration) and reboot once"
        );
    }

    #[test]
    fn too_small_store_says_how_much_is_needed() {
        let s = Store {
            path: "/dev/pmem0".into(),
            kind: Kind::Pmem,
            capacity: 64 << 20,
        };
        s.ensure_fits(60 << 20).unwrap();
        let e = s.ensure_fits(210 << 20).unwrap_err().to_string();
        assert!(
            e.contains("64 MiB") && e.contains("210 MiB") && e.contains("memmap="),
            "{e}"
        );
    }

    #[test]
    fn file_store_is_created_at_its_size() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config {
            store: format!("file:{}/s/img", d.path().display()),
            store_file_mib: 2,
            ..Config::default()
        };
        let s = Store::locate(&cfg).unwrap();
        assert_eq!(s.kind, Kind::File);
        let f = s.open_rw().unwrap();
        assert_eq!(f.metadata().unwrap().len(), 2 << 20);
    }

    fn file_store(dir: &Path) -> Store {
        Store {
            path: dir.join("s/store.img"),
            kind: Kind::File,
            capacity: 4 << 20,
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn a_file_store_is_root_s_alone() {
        let d = tempfile::tempdir().unwrap();
        let s = file_store(d.path());
        s.open_rw().unwrap();
        assert_eq!(mode(&s.path), 0o600);
        assert_eq!(mode(s.path.parent().unwrap()), 0o700);
        // One an older kupgrade made 0644 is tightened.
        fs::set_permissions(&s.path, fs::Permissions::from_mode(0o644)).unwrap();
        s.open_rw().unwrap();
        assert_eq!(mode(&s.path), 0o600);
    }

    #[test]
    fn a_file_store_that_is_not_a_plain_file_of_ours_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = file_store(d.path());
        fs::create_dir_all(s.path.parent().unwrap()).unwrap();
        // A symlink to a file someone else can read.
        let elsewhere = d.path().join("readable");
        fs::write(&elsewhere, "").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &s.path).unwrap();
        let e = s.open_rw().unwrap_err();
        assert!(matches!(e, Error::NotRegular { .. }), "{e:?}");
        assert_eq!(fs::metadata(&elsewhere).unwrap().len(), 0);
        fs::remove_file(&s.path).unwrap();
        // A directory.
        fs::create_dir(&s.path).unwrap();
        assert!(s.open_rw().is_err());
        fs::remove_dir(&s.path).unwrap();
        // A second name for it.
        fs::write(&s.path, "").unwrap();
        fs::hard_link(&s.path, d.path().join("other-name")).unwrap();
        let e = s.open_rw().unwrap_err();
        assert!(e.to_string().contains("hard links"), "{e}");
        fs::remove_file(d.path().join("other-name")).unwrap();
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&s.path, Some(65534), None).unwrap();
            let e = s.open_rw().unwrap_err();
            assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
        }
    }

    #[test]
    fn a_device_store_must_be_a_block_device() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("pmem0");
        fs::write(&file, vec![0u8; 8192]).unwrap();
        for path in [file, PathBuf::from("/dev/null")] {
            let cfg = Config {
                store: path.display().to_string(),
                ..Config::default()
            };
            let e = Store::locate(&cfg).unwrap_err();
            assert!(matches!(e, Error::NotBlockDevice { .. }), "{e:?}");
            let s = Store {
                path: path.clone(),
                kind: Kind::Pmem,
                capacity: 8192,
            };
            assert!(matches!(s.open_rw(), Err(Error::NotBlockDevice { .. })));
        }
    }

    /// Writes a small image over `n` bytes of old data.
    fn image_over_old_data(s: &Store, n: usize) -> u64 {
        fs::create_dir_all(s.path.parent().unwrap()).unwrap();
        fs::write(&s.path, vec![0xAAu8; n]).unwrap();
        fs::set_permissions(&s.path, fs::Permissions::from_mode(0o600)).unwrap();
        let mut w = image_format::ImageWriter::create(
            s.open_rw().unwrap(),
            s.capacity,
            image_format::WriteOptions::default(),
        )
        .unwrap();
        w.add_blob("b", &[7u8; 1000]).unwrap();
        w.finish(image_format::Manifest::default())
            .unwrap()
            .total_len
    }

    fn zero_up_to(path: &Path) -> usize {
        fs::read(path)
            .unwrap()
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(usize::MAX)
    }

    #[test]
    fn a_wipe_reaches_the_tail_of_an_older_larger_image() {
        let d = tempfile::tempdir().unwrap();
        let s = file_store(d.path());
        let record = d.path().join("lib");
        // An older image reached 3 MiB; the new one is a few KiB.
        s.record(&record, Some(3 << 20)).unwrap();
        let before = s.writing(&record).unwrap();
        assert_eq!(Extent::read(&record).unwrap().dirty_bytes, None);
        let total = image_over_old_data(&s, 3 << 20);
        s.written(&record, before, total).unwrap();
        assert_eq!(Extent::read(&record).unwrap().dirty_bytes, Some(3 << 20));
        assert!(s.holds_image_data(&record));
        assert_eq!(s.wipe(&record).unwrap(), 3 << 20);
        assert_eq!(zero_up_to(&s.path), usize::MAX, "old bytes survived");
        assert_eq!(Extent::read(&record).unwrap().dirty_bytes, Some(0));
        assert!(!s.holds_image_data(&record));
    }

    #[test]
    fn without_a_mark_the_whole_store_is_wiped() {
        let d = tempfile::tempdir().unwrap();
        let s = file_store(d.path());
        let record = d.path().join("lib");
        image_over_old_data(&s, 4 << 20);
        assert_eq!(s.wipe(&record).unwrap(), 4 << 20);
        assert_eq!(zero_up_to(&s.path), usize::MAX);
        // A write that did not finish leaves the mark unknown: all again.
        fs::write(&s.path, vec![0xAAu8; 4 << 20]).unwrap();
        s.writing(&record).unwrap();
        assert_eq!(s.wipe(&record).unwrap(), 4 << 20);
        assert_eq!(zero_up_to(&s.path), usize::MAX);
        // Nothing written since the last wipe: only the superblock.
        assert_eq!(s.wipe(&record).unwrap(), 0);
    }

    #[test]
    fn the_first_image_wipes_only_as_far_as_it_goes() {
        let d = tempfile::tempdir().unwrap();
        let s = file_store(d.path());
        let record = d.path().join("lib");
        // No record: kupgrade never wrote here; what lies past the image is
        // not its own, and the wipe stops at the image's end.
        let before = s.writing(&record).unwrap();
        assert_eq!(before, Some(0));
        let total = image_over_old_data(&s, 4 << 20);
        s.written(&record, before, total).unwrap();
        assert_eq!(Extent::read(&record).unwrap().dirty_bytes, Some(total));
        assert_eq!(s.wipe(&record).unwrap(), total);
        assert_eq!(zero_up_to(&s.path), total as usize);
        // A record it cannot read, or another store's, says nothing about
        // this one: unknown, all of it.
        fs::write(record.join(extent::FILE), "garbage").unwrap();
        assert_eq!(s.writing(&record).unwrap(), None);
        Extent {
            store: "/dev/pmem9".into(),
            dirty_bytes: Some(0),
        }
        .write(&record)
        .unwrap();
        assert_eq!(s.writing(&record).unwrap(), None);
    }

    #[test]
    fn pmem_devices_are_found_in_order() {
        let d = tempfile::tempdir().unwrap();
        for n in ["pmem1", "pmem0", "pmem0s", "null"] {
            fs::write(d.path().join(n), "").unwrap();
        }
        assert_eq!(first_pmem(d.path()), Some(d.path().join("pmem0")));
    }
}
