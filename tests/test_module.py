"""rnn_ext.RNN as a module: constructor dispatch, attributes, parameters, state_dict both ways,
extra_repr, seed-compatible initialisation, convert_rnns, pickle/deepcopy, meta device,
functional_call / weight_norm, dtype conversion, train/eval."""
import copy
import io
import math
import pickle

import pytest
import torch

import rnn_ext
from conftest import TOL, assert_matches_torch, make_pair

CONFIGS = [
    ((4, 6), dict(num_layers=3, bidirectional=True)),
    ((10, 20), {}),
    ((10, 20), dict(num_layers=2, dropout=0.5)),
    ((10, 20), dict(num_layers=3, bias=False, batch_first=True, dropout=0.1, bidirectional=True)),
    ((10, 20), dict(nonlinearity="relu")),
    ((3, 5, 2, "relu"), {}),
    ((3, 5, 1, "tanh", True, False, 0.0, False, 0, "cpu", torch.float64), {}),
    ((True, 5), dict(num_layers=True)),
    ((3, 5), dict(bidirectional=1)),
    ((3, 5), dict(bidirectional="x")),
    ((3, 5), dict(dropout=1, num_layers=2)),
    ((1, 1), {}),
]


def _ids(c):
    return repr(c)


@pytest.mark.parametrize("args,kwargs", CONFIGS, ids=_ids)
def test_same_as_torch(args, kwargs):
    """Attributes, repr, parameter names/shapes/order, _flat_weights_names, _all_weights,
    state_dict keys and seed-compatible initialisation, all against torch.nn.RNN."""
    torch.manual_seed(3)
    ref = torch.nn.RNN(*args, **kwargs)
    torch.manual_seed(3)
    ext = rnn_ext.RNN(*args, **kwargs)
    assert isinstance(ext, torch.nn.RNNBase) and not isinstance(ext, torch.nn.RNN)
    for a in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
              "dropout", "bidirectional", "proj_size", "nonlinearity", "training"):
        assert getattr(ext, a) == getattr(ref, a), a
        assert type(getattr(ext, a)) is type(getattr(ref, a)), a
    assert type(ext.dropout) is float
    assert ext.extra_repr() == ref.extra_repr()
    assert repr(ext) == repr(ref)
    assert ext._flat_weights_names == ref._flat_weights_names
    assert ext._all_weights == ref._all_weights
    assert [n for n, _ in ext.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ext.state_dict().keys()) == list(ref.state_dict().keys())
    assert list(ext.buffers()) == []
    for (n, p), (_, q) in zip(ext.named_parameters(), ref.named_parameters()):
        assert p.shape == q.shape and p.dtype == q.dtype and p.device == q.device, n
        # same seed -> bitwise-equal parameters
        assert torch.equal(p, q), n
    assert len(ext._flat_weights) == len(ref._flat_weights)
    for w, n in zip(ext._flat_weights, ext._flat_weights_names):
        assert w is getattr(ext, n)
    # all_weights: the actual Parameter objects, same nesting
    assert [[p.shape for p in ws] for ws in ext.all_weights] == [
        [p.shape for p in ws] for ws in ref.all_weights
    ]
    for names, params in zip(ext._all_weights, ext.all_weights):
        for n, p in zip(names, params):
            assert p is getattr(ext, n)
    assert ext.__constants__ == ref.__constants__
    # construction consumed exactly what torch's did: the RNG stream continues identically
    after_ext = torch.rand(3)
    torch.manual_seed(3)
    torch.nn.RNN(*args, **kwargs)
    assert torch.equal(after_ext, torch.rand(3))


def test_parameter_shapes_spec_example():
    m = rnn_ext.RNN(4, 6, 3, bidirectional=True)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["weight_ih_l0"] == (6, 4)
    assert shapes["weight_ih_l0_reverse"] == (6, 4)
    assert shapes["weight_ih_l1"] == (6, 12)
    assert shapes["weight_ih_l2_reverse"] == (6, 12)
    assert shapes["weight_hh_l2_reverse"] == (6, 6)
    assert shapes["bias_hh_l1"] == (6,)
    assert len(shapes) == 3 * 2 * 4
    assert rnn_ext.RNN(3, 5, 2, bias=False)._flat_weights_names == [
        "weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    assert m.all_weights[1][0] is m.weight_ih_l0_reverse
    assert m.all_weights[2][0] is m.weight_ih_l1


def test_initialisation_distribution():
    """reset_parameters: U(-1/sqrt(H), 1/sqrt(H)) for every parameter in parameters() order."""
    torch.manual_seed(11)
    m = rnn_ext.RNN(7, 9, 2, bidirectional=True)
    torch.manual_seed(11)
    s = 1 / math.sqrt(9)
    for p in m.parameters():
        assert torch.equal(p.detach(), torch.empty(p.shape).uniform_(-s, s))


def test_repr_examples():
    assert repr(rnn_ext.RNN(10, 20)) == "RNN(10, 20)"
    assert repr(rnn_ext.RNN(10, 20, num_layers=2, dropout=0.5)) == \
        "RNN(10, 20, num_layers=2, dropout=0.5)"
    assert repr(rnn_ext.RNN(10, 20, num_layers=3, bias=False, batch_first=True, dropout=0.1,
                            bidirectional=True)) == (
        "RNN(10, 20, num_layers=3, bias=False, batch_first=True, dropout=0.1, bidirectional=True)")
    assert repr(rnn_ext.RNN(10, 20, nonlinearity="relu")) == "RNN(10, 20)"
    assert repr(rnn_ext.RNN(True, 5)) == "RNN(True, 5)"


def test_nonlinearity_attribute():
    """test_RNN_nonlinearity and test_RNN_nonlinearity_passed_as_arg."""
    assert rnn_ext.RNN(1, 10).nonlinearity == "tanh"
    assert rnn_ext.RNN(1, 10, nonlinearity="relu").nonlinearity == "relu"
    assert rnn_ext.RNN(2, 3, 1, "relu").nonlinearity == "relu"
    assert rnn_ext.RNN(2, 3, 1, "relu").mode == "RNN_RELU"
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        rnn_ext.RNN(1, 10, nonlinearity="garbage")


@pytest.mark.parametrize("kwargs", [dict(num_layers=2), dict(num_layers=3, bidirectional=True,
                                                             bias=False)])
def test_state_dict_both_ways(kwargs):
    ref = torch.nn.RNN(3, 5, **kwargs)
    ext = rnn_ext.RNN(3, 5, **kwargs)
    ext.load_state_dict(ref.state_dict())
    for (n, p), (_, q) in zip(ext.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    ext2 = rnn_ext.RNN(3, 5, **kwargs)
    ref2 = torch.nn.RNN(3, 5, **kwargs)
    ref2.load_state_dict(ext2.state_dict())
    for (n, p), (_, q) in zip(ext2.named_parameters(), ref2.named_parameters()):
        assert torch.equal(p, q), n
    x = torch.randn(4, 2, 3)
    o1, h1 = ext(x)
    o2, h2 = ref(x)
    torch.testing.assert_close(o1, o2, **TOL[torch.float32])
    torch.testing.assert_close(h1, h2, **TOL[torch.float32])


def test_relu_state_dict_loads_into_tanh():
    ext = rnn_ext.RNN(3, 5, nonlinearity="tanh")
    ext.load_state_dict(torch.nn.RNN(3, 5, nonlinearity="relu").state_dict())
    assert ext.nonlinearity == "tanh"


def test_load_state_dict_wrong_layer_count_message():
    ext = rnn_ext.RNN(3, 5, num_layers=2)
    ref = torch.nn.RNN(3, 5, num_layers=2)
    sd = rnn_ext.RNN(3, 5, num_layers=1).state_dict()
    with pytest.raises(RuntimeError) as e_ref:
        ref.load_state_dict(sd)
    with pytest.raises(RuntimeError) as e_ext:
        ext.load_state_dict(sd)
    assert str(e_ext.value) == str(e_ref.value)
    assert "Error(s) in loading state_dict for RNN" in str(e_ext.value)


def test_load_state_dict_keeps_flat_weights_in_sync():
    ext = rnn_ext.RNN(3, 5)
    ref = torch.nn.RNN(3, 5)
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 3)
    torch.testing.assert_close(ext(x)[0], ref(x)[0], **TOL[torch.float32])


def test_reassigning_a_weight_is_used():
    """__setattr__ keeps _flat_weights in sync: assigning a new Parameter changes the output."""
    ref, ext = make_pair(3, 5, num_layers=2)
    w = torch.nn.Parameter(torch.randn(5, 5))
    ref.weight_hh_l1 = w
    ext.weight_hh_l1 = w
    x = torch.randn(4, 2, 3)
    assert_matches_torch(ref, ext, x, dtype=torch.float32)
    assert ext._flat_weights[ext._flat_weights_names.index("weight_hh_l1")] is w


def test_in_place_weight_update_is_used():
    ref, ext = make_pair(3, 5, num_layers=2)
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        for m in (ref, ext):
            m.weight_ih_l0.mul_(2.0)
            m.bias_hh_l1.add_(0.3)
    assert_matches_torch(ref, ext, x, dtype=torch.float32)


def test_optimizer_step_matches_torch():
    ref, ext = make_pair(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ext)]
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    for _ in range(3):
        for m, opt in zip((ref, ext), opts):
            opt.zero_grad()
            o, h = m(x)
            (o.pow(2).sum() + h.sum()).backward()
            opt.step()
    for (n, p), (_, q) in zip(ref.named_parameters(), ext.named_parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float64], msg=n)


# --- convert_rnns -------------------------------------------------------------------------


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(4, 3)
        self.rnn = torch.nn.RNN(3, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.inner = torch.nn.Sequential(torch.nn.RNN(10, 4, nonlinearity="relu", bias=False),
                                         torch.nn.Identity())
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        y, _ = self.rnn(self.emb(x))
        y, h = self.inner[0](y.transpose(0, 1))
        return self.head(y), h


def test_convert_rnns_nested():
    torch.manual_seed(5)
    net = Net().double()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    ref_out = net(x)
    ref_params = dict(net.named_parameters())
    old_rnn, old_inner = net.rnn, net.inner[0]
    net.eval()
    converted = rnn_ext.convert_rnns(net)
    assert converted is net
    assert type(net.rnn) is rnn_ext.RNN and type(net.inner[0]) is rnn_ext.RNN
    assert net.rnn is not old_rnn and net.inner[0] is not old_inner
    assert not net.rnn.training and not net.inner[0].training  # training flag kept
    assert net.inner[0].nonlinearity == "relu" and net.inner[0].bias is False
    assert net.rnn.batch_first is True and net.rnn.bidirectional is True
    # same Parameter objects, same names
    new_params = dict(net.named_parameters())
    assert new_params.keys() == ref_params.keys()
    for k in ref_params:
        assert new_params[k] is ref_params[k], k
    assert repr(net.rnn) == repr(old_rnn)
    out = net(x)
    torch.testing.assert_close(out[0], ref_out[0], **TOL[torch.float64])
    torch.testing.assert_close(out[1], ref_out[1], **TOL[torch.float64])
    # gradients flow into the very same Parameter objects
    out[0].sum().backward()
    assert ref_params["rnn.weight_hh_l1_reverse"].grad is not None


def test_convert_rnns_on_an_rnn_returns_replacement():
    torch.manual_seed(0)
    rnn = torch.nn.RNN(3, 5, num_layers=2, dropout=0.2)
    rnn.eval()
    new = rnn_ext.convert_rnns(rnn)
    assert type(new) is rnn_ext.RNN
    assert new.training is False and new.dropout == 0.2
    for (n, p), (m, q) in zip(new.named_parameters(), rnn.named_parameters()):
        assert n == m and p is q
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(new(x)[0], rnn(x)[0], **TOL[torch.float32])
    # a module that has no RNN is returned unchanged; an rnn_ext.RNN is returned as is
    lin = torch.nn.Linear(2, 2)
    assert rnn_ext.convert_rnns(lin) is lin
    e = rnn_ext.RNN(3, 5)
    assert rnn_ext.convert_rnns(e) is e


def test_convert_rnns_training_true_kept():
    rnn = torch.nn.RNN(3, 5)
    assert rnn_ext.convert_rnns(rnn).training is True


def test_convert_rnns_optimizer_keeps_working():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.RNN(3, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net = rnn_ext.convert_rnns(net)
    before = net[0].weight_ih_l0.detach().clone()
    net[0](torch.randn(3, 2, 3))[0].sum().backward()
    opt.step()
    assert not torch.equal(before, net[0].weight_ih_l0.detach())


# --- copies, devices, dtypes, transforms ----------------------------------------------------


def _outputs_equal(a, b, x):
    oa, ha = a(x)
    ob, hb = b(x)
    assert torch.equal(oa, ob) and torch.equal(ha, hb)


def test_pickle_deepcopy_save():
    m = rnn_ext.RNN(3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 3)
    _outputs_equal(m, copy.deepcopy(m), x)
    _outputs_equal(m, pickle.loads(pickle.dumps(m)), x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is rnn_ext.RNN
    assert loaded.flatten_parameters() is None
    _outputs_equal(m, loaded, x)


@pytest.mark.parametrize("how", ["kwarg", "context"])
def test_meta_device_construction(how):
    if how == "kwarg":
        m = rnn_ext.RNN(3, 5, 2, bidirectional=True, device="meta")
    else:
        with torch.device("meta"):
            m = rnn_ext.RNN(3, 5, 2, bidirectional=True)
    cpu = rnn_ext.RNN(3, 5, 2, bidirectional=True)
    for (n, p), (_, q) in zip(m.named_parameters(), cpu.named_parameters()):
        assert p.device.type == "meta" and p.shape == q.shape and p.dtype == q.dtype, n
    o, h = m(torch.randn(4, 2, 3, device="meta"))
    assert o.device.type == "meta" and o.shape == (4, 2, 10) and h.shape == (4, 2, 5)


def test_factory_kwargs_and_to():
    m = rnn_ext.RNN(3, 5, 2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    m.float()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert all(w.dtype == torch.float32 for w in m._flat_weights)
    o, h = m(torch.randn(4, 2, 3))
    assert o.dtype == torch.float32
    m.to(torch.float64)
    o, h = m(torch.randn(4, 2, 3, dtype=torch.float64))
    assert o.dtype == h.dtype == torch.float64


def test_functional_call_uses_given_params():
    ref, ext = make_pair(3, 5, num_layers=2, dtype=torch.float64)
    params = {k: torch.randn_like(v) for k, v in ext.named_parameters()}
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    o1, h1 = torch.func.functional_call(ext, params, (x,))
    o2, h2 = torch.func.functional_call(ref, params, (x,))
    torch.testing.assert_close(o1, o2, **TOL[torch.float64])
    torch.testing.assert_close(h1, h2, **TOL[torch.float64])
    # and the module's own parameters are used again afterwards
    torch.testing.assert_close(ext(x)[0], ref(x)[0], **TOL[torch.float64])


def test_weight_norm_parametrization():
    ref, ext = make_pair(3, 5, num_layers=2, dtype=torch.float64)
    for m in (ref, ext):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
        with torch.no_grad():
            m.parametrizations.weight_hh_l0.original0.mul_(1.7)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert_matches_torch(ref, ext, x, dtype=torch.float64)


def test_train_eval_differ_attribute():
    """test_if_train_and_eval_modes_differ: forward reads self.training."""
    m = rnn_ext.RNN(3, 5, 2, dropout=0.5)
    delattr(m, "training")
    with pytest.raises(AttributeError, match="'training'"):
        m(torch.randn(4, 2, 3))


def test_forward_keyword_arguments():
    ref, ext = make_pair(3, 5, num_layers=2)
    x = torch.randn(4, 2, 3)
    hx = torch.randn(2, 2, 5)
    o1, h1 = ext(input=x, hx=hx)
    o2, h2 = ref(input=x, hx=hx)
    torch.testing.assert_close(o1, o2, **TOL[torch.float32])
    torch.testing.assert_close(h1, h2, **TOL[torch.float32])


def test_hooks_run():
    ext = rnn_ext.RNN(3, 5)
    seen = []
    ext.register_forward_hook(lambda m, i, o: seen.append(o[0].shape))
    ext(torch.randn(4, 2, 3))
    assert seen == [torch.Size([4, 2, 5])]


def test_backend_info():
    info = rnn_ext.backend_info()
    assert info["version"] == rnn_ext.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["cpu_direct_blas"], bool)


def test_overridden_check_forward_args_is_called():
    """forward inlines RNNBase.check_forward_args for dense input; a subclass that overrides
    it (as one may with torch.nn.RNN) still has its own check run, for dense and packed input."""
    calls = []

    class Checked(rnn_ext.RNN):
        def check_forward_args(self, input, hidden, batch_sizes):
            calls.append(batch_sizes is None)
            if input.shape[-1] == 99:
                raise RuntimeError("custom check")
            super().check_forward_args(input, hidden, batch_sizes)

    m = Checked(3, 4)
    m(torch.randn(5, 2, 3))
    with pytest.raises(RuntimeError, match="custom check"):
        m.input_size = 99
        m(torch.randn(5, 2, 99))
    m.input_size = 3
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    m(packed)
    assert calls == [True, True, False]
    # and the inlined checks keep torch's exception types and messages
    ref, ext = torch.nn.RNN(3, 4), rnn_ext.RNN(3, 4)
    for x, h in ((torch.randn(5, 2, 3, dtype=torch.float64), None),
                 (torch.randn(5, 2, 7), None),
                 (torch.randn(5, 2, 3), torch.randn(1, 3, 4))):
        with pytest.raises(Exception) as want:
            ref(x, h)
        with pytest.raises(type(want.value)) as got:
            ext(x, h)
        assert str(got.value) == str(want.value)


def test_convert_rnns_hook_handles_still_remove():
    """A handle returned by a registration on the torch.nn.RNN before convert_rnns removes the
    hook from the replacement, as it would have from the original (every kind of handle:
    forward with kwargs and always_call keep extra dicts)."""
    calls = []
    rnn = torch.nn.RNN(3, 4)
    handles = [
        rnn.register_forward_pre_hook(lambda m, args: calls.append("pre")),
        rnn.register_forward_hook(lambda m, args, kwargs, out: calls.append("fwd_kw"),
                                  with_kwargs=True),
        rnn.register_forward_hook(lambda m, args, out: calls.append("always"), always_call=True),
        rnn.register_full_backward_hook(lambda m, gin, gout: calls.append("bwd")),
        rnn.register_state_dict_post_hook(lambda m, sd, prefix, local: calls.append("sd")),
    ]
    ext = rnn_ext.convert_rnns(rnn)
    x = torch.randn(2, 1, 3, requires_grad=True)
    ext(x)[0].sum().backward()
    ext.state_dict()
    assert sorted(calls) == ["always", "bwd", "fwd_kw", "pre", "sd"]
    for h in handles:
        h.remove()
    calls.clear()
    ext(x)[0].sum().backward()
    ext.state_dict()
    assert calls == []
    assert not ext._forward_hooks_with_kwargs and not ext._forward_hooks_always_called


def test_convert_rnns_keeps_every_hook():
    """Hooks registered on the torch.nn.RNN before conversion run on the replacement, with the
    same arguments: forward pre/post hooks (with and without kwargs, always_call), module
    backward pre/post hooks, state_dict pre/post hooks and load_state_dict pre/post hooks; and the
    hooked replacement computes what the hooked torch module computes."""
    torch.manual_seed(0)
    calls = []
    rnn = torch.nn.RNN(3, 4, num_layers=2, bidirectional=True).double()
    rnn.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    rnn.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(("pre_kw", tuple(sorted(kwargs)))), with_kwargs=True)
    rnn.register_forward_hook(lambda m, args, out: calls.append("fwd"))
    rnn.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(("fwd_kw", tuple(sorted(kwargs)))), with_kwargs=True)
    rnn.register_forward_hook(lambda m, args, out: calls.append("always"), always_call=True)
    # a hook may replace the output: the replacement must apply it too
    rnn.register_forward_hook(lambda m, args, out: (out[0] * 2, out[1]))
    rnn.register_full_backward_pre_hook(lambda m, gout: calls.append("bwd_pre"))
    rnn.register_full_backward_hook(lambda m, gin, gout: calls.append("bwd"))
    rnn.register_state_dict_pre_hook(lambda m, prefix, keep_vars: calls.append("sd_pre"))
    rnn.register_state_dict_post_hook(lambda m, sd, prefix, local: calls.append("sd_post"))
    rnn._register_load_state_dict_pre_hook(lambda *a: calls.append("load_pre"))
    rnn.register_load_state_dict_post_hook(lambda m, keys: calls.append("load_post"))
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)

    def use(m):
        calls.clear()
        out, hn = m(x, hx=torch.zeros(4, 2, 4, dtype=torch.float64))
        (out.sum() + hn.sum()).backward()
        sd = m.state_dict()
        m.load_state_dict(sd)
        return list(calls), out.detach()

    want_calls, want_out = use(rnn)
    assert {"pre", "fwd", "always", "bwd_pre", "bwd", "sd_pre", "sd_post", "load_pre",
            "load_post", ("pre_kw", ("hx",)), ("fwd_kw", ("hx",))} <= set(want_calls)
    ext = rnn_ext.convert_rnns(rnn)
    assert isinstance(ext, rnn_ext.RNN)
    got_calls, got_out = use(ext)
    assert got_calls == want_calls
    torch.testing.assert_close(got_out, want_out, **TOL[torch.float64])
    # and nested in a model
    calls.clear()
    net = rnn_ext.convert_rnns(torch.nn.Sequential(torch.nn.Linear(3, 3).double(), rnn))
    assert calls == []
