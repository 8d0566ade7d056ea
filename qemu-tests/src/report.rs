//! The run report (JSON) and its human-readable summary.

use std::fmt::Write as _;

use contract::events::{Event, EventLine};
use serde::{Deserialize, Serialize};

use crate::probe::ProbeResult;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub proves: Vec<String>,
    pub limits: String,
    pub verdict: Verdict,
    pub kernel_before: String,
    pub kernel_after: String,
    /// Kernel release of every boot, in order.
    pub boots: Vec<String>,
    pub workloads: Vec<WorkloadPids>,
    pub events: Vec<EventRecord>,
    /// Longest gap a host probe saw between two replies.
    pub blackout_ms: Option<u64>,
    /// One entry per upgrade: the phase timeline measured in the guest.
    pub upgrades: Vec<UpgradeTimeline>,
    pub probes: Vec<ProbeResult>,
    pub checks: Vec<CheckResult>,
    pub artifacts: Artifacts,
    pub wall_secs: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    #[default]
    Fail,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkloadPids {
    pub name: String,
    pub pid_before: Option<i32>,
    pub pid_after: Option<i32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventRecord {
    pub event: String,
    /// Index of the boot that emitted it (0 = first kernel).
    pub boot: usize,
    pub t_mono_ns: u64,
    pub t_real_ns: u64,
    pub fields: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Artifacts {
    pub dir: String,
    pub serial_log: String,
    /// Kept only for a failed run (or with --keep).
    pub disk_image: Option<String>,
    /// kupgrade's and CRIU's logs copied out of a failed run's disk.
    pub guest_logs: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpgradeTimeline {
    pub from: String,
    pub to: String,
    /// (phase, milliseconds), in order.
    pub phases: Vec<(String, f64)>,
    /// Workloads frozen to workloads restored, in guest real time.
    pub blackout_ms: Option<f64>,
}

/// Phases between consecutive lifecycle events, named for what happens.
const PHASES: &[(Event, Event, &str)] = &[
    (Event::PreflightOk, Event::Frozen, "freeze"),
    (Event::Frozen, Event::Dumped, "checkpoint (CRIU dump)"),
    (Event::Dumped, Event::StateCaptured, "device state"),
    (Event::StateCaptured, Event::ImageWritten, "image write"),
    (Event::ImageWritten, Event::Kexec, "sync, read-only"),
    (Event::Kexec, Event::InitStart, "kexec to new kernel's init"),
    (Event::InitStart, Event::RootMounted, "modules, root"),
    (Event::RootMounted, Event::ImageVerified, "image unpack"),
    (Event::ImageVerified, Event::NetRestored, "network"),
    (Event::NetRestored, Event::Restored, "CRIU restore"),
];

/// Splits events into upgrades (each starts at `frozen`) and times them.
pub fn timelines(events: &[EventRecord], boots: &[String]) -> Vec<UpgradeTimeline> {
    let mut out = Vec::new();
    let starts: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event == "frozen")
        .map(|(i, _)| i)
        .collect();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(events.len());
        // preflight-ok comes just before frozen
        let begin = events[..start]
            .iter()
            .rposition(|e| e.event == "preflight-ok")
            .unwrap_or(start);
        let span = &events[begin..end];
        let at = |e: Event| {
            span.iter()
                .find(|r| r.event == e.name())
                .map(|r| r.t_real_ns)
        };
        let boot = events[start].boot;
        let mut t = UpgradeTimeline {
            from: boots.get(boot).cloned().unwrap_or_default(),
            to: boots
                .get(boot + 1)
                .cloned()
                .unwrap_or_else(|| "(no kexec)".into()),
            ..Default::default()
        };
        for (a, b, name) in PHASES {
            if let (Some(x), Some(y)) = (at(*a), at(*b)) {
                t.phases
                    .push((name.to_string(), (y as f64 - x as f64) / 1e6));
            }
        }
        if let (Some(x), Some(y)) = (at(Event::Frozen), at(Event::Restored)) {
            t.blackout_ms = Some((y as f64 - x as f64) / 1e6);
        }
        out.push(t);
    }
    out
}

pub fn record(e: &EventLine, boot: usize) -> EventRecord {
    EventRecord {
        event: e.event.name().to_string(),
        boot,
        t_mono_ns: e.t_mono_ns,
        t_real_ns: e.t_real_ns,
        fields: e.fields.clone(),
    }
}

impl Report {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "\n== kupgrade-vm: scenario {} ==", self.scenario);
        let _ = writeln!(s, "kernel: {} -> {}", self.kernel_before, self.kernel_after);
        if self.boots.len() > 2 {
            let _ = writeln!(s, "boots:  {}", self.boots.join(" -> "));
        }
        for w in &self.workloads {
            let show = |p: Option<i32>| p.map_or("-".to_string(), |p| p.to_string());
            let same = if w.pid_before.is_some() && w.pid_before == w.pid_after {
                "same pid"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "workload {:<12} pid {} -> {} {same}",
                w.name,
                show(w.pid_before),
                show(w.pid_after)
            );
        }
        for u in &self.upgrades {
            let _ = writeln!(s, "upgrade {} -> {}:", u.from, u.to);
            for (name, ms) in &u.phases {
                let _ = writeln!(s, "  {name:<28} {ms:8.1} ms");
            }
            if let Some(b) = u.blackout_ms {
                let _ = writeln!(s, "  {:<28} {b:8.1} ms", "workloads paused (guest)");
            }
        }
        for p in &self.probes {
            let _ =
                writeln!(
                s,
                "probe {}: {} replies, longest gap {} ms, reset={} eof={} lost={} reordered={}{}",
                p.name,
                p.replies,
                p.max_gap_ms,
                p.reset,
                p.eof,
                p.lost,
                p.reordered,
                p.error.as_ref().map(|e| format!(" error: {e}")).unwrap_or_default()
            );
        }
        for c in &self.checks {
            let _ = writeln!(
                s,
                "[{}] {}: {}",
                if c.ok { " ok " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        let _ = writeln!(
            s,
            "verdict: {} ({:.0} s){}",
            if self.verdict == Verdict::Pass {
                "PASS"
            } else {
                "FAIL"
            },
            self.wall_secs,
            if self.verdict == Verdict::Fail {
                format!("; artifacts kept in {}", self.artifacts.dir)
            } else {
                String::new()
            }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, boot: usize, ms: u64) -> EventRecord {
        EventRecord {
            event: event.into(),
            boot,
            t_mono_ns: 0,
            t_real_ns: ms * 1_000_000,
            fields: vec![],
        }
    }

    #[test]
    fn timelines_split_per_upgrade_and_measure_the_pause() {
        let events = vec![
            ev("preflight-ok", 0, 100),
            ev("frozen", 0, 110),
            ev("dumped", 0, 300),
            ev("kexec", 0, 400),
            ev("init-start", 1, 2400),
            ev("restored", 1, 3110),
            ev("preflight-ok", 1, 5000),
            ev("frozen", 1, 5010),
            ev("restored", 2, 7010),
        ];
        let boots = vec!["a".to_string(), "b".into(), "c".into()];
        let t = timelines(&events, &boots);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].from.as_str(), t[0].to.as_str()), ("a", "b"));
        assert_eq!(t[0].blackout_ms, Some(3000.0));
        assert_eq!(t[0].phases[0], ("freeze".to_string(), 10.0));
        assert!(t[0]
            .phases
            .iter()
            .any(|(n, ms)| n == "kexec to new kernel's init" && *ms == 2000.0));
        assert_eq!((t[1].from.as_str(), t[1].to.as_str()), ("b", "c"));
        assert_eq!(t[1].blackout_ms, Some(2000.0));
    }
}
