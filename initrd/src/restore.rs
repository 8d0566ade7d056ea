//! The restore, written against the [`System`] seam: runs in the real root
//! (after the switch), in the restore process PID 1 starts, before the real
//! init.
//!
//! ```text
//! open image -> `written`? -> mark restoring -> record it (`restoring`, synced)
//!   -> device state -> support fs, loopback, start CRIU's probe of the kernel
//!   -> tmpfs files -> unpack the CRIU images (image-verified)
//!   -> lock tables, interfaces, routes (net-restored) -> hostname, RNG seed
//!   -> CRIU's probe done -> criu restore and resume, each workload (its fate noted)
//!   -> remove the images -> mark restored -> restored -> locks CRIU left -> wipe -> report
//!    | mark failed -> restore-failed -> locks CRIU left -> report -> wipe
//! ```
//!
//! Nothing here stops the boot. No image, or one that is not `written`, is
//! left alone; once the image is marked `restoring`, any failure marks it
//! `failed` with the reason in the report, and the boot goes on. Should the
//! restore process die or hang, PID 1 finishes the job from the record
//! (`main.rs`, `rescue`).
//!
//! The restore has one time budget (`kupgrade.restore_timeout`, 10 minutes
//! by default). Each workload's `criu restore` may take a share of what is
//! left of it, in proportion to its images, so that a hung CRIU is killed
//! in time for the workloads after it and for the report.

use std::path::Path;
use std::time::{Duration, Instant};

use contract::cmdline::{self, Cmdline};

use contract::criu::Checkpoint;
use contract::devstate::{self, DeviceState};
use contract::events::{Event, EventLine};
use contract::report::{self, ModuleFailure, Outcome, UpgradeReport, WorkloadOutcome};
use contract::{PhaseTiming, WorkloadEntry};
use image_format::{Manifest, State};

use crate::adopt::Adoption;
use crate::log::chain;
use crate::system::{CriuRun, Durability, Error, SupportMount, System};

/// Private tmpfs the CRIU images are unpacked into (inside the real root, so
/// CRIU runs in the same file tree as at dump time).
pub const UNPACK_DIR: &str = "/run/kupgrade-restore";

/// How long the whole restore may take unless `kupgrade.restore_timeout`
/// says otherwise: far more than a restore needs, far less than forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// What a workload's images weigh on top of their size when the time is
/// shared: CRIU's own start and the kernel probes take time too.
const WEIGHT_FLOOR: u64 = 64 << 20;
/// How long the restore waits for CRIU's probe of the kernel at most: it
/// takes about a second under emulation, and is only a head start.
const PROBE_WAIT: Duration = Duration::from_secs(60);

/// The restore's time budget: `kupgrade.restore_timeout=SECONDS`, else
/// [`DEFAULT_TIMEOUT`].
pub fn timeout(cmdline: &Cmdline) -> Duration {
    cmdline
        .value(cmdline::RESTORE_TIMEOUT)
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
}

/// Kept back from CRIU for what follows it: the cleanup, marking the image,
/// the report.
fn wrap_up(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_secs(60))
}

/// The part of `left` that one workload's `criu restore` may take: its
/// weight's share of its own and the later workloads' (`rest`, its own
/// included), so that a CRIU that hangs leaves the others their time.
fn criu_share(left: Duration, weight: u64, rest: u64) -> Duration {
    if rest == 0 {
        return left;
    }
    let share = left.as_millis() * u128::from(weight) / u128::from(rest);
    Duration::from_millis(u64::try_from(share).unwrap_or(u64::MAX))
}

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

/// Restores the image in `store`, if there is one to restore, within
/// `timeout`. `events` are the init's so far, and `modules_failed` the
/// modules that did not load, for the report.
pub fn run(
    sys: &mut dyn System,
    store: &Path,
    events: Vec<PhaseTiming>,
    modules_failed: Vec<ModuleFailure>,
    timeout: Duration,
) -> Restore {
    let children_until = Instant::now() + timeout.saturating_sub(wrap_up(timeout));
    let mut steps = Steps::new();
    let image = match sys.open_image(store) {
        Ok(i) => i,
        Err(e @ Error::Image(image_format::Error::NoImage)) => {
            return Restore::Skipped(Skip::NoImage(e))
        }
        // A resume boot with no store, or an image that does not read: an
        // image was due and cannot be restored, which the report must say.
        Err(e) => return unreadable(sys, store, &e, events, modules_failed),
    };
    if image.state != State::Written {
        return Restore::Skipped(Skip::AlreadyUsed(image.state));
    }
    // From here on the image is ours: mark it first, so that a crash during
    // the restore can never lead to a second restore of the same image.
    steps.done("open");
    if let Err(e) = sys.set_image_state(State::Restoring) {
        return Restore::Skipped(Skip::CannotMark(e));
    }
    steps.done("mark restoring");
    let manifest = &image.manifest;
    let record = UpgradeReport {
        outcome: Outcome::Restoring,
        reason: None,
        kernel_from: manifest.kernel_from.clone(),
        kernel_to: manifest.kernel_to.clone(),
        image_generation: image.generation,
        workloads: manifest
            .workloads
            .iter()
            .map(|w| WorkloadOutcome::not_restored(w, None))
            .collect(),
        events: vec![],
        store: Some(store.display().to_string()),
        modules_failed,
    };
    let r = Restorer {
        sys,
        manifest,
        events,
        lock_tables: vec![],
        probing: false,
        children_until,
        record,
        steps,
    };
    Restore::Done(Box::new(r.run()))
}

/// The image due for this resume boot cannot be opened: the store is
/// missing (its module did not load, its reservation was dropped) or its
/// superblock or manifest is damaged. Nothing is restored; an image whose
/// superblock still reads is marked failed, so that no later boot tries it,
/// and whatever the store holds is wiped once the report keeps the reason.
fn unreadable(
    sys: &mut dyn System,
    store: &Path,
    e: &Error,
    mut events: Vec<PhaseTiming>,
    modules_failed: Vec<ModuleFailure>,
) -> Restore {
    let head = match sys.read_superblock(store) {
        Ok(head) if head.state != State::Written => {
            return Restore::Skipped(Skip::AlreadyUsed(head.state))
        }
        Ok(head) => Some(head),
        Err(_) => None,
    };
    if head.is_some() {
        if let Err(e) = sys.set_image_state(State::Failed) {
            sys.log(&format!("cannot mark the image failed: {}", chain(&e)));
        }
    }
    let reason = format!("cannot read the image in {}: {}", store.display(), chain(e));
    crate::emit(
        sys,
        &mut events,
        EventLine::now(Event::RestoreFailed).with("reason", &reason),
    );
    let report = UpgradeReport {
        outcome: Outcome::Failed,
        reason: Some(reason),
        kernel_from: String::new(),
        kernel_to: sys.kernel_release(),
        image_generation: head.as_ref().map_or(0, |h| h.generation),
        workloads: vec![],
        events,
        store: Some(store.display().to_string()),
        modules_failed,
    };
    match sys.write_report(&report, Durability::Synced) {
        // Also when the superblock is damaged: the store still holds the
        // image's memory. A store that never appeared has nothing to wipe.
        Ok(()) => match sys.wipe_image() {
            Ok(()) | Err(Error::NoStore) => {}
            Err(e) => sys.log(&format!("cannot wipe the image: {}", chain(&e))),
        },
        Err(e) => sys.log(&chain(&e)),
    }
    Restore::Done(Box::new(report))
}

/// The restore cannot happen (the root never came): a `written` image is
/// marked failed, so that no later boot restores it onto a root that has
/// moved on, and why goes to the console and kmsg (`restore-failed`). With
/// no root there is nowhere to write the report, so the image is kept.
///
/// PID 1 does this itself, no restore process is started: it reads the
/// superblock only, as [`crate::rescue`] does, and leaves the rest of the
/// image unread.
pub fn abandon(sys: &mut dyn System, store: &Path, why: &str, events: &mut Vec<PhaseTiming>) {
    match sys.read_superblock(store) {
        Err(e) => {
            sys.log(&format!("no image to mark failed: {}", chain(&e)));
            return;
        }
        Ok(head) if head.state != State::Written => {
            sys.log(&format!(
                "the image in {} is {}: left as it is",
                store.display(),
                head.state
            ));
            return;
        }
        Ok(_) => {}
    }
    if let Err(e) = sys.set_image_state(State::Failed) {
        sys.log(&format!("cannot mark the image failed: {}", chain(&e)));
    }
    crate::emit(
        sys,
        events,
        EventLine::now(Event::RestoreFailed).with("reason", why),
    );
}

struct Restorer<'a> {
    sys: &'a mut dyn System,
    manifest: &'a Manifest,
    events: Vec<PhaseTiming>,
    /// Lock tables installed, to lift whatever happens.
    lock_tables: Vec<String>,
    /// CRIU's probe of the kernel runs.
    probing: bool,
    /// When the last CRIU must have finished.
    children_until: Instant,
    /// The report while the restore runs: `restoring`, and what is known.
    record: UpgradeReport,
    /// Where the time went until the images are unpacked.
    steps: Steps,
}

/// Raw bytes of a workload's CRIU images: its frozen dump and its pre-dumps
/// (CRIU reads their pages as well).
fn images_len(manifest: &Manifest, w: &WorkloadEntry) -> u64 {
    let prefix = format!("{}/pre/", w.section);
    manifest
        .sections
        .iter()
        .filter(|s| s.name == w.section || s.name.starts_with(&prefix))
        .map(|s| s.raw_len)
        .sum()
}

/// Durations of consecutive steps, for one log line: the new kernel's
/// console is where a slow restore is looked into.
struct Steps {
    last: Instant,
    done: Vec<(String, Duration)>,
}

impl Steps {
    fn new() -> Self {
        Steps {
            last: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Ends the step under way, named `name`.
    fn done(&mut self, name: impl Into<String>) {
        let now = Instant::now();
        self.done.push((name.into(), now - self.last));
        self.last = now;
    }

    /// "N ms: a N ms, b N ms"
    fn summary(&self) -> String {
        let total: Duration = self.done.iter().map(|(_, d)| *d).sum();
        let parts: Vec<String> = self
            .done
            .iter()
            .map(|(n, d)| format!("{n} {} ms", d.as_millis()))
            .collect();
        format!("{} ms: {}", total.as_millis(), parts.join(", "))
    }
}

impl Restorer<'_> {
    fn emit(&mut self, e: EventLine) {
        crate::emit(self.sys, &mut self.events, e);
    }

    fn log(&mut self, line: &str) {
        self.sys.log(line);
    }

    fn wipe(&mut self) {
        if let Err(e) = self.sys.wipe_image() {
            self.log(&format!("cannot wipe the image: {}", chain(&e)));
        }
    }

    /// Writes the record as it stands.
    fn note(&mut self, how: Durability) {
        let mut events = self.manifest.phases.clone();
        events.extend(self.events.iter().cloned());
        self.record.events = events;
        if let Err(e) = self.sys.write_report(&self.record, how) {
            self.log(&format!("cannot record the restore: {}", chain(&e)));
        }
    }

    fn run(mut self) -> UpgradeReport {
        // Before anything else, and on the disk: from here on, a reset or a
        // crash leaves a report that says this restore began and never
        // ended, not an older upgrade's report standing for this one.
        self.note(Durability::Synced);
        self.steps.done("record");
        let (reason, workloads) = self.restore();
        let (outcome, state) = match reason {
            None => (Outcome::Restored, State::Restored),
            Some(_) => (Outcome::Failed, State::Failed),
        };
        if let Err(e) = self.sys.set_image_state(state) {
            self.log(&format!("cannot mark the image {state}: {}", chain(&e)));
        }
        // Before the wipe: the workloads run from here (they were resumed
        // as each was restored), and the blackout ends with this event.
        self.emit(match &reason {
            None => EventLine::now(Event::Restored).with("workloads", workloads.len()),
            Some(why) => EventLine::now(Event::RestoreFailed).with("reason", why),
        });
        // After the event: CRIU lifted the lock of each tree it restored,
        // so what is left holds back only trees that are not running.
        self.lift_locks_left();
        if outcome == Outcome::Restored {
            // The image holds process memory: do not leave it lying in RAM.
            self.wipe();
        }
        let mut events = self.manifest.phases.clone();
        events.append(&mut self.events);
        let report = UpgradeReport {
            outcome,
            reason,
            workloads,
            events,
            ..self.record.clone()
        };
        let reported = self.sys.write_report(&report, Durability::Synced);
        if let Err(e) = &reported {
            self.log(&chain(e));
        }
        if outcome == Outcome::Failed {
            // It holds the workloads' memory, and nothing restores it again:
            // once the report keeps the reason, it goes.
            match reported {
                Ok(()) => self.wipe(),
                Err(_) => self.log("keeping the failed image: its report could not be written"),
            }
        }
        report
    }

    /// Returns the reason of a failure, and each workload's fate.
    fn restore(&mut self) -> (Option<String>, Vec<WorkloadOutcome>) {
        let manifest = self.manifest;
        let prepared = self.prepare();
        self.finish_criu_probe();
        if let Err(failure) = prepared {
            self.sys.remove_scratch(Path::new(UNPACK_DIR));
            let why = chain(&failure);
            let not_restored = manifest
                .workloads
                .iter()
                .map(|w| WorkloadOutcome::not_restored(w, Some(why.clone())))
                .collect();
            return (Some(why), not_restored);
        }
        let scaling = self.tcp_window_scaling_off();
        let weights: Vec<u64> = manifest
            .workloads
            .iter()
            .map(|w| images_len(manifest, w).saturating_add(WEIGHT_FLOOR))
            .collect();
        let mut outcomes = Vec::new();
        for (i, w) in manifest.workloads.iter().enumerate() {
            let left = self
                .children_until
                .saturating_duration_since(Instant::now());
            let within = criu_share(left, weights[i], weights[i..].iter().sum());
            let outcome = self.restore_workload(w, within);
            // For a rescue by PID 1, should the restore process die later.
            self.record.workloads[i] = outcome.clone();
            self.note(Durability::Cached);
            outcomes.push(outcome);
        }
        if let Some(old) = scaling {
            if let Err(e) = self.sys.swap_tcp_window_scaling(&old) {
                self.log(&chain(&e));
            }
        }
        // After every restore: a relay takes PIDs.
        match self.sys.start_journal_relays() {
            Ok(0) => {}
            Ok(n) => self.log(&format!(
                "{n} journal stream(s) relayed to the next journald"
            )),
            Err(e) => self.log(&format!("journal streams not relayed: {}", chain(&e))),
        }
        self.sys.remove_scratch(Path::new(UNPACK_DIR));
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
        self.steps.done("device state");
        self.mount_support_fs(&state);
        self.steps.done("support mounts");
        // CRIU's probes connect over loopback.
        self.sys.loopback_up().map_err(Failure::Network)?;
        // Beside the unpack and the network: its cache goes into /run,
        // which is mounted by now.
        match self.sys.start_criu_probe() {
            Ok(started) => self.probing = started,
            Err(e) => self.log(&format!("CRIU's probe of this kernel: {}", chain(&e))),
        }
        if self.manifest.section(devstate::TMPFS_SECTION).is_some() {
            self.sys
                .unpack(devstate::TMPFS_SECTION, Path::new("/"))
                .map_err(Failure::TmpfsFiles)?;
            self.steps.done("tmpfs files");
        }
        let scratch = Path::new(UNPACK_DIR);
        self.sys.mount_scratch(scratch).map_err(Failure::Scratch)?;
        self.steps.done("scratch");
        for w in &self.manifest.workloads {
            let dest = scratch.join(&w.name);
            self.sys
                .unpack(&w.section, &dest)
                .map_err(|e| Failure::Unpack(w.name.clone(), e))?;
            self.unpacked(&w.section);
            // Its pre-dumps (pre-copy), where the frozen dump's `parent`
            // link leads: `SECTION/pre/N` to `DEST/pre/N`.
            let prefix = format!("{}/pre/", w.section);
            for s in &self.manifest.sections {
                let Some(round) = s.name.strip_prefix(&prefix) else {
                    continue;
                };
                if round.is_empty() || !round.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                self.sys
                    .unpack(&s.name, &dest.join("pre").join(round))
                    .map_err(|e| Failure::Unpack(w.name.clone(), e))?;
                self.unpacked(&s.name);
            }
        }
        let summary = format!("image opened and unpacked in {}", self.steps.summary());
        self.log(&summary);
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

    /// Ends the unpack of `section` in the steps' log: its time, and its
    /// size as it came out.
    fn unpacked(&mut self, section: &str) {
        let kib = self
            .manifest
            .section(section)
            .map_or(0, |s| s.raw_len >> 10);
        self.steps.done(format!("{section} ({kib} KiB)"));
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
        // The lock tables go in before any address: until CRIU has re-created
        // the sockets, the new kernel must not answer their peers with resets.
        if !state.network_locks.is_empty() {
            self.sys.install_lock_tables(&state.network_locks)?;
            self.lock_tables.extend(
                state
                    .network_locks
                    .iter()
                    .filter_map(|t| devstate::lock_table_name(t)),
            );
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

    fn restore_workload(&mut self, w: &WorkloadEntry, within: Duration) -> WorkloadOutcome {
        let images_dir = Path::new(UNPACK_DIR).join(&w.name);
        let log = Path::new(report::DIR).join(format!("restore-{}.log", w.name));
        let run = CriuRun {
            checkpoint: Checkpoint {
                workload: w,
                images_dir: &images_dir,
                log: &log,
            },
            within,
            action_scripts: vec![],
        };
        let start = Instant::now();
        let error = match self.sys.criu_restore(&run) {
            Ok(root) => {
                self.resume(w);
                if let Some(a) = Adoption::of(w).map(|a| Adoption {
                    main_pid: root,
                    ..a
                }) {
                    // Without it systemd starts the unit a second time.
                    if let Err(e) = self.sys.adopt(&a) {
                        self.log(&format!(
                            "workload {}: {} will not adopt it: {}",
                            w.name,
                            a.unit,
                            chain(&e)
                        ));
                    }
                }
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

    /// Lifts any lock CRIU did not lift itself, so that a failed restore
    /// leaves a working network.
    fn lift_locks_left(&mut self) {
        let ours = std::mem::take(&mut self.lock_tables);
        if ours.is_empty() {
            return;
        }
        // CRIU lifts the lock of each tree it restores: the tables left are
        // those of the trees it did not, often none.
        let left: Vec<String> = match self.sys.lock_tables() {
            Ok(present) => ours.into_iter().filter(|t| present.contains(t)).collect(),
            Err(e) => {
                self.log(&format!("cannot list the lock tables: {}", chain(&e)));
                ours
            }
        };
        if left.is_empty() {
            return;
        }
        if let Err(e) = self.sys.remove_lock_tables(&left) {
            self.log(&format!("lock tables {}: {}", left.join(", "), chain(&e)));
        }
    }

    /// Waits for CRIU's probe of the kernel, so that the restores find its
    /// cache; one that fails only leaves the first restore to probe itself.
    fn finish_criu_probe(&mut self) {
        if !std::mem::take(&mut self.probing) {
            return;
        }
        let left = self
            .children_until
            .saturating_duration_since(Instant::now())
            .min(PROBE_WAIT);
        if let Err(e) = self.sys.finish_criu_probe(left) {
            self.log(&format!("CRIU's probe of this kernel: {}", chain(&e)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot;
    use crate::system::fake::{Fake, FULL_BOOT};

    const EXEC: &str = "exec /sbin/init";

    #[test]
    fn a_restore_runs_every_step_in_order_and_ends_in_the_real_init() {
        let mut f = Fake::resuming();
        boot(&mut f).expect("an init runs");
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
    const FAILED_BEFORE_PROBE: &[&str] = &[
        "remove scratch",
        "mark failed",
        "write report",
        "wipe",
        EXEC,
    ];
    /// CRIU's probe is waited for before anything else.
    const FAILED_BEFORE_LOCK: &[&str] = &[
        "finish criu probe",
        "remove scratch",
        "mark failed",
        "write report",
        "wipe",
        EXEC,
    ];
    const FAILED_AFTER_LOCK: &[&str] = &[
        "finish criu probe",
        "remove scratch",
        "mark failed",
        "list lock tables",
        "unlock CRIU-10002",
        "write report",
        "wipe",
        EXEC,
    ];
    /// After `criu restore a`, when it failed: b, restored, had its lock
    /// lifted by CRIU.
    const CRIU_A_FAILED: &[&str] = &[
        "note progress",
        "criu restore b",
        "resume b",
        "note progress",
        "tcp_window_scaling 1",
        "start relays",
        "remove scratch",
        "mark failed",
        "list lock tables",
        "write report",
        "wipe",
        EXEC,
    ];
    /// After `criu restore b`, when it failed: its lock is still there.
    const CRIU_B_FAILED: &[&str] = &[
        "note progress",
        "tcp_window_scaling 1",
        "start relays",
        "remove scratch",
        "mark failed",
        "list lock tables",
        "unlock CRIU-10002",
        "write report",
        "wipe",
        EXEC,
    ];

    /// Each failing step of an image that was marked `restoring`: the calls
    /// that follow it, and what the report's reason adds to the failure.
    #[test]
    fn every_failure_after_marking_is_reported_and_ends_in_the_real_init() {
        use Outcome::Failed;
        let cases: &[(&str, &[&str], &str)] = &[
            ("read devstate", FAILED_BEFORE_PROBE, "device state: "),
            ("unpack tmpfs", FAILED_BEFORE_LOCK, "tmpfs files: "),
            ("mount scratch", FAILED_BEFORE_LOCK, ""),
            ("unpack criu/b", FAILED_BEFORE_LOCK, "workload b: "),
            ("lo up", FAILED_BEFORE_PROBE, ""),
            ("lock CRIU-10002", FAILED_BEFORE_LOCK, ""),
            ("iface eth0", FAILED_AFTER_LOCK, ""),
            (
                "criu restore a",
                CRIU_A_FAILED,
                "CRIU could not restore a: ",
            ),
            (
                "criu restore b",
                CRIU_B_FAILED,
                "CRIU could not restore b: ",
            ),
        ];
        for (at, after, reason) in cases {
            let mut f = Fake::failing_at(&[at]);
            boot(&mut f).expect("an init runs");
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
        boot(&mut f).expect("an init runs");
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
        assert!(!f.calls.iter().any(|c| c == "resume a"));
        // Failed: wiped only once the report keeps the reason.
        assert_eq!(f.calls_after("write report"), ["wipe", EXEC]);
    }

    /// The blackout ends when the workloads run, not when their image is
    /// wiped (which takes seconds for a large one under TCG), nor when the
    /// locks of trees CRIU did not restore are looked for.
    #[test]
    fn the_restored_event_comes_before_the_wipe_and_the_look_at_the_locks() {
        let mut f = Fake::resuming();
        boot(&mut f).expect("an init runs");
        for n in [f.events_at_wipe, f.events_at_lock_list] {
            let n = n.expect("the image is wiped and the locks listed");
            assert_eq!(f.events[..n].last().map(|e| e.event), Some(Event::Restored));
        }
    }

    #[test]
    fn a_restored_service_is_adopted_by_its_unit_and_a_failed_one_is_not() {
        let units = |w: &mut Vec<WorkloadEntry>| {
            w[0].unit = Some("a.service".into());
            w[1].unit = Some("b.service".into());
        };
        let mut f = Fake::failing_at(&["criu restore a"]).with_workloads(units);
        boot(&mut f).expect("an init runs");
        assert!(!f.calls.iter().any(|c| c.starts_with("adopt a.service")));
        // Relays, which take PIDs, only once every workload is restored.
        let at = |call: &str| f.calls.iter().position(|c| c == call).unwrap();
        assert!(at("start relays") > at("resume b"));
        let b_pid = f.report().workloads[1].root_pid;
        assert_eq!(
            f.calls_after("resume b").first().copied(),
            Some(format!("adopt b.service {b_pid}").as_str())
        );

        // One that cannot be adopted is still restored; the log says why.
        let mut f = Fake::failing_at(&[&format!("adopt b.service {b_pid}")]).with_workloads(units);
        boot(&mut f).expect("an init runs");
        assert!(f.report().workloads.iter().all(|w| w.restored));
        assert!(f.logged("workload b: b.service will not adopt it"));
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
            "mark restored",
            "wipe",
            "write report",
        ];
        for at in cases {
            let mut f = Fake::failing_at(&[at]);
            boot(&mut f).expect("an init runs");
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

    /// Locks that cannot be listed are all lifted, in one transaction; one
    /// that will not go is logged and the restore goes on.
    #[test]
    fn locks_that_cannot_be_listed_or_lifted_are_logged() {
        let mut f = Fake::failing_at(&["list lock tables"]);
        boot(&mut f).expect("an init runs");
        assert_eq!(
            f.calls_after("list lock tables")[..2],
            ["unlock CRIU-10002", "wipe"]
        );
        assert!(f.logged("cannot list the lock tables"));
        assert_eq!(f.report().outcome, Outcome::Restored);

        let mut f = Fake::failing_at(&["criu restore b", "unlock CRIU-10002"]);
        boot(&mut f).expect("an init runs");
        assert!(f.logged("lock tables CRIU-10002: "));
        assert_eq!(f.report().outcome, Outcome::Failed);
    }

    /// CRIU's probe of the kernel runs from loopback up (its probes use it)
    /// and is waited for before the first restore; one that fails or cannot
    /// start is logged and the restore goes on.
    #[test]
    fn criu_s_probe_runs_beside_the_unpack_and_ends_before_criu_restores() {
        let mut f = Fake::resuming();
        boot(&mut f).expect("an init runs");
        let at = |call: &str| f.calls.iter().position(|c| c == call).unwrap();
        assert!(at("lo up") < at("start criu probe"));
        assert!(at("start criu probe") < at("unpack criu/a"));
        assert!(at("lock CRIU-10002") < at("finish criu probe"));
        assert!(at("finish criu probe") < at("criu restore a"));
        for failing in ["start criu probe", "finish criu probe"] {
            let mut f = Fake::failing_at(&[failing]);
            boot(&mut f).expect("an init runs");
            assert!(f.logged("CRIU's probe of this kernel: "), "{failing}");
            assert_eq!(f.report().outcome, Outcome::Restored, "{failing}");
            assert!(f.calls.iter().any(|c| c == "criu restore a"), "{failing}");
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
        boot(&mut f).expect("an init runs");
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

    /// Pre-copy: a workload's pre-dump sections are unpacked below its own
    /// images, where the frozen dump's `parent` link leads; a section that
    /// only looks like one is left alone.
    #[test]
    fn predump_sections_are_unpacked_where_the_parent_links_lead() {
        use crate::system::fake::section;
        use image_format::SectionKind;
        let mut f = Fake::resuming();
        if let Some(image) = f.image.as_mut() {
            for name in [
                "criu/b/pre/1",
                "criu/b/pre/2",
                "criu/b/pre/x",
                "criu/bb/pre/1",
            ] {
                image
                    .manifest
                    .sections
                    .push(section(name, SectionKind::Tree));
            }
        }
        boot(&mut f).expect("an init runs");
        let b: Vec<(&str, &Path)> = f
            .unpacked
            .iter()
            .filter(|(s, _)| s.starts_with("criu/b"))
            .map(|(s, d)| (s.as_str(), d.as_path()))
            .collect();
        assert_eq!(
            b,
            [
                ("criu/b", Path::new("/run/kupgrade-restore/b")),
                ("criu/b/pre/1", Path::new("/run/kupgrade-restore/b/pre/1")),
                ("criu/b/pre/2", Path::new("/run/kupgrade-restore/b/pre/2")),
            ]
        );
        let at = |call: &str| f.calls.iter().position(|c| c == call).unwrap();
        assert!(at("unpack criu/b/pre/2") < at("criu restore b"));
        assert_eq!(f.report().outcome, Outcome::Restored);
    }

    /// A workload whose root does not lead its session is restored as a
    /// shell job, running (not left stopped, or its orphaned group would
    /// get SIGHUP), and resumed like the others.
    #[test]
    fn a_shell_job_is_restored_as_one_and_resumed() {
        let mut f = Fake::resuming().with_workloads(|w| w[0].shell_job = true);
        boot(&mut f).expect("an init runs");
        assert_eq!(f.calls, FULL_BOOT);
        let has = |args: &Vec<String>, option: &str| args.iter().any(|a| a == option);
        assert!(has(&f.restore_args[0], "--shell-job"));
        assert!(!has(&f.restore_args[0], "--leave-stopped"));
        assert!(!has(&f.restore_args[1], "--shell-job"));
        assert!(has(&f.restore_args[1], "--leave-stopped"));
        assert_eq!(f.report().outcome, Outcome::Restored);
    }

    /// Right after the image is marked, before anything else, the restore is
    /// recorded on the disk as `restoring`; each workload's fate is noted as
    /// it is known; the report at the end is on the disk too.
    #[test]
    fn the_restore_is_recorded_before_it_begins_and_as_it_goes() {
        let mut f = Fake::failing_at(&["criu restore b"]);
        boot(&mut f).expect("an init runs");
        assert_eq!(
            f.calls_after("mark restoring")[..2],
            ["write record", "read devstate"]
        );
        let r = f.record();
        assert_eq!(r.image_generation, 7);
        assert_eq!(r.store.as_deref(), Some("/dev/pmem0"));
        assert_eq!(
            (r.kernel_from.as_str(), r.kernel_to.as_str()),
            ("6.1.0-1", "6.1.0-2")
        );
        assert!(r.workloads.iter().all(|w| !w.restored && w.error.is_none()));
        let names: Vec<&str> = r.events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(
            names,
            ["frozen", "init-start", "modules-loaded", "root-mounted"]
        );
        // After a: a restored, b not yet; after b: b failed.
        let fate = |r: &UpgradeReport| -> Vec<(bool, bool)> {
            r.workloads
                .iter()
                .map(|w| (w.restored, w.error.is_some()))
                .collect()
        };
        assert_eq!(f.reports[1].outcome, Outcome::Restoring);
        assert_eq!(fate(&f.reports[1]), [(true, false), (false, false)]);
        assert_eq!(fate(&f.reports[2]), [(true, false), (false, true)]);
        assert_eq!(f.report().outcome, Outcome::Failed);
        assert_eq!(f.report().store.as_deref(), Some("/dev/pmem0"));
        assert!(!f.calls.iter().any(|c| c == "write report unsynced"));
    }

    /// A failed restore's image holds the workloads' memory and is of no
    /// more use once the report keeps the reason: wiped then, and only then.
    #[test]
    fn a_failed_restores_image_is_wiped_once_its_report_is_written() {
        let mut f = Fake::failing_at(&["criu restore a"]);
        boot(&mut f).expect("an init runs");
        assert_eq!(
            f.calls_after("list lock tables"),
            ["write report", "wipe", EXEC]
        );
        // No report: the image is all that is left of the restore.
        let mut f = Fake::failing_at(&["criu restore a", "write report"]);
        boot(&mut f).expect("an init runs");
        assert_eq!(f.calls_after("list lock tables"), ["write report", EXEC]);
        assert!(f.logged("keeping the failed image: its report could not be written"));
    }

    /// Each CRIU gets its share of the time left, less what the end of the
    /// restore needs: of the default 600 s, 60 s are kept back, the first
    /// of two workloads of one size gets half of the rest, the second what
    /// is left then.
    #[test]
    fn each_criu_restore_gets_a_share_of_the_time_budget() {
        let mut f = Fake::resuming();
        boot(&mut f).expect("an init runs");
        let secs: Vec<u64> = f.criu_deadlines.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs.len(), 2);
        assert!((268..=270).contains(&secs[0]), "{secs:?}");
        assert!((537..=540).contains(&secs[1]), "{secs:?}");
        // kupgrade.restore_timeout=100: 25 s kept back, 37 s for the first.
        let mut f = Fake::resuming();
        f.cmdline.push_str(" kupgrade.restore_timeout=100");
        boot(&mut f).expect("an init runs");
        assert!((36..=37).contains(&f.criu_deadlines[0].as_secs()));
    }

    #[test]
    fn the_time_is_shared_by_the_size_of_the_images() {
        let left = Duration::from_secs(100);
        assert_eq!(criu_share(left, 1, 4), Duration::from_secs(25));
        assert_eq!(criu_share(left, 3, 3), left);
        assert_eq!(criu_share(left, 0, 0), left);
        let big = 1u64 << 40;
        assert_eq!(criu_share(left, big, big + big), Duration::from_secs(50));
    }

    #[test]
    fn the_budget_comes_from_the_command_line_or_is_the_default() {
        let t = |line: &str| timeout(&Cmdline::parse(line));
        assert_eq!(t("ro"), DEFAULT_TIMEOUT);
        assert_eq!(t("kupgrade.restore_timeout=90"), Duration::from_secs(90));
        // Nonsense does not make the restore unbounded, nor instant.
        assert_eq!(t("kupgrade.restore_timeout=0"), DEFAULT_TIMEOUT);
        assert_eq!(t("kupgrade.restore_timeout=soon"), DEFAULT_TIMEOUT);
    }

    /// A CRIU killed at its deadline fails its workload with that reason;
    /// the next workload is still restored.
    #[test]
    fn a_criu_restore_that_overruns_its_deadline_fails_its_workload_only() {
        let mut f = Fake::resuming();
        f.hang_at = vec!["criu restore a".into()];
        boot(&mut f).expect("an init runs");
        assert_eq!(f.calls_after("criu restore a"), CRIU_A_FAILED);
        let r = f.report();
        assert_eq!(r.outcome, Outcome::Failed);
        let fate: Vec<(&str, bool)> = r
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w.restored))
            .collect();
        assert_eq!(fate, [("a", false), ("b", true)]);
        let why = r.reason.as_deref().unwrap_or_default();
        assert!(
            why.starts_with("CRIU could not restore a: criu restore did not finish within 2")
                && why.ends_with(" s: it and its process group were killed"),
            "{why}"
        );
    }

    /// Turning window scaling off fails: the restore goes on and does not
    /// write back a value it never read.
    #[test]
    fn window_scaling_that_cannot_be_turned_off_is_not_turned_back_on() {
        let mut f = Fake::failing_at(&["tcp_window_scaling 0"]);
        boot(&mut f).expect("an init runs");
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
        boot(&mut f).expect("an init runs");
        assert_eq!(f.calls_after("read devstate"), FAILED_BEFORE_PROBE);
        let why = f.report().reason.clone().unwrap_or_default();
        assert!(why.starts_with("device state does not parse: "), "{why}");
    }

    /// A report is written even when the image cannot be marked failed.
    #[test]
    fn a_failure_to_mark_the_image_failed_is_logged_and_the_report_written() {
        let mut f = Fake::failing_at(&["lo up", "mark failed"]);
        boot(&mut f).expect("an init runs");
        assert_eq!(f.calls_after("lo up"), FAILED_BEFORE_PROBE);
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
            boot(&mut f).expect("an init runs");
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

    /// A resume boot whose store is missing (nd_pmem did not load, the
    /// reservation was dropped) or whose superblock does not read: nothing
    /// is restored, and the report, written durably, says why and names
    /// the modules that failed. It used to be a silent "no image".
    #[test]
    fn a_store_that_cannot_be_read_is_reported_not_skipped() {
        let open = "open /dev/pmem0";
        let mut f = Fake::failing_at(&[open, "read superblock /dev/pmem0"]);
        f.modules = vec!["nd_pmem.ko".into()];
        f.refused = vec!["nd_pmem.ko".into()];
        f.store_missing = true;
        boot(&mut f).expect("an init runs");
        let r = f.report();
        assert_eq!(r.outcome, Outcome::Failed);
        let why = r.reason.as_deref().unwrap_or_default();
        assert!(
            why.starts_with("cannot read the image in /dev/pmem0: ")
                && why.contains(&Fake::failure(open)),
            "{why}"
        );
        assert_eq!(r.modules_failed[0].name, "nd_pmem");
        assert_eq!(
            f.calls
                .iter()
                .filter(|c| c.starts_with("write"))
                .collect::<Vec<_>>(),
            ["write report"],
            "one report, synced"
        );
        // Nothing to mark or wipe without a store; then the real init.
        assert!(!f.calls.iter().any(|c| c.starts_with("mark") || c == "wipe"));
        assert_eq!(f.ending(), [Event::RestoreFailed, Event::ExecInit]);
    }

    /// A damaged superblock on a store that is there: nothing can be
    /// marked, but the store still holds the image's memory, and it is
    /// wiped once the report keeps the reason.
    #[test]
    fn a_damaged_superblock_s_store_is_wiped_once_reported() {
        let open = "open /dev/pmem0";
        let mut f = Fake::failing_at(&[open, "read superblock /dev/pmem0"]);
        boot(&mut f).expect("an init runs");
        assert_eq!(
            f.calls_after(open),
            ["read superblock /dev/pmem0", "write report", "wipe", EXEC]
        );
        assert_eq!(f.report().outcome, Outcome::Failed);
    }

    /// A damaged manifest under a good superblock: the image is marked
    /// failed before anything is restored (no later boot tries it again),
    /// the report says why, and the image is wiped once reported.
    #[test]
    fn an_image_that_does_not_open_is_marked_failed_reported_and_wiped() {
        let open = "open /dev/pmem0";
        let mut f = Fake::failing_at(&[open]);
        boot(&mut f).expect("an init runs");
        assert_eq!(
            f.calls_after(open),
            [
                "read superblock /dev/pmem0",
                "mark failed",
                "write report",
                "wipe",
                EXEC
            ]
        );
        let r = f.report();
        assert_eq!((r.outcome, r.image_generation), (Outcome::Failed, 7));
        assert!(r
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains(&Fake::failure(open)));
        assert!(f.restore_args.is_empty(), "CRIU ran");
        // Already used: left as it is, the earlier report standing.
        for state in [State::Restoring, State::Restored, State::Failed] {
            let mut f = Fake::failing_at(&[open]);
            if let Some(i) = f.image.as_mut() {
                i.state = state;
            }
            boot(&mut f).expect("an init runs");
            assert!(f.reports.is_empty(), "{state}");
            assert!(f.logged(&format!("is {state}: not restoring it again")));
        }
    }
}
