//! The real [`System`]: mounts, modules, the store, rtnetlink and
//! nfnetlink, `nft` (the lock tables' text), `criu`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use contract::cmdline::Cmdline;
use contract::devstate::{Family, Interface, Route};
use contract::events::EventLine;
use contract::journal::JournalStream;
use contract::report::{self, UpgradeReport};
use contract::WorkloadEntry;
use image_format::{DirectReader, Image, State};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{
    CriuRun, Durability, Error, ImageHead, ImageInfo, Reboot, RestorerRun, SupportMount, System,
    RESTORER_ARG,
};
use crate::adopt::{self, Adoption};
use crate::netlink::{self, Rtnl};
use crate::nftables::Nft;
use crate::{boot, child, log, timers};

const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// `ip` and `nft` take milliseconds; one that takes this long is stuck.
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);
/// How long past its budget the restore process may take before it is
/// killed: it keeps to the budget by itself, this is for when it cannot.
const RESTORER_GRACE: Duration = Duration::from_secs(5);
const TCP_WINDOW_SCALING: &str = "/proc/sys/net/ipv4/tcp_window_scaling";
/// How long the store's device may take to appear (nd_pmem probes late).
const STORE_WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct RealSystem {
    /// The store, to change the image's state or wipe it.
    store: Option<File>,
    /// Its path as the command line names it (and the agent's record of
    /// how far it holds image data).
    store_path: PathBuf,
    /// The image, read through a second handle on the store.
    image: Option<Image<DirectReader>>,
    /// For the network's configuration, opened on first use.
    rtnl: Option<Rtnl>,
    /// For the lock tables left after the restores, opened on first use.
    nft: Option<Nft>,
    /// Restored journal streams and their relays' ends, until every
    /// workload is restored (a relay started earlier could take a PID the
    /// next restore needs).
    relays: Vec<(JournalStream, i32, OwnedFd)>,
    /// CRIU's probe of the kernel, running beside the unpack.
    criu_probe: Option<child::Running>,
}

impl RealSystem {
    fn rtnl(&mut self) -> Result<&mut Rtnl, Error> {
        if self.rtnl.is_none() {
            self.rtnl = Some(Rtnl::open()?);
        }
        Ok(self.rtnl.as_mut().expect("opened above"))
    }

    fn nft(&mut self) -> Result<&mut Nft, Error> {
        if self.nft.is_none() {
            self.nft = Some(Nft::open()?);
        }
        Ok(self.nft.as_mut().expect("opened above"))
    }

    fn store(&mut self) -> Result<&mut File, Error> {
        self.store.as_mut().ok_or(Error::NoStore)
    }

    fn image(&mut self) -> Result<&mut Image<DirectReader>, Error> {
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

    fn mount_root(
        &mut self,
        cmdline: &Cmdline,
        writable: bool,
        wait: Duration,
    ) -> Result<(), Error> {
        boot::mount_root(cmdline, writable, wait)?;
        Ok(())
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d)
    }

    fn switch_root(&mut self) -> Result<(), Error> {
        Ok(boot::switch_root()?)
    }

    fn exec(&mut self, init: &str, args: &[String]) -> Result<(), String> {
        Err(boot::exec(init, args))
    }

    fn run_restorer(&mut self, run: &RestorerRun) -> Result<(), Error> {
        let events = serde_json::to_string(&run.events).map_err(Error::EncodeReport)?;
        let modules_failed =
            serde_json::to_string(&run.modules_failed).map_err(Error::EncodeReport)?;
        // This binary, deleted from the initramfs but still there for exec.
        let mut restorer = Command::new("/proc/self/exe");
        restorer
            .arg0("kupgrade-init")
            .arg(RESTORER_ARG)
            .arg(&run.store)
            .arg(run.timeout.as_millis().to_string())
            .arg(events)
            .arg(modules_failed)
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        let exited = child::run(
            "kupgrade-init's restore process",
            &mut restorer,
            &[],
            run.timeout + RESTORER_GRACE,
        )?;
        // What it said on its way out (a panic's message) goes to the log too.
        for line in exited.stderr.lines() {
            log::line(&format!("restore process: {line}"));
        }
        if exited.status.success() {
            return Ok(());
        }
        Err(Error::RestorerDied {
            status: exited.status,
            stderr: exited.stderr,
        })
    }

    fn reboot(&mut self, how: Reboot) -> Error {
        boot::reboot(how)
    }

    fn open_image(&mut self, store: &Path) -> Result<ImageInfo, Error> {
        let file = open_store(store).map_err(|source| Error::OpenStore {
            path: store.into(),
            source,
        })?;
        // One handle reads the image, around the page cache (one copy
        // from a RAM store, and no cache of it to fill and drop); the other
        // changes its state.
        let reader = DirectReader::open(store).map_err(|source| Error::Io {
            what: "open a second handle on",
            path: store.into(),
            source,
        })?;
        if !reader.is_direct() {
            log::line(&format!(
                "{} is read through the page cache: its file system refuses O_DIRECT",
                store.display()
            ));
        }
        let image = Image::open(reader)?;
        let info = ImageInfo {
            state: image.superblock().state,
            generation: image.superblock().generation,
            manifest: image.manifest().clone(),
        };
        self.store = Some(file);
        self.store_path = store.into();
        self.image = Some(image);
        Ok(info)
    }

    fn read_superblock(&mut self, store: &Path) -> Result<ImageHead, Error> {
        let file = open_store(store).map_err(|source| Error::OpenStore {
            path: store.into(),
            source,
        })?;
        // Kept even when the superblock does not read: the store may hold
        // a damaged image's memory, to wipe once the report is written.
        self.store_path = store.into();
        let file = self.store.insert(file);
        let sb = image_format::read_superblock(file)?;
        Ok(ImageHead {
            state: sb.state,
            generation: sb.generation,
        })
    }

    fn set_image_state(&mut self, state: State) -> Result<(), Error> {
        Ok(image_format::set_state(self.store()?, state)?)
    }

    fn wipe_image(&mut self) -> Result<(), Error> {
        let name = self.store_path.display().to_string();
        image_format::wipe_recorded(self.store()?, &name, Path::new(report::DIR))?;
        Ok(())
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
        let scratch = |options: &str| {
            mount(
                Some("tmpfs"),
                dir,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(options),
            )
        };
        // Huge pages for the files the unpack sizes first (CRIU's pages):
        // one page allocation per 2 MiB, not per 4 KiB, in the blackout. A
        // kernel without huge tmpfs pages refuses the option.
        scratch("mode=0700,huge=within_size")
            .or_else(|e| {
                log::line(&format!(
                    "the unpack's tmpfs has no huge pages ({e}): 4 KiB pages instead"
                ));
                scratch("mode=0700")
            })
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
        let lo = netlink::link_index("lo")?;
        self.rtnl()?
            .set_link(lo, None, None, Some(true), "raise lo")?;
        Ok(())
    }

    fn install_lock_tables(&mut self, tables: &[String]) -> Result<(), Error> {
        // One `nft -f` is one transaction, and one spawn of nft.
        run_stdin("nft", &["-f", "-"], &tables.join("\n"))
    }

    fn remove_lock_tables(&mut self, names: &[String]) -> Result<(), Error> {
        Ok(self.nft()?.delete_inet_tables(names)?)
    }

    fn start_criu_probe(&mut self) -> Result<bool, Error> {
        // Measured under emulation on one CPU: the probe and the unpack
        // took turns, and the restore ended later than with no head start.
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            return Ok(false);
        }
        // `mem_dirty_track` reads only what the probe found: the least
        // `criu check` does beyond the probe and its cache.
        let mut criu = Command::new("criu");
        criu.args(["check", "--feature", "mem_dirty_track"])
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.criu_probe = Some(child::spawn("criu check", &mut criu)?);
        Ok(true)
    }

    fn finish_criu_probe(&mut self, within: Duration) -> Result<(), Error> {
        let Some(probe) = self.criu_probe.take() else {
            return Ok(());
        };
        let exited = probe.wait(&[], within)?;
        if exited.status.success() {
            return Ok(());
        }
        Err(Error::Command {
            command: "criu check --feature mem_dirty_track".into(),
            stderr: exited.stderr,
        })
    }

    fn lock_tables(&mut self) -> Result<Vec<String>, Error> {
        Ok(criu_lock_tables(self.nft()?.inet_tables()?))
    }

    fn configure_interface(&mut self, iface: &Interface) -> Result<(), Error> {
        let cur = iface
            .mac
            .as_deref()
            .and_then(name_by_mac)
            .unwrap_or_else(|| iface.name.clone());
        let index = netlink::link_index(&cur)?;
        let name = &iface.name;
        let rtnl = self.rtnl()?;
        // Renamed and sized while down (a link that is up cannot be renamed),
        // raised once its addresses are on.
        let rename = (cur != *name).then_some(name.as_str());
        let what = format!("link {cur}: name {name}, mtu {}", iface.mtu);
        rtnl.set_link(index, rename, Some(iface.mtu), None, &what)?;
        for a in &iface.addresses {
            let what = format!("address {}/{} dev {name}", a.local, a.prefix_len);
            rtnl.replace_address(index, a, &what)?;
        }
        if iface.up {
            rtnl.set_link(index, None, None, Some(true), &format!("raise {name}"))?;
        }
        Ok(())
    }

    fn add_route(&mut self, r: &Route) -> Result<(), Error> {
        let oif = match &r.dev {
            Some(dev) => Some(netlink::link_index(dev)?),
            None => None,
        };
        match netlink::route_spec(r, oif) {
            Some(spec) => {
                let what = format!("route {}", r.dst);
                self.rtnl()?.replace_route(&spec, &what)?;
                Ok(())
            }
            None => ip_route(r),
        }
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

    fn criu_restore(&mut self, run: &CriuRun) -> Result<i32, Error> {
        let c = &run.checkpoint;
        if let Some(dir) = c.log.parent() {
            let _ = fs::create_dir_all(dir);
        }
        // A new socket pair for each journal stream: CRIU gives the service
        // one end in place of its old connection, a relay gets the other.
        let pairs = journal_pairs(c.workload.journal_streams.len())?;
        let fds: Vec<i32> = pairs
            .iter()
            .map(|(service, _)| service.as_raw_fd())
            .collect();
        // Where CRIU says which PID the root got.
        let pid_file = c.log.with_extension("pid");
        let _ = fs::remove_file(&pid_file);
        let mut criu = Command::new("criu");
        criu.args(run.args(&fds))
            .arg("--pidfile")
            .arg(&pid_file)
            .env("PATH", PATH)
            // A shell job's tree joins CRIU's process group (and PID 1's
            // session): let that be a group of its own, not init's.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let exited = match child::run("criu restore", &mut criu, &[], run.within) {
            Ok(e) => e,
            Err(e @ child::Error::Overran { .. }) => {
                kill_cgroup(&c.workload.cgroup);
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        if exited.status.success() {
            let root = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(c.workload.root_pid);
            for (stream, (service_end, relay_end)) in c.workload.journal_streams.iter().zip(pairs) {
                drop(service_end);
                self.relays.push((stream.clone(), root, relay_end));
            }
            return Ok(root);
        }
        Err(Error::CriuExited {
            status: exited.status,
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

    fn start_journal_relays(&mut self) -> Result<usize, Error> {
        let relays = std::mem::take(&mut self.relays);
        let n = relays.len();
        for (stream, pid, end) in relays {
            start_relay(&stream, pid, end)?;
        }
        Ok(n)
    }

    fn adopt(&mut self, a: &Adoption) -> Result<(), Error> {
        let write = |path: PathBuf, text: String| {
            let io = |what| {
                let path = path.clone();
                move |source| Error::Io { what, path, source }
            };
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(io("create the directory of"))?;
            }
            fs::write(&path, text).map_err(io("write"))
        };
        if let Some(file) = a.unit_file {
            write(adopt::unit_path(a.unit), adopt::unit_text(file))?;
        }
        write(adopt::pid_file(a.unit), format!("{}\n", a.main_pid))?;
        write(
            adopt::drop_in_path(a.unit),
            adopt::drop_in(a.unit, a.notify),
        )?;
        write(adopt::wants_path(a.unit), adopt::wants(a.unit))
    }

    fn write_report(&mut self, r: &UpgradeReport, how: Durability) -> Result<(), Error> {
        let dir = Path::new(report::DIR);
        let _ = fs::create_dir_all(dir);
        let path = dir.join(report::FILE);
        let new = dir.join(format!("{}.new", report::FILE));
        let json = serde_json::to_vec_pretty(r).map_err(Error::EncodeReport)?;
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { what, path, source }
        };
        let mut file = File::create(&new).map_err(io("create", &new))?;
        file.write_all(&json)
            .map_err(io("write the report to", &new))?;
        if how == Durability::Synced {
            file.sync_all().map_err(io("flush the report to", &new))?;
        }
        // Whole or not at all: a reader never sees half of one.
        fs::rename(&new, &path).map_err(io("rename the report to", &path))?;
        if how == Durability::Synced {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("flush the directory", dir))?;
        }
        Ok(())
    }

    fn read_report(&mut self) -> Option<UpgradeReport> {
        let bytes = fs::read(Path::new(report::DIR).join(report::FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
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

/// A route with a scope or protocol that only `ip` knows by name.
fn ip_route(r: &Route) -> Result<(), Error> {
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
    run_stdin("ip", &args, "")
}

/// CRIU's lock tables among the inet tables: `CRIU-<pid>`.
fn criu_lock_tables(inet: Vec<String>) -> Vec<String> {
    inet.into_iter()
        .filter(|n| n.starts_with("CRIU-"))
        .collect()
}

/// `n` socket pairs: the first end of each open across exec (CRIU's
/// `--inherit-fd`), the second not.
fn journal_pairs(n: usize) -> Result<Vec<(OwnedFd, OwnedFd)>, Error> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let io = |source: nix::Error| Error::Io {
        what: "make a socket pair for",
        path: "a journal stream".into(),
        source: source.into(),
    };
    (0..n)
        .map(|_| {
            let (service, relay) = socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(io)?;
            fcntl(service.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(io)?;
            Ok((service, relay))
        })
        .collect()
}

/// A relay for a restored service's journal stream, holding `end` on its
/// stdin and sending as `pid` (the service's root); not waited for: it
/// lives as long as the service's end is open.
fn start_relay(stream: &JournalStream, pid: i32, end: OwnedFd) -> Result<(), Error> {
    let spec = serde_json::to_string(stream).map_err(Error::EncodeReport)?;
    Command::new("/proc/self/exe")
        .arg0("kupgrade-init")
        .arg(contract::journal::RELAY_ARG)
        .arg(pid.to_string())
        .arg(spec)
        .stdin(Stdio::from(end))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| Error::Io {
            what: "start the journal relay",
            path: "/proc/self/exe".into(),
            source,
        })?;
    Ok(())
}

/// A CRIU killed half-way may have left tasks of the workload behind, in
/// its cgroup (CRIU moves them there early): they must not run half-restored.
fn kill_cgroup(cgroup: &str) {
    // No cgroup yet, or an older kernel: nothing to kill, or no way to.
    let _ = fs::write(Path::new(cgroup).join("cgroup.kill"), "1");
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> Result<(), Error> {
    let command = format!("{cmd} {}", args.join(" "));
    let mut child = Command::new(cmd);
    child
        .args(args)
        .env("PATH", PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let exited = child::run(&command, &mut child, input.as_bytes(), COMMAND_DEADLINE)?;
    if exited.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command,
            stderr: exited.stderr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_lock_tables_are_found_among_the_others() {
        let inet = ["filter", "CRIU-10002", "CRIU-7", "criu-1"].map(String::from);
        assert_eq!(criu_lock_tables(inet.to_vec()), ["CRIU-10002", "CRIU-7"]);
        assert!(criu_lock_tables(vec![]).is_empty());
    }
}
