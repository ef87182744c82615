"""Forward-mode AD: torch.autograd.forward_ad, torch.func.jvp / jacfwd / hessian over
functional_call, and gradcheck(check_forward_ad=True), against torch.nn.RNN and
rnn_ext.reference (float64, 1e-9), for tangents of the input, hx and every parameter.

Every tangent test runs twice (fixture `path`): through the fused rnn_jvp kernel (and checks
that it ran) and through the reference path (rnn_ext.reference differentiated in forward mode,
what runs where the kernel does not apply)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import gradcheck
from torch.func import functional_call, hessian, jacfwd, jacrev, jvp
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from rnn_ext import ops, reference
from conftest import make_pair

F64 = torch.float64


def close(actual, expected, tol=1e-9):
    """Within tol relative to the largest magnitude of expected."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=0)


@pytest.fixture(params=["fused", "reference"])
def path(request, monkeypatch):
    """Which jvp computes the tangents; with "fused", the test fails unless the kernel ran."""
    calls = []
    if request.param == "reference":
        monkeypatch.setattr(ops, "_fused_jvp_applies", lambda *a: False)
    else:
        kernel = ops.rnn_jvp

        def counted(*args):
            calls.append(1)
            return kernel(*args)

        monkeypatch.setattr(ops, "rnn_jvp", counted)
    yield request.param
    if request.param == "fused":
        assert calls, "the fused rnn_jvp kernel did not run"


CASES = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, nonlinearity="relu", bias=False, batch_first=True),
    dict(num_layers=2, bidirectional=True, nonlinearity="relu"),
]


def _id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def _pair(cfg, I=3, H=4, seed=0):
    return make_pair(I, H, dtype=F64, seed=seed, **cfg)


def _inputs(m, T=4, B=3, unbatched=False):
    D = 2 if m.bidirectional else 1
    if unbatched:
        x = torch.randn(T, m.input_size, dtype=F64)
        hx = torch.randn(m.num_layers * D, m.hidden_size, dtype=F64)
    else:
        x = torch.randn((B, T, m.input_size) if m.batch_first else (T, B, m.input_size),
                        dtype=F64)
        hx = torch.randn(m.num_layers * D, B, m.hidden_size, dtype=F64)
    return x, hx


def _tangents(m, x, hx):
    """Random tangents for the input, hx and every parameter (by name)."""
    t = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    t["input"] = torch.randn_like(x.data if isinstance(x, PackedSequence) else x)
    t["hx"] = None if hx is None else torch.randn_like(hx)
    return t


def _params(m):
    return {n: p.detach() for n, p in m.named_parameters()}


def _data(o):
    return o.data if isinstance(o, PackedSequence) else o


def _with_data(x, data):
    return PackedSequence(data, *x[1:]) if isinstance(x, PackedSequence) else data


def eager_jvp(m, x, hx, t):
    """Tangents of (output, h_n) with torch.autograd.forward_ad (dual input, hx, parameters)."""
    with fwAD.dual_level():
        params = {n: fwAD.make_dual(p, t[n]) for n, p in _params(m).items()}
        xd = _with_data(x, fwAD.make_dual(_data(x), t["input"]))
        args = (xd,) if hx is None else (xd, fwAD.make_dual(hx, t["hx"]))
        out, h = functional_call(m, params, args)
        return fwAD.unpack_dual(_data(out)).tangent, fwAD.unpack_dual(h).tangent


def func_jvp(m, x, hx, t):
    """The same with torch.func.jvp over functional_call."""
    names = [n for n, _ in m.named_parameters()]

    def f(params, data, *h):
        out, hn = functional_call(m, params, (_with_data(x, data), *h))
        return _data(out), hn

    primals = (_params(m), _data(x)) + (() if hx is None else (hx,))
    tangents = ({n: t[n] for n in names}, t["input"]) + (() if hx is None else (t["hx"],))
    return jvp(f, primals, tangents)[1]


def reference_jvp(m, x, hx, t, dropout_masks=None):
    """The same for rnn_ext.reference (plain PyTorch) under torch.func.jvp: the oracle where
    torch.nn.RNN cannot run (packed input under torch.func)."""
    names = m._flat_weights_names
    D = 2 if m.bidirectional else 1
    kw = dict(num_layers=m.num_layers, bidirectional=m.bidirectional,
              relu=m.nonlinearity == "relu", dropout_masks=dropout_masks)

    def f(w, data, h):
        if isinstance(x, PackedSequence):
            bs, si, ui = x.batch_sizes, x.sorted_indices, x.unsorted_indices
            h = h if si is None else h.index_select(1, si)
            out, hn = reference.rnn_packed_data(data, bs, h, w, **kw)
            return out, (hn if ui is None else hn.index_select(1, ui))
        unbatched = data.dim() == 2
        xx = data.unsqueeze(1) if unbatched else (data.transpose(0, 1) if m.batch_first else data)
        hh = h.unsqueeze(1) if unbatched else h
        out, hn = reference.rnn(xx, hh, w, **kw)
        if unbatched:
            return out.squeeze(1), hn.squeeze(1)
        return (out.transpose(0, 1) if m.batch_first else out), hn

    data = _data(x)
    if hx is None:
        B = int(x.batch_sizes[0]) if isinstance(x, PackedSequence) else (
            data.shape[0] if m.batch_first else data.shape[1])
        hx = data.new_zeros(m.num_layers * D, B, m.hidden_size)
        th = torch.zeros_like(hx)
    else:
        th = t["hx"]
    params = _params(m)
    w = [params[n] for n in names]
    tw = [t[n] for n in names]
    return jvp(f, (w, data, hx), (tw, t["input"], th))[1]


@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("cfg", CASES, ids=_id)
def test_forward_ad_and_func_jvp_match_torch(cfg, with_hx, path):
    ref, ext = _pair(cfg)
    x, hx = _inputs(ext)
    hx = hx if with_hx else None
    t = _tangents(ext, x, hx)
    want = eager_jvp(ref, x, hx, t)
    oracle = reference_jvp(ext, x, hx, t)
    for got in (eager_jvp(ext, x, hx, t), func_jvp(ext, x, hx, t)):
        for g, w, o in zip(got, want, oracle):
            close(g, w)
            close(g, o)
    close(func_jvp(ref, x, hx, t)[0], want[0])  # (both ways agree for torch.nn.RNN too)


@pytest.mark.parametrize("bidir", [False, True])
def test_unbatched(bidir, path):
    ref, ext = _pair(dict(num_layers=2, bidirectional=bidir))
    x, hx = _inputs(ext, unbatched=True)
    t = _tangents(ext, x, hx)
    want = eager_jvp(ref, x, hx, t)
    for got in (eager_jvp(ext, x, hx, t), func_jvp(ext, x, hx, t), reference_jvp(ext, x, hx, t)):
        for g, w in zip(got, want):
            close(g, w)


@pytest.mark.parametrize("cfg", [dict(num_layers=2, bidirectional=True),
                                 dict(num_layers=3, nonlinearity="relu"),
                                 dict(num_layers=1, bidirectional=True, bias=False)], ids=_id)
@pytest.mark.parametrize("lengths", [[4, 2, 3, 1], [4, 4, 4, 4], [1, 1, 1, 1]])
def test_packed(cfg, lengths, path):
    """Ragged (unsorted) packed batches: eager forward AD against torch.nn.RNN; torch.func.jvp
    against rnn_ext.reference (torch.nn.RNN fails under torch.func with packed input)."""
    ref, ext = _pair(cfg)
    B = len(lengths)
    x0, hx = _inputs(ext, T=max(lengths), B=B)
    x = pack_padded_sequence(x0, torch.tensor(lengths), enforce_sorted=False)
    t = _tangents(ext, x, hx)
    want = eager_jvp(ref, x, hx, t)
    oracle = reference_jvp(ext, x, hx, t)
    for g, w, o in zip(eager_jvp(ext, x, hx, t), want, oracle):
        close(g, w)
        close(g, o)
    for g, o in zip(func_jvp(ext, x, hx, t), oracle):
        close(g, o)


@pytest.mark.parametrize("bidir", [False, True])
def test_dropout_in_training_uses_the_forwards_masks(bidir, path):
    """Training with dropout: the tangent goes through the very masks of the forward; with the
    same seed torch.nn.RNN draws the same masks."""
    ref, ext = _pair(dict(num_layers=3, bidirectional=bidir, dropout=0.5))
    ref.train(), ext.train()
    x, hx = _inputs(ext, T=5, B=3)
    t = _tangents(ext, x, hx)
    results = {}
    for name, m in (("ref", ref), ("ext", ext)):
        torch.manual_seed(7)
        results[name, "eager"] = eager_jvp(m, x, hx, t)
        torch.manual_seed(7)
        results[name, "func"] = func_jvp(m, x, hx, t)
    assert results["ref", "eager"][0].abs().sum() > 0
    for kind in ("eager", "func"):
        for g, w in zip(results["ext", kind], results["ref", kind]):
            close(g, w)
    # packed, ragged, against the reference with the masks the forward drew
    xp = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    t = _tangents(ext, xp, hx)
    torch.manual_seed(3)
    got = eager_jvp(ext, xp, hx, t)
    torch.manual_seed(3)
    want = eager_jvp(ref, xp, hx, t)
    for g, w in zip(got, want):
        close(g, w)


def test_jacfwd_and_hessian_match_torch(path):
    ref, ext = _pair(dict(num_layers=2, bidirectional=True))
    x, hx = _inputs(ext, T=3, B=2)
    p = _params(ext)

    def out_of(m):
        return lambda x_, h_: functional_call(m, p, (x_, h_))[0]

    for argnums in (0, 1):
        close(jacfwd(out_of(ext), argnums=argnums)(x, hx),
              jacfwd(out_of(ref), argnums=argnums)(x, hx))

    def loss_of(m, name):
        return lambda w: functional_call(m, {**p, name: w}, (x, hx))[0].pow(2).sum()

    for name in ("weight_hh_l0", "weight_ih_l1_reverse", "bias_hh_l1"):
        close(hessian(loss_of(ext, name))(p[name]), hessian(loss_of(ref, name))(p[name]))
    # the Hessian in the input (forward-over-reverse through the whole stack)
    hin = [hessian(lambda x_: functional_call(m, p, (x_, hx))[1].pow(2).sum())(x)
           for m in (ext, ref)]
    close(*hin)


def test_jacfwd_packed(path):
    """jacfwd (torch.func.vmap over the jvp) with ragged packed input, against the reference
    (torch.nn.RNN cannot run packed input under torch.func)."""
    _, ext = _pair(dict(num_layers=2, bidirectional=True))
    x0, hx = _inputs(ext, T=3, B=3)
    xp = pack_padded_sequence(x0, torch.tensor([3, 1, 2]), enforce_sorted=False)
    meta = xp[1:]
    p = _params(ext)
    names = ext._flat_weights_names
    kw = dict(num_layers=2, bidirectional=True)

    def f_ext(data, h, w):
        return functional_call(ext, p, (PackedSequence(data, *meta), h))[0].data

    def f_ref(data, h, w):
        h = h.index_select(1, xp.sorted_indices)
        return reference.rnn_packed_data(data, xp.batch_sizes, h, [p[n] for n in names], **kw)[0]

    for argnums in (0, 1):
        close(jacfwd(f_ext, argnums=argnums)(xp.data, hx, None),
              jacfwd(f_ref, argnums=argnums)(xp.data, hx, None))


def test_reverse_over_forward_matches_torch(path):
    """jacrev(jacfwd(f)) (under torch.func the jvp takes the reference path there), and in
    eager mode a dual input that requires grad, then backward through its tangent (through the
    fused kernel's own backward)."""
    ref, ext = _pair(dict(num_layers=2, bidirectional=True))
    x, hx = _inputs(ext, T=3, B=2)
    p = _params(ext)
    res = []
    for m in (ext, ref):
        f = lambda w: functional_call(m, {**p, "weight_hh_l0": w}, (x, hx))[0].pow(2).sum()  # noqa
        res.append(jacrev(jacfwd(f))(p["weight_hh_l0"]))
    close(*res)
    grads = []
    for m in (ext, ref):
        xr = x.clone().requires_grad_()
        m.zero_grad()
        with fwAD.dual_level():
            out, h = m(fwAD.make_dual(xr, torch.ones_like(x)), hx)
            t = fwAD.unpack_dual(out).tangent.pow(2).sum() + fwAD.unpack_dual(h).tangent.sum()
            t.backward()
        grads.append([xr.grad] + [q.grad for q in m.parameters()])
    for a, b in zip(*grads):
        close(a, b)


def test_fused_kernel_backward_gradcheck():
    """The fused kernel's own backward (total derivative in the primals and the input / hx
    tangents, the forward's caches held fixed) passes gradcheck, dense and packed, with dropout
    noise."""
    for packed in (False, True):
        _, ext = _pair(dict(num_layers=2, bidirectional=True), I=2, H=2)
        x, hx = _inputs(ext, T=3, B=2)
        bs = torch.tensor([2, 1, 1]) if packed else None
        if packed:
            x = x.reshape(-1, 2)[:4]  # (N, I) data of batch sizes [2, 1, 1]
        w = [q.detach() for q in ext._flat_weights]

        wt0 = torch.randn_like(w[0])  # (a Tensor?[] argument gets no gradient from torch.library)

        def f(x, hx, xt, ht, *w):
            torch.manual_seed(0)  # the same dropout noise at every evaluation
            out, _, ws, noise = ops.rnn_forward(x, hx, list(w), bs, True, 2, True, False, 0.4,
                                                True, True)
            assert noise.numel() > 0
            wts = [wt0] + [None] * (len(w) - 1)
            return ops.rnn_jvp(x, hx, list(w), bs, out, ws, noise, xt, ht, wts, True, 2, True,
                               False)

        leaves = [t.clone().requires_grad_() for t in
                  (x, hx, torch.randn_like(x), torch.randn_like(hx), *w)]
        assert gradcheck(f, leaves)


def _functional(m, packed_meta=None, seed=None):
    names = [n for n, _ in m.named_parameters()]

    def fn(x, hx, *params):
        if seed is not None:
            torch.manual_seed(seed)
        inp = x if packed_meta is None else PackedSequence(x, *packed_meta)
        out, h = functional_call(m, dict(zip(names, params)), (inp, hx))
        return _data(out), h

    return fn


def _leaves(m, x, hx):
    return (x.clone().requires_grad_(), hx.clone().requires_grad_(),
            *[p.detach().clone().requires_grad_() for p in m.parameters()])


@pytest.mark.parametrize("cfg", CASES, ids=_id)
def test_gradcheck_forward_ad(cfg, path):
    _, ext = _pair(cfg, I=2, H=3)
    x, hx = _inputs(ext, T=3, B=2)
    assert gradcheck(_functional(ext), _leaves(ext, x, hx), check_forward_ad=True,
                     check_backward_ad=True, check_batched_forward_grad=True)


def test_gradcheck_forward_ad_packed_and_dropout(path):
    _, ext = _pair(dict(num_layers=2, bidirectional=True, dropout=0.3), I=2, H=3)
    ext.eval()
    x0, hx = _inputs(ext, T=3, B=3)
    p = pack_padded_sequence(x0, torch.tensor([2, 3, 1]), enforce_sorted=False)
    meta = (p.batch_sizes, p.sorted_indices, p.unsorted_indices)
    fn = _functional(ext, meta)
    # (no check_batched_forward_grad here: gradcheck runs it under the legacy
    # torch._vmap_internals vmap, where the jvp takes the reference path, whose per-sequence
    # indexing of packed data that vmap cannot batch; torch.func's vmap over the fused kernel
    # with packed input is checked in test_jacfwd_packed)
    assert gradcheck(fn, _leaves(ext, p.data, hx), check_forward_ad=True)
    ext.train()
    fn = _functional(ext, seed=5)
    assert gradcheck(fn, _leaves(ext, x0, hx), check_forward_ad=True, check_backward_ad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_tangents(dtype, path):
    """float32, float16 and bfloat16 (computed in float32) against torch.nn.RNN's float64
    tangents, within their rounding."""
    cfg = dict(num_layers=2, bidirectional=True)
    ref64, ext64 = _pair(cfg)
    x, hx = _inputs(ext64)
    t = _tangents(ext64, x, hx)
    want = eager_jvp(ref64, x, hx, t)  # torch.nn.RNN, float64
    m = rnn_ext.RNN(3, 4, dtype=dtype, **cfg)
    m.load_state_dict(ext64.state_dict())
    got = eager_jvp(m, x.to(dtype), hx.to(dtype), {k: v.to(dtype) for k, v in t.items()})
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    for g, w in zip(got, want):
        assert g.dtype == dtype
        close(g.double(), w, tol=tol)


def test_no_tangent_and_plain_calls_inside_a_dual_level():
    """Inside a dual level, tensors without tangents give outputs without tangents (and the
    same values); outside, the eager C++ autograd node is still the one used."""
    _, ext = _pair(dict(num_layers=2))
    x, hx = _inputs(ext)
    out0, h0 = ext(x, hx)
    with fwAD.dual_level():
        out, h = ext(x, hx)
        assert fwAD.unpack_dual(out).tangent is None
        d = fwAD.make_dual(x, torch.zeros_like(x))
        out2, _ = ext(d, hx)
        assert torch.equal(fwAD.unpack_dual(out2).tangent, torch.zeros_like(out2))
    assert torch.equal(out, out0) and torch.equal(h, h0)
    out, _ = ext(x.requires_grad_(), hx)
    assert out.grad_fn.name() == "torch::autograd::CppNode<rnn_ext::RNNFunction>"


def test_rnn_jvp_checks_its_tangents():
    _, ext = _pair(dict(num_layers=1))
    x, hx = _inputs(ext, T=2, B=2)
    w = [p.detach() for p in ext._flat_weights]
    out, _, ws, noise = ops.rnn_forward(x, hx, w, None, True, 1, False, False, 0.0, False, True)
    args = (x, hx, w, None, out, ws, noise)
    with pytest.raises(RuntimeError, match="the tangent of input has shape"):
        ops.rnn_jvp(*args, x[:1], None, [None] * 4, True, 1, False, False)
    with pytest.raises(RuntimeError, match="expected 4 weight tangents"):
        ops.rnn_jvp(*args, None, None, [None] * 3, True, 1, False, False)
    with pytest.raises(RuntimeError, match="the tangent of a weight"):
        ops.rnn_jvp(*args, None, None, [None, w[0], None, None], True, 1, False, False)
    # all tangents None: zero tangents
    ot, ht = ops.rnn_jvp(*args, None, None, [None] * 4, True, 1, False, False)
    assert not ot.any() and not ht.any()


@pytest.mark.parametrize("packed,requires_grad", [(False, False), (True, False), (False, True)])
def test_opcheck_rnn_jvp(packed, requires_grad):
    """Schema, fake kernel, autograd registration and tracing of the rnn_jvp op.  (Not packed
    with requires_grad: the op's backward differentiates rnn_ext.reference, whose packed loop
    reads batch_sizes, which opcheck's aot_dispatch tracing cannot.)"""
    _, ext = _pair(dict(num_layers=2, bidirectional=True))
    x, hx = _inputs(ext, T=3, B=2)
    bs = None
    if packed:
        p = pack_padded_sequence(x, torch.tensor([3, 1]))
        x, bs = p.data, p.batch_sizes
    w = [q.detach() for q in ext._flat_weights]
    out, _, ws, noise = ops.rnn_forward(x, hx, w, bs, True, 2, True, False, 0.0, False, True)
    rg = lambda t: t.clone().requires_grad_(requires_grad)  # noqa: E731
    wt = [torch.randn_like(q) if i % 3 == 0 else None for i, q in enumerate(w)]
    args = (rg(x), rg(hx), [rg(q) for q in w], bs, out, ws, noise, rg(torch.randn_like(x)),
            None, wt, True, 2, True, False)
    torch.library.opcheck(ops.rnn_jvp, args)


@pytest.mark.parametrize("B,H,lengths", [(8, 32, None), (1, 96, None), (8, 32, [6, 6, 5, 4, 4, 2, 2, 1]),
                                         (3, 64, [6, 3, 5])])
def test_float32_team_recurrence(B, H, lengths):
    """float32 at sizes where the recurrence runs on a team of threads (rows or columns of h,
    B*H*H >= 2^13 with 2 threads) and the AVX2 step kernel: fused tangents against torch.nn.RNN's
    float64 ones, dense and packed ragged, two bidirectional layers, every tangent."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        cfg = dict(num_layers=2, bidirectional=True)
        ref64, ext64 = _pair(cfg, I=5, H=H)
        x, hx = _inputs(ext64, T=6, B=B)
        if lengths is not None:
            x = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        t = _tangents(ext64, x, hx)
        want = eager_jvp(ref64, x, hx, t)  # torch.nn.RNN, float64
        ext32 = rnn_ext.RNN(5, H, dtype=torch.float32, **cfg)
        ext32.load_state_dict(ext64.state_dict())
        x32 = x.float() if isinstance(x, torch.Tensor) else PackedSequence(
            x.data.float(), *x[1:])
        got = eager_jvp(ext32, x32, hx.float(),
                        {k: v.float() for k, v in t.items()})
        for g, w in zip(got, want):
            close(g.double(), w, tol=2e-5)
    finally:
        torch.set_num_threads(threads)


def test_weight_tangent_that_requires_grad_keeps_its_graph():
    """Forward AD with a weight's tangent that itself requires grad (a jvp inside a reverse
    pass over the tangent): the output tangent depends on it differentiably, as torch.nn.RNN's
    does (the fused kernel has no backward for weight tangents, so the reference path runs:
    _fused_jvp_applies).  The gradient w.r.t. that tangent matches torch's."""
    ref, ext = _pair(dict(num_layers=2, bidirectional=True))
    x, hx = _inputs(ext, T=4, B=3)
    p = _params(ext)
    g = torch.Generator().manual_seed(3)
    t0 = torch.randn(p["weight_ih_l0"].shape, generator=g, dtype=F64)
    grads = []
    for m in (ext, ref):
        t = t0.clone().requires_grad_()
        with fwAD.dual_level():
            w = fwAD.make_dual(p["weight_ih_l0"], t)
            out, h = functional_call(m, {**p, "weight_ih_l0": w}, (x, hx))
            tan = fwAD.unpack_dual(out).tangent.pow(2).sum() + fwAD.unpack_dual(h).tangent.sum()
        assert tan.requires_grad
        grads.append(torch.autograd.grad(tan, t))
    close(grads[0][0], grads[1][0])
