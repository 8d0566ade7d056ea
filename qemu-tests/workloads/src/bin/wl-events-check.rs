//! Proves from a wl-events log that an epoll event loop and the process's
//! signal state came through the upgrades, and that time behaved (this is
//! also the checker of the "time" scenario):
//! - the common checks: one pid, seq from 0 without gap, CLOCK_MONOTONIC
//!   never going back, at least N boots;
//! - signal state unchanged on every line: the blocked mask (SigBlk, with
//!   SIGUSR1, SIGALRM, SIGVTALRM), the caught set (SigCgt, with the SIGUSR2
//!   handler) and the ignored set (SigIgn); SIGALRM still pending for the
//!   process (ShdPnd) and SIGVTALRM for the main thread (SigPnd);
//! - in every boot, timerfd expirations, eventfd counts, signalfd SIGUSR1s
//!   and handled SIGUSR2s all kept coming, never more than were sent, and no
//!   eventfd count lost (received within a few of sent at the end);
//! - in every boot after the first (the only one when min boots is 1), the
//!   periodic timer fired at its period: expirations counted by the kernel
//!   match the elapsed monotonic time, and the median gap between lines is
//!   near the expected one (the first gap of a boot, which spans the
//!   upgrade, is left out).
//!
//! Usage: `wl-events-check LOG [min boots, 2]`.

use kupgrade_workloads::{advancing, check_streams, checker_main, constant, Line};

const SIGUSR1: u32 = 10;
const SIGUSR2: u32 = 12;
const SIGALRM: u32 = 14;
const SIGVTALRM: u32 = 26;
/// Lines a boot needs for its timer to be judged.
const MIN_TIMER_LINES: usize = 6;

fn bit(sig: u32) -> u64 {
    1 << (sig - 1)
}

fn mask(l: &Line, key: &str) -> Result<u64, String> {
    u64::from_str_radix(l.str(key)?, 16).map_err(|_| format!("line {}: bad {key}", l.no))
}

fn check(lines: Vec<Line>, min_boots: usize) -> Result<String, String> {
    let s = check_streams(lines, &[""], min_boots)?.remove(0);
    let blk = u64::from_str_radix(constant(&s, "blk")?, 16).map_err(|_| "bad blk".to_string())?;
    let cgt = u64::from_str_radix(constant(&s, "cgt")?, 16).map_err(|_| "bad cgt".to_string())?;
    let ign = constant(&s, "ign")?.to_string();
    let want_blk = bit(SIGUSR1) | bit(SIGALRM) | bit(SIGVTALRM);
    if blk & want_blk != want_blk {
        return Err(format!(
            "blocked mask {blk:016x} lacks SIGUSR1, SIGALRM or SIGVTALRM"
        ));
    }
    if cgt & bit(SIGUSR2) == 0 {
        return Err(format!("caught set {cgt:016x} has no SIGUSR2 handler"));
    }
    let period: u64 = constant(&s, "period_ms")?
        .parse()
        .map_err(|_| "bad period_ms".to_string())?;
    let every: u64 = constant(&s, "every")?
        .parse()
        .map_err(|_| "bad every".to_string())?;
    let nominal = period * every;
    for l in &s.lines {
        if mask(l, "shdpnd")? & bit(SIGALRM) == 0 {
            return Err(format!(
                "line {}: SIGALRM no longer pending for the process",
                l.no
            ));
        }
        if mask(l, "pnd")? & bit(SIGVTALRM) == 0 {
            return Err(format!(
                "line {}: SIGVTALRM no longer pending for the main thread",
                l.no
            ));
        }
        for k in ["efd", "usr1", "usr2"] {
            if l.num::<u64>(k)? > l.num(&format!("{k}_sent"))? {
                return Err(format!(
                    "line {}: {k}={} is more than was sent",
                    l.no,
                    l.str(k)?
                ));
            }
        }
    }
    for k in ["exp", "efd", "usr1", "usr2"] {
        advancing(&s, k)?;
    }
    let last = s.last();
    let lost = last.num::<u64>("efd_sent")? - last.num::<u64>("efd")?;
    if lost > 10 {
        return Err(format!(
            "line {}: eventfd got {lost} fewer than were written",
            last.no
        ));
    }
    let segs = s.segments();
    let mut timing = Vec::new();
    for seg in segs.iter().skip(if segs.len() > 1 { 1 } else { 0 }) {
        if seg.len() < MIN_TIMER_LINES {
            return Err(format!(
                "boot {}: only {} lines, {MIN_TIMER_LINES} needed to judge the timer",
                seg[0].boot,
                seg.len()
            ));
        }
        // From the second line of the boot: the first gap spans the upgrade.
        let (a, b) = (&seg[1], &seg[seg.len() - 1]);
        let elapsed = b.mono_ms - a.mono_ms;
        let fired = (b.num::<u64>("exp")? - a.num::<u64>("exp")?) * period;
        if fired.abs_diff(elapsed) > 2 * period + elapsed / 20 {
            return Err(format!(
                "boot {}: the timer fired {} times ({fired} ms worth) over {elapsed} ms",
                a.boot,
                fired / period
            ));
        }
        let mut gaps: Vec<u64> = seg[1..]
            .windows(2)
            .map(|w| w[1].mono_ms - w[0].mono_ms)
            .collect();
        gaps.sort_unstable();
        let (median, p95, max) = (
            gaps[gaps.len() / 2],
            gaps[gaps.len() * 95 / 100],
            gaps[gaps.len() - 1],
        );
        if median * 2 < nominal || median > nominal * 2 {
            return Err(format!(
                "boot {}: median gap between lines {median} ms, expected about {nominal} ms",
                a.boot
            ));
        }
        timing.push(format!(
            "{} expirations in {elapsed} ms, line gaps median {median} p95 {p95} max {max} ms",
            fired / period
        ));
    }
    Ok(format!(
        "{}; blocked {blk:016x}, caught {cgt:016x}, ignored {ign} unchanged, SIGALRM and SIGVTALRM still pending; \
         now exp={} efd={} usr1={} usr2={}; timer ({period} ms) after the last upgrade: {}",
        s.summary(),
        last.str("exp")?,
        last.str("efd")?,
        last.str("usr1")?,
        last.str("usr2")?,
        timing.last().map_or("?", String::as_str)
    ))
}

fn main() {
    checker_main("wl-events-check LOG [min boots]", check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    // Lines 100 ms apart, 2 expirations of 50 ms each.
    fn line(s: u64) -> String {
        format!(
            "exp={} period_ms=50 every=2 efd={} efd_sent={} usr1={s} usr1_sent={s} usr2={s} usr2_sent={} \
             blk=0000000002002200 pnd=0000000002000000 shdpnd=0000000000002000 cgt=0000000180000800 ign=0000000000001000",
            s * 2,
            s * 3,
            s * 3 + 1,
            s + 1
        )
    }

    fn run(f: impl Fn(u64) -> String) -> Result<String, String> {
        check(
            parse_log(&testlog::lines("", 9, &testlog::boots(2, 8), f))?,
            2,
        )
    }

    #[test]
    fn good_log_passes() {
        let ok = run(line).expect("ok");
        assert!(ok.contains("SIGALRM and SIGVTALRM still pending"), "{ok}");
        assert!(ok.contains("line gaps median 100"), "{ok}");
    }

    #[test]
    fn signal_state_changes_fail() {
        assert!(run(|s| if s == 9 {
            line(s).replace("blk=0000000002002200", "blk=0000000000000000")
        } else {
            line(s)
        })
        .is_err());
        assert!(run(|s| if s == 9 {
            line(s).replace("shdpnd=0000000000002000", "shdpnd=0000000000000000")
        } else {
            line(s)
        })
        .unwrap_err()
        .contains("SIGALRM"));
        assert!(
            run(|s| line(s).replace("cgt=0000000180000800", "cgt=0000000180000000"))
                .unwrap_err()
                .contains("SIGUSR2")
        );
    }

    #[test]
    fn timer_and_events_fail() {
        // The timer stops after the upgrade.
        assert!(run(|s| line(s).replace(
            &format!("exp={} ", s * 2),
            &format!("exp={} ", s.min(8) * 2)
        ))
        .is_err());
        // The timer runs at half speed after the upgrade.
        assert!(run(|s| line(s).replace(
            &format!("exp={} ", s * 2),
            &format!("exp={} ", if s < 8 { s * 2 } else { 16 + s - 8 })
        ))
        .unwrap_err()
        .contains("the timer fired"));
        // No more SIGUSR1 after the upgrade.
        assert!(
            run(|s| line(s).replace(&format!("usr1={s} "), &format!("usr1={} ", s.min(8))))
                .unwrap_err()
                .contains("usr1 did not grow")
        );
        // eventfd counts lost.
        assert!(run(|s| line(s).replace(
            &format!("efd_sent={}", s * 3 + 1),
            &format!("efd_sent={}", s * 3 + 20)
        ))
        .unwrap_err()
        .contains("eventfd"));
    }
}
