"""Gradients with dropout, packed input, relu and both directions against torch.nn.RNN's own
autograd: first order (rnn_ext's C++ backward) and second order (create_graph=True: the
differentiable backward, rnn_ext/ops.py, which recomputes the forward with rnn_ext.reference and
the saved dropout noise).

gradgradcheck alone cannot judge the second order: its numerical side differentiates the same
recomputation, so a mistake in what is recomputed (e.g. the dropout masks left out) passes it.
torch.nn.RNN (CPU, composite ops) is an independent double backward: with the same seed it
draws the same dropout masks, so first and second derivatives must agree to float64 rounding.
Where there is no dropout, rnn_ext.reference (plain autograd) is compared too.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from conftest import make_pair

TOL = dict(atol=1e-9, rtol=1e-9)

# (name, num_layers, bidirectional, nonlinearity, packed, dropout, with_hx)
CASES = [
    ("dropout", 3, False, "tanh", False, 0.4, True),
    ("packed", 2, True, "tanh", True, 0.0, False),
    ("relu", 2, False, "relu", False, 0.0, True),
    ("bidirectional", 2, True, "tanh", False, 0.0, True),
    ("packed-dropout", 3, False, "tanh", True, 0.5, True),
    ("relu-dropout", 3, False, "relu", False, 0.3, False),
    # everything at once: relu, both directions, unsorted ragged packed input, dropout, hx
    ("relu-bi-packed-dropout-hx", 3, True, "relu", True, 0.4, True),
]
LENGTHS = [6, 3, 6, 1, 4]  # unsorted, ragged


def _case(L, bi, nl, packed, dropout, with_hx):
    ref, ext = make_pair(4, 6, num_layers=L, bidirectional=bi, nonlinearity=nl,
                         dropout=dropout, dtype=torch.float64, seed=3)
    ref.train()
    ext.train()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, len(LENGTHS), 4, generator=g, dtype=torch.float64)
    hx = (torch.randn(L * (2 if bi else 1), len(LENGTHS), 6, generator=g, dtype=torch.float64)
          if with_hx else None)
    return ref, ext, x, hx


def _derivatives(m, x, hx, packed, *, create_graph, seed=1234):
    """First derivatives of a fixed linear functional of (output, h_n) w.r.t. input, hx and the
    parameters, and (create_graph) the derivatives of <first derivatives, v> w.r.t. the same."""
    x = x.detach().clone().requires_grad_()
    leaves = [x]
    if hx is not None:
        hx = hx.detach().clone().requires_grad_()
        leaves.append(hx)
    leaves += list(m.parameters())
    inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
    torch.manual_seed(seed)  # the same dropout masks for torch.nn.RNN and rnn_ext
    out, hn = m(inp, hx)
    od = out.data if isinstance(out, PackedSequence) else out
    g = torch.Generator().manual_seed(5)
    loss = (od * torch.randn(od.shape, generator=g, dtype=od.dtype)).sum() + \
        (hn * torch.randn(hn.shape, generator=g, dtype=hn.dtype)).sum()
    first = torch.autograd.grad(loss, leaves, create_graph=create_graph)
    if not create_graph:
        return [od, hn, *first], []
    s = sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in first)
    second = torch.autograd.grad(s, leaves, allow_unused=True)
    second = [torch.zeros_like(lf) if d is None else d for d, lf in zip(second, leaves)]
    return [od.detach(), hn.detach(), *(f.detach() for f in first)], second


class _Reference(torch.nn.Module):
    """rnn_ext.reference with the module's own parameters (no dropout: eval semantics)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def parameters(self, recurse=True):
        return self.m.parameters(recurse)

    def forward(self, x, hx=None):
        return rnn_ext.reference.module_forward(self.m, x, hx)


def _compare(a, b, what):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        torch.testing.assert_close(v, u, **TOL, msg=lambda m: f"{what} #{i}: {m}")


@pytest.mark.parametrize("name,L,bi,nl,packed,dropout,with_hx", CASES, ids=[c[0] for c in CASES])
def test_double_backward_matches_torch(name, L, bi, nl, packed, dropout, with_hx):
    ref, ext, x, hx = _case(L, bi, nl, packed, dropout, with_hx)
    f_ref, s_ref = _derivatives(ref, x, hx, packed, create_graph=True)
    f_ext, s_ext = _derivatives(ext, x, hx, packed, create_graph=True)
    _compare(f_ref, f_ext, "first order (create_graph) vs torch.nn.RNN")
    _compare(s_ref, s_ext, "second order vs torch.nn.RNN")
    assert any(float(s.abs().max()) > 1e-3 for s in s_ext)  # a real second derivative
    if dropout == 0:
        f_o, s_o = _derivatives(_Reference(ext), x, hx, packed, create_graph=True)
        _compare(f_o, f_ext, "first order vs rnn_ext.reference")
        _compare(s_o, s_ext, "second order vs rnn_ext.reference")


@pytest.mark.parametrize("name,L,bi,nl,packed,dropout,with_hx",
                         [c for c in CASES if c[5] > 0], ids=[c[0] for c in CASES if c[5] > 0])
def test_dropout_backward_matches_torch(name, L, bi, nl, packed, dropout, with_hx):
    """First order (the C++ BPTT with the saved noise) with dropout, incl. relu and packed."""
    ref, ext, x, hx = _case(L, bi, nl, packed, dropout, with_hx)
    f_ref, _ = _derivatives(ref, x, hx, packed, create_graph=False)
    f_ext, _ = _derivatives(ext, x, hx, packed, create_graph=False)
    _compare(f_ref, f_ext, "first order vs torch.nn.RNN")
    # a different seed draws other masks: the comparison above is not vacuous
    f_other, _ = _derivatives(ext, x, hx, packed, create_graph=False, seed=99)
    assert not torch.allclose(f_other[0], f_ext[0])
