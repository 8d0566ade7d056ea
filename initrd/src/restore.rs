//! The restore path: runs in the real root (after the switch), as PID 1,
//! before the real init. Every failure here is reported and the boot goes on.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use contract::devstate::{self, DeviceState, Family};
use contract::events::{Event, EventLine};
use contract::report::{self, Outcome, UpgradeReport, WorkloadOutcome};
use contract::PhaseTiming;
use image_format::{Image, Manifest, State};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::{info, log};

/// Private tmpfs the CRIU images are unpacked into (inside the real root, so
/// CRIU runs in the same file tree as at dump time).
const UNPACK_DIR: &str = "/run/kupgrade-restore";
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Why nothing was restored and the boot just goes on.
#[derive(Debug)]
pub enum Skip {
    /// No image in the store (bad magic): a plain boot with `kupgrade.resume`.
    NoImage(String),
    /// An image that was already restored, or failed, or is mid-restore from
    /// a boot that crashed: never restore twice.
    AlreadyUsed(State),
}

pub enum Restore {
    Skipped(Skip),
    Done(Box<UpgradeReport>),
}

/// Waits for the store to appear: `/dev/pmemN` shows up once nd_pmem probes.
fn open_store(path: &Path) -> std::io::Result<File> {
    let start = Instant::now();
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => return Ok(f),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && start.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn run(store_path: &Path, init_events: &mut Vec<PhaseTiming>) -> Restore {
    let mut store = match open_store(store_path) {
        Ok(f) => f,
        Err(e) => {
            return Restore::Skipped(Skip::NoImage(format!(
                "cannot open store {}: {e}",
                store_path.display()
            )))
        }
    };
    // One handle reads the image, the other changes its state.
    let opened = store
        .try_clone()
        .map_err(|e| e.to_string())
        .and_then(|f| Image::open(f).map_err(|e| e.to_string()));
    let image = match opened {
        Ok(i) => i,
        Err(e) => return Restore::Skipped(Skip::NoImage(e)),
    };
    let state = image.superblock().state;
    if state != State::Written {
        return Restore::Skipped(Skip::AlreadyUsed(state));
    }
    // From here on the image is ours: mark it first, so that a crash during
    // the restore can never lead to a second restore of the same image.
    if let Err(e) = image_format::set_state(&mut store, State::Restoring) {
        return Restore::Skipped(Skip::NoImage(format!(
            "cannot mark the image restoring: {e}"
        )));
    }
    let manifest = image.manifest().clone();
    let generation = image.superblock().generation;
    let mut r = Restorer {
        image,
        manifest,
        events: std::mem::take(init_events),
        lock_tables: vec![],
    };
    let (outcome, reason, workloads) = r.restore();
    let final_state = if outcome == Outcome::Restored {
        State::Restored
    } else {
        State::Failed
    };
    if let Err(e) = image_format::set_state(&mut store, final_state) {
        info!("cannot mark the image {final_state}: {e}");
    }
    if outcome == Outcome::Restored {
        // The image holds process memory: do not leave it lying in RAM.
        if let Err(e) = image_format::wipe(&mut store) {
            info!("cannot wipe the image: {e}");
        }
    }
    let end = log::event(match &reason {
        None => EventLine::now(Event::Restored).with("workloads", workloads.len()),
        Some(why) => EventLine::now(Event::RestoreFailed).with("reason", why),
    });
    r.events.push(PhaseTiming::from(&end));
    let mut events: Vec<PhaseTiming> = r.manifest.phases.clone();
    events.extend(r.events);
    let report = UpgradeReport {
        outcome,
        reason,
        kernel_from: r.manifest.kernel_from.clone(),
        kernel_to: r.manifest.kernel_to.clone(),
        image_generation: generation,
        workloads,
        events,
    };
    write_report(&report);
    Restore::Done(Box::new(report))
}

fn write_report(report: &UpgradeReport) {
    let dir = Path::new(report::DIR);
    let _ = fs::create_dir_all(dir);
    let path = dir.join(report::FILE);
    match serde_json::to_vec_pretty(report) {
        Ok(json) => {
            if let Err(e) = fs::write(&path, json) {
                info!("cannot write the report {}: {e}", path.display());
            }
        }
        Err(e) => info!("cannot encode the report: {e}"),
    }
}

struct Restorer {
    image: Image<File>,
    manifest: Manifest,
    events: Vec<PhaseTiming>,
    lock_tables: Vec<String>,
}

impl Restorer {
    fn event(&mut self, e: EventLine) {
        let e = log::event(e);
        self.events.push(PhaseTiming::from(&e));
    }

    /// Returns the outcome, the reason of a failure, and each workload's fate.
    fn restore(&mut self) -> (Outcome, Option<String>, Vec<WorkloadOutcome>) {
        let not_restored = |m: &Manifest, why: &str| {
            m.workloads
                .iter()
                .map(|w| WorkloadOutcome {
                    name: w.name.clone(),
                    root_pid: w.root_pid,
                    restored: false,
                    error: Some(why.to_string()),
                    criu_log: None,
                })
                .collect()
        };
        match self.prepare() {
            Ok(()) => {}
            Err(why) => {
                self.cleanup();
                let ws = not_restored(&self.manifest, &why);
                return (Outcome::Failed, Some(why), ws);
            }
        }
        let scaling = self.tcp_window_scaling_off();
        let mut outcomes = Vec::new();
        for w in self.manifest.workloads.clone() {
            outcomes.push(self.restore_workload(&w.name, w.root_pid, &w.section));
        }
        if let Some(old) = scaling {
            let _ = fs::write("/proc/sys/net/ipv4/tcp_window_scaling", old);
        }
        let failed: Vec<&WorkloadOutcome> = outcomes.iter().filter(|o| !o.restored).collect();
        self.cleanup();
        match failed.first() {
            None => (Outcome::Restored, None, outcomes),
            Some(first) => {
                // The first failure's own reason: the others often follow from it.
                let names: Vec<&str> = failed.iter().map(|o| o.name.as_str()).collect();
                let why = format!(
                    "CRIU could not restore {}: {}",
                    names.join(", "),
                    first.error.as_deref().unwrap_or("no reason given")
                );
                (Outcome::Failed, Some(why), outcomes)
            }
        }
    }

    /// Unpacks the image and re-applies the device state. Errors are reasons
    /// for the report.
    fn prepare(&mut self) -> Result<(), String> {
        let blob = self
            .image
            .read_blob(devstate::SECTION)
            .map_err(|e| format!("device state: {e}"))?;
        let state: DeviceState = serde_json::from_slice(&blob)
            .map_err(|e| format!("device state does not parse: {e}"))?;
        mount_support_fs(&state);
        if self
            .image
            .manifest()
            .sections
            .iter()
            .any(|s| s.name == devstate::TMPFS_SECTION)
        {
            self.image
                .extract_tree(devstate::TMPFS_SECTION, Path::new("/"))
                .map_err(|e| format!("tmpfs files: {e}"))?;
        }
        let _ = fs::create_dir_all(UNPACK_DIR);
        mount(
            Some("tmpfs"),
            UNPACK_DIR,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0700"),
        )
        .map_err(|e| format!("cannot mount tmpfs on {UNPACK_DIR}: {e}"))?;
        for w in self.manifest.workloads.clone() {
            let dest = Path::new(UNPACK_DIR).join(&w.name);
            self.image
                .extract_tree(&w.section, &dest)
                .map_err(|e| format!("workload {}: {e}", w.name))?;
        }
        self.event(
            EventLine::now(Event::ImageVerified).with("workloads", self.manifest.workloads.len()),
        );
        self.apply_network(&state)?;
        self.event(EventLine::now(Event::NetRestored).with("interfaces", state.interfaces.len()));
        if !state.hostname.is_empty() {
            if let Err(e) = nix::unistd::sethostname(&state.hostname) {
                info!("cannot set hostname {}: {e}", state.hostname);
            }
        }
        if !state.rng_seed.is_empty() {
            // Mixed into the pool (not credited: that needs an ioctl).
            let _ = OpenOptions::new()
                .write(true)
                .open("/dev/urandom")
                .and_then(|mut f| f.write_all(&state.rng_seed));
        }
        Ok(())
    }

    fn apply_network(&mut self, state: &DeviceState) -> Result<(), String> {
        // CRIU's own probes connect over loopback.
        sh("ip", &["link", "set", "lo", "up"])?;
        // The lock tables go in before any address: until CRIU has re-created
        // the sockets, the new kernel must not answer their peers with resets.
        for table in &state.network_locks {
            run_stdin("nft", &["-f", "-"], table)?;
            if let Some(name) = table_name(table) {
                self.lock_tables.push(name);
            }
        }
        for iface in &state.interfaces {
            let cur = iface
                .mac
                .as_deref()
                .and_then(name_by_mac)
                .unwrap_or_else(|| iface.name.clone());
            if cur != iface.name {
                sh("ip", &["link", "set", "dev", &cur, "name", &iface.name])?;
            }
            sh(
                "ip",
                &[
                    "link",
                    "set",
                    "dev",
                    &iface.name,
                    "mtu",
                    &iface.mtu.to_string(),
                ],
            )?;
            for a in &iface.addresses {
                let cidr = format!("{}/{}", a.local, a.prefix_len);
                let fam = if a.family == Family::Inet6 {
                    "-6"
                } else {
                    "-4"
                };
                let mut args = vec![
                    fam,
                    "addr",
                    "replace",
                    cidr.as_str(),
                    "dev",
                    iface.name.as_str(),
                ];
                if let Some(b) = &a.broadcast {
                    args.extend(["broadcast", b.as_str()]);
                }
                sh("ip", &args)?;
            }
            if iface.up {
                sh("ip", &["link", "set", "dev", &iface.name, "up"])?;
            }
        }
        for r in &state.routes {
            let fam = if r.family == Family::Inet6 {
                "-6"
            } else {
                "-4"
            };
            let metric = r.metric.map(|m| m.to_string());
            let mut args = vec![fam, "route", "replace", r.dst.as_str()];
            let opts = [
                ("via", &r.gateway),
                ("dev", &r.dev),
                ("metric", &metric),
                ("scope", &r.scope),
            ];
            let more = [("src", &r.prefsrc), ("proto", &r.protocol)];
            for (k, v) in opts.into_iter().chain(more) {
                if let Some(v) = v {
                    args.extend([k, v.as_str()]);
                }
            }
            if let Err(e) = sh("ip", &args) {
                // A route the kernel already made (e.g. the subnet's) is fine.
                info!("route {}: {e}", r.dst);
            }
        }
        Ok(())
    }

    /// A connection that never negotiated window scaling is re-created with
    /// the kernel's default scale, so it would advertise a tiny window; with
    /// scaling off during the restore the scale is 0 and the window right.
    fn tcp_window_scaling_off(&self) -> Option<String> {
        if !self.manifest.workloads.iter().any(|w| w.tcp_established) {
            return None;
        }
        let path = "/proc/sys/net/ipv4/tcp_window_scaling";
        let old = fs::read_to_string(path).ok()?;
        fs::write(path, "0").ok()?;
        Some(old)
    }

    fn restore_workload(&mut self, name: &str, root_pid: i32, _section: &str) -> WorkloadOutcome {
        let dir = Path::new(UNPACK_DIR).join(name);
        let log_dir = Path::new(report::DIR);
        let _ = fs::create_dir_all(log_dir);
        let log_path = log_dir.join(format!("restore-{name}.log"));
        let tcp = self
            .manifest
            .workloads
            .iter()
            .any(|w| w.name == name && w.tcp_established);
        let mut args: Vec<String> = [
            "restore",
            "--restore-detached",
            // Stopped, so that the timers below are fixed before they run.
            "--leave-stopped",
            "--manage-cgroups",
            "--file-locks",
            "-v4",
        ]
        .map(str::to_string)
        .to_vec();
        args.extend([
            "-D".into(),
            dir.display().to_string(),
            "-o".into(),
            log_path.display().to_string(),
        ]);
        if tcp {
            args.push("--tcp-established".into());
        }
        let start = Instant::now();
        let res = Command::new("criu")
            .args(&args)
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let error = match res {
            Ok(s) if s.success() => {
                self.resume_restored(name);
                None
            }
            Ok(s) => Some(format!(
                "criu restore exited with {s}: {}",
                contract::report::criu_errors(&fs::read_to_string(&log_path).unwrap_or_default())
            )),
            Err(e) => Some(format!("cannot run criu: {e}")),
        };
        info!(
            "workload {name} (pid {root_pid}): {} in {} ms",
            if error.is_none() {
                "restored"
            } else {
                "NOT restored"
            },
            start.elapsed().as_millis()
        );
        WorkloadOutcome {
            name: name.to_string(),
            root_pid,
            restored: error.is_none(),
            error,
            criu_log: Some(log_path.display().to_string()),
        }
    }

    /// Lets the tasks CRIU left stopped run, after fixing their timers.
    fn resume_restored(&self, name: &str) {
        let Some(w) = self.manifest.workloads.iter().find(|w| w.name == name) else {
            return;
        };
        // Their cgroup lists them by their pids in this namespace, which a
        // workload with its own PID namespace may not have kept.
        let procs =
            fs::read_to_string(Path::new(&w.cgroup).join("cgroup.procs")).unwrap_or_default();
        let mut pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            pids = w.pids.clone();
        }
        match crate::timers::rearm_expired_periodic(&pids) {
            Ok(0) => {}
            Ok(n) => {
                info!("workload {name}: re-armed {n} periodic timer(s) CRIU restored disarmed")
            }
            Err(e) => info!("workload {name}: cannot re-arm timers: {e}"),
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }

    /// Frees the unpacked images and lifts any lock CRIU did not lift itself
    /// (it does on success), so a failed restore leaves a working network.
    fn cleanup(&mut self) {
        let _ = umount2(UNPACK_DIR, MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(UNPACK_DIR);
        for t in std::mem::take(&mut self.lock_tables) {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", &t])
                .env("PATH", PATH)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `table inet CRIU-123 {` -> `CRIU-123`
fn table_name(nft: &str) -> Option<String> {
    let line = nft.lines().find(|l| l.trim_start().starts_with("table "))?;
    let mut words = line.split_whitespace().skip(1);
    let first = words.next()?;
    let name = if ["ip", "ip6", "inet", "arp", "bridge", "netdev"].contains(&first) {
        words.next()?
    } else {
        first
    };
    Some(name.trim_end_matches('{').trim().to_string())
}

fn name_by_mac(mac: &str) -> Option<String> {
    fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find_map(|e| {
            let addr = fs::read_to_string(e.path().join("address")).ok()?;
            (addr.trim().eq_ignore_ascii_case(mac))
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
}

/// Mounts what the restored tasks expect to find: cgroup2 (CRIU puts them
/// back in their cgroups), devpts, and the tmpfs mounts they used.
fn mount_support_fs(state: &DeviceState) {
    let mounted = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let is_mounted = |p: &str| {
        mounted
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(p))
    };
    let try_mount = |fstype: &str, target: &str, data: Option<&str>| {
        if is_mounted(target) {
            return;
        }
        let _ = fs::create_dir_all(target);
        if let Err(e) = mount(
            Some(fstype),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data,
        ) {
            info!("cannot mount {fstype} on {target}: {e}");
        }
    };
    for m in &state.tmpfs_mounts {
        try_mount("tmpfs", &m.path, Some(&m.options));
    }
    try_mount("cgroup2", "/sys/fs/cgroup", None);
    try_mount("devpts", "/dev/pts", Some("gid=5,mode=620,ptmxmode=666"));
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
}

fn sh(cmd: &str, args: &[&str]) -> Result<(), String> {
    run_stdin(cmd, args, "")
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> Result<(), String> {
    let mut child = Command::new(cmd)
        .args(args)
        .env("PATH", PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_table_names_are_read_from_nft_output() {
        assert_eq!(
            table_name("table inet CRIU-4242 {\n chain x {}\n}\n").as_deref(),
            Some("CRIU-4242")
        );
        assert_eq!(table_name("table CRIU-1 {").as_deref(), Some("CRIU-1"));
        assert_eq!(table_name("nothing"), None);
    }
}
