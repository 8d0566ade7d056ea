//! The restore, written against the [`System`] seam: runs in the real root
//! (after the switch), as PID 1, before the real init.
//!
//! ```text
//! open image -> `written`? -> mark restoring -> device state -> support fs, tmpfs files
//!   -> unpack the CRIU images (image-verified)
//!   -> loopback, lock tables, interfaces, routes (net-restored) -> hostname, RNG seed
//!   -> criu restore and resume, each workload -> remove the images and the locks
//!   -> mark restored and wipe | mark failed -> restored | restore-failed -> report
//! ```
//!
//! Nothing here stops the boot. No image, or one that is not `written`, is
//! left alone; once the image is marked `restoring`, any failure marks it
//! `failed` with the reason in the report, and the boot goes on.

use std::path::Path;
use std::time::Instant;

use contract::criu::Checkpoint;
use contract::devstate::{self, DeviceState};
use contract::events::{Event, EventLine};
use contract::report::{self, Outcome, UpgradeReport, WorkloadOutcome};
use contract::{PhaseTiming, WorkloadEntry};
use image_format::{Manifest, State};

use crate::log::chain;
use crate::system::{Error, SupportMount, System};

/// Private tmpfs the CRIU images are unpacked into (inside the real root, so
/// CRIU runs in the same file tree as at dump time).
const UNPACK_DIR: &str = "/run/kupgrade-restore";

/// Why nothing was restored and the boot just goes on.
#[derive(Debug)]
pub enum Skip {
    /// No store, or no image in it: a plain boot with `kupgrade.resume`.
    NoImage(Error),
    /// An image that was already restored, or failed, or is mid-restore from
    /// a boot that crashed: never restore twice.
    AlreadyUsed(State),
    /// Restoring an image that cannot be marked `restoring` could restore
    /// it twice after a crash.
    CannotMark(Error),
}

#[derive(Debug)]
pub enum Restore {
    Skipped(Skip),
    Done(Box<UpgradeReport>),
}

impl Restore {
    /// One line for the log.
    pub fn summary(&self, store: &str) -> String {
        match self {
            Restore::Skipped(Skip::NoImage(e)) => format!("no image to restore: {}", chain(e)),
            Restore::Skipped(Skip::AlreadyUsed(state)) => {
                format!("the image in {store} is {state}: not restoring it again")
            }
            Restore::Skipped(Skip::CannotMark(e)) => format!(
                "cannot mark the image restoring: {}; not restoring it",
                chain(e)
            ),
            Restore::Done(report) => match &report.reason {
                None => format!("restored {} workload(s)", report.workloads.len()),
                Some(why) => format!("restore failed: {why}; booting normally"),
            },
        }
    }
}

/// Why the restore stopped before CRIU ran; the report's reason is
/// [`chain`] of it.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("device state")]
    DeviceState(#[source] Error),
    #[error("device state does not parse")]
    DeviceStateParse(#[source] serde_json::Error),
    #[error("tmpfs files")]
    TmpfsFiles(#[source] Error),
    #[error(transparent)]
    Scratch(Error),
    #[error("workload {0}")]
    Unpack(String, #[source] Error),
    #[error(transparent)]
    Network(Error),
}

/// Restores the image in `store`, if there is one to restore. `events` are
/// the init's so far, for the report.
pub fn run(sys: &mut dyn System, store: &Path, events: Vec<PhaseTiming>) -> Restore {
    let image = match sys.open_image(store) {
        Ok(i) => i,
        Err(e) => return Restore::Skipped(Skip::NoImage(e)),
    };
    if image.state != State::Written {
        return Restore::Skipped(Skip::AlreadyUsed(image.state));
    }
    // From here on the image is ours: mark it first, so that a crash during
    // the restore can never lead to a second restore of the same image.
    if let Err(e) = sys.set_image_state(State::Restoring) {
        return Restore::Skipped(Skip::CannotMark(e));
    }
    let r = Restorer {
        sys,
        manifest: &image.manifest,
        events,
        lock_tables: vec![],
    };
    Restore::Done(Box::new(r.run(image.generation)))
}

struct Restorer<'a> {
    sys: &'a mut dyn System,
    manifest: &'a Manifest,
    events: Vec<PhaseTiming>,
    /// Lock tables installed, to lift whatever happens.
    lock_tables: Vec<String>,
}

impl Restorer<'_> {
    fn emit(&mut self, e: EventLine) {
        crate::emit(self.sys, &mut self.events, e);
    }

    fn log(&mut self, line: &str) {
        self.sys.log(line);
    }

    fn run(mut self, generation: u64) -> UpgradeReport {
        let (reason, workloads) = self.restore();
        let (outcome, state) = match reason {
            None => (Outcome::Restored, State::Restored),
            Some(_) => (Outcome::Failed, State::Failed),
        };
        if let Err(e) = self.sys.set_image_state(state) {
            self.log(&format!("cannot mark the image {state}: {}", chain(&e)));
        }
        if outcome == Outcome::Restored {
            // The image holds process memory: do not leave it lying in RAM.
            if let Err(e) = self.sys.wipe_image() {
                self.log(&format!("cannot wipe the image: {}", chain(&e)));
            }
        }
        self.emit(match &reason {
            None => EventLine::now(Event::Restored).with("workloads", workloads.len()),
            Some(why) => EventLine::now(Event::RestoreFailed).with("reason", why),
        });
        let mut events = self.manifest.phases.clone();
        events.append(&mut self.events);
        let report = UpgradeReport {
            outcome,
            reason,
            kernel_from: self.manifest.kernel_from.clone(),
            kernel_to: self.manifest.kernel_to.clone(),
            image_generation: generation,
            workloads,
            events,
        };
        if let Err(e) = self.sys.write_report(&report) {
            self.log(&chain(&e));
        }
        report
    }

    /// Returns the reason of a failure, and each workload's fate.
    fn restore(&mut self) -> (Option<String>, Vec<WorkloadOutcome>) {
        let manifest = self.manifest;
        if let Err(failure) = self.prepare() {
            self.cleanup();
            let why = chain(&failure);
            let not_restored = manifest
                .workloads
                .iter()
                .map(|w| WorkloadOutcome {
                    name: w.name.clone(),
                    root_pid: w.root_pid,
                    restored: false,
                    error: Some(why.clone()),
                    criu_log: None,
                })
                .collect();
            return (Some(why), not_restored);
        }
        let scaling = self.tcp_window_scaling_off();
        let outcomes: Vec<WorkloadOutcome> = manifest
            .workloads
            .iter()
            .map(|w| self.restore_workload(w))
            .collect();
        if let Some(old) = scaling {
            if let Err(e) = self.sys.swap_tcp_window_scaling(&old) {
                self.log(&chain(&e));
            }
        }
        self.cleanup();
        let failed: Vec<&WorkloadOutcome> = outcomes.iter().filter(|o| !o.restored).collect();
        let Some(first) = failed.first() else {
            return (None, outcomes);
        };
        // The first failure's own reason: the others often follow from it.
        let names: Vec<&str> = failed.iter().map(|o| o.name.as_str()).collect();
        let why = format!(
            "CRIU could not restore {}: {}",
            names.join(", "),
            first.error.as_deref().unwrap_or("no reason given")
        );
        (Some(why), outcomes)
    }

    /// Unpacks the image and re-applies the device state.
    fn prepare(&mut self) -> Result<(), Failure> {
        let blob = self
            .sys
            .read_section(devstate::SECTION)
            .map_err(Failure::DeviceState)?;
        let state: DeviceState =
            serde_json::from_slice(&blob).map_err(Failure::DeviceStateParse)?;
        self.mount_support_fs(&state);
        if self.manifest.section(devstate::TMPFS_SECTION).is_some() {
            self.sys
                .unpack(devstate::TMPFS_SECTION, Path::new("/"))
                .map_err(Failure::TmpfsFiles)?;
        }
        let scratch = Path::new(UNPACK_DIR);
        self.sys.mount_scratch(scratch).map_err(Failure::Scratch)?;
        for w in &self.manifest.workloads {
            self.sys
                .unpack(&w.section, &scratch.join(&w.name))
                .map_err(|e| Failure::Unpack(w.name.clone(), e))?;
        }
        self.emit(
            EventLine::now(Event::ImageVerified).with("workloads", self.manifest.workloads.len()),
        );
        self.apply_network(&state).map_err(Failure::Network)?;
        self.emit(EventLine::now(Event::NetRestored).with("interfaces", state.interfaces.len()));
        if !state.hostname.is_empty() {
            if let Err(e) = self.sys.set_hostname(&state.hostname) {
                self.log(&chain(&e));
            }
        }
        if !state.rng_seed.is_empty() {
            if let Err(e) = self.sys.seed_rng(&state.rng_seed) {
                self.log(&chain(&e));
            }
        }
        Ok(())
    }

    /// What the restored tasks expect to find: the tmpfs mounts they used,
    /// cgroup2 (CRIU puts them back in their cgroups), devpts. One that
    /// fails is logged; the restore may not need it.
    fn mount_support_fs(&mut self, state: &DeviceState) {
        let tmpfs = state.tmpfs_mounts.iter().map(|m| SupportMount::Tmpfs {
            path: m.path.clone(),
            options: m.options.clone(),
        });
        let devpts = SupportMount::Devpts {
            options: state.devpts_options.clone(),
        };
        let all: Vec<SupportMount> = tmpfs.chain([SupportMount::Cgroup2, devpts]).collect();
        for m in &all {
            if let Err(e) = self.sys.mount_support(m) {
                self.log(&chain(&e));
            }
        }
    }

    fn apply_network(&mut self, state: &DeviceState) -> Result<(), Error> {
        // CRIU's own probes connect over loopback.
        self.sys.loopback_up()?;
        // The lock tables go in before any address: until CRIU has re-created
        // the sockets, the new kernel must not answer their peers with resets.
        for table in &state.network_locks {
            self.sys.install_lock_table(table)?;
            if let Some(name) = table_name(table) {
                self.lock_tables.push(name);
            }
        }
        for iface in &state.interfaces {
            self.sys.configure_interface(iface)?;
        }
        for r in &state.routes {
            if let Err(e) = self.sys.add_route(r) {
                // A route the kernel already made (e.g. the subnet's) is fine.
                self.log(&format!("route {}: {}", r.dst, chain(&e)));
            }
        }
        Ok(())
    }

    /// A connection that never negotiated window scaling is re-created with
    /// the kernel's default scale, so it would advertise a tiny window; with
    /// scaling off during the restore the scale is 0 and the window right.
    /// Returns the value to put back.
    fn tcp_window_scaling_off(&mut self) -> Option<String> {
        if !self.manifest.workloads.iter().any(|w| w.tcp_established) {
            return None;
        }
        match self.sys.swap_tcp_window_scaling("0") {
            Ok(old) => Some(old),
            Err(e) => {
                self.log(&chain(&e));
                None
            }
        }
    }

    fn restore_workload(&mut self, w: &WorkloadEntry) -> WorkloadOutcome {
        let images_dir = Path::new(UNPACK_DIR).join(&w.name);
        let log = Path::new(report::DIR).join(format!("restore-{}.log", w.name));
        let checkpoint = Checkpoint {
            workload: w,
            images_dir: &images_dir,
            log: &log,
        };
        let start = Instant::now();
        let error = match self.sys.criu_restore(&checkpoint) {
            Ok(()) => {
                self.resume(w);
                None
            }
            Err(e) => Some(chain(&e)),
        };
        self.log(&format!(
            "workload {} (pid {}): {} in {} ms",
            w.name,
            w.root_pid,
            if error.is_none() {
                "restored"
            } else {
                "NOT restored"
            },
            start.elapsed().as_millis()
        ));
        WorkloadOutcome {
            name: w.name.clone(),
            root_pid: w.root_pid,
            restored: error.is_none(),
            error,
            criu_log: Some(log.display().to_string()),
        }
    }

    /// Lets the tasks CRIU left stopped run, after fixing their timers.
    fn resume(&mut self, w: &WorkloadEntry) {
        match self.sys.resume_restored(w) {
            Ok(0) => {}
            Ok(n) => self.log(&format!(
                "workload {}: re-armed {n} periodic timer(s) CRIU restored disarmed",
                w.name
            )),
            Err(e) => self.log(&format!("workload {}: {}", w.name, chain(&e))),
        }
    }

    /// Frees the unpacked images and lifts any lock CRIU did not lift
    /// itself, so a failed restore leaves a working network.
    fn cleanup(&mut self) {
        self.sys.remove_scratch(Path::new(UNPACK_DIR));
        for t in std::mem::take(&mut self.lock_tables) {
            if let Err(e) = self.sys.remove_lock_table(&t) {
                self.log(&format!("lock table {t}: {}", chain(&e)));
            }
        }
    }
}

/// `table inet CRIU-123 {` -> `CRIU-123`
pub(crate) fn table_name(nft: &str) -> Option<String> {
    let line = nft.lines().find(|l| l.trim_start().starts_with("table "))?;
    let mut words = line.split_whitespace().skip(1);
    let first = words.next()?;
    let name = if ["ip", "ip6", "inet", "arp", "bridge", "netdev"].contains(&first) {
        words.next()?
    } else {
        first
    };
    Some(name.trim_end_matches('{').trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot;
    use crate::system::fake::{Fake, FULL_BOOT};

    const EXEC: &str = "exec /sbin/init";

    #[test]
    fn lock_table_names_are_read_from_nft_output() {
        assert_eq!(
            table_name("table inet CRIU-4242 {\n chain x {}\n}\n").as_deref(),
            Some("CRIU-4242")
        );
        assert_eq!(table_name("table CRIU-1 {").as_deref(), Some("CRIU-1"));
        assert_eq!(table_name("nothing"), None);
    }

    #[test]
    fn a_restore_runs_every_step_in_order_and_ends_in_the_real_init() {
        let mut f = Fake::resuming();
        boot(&mut f);
        assert_eq!(f.calls, FULL_BOOT);
        assert_eq!(
            f.events(),
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
        let r = f.report();
        assert_eq!(r.outcome, Outcome::Restored);
        assert_eq!(r.reason, None);
        assert_eq!(r.image_generation, 7);
        assert_eq!(
            (r.kernel_from.as_str(), r.kernel_to.as_str()),
            ("6.1.0-1", "6.1.0-2")
        );
        assert!(r.workloads.iter().all(|w| w.restored && w.error.is_none()));
        assert_eq!(
            r.workloads[1].criu_log.as_deref(),
            Some("/var/lib/kupgrade/restore-b.log")
        );
        // The agent's events first, then the init's, up to the last recorded.
        let names: Vec<&str> = r.events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(
            names,
            [
                "frozen",
                "init-start",
                "modules-loaded",
                "root-mounted",
                "image-verified",
                "net-restored",
                "restored"
            ]
        );
        // Each workload is restored from its own images, with its options.
        let tcp = |args: &Vec<String>| args.iter().any(|a| a == "--tcp-established");
        assert!(!tcp(&f.restore_args[0]) && tcp(&f.restore_args[1]));
        assert!(f.restore_args[1]
            .windows(2)
            .any(|p| p[0] == "--images-dir" && p[1] == "/run/kupgrade-restore/b"));
        assert!(f.logged("restored 2 workload(s)"));
    }

    /// What follows a failure before CRIU ran: the images (and the lock
    /// table, once installed) are removed, the image is marked failed, the
    /// report written, and the real init runs.
    const FAILED_BEFORE_LOCK: &[&str] = &["remove scratch", "mark failed", "write report", EXEC];
    const FAILED_AFTER_LOCK: &[&str] = &[
        "remove scratch",
        "unlock CRIU-10002",
        "mark failed",
        "write report",
        EXEC,
    ];
    /// After `criu restore a`, when it failed.
    const CRIU_A_FAILED: &[&str] = &[
        "criu restore b",
        "resume b",
        "tcp_window_scaling 1",
        "remove scratch",
        "unlock CRIU-10002",
        "mark failed",
        "write report",
        EXEC,
    ];

    /// Each failing step of an image that was marked `restoring`: the calls
    /// that follow it, and what the report's reason adds to the failure.
    #[test]
    fn every_failure_after_marking_is_reported_and_ends_in_the_real_init() {
        use Outcome::Failed;
        let cases: &[(&str, &[&str], &str)] = &[
            ("read devstate", FAILED_BEFORE_LOCK, "device state: "),
            ("unpack tmpfs", FAILED_BEFORE_LOCK, "tmpfs files: "),
            ("mount scratch", FAILED_BEFORE_LOCK, ""),
            ("unpack criu/b", FAILED_BEFORE_LOCK, "workload b: "),
            ("lo up", FAILED_BEFORE_LOCK, ""),
            ("lock CRIU-10002", FAILED_BEFORE_LOCK, ""),
            ("iface eth0", FAILED_AFTER_LOCK, ""),
            (
                "criu restore a",
                CRIU_A_FAILED,
                "CRIU could not restore a: ",
            ),
            (
                "criu restore b",
                &CRIU_A_FAILED[2..],
                "CRIU could not restore b: ",
            ),
        ];
        for (at, after, reason) in cases {
            let mut f = Fake::failing_at(&[at]);
            boot(&mut f);
            assert_eq!(&f.calls_after(at), after, "failing at {at}");
            let r = f.report();
            assert_eq!(r.outcome, Failed, "failing at {at}");
            let why = r.reason.as_deref().unwrap_or_default();
            assert_eq!(
                why,
                format!("{reason}{}", Fake::failure(at)),
                "failing at {at}"
            );
            assert_eq!(
                f.ending(),
                [Event::RestoreFailed, Event::ExecInit],
                "failing at {at}"
            );
            assert!(f.logged(&format!("restore failed: {why}; booting normally")));
            if !at.starts_with("criu") {
                // Failed before CRIU ran: no workload was restored.
                assert!(r
                    .workloads
                    .iter()
                    .all(|w| !w.restored && w.criu_log.is_none()));
            }
        }
    }

    /// One workload that CRIU cannot restore does not keep the other from
    /// running: it is restored and resumed, the failed one is named.
    #[test]
    fn one_of_two_workloads_failing_still_restores_the_other() {
        let mut f = Fake::failing_at(&["criu restore a"]);
        boot(&mut f);
        let r = f.report();
        let fate: Vec<(&str, bool)> = r
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w.restored))
            .collect();
        assert_eq!(fate, [("a", false), ("b", true)]);
        assert_eq!(
            r.workloads[0].error.as_deref(),
            Some(Fake::failure("criu restore a").as_str())
        );
        assert_eq!(
            r.workloads[0].criu_log.as_deref(),
            Some("/var/lib/kupgrade/restore-a.log")
        );
        assert!(f.calls.iter().any(|c| c == "resume b"));
        assert!(!f.calls.iter().any(|c| c == "resume a" || c == "wipe"));
    }

    /// Failures that do not stop the restore: logged, and everything else
    /// happens as in a restore where nothing failed.
    #[test]
    fn failures_that_do_not_stop_the_restore_are_logged() {
        let cases = [
            "mount tmpfs /dev/shm",
            "mount cgroup2",
            "mount devpts",
            "route default",
            "hostname vm",
            "seed rng",
            "resume a",
            "tcp_window_scaling 1",
            "unlock CRIU-10002",
            "mark restored",
            "wipe",
            "write report",
        ];
        for at in cases {
            let mut f = Fake::failing_at(&[at]);
            boot(&mut f);
            assert_eq!(f.calls, FULL_BOOT, "failing at {at}");
            assert_eq!(f.report().outcome, Outcome::Restored, "failing at {at}");
            assert!(
                f.logged(&Fake::failure(at)),
                "failing at {at}: {:?}",
                f.logs
            );
            assert_eq!(f.ending(), [Event::Restored, Event::ExecInit], "{at}");
        }
    }

    /// The runtime state comes back before CRIU runs: the tmpfs mounts in
    /// the order the image gives (a parent before what is mounted in it),
    /// devpts with the old boot's options, then the files on them.
    #[test]
    fn runtime_state_is_mounted_and_unpacked_before_criu_runs() {
        let mut f = Fake::resuming().with_state(|s| {
            s.tmpfs_mounts = ["/run", "/run/user/1000", "/dev/shm"]
                .map(|p| contract::devstate::TmpfsMount {
                    path: p.into(),
                    options: "mode=755".into(),
                })
                .to_vec();
            s.devpts_options = Some("gid=5,mode=600,ptmxmode=000".into());
        });
        boot(&mut f);
        let at = |call: &str| f.calls.iter().position(|c| c == call).unwrap();
        let order = [
            "mount tmpfs /run",
            "mount tmpfs /run/user/1000",
            "mount tmpfs /dev/shm",
            "mount devpts gid=5,mode=600,ptmxmode=000",
            "unpack tmpfs",
            "criu restore a",
        ];
        for pair in order.windows(2) {
            assert!(at(pair[0]) < at(pair[1]), "{pair:?} in {:?}", f.calls);
        }
        assert_eq!(f.report().outcome, Outcome::Restored);
    }

    /// A workload whose root does not lead its session is restored as a
    /// shell job, running (not left stopped, or its orphaned group would
    /// get SIGHUP), and resumed like the others.
    #[test]
    fn a_shell_job_is_restored_as_one_and_resumed() {
        let mut f = Fake::resuming().with_workloads(|w| w[0].shell_job = true);
        boot(&mut f);
        assert_eq!(f.calls, FULL_BOOT);
        let has = |args: &Vec<String>, option: &str| args.iter().any(|a| a == option);
        assert!(has(&f.restore_args[0], "--shell-job"));
        assert!(!has(&f.restore_args[0], "--leave-stopped"));
        assert!(!has(&f.restore_args[1], "--shell-job"));
        assert!(has(&f.restore_args[1], "--leave-stopped"));
        assert_eq!(f.report().outcome, Outcome::Restored);
    }

    /// Turning window scaling off fails: the restore goes on and does not
    /// write back a value it never read.
    #[test]
    fn window_scaling_that_cannot_be_turned_off_is_not_turned_back_on() {
        let mut f = Fake::failing_at(&["tcp_window_scaling 0"]);
        boot(&mut f);
        let expected: Vec<&str> = FULL_BOOT
            .iter()
            .copied()
            .filter(|c| *c != "tcp_window_scaling 1")
            .collect();
        assert_eq!(f.calls, expected);
        assert_eq!(f.report().outcome, Outcome::Restored);
    }

    #[test]
    fn device_state_that_does_not_parse_fails_the_restore_before_any_change() {
        let mut f = Fake::resuming();
        f.devstate = b"{not json".to_vec();
        boot(&mut f);
        assert_eq!(f.calls_after("read devstate"), FAILED_BEFORE_LOCK);
        let why = f.report().reason.clone().unwrap_or_default();
        assert!(why.starts_with("device state does not parse: "), "{why}");
    }

    /// A report is written even when the image cannot be marked failed.
    #[test]
    fn a_failure_to_mark_the_image_failed_is_logged_and_the_report_written() {
        let mut f = Fake::failing_at(&["lo up", "mark failed"]);
        boot(&mut f);
        assert_eq!(f.calls_after("lo up"), FAILED_BEFORE_LOCK);
        assert!(f.logged(&format!(
            "cannot mark the image failed: {}",
            Fake::failure("mark failed")
        )));
        assert_eq!(f.report().outcome, Outcome::Failed);
    }

    /// Nothing to restore, or nothing that may be restored: no change to the
    /// image, no report, and the real init runs.
    #[test]
    fn an_image_that_is_missing_or_used_or_unmarkable_is_left_alone() {
        let mut no_image = Fake::resuming();
        no_image.image = None;
        let open = "open /dev/pmem0";
        let mut cases = vec![
            (
                no_image,
                open,
                "no image to restore: no kupgrade image in this store".to_string(),
            ),
            (
                Fake::failing_at(&[open]),
                open,
                format!("no image to restore: {}", Fake::failure(open)),
            ),
            (
                Fake::failing_at(&["mark restoring"]),
                "mark restoring",
                format!(
                    "cannot mark the image restoring: {}; not restoring it",
                    Fake::failure("mark restoring")
                ),
            ),
        ];
        for state in [State::Restoring, State::Restored, State::Failed] {
            let mut f = Fake::resuming();
            if let Some(i) = f.image.as_mut() {
                i.state = state;
            }
            let says = format!("the image in /dev/pmem0 is {state}: not restoring it again");
            cases.push((f, open, says));
        }
        for (mut f, last, says) in cases {
            boot(&mut f);
            assert_eq!(f.calls_after(last), [EXEC], "{says}");
            assert!(f.reports.is_empty(), "{says}");
            assert!(f.logged(&says), "{says}: {:?}", f.logs);
            assert_eq!(
                f.events(),
                [
                    Event::InitStart,
                    Event::ModulesLoaded,
                    Event::RootMounted,
                    Event::ExecInit
                ],
                "{says}"
            );
        }
    }
}
