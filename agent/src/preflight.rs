//! The one preflight of `kupgrade check`, `kupgrade go` and `go --dry-run`.
//!
//! Every fact that decides whether an upgrade may start is read through
//! [`Facts`] ([`RealFacts`] on the machine, a fake in the tests) and judged
//! here into [`Finding`]s: a [`Level`] for the [`Mode`] at hand, a [`Kind`]
//! a program can match on, and for a warning or a failure what to do.
//! `check` prints them; `go` refuses on any failure before anything is
//! frozen, and the pipeline runs only with the [`Cleared`] that [`go`]
//! returns when there is none.
//!
//! What differs between the modes (everything else is judged the same):
//!
//! | fact                                  | check | go   | go --dry-run |
//! |---------------------------------------|-------|------|--------------|
//! | not root                              | fail, the rest still looked at | fail, nothing else looked at | as go |
//! | no kernel staged, or no longer loaded | warn  | fail | not looked at |
//! | kexec not supported                   | fail  | fail | warn         |
//! | no workloads                          | warn  | fail | fail         |
//! | another `go` or `resume` runs         | warn  | fail | fail         |
//! | the init binary is missing            | fail  | not looked at (it is in the staged initramfs) | as go |
//! | `criu check`                          | run   | not run: it probes the whole kernel, the dump says what it needs | as go |
//! | how the staged kernel differs         | said, as `stage` found it | not looked at (`stage` refused what matters) | as go |
//!
//! To add a refusal: a fact in [`Facts`] and its reading in [`RealFacts`],
//! a [`Kind`], its judgement in `judge`, and a test with the fake below.
//!
//! # `kupgrade check --json`
//!
//! One JSON object on stdout, the exit code as without `--json`:
//!
//! ```json
//! {
//!   "version": 1,
//!   "ready": false,
//!   "findings": [
//!     { "level": "ok", "kind": "root", "workload": null,
//!       "what": "running as root", "fix": null },
//!     { "level": "fail", "kind": "store-size", "workload": null,
//!       "what": "store /dev/pmem0 is 64 MiB but the image needs about 298 MiB: ...",
//!       "fix": "in /etc/default/grub, set GRUB_CMDLINE_LINUX=\"memmap=384M!4096M\", then run update-grub and reboot once" }
//!   ]
//! }
//! ```
//!
//! - `version`: changes only when a field changes meaning or goes away.
//! - `ready`: false exactly when a finding has level `fail`.
//! - `level`: `ok`, `warn` or `fail`.
//! - `kind`: one of the names of [`Kind`] (e.g. `refusal`, `store-size`,
//!   `leftovers`); new kinds may appear, existing ones keep their meaning.
//! - `workload`: the workload the finding is about, else null.
//! - `what`: the finding, for people; `fix`: what to do, null for `ok`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{self, Config};
use crate::leftovers::{self, Leftovers, LockError, RunLock};
use crate::stage::Staged;
use crate::store::{self, Store};
use crate::units::{self, Service};
use crate::workload::{self, Workload};
use crate::{child, criu, launch, listen, proc, target};

/// Which command the preflight decides for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Check,
    Go,
    DryRun,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

macro_rules! kinds {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// What a finding is about, stable for programs (`--json`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kind {
            $($(#[$doc])* $variant,)*
        }

        impl Kind {
            pub const ALL: &'static [Kind] = &[$(Kind::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$variant => $name,)*
                }
            }
        }
    };
}

kinds! {
    /// Running as root (loading a kernel and CRIU need it).
    Root => "root",
    /// kexec_file_load is supported.
    Kexec => "kexec",
    /// Kernel lockdown: only signed kernels load.
    Lockdown => "lockdown",
    Cgroup2 => "cgroup2",
    /// CRIU is installed (its version).
    Criu => "criu",
    /// `criu check` on this kernel: passes, or a feature is missing.
    CriuCheck => "criu-check",
    /// This kernel needs a newer CRIU than the one installed.
    CriuTooOld => "criu-too-old",
    /// `kupgrade-init`, which `stage` puts into the initramfs.
    InitBinary => "init-binary",
    /// A workload that looks dumpable.
    Workload => "workload",
    /// A workload's cgroup that cannot be made a workload.
    WorkloadBroken => "workload-broken",
    NoWorkloads => "no-workloads",
    /// Pids that early boot of the new kernel may take.
    LowPids => "low-pids",
    /// A unit's watchdog, which the freeze must not let fire.
    Watchdog => "watchdog",
    /// A workload's cgroup holds kupgrade itself: freezing it freezes `go`.
    HoldsKupgrade => "holds-kupgrade",
    /// Something in a workload CRIU cannot checkpoint.
    Refusal => "refusal",
    /// Another `go` or `resume` is running.
    RunLock => "run-lock",
    /// What a killed `go` left behind.
    Leftovers => "leftovers",
    /// nft, for the network lock and holding back new connections.
    Nft => "nft",
    /// The store cannot be found or opened.
    Store => "store",
    /// The store against the estimated image.
    StoreSize => "store-size",
    /// The staged kernel, and whether it is still loaded.
    Staged => "staged",
    /// What differs between the running kernel and the staged one (module
    /// format, missing modules, CRIU support), as `kupgrade stage` found it.
    TargetKernel => "target-kernel",
    /// What the upgrade does to a running systemd service: preserves it,
    /// refuses it, or leaves it to systemd, which starts it again.
    Unit => "unit",
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub kind: Kind,
    /// The workload it is about, if one.
    pub workload: Option<String>,
    pub what: String,
    /// What to do (for Warn and Fail).
    pub fix: Option<String>,
}

impl Finding {
    fn ok(kind: Kind, what: impl Into<String>) -> Finding {
        Finding {
            level: Level::Ok,
            kind,
            workload: None,
            what: what.into(),
            fix: None,
        }
    }

    fn new(level: Level, kind: Kind, what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            level,
            kind,
            workload: None,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(kind: Kind, what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding::new(Level::Fail, kind, what, fix)
    }

    fn warn(kind: Kind, what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding::new(Level::Warn, kind, what, fix)
    }

    fn about(mut self, workload: &str) -> Finding {
        self.workload = Some(workload.to_string());
        self
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "level": self.level.name(),
            "kind": self.kind.name(),
            "workload": self.workload,
            "what": self.what,
            "fix": self.fix,
        })
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => " ok ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "[{tag}] {}", self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n       -> {fix}")?;
        }
        Ok(())
    }
}

/// What `kupgrade check` prints.
#[derive(Debug)]
pub struct Findings(pub Vec<Finding>);

impl Findings {
    pub fn failures(&self) -> impl Iterator<Item = &Finding> {
        self.0.iter().filter(|f| f.level == Level::Fail)
    }

    pub fn ready(&self) -> bool {
        self.failures().next().is_none()
    }

    /// The `--json` document described in the module docs.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "ready": self.ready(),
            "findings": self.0.iter().map(Finding::to_json).collect::<Vec<_>>(),
        })
    }
}

/// What `go` may run with: only [`go`] makes one, and only when no
/// finding fails.
#[derive(Debug)]
pub struct Cleared {
    dry_run: bool,
    workloads: Vec<Workload>,
    store: Store,
    staged: Option<Staged>,
}

impl Cleared {
    /// Never empty.
    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// Large enough for the estimated image.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Staged and loaded; `None` only for a dry run without one.
    pub fn staged(&self) -> Option<&Staged> {
        self.staged.as_ref()
    }

    /// For tests of what runs after the preflight.
    #[cfg(test)]
    pub(crate) fn for_tests(workloads: Vec<Workload>, dry_run: bool) -> Cleared {
        Cleared {
            dry_run,
            workloads,
            store: Store {
                path: "/nonexistent/store".into(),
                kind: store::Kind::File,
                capacity: 1 << 30,
            },
            staged: None,
        }
    }
}

/// Why `go` refuses: every failing finding.
#[derive(Debug)]
pub struct Refused(pub Vec<Finding>);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refusing to upgrade, nothing was frozen:")?;
        for finding in &self.0 {
            write!(f, "\n{finding}")?;
        }
        Ok(())
    }
}

/// Everything the preflight looks at on the machine.
pub trait Facts {
    fn is_root(&mut self) -> bool;
    /// Whether a kernel is loaded for kexec; an error when kexec is not
    /// supported at all.
    fn kexec_loaded(&mut self) -> Result<bool, kexec::KexecError>;
    /// The active lockdown mode (`none`, `integrity`, ...), if readable.
    fn lockdown(&mut self) -> Option<String>;
    fn cgroup2(&mut self) -> bool;
    fn criu_version(&mut self) -> Result<String, criu::Error>;
    fn criu_check(&mut self) -> Result<(), criu::CheckError>;
    /// The configured init binary, when it does not exist.
    fn missing_init_binary(&mut self) -> Option<PathBuf>;
    fn workloads(&mut self) -> Vec<Result<Workload, workload::Error>>;
    /// What CRIU could not checkpoint in `w`, each as the user reads it
    /// (naming the workload, the pid and the resource).
    fn refusals(&mut self, w: &Workload) -> Vec<String>;
    /// A process's name, for people.
    fn comm(&mut self, pid: i32) -> String;
    /// kupgrade's own cgroup (absolute), if it can be read.
    fn own_cgroup(&mut self) -> Option<PathBuf>;
    /// Takes the lock `go` and `resume` hold, for as long as the facts live
    /// (see [`RealFacts::into_run_lock`]).
    fn take_run_lock(&mut self) -> Result<(), LockError>;
    /// What a killed `go` left; only asked with the run lock held.
    fn leftovers(&mut self, ws: &[Workload], store: Option<&Store>) -> Leftovers;
    /// The workloads' listening ports, whose new connections `go` holds back.
    fn listening_ports(&mut self, ws: &[Workload]) -> BTreeMap<u16, String>;
    fn nft_available(&mut self) -> bool;
    fn store(&mut self) -> Result<Store, store::Error>;
    /// How to reserve at least `need` bytes on this machine: the
    /// `memmap=`, and where to put it.
    fn suggest_memmap(&mut self, need: u64) -> String;
    fn staged(&mut self) -> Option<Staged>;
    /// This boot's id (`/proc/sys/kernel/random/boot_id`).
    fn boot_id(&mut self) -> String;
    /// [`kexec::load_calls_left`].
    fn load_calls_left(&mut self) -> Option<i64>;
    /// The running services, when systemd is the init.
    fn services(&mut self) -> Option<Vec<Service>>;
}

/// `kupgrade check`: every finding.
pub fn check(facts: &mut dyn Facts) -> Findings {
    judge(facts, Mode::Check).findings
}

/// `kupgrade go`: what it may run with, or why it refuses.
pub fn go(facts: &mut dyn Facts, dry_run: bool) -> Result<Cleared, Refused> {
    let mode = if dry_run { Mode::DryRun } else { Mode::Go };
    let j = judge(facts, mode);
    if !j.findings.ready() {
        return Err(Refused(j.findings.failures().cloned().collect()));
    }
    let Some(store) = j.store else {
        // Unreachable: a missing store is a failure in every mode.
        return Err(Refused(vec![Finding::fail(
            Kind::Store,
            "no store",
            "set `store` in /etc/kupgrade/config.toml",
        )]));
    };
    Ok(Cleared {
        dry_run,
        workloads: j.workloads,
        store,
        staged: j.staged,
    })
}

struct Judged {
    findings: Findings,
    workloads: Vec<Workload>,
    store: Option<Store>,
    staged: Option<Staged>,
}

fn judge(facts: &mut dyn Facts, mode: Mode) -> Judged {
    let mut out = Vec::new();
    let root = facts.is_root();
    if root {
        out.push(Finding::ok(Kind::Root, "running as root"));
    } else {
        out.push(Finding::fail(
            Kind::Root,
            "not running as root",
            "run kupgrade as root: loading a kernel needs CAP_SYS_BOOT, CRIU needs CAP_SYS_ADMIN",
        ));
        // Without root, what go would see next means little.
        if mode != Mode::Check {
            return Judged {
                findings: Findings(out),
                workloads: Vec::new(),
                store: None,
                staged: None,
            };
        }
    }
    let loaded = match facts.kexec_loaded() {
        Ok(loaded) => {
            out.push(Finding::ok(
                Kind::Kexec,
                format!(
                    "kexec is supported ({})",
                    if loaded {
                        "a kernel is loaded"
                    } else {
                        "no kernel loaded yet"
                    }
                ),
            ));
            loaded
        }
        Err(e) => {
            out.push(Finding::new(
                if mode == Mode::DryRun {
                    Level::Warn
                } else {
                    Level::Fail
                },
                Kind::Kexec,
                format!("kexec: {e}"),
                "use a kernel built with CONFIG_KEXEC_FILE",
            ));
            false
        }
    };
    match facts.lockdown() {
        Some(mode) if mode != "none" => out.push(Finding::warn(
            Kind::Lockdown,
            format!("kernel lockdown is {mode}"),
            "only kernels signed with a trusted key can be loaded; stage a signed kernel",
        )),
        _ => {}
    }
    if facts.cgroup2() {
        out.push(Finding::ok(Kind::Cgroup2, "cgroup v2 is mounted"));
    } else {
        out.push(Finding::fail(
            Kind::Cgroup2,
            "cgroup v2 is not mounted on /sys/fs/cgroup",
            "boot with systemd.unified_cgroup_hierarchy=1 or mount cgroup2",
        ));
    }
    match facts.criu_version() {
        Ok(v) => {
            out.push(Finding::ok(Kind::Criu, format!("CRIU {v} found")));
            if mode == Mode::Check {
                out.push(match facts.criu_check() {
                    Ok(()) => Finding::ok(Kind::CriuCheck, "`criu check` passes on this kernel"),
                    Err(e @ criu::CheckError::NeedsNewer { needed, .. }) => Finding::fail(
                        Kind::CriuTooOld,
                        e.to_string(),
                        format!("install CRIU {needed} or newer"),
                    ),
                    // `criu check` also tests features (ptys, ...) few
                    // workloads use.
                    Err(e) => Finding::warn(
                        Kind::CriuCheck,
                        e.to_string(),
                        "workloads using what it complains about will be refused at checkpoint time",
                    ),
                });
            }
        }
        Err(e) => out.push(Finding::fail(
            Kind::Criu,
            e.to_string(),
            "apt-get install criu",
        )),
    }
    if mode == Mode::Check {
        if let Some(init) = facts.missing_init_binary() {
            out.push(Finding::fail(
                Kind::InitBinary,
                format!("{} is missing", init.display()),
                "install kupgrade-init there or set init_binary in /etc/kupgrade/config.toml",
            ));
        }
    }

    let found = facts.workloads();
    let mut workloads = Vec::new();
    for r in found {
        match r {
            Ok(w) => workloads.push(w),
            Err(e) => out.push(Finding::fail(
                Kind::WorkloadBroken,
                e.to_string(),
                "fix the workload's cgroup",
            )),
        }
    }
    out.extend(clashes(&workloads));
    if let Some(own) = facts.own_cgroup() {
        for w in workloads.iter().filter(|w| own.starts_with(&w.cgroup)) {
            out.push(
                Finding::fail(
                    Kind::HoldsKupgrade,
                    format!(
                        "workload {}'s cgroup {} contains kupgrade itself (pid {}, in {}): freezing it would freeze `kupgrade go` while it holds the run lock",
                        w.name,
                        w.cgroup.display(),
                        std::process::id(),
                        own.display()
                    ),
                    "run kupgrade from outside that cgroup (another login, or systemd-run --scope kupgrade ...)",
                )
                .about(&w.name),
            );
        }
    }
    if workloads.is_empty() && out.iter().all(|f| f.kind != Kind::WorkloadBroken) {
        out.push(Finding::new(
            if mode == Mode::Check {
                Level::Warn
            } else {
                Level::Fail
            },
            Kind::NoWorkloads,
            "no workloads to preserve",
            "start one with `kupgrade launch NAME -- CMD` or declare its cgroup in /etc/kupgrade/config.toml",
        ));
    }
    let mut refused: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for w in &workloads {
        let refusals = facts.refusals(w);
        if !refusals.is_empty() {
            refused.insert(&w.name, refusals.clone());
        }
        if refusals.is_empty() {
            let comm = facts.comm(w.root_pid);
            out.push(
                Finding::ok(
                    Kind::Workload,
                    format!(
                        "workload {} (pid {} {comm}, {} processes, {} MiB{}) looks dumpable",
                        w.name,
                        w.root_pid,
                        w.pids.len(),
                        w.memory_bytes >> 20,
                        if w.tcp_established {
                            ", TCP connections"
                        } else {
                            ""
                        }
                    ),
                )
                .about(&w.name),
            );
        }
        let low: Vec<i32> = w
            .pids
            .iter()
            .copied()
            .filter(|p| *p < launch::PID_FLOOR)
            .collect();
        if !w.pid_namespace && !low.is_empty() {
            out.push(Finding::warn(
                Kind::LowPids,
                format!("workload {} has low pids {low:?}", w.name),
                "the new kernel's early boot may take them and CRIU needs them free: restart it with `kupgrade launch` (or --pid-namespace)",
            ).about(&w.name));
        }
        if let (Some(unit), Some(usec)) = (&w.unit, w.watchdog_usec) {
            out.push(Finding::ok(
                Kind::Watchdog,
                format!("unit {unit} (workload {}) has a watchdog of {:.1} s: go turns it off for the freeze (an abort sets it back), and the new systemd runs it again from the adoption", w.name, usec as f64 / 1e6),
            ).about(&w.name));
        }
        for r in refusals {
            out.push(
                Finding::fail(Kind::Refusal, r, "remove the resource or stop the workload")
                    .about(&w.name),
            );
        }
    }

    if mode == Mode::Check {
        for s in facts.services().unwrap_or_default() {
            out.push(unit_finding(&s, &workloads, &refused));
        }
    }

    let store = facts.store();
    // Without root the lock cannot be taken; the root finding says so.
    if root {
        match facts.take_run_lock() {
            Ok(()) => {
                let left = facts.leftovers(&workloads, store.as_ref().ok());
                if !left.is_empty() {
                    out.push(Finding::fail(
                        Kind::Leftovers,
                        format!(
                            "a previous `kupgrade go` did not finish: {}",
                            left.describe().join("; ")
                        ),
                        "run `kupgrade resume` first to undo it",
                    ));
                }
            }
            // Another go is running: what it froze is not left over.
            Err(e) => {
                let what = match e {
                    LockError::Busy => {
                        "another `kupgrade go` or `kupgrade resume` is running".to_string()
                    }
                    _ => error_chain(&e),
                };
                out.push(if mode == Mode::Check {
                    Finding::warn(Kind::RunLock, what, "check again once it has finished")
                } else {
                    Finding::fail(Kind::RunLock, what, "wait for it to finish")
                });
            }
        }
    }

    let ports = facts.listening_ports(&workloads);
    if !ports.is_empty() || workloads.iter().any(|w| w.tcp_established) {
        let held: Vec<String> = ports
            .iter()
            .map(|(port, name)| format!("{port} ({name})"))
            .collect();
        let what = if held.is_empty() {
            "TCP connections are locked with nftables during the pause".to_string()
        } else {
            format!(
                "TCP connections are locked and new ones to ports {} held back with nftables during the pause",
                held.join(", ")
            )
        };
        if facts.nft_available() {
            out.push(Finding::ok(Kind::Nft, what));
        } else {
            out.push(Finding::fail(
                Kind::Nft,
                format!("{what}, but nft is not available"),
                "apt-get install nftables",
            ));
        }
    }

    let need = store::estimate_image_bytes(workloads.iter().map(|w| w.memory_bytes).sum());
    let store = match store {
        Ok(s) => match s.ensure_fits(need) {
            Ok(()) => {
                out.push(Finding::ok(
                    Kind::StoreSize,
                    format!(
                        "store {} has {} MiB; the image needs about {} MiB",
                        s.path.display(),
                        s.capacity >> 20,
                        need.div_ceil(1 << 20)
                    ),
                ));
                Some(s)
            }
            Err(e) => {
                let fix = facts.suggest_memmap(need);
                out.push(Finding::fail(Kind::StoreSize, e.to_string(), fix));
                None
            }
        },
        Err(e) => {
            let fix = facts.suggest_memmap(need);
            out.push(Finding::fail(Kind::Store, error_chain(&e), fix));
            None
        }
    };

    let staged = facts.staged();
    if mode != Mode::DryRun {
        let level = if mode == Mode::Go {
            Level::Fail
        } else {
            Level::Warn
        };
        let doubt = staged.as_ref().and_then(|s| {
            let (boot, calls) = (facts.boot_id(), facts.load_calls_left());
            s.doubt(loaded, &boot, calls)
        });
        out.push(match (&staged, doubt) {
            (Some(s), None) => Finding::ok(
                Kind::Staged,
                format!("staged: {} ({})", s.release, s.kernel.display()),
            ),
            (Some(_), Some(why)) => {
                Finding::new(level, Kind::Staged, why, "run `kupgrade stage` again")
            }
            (None, _) => Finding::new(
                level,
                Kind::Staged,
                "no kernel is staged",
                "run `kupgrade stage /boot/vmlinuz-NEW` first",
            ),
        });
    }
    if mode == Mode::Check && loaded {
        let differences = staged.iter().flat_map(|s| &s.differences);
        out.extend(differences.map(|d| Finding {
            level: match d.level {
                target::Level::Note => Level::Ok,
                target::Level::Warn => Level::Warn,
                target::Level::Refuse => Level::Fail,
            },
            kind: Kind::TargetKernel,
            workload: None,
            what: d.text.clone(),
            fix: d.fix.clone(),
        }));
    }
    Judged {
        findings: Findings(out),
        workloads,
        store,
        staged,
    }
}

use crate::child::chain as error_chain;

/// What the upgrade does to one running service: a workload whose cgroup
/// holds the unit's is preserved or refused with it; one inside the unit's
/// cgroup takes only part of it; any other service is stopped with the old
/// kernel and started again by systemd in the new one.
fn unit_finding(s: &Service, ws: &[Workload], refused: &BTreeMap<&str, Vec<String>>) -> Finding {
    if let Some(w) = ws.iter().find(|w| s.cgroup.starts_with(&w.cgroup)) {
        return match refused.get(w.name.as_str()) {
            None => Finding::ok(
                Kind::Unit,
                format!(
                    "unit {}: preserved as workload {}: its processes keep their PIDs, memory and connections",
                    s.unit, w.name
                ),
            ),
            Some(why) => Finding::fail(
                Kind::Unit,
                format!("unit {}: refused: {}", s.unit, why.join("; ")),
                "remove what is refused, or take the unit out of the config: systemd then starts it again after the upgrade",
            ),
        }
        .about(&w.name);
    }
    if let Some(w) = ws.iter().find(|w| w.cgroup.starts_with(&s.cgroup)) {
        return Finding::warn(
            Kind::Unit,
            format!(
                "unit {}: only workload {}'s cgroup {} inside it is preserved; the unit's other processes are not",
                s.unit,
                w.name,
                w.cgroup.display()
            ),
            format!("declare the whole unit: unit = \"{}\"", s.unit),
        )
        .about(&w.name);
    }
    Finding::ok(
        Kind::Unit,
        format!(
            "unit {}: not declared: systemd starts it again after the upgrade (a restart, not a pause)",
            s.unit
        ),
    )
}

/// Workloads that cannot be checkpointed side by side: two of one name
/// (their images would share a directory and a section), or one whose
/// cgroup lies inside another's (its processes would be dumped twice).
fn clashes(ws: &[Workload]) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, a) in ws.iter().enumerate() {
        for b in &ws[i + 1..] {
            let what = if a.name == b.name {
                format!(
                    "two workloads are named {} ({} and {}): their checkpoints would share a directory",
                    a.name,
                    a.cgroup.display(),
                    b.cgroup.display()
                )
            } else if b.cgroup.starts_with(&a.cgroup) || a.cgroup.starts_with(&b.cgroup) {
                let (inner, outer) = if b.cgroup.starts_with(&a.cgroup) {
                    (b, a)
                } else {
                    (a, b)
                };
                format!(
                    "workload {}'s cgroup {} is inside workload {}'s {}: its processes would be checkpointed twice",
                    inner.name,
                    inner.cgroup.display(),
                    outer.name,
                    outer.cgroup.display()
                )
            } else {
                continue;
            };
            out.push(
                Finding::fail(
                    Kind::WorkloadBroken,
                    what,
                    "rename or undeclare one of them in /etc/kupgrade/config.toml",
                )
                .about(&a.name),
            );
        }
    }
    out
}

/// The machine, as the preflight sees it.
pub struct RealFacts<'a> {
    cfg: &'a Config,
    lock: Option<RunLock>,
}

impl<'a> RealFacts<'a> {
    pub fn new(cfg: &'a Config) -> Self {
        RealFacts { cfg, lock: None }
    }

    /// The run lock taken during the preflight, for `go` to hold until it
    /// ends.
    pub fn into_run_lock(self) -> Option<RunLock> {
        self.lock
    }
}

impl Facts for RealFacts<'_> {
    fn is_root(&mut self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn kexec_loaded(&mut self) -> Result<bool, kexec::KexecError> {
        kexec::is_loaded()
    }

    fn lockdown(&mut self) -> Option<String> {
        let text = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
        // "none [integrity] confidentiality": the bracketed word is active.
        text.split_whitespace()
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(['[', ']']).to_string())
    }

    fn cgroup2(&mut self) -> bool {
        Path::new(config::CGROUP_ROOT)
            .join("cgroup.controllers")
            .exists()
    }

    fn criu_version(&mut self) -> Result<String, criu::Error> {
        criu::version(&self.cfg.criu)
    }

    fn criu_check(&mut self) -> Result<(), criu::CheckError> {
        criu::check(&self.cfg.criu)
    }

    fn missing_init_binary(&mut self) -> Option<PathBuf> {
        (!self.cfg.init_binary.exists()).then(|| self.cfg.init_binary.clone())
    }

    fn workloads(&mut self) -> Vec<Result<Workload, workload::Error>> {
        workload::discover(self.cfg)
    }

    fn refusals(&mut self, w: &Workload) -> Vec<String> {
        workload::refusals(w)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn comm(&mut self, pid: i32) -> String {
        proc::comm(pid)
    }

    fn own_cgroup(&mut self) -> Option<PathBuf> {
        crate::cgroup::of_pid(
            &proc::Proc::host(),
            std::process::id() as i32,
            Path::new(config::CGROUP_ROOT),
        )
    }

    fn take_run_lock(&mut self) -> Result<(), LockError> {
        if self.lock.is_none() {
            self.lock = Some(RunLock::take()?);
        }
        Ok(())
    }

    fn leftovers(&mut self, ws: &[Workload], store: Option<&Store>) -> Leftovers {
        leftovers::find(ws, store)
    }

    fn listening_ports(&mut self, ws: &[Workload]) -> BTreeMap<u16, String> {
        listen::listening_ports(ws)
    }

    fn nft_available(&mut self) -> bool {
        child::run(
            std::process::Command::new("nft").arg("--version"),
            None,
            child::Limits::deadline(child::TOOL_DEADLINE),
        )
        .is_ok_and(|o| o.status.success())
    }

    fn store(&mut self) -> Result<Store, store::Error> {
        Store::locate(self.cfg)
    }

    fn suggest_memmap(&mut self, need: u64) -> String {
        let grub = std::fs::read_to_string(store::GRUB_DEFAULTS).ok();
        store::reservation_fix(&store::suggest_memmap(need), grub.as_deref())
    }

    fn staged(&mut self) -> Option<Staged> {
        Staged::load()
    }

    fn boot_id(&mut self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn services(&mut self) -> Option<Vec<Service>> {
        units::systemd_booted(Path::new(units::SYSTEMD_RUNTIME_DIR))
            .then(|| units::running_services(Path::new(config::CGROUP_ROOT)))
    }

    fn load_calls_left(&mut self) -> Option<i64> {
        kexec::load_calls_left()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine on which everything is ready; each test breaks one fact.
    struct Machine {
        root: bool,
        kexec_supported: bool,
        loaded: bool,
        lockdown: Option<String>,
        cgroup2: bool,
        criu_installed: bool,
        criu_check: fn() -> Result<(), criu::CheckError>,
        init_present: bool,
        workloads: Vec<Workload>,
        broken: Vec<&'static str>,
        refused: Vec<(&'static str, &'static str)>,
        lock: fn() -> Result<(), LockError>,
        leftovers: Leftovers,
        ports: BTreeMap<u16, String>,
        nft: bool,
        store_mib: Option<u64>,
        staged: bool,
        /// What `stage` found different in the staged kernel.
        differences: Vec<target::Finding>,
        /// What the record says of the boot and of the kernel's count of
        /// kexec load calls after staging.
        staged_boot: String,
        staged_calls: Option<i64>,
        boot_id: String,
        load_calls_left: Option<i64>,
        own_cgroup: Option<PathBuf>,
        /// Running services, on a systemd machine.
        services: Option<Vec<Service>>,
        /// Facts asked for, in order.
        asked: Vec<&'static str>,
    }

    impl Default for Machine {
        fn default() -> Self {
            Machine {
                root: true,
                kexec_supported: true,
                loaded: true,
                lockdown: Some("none".into()),
                cgroup2: true,
                criu_installed: true,
                criu_check: || Ok(()),
                init_present: true,
                workloads: vec![wl("web", 20001, true)],
                broken: vec![],
                refused: vec![],
                lock: || Ok(()),
                leftovers: Leftovers::default(),
                ports: BTreeMap::new(),
                nft: true,
                store_mib: Some(1024),
                staged: true,
                differences: vec![],
                staged_boot: "boot-1".into(),
                staged_calls: Some(2147483645),
                boot_id: "boot-1".into(),
                load_calls_left: Some(2147483645),
                own_cgroup: Some("/sys/fs/cgroup/user.slice/user-0.slice/session-1.scope".into()),
                services: None,
                asked: vec![],
            }
        }
    }

    fn wl(name: &str, pid: i32, tcp: bool) -> Workload {
        Workload {
            name: name.into(),
            cgroup: format!("/sys/fs/cgroup/kupgrade/{name}").into(),
            root_pid: pid,
            pids: vec![pid],
            pid_namespace: false,
            ipc_namespace: false,
            tcp_established: tcp,
            memory_bytes: 100 << 20,
            shell_job: false,
            job_control: false,
            runtime_paths: vec![],
            journal_streams: vec![],
            unit: None,
            notify_access: None,
            watchdog_usec: None,
            unit_file: None,
        }
    }

    impl Facts for Machine {
        fn is_root(&mut self) -> bool {
            self.asked.push("root");
            self.root
        }
        fn kexec_loaded(&mut self) -> Result<bool, kexec::KexecError> {
            self.asked.push("kexec");
            if self.kexec_supported {
                Ok(self.loaded)
            } else {
                Err(kexec::KexecError::Open {
                    path: "/sys/kernel/kexec_loaded".into(),
                    source: std::io::ErrorKind::NotFound.into(),
                })
            }
        }
        fn lockdown(&mut self) -> Option<String> {
            self.asked.push("lockdown");
            self.lockdown.clone()
        }
        fn cgroup2(&mut self) -> bool {
            self.asked.push("cgroup2");
            self.cgroup2
        }
        fn criu_version(&mut self) -> Result<String, criu::Error> {
            self.asked.push("criu version");
            if self.criu_installed {
                Ok("3.17.1".into())
            } else {
                Err(criu::Error::Missing {
                    criu: "criu".into(),
                    source: std::io::ErrorKind::NotFound.into(),
                })
            }
        }
        fn criu_check(&mut self) -> Result<(), criu::CheckError> {
            self.asked.push("criu check");
            (self.criu_check)()
        }
        fn missing_init_binary(&mut self) -> Option<PathBuf> {
            self.asked.push("init binary");
            (!self.init_present).then(|| "/usr/lib/kupgrade/kupgrade-init".into())
        }
        fn workloads(&mut self) -> Vec<Result<Workload, workload::Error>> {
            self.asked.push("workloads");
            let mut out: Vec<_> = self.workloads.iter().cloned().map(Ok).collect();
            out.extend(self.broken.iter().map(|name| {
                Err(workload::Error::Empty {
                    name: name.to_string(),
                    cgroup: format!("/sys/fs/cgroup/{name}").into(),
                })
            }));
            out
        }
        fn refusals(&mut self, w: &Workload) -> Vec<String> {
            self.refused
                .iter()
                .filter(|(name, _)| *name == w.name)
                .map(|(_, resource)| {
                    format!(
                        "workload {} (pid {} server): {resource}: CRIU cannot checkpoint it",
                        w.name, w.root_pid
                    )
                })
                .collect()
        }
        fn comm(&mut self, _pid: i32) -> String {
            "server".into()
        }
        fn own_cgroup(&mut self) -> Option<PathBuf> {
            self.own_cgroup.clone()
        }
        fn take_run_lock(&mut self) -> Result<(), LockError> {
            self.asked.push("run lock");
            (self.lock)()
        }
        fn leftovers(&mut self, _ws: &[Workload], _store: Option<&Store>) -> Leftovers {
            self.asked.push("leftovers");
            Leftovers {
                frozen: self.leftovers.frozen.clone(),
                connections_held: self.leftovers.connections_held,
                ..Leftovers::default()
            }
        }
        fn listening_ports(&mut self, _ws: &[Workload]) -> BTreeMap<u16, String> {
            self.ports.clone()
        }
        fn nft_available(&mut self) -> bool {
            self.asked.push("nft");
            self.nft
        }
        fn store(&mut self) -> Result<Store, store::Error> {
            self.asked.push("store");
            match self.store_mib {
                Some(mib) => Ok(Store {
                    path: "/dev/pmem0".into(),
                    kind: store::Kind::Pmem,
                    capacity: mib << 20,
                }),
                None => Err(store::Error::NoPmem {
                    suggestion: "memmap=256M!4096M".into(),
                }),
            }
        }
        fn suggest_memmap(&mut self, need: u64) -> String {
            store::suggest_memmap_from("100000000-23fffffff : System RAM\n", need)
        }
        fn staged(&mut self) -> Option<Staged> {
            self.asked.push("staged");
            self.staged.then(|| Staged {
                kernel: "/boot/vmlinuz-6.1.0-57-cloud-amd64".into(),
                release: "6.1.0-57-cloud-amd64".into(),
                initrd: "/run/kupgrade/initrd.img".into(),
                cmdline: "console=ttyS0".into(),
                store: "/dev/pmem0".into(),
                initrd_bytes: 1 << 20,
                modules: 10,
                staged_unix: 0,
                differences: self.differences.clone(),
                boot_id: self.staged_boot.clone(),
                load_calls_left: self.staged_calls,
                ..Staged::default()
            })
        }
        fn boot_id(&mut self) -> String {
            self.boot_id.clone()
        }
        fn load_calls_left(&mut self) -> Option<i64> {
            self.load_calls_left
        }
        fn services(&mut self) -> Option<Vec<Service>> {
            self.asked.push("services");
            self.services.clone()
        }
    }

    const MODES: [Mode; 3] = [Mode::Check, Mode::Go, Mode::DryRun];

    fn findings(m: &mut Machine, mode: Mode) -> Vec<Finding> {
        judge(m, mode).findings.0
    }

    /// The findings of `kind`, as (level, what and fix).
    fn of(m: &mut Machine, mode: Mode, kind: Kind) -> Vec<(Level, String)> {
        findings(m, mode)
            .into_iter()
            .filter(|f| f.kind == kind)
            .map(|f| {
                (
                    f.level,
                    format!("{} -> {}", f.what, f.fix.unwrap_or_default()),
                )
            })
            .collect()
    }

    fn level(m: &mut Machine, mode: Mode, kind: Kind) -> Option<Level> {
        let found = of(m, mode, kind);
        assert!(found.len() <= 1, "{found:?}");
        found.first().map(|f| f.0)
    }

    #[test]
    fn a_ready_machine_passes_every_mode_and_go_gets_what_it_needs() {
        for mode in MODES {
            let all = findings(&mut Machine::default(), mode);
            assert!(
                all.iter().all(|f| f.level == Level::Ok),
                "{mode:?}: {all:?}"
            );
            assert!(all.iter().all(|f| f.fix.is_none()));
        }
        let cleared = go(&mut Machine::default(), false).unwrap();
        assert!(!cleared.dry_run());
        assert_eq!(cleared.workloads()[0].name, "web");
        assert_eq!(cleared.store().capacity, 1 << 30);
        assert_eq!(
            cleared.staged().map(|s| s.release.as_str()),
            Some("6.1.0-57-cloud-amd64")
        );
        assert!(go(&mut Machine::default(), true).unwrap().dry_run());
    }

    #[test]
    fn without_root_go_looks_no_further_and_check_goes_on() {
        let mut m = Machine {
            root: false,
            ..Machine::default()
        };
        let refused = go(&mut m, false).unwrap_err();
        assert_eq!(refused.0.len(), 1);
        assert_eq!(refused.0[0].kind, Kind::Root);
        assert!(refused.0[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("CAP_SYS_BOOT"));
        assert_eq!(m.asked, ["root"]);
        let mut m = Machine {
            root: false,
            ..Machine::default()
        };
        assert_eq!(level(&mut m, Mode::Check, Kind::Root), Some(Level::Fail));
        assert!(m.asked.contains(&"store"));
        // The lock needs root: not even tried.
        assert!(!m.asked.contains(&"run lock") && !m.asked.contains(&"leftovers"));
    }

    #[test]
    fn kexec_unsupported_fails_check_and_go_and_only_warns_a_dry_run() {
        let m = || Machine {
            kexec_supported: false,
            ..Machine::default()
        };
        assert_eq!(level(&mut m(), Mode::Check, Kind::Kexec), Some(Level::Fail));
        assert_eq!(level(&mut m(), Mode::Go, Kind::Kexec), Some(Level::Fail));
        assert_eq!(
            level(&mut m(), Mode::DryRun, Kind::Kexec),
            Some(Level::Warn)
        );
        assert!(of(&mut m(), Mode::Go, Kind::Kexec)[0]
            .1
            .contains("CONFIG_KEXEC_FILE"));
        assert!(go(&mut m(), true).is_ok());
    }

    #[test]
    fn lockdown_warns_about_unsigned_kernels() {
        let mut m = Machine {
            lockdown: Some("integrity".into()),
            ..Machine::default()
        };
        let f = of(&mut m, Mode::Check, Kind::Lockdown);
        assert_eq!(f[0].0, Level::Warn);
        assert!(f[0].1.contains("integrity") && f[0].1.contains("signed"));
        let mut m = Machine {
            lockdown: None,
            ..Machine::default()
        };
        assert_eq!(level(&mut m, Mode::Check, Kind::Lockdown), None);
    }

    #[test]
    fn no_cgroup2_fails_everywhere() {
        for mode in MODES {
            let mut m = Machine {
                cgroup2: false,
                ..Machine::default()
            };
            assert_eq!(
                level(&mut m, mode, Kind::Cgroup2),
                Some(Level::Fail),
                "{mode:?}"
            );
        }
    }

    #[test]
    fn missing_criu_fails_everywhere_with_how_to_install_it() {
        for mode in MODES {
            let mut m = Machine {
                criu_installed: false,
                ..Machine::default()
            };
            let f = of(&mut m, mode, Kind::Criu);
            assert_eq!(f[0].0, Level::Fail, "{mode:?}");
            assert!(f[0].1.contains("apt-get install criu"), "{f:?}");
            assert!(!m.asked.contains(&"criu check"));
        }
    }

    #[test]
    fn criu_check_runs_for_check_only_and_fails_only_for_a_too_old_criu() {
        let mut m = Machine {
            criu_check: || {
                Err(criu::CheckError::NeedsNewer {
                    detail: "Unknown mapping [vvar_vclock]".into(),
                    why: "6.13+",
                    needed: "4.1",
                })
            },
            ..Machine::default()
        };
        let f = of(&mut m, Mode::Check, Kind::CriuTooOld);
        assert_eq!(f[0].0, Level::Fail);
        assert!(f[0].1.contains("install CRIU 4.1 or newer"), "{f:?}");
        assert_eq!(level(&mut m, Mode::Check, Kind::CriuCheck), None);
        for mode in [Mode::Go, Mode::DryRun] {
            m.asked.clear();
            assert_eq!(level(&mut m, mode, Kind::CriuTooOld), None);
            assert!(!m.asked.contains(&"criu check"), "{mode:?}");
        }
        let mut m = Machine {
            criu_check: || Err(criu::CheckError::Feature("no pty support".into())),
            ..Machine::default()
        };
        let f = of(&mut m, Mode::Check, Kind::CriuCheck);
        assert_eq!(f[0].0, Level::Warn);
        assert!(f[0].1.contains("no pty support"));
        assert_eq!(
            level(&mut Machine::default(), Mode::Check, Kind::CriuCheck),
            Some(Level::Ok)
        );
    }

    #[test]
    fn a_missing_init_binary_fails_check_but_not_go_which_has_it_staged() {
        let m = || Machine {
            init_present: false,
            ..Machine::default()
        };
        let f = of(&mut m(), Mode::Check, Kind::InitBinary);
        assert_eq!(f[0].0, Level::Fail);
        assert!(f[0].1.contains("kupgrade-init is missing"));
        assert!(go(&mut m(), false).is_ok());
        assert!(go(&mut m(), true).is_ok());
    }

    #[test]
    fn no_workloads_warns_check_and_refuses_go_and_dry_run() {
        let m = || Machine {
            workloads: vec![],
            ..Machine::default()
        };
        assert_eq!(
            level(&mut m(), Mode::Check, Kind::NoWorkloads),
            Some(Level::Warn)
        );
        for dry_run in [false, true] {
            let refused = go(&mut m(), dry_run).unwrap_err();
            assert_eq!(refused.0[0].kind, Kind::NoWorkloads);
            assert!(refused.to_string().contains("kupgrade launch"), "{refused}");
        }
    }

    #[test]
    fn a_broken_workload_fails_and_does_not_count_as_no_workloads() {
        for mode in MODES {
            let mut m = Machine {
                workloads: vec![],
                broken: vec!["db"],
                ..Machine::default()
            };
            let f = of(&mut m, mode, Kind::WorkloadBroken);
            assert_eq!(f[0].0, Level::Fail, "{mode:?}");
            assert!(f[0].1.contains("workload db") && f[0].1.contains("cgroup"));
            assert_eq!(level(&mut m, mode, Kind::NoWorkloads), None);
        }
    }

    #[test]
    fn refusals_fail_everywhere_naming_the_workload_and_the_resource() {
        let m = || Machine {
            workloads: vec![wl("web", 20001, false), wl("ring", 20002, false)],
            refused: vec![
                ("ring", "fd 5 is an io_uring"),
                ("ring", "fd 6 is the device /dev/kmsg"),
            ],
            ..Machine::default()
        };
        for mode in MODES {
            let f: Vec<Finding> = findings(&mut m(), mode)
                .into_iter()
                .filter(|f| f.kind == Kind::Refusal)
                .collect();
            assert_eq!(f.len(), 2, "{mode:?}");
            assert!(f.iter().all(|f| f.level == Level::Fail));
            assert!(f.iter().all(|f| f.workload.as_deref() == Some("ring")));
            assert!(
                f[0].what.contains("workload ring (pid 20002")
                    && f[0].what.contains("is an io_uring")
            );
        }
        // The refused workload is not said to be dumpable; the other is.
        let ok: Vec<Finding> = findings(&mut m(), Mode::Check)
            .into_iter()
            .filter(|f| f.kind == Kind::Workload)
            .collect();
        assert_eq!(ok.len(), 1);
        assert!(
            ok[0]
                .what
                .contains("workload web (pid 20001 server, 1 processes, 100 MiB) looks dumpable"),
            "{}",
            ok[0].what
        );
        let refused = go(&mut m(), false).unwrap_err().to_string();
        assert!(
            refused.starts_with("refusing to upgrade, nothing was frozen:"),
            "{refused}"
        );
        assert!(refused.contains("is the device /dev/kmsg"), "{refused}");
    }

    /// Freezing it would freeze `go` itself, with the run lock held.
    #[test]
    fn a_workload_whose_cgroup_holds_kupgrade_itself_fails_everywhere() {
        for mode in MODES {
            let mut m = Machine {
                own_cgroup: Some("/sys/fs/cgroup/kupgrade/web/shell".into()),
                ..Machine::default()
            };
            let f = of(&mut m, mode, Kind::HoldsKupgrade);
            assert_eq!(f.len(), 1, "{mode:?}");
            assert_eq!(f[0].0, Level::Fail);
            assert!(
                f[0].1.contains("workload web") && f[0].1.contains("kupgrade itself"),
                "{f:?}"
            );
            assert!(f[0].1.contains("from outside"), "{f:?}");
        }
        // A sibling merely named alike is not it.
        let mut m = Machine {
            own_cgroup: Some("/sys/fs/cgroup/kupgrade/web2".into()),
            ..Machine::default()
        };
        assert_eq!(level(&mut m, Mode::Go, Kind::HoldsKupgrade), None);
    }

    #[test]
    fn two_workloads_of_one_name_or_one_inside_another_fail() {
        let mut db = wl("db", 20002, false);
        db.cgroup = "/sys/fs/cgroup/system.slice/db.service".into();
        let mut same_name = db.clone();
        same_name.cgroup = "/sys/fs/cgroup/kupgrade/db".into();
        let mut inner = wl("child", 20003, false);
        inner.cgroup = "/sys/fs/cgroup/system.slice/db.service/worker".into();
        for (ws, says) in [
            (vec![db.clone(), same_name], "two workloads are named db"),
            (vec![db.clone(), inner], "inside workload db"),
        ] {
            for mode in MODES {
                let mut m = Machine {
                    workloads: ws.clone(),
                    ..Machine::default()
                };
                let f = of(&mut m, mode, Kind::WorkloadBroken);
                assert_eq!(f.len(), 1, "{mode:?} {f:?}");
                assert_eq!(f[0].0, Level::Fail);
                assert!(f[0].1.contains(says), "{f:?}");
            }
        }
    }

    #[test]
    fn low_pids_warn_unless_the_workload_has_its_own_pid_namespace() {
        let mut m = Machine {
            workloads: vec![wl("early", 300, false)],
            ..Machine::default()
        };
        let f = of(&mut m, Mode::Check, Kind::LowPids);
        assert_eq!(f[0].0, Level::Warn);
        assert!(f[0].1.contains("[300]") && f[0].1.contains("kupgrade launch"));
        assert!(go(&mut m, false).is_ok());
        let mut own = wl("early", 300, false);
        own.pid_namespace = true;
        let mut m = Machine {
            workloads: vec![own],
            ..Machine::default()
        };
        assert_eq!(level(&mut m, Mode::Check, Kind::LowPids), None);
    }

    #[test]
    fn a_unit_s_watchdog_is_reported_as_turned_off_for_the_freeze() {
        let mut svc = wl("pulse", 20_000, false);
        svc.unit = Some("pulse.service".into());
        svc.watchdog_usec = Some(4_000_000);
        let mut m = Machine {
            workloads: vec![svc.clone()],
            ..Machine::default()
        };
        let f = of(&mut m, Mode::Check, Kind::Watchdog);
        assert_eq!(f[0].0, Level::Ok);
        assert!(
            f[0].1.contains("pulse.service")
                && f[0].1.contains("4.0 s")
                && f[0].1.contains("turns it off for the freeze"),
            "{}",
            f[0].1
        );
        assert!(go(&mut m, false).is_ok());
        svc.watchdog_usec = None;
        let mut m = Machine {
            workloads: vec![svc],
            ..Machine::default()
        };
        assert_eq!(level(&mut m, Mode::Check, Kind::Watchdog), None);
    }

    #[test]
    fn a_running_go_warns_check_refuses_go_and_hides_its_work_from_leftovers() {
        let m = || Machine {
            lock: || Err(LockError::Busy),
            leftovers: Leftovers {
                frozen: vec!["web".into()],
                ..Leftovers::default()
            },
            ..Machine::default()
        };
        let mut check_m = m();
        assert_eq!(
            level(&mut check_m, Mode::Check, Kind::RunLock),
            Some(Level::Warn)
        );
        assert!(!check_m.asked.contains(&"leftovers"));
        for dry_run in [false, true] {
            let refused = go(&mut m(), dry_run).unwrap_err();
            assert_eq!(refused.0.len(), 1, "{refused}");
            assert_eq!(refused.0[0].kind, Kind::RunLock);
            assert!(refused.to_string().contains("wait for it to finish"));
        }
    }

    #[test]
    fn leftovers_of_a_killed_go_fail_everywhere_and_say_run_resume() {
        for mode in MODES {
            let mut m = Machine {
                leftovers: Leftovers {
                    frozen: vec!["counter".into()],
                    connections_held: true,
                    ..Leftovers::default()
                },
                ..Machine::default()
            };
            let f = of(&mut m, mode, Kind::Leftovers);
            assert_eq!(f[0].0, Level::Fail, "{mode:?}");
            // Both strings are what the killed-go scenario looks for.
            assert!(
                f[0].1
                    .contains("did not finish: workload counter is frozen;"),
                "{f:?}"
            );
            assert!(f[0].1.contains("run `kupgrade resume` first"), "{f:?}");
            // The lock is taken before leftovers are looked for.
            let lock = m.asked.iter().position(|a| *a == "run lock");
            assert!(lock < m.asked.iter().position(|a| *a == "leftovers"));
        }
    }

    #[test]
    fn tcp_and_listening_ports_need_nft() {
        let mut m = Machine {
            nft: false,
            ..Machine::default()
        };
        for mode in MODES {
            let f = of(&mut m, mode, Kind::Nft);
            assert_eq!(f[0].0, Level::Fail);
            assert!(f[0].1.contains("apt-get install nftables"));
        }
        let mut m = Machine {
            workloads: vec![wl("web", 20001, false)],
            ports: BTreeMap::from([(8080, "web".to_string())]),
            ..Machine::default()
        };
        let f = of(&mut m, Mode::Check, Kind::Nft);
        assert_eq!(f[0].0, Level::Ok);
        assert!(f[0].1.contains("ports 8080 (web) held back"), "{f:?}");
        // Neither connections nor listeners: nft is not needed.
        let mut m = Machine {
            workloads: vec![wl("calc", 20001, false)],
            nft: false,
            ..Machine::default()
        };
        assert_eq!(level(&mut m, Mode::Go, Kind::Nft), None);
        assert!(!m.asked.contains(&"nft"));
    }

    #[test]
    fn a_missing_or_small_store_fails_everywhere_with_the_memmap_to_reserve() {
        for mode in MODES {
            let mut m = Machine {
                store_mib: Some(64),
                ..Machine::default()
            };
            let f = of(&mut m, mode, Kind::StoreSize);
            assert_eq!(f[0].0, Level::Fail);
            // What the store-too-small scenario looks for.
            assert!(
                f[0].1.contains("64 MiB") && f[0].1.contains("memmap="),
                "{f:?}"
            );
            let mut m = Machine {
                store_mib: None,
                ..Machine::default()
            };
            let f = of(&mut m, mode, Kind::Store);
            assert_eq!(f[0].0, Level::Fail);
            assert!(f[0].1.contains("-> memmap=256M!4096M"), "{f:?}");
        }
        let f = of(&mut Machine::default(), Mode::Check, Kind::StoreSize);
        assert!(
            f[0].1
                .contains("store /dev/pmem0 has 1024 MiB; the image needs about 126 MiB"),
            "{f:?}"
        );
    }

    #[test]
    fn a_kernel_not_staged_or_not_loaded_warns_check_fails_go_and_is_no_matter_for_a_dry_run() {
        let unstaged = || Machine {
            staged: false,
            ..Machine::default()
        };
        let unloaded = || Machine {
            loaded: false,
            ..Machine::default()
        };
        for (m, says) in [
            (
                unstaged as fn() -> Machine,
                "run `kupgrade stage /boot/vmlinuz-NEW` first",
            ),
            (
                unloaded,
                "no kernel is loaded any more -> run `kupgrade stage` again",
            ),
        ] {
            let f = of(&mut m(), Mode::Check, Kind::Staged);
            assert_eq!(f[0].0, Level::Warn);
            assert!(f[0].1.contains(says), "{f:?}");
            let refused = go(&mut m(), false).unwrap_err();
            assert_eq!(refused.0.len(), 1);
            assert_eq!(refused.0[0].kind, Kind::Staged);
            assert_eq!(level(&mut m(), Mode::DryRun, Kind::Staged), None);
            let cleared = go(&mut m(), true).unwrap();
            assert!(cleared.dry_run());
        }
    }

    /// `check` says how the staged kernel differs from the running one, as
    /// `stage` found it; `go` does not look (stage refused what matters).
    #[test]
    fn check_says_what_differs_in_the_staged_kernel() {
        let differs = |level, text: &str, fix: Option<&str>| target::Finding {
            level,
            text: text.into(),
            fix: fix.map(str::to_string),
        };
        let mut m = Machine {
            differences: vec![
                differs(target::Level::Note, "modules of a: plain; of b: xz", None),
                differs(
                    target::Level::Warn,
                    "b lacks unix_diag",
                    Some("stage another"),
                ),
            ],
            ..Machine::default()
        };
        assert_eq!(
            of(&mut m, Mode::Check, Kind::TargetKernel),
            [
                (Level::Ok, "modules of a: plain; of b: xz -> ".to_string()),
                (
                    Level::Warn,
                    "b lacks unix_diag -> stage another".to_string()
                )
            ]
        );
        assert_eq!(level(&mut m, Mode::Go, Kind::TargetKernel), None);
        // Not loaded any more: what it was is beside the point.
        m.loaded = false;
        assert!(of(&mut m, Mode::Check, Kind::TargetKernel).is_empty());
    }

    /// Linux says whether a kexec kernel is loaded, not which: a load or
    /// unload by anyone after `kupgrade stage` shows only in the kernel's
    /// count of load calls, and a record of another boot is no record of
    /// what is loaded now.
    #[test]
    fn a_kernel_loaded_since_the_stage_or_in_another_boot_is_not_the_staged_one() {
        let moved = || Machine {
            load_calls_left: Some(2147483643),
            ..Machine::default()
        };
        let other_boot = || Machine {
            boot_id: "boot-2".into(),
            ..Machine::default()
        };
        for (m, says) in [
            (
                moved as fn() -> Machine,
                "kexec_load_limit_reboot went from 2147483645 to 2147483643",
            ),
            (other_boot, "staged in another boot"),
        ] {
            let f = of(&mut m(), Mode::Check, Kind::Staged);
            assert_eq!(f[0].0, Level::Warn);
            assert!(
                f[0].1.contains(says) && f[0].1.contains("kupgrade stage"),
                "{f:?}"
            );
            let refused = go(&mut m(), false).unwrap_err();
            assert_eq!(refused.0.len(), 1, "{refused}");
            assert_eq!(refused.0[0].kind, Kind::Staged);
            assert!(go(&mut m(), true).is_ok(), "a dry run does not kexec");
        }
        // A kernel before 6.7 counts nothing, a record from before this
        // check holds no boot: the loaded flag is all there is.
        for m in [
            Machine {
                staged_calls: None,
                load_calls_left: None,
                ..Machine::default()
            },
            Machine {
                staged_boot: String::new(),
                staged_calls: None,
                ..Machine::default()
            },
        ] {
            let mut m = m;
            assert_eq!(level(&mut m, Mode::Go, Kind::Staged), Some(Level::Ok));
        }
    }

    /// Moved from the pipeline, whose own check it replaces: `go` gets no
    /// [`Cleared`], so nothing can be frozen.
    #[test]
    fn nothing_is_frozen_without_a_loaded_kernel_or_workloads() {
        let mut m = Machine {
            loaded: false,
            ..Machine::default()
        };
        let err = go(&mut m, false).unwrap_err();
        assert!(err.to_string().contains("kupgrade stage"));
        let mut m = Machine {
            workloads: vec![],
            ..Machine::default()
        };
        let err = go(&mut m, false).unwrap_err();
        assert!(err.to_string().contains("kupgrade launch"));
    }

    #[test]
    fn check_says_what_happens_to_every_running_service() {
        let service = |unit: &str, cgroup: &str| Service {
            unit: unit.into(),
            cgroup: cgroup.into(),
        };
        let declared = |name: &str, cgroup: &str| Workload {
            cgroup: cgroup.into(),
            ..wl(name, 20001, false)
        };
        let mut m = Machine {
            workloads: vec![
                declared("redis", "/sys/fs/cgroup/system.slice/redis-server.service"),
                declared("worker", "/sys/fs/cgroup/system.slice/app.service/worker"),
                declared("logger", "/sys/fs/cgroup/system.slice/logger.service"),
            ],
            refused: vec![("logger", "its stdout is a unix connection to journald")],
            services: Some(vec![
                service("app.service", "/sys/fs/cgroup/system.slice/app.service"),
                service(
                    "logger.service",
                    "/sys/fs/cgroup/system.slice/logger.service",
                ),
                service(
                    "redis-server.service",
                    "/sys/fs/cgroup/system.slice/redis-server.service",
                ),
                service("ssh.service", "/sys/fs/cgroup/system.slice/ssh.service"),
            ]),
            ..Machine::default()
        };
        let units = of(&mut m, Mode::Check, Kind::Unit);
        assert_eq!(units.len(), 4, "{units:?}");
        assert_eq!(units[0].0, Level::Warn);
        assert!(
            units[0]
                .1
                .contains("unit app.service: only workload worker's cgroup"),
            "{}",
            units[0].1
        );
        assert_eq!(units[1].0, Level::Fail);
        assert!(
            units[1].1.contains("unit logger.service: refused: workload logger (pid 20001 server): its stdout is a unix connection to journald"),
            "{}",
            units[1].1
        );
        assert_eq!(units[2].0, Level::Ok);
        assert!(
            units[2]
                .1
                .contains("unit redis-server.service: preserved as workload redis"),
            "{}",
            units[2].1
        );
        assert_eq!(units[3].0, Level::Ok);
        assert!(
            units[3]
                .1
                .contains("unit ssh.service: not declared: systemd starts it again"),
            "{}",
            units[3].1
        );
        // go refuses on the refusal itself and does not list the units.
        for mode in [Mode::Go, Mode::DryRun] {
            let mut m = Machine {
                services: m.services.clone(),
                ..Machine::default()
            };
            assert!(of(&mut m, mode, Kind::Unit).is_empty());
            assert!(!m.asked.contains(&"services"));
        }
        // Without systemd there is nothing to say.
        let mut plain = Machine::default();
        assert!(of(&mut plain, Mode::Check, Kind::Unit).is_empty());
    }

    #[test]
    fn json_is_one_object_with_every_finding() {
        let mut m = Machine {
            store_mib: Some(64),
            staged: false,
            ..Machine::default()
        };
        let findings = check(&mut m);
        let v: serde_json::Value = serde_json::from_str(&findings.to_json().to_string()).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["ready"], false);
        let list = v["findings"].as_array().unwrap();
        assert_eq!(list.len(), findings.0.len());
        for f in list {
            let keys: Vec<&str> = f.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys.len(), 5, "{f}");
            for k in ["level", "kind", "workload", "what", "fix"] {
                assert!(keys.contains(&k), "{f}");
            }
        }
        let small = list.iter().find(|f| f["kind"] == "store-size").unwrap();
        assert_eq!(small["level"], "fail");
        // How to grow the reservation: the memmap= to reserve instead.
        assert_eq!(small["fix"], "memmap=256M!4096M");
        let staged = list.iter().find(|f| f["kind"] == "staged").unwrap();
        assert_eq!(staged["level"], "warn");
        let ok = list.iter().find(|f| f["kind"] == "root").unwrap();
        assert!(ok["fix"].is_null() && ok["workload"].is_null());
        let web = list.iter().find(|f| f["kind"] == "workload").unwrap();
        assert_eq!(web["workload"], "web");
        assert_eq!(check(&mut Machine::default()).to_json()["ready"], true);
    }

    #[test]
    fn kind_names_are_unique_and_kebab_case() {
        let mut names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        assert!(names.iter().all(|n| n
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')));
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    #[test]
    fn findings_print_as_before() {
        let f = Finding::fail(Kind::StoreSize, "store is 64 MiB", "grow it");
        assert_eq!(f.to_string(), "[FAIL] store is 64 MiB\n       -> grow it");
        assert_eq!(
            Finding::ok(Kind::Root, "running as root").to_string(),
            "[ ok ] running as root"
        );
    }
}
