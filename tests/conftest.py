"""Shared helpers for the rnn_ext test suite.

The pattern used throughout: build a ``torch.nn.RNN`` and an ``rnn_ext.RNN`` with the same
configuration and identical weights, run both on the same inputs, then backpropagate the same
random cotangents through ``output`` and ``h_n`` and compare outputs, ``h_n`` and every gradient
(input, hx, each parameter).
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import textwrap

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import rnn_ext

# Tolerances per dtype for comparisons against torch.nn.RNN / rnn_ext.reference.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    # Half precision: both implementations round at different places (torch.nn.RNN on CPU
    # computes in the low precision dtype, rnn_ext accumulates in float32), so compare within a
    # few units of the dtype's rounding for O(1) values.
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so the suite is deterministic."""
    torch.manual_seed(0)
    random.seed(0)
    yield


def make_pair(*args, dtype=torch.float32, seed=0, **kwargs):
    """(torch.nn.RNN, rnn_ext.RNN) with the same configuration and identical weights (copied
    from the torch module through its state_dict)."""
    torch.manual_seed(seed)
    ref = torch.nn.RNN(*args, dtype=dtype, **kwargs)
    ext = rnn_ext.RNN(*args, dtype=dtype, **kwargs)
    ext.load_state_dict(ref.state_dict())
    return ref, ext


def clone_input(x):
    """A fresh leaf copy of a tensor (or the data of a PackedSequence) keeping requires_grad."""
    if x is None:
        return None
    if isinstance(x, PackedSequence):
        data = x.data.detach().clone().requires_grad_(x.data.requires_grad)
        return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    return x.detach().clone().requires_grad_(x.requires_grad)


def _data(x):
    return x.data if isinstance(x, PackedSequence) else x


def forward_backward(module, x, hx=None, *, cot_seed=1, backward=True, cot_round=None):
    """Runs ``module(x, hx)`` and, if asked, backpropagates fixed random cotangents through
    output and h_n.  Returns (output tensor, h_n, dict of gradients) where the dict has 'input',
    'hx' and every parameter name (None when no gradient was formed).  cot_round: a dtype the
    cotangents are rounded through (so that a float64 run sees a half-precision run's)."""
    x = clone_input(x)
    hx = clone_input(hx)
    for p in module.parameters():
        p.grad = None
    out, hn = module(x) if hx is None else module(x, hx)
    out_t = _data(out)
    grads = {}
    if backward:
        g = torch.Generator().manual_seed(cot_seed)
        go = torch.randn(out_t.shape, generator=g, dtype=torch.float64)
        gh = torch.randn(hn.shape, generator=g, dtype=torch.float64)
        if cot_round is not None:
            go, gh = go.to(cot_round), gh.to(cot_round)
        go, gh = go.to(out_t.dtype), gh.to(hn.dtype)
        torch.autograd.backward([out_t, hn], [go, gh])
        grads["input"] = None if _data(x).grad is None else _data(x).grad.clone()
        grads["hx"] = None if hx is None or hx.grad is None else hx.grad.clone()
        for name, p in module.named_parameters():
            grads[name] = None if p.grad is None else p.grad.clone()
    return out, hn, grads


def assert_same_results(a, b, *, dtype, tol=None, msg=""):
    """Compare two results of forward_backward (output, h_n, grads)."""
    tol = tol or TOL[dtype]
    out_a, hn_a, g_a = a
    out_b, hn_b, g_b = b
    assert type(out_a) is type(out_b), msg
    if isinstance(out_a, PackedSequence):
        assert torch.equal(out_a.batch_sizes, out_b.batch_sizes)
    oa, ob = _data(out_a), _data(out_b)
    assert oa.shape == ob.shape and oa.dtype == ob.dtype, msg
    assert hn_a.shape == hn_b.shape and hn_a.dtype == hn_b.dtype, msg
    torch.testing.assert_close(oa, ob, **tol, msg=lambda m: f"output {msg}: {m}")
    torch.testing.assert_close(hn_a, hn_b, **tol, msg=lambda m: f"h_n {msg}: {m}")
    assert g_a.keys() == g_b.keys(), msg
    for k in g_a:
        if g_a[k] is None or g_b[k] is None:
            assert g_a[k] is None and g_b[k] is None, f"grad {k} missing on one side {msg}"
            continue
        assert g_a[k].dtype == g_b[k].dtype, f"grad {k} dtype {msg}"
        torch.testing.assert_close(g_a[k], g_b[k], **tol, msg=lambda m: f"grad {k} {msg}: {m}")


def assert_matches_torch(ref, ext, x, hx=None, *, dtype, tol=None, backward=True, msg=""):
    """rnn_ext.RNN vs torch.nn.RNN (identical weights) on the same input: outputs, h_n and all
    gradients."""
    a = forward_backward(ref, x, hx, backward=backward)
    b = forward_backward(ext, x, hx, backward=backward)
    assert_same_results(a, b, dtype=dtype, tol=tol, msg=msg)
    return a, b


def assert_as_accurate_as_torch(got, theirs, truth, *, dtype, factor=2.0, floor_eps=1.0,
                                names=None):
    """Half precision, judged as the README states it: against the float64 truth (the exact
    result for the same rounded inputs and weights), rnn_ext's error is at most ``factor``
    times torch.nn.RNN's own error in the same dtype, plus ``floor_eps`` units of the dtype's
    rounding at the tensor's scale (both round their results to the dtype; gradients are sums
    of products of saved, rounded activations, where both carry a few units).  got, theirs,
    truth: parallel sequences of tensors (None where both have none)."""
    eps = torch.finfo(dtype).eps
    names = names or [str(i) for i in range(len(truth))]
    assert len(got) == len(theirs) == len(truth) == len(names)
    for name, g, t, w in zip(names, got, theirs, truth):
        if w is None:
            assert g is None and t is None, name
            continue
        w = w.detach().double()
        err = float((g.detach().double() - w).abs().max())
        err_torch = float((t.detach().double() - w).abs().max())
        floor = floor_eps * eps * max(float(w.abs().max()), 1e-3)
        assert err <= factor * err_torch + floor, (
            f"{name}: rnn_ext's error {err:.3g} > {factor} x torch's {err_torch:.3g} "
            f"+ {floor:.3g} ({dtype})")


class ReferenceModule(torch.nn.Module):
    """Wraps rnn_ext.reference.module_forward so it can go through forward_backward: it uses the
    Parameter objects of the wrapped module."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def named_parameters(self, *a, **k):  # same names as the wrapped module
        return self.m.named_parameters(*a, **k)

    def parameters(self, *a, **k):
        return self.m.parameters(*a, **k)

    def forward(self, x, hx=None):
        return rnn_ext.reference.module_forward(self.m, x, hx)


def deepcopy_module(m):
    return copy.deepcopy(m)


def random_configs(n, seed, *, layers=(1, 2, 3)):
    """A seeded random sample of the full option grid."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(
            dict(
                num_layers=rng.choice(layers),
                bidirectional=rng.choice([False, True]),
                nonlinearity=rng.choice(["tanh", "relu"]),
                bias=rng.choice([False, True]),
                batch_first=rng.choice([False, True]),
                with_hx=rng.choice([False, True]),
                input_size=rng.choice([1, 2, 3, 5, 7]),
                hidden_size=rng.choice([1, 2, 3, 4, 6]),
                seq_len=rng.choice([1, 2, 3, 5, 8]),
                batch=rng.choice([1, 2, 3, 5]),
            )
        )
    return out


def config_id(c):
    return (
        f"L{c['num_layers']}-{'bi' if c['bidirectional'] else 'uni'}-{c['nonlinearity']}"
        f"-{'b' if c['bias'] else 'nob'}-{'bf' if c['batch_first'] else 'sf'}"
        f"-{'hx' if c['with_hx'] else 'nohx'}-I{c['input_size']}H{c['hidden_size']}"
        f"T{c['seq_len']}B{c['batch']}"
    )


def build_case(c, dtype, *, seed=0):
    """(ref module, ext module, input, hx) for one config from random_configs."""
    ref, ext = make_pair(
        c["input_size"], c["hidden_size"], num_layers=c["num_layers"],
        nonlinearity=c["nonlinearity"], bias=c["bias"], batch_first=c["batch_first"],
        bidirectional=c["bidirectional"], dtype=dtype, seed=seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    T, B = c["seq_len"], c["batch"]
    shape = (B, T, c["input_size"]) if c["batch_first"] else (T, B, c["input_size"])
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    hx = None
    if c["with_hx"]:
        D = 2 if c["bidirectional"] else 1
        hx = torch.randn(
            (c["num_layers"] * D, B, c["hidden_size"]), generator=g, dtype=torch.float64
        ).to(dtype).requires_grad_()
    return ref, ext, x, hx


# --------------------------------------------------------------------------------------------
# No silent skips (issue 15)
# --------------------------------------------------------------------------------------------
# Skips that mean "this machine could not check", turned into failures where they must not
# happen:
#  * under CI=true, the CUDA emulation (tests/test_cuda_emulated.py) without g++ or the CUDA
#    toolkit's headers: it is CI's only run of the CUDA kernels' code;
#  * on a machine with a GPU (torch.cuda.is_available()), any test skipped for want of a CUDA
#    build of rnn_ext: the build silently fell back to CPU-only (e.g. CUDA_HOME missing).
# RNN_EXT_CI_ALLOW_SKIPS=emulation (comma-separated) turns the first back into a skip, for a CI
# machine known to lack the headers.  Everything else skipped is listed by name in pytest's -ra
# summary (.ci/test), e.g. the > 2^31-element test on a machine with too little free memory.
_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_ALLOWED = {s.strip() for s in os.environ.get("RNN_EXT_CI_ALLOW_SKIPS", "").split(",")}


def _skip_reason(report):
    lr = report.longrepr
    return lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)


def _gpu_without_cuda_build():
    try:
        return torch.cuda.is_available() and not rnn_ext.backend_info()["cuda"]
    except Exception:  # noqa: BLE001
        return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    why = None
    if _CI and "emulation" not in _ALLOWED and "needs g++ and the CUDA toolkit" in reason:
        why = ("CI=true: the CUDA emulation could not run (" + reason + "); install g++ and the "
               "CUDA toolkit headers, or set RNN_EXT_CI_ALLOW_SKIPS=emulation")
    elif "CUDA build" in reason and _gpu_without_cuda_build():
        why = ("this machine has a GPU but rnn_ext was built without CUDA (" + reason + "): "
               "rebuild with CUDA (CUDA_HOME, nvcc; RNN_EXT_FORCE_CUDA=1)")
    if why is not None:
        report.outcome = "failed"
        report.longrepr = why


# The model and data of the distributed tests (DDP in test_integration.py, FSDP2 in
# test_deploy.py): source code, exec'd by their worker processes and by the single-process
# reference run.
DIST_MODEL = textwrap.dedent(
    """
    import torch

    class Model(torch.nn.Module):
        def __init__(self, rnn_cls):
            super().__init__()
            torch.manual_seed(0)
            self.rnn = rnn_cls(3, 6, num_layers=2, bidirectional=True, batch_first=True,
                               dtype=torch.float64)
            self.head = torch.nn.Linear(12, 1, dtype=torch.float64)

        def forward(self, x):
            out, h_n = self.rnn(x)
            return self.head(out).squeeze(-1), h_n

    def data(step):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(8, 5, 3, generator=g, dtype=torch.float64)
        y = torch.randn(8, 5, generator=g, dtype=torch.float64)
        return x, y

    def train(model, steps, rank=0, world=1):
        # SGD+momentum; rank `rank` of `world` trains on its slice of every batch
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
        for step in range(steps):
            x, y = data(step)
            per = x.shape[0] // world
            pred, _ = model(x[rank * per:(rank + 1) * per])
            loss = ((pred - y[rank * per:(rank + 1) * per]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """
)


def run_two_gloo_ranks(script_text, tmp_path, timeout):
    """Runs `script_text` (a worker of DIST_MODEL; argv[1]: where it saves its state_dict) as
    two gloo ranks on loopback; returns their saved state_dicts.  The ranks import this
    checkout's rnn_ext (PYTHONPATH), whatever the venv has installed."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "dist_worker.py"
    script.write_text(script_text)
    root = str(Path(rnn_ext.__file__).resolve().parent.parent)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"rank{rank}.pt")], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log}"
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


def train_dist_model_single_process(steps):
    """DIST_MODEL with torch.nn.RNN in one process on the whole batch, SGD+momentum as the
    workers: (initial state_dict, final state_dict)."""
    ns: dict = {}
    exec(DIST_MODEL, ns)
    model = ns["Model"](torch.nn.RNN)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ns["train"](model, steps)
    return init, model.state_dict()


@contextlib.contextmanager
def no_tf32():
    """cuDNN's RNN and cuBLAS in exact fp32 within the block (torch.nn.RNN on CUDA uses TF32 by
    default, torch.backends.cudnn.allow_tf32, which makes fp32 comparisons meaningless)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
