//! One scenario run: assets, QEMU, probes, the guest's lines, the verdict.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use contract::events::EventLine;

use crate::assets::{self, Cache, RootfsInputs};
use crate::debian;
use crate::guest::{self, Line, Plan, Verb};
use crate::probe::{self, ProbeResult};
use crate::report::{self, Artifacts, CheckResult, Report, Verdict, WorkloadPids};
use crate::scenario::{Expect, Flavour, Scenario};
use crate::{progress, qmp, stop};

#[derive(Clone, Debug)]
pub struct Options {
    pub cache: PathBuf,
    pub workspace: PathBuf,
    /// Prebuilt static binaries; built from the workspace when `None`.
    pub bin_dir: Option<PathBuf>,
    pub accel: String,
    /// The QEMU binary (a stand-in in the harness's own tests).
    pub qemu: String,
    pub keep: bool,
    /// Echo the guest's serial console to the terminal.
    pub verbose: bool,
}

/// The host ports handed out to this process's guests so far.
static ISSUED_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free port on the host for a forward. The probe listener is closed
/// before QEMU binds the port, so the kernel could hand it out again to a
/// guest starting at the same time: no port is given out twice.
pub(crate) fn free_port() -> Result<u16> {
    let mut issued = ISSUED_PORTS.lock().unwrap_or_else(PoisonError::into_inner);
    unique_port(&mut issued, || {
        Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
    })
}

fn unique_port(
    issued: &mut BTreeSet<u16>,
    mut free: impl FnMut() -> std::io::Result<u16>,
) -> Result<u16> {
    for _ in 0..100 {
        let port = free()?;
        if issued.insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no free host port that this run has not handed out already")
}

/// Held while the appliance's kernels, root image and initramfs are built
/// or checked, which scenarios running at once share. The Debian guest
/// locks its own cache (with flock, as other clones share it).
static APPLIANCE_ASSETS: Mutex<()> = Mutex::new(());
/// kupgrade's package, built into `target/debian` once per run (from the
/// same binaries) for every Debian guest; the guests' caches lock
/// themselves, so that different flavours are assembled side by side.
static DEBIAN_PACKAGE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// kupgrade's package as this run built it for its Debian guests.
pub(crate) fn debian_package() -> Option<PathBuf> {
    DEBIAN_PACKAGE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// The `.deb` of a kernel release, for a fleet to install (see
/// [`assets::kernel_deb`]), under the lock of the kernels it sits beside.
pub(crate) fn kernel_package(opts: &Options, release: &str) -> Result<PathBuf> {
    let _assets = hold(&APPLIANCE_ASSETS);
    assets::kernel_deb(&Cache::new(opts.cache.clone())?, release)
}

fn hold(lock: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    // The guarded state is files, which a panicking holder leaves as the
    // next build expects (partial files are rebuilt).
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything prepared before QEMU starts.
#[derive(Clone)]
pub struct Prepared {
    pub scenario: Scenario,
    pub from: String,
    pub to: String,
    pub bin_dir: PathBuf,
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn prepare(scenario_path: &Path, opts: &Options) -> Result<Prepared> {
    let scenario = Scenario::load(scenario_path)?;
    assets::check_packages(&scenario.guest.packages)?;
    let cache = Cache::new(opts.cache.clone())?;
    let (from, from_series) = scenario.kernels.from();
    let from = assets::resolve_release(from, from_series, &cache)?;
    let (to, to_series) = scenario.kernels.to();
    let to = assets::resolve_release(to, to_series, &cache)?;
    // The Debian guest installs its kernels itself.
    if scenario.guest.flavour == Flavour::Appliance {
        let _assets = hold(&APPLIANCE_ASSETS);
        for r in [&from, &to] {
            assets::ensure_kernel(&cache, r)?;
        }
    }
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => assets::build_guest_binaries(&opts.workspace)?,
    };
    let mut releases = vec![from.clone(), to.clone()];
    releases.sort();
    releases.dedup();
    let (rootfs, kernel, initrd) = match scenario.guest.flavour {
        Flavour::Appliance => {
            let _assets = hold(&APPLIANCE_ASSETS);
            let rootfs = assets::ensure_rootfs(
                &cache,
                &RootfsInputs {
                    releases: &releases,
                    bin_dir: &bin_dir,
                    packages: &scenario.guest.packages,
                },
            )?;
            let initrd = assets::build_initramfs(&cache, &bin_dir, &from)?;
            (rootfs, cache.vmlinuz(&from), initrd)
        }
        Flavour::Debian => {
            let package = {
                let mut built = DEBIAN_PACKAGE
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match &*built {
                    Some(p) => p.clone(),
                    None => built
                        .insert(debian::build_package(&opts.workspace, &bin_dir)?)
                        .clone(),
                }
            };
            let inputs = debian::Inputs {
                releases: &releases,
                bin_dir: &bin_dir,
                package: &package,
                packages: &scenario.guest.packages,
                initramfs: scenario.guest.initramfs,
                qemu: &opts.qemu,
                accel: &opts.accel,
            };
            let g = debian::ensure(&cache, &inputs, &from)?;
            (g.disk, g.kernel, g.initrd)
        }
    };
    Ok(Prepared {
        scenario,
        from,
        to,
        bin_dir,
        rootfs,
        kernel,
        initrd,
    })
}

/// Writes the plan disk: the plan and the scenario's files, in a kupgrade image.
fn write_plan_disk(
    path: &Path,
    plan: &Plan,
    scenario_dir: &Path,
    scenario: &Scenario,
    run_dir: &Path,
) -> Result<()> {
    let files_root = run_dir.join("plan-files");
    for w in &scenario.workloads {
        for f in &w.files {
            let dest = files_root.join(f.guest.strip_prefix("/").unwrap_or(&f.guest));
            fs::create_dir_all(dest.parent().context("guest path")?)?;
            let src = scenario_dir.join(&f.host);
            fs::copy(&src, &dest)
                .with_context(|| format!("cannot copy scenario file {}", src.display()))?;
        }
    }
    fs::create_dir_all(&files_root)?;
    let capacity = 256 << 20;
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(capacity)?;
    let mut w =
        image_format::ImageWriter::create(file, capacity, image_format::WriteOptions::default())?;
    w.add_blob(guest::PLAN_SECTION, &serde_json::to_vec(plan)?)?;
    w.add_tree(guest::FILES_SECTION, &files_root)?;
    w.finish(image_format::Manifest::default())?;
    Ok(())
}

/// A serial console line and when it reached the host, in ms since QEMU
/// started (the guest's clocks do not run on across a kexec).
struct SerialLine {
    at_ms: f64,
    text: String,
}

struct Qemu {
    /// Shared with the handler that stops the guests on a signal.
    child: Arc<Mutex<Child>>,
    lines: mpsc::Receiver<SerialLine>,
}

fn start_qemu(
    p: &Prepared,
    opts: &Options,
    disk: &Path,
    plan_disk: &Path,
    fwds: &[(u16, u16)],
    fleet: Option<&FleetGuest>,
    log: &Path,
) -> Result<Qemu> {
    let g = &p.scenario.guest;
    let root = match g.flavour {
        Flavour::Appliance => format!("root=LABEL={} rw", assets::ROOT_LABEL),
        Flavour::Debian => debian::KERNEL_ARGS.to_string(),
    };
    // no_timer_check: a TCG vCPU starved by a busy host (another guest of
    // `--jobs`, say) misses the early IO-APIC timer check and the kernel
    // panics; `kupgrade stage` passes the line on to the kexec'd kernel.
    let cmdline = format!(
        "console=ttyS0,115200 {root} {} no_timer_check panic=-1 loglevel=4",
        g.memmap()
    );
    let mut netdev = "user,id=n0".to_string();
    for (pr, (host, guest_port)) in p.scenario.probes.iter().zip(fwds) {
        let proto = if pr.mode.is_udp() { "udp" } else { "tcp" };
        netdev.push_str(&format!(",hostfwd={proto}:127.0.0.1:{host}-:{guest_port}"));
    }
    if let Some(f) = fleet {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:22", f.ssh_port));
    }
    let mut cmd = Command::new(&opts.qemu);
    cmd.args([
        "-accel",
        &opts.accel,
        "-m",
        &g.memory_mib.to_string(),
        "-smp",
        &g.cpus.to_string(),
    ])
    .args([
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-rtc",
        "base=utc",
    ])
    .arg("-kernel")
    .arg(&p.kernel)
    .arg("-initrd")
    .arg(&p.initrd)
    .args(["-append", &cmdline])
    .arg("-drive")
    .arg(format!("file={},format=raw,if=virtio", disk.display()))
    .arg("-drive")
    .arg(format!(
        "file={},format=raw,if=virtio,readonly=on",
        plan_disk.display()
    ))
    .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"]);
    if !p.scenario.upgrade.reset_on.is_empty() {
        cmd.arg("-qmp").arg(qmp::listen_arg(&qmp_socket(log)));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut log_file = File::create(log)?;
    let mut child = cmd
        .spawn()
        .context("cannot start qemu-system-x86_64: install qemu-system-x86 (scripts/setup does)")?;
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let child = Arc::new(Mutex::new(child));
    stop::register(&child);
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(SerialLine {
                at_ms: t0.elapsed().as_secs_f64() * 1e3,
                text: format!("qemu: {line}"),
            });
        }
    });
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while reader
            .read_until(b'\n', &mut buf)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            // Stamped on arrival: the host's clock times the phases.
            let at = t0.elapsed().as_secs_f64();
            let text = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            let _ = writeln!(log_file, "[{at:8.3}] {text}");
            let line = SerialLine {
                at_ms: at * 1e3,
                text,
            };
            if tx.send(line).is_err() {
                break;
            }
            buf.clear();
        }
    });
    Ok(Qemu { child, lines: rx })
}

/// QEMU's QMP socket, next to the run's serial log.
fn qmp_socket(serial_log: &Path) -> PathBuf {
    serial_log.with_file_name("qmp.sock")
}

/// The kernels a prepared scenario upgrades to, in turn.
pub fn chain_releases(p: &Prepared) -> Vec<String> {
    p.scenario
        .upgrade
        .chain
        .iter()
        .map(|k| {
            if k == "from" {
                p.from.clone()
            } else {
                p.to.clone()
            }
        })
        .collect()
}

/// Boots the guest of a prepared scenario and judges the run.
pub fn run_prepared(p: &Prepared, scenario_dir: &Path, opts: &Options) -> Result<Report> {
    boot(p, scenario_dir, opts, false, None)
}

/// One guest of a fleet: its sshd on a port of 127.0.0.1, upgraded (or
/// not) by the host's Ansible while it runs.
#[derive(Clone, Debug)]
pub struct FleetGuest {
    pub host: String,
    pub ssh_port: u16,
}

/// Boots one guest of a fleet and judges it when the roll has ended (see
/// [`crate::fleet`]); `p.scenario.upgrade.chain` is what it must come to.
pub fn run_fleet_guest(
    p: &Prepared,
    scenario_dir: &Path,
    opts: &Options,
    guest: &FleetGuest,
) -> Result<Report> {
    boot(p, scenario_dir, opts, false, Some(guest))
}

/// Boots the scenario's guest without its workloads, probes and checks and
/// kexecs it bare through the same kernels (see [`crate::floor`]).
pub fn run_bare(p: &Prepared, opts: &Options) -> Result<Report> {
    let mut bare = p.clone();
    let sc = &mut bare.scenario;
    sc.name = format!("{}-floor", sc.name);
    sc.setup.clear();
    sc.workloads.clear();
    sc.probes.clear();
    sc.background.clear();
    sc.checks.clear();
    sc.attempts.clear();
    sc.upgrade.settle_secs = 0;
    sc.upgrade.go_args.clear();
    sc.upgrade.go_env.clear();
    progress::step("timing a bare kexec of the same kernels and guest (no workloads)");
    boot(&bare, Path::new("."), opts, true, None)
}

fn boot(
    p: &Prepared,
    scenario_dir: &Path,
    opts: &Options,
    bare: bool,
    fleet: Option<&FleetGuest>,
) -> Result<Report> {
    let started = Instant::now();
    if let Some(sig) = stop::stopped() {
        anyhow::bail!("stopped by {}", stop::name(sig));
    }
    let sc = &p.scenario;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let run_dir = new_run_dir(&opts.cache.join("runs"), &sc.name, stamp)?;
    let disk = run_dir.join("disk.img");
    progress::step(&format!(
        "copying the root image for this run into {}",
        run_dir.display()
    ));
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&p.rootfs)
        .arg(&disk)
        .status()?;
    anyhow::ensure!(st.success(), "cannot copy {}", p.rootfs.display());

    let chain = chain_releases(p);
    let plan = Plan {
        scenario: sc.name.clone(),
        setup: sc.setup.clone(),
        workloads: sc.workloads.clone(),
        // The upgrade waits for the probes that hold a connection open.
        probe_ports: sc
            .probes
            .iter()
            .filter(|p| p.mode.holds_connection())
            .map(|p| p.guest_port)
            .collect(),
        chain: chain.clone(),
        settle_secs: sc.upgrade.settle_secs,
        expect: sc.upgrade.expect,
        go_args: sc.upgrade.go_args.clone(),
        go_env: sc.upgrade.go_env.clone(),
        stage_append: sc.upgrade.stage_append.clone(),
        background: sc.background.clone(),
        checks: sc.checks.clone(),
        attempts: sc.attempts.clone(),
        alive_secs: 3,
        bare_kexec: bare,
        external_upgrade: fleet.is_some(),
        host: fleet.map(|f| f.host.clone()).unwrap_or_default(),
    };
    let plan_disk = run_dir.join("plan.img");
    write_plan_disk(&plan_disk, &plan, scenario_dir, sc, &run_dir)?;
    let mut fwds = Vec::new();
    for pr in &sc.probes {
        fwds.push((free_port()?, pr.guest_port));
    }
    let serial = run_dir.join("serial.log");
    progress::step(&format!(
        "booting {} under QEMU ({}), serial log {}",
        p.from,
        opts.accel,
        serial.display()
    ));
    let qemu = start_qemu(p, opts, &disk, &plan_disk, &fwds, fleet, &serial)?;

    let deadline = Instant::now() + Duration::from_secs(sc.guest.timeout_secs);
    let stop = Arc::new(AtomicBool::new(false));
    let mut probes: Vec<JoinHandle<ProbeResult>> = Vec::new();
    let mut boots: Vec<String> = Vec::new();
    let mut events = Vec::new();
    let mut seen_events = std::collections::HashSet::new();
    let mut pids_before: HashMap<String, i32> = HashMap::new();
    let mut pids_after: HashMap<String, i32> = HashMap::new();
    let mut checks: Vec<CheckResult> = Vec::new();
    let mut go_returned: Option<(bool, String)> = None;
    let mut restore_reports: Vec<(String, String)> = Vec::new();
    let mut guest_error = None;
    let mut timed_out = false;
    let mut stopped_by = None;
    let mut done = false;
    let mut reset_done = false;
    loop {
        if Instant::now() > deadline {
            timed_out = true;
            progress::step(&format!(
                "deadline of {} s passed: stopping QEMU",
                sc.guest.timeout_secs
            ));
            if let Ok(mut c) = qemu.child.lock() {
                let _ = c.kill();
            }
            break;
        }
        // The signal handler stops QEMU; what it printed so far is logged.
        if let Some(sig) = stop::stopped() {
            stopped_by = Some(sig);
            progress::step(&format!("stopped by {}: stopping QEMU", stop::name(sig)));
            break;
        }
        let SerialLine { at_ms, text: line } =
            match qemu.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => l,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
        if opts.verbose {
            progress::console(&line);
        }
        let reset_on = &sc.upgrade.reset_on;
        if !reset_done && !reset_on.is_empty() && line.contains(reset_on.as_str()) {
            reset_done = true;
            progress::step(&format!("guest said {reset_on:?}: resetting the machine"));
            if let Err(e) = qmp::system_reset(&qmp_socket(&serial)) {
                guest_error = Some(format!("cannot reset the machine: {e:#}"));
            }
        }
        if let Some(e) = EventLine::parse(&line) {
            // kmsg and the console can both show the same event; the first
            // to arrive times it.
            if seen_events.insert((e.event, e.t_mono_ns)) {
                progress::step(&format!("guest: {}", e.event));
                events.push(report::record(&e, boots.len().saturating_sub(1), at_ms));
            }
            continue;
        }
        let Some(l) = Line::parse(&line) else {
            continue;
        };
        match l.verb {
            Verb::Boot => {
                if reset_done {
                    // Up again after the reset: a reboot ends the run again.
                    if let Err(e) = qmp::reboot_stops(&qmp_socket(&serial)) {
                        progress::step(&format!("{e:#}"));
                    }
                }
                let k = l.get("kernel").unwrap_or("?").to_string();
                progress::step(&format!("guest booted kernel {k}"));
                boots.push(k);
            }
            Verb::Workload => {
                if let (Some(n), Some(pid)) =
                    (l.get("name"), l.get("pid").and_then(|p| p.parse().ok()))
                {
                    pids_before.insert(n.to_string(), pid);
                }
            }
            Verb::WorkloadAfter => {
                if let (Some(n), Some(pid)) =
                    (l.get("name"), l.get("pid").and_then(|p| p.parse().ok()))
                {
                    pids_after.insert(n.to_string(), pid);
                }
            }
            Verb::Ready => {
                for (pr, (host_port, _)) in sc.probes.iter().zip(&fwds) {
                    let (pr, port, stop) = (pr.clone(), *host_port, stop.clone());
                    probes.push(std::thread::spawn(move || {
                        probe::run(&pr, port, Duration::from_secs(60), stop)
                    }));
                }
                progress::step(&format!("guest ready: {} probe(s) started", probes.len()));
            }
            Verb::Go => progress::step(&format!(
                "guest: kupgrade go -> {}",
                l.get("target").unwrap_or("?")
            )),
            Verb::GoReturned => {
                let ok = l.get("ok") == Some("true");
                let d = l.get("detail").unwrap_or("").to_string();
                let last = d.rsplit(" | ").next().unwrap_or("");
                progress::step(&format!(
                    "guest: kupgrade go returned ({}): {last}",
                    if ok { "ok" } else { "failed" }
                ));
                go_returned = Some((ok, d));
            }
            Verb::Report => restore_reports.push((
                l.get("outcome").unwrap_or("").to_string(),
                l.get("detail").unwrap_or("").to_string(),
            )),
            Verb::Check => checks.push(CheckResult {
                name: l.get("name").unwrap_or("?").to_string(),
                ok: l.get("ok") == Some("true"),
                detail: l.get("detail").unwrap_or("").to_string(),
            }),
            Verb::ChecksDone => stop.store(true, Ordering::Relaxed),
            Verb::Done => done = true,
            Verb::Info => progress::step(&format!("guest: {}", l.get("detail").unwrap_or(""))),
            // The worker then stops, and the run fails for want of `done`.
            Verb::Error => {
                let d = l.get("detail").unwrap_or("").to_string();
                progress::step(&format!("guest: error: {d}"));
                guest_error = Some(d);
            }
        }
    }
    if !done && stopped_by.is_none() {
        // QEMU stopped by the handler ends the loop before it looks.
        stopped_by = stop::stopped();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = wait_exit(&qemu.child, Duration::from_secs(10));
    let probe_results: Vec<ProbeResult> =
        probes.into_iter().filter_map(|h| h.join().ok()).collect();

    let mut rep = Report {
        scenario: sc.name.clone(),
        description: sc.description.clone(),
        proves: sc.proves.clone(),
        limits: sc.limits.clone(),
        kernel_before: boots.first().cloned().unwrap_or_default(),
        kernel_after: boots.last().cloned().unwrap_or_default(),
        boots: boots.clone(),
        events,
        probes: probe_results,
        ..Default::default()
    };
    rep.upgrades = report::timelines(&rep.events, &boots);
    rep.set_floor(|_, _| None);
    rep.probe_blackout_ms = rep.probes.iter().map(|p| p.max_gap_ms).max();
    for w in &sc.workloads {
        rep.workloads.push(WorkloadPids {
            name: w.name.clone(),
            pid_before: pids_before.get(&w.name).copied(),
            pid_after: pids_after.get(&w.name).copied(),
        });
    }
    let outcome = Outcome {
        go_returned,
        restore_reports,
        guest_error,
        timed_out,
        stopped_by,
        done,
    };
    rep.checks = if bare {
        bare_checks(&rep, p, &chain, &outcome)
    } else {
        builtin_checks(&rep, sc, p, &chain, &outcome)
    };
    rep.checks.extend(checks);
    rep.faults = report::FaultResult::judge(&sc.fault_rows(), &rep.checks);
    let pass = rep.checks.iter().all(|c| c.ok) && !rep.checks.is_empty();
    rep.verdict = if pass { Verdict::Pass } else { Verdict::Fail };
    rep.artifacts = Artifacts {
        dir: run_dir.display().to_string(),
        serial_log: serial.display().to_string(),
        disk_image: None,
        guest_logs: None,
        timeline_svg: None,
    };
    if pass && !opts.keep {
        let _ = fs::remove_file(&disk);
        let _ = fs::remove_file(&plan_disk);
    } else {
        rep.artifacts.disk_image = Some(disk.display().to_string());
        let logs = run_dir.join("guest-logs");
        let root_fs = match sc.guest.flavour {
            Flavour::Appliance => disk.clone(),
            Flavour::Debian => debian::root_fs(&disk),
        };
        if copy_guest_logs(&root_fs, &logs).is_ok() {
            rep.artifacts.guest_logs = Some(logs.display().to_string());
        }
    }
    let _ = fs::remove_dir_all(run_dir.join("plan-files"));
    rep.wall_secs = started.elapsed().as_secs_f64();
    Ok(rep)
}

/// Creates the directory of a new run, `NAME-STAMP`, with a suffix if a
/// run of the same name started in the same second.
pub(crate) fn new_run_dir(runs: &Path, name: &str, stamp: u64) -> Result<PathBuf> {
    fs::create_dir_all(runs).with_context(|| format!("cannot create {}", runs.display()))?;
    let mut n = 1;
    loop {
        let dir = match n {
            1 => runs.join(format!("{name}-{stamp}")),
            _ => runs.join(format!("{name}-{stamp}-{n}")),
        };
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot create {}", dir.display()))
                )
            }
        }
    }
}

fn wait_exit(child: &Mutex<Child>, within: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Ok(Some(s)) = child.lock().ok()?.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut child = child.lock().ok()?;
    let _ = child.kill();
    child.wait().ok()
}

/// Copies kupgrade's and CRIU's logs out of the guest's root file system
/// with debugfs (no mount). A guest stopped hard leaves the last writes in
/// the ext4 journal (file sizes among them): the journal is replayed first,
/// on a copy, so that the kept disk stays as the guest left it.
fn copy_guest_logs(disk: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest)?;
    let replayed = dest.with_extension("replayed.img");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(disk)
        .arg(&replayed)
        .status()?;
    anyhow::ensure!(st.success(), "cannot copy {}", disk.display());
    // 0-3: clean or repaired; worse still leaves what it could read.
    let fsck = Command::new("e2fsck")
        .arg("-fy")
        .arg(&replayed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !fsck.as_ref().is_ok_and(|s| s.code().is_some_and(|c| c < 4)) {
        progress::step(&format!(
            "e2fsck on a copy of {} did not finish cleanly ({fsck:?}): the guest logs may be incomplete",
            disk.display()
        ));
    }
    for dir in ["/var/lib/kupgrade", "/var/log/kupgrade", "/var/log"] {
        let _ = Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump {dir} {}", dest.display()))
            .arg(&replayed)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let _ = fs::remove_file(&replayed);
    Ok(())
}

pub(crate) fn check(name: &str, ok: bool, detail: String) -> CheckResult {
    CheckResult {
        name: name.to_string(),
        ok,
        detail,
    }
}

/// What the guest said about the run as a whole.
struct Outcome {
    /// `kupgrade go` came back (no kexec): did it succeed, and its output.
    go_returned: Option<(bool, String)>,
    /// (outcome, reason) of `kupgrade report` after each kexec.
    restore_reports: Vec<(String, String)>,
    /// Why the guest's worker stopped, when it said.
    guest_error: Option<String>,
    timed_out: bool,
    /// The harness was stopped by this signal.
    stopped_by: Option<i32>,
    done: bool,
}

fn finished_in_time(sc: &Scenario, o: &Outcome) -> CheckResult {
    check(
        "guest finished in time",
        o.done && !o.timed_out && o.stopped_by.is_none(),
        if let Some(sig) = o.stopped_by {
            format!(
                "the harness was stopped by {}: QEMU was stopped, the serial log kept",
                stop::name(sig)
            )
        } else if o.timed_out {
            format!("deadline of {} s passed", sc.guest.timeout_secs)
        } else if o.done {
            "the guest ran the scenario to its end".into()
        } else if let Some(e) = &o.guest_error {
            format!("the guest stopped before its end: {e}")
        } else {
            "the guest stopped before its end (see the serial log)".into()
        },
    )
}

/// The floor's boot passes when it went through every kernel of the chain.
fn bare_checks(rep: &Report, p: &Prepared, chain: &[String], o: &Outcome) -> Vec<CheckResult> {
    let mut planned = vec![p.from.clone()];
    planned.extend(chain.iter().cloned());
    vec![
        finished_in_time(&p.scenario, o),
        check(
            "kernel release changed as planned",
            rep.boots == planned,
            format!("booted {:?}, planned {:?}", rep.boots, planned),
        ),
    ]
}

fn builtin_checks(
    rep: &Report,
    sc: &Scenario,
    p: &Prepared,
    chain: &[String],
    o: &Outcome,
) -> Vec<CheckResult> {
    let mut out = vec![finished_in_time(sc, o)];
    let mut planned = vec![p.from.clone()];
    planned.extend(chain.iter().cloned());
    let reset = !sc.upgrade.reset_on.is_empty();
    if reset {
        // The reset strikes before the last kernel's init, and boots
        // QEMU's -kernel again.
        planned.pop();
        planned.push(p.from.clone());
    }
    let kexec_planned = check(
        "kernel release changed as planned",
        rep.boots == planned,
        format!("booted {:?}, planned {:?}", rep.boots, planned),
    );
    let no_kexec = check(
        "no kexec happened",
        rep.boots.len() == 1,
        format!("booted {:?}", rep.boots),
    );
    let go_said = |want_ok: bool, want: &[String], what: &str| match &o.go_returned {
        Some((ok, d)) => check(
            what,
            *ok == want_ok && want.iter().all(|w| d.contains(w.as_str())),
            format!(
                "exit {}: {d} (expected to mention {want:?})",
                if *ok { "0" } else { "non-zero" }
            ),
        ),
        None => check(what, false, "kupgrade go never came back".into()),
    };
    let workloads_kept = rep.workloads.iter().map(|w| {
        let own_pidns = sc
            .workloads
            .iter()
            .any(|s| s.name == w.name && s.pid_namespace);
        if own_pidns {
            // Only the pids inside its namespace are kept; its checker says so.
            return check(
                &format!("workload {} alive in its cgroup", w.name),
                w.pid_after.is_some(),
                format!(
                    "pid {:?} before, {:?} after (outside its PID namespace)",
                    w.pid_before, w.pid_after
                ),
            );
        }
        check(
            &format!("workload {} kept its pid", w.name),
            w.pid_before.is_some() && w.pid_before == w.pid_after,
            format!("pid {:?} before, {:?} after", w.pid_before, w.pid_after),
        )
    });
    match sc.upgrade.expect {
        Expect::Success => {
            out.push(kexec_planned);
            if let Some((_, why)) = &o.go_returned {
                out.push(check("kupgrade go went through", false, why.clone()));
            }
            let restored = o
                .restore_reports
                .iter()
                .filter(|(r, _)| r == "restored")
                .count();
            out.push(check(
                "kupgrade report says restored after every upgrade",
                restored == chain.len() && o.restore_reports.len() == chain.len(),
                format!("{:?}", o.restore_reports),
            ));
            out.extend(workloads_kept);
        }
        Expect::Refused => {
            let want = &sc.upgrade.refusal_contains;
            out.push(go_said(false, want, "kupgrade go refused the upgrade"));
            out.push(no_kexec);
            out.extend(workloads_kept);
        }
        Expect::DryRun => {
            out.push(go_said(
                true,
                &["dry run done".to_string()],
                "kupgrade go --dry-run succeeded without a kexec",
            ));
            out.push(no_kexec);
            out.extend(workloads_kept);
        }
        Expect::RestoreFailed => {
            out.push(kexec_planned);
            let want = &sc.upgrade.refusal_contains;
            let last = o.restore_reports.last();
            // A restore cut short by a reset leaves its durable record.
            let outcome = if reset { "restoring" } else { "failed" };
            out.push(check(
                "kupgrade report says the restore failed, and why",
                last.is_some_and(|(r, why)| {
                    r == outcome && !why.is_empty() && want.iter().all(|w| why.contains(w.as_str()))
                }),
                format!("{last:?} (expected to mention {want:?})"),
            ));
        }
    }
    if sc.upgrade.expect != Expect::RestoreFailed {
        for pr in &rep.probes {
            out.push(check(
                &format!("probe {} kept one clean connection", pr.name),
                pr.clean(),
                format!(
                    "{} replies, longest gap {} ms, reset={} eof={} lost={} reordered={} wrong={}{}",
                    pr.replies,
                    pr.max_gap_ms,
                    pr.reset,
                    pr.eof,
                    pr.lost,
                    pr.reordered,
                    pr.wrong,
                    pr.error.as_ref().map(|e| format!(", {e}")).unwrap_or_default()
                ),
            ));
        }
    }
    if sc.probes.len() != rep.probes.len() {
        out.push(check(
            "probes started",
            false,
            "the guest never said it was ready".into(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn debugfs(img: &Path, cmd: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", cmd])
            .arg(img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The guest's last write to a log sits in the ext4 journal only (as
    /// when QEMU is stopped before the guest's journal is checkpointed):
    /// the copied log has it, and the kept disk is not changed.
    #[test]
    fn guest_logs_are_read_after_replaying_the_journal_on_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("var/log/kupgrade")).unwrap();
        fs::write(tree.join("var/log/kupgrade/agent.log"), "old line\n").unwrap();
        let img = dir.path().join("disk.img");
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "1024", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg("16M")
            .status()
            .unwrap();
        assert!(st.success());
        let block = debugfs(&img, "bmap /var/log/kupgrade/agent.log 0");
        let block = block.trim();
        assert!(block.parse::<u64>().is_ok(), "{block:?}");
        // A transaction rewriting the log's block, written to the journal
        // and not replayed.
        let mut content = b"new line\n".to_vec();
        content.resize(1024, 0);
        fs::write(dir.path().join("block"), &content).unwrap();
        // debugfs -R takes one command: write them through -f.
        let cmds = dir.path().join("cmds");
        fs::write(
            &cmds,
            format!(
                "jo\njw -b {block} {}\njc\n",
                dir.path().join("block").display()
            ),
        )
        .unwrap();
        let st = Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(&img)
            .output()
            .unwrap();
        assert!(st.status.success());
        assert_eq!(
            debugfs(&img, "cat /var/log/kupgrade/agent.log"),
            "old line\n"
        );

        let logs = dir.path().join("guest-logs");
        copy_guest_logs(&img, &logs).unwrap();
        assert_eq!(
            fs::read_to_string(logs.join("kupgrade/agent.log")).unwrap(),
            "new line\n"
        );
        assert_eq!(
            debugfs(&img, "cat /var/log/kupgrade/agent.log"),
            "old line\n",
            "the kept disk was changed"
        );
        assert!(!logs.with_extension("replayed.img").exists());
    }

    /// A reset during the restore (before the new kernel's init said it
    /// booted) boots QEMU's -kernel again and leaves the
    /// restore's record: both are what a reset scenario must see, and a
    /// record taken for a failure (or no third boot) fails it.
    #[test]
    fn a_reset_scenario_expects_the_first_kernel_again_and_the_record() {
        let scenario = Scenario::parse(
            "name = \"r\"\n[upgrade]\nexpect = \"restore-failed\"\nreset_on = \"event=net-restored\"\n\
             refusal_contains = [\"began but never ended\"]\n",
        )
        .unwrap();
        scenario.validate().unwrap();
        let p = Prepared {
            scenario: scenario.clone(),
            from: "a".into(),
            to: "b".into(),
            bin_dir: "/".into(),
            rootfs: "/".into(),
            kernel: "/".into(),
            initrd: "/".into(),
        };
        let judged = |boots: &[&str], outcome: &str| {
            let rep = Report {
                boots: boots.iter().map(|b| b.to_string()).collect(),
                ..Default::default()
            };
            let o = Outcome {
                go_returned: None,
                restore_reports: vec![(
                    outcome.into(),
                    "the restore of generation 1 began but never ended".into(),
                )],
                guest_error: None,
                timed_out: false,
                stopped_by: None,
                done: true,
            };
            builtin_checks(&rep, &scenario, &p, &["b".into()], &o)
                .iter()
                .all(|c| c.ok)
        };
        assert!(judged(&["a", "a"], "restoring"));
        assert!(!judged(&["a", "b"], "restoring"), "no reset boot");
        assert!(!judged(&["a", "a"], "failed"), "not the record");
    }

    #[test]
    fn runs_started_in_the_same_second_get_their_own_directories() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let a = new_run_dir(&runs, "counter", 7).unwrap();
        let b = new_run_dir(&runs, "counter", 7).unwrap();
        let c = new_run_dir(&runs, "counter-floor", 7).unwrap();
        assert_eq!(a, runs.join("counter-7"));
        assert_eq!(b, runs.join("counter-7-2"));
        assert_eq!(c, runs.join("counter-floor-7"));
        assert!(a.is_dir() && b.is_dir() && c.is_dir());
    }

    /// A port the kernel offers again (its listener closed) is not handed
    /// to a second guest.
    #[test]
    fn a_host_port_is_handed_out_once() {
        let mut issued = BTreeSet::new();
        let mut offered = [5000, 5000, 5001, 5000, 5001, 5002].into_iter();
        let mut next = || Ok(offered.next().unwrap());
        assert_eq!(unique_port(&mut issued, &mut next).unwrap(), 5000);
        assert_eq!(unique_port(&mut issued, &mut next).unwrap(), 5001);
        assert_eq!(unique_port(&mut issued, &mut next).unwrap(), 5002);
        let mut always_taken = || Ok(5000);
        assert!(unique_port(&mut issued, &mut always_taken).is_err());
    }

    /// A guest that never comes up is stopped by the deadline, the run fails
    /// with that reason, and the serial log is kept.
    #[test]
    fn a_hung_guest_is_stopped_by_the_deadline_and_its_log_kept() {
        let dir = tempfile::tempdir().unwrap();
        let fake_qemu = dir.path().join("qemu");
        fs::write(
            &fake_qemu,
            "#!/bin/sh\necho 'early boot line'\nexec sleep 600\n",
        )
        .unwrap();
        fs::set_permissions(&fake_qemu, fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["root.img", "initrd.img"] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        let mut scenario = Scenario::parse(
            "name = \"hang\"\n[[workload]]\nname = \"w\"\ncommand = [\"/bin/true\"]\n",
        )
        .unwrap();
        scenario.guest.timeout_secs = 2;
        let p = Prepared {
            scenario,
            from: "a".into(),
            to: "b".into(),
            bin_dir: dir.path().into(),
            rootfs: dir.path().join("root.img"),
            kernel: dir.path().join("vmlinuz"),
            initrd: dir.path().join("initrd.img"),
        };
        let opts = Options {
            cache: dir.path().join("cache"),
            workspace: dir.path().into(),
            bin_dir: None,
            accel: "tcg".into(),
            qemu: fake_qemu.display().to_string(),
            keep: false,
            verbose: false,
        };
        let t0 = Instant::now();
        let rep = run_prepared(&p, dir.path(), &opts).unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the deadline did not stop it"
        );
        assert_eq!(rep.verdict, Verdict::Fail);
        let c = rep
            .checks
            .iter()
            .find(|c| c.name == "guest finished in time")
            .unwrap();
        assert!(!c.ok && c.detail.contains("deadline"), "{c:?}");
        let log = fs::read_to_string(&rep.artifacts.serial_log).unwrap();
        assert!(log.contains("early boot line"), "{log}");
        assert!(
            rep.artifacts.disk_image.is_some(),
            "a failed run keeps its disk"
        );
    }
}
