//! The run report (JSON) and its human-readable summary.

use std::fmt::Write as _;

use contract::events::EventLine;
use contract::timeline::{self, Mark, Picture};
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
    /// The workloads' pause, frozen to restored on the host's clock (of the
    /// longest upgrade when there are several).
    #[serde(default)]
    pub blackout_ms: Option<f64>,
    /// The floor of that upgrade: the bare kexec reboot of the same kernels
    /// and guest, no workloads, kexec to exec-init on the host's clock.
    #[serde(default)]
    pub bare_kexec_ms: Option<f64>,
    /// `blackout_ms / bare_kexec_ms`: what kupgrade adds to the reboot.
    #[serde(default)]
    pub blackout_ratio: Option<f64>,
    /// Longest gap a host probe saw between two replies.
    #[serde(default)]
    pub probe_blackout_ms: Option<u64>,
    /// Where the floor was measured.
    #[serde(default)]
    pub floor: Option<FloorRun>,
    /// One entry per upgrade: the phase timeline on the host's clock.
    pub upgrades: Vec<UpgradeTimeline>,
    pub probes: Vec<ProbeResult>,
    pub checks: Vec<CheckResult>,
    /// The faults injected, each judged by its check.
    #[serde(default)]
    pub faults: Vec<FaultResult>,
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
    /// When its line reached the host, in ms since QEMU started: the one
    /// clock that runs on across the kexec.
    #[serde(default)]
    pub t_host_ms: f64,
    pub fields: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// A row of `docs/reliability.md`: a fault, what was promised, and what the
/// check that judges it saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultResult {
    pub point: String,
    pub expected: String,
    pub check: String,
    pub observed: String,
    pub ok: bool,
}

impl FaultResult {
    /// Judges each of `faults` by the check it names among `checks`; a
    /// check that did not run fails its fault.
    pub fn judge(faults: &[crate::scenario::Fault], checks: &[CheckResult]) -> Vec<FaultResult> {
        faults
            .iter()
            .map(|f| {
                let ran = checks.iter().find(|c| c.name == f.check);
                FaultResult {
                    point: f.point.clone(),
                    expected: f.expected.clone(),
                    check: f.check.clone(),
                    observed: ran
                        .map_or_else(|| "the check did not run".to_string(), |c| c.detail.clone()),
                    ok: ran.is_some_and(|c| c.ok),
                }
            })
            .collect()
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Artifacts {
    pub dir: String,
    pub serial_log: String,
    /// Kept only for a failed run (or with --keep).
    pub disk_image: Option<String>,
    /// kupgrade's and CRIU's logs copied out of a failed run's disk.
    pub guest_logs: Option<String>,
    /// The timeline picture of the upgrades.
    #[serde(default)]
    pub timeline_svg: Option<String>,
}

/// The boot that measured the bare kexec floor.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FloorRun {
    /// Its run directory (serial log, and its disk if it failed).
    pub dir: String,
    /// Measured for an earlier scenario of the same invocation, with the
    /// same kernels and guest.
    pub shared: bool,
    /// Why there is no floor, when it could not be measured.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpgradeTimeline {
    pub from: String,
    pub to: String,
    /// (phase, milliseconds), in order, on the host's clock.
    pub phases: Vec<(String, f64)>,
    /// Workloads frozen to workloads restored, on the host's clock.
    pub blackout_ms: Option<f64>,
    /// The kexec call to the real init's exec, on the host's clock.
    #[serde(default)]
    pub kexec_to_init_ms: Option<f64>,
    /// The same reboot with no workloads (see [`Report::bare_kexec_ms`]).
    #[serde(default)]
    pub bare_kexec_ms: Option<f64>,
    #[serde(default)]
    pub blackout_ratio: Option<f64>,
    /// Its lifecycle events, in ms since QEMU started (host clock).
    #[serde(default)]
    pub marks: Vec<Mark>,
}

impl UpgradeTimeline {
    /// Sets the floor and the ratio to it.
    pub fn set_floor(&mut self, bare_kexec_ms: Option<f64>) {
        self.bare_kexec_ms = bare_kexec_ms;
        self.blackout_ratio = ratio(self.blackout_ms, bare_kexec_ms);
    }
}

fn ratio(blackout_ms: Option<f64>, floor_ms: Option<f64>) -> Option<f64> {
    match (blackout_ms, floor_ms) {
        (Some(b), Some(f)) if f > 0.0 => Some(b / f),
        _ => None,
    }
}

/// Splits events into upgrades (each starts at `frozen`) and times them on
/// the host's clock.
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
        let marks: Vec<Mark> = events[begin..end]
            .iter()
            .map(|r| Mark {
                event: r.event.clone(),
                t_ms: r.t_host_ms,
            })
            .collect();
        let boot = events[start].boot;
        let mut t = UpgradeTimeline {
            from: boots.get(boot).cloned().unwrap_or_default(),
            to: boots
                .get(boot + 1)
                .cloned()
                .unwrap_or_else(|| "(no kexec)".into()),
            ..Default::default()
        };
        t.phases = timeline::phases(&marks)
            .iter()
            .map(|p| (p.name.to_string(), p.ms()))
            .collect();
        t.blackout_ms = timeline::blackout_ms(&marks);
        t.kexec_to_init_ms = timeline::kexec_to_init_ms(&marks);
        t.marks = marks;
        out.push(t);
    }
    out
}

/// An event as the host saw it: `t_host_ms` is when its line arrived.
pub fn record(e: &EventLine, boot: usize, t_host_ms: f64) -> EventRecord {
    EventRecord {
        event: e.event.name().to_string(),
        boot,
        t_mono_ns: e.t_mono_ns,
        t_real_ns: e.t_real_ns,
        t_host_ms,
        fields: e.fields.clone(),
    }
}

impl Report {
    /// Sets the floor of every upgrade from `floor` (by kernel pair) and the
    /// report's figures from the upgrade that paused the workloads longest.
    pub fn set_floor(&mut self, floor: impl Fn(&str, &str) -> Option<f64>) {
        for u in &mut self.upgrades {
            u.set_floor(floor(&u.from, &u.to));
        }
        let longest = self
            .upgrades
            .iter()
            .filter_map(|u| Some((u.blackout_ms?, u)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, u)| u);
        self.blackout_ms = longest.and_then(|u| u.blackout_ms);
        self.bare_kexec_ms = longest.and_then(|u| u.bare_kexec_ms);
        self.blackout_ratio = ratio(self.blackout_ms, self.bare_kexec_ms);
    }

    /// The timeline picture of its upgrades, one panel each.
    pub fn timeline_svg(&self) -> String {
        let pictures: Vec<Picture> = self
            .upgrades
            .iter()
            .map(|u| Picture {
                title: format!("{}: {} -> {}", self.scenario, u.from, u.to),
                clock: "times on the host's clock, from the arrival of the guest's serial lines"
                    .into(),
                marks: u.marks.clone(),
                floor_ms: u.bare_kexec_ms,
            })
            .collect();
        timeline::svg(&pictures)
    }

    /// The three figures, as the JSON names them.
    pub fn figures(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        format!(
            "blackout_ms={} bare_kexec_ms={} blackout_ratio={}",
            ms(self.blackout_ms),
            ms(self.bare_kexec_ms),
            self.blackout_ratio
                .map_or("-".to_string(), |r| format!("{r:.2}"))
        )
    }

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
            let _ = writeln!(s, "upgrade {} -> {} (host clock):", u.from, u.to);
            for (name, ms) in &u.phases {
                let _ = writeln!(s, "  {name:<32} {ms:8.1} ms");
            }
            for (what, v) in [
                ("workloads paused", u.blackout_ms),
                ("kexec to real init", u.kexec_to_init_ms),
                ("bare kexec, no workloads", u.bare_kexec_ms),
            ] {
                if let Some(v) = v {
                    let _ = writeln!(s, "  {what:<32} {v:8.1} ms");
                }
            }
            if let Some(r) = u.blackout_ratio {
                let _ = writeln!(s, "  {:<32} {r:8.2}", "paused / bare kexec");
            }
        }
        if !self.upgrades.is_empty() {
            let _ = writeln!(s, "{}", self.figures());
        }
        if let Some(f) = &self.floor {
            match &f.error {
                Some(e) => {
                    let _ = writeln!(s, "bare kexec floor not measured: {e} ({})", f.dir);
                }
                None if f.shared => {
                    let _ = writeln!(
                        s,
                        "bare kexec floor: measured earlier in this run ({})",
                        f.dir
                    );
                }
                None => {
                    let _ = writeln!(s, "bare kexec floor: measured in {}", f.dir);
                }
            }
        }
        if let Some(svg) = &self.artifacts.timeline_svg {
            let _ = writeln!(s, "timeline picture: {svg}");
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

    /// An event whose line reached the host at `ms`; the guest's clocks
    /// are off by whole seconds, as an RTC-set clock is after the kexec.
    fn ev(event: &str, boot: usize, ms: u64) -> EventRecord {
        EventRecord {
            event: event.into(),
            boot,
            t_mono_ns: 0,
            t_real_ns: (ms / 1000 + boot as u64 * 7) * 1_000_000_000,
            t_host_ms: ms as f64,
            fields: vec![],
        }
    }

    /// An attempt's row is judged by the guest's check for the attempt as
    /// a whole; an attempt the guest never ran fails its row.
    #[test]
    fn attempt_rows_are_judged_by_their_attempts_checks() {
        let s = crate::scenario::Scenario::parse(
            r#"
name = "f"
[[check]]
name = "resumed"
shell = "true"
[[attempt]]
point = "error after the hold"
expected = "refused"
expect = "refused"
refusal_contains = "aborted"
checks = ["resumed"]
[[attempt]]
point = "SIGKILL after the freeze"
expected = "resumed"
expect = "killed"
checks = ["resumed"]
[[attempt]]
point = "SIGINT after the dump"
expected = "refused"
expect = "refused"
refusal_contains = "interrupted"
checks = ["resumed"]
"#,
        )
        .unwrap();
        let check = |name: &str, ok: bool| CheckResult {
            name: name.into(),
            ok,
            detail: format!("{name} said {ok}"),
        };
        // The second attempt's go ended as expected but a check failed.
        let checks = [
            check("attempt 1: error after the hold", true),
            check("attempt 2: SIGKILL after the freeze: resumed", false),
            check("attempt 2: SIGKILL after the freeze", false),
        ];
        let rows = FaultResult::judge(&s.fault_rows(), &checks);
        assert_eq!(
            rows.iter().map(|r| r.ok).collect::<Vec<_>>(),
            [true, false, false]
        );
        assert_eq!(
            rows[0].observed,
            "attempt 1: error after the hold said true"
        );
        assert_eq!(rows[1].point, "SIGKILL after the freeze");
        assert_eq!(rows[2].observed, "the check did not run");
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

    #[test]
    fn the_floor_gives_each_upgrade_its_ratio_and_the_report_the_longest() {
        let events = vec![
            ev("frozen", 0, 1000),
            ev("kexec", 0, 2000),
            ev("init-start", 0, 5000),
            ev("restored", 1, 7000),
            ev("exec-init", 1, 7100),
            ev("frozen", 1, 9000),
            ev("kexec", 1, 9500),
            ev("restored", 2, 21000),
        ];
        let boots = vec!["a".to_string(), "b".into(), "c".into()];
        let mut r = Report {
            scenario: "s".into(),
            upgrades: timelines(&events, &boots),
            ..Default::default()
        };
        assert_eq!(r.upgrades[0].kexec_to_init_ms, Some(5100.0));
        r.set_floor(|from, to| match (from, to) {
            ("a", "b") => Some(4000.0),
            ("b", "c") => Some(5000.0),
            _ => None,
        });
        assert_eq!(r.upgrades[0].blackout_ratio, Some(1.5));
        assert_eq!(r.upgrades[1].blackout_ratio, Some(2.4));
        assert_eq!(
            (r.blackout_ms, r.bare_kexec_ms, r.blackout_ratio),
            (Some(12000.0), Some(5000.0), Some(2.4))
        );
        assert!(r
            .summary()
            .contains("blackout_ms=12000 bare_kexec_ms=5000 blackout_ratio=2.40"));
        let svg = r.timeline_svg();
        assert_eq!(svg.matches("class=\"floor\"").count(), 2);
        // Without a floor there is no ratio.
        r.set_floor(|_, _| None);
        assert_eq!((r.bare_kexec_ms, r.blackout_ratio), (None, None));
        assert_eq!(r.blackout_ms, Some(12000.0));
    }
}
