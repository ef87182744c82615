"""Autograd: gradcheck and gradgradcheck (float64) with respect to input, hx and every parameter
(through torch.func.functional_call), dense and packed, with dropout too; torch.library.opcheck on
both operators; retain_graph repeatability."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from conftest import TOL, make_pair


def _functional(module, packed_meta=None, seed=None):
    """A function of (input, hx, *params) returning (output, h_n), for gradcheck."""
    names = [n for n, _ in module.named_parameters()]

    def fn(x, hx, *params):
        if seed is not None:
            torch.manual_seed(seed)  # the same dropout mask on every evaluation
        inp = x if packed_meta is None else PackedSequence(x, *packed_meta)
        out, h = torch.func.functional_call(module, dict(zip(names, params)), (inp, hx))
        return (out.data if packed_meta is not None else out), h

    return fn


def _inputs(module, T=3, B=2, batch_first=False):
    D = 2 if module.bidirectional else 1
    shape = (B, T, module.input_size) if batch_first else (T, B, module.input_size)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(module.num_layers * D, B, module.hidden_size, dtype=torch.float64,
                     requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    return x, hx, params


GRAD_CASES = [
    dict(bidirectional=False, nonlinearity="tanh", num_layers=2, bias=True),
    dict(bidirectional=True, nonlinearity="tanh", num_layers=2, bias=True),
    dict(bidirectional=False, nonlinearity="relu", num_layers=2, bias=False),
    dict(bidirectional=True, nonlinearity="relu", num_layers=1, bias=True),
    dict(bidirectional=True, nonlinearity="tanh", num_layers=3, bias=False, batch_first=True),
]


def _id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("cfg", GRAD_CASES, ids=_id)
def test_gradcheck_dense(cfg):
    _, ext = make_pair(2, 3, dtype=torch.float64, **cfg)
    x, hx, params = _inputs(ext, batch_first=cfg.get("batch_first", False))
    assert gradcheck(_functional(ext), (x, hx, *params))


@pytest.mark.parametrize("cfg", GRAD_CASES[:4], ids=_id)
def test_gradgradcheck_dense(cfg):
    _, ext = make_pair(2, 2, dtype=torch.float64, **cfg)
    x, hx, params = _inputs(ext, T=2, B=2)
    assert gradgradcheck(_functional(ext), (x, hx, *params))


def _packed_case(bidir, relu):
    _, ext = make_pair(2, 2, num_layers=2, bidirectional=bidir,
                       nonlinearity="relu" if relu else "tanh", dtype=torch.float64)
    p = pack_padded_sequence(torch.randn(3, 3, 2, dtype=torch.float64), torch.tensor([2, 3, 1]),
                             enforce_sorted=False)
    data = p.data.detach().clone().requires_grad_()
    meta = (p.batch_sizes, p.sorted_indices, p.unsorted_indices)
    D = 2 if bidir else 1
    hx = torch.randn(2 * D, 3, 2, dtype=torch.float64, requires_grad=True)
    params = [q.detach().clone().requires_grad_() for q in ext.parameters()]
    return _functional(ext, meta), (data, hx, *params)


@pytest.mark.parametrize("bidir,relu", [(False, False), (True, True), (True, False)])
def test_gradcheck_packed(bidir, relu):
    fn, args = _packed_case(bidir, relu)
    assert gradcheck(fn, args)


@pytest.mark.parametrize("bidir,relu", [(True, False), (False, True)])
def test_gradgradcheck_packed(bidir, relu):
    fn, args = _packed_case(bidir, relu)
    # fast_mode: checks random projections of the second derivative (keeps the suite fast)
    assert gradgradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("bidir", [False, True])
def test_gradcheck_unbatched(bidir):
    _, ext = make_pair(2, 3, num_layers=2, bidirectional=bidir, dtype=torch.float64)
    D = 2 if bidir else 1
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(2 * D, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in ext.parameters()]
    assert gradcheck(_functional(ext), (x, hx, *params))


@pytest.mark.parametrize("bidir", [False, True])
def test_gradcheck_and_gradgradcheck_with_dropout(bidir):
    """Training with dropout: with a fixed seed per evaluation the function is deterministic and
    its gradient (using the saved noise) is correct, to first and second order."""
    _, ext = make_pair(2, 2, num_layers=2, bidirectional=bidir, dropout=0.4, dtype=torch.float64)
    ext.train()
    x, hx, params = _inputs(ext, T=2, B=2)
    fn = _functional(ext, seed=3)
    o1 = fn(x, hx, *params)[0]
    o2 = fn(x, hx, *params)[0]
    assert torch.equal(o1, o2)
    assert gradcheck(fn, (x, hx, *params))
    assert gradgradcheck(fn, (x, hx, *params), fast_mode=True)


def test_double_backward_matches_torch():
    """A gradient of a gradient (gradient penalty) equals torch.nn.RNN's."""
    ref, ext = make_pair(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    x0 = torch.randn(4, 2, 3, dtype=torch.float64)
    res = []
    for m in (ref, ext):
        x = x0.clone().requires_grad_()
        o, h = m(x)
        (gx,) = torch.autograd.grad(o.pow(2).sum() + h.sum(), x, create_graph=True)
        penalty = gx.pow(2).sum()
        penalty.backward()
        res.append([x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_retain_graph_repeated_backward(dtype):
    """test_rnn_retain_variables: 5 backwards with retain_graph give identical grads."""
    rnn = rnn_ext.RNN(10, 20, num_layers=2, dtype=dtype)
    x = torch.randn(5, 6, 10, dtype=dtype, requires_grad=True)
    output = rnn(x)
    output[0].sum().backward(retain_graph=True)
    grads = [x.grad.clone()] + [p.grad.clone() for p in rnn.parameters()]
    for _ in range(4):
        rnn.zero_grad()
        x.grad.zero_()
        output[0].sum().backward(retain_graph=True)
        grads2 = [x.grad] + [p.grad for p in rnn.parameters()]
        for a, b in zip(grads, grads2):
            assert torch.equal(a, b)


def test_backward_twice_without_retain_graph_raises():
    rnn = rnn_ext.RNN(3, 4)
    o, _ = rnn(torch.randn(2, 2, 3, requires_grad=True))
    o.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        o.sum().backward()


# --- torch.library.opcheck -------------------------------------------------------------------


def _op_args(bidir, packed, need_grad, requires_grad, layers=2, bias=True):
    _, ext = make_pair(3, 4, num_layers=layers, bidirectional=bidir, bias=bias,
                       dtype=torch.float64)
    D = 2 if bidir else 1
    weights = [w.detach().clone().requires_grad_(requires_grad) for w in ext._flat_weights]
    if packed:
        p = pack_padded_sequence(torch.randn(4, 3, 3, dtype=torch.float64),
                                 torch.tensor([4, 2, 1]))
        x, batch_sizes = p.data.clone(), p.batch_sizes
    else:
        x, batch_sizes = torch.randn(4, 3, 3, dtype=torch.float64), None
    x.requires_grad_(requires_grad)
    hx = torch.randn(layers * D, 3, 4, dtype=torch.float64, requires_grad=requires_grad)
    return (x, hx, weights, batch_sizes, bias, layers, bidir, False, 0.0, False, need_grad)


@pytest.mark.parametrize("bidir,packed,requires_grad", [
    (False, False, False), (True, False, True), (False, True, True), (True, True, False)])
def test_opcheck_rnn_forward(bidir, packed, requires_grad):
    args = _op_args(bidir, packed, need_grad=requires_grad, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.rnn_ext.rnn_forward.default, args)


def test_opcheck_rnn_forward_relu_no_bias_one_layer():
    args = list(_op_args(False, False, need_grad=True, requires_grad=True, layers=1, bias=False))
    args[7] = True  # relu
    torch.library.opcheck(torch.ops.rnn_ext.rnn_forward.default, tuple(args))


@pytest.mark.parametrize("bidir,packed,mask", [
    (False, False, (True, True, True)), (True, True, (True, True, True)),
    (True, False, (True, False, False)), (False, True, (False, True, True))])
def test_opcheck_rnn_backward(bidir, packed, mask):
    fargs = _op_args(bidir, packed, need_grad=True, requires_grad=False)
    with torch.no_grad():
        out, hy, ws, noise = torch.ops.rnn_ext.rnn_forward.default(*fargs)
    x, hx, weights, batch_sizes, bias, layers, bidir_, relu = fargs[:8]
    go = torch.randn_like(out)
    gh = torch.randn_like(hy)
    args = (x, hx, weights, batch_sizes, out, ws, noise, go, gh, bias, layers, bidir_, relu,
            list(mask))
    torch.library.opcheck(torch.ops.rnn_ext.rnn_backward.default, args)
    # and the backward op's result is the true gradient
    gi, ghx, gw = torch.ops.rnn_ext.rnn_backward.default(*args)
    xs = [t.detach().clone().requires_grad_() for t in (x, hx, *weights)]
    if batch_sizes is None:
        o, h = rnn_ext.reference.rnn(xs[0], xs[1], xs[2:], num_layers=layers, bidirectional=bidir_)
    else:
        o, h = rnn_ext.reference.rnn_packed_data(xs[0], batch_sizes, xs[1], xs[2:],
                                                 num_layers=layers, bidirectional=bidir_)
    expect = torch.autograd.grad([o, h], xs, [go, gh])
    if mask[0]:
        torch.testing.assert_close(gi, expect[0], **TOL[torch.float64])
    if mask[1]:
        torch.testing.assert_close(ghx, expect[1], **TOL[torch.float64])
    if mask[2]:
        assert len(gw) == len(weights)
        for a, b in zip(gw, expect[2:]):
            torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_opcheck_rnn_backward_only_grad_hy():
    fargs = _op_args(True, False, need_grad=True, requires_grad=False)
    with torch.no_grad():
        out, hy, ws, noise = torch.ops.rnn_ext.rnn_forward.default(*fargs)
    x, hx, weights, batch_sizes, bias, layers, bidir, relu = fargs[:8]
    args = (x, hx, weights, batch_sizes, out, ws, noise, None, torch.randn_like(hy), bias, layers,
            bidir, relu, [True, True, True])
    torch.library.opcheck(torch.ops.rnn_ext.rnn_backward.default, args)


def test_no_workspace_saved_under_no_grad():
    """need_grad=False: nothing is kept for backward (workspace and noise are empty)."""
    args = _op_args(True, False, need_grad=False, requires_grad=False)
    args = args[:8] + (0.5, True, False)  # dropout in training, still nothing saved
    out, hy, ws, noise = torch.ops.rnn_ext.rnn_forward.default(*args)
    assert ws.numel() == 0 and noise.numel() == 0
    _, ext = make_pair(3, 4, num_layers=2)
    with torch.no_grad():
        o, _ = ext(torch.randn(4, 2, 3, requires_grad=True))
    assert o.grad_fn is None


@pytest.mark.parametrize("packed", [False, True])
def test_profiler_shows_the_extension_ops_and_no_aten_rnn(packed):
    """Forward and backward each run as an op of the extension; nothing falls back to aten's
    RNN."""
    _, ext = make_pair(3, 4, num_layers=2, bidirectional=True)
    if packed:
        x = pack_padded_sequence(torch.randn(4, 3, 3), torch.tensor([4, 2, 1]))
        x.data.requires_grad_()
    else:
        x = torch.randn(4, 3, 3, requires_grad=True)
    with torch.profiler.profile() as prof:
        out, h = ext(x)
        ((out.data if packed else out).sum() + h.sum()).backward()
    names = {e.name for e in prof.events()}
    assert "rnn_ext::rnn_forward" in names
    assert "rnn_ext::rnn_backward" in names
    assert not any(n.startswith("aten::rnn_") or "_cudnn_rnn" in n for n in names), names


def test_eager_training_runs_on_the_cpp_autograd_node():
    """Eager calls with a gradient get one C++ node (csrc/autograd.cpp) for output and h_n, whose
    edges lead to the input and every parameter (not the op's Python autograd, which costs more
    than the kernel at small sizes)."""
    m = rnn_ext.RNN(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, requires_grad=True)
    out, hn = m(x)
    assert out.grad_fn is hn.grad_fn
    assert out.grad_fn.name() == "torch::autograd::CppNode<rnn_ext::RNNFunction>"
    leaves = {id(fn.variable) for fn, _ in out.grad_fn.next_functions if fn is not None}
    assert leaves == {id(x)} | {id(p) for p in m.parameters()}


def test_eager_entry_rejects_wrong_argument_types():
    """rnn_ext._C.rnn (the eager entry behind rnn_ext.ops.rnn) raises TypeError, never crashes,
    on arguments of the wrong type."""
    from rnn_ext import _C

    m = rnn_ext.RNN(3, 4, num_layers=2)
    x, h = torch.randn(5, 2, 3), torch.zeros(2, 2, 4)
    w = list(m._flat_weights)
    good = (x, h, w, None, True, 2, False, False, 0.0, False)
    assert _C.rnn(*good)[0].shape == (5, 2, 4)
    for i, bad in ((0, "x"), (1, None), (2, 5), (2, [w[0], "w"]), (3, [1, 2]), (4, 1), (6, None),
                   (9, 0)):
        args = list(good)
        args[i] = bad
        with pytest.raises(TypeError):
            _C.rnn(*args)
    with pytest.raises(TypeError):
        _C.rnn(*good[:9])
    with pytest.raises(TypeError):
        _C.rnn(x, h, w, None, True, "2", False, False, 0.0, False)


@pytest.mark.parametrize("layout", ["contiguous", "batch_first_view", "expanded_t",
                                    "column_slice", "last_step_only"])
def test_backward_reads_grad_output_in_any_layout(layout):
    """The CPU backward reads the output's gradient where it lies when its rows have unit
    column stride (the gradient of a batch_first output is a transposed view; an expanded
    one repeats rows with stride 0; a slice of a wider tensor has a longer row stride): the
    gradients equal those of the same gradient made contiguous, for torch.nn.RNN too."""
    T_, B_, I_, H_ = 7, 5, 3, 6
    ref, ext = make_pair(I_, H_, num_layers=2, bidirectional=True, dtype=torch.float64,
                         seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T_, B_, I_, generator=g, dtype=torch.float64)
    full = torch.randn(B_, T_, 2 * H_ + 3, generator=g, dtype=torch.float64)
    gy = {
        "contiguous": full[:, :, :2 * H_].transpose(0, 1).contiguous(),
        "batch_first_view": full[:, :, :2 * H_].contiguous().transpose(0, 1),
        "expanded_t": full[:, 0, :2 * H_].expand(T_, B_, 2 * H_),
        "column_slice": full[:, :, 3:].transpose(0, 1),
        "last_step_only": None,
    }[layout]
    if gy is None:  # the gradient of out[-1] alone: zeros with one step set (SelectBackward)
        gy = torch.zeros(B_, T_, 2 * H_, dtype=torch.float64).transpose(0, 1)
        gy[-1] = full[:, -1, :2 * H_]
    assert gy.stride(2) == 1 and (layout == "contiguous") == gy.is_contiguous()

    def grads(m, cot):
        xx = x.clone().requires_grad_()
        out, _ = m(xx)
        return torch.autograd.grad(out, [xx, *m.parameters()], cot)

    for got, from_copy, want in zip(grads(ext, gy), grads(ext, gy.contiguous()),
                                      grads(ref, gy)):
        torch.testing.assert_close(got, from_copy, rtol=0, atol=0)  # bitwise
        torch.testing.assert_close(got, want, **TOL[torch.float64])
