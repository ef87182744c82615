"""PyTorch's own sample inputs and error inputs for nn.RNN
(torch.testing._internal.common_modules: module_inputs_torch_nn_RNN_GRU with is_rnn=True, packed
too, and module_error_inputs_torch_nn_RNN_GRU), driven against rnn_ext.RNN the way
test/test_modules.py drives them (test_forward, test_grad, test_gradgrad, test_errors, ...)."""
import copy
import random
import re

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils.rnn import PackedSequence
from torch.testing._internal.common_modules import (
    ModuleErrorEnum, module_db, module_error_inputs_torch_nn_RNN_GRU,
    module_inputs_torch_nn_RNN_GRU,
)

import rnn_ext
from conftest import TOL


class ModuleInfoFor:
    """What the sample generators read from a ModuleInfo: the class under test."""

    def __init__(self, cls):
        self.module_cls = cls
        self.name = cls.__name__


INFO = ModuleInfoFor(rnn_ext.RNN)


def _samples(dtype, requires_grad, training, packed=False):
    torch.manual_seed(0)
    return module_inputs_torch_nn_RNN_GRU(
        INFO, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training,
        with_packed_sequence=packed, is_rnn=True)


def _build(cls, sample, dtype, training, state_dict=None):
    c = sample.constructor_input
    m = cls(*c.args, **c.kwargs).to(dtype)
    if state_dict is not None:
        m.load_state_dict(state_dict)
    m.train(training)
    return m


def test_module_db_entry_is_what_we_drive():
    """The ModuleInfo of nn.RNN in this torch uses exactly these generators (is_rnn=True)."""
    info = next(i for i in module_db if i.module_cls is torch.nn.RNN)
    assert info.module_inputs_func.func is module_inputs_torch_nn_RNN_GRU
    assert info.module_inputs_func.keywords == {"is_rnn": True}
    assert info.module_error_inputs_func is module_error_inputs_torch_nn_RNN_GRU
    assert info.train_and_eval_differ


def test_sample_counts():
    dense = _samples(torch.float32, False, True)
    packed = _samples(torch.float32, False, True, packed=True)
    assert len(dense) == 32
    assert len(packed) == 64
    assert sum(isinstance(s.forward_input.args[0], PackedSequence) for s in packed) == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_forward(dtype, training):
    """test_forward: every sample's output equals its reference_fn (the batched-with-N=1 run)
    and torch.nn.RNN's with the same weights; then .float()/.double() re-runs keep params'
    dtype."""
    for i, s in enumerate(_samples(dtype, False, training)):
        m = _build(rnn_ext.RNN, s, dtype, training)
        ref = _build(torch.nn.RNN, s, dtype, training, m.state_dict())
        args, kwargs = s.forward_input.args, s.forward_input.kwargs
        out = m(*copy.deepcopy(args), **kwargs)
        expected = s.reference_fn(m, *args, **kwargs)  # (the wrapper passes the params)
        torch_out = ref(*copy.deepcopy(args), **kwargs)
        for got, exp, tor in zip(out, expected, torch_out):
            assert got.dtype == dtype
            torch.testing.assert_close(got, exp, **TOL[dtype], msg=lambda x: f"sample {i}: {x}")
            torch.testing.assert_close(got, tor, **TOL[dtype], msg=lambda x: f"sample {i}: {x}")
        for cast, cdtype in ((torch.nn.Module.float, torch.float32),
                             (torch.nn.Module.double, torch.float64)):
            cast(m)
            a = [x.to(cdtype) for x in args]
            o = m(*a)
            assert o[0].dtype == cdtype
            assert all(p.dtype == cdtype for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_packed_samples(dtype):
    """The packed samples (with_packed_sequence=True): output PackedSequence, h_n and the
    gradients of data/params equal torch.nn.RNN's with the same weights.  (Their reference_fn,
    the unbatched one, cannot take a PackedSequence, so torch.nn.RNN is the reference.)"""
    n = 0
    for i, s in enumerate(_samples(dtype, True, True, packed=True)):
        x = s.forward_input.args[0]
        if not isinstance(x, PackedSequence):
            continue
        n += 1
        m = _build(rnn_ext.RNN, s, dtype, True)
        ref = _build(torch.nn.RNN, s, dtype, True, m.state_dict())
        results = []
        for mod in (ref, m):
            data = x.data.detach().clone().requires_grad_()
            px = PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
            out, h = mod(px)
            assert isinstance(out, PackedSequence) and out.batch_sizes is x.batch_sizes
            (out.data.pow(2).sum() + h.sum()).backward()
            results.append([out.data, h, data.grad] + [p.grad for p in mod.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, **TOL[dtype], msg=lambda e: f"sample {i}: {e}")
    assert n == 32


def _flat_fn(m, args):
    """test_modules' _test_gradients_helper: a function of (inputs..., params...) whose outputs
    are the module's flattened outputs."""
    names = [n for n, _ in m.named_parameters()]
    n_in = len(args)

    def fn(*flat):
        ins, params = flat[:n_in], flat[n_in:]
        out, h = torch.func.functional_call(m, dict(zip(names, params)), tuple(ins))
        return out, h

    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    return fn, tuple(args) + tuple(params)


_rng = random.Random(7)
_GRAD_IDX = sorted(_rng.sample(range(32), 8))
_GRADGRAD_IDX = sorted(_rng.sample(range(32), 3))


@pytest.mark.parametrize("idx", _GRAD_IDX)
def test_grad(idx):
    """test_grad: double gradcheck of outputs w.r.t. input(s) and all params."""
    s = _samples(torch.float64, True, True)[idx]
    m = _build(rnn_ext.RNN, s, torch.float64, True)
    fn, inputs = _flat_fn(m, s.forward_input.args)
    assert gradcheck(fn, inputs, check_batched_grad=False)


@pytest.mark.parametrize("idx", _GRADGRAD_IDX)
def test_gradgrad(idx):
    s = _samples(torch.float64, True, True)[idx]
    m = _build(rnn_ext.RNN, s, torch.float64, True)
    fn, inputs = _flat_fn(m, s.forward_input.args)
    assert gradgradcheck(fn, inputs, check_batched_grad=False)


def test_non_contiguous_tensors():
    """test_non_contiguous_tensors: inputs built as repeat_interleave(2, dim=-1)[..., ::2] give
    the same outputs and grads as contiguous ones."""
    for s in _samples(torch.float64, True, True)[::5]:
        m = _build(rnn_ext.RNN, s, torch.float64, True)
        res = []
        for non_contig in (False, True):
            ins = []
            for a in s.forward_input.args:
                a = a.detach()
                if non_contig:
                    a = a.repeat_interleave(2, dim=-1)[..., ::2]
                    assert not a.is_contiguous()
                ins.append(a.requires_grad_())
            m.zero_grad()
            out, h = m(*ins)
            (out.sum() + h.pow(2).sum()).backward()
            res.append([out, h] + [a.grad for a in ins] + [p.grad.clone() for p in m.parameters()])
        for a, b in zip(*res):
            torch.testing.assert_close(b, a, **TOL[torch.float64])


def test_factory_kwargs_repr_pickle_train_eval_meta():
    """test_factory_kwargs, test_repr, test_pickle, test_if_train_and_eval_modes_differ,
    test_device_ctx_init, over the samples' constructor inputs."""
    import io

    for s in _samples(torch.float32, False, True)[::3]:
        c = s.constructor_input
        m = rnn_ext.RNN(*c.args, **c.kwargs, dtype=torch.float64)
        assert all(p.dtype == torch.float64 for p in m.parameters())
        assert repr(m) == repr(torch.nn.RNN(*c.args, **c.kwargs))
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        m2 = torch.load(buf, weights_only=False)
        a = [x.to(torch.float64) for x in s.forward_input.args]
        for u, v in zip(m(*a), m2(*a)):
            assert torch.equal(u, v)
        with torch.device("meta"):
            mm = rnn_ext.RNN(*c.args, **c.kwargs)
        for (n, p), (_, q) in zip(mm.named_parameters(), m.named_parameters()):
            assert p.is_meta and p.shape == q.shape, n
        delattr(m, "training")
        with pytest.raises(AttributeError, match="'training'"):
            m(*a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_errors(dtype):
    """test_errors: every error input raises the expected type with the expected regex, for
    rnn_ext.RNN as for torch.nn.RNN."""
    samples = module_error_inputs_torch_nn_RNN_GRU(
        INFO, device="cpu", dtype=dtype, requires_grad=False, training=True, is_rnn=True)
    assert len(samples) == 14
    for cls in (torch.nn.RNN, rnn_ext.RNN):
        for e in samples:
            mi = e.module_error_input
            c = mi.constructor_input
            if e.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(e.error_type, match=e.error_regex):
                    cls(*c.args, **c.kwargs)
            else:
                m = cls(*c.args, **c.kwargs)
                with pytest.raises(e.error_type, match=e.error_regex):
                    m(*mi.forward_input.args, **mi.forward_input.kwargs)


def test_error_regexes_are_not_trivial():
    """Sanity: the regexes of the error inputs are the messages of spec §1.2 / §2.3."""
    samples = module_error_inputs_torch_nn_RNN_GRU(
        INFO, device="cpu", dtype=torch.float32, requires_grad=False, training=True, is_rnn=True)
    regexes = {e.error_regex for e in samples}
    assert "hidden_size must be greater than zero" in regexes
    assert any(re.search(r, "RNN input dtype (torch.float64) does not match weight dtype "
                         "(torch.float32). Convert input: input.to(torch.float32), or convert "
                         "model: model.to(torch.float64)") for r in regexes)
