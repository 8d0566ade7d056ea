//! `/etc/kupgrade/config.toml` and the fixed paths kupgrade uses.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const CONFIG_FILE: &str = "/etc/kupgrade/config.toml";
/// Volatile state of this boot: what is staged, dump scratch space.
pub const RUN_DIR: &str = "/run/kupgrade";
/// `go`'s scratch space under [`RUN_DIR`]: CRIU's images, tmpfs copies.
pub const WORK_DIR: &str = "/run/kupgrade/work";
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
    /// How long one workload's `criu dump` may take before it is killed and
    /// the upgrade aborted: the workloads are frozen meanwhile.
    pub dump_timeout_s: u64,
    /// Pre-copy: rounds of `criu pre-dump` at most while the workloads run,
    /// before they are frozen (0: none, every page is dumped frozen).
    pub precopy_iterations: u32,
    /// No pre-copy round starts after this many seconds (the first always
    /// runs).
    pub precopy_budget_s: u64,
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
    /// Or a systemd service (`unit = "redis-server.service"`): its cgroup,
    /// found where systemd put it when the preflight looks.
    #[serde(default)]
    pub unit: Option<String>,
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
            stage_new_kernels: false,
            dump_timeout_s: 300,
            precopy_iterations: 4,
            precopy_budget_s: 30,
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

    /// Parses and validates: every problem is said, with what to do.
    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        let problems = cfg.problems();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems.join("; "))
        }
    }

    /// The config's entry for the workload `kupgrade launch` started as `name`.
    pub fn launched(&self, name: &str) -> Option<&DeclaredWorkload> {
        self.workloads
            .iter()
            .find(|w| w.cgroup.is_none() && w.unit.is_none() && w.name == name)
    }

    /// What is wrong with the values, each as a sentence for the user.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let store_ok = match self.store.strip_prefix("file:") {
            Some(file) => Path::new(file).is_absolute(),
            None => self.store == "auto" || Path::new(&self.store).is_absolute(),
        };
        if !store_ok {
            out.push(format!(
                "store = {:?}: use \"auto\", a device path such as \"/dev/pmem0\", or \"file:\" and an absolute path",
                self.store
            ));
        }
        if self.store_file_mib == 0 || self.store_file_mib.checked_mul(1 << 20).is_none() {
            out.push(format!(
                "store_file_mib = {}: give the file store's size in MiB, e.g. 1024",
                self.store_file_mib
            ));
        }
        if !self.init_binary.is_absolute() {
            out.push(format!(
                "init_binary = {:?}: use an absolute path",
                self.init_binary
            ));
        }
        if self.criu.is_empty() {
            out.push("criu = \"\": name the CRIU program, e.g. \"criu\"".into());
        }
        if self.freeze_timeout_ms == 0 {
            out.push("freeze_timeout_ms = 0: no workload freezes in no time; use e.g. 5000".into());
        }
        if self.dump_timeout_s == 0 {
            out.push("dump_timeout_s = 0: give CRIU time to dump, e.g. 300".into());
        }
        let mut seen: Vec<(&str, PathBuf)> = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for w in &self.workloads {
            if let Err(why) = w.check_runtime_paths() {
                out.push(why);
            }
            if !crate::launch::valid_name(&w.name) {
                out.push(format!(
                    "workload name {:?}: use letters, digits, '-' and '_' (at most 64): it names files and directories",
                    w.name
                ));
            }
            if names.contains(&w.name.as_str()) {
                out.push(format!(
                    "two workloads are named {:?}: their checkpoints would share a directory; rename one",
                    w.name
                ));
            }
            names.push(&w.name);
            if let Some(unit) = &w.unit {
                if w.cgroup.is_some() {
                    out.push(format!(
                        "workload {:?}: give `cgroup` or `unit`, not both",
                        w.name
                    ));
                } else if !crate::units::valid_service_name(unit) {
                    out.push(format!(
                        "workload {:?}: unit {unit:?} is not a service name: give it as systemctl lists it, e.g. \"redis-server.service\"",
                        w.name
                    ));
                }
                continue;
            }
            // Without a cgroup, the entry adds to a launched workload.
            let Some(cgroup) = &w.cgroup else { continue };
            match declared_cgroup(cgroup) {
                Err(why) => out.push(format!("workload {:?}: cgroup {:?} {why}", w.name, cgroup)),
                Ok(cg) => {
                    for (other, other_cg) in &seen {
                        let (inner, outer) = if cg.starts_with(other_cg) {
                            (w.name.as_str(), *other)
                        } else if other_cg.starts_with(&cg) {
                            (*other, w.name.as_str())
                        } else {
                            continue;
                        };
                        out.push(format!(
                            "workload {inner:?}'s cgroup is inside workload {outer:?}'s: their processes would be checkpointed twice; declare one of them"
                        ));
                    }
                    seen.push((&w.name, cg));
                    continue;
                }
            }
            seen.push((&w.name, PathBuf::new()));
        }
        out
    }
}

/// A declared workload's cgroup, absolute, or why it cannot be one: it
/// must lie strictly below the cgroup2 root, name no `..`, and be apart
/// from the workloads `kupgrade launch` starts.
pub fn declared_cgroup(cgroup: &Path) -> Result<PathBuf, String> {
    use std::path::Component;
    let root = Path::new(CGROUP_ROOT);
    if cgroup
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err("must not name \"..\"".into());
    }
    let full = if cgroup.is_absolute() {
        if !cgroup.starts_with(root) {
            return Err(format!("is not below {CGROUP_ROOT}"));
        }
        cgroup.to_path_buf()
    } else {
        root.join(cgroup)
    };
    let below = full.strip_prefix(root).map_or(0, |p| {
        p.components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count()
    });
    if below == 0 {
        return Err(format!(
            "is the cgroup2 root ({CGROUP_ROOT}), which holds every process: name the workload's own cgroup, e.g. system.slice/NAME.service"
        ));
    }
    let launched = Path::new(CGROUP_PARENT);
    if full.starts_with(launched) {
        return Err(format!(
            "is under {CGROUP_PARENT}, where the workloads `kupgrade launch` starts live (they are found there without a declaration)"
        ));
    }
    Ok(full)
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
            ("dump_timeout_s", d.dump_timeout_s.to_string()),
            ("precopy_iterations", d.precopy_iterations.to_string()),
            ("precopy_budget_s", d.precopy_budget_s.to_string()),
            ("stage_new_kernels", d.stage_new_kernels.to_string()),
        ] {
            let line = format!("# {key} = {value}\n");
            assert!(text.contains(&line), "no {line:?} in packaging/config.toml");
        }
    }

    /// The config with `line` added, refused: the message says what is
    /// wrong (`says`) and what to do.
    fn refused(text: &str, says: &str) {
        let e = Config::parse(text).expect_err(text);
        assert!(e.contains(says), "{text}: {e}");
    }

    fn declared(name: &str, cgroup: &str) -> String {
        format!("[[workload]]\nname = {name:?}\ncgroup = {cgroup:?}\n")
    }

    #[test]
    fn workload_names_must_be_safe_in_paths_and_unique() {
        for bad in ["../../../..", "a/b", "", ".", "..", "db x", &"x".repeat(65)] {
            refused(&declared(bad, "system.slice/x.service"), "letters, digits");
        }
        let two =
            declared("db", "system.slice/a.service") + &declared("db", "system.slice/b.service");
        refused(&two, "two workloads are named \"db\"");
        Config::parse(&declared("db-1_a", "system.slice/a.service")).unwrap();
    }

    #[test]
    fn declared_cgroups_must_be_one_workload_below_the_root() {
        for bad in [
            "/",
            "",
            ".",
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/",
            "../etc",
            "system.slice/../..",
            "/etc/passwd",
            "/sys/fs/cgroup/../../etc",
        ] {
            refused(&declared("db", bad), "cgroup");
        }
        // The parent of the launched workloads holds them all; one below
        // it is a launched workload already.
        refused(&declared("db", "kupgrade"), "kupgrade launch");
        refused(
            &declared("db", "/sys/fs/cgroup/kupgrade/web"),
            "kupgrade launch",
        );
        // Two that nest would dump the same processes twice.
        let nested = declared("a", "system.slice") + &declared("b", "system.slice/b.service");
        refused(&nested, "inside");
        Config::parse(&declared("db", "/sys/fs/cgroup/system.slice/pg.service")).unwrap();
    }

    #[test]
    fn a_workload_declared_by_unit_is_a_service_and_not_a_launched_one() {
        let c = Config::parse("[[workload]]\nname = \"redis\"\nunit = \"redis-server.service\"\n")
            .unwrap();
        assert_eq!(c.workloads[0].unit.as_deref(), Some("redis-server.service"));
        assert_eq!(c.launched("redis"), None);
        refused(
            "[[workload]]\nname = \"redis\"\nunit = \"redis-server\"\n",
            "not a service name",
        );
        refused(
            "[[workload]]\nname = \"r\"\nunit = \"r.service\"\ncgroup = \"system.slice/r.service\"\n",
            "not both",
        );
    }

    #[test]
    fn sizes_and_timeouts_must_make_sense() {
        refused("store_file_mib = 0", "store_file_mib");
        refused("store_file_mib = 18446744073709551615", "store_file_mib");
        refused("freeze_timeout_ms = 0", "freeze_timeout_ms");
        refused("dump_timeout_s = 0", "dump_timeout_s");
        refused("criu = \"\"", "criu");
        refused("init_binary = \"kupgrade-init\"", "init_binary");
        for bad in [
            "store = \"pmem0\"",
            "store = \"file:\"",
            "store = \"file:store.img\"",
        ] {
            refused(bad, "store");
        }
        for good in [
            "store = \"auto\"",
            "store = \"/dev/pmem1\"",
            "store = \"file:/var/lib/kupgrade/s.img\"",
        ] {
            Config::parse(good).unwrap();
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
