//! The record of one upgrade, written by `kupgrade-init` and shown by
//! `kupgrade report`: first, durably, as `restoring` when the restore begins
//! (so that a reset, a crash or a hang cannot leave the report of an older
//! upgrade standing as if it were this one's), with each workload's fate as
//! it is known, and at the end with the outcome.

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
    /// The restore began and had not ended when this was written: a report
    /// that still says so is of a restore that never finished.
    Restoring,
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
    /// The store the image was in (`kupgrade.store`), for `kupgrade report`
    /// to check what it holds now.
    #[serde(default)]
    pub store: Option<String>,
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

/// Errors CRIU logs on every run while probing the kernel (see DESIGN.md):
/// not failures.
const NOISE: &[&str] = &[
    "Unable to create tun",
    "veth",
    "exited, status=1",
    "reported by netlink: Operation not supported",
];

/// The gist of a CRIU log for a one-line reason: its first `Error` lines,
/// without the probing noise CRIU logs on every run (tun, veth, helpers).
pub fn criu_errors(log: &str) -> String {
    let errs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error"))
        .filter(|l| !NOISE.iter().any(|n| l.contains(n)))
        .map(|l| l.split_once("): ").map_or(l, |(_, m)| m).trim())
        .collect();
    if errs.is_empty() {
        "no error logged".into()
    } else {
        errs[..errs.len().min(2)].join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_errors_skip_probe_noise_and_keep_the_first_causes() {
        let log = "(00.01) Error (criu/util.c:642): exited, status=1\n\
                   (00.02) Error (criu/tun.c:85): tun: Unable to create tun: No such file\n\
                   (00.03) Error (criu/files-reg.c:2100): File var/log/x has bad size 10 (expect 5)\n\
                   (00.04) Error (criu/cr-restore.c:1500): Restoring FAILED.\n\
                   (00.05) Error (criu/cr-restore.c:1600): later\n";
        assert_eq!(
            criu_errors(log),
            "File var/log/x has bad size 10 (expect 5); Restoring FAILED."
        );
        assert_eq!(criu_errors("all good\n"), "no error logged");
    }

    /// A report written before the store was recorded still reads.
    #[test]
    fn a_report_without_a_store_reads_and_restoring_is_an_outcome() {
        let json = r#"{"outcome":"restoring","reason":null,"kernel_from":"a","kernel_to":"b",
            "image_generation":3,"workloads":[],"events":[]}"#;
        let r: UpgradeReport = serde_json::from_str(json).unwrap();
        assert_eq!((r.outcome, r.store), (Outcome::Restoring, None));
    }

    #[test]
    fn blackout_is_frozen_to_restored() {
        let ev = |e: &str, t| PhaseTiming {
            event: e.into(),
            t_mono_ns: 0,
            t_real_ns: t,
        };
        let r = UpgradeReport {
            outcome: Outcome::Restored,
            reason: None,
            kernel_from: String::new(),
            kernel_to: String::new(),
            image_generation: 0,
            workloads: vec![],
            events: vec![ev("frozen", 100), ev("kexec", 150), ev("restored", 400)],
            store: None,
        };
        assert_eq!(r.blackout_ns(), Some(300));
    }
}
