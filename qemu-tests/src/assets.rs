//! Guest assets, reproducible from Debian's packages and this workspace:
//! kernels (`apt-get download` + `dpkg-deb -x` + `depmod -b`), the static
//! kupgrade binaries, the first boot's initramfs (built by the same code as
//! `kupgrade stage`), and the root file system as an ext4 image made with
//! `mkfs.ext4 -d` (no loop mounts). Everything is cached under the cache
//! directory, keyed by its inputs.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use initramfs::modules::ModuleIndex;

use crate::progress;

pub const ROOT_LABEL: &str = "kupgrade-root";
/// Guest paths of the project's binaries.
pub const GUEST_BIN_DIR: &str = "/usr/lib/kupgrade-vm";
pub const GUEST_INIT_BINARY: &str = "/usr/lib/kupgrade/kupgrade-init";

/// Bump when the layout of the root file system changes, to rebuild it.
const ROOTFS_LAYOUT_VERSION: u32 = 3;

/// Bump when the way packages are installed changes, to rebuild the images
/// that have packages (and only those).
const PACKAGE_INSTALL_VERSION: u32 = 2;

/// Host programs copied into the guest with the libraries they load.
const HOST_PROGRAMS: &[&str] = &["/usr/sbin/criu", "/usr/sbin/nft", "/usr/bin/ip"];

/// Modules the first boot needs for this virtual machine's devices; the
/// initramfs builder adds kupgrade's own (CRIU's diag modules, pmem).
pub const VM_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net"];

/// Static binaries built from this workspace for the guest, besides the
/// test workloads (every `wl-*`).
pub const GUEST_BINARIES: &[&str] = &["kupgrade", "kupgrade-init", "kupgrade-guest"];

/// The test workloads and checkers built into `bin_dir`, sorted.
pub(crate) fn workload_binaries(bin_dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(bin_dir)
        .with_context(|| format!("no guest binaries in {}", bin_dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wl-") && !n.ends_with(".d"))
        .collect();
    v.sort();
    Ok(v)
}

pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    pub fn new(root: PathBuf) -> Result<Self> {
        fs::create_dir_all(&root)
            .with_context(|| format!("cannot create the cache {}", root.display()))?;
        Ok(Cache { root })
    }

    pub fn kernel_dir(&self, release: &str) -> PathBuf {
        self.root.join("kernels").join(release)
    }

    pub fn vmlinuz(&self, release: &str) -> PathBuf {
        self.kernel_dir(release)
            .join("boot")
            .join(format!("vmlinuz-{release}"))
    }

    pub fn modules_dir(&self, release: &str) -> PathBuf {
        self.kernel_dir(release).join("lib/modules").join(release)
    }
}

/// Runs `cmd` and returns its stdout; a failure says what ran and its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| {
        format!("cannot run {cmd:?}: is it installed? (scripts/setup installs it)")
    })?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Version-aware ordering: `6.1.0-9` < `6.1.0-47`.
fn version_key(s: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut num = String::new();
    let mut text = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !text.is_empty() {
                out.push((0, std::mem::take(&mut text)));
            }
            num.push(c);
        } else {
            if !num.is_empty() {
                out.push((num.parse().unwrap_or(0), String::new()));
                num.clear();
            }
            text.push(c);
        }
    }
    if !num.is_empty() {
        out.push((num.parse().unwrap_or(0), String::new()));
    }
    if !text.is_empty() {
        out.push((0, text));
    }
    out
}

fn package_of(release: &str) -> String {
    format!("linux-image-{release}-unsigned")
}

/// The `.deb` of `package` that `apt-get download` left in `debs`
/// (`NAME_VERSION_ARCH.deb`).
fn find_deb(debs: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(debs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
}

/// Releases of `series` that Debian has as cloud kernels, oldest first.
pub fn available_releases(series: &str, cache: &Cache) -> Result<Vec<String>> {
    let pattern = format!(
        "^linux-image-{}.*-cloud-amd64-unsigned$",
        series.replace('.', "\\.")
    );
    let mut releases: Vec<String> =
        match run(Command::new("apt-cache").args(["search", "--names-only", &pattern])) {
            Ok(out) => out
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter_map(|p| {
                    p.strip_prefix("linux-image-")?
                        .strip_suffix("-unsigned")
                        .map(str::to_string)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
    if releases.is_empty() {
        // Offline: what is already unpacked in the cache.
        releases = fs::read_dir(cache.root.join("kernels"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|r| r.starts_with(series) && r.ends_with("-cloud-amd64"))
            .collect();
    }
    if releases.is_empty() {
        bail!("no {series} cloud kernels found by apt-cache: run `apt-get update` (scripts/setup does)");
    }
    releases.sort_by_key(|r| version_key(r));
    releases.dedup();
    Ok(releases)
}

/// Turns `oldest`, `previous`, `latest` or an exact release into a release.
pub fn resolve_release(wanted: &str, series: &str, cache: &Cache) -> Result<String> {
    if !["oldest", "previous", "latest"].contains(&wanted) {
        return Ok(wanted.to_string());
    }
    let all = available_releases(series, cache)?;
    let pick = match wanted {
        "oldest" => all.first(),
        "latest" => all.last(),
        _ => all.len().checked_sub(2).and_then(|i| all.get(i)),
    };
    pick.cloned()
        .with_context(|| format!("no {wanted} release among {all:?}"))
}

/// Downloads and unpacks one kernel release, with `modules.dep` generated.
pub fn ensure_kernel(cache: &Cache, release: &str) -> Result<()> {
    let dir = cache.kernel_dir(release);
    if dir.join(".complete").exists() {
        return Ok(());
    }
    progress::step(&format!("kernel {release}: downloading and unpacking"));
    let debs = cache.root.join("debs");
    fs::create_dir_all(&debs)?;
    let pkg = package_of(release);
    let find_deb = || find_deb(&debs, &pkg);
    if find_deb().is_none() {
        run(Command::new("apt-get")
            .arg("download")
            .arg(&pkg)
            .current_dir(&debs))
        .with_context(|| {
            format!("cannot download {pkg}: is the release right, and did apt-get update run?")
        })?;
    }
    let deb = find_deb()
        .with_context(|| format!("apt-get download left no {pkg}_*.deb in {}", debs.display()))?;
    // Not with_extension: every 6.1.0-N release would unpack into "6.1.partial".
    let tmp = dir.with_file_name(format!("{release}.partial"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    run(Command::new("depmod").arg("-b").arg(&tmp).arg(release))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir)?;
    fs::write(dir.join(".complete"), "")?;
    Ok(())
}

/// The `.deb` of one kernel release, downloaded if it is not yet (callers
/// that run at once hold one lock: `apt-get download` writes in place).
pub fn kernel_deb(cache: &Cache, release: &str) -> Result<PathBuf> {
    let debs = cache.root.join("debs");
    fs::create_dir_all(&debs)?;
    let pkg = package_of(release);
    if let Some(deb) = find_deb(&debs, &pkg) {
        return Ok(deb);
    }
    run(Command::new("apt-get")
        .arg("download")
        .arg(&pkg)
        .current_dir(&debs))
    .with_context(|| format!("cannot download {pkg}"))?;
    find_deb(&debs, &pkg).with_context(|| format!("apt-get download left no {pkg}_*.deb"))
}

/// Builds the static guest binaries of this workspace and returns their directory.
pub fn build_guest_binaries(workspace: &Path) -> Result<PathBuf> {
    progress::step("building static kupgrade binaries for the guest (scripts/static-binaries)");
    let out = Command::new("bash")
        .arg(workspace.join("scripts/static-binaries"))
        .current_dir(workspace)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run scripts/static-binaries")?;
    if !out.status.success() {
        bail!("building the static guest binaries failed");
    }
    let printed = String::from_utf8_lossy(&out.stdout);
    let dir = printed
        .lines()
        .next_back()
        .context("scripts/static-binaries printed no directory")?;
    Ok(PathBuf::from(dir))
}

/// Builds the first boot's initramfs for `release` with the same code as
/// `kupgrade stage`. It is written aside and renamed into place: a guest
/// of another scenario may be starting from the one there now.
pub fn build_initramfs(cache: &Cache, bin_dir: &Path, release: &str) -> Result<PathBuf> {
    let out = cache.root.join(format!("initrd-{release}.img"));
    let tmp = out.with_extension("partial");
    let modules_dir = cache.modules_dir(release);
    let index = ModuleIndex::open(&modules_dir)?;
    let vm: Vec<String> = VM_MODULES.iter().map(|s| s.to_string()).collect();
    let config = fs::read_to_string(
        cache
            .kernel_dir(release)
            .join(format!("boot/config-{release}")),
    )
    .ok();
    let spec = initramfs::Spec {
        release: release.to_string(),
        modules_dir,
        init_binary: bin_dir.join("kupgrade-init"),
        modules: initramfs::wanted_modules(&vm, &index, true)
            .into_iter()
            .chain(vm.clone())
            .collect(),
        compression: initramfs::Compression::for_kernel_config(config.as_deref()),
        kernel_decompresses: initramfs::format::in_kernel_decompression(config.as_deref()),
    };
    let built = initramfs::build(&spec, &tmp)?;
    if !built.modules.missing.is_empty() {
        let _ = fs::remove_file(&tmp);
        bail!(
            "release {release} lacks modules {:?} that the guest needs",
            built.modules.missing
        );
    }
    fs::rename(&tmp, &out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
    Ok(out)
}

/// Everything that decides the root file system's content.
pub struct RootfsInputs<'a> {
    pub releases: &'a [String],
    pub bin_dir: &'a Path,
    pub packages: &'a [String],
}

/// Builds (or reuses) the guest's root file system image.
pub fn ensure_rootfs(cache: &Cache, inputs: &RootfsInputs) -> Result<PathBuf> {
    let key = rootfs_key(inputs)?;
    let dir = cache.root.join("rootfs");
    // Images with other packages or kernels are kept: scenarios alternate
    // between them, and run at the same time from them.
    let packages = if inputs.packages.is_empty() {
        "base".to_string()
    } else {
        inputs.packages.join("+")
    };
    let flavour = format!("{packages}-{}", releases_tag(inputs.releases));
    let img = dir.join(format!("root-{flavour}-{key}.img"));
    if img.exists() {
        return Ok(img);
    }
    progress::step(&format!("building the guest root file system ({key})"));
    fs::create_dir_all(&dir)?;
    let tree = dir.join(format!("tree-{key}"));
    let _ = fs::remove_dir_all(&tree);
    populate(cache, inputs, &tree)?;
    let tmp = img.with_extension("partial");
    let size_mib = dir_size(&tree) / (1 << 20) * 5 / 4 + 160;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", ROOT_LABEL, "-d"])
        .arg(&tree)
        .arg(&tmp)
        .arg(format!("{size_mib}M")))?;
    fs::rename(&tmp, &img)?;
    let _ = fs::remove_dir_all(&tree);
    // Older images only take space.
    for e in fs::read_dir(&dir)?.flatten() {
        if e.path() != img
            && e.file_name()
                .to_string_lossy()
                .starts_with(&format!("root-{flavour}-"))
        {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(img)
}

/// A short name for a set of kernel releases, in image names.
fn releases_tag(releases: &[String]) -> String {
    let mut h = blake3::Hasher::new();
    for r in releases {
        h.update(r.as_bytes());
        h.update(b"\0");
    }
    format!("k{}", &h.finalize().to_hex()[..8])
}

fn rootfs_key(inputs: &RootfsInputs) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(&ROOTFS_LAYOUT_VERSION.to_le_bytes());
    for r in inputs.releases {
        h.update(r.as_bytes());
    }
    if !inputs.packages.is_empty() {
        h.update(&PACKAGE_INSTALL_VERSION.to_le_bytes());
    }
    for p in inputs.packages {
        h.update(p.as_bytes());
    }
    for b in GUEST_BINARIES
        .iter()
        .map(|s| s.to_string())
        .chain(workload_binaries(inputs.bin_dir)?)
    {
        let path = inputs.bin_dir.join(&b);
        h.update(
            &fs::read(&path).with_context(|| format!("missing guest binary {}", path.display()))?,
        );
    }
    for p in HOST_PROGRAMS.iter().chain(&["/usr/bin/busybox"]) {
        h.update(
            &fs::read(p)
                .with_context(|| format!("missing {p}: install it (scripts/setup does)"))?,
        );
    }
    Ok(h.finalize().to_hex()[..16].to_string())
}

pub(crate) fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

fn copy(from: &Path, to: &Path, mode: Option<u32>) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Shared libraries a dynamically linked program loads, from `ldd`.
fn libraries(program: &str) -> Result<BTreeSet<PathBuf>> {
    let out = run(Command::new("ldd").arg(program))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

fn populate(cache: &Cache, inputs: &RootfsInputs, root: &Path) -> Result<()> {
    // A merged-/usr layout, as Debian 12 has.
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib64",
        "usr/lib/modules",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var/tmp",
        "var/log",
        "var/lib/kupgrade",
        "var/lib/kupgrade-vm",
        "root",
        "boot",
        "mnt",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        symlink(target, root.join(link))?;
    }
    copy(
        Path::new("/usr/bin/busybox"),
        &root.join("usr/bin/busybox"),
        None,
    )?;
    let applets = run(Command::new("/usr/bin/busybox").arg("--list"))?;
    for applet in applets.lines() {
        let link = root.join("usr/bin").join(applet);
        if !link.exists() && applet != "init" {
            symlink("busybox", link)?;
        }
    }
    let mut libs = BTreeSet::new();
    for p in HOST_PROGRAMS {
        let name = Path::new(p).file_name().context("program path")?;
        copy(Path::new(p), &root.join("usr/sbin").join(name), None)?;
        libs.extend(libraries(p)?);
    }
    for lib in libs {
        let name = lib.file_name().context("library path")?;
        let dest = if lib.starts_with("/lib64") {
            root.join("usr/lib64").join(name)
        } else {
            root.join("usr/lib/x86_64-linux-gnu").join(name)
        };
        copy(&lib, &dest, None)?;
    }
    let bin = inputs.bin_dir;
    copy(&bin.join("kupgrade"), &root.join("usr/sbin/kupgrade"), None)?;
    copy(
        &bin.join("kupgrade-init"),
        &root.join(GUEST_INIT_BINARY.trim_start_matches('/')),
        None,
    )?;
    for b in workload_binaries(bin)?
        .iter()
        .chain(&["kupgrade-guest".to_string()])
    {
        copy(
            &bin.join(b),
            &root.join(GUEST_BIN_DIR.trim_start_matches('/')).join(b),
            None,
        )?;
    }
    symlink(
        format!("{GUEST_BIN_DIR}/kupgrade-guest"),
        root.join("usr/sbin/init"),
    )?;
    for r in inputs.releases {
        let kdir = cache.kernel_dir(r);
        for f in [
            format!("vmlinuz-{r}"),
            format!("config-{r}"),
            format!("System.map-{r}"),
        ] {
            copy(
                &kdir.join("boot").join(&f),
                &root.join("boot").join(&f),
                None,
            )?;
        }
        let status = Command::new("cp")
            .arg("-a")
            .arg(cache.modules_dir(r))
            .arg(root.join("usr/lib/modules"))
            .status()?;
        if !status.success() {
            bail!("cannot copy the modules of {r}");
        }
    }
    install_packages(cache, inputs.packages, root)?;
    let etc = root.join("etc");
    fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(etc.join("group"), "root:x:0:\ntty:x:5:\n")?;
    fs::write(etc.join("hostname"), "kupgrade-guest\n")?;
    fs::write(
        etc.join("hosts"),
        "127.0.0.1 localhost\n10.0.2.15 kupgrade-guest\n",
    )?;
    fs::create_dir_all(etc.join("kupgrade"))?;
    fs::write(etc.join("kupgrade/config.toml"), guest_config())?;
    Ok(())
}

/// The guest's /etc/kupgrade/config.toml: the store the scenario reserves.
pub(crate) fn guest_config() -> String {
    format!(
        "# written by kupgrade-vm\nstore = \"/dev/pmem0\"\ninit_binary = \"{GUEST_INIT_BINARY}\"\n"
    )
}

/// Packages only their maintainer scripts need; nothing runs those here.
const PACKAGING_ONLY: &[&str] = &[
    "adduser",
    "cdebconf",
    "debconf",
    "dpkg",
    "install-info",
    "lsb-base",
    "passwd",
    "perl",
    "perl-base",
    "perl-modules-5.36",
    "sysvinit-utils",
    "tar",
    "libdebian-installer4",
    "libnewt0.52",
    "libslang2",
    "libtextwrap1",
];

/// Refuses a package Debian does not have, before anything is built.
pub fn check_packages(packages: &[String]) -> Result<()> {
    for p in packages {
        let ok = Command::new("apt-cache")
            .args(["show", "--no-all-versions", p])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            bail!("package {p:?} is not in Debian's package lists (check the name; run apt-get update)");
        }
    }
    Ok(())
}

/// Unpacks `packages` and their dependencies into the guest. Maintainer
/// scripts do not run: scenarios start the daemons themselves.
fn install_packages(cache: &Cache, packages: &[String], root: &Path) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    progress::step(&format!(
        "installing {} and their dependencies",
        packages.join(", ")
    ));
    let closure = run(Command::new("apt-cache")
        .args([
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
        ])
        .args(["--no-replaces", "--no-enhances"])
        .args(packages))?;
    let names: BTreeSet<String> = closure
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .map(|l| l.trim().to_string())
        .filter(|n| !PACKAGING_ONLY.contains(&n.as_str()))
        .collect();
    let debs = cache.root.join("debs");
    fs::create_dir_all(&debs)?;
    let find = |name: &str| find_deb(&debs, name);
    let missing: Vec<&String> = names.iter().filter(|n| find(n).is_none()).collect();
    if !missing.is_empty() {
        run(Command::new("apt-get")
            .arg("download")
            .args(&missing)
            .current_dir(&debs))?;
    }
    let keep = appliance_paths();
    for name in &names {
        let deb = find(name).with_context(|| format!("apt-get download left no {name}_*.deb"))?;
        let tmp = root.with_extension(format!("pkg-{name}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        for kept in install_tree(&tmp, root, &keep)? {
            progress::step(&format!(
                "package {name}: kept the appliance's /{} (not replaced by the package's)",
                kept.display()
            ));
        }
        fs::remove_dir_all(&tmp)?;
    }
    Ok(())
}

/// Guest paths (relative to `/`) of the appliance's own tools, which no
/// package replaces: busybox and its `sh`, the programs the harness and
/// kupgrade run (`ip`, `nft`, `criu`), kupgrade's binaries, the init, and
/// the merged-/usr links.
fn appliance_paths() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = [
        "usr/bin/busybox",
        "usr/bin/sh",
        "usr/sbin/kupgrade",
        "usr/sbin/init",
        "bin",
        "sbin",
        "lib",
        "lib64",
        GUEST_BIN_DIR.trim_start_matches('/'),
        GUEST_INIT_BINARY.trim_start_matches('/'),
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    for p in HOST_PROGRAMS {
        if let Some(name) = Path::new(p).file_name() {
            v.push(Path::new("usr/sbin").join(name));
        }
    }
    v
}

/// Resolves `guest` (relative to the guest's `/`) inside `root` as a chroot
/// would: symbolic links are followed within `root` (an absolute target
/// starts again at `root`, `..` stops there), never into the host's tree.
fn resolve_in_root(root: &Path, guest: &Path) -> Option<PathBuf> {
    // Names and `..`, in order; `/` and `.` say nothing here.
    fn steps(p: &Path) -> impl Iterator<Item = std::ffi::OsString> + '_ {
        p.components().filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
    }
    use std::path::Component;
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: std::collections::VecDeque<std::ffi::OsString> = steps(guest).collect();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let here: PathBuf = root
            .iter()
            .chain(resolved.iter().map(|s| s.as_os_str()))
            .collect();
        let next = here.join(&c);
        if next.is_symlink() {
            hops += 1;
            // The kernel's own limit on links in one lookup.
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(&next).ok()?;
            if target.is_absolute() {
                resolved.clear();
            }
            let mut parts: Vec<std::ffi::OsString> = steps(&target).collect();
            parts.extend(pending.drain(..));
            pending = parts.into();
        } else {
            resolved.push(c);
        }
    }
    Some(
        root.iter()
            .chain(resolved.iter().map(|s| s.as_os_str()))
            .collect(),
    )
}

/// Installs the unpacked package tree `pkg` into the guest tree `root` as
/// dpkg would: directories merge (following the guest's own links, such as
/// `/bin` -> `usr/bin`, inside `root`), and a file or link of the package
/// replaces what is at its path instead of writing through it (the
/// appliance's `/usr/bin` holds busybox's applet links: copying over them
/// would overwrite busybox). Paths in `keep` are left as they are; returns
/// those the package would have replaced.
fn install_tree(pkg: &Path, root: &Path, keep: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut kept = Vec::new();
    install_dir(pkg, root, Path::new(""), keep, &mut kept)?;
    Ok(kept)
}

fn install_dir(
    src: &Path,
    root: &Path,
    guest_dir: &Path,
    keep: &[PathBuf],
    kept: &mut Vec<PathBuf>,
) -> Result<()> {
    use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(src)
        .with_context(|| format!("cannot read {}", src.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let from = e.path();
        let meta = fs::symlink_metadata(&from)?;
        let guest = guest_dir.join(e.file_name());
        let dest = root.join(&guest);
        let dest_meta = fs::symlink_metadata(&dest).ok();
        let owner = |p: &Path| {
            // Only root can give files away; as another user they stay ours,
            // as with `cp -a`.
            let _ = lchown(p, Some(meta.uid()), Some(meta.gid()));
        };
        if meta.is_dir() {
            if dest_meta.as_ref().is_some_and(|m| m.is_dir()) {
                install_dir(&from, root, &guest, keep, kept)?;
                continue;
            }
            if dest_meta
                .as_ref()
                .is_some_and(|m| m.file_type().is_symlink())
            {
                // A directory link of the guest (`/lib` -> `usr/lib`): merge
                // into where it points, inside the guest.
                if let Some(real) = resolve_in_root(root, &guest) {
                    if real.is_dir() && !real.is_symlink() {
                        let inside = real.strip_prefix(root).unwrap_or(&guest).to_path_buf();
                        install_dir(&from, root, &inside, keep, kept)?;
                        continue;
                    }
                }
            }
            if dest_meta.is_some() {
                if keep.iter().any(|k| guest.starts_with(k)) {
                    kept.push(guest);
                    continue;
                }
                fs::remove_file(&dest)
                    .with_context(|| format!("cannot replace {}", dest.display()))?;
            }
            fs::create_dir(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
            owner(&dest);
            fs::set_permissions(&dest, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            install_dir(&from, root, &guest, keep, kept)?;
            continue;
        }
        if keep.iter().any(|k| guest.starts_with(k)) {
            if dest_meta.is_some() {
                kept.push(guest);
            }
            continue;
        }
        match &dest_meta {
            Some(m) if m.is_dir() => {
                // A package file where the guest has a directory: dpkg
                // refuses too; keep the directory.
                kept.push(guest);
                continue;
            }
            Some(_) => fs::remove_file(&dest)
                .with_context(|| format!("cannot replace {}", dest.display()))?,
            None => {}
        }
        if meta.file_type().is_symlink() {
            symlink(fs::read_link(&from)?, &dest)
                .with_context(|| format!("cannot create the link {}", dest.display()))?;
            owner(&dest);
        } else if meta.is_file() {
            fs::copy(&from, &dest)
                .with_context(|| format!("cannot copy {} to {}", from.display(), dest.display()))?;
            owner(&dest);
            // After the owner: chown clears the set-id bits.
            fs::set_permissions(&dest, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        } else {
            bail!(
                "{} is not a file, a link or a directory: Debian packages ship none of those",
                from.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root images of other kernels have other names: building one does
    /// not remove the one a scenario of the other kernels is running from.
    #[test]
    fn root_images_of_other_kernels_are_named_apart() {
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = releases_tag(&r(&["6.1.0-9-cloud-amd64", "6.1.0-40-cloud-amd64"]));
        assert_eq!(
            a,
            releases_tag(&r(&["6.1.0-9-cloud-amd64", "6.1.0-40-cloud-amd64"]))
        );
        assert_ne!(
            a,
            releases_tag(&r(&["6.1.0-40-cloud-amd64", "6.12.38+deb12-cloud-amd64"]))
        );
        // Not the same as one release spelled across two.
        assert_ne!(
            releases_tag(&r(&["ab", "c"])),
            releases_tag(&r(&["a", "bc"]))
        );
    }

    #[test]
    fn releases_sort_by_version_not_text() {
        let mut v = vec![
            "6.1.0-9-cloud-amd64",
            "6.1.0-47-cloud-amd64",
            "6.1.0-10-cloud-amd64",
        ];
        v.sort_by_key(|r| version_key(r));
        assert_eq!(
            v,
            [
                "6.1.0-9-cloud-amd64",
                "6.1.0-10-cloud-amd64",
                "6.1.0-47-cloud-amd64"
            ]
        );
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap()
    }

    /// The appliance's shape: merged /usr, busybox with its applet links,
    /// the appliance's own `ip`.
    fn appliance(root: &Path) {
        write(&root.join("usr/bin/busybox"), "busybox");
        for applet in ["sh", "ps", "ip", "kill"] {
            symlink("busybox", root.join("usr/bin").join(applet)).unwrap();
        }
        write(&root.join("usr/sbin/ip"), "appliance ip");
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        for (link, target) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")] {
            symlink(target, root.join(link)).unwrap();
        }
    }

    #[test]
    fn package_files_replace_busybox_links_and_keep_the_appliance_tools() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (root, pkg) = (dir.path().join("root"), dir.path().join("pkg"));
        appliance(&root);
        // As procps and iproute2 ship them (pre-merged-/usr paths).
        write(&pkg.join("bin/ps"), "procps ps");
        fs::set_permissions(pkg.join("bin/ps"), fs::Permissions::from_mode(0o755)).unwrap();
        write(&pkg.join("bin/kill"), "procps kill");
        write(&pkg.join("bin/ip"), "iproute2 ip");
        fs::create_dir_all(pkg.join("sbin")).unwrap();
        symlink("/bin/ip", pkg.join("sbin/ip")).unwrap();
        symlink("dash", pkg.join("bin/sh")).unwrap();
        write(&pkg.join("usr/bin/busybox"), "another busybox");
        write(&pkg.join("lib/x86_64-linux-gnu/libproc2.so.0"), "lib");

        let kept = install_tree(&pkg, &root, &appliance_paths()).unwrap();

        let bin = root.join("usr/bin");
        assert_eq!(
            read(&bin.join("busybox")),
            "busybox",
            "busybox was overwritten"
        );
        assert_eq!(fs::read_link(bin.join("sh")).unwrap(), Path::new("busybox"));
        for (tool, text) in [
            ("ps", "procps ps"),
            ("kill", "procps kill"),
            ("ip", "iproute2 ip"),
        ] {
            let p = bin.join(tool);
            assert!(!p.is_symlink(), "{tool} is still a link");
            assert_eq!(read(&p), text);
        }
        assert_eq!(
            fs::metadata(bin.join("ps")).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(read(&root.join("usr/sbin/ip")), "appliance ip");
        assert_eq!(
            read(&root.join("usr/lib/x86_64-linux-gnu/libproc2.so.0")),
            "lib"
        );
        for link in ["bin", "sbin", "lib"] {
            assert!(root.join(link).is_symlink(), "/{link} is no longer a link");
        }
        let mut kept: Vec<String> = kept.iter().map(|p| p.display().to_string()).collect();
        kept.sort();
        assert_eq!(kept, ["usr/bin/busybox", "usr/bin/sh", "usr/sbin/ip"]);
    }

    #[test]
    fn links_are_followed_inside_the_guest_tree_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("run")).unwrap();
        fs::create_dir_all(root.join("var")).unwrap();
        // Absolute, and escaping with `..`: both mean the guest's /run.
        symlink("/run", root.join("var/run")).unwrap();
        symlink("../../../../../run", root.join("var/lock")).unwrap();
        assert_eq!(
            resolve_in_root(&root, Path::new("var/run/x")).unwrap(),
            root.join("run/x")
        );
        assert_eq!(
            resolve_in_root(&root, Path::new("var/lock")).unwrap(),
            root.join("run")
        );
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(resolve_in_root(&root, Path::new("loop/x")), None);

        let pkg = dir.path().join("pkg");
        write(&pkg.join("var/run/daemon/socket.d/README"), "inside");
        install_tree(&pkg, &root, &[]).unwrap();
        assert_eq!(read(&root.join("run/daemon/socket.d/README")), "inside");
        assert!(root.join("var/run").is_symlink());
    }

    #[test]
    fn exact_releases_are_taken_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().into()).unwrap();
        assert_eq!(
            resolve_release("6.1.0-47-cloud-amd64", "6.1.0", &cache).unwrap(),
            "6.1.0-47-cloud-amd64"
        );
    }
}
