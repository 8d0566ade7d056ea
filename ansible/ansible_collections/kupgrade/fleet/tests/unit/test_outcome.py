"""What kupgrade's exit codes and output mean for a host (the filter plugin
kupgrade.fleet.*).

    python3 -m unittest discover -s tests/unit -t tests/unit
"""

import json
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "plugins", "filter"))

import outcome  # noqa: E402

TARGET = "6.12.43+deb12-cloud-amd64"
OLD = "6.1.0-40-cloud-amd64"
STARTED_S = 1_700_000_000


def check_json(*findings):
    return json.dumps({"version": 1, "ready": not any(f["level"] == "fail" for f in findings),
                       "findings": list(findings)})


def report_json(outcome_="restored", kernel_to=TARGET, frozen_s=STARTED_S + 5, blackout_ns=812_300_000,
                reason=None, workloads=None):
    frozen = frozen_s * 10**9
    return json.dumps({"version": 1, "report": {
        "outcome": outcome_, "reason": reason, "kernel_from": OLD, "kernel_to": kernel_to,
        "image_generation": 3, "workloads": workloads or [],
        "events": [{"event": "preflight-ok", "t_mono_ns": 1, "t_real_ns": frozen - 10**9},
                   {"event": "frozen", "t_mono_ns": 2, "t_real_ns": frozen},
                   {"event": "kexec", "t_mono_ns": 3, "t_real_ns": frozen + 400_000_000},
                   {"event": "init-start", "t_mono_ns": 1, "t_real_ns": frozen + 500_000_000},
                   {"event": "restored", "t_mono_ns": 2, "t_real_ns": frozen + blackout_ns}]}})


def observed(**kw):
    obs = {"target": TARGET, "dry_run": False, "boot_before": "b1", "boot_after": "b2", "kernel_after": TARGET,
           "go_rc": None, "go_stdout": "", "go_stderr": "", "go_timeout_s": 1800, "go_started_s": str(STARTED_S),
           "state_dir": "/run/kupgrade-fleet", "report_rc": 0, "report_stdout": report_json(), "report_stderr": ""}
    obs.update(kw)
    return obs


class Check(unittest.TestCase):
    def test_ready_goes_on(self):
        self.assertIsNone(outcome.check_outcome(0, check_json({"level": "ok", "what": "root", "fix": None}), ""))

    def test_exit_3_is_a_refusal_with_the_fail_findings_and_their_fixes(self):
        r = outcome.check_outcome(3, check_json(
            {"level": "ok", "kind": "root", "what": "running as root", "fix": None},
            {"level": "warn", "kind": "staged", "what": "nothing staged", "fix": "run kupgrade stage"},
            {"level": "fail", "kind": "store", "what": "no store", "fix": "reserve memmap=512M!4096M"},
            {"level": "fail", "kind": "refusal", "what": "workload web holds a tun device", "fix": None}), "")
        self.assertEqual(r["outcome"], "refused")
        self.assertEqual(r["reason"], "no store (fix: reserve memmap=512M!4096M); workload web holds a tun device")

    def test_exit_6_says_to_run_kupgrade_resume(self):
        r = outcome.check_outcome(6, check_json({"level": "fail", "kind": "leftovers", "what": "web is frozen",
                                                 "fix": "run kupgrade resume"}), "")
        self.assertEqual(r["outcome"], "failed")
        self.assertIn("run `kupgrade resume`", r["reason"])
        self.assertIn("web is frozen", r["reason"])

    def test_another_exit_fails_with_the_message(self):
        r = outcome.check_outcome(1, "", "kupgrade: /etc/kupgrade/config.toml does not parse: line 3\n")
        self.assertEqual(r, {"outcome": "failed", "reason": "kupgrade check exited 1: kupgrade: "
                             "/etc/kupgrade/config.toml does not parse: line 3", "kernel_after": None,
                             "blackout_ms": None})


class Go(unittest.TestCase):
    def test_a_restore_on_the_target_is_an_upgrade_with_its_blackout(self):
        r = outcome.go_outcome(observed())
        self.assertEqual(r, {"outcome": "upgraded", "reason": None, "kernel_after": TARGET, "blackout_ms": 812.3})

    def test_the_blackout_is_from_frozen_to_restored_in_real_time(self):
        self.assertEqual(outcome.blackout_ms(json.loads(report_json(blackout_ns=2_500_000_000))["report"]), 2500.0)
        self.assertIsNone(outcome.blackout_ms({"events": [{"event": "frozen", "t_real_ns": 5}]}))

    def test_a_refused_go_keeps_the_fail_findings_as_the_reason(self):
        stderr = ("kupgrade: refusing to upgrade, nothing was frozen:\n"
                  "[ ok ] running as root\n"
                  "[FAIL] nothing staged\n       -> run `kupgrade stage /boot/vmlinuz-NEW`\n"
                  "[FAIL] store is too small\n")
        r = outcome.go_outcome(observed(boot_after="b1", kernel_after=OLD, go_rc="4", go_stderr=stderr))
        self.assertEqual(r["outcome"], "refused")
        self.assertEqual(r["reason"], "nothing staged (fix: run `kupgrade stage /boot/vmlinuz-NEW`); store is too small")
        self.assertEqual(r["kernel_after"], OLD)

    def test_an_aborted_go_is_a_failure_that_says_the_workloads_were_resumed(self):
        stderr = ("kupgrade: upgrade aborted at dump: criu timed out\n"
                  "kupgrade: every workload was resumed on this kernel; nothing was lost\n")
        r = outcome.go_outcome(observed(boot_after="b1", kernel_after=OLD, go_rc=5, go_stderr=stderr))
        self.assertEqual(r["outcome"], "failed")
        self.assertEqual(r["reason"], "aborted before the kexec, every workload resumed on %s: "
                         "kupgrade: upgrade aborted at dump: criu timed out" % OLD)

    def test_exit_6_says_to_run_kupgrade_resume(self):
        r = outcome.go_outcome(observed(boot_after="b1", go_rc=6, go_stderr="kupgrade: RESUMING FAILED: web\n"))
        self.assertEqual(r["outcome"], "failed")
        self.assertIn("run `kupgrade resume`", r["reason"])
        self.assertIn("RESUMING FAILED: web", r["reason"])

    def test_a_dry_run_takes_the_pause_go_printed(self):
        out = "dry run done: the workloads were paused 412 ms up to the reboot, image 10240 KiB; all resumed\n"
        r = outcome.go_outcome(observed(dry_run="True", boot_after="b1", kernel_after=OLD, go_rc="0", go_stdout=out))
        self.assertEqual(r, {"outcome": "dry-run", "reason": None, "kernel_after": OLD, "blackout_ms": 412.0})

    def test_a_reboot_during_a_dry_run_is_a_failure(self):
        r = outcome.go_outcome(observed(dry_run=True, boot_after="b2"))
        self.assertEqual(r["outcome"], "failed")
        self.assertIn("rebooted during `kupgrade go --dry-run`", r["reason"])

    def test_a_go_that_returned_0_without_a_reboot_is_a_failure(self):
        r = outcome.go_outcome(observed(boot_after="b1", go_rc="0"))
        self.assertEqual(r["outcome"], "failed")

    def test_no_exit_and_no_reboot_is_a_timeout(self):
        r = outcome.go_outcome(observed(boot_after="b1", go_rc="None"))
        self.assertEqual(r["outcome"], "failed")
        self.assertIn("did not finish within 1800 s", r["reason"])

    def test_a_failed_restore_is_a_failure_with_the_report_reason_and_workload_errors(self):
        r = outcome.go_outcome(observed(report_rc=7, report_stdout=report_json(
            "failed", reason="1 of 1 workloads not restored",
            workloads=[{"name": "web", "restored": False, "error": "criu restore: Can't bind port 80"}])))
        self.assertEqual(r["outcome"], "failed")
        self.assertEqual(r["reason"], "on %s: 1 of 1 workloads not restored; workload web: criu restore: "
                         "Can't bind port 80" % TARGET)

    def test_a_restore_that_never_ended_is_a_failure(self):
        r = outcome.go_outcome(observed(report_rc=7, report_stdout=report_json("restoring")))
        self.assertEqual(r["outcome"], "failed")
        self.assertIn("did not finish", r["reason"])

    def test_a_report_the_tool_doubts_is_a_failure(self):
        r = outcome.go_outcome(observed(report_rc="7"))
        self.assertEqual(r["outcome"], "failed")
        self.assertIn("doubts its record", r["reason"])

    def test_another_kernel_after_the_reboot_is_a_failure(self):
        r = outcome.go_outcome(observed(kernel_after=OLD))
        self.assertEqual(r["outcome"], "failed")
        self.assertEqual(r["reason"], "came back on %s, not %s" % (OLD, TARGET))

    def test_a_report_older_than_this_go_is_not_taken_for_it(self):
        r = outcome.go_outcome(observed(report_stdout=report_json(frozen_s=STARTED_S - 3600)))
        self.assertEqual(r["outcome"], "failed")
        self.assertIn("older than this `kupgrade go`", r["reason"])

    def test_a_reboot_without_any_record_is_a_failure(self):
        r = outcome.go_outcome(observed(report_stdout=json.dumps({"version": 1, "report": None})))
        self.assertEqual(r["outcome"], "failed")
        self.assertIn("without a record of an upgrade", r["reason"])


class Poll(unittest.TestCase):
    def test_boot_and_exit_code(self):
        self.assertEqual(outcome.poll_state("boot=abc\nrc=4\n"), {"boot": "abc", "rc": "4"})
        self.assertEqual(outcome.poll_state("boot=abc\n"), {"boot": "abc", "rc": None})
        self.assertEqual(outcome.poll_state(""), {"boot": None, "rc": None})


if __name__ == "__main__":
    unittest.main()
