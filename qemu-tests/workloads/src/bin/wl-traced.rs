//! A workload kupgrade must refuse: it runs `wl-counter LOG` as a child and
//! traces it (PTRACE_SEIZE), as a debugger or strace would. CRIU needs to
//! ptrace every task itself, so `kupgrade go` has to refuse before freezing
//! anything, and the counter must carry on untouched.

use std::process::Command;

use nix::sys::ptrace;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

fn main() {
    let Some(log) = std::env::args().nth(1) else {
        eprintln!("usage: wl-traced LOG");
        std::process::exit(2);
    };
    let counter = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("wl-counter")))
        .unwrap_or_else(|| "wl-counter".into());
    let child = match Command::new(&counter).arg(&log).args(["4", "100"]).spawn() {
        Ok(c) => Pid::from_raw(c.id() as i32),
        Err(e) => {
            eprintln!("wl-traced: cannot run {}: {e}", counter.display());
            std::process::exit(1);
        }
    };
    if let Err(e) = ptrace::seize(child, ptrace::Options::empty()) {
        eprintln!("wl-traced: cannot trace {child}: {e}");
        std::process::exit(1);
    }
    // Pass every stop on, re-injecting signals, like a quiet debugger.
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Stopped(pid, sig)) => {
                let _ = ptrace::cont(pid, Some(sig));
            }
            Ok(WaitStatus::PtraceEvent(pid, _, _)) | Ok(WaitStatus::PtraceSyscall(pid)) => {
                let _ = ptrace::cont(pid, None);
            }
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => std::process::exit(1),
            Ok(_) => {}
            Err(nix::Error::EINTR) => {}
            Err(_) => std::process::exit(1),
        }
    }
}
