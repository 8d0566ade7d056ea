"""A FAKE `kupgrade` (and `uname`) for the orchestration tests only.

Each fake host is a directory: bin/kupgrade and bin/uname run this file;
`fake.json` says how the host behaves, `release` and `boot_id` are its
running kernel and boot, `calls.log` records every kupgrade command line. A
`go` that "kexecs" writes a new boot id, the staged release and a report
whose blackout is `blackout_ms`. With a file `uname-fails-after-go`, uname
fails once go ran. Nothing here touches the real machine.
"""

import json
import os
import sys
import time
import uuid


def main():
    prog = os.path.basename(sys.argv[0])
    host = os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0])))
    path = lambda name: os.path.join(host, name)  # noqa: E731

    def read(name, default=""):
        try:
            with open(path(name)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return default

    def write(name, text):
        with open(path(name), "w") as f:
            f.write(text)

    if prog == "uname":
        if os.path.exists(path("uname-fails-after-go")) and "go" in read("calls.log").split():
            print("uname: cannot get system name: Input/output error", file=sys.stderr)
            return 1
        print(read("release"))
        return 0
    with open(path("fake.json")) as f:
        fake = json.load(f)
    args = sys.argv[1:]
    with open(path("calls.log"), "a") as f:
        f.write(" ".join(args) + "\n")
    cmd = args[0] if args else ""
    if cmd == "check":
        c = fake.get("check", {})
        findings = c.get("findings", [])
        print(json.dumps({"version": 1, "ready": c.get("rc", 0) == 0, "findings": findings}))
        return c.get("rc", 0)
    if cmd == "stage":
        s = fake.get("stage", {})
        if s.get("rc", 0):
            print("kupgrade: " + s.get("error", "cannot stage"), file=sys.stderr)
            return s["rc"]
        release = os.path.basename(args[1]).replace("vmlinuz-", "", 1)
        write("staged", release)
        print("staged %s from %s" % (release, args[1]))
        return 0
    if cmd == "go":
        g = fake.get("go", {"mode": "kexec"})
        mode = g.get("mode", "kexec")
        if "--dry-run" in args:
            print("dry run done: the workloads were paused %d ms up to the reboot, image 10240 KiB; all resumed"
                  % g.get("paused_ms", 0))
            return 0
        if mode == "refuse":
            print("kupgrade: refusing to upgrade, nothing was frozen:\n[FAIL] %s\n       -> %s"
                  % (g["what"], g["fix"]), file=sys.stderr)
            return 4
        if mode == "abort":
            print("kupgrade: upgrade aborted at checkpoint: %s" % g["what"], file=sys.stderr)
            print("kupgrade: every workload was resumed on this kernel; nothing was lost", file=sys.stderr)
            return 5
        # A kexec: the host comes back on the staged kernel, another boot.
        frozen = time.time_ns()
        restored = frozen + int(g.get("blackout_ms", 0) * 1e6)
        report = {
            "outcome": g.get("restore", "restored"),
            "reason": g.get("reason"),
            "kernel_from": read("release"),
            "kernel_to": read("staged"),
            "image_generation": 1,
            "workloads": [{"name": "web", "root_pid": 42, "restored": g.get("restore", "restored") == "restored",
                           "error": g.get("reason"), "criu_log": None}],
            "events": [
                {"event": "frozen", "t_mono_ns": 1000, "t_real_ns": frozen},
                {"event": "kexec", "t_mono_ns": 2000, "t_real_ns": frozen + 1000},
                {"event": "restored", "t_mono_ns": 500, "t_real_ns": restored},
            ],
        }
        write("last-upgrade.json", json.dumps(report))
        write("release", read("staged") or read("release"))
        write("boot_id", str(uuid.uuid4()))
        return 0
    if cmd == "report":
        text = read("last-upgrade.json")
        report = json.loads(text) if text else None
        print(json.dumps({"version": 1, "report": report}))
        return 7 if report and report["outcome"] != "restored" else 0
    print("fake kupgrade: unexpected command %r" % args, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
