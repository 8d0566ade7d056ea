//! The kupgrade agent: everything that runs on the old kernel, from staging
//! the new one to the kexec.

pub mod capture;
pub mod cgroup;
pub mod child;
pub mod config;
pub mod criu;
pub mod distro;
pub mod exit;
pub mod faults;
pub mod json;
pub mod launch;
pub mod leftovers;
pub mod listen;
pub mod pipeline;
pub mod preflight;
pub mod proc;
pub mod realsys;
pub mod refusal;
pub mod remount;
pub mod report;
pub mod runstate;
pub mod stage;
pub mod status;
pub mod store;
pub mod target;
pub mod units;
pub mod unix_diag;
pub mod watchdog;
pub mod workload;
