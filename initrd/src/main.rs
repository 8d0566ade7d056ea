//! `kupgrade-init`: the `/init` of the kupgrade initramfs.
//!
//! A normal boot mounts the kernel file systems, loads the modules the
//! initramfs carries, mounts the real root from `root=`, switches to it and
//! execs the real init. With `kupgrade.resume` on the command line it first
//! restores the workloads from the image in the store named by
//! `kupgrade.store`. Whatever fails, the machine boots: a restore failure is
//! recorded and reported, never fatal.

mod boot;
mod log;
mod restore;
mod root;
mod timers;

use std::path::Path;
use std::time::Duration;

use contract::cmdline::{self, Cmdline};
use contract::events::{Event, EventLine};
use contract::PhaseTiming;

fn main() {
    if std::process::id() != 1 {
        eprintln!("kupgrade-init is the /init of an initramfs and must run as PID 1; nothing done");
        std::process::exit(2);
    }
    let mut events = Vec::new();
    if let Err(e) = boot::mount_kernel_fs() {
        info!("{e}");
    }
    log::open_kmsg();
    let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let resume = cmdline.has(cmdline::RESUME);
    events.push(PhaseTiming::from(&log::event(
        EventLine::now(Event::InitStart)
            .with("kernel", &release)
            .with("resume", resume),
    )));

    let (loaded, failed) = boot::load_modules(&release);
    events.push(PhaseTiming::from(&log::event(
        EventLine::now(Event::ModulesLoaded)
            .with("loaded", loaded)
            .with("failed", failed.len()),
    )));

    // A root that cannot be mounted leaves nothing to boot: say why, keep
    // trying (a slow controller may still come), and never exit PID 1.
    loop {
        match boot::mount_root(&cmdline, resume) {
            Ok(_) => break,
            Err(e) => {
                info!("{e}; retrying");
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    }
    if let Err(e) = boot::switch_root() {
        info!("{e}");
    }
    events.push(PhaseTiming::from(&log::event(EventLine::now(
        Event::RootMounted,
    ))));

    if resume {
        match cmdline.value(cmdline::STORE) {
            None => info!("kupgrade.resume without kupgrade.store: nothing to restore"),
            Some(store) => match restore::run(Path::new(store), &mut events) {
                restore::Restore::Skipped(restore::Skip::NoImage(why)) => {
                    info!("no image to restore: {why}")
                }
                restore::Restore::Skipped(restore::Skip::AlreadyUsed(state)) => {
                    info!("the image in {store} is {state}: not restoring it again")
                }
                restore::Restore::Done(report) => match &report.reason {
                    None => info!("restored {} workload(s)", report.workloads.len()),
                    Some(why) => info!("restore failed: {why}; booting normally"),
                },
            },
        }
    }

    log::event(
        EventLine::now(Event::ExecInit).with("init", cmdline.value("init").unwrap_or("/sbin/init")),
    );
    let why = boot::exec_init(&cmdline);
    // Nothing could be executed: PID 1 must not exit (that panics the kernel).
    info!("cannot execute any init ({why}); halting here");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
