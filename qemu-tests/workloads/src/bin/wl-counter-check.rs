//! Proves from a wl-counter log that the counter carried on across a kernel
//! upgrade: one pid, `seq` consecutive from 0, memory intact on every line,
//! monotonic time never going back, and lines from at least N boots.

use std::collections::BTreeSet;

use kupgrade_workloads::field;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(log) = args.next() else {
        eprintln!("usage: wl-counter-check LOG [min boots]");
        std::process::exit(2);
    };
    let min_boots: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let text = match std::fs::read_to_string(&log) {
        Ok(t) => t,
        Err(e) => fail(&format!("cannot read {log}: {e}")),
    };
    let (mut pids, mut boots) = (BTreeSet::new(), Vec::<String>::new());
    let (mut last_seq, mut last_mono, mut max_gap) = (None::<u64>, 0u64, 0u64);
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let get = |k| field(line, k).unwrap_or_else(|| fail(&format!("line {n}: no {k}= in {line:?}")));
        let seq: u64 = get("seq").parse().unwrap_or_else(|_| fail(&format!("line {n}: bad seq")));
        let mono: u64 = get("mono_ms").parse().unwrap_or_else(|_| fail(&format!("line {n}: bad mono_ms")));
        if seq != last_seq.map_or(0, |s| s + 1) {
            fail(&format!("line {n}: seq {seq} after {last_seq:?}: a gap or a restart"));
        }
        if get("mem") != "ok" {
            fail(&format!("line {n}: anonymous memory changed"));
        }
        if last_seq.is_some() && mono < last_mono {
            fail(&format!("line {n}: CLOCK_MONOTONIC went back from {last_mono} to {mono}"));
        }
        if last_seq.is_some() {
            max_gap = max_gap.max(mono - last_mono);
        }
        pids.insert(get("pid").to_string());
        let boot = get("boot").to_string();
        if boots.last() != Some(&boot) {
            if boots.contains(&boot) {
                fail(&format!("line {n}: back on an earlier boot {boot}"));
            }
            boots.push(boot);
        }
        (last_seq, last_mono) = (Some(seq), mono);
    }
    if pids.len() != 1 {
        fail(&format!("{} different pids: {pids:?}", pids.len()));
    }
    if boots.len() < min_boots {
        fail(&format!("lines from {} boot(s), expected at least {min_boots}", boots.len()));
    }
    println!(
        "ok: {} lines, seq 0..={}, pid {}, {} boots, longest monotonic gap {max_gap} ms",
        text.lines().count(),
        last_seq.unwrap_or(0),
        pids.iter().next().map_or("?", |s| s.as_str()),
        boots.len()
    );
}

fn fail(msg: &str) -> ! {
    println!("FAIL: {msg}");
    std::process::exit(1);
}
