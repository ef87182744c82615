// The persistent forward recurrence (issue 5, variant P1 in bench/NOTES.md).  Pure CUDA (no
// torch header); the launcher is declared in cuda/rnn_persistent.h.
//
// Launch: one cooperative grid of D * ceil(H / kCols) blocks of kThreads threads.  Block b of
// direction d = b / blocks_per_dir owns the kCols output columns j0 = kCols * (b mod
// blocks_per_dir) .. j0 + kCols - 1 of that direction.
//
// Shared memory (dynamic): ws = W_hh[j0 : j0 + kCols, 0 : H] in the storage dtype (kCols * H
// elements, zero rows for j >= H), loaded once; red = kWarps x 32 floats for the cross-warp sum.
//
// Per step (t = i forward, T-1-i reverse) and per pass over the batch rows:
//   warps are split into `groups` = kWarps / wk row groups of kRows rows each; the wk warps of a
//   group (and their 32 lanes) split k: thread (kw, lane) handles the 16-byte vectors
//   k = (kw*32 + lane) * V + s * (32*wk*V), s = 0, 1, ...   (V = 16 / sizeof(T))
//   For each such k it loads kRows vectors of h_{t-1} (16-byte __ldcg: L2, never a stale L1
//   line, since other blocks wrote them) and, for each of the kCols columns, one vector of W
//   from shared memory (consecutive lanes read consecutive 16 bytes: conflict-free), and does
//   kRows * kCols * V FMAs into kRows * kCols = 32 fp32 accumulators acc[r * kCols + c].
//   A butterfly reduce-scatter over the warp leaves lane l with the warp's sum of accumulator l
//   (row l / kCols, column l % kCols); with wk > 1 the wk partial sums of a group are added
//   through `red` by the group's first warp (kw == 0), which runs the epilogue:
//     out[t, r, j] = act(out[t, r, j] + b_hh[j] + sum)          (P_t -> h_t, in place)
//   Then a grid-wide barrier (cooperative_groups grid.sync(): __syncthreads, a gpu-scope fence
//   and an arrival on a global counter) publishes h_t to every block before step i + 1.
//
// Hazards: step i reads rows of step t-1 (t+1 reverse) and writes rows of step t, which no
// block reads at step i; the two directions write disjoint columns.  The barrier orders step i's
// writes before step i + 1's reads; nothing is read across steps without a barrier between.
#include "cuda/rnn_persistent.h"
#include "cuda/warp_reduce.cuh"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace rnn_ext::gpu {

namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 8;  // output columns per block
constexpr int kRows = 4;  // batch rows per row group
constexpr int kAcc = kRows * kCols;
static_assert(kAcc == 32, "the reduce-scatter maps accumulator l to lane l");

// ---------------------------------------------------------------------------------------------
// dtype helpers (explicit intrinsics: torch builds with __CUDA_NO_HALF_*)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The 16 / sizeof(T) elements of a 16-byte vector, as floats.
__device__ __forceinline__ void unpack(const uint4& raw, float (&f)[4]) {
  f[0] = __uint_as_float(raw.x);
  f[1] = __uint_as_float(raw.y);
  f[2] = __uint_as_float(raw.z);
  f[3] = __uint_as_float(raw.w);
}
template <typename P, typename C>
__device__ __forceinline__ void unpack_pairs(const uint4& raw, float (&f)[8], C convert) {
  const unsigned u[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    P pair;
    static_assert(sizeof(P) == 4, "pair of 16-bit values");
    memcpy(&pair, &u[q], 4);
    const float2 v = convert(pair);
    f[2 * q] = v.x;
    f[2 * q + 1] = v.y;
  }
}
template <typename T>
__device__ __forceinline__ void unpack_t(const uint4& raw, float (&f)[16 / sizeof(T)]) {
  if constexpr (sizeof(T) == 4) {
    unpack(raw, f);
  } else if constexpr (std::is_same_v<T, __half>) {
    unpack_pairs<__half2>(raw, f, [](__half2 p) { return __half22float2(p); });
  } else {
    unpack_pairs<__nv_bfloat162>(raw, f, [](__nv_bfloat162 p) { return __bfloat1622float2(p); });
  }
}

// Nonlinearity as the other kernels: relu keeps NaN.
__device__ __forceinline__ float act(float v, bool relu) {
  return relu ? (v < 0.f ? 0.f : v) : tanhf(v);
}

struct Params {
  PersistentForward a;
  int blocks_per_dir;
  int wk;  // warps per row group (they split k): 1, 2, 4 or 8
};

// ---------------------------------------------------------------------------------------------
// Kernels

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) persistent_forward_kernel(const Params p) {
  constexpr int V = 16 / sizeof(T);
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t H = p.a.H, B = p.a.B, ld = p.a.ld, steps = p.a.T;
  T* ws = reinterpret_cast<T*>(smem);                                      // kCols x H
  float* red = reinterpret_cast<float*>(smem + kCols * H * sizeof(T));    // kWarps x 32
  const int d = static_cast<int>(blockIdx.x) >= p.blocks_per_dir ? 1 : 0;
  const PersistentDirection dir = d ? p.a.dir[1] : p.a.dir[0];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x - d * p.blocks_per_dir) * kCols;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // 1. The block's slice of W_hh into shared memory, once.
  {
    const int64_t vpr = H / V;  // 16-byte vectors per row
    const uint4* w = static_cast<const uint4*>(dir.w_hh);
    uint4* dst = reinterpret_cast<uint4*>(ws);
    for (int64_t i = tid; i < kCols * vpr; i += kThreads) {
      const int64_t c = i / vpr;
      const int64_t j = j0 + c;
      dst[i] = j < H ? __ldg(w + j * vpr + (i - c * vpr)) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
  // The epilogue of lane l handles accumulator l: row l / kCols of the group, column l % kCols.
  const int64_t ej = j0 + lane % kCols;
  const int er = lane / kCols;
  const float bias = (dir.b_hh != nullptr && ej < H)
                         ? to_float(static_cast<const T*>(dir.b_hh)[ej]) : 0.f;
  __syncthreads();

  const int wk = p.wk;
  const int group = warp / wk;        // row group of this warp within a pass
  const int kw = warp - group * wk;   // this warp's share of k
  const int64_t rows_per_pass = static_cast<int64_t>(kWarps / wk) * kRows;
  const int64_t kfirst = (static_cast<int64_t>(kw) * 32 + lane) * V;
  const int64_t kstride = static_cast<int64_t>(32) * wk * V;
  T* const out = static_cast<T*>(dir.out);
  const T* const h0 = static_cast<const T*>(dir.h0);
  const bool relu = p.a.relu;
  cg::grid_group grid = cg::this_grid();

  for (int64_t i = 0; i < steps; ++i) {
    const int64_t t = d == 0 ? i : steps - 1 - i;
    const T* hprev = h0;
    int64_t ldh = H;
    if (i > 0) {
      hprev = out + (d == 0 ? t - 1 : t + 1) * B * ld;
      ldh = ld;
    }
    T* const zt = out + t * B * ld;

    for (int64_t pass = 0; pass < B; pass += rows_per_pass) {
      const int64_t r0 = pass + static_cast<int64_t>(group) * kRows;
      float acc[kAcc];
#pragma unroll
      for (int a = 0; a < kAcc; ++a) acc[a] = 0.f;
      const T* hrow[kRows];
      bool valid[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        valid[r] = r0 + r < B;
        hrow[r] = hprev + (valid[r] ? r0 + r : 0) * ldh;
      }

      for (int64_t k = kfirst; k < H; k += kstride) {
        float x[kRows][V];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          uint4 raw = make_uint4(0u, 0u, 0u, 0u);
          if (valid[r]) raw = __ldcg(reinterpret_cast<const uint4*>(hrow[r] + k));
          unpack_t<T>(raw, x[r]);
        }
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          float wf[V];
          unpack_t<T>(*reinterpret_cast<const uint4*>(ws + c * H + k), wf);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
#pragma unroll
            for (int e = 0; e < V; ++e) acc[r * kCols + c] = fmaf(x[r][e], wf[e], acc[r * kCols + c]);
          }
        }
      }
      reduce_scatter<kAcc, 16>(acc, lane);
      float s = acc[0];
      if (wk > 1) {  // block-uniform
        red[warp * 32 + lane] = s;
        __syncthreads();
        if (kw == 0) {
          for (int q = 1; q < wk; ++q) s += red[(warp + q) * 32 + lane];
        }
        __syncthreads();  // red is reused by the next pass
      }
      if (kw == 0) {
        const int64_t r = r0 + er;
        if (r < B && ej < H) {
          T* const zp = zt + r * ld + ej;
          const float z = to_float(__ldcg(zp)) + bias + s;
          *zp = from_float<T>(act(z, relu));
        }
      }
    }
    if (i + 1 < steps) grid.sync();
  }
}

__global__ void __launch_bounds__(kThreads) grid_barrier_kernel(int64_t steps) {
  cg::grid_group grid = cg::this_grid();
  for (int64_t i = 0; i < steps; ++i) grid.sync();
}

// ---------------------------------------------------------------------------------------------
// Host side

// Warps per row group for B rows: as few passes as possible, and for small B the spare warps
// split k instead of idling.
int warps_per_group(int64_t B) {
  if (B <= kRows) return 8;
  if (B <= 2 * kRows) return 4;
  if (B <= 4 * kRows) return 2;
  return 1;
}

template <typename T>
const void* kernel_of() {
  return reinterpret_cast<const void*>(&persistent_forward_kernel<T>);
}

template <typename T>
cudaError_t plan_t(int64_t H, int D, PersistentPlan* plan) {
  *plan = PersistentPlan{};
  plan->threads = kThreads;
  const int64_t bpd = (H + kCols - 1) / kCols;
  const int64_t blocks = static_cast<int64_t>(D) * bpd;
  plan->blocks = blocks > 0x7fffffffLL ? 0x7fffffff : static_cast<int>(blocks);
  plan->smem_bytes = static_cast<int64_t>(kCols) * H * static_cast<int64_t>(sizeof(T)) +
                     kWarps * 32 * static_cast<int64_t>(sizeof(float));
  const void* kernel = kernel_of<T>();
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int coop = 0, optin = 0, sms = 0;
  if ((err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev)) != cudaSuccess)
    return err;
  if ((err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) !=
      cudaSuccess)
    return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
    return err;
  cudaFuncAttributes fa{};
  if ((err = cudaFuncGetAttributes(&fa, kernel)) != cudaSuccess) return err;
  plan->registers = fa.numRegs;
  if (!coop) {
    plan->status = PersistentStatus::kNoCooperative;
    return cudaSuccess;
  }
  if (plan->smem_bytes > optin) {
    plan->status = PersistentStatus::kSharedMemory;
    return cudaSuccess;
  }
  const int smem = static_cast<int>(plan->smem_bytes);
  if (smem > fa.maxDynamicSharedSizeBytes) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  plan->max_coresident = per_sm * sms;
  if (blocks > plan->max_coresident) plan->status = PersistentStatus::kCoResidency;
  return cudaSuccess;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t persistent_forward_t(const PersistentForward& a, cudaStream_t stream,
                                 PersistentStatus* status) {
  constexpr int64_t V = 16 / sizeof(T);
  if (a.T <= 0 || a.B <= 0 || a.H <= 0) {
    *status = PersistentStatus::kEmpty;
    return cudaSuccess;
  }
  bool ok = (a.D == 1 || a.D == 2) && a.H % V == 0 && a.ld % V == 0 && a.ld >= a.D * a.H;
  for (int d = 0; d < a.D && ok; ++d) {
    ok = aligned16(a.dir[d].w_hh) && aligned16(a.dir[d].h0) && aligned16(a.dir[d].out);
  }
  if (!ok) {
    *status = PersistentStatus::kUnaligned;
    return cudaSuccess;
  }
  PersistentPlan plan;
  cudaError_t err = plan_t<T>(a.H, a.D, &plan);
  if (err != cudaSuccess) return err;
  if (plan.status != PersistentStatus::kLaunched) {
    *status = plan.status;
    return cudaSuccess;
  }
  Params prm{a, plan.blocks / a.D, warps_per_group(a.B)};
  void* kargs[] = {&prm};
  err = cudaLaunchCooperativeKernel(kernel_of<T>(), dim3(plan.blocks), dim3(kThreads), kargs,
                                    static_cast<size_t>(plan.smem_bytes), stream);
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    // Occupancy said yes, the launch no (e.g. another context holds SMs): nothing enqueued.
    (void)cudaGetLastError();
    *status = PersistentStatus::kCoResidency;
    return cudaSuccess;
  }
  *status = err == cudaSuccess ? PersistentStatus::kLaunched : PersistentStatus::kCoResidency;
  return err;
}

template <typename F>
cudaError_t dispatch_persistent(DType dtype, F&& f, PersistentStatus* status) {
  switch (dtype) {
    case DType::kFloat:
      return f(float{});
    case DType::kHalf:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    case DType::kDouble:
      break;
  }
  *status = PersistentStatus::kUnsupportedDType;
  return cudaSuccess;
}

}  // namespace

cudaError_t persistent_forward(DType dtype, const PersistentForward& args, cudaStream_t stream,
                               PersistentStatus* status) {
  *status = PersistentStatus::kUnsupportedDType;
  return dispatch_persistent(
      dtype,
      [&](auto tag) {
        using T = decltype(tag);
        return persistent_forward_t<T>(args, stream, status);
      },
      status);
}

cudaError_t persistent_forward_plan(DType dtype, int64_t H, int D, PersistentPlan* plan) {
  PersistentStatus st = PersistentStatus::kLaunched;
  const cudaError_t err = dispatch_persistent(
      dtype,
      [&](auto tag) {
        using T = decltype(tag);
        return plan_t<T>(H, D, plan);
      },
      &st);
  if (st == PersistentStatus::kUnsupportedDType) {
    *plan = PersistentPlan{};
    plan->status = st;
  }
  return err;
}

cudaError_t grid_barrier_benchmark(int blocks, int64_t steps, cudaStream_t stream,
                                   double* us_per_sync) {
  *us_per_sync = 0;
  if (blocks <= 0 || steps <= 0) return cudaErrorInvalidValue;
  cudaEvent_t e0, e1;
  cudaError_t err = cudaEventCreate(&e0);
  if (err != cudaSuccess) return err;
  if ((err = cudaEventCreate(&e1)) != cudaSuccess) {
    cudaEventDestroy(e0);
    return err;
  }
  int64_t n = 1;  // warm-up launch with one barrier, then the timed one
  void* kargs[] = {&n};
  err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&grid_barrier_kernel),
                                    dim3(blocks), dim3(kThreads), kargs, 0, stream);
  if (err == cudaSuccess) err = cudaEventRecord(e0, stream);
  if (err == cudaSuccess) {
    n = steps;
    err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&grid_barrier_kernel),
                                      dim3(blocks), dim3(kThreads), kargs, 0, stream);
  }
  if (err == cudaSuccess) err = cudaEventRecord(e1, stream);
  if (err == cudaSuccess) err = cudaEventSynchronize(e1);
  float ms = 0;
  if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, e0, e1);
  if (err == cudaSuccess) *us_per_sync = 1000.0 * ms / static_cast<double>(steps);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return err;
}

}  // namespace rnn_ext::gpu
