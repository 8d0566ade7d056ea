//! CRIU's command line for one workload, both sides of the kexec: the agent
//! dumps with [`Checkpoint::dump_args`], `kupgrade-init` restores with
//! [`Checkpoint::restore_args`]. Both derive from the same
//! [`WorkloadEntry`], so an option that records state at dump time and must
//! be given again to put it back cannot be given on one side only.

use std::path::Path;

use crate::WorkloadEntry;

/// Options that must be given to both the dump and the restore of a
/// workload, and when: the dump records state under them that only a restore
/// with the same option puts back.
fn paired(w: &WorkloadEntry) -> Vec<&'static str> {
    let mut a = vec![
        // The tasks' cgroups (the workload's own, and the freezer CRIU used).
        "--manage-cgroups",
        // flock/POSIX locks on the files they hold.
        "--file-locks",
    ];
    if w.tcp_established {
        // Connected sockets, frozen in TCP repair mode.
        a.push("--tcp-established");
    }
    if w.shell_job {
        // A root outside its own session: the dump takes it, and the
        // restore puts the tree in CRIU's session and process group (the
        // session's leader is gone, and CRIU cannot make a helper above
        // the root).
        a.push("--shell-job");
    }
    a
}

/// One workload's checkpoint as CRIU sees it: whose it is, where its image
/// files are, where CRIU logs.
#[derive(Clone, Copy, Debug)]
pub struct Checkpoint<'a> {
    pub workload: &'a WorkloadEntry,
    pub images_dir: &'a Path,
    pub log: &'a Path,
}

impl Checkpoint<'_> {
    /// Options both commands take the same way.
    fn common(&self, command: &str) -> Vec<String> {
        vec![
            command.into(),
            "--images-dir".into(),
            self.images_dir.display().to_string(),
            "--log-file".into(),
            self.log.display().to_string(),
            "-v4".into(),
        ]
    }

    /// `criu dump`, on the old kernel.
    pub fn dump_args(&self) -> Vec<String> {
        let w = self.workload;
        let mut a = self.common("dump");
        a.extend([
            "--tree".into(),
            w.root_pid.to_string(),
            // Never killed: until the reboot, every failure must be able to
            // resume them untouched.
            "--leave-stopped".into(),
            // CRIU seizes the tasks of the (already frozen) cgroup as a whole.
            "--freeze-cgroup".into(),
            w.cgroup.clone(),
        ]);
        a.extend(paired(w).into_iter().map(String::from));
        if w.tcp_established {
            // Dump side only: the lock table is saved into the image and
            // kupgrade-init installs and removes it around the restore.
            a.extend(["--network-lock".into(), "nftables".into()]);
        }
        for s in &w.journal_streams {
            // Its end only: the restore gets a new socket for it.
            a.push(format!("--ext-unix-sk={}", s.inode));
        }
        a
    }

    /// `criu dump` that writes only the pages dirtied since the pre-dump
    /// in `parent` (relative to the images directory): CRIU links it as
    /// `parent`, and the restore follows that link for the other pages.
    pub fn incremental_dump_args(&self, parent: &Path) -> Vec<String> {
        let mut a = self.dump_args();
        a.extend(Self::tracking(Some(parent)));
        a
    }

    /// `criu pre-dump`, while the tree runs: its memory only, from here on
    /// tracked by the kernel's soft-dirty bits; with `parent` (relative to
    /// the images directory), only the pages dirtied since that pre-dump.
    /// The tasks are seized by CRIU for a moment, not frozen by a cgroup.
    pub fn predump_args(&self, parent: Option<&Path>) -> Vec<String> {
        let w = self.workload;
        let mut a = self.common("pre-dump");
        a.extend(["--tree".into(), w.root_pid.to_string()]);
        if w.shell_job {
            a.push("--shell-job".into());
        }
        a.extend(Self::tracking(parent));
        a
    }

    fn tracking(parent: Option<&Path>) -> Vec<String> {
        let mut a = vec!["--track-mem".to_string()];
        if let Some(p) = parent {
            a.extend(["--prev-images-dir".into(), p.display().to_string()]);
        }
        a
    }

    /// `criu restore`, in `kupgrade-init` on the new kernel.
    pub fn restore_args(&self) -> Vec<String> {
        let mut a = self.common("restore");
        // Re-parented to PID 1, which becomes the real init.
        a.push("--restore-detached".into());
        if !self.workload.shell_job && !self.workload.job_control {
            // Stopped, so that kupgrade-init can fix their timers before
            // they run; but never a shell job: its process group is
            // orphaned once CRIU exits (init becomes the parent), and the
            // kernel sends an orphaned group with stopped members SIGHUP.
            // Nor a tree on a terminal: a job-control shell is told of its
            // jobs' stop and continue, and an interactive busybox sh then
            // ends its session.
            a.push("--leave-stopped".into());
        }
        a.extend(paired(self.workload).into_iter().map(String::from));
        a
    }

    /// `criu restore` with the workload's journal streams given as the
    /// sockets open at `fds` (in the same order) of the process that runs it.
    pub fn restore_args_inheriting(&self, fds: &[i32]) -> Vec<String> {
        let mut a = self.restore_args();
        for (s, fd) in self.workload.journal_streams.iter().zip(fds) {
            a.extend([
                "--inherit-fd".into(),
                format!("fd[{fd}]:socket:[{}]", s.inode),
            ]);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tcp: bool) -> WorkloadEntry {
        WorkloadEntry {
            name: "w".into(),
            cgroup: "/sys/fs/cgroup/kupgrade/w".into(),
            root_pid: 10001,
            pids: vec![10001, 10002],
            section: "criu/w".into(),
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

    fn value_of<'a>(args: &'a [String], option: &str) -> Option<&'a str> {
        args.windows(2)
            .find(|p| p[0] == option)
            .map(|p| p[1].as_str())
    }

    /// Every option that must match does, on both sides, for workloads with
    /// and without connections; the two sides read and write the same place.
    #[test]
    fn dump_and_restore_agree_on_every_paired_option() {
        for tcp in [false, true] {
            let w = entry(tcp);
            let c = Checkpoint {
                workload: &w,
                images_dir: Path::new("/images/w"),
                log: Path::new("/log/w.log"),
            };
            let (dump, restore) = (c.dump_args(), c.restore_args());
            assert_eq!(dump[0], "dump");
            assert_eq!(restore[0], "restore");
            for option in ["--manage-cgroups", "--file-locks"] {
                assert!(dump.iter().any(|a| a == option), "dump lacks {option}");
                assert!(
                    restore.iter().any(|a| a == option),
                    "restore lacks {option}"
                );
            }
            let has = |args: &[String]| args.iter().any(|a| a == "--tcp-established");
            assert_eq!(has(&dump), tcp, "dump --tcp-established, tcp={tcp}");
            assert_eq!(has(&restore), tcp, "restore --tcp-established, tcp={tcp}");
            for args in [&dump, &restore] {
                assert_eq!(value_of(args, "--images-dir"), Some("/images/w"));
                assert_eq!(value_of(args, "--log-file"), Some("/log/w.log"));
            }
        }
    }

    #[test]
    fn the_dump_leaves_the_tree_stopped_and_locks_only_connections() {
        let w = entry(false);
        let c = Checkpoint {
            workload: &w,
            images_dir: Path::new("/d"),
            log: Path::new("/l"),
        };
        let dump = c.dump_args();
        assert_eq!(value_of(&dump, "--tree"), Some("10001"));
        assert_eq!(
            value_of(&dump, "--freeze-cgroup"),
            Some("/sys/fs/cgroup/kupgrade/w")
        );
        assert!(dump.iter().any(|a| a == "--leave-stopped"));
        assert_eq!(value_of(&dump, "--network-lock"), None);
        let w = entry(true);
        let dump = Checkpoint { workload: &w, ..c }.dump_args();
        assert_eq!(value_of(&dump, "--network-lock"), Some("nftables"));
    }

    /// A shell job is one on both sides, and restored running: stopped, an
    /// orphaned process group would get SIGHUP when CRIU exits.
    #[test]
    fn a_shell_job_is_dumped_and_restored_as_one_and_not_left_stopped() {
        let w = WorkloadEntry {
            shell_job: true,
            ..entry(false)
        };
        let c = Checkpoint {
            workload: &w,
            images_dir: Path::new("/d"),
            log: Path::new("/l"),
        };
        let (dump, restore) = (c.dump_args(), c.restore_args());
        assert!(dump.iter().any(|a| a == "--shell-job"));
        assert!(restore.iter().any(|a| a == "--shell-job"));
        assert!(restore.iter().any(|a| a == "--restore-detached"));
        assert!(!restore.iter().any(|a| a == "--leave-stopped"));
        // The dump still leaves it stopped, for the undo.
        assert!(dump.iter().any(|a| a == "--leave-stopped"));
        let w = entry(false);
        let c = Checkpoint { workload: &w, ..c };
        assert!(!c.dump_args().iter().any(|a| a == "--shell-job"));
        assert!(!c.restore_args().iter().any(|a| a == "--shell-job"));
    }

    /// A tree on a terminal is restored running (a job-control shell would
    /// see its jobs stop and continue), and is no shell job for it.
    #[test]
    fn a_tree_on_a_terminal_is_not_left_stopped_by_the_restore() {
        let w = WorkloadEntry {
            job_control: true,
            ..entry(false)
        };
        let c = Checkpoint {
            workload: &w,
            images_dir: Path::new("/d"),
            log: Path::new("/l"),
        };
        let (dump, restore) = (c.dump_args(), c.restore_args());
        assert!(!restore.iter().any(|a| a == "--leave-stopped"));
        assert!(!restore.iter().any(|a| a == "--shell-job"));
        assert!(!dump.iter().any(|a| a == "--shell-job"));
        assert!(dump.iter().any(|a| a == "--leave-stopped"));
        let w = entry(false);
        let restore = Checkpoint { workload: &w, ..c }.restore_args();
        assert!(restore.iter().any(|a| a == "--leave-stopped"));
    }

    /// Pre-copy: each pre-dump and the frozen dump track memory and name
    /// the previous pre-dump; the first pre-dump has none; the frozen dump
    /// keeps every option of a full one.
    #[test]
    fn pre_dumps_and_the_dump_after_them_chain_to_their_parent() {
        let w = entry(true);
        let c = Checkpoint {
            workload: &w,
            images_dir: Path::new("/d/pre/2"),
            log: Path::new("/l"),
        };
        let first = c.predump_args(None);
        assert_eq!(first[0], "pre-dump");
        assert_eq!(value_of(&first, "--tree"), Some("10001"));
        assert!(first.iter().any(|a| a == "--track-mem"));
        assert_eq!(value_of(&first, "--prev-images-dir"), None);
        // Never frozen, never left stopped: the tree runs on.
        for dump_only in ["--leave-stopped", "--freeze-cgroup", "--network-lock"] {
            assert!(!first.iter().any(|a| a == dump_only), "{dump_only}");
        }
        let next = c.predump_args(Some(Path::new("../1")));
        assert_eq!(value_of(&next, "--prev-images-dir"), Some("../1"));
        let dump = Checkpoint {
            images_dir: Path::new("/d"),
            ..c
        }
        .incremental_dump_args(Path::new("pre/2"));
        assert_eq!(dump[0], "dump");
        assert_eq!(value_of(&dump, "--prev-images-dir"), Some("pre/2"));
        assert!(dump.iter().any(|a| a == "--track-mem"));
        let full = Checkpoint {
            images_dir: Path::new("/d"),
            ..c
        }
        .dump_args();
        assert!(full.iter().all(|a| dump.contains(a)), "{full:?} {dump:?}");
        assert!(!full.iter().any(|a| a == "--prev-images-dir"));
    }

    #[test]
    fn a_journal_stream_is_external_at_the_dump_and_inherited_at_the_restore() {
        let mut w = entry(false);
        w.journal_streams = vec![
            crate::journal::JournalStream {
                inode: 4242,
                ..Default::default()
            },
            crate::journal::JournalStream {
                inode: 4343,
                ..Default::default()
            },
        ];
        let c = Checkpoint {
            workload: &w,
            images_dir: Path::new("/images/w"),
            log: Path::new("/log/w.log"),
        };
        let dump = c.dump_args();
        assert!(dump.contains(&"--ext-unix-sk=4242".to_string()));
        assert!(dump.contains(&"--ext-unix-sk=4343".to_string()));
        let restore = c.restore_args_inheriting(&[7, 9]);
        let inherited: Vec<&str> = restore
            .windows(2)
            .filter(|p| p[0] == "--inherit-fd")
            .map(|p| p[1].as_str())
            .collect();
        assert_eq!(inherited, ["fd[7]:socket:[4242]", "fd[9]:socket:[4343]"]);
        assert!(!restore.iter().any(|a| a.starts_with("--ext-unix-sk")));
        assert!(!c.predump_args(None).iter().any(|a| a.starts_with("--ext")));
    }

    #[test]
    fn the_restore_is_detached_and_stopped_and_names_no_tree() {
        let w = entry(true);
        let restore = Checkpoint {
            workload: &w,
            images_dir: Path::new("/d"),
            log: Path::new("/l"),
        }
        .restore_args();
        for option in ["--restore-detached", "--leave-stopped"] {
            assert!(restore.iter().any(|a| a == option), "{option}");
        }
        for dump_only in ["--tree", "--freeze-cgroup", "--network-lock"] {
            assert!(!restore.iter().any(|a| a == dump_only), "{dump_only}");
        }
    }
}
