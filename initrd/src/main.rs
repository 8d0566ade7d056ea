//! `kupgrade-init`: the `/init` of the kupgrade initramfs, written against
//! the [`System`] seam so that its order and every failure path are tested
//! without a machine to boot.
//!
//! ```text
//! mount /proc /sys /dev, read the command line  -> init-start
//! load the modules the initramfs carries        -> modules-loaded
//! mount the real root, switch to it             -> root-mounted
//! kupgrade.resume: restore (restore.rs)         -> image-verified, net-restored,
//!   any failure is reported, never fatal           restored | restore-failed
//! exec the real init                            -> exec-init
//! ```
//!
//! Whatever fails, the machine boots: a restore failure is recorded and
//! reported, never fatal, and PID 1 never exits.

mod boot;
mod chained;
mod log;
mod restore;
mod root;
mod system;
mod timers;

use std::path::Path;
use std::time::Duration;

use contract::cmdline::{self, Cmdline};
use contract::events::{Event, EventLine};
use contract::PhaseTiming;

use crate::log::chain;
use crate::system::faults::Faults;
use crate::system::real::RealSystem;
use crate::system::{Error, System};

/// How long to wait before trying a root that would not mount again.
const ROOT_RETRY: Duration = Duration::from_secs(5);

fn main() {
    if std::process::id() != 1 {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if let Some(code) = chained::tool(&args) {
            std::process::exit(code);
        }
        eprintln!("kupgrade-init is the /init of an initramfs and must run as PID 1; nothing done");
        std::process::exit(2);
    }
    if chained::after_an_initramfs() {
        chained::run();
    }
    let mut sys = Faults::new(RealSystem::default());
    let why = boot(&mut sys);
    // Nothing could be executed: PID 1 must not exit (that panics the kernel).
    sys.log(&format!("cannot execute any init ({why}); halting here"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The whole boot. Only returns if no init could be executed, with why.
fn boot(sys: &mut dyn System) -> String {
    if let Err(e) = sys.mount_kernel_fs() {
        sys.log(&chain(&e));
    }
    let cmdline = Cmdline::parse(&sys.cmdline());
    let release = sys.kernel_release();
    let resume = cmdline.has(cmdline::RESUME);
    let mut events = Vec::new();
    emit(
        sys,
        &mut events,
        EventLine::now(Event::InitStart)
            .with("kernel", &release)
            .with("resume", resume),
    );

    let (loaded, failed) = load_modules(sys, &release);
    emit(
        sys,
        &mut events,
        EventLine::now(Event::ModulesLoaded)
            .with("loaded", loaded)
            .with("failed", failed),
    );

    // A restore writes to the root.
    mount_root(sys, &cmdline, resume);
    if let Err(e) = sys.switch_root() {
        sys.log(&chain(&e));
    }
    emit(sys, &mut events, EventLine::now(Event::RootMounted));

    if resume {
        match cmdline.value(cmdline::STORE) {
            None => sys.log("kupgrade.resume without kupgrade.store: nothing to restore"),
            Some(store) => {
                let restore = restore::run(sys, Path::new(store), events);
                sys.log(&restore.summary(store));
            }
        }
    }

    let init = cmdline.value("init").unwrap_or("/sbin/init");
    sys.emit(&EventLine::now(Event::ExecInit).with("init", init));
    sys.exec_init(&cmdline)
}

/// Emits an event and records it for the report.
fn emit(sys: &mut dyn System, events: &mut Vec<PhaseTiming>, e: EventLine) {
    sys.emit(&e);
    events.push(PhaseTiming::from(&e));
}

/// Loads the modules the initramfs carries, in order. One that fails is
/// logged and skipped: the rest of the boot may not need it. Returns how
/// many loaded and how many failed.
fn load_modules(sys: &mut dyn System, release: &str) -> (usize, usize) {
    let (mut loaded, mut failed) = (0, 0);
    for module in sys.modules(release) {
        match sys.load_module(release, &module) {
            Ok(()) => loaded += 1,
            // Loaded already, as a dependency or by the kernel.
            Err(Error::Module {
                source: nix::Error::EEXIST,
                ..
            }) => loaded += 1,
            Err(e) => {
                sys.log(&chain(&e));
                failed += 1;
            }
        }
    }
    (loaded, failed)
}

/// A root that cannot be mounted leaves nothing to boot: say why, keep
/// trying (a slow controller may still come), and never exit PID 1.
fn mount_root(sys: &mut dyn System, cmdline: &Cmdline, writable: bool) {
    while let Err(e) = sys.mount_root(cmdline, writable) {
        sys.log(&format!("{}; retrying", chain(&e)));
        sys.sleep(ROOT_RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::Fake;

    const NORMAL_BOOT: &[&str] = &[
        "mount kernel fs",
        "load virtio_net.ko",
        "mount root",
        "switch root",
        "exec /sbin/init",
    ];

    #[test]
    fn without_resume_the_boot_goes_straight_to_the_real_init() {
        let mut f = Fake::resuming();
        f.cmdline = "root=/dev/vda console=ttyS0".into();
        boot(&mut f);
        assert_eq!(f.calls, NORMAL_BOOT);
        assert_eq!(
            f.events(),
            [
                Event::InitStart,
                Event::ModulesLoaded,
                Event::RootMounted,
                Event::ExecInit
            ]
        );
        assert_eq!(f.events[0].field("resume"), Some("false"));
        assert_eq!(f.events[0].field("kernel"), Some("6.1.0-2"));
        assert!(f.reports.is_empty());
    }

    #[test]
    fn resume_without_a_store_boots_normally_and_says_so() {
        let mut f = Fake::resuming();
        f.cmdline = "root=/dev/vda kupgrade.resume".into();
        boot(&mut f);
        assert_eq!(f.calls, NORMAL_BOOT);
        assert!(f.logged("without kupgrade.store"));
    }

    #[test]
    fn init_and_its_arguments_come_from_the_command_line() {
        let mut f = Fake::resuming();
        f.cmdline = "root=/dev/vda init=/lib/systemd/systemd -- single".into();
        boot(&mut f);
        assert_eq!(
            f.calls.last().map(String::as_str),
            Some("exec /lib/systemd/systemd")
        );
        let exec = f.events.last().expect("events");
        assert_eq!(exec.event, Event::ExecInit);
        assert_eq!(exec.field("init"), Some("/lib/systemd/systemd"));
    }

    /// The kernel file systems, a module, the switch: each failure is logged
    /// and the boot goes on.
    #[test]
    fn early_boot_failures_are_logged_and_the_boot_goes_on() {
        for at in ["mount kernel fs", "load virtio_net.ko", "switch root"] {
            let mut f = Fake::failing_at(&[at]);
            f.cmdline = "root=/dev/vda".into();
            boot(&mut f);
            assert_eq!(f.calls, NORMAL_BOOT, "failing at {at}");
            assert!(f.logged(&Fake::failure(at)), "failing at {at}");
        }
        let mut f = Fake::failing_at(&["load virtio_net.ko"]);
        boot(&mut f);
        let modules = &f.events[1];
        assert_eq!(modules.event, Event::ModulesLoaded);
        assert_eq!(
            (modules.field("loaded"), modules.field("failed")),
            (Some("0"), Some("1"))
        );
    }

    #[test]
    fn a_module_loaded_already_counts_as_loaded() {
        let mut f = Fake::resuming();
        f.modules = vec!["a.ko".into(), "b.ko".into()];
        f.loaded_already = vec!["b.ko".into()];
        boot(&mut f);
        let modules = &f.events[1];
        assert_eq!(
            (modules.field("loaded"), modules.field("failed")),
            (Some("2"), Some("0"))
        );
        assert!(!f.logged("b.ko"), "{:?}", f.logs);
    }

    #[test]
    fn a_root_that_will_not_mount_is_retried_until_it_does() {
        let mut f = Fake::failing_at(&["mount root"]);
        f.cmdline = "root=/dev/vda".into();
        boot(&mut f);
        assert_eq!(
            f.calls,
            [
                "mount kernel fs",
                "load virtio_net.ko",
                "mount root",
                "sleep 5s",
                "mount root",
                "switch root",
                "exec /sbin/init"
            ]
        );
        assert!(f.logged(&format!("{}; retrying", Fake::failure("mount root"))));
    }
}
