//! Proves from a wl-memory log that memory of every kind came through the
//! upgrades intact: the common checks on the main process and its peer (one
//! pid each, seq from 0 without gap, monotonic time, at least N boots); the
//! large private mapping matched its checksums on every line (1/64 of it per
//! tick) and in full on the first check of every boot; the memfd, the
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
    // The first check made in each boot is a full one. A line written just
    // after a kexec may carry a check made in the boot before it.
    for seg in main.segments() {
        let boot = &seg[0].boot;
        let first = seg
            .iter()
            .find(|l| l.get("checked_in") == Some(boot.as_str()))
            .ok_or_else(|| format!("boot {boot}: no line checked in this boot"))?;
        if first.get("full") != Some("ok") {
            return Err(format!(
                "line {}: no full check of private memory on the first check of boot {boot}",
                first.no
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

    /// Boots a and b start on lines 0 and 5.
    fn main_line(s: u64) -> String {
        let full = if s == 0 || s == 5 { "ok" } else { "-" };
        let boot = if s < 5 { "a" } else { "b" };
        line(s, full, boot)
    }

    fn line(s: u64, full: &str, checked_in: &str) -> String {
        format!(
            "private_mib=256 chunk={s} private=ok full={full} checked_in={checked_in} memfd=ok shm=ok file=ok mine={s} theirs={} shm_name=/x file_path=/y",
            s.saturating_sub(1)
        )
    }

    /// The kexec came between the check of line 5 and its write: line 5 holds
    /// boot a's check, line 6 the first of boot b.
    fn late_line(s: u64, full_on_6: &str) -> String {
        match s {
            5 => line(s, "-", "a"),
            6 => line(s, full_on_6, "b"),
            _ => main_line(s),
        }
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
    fn a_check_written_after_the_kexec_counts_for_the_boot_it_was_made_in() {
        assert_eq!(run(|s| late_line(s, "ok"), |s| s).err(), None);
        assert!(run(|s| late_line(s, "-"), |s| s)
            .unwrap_err()
            .contains("no full check of private memory on the first check of boot b"));
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
