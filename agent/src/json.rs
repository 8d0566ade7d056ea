//! The JSON that `check`, `status` and `report` print with `--json`: one
//! object on stdout each, with the same `version`, documented once in
//! [`SCHEMA`] (which the man page and `docs/cli.md` print).

/// Changes only when a field changes meaning or goes away; new fields may
/// appear in any version.
pub const VERSION: u32 = 1;

/// The documentation of the three objects, in Markdown.
pub const SCHEMA: &str = r#"Each command prints one JSON object on stdout and exits as without `--json`.
Every object has `"version": 1`. The version changes only when a field changes
meaning or goes away; new fields may appear at any time, so ignore the ones you
do not know. Sizes are in bytes, times in nanoseconds unless named otherwise.

`kupgrade check --json`:

```json
{
  "version": 1,
  "ready": false,
  "findings": [
    { "level": "ok", "kind": "root", "workload": null,
      "what": "running as root", "fix": null },
    { "level": "fail", "kind": "store", "workload": null,
      "what": "no store: no /dev/pmemN exists. ...",
      "fix": "in /etc/default/grub, set GRUB_CMDLINE_LINUX=\"... memmap=512M!4096M\", then run update-grub and reboot once" }
  ]
}
```

- `ready`: false exactly when a finding has level `fail`.
- `level`: `ok`, `warn` or `fail`.
- `kind`: what the finding is about (`root`, `kexec`, `lockdown`, `cgroup2`,
  `criu`, `criu-check`, `workload`, `refusal`, `leftovers`, `store`,
  `store-size`, `staged`, ...); new kinds may appear, existing ones keep
  their meaning.
- `workload`: the workload the finding is about, else null.
- `what`: the finding, for people; `fix`: what to do, null for `ok`.

`kupgrade status --json`:

```json
{
  "version": 1,
  "kernel": "6.1.0-57-cloud-amd64",
  "staged": {
    "release": "6.12.9+bpo-cloud-amd64",
    "kernel": "/boot/vmlinuz-6.12.9+bpo-cloud-amd64",
    "initrd": "/boot/initrd.img-6.12.9+bpo-cloud-amd64",
    "initramfs": "distribution",
    "cmdline": "root=/dev/mapper/vg-root ro kupgrade.resume kupgrade.store=/dev/pmem0",
    "loaded": true,
    "staged_unix": 1700000000
  },
  "workloads": [
    { "name": "web", "root_pid": 4242, "comm": "nginx", "processes": 3,
      "memory_bytes": 67108864, "dumpable": true, "refusals": [],
      "pid_namespace": false, "ipc_namespace": false }
  ],
  "workload_errors": [],
  "store": { "path": "/dev/pmem0", "capacity_bytes": 536870912 },
  "store_error": null,
  "image_estimate_bytes": 90596966
}
```

- `staged`: null when nothing is staged. `initramfs`: `distribution` (the
  distribution's, with kupgrade's hook), `kupgrade` (kupgrade's own) or
  `given` (`stage --initrd`). `loaded`: false when the kernel staged is no
  longer loaded for kexec (stage it again).
- `workloads`: each workload kupgrade would preserve; `dumpable` is false when
  `refusals` (for people) is not empty.
- `workload_errors`: workloads that could not be looked at, for people.
- `store`: null when there is none; then `store_error` says why.
- `image_estimate_bytes`: what the image of these workloads may need.

`kupgrade report --json`:

```json
{
  "version": 1,
  "report": {
    "outcome": "restored",
    "reason": null,
    "kernel_from": "6.1.0-57-cloud-amd64",
    "kernel_to": "6.12.9+bpo-cloud-amd64",
    "image_generation": 7,
    "workloads": [
      { "name": "web", "root_pid": 4242, "restored": true, "error": null,
        "criu_log": "/var/lib/kupgrade/restore-web.log" }
    ],
    "events": [
      { "event": "frozen", "t_mono_ns": 81234567890, "t_real_ns": 1700000000123456789 }
    ]
  }
}
```

- `report`: null when no upgrade is recorded; else the record the restore
  wrote to `/var/lib/kupgrade/last-upgrade.json`.
- `outcome`: `restored` (every workload) or `failed`; `reason`: why it failed,
  null when restored.
- `workloads`: each workload's fate; `error` is null when it was restored,
  `criu_log` the restore's log (null when CRIU did not run for it).
- `events`: the lifecycle events of the upgrade in order, the agent's before
  the kexec then the restore's (`frozen`, ..., `kexec`, `init-start`, ...,
  `restored` or `restore-failed`); `t_mono_ns` restarts with each kernel,
  `t_real_ns` is comparable across it.
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preflight::Findings;

    #[test]
    fn check_uses_the_one_version() {
        assert_eq!(Findings(Vec::new()).to_json()["version"], VERSION);
    }

    /// The examples in the documentation are JSON.
    #[test]
    fn every_example_parses_and_has_the_version() {
        let examples: Vec<&str> = SCHEMA
            .split("```json\n")
            .skip(1)
            .map(|s| s.split("```").next().unwrap_or_default())
            .collect();
        assert_eq!(examples.len(), 3);
        let parsed: Vec<serde_json::Value> = examples
            .iter()
            .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
            .collect();
        for v in &parsed {
            assert_eq!(v["version"], VERSION, "{v}");
        }
        // The report is the restore's record, as kupgrade-init writes it.
        let r: contract::report::UpgradeReport =
            serde_json::from_value(parsed[2]["report"].clone()).unwrap();
        assert_eq!(r.outcome, contract::report::Outcome::Restored);
    }
}
