//! `kupgrade launch`: start a workload in its own session and cgroup,
//! optionally in new PID and IPC namespaces. On a systemd machine it is a
//! transient service, `kupgrade-NAME.service` (`systemd-run`), so that
//! `systemctl` and `journalctl -u` show it like any other service and its
//! output goes to the journal; elsewhere its cgroup is
//! `/sys/fs/cgroup/kupgrade/NAME` and its output a file.
//!
//! The work is split over hidden subcommands so that no code runs between
//! fork and exec: the launcher (or systemd) spawns `kupgrade __exec`, which
//! makes itself a session leader, joins the cgroup and execs the command (or,
//! with a PID namespace, unshares and spawns `kupgrade __ns-init`, which
//! becomes PID 1 of the namespace, runs the command and reaps orphans).

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::config::{CGROUP_PARENT, CGROUP_ROOT, LIB_DIR, RUN_DIR};
use crate::{cgroup, units};

/// New workloads get PIDs above this, clear of the PIDs that early boot of
/// the next kernel uses (kernel threads and init take a few hundred), so
/// that CRIU can give them back their PIDs.
pub const PID_FLOOR: i32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("workload name {0:?}: use letters, digits, '-' and '_'")]
    BadName(String),
    #[error("cgroup v2 is not mounted on /sys/fs/cgroup: kupgrade needs the unified hierarchy")]
    NoCgroup2,
    #[error("workload {name} is already running (pids {pids:?}); pick another name")]
    Running { name: String, pids: Vec<i32> },
    #[error("cannot set up {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} exited at once ({status}); see {log}")]
    Exited {
        command: String,
        status: String,
        log: String,
    },
    #[error("systemd-run could not start {unit}: {output}")]
    SystemdRun { unit: String, output: String },
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The namespaces a workload gets of its own. CRIU checkpoints and
/// restores a namespace only when the whole tree is in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Namespaces {
    /// Its PIDs can never collide with the next boot's.
    pub pid: bool,
    /// Its SysV shared memory, semaphores and message queues are carried.
    pub ipc: bool,
}

impl Namespaces {
    fn args(self) -> impl Iterator<Item = &'static str> {
        [
            self.pid.then_some("--pid-namespace"),
            self.ipc.then_some("--ipc-namespace"),
        ]
        .into_iter()
        .flatten()
    }
}

/// What `launch` started.
#[derive(Debug)]
pub struct Launched {
    pub pid: i32,
    pub cgroup: PathBuf,
    /// Its systemd unit, on a systemd machine.
    pub unit: Option<String>,
    /// Where its output goes: a file, or `journalctl -u UNIT`.
    pub output: String,
}

pub fn launch(name: &str, ns: Namespaces, command: &[String]) -> Result<Launched, Error> {
    if !valid_name(name) {
        return Err(Error::BadName(name.into()));
    }
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return Err(Error::NoCgroup2);
    }
    if units::systemd_booted(Path::new(units::SYSTEMD_RUNTIME_DIR)) {
        return launch_unit(name, ns, command);
    }
    let cg = Path::new(CGROUP_PARENT).join(name);
    fs::create_dir_all(&cg).map_err(io(&cg))?;
    let running = cgroup::procs(&cg)?;
    if !running.is_empty() {
        return Err(Error::Running {
            name: name.into(),
            pids: running,
        });
    }
    raise_pid_floor();
    let log_dir = Path::new(LIB_DIR).join("workloads");
    fs::create_dir_all(&log_dir).map_err(io(&log_dir))?;
    let log = log_dir.join(format!("{name}.log"));
    let out = open_log(&log).map_err(io(&log))?;
    let err = out.try_clone().map_err(io(&log))?;
    let exe = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("__exec").arg("--cgroup").arg(&cg).args(ns.args());
    let mut child = cmd
        .arg("--")
        .args(command)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io(&log))?;
    let helper = child.id() as i32;
    // Give an exec failure or an immediate exit the chance to show.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        if let Ok(Some(status)) = child.try_wait() {
            // With a PID namespace the helper exits once the namespace's init runs.
            if ns.pid && status.success() {
                break;
            }
            return Err(Error::Exited {
                command: command.join(" "),
                status: status.to_string(),
                log: log.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = if ns.pid {
        let _ = child.wait();
        *cgroup::procs(&cg)?.first().ok_or_else(|| Error::Exited {
            command: command.join(" "),
            status: "no process left in its cgroup".into(),
            log: log.display().to_string(),
        })?
    } else {
        helper
    };
    Ok(Launched {
        pid,
        cgroup: cg,
        unit: None,
        output: log.display().to_string(),
    })
}

/// Where `__exec` leaves the PID of a namespace's init for systemd
/// (`Type=forking` with `PIDFile=`).
fn unit_pid_file(name: &str) -> PathBuf {
    Path::new(RUN_DIR)
        .join("launch")
        .join(format!("{name}.pid"))
}

/// `launch` on systemd: `kupgrade-NAME.service`, a transient unit.
fn launch_unit(name: &str, ns: Namespaces, command: &[String]) -> Result<Launched, Error> {
    let unit = units::launched_unit(name);
    let root = Path::new(CGROUP_ROOT);
    if let Some(cg) = units::cgroup_of(root, &unit) {
        return Err(Error::Running {
            name: name.into(),
            pids: cgroup::procs(&cg)?,
        });
    }
    forget_restored_unit(&unit);
    raise_pid_floor();
    let exe = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
    let mut cmd = Command::new("systemd-run");
    cmd.args(["--quiet", "--collect"])
        .arg(format!("--unit={unit}"))
        .arg(format!(
            "--description={}",
            units::launched_description(name)
        ));
    if ns.pid {
        // __exec exits once the namespace's init runs: that init is the
        // main process.
        let pid_file = unit_pid_file(name);
        if let Some(dir) = pid_file.parent() {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        cmd.arg("--service-type=forking")
            .arg(format!("--property=PIDFile={}", pid_file.display()))
            .arg(exe)
            .arg("__exec")
            .arg("--pid-file")
            .arg(&pid_file);
    } else {
        cmd.arg("--service-type=exec").arg(exe).arg("__exec");
    }
    let out = cmd
        .args(ns.args())
        .arg("--")
        .args(command)
        .stdin(Stdio::null())
        .output()
        .map_err(io(Path::new("systemd-run")))?;
    if !out.status.success() {
        return Err(Error::SystemdRun {
            unit,
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let output = format!("journalctl -u {unit}");
    // Give an exec failure or an immediate exit the chance to show.
    std::thread::sleep(Duration::from_millis(300));
    let exited = |status: String| Error::Exited {
        command: command.join(" "),
        status,
        log: output.clone(),
    };
    let pid = main_pid(&unit).ok_or_else(|| exited("the unit has no main process".into()))?;
    let cg = units::cgroup_of(root, &unit)
        .ok_or_else(|| exited("no process left in its cgroup".into()))?;
    Ok(Launched {
        pid,
        cgroup: cg,
        unit: Some(unit),
        output,
    })
}

fn main_pid(unit: &str) -> Option<i32> {
    let out = Command::new("systemctl")
        .args(["show", "--property=MainPID", "--value", unit])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    (pid > 0).then_some(pid)
}

/// A workload of this name restored by an earlier upgrade left its unit
/// file (see [`units::carried_unit_file`]); `systemd-run` refuses a name
/// that has one. It is not running (checked before): forget it.
fn forget_restored_unit(unit: &str) {
    let path = Path::new(units::SYSTEMD_RUNTIME_DIR).join(unit);
    let restored =
        fs::read_to_string(&path).is_ok_and(|t| t.starts_with(contract::RESTORED_UNIT_HEADER));
    if restored && fs::remove_file(&path).is_ok() {
        let _ = Command::new("systemctl")
            .arg("daemon-reload")
            .stdin(Stdio::null())
            .status();
    }
}

/// A workload's output file, appended to: created 0600, since what a
/// workload prints is its own (tokens, user data) and kupgrade cannot tell
/// what is safe to show; not 0640 root:adm, as adm reads the system's logs,
/// not the output of every program root starts. Never through a symlink.
/// One that others can read (an older kupgrade made it 0644) loses that;
/// group access an administrator gave it is kept.
fn open_log(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)?;
    let mode = f.metadata()?.mode() & 0o777;
    if mode & 0o007 != 0 {
        f.set_permissions(fs::Permissions::from_mode(mode & 0o770))?;
    }
    Ok(f)
}

fn raise_pid_floor() {
    let path = "/proc/sys/kernel/ns_last_pid";
    let last: i32 = fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if last < PID_FLOOR {
        // Best effort: without it PIDs are merely lower.
        let _ = fs::write(path, PID_FLOOR.to_string());
    }
}

/// `kupgrade __exec [--cgroup CGROUP | --pid-file FILE] [--pid-namespace]
/// [--ipc-namespace] -- CMD...`: runs in the child. Without a cgroup,
/// systemd has put it in its unit's; with a PID file, the namespace's init
/// is recorded there for systemd.
pub fn exec_in_cgroup(
    cgroup: Option<&Path>,
    pid_file: Option<&Path>,
    ns: Namespaces,
    command: &[String],
) -> Result<(), String> {
    let me = nix::unistd::getpid();
    // A service's process leads its session already.
    if nix::unistd::getsid(None).ok() != Some(me) {
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    }
    if let Some(cgroup) = cgroup {
        let procs = cgroup.join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string())
            .map_err(|e| format!("cannot join {}: {e}", procs.display()))?;
    }
    if ns.ipc {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC)
            .map_err(|e| format!("unshare(CLONE_NEWIPC): {e}"))?;
    }
    if ns.pid {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
            .map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // The first child in the new namespace is its PID 1.
        let init = Command::new(exe)
            .arg("__ns-init")
            .arg("--")
            .args(command)
            .spawn()
            .map_err(|e| format!("{e}"))?;
        if let Some(f) = pid_file {
            fs::write(f, format!("{}\n", init.id()))
                .map_err(|e| format!("cannot write {}: {e}", f.display()))?;
        }
        return Ok(());
    }
    exec(command)
}

fn exec(command: &[String]) -> Result<(), String> {
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let prog = argv.first().ok_or("empty command")?;
    let e = nix::unistd::execvp(prog, &argv)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    Err(format!("cannot execute {}: {e}", command[0]))
}

/// `kupgrade __ns-init -- CMD...`: PID 1 of a workload's PID namespace. Runs
/// the command, reaps orphans, and exits with the command's status.
pub fn ns_init(command: &[String]) -> i32 {
    // A session led from outside the namespace cannot be checkpointed:
    // lead our own.
    let _ = nix::unistd::setsid();
    let child = match Command::new(&command[0]).args(&command[1..]).spawn() {
        Ok(c) => c.id() as i32,
        Err(e) => {
            eprintln!("kupgrade ns-init: cannot run {}: {e}", command[0]);
            return 127;
        }
    };
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == child => return code,
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid.as_raw() == child => {
                return 128 + sig as i32
            }
            Ok(_) => {}
            Err(_) => return 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a workload prints is its own (tokens, user data): root's alone.
    #[test]
    fn workload_output_is_root_s_alone() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("web.log");
        let mode = || fs::metadata(&log).unwrap().mode() & 0o777;
        open_log(&log).unwrap();
        assert_eq!(mode(), 0o600);
        // An older kupgrade's 0644 loses what others could read; group
        // access an administrator gave is theirs.
        fs::set_permissions(&log, fs::Permissions::from_mode(0o644)).unwrap();
        open_log(&log).unwrap();
        assert_eq!(mode(), 0o640);
        fs::set_permissions(&log, fs::Permissions::from_mode(0o640)).unwrap();
        open_log(&log).unwrap();
        assert_eq!(mode(), 0o640);
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("web-1_a"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("../x"));
        assert!(matches!(
            launch("a b", Namespaces::default(), &["true".into()]),
            Err(Error::BadName(_))
        ));
    }
}
