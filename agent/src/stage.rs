//! `kupgrade stage`: validate the new kernel, build its initramfs, compose
//! its command line and load it now, so that loading (1-2 s under emulation)
//! never sits inside the blackout.
//!
//! The kernel file is opened once: the file whose header was checked (and
//! whose release picks the modules) is the file loaded.
//!
//! Is what is loaded at `go` still what was staged? Linux says only
//! whether a kexec kernel is loaded (`/sys/kernel/kexec_loaded`), never
//! which: no interface reads the loaded image back. The best evidence is
//! the count of kexec load calls the kernel still allows
//! (`kernel.kexec_load_limit_reboot`, Linux 6.7+), which every load and
//! unload by anyone decrements: stage turns an unlimited count (-1) into
//! `i32::MAX` (it can only go down until the next boot, so this lasts until
//! then) and records it right after its own load, with the boot id; `go`
//! refuses when the kernel is unloaded, the record is of another boot, or
//! the count moved (checked again right before the kexec). Without the
//! count (older kernels) a kernel that another program loaded after
//! `kupgrade stage` cannot be told apart: only the loaded flag and the boot
//! are checked. The command line is
//! refused when it would lose the image: without `kupgrade.resume`, without
//! the store, or without the `memmap=` that keeps the store's RAM out of the
//! new kernel's hands.

use std::fs;
use std::path::{Path, PathBuf};

use contract::cmdline::{self, Cmdline};
use initramfs::modules::{self, ModuleIndex};
use initramfs::Compression;
use serde::{Deserialize, Serialize};

use crate::config::{Config, RUN_DIR};
use crate::distro::{self, Choice};
use crate::store::{Kind, Store};
use crate::target::{self, Kernel, Level, Needs};
use crate::{criu, workload};

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
    /// What differs from the running kernel, as `kupgrade stage` found it
    /// (nothing refused). Records from before this field read as none.
    #[serde(default)]
    pub differences: Vec<target::Finding>,
    /// The boot it was loaded in.
    #[serde(default)]
    pub boot_id: String,
    /// The kernel's count of kexec load calls left right after the load
    /// ([`kexec::load_calls_left`]), when it counts.
    #[serde(default)]
    pub load_calls_left: Option<i64>,
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
    /// Why what is loaded may not be this kernel, judged by all Linux
    /// offers (see the module docs); `None` when nothing says so.
    pub fn doubt(&self, loaded: bool, boot_id: &str, calls_left: Option<i64>) -> Option<String> {
        if !loaded {
            return Some(format!(
                "{} was staged but no kernel is loaded any more",
                self.release
            ));
        }
        if !self.boot_id.is_empty() && self.boot_id != boot_id {
            return Some(format!(
                "{} was staged in another boot ({}): the kernel loaded now is not it",
                self.release, self.boot_id
            ));
        }
        match (self.load_calls_left, calls_left) {
            (Some(then), Some(now)) if then != now => Some(format!(
                "a kexec kernel was loaded or unloaded after {} was staged (kernel.kexec_load_limit_reboot went from {then} to {now}): another program may have replaced it",
                self.release
            )),
            _ => None,
        }
    }

    pub fn load() -> Option<Staged> {
        Staged::load_from(Path::new(RUN_DIR))
    }

    pub fn load_from(dir: &Path) -> Option<Staged> {
        let bytes = fs::read(dir.join(STAGED_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save_in(&self, dir: &Path) -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(
            dir.join(STAGED_FILE),
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
    #[error("the command line lacks {what}, without which the new kernel would not restore the workloads: {fix}")]
    CmdlineLacks { what: String, fix: &'static str },
    #[error("the command line drops memmap={kept}, which reserves the store {store}: the new kernel would use that RAM as its own and the image would be lost; keep memmap={kept} (stage without --cmdline keeps the running kernel's)")]
    DropsReservation { kept: String, store: PathBuf },
}

/// What `stage` asks of the machine, apart so that its order is tested.
pub trait Machine {
    /// `/proc/cmdline`.
    fn running_cmdline(&mut self) -> String;
    /// Where a pmem store's RAM lies, if the system says.
    fn store_range(&mut self, store: &Store) -> Option<Reserved>;
    fn kexec_loaded(&mut self) -> bool;
    fn unload(&mut self) -> Result<(), kexec::KexecError>;
    fn load(
        &mut self,
        kernel: &kexec::Kernel,
        initrd: &Path,
        cmdline: &str,
    ) -> Result<(), kexec::KexecError>;
    /// Where the record goes: [`RUN_DIR`].
    fn run_dir(&self) -> PathBuf;
    fn boot_id(&mut self) -> String;
    /// [`kexec::count_load_calls`].
    fn count_load_calls(&mut self);
    /// [`kexec::load_calls_left`].
    fn load_calls_left(&mut self) -> Option<i64>;
}

/// The running system.
pub struct RealMachine;

impl Machine for RealMachine {
    fn running_cmdline(&mut self) -> String {
        fs::read_to_string("/proc/cmdline").unwrap_or_default()
    }

    fn store_range(&mut self, store: &Store) -> Option<Reserved> {
        // A pmem namespace says where it starts; the block device how long.
        let name = store.path.file_name()?.to_str()?;
        let block = Path::new("/sys/block").join(name);
        let start = fs::read_to_string(block.join("device/resource")).ok()?;
        let start = u64::from_str_radix(start.trim().trim_start_matches("0x"), 16).ok()?;
        let sectors: u64 = fs::read_to_string(block.join("size"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // Unprivileged readers see 0.
        (start != 0).then_some(Reserved {
            start,
            len: sectors * 512,
        })
    }

    fn kexec_loaded(&mut self) -> bool {
        kexec::is_loaded().unwrap_or(false)
    }

    fn unload(&mut self) -> Result<(), kexec::KexecError> {
        kexec::unload()
    }

    fn load(
        &mut self,
        kernel: &kexec::Kernel,
        initrd: &Path,
        cmdline: &str,
    ) -> Result<(), kexec::KexecError> {
        kexec::load_kernel(kernel, Some(initrd), cmdline, kexec::LoadFlags::default())
    }

    fn run_dir(&self) -> PathBuf {
        PathBuf::from(RUN_DIR)
    }

    fn boot_id(&mut self) -> String {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn count_load_calls(&mut self) {
        kexec::count_load_calls()
    }

    fn load_calls_left(&mut self) -> Option<i64> {
        kexec::load_calls_left()
    }
}

/// A `memmap=SIZE!ADDR` range: RAM the kernel keeps out of its own use and
/// offers as persistent memory (`/dev/pmemN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserved {
    pub start: u64,
    pub len: u64,
}

impl Reserved {
    fn overlaps(&self, other: &Reserved) -> bool {
        self.start < other.start.saturating_add(other.len)
            && other.start < self.start.saturating_add(self.len)
    }
}

/// A size or address as the kernel's `memparse` reads it: decimal, `0x`
/// hex or `0` octal, then an optional K, M, G, T, P or E. Returns the value
/// and the rest.
fn memparse(s: &str) -> Option<(u64, &str)> {
    let (radix, digits) = if let Some(h) = s.strip_prefix("0x").or(s.strip_prefix("0X")) {
        (16, h)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    let n = u64::from_str_radix(&digits[..end], radix).ok()?;
    let rest = &digits[end..];
    let shift = match rest.chars().next().map(|c| c.to_ascii_uppercase()) {
        Some('K') => 10,
        Some('M') => 20,
        Some('G') => 30,
        Some('T') => 40,
        Some('P') => 50,
        Some('E') => 60,
        _ => return Some((n, rest)),
    };
    Some((n.checked_mul(1u64 << shift)?, &rest[1..]))
}

/// Every `!` range of the `memmap=` parameters (a comma-separated list each).
pub fn pmem_reservations(c: &Cmdline) -> Vec<Reserved> {
    c.params
        .iter()
        .filter(|p| p.key == "memmap")
        .filter_map(|p| p.value.as_deref())
        .flat_map(|v| v.split(','))
        .filter_map(|one| {
            let (len, rest) = memparse(one)?;
            let (start, rest) = memparse(rest.strip_prefix('!')?)?;
            rest.is_empty().then_some(Reserved { start, len })
        })
        .collect()
}

fn memmap_text(r: &Reserved) -> String {
    let unit = |n: u64| {
        if n.trailing_zeros() >= 20 {
            format!("{}M", n >> 20)
        } else {
            n.to_string()
        }
    };
    format!("{}!{}", unit(r.len), unit(r.start))
}

/// Refuses a command line for the next kernel that would lose the image:
/// it must look for it (`kupgrade.resume`), in this store, and keep the
/// running kernel's reservation of a pmem store's RAM (every `!` range when
/// `store_range` is unknown) at the same address, at least as large.
pub fn check_next_cmdline(
    running: &str,
    next: &str,
    store: &Store,
    store_range: Option<Reserved>,
) -> Result<(), Error> {
    let next_c = Cmdline::parse(next);
    if !next_c.has(cmdline::RESUME) {
        return Err(Error::CmdlineLacks {
            what: cmdline::RESUME.into(),
            fix: "do not remove it with --append",
        });
    }
    let path = store.path.to_string_lossy();
    if next_c.value(cmdline::STORE) != Some(path.as_ref()) {
        return Err(Error::CmdlineLacks {
            what: format!("{}={path}", cmdline::STORE),
            fix: "set the store in /etc/kupgrade/config.toml, not on the command line",
        });
    }
    if store.kind != Kind::Pmem {
        return Ok(());
    }
    let kept = pmem_reservations(&next_c);
    for needed in pmem_reservations(&Cmdline::parse(running))
        .iter()
        .filter(|r| store_range.is_none_or(|s| r.overlaps(&s)))
    {
        if !kept
            .iter()
            .any(|k| k.start == needed.start && k.len >= needed.len)
        {
            return Err(Error::DropsReservation {
                kept: memmap_text(needed),
                store: store.path.clone(),
            });
        }
    }
    Ok(())
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
/// one-shot keys, plus `kupgrade.resume`, the store and the `modules`
/// kupgrade-init is to load after a distribution's initramfs.
pub fn compose_cmdline(
    running: &str,
    base: Option<&str>,
    append: Option<&str>,
    store: &Path,
    modules: &[String],
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
    if !modules.is_empty() {
        c.set(cmdline::MODULES, Some(&modules.join(",")));
    }
    c.to_string()
}

pub fn stage(cfg: &Config, req: &Request) -> Result<Staged, Error> {
    stage_on(&mut RealMachine, cfg, req)
}

/// [`stage`] on `machine`.
pub fn stage_on(machine: &mut dyn Machine, cfg: &Config, req: &Request) -> Result<Staged, Error> {
    // Opened once: what is checked here is what loads below.
    let kernel = kexec::Kernel::open(req.kernel)?;
    let release = kernel.image().release.clone();
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
    let choice = match (req.initrd, req.own_initramfs) {
        (None, false) => distro::choose(&mut distro::RealMachine, &release, &machine.run_dir())
            .map_err(|source| Error::Distro {
                release: release.clone(),
                source,
            })?,
        _ => Choice::OwnInitramfs,
    };
    let mut kind = InitramfsKind::Kupgrade;
    let mut built_with = None;
    // Loaded by kupgrade-init after the distribution's initramfs; kupgrade's
    // own has them in its load order.
    let mut chained_modules = Vec::new();
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
            chained_modules = needs.network.clone();
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
            let run_dir = machine.run_dir();
            fs::create_dir_all(&run_dir).map_err(Error::Record)?;
            let out = run_dir.join(format!("initrd-{release}.img"));
            let built = initramfs::build(&spec, &out)?;
            (out, built.bytes, built.modules.load_order.len())
        }
    };
    let running = machine.running_cmdline();
    let running = running.trim();
    let cmdline = compose_cmdline(
        running,
        req.cmdline,
        req.append,
        &store.path,
        &chained_modules,
    );
    let store_range = machine.store_range(&store);
    check_next_cmdline(running, &cmdline, &store, store_range)?;
    // From here on every load and unload is counted, ours included.
    machine.count_load_calls();
    // Replace whatever was staged before.
    if machine.kexec_loaded() {
        machine.unload()?;
    }
    machine.load(&kernel, &initrd, &cmdline)?;
    let load_calls_left = machine.load_calls_left();
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
        differences: notes.into_iter().cloned().collect(),
        boot_id: machine.boot_id(),
        load_calls_left,
    };
    staged.save_in(&machine.run_dir()).map_err(Error::Record)?;
    Ok(staged)
}

pub fn unstage() -> Result<(), Error> {
    kexec::unload()?;
    Staged::forget();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use kexec::sys::{self, SetupHeader};

    use super::*;

    /// A Debian kernel's setup code (kexec's fixture) made a whole
    /// "kernel" (its protected-mode size set to 0).
    fn kernel_bytes(release: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../kexec/tests/fixtures")
            .join(format!("vmlinuz-{release}.head"));
        let mut k = fs::read(path).unwrap();
        let at = sys::SETUP_HEADER_OFFSET + offset_of!(SetupHeader, syssize);
        k[at..at + 4].fill(0);
        k
    }

    /// Replaces the kernel file at `path` when asked to unload (between
    /// the check and the load), as a package upgrade might; records what
    /// it was given to load.
    struct Swapping {
        path: PathBuf,
        run_dir: PathBuf,
        loaded: Vec<(String, String)>,
        /// The kernel's count of load calls, once started.
        calls_left: Option<i64>,
    }

    impl Machine for Swapping {
        fn running_cmdline(&mut self) -> String {
            "BOOT_IMAGE=/vmlinuz root=/dev/vda console=ttyS0".into()
        }
        fn store_range(&mut self, _store: &Store) -> Option<Reserved> {
            None
        }
        fn kexec_loaded(&mut self) -> bool {
            true
        }
        fn unload(&mut self) -> Result<(), kexec::KexecError> {
            self.calls_left = self.calls_left.map(|n| n - 1);
            let tmp = self.path.with_extension("new");
            fs::write(&tmp, kernel_bytes("6.1.0-56-cloud-amd64")).unwrap();
            fs::rename(&tmp, &self.path).unwrap();
            Ok(())
        }
        fn load(
            &mut self,
            kernel: &kexec::Kernel,
            _initrd: &Path,
            cmdline: &str,
        ) -> Result<(), kexec::KexecError> {
            // What the kernel would read: the open file.
            let image = kexec::bzimage::read_file(kernel.file(), kernel.path())?;
            self.loaded.push((image.release, cmdline.to_string()));
            self.calls_left = self.calls_left.map(|n| n - 1);
            Ok(())
        }
        fn run_dir(&self) -> PathBuf {
            self.run_dir.clone()
        }
        fn boot_id(&mut self) -> String {
            "boot-1".into()
        }
        fn count_load_calls(&mut self) {
            self.calls_left = Some(100);
        }
        fn load_calls_left(&mut self) -> Option<i64> {
            self.calls_left
        }
    }

    #[test]
    fn the_kernel_loaded_is_the_file_that_was_checked() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("vmlinuz");
        fs::write(&path, kernel_bytes("6.1.0-47-cloud-amd64")).unwrap();
        let initrd = d.path().join("initrd.img");
        fs::write(&initrd, "").unwrap();
        let cfg = Config {
            store: format!("file:{}/store.img", d.path().display()),
            store_file_mib: 1,
            ..Config::default()
        };
        let mut m = Swapping {
            path: path.clone(),
            run_dir: d.path().join("run"),
            loaded: vec![],
            calls_left: None,
        };
        let req = Request {
            kernel: &path,
            initrd: Some(&initrd),
            append: None,
            cmdline: None,
            own_initramfs: false,
        };
        let staged = stage_on(&mut m, &cfg, &req).unwrap();
        assert_eq!(staged.release, "6.1.0-47-cloud-amd64");
        assert_eq!(m.loaded.len(), 1);
        assert_eq!(m.loaded[0].0, staged.release, "another file was loaded");
        assert!(m.loaded[0].1.contains("kupgrade.resume kupgrade.store="));
        let record = Staged::load_from(&d.path().join("run")).unwrap();
        // Counted from before the unload; recorded after the load.
        assert_eq!(record.load_calls_left, Some(98));
        assert_eq!(record.boot_id, "boot-1");
        assert_eq!(record.doubt(true, "boot-1", Some(98)), None);
        assert!(record.doubt(true, "boot-1", Some(97)).is_some());
    }

    fn pmem() -> Store {
        Store {
            path: "/dev/pmem0".into(),
            kind: Kind::Pmem,
            capacity: 256 << 20,
        }
    }

    const RUNNING: &str = "root=/dev/vda console=ttyS0 memmap=256M!512M";

    #[test]
    fn a_command_line_without_the_store_s_reservation_is_refused() {
        let store = pmem();
        let next = |base: Option<&str>, append: Option<&str>| {
            compose_cmdline(RUNNING, base, append, &store.path, &[])
        };
        let at = Some(Reserved {
            start: 512 << 20,
            len: 256 << 20,
        });
        // The running one's reservation is kept by default.
        check_next_cmdline(RUNNING, &next(None, None), &store, at).unwrap();
        check_next_cmdline(RUNNING, &next(None, Some("quiet")), &store, None).unwrap();
        // Written another way, or larger at the same address: fine.
        check_next_cmdline(
            RUNNING,
            &next(Some("root=/dev/vda memmap=0x10000000!0x20000000"), None),
            &store,
            at,
        )
        .unwrap();
        check_next_cmdline(
            RUNNING,
            &next(Some("root=/dev/vda memmap=64M!4G,512M!512M"), None),
            &store,
            at,
        )
        .unwrap();
        // Dropped by --cmdline, moved, shrunk, or replaced by --append.
        for bad in [
            next(Some("root=/dev/vda console=ttyS0"), None),
            next(Some("root=/dev/vda memmap=256M!1024M"), None),
            next(Some("root=/dev/vda memmap=128M!512M"), None),
            next(None, Some("memmap=64M!4G")),
        ] {
            for range in [at, None] {
                let e = check_next_cmdline(RUNNING, &bad, &store, range).unwrap_err();
                assert!(matches!(e, Error::DropsReservation { .. }), "{bad}: {e:?}");
                let text = e.to_string();
                assert!(
                    text.contains("memmap=256M!512M") && text.contains("/dev/pmem0"),
                    "{text}"
                );
            }
        }
        // Another reservation than the store's may go when the store's
        // range is known; when it is not, every one must stay.
        let two = "root=/dev/vda memmap=256M!512M memmap=64M!4G";
        let only_store = "root=/dev/vda memmap=256M!512M kupgrade.resume kupgrade.store=/dev/pmem0";
        check_next_cmdline(two, only_store, &store, at).unwrap();
        assert!(check_next_cmdline(two, only_store, &store, None).is_err());
        // A file store needs no reservation.
        let file = Store {
            path: "/var/lib/kupgrade/store.img".into(),
            kind: Kind::File,
            capacity: 1 << 20,
        };
        let c = compose_cmdline(RUNNING, Some("root=/dev/vda"), None, &file.path, &[]);
        check_next_cmdline(RUNNING, &c, &file, None).unwrap();
    }

    #[test]
    fn a_command_line_must_look_for_the_image_in_this_store() {
        let store = pmem();
        let e = check_next_cmdline(RUNNING, RUNNING, &store, None).unwrap_err();
        assert!(e.to_string().contains("kupgrade.resume"), "{e}");
        let elsewhere = format!("{RUNNING} kupgrade.resume kupgrade.store=/dev/pmem1");
        let e = check_next_cmdline(RUNNING, &elsewhere, &store, None).unwrap_err();
        assert!(e.to_string().contains("kupgrade.store=/dev/pmem0"), "{e}");
    }

    #[test]
    fn memmap_values_parse_as_the_kernel_reads_them() {
        let r = |s: &str| pmem_reservations(&Cmdline::parse(s));
        assert_eq!(
            r("memmap=256M!512M memmap=1G!0x100000000,4k!8K memmap=100M$0x1000 memmap=exactmap"),
            [
                Reserved {
                    start: 512 << 20,
                    len: 256 << 20
                },
                Reserved {
                    start: 1 << 32,
                    len: 1 << 30
                },
                Reserved {
                    start: 8 << 10,
                    len: 4 << 10
                },
            ]
        );
        assert!(r("memmap=256M!").is_empty() && r("memmap=!512M").is_empty());
        assert!(r("memmap=99999999999E!0").is_empty(), "overflow");
    }

    /// The modules for kupgrade-init after a distribution's initramfs
    /// replace those of the boot before, and are left out when there are none.
    #[test]
    fn cmdline_keeps_the_running_one_and_adds_resume_store_and_modules() {
        let running = "BOOT_IMAGE=/vmlinuz-old root=LABEL=r ro memmap=256M!512M kupgrade.resume \
            kupgrade.store=/dev/pmem9 kupgrade.modules=e1000";
        let modules = ["virtio_net".to_string(), "virtio_pci".to_string()];
        let c = compose_cmdline(
            running,
            None,
            Some("quiet foo=bar"),
            Path::new("/dev/pmem0"),
            &modules,
        );
        assert_eq!(c, "root=LABEL=r ro memmap=256M!512M quiet foo=bar kupgrade.resume kupgrade.store=/dev/pmem0 kupgrade.modules=virtio_net,virtio_pci");
        let c = compose_cmdline(running, None, None, Path::new("/dev/pmem0"), &[]);
        assert!(!c.contains("kupgrade.modules"), "{c}");
    }

    /// What a distribution's initramfs needs to assemble the root stays.
    #[test]
    fn cmdline_keeps_what_the_distribution_s_initramfs_needs() {
        let running = "BOOT_IMAGE=/vmlinuz-6.1.0-27-amd64 root=/dev/mapper/vg-root ro \
            rd.lvm.lv=vg/root rd.luks.uuid=luks-1234 rd.md.uuid=ab:cd resume=UUID=5678 \
            cryptdevice=UUID=1234:crypt quiet initrd=\\initrd.img";
        let c = compose_cmdline(running, None, None, Path::new("/dev/pmem0"), &[]);
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
            &[],
        );
        assert_eq!(
            c,
            "root=/dev/vda console=ttyS0 kupgrade.resume kupgrade.store=/s"
        );
    }
}
