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
use crate::distro::{self, Choice};
use crate::store::{Kind, Store};

pub const STAGED_FILE: &str = "staged.json";

/// What is loaded, recorded in `/run/kupgrade/staged.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Staged {
    pub kernel: PathBuf,
    pub release: String,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub store: PathBuf,
    pub initrd_bytes: u64,
    pub modules: usize,
    pub staged_unix: u64,
    /// Whose initramfs `initrd` is.
    #[serde(default)]
    pub initramfs: InitramfsKind,
    /// The generator `stage` built the distribution's initramfs with
    /// (the one in `/boot` had no kupgrade hook).
    #[serde(default)]
    pub built_with: Option<String>,
}

/// Whose initramfs the staged kernel boots with.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InitramfsKind {
    /// The distribution's, with kupgrade's hook: it mounts the root.
    Distribution,
    /// kupgrade's own: kupgrade-init mounts `root=` itself.
    #[default]
    Kupgrade,
    /// The user's (`--initrd`).
    Given,
}

impl InitramfsKind {
    pub fn name(self) -> &'static str {
        match self {
            InitramfsKind::Distribution => "distribution",
            InitramfsKind::Kupgrade => "kupgrade",
            InitramfsKind::Given => "given",
        }
    }
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
    #[error("release {release} lacks modules the restore needs: {missing:?}")]
    MissingModules {
        release: String,
        missing: Vec<String>,
    },
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error("the distribution's initramfs of {release}")]
    Distro {
        release: String,
        #[source]
        source: distro::Error,
    },
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
    /// kupgrade's own initramfs even where the distribution has one.
    pub own_initramfs: bool,
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
    let choice = match (req.initrd, req.own_initramfs) {
        (None, false) => distro::choose(&mut distro::RealMachine, &release, Path::new(RUN_DIR))
            .map_err(|source| Error::Distro {
                release: release.clone(),
                source,
            })?,
        _ => Choice::OwnInitramfs,
    };
    let mut kind = InitramfsKind::Kupgrade;
    let mut built_with = None;
    let (initrd, initrd_bytes, n_modules) = match (req.initrd, choice) {
        (Some(p), _) => {
            kind = InitramfsKind::Given;
            (
                p.to_path_buf(),
                fs::metadata(p).map(|m| m.len()).unwrap_or(0),
                0,
            )
        }
        (
            None,
            Choice::Distribution {
                path,
                marker,
                built_with: built,
            },
        ) => {
            // The hook's boot script runs it from the root.
            let init = Path::new(distro::CHAINED_INIT);
            if !init.exists() {
                return Err(Error::NoInit(init.into()));
            }
            kind = InitramfsKind::Distribution;
            built_with = built;
            let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            (path, bytes, marker.modules.len())
        }
        (None, Choice::OwnInitramfs) => {
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
            let wanted = initramfs::wanted_modules(&loaded, &index, store.kind == Kind::Pmem);
            let config = fs::read_to_string(format!("/boot/config-{release}")).ok();
            let spec = initramfs::Spec {
                release: release.clone(),
                modules_dir,
                init_binary: cfg.init_binary.clone(),
                modules: wanted,
                compression: Compression::for_kernel_config(config.as_deref()),
            };
            fs::create_dir_all(RUN_DIR).map_err(Error::Record)?;
            let out = Path::new(RUN_DIR).join(format!("initrd-{release}.img"));
            let built = initramfs::build(&spec, &out)?;
            // The restore cannot work without these; others are best effort.
            let mut required: Vec<&str> = modules::CRIU_MODULES.to_vec();
            if store.kind == Kind::Pmem {
                required.extend(modules::PMEM_MODULES);
            }
            let missing: Vec<String> = built
                .modules
                .missing
                .iter()
                .filter(|m| required.contains(&m.as_str()))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(Error::MissingModules { release, missing });
            }
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
        initramfs: kind,
        built_with,
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

    /// What a distribution's initramfs needs to assemble the root stays.
    #[test]
    fn cmdline_keeps_what_the_distribution_s_initramfs_needs() {
        let running = "BOOT_IMAGE=/vmlinuz-6.1.0-27-amd64 root=/dev/mapper/vg-root ro \
            rd.lvm.lv=vg/root rd.luks.uuid=luks-1234 rd.md.uuid=ab:cd resume=UUID=5678 \
            cryptdevice=UUID=1234:crypt quiet initrd=\\initrd.img";
        let c = compose_cmdline(running, None, None, Path::new("/dev/pmem0"));
        assert_eq!(
            c,
            "root=/dev/mapper/vg-root ro rd.lvm.lv=vg/root rd.luks.uuid=luks-1234 \
             rd.md.uuid=ab:cd resume=UUID=5678 cryptdevice=UUID=1234:crypt quiet \
             kupgrade.resume kupgrade.store=/dev/pmem0"
        );
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
