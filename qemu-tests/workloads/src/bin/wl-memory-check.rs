//! Proves from a wl-memory log that memory of every kind came through the
//! upgrades intact: the common checks on the main process and its peer (one
//! pid each, seq from 0 without gap, monotonic time, at least N boots); the
//! large private mapping matched its checksums on every line (1/64 of it per
//! tick) and in full on the first line of every boot; the memfd, the
//! /dev/shm object and the file on the root file system kept their pattern
//! and counter on every line; and through the /dev/shm object each process
//! kept seeing the other's counter grow, in every boot, never going back.
//! See wl-memory for what stands in for mmap and SysV IPC.
//!
//! Usage: `wl-memory-check LOG [min boots, 2]`.

use kupgrade_workloads::{advancing, all_ok, check_streams, checker_main, constant, Line};

fn check(lines: Vec<Line>, min_boots: usize) -> Result<String, String> {
    let s = check_streams(lines, &["main", "peer"], min_boots)?;
    let (main, peer) = (&s[0], &s[1]);
    let mib: u64 = constant(main, "private_mib")?
        .parse()
        .map_err(|_| "bad private_mib".to_string())?;
    for k in ["private", "memfd", "shm", "file"] {
        all_ok(main, k)?;
    }
    all_ok(peer, "shm")?;
    for seg in main.segments() {
        if seg[0].get("full") != Some("ok") {
            return Err(format!(
                "line {}: no full check of private memory on the first line of boot {}",
                seg[0].no, seg[0].boot
            ));
        }
    }
    for st in [main, peer] {
        if let Some(l) = st
            .lines
            .iter()
            .find(|l| l.num::<u64>("mine").ok() != Some(l.seq))
        {
            return Err(format!(
                "{}: line {}: own counter {} is not the line's seq",
                st.src,
                l.no,
                l.str("mine")?
            ));
        }
        advancing(st, "theirs")?;
    }
    let (seen_by_main, seen_by_peer) = (
        main.last().num::<u64>("theirs")?,
        peer.last().num::<u64>("theirs")?,
    );
    if seen_by_main > peer.last().seq + 1 || seen_by_peer > main.last().seq + 1 {
        return Err("a counter seen through /dev/shm is ahead of its writer".into());
    }
    let checks = main.lines.len();
    Ok(format!(
        "{mib} MiB of private memory checked in full at the start of each of {} boot(s) and by 1/64 on {checks} ticks, \
         memfd, {} and {} intact on every line, counters exchanged through /dev/shm by pids {} and {} in every boot; {}; {}",
        main.boots.len(),
        constant(main, "shm_name")?,
        constant(main, "file_path")?,
        main.pid,
        peer.pid,
        main.summary(),
        peer.summary()
    ))
}

fn main() {
    checker_main("wl-memory-check LOG [min boots]", check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn main_line(s: u64) -> String {
        // Boots start on lines 0 and 5.
        let full = if s == 0 || s == 5 { "ok" } else { "-" };
        format!(
            "private_mib=256 chunk={s} private=ok full={full} memfd=ok shm=ok file=ok mine={s} theirs={} shm_name=/x file_path=/y",
            s.saturating_sub(1)
        )
    }

    fn run(
        main: impl Fn(u64) -> String,
        peer_theirs: impl Fn(u64) -> u64,
    ) -> Result<String, String> {
        let b = testlog::boots(2, 5);
        let text = testlog::lines("main", 20, &b, main)
            + &testlog::lines("peer", 21, &b, |s| {
                format!("shm=ok mine={s} theirs={}", peer_theirs(s))
            });
        check(parse_log(&text)?, 2)
    }

    #[test]
    fn good_log_passes() {
        assert!(run(main_line, |s| s).expect("ok").starts_with(
            "256 MiB of private memory checked in full at the start of each of 2 boot(s)"
        ));
    }

    #[test]
    fn damage_fails() {
        // One field going bad on one line fails the check.
        for (line, field) in [(7, "private"), (8, "memfd"), (8, "file")] {
            let damaged = |s| {
                let l = main_line(s);
                if s == line {
                    l.replace(&format!("{field}=ok"), &format!("{field}=BAD"))
                } else {
                    l
                }
            };
            assert!(run(damaged, |s| s).is_err(), "{field}=BAD on line {line}");
        }
        assert!(run(|s| main_line(s).replace("full=ok", "full=-"), |s| s)
            .unwrap_err()
            .contains("full check"));
        // The peer stops seeing the main process's counter after the upgrade.
        assert!(run(main_line, |s| s.min(5))
            .unwrap_err()
            .contains("did not grow"));
        // The shm object came back empty: counters reset.
        assert!(run(main_line, |s| if s >= 5 { s - 5 } else { s })
            .unwrap_err()
            .contains("went back"));
    }
}
