//! Kernel modules of one release: resolve names to `.ko` files and their
//! dependencies through `modules.dep`, in the order they must be loaded.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

/// File written next to the modules in the initramfs: one relative `.ko`
/// path per line, in load order. `kupgrade-init` loads them as listed.
pub const LOAD_ORDER_FILE: &str = "kupgrade.load-order";

/// Modules that `kupgrade-init` needs whatever the machine: the sock_diag
/// family that CRIU uses to dump and restore sockets, and nf_tables for its
/// network lock.
pub const CRIU_MODULES: &[&str] = &[
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "unix_diag",
    "netlink_diag",
    "af_packet_diag",
    "nf_tables",
];

/// Modules that expose a `memmap=SIZE!ADDR` range as `/dev/pmemN`.
pub const PMEM_MODULES: &[&str] = &["libnvdimm", "nd_btt", "nd_pmem", "nd_e820"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a modules.dep line; run depmod for this release")]
    Syntax { path: PathBuf, line: usize },
}

/// The module index of one release (`/lib/modules/<release>`).
#[derive(Debug)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// relative path -> its dependencies (relative paths)
    deps: HashMap<String, Vec<String>>,
    /// normalised name -> relative path
    by_name: HashMap<String, String>,
    builtin: HashSet<String>,
}

/// What resolving a list of wanted modules gave.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Relative `.ko` paths, dependencies first.
    pub load_order: Vec<String>,
    /// Wanted names built into the kernel: nothing to load.
    pub builtin: Vec<String>,
    /// Wanted names this release does not have at all.
    pub missing: Vec<String>,
}

/// Module names treat `-` and `_` alike.
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

fn name_of(rel_path: &str) -> String {
    let file = rel_path.rsplit('/').next().unwrap_or(rel_path);
    // Strip `.ko` and a compression suffix such as `.ko.xz`.
    let stem = file.split(".ko").next().unwrap_or(file);
    normalise(stem)
}

impl ModuleIndex {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let dep_path = dir.join("modules.dep");
        let text = fs::read_to_string(&dep_path).map_err(|source| Error::Read {
            path: dep_path.clone(),
            source,
        })?;
        let mut deps = HashMap::new();
        let mut by_name = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (module, list) = line.split_once(':').ok_or(Error::Syntax {
                path: dep_path.clone(),
                line: i + 1,
            })?;
            by_name.insert(name_of(module), module.to_string());
            deps.insert(
                module.to_string(),
                list.split_whitespace().map(str::to_string).collect(),
            );
        }
        // modules.builtin is optional: without it a built-in module looks missing.
        let builtin = fs::read_to_string(dir.join("modules.builtin"))
            .map(|t| t.lines().map(name_of).collect())
            .unwrap_or_default();
        Ok(ModuleIndex {
            dir: dir.to_path_buf(),
            deps,
            by_name,
            builtin,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(&normalise(name))
    }

    /// Resolves `wanted` names to files in load order, each once.
    pub fn resolve<S: AsRef<str>>(&self, wanted: &[S]) -> Resolution {
        let mut out = Resolution::default();
        let mut seen = HashSet::new();
        for name in wanted {
            let name = normalise(name.as_ref());
            match self.by_name.get(&name) {
                Some(path) => self.visit(path, &mut seen, &mut out.load_order),
                None if self.builtin.contains(&name) => out.builtin.push(name),
                None => out.missing.push(name),
            }
        }
        out
    }

    // modules.dep lists the whole closure of each module, so a depth-first
    // walk that puts every dependency before its user gives a valid order
    // whatever order the lists are in.
    fn visit(&self, path: &str, seen: &mut HashSet<String>, order: &mut Vec<String>) {
        if !seen.insert(path.to_string()) {
            return;
        }
        for dep in self.deps.get(path).into_iter().flatten() {
            self.visit(dep, seen, order);
        }
        order.push(path.to_string());
    }
}

/// Names of the modules loaded in the running kernel (`/proc/modules`).
pub fn loaded(proc_modules: &Path) -> Result<Vec<String>, Error> {
    let text = fs::read_to_string(proc_modules).map_err(|source| Error::Read {
        path: proc_modules.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(normalise)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(dep: &str, builtin: &str) -> (tempfile::TempDir, ModuleIndex) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("modules.dep"), dep).unwrap();
        fs::write(dir.path().join("modules.builtin"), builtin).unwrap();
        let idx = ModuleIndex::open(dir.path()).unwrap();
        (dir, idx)
    }

    const DEP: &str = "\
kernel/drivers/nvdimm/nd_pmem.ko: kernel/drivers/nvdimm/nd_btt.ko kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/nd_btt.ko: kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/libnvdimm.ko:
kernel/net/packet/af-packet-diag.ko.xz:
";

    #[test]
    fn dependencies_come_first_and_once() {
        let (_d, idx) = index(DEP, "");
        let r = idx.resolve(&["nd_pmem", "libnvdimm", "nd-btt"]);
        assert_eq!(
            r.load_order,
            vec![
                "kernel/drivers/nvdimm/libnvdimm.ko",
                "kernel/drivers/nvdimm/nd_btt.ko",
                "kernel/drivers/nvdimm/nd_pmem.ko"
            ]
        );
        assert!(r.missing.is_empty() && r.builtin.is_empty());
    }

    #[test]
    fn order_does_not_depend_on_the_listing_order_of_deps() {
        let reversed = DEP.replace(
            "nd_pmem.ko: kernel/drivers/nvdimm/nd_btt.ko kernel/drivers/nvdimm/libnvdimm.ko",
            "nd_pmem.ko: kernel/drivers/nvdimm/libnvdimm.ko kernel/drivers/nvdimm/nd_btt.ko",
        );
        assert_ne!(reversed, DEP);
        let (_d, idx) = index(&reversed, "");
        let r = idx.resolve(&["nd_pmem"]);
        let pos = |n: &str| r.load_order.iter().position(|p| p.ends_with(n)).unwrap();
        assert!(pos("libnvdimm.ko") < pos("nd_btt.ko"));
        assert!(pos("nd_btt.ko") < pos("nd_pmem.ko"));
    }

    #[test]
    fn builtin_and_missing_are_told_apart_and_suffixes_are_stripped() {
        let (_d, idx) = index(DEP, "kernel/fs/ext4/ext4.ko\n");
        let r = idx.resolve(&["ext4", "nope", "af_packet_diag"]);
        assert_eq!(r.builtin, vec!["ext4"]);
        assert_eq!(r.missing, vec!["nope"]);
        assert_eq!(r.load_order, vec!["kernel/net/packet/af-packet-diag.ko.xz"]);
    }

    #[test]
    fn a_line_without_colon_is_a_syntax_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("modules.dep"), "a.ko: b.ko\ngarbage\n").unwrap();
        assert!(matches!(
            ModuleIndex::open(dir.path()),
            Err(Error::Syntax { line: 2, .. })
        ));
    }

    #[test]
    fn real_debian_release_resolves_the_pmem_stack() {
        // The harness unpacks Debian kernels here; skip quietly on a bare checkout.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kupgrade-vm/kernels");
        let Some(rel) = fs::read_dir(&root)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
        else {
            eprintln!("no unpacked kernels under {}: skipped", root.display());
            return;
        };
        let release = rel.file_name();
        let idx = ModuleIndex::open(&rel.path().join("lib/modules").join(&release)).unwrap();
        let r = idx.resolve(PMEM_MODULES);
        assert!(r.missing.is_empty(), "{:?}", r.missing);
        assert!(r.load_order.last().unwrap().ends_with("nd_e820.ko"));
    }
}
