//! `kupgrade-init` after the distribution's initramfs: the restore of a
//! machine whose root only its own initramfs can assemble (LVM, LUKS, RAID).
//!
//! initramfs-tools or dracut (with or without systemd) assembles and mounts
//! the root, moves `/dev`, `/proc`, `/sys` and `/run` into it, switches to
//! it and executes the init it was told to run. With `kupgrade.resume` on
//! the command line, kupgrade's boot script in that initramfs (see
//! `packaging/`) tells it to run `/usr/lib/kupgrade/kupgrade-init`, which
//! then runs here: PID 1, in the final root, before the real init. It is
//! the same [`boot`](crate::boot) and the same [`restore`](crate::restore)
//! as in kupgrade's own initramfs; only the steps the distribution has done
//! already are done differently, by [`Chained`]:
//!
//! | step of the boot  | kupgrade's own initramfs          | here, after the distribution's |
//! |-------------------|-----------------------------------|--------------------------------|
//! | kernel fs         | mount `/proc`, `/sys`, `/dev`     | mount only what is missing; console as stdio |
//! | modules           | the initramfs's load order        | the restore's, by the root's `modprobe`, unless loaded |
//! | root              | wait for `root=`, mount it        | remount `/` read-write for a restore (it was mounted `ro`) |
//! | switch root       | move into it, chroot              | nothing: `/` is the root |
//! | exec the init     | `init=`, `/sbin/init`, ...        | the same list, never kupgrade-init itself, with the arguments the distribution gave |
//!
//! Why not restore from the boot script, inside the initramfs? There the
//! restored tasks would not see the system they end up in: initramfs-tools
//! moves its `/run`, `/proc` and `/sys` into the root only after its last
//! boot script (a tmpfs the restore mounted there would be hidden, files it
//! put there lost), and a systemd initramfs sends SIGTERM and SIGHUP to
//! every process it does not know when it switches root (only root's
//! processes whose `argv[0]` starts with `@` are spared). Here every mount
//! is the one the real system keeps, and the restored tasks, re-parented to
//! PID 1, are the real init's children once it is executed.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use contract::cmdline::{self, Cmdline};
use contract::devstate::{Interface, Route};
use contract::events::EventLine;
use contract::report::UpgradeReport;
use contract::WorkloadEntry;
use image_format::State;
use initramfs::modules::{normalise, CRIU_MODULES, PMEM_MODULES};
use nix::mount::{mount, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{dup2, execv, Pid};

use crate::adopt::Adoption;
use crate::system::faults::Faults;
use crate::system::real::RealSystem;
use crate::system::{
    CriuRun, Durability, Error, ImageHead, ImageInfo, Reboot, RestorerRun, SupportMount, System,
};
use crate::{child, log};

const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// A modprobe takes milliseconds; one that takes this long is stuck (and
/// PID 1 must go on to the real init).
const MODPROBE_DEADLINE: Duration = Duration::from_secs(30);
/// The file systems a distribution's initramfs moves into the root (`/run`
/// is the restore's business: it mounts the tmpfs the workloads used).
const KERNEL_FS: [(&str, &str); 3] = [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")];

/// Whether this process runs after another initramfs rather than as the
/// `/init` of kupgrade's own: someone mounted `/proc` before us (the kernel
/// never does, kupgrade's initramfs does it in its first step).
pub fn after_an_initramfs() -> bool {
    Path::new("/proc/self/mounts").exists()
}

/// The names of the modules the restore needs, whatever the store: CRIU's
/// and the pmem store's (loading nd_e820 without a `memmap=` range is
/// harmless). The initramfs hooks include these, by this list.
pub fn restore_modules() -> Vec<&'static str> {
    CRIU_MODULES.iter().chain(PMEM_MODULES).copied().collect()
}

/// What `kupgrade-init` does when it is not PID 1 (run by a person or by
/// an initramfs hook): `--restore-modules` prints the modules the restore
/// needs, one a line; `--version` its version. `None`: not asked either.
pub fn tool(args: &[String]) -> Option<i32> {
    match args {
        [a] if a == "--restore-modules" => {
            for m in restore_modules() {
                println!("{m}");
            }
            Some(0)
        }
        [a] if a == "--version" => {
            println!("{}", env!("CARGO_PKG_VERSION"));
            Some(0)
        }
        _ => None,
    }
}

/// Boots as PID 1 after the distribution's initramfs; never returns.
pub fn run() -> ! {
    let args = std::env::args().skip(1).collect();
    let mut sys = Faults::new(Chained::new(RealSystem::default(), RealHost, args));
    let why = crate::boot_whatever_happens(&mut sys)
        .err()
        .unwrap_or_default();
    sys.log(&format!("{why}; halting here"));
    // PID 1 must not exit: that panics the kernel.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// What [`Chained`] does to the machine itself; the rest goes to the
/// [`System`] it wraps.
pub trait Host {
    /// `/proc/self/mounts`.
    fn mounts(&mut self) -> String;
    fn mount_fs(&mut self, fstype: &str, target: &str) -> Result<(), Error>;
    /// Logs to `/dev/kmsg`, and makes the console stdin, stdout and stderr
    /// (a systemd initramfs hands over with them on `/dev/null`).
    fn open_log(&mut self);
    /// `/proc/modules`.
    fn loaded_modules(&mut self) -> String;
    /// `modules.builtin` of `release`.
    fn builtin_modules(&mut self, release: &str) -> String;
    fn modprobe(&mut self, name: &str) -> Result<(), Error>;
    /// Whether `/` is mounted read-only.
    fn root_read_only(&mut self) -> Result<bool, Error>;
    fn remount_root_rw(&mut self) -> Result<(), Error>;
    /// Reaps exited children that are not ours: the distribution's
    /// processes, re-parented to PID 1, whose zombies would keep PIDs that
    /// CRIU needs free. Only called while no command of ours runs.
    fn reap(&mut self) -> usize;
    /// Whether `path` is this very program.
    fn is_self(&mut self, path: &str) -> bool;
    /// Replaces this process; returns only why it could not (a fake
    /// returns `Ok` where the real one would have replaced it).
    fn exec(&mut self, path: &str, args: &[String]) -> Result<(), String>;
}

/// The [`System`] of a boot after the distribution's initramfs: the boot
/// steps as the table in the module docs says, everything else by `inner`.
pub struct Chained<S, H> {
    inner: S,
    host: H,
    /// Our arguments, which the distribution meant for the real init.
    args: Vec<String>,
    /// Loaded or built in already, found by [`System::modules`].
    present: Vec<String>,
}

impl<S: System, H: Host> Chained<S, H> {
    pub fn new(inner: S, host: H, args: Vec<String>) -> Self {
        Chained {
            inner,
            host,
            args,
            present: Vec::new(),
        }
    }
}

/// Module names in `/proc/modules` (first word) or `modules.builtin`
/// (a path per line).
fn module_names(proc_modules: &str, builtin: &str) -> Vec<String> {
    let loaded = proc_modules
        .lines()
        .filter_map(|l| l.split_whitespace().next());
    let built_in = builtin.lines().filter_map(|l| {
        let file = l.trim().rsplit('/').next()?;
        file.split(".ko").next().filter(|n| !n.is_empty())
    });
    loaded.chain(built_in).map(normalise).collect()
}

/// Which kernel file systems are not mounted, by `/proc/self/mounts`.
fn missing_kernel_fs(mounts: &str) -> Vec<(&'static str, &'static str)> {
    KERNEL_FS
        .into_iter()
        .filter(|(_, target)| {
            !mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(target))
        })
        .collect()
}

impl<S: System, H: Host> System for Chained<S, H> {
    fn mount_kernel_fs(&mut self) -> Result<(), Error> {
        let mounts = self.host.mounts();
        let mut result = Ok(());
        for (fstype, target) in missing_kernel_fs(&mounts) {
            if let Err(e) = self.host.mount_fs(fstype, target) {
                result = result.and(Err(e));
            }
        }
        self.host.open_log();
        self.inner.log(
            "running after the distribution's initramfs: its root is mounted, restoring in it",
        );
        let reaped = self.host.reap();
        if reaped > 0 {
            self.inner.log(&format!(
                "reaped {reaped} process(es) the initramfs left behind"
            ));
        }
        result
    }

    fn cmdline(&mut self) -> String {
        self.inner.cmdline()
    }

    fn kernel_release(&mut self) -> String {
        self.inner.kernel_release()
    }

    fn modules(&mut self, release: &str) -> Vec<String> {
        let loaded = self.host.loaded_modules();
        let builtin = self.host.builtin_modules(release);
        self.present = module_names(&loaded, &builtin);
        let mut wanted: Vec<String> = restore_modules().into_iter().map(str::to_string).collect();
        // The network's drivers, which `stage` found (see cmdline::MODULES).
        let cmdline = Cmdline::parse(&self.inner.cmdline());
        for m in cmdline
            .value(cmdline::MODULES)
            .unwrap_or_default()
            .split(',')
        {
            if !m.is_empty() && !wanted.iter().any(|w| w == m) {
                wanted.push(m.to_string());
            }
        }
        wanted
    }

    fn load_module(&mut self, _release: &str, module: &str) -> Result<(), Error> {
        // Usually loaded by the boot script, in the initramfs; a modprobe
        // costs tens of milliseconds inside the blackout.
        if self.present.contains(&normalise(module)) {
            return Ok(());
        }
        self.host.modprobe(module)
    }

    fn mount_root(
        &mut self,
        _cmdline: &Cmdline,
        writable: bool,
        _wait: Duration,
    ) -> Result<(), Error> {
        // The distribution mounted it, often read-only (`ro`): the restore
        // writes its report and CRIU reopens files for writing. systemd
        // later remounts it as the fstab says.
        if writable && self.host.root_read_only()? {
            self.host.remount_root_rw()?;
            self.inner
                .log("remounted / read-write for the restore (it was read-only)");
        }
        Ok(())
    }

    fn sleep(&mut self, d: Duration) {
        self.inner.sleep(d)
    }

    fn switch_root(&mut self) -> Result<(), Error> {
        Ok(())
    }

    fn exec(&mut self, init: &str, _args: &[String]) -> Result<(), String> {
        // `init=` naming kupgrade-init would restore, find the image used,
        // and execute itself for ever.
        if self.host.is_self(init) {
            return Err("that is kupgrade-init itself".into());
        }
        // What the distribution's initramfs gave us is the real init's.
        let args = self.args.clone();
        self.host.exec(init, &args)
    }

    fn reboot(&mut self, how: Reboot) -> Error {
        self.inner.reboot(how)
    }

    fn run_restorer(&mut self, run: &RestorerRun) -> Result<(), Error> {
        // The initramfs's processes, re-parented to PID 1 as they died,
        // hold PIDs the restored tasks may need; the restore process's own
        // children are its business.
        self.host.reap();
        self.inner.run_restorer(run)
    }

    fn open_image(&mut self, store: &Path) -> Result<ImageInfo, Error> {
        self.inner.open_image(store)
    }

    fn read_superblock(&mut self, store: &Path) -> Result<ImageHead, Error> {
        self.inner.read_superblock(store)
    }

    fn set_image_state(&mut self, state: State) -> Result<(), Error> {
        self.inner.set_image_state(state)
    }

    fn wipe_image(&mut self) -> Result<(), Error> {
        self.inner.wipe_image()
    }

    fn read_section(&mut self, name: &str) -> Result<Vec<u8>, Error> {
        self.inner.read_section(name)
    }

    fn unpack(&mut self, section: &str, dest: &Path) -> Result<(), Error> {
        self.inner.unpack(section, dest)
    }

    fn mount_support(&mut self, m: &SupportMount) -> Result<(), Error> {
        self.inner.mount_support(m)
    }

    fn mount_scratch(&mut self, dir: &Path) -> Result<(), Error> {
        self.inner.mount_scratch(dir)
    }

    fn remove_scratch(&mut self, dir: &Path) {
        self.inner.remove_scratch(dir)
    }

    fn loopback_up(&mut self) -> Result<(), Error> {
        self.inner.loopback_up()
    }

    fn install_lock_tables(&mut self, tables: &[String]) -> Result<(), Error> {
        self.inner.install_lock_tables(tables)
    }

    fn remove_lock_tables(&mut self, names: &[String]) -> Result<(), Error> {
        self.inner.remove_lock_tables(names)
    }

    fn start_criu_probe(&mut self) -> Result<bool, Error> {
        self.inner.start_criu_probe()
    }

    fn finish_criu_probe(&mut self, within: Duration) -> Result<(), Error> {
        self.inner.finish_criu_probe(within)
    }

    fn lock_tables(&mut self) -> Result<Vec<String>, Error> {
        self.inner.lock_tables()
    }

    fn configure_interface(&mut self, iface: &Interface) -> Result<(), Error> {
        self.inner.configure_interface(iface)
    }

    fn add_route(&mut self, route: &Route) -> Result<(), Error> {
        self.inner.add_route(route)
    }

    fn swap_tcp_window_scaling(&mut self, value: &str) -> Result<String, Error> {
        self.inner.swap_tcp_window_scaling(value)
    }

    fn set_hostname(&mut self, name: &str) -> Result<(), Error> {
        self.inner.set_hostname(name)
    }

    fn seed_rng(&mut self, seed: &[u8]) -> Result<(), Error> {
        self.inner.seed_rng(seed)
    }

    fn criu_restore(&mut self, run: &CriuRun) -> Result<i32, Error> {
        self.inner.criu_restore(run)
    }

    fn resume_restored(&mut self, w: &WorkloadEntry) -> Result<usize, Error> {
        self.inner.resume_restored(w)
    }

    fn start_journal_relays(&mut self) -> Result<usize, Error> {
        self.inner.start_journal_relays()
    }

    fn adopt(&mut self, a: &Adoption) -> Result<(), Error> {
        self.inner.adopt(a)
    }

    fn write_report(&mut self, report: &UpgradeReport, how: Durability) -> Result<(), Error> {
        self.inner.write_report(report, how)
    }

    fn read_report(&mut self) -> Option<UpgradeReport> {
        self.inner.read_report()
    }

    fn emit(&mut self, e: &EventLine) {
        self.inner.emit(e)
    }

    fn log(&mut self, line: &str) {
        self.inner.log(line)
    }
}

/// The machine.
pub struct RealHost;

impl Host for RealHost {
    fn mounts(&mut self) -> String {
        fs::read_to_string("/proc/self/mounts").unwrap_or_default()
    }

    fn mount_fs(&mut self, fstype: &str, target: &str) -> Result<(), Error> {
        let _ = fs::create_dir_all(target);
        mount(
            Some(fstype),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID,
            None::<&str>,
        )
        .map_err(|source| Error::Mount {
            fstype: fstype.into(),
            target: target.into(),
            source,
        })
    }

    fn open_log(&mut self) {
        log::open_kmsg();
        if let Ok(console) = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
        {
            for fd in 0..=2 {
                // Without a console the lines still reach /dev/kmsg.
                let _ = dup2(console.as_raw_fd(), fd);
            }
        }
    }

    fn loaded_modules(&mut self) -> String {
        fs::read_to_string("/proc/modules").unwrap_or_default()
    }

    fn builtin_modules(&mut self, release: &str) -> String {
        fs::read_to_string(format!("/lib/modules/{release}/modules.builtin")).unwrap_or_default()
    }

    fn modprobe(&mut self, name: &str) -> Result<(), Error> {
        let command = format!("modprobe {name}");
        let mut modprobe = Command::new("modprobe");
        modprobe
            .arg(name)
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let exited = child::run(&command, &mut modprobe, &[], MODPROBE_DEADLINE)?;
        if exited.status.success() {
            return Ok(());
        }
        Err(Error::Command {
            command,
            stderr: exited.stderr.trim().to_string(),
        })
    }

    fn root_read_only(&mut self) -> Result<bool, Error> {
        let st = statvfs("/").map_err(|source| Error::Mount {
            fstype: "root".into(),
            target: "/".into(),
            source,
        })?;
        Ok(st.flags().contains(FsFlags::ST_RDONLY))
    }

    fn remount_root_rw(&mut self) -> Result<(), Error> {
        let err = |source| Error::Mount {
            fstype: "root (remount read-write)".into(),
            target: "/".into(),
            source,
        };
        let st = statvfs("/").map_err(err)?;
        // A remount resets the per-mount flags it is not given: keep them.
        let keep = [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ];
        let mut flags = MsFlags::MS_REMOUNT;
        for (has, set) in keep {
            if st.flags().contains(has) {
                flags |= set;
            }
        }
        mount(None::<&str>, "/", None::<&str>, flags, None::<&str>).map_err(err)
    }

    fn reap(&mut self) -> usize {
        let mut n = 0;
        while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
            n += 1;
        }
        n
    }

    fn is_self(&mut self, path: &str) -> bool {
        let me = fs::canonicalize("/proc/self/exe").ok();
        let it: Option<PathBuf> = fs::canonicalize(path).ok();
        me.is_some() && me == it
    }

    fn exec(&mut self, path: &str, args: &[String]) -> Result<(), String> {
        let Ok(program) = CString::new(path) else {
            return Err("a NUL in the path".into());
        };
        let mut argv = vec![program.clone()];
        argv.extend(args.iter().filter_map(|a| CString::new(a.as_str()).ok()));
        // execv only returns on failure.
        let Err(e) = execv(&program, &argv);
        Err(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::Fake;
    use contract::events::Event;
    use contract::report::Outcome;

    /// Where the package installs kupgrade-init; the boot scripts name it.
    const INSTALLED_PATH: &str = "/usr/lib/kupgrade/kupgrade-init";

    /// A recording [`Host`]: calls as lines, in order, into the same list
    /// as the wrapped [`Fake`]'s would go if they were one machine.
    #[derive(Default)]
    struct FakeHost {
        calls: Vec<String>,
        mounts: String,
        loaded: String,
        builtin: String,
        read_only: bool,
        fail_modprobe: Vec<String>,
        /// What `/proc/self/exe` is.
        me: String,
        /// Paths that exist and can be executed: the first one is.
        executable: Vec<String>,
    }

    impl FakeHost {
        fn modprobed(&self) -> Vec<&str> {
            self.calls
                .iter()
                .filter(|c| c.starts_with("modprobe"))
                .map(String::as_str)
                .collect()
        }
    }

    impl Host for FakeHost {
        fn mounts(&mut self) -> String {
            self.mounts.clone()
        }
        fn mount_fs(&mut self, fstype: &str, target: &str) -> Result<(), Error> {
            self.calls.push(format!("mount {fstype} {target}"));
            Ok(())
        }
        fn open_log(&mut self) {
            self.calls.push("open log".into());
        }
        fn loaded_modules(&mut self) -> String {
            self.loaded.clone()
        }
        fn builtin_modules(&mut self, release: &str) -> String {
            assert_eq!(release, "6.1.0-2");
            self.builtin.clone()
        }
        fn modprobe(&mut self, name: &str) -> Result<(), Error> {
            self.calls.push(format!("modprobe {name}"));
            if self.fail_modprobe.iter().any(|m| m == name) {
                return Err(Error::Command {
                    command: format!("modprobe {name}"),
                    stderr: "not found".into(),
                });
            }
            Ok(())
        }
        fn root_read_only(&mut self) -> Result<bool, Error> {
            Ok(self.read_only)
        }
        fn remount_root_rw(&mut self) -> Result<(), Error> {
            self.calls.push("remount / rw".into());
            self.read_only = false;
            Ok(())
        }
        fn reap(&mut self) -> usize {
            self.calls.push("reap".into());
            0
        }
        fn is_self(&mut self, path: &str) -> bool {
            path == self.me
        }
        fn exec(&mut self, path: &str, args: &[String]) -> Result<(), String> {
            let call = format!("exec {path} {}", args.join(" "));
            self.calls.push(call.trim_end().to_string());
            if self.executable.iter().any(|p| p == path) {
                Ok(())
            } else {
                Err("ENOENT: No such file or directory".into())
            }
        }
    }

    const ALL_MOUNTED: &str = "rootfs / rootfs rw 0 0\n/dev/mapper/vg-root / ext4 ro 0 0\n\
        proc /proc proc rw 0 0\nsysfs /sys sysfs rw 0 0\nudev /dev devtmpfs rw 0 0\n\
        tmpfs /run tmpfs rw 0 0\n";

    /// Every module the restore needs is loaded (by the boot script), the
    /// root is read-only, systemd is the init.
    fn host() -> FakeHost {
        let loaded: String = restore_modules()
            .iter()
            .map(|m| format!("{m} 16384 0 - Live 0x0\n"))
            .collect();
        FakeHost {
            mounts: ALL_MOUNTED.into(),
            loaded,
            read_only: true,
            me: INSTALLED_PATH.into(),
            executable: vec!["/sbin/init".into()],
            ..FakeHost::default()
        }
    }

    fn chained(host: FakeHost) -> Chained<Fake, FakeHost> {
        Chained::new(Fake::resuming(), host, vec!["single".into()])
    }

    /// The whole boot after the distribution's initramfs: nothing mounted
    /// again, no module loaded again, the root made writable, the restore
    /// exactly as in kupgrade's own initramfs, then the real init with the
    /// arguments the distribution passed.
    #[test]
    fn a_chained_boot_restores_in_the_mounted_root_and_execs_the_real_init() {
        let mut sys = chained(host());
        crate::boot(&mut sys).expect("an init runs");
        assert_eq!(
            sys.host.calls,
            [
                "open log",
                "reap",
                "remount / rw",
                // before the restore process starts
                "reap",
                "exec /sbin/init single"
            ]
        );
        // The restore: the fake's calls, from opening the image on.
        let fake = &sys.inner;
        let restore: Vec<&str> = crate::system::fake::FULL_BOOT
            .iter()
            .copied()
            .skip_while(|c| !c.starts_with("run restore process"))
            .take_while(|c| !c.starts_with("exec "))
            .collect();
        assert_eq!(fake.calls, restore);
        assert_eq!(fake.report().outcome, Outcome::Restored);
        assert_eq!(
            fake.events(),
            [
                Event::InitStart,
                Event::ModulesLoaded,
                Event::RootMounted,
                Event::ImageVerified,
                Event::NetRestored,
                Event::Restored,
                Event::ExecInit
            ]
        );
        let modules = &fake.events[1];
        let all = restore_modules().len().to_string();
        assert_eq!(
            (modules.field("loaded"), modules.field("failed")),
            (Some(all.as_str()), Some("0"))
        );
        assert!(fake.logged("remounted / read-write for the restore"));
    }

    /// Without `kupgrade.resume` (a boot script would not chain, but a
    /// user may): the root stays as the distribution mounted it.
    #[test]
    fn without_resume_the_root_is_left_read_only_and_nothing_is_restored() {
        let mut sys = chained(host());
        sys.inner.cmdline = "root=/dev/mapper/vg-root ro".into();
        crate::boot(&mut sys).expect("an init runs");
        assert_eq!(
            sys.host.calls,
            ["open log", "reap", "exec /sbin/init single"]
        );
        assert!(sys.inner.calls.is_empty(), "{:?}", sys.inner.calls);
        assert!(sys.inner.reports.is_empty());
    }

    /// What is missing is mounted, what is there is not mounted again.
    #[test]
    fn only_missing_kernel_file_systems_are_mounted() {
        let mut h = host();
        h.mounts = "/dev/vda / ext4 rw 0 0\nproc /proc proc rw 0 0\n".into();
        let mut sys = chained(h);
        crate::boot(&mut sys).expect("an init runs");
        assert_eq!(
            sys.host.calls[..3],
            ["mount sysfs /sys", "mount devtmpfs /dev", "open log"]
        );
    }

    /// A module that is neither loaded nor built in is loaded with the
    /// root's modprobe; one that fails is counted and logged, and the
    /// restore goes on.
    #[test]
    fn missing_modules_are_loaded_with_modprobe_and_failures_counted() {
        let mut h = host();
        h.loaded = "nf_tables 16384 0 - Live 0x0\ninet_diag 1 0 - Live 0\n".into();
        h.builtin = "kernel/net/ipv4/tcp_diag.ko\nkernel/net/ipv4/udp_diag.ko\n\
            kernel/net/unix/unix_diag.ko\nkernel/net/netlink/netlink_diag.ko\n\
            kernel/net/packet/af_packet_diag.ko\nkernel/drivers/nvdimm/libnvdimm.ko\n"
            .into();
        h.fail_modprobe = vec!["nd_btt".into()];
        let mut sys = chained(h);
        crate::boot(&mut sys).expect("an init runs");
        let probed = sys.host.modprobed();
        assert_eq!(
            probed,
            ["modprobe nd_btt", "modprobe nd_pmem", "modprobe nd_e820"]
        );
        let modules = &sys.inner.events[1];
        let loaded = (restore_modules().len() - 1).to_string();
        assert_eq!(
            (modules.field("loaded"), modules.field("failed")),
            (Some(loaded.as_str()), Some("1"))
        );
        assert!(sys.inner.logged("modprobe nd_btt failed: not found"));
        assert_eq!(sys.inner.report().outcome, Outcome::Restored);
    }

    /// The network's drivers that `stage` named on the command line are
    /// loaded too (dracut's image has none), except those built in.
    #[test]
    fn the_network_drivers_on_the_command_line_are_loaded_unless_built_in() {
        let mut h = host();
        h.builtin = "kernel/drivers/virtio/virtio_pci.ko\n".into();
        let mut sys = chained(h);
        sys.inner.cmdline = format!(
            "{} {}=virtio_net,virtio_pci,,virtio_net",
            sys.inner.cmdline,
            cmdline::MODULES
        );
        crate::boot(&mut sys).expect("an init runs");
        let probed = sys.host.modprobed();
        assert_eq!(probed, ["modprobe virtio_net"]);
        let modules = &sys.inner.events[1];
        let loaded = (restore_modules().len() + 2).to_string();
        assert_eq!(
            (modules.field("loaded"), modules.field("failed")),
            (Some(loaded.as_str()), Some("0"))
        );
        assert_eq!(sys.inner.report().outcome, Outcome::Restored);
    }

    /// `init=` is tried first, unless it names kupgrade-init itself (which
    /// would restore, find the image used, and exec itself for ever); then
    /// the usual list, in order.
    #[test]
    fn the_real_init_is_init_or_the_usual_list_never_kupgrade_init() {
        let mut h = host();
        h.executable = vec![];
        let mut sys = chained(h);
        sys.inner.cmdline = format!("root=/dev/vda init={INSTALLED_PATH}");
        let why = crate::boot(&mut sys).expect_err("no init runs");
        let execs: Vec<&str> = sys
            .host
            .calls
            .iter()
            .filter(|c| c.starts_with("exec"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            execs,
            [
                "exec /sbin/init single",
                "exec /etc/init single",
                "exec /bin/init single",
                "exec /bin/sh single"
            ]
        );
        assert!(
            why.starts_with(&format!(
                "cannot execute any init ({INSTALLED_PATH}: that is kupgrade-init itself; \
                 /sbin/init: ENOENT"
            )),
            "{why}"
        );
        assert!(
            why.ends_with("/bin/sh: ENOENT: No such file or directory)"),
            "{why}"
        );

        let mut sys = chained(host());
        sys.inner.cmdline = "root=/dev/vda init=/lib/systemd/systemd".into();
        sys.host.executable = vec!["/lib/systemd/systemd".into()];
        crate::boot(&mut sys).expect("an init runs");
        assert_eq!(
            sys.host.calls.last().map(String::as_str),
            Some("exec /lib/systemd/systemd single")
        );
    }

    /// A restore failure is reported and the real init runs, as in
    /// kupgrade's own initramfs.
    #[test]
    fn a_failed_restore_still_ends_in_the_real_init() {
        let mut sys = Chained::new(
            Fake::failing_at(&["criu restore a", "criu restore b"]),
            host(),
            vec![],
        );
        crate::boot(&mut sys).expect("an init runs");
        assert_eq!(sys.inner.report().outcome, Outcome::Failed);
        assert_eq!(
            sys.host.calls.last().map(String::as_str),
            Some("exec /sbin/init")
        );
        assert_eq!(sys.inner.ending(), [Event::RestoreFailed, Event::ExecInit]);
    }

    #[test]
    fn module_names_come_from_proc_modules_and_modules_builtin() {
        let names = module_names(
            "nd_pmem 24576 0 - Live 0xffff\nnf-tables 1 0 - Live 0\n",
            "kernel/drivers/nvdimm/libnvdimm.ko\nkernel/net/x/af-packet-diag.ko.xz\n\n",
        );
        assert_eq!(
            names,
            ["nd_pmem", "nf_tables", "libnvdimm", "af_packet_diag"]
        );
    }

    #[test]
    fn the_restore_modules_are_criu_s_and_the_pmem_store_s() {
        let m = restore_modules();
        for name in ["nf_tables", "unix_diag", "nd_pmem", "nd_e820"] {
            assert!(m.contains(&name), "{m:?}");
        }
    }
}
