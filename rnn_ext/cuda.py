"""Which CUDA recurrence kernels rnn_ext runs (issue 5).

    rnn_ext.set_cuda_kernel("persistent")   # or "auto" (the default) or "step"
    out, h = rnn(x)                           # on CUDA
    rnn_ext.cuda_kernel_used()              # -> "persistent" if that forward ran it
    out.sum().backward()
    rnn_ext.cuda_kernel_used("backward")    # -> "persistent" if that backward ran it

* ``"step"``: one fused kernel per time step (csrc/cuda/rnn_kernels.cu).
* ``"persistent"``: the persistent kernels (csrc/cuda/rnn_persistent.cu), wherever feasible
  (float32/float16/bfloat16, uniform batch, H a multiple of 16 / element size, 16-byte aligned
  weights, all blocks co-resident); elsewhere the step path runs:
    - forward: one cooperative launch runs both directions of a layer, or, for a
      unidirectional stack without dropout, up to ``set_cuda_wavefront()`` layers as a
      wavefront (layer l runs step t at super-step t + l; the upper layers project their input
      inside the kernel);
    - backward: one cooperative launch per layer runs backpropagation through time of both
      directions (weight gradients stay large GEMMs).
  Weights stay in shared memory for the whole sequence, one grid barrier per (super-)step.
  Two variants of the block product: tensor cores (``mma.sync``; the weight slice in
  registers) for float16/bfloat16, and for float32 as TF32 only when
  ``torch.backends.cuda.matmul.allow_tf32`` is set; FMA in fp32 (the slice in shared memory)
  otherwise.  ``cuda_persistent_variant()`` says which ran.
* ``"persistent_fma"``: as ``"persistent"`` with the FMA variant only.
* ``"auto"`` (the default): as ``"persistent"`` where it measured faster than the step path
  on an H200 (bench/RESULTS.md): batch <= 64, and batch <= 128 for hidden size <= 256; the
  step path elsewhere.  Float32 runs exactly (FMA) under "auto" even where torch allows TF32:
  the TF32 variant measured slower there.

The environment variables ``RNN_EXT_CUDA_KERNEL`` and ``RNN_EXT_CUDA_WAVEFRONT`` set the
initial values.  The switches are process-wide.  On a build without CUDA the settings are
validated and kept, ``cuda_kernel_used()`` is ``"none"`` and ``cuda_wavefront_layers()`` 0.
"""
from __future__ import annotations

import contextlib

import torch

from . import _C  # noqa: F401  (registers torch.ops.rnn_ext.*)

__all__ = [
    "KERNELS", "MAX_WAVEFRONT", "set_cuda_kernel", "cuda_kernel_used", "cuda_kernel",
    "set_cuda_wavefront", "cuda_wavefront_layers", "cuda_persistent_variant",
]

KERNELS = ("auto", "step", "persistent", "persistent_fma")
MAX_WAVEFRONT = 8  # layers per persistent forward launch (csrc: kMaxPersistentCells)


def set_cuda_kernel(name: str) -> str:
    """Selects the CUDA recurrence kernels (forward and backward); returns the previous
    setting."""
    if not isinstance(name, str) or name not in KERNELS:
        raise ValueError(
            f"rnn_ext.set_cuda_kernel: unknown kernel {name!r}; expected one of "
            + ", ".join(repr(k) for k in KERNELS)
        )
    return torch.ops.rnn_ext.set_cuda_kernel(name)


def cuda_kernel_used(phase: str = "forward") -> str:
    """What the recurrence of the last forward (``phase="forward"``) or backward
    (``"backward"``) on CUDA ran: "step", "persistent", "mixed" (some layers each), or "none"
    (none yet, or a build without CUDA)."""
    if phase not in ("forward", "backward"):
        raise ValueError(f"rnn_ext.cuda_kernel_used: phase must be 'forward' or 'backward', "
                         f"got {phase!r}")
    return torch.ops.rnn_ext.cuda_kernel_used(phase)


def cuda_persistent_variant(phase: str = "forward") -> str:
    """Which variant of the persistent kernels the last forward / backward on CUDA ran: "mma"
    (tensor cores), "fma", "mixed" (layers of each), or "none" (no persistent launch)."""
    if phase not in ("forward", "backward"):
        raise ValueError(f"rnn_ext.cuda_persistent_variant: phase must be 'forward' or "
                         f"'backward', got {phase!r}")
    return torch.ops.rnn_ext.cuda_persistent_variant(phase)


def set_cuda_wavefront(layers: int) -> int:
    """Most layers of a unidirectional stack that one persistent forward launch runs as a
    wavefront (1 to MAX_WAVEFRONT; 1 = one launch per layer).  Returns the previous value.
    Fewer run when not all their blocks fit on the GPU at once."""
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= MAX_WAVEFRONT:
        raise ValueError(f"rnn_ext.set_cuda_wavefront: layers must be an int in 1 .. "
                         f"{MAX_WAVEFRONT}, got {layers!r}")
    return torch.ops.rnn_ext.set_cuda_wavefront(layers)


def cuda_wavefront_layers() -> int:
    """The most layers one persistent launch ran in the last CUDA forward (0: no persistent
    launch)."""
    return torch.ops.rnn_ext.cuda_wavefront_layers()


@contextlib.contextmanager
def cuda_kernel(name: str):
    """Context manager: ``with rnn_ext.cuda.cuda_kernel("persistent"): ...``."""
    prev = set_cuda_kernel(name)
    try:
        yield
    finally:
        set_cuda_kernel(prev)
