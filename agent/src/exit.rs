//! kupgrade's exit codes: one table, which the commands return from and
//! the man page and `docs/cli.md` print. A code keeps its meaning; new ones
//! get new numbers.

use std::process::ExitCode;

use crate::preflight::{Finding, Kind, Level};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok,
    Failed,
    Usage,
    NotReady,
    Refused,
    Aborted,
    ResumeNeeded,
    RestoreFailed,
}

impl Exit {
    pub const ALL: [Exit; 8] = [
        Exit::Ok,
        Exit::Failed,
        Exit::Usage,
        Exit::NotReady,
        Exit::Refused,
        Exit::Aborted,
        Exit::ResumeNeeded,
        Exit::RestoreFailed,
    ];

    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::NotReady => 3,
            Exit::Refused => 4,
            Exit::Aborted => 5,
            Exit::ResumeNeeded => 6,
            Exit::RestoreFailed => 7,
        }
    }

    /// What it means, for the man page.
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Ok => "Done: the command did what it was asked (`check`: ready to upgrade; `go --dry-run`: measured, every workload resumed; `report`: the last upgrade restored every workload, or none is recorded).",
            Exit::Failed => "The command could not do what it was asked, for the reason it printed (a kernel that does not validate, a store that cannot be opened, a configuration that does not parse, ...). Nothing was frozen.",
            Exit::Usage => "The command line is wrong: an unknown command or option, a missing argument.",
            Exit::NotReady => "`check`: a finding would stop an upgrade (each is printed with its fix; with `--json` they are the findings of level `fail`).",
            Exit::Refused => "`go`: refused before anything was frozen, with the findings that stopped it. Nothing changed.",
            Exit::Aborted => "`go`: gave up after the freeze and before the kexec (a step failed, or a signal came); every workload was resumed on this kernel and nothing was lost.",
            Exit::ResumeNeeded => "`go` or `resume` could not resume every workload, or `check` or `go` found what a `go` that was killed left behind: workloads may still be frozen or locked. Run `kupgrade resume`.",
            Exit::RestoreFailed => "`report`: the last upgrade's restore failed; the reason and CRIU's log are in the report.",
        }
    }

    /// `check`'s exit for its findings.
    pub fn for_check(failures: &[&Finding]) -> Exit {
        if failures.is_empty() {
            Exit::Ok
        } else if failures.iter().any(|f| f.kind == Kind::Leftovers) {
            Exit::ResumeNeeded
        } else {
            Exit::NotReady
        }
    }

    /// `go`'s exit when the preflight refused it.
    pub fn for_refusal(failures: &[Finding]) -> Exit {
        let leftovers = failures
            .iter()
            .any(|f| f.level == Level::Fail && f.kind == Kind::Leftovers);
        if leftovers {
            Exit::ResumeNeeded
        } else {
            Exit::Refused
        }
    }

    /// The table, as Markdown rows (`| code | meaning |`).
    pub fn markdown_table() -> String {
        let mut out = String::from("| code | meaning |\n| --- | --- |\n");
        for e in Exit::ALL {
            out.push_str(&format!("| {} | {} |\n", e.code(), e.meaning()));
        }
        out
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_in_order_and_usage_is_clap_s() {
        let codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes, (0..Exit::ALL.len() as u8).collect::<Vec<_>>());
        // clap exits with 2 on a bad command line, before kupgrade runs.
        let e = clap::Command::new("x")
            .try_get_matches_from(["x", "--nope"])
            .unwrap_err();
        assert_eq!(e.exit_code(), i32::from(Exit::Usage.code()));
    }

    #[test]
    fn leftovers_mean_resume_needed_other_failures_not_ready_or_refused() {
        let fail = |kind| Finding {
            level: Level::Fail,
            kind,
            workload: None,
            what: "what".into(),
            fix: Some("fix".into()),
        };
        let (store, left) = (fail(Kind::Store), fail(Kind::Leftovers));
        assert_eq!(Exit::for_check(&[]), Exit::Ok);
        assert_eq!(Exit::for_check(&[&store]), Exit::NotReady);
        assert_eq!(Exit::for_check(&[&store, &left]), Exit::ResumeNeeded);
        assert_eq!(
            Exit::for_refusal(std::slice::from_ref(&store)),
            Exit::Refused
        );
        assert_eq!(Exit::for_refusal(&[store, left]), Exit::ResumeNeeded);
    }
}
