//! `kupgrade-vm run SCENARIO.toml [--report FILE.json]`: boot, upgrade live,
//! check, report. Exits 0 only if every check passed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kupgrade_vm::floor::Floors;
use kupgrade_vm::report::{Report, Verdict};
use kupgrade_vm::run::Options;
use kupgrade_vm::{stop, suite};

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
    },
    /// Write the compatibility table from run reports.
    Matrix {
        /// Directory of JSON reports (`run --report DIR`).
        #[arg(long, default_value = "target/kupgrade-vm/reports")]
        reports: PathBuf,
        #[arg(long, default_value = "docs/compatibility.md")]
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cache = cli
        .cache
        .unwrap_or_else(|| workspace().join("target/kupgrade-vm"));
    match cli.cmd {
        Cmd::Matrix { reports, out } => {
            let result = kupgrade_vm::matrix::load_reports(&reports).and_then(|r| {
                std::fs::write(&out, kupgrade_vm::matrix::render(&r))?;
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
        Cmd::Run {
            scenarios,
            report,
            accel,
            qemu,
            keep,
            verbose,
        } => {
            // A stopped harness stops its guests; 30 s is enough for the run
            // in progress to write its report.
            if let Err(e) = stop::install(Duration::from_secs(30)) {
                eprintln!("kupgrade-vm: cannot handle signals: {e}");
                return ExitCode::FAILURE;
            }
            let mut opts = Options {
                cache,
                workspace: workspace(),
                bin_dir: cli.bin_dir,
                accel,
                qemu,
                keep,
                verbose,
            };
            let mut failed = Vec::new();
            let mut floors = Floors::new();
            for s in &scenarios {
                if stop::stopped().is_some() {
                    break;
                }
                let rep = match suite::run(s, &opts, &mut floors) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("kupgrade-vm: {}: {e:#}", s.display());
                        failed.push(s.display().to_string());
                        continue;
                    }
                };
                // Build the guest binaries once per invocation.
                if opts.bin_dir.is_none() {
                    opts.bin_dir =
                        Some(workspace().join("target/static/x86_64-unknown-linux-gnu/release"));
                }
                print!("{}", rep.summary());
                if let Some(path) = &report {
                    let path = if scenarios.len() > 1 || path.is_dir() {
                        let _ = std::fs::create_dir_all(path);
                        path.join(format!("{}.json", rep.scenario))
                    } else {
                        path.clone()
                    };
                    write_report(&rep, &path);
                }
                if rep.verdict != Verdict::Pass {
                    failed.push(rep.scenario.clone());
                }
            }
            if let (Some(sig), Some(code)) = (stop::stopped(), stop::exit_status()) {
                eprintln!(
                    "kupgrade-vm: stopped by {}; its guest was stopped, logs are under {}",
                    stop::name(sig),
                    opts.cache.join("runs").display()
                );
                return ExitCode::from(code);
            }
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("kupgrade-vm: failed: {}", failed.join(", "));
                ExitCode::FAILURE
            }
        }
    }
}
