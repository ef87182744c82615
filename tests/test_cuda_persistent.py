"""The persistent forward kernel (issue 5; csrc/cuda/rnn_persistent.cu) and its switch.

* CPU-runnable: the switch ops exist in every build and validate their argument; a numpy
  simulation of the kernel's thread mapping (W slice layout, per-lane k ranges, accumulator
  layout, the warp reduce-scatter, the cross-warp sum, the epilogue, both directions, the step
  order and the in-place hazards) reproduces a reference RNN for many (B, H, D, vector width).
* ``cuda``-marked (skipped without a GPU and a CUDA build): with ``set_cuda_kernel("persistent")``,
  parity with the step path and with cuDNN for fp32 / bf16 / fp16, B in {1, 8, 32},
  H in {64, 256, 512, 1024}, uni / bi, L in {1, 2}, tanh / relu; ``cuda_kernel_used()`` reports
  "persistent" where the kernel is feasible and "step" where it must fall back.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext


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
    with pytest.raises(ValueError, match="unknown kernel"):
        rnn_ext.set_cuda_kernel(bad)
    with pytest.raises(RuntimeError, match="unknown kernel"):
        torch.ops.rnn_ext.set_cuda_kernel(bad)
    # the setting is unchanged by a rejected call
    assert rnn_ext.set_cuda_kernel("step") == "step"


def test_switch_rejects_non_strings():
    with pytest.raises(ValueError):
        rnn_ext.set_cuda_kernel(1)  # type: ignore[arg-type]


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
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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
    rnn_ext.set_cuda_kernel("persistent")
    pers = _run(ext, x, hx, dtype, "cuda")
    assert rnn_ext.cuda_kernel_used() == "persistent", "feasible on an H100/H200: H <= 1024"
    cudnn = _run(base, x, hx, dtype, "cuda")
    if dtype == torch.float32:
        for k in step:
            assert _rel(pers[k], step[k]) <= 5e-5, f"{k} vs step"
            assert _rel(pers[k], cudnn[k]) <= 5e-5, f"{k} vs cuDNN"
    else:
        truth = _run(ext, x, hx, torch.float64, "cpu")
        for k in truth:
            e_p, e_s, e_c = (_rel(r[k], truth[k]) for r in (pers, step, cudnn))
            assert e_p <= max(3 * e_c, 3 * e_s, HALF_FLOOR[dtype]), (
                f"{k}: persistent {e_p:.3g}, step {e_s:.3g}, cuDNN {e_c:.3g}")


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
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for H, D in ((256, 1), (1024, 1), (1024, 2), (2048, 1)):
            blocks, threads, smem, maxco, regs, status = torch.ops.rnn_ext._cuda_persistent_plan(
                dtype, H, D)
            print(f"plan {dtype} H={H} D={D}: blocks={blocks} threads={threads} smem={smem} "
                  f"max_coresident={maxco} regs={regs} status={status} "
                  f"({props.name}, {props.multi_processor_count} SMs)")
            assert blocks == D * (H // 8) and threads == 256 and regs <= 128
            if props.multi_processor_count >= 128 and H * D <= 2048:
                assert status == 0
    assert torch.ops.rnn_ext._cuda_persistent_plan(torch.float64, 256, 1)[-1] == 1
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
