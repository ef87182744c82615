"""Dropout between layers: training only, drawn from torch's CPU generator exactly as
torch.nn.RNN draws it (bitwise-equal outputs with the same seed and weights), re-read from
self.dropout at each call, no RNG use in eval."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from conftest import TOL, make_pair


def run_seeded(m, x, hx=None, seed=123, backward=False):
    torch.manual_seed(seed)
    xi = x if hasattr(x, "batch_sizes") else x.detach().clone().requires_grad_(backward)
    out, h = m(xi, hx)
    data = out.data if hasattr(out, "batch_sizes") else out
    state_after = torch.get_rng_state()
    grads = None
    if backward:
        for p in m.parameters():
            p.grad = None
        g = torch.Generator().manual_seed(7)
        torch.autograd.backward([data, h], [torch.randn(data.shape, generator=g,
                                                        dtype=data.dtype),
                                            torch.randn(h.shape, generator=g, dtype=h.dtype)])
        grads = [xi.grad] + [p.grad.clone() for p in m.parameters()]
    return data, h, state_after, grads


@pytest.mark.parametrize("layers,bidir,p,batch_first", [
    (2, False, 0.3, False), (3, True, 0.5, False), (2, True, 0.9, True), (3, False, 0.1, True),
])
def test_dropout_bitwise_equal_to_torch(layers, bidir, p, batch_first):
    """Same seed, same weights: the same mask, hence bitwise-equal output (in float64 the
    arithmetic differs only by rounding, so compare the zero pattern exactly and values tightly);
    the RNG is left in the same state; gradients agree."""
    ref, ext = make_pair(4, 6, num_layers=layers, bidirectional=bidir, dropout=p,
                         batch_first=batch_first, dtype=torch.float64)
    x = torch.randn((3, 5, 4) if batch_first else (5, 3, 4), dtype=torch.float64)
    ro, rh, rstate, rg = run_seeded(ref, x, backward=True)
    eo, eh, estate, eg = run_seeded(ext, x, backward=True)
    assert torch.equal(rstate, estate), "rnn_ext consumed the RNG differently from torch"
    torch.testing.assert_close(eo, ro, **TOL[torch.float64])
    torch.testing.assert_close(eh, rh, **TOL[torch.float64])
    for a, b in zip(rg, eg):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


def test_dropout_mask_identical_float32():
    """With all-ones input weights, zero recurrent weights and relu, every output is a plain sum
    of the surviving (scaled) inputs, so a different mask changes it by a whole term: in float32
    the values agree to rounding (sums of the same terms, perhaps in another order)."""
    ref, ext = make_pair(2, 8, num_layers=2, dropout=0.5, nonlinearity="relu", bias=False)
    with torch.no_grad():
        for m in (ref, ext):
            for n, w in m.named_parameters():
                w.fill_(1.0 if "ih" in n else 0.0)
    x = torch.rand(6, 4, 2)
    ro, rh, _, _ = run_seeded(ref, x)
    eo, eh, _, _ = run_seeded(ext, x)
    assert torch.equal(eo == 0, ro == 0) and torch.equal(eh == 0, rh == 0)
    torch.testing.assert_close(eo, ro, rtol=1e-6, atol=0)
    torch.testing.assert_close(eh, rh, rtol=1e-6, atol=0)


def test_dropout_packed_matches_torch():
    ref, ext = make_pair(3, 4, num_layers=2, bidirectional=True, dropout=0.4,
                         dtype=torch.float64)
    x = pack_padded_sequence(torch.randn(5, 3, 3, dtype=torch.float64), torch.tensor([2, 5, 3]),
                             enforce_sorted=False)
    ro, rh, rs, _ = run_seeded(ref, x)
    eo, eh, es, _ = run_seeded(ext, x)
    assert torch.equal(rs, es)
    torch.testing.assert_close(eo, ro, **TOL[torch.float64])
    torch.testing.assert_close(eh, rh, **TOL[torch.float64])


def test_manual_seed_reproduces_and_calls_differ():
    """test_RNN_dropout_state: in training with p > 0 consecutive calls differ, the same seed
    reproduces the output."""
    _, ext = make_pair(3, 20, num_layers=2, dropout=0.5)
    x = torch.randn(4, 3, 3)
    torch.manual_seed(5)
    a, _ = ext(x)
    b, _ = ext(x)
    torch.manual_seed(5)
    c, _ = ext(x)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


@pytest.mark.parametrize("p", [0.0, 0.1234])
def test_dropout_state_across_save_load(p, tmp_path):
    _, ext = make_pair(3, 20, num_layers=2, dropout=p)
    x = torch.randn(4, 3, 3)
    a, _ = ext(x)
    torch.save(ext, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    loaded.flatten_parameters()
    b, _ = loaded(x)
    assert torch.equal(a, b) == (p == 0)


def test_change_dropout_is_reread():
    """test_RNN_change_dropout: rnn.dropout is re-read on every call."""
    ref, ext = make_pair(3, 20, num_layers=2)
    x = torch.randn(4, 3, 3)
    for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
        for train in (True, False):
            outs = []
            for m in (ref, ext):
                m.dropout = p
                m.train(train)
                o1 = run_seeded(m, x, seed=9)[0]
                o2 = run_seeded(m, x, seed=10)[0]
                outs.append((o1, o2))
                if train and 0 < p < 1:
                    assert not torch.equal(o1, o2), (p, train)
                else:
                    assert torch.equal(o1, o2), (p, train)
            torch.testing.assert_close(outs[1][0], outs[0][0], **TOL[torch.float32])
    # eval mode: the output does not depend on p
    ext.eval()
    ext.dropout = 0.0
    e0 = ext(x)[0]
    ext.dropout = 0.7
    assert torch.equal(ext(x)[0], e0)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("train", [True, False])
def test_RNN_dropout_like_pytorch(p, train):
    """test_RNN_dropout: RNN(10, 1000, 2, bias=False, relu), all weights 1, input ones(1,1,10)."""
    rnn = rnn_ext.RNN(10, 1000, 2, bias=False, dropout=p, nonlinearity="relu")
    with torch.no_grad():
        for w in rnn.parameters():
            w.fill_(1.0)
    rnn.train(train)
    x = torch.ones(1, 1, 10)
    hx = torch.zeros(2, 1, 1000)
    torch.manual_seed(0)
    output, hy = rnn(x, hx)
    assert output.min() == output.max()
    value = output[0, 0, 0].item()
    if p == 0 or not train:
        assert value == 10000
    elif p == 1:
        assert value == 0
    else:
        assert 8000 < value < 12000
        denorm_mod = (value * (1 - p)) % 10
        assert min(denorm_mod, 10 - denorm_mod) < 1e-2  # as PyTorch's test
        ref = torch.nn.RNN(10, 1000, 2, bias=False, dropout=p, nonlinearity="relu")
        ref.load_state_dict(rnn.state_dict())
        torch.manual_seed(0)
        assert torch.equal(ref(x, hx)[0], output)
    assert hy[0].min() == hy[0].max() == 10
    assert hy[1].min() == hy[1].max() == value


def test_p1_zeros_after_layer0():
    """p=1: layer 1 reads zeros, so with no bias its output and h_n are exactly 0 (hx=0), while
    layer 0's h_n is untouched."""
    ref, ext = make_pair(3, 5, num_layers=2, dropout=1.0, bias=False)
    x = torch.randn(4, 2, 3)
    o, h = ext(x)
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.equal(h[1], torch.zeros_like(h[1]))
    ro, rh = ref(x)
    torch.testing.assert_close(h[0], rh[0], **TOL[torch.float32])


def test_eval_has_no_dropout_and_does_not_touch_rng():
    ref, ext = make_pair(3, 5, num_layers=3, dropout=0.5, bidirectional=True)
    ref.eval()
    ext.eval()
    x = torch.randn(4, 2, 3)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    o, h = ext(x)
    assert torch.equal(torch.get_rng_state(), state)
    ro, rh = ref(x)
    torch.testing.assert_close(o, ro, **TOL[torch.float32])
    torch.testing.assert_close(h, rh, **TOL[torch.float32])


@pytest.mark.parametrize("layers,p", [(1, 0.9), (2, 0.0)])
def test_no_rng_use_without_dropout_in_training(layers, p):
    """num_layers=1 (only the constructor warning) or p=0: no dropout, RNG untouched."""
    with pytest.warns(UserWarning) if layers == 1 else _nullcontext():
        ref, ext = make_pair(3, 5, num_layers=layers, dropout=p)
    x = torch.randn(4, 2, 3)
    state = torch.get_rng_state()
    o, _ = ext(x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(o, ref(x)[0], **TOL[torch.float32])


def test_no_grad_training_dropout_matches_torch():
    """Under no_grad (nothing saved for backward) the dropout draw is still torch's."""
    ref, ext = make_pair(3, 5, num_layers=2, dropout=0.5)
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        ro = run_seeded(ref, x)
        eo = run_seeded(ext, x)
    assert torch.equal(ro[2], eo[2])
    torch.testing.assert_close(eo[0], ro[0], **TOL[torch.float32])


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
