"""Issue 5's targets from a gpu_check run: reads OUTDIR/RUN.cudnn.json (rnn_ext and cuDNN on
issue 5's grid; RUN: default_fwd = the default kernel choice, persistent_fwd = the persistent
kernels, the default RUN) and the grid-barrier cost printed in OUTDIR/persistent_tests.log,
writes OUTDIR/issue5_summary.json and prints it.

    python bench/issue5_summary.py OUTDIR [RUN]

Targets (issue 5): forward geomean speedup over cuDNN >= 2, training >= 1.5, no point below
0.9; per layer-step time (forward, B <= 32) within 2x of the grid barrier's own cost."""
from __future__ import annotations

import json
import math
import os
import re
import sys


def main(out_dir: str, run_name: str = "persistent_fwd") -> dict:
    with open(os.path.join(out_dir, f"{run_name}.cudnn.json")) as f:
        run = json.load(f)
    rows = run["rows"]
    res = {"device": run.get("device"), "torch": run.get("torch"), "cudnn": run.get("cudnn"),
           "run": run_name, "modes": {}}
    for mode in ("fwd", "train"):
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        sp = [r["cudnn_ms"] / r["rnn_ext_ms"] for r in rs]
        worst = min(zip(sp, rs), key=lambda p: p[0])
        res["modes"][mode] = {
            "points": len(rs),
            "geomean_speedup": math.exp(sum(math.log(s) for s in sp) / len(sp)),
            "min_speedup": worst[0],
            "min_point": {k: worst[1][k] for k in ("dtype", "T", "B", "I", "H", "L")},
        }
    barrier = {}
    log = os.path.join(out_dir, "persistent_tests.log")
    if os.path.exists(log):
        for m in re.finditer(r"grid barrier: (\d+) blocks x 256 threads: ([\d.]+) us", open(log).read()):
            barrier[int(m.group(1))] = float(m.group(2))
    res["grid_barrier_us"] = barrier
    if barrier:
        worst_barrier = max(barrier.values())  # the most blocks measured: closest to the kernel's
        steps = []
        for r in rows:
            if r["mode"] == "fwd" and r["B"] <= 32:
                per_step_us = 1000.0 * r["rnn_ext_ms"] / (r["T"] * r["L"])
                steps.append({"dtype": r["dtype"], "B": r["B"], "H": r["H"],
                              "layer_step_us": per_step_us,
                              "ratio_to_barrier": per_step_us / worst_barrier})
        res["layer_steps"] = steps
        res["max_ratio_to_barrier"] = max((s["ratio_to_barrier"] for s in steps), default=None)
    fwd, train = res["modes"].get("fwd"), res["modes"].get("train")
    res["targets_met"] = {
        "fwd_geomean_ge_2": bool(fwd and fwd["geomean_speedup"] >= 2),
        "train_geomean_ge_1.5": bool(train and train["geomean_speedup"] >= 1.5),
        "no_point_below_0.9": bool(fwd and train and min(fwd["min_speedup"],
                                                         train["min_speedup"]) >= 0.9),
        "layer_step_within_2x_barrier": bool(res.get("max_ratio_to_barrier") is not None
                                             and res["max_ratio_to_barrier"] <= 2),
    }
    with open(os.path.join(out_dir, "issue5_summary.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(*sys.argv[1:])
