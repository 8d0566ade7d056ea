//! Proves from a wl-shm log that a daemon running as its own user kept its
//! POSIX shared memory through the upgrades and could open it again by name
//! after each one: the common checks (one pid, seq from 0 without gap, at
//! least N boots); the counter in the mapping went on from where it was
//! (`n` = seq + 1); every reopen by name succeeded and saw that counter;
//! and `/dev/shm/NAME` is still owned by the daemon's user, mode 0600.
//!
//! Usage: `wl-shm-check LOG [min boots, 2]`.

use std::os::unix::fs::MetadataExt;

use kupgrade_workloads::{all_ok, check_streams, checker_main, constant, Line};

fn check(lines: Vec<Line>, min_boots: usize) -> Result<(String, String, u32), String> {
    let s = check_streams(lines, &[""], min_boots)?;
    let s = &s[0];
    for l in &s.lines {
        let n: u64 = l.num("n")?;
        if n != l.seq + 1 {
            return Err(format!(
                "line {}: the counter in the mapping is {n} after {} ticks",
                l.no,
                l.seq + 1
            ));
        }
        if l.str("reopen")? == "ok" && l.num::<u64>("seen")? != n {
            return Err(format!(
                "line {}: opened again, the object held {}, the mapping {n}",
                l.no,
                l.str("seen")?
            ));
        }
    }
    all_ok(s, "reopen")?;
    let name = constant(s, "name")?.trim_start_matches('/').to_string();
    let uid: u32 = constant(s, "uid")?
        .parse()
        .map_err(|_| "bad uid".to_string())?;
    let said = format!(
        "the counter in /dev/shm/{name} went on to {} and every open by name as uid {uid} saw it; {}",
        s.last().num::<u64>("n")?,
        s.summary()
    );
    Ok((said, name, uid))
}

fn main() {
    checker_main("wl-shm-check LOG [min boots]", |lines, min_boots| {
        let (said, name, uid) = check(lines, min_boots)?;
        let path = format!("/dev/shm/{name}");
        let m = std::fs::metadata(&path).map_err(|e| format!("{path}: {e}"))?;
        let (owner, mode) = ((m.uid(), m.gid()), m.mode() & 0o7777);
        if owner != (uid, uid) || mode != 0o600 {
            return Err(format!(
                "{path} is owned by {}:{} mode {mode:o}, made by {uid}:{uid} mode 600",
                owner.0, owner.1
            ));
        }
        Ok(format!("{said}; {path} is {uid}:{uid} mode 600 as made"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn log(reopen: impl Fn(u64) -> &'static str) -> String {
        testlog::lines("", 10, &testlog::boots(2, 5), |s| {
            format!(
                "name=wl-shm uid=1234 n={} reopen={} seen={}",
                s + 1,
                reopen(s),
                s + 1
            )
        })
    }

    fn run(text: &str) -> Result<String, String> {
        check(parse_log(text)?, 2).map(|(said, _, _)| said)
    }

    #[test]
    fn reopened_by_name_after_the_upgrade() {
        assert!(run(&log(|_| "ok")).expect("ok").contains("went on to 10"));
        // After the upgrade a root-owned copy refuses the daemon's user.
        assert!(
            run(&log(|s| if s >= 5 { "PermissionDenied" } else { "ok" }))
                .unwrap_err()
                .contains("PermissionDenied")
        );
        assert!(run(&log(|_| "ok").replace("n=7 ", "n=1 "))
            .unwrap_err()
            .contains("counter in the mapping is 1"));
        assert!(run(&log(|_| "ok").replace("seen=7", "seen=6"))
            .unwrap_err()
            .contains("held 6"));
    }
}
