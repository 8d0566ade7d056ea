//! Proves from a wl-threads log that a multi-threaded process came through
//! the upgrades whole: the common checks (one pid, seq from 0 without gap,
//! monotonic time, at least N boots), the same thread count and the same
//! TIDs on every line, both as the threads saw them (gettid) and as the
//! kernel lists them (/proc/self/task = the pid plus those TIDs), and every
//! thread's counter never going back (no reset) and advancing within every
//! boot (each thread kept running after each restore).
//!
//! Usage: `wl-threads-check LOG [min boots, 2]`.

use kupgrade_workloads::{check_streams, checker_main, constant, Line};

fn check(lines: Vec<Line>, min_boots: usize) -> Result<String, String> {
    let s = check_streams(lines, &[""], min_boots)?.remove(0);
    let n: usize = constant(&s, "threads")?
        .parse()
        .map_err(|_| "bad threads=".to_string())?;
    constant(&s, "tids")?;
    constant(&s, "tasks")?;
    let first = &s.lines[0];
    let tids: Vec<u32> = first.list("tids")?;
    let mut want = tids.clone();
    want.push(s.pid);
    want.sort_unstable();
    if n == 0 || tids.len() != n || first.list::<u32>("tasks")? != want {
        return Err(format!(
            "line {}: tids {tids:?} and tasks {:?} do not match {n} threads",
            first.no,
            first.get("tasks")
        ));
    }
    let mut prev: Option<Vec<u64>> = None;
    for l in &s.lines {
        let c: Vec<u64> = l.list("counters")?;
        if c.len() != n {
            return Err(format!(
                "line {}: {} counters for {n} threads",
                l.no,
                c.len()
            ));
        }
        if let Some(p) = &prev {
            if let Some(i) = (0..n).find(|i| c[*i] < p[*i]) {
                return Err(format!(
                    "line {}: thread {i} counter went back from {} to {}: a reset",
                    l.no, p[i], c[i]
                ));
            }
        }
        prev = Some(c);
    }
    for seg in s.segments() {
        let (a, b): (Vec<u64>, Vec<u64>) = (
            seg[0].list("counters")?,
            seg[seg.len() - 1].list("counters")?,
        );
        if let Some(i) = (0..n).find(|i| b[*i] <= a[*i]) {
            return Err(format!(
                "boot {}: thread {i} did not advance (counter {} to {})",
                seg[0].boot, a[i], b[i]
            ));
        }
    }
    Ok(format!(
        "{}; {n} threads, tids {} unchanged, counters now {}",
        s.summary(),
        first.str("tids")?,
        s.last().str("counters")?
    ))
}

fn main() {
    checker_main("wl-threads-check LOG [min boots]", check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn log(extra: impl Fn(u64) -> String) -> String {
        testlog::lines("", 10, &testlog::boots(2, 4), extra)
    }

    fn good(s: u64) -> String {
        format!(
            "threads=2 tids=11,12 tasks=10,11,12 counters={},{}",
            s * 10,
            s * 9
        )
    }

    fn run(text: &str) -> Result<String, String> {
        check(parse_log(text)?, 2)
    }

    #[test]
    fn good_log_passes() {
        assert!(run(&log(good))
            .expect("ok")
            .contains("2 threads, tids 11,12 unchanged"));
    }

    #[test]
    fn changes_fail() {
        let tid = log(|s| {
            if s == 5 {
                good(s).replace("tids=11,12", "tids=11,13")
            } else {
                good(s)
            }
        });
        assert!(run(&tid).unwrap_err().contains("tids"));
        let task = log(|s| {
            if s == 5 {
                good(s).replace("tasks=10,11,12", "tasks=10,11")
            } else {
                good(s)
            }
        });
        assert!(run(&task).is_err());
        let reset = log(|s| {
            if s >= 4 {
                format!("threads=2 tids=11,12 tasks=10,11,12 counters={s},{}", s * 9)
            } else {
                good(s)
            }
        });
        assert!(run(&reset).unwrap_err().contains("reset"));
        let stuck = log(|s| {
            format!(
                "threads=2 tids=11,12 tasks=10,11,12 counters={},{}",
                s * 10,
                s.min(4)
            )
        });
        assert!(run(&stuck).unwrap_err().contains("did not advance"));
        let wrong = log(|s| good(s).replace("tasks=10,11,12", "tasks=10,11,14"));
        assert!(run(&wrong).is_err());
    }
}
