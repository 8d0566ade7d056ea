//! Every child of `kupgrade-init` runs under a deadline, in a process group
//! of its own that is killed (SIGKILL) when the deadline passes: a hung
//! `criu`, `ip` or `nft`, or anything they started, cannot keep the machine
//! from booting.
//!
//! The wait polls a pidfd, so it ends the moment the child exits; input is
//! fed and output collected in the same loop, without threads. A child that
//! exits while something it started still holds its output does not keep
//! the caller waiting for that pipe to close.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};

/// How long a killed child may take to die before we stop waiting for it
/// (a task in uninterruptible sleep dies only when it wakes up).
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How much of a child's output is kept: its end (where the cause of a
/// failure usually is).
const OUTPUT_KEEP: usize = 64 << 10;
/// How often to look at a child without a pidfd (kernels before 5.3).
const TICK: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("lost track of {command}")]
    Wait {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{command} did not finish within {} s: it and its process group were killed",
        within.as_secs()
    )]
    Overran { command: String, within: Duration },
}

/// A child that exited by itself.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    /// The end of what it wrote to a piped stderr.
    pub stderr: String,
}

/// A child started by [`spawn`], to be waited for by [`Running::wait`].
#[derive(Debug)]
pub struct Running {
    command: String,
    child: Child,
    pidfd: Option<OwnedFd>,
}

/// Runs `cmd` (named `command` in errors) and waits for it at most `within`.
/// The caller sets up stdio: a piped stdin is given `input` and then closed,
/// a piped stderr is collected (nothing here reads a child's stdout).
pub fn run(
    command: &str,
    cmd: &mut Command,
    input: &[u8],
    within: Duration,
) -> Result<Exited, Error> {
    spawn(command, cmd)?.wait(input, within)
}

/// Starts `cmd` in a process group of its own, for a wait later: what runs
/// beside the caller's own work.
pub fn spawn(command: &str, cmd: &mut Command) -> Result<Running, Error> {
    let child = cmd
        .process_group(0)
        .spawn()
        .map_err(|source| Error::Spawn {
            command: command.into(),
            source,
        })?;
    let pid = rustix::process::Pid::from_child(&child);
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok();
    Ok(Running {
        command: command.into(),
        child,
        pidfd,
    })
}

impl Running {
    /// Waits for the child at most `within` from now, as [`run`] does; past
    /// it, kills its process group.
    pub fn wait(self, input: &[u8], within: Duration) -> Result<Exited, Error> {
        let Running {
            command,
            mut child,
            pidfd,
        } = self;
        wait(&command, &mut child, pidfd, input, within)
    }
}

fn wait(
    command: &str,
    child: &mut Child,
    pidfd: Option<OwnedFd>,
    input: &[u8],
    within: Duration,
) -> Result<Exited, Error> {
    let deadline = Instant::now() + within;
    let lost = |source| Error::Wait {
        command: command.into(),
        source,
    };
    let mut stdin = child.stdin.take().filter(|_| !input.is_empty());
    let mut stderr = child.stderr.take();
    for fd in [
        stdin.as_ref().map(|s| s.as_raw_fd()),
        stderr.as_ref().map(|s| s.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    {
        // Never block on a child that does not read or does not write.
        let _ = fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
    }
    let mut input = input;
    let mut errors = Vec::new();
    loop {
        if let Some(status) = child.try_wait().map_err(lost)? {
            if let Some(e) = stderr.as_mut() {
                read_available(e, &mut errors);
            }
            let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
            return Ok(Exited {
                status,
                stderr: text(&errors),
            });
        }
        let now = Instant::now();
        if now >= deadline {
            kill_group(child);
            return Err(Error::Overran {
                command: command.into(),
                within,
            });
        }
        let mut wait = deadline - now;
        if pidfd.is_none() {
            wait = wait.min(TICK);
        }
        let (can_write, can_read_err) = {
            let mut fds = Vec::with_capacity(3);
            if let Some(p) = &pidfd {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            let at_in = stdin.as_ref().map(|s| {
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLOUT));
                fds.len() - 1
            });
            let at_err = stderr.as_ref().map(|s| {
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
            // EINTR: look again.
            let _ = poll(&mut fds, timeout);
            let ready = |at: Option<usize>| {
                at.and_then(|i| fds[i].revents())
                    .is_some_and(|r| !r.is_empty())
            };
            (ready(at_in), ready(at_err))
        };
        if can_write {
            if let Some(s) = stdin.as_mut() {
                match s.write(input) {
                    Ok(n) => input = &input[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // It closed its end: it has all it will read.
                    Err(_) => input = &[],
                }
            }
            if input.is_empty() {
                // Closing it is the end of the input.
                stdin = None;
            }
        }
        if can_read_err
            && stderr
                .as_mut()
                .is_some_and(|e| read_available(e, &mut errors))
        {
            stderr = None;
        }
    }
}

/// Reads what `from` holds now into `into`, keeping its last
/// [`OUTPUT_KEEP`] bytes; true at the end of the stream.
fn read_available(from: &mut impl Read, into: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                into.extend_from_slice(&buf[..n]);
                if into.len() > 2 * OUTPUT_KEEP {
                    into.drain(..into.len() - OUTPUT_KEEP);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Kills the child's process group and reaps the child if it dies within
/// [`KILL_GRACE`]; one that does not is left to the real init to reap.
fn kill_group(child: &mut Child) {
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = killpg(group, Signal::SIGKILL);
    let end = Instant::now() + KILL_GRACE;
    while Instant::now() < end {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(TICK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::process::Stdio;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// A pid is gone once it no longer exists or is a zombie nobody reaped yet.
    fn gone(pid: i32) -> bool {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        matches!(state, None | Some("Z") | Some("X"))
    }

    #[test]
    fn a_child_that_exits_gives_its_status_and_its_errors() {
        let mut c = sh("echo fine; echo oops >&2; exit 3");
        let out = run("sh", &mut c, &[], Duration::from_secs(30)).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stderr, "oops");
    }

    /// Started now, waited for later: it runs meanwhile, and the deadline
    /// counts from the wait.
    #[test]
    fn a_spawned_child_runs_meanwhile_and_is_waited_for_later() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("ran");
        let mut c = sh(&format!("touch {}; echo done >&2", mark.display()));
        let running = spawn("sh", &mut c).unwrap();
        let start = Instant::now();
        while !mark.exists() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(TICK);
        }
        assert!(mark.exists(), "it did not run before the wait");
        let out = running.wait(&[], Duration::from_secs(30)).unwrap();
        assert!(out.status.success());
        assert_eq!(out.stderr, "done");

        let hung = spawn("sh", &mut sh("sleep 30")).unwrap();
        let err = hung.wait(&[], Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, Error::Overran { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn the_input_reaches_the_child_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy");
        let script = format!("cat > {}", copy.display());
        // More than a pipe holds: fed as the child reads.
        let input = vec![b'x'; 300 << 10];
        let out = run("cat", &mut sh(&script), &input, Duration::from_secs(30)).unwrap();
        assert!(out.status.success());
        assert_eq!(fs::read(&copy).unwrap(), input);
    }

    /// The child and what it started are killed at the deadline; the wait
    /// ends then, not when they would have.
    #[test]
    fn a_child_that_hangs_is_killed_with_its_process_group_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let script = format!("sleep 60 & echo $$ $! > {}; wait", pids.display());
        let t0 = Instant::now();
        let err = run(
            "the hang",
            &mut sh(&script),
            &[],
            Duration::from_millis(500),
        )
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(matches!(err, Error::Overran { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the hang did not finish within 0 s: it and its process group were killed"
        );
        let text = fs::read_to_string(&pids).unwrap();
        let both: Vec<i32> = text
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(both.len(), 2, "{text}");
        let end = Instant::now() + Duration::from_secs(5);
        while !both.iter().all(|p| gone(*p)) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(both.iter().all(|p| gone(*p)), "still running: {both:?}");
    }

    /// Something the child left running with its stderr open does not make
    /// the wait last until that closes.
    #[test]
    fn a_child_is_done_when_it_exits_even_if_its_stderr_stays_open() {
        let t0 = Instant::now();
        let out = run(
            "sh",
            &mut sh("sleep 3 & echo bye >&2; exit 0"),
            &[],
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(out.status.success());
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_program_that_does_not_exist_is_a_spawn_error() {
        let mut c = Command::new("/nonexistent/kupgrade-test");
        let err = run("nothing", &mut c, &[], Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, Error::Spawn { .. }), "{err:?}");
    }
}
