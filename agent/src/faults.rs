//! Faults injected at the [`System`] seam, for tests: [`Faulty`] wraps a
//! `System`, delegates every call to it and fires, at their points, the
//! faults that `KUPGRADE_FAILPOINT` lists. The real system has no test
//! branches; `kupgrade` wraps it only when the variable is set.
//!
//! `KUPGRADE_FAILPOINT` is a comma-separated list of fault points, each
//! `FAULT-WHEN-POINT` or `FAULT-WHEN-POINT:WORKLOAD`:
//!
//! - FAULT: `error` (the step fails), `die` (kupgrade aborts, as in a
//!   crash), `kill` (SIGKILL to itself), `sigterm`, `sigint`, `sighup` (the
//!   signal to itself; the step goes on), `hang` (the step blocks until a
//!   signal asks kupgrade to stop, then fails), `stall` (the step takes 10 s
//!   longer, then goes on, as a slow one would), `corrupt` (flips a byte in
//!   the first chunk of the first workload's section of the written image,
//!   as a failing store would; only `after-image-write`;
//!   `corrupt-after-image-write:superblock` or `:manifest` damages that
//!   instead), `unload` (unloads the staged kernel for real, so that the
//!   kernel itself refuses the kexec that follows; only `before-kexec`).
//! - WHEN: `before` the step (an error or a hang then skips it) or `after`
//!   it succeeded.
//! - POINT: one call of the seam: `hold`, `freeze`, `checkpoint`,
//!   `system-state`, `tmpfs`, `image-write`, `quiesce`, `kexec` (only
//!   `before`: a kexec that works does not return), and the undo:
//!   `unquiesce`, `invalidate`, `undump`, `thaw`, `release`, `wipe`.
//! - WORKLOAD: only at that workload's `freeze`, `checkpoint`, `undump` or
//!   `thaw`; without it a fault fires for each workload.
//!
//! The QEMU scenarios use `kexec` (short for `error-before-kexec`),
//! `die-before-kexec`, `sigterm-after-checkpoint`, `corrupt-image` (short
//! for `corrupt-after-image-write`), `corrupt-superblock` and
//! `corrupt-manifest`; `go-faults` runs `error`, `kill`, `sighup` and
//! `sigint` after every step before the kexec, and `unload-before-kexec`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use contract::devstate::{DeviceState, TmpfsMount};
use contract::events::EventLine;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::pipeline::{Dumped, ImageInput, Step, StepError, System};
use crate::store::Store;
use crate::workload::Workload;

pub const FAILPOINT: &str = "KUPGRADE_FAILPOINT";

macro_rules! points {
    ($($variant:ident => $name:literal, $step:ident, $per_workload:literal;)*) => {
        /// A call of the [`System`] seam where a fault can fire.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Point {
            $($variant,)*
        }

        impl Point {
            pub const ALL: &'static [Point] = &[$(Point::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(Point::$variant => $name,)*
                }
            }

            /// The step a failure here is reported as.
            pub fn step(self) -> Step {
                match self {
                    $(Point::$variant => Step::$step,)*
                }
            }

            /// Called once per workload.
            pub fn per_workload(self) -> bool {
                match self {
                    $(Point::$variant => $per_workload,)*
                }
            }
        }
    };
}

points! {
    Predump => "predump", Precopy, true;
    Hold => "hold", Connections, false;
    Freeze => "freeze", Freeze, true;
    Checkpoint => "checkpoint", Checkpoint, true;
    SystemState => "system-state", DeviceState, false;
    Tmpfs => "tmpfs", DeviceState, false;
    ImageWrite => "image-write", ImageWrite, false;
    Quiesce => "quiesce", Quiesce, false;
    Kexec => "kexec", Kexec, false;
    Unquiesce => "unquiesce", Unquiesce, false;
    Invalidate => "invalidate", Invalidate, false;
    Wipe => "wipe", Wipe, false;
    Undump => "undump", Undump, true;
    Thaw => "thaw", Thaw, true;
    Release => "release", Release, false;
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Before,
    After,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Error,
    /// `abort()`: nothing is undone, as after a crash.
    Die,
    /// A signal to kupgrade itself; SIGKILL for `kill`.
    Signal(Signal),
    /// Blocks until a signal asks kupgrade to stop.
    Hang,
    /// Delays the step by [`STALL_PAUSES`] pauses, then goes on.
    Stall,
    /// Damages the written image.
    Corrupt(Target),
    /// Unloads the staged kernel: the real reboot call then fails.
    Unload,
}

/// What `corrupt` damages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The first chunk of the first workload's section.
    Chunk,
    /// The superblock (its header checksum no longer matches).
    Superblock,
    /// The manifest (its checksum no longer matches).
    Manifest,
}

impl Fault {
    fn parse(word: &str) -> Option<Fault> {
        Some(match word {
            "error" => Fault::Error,
            "die" => Fault::Die,
            "kill" => Fault::Signal(Signal::SIGKILL),
            "sigterm" => Fault::Signal(Signal::SIGTERM),
            "sigint" => Fault::Signal(Signal::SIGINT),
            "sighup" => Fault::Signal(Signal::SIGHUP),
            "hang" => Fault::Hang,
            "stall" => Fault::Stall,
            "corrupt" => Fault::Corrupt(Target::Chunk),
            "unload" => Fault::Unload,
            _ => return None,
        })
    }
}

/// One fault at one point, as parsed from `KUPGRADE_FAILPOINT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultPoint {
    pub fault: Fault,
    pub when: When,
    pub point: Point,
    /// Only at this workload's call.
    pub workload: Option<String>,
    /// As written in the variable, for messages.
    pub given: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{FAILPOINT}: {0:?} is not FAULT-before-POINT or FAULT-after-POINT (e.g. error-before-kexec)")]
    Shape(String),
    #[error("{FAILPOINT}: {given:?}: no fault {fault:?} (error, die, kill, sigterm, sigint, sighup, hang, stall, corrupt, unload)")]
    Fault { given: String, fault: String },
    #[error("{FAILPOINT}: {given:?}: no point {point:?} (hold, freeze, checkpoint, system-state, tmpfs, image-write, quiesce, kexec, unquiesce, invalidate, undump, thaw, release, wipe)")]
    Point { given: String, point: String },
    #[error("{FAILPOINT}: {given:?}: {point} is not called per workload")]
    Workload { given: String, point: Point },
    #[error("{FAILPOINT}: {0:?}: a kexec that works does not return; use before-kexec")]
    AfterKexec(String),
    #[error(
        "{FAILPOINT}: {0:?}: only the written image can be corrupted: corrupt-after-image-write, optionally :superblock or :manifest"
    )]
    Corrupt(String),
    #[error("{FAILPOINT}: {0:?}: only the staged kernel can be unloaded, right before the kexec: unload-before-kexec")]
    Unload(String),
}

/// Parses a list of fault points; an empty one means none.
pub fn parse(spec: &str) -> Result<Vec<FaultPoint>, ParseError> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_one)
        .collect()
}

fn parse_one(given: &str) -> Result<FaultPoint, ParseError> {
    let canonical = match given {
        "kexec" => "error-before-kexec",
        "corrupt-image" => "corrupt-after-image-write",
        "corrupt-superblock" => "corrupt-after-image-write:superblock",
        "corrupt-manifest" => "corrupt-after-image-write:manifest",
        other => other,
    };
    let (at, workload) = match canonical.split_once(':') {
        Some((at, w)) if !w.is_empty() => (at, Some(w.to_string())),
        Some(_) => return Err(ParseError::Shape(given.into())),
        None => (canonical, None),
    };
    let (fault, when, point) = [("-before-", When::Before), ("-after-", When::After)]
        .into_iter()
        .find_map(|(sep, when)| at.split_once(sep).map(|(f, p)| (f, when, p)))
        .ok_or_else(|| ParseError::Shape(given.into()))?;
    let mut fault = Fault::parse(fault).ok_or_else(|| ParseError::Fault {
        given: given.into(),
        fault: fault.into(),
    })?;
    let point = Point::ALL
        .iter()
        .copied()
        .find(|p| p.name() == point)
        .ok_or_else(|| ParseError::Point {
            given: given.into(),
            point: point.into(),
        })?;
    // After `corrupt`, the suffix names what to damage, not a workload.
    let mut workload = workload;
    if fault == Fault::Corrupt(Target::Chunk) && point == Point::ImageWrite {
        let target = match workload.take().as_deref() {
            None => Target::Chunk,
            Some("superblock") => Target::Superblock,
            Some("manifest") => Target::Manifest,
            Some(_) => return Err(ParseError::Corrupt(given.into())),
        };
        fault = Fault::Corrupt(target);
    }
    if workload.is_some() && !point.per_workload() {
        return Err(ParseError::Workload {
            given: given.into(),
            point,
        });
    }
    if point == Point::Kexec && when == When::After {
        return Err(ParseError::AfterKexec(given.into()));
    }
    if matches!(fault, Fault::Corrupt(_)) && (point, when) != (Point::ImageWrite, When::After) {
        return Err(ParseError::Corrupt(given.into()));
    }
    if fault == Fault::Unload && (point, when) != (Point::Kexec, When::Before) {
        return Err(ParseError::Unload(given.into()));
    }
    Ok(FaultPoint {
        fault,
        when,
        point,
        workload,
        given: given.into(),
    })
}

/// The fault points `KUPGRADE_FAILPOINT` lists; `None` when there are none.
pub fn from_env() -> Result<Option<Vec<FaultPoint>>, ParseError> {
    let points = parse(&std::env::var(FAILPOINT).unwrap_or_default())?;
    Ok((!points.is_empty()).then_some(points))
}

/// A line on stderr that cannot panic (`eprintln!` does when stderr is gone).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A stall's pauses of [`Process::pause`] (100 ms each): 10 s, longer than
/// a short watchdog.
pub const STALL_PAUSES: usize = 100;

/// What a fault does to the kupgrade process, apart so that tests can
/// watch it instead.
pub trait Process {
    fn raise(&mut self, sig: Signal);
    fn abort(&mut self) -> !;
    /// One slice of a hang.
    fn pause(&mut self);
    /// Unloads the kexec kernel.
    fn unload_kexec(&mut self) -> Result<(), String>;
}

pub struct RealProcess;

impl Process for RealProcess {
    fn raise(&mut self, sig: Signal) {
        let _ = kill(Pid::this(), sig);
    }

    fn abort(&mut self) -> ! {
        std::process::abort()
    }

    fn pause(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
    }

    fn unload_kexec(&mut self) -> Result<(), String> {
        kexec::unload().map_err(|e| e.to_string())
    }
}

/// A [`System`] with faults injected around the calls of another.
pub struct Faulty<S, P = RealProcess> {
    inner: S,
    points: Vec<FaultPoint>,
    /// Where the image is written, for `corrupt`.
    store: Store,
    process: P,
}

impl<S: System> Faulty<S> {
    pub fn new(inner: S, points: Vec<FaultPoint>, store: Store) -> Self {
        Faulty::with_process(inner, points, store, RealProcess)
    }
}

impl<S: System, P: Process> Faulty<S, P> {
    pub fn with_process(inner: S, points: Vec<FaultPoint>, store: Store, process: P) -> Self {
        Faulty {
            inner,
            points,
            store,
            process,
        }
    }

    fn at(&self, point: Point, when: When, workload: Option<&str>) -> Vec<FaultPoint> {
        self.points
            .iter()
            .filter(|f| f.point == point && f.when == when)
            .filter(|f| f.workload.is_none() || f.workload.as_deref() == workload)
            .cloned()
            .collect()
    }

    /// Fires the faults of one point; an `Err` fails the step.
    fn fire(&mut self, point: Point, when: When, workload: Option<&str>) -> Result<(), StepError> {
        for f in self.at(point, when, workload) {
            let given = &f.given;
            match f.fault {
                Fault::Error => {
                    return Err(StepError::new(
                        point.step(),
                        match when {
                            When::Before => {
                                format!("failpoint {FAILPOINT}={given}: {point} was not attempted")
                            }
                            When::After => {
                                format!(
                                    "failpoint {FAILPOINT}={given}: failed after {point} succeeded"
                                )
                            }
                        },
                    ))
                }
                Fault::Die => {
                    say(&format!(
                        "kupgrade: failpoint {FAILPOINT}={given}: aborting"
                    ));
                    self.process.abort()
                }
                Fault::Signal(sig) => {
                    if sig == Signal::SIGKILL {
                        say(&format!("kupgrade: failpoint {FAILPOINT}={given}: SIGKILL"));
                    }
                    self.process.raise(sig)
                }
                Fault::Stall => {
                    say(&format!(
                        "kupgrade: failpoint {FAILPOINT}={given}: {point} stalls for {} s",
                        STALL_PAUSES / 10
                    ));
                    for _ in 0..STALL_PAUSES {
                        self.process.pause();
                        if self.inner.interrupted() {
                            return Err(StepError::new(
                                point.step(),
                                format!("interrupted by a signal while stalled by failpoint {FAILPOINT}={given}"),
                            ));
                        }
                    }
                }
                Fault::Hang => loop {
                    self.process.pause();
                    if self.inner.interrupted() {
                        return Err(StepError::new(
                            point.step(),
                            format!("interrupted by a signal while hung by failpoint {FAILPOINT}={given}"),
                        ));
                    }
                },
                // Needs the image input: see `write_image`.
                Fault::Corrupt(_) => {}
                Fault::Unload => {
                    self.process.unload_kexec().map_err(|e| {
                        StepError::new(
                            point.step(),
                            format!("failpoint {FAILPOINT}={given}: cannot unload the staged kernel: {e}"),
                        )
                    })?;
                    say(&format!(
                        "kupgrade: failpoint {FAILPOINT}={given}: unloaded the staged kernel; the kexec goes ahead"
                    ));
                }
            }
        }
        Ok(())
    }

    /// `call` between the faults before and after it.
    fn around<T>(
        &mut self,
        point: Point,
        workload: Option<&str>,
        call: impl FnOnce(&mut S) -> Result<T, StepError>,
    ) -> Result<T, StepError> {
        self.fire(point, When::Before, workload)?;
        let out = call(&mut self.inner)?;
        self.fire(point, When::After, workload)?;
        Ok(out)
    }

    /// Flips one byte of `target`, after the image was written and read
    /// back: inside the first chunk of the first workload's section, in
    /// the superblock's generation, or inside the manifest.
    fn corrupt(&self, target: Target, input: &ImageInput) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let name = input.trees.first().map(|t| t.0.as_str()).unwrap_or("");
        let f = self.store.open_rw().map_err(|e| e.to_string())?;
        let img = image_format::Image::open(f).map_err(|e| e.to_string())?;
        let at = match target {
            Target::Chunk => {
                let Some(section) = img.manifest().sections.iter().find(|s| s.name == name) else {
                    return Err(format!("no section {name:?} to damage"));
                };
                // Past the chunk header, inside its body.
                section.offset + image_format::format::CHUNK_HEADER_LEN as u64
            }
            // The generation (bytes 16..24), covered by the header checksum.
            Target::Superblock => 16,
            Target::Manifest => {
                let sb = img.superblock();
                sb.manifest_offset + sb.manifest_len / 2
            }
        };
        let f = self.store.open_rw().map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).map_err(|e| e.to_string())?;
        f.write_all_at(&[!b[0]], at).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())
    }
}

impl<S: System, P: Process> System for Faulty<S, P> {
    fn staged_still_loaded(&mut self) -> Result<(), String> {
        self.inner.staged_still_loaded()
    }

    fn hold_connections(&mut self, ws: &[Workload]) -> Result<(), StepError> {
        self.around(Point::Hold, None, |s| s.hold_connections(ws))
    }

    fn release_connections(&mut self) -> Result<(), StepError> {
        self.around(Point::Release, None, |s| s.release_connections())
    }

    fn freeze(&mut self, w: &Workload) -> Result<(), StepError> {
        self.around(Point::Freeze, Some(&w.name), |s| s.freeze(w))
    }

    fn thaw(&mut self, w: &Workload) -> Result<(), StepError> {
        self.around(Point::Thaw, Some(&w.name), |s| s.thaw(w))
    }

    fn predump(
        &mut self,
        w: &Workload,
        dir: &Path,
        parent: Option<&Path>,
    ) -> Result<u64, StepError> {
        self.around(Point::Predump, Some(&w.name), |s| s.predump(w, dir, parent))
    }

    fn discard_predumps(&mut self, dir: &Path) -> Result<(), StepError> {
        self.inner.discard_predumps(dir)
    }

    fn store_predumps(&mut self, sections: &[(String, PathBuf)]) -> Result<u64, StepError> {
        self.inner.store_predumps(sections)
    }

    fn dump(
        &mut self,
        w: &Workload,
        dir: &Path,
        parent: Option<&Path>,
    ) -> Result<Dumped, StepError> {
        self.around(Point::Checkpoint, Some(&w.name), |s| s.dump(w, dir, parent))
    }

    fn undump(&mut self, w: &Workload, d: &Dumped) -> Result<(), StepError> {
        self.around(Point::Undump, Some(&w.name), |s| s.undump(w, d))
    }

    fn system_state(&mut self) -> Result<DeviceState, StepError> {
        self.around(Point::SystemState, None, |s| s.system_state())
    }

    fn tmpfs_files(
        &mut self,
        ws: &[Workload],
        dir: &Path,
    ) -> Result<(Vec<TmpfsMount>, bool), StepError> {
        self.around(Point::Tmpfs, None, |s| s.tmpfs_files(ws, dir))
    }

    fn write_image(&mut self, input: &ImageInput) -> Result<u64, StepError> {
        self.fire(Point::ImageWrite, When::Before, None)?;
        let bytes = self.inner.write_image(input)?;
        // `parse` allows `corrupt` only after the image write.
        let targets: Vec<Target> = self
            .points
            .iter()
            .filter_map(|f| match f.fault {
                Fault::Corrupt(t) => Some(t),
                _ => None,
            })
            .collect();
        for t in targets {
            self.corrupt(t, input).map_err(|e| {
                StepError::new(Step::ImageWrite, format!("failpoint {FAILPOINT}: {e}"))
            })?;
        }
        self.fire(Point::ImageWrite, When::After, None)?;
        Ok(bytes)
    }

    fn invalidate_image(&mut self) -> Result<(), StepError> {
        self.around(Point::Invalidate, None, |s| s.invalidate_image())
    }

    fn wipe_image(&mut self) -> Result<(), StepError> {
        self.around(Point::Wipe, None, |s| s.wipe_image())
    }

    fn quiesce_filesystems(&mut self) -> Result<(), StepError> {
        self.around(Point::Quiesce, None, |s| s.quiesce_filesystems())
    }

    fn unquiesce_filesystems(&mut self) -> Result<(), StepError> {
        self.around(Point::Unquiesce, None, |s| s.unquiesce_filesystems())
    }

    fn reboot(&mut self) -> StepError {
        if let Err(e) = self.fire(Point::Kexec, When::Before, None) {
            return e;
        }
        self.inner.reboot()
    }

    fn emit(&mut self, e: EventLine) {
        self.inner.emit(e)
    }

    fn interrupted(&mut self) -> bool {
        self.inner.interrupted()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::rc::Rc;

    use super::*;
    use crate::pipeline::fake::{opts, two, Fake};
    use crate::pipeline::{self, Aborted, Outcome};
    use crate::preflight::Cleared;

    /// What `go` undoes for `two()` when it fails after the quiesce.
    const UNDO_AFTER_QUIESCE: [&str; 8] = [
        "unquiesce",
        "invalidate",
        "undump b",
        "undump a",
        "thaw b",
        "thaw a",
        "release",
        "wipe",
    ];

    #[derive(Debug, PartialEq, Eq)]
    enum Did {
        Raise(Signal),
        Abort,
        Pause,
        Unload,
    }

    /// Records what a fault does to the process; a caught signal sets the
    /// fake's flag, as the real handler would. A death (abort, SIGKILL)
    /// marks the fake dead, then unwinds out of the fault.
    struct Watch {
        did: Vec<Did>,
        signalled: Rc<Cell<bool>>,
        dead: Rc<Cell<bool>>,
        /// Pauses of a hang before someone presses Ctrl-C.
        pauses_until_signal: usize,
    }

    impl Process for Watch {
        fn raise(&mut self, sig: Signal) {
            self.did.push(Did::Raise(sig));
            if sig == Signal::SIGKILL {
                self.dead.set(true);
                panic!("killed by a failpoint");
            }
            self.signalled.set(true);
        }
        fn abort(&mut self) -> ! {
            self.did.push(Did::Abort);
            self.dead.set(true);
            panic!("aborted by a failpoint");
        }
        fn pause(&mut self) {
            self.did.push(Did::Pause);
            let pauses = self.did.iter().filter(|d| **d == Did::Pause).count();
            if pauses >= self.pauses_until_signal {
                self.signalled.set(true);
            }
        }
        /// The fake's reboot then fails as the kernel's would.
        fn unload_kexec(&mut self) -> Result<(), String> {
            self.did.push(Did::Unload);
            Ok(())
        }
    }

    fn store() -> Store {
        Store {
            path: "/nonexistent/store".into(),
            kind: crate::store::Kind::File,
            capacity: 1 << 20,
        }
    }

    fn faulty(spec: &str, store: Store) -> Faulty<Fake, Watch> {
        let fake = Fake {
            loaded: true,
            ..Fake::default()
        };
        let watch = Watch {
            did: vec![],
            signalled: Rc::clone(&fake.signalled),
            dead: Rc::clone(&fake.dead),
            pauses_until_signal: 3,
        };
        Faulty::with_process(fake, parse(spec).unwrap(), store, watch)
    }

    fn go(f: &mut Faulty<Fake, Watch>) -> Result<Outcome, Aborted> {
        pipeline::go(f, &Cleared::for_tests(two(), false), &opts())
    }

    fn after<'a>(f: &'a Faulty<Fake, Watch>, call: &str) -> Vec<&'a str> {
        let calls = &f.inner.calls;
        let pos = calls.iter().position(|c| c == call).unwrap();
        calls[pos + 1..].iter().map(String::as_str).collect()
    }

    #[test]
    fn the_scenarios_names_parse_to_their_faults() {
        let one = |s: &str| {
            let mut v = parse(s).unwrap();
            assert_eq!(v.len(), 1);
            let f = v.remove(0);
            assert_eq!(f.given, s);
            (f.fault, f.when, f.point)
        };
        assert_eq!(one("kexec"), (Fault::Error, When::Before, Point::Kexec));
        assert_eq!(
            one("die-before-kexec"),
            (Fault::Die, When::Before, Point::Kexec)
        );
        assert_eq!(
            one("sigterm-after-checkpoint"),
            (
                Fault::Signal(Signal::SIGTERM),
                When::After,
                Point::Checkpoint
            )
        );
        assert_eq!(
            one("corrupt-image"),
            (
                Fault::Corrupt(Target::Chunk),
                When::After,
                Point::ImageWrite
            )
        );
        assert_eq!(
            one("corrupt-superblock"),
            (
                Fault::Corrupt(Target::Superblock),
                When::After,
                Point::ImageWrite
            )
        );
        assert_eq!(
            one("corrupt-after-image-write:manifest"),
            (
                Fault::Corrupt(Target::Manifest),
                When::After,
                Point::ImageWrite
            )
        );
        assert_eq!(
            parse("corrupt-after-image-write:footer"),
            Err(ParseError::Corrupt(
                "corrupt-after-image-write:footer".into()
            ))
        );
    }

    #[test]
    fn every_fault_and_point_parses_and_lists_combine() {
        for p in Point::ALL {
            for fault in [
                "error", "die", "kill", "sigterm", "sigint", "sighup", "hang",
            ] {
                let f = parse(&format!("{fault}-before-{p}")).unwrap();
                assert_eq!((f[0].point, f[0].when), (*p, When::Before));
            }
        }
        let v = parse(" error-after-checkpoint:web , hang-before-thaw,").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].workload.as_deref(), Some("web"));
        assert_eq!(v[0].fault, Fault::Error);
        assert_eq!(
            (v[1].fault, v[1].point, v[1].workload.clone()),
            (Fault::Hang, Point::Thaw, None)
        );
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn a_mistyped_fault_is_an_error_not_ignored() {
        assert!(matches!(parse("kexek"), Err(ParseError::Shape(_))));
        assert!(matches!(
            parse("boom-before-kexec"),
            Err(ParseError::Fault { .. })
        ));
        assert!(matches!(
            parse("error-before-reboot"),
            Err(ParseError::Point { .. })
        ));
        assert!(matches!(
            parse("error-after-kexec"),
            Err(ParseError::AfterKexec(_))
        ));
        assert!(matches!(
            parse("corrupt-before-image-write"),
            Err(ParseError::Corrupt(_))
        ));
        assert!(matches!(
            parse("corrupt-after-checkpoint"),
            Err(ParseError::Corrupt(_))
        ));
        assert!(matches!(
            parse("unload-before-quiesce"),
            Err(ParseError::Unload(_))
        ));
        assert!(matches!(
            parse("unload-after-image-write"),
            Err(ParseError::Unload(_))
        ));
        assert!(matches!(
            parse("error-before-hold:web"),
            Err(ParseError::Workload { .. })
        ));
        assert!(matches!(
            parse("error-before-freeze:"),
            Err(ParseError::Shape(_))
        ));
        let e = parse("kexec,oops").unwrap_err().to_string();
        assert!(e.contains(FAILPOINT) && e.contains("oops"), "{e}");
    }

    #[test]
    fn without_faults_the_wrapper_changes_nothing() {
        let mut f = faulty("", store());
        let err = go(&mut f).unwrap_err();
        assert_eq!(err.failure.reason, "refused by the kernel");
        let mut plain = Fake {
            loaded: true,
            ..Fake::default()
        };
        pipeline::go(&mut plain, &Cleared::for_tests(two(), false), &opts()).unwrap_err();
        assert_eq!(f.inner.calls, plain.calls);
        assert_eq!(f.inner.events, plain.events);
        assert!(f.process.did.is_empty());
    }

    #[test]
    fn error_before_kexec_skips_the_reboot_and_resumes_everything() {
        let mut f = faulty("kexec", store());
        let err = go(&mut f).unwrap_err();
        assert_eq!(err.failure.step, Step::Kexec);
        assert!(
            err.failure
                .reason
                .contains("failpoint KUPGRADE_FAILPOINT=kexec"),
            "{}",
            err.failure
        );
        assert!(!f.inner.calls.contains(&"reboot".to_string()));
        assert_eq!(after(&f, "quiesce"), UNDO_AFTER_QUIESCE);
        assert!(err.resume_errors.is_empty());
    }

    #[test]
    fn die_before_kexec_aborts_with_everything_done_and_nothing_undone() {
        let mut f = faulty("die-before-kexec", store());
        // `go` answers the stand-in's panic; a real abort() is not caught.
        let _ = catch_unwind(AssertUnwindSafe(|| go(&mut f)));
        assert!(f.inner.dead.get());
        assert_eq!(f.process.did, [Did::Abort]);
        assert_eq!(f.inner.calls.last().map(String::as_str), Some("quiesce"));
        assert!(!f.inner.calls.contains(&"reboot".to_string()));
    }

    #[test]
    fn sigterm_after_checkpoint_stops_at_the_next_step_and_undoes_the_dump() {
        let mut f = faulty("sigterm-after-checkpoint", store());
        let err = go(&mut f).unwrap_err();
        assert_eq!(f.process.did, [Did::Raise(Signal::SIGTERM)]);
        assert_eq!(err.failure.reason, "interrupted by a signal");
        assert_eq!(err.failure.step, Step::Checkpoint);
        assert_eq!(
            after(&f, "dump a"),
            ["undump a", "thaw b", "thaw a", "release"]
        );
    }

    /// The staged kernel goes right before the kexec, after every check:
    /// the reboot call itself is refused, and everything is undone.
    #[test]
    fn unload_before_kexec_lets_the_kernel_refuse_and_everything_is_undone() {
        let mut f = faulty("unload-before-kexec", store());
        let err = go(&mut f).unwrap_err();
        assert_eq!(f.process.did, [Did::Unload]);
        assert_eq!(err.failure.step, Step::Kexec);
        assert_eq!(err.failure.reason, "refused by the kernel");
        assert_eq!(after(&f, "reboot"), UNDO_AFTER_QUIESCE);
        assert!(err.resume_errors.is_empty());
    }

    /// A signal during the quiesce (a long sync) still stops the upgrade:
    /// the kexec is not attempted.
    #[test]
    fn a_signal_during_the_quiesce_aborts_before_the_kexec() {
        let mut f = faulty("sighup-after-quiesce", store());
        let err = go(&mut f).unwrap_err();
        assert_eq!(f.process.did, [Did::Raise(Signal::SIGHUP)]);
        assert_eq!(err.failure.reason, "interrupted by a signal");
        assert!(!f.inner.calls.contains(&"reboot".to_string()));
        assert_eq!(after(&f, "quiesce")[0], "unquiesce");
        assert!(err.resume_errors.is_empty());
    }

    #[test]
    fn kill_after_a_step_dies_there_with_nothing_undone() {
        let mut f = faulty("kill-after-image-write", store());
        let _ = catch_unwind(AssertUnwindSafe(|| go(&mut f)));
        assert!(f.inner.dead.get());
        assert_eq!(f.process.did, [Did::Raise(Signal::SIGKILL)]);
        assert_eq!(f.inner.calls.last().map(String::as_str), Some("write"));
    }

    #[test]
    fn an_error_before_one_workloads_step_skips_only_that_call() {
        let mut f = faulty("error-before-freeze:b", store());
        let err = go(&mut f).unwrap_err();
        assert_eq!(err.failure.step, Step::Freeze);
        assert!(err.failure.reason.contains("freeze was not attempted"));
        assert!(f.inner.calls.contains(&"freeze a".to_string()));
        assert!(!f.inner.calls.contains(&"freeze b".to_string()));
        assert_eq!(after(&f, "freeze a"), ["thaw b", "thaw a", "release"]);
    }

    #[test]
    fn an_error_after_a_step_fails_it_once_it_has_run() {
        let mut f = faulty("error-after-checkpoint:a", store());
        let err = go(&mut f).unwrap_err();
        assert_eq!(err.failure.step, Step::Checkpoint);
        assert!(
            err.failure.reason.contains("after checkpoint succeeded"),
            "{}",
            err.failure
        );
        assert!(f.inner.calls.contains(&"dump a".to_string()));
        assert!(!f.inner.calls.contains(&"dump b".to_string()));
        // The dump that "failed" is undone with the rest.
        let undo = after(&f, "dump a");
        assert!(undo.ends_with(&["thaw b", "thaw a", "release"]), "{undo:?}");
        assert_eq!(undo, ["undump a", "thaw b", "thaw a", "release"]);
    }

    /// A pre-dump that fails is no abort: the upgrade goes on with a full
    /// dump of that workload.
    #[test]
    fn an_error_after_a_predump_means_a_full_dump_not_an_abort() {
        let mut f = faulty("error-after-predump:b", store());
        let with_precopy = pipeline::Options {
            precopy: pipeline::Precopy {
                max_iterations: 4,
                budget: Duration::from_secs(600),
                store_capacity: 0,
            },
            ..opts()
        };
        let err =
            pipeline::go(&mut f, &Cleared::for_tests(two(), false), &with_precopy).unwrap_err();
        // Only the fake's reboot stops it.
        assert_eq!(err.failure.reason, "refused by the kernel");
        let parents: Vec<(&str, bool)> = f
            .inner
            .dump_parents
            .iter()
            .map(|(n, p)| (n.as_str(), p.is_some()))
            .collect();
        assert_eq!(parents, [("a", true), ("b", false)]);
        assert_eq!(after(&f, "predump b 1 -")[0], "discard b");
    }

    #[test]
    fn an_error_in_the_undo_is_reported_as_a_resume_error() {
        let mut f = faulty("error-before-thaw:a", store());
        let err = go(&mut f).unwrap_err();
        assert_eq!(err.resume_errors.len(), 1);
        assert_eq!(err.resume_errors[0].step, Step::Thaw);
        assert!(!f.inner.calls.contains(&"thaw a".to_string()));
        assert!(f.inner.calls.contains(&"thaw b".to_string()));
    }

    #[test]
    fn a_hang_blocks_the_step_until_a_signal_then_fails_it() {
        let mut f = faulty("hang-before-freeze:a", store());
        let err = go(&mut f).unwrap_err();
        assert_eq!(f.process.did, [Did::Pause, Did::Pause, Did::Pause]);
        assert_eq!(err.failure.step, Step::Freeze);
        assert!(
            err.failure.reason.starts_with("interrupted by a signal"),
            "{}",
            err.failure
        );
        assert!(!f.inner.calls.contains(&"freeze a".to_string()));
        assert_eq!(after(&f, "hold"), ["thaw a", "release"]);
    }

    #[test]
    fn a_stall_delays_the_step_then_lets_it_go_on() {
        let mut f = faulty("stall-after-freeze:a", store());
        f.process.pauses_until_signal = usize::MAX;
        // On to the (fake) reboot, which returns as a refused one would.
        let err = go(&mut f).unwrap_err();
        assert_eq!(err.failure.step, Step::Kexec);
        assert!(
            f.process.did.len() == STALL_PAUSES && f.process.did.iter().all(|d| *d == Did::Pause)
        );
        assert!(f.inner.calls.contains(&"reboot".to_string()));
        // A signal while stalled stops it like a hang.
        let mut f = faulty("stall-after-freeze:a", store());
        let err = go(&mut f).unwrap_err();
        assert_eq!(f.process.did.len(), 3);
        assert!(
            err.failure.reason.contains("while stalled"),
            "{}",
            err.failure
        );
    }

    #[test]
    fn corrupt_image_damages_the_first_chunk_of_the_first_workload() {
        let d = tempfile::tempdir().unwrap();
        let store = Store {
            path: d.path().join("store.img"),
            kind: crate::store::Kind::File,
            capacity: 4 << 20,
        };
        // The fake writes nothing: put an image there as the real one would.
        let section = contract::devstate::criu_section("a");
        let mut w = image_format::ImageWriter::create(
            store.open_rw().unwrap(),
            store.capacity,
            image_format::WriteOptions::default(),
        )
        .unwrap();
        w.add_blob(&section, &[7u8; 10_000]).unwrap();
        w.add_blob("other", &[8u8; 10_000]).unwrap();
        w.finish(image_format::Manifest::default()).unwrap();

        let mut f = faulty("corrupt-image", store.clone());
        go(&mut f).unwrap_err();
        let mut img = image_format::Image::open(store.open_rw().unwrap()).unwrap();
        let e = img.read_blob(&section).unwrap_err().to_string();
        assert!(e.contains("chunk 0"), "{e}");
        assert_eq!(img.read_blob("other").unwrap(), vec![8u8; 10_000]);
        // The pipeline went on to the (fake) reboot, as it does for real.
        assert!(f.inner.calls.contains(&"reboot".to_string()));
    }

    /// `corrupt-superblock` and `corrupt-manifest` damage exactly that: the
    /// image no longer opens, with the error of that part.
    #[test]
    fn corrupt_superblock_and_manifest_damage_that_part() {
        for (spec, says) in [
            ("corrupt-superblock", "superblock checksum"),
            ("corrupt-manifest", "manifest"),
        ] {
            let d = tempfile::tempdir().unwrap();
            let store = Store {
                path: d.path().join("store.img"),
                kind: crate::store::Kind::File,
                capacity: 4 << 20,
            };
            let mut w = image_format::ImageWriter::create(
                store.open_rw().unwrap(),
                store.capacity,
                image_format::WriteOptions::default(),
            )
            .unwrap();
            w.add_blob(&contract::devstate::criu_section("a"), &[7u8; 10_000])
                .unwrap();
            w.finish(image_format::Manifest::default()).unwrap();
            image_format::Image::open(store.open_rw().unwrap()).unwrap();

            let mut f = faulty(spec, store.clone());
            go(&mut f).unwrap_err();
            let e = image_format::Image::open(store.open_rw().unwrap())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(says), "{spec}: {e:?}");
            assert!(f.inner.calls.contains(&"reboot".to_string()), "{spec}");
        }
    }
}
