//! `kupgrade-init`: the `/init` of the kupgrade initramfs, written against
//! the [`System`] seam so that its order and every failure path are tested
//! without a machine to boot.
//!
//! ```text
//! mount /proc /sys /dev, read the command line  -> init-start
//! load the modules the initramfs carries        -> modules-loaded
//! mount the real root, switch to it             -> root-mounted
//!   no root within the wait: mark a due image      restore-failed,
//!   failed, stop as panic= says (ending.rs)        then halt or restart
//! kupgrade.resume: restore (restore.rs)         -> image-verified, net-restored,
//!   any failure is reported, never fatal           restored | restore-failed
//! exec the real init                            -> exec-init
//! ```
//!
//! Whatever fails after the root is mounted, the machine boots: a restore
//! failure is recorded and reported, never fatal, and PID 1 never exits.

mod boot;
mod ending;
mod log;
mod restore;
mod root;
mod system;
mod timers;

use std::path::Path;
use std::time::Duration;

use contract::cmdline::{self, Cmdline};
use contract::events::{Event, EventLine};
use contract::report::ModuleFailure;
use contract::PhaseTiming;

use crate::log::chain;
use crate::system::faults::Faults;
use crate::system::real::RealSystem;
use crate::system::{Error, System};

fn main() {
    if std::process::id() != 1 {
        eprintln!("kupgrade-init is the /init of an initramfs and must run as PID 1; nothing done");
        std::process::exit(2);
    }
    let mut sys = Faults::new(RealSystem::default());
    let why = boot(&mut sys);
    // Nothing could be executed, or the machine would not stop: PID 1 must
    // not exit (that panics the kernel).
    sys.log(&format!("{why}; halting here"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The whole boot. Only returns if no init could be executed, or the
/// machine could not be stopped after the root never came, with why.
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
    let mut modules = EventLine::now(Event::ModulesLoaded)
        .with("loaded", loaded)
        .with("failed", failed.len());
    if !failed.is_empty() {
        modules = modules.with("failed_modules", names(&failed));
    }
    emit(sys, &mut events, modules);

    if let Err(why) = mount_root(sys, &cmdline, resume, &failed, &mut events) {
        return why;
    }
    if let Err(e) = sys.switch_root() {
        sys.log(&chain(&e));
    }
    emit(sys, &mut events, EventLine::now(Event::RootMounted));

    if resume {
        match cmdline.value(cmdline::STORE) {
            None => sys.log("kupgrade.resume without kupgrade.store: nothing to restore"),
            Some(store) => {
                let restore = restore::run(sys, Path::new(store), events, failed);
                sys.log(&restore.summary(store));
            }
        }
    }

    let init = cmdline.value("init").unwrap_or("/sbin/init");
    sys.emit(&EventLine::now(Event::ExecInit).with("init", init));
    format!("cannot execute any init ({})", sys.exec_init(&cmdline))
}

/// Emits an event and records it for the report.
fn emit(sys: &mut dyn System, events: &mut Vec<PhaseTiming>, e: EventLine) {
    sys.emit(&e);
    events.push(PhaseTiming::from(&e));
}

/// Loads the modules the initramfs carries, in order. One that fails is
/// logged and skipped: the rest of the boot may not need it. Returns how
/// many loaded, and which failed and why.
fn load_modules(sys: &mut dyn System, release: &str) -> (usize, Vec<ModuleFailure>) {
    let (mut loaded, mut failed) = (0, Vec::new());
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
                let error = match &e {
                    Error::Module { source, .. } => source.to_string(),
                    other => chain(other),
                };
                failed.push(ModuleFailure {
                    name: boot::module_name(&module),
                    error,
                });
            }
        }
    }
    if !failed.is_empty() {
        sys.log(&format!(
            "{} module(s) did not load: {}",
            failed.len(),
            names(&failed)
        ));
    }
    (loaded, failed)
}

fn names(failed: &[ModuleFailure]) -> String {
    let names: Vec<&str> = failed.iter().map(|m| m.name.as_str()).collect();
    names.join(",")
}

/// Mounts the real root (read-write for a restore, which writes to it),
/// waiting for its device as long as the command line allows. A root that
/// never comes ends the boot as initramfs-tools ends it ([`ending`]); an
/// image that was to be restored is marked failed first, with the reason.
/// `Err` only if the machine could not be stopped, with why.
fn mount_root(
    sys: &mut dyn System,
    cmdline: &Cmdline,
    resume: bool,
    failed_modules: &[ModuleFailure],
    events: &mut Vec<PhaseTiming>,
) -> Result<(), String> {
    let Err(e) = sys.mount_root(cmdline, resume, root::wait(cmdline)) else {
        return Ok(());
    };
    let mut why = format!("gave up on the root: {}", chain(&e));
    if !failed_modules.is_empty() {
        why.push_str(&format!(
            "; these modules did not load: {}",
            names(failed_modules)
        ));
    }
    sys.log(&why);
    if resume {
        if let Some(store) = cmdline.value(cmdline::STORE) {
            restore::abandon(sys, Path::new(store), &why, events);
        }
    }
    let e = ending::stop(sys, cmdline);
    Err(format!("{why}; {}", chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::Fake;
    use image_format::State;

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

    /// No root within the wait: the boot stops as `panic=` says, at once
    /// and for good (no retry, no real init), having said why.
    #[test]
    fn a_root_that_never_appears_ends_the_boot_as_panic_says() {
        let mut f = Fake::resuming();
        f.cmdline = "root=LABEL=kupgrade-root panic=-1".into();
        f.root_never_appears = true;
        let why = boot(&mut f);
        assert_eq!(
            f.calls,
            [
                "mount kernel fs",
                "load virtio_net.ko",
                "mount root",
                "restart"
            ]
        );
        assert_eq!(f.root_waits, [Duration::from_secs(30)]);
        assert_eq!(f.events(), [Event::InitStart, Event::ModulesLoaded]);
        let gave_up =
            "gave up on the root: root device LABEL=kupgrade-root did not appear within 30 s";
        assert!(f.logged(&format!("{gave_up} (modules")), "{:?}", f.logs);
        assert!(f.logged("restarting now (panic= on the command line)"));
        assert!(why.starts_with(gave_up), "{why}");
        assert!(why.ends_with("cannot restart the machine: EPERM: Operation not permitted"));
    }

    /// A root device that is there but does not mount is not retried
    /// either; without panic= the machine halts.
    #[test]
    fn a_root_that_will_not_mount_halts_without_panic() {
        let mut f = Fake::failing_at(&["mount root"]);
        f.cmdline = "root=/dev/vda rootdelay=45".into();
        boot(&mut f);
        assert_eq!(
            f.calls,
            [
                "mount kernel fs",
                "load virtio_net.ko",
                "mount root",
                "halt"
            ]
        );
        assert_eq!(f.root_waits, [Duration::from_secs(45)]);
        let why = format!("gave up on the root: {}", Fake::failure("mount root"));
        assert_eq!(f.logs[0], why);
        assert!(f.logs[1].starts_with("halting: this initramfs has no shell"));
        assert!(f.reports.is_empty());
    }

    /// The image that was to be restored is marked failed, and why is said
    /// (restore-failed), before the machine stops: no later boot restores
    /// it, and the console tells what went wrong.
    #[test]
    fn a_due_restore_is_marked_failed_before_the_machine_stops() {
        let mut f = Fake::resuming();
        f.cmdline.push_str(" rootdelay=60 panic=10");
        f.root_never_appears = true;
        boot(&mut f);
        assert_eq!(
            f.calls_after("mount root"),
            ["open /dev/pmem0", "mark failed", "sleep 10s", "restart"]
        );
        assert_eq!(f.ending(), [Event::ModulesLoaded, Event::RestoreFailed]);
        let why = f.events[2].field("reason").unwrap_or_default();
        assert!(
            why.starts_with(
                "gave up on the root: root device LABEL=kupgrade-root did not appear within 60 s"
            ),
            "{why}"
        );
        assert!(f.reports.is_empty(), "no root to write a report to");
        // Said in order: why, then how the machine stops.
        let at = |text: &str| f.logs.iter().position(|l| l.starts_with(text));
        assert!(
            at("gave up on the root") < at("restarting in 10 s"),
            "{:?}",
            f.logs
        );
    }

    /// An image that is not `written` is not the boot's to fail, and one
    /// that cannot be marked does not keep the machine from stopping.
    #[test]
    fn giving_up_leaves_a_used_image_alone_and_survives_a_failed_mark() {
        let mut used = Fake::resuming();
        used.root_never_appears = true;
        if let Some(i) = used.image.as_mut() {
            i.state = State::Restored;
        }
        boot(&mut used);
        assert_eq!(used.calls_after("mount root"), ["open /dev/pmem0", "halt"]);
        assert!(used.logged("the image in /dev/pmem0 is restored: left as it is"));
        assert_eq!(used.ending(), [Event::InitStart, Event::ModulesLoaded]);

        let mut unmarkable = Fake::failing_at(&["mark failed"]);
        unmarkable.root_never_appears = true;
        boot(&mut unmarkable);
        assert_eq!(
            unmarkable.calls_after("mount root"),
            ["open /dev/pmem0", "mark failed", "halt"]
        );
        assert!(unmarkable.logged(&format!(
            "cannot mark the image failed: {}",
            Fake::failure("mark failed")
        )));
    }

    /// Modules the kernel refuses (ENOEXEC: a compressed module it cannot
    /// unpack) are named in the log, the modules-loaded event, the report,
    /// and the reason the root was given up on.
    #[test]
    fn a_module_that_fails_is_named_everywhere_it_matters() {
        let mut f = Fake::resuming();
        f.modules = vec![
            "kernel/drivers/block/virtio_blk.ko.xz".into(),
            "kernel/drivers/nvdimm/nd-pmem.ko.xz".into(),
            "kernel/drivers/net/virtio_net.ko".into(),
        ];
        f.refused = f.modules[..2].to_vec();
        boot(&mut f);
        assert!(f.logged(
            "cannot load module /lib/modules/6.1.0-2/kernel/drivers/block/virtio_blk.ko.xz: ENOEXEC"
        ));
        assert!(f.logged("2 module(s) did not load: virtio_blk,nd_pmem"));
        let modules = &f.events[1];
        assert_eq!(
            (modules.field("loaded"), modules.field("failed")),
            (Some("1"), Some("2"))
        );
        assert_eq!(modules.field("failed_modules"), Some("virtio_blk,nd_pmem"));
        let failed: Vec<(&str, &str)> = f
            .report()
            .modules_failed
            .iter()
            .map(|m| (m.name.as_str(), m.error.as_str()))
            .collect();
        let enoexec = "ENOEXEC: Exec format error";
        assert_eq!(failed, [("virtio_blk", enoexec), ("nd_pmem", enoexec)]);

        f = Fake::resuming();
        f.modules = vec!["virtio_blk.ko.xz".into()];
        f.refused = f.modules.clone();
        f.root_never_appears = true;
        boot(&mut f);
        let why = f
            .events
            .last()
            .and_then(|e| e.field("reason"))
            .unwrap_or_default();
        assert!(
            why.ends_with("; these modules did not load: virtio_blk"),
            "{why}"
        );
    }
}
