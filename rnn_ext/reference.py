"""The plain-PyTorch statement of what rnn_ext computes: the oracle of the tests.

This is the walkthrough's manual loop (``../shared/seed``) generalised to every option of
``torch.nn.RNN``: layers, two directions, tanh or relu, with or without biases, batch_first,
unbatched input, per-sequence lengths (PackedSequence) and dropout between layers.  It is
written to be read, not to be fast: one small matrix product per sequence, layer, direction and
time step.  Everything in it is differentiable, so it also serves as the double-backward path.

    h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)

Layer l > 0 reads the concatenation [forward, reverse] of layer l-1's outputs (after dropout,
in training).  The reverse direction of a sequence starts at that sequence's own last step.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

__all__ = ["rnn", "rnn_packed_data", "module_forward"]


def _cell(x_t: Tensor, h: Tensor, w: Sequence[Tensor], relu: bool) -> Tensor:
    w_ih, w_hh = w[0], w[1]
    z = x_t @ w_ih.T + h @ w_hh.T
    if len(w) == 4:
        z = z + w[2] + w[3]
    return torch.relu(z) if relu else torch.tanh(z)


def rnn(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    *,
    num_layers: int,
    bidirectional: bool = False,
    relu: bool = False,
    lengths: Optional[Sequence[int]] = None,
    dropout_masks: Optional[Sequence[Tensor]] = None,
) -> tuple[Tensor, Tensor]:
    """Runs a stacked RNN over a padded, sequence-first input.

    input: (T, B, I); hx: (num_layers * D, B, H); weights: torch.nn.RNN's ``_flat_weights``
    order (w_ih, w_hh[, b_ih, b_hh] for each layer, then direction).
    lengths: the length of each batch entry (default: all T).  Steps past a sequence's length
    are neither computed nor output (the output there is 0) and h_n is taken at its last step.
    dropout_masks: for each layer but the last, a (T, B, D*H) tensor multiplied onto that
    layer's output before the next layer reads it (torch's dropout: 0 or 1/(1-p)).
    Returns output (T, B, D*H) and h_n (num_layers * D, B, H).
    """
    T, B, _ = input.shape
    D = 2 if bidirectional else 1
    per_cell = len(weights) // (num_layers * D)
    lengths = [T] * B if lengths is None else [int(n) for n in lengths]
    layer_input = input
    h_n = []
    for layer in range(num_layers):
        outputs = []
        for d in range(D):
            k = (layer * D + d) * per_cell
            w = weights[k : k + per_cell]
            H = w[1].shape[0]
            if B == 0:
                outputs.append(layer_input.new_zeros(T, 0, H))
                h_n.append(hx[layer * D + d])
                continue
            if all(n == T for n in lengths):
                # Every sequence is full length: the walkthrough's loop, one step at a time.
                h = hx[layer * D + d]
                column = [None] * T
                for t in range(T) if d == 0 else reversed(range(T)):
                    h = _cell(layer_input[t], h, w, relu)
                    column[t] = h
                outputs.append(torch.stack(column))
                h_n.append(h)
                continue
            columns, finals = [], []
            for b in range(B):  # sequences of their own lengths: each on its own
                h = hx[layer * D + d, b]
                column = [layer_input.new_zeros(H)] * T  # 0 past the sequence's end
                steps = range(lengths[b]) if d == 0 else reversed(range(lengths[b]))
                for t in steps:
                    h = _cell(layer_input[t, b], h, w, relu)
                    column[t] = h
                columns.append(torch.stack(column))
                finals.append(h)
            outputs.append(torch.stack(columns, dim=1))
            h_n.append(torch.stack(finals))
        layer_output = torch.cat(outputs, dim=2)
        if layer < num_layers - 1 and dropout_masks is not None:
            layer_output = layer_output * dropout_masks[layer]
        layer_input = layer_output
    return layer_output, torch.stack(h_n)


def _pad(data: Tensor, batch_sizes: Tensor) -> tuple[Tensor, list[int]]:
    """Packed (N, F) data to (T, B, F), zero-padded, and each entry's length."""
    sizes = [int(n) for n in batch_sizes]
    B = sizes[0] if sizes else 0
    steps, offset = [], 0
    for n in sizes:
        steps.append(torch.cat([data[offset : offset + n], data.new_zeros(B - n, data.shape[-1])]))
        offset += n
    padded = torch.stack(steps) if steps else data.new_zeros(0, B, data.shape[-1])
    lengths = [sum(1 for n in sizes if n > b) for b in range(B)]
    return padded, lengths


def _unpad(padded: Tensor, batch_sizes: Tensor) -> Tensor:
    return torch.cat([padded[t, : int(n)] for t, n in enumerate(batch_sizes)])


def rnn_packed_data(
    data: Tensor,
    batch_sizes: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    *,
    num_layers: int,
    bidirectional: bool = False,
    relu: bool = False,
    dropout_masks: Optional[Sequence[Tensor]] = None,
) -> tuple[Tensor, Tensor]:
    """The same on the data of a PackedSequence (rows grouped by time step, batch sorted by
    decreasing length); hx and h_n are in that sorted order; dropout masks are (N, D*H)."""
    padded, lengths = _pad(data, batch_sizes)
    masks = None
    if dropout_masks is not None:
        masks = [_pad(m, batch_sizes)[0] for m in dropout_masks]
    out, h_n = rnn(
        padded, hx, weights, num_layers=num_layers, bidirectional=bidirectional, relu=relu,
        lengths=lengths, dropout_masks=masks,
    )
    return _unpad(out, batch_sizes), h_n


def module_forward(module: torch.nn.RNNBase, input, hx: Optional[Tensor] = None):
    """What ``module(input, hx)`` returns, computed by the loops above, for a torch.nn.RNN or an
    rnn_ext.RNN in eval mode (or with dropout 0): same shapes, batch_first, unbatched and
    PackedSequence handling as torch.nn.RNN."""
    D = 2 if module.bidirectional else 1
    relu = module.nonlinearity == "relu"
    weights = [getattr(module, n) for n in module._flat_weights_names]
    kw = dict(num_layers=module.num_layers, bidirectional=bool(module.bidirectional), relu=relu)
    if isinstance(input, PackedSequence):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        B = int(batch_sizes[0])
        if hx is None:
            hx = data.new_zeros(module.num_layers * D, B, module.hidden_size)
        elif sorted_indices is not None:
            hx = hx.index_select(1, sorted_indices)
        out, h_n = rnn_packed_data(data, batch_sizes, hx, weights, **kw)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), h_n
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(1)
        hx = hx.unsqueeze(1) if hx is not None else None
    elif module.batch_first:
        input = input.transpose(0, 1)
    if hx is None:
        hx = input.new_zeros(module.num_layers * D, input.shape[1], module.hidden_size)
    out, h_n = rnn(input, hx, weights, **kw)
    if not batched:
        return out.squeeze(1), h_n.squeeze(1)
    if module.batch_first:
        out = out.transpose(0, 1)
    return out, h_n
