//! Every program kupgrade runs (CRIU, nft, ...) runs through [`run`], with
//! a deadline: a child that hangs must never keep the workloads frozen.
//!
//! The child gets a process group of its own (a Ctrl-C meant for kupgrade
//! does not reach it half-way; kupgrade decides how to stop it). When the
//! deadline passes, or when a signal asks kupgrade to stop (the `stop`
//! flag, polled while the child runs), the whole group is killed with
//! SIGKILL and the step fails, so that the undo runs at once. Its output is
//! read while it runs, so that a chatty child never blocks on a full pipe.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;

/// For nft and the other quick tools: they answer in milliseconds.
pub const TOOL_DEADLINE: Duration = Duration::from_secs(20);

/// How often the `stop` flag is looked at while a child runs.
const TICK: Duration = Duration::from_millis(50);

/// How long a child killed with SIGKILL gets to go (one in uninterruptible
/// sleep cannot be reaped; it is then left behind, and said so).
const REAP_GRACE: Duration = Duration::from_secs(5);

/// How long a child may run, and what else stops it.
#[derive(Clone, Copy, Debug)]
pub struct Limits<'a> {
    pub deadline: Duration,
    /// Set by the signal handler: stop waiting, kill the child.
    pub stop: Option<&'a AtomicBool>,
}

impl Limits<'static> {
    /// A deadline, and no signal stops it (the undo must run to its end).
    pub fn deadline(deadline: Duration) -> Self {
        Limits {
            deadline,
            stop: None,
        }
    }
}

impl<'a> Limits<'a> {
    pub fn stopped_by(self, stop: &'a AtomicBool) -> Limits<'a> {
        Limits {
            stop: Some(stop),
            ..self
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} did not finish within {} s: killed it{}", .after.as_secs_f64(), left(*.reaped))]
    Timeout {
        program: String,
        after: Duration,
        reaped: bool,
    },
    #[error("interrupted by a signal while {program} ran: killed it{}", left(*.reaped))]
    Interrupted { program: String, reaped: bool },
    #[error("while {program} ran")]
    Io {
        program: String,
        #[source]
        source: io::Error,
    },
}

fn left(reaped: bool) -> &'static str {
    if reaped {
        ""
    } else {
        " (it did not exit after SIGKILL: in uninterruptible sleep?)"
    }
}

/// An error and its causes on one line, for the callers that keep a string.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// What a child that ended left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs `cmd` to its end within `limits`, `input` on its stdin (else
/// /dev/null), its stdout and stderr collected.
pub fn run(cmd: &mut Command, input: Option<&[u8]>, limits: Limits) -> Result<Output, Error> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let io = |source| Error::Io {
        program: program.clone(),
        source,
    };
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
    let mut pipes = Pipes {
        stdin: child.stdin.take(),
        input: input.unwrap_or_default(),
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        out: Vec::new(),
        err: Vec::new(),
    };
    let start = Instant::now();
    // Readable once the child has exited: the wait ends then, not at the
    // next tick (a child closes its pipes before it can be reaped).
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_child(&child),
        rustix::process::PidfdFlags::empty(),
    )
    .ok();
    let stopped = || limits.stop.is_some_and(|s| s.load(Ordering::Relaxed));
    let outcome = (|| {
        pipes.nonblocking()?;
        loop {
            if let Some(status) = child.try_wait()? {
                // What it wrote before exiting is still in the pipes.
                pipes.pump(Duration::ZERO, None)?;
                return Ok(Some(status));
            }
            let elapsed = start.elapsed();
            if elapsed >= limits.deadline || stopped() {
                return Ok(None);
            }
            pipes.pump(TICK.min(limits.deadline - elapsed), pidfd.as_ref())?;
        }
    })();
    match outcome {
        Ok(Some(status)) => Ok(Output {
            status,
            stdout: pipes.out,
            stderr: pipes.err,
        }),
        Ok(None) => {
            let reaped = kill_group(&mut child);
            if stopped() {
                Err(Error::Interrupted { program, reaped })
            } else {
                Err(Error::Timeout {
                    program,
                    after: limits.deadline,
                    reaped,
                })
            }
        }
        Err(e) => {
            kill_group(&mut child);
            Err(io(e))
        }
    }
}

/// SIGKILL to the child's process group; whether the child could be reaped.
fn kill_group(child: &mut Child) -> bool {
    // The group was made with the child's pid (process_group(0)).
    let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let start = Instant::now();
    while start.elapsed() < REAP_GRACE {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    false
}

/// The child's pipes, moved along without ever blocking.
struct Pipes<'a> {
    stdin: Option<ChildStdin>,
    input: &'a [u8],
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    out: Vec<u8>,
    err: Vec<u8>,
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

impl Pipes<'_> {
    fn nonblocking(&mut self) -> io::Result<()> {
        if let Some(p) = &self.stdin {
            set_nonblocking(p)?;
        }
        if let Some(p) = &self.stdout {
            set_nonblocking(p)?;
        }
        if let Some(p) = &self.stderr {
            set_nonblocking(p)?;
        }
        if self.input.is_empty() {
            // EOF at once.
            self.stdin = None;
        }
        Ok(())
    }

    /// Waits up to `wait` for a pipe to be ready (or `exited`, a pidfd, to
    /// say the child exited), then moves what it can.
    fn pump(&mut self, wait: Duration, exited: Option<&OwnedFd>) -> io::Result<()> {
        let mut fds = Vec::with_capacity(4);
        if let Some(p) = exited {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        if let Some(p) = &self.stdin {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLOUT));
        }
        if let Some(p) = &self.stdout {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        if let Some(p) = &self.stderr {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        if fds.is_empty() {
            std::thread::sleep(wait);
            return Ok(());
        }
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        drop(fds);
        self.write_input()?;
        drain(&mut self.stdout, &mut self.out)?;
        drain(&mut self.stderr, &mut self.err)
    }

    fn write_input(&mut self) -> io::Result<()> {
        let Some(p) = self.stdin.as_mut() else {
            return Ok(());
        };
        match p.write(self.input) {
            Ok(n) => self.input = &self.input[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // It stopped reading: the rest is of no use to it.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => self.input = &[],
            Err(e) => return Err(e),
        }
        if self.input.is_empty() {
            self.stdin = None;
        }
        Ok(())
    }
}

/// Reads what `pipe` holds now into `buf`; at end of file, closes it.
fn drain(pipe: &mut Option<impl Read>, buf: &mut Vec<u8>) -> io::Result<()> {
    let Some(p) = pipe.as_mut() else {
        return Ok(());
    };
    let mut chunk = [0u8; 8192];
    loop {
        match p.read(&mut chunk) {
            Ok(0) => {
                *pipe = None;
                return Ok(());
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn output_and_status_are_collected_and_input_is_given() {
        let out = run(
            &mut sh("echo out; echo err >&2; exit 3"),
            None,
            Limits::deadline(Duration::from_secs(20)),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(
            (out.stdout(), out.stderr()),
            ("out\n".into(), "err\n".into())
        );
        // More than a pipe holds, both ways.
        let big = vec![b'x'; 1 << 20];
        let out = run(
            &mut Command::new("cat"),
            Some(&big),
            Limits::deadline(Duration::from_secs(20)),
        )
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout.len(), big.len());
    }

    fn alive(pid: i32) -> bool {
        // A zombie (nobody reaps in some test sandboxes) is not running.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }

    #[test]
    fn a_child_that_hangs_is_killed_at_its_deadline_with_its_group() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("grandchild");
        let script = format!("sleep 100 & echo $! > {}; wait", pidfile.display());
        let start = Instant::now();
        let e = run(
            &mut sh(&script),
            None,
            Limits::deadline(Duration::from_millis(300)),
        )
        .unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(e, Error::Timeout { reaped: true, .. }), "{e:?}");
        assert!(e.to_string().contains("did not finish within 0.3 s"), "{e}");
        let grandchild: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = Instant::now();
        while alive(grandchild) && gone.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(grandchild), "the child's group was not killed");
    }

    #[test]
    fn a_signal_to_kupgrade_stops_the_wait_at_once() {
        let stop = AtomicBool::new(false);
        let start = Instant::now();
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                stop.store(true, Ordering::Relaxed);
            });
            run(
                Command::new("sleep").arg("100"),
                None,
                Limits::deadline(Duration::from_secs(100)).stopped_by(&stop),
            )
            .unwrap_err()
        });
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(e, Error::Interrupted { .. }), "{e:?}");
        assert!(e
            .to_string()
            .starts_with("interrupted by a signal while sleep ran"));
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_naming_it() {
        let e = run(
            &mut Command::new("/nonexistent/criu"),
            None,
            Limits::deadline(TOOL_DEADLINE),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Spawn { .. }));
        assert!(e.to_string().contains("/nonexistent/criu"));
    }
}
