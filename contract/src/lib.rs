//! The contract between the two kernels: what the agent on the old kernel
//! and `kupgrade-init` on the new one (and the QEMU harness that watches
//! both) must agree on. The kernel command line keys, the device state, the
//! lifecycle events, the upgrade report (and its timeline picture), the
//! workloads recorded in the image's manifest and CRIU's arguments for them.
//! Both sides are different builds; everything here is serialised with
//! names, never by position.

pub mod cmdline;
pub mod criu;
pub mod devstate;
pub mod events;
pub mod extent;
pub mod journal;
pub mod report;
#[doc(hidden)]
pub mod testing;
pub mod timeline;

use serde::{Deserialize, Serialize};

/// A preserved workload, as recorded in the image for the restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct WorkloadEntry {
    pub name: String,
    pub cgroup: String,
    pub root_pid: i32,
    pub pids: Vec<i32>,
    /// The section holding its CRIU images.
    pub section: String,
    pub tcp_established: bool,
    pub pid_namespace: bool,
    /// Its root does not lead its session (the leader has exited): CRIU
    /// dumps and restores it with `--shell-job`. Absent in older images.
    #[serde(default)]
    pub shell_job: bool,
    /// A process of it has a controlling terminal, so a shell's job control
    /// may watch the others: restored running, since a stop and a SIGCONT
    /// after it are seen (and acted on) by such a shell. Absent in older
    /// images.
    #[serde(default)]
    pub job_control: bool,
    /// Its connections to journald (a service's stdout and stderr), dumped
    /// as external sockets and restored connected to a relay. Absent in
    /// older images.
    #[serde(default)]
    pub journal_streams: Vec<journal::JournalStream>,
    /// The systemd service it was declared by: kupgrade-init has that unit
    /// adopt the restored processes. Absent in older images.
    #[serde(default)]
    pub unit: Option<String>,
    /// That unit's `NotifyAccess=` (`none`, `main`, `exec`, `all`), kept by
    /// the adoption so that a watchdog's pings are still taken from where
    /// the unit takes them. Absent in older images.
    #[serde(default)]
    pub notify_access: Option<String>,
    /// That unit's file, when it lived only in the old boot (a transient
    /// unit, as `kupgrade launch` and `systemd-run` make): the new systemd
    /// empties its transient units' directory when it starts, so
    /// kupgrade-init writes this back as a runtime unit, headed by
    /// [`RESTORED_UNIT_HEADER`]. Absent in older images.
    #[serde(default)]
    pub unit_file: Option<String>,
}

/// The first line of a unit file kupgrade-init wrote back into
/// `/run/systemd/system/`: such a unit is carried again by the next upgrade,
/// like the transient unit it was.
pub const RESTORED_UNIT_HEADER: &str =
    "# Written by kupgrade-init: a transient unit carried over a kernel upgrade.";

/// When a lifecycle event happened, as recorded in the manifest and report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PhaseTiming {
    pub event: String,
    pub t_mono_ns: u64,
    pub t_real_ns: u64,
}

impl From<&events::EventLine> for PhaseTiming {
    fn from(e: &events::EventLine) -> Self {
        PhaseTiming {
            event: e.event.name().to_string(),
            t_mono_ns: e.t_mono_ns,
            t_real_ns: e.t_real_ns,
        }
    }
}
