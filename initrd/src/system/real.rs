//! The real [`System`]: mounts, modules, the store, `ip`, `nft`, `criu`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use contract::cmdline::Cmdline;
use contract::criu::Checkpoint;
use contract::devstate::{Family, Interface, Route};
use contract::events::EventLine;
use contract::report::{self, UpgradeReport};
use contract::WorkloadEntry;
use image_format::{Image, State};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Error, ImageInfo, SupportMount, System};
use crate::{boot, log, timers};

const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
const TCP_WINDOW_SCALING: &str = "/proc/sys/net/ipv4/tcp_window_scaling";
/// How long the store's device may take to appear (nd_pmem probes late).
const STORE_WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct RealSystem {
    /// The store, to change the image's state.
    store: Option<File>,
    /// The image, read through a second handle on the store.
    image: Option<Image<File>>,
}

impl RealSystem {
    fn store(&mut self) -> Result<&mut File, Error> {
        self.store.as_mut().ok_or(Error::NoStore)
    }

    fn image(&mut self) -> Result<&mut Image<File>, Error> {
        self.image.as_mut().ok_or(Error::NoStore)
    }
}

impl System for RealSystem {
    fn mount_kernel_fs(&mut self) -> Result<(), Error> {
        let mounted = boot::mount_kernel_fs();
        // Even after an error: /dev may have been mounted by the kernel.
        log::open_kmsg();
        Ok(mounted?)
    }

    fn cmdline(&mut self) -> String {
        fs::read_to_string("/proc/cmdline").unwrap_or_default()
    }

    fn kernel_release(&mut self) -> String {
        nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn modules(&mut self, release: &str) -> Vec<String> {
        boot::module_load_order(release)
    }

    fn load_module(&mut self, release: &str, module: &str) -> Result<(), Error> {
        boot::load_module(release, module)
    }

    fn mount_root(&mut self, cmdline: &Cmdline, writable: bool) -> Result<(), Error> {
        boot::mount_root(cmdline, writable)?;
        Ok(())
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d)
    }

    fn switch_root(&mut self) -> Result<(), Error> {
        Ok(boot::switch_root()?)
    }

    fn exec_init(&mut self, cmdline: &Cmdline) -> String {
        boot::exec_init(cmdline)
    }

    fn open_image(&mut self, store: &Path) -> Result<ImageInfo, Error> {
        let file = open_store(store).map_err(|source| Error::OpenStore {
            path: store.into(),
            source,
        })?;
        // One handle reads the image, the other changes its state.
        let reader = file.try_clone().map_err(|source| Error::Io {
            what: "open a second handle on",
            path: store.into(),
            source,
        })?;
        let image = Image::open(reader)?;
        let info = ImageInfo {
            state: image.superblock().state,
            generation: image.superblock().generation,
            manifest: image.manifest().clone(),
        };
        self.store = Some(file);
        self.image = Some(image);
        Ok(info)
    }

    fn set_image_state(&mut self, state: State) -> Result<(), Error> {
        Ok(image_format::set_state(self.store()?, state)?)
    }

    fn wipe_image(&mut self) -> Result<(), Error> {
        Ok(image_format::wipe(self.store()?)?)
    }

    fn read_section(&mut self, name: &str) -> Result<Vec<u8>, Error> {
        Ok(self.image()?.read_blob(name)?)
    }

    fn unpack(&mut self, section: &str, dest: &Path) -> Result<(), Error> {
        Ok(self.image()?.extract_tree(section, dest)?)
    }

    fn mount_support(&mut self, m: &SupportMount) -> Result<(), Error> {
        match m {
            SupportMount::Tmpfs { path, options } => {
                mount_once("tmpfs", path, Some(options), NOSUID_NODEV)
            }
            SupportMount::Cgroup2 => mount_once("cgroup2", "/sys/fs/cgroup", None, NOSUID_NODEV),
            SupportMount::Devpts { options } => {
                let options = options.as_deref().unwrap_or("gid=5,mode=620,ptmxmode=666");
                // Not nodev: the terminals are its device nodes, and a nodev
                // mount makes opening /dev/pts/N fail with EACCES, root or not.
                let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
                let mounted = mount_once("devpts", "/dev/pts", Some(options), flags);
                if !Path::new("/dev/ptmx").exists() {
                    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
                }
                mounted
            }
        }
    }

    fn mount_scratch(&mut self, dir: &Path) -> Result<(), Error> {
        let _ = fs::create_dir_all(dir);
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0700"),
        )
        .map_err(|source| Error::Mount {
            fstype: "tmpfs".into(),
            target: dir.into(),
            source,
        })
    }

    fn remove_scratch(&mut self, dir: &Path) {
        // Nothing mounted or nothing there is what we want.
        let _ = umount2(dir, MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(dir);
    }

    fn loopback_up(&mut self) -> Result<(), Error> {
        ip(&["link", "set", "lo", "up"])
    }

    fn install_lock_table(&mut self, nft: &str) -> Result<(), Error> {
        run_stdin("nft", &["-f", "-"], nft)
    }

    fn remove_lock_table(&mut self, name: &str) -> Result<(), Error> {
        match run_stdin("nft", &["delete", "table", "inet", name], "") {
            Err(Error::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
            r => r,
        }
    }

    fn configure_interface(&mut self, iface: &Interface) -> Result<(), Error> {
        let cur = iface
            .mac
            .as_deref()
            .and_then(name_by_mac)
            .unwrap_or_else(|| iface.name.clone());
        if cur != iface.name {
            ip(&["link", "set", "dev", &cur, "name", &iface.name])?;
        }
        let mtu = iface.mtu.to_string();
        ip(&["link", "set", "dev", &iface.name, "mtu", &mtu])?;
        for a in &iface.addresses {
            let cidr = format!("{}/{}", a.local, a.prefix_len);
            let mut args = vec![
                family(a.family),
                "addr",
                "replace",
                &cidr,
                "dev",
                &iface.name,
            ];
            if let Some(b) = &a.broadcast {
                args.extend(["broadcast", b.as_str()]);
            }
            ip(&args)?;
        }
        if iface.up {
            ip(&["link", "set", "dev", &iface.name, "up"])?;
        }
        Ok(())
    }

    fn add_route(&mut self, r: &Route) -> Result<(), Error> {
        let metric = r.metric.map(|m| m.to_string());
        let mut args = vec![family(r.family), "route", "replace", r.dst.as_str()];
        let opts = [
            ("via", &r.gateway),
            ("dev", &r.dev),
            ("metric", &metric),
            ("scope", &r.scope),
            ("src", &r.prefsrc),
            ("proto", &r.protocol),
        ];
        for (k, v) in opts {
            if let Some(v) = v {
                args.extend([k, v.as_str()]);
            }
        }
        ip(&args)
    }

    fn swap_tcp_window_scaling(&mut self, value: &str) -> Result<String, Error> {
        let io = |what| {
            move |source| Error::Io {
                what,
                path: TCP_WINDOW_SCALING.into(),
                source,
            }
        };
        let old = fs::read_to_string(TCP_WINDOW_SCALING).map_err(io("read"))?;
        fs::write(TCP_WINDOW_SCALING, value).map_err(io("write"))?;
        Ok(old)
    }

    fn set_hostname(&mut self, name: &str) -> Result<(), Error> {
        nix::unistd::sethostname(name).map_err(|source| Error::Hostname {
            name: name.into(),
            source,
        })
    }

    fn seed_rng(&mut self, seed: &[u8]) -> Result<(), Error> {
        // Mixed into the pool (not credited: that needs an ioctl).
        OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .and_then(|mut f| f.write_all(seed))
            .map_err(|source| Error::Io {
                what: "write",
                path: "/dev/urandom".into(),
                source,
            })
    }

    fn criu_restore(&mut self, c: &Checkpoint) -> Result<(), Error> {
        if let Some(dir) = c.log.parent() {
            let _ = fs::create_dir_all(dir);
        }
        let status = Command::new("criu")
            .args(c.restore_args())
            .env("PATH", PATH)
            // A shell job's tree joins CRIU's process group (and PID 1's
            // session): let that be a group of its own, not init's.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| Error::Spawn {
                command: "criu".into(),
                source,
            })?;
        if status.success() {
            return Ok(());
        }
        Err(Error::CriuExited {
            status,
            errors: report::criu_errors(&fs::read_to_string(c.log).unwrap_or_default()),
        })
    }

    fn resume_restored(&mut self, w: &WorkloadEntry) -> Result<usize, Error> {
        // Their cgroup lists them by their pids in this namespace, which a
        // workload with its own PID namespace may not have kept.
        let procs =
            fs::read_to_string(Path::new(&w.cgroup).join("cgroup.procs")).unwrap_or_default();
        let mut pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            pids = w.pids.clone();
        }
        let rearmed = timers::rearm_expired_periodic(&pids).map_err(Error::Timers);
        for pid in pids {
            // A task that exited meanwhile needs nothing.
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
        rearmed
    }

    fn write_report(&mut self, r: &UpgradeReport) -> Result<(), Error> {
        let dir = Path::new(report::DIR);
        let _ = fs::create_dir_all(dir);
        let path = dir.join(report::FILE);
        let json = serde_json::to_vec_pretty(r).map_err(Error::EncodeReport)?;
        fs::write(&path, json).map_err(|source| Error::Io {
            what: "write the report",
            path,
            source,
        })
    }

    fn emit(&mut self, e: &EventLine) {
        log::event(e)
    }

    fn log(&mut self, line: &str) {
        log::line(line)
    }
}

/// Waits for the store to appear: `/dev/pmemN` shows up once nd_pmem probes.
fn open_store(path: &Path) -> io::Result<File> {
    let start = Instant::now();
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && start.elapsed() < STORE_WAIT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e),
        }
    }
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// Mounts `fstype` on `target` unless something is mounted there already.
fn mount_once(fstype: &str, target: &str, data: Option<&str>, flags: MsFlags) -> Result<(), Error> {
    let mounted = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounted
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target))
    {
        return Ok(());
    }
    let _ = fs::create_dir_all(target);
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(|source| Error::Mount {
        fstype: fstype.into(),
        target: target.into(),
        source,
    })
}

fn family(f: Family) -> &'static str {
    match f {
        Family::Inet6 => "-6",
        Family::Inet => "-4",
    }
}

fn name_by_mac(mac: &str) -> Option<String> {
    fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find_map(|e| {
            let addr = fs::read_to_string(e.path().join("address")).ok()?;
            (addr.trim().eq_ignore_ascii_case(mac))
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
}

fn ip(args: &[&str]) -> Result<(), Error> {
    run_stdin("ip", args, "")
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> Result<(), Error> {
    let spawn_error = |source| Error::Spawn {
        command: cmd.into(),
        source,
    };
    let mut child = Command::new(cmd)
        .args(args)
        .env("PATH", PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input says so in its status.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_error)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("{cmd} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
