//! `kupgrade check`: everything that would stop an upgrade on this machine,
//! each finding with what to do about it.

use std::fmt;
use std::path::Path;

use crate::config::Config;
use crate::leftovers::{self, RunLock};
use crate::stage::Staged;
use crate::store::{self, Store};
use crate::workload::{self, Workload};
use crate::{criu, listen, proc};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    /// What to do (for Warn and Fail).
    pub fix: Option<String>,
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

fn ok(what: impl Into<String>) -> Finding {
    Finding {
        level: Level::Ok,
        what: what.into(),
        fix: None,
    }
}
fn fail(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level: Level::Fail,
        what: what.into(),
        fix: Some(fix.into()),
    }
}
fn warn(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level: Level::Warn,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

pub fn run(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    if nix::unistd::geteuid().is_root() {
        out.push(ok("running as root"));
    } else {
        out.push(fail(
            "not running as root",
            "run kupgrade as root: loading a kernel needs CAP_SYS_BOOT, CRIU needs CAP_SYS_ADMIN",
        ));
    }
    match kexec::is_loaded() {
        Ok(loaded) => out.push(ok(format!(
            "kexec is supported ({})",
            if loaded {
                "a kernel is loaded"
            } else {
                "no kernel loaded yet"
            }
        ))),
        Err(e) => out.push(fail(
            format!("kexec: {e}"),
            "use a kernel built with CONFIG_KEXEC_FILE",
        )),
    }
    match fs_lockdown() {
        Some(mode) if mode != "none" => out.push(warn(
            format!("kernel lockdown is {mode}"),
            "only kernels signed with a trusted key can be loaded; stage a signed kernel",
        )),
        _ => {}
    }
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        out.push(ok("cgroup v2 is mounted"));
    } else {
        out.push(fail(
            "cgroup v2 is not mounted on /sys/fs/cgroup",
            "boot with systemd.unified_cgroup_hierarchy=1 or mount cgroup2",
        ));
    }
    match criu::version(&cfg.criu) {
        Ok(v) => {
            out.push(ok(format!("CRIU {v} found")));
            match criu::check(&cfg.criu) {
                Ok(()) => out.push(ok("`criu check` passes on this kernel")),
                // Only a CRIU too old for this kernel is a failure; `criu
                // check` also tests features (ptys, ...) few workloads use.
                Err(e @ criu::CheckError::NeedsNewer { needed, .. }) => out.push(fail(
                    e.to_string(),
                    format!("install CRIU {needed} or newer"),
                )),
                Err(e) => out.push(warn(
                    e.to_string(),
                    "workloads using what it complains about will be refused at checkpoint time",
                )),
            }
        }
        Err(e) => out.push(fail(e.to_string(), "apt-get install criu")),
    }
    if !cfg.init_binary.exists() {
        out.push(fail(
            format!("{} is missing", cfg.init_binary.display()),
            "install kupgrade-init there or set init_binary in /etc/kupgrade/config.toml",
        ));
    }

    let found = workload::discover(cfg);
    let workloads: Vec<Workload> = found
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    for e in found.iter().filter_map(|r| r.as_ref().err()) {
        out.push(fail(e.to_string(), "fix the workload's cgroup"));
    }
    if found.is_empty() {
        out.push(warn("no workloads", "start one with `kupgrade launch NAME -- CMD` or declare its cgroup in /etc/kupgrade/config.toml"));
    }
    for w in &workloads {
        let refusals = workload::refusals(w);
        if refusals.is_empty() {
            out.push(ok(format!(
                "workload {} (pid {} {}, {} processes, {} MiB{}) looks dumpable",
                w.name,
                w.root_pid,
                proc::comm(w.root_pid),
                w.pids.len(),
                w.memory_bytes >> 20,
                if w.tcp_established {
                    ", TCP connections"
                } else {
                    ""
                }
            )));
        }
        let low: Vec<i32> = w
            .pids
            .iter()
            .copied()
            .filter(|p| *p < crate::launch::PID_FLOOR)
            .collect();
        if !w.pid_namespace && !low.is_empty() {
            out.push(warn(
                format!("workload {} has low pids {low:?}", w.name),
                "the new kernel's early boot may take them and CRIU needs them free: restart it with `kupgrade launch` (or --pid-namespace)",
            ));
        }
        for r in refusals {
            out.push(fail(
                r.to_string(),
                "kupgrade go would refuse it: remove the resource or stop the workload",
            ));
        }
    }
    // Without root the lock cannot be taken; the first finding says so.
    let lock = if nix::unistd::geteuid().is_root() {
        Some(RunLock::take())
    } else {
        None
    };
    match lock {
        None => {}
        Some(Ok(_lock)) => {
            let left = leftovers::find(&workloads, Store::locate(cfg).ok().as_ref());
            if !left.is_empty() {
                out.push(fail(
                    format!(
                        "a previous `kupgrade go` did not finish: {}",
                        left.describe().join("; ")
                    ),
                    "run `kupgrade resume` to undo it",
                ));
            }
        }
        Some(Err(e)) => out.push(warn(e.to_string(), "check again once it has finished")),
    }
    let ports = listen::listening_ports(&workloads);
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
        match std::process::Command::new("nft").arg("--version").output() {
            Ok(o) if o.status.success() => out.push(ok(what)),
            _ => out.push(fail(
                format!("{what}, but nft is not available"),
                "apt-get install nftables",
            )),
        }
    }
    let need = store::estimate_image_bytes(workloads.iter().map(|w| w.memory_bytes).sum());
    match Store::locate(cfg) {
        Ok(s) => match s.ensure_fits(need) {
            Ok(()) => out.push(ok(format!(
                "store {} has {} MiB; the image needs about {} MiB",
                s.path.display(),
                s.capacity >> 20,
                need.div_ceil(1 << 20)
            ))),
            Err(e) => out.push(fail(e.to_string(), "grow the reservation")),
        },
        Err(e) => out.push(fail(e.to_string(), store::suggest_memmap(need))),
    }
    match Staged::load() {
        Some(s) => out.push(ok(format!(
            "staged: {} ({})",
            s.release,
            s.kernel.display()
        ))),
        None => out.push(warn(
            "no kernel staged",
            "run `kupgrade stage /boot/vmlinuz-NEW`",
        )),
    }
    out
}

fn fs_lockdown() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    // "none [integrity] confidentiality": the bracketed word is active.
    text.split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(['[', ']']).to_string())
}
