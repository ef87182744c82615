"""Shared helpers for the rnn_ext test suite.

The pattern used throughout: build a ``torch.nn.RNN`` and an ``rnn_ext.RNN`` with the same
configuration and identical weights, run both on the same inputs, then backpropagate the same
random cotangents through ``output`` and ``h_n`` and compare outputs, ``h_n`` and every gradient
(input, hx, each parameter).
"""
from __future__ import annotations

import copy
import random

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


def forward_backward(module, x, hx=None, *, cot_seed=1, backward=True):
    """Runs ``module(x, hx)`` and, if asked, backpropagates fixed random cotangents through
    output and h_n.  Returns (output tensor, h_n, dict of gradients) where the dict has 'input',
    'hx' and every parameter name (None when no gradient was formed)."""
    x = clone_input(x)
    hx = clone_input(hx)
    for p in module.parameters():
        p.grad = None
    out, hn = module(x) if hx is None else module(x, hx)
    out_t = _data(out)
    grads = {}
    if backward:
        g = torch.Generator().manual_seed(cot_seed)
        go = torch.randn(out_t.shape, generator=g, dtype=torch.float64).to(out_t.dtype)
        gh = torch.randn(hn.shape, generator=g, dtype=torch.float64).to(hn.dtype)
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
