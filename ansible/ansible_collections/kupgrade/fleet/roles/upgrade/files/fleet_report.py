#!/usr/bin/env python3
# Copyright: kupgrade developers
# SPDX-License-Identifier: Apache-2.0
"""The fleet report of a rolling upgrade, from the per-host results.

    fleet_report.py DIR [--run-id ID] [--expect HOST]...

reads DIR/hosts/*.json (one per host, written by the role kupgrade.fleet.upgrade)
and writes DIR/fleet-report.md (a table), DIR/fleet-report.svg (one bar per
host's blackout) and DIR/fleet-report.json (the same, for programs).

A host named by --expect without a result of this run (--run-id) is
`skipped`: the roll stopped before it, or never reached it.

Python 3 standard library only: it runs on the control node, under the
Python that runs Ansible.
"""

import argparse
import json
import math
import os
import sys
from xml.sax.saxutils import escape

OUTCOMES = ("upgraded", "dry-run", "already", "refused", "failed", "skipped")
# Outcome colours, colour-blind safe (Tableau 10, as the timeline of
# `kupgrade report --svg`).
COLOURS = {
    "upgraded": "#59a14f",
    "dry-run": "#4e79a7",
    "already": "#bab0ac",
    "refused": "#f28e2b",
    "failed": "#e15759",
    "skipped": "#d4d4d4",
}


class ReportError(Exception):
    pass


def percentile(values, p):
    """The p-th percentile (0..100) of `values`, linear between the closest
    ranks (the definition of numpy's default and of a spreadsheet's
    PERCENTILE): the median of an even count is the mean of the middle two."""
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def distribution(values):
    if not values:
        return None
    return {
        "hosts": len(values),
        "min_ms": min(values),
        "median_ms": percentile(values, 50),
        "p95_ms": percentile(values, 95),
        "max_ms": max(values),
    }


def load(directory, run_id=None, expect=()):
    """Every host's result, sorted by host; hosts expected without a result
    of this run are `skipped`."""
    hosts_dir = os.path.join(directory, "hosts")
    results = {}
    try:
        names = sorted(os.listdir(hosts_dir))
    except FileNotFoundError:
        names = []
    except OSError as e:
        raise ReportError("cannot read %s: %s" % (hosts_dir, e))
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(hosts_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            raise ReportError("cannot read %s: %s" % (path, e))
        if not isinstance(r, dict) or r.get("outcome") not in OUTCOMES or not r.get("host"):
            raise ReportError("%s is not a host result (no host, or an outcome not in %s)" % (path, ", ".join(OUTCOMES)))
        if run_id and r.get("run_id") != run_id:
            continue
        results[r["host"]] = r
    for host in expect:
        if host not in results:
            results[host] = {
                "host": host,
                "outcome": "skipped",
                "reason": "no result of this run: the roll stopped before this host, or never reached it",
                "kernel_before": None,
                "kernel_after": None,
                "blackout_ms": None,
            }
    return [results[h] for h in sorted(results)]


def _ms(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def summarize(results, run_id=None):
    counts = {o: 0 for o in OUTCOMES}
    for r in results:
        counts[r["outcome"]] += 1
    upgraded = [r["blackout_ms"] for r in results if r["outcome"] == "upgraded" and _ms(r.get("blackout_ms"))]
    dry = [r["blackout_ms"] for r in results if r["outcome"] == "dry-run" and _ms(r.get("blackout_ms"))]
    return {
        "version": 1,
        "run_id": run_id,
        "hosts": len(results),
        "counts": counts,
        "blackout": distribution(upgraded),
        "dry_run_pause": distribution(dry),
        "results": results,
    }


def _cell(value):
    if value is None or value == "":
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _fmt_ms(value):
    if value is None:
        return "-"
    if value < 1000:
        return "%.0f ms" % value
    return "%.2f s" % (value / 1000.0)


def markdown(summary):
    c = summary["counts"]
    out = ["# Fleet upgrade report", ""]
    if summary.get("run_id"):
        out += ["Run %s." % summary["run_id"], ""]
    out.append(
        "%d hosts: %d upgraded, %d dry-run, %d already on the target kernel, %d refused, %d failed, %d skipped."
        % (summary["hosts"], c["upgraded"], c["dry-run"], c["already"], c["refused"], c["failed"], c["skipped"])
    )
    out.append("")
    rows = []
    if summary["blackout"]:
        rows.append(("blackout (upgraded: frozen to restored)", summary["blackout"]))
    if summary["dry_run_pause"]:
        rows.append(("pause (dry run: frozen to image written)", summary["dry_run_pause"]))
    if rows:
        out += ["| workloads paused | hosts | min | median | p95 | max |", "| --- | --- | --- | --- | --- | --- |"]
        for name, d in rows:
            out.append("| %s | %d | %s | %s | %s | %s |" % (
                name, d["hosts"], _fmt_ms(d["min_ms"]), _fmt_ms(d["median_ms"]), _fmt_ms(d["p95_ms"]), _fmt_ms(d["max_ms"])))
        out.append("")
    else:
        out += ["No pause was measured.", ""]
    out += ["| host | outcome | kernel before | kernel after | paused | reason |",
            "| --- | --- | --- | --- | --- | --- |"]
    order = {o: i for i, o in enumerate(("failed", "refused", "skipped", "upgraded", "dry-run", "already"))}
    for r in sorted(summary["results"], key=lambda r: (order[r["outcome"]], r["host"])):
        paused = r.get("blackout_ms") if _ms(r.get("blackout_ms")) else None
        out.append("| %s | %s | %s | %s | %s | %s |" % (
            _cell(r["host"]), r["outcome"], _cell(r.get("kernel_before")), _cell(r.get("kernel_after")),
            _fmt_ms(paused), _cell(r.get("reason"))))
    out.append("")
    return "\n".join(out)


# The picture: one row per host, a bar as long as its pause, coloured by
# outcome; hosts without a pause name their outcome instead. Dashed lines
# mark the median and p95 of the distribution drawn.
WIDTH = 900
LABEL_W = 220
RIGHT_W = 110
ROW_H = 22
BAR_H = 14
TOP = 56
LEGEND_H = 34


def svg(summary):
    results = summary["results"]
    dist = summary["blackout"] or summary["dry_run_pause"]
    paused = [r["blackout_ms"] for r in results if _ms(r.get("blackout_ms"))]
    scale_max = max(paused) if paused else 1.0
    scale_max = scale_max if scale_max > 0 else 1.0
    plot_w = WIDTH - LABEL_W - RIGHT_W
    height = TOP + ROW_H * max(len(results), 1) + LEGEND_H + 34

    def x(ms):
        return LABEL_W + plot_w * ms / scale_max

    s = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
         'font-family="sans-serif" font-size="12">' % (WIDTH, height, WIDTH, height),
         '<rect x="0" y="0" width="%d" height="%d" fill="white"/>' % (WIDTH, height)]
    c = summary["counts"]
    title = "Fleet upgrade: %d upgraded, %d refused, %d failed of %d hosts" % (
        c["upgraded"], c["refused"], c["failed"], summary["hosts"])
    if c["dry-run"]:
        title = "Fleet dry run: %d measured, %d refused, %d failed of %d hosts" % (
            c["dry-run"], c["refused"], c["failed"], summary["hosts"])
    s.append('<text x="10" y="20" font-size="15" font-weight="bold">%s</text>' % escape(title))
    what = ("workloads paused per host (frozen to restored; a dry run: frozen to image written)"
            if paused else "no pause was measured")
    s.append('<text x="10" y="38" fill="#555">%s</text>' % escape(what))
    y = TOP
    for r in results:
        colour = COLOURS[r["outcome"]]
        s.append('<text x="%d" y="%d" text-anchor="end">%s</text>' % (LABEL_W - 8, y + BAR_H - 2, escape(r["host"])))
        if _ms(r.get("blackout_ms")):
            w = max(x(r["blackout_ms"]) - LABEL_W, 1.0)
            s.append('<rect class="bar" data-host="%s" data-outcome="%s" x="%d" y="%d" width="%.1f" height="%d" fill="%s">'
                     '<title>%s: %s, %s</title></rect>'
                     % (escape(r["host"], {'"': "&quot;"}), r["outcome"], LABEL_W, y, w, BAR_H, colour,
                        escape(r["host"]), r["outcome"], _fmt_ms(r["blackout_ms"])))
            s.append('<text x="%.1f" y="%d">%s</text>' % (LABEL_W + w + 6, y + BAR_H - 2, _fmt_ms(r["blackout_ms"])))
        else:
            s.append('<text x="%d" y="%d" fill="%s">%s</text>' % (
                LABEL_W + 4, y + BAR_H - 2, colour if r["outcome"] != "skipped" else "#888", r["outcome"]))
        y += ROW_H
    bottom = y
    if dist:
        # Labels on two lines, since the two marks may be close.
        for i, (name, key) in enumerate((("median", "median_ms"), ("p95", "p95_ms"))):
            xm = x(dist[key])
            s.append('<line class="%s" x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#333" stroke-dasharray="4 3"/>'
                     % (name, xm, TOP - 6, xm, bottom + 14 * i))
            s.append('<text x="%.1f" y="%d" text-anchor="middle" fill="#333">%s %s</text>'
                     % (xm, bottom + 12 + 14 * i, name, _fmt_ms(dist[key])))
    lx, ly = 10, bottom + LEGEND_H + 14
    for o in OUTCOMES:
        if not c[o]:
            continue
        s.append('<rect x="%d" y="%d" width="12" height="12" fill="%s"/>' % (lx, ly - 10, COLOURS[o]))
        s.append('<text x="%d" y="%d">%s (%d)</text>' % (lx + 16, ly, o, c[o]))
        lx += 120
    s.append("</svg>")
    return "\n".join(s) + "\n"


def write(directory, run_id=None, expect=()):
    results = load(directory, run_id, expect)
    summary = summarize(results, run_id)
    for name, text in (("fleet-report.md", markdown(summary)),
                       ("fleet-report.svg", svg(summary)),
                       ("fleet-report.json", json.dumps(summary, indent=2) + "\n")):
        path = os.path.join(directory, name)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError as e:
            raise ReportError("cannot write %s: %s" % (path, e))
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description="The fleet report of a kupgrade rolling upgrade.")
    ap.add_argument("dir", help="the report directory: DIR/hosts/*.json in, DIR/fleet-report.{md,svg,json} out")
    ap.add_argument("--run-id", default=None, help="only results of this run")
    ap.add_argument("--expect", action="append", default=[], metavar="HOST",
                    help="a host of the roll: shown as skipped when it has no result")
    args = ap.parse_args(argv)
    try:
        summary = write(args.dir, args.run_id or None, args.expect)
    except ReportError as e:
        print("fleet_report: %s" % e, file=sys.stderr)
        return 1
    c = summary["counts"]
    print("%s: %d hosts, %s" % (os.path.join(args.dir, "fleet-report.md"), summary["hosts"],
                                ", ".join("%d %s" % (c[o], o) for o in OUTCOMES if c[o]) or "no results"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
