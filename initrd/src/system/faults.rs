//! Fault injection for the fault campaign: a [`System`] that passes every
//! call to the one it wraps, except those that `kupgrade.failpoint=NAME,...`
//! on the kernel command line names, which fail as the machine could.
//! The real system has no test branches; `main` always wraps it, and
//! without the key nothing changes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use contract::cmdline::{self, Cmdline, InitFailpoint};
use contract::devstate::{Interface, Route};
use contract::events::EventLine;
use contract::report::UpgradeReport;
use contract::WorkloadEntry;
use image_format::State;

use super::{
    CriuRun, Durability, Error, ImageHead, ImageInfo, Reboot, RestorerRun, SupportMount, System,
};
use crate::adopt::Adoption;
use crate::log;

/// The action script of `criu-restore-hang`: it never returns, and what it
/// waits on is a child of its own, as with a CRIU stuck on a helper.
const HANG_SCRIPT: &str = "#!/bin/sh\n# kupgrade.failpoint=criu-restore-hang\nsleep 86400\n";

pub struct Faults<S> {
    inner: S,
    /// Armed once the command line is read (the first thing it can be).
    points: Vec<InitFailpoint>,
    /// A module was failed already (only the first one fails).
    module_failed: bool,
    /// A CRIU was made to hang already (only the first one hangs).
    criu_hung: bool,
    /// Workloads in the image, and CRIU restores asked for so far.
    workloads: usize,
    criu_runs: usize,
}

impl<S: System> Faults<S> {
    pub fn new(inner: S) -> Self {
        Faults {
            inner,
            points: vec![],
            module_failed: false,
            criu_hung: false,
            workloads: 0,
            criu_runs: 0,
        }
    }

    #[cfg(test)]
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn armed(&self, point: InitFailpoint) -> bool {
        self.points.contains(&point)
    }

    fn injected(&self, point: InitFailpoint) -> Result<(), Error> {
        if self.armed(point) {
            return Err(Error::Injected { point });
        }
        Ok(())
    }

    /// Writes [`HANG_SCRIPT`] next to CRIU's images (a private tmpfs that
    /// goes with them) and returns its path. A script that cannot be
    /// written is logged: CRIU then fails to run it, a failure instead of a
    /// hang.
    fn hang_script(&mut self, run: &CriuRun) -> PathBuf {
        let path = run.checkpoint.images_dir.with_file_name("failpoint-hang");
        let written = fs::write(&path, HANG_SCRIPT)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o700)));
        if let Err(e) = written {
            self.inner
                .log(&format!("cannot write {}: {e}", path.display()));
        }
        path
    }
}

impl<S: System> System for Faults<S> {
    fn mount_kernel_fs(&mut self) -> Result<(), Error> {
        self.inner.mount_kernel_fs()
    }

    fn cmdline(&mut self) -> String {
        let text = self.inner.cmdline();
        let names = Cmdline::parse(&text)
            .value(cmdline::FAILPOINT)
            .unwrap_or_default()
            .to_string();
        for name in names.split(',').filter(|n| !n.is_empty()) {
            match name.parse() {
                Ok(point) => {
                    self.inner
                        .log(&format!("{}={point}: injecting it", cmdline::FAILPOINT));
                    self.points.push(point);
                }
                Err(e) => self.inner.log(&format!("{}; ignored", log::chain(&e))),
            }
        }
        text
    }

    fn kernel_release(&mut self) -> String {
        self.inner.kernel_release()
    }

    fn modules(&mut self, release: &str) -> Vec<String> {
        self.inner.modules(release)
    }

    fn load_module(&mut self, release: &str, module: &str) -> Result<(), Error> {
        if self.armed(InitFailpoint::ModuleLoad) && !self.module_failed {
            self.module_failed = true;
            self.injected(InitFailpoint::ModuleLoad)?;
        }
        if crate::boot::module_name(module) == "nd_pmem" {
            self.injected(InitFailpoint::PmemModuleLoad)?;
        }
        self.inner.load_module(release, module)
    }

    fn mount_root(
        &mut self,
        cmdline: &Cmdline,
        writable: bool,
        wait: Duration,
    ) -> Result<(), Error> {
        self.inner.mount_root(cmdline, writable, wait)
    }

    fn sleep(&mut self, d: Duration) {
        self.inner.sleep(d)
    }

    fn switch_root(&mut self) -> Result<(), Error> {
        self.inner.switch_root()
    }

    fn exec(&mut self, init: &str, args: &[String]) -> Result<(), String> {
        self.inner.exec(init, args)
    }

    fn run_restorer(&mut self, run: &RestorerRun) -> Result<(), Error> {
        self.inner.run_restorer(run)
    }

    fn reboot(&mut self, how: Reboot) -> Error {
        self.inner.reboot(how)
    }

    fn open_image(&mut self, store: &Path) -> Result<ImageInfo, Error> {
        let info = self.inner.open_image(store)?;
        self.workloads = info.manifest.workloads.len();
        Ok(info)
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
        self.criu_runs += 1;
        if self.criu_runs >= self.workloads {
            let at = format!(
                "{}: at the last workload's criu restore",
                cmdline::FAILPOINT
            );
            if self.armed(InitFailpoint::RestorePanic) {
                panic!("{at}: restore-panic");
            }
            if self.armed(InitFailpoint::RestoreHang) {
                self.inner.log(&format!("{at}: restore-hang: hanging"));
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
        self.injected(InitFailpoint::CriuRestore)?;
        if self.armed(InitFailpoint::CriuRestoreHang) && !self.criu_hung {
            self.criu_hung = true;
            let mut hung = run.clone();
            hung.action_scripts.push(self.hang_script(run));
            return self.inner.criu_restore(&hung);
        }
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
        self.injected(InitFailpoint::ReportWrite)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::{Fake, FULL_BOOT};
    use contract::events::Event;
    use contract::report::Outcome;

    fn with_failpoint(name: &str) -> Faults<Fake> {
        let mut fake = Fake::resuming();
        fake.cmdline
            .push_str(&format!(" kupgrade.failpoint={name}"));
        Faults::new(fake)
    }

    /// CRIU is never run; the image is marked failed with the failpoint as
    /// the reason, and the boot goes on to the real init.
    #[test]
    fn a_criu_restore_failpoint_fails_every_workload_and_boots() {
        let mut sys = with_failpoint("criu-restore");
        crate::boot(&mut sys).expect("an init runs");
        let fake = &sys.inner;
        assert!(fake.restore_args.is_empty(), "CRIU was run");
        let mut expected: Vec<&str> = FULL_BOOT
            .iter()
            .copied()
            .filter(|c| !c.starts_with("criu restore") && !c.starts_with("resume") && *c != "wipe")
            .map(|c| {
                if c == "mark restored" {
                    "mark failed"
                } else {
                    c
                }
            })
            .collect();
        // A failed image is wiped after its report, not before.
        let reported = expected.iter().position(|c| *c == "write report");
        expected.insert(reported.expect("a report") + 1, "wipe");
        // No CRIU lifted the lock: the restore does.
        let listed = expected.iter().position(|c| *c == "list lock tables");
        expected.insert(
            listed.expect("a look at the locks") + 1,
            "unlock CRIU-10002",
        );
        assert_eq!(fake.calls, expected);
        let report = fake.report();
        assert_eq!(report.outcome, Outcome::Failed);
        assert!(report.workloads.iter().all(|w| !w.restored));
        let why = report.reason.as_deref().unwrap_or_default();
        assert!(
            why.starts_with(
                "CRIU could not restore a, b: failpoint kupgrade.failpoint=criu-restore"
            ),
            "{why}"
        );
        assert_eq!(fake.ending(), [Event::RestoreFailed, Event::ExecInit]);
    }

    #[test]
    fn a_module_failpoint_fails_the_first_module_only() {
        let mut sys = with_failpoint("module-load");
        sys.inner.modules = vec!["a.ko".into(), "b.ko".into()];
        crate::boot(&mut sys).expect("an init runs");
        let fake = &sys.inner;
        // a.ko was never given to the machine; b.ko was; the boot went on.
        assert!(!fake.calls.iter().any(|c| c == "load a.ko"));
        assert!(fake.calls.iter().any(|c| c == "load b.ko"));
        assert!(fake.logged("kupgrade.failpoint=module-load: injecting it"));
        let modules = &fake.events[1];
        assert_eq!(
            (modules.field("loaded"), modules.field("failed")),
            (Some("1"), Some("1"))
        );
        assert_eq!(fake.report().outcome, Outcome::Restored);
        assert_eq!(
            fake.calls.last().map(String::as_str),
            Some("exec /sbin/init")
        );
    }

    /// The first CRIU runs with the hanging action script and the deadline
    /// the restore gave it; the others run as usual.
    #[test]
    fn a_criu_restore_hang_failpoint_hangs_the_first_criu_only() {
        let mut sys = with_failpoint("criu-restore-hang");
        crate::boot(&mut sys).expect("an init runs");
        let fake = &sys.inner;
        let script = |args: &Vec<String>| {
            args.windows(2)
                .find(|p| p[0] == "--action-script")
                .map(|p| p[1].clone())
        };
        assert_eq!(
            script(&fake.restore_args[0]).as_deref(),
            Some("/run/kupgrade-restore/failpoint-hang")
        );
        assert_eq!(script(&fake.restore_args[1]), None);
        assert_eq!(fake.calls, FULL_BOOT);
        // The share of the default budget the restore gives the first of
        // two workloads of one size.
        let first = fake.criu_deadlines[0].as_secs();
        assert!((268..=270).contains(&first), "{first}");
    }

    /// The restore process panics at the last workload's CRIU, with the
    /// first restored and the network locked: PID 1 lifts the lock, marks
    /// the image failed and says why.
    #[test]
    fn a_restore_panic_failpoint_ends_the_restore_process_and_pid_1_rescues() {
        let mut sys = with_failpoint("restore-panic");
        crate::boot(&mut sys).expect("an init runs");
        let fake = &sys.inner;
        assert_eq!(
            fake.calls_after("resume a"),
            [
                "note progress",
                "list lock tables",
                "unlock CRIU-10002",
                "remove scratch",
                "tcp_window_scaling 1",
                "read superblock /dev/pmem0",
                "mark failed",
                "write report",
                "wipe",
                "exec /sbin/init"
            ]
        );
        let why = fake.report().reason.clone().unwrap_or_default();
        assert!(
            why.starts_with("the restore did not finish: kupgrade-init's restore process died")
                && why.ends_with(
                    "kupgrade.failpoint: at the last workload's criu restore: restore-panic"
                ),
            "{why}"
        );
        assert_eq!(fake.ending(), [Event::RestoreFailed, Event::ExecInit]);
        // The report is the record's, with what it knew of each workload.
        let r = fake.report();
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.kernel_from, "6.1.0-1");
        let fate: Vec<(bool, Option<&str>)> = r
            .workloads
            .iter()
            .map(|w| (w.restored, w.error.as_deref()))
            .collect();
        assert_eq!(
            fate,
            [
                (true, None),
                (false, Some("the restore stopped before this workload"))
            ]
        );
        let last: Vec<&str> = r
            .events
            .iter()
            .rev()
            .take(2)
            .map(|e| e.event.as_str())
            .collect();
        assert_eq!(last, ["restore-failed", "net-restored"]);
    }

    /// No report can be written: the restore goes on all the same, and says so.
    #[test]
    fn a_report_write_failpoint_does_not_stop_the_restore() {
        let mut sys = with_failpoint("report-write");
        crate::boot(&mut sys).expect("an init runs");
        let fake = &sys.inner;
        assert!(fake.reports.is_empty());
        assert!(fake.calls.iter().any(|c| c == "wipe"));
        assert!(fake.logged("cannot record the restore: failpoint kupgrade.failpoint=report-write"));
        assert!(fake.logged("restored 2 workload(s)"));
        assert_eq!(fake.ending(), [Event::Restored, Event::ExecInit]);
    }

    #[test]
    fn several_failpoints_are_armed_at_once() {
        let mut sys = with_failpoint("module-load,criu-restore");
        crate::boot(&mut sys).expect("an init runs");
        let fake = &sys.inner;
        assert!(!fake.calls.iter().any(|c| c == "load virtio_net.ko"));
        assert!(fake.restore_args.is_empty(), "CRIU was run");
        assert_eq!(fake.report().outcome, Outcome::Failed);
    }

    #[test]
    fn without_the_key_or_with_an_unknown_name_nothing_is_injected() {
        let mut sys = Faults::new(Fake::resuming());
        crate::boot(&mut sys).expect("an init runs");
        assert_eq!(&sys.inner.calls, FULL_BOOT);
        let mut sys = with_failpoint("no-such-fault");
        crate::boot(&mut sys).expect("an init runs");
        assert_eq!(&sys.inner.calls, FULL_BOOT);
        assert!(sys
            .inner
            .logged("unknown failpoint \"no-such-fault\"; ignored"));
    }

    #[test]
    fn the_pmem_module_failpoint_fails_nd_pmem_only() {
        let mut sys = with_failpoint("pmem-module-load");
        sys.inner.modules = vec![
            "libnvdimm.ko".into(),
            "kernel/drivers/nvdimm/nd_pmem.ko.xz".into(),
        ];
        crate::boot(&mut sys).expect("an init runs");
        let fake = &sys.inner;
        assert!(fake.calls.iter().any(|c| c == "load libnvdimm.ko"));
        assert!(!fake.calls.iter().any(|c| c.contains("nd_pmem")));
        let failed: Vec<&str> = fake
            .report()
            .modules_failed
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(failed, ["nd_pmem"]);
    }
}
