// The persistent recurrence kernels (issue 5; variants P1, P4 and the persistent backward in
// bench/NOTES.md).  Pure CUDA (no torch header); the launchers are declared in
// cuda/rnn_persistent.h, which describes what they compute.
//
// Launch: one cooperative grid of cells * ceil(H / kCols) blocks of kThreads threads.  Block b
// belongs to cell b / blocks_per_cell and owns its kCols output columns
// j0 = kCols * (b mod blocks_per_cell) .. j0 + kCols - 1.
//
// Shared memory (dynamic): ws = the block's weight slice, kCols rows of ldw elements in the
// storage dtype (zero rows for j >= H), loaded once:
//   forward:  row c = [W_ih[j0 + c, 0:K_in] | W_hh[j0 + c, 0:H]]   (K_in = 0 without projection)
//   backward: row c = W_hh^T[j0 + c, 0:H]
// then red = kWarps x 32 floats for the cross-warp sum.
//
// The block product (block_product): for kRows-row groups of the batch, sum_k X[r, k] ws[c, k]
// over one or two segments of k.  Warps are split into kWarps / wk row groups of kRows rows;
// the wk warps of a group (and their 32 lanes) split k: thread (kw, lane) handles the 16-byte
// vectors k = (kw*32 + lane) * V + s * (32*wk*V), s = 0, 1, ... (V = 16 / sizeof(T)).  For each
// such k it loads kRows vectors of X (16-byte __ldcg: L2, never a stale L1 line, since other
// blocks wrote them) and, for each of the kCols columns, one vector of ws (consecutive lanes
// read consecutive 16 bytes: conflict-free), and does kRows * kCols * V FMAs into
// kRows * kCols = 32 fp32 accumulators acc[r * kCols + c].  A butterfly reduce-scatter over the
// warp leaves lane l with the warp's sum of accumulator l (row l / kCols, column l % kCols);
// with wk > 1 the wk partial sums of a group are added through `red` by the group's first warp
// (kw == 0), whose lanes then run the epilogue for (row r0 + l / kCols, column j0 + l % kCols).
//
// After each super-step but the last: cooperative_groups grid.sync() (__syncthreads, a
// gpu-scope fence and an arrival on a global counter) publishes that super-step's writes to
// every block.  Hazards (the caller's layouts, see the header): in a super-step a block reads
// rows written in earlier super-steps only, and writes rows nobody reads in that super-step.
#include "cuda/rnn_persistent.h"
#include "cuda/warp_reduce.cuh"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
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

// Nonlinearity and its derivative (from the output h) as the per-step kernels: relu keeps NaN.
__device__ __forceinline__ float act(float v, bool relu) {
  return relu ? (v < 0.f ? 0.f : v) : tanhf(v);
}
__device__ __forceinline__ float act_backward(float dh, float h, bool relu) {
  return relu ? (h <= 0.f ? 0.f : dh) : dh * (1.f - h * h);
}

// ---------------------------------------------------------------------------------------------
// Block-level pieces shared by the forward and backward kernels

// ws[c * ldw + off + k] = w[(j0 + c) * K + k] for c < kCols, k < K; zero where j0 + c >= H.
// K, ldw and off are multiples of V = 16 / sizeof(T).
template <typename T>
__device__ __forceinline__ void load_slice(T* ws, int64_t ldw, int64_t off, const T* w,
                                           int64_t K, int64_t j0, int64_t H) {
  constexpr int64_t V = 16 / sizeof(T);
  const int64_t vpr = K / V;  // 16-byte vectors per row
  const uint4* src = reinterpret_cast<const uint4*>(w);
  for (int64_t i = threadIdx.x; i < kCols * vpr; i += kThreads) {
    const int64_t c = i / vpr;
    const int64_t v = i - c * vpr;
    const int64_t j = j0 + c;
    *reinterpret_cast<uint4*>(ws + c * ldw + off + v * V) =
        j < H ? __ldg(src + j * vpr + v) : make_uint4(0u, 0u, 0u, 0u);
  }
}

// How a block's threads split one product (see the file comment).
struct Split {
  int wk;              // warps per row group (they split k): 1, 2, 4 or 8
  int group;           // this warp's row group within a pass
  int kw;              // this warp's share of k
  int lane;
  int64_t rows_per_pass;
  int64_t kfirst;      // first k of this thread (in elements; a multiple of V)
  int64_t kstride;     // distance between this thread's k (elements)
};

template <typename T>
__device__ __forceinline__ Split make_split(int wk) {
  constexpr int64_t V = 16 / sizeof(T);
  Split s;
  const int warp = threadIdx.x >> 5;
  s.wk = wk;
  s.lane = threadIdx.x & 31;
  s.group = warp / wk;
  s.kw = warp - s.group * wk;
  s.rows_per_pass = static_cast<int64_t>(kWarps / wk) * kRows;
  s.kfirst = (static_cast<int64_t>(s.kw) * 32 + s.lane) * V;
  s.kstride = static_cast<int64_t>(32) * wk * V;
  return s;
}

// acc[r * kCols + c] += sum over this thread's k < K of x[(r0 + r) * ldx + k] * ws[c * ldw + k],
// rows r0 + r >= B contributing nothing.
template <typename T>
__device__ __forceinline__ void accumulate(float (&acc)[kAcc], const T* x, int64_t ldx,
                                           int64_t r0, int64_t B, const T* ws, int64_t ldw,
                                           int64_t K, const Split& sp) {
  constexpr int V = 16 / sizeof(T);
  const T* xrow[kRows];
  bool valid[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    valid[r] = r0 + r < B;
    xrow[r] = x + (valid[r] ? r0 + r : 0) * ldx;
  }
  for (int64_t k = sp.kfirst; k < K; k += sp.kstride) {
    float xv[kRows][V];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (valid[r]) raw = __ldcg(reinterpret_cast<const uint4*>(xrow[r] + k));
      unpack_t<T>(raw, xv[r]);
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      float wf[V];
      unpack_t<T>(*reinterpret_cast<const uint4*>(ws + c * ldw + k), wf);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int e = 0; e < V; ++e) acc[r * kCols + c] = fmaf(xv[r][e], wf[e], acc[r * kCols + c]);
      }
    }
  }
}

// The group's total of accumulator `lane` (row lane / kCols, column lane % kCols), valid in
// the group's first warp (kw == 0).  Every thread of the block calls it (it may __syncthreads).
__device__ __forceinline__ float reduce_group(float (&acc)[kAcc], float* red, const Split& sp) {
  reduce_scatter<kAcc, 16>(acc, sp.lane);
  float s = acc[0];
  if (sp.wk > 1) {  // block-uniform
    const int warp = threadIdx.x >> 5;
    red[warp * 32 + sp.lane] = s;
    __syncthreads();
    if (sp.kw == 0) {
      for (int q = 1; q < sp.wk; ++q) s += red[(warp + q) * 32 + sp.lane];
    }
    __syncthreads();  // red is reused by the next pass
  }
  return s;
}

struct ForwardParams {
  PersistentForward a;
  int blocks_per_cell;
  int wk;
  int64_t supersteps;  // T + the largest delay
};

struct BackwardParams {
  PersistentBackward a;
  int blocks_per_cell;
  int wk;
};

// ---------------------------------------------------------------------------------------------
// Kernels

// __grid_constant__: the cell table is indexed by a block-dependent value without a copy to
// local memory (sm_70+).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    persistent_forward_kernel(const __grid_constant__ ForwardParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int cidx = static_cast<int>(blockIdx.x) / p.blocks_per_cell;
  const PersistentCell& cell = p.a.cell[cidx];
  const int64_t H = p.a.H, B = p.a.B, steps = p.a.T, ld = cell.ld;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x - cidx * p.blocks_per_cell) * kCols;
  const bool project = cell.w_ih != nullptr;
  const int64_t K_in = project ? cell.K_in : 0;
  const int64_t ldw = K_in + H;
  T* ws = reinterpret_cast<T*>(smem);                                     // kCols x ldw
  float* red = reinterpret_cast<float*>(smem + kCols * ldw * sizeof(T));  // kWarps x 32

  // 1. The block's weight slice into shared memory, once.
  if (project) load_slice(ws, ldw, 0, static_cast<const T*>(cell.w_ih), K_in, j0, H);
  load_slice(ws, ldw, K_in, static_cast<const T*>(cell.w_hh), H, j0, H);
  const Split sp = make_split<T>(p.wk);
  // The epilogue of lane l: row l / kCols of its group, column l % kCols.
  const int64_t ej = j0 + sp.lane % kCols;
  const int er = sp.lane / kCols;
  float bias = 0.f;
  if (ej < H) {
    if (cell.b_hh != nullptr) bias += to_float(static_cast<const T*>(cell.b_hh)[ej]);
    if (project && cell.b_ih != nullptr) bias += to_float(static_cast<const T*>(cell.b_ih)[ej]);
  }
  __syncthreads();

  T* const out = static_cast<T*>(cell.out);
  const T* const h0 = static_cast<const T*>(cell.h0);
  const T* const x = static_cast<const T*>(cell.x);
  T* const hn = static_cast<T*>(cell.hn);
  const bool relu = p.a.relu;
  cg::grid_group grid = cg::this_grid();

  for (int64_t s = 0; s < p.supersteps; ++s) {
    const int64_t i = s - cell.delay;
    if (i >= 0 && i < steps) {  // block-uniform
      const int64_t t = cell.reverse ? steps - 1 - i : i;
      const T* hprev = h0;
      int64_t ldh = H;
      if (i > 0) {
        hprev = out + (cell.reverse ? t + 1 : t - 1) * B * ld;
        ldh = ld;
      }
      T* const zt = out + t * B * ld;
      const T* const xt = project ? x + t * B * cell.ld_x : nullptr;
      for (int64_t pass = 0; pass < B; pass += sp.rows_per_pass) {
        const int64_t r0 = pass + static_cast<int64_t>(sp.group) * kRows;
        float acc[kAcc];
#pragma unroll
        for (int a = 0; a < kAcc; ++a) acc[a] = 0.f;
        // k over [x_t | h_{t-1}] (one code path for both segments: fewer registers)
#pragma unroll 1
        for (int seg = project ? 0 : 1; seg < 2; ++seg) {
          const bool in = seg == 0;
          accumulate(acc, in ? xt : hprev, in ? cell.ld_x : ldh, r0, B, in ? ws : ws + K_in, ldw,
                     in ? K_in : H, sp);
        }
        const float sum = reduce_group(acc, red, sp);
        const int64_t r = r0 + er;
        if (sp.kw == 0 && r < B && ej < H) {
          T* const zp = zt + r * ld + ej;
          const float z = (project ? 0.f : to_float(__ldcg(zp))) + bias + sum;
          const T v = from_float<T>(act(z, relu));
          *zp = v;
          if (hn != nullptr && i == steps - 1) hn[r * H + ej] = v;
        }
      }
    }
    if (s + 1 < p.supersteps) grid.sync();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    persistent_backward_kernel(const __grid_constant__ BackwardParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int cidx = static_cast<int>(blockIdx.x) / p.blocks_per_cell;
  const PersistentBackwardCell& cell = p.a.cell[cidx];
  const int64_t H = p.a.H, B = p.a.B, steps = p.a.T, ld = p.a.ld;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x - cidx * p.blocks_per_cell) * kCols;
  T* ws = reinterpret_cast<T*>(smem);                                   // kCols x H
  float* red = reinterpret_cast<float*>(smem + kCols * H * sizeof(T));  // kWarps x 32

  load_slice(ws, H, 0, static_cast<const T*>(cell.wt_hh), H, j0, H);
  const Split sp = make_split<T>(p.wk);
  const int64_t ej = j0 + sp.lane % kCols;
  const int er = sp.lane / kCols;
  __syncthreads();

  const T* const h = static_cast<const T*>(cell.h);
  const T* const dy = static_cast<const T*>(cell.dy);
  T* const dz = static_cast<T*>(cell.dz);
  float* const dh = cell.dh;
  const bool relu = p.a.relu;
  cg::grid_group grid = cg::this_grid();

  // Super-step i handles step t_i (the i-th in backward order); its product reads dz of
  // t_(i-1), written by every block at super-step i - 1.
  for (int64_t i = 0; i <= steps; ++i) {
    const int64_t t = cell.reverse ? i : steps - 1 - i;           // valid for i < steps
    const int64_t tp = cell.reverse ? i - 1 : steps - i;          // valid for i > 0
    const T* const dzp = i > 0 ? dz + tp * B * ld : nullptr;
    for (int64_t pass = 0; pass < B; pass += sp.rows_per_pass) {
      const int64_t r0 = pass + static_cast<int64_t>(sp.group) * kRows;
      float sum = 0.f;
      if (i > 0) {  // block-uniform
        float acc[kAcc];
#pragma unroll
        for (int a = 0; a < kAcc; ++a) acc[a] = 0.f;
        accumulate(acc, dzp, ld, r0, B, ws, H, H, sp);
        sum = reduce_group(acc, red, sp);
      }
      const int64_t r = r0 + er;
      if (sp.kw == 0 && r < B && ej < H) {
        float g = i > 0 ? sum : dh[r * H + ej];
        if (i < steps) {
          const int64_t o = (t * B + r) * ld + ej;
          if (dy != nullptr) g += to_float(dy[o]);
          dz[o] = from_float<T>(act_backward(g, to_float(h[o]), relu));
        } else {
          dh[r * H + ej] = g;
        }
      }
    }
    if (i < steps) grid.sync();
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
const void* kernel_of(bool backward) {
  return backward ? reinterpret_cast<const void*>(&persistent_backward_kernel<T>)
                  : reinterpret_cast<const void*>(&persistent_forward_kernel<T>);
}

template <typename T>
cudaError_t plan_t(int64_t H, int cells, int64_t K_in, bool backward, PersistentPlan* plan) {
  *plan = PersistentPlan{};
  plan->threads = kThreads;
  const int64_t bpc = (H + kCols - 1) / kCols;
  const int64_t blocks = static_cast<int64_t>(cells) * bpc;
  plan->blocks = blocks > 0x7fffffffLL ? 0x7fffffff : static_cast<int>(blocks);
  plan->smem_bytes = static_cast<int64_t>(kCols) * (K_in + H) * static_cast<int64_t>(sizeof(T)) +
                     kWarps * 32 * static_cast<int64_t>(sizeof(float));
  const void* kernel = kernel_of<T>(backward);
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

// The cooperative launch of a feasible plan; a launch refused for size (occupancy said yes,
// the launch no, e.g. another context holds SMs) enqueues nothing and reports kCoResidency.
cudaError_t launch(const void* kernel, const PersistentPlan& plan, void* params,
                   cudaStream_t stream, PersistentStatus* status) {
  void* kargs[] = {params};
  cudaError_t err = cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kThreads), kargs,
                                                static_cast<size_t>(plan.smem_bytes), stream);
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    *status = PersistentStatus::kCoResidency;
    return cudaSuccess;
  }
  *status = err == cudaSuccess ? PersistentStatus::kLaunched : PersistentStatus::kCoResidency;
  return err;
}

template <typename T>
cudaError_t persistent_forward_t(const PersistentForward& a, cudaStream_t stream,
                                 PersistentStatus* status) {
  constexpr int64_t V = 16 / sizeof(T);
  if (a.T <= 0 || a.B <= 0 || a.H <= 0) {
    *status = PersistentStatus::kEmpty;
    return cudaSuccess;
  }
  bool ok = a.cells >= 1 && a.cells <= kMaxPersistentCells && a.H % V == 0;
  int64_t K_in = 0, max_delay = 0;
  for (int c = 0; c < a.cells && ok; ++c) {
    const PersistentCell& cell = a.cell[c];
    ok = cell.ld % V == 0 && cell.ld >= a.H && cell.delay >= 0 && aligned16(cell.w_hh) &&
         aligned16(cell.h0) && aligned16(cell.out) && aligned16(cell.hn);
    if (ok && cell.w_ih != nullptr) {
      ok = cell.K_in > 0 && cell.K_in % V == 0 && cell.ld_x % V == 0 && cell.ld_x >= cell.K_in &&
           aligned16(cell.w_ih) && aligned16(cell.x);
      K_in = std::max(K_in, cell.K_in);
    }
    max_delay = std::max<int64_t>(max_delay, cell.delay);
  }
  if (!ok) {
    *status = PersistentStatus::kUnaligned;
    return cudaSuccess;
  }
  PersistentPlan plan;
  cudaError_t err = plan_t<T>(a.H, a.cells, K_in, false, &plan);
  if (err != cudaSuccess) return err;
  if (plan.status != PersistentStatus::kLaunched) {
    *status = plan.status;
    return cudaSuccess;
  }
  ForwardParams prm{a, plan.blocks / a.cells, warps_per_group(a.B), a.T + max_delay};
  return launch(kernel_of<T>(false), plan, &prm, stream, status);
}

template <typename T>
cudaError_t persistent_backward_t(const PersistentBackward& a, cudaStream_t stream,
                                  PersistentStatus* status) {
  constexpr int64_t V = 16 / sizeof(T);
  if (a.T <= 0 || a.B <= 0 || a.H <= 0) {
    *status = PersistentStatus::kEmpty;
    return cudaSuccess;
  }
  bool ok = (a.cells == 1 || a.cells == 2) && a.H % V == 0 && a.ld % V == 0 && a.ld >= a.H;
  for (int c = 0; c < a.cells && ok; ++c) {
    const PersistentBackwardCell& cell = a.cell[c];
    ok = aligned16(cell.wt_hh) && aligned16(cell.dz) && cell.h != nullptr &&
         cell.dh != nullptr;
  }
  if (!ok) {
    *status = PersistentStatus::kUnaligned;
    return cudaSuccess;
  }
  PersistentPlan plan;
  cudaError_t err = plan_t<T>(a.H, a.cells, 0, true, &plan);
  if (err != cudaSuccess) return err;
  if (plan.status != PersistentStatus::kLaunched) {
    *status = plan.status;
    return cudaSuccess;
  }
  BackwardParams prm{a, plan.blocks / a.cells, warps_per_group(a.B)};
  return launch(kernel_of<T>(true), plan, &prm, stream, status);
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
      [&](auto tag) { return persistent_forward_t<decltype(tag)>(args, stream, status); },
      status);
}

cudaError_t persistent_backward(DType dtype, const PersistentBackward& args,
                                cudaStream_t stream, PersistentStatus* status) {
  *status = PersistentStatus::kUnsupportedDType;
  return dispatch_persistent(
      dtype,
      [&](auto tag) { return persistent_backward_t<decltype(tag)>(args, stream, status); },
      status);
}

cudaError_t persistent_plan(DType dtype, int64_t H, int cells, int64_t K_in, bool backward,
                            PersistentPlan* plan) {
  PersistentStatus st = PersistentStatus::kLaunched;
  const cudaError_t err = dispatch_persistent(
      dtype,
      [&](auto tag) { return plan_t<decltype(tag)>(H, cells, K_in, backward, plan); },
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
