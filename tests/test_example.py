"""Smoke test of examples/char_lm.py: a few training steps of both implementations."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "char_lm.py"


def test_char_lm_smoke(tmp_path):
    png = tmp_path / "out" / "loss.png"
    cmd = [sys.executable, str(SCRIPT), "--impl", "both", "--steps", "12", "--batch", "8",
           "--seq", "32", "--hidden", "64", "--threads", "1", "--sample-chars", "30",
           "--out", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # the loss curve: a real PNG
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = json.loads(png.with_suffix(".json").read_text())
    res = metrics["results"]
    assert set(res) == {"rnn_ext", "torch"}
    for name, r in res.items():
        losses = r["losses"]
        assert len(losses) == 12 and all(math.isfinite(x) for x in losses), name
        # starts near the uniform-prediction loss, and goes down
        assert abs(losses[0] - metrics["uniform_loss"]) < 0.5, (name, losses[0])
        assert sum(losses[-3:]) / 3 < losses[0] - 0.3, (name, losses)
        assert r["tokens_per_s"] > 0
    # same init, same batches: the drop-in follows torch.nn.RNN's loss curve
    for a, b in zip(res["rnn_ext"]["losses"], res["torch"]["losses"]):
        assert abs(a - b) < 1e-3

    out = proc.stdout
    assert "tokens/s" in out and "throughput" in out
    assert out.count("--- sample") == 2
    assert "it/s" in proc.stderr or "s/it" in proc.stderr  # the tqdm progress bar


def test_dp_train_smoke(tmp_path):
    """examples/dp_train.py: DP-SGD with Opacus on rnn_ext.RNN for two small epochs."""
    import pytest
    pytest.importorskip("opacus")
    script = SCRIPT.parent / "dp_train.py"
    png = tmp_path / "dp.png"
    cmd = [sys.executable, str(script), "--epochs", "2", "--train", "512", "--test", "256",
           "--batch", "32", "--hidden", "32", "--threads", "1", "--out", str(png)]
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}  # this checkout's rnn_ext
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads(png.with_suffix(".json").read_text())
    assert len(m["losses"]) > 10 and all(math.isfinite(v) for v in m["losses"])
    eps = m["epsilon"]
    assert eps[0] > 0 and all(b >= a for a, b in zip(eps, eps[1:]))  # budget spent grows
    assert "epsilon" in proc.stdout and ("it/s" in proc.stderr or "s/it" in proc.stderr)
