"""The rolling upgrade playbook run for real by ansible-playbook, against
fake hosts: each is localhost (`connection: local`) with a FAKE kupgrade and
uname on its PATH (fake_kupgrade.py), so that the role's decisions (the
canary, the stop on failure, idempotence, the results and the report) are
tested without a machine to upgrade. No package is installed and the real
kernel, boot and /run are not touched: installs are off, and the state
directory and boot id file are the fake host's.

    python3 -m unittest discover -s tests/orchestration -t tests/orchestration
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
COLLECTIONS = os.path.abspath(os.path.join(HERE, "..", "..", "..", "..", ".."))
FAKE = os.path.join(HERE, "fake_kupgrade.py")
TARGET = "6.12.43+deb12-cloud-amd64"
OLD = "6.1.0-40-cloud-amd64"

NO_STORE = {
    "level": "fail", "kind": "store", "workload": None,
    "what": "no store: no /dev/pmemN exists",
    "fix": "in /etc/default/grub, set GRUB_CMDLINE_LINUX=\"memmap=512M!4096M\"",
}


@unittest.skipUnless(shutil.which("ansible-playbook"), "ansible-playbook is not installed (scripts/setup installs it)")
class Roll(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kupgrade-fleet-test-")
        self.report = os.path.join(self.tmp, "report")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def host(self, name, release=OLD, **fake):
        d = os.path.join(self.tmp, "hosts", name)
        os.makedirs(os.path.join(d, "bin"))
        os.makedirs(os.path.join(d, "state"))
        with open(FAKE) as f:
            source = f.read()
        for prog in ("kupgrade", "uname"):
            p = os.path.join(d, "bin", prog)
            with open(p, "w") as f:
                f.write("#!%s\n%s" % (sys.executable, source))
            os.chmod(p, 0o755)
        for fname, text in (("release", release), ("boot_id", str(uuid.uuid4())), ("fake.json", json.dumps(fake))):
            with open(os.path.join(d, fname), "w") as f:
                f.write(text)
        return name

    def read(self, host, name):
        try:
            with open(os.path.join(self.tmp, "hosts", host, name)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def calls(self, host):
        text = self.read(host, "calls.log")
        return text.splitlines() if text else []

    def result(self, host):
        path = os.path.join(self.report, "hosts", host + ".json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def fleet(self):
        with open(os.path.join(self.report, "fleet-report.json")) as f:
            return json.load(f)

    def roll(self, hosts, serial=None, max_fail=0, dry_run=False, unreachable=()):
        """Runs the playbook; serial None leaves the playbook's default.
        `unreachable` hosts are ssh to a closed port of this machine."""
        inventory = {"all": {"hosts": {}}}
        for h in unreachable:
            inventory["all"]["hosts"][h] = {"ansible_connection": "ssh", "ansible_host": "127.0.0.1",
                                            "ansible_port": 9, "ansible_ssh_common_args": "-o ConnectTimeout=5"}
        for h in hosts:
            d = os.path.join(self.tmp, "hosts", h)
            inventory["all"]["hosts"][h] = {
                "ansible_connection": "local",
                "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                "kupgrade_environment": {"PATH": os.path.join(d, "bin") + ":" + os.environ["PATH"]},
                "kupgrade_state_dir": os.path.join(d, "state"),
                "kupgrade_boot_id_file": os.path.join(d, "boot_id"),
            }
        inv = os.path.join(self.tmp, "inventory.yml")
        with open(inv, "w") as f:
            json.dump(inventory, f)
        extra = {
            "kupgrade_kernel_package": "linux-image-" + TARGET,
            "kupgrade_kernel_install": False,
            "kupgrade_package_install": False,
            "kupgrade_dry_run": dry_run,
            "kupgrade_max_fail_percentage": max_fail,
            "kupgrade_become": False,
            "kupgrade_poll_interval": 1,
            "kupgrade_go_timeout": 60,
            "kupgrade_boot_timeout": 30,
            "kupgrade_report_dir": self.report,
        }
        if serial is not None:
            extra["kupgrade_serial"] = serial
        env = dict(os.environ,
                   ANSIBLE_COLLECTIONS_PATH=COLLECTIONS,
                   ANSIBLE_LOCAL_TEMP=os.path.join(self.tmp, "ansible-local"),
                   ANSIBLE_REMOTE_TEMP=os.path.join(self.tmp, "ansible-remote"),
                   ANSIBLE_RETRY_FILES_ENABLED="false",
                   ANSIBLE_NOCOLOR="1",
                   ANSIBLE_FORKS="2")
        p = subprocess.run(
            ["ansible-playbook", "-i", inv, "kupgrade.fleet.rolling_upgrade", "-e", json.dumps(extra)],
            cwd=self.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        self.output = p.stdout
        return p.returncode

    def assertRan(self, rc, expected):
        self.assertEqual(rc, expected, "ansible-playbook exited %d, not %d:\n%s" % (rc, expected, self.output))

    def test_a_refused_canary_stops_the_roll_before_the_other_hosts(self):
        hosts = [self.host("canary", check={"rc": 3, "findings": [NO_STORE]}),
                 self.host("web1", go={"mode": "kexec", "blackout_ms": 900}),
                 self.host("web2", go={"mode": "kexec", "blackout_ms": 900})]
        self.assertRan(self.roll(hosts, serial=[1, 2]), 2)
        r = self.result("canary")
        self.assertEqual(r["outcome"], "refused")
        self.assertIn("no store: no /dev/pmemN exists", r["reason"])
        self.assertIn("memmap=512M!4096M", r["reason"])
        self.assertEqual(r["kernel_after"], OLD)
        # Refused at check: nothing staged, no go.
        self.assertEqual(self.calls("canary"), ["check --json"])
        for h in ("web1", "web2"):
            self.assertEqual(self.calls(h), [], "%s was touched after the canary was refused" % h)
            self.assertIsNone(self.result(h))
        fleet = self.fleet()
        self.assertEqual(fleet["counts"]["refused"], 1)
        self.assertEqual(fleet["counts"]["skipped"], 2)
        with open(os.path.join(self.report, "fleet-report.md")) as f:
            md = f.read()
        self.assertIn("| canary | refused |", md)
        self.assertIn("| web1 | skipped |", md)

    def test_an_upgraded_host_is_left_alone_when_the_roll_runs_again(self):
        hosts = [self.host("done", release=TARGET), self.host("fresh", go={"mode": "kexec", "blackout_ms": 850})]
        self.assertRan(self.roll(hosts, serial=[1, 1]), 0)
        self.assertEqual(self.result("done")["outcome"], "already")
        self.assertEqual(self.calls("done"), [], "a host on the target kernel ran kupgrade")
        r = self.result("fresh")
        self.assertEqual(r["outcome"], "upgraded", r)
        self.assertEqual(r["kernel_before"], OLD)
        self.assertEqual(r["kernel_after"], TARGET)
        self.assertEqual(r["blackout_ms"], 850.0)
        self.assertEqual(self.calls("fresh"),
                         ["check --json", "stage /boot/vmlinuz-" + TARGET, "go", "report --json"])
        self.assertEqual(self.fleet()["blackout"]["median_ms"], 850.0)
        # Again: now both are on the target, and nothing runs anywhere.
        boot = self.read("fresh", "boot_id")
        self.assertRan(self.roll(hosts, serial=[1, 1]), 0)
        self.assertEqual(self.result("fresh")["outcome"], "already")
        self.assertEqual(len(self.calls("fresh")), 4, "the second run ran kupgrade on an upgraded host")
        self.assertEqual(self.read("fresh", "boot_id"), boot)
        self.assertEqual(self.fleet()["counts"]["already"], 2)

    def test_a_failed_batch_over_max_fail_percentage_stops_the_next_batch(self):
        hosts = [self.host("a-canary", go={"mode": "kexec", "blackout_ms": 700}),
                 self.host("b-refused", go={"mode": "refuse", "what": "workload web: holds a tun device",
                                            "fix": "stop using tun in web"}),
                 self.host("c-ok", go={"mode": "kexec", "blackout_ms": 1300}),
                 self.host("d-later", go={"mode": "kexec", "blackout_ms": 500})]
        self.assertRan(self.roll(hosts, serial=[1, 2, 1], max_fail=40), 2)
        self.assertEqual(self.result("a-canary")["outcome"], "upgraded")
        refused = self.result("b-refused")
        self.assertEqual(refused["outcome"], "refused")
        self.assertEqual(refused["reason"], "workload web: holds a tun device (fix: stop using tun in web)")
        self.assertEqual(self.result("c-ok")["outcome"], "upgraded")
        # 1 of 2 in the second batch is 50 % > 40 %: the third never starts.
        self.assertEqual(self.calls("d-later"), [])
        fleet = self.fleet()
        self.assertEqual(fleet["counts"], {"upgraded": 2, "dry-run": 0, "already": 0, "refused": 1,
                                           "failed": 0, "skipped": 1})
        self.assertEqual(fleet["blackout"]["min_ms"], 700.0)
        self.assertEqual(fleet["blackout"]["max_ms"], 1300.0)

    def test_a_failed_restore_and_an_aborted_go_are_failures_with_their_reasons(self):
        hosts = [self.host("lost", go={"mode": "kexec", "blackout_ms": 0, "restore": "failed",
                                       "reason": "CRIU restore of web failed: Can't bind port"}),
                 self.host("aborted", go={"mode": "abort", "what": "criu dump timed out after 300 s"})]
        self.assertRan(self.roll(hosts, serial=[2], max_fail=100), 2)
        lost = self.result("lost")
        self.assertEqual(lost["outcome"], "failed")
        self.assertIn("CRIU restore of web failed: Can't bind port", lost["reason"])
        self.assertEqual(lost["kernel_after"], TARGET)
        aborted = self.result("aborted")
        self.assertEqual(aborted["outcome"], "failed")
        self.assertIn("every workload resumed", aborted["reason"])
        self.assertIn("criu dump timed out after 300 s", aborted["reason"])

    def test_a_step_that_fails_is_a_failure_naming_the_step(self):
        hosts = [self.host("flaky", go={"mode": "kexec", "blackout_ms": 900})]
        open(os.path.join(self.tmp, "hosts", "flaky", "uname-fails-after-go"), "w").close()
        self.assertRan(self.roll(hosts), 2)
        r = self.result("flaky")
        self.assertEqual(r["outcome"], "failed")
        self.assertEqual(r["reason"], "Read the kernel the host runs now: uname: cannot get system name: "
                         "Input/output error")
        self.assertEqual(self.fleet()["counts"]["failed"], 1)

    @unittest.skipUnless(shutil.which("ssh"), "no ssh client")
    def test_an_unreachable_canary_is_a_failure_and_stops_the_roll(self):
        hosts = [self.host("web1", go={"mode": "kexec", "blackout_ms": 900})]
        self.assertRan(self.roll(hosts, serial=[1, 1], unreachable=["gone"]), 2)
        r = self.result("gone")
        self.assertEqual(r["outcome"], "failed")
        self.assertTrue(r["reason"].startswith("unreachable: "), r["reason"])
        self.assertEqual(self.calls("web1"), [])
        self.assertEqual(self.fleet()["counts"]["skipped"], 1)

    def test_a_dry_run_measures_the_pause_and_stages_nothing(self):
        hosts = [self.host("d1", go={"paused_ms": 412}), self.host("d2", go={"paused_ms": 230})]
        # The default batches: the canary, then 25 %.
        self.assertRan(self.roll(hosts, dry_run=True), 0)
        for h, ms in (("d1", 412.0), ("d2", 230.0)):
            r = self.result(h)
            self.assertEqual(r["outcome"], "dry-run", r)
            self.assertEqual(r["blackout_ms"], ms)
            self.assertEqual(r["kernel_after"], OLD)
            self.assertEqual(self.calls(h), ["check --json", "go --dry-run"])
        self.assertEqual(self.fleet()["dry_run_pause"]["median_ms"], 321.0)


if __name__ == "__main__":
    unittest.main()
