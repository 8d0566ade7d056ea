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
//! kupgrade.resume: the restore process          -> image-verified, net-restored,
//!   (restore.rs), watched by PID 1                 restored | restore-failed
//! exec the real init                            -> exec-init
//! ```
//!
//! Whatever fails after the root is mounted, the machine boots: a restore
//! failure is recorded and reported, never fatal, and PID 1 never exits.
//! What can go wrong in ways that would take PID 1 with it (a panic, an
//! allocation that fails, a thread that cannot start, a hang) happens in
//! the restore process: PID 1 starts it, kills it with its process group
//! once its budget is spent, and after any end but its own rescues the
//! restore ([`rescue`]). A root that never comes ends the boot as
//! initramfs-tools ends it: by `panic=`, never in a loop.

mod adopt;
mod boot;
mod chained;
mod child;
mod ending;
mod log;
mod netlink;
mod nftables;
mod relay;
mod restore;
mod root;
mod system;
mod timers;

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::time::Duration;

use contract::cmdline::{self, Cmdline};
use contract::events::{Event, EventLine};
use contract::report::{ModuleFailure, Outcome, UpgradeReport};
use contract::PhaseTiming;
use image_format::State;

use crate::log::chain;
use crate::system::faults::Faults;
use crate::system::real::RealSystem;
use crate::system::{Durability, Error, RestorerRun, System, RESTORER_ARG};

/// Where the kernel looks for an init when `init=` names none, in its
/// order (`kernel_init` in the kernel's `init/main.c`).
const FALLBACK_INITS: [&str; 4] = ["/sbin/init", "/etc/init", "/bin/init", "/bin/sh"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(RESTORER_ARG) {
        std::process::exit(restorer(&args[2..]));
    }
    if args.get(1).map(String::as_str) == Some(contract::journal::RELAY_ARG) {
        std::process::exit(relay::main(&args[2..]));
    }
    if std::process::id() != 1 {
        if let Some(code) = chained::tool(&args[1..]) {
            std::process::exit(code);
        }
        eprintln!("kupgrade-init is the /init of an initramfs and must run as PID 1; nothing done");
        std::process::exit(2);
    }
    // A panic's message goes where the log goes (console and kmsg).
    panic::set_hook(Box::new(|info| log::line(&format!("panic: {info}"))));
    if chained::after_an_initramfs() {
        chained::run();
    }
    let mut sys = Faults::new(RealSystem::default());
    let why = boot_whatever_happens(&mut sys).err().unwrap_or_default();
    // Nothing could be executed, or the machine would not stop: PID 1 must
    // not exit (that panics the kernel).
    sys.log(&format!("{why}; halting here"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// [`boot`], and after a panic in it, the real init all the same. With no
/// init to start (the panic came before the root was mounted), the boot
/// ends as `panic=` says, as it does when the root never comes.
fn boot_whatever_happens(sys: &mut dyn System) -> Result<(), String> {
    match panic::catch_unwind(AssertUnwindSafe(|| boot(sys))) {
        Ok(booted) => booted,
        Err(_) => {
            // The panic's message is in the log already (main's hook).
            sys.log("kupgrade-init panicked; starting the real init anyway");
            let cmdline = Cmdline::parse(&sys.cmdline());
            exec_init(sys, &cmdline).map_err(|why| {
                sys.log(&why);
                let e = ending::stop(sys, &cmdline);
                format!("{why}; {}", chain(&e))
            })
        }
    }
}

/// The whole boot. Only returns if no init could be executed, or the
/// machine could not be stopped after the root never came, with why.
fn boot(sys: &mut dyn System) -> Result<(), String> {
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

    // Returns only if the root never came and the machine would not stop.
    mount_root(sys, &cmdline, resume, &failed, &mut events)?;
    if let Err(e) = sys.switch_root() {
        sys.log(&chain(&e));
    }
    emit(sys, &mut events, EventLine::now(Event::RootMounted));

    if resume {
        match cmdline.value(cmdline::STORE) {
            None => sys.log("kupgrade.resume without kupgrade.store: nothing to restore"),
            Some(store) => {
                let run = RestorerRun {
                    store: store.into(),
                    events,
                    modules_failed: failed,
                    timeout: restore::timeout(&cmdline),
                };
                if let Err(e) = sys.run_restorer(&run) {
                    rescue(sys, &run, &release, &chain(&e));
                }
            }
        }
    }
    exec_init(sys, &cmdline)
}

/// The restore process (`kupgrade-init __restore STORE TIMEOUT_MS EVENTS
/// MODULES_FAILED`): exits 0 once the restore ran to its end, whatever it
/// restored; PID 1 takes any other end for a restore that did not finish.
fn restorer(args: &[String]) -> i32 {
    let [store, timeout_ms, events, modules_failed] = args else {
        eprintln!(
            "usage: kupgrade-init {RESTORER_ARG} STORE TIMEOUT_MS EVENTS_JSON MODULES_FAILED_JSON"
        );
        return 2;
    };
    let (Ok(ms), Ok(events), Ok(modules_failed)) = (
        timeout_ms.parse(),
        serde_json::from_str(events),
        serde_json::from_str(modules_failed),
    ) else {
        eprintln!("kupgrade-init {RESTORER_ARG}: bad timeout {timeout_ms:?}, events or modules");
        return 2;
    };
    log::open_kmsg();
    let mut sys = Faults::new(RealSystem::default());
    // Arms the failpoints the command line names.
    sys.cmdline();
    let run = RestorerRun {
        store: store.into(),
        events,
        modules_failed,
        timeout: Duration::from_millis(ms),
    };
    restore_process(&mut sys, &run);
    0
}

/// What the restore process does: the restore, and one line on it.
pub(crate) fn restore_process(sys: &mut dyn System, run: &RestorerRun) {
    let restore = restore::run(
        sys,
        &run.store,
        run.events.clone(),
        run.modules_failed.clone(),
        run.timeout,
    );
    sys.log(&restore.summary(&run.store.display().to_string()));
}

/// The restore process did not run to its end (it died, or it overran its
/// budget and was killed): lift what it may have left in the way of the
/// normal boot, make sure the image is never restored again, and say why.
fn rescue(sys: &mut dyn System, run: &RestorerRun, release: &str, why: &str) {
    let reason = format!("the restore did not finish: {why}");
    sys.log(&reason);
    // A lock left in place keeps the machine off the network.
    match sys.lock_tables() {
        Ok(tables) if tables.is_empty() => {}
        Ok(tables) => {
            if let Err(e) = sys.remove_lock_tables(&tables) {
                sys.log(&format!("lock tables {}: {}", tables.join(", "), chain(&e)));
            }
        }
        Err(e) => sys.log(&chain(&e)),
    }
    // The unpacked CRIU images hold process memory.
    sys.remove_scratch(Path::new(restore::UNPACK_DIR));
    // The restore turns it off while CRIU runs; on is the kernel's default.
    if let Err(e) = sys.swap_tcp_window_scaling("1") {
        sys.log(&chain(&e));
    }
    // The superblock only: the rest of the image may be what killed it.
    let generation = match sys.read_superblock(&run.store) {
        Ok(head) if head.state == State::Restored => {
            sys.log(
                "the image is marked restored: the restore was done, its report may be missing",
            );
            return;
        }
        Ok(head) => {
            if let Err(e) = sys.set_image_state(State::Failed) {
                sys.log(&format!("cannot mark the image failed: {}", chain(&e)));
            }
            Some(head.generation)
        }
        Err(e) => {
            sys.log(&format!("no image to mark failed: {}", chain(&e)));
            None
        }
    };
    // What the restore process wrote of this restore, if it got so far.
    // Without a superblock to say which restore it is, only a record.
    let written = sys.read_report().filter(|r| match generation {
        Some(g) => r.image_generation == g,
        None => r.outcome == Outcome::Restoring,
    });
    if written
        .as_ref()
        .is_some_and(|r| r.outcome != Outcome::Restoring)
    {
        // Not restored (that returned above): failed, and reported.
        sys.log("the restore process died after its report: keeping it");
        wipe(sys);
        return;
    }
    let mut report = written.unwrap_or_else(|| UpgradeReport {
        outcome: Outcome::Restoring,
        reason: None,
        kernel_from: String::new(),
        kernel_to: release.to_string(),
        image_generation: generation.unwrap_or(0),
        workloads: vec![],
        events: run.events.clone(),
        store: Some(run.store.display().to_string()),
        modules_failed: run.modules_failed.clone(),
    });
    for w in report
        .workloads
        .iter_mut()
        .filter(|w| !w.restored && w.error.is_none())
    {
        w.error = Some("the restore stopped before this workload".into());
    }
    emit(
        sys,
        &mut report.events,
        EventLine::now(Event::RestoreFailed).with("reason", &reason),
    );
    report.outcome = Outcome::Failed;
    report.reason = Some(reason);
    match sys.write_report(&report, Durability::Synced) {
        // The report keeps the reason; the image held process memory.
        Ok(()) if generation.is_some() => wipe(sys),
        Ok(()) => {}
        Err(e) => {
            sys.log(&chain(&e));
            sys.log("keeping the failed image: its report could not be written");
        }
    }
}

fn wipe(sys: &mut dyn System) {
    if let Err(e) = sys.wipe_image() {
        sys.log(&format!("cannot wipe the image: {}", chain(&e)));
    }
}

/// `init=` if given, then where the kernel looks: `init/main.c` tries them
/// in this order, skipping the missing ones. Unlike the kernel, which
/// panics when `init=` cannot run, a wrong `init=` falls back to the
/// others: a machine that boots beats a panic.
fn init_candidates(cmdline: &Cmdline) -> Vec<&str> {
    let mut inits: Vec<&str> = cmdline.value("init").into_iter().collect();
    for i in FALLBACK_INITS {
        if !inits.contains(&i) {
            inits.push(i);
        }
    }
    inits
}

/// Replaces PID 1 with the first init that runs; returns only why none did.
fn exec_init(sys: &mut dyn System, cmdline: &Cmdline) -> Result<(), String> {
    let mut failed = Vec::new();
    for init in init_candidates(cmdline) {
        sys.emit(&EventLine::now(Event::ExecInit).with("init", init));
        match sys.exec(init, &cmdline.init_args) {
            Ok(()) => return Ok(()),
            Err(why) => {
                sys.log(&format!("cannot execute {init}: {why}"));
                failed.push(format!("{init}: {why}"));
            }
        }
    }
    Err(format!("cannot execute any init ({})", failed.join("; ")))
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
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

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
        boot(&mut f).expect("an init runs");
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
        boot(&mut f).expect("an init runs");
        assert_eq!(f.calls, NORMAL_BOOT);
        assert!(f.logged("without kupgrade.store"));
    }

    #[test]
    fn init_and_its_arguments_come_from_the_command_line() {
        let mut f = Fake::resuming();
        f.cmdline = "root=/dev/vda init=/lib/systemd/systemd -- single".into();
        boot(&mut f).expect("an init runs");
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
            boot(&mut f).expect("an init runs");
            assert_eq!(f.calls, NORMAL_BOOT, "failing at {at}");
            assert!(f.logged(&Fake::failure(at)), "failing at {at}");
        }
        let mut f = Fake::failing_at(&["load virtio_net.ko"]);
        boot(&mut f).expect("an init runs");
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
        boot(&mut f).expect("an init runs");
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
        let why = boot(&mut f).unwrap_err();
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
        boot(&mut f).expect_err("the fake cannot halt");
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
        boot(&mut f).expect_err("the fake cannot restart");
        assert_eq!(
            f.calls_after("mount root"),
            [
                "read superblock /dev/pmem0",
                "mark failed",
                "sleep 10s",
                "restart"
            ]
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
        boot(&mut used).expect_err("the fake cannot halt");
        assert_eq!(
            used.calls_after("mount root"),
            ["read superblock /dev/pmem0", "halt"]
        );
        assert!(used.logged("the image in /dev/pmem0 is restored: left as it is"));
        assert_eq!(used.ending(), [Event::InitStart, Event::ModulesLoaded]);

        let mut unmarkable = Fake::failing_at(&["mark failed"]);
        unmarkable.root_never_appears = true;
        boot(&mut unmarkable).expect_err("the fake cannot halt");
        assert_eq!(
            unmarkable.calls_after("mount root"),
            ["read superblock /dev/pmem0", "mark failed", "halt"]
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
        boot(&mut f).expect("an init runs");
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
        boot(&mut f).expect_err("the fake cannot halt");
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

    /// A missing init (or `init=`) is skipped for the next in the kernel's
    /// order, each attempt an `exec-init` event and each failure logged.
    #[test]
    fn a_missing_init_falls_back_in_the_kernels_order() {
        let mut f = Fake::resuming();
        f.cmdline = "root=/dev/vda init=/lib/systemd/systemd".into();
        f.missing_inits = vec!["/lib/systemd/systemd".into(), "/sbin/init".into()];
        boot(&mut f).expect("an init runs");
        assert_eq!(
            f.calls_after("switch root"),
            [
                "exec /lib/systemd/systemd",
                "exec /sbin/init",
                "exec /etc/init"
            ]
        );
        assert!(f.logged("cannot execute /sbin/init: ENOENT"));
        let tried: Vec<Option<&str>> = f
            .events
            .iter()
            .filter(|e| e.event == Event::ExecInit)
            .map(|e| e.field("init"))
            .collect();
        assert_eq!(
            tried,
            [
                Some("/lib/systemd/systemd"),
                Some("/sbin/init"),
                Some("/etc/init")
            ]
        );
    }

    #[test]
    fn with_no_init_at_all_the_boot_says_why_each_failed() {
        let mut f = Fake::resuming();
        f.cmdline = "root=/dev/vda".into();
        f.missing_inits = FALLBACK_INITS.map(String::from).to_vec();
        let why = boot(&mut f).unwrap_err();
        assert_eq!(why.matches(": ENOENT").count(), 4, "{why}");
        assert!(
            why.starts_with("cannot execute any init (/sbin/init: ENOENT")
                && why.contains("/bin/sh: ENOENT")
        );
    }

    #[test]
    fn init_candidates_follow_the_kernel_without_repeating_one() {
        let c = |line: &str| init_candidates(&Cmdline::parse(line)).join(" ");
        assert_eq!(c("ro"), "/sbin/init /etc/init /bin/init /bin/sh");
        assert_eq!(c("init=/bin/sh"), "/bin/sh /sbin/init /etc/init /bin/init");
    }

    /// A panic in PID 1's own part of the boot still ends in the real init.
    #[test]
    fn a_panic_in_the_boot_still_ends_in_the_real_init() {
        let mut f = Fake::resuming();
        f.cmdline = "root=/dev/vda".into();
        f.panic_at = vec!["switch root".into()];
        boot_whatever_happens(&mut f).expect("an init runs");
        assert_eq!(f.calls_after("switch root"), ["exec /sbin/init"]);
        assert!(f.logged("kupgrade-init panicked; starting the real init anyway"));
    }

    #[test]
    fn the_restore_process_gets_the_store_the_events_and_the_budget() {
        let mut f = Fake::resuming();
        f.cmdline.push_str(" kupgrade.restore_timeout=90");
        boot(&mut f).expect("an init runs");
        let run = &f.restorer_runs[0];
        assert_eq!(run.store, Path::new("/dev/pmem0"));
        assert_eq!(run.timeout, Duration::from_secs(90));
        let names: Vec<&str> = run.events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names, ["init-start", "modules-loaded", "root-mounted"]);
    }

    /// A panic before the root is mounted leaves no init to start: the
    /// boot ends as panic= says, as it does when the root never comes.
    #[test]
    fn a_panic_before_the_root_ends_the_boot_as_panic_says() {
        let mut f = Fake::resuming();
        f.cmdline = "root=/dev/vda panic=-1".into();
        f.panic_at = vec!["mount root".into()];
        f.missing_inits = FALLBACK_INITS.map(String::from).to_vec();
        let why = boot_whatever_happens(&mut f).unwrap_err();
        assert_eq!(
            f.calls_after("mount root"),
            [
                "exec /sbin/init",
                "exec /etc/init",
                "exec /bin/init",
                "exec /bin/sh",
                "restart"
            ]
        );
        assert!(f.logged("restarting now (panic= on the command line)"));
        assert!(
            why.starts_with("cannot execute any init (/sbin/init: ENOENT")
                && why.ends_with("cannot restart the machine: EPERM: Operation not permitted"),
            "{why}"
        );
    }

    /// The modules that did not load reach the restore process, its record
    /// and report, and the report of a rescue that has no record to go by.
    #[test]
    fn failed_modules_reach_the_restore_process_and_a_rescue_report() {
        let named = |m: &[ModuleFailure]| m.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        let mut f = Fake::resuming();
        f.refused = f.modules.clone();
        boot(&mut f).expect("an init runs");
        assert_eq!(named(&f.restorer_runs[0].modules_failed), ["virtio_net"]);
        assert_eq!(named(&f.record().modules_failed), ["virtio_net"]);
        assert_eq!(named(&f.report().modules_failed), ["virtio_net"]);

        let mut f = Fake::resuming();
        f.refused = f.modules.clone();
        f.restorer_dies = Some(died());
        boot(&mut f).expect("an init runs");
        assert_eq!(f.reports.len(), 1, "the rescue's report only");
        assert_eq!(named(&f.report().modules_failed), ["virtio_net"]);
    }

    /// What follows a restore process that did not run to its end.
    const RESCUE: &[&str] = &[
        "list lock tables",
        "remove scratch",
        "tcp_window_scaling 1",
        "read superblock /dev/pmem0",
        "mark failed",
        "write report",
        "wipe",
        "exec /sbin/init",
    ];

    fn died() -> Error {
        Error::RestorerDied {
            status: ExitStatus::from_raw(6),
            stderr: "memory allocation of 107374182400 bytes failed\n".into(),
        }
    }

    /// A restore process that died (here of an allocation that failed,
    /// which aborts): the image is marked failed, the report says why, the
    /// real init runs.
    #[test]
    fn a_restore_process_that_dies_is_rescued() {
        let mut f = Fake::resuming();
        f.restorer_dies = Some(died());
        boot(&mut f).expect("an init runs");
        assert_eq!(f.calls_after("run restore process"), RESCUE);
        let r = f.report();
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(
            r.reason.as_deref(),
            Some(
                "the restore did not finish: kupgrade-init's restore process died \
                 (signal: 6 (SIGABRT)): memory allocation of 107374182400 bytes failed"
            )
        );
        assert_eq!(r.image_generation, 7);
        assert_eq!(r.kernel_to, "6.1.0-2");
        assert_eq!(f.ending(), [Event::RestoreFailed, Event::ExecInit]);
        let names: Vec<&str> = r.events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(
            names,
            [
                "init-start",
                "modules-loaded",
                "root-mounted",
                "restore-failed"
            ]
        );
        assert_eq!(f.image.as_ref().map(|i| i.state), Some(State::Failed));
    }

    /// Killed at its deadline with a lock table installed: the lock is
    /// lifted, so the normal boot has a network.
    #[test]
    fn a_restore_process_that_overruns_is_rescued_and_its_locks_lifted() {
        let mut f = Fake::resuming();
        f.locked = vec!["CRIU-10002".into()];
        f.restorer_dies = Some(Error::Child(crate::child::Error::Overran {
            command: "kupgrade-init's restore process".into(),
            within: Duration::from_secs(605),
        }));
        boot(&mut f).expect("an init runs");
        let mut expected = RESCUE.to_vec();
        expected.insert(1, "unlock CRIU-10002");
        assert_eq!(f.calls_after("run restore process"), expected);
        assert!(f.locked.is_empty());
        let why = f.report().reason.clone().unwrap_or_default();
        assert_eq!(
            why,
            "the restore did not finish: kupgrade-init's restore process did not finish \
             within 605 s: it and its process group were killed"
        );
    }

    /// Died after the image was marked restored: nothing to mark, and no
    /// report that would call a done restore a failure.
    #[test]
    fn a_rescue_leaves_an_image_marked_restored_alone() {
        let mut f = Fake::resuming();
        if let Some(i) = f.image.as_mut() {
            i.state = State::Restored;
        }
        f.restorer_dies = Some(died());
        boot(&mut f).expect("an init runs");
        assert_eq!(
            f.calls_after("read superblock /dev/pmem0"),
            ["exec /sbin/init"]
        );
        assert!(f.reports.is_empty());
    }

    /// Died after it wrote its report: the report stands.
    #[test]
    fn a_rescue_keeps_the_report_the_restore_process_wrote() {
        let mut f = Fake::resuming();
        let mut done = f.record_for_test();
        done.outcome = Outcome::Failed;
        done.reason = Some("CRIU could not restore a: it said no".into());
        f.written = Some(done.clone());
        f.restorer_dies = Some(died());
        boot(&mut f).expect("an init runs");
        assert_eq!(
            f.calls_after("read superblock /dev/pmem0"),
            ["mark failed", "wipe", "exec /sbin/init"]
        );
        assert_eq!(f.written, Some(done));
    }

    /// The report cannot be written: the image, marked failed, is all that
    /// is left of the restore, and is kept.
    #[test]
    fn a_rescue_that_cannot_report_keeps_the_image() {
        let mut f = Fake::failing_at(&["write report"]);
        f.restorer_dies = Some(died());
        boot(&mut f).expect("an init runs");
        assert_eq!(
            f.calls_after("mark failed"),
            ["write report", "exec /sbin/init"]
        );
        assert!(f.logged("keeping the failed image: its report could not be written"));
    }

    /// With no superblock to say which restore it was, the report of an
    /// older upgrade is not taken for this one's.
    #[test]
    fn a_rescue_without_a_superblock_does_not_take_an_old_report_for_its_own() {
        let mut f = Fake::failing_at(&["read superblock /dev/pmem0"]);
        let mut old = f.record_for_test();
        old.outcome = Outcome::Restored;
        old.image_generation = 3;
        f.written = Some(old);
        f.restorer_dies = Some(died());
        boot(&mut f).expect("an init runs");
        let r = f.report();
        assert_eq!((r.outcome, r.image_generation), (Outcome::Failed, 0));
        assert!(r.reason.as_deref().unwrap_or_default().contains("SIGABRT"));
    }

    /// Failures of the rescue itself are logged; it goes on to the report
    /// and the real init.
    #[test]
    fn a_rescue_goes_on_past_its_own_failures() {
        let mut f = Fake::failing_at(&["list lock tables", "read superblock /dev/pmem0"]);
        f.restorer_dies = Some(died());
        boot(&mut f).expect("an init runs");
        assert_eq!(
            f.calls_after("read superblock /dev/pmem0"),
            ["write report", "exec /sbin/init"]
        );
        assert!(f.logged(&Fake::failure("list lock tables")));
        assert_eq!(f.report().image_generation, 0);
    }
}
