//! The real [`System`]: cgroups, CRIU, `ip`, nft, the store, sync, kexec.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use contract::devstate::{self, DeviceState, TmpfsMount};
use contract::events::EventLine;
use image_format::{ImageWriter, WriteOptions};

use crate::child::{self, Limits};
use crate::config::{Config, LIB_DIR};
use crate::pipeline::{DumpJob, Dumped, ImageInput, Step, StepError, System};
use crate::remount::{self, Remounted};
use crate::stage::Staged;
use crate::store::{Kind, Store};
use crate::watchdog::Watchdogs;
use crate::workload::Workload;
use crate::{capture, cgroup, criu, leftovers, listen};

/// An image begun in the store before the freeze, with the pre-dumps, that
/// [`System::write_image`] finishes.
struct Begun {
    writer: ImageWriter<Box<dyn image_format::Store>>,
    /// What [`Store::writing`] returned when it was begun.
    before: Option<u64>,
    /// Image directories whose `pre/` is in the store already.
    stored: Vec<PathBuf>,
}

pub struct RealSystem {
    cfg: Config,
    begun: Option<Begun>,
    store: Store,
    interrupted: Arc<AtomicBool>,
    /// Every event, also kept in /var/lib/kupgrade/last-go.json.
    pub events: Vec<EventLine>,
    console: Option<File>,
    kmsg: Option<File>,
    /// Mount points `quiesce_filesystems` made read-only.
    remounted: Vec<Remounted>,
    /// New connections are held back (the nftables table is in place).
    holding: bool,
    /// What `kupgrade stage` recorded, to check before the kexec that it is
    /// still what is loaded.
    staged: Option<Staged>,
    /// A handle on the store kept open until go ends: the last close of a
    /// block device drops all of its page cache (the kernel's
    /// `blkdev_flush_mapping`), which took 0.7 s of the frozen window for
    /// a 1.4 GB image under TCG when the writer's handle closed.
    store_held: Option<File>,
}

/// What a frozen dump needs of [`RealSystem`], shared by the dumps that
/// run side by side.
struct Dumper<'a> {
    criu: &'a str,
    deadline: Duration,
    interrupted: &'a AtomicBool,
    /// Where CRIU's logs go.
    log_dir: &'a Path,
}

impl Dumper<'_> {
    /// A pre-dump while `w` runs, and the note that says how it went.
    fn predump(
        &self,
        w: &Workload,
        dir: &Path,
        parent: Option<&Path>,
    ) -> (Result<u64, StepError>, String) {
        let log = self.log_dir.join(format!("predump-{}.log", w.name));
        let _ = fs::create_dir_all(self.log_dir);
        // As long as a dump may take: a CRIU killed while its parasite is in
        // a task can harm it, and here the task runs on.
        let limits = Limits::deadline(self.deadline).stopped_by(self.interrupted);
        let start = std::time::Instant::now();
        let res = criu::predump(self.criu, w, dir, parent, &log, limits);
        // Each round in a note: the event sums them up.
        let note = match &res {
            Ok(bytes) => format!(
                "kupgrade: pre-dump {} of workload {}: {} KiB of pages in {} ms",
                dir.display(),
                w.name,
                bytes >> 10,
                start.elapsed().as_millis()
            ),
            Err(e) => format!(
                "kupgrade: pre-copy of workload {} given up, it gets a full dump: {}",
                w.name,
                child::chain(e)
            ),
        };
        (
            res.map_err(|e| StepError::new(Step::Precopy, child::chain(&e))),
            note,
        )
    }

    fn dump(&self, w: &Workload, dir: &Path, parent: Option<&Path>) -> Result<Dumped, StepError> {
        let log = self.log_dir.join(format!("dump-{}.log", w.name));
        let _ = fs::create_dir_all(self.log_dir);
        // Made anew by CRIU: its birth time says when this dump began.
        let _ = fs::remove_file(&log);
        if parent.is_none() {
            let _ = fs::remove_dir_all(dir);
        }
        let limits = Limits::deadline(self.deadline).stopped_by(self.interrupted);
        criu::dump(self.criu, w, dir, parent, &log, limits)
            .map_err(|e| StepError::new(Step::Checkpoint, child::chain(&e)))?;
        let lock_table = if w.tcp_established {
            let limits = Limits::deadline(child::TOOL_DEADLINE).stopped_by(self.interrupted);
            Some(criu::save_lock_table(w, limits).ok_or_else(|| {
                StepError::new(
                    Step::Checkpoint,
                    format!("CRIU's lock table inet {} is missing", criu::lock_table(w)),
                )
            })?)
        } else {
            None
        };
        Ok(Dumped { lock_table })
    }
}

/// CPUs to run CRIUs on: each is busy for its whole run (ptrace, the
/// parasite, the pages), so more at once than the CPUs only take turns.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `run(k)` for each job `k` of `jobs`, up to `cpus` at once. Jobs are taken
/// in order, and none once `stop` is set or `halt` says so of a result: the
/// results returned are those of a prefix of the jobs, the rest were not
/// started.
fn side_by_side<T: Send>(
    jobs: usize,
    cpus: usize,
    stop: &AtomicBool,
    halt: impl Fn(&T) -> bool + Sync,
    run: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let halted = AtomicBool::new(false);
    let slots: Vec<Mutex<Option<T>>> = (0..jobs).map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..cpus.clamp(1, jobs.max(1)) {
            scope.spawn(|| {
                while !halted.load(Ordering::SeqCst) && !stop.load(Ordering::Relaxed) {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    if k >= jobs {
                        break;
                    }
                    let result = run(k);
                    if halt(&result) {
                        halted.store(true, Ordering::SeqCst);
                    }
                    *slots[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                }
            });
        }
    });
    slots
        .into_iter()
        .map_while(|slot| slot.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

/// The frozen dumps of `jobs`, up to `cpus` at once; none is started after
/// one failed (the upgrade is off) or a signal.
fn dump_side_by_side(
    dumper: &Dumper<'_>,
    jobs: &[DumpJob<'_>],
    cpus: usize,
) -> Vec<Result<Dumped, StepError>> {
    side_by_side(jobs.len(), cpus, dumper.interrupted, Result::is_err, |k| {
        dumper.dump(jobs[k].workload, &jobs[k].dir, jobs[k].parent)
    })
}

/// The pre-dumps of `jobs`, up to `cpus` at once, each with its note; one
/// that fails stops no other, a signal stops them all.
fn predump_side_by_side(
    dumper: &Dumper<'_>,
    jobs: &[DumpJob<'_>],
    cpus: usize,
) -> Vec<(Result<u64, StepError>, String)> {
    side_by_side(
        jobs.len(),
        cpus,
        dumper.interrupted,
        |_| false,
        |k| dumper.predump(jobs[k].workload, &jobs[k].dir, jobs[k].parent),
    )
}

impl RealSystem {
    fn dumper(&self) -> Dumper<'_> {
        Dumper {
            criu: &self.cfg.criu,
            deadline: Duration::from_secs(self.cfg.dump_timeout_s),
            interrupted: &self.interrupted,
            log_dir: Path::new(LIB_DIR),
        }
    }

    pub fn new(cfg: Config, store: Store) -> Self {
        let interrupted = Arc::new(AtomicBool::new(false));
        // From here on a signal only asks: the pipeline stops at the next
        // step boundary and resumes the workloads.
        for sig in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ] {
            let _ = signal_hook::flag::register(sig, Arc::clone(&interrupted));
        }
        let open = |p: &str| OpenOptions::new().write(true).open(p).ok();
        RealSystem {
            cfg,
            begun: None,
            store,
            interrupted,
            events: Vec::new(),
            console: open("/dev/console"),
            kmsg: open("/dev/kmsg"),
            remounted: Vec::new(),
            holding: false,
            store_held: None,
            staged: None,
        }
    }

    /// The kernel `go` is to boot, as staged.
    pub fn with_staged(self, staged: Option<Staged>) -> Self {
        RealSystem { staged, ..self }
    }

    /// For `kupgrade resume`: a system on which a killed `go` may have
    /// held connections back and made `remounted` read-only.
    pub fn after_killed_go(cfg: Config, store: Store, remounted: Vec<Remounted>) -> Self {
        RealSystem {
            holding: true,
            remounted,
            ..RealSystem::new(cfg, store)
        }
    }

    /// Starts an image in the store: from here until it is recorded, a
    /// wipe zeroes the whole store.
    fn begin_image(&mut self, generation: u64) -> Result<Begun, StepError> {
        let e = err(Step::ImageWrite);
        let before = self.store.writing(Path::new(LIB_DIR)).map_err(|x| e(&x))?;
        if self.store_held.is_none() {
            self.store_held = Some(self.store.open_rw().map_err(|x| e(&x))?);
        }
        let store = self.store.open_writer().map_err(|x| e(&x))?;
        let opts = WriteOptions {
            generation,
            ..WriteOptions::default()
        };
        let writer = ImageWriter::create(store, self.store.capacity, opts).map_err(|x| e(&x))?;
        Ok(Begun {
            writer,
            before,
            stored: Vec::new(),
        })
    }

    /// A line for whoever reads what go did: on stderr, and on the console
    /// and in the kernel log like the events (stderr is gone with the ssh
    /// session once the kexec is under way).
    fn note(&mut self, text: &str) {
        let _ = writeln!(std::io::stderr(), "{text}");
        self.log_to_console(text);
    }

    /// The console and the kernel log, which outlive go's session.
    fn log_to_console(&mut self, text: &str) {
        if let Some(c) = self.console.as_mut() {
            let _ = writeln!(c, "{text}");
        }
        if let Some(k) = self.kmsg.as_mut() {
            let _ = k.write_all(format!("<6>{text}\n").as_bytes());
        }
    }

    fn save_events(&self) {
        let lines: Vec<String> = self.events.iter().map(|e| e.to_string()).collect();
        let _ = fs::create_dir_all(LIB_DIR);
        let _ = fs::write(
            Path::new(LIB_DIR).join("last-go.log"),
            lines.join("\n") + "\n",
        );
    }
}

/// Store room that `raw` bytes take as they are: with their chunk headers,
/// tree records and the manifest, and room to spare.
fn room_for(raw: u64) -> u64 {
    raw.saturating_add(raw / 64).saturating_add(4 << 20)
}

/// In the frozen window a RAM store takes the dump as it is: there a copy
/// costs less than compressing it (BENCHMARKS.md). A disk or file store,
/// or a RAM store without room for the raw bytes, gets it compressed.
fn compress_when_frozen(kind: &Kind, remaining: u64, raw: u64) -> bool {
    *kind != Kind::Pmem || remaining < room_for(raw)
}

/// A pre-copy round goes into a RAM store as it is too, when room is left
/// after it for a frozen dump as large: writing it is then a copy while the
/// workloads run, and the restore, in the blackout, copies its pages back
/// instead of decompressing them. Otherwise it is compressed, so that the
/// rounds leave the frozen dump its room.
fn compress_round(kind: &Kind, remaining: u64, raw: u64) -> bool {
    *kind != Kind::Pmem || remaining < room_for(raw).saturating_mul(2)
}

/// Empties a stored round's page data (`pages-*.img`) in the staging
/// tmpfs: the store has it, and the next round and the frozen dump read
/// only its pagemaps (which pages are in the parent), never its pages. Freed
/// here while the workloads run, not in the frozen window.
fn drop_stored_pages(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("pages-") && name.ends_with(".img") && entry.file_type()?.is_file() {
            fs::OpenOptions::new()
                .write(true)
                .open(entry.path())?
                .set_len(0)?;
        }
    }
    Ok(())
}

/// Bytes of the regular files under `dir` (0 for what cannot be read: the
/// writer then reports the error itself).
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn err(step: Step) -> impl Fn(&dyn std::fmt::Display) -> StepError {
    move |e| StepError::new(step, e)
}

impl System for RealSystem {
    fn staged_still_loaded(&mut self) -> Result<(), String> {
        let loaded = kexec::is_loaded().unwrap_or(false);
        let Some(staged) = &self.staged else {
            return if loaded {
                Ok(())
            } else {
                Err("the staged kernel was unloaded meanwhile".into())
            };
        };
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        match staged.doubt(loaded, boot_id.trim(), kexec::load_calls_left()) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    fn hold_connections(&mut self, ws: &[Workload]) -> Result<(), StepError> {
        let ports = listen::listening_ports(ws);
        if ports.is_empty() {
            return Ok(());
        }
        let list: Vec<u16> = ports.keys().copied().collect();
        // First: an nft killed at its deadline may have made the table.
        self.holding = true;
        listen::hold(&list, &self.interrupted).map_err(|e| err(Step::Connections)(&e))?;
        listen::drain(&ports, listen::DRAIN_TIMEOUT).map_err(|e| err(Step::Connections)(&e))
    }

    fn release_connections(&mut self) -> Result<(), StepError> {
        if !std::mem::take(&mut self.holding) {
            return Ok(());
        }
        listen::release().map_err(|e| err(Step::Release)(&e))
    }

    fn freeze(&mut self, w: &Workload) -> Result<(), StepError> {
        if let (Some(unit), Some(usec)) = (&w.unit, w.watchdog_usec) {
            // A freeze longer than the watchdog has systemd kill the service.
            Watchdogs::system()
                .suspend(unit, w.root_pid, usec)
                .map_err(|e| {
                    err(Step::Freeze)(&format!(
                        "cannot turn off the watchdog of {unit} for the freeze (through {}): {e}",
                        crate::watchdog::NOTIFY_SOCKET
                    ))
                })?;
        }
        cgroup::freeze(&w.cgroup, Duration::from_millis(self.cfg.freeze_timeout_ms))
            .map_err(|e| err(Step::Freeze)(&e))
    }

    fn thaw(&mut self, w: &Workload) -> Result<(), StepError> {
        cgroup::thaw(&w.cgroup).map_err(|e| err(Step::Thaw)(&e))?;
        if let Some(unit) = &w.unit {
            Watchdogs::system().restore(unit, w.root_pid).map_err(|e| {
                err(Step::Thaw)(&format!("cannot set the watchdog of {unit} back: {e}"))
            })?;
        }
        Ok(())
    }

    fn predump(
        &mut self,
        w: &Workload,
        dir: &Path,
        parent: Option<&Path>,
    ) -> Result<u64, StepError> {
        let (result, note) = self.dumper().predump(w, dir, parent);
        self.note(&note);
        result
    }

    fn predump_all(&mut self, jobs: &[DumpJob<'_>]) -> Vec<Result<u64, StepError>> {
        let done = predump_side_by_side(&self.dumper(), jobs, cpus());
        done.into_iter()
            .map(|(result, note)| {
                self.note(&note);
                result
            })
            .collect()
    }

    fn discard_predumps(&mut self, dir: &Path) -> Result<(), StepError> {
        match fs::remove_dir_all(dir.join("pre")) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StepError::new(
                Step::Discard,
                format!("remove {}: {e}", dir.join("pre").display()),
            )),
        }
    }

    fn dump(
        &mut self,
        w: &Workload,
        dir: &Path,
        parent: Option<&Path>,
    ) -> Result<Dumped, StepError> {
        self.dumper().dump(w, dir, parent)
    }

    fn dump_all(&mut self, jobs: &[DumpJob<'_>]) -> Vec<Result<Dumped, StepError>> {
        dump_side_by_side(&self.dumper(), jobs, cpus())
    }

    fn undump(&mut self, w: &Workload, d: &Dumped) -> Result<(), StepError> {
        criu::undump(&mut criu::RealTasks::default(), w, d.lock_table.is_some()).map_err(|failed| {
            StepError::new(
                Step::Undump,
                format!("workload {}: {}", w.name, failed.join("; ")),
            )
        })
    }

    fn system_state(&mut self) -> Result<DeviceState, StepError> {
        capture::system_state(&self.interrupted)
            .map_err(|e| StepError::new(Step::DeviceState, child::chain(&e)))
    }

    fn tmpfs_files(
        &mut self,
        ws: &[Workload],
        dir: &Path,
    ) -> Result<(Vec<TmpfsMount>, bool), StepError> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).map_err(|e| err(Step::DeviceState)(&e))?;
        let skip = dir.parent().unwrap_or(dir).to_path_buf();
        let mounts = capture::tmpfs_files(ws, dir, &skip)
            .map_err(|e| StepError::new(Step::DeviceState, child::chain(&e)))?;
        let has = fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        Ok((mounts, has))
    }

    fn store_predumps(&mut self, sections: &[(String, PathBuf)]) -> Result<u64, StepError> {
        let e = err(Step::ImageWrite);
        let mut begun = match self.begun.take() {
            Some(b) => b,
            None => self.begin_image(contract::events::now_ns().1 / 1_000_000_000)?,
        };
        let start = std::time::Instant::now();
        let mut compressed = 0;
        for (name, dir) in sections {
            let compress =
                compress_round(&self.store.kind, begun.writer.remaining(), bytes_under(dir));
            compressed += usize::from(compress);
            begun.writer.set_compress(compress);
            begun.writer.add_tree(name, dir).map_err(|x| e(&x))?;
            if let Err(x) = drop_stored_pages(dir) {
                self.note(&format!(
                    "kupgrade: pages of {} stay in the staging tmpfs until the frozen dump: {x}",
                    dir.display()
                ));
            }
            // dir is IMAGES/pre/N.
            if let Some(images) = dir.parent().and_then(Path::parent) {
                if !begun.stored.iter().any(|d| d == images) {
                    begun.stored.push(images.to_path_buf());
                }
            }
        }
        // While the workloads run: otherwise the frozen dump's final sync
        // flushes every round's pages (the page cache of /dev/pmemN) too.
        begun.writer.sync().map_err(|x| e(&x))?;
        let at = begun.writer.position();
        self.note(&format!(
            "kupgrade: {} pre-dump section(s) ({compressed} compressed) written and flushed to the store in {} ms, image at {} KiB",
            sections.len(),
            start.elapsed().as_millis(),
            at >> 10
        ));
        self.begun = Some(begun);
        Ok(at)
    }

    fn write_image(&mut self, input: &ImageInput) -> Result<u64, StepError> {
        let e = err(Step::ImageWrite);
        let record = Path::new(LIB_DIR);
        let begun = match self.begun.take() {
            Some(b) => b,
            None => self.begin_image(input.manifest.created_unix_ns / 1_000_000_000)?,
        };
        let (mut w, before) = (begun.writer, begun.before);
        let started = std::time::Instant::now();
        for (_, dir) in &input.trees {
            if begun.stored.contains(dir) {
                // Its pre-dumps are in the store already: the tree is the
                // frozen dump and its `parent` link.
                match fs::remove_dir_all(dir.join("pre")) {
                    Err(x) if x.kind() != std::io::ErrorKind::NotFound => return Err(e(&x)),
                    _ => {}
                }
            }
        }
        let raw: u64 = input
            .trees
            .iter()
            .map(|(_, d)| d)
            .chain(&input.tmpfs)
            .map(|d| bytes_under(d))
            .sum();
        let removed = started.elapsed();
        let compress = compress_when_frozen(&self.store.kind, w.remaining(), raw);
        w.set_compress(compress);
        if self.store.kind == Kind::Pmem {
            self.note(&format!(
                "kupgrade: the frozen dump ({} KiB) goes to the RAM store {}",
                raw >> 10,
                if compress {
                    "compressed: too little room for it as it is"
                } else {
                    "as it is, uncompressed"
                }
            ));
        }
        for (name, dir) in &input.trees {
            w.add_tree(name, dir).map_err(|x| e(&x))?;
        }
        let json = serde_json::to_vec(input.devstate).map_err(|x| e(&x))?;
        w.add_blob(devstate::SECTION, &json).map_err(|x| e(&x))?;
        if let Some(dir) = &input.tmpfs {
            w.add_tree(devstate::TMPFS_SECTION, dir)
                .map_err(|x| e(&x))?;
        }
        let sections = started.elapsed();
        let summary = w.finish(input.manifest.clone()).map_err(|x| e(&x))?;
        let finished = started.elapsed();
        // Read back what a new kernel would read first.
        let f = self.store.open_rw().map_err(|x| e(&x))?;
        image_format::Image::open(f)
            .map_err(|x| StepError::new(Step::ImageWrite, format!("verification failed: {x}")))?;
        self.store
            .written(record, before, summary.total_len)
            .map_err(|x| e(&x))?;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        self.note(&format!(
            "kupgrade: image written in {:.0} ms: stored pre-dumps dropped from the staging tmpfs {:.0} ms, \
             sections {:.0} ms, manifest and flush {:.0} ms (the flushes {:.0} ms), read back and recorded {:.0} ms",
            ms(started.elapsed()),
            ms(removed),
            ms(sections - removed),
            ms(finished - sections),
            ms(summary.flushes),
            ms(started.elapsed() - finished),
        ));
        Ok(summary.total_len)
    }

    fn invalidate_image(&mut self) -> Result<(), StepError> {
        // An image begun before the freeze is never finished now.
        self.begun = None;
        let e = err(Step::Invalidate);
        let mut f = self.store.open_rw().map_err(|x| e(&x))?;
        image_format::invalidate(&mut f).map_err(|x| e(&x))
    }

    fn wipe_image(&mut self) -> Result<(), StepError> {
        let start = std::time::Instant::now();
        let zeroed = self
            .store
            .wipe(Path::new(LIB_DIR))
            .map_err(|x| StepError::new(Step::Wipe, child::chain(&x)))?;
        // What it cost, for people tuning the store's size.
        self.note(&format!(
            "kupgrade: wiped the store {}: {} MiB zeroed in {} ms",
            self.store.path.display(),
            zeroed >> 20,
            start.elapsed().as_millis()
        ));
        Ok(())
    }

    fn quiesce_filesystems(&mut self) -> Result<(), StepError> {
        self.save_events();
        nix::unistd::sync();
        self.remounted = remount::make_read_only(&leftovers::remount_journal());
        nix::unistd::sync();
        Ok(())
    }

    fn unquiesce_filesystems(&mut self) -> Result<(), StepError> {
        let list = std::mem::take(&mut self.remounted);
        let failed = remount::make_writable(&list, &leftovers::remount_journal());
        if failed.is_empty() {
            Ok(())
        } else {
            Err(StepError::new(
                Step::Unquiesce,
                format!("cannot make writable again: {}", failed.join(", ")),
            ))
        }
    }

    fn reboot(&mut self) -> StepError {
        match kexec::reboot_into_loaded() {
            Ok(never) => match never {},
            Err(e) => StepError::new(Step::Kexec, e),
        }
    }

    fn emit(&mut self, e: EventLine) {
        let text = e.to_string();
        // Not println!, which panics when stdout is gone (a closed pipe, a
        // dropped ssh session): the event is also on the console, in the
        // kernel log and in last-go.log.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}").and_then(|()| out.flush());
        drop(out);
        self.log_to_console(&text);
        self.events.push(e);
        self.save_events();
    }

    fn interrupted(&mut self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }
}

/// Files the real system keeps, for `status` and `report`.
pub fn last_go_log() -> PathBuf {
    Path::new(LIB_DIR).join("last-go.log")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fake::wl;

    /// A stand-in for `criu dump` that marks its images directory started,
    /// then waits (up to 10 s) until `want` dumps have started, and fails
    /// for a directory named `fail`.
    fn fake_criu(dir: &Path, want: usize) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("criu");
        fs::write(
            &script,
            format!(
                r#"#!/bin/sh
while [ "$1" != "--images-dir" ]; do shift; done
images="$2"
touch "$images.started"
case "$images" in */fail) exit 1 ;; esac
for i in $(seq 100); do
  [ "$(ls "$(dirname "$images")" | grep -c '\.started$')" -ge {want} ] && exit 0
  sleep 0.1
done
exit 2
"#
            ),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    fn test_dumper<'a>(criu: &'a Path, stop: &'a AtomicBool, logs: &'a Path) -> Dumper<'a> {
        Dumper {
            criu: criu.to_str().unwrap(),
            deadline: Duration::from_secs(30),
            interrupted: stop,
            log_dir: logs,
        }
    }

    /// Three workloads, the second of which fake_criu fails.
    fn a_fail_c() -> [Workload; 3] {
        [
            wl("a", 10001, false),
            wl("fail", 10002, false),
            wl("c", 10003, false),
        ]
    }

    fn jobs<'a>(ws: &'a [Workload], under: &Path) -> Vec<DumpJob<'a>> {
        ws.iter()
            .map(|w| DumpJob {
                workload: w,
                dir: under.join(&w.name),
                parent: None,
            })
            .collect()
    }

    #[test]
    fn frozen_dumps_run_side_by_side_on_as_many_cpus() {
        let d = tempfile::tempdir().unwrap();
        let criu = fake_criu(d.path(), 2);
        let stop = AtomicBool::new(false);
        let dumper = test_dumper(&criu, &stop, d.path());
        let ws = [wl("a", 10001, false), wl("b", 10002, false)];
        let under = d.path().join("images");
        // Each waits for the other to start: one at a time would fail both.
        let results = dump_side_by_side(&dumper, &jobs(&ws, &under), 2);
        assert_eq!(results.len(), 2);
        for r in results {
            assert_eq!(r.unwrap(), Dumped { lock_table: None });
        }
    }

    #[test]
    fn pre_dumps_run_side_by_side_and_go_on_past_one_that_failed() {
        let d = tempfile::tempdir().unwrap();
        let criu = fake_criu(d.path(), 2);
        let stop = AtomicBool::new(false);
        let dumper = test_dumper(&criu, &stop, d.path());
        let ws = a_fail_c();
        let under = d.path().join("images");
        // a and fail start together (each waits for two to have started).
        let done = predump_side_by_side(&dumper, &jobs(&ws, &under), 2);
        let fate: Vec<bool> = done.iter().map(|(r, _)| r.is_ok()).collect();
        assert_eq!(fate, [true, false, true]);
        assert!(done[1].1.contains("given up"), "{}", done[1].1);
        assert!(done[2].1.contains("workload c"), "{}", done[2].1);
        // A signal: none starts.
        stop.store(true, Ordering::SeqCst);
        assert!(predump_side_by_side(&dumper, &jobs(&ws, &under), 2).is_empty());
    }

    #[test]
    fn no_dump_starts_after_one_failed() {
        let d = tempfile::tempdir().unwrap();
        let criu = fake_criu(d.path(), 1);
        let stop = AtomicBool::new(false);
        let dumper = test_dumper(&criu, &stop, d.path());
        let ws = a_fail_c();
        let under = d.path().join("images");
        let results = dump_side_by_side(&dumper, &jobs(&ws, &under), 1);
        assert_eq!(results.len(), 2, "{results:?}");
        assert!(results[0].is_ok());
        let e = results[1].as_ref().unwrap_err();
        assert_eq!(e.step, Step::Checkpoint);
        assert!(e.reason.contains("fail"), "{}", e.reason);
        assert!(!under.join("c.started").exists());
    }

    #[test]
    fn only_a_ram_store_with_room_takes_the_frozen_dump_uncompressed() {
        const MIB: u64 = 1 << 20;
        assert!(!compress_when_frozen(&Kind::Pmem, 256 * MIB, 100 * MIB));
        // Too little room for the raw bytes and their headers.
        assert!(compress_when_frozen(&Kind::Pmem, 101 * MIB, 100 * MIB));
        assert!(compress_when_frozen(&Kind::Device, 256 * MIB, 100 * MIB));
        assert!(compress_when_frozen(&Kind::File, 256 * MIB, 100 * MIB));
    }

    #[test]
    fn a_round_goes_in_uncompressed_only_when_a_frozen_dump_as_large_still_fits() {
        const MIB: u64 = 1 << 20;
        assert!(!compress_round(&Kind::Pmem, 256 * MIB, 100 * MIB));
        // Room for the round as it is, not for a frozen dump after it.
        assert!(compress_round(&Kind::Pmem, 150 * MIB, 100 * MIB));
        assert!(compress_round(&Kind::Device, 1024 * MIB, 100 * MIB));
        assert!(compress_round(&Kind::File, 1024 * MIB, 100 * MIB));
    }

    #[test]
    fn a_stored_round_keeps_its_pagemaps_and_drops_its_pages() {
        let d = tempfile::tempdir().unwrap();
        for (f, n) in [
            ("pages-1.img", 8192),
            ("pages-2.img", 4096),
            ("pagemap-10001.img", 64),
            ("inventory.img", 32),
            ("pages-notes.txt", 16),
        ] {
            fs::write(d.path().join(f), vec![7u8; n]).unwrap();
        }
        drop_stored_pages(d.path()).unwrap();
        let len = |f: &str| fs::metadata(d.path().join(f)).unwrap().len();
        assert_eq!((len("pages-1.img"), len("pages-2.img")), (0, 0));
        assert_eq!(len("pagemap-10001.img"), 64);
        assert_eq!(len("inventory.img"), 32);
        assert_eq!(len("pages-notes.txt"), 16);
    }

    #[test]
    fn the_bytes_under_a_tree_count_its_files_at_every_depth() {
        let dir = std::env::temp_dir().join(format!("kupgrade-bytes-{}", std::process::id()));
        fs::create_dir_all(dir.join("pre/1")).unwrap();
        fs::write(dir.join("pages-1.img"), vec![1u8; 5000]).unwrap();
        fs::write(dir.join("pre/1/pages-1.img"), vec![1u8; 300]).unwrap();
        std::os::unix::fs::symlink("pre/1", dir.join("parent")).unwrap();
        assert_eq!(bytes_under(&dir), 5300);
        assert_eq!(bytes_under(&dir.join("missing")), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
