//! What the host tells the guest (a [`Plan`], on a small second disk) and what
//! the guest tells the host (one `kupgrade-vm:` line per fact, on the serial
//! console).

use serde::{Deserialize, Serialize};

use crate::scenario::{Check, Expect, Workload};

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
    pub workloads: Vec<Workload>,
    /// Guest ports the host probes connect to; the upgrade waits for them.
    pub probe_ports: Vec<u16>,
    /// Releases to upgrade to, in turn.
    pub chain: Vec<String>,
    pub settle_secs: u64,
    pub expect: Expect,
    pub go_args: Vec<String>,
    pub go_env: Vec<String>,
    /// Processes started on the first boot that kupgrade does not preserve.
    pub background: Vec<Vec<String>>,
    pub checks: Vec<Check>,
    /// How long the checks wait for restored workloads to show they run.
    pub alive_secs: u64,
}

/// Progress, kept on the guest's disk: how many upgrades are done.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub upgrades_done: usize,
    /// pid of each workload when launched: name -> pid
    pub pids: Vec<(String, i32)>,
}

/// One line from the guest: a verb and `key=value` words; the value of the
/// last key may hold spaces (`detail=...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub verb: String,
    pub fields: Vec<(String, String)>,
}

impl Line {
    pub fn new(verb: &str) -> Self {
        Line {
            verb: verb.to_string(),
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

    /// `kupgrade-vm: check name=x ok=true detail=free text`
    pub fn render(&self) -> String {
        let mut s = format!("{PREFIX} {}", self.verb);
        for (k, v) in &self.fields {
            let v = if k == "detail" {
                v.replace('\n', " | ")
            } else {
                v.replace(char::is_whitespace, "_")
            };
            s.push_str(&format!(" {k}={v}"));
        }
        s
    }

    pub fn parse(text: &str) -> Option<Line> {
        let rest = &text[text.find(PREFIX)? + PREFIX.len()..];
        let rest = rest.trim();
        let (verb, mut rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut line = Line::new(verb);
        while !rest.is_empty() {
            let (word, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let (k, v) = word.split_once('=')?;
            if k == "detail" {
                line.fields
                    .push((k.into(), format!("{v} {tail}").trim().to_string()));
                break;
            }
            line.fields.push((k.into(), v.into()));
            rest = tail.trim_start();
        }
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_detail_keeps_spaces() {
        let l = Line::new("check")
            .with("name", "pid of x")
            .with("ok", true)
            .with("detail", "seq 0..9 ok\nnext");
        let text = l.render();
        assert_eq!(
            text,
            "kupgrade-vm: check name=pid_of_x ok=true detail=seq 0..9 ok | next"
        );
        let back = Line::parse(&format!("[  3.2] {text}\r")).unwrap();
        assert_eq!(back.verb, "check");
        assert_eq!(back.get("ok"), Some("true"));
        assert_eq!(back.get("detail"), Some("seq 0..9 ok | next"));
        assert_eq!(
            Line::parse("kupgrade-vm: ready").unwrap(),
            Line::new("ready")
        );
        assert!(Line::parse("nothing").is_none());
    }
}
