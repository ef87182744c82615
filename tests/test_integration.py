"""rnn_ext.RNN in the places PyTorch users put an RNN (issue 6): torch.compile and
torch.export, autocast, DistributedDataParallel, and serialisation / module plumbing.

Every check compares against torch.nn.RNN (same weights) or against eager rnn_ext.
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import sys
import textwrap

import pytest
import torch
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import rnn_ext
from conftest import DIST_MODEL, no_tf32, assert_as_accurate_as_torch, run_two_gloo_ranks, \
    train_dist_model_single_process

TOL32 = dict(atol=1e-5, rtol=1e-5)
TOL64 = dict(atol=1e-10, rtol=1e-10)


def _pair(*args, dtype=torch.float32, seed=0, **kwargs):
    """(torch.nn.RNN, rnn_ext.RNN) with the same configuration and identical weights."""
    torch.manual_seed(seed)
    ref = torch.nn.RNN(*args, dtype=dtype, **kwargs)
    ext = rnn_ext.RNN(*args, dtype=dtype, **kwargs)
    ext.load_state_dict(ref.state_dict())
    return ref, ext


def _fwd_bwd(module, x, hx=None, *, seed=1, autocast_dtype=None):
    """output, h_n and every gradient (input, hx, parameters by name) for fixed random
    cotangents on output and h_n."""
    x = x.detach().clone().requires_grad_()
    hx = None if hx is None else hx.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    if autocast_dtype is None:
        out, hn = module(x, hx)
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            out, hn = module(x, hx)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    gh = torch.randn(hn.shape, generator=g, dtype=torch.float64).to(hn.dtype)
    torch.autograd.backward([out, hn], [go, gh])
    grads = {"input": x.grad, "hx": None if hx is None else hx.grad}
    # (a compiled module names its parameters "_orig_mod.<name>")
    grads.update({n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters()})
    return out, hn, grads


def _assert_close_results(a, b, **tol):
    (oa, ha, ga), (ob, hb, gb) = a, b
    assert oa.dtype == ob.dtype and ha.dtype == hb.dtype
    torch.testing.assert_close(oa, ob, **tol)
    torch.testing.assert_close(ha, hb, **tol)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert (ga[k] is None) == (gb[k] is None), k
        if ga[k] is not None:
            assert ga[k].dtype == gb[k].dtype, k
            torch.testing.assert_close(ga[k], gb[k], **tol, msg=lambda m: f"grad {k}: {m}")


def _inputs(batch, seq, input_size, *, batch_first, hx_shape=None, seed=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seq, input_size) if batch_first else (seq, batch, input_size)
    x = torch.randn(shape, generator=g, dtype=dtype)
    hx = None if hx_shape is None else torch.randn(hx_shape, generator=g, dtype=dtype)
    return x, hx


# --------------------------------------------------------------------------------------------
# torch.compile / torch.export
# --------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_compile():
    """A clean Dynamo state and no on-disk compile caches: an FX-graph / AOT-autograd cache
    entry built with an older fake kernel would otherwise hide (or fake) a failure."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


# rnn_ext.RNN configurations compiled; SHAPES: (batch, seq) of the successive calls
COMPILE_CASES = {
    "bf-bi-L2-hx": dict(kw=dict(num_layers=2, bidirectional=True, batch_first=True), hx=True),
    "sf-uni-L3-relu-nobias": dict(
        kw=dict(num_layers=3, nonlinearity="relu", bias=False), hx=False),
}
SHAPES = [(2, 5), (3, 7), (4, 2), (5, 9)]


def _case_inputs(kw, with_hx, batch, seq, seed):
    D = 2 if kw.get("bidirectional") else 1
    hx_shape = (kw.get("num_layers", 1) * D, batch, 4) if with_hx else None
    return _inputs(batch, seq, 3, batch_first=kw.get("batch_first", False),
                   hx_shape=hx_shape, seed=seed)


# inductor on the richest case only (compile time)
@pytest.mark.parametrize("case,backend", [("bf-bi-L2-hx", "aot_eager"), ("bf-bi-L2-hx", "inductor"),
                                          ("sf-uni-L3-relu-nobias", "aot_eager")])
def test_compile_fullgraph_dynamic_matches_eager(case, backend, fresh_compile):
    """fullgraph=True, dynamic=True: forward and backward (output, h_n, input/hx/param grads)
    equal eager rnn_ext and torch.nn.RNN, for batch and sequence length changing on every call,
    compiled once (one graph; no recompilation after the first call).

    Sizes 0 and 1 are avoided: Dynamo always specialises them (a batch of 1 recompiles once,
    for any module)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    c = COMPILE_CASES[case]
    ref, ext = _pair(3, 4, **c["kw"])
    cnt = CompileCounterWithBackend(backend)
    compiled = torch.compile(ext, backend=cnt, fullgraph=True, dynamic=True)
    for i, (batch, seq) in enumerate(SHAPES):
        x, hx = _case_inputs(c["kw"], c["hx"], batch, seq, seed=10 + i)
        got = _fwd_bwd(compiled, x, hx, seed=i)
        eager = _fwd_bwd(ext, x, hx, seed=i)
        torch_ref = _fwd_bwd(ref, x, hx, seed=i)
        _assert_close_results(got, eager, **TOL32)
        _assert_close_results(got, torch_ref, **TOL32)
        if i == 0:
            # (the first compile may call the backend twice: Dynamo traces the float
            # self.dropout symbolically, then restarts the analysis with it specialised, as
            # it does for torch.nn.RNN with allow_rnn=True)
            first = cnt.frame_count
            assert first >= 1
    assert cnt.frame_count == first, f"recompiled: {cnt.frame_count} backend calls"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert cnt.op_count > 0


def test_compile_automatic_dynamic_recompiles_once(fresh_compile):
    """Without dynamic=True, Dynamo's automatic dynamic shapes recompile once (static, then
    dynamic) and never again as batch and sequence length keep changing (sizes >= 2: Dynamo
    specialises 0 and 1)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    ref, ext = _pair(3, 4, num_layers=2, batch_first=True)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ext, backend=cnt, fullgraph=True)
    counts = []
    for i, (batch, seq) in enumerate(SHAPES + [(7, 3), (2, 11)]):
        x, _ = _inputs(batch, seq, 3, batch_first=True, seed=20 + i)
        _assert_close_results(_fwd_bwd(compiled, x, seed=i), _fwd_bwd(ref, x, seed=i), **TOL32)
        counts.append(cnt.frame_count)
    assert counts == [1] + [2] * (len(counts) - 1), counts
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_compile_mark_dynamic(fresh_compile):
    """torch._dynamo.mark_dynamic on batch and time: a single compile for all shapes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    ref, ext = _pair(3, 4, bidirectional=True)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ext, backend=cnt, fullgraph=True)
    for i, (batch, seq) in enumerate(SHAPES):
        x, _ = _inputs(batch, seq, 3, batch_first=False, seed=30 + i)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(x, 1)
        out, hn = compiled(x)
        out_r, hn_r = ref(x)
        torch.testing.assert_close(out, out_r, **TOL32)
        torch.testing.assert_close(hn, hn_r, **TOL32)
    assert cnt.frame_count == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_explain_single_graph_no_break(fresh_compile):
    """torch._dynamo.explain: one graph, no graph break, and the graph calls rnn_ext's op;
    torch.nn.RNN in the same situation cannot be captured at all (spec §3.6)."""
    _, ext = _pair(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x, hx = _inputs(2, 5, 3, batch_first=True, hx_shape=(4, 2, 4))
    info = torch._dynamo.explain(ext)(x, hx)
    assert info.graph_count == 1
    assert info.graph_break_count == 0
    targets = [n.target for g in info.graphs for n in g.graph.nodes]
    assert any("rnn_ext" in str(t) and "rnn_forward" in str(t) for t in targets), targets

    torch._dynamo.reset()
    ref = torch.nn.RNN(3, 4)
    with pytest.raises(Exception, match="Attempted to wrap RNN"):
        torch.compile(ref, backend="eager", fullgraph=True)(torch.randn(5, 2, 3))


def test_compile_unbatched_and_training_model(fresh_compile):
    """A small model (embedding -> rnn_ext.RNN -> linear) trained for a few SGD steps under
    torch.compile(fullgraph=True) ends with the same parameters as the same model built on
    torch.nn.RNN trained eagerly; unbatched (2-D) input also compiles."""

    class Model(torch.nn.Module):
        def __init__(self, rnn_cls):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(11, 3)
            self.rnn = rnn_cls(3, 5, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(5, 11)

        def forward(self, tokens):
            out, _ = self.rnn(self.emb(tokens))
            return self.head(out)

    def train(model, step_fn, steps=3):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(steps):
            tokens = torch.randint(0, 11, (4, 7), generator=g)
            logits = step_fn(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11),
                                                     tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ext_model, ref_model = Model(rnn_ext.RNN), Model(torch.nn.RNN)
    ext_losses = train(ext_model, torch.compile(ext_model, backend="aot_eager", fullgraph=True))
    ref_losses = train(ref_model, ref_model)
    assert ext_losses == pytest.approx(ref_losses, rel=1e-5)
    for (n, p), (_, q) in zip(ext_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, **TOL32, msg=lambda m: f"{n}: {m}")

    # unbatched input (L, H_in) -> (L, H)
    ref, ext = _pair(3, 4)
    x = torch.randn(6, 3)
    out, hn = torch.compile(ext, backend="aot_eager", fullgraph=True)(x)
    out_r, hn_r = ref(x)
    assert out.shape == (6, 4) and hn.shape == (1, 4)
    torch.testing.assert_close(out, out_r, **TOL32)
    torch.testing.assert_close(hn, hn_r, **TOL32)


def _op_targets(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


@pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights")
def test_export_keeps_op_and_runs():
    """torch.export.export keeps rnn_ext.rnn_forward as one node (nothing decomposed into
    aten RNN ops), and the exported program's .module() matches eager torch.nn.RNN."""
    ref, ext = _pair(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x, hx = _inputs(2, 5, 3, batch_first=True, hx_shape=(4, 2, 4))
    ep = torch.export.export(ext, (x, hx))
    targets = _op_targets(ep)
    assert targets.count("rnn_ext.rnn_forward.default") == 1, targets
    assert not any("rnn_tanh" in t or "rnn_relu" in t for t in targets), targets
    out, hn = ep.module()(x, hx)
    out_r, hn_r = ref(x, hx)
    torch.testing.assert_close(out, out_r, **TOL32)
    torch.testing.assert_close(hn, hn_r, **TOL32)

    # round trip through torch.export.save / load
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    ep2 = torch.export.load(buf)
    assert "rnn_ext.rnn_forward.default" in _op_targets(ep2)
    out2, hn2 = ep2.module()(x, hx)
    torch.testing.assert_close(out2, out_r, **TOL32)
    torch.testing.assert_close(hn2, hn_r, **TOL32)


@pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights")
def test_export_dynamic_batch_and_seq():
    """torch.export with Dim for batch and sequence length: one program runs other shapes."""
    from torch.export import Dim

    ref, ext = _pair(3, 4, num_layers=2, batch_first=True)
    x, hx = _inputs(2, 5, 3, batch_first=True, hx_shape=(2, 2, 4))
    batch, seq = Dim("batch"), Dim("seq")
    ep = torch.export.export(ext, (x, hx), dynamic_shapes=({0: batch, 1: seq}, {1: batch}))
    assert "rnn_ext.rnn_forward.default" in _op_targets(ep)
    mod = ep.module()
    for i, (b, t) in enumerate([(3, 8), (1, 2), (6, 4)]):
        x, hx = _inputs(b, t, 3, batch_first=True, hx_shape=(2, b, 4), seed=40 + i)
        out, hn = mod(x, hx)
        out_r, hn_r = ref(x, hx)
        assert out.shape == (b, t, 4)
        torch.testing.assert_close(out, out_r, **TOL32)
        torch.testing.assert_close(hn, hn_r, **TOL32)


# --------------------------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------------------------

def _supports_cpu_autocast(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.RNN(2, 2)(torch.randn(2, 1, 2))
        return True
    except Exception:
        return False


def _assert_autocast_like_torch(ref, ext, x, hx, dtype, device_type="cpu", runs_in=None):
    """runs_in: the dtype torch.nn.RNN computes in under autocast(dtype) (default: dtype;
    cuDNN's autocast wrapper takes float16 for any autocast dtype)."""
    autocast_dtype, dtype = dtype, runs_in or dtype

    def run(m):
        xx = x.detach().clone().requires_grad_()
        hh = hx.detach().clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype):
            out, hn = m(xx, hh)
        g = torch.Generator().manual_seed(5)
        go = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
        gh = torch.randn(hn.shape, generator=g).to(device=hn.device, dtype=hn.dtype)
        torch.autograd.backward([out, hn], [go, gh])
        return out, hn, xx.grad, hh.grad, {n: p.grad for n, p in m.named_parameters()}

    a, b = run(ref), run(ext)
    # dtypes exactly as torch.nn.RNN: outputs in the autocast dtype, gradients in the dtype of
    # the leaf they belong to (float32 params / input / hx)
    for ta, tb in zip(a[:4], b[:4]):
        assert ta.dtype == tb.dtype, (ta.dtype, tb.dtype)
    assert b[0].dtype == dtype and b[1].dtype == dtype
    assert b[2].dtype == x.dtype and b[3].dtype == hx.dtype
    for n, p in ext.named_parameters():
        assert b[4][n] is not None and b[4][n].dtype == p.dtype == a[4][n].dtype, n
    # values: against the float64 truth at the point autocast computes (inputs, hx, weights and
    # cotangents rounded to the autocast dtype), rnn_ext within 2x torch's own error (+1 unit
    # of the dtype for output and h_n, +8 for gradients: both backwards read activations
    # saved in the dtype)
    m64 = copy.deepcopy(ref).cpu().double()
    with torch.no_grad():
        for p in m64.parameters():
            p.copy_(p.to(dtype).double())
    xx = x.detach().cpu().to(dtype).double().requires_grad_()
    hh = hx.detach().cpu().to(dtype).double().requires_grad_()
    out, hn = m64(xx, hh)
    g = torch.Generator().manual_seed(5)
    go = torch.randn(out.shape, generator=g).to(dtype).double()
    gh = torch.randn(hn.shape, generator=g).to(dtype).double()
    torch.autograd.backward([out, hn], [go, gh])
    truth = (out, hn, xx.grad, hh.grad, {n: p.grad for n, p in m64.named_parameters()})
    cpu = lambda t: t.cpu()  # noqa: E731
    assert_as_accurate_as_torch([cpu(b[0]), cpu(b[1])], [cpu(a[0]), cpu(a[1])], truth[:2],
                                dtype=dtype, names=["output", "h_n"])
    names = ["grad input", "grad hx"] + [f"grad {n}" for n in truth[4]]
    assert_as_accurate_as_torch([cpu(b[2]), cpu(b[3])] + [cpu(b[4][n]) for n in truth[4]],
                                [cpu(a[2]), cpu(a[3])] + [cpu(a[4][n]) for n in truth[4]],
                                [truth[2], truth[3]] + [truth[4][n] for n in truth[4]],
                                dtype=dtype, floor_eps=8, names=names)


AUTOCAST_CPU_DTYPES = [torch.bfloat16] + (
    [torch.float16] if _supports_cpu_autocast(torch.float16) else [])


@pytest.mark.parametrize("dtype", AUTOCAST_CPU_DTYPES, ids=str)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_autocast_cpu_like_torch(dtype, bidirectional):
    """f32 module and input under autocast('cpu'): output and h_n in the autocast dtype, grads
    of x, hx and parameters in float32, values close to torch.nn.RNN under autocast."""
    ref, ext = _pair(3, 6, num_layers=2, bidirectional=bidirectional, batch_first=True)
    D = 2 if bidirectional else 1
    x, hx = _inputs(3, 7, 3, batch_first=True, hx_shape=(2 * D, 3, 6))
    _assert_autocast_like_torch(ref, ext, x, hx, dtype)


def test_autocast_cpu_reduced_module_f32_input():
    """A bfloat16 module given float32 input: refused outside autocast with torch's message,
    accepted under autocast (the dtype check is skipped there, spec §3.6) giving bf16 results
    close to torch.nn.RNN's; float64 input under autocast fails in both."""
    ref, ext = _pair(3, 4, num_layers=2)
    ref.bfloat16()
    ext.bfloat16()
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError) as e_ref:
        ref(x)
    with pytest.raises(ValueError) as e_ext:
        ext(x)
    assert str(e_ref.value) == str(e_ext.value)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r, hn_r = ref(x)
        out, hn = ext(x)
    assert out.dtype == hn.dtype == out_r.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), out_r.float(), atol=4e-2, rtol=4e-2)
    torch.testing.assert_close(hn.float(), hn_r.float(), atol=4e-2, rtol=4e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in ext.parameters())

    ref32, ext32 = _pair(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            ref32(x.double())
        with pytest.raises(RuntimeError):
            ext32(x.double())


def test_autocast_cpu_compiled(fresh_compile):
    """autocast inside a compiled region behaves as eager autocast."""
    _, ext = _pair(3, 4, batch_first=True)
    x, hx = _inputs(2, 5, 3, batch_first=True, hx_shape=(1, 2, 4))

    def f(x, hx):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ext(x, hx)

    out_e, hn_e = f(x, hx)
    out_c, hn_c = torch.compile(f, backend="aot_eager", fullgraph=True)(x, hx)
    assert out_c.dtype == hn_c.dtype == torch.bfloat16
    torch.testing.assert_close(out_c, out_e, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(hn_c, hn_e, atol=1e-2, rtol=1e-2)


def _cuda_ready():
    return torch.cuda.is_available() and rnn_ext.backend_info()["cuda"]


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and a CUDA build of rnn_ext")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn", "no-cudnn"])
def test_autocast_cuda_like_torch(dtype, bidirectional, cudnn):
    """autocast('cuda') with fp16 / bf16: dtypes as torch.nn.RNN, values close.  With cuDNN
    (the default) torch.nn.RNN computes in float16 under either autocast dtype (cuDNN's
    autocast wrapper); with cuDNN disabled, in the autocast dtype."""
    ref, ext = _pair(3, 6, num_layers=2, bidirectional=bidirectional, batch_first=True)
    ref.cuda()
    ext.cuda()
    D = 2 if bidirectional else 1
    x, hx = _inputs(3, 7, 3, batch_first=True, hx_shape=(2 * D, 3, 6))
    with torch.backends.cudnn.flags(enabled=cudnn):
        _assert_autocast_like_torch(ref, ext, x.cuda(), hx.cuda(), dtype, device_type="cuda",
                                    runs_in=torch.float16 if cudnn else dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and a CUDA build of rnn_ext")
def test_autocast_cuda_half_module_f32_input():
    ref, ext = _pair(3, 4, num_layers=2)
    ref.cuda().half()
    ext.cuda().half()
    x = torch.randn(5, 2, 3, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out_r, _ = ref(x)
        out, _ = ext(x)
    assert out.dtype == out_r.dtype == torch.float16
    torch.testing.assert_close(out, out_r, atol=5e-3, rtol=5e-3)


# --------------------------------------------------------------------------------------------
# DistributedDataParallel (gloo, two ranks on loopback)
# --------------------------------------------------------------------------------------------

_DDP_WORKER = DIST_MODEL + textwrap.dedent(
    """
    import os, sys
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import rnn_ext

    rank, world, out_path = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = DDP(Model(rnn_ext.RNN))
    train(model, STEPS, rank, world)
    torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, out_path)
    dist.barrier()
    dist.destroy_process_group()
    # (no interpreter teardown: gloo's threads have aborted it, rarely, with "terminate called
    # without an active exception" after the results were saved; pytorch/pytorch#190489)
    sys.stdout.flush()
    os._exit(0)
    """
)

DDP_STEPS = 4


def test_ddp_two_ranks_gloo_matches_single_process(tmp_path):
    """Two ranks (gloo on 127.0.0.1) train rnn_ext.RNN under DistributedDataParallel, each on
    half of every batch, for a few SGD+momentum steps; both end with exactly the parameters of
    one process training torch.nn.RNN on the whole batch from the same init."""
    r0, r1 = run_two_gloo_ranks(_DDP_WORKER.replace("STEPS", str(DDP_STEPS)), tmp_path, timeout=90)
    # one process, torch.nn.RNN, whole batch
    init, expected = train_dist_model_single_process(DDP_STEPS)
    assert r0.keys() == r1.keys() == expected.keys()
    moved = False
    for k in expected:
        torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(r0[k], expected[k], **TOL64, msg=lambda m: f"{k}: {m}")
        moved |= not torch.allclose(expected[k], init[k])
    assert moved, "training did not change the parameters"


# --------------------------------------------------------------------------------------------
# serialisation and module plumbing
# --------------------------------------------------------------------------------------------

def _check_same_function(ref, ext, *, dtype=torch.float32, tol=TOL32, batch_first=False,
                         input_size=3):
    """Forward + backward of ext equal ref's, and ext is still an rnn_ext.RNN."""
    assert type(ext) is rnn_ext.RNN
    x, _ = _inputs(2, 5, input_size, batch_first=batch_first, dtype=dtype)
    _assert_close_results(_fwd_bwd(ref, x), _fwd_bwd(ext, x), **tol)


def test_pickle_roundtrip():
    ref, ext = _pair(3, 4, num_layers=2, bidirectional=True, nonlinearity="relu")
    ext.eval()
    ext2 = pickle.loads(pickle.dumps(ext))
    assert type(ext2) is rnn_ext.RNN and repr(ext2) == repr(ext) and not ext2.training
    assert ext2.nonlinearity == "relu" and ext2.mode == "RNN_RELU"
    assert ext2._flat_weights_names == ext._flat_weights_names
    _check_same_function(ref, ext2)
    # the copy's flat weights are its own parameters
    assert all(w is getattr(ext2, n) for w, n in zip(ext2._flat_weights, ext2._flat_weights_names))


def test_torch_save_load_whole_module(tmp_path):
    """torch.save(module) / torch.load(weights_only=False), then flatten_parameters() (as
    test_RNN_dropout_state does), for rnn_ext and torch.nn.RNN alike."""
    ref, ext = _pair(3, 4, num_layers=2, dropout=0.3, batch_first=True)
    for m in (ref, ext):
        torch.save(m, tmp_path / "m.pt")
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        assert type(loaded) is type(m) and loaded.dropout == 0.3 and loaded.batch_first
        assert loaded.flatten_parameters() is None
        if m is ref:
            ref_loaded = loaded
        else:
            ext_loaded = loaded
    ref_loaded.eval()
    ext_loaded.eval()
    _check_same_function(ref_loaded, ext_loaded, batch_first=True)
    # state_dict interchange through a file as well
    torch.save(ext.state_dict(), tmp_path / "sd.pt")
    fresh = rnn_ext.RNN(3, 4, num_layers=2, dropout=0.3, batch_first=True).eval()
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    _check_same_function(ref_loaded, fresh, batch_first=True)


def test_deepcopy():
    ref, ext = _pair(3, 4, num_layers=2, bidirectional=True)
    ext2 = copy.deepcopy(ext)
    assert all(p is not q for p, q in zip(ext.parameters(), ext2.parameters()))
    _check_same_function(ref, ext2)
    # the copy is independent: changing it leaves the original alone
    with torch.no_grad():
        ext2.weight_hh_l0.add_(1.0)
    _check_same_function(ref, ext)
    x = torch.randn(4, 2, 3)
    assert not torch.allclose(ext(x)[0], ext2(x)[0])


def test_meta_then_to_empty_and_reset_parameters():
    """Build on the meta device (no memory), materialise with to_empty, initialise with
    reset_parameters: same shapes and device as torch.nn.RNN, same values under the same seed,
    and the module runs."""
    mods = []
    for cls in (torch.nn.RNN, rnn_ext.RNN):
        with torch.device("meta"):
            m = cls(3, 4, num_layers=2, bidirectional=True)
        assert all(p.is_meta for p in m.parameters())
        out, hn = m(torch.randn(5, 2, 3, device="meta"))
        assert out.is_meta and out.shape == (5, 2, 8) and hn.shape == (4, 2, 4)
        m.to_empty(device="cpu")
        assert all(p.device.type == "cpu" for p in m.parameters())
        assert all(w is getattr(m, n) for w, n in zip(m._flat_weights, m._flat_weights_names))
        torch.manual_seed(7)
        m.reset_parameters()
        mods.append(m)
    ref, ext = mods
    for (n, p), (n2, q) in zip(ref.named_parameters(), ext.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    _check_same_function(ref, ext)

    # also device="meta" as a constructor argument, then load_state_dict(assign=True)
    ext_meta = rnn_ext.RNN(3, 4, num_layers=2, bidirectional=True, device="meta")
    ext_meta.load_state_dict(ref.state_dict(), assign=True)
    _check_same_function(ref, ext_meta)


def test_to_device_and_dtype_conversions():
    """.to(device), .double(), .half(), .bfloat16(), .float(), .to(dtype): the flat weights
    follow, and the results match torch.nn.RNN converted the same way."""
    ref, ext = _pair(3, 4, num_layers=2, bidirectional=True)
    assert ext.to(torch.device("cpu")) is ext
    assert ext.to("cpu", torch.float32) is ext
    _check_same_function(ref, ext)

    for conv, dtype, tol in [
        (lambda m: m.double(), torch.float64, TOL64),
        (lambda m: m.half(), torch.float16, dict(atol=5e-3, rtol=5e-3)),
        (lambda m: m.bfloat16(), torch.bfloat16, dict(atol=4e-2, rtol=4e-2)),
        (lambda m: m.float(), torch.float32, TOL32),
        (lambda m: m.to(torch.float64), torch.float64, TOL64),
    ]:
        ref2, ext2 = conv(copy.deepcopy(ref)), conv(copy.deepcopy(ext))
        assert all(p.dtype == dtype for p in ext2.parameters())
        assert all(w.dtype == dtype for w in ext2._flat_weights)
        assert all(w is getattr(ext2, n) for w, n in zip(ext2._flat_weights, ext2._flat_weights_names))
        _check_same_function(ref2, ext2, dtype=dtype, tol=tol)


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and a CUDA build of rnn_ext")
def test_to_cuda_and_back():
    ref, ext = _pair(3, 4, num_layers=2)
    ref_c, ext_c = copy.deepcopy(ref).to("cuda"), copy.deepcopy(ext).to("cuda")
    assert all(w.is_cuda for w in ext_c._flat_weights)
    x = torch.randn(5, 2, 3, device="cuda")
    with no_tf32():  # (cuDNN's default TF32 is off the exact answer by ~1e-3)
        torch.testing.assert_close(ext_c(x)[0], ref_c(x)[0], atol=1e-5, rtol=1e-5)
    _check_same_function(ref, ext_c.cpu())


@pytest.mark.parametrize("packed,dropout", [(False, 0.0), (True, 0.0), (False, 0.5)],
                         ids=["dense", "packed", "dropout"])
def test_torch_func_grad_and_vjp(packed, dropout):
    """torch.func.grad / grad_and_value / vjp over rnn_ext (through functional_call), first and
    second order, give what plain autograd gives for torch.nn.RNN.  (torch.library's generated
    autograd has no setup_context, which torch.func refuses -- pytorch/pytorch#168393 -- so
    rnn_ext routes torch.func through its own autograd.Function.  torch.nn.RNN itself fails
    under torch.func with packed input, hence plain autograd for the reference.)  With dropout
    both draw their noise from the same generator state."""
    from torch.func import functional_call, grad, grad_and_value, vjp
    from torch.nn.utils.rnn import pack_padded_sequence

    ref, ext = _pair(3, 4, num_layers=2, bidirectional=True, dropout=dropout)
    ref.train(), ext.train()
    x = torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(4))

    def run(m, params, xx):
        inp = pack_padded_sequence(xx, torch.tensor([5, 4, 2])) if packed else xx
        out, h = functional_call(m, params, (inp,))
        return (out.data if packed else out), h

    def loss(m, params, xx):
        out, h = run(m, params, xx)
        return (out ** 2).sum() + h.sum()

    # rnn_ext under torch.func.  With packed input only the parameters' gradients: torch's own
    # pack_padded_sequence backward reads batch_sizes' data, which torch.func wraps.
    argnums = 0 if packed else (0, 1)
    pe = {n: p.detach() for n, p in ext.named_parameters()}
    torch.manual_seed(11)
    g_e, v_e = grad_and_value(lambda p, xx: loss(ext, p, xx), argnums=argnums)(pe, x)
    if packed:
        g_e = (g_e,)
    # torch.nn.RNN under plain autograd
    pr = {n: p.detach().clone().requires_grad_() for n, p in ref.named_parameters()}
    xr = x.clone().requires_grad_()
    torch.manual_seed(11)
    v_r = loss(ref, pr, xr)
    gr = torch.autograd.grad(v_r, list(pr.values()) + [xr])
    torch.testing.assert_close(v_e, v_r.detach(), **TOL32)
    for (n, _), g in zip(pr.items(), gr[:-1]):
        torch.testing.assert_close(g_e[0][n], g, **TOL32, msg=lambda s: f"{n}: {s}")
    if packed:
        return
    torch.testing.assert_close(g_e[1], gr[-1], **TOL32)
    # vjp w.r.t. the input, and the gradient of a gradient (second order)
    torch.manual_seed(11)
    out, fn = vjp(lambda xx: run(ext, pe, xx)[0], x)
    (vj_e,) = fn(torch.ones_like(out))
    torch.manual_seed(11)
    gg_e = grad(lambda xx: grad(lambda x2: loss(ext, pe, x2))(xx).pow(2).sum())(x)
    torch.manual_seed(11)
    out_r = run(ref, pr, xr)[0]
    (vj_r,) = torch.autograd.grad(out_r, xr, torch.ones_like(out_r))
    torch.manual_seed(11)
    (gx,) = torch.autograd.grad(loss(ref, pr, xr), xr, create_graph=True)
    (gg_r,) = torch.autograd.grad(gx.pow(2).sum(), xr)
    torch.testing.assert_close(vj_e, vj_r, **TOL32)
    torch.testing.assert_close(gg_e, gg_r, **TOL32)


def test_torch_func_vmap_per_sample_grads_and_ensembles():
    """torch.func.vmap over rnn_ext: batched inputs, per-sample gradients (vmap of grad), and
    a model ensemble (vmap over stacked weights), against torch.nn.RNN in a Python loop."""
    from torch.func import functional_call, grad, vmap

    ref, ext = _pair(3, 4, num_layers=2)
    x = torch.randn(6, 5, 1, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(vmap(lambda xx: ext(xx)[0])(x),
                               torch.stack([ref(x[i])[0] for i in range(6)]), **TOL32)

    def loss(m, p, xx):
        out, h = functional_call(m, p, (xx,))
        return (out ** 2).sum() + h.sum()

    pe = {n: p.detach() for n, p in ext.named_parameters()}
    per_sample = vmap(grad(lambda p, xx: loss(ext, p, xx)), in_dims=(None, 0))(pe, x)
    for i in range(6):
        q = {n: p.detach().clone().requires_grad_() for n, p in ref.named_parameters()}
        for (n, _), g in zip(q.items(), torch.autograd.grad(loss(ref, q, x[i]), list(q.values()))):
            torch.testing.assert_close(per_sample[n][i], g, **TOL32)
    stacked = {n: torch.stack([p + 0.01 * i for i in range(3)]) for n, p in pe.items()}
    got = vmap(lambda p: functional_call(ext, p, (x[0],))[0])(stacked)
    want = torch.stack([functional_call(ref, {n: stacked[n][i] for n in stacked}, (x[0],))[0]
                        for i in range(3)])
    torch.testing.assert_close(got, want, **TOL32)


def test_functional_call():
    """torch.func.functional_call with replacement parameters (and with a subset of them),
    including gradients w.r.t. the supplied tensors."""
    ref, ext = _pair(3, 4, num_layers=2, bidirectional=True)
    g = torch.Generator().manual_seed(9)
    new = {n: torch.randn(p.shape, generator=g).requires_grad_() for n, p in ref.named_parameters()}
    x = torch.randn(5, 2, 3, generator=g)
    outs = []
    for m in (ref, ext):
        params = {n: t.detach().clone().requires_grad_() for n, t in new.items()}
        out, hn = torch.func.functional_call(m, params, (x,))
        (out.sum() + hn.pow(2).sum()).backward()
        outs.append((out, hn, {n: t.grad for n, t in params.items()}))
        # the module's own parameters are untouched and get no gradient
        assert all(p.grad is None for p in m.parameters())
    (o_r, h_r, g_r), (o_e, h_e, g_e) = outs
    torch.testing.assert_close(o_e, o_r, **TOL32)
    torch.testing.assert_close(h_e, h_r, **TOL32)
    for n in g_r:
        torch.testing.assert_close(g_e[n], g_r[n], **TOL32, msg=lambda m: f"{n}: {m}")
    # after the call the module uses its own weights again
    torch.testing.assert_close(ext(x)[0], ref(x)[0], **TOL32)
    # a subset of the parameters
    sub = {"weight_hh_l1": new["weight_hh_l1"].detach()}
    torch.testing.assert_close(torch.func.functional_call(ext, sub, (x,))[0],
                               torch.func.functional_call(ref, sub, (x,))[0], **TOL32)


def test_weight_norm_parametrization():
    """parametrizations.weight_norm on a recurrent weight: forward, backward into the
    parametrization's original0/original1, an SGD step, and remove_parametrizations, all as
    torch.nn.RNN."""
    ref, ext = _pair(3, 4, num_layers=2)
    for m in (ref, ext):
        weight_norm(m, name="weight_hh_l0")
        weight_norm(m, name="weight_ih_l1", dim=1)
    assert [n for n, _ in ext.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(5, 2, 3)
    _assert_close_results(_fwd_bwd(ref, x), _fwd_bwd(ext, x), **TOL32)
    for m in (ref, ext):
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.5 * p.grad
    torch.testing.assert_close(ext(x)[0], ref(x)[0], **TOL32)
    for m in (ref, ext):
        parametrize.remove_parametrizations(m, "weight_hh_l0")
        parametrize.remove_parametrizations(m, "weight_ih_l1")
    assert [n for n, _ in ext.named_parameters()] == [n for n, _ in ref.named_parameters()]
    _check_same_function(ref, ext)


def test_parametrize_custom():
    """A custom parametrization (symmetric recurrent matrix) through
    torch.nn.utils.parametrize, and parametrize.cached()."""

    class Symmetric(torch.nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).transpose(-1, -2)

    ref, ext = _pair(3, 4, bidirectional=True)
    for m in (ref, ext):
        parametrize.register_parametrization(m, "weight_hh_l0_reverse", Symmetric())
    assert torch.equal(ext.weight_hh_l0_reverse, ext.weight_hh_l0_reverse.T)
    x = torch.randn(6, 2, 3)
    _assert_close_results(_fwd_bwd(ref, x), _fwd_bwd(ext, x), **TOL32)
    with parametrize.cached():
        torch.testing.assert_close(ext(x)[0], ref(x)[0], **TOL32)


class _Model(torch.nn.Module):  # module level, so that it pickles
    def __init__(self, cls):
        super().__init__()
        self.rnn = cls(3, 4, num_layers=2)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_state_dict_interchange_with_torch():
    """Whole-model state_dicts move between torch.nn.RNN and rnn_ext.RNN models both ways,
    and a model converted with convert_rnns pickles."""
    Model = _Model
    torch.manual_seed(0)
    a = Model(torch.nn.RNN)
    b = Model(rnn_ext.RNN)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(b(x), a(x), **TOL32)
    a2 = Model(torch.nn.RNN)
    a2.load_state_dict(b.state_dict())
    torch.testing.assert_close(a2(x), a(x), **TOL32)

    c = rnn_ext.convert_rnns(copy.deepcopy(a))
    assert type(c.rnn) is rnn_ext.RNN
    c2 = pickle.loads(pickle.dumps(c))
    torch.testing.assert_close(c2(x), a(x), **TOL32)
