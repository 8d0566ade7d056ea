//! A restored service, adopted by its systemd unit.
//!
//! The restore runs before systemd, which would then start the unit again: a
//! second instance beside the restored one, or one that fails to bind. For
//! each restored workload declared by unit, kupgrade-init leaves a runtime
//! drop-in (`/run/systemd/system/UNIT.d/`, gone at the next boot) and a PID
//! file. The unit's first start in this boot runs nothing and takes the
//! restored root as its main PID (`Type=forking`, `PIDFile=`), so that
//! `systemctl status`, `stop`, the unit's cgroup limits and its watchdog
//! (`NotifyAccess=` as the unit had it, at least `main`: the forking type
//! takes no notifications otherwise) apply to it. A second drop-in has
//! `multi-user.target` want the unit, so that this first start comes at
//! boot also for a unit that was started by hand, not enabled. Its first
//! stop removes both drop-ins and reloads systemd, so that a restart starts
//! the unit as written.
//!
//! A transient unit (`kupgrade launch`, `systemd-run`) has no file the new
//! systemd could read: the image carries it, and it is written back as a
//! runtime unit (`/run/systemd/system/UNIT`), which stays for this boot so
//! that the unit can be restarted and carried by the next upgrade.

use std::path::{Path, PathBuf};

use contract::WorkloadEntry;

/// What has a restored workload's unit adopt it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adoption<'a> {
    pub unit: &'a str,
    pub main_pid: i32,
    /// The unit's `NotifyAccess=` before the upgrade.
    pub notify: Option<&'a str>,
    /// The unit's file, when it was transient.
    pub unit_file: Option<&'a str>,
}

impl<'a> Adoption<'a> {
    /// The adoption of a workload declared by unit; `None` for others.
    pub fn of(w: &'a WorkloadEntry) -> Option<Self> {
        Some(Adoption {
            unit: w.unit.as_deref()?,
            main_pid: w.root_pid,
            notify: w.notify_access.as_deref(),
            unit_file: w.unit_file.as_deref(),
        })
    }
}

/// Where a transient unit's file is written back.
pub fn unit_path(unit: &str) -> PathBuf {
    Path::new(RUNTIME_UNITS).join(unit)
}

/// The runtime unit's text: the transient unit's, headed by
/// [`contract::RESTORED_UNIT_HEADER`] (once: it may have been carried before).
pub fn unit_text(file: &str) -> String {
    if file.starts_with(contract::RESTORED_UNIT_HEADER) {
        file.to_string()
    } else {
        format!("{}\n{file}", contract::RESTORED_UNIT_HEADER)
    }
}

/// Where the PID files go.
pub const PID_DIR: &str = "/run/kupgrade/adopt";
/// systemd's runtime unit directory.
const RUNTIME_UNITS: &str = "/run/systemd/system";
const DROP_IN: &str = "zz-kupgrade-adopt.conf";

/// The drop-in's path for `unit`.
pub fn drop_in_path(unit: &str) -> PathBuf {
    Path::new(RUNTIME_UNITS)
        .join(format!("{unit}.d"))
        .join(DROP_IN)
}

/// The boot target's drop-in that wants `unit`.
pub fn wants_path(unit: &str) -> PathBuf {
    Path::new(RUNTIME_UNITS)
        .join("multi-user.target.d")
        .join(format!("zz-kupgrade-adopt-{unit}.conf"))
}

/// Its text: the unit is started (adopted) at boot, enabled or not.
pub fn wants(unit: &str) -> String {
    format!("# Written by kupgrade-init: {unit} adopts its restored process at boot.\n[Unit]\nWants={unit}\n")
}

/// The PID file's path for `unit`.
pub fn pid_file(unit: &str) -> PathBuf {
    Path::new(PID_DIR).join(format!("{unit}.pid"))
}

/// The drop-in that has `unit` adopt the process in its PID file; `notify`
/// is the unit's `NotifyAccess=` before the upgrade.
pub fn drop_in(unit: &str, notify: Option<&str>) -> String {
    // exec and all take more than main; none (or not known) becomes main,
    // since a Type=notify unit's default is main and the drop-in's forking
    // type would make it none.
    let notify = notify
        .filter(|n| matches!(*n, "exec" | "all"))
        .unwrap_or("main");
    let pid_file = pid_file(unit);
    let drop_in = drop_in_path(unit);
    let wants = wants_path(unit);
    format!(
        "# Written by kupgrade-init: {unit} was restored before systemd started.\n\
         # Its first start adopts the restored process; its first stop removes\n\
         # this file, so that the next start is the unit's own.\n\
         [Service]\n\
         Type=forking\n\
         PIDFile={pid}\n\
         GuessMainPID=no\n\
         NotifyAccess={notify}\n\
         ExecCondition=\n\
         ExecStartPre=\n\
         ExecStart=\n\
         ExecStart=/bin/true\n\
         ExecStartPost=\n\
         ExecStopPost=-/bin/sh -c 'rm -f {drop} {wants} {pid} && systemctl daemon-reload'\n",
        pid = pid_file.display(),
        drop = drop_in.display(),
        wants = wants.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_in_adopts_the_pid_file_s_process_and_removes_itself_at_the_first_stop() {
        let d = drop_in("redis-server.service", None);
        assert!(d.contains("\n[Service]\nType=forking\n"));
        assert!(d.contains("\nPIDFile=/run/kupgrade/adopt/redis-server.service.pid\n"));
        // The unit's own start commands are reset, not run.
        for reset in [
            "ExecCondition=",
            "ExecStartPre=",
            "ExecStart=",
            "ExecStartPost=",
        ] {
            assert!(d.contains(&format!("\n{reset}\n")), "{reset}");
        }
        assert!(d.contains("\nExecStart=/bin/true\n"));
        assert!(d.contains(
            "rm -f /run/systemd/system/redis-server.service.d/zz-kupgrade-adopt.conf /run/systemd/system/multi-user.target.d/zz-kupgrade-adopt-redis-server.service.conf /run/kupgrade/adopt/redis-server.service.pid && systemctl daemon-reload"
        ));
    }

    #[test]
    fn the_unit_s_notify_access_is_kept_at_least_main() {
        let access = |n| {
            drop_in("a.service", n)
                .lines()
                .find_map(|l| l.strip_prefix("NotifyAccess=").map(String::from))
                .unwrap()
        };
        assert_eq!(access(Some("all")), "all");
        assert_eq!(access(Some("exec")), "exec");
        assert_eq!(access(Some("main")), "main");
        // A Type=notify unit's default, which the forking type would lose.
        assert_eq!(access(Some("none")), "main");
        assert_eq!(access(None), "main");
    }

    #[test]
    fn a_transient_unit_s_file_is_written_back_headed_once() {
        let file = "[Unit]\nDescription=kupgrade workload web\n[Service]\nExecStart=/bin/web\n";
        let text = unit_text(file);
        assert_eq!(text.lines().next(), Some(contract::RESTORED_UNIT_HEADER));
        assert!(text.ends_with(file));
        // Carried a second time, it is not headed twice.
        assert_eq!(unit_text(&text), text);
        assert_eq!(
            unit_path("kupgrade-web.service"),
            Path::new("/run/systemd/system/kupgrade-web.service")
        );
        let w = WorkloadEntry {
            unit: Some("kupgrade-web.service".into()),
            root_pid: 10_001,
            unit_file: Some(file.into()),
            ..Default::default()
        };
        assert_eq!(
            Adoption::of(&w),
            Some(Adoption {
                unit: "kupgrade-web.service",
                main_pid: 10_001,
                notify: None,
                unit_file: Some(file),
            })
        );
        assert_eq!(Adoption::of(&WorkloadEntry::default()), None);
    }

    #[test]
    fn the_boot_target_wants_the_unit_enabled_or_not() {
        assert_eq!(
            wants_path("redis-server.service"),
            Path::new("/run/systemd/system/multi-user.target.d/zz-kupgrade-adopt-redis-server.service.conf")
        );
        assert!(wants("redis-server.service").ends_with("\n[Unit]\nWants=redis-server.service\n"));
    }
}
