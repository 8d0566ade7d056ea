//! One scenario from start to end: boot and judge it ([`crate::run`]), then
//! set its upgrade against the bare kexec of the same kernels
//! ([`crate::floor`]) and draw its timeline.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use crate::floor::Floors;
use crate::report::Report;
use crate::run::{self, Options};
use crate::scenario::Expect;
use crate::{fleet, progress, stop};

/// Runs one scenario and returns its report; the verdict says whether it
/// passed. An upgrade is compared with the bare kexec of the same kernels,
/// from `floors` or measured now.
pub fn run(scenario_path: &Path, opts: &Options, floors: &Floors) -> Result<Report> {
    let started = Instant::now();
    let p = run::prepare(scenario_path, opts)?;
    let scenario_dir = scenario_path.parent().unwrap_or(Path::new("."));
    if p.scenario.fleet.is_some() {
        // Its upgrades are judged host by host, not against a floor.
        return fleet::run(&p, scenario_dir, opts);
    }
    let mut rep = run::run_prepared(&p, scenario_dir, opts)?;
    if p.scenario.upgrade.expect == Expect::Success && stop::stopped().is_none() {
        floors.apply(&p, opts, &mut rep);
    }
    if !rep.upgrades.is_empty() {
        let svg = Path::new(&rep.artifacts.dir).join("timeline.svg");
        match fs::write(&svg, rep.timeline_svg()) {
            Ok(()) => rep.artifacts.timeline_svg = Some(svg.display().to_string()),
            Err(e) => progress::step(&format!("cannot write {}: {e}", svg.display())),
        }
    }
    rep.wall_secs = started.elapsed().as_secs_f64();
    Ok(rep)
}
