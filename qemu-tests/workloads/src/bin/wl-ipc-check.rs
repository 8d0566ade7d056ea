//! Proves from a wl-ipc log, and from its file on disk, that SysV shared
//! memory, a SysV semaphore and shared mappings of a root file, a /dev/shm
//! object and a memfd came through the upgrades working: the common checks
//! on the main process and its peer (one pid each, seq from 0 without gap,
//! monotonic time, at least N boots); on every line of both, every region
//! kept the own counter equal to the number of ticks (`n` is seq + 1, read
//! back from the SysV segment), saw the other's counter alike in all
//! shared regions, mutual exclusion under the semaphore held, and the
//! pattern checked that tick was intact, every region's pattern checked at
//! least once; the SysV ids never changed and are the same for both; each
//! process kept seeing the other's counter grow in every boot, never going
//! back. Then `DIR/wl-ipc-PID.map`, the real file behind the shared file
//! mapping, read from disk: its size, its pattern, and counters at least
//! the last ones logged.
//!
//! Usage: `wl-ipc-check LOG [min boots, 2] [dir, /var/tmp]`.

use kupgrade_workloads::{
    advancing, all_ok, check_streams, constant, finish, fnv1a, pattern, read_log, Args, Line,
};

/// The layout of wl-ipc's regions.
const MAIN_SLOT: usize = 0;
const PEER_SLOT: usize = 1;
const HEADER: usize = 64;
const PATTERN: usize = 64 * 1024;
const LEN: usize = HEADER + PATTERN;

const MAIN_REGIONS: [&str; 4] = ["sysv", "file", "shm", "memfd"];
const PEER_REGIONS: [&str; 3] = ["sysv", "file", "shm"];

/// What the log says, for the file check.
#[derive(Debug)]
struct Logged {
    summary: String,
    main_pid: u32,
    main_n: u64,
    peer_n: u64,
}

fn check_log(lines: Vec<Line>, min_boots: usize) -> Result<Logged, String> {
    let s = check_streams(lines, &["main", "peer"], min_boots)?;
    let (main, peer) = (&s[0], &s[1]);
    let mut ids = Vec::new();
    for (st, regions) in [(main, &MAIN_REGIONS[..]), (peer, &PEER_REGIONS[..])] {
        for k in regions.iter().chain(&["excl", "pattern"]) {
            all_ok(st, k)?;
        }
        for r in regions {
            if !st.lines.iter().any(|l| l.get("pat_in") == Some(r)) {
                return Err(format!("{}: the pattern in {r} was never checked", st.src));
            }
        }
        if let Some(l) = st
            .lines
            .iter()
            .find(|l| l.num::<u64>("n").ok() != Some(l.seq + 1))
        {
            return Err(format!(
                "{}: line {}: own counter n={} in shared memory is not the {} ticks done",
                st.src,
                l.no,
                l.str("n")?,
                l.seq + 1
            ));
        }
        advancing(st, "theirs")?;
        ids.push((constant(st, "shmid")?, constant(st, "semid")?));
    }
    if ids[0] != ids[1] {
        return Err(format!(
            "main uses shmid/semid {:?}, the peer {:?}",
            ids[0], ids[1]
        ));
    }
    let (main_n, peer_n): (u64, u64) = (main.last().num("n")?, peer.last().num("n")?);
    // A process may have counted one more tick than it logged.
    if main.last().num::<u64>("theirs")? > peer_n + 1
        || peer.last().num::<u64>("theirs")? > main_n + 1
    {
        return Err("a counter seen through shared memory is ahead of its writer".into());
    }
    let (shmid, semid) = ids[0];
    Ok(Logged {
        summary: format!(
            "SysV segment {shmid} and semaphore {semid}, the root file, /dev/shm/wl-ipc-{} and a memfd \
             mapped shared through {} boot(s): counters exchanged under the semaphore by pids {} and {} \
             (n={main_n} and n={peer_n}), mutual exclusion, counters and patterns intact on every tick; {}; {}",
            main.pid,
            main.boots.len(),
            main.pid,
            peer.pid,
            main.summary(),
            peer.summary()
        ),
        main_pid: main.pid,
        main_n,
        peer_n,
    })
}

fn slot(data: &[u8], slot: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[slot * 8..slot * 8 + 8]);
    u64::from_ne_bytes(b)
}

/// The file behind the shared file mapping, as on disk now.
fn check_file(dir: &str, l: &Logged) -> Result<String, String> {
    let path = format!("{dir}/wl-ipc-{}.map", l.main_pid);
    let data = std::fs::read(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    if data.len() != LEN {
        return Err(format!("{path}: {} bytes, not {LEN}", data.len()));
    }
    if fnv1a(&data[HEADER..]) != fnv1a(&pattern(u64::from(l.main_pid), PATTERN)) {
        return Err(format!("{path}: the pattern is damaged"));
    }
    let (main, peer) = (slot(&data, MAIN_SLOT), slot(&data, PEER_SLOT));
    if main < l.main_n || peer < l.peer_n {
        return Err(format!(
            "{path}: counters main={main} peer={peer} on disk, behind the logged n={} and n={}",
            l.main_n, l.peer_n
        ));
    }
    Ok(format!(
        "{path} on disk: pattern intact, counters main={main} peer={peer}"
    ))
}

fn check(lines: Vec<Line>, min_boots: usize, dir: &str) -> Result<String, String> {
    let logged = check_log(lines, min_boots)?;
    let file = check_file(dir, &logged)?;
    Ok(format!("{}; {file}", logged.summary))
}

fn main() {
    let mut args = Args::new("wl-ipc-check LOG [min boots, 2] [dir, /var/tmp]");
    let log = args.req();
    let min_boots: usize = args.opt(2);
    let dir = args.opt("/var/tmp".to_string());
    finish(read_log(&log).and_then(|lines| check(lines, min_boots, &dir)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kupgrade_workloads::{parse_log, testlog};

    const REGIONS: [&str; 4] = ["sysv", "file", "shm", "memfd"];

    fn line(s: u64, regions: &[&str], theirs: u64) -> String {
        let status: Vec<String> = regions.iter().map(|r| format!("{r}=ok")).collect();
        format!(
            "n={} theirs={theirs} shmid=5 semid=6 {} excl=ok pattern=ok pat_in={}",
            s + 1,
            status.join(" "),
            regions[s as usize % regions.len()]
        )
    }

    fn run(main: impl Fn(u64) -> String, peer: impl Fn(u64) -> String) -> Result<Logged, String> {
        let b = testlog::boots(2, 5);
        let text = testlog::lines("main", 20, &b, main) + &testlog::lines("peer", 21, &b, peer);
        check_log(parse_log(&text)?, 2)
    }

    fn good_main(s: u64) -> String {
        line(s, &REGIONS, s)
    }

    fn good_peer(s: u64) -> String {
        line(s, &REGIONS[..3], s + 1)
    }

    #[test]
    fn good_log_passes() {
        let l = run(good_main, good_peer).expect("ok");
        assert_eq!((l.main_pid, l.main_n, l.peer_n), (20, 10, 10));
        assert!(l.summary.starts_with("SysV segment 5 and semaphore 6"));
    }

    #[test]
    fn damage_fails() {
        let bad_at = |k: &'static str| {
            move |s: u64| {
                if s == 7 {
                    good_main(s).replace(&format!("{k}=ok"), &format!("{k}=BAD"))
                } else {
                    good_main(s)
                }
            }
        };
        for k in ["sysv", "file", "shm", "memfd", "excl", "pattern"] {
            assert!(run(bad_at(k), good_peer).unwrap_err().contains(k), "{k}");
        }
        // The counter in shared memory is not the number of ticks.
        assert!(run(|s| good_main(s).replace("n=8 ", "n=9 "), good_peer)
            .unwrap_err()
            .contains("own counter"));
        // The SysV segment changed with the upgrade.
        assert!(run(
            |s| if s >= 5 {
                good_main(s).replace("shmid=5", "shmid=7")
            } else {
                good_main(s)
            },
            good_peer
        )
        .unwrap_err()
        .contains("shmid"));
        // The peer uses another semaphore.
        assert!(
            run(good_main, |s| good_peer(s).replace("semid=6", "semid=8"))
                .unwrap_err()
                .contains("semid")
        );
        // The segment came back empty: the peer sees main's counter reset.
        assert!(run(good_main, |s| line(s, &REGIONS[..3], s % 5))
            .unwrap_err()
            .contains("went back"));
        // Main stops seeing the peer after the upgrade.
        assert!(run(|s| line(s, &REGIONS, s.min(5)), good_peer)
            .unwrap_err()
            .contains("did not grow"));
        // The memfd pattern never checked.
        assert!(run(
            |s| line(s, &REGIONS[..3], s).replace("sysv=ok", "sysv=ok memfd=ok"),
            good_peer
        )
        .unwrap_err()
        .contains("never checked"));
    }

    #[test]
    fn file_on_disk_is_checked() {
        let dir = std::env::temp_dir().join(format!("wl-ipc-check-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let d = dir.to_string_lossy().to_string();
        let l = Logged {
            summary: String::new(),
            main_pid: 77,
            main_n: 10,
            peer_n: 9,
        };
        let path = dir.join("wl-ipc-77.map");
        let mut data = vec![0u8; HEADER];
        data[..8].copy_from_slice(&11u64.to_ne_bytes());
        data[8..16].copy_from_slice(&9u64.to_ne_bytes());
        data.extend(pattern(77, PATTERN));
        std::fs::write(&path, &data).expect("write");
        let good = check_file(&d, &l);
        data[8..16].copy_from_slice(&8u64.to_ne_bytes());
        std::fs::write(&path, &data).expect("write");
        let behind = check_file(&d, &l);
        data[8..16].copy_from_slice(&9u64.to_ne_bytes());
        data[HEADER + 100] ^= 1;
        std::fs::write(&path, &data).expect("write");
        let damaged = check_file(&d, &l);
        std::fs::write(&path, &data[..LEN - 1]).expect("write");
        let short = check_file(&d, &l);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(good.expect("ok").contains("counters main=11 peer=9"));
        assert!(behind.unwrap_err().contains("behind"));
        assert!(damaged.unwrap_err().contains("damaged"));
        assert!(short.unwrap_err().contains("bytes"));
        assert!(check_file("/nonexistent", &l).is_err());
    }
}
