//! Everything `kupgrade-init` does to the machine, behind one trait, so that
//! the boot and the restore (`main.rs`, `restore.rs`) are written against it
//! and tested with a recording fake: [`real`] is the machine, [`faults`]
//! injects the fault the kernel command line names, `fake` records calls.
//!
//! Two processes use it: PID 1, which boots, starts the restore process
//! and hands over to the real init, and the restore process, which does
//! everything that touches the image and CRIU.

#[cfg(test)]
pub mod fake;
pub mod faults;
pub mod real;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use contract::cmdline::{self, Cmdline, InitFailpoint};
use contract::criu::Checkpoint;
use contract::devstate::{Interface, Route};
use contract::events::EventLine;
use contract::report::{ModuleFailure, UpgradeReport};
use contract::{PhaseTiming, WorkloadEntry};
use image_format::{Manifest, State};

use crate::adopt::Adoption;
use crate::{boot, child};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error("cannot open store {}", path.display())]
    OpenStore {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Image(#[from] image_format::Error),
    #[error("no store is open")]
    NoStore,
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot load module {}", path.display())]
    Module {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot mount {fstype} on {}", target.display())]
    Mount {
        fstype: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    Child(#[from] child::Error),
    #[error(transparent)]
    Netlink(#[from] crate::netlink::Error),
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("kupgrade-init's restore process died ({status}){}", last_words(.stderr))]
    RestorerDied { status: ExitStatus, stderr: String },
    #[error("criu restore exited with {status}: {errors}")]
    CriuExited { status: ExitStatus, errors: String },
    #[error("cannot set hostname {name}")]
    Hostname {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot re-arm timers: {0}")]
    Timers(String),
    #[error("cannot encode the report")]
    EncodeReport(#[source] serde_json::Error),
    #[error("failpoint {}={point}", cmdline::FAILPOINT)]
    Injected { point: InitFailpoint },
    #[error("cannot {how} the machine")]
    Reboot {
        how: Reboot,
        #[source]
        source: nix::Error,
    },
}

/// How a boot that cannot go on stops the machine (`reboot(2)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reboot {
    /// Stop, with the console showing why.
    Halt,
    /// Start again through the firmware and the boot loader.
    Restart,
}

impl fmt::Display for Reboot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reboot::Halt => "halt",
            Reboot::Restart => "restart",
        })
    }
}

/// `argv[1]` of the restore process: `kupgrade-init __restore STORE
/// TIMEOUT_MS EVENTS_JSON MODULES_FAILED_JSON`.
pub const RESTORER_ARG: &str = "__restore";

/// What the restore process is started with.
#[derive(Clone, Debug, PartialEq)]
pub struct RestorerRun {
    pub store: PathBuf,
    /// The init's events so far, for the report.
    pub events: Vec<PhaseTiming>,
    /// The modules that did not load, for the report.
    pub modules_failed: Vec<ModuleFailure>,
    /// The restore's budget: the process keeps to it, and is killed with
    /// its process group a little after it.
    pub timeout: Duration,
}

/// The gist of what a dying process wrote to stderr, for one line: a Rust
/// panic's message without the hint about backtraces.
fn last_words(stderr: &str) -> String {
    let mut text = String::new();
    for line in stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
    {
        if !text.is_empty() {
            text.push_str(if text.ends_with(':') { " " } else { ": " });
        }
        text.push_str(line);
    }
    match text.char_indices().rev().nth(499) {
        None if text.is_empty() => String::new(),
        None => format!(": {text}"),
        Some((at, _)) => format!(": ...{}", &text[at..]),
    }
}

/// What the superblock alone says of the image in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHead {
    pub state: State,
    pub generation: u64,
}

/// What the superblock and manifest of the image in the store say.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub state: State,
    pub generation: u64,
    pub manifest: Manifest,
}

/// One `criu restore`, as the restore decided it.
#[derive(Clone, Debug)]
pub struct CriuRun<'a> {
    pub checkpoint: Checkpoint<'a>,
    /// CRIU, and everything it started, is killed when this has passed.
    pub within: Duration,
    /// Programs CRIU runs at each stage of the restore (`--action-script`);
    /// a normal restore has none, the fault campaign's hang has one.
    pub action_scripts: Vec<PathBuf>,
}

impl CriuRun<'_> {
    /// With the workload's journal streams open at `fds` (see
    /// [`contract::journal`]).
    pub fn args(&self, fds: &[i32]) -> Vec<String> {
        let mut args = self.checkpoint.restore_args_inheriting(fds);
        for s in &self.action_scripts {
            args.push("--action-script".into());
            args.push(s.display().to_string());
        }
        args
    }
}

/// How far a report must have got when `write_report` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// On the disk: it must outlive a reset.
    Synced,
    /// Written: it must outlive the restore process, not the machine.
    Cached,
}

/// A file system the restored tasks expect to find mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SupportMount {
    /// A tmpfs the workloads used (its files come from the image).
    Tmpfs { path: String, options: String },
    /// CRIU puts the tasks back in their cgroups.
    Cgroup2,
    /// Their terminals, with `/dev/ptmx`, mounted with the options it had
    /// in the old boot when the image says.
    Devpts { options: Option<String> },
}

/// Everything `kupgrade-init` does to the machine, in the order of a boot.
pub trait System {
    // The normal boot.
    /// `/proc`, `/sys`, `/dev`, then logging to `/dev/kmsg`.
    fn mount_kernel_fs(&mut self) -> Result<(), Error>;
    fn cmdline(&mut self) -> String;
    fn kernel_release(&mut self) -> String;
    /// The modules the initramfs builder listed, in load order.
    fn modules(&mut self, release: &str) -> Vec<String>;
    fn load_module(&mut self, release: &str, module: &str) -> Result<(), Error>;
    /// Waits up to `wait` for the root device and mounts it; `writable`
    /// forces a read-write mount (a restore writes to the root).
    fn mount_root(
        &mut self,
        cmdline: &Cmdline,
        writable: bool,
        wait: Duration,
    ) -> Result<(), Error>;
    fn sleep(&mut self, d: Duration);
    /// Makes the mounted root `/`; PID 1 goes on running.
    fn switch_root(&mut self) -> Result<(), Error>;
    /// Replaces PID 1 with `init`, giving it `args`; returns only why it
    /// could not (the fake says `Ok` for an init it pretends to run).
    fn exec(&mut self, init: &str, args: &[String]) -> Result<(), String>;
    /// Halts or restarts the machine; returns only why it could not.
    fn reboot(&mut self, how: Reboot) -> Error;
    /// Runs the restore in a process of its own and waits for it, killing
    /// it and its process group a little after its budget: `Ok` when it
    /// ran to its end, whatever it restored.
    fn run_restorer(&mut self, run: &RestorerRun) -> Result<(), Error>;

    // The image in the store.
    /// Opens the store (waiting a little for its device) and the image.
    fn open_image(&mut self, store: &Path) -> Result<ImageInfo, Error>;
    /// Opens the store and reads its superblock only: what PID 1 does after
    /// a restore process that died, which may have died of the rest.
    fn read_superblock(&mut self, store: &Path) -> Result<ImageHead, Error>;
    fn set_image_state(&mut self, state: State) -> Result<(), Error>;
    /// Zeroes the image: it holds process memory.
    fn wipe_image(&mut self) -> Result<(), Error>;
    fn read_section(&mut self, name: &str) -> Result<Vec<u8>, Error>;
    fn unpack(&mut self, section: &str, dest: &Path) -> Result<(), Error>;

    // File systems.
    fn mount_support(&mut self, m: &SupportMount) -> Result<(), Error>;
    /// A private tmpfs for the unpacked CRIU images.
    fn mount_scratch(&mut self, dir: &Path) -> Result<(), Error>;
    /// Unmounts and removes it, whatever it holds.
    fn remove_scratch(&mut self, dir: &Path);

    /// Starts CRIU's probe of this kernel's features (`criu check`), which
    /// it caches in `/run/criu.kdat` for the restores: it runs while the
    /// images are unpacked and the network configured. False when it was
    /// not started: on one CPU it would only take the unpack's time.
    fn start_criu_probe(&mut self) -> Result<bool, Error>;
    /// Waits at most `within` for the probe [`System::start_criu_probe`]
    /// started, if any; past it, kills it.
    fn finish_criu_probe(&mut self, within: Duration) -> Result<(), Error>;

    // Network and system state.
    fn loopback_up(&mut self) -> Result<(), Error>;
    /// Installs CRIU's lock tables (`nft list table` output, one each) in
    /// one transaction: all of them or none.
    fn install_lock_tables(&mut self, tables: &[String]) -> Result<(), Error>;
    /// Deletes each `inet NAME`, in one transaction: name only tables that
    /// are there ([`System::lock_tables`]).
    fn remove_lock_tables(&mut self, names: &[String]) -> Result<(), Error>;
    /// The names of CRIU's lock tables installed now (`inet CRIU-*`).
    fn lock_tables(&mut self) -> Result<Vec<String>, Error>;
    /// Name (found by MAC), MTU, addresses, link state.
    fn configure_interface(&mut self, iface: &Interface) -> Result<(), Error>;
    fn add_route(&mut self, route: &Route) -> Result<(), Error>;
    /// Sets `net.ipv4.tcp_window_scaling`; returns the value it had.
    fn swap_tcp_window_scaling(&mut self, value: &str) -> Result<String, Error>;
    fn set_hostname(&mut self, name: &str) -> Result<(), Error>;
    /// Mixes the old kernel's entropy into the pool.
    fn seed_rng(&mut self, seed: &[u8]) -> Result<(), Error>;

    // CRIU.
    /// Restores a workload; returns its root's PID on this kernel: the one
    /// it had, but for the init of a PID namespace of its own, whose PID
    /// outside that namespace is whatever was free.
    fn criu_restore(&mut self, run: &CriuRun) -> Result<i32, Error>;
    /// Re-arms the periodic timers CRIU restored disarmed, then continues
    /// the tasks it left stopped (whatever the timers did); returns how
    /// many timers were re-armed.
    fn resume_restored(&mut self, w: &WorkloadEntry) -> Result<usize, Error>;
    /// Starts a relay for each journal stream restored (see
    /// [`crate::relay`]); returns how many.
    fn start_journal_relays(&mut self) -> Result<usize, Error>;
    /// Leaves what has the workload's systemd unit adopt it (see
    /// [`crate::adopt`]).
    fn adopt(&mut self, a: &Adoption) -> Result<(), Error>;

    // Telling.
    /// Replaces the report, whole (a new file renamed over the old one).
    fn write_report(&mut self, report: &UpgradeReport, how: Durability) -> Result<(), Error>;
    /// The report as it is now, if there is one that reads.
    fn read_report(&mut self) -> Option<UpgradeReport>;
    fn emit(&mut self, e: &EventLine);
    fn log(&mut self, line: &str);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dying_process_last_words_are_one_line() {
        let panic = "thread 'main' (82) panicked at src/x.rs:1:2:\nboom\n\
                     note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            last_words(panic),
            ": thread 'main' (82) panicked at src/x.rs:1:2: boom"
        );
        assert_eq!(last_words("a\nb\n"), ": a: b");
        assert_eq!(last_words("\n"), "");
        let long = "x".repeat(2000);
        let said = last_words(&long);
        assert!(
            said.starts_with(": ...") && said.len() == 505,
            "{}",
            said.len()
        );
    }
}
