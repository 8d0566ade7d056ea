//! The normal boot path: kernel file systems, modules, the real root, and
//! the hand-over to the real init.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use contract::cmdline::Cmdline;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot};

use crate::info;
use crate::root::{self, RootSpec};
use crate::system;

pub const NEWROOT: &str = "/newroot";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: String,
        source: nix::Error,
    },
    #[error("no root= on the kernel command line")]
    NoRoot,
    #[error(
        "root device {spec} did not appear within {secs} s (modules for its controller missing? rootdelay=N waits longer)"
    )]
    RootTimeout { spec: String, secs: u64 },
    #[error("cannot mount the root {dev} (tried {tried})")]
    RootMount {
        dev: String,
        tried: String,
        source: nix::Error,
    },
    #[error("cannot switch to the new root")]
    SwitchRoot(#[source] nix::Error),
}

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: Option<&str>) -> Result<(), Error> {
    let _ = fs::create_dir_all(target);
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(|source| Error::Mount {
        what: fstype.to_string(),
        target: target.to_string(),
        source,
    })
}

/// `/proc`, `/sys` and `/dev`: what everything after needs.
pub fn mount_kernel_fs() -> Result<(), Error> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("proc", "/proc", nosuid, None)?;
    mount_fs("sysfs", "/sys", nosuid, None)?;
    // devtmpfs may already be there when the kernel has CONFIG_DEVTMPFS_MOUNT.
    match mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755")) {
        Err(Error::Mount {
            source: nix::Error::EBUSY,
            ..
        }) => Ok(()),
        r => r,
    }
}

fn modules_dir(release: &str) -> PathBuf {
    PathBuf::from(format!("/lib/modules/{release}"))
}

/// The modules the initramfs builder listed, in the order to load them,
/// relative to `/lib/modules/RELEASE`.
pub fn module_load_order(release: &str) -> Vec<String> {
    let order =
        fs::read_to_string(modules_dir(release).join("kupgrade.load-order")).unwrap_or_default();
    order
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// `finit_module` flag (include/uapi/linux/module.h, Linux 5.17+): the file
/// is compressed and the kernel unpacks it (`CONFIG_MODULE_DECOMPRESS`).
/// nix does not name it.
const MODULE_INIT_COMPRESSED_FILE: nix::libc::c_uint = 4;

/// Endings of the compressed modules `initramfs::format` knows.
const COMPRESSED: [&str; 3] = [".ko.xz", ".ko.zst", ".ko.gz"];

/// The flags to load `module` with. The initramfs builder leaves a module
/// compressed only when the kernel unpacks that format itself, so a
/// compressed file in the initramfs is one to hand over as it is.
pub fn finit_flags(module: &str) -> ModuleInitFlags {
    if COMPRESSED.iter().any(|c| module.ends_with(c)) {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    }
}

/// The module name of a file: `kernel/drivers/block/virtio_blk.ko.xz` ->
/// `virtio_blk` (`-` and `_` are the same to the kernel).
pub fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let stem = COMPRESSED
        .iter()
        .chain(&[".ko"])
        .find_map(|suffix| base.strip_suffix(suffix))
        .unwrap_or(base);
    stem.replace('-', "_")
}

pub fn load_module(release: &str, module: &str) -> Result<(), system::Error> {
    let path = modules_dir(release).join(module);
    let f = File::open(&path).map_err(|source| system::Error::Io {
        what: "open",
        path: path.clone(),
        source,
    })?;
    finit_module(&f, c"", finit_flags(module))
        .map_err(|source| system::Error::Module { path, source })
}

/// Waits up to `wait` for the device named by `root=` and mounts it on
/// [`NEWROOT`]. `writable` forces a read-write mount (a restore writes to
/// the root).
pub fn mount_root(cmdline: &Cmdline, writable: bool, wait: Duration) -> Result<PathBuf, Error> {
    let value = cmdline.value("root").ok_or(Error::NoRoot)?;
    let spec = RootSpec::parse(value);
    let start = Instant::now();
    let dev = loop {
        if let Some(dev) = root::find(&spec, Path::new("/sys/class/block"), Path::new("/dev")) {
            break dev;
        }
        if start.elapsed() > wait {
            return Err(Error::RootTimeout {
                spec: value.to_string(),
                secs: wait.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut flags = MsFlags::empty();
    if !writable && !cmdline.has("rw") {
        flags |= MsFlags::MS_RDONLY;
    }
    let types: Vec<String> = match cmdline.value("rootfstype") {
        Some(t) => t.split(',').map(str::to_string).collect(),
        None => block_filesystems(),
    };
    let data = cmdline.value("rootflags");
    let _ = fs::create_dir_all(NEWROOT);
    let mut last = nix::Error::ENODEV;
    for t in &types {
        match mount(Some(&dev), NEWROOT, Some(t.as_str()), flags, data) {
            Ok(()) => {
                info!(
                    "root {} ({t}) mounted {}",
                    dev.display(),
                    if flags.is_empty() { "rw" } else { "ro" }
                );
                return Ok(dev);
            }
            Err(e) => last = e,
        }
    }
    Err(Error::RootMount {
        dev: dev.display().to_string(),
        tried: types.join(","),
        source: last,
    })
}

/// File system types that need a device, from `/proc/filesystems`.
fn block_filesystems() -> Vec<String> {
    let text = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("nodev"))
        .map(|l| l.trim().to_string())
        .collect();
    // ext4 first: it is the common case and also mounts ext2/3.
    v.sort_by_key(|t| t != "ext4");
    v
}

/// Moves the kernel file systems into the new root, frees the initramfs and
/// makes the new root `/`. PID 1 keeps running; it does not exec here.
pub fn switch_root() -> Result<(), Error> {
    for fs_ in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEWROOT}{fs_}");
        let _ = fs::create_dir_all(&target);
        mount(
            Some(fs_),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(Error::SwitchRoot)?;
    }
    free_initramfs();
    chdir(NEWROOT).map_err(Error::SwitchRoot)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(Error::SwitchRoot)?;
    chroot(".").map_err(Error::SwitchRoot)?;
    chdir("/").map_err(Error::SwitchRoot)?;
    Ok(())
}

/// The initramfs is a ramfs: its files hold memory until deleted. Delete
/// everything but the mount point of the new root (other mounts are moved).
fn free_initramfs() {
    let Ok(entries) = fs::read_dir("/") else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p == Path::new(NEWROOT) {
            continue;
        }
        let _ = if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
}

/// Halts or restarts the machine; returns only if the kernel refused.
pub fn reboot(how: system::Reboot) -> system::Error {
    use nix::sys::reboot::RebootMode;
    nix::unistd::sync();
    let mode = match how {
        system::Reboot::Halt => RebootMode::RB_HALT_SYSTEM,
        system::Reboot::Restart => RebootMode::RB_AUTOBOOT,
    };
    let Err(source) = nix::sys::reboot::reboot(mode);
    system::Error::Reboot { how, source }
}

/// Replaces this process (PID 1) with `init`, giving it `args`. Only
/// returns when it could not, with why.
///
/// Through `Command::exec`, which first puts back what a Rust process
/// changed and an exec would hand on: SIGPIPE ignored (Rust's runtime
/// ignores it; the real init and everything it starts would inherit that)
/// and the signal mask. The rest is as the kernel starts an init:
/// `argv[0]` its path, the environment the kernel gave us.
pub fn exec(init: &str, args: &[String]) -> String {
    Command::new(init).arg0(init).args(args).exec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const AS_INIT: &str = "KUPGRADE_TEST_EXEC_AS_INIT";

    /// A bit of a signal mask line of `/proc/self/status` (`SigIgn: 0...1000`).
    fn has_signal(status: &str, field: &str, signal: i32) -> bool {
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"));
        mask & (1 << (signal - 1)) != 0
    }

    /// The init starts as the kernel starts one: no signal ignored or
    /// blocked. Rust ignores SIGPIPE in its own processes (this test's too);
    /// the exec must not hand that on. Runs the exec in a child of the test.
    #[test]
    fn the_init_starts_with_no_signal_ignored_or_blocked() {
        if std::env::var_os(AS_INIT).is_some() {
            let script = "grep -E '^Sig(Ign|Blk):' /proc/self/status".to_string();
            let why = exec("/bin/sh", &["-c".into(), script]);
            panic!("cannot exec /bin/sh: {why}");
        }
        let me = std::env::current_exe().unwrap();
        let out = Command::new(me)
            .args([
                "--exact",
                "boot::tests::the_init_starts_with_no_signal_ignored_or_blocked",
                "--nocapture",
            ])
            .env(AS_INIT, "1")
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&out.stdout);
        assert!(status.contains("SigIgn:"), "{status}");
        let sigpipe = nix::sys::signal::Signal::SIGPIPE as i32;
        assert!(
            !has_signal(&status, "SigIgn:", sigpipe),
            "SIGPIPE ignored: {status}"
        );
        assert!(
            (1..=64).all(|s| !has_signal(&status, "SigBlk:", s)),
            "{status}"
        );
    }

    #[test]
    fn only_compressed_modules_are_handed_over_compressed() {
        assert_eq!(
            finit_flags("kernel/drivers/block/virtio_blk.ko"),
            ModuleInitFlags::empty()
        );
        for m in ["a.ko.xz", "kernel/x/b.ko.zst", "c.ko.gz"] {
            assert_eq!(finit_flags(m).bits(), 4, "{m}");
        }
    }

    #[test]
    fn module_names_lose_their_directory_and_endings() {
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko.xz"),
            "virtio_blk"
        );
        assert_eq!(
            module_name("kernel/net/af-packet-diag.ko.zst"),
            "af_packet_diag"
        );
        assert_eq!(module_name("nd_pmem.ko"), "nd_pmem");
        assert_eq!(module_name("x.ko.gz"), "x");
    }
}
