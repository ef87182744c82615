"""Accuracy of the CPU activation kernels (csrc/cpu/activation.cpp), measured through the op.

The float32 tanh is rnn_ext's own vectorised approximation.  A one-layer RNN with an identity
input projection, zero recurrent weights and no bias computes exactly ``tanh(x)`` for every
element of its input (x * 1 + sums of exact zeros), so a (1, B, H) input sweeps the kernel over
B * H values, through the same vectorised row loop the RNN uses (H = 1024 and an odd H for the
loop tails).  On AVX-512 cores that is the step kernel's 16-lane tanh16; the same checks run on
the activation loops (`_cpu_activation`, the 8-lane tanh8), so both are tested on every machine
(they give bitwise the same values: tests/test_cpu_paths.py).  Errors are measured against
float64 tanh, in float32 ulps of the true value.

Measured (this build, AVX-512/AVX2 clones): max 2.0 ulp, max abs error 8.7e-8 (at x ~ -0.55),
max relative error 1.7e-7; torch.tanh in float32 is 0.5 ulp.  The bounds below (3 ulp) leave a
margin for other vector widths without hiding a real regression (a wrong coefficient or range
reduction shows as hundreds of ulps).
"""
from __future__ import annotations

import pytest
import torch

import rnn_ext  # noqa: F401  (registers the ops)

op_forward = torch.ops.rnn_ext.rnn_forward.default


def kernel_tanh(x: torch.Tensor, H: int) -> torch.Tensor:
    """tanh of every element of x (float32 or float64, numel a multiple of H) by the op."""
    rows = x.reshape(-1, H)
    B = rows.shape[0]
    w = [torch.eye(H, dtype=x.dtype), torch.zeros(H, H, dtype=x.dtype)]
    out = op_forward(rows.unsqueeze(0), torch.zeros(1, B, H, dtype=x.dtype), w, None, False, 1,
                     False, False, 0.0, False, False)[0]
    return out.reshape(x.shape)


def kernel_tanh_each(x: torch.Tensor, H: int = 16) -> torch.Tensor:
    """The same for values that must not share a row (inf * 0 = NaN in the identity product):
    input size 1 and w_ih = ones(H, 1), so each row is one value broadcast over H lanes."""
    n = x.numel()
    w = [torch.ones(H, 1, dtype=x.dtype), torch.zeros(H, H, dtype=x.dtype)]
    out = op_forward(x.reshape(1, n, 1), torch.zeros(1, n, H, dtype=x.dtype), w, None, False, 1,
                     False, False, 0.0, False, False)[0][0]
    assert torch.equal(out.isnan(), out[:, :1].isnan().expand_as(out))
    assert torch.equal(out.nan_to_num(), out[:, :1].nan_to_num().expand_as(out)), \
        "lanes of one row disagree"
    return out[:, 0]


def _sweep(H: int) -> torch.Tensor:
    dense = torch.linspace(-20, 20, 1 << 20, dtype=torch.float64).float()  # step 3.8e-5
    small = torch.logspace(-45, 1.31, 1 << 17, dtype=torch.float64).float()  # subnormal .. 20
    # around the branch points of the implementation (|x| = 0.4 and the saturation cap 9)
    edges = torch.cat([torch.linspace(c - 1e-3, c + 1e-3, 4097, dtype=torch.float64).float()
                       for c in (0.4, 9.0, 9.0109)])
    x = torch.cat([dense, small, -small, edges, -edges])
    pad = (-x.numel()) % H
    return torch.cat([x, torch.linspace(-3, 3, pad)]) if pad else x


def _ulps(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|y - tanh(x)| in ulps of float32 at tanh(x) (the spacing of floats at the true value)."""
    true = torch.tanh(x.double())
    t32 = true.float().abs()
    ulp = (torch.nextafter(t32, torch.tensor(float("inf"))) - t32).double()
    ulp = ulp.clamp_min(2.0 ** -149)
    return (y.double() - true).abs() / ulp


def loop_tanh(x: torch.Tensor, H: int = 0) -> torch.Tensor:
    """tanh by the activation loops (csrc/cpu/activation.cpp: the 8-lane tanh8 on every CPU
    with AVX2), where the RNN's step kernel runs the 16-lane tanh16 on AVX-512 cores: both are
    checked on every machine."""
    return torch.ops.rnn_ext._cpu_activation(x, False)


# the step kernel's epilogue (through the RNN op) and the activation loops
PATHS = {"step": (kernel_tanh, kernel_tanh_each), "loop": (loop_tanh, loop_tanh)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("H", [1024, 1021], ids=["H1024", "H1021-odd-tail"])
def test_float32_tanh_accuracy_sweep(H, path):
    kernel_tanh, _ = PATHS[path]
    x = _sweep(H)
    assert x.numel() > 1_000_000
    y = kernel_tanh(x, H)
    true = torch.tanh(x.double())
    err = (y.double() - true).abs()
    ulps = _ulps(y, x)
    worst = int(ulps.argmax())
    assert float(ulps.max()) <= 3.0, f"{float(ulps.max()):.2f} ulp at x={float(x[worst])!r}"
    assert float(err.max()) <= 1.8e-7, f"abs err {float(err.max()):.3g}"
    nz = true != 0
    rel = err[nz] / true[nz].abs()
    assert float(rel.max()) <= 3.6e-7, f"rel err {float(rel.max()):.3g}"
    # exactly odd, and never outside [-1, 1]
    assert torch.equal(kernel_tanh(-x, H), -y)
    assert float(y.abs().max()) <= 1.0


@pytest.mark.parametrize("path", list(PATHS))
def test_float32_tanh_tiny_and_subnormal_exact(path):
    """tanh(x) == x for |x| < 2^-12 in float32; subnormals come back unchanged."""
    _, kernel_tanh_each = PATHS[path]
    tiny = torch.tensor([1e-45, 1e-42, 1e-40, 1.1754942e-38, 1.17549435e-38, 1e-30, 1e-10,
                         1e-5, 2.0 ** -13])
    x = torch.cat([tiny, -tiny])
    y = kernel_tanh_each(x)
    assert torch.equal(y, x)
    assert torch.equal(y, torch.tanh(x))


@pytest.mark.parametrize("path", list(PATHS))
def test_float32_tanh_nan_and_zero(path):
    _, kernel_tanh_each = PATHS[path]
    y = kernel_tanh_each(torch.tensor([float("nan"), -float("nan"), 0.0, -0.0]))
    assert y[:2].isnan().all()
    assert (y[2:] == 0).all()  # (through the RNN the sign of -0 is lost, as in torch)


def test_float32_tanh_keeps_the_sign_of_zero():
    """tanh(-0) = -0 as torch's (the odd series' fma gives +0 there; the sign is OR-ed in).
    Through the RNN the sign is lost in the recurrent product (above), so the vector kernel is
    called on its own, over 8-lane blocks and a tail."""
    x = torch.tensor([-0.0, 0.0] * 9)
    y = torch.ops.rnn_ext._cpu_activation(x, False)
    assert torch.equal(torch.signbit(y), torch.signbit(torch.tanh(x)))
    assert (y == 0).all()


@pytest.mark.parametrize("path", list(PATHS))
def test_float32_tanh_saturates_to_exactly_one(path):
    _, kernel_tanh_each = PATHS[path]
    x = torch.tensor([9.02, 9.1, 10.0, 20.0, 88.0, 1e4, 3.4e38, float("inf")])
    x = torch.cat([x, -x])
    y = kernel_tanh_each(x)
    assert torch.equal(y, torch.tanh(x)), y
    assert torch.equal(y, torch.sign(x))


def test_float64_tanh_is_libm():
    x = torch.cat([torch.linspace(-20, 20, 100_003, dtype=torch.float64),
                   torch.logspace(-320, 1, 2001, dtype=torch.float64)])
    pad = (-x.numel()) % 512
    x = torch.cat([x, torch.zeros(pad, dtype=torch.float64)])
    y = kernel_tanh(x, 512)
    torch.testing.assert_close(y, torch.tanh(x), rtol=4.5e-16, atol=0)
    specials = torch.tensor([float("inf"), -float("inf"), 1e300, -1e300, float("nan")],
                            dtype=torch.float64)
    ys = kernel_tanh_each(specials)
    assert torch.equal(ys[:4], torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64))
    assert ys[4].isnan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_relu_kernel_exact(dtype):
    """relu is exact: max(x, 0), NaN propagated, inf kept."""
    x = torch.cat([torch.linspace(-5, 5, 4099, dtype=dtype),
                   torch.tensor([1e-40 if dtype == torch.float32 else 1e-310, -1e-30], dtype=dtype)])
    pad = (-x.numel()) % 257
    x = torch.cat([x, torch.ones(pad, dtype=dtype)])
    H = 257
    rows = x.reshape(-1, H)
    w = [torch.eye(H, dtype=dtype), torch.zeros(H, H, dtype=dtype)]
    y = op_forward(rows.unsqueeze(0), torch.zeros(1, rows.shape[0], H, dtype=dtype), w, None,
                   False, 1, False, True, 0.0, False, False)[0].reshape(-1)
    assert torch.equal(y, torch.relu(x))
    s = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype)
    w1 = [torch.ones(4, 1, dtype=dtype), torch.zeros(4, 4, dtype=dtype)]
    ys = op_forward(s.reshape(1, 3, 1), torch.zeros(1, 3, 4, dtype=dtype), w1, None, False, 1,
                    False, True, 0.0, False, False)[0][0, :, 0]
    assert ys[0] == float("inf") and ys[1] == 0 and ys[2].isnan()


def test_cpu_task_parallel_paths_match_torch_in_a_subprocess():
    """The opt-in task-parallel CPU paths (both directions at once; the layer wavefront for
    unidirectional stacks, forward and BPTT), read from RNN_EXT_CPU_TASK_PARALLEL at load time,
    give torch's results (float64, packed and dense, with dropout noise shared)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch, rnn_ext
        from torch.nn.utils.rnn import pack_padded_sequence
        torch.set_num_threads(2)
        torch.manual_seed(0)
        worst = 0.0
        for L in (2, 3):
            for bi in (False, True):
                for packed in (False, True):
                    ref = torch.nn.RNN(5, 7, L, bidirectional=bi).double()
                    m = rnn_ext.RNN(5, 7, L, bidirectional=bi).double()
                    m.load_state_dict(ref.state_dict())
                    x = torch.randn(37, 5, 5, dtype=torch.double, requires_grad=True)
                    h = torch.randn(L * (2 if bi else 1), 5, 7, dtype=torch.double,
                                    requires_grad=True)
                    inp = (pack_padded_sequence(x, [37, 30, 30, 9, 1], enforce_sorted=False)
                           if packed else x)
                    res = []
                    for mod in (ref, m):
                        o, hn = mod(inp, h)
                        od = o.data if packed else o
                        gs = torch.autograd.grad((od * od.detach().cos()).sum() + (hn * hn).sum(),
                                                 [x, h] + list(mod.parameters()), retain_graph=True)
                        res.append([od, hn] + list(gs))
                    worst = max(worst, max((a - b).abs().max().item() for a, b in zip(*res)))
        ref = torch.nn.RNN(5, 7, 3, dropout=0.4).double()
        m = rnn_ext.RNN(5, 7, 3, dropout=0.4).double()
        m.load_state_dict(ref.state_dict())
        x = torch.randn(40, 3, 5, dtype=torch.double)
        torch.manual_seed(5); o1, h1 = ref(x)
        torch.manual_seed(5); o2, h2 = m(x)
        worst = max(worst, (o1 - o2).abs().max().item(), (h1 - h2).abs().max().item())
        print(worst)
        """
    )
    env = dict(os.environ, RNN_EXT_CPU_TASK_PARALLEL="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-10


@pytest.mark.parametrize("rows_min", ["0", "1"], ids=["column-team", "row-team"])
def test_cpu_team_recurrence_matches_one_thread_and_torch_in_a_subprocess(rows_min):
    """The team recurrences (float32, forward and BPTT), forced on for every size with
    RNN_EXT_TEAM_MIN=0: the column team (the threads split each step's columns, one barrier per
    step; RNN_EXT_TEAM_ROWS_MIN=0) and the row team (each thread runs its own slice of the
    batch rows through all steps; =1, which takes every B >= 2): its forward is bitwise the
    single-thread result (the same kernel computes every element the same way), and output,
    h_n and every gradient agree with torch.nn.RNN, for partial column blocks (H = 17, 40),
    packed input with ragged lengths (rows finishing inside one thread's slice), uneven row
    slices (B = 3), both directions, relu and tanh."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import json, torch, rnn_ext
        from torch.nn.utils.rnn import pack_padded_sequence
        torch.manual_seed(0)
        fwd_bitwise, worst_torch, worst_threads, cases = True, 0.0, 0.0, 0
        for H in (17, 40, 64):
            for B, lengths in ((1, [23]), (3, [23, 23, 23]), (6, [23, 20, 20, 9, 2, 1])):
                for L, bi, nl, packed in ((1, False, 'tanh', False), (2, True, 'relu', True),
                                          (2, False, 'tanh', True), (1, True, 'tanh', False)):
                    ref = torch.nn.RNN(5, H, L, nonlinearity=nl, bidirectional=bi)
                    m = rnn_ext.RNN(5, H, L, nonlinearity=nl, bidirectional=bi)
                    m.load_state_dict(ref.state_dict())
                    x = torch.randn(23, B, 5, requires_grad=True)
                    h = torch.randn(L * (2 if bi else 1), B, H, requires_grad=True)
                    inp = (pack_padded_sequence(x, lengths, enforce_sorted=False)
                           if packed else x)
                    res = {}
                    for name, mod, threads in (('team', m, 2), ('one', m, 1), ('torch', ref, 2)):
                        torch.set_num_threads(threads)
                        o, hn = mod(inp, h)
                        od = o.data if packed else o
                        gs = torch.autograd.grad((od * od.detach().cos()).sum() + (hn * hn).sum(),
                                                 [x, h] + list(mod.parameters()),
                                                 retain_graph=True)
                        res[name] = [od, hn] + list(gs)
                    fwd_bitwise &= all(torch.equal(a, b) for a, b in
                                       zip(res['team'][:2], res['one'][:2]))
                    worst_torch = max(worst_torch, max((a - b).abs().max().item()
                                                       for a, b in zip(res['team'], res['torch'])))
                    worst_threads = max(worst_threads, max((a - b).abs().max().item()
                                                           for a, b in zip(res['team'], res['one'])))
                    cases += 1
        print(json.dumps(dict(fwd_bitwise=fwd_bitwise, worst_torch=worst_torch,
                              worst_threads=worst_threads, cases=cases)))
        """
    )
    env = dict(os.environ, RNN_EXT_TEAM_MIN="0", RNN_EXT_TEAM_ROWS_MIN=rows_min,
               RNN_EXT_CPU_TASK_PARALLEL="0")  # (the tasks run their recurrences alone)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["cases"] == 36
    assert r["fwd_bitwise"], r
    assert r["worst_torch"] < 2e-4, r
    assert r["worst_threads"] < 1e-5, r


# --- the weight-gradient outer-product kernel (csrc/cpu/wgrad_kernel.cpp) -----------------------

outer = torch.ops.rnn_ext._cpu_outer_product
# (the kernel needs AVX2 and FMA, as the step kernel does)
needs_outer = pytest.mark.skipif(torch.ops.rnn_ext._cpu_step_kernel_isa(16) == "none",
                                 reason="the outer-product kernel needs AVX2 and FMA")

# M and N over the register tiles' edges (AVX-512: 6 rows x 16-64 columns; AVX2: 3 x 8-32) and
# the transposed form (N < 32 <= M); K over the 64-row chunks' edges and the 256-row parts.
OUTER_MN = [(1, 1), (3, 5), (6, 16), (7, 17), (13, 31), (5, 32), (32, 7), (33, 16), (64, 64),
            (65, 63), (100, 3), (129, 130)]
OUTER_K = [0, 1, 63, 64, 65, 130, 700]


@needs_outer
@pytest.mark.parametrize("threaded", [False, True], ids=["one-thread", "threads"])
def test_outer_product_kernel_matches_float64(threaded):
    """a^T b by the kernel, for every (M, N) and K above, with rows at a stride (a view of a
    wider matrix), against the float64 product: the error of every element is within float32
    rounding of its K products (<= K ulp-sized steps of sum |a| |b|, far below any real bug,
    which shows as errors of the products' own size).  K = 0 gives exact zeros."""
    g = torch.Generator().manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(3 if threaded else 1)
    try:
        for M, N in OUTER_MN:
            for K in OUTER_K:
                a = torch.randn(K, M + 3, generator=g)[:, 1:M + 1]  # row stride M + 3
                b = torch.randn(K, N + 5, generator=g)[:, 2:N + 2]
                c = outer(a, b, threaded)
                want = a.double().t() @ b.double()
                bound = (a.double().abs().t() @ b.double().abs()) * (K + 1) * 2.0 ** -24
                assert c.shape == (M, N) and c.dtype == torch.float32
                assert ((c.double() - want).abs() <= bound).all(), (M, N, K)
    finally:
        torch.set_num_threads(old)


@needs_outer
@pytest.mark.parametrize("threaded", [False, True], ids=["one-thread", "threads"])
def test_outer_product_kernel_orientations_bitwise_equal(threaded):
    """Every element sums its products chunk by chunk in row order, whatever tile, register
    width or orientation computes it: a^T b is bitwise (b^T a)^T, which for N < 32 <= M is the
    transposed form against the direct one, and elsewhere other tile shapes."""
    g = torch.Generator().manual_seed(1)
    old = torch.get_num_threads()
    torch.set_num_threads(3 if threaded else 1)
    try:
        for M, N in OUTER_MN:
            for K in (65, 700):
                a, b = torch.randn(K, M, generator=g), torch.randn(K, N, generator=g)
                assert torch.equal(outer(a, b, threaded), outer(b, a, threaded).t()), (M, N, K)
    finally:
        torch.set_num_threads(old)


def test_outer_product_kernel_rejects_bad_input():
    with pytest.raises(RuntimeError, match="float32 CPU matrices"):
        outer(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2), False)
    with pytest.raises(RuntimeError, match="float32 CPU matrices"):
        outer(torch.randn(3, 2), torch.randn(4, 2), False)
    with pytest.raises(RuntimeError, match="float32 CPU matrices"):
        outer(torch.randn(2, 3).t(), torch.randn(3, 2), False)
