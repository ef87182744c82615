"""Which CUDA recurrence kernel rnn_ext's forward runs (issue 5).

    rnn_ext.set_cuda_kernel("persistent")   # or "step" (the default) or "auto"
    out, h = rnn(x)                           # on CUDA
    rnn_ext.cuda_kernel_used()              # -> "persistent" if that forward ran it

* ``"step"``: one fused kernel per time step (csrc/cuda/rnn_kernels.cu).  The default.
* ``"persistent"``: one cooperative launch per layer (both directions), W_hh resident in shared
  memory, a grid barrier per step (csrc/cuda/rnn_persistent.cu), wherever it is feasible
  (float32/float16/bfloat16, uniform batch, H a multiple of 8, all blocks co-resident);
  elsewhere the step path runs.
* ``"auto"``: as ``"persistent"`` but only for batch <= 128.

The environment variable ``RNN_EXT_CUDA_KERNEL`` sets the initial value.  The switch is
process-wide and only affects the forward recurrence on CUDA (backward uses the step kernels).
On a build without CUDA the setting is validated and kept, and ``cuda_kernel_used()`` is
``"none"``.
"""
from __future__ import annotations

import contextlib

import torch

from . import _C  # noqa: F401  (registers torch.ops.rnn_ext.*)

__all__ = ["KERNELS", "set_cuda_kernel", "cuda_kernel_used", "cuda_kernel"]

KERNELS = ("auto", "step", "persistent")


def set_cuda_kernel(name: str) -> str:
    """Selects the CUDA forward recurrence kernel; returns the previous setting."""
    if not isinstance(name, str) or name not in KERNELS:
        raise ValueError(
            f"rnn_ext.set_cuda_kernel: unknown kernel {name!r}; expected one of "
            + ", ".join(repr(k) for k in KERNELS)
        )
    return torch.ops.rnn_ext.set_cuda_kernel(name)


def cuda_kernel_used() -> str:
    """What the recurrence of the last forward on CUDA ran: "step", "persistent", "mixed"
    (some layers each), or "none" (no CUDA forward yet, or a build without CUDA)."""
    return torch.ops.rnn_ext.cuda_kernel_used()


@contextlib.contextmanager
def cuda_kernel(name: str):
    """Context manager: ``with rnn_ext.cuda.cuda_kernel("persistent"): ...``."""
    prev = set_cuda_kernel(name)
    try:
        yield
    finally:
        set_cuda_kernel(prev)
