//! Scenario files (TOML): which kernels, which guest, which workloads, which
//! host probes, and which checks decide the verdict.
//!
//! ```toml
//! name = "counter"
//! description = "a process keeping state in memory and appending to a file"
//! [kernels]
//! from = "oldest"            # oldest | previous | latest | an exact release
//! to = "latest"
//! series = "6.1.0"           # the package series the keywords pick from
//! # a kernel of another series names it: to = { series = "6.12", release = "latest" }
//! [guest]
//! memory_mib = 1024
//! store_mib = 256
//! [[setup]]                 # first boot, before the workloads
//! shell = "mkdir -p /var/lib/counter"
//! [[workload]]
//! name = "counter"
//! command = ["/usr/lib/kupgrade-vm/wl-counter", "/var/log/counter.log"]
//! ready = { file = "/var/log/counter.log" }
//! [[probe]]
//! name = "echo"
//! guest_port = 7000
//! [[check]]
//! name = "continuity"
//! command = ["/usr/lib/kupgrade-vm/wl-counter-check", "/var/log/counter.log"]
//! [[fault]]                 # a row of docs/reliability.md
//! point = "before the kexec: the last step fails"
//! expected = "workloads carry on"
//! check = "continuity"      # judged by this check
//! [[attempt]]               # a failing `kupgrade go` before the upgrade
//! point = "error after the freeze"
//! expected = "refused, workloads carry on"
//! go_env = ["KUPGRADE_FAILPOINT=error-after-freeze"]
//! expect = "refused"        # or "killed": `kupgrade resume` runs after it
//! refusal_contains = "every workload was resumed"
//! close_stdout = false      # true: its stdout is closed after one line
//! checks = ["continuity"]   # run after it (after the resume)
//! ```
//!
//! Every fault before the kexec leaves the old kernel running, so one boot
//! runs many `[[attempt]]`s in turn, after `kupgrade stage` and before the
//! upgrade (staged again when an attempt unloaded the kernel). Each is a
//! row of the fault table, judged by the go's end and its checks together.
//!
//! README.md ("Trying your own workloads") documents every field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Guest-physical address of the store (`memmap=SIZE!ADDR`): clear of the
/// kernel (loaded low) and of the initramfs (QEMU puts it at the top of RAM).
pub const STORE_ADDR_MIB: u32 = 512;
/// Room QEMU needs above the store for the initramfs.
const INITRD_ROOM_MIB: u32 = 128;

/// RAM that QEMU's `pc` machine maps below 4 GiB, where the store and the
/// initramfs go: all of it up to 3.5 GiB, else 3 GiB (the rest goes above
/// 4 GiB, past the PCI hole).
fn low_ram_mib(memory_mib: u32) -> u32 {
    if memory_mib >= 3584 {
        3072
    } else {
        memory_mib
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read scenario {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("scenario {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("scenario {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Kinds of process state this scenario proves survive (rows of the
    /// compatibility table).
    #[serde(default)]
    pub proves: Vec<String>,
    /// What it does not cover, for the table.
    #[serde(default)]
    pub limits: String,
    #[serde(default)]
    pub kernels: Kernels,
    #[serde(default)]
    pub guest: Guest,
    /// Commands run in turn on the first boot before anything starts
    /// (write a config, create a user); each must exit 0.
    #[serde(default, rename = "setup")]
    pub setup: Vec<Setup>,
    #[serde(default, rename = "workload")]
    pub workloads: Vec<Workload>,
    #[serde(default, rename = "probe")]
    pub probes: Vec<Probe>,
    /// Commands the guest starts that kupgrade does not preserve (a log
    /// shipper, a load generator): ordinary processes of the old system.
    #[serde(default)]
    pub background: Vec<Vec<String>>,
    #[serde(default)]
    pub upgrade: Upgrade,
    #[serde(default, rename = "check")]
    pub checks: Vec<Check>,
    /// The faults it injects, rows of `docs/reliability.md`.
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
    /// Failing `kupgrade go` runs before the upgrade, on the first boot.
    #[serde(default, rename = "attempt")]
    pub attempts: Vec<Attempt>,
    /// Several guests upgraded from the host by the Ansible collection
    /// (`ansible/`), not by the guest itself: see [`crate::fleet`].
    #[serde(default)]
    pub fleet: Option<Fleet>,
}

/// A fleet of Debian guests, each reachable over ssh on a forwarded port of
/// 127.0.0.1, rolled by `kupgrade.fleet.rolling_upgrade`. Every guest runs
/// the scenario's setup, workloads, probes and checks (`$KUPGRADE_VM_HOST`
/// names the guest in their shell).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Inventory names, in the order of the roll (the canary first), with
    /// what the roll must leave on each.
    #[serde(rename = "host")]
    pub hosts: Vec<FleetHost>,
    /// More `-e` for `ansible-playbook` (`kupgrade_serial`, say), each one
    /// `key=value` or JSON.
    #[serde(default)]
    pub extra_vars: Vec<String>,
    /// Seconds the playbook may take.
    #[serde(default = "default_playbook_secs")]
    pub playbook_secs: u64,
}

fn default_playbook_secs() -> u64 {
    1500
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetHost {
    pub name: String,
    pub expect: HostExpect,
    /// Text the fleet report's reason for a refused host must contain.
    #[serde(default, deserialize_with = "one_or_many")]
    pub reason_contains: Vec<String>,
}

/// What the roll leaves on one host.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HostExpect {
    /// On the target kernel, its workloads restored.
    Upgraded,
    /// `kupgrade check` refused it: the old kernel, the workloads running.
    Refused,
    /// The roll stopped before it: no kupgrade command ran there.
    Untouched,
}

/// A `kupgrade go` with a fault, run before the upgrade: every fault before
/// the kexec leaves the old kernel running, so one boot runs many.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Attempt {
    /// Where the fault strikes: the row's fault point.
    pub point: String,
    /// What must happen then: the row's expected.
    pub expected: String,
    /// Environment for this `kupgrade go`, `KEY=VALUE` (the failpoint).
    #[serde(default)]
    pub go_env: Vec<String>,
    /// Extra arguments for this `kupgrade go`.
    #[serde(default)]
    pub go_args: Vec<String>,
    pub expect: AttemptExpect,
    /// Text the output of a refused go must contain.
    #[serde(default, deserialize_with = "one_or_many")]
    pub refusal_contains: Vec<String>,
    /// Its stdout is closed after the first line, as when a session drops
    /// or `kupgrade go | tee log` is stopped.
    #[serde(default)]
    pub close_stdout: bool,
    /// Names of the scenario's `[[check]]`s, run after it in turn.
    pub checks: Vec<String>,
}

/// How an [`Attempt`]'s `kupgrade go` must end.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AttemptExpect {
    /// It exits non-zero having undone everything itself.
    Refused,
    /// It dies by a signal (SIGKILL, abort); `kupgrade resume` must then
    /// succeed, before the checks.
    Killed,
}

impl Attempt {
    /// The check that judges attempt `index` (from 0) as a whole: the go's
    /// end and every one of its checks.
    pub fn check_name(&self, index: usize) -> String {
        format!("attempt {}: {}", index + 1, self.point)
    }
}

/// A fault a scenario injects: where it strikes, what kupgrade promises
/// then, and the scenario's check that shows the promise kept.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Where it strikes (`criu dump hangs past dump_timeout_s`).
    pub point: String,
    /// What must happen then (`workloads resumed, store wiped`).
    pub expected: String,
    /// Name of one of the scenario's `[[check]]`s.
    pub check: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Kernels {
    /// Release to boot first: `oldest`, `previous`, `latest` or an exact
    /// release such as `6.1.0-47-cloud-amd64`, of `series`; or a table that
    /// names its own series (`{ series = "6.12", release = "latest" }`).
    pub from: Kernel,
    pub to: Kernel,
    /// Package series the keywords pick from.
    #[serde(default = "default_series")]
    pub series: String,
}

impl Kernels {
    /// (release or keyword, series) of `from`.
    pub fn from(&self) -> (&str, &str) {
        self.from.pick(&self.series)
    }

    /// (release or keyword, series) of `to`.
    pub fn to(&self) -> (&str, &str) {
        self.to.pick(&self.series)
    }
}

/// One kernel of a scenario: a release (or keyword) of the scenario's
/// series, or of a series of its own (an upgrade across series, such as
/// Debian 12's 6.1 to its 6.12).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(
    untagged,
    expecting = "a release (\"oldest\", \"previous\", \"latest\" or an exact one) or a table { series = \"6.12\", release = \"latest\" }"
)]
pub enum Kernel {
    Release(String),
    OfSeries(KernelOfSeries),
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KernelOfSeries {
    /// Package series, e.g. `6.12` for `linux-image-6.12.*-cloud-amd64`.
    pub series: String,
    /// `oldest`, `previous`, `latest` or an exact release.
    #[serde(default = "latest")]
    pub release: String,
}

fn latest() -> String {
    "latest".into()
}

impl Kernel {
    /// (release or keyword, series), `series` being the scenario's.
    pub fn pick<'a>(&'a self, series: &'a str) -> (&'a str, &'a str) {
        match self {
            Kernel::Release(r) => (r, series),
            Kernel::OfSeries(k) => (&k.release, &k.series),
        }
    }
}

impl From<&str> for Kernel {
    fn from(release: &str) -> Self {
        Kernel::Release(release.to_string())
    }
}

/// A string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn default_series() -> String {
    "6.1.0".to_string()
}

impl Default for Kernels {
    fn default() -> Self {
        Kernels {
            from: "oldest".into(),
            to: "latest".into(),
            series: default_series(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Guest {
    pub memory_mib: u32,
    pub cpus: u32,
    /// Size of the `memmap=` store reserved for the image.
    pub store_mib: u32,
    /// Extra Debian packages installed in the guest (with their dependencies).
    pub packages: Vec<String>,
    /// Deadline for the whole run; QEMU is stopped when it passes.
    pub timeout_secs: u64,
    /// Which guest boots: the minimal appliance or a Debian server.
    pub flavour: Flavour,
    /// The Debian guest's initramfs generator.
    pub initramfs: Initramfs,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// busybox, the agent as PID 1, a plain ext4 root, kupgrade's initramfs.
    #[default]
    Appliance,
    /// Debian 12 with systemd, its root on LVM, kernels installed by dpkg,
    /// booted through initramfs-tools (see `debian.rs`).
    Debian,
}

/// What builds the Debian guest's initramfs images: Debian's default, or
/// dracut in its place (the two packages conflict).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Initramfs {
    #[default]
    InitramfsTools,
    Dracut,
}

impl Initramfs {
    /// The Debian package, also the name in scenario files.
    pub fn package(self) -> &'static str {
        match self {
            Initramfs::InitramfsTools => "initramfs-tools",
            Initramfs::Dracut => "dracut",
        }
    }
}

impl Guest {
    /// The kernel parameter that reserves the store.
    pub fn memmap(&self) -> String {
        format!("memmap={}M!{STORE_ADDR_MIB}M", self.store_mib)
    }
}

impl Default for Guest {
    fn default() -> Self {
        Guest {
            memory_mib: 1024,
            cpus: 1,
            store_mib: 256,
            packages: vec![],
            timeout_secs: 600,
            flavour: Flavour::Appliance,
            initramfs: Initramfs::InitramfsTools,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub pid_namespace: bool,
    /// `kupgrade launch --ipc-namespace`: its SysV IPC objects are carried.
    #[serde(default)]
    pub ipc_namespace: bool,
    /// Files copied from the host into the guest before it boots.
    #[serde(default)]
    pub files: Vec<FileCopy>,
    /// Seconds to let it run before the upgrade (after the probes connect).
    #[serde(default)]
    pub warmup_secs: u64,
    /// Started like a service (cgroup `system.slice/NAME.service`) and
    /// declared in /etc/kupgrade/config.toml, instead of `kupgrade launch`.
    #[serde(default)]
    pub declared: bool,
    /// For a daemon that forks and lets the started process exit: the file
    /// it writes its pid into. That pid, once the file names it, is the one
    /// the upgrade must keep (as a service manager's PIDFile= says).
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// With `declared`: its `runtime_paths` in config.toml, the runtime
    /// state on tmpfs it needs and kupgrade cannot find by itself.
    #[serde(default)]
    pub runtime_paths: Vec<PathBuf>,
    /// Waited for after it starts, before the next workload, the probes
    /// and the upgrade.
    #[serde(default)]
    pub ready: Option<Ready>,
}

/// When a workload is ready: every condition given holds.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// A TCP socket listens on this port (IPv4 or IPv6).
    #[serde(default)]
    pub port: Option<u16>,
    /// This guest file exists (e.g. a pid file).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// This guest command exits 0 (retried until it does).
    #[serde(default)]
    pub command: Vec<String>,
    /// The same, as a line for `/bin/sh -c`.
    #[serde(default)]
    pub shell: Option<String>,
    /// The run fails when it is not ready by then.
    #[serde(default = "default_ready_timeout")]
    pub timeout_secs: u64,
}

impl Ready {
    /// The command to retry, if any (`prelude`: see [`guest_argv`]).
    pub fn argv(&self, prelude: &str) -> Option<Vec<String>> {
        (!self.command.is_empty() || self.shell.is_some())
            .then(|| guest_argv(&self.command, &self.shell, prelude))
    }
}

fn default_ready_timeout() -> u64 {
    60
}

/// A command run once on the first boot, before the workloads start.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    /// For the progress display and errors.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub command: Vec<String>,
    /// The same, as a line for `/bin/sh -c`.
    #[serde(default)]
    pub shell: Option<String>,
}

impl Setup {
    pub fn argv(&self, prelude: &str) -> Vec<String> {
        guest_argv(&self.command, &self.shell, prelude)
    }
}

/// A guest command given as `command = [...]` or as `shell = "..."`;
/// `prelude` is shell text run before a `shell` line (the guest's
/// [`crate::guest::path_programs_prelude`]).
pub fn guest_argv(command: &[String], shell: &Option<String>, prelude: &str) -> Vec<String> {
    match shell {
        Some(line) => vec!["/bin/sh".into(), "-c".into(), format!("{prelude}{line}")],
        None => command.to_vec(),
    }
}

/// Exactly one of `command` and `shell`, not empty.
fn one_command(what: &str, command: &[String], shell: &Option<String>) -> Result<(), String> {
    match (command.is_empty(), shell) {
        (false, Some(_)) => Err(format!("{what}: give `command` or `shell`, not both")),
        (true, None) => Err(format!(
            "{what} has an empty command: give `command` or `shell`"
        )),
        (true, Some(s)) if s.trim().is_empty() => Err(format!("{what} has an empty shell line")),
        _ => Ok(()),
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileCopy {
    /// Relative to the scenario file.
    pub host: PathBuf,
    pub guest: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub name: String,
    /// TCP port in the guest, forwarded from 127.0.0.1 on the host.
    pub guest_port: u16,
    /// A line is sent every `interval_ms`: `<payload> <seq>`; the reply must
    /// start with `reply_prefix` followed by the same text.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_payload")]
    pub payload: String,
    #[serde(default)]
    pub reply_prefix: String,
    /// `echo`: the reply echoes the line. `counter`: every request is `send`
    /// and every reply holds the next integer (e.g. Redis `INCR`): the
    /// server's state must carry on with no lost or repeated increment.
    #[serde(default)]
    pub mode: ProbeMode,
    /// The request of `counter` mode, with the line ending the protocol wants.
    #[serde(default)]
    pub send: String,
    /// Requests sent once after connecting, one reply line each, ignored
    /// (e.g. memcached's `set` before its `incr`).
    #[serde(default)]
    pub setup: Vec<String>,
    /// `http`: the path every request gets.
    #[serde(default = "default_path")]
    pub path: String,
    /// `dns`: the name every query asks for (an A record).
    #[serde(default)]
    pub query: String,
    /// `http`: text the response body must contain. `dns`: an address the
    /// answer must hold. Empty: any 2xx response, any answer.
    #[serde(default)]
    pub expect: String,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    /// One TCP connection for the whole run; every reply echoes its line.
    #[default]
    Echo,
    /// One TCP connection; every reply is the server's next counter value.
    Counter,
    /// A new TCP connection per request (a listening socket must accept
    /// again after the upgrade).
    Connect,
    /// One UDP datagram per request, answered with `reply_prefix` + payload.
    Udp,
    /// One HTTP/1.1 keep-alive connection for the whole run: a `GET` of
    /// `path` every interval, each response checked.
    Http,
    /// A DNS query over UDP for `query` every interval, each answer checked.
    Dns,
    /// One MQTT connection to a broker for the whole run, subscribed to a
    /// topic it publishes to every interval: each message must come back.
    Mqtt,
}

impl ProbeMode {
    pub fn is_udp(self) -> bool {
        matches!(self, ProbeMode::Udp | ProbeMode::Dns)
    }

    /// It holds one connection for the whole run: the upgrade waits until
    /// the guest sees it established.
    pub fn holds_connection(self) -> bool {
        matches!(
            self,
            ProbeMode::Echo | ProbeMode::Counter | ProbeMode::Http | ProbeMode::Mqtt
        )
    }
}

fn default_interval() -> u64 {
    100
}
fn default_payload() -> String {
    "probe".into()
}
fn default_path() -> String {
    "/".into()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Upgrade {
    /// Kernels to upgrade to in turn; `from`/`to` name the scenario's kernels.
    pub chain: Vec<String>,
    /// Seconds between the probes being connected and `kupgrade go`.
    pub settle_secs: u64,
    /// `success`: the upgrade must happen. `refused`: `kupgrade go` must
    /// fail and leave the workloads running on the old kernel.
    pub expect: Expect,
    /// Text the refusal (`refused`) or the restore failure's reason
    /// (`restore-failed`) must contain.
    #[serde(deserialize_with = "one_or_many")]
    pub refusal_contains: Vec<String>,
    /// Extra arguments for `kupgrade go`.
    pub go_args: Vec<String>,
    /// Extra environment for `kupgrade go`, `KEY=VALUE` (e.g. a failpoint).
    pub go_env: Vec<String>,
    /// Extra parameters for the new kernel's command line (`kupgrade stage
    /// --append`), e.g. a failpoint of kupgrade-init.
    pub stage_append: String,
    /// QEMU `system_reset` once a serial line contains this text (e.g.
    /// `event=net-restored`, while kupgrade-init restores). The reset boots
    /// QEMU's `-kernel`, the first kernel, with its own command line.
    pub reset_on: String,
}

impl Default for Upgrade {
    fn default() -> Self {
        Upgrade {
            chain: vec!["to".into()],
            settle_secs: 2,
            expect: Expect::Success,
            refusal_contains: vec![],
            go_args: vec![],
            go_env: vec![],
            stage_append: String::new(),
            reset_on: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// The workloads are restored on the new kernel.
    Success,
    /// `kupgrade go` refuses and the workloads carry on on the old kernel.
    Refused,
    /// `kupgrade go --dry-run` does all but the reboot and resumes them.
    #[serde(rename = "dry-run")]
    DryRun,
    /// The kexec happens but the restore fails: the machine still boots
    /// and `kupgrade report` says why.
    #[serde(rename = "restore-failed")]
    RestoreFailed,
}

/// A check that must hold after the last upgrade; built-ins (kernel changed,
/// pids unchanged, probes clean) always run.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub name: String,
    /// A guest command that must exit 0.
    #[serde(default)]
    pub command: Vec<String>,
    /// The same, as a line for `/bin/sh -c` (pipes, `&&`, redirections).
    #[serde(default)]
    pub shell: Option<String>,
    /// Seconds to wait after the upgrade before running it.
    #[serde(default)]
    pub after_secs: u64,
    /// Run after the other checks, once the host's probes have stopped: for
    /// a check that ends a probed server (`systemctl restart`).
    #[serde(default)]
    pub after_probes: bool,
}

impl Check {
    pub fn argv(&self, prelude: &str) -> Vec<String> {
        guest_argv(&self.command, &self.shell, prelude)
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        let s = Scenario::parse(&text).map_err(|message| Error::Parse {
            path: path.into(),
            message,
        })?;
        s.validate().map_err(|message| Error::Invalid {
            path: path.into(),
            message,
        })?;
        Ok(s)
    }

    /// Its rows of the fault table: its `[[fault]]`s, then one for each
    /// `[[attempt]]`, judged by the attempt's own check.
    pub fn fault_rows(&self) -> Vec<Fault> {
        let attempts = self.attempts.iter().enumerate().map(|(i, a)| Fault {
            point: a.point.clone(),
            expected: a.expected.clone(),
            check: a.check_name(i),
        });
        self.faults.iter().cloned().chain(attempts).collect()
    }

    pub fn parse(text: &str) -> Result<Scenario, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn validate_fleet(&self, f: &Fleet) -> Result<(), String> {
        if self.guest.flavour != Flavour::Debian {
            return Err(
                "[fleet] needs guest.flavour = \"debian\" (its base has sshd and python3 for Ansible)"
                    .into(),
            );
        }
        if f.hosts.is_empty() {
            return Err("[fleet] has no [[fleet.host]]".into());
        }
        let mut names = std::collections::HashSet::new();
        for h in &f.hosts {
            let ok = !h.name.is_empty()
                && h.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !ok || !names.insert(&h.name) {
                return Err(format!(
                    "[[fleet.host]] name {:?}: give each host a name of letters, digits and -",
                    h.name
                ));
            }
        }
        if self.upgrade.expect != Expect::Success || !self.attempts.is_empty() {
            return Err(
                "a [fleet] scenario says what each host must come to in [[fleet.host]] expect; \
                 leave [upgrade] expect and [[attempt]] out"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(f) = &self.fleet {
            self.validate_fleet(f)?;
        }
        let mut names = std::collections::HashSet::new();
        for w in &self.workloads {
            if w.name.is_empty()
                || !w
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "workload name {:?}: use letters, digits, - and _",
                    w.name
                ));
            }
            if !names.insert(&w.name) {
                return Err(format!("two workloads are named {:?}", w.name));
            }
            if w.command.is_empty() {
                return Err(format!("workload {:?} has an empty command", w.name));
            }
            if w.pid_file.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(format!(
                    "workload {:?}: pid_file must be an absolute path",
                    w.name
                ));
            }
            if !w.runtime_paths.is_empty() && !w.declared {
                return Err(format!(
                    "workload {:?}: runtime_paths go into config.toml with declared = true",
                    w.name
                ));
            }
            if let Some(r) = &w.ready {
                let what = format!("workload {:?}: ready", w.name);
                if r.port.is_none() && r.file.is_none() && r.argv("").is_none() {
                    return Err(format!(
                        "{what} says nothing to wait for: give `port`, `file`, `command` or `shell`"
                    ));
                }
                if r.argv("").is_some() {
                    one_command(&what, &r.command, &r.shell)?;
                }
                if r.timeout_secs == 0 {
                    return Err(format!("{what}: timeout_secs must be above 0"));
                }
            }
        }
        if self.guest.flavour == Flavour::Appliance
            && self.guest.initramfs != Initramfs::InitramfsTools
        {
            return Err(format!(
                "[guest] initramfs = {:?} needs flavour = \"debian\": the appliance boots kupgrade's own initramfs",
                self.guest.initramfs.package()
            ));
        }
        for f in &self.faults {
            if !self.checks.iter().any(|c| c.name == f.check) {
                return Err(format!(
                    "fault {:?} names the check {:?}, which is not one of this scenario's [[check]]s",
                    f.point, f.check
                ));
            }
        }
        for (i, a) in self.attempts.iter().enumerate() {
            let what = format!("attempt {} ({:?})", i + 1, a.point);
            if let Some(c) = a
                .checks
                .iter()
                .find(|c| !self.checks.iter().any(|k| &k.name == *c))
            {
                return Err(format!(
                    "{what} names the check {c:?}, which is not one of this scenario's [[check]]s"
                ));
            }
            if a.checks.is_empty() {
                return Err(format!("{what} runs no check: name some in `checks`"));
            }
            if a.expect == AttemptExpect::Refused && a.refusal_contains.is_empty() {
                return Err(format!(
                    "{what}: expect = \"refused\" needs refusal_contains: say which refusal"
                ));
            }
            if let Some(bad) = a.go_env.iter().find(|e| !e.contains('=')) {
                return Err(format!("{what}: go_env entry {bad:?}: use KEY=VALUE"));
            }
        }
        for (i, st) in self.setup.iter().enumerate() {
            let what = if st.name.is_empty() {
                format!("setup step {}", i + 1)
            } else {
                format!("setup step {:?}", st.name)
            };
            one_command(&what, &st.command, &st.shell)?;
        }
        for c in &self.upgrade.chain {
            if c != "from" && c != "to" {
                return Err(format!("upgrade.chain entry {c:?}: use \"from\" or \"to\""));
            }
        }
        if let Some(bad) = self.upgrade.go_env.iter().find(|e| !e.contains('=')) {
            return Err(format!("upgrade.go_env entry {bad:?}: use KEY=VALUE"));
        }
        if self.upgrade.chain.is_empty() {
            return Err("upgrade.chain is empty: name at least one kernel (\"to\")".into());
        }
        if self.guest.memory_mib < 512 {
            return Err(format!(
                "guest.memory_mib = {}: the guest needs at least 512",
                self.guest.memory_mib
            ));
        }
        let top = STORE_ADDR_MIB + self.guest.store_mib + INITRD_ROOM_MIB;
        if self.guest.store_mib == 0 || top > self.guest.memory_mib {
            return Err(format!(
                "guest.store_mib = {} does not fit: the store sits at {} MiB, so guest.memory_mib must be at least {top}",
                self.guest.store_mib, STORE_ADDR_MIB
            ));
        }
        if top > low_ram_mib(self.guest.memory_mib) {
            return Err(format!(
                "guest.store_mib = {} does not fit below 4 GiB: with guest.memory_mib = {} QEMU maps {} MiB of RAM there, and the store (at {} MiB) and the initramfs need {top}",
                self.guest.store_mib,
                self.guest.memory_mib,
                low_ram_mib(self.guest.memory_mib),
                STORE_ADDR_MIB
            ));
        }
        for p in &self.probes {
            if p.mode == ProbeMode::Counter && p.send.is_empty() {
                return Err(format!(
                    "probe {:?}: mode = \"counter\" needs `send`, the request to repeat",
                    p.name
                ));
            }
            if p.mode == ProbeMode::Dns && p.query.is_empty() {
                return Err(format!(
                    "probe {:?}: mode = \"dns\" needs `query`, the name to ask for",
                    p.name
                ));
            }
            if p.mode == ProbeMode::Http
                && (!p.path.starts_with('/') || p.path.contains(char::is_whitespace))
            {
                return Err(format!(
                    "probe {:?}: path {:?} must start with / and hold no spaces",
                    p.name, p.path
                ));
            }
            if !p.expect.is_empty() && !matches!(p.mode, ProbeMode::Http | ProbeMode::Dns) {
                return Err(format!(
                    "probe {:?}: `expect` is for mode = \"http\" or \"dns\"; use reply_prefix",
                    p.name
                ));
            }
        }
        for c in &self.checks {
            one_command(&format!("check {:?}", c.name), &c.command, &c.shell)?;
        }
        if matches!(self.upgrade.expect, Expect::Refused | Expect::RestoreFailed)
            && self.upgrade.refusal_contains.is_empty()
        {
            return Err(
                "upgrade.expect = \"refused\" needs upgrade.refusal_contains: say which refusal"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "counter"
[[workload]]
name = "counter"
command = ["/bin/true"]
"#;

    #[test]
    fn minimal_scenario_gets_defaults() {
        let s = Scenario::parse(MINIMAL).unwrap();
        s.validate().unwrap();
        assert_eq!(s.kernels.from(), ("oldest", "6.1.0"));
        assert_eq!(s.guest.memory_mib, 1024);
        assert_eq!(s.upgrade.chain, vec!["to"]);
    }

    #[test]
    fn the_store_is_reserved_at_its_fixed_address_below_the_initramfs() {
        let mut s = Scenario::parse(MINIMAL).unwrap();
        assert_eq!(s.guest.memmap(), "memmap=256M!512M");
        // 512 MiB store + 128 MiB for the initramfs fill 1152 MiB exactly.
        s.guest.memory_mib = 1152;
        s.guest.store_mib = 512;
        s.validate().unwrap();
        s.guest.memory_mib = 1151;
        assert!(s.validate().unwrap_err().contains("at least 1152"));
    }

    /// A kernel of another series names it; the others keep the
    /// scenario's series, and a plain string still works.
    #[test]
    fn a_kernel_may_name_its_own_series() {
        let s = Scenario::parse(&format!(
            "{MINIMAL}\n[kernels]\nfrom = \"latest\"\nto = {{ series = \"6.12\", release = \"oldest\" }}\n"
        ))
        .unwrap();
        assert_eq!(s.kernels.from(), ("latest", "6.1.0"));
        assert_eq!(s.kernels.to(), ("oldest", "6.12"));
        let s = Scenario::parse(&format!(
            "{MINIMAL}\n[kernels]\nseries = \"6.12\"\nfrom = {{ series = \"6.1.0\" }}\nto = \"6.12.117+deb12-cloud-amd64\"\n"
        ))
        .unwrap();
        assert_eq!(s.kernels.from(), ("latest", "6.1.0"));
        assert_eq!(s.kernels.to(), ("6.12.117+deb12-cloud-amd64", "6.12"));
        let err = Scenario::parse(&format!(
            "{MINIMAL}\n[kernels]\nfrom = \"oldest\"\nto = {{ serie = \"6.12\" }}\n"
        ))
        .unwrap_err();
        assert!(err.contains("or a table { series = "), "{err}");
    }

    #[test]
    fn the_appliance_is_the_default_guest_and_debian_is_chosen_by_name() {
        assert_eq!(
            Scenario::parse(MINIMAL).unwrap().guest.flavour,
            Flavour::Appliance
        );
        let s = Scenario::parse(&format!("{MINIMAL}\n[guest]\nflavour = \"debian\"\n")).unwrap();
        assert_eq!(s.guest.flavour, Flavour::Debian);
        let err =
            Scenario::parse(&format!("{MINIMAL}\n[guest]\nflavour = \"fedora\"\n")).unwrap_err();
        assert!(err.contains("fedora"), "{err}");
    }

    #[test]
    fn the_debian_guest_takes_dracut_by_name_and_the_appliance_refuses_it() {
        let debian = format!("{MINIMAL}\n[guest]\nflavour = \"debian\"\n");
        let s = Scenario::parse(&debian).unwrap();
        assert_eq!(s.guest.initramfs, Initramfs::InitramfsTools);
        let s = Scenario::parse(&format!("{debian}initramfs = \"dracut\"\n")).unwrap();
        assert_eq!(s.guest.initramfs, Initramfs::Dracut);
        s.validate().unwrap();
        let err = Scenario::parse(&format!("{debian}initramfs = \"mkinitcpio\"\n")).unwrap_err();
        assert!(err.contains("mkinitcpio"), "{err}");
        let s = Scenario::parse(&format!("{MINIMAL}\n[guest]\ninitramfs = \"dracut\"\n")).unwrap();
        let err = s.validate().unwrap_err();
        assert!(err.contains("flavour = \"debian\""), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Scenario::parse(&format!("{MINIMAL}\n[guest]\nmemroy_mib = 5\n")).unwrap_err();
        assert!(err.contains("memroy_mib"), "{err}");
        let err = Scenario::parse("name = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn missing_name_is_refused() {
        assert!(Scenario::parse("[guest]\nmemory_mib = 1024\n")
            .unwrap_err()
            .contains("name"));
    }

    #[test]
    fn invalid_values_are_explained() {
        let mut s = Scenario::parse(MINIMAL).unwrap();
        s.guest.store_mib = 900;
        assert!(s.validate().unwrap_err().contains("store_mib"));
        // Room in all, but not below 4 GiB, where QEMU maps 3 GiB of a 6 GiB guest.
        s.guest.memory_mib = 6144;
        s.guest.store_mib = 2560;
        assert!(s.validate().unwrap_err().contains("below 4 GiB"));
        s.guest.store_mib = 2304;
        s.validate().unwrap();
        let mut s = Scenario::parse(MINIMAL).unwrap();
        s.upgrade.chain = vec!["sideways".into()];
        assert!(s.validate().unwrap_err().contains("sideways"));
        let mut s = Scenario::parse(MINIMAL).unwrap();
        s.workloads.push(s.workloads[0].clone());
        assert!(s.validate().unwrap_err().contains("two workloads"));
        let mut s = Scenario::parse(MINIMAL).unwrap();
        s.upgrade.expect = Expect::Refused;
        assert!(s.validate().unwrap_err().contains("refusal_contains"));
        let mut s = Scenario::parse(MINIMAL).unwrap();
        s.workloads[0].pid_file = Some("run/x.pid".into());
        assert!(s.validate().unwrap_err().contains("pid_file"));
        let mut s = Scenario::parse(MINIMAL).unwrap();
        s.workloads[0].runtime_paths = vec!["/run/x".into()];
        assert!(s.validate().unwrap_err().contains("declared = true"));
    }

    #[test]
    fn setup_steps_readiness_and_shell_checks_parse() {
        let s = Scenario::parse(
            r#"
name = "web"
[[setup]]
name = "a user"
shell = "adduser -S www-data"
[[setup]]
command = ["mkdir", "-p", "/var/www"]
[[workload]]
name = "nginx"
command = ["/usr/sbin/nginx"]
ready = { port = 80, file = "/run/nginx.pid", shell = "wget -q -O- http://127.0.0.1/", timeout_secs = 30 }
[[probe]]
name = "keep-alive"
guest_port = 80
mode = "http"
path = "/index.html"
expect = "hello"
[[probe]]
name = "dns"
guest_port = 53
mode = "dns"
query = "kupgrade.test"
expect = "10.0.2.99"
[[check]]
name = "a pipe"
shell = "ps | grep -q nginx"
"#,
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(
            s.setup[0].argv(""),
            ["/bin/sh", "-c", "adduser -S www-data"]
        );
        assert_eq!(s.setup[1].argv(""), ["mkdir", "-p", "/var/www"]);
        let r = s.workloads[0].ready.as_ref().unwrap();
        assert_eq!(r.port, Some(80));
        assert_eq!(r.file.as_deref(), Some(Path::new("/run/nginx.pid")));
        assert_eq!(r.timeout_secs, 30);
        assert_eq!(r.argv("").unwrap()[..2], ["/bin/sh", "-c"]);
        assert_eq!(
            s.checks[0].argv(""),
            ["/bin/sh", "-c", "ps | grep -q nginx"]
        );
        assert_eq!(
            s.checks[0].argv("f() { :; }\n")[2],
            "f() { :; }\nps | grep -q nginx"
        );
        assert_eq!(s.probes[0].mode, ProbeMode::Http);
        assert!(s.probes[0].mode.holds_connection() && !s.probes[0].mode.is_udp());
        assert!(s.probes[1].mode.is_udp() && !s.probes[1].mode.holds_connection());
        // Defaults: a probe's path, a gate's timeout.
        let s = Scenario::parse(&format!(
            "{MINIMAL}ready = {{ port = 1 }}\n[[probe]]\nname = \"h\"\nguest_port = 1\nmode = \"http\"\n"
        ))
        .unwrap();
        assert_eq!(s.probes[0].path, "/");
        assert_eq!(s.workloads[0].ready.as_ref().unwrap().timeout_secs, 60);
        assert_eq!(s.workloads[0].ready.as_ref().unwrap().argv(""), None);
    }

    #[test]
    fn commands_steps_and_probes_that_cannot_run_are_explained() {
        let bad = |extra: &str| {
            let s = Scenario::parse(&format!("{MINIMAL}{extra}")).unwrap();
            s.validate().unwrap_err()
        };
        let e = bad("[[check]]\nname = \"c\"\ncommand = [\"true\"]\nshell = \"true\"\n");
        assert!(e.contains("not both"), "{e}");
        let e = bad("[[check]]\nname = \"c\"\n");
        assert!(e.contains("check \"c\" has an empty command"), "{e}");
        let e = bad("[[setup]]\nshell = \" \"\n");
        assert!(e.contains("setup step 1"), "{e}");
        let e = bad("ready = { timeout_secs = 5 }\n");
        assert!(e.contains("nothing to wait for"), "{e}");
        let e = bad("[[probe]]\nname = \"d\"\nguest_port = 53\nmode = \"dns\"\n");
        assert!(e.contains("needs `query`"), "{e}");
        let e = bad("[[probe]]\nname = \"e\"\nguest_port = 7\nexpect = \"x\"\n");
        assert!(e.contains("`expect` is for"), "{e}");
        let e = bad("[[probe]]\nname = \"h\"\nguest_port = 80\nmode = \"http\"\npath = \"x\"\n");
        assert!(e.contains("must start with /"), "{e}");
    }

    #[test]
    fn the_readme_example_is_a_valid_scenario() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
                .unwrap();
        let section = &readme[readme.find("## Trying your own workloads").unwrap()..];
        let block = section.split("```toml\n").nth(1).unwrap();
        let example = &block[..block.find("```").unwrap()];
        let s = Scenario::parse(example).unwrap_or_else(|e| panic!("{e}\n{example}"));
        s.validate().unwrap();
        assert_eq!(s.probes[0].mode, ProbeMode::Http);
        assert!(s.setup[0].argv("")[2].contains("sites-enabled"));
    }

    #[test]
    fn a_fault_must_be_judged_by_one_of_the_scenarios_checks() {
        let text = |check: &str| {
            format!(
                "name = \"f\"\n[[check]]\nname = \"resumed\"\nshell = \"true\"\n\
                 [[fault]]\npoint = \"dump hangs\"\nexpected = \"resumed\"\ncheck = \"{check}\"\n"
            )
        };
        Scenario::parse(&text("resumed"))
            .unwrap()
            .validate()
            .unwrap();
        let e = Scenario::parse(&text("resume"))
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.contains("\"resume\"") && e.contains("[[check]]"), "{e}");
    }

    const ATTEMPTS: &str = r#"
name = "f"
[[check]]
name = "resumed"
shell = "true"
[[fault]]
point = "kexec refused"
expected = "resumed"
check = "resumed"
[[attempt]]
point = "error after the freeze"
expected = "refused, resumed"
go_env = ["KUPGRADE_FAILPOINT=error-after-freeze"]
expect = "refused"
refusal_contains = "every workload was resumed"
checks = ["resumed"]
[[attempt]]
point = "SIGKILL after the dump"
expected = "resume gives them back"
go_env = ["KUPGRADE_FAILPOINT=kill-after-checkpoint"]
expect = "killed"
close_stdout = true
checks = ["resumed"]
"#;

    #[test]
    fn attempts_parse_and_each_is_a_row_judged_by_its_own_check() {
        let s = Scenario::parse(ATTEMPTS).unwrap();
        s.validate().unwrap();
        assert_eq!(s.attempts.len(), 2);
        assert_eq!(s.attempts[0].expect, AttemptExpect::Refused);
        assert!(!s.attempts[0].close_stdout);
        assert_eq!(
            s.attempts[0].refusal_contains,
            ["every workload was resumed"]
        );
        assert_eq!(
            (s.attempts[1].expect, s.attempts[1].close_stdout),
            (AttemptExpect::Killed, true)
        );
        let rows = s.fault_rows();
        let checks: Vec<&str> = rows.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(
            checks,
            [
                "resumed",
                "attempt 1: error after the freeze",
                "attempt 2: SIGKILL after the dump"
            ]
        );
        assert_eq!(rows[2].expected, "resume gives them back");
    }

    #[test]
    fn an_attempt_that_cannot_be_judged_is_explained() {
        let bad = |from: &str, to: &str| {
            let s = Scenario::parse(&ATTEMPTS.replacen(from, to, 1)).unwrap();
            s.validate().unwrap_err()
        };
        let e = bad("checks = [\"resumed\"]", "checks = [\"resume\"]");
        assert!(e.contains("attempt 1") && e.contains("\"resume\""), "{e}");
        let e = bad("checks = [\"resumed\"]", "checks = []");
        assert!(e.contains("runs no check"), "{e}");
        let e = bad("refusal_contains = \"every workload was resumed\"", "");
        assert!(e.contains("needs refusal_contains"), "{e}");
        let e = bad("[\"KUPGRADE_FAILPOINT=kill-after-checkpoint\"]", "[\"x\"]");
        assert!(e.contains("attempt 2") && e.contains("KEY=VALUE"), "{e}");
        let e = Scenario::parse(&ATTEMPTS.replace("expect = \"killed\"", "expect = \"ok\""))
            .unwrap_err();
        assert!(e.contains("ok"), "{e}");
    }

    /// A fleet runs on Debian guests (what Ansible needs is in their base), names
    /// each host once, and says per host what the roll must leave.
    #[test]
    fn a_fleet_needs_debian_guests_ansible_can_reach_and_named_hosts() {
        const FLEET: &str = "name = \"f\"\n[guest]\nflavour = \"debian\"\n\
            [fleet]\n[[fleet.host]]\nname = \"a\"\nexpect = \"upgraded\"\n\
            [[fleet.host]]\nname = \"b\"\nexpect = \"untouched\"\n";
        let s = Scenario::parse(FLEET).unwrap();
        s.validate().unwrap();
        let f = s.fleet.unwrap();
        assert_eq!(f.hosts[1].expect, HostExpect::Untouched);
        assert_eq!(f.playbook_secs, default_playbook_secs());
        let bad = |from: &str, to: &str| {
            Scenario::parse(&FLEET.replacen(from, to, 1))
                .and_then(|s| s.validate())
                .unwrap_err()
        };
        assert!(bad("flavour = \"debian\"", "").contains("debian"));
        assert!(bad("name = \"b\"", "name = \"a\"").contains("each host"));
        assert!(
            bad("[fleet]\n", "[upgrade]\nexpect = \"refused\"\n[fleet]\n")
                .contains("[[fleet.host]] expect")
        );
        assert!(bad("\"untouched\"", "\"gone\"").contains("gone"));
    }

    #[test]
    fn shipped_scenarios_parse_and_validate() {
        // The suite's scenarios and the benchmarks, which CI does not run.
        for (dir, at_least) in [("scenarios", 2), ("benchmarks", 1)] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            let mut n = 0;
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "toml") {
                    Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                    n += 1;
                }
            }
            assert!(n >= at_least, "{}: found {n} scenarios", dir.display());
        }
    }
}
