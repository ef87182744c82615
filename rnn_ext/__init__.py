"""rnn_ext: a drop-in torch.nn.RNN on fused C++/CUDA kernels.

    import rnn_ext
    rnn = rnn_ext.RNN(input_size, hidden_size, num_layers=2)   # as torch.nn.RNN
    model = rnn_ext.convert_rnns(model)                          # or convert a whole model
"""
from . import dp, ops, reference
from .dp import per_sample_gradients
from .module import RNN, convert_rnns
from .cuda import (  # CUDA recurrence kernel switches
    cuda_kernel_used, cuda_wavefront_layers, set_cuda_kernel, set_cuda_wavefront,
)

__version__ = "0.1.0"
dp.install_opacus_registration()  # registers rnn_ext.RNN's grad sampler when opacus is imported
__all__ = [
    "RNN", "convert_rnns", "reference", "ops", "backend_info", "per_sample_gradients", "set_cuda_kernel",
    "cuda_kernel_used", "set_cuda_wavefront", "cuda_wavefront_layers", "empty_cpu_cache",
]


def empty_cpu_cache() -> int:
    """Frees the memory of rnn_ext's CPU buffers that is kept for reuse (as
    ``torch.cuda.empty_cache`` does for CUDA) and returns its size in bytes.  The CPU kernels
    reuse the memory of their large buffers (>= 1 MiB: outputs, workspace, gradients) once no
    tensor holds it, instead of taking fresh pages from the OS every training step; idle memory
    is freed on its own after 64 requests without reuse and kept to at most
    ``RNN_EXT_CPU_RECYCLE_MB`` megabytes (default 512; 0 turns the reuse off)."""
    import torch

    return int(torch.ops.rnn_ext.empty_cpu_cache())


def backend_info() -> dict:
    """Which kernels this build can run."""
    import torch

    return {
        "version": __version__,
        "cpu_direct_blas": bool(torch.ops.rnn_ext.cpu_direct_blas()),
        # the float32 recurrence's step kernel at H = 64 / 128 (avx2, avx512 or none)
        "cpu_step_kernel": (torch.ops.rnn_ext._cpu_step_kernel_isa(64),
                            torch.ops.rnn_ext._cpu_step_kernel_isa(128)),
        # the float32 weight gradients of a 64 x 64 / 256 x 256 weight: the outer-product
        # kernel (avx512, avx2) or blas
        "cpu_weight_grads": (torch.ops.rnn_ext._cpu_weight_product(64, 64),
                             torch.ops.rnn_ext._cpu_weight_product(256, 256)),
        "cuda": bool(torch.ops.rnn_ext.built_with_cuda()),
    }
