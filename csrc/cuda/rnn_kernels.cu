// The per-step recurrence kernels of the CUDA backend (forward and BPTT) and a row gather.
// Pure CUDA (no torch header); the launchers are declared in cuda/rnn_kernels.h.
//
// Both step kernels are one matrix-vector-batch product out[r, j] = sum_k in[r, k] * M[j, k]
// (M = W_hh forward, W_hh^T backward, both (H, H) row-major) with a fused epilogue:
//
//   block  = kWarps warps; it owns kRows batch rows x (kWarps * kCols) output columns.
//   shared = the block's kRows input rows, in acc precision, kChunk columns at a time.
//   warp   = kCols consecutive output columns j; lane l reads M[j, k] for k = l*VEC + 32*VEC*s
//            (VEC-wide 16-byte loads, so a warp reads 32*VEC contiguous elements of each row:
//            coalesced) and the matching VEC inputs of every row from shared memory (16-byte
//            loads, conflict-free), and accumulates kRows x kCols partial sums in registers.
//   reduction: a butterfly reduce-scatter over the warp (kAcc - 1 shuffles for kAcc sums
//            instead of 5 * kAcc) leaves lane l holding the full sum of accumulator
//            l >> kShift; lane (a << kShift) then runs the epilogue for (row, column) a.
// Grid: x = row tiles, y = column tiles.  Any H >= 1 and any row count; 64-bit offsets.
//
// With RNN_EXT_SIMT_EMULATION defined, tests/simt/ compiles this file with g++ and runs the
// kernels (and these launchers) on host threads (tests/test_cuda_emulated.py).
#include "cuda/rnn_kernels.h"

#ifdef RNN_EXT_SIMT_EMULATION
#include "simt_emulation.h"  // tests/simt/: CUDA's built-ins on host threads
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cuda/elementwise.cuh"
#include "cuda/warp_reduce.cuh"

namespace rnn_ext::gpu {

namespace {

// ---------------------------------------------------------------------------------------------
// Tiling

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kCols = 4;                       // output columns per warp
constexpr int kColsPerBlock = kWarps * kCols;  // 16
constexpr int kChunk = 1024;                   // input columns staged in shared memory at once

template <typename T>
struct Tile {
  using Acc = acc_t<T>;
  static constexpr int kRows = sizeof(Acc) == 8 ? 4 : 8;  // batch rows per block
  static constexpr int kAcc = kRows * kCols;              // 32 (fp32 acc) or 16 (fp64)
  static constexpr int kShift = kAcc == 32 ? 0 : 1;       // lane -> accumulator: lane >> kShift
  static constexpr int kVec = 16 / sizeof(T);             // elements per 16-byte load
  static_assert(kAcc == 32 || kAcc == 16, "reduce-scatter mapping assumes 16 or 32 sums");
  static_assert(kChunk % kVec == 0, "chunk must keep vector loads aligned");
  // Shared memory: kRows x kChunk accumulators = 32 KiB for both float and double.
};

// The matvec's input: row r < split comes from a (row stride lda), split <= r < n from b (row
// stride ldb, indexed by r as well); rows >= n are zero.
template <typename T>
struct InRows {
  const T* a;
  int64_t lda;
  const T* b;
  int64_t ldb;
  int64_t split;
  int64_t n;

  __device__ __forceinline__ const T* row(int64_t r) const {
    return r < split ? a + r * lda : b + r * ldb;
  }
};

// VEC consecutive elements of global memory (read-only for the kernel's lifetime), raw.
template <typename T, int VEC>
__device__ __forceinline__ void load_global(const T* p, T (&out)[VEC]) {
  if constexpr (sizeof(T) * VEC == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = e[i];
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = p[i];
  }
}

// VEC consecutive accumulators from shared memory; p is aligned to VEC * sizeof(Acc) (capped
// at 16 bytes) by construction.
template <int VEC, typename Acc>
__device__ __forceinline__ void load_shared(const Acc* p, Acc (&out)[VEC]) {
  if constexpr (std::is_same_v<Acc, float> && VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(p)[q];
      out[4 * q + 0] = f.x;
      out[4 * q + 1] = f.y;
      out[4 * q + 2] = f.z;
      out[4 * q + 3] = f.w;
    }
  } else if constexpr (std::is_same_v<Acc, double> && VEC % 2 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 2; ++q) {
      const double2 f = reinterpret_cast<const double2*>(p)[q];
      out[2 * q + 0] = f.x;
      out[2 * q + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = p[i];
  }
}

// The block's tile of sum_k in[r, k] * M[j, k] for rows [row0, row0 + kRows) and columns
// [col0, col0 + kColsPerBlock).  Returns, in each lane, the full sum for accumulator
// a = lane >> kShift, i.e. row row0 + a / kCols, column col0 + warp * kCols + a % kCols.
// Must be called by every thread of the block (it synchronises).
template <typename T, int VEC>
__device__ __forceinline__ acc_t<T> matvec_tile(const T* __restrict__ M, int64_t H,
                                               const InRows<T>& in, int64_t row0, int64_t col0,
                                               acc_t<T>* tile) {
  using Acc = acc_t<T>;
  constexpr int R = Tile<T>::kRows;
  constexpr int NA = Tile<T>::kAcc;
  // inputs per shared-memory load: 16 bytes of Acc (or VEC, if fewer)
  constexpr int G = VEC < 16 / static_cast<int>(sizeof(Acc)) ? VEC : 16 / static_cast<int>(sizeof(Acc));
  // two k-steps per iteration for more loads in flight, except with 8-wide half/bf16 loads,
  // where two steps would need more than 128 registers (sm_80 then spills)
  constexpr int kUnroll = VEC >= 8 ? 1 : 2;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  Acc acc[NA];
#pragma unroll
  for (int i = 0; i < NA; ++i) acc[i] = Acc(0);

  // The kCols rows of M this warp reads; columns past H read row H - 1 and are discarded.
  const T* mrow[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int64_t j = col0 + warp * kCols + c;
    mrow[c] = M + (j < H ? j : H - 1) * H;
  }

  if (row0 < in.n) {  // block-uniform: a tile without input rows has a zero product
    for (int64_t k0 = 0; k0 < H; k0 += kChunk) {
      const int kc = static_cast<int>(H - k0 < kChunk ? H - k0 : kChunk);
      __syncthreads();  // the previous chunk's readers are done with the tile
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t row = row0 + r;
        Acc* dst = tile + r * kChunk;
        if (row < in.n) {
          const T* src = in.row(row) + k0;
          for (int k = threadIdx.x; k < kc; k += kThreads) dst[k] = to_acc(src[k]);
        } else {
          for (int k = threadIdx.x; k < kc; k += kThreads) dst[k] = Acc(0);
        }
      }
      __syncthreads();

#pragma unroll kUnroll
      for (int k = lane * VEC; k < kc; k += 32 * VEC) {
        // Raw loads first (kCols independent 16-byte loads in flight), then VEC / G groups of
        // G inputs: convert G weights per column, and for every row read G inputs from shared
        // memory (one 16-byte load) and do kCols * G FMAs.  Converting per group keeps the
        // live registers at kCols*VEC raw + kCols*G converted + kAcc accumulators.
        T wraw[kCols][VEC];
#pragma unroll
        for (int c = 0; c < kCols; ++c) load_global<T, VEC>(mrow[c] + k0 + k, wraw[c]);
#pragma unroll
        for (int q = 0; q < VEC; q += G) {
          Acc w[kCols][G];
#pragma unroll
          for (int c = 0; c < kCols; ++c) {
#pragma unroll
            for (int e = 0; e < G; ++e) w[c][e] = to_acc(wraw[c][q + e]);
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            Acc x[G];
            load_shared<G>(tile + r * kChunk + k + q, x);
#pragma unroll
            for (int c = 0; c < kCols; ++c) {
#pragma unroll
              for (int e = 0; e < G; ++e) acc[r * kCols + c] += x[e] * w[c][e];
            }
          }
        }
      }
    }
  }
  reduce_scatter<NA, 16>(acc, lane);
  return acc[0];
}

// ---------------------------------------------------------------------------------------------
// Kernels

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_step_kernel(const T* __restrict__ w_hh, const T* __restrict__ b_hh, InRows<T> in,
                        T* z, int64_t ld_z, int64_t rows, int64_t H, bool relu) {
  using Acc = acc_t<T>;
  __shared__ __align__(16) Acc tile[Tile<T>::kRows * kChunk];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * Tile<T>::kRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kColsPerBlock;
  const Acc s = matvec_tile<T, VEC>(w_hh, H, in, row0, col0, tile);

  const int lane = threadIdx.x & 31;
  if ((lane & ((1 << Tile<T>::kShift) - 1)) != 0) return;
  const int a = lane >> Tile<T>::kShift;
  const int64_t row = row0 + a / kCols;
  const int64_t col = col0 + (threadIdx.x >> 5) * kCols + a % kCols;
  if (row >= rows || col >= H) return;
  T* p = z + row * ld_z + col;
  Acc v = to_acc(*p) + s;
  if (b_hh != nullptr) v += to_acc(b_hh[col]);
  *p = from_acc<T>(act(v, relu));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_step_kernel(const T* __restrict__ wt_hh, InRows<T> in, acc_t<T>* dh,
                         const T* dy_next, const T* h_next, T* dz_next, int64_t ld,
                         int64_t rows_next, int64_t rows_out, int64_t H, bool relu) {
  using Acc = acc_t<T>;
  __shared__ __align__(16) Acc tile[Tile<T>::kRows * kChunk];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * Tile<T>::kRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kColsPerBlock;
  const Acc s = matvec_tile<T, VEC>(wt_hh, H, in, row0, col0, tile);

  const int lane = threadIdx.x & 31;
  if ((lane & ((1 << Tile<T>::kShift) - 1)) != 0) return;
  const int a = lane >> Tile<T>::kShift;
  const int64_t row = row0 + a / kCols;
  const int64_t col = col0 + (threadIdx.x >> 5) * kCols + a % kCols;
  if (row >= rows_out || col >= H) return;
  Acc* dhp = dh + row * H + col;
  Acc g = row < in.n ? s : *dhp;
  if (row < rows_next) {
    const int64_t o = row * ld + col;
    if (dy_next != nullptr) g += to_acc(dy_next[o]);
    dz_next[o] = from_acc<T>(act_backward(g, to_acc(h_next[o]), relu));
  } else {
    *dhp = g;
  }
}

constexpr int kMaxSegments = 32;
struct SegmentBatch {
  CopySegment s[kMaxSegments];
};

template <typename T>
__global__ void __launch_bounds__(256)
    gather_rows_kernel(const T* src0, int64_t ld0, const T* src1, int64_t ld1, T* dst,
                       int64_t ld_dst, int64_t cols, SegmentBatch segs) {
  const CopySegment sg = segs.s[blockIdx.y];
  const T* src = sg.src == 0 ? src0 : src1;
  const int64_t ld = sg.src == 0 ? ld0 : ld1;
  const int64_t total = sg.rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols;
    const int64_t c = i - r * cols;
    dst[(sg.dst_row + r) * ld_dst + c] = src[(sg.src_row + r) * ld + c];
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers

// kernel<<<grid, block, 0, stream>>>(args...); the emulation runs the blocks one after another
// on host threads (these kernels never wait for each other's blocks).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, int block, cudaStream_t stream, A&&... args) {
#ifdef RNN_EXT_SIMT_EMULATION
  (void)stream;
  simt::launch_blocks(grid, static_cast<unsigned>(block), [&] { kernel(args...); });
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
#endif
}

// Grid for `rows` rows and H columns; false when it does not fit.
template <typename T>
bool step_grid(int64_t rows, int64_t H, dim3* grid) {
  const int64_t gx = (rows + Tile<T>::kRows - 1) / Tile<T>::kRows;
  const int64_t gy = (H + kColsPerBlock - 1) / kColsPerBlock;
  if (gx > 0x7fffffffLL || gy > 65535) return false;
  *grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
  return true;
}

// The 16-byte path needs every row of M 16-byte aligned.
template <typename T>
bool vector_ok(const void* M, int64_t H) {
  return H % Tile<T>::kVec == 0 && reinterpret_cast<uintptr_t>(M) % 16 == 0;
}

template <typename T>
cudaError_t forward_step_t(const void* w_hh, const void* b_hh, const void* cont_rows,
                           int64_t ld_cont, int64_t cont, const void* h0, int64_t ld_h0,
                           void* z, int64_t ld_z, int64_t rows, int64_t H, bool relu,
                           cudaStream_t stream) {
  if (rows <= 0 || H <= 0) return cudaSuccess;
  dim3 grid;
  if (!step_grid<T>(rows, H, &grid)) return cudaErrorInvalidValue;
  const InRows<T> in{static_cast<const T*>(cont_rows), ld_cont, static_cast<const T*>(h0), ld_h0,
                     cont, rows};
  const T* w = static_cast<const T*>(w_hh);
  const T* b = static_cast<const T*>(b_hh);
  T* zz = static_cast<T*>(z);
  if (vector_ok<T>(w_hh, H)) {
    launch(&forward_step_kernel<T, Tile<T>::kVec>, grid, kThreads, stream, w, b, in, zz, ld_z,
           rows, H, relu);
  } else {
    launch(&forward_step_kernel<T, 1>, grid, kThreads, stream, w, b, in, zz, ld_z, rows, H, relu);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_step_t(const void* wt_hh, const void* dz_in, int64_t rows_in, void* dh,
                            const void* dy_next, const void* h_next, void* dz_next,
                            int64_t rows_next, int64_t ld, int64_t H, bool relu,
                            cudaStream_t stream) {
  const int64_t rows_out = std::max(rows_in, rows_next);
  if (rows_out <= 0 || H <= 0) return cudaSuccess;
  dim3 grid;
  if (!step_grid<T>(rows_out, H, &grid)) return cudaErrorInvalidValue;
  const T* dzi = static_cast<const T*>(dz_in);
  const InRows<T> in{dzi, ld, dzi, ld, rows_in, rows_in};
  const T* w = static_cast<const T*>(wt_hh);
  auto* dhp = static_cast<acc_t<T>*>(dh);
  const T* dy = static_cast<const T*>(dy_next);
  const T* h = static_cast<const T*>(h_next);
  T* dz = static_cast<T*>(dz_next);
  if (vector_ok<T>(wt_hh, H)) {
    launch(&backward_step_kernel<T, Tile<T>::kVec>, grid, kThreads, stream, w, in, dhp, dy, h,
           dz, ld, rows_next, rows_out, H, relu);
  } else {
    launch(&backward_step_kernel<T, 1>, grid, kThreads, stream, w, in, dhp, dy, h, dz, ld,
           rows_next, rows_out, H, relu);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t gather_rows_t(const void* src0, int64_t ld0, const void* src1, int64_t ld1,
                          void* dst, int64_t ld_dst, int64_t cols, const CopySegment* segments,
                          int64_t num_segments, cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  for (int64_t first = 0; first < num_segments; first += kMaxSegments) {
    const int n = static_cast<int>(std::min<int64_t>(kMaxSegments, num_segments - first));
    SegmentBatch batch{};
    int64_t most = 0;
    int used = 0;
    for (int i = 0; i < n; ++i) {
      const CopySegment& s = segments[first + i];
      if (s.rows <= 0) continue;
      batch.s[used++] = s;
      most = std::max(most, s.rows * cols);
    }
    if (used == 0) continue;
    const int64_t blocks = std::min<int64_t>((most + 255) / 256, 4096);
    launch(&gather_rows_kernel<T>, dim3(static_cast<unsigned>(blocks), used, 1), 256, stream,
           static_cast<const T*>(src0), ld0, static_cast<const T*>(src1), ld1,
           static_cast<T*>(dst), ld_dst, cols, batch);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Calls f(T{}) for the storage type of `dtype`.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat:
      return f(float{});
    case DType::kDouble:
      return f(double{});
    case DType::kHalf:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t forward_step(DType dtype, const void* w_hh, const void* b_hh, const void* cont_rows,
                         int64_t ld_cont, int64_t cont, const void* h0, int64_t ld_h0, void* z,
                         int64_t ld_z, int64_t rows, int64_t H, bool relu, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return forward_step_t<T>(w_hh, b_hh, cont_rows, ld_cont, cont, h0, ld_h0, z, ld_z, rows, H,
                             relu, stream);
  });
}

cudaError_t backward_step(DType dtype, const void* wt_hh, const void* dz_in, int64_t rows_in,
                          void* dh, const void* dy_next, const void* h_next, void* dz_next,
                          int64_t rows_next, int64_t ld, int64_t H, bool relu,
                          cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return backward_step_t<T>(wt_hh, dz_in, rows_in, dh, dy_next, h_next, dz_next, rows_next, ld,
                              H, relu, stream);
  });
}

cudaError_t gather_rows(DType dtype, const void* src0, int64_t ld0, const void* src1,
                        int64_t ld1, void* dst, int64_t ld_dst, int64_t cols,
                        const CopySegment* segments, int64_t num_segments, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return gather_rows_t<T>(src0, ld0, src1, ld1, dst, ld_dst, cols, segments, num_segments,
                            stream);
  });
}

}  // namespace rnn_ext::gpu
