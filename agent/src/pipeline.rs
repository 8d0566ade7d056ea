//! `kupgrade go`: the upgrade pipeline, written against the [`System`] seam
//! so that its order and every abort path are tested without root.
//!
//! It starts from a [`Cleared`] preflight (see [`crate::preflight`]): the
//! checks that refuse an upgrade all happen there, before this module runs.
//!
//! ```text
//! preflight -> pre-copy -> freeze -> dump -> capture state -> write image -> quiesce fs -> kexec
//!     |           |           |        |           |               |              |
//!     +-----------+-----------+--------+-----------+---------------+--------------+--> abort:
//!        invalidate the image, drop the network locks, thaw and continue
//!        every task, in reverse order of what was done; then wipe the
//!        store if an image was written (it holds process memory); exit
//!        non-zero
//! ```
//!
//! The reboot is the point of no return; before it, nothing is lost.
//!
//! Pre-copy: while the workloads still run, CRIU pre-dumps their memory
//! with the kernel's soft-dirty tracking, again and again, each pre-dump
//! writing only what was dirtied since the one before, until that stops
//! shrinking or its budget is spent. The frozen dump then writes only the
//! pages dirtied since the last pre-dump. Each workload's images form a
//! chain CRIU restores by following `parent` links, kept in one tree:
//!
//! ```text
//! criu/NAME/          the frozen dump, parent -> pre/N
//! criu/NAME/pre/N/    pre-dump N, parent -> ../N-1
//! criu/NAME/pre/1/    the first pre-dump: every page
//! ```
//!
//! Each round's pre-dumps go into the store as soon as they are made
//! (sections `criu/NAME/pre/N`, the frozen dump's `criu/NAME` holding the
//! rest of the tree), so that only the frozen dump is written in the
//! frozen window, and the next round copies what was dirtied meanwhile.
//!
//! A pre-dump that fails costs only time: that workload's pre-dumps are
//! discarded and it gets a full dump, as without pre-copy (what of them is
//! in the store already is unpacked but not used).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use contract::devstate::{DeviceState, TmpfsMount};
use contract::events::{Event, EventLine};
use contract::PhaseTiming;
use image_format::Manifest;

use crate::preflight::Cleared;
use crate::workload::Workload;

/// A step of `go` or of its undo, as errors and the `aborted` event name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// CRIU's pre-dumps while the workloads run.
    Precopy,
    /// Holding back new connections (and draining accept queues).
    Connections,
    Freeze,
    Checkpoint,
    DeviceState,
    ImageWrite,
    Quiesce,
    Kexec,
    /// A dry run that did everything but could not undo it all.
    DryRun,
    // The undo, in the order it runs.
    Unquiesce,
    Invalidate,
    Undump,
    Thaw,
    Release,
    /// Zeroing the store once the workloads run again.
    Wipe,
    /// Removing pre-dumped images (process memory) no dump will use.
    Discard,
}

impl Step {
    /// The `step=` value of an `aborted` event (spaces become `_` there).
    pub fn name(self) -> &'static str {
        match self {
            Step::Precopy => "pre-copy",
            Step::Connections => "connections",
            Step::Freeze => "freeze",
            Step::Checkpoint => "checkpoint",
            Step::DeviceState => "device state",
            Step::ImageWrite => "image write",
            Step::Quiesce => "quiesce",
            Step::Kexec => "kexec",
            Step::DryRun => "dry run",
            Step::Unquiesce => "unquiesce",
            Step::Invalidate => "invalidate",
            Step::Undump => "undump",
            Step::Thaw => "thaw",
            Step::Release => "release",
            Step::Wipe => "wipe",
            Step::Discard => "discard",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A step that failed, with a reason for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {reason}")]
pub struct StepError {
    pub step: Step,
    pub reason: String,
}

impl StepError {
    pub fn new(step: Step, reason: impl std::fmt::Display) -> Self {
        StepError {
            step,
            reason: reason.to_string(),
        }
    }
}

/// One workload's dump or pre-dump, for [`System::dump_all`] and
/// [`System::predump_all`].
pub struct DumpJob<'a> {
    pub workload: &'a Workload,
    pub dir: PathBuf,
    /// The pre-dump it follows (relative to `dir`), if any.
    pub parent: Option<&'a Path>,
}

/// What the dump of one workload left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dumped {
    /// CRIU's network-lock table, to install before the new kernel's network.
    pub lock_table: Option<String>,
}

impl Dumped {
    /// What a dump that was attempted may have left, as far as its undo is
    /// concerned: CRIU killed half-way or failing (or a step after it, such
    /// as saving the lock table) leaves the tasks stopped and, for a
    /// workload with connections, maybe the network lock and repair mode.
    /// An empty table stands for "look for it".
    pub fn attempted(w: &Workload) -> Dumped {
        Dumped {
            lock_table: w.tcp_established.then(String::new),
        }
    }
}

/// What goes into the image.
#[derive(Debug)]
pub struct ImageInput<'a> {
    pub manifest: Manifest,
    /// (section name, directory) for each workload's CRIU images.
    pub trees: Vec<(String, PathBuf)>,
    pub devstate: &'a DeviceState,
    /// tmpfs files as a tree rooted at `/`, when there are any.
    pub tmpfs: Option<PathBuf>,
}

/// Everything `go` does to the machine.
pub trait System {
    /// Whether the staged kernel is still the one loaded; if not, why.
    fn staged_still_loaded(&mut self) -> Result<(), String>;
    /// Holds back new TCP connections to the workloads' listening sockets
    /// and waits until the ones already made are accepted: CRIU cannot
    /// checkpoint a connection still in a listen queue.
    fn hold_connections(&mut self, ws: &[Workload]) -> Result<(), StepError>;
    /// Lets new connections in again.
    fn release_connections(&mut self) -> Result<(), StepError>;
    fn freeze(&mut self, w: &Workload) -> Result<(), StepError>;
    fn thaw(&mut self, w: &Workload) -> Result<(), StepError>;
    /// `criu pre-dump` of `w` into `dir` while it runs, writing only the
    /// pages dirtied since the pre-dump in `parent` (relative to `dir`) if
    /// any; returns the bytes of pages written.
    fn predump(
        &mut self,
        w: &Workload,
        dir: &Path,
        parent: Option<&Path>,
    ) -> Result<u64, StepError>;
    /// Each job's `criu pre-dump` as [`System::predump`] (`dir` and
    /// `parent` as given there), a result for each job attempted, in
    /// order: a signal stops them short. A failing pre-dump does not stop
    /// the others. Here one at a time; a system with the CPUs for it runs
    /// them side by side.
    fn predump_all(&mut self, jobs: &[DumpJob<'_>]) -> Vec<Result<u64, StepError>> {
        let mut results = Vec::new();
        for (k, j) in jobs.iter().enumerate() {
            if k > 0 && self.interrupted() {
                break;
            }
            results.push(self.predump(j.workload, &j.dir, j.parent));
        }
        results
    }
    /// Removes the pre-dumps of the workload whose images are in `dir`.
    fn discard_predumps(&mut self, dir: &Path) -> Result<(), StepError>;
    /// `criu dump` of the frozen `w` into `dir`; after pre-copy, only the
    /// pages dirtied since the pre-dump in `parent` (relative to `dir`).
    fn dump(
        &mut self,
        w: &Workload,
        dir: &Path,
        parent: Option<&Path>,
    ) -> Result<Dumped, StepError>;
    /// The frozen dumps of every job, each as [`System::dump`]. Returns a
    /// result for each job attempted, in order; the jobs past them were not
    /// attempted. Here one at a time, up to the first failure or a signal;
    /// a system with the CPUs for it dumps them side by side.
    fn dump_all(&mut self, jobs: &[DumpJob<'_>]) -> Vec<Result<Dumped, StepError>> {
        let mut results = Vec::new();
        for (k, j) in jobs.iter().enumerate() {
            if k > 0 && self.interrupted() {
                break;
            }
            let result = self.dump(j.workload, &j.dir, j.parent);
            let failed = result.is_err();
            results.push(result);
            if failed {
                break;
            }
        }
        results
    }
    /// Undoes a dump: drops its network lock, continues its stopped tasks.
    fn undump(&mut self, w: &Workload, d: &Dumped) -> Result<(), StepError>;
    /// Interfaces, routes, hostname, RNG seed: configuration that does not
    /// change while the workloads are frozen, so it is read before.
    fn system_state(&mut self) -> Result<DeviceState, StepError>;
    /// Copies the tmpfs files the workloads use below `dir`; returns the
    /// tmpfs mounts involved and whether any file was copied.
    fn tmpfs_files(
        &mut self,
        ws: &[Workload],
        dir: &Path,
    ) -> Result<(Vec<TmpfsMount>, bool), StepError>;
    /// Writes pre-dumps, (section name, directory) each, into the store
    /// while the workloads run, starting the image there if this is the
    /// first; [`System::write_image`] finishes it. Returns the bytes of the
    /// image so far.
    fn store_predumps(&mut self, sections: &[(String, PathBuf)]) -> Result<u64, StepError>;
    fn write_image(&mut self, input: &ImageInput) -> Result<u64, StepError>;
    fn invalidate_image(&mut self) -> Result<(), StepError>;
    /// Zeroes the store as far as it may hold image data (process memory).
    fn wipe_image(&mut self) -> Result<(), StepError>;
    /// sync, then remount file systems read-only where possible.
    fn quiesce_filesystems(&mut self) -> Result<(), StepError>;
    /// Makes writable again what `quiesce_filesystems` made read-only.
    fn unquiesce_filesystems(&mut self) -> Result<(), StepError>;
    /// Only returns if the reboot did not happen.
    fn reboot(&mut self) -> StepError;
    fn emit(&mut self, e: EventLine);
    /// A signal asked kupgrade to stop.
    fn interrupted(&mut self) -> bool;
}

/// How long pre-copy may go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precopy {
    /// Pre-dumps of each workload at most; 0: no pre-copy.
    pub max_iterations: u32,
    /// No pre-dump round starts once this much time has passed.
    pub budget: Duration,
    /// Bytes the store holds (0: not known): each round goes into it, so
    /// no round starts that might leave no room for the frozen dump.
    pub store_capacity: u64,
}

impl Precopy {
    pub const OFF: Precopy = Precopy {
        max_iterations: 0,
        budget: Duration::ZERO,
        store_capacity: 0,
    };
}

/// Why pre-copy stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecopyStop {
    /// A round wrote nothing, or no less than the one before: another
    /// round would not make the frozen dump smaller.
    Converged,
    Iterations,
    Budget,
    /// Another round and a frozen dump as large might not fit the store.
    Store,
    /// Every workload's pre-dump failed: full dumps.
    Failed,
}

impl PrecopyStop {
    pub fn name(self) -> &'static str {
        match self {
            PrecopyStop::Converged => "converged",
            PrecopyStop::Iterations => "iterations",
            PrecopyStop::Budget => "budget",
            PrecopyStop::Store => "store",
            PrecopyStop::Failed => "failed",
        }
    }
}

/// Whether pre-copy stops after rounds that wrote `written` bytes (one
/// entry per round, the last one last) in `elapsed`, the store holding
/// `stored` bytes by then, and why.
pub fn precopy_stop(
    written: &[u64],
    stored: u64,
    limits: &Precopy,
    elapsed: Duration,
) -> Option<PrecopyStop> {
    let last = *written.last()?;
    let prev = written.len().checked_sub(2).map(|i| written[i]);
    if last == 0 || prev.is_some_and(|p| last >= p) {
        return Some(PrecopyStop::Converged);
    }
    // While shrinking, the next round and the frozen dump are each at most
    // the last round (the first says nothing of them: it copies it all).
    let room = limits.store_capacity.saturating_sub(stored);
    if prev.is_some() && limits.store_capacity > 0 && last.saturating_mul(2) > room {
        return Some(PrecopyStop::Store);
    }
    if written.len() >= limits.max_iterations as usize {
        return Some(PrecopyStop::Iterations);
    }
    if elapsed >= limits.budget {
        return Some(PrecopyStop::Budget);
    }
    None
}

pub struct Options {
    /// Scratch space for the dump (tmpfs under /run/kupgrade).
    pub work_dir: PathBuf,
    pub precopy: Precopy,
    pub kernel_from: String,
    pub kernel_to: String,
    pub boot_id: String,
    pub machine_id: String,
    pub hostname: String,
}

#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// `--dry-run`: everything but the reboot was done, then undone.
    DryRun { paused_ms: f64, image_bytes: u64 },
}

/// Why `go` stopped, and whether the workloads were resumed.
#[derive(Debug, thiserror::Error)]
#[error("{failure}{}", if self.resume_errors.is_empty() { String::new() } else {
    format!("; RESUMING FAILED: {}", join(&self.resume_errors))
})]
pub struct Aborted {
    pub failure: StepError,
    /// Errors while resuming: a workload may still be stopped.
    pub resume_errors: Vec<StepError>,
}

/// `a; b; c`, for one line of errors.
pub fn join(errors: &[StepError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("; ")
}

/// What has been done so far, to undo in reverse.
struct Undo {
    /// The step running, to name a panic's.
    at: Step,
    held: bool,
    frozen: Vec<usize>,
    dumped: Vec<(usize, Dumped)>,
    /// Image directories holding pre-dumps.
    predumped: Vec<PathBuf>,
    image_written: bool,
    quiesced: bool,
    /// The store may hold image data: wipe it, last.
    scrub: bool,
}

impl Default for Undo {
    fn default() -> Self {
        Undo {
            at: Step::DeviceState,
            held: false,
            frozen: Vec::new(),
            dumped: Vec::new(),
            predumped: Vec::new(),
            image_written: false,
            quiesced: false,
            scrub: false,
        }
    }
}

/// Runs the upgrade that `cleared` allows: a dry run or a real one.
///
/// Never panics, and every way out of it runs the undo: a step that fails,
/// a signal, and a panic (a bug, or output that failed: `println!` panics
/// on a closed pipe) in a step, in an event or in the undo itself. This
/// relies on panics unwinding, the default (`panic = "abort"` would lose it).
pub fn go(sys: &mut dyn System, cleared: &Cleared, opts: &Options) -> Result<Outcome, Aborted> {
    let workloads = cleared.workloads();
    let mut undo = Undo::default();
    let mut phases = Vec::new();
    let ran = catch_unwind(AssertUnwindSafe(|| {
        run(
            sys,
            workloads,
            cleared.dry_run(),
            opts,
            &mut undo,
            &mut phases,
        )
    }))
    .unwrap_or_else(|panic| Err(StepError::new(undo.at, panicked(panic.as_ref()))));
    match ran {
        Ok(outcome) => {
            if cleared.dry_run() {
                // Undo what a real run would have left for the new kernel.
                let errs = resume(sys, workloads, &mut undo);
                notify(sys, EventLine::now(Event::Resumed).with("dry_run", true));
                if !errs.is_empty() {
                    return Err(Aborted {
                        failure: StepError::new(Step::DryRun, "done, but resuming failed"),
                        resume_errors: errs,
                    });
                }
            }
            Ok(outcome)
        }
        Err(failure) => {
            notify(
                sys,
                EventLine::now(Event::Aborted)
                    .with("step", failure.step)
                    .with("reason", &failure.reason),
            );
            let resume_errors = resume(sys, workloads, &mut undo);
            notify(
                sys,
                EventLine::now(Event::Resumed).with("ok", resume_errors.is_empty()),
            );
            Err(Aborted {
                failure,
                resume_errors,
            })
        }
    }
}

/// What a caught panic said, for a step's reason.
fn panicked(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message");
    format!("kupgrade panicked: {what}")
}

/// `call`, with a panic turned into a failure of `step`.
fn shielded<T>(step: Step, call: impl FnOnce() -> Result<T, StepError>) -> Result<T, StepError> {
    catch_unwind(AssertUnwindSafe(call))
        .unwrap_or_else(|panic| Err(StepError::new(step, panicked(panic.as_ref()))))
}

/// Emits an event on the way out; output that fails is no reason to stop.
fn notify(sys: &mut dyn System, e: EventLine) {
    let _ = catch_unwind(AssertUnwindSafe(|| sys.emit(e)));
}

/// Emits an event and records it for the image's manifest.
fn emit(sys: &mut dyn System, phases: &mut Vec<PhaseTiming>, e: EventLine) {
    phases.push(PhaseTiming::from(&e));
    sys.emit(e);
}

/// Starts `step`, unless a signal asked to stop.
fn begin(sys: &mut dyn System, undo: &mut Undo, step: Step) -> Result<(), StepError> {
    undo.at = step;
    if sys.interrupted() {
        return Err(StepError::new(step, "interrupted by a signal"));
    }
    Ok(())
}

fn run(
    sys: &mut dyn System,
    workloads: &[Workload],
    dry_run: bool,
    opts: &Options,
    undo: &mut Undo,
    phases: &mut Vec<PhaseTiming>,
) -> Result<Outcome, StepError> {
    let mut state = sys.system_state()?;
    emit(
        sys,
        phases,
        EventLine::now(Event::PreflightOk).with("workloads", workloads.len()),
    );
    let parents = precopy(sys, workloads, opts, undo, phases)?;
    begin(sys, undo, Step::Freeze)?;

    undo.at = Step::Connections;
    undo.held = true;
    sys.hold_connections(workloads)?;
    begin(sys, undo, Step::Freeze)?;
    for (i, w) in workloads.iter().enumerate() {
        // Recorded first: a freeze that times out may have frozen some tasks.
        undo.frozen.push(i);
        sys.freeze(w)?;
    }
    let frozen = EventLine::now(Event::Frozen).with("workloads", workloads.len());
    let frozen_at = frozen.t_mono_ns;
    emit(sys, phases, frozen);

    begin(sys, undo, Step::Checkpoint)?;
    let jobs: Vec<DumpJob> = workloads
        .iter()
        .zip(&parents)
        .map(|(w, parent)| DumpJob {
            workload: w,
            dir: images_dir(opts, w),
            parent: parent.as_deref(),
        })
        .collect();
    // Recorded first: a dump that fails, or never returns, is undone too.
    undo.dumped = workloads
        .iter()
        .enumerate()
        .map(|(i, w)| (i, Dumped::attempted(w)))
        .collect();
    let results = sys.dump_all(&jobs);
    // Those past the results were not attempted: nothing to undo there.
    undo.dumped.truncate(results.len());
    let mut failed = Vec::new();
    for (k, result) in results.into_iter().enumerate() {
        match result {
            Ok(d) => undo.dumped[k].1 = d,
            Err(e) => failed.push(e),
        }
    }
    match failed.len() {
        0 => {}
        1 => return Err(failed.remove(0)),
        _ => return Err(StepError::new(Step::Checkpoint, join(&failed))),
    }
    // Only a signal stops the dumps short of a failure.
    if undo.dumped.len() < jobs.len() {
        return Err(StepError::new(Step::Checkpoint, "interrupted by a signal"));
    }
    let locks: Vec<String> = undo
        .dumped
        .iter()
        .filter_map(|(_, d)| d.lock_table.clone())
        .collect();
    let mut entries = Vec::new();
    let mut trees = Vec::new();
    for (w, job) in workloads.iter().zip(jobs) {
        let entry = w.entry();
        trees.push((entry.section.clone(), job.dir));
        entries.push(entry);
    }
    emit(
        sys,
        phases,
        EventLine::now(Event::Dumped).with("workloads", workloads.len()),
    );

    begin(sys, undo, Step::DeviceState)?;
    let tmpfs_dir = opts.work_dir.join("tmpfs");
    let (mounts, has_tmpfs) = sys.tmpfs_files(workloads, &tmpfs_dir)?;
    state.tmpfs_mounts = mounts;
    state.network_locks = locks;
    emit(
        sys,
        phases,
        EventLine::now(Event::StateCaptured)
            .with("interfaces", state.interfaces.len())
            .with("tmpfs_mounts", state.tmpfs_mounts.len()),
    );

    begin(sys, undo, Step::ImageWrite)?;
    let manifest = Manifest {
        kernel_from: opts.kernel_from.clone(),
        kernel_to: opts.kernel_to.clone(),
        boot_id: opts.boot_id.clone(),
        machine_id: opts.machine_id.clone(),
        hostname: opts.hostname.clone(),
        created_unix_ns: contract::events::now_ns().1,
        workloads: entries,
        phases: phases.clone(),
        sections: Vec::new(),
    };
    let input = ImageInput {
        manifest,
        trees,
        devstate: &state,
        tmpfs: has_tmpfs.then(|| tmpfs_dir.clone()),
    };
    undo.image_written = true;
    undo.scrub = true;
    let bytes = sys.write_image(&input)?;
    let written = EventLine::now(Event::ImageWritten).with("bytes", bytes);
    let paused_ms = (written.t_mono_ns.saturating_sub(frozen_at)) as f64 / 1e6;
    emit(sys, phases, written);

    if dry_run {
        return Ok(Outcome::DryRun {
            paused_ms,
            image_bytes: bytes,
        });
    }
    begin(sys, undo, Step::Kexec)?;
    if let Err(why) = sys.staged_still_loaded() {
        return Err(StepError::new(
            Step::Kexec,
            format!("{why}: run `kupgrade stage` again"),
        ));
    }
    // Emitted before the file systems go read-only, so that it is recorded.
    emit(
        sys,
        phases,
        EventLine::now(Event::Kexec).with("to", &opts.kernel_to),
    );
    undo.at = Step::Quiesce;
    undo.quiesced = true;
    sys.quiesce_filesystems()?;
    // A signal during the sync: the last moment to heed it.
    if sys.interrupted() {
        return Err(StepError::new(Step::Quiesce, "interrupted by a signal"));
    }
    undo.at = Step::Kexec;
    // The point of no return: only comes back if the kernel refused.
    Err(sys.reboot())
}

/// Where the images of `w` go: the frozen dump's, its pre-dumps below.
fn images_dir(opts: &Options, w: &Workload) -> PathBuf {
    opts.work_dir.join("criu").join(&w.name)
}

/// The image section of `w`'s pre-dump `round`, named below its own:
/// `kupgrade-init` unpacks it to `pre/ROUND` in the workload's images.
pub fn predump_section(w: &Workload, round: u32) -> String {
    format!("{}/pre/{round}", w.entry().section)
}

/// Pre-copy (see the module's docs). Returns, for each workload, the
/// pre-dump its frozen dump follows (relative to its images directory), or
/// none for a full dump. A signal aborts; a failing pre-dump does not.
fn precopy(
    sys: &mut dyn System,
    workloads: &[Workload],
    opts: &Options,
    undo: &mut Undo,
    phases: &mut Vec<PhaseTiming>,
) -> Result<Vec<Option<PathBuf>>, StepError> {
    if opts.precopy.max_iterations == 0 || workloads.is_empty() {
        return Ok(vec![None; workloads.len()]);
    }
    let start = Instant::now();
    // The last round each workload's chain reaches; none once it failed.
    let mut last: Vec<Option<u32>> = vec![None; workloads.len()];
    let mut failed = vec![false; workloads.len()];
    let mut written: Vec<u64> = Vec::new();
    let mut stored = 0;
    let stop = loop {
        let round = written.len() as u32 + 1;
        let mut bytes = 0;
        begin(sys, undo, Step::Precopy)?;
        let running: Vec<usize> = (0..workloads.len()).filter(|&i| !failed[i]).collect();
        let parents: Vec<Option<PathBuf>> = running
            .iter()
            .map(|&i| last[i].map(|n| PathBuf::from(format!("../{n}"))))
            .collect();
        let mut jobs = Vec::new();
        for (&i, parent) in running.iter().zip(&parents) {
            let w = &workloads[i];
            let dir = images_dir(opts, w);
            if !undo.predumped.contains(&dir) {
                // Recorded first: a pre-dump that fails leaves images too.
                undo.predumped.push(dir.clone());
            }
            jobs.push(DumpJob {
                workload: w,
                dir: dir.join("pre").join(round.to_string()),
                parent: parent.as_deref(),
            });
        }
        let results = sys.predump_all(&jobs);
        // Only a signal stops them short.
        if results.len() < jobs.len() {
            return Err(StepError::new(Step::Precopy, "interrupted by a signal"));
        }
        for (&i, result) in running.iter().zip(results) {
            let dir = images_dir(opts, &workloads[i]);
            match result {
                Ok(b) => {
                    bytes += b;
                    last[i] = Some(round);
                }
                // The system said why; the tracking may have been reset
                // before it failed, so the chain so far no longer holds
                // every page: a full dump instead.
                Err(_) => {
                    failed[i] = true;
                    last[i] = None;
                    // Left for the undo if it fails: the full dump starts
                    // from an empty directory anyway.
                    if sys.discard_predumps(&dir).is_ok() {
                        undo.predumped.retain(|d| *d != dir);
                    }
                }
            }
        }
        written.push(bytes);
        let sections: Vec<(String, PathBuf)> = workloads
            .iter()
            .zip(&last)
            .filter(|(_, l)| **l == Some(round))
            .map(|(w, _)| {
                let dir = images_dir(opts, w).join("pre").join(round.to_string());
                (predump_section(w, round), dir)
            })
            .collect();
        if !sections.is_empty() {
            begin(sys, undo, Step::ImageWrite)?;
            // From here the store may hold process memory.
            undo.image_written = true;
            undo.scrub = true;
            stored = sys.store_predumps(&sections)?;
        }
        if failed.iter().all(|f| *f) {
            break PrecopyStop::Failed;
        }
        if let Some(why) = precopy_stop(&written, stored, &opts.precopy, start.elapsed()) {
            break why;
        }
    };
    let list = |v: &[u64]| {
        let words: Vec<String> = v.iter().map(u64::to_string).collect();
        if words.is_empty() {
            "-".to_string()
        } else {
            words.join(",")
        }
    };
    let fallback: Vec<&str> = workloads
        .iter()
        .zip(&failed)
        .filter(|(_, f)| **f)
        .map(|(w, _)| w.name.as_str())
        .collect();
    let fallback = if fallback.is_empty() {
        "-".to_string()
    } else {
        fallback.join(",")
    };
    emit(
        sys,
        phases,
        EventLine::now(Event::Predump)
            .with("iterations", written.len())
            .with("bytes", list(&written))
            .with("workloads", last.iter().filter(|l| l.is_some()).count())
            .with("fallback", fallback)
            .with("stored_bytes", stored)
            .with("stop", stop.name())
            .with("ms", start.elapsed().as_millis()),
    );
    Ok(last
        .into_iter()
        .map(|l| l.map(|n| Path::new("pre").join(n.to_string())))
        .collect())
}

/// What a `go` that was killed half-way may have left: every workload
/// frozen and dumped (with a network lock where it has TCP connections),
/// connections held, and, as found, an image and read-only file systems.
/// Undoes all of it as an abort would, and wipes the store (a `go` killed
/// while writing leaves image data but no image). Returns what could not be
/// undone.
pub fn recover(
    sys: &mut dyn System,
    workloads: &[Workload],
    image_written: bool,
    quiesced: bool,
) -> Vec<StepError> {
    let mut undo = Undo {
        held: true,
        frozen: (0..workloads.len()).collect(),
        dumped: workloads
            .iter()
            .enumerate()
            .map(|(i, w)| (i, Dumped::attempted(w)))
            .collect(),
        image_written,
        quiesced,
        scrub: true,
        ..Undo::default()
    };
    resume(sys, workloads, &mut undo)
}

/// Undoes, in reverse order, what was done. Returns what could not be undone.
/// Every step runs whatever the others did, a panic included.
fn resume(sys: &mut dyn System, workloads: &[Workload], undo: &mut Undo) -> Vec<StepError> {
    let mut errors = Vec::new();
    let mut undo_step = |step, call: &mut dyn FnMut() -> Result<(), StepError>| {
        if let Err(e) = shielded(step, call) {
            errors.push(e);
        }
    };
    if std::mem::take(&mut undo.quiesced) {
        undo_step(Step::Unquiesce, &mut || sys.unquiesce_filesystems());
    }
    if std::mem::take(&mut undo.image_written) {
        undo_step(Step::Invalidate, &mut || sys.invalidate_image());
    }
    for (i, d) in std::mem::take(&mut undo.dumped).into_iter().rev() {
        undo_step(Step::Undump, &mut || sys.undump(&workloads[i], &d));
    }
    for i in std::mem::take(&mut undo.frozen).into_iter().rev() {
        undo_step(Step::Thaw, &mut || sys.thaw(&workloads[i]));
    }
    if std::mem::take(&mut undo.held) {
        undo_step(Step::Release, &mut || sys.release_connections());
    }
    for dir in std::mem::take(&mut undo.predumped) {
        undo_step(Step::Discard, &mut || sys.discard_predumps(&dir));
    }
    // Last: it takes as long as writing the image did, and needs nothing
    // from the workloads, which run again by now.
    if std::mem::take(&mut undo.scrub) {
        undo_step(Step::Wipe, &mut || sys.wipe_image());
    }
    errors
}

/// A recording [`System`] for the tests of the pipeline and of the fault
/// wrapper around it.
#[cfg(test)]
pub(crate) mod fake {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    /// Records every call; fails the step named in `fail_at`.
    #[derive(Default)]
    pub struct Fake {
        pub calls: Vec<String>,
        pub fail_at: Option<String>,
        pub loaded: bool,
        pub unload_after_write: bool,
        pub interrupt_at: Option<String>,
        /// Set where a real signal handler would set its flag.
        pub signalled: Rc<Cell<bool>>,
        pub events: Vec<Event>,
        /// Emitting this event panics, as `println!` does on a closed pipe.
        pub emit_panics_at: Option<Event>,
        /// Set when a fault "killed" kupgrade: a dead process does nothing
        /// more, so nothing more is recorded (the tests of the fault wrapper
        /// stand in for `abort()` and SIGKILL with a panic, which `go` would
        /// otherwise answer with the undo).
        pub dead: Rc<Cell<bool>>,
        /// What each undump was given.
        pub undumped: Vec<(String, Dumped)>,
        /// Bytes each pre-dump round writes per workload, the last one
        /// repeated; empty: 1 MiB each.
        pub predump_bytes: Vec<u64>,
        /// The parent each dump was given, by workload.
        pub dump_parents: Vec<(String, Option<PathBuf>)>,
        /// Every event, with its fields.
        pub lines: Vec<EventLine>,
    }

    impl Fake {
        /// The calls from the first `start` on.
        pub fn calls_from(&self, start: &str) -> Vec<&str> {
            self.calls
                .iter()
                .map(String::as_str)
                .skip_while(|c| *c != start)
                .collect()
        }

        /// The calls made before the first `stop`.
        pub fn calls_before(&self, stop: &str) -> Vec<&str> {
            self.calls
                .iter()
                .map(String::as_str)
                .take_while(|c| *c != stop)
                .collect()
        }

        fn step(&mut self, call: String, step: Step) -> Result<(), StepError> {
            if self.dead.get() {
                return Err(StepError::new(step, "dead"));
            }
            let fail = self.fail_at.as_deref() == Some(call.as_str());
            self.calls.push(call);
            if fail {
                Err(StepError::new(step, "injected"))
            } else {
                Ok(())
            }
        }
    }

    impl System for Fake {
        fn staged_still_loaded(&mut self) -> Result<(), String> {
            if self.loaded {
                Ok(())
            } else {
                Err("the staged kernel was unloaded meanwhile".into())
            }
        }
        fn hold_connections(&mut self, _ws: &[Workload]) -> Result<(), StepError> {
            self.step("hold".into(), Step::Connections)
        }
        fn release_connections(&mut self) -> Result<(), StepError> {
            self.step("release".into(), Step::Release)
        }
        fn freeze(&mut self, w: &Workload) -> Result<(), StepError> {
            self.step(format!("freeze {}", w.name), Step::Freeze)
        }
        fn thaw(&mut self, w: &Workload) -> Result<(), StepError> {
            self.step(format!("thaw {}", w.name), Step::Thaw)
        }
        fn predump(
            &mut self,
            w: &Workload,
            dir: &Path,
            parent: Option<&Path>,
        ) -> Result<u64, StepError> {
            let round = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            let round = round.unwrap_or_default();
            let parent = parent.map_or("-".into(), |p| p.display().to_string());
            self.step(
                format!("predump {} {round} {parent}", w.name),
                Step::Precopy,
            )?;
            let n: usize = round.parse().unwrap_or(1);
            let bytes = self.predump_bytes.get(n - 1).or(self.predump_bytes.last());
            Ok(bytes.copied().unwrap_or(1 << 20))
        }
        fn discard_predumps(&mut self, dir: &Path) -> Result<(), StepError> {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            self.step(
                format!("discard {}", name.unwrap_or_default()),
                Step::Discard,
            )
        }
        fn dump(
            &mut self,
            w: &Workload,
            _dir: &Path,
            parent: Option<&Path>,
        ) -> Result<Dumped, StepError> {
            self.dump_parents
                .push((w.name.clone(), parent.map(Path::to_path_buf)));
            self.step(format!("dump {}", w.name), Step::Checkpoint)?;
            Ok(Dumped {
                lock_table: w
                    .tcp_established
                    .then(|| format!("table inet CRIU-{}", w.root_pid)),
            })
        }
        fn undump(&mut self, w: &Workload, d: &Dumped) -> Result<(), StepError> {
            self.undumped.push((w.name.clone(), d.clone()));
            self.step(format!("undump {}", w.name), Step::Undump)
        }
        fn system_state(&mut self) -> Result<DeviceState, StepError> {
            self.step("system state".into(), Step::DeviceState)?;
            Ok(DeviceState::default())
        }
        fn tmpfs_files(
            &mut self,
            _ws: &[Workload],
            _d: &Path,
        ) -> Result<(Vec<TmpfsMount>, bool), StepError> {
            self.step("capture".into(), Step::DeviceState)?;
            Ok((vec![], false))
        }
        fn store_predumps(&mut self, sections: &[(String, PathBuf)]) -> Result<u64, StepError> {
            let names: Vec<&str> = sections.iter().map(|(n, _)| n.as_str()).collect();
            self.step(format!("store {}", names.join(" ")), Step::ImageWrite)?;
            Ok(1 << 20)
        }
        fn write_image(&mut self, input: &ImageInput) -> Result<u64, StepError> {
            self.step("write".into(), Step::ImageWrite)?;
            assert_eq!(input.trees.len(), input.manifest.workloads.len());
            assert!(input.manifest.phases.iter().any(|p| p.event == "frozen"));
            if self.unload_after_write {
                self.loaded = false;
            }
            Ok(4096)
        }
        fn invalidate_image(&mut self) -> Result<(), StepError> {
            self.step("invalidate".into(), Step::Invalidate)
        }
        fn wipe_image(&mut self) -> Result<(), StepError> {
            self.step("wipe".into(), Step::Wipe)
        }
        fn quiesce_filesystems(&mut self) -> Result<(), StepError> {
            self.step("quiesce".into(), Step::Quiesce)
        }
        fn unquiesce_filesystems(&mut self) -> Result<(), StepError> {
            self.step("unquiesce".into(), Step::Unquiesce)
        }
        fn reboot(&mut self) -> StepError {
            if self.dead.get() {
                return StepError::new(Step::Kexec, "dead");
            }
            self.calls.push("reboot".into());
            StepError::new(Step::Kexec, "refused by the kernel")
        }
        fn emit(&mut self, e: EventLine) {
            if self.dead.get() {
                return;
            }
            self.events.push(e.event);
            self.lines.push(e.clone());
            if self.emit_panics_at == Some(e.event) {
                panic!("failed printing to stdout: Broken pipe (os error 32)");
            }
        }
        fn interrupted(&mut self) -> bool {
            self.signalled.get()
                || self
                    .interrupt_at
                    .as_deref()
                    .is_some_and(|at| self.calls.last().is_some_and(|c| c == at))
        }
    }

    pub fn wl(name: &str, pid: i32, tcp: bool) -> Workload {
        Workload {
            name: name.into(),
            cgroup: format!("/sys/fs/cgroup/kupgrade/{name}").into(),
            root_pid: pid,
            pids: vec![pid],
            pid_namespace: false,
            ipc_namespace: false,
            tcp_established: tcp,
            memory_bytes: 1 << 20,
            ..Workload::default()
        }
    }

    pub fn opts() -> Options {
        Options {
            work_dir: "/run/kupgrade/work".into(),
            precopy: Precopy::OFF,
            kernel_from: "a".into(),
            kernel_to: "b".into(),
            boot_id: String::new(),
            machine_id: String::new(),
            hostname: String::new(),
        }
    }

    /// Two workloads, the second with TCP connections (a network lock).
    pub fn two() -> Vec<Workload> {
        vec![wl("a", 10001, false), wl("b", 10002, true)]
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use crate::preflight::Cleared;

    /// Everything `go` undoes for `two()` when its last step fails, in
    /// order; an earlier failure undoes a tail of it.
    const UNDO_ALL: [&str; 7] = [
        "unquiesce",
        "invalidate",
        "undump b",
        "undump a",
        "thaw b",
        "thaw a",
        "release",
    ];

    fn last(n: usize) -> &'static [&'static str] {
        &UNDO_ALL[UNDO_ALL.len() - n..]
    }

    /// Once the image write was attempted, the store is wiped last, after
    /// the workloads run again: it holds process memory.
    fn and_wipe(undo: &[&'static str]) -> Vec<&'static str> {
        let mut v = undo.to_vec();
        v.push("wipe");
        v
    }

    #[test]
    fn success_runs_every_step_in_order_and_ends_in_the_reboot() {
        let mut f = Fake {
            loaded: true,
            ..Default::default()
        };
        let err = go(&mut f, &Cleared::for_tests(two(), false), &opts()).unwrap_err();
        // The fake's reboot "fails", so go undoes everything after it.
        assert_eq!(err.failure.reason, "refused by the kernel");
        let upto_reboot = f.calls_before("reboot");
        assert_eq!(
            upto_reboot,
            [
                "system state",
                "hold",
                "freeze a",
                "freeze b",
                "dump a",
                "dump b",
                "capture",
                "write",
                "quiesce"
            ]
        );
        assert_eq!(
            &f.events[..6],
            &[
                Event::PreflightOk,
                Event::Frozen,
                Event::Dumped,
                Event::StateCaptured,
                Event::ImageWritten,
                Event::Kexec
            ]
        );
    }

    #[test]
    fn a_refused_reboot_resumes_everything() {
        let mut f = Fake {
            loaded: true,
            ..Default::default()
        };
        go(&mut f, &Cleared::for_tests(two(), false), &opts()).unwrap_err();
        let after = f.calls_from("reboot")[1..].to_vec();
        assert_eq!(after, and_wipe(&UNDO_ALL));
        assert_eq!(f.events.last(), Some(&Event::Resumed));
    }

    /// Each failing step undoes exactly what was done before it, in reverse.
    #[test]
    fn every_abort_path_undoes_what_was_done() {
        let cases: &[(&str, &[&str])] = &[
            ("system state", last(0)),
            ("hold", last(1)),
            ("freeze a", &["thaw a", "release"]),
            ("freeze b", last(3)),
            // A dump that fails may have stopped the tasks, locked the
            // network and put sockets in repair mode: it is undone too.
            ("dump a", &["undump a", "thaw b", "thaw a", "release"]),
            ("dump b", last(5)),
            ("capture", last(5)),
            // A write that fails may have written part of the image.
            ("write", &and_wipe(last(6))),
            ("quiesce", &and_wipe(last(7))),
        ];
        for (at, undo) in cases {
            let mut f = Fake {
                loaded: true,
                fail_at: Some(at.to_string()),
                ..Default::default()
            };
            let err = go(&mut f, &Cleared::for_tests(two(), false), &opts()).unwrap_err();
            assert_eq!(err.failure.reason, "injected", "{at}");
            assert!(err.resume_errors.is_empty());
            let pos = f.calls.iter().position(|c| c == at).unwrap();
            let after: Vec<&str> = f.calls[pos + 1..].iter().map(String::as_str).collect();
            assert_eq!(&after, undo, "failing at {at}");
            assert!(!f.calls.contains(&"reboot".to_string()), "{at}");
            assert_eq!(
                f.events.iter().rev().take(2).collect::<Vec<_>>(),
                [&Event::Resumed, &Event::Aborted]
            );
        }
    }

    /// `kupgrade go | tee log` and Ctrl-C on tee, or a dropped ssh session:
    /// printing fails (and `println!` panics). Wherever that happens, the
    /// workloads are given back and `go` returns the abort.
    #[test]
    fn output_that_panics_never_stops_the_undo() {
        let cases: &[(Event, &str, &[&str])] = &[
            // Mid-run: the step fails, everything done so far is undone.
            (Event::Dumped, "dump b", last(5)),
            (Event::ImageWritten, "write", &and_wipe(last(6))),
            // In the abort path, before and after the undo.
            (Event::Aborted, "quiesce", &and_wipe(last(7))),
            (Event::Resumed, "quiesce", &and_wipe(last(7))),
        ];
        for (event, after, undo) in cases {
            let mut f = Fake {
                loaded: true,
                emit_panics_at: Some(*event),
                ..Default::default()
            };
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                go(&mut f, &Cleared::for_tests(two(), false), &opts())
            }));
            let Ok(Err(err)) = res else {
                panic!("{event:?}: go did not return its abort");
            };
            let pos = f.calls.iter().position(|c| c == after).unwrap();
            let rest: Vec<&str> = f.calls[pos + 1..].iter().map(String::as_str).collect();
            let rest: Vec<&str> = rest.into_iter().filter(|c| *c != "reboot").collect();
            assert_eq!(&rest, undo, "output panicking at {event:?}");
            assert!(err.resume_errors.is_empty(), "{event:?}: {err}");
            if matches!(event, Event::Dumped | Event::ImageWritten) {
                assert!(
                    err.failure.reason.contains("Broken pipe"),
                    "{event:?}: {}",
                    err.failure
                );
            }
        }
    }

    /// CRIU killed half-way, or `nft list table` failing after CRIU
    /// succeeded: the network may be locked, so the undo looks for the lock.
    #[test]
    fn a_failed_dump_of_a_workload_with_connections_is_undone_as_locked() {
        let mut f = Fake {
            loaded: true,
            fail_at: Some("dump b".into()),
            ..Default::default()
        };
        go(&mut f, &Cleared::for_tests(two(), false), &opts()).unwrap_err();
        let b = f.undumped.iter().find(|(n, _)| n == "b").map(|(_, d)| d);
        assert!(b.is_some_and(|d| d.lock_table.is_some()), "{b:?}");
        // a has no connections: no lock to look for.
        let a = f.undumped.iter().find(|(n, _)| n == "a").map(|(_, d)| d);
        assert_eq!(a, Some(&Dumped { lock_table: None }));
    }

    #[test]
    fn a_kernel_unloaded_during_the_dump_aborts_before_the_reboot() {
        let mut f = Fake {
            loaded: true,
            unload_after_write: true,
            ..Default::default()
        };
        let err = go(&mut f, &Cleared::for_tests(two(), false), &opts()).unwrap_err();
        assert_eq!(err.failure.step, Step::Kexec);
        assert!(
            err.failure.reason.contains("kupgrade stage"),
            "{}",
            err.failure
        );
        assert!(!f.calls.contains(&"reboot".to_string()));
        assert!(!f.calls.contains(&"quiesce".to_string()));
        assert!(f.calls.contains(&"thaw a".to_string()));
    }

    #[test]
    fn a_signal_between_steps_aborts_and_resumes() {
        let mut f = Fake {
            loaded: true,
            interrupt_at: Some("dump a".into()),
            ..Default::default()
        };
        let err = go(&mut f, &Cleared::for_tests(two(), false), &opts()).unwrap_err();
        assert_eq!(err.failure.reason, "interrupted by a signal");
        assert!(!f.calls.contains(&"dump b".to_string()));
        let tail = f.calls_from("dump a")[1..].to_vec();
        assert_eq!(tail, ["undump a", "thaw b", "thaw a", "release"]);
    }

    #[test]
    fn dry_run_does_all_but_the_reboot_then_resumes() {
        let mut f = Fake {
            loaded: false,
            ..Default::default()
        };
        let out = go(&mut f, &Cleared::for_tests(two(), true), &opts()).unwrap();
        assert!(matches!(
            out,
            Outcome::DryRun {
                image_bytes: 4096,
                ..
            }
        ));
        assert!(!f.calls.iter().any(|c| c == "reboot" || c == "quiesce"));
        let tail = f.calls_from("write")[1..].to_vec();
        assert_eq!(tail, and_wipe(last(6)));
        assert_eq!(f.events.last(), Some(&Event::Resumed));
    }

    #[test]
    fn recovering_from_a_killed_go_undoes_everything_it_may_have_done() {
        let mut f = Fake::default();
        let errs = recover(&mut f, &two(), true, true);
        assert!(errs.is_empty());
        assert_eq!(f.calls, and_wipe(&UNDO_ALL));
        // Without an image or read-only file systems found, those are left;
        // the store is wiped anyway: a go killed mid-write leaves no image.
        let mut f = Fake::default();
        recover(&mut f, &two(), false, false);
        assert_eq!(f.calls[0], "undump b");
        assert_eq!(f.calls.last().map(String::as_str), Some("wipe"));
    }

    fn with_precopy() -> Options {
        Options {
            precopy: Precopy {
                max_iterations: 4,
                budget: Duration::from_secs(600),
                store_capacity: 0,
            },
            ..opts()
        }
    }

    fn field<'a>(f: &'a Fake, event: Event, key: &str) -> Option<&'a str> {
        f.lines
            .iter()
            .find(|l| l.event == event)
            .and_then(|l| l.field(key))
    }

    fn parent_of<'a>(f: &'a Fake, name: &str) -> Option<Option<&'a Path>> {
        f.dump_parents
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_deref())
    }

    #[test]
    fn precopy_stops_once_the_dirty_set_stops_shrinking_or_its_budget_is_spent() {
        let limits = Precopy {
            max_iterations: 5,
            budget: Duration::from_secs(60),
            store_capacity: 0,
        };
        let at =
            |written: &[u64], s: u64| precopy_stop(written, 0, &limits, Duration::from_secs(s));
        assert_eq!(at(&[], 0), None);
        assert_eq!(at(&[100], 0), None);
        assert_eq!(at(&[100, 10], 0), None);
        // No smaller than the round before: another would not help.
        assert_eq!(at(&[100, 10, 10], 0), Some(PrecopyStop::Converged));
        assert_eq!(at(&[100, 10, 20], 0), Some(PrecopyStop::Converged));
        // Nothing dirtied: nothing left to copy ahead.
        assert_eq!(at(&[100, 0], 0), Some(PrecopyStop::Converged));
        assert_eq!(at(&[100, 50, 25, 12, 6], 0), Some(PrecopyStop::Iterations));
        assert_eq!(at(&[100, 10], 60), Some(PrecopyStop::Budget));
        assert_eq!(at(&[100, 10], 59), None);
        // A store of 300 bytes holding 250: room for 50, not for another
        // round of 30 and a frozen dump as large.
        let small = Precopy {
            store_capacity: 300,
            ..limits
        };
        let zero = Duration::ZERO;
        assert_eq!(
            precopy_stop(&[200, 30], 250, &small, zero),
            Some(PrecopyStop::Store)
        );
        assert_eq!(precopy_stop(&[200, 20], 250, &small, zero), None);
        // The first round copies everything: it says nothing of the next.
        assert_eq!(precopy_stop(&[200], 250, &small, zero), None);
    }

    /// Each pre-dump names the one before as its parent, the frozen dump
    /// the last one; all of it before the hold and the freeze, and summed
    /// up in one `predump` event between `preflight-ok` and `frozen`.
    #[test]
    fn precopy_chains_the_predumps_and_the_frozen_dump_to_the_last() {
        let mut f = Fake {
            loaded: true,
            predump_bytes: vec![256 << 20, 1 << 20, 1 << 20],
            ..Default::default()
        };
        let err = go(&mut f, &Cleared::for_tests(two(), false), &with_precopy()).unwrap_err();
        assert_eq!(err.failure.reason, "refused by the kernel");
        let upto_hold = f.calls_before("hold");
        assert_eq!(
            upto_hold,
            [
                "system state",
                "predump a 1 -",
                "predump b 1 -",
                "store criu/a/pre/1 criu/b/pre/1",
                "predump a 2 ../1",
                "predump b 2 ../1",
                "store criu/a/pre/2 criu/b/pre/2",
                "predump a 3 ../2",
                "predump b 3 ../2",
                "store criu/a/pre/3 criu/b/pre/3",
            ]
        );
        assert_eq!(parent_of(&f, "a"), Some(Some(Path::new("pre/3"))));
        assert_eq!(parent_of(&f, "b"), Some(Some(Path::new("pre/3"))));
        assert_eq!(
            &f.events[..3],
            &[Event::PreflightOk, Event::Predump, Event::Frozen]
        );
        assert_eq!(field(&f, Event::Predump, "iterations"), Some("3"));
        assert_eq!(
            field(&f, Event::Predump, "bytes"),
            Some("536870912,2097152,2097152")
        );
        assert_eq!(field(&f, Event::Predump, "stop"), Some("converged"));
        assert_eq!(field(&f, Event::Predump, "fallback"), Some("-"));
        assert_eq!(field(&f, Event::Predump, "stored_bytes"), Some("1048576"));
        // The undo removes the pre-dumps too (process memory).
        let tail = f.calls_from("release");
        assert_eq!(tail, ["release", "discard a", "discard b", "wipe"]);
    }

    #[test]
    fn precopy_ends_at_its_iteration_limit() {
        let mut f = Fake {
            loaded: true,
            predump_bytes: vec![1 << 30, 1 << 29, 1 << 28, 1 << 27, 1 << 26],
            ..Default::default()
        };
        go(&mut f, &Cleared::for_tests(two(), false), &with_precopy()).unwrap_err();
        assert!(f.calls.iter().any(|c| c == "predump b 4 ../3"));
        assert!(!f.calls.iter().any(|c| c.starts_with("predump a 5")));
        assert_eq!(field(&f, Event::Predump, "stop"), Some("iterations"));
        assert_eq!(parent_of(&f, "a"), Some(Some(Path::new("pre/4"))));
    }

    /// The rounds go into the store: none starts that might leave no room
    /// for the frozen dump (the fake's store holds 1 MiB after each).
    #[test]
    fn precopy_stops_before_the_store_could_fill_up() {
        let mut f = Fake {
            loaded: true,
            predump_bytes: vec![256 << 20, 2 << 20, 1 << 20],
            ..Default::default()
        };
        let small = Options {
            precopy: Precopy {
                store_capacity: 3 << 20,
                ..with_precopy().precopy
            },
            ..opts()
        };
        go(&mut f, &Cleared::for_tests(two(), false), &small).unwrap_err();
        assert_eq!(field(&f, Event::Predump, "stop"), Some("store"));
        assert_eq!(field(&f, Event::Predump, "iterations"), Some("2"));
        assert_eq!(parent_of(&f, "a"), Some(Some(Path::new("pre/2"))));
    }

    /// A pre-dump that fails (CRIU refusing, a kernel without soft-dirty
    /// tracking, a timeout) is no reason to stop: that workload's pre-dumps
    /// are discarded and it is dumped in full; the others carry on.
    #[test]
    fn a_failing_predump_falls_back_to_a_full_dump_of_that_workload() {
        let mut f = Fake {
            loaded: true,
            predump_bytes: vec![256 << 20, 1 << 20, 1 << 20],
            fail_at: Some("predump b 2 ../1".into()),
            ..Default::default()
        };
        let err = go(&mut f, &Cleared::for_tests(two(), false), &with_precopy()).unwrap_err();
        assert_eq!(err.failure.reason, "refused by the kernel");
        let pos = f
            .calls
            .iter()
            .position(|c| c == "predump b 2 ../1")
            .unwrap();
        assert_eq!(f.calls[pos + 1], "discard b");
        assert!(!f.calls.iter().any(|c| c.starts_with("predump b 3")));
        assert!(f.calls.iter().any(|c| c == "predump a 3 ../2"));
        // From then on only a's pre-dumps go to the store.
        assert!(f.calls.iter().any(|c| c == "store criu/a/pre/2"));
        assert_eq!(parent_of(&f, "a"), Some(Some(Path::new("pre/3"))));
        assert_eq!(parent_of(&f, "b"), Some(None));
        assert_eq!(field(&f, Event::Predump, "fallback"), Some("b"));
        assert_eq!(field(&f, Event::Predump, "workloads"), Some("1"));
        assert!(f.calls.contains(&"reboot".to_string()));
        // b's pre-dumps are gone already; only a's are left to discard.
        let tail = f.calls_from("release");
        assert_eq!(tail, ["release", "discard a", "wipe"]);
    }

    #[test]
    fn when_every_predump_fails_the_dump_is_a_full_one() {
        let mut f = Fake {
            loaded: true,
            fail_at: Some("predump a 1 -".into()),
            ..Default::default()
        };
        let one = vec![wl("a", 10001, false)];
        let err = go(&mut f, &Cleared::for_tests(one, false), &with_precopy()).unwrap_err();
        assert_eq!(err.failure.reason, "refused by the kernel");
        assert_eq!(
            &f.calls[..5],
            [
                "system state",
                "predump a 1 -",
                "discard a",
                "hold",
                "freeze a"
            ]
        );
        assert_eq!(parent_of(&f, "a"), Some(None));
        assert_eq!(field(&f, Event::Predump, "stop"), Some("failed"));
        assert_eq!(field(&f, Event::Predump, "iterations"), Some("1"));
    }

    /// Nothing is frozen or held yet: a signal during pre-copy aborts, and
    /// the undo only removes the pre-dumps.
    #[test]
    fn a_signal_during_precopy_aborts_and_discards_the_predumps() {
        let mut f = Fake {
            loaded: true,
            predump_bytes: vec![256 << 20, 1 << 20, 1 << 20],
            interrupt_at: Some("predump a 2 ../1".into()),
            ..Default::default()
        };
        let err = go(&mut f, &Cleared::for_tests(two(), false), &with_precopy()).unwrap_err();
        assert_eq!(err.failure.step, Step::Precopy);
        assert_eq!(err.failure.reason, "interrupted by a signal");
        assert!(err.resume_errors.is_empty());
        let pos = f
            .calls
            .iter()
            .position(|c| c == "predump a 2 ../1")
            .unwrap();
        // Round 1 is in the store: the image is invalidated and the store
        // wiped, last.
        assert_eq!(
            &f.calls[pos + 1..],
            ["invalidate", "discard a", "discard b", "wipe"]
        );
        assert!(!f.events.contains(&Event::Predump));
        assert_eq!(
            f.events.iter().rev().take(2).collect::<Vec<_>>(),
            [&Event::Resumed, &Event::Aborted]
        );
    }

    /// The store refusing the pre-dumps aborts before anything is frozen.
    #[test]
    fn a_failing_predump_write_to_the_store_aborts_before_the_freeze() {
        let mut f = Fake {
            loaded: true,
            fail_at: Some("store criu/a/pre/1 criu/b/pre/1".into()),
            ..Default::default()
        };
        let err = go(&mut f, &Cleared::for_tests(two(), false), &with_precopy()).unwrap_err();
        assert_eq!(err.failure.step, Step::ImageWrite);
        let pos = f
            .calls
            .iter()
            .position(|c| c.starts_with("store "))
            .unwrap();
        assert_eq!(
            &f.calls[pos + 1..],
            ["invalidate", "discard a", "discard b", "wipe"]
        );
    }

    #[test]
    fn a_dry_run_precopies_too_and_discards_the_predumps() {
        let mut f = Fake {
            predump_bytes: vec![256 << 20, 1 << 20, 1 << 20],
            ..Default::default()
        };
        go(&mut f, &Cleared::for_tests(two(), true), &with_precopy()).unwrap();
        assert!(f.calls.iter().any(|c| c == "predump b 3 ../2"));
        assert_eq!(parent_of(&f, "b"), Some(Some(Path::new("pre/3"))));
        let tail = f.calls_from("release");
        assert_eq!(tail, ["release", "discard a", "discard b", "wipe"]);
    }

    #[test]
    fn resume_errors_are_reported_not_hidden() {
        let mut f = Fake {
            loaded: true,
            fail_at: Some("thaw a".into()),
            ..Default::default()
        };
        // the dump of b fails via a second injected failure is not possible
        // with one fail_at, so fail the reboot (always) and the thaw of a.
        let err = go(&mut f, &Cleared::for_tests(two(), false), &opts()).unwrap_err();
        assert_eq!(join(&err.resume_errors), "thaw: injected");
        assert_eq!(err.resume_errors[0].step, Step::Thaw);
        assert!(err.to_string().contains("RESUMING FAILED"));
    }
}
