// Element-wise pieces shared by the CUDA kernels (cuda/rnn_kernels.cu, the per-step path, and
// cuda/rnn_persistent_device.cuh): the accumulation dtype, conversions to and from it, and the
// nonlinearity with its derivative.  Pure CUDA (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rnn_ext::gpu {

// Arithmetic is in "acc" precision: double for double storage, float for the others.
template <typename T>
struct Traits {
  using Acc = float;
};
template <>
struct Traits<double> {
  using Acc = double;
};
template <typename T>
using acc_t = typename Traits<T>::Acc;

// Conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_*).
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Nonlinearity and its derivative from the output h = act(z); as the CPU kernels
// (csrc/cpu/activation.cpp): relu keeps NaN; relu' passes NaN (torch's threshold_backward).
__device__ __forceinline__ float act(float v, bool relu) {
  return relu ? (v < 0.f ? 0.f : v) : tanhf(v);
}
__device__ __forceinline__ double act(double v, bool relu) {
  return relu ? (v < 0.0 ? 0.0 : v) : tanh(v);
}
template <typename A>
__device__ __forceinline__ A act_backward(A dh, A h, bool relu) {
  return relu ? (h <= A(0) ? A(0) : dh) : dh * (A(1) - h * h);
}

}  // namespace rnn_ext::gpu
