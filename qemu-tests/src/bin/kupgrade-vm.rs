//! `kupgrade-vm run SCENARIO.toml [--report FILE.json] [--jobs N]`: boot,
//! upgrade live, check, report. Exits 0 only if every check passed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kupgrade_vm::floor::Floors;
use kupgrade_vm::report::{Report, Verdict};
use kupgrade_vm::run::Options;
use kupgrade_vm::scenario::{Flavour, Scenario};
use kupgrade_vm::{assets, jobs, progress, stop, suite};

#[derive(Parser)]
#[command(
    name = "kupgrade-vm",
    about = "Try live kernel upgrades in a QEMU appliance"
)]
struct Cli {
    /// Where kernels, images and runs are kept.
    #[arg(long, global = true, env = "KUPGRADE_VM_CACHE")]
    cache: Option<PathBuf>,
    /// Use these prebuilt static binaries instead of building them.
    #[arg(long, global = true, env = "KUPGRADE_VM_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios and report; exits non-zero unless all pass.
    Run {
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        /// Write the JSON report here (with several scenarios: a directory).
        #[arg(long)]
        report: Option<PathBuf>,
        /// QEMU accelerator: tcg works everywhere; kvm where nesting works.
        #[arg(long, default_value = "tcg")]
        accel: String,
        /// The QEMU system emulator to run.
        #[arg(long, env = "KUPGRADE_VM_QEMU", default_value = "qemu-system-x86_64")]
        qemu: String,
        /// Keep the disk image of passing runs too.
        #[arg(long)]
        keep: bool,
        /// Show the guest's console.
        #[arg(long, short)]
        verbose: bool,
        /// Run up to N scenarios at once (each TCG guest keeps about one
        /// core busy); the longest kinds start first, progress lines name
        /// their scenario, and each summary is printed whole when it ends.
        #[arg(
            long,
            short,
            default_value_t = 1,
            value_name = "N",
            value_parser = clap::value_parser!(u16).range(1..)
        )]
        jobs: u16,
    },
    /// Write the compatibility table from run reports.
    Matrix {
        /// Directory of JSON reports (`run --report DIR`).
        #[arg(long, default_value = "target/kupgrade-vm/reports")]
        reports: PathBuf,
        #[arg(long, default_value = "docs/compatibility.md")]
        out: PathBuf,
    },
    /// Write the fault table (docs/reliability.md) from run reports.
    Reliability {
        /// Directory of JSON reports (`run --report DIR`).
        #[arg(long, default_value = "target/kupgrade-vm/reports")]
        reports: PathBuf,
        #[arg(long, default_value = "docs/reliability.md")]
        out: PathBuf,
    },
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Writes the JSON report to `path` and its timeline picture next to it.
fn write_report(rep: &Report, path: &Path) {
    match serde_json::to_vec_pretty(rep) {
        Ok(json) => {
            if let Err(e) = std::fs::write(path, json) {
                eprintln!("kupgrade-vm: cannot write {}: {e}", path.display());
            }
        }
        Err(e) => eprintln!("kupgrade-vm: cannot encode the report: {e}"),
    }
    if !rep.upgrades.is_empty() {
        let svg = path.with_extension("svg");
        if let Err(e) = std::fs::write(&svg, rep.timeline_svg()) {
            eprintln!("kupgrade-vm: cannot write {}: {e}", svg.display());
        }
    }
}

/// Writes `out` from the reports in `dir`, drawn by `render`.
fn write_table(
    dir: &Path,
    out: &Path,
    render: fn(&[kupgrade_vm::report::Report]) -> String,
) -> ExitCode {
    let result = kupgrade_vm::matrix::load_reports(dir).and_then(|r| {
        std::fs::write(out, render(&r))?;
        Ok(r.len())
    });
    match result {
        Ok(n) => {
            println!("wrote {} from {n} reports", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kupgrade-vm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long a scenario is expected to take, roughly, to start the longest
/// first when several run at once: the Debian guest, then more kexecs,
/// more memory to checkpoint, a longer deadline. One that does not load
/// goes last (it fails at once).
fn expected_length(path: &Path) -> (bool, usize, u32, u64) {
    match Scenario::load(path) {
        Ok(s) => (
            s.guest.flavour == Flavour::Debian,
            s.upgrade.chain.len(),
            s.guest.memory_mib,
            s.guest.timeout_secs,
        ),
        Err(_) => (false, 0, 0, 0),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cache = cli
        .cache
        .unwrap_or_else(|| workspace().join("target/kupgrade-vm"));
    match cli.cmd {
        Cmd::Matrix { reports, out } => write_table(&reports, &out, kupgrade_vm::matrix::render),
        Cmd::Reliability { reports, out } => {
            write_table(&reports, &out, kupgrade_vm::reliability::render)
        }
        Cmd::Run {
            scenarios,
            report,
            accel,
            qemu,
            keep,
            verbose,
            jobs,
        } => {
            // A stopped harness stops its guests; 30 s is enough for the runs
            // in progress to write their reports.
            if let Err(e) = stop::install(Duration::from_secs(30)) {
                eprintln!("kupgrade-vm: cannot handle signals: {e}");
                return ExitCode::FAILURE;
            }
            // Built once, before any scenario: they all boot these.
            let bin_dir = match cli.bin_dir {
                Some(d) => d,
                None => match assets::build_guest_binaries(&workspace()) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("kupgrade-vm: {e:#}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            let opts = Options {
                cache,
                workspace: workspace(),
                bin_dir: Some(bin_dir),
                accel,
                qemu,
                keep,
                verbose,
            };
            let several = scenarios.len() > 1;
            if let Some(dir) = report.as_ref().filter(|_| several) {
                if let Err(e) = std::fs::create_dir_all(dir) {
                    eprintln!("kupgrade-vm: cannot create {}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
            }
            let jobs = usize::from(jobs);
            let mut queue: Vec<(usize, &PathBuf)> = scenarios.iter().enumerate().collect();
            if jobs > 1 {
                queue.sort_by_cached_key(|(_, s)| std::cmp::Reverse(expected_length(s)));
            }
            let floors = Floors::new();
            let mut failed = Vec::new();
            jobs::run_all(
                queue,
                jobs,
                || stop::stopped().is_some(),
                |(i, s)| {
                    if jobs > 1 {
                        let label = s.file_stem().unwrap_or(s.as_os_str());
                        progress::set_label(Some(&label.to_string_lossy()));
                    }
                    (i, s, suite::run(s, &opts, &floors))
                },
                |(i, s, result)| {
                    let rep = match result {
                        Ok(r) => r,
                        Err(e) => {
                            eprintln!("kupgrade-vm: {}: {e:#}", s.display());
                            failed.push((i, s.display().to_string()));
                            return;
                        }
                    };
                    // One write: a summary is never cut by another's.
                    let _ = std::io::stdout().lock().write_all(rep.summary().as_bytes());
                    if let Some(path) = &report {
                        let path = if several || path.is_dir() {
                            path.join(format!("{}.json", rep.scenario))
                        } else {
                            path.clone()
                        };
                        write_report(&rep, &path);
                    }
                    if rep.verdict != Verdict::Pass {
                        failed.push((i, rep.scenario.clone()));
                    }
                },
            );
            if let (Some(sig), Some(code)) = (stop::stopped(), stop::exit_status()) {
                eprintln!(
                    "kupgrade-vm: stopped by {}; its guests were stopped, logs are under {}",
                    stop::name(sig),
                    opts.cache.join("runs").display()
                );
                return ExitCode::from(code);
            }
            // In the order given, whichever finished first.
            failed.sort();
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                let names: Vec<String> = failed.into_iter().map(|(_, n)| n).collect();
                eprintln!("kupgrade-vm: failed: {}", names.join(", "));
                ExitCode::FAILURE
            }
        }
    }
}
