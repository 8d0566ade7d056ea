"""The fleet report: percentiles, outcomes, reasons, the picture.

    python3 -m unittest discover -s tests/unit -t tests/unit
"""

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "roles", "upgrade", "files"))

import fleet_report  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def result(host, outcome, blackout_ms=None, reason=None, run_id="r1"):
    return {"host": host, "run_id": run_id, "outcome": outcome, "reason": reason, "dry_run": outcome == "dry-run",
            "target": "6.12.43+deb12-cloud-amd64", "kernel_before": "6.1.0-40-cloud-amd64",
            "kernel_after": "6.12.43+deb12-cloud-amd64" if outcome == "upgraded" else "6.1.0-40-cloud-amd64",
            "blackout_ms": blackout_ms}


class Percentiles(unittest.TestCase):
    def test_median_of_an_odd_count_is_the_middle_value(self):
        self.assertEqual(fleet_report.percentile([900, 100, 500], 50), 500)

    def test_median_of_an_even_count_is_the_mean_of_the_middle_two(self):
        self.assertEqual(fleet_report.percentile([100, 400, 200, 300], 50), 250)

    def test_p95_interpolates_between_the_closest_ranks(self):
        # 20 values 1..20: rank 0.95 * 19 = 18.05, between 19 and 20.
        self.assertAlmostEqual(fleet_report.percentile(list(range(1, 21)), 95), 19.05)

    def test_one_value_is_every_percentile(self):
        for p in (0, 50, 95, 100):
            self.assertEqual(fleet_report.percentile([812.5], p), 812.5)

    def test_no_value_has_no_percentile(self):
        self.assertIsNone(fleet_report.percentile([], 50))
        self.assertIsNone(fleet_report.distribution([]))

    def test_distribution_names_min_median_p95_max(self):
        d = fleet_report.distribution([300.0, 100.0, 200.0])
        self.assertEqual(d, {"hosts": 3, "min_ms": 100.0, "median_ms": 200.0, "p95_ms": 290.0, "max_ms": 300.0})


class Report(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kupgrade-fleet-report-")
        os.makedirs(os.path.join(self.dir, "hosts"))

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def put(self, r):
        with open(os.path.join(self.dir, "hosts", r["host"] + ".json"), "w") as f:
            json.dump(r, f)

    def read(self, name):
        with open(os.path.join(self.dir, name)) as f:
            return f.read()

    def fleet(self):
        for r in (result("web1", "upgraded", 700.0), result("web2", "upgraded", 1300.0),
                  result("web3", "upgraded", 1000.0),
                  result("db1", "refused", reason="workload pg: holds a tun device (fix: stop using tun)"),
                  result("db2", "failed", reason="on 6.12.43+deb12-cloud-amd64: CRIU restore of pg failed"),
                  result("old", "already"),
                  result("stale", "upgraded", 99999.0, run_id="r0")):
            self.put(r)
        return fleet_report.write(self.dir, "r1", ["web1", "web2", "web3", "db1", "db2", "old", "stale", "cache1"])

    def test_outcomes_are_counted_and_hosts_without_a_result_of_this_run_are_skipped(self):
        s = self.fleet()
        self.assertEqual(s["counts"], {"upgraded": 3, "dry-run": 0, "already": 1, "refused": 1, "failed": 1,
                                       "skipped": 2})
        skipped = sorted(r["host"] for r in s["results"] if r["outcome"] == "skipped")
        self.assertEqual(skipped, ["cache1", "stale"])

    def test_the_blackout_distribution_is_of_upgraded_hosts_of_this_run_only(self):
        s = self.fleet()
        self.assertEqual(s["blackout"], {"hosts": 3, "min_ms": 700.0, "median_ms": 1000.0, "p95_ms": 1270.0,
                                         "max_ms": 1300.0})
        self.assertIsNone(s["dry_run_pause"])
        with open(os.path.join(self.dir, "fleet-report.json")) as f:
            self.assertEqual(json.load(f)["blackout"], s["blackout"])

    def test_the_table_says_why_a_host_was_refused_or_failed(self):
        self.fleet()
        md = self.read("fleet-report.md")
        self.assertIn("8 hosts: 3 upgraded, 0 dry-run, 1 already on the target kernel, 1 refused, 1 failed, 2 skipped.",
                      md)
        self.assertIn("| blackout (upgraded: frozen to restored) | 3 | 700 ms | 1.00 s | 1.27 s | 1.30 s |", md)
        self.assertIn("| db1 | refused | 6.1.0-40-cloud-amd64 | 6.1.0-40-cloud-amd64 | - | "
                      "workload pg: holds a tun device (fix: stop using tun) |", md)
        self.assertIn("| db2 | failed |", md)
        self.assertIn("CRIU restore of pg failed |", md)
        # Failures first, so that they are read first.
        self.assertLess(md.index("| db2 | failed"), md.index("| web1 | upgraded"))

    def test_a_reason_with_a_pipe_does_not_break_the_table(self):
        self.put(result("x", "failed", reason="a | b"))
        fleet_report.write(self.dir, "r1")
        self.assertIn("a \\| b", self.read("fleet-report.md"))

    def test_the_picture_is_svg_with_one_bar_per_host_that_paused(self):
        self.fleet()
        root = ET.fromstring(self.read("fleet-report.svg"))
        self.assertEqual(root.tag, SVG + "svg")
        bars = [r for r in root.iter(SVG + "rect") if r.get("class") == "bar"]
        self.assertEqual(sorted(b.get("data-host") for b in bars), ["web1", "web2", "web3"])
        self.assertTrue(all(b.get("data-outcome") == "upgraded" for b in bars))
        widths = {b.get("data-host"): float(b.get("width")) for b in bars}
        self.assertLess(widths["web1"], widths["web3"])
        self.assertLess(widths["web3"], widths["web2"])
        # Colour by outcome.
        self.assertEqual({b.get("fill") for b in bars}, {fleet_report.COLOURS["upgraded"]})
        # Median and p95 marked.
        marks = {line.get("class") for line in root.iter(SVG + "line")}
        self.assertEqual(marks, {"median", "p95"})
        # Every host is named, the ones without a bar too.
        texts = [t.text for t in root.iter(SVG + "text")]
        for host in ("db1", "db2", "old", "cache1"):
            self.assertIn(host, texts)

    def test_a_dry_run_reports_its_pauses_apart(self):
        self.put(result("d1", "dry-run", 400.0))
        self.put(result("d2", "dry-run", 200.0))
        s = fleet_report.write(self.dir, "r1")
        self.assertIsNone(s["blackout"])
        self.assertEqual(s["dry_run_pause"]["median_ms"], 300.0)
        self.assertIn("| pause (dry run: frozen to image written) | 2 |", self.read("fleet-report.md"))
        bars = [r for r in ET.fromstring(self.read("fleet-report.svg")).iter(SVG + "rect") if r.get("class") == "bar"]
        self.assertEqual({b.get("fill") for b in bars}, {fleet_report.COLOURS["dry-run"]})

    def test_host_names_are_escaped_in_the_picture(self):
        self.put(result("a<b&c", "upgraded", 10.0))
        fleet_report.write(self.dir, "r1")
        root = ET.fromstring(self.read("fleet-report.svg"))
        self.assertIn("a<b&c", [t.text for t in root.iter(SVG + "text")])

    def test_no_results_make_an_empty_report_not_an_error(self):
        s = fleet_report.write(self.dir, "r1", ["h1"])
        self.assertEqual(s["counts"]["skipped"], 1)
        self.assertIn("No pause was measured.", self.read("fleet-report.md"))
        ET.fromstring(self.read("fleet-report.svg"))

    def test_a_file_that_is_not_a_result_is_an_error_naming_it(self):
        with open(os.path.join(self.dir, "hosts", "junk.json"), "w") as f:
            f.write('{"outcome": "exploded"}')
        with self.assertRaises(fleet_report.ReportError) as e:
            fleet_report.write(self.dir, "r1")
        self.assertIn("junk.json", str(e.exception))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(fleet_report.main([self.dir]), 1)
        self.assertIn("fleet_report: ", err.getvalue())
        self.assertIn("junk.json", err.getvalue())


if __name__ == "__main__":
    unittest.main()
