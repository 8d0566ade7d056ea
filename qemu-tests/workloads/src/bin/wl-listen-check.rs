//! Proves from a wl-listen log that a listening TCP socket and a bound UDP
//! socket kept serving across the upgrades: the common checks (one pid, seq
//! from 0 without gap, monotonic time, at least N boots), connections
//! accepted and datagrams answered under at least N different boots (so the
//! same sockets served the host's probes after each upgrade), connection and
//! datagram numbers consecutive (no restart of the server's counters).
//!
//! Usage: `wl-listen-check LOG [min boots, 2]`.

use std::collections::BTreeSet;

use kupgrade_workloads::{check_streams, checker_main, Line, Stream};

/// Boots under which `event=KIND` lines appear, checking that `key` counts
/// 0, 1, 2, ... over them.
fn served(s: &Stream, kind: &str, key: &str) -> Result<(usize, BTreeSet<String>), String> {
    let mut boots = BTreeSet::new();
    let mut n = 0;
    for l in s.lines.iter().filter(|l| l.get("event") == Some(kind)) {
        if l.num::<usize>(key)? != n {
            return Err(format!(
                "line {}: {kind} {key}={} where {n} was due",
                l.no,
                l.str(key)?
            ));
        }
        boots.insert(l.boot.clone());
        n += 1;
    }
    Ok((n, boots))
}

fn check(lines: Vec<Line>, min_boots: usize) -> Result<String, String> {
    let s = check_streams(lines, &[""], min_boots)?.remove(0);
    let (conns, tcp_boots) = served(&s, "accept", "conn")?;
    let (grams, udp_boots) = served(&s, "udp", "n")?;
    if tcp_boots.len() < min_boots {
        return Err(format!(
            "connections accepted under {} boot(s), expected {min_boots}",
            tcp_boots.len()
        ));
    }
    if udp_boots.len() < min_boots {
        return Err(format!(
            "datagrams answered under {} boot(s), expected {min_boots}",
            udp_boots.len()
        ));
    }
    Ok(format!(
        "{conns} connections accepted under {} boots, {grams} datagrams answered under {} boots; {}",
        tcp_boots.len(),
        udp_boots.len(),
        s.summary()
    ))
}

fn main() {
    checker_main("wl-listen-check LOG [min boots]", check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn run(text: &str) -> Result<String, String> {
        check(parse_log(text)?, 2)
    }

    fn event(s: u64) -> String {
        match s {
            1 => "event=accept conn=0 peer=10.0.2.2:5000".into(),
            2 => "event=udp n=0 peer=10.0.2.2:5001 bytes=4".into(),
            6 => "event=accept conn=1 peer=10.0.2.2:5002".into(),
            7 => "event=udp n=1 peer=10.0.2.2:5003 bytes=4".into(),
            _ => "event=tick accepts=0 datagrams=0".into(),
        }
    }

    #[test]
    fn good_and_bad() {
        let b = testlog::boots(2, 5);
        assert!(run(&testlog::lines("", 5, &b, event))
            .expect("ok")
            .starts_with("2 connections accepted under 2 boots"));
        let only_before = testlog::lines("", 5, &b, |s| {
            if s > 4 {
                "event=tick".into()
            } else {
                event(s)
            }
        });
        assert!(run(&only_before)
            .unwrap_err()
            .contains("accepted under 1 boot"));
        let no_udp_after = testlog::lines("", 5, &b, |s| {
            if s == 7 {
                "event=tick".into()
            } else {
                event(s)
            }
        });
        assert!(run(&no_udp_after).unwrap_err().contains("datagrams"));
        let restarted = testlog::lines("", 5, &b, |s| if s == 6 { event(1) } else { event(s) });
        assert!(run(&restarted).unwrap_err().contains("conn=0 where 1"));
    }
}
