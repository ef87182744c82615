"""Smoke test of examples/char_lm.py: a few training steps of both implementations."""
from __future__ import annotations

import json
import math
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
