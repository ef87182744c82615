"""The persistent kernels (issue 5; csrc/cuda/rnn_persistent.cu) and their switches.

* CPU-runnable: the switch ops exist in every build and validate their argument; a numpy
  simulation of the kernel's thread mapping (W slice layout, per-lane k ranges, accumulator
  layout, the warp reduce-scatter, the cross-warp sum, the epilogue, both directions, the step
  order and the in-place hazards) reproduces a reference RNN for many (B, H, D, vector width).
* CPU-runnable too: a block-level simulation of the launch schedules (the glue's cell tables,
  wavefront chunks and scratch buffers, the super-step loops, every read/write hazard) gives a
  reference stack, and the persistent backward's recursion gives torch autograd's gradients.
* ``cuda``-marked (skipped without a GPU and a CUDA build): with ``set_cuda_kernel("persistent")``,
  parity (forward and backward) with the step path and with cuDNN for fp32 / bf16 / fp16,
  B in {1, 8, 32}, H in {64, 256, 512, 1024}, uni / bi, L in {1, 2}, tanh / relu; the layer
  wavefront against per-layer launches and the step path (L up to 10, chunks); what
  ``cuda_kernel_used()`` / ``cuda_wavefront_layers()`` report where the kernels are feasible and
  where they must fall back.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from conftest import no_tf32 as exact_fp32


def _cuda_ready() -> bool:
    try:
        return torch.cuda.is_available() and bool(rnn_ext.backend_info()["cuda"])
    except Exception:  # noqa: BLE001 (a broken build must not break collection)
        return False


needs_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and a CUDA build of rnn_ext"),
]


def _apply(marks):
    def deco(f):
        for m in reversed(marks):
            f = m(f)
        return f
    return deco


@pytest.fixture
def restore_kernel():
    prev = rnn_ext.set_cuda_kernel("step")
    rnn_ext.set_cuda_kernel(prev)
    yield
    rnn_ext.set_cuda_kernel(prev)


# ------------------------------------------------------------------------------------------
# The switch (every build)


def test_switch_ops_exist_and_round_trip(restore_kernel):
    assert hasattr(torch.ops.rnn_ext, "set_cuda_kernel")
    assert hasattr(torch.ops.rnn_ext, "cuda_kernel_used")
    rnn_ext.set_cuda_kernel("persistent")
    assert rnn_ext.set_cuda_kernel("auto") == "persistent"
    assert rnn_ext.set_cuda_kernel("step") == "auto"
    assert torch.ops.rnn_ext.set_cuda_kernel("step") == "step"
    assert rnn_ext.cuda_kernel_used() in ("none", "step", "persistent", "mixed")
    with rnn_ext.cuda.cuda_kernel("persistent"):
        assert rnn_ext.set_cuda_kernel("persistent") == "persistent"
    assert rnn_ext.set_cuda_kernel("step") == "step"


def test_cpu_forward_does_not_change_cuda_kernel_used(restore_kernel):
    before = rnn_ext.cuda_kernel_used()
    rnn_ext.set_cuda_kernel("persistent")
    rnn_ext.RNN(3, 4)(torch.randn(2, 1, 3))
    assert rnn_ext.cuda_kernel_used() == before


@pytest.mark.parametrize("bad", ["", "Persistent", "cudnn", "step "])
def test_switch_rejects_unknown_names(bad, restore_kernel):
    rnn_ext.set_cuda_kernel("persistent_fma")
    with pytest.raises(ValueError, match="unknown kernel"):
        rnn_ext.set_cuda_kernel(bad)
    with pytest.raises(RuntimeError, match="unknown kernel"):
        torch.ops.rnn_ext.set_cuda_kernel(bad)
    # the setting is unchanged by a rejected call
    assert rnn_ext.set_cuda_kernel("step") == "persistent_fma"


@pytest.mark.parametrize("env,want", [(None, "auto"), ("step", "step"), ("bogus", "auto")])
def test_switch_starts_from_the_environment_or_auto(env, want):
    """The switch starts at RNN_EXT_CUDA_KERNEL, else "auto" (the default: persistent where it
    measured faster), on CUDA and CPU-only builds alike."""
    e = {k: v for k, v in os.environ.items() if k != "RNN_EXT_CUDA_KERNEL"}
    if env is not None:
        e["RNN_EXT_CUDA_KERNEL"] = env
    res = subprocess.run([sys.executable, "-c", "import rnn_ext; print(rnn_ext.set_cuda_kernel('step'))"],
                         capture_output=True, text=True, env=e, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == want


def test_switch_rejects_non_strings():
    with pytest.raises(ValueError):
        rnn_ext.set_cuda_kernel(1)  # type: ignore[arg-type]


def test_kernel_used_phases():
    assert rnn_ext.cuda_kernel_used("forward") in ("none", "step", "persistent", "mixed")
    assert rnn_ext.cuda_kernel_used("backward") in ("none", "step", "persistent", "mixed")
    with pytest.raises(ValueError, match="phase"):
        rnn_ext.cuda_kernel_used("both")
    with pytest.raises(RuntimeError, match="phase must be"):
        torch.ops.rnn_ext.cuda_kernel_used("both")
    if not rnn_ext.backend_info()["cuda"]:
        assert rnn_ext.cuda_kernel_used("backward") == "none"
        assert rnn_ext.cuda_wavefront_layers() == 0


def test_wavefront_switch_round_trips_and_validates():
    prev = rnn_ext.set_cuda_wavefront(3)
    try:
        assert rnn_ext.set_cuda_wavefront(1) == 3
        assert torch.ops.rnn_ext.set_cuda_wavefront(rnn_ext.cuda.MAX_WAVEFRONT) == 1
        for bad in (0, rnn_ext.cuda.MAX_WAVEFRONT + 1, -1, True, 2.0, "2"):
            with pytest.raises(ValueError, match="layers must be"):
                rnn_ext.set_cuda_wavefront(bad)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="layers must be in 1 .. 8"):
            torch.ops.rnn_ext.set_cuda_wavefront(9)
        assert rnn_ext.set_cuda_wavefront(2) == rnn_ext.cuda.MAX_WAVEFRONT  # unchanged by those
    finally:
        rnn_ext.set_cuda_wavefront(prev)


# ------------------------------------------------------------------------------------------
# numpy simulation of the kernel's index math (mirrors csrc/cuda/rnn_persistent.cu line by line)

K_THREADS, K_WARPS, K_COLS, K_ROWS = 256, 8, 8, 4


def warps_per_group(B):
    if B <= K_ROWS:
        return 8
    if B <= 2 * K_ROWS:
        return 4
    if B <= 4 * K_ROWS:
        return 2
    return 1


def reduce_scatter(v):
    """v: (32 lanes, 32 values).  The kernel's butterfly: returns (32,), lane l's v[0]."""
    v = v.copy()
    n, o = v.shape[1], 16
    lanes = np.arange(32)
    while o >= 1:
        partner = lanes ^ o
        upper = (lanes & o) != 0
        if n > 1:
            half = n // 2
            send = np.where(upper[:, None], v[:, :half], v[:, half:n])
            keep = np.where(upper[:, None], v[:, half:n], v[:, :half])
            v[:, :half] = keep + send[partner]
            n = half
        else:
            v[:, 0] = v[:, 0] + v[partner, 0]
        o //= 2
    return v[:, 0]


def simulate_persistent(P, h0, W, b, relu, V):
    """P: (T, B, D*H) projections; h0: (D, B, H); W: (D, H, H); b: (D, H) or None.
    Returns the layer output (T, B, D*H) as the kernel would leave it."""
    T, B, DH = P.shape
    D, H = W.shape[0], W.shape[1]
    assert H % V == 0 and DH % V == 0
    ld = DH
    out = P.reshape(T * B * ld).astype(np.float64).copy()  # flat, like the device buffer
    bpd = -(-H // K_COLS)
    wk = warps_per_group(B)
    rows_per_pass = (K_WARPS // wk) * K_ROWS
    writes = np.zeros(T * B * ld, dtype=np.int64)
    for i in range(T):
        pending = []  # (flat index, value): applied at the grid barrier
        read_rows, written_rows = set(), set()
        for blk in range(D * bpd):
            d = 1 if blk >= bpd else 0
            j0 = (blk - d * bpd) * K_COLS
            base = d * H  # dir.out = out + d*H
            # W slice -> "shared memory", via the kernel's vector index math
            vpr = H // V
            ws = np.zeros(K_COLS * H)
            for idx in range(K_COLS * vpr):
                c = idx // vpr
                j = j0 + c
                if j < H:
                    kv = idx - c * vpr
                    ws[idx * V:(idx + 1) * V] = W[d].reshape(-1)[j * H + kv * V: j * H + kv * V + V]
            t = i if d == 0 else T - 1 - i
            if i == 0:
                hsrc, hbase, ldh = h0[d].reshape(-1), 0, H
            else:
                tp = t - 1 if d == 0 else t + 1
                hsrc, hbase, ldh = out, base + tp * B * ld, ld
                read_rows.update((d, row) for row in range(tp * B, tp * B + B))
            zt = base + t * B * ld
            for pass0 in range(0, B, rows_per_pass):
                red = np.zeros((K_WARPS, 32))
                for warp in range(K_WARPS):
                    group = warp // wk
                    kw = warp - group * wk
                    r0 = pass0 + group * K_ROWS
                    acc = np.zeros((32, 32))
                    for lane in range(32):
                        k = (kw * 32 + lane) * V
                        while k < H:
                            for r in range(K_ROWS):
                                if r0 + r >= B:
                                    continue
                                x = hsrc[hbase + (r0 + r) * ldh + k: hbase + (r0 + r) * ldh + k + V]
                                for c in range(K_COLS):
                                    acc[lane, r * K_COLS + c] += x @ ws[c * H + k: c * H + k + V]
                            k += 32 * wk * V
                    red[warp] = reduce_scatter(acc)
                for warp in range(K_WARPS):
                    group = warp // wk
                    if warp - group * wk != 0:
                        continue
                    r0 = pass0 + group * K_ROWS
                    s = red[warp].copy()
                    for q in range(1, wk):
                        s += red[warp + q]
                    for lane in range(32):
                        r = r0 + lane // K_COLS
                        j = j0 + lane % K_COLS
                        if r < B and j < H:
                            zp = zt + r * ld + j
                            bias = 0.0 if b is None else b[d, j]
                            z = out[zp] + bias + s[lane]
                            pending.append((zp, max(z, 0.0) if relu else math.tanh(z)))
                            written_rows.add((d, t * B + r))
        assert not (read_rows & written_rows), "a step reads rows (of its direction) that it writes"
        for zp, v in pending:
            out[zp] = v
            writes[zp] += 1
    assert (writes == 1).all(), "every output element is written exactly once"
    return out.reshape(T, B, DH)


def reference_layer(P, h0, W, b, relu):
    T, B, DH = P.shape
    D, H = W.shape[0], W.shape[1]
    out = np.zeros_like(P, dtype=np.float64)
    for d in range(D):
        h = h0[d].astype(np.float64)
        for i in range(T):
            t = i if d == 0 else T - 1 - i
            z = P[t, :, d * H:(d + 1) * H] + h @ W[d].T + (0 if b is None else b[d])
            h = np.maximum(z, 0) if relu else np.tanh(z)
            out[t, :, d * H:(d + 1) * H] = h
    return out


SIM_CASES = [
    # (T, B, H, D, V, relu, bias)
    (3, 1, 8, 1, 4, False, True),
    (3, 1, 24, 2, 8, True, True),     # 3 blocks per direction, last one full
    (2, 4, 12, 1, 4, False, False),   # H not a multiple of kCols: a partial column block
    (3, 5, 16, 2, 4, False, True),    # wk = 4: two row groups per pass
    (2, 9, 40, 1, 8, True, True),     # wk = 2
    (2, 17, 16, 2, 4, False, True),   # wk = 1, one pass, idle row groups
    (2, 33, 8, 1, 4, False, True),    # wk = 1, two passes
    (2, 3, 264, 1, 4, False, True),   # H > 256 * V / 8: lanes loop over k
    (1, 2, 16, 2, 8, False, True),    # T = 1
]


@pytest.mark.parametrize("T,B,H,D,V,relu,bias", SIM_CASES)
def test_simulated_kernel_matches_reference(T, B, H, D, V, relu, bias):
    rng = np.random.default_rng(T * 1000 + B * 10 + H + D)
    P = rng.standard_normal((T, B, D * H))
    h0 = rng.standard_normal((D, B, H)) * 0.5
    W = rng.standard_normal((D, H, H)) / math.sqrt(H)
    b = rng.standard_normal((D, H)) if bias else None
    got = simulate_persistent(P, h0, W, b, relu, V)
    want = reference_layer(P, h0, W, b, relu)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_reduce_scatter_sums_value_l_into_lane_l():
    v = np.random.default_rng(0).standard_normal((32, 32))
    np.testing.assert_allclose(reduce_scatter(v), v.sum(axis=0), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# numpy simulation of the launch schedules (block level: the per-lane product above is shared
# by every kernel).  Mirrors csrc/cuda_glue.cpp (forward_cells, out_of, the chunk loop,
# try_persistent_backward) and the super-step loops of rnn_persistent.cu.  Writes of a
# super-step become visible at its grid barrier; a row read by a product in a super-step must
# not be written by anyone in it, and an in-place projection row only by its own cell.


def _act(z, relu):
    return np.maximum(z, 0) if relu else np.tanh(z)


def simulate_forward_stack(x, h0, Wih, Whh, bih, bhh, relu, need_grad, max_wave, D=1):
    """The glue's forward over a whole stack with persistent launches only: D == 1 stacks in
    wavefront chunks of up to max_wave layers, else (or with max_wave == 1) one launch per
    layer with D cells.  x: (T, B, I); h0: (L*D, B, H); W*: lists per (layer, direction).
    Returns (output (T, B, D*H), h_n (L*D, B, H), the buffer names each layer used)."""
    T, B, _ = x.shape
    L = len(Whh) // D
    H = Whh[0].shape[0]
    DH = D * H
    N = T * B
    bufs = {}

    def out_name(m):
        if m == L - 1:
            return "output"
        return f"ws{m}" if need_grad else f"scratch{m % 2}"

    def buf(name):
        if name not in bufs:
            bufs[name] = np.full((N, DH), np.nan)  # at::empty: garbage until written
        return bufs[name]

    hy = np.full((L * D, B, H), np.nan)
    layer_in = x.reshape(N, -1)
    names = []
    l = 0
    while l < L:
        out = buf(out_name(l))
        for d in range(D):  # the projection GEMM of layer l, b_ih folded in
            c = l * D + d
            out[:, d * H:(d + 1) * H] = layer_in @ Wih[c].T + (0 if bih is None else bih[c])
        n = min(L - l, max_wave) if D == 1 else 1
        # the cell table (forward_cells)
        cells = []
        for k in range(n if n > 1 else D):
            m, d = (l + k, 0) if n > 1 else (l, k)
            c = m * D + d
            cells.append(dict(
                m=m, c=c, d=d, out=out_name(m), col=d * H, reverse=d == 1,
                delay=k if n > 1 else 0,
                x=out_name(m - 1) if (n > 1 and k > 0) else None))
        names.append([cl["out"] for cl in cells])
        supersteps = T + max(cl["delay"] for cl in cells)
        for s in range(supersteps):
            pending, prod_reads, inplace_reads = [], set(), set()
            for ci, cl in enumerate(cells):
                i = s - cl["delay"]
                if not 0 <= i < T:
                    continue
                t = T - 1 - i if cl["reverse"] else i
                o = buf(cl["out"])
                cols = slice(cl["col"], cl["col"] + H)
                rows = slice(t * B, (t + 1) * B)
                if i == 0:
                    hprev = h0[cl["c"]]
                else:
                    tp = t + 1 if cl["reverse"] else t - 1
                    hprev = o[tp * B:(tp + 1) * B, cols]
                    prod_reads.add((cl["out"], tp, cl["col"]))
                if cl["x"] is None:
                    z = o[rows, cols].copy()  # P_t, read in place
                    inplace_reads.add((cl["out"], t, cl["col"], ci))
                else:
                    z = buf(cl["x"])[rows, :H] @ Wih[cl["c"]].T
                    z = z + (0 if bih is None else bih[cl["c"]])
                    prod_reads.add((cl["x"], t, 0))
                z = z + hprev @ Whh[cl["c"]].T + (0 if bhh is None else bhh[cl["c"]])
                v = _act(z, relu)
                pending.append((cl["out"], rows, cols, v, (cl["out"], t, cl["col"]), ci))
                if i == T - 1:
                    hy[cl["c"]] = v  # the kernel writes h_n itself
            written = {p[4] for p in pending}
            assert not (prod_reads & written), f"super-step {s}: a product reads rows written now"
            for (name, t, col, ci) in inplace_reads:
                owners = {p[5] for p in pending if p[4] == (name, t, col)}
                assert owners == {ci}, f"super-step {s}: in-place rows written by another cell"
            for name, rows, cols, v, _, _ in pending:  # the grid barrier
                bufs[name][rows, cols] = v
        l += n
        if l < L:
            layer_in = buf(out_name(l - 1))
    return bufs["output"].reshape(T, B, DH), hy, names


def reference_stack(x, h0, Wih, Whh, bih, bhh, relu, D=1):
    T, B, _ = x.shape
    L = len(Whh) // D
    H = Whh[0].shape[0]
    inp = x
    hy = np.zeros((L * D, B, H))
    for m in range(L):
        out = np.zeros((T, B, D * H))
        for d in range(D):
            c = m * D + d
            h = h0[c]
            for i in range(T):
                t = T - 1 - i if d == 1 else i
                z = inp[t] @ Wih[c].T + h @ Whh[c].T
                z = z + (0 if bih is None else bih[c]) + (0 if bhh is None else bhh[c])
                h = _act(z, relu)
                out[t, :, d * H:(d + 1) * H] = h
            hy[c] = h
        inp = out
    return out, hy


STACK_CASES = [
    # (T, B, I, H, L, D, max_wave, need_grad, relu, bias)
    (5, 3, 4, 6, 2, 1, 8, True, False, True),
    (5, 2, 3, 4, 4, 1, 8, False, False, True),   # scratch ping-pong: layers 0, 2 share one
    (6, 2, 3, 4, 5, 1, 8, False, True, False),   # ... 0, 2 and 4 ... (4 is the output)
    (4, 1, 2, 3, 11, 1, 8, False, False, True),  # two chunks (8 + 3) across the ping-pong
    (4, 2, 2, 3, 10, 1, 3, True, False, True),   # chunks of 3, 3, 3, 1
    (3, 2, 2, 3, 3, 1, 1, False, False, True),   # one launch per layer
    (1, 2, 2, 3, 4, 1, 8, False, False, True),   # T = 1: super-steps 0 .. L-1
    (5, 2, 3, 4, 3, 2, 8, False, False, True),   # bidirectional: both directions per launch
    (4, 3, 3, 4, 2, 2, 8, True, True, True),
]


@pytest.mark.parametrize("T,B,I,H,L,D,max_wave,need_grad,relu,bias", STACK_CASES)
def test_simulated_launch_schedule_matches_reference(T, B, I, H, L, D, max_wave, need_grad,
                                                     relu, bias):
    rng = np.random.default_rng(T + 10 * L + 100 * D + max_wave)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((L * D, B, H)) * 0.5
    Wih = [rng.standard_normal((H, I if m < D else D * H)) * 0.5 for m in range(L * D)]
    Whh = [rng.standard_normal((H, H)) * 0.5 for _ in range(L * D)]
    bih = rng.standard_normal((L * D, H)) if bias else None
    bhh = rng.standard_normal((L * D, H)) if bias else None
    out, hy, names = simulate_forward_stack(x, h0, Wih, Whh, bih, bhh, relu, need_grad,
                                            max_wave, D)
    want_out, want_hy = reference_stack(x, h0, Wih, Whh, bih, bhh, relu, D)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hy, want_hy, rtol=1e-12, atol=1e-12)
    launches = len(names)
    if D == 1:
        assert launches == -(-L // max_wave)  # the wavefront really ran as chunks
    else:
        assert launches == L


def simulate_backward_layer(h_out, dy, dh_in, W, relu, T, B, H, D, store=lambda a: a):
    """The persistent backward of one layer (both directions): h_out, dy (T*B, D*H); dh_in
    (D, B, H); W (D, H, H) (the kernel holds W^T's slice: dh_prev[:, j] = dz W[:, j]).  dz is
    stored through `store` (the storage dtype's rounding) and multiplied from there.
    Returns (dZ (T*B, D*H), dh_out (D, B, H))."""
    dZ = np.full((T * B, D * H), np.nan)
    dh = dh_in.astype(np.float64).copy()
    for i in range(T + 1):  # super-steps
        pending = []
        for d in range(D):
            rev = d == 1
            cols = slice(d * H, (d + 1) * H)
            if i > 0:
                tp = i - 1 if rev else T - i
                g = dZ[tp * B:(tp + 1) * B, cols] @ W[d]  # reads rows written at i - 1
            else:
                g = dh[d]
            if i < T:
                t = i if rev else T - 1 - i
                rows = slice(t * B, (t + 1) * B)
                g = g + (0 if dy is None else dy[rows, cols])
                h = h_out[rows, cols]
                v = np.where(h <= 0, 0.0, g) if relu else g * (1 - h * h)
                pending.append((rows, cols, store(v)))
            else:
                dh[d] = g
        for rows, cols, v in pending:
            dZ[rows, cols] = v
    return dZ, dh


@pytest.mark.parametrize("T,B,H,D,relu,with_dy", [
    (5, 3, 4, 1, False, True), (4, 2, 5, 2, False, True), (3, 1, 3, 2, True, True),
    (1, 2, 3, 2, False, True), (4, 2, 3, 1, False, False),
])
def test_simulated_backward_matches_autograd(T, B, H, D, relu, with_dy):
    """The persistent backward's recursion (super-step order, directions, dh in and out) gives
    torch autograd's gradients of one layer: dz (hence every weight gradient, formed from dZ
    by the glue's GEMMs) and d h0."""
    g = torch.Generator().manual_seed(T * 7 + D)
    P = torch.randn(T, B, D * H, generator=g, dtype=torch.float64)
    h0 = (torch.randn(D, B, H, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    W = torch.randn(D, H, H, generator=g, dtype=torch.float64) * 0.5
    Z = P.clone().requires_grad_()  # the pre-activation's input part: d out / d P = dz
    outs, hn = [], []
    for d in range(D):
        h = h0[d]
        cols = []
        order = range(T - 1, -1, -1) if d == 1 else range(T)
        for t in order:
            z = Z[t, :, d * H:(d + 1) * H] + h @ W[d].T
            h = torch.relu(z) if relu else torch.tanh(z)
            cols.append((t, h))
        cols.sort(key=lambda p: p[0])
        outs.append(torch.stack([c[1] for c in cols]))
        hn.append(h)
    out = torch.cat(outs, dim=2)
    hn = torch.stack(hn)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64) if with_dy else None
    gh = torch.randn(hn.shape, generator=g, dtype=torch.float64)
    torch.autograd.backward([out, hn] if with_dy else [hn], [go, gh] if with_dy else [gh])
    dZ, dh = simulate_backward_layer(
        out.detach().reshape(T * B, D * H).numpy(),
        None if go is None else go.reshape(T * B, D * H).numpy(),
        gh.numpy(), W.numpy(), relu, T, B, H, D)
    np.testing.assert_allclose(dZ.reshape(T, B, D * H), Z.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dh, h0.grad.numpy(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# numpy simulation of the tensor-core block product (MmaProduct in rnn_persistent.cu): the
# B fragments each warp keeps, the A fragments it loads per pass, the partials in shared
# memory and the epilogue mapping, against the fragment layouts the PTX ISA documents for
# mma.m16n8k16 (f16/bf16) and mma.m16n8k8 (tf32), emulated independently of that code.

MMA_KINDS = {  # kK, kColOf, kHalf as in MmaProduct
    "16bit": (16, 2, 8),
    "tf32": (8, 1, 4),
}
K_MAX_KTILES, K_MMA_ROWS = 16, 128


def ptx_a_pos(kind, q, g, reg, e):
    """(row, col) of element e of register reg of the A fragment (PTX ISA layouts)."""
    if kind == "16bit":  # a0..a7 = reg*2 + e
        i = reg * 2 + e
        row = g if i in (0, 1, 4, 5) else g + 8
        col = q * 2 + (i & 1) + (8 if i >= 4 else 0)
    else:  # tf32: one element per register
        row = g if reg in (0, 2) else g + 8
        col = q if reg in (0, 1) else q + 4
    return row, col


def ptx_b_pos(kind, q, g, reg, e):
    if kind == "16bit":  # b0..b3 = reg*2 + e
        i = reg * 2 + e
        return q * 2 + (i & 1) + (8 if i >= 2 else 0), g
    return (q if reg == 0 else q + 4), g


def ptx_c_pos(q, g, i):
    return (g if i < 2 else g + 8), q * 2 + (i & 1)


def emulate_mma(kind, kK, a, b, c):
    """a[lane][reg][e], b[lane][reg][e], c[lane][4]: one warp's mma, per the layouts."""
    A = np.full((16, kK), np.nan)
    Bm = np.full((kK, 8), np.nan)
    ne = 2 if kind == "16bit" else 1
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        for reg in range(4):
            for e in range(ne):
                A[ptx_a_pos(kind, q, g, reg, e)] = a[lane][reg][e]
        for reg in range(2):
            for e in range(ne):
                Bm[ptx_b_pos(kind, q, g, reg, e)] = b[lane][reg][e]
    assert not np.isnan(A).any() and not np.isnan(Bm).any(), "a fragment position left empty"
    D = A @ Bm
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        for i in range(4):
            c[lane][i] += D[ptx_c_pos(q, g, i)]


def simulate_mma_product(kind, x, h, W_in, W_hh, j0, B):
    """The block owning columns j0..j0+7: returns {(r, j): sum} as epi() would receive it."""
    kK, col_of, half = MMA_KINDS[kind]
    K_in = 0 if W_in is None else W_in.shape[1]
    H = W_hh.shape[0]
    KT = (K_in + H) // kK
    assert H % kK == 0 and K_in % kK == 0 and KT <= 8 * K_MAX_KTILES
    ne = 2 if kind == "16bit" else 1

    def frag(row, start, ok):  # the kernel's frag(): ne consecutive elements from start
        return [row[start + e] if ok else 0.0 for e in range(ne)]

    # init: B fragments per warp / lane / k-tile slot s
    breg = {}
    for warp in range(8):
        for lane in range(32):
            g, q = lane >> 2, lane & 3
            j = j0 + g
            for s in range(K_MAX_KTILES):
                kt = warp + 8 * s
                live = kt < KT and j < H
                k = kt * kK
                if not live:
                    breg[warp, lane, s] = [[0.0] * ne, [0.0] * ne]
                    continue
                row = W_in[j, k:] if k < K_in else W_hh[j, k - K_in:]
                breg[warp, lane, s] = [frag(row, col_of * q, True),
                                       frag(row, col_of * q + half, True)]
    got = {}
    for pass0 in range(0, B, K_MMA_ROWS):
        rows = min(B - pass0, K_MMA_ROWS)
        mts = -(-rows // 16)
        red = np.zeros((8, K_MMA_ROWS, 8))
        for warp in range(8):
            acc = [[[0.0] * 4 for _ in range(32)] for _ in range(8)]
            for s in range(K_MAX_KTILES):
                kt = warp + 8 * s
                if kt >= KT:
                    continue
                k = kt * kK
                src, kk = (x, k) if k < K_in else (h, k - K_in)
                for m in range(mts):
                    a = []
                    for lane in range(32):
                        g, q = lane >> 2, lane & 3
                        ra, rb = pass0 + m * 16 + g, pass0 + m * 16 + g + 8
                        rowa = src[ra if ra < B else 0, kk:]
                        rowb = src[rb if rb < B else 0, kk:]
                        a.append([frag(rowa, col_of * q, ra < B), frag(rowb, col_of * q, rb < B),
                                  frag(rowa, col_of * q + half, ra < B),
                                  frag(rowb, col_of * q + half, rb < B)])
                    b = [breg[warp, lane, s] for lane in range(32)]
                    emulate_mma(kind, kK, a, b, acc[m])
            for m in range(mts):
                for lane in range(32):
                    g, q = lane >> 2, lane & 3
                    red[warp, m * 16 + g, 2 * q:2 * q + 2] = acc[m][lane][0:2]
                    red[warp, m * 16 + g + 8, 2 * q:2 * q + 2] = acc[m][lane][2:4]
        flat = red.reshape(8, -1)
        for tid in range(256):
            for i in range(tid, mts * 16 * 8, 256):
                r, j = pass0 + i // 8, j0 + i % 8
                if r < B and j < H:
                    assert (r, j) not in got, "an output handled twice"
                    got[r, j] = flat[:, i].sum()
    return got


@pytest.mark.parametrize("kind,B,H,K_in,j0", [
    ("16bit", 1, 16, 0, 0), ("16bit", 5, 48, 0, 8), ("16bit", 17, 64, 64, 56),
    ("16bit", 130, 32, 0, 24), ("16bit", 3, 1024, 1024, 0),  # 16 k-tiles per warp
    ("tf32", 2, 8, 0, 0), ("tf32", 16, 40, 40, 32), ("tf32", 33, 24, 0, 16),
])
def test_simulated_mma_product_matches_matmul(kind, B, H, K_in, j0):
    rng = np.random.default_rng(B * 1000 + H + K_in)
    h = rng.standard_normal((B, H))
    W_hh = rng.standard_normal((H, H))
    x = rng.standard_normal((B, K_in)) if K_in else None
    W_in = rng.standard_normal((H, K_in)) if K_in else None
    got = simulate_mma_product(kind, x, h, W_in, W_hh, j0, B)
    want = h @ W_hh.T + (x @ W_in.T if K_in else 0)
    cols = [j for j in range(j0, j0 + 8) if j < H]
    assert set(got) == {(r, j) for r in range(B) for j in cols}, "every output exactly once"
    for (r, j), v in got.items():
        assert abs(v - want[r, j]) <= 1e-9 * max(1.0, abs(want[r, j])), (r, j)


def test_feasibility_arithmetic():
    """The limits bench/NOTES.md states: with <= 128 registers per thread two 256-thread blocks
    fit an SM, so D * ceil(H / 8) <= 2 * SMs; shared memory 8 * H * elem + 1 KiB per block."""
    def feasible(H, D, es, sms=132, per_sm=2, optin=227 * 1024, smem_per_sm=228 * 1024):
        smem = 8 * H * es + 1024
        per_sm = min(per_sm, smem_per_sm // (smem + 1024))  # + the per-block reservation
        return smem <= optin and D * -(-H // 8) <= per_sm * sms
    for es in (4, 2):
        assert feasible(1024, 2, es) and feasible(2048, 1, es)
        assert not feasible(1088, 2, es) and not feasible(2176, 1, es)
    assert not feasible(1024, 2, 4, sms=114)  # H100 PCIe: 114 SMs


# ------------------------------------------------------------------------------------------
# On a GPU


@pytest.fixture
def no_tf32():
    with exact_fp32():
        yield


def _modules(I, H, L, bi, relu, dtype, seed=0):
    torch.manual_seed(seed)
    kw = dict(num_layers=L, nonlinearity="relu" if relu else "tanh", bidirectional=bi)
    base = torch.nn.RNN(I, H, dtype=torch.float64, **kw)
    ext = rnn_ext.RNN(I, H, dtype=torch.float64, **kw)
    ext.load_state_dict(base.state_dict())
    return base, ext


def _run(module, x, hx, dtype, device, backward=True, packed_lengths=None):
    """Forward (+ backward with fixed cotangents); dict of float64 CPU tensors."""
    module = module.to(device, dtype)
    xx = x.to(device, dtype).requires_grad_()
    h = hx.to(device, dtype).requires_grad_()
    for p in module.parameters():
        p.grad = None
    inp = xx
    if packed_lengths is not None:
        inp = pack_padded_sequence(xx, torch.tensor(packed_lengths), enforce_sorted=False)
    out, hn = module(inp, h)
    out_t = out.data if packed_lengths is not None else out
    res = {"out": out_t, "hn": hn}
    if backward:
        g = torch.Generator().manual_seed(2)
        go = torch.randn(out_t.shape, generator=g, dtype=torch.float64).to(device, dtype)
        gh = torch.randn(hn.shape, generator=g, dtype=torch.float64).to(device, dtype)
        torch.autograd.backward([out_t, hn], [go, gh])
        res["grad_input"] = xx.grad
        res["grad_hx"] = h.grad
        for name, p in module.named_parameters():
            res["grad_" + name] = p.grad
    return {k: v.detach().to("cpu", torch.float64) for k, v in res.items()}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() if a.numel() else 0.0


def _layer_fits(dtype, H, D, tensor_cores=True, allow_tf32=False):
    """Whether one layer's persistent grid (D * ceil(H / 8) blocks) is co-resident on this card,
    forward and backward, per the occupancy API (the plan op): a bidirectional H=1024 layer
    needs 256 blocks, which 132 SMs (H100 SXM, H200) hold and 114 (H100 PCIe) do not."""
    plan = torch.ops.rnn_ext._cuda_persistent_plan
    kw = dict(tensor_cores=tensor_cores, allow_tf32=allow_tf32)
    fwd, bwd = plan(dtype, H, D, **kw), plan(dtype, H, D, 0, True, **kw)
    if torch.cuda.get_device_properties(0).multi_processor_count >= 132 and H * D <= 2048:
        assert fwd[5] == bwd[5] == 0, "H100 SXM / H200: D * H <= 2048 fits"
    for p in (fwd, bwd):  # feasible or not co-resident (status 5), as blocks vs max_coresident
        assert p[5] in (0, 5) and (p[5] == 0) == (p[0] <= p[3]), p
    return fwd[5] == 0 and bwd[5] == 0


HALF_FLOOR = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRID = [
    (B, H, bi, L, relu)
    for B in (1, 8, 32)
    for H in (64, 256, 512, 1024)
    for bi in (False, True)
    for L in (1, 2)
    for relu in (False, True)
]


def _gid(p):
    B, H, bi, L, relu = p
    return f"B{B}-H{H}-{'bi' if bi else 'uni'}-L{L}-{'relu' if relu else 'tanh'}"


@_apply(needs_cuda)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", GRID, ids=_gid)
def test_persistent_parity(p, dtype, no_tf32, restore_kernel):
    B, H, bi, L, relu = p
    T, I, D = 7, 32, 2 if bi else 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    hx = torch.randn(L * D, B, H, generator=g, dtype=torch.float64) * 0.5
    base, ext = _modules(I, H, L, bi, relu, torch.float64)
    if dtype != torch.float32:  # round once so every contender sees the same values
        x, hx = x.to(dtype).double(), hx.to(dtype).double()
        ext.load_state_dict({k: v.to(dtype).double() for k, v in ext.state_dict().items()})
        base.load_state_dict(ext.state_dict())
    rnn_ext.set_cuda_kernel("step")
    step = _run(ext, x, hx, dtype, "cuda")
    assert rnn_ext.cuda_kernel_used() == "step"
    assert rnn_ext.cuda_kernel_used("backward") == "step"
    rnn_ext.set_cuda_kernel("persistent")
    pers = _run(ext, x, hx, dtype, "cuda")
    fits = _layer_fits(dtype, H, D)
    want = "persistent" if fits else "step"
    assert rnn_ext.cuda_kernel_used() == want
    assert rnn_ext.cuda_kernel_used("backward") == want
    if fits:
        want_variant = "fma" if dtype == torch.float32 else "mma"  # fp32: TF32 off (no_tf32)
        assert rnn_ext.cuda.cuda_persistent_variant() == want_variant
        assert rnn_ext.cuda.cuda_persistent_variant("backward") == want_variant
    cudnn = _run(base, x, hx, dtype, "cuda")
    # rnn_ext.reference (plain PyTorch, float64 on the CPU) with the weights as they ran
    ref_mod = copy.deepcopy(ext).to("cpu", torch.float64)
    with torch.no_grad():
        ref_out, ref_hn = rnn_ext.reference.module_forward(ref_mod, x, hx)
    if dtype == torch.float32:
        for k in step:
            assert _rel(pers[k], step[k]) <= 5e-5, f"{k} vs step"
            assert _rel(pers[k], cudnn[k]) <= 5e-5, f"{k} vs cuDNN"
        assert _rel(pers["out"], ref_out) <= 5e-5 and _rel(pers["hn"], ref_hn) <= 5e-5
    else:
        e_ref = max(_rel(pers["out"], ref_out), _rel(pers["hn"], ref_hn))
        e_cud = max(_rel(cudnn["out"], ref_out), _rel(cudnn["hn"], ref_hn))
        assert e_ref <= max(3 * e_cud, HALF_FLOOR[dtype]), f"vs reference {e_ref:.3g}"
        truth = _run(ext, x, hx, torch.float64, "cpu")
        for k in truth:
            e_p, e_s, e_c = (_rel(r[k], truth[k]) for r in (pers, step, cudnn))
            assert e_p <= max(3 * e_c, 3 * e_s, HALF_FLOOR[dtype]), (
                f"{k}: persistent {e_p:.3g}, step {e_s:.3g}, cuDNN {e_c:.3g}")


@pytest.fixture
def restore_wavefront():
    prev = rnn_ext.set_cuda_wavefront(rnn_ext.cuda.MAX_WAVEFRONT)
    rnn_ext.set_cuda_wavefront(prev)
    yield
    rnn_ext.set_cuda_wavefront(prev)


def _expected_wave(dtype, H, L, limit, B):
    """Layers per launch the glue should pick: the switch, the stack, co-residency, and the
    in-kernel projection's extra L2 traffic (ceil(H/8) * B * H elements, at most 8 MiB)."""
    es = torch.empty((), dtype=dtype).element_size()
    if -(-H // 8) * B * H * es > 8 << 20:
        return 1
    maxco = torch.ops.rnn_ext._cuda_persistent_plan(
        dtype, H, 1, H, allow_tf32=torch.backends.cuda.matmul.allow_tf32)[3]
    return max(1, min(L, limit, maxco // -(-H // 8)))


@_apply(needs_cuda)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,H,L,grad", [
    (1, 64, 3, True), (8, 256, 2, True), (4, 128, 5, False), (32, 64, 10, True),
    (3, 256, 9, False), (8, 1024, 2, True),
])
def test_wavefront_matches_per_layer_and_step(B, H, L, grad, dtype, no_tf32, restore_kernel,
                                              restore_wavefront):
    """A unidirectional stack as a layer wavefront (deep stacks in chunks of up to 8 layers;
    without grad, layers of equal parity share a scratch buffer) gives the per-layer persistent
    launches' and the step path's results, forward and backward."""
    T, I = 9, 16
    base, ext = _modules(I, H, L, False, False, torch.float64)
    g = torch.Generator().manual_seed(B * 100 + L)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    hx = torch.randn(L, B, H, generator=g, dtype=torch.float64) * 0.5
    if dtype != torch.float32:
        x, hx = x.to(dtype).double(), hx.to(dtype).double()
        ext.load_state_dict({k: v.to(dtype).double() for k, v in ext.state_dict().items()})
    res = {}
    for name, kernel, wave in (("step", "step", 8), ("layer", "persistent", 1),
                               ("wave", "persistent", 8)):
        rnn_ext.set_cuda_kernel(kernel)
        rnn_ext.set_cuda_wavefront(wave)
        if grad:
            res[name] = _run(ext, x, hx, dtype, "cuda")
        else:
            with torch.no_grad():
                res[name] = _run(ext, x, hx, dtype, "cuda", backward=False)
        if kernel == "persistent":
            assert rnn_ext.cuda_kernel_used() == "persistent"
            assert rnn_ext.cuda_wavefront_layers() == (
                1 if wave == 1 else _expected_wave(dtype, H, L, wave, B))
            if grad:
                assert rnn_ext.cuda_kernel_used("backward") == "persistent"
    if _expected_wave(dtype, H, L, 8, B) >= 2:
        assert rnn_ext.cuda_wavefront_layers() >= 2, "the wavefront ran"
    if dtype == torch.float32:
        for k in res["step"]:
            assert _rel(res["wave"][k], res["layer"][k]) <= 5e-5, f"{k}: wavefront vs per layer"
            assert _rel(res["wave"][k], res["step"][k]) <= 5e-5, f"{k}: wavefront vs step"
    else:  # bf16: against float64, no worse than the others (its upper layers' projection is
        # fp32 inside the kernel, theirs a bf16-rounded GEMM result)
        if grad:
            truth = _run(ext, x, hx, torch.float64, "cpu")
        else:
            with torch.no_grad():
                truth = _run(ext, x, hx, torch.float64, "cpu", backward=False)
        for k in truth:
            e_w, e_l, e_s = (_rel(res[n][k], truth[k]) for n in ("wave", "layer", "step"))
            assert e_w <= max(3 * e_l, 3 * e_s, HALF_FLOOR[dtype]), (
                f"{k}: wavefront {e_w:.3g}, per layer {e_l:.3g}, step {e_s:.3g}")


@_apply(needs_cuda)
def test_wavefront_off_with_dropout_and_bidirectional(restore_kernel, restore_wavefront):
    rnn_ext.set_cuda_kernel("persistent")
    x = torch.randn(6, 4, 16, device="cuda")
    m = rnn_ext.RNN(16, 64, num_layers=3, dropout=0.5).cuda().train()
    m(x)
    assert rnn_ext.cuda_kernel_used() == "persistent" and rnn_ext.cuda_wavefront_layers() == 1
    m.eval()
    m(x)
    assert rnn_ext.cuda_wavefront_layers() == 3
    m = rnn_ext.RNN(16, 64, num_layers=3, bidirectional=True).cuda()
    m(x)
    assert rnn_ext.cuda_kernel_used() == "persistent" and rnn_ext.cuda_wavefront_layers() == 1


@_apply(needs_cuda)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "tf32"], ids=str)
@pytest.mark.parametrize("B,H,L,bi", [
    (1, 256, 2, False), (8, 1024, 1, True), (32, 512, 2, False), (128, 256, 1, True),
    (130, 64, 2, False),  # two passes of 128 rows
])
def test_tensor_core_variant_matches_fma_and_truth(B, H, L, bi, dtype, restore_kernel):
    """The tensor-core variant (mma.sync; weights in registers) against the FMA variant, the
    step path and float64: forward and backward, both no worse than 3x the others' error.
    "tf32": float32 with torch.backends.cuda.matmul.allow_tf32 on (the only way fp32 runs on
    tensor cores); with it off, the FMA variant runs."""
    tf32 = dtype == "tf32"
    dt = torch.float32 if tf32 else dtype
    T, I = 6, 32
    _, ext = _modules(I, H, L, bi, False, torch.float64)
    g = torch.Generator().manual_seed(B + H)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    hx = torch.randn(L * (2 if bi else 1), B, H, generator=g, dtype=torch.float64) * 0.5
    if not tf32:
        x, hx = x.to(dt).double(), hx.to(dt).double()
        ext.load_state_dict({k: v.to(dt).double() for k, v in ext.state_dict().items()})
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        res = {}
        D = 2 if bi else 1
        for kernel in ("persistent", "persistent_fma", "step"):
            rnn_ext.set_cuda_kernel(kernel)
            res[kernel] = _run(ext, x, hx, dt, "cuda")
            if kernel != "step":
                mma = kernel == "persistent"
                if _layer_fits(dt, H, D, tensor_cores=mma, allow_tf32=tf32):
                    want = "mma" if mma else "fma"
                    assert rnn_ext.cuda.cuda_persistent_variant() == want
                    assert rnn_ext.cuda.cuda_persistent_variant("backward") == want
                else:  # e.g. bidirectional H=1024 on 114 SMs
                    assert rnn_ext.cuda_kernel_used() == "step"
        torch.backends.cuda.matmul.allow_tf32 = False
        rnn_ext.set_cuda_kernel("persistent")
        _run(ext, x, hx, torch.float32, "cuda", backward=False)
        if _layer_fits(torch.float32, H, D):
            assert rnn_ext.cuda.cuda_persistent_variant() == "fma", "fp32 without TF32: FMA"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    truth = _run(ext, x, hx, torch.float64, "cpu")
    floor = 5e-3 if tf32 else HALF_FLOOR[dt]
    for k in truth:
        e_m, e_f, e_s = (_rel(res[n][k], truth[k]) for n in ("persistent", "persistent_fma", "step"))
        assert e_m <= max(3 * e_f, 3 * e_s, floor), (
            f"{k}: tensor cores {e_m:.3g}, FMA {e_f:.3g}, step {e_s:.3g}")


@_apply(needs_cuda)
def test_long_sequence_matches_step(no_tf32, restore_kernel):
    """512 steps (511 grid barriers) in both directions, fp32: the persistent output equals the
    step path's to fp32 summation-order noise."""
    T, B, I, H, L = 512, 8, 64, 256, 2
    base, ext = _modules(I, H, L, True, False, torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    hx = torch.randn(2 * L, B, H, generator=g, dtype=torch.float64)
    rnn_ext.set_cuda_kernel("step")
    step = _run(ext, x, hx, torch.float32, "cuda", backward=False)
    rnn_ext.set_cuda_kernel("persistent")
    pers = _run(ext, x, hx, torch.float32, "cuda", backward=False)
    assert rnn_ext.cuda_kernel_used() == "persistent"
    cudnn = _run(base, x, hx, torch.float32, "cuda", backward=False)
    for k in step:
        assert _rel(pers[k], step[k]) <= 1e-4, k
        assert _rel(pers[k], cudnn[k]) <= 1e-4, k


@_apply(needs_cuda)
def test_kernel_used_reports_fallbacks(restore_kernel):
    rnn_ext.set_cuda_kernel("persistent")
    x = torch.randn(5, 3, 8, device="cuda")
    # float64: no persistent kernel
    m = rnn_ext.RNN(8, 16).to("cuda", torch.float64)
    m(x.double())
    assert rnn_ext.cuda_kernel_used() == "step"
    # H not a multiple of 16 / element size: vector loads impossible
    m = rnn_ext.RNN(8, 6).cuda()
    m(x)
    assert rnn_ext.cuda_kernel_used() == "step"
    # packed with unequal lengths: not a uniform batch
    m = rnn_ext.RNN(8, 16).cuda()
    m(pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False))
    assert rnn_ext.cuda_kernel_used() == "step"
    # packed with equal lengths is uniform: persistent
    m(pack_padded_sequence(x, torch.tensor([5, 5, 5]), enforce_sorted=False))
    assert rnn_ext.cuda_kernel_used() == "persistent"
    # "step" selects the step path; "auto" the persistent one for a small batch
    rnn_ext.set_cuda_kernel("step")
    m(x)
    assert rnn_ext.cuda_kernel_used() == "step"
    rnn_ext.set_cuda_kernel("auto")
    m(x)
    assert rnn_ext.cuda_kernel_used() == "persistent"


@_apply(needs_cuda)
def test_packed_equal_lengths_matches_cudnn(no_tf32, restore_kernel):
    rnn_ext.set_cuda_kernel("persistent")
    base, ext = _modules(16, 64, 2, True, False, torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, 16, generator=g, dtype=torch.float64)
    hx = torch.randn(4, 4, 64, generator=g, dtype=torch.float64)
    got = _run(ext, x, hx, torch.float32, "cuda", packed_lengths=[6, 6, 6, 6])
    assert rnn_ext.cuda_kernel_used() == "persistent"
    want = _run(base, x, hx, torch.float32, "cuda", packed_lengths=[6, 6, 6, 6])
    for k in want:
        assert _rel(got[k], want[k]) <= 5e-5, k


@_apply(needs_cuda)
def test_plan_and_barrier_diagnostics():
    """The launch plan for issue 5's shapes on this card, and the grid barrier's cost (printed
    for bench/NOTES.md; -s shows it)."""
    props = torch.cuda.get_device_properties(0)
    plan = torch.ops.rnn_ext._cuda_persistent_plan
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        es = torch.empty((), dtype=dtype).element_size()
        for H, D in ((256, 1), (1024, 1), (1024, 2), (2048, 1)):
            for tc in (True, False):
                blocks, threads, smem, maxco, regs, status, mma = plan(dtype, H, D,
                                                                       tensor_cores=tc)
                print(f"plan {dtype} H={H} D={D} tensor_cores={tc}: blocks={blocks} "
                      f"threads={threads} smem={smem} max_coresident={maxco} regs={regs} "
                      f"status={status} mma={mma} ({props.name}, "
                      f"{props.multi_processor_count} SMs)")
                assert blocks == D * (H // 8) and threads == 256 and regs <= 128
                # tensor cores: fp16/bf16 (fp32 only with allow_tf32), the slice in registers
                assert mma == (tc and dtype != torch.float32)
                assert smem == (8 * 128 * 8 * 4 if mma else 8 * H * es + 1024)
                if props.multi_processor_count >= 128 and H * D <= 2048:
                    assert status == 0
    assert plan(torch.float64, 256, 1)[5] == 1  # unsupported dtype
    assert plan(torch.float32, 256, 1, allow_tf32=True)[6] == 1  # TF32 on tensor cores
    assert plan(torch.bfloat16, 2048, 2, 2048)[6] == 0  # K_in + H > 2048: FMA
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.empty((), dtype=dtype).element_size()
        for H in (256, 1024):
            bw = plan(dtype, H, 2, 0, True)
            wave = plan(dtype, H, 2, H, tensor_cores=False)
            print(f"plan {dtype} H={H}: backward D=2 {bw}; wavefront 2 layers, FMA {wave}")
            assert bw[0] == 2 * (H // 8) and bw[4] <= 128 and wave[2] == 8 * 2 * H * es + 1024
            if props.multi_processor_count >= 128:
                assert bw[5] == 0 and wave[5] == 0
    for blocks in (32, 128, 2 * props.multi_processor_count):
        us = torch.ops.rnn_ext._cuda_grid_barrier_us(blocks, 2000)
        print(f"grid barrier: {blocks} blocks x 256 threads: {us:.2f} us per grid.sync()")
        assert 0 < us < 100


@_apply(needs_cuda)
def test_cuda_graph_capture(no_tf32, restore_kernel):
    """The persistent launch inside a captured CUDA graph: replay gives the eager result."""
    rnn_ext.set_cuda_kernel("persistent")
    m = rnn_ext.RNN(32, 128, num_layers=2).cuda()
    x = torch.randn(10, 4, 32, device="cuda")
    with torch.no_grad():
        want, _ = m(x)
        assert rnn_ext.cuda_kernel_used() == "persistent"
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _ = m(x)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
