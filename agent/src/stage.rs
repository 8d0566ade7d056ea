//! `kupgrade stage`: validate the new kernel, build its initramfs, compose
//! its command line and load it now, so that loading (1-2 s under emulation)
//! never sits inside the blackout.

use std::fs;
use std::path::{Path, PathBuf};

use contract::cmdline::{self, Cmdline};
use initramfs::modules::{self, ModuleIndex};
use initramfs::Compression;
use serde::{Deserialize, Serialize};

use crate::config::{Config, RUN_DIR};
use crate::store::{Kind, Store};
use crate::target::{self, Kernel, Level, Needs};
use crate::{criu, workload};

pub const STAGED_FILE: &str = "staged.json";

/// What is loaded, recorded in `/run/kupgrade/staged.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Staged {
    pub kernel: PathBuf,
    pub release: String,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub store: PathBuf,
    pub initrd_bytes: u64,
    pub modules: usize,
    pub staged_unix: u64,
    /// What differs from the running kernel, as `kupgrade stage` found it
    /// (nothing refused). Records from before this field read as none.
    #[serde(default)]
    pub differences: Vec<target::Finding>,
}

impl Staged {
    pub fn load() -> Option<Staged> {
        let bytes = fs::read(Path::new(RUN_DIR).join(STAGED_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save(&self) -> std::io::Result<()> {
        fs::create_dir_all(RUN_DIR)?;
        fs::write(
            Path::new(RUN_DIR).join(STAGED_FILE),
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )
    }

    pub fn forget() {
        let _ = fs::remove_file(Path::new(RUN_DIR).join(STAGED_FILE));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kernel(#[from] kexec::bzimage::HeaderError),
    #[error("no modules for {release} in {dir}: install the kernel's package completely (its /lib/modules tree)")]
    NoModules { release: String, dir: PathBuf },
    #[error("the init program {0} is missing: install kupgrade completely or set init_binary in /etc/kupgrade/config.toml")]
    NoInit(PathBuf),
    #[error("building the initramfs failed")]
    Initramfs(#[from] initramfs::Error),
    #[error("refusing to stage {release}: {}", reasons.join("; "))]
    Refused {
        release: String,
        reasons: Vec<String>,
    },
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error(transparent)]
    Load(#[from] kexec::KexecError),
    #[error("cannot record the staged kernel in {RUN_DIR}")]
    Record(#[source] std::io::Error),
}

pub struct Request<'a> {
    pub kernel: &'a Path,
    /// A user-supplied initramfs (it must run kupgrade-init as /init to restore).
    pub initrd: Option<&'a Path>,
    /// Appended to the running command line.
    pub append: Option<&'a str>,
    /// Replaces the running command line.
    pub cmdline: Option<&'a str>,
}

/// The next kernel's command line: the running one (or `base`) without
/// one-shot keys, plus `kupgrade.resume` and the store.
pub fn compose_cmdline(
    running: &str,
    base: Option<&str>,
    append: Option<&str>,
    store: &Path,
) -> String {
    let mut c = Cmdline::parse(base.unwrap_or(running));
    c.remove_one_shot();
    if let Some(extra) = append {
        for p in Cmdline::parse(extra).params {
            c.set(&p.key, p.value.as_deref());
        }
    }
    c.set(cmdline::RESUME, None);
    c.set(cmdline::STORE, Some(&store.to_string_lossy()));
    c.to_string()
}

pub fn stage(cfg: &Config, req: &Request) -> Result<Staged, Error> {
    let image = kexec::bzimage::read(req.kernel)?;
    let release = image.release.clone();
    let store = Store::locate(cfg)?;
    let modules_dir = PathBuf::from(format!("/lib/modules/{release}"));
    // What kupgrade's initramfs must bring up; a user's initramfs brings
    // what it brings.
    let needs = match req.initrd {
        Some(_) => Needs::default(),
        None => Needs {
            pmem: store.kind == Kind::Pmem,
            root_storage: target::root_storage_modules(),
            network: target::network_modules(),
            tcp: workload::discover(cfg)
                .into_iter()
                .flatten()
                .any(|w| w.tcp_established),
        },
    };
    let findings = target::compare(
        &Kernel::installed(&target::running_release()),
        &Kernel::installed(&release),
        &needs,
        criu::version(&cfg.criu).ok().as_deref(),
    );
    let (refused, notes): (Vec<_>, Vec<_>) =
        findings.iter().partition(|f| f.level == Level::Refuse);
    if !refused.is_empty() {
        return Err(Error::Refused {
            release,
            reasons: refused.iter().map(|f| f.sentence()).collect(),
        });
    }
    let (initrd, initrd_bytes, n_modules) = match req.initrd {
        Some(p) => (
            p.to_path_buf(),
            fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            0,
        ),
        None => {
            if !modules_dir.join("modules.dep").exists() {
                return Err(Error::NoModules {
                    release,
                    dir: modules_dir,
                });
            }
            if !cfg.init_binary.exists() {
                return Err(Error::NoInit(cfg.init_binary.clone()));
            }
            let index = ModuleIndex::open(&modules_dir).map_err(initramfs::Error::from)?;
            let loaded = modules::loaded(Path::new("/proc/modules")).unwrap_or_default();
            let mut wanted = initramfs::wanted_modules(&loaded, &index, store.kind == Kind::Pmem);
            wanted.extend(target::needed_names(&needs));
            wanted.sort();
            wanted.dedup();
            let config = fs::read_to_string(format!("/boot/config-{release}")).ok();
            let spec = initramfs::Spec {
                release: release.clone(),
                modules_dir,
                init_binary: cfg.init_binary.clone(),
                modules: wanted,
                compression: Compression::for_kernel_config(config.as_deref()),
                kernel_decompresses: initramfs::format::in_kernel_decompression(config.as_deref()),
            };
            fs::create_dir_all(RUN_DIR).map_err(Error::Record)?;
            let out = Path::new(RUN_DIR).join(format!("initrd-{release}.img"));
            let built = initramfs::build(&spec, &out)?;
            (out, built.bytes, built.modules.load_order.len())
        }
    };
    let running = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cmdline = compose_cmdline(running.trim(), req.cmdline, req.append, &store.path);
    // Replace whatever was staged before.
    if kexec::is_loaded().unwrap_or(false) {
        kexec::unload()?;
    }
    kexec::load(
        req.kernel,
        Some(&initrd),
        &cmdline,
        kexec::LoadFlags::default(),
    )?;
    let staged = Staged {
        kernel: req.kernel.to_path_buf(),
        release,
        initrd,
        cmdline,
        store: store.path,
        initrd_bytes,
        modules: n_modules,
        staged_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        differences: notes.into_iter().cloned().collect(),
    };
    staged.save().map_err(Error::Record)?;
    Ok(staged)
}

pub fn unstage() -> Result<(), Error> {
    kexec::unload()?;
    Staged::forget();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_keeps_the_running_one_and_adds_resume_and_store() {
        let c = compose_cmdline(
            "BOOT_IMAGE=/vmlinuz-old root=LABEL=r ro memmap=256M!512M kupgrade.resume kupgrade.store=/dev/pmem9",
            None,
            Some("quiet foo=bar"),
            Path::new("/dev/pmem0"),
        );
        assert_eq!(c, "root=LABEL=r ro memmap=256M!512M quiet foo=bar kupgrade.resume kupgrade.store=/dev/pmem0");
    }

    #[test]
    fn explicit_cmdline_replaces_the_running_one() {
        let c = compose_cmdline(
            "root=/dev/sda1",
            Some("root=/dev/vda console=ttyS0"),
            None,
            Path::new("/s"),
        );
        assert_eq!(
            c,
            "root=/dev/vda console=ttyS0 kupgrade.resume kupgrade.store=/s"
        );
    }
}
