//! Everything `kupgrade-init` does to the machine, behind one trait, so that
//! the boot and the restore (`main.rs`, `restore.rs`) are written against it
//! and tested with a recording fake: [`real`] is the machine, [`faults`]
//! injects the fault the kernel command line names, `fake` records calls.

#[cfg(test)]
pub mod fake;
pub mod faults;
pub mod real;

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use contract::cmdline::{self, Cmdline, InitFailpoint};
use contract::criu::Checkpoint;
use contract::devstate::{Interface, Route};
use contract::events::EventLine;
use contract::report::UpgradeReport;
use contract::WorkloadEntry;
use image_format::{Manifest, State};

use crate::boot;

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
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
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
}

/// What the superblock and manifest of the image in the store say.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub state: State,
    pub generation: u64,
    pub manifest: Manifest,
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
    /// `writable` forces a read-write mount (a restore writes to the root).
    fn mount_root(&mut self, cmdline: &Cmdline, writable: bool) -> Result<(), Error>;
    fn sleep(&mut self, d: Duration);
    /// Makes the mounted root `/`; PID 1 goes on running.
    fn switch_root(&mut self) -> Result<(), Error>;
    /// Replaces PID 1 with the real init; returns only why none could run.
    fn exec_init(&mut self, cmdline: &Cmdline) -> String;

    // The image in the store.
    /// Opens the store (waiting a little for its device) and the image.
    fn open_image(&mut self, store: &Path) -> Result<ImageInfo, Error>;
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

    // Network and system state.
    fn loopback_up(&mut self) -> Result<(), Error>;
    /// Installs one of CRIU's lock tables (`nft list table` output).
    fn install_lock_table(&mut self, nft: &str) -> Result<(), Error>;
    /// Deletes `inet NAME`; one already gone is not an error.
    fn remove_lock_table(&mut self, name: &str) -> Result<(), Error>;
    /// Name (found by MAC), MTU, addresses, link state.
    fn configure_interface(&mut self, iface: &Interface) -> Result<(), Error>;
    fn add_route(&mut self, route: &Route) -> Result<(), Error>;
    /// Sets `net.ipv4.tcp_window_scaling`; returns the value it had.
    fn swap_tcp_window_scaling(&mut self, value: &str) -> Result<String, Error>;
    fn set_hostname(&mut self, name: &str) -> Result<(), Error>;
    /// Mixes the old kernel's entropy into the pool.
    fn seed_rng(&mut self, seed: &[u8]) -> Result<(), Error>;

    // CRIU.
    fn criu_restore(&mut self, checkpoint: &Checkpoint) -> Result<(), Error>;
    /// Re-arms the periodic timers CRIU restored disarmed, then continues
    /// the tasks it left stopped (whatever the timers did); returns how
    /// many timers were re-armed.
    fn resume_restored(&mut self, w: &WorkloadEntry) -> Result<usize, Error>;

    // Telling.
    fn write_report(&mut self, report: &UpgradeReport) -> Result<(), Error>;
    fn emit(&mut self, e: &EventLine);
    fn log(&mut self, line: &str);
}
