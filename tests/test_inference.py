"""Inference (no autograd graph: torch.no_grad and torch.inference_mode) against torch.nn.RNN and
rnn_ext.reference, for 1-6 layers, uni/bi, tanh/relu, dense and packed (unsorted, ragged).

Without grad the kernel saves nothing and reuses two scratch layer buffers for the inner layers
(csrc/cpu/rnn_cpu.cpp), a path that every comparison that also runs backward never takes;
h_n of each layer must be read before layer l + 2 overwrites its slot.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from conftest import make_pair

CTX = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
LENGTHS = [7, 2, 5, 7]  # unsorted, ragged: rows finish (forward) / start (reverse) mid-sequence


def _tol(dtype):
    return dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("ctx", list(CTX))
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("L", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_inference_matches_torch_and_reference(dtype, L, bidirectional, nonlinearity, packed,
                                               ctx):
    D = 2 if bidirectional else 1
    ref, ext = make_pair(5, 9, num_layers=L, nonlinearity=nonlinearity,
                         bidirectional=bidirectional, dtype=dtype, seed=L)
    g = torch.Generator().manual_seed(100 + L)
    x = torch.randn(7, 4, 5, generator=g, dtype=torch.float64).to(dtype)
    hx = torch.randn(L * D, 4, 9, generator=g, dtype=torch.float64).to(dtype)
    inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
    with CTX[ctx]():
        out, hn = ext(inp, hx)
        r_out, r_hn = ref(inp, hx)
        o_out, o_hn = rnn_ext.reference.module_forward(ext, inp, hx)
    data = (lambda o: o.data) if packed else (lambda o: o)
    assert not data(out).requires_grad and not hn.requires_grad
    tol = _tol(dtype)
    for name, want in (("torch.nn.RNN", (r_out, r_hn)), ("reference", (o_out, o_hn))):
        torch.testing.assert_close(data(out), data(want[0]), **tol,
                                   msg=lambda m: f"output vs {name}: {m}")
        torch.testing.assert_close(hn, want[1], **tol, msg=lambda m: f"h_n vs {name}: {m}")


@pytest.mark.parametrize("L", [3, 4, 6])
def test_inference_equals_training_forward_bitwise(L):
    """The no-grad forward computes the same values as the one that saves for backward (the same
    kernels on the same data; only where the inner layers live differs)."""
    _, ext = make_pair(6, 33, num_layers=L, bidirectional=True)
    x = torch.randn(9, 3, 6)
    out_g, hn_g = ext(x.requires_grad_())
    with torch.inference_mode():
        out_i, hn_i = ext(x.detach())
    assert torch.equal(out_g.detach(), out_i) and torch.equal(hn_g.detach(), hn_i)
