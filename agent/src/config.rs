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
    /// Whether the kernel packages' hook (`/etc/kernel/postinst.d/zz-kupgrade`)
    /// stages a newly installed kernel (`kupgrade stage --if-configured`).
    pub stage_new_kernels: bool,
    /// Workloads started by other means, named by their cgroup.
    #[serde(rename = "workload")]
    pub workloads: Vec<DeclaredWorkload>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeclaredWorkload {
    pub name: String,
    /// Absolute (`/sys/fs/cgroup/...`) or relative to the cgroup2 root.
    pub cgroup: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: "auto".into(),
            store_file_mib: 1024,
            init_binary: PathBuf::from("/usr/lib/kupgrade/kupgrade-init"),
            criu: "criu".into(),
            freeze_timeout_ms: 5000,
            stage_new_kernels: false,
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
        toml::from_str(text).map_err(|e| e.to_string())
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
            PathBuf::from("system.slice/pg.service")
        );
    }

    /// The commented file the package installs says what the defaults are.
    #[test]
    fn the_packaged_config_is_the_defaults() {
        let text = include_str!("../../packaging/config.toml");
        assert_eq!(Config::parse(text).unwrap(), Config::default());
        let d = Config::default();
        for (key, value) in [
            ("store", format!("{:?}", d.store)),
            ("store_file_mib", d.store_file_mib.to_string()),
            (
                "init_binary",
                format!("{:?}", d.init_binary.display().to_string()),
            ),
            ("criu", format!("{:?}", d.criu)),
            ("freeze_timeout_ms", d.freeze_timeout_ms.to_string()),
            ("stage_new_kernels", d.stage_new_kernels.to_string()),
        ] {
            let line = format!("# {key} = {value}\n");
            assert!(text.contains(&line), "no {line:?} in packaging/config.toml");
        }
    }

    #[test]
    fn missing_file_means_defaults() {
        assert_eq!(
            Config::load(Path::new("/nonexistent/kupgrade.toml")).unwrap(),
            Config::default()
        );
    }
}
