"""ONNX export of rnn_ext's op as ONNX's standard ``RNN`` operator, one node per layer, for
both of torch's exporters; importing rnn_ext is all it takes.

* ``torch.onnx.export(..., dynamo=True)``: ``ops.rnn`` calls :func:`rnn` below while the
  exporter traces the model (``torch.onnx.is_in_onnx_export()``); it emits each layer with
  ``torch.onnx.ops.symbolic_multi_out`` and does the layout changes with torch ops, so the batch
  size and the sequence length stay dynamic.
* ``torch.onnx.export(..., dynamo=False)`` (TorchScript): the trace records
  ``rnn_ext::rnn_forward``; the symbolic registered here hands it to torch's own lowering of
  ``aten::rnn_tanh``/``aten::rnn_relu`` (the one ``torch.nn.RNN`` exports with), whose arguments
  it shares, packed input (``sequence_lens``) included.
"""
from __future__ import annotations

import torch
import torch.onnx
from torch import Tensor

__all__ = ["rnn"]

_OPSET = 9  # the lowest opset the TorchScript exporter supports; its RNN lowering covers all


def rnn(input: Tensor, hx: Tensor, weights, batch_sizes, *, has_biases: bool, num_layers: int,
        bidirectional: bool, relu: bool) -> tuple[Tensor, Tensor]:
    """(output, h_n) of the stack as ONNX ``RNN`` nodes, for the dynamo exporter.  input is
    (seq, batch, feature).  Dropout is left out, as torch.nn.RNN's dynamo export leaves it out
    (in training mode too)."""
    if batch_sizes is not None:
        raise RuntimeError(
            "rnn_ext: torch.onnx.export(..., dynamo=True) does not support PackedSequence input "
            "(torch.nn.RNN's does not either); export with dynamo=False, which emits ONNX RNN "
            "with sequence_lens, or pass padded input")
    D = 2 if bidirectional else 1
    H = weights[1].shape[0]
    T, B = input.shape[0], input.shape[1]
    per = 4 if has_biases else 2  # weights per layer and direction: w_ih, w_hh[, b_ih, b_hh]
    attrs = {
        "hidden_size": int(H),
        "activations": ["Relu" if relu else "Tanh"] * D,
        "direction": "bidirectional" if bidirectional else "forward",
    }
    x, h_n = input, []
    for layer in range(num_layers):
        ws = [weights[(layer * D + d) * per:(layer * D + d + 1) * per] for d in range(D)]
        W = torch.stack([w[0] for w in ws])  # (D, H, in): ONNX's one gate, as torch's
        R = torch.stack([w[1] for w in ws])  # (D, H, H)
        # ONNX's B is [Wb, Rb] per direction
        Bias = torch.stack([torch.cat([w[2], w[3]]) for w in ws]) if has_biases else None
        h0 = hx[layer * D:(layer + 1) * D]
        y, h = torch.onnx.ops.symbolic_multi_out(
            "RNN", [x, W, R, Bias, None, h0], attrs, dtypes=[x.dtype, x.dtype],
            shapes=[[T, D, B, H], [D, B, H]])
        # Y is (seq, directions, batch, hidden): torch's layer output is (seq, batch, D*H)
        x = y.transpose(1, 2).reshape(T, B, D * H)
        h_n.append(h)
    return x, torch.cat(h_n) if num_layers > 1 else h_n[0]


def _torchscript_symbolic(g, input, hx, weights, batch_sizes, has_biases, num_layers,
                          bidirectional, relu, dropout, train, need_grad):
    """rnn_ext::rnn_forward -> (output, h_n, workspace, noise) for the TorchScript exporter.
    The op's arguments are aten::rnn_tanh's (``rnn_tanh.data`` with batch_sizes), but for the
    activation flag; the last two outputs are never used by a traced model."""
    from torch.onnx import symbolic_helper, symbolic_opset9

    lower = symbolic_opset9.rnn_relu if symbolic_helper._parse_arg(relu, "b") \
        else symbolic_opset9.rnn_tanh
    if symbolic_helper._is_none(batch_sizes):
        out, h_n = lower(g, input, hx, weights, has_biases, num_layers, dropout, train,
                         bidirectional, False)
    else:
        out, h_n = lower(g, input, batch_sizes, hx, weights, has_biases, num_layers, dropout,
                         train, bidirectional)
    unused = g.op("Constant", value_t=torch.zeros(0))
    return out, h_n, unused, unused


torch.onnx.register_custom_op_symbolic("rnn_ext::rnn_forward", _torchscript_symbolic, _OPSET)
