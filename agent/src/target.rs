//! What differs between the running kernel and the one to stage, and what of
//! it stops a restore on the new one: how each stores its modules (and who
//! unpacks them), the modules the restore needs that the target lacks, and
//! whether this CRIU works on the target at all.
//!
//! Staging refuses only what would make the restore fail after the point of
//! no return; everything else is said and left to the user.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use initramfs::format::{self, ModuleFormat};
use initramfs::modules::{self, ModuleIndex};
use serde::{Deserialize, Serialize};

/// The first kernel series with the `[vvar_vclock]` mapping, and the first
/// CRIU release that knows it: older CRIU fails `criu check` there.
const VVAR_VCLOCK_KERNEL: (u32, u32) = (6, 13);
const VVAR_VCLOCK_CRIU: (u32, u32) = (4, 1);

/// One kernel, as far as the restore cares.
#[derive(Debug)]
pub struct Kernel {
    pub release: String,
    /// Its `/lib/modules/<release>` index; `None` when it is not installed.
    pub modules: Option<ModuleIndex>,
    /// Its `/boot/config-<release>`.
    pub config: Option<String>,
}

impl Kernel {
    /// The installed kernel `release`: its modules and its config.
    pub fn installed(release: &str) -> Kernel {
        Kernel::at(
            release,
            &PathBuf::from(format!("/lib/modules/{release}")),
            &PathBuf::from(format!("/boot/config-{release}")),
        )
    }

    pub fn at(release: &str, modules_dir: &Path, config: &Path) -> Kernel {
        Kernel {
            release: release.to_string(),
            modules: ModuleIndex::open(modules_dir).ok(),
            config: fs::read_to_string(config).ok(),
        }
    }

    /// How its modules are stored and who unpacks them, in a few words.
    pub fn module_format(&self) -> String {
        let Some(index) = &self.modules else {
            return "unknown (no modules installed)".into();
        };
        let formats: Vec<ModuleFormat> = index.formats().into_iter().collect();
        let in_kernel = format::in_kernel_decompression(self.config.as_deref());
        let names: Vec<&str> = formats.iter().map(|f| f.name()).collect();
        let mut text = if names.is_empty() {
            "none".to_string()
        } else {
            names.join("+")
        };
        if formats.iter().any(|f| f.is_compressed()) {
            text.push_str(match in_kernel {
                Some(f) if formats.contains(&f) => ", unpacked by the kernel itself",
                _ if self.config.is_none() => {
                    ", unpacked by kupgrade (no kernel config to say the kernel can)"
                }
                _ => {
                    ", unpacked by kupgrade (the kernel cannot: no CONFIG_MODULE_DECOMPRESS for it)"
                }
            });
        }
        text
    }

    /// Has `name` as a module or built in; `None` when its modules are
    /// not installed.
    fn has(&self, name: &str) -> Option<bool> {
        let index = self.modules.as_ref()?;
        Some(index.contains(name) || index.is_builtin(name))
    }
}

/// What the restore on the target will need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// The image is in a pmem store: the nvdimm stack must come up.
    pub pmem: bool,
    /// The modules that drive the root's device, from the running kernel.
    pub root_storage: Vec<String>,
    /// The modules that drive the network interfaces the restore configures.
    pub network: Vec<String>,
    /// Workloads hold TCP connections: CRIU's network lock needs nf_tables.
    pub tcp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// Said, for the record.
    Note,
    /// Said: something may not work, but the restore does not depend on it.
    Warn,
    /// Staging is refused: the restore would fail after the point of no return.
    Refuse,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub level: Level,
    pub text: String,
    /// What to do about it (a warning or a refusal).
    pub fix: Option<String>,
}

impl Finding {
    /// The finding and its fix, for one line.
    pub fn sentence(&self) -> String {
        match &self.fix {
            Some(fix) => format!("{}: {fix}", self.text),
            None => self.text.clone(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Note => "note",
            Level::Warn => "warn",
            Level::Refuse => "REFUSED",
        };
        write!(f, "{tag}: {}", self.sentence())
    }
}

fn note(text: String) -> Finding {
    Finding {
        level: Level::Note,
        text,
        fix: None,
    }
}

fn finding(level: Level, text: String, fix: &str) -> Finding {
    Finding {
        level,
        text,
        fix: Some(fix.to_string()),
    }
}

/// Compares `running` with `target` for a restore that `needs` what it
/// needs, with CRIU `criu_version` (`None`: not found).
pub fn compare(
    running: &Kernel,
    target: &Kernel,
    needs: &Needs,
    criu_version: Option<&str>,
) -> Vec<Finding> {
    let mut out = vec![note(format!(
        "modules of {}: {}; of {}: {}",
        running.release,
        running.module_format(),
        target.release,
        target.module_format()
    ))];
    out.extend(missing_modules(target, needs));
    out.push(criu_support(&target.release, criu_version));
    out
}

fn missing_modules(target: &Kernel, needs: &Needs) -> Vec<Finding> {
    let mut required: Vec<(&str, &str)> = Vec::new();
    if needs.pmem {
        for m in modules::PMEM_MODULES {
            required.push((m, "the image's pmem store"));
        }
    }
    for m in &needs.root_storage {
        required.push((m, "the root's storage"));
    }
    for m in &needs.network {
        if !needs.root_storage.contains(m) {
            required.push((m, "the network interfaces"));
        }
    }
    if needs.tcp {
        required.push(("nf_tables", "CRIU's lock of the workloads' TCP connections"));
    }
    let mut out = Vec::new();
    for (m, why) in required {
        match target.has(m) {
            Some(true) => {}
            Some(false) => out.push(finding(
                Level::Refuse,
                format!(
                    "{} has no {m} module, which {why} needs: the restore would fail after the kexec",
                    target.release
                ),
                "stage a kernel that has it (or has it built in)",
            )),
            None => {
                out.push(finding(
                    Level::Refuse,
                    format!(
                        "{} has no modules installed (/lib/modules/{})",
                        target.release, target.release
                    ),
                    "install its package completely",
                ));
                return out;
            }
        }
    }
    // CRIU needs these to dump sockets; the restore can do without them.
    let optional: Vec<&str> = modules::CRIU_MODULES
        .iter()
        .copied()
        .filter(|m| *m != "nf_tables" || !needs.tcp)
        .filter(|m| target.has(m) == Some(false))
        .collect();
    if !optional.is_empty() {
        out.push(finding(
            Level::Warn,
            format!(
                "{} lacks {}: CRIU cannot dump such sockets on it",
                target.release,
                optional.join(", ")
            ),
            "a later upgrade away from it refuses workloads that hold them; stage a kernel that has them if that matters",
        ));
    }
    out
}

/// `6.12.117+deb12-cloud-amd64` -> (6, 12); `3.17.1` -> (3, 17).
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn criu_support(release: &str, criu_version: Option<&str>) -> Finding {
    let Some(kernel) = major_minor(release) else {
        return finding(
            Level::Warn,
            format!("cannot tell the version of {release}: CRIU support on it is not checked"),
            "make sure the installed CRIU supports it",
        );
    };
    let Some(criu) = criu_version.and_then(major_minor) else {
        return finding(
            Level::Warn,
            format!(
                "CRIU {}: cannot tell whether it supports {release}",
                criu_version.unwrap_or("not found")
            ),
            "install CRIU (apt-get install criu)",
        );
    };
    let criu_text = criu_version.unwrap_or_default();
    if kernel >= VVAR_VCLOCK_KERNEL && criu < VVAR_VCLOCK_CRIU {
        return Finding {
            level: Level::Refuse,
            text: format!(
                "CRIU {criu_text} cannot restore on {release}: kernels from {}.{} on have the \
                 [vvar_vclock] mapping, which CRIU knows from {}.{} on",
                VVAR_VCLOCK_KERNEL.0, VVAR_VCLOCK_KERNEL.1, VVAR_VCLOCK_CRIU.0, VVAR_VCLOCK_CRIU.1,
            ),
            fix: Some(format!(
                "install CRIU {}.{} or newer, or stage a kernel older than {}.{}",
                VVAR_VCLOCK_CRIU.0, VVAR_VCLOCK_CRIU.1, VVAR_VCLOCK_KERNEL.0, VVAR_VCLOCK_KERNEL.1,
            )),
        };
    }
    note(format!(
        "CRIU {criu_text} supports {release} as far as kupgrade knows"
    ))
}

/// The modules that drive the device holding `/` (the disk's driver, then
/// its bus's), from sysfs. Empty when the root is not a block device.
pub fn root_storage_modules() -> Vec<String> {
    let sys = Path::new("/sys");
    match fs::metadata("/") {
        Ok(m) => {
            let (major, minor) = (
                nix::sys::stat::major(m.dev()),
                nix::sys::stat::minor(m.dev()),
            );
            drivers_of(sys, &sys.join(format!("dev/block/{major}:{minor}")))
        }
        Err(_) => Vec::new(),
    }
}

/// The modules that drive the network interfaces backed by a device (not
/// loopback, bridges or other virtual ones), with their buses', from sysfs.
pub fn network_modules() -> Vec<String> {
    network_modules_in(Path::new("/sys"))
}

fn network_modules_in(sys: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(sys.join("class/net"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for m in drivers_of(sys, &e.path().join("device")) {
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    out
}

/// The module of each driver bound to `device` or one of its ancestors in
/// the sysfs at `sys` (a `driver/module` link), nearest first. Built-in
/// drivers have the link too, which is what tells a 6.12 `virtio_pci`
/// (built in) is needed as a module on 6.1.
fn drivers_of(sys: &Path, device: &Path) -> Vec<String> {
    let Ok(mut dir) = fs::canonicalize(device) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while dir.starts_with(sys) && dir != sys {
        if let Ok(module) = fs::read_link(dir.join("driver/module")) {
            if let Some(name) = module.file_name() {
                let name = modules::normalise(&name.to_string_lossy());
                if !out.contains(&name) {
                    out.push(name);
                }
            }
        }
        if !dir.pop() {
            break;
        }
    }
    out
}

/// The release of the running kernel.
pub fn running_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The module names the restore needs, for the initramfs.
pub fn needed_names(needs: &Needs) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = needs
        .root_storage
        .iter()
        .chain(&needs.network)
        .cloned()
        .collect();
    if needs.pmem {
        names.extend(modules::PMEM_MODULES.iter().map(|s| s.to_string()));
    }
    if needs.tcp {
        names.insert("nf_tables".into());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A kernel whose modules directory lists `modules` (with `suffix`) and
    /// `builtin`, with `config`.
    fn kernel(
        dir: &Path,
        release: &str,
        suffix: &str,
        modules: &[&str],
        builtin: &[&str],
        config: Option<&str>,
    ) -> Kernel {
        let mods = dir.join(release);
        fs::create_dir_all(&mods).unwrap();
        let dep: String = modules
            .iter()
            .map(|m| format!("kernel/x/{m}{suffix}:\n"))
            .collect();
        fs::write(mods.join("modules.dep"), dep).unwrap();
        let bi: String = builtin
            .iter()
            .map(|m| format!("kernel/y/{m}.ko\n"))
            .collect();
        fs::write(mods.join("modules.builtin"), bi).unwrap();
        let cfg = dir.join(format!("config-{release}"));
        if let Some(c) = config {
            fs::write(&cfg, c).unwrap();
        }
        Kernel::at(release, &mods, &cfg)
    }

    const ALL: &[&str] = &[
        "libnvdimm",
        "nd_btt",
        "nd_pmem",
        "nd_e820",
        "virtio_blk",
        "virtio_net",
        "nf_tables",
        "inet_diag",
        "tcp_diag",
        "udp_diag",
        "unix_diag",
        "netlink_diag",
        "af_packet_diag",
    ];
    const XZ_IN_KERNEL: &str = "CONFIG_MODULE_COMPRESS_XZ=y\nCONFIG_MODULE_DECOMPRESS=y\n";

    fn needs() -> Needs {
        Needs {
            pmem: true,
            root_storage: vec!["virtio_blk".into(), "virtio_pci".into()],
            network: vec!["virtio_net".into(), "virtio_pci".into()],
            tcp: true,
        }
    }

    fn refusals(f: &[Finding]) -> Vec<&str> {
        f.iter()
            .filter(|f| f.level == Level::Refuse)
            .map(|f| f.text.as_str())
            .collect()
    }

    /// 6.1 (plain .ko, virtio_pci a module) to 6.12 (.ko.xz unpacked by the
    /// kernel, virtio_pci built in): said, nothing refused.
    #[test]
    fn the_lts_jump_is_described_and_allowed() {
        let d = tempfile::tempdir().unwrap();
        let mut with_pci = ALL.to_vec();
        with_pci.push("virtio_pci");
        let old = kernel(
            d.path(),
            "6.1.0-57-cloud-amd64",
            ".ko",
            &with_pci,
            &[],
            Some(""),
        );
        let new = kernel(
            d.path(),
            "6.12.117+deb12-cloud-amd64",
            ".ko.xz",
            ALL,
            &["virtio_pci"],
            Some(XZ_IN_KERNEL),
        );
        let f = compare(&old, &new, &needs(), Some("3.17.1"));
        assert_eq!(refusals(&f), Vec::<&str>::new());
        assert_eq!(
            f[0].text,
            "modules of 6.1.0-57-cloud-amd64: plain; of 6.12.117+deb12-cloud-amd64: xz, unpacked by the kernel itself"
        );
        assert_eq!(f.last().unwrap().level, Level::Note);
        assert!(f
            .last()
            .unwrap()
            .text
            .starts_with("CRIU 3.17.1 supports 6.12.117"));
        // And back: nothing refused either.
        assert!(refusals(&compare(&new, &old, &needs(), Some("3.17.1"))).is_empty());
    }

    #[test]
    fn who_unpacks_compressed_modules_is_said() {
        let d = tempfile::tempdir().unwrap();
        let zst = kernel(d.path(), "a", ".ko.zst", ALL, &[], Some(XZ_IN_KERNEL));
        assert_eq!(
            zst.module_format(),
            "zstd, unpacked by kupgrade (the kernel cannot: no CONFIG_MODULE_DECOMPRESS for it)"
        );
        let no_config = kernel(d.path(), "b", ".ko.gz", ALL, &[], None);
        assert_eq!(
            no_config.module_format(),
            "gzip, unpacked by kupgrade (no kernel config to say the kernel can)"
        );
        let absent = Kernel::at("c", &d.path().join("none"), &d.path().join("none"));
        assert_eq!(absent.module_format(), "unknown (no modules installed)");
    }

    /// Each module the restore needs, missing from the target, is refused
    /// by name and reason; the diag modules only warn.
    #[test]
    fn a_target_without_a_needed_module_is_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let old = kernel(d.path(), "old", ".ko", ALL, &["virtio_pci"], Some(""));
        for (gone, why) in [
            ("nd_pmem", "the image's pmem store"),
            ("virtio_blk", "the root's storage"),
            ("virtio_net", "the network interfaces"),
            ("nf_tables", "CRIU's lock of the workloads' TCP connections"),
        ] {
            let rest: Vec<&str> = ALL.iter().copied().filter(|m| *m != gone).collect();
            let new = kernel(
                d.path(),
                &format!("new-{gone}"),
                ".ko",
                &rest,
                &["virtio_pci"],
                None,
            );
            let f = compare(&old, &new, &needs(), Some("3.17.1"));
            let r = refusals(&f);
            assert_eq!(r.len(), 1, "{gone}: {f:?}");
            assert!(
                r[0].starts_with(&format!(
                    "new-{gone} has no {gone} module, which {why} needs"
                )),
                "{}",
                r[0]
            );
        }
        // Without TCP connections, nf_tables is only a warning; a missing
        // diag module always is.
        let rest: Vec<&str> = ALL
            .iter()
            .copied()
            .filter(|m| !["nf_tables", "unix_diag"].contains(m))
            .collect();
        let new = kernel(d.path(), "new-diag", ".ko", &rest, &["virtio_pci"], None);
        let quiet = Needs {
            tcp: false,
            ..needs()
        };
        let f = compare(&old, &new, &quiet, Some("3.17.1"));
        assert!(refusals(&f).is_empty(), "{f:?}");
        let warn = f.iter().find(|f| f.level == Level::Warn).unwrap();
        assert!(warn
            .text
            .starts_with("new-diag lacks unix_diag, nf_tables: CRIU cannot dump"));
        // A target with no modules at all is refused once, with the fix.
        let bare = Kernel::at("bare", &d.path().join("none"), &d.path().join("none"));
        let r = compare(&old, &bare, &needs(), Some("3.17.1"));
        assert_eq!(
            refusals(&r),
            ["bare has no modules installed (/lib/modules/bare)"]
        );
        let bare = r.iter().find(|f| f.level == Level::Refuse).unwrap();
        assert_eq!(
            bare.to_string(),
            "REFUSED: bare has no modules installed (/lib/modules/bare): install its package completely"
        );
    }

    /// CRIU older than 4.1 on 6.13+ ([vvar_vclock]): refused, with the way
    /// out; 6.12 and CRIU 4.1 on 6.13 are fine.
    #[test]
    fn a_kernel_criu_cannot_restore_on_is_refused_with_a_way_out() {
        let cases = [
            ("6.13.2-amd64", "3.17.1", Level::Refuse),
            ("6.18.0-1-cloud-amd64", "4.0", Level::Refuse),
            ("6.12.117+deb12-cloud-amd64", "3.17.1", Level::Note),
            ("6.13.2-amd64", "4.1", Level::Note),
            ("7.0.0", "4.2.1", Level::Note),
        ];
        for (release, criu, level) in cases {
            let f = criu_support(release, Some(criu));
            assert_eq!(f.level, level, "{release} with CRIU {criu}: {f}");
        }
        let f = criu_support("6.13.2-amd64", Some("3.17.1"));
        assert!(f.text.contains("[vvar_vclock]"), "{f}");
        assert_eq!(
            f.fix.as_deref(),
            Some("install CRIU 4.1 or newer, or stage a kernel older than 6.13")
        );
        assert_eq!(criu_support("6.13.2", None).level, Level::Warn);
        assert_eq!(criu_support("6.13.2", Some("unknown")).level, Level::Warn);
        assert_eq!(criu_support("vmlinuz", Some("3.17.1")).level, Level::Warn);
    }

    /// The root on virtio-blk and eth0 on virtio-net, both over virtio-pci:
    /// each device's drivers, nearest first; virtual interfaces have none.
    #[test]
    fn the_drivers_of_the_root_and_the_interfaces_are_read_from_sysfs() {
        let d = tempfile::tempdir().unwrap();
        let sys = &fs::canonicalize(d.path()).unwrap();
        let pci = sys.join("devices/pci0000:00");
        let bind = |dev: &Path, driver: &str| {
            let drv = sys.join(format!("bus/x/drivers/{driver}"));
            fs::create_dir_all(&drv).unwrap();
            fs::create_dir_all(sys.join(format!("module/{driver}"))).unwrap();
            let _ = symlink(sys.join(format!("module/{driver}")), drv.join("module"));
            fs::create_dir_all(dev).unwrap();
            symlink(&drv, dev.join("driver")).unwrap();
        };
        bind(&pci.join("0000:00:04.0"), "virtio_pci");
        bind(&pci.join("0000:00:04.0/virtio2"), "virtio_blk");
        bind(&pci.join("0000:00:03.0"), "virtio_pci");
        bind(&pci.join("0000:00:03.0/virtio1"), "virtio_net");
        let disk = pci.join("0000:00:04.0/virtio2/block/vda");
        fs::create_dir_all(disk.join("vda1")).unwrap();
        fs::create_dir_all(sys.join("dev/block")).unwrap();
        symlink(disk.join("vda1"), sys.join("dev/block/254:1")).unwrap();
        assert_eq!(
            drivers_of(sys, &sys.join("dev/block/254:1")),
            ["virtio_blk", "virtio_pci"]
        );
        assert!(drivers_of(sys, &sys.join("dev/block/8:1")).is_empty());
        let net = sys.join("class/net");
        fs::create_dir_all(net.join("lo")).unwrap();
        fs::create_dir_all(net.join("eth0")).unwrap();
        symlink(pci.join("0000:00:03.0/virtio1"), net.join("eth0/device")).unwrap();
        assert_eq!(network_modules_in(sys), ["virtio_net", "virtio_pci"]);
    }
}
