//! Stopping the harness stops its guests. On SIGTERM, SIGINT or SIGHUP every
//! QEMU the harness started is terminated (with `--jobs`, several run at
//! once: all of them); each run in progress then ends as a failure that
//! says so, keeping its serial log (written line by line as it arrives) and
//! its disk, and no further scenario starts.

use std::process::Child;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// The signals that stop the harness.
pub const SIGNALS: [i32; 3] = [SIGTERM, SIGINT, SIGHUP];

/// The first stopping signal received, 0 until then.
static STOPPED: AtomicI32 = AtomicI32::new(0);
/// The QEMUs running now.
static GUESTS: Mutex<Vec<Weak<Mutex<Child>>>> = Mutex::new(Vec::new());

/// How long a guest gets to exit on SIGTERM before it is killed.
const GUEST_GRACE: Duration = Duration::from_secs(3);

/// Handles the stopping signals from now on: the first stops every guest
/// and lets the runs in progress finish their reports; if the process is still
/// there `exit_after` later (stuck in a build, say), or on a second signal,
/// it exits with 128 + the signal.
pub fn install(exit_after: Duration) -> std::io::Result<()> {
    let mut signals = Signals::new(SIGNALS)?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let first = STOPPED
                .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
            stop_guests();
            if !first {
                std::process::exit(128 + sig);
            }
            std::thread::spawn(move || {
                std::thread::sleep(exit_after);
                std::process::exit(128 + sig);
            });
        }
    });
    Ok(())
}

/// The signal that stopped the harness, if one did.
pub fn stopped() -> Option<i32> {
    Some(STOPPED.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// The exit status of a stopped harness: 128 + the signal, as a shell says.
pub fn exit_status() -> Option<u8> {
    stopped().and_then(|s| u8::try_from(128 + s).ok())
}

/// The signal's name, e.g. `SIGTERM`.
pub fn name(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())
}

/// Puts a started QEMU in the list of guests to stop. The harness keeps
/// the `Child` behind this mutex, so that a guest reaped already is never
/// signalled (its pid may be someone else's by then).
pub(crate) fn register(child: &Arc<Mutex<Child>>) {
    if let Ok(mut g) = GUESTS.lock() {
        g.retain(|w| w.strong_count() > 0);
        g.push(Arc::downgrade(child));
    }
    // A signal that came while it was starting.
    if stopped().is_some() {
        stop_guests();
    }
}

/// SIGTERM to every running guest (QEMU exits cleanly on it), SIGKILL to
/// those still there after a grace period.
fn stop_guests() {
    let guests: Vec<Arc<Mutex<Child>>> = GUESTS
        .lock()
        .map(|g| g.iter().filter_map(Weak::upgrade).collect())
        .unwrap_or_default();
    stop_all(&guests);
}

/// Stops `guests` together: one grace period for all, not one each.
fn stop_all(guests: &[Arc<Mutex<Child>>]) {
    let running = |c: &Arc<Mutex<Child>>| {
        c.lock()
            .map(|mut c| matches!(c.try_wait(), Ok(None)))
            .unwrap_or(false)
    };
    for c in guests {
        if let Ok(mut child) = c.lock() {
            // Not reaped (try_wait would have): the pid is still this QEMU's.
            if matches!(child.try_wait(), Ok(None)) {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            }
        }
    }
    let end = Instant::now() + GUEST_GRACE;
    while Instant::now() < end && guests.iter().any(running) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in guests {
        if let Ok(mut child) = c.lock() {
            // std does not signal a child it has reaped.
            let _ = child.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several guests running at once (`--jobs`) are all stopped, one that
    /// ignores SIGTERM too, within one grace period.
    #[test]
    fn every_running_guest_is_stopped() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::Command;
        let spawn = |script: &str| {
            Arc::new(Mutex::new(
                Command::new("sh").args(["-c", script]).spawn().unwrap(),
            ))
        };
        let guests = vec![
            spawn("exec sleep 600"),
            spawn("exec sleep 600"),
            spawn("trap '' TERM; while :; do sleep 0.1; done"),
        ];
        // Time for the shell to ignore SIGTERM.
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        stop_all(&guests);
        assert!(t0.elapsed() < GUEST_GRACE + Duration::from_secs(2));
        let signals: Vec<Option<i32>> = guests
            .iter()
            .map(|g| g.lock().unwrap().wait().unwrap().signal())
            .collect();
        assert_eq!(
            signals,
            [Some(SIGTERM), Some(SIGTERM), Some(Signal::SIGKILL as i32)]
        );
    }

    #[test]
    fn signals_have_their_names() {
        assert_eq!(name(SIGTERM), "SIGTERM");
        assert_eq!(name(SIGHUP), "SIGHUP");
        assert_eq!(name(12345), "signal 12345");
    }
}
