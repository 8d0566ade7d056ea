//! Kernel modules of one release: resolve names to module files (`.ko`, or
//! compressed: `.ko.xz`, `.ko.zst`, `.ko.gz`) and their dependencies through
//! `modules.dep`, in the order they must be loaded.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::format::{self, ModuleFormat};

/// File written next to the modules in the initramfs: one relative module
/// path per line, in load order. `kupgrade-init` loads them as listed; a
/// compressed one is there only if the kernel unpacks it itself.
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

/// The module name of a file path: `kernel/net/x/af-packet-diag.ko.xz` ->
/// `af_packet_diag`.
pub fn name_of(rel_path: &str) -> String {
    let file = rel_path.rsplit('/').next().unwrap_or(rel_path);
    normalise(format::strip_suffix(file))
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

    /// Built into the kernel (listed in `modules.builtin`).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalise(name))
    }

    /// How this release stores its modules: usually one format.
    pub fn formats(&self) -> BTreeSet<ModuleFormat> {
        self.deps
            .keys()
            .filter_map(|p| ModuleFormat::of(p))
            .collect()
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

    /// Debian's 6.12 ships `.ko.xz`; other distributions `.ko.zst` or
    /// `.ko.gz`: names, dependencies and built-ins resolve the same way.
    #[test]
    fn compressed_module_names_resolve_with_their_dependencies() {
        for f in [ModuleFormat::Xz, ModuleFormat::Zstd, ModuleFormat::Gzip] {
            let dep = DEP.replace(".ko.xz:", ".ko:").replace(".ko", f.suffix());
            let builtin = format!("kernel/fs/ext4/ext4{}\n", f.suffix());
            let (_d, idx) = index(&dep, &builtin);
            let r = idx.resolve(&["nd_pmem", "af-packet-diag", "ext4", "nd_pmem.ko"]);
            let dir = "kernel/drivers/nvdimm";
            let s = f.suffix();
            assert_eq!(
                r.load_order,
                vec![
                    format!("{dir}/libnvdimm{s}"),
                    format!("{dir}/nd_btt{s}"),
                    format!("{dir}/nd_pmem{s}"),
                    format!("kernel/net/packet/af-packet-diag{s}"),
                ],
                "{f}"
            );
            assert_eq!(r.builtin, vec!["ext4"], "{f}");
            // A name is a name: `nd_pmem.ko` is not one.
            assert_eq!(r.missing, vec!["nd_pmem.ko"], "{f}");
            assert!(idx.contains("nd-btt") && idx.is_builtin("ext4"), "{f}");
            assert_eq!(idx.formats().into_iter().collect::<Vec<_>>(), [f]);
        }
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
    fn real_debian_releases_resolve_the_pmem_stack() {
        // The harness unpacks Debian kernels here (6.1 with plain modules,
        // 6.12 with .ko.xz); skip quietly on a bare checkout.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kupgrade-vm/kernels");
        let releases: Vec<_> = fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join(".complete").exists())
            .collect();
        if releases.is_empty() {
            eprintln!("no unpacked kernels under {}: skipped", root.display());
        }
        for rel in releases {
            let release = rel.file_name();
            let idx = ModuleIndex::open(&rel.path().join("lib/modules").join(&release)).unwrap();
            let r = idx.resolve(PMEM_MODULES);
            assert!(r.missing.is_empty(), "{release:?}: {:?}", r.missing);
            let last = r.load_order.last().unwrap();
            assert_eq!(name_of(last), "nd_e820", "{release:?}");
            let formats = idx.formats();
            assert_eq!(formats.len(), 1, "{release:?}: {formats:?}");
            // Whatever the format, what comes out is the kernel's object.
            let f = formats.into_iter().next().unwrap();
            let packed = fs::read(idx.dir().join(last)).unwrap();
            let object = crate::format::decompress(f, &packed).unwrap();
            assert!(object.starts_with(b"\x7fELF"), "{release:?}: {last}");
        }
    }
}
