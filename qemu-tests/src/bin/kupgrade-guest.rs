//! The guest side of the harness, run as the real init (`/sbin/init`) of the
//! appliance. As PID 1 it only mounts, reaps and powers off; the scenario is
//! run by a worker (itself, started with `worker`) that launches the
//! workloads, drives `kupgrade stage` and `kupgrade go`, and after each kexec
//! checks and reports on the serial console, one `kupgrade-vm:` line a fact.
//! On the Debian guest systemd is PID 1 and runs the worker alone, as the
//! unit `qemu-tests/guest/debian/kupgrade-guest.service`.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use contract::events::{Event, EventLine};
use contract::report::{Outcome, UpgradeReport};
use image_format::Image;
use kupgrade_vm::guest::{self, Line, Plan, Progress, Verb};
use kupgrade_vm::scenario::{Attempt, AttemptExpect, Check, Workload};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn say(line: Line) {
    println!("{}", line.render());
}

fn info(msg: &str) {
    say(Line::new(Verb::Info).with("detail", msg));
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        let code = match worker() {
            Ok(()) => 0,
            Err(e) => {
                say(Line::new(Verb::Error).with("detail", format!("{e:#}")));
                1
            }
        };
        std::process::exit(code);
    }
    if std::process::id() != 1 {
        eprintln!("kupgrade-guest is the init of the kupgrade-vm appliance; run `kupgrade-guest worker` to test it");
        std::process::exit(2);
    }
    supervise();
}

/// PID 1: set up mounts, start the worker, reap every child (restored
/// workloads are re-parented here), power off when the worker is done.
fn supervise() -> ! {
    mount_basics();
    let worker = Command::new("/proc/self/exe")
        .arg("worker")
        .env("PATH", PATH)
        .spawn();
    let worker_pid = match worker {
        Ok(c) => c.id() as i32,
        Err(e) => {
            say(Line::new(Verb::Error).with("detail", format!("cannot start the worker: {e}")));
            power_off();
        }
    };
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _))
                if pid.as_raw() == worker_pid =>
            {
                break
            }
            Ok(_) => {}
            Err(nix::Error::ECHILD) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => {}
        }
    }
    power_off();
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// What a distribution's init would mount early; skipped where already there
/// (after a restore, kupgrade-init has mounted some of them).
fn mount_basics() {
    let mounted = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let has = |p: &str| {
        mounted
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(p))
    };
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT,
        None::<&str>,
    );
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // Device nodes live on these: nodev would make opening them EACCES.
    let dev = MsFlags::MS_NOSUID;
    for (fstype, target, data, flags) in [
        ("proc", "/proc", None, nodev),
        ("sysfs", "/sys", None, nodev),
        ("devtmpfs", "/dev", None, dev),
        ("tmpfs", "/run", Some("mode=0755"), nodev),
        ("tmpfs", "/dev/shm", Some("mode=1777"), nodev),
        ("tmpfs", "/tmp", Some("mode=1777"), nodev),
        (
            "devpts",
            "/dev/pts",
            Some("gid=5,mode=620,ptmxmode=666"),
            dev | MsFlags::MS_NOEXEC,
        ),
        ("cgroup2", "/sys/fs/cgroup", None, nodev),
    ] {
        if !has(target) {
            let _ = fs::create_dir_all(target);
            if let Err(e) = mount(Some(fstype), target, Some(fstype), flags, data) {
                eprintln!("kupgrade-guest: cannot mount {fstype} on {target}: {e}");
            }
        }
    }
    // devtmpfs may lack the multiplexer node; CRIU's checks open it.
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
}

fn release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sh(args: &[&str]) -> (bool, String) {
    sh_env(args, &[])
}

/// Runs a command with extra `KEY=VALUE` environment; (success, output).
fn sh_env(args: &[&str], env: &[String]) -> (bool, String) {
    let vars = env.iter().filter_map(|e| e.split_once('='));
    match Command::new(args[0])
        .args(&args[1..])
        .env("PATH", PATH)
        .envs(vars)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            (o.status.success(), text.trim().to_string())
        }
        Err(e) => (false, format!("cannot run {}: {e}", args[0])),
    }
}

fn read_plan() -> Result<(Plan, Image<fs::File>)> {
    let dev = fs::File::open(guest::PLAN_DEVICE)
        .with_context(|| format!("no plan disk at {}", guest::PLAN_DEVICE))?;
    let mut img = Image::open(dev).context("the plan disk holds no readable plan")?;
    let plan = serde_json::from_slice(&img.read_blob(guest::PLAN_SECTION)?)?;
    Ok((plan, img))
}

fn load_progress() -> Progress {
    fs::read(guest::STATE_FILE)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_progress(p: &Progress) -> Result<()> {
    fs::create_dir_all(Path::new(guest::STATE_FILE).parent().context("state dir")?)?;
    fs::write(guest::STATE_FILE, serde_json::to_vec(p)?)?;
    nix::unistd::sync();
    Ok(())
}

/// First boot only: the appliance's network, as a distribution would set it.
fn configure_network() {
    let (_, addrs) = sh(&["ip", "-4", "addr", "show", "dev", "eth0"]);
    if addrs.contains("10.0.2.15") {
        return;
    }
    for cmd in [
        &["ip", "link", "set", "lo", "up"][..],
        &["ip", "link", "set", "eth0", "up"],
        &["ip", "addr", "add", "10.0.2.15/24", "dev", "eth0"],
        &["ip", "route", "add", "default", "via", "10.0.2.2"],
    ] {
        let (ok, out) = sh(cmd);
        if !ok {
            info(&format!("{}: {out}", cmd.join(" ")));
        }
    }
}

fn worker() -> Result<()> {
    let mut progress = load_progress();
    say(Line::new(Verb::Boot)
        .with("n", progress.upgrades_done)
        .with("kernel", release()));
    let (plan, mut img) = read_plan()?;
    if !plan.host.is_empty() {
        // Single-threaded still: nothing reads the environment meanwhile.
        std::env::set_var(guest::HOST_VAR, &plan.host);
    }
    configure_network();
    if plan.bare_kexec {
        return bare_kexec(&plan, &mut progress);
    }
    let first_boot = progress.upgrades_done == 0 && progress.pids.is_empty();
    if first_boot {
        let plan_prelude = shell_prelude();
        img.extract_tree(guest::FILES_SECTION, Path::new("/"))
            .context("cannot unpack the scenario's files")?;
        for (i, step) in plan.setup.iter().enumerate() {
            let what = if step.name.is_empty() {
                format!("setup step {}", i + 1)
            } else {
                format!("setup step {:?}", step.name)
            };
            let argv = step.argv(&plan_prelude);
            let args: Vec<&str> = argv.iter().map(String::as_str).collect();
            let (ok, out) = sh(&args);
            anyhow::ensure!(ok, "{what} failed: {out}");
            info(&format!("{what} done"));
        }
        for cmd in &plan.background {
            // Not preserved: an ordinary process of the old system.
            let child = Command::new(&cmd[0])
                .args(&cmd[1..])
                .env("PATH", PATH)
                .stdin(Stdio::null())
                .spawn();
            if let Err(e) = child {
                anyhow::bail!("cannot start background {cmd:?}: {e}");
            }
        }
        for w in &plan.workloads {
            if w.declared {
                let pid = start_declared(w)?;
                let pid = daemon_pid(w, pid)?;
                say(Line::new(Verb::Workload)
                    .with("name", &w.name)
                    .with("pid", pid));
                progress.pids.push((w.name.clone(), pid));
                wait_ready(w, &plan_prelude)?;
                continue;
            }
            let mut args = vec!["kupgrade", "launch", w.name.as_str()];
            if w.pid_namespace {
                args.push("--pid-namespace");
            }
            if w.ipc_namespace {
                args.push("--ipc-namespace");
            }
            args.push("--");
            args.extend(w.command.iter().map(String::as_str));
            let (ok, out) = sh(&args);
            anyhow::ensure!(ok, "kupgrade launch {} failed: {out}", w.name);
            let pid: i32 = out
                .lines()
                .find_map(|l| l.strip_prefix("pid "))
                .and_then(|p| p.trim().parse().ok())
                .with_context(|| format!("kupgrade launch printed no pid: {out}"))?;
            let pid = daemon_pid(w, pid)?;
            say(Line::new(Verb::Workload)
                .with("name", &w.name)
                .with("pid", pid));
            progress.pids.push((w.name.clone(), pid));
            wait_ready(w, &plan_prelude)?;
        }
        save_progress(&progress)?;
        say(Line::new(Verb::Ready));
        let start = Instant::now();
        for port in &plan.probe_ports {
            while !guest::tcp_port_in_state(Path::new("/proc/net"), *port, guest::TCP_ESTABLISHED) {
                anyhow::ensure!(
                    start.elapsed() < Duration::from_secs(90),
                    "no probe connected to port {port}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let warmup = plan
            .workloads
            .iter()
            .map(|w| w.warmup_secs)
            .max()
            .unwrap_or(0);
        std::thread::sleep(Duration::from_secs(plan.settle_secs + warmup));
    } else {
        if plan.external_upgrade {
            // Another boot of a guest upgraded from outside: a kexec of it.
            progress.upgrades_done += 1;
            save_progress(&progress)?;
        }
        report_last_upgrade();
        std::thread::sleep(Duration::from_secs(plan.settle_secs));
    }
    if plan.external_upgrade {
        wait_for_the_roll()?;
        finish(&plan, &progress);
        return Ok(());
    }

    if progress.upgrades_done < plan.chain.len() {
        let target = plan.chain[progress.upgrades_done].clone();
        // What a user would look at first; not a gate (criu check may
        // complain about things these workloads do not use).
        for cmd in [&["kupgrade", "check"][..], &["kupgrade", "status"]] {
            for l in sh(cmd).1.lines() {
                info(l);
            }
        }
        let kernel = format!("/boot/vmlinuz-{target}");
        let mut stage = vec!["kupgrade", "stage", kernel.as_str()];
        if !plan.stage_append.is_empty() {
            stage.extend(["--append", plan.stage_append.as_str()]);
        }
        let (ok, out) = sh(&stage);
        for l in out.lines() {
            info(l);
        }
        anyhow::ensure!(ok, "kupgrade stage failed: {out}");
        if progress.upgrades_done == 0 {
            run_attempts(&plan, &stage)?;
        }
        progress.upgrades_done += 1;
        save_progress(&progress)?;
        say(Line::new(Verb::Go)
            .with("n", progress.upgrades_done)
            .with("target", &target));
        let mut args = vec!["kupgrade", "go"];
        args.extend(plan.go_args.iter().map(String::as_str));
        let (ok, out) = sh_env(&args, &plan.go_env);
        // Only returns when the upgrade did not happen.
        progress.upgrades_done -= 1;
        save_progress(&progress)?;
        say(Line::new(Verb::GoReturned)
            .with("ok", ok)
            .with("detail", &out));
    }
    finish(&plan, &progress);
    Ok(())
}

/// Says the workloads run (a file the fleet's host looks for over ssh), then
/// waits for the host to say that the roll has ended: it may kexec this
/// guest meanwhile, and the next boot's worker waits again.
fn wait_for_the_roll() -> Result<()> {
    let ready = Path::new(guest::FLEET_READY);
    fs::create_dir_all(ready.parent().context("ready file")?)?;
    fs::write(ready, release())?;
    info("workloads running: waiting for the fleet's roll to end");
    while !Path::new(guest::FLEET_DONE).exists() {
        std::thread::sleep(Duration::from_millis(500));
    }
    info("the roll has ended");
    Ok(())
}

/// The scenario's failing `kupgrade go` runs, in turn: each one's end and
/// its checks, then one check line judging it as a whole (its fault row).
/// `stage` stages the kernel again when an attempt unloaded it.
fn run_attempts(plan: &Plan, stage: &[&str]) -> Result<()> {
    let prelude = shell_prelude();
    for (i, a) in plan.attempts.iter().enumerate() {
        let name = a.check_name(i);
        if fs::read_to_string("/sys/kernel/kexec_loaded").is_ok_and(|t| t.trim() == "0") {
            let (ok, out) = sh(stage);
            anyhow::ensure!(ok, "kupgrade stage again before {name} failed: {out}");
        }
        info(&format!("{name}: kupgrade go with {}", a.go_env.join(" ")));
        let (ended_ok, ended) = attempt_go(a);
        say(Line::new(Verb::Check)
            .with("name", format!("{name}: kupgrade go {}", attempt_end(a)))
            .with("ok", ended_ok)
            .with("detail", &ended));
        let mut failed = Vec::new();
        if !ended_ok {
            failed.push(format!("kupgrade go {}", attempt_end(a)));
        }
        for c in a.checks.iter() {
            let Some(check) = plan.checks.iter().find(|k| &k.name == c) else {
                failed.push(format!("{c} (no such check)"));
                continue;
            };
            std::thread::sleep(Duration::from_secs(check.after_secs));
            let argv = check.argv(&prelude);
            let args: Vec<&str> = argv.iter().map(String::as_str).collect();
            let (ok, out) = sh(&args);
            if !ok {
                failed.push(c.clone());
            }
            say(Line::new(Verb::Check)
                .with("name", format!("{name}: {c}"))
                .with("ok", ok)
                .with("detail", &out));
        }
        // What go said of its end (and the resume after a killed one).
        let said = match a.expect {
            AttemptExpect::Refused => ended
                .lines()
                .find(|l| l.starts_with("kupgrade: upgrade aborted at"))
                .unwrap_or("")
                .to_string(),
            AttemptExpect::Killed => {
                let resume = ended.split("kupgrade resume:").nth(1).unwrap_or("");
                format!(
                    "{}; kupgrade resume: {}",
                    ended.split(": kupgrade").next().unwrap_or(""),
                    resume
                        .lines()
                        .find(|l| l.contains("resume"))
                        .unwrap_or("")
                        .trim()
                )
            }
        };
        let verdict = if failed.is_empty() {
            format!("{} checks passed", a.checks.len())
        } else {
            format!("FAILED: {}", failed.join("; "))
        };
        say(Line::new(Verb::Check)
            .with("name", &name)
            .with("ok", failed.is_empty())
            .with("detail", format!("{said} | {verdict}")));
    }
    Ok(())
}

fn attempt_end(a: &Attempt) -> &'static str {
    match a.expect {
        AttemptExpect::Refused => "refused, undoing everything",
        AttemptExpect::Killed => "killed, then kupgrade resume succeeded",
    }
}

/// Runs an attempt's `kupgrade go` (and `kupgrade resume` after one that
/// must be killed): whether it ended as expected, and what it said.
fn attempt_go(a: &Attempt) -> (bool, String) {
    use std::io::BufRead;
    let err_path = "/tmp/kupgrade-vm-attempt.err";
    let Ok(err_file) = fs::File::create(err_path) else {
        return (false, format!("cannot create {err_path}"));
    };
    let vars = a.go_env.iter().filter_map(|e| e.split_once('='));
    let child = Command::new("kupgrade")
        .arg("go")
        .args(&a.go_args)
        .env("PATH", PATH)
        .envs(vars)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err_file)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run kupgrade go: {e}")),
    };
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            out.push_str(&line);
            line.clear();
            // Dropping the reader closes the pipe: its next writes fail.
            if a.close_stdout {
                break;
            }
        }
    }
    let status = child.wait();
    out.push_str(&fs::read_to_string(err_path).unwrap_or_default());
    let Ok(status) = status else {
        return (false, format!("cannot wait for kupgrade go: {out}"));
    };
    let panicked = out.contains("panicked");
    match a.expect {
        AttemptExpect::Refused => {
            let exited = status.code().is_some_and(|c| c != 0);
            let missing: Vec<&String> = a
                .refusal_contains
                .iter()
                .filter(|w| !out.contains(w.as_str()))
                .collect();
            let ok = exited && missing.is_empty() && !panicked;
            (
                ok,
                format!(
                    "{status}, expected to mention {:?}: {out}",
                    a.refusal_contains
                ),
            )
        }
        AttemptExpect::Killed => {
            use std::os::unix::process::ExitStatusExt;
            let killed = status.signal().is_some();
            let (resumed, said) = sh(&["kupgrade", "resume"]);
            (
                killed && resumed && !panicked,
                format!("kupgrade go: {status}: {out}\nkupgrade resume: {said}"),
            )
        }
    }
}

/// The floor of the blackout: kexec into the next kernel of the chain with
/// no workloads, as `kupgrade go` would at its end (staged by `kupgrade
/// stage`, the same event, sync and read-only root, the same reboot call),
/// so that the host times the reboot alone.
fn bare_kexec(plan: &Plan, progress: &mut Progress) -> Result<()> {
    let Some(target) = plan.chain.get(progress.upgrades_done).cloned() else {
        say(Line::new(Verb::ChecksDone));
        say(Line::new(Verb::Done));
        return Ok(());
    };
    let (ok, out) = sh(&["kupgrade", "stage", &format!("/boot/vmlinuz-{target}")]);
    anyhow::ensure!(ok, "kupgrade stage failed: {out}");
    progress.upgrades_done += 1;
    save_progress(progress)?;
    info(&format!("bare kexec into {target}"));
    println!("{}", EventLine::now(Event::Kexec).with("to", &target));
    // The host must see the line before the old kernel goes.
    let _ = nix::sys::termios::tcdrain(std::io::stdout());
    nix::unistd::sync();
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    match kexec::reboot_into_loaded() {
        Ok(never) => match never {},
        Err(e) => anyhow::bail!("the bare kexec into {target} failed: {e}"),
    }
}

/// Shell functions that make a scenario's `shell` lines run the programs
/// PATH finds (a package's `ps`) rather than busybox's applets.
fn shell_prelude() -> String {
    let (_, list) = sh(&["busybox", "--list"]);
    let applets: Vec<&str> = list.lines().map(str::trim).collect();
    let dirs: Vec<&Path> = PATH.split(':').map(Path::new).collect();
    guest::path_programs_prelude(&applets, &dirs, Path::new("/usr/bin/busybox"))
}

/// The cgroup a workload runs in.
fn workload_cgroup(w: &Workload) -> String {
    if w.declared {
        service_cgroup(&w.name)
    } else {
        launched_cgroup(&w.name)
    }
}

/// The cgroup `kupgrade launch` gives a workload: its transient unit's on
/// systemd, else its own below /sys/fs/cgroup/kupgrade.
fn launched_cgroup(name: &str) -> String {
    if Path::new("/run/systemd/system").is_dir() {
        service_cgroup(&format!("kupgrade-{name}"))
    } else {
        format!("/sys/fs/cgroup/kupgrade/{name}")
    }
}

/// Where a workload's output goes: a file, or on systemd the journal of
/// `kupgrade launch`'s unit.
fn workload_log(w: &Workload) -> String {
    if w.declared {
        format!("/var/log/{}.out", w.name)
    } else if Path::new("/run/systemd/system").is_dir() {
        format!("journalctl -u kupgrade-{}.service", w.name)
    } else {
        format!("{}/workloads/{}.log", contract::report::DIR, w.name)
    }
}

/// Waits until the workload's `ready` conditions all hold. Fails at the
/// deadline, or at once when the workload has exited, with what did not
/// hold and the end of its output.
fn wait_ready(w: &Workload, prelude: &str) -> Result<()> {
    let Some(r) = &w.ready else {
        return Ok(());
    };
    let start = Instant::now();
    let argv = r.argv(prelude);
    loop {
        let mut missing = Vec::new();
        if let Some(port) = r.port {
            if !guest::tcp_port_in_state(Path::new("/proc/net"), port, guest::TCP_LISTEN) {
                missing.push(format!("nothing listens on TCP port {port}"));
            }
        }
        if let Some(f) = &r.file {
            if !f.exists() {
                missing.push(format!("{} does not exist", f.display()));
            }
        }
        // The cheap conditions first: the command may talk to the workload.
        if let (Some(argv), true) = (&argv, missing.is_empty()) {
            let args: Vec<&str> = argv.iter().map(String::as_str).collect();
            let (ok, out) = sh(&args);
            if !ok {
                missing.push(format!("{argv:?} failed: {out}"));
            }
        }
        if missing.is_empty() {
            info(&format!(
                "workload {} ready after {:.1} s",
                w.name,
                start.elapsed().as_secs_f64()
            ));
            return Ok(());
        }
        let procs =
            fs::read_to_string(format!("{}/cgroup.procs", workload_cgroup(w))).unwrap_or_default();
        let gone = procs.trim().is_empty();
        if gone || start.elapsed() >= Duration::from_secs(r.timeout_secs) {
            let log = workload_log(w);
            let text = match log.strip_prefix("journalctl -u ") {
                Some(unit) => sh(&["journalctl", "-b", "-q", "-o", "cat", "-u", unit]).1,
                None => fs::read_to_string(&log).unwrap_or_default(),
            };
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!(
                "workload {} {}: {}; the end of {log}: {}",
                w.name,
                if gone {
                    "exited before it was ready".to_string()
                } else {
                    format!("not ready after {} s", r.timeout_secs)
                },
                missing.join("; "),
                tail.join(" | ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Cgroup of a workload started the way a service manager would.
fn service_cgroup(name: &str) -> String {
    format!("/sys/fs/cgroup/system.slice/{name}.service")
}

/// The pid a workload with a pid file keeps (the daemon its started process
/// forked), else `started`.
fn daemon_pid(w: &kupgrade_vm::scenario::Workload, started: i32) -> Result<i32> {
    let Some(file) = &w.pid_file else {
        return Ok(started);
    };
    let start = Instant::now();
    loop {
        let pid = fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(p) = pid.filter(|p| Path::new(&format!("/proc/{p}")).exists()) {
            return Ok(p);
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "workload {}: {} names no running process",
            w.name,
            file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a workload as a service manager would (its own cgroup, not
/// kupgrade's) and declares that cgroup in /etc/kupgrade/config.toml.
fn start_declared(w: &Workload) -> Result<i32> {
    let cg = service_cgroup(&w.name);
    fs::create_dir_all(&cg)?;
    // A long-running system hands out high pids; early boot of the next
    // kernel takes the low ones.
    let _ = fs::write("/proc/sys/kernel/ns_last_pid", "20000");
    let log = fs::File::create(format!("/var/log/{}.out", w.name))?;
    // In its cgroup before the command runs (a daemon forks at once), then
    // in its own session, as a service manager gives it (busybox setsid
    // execs without forking: the shell is not a group leader).
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {cg}/cgroup.procs && exec setsid \"$@\""))
        .arg("sh")
        .args(&w.command)
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {:?}", w.command))?;
    let pid = child.id() as i32;
    let mut cfg = fs::OpenOptions::new()
        .append(true)
        .open("/etc/kupgrade/config.toml")?;
    use std::io::Write as _;
    writeln!(
        cfg,
        "\n[[workload]]\nname = \"{}\"\ncgroup = \"system.slice/{}.service\"",
        w.name, w.name
    )?;
    if !w.runtime_paths.is_empty() {
        let paths: Vec<String> = w
            .runtime_paths
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        writeln!(cfg, "runtime_paths = [{}]", paths.join(", "))?;
    }
    Ok(pid)
}

/// Tells the host what `kupgrade report` says of the upgrade just done.
fn report_last_upgrade() {
    let (_, text) = sh(&["kupgrade", "report"]);
    for l in text.lines() {
        info(l);
    }
    // The picture a user draws on a real machine, from the guest's clocks.
    let svg = "/var/lib/kupgrade-vm/timeline.svg";
    let (_, out) = sh(&["kupgrade", "report", "--svg", svg]);
    match fs::read_to_string(svg) {
        Ok(t) => info(&format!(
            "kupgrade report --svg drew {} phases into {svg}",
            t.matches("class=\"phase\"").count()
        )),
        Err(e) => info(&format!("kupgrade report --svg wrote nothing ({e}): {out}")),
    }
    let path = Path::new(contract::report::DIR).join(contract::report::FILE);
    let line = match fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<UpgradeReport>(&b).ok())
    {
        Some(r) => Line::new(Verb::Report)
            .with(
                "outcome",
                match r.outcome {
                    Outcome::Restored => "restored",
                    // The durable record of a restore that never ended.
                    Outcome::Restoring => "restoring",
                    Outcome::Failed => "failed",
                },
            )
            .with(
                "detail",
                // A record has no reason yet: what `kupgrade report` makes of it.
                r.reason.unwrap_or_else(|| {
                    text.lines()
                        .find_map(|l| l.trim().strip_prefix("WARNING: "))
                        .unwrap_or_default()
                        .to_string()
                }),
            ),
        None => Line::new(Verb::Report)
            .with("outcome", "none")
            .with("detail", format!("no {}", path.display())),
    };
    say(line);
}

/// Checks after the last upgrade (or after a refused one), then the end.
fn finish(plan: &Plan, progress: &Progress) {
    std::thread::sleep(Duration::from_secs(plan.alive_secs));
    for (name, pid) in &progress.pids {
        // The host judges: a workload not reported here is gone. In its own
        // PID namespace only the pids inside are kept (its checker proves
        // them); outside, it is found by its cgroup.
        let declared = plan.workloads.iter().any(|w| &w.name == name && w.declared);
        let cg = if declared {
            service_cgroup(name)
        } else {
            launched_cgroup(name)
        };
        let procs = fs::read_to_string(format!("{cg}/cgroup.procs")).unwrap_or_default();
        let procs: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let in_own_pidns = plan
            .workloads
            .iter()
            .any(|w| &w.name == name && w.pid_namespace);
        let now = if procs.contains(pid) {
            Some(*pid)
        } else {
            procs.first().copied().filter(|_| in_own_pidns)
        };
        if let Some(now) = now {
            say(Line::new(Verb::WorkloadAfter)
                .with("name", name)
                .with("pid", now));
        }
    }
    let (before, after): (Vec<_>, Vec<_>) = plan.checks.iter().partition(|c| !c.after_probes);
    before.into_iter().for_each(run_check);
    // The host stops its probes at this line.
    say(Line::new(Verb::ChecksDone));
    std::thread::sleep(Duration::from_secs(if after.is_empty() { 1 } else { 2 }));
    if !after.is_empty() {
        after.into_iter().for_each(run_check);
        std::thread::sleep(Duration::from_secs(1));
    }
    say(Line::new(Verb::Done));
}

fn run_check(c: &Check) {
    std::thread::sleep(Duration::from_secs(c.after_secs));
    let argv = c.argv(&shell_prelude());
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (ok, out) = sh(&args);
    say(Line::new(Verb::Check)
        .with("name", &c.name)
        .with("ok", ok)
        .with("detail", &out));
}
