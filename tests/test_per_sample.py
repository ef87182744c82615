"""Per-sample gradients (DP training): the fused per-sample kernel reached through
rnn_ext.per_sample_gradients, torch.func (vmap of grad, jacrev) and Opacus, against loops of
single-sample torch.autograd.grad calls (rnn_ext and torch.nn.RNN)."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_ext
from conftest import TOL, make_pair

CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, nonlinearity="relu"),
    dict(num_layers=2, bias=False, batch_first=True),
    dict(num_layers=2, dropout=0.5),
    dict(num_layers=2, bidirectional=True, dropout=0.3, batch_first=True),
]
IDS = ["plain", "bidir", "relu3", "nobias_bf", "dropout", "bidir_dropout_bf"]

T, B, I, H = 6, 5, 3, 4
LENGTHS = [6, 2, 5, 1, 4]   # ragged, unsorted: packing reorders the samples


def _inputs(cfg, dtype, packed, with_hx):
    g = torch.Generator().manual_seed(7)
    D = 2 if cfg.get("bidirectional") else 1
    L = cfg["num_layers"]
    x = torch.randn(T, B, I, generator=g, dtype=dtype)              # seq-first
    hx = torch.randn(L * D, B, H, generator=g, dtype=dtype) if with_hx else None
    # the loss: a fixed random linear function of each sample's output steps and its h_n
    gy = torch.randn(T, B, D * H, generator=g, dtype=dtype)
    gh = torch.randn(L * D, B, H, generator=g, dtype=dtype)
    if packed:
        for b, n in enumerate(LENGTHS):
            gy[n:, b] = 0
    return x, hx, gy, gh


def _run(m, x, hx, gy, gh, packed, samples=None):
    """Loss of the samples `samples` (all when None) run as one batch."""
    bf = m.batch_first
    idx = list(range(B)) if samples is None else samples
    xs = x[:, idx]
    h0 = None if hx is None else hx[:, idx]
    if packed:
        lens = torch.tensor([LENGTHS[i] for i in idx])
        xs = xs[: int(lens.max())]
        inp = pack_padded_sequence(xs.transpose(0, 1) if bf else xs, lens, batch_first=bf,
                                   enforce_sorted=False)
        out, hn = m(inp, h0)
        out, _ = pad_packed_sequence(out, total_length=T)  # seq-first
    else:
        out, hn = m(xs.transpose(0, 1) if bf else xs, h0)
        if bf:
            out = out.transpose(0, 1)
    return (out * gy[:, idx]).sum(0).sum(-1), (hn * gh[:, idx]).sum(0).sum(-1)  # per sample


def _per_sample_loop(m, x, hx, gy, gh, packed, seed, single):
    """Per-sample gradients by single-sample torch.autograd.grad calls: on single-sample
    forwards (single=True; no dropout), or on one batched forward with the batch's dropout
    masks, one grad call per sample's loss."""
    params = [p for p in m.parameters()]
    rows = []
    if single:
        for b in range(B):
            lo, lh = _run(m, x, hx, gy, gh, packed, [b])
            rows.append(torch.autograd.grad((lo + lh).sum(), params))
    else:
        torch.manual_seed(seed)
        lo, lh = _run(m, x, hx, gy, gh, packed)
        for b in range(B):
            rows.append(torch.autograd.grad(lo[b] + lh[b], params, retain_graph=True))
    return [torch.stack(r) for r in zip(*rows)]


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_per_sample_gradients_match_single_sample_loops(cfg, packed, dtype):
    ref, ext = make_pair(I, H, dtype=dtype, **cfg)
    ref.train(), ext.train()
    with_hx = cfg["num_layers"] != 3
    x, hx, gy, gh = _inputs(cfg, dtype, packed, with_hx)
    seed = 123
    with rnn_ext.per_sample_gradients(ext):
        torch.manual_seed(seed)
        lo, lh = _run(ext, x, hx, gy, gh, packed)
        (lo + lh).sum().backward()
    got = [p.grad_sample for p in ext.parameters()]
    assert all(g.shape == (B, *p.shape) for g, p in zip(got, ext.parameters()))
    # the summed gradient is the sum of the per-sample ones
    for p, g in zip(ext.parameters(), got):
        torch.testing.assert_close(p.grad, g.sum(0), **TOL[dtype])
    tol = TOL[dtype]
    dropout = cfg.get("dropout", 0) > 0
    wants = [_per_sample_loop(ref, x, hx, gy, gh, packed, seed, single=False),
             _per_sample_loop(ext, x, hx, gy, gh, packed, seed, single=False)]
    if not dropout:  # each sample alone (it never sees another sample's steps or padding)
        wants.append(_per_sample_loop(ext, x, hx, gy, gh, packed, seed, single=True))
    for want in wants:
        for (n, _), g, w in zip(ext.named_parameters(), got, want):
            torch.testing.assert_close(g, w, **tol, msg=lambda s: f"{n}: {s}")


def test_per_sample_gradients_reference_oracle():
    """Against rnn_ext.reference (the plain-PyTorch oracle), one grad call per sample."""
    _, ext = make_pair(I, H, dtype=torch.float64, num_layers=2, bidirectional=True)
    x, hx, gy, gh = _inputs(dict(num_layers=2, bidirectional=True), torch.float64, False, True)
    with rnn_ext.per_sample_gradients(ext):
        out, hn = ext(x, hx)
        ((out * gy).sum() + (hn * gh).sum()).backward()
    ws = [w.detach().requires_grad_() for w in ext._flat_weights]
    out, hn = rnn_ext.reference.rnn(x, hx, ws, num_layers=2, bidirectional=True, relu=False)
    for b in range(B):
        lb = (out[:, b] * gy[:, b]).sum() + (hn[:, b] * gh[:, b]).sum()
        for w, p, g in zip(ws, ext._flat_weights, torch.autograd.grad(lb, ws, retain_graph=True)):
            torch.testing.assert_close(p.grad_sample[b], g, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_sample_gradients_half(dtype):
    """Half dtypes are computed in float32: the per-sample gradients are the float32 ones,
    rounded."""
    _, ext = make_pair(I, H, dtype=torch.float32, num_layers=2)
    x, hx, gy, gh = _inputs(dict(num_layers=2), torch.float32, False, True)
    with rnn_ext.per_sample_gradients(ext):
        lo, lh = _run(ext, x, hx, gy, gh, False)
        (lo + lh).sum().backward()
    want = [p.grad_sample for p in ext.parameters()]
    half = rnn_ext.RNN(I, H, num_layers=2, dtype=dtype)
    half.load_state_dict(ext.state_dict())
    with rnn_ext.per_sample_gradients(half):
        lo, lh = _run(half, x.to(dtype), hx.to(dtype), gy.to(dtype), gh.to(dtype), False)
        (lo + lh).sum().backward()
    for p, w in zip(half.parameters(), want):
        assert p.grad_sample.dtype == dtype
        torch.testing.assert_close(p.grad_sample.float(), w, **TOL[dtype])


def test_unbatched_and_outside_the_block():
    _, ext = make_pair(I, H, num_layers=2)
    x = torch.randn(T, I)
    with rnn_ext.per_sample_gradients(ext):
        out, hn = ext(x)
        (out.sum() + hn.sum()).backward()
    assert all(p.grad_sample.shape == (1, *p.shape) for p in ext.parameters())
    for p in ext.parameters():
        torch.testing.assert_close(p.grad_sample[0], p.grad, **TOL[torch.float32])
        p.grad_sample = None
    ext(x)[0].sum().backward()  # outside the block: the usual path, no grad_sample
    assert all(p.grad_sample is None for p in ext.parameters())
    assert ext._per_sample is None


def test_per_sample_gradients_sum_over_calls_in_a_block():
    """Within one per_sample_gradients block, grad_sample sums every call's per-sample
    gradients (two forward calls in one backward, then a second backward), as .grad sums their
    gradients: grad_sample.sum(0) == .grad, and each row is that sample's own gradient."""
    _, ext = make_pair(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    x1, x2, x3 = (torch.randn(T, B, I, generator=g, dtype=torch.float64) for _ in range(3))

    def losses(xs, samples):
        return sum(ext(x[:, samples])[0].pow(2).sum() for x in xs)

    with rnn_ext.per_sample_gradients(ext):
        losses((x1, x2), list(range(B))).backward()
        losses((x3,), list(range(B))).backward()
    for p in ext.parameters():
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, **TOL[torch.float64])
    for b in (0, B - 1):
        want = torch.autograd.grad(losses((x1, x2, x3), [b]), list(ext.parameters()))
        for p, w in zip(ext.parameters(), want):
            torch.testing.assert_close(p.grad_sample[b], w, **TOL[torch.float64])


@pytest.mark.parametrize("bias", [True, False])
def test_empty_batch(bias):
    """An empty batch: per-sample gradients (0, *w), and .grad / the op's summed gradients
    zero, as torch.nn.RNN's gradients are for an empty batch."""
    torch.manual_seed(3)
    tm = torch.nn.RNN(I, H, num_layers=2, bias=bias)
    m = rnn_ext.convert_rnns(torch.nn.RNN(I, H, num_layers=2, bias=bias))
    x = torch.randn(T, 0, I)
    for mod in (tm, m):
        ctx = rnn_ext.per_sample_gradients(mod) if mod is m else torch.enable_grad()
        with ctx:
            out, hn = mod(x)
            (out.sum() + hn.sum()).backward()
    for (n, p), tp in zip(m.named_parameters(), tm.parameters()):
        assert p.grad_sample.shape == (0, *p.shape), n
        torch.testing.assert_close(p.grad, tp.grad, rtol=0, atol=0, msg=n)
        torch.testing.assert_close(p.grad, torch.zeros_like(p), rtol=0, atol=0, msg=n)
    w = list(m._flat_weights)
    h0 = torch.zeros(2, 0, H)
    out, hy, ws, noise = rnn_ext.ops.rnn_forward(x, h0, w, None, bias, 2, False, False, 0.0,
                                                 False, True)
    _, _, gw, summed = rnn_ext.ops.rnn_backward_per_sample(
        x, h0, w, None, out, ws, noise, torch.ones_like(out), None, bias, 2, False, False,
        [False, False, True], 0, 3.0)
    for g, s, wi in zip(gw, summed, w):
        assert g.shape == (0, *wi.shape)
        torch.testing.assert_close(s, torch.zeros_like(wi), rtol=0, atol=0)
    # through Opacus (a mean loss: its batch-size factor is 0 here, which the kernel refuses)
    from opacus import GradSampleModule
    gsm = GradSampleModule(rnn_ext.RNN(I, H, num_layers=2, bias=bias, batch_first=True))
    out, hn = gsm(x.transpose(0, 1))
    (out.sum() + hn.sum()).backward()
    for n, p in gsm.named_parameters():
        assert p.grad_sample.shape == (0, *p.shape), n
        torch.testing.assert_close(p.grad, torch.zeros_like(p), rtol=0, atol=0, msg=n)


def test_errors():
    _, ext = make_pair(I, H, num_layers=2)
    with pytest.raises(ValueError, match="contains no rnn_ext.RNN"):
        with rnn_ext.per_sample_gradients(torch.nn.Linear(2, 2)):
            pass
    x = torch.randn(T, 4, I)
    h0 = torch.zeros(2, 4, H)
    w = list(ext._flat_weights)
    out, hy, ws, noise = rnn_ext.ops.rnn_forward(x, h0, w, None, True, 2, False, False, 0.0,
                                                 False, True)
    args = (x, h0, w, None, out, ws, noise, torch.ones_like(out), None, True, 2, False, False,
            [False, False, True])
    with pytest.raises(RuntimeError, match="groups must divide the batch size 4"):
        rnn_ext.ops.rnn_backward_per_sample(*args, 3)
    with pytest.raises(RuntimeError, match="groups must divide"):
        rnn_ext.ops.rnn_backward_per_sample(*args, 0)
    for scale in (0.0, float("nan")):
        with pytest.raises(RuntimeError, match="scale must be finite and nonzero"):
            rnn_ext.ops.rnn_backward_per_sample(*args, 4, scale)
    # groups = 2: each pair of rows summed; the summed gradients whatever the groups and scale
    _, _, gw, s2 = rnn_ext.ops.rnn_backward_per_sample(*args, 2)
    _, _, g4, s4 = rnn_ext.ops.rnn_backward_per_sample(*args, 4, 3.0)
    _, _, summed = rnn_ext.ops.rnn_backward(*args[:-1], [False, False, True])
    for a, b, c, d, e in zip(gw, g4, s2, s4, summed):
        torch.testing.assert_close(a, b.view(2, 2, *b.shape[1:]).sum(1) / 3)
        torch.testing.assert_close(c, e)
        torch.testing.assert_close(d, e)


def test_per_sample_backward_errors():
    """The per-sample backward (the C++ node with a sink): no create_graph, not under torch.func
    or forward AD (it would drop the per-sample gradients), and an exception raised by the sink
    (e.g. Opacus refusing) reaches the caller of backward() as itself."""
    _, ext = make_pair(I, H, num_layers=2)
    x = torch.randn(T, B, I, requires_grad=True)
    with rnn_ext.per_sample_gradients(ext):
        out, hn = ext(x)
        with pytest.raises(RuntimeError, match="cannot be differentiated: backward.create_graph"):
            torch.autograd.grad(out.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="cannot be formed under torch.func"):
            torch.func.grad(lambda x: ext(x)[0].sum())(x.detach())
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x.detach(), torch.ones_like(x))
            with pytest.raises(RuntimeError, match="cannot be formed under torch.func"):
                ext(dual)
    assert all(getattr(p, "grad_sample", None) is None for p in ext.parameters())

    class Refused(Exception):
        pass

    def sink(grads):
        raise Refused(len(grads))

    sink.grad_scale = lambda: 2.0
    w = list(ext._flat_weights)
    out, _ = rnn_ext.ops.rnn(x, torch.zeros(2, B, H), w, None, has_biases=True, num_layers=2,
                             bidirectional=False, relu=False, per_sample=sink)
    with pytest.raises(Refused, match="8"):
        out.sum().backward()
    sink.grad_scale = lambda: "two"
    out, _ = rnn_ext.ops.rnn(x, torch.zeros(2, B, H), w, None, has_biases=True, num_layers=2,
                             bidirectional=False, relu=False, per_sample=sink)
    with pytest.raises(TypeError, match="must be real number"):
        out.sum().backward()
    with pytest.raises(TypeError, match="per_sample must be callable or None"):
        rnn_ext.ops.rnn(x, torch.zeros(2, B, H), w, None, has_biases=True, num_layers=2,
                        bidirectional=False, relu=False, per_sample=3)


def test_per_sample_sink_makes_no_uncollectable_cycle():
    """The autograd node (C++, invisible to Python's collector) keeps its per-sample sink: the
    sink must not hold the model, or a model keeping one of its outputs (an undetached h_n on
    the module, a common RNN pattern) would never be freed."""
    import gc
    import weakref

    from opacus import GradSampleModule

    class Keeps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn_ext.RNN(I, H, batch_first=True)
            self.head = torch.nn.Linear(H, 2)

        def forward(self, x):
            out, hn = self.rnn(x)
            self.kept = hn  # not detached: holds the graph, and so the node and its sink
            return self.head(out[:, -1])

    def run(opacus):
        model = Keeps()
        ref = weakref.ref(model)
        x = torch.randn(B, T, I)
        if opacus:
            GradSampleModule(model)(x).sum()
        else:
            with rnn_ext.per_sample_gradients(model):
                model(x).sum()
        return ref

    for opacus in (False, True):
        ref = run(opacus)
        gc.collect()
        assert ref() is None, f"model not freed (opacus={opacus})"


# --- torch.func ----------------------------------------------------------------------------

class _Model(torch.nn.Module):
    """An RNN inside a bigger model: a linear head on the last step and on h_n."""

    def __init__(self, rnn_cls, dtype, **cfg):
        super().__init__()
        torch.manual_seed(3)
        self.rnn = rnn_cls(I, H, batch_first=True, dtype=dtype, **cfg)
        D = 2 if cfg.get("bidirectional") else 1
        self.head = torch.nn.Linear(D * H + H, 3, dtype=dtype)

    def forward(self, x):
        out, hn = self.rnn(x)
        return self.head(torch.cat([out[:, -1], hn[-1]], -1))


def _loss(model, params, x, y):
    logits = torch.func.functional_call(model, params, (x,))
    return torch.nn.functional.cross_entropy(logits, y)


def _loop_grads(model, x, y):
    """Per-sample gradients of every parameter, one torch.autograd.grad call per sample."""
    rows = []
    for b in range(x.shape[0]):
        ps = dict(model.named_parameters())
        loss = _loss(model, ps, x[b:b + 1], y[b:b + 1])
        rows.append(dict(zip(ps, torch.autograd.grad(loss, list(ps.values())))))
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


class _Count:
    """Counts calls of an rnn_ext.ops function (how many stacks ran)."""

    def __init__(self, monkeypatch, name):
        self.n = 0
        fn = getattr(rnn_ext.ops, name)

        def counted(*a, **k):
            self.n += 1
            return fn(*a, **k)

        monkeypatch.setattr(rnn_ext.ops, name, counted)


@pytest.mark.parametrize("cfg", [dict(num_layers=1), dict(num_layers=2, bidirectional=True),
                                 dict(num_layers=2, nonlinearity="relu", bias=False)],
                         ids=["plain", "bidir", "relu_nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_vmap_grad_runs_one_stack(cfg, dtype, monkeypatch):
    """vmap(grad(loss)) over functional_call of a model containing rnn_ext.RNN: one forward
    stack and one per-sample backward for the whole vmapped batch, equal to a loop of
    single-sample gradients of rnn_ext and of torch.nn.RNN."""
    from torch.func import grad, vmap

    model = _Model(rnn_ext.RNN, dtype, **cfg)
    ref = _Model(torch.nn.RNN, dtype, **cfg)
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, I, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (B,), generator=g)
    params = {n: p.detach() for n, p in model.named_parameters()}
    fwd = _Count(monkeypatch, "rnn_forward")
    bwd = _Count(monkeypatch, "rnn_backward_per_sample")
    got = vmap(grad(lambda p, xb, yb: _loss(model, p, xb[None], yb[None])),
               in_dims=(None, 0, 0))(params, x, y)
    assert (fwd.n, bwd.n) == (1, 1)
    for want in (_loop_grads(model, x, y), _loop_grads(ref, x, y)):
        for n in want:
            torch.testing.assert_close(got[n], want[n], **TOL[dtype], msg=lambda s: f"{n}: {s}")


def test_jacrev_of_per_sample_losses(monkeypatch):
    """jacrev of the per-sample losses w.r.t. the parameters: the vmapped cotangents run one
    BPTT stack; equal to per-sample gradients by a loop."""
    from torch.func import functional_call, jacrev

    model = _Model(rnn_ext.RNN, torch.float64, num_layers=2)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=g)
    params = {n: p.detach() for n, p in model.named_parameters()}
    bwd = _Count(monkeypatch, "rnn_backward_per_sample")

    def losses(p):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y,
                                                 reduction="none")

    jac = jacrev(losses)(params)
    assert bwd.n == 1
    want = _loop_grads(model, x, y)
    for n in want:
        torch.testing.assert_close(jac[n], want[n], **TOL[torch.float64])


def test_vmap_grad_hx_input_grads_and_second_order():
    """Gradients w.r.t. the vmapped input and hx under vmap(grad), and a second-order
    gradient (grad of grad) through the per-sample backward's own backward."""
    from torch.func import grad, vmap

    _, ext = make_pair(I, H, dtype=torch.float64, num_layers=2, bidirectional=True)
    ref, _ = make_pair(I, H, dtype=torch.float64, num_layers=2, bidirectional=True)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(B, T, 1, I, generator=g, dtype=torch.float64)
    h = torch.randn(B, 4, 1, H, generator=g, dtype=torch.float64)

    def f(m, p, xb, hb):
        out, hn = torch.func.functional_call(m, p, (xb, hb))
        return out.pow(2).sum() + hn.sin().sum()

    pe = {n: p.detach() for n, p in ext.named_parameters()}
    pr = {n: p.detach() for n, p in ref.named_parameters()}
    got = vmap(grad(lambda p, xb, hb: f(ext, p, xb, hb), argnums=(0, 1, 2)),
               in_dims=(None, 0, 0))(pe, x, h)
    for b in range(B):
        ps = {n: p.clone().requires_grad_() for n, p in pr.items()}
        xb, hb = x[b].clone().requires_grad_(), h[b].clone().requires_grad_()
        gs = torch.autograd.grad(f(ref, ps, xb, hb), [*ps.values(), xb, hb])
        for (n, _), gg in zip(ps.items(), gs):
            torch.testing.assert_close(got[0][n][b], gg, **TOL[torch.float64])
        torch.testing.assert_close(got[1][b], gs[-2], **TOL[torch.float64])
        torch.testing.assert_close(got[2][b], gs[-1], **TOL[torch.float64])
    # second order: d/dx of |d loss / d W_hh|^2, per sample
    gg = vmap(grad(lambda xb: grad(lambda p: f(ext, p, xb, h[0]))(pe)["weight_hh_l0"]
                   .pow(2).sum()))(x)
    for b in (0, 3):
        xb = x[b].clone().requires_grad_()
        ps = {n: p.clone().requires_grad_() for n, p in pr.items()}
        (gw,) = torch.autograd.grad(f(ref, ps, xb, h[0]), [ps["weight_hh_l0"]], create_graph=True)
        (gx,) = torch.autograd.grad(gw.pow(2).sum(), xb)
        torch.testing.assert_close(gg[b], gx, **TOL[torch.float64])


def test_vmap_fallbacks_ensemble_and_packed():
    """Vmapped weights (a model ensemble) keep the per-entry loop, with correct gradients."""
    from torch.func import functional_call, grad, vmap

    ref, ext = make_pair(I, H, dtype=torch.float64, num_layers=2)
    x = torch.randn(T, 2, I, dtype=torch.float64)
    pe = {n: p.detach() for n, p in ext.named_parameters()}
    stacked = {n: torch.stack([p * (1 + 0.1 * i) for i in range(3)]) for n, p in pe.items()}

    def loss(m, p):
        out, hn = functional_call(m, p, (x,))
        return out.pow(2).sum() + hn.sum()

    got = vmap(grad(lambda p: loss(ext, p)))(stacked)
    for i in range(3):
        ps = {n: stacked[n][i].clone().requires_grad_() for n in stacked}
        for (n, p), gg in zip(ps.items(), torch.autograd.grad(loss(ref, ps), list(ps.values()))):
            torch.testing.assert_close(got[n][i], gg, **TOL[torch.float64])


# --- Opacus --------------------------------------------------------------------------------

opacus = pytest.importorskip("opacus")


class _Clf(torch.nn.Module):
    def __init__(self, rnn, use_h=True):
        super().__init__()
        self.rnn, self.use_h = rnn, use_h
        D = 2 if rnn.bidirectional else 1
        self.head = torch.nn.Linear(D * rnn.hidden_size, 3, dtype=rnn.weight_hh_l0.dtype)

    def forward(self, x):
        out, hn = self.rnn(x)
        if isinstance(out, torch.nn.utils.rnn.PackedSequence):
            out, _ = pad_packed_sequence(out, batch_first=True)
        feat = torch.cat([hn[-1], hn[-2]], -1) if self.rnn.bidirectional else hn[-1]
        if not self.use_h:
            feat = out[:, -1] if not self.rnn.bidirectional else out[:, 0]
        return self.head(feat)


@pytest.fixture(params=["lean", "opacus"])
def opacus_hooks(request, monkeypatch):
    """Both ways rnn_ext.RNN keeps Opacus' bookkeeping: its lean hooks (the default, where
    opacus is a version whose GradSampleModule hooks they reproduce), and Opacus' own hooks
    with rnn_ext's grad sampler (what any other opacus gets).  Returns the mode and how many
    times each way ran."""
    from opacus.grad_sample import GradSampleModule

    if request.param == "opacus":
        monkeypatch.setattr(rnn_ext.dp, "_knows_opacus", lambda: False)
    else:
        assert rnn_ext.dp._knows_opacus(), "this opacus is not one the lean hooks reproduce"
    ran = {"lean": 0, "opacus": 0}

    def counted(key, fn):
        def f(*args):
            ran[key] += 1
            return fn(*args)
        return f

    monkeypatch.setattr(rnn_ext.dp, "_backprops_lean",
                        counted("lean", rnn_ext.dp._backprops_lean))
    monkeypatch.setitem(GradSampleModule.GRAD_SAMPLERS, rnn_ext.RNN,
                        counted("opacus", GradSampleModule.GRAD_SAMPLERS[rnn_ext.RNN]))
    return request.param, ran


def _check_opacus_state(gsm, hooks, calls):
    """After the backward passes: Opacus' per-call state all consumed, as its own hooks leave
    it, and the RNN's `calls` backward passes kept by the hooks the fixture chose."""
    for m in gsm._module.modules():
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        assert getattr(m, "activations", []) == [], type(m)
        assert not hasattr(m, "max_batch_len"), type(m)
        for p in m.parameters(recurse=False):
            assert p._forward_counter == 0 and not hasattr(p, "_current_grad_sample")
    mode, ran = hooks
    assert ran == {k: calls if k == mode else 0 for k in ("lean", "opacus")}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", ["h_n", "output", "bidir_dropout", "packed"])
def test_opacus_grad_sample_module(case, reduction, opacus_hooks):
    """GradSampleModule on a model with rnn_ext.RNN: grad_sample of every parameter (the
    RNN's through its own per-sample backward, using the gradient of h_n as well as the
    output's) equals a loop of single-sample gradients; nothing registered by the user."""
    from opacus import GradSampleModule

    cfg = dict(num_layers=2, batch_first=True)
    if case == "bidir_dropout":
        cfg.update(bidirectional=True, dropout=0.4)
    torch.manual_seed(1)
    rnn = rnn_ext.RNN(I, H, dtype=torch.float64, **cfg)
    model = _Clf(rnn, use_h=case != "output")
    gsm = GradSampleModule(model, loss_reduction=reduction)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=g)
    lengths = torch.tensor(LENGTHS)

    def inp(idx):
        if case != "packed":
            return x[idx]
        return pack_padded_sequence(x[idx], lengths[idx], batch_first=True, enforce_sorted=False)

    torch.manual_seed(9)
    loss = torch.nn.functional.cross_entropy(gsm(inp(list(range(B)))), y, reduction=reduction)
    loss.backward()
    _check_opacus_state(gsm, opacus_hooks, 1)
    got = {n: p.grad_sample for n, p in model.named_parameters()}
    # the reference: one grad call per sample (same dropout masks: one batched forward)
    gsm.disable_hooks()
    torch.manual_seed(9)
    losses = torch.nn.functional.cross_entropy(model(inp(list(range(B)))), y, reduction="none")
    for b in range(B):
        gs = torch.autograd.grad(losses[b], list(model.parameters()), retain_graph=True)
        for (n, _), gg in zip(model.named_parameters(), gs):
            torch.testing.assert_close(got[n][b], gg, **TOL[torch.float64],
                                       msg=lambda s: f"{n}[{b}]: {s}")
    if case == "packed":  # and each sample on its own
        for b in (0, 3):
            ls = torch.nn.functional.cross_entropy(model(inp([b])), y[b:b + 1])
            gs = torch.autograd.grad(ls, list(rnn.parameters()))
            for (n, _), gg in zip(rnn.named_parameters(), gs):
                torch.testing.assert_close(got["rnn." + n][b], gg, **TOL[torch.float64])


def test_opacus_make_private_trains():
    """PrivacyEngine.make_private on a model with rnn_ext.RNN: DP-SGD steps run (per-sample
    clipping needs every parameter's grad_sample), the loss goes down and epsilon is spent."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = _Clf(rnn_ext.RNN(I, H, num_layers=2, batch_first=True))
    x = torch.randn(64, T, I)
    y = (x[:, :, 0].sum(1) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                            noise_multiplier=0.3, max_grad_norm=1.0)
    losses = []
    for _ in range(6):
        for xb, yb in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            assert all(p.grad_sample is not None for p in model.parameters())
            opt.step()
            losses.append(loss.item())
    assert engine.get_epsilon(1e-5) > 0
    assert sum(losses[-4:]) < sum(losses[:4])


@pytest.mark.parametrize("first", ["rnn_ext", "opacus"])
def test_opacus_registration_without_importing_opacus(first):
    """`import rnn_ext` does not import opacus; importing opacus before or after rnn_ext
    registers rnn_ext.RNN's grad sampler."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    check = ("import opacus.grad_sample as g, rnn_ext; "
             "assert g.GradSampleModule.GRAD_SAMPLERS[rnn_ext.RNN] is "
             "rnn_ext.dp._opacus_grad_sampler")
    code = ("import sys, rnn_ext; assert 'opacus' not in sys.modules; " + check
            if first == "rnn_ext" else "import opacus; " + check)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr


def _single_sample_grads(model, loss_of, samples):
    """{name: (len(samples), *shape)}: each sample's own gradient (hooks off)."""
    rows = []
    for b in samples:
        rows.append(torch.autograd.grad(loss_of([b]), list(model.parameters())))
    return {n: torch.stack(r) for (n, _), r in zip(model.named_parameters(), zip(*rows))}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_opacus_accumulates_over_calls_and_batches(reduction, opacus_hooks):
    """Opacus' accumulation around the buffers rnn_ext hands over (its _current_grad_sample):
    the RNN run twice in one forward (per-sample gradients summed over both calls, in the
    buffer of the first), and two backward passes before an optimizer step (grad_sample a
    list, one entry per batch, the second batch smaller than the first)."""
    from opacus import GradSampleModule

    torch.manual_seed(3)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn_ext.RNN(I, H, num_layers=2, batch_first=True, dtype=torch.float64)
            self.head = torch.nn.Linear(H, 3, dtype=torch.float64)

        def forward(self, x):
            _, h1 = self.rnn(x)
            _, h2 = self.rnn(x.flip(1) * 0.5)
            return self.head(h1[-1] + h2[-1])

    model = Twice()
    gsm = GradSampleModule(model, loss_reduction=reduction)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=g)
    F = torch.nn.functional
    batches = [list(range(B)), [1, 3, 4]]
    for idx in batches:
        F.cross_entropy(gsm(x[idx]), y[idx], reduction=reduction).backward()
    _check_opacus_state(gsm, opacus_hooks, 4)  # two calls in each of two batches
    gsm.disable_hooks()
    for k, idx in enumerate(batches):
        # (Opacus undoes a mean loss's 1/B: a sample's gradient is that of its own loss)
        want = _single_sample_grads(model, lambda s: F.cross_entropy(model(x[s]), y[s]), idx)
        for n, p in model.named_parameters():
            assert isinstance(p.grad_sample, list) and len(p.grad_sample) == 2, n
            torch.testing.assert_close(p.grad_sample[k], want[n], **TOL[torch.float64],
                                       msg=lambda s: f"{n}, batch {k}: {s}")



def test_opacus_forbidden_accumulation_and_disabled_hooks(opacus_hooks):
    """On a model whose only parameters are rnn_ext.RNN's (so no other layer's Opacus hook can
    do it): with accumulation forbidden (Poisson sampling in make_private), a second backward
    before the optimizer step raises Opacus' error; with the hooks disabled, a forward and
    backward leave no per-sample state; enabled again, grad_sample is the batch's."""
    from opacus import GradSampleModule

    torch.manual_seed(5)
    rnn = rnn_ext.RNN(I, H, num_layers=2, batch_first=True, dtype=torch.float64)
    gsm = GradSampleModule(rnn)
    x = torch.randn(B, T, I, dtype=torch.float64)

    def loss():
        out, hn = gsm(x)
        return out.pow(2).mean() + hn.sum()

    gsm.forbid_grad_accumulation()
    loss().backward()
    with pytest.raises(ValueError, match="Poisson sampling is not compatible with grad "
                                         "accumulation"):
        loss().backward()
    gsm.zero_grad(set_to_none=True)
    gsm.allow_grad_accumulation()
    for a in ("activations", "max_batch_len"):
        rnn.__dict__.pop(a, None)
    for p in rnn.parameters():
        p._forward_counter = 0
        p.__dict__.pop("_current_grad_sample", None)
    gsm.disable_hooks()
    loss().backward()
    assert getattr(rnn, "activations", []) == []
    assert all(p.grad_sample is None and p._forward_counter == 0 for p in rnn.parameters())
    gsm.enable_hooks()
    gsm.zero_grad(set_to_none=True)
    loss().backward()
    gsm.disable_hooks()
    want = _single_sample_grads(
        rnn, lambda s: (lambda o, h: o.pow(2).mean() * len(s) / B + h.sum())(*rnn(x[s])),
        range(B))
    for n, p in rnn.named_parameters():
        torch.testing.assert_close(p.grad_sample, want[n] * B, **TOL[torch.float64], msg=n)


def test_opacus_subclass_hooks_see_the_inputs():
    """A GradSampleModule subclass overriding one of its hooks keeps Opacus' own hooks for
    both: its backward hook sees the activations Opacus' forward hook recorded (the layer's
    input), not the lean hook's empty entry; grad_sample stays right."""
    from opacus import GradSampleModule

    seen = []

    class Logging(GradSampleModule):
        def capture_backprops_hook(self, module, *args, **kwargs):
            if self.hooks_enabled and isinstance(module, rnn_ext.RNN):
                seen.append([tuple(a.shape) for a in module.activations[-1]])
            return super().capture_backprops_hook(module, *args, **kwargs)

    torch.manual_seed(6)
    rnn = rnn_ext.RNN(I, H, batch_first=True, dtype=torch.float64)
    gsm = Logging(rnn, loss_reduction="sum")
    x = torch.randn(B, T, I, dtype=torch.float64)
    out, hn = gsm(x)
    (out.pow(2).sum() + hn.sum()).backward()
    assert seen == [[(B, T, I)]]
    gsm.disable_hooks()
    want = _single_sample_grads(rnn, lambda s: (lambda o, h: o.pow(2).sum() + h.sum())(*rnn(x[s])),
                                range(B))
    for n, p in rnn.named_parameters():
        torch.testing.assert_close(p.grad_sample, want[n], **TOL[torch.float64], msg=n)


def test_opacus_tied_weights_counted_once(opacus_hooks):
    """A weight tied under two names (weight_hh_l1 = weight_hh_l0) is one parameter to Opacus:
    its forward counter counts each forward call once, and its grad_sample is the sum of both
    uses' per-sample gradients."""
    from opacus import GradSampleModule

    torch.manual_seed(7)
    rnn = rnn_ext.RNN(H, H, num_layers=2, batch_first=True, dtype=torch.float64)
    rnn.weight_hh_l1 = rnn.weight_hh_l0
    gsm = GradSampleModule(rnn, loss_reduction="sum")
    x = torch.randn(B, T, H, dtype=torch.float64)
    out, hn = gsm(x)
    assert rnn.weight_hh_l0._forward_counter == 1
    (out.pow(2).sum() + hn.sum()).backward()
    _check_opacus_state(gsm, opacus_hooks, 1)
    gsm.disable_hooks()
    want = _single_sample_grads(rnn, lambda s: (lambda o, h: o.pow(2).sum() + h.sum())(*rnn(x[s])),
                                range(B))
    for n, p in rnn.named_parameters():
        torch.testing.assert_close(p.grad_sample, want[n], **TOL[torch.float64], msg=n)


def test_per_sample_gradients_and_opacus_on_one_model():
    """rnn_ext.per_sample_gradients on a model in a GradSampleModule: refused while Opacus'
    hooks are enabled (both would form grad_sample); with them disabled it runs, and Opacus
    works again afterwards (its per-sample mode restored on exit)."""
    from opacus import GradSampleModule

    torch.manual_seed(8)
    rnn = rnn_ext.RNN(I, H, batch_first=True, dtype=torch.float64)
    gsm = GradSampleModule(rnn, loss_reduction="sum")
    x = torch.randn(B, T, I, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Opacus GradSampleModule with its hooks enabled"):
        with rnn_ext.per_sample_gradients(rnn):
            pass
    gsm.disable_hooks()
    with rnn_ext.per_sample_gradients(rnn):
        rnn(x)[1].sum().backward()
    ctx_grads = [p.grad_sample.clone() for p in rnn.parameters()]
    gsm.zero_grad(set_to_none=True)
    gsm.enable_hooks()
    gsm(x)[1].sum().backward()
    for p, g in zip(rnn.parameters(), ctx_grads):
        assert p.grad_sample is not None
        torch.testing.assert_close(p.grad_sample, g, **TOL[torch.float64])


@pytest.mark.parametrize("T_, H_", [(3, 8), (40, 2)], ids=["short_wide", "long_narrow"])
def test_opacus_mean_scale(T_, H_):
    """A mean loss's per-sample gradients are scaled by the batch size (Opacus' convention)
    by the kernel as it forms them: each sample's own gradient, while .grad and the input's
    gradient stay the mean loss's."""
    from opacus import GradSampleModule

    torch.manual_seed(8)
    rnn = rnn_ext.RNN(2, H_, num_layers=2, batch_first=True, dtype=torch.float64)
    model = _Clf(rnn, use_h=False)
    gsm = GradSampleModule(model)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, T_, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (B,), generator=g)
    F = torch.nn.functional
    F.cross_entropy(gsm(x), y).backward()
    gsm.disable_hooks()
    want = _single_sample_grads(model, lambda s: F.cross_entropy(model(x[s]), y[s]), range(B))
    total = torch.autograd.grad(F.cross_entropy(model(x), y), [x, *model.parameters()])
    torch.testing.assert_close(x.grad, total[0], **TOL[torch.float64])
    for (n, p), gt in zip(model.named_parameters(), total[1:]):
        torch.testing.assert_close(p.grad_sample, want[n], **TOL[torch.float64], msg=n)
        torch.testing.assert_close(p.grad, gt, **TOL[torch.float64], msg=n)


PRODUCTS_SCRIPT = """
import json, torch, rnn_ext
from torch.nn.utils.rnn import pack_padded_sequence
torch.set_num_threads(2)
worst = 0.0
for H, bi, packed in [(40, True, False), (40, False, True), (130, True, False)]:
    T, B, I = 5, 4, 7
    torch.manual_seed(H)
    m = rnn_ext.RNN(I, H, 2, bidirectional=bi)
    m64 = rnn_ext.RNN(I, H, 2, bidirectional=bi).double()
    m64.load_state_dict(m.state_dict())
    x, hx = torch.randn(T, B, I), torch.randn(4 if bi else 2, B, H)
    lengths = [5, 2, 4, 1]
    def run(mod, xs, h, lens):
        inp = pack_padded_sequence(xs, lens, enforce_sorted=False) if packed else xs
        o, hn = mod(inp, h)
        od = o.data if packed else o
        return (od * od.detach().cos()).sum() + (hn * hn).sum()
    with rnn_ext.per_sample_gradients(m):
        run(m, x, hx, lengths).backward()
    got = [p.grad_sample.double() for p in m.parameters()]
    for b in range(B):  # each sample alone, in float64
        gs = torch.autograd.grad(run(m64, x[:, b:b + 1].double(), hx[:, b:b + 1].double(),
                                     [lengths[b]]), list(m64.parameters()))
        for g, w in zip(got, gs):
            worst = max(worst, float((g[b] - w).abs().max() / max(1.0, float(w.abs().max()))))
print(json.dumps([torch.ops.rnn_ext._cpu_weight_product(40, 40),
                  torch.ops.rnn_ext._cpu_weight_product(130, 130), worst]))
"""


@pytest.mark.parametrize("mode", ["blas", "kernel"])
def test_per_sample_weight_products_both_ways(mode):
    """The per-sample weight gradients with their products forced through BLAS, and through
    the outer-product kernel (csrc/cpu/wgrad_kernel.h), at every size (RNN_EXT_CPU_WGRAD is
    read at load time: a subprocess): H = 40 (the kernel's by default; W_ih products
    transposed, I = 7 < 32) and H = 130 (BLAS's by default), dense (H_prev read in place, both
    directions) and packed, float32 against single-sample float64 gradients."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, RNN_EXT_CPU_WGRAD=mode)
    out = subprocess.run([sys.executable, "-c", PRODUCTS_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    p40, p130, worst = json.loads(out.stdout.strip().splitlines()[-1])
    has_kernel = torch.ops.rnn_ext._cpu_step_kernel_isa(16) != "none"
    assert [p40 != "blas", p130 != "blas"] == [mode == "kernel" and has_kernel] * 2
    assert worst < 2e-5, worst
