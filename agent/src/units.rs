//! systemd services as the cgroup2 tree shows them: systemd gives each unit
//! a cgroup named after it, below the cgroups of its slices
//! (`/sys/fs/cgroup/system.slice/ssh.service`). Reading the tree needs no
//! D-Bus and no `systemctl`, and sees what the freezer and CRIU will see.

use std::fs;
use std::path::{Path, PathBuf};

/// Where systemd says it is the running init (`sd_booted(3)`).
pub const SYSTEMD_RUNTIME_DIR: &str = "/run/systemd/system";

/// The unit's `NotifyAccess=` as the running systemd has it (`systemctl
/// show`), if it answers with a value it knows.
pub fn notify_access(unit: &str) -> Option<String> {
    let out = std::process::Command::new("systemctl")
        .args(["show", "--property=NotifyAccess", "--value", unit])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && ["none", "main", "exec", "all"].contains(&value.as_str()))
        .then_some(value)
}

/// A service unit with processes in its cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub unit: String,
    pub cgroup: PathBuf,
}

/// Whether `/run/systemd/system` (or its stand-in) is a directory.
pub fn systemd_booted(runtime_dir: &Path) -> bool {
    runtime_dir.is_dir()
}

/// A unit name a workload may be declared by: a service, one path
/// component, no escapes systemd would not produce.
pub fn valid_service_name(unit: &str) -> bool {
    let Some(stem) = unit.strip_suffix(".service") else {
        return false;
    };
    !stem.is_empty()
        && unit.len() <= 255
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c))
}

/// The cgroups of slices, depth first from `root` (the root itself
/// included: user slices nest, `-.slice` is the root).
fn slices(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let mut below: Vec<PathBuf> = subdirs(&out[i])
            .into_iter()
            .filter(|p| name_of(p).ends_with(".slice"))
            .collect();
        below.sort();
        out.extend(below);
        i += 1;
    }
    out
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether a cgroup or one below it holds a process (`cgroup.events`).
fn populated(cgroup: &Path) -> bool {
    fs::read_to_string(cgroup.join("cgroup.events"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "populated 1"))
}

/// Every service with processes, sorted by unit name.
pub fn running_services(cgroup_root: &Path) -> Vec<Service> {
    let mut out: Vec<Service> = slices(cgroup_root)
        .iter()
        .flat_map(|s| subdirs(s))
        .filter(|p| name_of(p).ends_with(".service") && populated(p))
        .map(|cgroup| Service {
            unit: name_of(&cgroup),
            cgroup,
        })
        .collect();
    out.sort_by(|a, b| a.unit.cmp(&b.unit));
    out
}

/// The cgroup of a running `unit`, wherever its slice puts it.
pub fn cgroup_of(cgroup_root: &Path, unit: &str) -> Option<PathBuf> {
    slices(cgroup_root)
        .iter()
        .map(|s| s.join(unit))
        .find(|p| p.is_dir() && populated(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(root: &Path, path: &str, populated: bool) -> PathBuf {
        let dir = root.join(path);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("cgroup.events"),
            format!("populated {}\nfrozen 0\n", u8::from(populated)),
        )
        .unwrap();
        dir
    }

    #[test]
    fn services_are_found_below_every_slice_and_only_while_they_run() {
        let d = tempfile::tempdir().unwrap();
        let ssh = unit(d.path(), "system.slice/ssh.service", true);
        let getty = unit(
            d.path(),
            "system.slice/system-getty.slice/getty@tty1.service",
            true,
        );
        unit(d.path(), "system.slice/cron.service", false);
        unit(d.path(), "init.scope", true);
        // A service's own sub-cgroups are not services.
        unit(d.path(), "system.slice/ssh.service/inner.service", true);
        // kupgrade's own workloads live outside any slice.
        unit(d.path(), "kupgrade/web.service", true);
        assert_eq!(
            running_services(d.path()),
            vec![
                Service {
                    unit: "getty@tty1.service".into(),
                    cgroup: getty.clone()
                },
                Service {
                    unit: "ssh.service".into(),
                    cgroup: ssh.clone()
                },
            ]
        );
        assert_eq!(cgroup_of(d.path(), "ssh.service"), Some(ssh));
        assert_eq!(cgroup_of(d.path(), "getty@tty1.service"), Some(getty));
        assert_eq!(cgroup_of(d.path(), "cron.service"), None);
        assert_eq!(cgroup_of(d.path(), "web.service"), None);
    }

    #[test]
    fn only_plain_service_names_declare_a_workload() {
        for ok in [
            "redis-server.service",
            "getty@tty1.service",
            "a\\x2db.service",
        ] {
            assert!(valid_service_name(ok), "{ok}");
        }
        for bad in [
            ".service",
            "ssh",
            "ssh.socket",
            "../x.service",
            "a/b.service",
            "a b.service",
        ] {
            assert!(!valid_service_name(bad), "{bad}");
        }
    }

    #[test]
    fn systemd_is_booted_when_its_runtime_directory_exists() {
        let d = tempfile::tempdir().unwrap();
        assert!(!systemd_booted(&d.path().join("system")));
        fs::create_dir(d.path().join("system")).unwrap();
        assert!(systemd_booted(&d.path().join("system")));
    }
}
