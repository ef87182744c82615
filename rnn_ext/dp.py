"""Per-sample gradients of rnn_ext.RNN's weights, for differentially private training.

* ``with rnn_ext.per_sample_gradients(model): loss = ...; loss.backward()`` sets, on every
  weight of every rnn_ext.RNN in ``model``, ``param.grad_sample``: (B, *param.shape), each
  batch row's own gradient (summed over calls within the block; set it to None to reset).
* Opacus: ``GradSampleModule`` / ``PrivacyEngine.make_private`` on a model containing
  rnn_ext.RNN give its weights their ``grad_sample`` with nothing to register: importing
  opacus registers a grad sampler for rnn_ext.RNN (below), and the module runs Opacus'
  per-sample backward hook itself, from its own backward, once the per-sample gradients exist
  (Opacus' hook sees the gradient of the first output only; an RNN's per-sample gradients
  need the whole BPTT, with the gradient of h_n too).
* torch.func: ``vmap(grad(f))`` and ``jacrev`` run one stack for the whole vmapped batch
  (rnn_ext/ops.py, _FuncRNN and _FuncRNNBackward).

All of them run one BPTT for the batch and form each row's weight gradients with the
per-sample kernel (``torch.ops.rnn_ext.rnn_backward_per_sample``; CPU, and CUDA through batched
cuBLAS GEMMs, the latter run only under the CPU emulation so far).  The first two reach it
through the eager C++ autograd node (csrc/autograd.cpp), which hands the per-sample gradients to
a Python function, a "sink" below.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
import weakref

import torch
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

__all__ = ["per_sample_gradients"]


def _in_caller_order(grads, unsorted_indices):
    if unsorted_indices is None:
        return grads
    return [g.index_select(0, unsorted_indices) for g in grads]


# --- the plain API -------------------------------------------------------------------------

# The sinks below hold their module weakly: the autograd node keeps its sink, and a sink that
# held the module would close a cycle (module -> a stored output -> node -> sink -> module)
# through the C++ node, which Python's collector cannot see.

def _accumulating(module, batch, unsorted_indices):
    module_ref = weakref.ref(module)

    def sink(grads):
        module = module_ref()
        if module is None:
            return
        for p, g in zip(module._flat_weights, _in_caller_order(grads, unsorted_indices)):
            if p.requires_grad:
                prev = getattr(p, "grad_sample", None)
                p.grad_sample = g if prev is None else prev + g
    return sink


@contextlib.contextmanager
def per_sample_gradients(model: torch.nn.Module):
    """Within the block, the backward of every rnn_ext.RNN in ``model`` (itself one, or any
    module containing some) also sets ``param.grad_sample`` (B, *param.shape) on its weights:
    each batch row's (sample's) own gradient, in the caller's batch order (PackedSequence:
    the order of the sequences before packing), summed over the calls made in the block.
    ``param.grad`` gets their sum as usual.  One BPTT serves both."""
    from .module import RNN

    mods = [m for m in model.modules() if isinstance(m, RNN)]
    if not mods:
        raise ValueError("rnn_ext.per_sample_gradients: the model contains no rnn_ext.RNN")
    for m in mods:
        m._per_sample = _accumulating
    try:
        yield model
    finally:
        for m in mods:
            m.__dict__.pop("_per_sample", None)


# --- Opacus --------------------------------------------------------------------------------

def _opacus_hooks_object(hook):
    """The opacus GradSampleHooks instance `hook` is a method of (possibly through a
    functools.partial), or None."""
    if "opacus" not in sys.modules:
        return None
    func = hook.func if isinstance(hook, functools.partial) else hook
    owner = getattr(func, "__self__", None)
    if owner is None:
        return None
    gs = sys.modules.get("opacus.grad_sample.grad_sample_module")
    if gs is None or not isinstance(owner, gs.GradSampleHooks):
        return None
    return owner


def forward_hook_for(hook):
    """Opacus' activation hook stores the forward's inputs and calls .detach() on each: give
    it tensors (a PackedSequence's data; no None)."""
    owner = _opacus_hooks_object(hook)
    if owner is None or getattr(hook, "__name__", "") != "capture_activations_hook":
        return hook

    @functools.wraps(hook)
    def wrapped(module, args, output):
        args = tuple(a.data if isinstance(a, PackedSequence) else a
                     for a in args if a is not None)
        return hook(module, args, output)

    return wrapped


def attach_opacus_backward_hook(module, hook):
    """If `hook` is Opacus' per-sample backward hook (GradSampleModule's
    capture_backprops_hook), keep it on `module` instead of as a module backward hook and put
    the module in per-sample mode; returns the hook's handle, else None."""
    owner = _opacus_hooks_object(hook)
    if owner is None or not isinstance(hook, functools.partial) \
            or "loss_reduction" not in hook.keywords or getattr(owner, "force_functorch", False):
        return None
    hooks = module.__dict__.setdefault("_rnn_ext_opacus_hooks", collections.OrderedDict())
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    module._per_sample = _opacus_per_sample
    return handle


def _opacus_scale(module, hook):
    """The factor Opacus scales this hook's per-sample gradients by: the batch size for a mean
    loss (its 1/B undone), read at backward time as Opacus does; 1 for an empty batch (there
    is no per-sample gradient to scale, and the kernel takes only nonzero scales)."""
    return (module.max_batch_len or 1) if hook.keywords["loss_reduction"] == "mean" else 1


def _opacus_per_sample(module, batch, unsorted_indices):
    hooks = module.__dict__.get("_rnn_ext_opacus_hooks")
    if not hooks or not module.training:
        return None
    live = [h for h in hooks.values() if h.func.__self__.hooks_enabled]
    if not live or not any(p.requires_grad for p in module._flat_weights):
        return None
    # the batch size Opacus scales a mean loss's per-sample gradients by (it would otherwise
    # read it from the last positional input, which may be hx)
    module.max_batch_len = max(getattr(module, "max_batch_len", 0), batch)
    module_ref, live_refs = weakref.ref(module), [weakref.ref(h) for h in live]

    def live_hooks():  # the hooks live at the forward (held weakly: each holds the model)
        hooks = [r() for r in live_refs]
        return module_ref(), [h for h in hooks if h is not None]

    def sink(grads):
        module, live = live_hooks()
        if module is None or not live:
            return
        grads = _in_caller_order(grads, unsorted_indices)
        stash = module.__dict__.setdefault("_rnn_ext_grad_samples", [])
        for i, hook in enumerate(live):
            # the kernel applied the first hook's scale (grad_scale below); another live hook
            # (not reachable through GradSampleModule, which refuses a second one on a model)
            # would get its own copy, scaled here
            todo = _opacus_scale(module, hook) / _opacus_scale(module, live[0])
            stash.append(grads if i == 0 else [g * todo for g in grads])
            # Opacus reads grad_output[0] only to scale and permute it (our grad sampler
            # below does not use it)
            hook(module, (None,), (torch.zeros(1, 1),))

    def grad_scale():
        module, live = live_hooks()
        return 1 if module is None or not live else _opacus_scale(module, live[0])

    sink.grad_scale = grad_scale
    return sink


def _opacus_grad_sampler(module, activations, backprops):
    """rnn_ext.RNN's grad sampler for Opacus: the per-sample gradients its backward formed
    (scaled as Opacus wants them).  Where Opacus would allocate a zeroed buffer and copy them
    in (its create_or_accumulate_grad_sample: no buffer yet, full batch), they become the
    buffer themselves, saving a fill and a copy of B times every weight."""
    stash = module.__dict__.get("_rnn_ext_grad_samples")
    if not stash:
        raise RuntimeError(
            "rnn_ext.RNN: Opacus asked for per-sample gradients that the module's backward did "
            "not form (was the forward run outside the GradSampleModule's hooks?)")
    grads = stash.pop()
    out = {}
    for p, g in zip(module._flat_weights, grads):
        if not p.requires_grad:
            continue
        if _hands_over() and not hasattr(p, "_current_grad_sample") \
                and g.shape[0] == module.max_batch_len:
            p._current_grad_sample = g
        else:
            out[p] = g
    return out


@functools.cache
def _hands_over() -> bool:
    """Whether this opacus keeps per-sample gradients as _opacus_grad_sampler expects:
    create_or_accumulate_grad_sample starts p._current_grad_sample (max_batch_len, *p.shape)
    and adds later ones into it; promote_current_grad_sample moves it to p.grad_sample.
    Otherwise every gradient goes through Opacus' own function."""
    gsm = sys.modules.get("opacus.grad_sample.grad_sample_module")
    funcs = [getattr(gsm, n, None) for n in ("create_or_accumulate_grad_sample",
                                             "promote_current_grad_sample")]
    return all("_current_grad_sample" in getattr(getattr(f, "__code__", None), "co_names", ())
               for f in funcs)


def _register_with_opacus():
    from opacus.grad_sample.utils import register_grad_sampler

    from .module import RNN

    register_grad_sampler(RNN)(_opacus_grad_sampler)


class _OpacusImportHook(importlib.abc.MetaPathFinder):
    """Registers the grad sampler when opacus.grad_sample.utils is first imported, so that
    `import rnn_ext` does not import opacus (slow) and the user registers nothing."""

    target = "opacus.grad_sample.utils"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(mod):
            exec_module(mod)
            sys.modules[fullname] = mod
            _register_with_opacus()

        spec.loader.exec_module = exec_and_register
        return spec


def install_opacus_registration():
    if _OpacusImportHook.target in sys.modules:
        _register_with_opacus()
    elif not any(isinstance(f, _OpacusImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _OpacusImportHook())
