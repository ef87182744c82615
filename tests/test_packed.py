"""PackedSequence input: sorted and unsorted, uni- and bidirectional, with and without hx."""
import pytest
import torch
from torch.nn.utils.rnn import (
    PackedSequence, pack_padded_sequence, pack_sequence, pad_packed_sequence,
)

from conftest import TOL, ReferenceModule, assert_matches_torch, assert_same_results, \
    forward_backward, make_pair

LENGTHS = {
    "sorted": ([6, 4, 4, 2, 1], True),
    "unsorted": ([2, 6, 1, 4, 3], False),
    "unsorted_ties": ([3, 5, 5, 1, 3, 2], False),
    "single": ([4], True),
    "all_equal_unsorted": ([3, 3, 3], False),
}


def make_packed(lengths, enforce_sorted, I, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(lengths), len(lengths), I, generator=g, dtype=torch.float64).to(dtype)
    p = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    return PackedSequence(p.data.requires_grad_(), p.batch_sizes, p.sorted_indices,
                          p.unsorted_indices)


CASES = [
    (name, bidir, relu, layers, with_hx)
    for name in LENGTHS
    for bidir, relu, layers, with_hx in [
        (False, False, 1, False), (True, False, 2, True), (True, True, 3, False),
        (False, True, 2, True),
    ]
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name,bidir,relu,layers,with_hx", CASES)
def test_packed_matches_torch_and_reference(name, bidir, relu, layers, with_hx, dtype):
    lengths, enforce_sorted = LENGTHS[name]
    ref, ext = make_pair(3, 4, num_layers=layers, bidirectional=bidir,
                         nonlinearity="relu" if relu else "tanh", dtype=dtype)
    x = make_packed(lengths, enforce_sorted, 3, dtype)
    hx = None
    if with_hx:
        hx = torch.randn(layers * (2 if bidir else 1), len(lengths), 4, dtype=dtype,
                         requires_grad=True)
    _, got = assert_matches_torch(ref, ext, x, hx, dtype=dtype)
    if dtype == torch.float64:
        oracle = forward_backward(ReferenceModule(ext), x, hx)
        assert_same_results(oracle, got, dtype=dtype)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_output_keeps_index_objects(enforce_sorted):
    _, ext = make_pair(3, 4, num_layers=2, bidirectional=True)
    lengths = [5, 3, 2] if enforce_sorted else [2, 5, 3]
    x = make_packed(lengths, enforce_sorted, 3, torch.float32)
    out, h = ext(x)
    assert isinstance(out, PackedSequence)
    assert out.batch_sizes is x.batch_sizes
    assert out.sorted_indices is x.sorted_indices
    assert out.unsorted_indices is x.unsorted_indices
    if enforce_sorted:
        assert out.sorted_indices is None and out.unsorted_indices is None
    assert out.data.shape == (sum(lengths), 8)
    assert h.shape == (4, 3, 4)


@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_each_sequence_equals_independent_run(bidir, enforce_sorted):
    """Per-sequence correctness: output and h_n of each sequence (h_n in the caller's order)
    equal a run on that sequence alone; the reverse direction starts at the sequence's own last
    step; padding from pad_packed_sequence is 0."""
    _, ext = make_pair(3, 4, num_layers=2, bidirectional=bidir, dtype=torch.float64)
    lengths = [5, 3, 2, 1] if enforce_sorted else [2, 5, 1, 3]
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in lengths]
    D = 2 if bidir else 1
    hx = torch.randn(2 * D, len(seqs), 4, dtype=torch.float64)
    packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    out, h = ext(packed, hx)
    padded, out_lengths = pad_packed_sequence(out)
    assert out_lengths.tolist() == lengths
    for b, s in enumerate(seqs):
        o_b, h_b = ext(s.unsqueeze(1), hx[:, b : b + 1].contiguous())
        torch.testing.assert_close(padded[: lengths[b], b], o_b[:, 0], **TOL[torch.float64])
        torch.testing.assert_close(h[:, b], h_b[:, 0], **TOL[torch.float64])
        assert torch.all(padded[lengths[b]:, b] == 0)


def test_batch_first_has_no_effect_on_packed():
    _, a = make_pair(3, 4, num_layers=2, batch_first=False)
    _, b = make_pair(3, 4, num_layers=2, batch_first=True)
    x = make_packed([4, 2, 1], True, 3, torch.float32)
    oa, ha = a(x)
    ob, hb = b(x)
    assert torch.equal(oa.data, ob.data) and torch.equal(ha, hb)


def test_packed_batch_sizes_and_hx_permutation():
    """A user-supplied hx is in the caller's order: permuting the batch permutes h_n the same."""
    _, ext = make_pair(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (2, 5, 3)]
    hx = torch.randn(4, 3, 4, dtype=torch.float64)
    perm = [2, 0, 1]
    _, h1 = ext(pack_sequence(seqs, enforce_sorted=False), hx)
    _, h2 = ext(pack_sequence([seqs[i] for i in perm], enforce_sorted=False), hx[:, perm])
    torch.testing.assert_close(h1[:, perm], h2, **TOL[torch.float64])


def test_hand_built_packed_with_zero_length_entries():
    """Hand-built PackedSequence(randn(5,3), [2,2,1,0]) runs (h_n batch 2), and an empty one
    gives data (0, H) and h_n (L, 0, H), as torch."""
    ref, ext = make_pair(3, 5, num_layers=2, dtype=torch.float64)
    data = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    x = PackedSequence(data, torch.tensor([2, 2, 1, 0]))
    _, got = assert_matches_torch(ref, ext, x, dtype=torch.float64)
    assert got[1].shape == (2, 2, 5)
    empty = PackedSequence(torch.randn(0, 3, dtype=torch.float64), torch.tensor([0]))
    o, h = ext(empty)
    ro, rh = ref(empty)
    assert o.data.shape == ro.data.shape == (0, 5)
    assert h.shape == rh.shape == (2, 0, 5)


def test_packed_backward_through_data_and_unsorted_grads():
    """Gradients reach the padded tensor through pack_padded_sequence (unsorted)."""
    ref, ext = make_pair(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([3, 5, 2])
    grads = []
    for m in (ref, ext):
        xi = x.clone().requires_grad_()
        out, h = m(pack_padded_sequence(xi, lengths, enforce_sorted=False))
        padded, _ = pad_packed_sequence(out)
        (padded.pow(2).sum() + h.sum()).backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOL[torch.float64])
    assert torch.all(grads[1][3:, 2] == 0)  # past the end of sequence 2


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_packed_under_no_grad(mode):
    _, ext = make_pair(3, 4, num_layers=2)
    x = make_packed([3, 1, 2], False, 3, torch.float32)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        out, h = ext(x)
    assert not out.data.requires_grad
    if mode == "inference_mode":
        assert out.data.is_inference() and h.is_inference()
