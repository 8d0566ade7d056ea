//! Proves from a wl-pipes log that a process tree joined by a pipe, with an
//! orphaned grandchild, came through the upgrades: the common checks on each
//! of the three processes (one pid each, seq from 0 without gap, monotonic
//! time, at least N boots); the consumer received record 0, 1, 2, ... with
//! none lost, duplicated or reordered and every checksum right, never more
//! than the producer sent, and its parent is still the producer; the
//! grandchild's parent is the producer, not the middle process that started
//! it, on every line.
//!
//! Usage: `wl-pipes-check LOG [min boots, 2]`.

use kupgrade_workloads::{check_streams, checker_main, constant, Line};

fn check(lines: Vec<Line>, min_boots: usize) -> Result<String, String> {
    let s = check_streams(lines, &["producer", "consumer", "grandchild"], min_boots)?;
    let (prod, cons, grand) = (&s[0], &s[1], &s[2]);
    if prod.pid == cons.pid || prod.pid == grand.pid || cons.pid == grand.pid {
        return Err("two streams share a pid".into());
    }
    for l in &prod.lines {
        if l.num::<u64>("sent")? != l.seq {
            return Err(format!(
                "line {}: producer logged sent={} as line {}",
                l.no,
                l.str("sent")?,
                l.seq
            ));
        }
    }
    let mut max_lag = 0u64;
    for l in &cons.lines {
        if l.str("sum")? != "ok" {
            return Err(format!(
                "line {}: the consumer's record {} has a bad checksum",
                l.no, l.seq
            ));
        }
        let rec: u64 = l.num("rec")?;
        if rec != l.seq {
            let what = if rec < l.seq {
                "a duplicate or reordered record"
            } else {
                "lost records"
            };
            return Err(format!(
                "line {}: consumer got record {rec} where {} was due: {what}",
                l.no, l.seq
            ));
        }
        max_lag = max_lag.max(l.num("lag_ms")?);
    }
    if cons.last().seq > prod.last().seq + 1 {
        return Err(format!(
            "consumer got record {} but the producer sent up to {}",
            cons.last().seq,
            prod.last().seq
        ));
    }
    if constant(cons, "ppid")? != prod.pid.to_string() {
        return Err(format!(
            "the consumer's parent is {}, not the producer {}",
            constant(cons, "ppid")?,
            prod.pid
        ));
    }
    let ppid = constant(grand, "ppid")?;
    let orig = constant(grand, "orig_ppid")?;
    if ppid == orig || ppid != prod.pid.to_string() {
        return Err(format!(
            "grandchild's parent is {ppid} (started by {orig}), expected the producer {}",
            prod.pid
        ));
    }
    Ok(format!(
        "records 0..={} received in order with no loss, {} still in flight at the end, longest wait in the pipe {max_lag} ms; \
         grandchild {} adopted by producer {} from {orig}; {}; {}; {}",
        cons.last().seq,
        prod.last().seq.saturating_sub(cons.last().seq),
        grand.pid,
        prod.pid,
        prod.summary(),
        cons.summary(),
        grand.summary()
    ))
}

fn main() {
    checker_main("wl-pipes-check LOG [min boots]", check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn log(rec: impl Fn(u64) -> u64, gppid: u32) -> String {
        let b = testlog::boots(2, 5);
        testlog::lines("producer", 10, &b, |s| format!("sent={s}"))
            + &testlog::lines("consumer", 11, &b, |s| {
                format!("rec={} sum=ok ppid=10 lag_ms=500", rec(s))
            })
            + &testlog::lines("grandchild", 13, &b, |_| {
                format!("ppid={gppid} orig_ppid=12")
            })
    }

    fn run(text: &str) -> Result<String, String> {
        check(parse_log(text)?, 2)
    }

    #[test]
    fn good_log_passes() {
        assert!(run(&log(|s| s, 10))
            .expect("ok")
            .contains("records 0..=9 received in order"));
    }

    #[test]
    fn record_and_parent_problems_fail() {
        assert!(run(&log(|s| if s == 6 { 7 } else { s }, 10))
            .unwrap_err()
            .contains("lost"));
        assert!(run(&log(|s| if s == 6 { 5 } else { s }, 10))
            .unwrap_err()
            .contains("duplicate"));
        assert!(run(&log(|s| s, 12))
            .unwrap_err()
            .contains("grandchild's parent"));
        assert!(run(&log(|s| s, 1)).is_err());
        assert!(
            run(&log(|s| s, 10).replace("rec=3 sum=ok", "rec=3 sum=BAD"))
                .unwrap_err()
                .contains("checksum")
        );
        let no_grandchild: String = log(|s| s, 10)
            .lines()
            .filter(|l| !l.contains("grandchild"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(run(&no_grandchild)
            .unwrap_err()
            .contains("grandchild: no lines"));
    }
}
