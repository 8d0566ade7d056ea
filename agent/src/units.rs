//! systemd services as the cgroup2 tree shows them: systemd gives each unit
//! a cgroup named after it, below the cgroups of its slices
//! (`/sys/fs/cgroup/system.slice/ssh.service`). Reading the tree needs no
//! D-Bus and no `systemctl`, and sees what the freezer and CRIU will see.

use std::fs;
use std::path::{Path, PathBuf};

/// Where systemd says it is the running init (`sd_booted(3)`).
pub const SYSTEMD_RUNTIME_DIR: &str = "/run/systemd/system";

/// systemd's runtime directory: its transient units are in `transient/`.
pub const SYSTEMD_RUN: &str = "/run/systemd";

/// The unit `kupgrade launch NAME` runs a workload as.
pub fn launched_unit(name: &str) -> String {
    format!("kupgrade-{name}.service")
}

/// Its `Description=`, which tells it from a unit of that name someone else
/// made.
pub fn launched_description(name: &str) -> String {
    format!("kupgrade workload {name}")
}

/// The workload name of a unit that `kupgrade launch` started, given the
/// unit's file; `None` for any other unit.
pub fn launched_name(unit: &str, file: &str) -> Option<String> {
    let name = unit.strip_prefix("kupgrade-")?.strip_suffix(".service")?;
    let description = format!("Description={}", launched_description(name));
    file.lines()
        .any(|l| l == description)
        .then(|| name.to_string())
}

/// The file of a unit that exists only in this boot, which the next boot's
/// systemd will not find: a transient unit (`systemd-run`, `kupgrade
/// launch`), or one kupgrade-init wrote back for such a unit after an
/// earlier upgrade. `None` for a unit with a file of its own on disk.
pub fn carried_unit_file(systemd_run: &Path, unit: &str) -> Option<String> {
    if let Ok(text) = fs::read_to_string(systemd_run.join("transient").join(unit)) {
        return Some(text);
    }
    fs::read_to_string(systemd_run.join("system").join(unit))
        .ok()
        .filter(|t| t.starts_with(contract::RESTORED_UNIT_HEADER))
}

/// What the running systemd says of a service that its adoption and the
/// preflight need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceProps {
    /// `NotifyAccess=`: `none`, `main`, `exec` or `all`.
    pub notify_access: Option<String>,
    /// `WatchdogSec=`, when set.
    pub watchdog_usec: Option<u64>,
}

/// [`ServiceProps`] of `unit` from `systemctl show`; empty if it cannot say.
pub fn service_props(unit: &str) -> ServiceProps {
    std::process::Command::new("systemctl")
        .args(["show", "--property=NotifyAccess,WatchdogUSec", unit])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| parse_props(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

fn parse_props(text: &str) -> ServiceProps {
    let mut p = ServiceProps::default();
    for line in text.lines() {
        match line.split_once('=') {
            Some(("NotifyAccess", v)) if ["none", "main", "exec", "all"].contains(&v) => {
                p.notify_access = Some(v.to_string());
            }
            Some(("WatchdogUSec", v)) => p.watchdog_usec = parse_timespan(v).filter(|&u| u > 0),
            _ => {}
        }
    }
    p
}

/// A time span as systemctl prints one (`30s`, `1min 30s`, `500ms`, `0`),
/// in microseconds; `None` for `infinity` or what it does not know.
fn parse_timespan(text: &str) -> Option<u64> {
    let mut total = 0u64;
    for part in text.split_whitespace() {
        let unit_at = part.find(|c: char| !c.is_ascii_digit())?;
        let (n, unit) = part.split_at(unit_at);
        let n: u64 = n.parse().ok()?;
        let scale: u64 = match unit {
            "us" => 1,
            "ms" => 1_000,
            "s" => 1_000_000,
            "min" => 60_000_000,
            "h" => 3_600_000_000,
            "d" => 86_400_000_000,
            _ => return None,
        };
        total += n * scale;
    }
    (total > 0).then_some(total)
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
    fn systemctl_s_notify_access_and_watchdog_are_read() {
        let p = parse_props("NotifyAccess=all\nWatchdogUSec=1min 30s\n");
        assert_eq!(p.notify_access.as_deref(), Some("all"));
        assert_eq!(p.watchdog_usec, Some(90_000_000));
        let p = parse_props("NotifyAccess=none\nWatchdogUSec=0\n");
        assert_eq!(p.notify_access.as_deref(), Some("none"));
        assert_eq!(p.watchdog_usec, None);
        assert_eq!(parse_timespan("500ms"), Some(500_000));
        assert_eq!(parse_timespan("infinity"), None);
        assert_eq!(parse_timespan("3s garbage"), None);
        assert_eq!(
            parse_props("NotifyAccess=sometimes\n"),
            ServiceProps::default()
        );
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
    fn a_transient_or_restored_unit_s_file_is_carried_and_a_unit_on_disk_s_is_not() {
        let d = tempfile::tempdir().unwrap();
        let file = "[Unit]\nDescription=kupgrade workload web\n[Service]\nExecStart=/bin/web\n";
        fs::create_dir_all(d.path().join("transient")).unwrap();
        fs::create_dir_all(d.path().join("system")).unwrap();
        fs::write(d.path().join("transient/kupgrade-web.service"), file).unwrap();
        let restored = format!("{}\n{file}", contract::RESTORED_UNIT_HEADER);
        fs::write(d.path().join("system/kupgrade-db.service"), &restored).unwrap();
        // A runtime unit an administrator wrote lives on in /etc or is theirs.
        fs::write(d.path().join("system/other.service"), file).unwrap();
        assert_eq!(
            carried_unit_file(d.path(), "kupgrade-web.service").as_deref(),
            Some(file)
        );
        assert_eq!(
            carried_unit_file(d.path(), "kupgrade-db.service"),
            Some(restored.clone())
        );
        assert_eq!(carried_unit_file(d.path(), "other.service"), None);
        assert_eq!(carried_unit_file(d.path(), "ssh.service"), None);
        // kupgrade launch's units are known by name and description.
        assert_eq!(
            launched_name(&launched_unit("web"), file).as_deref(),
            Some("web")
        );
        assert_eq!(launched_name("kupgrade-db.service", &restored), None);
        assert_eq!(launched_name("web.service", file), None);
        let theirs = "[Unit]\nDescription=kupgrade workload web, by hand\n";
        assert_eq!(launched_name("kupgrade-web.service", theirs), None);
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
