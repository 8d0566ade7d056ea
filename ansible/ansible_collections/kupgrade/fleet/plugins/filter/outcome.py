# Copyright: kupgrade developers
# SPDX-License-Identifier: Apache-2.0
"""What one host's upgrade came to, from what kupgrade said.

The role only gathers what the host said (exit codes, stdout, stderr, boot
id, kernel release, `kupgrade report --json`); the decisions are here, as
plain functions, so that they are unit-tested without Ansible or a host.

Exit codes are kupgrade's (docs/cli.md, "Exit status"): 3 from `check` and 4
from `go` are refusals before anything was frozen; 5 is a `go` that gave up
after the freeze and resumed every workload; 6 means `kupgrade resume` is
needed; 7 from `report` is a restore that failed.
"""

import json
import re

DOCUMENTATION = """
  name: outcome
  short_description: decide a host's upgrade outcome from kupgrade's output
"""

# Outcomes of one host, as the per-host result files and the fleet report
# name them.
UPGRADED = "upgraded"
DRY_RUN = "dry-run"
ALREADY = "already"
REFUSED = "refused"
FAILED = "failed"
SKIPPED = "skipped"
OUTCOMES = (UPGRADED, DRY_RUN, ALREADY, REFUSED, FAILED, SKIPPED)

# `go --dry-run` says: "dry run done: the workloads were paused 812 ms up to
# the reboot, image 10240 KiB; all resumed" (agent/src/main.rs).
_DRY_RUN_PAUSE = re.compile(r"paused (\d+(?:\.\d+)?) ms")


def _missing(value):
    """Ansible renders an undefined or null value into a template as None,
    "" or "None"."""
    return value is None or str(value).strip() in ("", "None")


def _bool(value):
    return str(value).strip().lower() in ("true", "yes", "1")


def _json(text):
    """The JSON object kupgrade printed, or None when it printed none."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _last_line(text):
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _finding_text(what, fix):
    return "%s (fix: %s)" % (what, fix) if fix else what


def fail_findings(check_stdout):
    """The findings of level `fail` in `kupgrade check --json`, one text
    each, with their fix."""
    doc = _json(check_stdout) or {}
    return [
        _finding_text(f.get("what", "?"), f.get("fix"))
        for f in doc.get("findings") or []
        if isinstance(f, dict) and f.get("level") == "fail"
    ]


def stderr_failures(stderr):
    """The `[FAIL] what` lines a refused `go` prints, each with the
    `-> fix` line under it."""
    out = []
    for line in (stderr or "").splitlines():
        text = line.strip()
        if text.startswith("[FAIL]"):
            out.append([text[len("[FAIL]"):].strip(), None])
        elif text.startswith("->") and out and out[-1][1] is None:
            out[-1][1] = text[2:].strip()
    return [_finding_text(what, fix) for what, fix in out]


def _result(outcome, reason=None, kernel_after=None, blackout_ms=None):
    return {
        "outcome": outcome,
        "reason": reason,
        "kernel_after": kernel_after,
        "blackout_ms": blackout_ms,
    }


def check_outcome(rc, stdout, stderr):
    """What `kupgrade check --json` means for the roll: None to go on, else
    the host's result (it stops there, before anything is frozen)."""
    rc = int(rc)
    if rc == 0:
        return None
    fails = fail_findings(stdout)
    if rc == 3:
        return _result(REFUSED, "; ".join(fails) or "kupgrade check: not ready (exit 3) without a finding of level fail")
    if rc == 6:
        why = "; ".join(fails) or _last_line(stderr)
        return _result(FAILED, "a killed `kupgrade go` left workloads frozen or locked: run `kupgrade resume` on the host (%s)" % why)
    return _result(FAILED, "kupgrade check exited %d: %s" % (rc, _last_line(stderr) or "no message"))


def blackout_ms(report):
    """The workloads' pause in a report (the `report` object of `kupgrade
    report --json`): real time from `frozen` on the old kernel to `restored`
    on the new, as `kupgrade report` prints it (UpgradeReport::blackout_ns in
    contract/src/report.rs). None when either event is missing."""
    at = {}
    for e in (report or {}).get("events") or []:
        if isinstance(e, dict) and e.get("event") not in at:
            at[e.get("event")] = e.get("t_real_ns")
    frozen, restored = at.get("frozen"), at.get("restored")
    if not isinstance(frozen, int) or not isinstance(restored, int) or restored < frozen:
        return None
    return round((restored - frozen) / 1e6, 1)


def _frozen_real_ns(report):
    for e in (report or {}).get("events") or []:
        if isinstance(e, dict) and e.get("event") == "frozen":
            return e.get("t_real_ns")
    return None


def _restore_failure(report):
    parts = [report.get("reason") or "restore failed"]
    for w in report.get("workloads") or []:
        if isinstance(w, dict) and not w.get("restored"):
            parts.append("workload %s: %s" % (w.get("name"), w.get("error") or "not restored"))
    return "; ".join(parts)


def _after_reboot(obs):
    target = obs["target"]
    kernel = obs.get("kernel_after") or "?"
    doc = _json(obs.get("report_stdout"))
    report = doc.get("report") if doc else None
    if doc is None:
        return _result(FAILED, "rebooted into %s; `kupgrade report --json` exited %s without JSON: %s"
                       % (kernel, obs.get("report_rc"), _last_line(obs.get("report_stderr")) or "no message"), kernel)
    if not isinstance(report, dict):
        return _result(FAILED, "rebooted into %s without a record of an upgrade: the restore never ran" % kernel, kernel)
    started = obs.get("go_started_s")
    frozen = _frozen_real_ns(report)
    # The record must be of this go: its freeze came after go started (both
    # on the old kernel's clock; a second's slack for the clock's rounding).
    if not _missing(started) and (not isinstance(frozen, int) or frozen < (int(started) - 1) * 10**9):
        return _result(FAILED, "rebooted into %s, but the last upgrade recorded is older than this `kupgrade go`: "
                       "the machine restarted without kupgrade's restore" % kernel, kernel)
    outcome = report.get("outcome")
    if outcome != "restored":
        what = "restore did not finish" if outcome == "restoring" else _restore_failure(report)
        return _result(FAILED, "on %s: %s" % (kernel, what), kernel, None)
    if str(obs.get("report_rc")).strip() == "7":
        return _result(FAILED, "on %s: `kupgrade report` doubts its record (exit 7): %s"
                       % (kernel, _last_line(obs.get("report_stderr")) or "see `kupgrade report` on the host"), kernel)
    if kernel != target:
        return _result(FAILED, "came back on %s, not %s" % (kernel, target), kernel, blackout_ms(report))
    return _result(UPGRADED, None, kernel, blackout_ms(report))


def go_outcome(obs):
    """The host's result after `kupgrade go [--dry-run]`.

    `obs` holds: target (release), dry_run, boot_before, boot_after,
    kernel_after, go_rc (None when no exit was recorded on this boot),
    go_stdout, go_stderr, go_timeout_s, state_dir, go_started_s (the host's clock, in
    seconds, just before go), and after a reboot report_rc, report_stdout,
    report_stderr.
    """
    dry_run = _bool(obs.get("dry_run"))
    if not _missing(obs.get("boot_after")) and obs.get("boot_after") != obs.get("boot_before"):
        if dry_run:
            return _result(FAILED, "the host rebooted during `kupgrade go --dry-run` (now on %s)"
                           % (obs.get("kernel_after") or "?"), obs.get("kernel_after"))
        return _after_reboot(obs)
    kernel = obs.get("kernel_after")
    rc = obs.get("go_rc")
    stderr = obs.get("go_stderr")
    if _missing(rc):
        return _result(FAILED, "kupgrade go did not finish within %s s and the host did not reboot; "
                       "see %s/go.out on the host" % (obs.get("go_timeout_s", "?"), obs.get("state_dir", "/run/kupgrade-fleet")), kernel)
    rc = int(rc)
    if rc == 0 and dry_run:
        m = _DRY_RUN_PAUSE.search(obs.get("go_stdout") or "")
        if not m:
            return _result(DRY_RUN, "kupgrade go --dry-run printed no pause", kernel)
        return _result(DRY_RUN, None, kernel, float(m.group(1)))
    if rc == 0:
        return _result(FAILED, "kupgrade go exited 0 but the host did not reboot", kernel)
    if rc == 4:
        fails = stderr_failures(stderr)
        return _result(REFUSED, "; ".join(fails) or _last_line(stderr) or "kupgrade go refused (exit 4)", kernel)
    aborted = [line.strip() for line in (stderr or "").splitlines() if "aborted at" in line]
    if rc == 5:
        why = aborted[0] if aborted else _last_line(stderr)
        return _result(FAILED, "aborted before the kexec, every workload resumed on %s: %s" % (kernel or "?", why), kernel)
    if rc == 6:
        return _result(FAILED, "workloads may still be frozen or locked: run `kupgrade resume` on the host (%s)"
                       % (_last_line(stderr) or "exit 6"), kernel)
    return _result(FAILED, "kupgrade go exited %d: %s" % (rc, _last_line(stderr) or "no message"), kernel)


def poll_state(stdout):
    """`boot=ID` and `rc=N` (when go exited) from the role's poll command."""
    state = {"boot": None, "rc": None}
    for line in (stdout or "").splitlines():
        key, _, value = line.strip().partition("=")
        if key in state and value:
            state[key] = value
    return state


class FilterModule(object):
    def filters(self):
        return {
            "check_outcome": lambda r: check_outcome(r.get("rc"), r.get("stdout"), r.get("stderr")),
            "go_outcome": go_outcome,
            "poll_state": poll_state,
        }
