"""Per-sample gradients of rnn_ext.RNN's weights, for differentially private training.

* ``with rnn_ext.per_sample_gradients(model): loss = ...; loss.backward()`` sets, on every
  weight of every rnn_ext.RNN in ``model``, ``param.grad_sample``: (B, *param.shape), each
  batch row's own gradient (summed over calls within the block; set it to None to reset).
* Opacus: ``GradSampleModule`` / ``PrivacyEngine.make_private`` on a model containing
  rnn_ext.RNN give its weights their ``grad_sample`` with nothing to register: importing
  opacus registers a grad sampler for rnn_ext.RNN (below), and the module runs Opacus'
  per-sample backward hook itself, from its own backward, once the per-sample gradients exist
  (Opacus' hook sees the gradient of the first output only; an RNN's per-sample gradients
  need the whole BPTT, with the gradient of h_n too).  For GradSampleModule's own hooks, on
  the opacus versions whose bookkeeping they reproduce (_knows_opacus), lean equivalents run
  instead (_backprops_lean): at small sizes Opacus' generic hooks cost more than the kernels.
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
        hooks = m.__dict__.get("_rnn_ext_opacus_hooks") or {}
        if any(h.func.__self__.hooks_enabled for h in hooks.values()):
            raise RuntimeError(
                "rnn_ext.per_sample_gradients: an rnn_ext.RNN of the model is in an Opacus "
                "GradSampleModule with its hooks enabled, which forms its grad_sample already; "
                "use one or the other (or call disable_hooks() first)")
    before = [m.__dict__.get("_per_sample") for m in mods]  # (Opacus' mode, kept for after)
    for m in mods:
        m._per_sample = _accumulating
    try:
        yield model
    finally:
        for m, mode in zip(mods, before):
            if mode is None:
                m.__dict__.pop("_per_sample", None)
            else:
                m._per_sample = mode


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


def _lean(hook):
    """Whether rnn_ext's lean hooks stand in for the GradSampleModule whose hook `hook` is
    (a bound method, possibly through a functools.partial): an opacus whose bookkeeping they
    reproduce, GradSampleModule's own forward and backward hooks both (a subclass overriding
    either keeps Opacus' hooks for both, so that each sees what the other recorded), and not
    force_functorch (whose backward hook rnn_ext does not take over)."""
    func = hook.func if isinstance(hook, functools.partial) else hook
    owner = getattr(func, "__self__", None)
    gsm = sys.modules.get("opacus.grad_sample.grad_sample_module")
    if gsm is None or owner is None or not _knows_opacus() \
            or getattr(owner, "force_functorch", False):
        return False
    cls = gsm.GradSampleModule
    return (getattr(func, "__func__", None) in (cls.capture_activations_hook,
                                                 cls.capture_backprops_hook)
            and type(owner).capture_activations_hook is cls.capture_activations_hook
            and type(owner).capture_backprops_hook is cls.capture_backprops_hook)


def _trainable(module):
    """What Opacus' requires_grad(module) / trainable_parameters(module) iterate over, for a
    module with no submodules (the lean hooks' condition): its own parameters wanting a grad,
    each once (a weight tied to another is listed under both names)."""
    return list(dict.fromkeys(
        p for p in module._parameters.values() if p is not None and p.requires_grad))


def forward_hook_for(hook):
    """Opacus' activation hook stores the forward's inputs and calls .detach() on each: give
    it tensors (a PackedSequence's data; no None).  GradSampleModule's own hook is replaced by
    a lean one with the same effect on Opacus' state (its activations are never read: the
    grad sampler below uses the per-sample gradients the backward formed)."""
    owner = _opacus_hooks_object(hook)
    if owner is None or getattr(hook, "__name__", "") != "capture_activations_hook":
        return hook
    lean = _lean(hook)

    @functools.wraps(hook)
    def wrapped(module, args, output):
        if lean and not module._modules:
            # GradSampleModule.capture_activations_hook, without its generic steps
            if not owner.hooks_enabled or not module.training or not torch.is_grad_enabled():
                return None
            trainable = _trainable(module)
            if trainable:
                module.__dict__.setdefault("activations", []).append([])
                for p in trainable:
                    p._forward_counter += 1
            return None
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
    return _OpacusSink(module, live, unsorted_indices)


class _OpacusSink:
    """Takes the per-sample gradients of one forward call's backward and runs, for each
    Opacus hook live at that forward, its bookkeeping: the lean one below for
    GradSampleModule's own hook, else the hook itself (with the gradients stashed for the grad
    sampler).  Holds the module and the hooks weakly (each hook holds the model)."""

    __slots__ = ("module", "hooks", "unsorted_indices")

    def __init__(self, module, live, unsorted_indices):
        lean = not module._modules
        self.module = weakref.ref(module)
        self.hooks = [(weakref.ref(h), lean and _lean(h)) for h in live]
        self.unsorted_indices = unsorted_indices

    def _live(self):
        live = []
        for ref, lean in self.hooks:
            hook = ref()
            if hook is not None:
                live.append((hook, lean))
        return self.module(), live

    def grad_scale(self):
        """The factor the kernel forms the per-sample gradients times: the first hook's."""
        module, live = self._live()
        return 1 if module is None or not live else _opacus_scale(module, live[0][0])

    def __call__(self, grads):
        module, live = self._live()
        if module is None or not live:
            return
        grads = _in_caller_order(grads, self.unsorted_indices)
        first = _opacus_scale(module, live[0][0])
        for i, (hook, lean) in enumerate(live):
            # the kernel applied the first hook's scale (grad_scale); another live hook (not
            # reachable through GradSampleModule, which refuses a second one on a model) gets
            # its own copy, scaled here
            mine = grads if i == 0 else [g * (_opacus_scale(module, hook) / first) for g in grads]
            if lean:
                _backprops_lean(module, hook.func.__self__, mine)
            else:
                module.__dict__.setdefault("_rnn_ext_grad_samples", []).append(mine)
                # Opacus reads grad_output[0] only to scale and permute it (our grad sampler
                # below does not use it)
                hook(module, (None,), (torch.zeros(1, 1),))


def _keep_grad_sample(module, p, g):
    """Opacus' create_or_accumulate_grad_sample(p, g): where it would allocate a zeroed buffer
    and copy g in (no buffer yet, full batch), g becomes the buffer itself, saving a fill and
    a copy of B times every weight."""
    if not hasattr(p, "_current_grad_sample") and g.shape[0] == module.max_batch_len:
        p._current_grad_sample = g
    else:
        gsm = sys.modules["opacus.grad_sample.grad_sample_module"]
        gsm.create_or_accumulate_grad_sample(param=p, grad_sample=g,
                                             max_batch_len=module.max_batch_len)


def _backprops_lean(module, owner, grads):
    """GradSampleModule.capture_backprops_hook for rnn_ext.RNN, the per-sample gradients
    already formed: the same bookkeeping (the activations entry popped, each parameter's
    per-sample gradient kept or added, moved to grad_sample when its last forward call is
    done, Poisson sampling refusing accumulation), without Opacus' generic steps around it
    (scaling and permuting a gradient nobody reads, the grad-sampler lookup, the parameter
    generators; bench/NOTES.md, V16)."""
    if not owner.hooks_enabled:
        return
    if not hasattr(module, "activations"):  # (Opacus' own check, in rearrange_grad_samples)
        raise ValueError(f"No activations detected for {type(module)},"
                         " run forward after add_hooks(model)")
    module.activations.pop()
    for p, g in zip(module._flat_weights, grads):
        if p.requires_grad:
            _keep_grad_sample(module, p, g)
    gsm = sys.modules["opacus.grad_sample.grad_sample_module"]
    for p in _trainable(module):
        p._forward_counter -= 1
        if p._forward_counter == 0:
            gsm.promote_current_grad_sample(p)
        if not owner.grad_accumulation_allowed \
                and isinstance(p.grad_sample, list) and len(p.grad_sample) > 1:
            raise ValueError(
                "Poisson sampling is not compatible with grad accumulation. "
                "You need to call optimizer.step() after every forward/backward pass "
                "or consider using BatchMemoryManager")
    if len(module.activations) == 0 and hasattr(module, "max_batch_len"):
        del module.max_batch_len


def _opacus_grad_sampler(module, activations, backprops):
    """rnn_ext.RNN's grad sampler for Opacus, called by Opacus' own backward hook where the
    lean one above does not apply: the per-sample gradients the module's backward formed
    (scaled as Opacus wants them)."""
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
        if _knows_opacus():
            _keep_grad_sample(module, p, g)
        else:  # (a weight tied under two names gets both uses' gradients)
            out[p] = out[p] + g if p in out else g
    return out


@functools.cache
def _knows_opacus() -> bool:
    """Whether this opacus keeps per-sample gradients as rnn_ext expects (as opacus 1.6 does):
    capture_activations_hook appends to module.activations and counts p._forward_counter up;
    capture_backprops_hook pops the activations, counts down, promotes; and
    create_or_accumulate_grad_sample starts p._current_grad_sample (max_batch_len, *p.shape)
    and adds later ones into it, promote_current_grad_sample moving it to p.grad_sample.
    Otherwise Opacus' own hooks and functions do all of it."""
    gsm = sys.modules.get("opacus.grad_sample.grad_sample_module")
    cls = getattr(gsm, "GradSampleModule", None)
    expect = {
        "create_or_accumulate_grad_sample": {"_current_grad_sample"},
        "promote_current_grad_sample": {"_current_grad_sample", "grad_sample"},
        "capture_activations_hook": {"activations", "_forward_counter", "hooks_enabled"},
        "capture_backprops_hook": {"_forward_counter", "promote_current_grad_sample",
                                   "create_or_accumulate_grad_sample", "max_batch_len",
                                   "grad_accumulation_allowed", "activations"},
    }
    for name, names in expect.items():
        func = getattr(gsm, name, None) or getattr(cls, name, None)
        code = getattr(func, "__code__", None)
        if code is None or not names <= set(code.co_names):
            return False
    return True


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
