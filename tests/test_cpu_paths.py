"""Every float32 code path of the CPU recurrence, forced and compared tightly with the truth.

The path a float32 recurrence takes depends on the thread count and on switches read once per
process (csrc/cpu/rnn_cpu.cpp), so each path runs in its own subprocess:

* ``step_kernel``: one thread: the register-blocked step kernel (csrc/cpu/step_kernel.cpp)
  forward and BPTT (AVX-512 blocks on cores that have it, else AVX2);
  ``step_kernel_avx512`` / ``step_kernel_avx2``: the same with RNN_EXT_CPU_ISA forcing one kind
  of block at every H;
* ``row_team`` / ``column_team``: 3 threads, RNN_EXT_TEAM_MIN=0 with RNN_EXT_TEAM_ROWS_MIN=1
  (each thread its own slice of batch rows, uneven slices included) or =0 (threads split each
  step's 16-column blocks, one barrier per step);
* ``blas_step``: 3 threads, no team (RNN_EXT_TEAM_MIN=2^62) and RNN_EXT_STEP_BLAS_MIN=0: every
  step of >= 16 rows is a multi-threaded BLAS call followed by the separate nonlinearity;
* ``no_openmp``: 3 threads, no team, default thresholds: what a build without OpenMP runs
  (team_kind() is kNone there), the step kernel for small steps and BLAS for large ones;
* ``three_threads``: 3 threads, every switch at its default;
* ``wgrad_blas`` / ``wgrad_kernel``: the weight gradients through BLAS at every size
  (RNN_EXT_CPU_WGRAD=blas), or through the outer-product kernel (csrc/cpu/wgrad_kernel.h) at
  every size with the rows split over 3 threads (=kernel); by default the kernel takes weights
  of up to 128 x 128 elements.

Sizes fill whole 16-column register blocks and their edges (H = 16, 17, 31, 32, 33, ..., 257),
and row blocks of 1..6 rows and their splits (B = 1..8, 13, 16, 17).  Each result (output,
h_n, every gradient) is judged against float64 truth -- torch.nn.RNN in float64, itself checked
against rnn_ext.reference -- relative to torch.nn.RNN's own float32 error on the same case:
rnn_ext's error must be at most 2x torch's plus a few float32 ulps of the tensor's scale.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from conftest import make_pair

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, rnn_ext
    from torch.nn.utils.rnn import pack_padded_sequence
    threads, cases = json.loads(sys.argv[1])
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    worst = []
    for (H, B, L, bi, nl, packed) in cases:
        torch.manual_seed(H * 131 + B)
        ref = torch.nn.RNN(7, H, L, nonlinearity=nl, bidirectional=bi)
        m = rnn_ext.RNN(7, H, L, nonlinearity=nl, bidirectional=bi)
        m.load_state_dict(ref.state_dict())
        T = 6
        x = torch.randn(T, B, 7)
        h = torch.randn(L * (2 if bi else 1), B, H)
        lengths = [T - (r * 5) % T for r in range(B)]  # ragged, unsorted
        res = {}
        for name, mod, dt in (('ext', m, torch.float32), ('torch32', ref, torch.float32),
                              ('torch64', ref, torch.float64), ('ref64', m, torch.float64)):
            mod = mod.to(dt)
            xx = x.to(dt).requires_grad_()
            hh = h.to(dt).requires_grad_()
            inp = pack_padded_sequence(xx, lengths, enforce_sorted=False) if packed else xx
            if name == 'ref64':
                o, hn = rnn_ext.reference.module_forward(mod, inp, hh)
            else:
                o, hn = mod(inp, hh)
            od = o.data if packed else o
            g = torch.Generator().manual_seed(7)
            loss = (od * torch.randn(od.shape, generator=g, dtype=torch.float64).to(dt)).sum() \\
                + (hn * torch.randn(hn.shape, generator=g, dtype=torch.float64).to(dt)).sum()
            gs = torch.autograd.grad(loss, [xx, hh] + list(mod.parameters()))
            res[name] = [t.detach().double() for t in [od, hn, *gs]]
            mod.float()
        # the float64 truth: torch.nn.RNN and the reference agree
        ref_gap = max(float((a - b).abs().max()) for a, b in zip(res['torch64'], res['ref64']))
        assert ref_gap < 1e-9, ref_gap
        for i, (e, t32, t64) in enumerate(zip(res['ext'], res['torch32'], res['torch64'])):
            scale = max(1.0, float(t64.abs().max()))
            err_ext = float((e - t64).abs().max()) / scale
            err_torch = float((t32 - t64).abs().max()) / scale
            worst.append(dict(case=[H, B, L, bi, nl, packed], tensor=i, ext=err_ext,
                              torch=err_torch))
    print(json.dumps([torch.ops.rnn_ext._cpu_weight_product(16, 16),
                      torch.ops.rnn_ext._cpu_weight_product(257, 257)]))
    print(json.dumps(worst))
    """
)

H_EDGES = [16, 17, 31, 32, 33, 48, 63, 64, 65, 127, 128, 129, 257]
HUGE = str(2**62)

# path -> (env, threads, cases (H, B, L, bidirectional, nonlinearity, packed))
PATHS = {
    "step_kernel": ({}, 1, [(H, B, 1, B % 2 == 0, "tanh" if B % 3 else "relu", B % 4 == 3)
                            for H in H_EDGES for B in (1, 2, 3, 4, 5, 6, 7, 8, 13)]
                    + [(33, 5, 2, True, "tanh", True), (17, 6, 3, False, "relu", False)]),
    # the AVX-512 blocks at every K (the default on a CPU with AVX-512), and the AVX2 ones
    # (without AVX-512 both are the AVX2 path)
    "step_kernel_avx512": ({"RNN_EXT_CPU_ISA": "avx512"}, 1,
                           [(H, B, 1, B % 2 == 0, "tanh" if B % 3 else "relu", B % 4 == 3)
                            for H in H_EDGES for B in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13)]),
    "step_kernel_avx2": ({"RNN_EXT_CPU_ISA": "avx2"}, 1,
                         [(H, B, 1, B % 2 == 0, "tanh" if B % 3 else "relu", B % 4 == 3)
                          for H in H_EDGES for B in (1, 2, 3, 4, 5, 6, 7, 8, 13)]),
    "row_team": ({"RNN_EXT_TEAM_MIN": "0", "RNN_EXT_TEAM_ROWS_MIN": "1"}, 3,
                 [(H, B, 1, H % 2 == 1, "tanh" if B % 2 else "relu", B == 7)
                  for H in (16, 17, 33, 64, 129) for B in (3, 4, 5, 7, 13)]
                 + [(40, 7, 2, True, "tanh", True)]),
    "column_team": ({"RNN_EXT_TEAM_MIN": "0", "RNN_EXT_TEAM_ROWS_MIN": "0"}, 3,
                    [(H, B, 1, H % 2 == 1, "relu" if B == 2 else "tanh", B == 3)
                     for H in (17, 31, 48, 65, 128, 257) for B in (1, 2, 3)]
                    + [(40, 3, 2, True, "tanh", True)]),
    "blas_step": ({"RNN_EXT_TEAM_MIN": HUGE, "RNN_EXT_STEP_BLAS_MIN": "0"}, 3,
                  [(H, B, 1, H % 2 == 0, "tanh" if B != 17 else "relu", B == 20)
                   for H in (16, 17, 33, 64, 129) for B in (16, 17, 20)]
                  + [(33, 18, 2, True, "tanh", False)]),
    "no_openmp": ({"RNN_EXT_TEAM_MIN": HUGE}, 3,
                  [(96, 16, 1, False, "tanh", False), (128, 20, 1, True, "relu", False),
                   (64, 4, 1, True, "tanh", True), (100, 17, 2, False, "tanh", True)]),
    # the weight gradients (csrc/cpu/wgrad_kernel.h) through BLAS at every size, and through
    # the outer-product kernel at every size with the rows split over 3 threads (B = 90, 130:
    # N = 540, 780 rows, 2 and 3 parts of >= 256), transposed products (I = 7 < 32 <= H)
    "wgrad_blas": ({"RNN_EXT_CPU_WGRAD": "blas"}, 3,
                   [(H, B, L, H % 2 == 1, "tanh", B == 5) for H in (16, 33, 64)
                    for (B, L) in ((5, 2), (90, 1))]),
    "wgrad_kernel": ({"RNN_EXT_CPU_WGRAD": "kernel"}, 3,
                     [(H, B, L, H % 2 == 0, "relu" if B == 90 else "tanh", B != 130)
                      for H in (16, 33, 129, 257) for (B, L) in ((5, 2), (90, 1), (130, 1))]),
    "three_threads": ({}, 3,
                      [(64, 8, 2, True, "tanh", False), (33, 3, 2, False, "relu", True),
                       (128, 16, 1, False, "tanh", False), (17, 1, 3, True, "tanh", True)]),
}


def _run_path(env_extra, threads, cases):
    env = dict(os.environ, RNN_EXT_CPU_TASK_PARALLEL="0", OMP_NUM_THREADS=str(threads))
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([threads, cases])],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]), json.loads(lines[-2])


@pytest.mark.parametrize("path", list(PATHS))
def test_float32_path_matches_float64_truth(path):
    env, threads, cases = PATHS[path]
    rows, weight_products = _run_path(env, threads, cases)
    # the weight gradients of a 16 x 16 and a 257 x 257 weight went where the path says
    has_kernel = torch.ops.rnn_ext._cpu_step_kernel_isa(16) != "none"
    want = {"wgrad_blas": [False, False], "wgrad_kernel": [has_kernel, has_kernel]}.get(
        path, [has_kernel, False])
    assert [w != "blas" for w in weight_products] == want, weight_products
    assert len(rows) == sum(4 + (2 if c[3] else 1) * 4 * c[2] for c in cases)
    bad = [r for r in rows if r["ext"] > 2 * r["torch"] + 4e-7]
    assert not bad, f"{len(bad)} tensors: rnn_ext's float32 error above 2x torch's: {bad[:5]}"


ISA_SCRIPT = textwrap.dedent(
    """
    import sys, torch, rnn_ext
    torch.set_num_threads(int(sys.argv[2]))
    res = [torch.ops.rnn_ext._cpu_step_kernel_isa(16), torch.ops.rnn_ext._cpu_step_kernel_isa(128)]
    for (H, B, L, bi, nl) in [(16, 1, 1, False, "tanh"), (40, 3, 2, True, "relu"),
                              (64, 6, 1, False, "tanh"), (128, 9, 1, False, "relu"),
                              (130, 13, 2, True, "tanh"), (256, 16, 1, False, "tanh")]:
        torch.manual_seed(H + B)
        m = rnn_ext.RNN(5, H, L, bidirectional=bi, nonlinearity=nl)
        x = torch.randn(7, B, 5, requires_grad=True)
        out, hn = m(x)
        loss = (out * torch.randn(out.shape)).sum() + (hn * torch.randn(hn.shape)).sum()
        res.append([out, hn, *torch.autograd.grad(loss, [x, *m.parameters()])])
    # the weight-gradient kernel alone: tiles of every width, the transposed form, 2 parts
    g = torch.Generator().manual_seed(0)
    res.append([torch.ops.rnn_ext._cpu_outer_product(torch.randn(K, M, generator=g),
                                                     torch.randn(K, N, generator=g), True)
                for (K, M, N) in [(65, 7, 17), (130, 33, 16), (700, 64, 64), (129, 129, 130)]])
    torch.save(res, sys.argv[1])
    """
)


@pytest.mark.parametrize("threads", [1, 2])
def test_step_kernel_isas_bitwise_equal(tmp_path, threads):
    """The AVX-512 and AVX2 step-kernel blocks sum every element's products in the same order
    with the same epilogue: outputs and gradients are bitwise equal (partial 16-column blocks,
    row blocks of every size, both directions, forward and BPTT); so are the AVX-512 and AVX2
    tiles of the weight-gradient kernel (within the gradients, and on its own)."""
    got = {}
    for isa in ("avx2", "avx512"):
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, RNN_EXT_CPU_ISA=isa, RNN_EXT_CPU_TASK_PARALLEL="0")
        out = subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(path), str(threads)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        got[isa] = torch.load(path)
    assert got["avx2"][:2] == ["avx2", "avx2"]
    if got["avx512"][:2] != ["avx512", "avx512"]:
        assert got["avx512"][:2] == ["avx2", "avx2"]
        pytest.skip("this CPU has no AVX-512: only the AVX2 blocks exist here")
    for case_a, case_b in zip(got["avx2"][2:], got["avx512"][2:]):
        for a, b in zip(case_a, case_b):
            assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_long_sequence_matches_torch_and_reference(dtype):
    """T = 5000 steps (both directions): output, h_n and every gradient against torch.nn.RNN,
    output and h_n also against rnn_ext.reference (whose backward over 5000 steps takes
    minutes); float32 judged against the float64 truth relative to torch's own float32 error.
    Dense input only: torch.nn.RNN's packed backward over 5000 steps takes minutes too (packed
    input is compared at T = 6 above and in tests/test_packed.py)."""
    T, B, H = 5000, 2, 17
    ref, ext = make_pair(3, H, num_layers=1, bidirectional=True, dtype=torch.float64, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, 3, generator=g, dtype=torch.float64)
    hx = torch.randn(2, B, H, generator=g, dtype=torch.float64)

    def run(m, dt, packed, oracle=False):
        m = m.to(dt)
        xx, hh = x.to(dt).requires_grad_(), hx.to(dt).requires_grad_()
        inp = pack_padded_sequence(xx, [T - 1234, T], enforce_sorted=False) if packed else xx
        if oracle:
            with torch.no_grad():
                o, hn = rnn_ext.reference.module_forward(m, inp, hh)
            m.double()
            return [(o.data if packed else o).double(), hn.double()]
        o, hn = m(inp, hh)
        od = o.data if packed else o
        gg = torch.Generator().manual_seed(4)
        loss = (od * torch.randn(od.shape, generator=gg, dtype=torch.float64).to(dt)).sum() + \
            (hn * torch.randn(hn.shape, generator=gg, dtype=torch.float64).to(dt)).sum()
        grads = torch.autograd.grad(loss, [xx, hh] + list(m.parameters()))
        out = [t.detach().double() for t in [od, hn, *grads]]
        m.double()
        return out

    for packed in (False,):
        truth = run(ref, torch.float64, packed)
        oracle = run(ext, torch.float64, packed, oracle=True)
        for a, b in zip(truth[:2], oracle):
            torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9)
        got = run(ext, dtype, packed)
        theirs = run(ref, dtype, packed) if dtype != torch.float64 else truth
        for i, (e, t, w) in enumerate(zip(got, theirs, truth)):
            scale = max(1.0, float(w.abs().max()))
            err = float((e - w).abs().max()) / scale
            if dtype == torch.float64:
                assert err < 1e-10, (packed, i, err)
            else:
                err_torch = float((t - w).abs().max()) / scale
                assert err <= 2 * err_torch + 1e-6, (packed, i, err, err_torch)
