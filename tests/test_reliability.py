"""Reliability (issue 7): fuzzed parity including extreme values, NaN and Inf; hostile input;
memory; determinism; thread safety.  The CUDA parts are marked ``cuda`` (skipped without a GPU
and a CUDA build of rnn_ext; bench/gpu_check.sh runs them, also under compute-sanitizer).

Everything here is deterministic: hypothesis runs derandomized with a bounded number of
examples, and every tensor comes from a seeded torch.Generator.
"""
from __future__ import annotations

import copy
import gc
import os
import threading

import pytest

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from rnn_ext import reference
from conftest import ReferenceModule, forward_backward, make_pair

op_forward = torch.ops.rnn_ext.rnn_forward.default
op_backward = torch.ops.rnn_ext.rnn_backward.default


def _fuzz_settings(n):
    return settings(
        derandomize=True, max_examples=n, deadline=None, database=None, print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------------------------
# Fuzzed parity: random configurations and random (also extreme / non-finite) values
# --------------------------------------------------------------------------------------------

FORMS = ["dense", "unbatched", "packed_sorted", "packed_unsorted"]
VALUES = ["normal", "extreme", "nonfinite"]


@st.composite
def cases(draw, values=VALUES, nonlinearity=("tanh", "relu")):
    return dict(
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        nonlinearity=draw(st.sampled_from(nonlinearity)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        input_size=draw(st.sampled_from([1, 2, 3, 5, 8, 17, 33])),
        hidden_size=draw(st.sampled_from([1, 2, 3, 4, 7, 16, 31, 64])),
        seq_len=draw(st.integers(1, 9)),
        batch=draw(st.integers(1, 6)),
        form=draw(st.sampled_from(FORMS)),
        with_hx=draw(st.booleans()),
        values=draw(st.sampled_from(values)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _sprinkle(t, g, pool, frac):
    """Replaces a random fraction (at least one element) of t by values drawn from pool."""
    if t.numel() == 0:
        return t
    flat = t.reshape(-1).clone()
    n = max(1, int(frac * flat.numel()))
    idx = torch.randperm(flat.numel(), generator=g)[:n]
    choice = torch.randint(len(pool), (n,), generator=g)
    flat[idx] = torch.tensor(pool, dtype=torch.float64)[choice].to(t.dtype)
    return flat.view(t.shape)


def _values(shape, g, kind, dtype):
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    tiny = 1e-40 if dtype == torch.float32 else 1e-310  # subnormal
    if kind == "extreme":
        pool = [1e4, -1e4, 1e-30, -1e-30, tiny, -tiny, 0.0, -0.0]
        t = _sprinkle(t, g, pool, 0.3)
    elif kind == "nonfinite":
        t = _sprinkle(t, g, [float("nan"), float("inf"), float("-inf"), 1e4], 0.05)
    return t.to(dtype)


def build_fuzz_case(c, dtype):
    """(ref, ext, input, hx) for one drawn case; the input is a tensor or a PackedSequence."""
    ref, ext = make_pair(
        c["input_size"], c["hidden_size"], num_layers=c["num_layers"],
        nonlinearity=c["nonlinearity"], bias=c["bias"], batch_first=c["batch_first"],
        bidirectional=c["bidirectional"], dtype=dtype, seed=c["seed"] % 1000,
    )
    g = torch.Generator().manual_seed(c["seed"])
    T, B, I, H = c["seq_len"], c["batch"], c["input_size"], c["hidden_size"]
    D = 2 if c["bidirectional"] else 1
    form = c["form"]
    # Non-finite values go only into the input or only into hx, half of the time each, so that
    # most cases keep some finite outputs to compare.
    x_kind = c["values"] if not (c["values"] == "nonfinite" and c["with_hx"] and c["seed"] % 2) else "normal"
    h_kind = c["values"] if x_kind != c["values"] or c["values"] != "nonfinite" else "normal"
    hx = None
    if form == "unbatched":
        x = _values((T, I), g, x_kind, dtype)
        if c["with_hx"]:
            hx = _values((c["num_layers"] * D, H), g, h_kind, dtype)
    else:
        x = _values((T, B, I), g, x_kind, dtype)
        if c["with_hx"]:
            hx = _values((c["num_layers"] * D, B, H), g, h_kind, dtype)
        if form.startswith("packed"):
            lengths = torch.randint(1, T + 1, (B,), generator=g)
            if form == "packed_sorted":
                lengths = lengths.sort(descending=True).values
                lengths[0] = T
            x = pack_padded_sequence(x, lengths, enforce_sorted=form == "packed_sorted")
            x = PackedSequence(x.data.requires_grad_(), x.batch_sizes, x.sorted_indices,
                               x.unsorted_indices)
        elif c["batch_first"]:
            x = x.transpose(0, 1).contiguous()
    if not isinstance(x, PackedSequence):
        x.requires_grad_()
    if hx is not None:
        hx.requires_grad_()
    return ref, ext, x, hx


def assert_same_special_and_close(a, b, *, rtol, atol, what, scale=1.0):
    """NaN, +Inf and -Inf exactly at the same places; the finite values close, with the
    absolute tolerance scaled by the tensor's largest finite magnitude (extreme inputs make
    values of 1e4 and more, whose rounding is larger than any fixed atol) or by ``scale``."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    for name, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        ma, mb = f(a), f(b)
        assert torch.equal(ma, mb), (
            f"{what}: {name} positions differ: {int((ma != mb).sum())} of {a.numel()} "
            f"(ext {int(ma.sum())}, expected {int(mb.sum())})"
        )
    a, b = a.detach(), b.detach()
    fin = torch.isfinite(b)
    if fin.any():
        a64, b64 = a[fin].double(), b[fin].double()
        scale = max(1.0, scale, float(b64.abs().max()))
        err = (a64 - b64).abs()
        bound = atol * scale + rtol * b64.abs()
        bad = err > bound
        assert not bad.any(), (
            f"{what}: {int(bad.sum())} finite values differ, max err {float(err.max()):.3g} "
            f"(scale {scale:.3g})"
        )


def _data(x):
    return x.data if isinstance(x, PackedSequence) else x


def compare_runs(got, expected, *, rtol, atol, msg, grad_scale=1.0):
    out_a, hn_a, g_a = got
    out_b, hn_b, g_b = expected
    assert type(out_a) is type(out_b)
    assert_same_special_and_close(_data(out_a), _data(out_b), rtol=rtol, atol=atol,
                                  what=f"output {msg}")
    assert_same_special_and_close(hn_a, hn_b, rtol=rtol, atol=atol, what=f"h_n {msg}")
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        if g_a[k] is None or g_b[k] is None:
            assert g_a[k] is None and g_b[k] is None, f"grad {k} missing on one side {msg}"
            continue
        assert_same_special_and_close(g_a[k], g_b[k], rtol=rtol, atol=atol, scale=grad_scale,
                                      what=f"grad {k} {msg}")


@_fuzz_settings(70)
@given(c=cases())
def test_fuzz_float64_vs_torch_and_reference(c):
    ref, ext, x, hx = build_fuzz_case(c, torch.float64)
    got = forward_backward(ext, x, hx)
    msg = str(c)
    compare_runs(got, forward_backward(ref, x, hx), rtol=1e-9, atol=1e-9, msg=f"vs torch {msg}")
    compare_runs(got, forward_backward(ReferenceModule(ext), x, hx), rtol=1e-9, atol=1e-9,
                 msg=f"vs reference {msg}")


def _as64(x):
    if isinstance(x, PackedSequence):
        return PackedSequence(x.data.detach().double().requires_grad_(), x.batch_sizes,
                              x.sorted_indices, x.unsorted_indices)
    return None if x is None else x.detach().double().requires_grad_()


def _fuzz_float32(c):
    """float32 against torch.nn.RNN in float32 and the float64 truth: NaN/Inf at the same
    places as torch, and every finite value at least as close to the float64 truth as torch's
    own float32 result: within 4x torch's error, element by element, plus 2e-5 of the tensor's
    own scale (max |truth|, at least 1).  (Not float32 against float32 directly: saturated tanh
    with extreme inputs is ill-conditioned, 1 - h^2 turns a last-ulp difference of h, from a
    different but equally valid summation order of the recurrent product, into a large
    relative difference of the gradient.)"""
    ref, ext, x, hx = build_fuzz_case(c, torch.float32)
    got, expected = forward_backward(ext, x, hx), forward_backward(ref, x, hx)
    ref64 = copy.deepcopy(ref).double()
    truth = forward_backward(ref64, _as64(x), _as64(hx))
    pairs = [(_data(got[0]), _data(expected[0]), _data(truth[0]), "output"),
             (got[1], expected[1], truth[1], "h_n")]
    assert got[2].keys() == expected[2].keys()
    for k in got[2]:
        assert (got[2][k] is None) == (expected[2][k] is None), f"grad {k} {c}"
        if got[2][k] is not None:
            pairs.append((got[2][k], expected[2][k], truth[2][k], f"grad {k}"))
    for a, b, t, what in pairs:
        assert a.dtype == b.dtype == torch.float32, what
        for name, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
            assert torch.equal(f(a), f(b)), f"{what}: {name} positions differ {c}"
        fin = torch.isfinite(a) & torch.isfinite(t)
        a64, b64, t64 = a.detach()[fin].double(), b.detach()[fin].double(), t.detach()[fin]
        err_ext, err_torch = (a64 - t64).abs(), (b64 - t64).abs()
        top = float(t64.abs().max()) if t64.numel() else 1.0
        bound = 4 * err_torch + 2e-5 * max(1.0, top)
        assert not (err_ext > bound).any(), (
            f"{what}: less accurate than torch's float32 vs float64: max err "
            f"{float(err_ext.max()):.3g} vs torch {float(err_torch.max()):.3g} {c}")


@_fuzz_settings(40)
@given(c=cases(values=["normal", "extreme"]))
def test_fuzz_float32_vs_torch(c):
    _fuzz_float32(c)


@_fuzz_settings(15)
@given(c=cases(values=["nonfinite"], nonlinearity=["relu"]))
def test_fuzz_float32_nonfinite_relu_vs_torch(c):
    _fuzz_float32(c)


@_fuzz_settings(15)
@given(c=cases(values=["nonfinite"], nonlinearity=["tanh"]))
def test_fuzz_float32_nonfinite_tanh_vs_torch(c):
    _fuzz_float32(c)


@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_single_nonfinite_input_propagates_like_torch(special, bidirectional, relu):
    """One non-finite element at (t=2, b=1): it contaminates exactly what torch's does (that
    sequence only; forward from step 2 on, reverse up to step 2), in outputs, h_n and grads."""
    dtype = torch.float64
    ref, ext = make_pair(3, 4, num_layers=2, bidirectional=bidirectional,
                         nonlinearity="relu" if relu else "tanh", dtype=dtype)
    x = torch.randn(5, 3, 3, dtype=dtype)
    x[2, 1, 0] = special
    got = forward_backward(ext, x.requires_grad_())
    exp = forward_backward(ref, x)
    compare_runs(got, exp, rtol=1e-10, atol=1e-10, msg="")
    out = got[0]
    assert torch.isfinite(out[:, [0, 2]]).all()  # the other sequences are untouched
    if special != special:  # NaN: h_n of that sequence is NaN for every layer and direction
        assert torch.isnan(got[1][:, 1]).all()


# --------------------------------------------------------------------------------------------
# Hostile input: torch's exception type and message
# --------------------------------------------------------------------------------------------

def _outcome(fn):
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001 (comparing whatever is raised)
        return ("raise", type(e), str(e))
    out, hn = r
    return ("ok", _data(out).shape, hn.shape)


R = torch.randn

# (id, module kwargs, call(module)).  Module: input_size 3, hidden_size 5.
HOSTILE_SAME = [
    ("input-1d", {}, lambda m: m(R(3))),
    ("input-4d", {}, lambda m: m(R(2, 2, 2, 3))),
    ("input-0d", {}, lambda m: m(torch.tensor(1.0))),
    ("feature-size-3d", {}, lambda m: m(R(4, 2, 6))),
    ("feature-size-2d", {}, lambda m: m(R(4, 6))),
    ("hx-batch", dict(num_layers=2), lambda m: m(R(4, 4, 3), R(2, 3, 5))),
    ("hx-layers", dict(num_layers=2), lambda m: m(R(4, 4, 3), R(7, 4, 5))),
    ("hx-hidden", dict(num_layers=2), lambda m: m(R(4, 4, 3), R(2, 4, 6))),
    ("hx-one-direction", dict(num_layers=2, bidirectional=True), lambda m: m(R(4, 4, 3), R(2, 4, 5))),
    ("hx-2d-batched", {}, lambda m: m(R(4, 2, 3), R(1, 5))),
    ("hx-4d-batched", {}, lambda m: m(R(4, 2, 3), R(1, 1, 2, 5))),
    ("hx-3d-unbatched", {}, lambda m: m(R(4, 3), R(1, 1, 5))),
    ("hx-1d-unbatched", {}, lambda m: m(R(4, 3), R(5))),
    ("hx-layers-unbatched", dict(num_layers=2), lambda m: m(R(4, 3), R(3, 5))),
    ("hx-batch-first-batch", dict(batch_first=True), lambda m: m(R(2, 4, 3), R(1, 4, 5))),
    ("input-f64", {}, lambda m: m(R(4, 2, 3, dtype=torch.float64))),
    ("input-f16", {}, lambda m: m(R(4, 2, 3).half())),
    ("input-bf16", {}, lambda m: m(R(4, 2, 3).bfloat16())),
    ("input-int64", {}, lambda m: m(torch.ones(4, 2, 3, dtype=torch.long))),
    ("input-int32", {}, lambda m: m(torch.ones(4, 2, 3, dtype=torch.int32))),
    ("input-bool", {}, lambda m: m(torch.ones(4, 2, 3, dtype=torch.bool))),
    ("input-complex", {}, lambda m: m(R(4, 2, 3, dtype=torch.complex64))),
    ("packed-int64", {}, lambda m: m(PackedSequence(torch.ones(3, 3, dtype=torch.long), torch.tensor([2, 1])))),
    ("hx-f64", {}, lambda m: m(R(4, 2, 3), R(1, 2, 5, dtype=torch.float64))),
    ("hx-f16", {}, lambda m: m(R(4, 2, 3), R(1, 2, 5).half())),
    ("hx-int64", {}, lambda m: m(R(4, 2, 3), torch.zeros(1, 2, 5, dtype=torch.long))),
    ("hx-complex", {}, lambda m: m(R(4, 2, 3), torch.zeros(1, 2, 5, dtype=torch.complex64))),
    ("input-meta", {}, lambda m: m(R(4, 2, 3, device="meta"))),
    ("hx-meta", {}, lambda m: m(R(4, 2, 3), R(1, 2, 5, device="meta"))),
    # both wrong: aten names the hidden state first
    ("input-meta-hx-cpu", {}, lambda m: m(R(4, 2, 3, device="meta"), R(1, 2, 5))),
    ("meta-module-cpu-input", dict(device="meta"), lambda m: m(R(4, 2, 3))),
    ("meta-module-meta-input", dict(device="meta"), lambda m: m(R(4, 2, 3, device="meta"))),
    ("seq-len-0", {}, lambda m: m(R(0, 2, 3))),
    ("seq-len-0-batch-first", dict(batch_first=True), lambda m: m(R(2, 0, 3))),
    ("seq-len-0-unbatched", {}, lambda m: m(R(0, 3))),
    ("batch-0", dict(num_layers=2), lambda m: m(R(4, 0, 3))),
    ("packed-data-3d", {}, lambda m: m(PackedSequence(R(3, 1, 3), torch.tensor([2, 1])))),
    ("packed-hx-2d", {}, lambda m: m(PackedSequence(R(3, 3), torch.tensor([2, 1])), R(1, 5))),
    ("packed-sorted-hx-batch", {}, lambda m: m(PackedSequence(R(3, 3), torch.tensor([2, 1])), R(1, 3, 5))),
    ("packed-unsorted-hx-too-small", {}, lambda m: m(
        PackedSequence(R(5, 3), torch.tensor([3, 2]), torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])),
        R(1, 2, 5))),
    ("packed-empty-batch-sizes", {}, lambda m: m(PackedSequence(R(0, 3), torch.tensor([], dtype=torch.long)))),
    ("packed-batch-sizes-float", {}, lambda m: m(PackedSequence(R(3, 3), torch.tensor([2.0, 1.0])))),
    ("packed-trailing-zero", {}, lambda m: m(PackedSequence(R(3, 3), torch.tensor([2, 1, 0])))),
    ("packed-all-zero", {}, lambda m: m(PackedSequence(R(0, 3), torch.tensor([0])))),
    ("hx-tuple", {}, lambda m: m(R(4, 2, 3), (R(1, 2, 5),))),
    ("input-list", {}, lambda m: m([R(4, 2, 3)])),
    ("input-none", {}, lambda m: m(None)),
    ("dropout-mutated-1.5", dict(num_layers=2), lambda m: (setattr(m, "dropout", 1.5), m(R(4, 2, 3)))[1]),
    ("dropout-mutated-nan", dict(num_layers=2), lambda m: (setattr(m, "dropout", float("nan")), m(R(4, 2, 3)))[1]),
    ("dropout-mutated-neg-eval", dict(num_layers=2), lambda m: (setattr(m, "dropout", -1.0), m.eval(), m(R(4, 2, 3)))[2]),
]


@pytest.mark.parametrize("kwargs,call", [c[1:] for c in HOSTILE_SAME], ids=[c[0] for c in HOSTILE_SAME])
def test_hostile_input_same_as_torch(kwargs, call):
    """Malformed calls get torch.nn.RNN's exception type and message exactly (and where torch
    accepts the call, rnn_ext does too, with the same shapes)."""
    torch.manual_seed(0)
    ref = torch.nn.RNN(3, 5, **kwargs)
    ext = rnn_ext.RNN(3, 5, **kwargs)
    if kwargs.get("device") != "meta":
        ext.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    expected = _outcome(lambda: call(ref))
    torch.manual_seed(1)
    got = _outcome(lambda: call(ext))
    assert got == expected


# Where torch fails with an ATen-internal message (or silently uses part of the data), rnn_ext
# raises its own clear RuntimeError before any kernel runs.  (torch's outcome in the comment.)
HOSTILE_STRICTER = [
    # "output with shape [1, 5] doesn't match the broadcast shape [2, 5]"
    ("batch-sizes-increasing", PackedSequence(R(5, 3), torch.tensor([1, 2, 2])), None,
     r"^rnn_ext: batch_sizes must not increase \(a PackedSequence is sorted by length\), got 1 then 2 at step 1$"),
    # "start (3) + length (3) exceeds dimension size (5)."
    ("batch-sizes-sum-too-big", PackedSequence(R(5, 3), torch.tensor([3, 3])), None,
     r"^rnn_ext: batch_sizes sum to 6 but the packed data has 5 rows$"),
    # torch runs, ignoring the last 2 rows of the data
    ("batch-sizes-sum-too-small", PackedSequence(R(5, 3), torch.tensor([2, 1])), None,
     r"^rnn_ext: batch_sizes sum to 3 but the packed data has 5 rows$"),
    # "narrow(): length must be non-negative."
    ("batch-sizes-negative", PackedSequence(R(5, 3), torch.tensor([3, -1, 3])), None,
     r"^rnn_ext: batch_sizes must be non-negative, got -1$"),
    # "expected scalar type Long but found Int"
    ("batch-sizes-int32", PackedSequence(R(3, 3), torch.tensor([2, 1], dtype=torch.int32)), None,
     r"^rnn_ext: batch_sizes must be a 1-D int64 CPU tensor"),
    # "Tensor on device cpu is not on the expected device meta!"
    ("packed-hx-meta", PackedSequence(R(3, 3), torch.tensor([2, 1])), R(1, 2, 5, device="meta"),
     r"^Input and hidden tensors are not at the same device, found input tensor at cpu and hidden tensor at meta$"),
    ("packed-data-meta", PackedSequence(R(3, 3, device="meta"), torch.tensor([2, 1])), None,
     r"^Input and parameter tensors are not at the same device, found input tensor at meta and parameter tensor at cpu$"),
]


@pytest.mark.parametrize("x,hx,pattern", [c[1:] for c in HOSTILE_STRICTER], ids=[c[0] for c in HOSTILE_STRICTER])
def test_hostile_packed_clear_errors(x, hx, pattern):
    torch.manual_seed(0)
    ref = torch.nn.RNN(3, 5)
    ext = rnn_ext.RNN(3, 5)
    ext.load_state_dict(ref.state_dict())
    with pytest.raises(RuntimeError, match=pattern):
        ext(x, hx)
    # the same check on the raw op
    if hx is None and x.data.device.type == "cpu":
        B = int(x.batch_sizes.clamp_min(0).max())
        with pytest.raises(RuntimeError, match=pattern):
            op_forward(x.data, torch.zeros(1, B, 5), list(ext._flat_weights), x.batch_sizes,
                       True, 1, False, False, 0.0, False, False)


def test_complex_module_clear_error():
    """complex RNNs (which torch runs for tanh) are refused with a clear NotImplementedError."""
    ext = rnn_ext.RNN(3, 5, dtype=torch.complex64)
    with pytest.raises(NotImplementedError, match=r"rnn_ext: expected a floating-point input "
                       r"\(float32, float64, float16 or bfloat16\), got ComplexFloat"):
        ext(R(4, 2, 3, dtype=torch.complex64))


def _w(I, H, L=1, D=1, bias=True, dtype=torch.float32):
    out = []
    for layer in range(L):
        for _ in range(D):
            out += [R(H, I if layer == 0 else D * H, dtype=dtype), R(H, H, dtype=dtype)]
            out += [R(H, dtype=dtype), R(H, dtype=dtype)] if bias else []
    return out


X, HX = R(4, 2, 3), torch.zeros(1, 2, 5)
W = _w(3, 5)
RAW_FORWARD = [
    # (id, args (input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional), exc, pattern)
    ("too-few-weights", (X, HX, W[:3], None, True, 1, False), RuntimeError,
     r"^rnn_ext: expected 4 weight tensors for num_layers=1, bidirectional=0, has_biases=1, got 3$"),
    ("no-weights", (X, HX, [], None, True, 1, False), RuntimeError, r"expected 4 weight tensors"),
    ("too-many-weights", (X, HX, W + W, None, True, 1, False), RuntimeError, r"expected 4 weight tensors"),
    ("weights-for-bidirectional", (X, torch.zeros(2, 2, 5), W, None, True, 1, True), RuntimeError,
     r"expected 8 weight tensors"),
    ("num-layers-0", (X, HX, [], None, True, 0, False), RuntimeError, r"^num_layers must be greater than zero$"),
    ("num-layers-negative", (X, HX, W, None, True, -3, False), RuntimeError, r"^num_layers must be greater than zero$"),
    ("w_ih-wrong-input-size", (X, HX, [R(5, 4)] + W[1:], None, True, 1, False), RuntimeError,
     r"^input.size\(-1\) must be equal to input_size. Expected 4, got 3$"),
    ("w_ih-1d", (X, HX, [R(3)] + W[1:], None, True, 1, False), RuntimeError,
     r"^rnn_ext: weight_ih and weight_hh must be 2-D, got 1-D and 2-D$"),
    ("w_hh-wrong", (X, HX, [W[0], R(5, 4)] + W[2:], None, True, 1, False), RuntimeError,
     r"^rnn_ext: weight_hh of layer 0 must have shape \(5, 5\), got \[5, 4\]$"),
    ("w_hh-1d", (X, HX, [W[0], R(5)] + W[2:], None, True, 1, False), RuntimeError,
     r"^rnn_ext: weight_ih and weight_hh must be 2-D, got 2-D and 1-D$"),
    ("bias-wrong", (X, HX, W[:2] + [R(4), W[3]], None, True, 1, False), RuntimeError,
     r"^rnn_ext: bias of layer 0 must have shape \(5\), got \[4\]$"),
    ("bias-2d", (X, HX, W[:3] + [R(1, 5)], None, True, 1, False), RuntimeError, r"bias of layer 0 must have shape"),
    ("layer1-w_ih-wrong", (X, torch.zeros(2, 2, 5), W + W, None, True, 2, False), RuntimeError,
     r"^rnn_ext: weight_ih of layer 1 must have shape \(5, 5\), got \[5, 3\]$"),
    ("weights-mixed-dtypes", (X, HX, [W[0].double()] + W[1:], None, True, 1, False), RuntimeError,
     r"^rnn_ext: all weights must have one dtype, got Double and Float$"),
    ("input-vs-weights-dtype", (X.double(), HX, W, None, True, 1, False), RuntimeError,
     r"^mat1 and mat2 must have the same dtype, but got Double and Float$"),
    ("hx-vs-weights-dtype", (X, HX.double(), W, None, True, 1, False), RuntimeError,
     r"^mat1 and mat2 must have the same dtype, but got Double and Float$"),
    ("all-int64", (X.long(), HX.long(), [w.long() for w in W], None, True, 1, False), NotImplementedError,
     r"rnn_ext: expected a floating-point input .* got Long$"),
    ("all-complex", (X.cfloat(), HX.cfloat(), [w.cfloat() for w in W], None, True, 1, False),
     NotImplementedError, r"rnn_ext: expected a floating-point input .* got ComplexFloat$"),
    ("input-2d-dense", (R(4, 3), HX, W, None, True, 1, False), RuntimeError, r"^input must have 3 dimensions, got 2$"),
    ("input-3d-packed", (X, HX, W, torch.tensor([2, 2, 2, 2]), True, 1, False), RuntimeError,
     r"^input must have 2 dimensions, got 3$"),
    ("hx-shape", (X, torch.zeros(1, 3, 5), W, None, True, 1, False), RuntimeError,
     r"^Expected hidden size \(1, 2, 5\), got \[1, 3, 5\]$"),
    ("batch-sizes-2d", (R(3, 3), HX, W, torch.tensor([[2, 1]]), True, 1, False), RuntimeError,
     r"batch_sizes must be a 1-D int64 CPU tensor"),
    ("batch-sizes-float", (R(3, 3), HX, W, torch.tensor([2.0, 1.0]), True, 1, False), RuntimeError,
     r"batch_sizes must be a 1-D int64 CPU tensor"),
    ("batch-sizes-empty", (R(0, 3), torch.zeros(1, 0, 5), W, torch.tensor([], dtype=torch.long), True, 1, False),
     RuntimeError, r"^Expected sequence length to be larger than 0 in RNN$"),
    ("batch-sizes-meta", (R(3, 3), HX, W, torch.tensor([2, 1], device="meta"), True, 1, False), RuntimeError,
     r"batch_sizes must be a 1-D int64 CPU tensor"),
    # the sum of batch_sizes wraps around int64 to the 0 rows given: refused (hx cannot match)
    ("batch-sizes-sum-overflow", (R(0, 3), HX, W, torch.tensor([2**62] * 4), True, 1, False), RuntimeError,
     r"^rnn_ext: batch_sizes overflow int64 when summed$"),
    # mixed meta / CPU tensors must not reach the Meta (fake) kernel's uninitialised outputs
    ("hx-meta", (X, HX.to("meta"), W, None, True, 1, False), RuntimeError,
     r"^Input and hidden tensors are not at the same device, found input tensor at cpu and hidden tensor at meta$"),
    ("weight-meta", (X, HX, [W[0].to("meta")] + W[1:], None, True, 1, False), RuntimeError,
     r"^Input and parameter tensors are not at the same device, found input tensor at cpu and parameter tensor at meta$"),
    # aten checks the hidden state before the parameters
    ("input-meta", (X.to("meta"), HX, W, None, True, 1, False), RuntimeError,
     r"^Input and hidden tensors are not at the same device, found input tensor at meta and hidden tensor at cpu$"),
    ("input-hx-meta", (X.to("meta"), HX.to("meta"), W, None, True, 1, False), RuntimeError,
     r"^Input and parameter tensors are not at the same device, found input tensor at meta and parameter tensor at cpu$"),
]


@pytest.mark.parametrize("args,exc,pattern", [c[1:] for c in RAW_FORWARD], ids=[c[0] for c in RAW_FORWARD])
def test_hostile_raw_forward(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        op_forward(*args, False, 0.0, False, False)


def test_raw_forward_all_meta_is_shape_only():
    """All tensors on meta: the fake kernel's shapes (not an error)."""
    w = [t.to("meta") for t in _w(3, 5, L=2, D=2)]
    out, hy, ws, noise = op_forward(X.to("meta"), torch.zeros(4, 2, 5, device="meta"), w, None,
                                    True, 2, True, False, 0.0, False, True)
    assert out.device.type == "meta" and out.shape == (4, 2, 10) and hy.shape == (4, 2, 5)
    assert ws.shape == (1, 8, 10) and noise.numel() == 0


def _raw_case(L=2, need_grad=True):
    w = _w(3, 5, L=L)
    x, h = R(4, 2, 3), torch.zeros(L, 2, 5)
    out, hy, ws, noise = op_forward(x, h, w, None, True, L, False, False, 0.0, False, need_grad)
    return x, h, w, out, hy, ws, noise


def test_backward_with_workspace_of_a_no_grad_forward_is_refused():
    x, h, w, out, hy, ws, noise = _raw_case(need_grad=False)
    assert ws.numel() == 0 and noise.numel() == 0
    with pytest.raises(RuntimeError, match=r"^rnn_ext: the workspace does not match \(was the "
                       r"forward run with need_grad\?\)$"):
        op_backward(x, h, w, None, out, ws, noise, torch.ones_like(out), torch.ones_like(hy),
                    True, 2, False, False, [True, True, True])


@pytest.mark.parametrize("what", ["grad_output", "grad_hy", "output", "noise", "workspace-meta",
                                  "grad_output-meta", "output-meta"])
def test_hostile_raw_backward(what):
    x, h, w, out, hy, ws, noise = _raw_case()
    args = dict(output=out, workspace=ws, noise=noise, grad_output=torch.ones_like(out),
                grad_hy=torch.ones_like(hy))
    pattern = {
        "grad_output": r"^rnn_ext: grad_output has shape \[\d+(, \d+)*\], expected \[\d+(, \d+)*\]$",
        "grad_hy": r"^rnn_ext: grad_hy has the wrong size$",
        "output": r"^rnn_ext: output has 3 elements, expected 40$",
        "noise": r"^rnn_ext: the dropout noise does not match the forward$",
    }.get(what, r"^rnn_ext: expected all tensors on cpu, got one on meta$")
    if what.endswith("-meta"):
        key = what[: -len("-meta")]
        args[key] = args[key].to("meta")
    else:
        args[what] = torch.ones(2, 2, 4) if what == "grad_hy" else torch.ones(3)
    with pytest.raises(RuntimeError, match=pattern):
        op_backward(x, h, w, None, args["output"], args["workspace"], args["noise"],
                    args["grad_output"], args["grad_hy"], True, 2, False, False,
                    [True, True, True])


def test_large_batch_sizes_never_reach_a_kernel():
    """batch sizes past 2^31 (and whose int64 sum overflows) are rejected by the argument checks
    in microseconds, before any allocation or loop."""
    w = _w(3, 5)
    for bs, data_rows in (([2**40], 0), ([2**31 + 1, 2**31 + 1], 3), ([2**63 - 1, 2**63 - 1, 2], 0)):
        with pytest.raises(RuntimeError):
            op_forward(R(data_rows, 3), torch.zeros(1, 1, 5), w, torch.tensor(bs), True, 1,
                       False, False, 0.0, False, False)
    # an hx of the claimed size, as a stride-0 view, is refused by torch's numel overflow check
    with pytest.raises(RuntimeError, match="overflow"):
        op_forward(R(0, 3), torch.zeros(1, 1, 5).expand(1, 2**62, 5), w, torch.tensor([2**62] * 4),
                   True, 1, False, False, 0.0, False, False)


def _mem_available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


BIG_T, BIG_B, BIG_H = 2**17 + 8, 512, 16  # output: (T, B, 2 H) = 2^31 + 2^17 float32 elements


@pytest.mark.skipif(_mem_available_bytes() < 12 * 2**30,
                    reason="needs 12 GiB free: a float32 output of more than 2^31 elements")
def test_output_beyond_2_31_elements():
    """A forward whose output has more than 2^31 elements (8.6 GB): 64-bit indexing all the way.
    The recurrence is Markov, so the steps nearest the end (rows past 2^31 elements, where a
    32-bit offset would wrap) are checked against rnn_ext.reference started from the kernel's
    own state a few steps earlier, in both directions, and h_n against the output rows."""
    torch.manual_seed(0)
    T, B, H = BIG_T, BIG_B, BIG_H
    m = rnn_ext.RNN(1, H, bidirectional=True)
    x = torch.empty(T, B, 1).uniform_(-2, 2)
    with torch.inference_mode():
        out, hn = m(x)
        assert out.shape == (T, B, 2 * H) and out.numel() > 2**31
        w = [t.detach() for t in m._flat_weights]
        k = 4
        kw = dict(num_layers=1, bidirectional=False, relu=False)
        # forward direction: the last k steps, from the kernel's state at step T-k-1
        o_fwd, h_fwd = reference.rnn(x[-k:], out[-k - 1, :, :H].unsqueeze(0), w[:4], **kw)
        torch.testing.assert_close(o_fwd, out[-k:, :, :H], rtol=0, atol=1e-6)
        torch.testing.assert_close(h_fwd[0], hn[0], rtol=0, atol=1e-6)
        assert torch.equal(hn[0], out[-1, :, :H])
        # reverse direction: it starts at the end (from zero) and ends at step 0
        o_rev, _ = reference.rnn(x[-k:].flip(0), torch.zeros(1, B, H), w[4:], **kw)
        torch.testing.assert_close(o_rev.flip(0), out[-k:, :, H:], rtol=0, atol=1e-6)
        o_rev, h_rev = reference.rnn(x[:k].flip(0), out[k, :, H:].unsqueeze(0), w[4:], **kw)
        torch.testing.assert_close(o_rev.flip(0), out[:k, :, H:], rtol=0, atol=1e-6)
        torch.testing.assert_close(h_rev[0], hn[1], rtol=0, atol=1e-6)
        assert torch.isfinite(out[-1]).all() and out[-1].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


STEPS = 1500


def test_no_memory_growth_over_training_steps():
    torch.manual_seed(0)
    models = [
        rnn_ext.RNN(8, 16, num_layers=2, bidirectional=True, dropout=0.3),
        rnn_ext.RNN(5, 7, num_layers=3, nonlinearity="relu", batch_first=True),
    ]
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)
    x0 = torch.randn(10, 4, 8)
    x1 = torch.randn(4, 6, 5)
    packed = pack_padded_sequence(torch.randn(9, 5, 8), [9, 7, 7, 3, 1])
    h1 = torch.zeros(3, 4, 7, requires_grad=True)

    def step():
        opt.zero_grad(set_to_none=True)
        o0, h0 = models[0](x0)
        o1, hh = models[1](x1, h1)
        op, hp = models[0](packed)
        loss = o0.sum() + h0.sum() + o1.square().mean() + hh.sum() + op.data.sum() + hp.sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            models[1](x1)
        with torch.inference_mode():
            models[0](x0)

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # speed only (an oversubscribed OpenMP pool is ~50x slower)
    try:
        for _ in range(200):  # warm-up: allocator pools, autograd and BLAS buffers
            step()
        gc.collect()
        before = _rss_bytes()
        for _ in range(STEPS):
            step()
        gc.collect()
        growth = _rss_bytes() - before
    finally:
        torch.set_num_threads(n_threads)
    # One step allocates ~100 kB in ~25 tensors; leaking any one of them per step would show
    # as > 4 MiB here.
    assert growth < 2 * 2**20, f"RSS grew by {growth / 2**20:.2f} MiB over {STEPS} steps"


# The CPU kernels' large buffers (>= 1 MiB) recycle their memory (csrc/cpu/recycle.cpp).
_BIG = dict(T=64, B=16, I=8, H=256)  # output (64, 16, 256) float32: 1 MiB


def _big_forward(m, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(_BIG["T"], _BIG["B"], _BIG["I"], generator=g)
    with torch.no_grad():
        return m(x)[0]


def test_cpu_buffer_memory_recycled_only_when_unreferenced():
    """A dropped output's memory serves the next call of the same size; while anything still
    refers to it (the tensor, a view, its storage) it is not handed out again, and its values
    stay what they were."""
    torch.manual_seed(0)
    m = rnn_ext.RNN(_BIG["I"], _BIG["H"])
    out = _big_forward(m, 1)
    ptr = out.data_ptr()
    del out
    out = _big_forward(m, 1)
    assert out.data_ptr() == ptr, "a dropped buffer's memory was not reused"
    assert out.untyped_storage().nbytes() == out.numel() * 4
    del out
    a = _big_forward(m, 5)  # takes the idle block; the next needs memory of its own
    expected = a.clone()
    b = _big_forward(m, 6)
    assert a.data_ptr() != b.data_ptr()
    torch.testing.assert_close(a, expected, rtol=0, atol=0)
    out = a
    del b
    for keep in ("tensor", "view", "storage"):
        first = _big_forward(m, 2)
        expected = first.clone()
        held = {"tensor": first, "view": first[3:5], "storage": first.untyped_storage()}[keep]
        ptr = first.data_ptr()
        del first
        second = _big_forward(m, 3)
        assert second.data_ptr() != ptr, f"memory handed out again while a {keep} held it"
        if keep == "storage":
            held = torch.empty(0).set_(held).view_as(expected)
        torch.testing.assert_close(held, expected[3:5] if keep == "view" else expected,
                                   rtol=0, atol=0)
        del held, second
    # a recycled tensor is an ordinary one: copy-on-write clones accept it (a "simple" data
    # pointer, as torch's CPU allocator makes), resizable, its memory reported to the profiler
    clone = torch._lazy_clone(out)
    torch.testing.assert_close(clone, out, rtol=0, atol=0)
    del clone
    out.resize_(2 * out.numel())
    from torch.profiler import profile
    with profile(profile_memory=True) as prof:
        res = _big_forward(m, 4)
    assert sum(e.cpu_memory_usage for e in prof.key_averages() if "rnn_forward" in e.key) >= 2**20
    del res


def test_empty_cpu_cache():
    torch.manual_seed(0)
    m = rnn_ext.RNN(_BIG["I"], _BIG["H"])
    rnn_ext.empty_cpu_cache()
    assert torch.ops.rnn_ext.cpu_cache_idle_bytes() == 0
    _big_forward(m, 1)  # (the output dropped at once)
    idle = torch.ops.rnn_ext.cpu_cache_idle_bytes()
    assert idle >= 2**20
    assert rnn_ext.empty_cpu_cache() == idle
    assert torch.ops.rnn_ext.cpu_cache_idle_bytes() == 0


def test_cpu_buffer_recycling_off_and_bounded():
    """RNN_EXT_CPU_RECYCLE_MB=0 turns recycling off; with a limit, idle memory never exceeds it."""
    import subprocess
    import sys
    code = (
        "import torch, rnn_ext\n"
        "m = rnn_ext.RNN(8, 256)\n"
        "for T in range(64, 96):\n"
        "    with torch.no_grad():\n"
        "        m(torch.randn(T, 16, 8))\n"
        "    print(torch.ops.rnn_ext.cpu_cache_idle_bytes())\n")
    for mb, bound in (("0", 0), ("3", 3 << 20)):
        env = dict(os.environ, RNN_EXT_CPU_RECYCLE_MB=mb)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        idle = [int(v) for v in out]
        assert max(idle) <= bound, (mb, idle)
        assert (max(idle) > 0) == (bound > 0), (mb, idle)


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_no_grad_saves_nothing(ctx):
    torch.manual_seed(0)
    m = rnn_ext.RNN(4, 6, num_layers=3, bidirectional=True, dropout=0.5)  # train mode
    x = torch.randn(5, 3, 4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with getattr(torch, ctx)():
            out, hn = m(x)
            # the op itself returns empty workspace and noise
            r = op_forward(x, torch.zeros(6, 3, 6), list(m._flat_weights), None, True, 3, True,
                           False, 0.5, True, False)
    assert saved == []
    assert out.grad_fn is None and not out.requires_grad and hn.grad_fn is None
    assert r[2].numel() == 0 and r[3].numel() == 0
    # with grad enabled the same call does save (so the hook above works)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    assert len(saved) > 0


def _allocated_in_rnn_forward(fn):
    """Bytes allocated (not net) by the rnn_forward op and everything it called: an upper bound
    of its peak memory."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(e):
        return max(0, e.self_cpu_memory_usage) + sum(walk(c) for c in e.cpu_children)

    tops = [e for e in prof.events() if e.name == "rnn_ext::rnn_forward"]
    assert len(tops) == 1
    return walk(tops[0]), tops[0].cpu_memory_usage


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
def test_inference_peak_memory(bidirectional):
    """Without grad, the forward keeps nothing but output and h_n, and allocates at most what
    the training forward keeps (its L-1 inner layer outputs, the workspace).  Layers run one
    after the other use two ping-pong layer buffers whatever L (the opt-in multi-thread
    wavefront, RNN_EXT_CPU_TASK_PARALLEL=1, one per inner layer), plus the float32 step
    kernel's packed copy of each W_hh (weight-sized, not activation-sized)."""
    torch.manual_seed(0)
    T, B, I, H, L = 40, 8, 16, 32, 6
    D = 2 if bidirectional else 1
    m = rnn_ext.RNN(I, H, num_layers=L, bidirectional=bidirectional)
    x = torch.randn(T, B, I)
    out_b, hy_b, layer_b = T * B * D * H * 4, L * D * B * H * 4, T * B * D * H * 4
    panel_b = L * D * H * ((H + 15) // 16 * 16) * 4
    with torch.inference_mode():
        allocated, net = _allocated_in_rnn_forward(lambda: m(x))
    assert net == out_b + hy_b  # what stays: the results
    assert allocated <= out_b + hy_b + (L - 1) * layer_b + panel_b
    if os.environ.get("RNN_EXT_CPU_TASK_PARALLEL") != "1":
        assert allocated <= out_b + hy_b + 2 * layer_b + panel_b
    x.requires_grad_()
    allocated, net = _allocated_in_rnn_forward(lambda: m(x))
    assert net == out_b + hy_b + (L - 1) * layer_b  # the workspace, saved for backward


def test_saved_tensors_freed_after_backward():
    """What the autograd node keeps for backward (the workspace among it) is freed by the
    backward, and by dropping the outputs without one."""
    import weakref

    torch.manual_seed(0)
    m = rnn_ext.RNN(4, 6, num_layers=3, bidirectional=True)
    x = torch.randn(5, 3, 4, requires_grad=True)

    def forward_keeping_refs():
        refs = []

        def pack(t):
            refs.append(weakref.ref(t))
            # an output saved as itself would make a cycle through the node that no
            # collector sees (torch's own nodes too: tanh's saved result, torch.nn.RNN)
            return t.detach() if t.grad_fn is not None else t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, hn = m(x)
        return out, hn, refs

    out, hn, refs = forward_keeping_refs()
    shapes = [r().shape for r in refs]
    assert (2, 15, 12) in shapes  # the workspace: (L-1, N, D*H)
    ws_ref = refs[shapes.index((2, 15, 12))]
    (out.sum() + hn.sum()).backward()
    gc.collect()
    assert ws_ref() is None, "the workspace outlived backward"
    with pytest.raises(RuntimeError, match="second time|freed"):
        (out.sum() + hn.sum()).backward()
    # and without backward: dropping the outputs frees it too
    out, hn, refs = forward_keeping_refs()
    ws_ref = refs[[r().shape for r in refs].index((2, 15, 12))]
    assert ws_ref() is not None
    del out, hn
    gc.collect()
    assert ws_ref() is None


# --------------------------------------------------------------------------------------------
# Determinism and thread safety
# --------------------------------------------------------------------------------------------

DET_CONFIGS = [
    # small; and large enough that the activation loops and BLAS run multi-threaded
    dict(I=5, H=7, L=2, bidirectional=True, relu=False, T=6, B=3, packed=False),
    dict(I=9, H=16, L=3, bidirectional=True, relu=True, T=7, B=5, packed=True),
    dict(I=64, H=512, L=2, bidirectional=False, relu=False, T=5, B=64, packed=False),
    # unidirectional, L > 1, T >= 8: the multi-thread layer wavefront
    dict(I=12, H=48, L=3, bidirectional=False, relu=False, T=10, B=8, packed=False),
    dict(I=12, H=48, L=3, bidirectional=False, relu=True, T=12, B=8, packed=True),
]


def forward_backward_on(module, x, hx=None, *, cot_seed=1):
    """conftest.forward_backward for any device: the same CPU-drawn cotangents, moved to the
    output's device."""
    x = _clone_leaf(x)
    hx = _clone_leaf(hx)
    for p in module.parameters():
        p.grad = None
    out, hn = module(x) if hx is None else module(x, hx)
    out_t = _data(out)
    g = torch.Generator().manual_seed(cot_seed)
    go = torch.randn(out_t.shape, generator=g, dtype=torch.float64).to(out_t.device, out_t.dtype)
    gh = torch.randn(hn.shape, generator=g, dtype=torch.float64).to(hn.device, hn.dtype)
    torch.autograd.backward([out_t, hn], [go, gh])
    grads = {"input": _data(x).grad, "hx": None if hx is None else hx.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out, hn, grads


def _clone_leaf(x):
    if x is None:
        return None
    if isinstance(x, PackedSequence):
        data = x.data.detach().clone().requires_grad_()
        return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    return x.detach().clone().requires_grad_()


def _det_run(c, device="cpu", dtype=torch.float32, dropout=0.0, seed=0):
    torch.manual_seed(0)  # (on the CPU, so that every device gets the same weights)
    m = rnn_ext.RNN(c["I"], c["H"], num_layers=c["L"], bidirectional=c["bidirectional"],
                    nonlinearity="relu" if c["relu"] else "tanh", dropout=dropout,
                    dtype=dtype).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(c["T"], c["B"], c["I"], generator=g, dtype=dtype).to(device)
    if c["packed"]:
        lengths = sorted(torch.randint(1, c["T"] + 1, (c["B"],), generator=g).tolist(), reverse=True)
        x = pack_padded_sequence(x, lengths)
    torch.manual_seed(seed)
    out, _, grads = forward_backward_on(m, x)
    return [_data(out)] + [g for g in grads.values() if g is not None]


def _assert_bitwise(a, b, msg=""):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        # compare the bits (NaN-safe, -0 vs +0 distinguished)
        xb = x.contiguous().view(torch.int32 if x.dtype == torch.float32 else torch.int64)
        yb = y.contiguous().view(torch.int32 if y.dtype == torch.float32 else torch.int64)
        assert torch.equal(xb, yb), f"tensor {i} differs bitwise {msg}"


@pytest.mark.parametrize("c", DET_CONFIGS, ids=lambda c: f"H{c['H']}B{c['B']}L{c['L']}{'p' if c['packed'] else ''}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bitwise_deterministic_run_to_run(c, dtype):
    first = _det_run(c, dtype=dtype)
    for _ in range(2):
        _assert_bitwise(_det_run(c, dtype=dtype), first)


def test_dropout_deterministic_under_seed():
    c = DET_CONFIGS[1]
    a = _det_run(c, dropout=0.4, seed=5)
    _assert_bitwise(_det_run(c, dropout=0.4, seed=5), a)
    b = _det_run(c, dropout=0.4, seed=6)
    assert not torch.equal(a[0], b[0])


@pytest.mark.parametrize("c", [DET_CONFIGS[2], DET_CONFIGS[3]], ids=["gemm", "wavefront"])
def test_thread_count_one_vs_several(c):
    """Run to run at a fixed thread count is bitwise (above); across thread counts the results
    agree to float32 rounding, relative to each tensor's scale (bitwise equality is not
    promised: with several threads the large recurrent steps go to multi-threaded BLAS, with
    one to the step kernel, which sum in different orders)."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, n))
        several = _det_run(c)
        _assert_bitwise(_det_run(c), several, "(several threads, run to run)")
        torch.set_num_threads(1)
        one = _det_run(c)
        _assert_bitwise(_det_run(c), one, "(1 thread, run to run)")
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, several):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def _run_threads(fns):
    results = [None] * len(fns)
    errors = []

    def worker(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    return results


def _shared_model_job(m, x, hx, reps):
    def job():
        outs = []
        for _ in range(reps):
            out, hn = m(x, hx)
            grads = torch.autograd.grad([_data(out).sum(), hn.square().sum()],
                                        [_data(x), hx, *m.parameters()])
            outs.append([_data(out).detach(), hn.detach(), *grads])
        return outs
    return job


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_thread_safety_forward_backward(dtype):
    """Several Python threads run forward + backward at once, on one shared module and on
    modules of their own: every result is bitwise the serial one."""
    torch.manual_seed(0)
    shared = rnn_ext.RNN(12, 48, num_layers=2, bidirectional=True, dtype=dtype)
    jobs = []
    for i in range(4):
        torch.manual_seed(i)
        if i % 2:
            m = shared
        else:
            m = rnn_ext.RNN(6 + i, 20 + i, num_layers=1 + i // 2, nonlinearity="relu", dtype=dtype)
        B, T = 8 + i, 12
        D = 2 if m.bidirectional else 1
        x = torch.randn(T, B, m.input_size, dtype=dtype, requires_grad=True)
        if i == 2:
            x = pack_padded_sequence(x, sorted(torch.randint(1, T + 1, (B,)).tolist(), reverse=True))
        hx = torch.randn(m.num_layers * D, B, m.hidden_size, dtype=dtype, requires_grad=True)
        jobs.append(_shared_model_job(m, x, hx, reps=3))
    serial = [job() for job in jobs]
    concurrent = _run_threads(jobs)
    for s, c in zip(serial, concurrent):
        for a, b in zip(s, c):
            _assert_bitwise(b, a, "(thread vs serial)")


def test_thread_safety_inference_and_first_use():
    """Inference calls from many threads at once, including the very first calls of new
    shapes and dtypes (lazy BLAS lookup, dispatcher caches)."""
    torch.manual_seed(0)
    mods = {dt: rnn_ext.RNN(10, 30, num_layers=2, dtype=dt) for dt in (torch.float32, torch.float64, torch.bfloat16)}
    inputs = [(dt, torch.randn(9, 1 + k, 10, dtype=dt)) for k in range(6) for dt in mods]

    def job_for(dt, x):
        def job():
            with torch.inference_mode():
                return [t.clone() for t in mods[dt](x)]
        return job

    jobs = [job_for(dt, x) for dt, x in inputs]
    concurrent = _run_threads(jobs)
    serial = [job() for job in jobs]
    for s, c in zip(serial, concurrent):
        for a, b in zip(s, c):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# CUDA (bench/gpu_check.sh runs these, also under compute-sanitizer memcheck/racecheck/initcheck)
# --------------------------------------------------------------------------------------------

def _has_cuda():
    return torch.cuda.is_available() and rnn_ext.backend_info()["cuda"]


@pytest.mark.parametrize("c", DET_CONFIGS, ids=lambda c: f"H{c['H']}B{c['B']}L{c['L']}{'p' if c['packed'] else ''}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU and a CUDA build")
def test_cuda_bitwise_deterministic_run_to_run(c, dtype):
    first = _det_run(c, device="cuda", dtype=dtype)
    for _ in range(2):
        _assert_bitwise(_det_run(c, device="cuda", dtype=dtype), first)
    # and close to the CPU
    cpu = _det_run(c, dtype=dtype)
    for a, b in zip(first, cpu):
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU and a CUDA build")
def test_cuda_deterministic_with_deterministic_algorithms():
    c = DET_CONFIGS[2]
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = _det_run(c, device="cuda")
        _assert_bitwise(_det_run(c, device="cuda"), first)
    finally:
        torch.use_deterministic_algorithms(prev)


@_fuzz_settings(25)
@given(c=cases())
@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU and a CUDA build")
def test_cuda_fuzz_float64_vs_cpu_torch(c):
    ref, ext, x, hx = build_fuzz_case(c, torch.float64)
    ext = ext.cuda()

    def to_cuda(t):
        if t is None:
            return None
        if isinstance(t, PackedSequence):
            return PackedSequence(t.data.detach().cuda().requires_grad_(), t.batch_sizes,
                                  None if t.sorted_indices is None else t.sorted_indices.cuda(),
                                  None if t.unsorted_indices is None else t.unsorted_indices.cuda())
        return t.detach().cuda().requires_grad_()

    out, hn, grads = forward_backward_on(ext, to_cuda(x), to_cuda(hx))
    out = PackedSequence(out.data.cpu(), out.batch_sizes, *(None if i is None else i.cpu() for i in (out.sorted_indices, out.unsorted_indices))) \
        if isinstance(out, PackedSequence) else out.cpu()
    got = (out, hn.cpu(), {k: None if v is None else v.cpu() for k, v in grads.items()})
    compare_runs(got, forward_backward(ref, x, hx), rtol=1e-9, atol=1e-9, msg=str(c))


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("where", ["input", "hx", "weights"])
def test_cuda_device_mismatch_same_as_torch(where):
    torch.manual_seed(0)
    ref, ext = torch.nn.RNN(3, 5).cuda(), rnn_ext.RNN(3, 5).cuda()
    ext.load_state_dict(ref.state_dict())
    x, hx = R(4, 2, 3, device="cuda"), R(1, 2, 5, device="cuda")
    if where == "input":
        x = x.cpu()
    elif where == "hx":
        hx = hx.cpu()
    else:
        ref, ext = ref.cpu(), ext.cpu()
    assert _outcome(lambda: ext(x, hx)) == _outcome(lambda: ref(x, hx))


@pytest.mark.cuda
@pytest.mark.skipif(not (_has_cuda() and torch.cuda.device_count() >= 2), reason="needs 2 GPUs")
def test_cuda_tensors_on_another_gpu_same_as_torch():
    torch.manual_seed(0)
    ref, ext = torch.nn.RNN(3, 5).cuda(0), rnn_ext.RNN(3, 5).cuda(0)
    ext.load_state_dict(ref.state_dict())
    for x, hx in ((R(4, 2, 3, device="cuda:1"), None),
                  (R(4, 2, 3, device="cuda:0"), R(1, 2, 5, device="cuda:1"))):
        assert _outcome(lambda: ext(x, hx)) == _outcome(lambda: ref(x, hx))
    w = [t.cuda(0) for t in _w(3, 5)]
    with pytest.raises(RuntimeError, match="not at the same device"):
        op_forward(R(4, 2, 3, device="cuda:1"), torch.zeros(1, 2, 5, device="cuda:1"), w, None,
                   True, 1, False, False, 0.0, False, False)


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_thread_safety(dtype):
    torch.manual_seed(0)
    m = rnn_ext.RNN(12, 48, num_layers=2, bidirectional=True, dtype=dtype, device="cuda")
    jobs = []
    for i in range(4):
        x = torch.randn(10, 4 + i, 12, dtype=dtype, device="cuda", requires_grad=True)
        hx = torch.randn(4, 4 + i, 48, dtype=dtype, device="cuda", requires_grad=True)
        jobs.append(_shared_model_job(m, x, hx, reps=4))
    serial = [job() for job in jobs]
    torch.cuda.synchronize()
    concurrent = _run_threads(jobs)
    torch.cuda.synchronize()
    for s, c in zip(serial, concurrent):
        for a, b in zip(s, c):
            _assert_bitwise(b, a, "(thread vs serial, cuda)")


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU and a CUDA build")
def test_cuda_no_memory_growth_and_inference_peak():
    torch.manual_seed(0)
    m = rnn_ext.RNN(16, 64, num_layers=3, bidirectional=True, device="cuda")
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    x = torch.randn(20, 8, 16, device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        out, hn = m(x)
        (out.sum() + hn.sum()).backward()
        opt.step()

    for _ in range(50):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(500):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    # inference: peak over the call close to output + h_n + two layer buffers
    T, B, H, L, D = 200, 32, 256, 6, 1
    m = rnn_ext.RNN(64, H, num_layers=L, device="cuda")
    x = torch.randn(T, B, 64, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out, hn = m(x)
    torch.cuda.synchronize()
    extra_peak = torch.cuda.max_memory_allocated() - base
    layer = T * B * D * H * 4
    assert extra_peak <= out.numel() * 4 + hn.numel() * 4 + 2 * layer + (1 << 21)
