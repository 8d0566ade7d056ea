//! Fault injection for the fault campaign: a [`System`] that passes every
//! call to the one it wraps, except the one that `kupgrade.failpoint=NAME`
//! on the kernel command line names, which fails as the machine could.
//! The real system has no test branches; `main` always wraps it, and
//! without the key nothing changes.

use std::path::Path;
use std::time::Duration;

use contract::cmdline::{self, Cmdline, InitFailpoint};
use contract::criu::Checkpoint;
use contract::devstate::{Interface, Route};
use contract::events::EventLine;
use contract::report::UpgradeReport;
use contract::WorkloadEntry;
use image_format::State;

use super::{Error, ImageInfo, Reboot, SupportMount, System};
use crate::log;

pub struct Faults<S> {
    inner: S,
    /// Armed once the command line is read (the first thing it can be).
    point: Option<InitFailpoint>,
    /// A module was failed already (only the first one fails).
    module_failed: bool,
}

impl<S: System> Faults<S> {
    pub fn new(inner: S) -> Self {
        Faults {
            inner,
            point: None,
            module_failed: false,
        }
    }

    fn injected(&self, point: InitFailpoint) -> Result<(), Error> {
        if self.point == Some(point) {
            return Err(Error::Injected { point });
        }
        Ok(())
    }
}

impl<S: System> System for Faults<S> {
    fn mount_kernel_fs(&mut self) -> Result<(), Error> {
        self.inner.mount_kernel_fs()
    }

    fn cmdline(&mut self) -> String {
        let text = self.inner.cmdline();
        if let Some(name) = Cmdline::parse(&text).value(cmdline::FAILPOINT) {
            match name.parse() {
                Ok(point) => {
                    self.inner
                        .log(&format!("{}={point}: injecting it", cmdline::FAILPOINT));
                    self.point = Some(point);
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
        if self.point == Some(InitFailpoint::ModuleLoad) && !self.module_failed {
            self.module_failed = true;
            self.injected(InitFailpoint::ModuleLoad)?;
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

    fn exec_init(&mut self, cmdline: &Cmdline) -> String {
        self.inner.exec_init(cmdline)
    }

    fn reboot(&mut self, how: Reboot) -> Error {
        self.inner.reboot(how)
    }

    fn open_image(&mut self, store: &Path) -> Result<ImageInfo, Error> {
        self.inner.open_image(store)
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

    fn install_lock_table(&mut self, nft: &str) -> Result<(), Error> {
        self.inner.install_lock_table(nft)
    }

    fn remove_lock_table(&mut self, name: &str) -> Result<(), Error> {
        self.inner.remove_lock_table(name)
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

    fn criu_restore(&mut self, checkpoint: &Checkpoint) -> Result<(), Error> {
        self.injected(InitFailpoint::CriuRestore)?;
        self.inner.criu_restore(checkpoint)
    }

    fn resume_restored(&mut self, w: &WorkloadEntry) -> Result<usize, Error> {
        self.inner.resume_restored(w)
    }

    fn write_report(&mut self, report: &UpgradeReport) -> Result<(), Error> {
        self.inner.write_report(report)
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
        crate::boot(&mut sys);
        let fake = &sys.inner;
        assert!(fake.restore_args.is_empty(), "CRIU was run");
        let expected: Vec<&str> = FULL_BOOT
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
        crate::boot(&mut sys);
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

    #[test]
    fn without_the_key_or_with_an_unknown_name_nothing_is_injected() {
        let mut sys = Faults::new(Fake::resuming());
        crate::boot(&mut sys);
        assert_eq!(&sys.inner.calls, FULL_BOOT);
        let mut sys = with_failpoint("no-such-fault");
        crate::boot(&mut sys);
        assert_eq!(&sys.inner.calls, FULL_BOOT);
        assert!(sys
            .inner
            .logged("unknown failpoint \"no-such-fault\"; ignored"));
    }
}
