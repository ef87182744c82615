"""The tensor-core persistent kernels' two A-fragment loads measured against each other on a
GPU (issue 13): reads OUTDIR/persistent_fwd.cudnn.json (the default 8-byte loads, bench_tf32_off)
and OUTDIR/persistent_fwd_narrow_a.cudnn.json (RNN_EXT_CUDA_MMA_NARROW_A=1: the mma layout's
4-byte loads, bench_narrow_a), pairs their rows, writes OUTDIR/narrow_a_compare.json and prints
one line per point: rnn_ext's time with each, their ratio, and cuDNN's ratio between the two
runs (the drift between the two processes, to judge the first ratio by).

    python bench/narrow_a_compare.py OUTDIR"""
from __future__ import annotations

import json
import math
import os
import sys

KEY = ("mode", "dtype", "T", "B", "I", "H", "L")


def main(out_dir: str) -> dict:
    runs = []
    for name in ("persistent_fwd", "persistent_fwd_narrow_a"):
        with open(os.path.join(out_dir, name + ".cudnn.json")) as f:
            runs.append({tuple(r[k] for k in KEY): r for r in json.load(f)["rows"]})
    wide, narrow = runs
    rows = []
    for key in sorted(set(wide) & set(narrow), key=str):
        w, n = wide[key], narrow[key]
        rows.append(dict(zip(KEY, key), wide_ms=w["rnn_ext_ms"], narrow_ms=n["rnn_ext_ms"],
                         narrow_over_wide=n["rnn_ext_ms"] / w["rnn_ext_ms"],
                         cudnn_drift=n["cudnn_ms"] / w["cudnn_ms"]))
    res = {"rows": rows}
    if rows:
        res["geomean_narrow_over_wide"] = math.exp(
            sum(math.log(r["narrow_over_wide"]) for r in rows) / len(rows))
    with open(os.path.join(out_dir, "narrow_a_compare.json"), "w") as f:
        json.dump(res, f, indent=1)
    for r in rows:
        print(f"{r['mode']:5} {r['dtype']:8} B={r['B']:<4} H={r['H']:<5} 8-byte {r['wide_ms']:.3f} ms"
              f"  4-byte {r['narrow_ms']:.3f} ms  4-byte/8-byte {r['narrow_over_wide']:.3f}"
              f"  (cuDNN drift {r['cudnn_drift']:.3f})")
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    return res


if __name__ == "__main__":
    main(sys.argv[1])
