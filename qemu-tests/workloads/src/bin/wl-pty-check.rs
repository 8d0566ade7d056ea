//! Proves from a wl-pty log that a shell on a pseudo-terminal kept its
//! terminal and its job through the upgrades: the common checks (one pid,
//! seq from 0 without gap, at least N boots), every tick answered through
//! the terminal (`mark` = seq), the same terminal, shell and job pid on
//! every line, the job `Running` on every line. Then the processes: the
//! shell still has that terminal as its controlling terminal and
//! `/dev/tty` open, and its job still runs, its child, in a process group
//! of its own, with that terminal as its stdin, stdout and stderr. (Not as
//! its controlling terminal: CRIU 3.17 gives that back to the session's
//! leader only, see the scenario's limits.)
//!
//! Usage: `wl-pty-check LOG [min boots, 2]`.

use std::path::Path;

use kupgrade_workloads::{check_streams, checker_main, constant, Line};

/// `/dev/pts/N` from the `tty_nr` of a stat line, if it is a pty slave.
fn pts_of(tty_nr: u32) -> Option<String> {
    let (major, minor) = (
        (tty_nr >> 8) & 0xfff,
        (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00),
    );
    (136..144)
        .contains(&major)
        .then(|| format!("/dev/pts/{}", (major - 136) * 256 + minor))
}

/// (parent, process group, controlling terminal) of a running process.
fn now(pid: &str) -> Result<(String, String, Option<String>), String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("pid {pid} is gone: {e}"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).map(|s| s.to_string()).ok_or("short stat");
    let tty: i32 = field(4)?.parse().map_err(|_| "bad tty_nr")?;
    Ok((field(1)?, field(2)?, pts_of(tty as u32)))
}

fn check(lines: Vec<Line>, min_boots: usize) -> Result<String, String> {
    let s = check_streams(lines, &[""], min_boots)?;
    let s = &s[0];
    for l in &s.lines {
        if l.num::<u64>("mark")? != l.seq {
            return Err(format!("line {}: answer to another tick", l.no));
        }
        if l.str("job")? != "Running" {
            return Err(format!(
                "line {}: the job is {}, not Running",
                l.no,
                l.str("job")?
            ));
        }
    }
    let tty = constant(s, "tty")?;
    constant(s, "shell")?;
    let job = constant(s, "job_pid")?;
    if tty == "none" || job == "none" {
        return Err(format!("the shell answered tty={tty} job_pid={job}"));
    }
    Ok(format!(
        "the shell on {tty} answered all {} ticks through the terminal, its job {job} running on every one; {}",
        s.lines.len(),
        s.summary()
    ))
}

fn main() {
    checker_main("wl-pty-check LOG [min boots]", |lines, min_boots| {
        let said = check(lines.clone(), min_boots)?;
        let last = lines.last().ok_or("no lines")?;
        let (tty, shell, job) = (last.str("tty")?, last.str("shell")?, last.str("job_pid")?);
        let (_, _, shell_tty) = now(shell)?;
        if shell_tty.as_deref() != Some(tty) {
            return Err(format!(
                "the shell {shell}'s controlling terminal is {shell_tty:?}, not {tty}"
            ));
        }
        let holds_tty = std::fs::read_dir(format!("/proc/{shell}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/dev/tty")));
        if !holds_tty {
            return Err(format!("the shell {shell} no longer has /dev/tty open"));
        }
        let (parent, pgrp, _) = now(job)?;
        if (parent.as_str(), pgrp.as_str()) != (shell, job) {
            return Err(format!(
                "the job {job} has parent {parent} and group {pgrp}: not the shell's job in a group of its own"
            ));
        }
        for fd in 0..3 {
            let at = std::fs::read_link(format!("/proc/{job}/fd/{fd}"))
                .map_err(|e| format!("the job {job}'s fd {fd}: {e}"))?;
            if at != Path::new(tty) {
                return Err(format!(
                    "the job {job}'s fd {fd} is {}, not {tty}",
                    at.display()
                ));
            }
        }
        Ok(format!(
            "{said}; the shell {shell} has {tty} as its controlling terminal and /dev/tty open, and its job runs in its own process group on it"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn log(job: impl Fn(u64) -> &'static str) -> String {
        testlog::lines("", 10, &testlog::boots(2, 5), |s| {
            format!(
                "tty=/dev/pts/0 shell=10 job_pid=12 job={} mark={s} rtt_ms=3",
                job(s)
            )
        })
    }

    fn run(text: &str) -> Result<String, String> {
        check(parse_log(text)?, 2)
    }

    #[test]
    fn terminal_and_job_kept() {
        assert!(run(&log(|_| "Running"))
            .expect("ok")
            .contains("on /dev/pts/0"));
        assert!(run(&log(|s| if s == 7 { "Done" } else { "Running" }))
            .unwrap_err()
            .contains("Done"));
        assert!(run(&log(|_| "Running").replace("mark=6 ", "mark=5 "))
            .unwrap_err()
            .contains("another tick"));
        assert!(
            run(&log(|_| "Running").replacen("tty=/dev/pts/0", "tty=/dev/pts/1", 1))
                .unwrap_err()
                .contains("tty")
        );
        assert!(
            run(&log(|_| "Running").replace("job_pid=12", "job_pid=none"))
                .unwrap_err()
                .contains("job_pid=none")
        );
        assert_eq!(pts_of(136 << 8), Some("/dev/pts/0".into()));
        assert_eq!(pts_of((137 << 8) | 44), Some("/dev/pts/300".into()));
        assert_eq!(pts_of((4 << 8) | 1), None);
    }
}
