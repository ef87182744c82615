// Warp-level helpers shared by the CUDA kernels (pure CUDA: no torch headers).
#pragma once

namespace rnn_ext::gpu {

// Butterfly reduce-scatter over the warp: N live values per lane, offset O.  Each step halves
// the live values: the lane with bit O set keeps the upper half and sends the lower, its
// partner the opposite, and both add what they receive.  After log2(N) such steps lane l holds
// (a partial sum of) value sum_{steps} ((l & O) ? N/2 : 0); the remaining offsets finish the
// sum with plain butterflies.  N = 32: lane l ends with the total of value l; N = 16: of value
// l >> 1.
template <int N, int O, int NA, typename Acc>
__device__ __forceinline__ void reduce_scatter(Acc (&v)[NA], int lane) {
  if constexpr (O >= 1) {
    if constexpr (N > 1) {
      constexpr int kHalf = N / 2;
      const bool upper = (lane & O) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const Acc send = upper ? v[i] : v[i + kHalf];
        const Acc keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
      }
      reduce_scatter<kHalf, O / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
      reduce_scatter<1, O / 2>(v, lane);
    }
  }
}

}  // namespace rnn_ext::gpu
