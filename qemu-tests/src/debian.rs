//! The Debian 12 guest flavour (`[guest] flavour = "debian"`): a server as
//! Debian installs one. systemd is PID 1, udev and initramfs-tools run, the
//! root is a logical volume that the distribution's initramfs assembles, and
//! the kernels are installed with `apt-get` inside the guest, so that their
//! maintainer scripts, `/etc/kernel/postinst.d` hooks and `update-initramfs`
//! run as on a real machine. QEMU boots the kernel and initramfs found in the
//! guest's own `/boot`.
//!
//! With `initramfs = "dracut"` the same guest has Debian's `dracut` package
//! in place of initramfs-tools (they conflict): dracut's kernel hook
//! (`/etc/kernel/postinst.d/dracut`) builds the kernels' images, and its
//! `update-initramfs` trigger rebuilds them all when kupgrade's package is
//! installed. The two bases have their own names and keys, and coexist.
//!
//! Built in three cached steps, each keyed by its inputs:
//! 1. **base**: `mmdebstrap` makes the tree from Debian's archive and
//!    `mkfs.ext4 -d` turns it into an image. It depends only on Debian (the
//!    package list, the kernels, this layout), so it is kept in a cache shared
//!    by every clone ([`shared_cache_dir`]).
//! 2. **disk**: a short QEMU boot of the base's own kernel and initramfs, with
//!    `init=` the guest script `assemble-root`, makes the volume group and
//!    the root volume on a new disk, copies the base in and adds the
//!    harness's layer (the agent, the workloads, and kupgrade's package,
//!    installed there with `dpkg -i`). No host kernel
//!    feature is needed: the host has no device-mapper and takes no loop
//!    mounts.
//! 3. **boot files**: the kernels and initramfs images are read back from the
//!    disk's root volume with `debugfs`.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::fcntl::{Flock, FlockArg};

use crate::assets::{self, Cache};
use crate::progress;
use crate::scenario::Initramfs;

/// The root volume as the kernel command line names it (LVM doubles the
/// dash of the volume group `kupgrade-vg`).
pub const ROOT_DEVICE: &str = "/dev/mapper/kupgrade--vg-root";

/// Kernel parameters of this flavour, besides the console and the store:
/// a Debian server's root, mounted read-only until systemd remounts it from
/// fstab; classic interface names, which the agent and the network file use.
pub const KERNEL_ARGS: &str =
    "root=/dev/mapper/kupgrade--vg-root ro net.ifnames=0 systemd.show_status=error";

/// Where the root file system starts on the disk: the volume group's first
/// extent (`pvcreate --dataalignment 1m`); `assemble-root` checks it.
const ROOT_OFFSET: u64 = 1 << 20;

/// Bump when what the build puts into the base changes, to rebuild it.
const LAYOUT_VERSION: u32 = 1;

const SUITE: &str = "bookworm";
/// The archive the base comes from; 6.1 kernels newer than the point release
/// are in the security suite.
const SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

/// Installed on top of Debian's essential packages (without Recommends),
/// with the initramfs generator's package in place of initramfs-tools
/// ([`base_packages`]).
const BASE_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "initramfs-tools",
    "lvm2",
    "e2fsprogs",
    "kmod",
    "criu",
    "nftables",
    "iproute2",
    // What Ansible needs on a managed host (its modules, its apt module):
    // the fleet scenarios share this base.
    "openssh-server",
    "python3",
    "python3-apt",
];

/// dpkg keeps none of these: the guest stays small and quick to copy.
const DPKG_OPTIONS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
];

/// Units that get in the way or only cost boot time under emulation: the
/// serial console's login prompt (agetty's vhangup() cuts the agent's output
/// on the same line), gettys on virtual terminals the VM has no display for,
/// the ext4 scrub, and periodic jobs that would fire at random in a run.
const MASKED_UNITS: &[&str] = &[
    "serial-getty@ttyS0.service",
    "getty-static.service",
    "getty@tty1.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
];

/// Guest files of this flavour, from `qemu-tests/guest/debian/`.
const ASSEMBLE_ROOT: &str = include_str!("../guest/debian/assemble-root");
const FSTAB: &str = include_str!("../guest/debian/fstab");
const NETWORK: &str = include_str!("../guest/debian/eth0.network");
const AGENT_UNIT: &str = include_str!("../guest/debian/kupgrade-guest.service");
const ASSEMBLE_ROOT_GUEST: &str = "/usr/lib/kupgrade-vm/assemble-root";

fn base_packages(initramfs: Initramfs) -> Vec<&'static str> {
    let mut packages: Vec<&str> = BASE_PACKAGES
        .iter()
        .map(|&p| {
            if p == Initramfs::InitramfsTools.package() {
                initramfs.package()
            } else {
                p
            }
        })
        .collect();
    if initramfs == Initramfs::InitramfsTools {
        // initramfs-tools compresses with zstd when it is installed, as on
        // a Debian server with Recommends; gzip costs minutes under TCG.
        packages.push("zstd");
    }
    packages
}

/// Files of the base tree, written before the packages are configured (so
/// that `update-initramfs` already sees the fstab): (guest path, mode, text).
fn base_files(initramfs: Initramfs) -> Vec<(&'static str, u32, String)> {
    let mut files = vec![
        ("etc/fstab", 0o644, FSTAB.into()),
        ("etc/systemd/network/10-eth0.network", 0o644, NETWORK.into()),
    ];
    // dracut, in its default (not host-only) mode, takes no resume device
    // without resume= on the command line.
    if initramfs == Initramfs::InitramfsTools {
        // No swap to resume from; initramfs-tools would look for one.
        files.push((
            "etc/initramfs-tools/conf.d/resume",
            0o644,
            "RESUME=none\n".into(),
        ));
    }
    files.push((
        ASSEMBLE_ROOT_GUEST.trim_start_matches('/'),
        0o755,
        ASSEMBLE_ROOT.into(),
    ));
    files
}

/// The generator's lister, which prints one line per file ending with its
/// path (`lsinitrd` in `ls -l` form).
fn lister(initramfs: Initramfs) -> &'static str {
    match initramfs {
        Initramfs::InitramfsTools => "lsinitramfs",
        Initramfs::Dracut => "lsinitrd",
    }
}

const HOSTNAME: &str = "kupgrade-debian";

/// Fixed file times of the tree and the layer (mmdebstrap, tar), so that the
/// same inputs give the same files: 2025-05-20, the archive snapshot the
/// build machines' sources name.
const SOURCE_DATE_EPOCH: u64 = 1_747_699_200;

/// Everything that decides the guest's content.
pub struct Inputs<'a> {
    /// Every kernel release the scenario boots; the first boots the helper.
    pub releases: &'a [String],
    pub bin_dir: &'a Path,
    /// kupgrade's package ([`build_package`]).
    pub package: &'a Path,
    /// The scenario's extra packages, installed with the base.
    pub packages: &'a [String],
    pub initramfs: Initramfs,
    /// QEMU and its accelerator, for the helper boot.
    pub qemu: &'a str,
    pub accel: &'a str,
}

/// A built guest: the disk to copy for a run and what QEMU boots.
pub struct Guest {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The cache shared by all clones, for what depends on Debian alone:
/// `$KUPGRADE_VM_DEBIAN_CACHE`, else `$XDG_CACHE_HOME/kupgrade-vm/debian`,
/// else `~/.cache/kupgrade-vm/debian`, else `debian/` in the run cache.
pub fn shared_cache_dir(cache: &Cache) -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = env("KUPGRADE_VM_DEBIAN_CACHE") {
        return d.into();
    }
    let base = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")));
    match base {
        Some(b) => b.join("kupgrade-vm/debian"),
        None => cache.root.join("debian"),
    }
}

/// The root file system inside a disk, as debugfs opens it (e2fsprogs reads
/// `?offset=` in a device name).
pub fn root_fs(disk: &Path) -> PathBuf {
    PathBuf::from(format!("{}?offset={ROOT_OFFSET}", disk.display()))
}

/// Builds (or reuses) the guest for `inputs`; `boot` is the release QEMU
/// starts with.
pub fn ensure(cache: &Cache, inputs: &Inputs, boot: &str) -> Result<Guest> {
    let extra = extra_packages(inputs.initramfs, inputs.packages);
    let inputs = &Inputs {
        packages: &extra,
        ..*inputs
    };
    let shared = shared_cache_dir(cache);
    let base = ensure_base(&shared, inputs)?;
    let own = cache.root.join("debian");
    let flavour = flavour_name(inputs.initramfs, inputs.packages);
    // One lock per flavour: scenarios of different flavours assemble their
    // disks side by side, those of the same flavour wait for one disk.
    let _lock = lock(&own, &flavour)?;
    let (disk, key) = ensure_disk(&own, &base, inputs)?;
    let boot_dir = own.join(format!("boot-{flavour}-{key}"));
    ensure_boot_files(&disk, &boot_dir, inputs.releases)?;
    remove_older(&own, &format!("boot-{flavour}-"), &key);
    Ok(Guest {
        disk,
        kernel: boot_dir.join(format!("vmlinuz-{boot}")),
        initrd: boot_dir.join(format!("initrd.img-{boot}")),
    })
}

/// Waits for and holds the lock `name` of a cache directory while what it
/// names is built.
fn lock(dir: &Path, name: &str) -> Result<Flock<File>> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{name}.lock"));
    let file = File::create(&path).with_context(|| format!("cannot open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("cannot lock {}", path.display()))
}

fn hex_key(h: blake3::Hasher) -> String {
    h.finalize().to_hex()[..16].to_string()
}

/// The scenario's packages that the base lacks, sorted: a scenario that
/// names only packages of the base shares its image.
fn extra_packages(initramfs: Initramfs, packages: &[String]) -> Vec<String> {
    let base = base_packages(initramfs);
    let mut extra: Vec<String> = packages
        .iter()
        .filter(|p| !base.contains(&p.as_str()))
        .cloned()
        .collect();
    extra.sort();
    extra.dedup();
    extra
}

/// Names images with the scenario's extra packages and the initramfs
/// generator apart, as the appliance does: scenarios alternate between them.
fn flavour_name(initramfs: Initramfs, packages: &[String]) -> String {
    let mut parts: Vec<&str> = match initramfs {
        Initramfs::InitramfsTools => vec![],
        Initramfs::Dracut => vec!["dracut"],
    };
    parts.extend(packages.iter().map(String::as_str));
    if parts.is_empty() {
        "base".into()
    } else {
        parts.join("+")
    }
}

/// Removes what earlier builds left under `prefix` (images, logs, boot
/// files) except the build keyed `key`: they only take space.
fn remove_older(dir: &Path, prefix: &str, key: &str) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && !name.contains(key) {
            let p = e.path();
            let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
        }
    }
}

struct Base {
    image: PathBuf,
    key: String,
}

fn kernel_packages(releases: &[String]) -> Vec<String> {
    releases
        .iter()
        .map(|r| format!("linux-image-{r}-unsigned"))
        .collect()
}

fn base_key(inputs: &Inputs) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&LAYOUT_VERSION.to_le_bytes());
    h.update(&SOURCE_DATE_EPOCH.to_le_bytes());
    let packages = base_packages(inputs.initramfs);
    for list in [&[SUITE], SOURCES, &packages, DPKG_OPTIONS, MASKED_UNITS] {
        for s in list {
            h.update(s.as_bytes());
            h.update(b"\0");
        }
    }
    for s in inputs
        .packages
        .iter()
        .chain(&kernel_packages(inputs.releases))
    {
        h.update(s.as_bytes());
        h.update(b"\0");
    }
    for (path, mode, text) in base_files(inputs.initramfs) {
        h.update(path.as_bytes());
        h.update(&mode.to_le_bytes());
        h.update(text.as_bytes());
    }
    hex_key(h)
}

/// `'text'` for sh, for paths in mmdebstrap's hooks.
fn quoted(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

fn ensure_base(shared: &Path, inputs: &Inputs) -> Result<Base> {
    let key = base_key(inputs);
    let flavour = flavour_name(inputs.initramfs, inputs.packages);
    let image = shared.join(format!("base-{flavour}-{key}.img"));
    if image.exists() {
        return Ok(Base { image, key });
    }
    let _lock = lock(shared, "build")?;
    if image.exists() {
        // Another run built it while this one waited.
        return Ok(Base { image, key });
    }
    let started = Instant::now();
    progress::step(&format!(
        "building the Debian {SUITE} base with {} ({key}) with mmdebstrap in {}",
        inputs.initramfs.package(),
        shared.display()
    ));
    let work = shared.join(format!("work-{key}"));
    let _ = fs::remove_dir_all(&work);
    let overlay = work.join("overlay");
    for (path, mode, text) in base_files(inputs.initramfs) {
        write_file(&overlay.join(path), mode, &text)?;
    }
    let lists = work.join("initramfs-lists");
    fs::create_dir_all(&lists)?;
    let archives = shared.join("archives");
    fs::create_dir_all(&archives)?;
    let tree = work.join("tree");
    let log = shared.join(format!("mmdebstrap-{flavour}-{key}.log"));
    let mut cmd = Command::new("mmdebstrap");
    cmd.env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string())
        .arg("--variant=apt")
        .arg(format!(
            "--include={}",
            base_packages(inputs.initramfs)
                .iter()
                .map(|s| s.to_string())
                .chain(inputs.packages.iter().cloned())
                .collect::<Vec<_>>()
                .join(",")
        ));
    for o in DPKG_OPTIONS {
        cmd.arg(format!("--dpkgopt={o}"));
    }
    // Keep the downloaded packages between builds (mmdebstrap's own recipe).
    cmd.args(["--skip=download/empty", "--skip=essential/unlink"])
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives")
        .arg(format!(
            "--setup-hook=sync-in {} /var/cache/apt/archives/",
            quoted(&archives)
        ))
        .arg(format!("--essential-hook=sync-in {} /", quoted(&overlay)));
    // The kernels last, on a configured system, as `apt install` on a server:
    // their postinst runs update-initramfs (or dracut's kernel hook) with
    // lvm2 and udev in place.
    cmd.arg(format!(
        "--customize-hook=chroot \"$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}",
        kernel_packages(inputs.releases).join(" ")
    ));
    for r in inputs.releases {
        cmd.arg(format!(
            "--customize-hook=chroot \"$1\" {} /boot/initrd.img-{r} > {}",
            lister(inputs.initramfs),
            quoted(&lists.join(r))
        ));
    }
    cmd.arg("--customize-hook=chroot \"$1\" systemctl enable systemd-networkd.service")
        .arg(format!(
            "--customize-hook=chroot \"$1\" systemctl mask {}",
            MASKED_UNITS.join(" ")
        ))
        // A machine has its identity from the start: an empty machine-id
        // would make every run a first boot, with presets applied anew.
        .arg(format!(
            "--customize-hook=echo {} > \"$1\"/etc/machine-id",
            machine_id(&key)
        ))
        .arg(format!(
            "--customize-hook=echo {HOSTNAME} > \"$1\"/etc/hostname"
        ))
        .arg(format!(
            "--customize-hook=printf '127.0.0.1 localhost\\n10.0.2.15 {HOSTNAME}\\n' > \"$1\"/etc/hosts"
        ))
        .arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {}",
            quoted(&archives)
        ))
        .arg(SUITE)
        .arg(&tree)
        .args(SOURCES);
    run_logged(&mut cmd, &log).context("mmdebstrap failed to build the Debian guest")?;
    for r in inputs.releases {
        check_initramfs(inputs.initramfs, r, &lists.join(r))?;
    }
    let manifest = shared.join(format!("base-{flavour}-{key}.packages"));
    let versions = assets::run(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                tree.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f", "${Package} ${Version}\\n"]),
    )?;
    fs::write(&manifest, versions)?;
    let used = assets::dir_size(&tree);
    // Room for logs, a package or two and their initramfs images.
    let size_mib = (used / (1 << 20) * 5 / 4 + 512).div_ceil(4) * 4;
    let uuid = uuid_of(&key);
    let tmp = image.with_extension("partial");
    assets::run(
        Command::new("mkfs.ext4")
            .env("E2FSPROGS_FAKE_TIME", SOURCE_DATE_EPOCH.to_string())
            .args(["-q", "-F", "-L", "kupgrade-debian", "-U", &uuid])
            .arg("-E")
            .arg(format!("hash_seed={uuid}"))
            .arg("-d")
            .arg(&tree)
            .arg(&tmp)
            .arg(format!("{size_mib}M")),
    )?;
    fs::rename(&tmp, &image)?;
    let _ = fs::remove_dir_all(&work);
    remove_older(shared, &format!("base-{flavour}-"), &key);
    remove_older(shared, &format!("mmdebstrap-{flavour}-"), &key);
    progress::step(&format!(
        "Debian base built in {:.0} s ({} MiB in use, image {size_mib} MiB; packages in {})",
        started.elapsed().as_secs_f64(),
        used >> 20,
        manifest.display()
    ));
    Ok(Base { image, key })
}

/// What an initramfs needs to assemble the LVM root, as its generator lays
/// it out: LVM, device-mapper, the disk driver and the udev rules that
/// activate the volume group. initramfs-tools also copies LVM's
/// configuration (not a `.dpkg-new` left from an unfinished install);
/// dracut, not host-only, leaves it out and LVM uses its built-in defaults.
fn lvm_root_files(initramfs: Initramfs) -> &'static [&'static str] {
    match initramfs {
        Initramfs::InitramfsTools => &[
            "usr/sbin/lvm",
            "etc/lvm/lvm.conf",
            "/dm-mod.ko",
            "/virtio_blk.ko",
            "udev/rules.d/69-lvm.rules",
        ],
        Initramfs::Dracut => &[
            "usr/sbin/lvm",
            "/dm-mod.ko",
            "/virtio_blk.ko",
            "udev/rules.d/64-lvm.rules",
            "bin/lvm_scan",
        ],
    }
}

/// The initramfs that the generator made in the guest can assemble the root
/// ([`lvm_root_files`]).
fn check_initramfs(initramfs: Initramfs, release: &str, list: &Path) -> Result<()> {
    let text = fs::read_to_string(list).with_context(|| {
        format!(
            "the guest made no /boot/initrd.img-{release}: did {} run?",
            match initramfs {
                Initramfs::InitramfsTools => "update-initramfs",
                Initramfs::Dracut => "dracut's kernel hook",
            }
        )
    })?;
    let has = |suffix: &str| text.lines().map(uncompressed).any(|l| l.ends_with(suffix));
    for &want in lvm_root_files(initramfs) {
        ensure!(
            has(want),
            "/boot/initrd.img-{release} lacks {want}: it cannot assemble the LVM root (list in {})",
            list.display()
        );
    }
    Ok(())
}

/// A listed module's path without the compression 6.12's modules have
/// (`dm-mod.ko.xz` is `dm-mod.ko`); other paths as they are.
fn uncompressed(path: &str) -> &str {
    [".xz", ".zst", ".gz"]
        .iter()
        .find_map(|ext| path.strip_suffix(ext).filter(|p| p.ends_with(".ko")))
        .unwrap_or(path)
}

fn machine_id(key: &str) -> String {
    blake3::hash(format!("machine-id {key}").as_bytes()).to_hex()[..32].to_string()
}

fn uuid_of(key: &str) -> String {
    let h = blake3::hash(format!("root uuid {key}").as_bytes()).to_hex();
    let h = h.as_str();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn write_file(path: &Path, mode: u32, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Runs a long command with its output in `log`; on failure, its tail.
fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| {
            format!("cannot run {cmd:?}: is it installed? (scripts/setup installs it)")
        })?;
    if !status.success() {
        bail!("{status}; the end of {}:\n{}", log.display(), tail(log, 20));
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The harness's files, as the appliance gets them: the agent (PID 1 there,
/// a systemd unit here), the test workloads and their checkers.
fn install_agent(layer: &Path, bin_dir: &Path) -> Result<()> {
    let dir = layer.join(assets::GUEST_BIN_DIR.trim_start_matches('/'));
    fs::create_dir_all(&dir)?;
    for b in assets::workload_binaries(bin_dir)?
        .iter()
        .map(String::as_str)
        .chain(["kupgrade-guest"])
    {
        copy(&bin_dir.join(b), &dir.join(b))?;
    }
    write_file(
        &layer.join("etc/systemd/system/kupgrade-guest.service"),
        0o644,
        AGENT_UNIT,
    )
}

/// Where the package waits in the layer for its `dpkg -i`.
const PACKAGE_IN_LAYER: &str = "var/cache/kupgrade-vm/kupgrade.deb";

/// The file kupgrade's hooks write into an initramfs (the agent's
/// `distro::MARKER`), as the listers print it.
const HOOK_MARKER: &str = "usr/lib/kupgrade/initramfs-hook";

/// The releases whose initramfs the package's `update-initramfs` trigger
/// rebuilds: initramfs-tools updates the newest only (`update-initramfs -u`),
/// dracut's trigger every installed kernel's.
fn rebuilt_by_trigger(initramfs: Initramfs, releases: &[String]) -> &[String] {
    match initramfs {
        Initramfs::InitramfsTools => releases
            .len()
            .checked_sub(1)
            .map_or(&[], |i| &releases[i..]),
        Initramfs::Dracut => releases,
    }
}

/// kupgrade as a server gets it: its package, installed with `dpkg -i` in
/// the new root, so that its trigger rebuilds the kernels' initramfs images
/// with kupgrade's hook (checked there, [`rebuilt_by_trigger`]). The
/// harness's config goes in first and is kept (`--force-confold`), as an
/// administrator's would be.
fn install_kupgrade(
    layer: &Path,
    package: &Path,
    inputs: &Inputs,
    setup: &mut String,
) -> Result<()> {
    copy(package, &layer.join(PACKAGE_IN_LAYER))?;
    write_file(
        &layer.join("etc/kupgrade/config.toml"),
        0o644,
        &assets::guest_config(),
    )?;
    if inputs.initramfs == Initramfs::InitramfsTools {
        // Images with the modules this machine needs, not most of them: an
        // administrator's choice that the distribution supports, and under
        // TCG minutes less per image. In the layer, not the base: mmdebstrap
        // installs the kernels on the host, whose root is not the guest's.
        write_file(
            &layer.join("etc/initramfs-tools/conf.d/kupgrade-vm-modules"),
            0o644,
            "# kupgrade-vm: the modules this machine needs.\nMODULES=dep\n",
        )?;
    }
    if inputs.initramfs == Initramfs::Dracut {
        // Host-only images, as Fedora and RHEL make by default: generic ones
        // take many minutes each under TCG. The helper boot runs no udev,
        // so host-only detection cannot see the LVM root: named here.
        write_file(
            &layer.join("etc/dracut.conf.d/50-kupgrade-vm-hostonly.conf"),
            0o644,
            "# kupgrade-vm: images for this machine only.\nhostonly=\"yes\"\nadd_dracutmodules+=\" lvm \"\nforce_drivers+=\" virtio_pci virtio_blk dm_mod \"\n",
        )?;
    }
    writeln!(
        setup,
        "dpkg -i --force-confdef --force-confold /{PACKAGE_IN_LAYER}\nrm /{PACKAGE_IN_LAYER}"
    )?;
    // Releases sort by version here: inputs.releases is sorted, and Debian's
    // release names compare as their versions do.
    for r in rebuilt_by_trigger(inputs.initramfs, inputs.releases) {
        writeln!(
            setup,
            "{} /boot/initrd.img-{r} | grep -q '{HOOK_MARKER}$' || {{ echo 'kupgrade-vm-assemble: /boot/initrd.img-{r} has no kupgrade hook after dpkg -i kupgrade.deb'; exit 1; }}",
            lister(inputs.initramfs)
        )?;
    }
    Ok(())
}

/// Builds kupgrade's package (`scripts/package`) from `workspace`, with
/// the static binaries in `bin_dir`, and returns it:
/// `target/debian/kupgrade_*_amd64.deb`.
pub fn build_package(workspace: &Path, bin_dir: &Path) -> Result<PathBuf> {
    progress::step("building the kupgrade package (scripts/package)");
    let bin_dir = bin_dir
        .canonicalize()
        .with_context(|| format!("no guest binaries in {}", bin_dir.display()))?;
    let status = Command::new("bash")
        .arg(workspace.join("scripts/package"))
        .env("KUPGRADE_BIN_DIR", &bin_dir)
        .current_dir(workspace)
        .status()
        .context("cannot run scripts/package")?;
    ensure!(status.success(), "scripts/package failed");
    let dir = workspace.join("target/debian");
    let mut debs: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("kupgrade_") && n.ends_with("_amd64.deb"))
        })
        .collect();
    debs.sort();
    match debs.as_slice() {
        [deb] => Ok(deb.clone()),
        _ => bail!(
            "scripts/package left {} packages in {}",
            debs.len(),
            dir.display()
        ),
    }
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// The layer as a tar (the helper boot reads it from a disk), with fixed
/// owners, order and times so that its bytes key the disk.
fn build_layer(dir: &Path, flavour: &str, inputs: &Inputs) -> Result<PathBuf> {
    let layer = dir.join(format!("layer-{flavour}"));
    let _ = fs::remove_dir_all(&layer);
    fs::create_dir_all(&layer)?;
    install_agent(&layer, inputs.bin_dir)?;
    // Commands run in the new root (chroot) after the layer is unpacked.
    let mut setup = String::from("systemctl enable kupgrade-guest.service\n");
    install_kupgrade(&layer, inputs.package, inputs, &mut setup)?;
    write_file(&layer.join(".kupgrade-vm-setup"), 0o644, &setup)?;
    let tar = dir.join(format!("layer-{flavour}.tar"));
    assets::run(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg(format!("--mtime=@{SOURCE_DATE_EPOCH}"))
            .arg("-c")
            .arg("-f")
            .arg(&tar)
            .arg("-C")
            .arg(&layer)
            .arg("."),
    )?;
    fs::remove_dir_all(&layer)?;
    Ok(tar)
}

/// The flavour's disk; the caller holds the flavour's lock.
fn ensure_disk(dir: &Path, base: &Base, inputs: &Inputs) -> Result<(PathBuf, String)> {
    let flavour = flavour_name(inputs.initramfs, inputs.packages);
    let tar = build_layer(dir, &flavour, inputs)?;
    let mut h = blake3::Hasher::new();
    h.update(base.key.as_bytes());
    h.update(ASSEMBLE_ROOT.as_bytes());
    h.update(&fs::read(&tar)?);
    let key = hex_key(h);
    let disk = dir.join(format!("disk-{flavour}-{key}.img"));
    if disk.exists() {
        return Ok((disk, key));
    }
    let started = Instant::now();
    progress::step(&format!(
        "assembling the Debian disk ({key}): LVM root made in a helper boot of the guest's kernel"
    ));
    let helper = dir.join(format!("helper-{flavour}"));
    let _ = fs::remove_dir_all(&helper);
    fs::create_dir_all(&helper)?;
    let release = inputs
        .releases
        .first()
        .context("the Debian guest needs a kernel release")?;
    let kernel = helper.join("vmlinuz");
    let initrd = helper.join("initrd.img");
    debugfs_dump(&base.image, &format!("/boot/vmlinuz-{release}"), &kernel)?;
    debugfs_dump(&base.image, &format!("/boot/initrd.img-{release}"), &initrd)?;
    let tmp = disk.with_extension("partial");
    let base_len = fs::metadata(&base.image)?.len();
    // One extent of slack behind the label and metadata area.
    let file = File::create(&tmp)?;
    file.set_len(base_len + ROOT_OFFSET + (8 << 20))?;
    drop(file);
    let log = dir.join(format!("assemble-{flavour}-{key}.log"));
    let mut cmd = Command::new(inputs.qemu);
    cmd.args(["-accel", inputs.accel, "-m", "1024", "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0,115200 root=/dev/vdb ro fsck.mode=skip init={ASSEMBLE_ROOT_GUEST} panic=-1 loglevel=4"
        ))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", tmp.display()))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            base.image.display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            tar.display()
        ));
    run_with_deadline(&mut cmd, &log, helper_deadline(inputs.initramfs))?;
    let serial = fs::read_to_string(&log)?;
    check_assembled(&serial).with_context(|| format!("serial log {}", log.display()))?;
    fs::rename(&tmp, &disk)?;
    let _ = fs::remove_dir_all(&helper);
    remove_older(dir, &format!("disk-{flavour}-"), &key);
    remove_older(dir, &format!("assemble-{flavour}-"), &key);
    progress::step(&format!(
        "Debian disk assembled in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok((disk, key))
}

/// How long the helper boot may take. Under dracut the package's trigger
/// rebuilds every kernel's image, not the newest only, and dracut under TCG
/// took over 5 min per image on a loaded 2-core host.
fn helper_deadline(initramfs: Initramfs) -> Duration {
    match initramfs {
        Initramfs::InitramfsTools => Duration::from_secs(900),
        Initramfs::Dracut => Duration::from_secs(2400),
    }
}

/// The helper boot's verdict: done, with the root volume in one piece at
/// [`ROOT_OFFSET`].
fn check_assembled(serial: &str) -> Result<()> {
    const PREFIX: &str = "kupgrade-vm-assemble: ";
    let last = serial
        .lines()
        .filter_map(|l| l.split_once(PREFIX).map(|(_, rest)| rest.trim()))
        .next_back()
        .context("the helper boot printed nothing: did the guest's kernel start?")?;
    let Some(done) = last.strip_prefix("done ") else {
        bail!("the helper boot failed: {last}");
    };
    let field = |k: &str| {
        done.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
    };
    ensure!(
        field("pe_start") == Some(&ROOT_OFFSET.to_string()),
        "the volume group's data starts at {:?}, not at {ROOT_OFFSET}",
        field("pe_start")
    );
    let seg = field("segments").unwrap_or("");
    ensure!(
        seg.starts_with("/dev/vda:0-") && !seg.contains(','),
        "the root volume is not one segment from the first extent: {seg:?}"
    );
    Ok(())
}

fn run_with_deadline(cmd: &mut Command, log: &Path, within: Duration) -> Result<()> {
    let file = File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("cannot start qemu-system-x86_64: install qemu-system-x86 (scripts/setup does)")?;
    let end = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            ensure!(
                status.success(),
                "the helper boot's QEMU exited with {status}; the end of {}:\n{}",
                log.display(),
                tail(log, 20)
            );
            return Ok(());
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the helper boot did not end within {} s; the end of {}:\n{}",
                within.as_secs(),
                log.display(),
                tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Copies one file out of an ext4 image with debugfs (no mount).
fn debugfs_dump(fs_image: &Path, guest: &str, dest: &Path) -> Result<()> {
    let _ = fs::remove_file(dest);
    assets::run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump {guest} {}", dest.display()))
            .arg(fs_image),
    )?;
    let len = fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    ensure!(len > 0, "{} holds no {guest}", fs_image.display());
    Ok(())
}

/// The kernels and initramfs images of the guest's `/boot`, as the guest's
/// own packages and hooks left them.
fn ensure_boot_files(disk: &Path, dir: &Path, releases: &[String]) -> Result<()> {
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    let root = root_fs(disk);
    let mut names = String::new();
    for r in releases {
        for f in [format!("vmlinuz-{r}"), format!("initrd.img-{r}")] {
            debugfs_dump(&root, &format!("/boot/{f}"), &dir.join(&f))?;
            let _ = writeln!(names, "{f}");
        }
    }
    fs::write(done, names)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_device_names_the_volume_group_with_its_dash_doubled() {
        assert!(KERNEL_ARGS.contains(&format!("root={ROOT_DEVICE} ")));
        assert!(FSTAB.contains(&format!("{ROOT_DEVICE} ")));
        assert!(ASSEMBLE_ROOT.contains("VG=kupgrade-vg\n") && ASSEMBLE_ROOT.contains("LV=root\n"));
    }

    /// 6.12's initramfs lists `dm-mod.ko.xz`: it has what the root needs.
    #[test]
    fn an_initramfs_with_compressed_modules_can_assemble_the_root() {
        let dir = std::env::temp_dir().join(format!("kupgrade-vm-list-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let list = dir.join("6.12");
        let base = "usr/sbin/lvm\netc/lvm/lvm.conf\nusr/lib/udev/rules.d/69-lvm.rules\n";
        let modules = "usr/lib/modules/6.12/kernel/drivers/md/dm-mod.ko.xz\n\
            usr/lib/modules/6.12/kernel/drivers/block/virtio_blk.ko.zst\n";
        fs::write(&list, format!("{base}{modules}")).unwrap();
        check_initramfs(Initramfs::InitramfsTools, "6.12", &list).unwrap();
        fs::write(
            &list,
            format!("{base}usr/lib/modules/6.12/kernel/drivers/md/dm-mod.ko.xz\n"),
        )
        .unwrap();
        let e = check_initramfs(Initramfs::InitramfsTools, "6.12", &list)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lacks /virtio_blk.ko"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    fn inputs<'a>(releases: &'a [String], packages: &'a [String]) -> Inputs<'a> {
        Inputs {
            releases,
            bin_dir: Path::new("/nonexistent"),
            package: Path::new("/nonexistent.deb"),
            packages,
            initramfs: Initramfs::InitramfsTools,
            qemu: "qemu",
            accel: "tcg",
        }
    }

    #[test]
    fn the_base_key_changes_with_kernels_and_packages_only() {
        let r1 = vec!["6.1.0-47-cloud-amd64".to_string()];
        let r2 = vec![
            "6.1.0-47-cloud-amd64".to_string(),
            "6.1.0-57-cloud-amd64".to_string(),
        ];
        let none: Vec<String> = vec![];
        let redis = vec!["redis-server".to_string()];
        let k = base_key(&inputs(&r1, &none));
        assert_eq!(k, base_key(&inputs(&r1, &none)));
        assert_ne!(k, base_key(&inputs(&r2, &none)));
        assert_ne!(k, base_key(&inputs(&r1, &redis)));
        // The harness's binaries are not Debian's: they key the disk, not the base.
        let mut other = inputs(&r1, &none);
        other.bin_dir = Path::new("/elsewhere");
        assert_eq!(k, base_key(&other));
        let mut dracut = inputs(&r1, &none);
        dracut.initramfs = Initramfs::Dracut;
        assert_ne!(k, base_key(&dracut));
    }

    #[test]
    fn the_dracut_base_swaps_the_generator_and_is_named_apart() {
        // dracut's base is initramfs-tools' with the generator swapped;
        // zstd only for initramfs-tools, which would fall back to gzip.
        let tools = base_packages(Initramfs::InitramfsTools);
        assert_eq!(tools[..BASE_PACKAGES.len()], *BASE_PACKAGES);
        assert_eq!(tools[BASE_PACKAGES.len()..], ["zstd"]);
        let dracut = base_packages(Initramfs::Dracut);
        assert!(dracut.contains(&"dracut") && !dracut.contains(&"initramfs-tools"));
        assert_eq!(dracut.len(), BASE_PACKAGES.len());
        assert!(base_files(Initramfs::Dracut)
            .iter()
            .all(|(p, _, _)| !p.contains("initramfs-tools")));
        let none: Vec<String> = vec![];
        let redis = vec!["redis-server".to_string()];
        assert_eq!(flavour_name(Initramfs::InitramfsTools, &none), "base");
        assert_eq!(flavour_name(Initramfs::Dracut, &none), "dracut");
        assert_eq!(
            flavour_name(Initramfs::Dracut, &redis),
            "dracut+redis-server"
        );
        assert_eq!(
            flavour_name(Initramfs::InitramfsTools, &redis),
            "redis-server"
        );
        let named = ["redis-server", "python3", "openssh-server", "redis-server"].map(String::from);
        assert_eq!(extra_packages(Initramfs::InitramfsTools, &named), redis);
        assert!(extra_packages(Initramfs::Dracut, &named[1..3]).is_empty());
    }

    #[test]
    fn the_hook_is_checked_in_the_images_the_trigger_rebuilt() {
        let rs = vec![
            "6.1.0-47-cloud-amd64".to_string(),
            "6.1.0-57-cloud-amd64".to_string(),
        ];
        assert_eq!(rebuilt_by_trigger(Initramfs::InitramfsTools, &rs), &rs[1..]);
        assert_eq!(rebuilt_by_trigger(Initramfs::Dracut, &rs), &rs[..]);
        assert!(rebuilt_by_trigger(Initramfs::InitramfsTools, &[]).is_empty());
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        let package = dir.path().join("kupgrade.deb");
        fs::write(&package, b"deb").unwrap();
        let mut i = inputs(&rs, &[]);
        i.package = &package;
        i.initramfs = Initramfs::Dracut;
        let mut setup = String::new();
        install_kupgrade(&layer, &package, &i, &mut setup).unwrap();
        let checks: Vec<&str> = setup
            .lines()
            .filter(|l| l.starts_with("lsinitrd "))
            .collect();
        assert_eq!(checks.len(), 2, "{setup}");
        assert!(checks[1].contains(
            "/boot/initrd.img-6.1.0-57-cloud-amd64 | grep -q 'usr/lib/kupgrade/initramfs-hook$'"
        ));
        // After the package is installed, not before.
        assert!(setup.find("dpkg -i").unwrap() < setup.find("lsinitrd").unwrap());
    }

    #[test]
    fn the_helper_boot_is_judged_by_its_last_line() {
        let ok = "noise\nkupgrade-vm-assemble: start uptime=3\n[ 9.1] kupgrade-vm-assemble: done pe_start=1048576 segments=/dev/vda:0-255 uptime=60\n";
        check_assembled(ok).unwrap();
        let failed = "kupgrade-vm-assemble: start\nkupgrade-vm-assemble: failed status=5 (see the lines above)\n";
        let e = check_assembled(failed).unwrap_err().to_string();
        assert!(e.contains("status=5"), "{e}");
        let moved = "kupgrade-vm-assemble: done pe_start=4194304 segments=/dev/vda:0-255\n";
        let e = check_assembled(moved).unwrap_err().to_string();
        assert!(e.contains("4194304"), "{e}");
        let split =
            "kupgrade-vm-assemble: done pe_start=1048576 segments=/dev/vda:0-9,/dev/vda:20-30\n";
        assert!(check_assembled(split).is_err());
        assert!(check_assembled("the kernel never started\n").is_err());
    }

    #[test]
    fn initramfs_lists_without_lvm_or_with_unconfigured_lvm_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = "usr/sbin/lvm\netc/lvm/lvm.conf\nusr/lib/modules/r/kernel/drivers/md/dm-mod.ko\nusr/lib/modules/r/kernel/drivers/block/virtio_blk.ko\nusr/lib/udev/rules.d/69-lvm.rules\n";
        let list = dir.path().join("r");
        let tools = Initramfs::InitramfsTools;
        fs::write(&list, good).unwrap();
        check_initramfs(tools, "r", &list).unwrap();
        fs::write(&list, good.replace("lvm.conf", "lvm.conf.dpkg-new")).unwrap();
        let e = check_initramfs(tools, "r", &list).unwrap_err().to_string();
        assert!(e.contains("etc/lvm/lvm.conf"), "{e}");
        let e = check_initramfs(tools, "r", &dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("update-initramfs"), "{e}");
    }

    #[test]
    fn dracut_lists_are_read_in_their_ls_form_and_need_dracuts_lvm_rules() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("r");
        let good = "Image: /boot/initrd.img-r: 30M\n\
            -rwxr-xr-x   1 root     root      2822576 Feb 17  2023 usr/sbin/lvm\n\
            -rwxr-xr-x   1 root     root         1843 Feb 17  2023 usr/sbin/lvm_scan\n\
            -rw-r--r--   1 root     root       223417 Mar 10  2025 usr/lib/modules/r/kernel/drivers/md/dm-mod.ko\n\
            -rw-r--r--   1 root     root        44449 Mar 10  2025 usr/lib/modules/r/kernel/drivers/block/virtio_blk.ko\n\
            -rw-r--r--   1 root     root         3021 Feb 17  2023 usr/lib/udev/rules.d/64-lvm.rules\n";
        fs::write(&list, good).unwrap();
        check_initramfs(Initramfs::Dracut, "r", &list).unwrap();
        // initramfs-tools' rules are not dracut's.
        let e = check_initramfs(Initramfs::InitramfsTools, "r", &list)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lvm.conf"), "{e}");
        fs::write(&list, good.replace("64-lvm.rules", "69-lvm.rules")).unwrap();
        let e = check_initramfs(Initramfs::Dracut, "r", &list)
            .unwrap_err()
            .to_string();
        assert!(e.contains("64-lvm.rules"), "{e}");
        let e = check_initramfs(Initramfs::Dracut, "r", &dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dracut's kernel hook"), "{e}");
    }

    #[test]
    fn debugfs_reads_the_root_at_the_first_extent() {
        assert_eq!(
            root_fs(Path::new("/c/disk.img")),
            PathBuf::from("/c/disk.img?offset=1048576")
        );
    }
}
