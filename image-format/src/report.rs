//! The record of one upgrade, written by `kupgrade-init` after a restore (or
//! a failed one) and shown by `kupgrade report`.

use serde::{Deserialize, Serialize};

use crate::PhaseTiming;

/// Where `kupgrade-init` keeps the report and CRIU's restore logs, on the root
/// file system so that they outlive the boot.
pub const DIR: &str = "/var/lib/kupgrade";
pub const FILE: &str = "last-upgrade.json";

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every workload was restored.
    Restored,
    /// Some or all workloads could not be restored; the machine booted anyway.
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WorkloadOutcome {
    pub name: String,
    pub root_pid: i32,
    pub restored: bool,
    pub error: Option<String>,
    /// CRIU's restore log for this workload, on the root file system.
    pub criu_log: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct UpgradeReport {
    pub outcome: Outcome,
    /// Why the restore failed, for the user to act on.
    pub reason: Option<String>,
    pub kernel_from: String,
    pub kernel_to: String,
    pub image_generation: u64,
    pub workloads: Vec<WorkloadOutcome>,
    /// Every lifecycle event: the agent's (from the manifest), then the init's.
    pub events: Vec<PhaseTiming>,
}

impl UpgradeReport {
    /// Real time between the workloads being frozen on the old kernel and
    /// restored on the new one: the pause they saw.
    pub fn blackout_ns(&self) -> Option<u64> {
        let at = |name: &str| {
            self.events
                .iter()
                .find(|e| e.event == name)
                .map(|e| e.t_real_ns)
        };
        at("restored")?.checked_sub(at("frozen")?)
    }
}
