"""torch.compile(fullgraph=True) with aot_eager and inductor: forward and backward equal eager
rnn_ext and torch.nn.RNN (same weights); torch.export keeps rnn_ext.rnn_forward in the graph and
the exported program computes what torch.nn.RNN does."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import TOL, forward_backward, make_pair


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Model(torch.nn.Module):
    """An RNN inside a model, as users compile it."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 2)

    def forward(self, x, hx):
        y, h = self.rnn(x, hx)
        return self.head(y).tanh(), h


def _grads_of(model, x, hx):
    x = x.detach().clone().requires_grad_()
    hx = hx.detach().clone().requires_grad_()
    model.zero_grad()
    y, h = model(x, hx)
    (y.pow(2).sum() + h.sum()).backward()
    return y.detach(), h.detach(), [x.grad, hx.grad] + [p.grad.clone() for p in
                                                        model.parameters()]


def _torch_model(ref, model):
    """Model around the torch.nn.RNN `ref`, with `model`'s head."""
    m = Model(ref).to(next(model.parameters()).dtype)
    m.head.load_state_dict(model.head.state_dict())
    return m


def _compare(a, b, dtype):
    torch.testing.assert_close(b[0], a[0], **TOL[dtype])
    torch.testing.assert_close(b[1], a[1], **TOL[dtype])
    assert len(a[2]) == len(b[2])
    for g, h in zip(a[2], b[2]):
        torch.testing.assert_close(h, g, **TOL[dtype])


def test_compile_aot_eager_fullgraph_one_graph_with_the_op():
    """fullgraph=True (so no graph break), one graph holding rnn_ext.rnn_forward, forward and
    backward equal eager; a second shape (seq len and batch) still works."""
    ref, ext = make_pair(3, 5, num_layers=2, bidirectional=True, batch_first=True,
                         nonlinearity="relu", dtype=torch.float64)
    model = Model(ext).double()
    tmodel = _torch_model(ref, model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    hx = torch.randn(4, 2, 5, dtype=torch.float64)
    _compare(_grads_of(model, x, hx), _grads_of(compiled, x, hx), torch.float64)
    _compare(_grads_of(tmodel, x, hx), _grads_of(compiled, x, hx), torch.float64)
    assert counter.frame_count == 1
    targets = [str(n.target) for g in counter.graphs for n in g.graph.nodes]
    assert any("rnn_ext.rnn_forward" in t for t in targets), targets
    assert not any("rnn_tanh" in t or "rnn_relu" in t for t in targets)
    x2 = torch.randn(3, 6, 3, dtype=torch.float64)
    hx2 = torch.randn(4, 3, 5, dtype=torch.float64)
    _compare(_grads_of(model, x2, hx2), _grads_of(compiled, x2, hx2), torch.float64)
    _compare(_grads_of(tmodel, x2, hx2), _grads_of(compiled, x2, hx2), torch.float64)


def test_compile_inductor_fullgraph_matches_eager():
    ref, ext = make_pair(4, 6, num_layers=2, bidirectional=False)
    model = Model(ext)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = torch.randn(5, 3, 4)
    hx = torch.randn(2, 3, 6)
    _compare(_grads_of(model, x, hx), _grads_of(compiled, x, hx), torch.float32)
    _compare(_grads_of(_torch_model(ref, model), x, hx), _grads_of(compiled, x, hx),
             torch.float32)


def test_compile_without_hx_and_eval_no_grad():
    """hx=None and eval/no_grad go through too (the zeros hx and need_grad=False paths)."""
    ref, ext = make_pair(3, 4, num_layers=4, bidirectional=True)
    ext.eval()
    compiled = torch.compile(ext, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        o, h = compiled(x)
        eo, eh = ext(x)
        ro, rh = ref(x)
    torch.testing.assert_close(o, eo, **TOL[torch.float32])
    torch.testing.assert_close(h, eh, **TOL[torch.float32])
    torch.testing.assert_close(o, ro, **TOL[torch.float32])
    torch.testing.assert_close(h, rh, **TOL[torch.float32])


def test_compile_packed_input_matches_eager():
    """Packed input (not fullgraph: like torch.nn.RNN with allow_rnn, `batch_sizes[0]` is
    data-dependent, so a full graph cannot be built for it)."""
    ref, ext = make_pair(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    compiled = torch.compile(ext, backend="aot_eager")
    p = pack_padded_sequence(torch.randn(4, 3, 3, dtype=torch.float64), torch.tensor([2, 4, 3]),
                             enforce_sorted=False)
    p.data.requires_grad_()

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def named_parameters(self, *a, **k):
            return ext.named_parameters(*a, **k)

        def parameters(self, *a, **k):
            return ext.parameters(*a, **k)

        def forward(self, x, hx=None):
            return self.m(x, hx)

    a = forward_backward(ref, p)
    b = forward_backward(Wrap(compiled), p)
    torch.testing.assert_close(b[0].data, a[0].data, **TOL[torch.float64])
    torch.testing.assert_close(b[1], a[1], **TOL[torch.float64])
    for k in a[2]:
        torch.testing.assert_close(b[2][k], a[2][k], **TOL[torch.float64])


def test_export_keeps_the_op_and_runs():
    ref, ext = make_pair(3, 5, num_layers=2, bidirectional=True)
    ext.eval()
    x = torch.randn(4, 2, 3)
    hx = torch.randn(4, 2, 5)
    ep = torch.export.export(ext, (x, hx))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.rnn_ext.rnn_forward.default in targets
    assert not any("rnn_tanh" in str(t) or "rnn_relu" in str(t) for t in targets)
    o, h = ep.module()(x, hx)
    eo, eh = ext(x, hx)
    ro, rh = ref(x, hx)
    torch.testing.assert_close(o, eo, **TOL[torch.float32])
    torch.testing.assert_close(h, eh, **TOL[torch.float32])
    torch.testing.assert_close(o, ro, **TOL[torch.float32])
    torch.testing.assert_close(h, rh, **TOL[torch.float32])
    # the exported program reads its own copies of the parameters: new inputs still agree
    x2 = torch.randn(4, 2, 3)
    torch.testing.assert_close(ep.module()(x2, hx)[0], ref(x2, hx)[0], **TOL[torch.float32])


def test_compile_and_func_grad_some_weights_frozen():
    """Gradients of some weights only (the others frozen, or not asked for): through
    torch.compile (the op's registered autograd) every weight that requires grad gets its
    gradient and the frozen ones none; through torch.func.grad of functional_call w.r.t. one
    weight, that weight's gradient.  Both as torch.nn.RNN gives them."""
    dtype = torch.float64
    ref, ext = make_pair(3, 4, num_layers=2, bidirectional=True, dtype=dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 3, generator=g, dtype=dtype)
    frozen = {"weight_hh_l0", "bias_ih_l1", "weight_ih_l1_reverse"}
    grads = []
    for m, run in ((ext, torch.compile(ext, backend="aot_eager", fullgraph=True)), (ref, ref)):
        for n, p in m.named_parameters():
            p.requires_grad_(n not in frozen)
            p.grad = None
        y, h = run(x)
        (y.pow(2).sum() + h.sum()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[1]:
        if n in frozen:
            assert grads[0][n] is None and grads[1][n] is None, n
        else:
            torch.testing.assert_close(grads[0][n], grads[1][n], **TOL[dtype], msg=n)
    for m in (ext, ref):
        m.requires_grad_(True)
    params = {n: p.detach() for n, p in ext.named_parameters()}

    def loss(m, w):
        y, h = torch.func.functional_call(m, {**params, "weight_ih_l0": w}, (x,))
        return y.pow(2).sum() + h.sum()

    got = torch.func.grad(lambda w: loss(ext, w))(params["weight_ih_l0"])
    want = torch.func.grad(lambda w: loss(ref, w))(params["weight_ih_l0"])
    torch.testing.assert_close(got, want, **TOL[dtype])
