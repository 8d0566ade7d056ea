//! A workaround for CRIU's restore of periodic timerfds
//! (checkpoint-restore/criu#3162): a periodic timer that expired while its
//! task was frozen, and was not read yet, is not running at dump time, so
//! CRIU sees `it_value` 0 and restores it disarmed; the program's next read
//! blocks for ever. While the restored tasks are still stopped, such a timer
//! is re-armed to expire at once (giving back the expiration that re-arming
//! clears) and then every interval, as before.

use std::fs;

use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};

/// `(it_value, it_interval)` in nanoseconds from a timerfd's fdinfo.
pub fn parse_fdinfo(text: &str) -> Option<(u128, u128)> {
    let get = |key: &str| -> Option<u128> {
        let v = text.lines().find_map(|l| l.strip_prefix(key))?.trim();
        let (s, ns) = v.trim_matches(['(', ')']).split_once(',')?;
        Some(s.trim().parse::<u128>().ok()? * 1_000_000_000 + ns.trim().parse::<u128>().ok()?)
    };
    Some((get("it_value:")?, get("it_interval:")?))
}

/// Re-arms the disarmed periodic timerfds of `pids`; returns how many.
pub fn rearm_expired_periodic(pids: &[i32]) -> Result<usize, String> {
    let mut fixed = 0;
    let mut errors = Vec::new();
    for &pid in pids {
        let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let mut pidfd = None;
        for e in dir.flatten() {
            let is_timer = fs::read_link(e.path())
                .is_ok_and(|l| l.to_string_lossy() == "anon_inode:[timerfd]");
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if !is_timer {
                continue;
            }
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
            let Some((0, interval)) = parse_fdinfo(&info) else {
                continue;
            };
            if interval == 0 {
                continue; // a one-shot timer that has fired: nothing to re-arm
            }
            let res = (|| -> Result<(), String> {
                if pidfd.is_none() {
                    let p = Pid::from_raw(pid).ok_or("bad pid")?;
                    pidfd = Some(
                        pidfd_open(p, PidfdFlags::empty())
                            .map_err(|e| format!("pidfd_open: {e}"))?,
                    );
                }
                let pfd = pidfd.as_ref().ok_or("no pidfd")?;
                let timer = pidfd_getfd(pfd, fd, PidfdGetfdFlags::empty())
                    .map_err(|e| format!("pidfd_getfd: {e}"))?;
                let spec = Itimerspec {
                    it_interval: Timespec {
                        tv_sec: (interval / 1_000_000_000) as i64,
                        tv_nsec: (interval % 1_000_000_000) as i64,
                    },
                    it_value: Timespec {
                        tv_sec: 0,
                        tv_nsec: 1,
                    },
                };
                timerfd_settime(&timer, TimerfdTimerFlags::empty(), &spec)
                    .map_err(|e| format!("timerfd_settime: {e}"))?;
                Ok(())
            })();
            match res {
                Ok(()) => fixed += 1,
                Err(e) => errors.push(format!("pid {pid} fd {fd}: {e}")),
            }
        }
    }
    if errors.is_empty() {
        Ok(fixed)
    } else {
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_times_parse() {
        let info = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\nclockid: 1\nticks: 1\nsettime flags: 00\nit_value: (0, 0)\nit_interval: (0, 50000000)\n";
        assert_eq!(parse_fdinfo(info), Some((0, 50_000_000)));
        assert_eq!(
            parse_fdinfo("it_value: (2, 5)\nit_interval: (1, 0)\n"),
            Some((2_000_000_005, 1_000_000_000))
        );
        assert_eq!(parse_fdinfo("flags: 02\n"), None);
    }

    /// A periodic timer that expired unread shows it_value 0 (the state CRIU
    /// restores disarmed), and re-arming makes it fire again.
    #[test]
    fn an_expired_periodic_timer_is_rearmed() {
        use rustix::time::{timerfd_create, timerfd_gettime, TimerfdClockId, TimerfdFlags};
        use std::os::fd::AsRawFd;
        let t = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK).unwrap();
        let ms = |n: i64| Timespec {
            tv_sec: 0,
            tv_nsec: n * 1_000_000,
        };
        timerfd_settime(
            &t,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: ms(20),
                it_value: ms(1),
            },
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(60));
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", t.as_raw_fd())).unwrap();
        assert_eq!(parse_fdinfo(&info), Some((0, 20_000_000)), "{info}");
        // Disarm it the way CRIU restores it, then repair.
        timerfd_settime(
            &t,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: ms(20),
                it_value: ms(0),
            },
        )
        .unwrap();
        assert_eq!(
            rearm_expired_periodic(&[std::process::id() as i32]).unwrap(),
            1
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
        let now = timerfd_gettime(&t).unwrap();
        assert_eq!(now.it_interval.tv_nsec, 20_000_000);
        let mut buf = [0u8; 8];
        assert_eq!(
            rustix::io::read(&t, &mut buf).unwrap(),
            8,
            "the re-armed timer fired"
        );
    }
}
