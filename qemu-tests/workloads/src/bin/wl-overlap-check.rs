//! Proves that the programs that wrote two files ran at the same time: each
//! file was made (its birth time) before the other was last written (its
//! mtime). For CRIU's logs, which a dump makes when it starts and writes
//! until it ends, that says the two dumps overlapped.
//!
//! Usage: `wl-overlap-check FILE FILE`.

use std::fs;
use std::time::SystemTime;

use kupgrade_workloads::finish;

/// When `path` was made and when it was last written.
fn span(path: &str) -> Result<(SystemTime, SystemTime), String> {
    let m = fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    let made = m
        .created()
        .map_err(|e| format!("{path}: no birth time on this file system: {e}"))?;
    let written = m.modified().map_err(|e| format!("{path}: {e}"))?;
    Ok((made, written))
}

fn since(t: SystemTime, origin: SystemTime) -> f64 {
    match t.duration_since(origin) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

fn check(a: &str, b: &str) -> Result<String, String> {
    let (a0, a1) = span(a)?;
    let (b0, b1) = span(b)?;
    let origin = a0.min(b0);
    let spans = format!(
        "{a} from {:.0} to {:.0} ms, {b} from {:.0} to {:.0} ms",
        since(a0, origin),
        since(a1, origin),
        since(b0, origin),
        since(b1, origin)
    );
    if a0 < b1 && b0 < a1 {
        Ok(format!("they overlapped: {spans}"))
    } else {
        Err(format!("one ended before the other began: {spans}"))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [a, b] = args.as_slice() else {
        finish(Err("usage: wl-overlap-check FILE FILE".into()))
    };
    finish(check(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn files_written_at_the_same_time_overlap_and_in_turn_do_not() {
        let d = tempfile::tempdir().unwrap();
        let path = |n: &str| d.path().join(n).display().to_string();
        // a is made, b is made, both written after: overlapped.
        fs::write(path("a"), "a").unwrap();
        fs::write(path("b"), "b").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        fs::write(path("a"), "a2").unwrap();
        fs::write(path("b"), "b2").unwrap();
        if fs::metadata(path("a")).and_then(|m| m.created()).is_err() {
            return; // no birth times here: nothing to judge
        }
        assert!(check(&path("a"), &path("b")).is_ok());
        // c made and done, then d made: one after the other.
        fs::write(path("c"), "c").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        fs::write(path("d"), "d").unwrap();
        let e = check(&path("c"), &path("d")).unwrap_err();
        assert!(e.starts_with("one ended before the other began"), "{e}");
    }
}
