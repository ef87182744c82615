"""bench/gpu_check.sh's control flow, on the CPU (GPU_CHECK_DRY_RUN=1: every stage is a stub that
prints its command line): two files come back (the archive and the summary), the stages run in
order of value, a stage that hangs or the script being stopped still leaves both files, a hung
persistent stage turns the later stages to the step kernels, and the summary reads real pytest,
JUnit and compute-sanitizer output."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STAGES = ["env", "build", "cuda_tests", "persistent_tests", "sanitizer_memcheck",
          "sanitizer_racecheck", "sanitizer_synccheck", "sanitizer_initcheck", "bench_default",
          "bench_tf32_off", "issue5_summary", "bench_row_split", "row_split_compare", "bench_grouped_a",
          "grouped_a_compare", "bench_crossover", "bench_tf32_on"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None
                                or shutil.which("timeout") is None,
                                reason="needs bash, tar and coreutils' timeout")


def _env(out, **kw):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, OUT=str(out))
    for k in ("GPU_CHECK_DRY_HANG", "GPU_CHECK_DRY_FAIL", "GPU_CHECK_DRY_TIMEOUT_S",
              "GPU_CHECK_BUDGET_S"):
        env.pop(k, None)
    env.update(kw)
    return env


def _run(out, **kw):
    return subprocess.run(["bash", str(SCRIPT)], env=_env(out, **kw), capture_output=True,
                          text=True, timeout=120, cwd=str(out.parent))


def _results(out):
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "gpu_check_summary.txt"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
        summary = json.load(tar.extractfile("gpu_check/summary.json"))
        logs = {Path(n).stem: tar.extractfile(n).read().decode()
                for n in names if n.endswith(".log")}
    text = (out / "gpu_check_summary.txt").read_text()
    stages = {s["name"]: s for s in summary["stages"]}
    return names, summary, stages, logs, text


def test_dry_run_two_files_stages_in_order(tmp_path):
    out = tmp_path / "out"
    res = _run(out)
    assert res.returncode == 0, res.stdout + res.stderr
    names, summary, stages, logs, text = _results(out)
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert summary["meta"]["dry_run"] is True
    assert summary["meta"]["verdict"].startswith("PASS")
    # every stage that ran has its log in the archive, and its command in it
    for name in STAGES:
        if name not in ("issue5_summary", "row_split_compare", "grouped_a_compare"):
            assert stages[name]["status"] == "ok", stages[name]
            assert f"DRY RUN stub for stage {name}:" in logs[name]
    assert stages["issue5_summary"]["status"] == "skipped"  # the stubbed bench writes no JSON
    assert stages["row_split_compare"]["status"] == "skipped"
    assert stages["grouped_a_compare"]["status"] == "skipped"
    assert "RNN_EXT_CUDA_MMA_GROUPED_A=1" in logs["bench_grouped_a"]
    assert "RNN_EXT_CUDA_ROW_SPLIT=8" in logs["bench_row_split"]
    assert "RNN_EXT_CUDA_ROW_SPLIT" not in logs["bench_tf32_off"]
    # the crossover stage runs both kernels, one after the other
    assert "--name crossover_persistent" in logs["bench_crossover"]
    assert "gpu_check/cuda_tests.xml" in names and "gpu_check/meta.json" in names
    # the summary file: one line per stage, in order, with the parsed results
    rows = [line.split()[0] for line in text.splitlines()[4:4 + len(STAGES)]]
    assert rows == STAGES
    assert "1 passed, 0 failed, 1 skipped" in text  # from the stub's JUnit XML
    assert "0 errors in rnn_ext's kernels" in text
    # what the GPU stages would run: -m cuda only, per-test timeouts, the sanitizer's filter
    assert " -m cuda " in logs["cuda_tests"] and "-k not persistent" in logs["cuda_tests"]
    assert "--timeout=" in logs["persistent_tests"] and "persistent and" in logs["persistent_tests"]
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        log = logs[f"sanitizer_{tool}"]
        assert f"--tool {tool}" in log
        # initcheck instruments every kernel (it cannot see writes by the others)
        assert ("--kernel-name kns=rnn_ext" in log) == (tool != "initcheck")
        assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in log and "sanitizer_workload.py" in log
        assert "--no-persistent" not in log
    # the dtypes each tool can check (racecheck fails by itself on bf16, initcheck misses
    # cuBLAS's half-precision writes)
    assert "--dtypes float32,float16" in logs["sanitizer_racecheck"]
    assert "--dtypes float32" in logs["sanitizer_initcheck"]
    assert "--dtypes" not in logs["sanitizer_memcheck"] + logs["sanitizer_synccheck"]
    assert "RNN_EXT_CUDA_KERNEL=persistent" in logs["bench_tf32_off"]
    assert "--tf32 off" in logs["bench_tf32_off"] and "--tf32 on" in logs["bench_tf32_on"]
    # issue 5's targets are judged on what users get: the default kernel choice
    assert "RNN_EXT_CUDA_KERNEL=auto" in logs["bench_default"]
    assert "--name default_fwd" in logs["bench_default"] and "--tf32 off" in logs["bench_default"]


def test_hung_persistent_stage_still_yields_results_and_skips_persistent(tmp_path):
    out = tmp_path / "out"
    t = time.monotonic()
    res = _run(out, GPU_CHECK_DRY_HANG="persistent_tests", GPU_CHECK_DRY_TIMEOUT_S="2")
    assert time.monotonic() - t < 60
    assert res.returncode == 0, res.stdout + res.stderr  # not gating
    _, summary, stages, logs, text = _results(out)
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert stages["persistent_tests"]["status"] == "timeout"
    assert "hanging" in logs["persistent_tests"]
    assert summary["meta"]["persistent_hung"] == 1
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        assert "--no-persistent" in logs[f"sanitizer_{tool}"]
        assert "step kernels only" in stages[f"sanitizer_{tool}"]["detail"]
    assert "RNN_EXT_CUDA_KERNEL=step" in logs["bench_tf32_off"]
    assert stages["bench_default"]["status"] == "skipped"  # "auto" would run persistent kernels
    assert stages["bench_row_split"]["status"] == "skipped"
    assert stages["bench_crossover"]["status"] == "skipped"
    assert "persistent_tests     timeout" in text


def test_failed_gating_stage_and_exhausted_budget(tmp_path):
    out = tmp_path / "out"
    # the first stage hangs and uses up the whole budget: every later stage is skipped
    res = _run(out, GPU_CHECK_DRY_HANG="env", GPU_CHECK_BUDGET_S="3")
    assert res.returncode == 1  # no build, no cuda tests: the check fails
    _, summary, stages, _, text = _results(out)
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert stages["env"]["status"] == "timeout" and stages["env"]["timeout"] == 3
    assert summary["meta"]["verdict"].startswith("FAIL")
    assert all(stages[s]["status"] == "skipped" for s in STAGES[1:]), text
    res = _run(tmp_path / "out2", GPU_CHECK_DRY_FAIL="build")
    assert res.returncode == 1
    _, _, stages, _, _ = _results(tmp_path / "out2")
    assert stages["build"]["status"] == "failed"
    assert all(stages[s]["status"] == "skipped" for s in STAGES[2:])


def test_stopped_by_a_signal_still_yields_results(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=_env(out, GPU_CHECK_DRY_HANG="cuda_tests"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the summary is rewritten after every stage
            p = out / "gpu_check_summary.txt"
            if p.exists() and "\nbuild " in p.read_text():
                break
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "stopped by a signal during cuda_tests" in stdout
    _, summary, stages, logs, _ = _results(out)
    assert summary["meta"]["verdict"] == "interrupted"
    assert stages["cuda_tests"]["status"] == "interrupted"
    assert "hanging" in logs["cuda_tests"]  # the stopped stage's log is in the archive


def test_summary_reads_real_outputs(tmp_path):
    """pytest -v output cut by pytest-timeout (no XML), a racecheck summary, the workload's
    lines: the figures the summary reports come from them."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check_summary as gs
    finally:
        sys.path.pop(0)
    w = tmp_path
    (w / "stages.tsv").write_text("persistent_tests\ttimeout\t124\t150\t150\t\n"
                                  "sanitizer_racecheck\tfailed\t99\t40\t75\t\n")
    (w / "persistent_tests.log").write_text(
        "tests/test_cuda_persistent.py::test_a PASSED                     [  1%]\n"
        "tests/test_cuda_persistent.py::test_b[x-1] FAILED                [  2%]\n"
        "tests/test_cuda_persistent.py::test_c SKIPPED (no)               [  3%]\n"
        "tests/test_cuda_persistent.py::test_d[B8-H1024-bi] \n"
        "+++++++++++++++++++++++++++++++++++ Timeout ++++++++++++++++++++++++++++++++++++\n"
        "~~~~~~~~~~~~~~~~~~~~~~~~~ Stack of MainThread (140) ~~~~~~~~~~~~~~~~~~~~~~~~~~~\n")
    (w / "sanitizer_racecheck.log").write_text(
        "persistent float32 T5 B3 I24 H64 L3 uni: cuda_kernel_used forward=persistent "
        "backward=persistent, variant forward=fma backward=fma, wavefront 3, max rel err "
        "1.00e-06 ok\n"
        "step float32 T5 B3 I24 H40 L2 bi: cuda_kernel_used forward=step backward=step, variant "
        "forward=none backward=none, wavefront 0, max rel err 1.00e-06 FAIL\n"
        "========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warning)\n")
    res = gs.main(str(w), str(w / "s.txt"))
    pt, rc = res["stages"]
    assert pt["result"]["passed"] == 1 and pt["result"]["failed"] == 1
    assert pt["result"]["skipped"] == 1 and pt["result"]["from_log"]
    assert pt["result"]["timeout_in"] == "tests/test_cuda_persistent.py::test_d[B8-H1024-bi]"
    assert rc["result"] == {"errors": 2, "warnings": 1, "cases": 2, "cases_failed": 1,
                            "persistent_cases": 1}
    text = (w / "s.txt").read_text()
    assert "per-test timeout in tests/test_cuda_persistent.py::test_d[B8-H1024-bi]" in text
    assert "2 errors in rnn_ext's kernels, 1 warnings; 2 cases (1 persistent), 1 off" in text


def test_ab_compare_pairs_rows(tmp_path):
    """bench/ab_compare.py (run on the GPU after bench_row_split): pairs two runs' rows by
    point and reports B / A per point, their geomean and cuDNN's drift."""
    def rows(scale_ext, scale_cudnn):
        return {"rows": [dict(mode=m, dtype="bfloat16", T=512, B=B, I=H, H=H, L=2,
                              rnn_ext_ms=scale_ext * B * H / 1e4, cudnn_ms=scale_cudnn * H / 100)
                         for m in ("fwd", "train") for B in (32, 128) for H in (512, 1024)]}
    (tmp_path / "persistent_fwd.cudnn.json").write_text(json.dumps(rows(1.0, 1.0)))
    other = rows(1.25, 1.1)
    other["rows"] = other["rows"][1:]  # a point missing from one run is left out
    (tmp_path / "persistent_fwd_row_split.cudnn.json").write_text(json.dumps(other))
    res = subprocess.run([sys.executable, str(REPO / "bench" / "ab_compare.py"), str(tmp_path),
                          "persistent_fwd", "persistent_fwd_row_split"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "persistent_fwd_row_split_compare.json").read_text())
    assert len(out["rows"]) == 7
    assert all(abs(r["b_over_a"] - 1.25) < 1e-12 and abs(r["cudnn_drift"] - 1.1) < 1e-12
               for r in out["rows"])
    assert abs(out["geomean_b_over_a"] - 1.25) < 1e-12
    assert "B/A 1.250" in res.stdout


def test_sanitizer_crash_runs_the_remaining_cases(tmp_path):
    """A sanitizer's process that dies in case K (racecheck's "failed to handle a hardware
    exception" on the first GPU run) leaves the cases after K unchecked: they run once more
    (--from K+1) as sanitizer_TOOL_rest, and the persistent stages go on."""
    out = tmp_path / "out"
    res = _run(out, GPU_CHECK_DRY_FAIL="sanitizer_racecheck")
    assert res.returncode == 0, res.stdout + res.stderr  # not gating
    _, summary, stages, logs, text = _results(out)
    names = [s["name"] for s in summary["stages"]]
    i = names.index("sanitizer_racecheck")
    assert names[i + 1] == "sanitizer_racecheck_rest", names
    assert stages["sanitizer_racecheck"]["status"] == "failed"
    assert stages["sanitizer_racecheck_rest"]["status"] == "ok"
    assert "--from 2" in logs["sanitizer_racecheck_rest"]
    assert "--from" not in logs["sanitizer_racecheck"]
    assert "CUDA_LAUNCH_BLOCKING=1" in logs["sanitizer_racecheck_rest"]
    assert "process died in case 1" in stages["sanitizer_racecheck_rest"]["detail"]
    assert summary["meta"]["persistent_hung"] == 0
    assert "RNN_EXT_CUDA_KERNEL=persistent" in logs["bench_tf32_off"]
    assert "sanitizer_memcheck_rest" not in names
