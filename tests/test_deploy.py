"""Deployment: ONNX export (both of torch's exporters, run in onnxruntime), torch.jit.trace,
AOTInductor packaging and FSDP2.  Every check compares with torch.nn.RNN (same weights) and,
for ONNX, with rnn_ext.reference too, on the shapes exported with and on other shapes."""
from __future__ import annotations

import os
import sys
import textwrap
import warnings

import onnx  # onnx, onnxscript (the dynamo exporter's), onnxruntime: installed by .ci/setup
import onnxruntime as ort
import onnxscript  # noqa: F401
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_ext
from conftest import DIST_MODEL, TOL, make_pair, run_two_gloo_ranks, \
    train_dist_model_single_process

TOL32 = TOL[torch.float32]


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------

# (config, batch_first, unbatched input, hx given): together they cover tanh and relu, 1-3
# layers, uni- and bidirectional, batch_first or not, with and without hx, unbatched input and
# bias=False.  Each is exported by both exporters.
CASES = [
    (dict(num_layers=1), False, False, False),
    (dict(num_layers=2, nonlinearity="relu", bidirectional=True), True, False, True),
    (dict(num_layers=3, bidirectional=True), False, False, True),
    (dict(num_layers=1, nonlinearity="relu", bidirectional=True), False, True, False),
    (dict(num_layers=2, bias=False), True, True, True),
]
IDS = ["tanh-L1", "relu-L2-bi-bf-hx", "tanh-L3-bi-hx", "relu-L1-bi-unbatched",
       "tanh-L2-nobias-bf-unbatched-hx"]
I, H = 3, 5


def _inputs(batch, seq, *, config, batch_first, unbatched, with_hx, seed):
    g = torch.Generator().manual_seed(seed)
    D = 2 if config.get("bidirectional") else 1
    L = config["num_layers"]
    if unbatched:
        x = torch.randn(seq, I, generator=g)
        hx = torch.randn(L * D, H, generator=g)
    else:
        x = torch.randn(*((batch, seq) if batch_first else (seq, batch)), I, generator=g)
        hx = torch.randn(L * D, batch, H, generator=g)
    return (x, hx) if with_hx else (x,)


def _export(model, args, path, *, dynamo, batch_first, unbatched, **kwargs):
    """torch.onnx.export with the batch and sequence length dynamic; inputs x[, hx], outputs
    y, h."""
    names = ["x", "hx"][:len(args)]
    bdim, tdim = (0, 1) if batch_first else (1, 0)
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        xs = {0: seq} if unbatched else {bdim: batch, tdim: seq}
        shapes = (xs, None if unbatched else {1: batch})[:len(args)]
        kwargs["dynamic_shapes"] = shapes
    else:
        xs = {0: "seq"} if unbatched else {bdim: "batch", tdim: "seq"}
        axes = {"x": xs, "y": xs}
        if not unbatched:
            axes.update(hx={1: "batch"}, h={1: "batch"})
        kwargs["dynamic_axes"] = axes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=dynamo, input_names=names,
                          output_names=["y", "h"], **kwargs)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return proto, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, args):
    feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(a) for a in session.run(None, feed)]


def _rnn_nodes(proto):
    return [n for n in proto.graph.node if n.op_type == "RNN"]


def _attr(node, name):
    return onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == name))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_onnx_export_runs_in_onnxruntime(case, dynamo, tmp_path):
    """The exported file holds ONNX's own RNN operator once per layer (its activations and
    direction; inputs X, W, R[, B], -, initial_h), runs in onnxruntime and matches
    torch.nn.RNN and rnn_ext.reference on the export shapes and on another batch size and
    sequence length."""
    config, batch_first, unbatched, with_hx = case
    ref, ext = make_pair(I, H, batch_first=batch_first, **config)
    ref.eval()
    ext.eval()
    mk = lambda b, t, s: _inputs(b, t, config=config, batch_first=batch_first,  # noqa: E731
                                 unbatched=unbatched, with_hx=with_hx, seed=s)
    proto, session = _export(ext, mk(2, 4, 0), tmp_path / "m.onnx", dynamo=dynamo,
                             batch_first=batch_first, unbatched=unbatched)

    L, bi = config["num_layers"], bool(config.get("bidirectional"))
    act = "Relu" if config.get("nonlinearity") == "relu" else "Tanh"
    nodes = _rnn_nodes(proto)
    assert len(nodes) == L, [n.op_type for n in proto.graph.node]
    assert not any(n.op_type in ("Loop", "Scan") for n in proto.graph.node)
    for n in nodes:
        assert n.domain in ("", "ai.onnx")
        assert _attr(n, "hidden_size") == H
        assert [a.decode() for a in _attr(n, "activations")] == [act] * (2 if bi else 1)
        direction = [a for a in n.attribute if a.name == "direction"]
        assert (_attr(n, "direction").decode() if direction else "forward") == \
            ("bidirectional" if bi else "forward")
        has_b = len(n.input) > 3 and n.input[3] != ""
        assert has_b == config.get("bias", True)
        assert len(n.input) == 6 and n.input[5] != ""  # initial_h: hx, or zeros

    for b, t, seed in ((2, 4, 0), (3, 7, 1)):
        args = mk(b, t, seed)
        y, h = _run(session, args)
        with torch.no_grad():
            y_ref, h_ref = ref(*args)
            y_oracle, h_oracle = rnn_ext.reference.module_forward(ext, *args)
        torch.testing.assert_close(y, y_ref, **TOL32)
        torch.testing.assert_close(h, h_ref, **TOL32)
        torch.testing.assert_close(y, y_oracle, **TOL32)
        torch.testing.assert_close(h, h_oracle, **TOL32)


class _Padded(torch.nn.Module):
    """An RNN over padded sequences of the given lengths, through PackedSequence."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths, hx):
        out, h = self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        return pad_packed_sequence(out)[0], h


def test_onnx_packed_torchscript_exporter_uses_sequence_lens(tmp_path):
    """PackedSequence input, TorchScript exporter: as for torch.nn.RNN, each layer's RNN node
    gets the lengths as its sequence_lens, and the file runs on other lengths, batch sizes and
    sequence lengths."""
    ref, ext = make_pair(I, H, num_layers=2, bidirectional=True)
    ref.eval()
    ext.eval()

    def args(t, lengths, seed):
        g = torch.Generator().manual_seed(seed)
        b = len(lengths)
        return (torch.randn(t, b, I, generator=g), torch.tensor(lengths),
                torch.randn(4, b, H, generator=g))

    path = tmp_path / "p.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Padded(ext), args(5, [5, 2, 4], 0), str(path), dynamo=False,
                          input_names=["x", "lengths", "hx"],
                          dynamic_axes={"x": {0: "seq", 1: "batch"}, "lengths": {0: "batch"},
                                        "hx": {1: "batch"}})
    proto = onnx.load(str(path))
    nodes = _rnn_nodes(proto)
    assert len(nodes) == 2
    assert all(len(n.input) > 4 and n.input[4] != "" for n in nodes)  # sequence_lens
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t, lengths, seed in ((5, [5, 2, 4], 0), (7, [3, 7], 1), (6, [1, 6, 6, 2], 2)):
        a = args(t, lengths, seed)
        y, h = _run(session, a)
        with torch.no_grad():
            y_ref, h_ref = _Padded(ref)(*a)
        torch.testing.assert_close(y, y_ref, **TOL32)
        torch.testing.assert_close(h, h_ref, **TOL32)


def test_onnx_packed_dynamo_exporter_fails_as_torch_does(tmp_path):
    """PackedSequence input, dynamo exporter: torch.nn.RNN's export fails (torch.export cannot
    trace the data-dependent batch sizes); so does rnn_ext's, with an exporter error rather than
    a wrong file."""
    ref, ext = make_pair(I, H, num_layers=1)
    x, lengths, hx = torch.randn(4, 2, I), torch.tensor([4, 2]), torch.randn(1, 2, H)
    for m in (ref, ext):
        with warnings.catch_warnings(), pytest.raises(Exception) as info:
            warnings.simplefilter("ignore")
            torch.onnx.export(_Padded(m.eval()), (x, lengths, hx), str(tmp_path / "p.onnx"),
                              dynamo=True)
        assert isinstance(info.value, torch.onnx.errors.OnnxExporterError), info.value
    # and should a trace reach rnn_ext's ONNX lowering with packed data, it says why it stops
    with pytest.raises(RuntimeError, match="does not support PackedSequence"):
        rnn_ext.onnx.rnn(x[:, 0], hx, list(ext._flat_weights), lengths, has_biases=True,
                         num_layers=1, bidirectional=False, relu=False)


def test_onnx_training_mode_matches_torch(tmp_path):
    """A module in training mode with inter-layer dropout: the dynamo exporter leaves dropout
    out, as it does for torch.nn.RNN (both files compute the eval-mode function); the
    TorchScript exporter exports in eval mode by default and refuses training mode with torch's
    own error."""
    ref, ext = make_pair(I, H, num_layers=2, dropout=0.5)
    ref.train()
    ext.train()
    x = torch.randn(4, 2, I)
    with torch.no_grad():
        expected = ref.eval()(x)
    ref.train()
    for m in (ref, ext):
        path = tmp_path / f"{type(m).__module__}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (x,), str(path), dynamo=True)
        assert m.training
        got = _run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), (x,))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **TOL32)

    _, session = _export(ext, (x,), tmp_path / "ts.onnx", dynamo=False, batch_first=False,
                         unbatched=False)
    for a, b in zip(_run(session, (x,)), expected):
        torch.testing.assert_close(a, b, **TOL32)
    assert ext.training  # the exporter restores the mode
    messages = []
    for m in (ref, ext):
        with warnings.catch_warnings(), pytest.raises(Exception) as info:
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (x,), str(tmp_path / "t.onnx"), dynamo=False,
                              training=torch.onnx.TrainingMode.TRAINING)
        messages.append(str(info.value).split("[Caused by")[0])
    assert "dropout in training mode" in messages[0]
    assert messages[0] == messages[1]


# --------------------------------------------------------------------------------------------
# torch.jit.trace
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(num_layers=2, batch_first=True),
    dict(num_layers=3, bidirectional=True, nonlinearity="relu", dropout=0.3),
], ids=["L2-bf", "L3-bi-relu-dropout"])
def test_jit_trace_default_checks_and_behaves_as_traced_torch(kwargs):
    """torch.jit.trace with its default checks (check_trace=True re-traces under no_grad and
    compares the graphs) succeeds; the graph records the rnn_ext op once, as torch.nn.RNN's
    records aten::rnn_*; the traced modules agree with traced torch.nn.RNN on other batch
    sizes and sequence lengths, with and without hx, outputs and gradients."""
    ref, ext = make_pair(I, H, **kwargs)
    ref.eval()
    ext.eval()
    D = 2 if kwargs.get("bidirectional") else 1
    bf = kwargs.get("batch_first", False)

    def args(b, t, with_hx, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*((b, t) if bf else (t, b)), I, generator=g)
        return (x, torch.randn(kwargs["num_layers"] * D, b, H, generator=g)) if with_hx else (x,)

    for with_hx in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)  # e.g. "outputs differ"
            warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean",
                                    torch.jit.TracerWarning)
            traced_ext = torch.jit.trace(ext, args(2, 5, with_hx, 0))
            traced_ref = torch.jit.trace(ref, args(2, 5, with_hx, 0))
        graph = str(traced_ext.graph)
        assert graph.count("rnn_ext::rnn_forward") == 1
        assert "aten::rnn" not in graph
        assert "aten::rnn_" in str(traced_ref.graph)

        results = []
        for traced, module in ((traced_ext, ext), (traced_ref, ref)):
            a = [t.requires_grad_() for t in args(3, 7, with_hx, 1)]
            y, h = traced(*a)
            (y.square().sum() + h.sum()).backward()
            results.append([y, h] + [t.grad for t in a] + [p.grad for p in module.parameters()])
            module.zero_grad(set_to_none=True)
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, **TOL32)
        with torch.no_grad():  # and under no_grad, as a traced module is typically served
            a = args(4, 2, with_hx, 2)
            for got, expected in zip(traced_ext(*a), traced_ref(*a)):
                torch.testing.assert_close(got, expected, **TOL32)


def test_jit_trace_packed_behaves_as_traced_torch():
    """Tracing a model that packs, runs the RNN and pads: as for torch.nn.RNN, the trace
    passes its checks and runs other lengths, batch sizes and sequence lengths, with the same
    outputs and input gradients as traced torch.nn.RNN."""
    ref, ext = make_pair(I, H, num_layers=2, bidirectional=True)

    def args(t, lengths, seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(t, len(lengths), I, generator=g).requires_grad_(),
                torch.tensor(lengths), torch.randn(4, len(lengths), H, generator=g))

    traced = []
    for m in (ext, ref):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced.append(torch.jit.trace(_Padded(m), args(5, [5, 2, 4], 0)))
    assert str(traced[0].rnn.graph).count("rnn_ext::rnn_forward") == 1
    results = []
    for tr in traced:
        a = args(7, [3, 7], 1)
        y, h = tr(*a)
        (y.square().sum() + h.sum()).backward()
        results.append((y, h, a[0].grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **TOL32)


# --------------------------------------------------------------------------------------------
# AOTInductor
# --------------------------------------------------------------------------------------------

class _Head(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.lin = torch.nn.Linear(2 * H, 2)

    def forward(self, x):
        y, h = self.rnn(x)
        return self.lin(y), h


def test_aoti_package_load_run_matches_torch(tmp_path):
    """torch.export (batch and sequence length dynamic) -> aoti_compile_and_package ->
    aoti_load_package: the package runs rnn_ext's op and matches torch.nn.RNN on two shapes."""
    ref, ext = make_pair(I, H, num_layers=2, bidirectional=True, batch_first=True)
    torch.manual_seed(1)
    model_ref = _Head(ref).eval()
    model = _Head(ext).eval()
    model.lin.load_state_dict(model_ref.lin.state_dict())
    x = torch.randn(2, 5, I)
    ep = torch.export.export(model, (x,), dynamic_shapes=(
        {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},))
    assert any(n.target is torch.ops.rnn_ext.rnn_forward.default for n in ep.graph.nodes)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    for shape in ((2, 5, I), (3, 8, I)):
        xi = torch.randn(shape)
        with torch.no_grad():
            got, expected = loaded(xi), model_ref(xi)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **TOL32)


# --------------------------------------------------------------------------------------------
# FSDP2 (fully_shard), two gloo ranks on the CPU
# --------------------------------------------------------------------------------------------

_FSDP_WORKER = DIST_MODEL + textwrap.dedent(
    """
    import os, sys
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    import rnn_ext

    rank, world, out_path = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = Model(rnn_ext.RNN)
    fully_shard(model.rnn)
    fully_shard(model)
    assert isinstance(model.rnn, rnn_ext.RNN)
    train(model, STEPS, rank, world)
    state = {k: v.full_tensor().detach() for k, v in model.state_dict().items()}
    torch.save(state, out_path)
    dist.barrier()
    dist.destroy_process_group()
    # (no interpreter teardown: gloo's threads have aborted it, rarely, with "terminate called
    # without an active exception" after the results were saved; pytorch/pytorch#190489)
    sys.stdout.flush()
    os._exit(0)
    """
)

FSDP_STEPS = 3


def test_fsdp2_two_ranks_gloo_matches_single_process(tmp_path):
    """fully_shard over two gloo ranks (each on half of every batch, parameters sharded between
    them) for a few SGD+momentum steps ends with the parameters of one process training
    torch.nn.RNN on the whole batch from the same init."""
    r0, r1 = run_two_gloo_ranks(_FSDP_WORKER.replace("STEPS", str(FSDP_STEPS)), tmp_path,
                                timeout=120)
    # one process, torch.nn.RNN, whole batch
    init, expected = train_dist_model_single_process(FSDP_STEPS)
    assert r0.keys() == r1.keys() == expected.keys()
    tol = TOL[torch.float64]
    for k in expected:
        torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(r0[k], expected[k], **tol, msg=lambda m: f"{k}: {m}")
        assert not torch.allclose(expected[k], init[k]), f"{k} did not move"
