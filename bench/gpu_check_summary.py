"""The short summary of a bench/gpu_check.sh run (standard library only; the script calls it after
every stage, so a run cut short still leaves an up-to-date summary).

    python3 bench/gpu_check_summary.py WORKDIR SUMMARY_TXT

WORKDIR holds the run's files: stages.tsv (one line per stage, in order: name, status, exit
code, seconds, timeout, note), meta.json, each stage's NAME.log, the JUnit XML and the JSON.
Writes WORKDIR/summary.json (everything below, machine-readable) and SUMMARY_TXT: one line per
stage with its status, time, timeout and the result that matters (tests passed / failed /
skipped, the test that hung, sanitizer errors, issue 5's speed-ups)."""
from __future__ import annotations

import json
import os
import re
import sys
import xml.etree.ElementTree as ET


def junit_counts(path):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    n = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    failing = [f"{c.get('classname', '')}::{c.get('name', '')}" for s in suites
               for c in s.iter("testcase") if c.find("failure") is not None
               or c.find("error") is not None]
    return {"passed": n - failed - skipped, "failed": failed, "skipped": skipped,
            "failing": failing[:10]}


PYTEST_TAIL = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected)")


def pytest_result(work, name):
    """Counts from the stage's JUnit XML, else from its log (a killed pytest writes no XML);
    the test pytest-timeout stopped, if any."""
    res = {}
    xml = os.path.join(work, f"{name}.xml")
    log_path = os.path.join(work, f"{name}.log")
    log = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
    if os.path.exists(xml):
        try:
            res.update(junit_counts(xml))
        except ET.ParseError:
            pass
    if not res:
        # -v lines: "tests/x.py::test_a[...] PASSED   [ 10%]" (a run killed before its XML)
        for word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            res[word.lower()] = len(re.findall(rf"\b{word}(?: \(.*\))?\s+\[\s*\d+%\]", log))
        res["failed"] += res.pop("error")
        res["from_log"] = True
    if "+ Timeout +" in log:
        # pytest-timeout (thread method) names the test it stopped in its stack dump header
        m = re.findall(r"^(\S+::\S+) ", log, re.M)
        res["timeout_in"] = m[-1] if m else "?"
    return res


def sanitizer_result(work, name):
    log_path = os.path.join(work, f"{name}.log")
    if not os.path.exists(log_path):
        return {}
    log = open(log_path, errors="replace").read()
    res = {}
    m = re.search(r"ERROR SUMMARY: (\d+) error", log)
    if m:
        res["errors"] = int(m.group(1))
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)",
                  log)
    if m:
        res["errors"], res["warnings"] = int(m.group(2)), int(m.group(3))
    # where the printed errors are: records naming a kernel ("at <kernel>+0x..") in rnn_ext's
    # kernels or elsewhere (the initcheck pass instruments every kernel), host API errors
    records = re.findall(r"^========= (\S.*?)\n(?:=========\s+(.*)\n)?", log, re.M)
    ours = other = 0
    for head, nxt in records:
        if not re.search(r"(error|Uninitialized|Invalid|hazard|Race)", head, re.I) \
                or "SUMMARY" in head or head.startswith(("Error: process", "Target application")):
            continue
        if "Internal Sanitizer Error" in head:
            res["tool_error"] = True
            continue
        m = re.search(r"at (.*?)\+0x", nxt or "")
        if m and "rnn_ext::" in m.group(1):
            ours += 1
        else:
            other += 1
    if ours or other:
        res["printed_rnn_ext"], res["printed_elsewhere"] = ours, other
    used = re.findall(r"^(.*): cuda_kernel_used forward=(\w+) backward=(\w+), variant "
                      r"forward=(\w+) backward=(\w+).*(ok|FAIL)$", log, re.M)
    if used:
        res["cases"] = len(used)
        res["cases_failed"] = sum(u[-1] == "FAIL" for u in used)
        res["persistent_cases"] = sum(u[1] == "persistent" for u in used)
    return res


def bench_result(work, name):
    res = {}
    summ = os.path.join(work, "issue5_summary.json")
    if os.path.exists(summ) and name == {"default_fwd": "bench_default"}.get(
            json.load(open(summ)).get("run"), "bench_tf32_off"):
        s = json.load(open(summ))
        for mode, v in s.get("modes", {}).items():
            res[f"{mode}_geomean"] = round(v["geomean_speedup"], 3)
            res[f"{mode}_min"] = round(v["min_speedup"], 3)
        res["targets_met"] = s.get("targets_met")
    # the --name each bench stage writes (gpu_check.sh)
    stems = {"bench_default": ("default_fwd",), "bench_tf32_off": ("persistent_fwd", "step_fwd"),
             "bench_row_split": ("persistent_fwd_row_split",),
             "bench_crossover": ("crossover_persistent", "crossover_step"),
             "bench_grouped_a": ("persistent_fwd_grouped_a",),
             "bench_tf32_on": ("persistent_fwd_tf32", "step_fwd_tf32")}.get(name, ())
    for f in sorted(os.listdir(work)):
        if f.endswith(".cudnn.json") and f[: -len(".cudnn.json")] in stems:
            res["rows"] = len(json.load(open(os.path.join(work, f))).get("rows", []))
    return res


def detail(work, name, status):
    if name in ("cuda_tests", "persistent_tests"):
        r = pytest_result(work, name)
        s = f"{r.get('passed', 0)} passed, {r.get('failed', 0)} failed, {r.get('skipped', 0)} skipped"
        if r.get("from_log"):
            s += " (from the log: no XML)"
        if r.get("timeout_in"):
            s += f"; per-test timeout in {r['timeout_in']}"
        if r.get("failing"):
            s += "; failing: " + ", ".join(r["failing"][:3])
        return r, s
    if name.startswith("sanitizer_"):
        r = sanitizer_result(work, name)
        if "errors" not in r:
            return r, "no sanitizer summary in the log"
        if r.get("tool_error") and not r.get("printed_rnn_ext") and not r.get("printed_elsewhere"):
            s = (f"no error found before the sanitizer itself failed (Internal Sanitizer Error; "
                 f"its summary counts that as {r['errors']})")
        elif "printed_elsewhere" in r and r["printed_elsewhere"]:
            s = (f"{r['errors']} errors: of those printed, {r['printed_rnn_ext']} in rnn_ext's "
                 f"kernels, {r['printed_elsewhere']} elsewhere")
        else:
            s = f"{r['errors']} errors in rnn_ext's kernels"
        if "warnings" in r:
            s += f", {r['warnings']} warnings"
        if r.get("tool_error") and (r.get("printed_rnn_ext") or r.get("printed_elsewhere")):
            s += "; then the sanitizer itself failed (Internal Sanitizer Error)"
        if "cases" in r:
            s += (f"; {r['cases']} cases ({r['persistent_cases']} persistent), "
                  f"{r['cases_failed']} off")
        return r, s
    if name.startswith("bench_"):
        r = bench_result(work, name)
        parts = [f"{k} {v}x" for k, v in r.items() if k.endswith(("_geomean", "_min"))]
        if "rows" in r:
            parts.insert(0, f"{r['rows']} rows")
        if r.get("targets_met"):
            parts.append("targets " + ", ".join(f"{k}={v}" for k, v in r["targets_met"].items()))
        return r, "; ".join(parts) or "no results"
    return {}, ""


def env_facts(work):
    facts = {}
    p = os.path.join(work, "env.log")
    if not os.path.exists(p):
        return facts
    for line in open(p, errors="replace"):
        for key, pat in (("torch", r"^torch (\S+) cuda (\S+) cudnn (\S+)"),
                         ("device", r"^\s+0 (.+) \((\d+), (\d+)\)"),
                         ("commit", r"^repo: .*\((\w+)\)"),
                         ("sms", r"^sms: (\d+)")):
            m = re.match(pat, line)
            if m:
                facts[key] = " ".join(m.groups()) if key != "device" else (
                    f"{m.group(1)} (sm_{m.group(2)}{m.group(3)})")
    return facts


def main(work, summary_txt):
    stages = []
    tsv = os.path.join(work, "stages.tsv")
    if os.path.exists(tsv):
        for line in open(tsv):
            name, status, rc, secs, cap, note = (line.rstrip("\n").split("\t") + [""] * 6)[:6]
            r, d = detail(work, name, status)
            stages.append({"name": name, "status": status, "rc": rc, "seconds": int(secs or 0),
                           "timeout": int(cap or 0), "note": note, "result": r,
                           "detail": "; ".join(x for x in (note, d) if x)})
    meta = {}
    mp = os.path.join(work, "meta.json")
    if os.path.exists(mp):
        meta = json.load(open(mp))
    res = {"meta": meta, "env": env_facts(work), "stages": stages}
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(res, f, indent=1)
    env = res["env"]
    lines = [
        f"gpu_check {meta.get('date', '?')} {'DRY RUN ' if meta.get('dry_run') else ''}"
        f"commit {env.get('commit', meta.get('commit', '?'))}",
        f"device {env.get('device', '?')}, {env.get('sms', '?')} SMs; torch/cuda/cudnn "
        f"{env.get('torch', '?')}",
        f"budget {meta.get('budget_s', '?')} s, used {meta.get('elapsed_s', '?')} s; "
        f"{meta.get('verdict', 'running')}",
        f"{'stage':<20} {'status':<12} {'time':>6} {'timeout':>7}  result",
    ]
    for s in stages:
        lines.append(f"{s['name']:<20} {s['status']:<12} {s['seconds']:>5}s {s['timeout']:>6}s  "
                     f"{s['detail']}")
    lines.append("all logs, JUnit XML and JSON: gpu_check.tar.gz (gpu_check/summary.json, "
                 "gpu_check/<stage>.log)")
    tmp = summary_txt + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, summary_txt)
    return res


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
