//! What the host tells the guest (a [`Plan`], on a small second disk) and what
//! the guest tells the host (one `kupgrade-vm:` line per fact, on the serial
//! console).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::scenario::{Attempt, Check, Expect, Setup, Workload};

/// Prefix of every line the guest runner prints for the host.
pub const PREFIX: &str = "kupgrade-vm:";
/// Section of the plan disk's image holding the plan as JSON.
pub const PLAN_SECTION: &str = "plan";
/// Section holding the scenario's files, as a tree rooted at `/`.
pub const FILES_SECTION: &str = "files";
/// Where the guest keeps its progress across kexecs.
pub const STATE_FILE: &str = "/var/lib/kupgrade-vm/state.json";
/// Where the guest runner finds the plan disk.
pub const PLAN_DEVICE: &str = "/dev/vdb";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    pub scenario: String,
    /// Run on the first boot before the background and the workloads.
    #[serde(default)]
    pub setup: Vec<Setup>,
    pub workloads: Vec<Workload>,
    /// Guest ports the host probes connect to; the upgrade waits for them.
    pub probe_ports: Vec<u16>,
    /// Releases to upgrade to, in turn.
    pub chain: Vec<String>,
    pub settle_secs: u64,
    pub expect: Expect,
    pub go_args: Vec<String>,
    pub go_env: Vec<String>,
    /// `kupgrade stage --append` this.
    #[serde(default)]
    pub stage_append: String,
    /// Processes started on the first boot that kupgrade does not preserve.
    pub background: Vec<Vec<String>>,
    pub checks: Vec<Check>,
    /// Failing `kupgrade go` runs on the first boot, after staging.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// How long the checks wait for restored workloads to show they run.
    pub alive_secs: u64,
    /// Only kexec through the chain, bare (no workloads, no `kupgrade go`),
    /// for the host to time the floor of the blackout.
    #[serde(default)]
    pub bare_kexec: bool,
    /// The host upgrades this guest from outside (a fleet's Ansible over
    /// ssh): the guest starts its workloads, then waits for
    /// [`FLEET_DONE`] on whichever kernel it is by then, and checks.
    #[serde(default)]
    pub external_upgrade: bool,
    /// The guest's name in a fleet, `$KUPGRADE_VM_HOST` in its shell steps.
    #[serde(default)]
    pub host: String,
}

/// A guest upgraded from outside writes this once its workloads run and
/// its probes are connected (again on each later boot, when it reported).
pub const FLEET_READY: &str = "/run/kupgrade-vm/ready";
/// The host writes this (over ssh) when the roll has ended: the guest runs
/// its checks. On tmpfs: a boot before the end does not see it.
pub const FLEET_DONE: &str = "/run/kupgrade-vm/fleet-done";
/// The environment variable naming the guest in its shell steps.
pub const HOST_VAR: &str = "KUPGRADE_VM_HOST";

/// Progress, kept on the guest's disk: how many upgrades are done.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub upgrades_done: usize,
    /// pid of each workload when launched: name -> pid
    pub pids: Vec<(String, i32)>,
}

macro_rules! verbs {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// What a guest line tells the host.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Verb { $($(#[$doc])* $variant,)* }

        impl Verb {
            /// Every verb.
            pub const ALL: &'static [Verb] = &[$(Verb::$variant,)*];

            pub fn name(self) -> &'static str {
                match self { $(Verb::$variant => $name,)* }
            }
        }

        impl FromStr for Verb {
            type Err = UnknownVerb;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s { $($name => Ok(Verb::$variant),)* _ => Err(UnknownVerb(s.to_string())) }
            }
        }
    };
}

verbs! {
    /// The worker runs on a kernel: `n` upgrades done, `kernel` its release.
    Boot => "boot",
    /// A workload was started: `name`, `pid`.
    Workload => "workload",
    /// The workloads run: the host starts its probes.
    Ready => "ready",
    /// `kupgrade go` is about to run: `n`, `target` release.
    Go => "go",
    /// `kupgrade go` came back, so no kexec happened: `ok`, `detail` its output.
    GoReturned => "go-returned",
    /// What `kupgrade report` says of the upgrade just done: `outcome`, `detail`.
    Report => "report",
    /// A workload found running after the last upgrade: `name`, `pid` now.
    WorkloadAfter => "workload-after",
    /// One of the scenario's checks ran: `name`, `ok`, `detail`.
    Check => "check",
    /// Every check ran: the host stops its probes.
    ChecksDone => "checks-done",
    /// The worker is at its end; the guest powers off.
    Done => "done",
    /// Free text for the progress display: `detail`.
    Info => "info",
    /// The worker failed and stops: `detail`.
    Error => "error",
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown guest verb {0:?}")]
pub struct UnknownVerb(pub String);

/// One line from the guest: a verb and `key=value` words; the value of the
/// last key may hold spaces (`detail=...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub verb: Verb,
    pub fields: Vec<(String, String)>,
}

impl Line {
    pub fn new(verb: Verb) -> Self {
        Line {
            verb,
            fields: vec![],
        }
    }

    pub fn with(mut self, k: &str, v: impl ToString) -> Self {
        self.fields.push((k.to_string(), v.to_string()));
        self
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    /// `kupgrade-vm: check name="two words" ok=true detail=free text`: a
    /// value with spaces, quotes or backslashes is quoted (`\"`, `\\`,
    /// `\n` inside), so that it parses back as it was.
    pub fn render(&self) -> String {
        let mut s = format!("{PREFIX} {}", self.verb);
        for (k, v) in &self.fields {
            let v = if k == "detail" {
                v.replace('\n', " | ")
            } else {
                quote(v)
            };
            s.push_str(&format!(" {k}={v}"));
        }
        s
    }

    /// Finds a guest line anywhere in `text`; `None` for other text and for
    /// a verb this harness does not know.
    pub fn parse(text: &str) -> Option<Line> {
        let rest = &text[text.find(PREFIX)? + PREFIX.len()..];
        let rest = rest.trim();
        let (verb, mut rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut line = Line::new(verb.parse().ok()?);
        while !rest.is_empty() {
            let (k, after) = rest.split_once('=')?;
            if k.contains(' ') {
                return None;
            }
            if k == "detail" {
                line.fields.push((k.into(), after.trim().to_string()));
                break;
            }
            let (v, tail) = if after.starts_with('"') {
                unquote(after)?
            } else {
                let (v, tail) = after.split_once(' ').unwrap_or((after, ""));
                (v.to_string(), tail)
            };
            line.fields.push((k.into(), v));
            rest = tail.trim_start();
        }
        Some(line)
    }
}

/// A value as one word: as it is when it is one, else quoted.
fn quote(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\') {
        return v.to_string();
    }
    let mut out = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The quoted value at the start of `s` and the text after it.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
    None
}

/// The kernel's TCP states, as `/proc/net/tcp` shows them.
pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0a;

/// True when a TCP socket on local port `port` is in `state`, IPv4 or IPv6
/// (a server listening on `::` takes IPv4 peers as mapped addresses: they
/// show in `tcp6` only). `proc_net` is `/proc/net` in the guest.
pub fn tcp_port_in_state(proc_net: &Path, port: u16, state: u8) -> bool {
    ["tcp", "tcp6"].iter().any(|table| {
        let text = std::fs::read_to_string(proc_net.join(table)).unwrap_or_default();
        text.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port_of = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            f.len() > 3 && u8::from_str_radix(f[3], 16) == Ok(state) && port_of(f[1]) == Some(port)
        })
    })
}

/// Names that every shell runs as its own builtin, whatever PATH holds.
const SHELL_BUILTINS: &[&str] = &[
    "[", "[[", "echo", "false", "kill", "printf", "pwd", "test", "true",
];

/// Busybox's shell, built "standalone" (busybox-static), runs its own
/// applet for a command name even when PATH finds another program first: in
/// a scenario's `shell` line, `ps` would be busybox's after procps was
/// installed. For each applet name whose first PATH match is not busybox,
/// this gives a shell function running that program instead, as dash or
/// bash would. `applets`: busybox's applet names; `path`: the PATH
/// directories in order; `busybox`: the busybox binary.
pub fn path_programs_prelude(applets: &[&str], path: &[&Path], busybox: &Path) -> String {
    let busybox = std::fs::canonicalize(busybox).unwrap_or_else(|_| busybox.to_path_buf());
    let mut out = String::new();
    for name in applets {
        // Only names a shell function can have.
        if SHELL_BUILTINS.contains(name)
            || name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let Some(found) = path.iter().map(|d| d.join(name)).find(|p| p.is_file()) else {
            continue;
        };
        if std::fs::canonicalize(&found).is_ok_and(|real| real != busybox) {
            out.push_str(&format!("{name}() {{ '{}' \"$@\"; }}\n", found.display()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_detail_keeps_spaces() {
        let l = Line::new(Verb::Check)
            .with("name", "pid of x")
            .with("ok", true)
            .with("detail", "seq 0..9 ok\nnext");
        let text = l.render();
        assert_eq!(
            text,
            "kupgrade-vm: check name=\"pid of x\" ok=true detail=seq 0..9 ok | next"
        );
        let back = Line::parse(&format!("[  3.2] {text}\r")).unwrap();
        assert_eq!(back.verb, Verb::Check);
        assert_eq!(back.get("name"), Some("pid of x"));
        assert_eq!(back.get("ok"), Some("true"));
        assert_eq!(back.get("detail"), Some("seq 0..9 ok | next"));
        assert_eq!(
            Line::parse("kupgrade-vm: ready").unwrap(),
            Line::new(Verb::Ready)
        );
        assert!(Line::parse("nothing").is_none());
    }

    #[test]
    fn names_come_back_as_they_were_written() {
        for name in [
            "redis answers a new client",
            "say \"hi\" = twice",
            "back\\slash\tand tab",
            "two\nlines",
            "",
            "\"",
            "plain",
            "a=b",
        ] {
            let l = Line::new(Verb::Check)
                .with("name", name)
                .with("ok", false)
                .with("detail", "why");
            let back = Line::parse(&l.render()).unwrap_or_else(|| panic!("{}", l.render()));
            assert_eq!(back, l, "{}", l.render());
        }
        // Lines of an older guest: words without quotes.
        let old = Line::parse("kupgrade-vm: workload name=echo pid=10042").unwrap();
        assert_eq!(old.get("name"), Some("echo"));
        assert_eq!(old.get("pid"), Some("10042"));
    }

    #[test]
    fn every_verb_prints_and_parses_back() {
        for v in Verb::ALL {
            assert_eq!(v.to_string(), v.name());
            assert_eq!(v.name().parse::<Verb>(), Ok(*v));
            let line = Line::new(*v).with("n", 1).with("detail", "two words");
            assert_eq!(Line::parse(&line.render()), Some(line));
        }
        let names: std::collections::HashSet<_> = Verb::ALL.iter().map(|v| v.name()).collect();
        assert_eq!(names.len(), Verb::ALL.len(), "two verbs share a name");
    }

    const TCP_HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    #[test]
    fn connections_and_listeners_are_found_in_tcp_and_tcp6() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path();
        // An IPv4 listener on 7000 with one connection from the host.
        std::fs::write(
            net.join("tcp"),
            format!(
                "{TCP_HEADER}   0: 00000000:1B58 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1\n   1: 0F02000A:1B58 0202000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 102 1\n"
            ),
        )
        .unwrap();
        // A server on `::`, port 80, with an IPv4 peer (a mapped address).
        std::fs::write(
            net.join("tcp6"),
            format!(
                "{TCP_HEADER}   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 201 1\n   1: 0000000000000000FFFF00000F02000A:0050 0000000000000000FFFF00000202000A:D432 01 00000000:00000000 00:00000000 00000000     0        0 202 1\n"
            ),
        )
        .unwrap();
        for port in [7000, 80] {
            assert!(tcp_port_in_state(net, port, TCP_ESTABLISHED), "{port}");
            assert!(tcp_port_in_state(net, port, TCP_LISTEN), "{port}");
        }
        assert!(!tcp_port_in_state(net, 8080, TCP_LISTEN));
        // The peer's port is not a local port.
        assert!(!tcp_port_in_state(net, 0xd432, TCP_ESTABLISHED));
    }

    #[test]
    fn shell_lines_run_the_programs_path_finds_before_busybox_applets() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let (sbin, bin) = (dir.path().join("usr/sbin"), dir.path().join("usr/bin"));
        std::fs::create_dir_all(&sbin).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let busybox = bin.join("busybox");
        std::fs::write(&busybox, "").unwrap();
        for applet in ["sh", "ls", "kill", "run-parts", "ps"] {
            symlink("busybox", bin.join(applet)).unwrap();
        }
        // procps replaced two links; the appliance's ip comes first in PATH.
        for (d, prog) in [(&bin, "ps"), (&bin, "kill"), (&sbin, "ip")] {
            let _ = std::fs::remove_file(d.join(prog));
            std::fs::write(d.join(prog), "").unwrap();
        }
        symlink("busybox", bin.join("ip")).unwrap();
        let applets = ["sh", "ls", "kill", "run-parts", "ps", "ip", "nc"];
        let prelude = path_programs_prelude(&applets, &[&sbin, &bin], &busybox);
        assert_eq!(
            prelude,
            format!(
                "ps() {{ '{}' \"$@\"; }}\nip() {{ '{}' \"$@\"; }}\n",
                bin.join("ps").display(),
                sbin.join("ip").display()
            )
        );
        // The shell runs the prelude: ps is the file's, ls stays busybox's.
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("{prelude}type ps; type ls"))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.contains("ps is a function") || out.contains("ps is a shell function"),
            "{out}"
        );
    }

    #[test]
    fn an_unknown_verb_is_refused() {
        assert_eq!(
            "go-retruned".parse::<Verb>(),
            Err(UnknownVerb("go-retruned".into()))
        );
        assert!(Line::parse("kupgrade-vm: go-retruned ok=true").is_none());
    }
}
