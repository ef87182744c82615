"""Two gpu_check benchmark runs of the same grid measured against each other (an A/B of one
kernel change on a GPU): reads OUTDIR/A.cudnn.json and OUTDIR/B.cudnn.json, pairs their rows,
writes OUTDIR/B_compare.json and prints one line per point: rnn_ext's time in each run, their
ratio B / A, and cuDNN's ratio between the two runs (the drift between the two processes, to
judge the first ratio by).

    python bench/ab_compare.py OUTDIR A B

gpu_check.sh: A = persistent_fwd (bench_tf32_off), B = persistent_fwd_row_split
(bench_row_split: RNN_EXT_CUDA_ROW_SPLIT=8, P5).  Earlier, B = persistent_fwd_narrow_a
(RNN_EXT_CUDA_MMA_NARROW_A=1; measured 2026-11-30: bench/results/gpu-2026-11-30/)."""
from __future__ import annotations

import json
import math
import os
import sys

KEY = ("mode", "dtype", "T", "B", "I", "H", "L")


def main(out_dir: str, a_name: str, b_name: str) -> dict:
    runs = []
    for name in (a_name, b_name):
        with open(os.path.join(out_dir, name + ".cudnn.json")) as f:
            runs.append({tuple(r[k] for k in KEY): r for r in json.load(f)["rows"]})
    a, b = runs
    rows = []
    for key in sorted(set(a) & set(b), key=str):
        ra, rb = a[key], b[key]
        rows.append(dict(zip(KEY, key), a_ms=ra["rnn_ext_ms"], b_ms=rb["rnn_ext_ms"],
                         b_over_a=rb["rnn_ext_ms"] / ra["rnn_ext_ms"],
                         cudnn_drift=rb["cudnn_ms"] / ra["cudnn_ms"]))
    res = {"a": a_name, "b": b_name, "rows": rows}
    if rows:
        res["geomean_b_over_a"] = math.exp(sum(math.log(r["b_over_a"]) for r in rows) / len(rows))
    with open(os.path.join(out_dir, b_name + "_compare.json"), "w") as f:
        json.dump(res, f, indent=1)
    for r in rows:
        print(f"{r['mode']:5} {r['dtype']:8} B={r['B']:<4} H={r['H']:<5} A {r['a_ms']:.3f} ms"
              f"  B {r['b_ms']:.3f} ms  B/A {r['b_over_a']:.3f}"
              f"  (cuDNN drift {r['cudnn_drift']:.3f})")
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    return res


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(*sys.argv[1:])
