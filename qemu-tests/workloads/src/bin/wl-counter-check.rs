//! Proves from a wl-counter log that the counter carried on across a kernel
//! upgrade: one pid, `seq` consecutive from 0, memory intact on every line,
//! monotonic time never going back, and lines from at least N boots.
//!
//! Usage: `wl-counter-check LOG [min boots, 2]`.

use kupgrade_workloads::{check_streams, checker_main, Line};

fn check(lines: Vec<Line>, min_boots: usize) -> Result<String, String> {
    let s = check_streams(lines, &[""], min_boots)?.remove(0);
    if let Some(l) = s.lines.iter().find(|l| l.get("mem") != Some("ok")) {
        return Err(format!("line {}: anonymous memory changed", l.no));
    }
    Ok(s.summary())
}

fn main() {
    checker_main("wl-counter-check LOG [min boots]", check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn run(text: &str, min_boots: usize) -> Result<String, String> {
        check(parse_log(text)?, min_boots)
    }

    #[test]
    fn passes_and_fails() {
        let good = testlog::lines("", 7, &testlog::boots(2, 4), |_| "mem=ok".into());
        assert!(run(&good, 2)
            .expect("ok")
            .starts_with("8 lines, seq 0..=7, pid 7, 2 boots"));
        assert!(run(&good, 3).is_err());
        let bad = testlog::lines("", 7, &testlog::boots(2, 4), |s| {
            if s == 5 { "mem=BAD" } else { "mem=ok" }.into()
        });
        assert!(run(&bad, 2).unwrap_err().contains("memory"));
        assert!(run("", 1).is_err());
    }
}
