//! The floor of the blackout: the bare kexec reboot of the same kernels and
//! guest with no workloads, from the kexec call to the real init's exec, on
//! the host's clock. Everything an upgrade pauses for beyond it is
//! kupgrade's own cost.
//!
//! It is measured in a short boot of its own (a bare kexec cannot share the
//! scenario's boot: the scenario's first kernel must be the old one), staged
//! by `kupgrade stage` and rebooted by the same call as `kupgrade go`, once
//! per kernel chain and guest in an invocation: the scenarios after the
//! first that needs it reuse it, and those running at the same time wait
//! for the one that measures it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::report::{EventRecord, FloorRun, Report, Verdict};
use crate::run::{self, Options, Prepared};

/// One bare kexec: `from` to `to`, kexec to exec-init.
#[derive(Clone, Debug, PartialEq)]
pub struct Hop {
    pub from: String,
    pub to: String,
    pub ms: f64,
}

#[derive(Clone, Debug)]
struct Measured {
    hops: Vec<Hop>,
    dir: String,
    error: Option<String>,
}

/// The floors measured so far in this invocation, shared by the threads
/// that run scenarios.
#[derive(Debug, Default)]
pub struct Floors {
    /// One cell per key: the first thread to need it measures, the others
    /// wait on the cell, not on the whole map (other keys go on meanwhile).
    measured: Mutex<HashMap<String, Arc<OnceLock<Measured>>>>,
}

/// What must be the same for two scenarios to share a floor: the kernels,
/// the root image (packages, flavour), the initramfs and the machine.
fn key(p: &Prepared) -> String {
    let g = &p.scenario.guest;
    format!(
        "{} {:?} {} {} {}M {}cpu {}",
        p.from,
        run::chain_releases(p),
        p.rootfs.display(),
        p.initrd.display(),
        g.memory_mib,
        g.cpus,
        g.memmap()
    )
}

impl Floors {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `rep`'s floor, measuring it now unless an earlier scenario of
    /// this invocation did.
    pub fn apply(&self, p: &Prepared, opts: &Options, rep: &mut Report) {
        let (m, shared) = self.get_or_measure(key(p), || measure(p, opts));
        rep.floor = Some(FloorRun {
            dir: m.dir,
            shared,
            error: m.error,
        });
        let hops = m.hops;
        rep.set_floor(|from, to| {
            hops.iter()
                .find(|h| h.from == from && h.to == to)
                .map(|h| h.ms)
        });
    }

    /// The floor of `key`, and whether another call measured it.
    fn get_or_measure(&self, key: String, measure: impl FnOnce() -> Measured) -> (Measured, bool) {
        let cell = self
            .measured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone();
        let mut measured_here = false;
        let m = cell.get_or_init(|| {
            measured_here = true;
            measure()
        });
        (m.clone(), !measured_here)
    }
}

fn measure(p: &Prepared, opts: &Options) -> Measured {
    match run::run_bare(p, opts) {
        Ok(rep) => {
            let failed: Vec<String> = rep
                .checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.detail))
                .collect();
            let hops = hops(&rep.events, &rep.boots);
            let error = (rep.verdict != Verdict::Pass || hops.is_empty()).then(|| {
                if failed.is_empty() {
                    "no kexec was timed".to_string()
                } else {
                    failed.join("; ")
                }
            });
            Measured {
                hops,
                dir: rep.artifacts.dir,
                error,
            }
        }
        Err(e) => Measured {
            hops: vec![],
            dir: String::new(),
            error: Some(format!("{e:#}")),
        },
    }
}

/// Each kexec to the next exec-init, on the host's clock.
pub fn hops(events: &[EventRecord], boots: &[String]) -> Vec<Hop> {
    let mut out = Vec::new();
    for (i, k) in events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event == "kexec")
    {
        let Some(exec) = events[i + 1..].iter().find(|e| e.event == "exec-init") else {
            continue;
        };
        // The kexec line comes after its kernel's `boot` line, so its boot
        // index is right; the new kernel's `boot` line comes after exec-init.
        if let (Some(from), Some(to)) = (boots.get(k.boot), boots.get(k.boot + 1)) {
            out.push(Hop {
                from: from.clone(),
                to: to.clone(),
                ms: exec.t_host_ms - k.t_host_ms,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, boot: usize, ms: f64) -> EventRecord {
        EventRecord {
            event: event.into(),
            boot,
            t_mono_ns: 0,
            t_real_ns: 0,
            t_host_ms: ms,
            fields: vec![],
        }
    }

    fn measured(dir: &str) -> Measured {
        Measured {
            hops: vec![],
            dir: dir.into(),
            error: None,
        }
    }

    /// Threads asking for the same floor at once get one measurement; a
    /// floor of other kernels is measured on its own.
    #[test]
    fn concurrent_scenarios_measure_each_floor_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Barrier;
        use std::time::Duration;

        let floors = Floors::new();
        let runs = AtomicUsize::new(0);
        let start = Barrier::new(4);
        let results: Vec<(Measured, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        floors.get_or_measure("a b".into(), || {
                            runs.fetch_add(1, Ordering::SeqCst);
                            // Long enough for the others to ask meanwhile.
                            std::thread::sleep(Duration::from_millis(300));
                            measured("runs/a-floor")
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|(m, _)| m.dir == "runs/a-floor"));
        assert_eq!(results.iter().filter(|(_, shared)| !shared).count(), 1);

        let (m, shared) = floors.get_or_measure("b a".into(), || {
            runs.fetch_add(1, Ordering::SeqCst);
            measured("runs/b-floor")
        });
        assert_eq!((m.dir.as_str(), shared), ("runs/b-floor", false));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn each_kexec_is_timed_to_the_next_exec_init() {
        let events = vec![
            ev("init-start", 0, 100.0),
            ev("exec-init", 0, 900.0),
            ev("kexec", 0, 20_000.0),
            ev("init-start", 0, 23_000.0),
            ev("exec-init", 0, 24_250.0),
            ev("kexec", 1, 40_000.0),
            ev("exec-init", 1, 44_000.0),
            // A kexec whose new kernel never got to its init.
            ev("kexec", 2, 60_000.0),
        ];
        let boots = vec!["a".to_string(), "b".into(), "a".into()];
        assert_eq!(
            hops(&events, &boots),
            vec![
                Hop {
                    from: "a".into(),
                    to: "b".into(),
                    ms: 4250.0
                },
                Hop {
                    from: "b".into(),
                    to: "a".into(),
                    ms: 4000.0
                },
            ]
        );
    }
}
