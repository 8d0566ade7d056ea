//! File systems made read-only just before the kexec (so that what CRIU
//! checked cannot change), and writable again when `go` is undone.
//!
//! A remount sets the per-mount flags (nosuid, nodev, noexec, atime) to
//! exactly what it is given: each mount's own flags are read from
//! `/proc/self/mounts` and passed back, or undoing would drop them.
//! What was remounted is journaled on /run, so that `kupgrade resume` can
//! undo it after a `go` that was killed.

use std::fs;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// A mount point made read-only, with the flags it had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remounted {
    pub target: String,
    /// Its per-mount flags, MS_RDONLY excluded.
    pub flags: MsFlags,
}

/// A mount of `/proc/self/mounts`: (device, mount point, flags, read-only).
fn parse_mounts(text: &str) -> Vec<(String, Remounted, bool)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dev, target, opts) = (f.first()?, f.get(1)?, f.get(3)?);
            let mut flags = MsFlags::empty();
            let mut ro = false;
            for o in opts.split(',') {
                flags |= match o {
                    "ro" => {
                        ro = true;
                        MsFlags::empty()
                    }
                    "nosuid" => MsFlags::MS_NOSUID,
                    "nodev" => MsFlags::MS_NODEV,
                    "noexec" => MsFlags::MS_NOEXEC,
                    "noatime" => MsFlags::MS_NOATIME,
                    "nodiratime" => MsFlags::MS_NODIRATIME,
                    "relatime" => MsFlags::MS_RELATIME,
                    "strictatime" => MsFlags::MS_STRICTATIME,
                    "sync" => MsFlags::MS_SYNCHRONOUS,
                    "dirsync" => MsFlags::MS_DIRSYNC,
                    _ => MsFlags::empty(),
                };
            }
            let target = Remounted {
                target: unescape(target),
                flags,
            };
            Some((dev.to_string(), target, ro))
        })
        .collect()
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn write_journal(journal: &Path, list: &[Remounted]) {
    let text: String = list
        .iter()
        .map(|r| format!("{:x} {}\n", r.flags.bits(), r.target))
        .collect();
    let _ = fs::write(journal, text);
}

pub fn read_journal(journal: &Path) -> Vec<Remounted> {
    fs::read_to_string(journal)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (bits, target) = l.split_once(' ')?;
            Some(Remounted {
                target: target.to_string(),
                flags: MsFlags::from_bits_truncate(u64::from_str_radix(bits, 16).ok()?),
            })
        })
        .collect()
}

/// Makes every writable block-device file system read-only where the
/// kernel lets it (one with files open for writing stays writable).
pub fn make_read_only(journal: &Path) -> Vec<Remounted> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut done = Vec::new();
    for (dev, m, ro) in parse_mounts(&mounts) {
        if ro || !dev.starts_with("/dev/") {
            continue;
        }
        // Journaled first: if we are killed right after the remount,
        // `resume` still knows.
        done.push(m.clone());
        write_journal(journal, &done);
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | m.flags;
        if mount(
            None::<&str>,
            m.target.as_str(),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .is_err()
        {
            done.pop();
        }
    }
    write_journal(journal, &done);
    done
}

/// Makes `list` writable again with its own flags, last first; clears the
/// journal when all went well. Returns the mount points that failed.
pub fn make_writable(list: &[Remounted], journal: &Path) -> Vec<String> {
    let mut failed = Vec::new();
    for m in list.iter().rev() {
        let flags = MsFlags::MS_REMOUNT | m.flags;
        if let Err(e) = mount(
            None::<&str>,
            m.target.as_str(),
            None::<&str>,
            flags,
            None::<&str>,
        ) {
            failed.push(format!("{}: {e}", m.target));
        }
    }
    if failed.is_empty() {
        let _ = fs::remove_file(journal);
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/vdb1 /srv/my\\040data ext4 rw,nosuid,nodev,noatime 0 0
/dev/vdc /boot ext4 ro,relatime 0 0
";

    #[test]
    fn each_mount_keeps_its_own_flags() {
        let m = parse_mounts(MOUNTS);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].1.flags, MsFlags::MS_RELATIME);
        assert!(!m[0].2);
        assert_eq!(
            m[2].1,
            Remounted {
                target: "/srv/my data".into(),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME
            }
        );
        assert!(m[3].2, "ro is seen");
    }

    #[test]
    fn escapes_in_mount_points_are_undone() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/odd\\04"), "/odd\\04");
    }

    #[test]
    fn the_journal_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let j = d.path().join("remounted-ro");
        let list = vec![
            Remounted {
                target: "/".into(),
                flags: MsFlags::MS_RELATIME,
            },
            Remounted {
                target: "/srv/my data".into(),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            },
        ];
        write_journal(&j, &list);
        assert_eq!(read_journal(&j), list);
        assert!(read_journal(&d.path().join("none")).is_empty());
    }
}
