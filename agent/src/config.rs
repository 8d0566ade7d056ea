//! `/etc/kupgrade/config.toml` and the fixed paths kupgrade uses.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const CONFIG_FILE: &str = "/etc/kupgrade/config.toml";
/// Volatile state of this boot: what is staged, dump scratch space.
pub const RUN_DIR: &str = "/run/kupgrade";
/// Persistent state: reports, CRIU logs, the agent's own event record.
pub const LIB_DIR: &str = contract::report::DIR;
/// Parent cgroup of the workloads `kupgrade launch` starts.
pub const CGROUP_PARENT: &str = "/sys/fs/cgroup/kupgrade";
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `auto` (the first `/dev/pmemN`), a device path, or `file:PATH`.
    pub store: String,
    /// Size of a `file:` store, created on first use.
    pub store_file_mib: u64,
    pub init_binary: PathBuf,
    pub criu: String,
    pub freeze_timeout_ms: u64,
    /// Workloads started by other means, named by their cgroup, and what
    /// the config adds to those `kupgrade launch` started.
    #[serde(rename = "workload")]
    pub workloads: Vec<DeclaredWorkload>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeclaredWorkload {
    pub name: String,
    /// Absolute (`/sys/fs/cgroup/...`) or relative to the cgroup2 root;
    /// without it, the entry is about the workload `kupgrade launch NAME`
    /// started.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Files and directories on tmpfs mounts that belong to the workload and
    /// that kupgrade cannot find by itself (it finds what the workload holds
    /// open, its pid files, `/run/NAME` and its unix sockets' directories):
    /// carried across the upgrade with their owner, group and mode.
    #[serde(default)]
    pub runtime_paths: Vec<PathBuf>,
}

impl DeclaredWorkload {
    /// Why a runtime path is refused: absolute, plain names, not `/`.
    fn check_runtime_paths(&self) -> Result<(), String> {
        for p in &self.runtime_paths {
            let text = p.to_string_lossy();
            let plain = text.strip_prefix('/').is_some_and(|rest| {
                rest.split('/')
                    .all(|name| !name.is_empty() && name != "." && name != "..")
            });
            if !plain {
                return Err(format!(
                    "workload {}: runtime path {} must be an absolute path below / without `.` or `..`",
                    self.name,
                    p.display()
                ));
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: "auto".into(),
            store_file_mib: 1024,
            init_binary: PathBuf::from("/usr/lib/kupgrade/kupgrade-init"),
            criu: "criu".into(),
            freeze_timeout_ms: 5000,
            workloads: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
}

impl Config {
    /// Loads the config file; a missing file means the defaults.
    pub fn load(path: &Path) -> Result<Config, Error> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text).map_err(|message| Error::Parse {
                path: path.into(),
                message,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(Error::Read {
                path: path.into(),
                source,
            }),
        }
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        for w in &cfg.workloads {
            w.check_runtime_paths()?;
        }
        Ok(cfg)
    }

    /// The config's entry for the workload `kupgrade launch` started as `name`.
    pub fn launched(&self, name: &str) -> Option<&DeclaredWorkload> {
        self.workloads
            .iter()
            .find(|w| w.cgroup.is_none() && w.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_defaults_and_typos_are_refused() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let err = Config::parse("stroe = \"/dev/pmem0\"").unwrap_err();
        assert!(err.contains("stroe"), "{err}");
    }

    #[test]
    fn declared_workloads_parse() {
        let c = Config::parse("store = \"file:/var/img\"\n[[workload]]\nname = \"db\"\ncgroup = \"system.slice/pg.service\"\n")
            .unwrap();
        assert_eq!(c.store, "file:/var/img");
        assert_eq!(
            c.workloads[0].cgroup,
            Some(PathBuf::from("system.slice/pg.service"))
        );
        assert!(c.workloads[0].runtime_paths.is_empty());
    }

    #[test]
    fn runtime_paths_parse_for_declared_and_launched_workloads() {
        let c = Config::parse(
            "[[workload]]\nname = \"db\"\ncgroup = \"system.slice/pg.service\"\nruntime_paths = [\"/run/postgresql\", \"/dev/shm/PostgreSQL.1\"]\n\
             [[workload]]\nname = \"web\"\nruntime_paths = [\"/run/web\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.workloads[0].runtime_paths,
            [
                PathBuf::from("/run/postgresql"),
                PathBuf::from("/dev/shm/PostgreSQL.1")
            ]
        );
        assert_eq!(
            c.launched("web").map(|w| &w.runtime_paths),
            Some(&vec![PathBuf::from("/run/web")])
        );
        // A declared workload is not a launched one of the same name.
        assert_eq!(c.launched("db"), None);
    }

    #[test]
    fn runtime_paths_must_be_absolute_and_plain() {
        for bad in ["run/x", "/run/../etc", "/run/./x", "/", "/run//x/.."] {
            let text = format!("[[workload]]\nname = \"w\"\nruntime_paths = [\"{bad}\"]\n");
            let err = Config::parse(&text).unwrap_err();
            assert!(err.contains("runtime path"), "{bad}: {err}");
        }
        let ok = "[[workload]]\nname = \"w\"\nruntime_paths = [\"/run/w/sub dir\"]\n";
        assert!(Config::parse(ok).is_ok());
    }

    #[test]
    fn missing_file_means_defaults() {
        assert_eq!(
            Config::load(Path::new("/nonexistent/kupgrade.toml")).unwrap(),
            Config::default()
        );
    }
}
