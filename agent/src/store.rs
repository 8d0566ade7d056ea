//! Where the image lives across the kexec: a `memmap=SIZE!ADDR` RAM range
//! exposed as `/dev/pmemN` (the default), or a file on disk.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

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
            let capacity = cfg.store_file_mib << 20;
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

    /// Opens for reading and writing; a file store is created at its size.
    pub fn open_rw(&self) -> Result<File, Error> {
        let err = |source| Error::Open {
            path: self.path.clone(),
            source,
        };
        if self.kind == Kind::File {
            if let Some(dir) = self.path.parent() {
                fs::create_dir_all(dir).map_err(err)?;
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)
                .map_err(err)?;
            if f.metadata().map_err(err)?.len() < self.capacity {
                f.set_len(self.capacity).map_err(err)?;
            }
            return Ok(f);
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(err)
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

    #[test]
    fn pmem_devices_are_found_in_order() {
        let d = tempfile::tempdir().unwrap();
        for n in ["pmem1", "pmem0", "pmem0s", "null"] {
            fs::write(d.path().join(n), "").unwrap();
        }
        assert_eq!(first_pmem(d.path()), Some(d.path().join("pmem0")));
    }
}
