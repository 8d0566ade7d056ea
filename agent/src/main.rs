//! `kupgrade`: live kernel upgrades that keep the workloads running.

mod docs;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use contract::report::{Outcome as RestoreOutcome, UpgradeReport};
use kupgrade_agent::config::{Config, CONFIG_FILE, LIB_DIR, WORK_DIR};
use kupgrade_agent::exit::Exit;
use kupgrade_agent::faults::{self, FaultPoint, Faulty};
use kupgrade_agent::leftovers::{self, RunLock};
use kupgrade_agent::pipeline::{self, Outcome, System};
use kupgrade_agent::preflight::{self, RealFacts};
use kupgrade_agent::realsys::RealSystem;
use kupgrade_agent::report;
use kupgrade_agent::stage::{self, InitramfsKind};
use kupgrade_agent::status::Status;
use kupgrade_agent::store::Store;
use kupgrade_agent::workload::{self, Workload};
use kupgrade_agent::{json, launch};

/// `println!` that cannot panic: it does when stdout is gone (`kupgrade go
/// | tee log` then Ctrl-C, a dropped ssh session), and what kupgrade says
/// last matters less than finishing what it does.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that cannot panic.
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "kupgrade",
    version,
    about = "Upgrade the running kernel without losing the workloads"
)]
struct Cli {
    #[arg(long, global = true, default_value = CONFIG_FILE)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Can this machine upgrade live? What would be preserved?
    Check {
        /// One JSON object: {"version", "ready", "findings": [{"level",
        /// "kind", "workload", "what", "fix"}]} (see JSON OUTPUT in kupgrade(8)).
        #[arg(long)]
        json: bool,
    },
    /// Validate a kernel, pick its initramfs and load it with kexec.
    ///
    /// The initramfs is the distribution's for that release when it carries
    /// kupgrade's hook (/boot/initrd.img-RELEASE, else
    /// /boot/initramfs-RELEASE.img); when it does not, one is built with
    /// mkinitramfs or dracut into /run/kupgrade (/boot is left alone). A
    /// machine with neither a distribution initramfs for the release nor a
    /// generator gets kupgrade's own.
    Stage {
        kernel: PathBuf,
        /// Use this initramfs (its /init must be kupgrade-init, or it must
        /// carry kupgrade's hook).
        #[arg(long, conflicts_with = "own_initramfs")]
        initrd: Option<PathBuf>,
        /// Build kupgrade's own minimal initramfs (kupgrade-init mounts
        /// root= itself: a plain block device, no LVM, LUKS or RAID).
        #[arg(long)]
        own_initramfs: bool,
        /// Do nothing unless the config has stage_new_kernels = true (the
        /// kernel packages' hook, /etc/kernel/postinst.d/zz-kupgrade, runs
        /// this).
        #[arg(long)]
        if_configured: bool,
        /// Append to the running command line.
        #[arg(long)]
        append: Option<String>,
        /// Use this command line instead of the running one.
        #[arg(long)]
        cmdline: Option<String>,
    },
    /// Forget the staged kernel.
    Unstage,
    /// Staged kernel, workloads, store and estimates.
    Status {
        /// One JSON object (see JSON OUTPUT in kupgrade(8)).
        #[arg(long)]
        json: bool,
    },
    /// Freeze, checkpoint, write the image and kexec into the staged kernel.
    Go {
        /// Do everything but the reboot, then resume the workloads.
        #[arg(long)]
        dry_run: bool,
    },
    /// Undo what a `kupgrade go` that was killed half-way left behind:
    /// thaw and continue the workloads, lift the network locks, let new
    /// connections in, make file systems writable, invalidate the image.
    Resume,
    /// What the last upgrade did, phase by phase.
    Report {
        /// One JSON object: {"version", "report"} (see JSON OUTPUT in kupgrade(8)).
        #[arg(long)]
        json: bool,
        /// Also draw the timeline of its phases as SVG into this file.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Start a workload that kupgrade will preserve.
    Launch {
        name: String,
        /// Run it in a new PID namespace.
        #[arg(long)]
        pid_namespace: bool,
        /// Run it in a new IPC namespace (needed for SysV shared memory,
        /// semaphores and message queues).
        #[arg(long)]
        ipc_namespace: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Inspect an image or a store.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    #[command(name = "__exec", hide = true)]
    Exec {
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        pid_file: Option<PathBuf>,
        #[arg(long)]
        pid_namespace: bool,
        #[arg(long)]
        ipc_namespace: bool,
        #[arg(last = true)]
        command: Vec<String>,
    },
    #[command(name = "__ns-init", hide = true)]
    NsInit {
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Writes the man pages, shell completions and docs/cli.md (the
    /// package build runs it).
    #[command(name = "__docs", hide = true)]
    Docs { dir: PathBuf },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Print the superblock, manifest and sections.
    Inspect {
        path: PathBuf,
        /// Verify every checksum.
        #[arg(long)]
        verify: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain once: what failed, then why.
            let mut line = format!("kupgrade: {e}");
            for cause in e.chain().skip(1) {
                line.push_str(&format!(": {cause}"));
            }
            err!("{line}");
            Exit::Failed.into()
        }
    }
}

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (CAP_SYS_BOOT, CAP_SYS_ADMIN): run it with sudo");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Exec {
            cgroup,
            pid_file,
            pid_namespace,
            ipc_namespace,
            command,
        } => {
            let ns = launch::Namespaces {
                pid: pid_namespace,
                ipc: ipc_namespace,
            };
            // Only returns on failure (exec replaced us otherwise).
            if let Err(e) =
                launch::exec_in_cgroup(cgroup.as_deref(), pid_file.as_deref(), ns, &command)
            {
                eprintln!("kupgrade: {e}");
                return Ok(ExitCode::from(127));
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::NsInit { command } => {
            return Ok(ExitCode::from(launch::ns_init(&command).clamp(0, 255) as u8))
        }
        Cmd::Image {
            cmd: ImageCmd::Inspect { path, verify },
        } => {
            image_format::inspect::print(&path, verify, &mut std::io::stdout())
                .with_context(|| format!("cannot inspect {}", path.display()))?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Report { json, svg } => return report(json, svg.as_deref()),
        Cmd::Docs { dir } => {
            docs::write(&dir)?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let cfg = Config::load(&cli.config)?;
    match cli.cmd {
        Cmd::Check { json } => {
            let findings = preflight::check(&mut RealFacts::new(&cfg));
            if json {
                println!("{}", findings.to_json());
            } else {
                for f in &findings.0 {
                    println!("{f}");
                }
                let failed = findings.failures().count();
                if failed > 0 {
                    println!("{failed} problem(s) would stop an upgrade");
                } else {
                    println!("ready to upgrade");
                }
            }
            let failures: Vec<_> = findings.failures().collect();
            return Ok(Exit::for_check(&failures).into());
        }
        Cmd::Stage {
            kernel,
            initrd,
            own_initramfs,
            if_configured,
            append,
            cmdline,
        } => {
            if if_configured && !cfg.stage_new_kernels {
                println!(
                    "not staging {}: stage_new_kernels is off in {}",
                    kernel.display(),
                    cli.config.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            require_root("staging a kernel")?;
            let req = stage::Request {
                kernel: &kernel,
                initrd: initrd.as_deref(),
                append: append.as_deref(),
                cmdline: cmdline.as_deref(),
                own_initramfs,
            };
            let s = stage::stage(&cfg, &req)
                .with_context(|| format!("cannot stage {}", kernel.display()))?;
            let e = contract::events::EventLine::now(contract::events::Event::Staged)
                .with("release", &s.release);
            println!("{e}");
            println!("staged {} from {}", s.release, s.kernel.display());
            for d in &s.differences {
                println!("{d}");
            }
            let whose = match (s.initramfs, &s.built_with) {
                (InitramfsKind::Distribution, None) => "the distribution's, with kupgrade's hook",
                (InitramfsKind::Distribution, Some(_)) => {
                    "the distribution's, built now with kupgrade's hook: the one in /boot has none"
                }
                (InitramfsKind::Kupgrade, _) => "kupgrade's own",
                (InitramfsKind::Given, _) => "as given",
            };
            println!(
                "initramfs {} ({whose}; {} KiB, {} modules)",
                s.initrd.display(),
                s.initrd_bytes >> 10,
                s.modules
            );
            println!("command line: {}", s.cmdline);
            println!("run `kupgrade go` to upgrade, `kupgrade unstage` to forget it");
        }
        Cmd::Unstage => {
            require_root("unstaging")?;
            stage::unstage()?;
            println!("no kernel staged");
        }
        Cmd::Status { json } => {
            let st = Status::gather(&cfg, release());
            if json {
                println!("{}", st.to_json());
            } else {
                print!("{}", st.text());
            }
        }
        Cmd::Go { dry_run } => return go(&cfg, dry_run),
        Cmd::Resume => return resume(&cfg),
        Cmd::Launch {
            name,
            pid_namespace,
            ipc_namespace,
            command,
        } => {
            require_root("launching a workload")?;
            let ns = launch::Namespaces {
                pid: pid_namespace,
                ipc: ipc_namespace,
            };
            let l = launch::launch(&name, ns, &command)?;
            println!("pid {}", l.pid);
            println!("cgroup {}", l.cgroup.display());
            if let Some(unit) = &l.unit {
                println!("unit {unit}");
            }
            println!("output {}", l.output);
        }
        Cmd::Exec { .. }
        | Cmd::NsInit { .. }
        | Cmd::Image { .. }
        | Cmd::Report { .. }
        | Cmd::Docs { .. } => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn workloads_or_bail(cfg: &Config) -> Result<Vec<Workload>> {
    let mut out = Vec::new();
    for r in workload::discover(cfg) {
        out.push(r?);
    }
    Ok(out)
}

fn release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Runs `f` on the real system, inside the fault injector when
/// `KUPGRADE_FAILPOINT` lists faults.
fn on_system<T>(
    real: RealSystem,
    store: &Store,
    faults: Option<Vec<FaultPoint>>,
    f: impl FnOnce(&mut dyn System) -> T,
) -> T {
    match faults {
        Some(points) => f(&mut Faulty::new(real, points, store.clone())),
        None => {
            let mut real = real;
            f(&mut real)
        }
    }
}

fn go(cfg: &Config, dry_run: bool) -> Result<ExitCode> {
    // First: a mistyped fault must not let a real upgrade through.
    let faults = faults::from_env()?;
    let mut facts = RealFacts::new(cfg);
    let cleared = match preflight::go(&mut facts, dry_run) {
        Ok(c) => c,
        Err(refused) => {
            err!("kupgrade: {refused}");
            return Ok(Exit::for_refusal(&refused.0).into());
        }
    };
    // Held until go returns: one go or resume at a time.
    let _lock = facts.into_run_lock();
    let work_dir = PathBuf::from(WORK_DIR);
    // CRIU's images and the tmpfs copies are process memory: root's alone.
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&work_dir)
            .and_then(|()| {
                std::fs::set_permissions(&work_dir, std::fs::Permissions::from_mode(0o700))
            })
            .with_context(|| format!("cannot make {}", work_dir.display()))?;
    }
    let opts = pipeline::Options {
        work_dir: work_dir.clone(),
        precopy: pipeline::Precopy {
            max_iterations: cfg.precopy_iterations,
            budget: std::time::Duration::from_secs(cfg.precopy_budget_s),
            store_capacity: cleared.store().capacity,
        },
        kernel_from: release(),
        kernel_to: cleared
            .staged()
            .map(|s| s.release.clone())
            .unwrap_or_else(|| "(dry run)".into()),
        boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
        machine_id: read_trim("/etc/machine-id"),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let store = cleared.store().clone();
    let real = RealSystem::new(cfg.clone(), store.clone()).with_staged(cleared.staged().cloned());
    let result = on_system(real, &store, faults, |sys| {
        pipeline::go(sys, &cleared, &opts)
    });
    let _ = std::fs::remove_dir_all(&work_dir);
    match result {
        Ok(Outcome::DryRun {
            paused_ms,
            image_bytes,
        }) => {
            out!(
                "dry run done: the workloads were paused {paused_ms:.0} ms up to the reboot, image {} KiB; all resumed",
                image_bytes >> 10
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(aborted) => {
            err!("kupgrade: upgrade aborted at {}", aborted.failure);
            if aborted.resume_errors.is_empty() {
                err!("kupgrade: every workload was resumed on this kernel; nothing was lost");
                Ok(Exit::Aborted.into())
            } else {
                err!(
                    "kupgrade: RESUMING FAILED: {}",
                    pipeline::join(&aborted.resume_errors)
                );
                Ok(Exit::ResumeNeeded.into())
            }
        }
    }
}

fn resume(cfg: &Config) -> Result<ExitCode> {
    require_root("kupgrade resume")?;
    let faults = faults::from_env()?;
    let _lock = RunLock::take()?;
    let criu = leftovers::criu_processes();
    if !criu.others.is_empty() {
        bail!(
            "CRIU is still running (pids {:?}): wait for it to exit, then run `kupgrade resume` again",
            criu.others
        );
    }
    if !criu.ours.is_empty() {
        out!(
            "stopping CRIU left running by a `kupgrade go` that died (pids {:?})",
            criu.ours
        );
        let left = leftovers::stop_criu(&criu.ours);
        if !left.is_empty() {
            bail!("CRIU (pids {left:?}) did not exit after SIGKILL: in uninterruptible sleep? run `kupgrade resume` again later");
        }
    }
    // A go that died left its dump behind: process memory, of no use now.
    match std::fs::remove_dir_all(WORK_DIR) {
        Ok(()) => out!("removed the checkpoint a `kupgrade go` left in {WORK_DIR}"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => err!("kupgrade: cannot remove {WORK_DIR}: {e}"),
    }
    let workloads = workloads_or_bail(cfg)?;
    let store = Store::locate(cfg).ok();
    let left = leftovers::find(&workloads, store.as_ref());
    if left.is_empty() {
        // An abort whose wipe failed, or an image a restore left.
        if let Some(s) = store
            .as_ref()
            .filter(|s| s.holds_image_data(Path::new(LIB_DIR)))
        {
            let zeroed = s
                .wipe(Path::new(LIB_DIR))
                .with_context(|| "the store holds image data of an earlier upgrade")?;
            out!(
                "wiped the store {}: {} MiB of image data zeroed",
                s.path.display(),
                zeroed >> 20
            );
        }
        out!("nothing to resume: no workload is frozen and no lock, hold or image of this boot is left");
        return Ok(ExitCode::SUCCESS);
    }
    for what in left.describe() {
        out!("found: {what}");
    }
    let Some(store) = store else {
        bail!("the store is gone; cannot run the recovery that needs it");
    };
    let real = RealSystem::after_killed_go(cfg.clone(), store.clone(), left.read_only.clone());
    let errors = on_system(real, &store, faults, |sys| {
        pipeline::recover(
            sys,
            &workloads,
            left.image_from_this_boot,
            !left.read_only.is_empty(),
        )
    });
    if errors.is_empty() {
        out!("resumed: every workload runs again on this kernel");
        Ok(ExitCode::SUCCESS)
    } else {
        err!("kupgrade: RESUMING FAILED: {}", pipeline::join(&errors));
        Ok(Exit::ResumeNeeded.into())
    }
}

fn report(json: bool, svg: Option<&Path>) -> Result<ExitCode> {
    let path = Path::new(LIB_DIR).join(contract::report::FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "version": json::VERSION, "report": null })
                );
            } else {
                println!("no upgrade recorded ({} does not exist)", path.display());
            }
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if let Some(out) = svg {
        let r: UpgradeReport = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} does not parse", path.display()))?;
        let agent_log = std::fs::read_to_string(kupgrade_agent::realsys::last_go_log()).ok();
        std::fs::write(out, r.timeline_svg(agent_log.as_deref()))
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("timeline written to {}", out.display());
    }
    let r: UpgradeReport = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} does not parse", path.display()))?;
    let restored = if r.outcome == RestoreOutcome::Restored {
        Exit::Ok
    } else {
        Exit::RestoreFailed
    };
    if json {
        // As written, with fields this version may not know.
        let record: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} does not parse", path.display()))?;
        println!(
            "{}",
            serde_json::json!({ "version": json::VERSION, "report": record })
        );
        return Ok(restored.into());
    }
    let outcome = match r.outcome {
        RestoreOutcome::Restored => "restored",
        RestoreOutcome::Failed => "FAILED",
        RestoreOutcome::Restoring => "DID NOT FINISH",
    };
    println!("upgrade {} -> {}: {outcome}", r.kernel_from, r.kernel_to);
    if let Some(why) = &r.reason {
        println!("  reason: {why}");
    }
    // Checked against what the store holds now: a restore that never ended
    // leaves a report that cannot be taken at its word.
    let store = r.store.as_deref().map(|s| report::store_says(Path::new(s)));
    let doubt = store.as_ref().and_then(|s| report::doubt(&r, s));
    if let Some(d) = &doubt {
        println!("  WARNING: {d}");
    }
    if let Some(report::StoreSays::Unreadable(why)) = &store {
        println!("  (not checked against the store: {why})");
    }
    for w in &r.workloads {
        println!(
            "  workload {} (pid {}): {}{}",
            w.name,
            w.root_pid,
            if w.restored {
                "restored"
            } else {
                "NOT restored"
            },
            w.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        if let Some(log) = &w.criu_log {
            println!("    CRIU log: {log}");
        }
    }
    for m in &r.modules_failed {
        println!("  module {} did not load: {}", m.name, m.error);
    }
    let t0 = r.events.first().map(|e| e.t_real_ns).unwrap_or(0);
    for e in &r.events {
        println!(
            "  {:>10.1} ms  {}",
            (e.t_real_ns.saturating_sub(t0)) as f64 / 1e6,
            e.event
        );
    }
    if let Some(b) = r.blackout_ns() {
        println!("  workloads paused for {:.1} ms", b as f64 / 1e6);
    }
    Ok(if doubt.is_none() {
        restored
    } else {
        Exit::RestoreFailed
    }
    .into())
}
