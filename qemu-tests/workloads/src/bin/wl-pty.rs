//! An interactive shell on a pseudo-terminal, with `/dev/tty` open and a
//! job in the background, driven as a terminal emulator would drive it.
//!
//! The launched process (a session leader, from `kupgrade launch`) opens a
//! pty master (`/dev/ptmx`) and the slave, which becomes its controlling
//! terminal, starts `--role terminal` with the master as its stdin, and
//! execs `sh -i` on the slave: the shell leads the tree, the terminal
//! program is its child. (The other way round, a shell below the holder of
//! its master, CRIU 3.17 does not restore once the shell has `/dev/tty`
//! open; `kupgrade check` refuses it.)
//!
//! The interactive shell opens `/dev/tty` itself (busybox ash does, for job
//! control, as bash does): a second open of it would deadlock CRIU 3.17's
//! restore, which `kupgrade check` refuses. The terminal types
//! `stty -echo` and `sleep 100000 &` (a job in its own process group), then
//! every tick `jobs -l; echo mark=N` (builtins only: an external command
//! would hold the foreground while it runs) and reads the answer off the
//! master up to `mark=N`. A line a tick:
//!
//! ```text
//! tty=/dev/pts/0 shell=PID job_pid=1234 job=Running mark=N rtt_ms=T
//! ```
//!
//! (`none` where the answer lacked the job).
//!
//! Usage: `wl-pty LOG [tick ms, 500] [shell, /bin/sh]`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};

use kupgrade_workloads::{die, mono_ms, Args, Ticker};

const USAGE: &str = "wl-pty LOG [tick ms] [shell]";

/// What the shell answered to one tick's commands.
#[derive(Debug, Default, PartialEq, Eq)]
struct Answer {
    job_pid: Option<u32>,
    job_state: Option<String>,
}

/// Reads one answer off the terminal, up to the line `mark=N`.
fn read_answer(term: &mut impl BufRead, mark: &str) -> std::io::Result<Answer> {
    let mut a = Answer::default();
    let mut line = String::new();
    loop {
        line.clear();
        if term.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the terminal closed",
            ));
        }
        let l = line.trim();
        if l == mark {
            return Ok(a);
        }
        if let Some(job) = l.strip_prefix("[1]") {
            // busybox: "[1]+ 1234 Running   sleep 100000"
            let mut w = job.trim_start_matches(['+', '-', ' ']).split_whitespace();
            a.job_pid = w.next().and_then(|p| p.parse().ok());
            a.job_state = w.next().map(str::to_string);
        }
    }
}

/// The launched process: sets up the terminal, starts its driver and
/// becomes the shell.
fn shell(log: &str, tick: u64, shell: &str) -> ! {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .and_then(|m| grantpt(&m).and(unlockpt(&m)).map(|_| m))
        .unwrap_or_else(|e| die(format!("cannot open a pty: {e}")));
    let name = ptsname_r(&master).unwrap_or_else(|e| die(format!("ptsname: {e}")));
    // A session leader without a terminal: this one becomes its own.
    let slave = File::options()
        .read(true)
        .write(true)
        .open(&name)
        .unwrap_or_else(|e| die(format!("cannot open {name}: {e}")));
    let to_master = master
        .as_fd()
        .try_clone_to_owned()
        .unwrap_or_else(|e| die(format!("dup the master: {e}")));
    let driver = kupgrade_workloads::spawn_role("terminal")
        .args([log, &tick.to_string(), &name])
        .stdin(Stdio::from(to_master))
        .spawn();
    if let Err(e) = driver {
        die(format!("cannot start the terminal: {e}"));
    }
    drop(master);
    let io = |f: &File| {
        f.try_clone()
            .map(Stdio::from)
            .unwrap_or_else(|e| die(format!("dup {name}: {e}")))
    };
    let e = Command::new(shell)
        .arg("-i")
        .env("PS1", "")
        .env("PS2", "")
        .env_remove("ENV")
        .stdin(io(&slave))
        .stdout(io(&slave))
        .stderr(io(&slave))
        .exec();
    die(format!("cannot run {shell} on {name}: {e}"))
}

/// The terminal program: types at the shell through the master (its stdin).
fn terminal(log: &str, tick: u64, name: &str) {
    // Out of the shell's session, as a terminal emulator is: the signals of
    // the terminal (SIGINT, SIGHUP) are the shell's, not its own.
    if let Err(e) = nix::unistd::setsid() {
        die(format!("setsid: {e}"));
    }
    let master: File = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .unwrap_or_else(|e| die(format!("dup the master: {e}")));
    let shell = nix::unistd::getppid();
    let mut typing = &master;
    let mut term = BufReader::new(&master);
    let mut out = Ticker::open_or_die(log, None);
    let setup = "stty -echo\nsleep 100000 &\n";
    if let Err(e) = typing.write_all(setup.as_bytes()) {
        die(format!("cannot type on the terminal: {e}"));
    }
    loop {
        let n = out.seq();
        let mark = format!("mark={n}");
        let sent = mono_ms();
        if let Err(e) = typing.write_all(format!("jobs -l; echo {mark}\n").as_bytes()) {
            die(format!("cannot type on the terminal: {e}"));
        }
        let a = read_answer(&mut term, &mark)
            .unwrap_or_else(|e| die(format!("no answer to tick {n}: {e}")));
        let none = || "none".to_string();
        out.tick_or_die(&format!(
            "tty={name} shell={shell} job_pid={} job={} {mark} rtt_ms={}",
            a.job_pid.map(|p| p.to_string()).unwrap_or_else(none),
            a.job_state.unwrap_or_else(none),
            mono_ms().saturating_sub(sent)
        ));
        std::thread::sleep(Duration::from_millis(tick));
    }
}

fn main() {
    let mut args = Args::new(USAGE);
    match args.role().as_deref() {
        None => {
            let log = args.req();
            let tick: u64 = args.opt(500);
            let sh = args.opt("/bin/sh".to_string());
            shell(&log, tick, &sh)
        }
        Some("terminal") => {
            let (log, tick, name) = (args.req(), args.req_as(), args.req());
            terminal(&log, tick, &name)
        }
        Some(other) => die(format!("unknown role {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_up_to_their_mark() {
        let text = "jobs -l; echo mark=3\r\n[1]+ 1234 Running                 sleep 100000\r\nmark=3\r\nlater\r\n";
        let mut r = std::io::Cursor::new(text.as_bytes());
        let a = read_answer(&mut r, "mark=3").expect("answer");
        assert_eq!(
            a,
            Answer {
                job_pid: Some(1234),
                job_state: Some("Running".into())
            }
        );
        let mut cut = std::io::Cursor::new("[1]+ 1 Running\r\n".as_bytes());
        assert!(read_answer(&mut cut, "mark=4").is_err());
    }
}
