"""Python side of the extension's operators: fake kernels (for torch.compile / export / meta
tensors) and autograd, through ``torch.library``.  The kernels themselves are C++/CUDA
(``csrc/``), registered as ``torch.ops.rnn_ext.rnn_forward`` and ``rnn_backward``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad as _forward_ad
from torch._C._functorch import TransformType as _TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _functorch_interpreters

from . import _C  # noqa: F401  (loads the library, which registers the ops)
from . import onnx, reference

__all__ = ["rnn_forward", "rnn_backward", "rnn_backward_per_sample", "rnn_jvp"]

rnn_forward = torch.ops.rnn_ext.rnn_forward.default
rnn_backward = torch.ops.rnn_ext.rnn_backward.default
rnn_backward_per_sample = torch.ops.rnn_ext.rnn_backward_per_sample.default
rnn_jvp = torch.ops.rnn_ext.rnn_jvp.default


def _saves_noise(train: bool, dropout: float, num_layers: int) -> bool:
    return train and dropout > 0 and num_layers > 1


def _check_same_device(input, hx, weights, *others):
    """The device checks of the C++ geometry(), with aten's messages.  They must be repeated
    here: a call mixing meta and real tensors dispatches to this fake kernel (Meta outranks
    CPU/CUDA), which would otherwise return uninitialised tensors instead of an error."""
    torch._check(
        hx.device == input.device,
        lambda: "Input and hidden tensors are not at the same device, found input tensor at "
        f"{input.device} and hidden tensor at {hx.device}",
    )
    for w in weights:
        torch._check(
            w.device == input.device,
            lambda: "Input and parameter tensors are not at the same device, found input tensor "
            f"at {input.device} and parameter tensor at {w.device}",
        )
    for t in others:
        if t is not None:
            torch._check(
                t.device == input.device,
                lambda: f"rnn_ext: expected all tensors on {input.device}, got one on {t.device}",
            )


def _check_batch_sizes(batch_sizes):
    if batch_sizes is not None:
        torch._check(
            batch_sizes.dim() == 1 and batch_sizes.dtype == torch.int64
            and batch_sizes.device.type == "cpu",
            lambda: "rnn_ext: batch_sizes must be a 1-D int64 CPU tensor, as PackedSequence "
            "holds it",
        )


@torch.library.register_fake("rnn_ext::rnn_forward")
def _rnn_forward_fake(
    input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu, dropout,
    train, need_grad,
):
    _check_same_device(input, hx, weights)
    _check_batch_sizes(batch_sizes)
    D = 2 if bidirectional else 1
    H = weights[1].shape[0]
    if batch_sizes is None:
        torch._check(input.dim() == 3, lambda: f"input must have 3 dimensions, got {input.dim()}")
        torch._check(input.shape[0] > 0,
                     lambda: "Expected sequence length to be larger than 0 in RNN")
        output = input.new_empty((input.shape[0], input.shape[1], D * H))
        N = input.shape[0] * input.shape[1]
    else:
        torch._check(input.dim() == 2, lambda: f"input must have 2 dimensions, got {input.dim()}")
        output = input.new_empty((input.shape[0], D * H))
        N = input.shape[0]
    hy = input.new_empty((num_layers * D, hx.shape[1], H))
    ws = input.new_empty((num_layers - 1, N, D * H)) if need_grad else input.new_empty((0,))
    saves = need_grad and _saves_noise(train, dropout, num_layers)
    noise = input.new_empty((num_layers - 1, N, D * H)) if saves else input.new_empty((0,))
    return output, hy, ws, noise


@torch.library.register_fake("rnn_ext::rnn_backward")
def _rnn_backward_fake(
    input, hx, weights, batch_sizes, output, workspace, noise, grad_output, grad_hy,
    has_biases, num_layers, bidirectional, relu, output_mask,
):
    _check_same_device(input, hx, weights, output, workspace, noise, grad_output, grad_hy)
    _check_batch_sizes(batch_sizes)
    # The kernels return contiguous gradients whatever the strides of their inputs (e.g. the
    # transposed input of a batch_first module), so no empty_like (which keeps strides).
    grad_input = input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,))
    grad_hx = hx.new_empty(hx.shape) if output_mask[1] else hx.new_empty((0,))
    grad_weights = [w.new_empty(w.shape) for w in weights] if output_mask[2] else []
    return grad_input, grad_hx, grad_weights


@torch.library.register_fake("rnn_ext::rnn_backward_per_sample")
def _rnn_backward_per_sample_fake(
    input, hx, weights, batch_sizes, output, workspace, noise, grad_output, grad_hy,
    has_biases, num_layers, bidirectional, relu, output_mask, groups, scale=1.0,
):
    _check_same_device(input, hx, weights, output, workspace, noise, grad_output, grad_hy)
    _check_batch_sizes(batch_sizes)
    torch._check(groups >= 0, lambda: "rnn_ext: per-sample gradients: groups must be >= 0")
    grad_input = input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,))
    grad_hx = hx.new_empty(hx.shape) if output_mask[1] else hx.new_empty((0,))
    grad_weights = [w.new_empty((groups, *w.shape)) for w in weights]
    summed = [w.new_empty(w.shape) for w in weights] if output_mask[2] else []
    return grad_input, grad_hx, grad_weights, summed


@torch.library.register_fake("rnn_ext::rnn_jvp")
def _rnn_jvp_fake(
    input, hx, weights, batch_sizes, output, workspace, noise, input_t, hx_t, weights_t,
    has_biases, num_layers, bidirectional, relu,
):
    _check_same_device(input, hx, weights, output, workspace, noise, input_t, hx_t,
                       *[t for t in weights_t if t is not None])
    _check_batch_sizes(batch_sizes)
    return output.new_empty(output.shape), hx.new_empty(hx.shape)


@torch.library.register_vmap("rnn_ext::rnn_jvp")
def _rnn_jvp_vmap(info, in_dims, input, hx, weights, batch_sizes, output, workspace, noise,
                  input_t, hx_t, weights_t, has_biases, num_layers, bidirectional, relu):
    """vmap of the fused jvp (jacfwd batches the tangents): once per vmapped entry, as
    _FuncRNN.vmap does for the forward."""
    tensors = (input, hx, output, workspace, noise, input_t, hx_t)
    dims = (in_dims[0], in_dims[1], in_dims[4], in_dims[5], in_dims[6], in_dims[7], in_dims[8])
    w_dims, wt_dims = in_dims[2], in_dims[9]
    pick = lambda t, d, v: t if t is None or d is None else t.select(d, v)  # noqa: E731
    outs = []
    for v in range(info.batch_size):
        x, h, o, ws, nz, xt, ht = (pick(t, d, v) for t, d in zip(tensors, dims))
        w = [pick(t, d, v) for t, d in zip(weights, w_dims or [None] * len(weights))]
        wt = [pick(t, d, v) for t, d in zip(weights_t, wt_dims or [None] * len(weights_t))]
        outs.append(rnn_jvp(x, h, w, batch_sizes, o, ws, nz, xt, ht, wt, has_biases,
                            num_layers, bidirectional, relu))
    return tuple(torch.stack(o) for o in zip(*outs)), (0, 0)


def _jvp_setup_context(ctx, inputs, output):
    (input, hx, weights, batch_sizes, out, ws, noise, input_t, hx_t, weights_t, has_biases,
     num_layers, bidirectional, relu) = inputs
    ctx.config = (has_biases, num_layers, bidirectional, relu)
    ctx.batch_sizes = batch_sizes
    ctx.counts = (len(weights), input_t is not None, hx_t is not None,
                  [t is not None for t in weights_t])
    ctx.save_for_backward(input, hx, out, ws, noise, input_t, hx_t, *weights,
                          *[t for t in weights_t if t is not None])


def _jvp_backward(ctx, grad_out_t, grad_hy_t):
    """Reverse mode through the fused jvp (e.g. a dual input that requires grad, then backward
    through its tangent): rnn_ext.reference's jvp recomputed with the same noise, differentiated
    with torch.autograd.grad.  The total derivative w.r.t. input, hx and the weights; none for
    output / workspace / noise, which are the forward's caches."""
    nw, has_xt, has_ht, has_wt = ctx.counts
    input, hx, out, ws, noise, input_t, hx_t, *rest = ctx.saved_tensors
    weights, given = rest[:nw], iter(rest[nw:])
    weights_t = [next(given) if h else None for h in has_wt]
    saved = (input, hx, ctx.batch_sizes, out, ws, noise, *weights)
    wrt = [input, hx, *weights]
    zeros = [torch.zeros_like(p) for p in wrt]
    tangents = [t if t is not None else z
                for t, z in zip((input_t, hx_t, *weights_t), zeros)]
    with torch.enable_grad():
        prims = [p.detach().requires_grad_() for p in wrt]
        tans = [t.detach().requires_grad_() for t in tangents]
        saved = (prims[0], prims[1], ctx.batch_sizes, out, ws, noise, *prims[2:])
        out_t, hy_t = _reference_tangents(saved, ctx.config, tans[0], tans[1], tans[2:])
        outs, grads = [], []
        for o, g in ((out_t, grad_out_t), (hy_t, grad_hy_t)):
            if g is not None:
                outs.append(o)
                grads.append(g)
        got = torch.autograd.grad(outs, prims + tans, grads, allow_unused=True)
    got = [torch.zeros_like(p) if g is None else g for g, p in zip(got, prims + tans)]
    gp, gt = got[:len(prims)], got[len(prims):]
    # (torch.library passes no gradient to a Tensor?[] argument: _fused_jvp_applies keeps
    # weight tangents that require grad off this path)
    return (gp[0], gp[1], gp[2:], None, None, None, None, gt[0] if has_xt else None,
            gt[1] if has_ht else None, None, None, None, None, None)


torch.library.register_autograd("rnn_ext::rnn_jvp", _jvp_backward,
                                setup_context=_jvp_setup_context)


def _setup_context(ctx, inputs, output):
    (input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu, dropout,
     train, need_grad) = inputs
    out, _hy, ws, noise = output
    ctx.mark_non_differentiable(ws, noise)
    ctx.set_materialize_grads(False)
    ctx.config = (has_biases, num_layers, bidirectional, relu)
    ctx.save_for_backward(input, hx, batch_sizes, out, ws, noise, *weights)


def _reference_of(saved, config):
    """The forward that `saved` came from, as plain PyTorch: f(input, hx, *weights) ->
    (output, h_n) with rnn_ext.reference, the same batch sizes and the same dropout noise."""
    input, _hx, batch_sizes, _out, _ws, noise, *_weights = saved
    _has_biases, num_layers, bidirectional, relu = config
    masks = list(noise.unbind(0)) if noise.numel() > 0 else None
    if masks is not None and batch_sizes is None:
        # the kernel keeps the noise as (T*B, D*H) rows; reference.rnn wants (T, B, D*H)
        masks = [m.view(input.shape[0], input.shape[1], m.shape[-1]) for m in masks]
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, relu=relu, dropout_masks=masks)

    def f(input, hx, *weights):
        if batch_sizes is None:
            return reference.rnn(input, hx, weights, **kw)
        return reference.rnn_packed_data(input, batch_sizes, hx, weights, **kw)

    return f


def _differentiable_backward(saved, config, needs, grad_output, grad_hy):
    """Gradients as a differentiable function of everything (create_graph=True, double
    backward): recompute the forward with rnn_ext.reference, which is plain autograd-able
    PyTorch, using the same dropout noise, and differentiate it.

    saved: (input, hx, batch_sizes or None, output, workspace, noise, *weights); config:
    (has_biases, num_layers, bidirectional, relu); needs: (input?, hx?, [weight?, ...]).
    Returns (grad_input, grad_hx, [grad of each weight]), None where not needed.  Also called
    by the C++ autograd node (csrc/autograd.cpp)."""
    input, hx, _batch_sizes, _out, _ws, _noise, *weights = saved
    wanted = []
    if needs[0]:
        wanted.append(input)
    if needs[1]:
        wanted.append(hx)
    wanted += [w for w, n in zip(weights, needs[2]) if n]
    with torch.enable_grad():
        out, hy = _reference_of(saved, config)(input, hx, *weights)
        outs, grads = [], []
        for o, g in ((out, grad_output), (hy, grad_hy)):
            if g is not None:
                outs.append(o)
                grads.append(g)
        got = torch.autograd.grad(outs, wanted, grads, create_graph=True, allow_unused=True)
    got = list(got)
    fill = lambda t, g: torch.zeros_like(t) if g is None else g  # noqa: E731
    grad_input = fill(input, got.pop(0)) if needs[0] else None
    grad_hx = fill(hx, got.pop(0)) if needs[1] else None
    grad_weights = [fill(w, got.pop(0)) if n else None for w, n in zip(weights, needs[2])]
    return grad_input, grad_hx, grad_weights


_C.set_differentiable_backward(_differentiable_backward)


def _backward(ctx, grad_output, grad_hy, _grad_ws, _grad_noise):
    return _gradients(ctx.saved_tensors, ctx.config, ctx.needs_input_grad, grad_output,
                      grad_hy) + (None,) * 8


def _gradients(saved, config, needs, grad_output, grad_hy):
    """(grad_input, grad_hx, [grad of each weight]) for a forward that saved
    (input, hx, batch_sizes, output, workspace, noise, *weights); needs is
    (input?, hx?, [weight?, ...])."""
    input, hx, batch_sizes, out, ws, noise, *weights = saved
    need_w = [bool(n) for n in needs[2]]
    if grad_output is None and grad_hy is None:
        return None, None, [None] * len(weights)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _differentiable_backward(saved, config, needs, grad_output, grad_hy)
    return _kernel_gradients(saved, config, needs, grad_output, grad_hy)


def _kernel_gradients(saved, config, needs, grad_output, grad_hy):
    """_gradients with the rnn_backward kernel (not differentiable)."""
    input, hx, batch_sizes, out, ws, noise, *weights = saved
    need_w = [bool(n) for n in needs[2]]
    has_biases, num_layers, bidirectional, relu = config
    gi, ghx, gw = rnn_backward(
        input, hx, weights, batch_sizes, out, ws, noise, grad_output, grad_hy, has_biases,
        num_layers, bidirectional, relu, [bool(needs[0]), bool(needs[1]), any(need_w)],
    )
    if any(need_w):
        grad_weights = [g if n else None for g, n in zip(gw, need_w)]
    else:
        grad_weights = [None] * len(weights)
    return gi if needs[0] else None, ghx if needs[1] else None, grad_weights


torch.library.register_autograd("rnn_ext::rnn_forward", _backward, setup_context=_setup_context)


class _Static(tuple):
    """A tuple of plain values (a configuration, `needs`) that pytree takes as one leaf: torch.func
    flattens an autograd.Function's arguments and results several times a call, node by
    node, and at small sizes that cost more than the kernels."""

    __slots__ = ()


class _FuncRNN(torch.autograd.Function):
    """The op's autograd again, as an autograd.Function with a separate setup_context: the one
    torch.library generates from register_autograd has none, and torch.func transforms refuse
    it (pytorch/pytorch#168393, #170834).  Used only under torch.func (grad, grad_and_value,
    vjp, functional_call, vmap, jvp) and forward-mode AD (its jvp); same saved tensors and
    backward as the registered autograd.
    vmap joins the vmapped entries into one stack where the weights are unbatched and the
    input dense (per-sample gradients), else runs the stack once per vmapped entry (vmapped
    weights: model ensembles; packed input)."""

    @staticmethod
    def forward(input, hx, batch_sizes, config, *weights):
        has_biases, num_layers, bidirectional, relu, dropout, train = config
        return rnn_forward(input, hx, list(weights), batch_sizes, has_biases, num_layers,
                           bidirectional, relu, dropout, train, True)

    @staticmethod
    def vmap(info, in_dims, input, hx, batch_sizes, config, *weights):
        if _stackable(in_dims[0:2], batch_sizes, in_dims[4:]):
            return _merged_forward(info.batch_size, in_dims, input, hx, config, weights)
        # vmapped weights (model ensembles) or packed input: one stack per vmapped entry
        args = (input, hx, batch_sizes, config, *weights)
        outs = []
        for v in range(info.batch_size):
            sliced = [a.select(d, v) if isinstance(d, int) else a for a, d in zip(args, in_dims)]
            outs.append(_FuncRNN.apply(*sliced))
        return tuple(torch.stack(o) for o in zip(*outs)), (0, 0, 0, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, hx, batch_sizes, config, *weights = inputs
        out, _hy, ws, noise = output
        ctx.mark_non_differentiable(ws, noise)
        ctx.set_materialize_grads(False)
        ctx.config = _Static(config[:4])
        # batch_sizes (a CPU int64 tensor, never differentiated) stays a plain attribute:
        # saved tensors come back as functorch wrappers, which have no data to read sizes from
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(input, hx, out, ws, noise, *weights)
        ctx.save_for_forward(input, hx, out, ws, noise, *weights)

    @staticmethod
    def jvp(ctx, input_t, hx_t, _batch_sizes_t, _config_t, *weights_t):
        # forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd / hessian):
        # the tangents of output and h_n from the saved forward (see _tangents)
        input, hx, *rest = ctx.saved_tensors
        saved = (input, hx, ctx.batch_sizes, *rest)
        out_t, hy_t = _tangents(saved, ctx.config, input_t, hx_t, weights_t)
        return out_t, hy_t, None, None

    @staticmethod
    def backward(ctx, grad_output, grad_hy, _grad_ws, _grad_noise):
        n = ctx.needs_input_grad
        needs = (bool(n[0]), bool(n[1]), tuple(bool(x) for x in n[4:]))
        if grad_output is None and grad_hy is None:
            return (None,) * len(n)
        input, hx, out, ws, noise, *weights = ctx.saved_tensors
        if _forward_mode_active():
            # forward-over-reverse (hessian = jacfwd(jacrev), a jvp of a gradient): the
            # reference's gradient, which forward mode differentiates (the kernels' ops below
            # have no forward-mode formula, and their tangents would be lost)
            gi, ghx, gw = _func_vjp_backward((input, hx, ctx.batch_sizes, out, ws, noise,
                                              *weights), ctx.config, needs, grad_output, grad_hy)
            return (gi, ghx, None, None, *gw)
        # the kernels' BPTT as a differentiable function of its own (_FuncRNNBackward): under
        # vmap its batching rule runs one stack, and one per-sample weight-gradient pass, for
        # every vmapped entry together; a transform that differentiates again gets the
        # reference's gradient of it
        gi, ghx, *gw = _FuncRNNBackward.apply(
            input, hx, out, ws, noise, grad_output, grad_hy, ctx.batch_sizes, ctx.config,
            _Static(needs),
            *weights)
        return (gi, ghx, None, None, *gw)


def _forward_mode_active() -> bool:
    """Whether a forward-mode level is open around this call: torch.autograd.forward_ad's
    dual level, or a torch.func jvp (jvp, jacfwd, hessian)."""
    return _forward_ad._current_level >= 0 or any(
        i.key() == _TransformType.Jvp for i in _functorch_interpreters())


def _stackable(state_dims, batch_sizes, weight_dims):
    """Whether a vmapped call can run as one stack over every entry: dense input, unbatched
    weights (the entries' batch rows then just join the batch)."""
    return batch_sizes is None and all(d is None for d in weight_dims) and any(
        d is not None for d in state_dims)


def _merge(t, d, V, dim):
    """The physical tensor of a vmapped entry's tensor t (vmapped at physical dim d, or None:
    the same for every entry) with the entries joined into its logical dim `dim`: logical size
    b becomes V*b, entry v owning rows [v*b, (v+1)*b)."""
    if d is None:
        t = t.unsqueeze(dim).expand(*t.shape[:dim], V, *t.shape[dim:])
    else:
        t = t.movedim(d, dim)
    return t.reshape(*t.shape[:dim], -1, *t.shape[dim + 2:])


def _split_rows(t, T, V, b):
    """(K, T*V*b, F) rows of a joined stack -> (V, K, T*b, F): each entry's rows, in the
    layout a stack of that entry alone has."""
    K, F = t.shape[0], t.shape[-1]
    return t.view(K, T, V, b, F).permute(2, 0, 1, 3, 4).reshape(V, K, T * b, F)


def _join_rows(t, d, T, V, b):
    """Inverse of _split_rows for a vmapped entry's (K, T*b, F) tensor at physical dim d."""
    t = t.unsqueeze(0).expand(V, *t.shape) if d is None else t.movedim(d, 0)
    K, F = t.shape[1], t.shape[-1]
    return t.view(V, K, T, b, F).permute(1, 2, 0, 3, 4).reshape(K, T * V * b, F)


def _merged_forward(V, in_dims, input, hx, config, weights):
    """_FuncRNN's vmap rule for a dense input with unbatched weights: one stack whose batch is
    every entry's batch rows side by side."""
    x = _merge(input, in_dims[0], V, 1)
    h = _merge(hx, in_dims[1], V, 1)
    T, b = x.shape[0], x.shape[1] // V
    out, hy, ws, noise = _FuncRNN.apply(x, h, None, config, *weights)
    out = out.view(T, V, b, out.shape[-1])
    hy = hy.view(hy.shape[0], V, b, hy.shape[-1])
    ws = _split_rows(ws, T, V, b)
    if noise.numel() > 0:
        return (out, hy, ws, _split_rows(noise, T, V, b)), (1, 1, 0, 0)
    return (out, hy, ws, noise), (1, 1, 0, None)


class _FuncRNNBackward(torch.autograd.Function):
    """_FuncRNN's first-order gradients with the kernels: (grad_input, grad_hx, *grad_weights),
    None where `needs` (input?, hx?, (weight?, ...)) says not wanted.  Its vmap rule joins the
    vmapped entries into one stack and forms each entry's weight gradients with the
    per-sample kernel (rnn_backward_per_sample, one group per entry): vmap(grad(f)) and jacrev
    run one BPTT for the whole vmapped batch.  Its own backward (second order) differentiates
    the reference, as _func_vjp_backward does."""

    @staticmethod
    def forward(input, hx, out, ws, noise, grad_output, grad_hy, batch_sizes, config, needs,
                *weights):
        saved = (input, hx, batch_sizes, out, ws, noise, *weights)
        gi, ghx, gw = _kernel_gradients(saved, config, needs, grad_output, grad_hy)
        return (gi, ghx, *gw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, hx, out, ws, noise, go, gh, batch_sizes, config, needs, *weights = inputs
        ctx.batch_sizes, ctx.config = batch_sizes, config
        ctx.has_go, ctx.has_gh = go is not None, gh is not None
        ctx.save_for_backward(input, hx, out, ws, noise, go, gh, *weights)

    @staticmethod
    def backward(ctx, *cotangents):
        input, hx, out, ws, noise, go, gh, *weights = ctx.saved_tensors
        all_needs = (True, True, (True,) * len(weights))

        def grads(input, hx, go, gh, *weights):
            saved = (input, hx, ctx.batch_sizes, out, ws, noise, *weights)
            gi, ghx, gw = _func_vjp_backward(saved, ctx.config, all_needs, go, gh)
            return (gi, ghx, *gw)

        go = torch.zeros_like(out) if go is None else go
        gh = torch.zeros_like(hx) if gh is None else gh
        primals = (input, hx, go, gh, *weights)
        results, pullback = torch.func.vjp(grads, *primals)
        cot = tuple(torch.zeros_like(r) if c is None else c for r, c in zip(results, cotangents))
        gi, ghx, ggo, ggh, *gw = pullback(cot)
        return (gi, ghx, None, None, None, ggo if ctx.has_go else None,
                ggh if ctx.has_gh else None, None, None, None, *gw)

    @staticmethod
    def vmap(info, in_dims, input, hx, out, ws, noise, go, gh, batch_sizes, config, needs,
             *weights):
        V = info.batch_size
        if not _stackable(in_dims[:7], batch_sizes, in_dims[10:]):
            # one backward per vmapped entry (vmapped weights, packed input)
            args = (input, hx, out, ws, noise, go, gh, batch_sizes, config, needs, *weights)
            res = []
            for v in range(V):
                sliced = [a.select(d, v) if isinstance(d, int) else a
                          for a, d in zip(args, in_dims)]
                res.append(_FuncRNNBackward.apply(*sliced))
            stacked = tuple(None if r[0] is None else torch.stack(r) for r in zip(*res))
            return stacked, tuple(None if r is None else 0 for r in stacked)
        x = _merge(input, in_dims[0], V, 1)
        T, b = x.shape[0], x.shape[1] // V
        h = _merge(hx, in_dims[1], V, 1)
        o = _merge(out, in_dims[2], V, 1)
        w_s = _join_rows(ws, in_dims[3], T, V, b)
        nz = noise.new_empty((0,)) if noise.numel() == 0 else _join_rows(noise, in_dims[4], T, V, b)
        g_o = None if go is None else _merge(go, in_dims[5], V, 1)
        g_h = None if gh is None else _merge(gh, in_dims[6], V, 1)
        has_biases, num_layers, bidirectional, relu = config
        args = (x, h, list(weights), None, o, w_s, nz, g_o, g_h, has_biases, num_layers,
                bidirectional, relu)
        if any(needs[2]):
            gi, ghx, gw, _ = rnn_backward_per_sample(*args, [needs[0], needs[1], False], V)
            gw = [g if n else None for g, n in zip(gw, needs[2])]
        else:
            gi, ghx, _ = rnn_backward(*args, [needs[0], needs[1], False])
            gw = [None] * len(weights)
        gi = gi.view(T, V, b, gi.shape[-1]) if needs[0] else None
        ghx = ghx.view(ghx.shape[0], V, b, ghx.shape[-1]) if needs[1] else None
        res = (gi, ghx, *gw)
        return res, (1 if needs[0] else None, 1 if needs[1] else None,
                     *[0 if g is not None else None for g in gw])


def _func_vjp_backward(saved, config, needs, grad_output, grad_hy):
    """_differentiable_backward for torch.func: the same recomputation with rnn_ext.reference
    and the same noise, differentiated with torch.func.vjp instead of torch.autograd.grad."""
    input, hx, _batch_sizes, _out, _ws, _noise, *weights = saved
    (out, hy), pullback = torch.func.vjp(_reference_of(saved, config), input, hx, *weights)
    go = torch.zeros_like(out) if grad_output is None else grad_output
    gh = torch.zeros_like(hy) if grad_hy is None else grad_hy
    gi, ghx, *gw = pullback((go, gh))
    return (gi if needs[0] else None, ghx if needs[1] else None,
            [g if nd else None for g, nd in zip(gw, needs[2])])


def _reference_tangents(saved, config, input_t, hx_t, weights_t):
    """(output tangent, h_n tangent) by differentiating rnn_ext.reference in forward mode
    (torch.func.jvp) with the same batch sizes and dropout noise: the path where the fused
    rnn_jvp kernel does not apply."""
    input, hx, _batch_sizes, _out, _ws, _noise, *weights = saved
    primals = (input, hx, *weights)
    tangents = tuple(torch.zeros_like(p) if t is None else t
                     for p, t in zip(primals, (input_t, hx_t, *weights_t)))
    f = _reference_of(saved, config)
    if torch._C._are_functorch_transforms_active() or _forward_ad._current_level < 0:
        _, (out_t, hy_t) = torch.func.jvp(f, primals, tangents)
        return out_t, hy_t
    # inside torch.autograd.forward_ad's dual level (forward AD does not nest): duals at that
    # same level (autograd runs a jvp rule with forward grad off), of the primals themselves, so
    # that the tangents stay differentiable in reverse mode
    with _forward_ad._set_fwd_grad_enabled(True):
        duals = [_forward_ad.make_dual(_forward_ad.unpack_dual(p).primal, t)
                 for p, t in zip(primals, tangents)]
        out, hy = f(*duals)
        return _forward_ad.unpack_dual(out).tangent, _forward_ad.unpack_dual(hy).tangent


# the dispatch key the legacy vmap (torch._vmap_internals, used by gradcheck's
# check_batched_forward_grad) includes while it runs
_LEGACY_VMAP_MODE = torch._C._parse_dispatch_key("VmapMode")


def _fused_jvp_applies(saved, tangents):
    """Whether the fused rnn_jvp kernel computes these tangents: on the CPU (the CUDA build has
    no rnn_jvp kernel); not under the legacy torch._vmap_internals vmap (which has no rule for
    the op; torch.func.vmap has, _rnn_jvp_vmap); and not under a torch.func reverse-mode level
    (reverse-over-forward, e.g. jacrev(jacfwd(f))), which refuses torch.library's autograd
    (see _FuncRNN).  Eager reverse mode through the kernel has its autograd (_jvp_backward)."""
    if saved[0].device.type != "cpu":
        return False
    if torch._C._dispatch_tls_is_dispatch_key_included(_LEGACY_VMAP_MODE):
        return False
    if torch._C._are_functorch_transforms_active() and any(
            i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters()):
        return False  # a torch.func reverse-mode level is active around this jvp
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tangents[2:]):
        return False  # weight tangents that require grad: see _jvp_backward
    return True


def _tangents(saved, config, input_t, hx_t, weights_t):
    """The jvp of the stack: tangents of (output, h_n) for the tangents of input, hx and each
    weight (None: zero) at the forward that saved `saved` (as _reference_of reads it): the
    fused rnn_jvp kernel (one more forward's worth of work), else rnn_ext.reference
    differentiated in forward mode."""
    if not _fused_jvp_applies(saved, (input_t, hx_t, *weights_t)):
        return _reference_tangents(saved, config, input_t, hx_t, weights_t)
    input, hx, batch_sizes, out, ws, noise, *weights = saved
    has_biases, num_layers, bidirectional, relu = config
    return rnn_jvp(input, hx, weights, batch_sizes, out, ws, noise, input_t, hx_t,
                   list(weights_t), has_biases, num_layers, bidirectional, relu)


def rnn(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    batch_sizes: Optional[Tensor],
    *,
    has_biases: bool,
    num_layers: int,
    bidirectional: bool,
    relu: bool,
    dropout: float = 0.0,
    train: bool = False,
    per_sample=None,
) -> tuple[Tensor, Tensor]:
    """Functional form: output and h_n of the stack, like ``torch._VF.rnn_tanh``/``rnn_relu``
    (seq-first dense input, or packed data with batch_sizes; no checks beyond the kernel's).
    per_sample: None, or a function the backward hands each batch row's weight gradients to
    (a list with one (B, *weight.shape) tensor per weight, rows in the op's order)."""
    dropout = float(dropout)
    transformed = (torch._C._are_functorch_transforms_active()
                   or _forward_ad._current_level >= 0) and not torch.compiler.is_compiling()
    if per_sample is not None and torch.is_grad_enabled():
        # per-sample gradients asked for (eager): the C++ node below, whose backward runs the
        # BPTT once for them and the summed gradients, and hands them to per_sample
        if transformed:
            raise RuntimeError(
                "rnn_ext: per-sample gradients (rnn_ext.per_sample_gradients, Opacus' hooks) "
                "cannot be formed under torch.func transforms or forward-mode AD; for "
                "per-sample gradients with torch.func, use vmap(grad(...)) on its own")
        return _C.rnn(input, hx, weights, batch_sizes, bool(has_biases), num_layers,
                      bool(bidirectional), bool(relu), dropout, bool(train), per_sample)
    if transformed:
        # under torch.func transforms, or inside a torch.autograd.forward_ad.dual_level (the
        # C++ node of the eager path has no jvp): the op through _FuncRNN (same autograd, with
        # the setup_context functorch requires, and a jvp)
        out, hy, _ws, _noise = _FuncRNN.apply(
            input, hx, batch_sizes,
            _Static((bool(has_biases), num_layers, bool(bidirectional), bool(relu), dropout,
                     bool(train))),
            *weights)
        return out, hy
    compiling = torch.compiler.is_compiling()
    # (torch._C._is_tracing(): torch.jit.is_tracing() at half the cost per eager call; not
    # reached under Dynamo, which cannot trace it)
    if compiling or torch._C._is_tracing():
        if compiling and torch.onnx.is_in_onnx_export():
            # torch.onnx.export(dynamo=True): ONNX's RNN operator per layer
            return onnx.rnn(input, hx, weights, batch_sizes, has_biases=has_biases,
                            num_layers=num_layers, bidirectional=bidirectional, relu=relu)
        # traced (torch.compile, export, torch.jit.trace, the TorchScript ONNX exporter, which
        # converts the op with rnn_ext/onnx.py's symbolic): the op, with the autograd
        # registered for it above.  A jit trace records need_grad as a constant (and its check
        # re-traces under no_grad): keep the workspace there, so the traced graph can be
        # differentiated whenever it runs, as a traced torch.nn.RNN can.
        weights = list(weights)
        need_grad = not compiling or torch.is_grad_enabled() and (
            input.requires_grad or hx.requires_grad or any(w.requires_grad for w in weights)
        )
        out, hy, _ws, _noise = rnn_forward(
            input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu,
            dropout, train, need_grad,
        )
        return out, hy
    # eager: the same op, with the C++ autograd node of csrc/autograd.cpp (the same backward
    # op), reached without torch.ops' per-call Python argument handling
    return _C.rnn(input, hx, weights, batch_sizes, bool(has_biases), num_layers,
                  bool(bidirectional), bool(relu), dropout, bool(train))
