"""rnn_ext.RNN: torch.nn.RNN's interface and behaviour on the extension's fused kernels."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import ops

__all__ = ["RNN", "convert_rnns"]


def _autocast_cast(input, tensors):
    """Cast as autocast does for torch.nn.RNN: floating tensors other than float64 go to the
    autocast dtype; except where torch.nn.RNN runs cuDNN (a CUDA input of a dtype cuDNN takes,
    aten's cudnn_is_acceptable), whose autocast wrapper (aten/src/ATen/cudnn/AutocastRNN.cpp)
    casts to float16 whatever the autocast dtype, so bfloat16 autocast gives float16 there."""
    device_type = input.device.type
    dtype = torch.get_autocast_dtype(device_type)
    if (
        device_type == "cuda"
        and input.dtype in (torch.float32, torch.float64, torch.float16)
        and input.numel() > 0
        and _cudnn_enabled()
    ):
        dtype = torch.float16
    return [
        t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    ]


@torch.compiler.assume_constant_result
def _cudnn_enabled() -> bool:
    """Whether torch.nn.RNN would use cuDNN on a CUDA tensor (a constant while compiling)."""
    return bool(torch.backends.cudnn.enabled and torch.backends.cudnn.is_available())


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available, which Dynamo on torch 2.11 cannot trace (it reaches
    torch._C._is_autocast_available): a constant of the device type, so the compiler calls it
    once while tracing instead.  In eager mode the decorator only sets an attribute."""
    return torch.amp.is_autocast_available(device_type)


_RNNBASE_CHECK_FORWARD_ARGS = torch.nn.RNNBase.check_forward_args


class RNN(torch.nn.RNNBase):
    r"""A drop-in :class:`torch.nn.RNN`: same constructor, parameters, state_dict, shapes,
    errors and numerics (to rounding), computed by rnn_ext's fused kernels.

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None)``

    Each layer computes ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``.
    It subclasses :class:`torch.nn.RNNBase` (not ``torch.nn.RNN``) so that
    ``torch.compile(..., fullgraph=True)`` can trace it.
    """

    # Per-sample gradients (rnn_ext.dp): None, or f(module, batch, unsorted_indices) -> the
    # function the backward hands each row's weight gradients to (or None: not this call).
    _per_sample = None

    def register_forward_hook(self, hook, *args, **kwargs):
        from . import dp  # Opacus' activation hook gets tensors only (no PackedSequence, None)
        return super().register_forward_hook(dp.forward_hook_for(hook), *args, **kwargs)

    def register_full_backward_hook(self, hook, prepend=False):
        from . import dp  # Opacus' per-sample hook is called by the per-sample backward
        handle = dp.attach_opacus_backward_hook(self, hook)
        if handle is not None:
            return handle
        return super().register_full_backward_hook(hook, prepend)

    def __init__(self, *args, **kwargs):
        # Argument handling exactly as torch.nn.RNN.__init__ (the 4th positional argument is
        # the nonlinearity; proj_size is refused even when 0).
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        super().__init__(mode, *args, **kwargs)

    def _update_flat_weights(self) -> None:
        # torch's check (re-read the weights when one was replaced: functional_call,
        # parametrize, weight_norm, assignment), without a Module.__getattr__ per weight for
        # plain parameters: at small sizes it cost more than the kernel.
        params = self._parameters
        for name, w in zip(self._flat_weights_names, self._flat_weights):
            current = params[name] if name in params else getattr(self, name, None)
            if current is not w:
                self._init_flat_weights()
                return

    def forward(self, input, hx: Optional[Tensor] = None):  # noqa: C901 (mirrors torch)
        self._update_flat_weights()

        num_directions = 2 if self.bidirectional else 1
        orig_input = input

        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = batch_sizes[0]
            if hx is None:
                hx = torch.zeros(
                    self.num_layers * num_directions, max_batch_size, self.hidden_size,
                    dtype=input.dtype, device=input.device,
                )
            else:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            batch_sizes = None
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead"
                )
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                        )
                    hx = hx.unsqueeze(1)
            else:
                if hx is not None and hx.dim() != 3:
                    raise RuntimeError(
                        f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
                    )
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = None
            unsorted_indices = None
            if hx is None:
                hx = torch.zeros(
                    self.num_layers * num_directions, max_batch_size, self.hidden_size,
                    dtype=input.dtype, device=input.device,
                )
            else:
                hx = self.permute_hidden(hx, sorted_indices)

        if batch_sizes is None and type(self).check_forward_args is _RNNBASE_CHECK_FORWARD_ARGS:
            # torch's RNNBase.check_forward_args for dense input, inlined (same order, types and
            # messages; the input is 3-D here): its three method calls cost more than the
            # kernel at small sizes.  A subclass that overrides check_forward_args gets it.
            w0 = self._flat_weights[0]
            if input.dtype != w0.dtype and not torch._C._is_any_autocast_enabled():
                raise ValueError(
                    f"RNN input dtype ({input.dtype}) does not match weight dtype ({w0.dtype}). "
                    f"Convert input: input.to({w0.dtype}), or convert model: model.to({input.dtype})"
                )
            if self.input_size != input.size(-1):
                raise RuntimeError(
                    f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                    f"got {input.size(-1)}"
                )
            expected_hidden_size = (
                self.num_layers * num_directions, max_batch_size, self.hidden_size
            )
            if hx.size() != expected_hidden_size:
                raise RuntimeError(
                    f"Expected hidden size {expected_hidden_size}, got {list(hx.size())}"
                )
        else:
            self.check_forward_args(input, hx, batch_sizes)
        per_sample = None
        if self._per_sample is not None and torch.is_grad_enabled():
            # per-sample gradients asked for (rnn_ext.per_sample_gradients, Opacus): rnn_ext.dp
            per_sample = self._per_sample(self, hx.shape[1], unsorted_indices)
        output, hidden = self._run(input, hx, batch_sizes, per_sample)

        if isinstance(orig_input, PackedSequence):
            output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output_packed, self.permute_hidden(hidden, unsorted_indices)

        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = hidden.squeeze(1)
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _run(self, input: Tensor, hx: Tensor, batch_sizes: Optional[Tensor], per_sample=None):
        """The part torch.nn.RNN hands to aten (`_VF.rnn_tanh`/`rnn_relu`), on rnn_ext's op."""
        weights = list(self._flat_weights)
        # aten's checks before computing (devices, then sequence length 0), with its messages,
        # are the kernels' (csrc/common.cpp) and the fake kernel's (ops.py), in aten's order.
        # aten's dropout check, made only where aten's RNN applies dropout (self.dropout can be
        # changed after construction, bypassing the constructor's check).
        p = self.dropout
        if self.training and self.num_layers > 1 and p != 0 and not 0 <= p <= 1:
            raise RuntimeError(
                f"dropout probability has to be between 0 and 1, but got {format(p, 'g')}"
            )
        seq_first = batch_sizes is None and self.batch_first
        if (
            torch._C._is_any_autocast_enabled()
            and _autocast_available(input.device.type)
            and torch.is_autocast_enabled(input.device.type)
        ):  # (is_autocast_enabled raises for device types without autocast, e.g. meta)
            input, hx, *weights = _autocast_cast(input, [input, hx, *weights])
        if seq_first:
            input = input.transpose(0, 1)
        output, hidden = ops.rnn(
            input, hx, weights, batch_sizes,
            has_biases=self.bias, num_layers=self.num_layers,
            bidirectional=bool(self.bidirectional), relu=self.mode == "RNN_RELU",
            dropout=self.dropout, train=self.training, per_sample=per_sample,
        )
        if seq_first:
            output = output.transpose(0, 1)
        return output, hidden


def convert_rnns(module: torch.nn.Module) -> torch.nn.Module:
    """Returns ``module`` with every ``torch.nn.RNN`` in it replaced by an ``rnn_ext.RNN``
    holding the same Parameter objects (or the replacement itself, if ``module`` is a
    ``torch.nn.RNN``), like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

    The replacement keeps the configuration, the training flag and the hooks; optimisers that
    hold the old parameters keep working, since the parameters are the same objects.
    """
    out = module
    if isinstance(module, torch.nn.RNN) and not isinstance(module, RNN):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dropout warning was already given once
            with torch.device("meta"):
                out = RNN(
                    module.input_size, module.hidden_size, module.num_layers,
                    module.nonlinearity, module.bias, module.batch_first, module.dropout,
                    module.bidirectional,
                )
        for name in module._flat_weights_names:
            setattr(out, name, getattr(module, name))
        out._init_flat_weights()
        out.train(module.training)
        # every kind of hook torch.nn.Module keeps (incl. with_kwargs / always_call flags,
        # backward pre-hooks, state_dict pre and load_state_dict post hooks): the same dict
        # objects, so that a handle returned before the conversion still removes its hook
        for attr, value in vars(module).items():
            if "hook" in attr and isinstance(value, dict):
                setattr(out, attr, value)  # (a fresh rnn_ext.RNN has no hooks of its own)
            elif "hook" in attr:
                setattr(out, attr, value)  # _is_full_backward_hook
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        new_child = convert_rnns(child)
        if new_child is not child:
            out.add_module(name, new_child)
    del module
    return out
