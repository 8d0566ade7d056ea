//! Finding the real root device from `root=`: a device path, `LABEL=` or
//! `UUID=`, matched against the ext2/3/4 superblocks of the block devices the
//! kernel has registered (there is no udev and no /dev/disk/by-* here).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use contract::cmdline::Cmdline;

/// How long initramfs-tools waits for the root device at least
/// (`scripts/local`: max(30, rootdelay) seconds).
const ROOT_WAIT: Duration = Duration::from_secs(30);
/// A bare `rootwait` asks the kernel to wait for ever; we stop after this.
const ROOTWAIT_BARE: Duration = Duration::from_secs(120);

/// How long to wait for the root device before giving up: 30 s, or longer
/// when `rootdelay=N` or `rootwait=N` asks for more (initramfs-tools takes
/// max(30, rootdelay); the kernel reads `rootwait=N` as N seconds), 120 s
/// for a bare `rootwait`. Never for ever: a root that never comes must end
/// the boot (see `ending.rs`), not hang it.
pub fn wait(cmdline: &Cmdline) -> Duration {
    let secs = |key: &str| {
        cmdline
            .value(key)
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs)
    };
    let mut wait = ROOT_WAIT;
    if cmdline.get("rootwait") == Some(None) {
        wait = ROOTWAIT_BARE;
    }
    for asked in [secs("rootdelay"), secs("rootwait")].into_iter().flatten() {
        wait = wait.max(asked);
    }
    wait
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootSpec {
    Path(PathBuf),
    Label(String),
    Uuid(String),
}

impl RootSpec {
    pub fn parse(value: &str) -> RootSpec {
        if let Some(l) = value.strip_prefix("LABEL=") {
            RootSpec::Label(l.to_string())
        } else if let Some(u) = value.strip_prefix("UUID=") {
            RootSpec::Uuid(u.to_ascii_lowercase())
        } else {
            RootSpec::Path(PathBuf::from(value))
        }
    }
}

/// Label and UUID of an ext2/3/4 file system, from its superblock at 1 KiB.
#[derive(Debug, PartialEq, Eq)]
pub struct ExtIds {
    pub label: String,
    pub uuid: String,
}

pub fn ext_ids(sb: &[u8]) -> Option<ExtIds> {
    // s_magic at 0x38 of the superblock
    if sb.get(0x38..0x3a)? != [0x53, 0xef] {
        return None;
    }
    let u = sb.get(0x68..0x78)?;
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex(&u[0..4]),
        hex(&u[4..6]),
        hex(&u[6..8]),
        hex(&u[8..10]),
        hex(&u[10..16])
    );
    let name = sb.get(0x78..0x88)?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(ExtIds {
        label: String::from_utf8_lossy(&name[..end]).into_owned(),
        uuid,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_ids(dev: &Path) -> Option<ExtIds> {
    let mut f = File::open(dev).ok()?;
    f.seek(SeekFrom::Start(1024)).ok()?;
    let mut sb = [0u8; 256];
    f.read_exact(&mut sb).ok()?;
    ext_ids(&sb)
}

/// The device node for `spec`, if it exists now. `sys_block` is
/// `/sys/class/block`, `dev` is `/dev` (devtmpfs names nodes after sysfs).
pub fn find(spec: &RootSpec, sys_block: &Path, dev: &Path) -> Option<PathBuf> {
    match spec {
        RootSpec::Path(p) => p.exists().then(|| p.clone()),
        RootSpec::Label(_) | RootSpec::Uuid(_) => {
            let mut names: Vec<String> = fs::read_dir(sys_block)
                .ok()?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names.into_iter().map(|n| dev.join(n)).find(|node| {
                read_ids(node).is_some_and(|ids| match spec {
                    RootSpec::Label(l) => &ids.label == l,
                    RootSpec::Uuid(u) => &ids.uuid == u,
                    RootSpec::Path(_) => false,
                })
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(label: &str, uuid: [u8; 16]) -> Vec<u8> {
        let mut sb = vec![0u8; 256];
        sb[0x38] = 0x53;
        sb[0x39] = 0xef;
        sb[0x68..0x78].copy_from_slice(&uuid);
        sb[0x78..0x78 + label.len()].copy_from_slice(label.as_bytes());
        sb
    }

    #[test]
    fn the_root_wait_is_bounded_and_follows_rootdelay_and_rootwait() {
        let wait = |c: &str| wait(&Cmdline::parse(c)).as_secs();
        assert_eq!(wait("root=LABEL=r"), 30);
        assert_eq!(wait("root=LABEL=r rootdelay=90"), 90);
        // initramfs-tools waits at least 30 s whatever rootdelay says.
        assert_eq!(wait("root=LABEL=r rootdelay=5"), 30);
        assert_eq!(wait("root=LABEL=r rootdelay=soon"), 30);
        assert_eq!(wait("root=LABEL=r rootwait"), 120);
        assert_eq!(wait("root=LABEL=r rootwait=300"), 300);
        assert_eq!(wait("rootwait rootdelay=200"), 200);
    }

    #[test]
    fn parses_root_forms() {
        assert_eq!(
            RootSpec::parse("/dev/vda1"),
            RootSpec::Path("/dev/vda1".into())
        );
        assert_eq!(
            RootSpec::parse("LABEL=root"),
            RootSpec::Label("root".into())
        );
        assert_eq!(
            RootSpec::parse("UUID=AB-CD"),
            RootSpec::Uuid("ab-cd".into())
        );
    }

    #[test]
    fn reads_label_and_uuid_and_refuses_other_magic() {
        let uuid = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        let ids = ext_ids(&superblock("kroot", uuid)).unwrap();
        assert_eq!(ids.label, "kroot");
        assert_eq!(ids.uuid, "12345678-9abc-def0-0102-030405060708");
        let mut bad = superblock("x", uuid);
        bad[0x38] = 0;
        assert_eq!(ext_ids(&bad), None);
        assert_eq!(ext_ids(&[0u8; 10]), None);
    }

    #[test]
    fn finds_a_device_by_label_among_several() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let dev = dir.path().join("dev");
        fs::create_dir_all(&sys).unwrap();
        fs::create_dir_all(&dev).unwrap();
        for (name, label) in [("vda", "data"), ("vdb", "kroot")] {
            fs::create_dir(sys.join(name)).unwrap();
            let mut img = vec![0u8; 1024];
            img.extend(superblock(label, [7; 16]));
            fs::write(dev.join(name), img).unwrap();
        }
        fs::create_dir(sys.join("pmem0")).unwrap(); // no node: skipped
        assert_eq!(
            find(&RootSpec::Label("kroot".into()), &sys, &dev),
            Some(dev.join("vdb"))
        );
        assert_eq!(find(&RootSpec::Label("none".into()), &sys, &dev), None);
    }
}
