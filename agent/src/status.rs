//! `kupgrade status`: the staged kernel, the workloads, the store and the
//! image estimate, for people or (`--json`) for programs. The JSON is
//! documented in [`crate::json`].

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::config::Config;
use crate::stage::Staged;
use crate::store::{self, Store};
use crate::workload::{self, Workload};
use crate::{json, proc};

pub struct Status {
    pub kernel: String,
    /// What is staged, and whether a kernel is still loaded for kexec.
    pub staged: Option<(Staged, bool)>,
    pub workloads: Vec<WorkloadStatus>,
    /// Workloads that could not be looked at, as the user reads it.
    pub errors: Vec<String>,
    pub store: Result<Store, String>,
    pub image_estimate: u64,
}

pub struct WorkloadStatus {
    pub workload: Workload,
    pub comm: String,
    pub refusals: Vec<String>,
}

impl Status {
    pub fn gather(cfg: &Config, kernel: String) -> Status {
        let staged = Staged::load().map(|s| {
            let loaded = kexec::is_loaded().unwrap_or(false);
            (s, loaded)
        });
        let mut workloads = Vec::new();
        let mut errors = Vec::new();
        for r in workload::discover(cfg) {
            match r {
                Ok(w) => workloads.push(WorkloadStatus {
                    comm: proc::comm(w.root_pid),
                    refusals: workload::refusals(&w)
                        .iter()
                        .map(|r| r.to_string())
                        .collect(),
                    workload: w,
                }),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let total = workloads.iter().map(|w| w.workload.memory_bytes).sum();
        Status {
            kernel,
            staged,
            workloads,
            errors,
            store: Store::locate(cfg).map_err(|e| e.to_string()),
            image_estimate: store::estimate_image_bytes(total),
        }
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "kernel: {}", self.kernel);
        match &self.staged {
            Some((s, loaded)) => {
                let _ = writeln!(
                    out,
                    "staged: {} ({}){}",
                    s.release,
                    s.kernel.display(),
                    if *loaded {
                        ""
                    } else {
                        " -- NOT LOADED any more"
                    }
                );
                let _ = writeln!(out, "  command line: {}", s.cmdline);
            }
            None => {
                let _ = writeln!(out, "staged: nothing");
            }
        }
        for ws in &self.workloads {
            let w = &ws.workload;
            let _ = writeln!(
                out,
                "workload {}: pid {} ({}), {} processes, {} MiB, {}{}",
                w.name,
                w.root_pid,
                ws.comm,
                w.pids.len(),
                w.memory_bytes >> 20,
                match ws.refusals.first() {
                    None => "dumpable".to_string(),
                    Some(r) => format!("NOT dumpable: {r}"),
                },
                match (w.pid_namespace, w.ipc_namespace) {
                    (true, true) => ", own PID and IPC namespaces",
                    (true, false) => ", own PID namespace",
                    (false, true) => ", own IPC namespace",
                    (false, false) => "",
                }
            );
        }
        for e in &self.errors {
            let _ = writeln!(out, "workload: {e}");
        }
        match &self.store {
            Ok(s) => {
                let _ = writeln!(
                    out,
                    "store: {} ({} MiB), image estimate {} MiB",
                    s.path.display(),
                    s.capacity >> 20,
                    self.image_estimate >> 20
                );
            }
            Err(e) => {
                let _ = writeln!(out, "store: {e}");
            }
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let staged = self.staged.as_ref().map(|(s, loaded)| {
            json!({
                "release": s.release,
                "kernel": s.kernel,
                "initrd": s.initrd,
                "initramfs": s.initramfs.name(),
                "cmdline": s.cmdline,
                "loaded": loaded,
                "staged_unix": s.staged_unix,
            })
        });
        let workloads: Vec<Value> = self
            .workloads
            .iter()
            .map(|ws| {
                let w = &ws.workload;
                json!({
                    "name": w.name,
                    "root_pid": w.root_pid,
                    "comm": ws.comm,
                    "processes": w.pids.len(),
                    "memory_bytes": w.memory_bytes,
                    "dumpable": ws.refusals.is_empty(),
                    "refusals": ws.refusals,
                    "pid_namespace": w.pid_namespace,
                    "ipc_namespace": w.ipc_namespace,
                })
            })
            .collect();
        let (store, store_error) = match &self.store {
            Ok(s) => (
                json!({ "path": s.path, "capacity_bytes": s.capacity }),
                Value::Null,
            ),
            Err(e) => (Value::Null, json!(e)),
        };
        json!({
            "version": json::VERSION,
            "kernel": self.kernel,
            "staged": staged,
            "workloads": workloads,
            "workload_errors": self.errors,
            "store": store,
            "store_error": store_error,
            "image_estimate_bytes": self.image_estimate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::InitramfsKind;
    use std::path::PathBuf;

    fn status() -> Status {
        let workload = Workload {
            name: "web".into(),
            cgroup: PathBuf::from("/sys/fs/cgroup/kupgrade/web"),
            root_pid: 4242,
            pids: vec![4242, 4243],
            memory_bytes: 64 << 20,
            pid_namespace: true,
            ipc_namespace: false,
            tcp_established: false,
            ..Workload::default()
        };
        Status {
            kernel: "6.1.0-57-cloud-amd64".into(),
            staged: Some((
                Staged {
                    kernel: "/boot/vmlinuz-6.12.9-cloud-amd64".into(),
                    release: "6.12.9-cloud-amd64".into(),
                    initrd: "/boot/initrd.img-6.12.9-cloud-amd64".into(),
                    cmdline: "root=/dev/mapper/vg-root ro kupgrade.resume".into(),
                    initramfs: InitramfsKind::Distribution,
                    ..Staged::default()
                },
                false,
            )),
            workloads: vec![WorkloadStatus {
                workload,
                comm: "nginx".into(),
                refusals: vec!["pid 4243 uses io_uring".into()],
            }],
            errors: vec!["cgroup db: gone".into()],
            store: Err("no store: no /dev/pmemN exists".into()),
            image_estimate: 100 << 20,
        }
    }

    #[test]
    fn the_text_says_what_is_staged_and_what_each_workload_is() {
        let t = status().text();
        assert_eq!(
            t,
            "kernel: 6.1.0-57-cloud-amd64\n\
             staged: 6.12.9-cloud-amd64 (/boot/vmlinuz-6.12.9-cloud-amd64) -- NOT LOADED any more\n  \
             command line: root=/dev/mapper/vg-root ro kupgrade.resume\n\
             workload web: pid 4242 (nginx), 2 processes, 64 MiB, NOT dumpable: pid 4243 uses io_uring, own PID namespace\n\
             workload: cgroup db: gone\n\
             store: no store: no /dev/pmemN exists\n"
        );
    }

    /// Every documented key is there, with the documented type.
    #[test]
    fn the_json_has_the_documented_keys() {
        let v = status().to_json();
        let keys = |v: &Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&v),
            [
                "image_estimate_bytes",
                "kernel",
                "staged",
                "store",
                "store_error",
                "version",
                "workload_errors",
                "workloads"
            ]
        );
        assert_eq!(v["version"], json::VERSION);
        assert_eq!(
            keys(&v["staged"]),
            [
                "cmdline",
                "initramfs",
                "initrd",
                "kernel",
                "loaded",
                "release",
                "staged_unix"
            ]
        );
        assert_eq!(v["staged"]["initramfs"], "distribution");
        assert_eq!(v["staged"]["loaded"], false);
        let w = &v["workloads"][0];
        assert_eq!(
            keys(w),
            [
                "comm",
                "dumpable",
                "ipc_namespace",
                "memory_bytes",
                "name",
                "pid_namespace",
                "processes",
                "refusals",
                "root_pid"
            ]
        );
        assert_eq!(
            (w["dumpable"].clone(), w["processes"].clone()),
            (json!(false), json!(2))
        );
        assert!(v["store"].is_null());
        assert_eq!(v["store_error"], "no store: no /dev/pmemN exists");
        let mut ok = status();
        ok.store = Ok(Store {
            path: "/dev/pmem0".into(),
            kind: store::Kind::Pmem,
            capacity: 512 << 20,
        });
        let v = ok.to_json();
        assert_eq!(keys(&v["store"]), ["capacity_bytes", "path"]);
        assert!(v["store_error"].is_null());
    }
}
