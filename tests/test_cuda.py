"""The CUDA backend (csrc/cuda/, csrc/cuda_glue.cpp): parity with torch.nn.RNN on CUDA (cuDNN)
and with rnn_ext's CPU path, for every option and dtype, outputs and all gradients; gradcheck in
fp64; dropout; CUDA graph capture; the current stream; multi-GPU placement; torch.compile.

Every test is marked ``cuda`` and skipped without a GPU and a CUDA build of rnn_ext, so this file
collects (and skips) on CPU-only machines.  Run on a GPU with ``pytest -m cuda tests/test_cuda.py``.

Comparisons: fp64 tight; fp32 with TF32 off (cuDNN and cuBLAS) to a few 1e-5 of the scale;
fp16/bf16 against the exact answer (rnn_ext's CPU path in fp64 on the same rounded weights and
inputs): rnn_ext's error must be within a small factor of cuDNN's own error in that dtype.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from conftest import no_tf32


def _cuda_ready() -> bool:
    try:
        return torch.cuda.is_available() and bool(rnn_ext.backend_info()["cuda"])
    except Exception:  # noqa: BLE001 (a broken build must not break collection)
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and a CUDA build of rnn_ext"),
]

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Error floors for the reduced dtypes (relative to the scale of the compared tensor).
HALF_FLOOR = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
TIGHT = {torch.float64: 1e-10, torch.float32: 5e-5}


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN's RNN and cuBLAS in exact fp32 (TF32 would make fp32 comparisons meaningless)."""
    if not torch.cuda.is_available():
        yield
        return
    torch.manual_seed(0)
    with no_tf32():
        yield


# ------------------------------------------------------------------------------------------
# Cases


def case(I=3, H=5, L=1, bidirectional=False, relu=False, bias=True, batch_first=False,
         mode="dense", with_hx=True, T=4, B=3, lengths=None):
    """mode: dense | packed_sorted | packed_unsorted | unbatched"""
    return dict(I=I, H=H, L=L, bidirectional=bidirectional, relu=relu, bias=bias,
                batch_first=batch_first, mode=mode, with_hx=with_hx, T=T, B=B, lengths=lengths)


def case_id(c):
    parts = [f"I{c['I']}H{c['H']}L{c['L']}T{c['T']}B{c['B']}", c["mode"]]
    for k, tag in (("bidirectional", "bi"), ("relu", "relu"), ("batch_first", "bf")):
        if c[k]:
            parts.append(tag)
    if not c["bias"]:
        parts.append("nobias")
    if not c["with_hx"]:
        parts.append("nohx")
    return "-".join(parts)


CASES = [
    case(),
    case(L=2, bidirectional=True),
    case(L=3, relu=True, bias=False),
    case(L=2, bidirectional=True, relu=True, batch_first=True),
    case(with_hx=False, batch_first=True, B=1),
    case(mode="unbatched", L=2, bidirectional=True),
    case(mode="unbatched", with_hx=False, relu=True),
    case(mode="packed_sorted", L=2, bidirectional=True, B=4, T=5, lengths=[5, 3, 3, 1]),
    case(mode="packed_unsorted", L=2, bidirectional=True, B=5, T=6, lengths=[2, 6, 1, 6, 4]),
    case(mode="packed_unsorted", relu=True, bias=False, B=3, T=4, lengths=[1, 4, 2],
         with_hx=False),
    case(mode="packed_sorted", bidirectional=True, B=1, T=3, lengths=[3]),
    # more than one row tile (8 rows) and column tile (16 columns); H not a multiple of 4
    case(I=7, H=37, L=2, bidirectional=True, B=19, T=6),
    case(I=16, H=64, L=2, B=33, T=5, mode="packed_unsorted",
         lengths=[5, 1, 3, 5, 2, 4, 4, 1, 5, 2, 3, 3, 5, 1, 2, 4, 5, 3, 1, 2, 4, 5, 3, 2, 1,
                  5, 4, 3, 2, 1, 5, 4, 3]),
    # H > 1024: the kernels stage the input rows in chunks of 1024 columns
    case(I=8, H=1100, L=1, bidirectional=True, B=3, T=3),
    case(I=8, H=1032, L=1, relu=True, B=9, T=2, mode="packed_sorted",
         lengths=[2, 2, 2, 2, 1, 1, 1, 1, 1]),
    # sequence length 1
    case(T=1, B=2, L=2, bidirectional=True),
]


def make_modules(c, dtype, device, seed=0):
    """(torch.nn.RNN, rnn_ext.RNN) with identical weights, in dtype on device."""
    torch.manual_seed(seed)
    kw = dict(num_layers=c["L"], nonlinearity="relu" if c["relu"] else "tanh", bias=c["bias"],
              batch_first=c["batch_first"], bidirectional=c["bidirectional"])
    base = torch.nn.RNN(c["I"], c["H"], dtype=torch.float64, **kw)
    ext = rnn_ext.RNN(c["I"], c["H"], dtype=torch.float64, **kw)
    ext.load_state_dict(base.state_dict())
    return base.to(device, dtype), ext.to(device, dtype)


def make_inputs(c, seed=1):
    """float64 CPU tensors: padded input, hx (or None), lengths (or None)."""
    g = torch.Generator().manual_seed(seed)
    D = 2 if c["bidirectional"] else 1
    if c["mode"] == "unbatched":
        x = torch.randn(c["T"], c["I"], generator=g, dtype=torch.float64)
        hx = torch.randn(c["L"] * D, c["H"], generator=g, dtype=torch.float64) * 0.5
    else:
        shape = (c["B"], c["T"], c["I"]) if c["batch_first"] else (c["T"], c["B"], c["I"])
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        hx = torch.randn(c["L"] * D, c["B"], c["H"], generator=g, dtype=torch.float64) * 0.5
    return x, (hx if c["with_hx"] else None)


def run(module, c, x64, hx64, dtype, device, *, backward=True, cot_seed=2):
    """Runs module on the case's inputs (cast to dtype/device) and backpropagates fixed random
    cotangents through output and h_n.  Returns a dict name -> float64 CPU tensor: 'out', 'hn',
    'grad_input', 'grad_hx' and 'grad_<param>'."""
    x = x64.detach().to(device, dtype)
    hx = None if hx64 is None else hx64.detach().to(device, dtype).clone().requires_grad_()
    if c["mode"].startswith("packed"):
        lengths = torch.tensor(c["lengths"])
        packed = pack_padded_sequence(x, lengths, batch_first=c["batch_first"],
                                      enforce_sorted=c["mode"] == "packed_sorted")
        leaf = packed.data.detach().requires_grad_()
        inp = PackedSequence(leaf, packed.batch_sizes, packed.sorted_indices,
                             packed.unsorted_indices)
    else:
        leaf = x.detach().requires_grad_()
        inp = leaf
    for p in module.parameters():
        p.grad = None
    out, hn = module(inp) if hx is None else module(inp, hx)
    out_t = out.data if isinstance(out, PackedSequence) else out
    res = {"out": out_t, "hn": hn}
    if backward:
        g = torch.Generator().manual_seed(cot_seed)
        go = torch.randn(out_t.shape, generator=g, dtype=torch.float64).to(device, dtype)
        gh = torch.randn(hn.shape, generator=g, dtype=torch.float64).to(device, dtype)
        torch.autograd.backward([out_t, hn], [go, gh])
        res["grad_input"] = leaf.grad
        if hx is not None:
            res["grad_hx"] = hx.grad
        for name, p in module.named_parameters():
            res["grad_" + name] = p.grad
    return {k: v.detach().to("cpu", torch.float64) for k, v in res.items()}


def rel_err(a, b):
    """max |a - b| relative to max(1, max |b|)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def assert_close(got, want, tol, msg=""):
    assert got.keys() == want.keys(), (msg, sorted(got), sorted(want))
    for k in want:
        e = rel_err(got[k], want[k])
        assert e <= tol, f"{msg} {k}: relative error {e:.3g} > {tol:.3g}"


# ------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_parity_with_cudnn_and_cpu(c, dtype):
    x, hx = make_inputs(c)
    ref, ext = make_modules(c, dtype, "cuda")
    got = run(ext, c, x, hx, dtype, "cuda")
    want = run(ref, c, x, hx, dtype, "cuda")
    assert_close(got, want, TIGHT[dtype], "vs cuDNN")
    _, ext_cpu = make_modules(c, dtype, "cpu")
    assert_close(got, run(ext_cpu, c, x, hx, dtype, "cpu"), TIGHT[dtype], "vs rnn_ext CPU")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_parity_half(c, dtype):
    """fp16/bf16: rnn_ext's error (against the exact result for the same rounded weights and
    inputs) is at most a few times cuDNN's error in the same dtype, or below a floor."""
    x, hx = make_inputs(c)
    # round the inputs to the dtype once, so every contender sees the same values
    x = x.to(dtype).double()
    hx = None if hx is None else hx.to(dtype).double()
    ref, ext = make_modules(c, dtype, "cuda")
    _, exact = make_modules(c, torch.float64, "cpu")
    exact.load_state_dict({k: v.double().cpu() for k, v in ext.state_dict().items()})
    truth = run(exact, c, x, hx, torch.float64, "cpu")
    got = run(ext, c, x, hx, dtype, "cuda")
    cudnn = run(ref, c, x, hx, dtype, "cuda")
    assert got.keys() == truth.keys()
    for k in truth:
        e_ext, e_ref = rel_err(got[k], truth[k]), rel_err(cudnn[k], truth[k])
        assert e_ext <= max(3 * e_ref, HALF_FLOOR[dtype]), (
            f"{k}: rnn_ext error {e_ext:.3g}, cuDNN error {e_ref:.3g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
def test_batch_zero(dtype):
    """Batch 0 (dense): empty output and h_n, zero weight gradients, as the CPU path."""
    c = case(L=2, bidirectional=True, B=0)
    x, hx = make_inputs(c)
    _, ext = make_modules(c, dtype, "cuda")
    _, ext_cpu = make_modules(c, dtype, "cpu")
    got = run(ext, c, x, hx, dtype, "cuda")
    want = run(ext_cpu, c, x, hx, dtype, "cpu")
    assert_close(got, want, 0.0)
    assert got["out"].shape == (4, 0, 10)


def test_no_grad_and_inference_mode():
    """Forward without autograd (no workspace saved) equals the training forward."""
    c = case(L=3, bidirectional=True, B=5)
    x, hx = make_inputs(c)
    _, ext = make_modules(c, torch.float64, "cuda")
    full = run(ext, c, x, hx, torch.float64, "cuda")
    with torch.inference_mode():
        out, hn = ext(x.cuda(), hx.cuda())
    assert rel_err(out.cpu(), full["out"]) <= 1e-12
    assert rel_err(hn.cpu(), full["hn"]) <= 1e-12


@pytest.mark.parametrize("need", ["input", "hx", "weights", "input+hx"])
def test_partial_gradients(need):
    """Only the gradients asked for (output_mask) are formed, and they are right."""
    c = case(L=2, bidirectional=True, B=4)
    x64, hx64 = make_inputs(c)
    _, ext = make_modules(c, torch.float64, "cuda")
    want = run(ext, c, x64, hx64, torch.float64, "cuda")
    x = x64.cuda().requires_grad_("input" in need)
    hx = hx64.cuda().requires_grad_("hx" in need)
    for p in ext.parameters():
        p.requires_grad_(need == "weights")
        p.grad = None
    out, hn = ext(x, hx)
    g = torch.Generator().manual_seed(2)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).cuda()
    gh = torch.randn(hn.shape, generator=g, dtype=torch.float64).cuda()
    torch.autograd.backward([out, hn], [go, gh])
    if "input" in need:
        assert rel_err(x.grad.cpu(), want["grad_input"]) <= 1e-12
    if "hx" in need:
        assert rel_err(hx.grad.cpu(), want["grad_hx"]) <= 1e-12
    if need == "weights":
        for name, p in ext.named_parameters():
            assert rel_err(p.grad.cpu(), want["grad_" + name]) <= 1e-12, name


def test_only_output_or_only_hn_cotangent():
    c = case(L=2, bidirectional=True, mode="packed_unsorted", B=3, T=4, lengths=[2, 4, 3])
    x64, hx64 = make_inputs(c)
    ref, ext = make_modules(c, torch.float64, "cuda")
    for which in (0, 1):
        grads = []
        for m in (ref, ext):
            x = x64.cuda()
            packed = pack_padded_sequence(x, torch.tensor(c["lengths"]), enforce_sorted=False)
            leaf = packed.data.detach().requires_grad_()
            inp = PackedSequence(leaf, packed.batch_sizes, packed.sorted_indices,
                                 packed.unsorted_indices)
            out, hn = m(inp, hx64.cuda())
            t = out.data if which == 0 else hn
            (gi,) = torch.autograd.grad(t, leaf, torch.ones_like(t))
            grads.append(gi.cpu())
        assert rel_err(grads[1], grads[0]) <= 1e-10


def test_misaligned_weights_use_the_scalar_path():
    """W_hh views that are not 16-byte aligned (and H a multiple of the vector width) take the
    scalar kernel and give the same result."""
    T, B, I, H = 5, 3, 4, 32
    torch.manual_seed(0)
    w_ih = torch.randn(H, I, device="cuda") * 0.3
    buf = torch.randn(H * H + 1, device="cuda") * 0.2
    w_hh_mis = buf[1:].view(H, H)  # 4-byte offset: misaligned for 16-byte loads
    w_hh = w_hh_mis.clone()
    b_ih, b_hh = torch.randn(H, device="cuda"), torch.randn(H, device="cuda")
    x = torch.randn(T, B, I, device="cuda")
    hx = torch.randn(1, B, H, device="cuda")
    kw = dict(has_biases=True, num_layers=1, bidirectional=False, relu=False)
    a = rnn_ext.ops.rnn(x, hx, [w_ih, w_hh_mis, b_ih, b_hh], None, **kw)
    b = rnn_ext.ops.rnn(x, hx, [w_ih, w_hh, b_ih, b_hh], None, **kw)
    for u, v in zip(a, b):
        assert rel_err(u.double().cpu(), v.double().cpu()) <= 1e-6


# ------------------------------------------------------------------------------------------
# gradcheck (fp64)


def _functional(c, batch_sizes=None):
    D = 2 if c["bidirectional"] else 1

    def f(x, hx, *weights):
        return rnn_ext.ops.rnn(x, hx, list(weights), batch_sizes, has_biases=c["bias"],
                               num_layers=c["L"], bidirectional=D == 2, relu=c["relu"])
    return f


def _weights(c, device="cuda"):
    _, ext = make_modules(c, torch.float64, device)
    return [w.detach().clone().requires_grad_() for w in ext._flat_weights]


@pytest.mark.parametrize("c", [case(L=2, bidirectional=True, H=4, I=3, T=3, B=2),
                               case(L=1, relu=True, bias=False, H=3, I=2, T=3, B=2)],
                         ids=case_id)
def test_gradcheck_dense(c):
    x, hx = make_inputs(c)
    x = x.cuda().requires_grad_()
    hx = hx.cuda().requires_grad_()
    assert torch.autograd.gradcheck(_functional(c), (x, hx, *_weights(c)))


def test_gradcheck_packed():
    c = case(L=2, bidirectional=True, H=4, I=3, T=4, B=3)
    batch_sizes = torch.tensor([3, 2, 2, 1])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64).cuda().requires_grad_()
    hx = torch.randn(4, 3, 4, generator=g, dtype=torch.float64).cuda().requires_grad_()
    assert torch.autograd.gradcheck(_functional(c, batch_sizes), (x, hx, *_weights(c)))


def test_gradgradcheck():
    """Double backward on CUDA (through the differentiable reference recomputation)."""
    c = case(L=1, bidirectional=True, H=3, I=2, T=3, B=2)
    x, hx = make_inputs(c)
    x = x.cuda().requires_grad_()
    hx = hx.cuda().requires_grad_()
    assert torch.autograd.gradgradcheck(_functional(c), (x, hx, *_weights(c)))


# ------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dropout_reproducible_and_consistent(dtype):
    """Training with dropout on CUDA: same seed -> same result; the saved noise is a valid
    dropout mask; output and gradients equal the reference run with that noise."""
    L, D, H, I, T, B, p = 3, 2, 6, 4, 5, 3, 0.4
    c = case(L=L, bidirectional=True, H=H, I=I, T=T, B=B)
    w = _weights(c)
    w = [t.detach().to(dtype).requires_grad_() for t in w]
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
    hx = torch.randn(L * D, B, H, device="cuda", dtype=dtype, requires_grad=True)
    args = (x, hx, w, None, True, L, True, False, p, True, True)
    torch.manual_seed(123)
    out1, hy1, ws1, noise1 = rnn_ext.ops.rnn_forward(*args)
    torch.manual_seed(123)
    out2, hy2, _, noise2 = rnn_ext.ops.rnn_forward(*args)
    assert torch.equal(out1, out2) and torch.equal(hy1, hy2) and torch.equal(noise1, noise2)
    torch.manual_seed(124)
    _, _, _, noise3 = rnn_ext.ops.rnn_forward(*args)
    assert not torch.equal(noise1, noise3)
    assert noise1.shape == (L - 1, T * B, D * H)
    vals = noise1.unique().double().cpu()
    assert all(v == 0 or abs(v - 1 / (1 - p)) < 1e-3 for v in vals.tolist()), vals
    assert 0.3 < (noise1 == 0).double().mean().item() < 0.5  # about p of the units dropped
    # against the reference with the same masks: outputs and every gradient
    masks = [m.view(T, B, D * H) for m in noise1.unbind(0)]
    ref_out, ref_hy = rnn_ext.reference.rnn(x, hx, w, num_layers=L, bidirectional=True,
                                            dropout_masks=masks)
    tol = TIGHT[dtype] * 10
    assert rel_err(out1.double(), ref_out.double()) <= tol
    assert rel_err(hy1.double(), ref_hy.double()) <= tol
    go, gh = torch.randn_like(out1), torch.randn_like(hy1)
    with torch.no_grad():
        gi, ghx, gw = rnn_ext.ops.rnn_backward(
            x.detach(), hx.detach(), [t.detach() for t in w], None, out1.detach(), ws1, noise1,
            go, gh, True, L, True, False, [True, True, True])
    want = torch.autograd.grad([ref_out, ref_hy], [x, hx, *w], [go, gh])
    for a, b in zip([gi, ghx, *gw], want):
        assert rel_err(a.double().cpu(), b.double().cpu()) <= tol


def test_dropout_module_runs_and_is_seeded():
    torch.manual_seed(0)
    ext = rnn_ext.RNN(4, 8, num_layers=2, dropout=0.5).cuda().train()
    x = torch.randn(6, 3, 4, device="cuda", requires_grad=True)
    torch.manual_seed(7)
    o1, _ = ext(x)
    o1.sum().backward()
    g1 = x.grad.clone()
    x.grad = None
    torch.manual_seed(7)
    o2, _ = ext(x)
    o2.sum().backward()
    assert torch.equal(o1, o2) and torch.equal(g1, x.grad)
    ext.eval()
    o3, _ = ext(x)
    o4, _ = ext(x)
    assert torch.equal(o3, o4)


# ------------------------------------------------------------------------------------------
# Streams, graphs, devices, compile


def _train_step(model, x, hx, go, gh):
    out, hn = model(x, hx)
    torch.autograd.backward([out, hn], [go, gh])
    return out, hn


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cuda_graph_capture_and_replay(dropout):
    """Forward + backward captured in a CUDA graph (so nothing synchronises with the host and
    every launch is on the capturing stream); replay on new data equals eager execution."""
    torch.manual_seed(0)
    model = rnn_ext.RNN(8, 16, num_layers=2, bidirectional=True, dropout=dropout).cuda()
    T, B = 7, 4
    static_x = torch.randn(T, B, 8, device="cuda", requires_grad=True)
    static_hx = torch.randn(4, B, 16, device="cuda", requires_grad=True)
    go = torch.randn(T, B, 32, device="cuda")
    gh = torch.randn(4, B, 16, device="cuda")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs requires
            model.zero_grad(set_to_none=True)
            static_x.grad = static_hx.grad = None
            _train_step(model, static_x, static_hx, go, gh)
    torch.cuda.current_stream().wait_stream(s)

    model.zero_grad(set_to_none=True)
    static_x.grad = static_hx.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_hn = _train_step(model, static_x, static_hx, go, gh)

    new_x = torch.randn_like(static_x)
    new_hx = torch.randn_like(static_hx)
    with torch.no_grad():
        static_x.copy_(new_x)
        static_hx.copy_(new_hx)
    graph.replay()
    torch.cuda.synchronize()
    got = [static_out.clone(), static_hn.clone(), static_x.grad.clone(), static_hx.grad.clone()]
    got += [p.grad.clone() for p in model.parameters()]
    if dropout:
        # Each replay draws new dropout masks (the graph-safe generator advances), so there is
        # no eager twin: check that replays run, are finite and differ.
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.isfinite(t).all() for t in got)
        assert not torch.equal(got[0], static_out)
        return

    eager = copy.deepcopy(model)
    eager.zero_grad(set_to_none=True)
    ex = new_x.clone().requires_grad_()
    ehx = new_hx.clone().requires_grad_()
    eo, eh = _train_step(eager, ex, ehx, go, gh)
    want = [eo, eh, ex.grad, ehx.grad] + [p.grad for p in eager.parameters()]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_respects_current_stream():
    """Run on a side stream whose input only becomes valid after a long kernel on that stream:
    if any launch went to another stream it would read the input too early."""
    c = case(L=2, bidirectional=True, B=4, T=6, H=32, I=8)
    x64, hx64 = make_inputs(c)
    _, ext = make_modules(c, torch.float32, "cuda")
    want = run(ext, c, x64, hx64, torch.float32, "cuda")
    src_x, src_hx = x64.float().cuda(), hx64.float().cuda()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50-100 ms of GPU time on this stream only
        x = (src_x * 1).requires_grad_()  # written after the sleep, on the side stream
        hx = (src_hx * 1).requires_grad_()
        for p in ext.parameters():
            p.grad = None
        out, hn = ext(x, hx)
        g = torch.Generator().manual_seed(2)
        go = torch.randn(out.shape, generator=g, dtype=torch.float64).float().to("cuda")
        gh = torch.randn(hn.shape, generator=g, dtype=torch.float64).float().to("cuda")
        torch.autograd.backward([out, hn], [go, gh])
    side.synchronize()
    assert rel_err(out.double().cpu(), want["out"]) <= TIGHT[torch.float32]
    assert rel_err(hn.double().cpu(), want["hn"]) <= TIGHT[torch.float32]
    assert rel_err(x.grad.double().cpu(), want["grad_input"]) <= TIGHT[torch.float32]
    for name, p in ext.named_parameters():
        assert rel_err(p.grad.double().cpu(), want["grad_" + name]) <= TIGHT[torch.float32]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    """Module and data on cuda:1 while cuda:0 is current: same results as on cuda:0."""
    c = case(L=2, bidirectional=True, mode="packed_unsorted", B=3, T=4, lengths=[2, 4, 3])
    x, hx = make_inputs(c)
    _, ext0 = make_modules(c, torch.float32, "cuda:0")
    _, ext1 = make_modules(c, torch.float32, "cuda:1")
    with torch.cuda.device(0):
        got = run(ext1, c, x, hx, torch.float32, "cuda:1")
        want = run(ext0, c, x, hx, torch.float32, "cuda:0")
    assert_close(got, want, TIGHT[torch.float32])
    assert ext1.weight_hh_l0.grad.device == torch.device("cuda:1")


def test_torch_compile_fullgraph():
    c = case(L=2, bidirectional=True, B=3, T=5, H=8, I=4)
    x64, hx64 = make_inputs(c)
    _, ext = make_modules(c, torch.float32, "cuda")
    want = run(ext, c, x64, hx64, torch.float32, "cuda")
    torch._dynamo.reset()
    compiled = torch.compile(ext, fullgraph=True)
    got = run(compiled, c, x64, hx64, torch.float32, "cuda")
    # parameter names of the compiled wrapper carry a prefix
    got = {k.replace("_orig_mod.", ""): v for k, v in got.items()}
    assert_close(got, want, TIGHT[torch.float32])


def test_autocast_matches_cudnn():
    """Under autocast('cuda', float16): the dtype and values of torch.nn.RNN (cuDNN)."""
    c = case(L=2, bidirectional=True, B=3, T=5, H=16, I=8)
    x64, hx64 = make_inputs(c)
    ref, ext = make_modules(c, torch.float32, "cuda")
    outs = []
    for m in (ref, ext):
        with torch.autocast("cuda", dtype=torch.float16):
            out, hn = m(x64.float().cuda(), hx64.float().cuda())
        outs.append((out, hn))
    (ro, rh), (eo, eh) = outs
    assert eo.dtype == ro.dtype and eh.dtype == rh.dtype
    assert rel_err(eo.double().cpu(), ro.double().cpu()) <= 1e-2
    assert rel_err(eh.double().cpu(), rh.double().cpu()) <= 1e-2


def test_long_sequence_fp32():
    """A long sequence with a larger hidden size: errors do not grow out of bounds."""
    c = case(I=64, H=256, L=2, B=8, T=200)
    x, hx = make_inputs(c)
    ref, ext = make_modules(c, torch.float32, "cuda")
    assert_close(run(ext, c, x, hx, torch.float32, "cuda"),
                 run(ref, c, x, hx, torch.float32, "cuda"), 5e-4, "vs cuDNN")


# ------------------------------------------------------------------------------------------
# Determinism and sizes past 2^31 (issue 7)


@pytest.mark.parametrize("kernel", ["step", "persistent"])
@pytest.mark.parametrize("c", [case(I=16, H=64, L=2, bidirectional=True, B=9, T=7),
                               case(I=8, H=37, L=2, B=5, T=6, mode="packed_unsorted",
                                    lengths=[2, 6, 1, 6, 4])], ids=case_id)
def test_bitwise_deterministic(c, kernel):
    """Outputs and every gradient identical bit for bit from run to run (no atomics that
    reorder sums), with either recurrence kernel."""
    prev = rnn_ext.set_cuda_kernel(kernel)
    try:
        x, hx = make_inputs(c)
        _, ext = make_modules(c, torch.float32, "cuda")
        first = run(ext, c, x, hx, torch.float32, "cuda")
        for _ in range(3):
            again = run(ext, c, x, hx, torch.float32, "cuda")
            for k in first:
                assert torch.equal(first[k], again[k]), k
    finally:
        rnn_ext.set_cuda_kernel(prev)


def test_output_beyond_2_31_elements_cuda():
    """Forward and backward with more than 2^31 elements in the output (8.6 GB in fp32; ~45 GB
    in all): 64-bit indexing in every kernel.  The last steps (past 2^31 elements) are checked
    against rnn_ext.reference started from the kernel's own state; the gradient of the input at
    the last steps against the reference's."""
    from rnn_ext import reference

    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs a GPU with 60 GiB")
    torch.manual_seed(0)
    T, B, H = 2**17 + 8, 512, 16
    m = rnn_ext.RNN(1, H, bidirectional=True).cuda()
    x = torch.empty(T, B, 1, device="cuda").uniform_(-2, 2).requires_grad_()
    out, hn = m(x)
    assert out.numel() > 2**31
    w = [t.detach() for t in m._flat_weights]
    k = 4
    kw = dict(num_layers=1, bidirectional=False, relu=False)
    with torch.no_grad():
        o_fwd, h_fwd = reference.rnn(x[-k:], out[-k - 1, :, :H].unsqueeze(0), w[:4], **kw)
        torch.testing.assert_close(o_fwd, out[-k:, :, :H], rtol=0, atol=1e-5)
        torch.testing.assert_close(h_fwd[0], hn[0], rtol=0, atol=1e-5)
        o_rev, h_rev = reference.rnn(x[:k].flip(0), out[k, :, H:].unsqueeze(0), w[4:], **kw)
        torch.testing.assert_close(o_rev.flip(0), out[:k, :, H:], rtol=0, atol=1e-5)
        torch.testing.assert_close(h_rev[0], hn[1], rtol=0, atol=1e-5)
    # backward of a loss on the last k output steps of the forward direction only: the
    # gradient reaches x[-k:] through those k steps alone
    (gx,) = torch.autograd.grad(out[-k:, :, :H].sum(), x)
    xs = x[-k:].detach().requires_grad_()
    o_ref, _ = reference.rnn(xs, out[-k - 1, :, :H].detach().unsqueeze(0), w[:4], **kw)
    (gref,) = torch.autograd.grad(o_ref.sum(), xs)
    torch.testing.assert_close(gx[-k:], gref, rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(gx[: T - k - 1]).item() > 0  # earlier steps got gradient too


# ------------------------------------------------------------------------------------------
# Per-sample gradients: rnn_backward_per_sample on CUDA (the BPTT, then batched GEMMs per group
# of batch rows) against the CPU op on the same saved forward (the CUDA forward's output,
# workspace and dropout noise, copied to the CPU).


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lengths,bi,groups,dropout", [
    (None, False, 4, 0.0), (None, True, 2, 0.0), (None, False, 4, 0.5),
    ([5, 4, 2, 1], True, 4, 0.0), ([5, 3, 3, 1], False, 2, 0.3),
], ids=["dense", "dense_bi_g2", "dense_dropout", "packed_bi", "packed_g2_dropout"])
def test_per_sample_backward_matches_cpu(dtype, lengths, bi, groups, dropout):
    T, B, I, H, L = 5, 4, 3, 8, 2
    D = 2 if bi else 1
    torch.manual_seed(0)
    base = torch.nn.RNN(I, H, L, bidirectional=bi, dtype=torch.float64)
    w = [p.detach().to("cuda", dtype) for p in base._flat_weights]
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = 0.5 * torch.randn(L * D, B, H, dtype=torch.float64)
    bs = None
    inp = x
    if lengths is not None:
        packed = pack_padded_sequence(x, torch.tensor(lengths))
        inp, bs = packed.data, packed.batch_sizes
    inp, h0 = inp.to("cuda", dtype), h0.to("cuda", dtype)
    out, hy, ws, noise = torch.ops.rnn_ext.rnn_forward(inp, h0, w, bs, True, L, bi, False,
                                                      dropout, dropout > 0, True)
    g = torch.Generator().manual_seed(2)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to("cuda", dtype)
    gh = torch.randn(hy.shape, generator=g, dtype=torch.float64).to("cuda", dtype)
    args = [inp, h0, w, bs, out, ws, noise, go, gh, True, L, bi, False]
    got = torch.ops.rnn_ext.rnn_backward_per_sample(*args, [True, True, True], groups, 3.0)
    cpu = [[t.cpu() for t in a] if isinstance(a, list) else
           (a.cpu() if isinstance(a, torch.Tensor) else a) for a in args]
    want = torch.ops.rnn_ext.rnn_backward_per_sample(*cpu, [True, True, True], groups, 3.0)
    res = {"grad_input": got[0], "grad_hx": got[1]}
    res.update({f"weight {i}": a for i, a in enumerate(got[2])})
    res.update({f"summed {i}": a for i, a in enumerate(got[3])})
    ref = {"grad_input": want[0], "grad_hx": want[1]}
    ref.update({f"weight {i}": b for i, b in enumerate(want[2])})
    ref.update({f"summed {i}": b for i, b in enumerate(want[3])})
    for i, a in enumerate(got[2]):
        assert a.shape == (groups, *w[i].shape) and a.is_cuda
    assert_close({k: v.cpu().double() for k, v in res.items()},
                 {k: v.double() for k, v in ref.items()}, TIGHT[dtype], "per-sample")
