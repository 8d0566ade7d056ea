//! Proves from a wl-unix log that unix domain sockets between two processes
//! came through the upgrades with their queued data: the common checks on
//! sender and receiver (one pid each, seq from 0 without gap, monotonic time,
//! at least N boots), and on each channel (stream socketpair, datagram
//! socketpair, named stream socket) the receiver got record 0, 1, 2, ...
//! exactly once, in order, with every checksum right, and never more than the
//! sender sent. Then, as a new client, it connects to the named socket by
//! its path and must be greeted by the sender (`hello from PID`), and the
//! socket's directory must have the mode and owner it was made with.
//!
//! Usage: `wl-unix-check LOG [min boots, 2]`.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use kupgrade_workloads::{check_streams, constant, finish, read_log, Args, Line};

/// What the sender's lines say about the named socket.
struct Named {
    path: String,
    sender: u32,
    dir_mode: String,
    dir_owner: String,
}

fn check(lines: Vec<Line>, min_boots: usize) -> Result<(String, Named), String> {
    let s = check_streams(lines, &["sender", "receiver"], min_boots)?;
    let (tx, rx) = (&s[0], &s[1]);
    let path = constant(tx, "path")?;
    let named = Named {
        path: path.to_string(),
        sender: tx.last().pid,
        dir_mode: constant(tx, "dir_mode")?.to_string(),
        dir_owner: constant(tx, "dir_owner")?.to_string(),
    };
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
    let said = format!(
        "messages 0..={} received once and in order on the stream pair, the datagram pair and {path}, \
         {} still queued per channel at the end, longest queued {max_lag} ms; {}; {}",
        rx.last().seq,
        tx.last().seq.saturating_sub(rx.last().seq),
        tx.summary(),
        rx.summary()
    );
    Ok((said, named))
}

/// A new client connects by the path and is greeted by the sender; the
/// directory kept its mode and owner.
fn connect_by_path(n: &Named) -> Result<String, String> {
    let dir = Path::new(&n.path)
        .parent()
        .ok_or("the socket path has no directory")?;
    let m = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (mode, owner) = (
        format!("{:o}", m.mode() & 0o7777),
        format!("{}:{}", m.uid(), m.gid()),
    );
    if (mode.as_str(), owner.as_str()) != (n.dir_mode.as_str(), n.dir_owner.as_str()) {
        return Err(format!(
            "{} is mode {mode} owner {owner}, made mode {} owner {}",
            dir.display(),
            n.dir_mode,
            n.dir_owner
        ));
    }
    let c =
        UnixStream::connect(&n.path).map_err(|e| format!("cannot connect to {}: {e}", n.path))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(c)
        .read_line(&mut line)
        .map_err(|e| format!("no greeting on {}: {e}", n.path))?;
    let want = format!("hello from {}", n.sender);
    if line.trim() != want {
        return Err(format!(
            "{} answered {:?}, not {want:?}",
            n.path,
            line.trim()
        ));
    }
    Ok(format!(
        "a new client connected to {} by its path and was greeted by pid {}; {} is mode {mode} owner {owner} as made",
        n.path,
        n.sender,
        dir.display()
    ))
}

fn main() {
    let mut args = Args::new("wl-unix-check LOG [min boots]");
    let log = args.req();
    let min_boots: usize = args.opt(2);
    finish(read_log(&log).and_then(|lines| {
        let (said, named) = check(lines, min_boots)?;
        Ok(format!("{said}; {}", connect_by_path(&named)?))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    fn log(dgram: impl Fn(u64) -> String) -> String {
        let b = testlog::boots(2, 5);
        testlog::lines("sender", 10, &b, |s| {
            format!("sent={s} path=/run/x/x.sock dir_mode=750 dir_owner=0:65534")
        }) + &testlog::lines("receiver", 11, &b, |s| {
            format!("stream={s} dgram={} named={s} sums=ok lag_ms=500", dgram(s))
        })
    }

    fn run(text: &str) -> Result<String, String> {
        check(parse_log(text)?, 2).map(|(said, _)| said)
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

    #[test]
    fn a_new_client_must_be_greeted_by_the_sender_by_path() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("sockets");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        let path = dir.join("x.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            for c in l.incoming() {
                let _ = c.and_then(|mut c| c.write_all(b"hello from 10\n"));
            }
        });
        let m = std::fs::metadata(&dir).expect("stat");
        let named = |sender, mode: &str| Named {
            path: path.to_string_lossy().into_owned(),
            sender,
            dir_mode: mode.into(),
            dir_owner: format!("{}:{}", m.uid(), m.gid()),
        };
        assert!(connect_by_path(&named(10, "750"))
            .expect("greeted")
            .contains("by its path"));
        assert!(connect_by_path(&named(11, "750"))
            .unwrap_err()
            .contains("not \"hello from 11\""));
        assert!(connect_by_path(&named(10, "700"))
            .unwrap_err()
            .contains("made mode 700"));
        std::fs::remove_file(&path).expect("unlink");
        assert!(connect_by_path(&named(10, "750"))
            .unwrap_err()
            .contains("cannot connect"));
    }
}
