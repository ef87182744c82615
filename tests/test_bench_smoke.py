"""Smoke test of the benchmark suite (bench/bench.py): it runs on a tiny grid and writes its
JSON and plots.  Benchmarks are not tests: no timing is asserted here."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench", "bench.py")

pytest.importorskip("matplotlib")


def test_bench_smoke(tmp_path):
    # compiled_reference with a tiny compile budget: exercises the "skip, record, go on" path
    # without paying for a torch.compile in the test suite.
    cmd = [
        sys.executable, BENCH, "--device", "cpu", "--grid", "5,4,1,3,2;6,2,4,8,1",
        "--modes", "fwd,train", "--repeats", "3", "--warmup", "1", "--min-sample-ms", "1",
        "--compile-timeout", "0.001", "--floor-size", "256", "--no-progress",
        "--out", str(tmp_path), "--name", "smoke",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "geomean speedup" in proc.stdout

    with open(tmp_path / "smoke.json") as f:
        res = json.load(f)
    for key in ("date", "command", "machine", "config", "floor", "rows", "summary"):
        assert key in res
    m = res["machine"]
    for key in ("hostname", "cpu_model", "logical_cores", "torch", "torch_threads"):
        assert key in m
    assert res["floor"]["start"]["float32"]["gflops"] > 0

    rows = res["rows"]
    assert len(rows) == 4  # 2 points x 1 dtype x 2 modes
    assert {(r["mode"], r["T"], r["B"], r["I"], r["H"], r["L"]) for r in rows} == {
        (mode, *p) for mode in ("fwd", "train") for p in ((5, 4, 1, 3, 2), (6, 2, 4, 8, 1))
    }
    for r in rows:
        assert r["dtype"] == "float32"
        for key in ("rnn_ext_ms", "torch_ms", "speedup_vs_torch", "rnn_ext_gflops",
                    "floor_ms", "frac_of_floor", "flops"):
            assert isinstance(r[key], float) or isinstance(r[key], int), key
            assert r[key] > 0, key
        for c in ("rnn_ext", "torch"):
            e = r["contenders"][c]
            assert e["min_ms"] <= e["median_ms"] <= e["max_ms"]
            assert len(e["samples_ms"]) == 3
        assert r["contenders"]["rnn_ext"]["max_abs_diff_vs_torch"] < 1e-4
        comp = r["contenders"]["compiled_reference"]
        assert "skipped" in comp  # the compile could not finish in 1 ms
        assert r["compiled_reference_ms"] is None
    fwd_flops = {(r["T"], r["B"]): r["flops"] for r in rows if r["mode"] == "fwd"}
    assert fwd_flops[(5, 4)] == 2 * 5 * 4 * ((1 + 3) * 3 + (3 + 3) * 3)
    assert {"fwd", "train"} <= set(res["summary"])

    for name in ("smoke_speedup_vs_B.png", "smoke_speedup_vs_H.png"):
        p = tmp_path / name
        assert p.exists() and p.stat().st_size > 1000
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_issue5_summary_from_a_gpu_check_run(tmp_path):
    """bench/issue5_summary.py turns a gpu_check run's issue-5 JSON and barrier log into the
    issue's target checks (here on made-up numbers)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "issue5_summary", os.path.join(os.path.dirname(__file__), "..", "bench", "issue5_summary.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = []
    for B, fwd_x, train_x in ((1, 3.0, 2.0), (8, 2.5, 1.8), (128, 1.2, 0.85)):
        for mode, x in (("fwd", fwd_x), ("train", train_x)):
            rows.append(dict(mode=mode, dtype="bfloat16", T=512, B=B, I=256, H=256, L=2,
                             rnn_ext_ms=1.0, cudnn_ms=x))
    (tmp_path / "persistent_fwd.cudnn.json").write_text(json.dumps(
        dict(device="NVIDIA H100", torch="2.11", cudnn=91000, rows=rows)))
    (tmp_path / "persistent_tests.log").write_text(
        "grid barrier: 32 blocks x 256 threads: 0.80 us per grid.sync()\n"
        "grid barrier: 264 blocks x 256 threads: 1.25 us per grid.sync()\n")
    res = mod.main(str(tmp_path))
    fwd, train = res["modes"]["fwd"], res["modes"]["train"]
    assert abs(fwd["geomean_speedup"] - (3.0 * 2.5 * 1.2) ** (1 / 3)) < 1e-9
    assert train["min_speedup"] == 0.85 and train["min_point"]["B"] == 128
    assert res["grid_barrier_us"] == {32: 0.8, 264: 1.25}
    # 1 ms over 512 * 2 layer-steps = 0.977 us per layer-step, vs the 1.25 us barrier
    assert abs(res["max_ratio_to_barrier"] - 1000.0 / 1024 / 1.25) < 1e-9
    # fwd geomean (3 * 2.5 * 1.2) ** (1/3) = 2.08; train (2 * 1.8 * 0.85) ** (1/3) = 1.45
    assert res["targets_met"] == {"fwd_geomean_ge_2": True, "train_geomean_ge_1.5": False,
                                  "no_point_below_0.9": False,
                                  "layer_step_within_2x_barrier": True}
    assert json.loads((tmp_path / "issue5_summary.json").read_text()) == json.loads(
        json.dumps(res))


def test_jvp_bench_smoke(tmp_path):
    """bench/jvp.py (forward-mode AD timing) runs on a tiny grid and writes its JSON."""
    cmd = [sys.executable, os.path.join(REPO, "bench", "jvp.py"), "--grid", "3,2,2,3,2",
           "--tangents", "all", "--repeats", "1", "--min-sample-ms", "1", "--out", str(tmp_path),
           "--name", "jvp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "jvp.json") as f:
        res = json.load(f)
    for key in ("date", "command", "machine", "config", "rows"):
        assert key in res
    (row,) = res["rows"]
    assert set(row["median_ms"]) == {"fwd", "jvp", "jvp_ref", "torch_jvp"}
    assert row["max_abs_diff_vs_torch"] < 1e-4  # the contenders computed the same tangents


def test_dp_bench_smoke(tmp_path):
    """bench/dp.py (DP training step: rnn_ext's per-sample paths against Opacus' DPRNN) runs
    its quick grid and writes its JSON and plot; the Opacus and vmap paths agree."""
    pytest.importorskip("opacus")
    out = tmp_path / "dp"
    cmd = [sys.executable, os.path.join(REPO, "bench", "dp.py"), "--quick", "--reps", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(str(out) + ".json") as f:
        res = json.load(f)
    assert res["complete"] and res["config"]["warm"] == 2 and res["config"]["block"] == 5
    contenders = {"plain", "ours_ctx", "ours_opacus", "ours_vmap", "dprnn"}
    kinds = contenders | {"frozen_plain", "frozen_opacus"}
    assert set(res["config"]["kinds"]) == kinds
    for row in res["rows"]:
        assert set(row["ms"]) == kinds and all(v > 0 for v in row["ms"].values())
        assert row["max_abs_diff_opacus_vs_vmap"] < 1e-5
        own = row["ms"]["frozen_opacus"] - row["ms"]["frozen_plain"]
        assert row["opacus_own_ms"] == pytest.approx(own)
        assert row["ratio_to_plain_net_of_opacus_own"] == pytest.approx(
            (row["ms"]["ours_opacus"] - own) / row["ms"]["plain"])
        assert set(row["speedup_vs_dprnn"]) == contenders - {"dprnn"}
    assert set(res["summary"]) == {f"geomean_speedup_vs_dprnn_{k}"
                                   for k in contenders - {"dprnn"}}
    assert os.path.getsize(str(out) + ".png") > 0
