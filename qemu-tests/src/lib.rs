//! kupgrade-vm: the QEMU appliance harness. It builds guest assets from
//! Debian's packages and this workspace, boots a kernel under QEMU, runs a
//! scenario's workloads, upgrades the kernel live with kupgrade, probes the
//! workloads from the host, and reports what happened.

pub mod assets;
pub mod debian;
pub mod fleet;
pub mod floor;
pub mod guest;
pub mod jobs;
pub mod matrix;
pub mod probe;
pub mod progress;
pub mod qmp;
pub mod reliability;
pub mod report;
pub mod run;
pub mod scenario;
pub mod stop;
pub mod suite;
