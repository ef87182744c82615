"""The CUDA kernels' own code, run on the CPU (issues 4, 5 and 7).

``csrc/cuda/rnn_persistent_device.cuh`` -- the persistent forward and backward kernels with
both block products (FMA and tensor cores) -- and ``csrc/cuda/rnn_kernels.cu`` -- the per-step
kernels, the row gather and their launchers, whole -- are compiled by g++ with
``tests/simt/simt_emulation.h``,
which maps CUDA's built-ins onto host threads: every CUDA thread is a std::thread,
``__syncthreads``, warp shuffles and ``grid.sync()`` are barriers, ``mma.sync`` is emulated from
the PTX ISA's fragment layouts.  ``tests/simt/run_persistent.cpp`` launches one kernel the way
the launchers in ``rnn_persistent.cu`` would (grid, shared memory, warps per group,
super-steps); ``tests/simt/run_step.cpp`` calls the step launchers themselves.  These tests
build the buffers the way ``csrc/cuda_glue.cpp`` does and compare the results with a float64
reference (and torch autograd for the backward).

What this cannot show: timing, the real memory model (the barriers here order everything),
occupancy and the cooperative launch itself.  Those need ``bench/gpu_check.sh`` on a GPU.
Needs g++ and the CUDA toolkit's headers (cuda_fp16.h / cuda_bf16.h); skipped without them.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _cuda_include():
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", "/usr/local/cuda-13.0"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_bf16.h").is_file():
            return str(Path(c) / "include")
    return None


def _build(tmp_path_factory, name):
    inc = _cuda_include()
    gxx = shutil.which("g++")
    if inc is None or gxx is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h)")
    exe = tmp_path_factory.mktemp("simt") / name
    cmd = [gxx, "-std=c++20", "-O1", "-pthread", "-DRNN_EXT_SIMT_EMULATION",
           f"-I{REPO / 'csrc'}", f"-I{REPO / 'tests' / 'simt'}", f"-I{inc}",
           str(REPO / "tests" / "simt" / f"{name}.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, "the CUDA code does not compile for the emulation:\n" + res.stderr
    return exe


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return _build(tmp_path_factory, "run_persistent")


@pytest.fixture(scope="module")
def step_driver(tmp_path_factory):
    return _build(tmp_path_factory, "run_step")


class Launch:
    """One emulated launch: named buffers (float64 files, the storage dtype inside) and cells."""

    def __init__(self, kind, dtype, mma, T, B, H, relu=False, ld=None, split=None):
        # mma: False (FMA), True (tensor cores, 8-byte A loads) or "narrow" (tensor cores, the
        # mma layout's own k order with 4-byte A loads: PersistentPrefs.narrow_a_loads)
        # split: (R, P), P5's row groups: R copies of the column blocks, P rows each
        # or "grouped" (tensor cores, 8-byte A loads of a group of m-tiles before their mmas:
        # PersistentPrefs.grouped_a_loads, P3b)
        self.head = dict(kind=kind, dtype=dtype, mma=int(bool(mma)), T=T, B=B, H=H,
                         relu=int(relu), narrow=int(mma == "narrow"),
                         grouped=int(mma == "grouped"))
        if ld is not None:
            self.head["ld"] = ld
        if split is not None:
            self.head["row_groups"], self.head["rows"] = split
        self.bufs, self.acc, self.cells = {}, set(), []

    def buffer(self, name, array, acc=False):
        self.bufs[name] = np.ascontiguousarray(array, dtype=np.float64).reshape(-1)
        if acc:
            self.acc.add(name)
        return name

    def cell(self, **kw):
        self.cells.append(kw)

    def run(self, exe, tmp):
        tmp.mkdir(parents=True, exist_ok=True)
        lines = [f"{k} {v}" for k, v in self.head.items()]
        for name, arr in self.bufs.items():
            arr.tofile(tmp / f"{name}.f64")
            lines.append(f"{'acc' if name in self.acc else 'buffer'} {name} {arr.size}")
        for c in self.cells:
            lines.append("cell " + " ".join(f"{k}={'-' if v is None else v}" for k, v in c.items()))
        (tmp / "spec.txt").write_text("\n".join(lines) + "\n")
        res = subprocess.run([str(exe), str(tmp)], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        return {n: np.fromfile(tmp / f"{n}.out.f64") for n in self.bufs}


TORCH_DT = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}


def rnd(a, dtype):
    """Round to the storage dtype (what the driver does on the way in), back to float64."""
    return torch.from_numpy(np.asarray(a, dtype=np.float64)).to(TORCH_DT[dtype]).double().numpy()


def act(z, relu):
    return np.maximum(z, 0) if relu else np.tanh(z)


# tolerance of a float32-accumulated kernel in a given storage dtype, relative to max |ref|
TOL = {"float": 2e-5, "tf32": 4e-3, "half": 4e-3, "bfloat16": 3e-2}


def close(got, want, tol):
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.size == 0:
        return
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------------------------------
# forward: both directions of one layer (the glue's n == 1 cell table)

FWD_CASES = [
    # (dtype, mma, T, B, H, relu)
    ("float", False, 3, 1, 8, False),
    ("float", False, 4, 5, 8, True),      # wk = 4: two row groups
    ("float", False, 2, 33, 8, False),    # wk = 1, two passes of 32 rows
    ("bfloat16", False, 3, 3, 16, False),
    ("half", False, 3, 9, 16, False),     # wk = 2
    ("bfloat16", True, 3, 3, 16, False),  # tensor cores
    ("half", True, 3, 17, 32, True),      # two m-tiles, 2 k-tiles (warps 2-7 idle)
    ("float", True, 3, 4, 16, False),     # TF32 (k8): 2 k-tiles
    ("half", "narrow", 3, 17, 32, True),  # the 4-byte A loads in the layout's order
    ("float", "narrow", 3, 4, 16, False),
    ("bfloat16", "grouped", 3, 33, 16, False),  # P3b: a group of 2 m-tiles, then 1 of 2
    ("half", "grouped", 3, 17, 32, True),
    ("float", "grouped", 3, 20, 16, False),     # TF32
]


@pytest.mark.parametrize("dtype,mma,T,B,H,relu", FWD_CASES)
def test_forward_both_directions(driver, tmp_path, dtype, mma, T, B, H, relu, split=None):
    rng = np.random.default_rng(T * 100 + B + H)
    D, DH = 2, 2 * H
    P = rnd(rng.standard_normal((T * B, DH)), dtype)      # projections, b_ih folded in
    W = [rnd(rng.standard_normal((H, H)) / math.sqrt(H), dtype) for _ in range(D)]
    b = [rnd(rng.standard_normal(H) * 0.1, dtype) for _ in range(D)]
    h0 = rnd(rng.standard_normal((D, B, H)) * 0.5, dtype)
    lz = Launch("forward", dtype, mma, T, B, H, relu, split=split)
    lz.buffer("out", P)
    lz.buffer("h0", h0)
    lz.buffer("hn", np.zeros((D, B, H)))
    for d in range(D):
        lz.buffer(f"w{d}", W[d])
        lz.buffer(f"b{d}", b[d])
        lz.cell(w_hh=f"w{d}", b_hh=f"b{d}", h0=f"h0+{d * B * H}", out=f"out+{d * H}", ld=DH,
                hn=f"hn+{d * B * H}", reverse=d, delay=0)
    got = lz.run(driver, tmp_path)
    want = np.zeros((T, B, DH))
    hn = np.zeros((D, B, H))
    for d in range(D):
        h = h0[d]
        for i in range(T):
            t = T - 1 - i if d else i
            h = act(P.reshape(T, B, DH)[t, :, d * H:(d + 1) * H] + b[d] + h @ W[d].T, relu)
            want[t, :, d * H:(d + 1) * H] = h
        hn[d] = h
    tol = TOL["tf32" if (mma and dtype == "float") else dtype]
    close(got["out"].reshape(T, B, DH), want, tol * math.sqrt(T))
    close(got["hn"].reshape(D, B, H), hn, tol * math.sqrt(T))
    # h_n is the output of each direction's last step, stored once: bitwise the same values
    o = got["out"].reshape(T, B, DH)
    np.testing.assert_array_equal(got["hn"].reshape(D, B, H)[0], o[T - 1, :, :H])
    np.testing.assert_array_equal(got["hn"].reshape(D, B, H)[1], o[0, :, H:])


# ------------------------------------------------------------------------------------------
# forward: a layer wavefront (the glue's n > 1 cell table), scratch buffers shared by parity


@pytest.mark.parametrize("dtype,mma,L,shared", [
    ("float", False, 3, False), ("float", False, 4, True), ("bfloat16", True, 3, True),
])
def test_forward_wavefront(driver, tmp_path, dtype, mma, L, shared, B=3, split=None):
    T, I = 4, 5
    H = 16 if mma else 8
    rng = np.random.default_rng(L * 10 + int(shared))
    x = rng.standard_normal((T * B, I))
    Wih = [rnd(rng.standard_normal((H, I if m == 0 else H)) * 0.4, dtype) for m in range(L)]
    Whh = [rnd(rng.standard_normal((H, H)) * 0.4, dtype) for m in range(L)]
    bih = [rnd(rng.standard_normal(H) * 0.1, dtype) for m in range(L)]
    bhh = [rnd(rng.standard_normal(H) * 0.1, dtype) for m in range(L)]
    h0 = rnd(rng.standard_normal((L, B, H)) * 0.5, dtype)

    def name(m):  # out_of(m) in cuda_glue.cpp
        if m == L - 1:
            return "output"
        return f"scratch{m % 2}" if shared else f"ws{m}"

    lz = Launch("forward", dtype, mma, T, B, H, split=split)
    P0 = rnd(x @ Wih[0].T + bih[0], dtype)  # layer 0's projection GEMM, into its buffer
    for m in range(L):
        if name(m) not in lz.bufs:
            lz.buffer(name(m), P0 if m == 0 else np.full((T * B, H), np.nan))
    lz.buffer("h0", h0)
    lz.buffer("hn", np.zeros((L, B, H)))
    for m in range(L):
        lz.buffer(f"whh{m}", Whh[m])
        lz.buffer(f"bhh{m}", bhh[m])
        kw = dict(w_hh=f"whh{m}", b_hh=f"bhh{m}", h0=f"h0+{m * B * H}", out=name(m), ld=H,
                  hn=f"hn+{m * B * H}", reverse=0, delay=m)
        if m > 0:
            lz.buffer(f"wih{m}", Wih[m])
            lz.buffer(f"bih{m}", bih[m])
            kw.update(w_ih=f"wih{m}", b_ih=f"bih{m}", x=name(m - 1), K_in=H, ld_x=H)
        lz.cell(**kw)
    if shared and L >= 3:
        assert name(0) == name(2) or L == 3
    got = lz.run(driver, tmp_path)
    inp = x
    hn = np.zeros((L, B, H))
    for m in range(L):
        h = h0[m]
        outs = []
        for t in range(T):
            z = (P0[t * B:(t + 1) * B] if m == 0
                 else inp[t * B:(t + 1) * B] @ Wih[m].T + bih[m])
            h = act(z + bhh[m] + h @ Whh[m].T, False)
            outs.append(h)
        inp = np.concatenate(outs)
        hn[m] = h
    tol = TOL["tf32" if (mma and dtype == "float") else dtype] * 4
    close(got["output"].reshape(T * B, H), inp, tol)
    close(got["hn"].reshape(L, B, H), hn, tol)


# ------------------------------------------------------------------------------------------
# backward: BPTT of both directions of one layer, against torch autograd


@pytest.mark.parametrize("dtype,mma,T,B,H,relu,with_dy", [
    ("float", False, 3, 2, 8, False, True),
    ("float", False, 3, 5, 8, True, True),
    ("float", False, 2, 3, 8, False, False),
    ("bfloat16", True, 3, 3, 16, False, True),
    ("half", False, 2, 4, 16, False, True),
    ("float", True, 3, 2, 16, False, True),   # TF32
    ("bfloat16", "narrow", 3, 3, 16, False, True),
    ("float", "narrow", 3, 2, 16, False, True),
    ("bfloat16", "grouped", 3, 33, 16, False, True),
    ("float", "grouped", 3, 20, 16, True, True),
])
def test_backward_both_directions(driver, tmp_path, dtype, mma, T, B, H, relu, with_dy,
                                  split=None):
    D, DH = 2, 2 * H
    g = torch.Generator().manual_seed(T * 10 + B + H)

    def r(*shape, s=1.0):
        return torch.from_numpy(rnd((torch.randn(*shape, generator=g, dtype=torch.float64)
                                     * s).numpy(), dtype))

    P = r(T, B, DH).requires_grad_()
    W = r(D, H, H, s=1 / math.sqrt(H))
    h0 = r(D, B, H, s=0.5).requires_grad_()
    cols = []
    hn = []
    for d in range(D):
        h = h0[d]
        seq = {}
        for i in range(T):
            t = T - 1 - i if d else i
            z = P[t, :, d * H:(d + 1) * H] + h @ W[d].T
            h = torch.relu(z) if relu else torch.tanh(z)
            seq[t] = h
        cols.append(torch.stack([seq[t] for t in range(T)]))
        hn.append(h)
    out = torch.cat(cols, dim=2)
    hn = torch.stack(hn)
    out_r = torch.from_numpy(rnd(out.detach().numpy(), dtype))  # h as stored by the forward
    go = r(T, B, DH) if with_dy else None
    gh = r(D, B, H)
    torch.autograd.backward([out, hn] if with_dy else [hn], [go, gh] if with_dy else [gh])

    lz = Launch("backward", dtype, mma, T, B, H, relu, ld=DH, split=split)
    lz.buffer("h", out_r.numpy())
    if with_dy:
        lz.buffer("dy", go.numpy())
    lz.buffer("dz", np.full((T * B, DH), np.nan))
    lz.buffer("dh", gh.numpy(), acc=True)
    for d in range(D):
        lz.buffer(f"wt{d}", W[d].T.contiguous().numpy())  # W_hh^T, as the glue passes it
        lz.cell(wt_hh=f"wt{d}", h=f"h+{d * H}", dy=f"dy+{d * H}" if with_dy else None,
                dz=f"dz+{d * H}", dh=f"dh+{d * B * H}", reverse=d)
    got = lz.run(driver, tmp_path)
    tol = TOL["tf32" if (mma and dtype == "float") else dtype] * 2 * math.sqrt(T)
    # dz = d loss / d (pre-activation) = d loss / d P (P enters the pre-activation as is);
    # the kernel's act' uses h as stored, so its own rounding is part of dtype's tolerance
    close(got["dz"].reshape(T, B, DH), P.grad.numpy(), tol)
    close(got["dh"].reshape(D, B, H), h0.grad.numpy(), tol)


# ------------------------------------------------------------------------------------------
# P5: the batch rows split into row groups, each with its own copy of the column blocks
# (PersistentPrefs.max_row_groups); the last group may be partial.

@pytest.mark.parametrize("dtype,mma,T,B,H,relu,split", [
    ("float", False, 3, 9, 8, False, (3, 4)),       # groups of 4, 4, 1 rows (wk = 8)
    ("float", False, 2, 40, 8, True, (2, 32)),      # wk = 1: one pass of 32 rows, then 8
    ("half", False, 3, 20, 16, False, (3, 8)),      # wk = 4, groups of 8, 8, 4
    ("bfloat16", True, 3, 33, 16, False, (3, 16)),  # m-tiles: 16, 16, 1 rows
    ("half", True, 3, 20, 32, True, (2, 16)),      # (no narrow-load variant of P5)
    ("float", True, 3, 24, 16, False, (2, 16)),     # TF32
])
def test_forward_row_groups(driver, tmp_path, dtype, mma, T, B, H, relu, split):
    test_forward_both_directions(driver, tmp_path, dtype, mma, T, B, H, relu, split=split)


@pytest.mark.parametrize("dtype,mma,L,B,split", [
    ("float", False, 3, 10, (3, 4)), ("bfloat16", True, 3, 20, (2, 16)),
])
def test_forward_wavefront_row_groups(driver, tmp_path, dtype, mma, L, B, split):
    test_forward_wavefront(driver, tmp_path, dtype, mma, L, True, B=B, split=split)


@pytest.mark.parametrize("dtype,mma,T,B,H,relu,split", [
    ("float", False, 3, 9, 8, True, (3, 4)),
    ("bfloat16", True, 3, 33, 16, False, (3, 16)),
    ("float", True, 2, 20, 16, False, (2, 16)),
])
def test_backward_row_groups(driver, tmp_path, dtype, mma, T, B, H, relu, split):
    test_backward_both_directions(driver, tmp_path, dtype, mma, T, B, H, relu, True, split=split)


# ------------------------------------------------------------------------------------------
# wide layers on one block: the first block (columns 0..7) runs every step of a layer whose
# other columns are prefilled with what the other blocks would have written.  Exercises the
# long k ranges: several warps splitting k (and their cross-warp sum), up to 16 k-tiles per
# warp on tensor cores, the in-kernel projection's two segments, two passes of rows.

WIDE_FWD = [
    # (dtype, mma, B, H, project)
    ("float", False, 3, 264, False),      # wk = 8: warps 0-2 hold k (cross-warp sum)
    ("float", False, 9, 520, True),       # wk = 2, projection: [x | h] over 1040 columns
    ("bfloat16", False, 5, 272, True),    # wk = 4, V = 8
    ("half", False, 40, 64, False),       # wk = 1, two passes
    ("bfloat16", True, 130, 1024, True),  # 16 k-tiles per warp, two passes (128 + 2 rows)
    ("half", True, 3, 2048, False),       # 16 k-tiles per warp
    ("float", True, 20, 512, True),       # TF32: 16 k-tiles per warp
    ("bfloat16", "grouped", 130, 1024, True),  # P3b: 16 k-tiles per warp, 9 m-tiles
]


@pytest.mark.parametrize("dtype,mma,B,H,project", WIDE_FWD)
def test_forward_wide_layer_first_block(driver, tmp_path, dtype, mma, B, H, project):
    T, C = 2, 8  # steps; the block's columns
    rng = np.random.default_rng(B + H)
    W = rnd(rng.standard_normal((H, H)) / math.sqrt(H), dtype)
    b = rnd(rng.standard_normal(H) * 0.1, dtype)
    h0 = rnd(rng.standard_normal((B, H)) * 0.5, dtype)
    if project:
        Wi = rnd(rng.standard_normal((H, H)) / math.sqrt(H), dtype)
        bi = rnd(rng.standard_normal(H) * 0.1, dtype)
        X = rnd(rng.standard_normal((T * B, H)), dtype)
        Z = X @ Wi.T + bi
    else:
        Z = rnd(rng.standard_normal((T * B, H)), dtype)  # P_t in the output buffer
    # the reference for all columns (float64), then the buffer as the other blocks leave it
    h1 = act(Z[:B] + b + h0 @ W.T, False)
    h1s = rnd(h1, dtype)  # stored in the storage dtype: what step 1 reads
    h2 = act(Z[B:] + b + h1s @ W.T, False)
    out = np.full((T * B, H), np.nan) if project else Z.copy()
    out[:B, C:] = h1s[:, C:]  # step 0, the other blocks' columns: already h_0
    lz = Launch("forward", dtype, mma, T, B, H)
    lz.head["blocks"] = 1
    lz.buffer("out", out)
    lz.buffer("h0", h0)
    lz.buffer("hn", np.zeros((B, H)))
    lz.buffer("w", W)
    lz.buffer("b", b)
    kw = dict(w_hh="w", b_hh="b", h0="h0", out="out", ld=H, hn="hn", reverse=0, delay=0)
    if project:
        lz.buffer("x", X)
        lz.buffer("wi", Wi)
        lz.buffer("bi", bi)
        kw.update(w_ih="wi", b_ih="bi", x="x", K_in=H, ld_x=H)
    lz.cell(**kw)
    got = lz.run(driver, tmp_path)["out"].reshape(T * B, H)
    tol = TOL["tf32" if (mma and dtype == "float") else dtype] * 2
    close(got[:B, :C], h1[:, :C], tol)
    close(got[B:, :C], h2[:, :C], tol)
    # the block wrote its own columns only
    np.testing.assert_array_equal(got[:B, C:], rnd(h1s[:, C:], dtype))


@pytest.mark.parametrize("dtype,mma,B,H", [
    ("float", False, 3, 264), ("bfloat16", True, 130, 1024), ("half", False, 9, 272),
])
def test_backward_wide_layer_first_block(driver, tmp_path, dtype, mma, B, H):
    """Two backward super-steps of one direction with one block: step 0's dz of the other
    columns prefilled, so that the block's product at super-step 1 (and its d h0 at 2) reads
    a complete row."""
    T, C = 2, 8
    rng = np.random.default_rng(B * 3 + H)
    W = rnd(rng.standard_normal((H, H)) / math.sqrt(H), dtype)
    h = rnd(np.tanh(rng.standard_normal((T * B, H))), dtype)
    dy = rnd(rng.standard_normal((T * B, H)), dtype)
    dh_n = rng.standard_normal((B, H))
    # forward direction: super-step 0 handles t = 1, then t = 0, then d h0
    dz1 = rnd((dh_n + dy[B:]) * (1 - h[B:] ** 2), dtype)
    g0 = dz1 @ W
    dz0 = (g0 + dy[:B]) * (1 - h[:B] ** 2)
    dh0 = rnd(dz0, dtype) @ W
    dz = np.full((T * B, H), np.nan)
    dz[B:, C:] = dz1[:, C:]  # the other blocks' columns of super-step 0
    dz[:B, C:] = rnd(dz0[:, C:], dtype)  # ... and of super-step 1 (read at super-step 2)
    lz = Launch("backward", dtype, mma, T, B, H, ld=H)
    lz.head["blocks"] = 1
    lz.buffer("h", h)
    lz.buffer("dy", dy)
    lz.buffer("dz", dz)
    lz.buffer("dh", dh_n, acc=True)
    lz.buffer("wt", np.ascontiguousarray(W.T))
    lz.cell(wt_hh="wt", h="h", dy="dy", dz="dz", dh="dh", reverse=0)
    got = lz.run(driver, tmp_path)
    tol = TOL["tf32" if (mma and dtype == "float") else dtype] * 2
    gdz = got["dz"].reshape(T * B, H)
    close(gdz[B:, :C], dz1[:, :C], tol)
    close(gdz[:B, :C], dz0[:, :C], tol)
    close(got["dh"].reshape(B, H)[:, :C], dh0[:, :C], tol)


# ------------------------------------------------------------------------------------------
# the per-step kernels and their launchers (rnn_kernels.cu): what the default CUDA path runs

STEP_DT = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
           "bfloat16": torch.bfloat16}
STEP_TOL = {"float": 2e-6, "double": 1e-13, "half": 2e-3, "bfloat16": 1.6e-2}


def srnd(a, dtype):
    return torch.from_numpy(np.asarray(a, dtype=np.float64)).to(STEP_DT[dtype]).double().numpy()


class StepCall:
    def __init__(self, kind, dtype):
        self.lines = [f"kind {kind}", f"dtype {dtype}"]
        self.bufs, self.acc = {}, set()

    def buffer(self, name, a, acc=False):
        self.bufs[name] = np.ascontiguousarray(a, dtype=np.float64).reshape(-1)
        if acc:
            self.acc.add(name)

    def arg(self, **kw):
        self.lines += [f"arg {k} {int(v)}" for k, v in kw.items()]

    def ptr(self, **kw):
        self.lines += [f"ptr {k} {'-' if v is None else v}" for k, v in kw.items()]

    def segment(self, dst_row, src_row, rows, src):
        self.lines.append(f"segment {dst_row} {src_row} {rows} {src}")

    def run(self, exe, tmp):
        tmp.mkdir(parents=True, exist_ok=True)
        for n, a in self.bufs.items():
            a.tofile(tmp / f"{n}.f64")
            self.lines.append(f"{'acc' if n in self.acc else 'buffer'} {n} {a.size}")
        (tmp / "spec.txt").write_text("\n".join(self.lines) + "\n")
        res = subprocess.run([str(exe), str(tmp)], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "0", f"launcher returned cudaError {res.stdout.strip()}"
        return {n: np.fromfile(tmp / f"{n}.out.f64") for n in self.bufs}


@pytest.mark.parametrize("dtype,rows,cont,H,relu,bias", [
    ("float", 1, 1, 40, False, True),
    ("float", 9, 9, 40, True, True),      # two row tiles (8 rows each for fp32 accumulation)
    ("float", 5, 3, 37, False, False),    # H not a multiple of 4: the scalar (VEC=1) path
    ("double", 6, 2, 20, False, True),    # 4-row tiles, 16 accumulators
    ("half", 4, 0, 48, False, True),      # every row from h0 (a reverse step)
    ("bfloat16", 3, 3, 1100, False, True),  # H > 1024: two chunks through shared memory
])
def test_step_forward_launcher(step_driver, tmp_path, dtype, rows, cont, H, relu, bias):
    rng = np.random.default_rng(rows * 7 + H)
    ld_z, ld_cont, ld_h0 = 2 * H + 3, 2 * H, H  # strides as in a bidirectional layer
    W = srnd(rng.standard_normal((H, H)) / math.sqrt(H), dtype)
    b = srnd(rng.standard_normal(H) * 0.1, dtype) if bias else None
    prev = srnd(rng.standard_normal((max(cont, 1), ld_cont)) * 0.5, dtype)
    h0 = srnd(rng.standard_normal((rows, ld_h0)) * 0.5, dtype)
    z = srnd(rng.standard_normal((rows, ld_z)), dtype)
    c = StepCall("forward_step", dtype)
    c.buffer("w", W)
    if bias:
        c.buffer("b", b)
    c.buffer("prev", prev)
    c.buffer("h0", h0)
    c.buffer("z", z)
    c.ptr(w_hh="w", b_hh="b" if bias else None, cont_rows="prev", h0="h0", z="z")
    c.arg(ld_cont=ld_cont, cont=cont, ld_h0=ld_h0, ld_z=ld_z, rows=rows, H=H, relu=relu)
    got = c.run(step_driver, tmp_path)["z"].reshape(rows, ld_z)
    hp = np.concatenate([prev[:cont, :H], h0[cont:rows, :H]])
    want = act(z[:, :H] + (0 if b is None else b) + hp @ W.T, relu)
    close(got[:, :H], want, STEP_TOL[dtype] * 4)
    np.testing.assert_array_equal(got[:, H:], z[:, H:])  # nothing past the H columns


@pytest.mark.parametrize("dtype,rows_in,rows_next,H,relu,with_dy", [
    ("float", 0, 4, 24, False, True),     # the first call: pointwise part only
    ("float", 4, 4, 24, True, True),
    ("float", 5, 3, 37, False, True),     # reverse ragged: rows 3, 4 keep g in dh
    ("float", 3, 0, 24, False, False),    # the last call: dh = dz W_hh
    ("double", 2, 5, 20, False, True),    # rows 2..4 continue from dh
    ("bfloat16", 6, 6, 1032, False, True),  # two chunks
])
def test_step_backward_launcher(step_driver, tmp_path, dtype, rows_in, rows_next, H, relu,
                                with_dy):
    rng = np.random.default_rng(rows_in * 11 + rows_next + H)
    ld = 2 * H
    rows_out = max(rows_in, rows_next)
    W = srnd(rng.standard_normal((H, H)) / math.sqrt(H), dtype)
    dz_in = srnd(rng.standard_normal((max(rows_in, 1), ld)), dtype)
    dh = rng.standard_normal((rows_out, H)).astype(np.float32 if dtype != "double" else np.float64)
    dh = dh.astype(np.float64)
    dy = srnd(rng.standard_normal((max(rows_next, 1), ld)), dtype)
    h = srnd(np.tanh(rng.standard_normal((max(rows_next, 1), ld))), dtype)
    dz_next = np.full((max(rows_next, 1), ld), 7.0)
    c = StepCall("backward_step", dtype)
    c.buffer("wt", np.ascontiguousarray(W.T))
    c.buffer("dzi", dz_in)
    c.buffer("dh", dh, acc=True)
    c.buffer("dy", dy)
    c.buffer("h", h)
    c.buffer("dzn", dz_next)
    c.ptr(wt_hh="wt", dz_in="dzi", dh="dh", dy_next="dy" if with_dy else None, h_next="h",
          dz_next="dzn")
    c.arg(rows_in=rows_in, rows_next=rows_next, ld=ld, H=H, relu=relu)
    out = c.run(step_driver, tmp_path)
    g = np.concatenate([dz_in[:rows_in, :H] @ W, dh[rows_in:rows_out]])
    if rows_next:
        gg = g[:rows_next] + (dy[:rows_next, :H] if with_dy else 0)
        hh = h[:rows_next, :H]
        want = np.where(hh <= 0, 0.0, gg) if relu else gg * (1 - hh * hh)
        close(out["dzn"].reshape(-1, ld)[:rows_next, :H], want, STEP_TOL[dtype] * 4)
        np.testing.assert_array_equal(out["dzn"].reshape(-1, ld)[:, H:], 7.0)
    # rows the next step does not cover keep g in dh; the others are untouched
    close(out["dh"].reshape(rows_out, H)[rows_next:], g[rows_next:], STEP_TOL[dtype] * 4)
    np.testing.assert_array_equal(out["dh"].reshape(rows_out, H)[:rows_next], dh[:rows_next])


@pytest.mark.parametrize("dtype", ["float", "bfloat16", "double"])
def test_gather_rows_launcher(step_driver, tmp_path, dtype):
    """More segments than one launch takes (32), from both sources, with row strides."""
    rng = np.random.default_rng(5)
    cols, ld0, ld1, ldd = 7, 9, 8, 10
    src0 = srnd(rng.standard_normal((100, ld0)), dtype)
    src1 = srnd(rng.standard_normal((60, ld1)), dtype)
    dst = np.full((90, ldd), -1.0)
    c = StepCall("gather_rows", dtype)
    c.buffer("s0", src0)
    c.buffer("s1", src1)
    c.buffer("d", dst)
    c.ptr(src0="s0", src1="s1", dst="d")
    c.arg(ld0=ld0, ld1=ld1, ld_dst=ldd, cols=cols)
    want = dst.copy()
    segs = [(2 * i, (3 * i) % 97, 1 + i % 2, i % 2) for i in range(40)]  # 40 segments
    segs.append((85, 0, 0, 0))  # an empty one is skipped
    for d, s_, n, src in segs:
        if n == 0:
            c.segment(d, s_, n, src)
            continue
        c.segment(d, s_ if src == 0 else s_ % 58, n, src)
        srcarr = src0 if src == 0 else src1
        s2 = s_ if src == 0 else s_ % 58
        want[d:d + n, :cols] = srcarr[s2:s2 + n, :cols]
    got = c.run(step_driver, tmp_path)["d"].reshape(90, ldd)
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------
# The whole CUDA backend on CPU tensors: csrc/cuda_glue.cpp (rnn_forward_cuda /
# rnn_backward_cuda: projection GEMMs, cell tables, wavefront chunks, scratch buffers, fallbacks,
# gathers, weight-gradient GEMMs) compiled with the kernels above, their launches emulated, and
# the c10::cuda pieces stubbed (tests/simt/glue_emulation.h).  Against rnn_ext.reference in
# float64, forward and backward.

GLUE_SOURCES = ["tests/simt/glue_module.cpp", "csrc/cuda_glue.cpp", "csrc/common.cpp",
                "tests/simt/emu_kernels.cpp", "tests/simt/emu_persistent.cpp"]


def _load_glue(build_dir, inc):
    from torch.utils.cpp_extension import load

    return load(name="rnn_ext_cuda_emulated", sources=[str(REPO / s) for s in GLUE_SOURCES],
                extra_cflags=["-std=c++20", "-O1", "-pthread", "-DRNN_EXT_SIMT_EMULATION",
                              "-DRNN_EXT_WITH_CUDA"],
                extra_include_paths=[str(REPO / "csrc"), str(REPO / "tests" / "simt"), inc],
                extra_ldflags=["-pthread"], build_directory=str(build_dir), verbose=False)


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    inc = _cuda_include()
    if inc is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h)")
    build = tmp_path_factory.mktemp("glue")
    mod = _load_glue(build, inc)
    mod.build_dir, mod.inc = build, inc
    prev = mod.set_kernel("step")
    mod.initial_kernel = prev
    yield mod
    mod.set_kernel(prev)


def test_cuda_backend_default_kernel_is_auto(glue):
    """Without RNN_EXT_CUDA_KERNEL the CUDA backend starts in "auto" (persistent where it
    measured faster, bench/RESULTS.md)."""
    if os.environ.get("RNN_EXT_CUDA_KERNEL"):
        pytest.skip("RNN_EXT_CUDA_KERNEL is set")
    assert glue.initial_kernel == "auto"


GLUE_TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 4e-2,
            torch.float16: 5e-3}
GLUE_CASES = [
    # (kernel, dtype, T, B, I, H, L, bi, relu, bias, lengths, dropout, need_grad,
    #  expected forward kernel, wavefront layers, variant)
    ("step", torch.float32, 4, 3, 5, 16, 2, True, False, True, None, 0.0, True,
     "step", 0, "none"),
    ("persistent", torch.float32, 4, 3, 5, 16, 3, False, False, True, None, 0.0, True,
     "persistent", 3, "fma"),
    ("persistent", torch.float32, 4, 3, 5, 16, 4, False, True, False, None, 0.0, False,
     "persistent", 4, "fma"),  # no grad: layers 0 and 2 share a scratch buffer
    ("persistent", torch.float32, 4, 3, 5, 16, 2, True, False, True, None, 0.0, True,
     "persistent", 1, "fma"),
    ("persistent", torch.bfloat16, 3, 2, 4, 16, 2, True, False, True, None, 0.0, True,
     "persistent", 1, "mma"),
    ("persistent", torch.float16, 3, 2, 4, 16, 3, False, False, True, None, 0.0, True,
     "persistent", 3, "mma"),
    ("persistent_fma", torch.bfloat16, 3, 2, 4, 16, 2, False, False, True, None, 0.0, True,
     "persistent", 2, "fma"),
    ("persistent", torch.float32, 4, 3, 5, 16, 2, True, False, True, [4, 4, 4], 0.0, True,
     "persistent", 1, "fma"),  # packed, equal lengths: a uniform batch
    ("persistent", torch.float32, 5, 3, 5, 16, 2, True, False, True, [5, 3, 2], 0.0, True,
     "step", 0, "none"),  # ragged packed: the step path
    ("persistent", torch.float32, 4, 3, 5, 16, 3, False, False, True, None, 0.5, True,
     "persistent", 1, "fma"),  # dropout: one launch per layer, the noise between
    ("persistent", torch.float64, 3, 2, 4, 16, 2, False, False, True, None, 0.0, True,
     "step", 0, "none"),  # fp64: the step path
    ("persistent", torch.float32, 3, 2, 4, 6, 2, False, False, True, None, 0.0, True,
     "step", 0, "none"),  # H not a multiple of 4: the step path
    ("auto", torch.float32, 3, 2, 4, 16, 2, False, False, True, None, 0.0, True,
     "persistent", 2, "fma"),
    # "auto" (the default): persistent for B <= 64, and for H <= 256 up to B = 128
    ("auto", torch.float32, 2, 100, 4, 16, 1, False, False, True, None, 0.0, True,
     "persistent", 1, "fma"),
    ("auto", torch.float32, 2, 129, 4, 16, 1, False, False, True, None, 0.0, True,
     "step", 0, "none"),
    ("auto", torch.float32, 2, 65, 4, 272, 1, False, False, True, None, 0.0, False,
     "step", 0, "none"),
    ("auto", torch.float32, 2, 64, 4, 272, 1, False, False, True, None, 0.0, False,
     "persistent", 1, "fma"),
]


def _glue_ids(c):
    return "-".join(str(v).replace("torch.", "") for v in c[:13]).replace(" ", "")


@pytest.mark.parametrize("case", GLUE_CASES, ids=_glue_ids)
def test_cuda_backend_end_to_end(glue, case):
    import rnn_ext.reference as reference
    from torch.nn.utils.rnn import pack_padded_sequence

    (kernel, dtype, T, B, I, H, L, bi, relu, bias, lengths, p, need_grad,
     want_kernel, want_wave, want_variant) = case
    D = 2 if bi else 1
    torch.manual_seed(T * 100 + L * 10 + H)
    mod = torch.nn.RNN(I, H, L, nonlinearity="relu" if relu else "tanh", bias=bias,
                       bidirectional=bi, dtype=torch.float64)
    w = [t.detach().to(dtype) for t in mod._flat_weights]
    x = torch.randn(T, B, I, dtype=torch.float64).to(dtype)
    h0 = (0.5 * torch.randn(L * D, B, H, dtype=torch.float64)).to(dtype)
    if lengths is None:
        data, bs = x.reshape(T * B, I), None
        ref_bs = torch.full((T,), B, dtype=torch.int64)
    else:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
        data, bs = packed.data, packed.batch_sizes
        ref_bs = bs
    inp = x if lengths is None else data
    glue.set_kernel(kernel)
    out, hy, ws, noise = glue.forward(inp, h0, w, bs, bias, L, bi, relu, p, p > 0, need_grad)
    assert glue.kernel_used("forward") == want_kernel
    assert glue.wavefront_layers() == want_wave
    assert glue.variant("forward") == want_variant
    masks = None
    if p > 0:
        assert noise.shape == (L - 1, data.shape[0], D * H)
        masks = [noise[m].double() for m in range(L - 1)]
        kept = (noise != 0).double().mean().item()
        assert 0.3 < kept < 0.7  # p = 0.5
    # the reference, in float64 from the same (rounded) values, differentiable
    def leaf(t):  # a float64 copy (never the glue's own tensor, even when that is float64)
        return t.detach().to(torch.float64, copy=True).requires_grad_()

    wd = [leaf(t) for t in w]
    xd, hd = leaf(data), leaf(h0)
    ro, rh = reference.rnn_packed_data(xd, ref_bs, hd, wd, num_layers=L, bidirectional=bi,
                                       relu=relu, dropout_masks=masks)
    tol = GLUE_TOL[dtype] * (L + 1)
    close(out.double().reshape(ro.shape).numpy(), ro.detach().numpy(), tol)
    close(hy.double().numpy(), rh.detach().numpy(), tol)
    if not need_grad:
        assert ws.numel() == 0
        return
    g = torch.Generator().manual_seed(7)
    go = torch.randn(ro.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(rh.shape, generator=g, dtype=torch.float64)
    torch.autograd.backward([ro, rh], [go, gh])
    gi, ghx, gw = glue.backward(inp, h0, w, bs, out, ws, noise, go.to(dtype).reshape(out.shape),
                                gh.to(dtype), bias, L, bi, relu, [True, True, True])
    want_bwd = "step" if want_kernel == "step" else "persistent"
    assert glue.kernel_used("backward") == want_bwd
    assert glue.variant("backward") == ("none" if want_bwd == "step" else want_variant)
    close(gi.double().reshape(xd.shape).numpy(), xd.grad.numpy(), tol * 2)
    close(ghx.double().numpy(), hd.grad.numpy(), tol * 2)
    for a, r in zip(gw, wd):
        close(a.double().numpy(), r.grad.numpy(), tol * 4)


@pytest.mark.parametrize("args,want", [
    ((1, 128, 32, 264, 4), (1, 128)),    # off
    ((8, 128, 32, 264, 4), (8, 16)),     # 264 // 32 blocks: 8 groups of 16 rows
    ((8, 128, 64, 264, 4), (4, 32)),     # co-residency: 264 // 64 = 4
    ((3, 128, 32, 264, 4), (3, 44)),     # 43 rows rounded up to whole 4-row tiles
    ((8, 40, 32, 264, 16), (2, 32)),     # tensor cores: 16-row m-tiles, 40 // 16 = 2 groups
    ((8, 20, 32, 264, 16), (1, 20)),     # one m-tile's worth of rows: no split
    ((8, 128, 300, 264, 4), (1, 128)),   # not even one copy more fits
    ((8, 9, 32, 264, 4), (2, 8)),        # 9 rows: groups of 8 and 1
])
def test_persistent_row_groups_choice(glue, args, want):
    """P5's choice (gpu::persistent_row_groups): (max groups, B, blocks, max co-resident,
    row tile) -> (groups, rows per group)."""
    assert tuple(glue.row_groups(*args)) == want


# (GLUE_CASES' fields, then the row groups the forward and the backward must have launched)
ROW_SPLIT_CASES = [
    (("persistent", torch.float32, 3, 16, 5, 16, 2, False, False, True, None, 0.0, True,
      "persistent", 2, "fma"), 4, 4),   # a wavefront of 2 layers, 4 groups of 4 rows
    (("persistent", torch.float32, 3, 12, 5, 16, 1, True, True, True, None, 0.0, True,
      "persistent", 1, "fma"), 3, 3),   # both directions, relu: 12 // 4 = 3 groups
    (("persistent", torch.bfloat16, 3, 40, 4, 16, 2, True, False, True, None, 0.0, True,
      "persistent", 1, "mma"), 2, 2),   # tensor cores: groups of 32 and 8 rows
    (("persistent", torch.float32, 3, 16, 5, 16, 2, True, False, True, [3, 3, 3, 3] * 4, 0.5,
      True, "persistent", 1, "fma"), 4, 4),  # packed (equal lengths), dropout
]


@pytest.mark.parametrize("case,fwd_groups,bwd_groups", ROW_SPLIT_CASES,
                         ids=[_glue_ids(c[0]) for c in ROW_SPLIT_CASES])
def test_cuda_backend_row_split(glue, case, fwd_groups, bwd_groups):
    """RNN_EXT_CUDA_ROW_SPLIT (P5) through the whole backend: forward and backward against
    the reference, and the row groups the persistent launches actually used."""
    prev = glue.set_row_split(4)
    try:
        test_cuda_backend_end_to_end(glue, case)
        assert glue.row_groups_used("forward") == fwd_groups
        assert glue.row_groups_used("backward") == bwd_groups
    finally:
        glue.set_row_split(prev)
        glue.set_kernel("step")
    # off again: one group
    test_cuda_backend_end_to_end(glue, case)
    assert glue.row_groups_used("forward") == 1
    glue.set_kernel("step")


def test_cuda_backend_tf32_runs_on_tensor_cores(glue):
    """float32 goes to the tensor-core variant only when torch allows TF32 matmuls."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.manual_seed(3)
        mod = torch.nn.RNN(4, 16, 2)
        w = [t.detach() for t in mod._flat_weights]
        x, h0 = torch.randn(3, 2, 4), torch.randn(2, 2, 16)
        glue.set_kernel("persistent")
        torch.backends.cuda.matmul.allow_tf32 = True
        out, hy, _, _ = glue.forward(x, h0, w, None, True, 2, False, False, 0.0, False, False)
        assert glue.variant("forward") == "mma"
        with torch.no_grad():
            ro, rh = mod(x, h0)
        close(out.numpy(), ro.numpy(), 5e-3)  # TF32: 10-bit mantissas
        torch.backends.cuda.matmul.allow_tf32 = False
        glue.forward(x, h0, w, None, True, 2, False, False, 0.0, False, False)
        assert glue.variant("forward") == "fma"
        # "auto" (the default) runs float32 exactly even with TF32 allowed: the TF32 variant
        # measured slower than the FMA one on the H200 (bench/RESULTS.md)
        glue.set_kernel("auto")
        torch.backends.cuda.matmul.allow_tf32 = True
        out, _, _, _ = glue.forward(x, h0, w, None, True, 2, False, False, 0.0, False, False)
        assert glue.kernel_used("forward") == "persistent" and glue.variant("forward") == "fma"
        close(out.numpy(), ro.numpy(), 1e-5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
        glue.set_kernel("step")


# How a user turns TF32 on and off, step by step, and the persistent variant float32 must then
# run on (forward and backward): "mma" (TF32 on tensor cores) or "fma" (exact float32).  Each
# sequence runs in a fresh process (torch's precision flags are process-global, and reading the
# legacy flag after the new API was used raises).
TF32_SEQUENCES = {
    "default": [("pass", "fma")],
    "legacy_allow_tf32": [("torch.backends.cuda.matmul.allow_tf32 = True", "mma"),
                          ("torch.backends.cuda.matmul.allow_tf32 = False", "fma")],
    "matmul_fp32_precision": [("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "mma"),
                              ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "fma")],
    "global_fp32_precision": [("torch.backends.fp32_precision = 'tf32'", "mma"),
                              ("torch.backends.fp32_precision = 'ieee'", "fma")],
    "float32_matmul_precision": [("torch.set_float32_matmul_precision('high')", "mma"),
                                 ("torch.set_float32_matmul_precision('highest')", "fma")],
    "legacy_then_new": [("torch.backends.cuda.matmul.allow_tf32 = True", "mma"),
                        ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "fma")],
    "new_then_legacy": [("torch.backends.fp32_precision = 'tf32'", "mma"),
                        ("torch.backends.cuda.matmul.allow_tf32 = False", "fma")],
}


def _run_glue_script(glue, body, env=None, args=()):
    """Runs `body` in a fresh Python process (for settings read once per process: torch's
    precision flags, the RNN_EXT_* / SIMT_* variables) with `m` = the emulated glue module,
    the persistent kernels selected; returns its stdout."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(REPO / 'tests')!r})
import test_cuda_emulated as t
from pathlib import Path
m = t._load_glue(Path({str(glue.build_dir)!r}), {glue.inc!r})
m.set_kernel("persistent")
""" + body
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env=env, timeout=600, cwd=str(REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("name", sorted(TF32_SEQUENCES))
def test_cuda_backend_tf32_switches(glue, name):
    """However TF32 is set (the legacy allow_tf32 flag, fp32_precision for CUDA matmuls or for
    everything, set_float32_matmul_precision, or a mix), a float32 forward and backward run,
    on the tensor-core variant exactly when torch's own CUDA matmuls may use TF32."""
    steps = TF32_SEQUENCES[name]
    body = f"""
torch.manual_seed(3)
rnn = torch.nn.RNN(4, 16, 2)
w = [p.detach() for p in rnn._flat_weights]
x, h0 = torch.randn(3, 2, 4), torch.randn(2, 2, 16)
with torch.no_grad():
    ref, _ = rnn(x, h0)
for stmt in {[s for s, _ in steps]!r}:
    exec(stmt)
    out, hy, ws, noise = m.forward(x, h0, w, None, True, 2, False, False, 0.0, False, True)
    fwd = m.variant("forward")
    m.backward(x, h0, w, None, out, ws, noise, torch.ones_like(out), torch.ones_like(hy), True, 2,
               False, False, [True, True, True])
    err = float((out - ref).abs().max())
    print(fwd, m.variant("backward"), torch.backends.cuda.matmul.fp32_precision, err)
"""
    stdout = _run_glue_script(glue, body)
    lines = stdout.strip().split("\n")[-len(steps):]
    assert len(lines) == len(steps), stdout
    for (stmt, want), line in zip(steps, lines):
        fwd, bwd, torch_says, err = line.split()
        assert (fwd, bwd) == (want, want), (stmt, line)
        # the same decision as torch's own CUDA matmuls
        assert (torch_says == "tf32") == (want == "mma"), (stmt, line)
        assert float(err) < (5e-3 if want == "mma" else 1e-5), (stmt, line)


def test_cuda_backend_grouped_a_loads(glue):
    """RNN_EXT_CUDA_MMA_GROUPED_A=1 (P3b, read once per process: a subprocess) through the
    whole backend: bf16 forward and backward on the tensor-core variant, against the same
    computation with the default loads (bitwise: only when the loads are issued differs)."""
    body = f"""
torch.manual_seed(3)
rnn = torch.nn.RNN(16, 16, 2, bidirectional=True)
w = [p.detach().bfloat16() for p in rnn._flat_weights]
x, h0 = torch.randn(3, 40, 16).bfloat16(), torch.randn(4, 40, 16).bfloat16()
out, hy, ws, noise = m.forward(x, h0, w, None, True, 2, True, False, 0.0, False, True)
g = m.backward(x, h0, w, None, out, ws, noise, torch.ones_like(out), torch.ones_like(hy), True, 2,
               True, False, [True, True, True])
print(m.variant("forward"), m.variant("backward"))
torch.save([out, hy, g[0], g[1]] + list(g[2]), sys.argv[1])
"""
    outs = []
    for grouped in ("0", "1"):
        path = glue.build_dir / f"grouped{grouped}.pt"
        stdout = _run_glue_script(glue, body, dict(os.environ, RNN_EXT_CUDA_MMA_GROUPED_A=grouped),
                                  (str(path),))
        assert stdout.split()[-2:] == ["mma", "mma"], stdout
        outs.append(torch.load(path))
    for a, b in zip(*outs):
        # the same products in the same k order per m-tile: bitwise equal
        assert torch.equal(a, b)


def test_cuda_backend_coresidency_limits(glue):
    """On a device with 1 SM (2 resident blocks of 256 threads): a 16-column cell (2 blocks)
    runs persistent one layer per launch (no room for a wavefront), a bidirectional layer (4
    blocks) falls back to the step path.  (SIMT_SMS is read once per process: a subprocess.)"""
    body = f"""
rnn = torch.nn.RNN(4, 16, 3)
w = [p.detach() for p in rnn._flat_weights]
x = torch.randn(3, 2, 4)
out, hy, _, _ = m.forward(x, torch.zeros(3, 2, 16), w, None, True, 3, False, False, 0.0, False, False)
with torch.no_grad():
    ref, _ = rnn(x)
print(m.kernel_used("forward"), m.wavefront_layers(), float((out - ref).abs().max()))
bi = torch.nn.RNN(4, 16, 1, bidirectional=True)
wb = [p.detach() for p in bi._flat_weights]
m.forward(x, torch.zeros(2, 2, 16), wb, None, True, 1, True, False, 0.0, False, False)
print(m.kernel_used("forward"))
"""
    stdout = _run_glue_script(glue, body, dict(os.environ, SIMT_SMS="1"))
    first, second = stdout.split("\n")[-3:-1]
    kernel, wave, err = first.split()
    assert (kernel, wave) == ("persistent", "1") and float(err) < 1e-5
    assert second == "step"


# ------------------------------------------------------------------------------------------
# Per-sample gradients on the CUDA backend (rnn_backward_per_sample_cuda: the BPTT of
# rnn_backward_cuda, then each group's weight and bias gradients as batched GEMMs over its own
# rows), emulated: against the CPU op on the same saved forward, against a loop of per-group
# torch.autograd.grad calls over rnn_ext.reference run on each group's rows alone (its own
# steps, its own dropout noise rows), and summed over the groups against rnn_backward_cuda.

PS_CASES = [
    # (kernel, dtype, T, B, I, H, L, bi, relu, bias, lengths, dropout, hx, groups)
    ("step", torch.float64, 4, 4, 3, 5, 2, True, False, True, None, 0.0, True, 4),
    ("step", torch.float64, 5, 4, 3, 5, 2, False, True, True, [5, 3, 3, 1], 0.0, True, 4),
    ("step", torch.float64, 5, 4, 3, 5, 2, True, False, True, [5, 4, 2, 1], 0.0, False, 2),
    ("step", torch.float64, 4, 6, 3, 5, 1, False, False, False, None, 0.0, True, 3),
    ("step", torch.float64, 4, 4, 3, 5, 2, False, False, True, None, 0.0, True, 1),
    ("step", torch.float64, 4, 4, 3, 5, 2, False, True, True, None, 0.5, True, 4),
    ("step", torch.float64, 5, 4, 3, 5, 3, True, False, True, [5, 3, 2, 2], 0.4, True, 4),
    ("persistent", torch.float32, 4, 3, 5, 16, 2, True, False, True, None, 0.0, True, 3),
    ("step", torch.float32, 5, 4, 3, 6, 2, True, True, True, [5, 4, 2, 1], 0.0, True, 2),
    ("step", torch.float32, 5, 4, 3, 6, 2, False, False, True, [5, 4, 2, 1], 0.3, True, 4),
]
PS_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _sub_rows(bs, r0, r1):
    """The packed rows of batch rows [r0, r1) in step order, and their batch sizes."""
    rows, sub, off = [], [], 0
    for n in bs.tolist():
        hi = min(r1, n)
        if hi > r0:
            rows += [off + r for r in range(r0, hi)]
            sub.append(hi - r0)
        off += n
    return torch.tensor(rows, dtype=torch.long), torch.tensor(sub, dtype=torch.long)


@pytest.mark.parametrize("case", PS_CASES,
                         ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c)
                         .replace(" ", ""))
def test_cuda_backend_per_sample_gradients(glue, case):
    import rnn_ext  # noqa: F401  (loads the CPU op)
    import rnn_ext.reference as reference
    from torch.nn.utils.rnn import pack_padded_sequence

    kernel, dtype, T, B, I, H, L, bi, relu, bias, lengths, p, with_hx, groups = case
    D = 2 if bi else 1
    torch.manual_seed(T * 100 + B * 10 + L)
    mod = torch.nn.RNN(I, H, L, nonlinearity="relu" if relu else "tanh", bias=bias,
                       bidirectional=bi, dtype=torch.float64)
    w = [t.detach().to(dtype) for t in mod._flat_weights]
    x = torch.randn(T, B, I, dtype=torch.float64).to(dtype)
    h0 = (0.5 * torch.randn(L * D, B, H, dtype=torch.float64) if with_hx
          else torch.zeros(L * D, B, H, dtype=torch.float64)).to(dtype)
    if lengths is None:
        inp, data, bs = x, x.reshape(T * B, I), None
        ref_bs = torch.full((T,), B, dtype=torch.int64)
    else:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
        inp = data = packed.data
        bs = ref_bs = packed.batch_sizes
    glue.set_kernel(kernel)
    try:
        out, hy, ws, noise = glue.forward(inp, h0, w, bs, bias, L, bi, relu, p, p > 0, True)
    finally:
        glue.set_kernel("step")
    if p > 0:
        assert noise.shape == (L - 1, data.shape[0], D * H) and (noise == 0).any()
    N = data.shape[0]
    g = torch.Generator().manual_seed(7)
    go = torch.randn(N, D * H, generator=g, dtype=torch.float64)
    gh = torch.randn(L * D, B, H, generator=g, dtype=torch.float64)
    args = (inp, h0, w, bs, out, ws, noise, go.to(dtype).reshape(out.shape), gh.to(dtype), bias,
            L, bi, relu)
    scale = 2.5 if groups % 2 == 0 else 1.0  # (Opacus' batch-size factor for a mean loss)
    gi, ghx, gw, gsum = glue.backward_per_sample(*args, [True, True, True], groups, scale)
    assert len(gw) == len(w) == len(gsum)
    for a, s, wi in zip(gw, gsum, w):
        assert a.shape == (groups, *wi.shape) and a.dtype == dtype
        assert s.shape == wi.shape and s.dtype == dtype

    tol = PS_TOL[dtype] * (1 if dtype == torch.float64 else 4 * (L + 1))
    # 1. the CPU op on the same saved forward (its float64 twin for float32)
    cpu = torch.ops.rnn_ext.rnn_backward_per_sample(*args, [True, True, True], groups, scale)
    close(gi.double().numpy(), cpu[0].double().numpy(), tol)
    close(ghx.double().numpy(), cpu[1].double().numpy(), tol)
    for a, c in zip(gw + gsum, cpu[2] + cpu[3]):
        close(a.double().numpy(), c.double().numpy(), tol)
    # 2. the summed backward: the same input / hx gradients, weight gradients = sum of groups
    # (unscaled: the summed gradients the op returns too)
    si, shx, sw = glue.backward(*args, [True, True, True])
    close(gi.double().numpy(), si.double().numpy(), tol)
    close(ghx.double().numpy(), shx.double().numpy(), tol)
    for a, s, s2 in zip(gw, sw, gsum):
        close(a.double().sum(0).numpy() / scale, s.double().numpy(), tol)
        close(s2.double().numpy(), s.double().numpy(), tol)
    assert glue.backward_per_sample(*args, [False, False, False], groups, 1.0)[3] == []
    # 3. per group: the reference on the group's own rows alone, one autograd.grad each
    gs = B // groups
    for k in range(groups):
        r0, r1 = k * gs, (k + 1) * gs
        rows, sub_bs = _sub_rows(ref_bs, r0, r1)
        wd = [t.detach().double().requires_grad_() for t in w]
        masks = None if p == 0 else [noise[m].double()[rows] for m in range(L - 1)]
        ro, rh = reference.rnn_packed_data(data.double()[rows], sub_bs, h0.double()[:, r0:r1],
                                           wd, num_layers=L, bidirectional=bi, relu=relu,
                                           dropout_masks=masks)
        loss = (ro * go[rows]).sum() + (rh * gh[:, r0:r1]).sum()
        want = torch.autograd.grad(loss, wd)
        for i, (a, r) in enumerate(zip(gw, want)):
            try:
                close(a[k].double().numpy(), scale * r.numpy(), tol)
            except AssertionError as e:
                raise AssertionError(f"group {k}, weight {i}: {e}") from None


def test_cuda_backend_per_sample_errors(glue):
    """The CPU op's argument checks and messages (check_groups), through the CUDA entry."""
    import rnn_ext  # noqa: F401

    mod = torch.nn.RNN(3, 4, 1)
    w = [t.detach() for t in mod._flat_weights]
    x, h0 = torch.randn(2, 4, 3), torch.zeros(1, 4, 4)
    out, hy, ws, noise = glue.forward(x, h0, w, None, True, 1, False, False, 0.0, False, True)
    args = (x, h0, w, None, out, ws, noise, torch.ones_like(out), None, True, 1, False, False)
    bad = [(groups, 1.0, "groups must divide the batch size 4") for groups in (3, -1, 0, 8)]
    bad += [(4, scale, "scale must be finite and nonzero") for scale in (0.0, float("inf"))]
    for groups, scale, msg in bad:
        with pytest.raises(RuntimeError) as cuda_err:
            glue.backward_per_sample(*args, [False, False, True], groups, scale)
        with pytest.raises(RuntimeError) as cpu_err:
            torch.ops.rnn_ext.rnn_backward_per_sample(*args, [False, False, True], groups, scale)
        assert msg in str(cuda_err.value) and msg in str(cpu_err.value)
        assert str(cpu_err.value).splitlines()[0] in str(cuda_err.value)
