//! The record of one upgrade, written by `kupgrade-init` and shown by
//! `kupgrade report`: first, durably, as `restoring` when the restore begins
//! (so that a reset, a crash or a hang cannot leave the report of an older
//! upgrade standing as if it were this one's), with each workload's fate as
//! it is known, and at the end with the outcome.

use serde::{Deserialize, Serialize};

use crate::events::{Event, EventLine};
use crate::timeline::{self, Mark, Picture};
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

/// A module `kupgrade-init` could not load on the new kernel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ModuleFailure {
    /// Its name, e.g. `virtio_blk`.
    pub name: String,
    /// Why, as the kernel said it (e.g. `ENOEXEC: Exec format error`).
    pub error: String,
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
    /// Modules that did not load on the new kernel. Reports written before
    /// this field existed read as none.
    #[serde(default)]
    pub modules_failed: Vec<ModuleFailure>,
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

    /// Its events on one clock, in ms from the first: CLOCK_MONOTONIC within
    /// each kernel, which is exact, and CLOCK_REALTIME only to bridge the
    /// kexec (the new kernel set it from the RTC, to the second, unless NTP
    /// stepped it since). `agent_log` is the agent's own event log
    /// (`last-go.log`): it adds the events after the image was written,
    /// which the image's manifest cannot hold, when it is of the same `go`.
    pub fn marks(&self, agent_log: Option<&str>) -> Vec<Mark> {
        let parsed = |e: &PhaseTiming| e.event.parse::<Event>().ok().map(|ev| (ev, e.clone()));
        let mut old: Vec<(Event, PhaseTiming)> = self
            .events
            .iter()
            .filter_map(parsed)
            .filter(|(e, _)| e.is_before_kexec())
            .collect();
        let new: Vec<(Event, PhaseTiming)> = self
            .events
            .iter()
            .filter_map(parsed)
            .filter(|(e, _)| !e.is_before_kexec())
            .collect();
        let frozen = old
            .iter()
            .find(|(e, _)| *e == Event::Frozen)
            .map(|(_, t)| t.t_mono_ns);
        let logged: Vec<EventLine> = agent_log
            .unwrap_or_default()
            .lines()
            .filter_map(EventLine::parse)
            .collect();
        let same_go = frozen.is_some()
            && logged
                .iter()
                .any(|l| l.event == Event::Frozen && Some(l.t_mono_ns) == frozen);
        if same_go {
            for l in logged.iter().filter(|l| l.event.is_before_kexec()) {
                if !old.iter().any(|(e, _)| *e == l.event) {
                    old.push((l.event, PhaseTiming::from(l)));
                }
            }
            old.sort_by_key(|(_, t)| t.t_mono_ns);
        }
        // Each side on its own monotonic clock, placed by its first event's
        // real time.
        let origin = old
            .first()
            .or(new.first())
            .map(|(_, t)| t.t_real_ns as i128);
        let mut out = Vec::new();
        for side in [&old, &new] {
            let Some((_, anchor)) = side.first() else {
                continue;
            };
            let base = anchor.t_real_ns as i128 - origin.unwrap_or(0);
            for (e, t) in side {
                let ns = base + (t.t_mono_ns as i128 - anchor.t_mono_ns as i128);
                out.push(Mark::new(*e, ns as f64 / 1e6));
            }
        }
        out
    }

    /// The timeline picture `kupgrade report --svg` writes.
    pub fn timeline_svg(&self, agent_log: Option<&str>) -> String {
        timeline::svg(&[Picture {
            title: format!("{} -> {}", self.kernel_from, self.kernel_to),
            clock: "each kernel on its CLOCK_MONOTONIC; across the kexec CLOCK_REALTIME, \
                    which the new kernel read from the RTC (to the second)"
                .into(),
            marks: self.marks(agent_log),
            floor_ms: None,
        }])
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
            modules_failed: vec![],
        };
        assert_eq!(r.blackout_ns(), Some(300));
    }

    #[test]
    fn marks_use_each_kernels_monotonic_clock_and_the_agents_log() {
        let ev = |e: &str, mono_ms: u64, real_ms: u64| PhaseTiming {
            event: e.into(),
            t_mono_ns: mono_ms * 1_000_000,
            t_real_ns: real_ms * 1_000_000,
        };
        // Real times rounded to the second on the new kernel, as from the RTC.
        let r = UpgradeReport {
            outcome: Outcome::Restored,
            reason: None,
            kernel_from: "a".into(),
            kernel_to: "b".into(),
            image_generation: 1,
            workloads: vec![],
            events: vec![
                ev("preflight-ok", 50_000, 1_000_000_400),
                ev("frozen", 50_100, 1_000_000_500),
                ev("dumped", 50_700, 1_000_001_100),
                ev("init-start", 3_000, 1_000_005_000),
                ev("restored", 5_500, 1_000_007_000),
            ],
            store: None,
            modules_failed: vec![],
        };
        let log = "kupgrade: event=frozen t_mono_ns=50100000000 t_real_ns=1\n\
                   kupgrade: event=image-written t_mono_ns=51000000000 t_real_ns=2\n\
                   kupgrade: event=kexec t_mono_ns=51010000000 t_real_ns=3\n";
        let m = r.marks(Some(log));
        let t = |e| timeline::at(&m, e).unwrap();
        assert_eq!(t(Event::PreflightOk), 0.0);
        assert_eq!(t(Event::Frozen), 100.0);
        assert_eq!(t(Event::Kexec), 1010.0);
        assert_eq!(t(Event::InitStart), 4600.0);
        // 2.5 s on the new kernel's monotonic clock, not the RTC's 2 s.
        assert_eq!(t(Event::Restored) - t(Event::InitStart), 2500.0);
        // Another go's log adds nothing.
        let other = log.replace("50100000000", "1");
        assert!(timeline::at(&r.marks(Some(&other)), Event::Kexec).is_none());
        assert!(r.timeline_svg(Some(log)).contains("class=\"phase\""));
    }

    /// A report written by an older kupgrade-init (no `modules_failed`)
    /// still reads, and a new one keeps the failed modules by name.
    #[test]
    fn older_reports_read_and_failed_modules_round_trip() {
        let old = r#"{"outcome":"restored","reason":null,"kernel_from":"a","kernel_to":"b",
                      "image_generation":3,"workloads":[],"events":[]}"#;
        let r: UpgradeReport = serde_json::from_str(old).unwrap();
        assert_eq!((r.image_generation, r.modules_failed.len()), (3, 0));
        let failed = ModuleFailure {
            name: "virtio_blk".into(),
            error: "ENOEXEC: Exec format error".into(),
        };
        let new = UpgradeReport {
            modules_failed: vec![failed.clone()],
            ..r
        };
        let back: UpgradeReport =
            serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back.modules_failed, [failed]);
    }
}
