"""Shapes and layouts: seq-first, batch_first, unbatched input, non-contiguous input and hx,
batch size 0; hx never modified in place."""
import pytest
import torch

from conftest import TOL, assert_matches_torch, forward_backward, make_pair


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_shapes_and_dtype(batch_first, bidir, with_hx):
    ref, ext = make_pair(3, 5, num_layers=2, bidirectional=bidir, batch_first=batch_first)
    D = 2 if bidir else 1
    x = torch.randn((4, 7, 3) if batch_first else (7, 4, 3))
    hx = torch.randn(2 * D, 4, 5) if with_hx else None
    o, h = ext(x, hx)
    ro, rh = ref(x, hx)
    assert o.shape == ro.shape == ((4, 7, 5 * D) if batch_first else (7, 4, 5 * D))
    assert h.shape == rh.shape == (2 * D, 4, 5)
    assert o.dtype == h.dtype == torch.float32


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched(batch_first, bidir, with_hx):
    """Unbatched (L, H_in) input, hx (D*layers, H): equals torch, and equals the batched run
    with N=1 (batch_first is ignored for unbatched input)."""
    ref, ext = make_pair(3, 5, num_layers=2, bidirectional=bidir, batch_first=batch_first,
                         dtype=torch.float64)
    D = 2 if bidir else 1
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(2 * D, 5, dtype=torch.float64, requires_grad=True) if with_hx else None
    _, (o, h, _) = assert_matches_torch(ref, ext, x, hx, dtype=torch.float64)
    assert o.shape == (6, 5 * D) and h.shape == (2 * D, 5)
    xb = x.detach().unsqueeze(0 if batch_first else 1)
    ob, hb = ext(xb, None if hx is None else hx.detach().unsqueeze(1))
    torch.testing.assert_close(o, ob.squeeze(0 if batch_first else 1), **TOL[torch.float64])
    torch.testing.assert_close(h, hb.squeeze(1), **TOL[torch.float64])


def test_batch_first_output_like_torch():
    ref, ext = make_pair(3, 5, num_layers=2, batch_first=True)
    x = torch.randn(4, 7, 3)
    o, _ = ext(x)
    ro, _ = ref(x)
    assert o.shape == ro.shape
    torch.testing.assert_close(o, ro, **TOL[torch.float32])


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidir", [False, True])
def test_non_contiguous_input_and_hx(batch_first, bidir):
    """test_non_contiguous_tensors: strided/transposed input and hx give the same outputs and
    grads as torch (and as contiguous copies)."""
    ref, ext = make_pair(3, 5, num_layers=2, bidirectional=bidir, batch_first=batch_first,
                         dtype=torch.float64)
    D = 2 if bidir else 1
    base = torch.randn(7, 4, 6, dtype=torch.float64)
    x = base[..., ::2]  # stride 2 in the feature dim
    if batch_first:
        x = x.transpose(0, 1)  # (4, 7, 3) with non-standard strides
    assert not x.is_contiguous()
    hx = torch.randn(4, 2 * D, 5, dtype=torch.float64).transpose(0, 1)
    assert not hx.is_contiguous()
    # non-contiguous leaves: make them leaves that keep their strides
    x = x.detach().requires_grad_()
    hx = hx.detach().requires_grad_()
    _, got = assert_matches_torch(ref, ext, x, hx, dtype=torch.float64)
    contiguous = forward_backward(ext, x.contiguous(), hx.contiguous())
    torch.testing.assert_close(got[0], contiguous[0], **TOL[torch.float64])
    for k in got[2]:
        torch.testing.assert_close(got[2][k], contiguous[2][k], **TOL[torch.float64])


def test_repeat_interleave_non_contiguous_like_test_modules():
    """test_modules.test_non_contiguous_tensors builds inputs with repeat_interleave(2)[..., ::2]
    (here the leading dim)."""
    ref, ext = make_pair(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64).repeat_interleave(2, dim=0)[::2]
    x = x.detach().requires_grad_()
    assert not x.is_contiguous()
    assert_matches_torch(ref, ext, x, dtype=torch.float64)


def test_non_contiguous_weights():
    """A weight that is a non-contiguous view (here, a transposed Parameter) gives the same
    results as torch."""
    ref, ext = make_pair(4, 4, num_layers=2, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64).t())
    assert not w.is_contiguous()
    ref.weight_hh_l0 = w
    ext.weight_hh_l0 = w
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert_matches_torch(ref, ext, x, dtype=torch.float64)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidir", [False, True])
def test_batch_zero(batch_first, bidir):
    """Batch size 0: shapes as torch, backward works, input.grad has the input's shape and the
    weight grads exist and are zero."""
    ref, ext = make_pair(3, 5, num_layers=2, bidirectional=bidir, batch_first=batch_first)
    D = 2 if bidir else 1
    x = torch.randn((0, 7, 3) if batch_first else (7, 0, 3), requires_grad=True)
    res = []
    for m in (ref, ext):
        xi = x.detach().clone().requires_grad_()
        o, h = m(xi)
        (o.sum() + h.sum()).backward()
        res.append((o.shape, h.shape, xi.grad.shape,
                    [None if p.grad is None else p.grad.clone() for p in m.parameters()]))
        m.zero_grad()
    assert res[1][:3] == res[0][:3]
    assert res[1][0] == ((0, 7, 5 * D) if batch_first else (7, 0, 5 * D))
    assert res[1][1] == (2 * D, 0, 5)
    for a, b in zip(res[0][3], res[1][3]):
        assert (a is None) == (b is None)
        if b is not None:
            assert torch.equal(b, torch.zeros_like(b))


def test_batch_zero_with_hx_grad():
    _, ext = make_pair(3, 5, num_layers=2)
    hx = torch.zeros(2, 0, 5, requires_grad=True)
    o, h = ext(torch.randn(4, 0, 3), hx)
    h.sum().backward()
    assert hx.grad.shape == (2, 0, 5)


@pytest.mark.parametrize("bidir", [False, True])
def test_hx_not_modified_in_place(bidir):
    _, ext = make_pair(3, 5, num_layers=2, bidirectional=bidir)
    D = 2 if bidir else 1
    hx = torch.randn(2 * D, 4, 5)
    keep = hx.clone()
    x = torch.randn(6, 4, 3)
    o, h = ext(x, hx)
    h.sum().backward() if h.requires_grad else None
    assert torch.equal(hx, keep)
    assert hx._version == 0
    assert h.data_ptr() != hx.data_ptr()
    # nor the input
    xk = x.clone()
    ext(x)
    assert torch.equal(x, xk) and x._version == 0


def test_seq_len_one_and_sizes_one():
    ref, ext = make_pair(1, 1, num_layers=3, bidirectional=True, dtype=torch.float64)
    x = torch.randn(1, 1, 1, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(6, 1, 1, dtype=torch.float64, requires_grad=True)
    assert_matches_torch(ref, ext, x, hx, dtype=torch.float64)
