// Stand-ins for the c10::cuda pieces csrc/cuda_glue.cpp uses, so that the glue runs on CPU
// tensors with the kernels emulated on host threads (tests/simt/, tests/test_cuda_emulated.py).
// Test-only.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda

#define C10_CUDA_CHECK(expr)                                                             \
  do {                                                                                   \
    const cudaError_t rnn_ext_err_ = (expr);                                             \
    TORCH_CHECK(rnn_ext_err_ == cudaSuccess, "emulated CUDA error ",                     \
                static_cast<int>(rnn_ext_err_));                                         \
  } while (0)
