//! A fleet scenario: several Debian guests at once, each with its sshd on a
//! forwarded port of 127.0.0.1, rolled from the host (the control node) by
//! the collection's playbook `kupgrade.fleet.rolling_upgrade`, as an
//! operator would roll their own inventory. Each guest is judged as any
//! scenario's (its workloads, probes and checks), then the roll as a whole
//! from the playbook's exit code and the collection's per-host results and
//! fleet report.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::guest;
use crate::report::{Artifacts, CheckResult, Report, Verdict};
use crate::run::{self, check, FleetGuest, Options, Prepared};
use crate::scenario::{Fleet, FleetHost, HostExpect, Setup};
use crate::{progress, stop};

/// Boots every host of `p`'s fleet, runs the playbook against them once
/// their workloads run, and judges the roll.
pub fn run(p: &Prepared, scenario_dir: &Path, opts: &Options) -> Result<Report> {
    let started = Instant::now();
    let sc = &p.scenario;
    let fleet = sc.fleet.as_ref().context("not a fleet scenario")?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dir = run::new_run_dir(&opts.cache.join("runs"), &sc.name, stamp)?;
    let key = dir.join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "kupgrade-vm fleet",
            "-f",
        ])
        .arg(&key)
        .status()
        .context("cannot run ssh-keygen: install openssh-client")?;
    anyhow::ensure!(st.success(), "ssh-keygen failed");
    let public = fs::read_to_string(key.with_extension("pub"))?;
    let kernel_deb = run::kernel_package(opts, &p.to)?;
    let package = run::debian_package().context("kupgrade's package was not built")?;

    let mut guests = Vec::new();
    for h in &fleet.hosts {
        let g = FleetGuest {
            host: h.name.clone(),
            ssh_port: run::free_port()?,
        };
        let hp = host_prepared(p, h, &public);
        let (dir, opts, g2) = (scenario_dir.to_path_buf(), opts.clone(), g.clone());
        progress::step(&format!(
            "fleet: booting {} (ssh on 127.0.0.1:{})",
            g.host, g.ssh_port
        ));
        let handle = std::thread::spawn(move || run::run_fleet_guest(&hp, &dir, &opts, &g2));
        guests.push((g, handle));
    }

    let deadline = Instant::now() + Duration::from_secs(sc.guest.timeout_secs);
    let ready = wait_ready(&guests, &key, deadline);
    let roll = match &ready {
        Ok(()) => {
            let inventory = write_inventory(&dir, &key, &guests)?;
            Some(play(
                fleet,
                p,
                opts,
                &dir,
                &inventory,
                &package,
                &kernel_deb,
            ))
        }
        Err(e) => {
            progress::step(&format!("fleet: not rolled: {e:#}"));
            None
        }
    };
    // The guests check and end once told the roll is over.
    for (g, handle) in &guests {
        if !handle.is_finished() {
            if let Err(e) = tell_done(&key, g, Instant::now() + Duration::from_secs(300)) {
                progress::step(&format!("fleet: {}: {e:#}", g.host));
            }
        }
    }
    // Every guest's QEMU is gone before an error returns.
    let mut hosts = Vec::new();
    let mut failed = None;
    for (g, handle) in guests {
        match handle.join() {
            Ok(Ok(r)) => hosts.push((g.host, r)),
            Ok(Err(e)) => {
                failed.get_or_insert(e.context(format!("fleet host {}", g.host)));
            }
            Err(_) => {
                failed.get_or_insert(anyhow::anyhow!(
                    "the thread of fleet host {} panicked",
                    g.host
                ));
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }

    let mut rep = Report {
        scenario: sc.name.clone(),
        description: sc.description.clone(),
        proves: sc.proves.clone(),
        limits: sc.limits.clone(),
        kernel_before: p.from.clone(),
        ..Default::default()
    };
    if let Err(e) = &ready {
        rep.checks.push(check(
            "every host came up with its workloads",
            false,
            format!("{e:#}"),
        ));
    }
    if let Some(roll) = &roll {
        rep.checks.extend(judge_roll(fleet, p, roll));
    }
    for ((name, h), want) in hosts.iter().zip(&fleet.hosts) {
        if want.expect == HostExpect::Upgraded {
            rep.kernel_after = h.kernel_after.clone();
            rep.boots = h.boots.clone();
        }
        rep.checks.extend(h.checks.iter().map(|c| CheckResult {
            name: format!("{name}: {}", c.name),
            ..c.clone()
        }));
        rep.probes.extend(h.probes.iter().map(|pr| {
            let mut pr = pr.clone();
            pr.name = format!("{name} {}", pr.name);
            pr
        }));
        rep.workloads.extend(h.workloads.iter().map(|w| {
            let mut w = w.clone();
            w.name = format!("{name} {}", w.name);
            w
        }));
        rep.upgrades.extend(h.upgrades.iter().cloned());
        rep.events.extend(h.events.iter().cloned());
    }
    if rep.kernel_after.is_empty() {
        rep.kernel_after = p.from.clone();
        rep.boots = vec![p.from.clone()];
    }
    rep.set_floor(|_, _| None);
    rep.probe_blackout_ms = rep.probes.iter().map(|p| p.max_gap_ms).max();
    let pass = !rep.checks.is_empty() && rep.checks.iter().all(|c| c.ok);
    rep.verdict = if pass { Verdict::Pass } else { Verdict::Fail };
    rep.artifacts = Artifacts {
        dir: dir.display().to_string(),
        serial_log: hosts
            .iter()
            .map(|(_, h)| h.artifacts.serial_log.clone())
            .collect::<Vec<_>>()
            .join(" "),
        ..Default::default()
    };
    rep.wall_secs = started.elapsed().as_secs_f64();
    Ok(rep)
}

/// One host's scenario: the control node's key authorized first; the
/// kernels it must have booted (none but the first unless upgraded).
fn host_prepared(p: &Prepared, h: &FleetHost, public_key: &str) -> Prepared {
    let mut hp = p.clone();
    let sc = &mut hp.scenario;
    sc.name = format!("{}-{}", sc.name, h.name);
    sc.setup.insert(
        0,
        Setup {
            name: "the control node's ssh key authorized".into(),
            command: Vec::new(),
            shell: Some(format!(
                "install -d -m 0700 /root/.ssh && echo '{}' >> /root/.ssh/authorized_keys",
                public_key.trim()
            )),
        },
    );
    if h.expect != HostExpect::Upgraded {
        sc.upgrade.chain.clear();
    }
    hp
}

/// `ssh root@127.0.0.1 -p PORT COMMAND`, at most `within`: QEMU's user
/// network accepts a forwarded connection before the guest's sshd is up.
fn ssh(key: &Path, port: u16, command: &str, within: Duration) -> Result<String> {
    let out = Command::new("timeout")
        .arg(within.as_secs().max(1).to_string())
        .arg("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args(SSH_OPTIONS.split(' ').flat_map(|o| ["-o", o]))
        .args(["-o", "BatchMode=yes", "root@127.0.0.1", command])
        .stdin(Stdio::null())
        .output()
        .context("cannot run ssh: install openssh-client")?;
    anyhow::ensure!(
        out.status.success(),
        "ssh to port {port}: {command}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// For the harness's ssh and Ansible's alike: the guests are new each run.
const SSH_OPTIONS: &str = "StrictHostKeyChecking=no UserKnownHostsFile=/dev/null LogLevel=ERROR ConnectTimeout=10 ServerAliveInterval=5 ServerAliveCountMax=3";

/// Waits until every guest says over ssh that its workloads run.
fn wait_ready(
    guests: &[(FleetGuest, JoinHandle<Result<Report>>)],
    key: &Path,
    deadline: Instant,
) -> Result<()> {
    for (g, handle) in guests {
        loop {
            if let Some(sig) = stop::stopped() {
                anyhow::bail!("stopped by {}", stop::name(sig));
            }
            anyhow::ensure!(
                !handle.is_finished(),
                "{} ended before its workloads ran (see its checks)",
                g.host
            );
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not say over ssh that its workloads run ({}) in time",
                g.host,
                guest::FLEET_READY
            );
            let cmd = format!("cat {}", guest::FLEET_READY);
            if ssh(key, g.ssh_port, &cmd, Duration::from_secs(30)).is_ok() {
                progress::step(&format!("fleet: {} is ready over ssh", g.host));
                break;
            }
            std::thread::sleep(Duration::from_secs(3));
        }
    }
    Ok(())
}

/// Tells a guest that the roll has ended (after a kexec, once its new
/// kernel's sshd answers).
fn tell_done(key: &Path, g: &FleetGuest, deadline: Instant) -> Result<()> {
    let cmd = format!("touch {}", guest::FLEET_DONE);
    loop {
        match ssh(key, g.ssh_port, &cmd, Duration::from_secs(30)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline || stop::stopped().is_some() => {
                return Err(e.context("cannot tell it the roll has ended"))
            }
            Err(_) => std::thread::sleep(Duration::from_secs(3)),
        }
    }
}

/// The inventory an operator would write for these hosts.
fn write_inventory(
    dir: &Path,
    key: &Path,
    guests: &[(FleetGuest, JoinHandle<Result<Report>>)],
) -> Result<PathBuf> {
    let mut text = String::from("[fleet]\n");
    for (g, _) in guests {
        text.push_str(&format!(
            "{} ansible_host=127.0.0.1 ansible_port={}\n",
            g.host, g.ssh_port
        ));
    }
    let args = SSH_OPTIONS
        .split(' ')
        .map(|o| format!("-o {o}"))
        .collect::<Vec<_>>()
        .join(" ");
    text.push_str(&format!(
        "\n[fleet:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n\
         ansible_python_interpreter=/usr/bin/python3\nansible_ssh_common_args='{args}'\n",
        key.display()
    ));
    let path = dir.join("inventory.ini");
    fs::write(&path, text)?;
    Ok(path)
}

/// How the playbook ended.
struct Roll {
    /// Its exit code; `None` when the harness stopped it.
    code: Option<i32>,
    log: PathBuf,
    report_dir: PathBuf,
    why_stopped: Option<String>,
}

fn play(
    fleet: &Fleet,
    p: &Prepared,
    opts: &Options,
    dir: &Path,
    inventory: &Path,
    package: &Path,
    kernel_deb: &Path,
) -> Roll {
    let log = dir.join("ansible.log");
    let report_dir = dir.join("report");
    let mut roll = Roll {
        code: None,
        log: log.clone(),
        report_dir: report_dir.clone(),
        why_stopped: None,
    };
    let mut cmd = Command::new("ansible-playbook");
    cmd.env("ANSIBLE_COLLECTIONS_PATH", opts.workspace.join("ansible"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        // One ssh round trip per task, as Ansible advises for speed; and
        // each task's time in the log, to see where a roll spends it.
        .env("ANSIBLE_PIPELINING", "True")
        .env("ANSIBLE_CALLBACKS_ENABLED", "ansible.posix.profile_tasks")
        .arg("-i")
        .arg(inventory)
        .arg("kupgrade.fleet.rolling_upgrade")
        .args(["-e", "kupgrade_become=false"])
        .arg("-e")
        .arg(format!("kupgrade_deb={}", package.display()))
        .arg("-e")
        .arg(format!("kupgrade_kernel_deb={}", kernel_deb.display()))
        .arg("-e")
        .arg(format!("kupgrade_report_dir={}", report_dir.display()));
    let append = &p.scenario.upgrade.stage_append;
    if !append.is_empty() {
        let args = serde_json::json!({ "kupgrade_stage_args": ["--append", append] });
        cmd.arg("-e").arg(args.to_string());
    }
    for v in &fleet.extra_vars {
        cmd.arg("-e").arg(v);
    }
    progress::step(&format!(
        "fleet: ansible-playbook kupgrade.fleet.rolling_upgrade, log {}",
        log.display()
    ));
    let spawned = File::create(&log).and_then(|f| {
        let err = f.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(err).spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            roll.why_stopped = Some(format!(
                "cannot run ansible-playbook ({e}): install ansible (scripts/setup does)"
            ));
            return roll;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(fleet.playbook_secs);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                roll.code = st.code();
                break;
            }
            Ok(None) if Instant::now() > deadline || stop::stopped().is_some() => {
                let _ = child.kill();
                let _ = child.wait();
                roll.why_stopped = Some(match stop::stopped() {
                    Some(sig) => format!("stopped by {}", stop::name(sig)),
                    None => format!("it ran longer than {} s", fleet.playbook_secs),
                });
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(500)),
            Err(e) => {
                roll.why_stopped = Some(format!("cannot wait for ansible-playbook: {e}"));
                break;
            }
        }
    }
    progress::step(&format!("fleet: the playbook ended: exit {:?}", roll.code));
    roll
}

/// The roll as a whole: the playbook's end, each host's result, the report.
fn judge_roll(fleet: &Fleet, p: &Prepared, roll: &Roll) -> Vec<CheckResult> {
    let log_tail = fs::read_to_string(&roll.log)
        .map(|t| {
            let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
            lines[lines.len().saturating_sub(6)..].join(" | ")
        })
        .unwrap_or_default();
    let stops = fleet.hosts.iter().any(|h| h.expect != HostExpect::Upgraded);
    let code = match (&roll.why_stopped, roll.code) {
        (Some(why), _) => format!("not to its end: {why}"),
        (None, c) => format!("exit {c:?}"),
    };
    let mut out = vec![if stops {
        check(
            "the playbook stopped the roll (a non-zero exit)",
            roll.why_stopped.is_none() && roll.code.is_some_and(|c| c != 0),
            format!("{code}: {log_tail}"),
        )
    } else {
        check(
            "the playbook rolled every batch (exit 0)",
            roll.why_stopped.is_none() && roll.code == Some(0),
            format!("{code}: {log_tail}"),
        )
    }];
    for h in &fleet.hosts {
        let path = roll
            .report_dir
            .join("hosts")
            .join(format!("{}.json", h.name));
        let result: Option<Value> = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        out.push(judge_host(h, &p.to, result.as_ref()));
    }
    let summary: Option<Value> = fs::read(roll.report_dir.join("fleet-report.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let count = |e: HostExpect| fleet.hosts.iter().filter(|h| h.expect == e).count() as u64;
    let want = [
        ("upgraded", count(HostExpect::Upgraded)),
        ("refused", count(HostExpect::Refused)),
        ("skipped", count(HostExpect::Untouched)),
        ("failed", 0),
    ];
    let counts = summary.as_ref().and_then(|s| s.get("counts"));
    let got = |k: &str| counts.and_then(|c| c.get(k)).and_then(Value::as_u64);
    let svg = roll.report_dir.join("fleet-report.svg");
    out.push(check(
        "the fleet report counts every host's outcome",
        summary.as_ref().and_then(|s| s["hosts"].as_u64()) == Some(fleet.hosts.len() as u64)
            && want.iter().all(|(k, n)| got(k) == Some(*n))
            && svg.exists()
            && roll.report_dir.join("fleet-report.md").exists(),
        format!(
            "wanted {want:?}; fleet-report.json counts {}, blackout {}",
            counts
                .map(Value::to_string)
                .unwrap_or_else(|| "none".into()),
            summary
                .as_ref()
                .map(|s| s["blackout"].to_string())
                .unwrap_or_default()
        ),
    ));
    out
}

/// What the collection wrote for one host, against what the roll must
/// leave there.
fn judge_host(h: &FleetHost, target: &str, result: Option<&Value>) -> CheckResult {
    let field = |k: &str| result.and_then(|r| r.get(k)).and_then(Value::as_str);
    let shown = result
        .map(Value::to_string)
        .unwrap_or_else(|| "no result".into());
    match h.expect {
        HostExpect::Upgraded => check(
            &format!("{}: the roll upgraded it to {target}", h.name),
            field("outcome") == Some("upgraded")
                && field("kernel_after") == Some(target)
                && result.is_some_and(|r| r["blackout_ms"].as_f64().is_some_and(|b| b > 0.0)),
            shown,
        ),
        HostExpect::Refused => check(
            &format!("{}: the roll found it refused, and why", h.name),
            field("outcome") == Some("refused")
                && field("reason")
                    .is_some_and(|r| h.reason_contains.iter().all(|w| r.contains(w.as_str()))),
            format!("{shown} (expected a reason with {:?})", h.reason_contains),
        ),
        HostExpect::Untouched => check(
            &format!("{}: the roll stopped before it", h.name),
            result.is_none(),
            shown,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(expect: HostExpect) -> FleetHost {
        FleetHost {
            name: "deb1".into(),
            expect,
            reason_contains: vec!["traced by pid".into()],
        }
    }

    #[test]
    fn a_host_s_result_is_judged_against_what_the_roll_must_leave() {
        let upgraded = serde_json::json!({"outcome": "upgraded", "kernel_after": "6.12.1", "blackout_ms": 9000.0});
        assert!(judge_host(&host(HostExpect::Upgraded), "6.12.1", Some(&upgraded)).ok);
        assert!(!judge_host(&host(HostExpect::Upgraded), "6.12.2", Some(&upgraded)).ok);
        assert!(!judge_host(&host(HostExpect::Upgraded), "6.12.1", None).ok);
        let refused = serde_json::json!({"outcome": "refused", "reason": "workload w: thread 5 traced by pid 7 (gdb)"});
        assert!(judge_host(&host(HostExpect::Refused), "x", Some(&refused)).ok);
        let other = serde_json::json!({"outcome": "refused", "reason": "no store"});
        assert!(!judge_host(&host(HostExpect::Refused), "x", Some(&other)).ok);
        assert!(judge_host(&host(HostExpect::Untouched), "x", None).ok);
        assert!(!judge_host(&host(HostExpect::Untouched), "x", Some(&refused)).ok);
    }
}
