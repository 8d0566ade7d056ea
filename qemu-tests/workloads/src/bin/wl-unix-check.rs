//! Proves from a wl-unix log that unix domain sockets between two processes
//! came through the upgrades with their queued data: the common checks on
//! sender and receiver (one pid each, seq from 0 without gap, monotonic time,
//! at least N boots), and on each channel (stream socketpair, datagram
//! socketpair, named stream socket) the receiver got record 0, 1, 2, ...
//! exactly once, in order, with every checksum right, and never more than the
//! sender sent.
//!
//! Usage: `wl-unix-check LOG [min boots, 2]`.

use kupgrade_workloads::{check_streams, checker_main, constant, Line};

fn check(lines: Vec<Line>, min_boots: usize) -> Result<String, String> {
    let s = check_streams(lines, &["sender", "receiver"], min_boots)?;
    let (tx, rx) = (&s[0], &s[1]);
    let path = constant(tx, "path")?;
    for l in &tx.lines {
        if l.num::<u64>("sent")? != l.seq {
            return Err(format!(
                "line {}: sender logged sent={} as line {}",
                l.no,
                l.str("sent")?,
                l.seq
            ));
        }
    }
    let mut max_lag = 0u64;
    for l in &rx.lines {
        for ch in ["stream", "dgram", "named"] {
            let got = l.str(ch)?;
            if got != l.seq.to_string() {
                let what = if got == "BAD" {
                    "a bad checksum or a cut datagram"
                } else {
                    "a lost, repeated or reordered message"
                };
                return Err(format!(
                    "line {}: {ch} channel gave message {got} where {} was due: {what}",
                    l.no, l.seq
                ));
            }
        }
        if l.str("sums")? != "ok" {
            return Err(format!("line {}: bad checksum", l.no));
        }
        max_lag = max_lag.max(l.num("lag_ms")?);
    }
    if rx.last().seq > tx.last().seq + 1 {
        return Err(format!(
            "receiver got message {} but the sender sent up to {}",
            rx.last().seq,
            tx.last().seq
        ));
    }
    Ok(format!(
        "messages 0..={} received once and in order on the stream pair, the datagram pair and {path}, \
         {} still queued per channel at the end, longest queued {max_lag} ms; {}; {}",
        rx.last().seq,
        tx.last().seq.saturating_sub(rx.last().seq),
        tx.summary(),
        rx.summary()
    ))
}

fn main() {
    checker_main("wl-unix-check LOG [min boots]", check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn log(dgram: impl Fn(u64) -> String) -> String {
        let b = testlog::boots(2, 5);
        testlog::lines("sender", 10, &b, |s| format!("sent={s} path=/run/x.sock"))
            + &testlog::lines("receiver", 11, &b, |s| {
                format!("stream={s} dgram={} named={s} sums=ok lag_ms=500", dgram(s))
            })
    }

    fn run(text: &str) -> Result<String, String> {
        check(parse_log(text)?, 2)
    }

    #[test]
    fn good_and_bad() {
        assert!(run(&log(|s| s.to_string()))
            .expect("ok")
            .contains("messages 0..=9 received once"));
        assert!(
            run(&log(|s| if s == 6 { "7".into() } else { s.to_string() }))
                .unwrap_err()
                .contains("dgram channel")
        );
        assert!(
            run(&log(|s| if s == 6 { "BAD".into() } else { s.to_string() }))
                .unwrap_err()
                .contains("checksum")
        );
        assert!(run(&log(|s| s.to_string()).replace("named=3 ", "named=2 "))
            .unwrap_err()
            .contains("named"));
        let only_sender: String = log(|s| s.to_string())
            .lines()
            .filter(|l| l.contains("sender"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(run(&only_sender).is_err());
    }
}
