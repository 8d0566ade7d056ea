//! A recording [`System`] for the tests: every call that acts on the
//! machine is kept as one line (`unpack criu/a`), in order, and the calls
//! named in `fail_at` fail, once each.

use std::os::unix::process::ExitStatusExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use contract::cmdline::Cmdline;
use contract::devstate::{self, DeviceState, Family, Interface, Route, TmpfsMount};
use contract::events::{Event, EventLine};
use contract::report::{Outcome, UpgradeReport};
use contract::{PhaseTiming, WorkloadEntry};
use image_format::{Manifest, SectionEntry, SectionKind, State};

use super::faults::Faults;
use super::{
    CriuRun, Durability, Error, ImageHead, ImageInfo, Reboot, RestorerRun, SupportMount, System,
};
use crate::adopt::Adoption;
use crate::child;

/// A boot that restores [`Fake::resuming`]'s image, when nothing fails.
pub const FULL_BOOT: &[&str] = &[
    "mount kernel fs",
    "load virtio_net.ko",
    "mount root",
    "switch root",
    "run restore process",
    "open /dev/pmem0",
    "mark restoring",
    "write record",
    "read devstate",
    "mount tmpfs /dev/shm",
    "mount cgroup2",
    "mount devpts",
    "lo up",
    "start criu probe",
    "unpack tmpfs",
    "mount scratch",
    "unpack criu/a",
    "unpack criu/b",
    "lock CRIU-10002",
    "iface eth0",
    "route default",
    "hostname vm",
    "seed rng",
    "finish criu probe",
    "tcp_window_scaling 0",
    "criu restore a",
    "resume a",
    "note progress",
    "criu restore b",
    "resume b",
    "note progress",
    "tcp_window_scaling 1",
    "start relays",
    "remove scratch",
    "mark restored",
    "list lock tables",
    "wipe",
    "write report",
    "exec /sbin/init",
];

#[derive(Default)]
pub struct Fake {
    pub calls: Vec<String>,
    pub events: Vec<EventLine>,
    pub logs: Vec<String>,
    pub fail_at: Vec<String>,
    /// Calls that panic.
    pub panic_at: Vec<String>,
    pub cmdline: String,
    pub modules: Vec<String>,
    /// Modules the kernel has already (finit_module says EEXIST).
    pub loaded_already: Vec<String>,
    /// Modules the kernel refuses (finit_module says ENOEXEC).
    pub refused: Vec<String>,
    /// The root device never shows up, however long the wait.
    pub root_never_appears: bool,
    /// The store's device never showed up: there is nothing to wipe.
    pub store_missing: bool,
    /// How long each root mount was allowed to wait for its device.
    pub root_waits: Vec<Duration>,
    /// The image in the store; `None`: there is none.
    pub image: Option<ImageInfo>,
    /// What the device state section holds.
    pub devstate: Vec<u8>,
    /// Each `criu restore`'s arguments.
    pub restore_args: Vec<Vec<String>>,
    /// How long each `criu restore` was given.
    pub criu_deadlines: Vec<Duration>,
    /// `criu restore NAME` calls that overrun their deadline, once each.
    pub hang_at: Vec<String>,
    /// Every report it was asked to write.
    pub reports: Vec<UpgradeReport>,
    /// The report on the disk: the last one written.
    pub written: Option<UpgradeReport>,
    /// How the restore process was started.
    pub restorer_runs: Vec<RestorerRun>,
    /// The restore process dies (or overruns) with this instead of running.
    pub restorer_dies: Option<Error>,
    /// Inits that are not there.
    pub missing_inits: Vec<String>,
    /// Lock tables installed and not removed.
    pub locked: Vec<String>,
    /// Each section unpacked, and where.
    pub unpacked: Vec<(String, std::path::PathBuf)>,
    /// How many events had been emitted when the image was last wiped.
    pub events_at_wipe: Option<usize>,
    /// How many when the lock tables were last listed.
    pub events_at_lock_list: Option<usize>,
}

fn workload(name: &str, pid: i32, tcp: bool) -> WorkloadEntry {
    WorkloadEntry {
        name: name.into(),
        cgroup: format!("/sys/fs/cgroup/kupgrade/{name}"),
        root_pid: pid,
        pids: vec![pid],
        section: devstate::criu_section(name),
        tcp_established: tcp,
        pid_namespace: false,
        shell_job: false,
        job_control: false,
        journal_streams: vec![],
        unit: None,
        notify_access: None,
        unit_file: None,
    }
}

pub fn section(name: &str, kind: SectionKind) -> SectionEntry {
    SectionEntry {
        name: name.into(),
        kind,
        raw_len: 1,
        stored_len: 1,
        chunks: 1,
        offset: 0,
    }
}

impl Fake {
    /// A machine booted by `kupgrade go` with a `written` image of two
    /// workloads, `a` and `b` (with a TCP connection, so a lock table), a
    /// tmpfs, one interface and one route.
    pub fn resuming() -> Fake {
        let manifest = Manifest {
            kernel_from: "6.1.0-1".into(),
            kernel_to: "6.1.0-2".into(),
            workloads: vec![workload("a", 10001, false), workload("b", 10002, true)],
            phases: vec![PhaseTiming {
                event: "frozen".into(),
                t_mono_ns: 1,
                t_real_ns: 2,
            }],
            sections: vec![
                section("criu/a", SectionKind::Tree),
                section("criu/b", SectionKind::Tree),
                section(devstate::SECTION, SectionKind::Blob),
                section(devstate::TMPFS_SECTION, SectionKind::Tree),
            ],
            ..Manifest::default()
        };
        let state = DeviceState {
            hostname: "vm".into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: Some("52:54:00:12:34:56".into()),
                mtu: 1500,
                up: true,
                addresses: vec![],
            }],
            routes: vec![Route {
                family: Family::Inet,
                dst: "default".into(),
                gateway: Some("10.0.2.2".into()),
                dev: Some("eth0".into()),
                metric: None,
                scope: None,
                prefsrc: None,
                protocol: None,
            }],
            network_locks: vec!["table inet CRIU-10002 {\n}\n".into()],
            tmpfs_mounts: vec![TmpfsMount {
                path: "/dev/shm".into(),
                options: "mode=1777".into(),
            }],
            devpts_options: None,
            rng_seed: vec![1, 2, 3],
        };
        Fake {
            cmdline: "root=/dev/vda console=ttyS0 kupgrade.resume kupgrade.store=/dev/pmem0".into(),
            modules: vec!["virtio_net.ko".into()],
            image: Some(ImageInfo {
                state: State::Written,
                generation: 7,
                manifest,
            }),
            devstate: serde_json::to_vec(&state).expect("a DeviceState encodes"),
            ..Fake::default()
        }
    }

    /// Changes the device state the image holds.
    pub fn with_state(mut self, change: impl FnOnce(&mut DeviceState)) -> Fake {
        let mut state: DeviceState =
            serde_json::from_slice(&self.devstate).expect("the fake's DeviceState decodes");
        change(&mut state);
        self.devstate = serde_json::to_vec(&state).expect("a DeviceState encodes");
        self
    }

    /// Changes the workloads the image holds.
    pub fn with_workloads(mut self, change: impl FnOnce(&mut Vec<WorkloadEntry>)) -> Fake {
        if let Some(image) = self.image.as_mut() {
            change(&mut image.manifest.workloads);
        }
        self
    }

    pub fn failing_at(calls: &[&str]) -> Fake {
        Fake {
            fail_at: calls.iter().map(|c| c.to_string()).collect(),
            ..Fake::resuming()
        }
    }

    /// How a call named in `fail_at` fails, in the log and the report.
    pub fn failure(call: &str) -> String {
        format!("{call} failed: injected")
    }

    fn step(&mut self, call: String) -> Result<(), Error> {
        self.calls.push(call.clone());
        if self.panic_at.contains(&call) {
            panic!("{call} panicked: injected");
        }
        // Once: a retried call then succeeds.
        let Some(at) = self.fail_at.iter().position(|c| *c == call) else {
            return Ok(());
        };
        self.fail_at.remove(at);
        Err(Error::Command {
            command: call,
            stderr: "injected".into(),
        })
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.iter().map(|e| e.event).collect()
    }

    /// The last two events: how the restore ended, then the real init.
    pub fn ending(&self) -> Vec<Event> {
        let all = self.events();
        all[all.len().saturating_sub(2)..].to_vec()
    }

    pub fn logged(&self, text: &str) -> bool {
        self.logs.iter().any(|l| l.contains(text))
    }

    /// The calls after the first `call`.
    pub fn calls_after(&self, call: &str) -> Vec<&str> {
        let at = self.calls.iter().position(|c| c == call);
        let at = at.unwrap_or_else(|| panic!("no call {call:?} in {:?}", self.calls));
        self.calls[at + 1..].iter().map(String::as_str).collect()
    }

    /// The report as it was left: the last one written.
    pub fn report(&self) -> &UpgradeReport {
        let last = self.reports.last();
        last.unwrap_or_else(|| panic!("no report: {:?}", self.calls))
    }

    /// A report of the fake's image, as the restore process would write it.
    pub fn record_for_test(&self) -> UpgradeReport {
        UpgradeReport {
            outcome: Outcome::Restoring,
            reason: None,
            kernel_from: "6.1.0-1".into(),
            kernel_to: "6.1.0-2".into(),
            image_generation: 7,
            workloads: vec![],
            events: vec![],
            store: Some("/dev/pmem0".into()),
            modules_failed: vec![],
        }
    }

    /// The record written as the restore began.
    pub fn record(&self) -> &UpgradeReport {
        let first = self.reports.first();
        let first = first.unwrap_or_else(|| panic!("no record: {:?}", self.calls));
        assert_eq!(first.outcome, Outcome::Restoring);
        first
    }
}

impl System for Fake {
    fn mount_kernel_fs(&mut self) -> Result<(), Error> {
        self.step("mount kernel fs".into())
    }
    fn cmdline(&mut self) -> String {
        self.cmdline.clone()
    }
    fn kernel_release(&mut self) -> String {
        "6.1.0-2".into()
    }
    fn modules(&mut self, _release: &str) -> Vec<String> {
        self.modules.clone()
    }
    fn load_module(&mut self, _release: &str, module: &str) -> Result<(), Error> {
        self.step(format!("load {module}"))?;
        let errno = if self.loaded_already.iter().any(|m| m == module) {
            nix::Error::EEXIST
        } else if self.refused.iter().any(|m| m == module) {
            nix::Error::ENOEXEC
        } else {
            return Ok(());
        };
        Err(Error::Module {
            path: format!("/lib/modules/6.1.0-2/{module}").into(),
            source: errno,
        })
    }
    fn mount_root(
        &mut self,
        _cmdline: &Cmdline,
        _writable: bool,
        wait: Duration,
    ) -> Result<(), Error> {
        self.root_waits.push(wait);
        if self.root_never_appears {
            self.calls.push("mount root".into());
            return Err(Error::Boot(crate::boot::Error::RootTimeout {
                spec: "LABEL=kupgrade-root".into(),
                secs: wait.as_secs(),
            }));
        }
        self.step("mount root".into())
    }
    fn sleep(&mut self, d: Duration) {
        self.calls.push(format!("sleep {}s", d.as_secs()));
    }
    fn switch_root(&mut self) -> Result<(), Error> {
        self.step("switch root".into())
    }
    fn exec(&mut self, init: &str, _args: &[String]) -> Result<(), String> {
        self.calls.push(format!("exec {init}"));
        if self.missing_inits.iter().any(|m| m == init) {
            return Err("ENOENT: No such file or directory".into());
        }
        Ok(())
    }
    /// Does what the restore process does, in this process: wraps the
    /// system in the failpoints of the command line and restores; a panic
    /// ends it as it ends the real one.
    fn run_restorer(&mut self, run: &RestorerRun) -> Result<(), Error> {
        self.calls.push("run restore process".into());
        self.restorer_runs.push(run.clone());
        if let Some(e) = self.restorer_dies.take() {
            return Err(e);
        }
        let mut restorer = Faults::new(std::mem::take(self));
        restorer.cmdline();
        let ran = panic::catch_unwind(AssertUnwindSafe(|| {
            crate::restore_process(&mut restorer, run)
        }));
        *self = restorer.into_inner();
        ran.map_err(|p| {
            let message = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Error::RestorerDied {
                status: ExitStatus::from_raw(101 << 8),
                stderr: format!("thread 'main' panicked at the fake:\n{message}"),
            }
        })
    }
    fn reboot(&mut self, how: Reboot) -> Error {
        self.calls.push(how.to_string());
        Error::Reboot {
            how,
            source: nix::Error::EPERM,
        }
    }

    fn open_image(&mut self, store: &Path) -> Result<ImageInfo, Error> {
        self.step(format!("open {}", store.display()))?;
        self.image
            .clone()
            .ok_or(Error::Image(image_format::Error::NoImage))
    }
    fn read_superblock(&mut self, store: &Path) -> Result<ImageHead, Error> {
        self.step(format!("read superblock {}", store.display()))?;
        let i = self
            .image
            .as_ref()
            .ok_or(Error::Image(image_format::Error::NoImage))?;
        Ok(ImageHead {
            state: i.state,
            generation: i.generation,
        })
    }
    fn set_image_state(&mut self, state: State) -> Result<(), Error> {
        self.step(format!("mark {state}"))?;
        if let Some(i) = self.image.as_mut() {
            i.state = state;
        }
        Ok(())
    }
    fn wipe_image(&mut self) -> Result<(), Error> {
        if self.store_missing {
            return Err(Error::NoStore);
        }
        self.events_at_wipe = Some(self.events.len());
        self.step("wipe".into())
    }
    fn read_section(&mut self, name: &str) -> Result<Vec<u8>, Error> {
        self.step(format!("read {name}"))?;
        match name {
            devstate::SECTION => Ok(self.devstate.clone()),
            _ => Err(Error::Image(image_format::Error::NoSection(name.into()))),
        }
    }
    fn unpack(&mut self, section: &str, dest: &Path) -> Result<(), Error> {
        self.unpacked.push((section.into(), dest.into()));
        self.step(format!("unpack {section}"))
    }

    fn mount_support(&mut self, m: &SupportMount) -> Result<(), Error> {
        self.step(match m {
            SupportMount::Tmpfs { path, .. } => format!("mount tmpfs {path}"),
            SupportMount::Cgroup2 => "mount cgroup2".into(),
            SupportMount::Devpts { options: None } => "mount devpts".into(),
            SupportMount::Devpts {
                options: Some(options),
            } => format!("mount devpts {options}"),
        })
    }
    fn mount_scratch(&mut self, _dir: &Path) -> Result<(), Error> {
        self.step("mount scratch".into())
    }
    fn remove_scratch(&mut self, _dir: &Path) {
        self.calls.push("remove scratch".into());
    }

    fn loopback_up(&mut self) -> Result<(), Error> {
        self.step("lo up".into())
    }
    fn install_lock_tables(&mut self, tables: &[String]) -> Result<(), Error> {
        let names: Vec<String> = tables
            .iter()
            .map(|t| contract::devstate::lock_table_name(t).unwrap_or_default())
            .collect();
        self.step(format!("lock {}", names.join(" ")))?;
        self.locked.extend(names);
        Ok(())
    }
    fn remove_lock_tables(&mut self, names: &[String]) -> Result<(), Error> {
        self.step(format!("unlock {}", names.join(" ")))?;
        self.locked.retain(|l| !names.contains(l));
        Ok(())
    }
    fn start_criu_probe(&mut self) -> Result<bool, Error> {
        self.step("start criu probe".into())?;
        Ok(true)
    }
    fn finish_criu_probe(&mut self, _within: Duration) -> Result<(), Error> {
        self.step("finish criu probe".into())
    }
    fn lock_tables(&mut self) -> Result<Vec<String>, Error> {
        self.events_at_lock_list = Some(self.events.len());
        self.step("list lock tables".into())?;
        Ok(self.locked.clone())
    }
    fn configure_interface(&mut self, iface: &Interface) -> Result<(), Error> {
        self.step(format!("iface {}", iface.name))
    }
    fn add_route(&mut self, route: &Route) -> Result<(), Error> {
        self.step(format!("route {}", route.dst))
    }
    fn swap_tcp_window_scaling(&mut self, value: &str) -> Result<String, Error> {
        self.step(format!("tcp_window_scaling {value}"))?;
        Ok("1".into())
    }
    fn set_hostname(&mut self, name: &str) -> Result<(), Error> {
        self.step(format!("hostname {name}"))
    }
    fn seed_rng(&mut self, _seed: &[u8]) -> Result<(), Error> {
        self.step("seed rng".into())
    }

    fn criu_restore(&mut self, run: &CriuRun) -> Result<i32, Error> {
        self.restore_args.push(run.args(&[]));
        self.criu_deadlines.push(run.within);
        let call = format!("criu restore {}", run.checkpoint.workload.name);
        if let Some(at) = self.hang_at.iter().position(|c| *c == call) {
            self.hang_at.remove(at);
            self.calls.push(call);
            return Err(Error::Child(child::Error::Overran {
                command: "criu restore".into(),
                within: run.within,
            }));
        }
        self.step(call)?;
        // As CRIU does once the tree runs again.
        let lock = format!("CRIU-{}", run.checkpoint.workload.root_pid);
        self.locked.retain(|l| *l != lock);
        Ok(run.checkpoint.workload.root_pid)
    }
    fn resume_restored(&mut self, w: &WorkloadEntry) -> Result<usize, Error> {
        self.step(format!("resume {}", w.name))?;
        Ok(0)
    }

    fn start_journal_relays(&mut self) -> Result<usize, Error> {
        let streams = self.image.as_ref().map_or(0, |i| {
            i.manifest
                .workloads
                .iter()
                .map(|w| w.journal_streams.len())
                .sum()
        });
        self.step("start relays".into())?;
        Ok(streams)
    }

    fn adopt(&mut self, a: &Adoption) -> Result<(), Error> {
        self.step(format!("adopt {} {}", a.unit, a.main_pid))
    }

    fn write_report(&mut self, report: &UpgradeReport, how: Durability) -> Result<(), Error> {
        let call = match (report.outcome, how) {
            (Outcome::Restoring, Durability::Synced) => "write record",
            (Outcome::Restoring, Durability::Cached) => "note progress",
            (_, Durability::Synced) => "write report",
            (_, Durability::Cached) => "write report unsynced",
        };
        self.reports.push(report.clone());
        self.step(call.into())?;
        self.written = Some(report.clone());
        Ok(())
    }
    fn read_report(&mut self) -> Option<UpgradeReport> {
        self.written.clone()
    }
    fn emit(&mut self, e: &EventLine) {
        self.events.push(e.clone());
    }
    fn log(&mut self, line: &str) {
        self.logs.push(line.into());
    }
}
