//! Reloads a wl-daemon through its pid file and proves from its log that
//! it came through the upgrades: CONF must still hold the value the daemon
//! runs with; then it reads the pid from PIDFILE, writes a new value into
//! CONF, sends that pid SIGHUP and waits for the daemon to log the new
//! value. Then the common checks on both streams (one pid each, seq
//! from 0 without gap, at least N boots); the pid file named the daemon at
//! every tick and names it now; the daemon counted exactly one reload, the
//! one just asked for; the worker kept its session and process group (whose
//! leader is long gone) across the upgrades.
//!
//! Usage: `wl-daemon-check LOG PIDFILE CONF [min boots, 2]`.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use kupgrade_workloads::{boot_id, check_streams, constant, finish, read_log, Args, Line};

/// What the log must show, once the reload to `token` was asked of `pid`.
fn judge(lines: Vec<Line>, pid: u32, token: &str, min_boots: usize) -> Result<String, String> {
    let s = check_streams(lines, &["daemon", "worker"], min_boots)?;
    let (d, w) = (&s[0], &s[1]);
    if d.last().pid != pid {
        return Err(format!(
            "the pid file names {pid}, the daemon logs as {}",
            d.last().pid
        ));
    }
    if let Some(l) = d.lines.iter().find(|l| l.get("pidfile") != Some("ok")) {
        return Err(format!(
            "line {}: the pid file said {} instead of the daemon's pid",
            l.no,
            l.str("pidfile")?
        ));
    }
    let Some(at) = d.lines.iter().position(|l| l.get("config") == Some(token)) else {
        return Err(format!("the daemon never logged config={token}"));
    };
    let before: Vec<u64> = d.lines[..at]
        .iter()
        .map(|l| l.num("reloads"))
        .collect::<Result<_, _>>()?;
    let after: Vec<u64> = d.lines[at..]
        .iter()
        .map(|l| l.num("reloads"))
        .collect::<Result<_, _>>()?;
    if before.iter().any(|r| *r != 0) || after.iter().any(|r| *r != 1) {
        return Err(format!(
            "reloads {before:?} before config={token}, {after:?} after: expected 0 then 1"
        ));
    }
    let (sid, pgid) = (constant(w, "sid")?, constant(w, "pgid")?);
    let (old, new) = (d.lines[0].str("sid")?, d.last().str("sid")?);
    Ok(format!(
        "reloaded through its pid file after {} boots: config={token} after one SIGHUP; \
         the pid file named pid {pid} at every tick; the worker kept its orphaned session {sid} and \
         group {pgid}; the daemon's session went from {old} to {new} (a shell job takes CRIU's); {}; {}",
        d.boots.len(),
        d.summary(),
        w.summary()
    ))
}

fn reload(log: &str, pidfile: &str, conf: &str, min_boots: usize) -> Result<String, String> {
    let text = std::fs::read_to_string(pidfile).map_err(|e| format!("{pidfile}: {e}"))?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{pidfile} holds {:?}, not a pid", text.trim()))?;
    // The configuration it runs with is still there (on a tmpfs, say).
    let running = read_log(log)?
        .iter()
        .rev()
        .find(|l| l.src == "daemon")
        .and_then(|l| l.get("config").map(str::to_string))
        .ok_or("the daemon logged no config")?;
    let now = std::fs::read_to_string(conf).map_err(|e| format!("{conf}: {e}"))?;
    if now.split_whitespace().next() != Some(running.as_str()) {
        return Err(format!(
            "{conf} holds {:?}, the daemon runs with {running:?}",
            now.trim()
        ));
    }
    let token = format!("reloaded-{}", boot_id().get(..8).unwrap_or("boot"));
    std::fs::write(conf, format!("{token}\n")).map_err(|e| format!("{conf}: {e}"))?;
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP)
        .map_err(|e| format!("kill -HUP {pid} (from {pidfile}): {e}"))?;
    let start = Instant::now();
    loop {
        let lines = read_log(log)?;
        let reloaded = lines
            .iter()
            .any(|l| l.src == "daemon" && l.get("config") == Some(token.as_str()));
        // A few lines more, so that the last boot has enough of them.
        if reloaded && start.elapsed() > Duration::from_secs(1) {
            return judge(lines, pid, &token, min_boots);
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "pid {pid} got SIGHUP but logged no config={token} within 30 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() {
    let mut args = Args::new("wl-daemon-check LOG PIDFILE CONF [min boots]");
    let (log, pidfile, conf) = (args.req(), args.req(), args.req());
    let min_boots: usize = args.opt(2);
    finish(reload(&log, &pidfile, &conf, min_boots))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn log(reloads: impl Fn(u64) -> u64, pidfile: impl Fn(u64) -> &'static str) -> String {
        let b = testlog::boots(2, 5);
        testlog::lines("daemon", 10, &b, |s| {
            let config = if s >= 8 { "new" } else { "initial" };
            format!(
                "config={config} reloads={} pidfile={} sid=9 pgid=9",
                reloads(s),
                pidfile(s)
            )
        }) + &testlog::lines("worker", 12, &b, |_| "sid=11 pgid=11".into())
    }

    fn run(text: &str, pid: u32) -> Result<String, String> {
        judge(parse_log(text)?, pid, "new", 2)
    }

    #[test]
    fn one_reload_through_the_pid_file_after_the_upgrade() {
        let good = log(|s| u64::from(s >= 8), |_| "ok");
        assert!(run(&good, 10)
            .expect("ok")
            .contains("config=new after one SIGHUP"));
        assert!(run(&good, 11).unwrap_err().contains("names 11"));
        assert!(run(
            &log(
                |s| u64::from(s >= 8),
                |s| if s == 6 { "missing" } else { "ok" }
            ),
            10
        )
        .unwrap_err()
        .contains("said missing"));
        assert!(run(&log(|s| u64::from(s >= 3), |_| "ok"), 10)
            .unwrap_err()
            .contains("expected 0 then 1"));
        assert!(run(
            &log(|_| 0, |_| "ok").replace("config=new", "config=old"),
            10
        )
        .unwrap_err()
        .contains("never logged config=new"));
        let moved = good.replacen("src=worker sid=11", "src=worker sid=13", 1);
        assert!(run(&moved, 10).unwrap_err().contains("sid"));
    }
}
