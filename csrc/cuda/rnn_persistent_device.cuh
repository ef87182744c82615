// The persistent recurrence kernels' device code (issue 5; variants P1, P3, P4 and B1 in
// bench/NOTES.md): helpers, the two block-product policies and the forward and backward
// kernels.  Pure CUDA (no torch header).  Included by cuda/rnn_persistent.cu (the launchers)
// and, with RNN_EXT_SIMT_EMULATION defined, by the CPU emulation in tests/simt/, which runs this
// very code on host threads (tests/test_cuda_emulated.py).  What they compute: the comment
// of cuda/rnn_persistent.h.
//
// Launch: one cooperative grid of cells * ceil(H / kCols) blocks of kThreads threads.  Block b
// belongs to cell b / blocks_per_cell and owns its kCols output columns
// j0 = kCols * (b mod blocks_per_cell) .. j0 + kCols - 1.  With P5's row groups (the kSplit
// kernels) a cell has row_groups copies of its ceil(H / kCols) column blocks, copy g computing
// only the rows [g rows_per_group, min(B, (g + 1) rows_per_group)) (block_place).
//
// Shared memory (dynamic): ws = the block's weight slice, kCols rows of ldw elements in the
// storage dtype (zero rows for j >= H), loaded once:
//   forward:  row c = [W_ih[j0 + c, 0:K_in] | W_hh[j0 + c, 0:H]]   (K_in = 0 without projection)
//   backward: row c = W_hh^T[j0 + c, 0:H]
// then red = kWarps x 32 floats for the cross-warp sum.
//
// The FMA block product (FmaProduct, P1): for kRows-row groups of the batch, sum_k X[r, k] ws[c, k]
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
#pragma once

#include "cuda/rnn_persistent.h"

#ifdef RNN_EXT_SIMT_EMULATION
#include "simt_emulation.h"  // tests/simt/: CUDA's built-ins on host threads
#else
#include <cooperative_groups.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/elementwise.cuh"
#include "cuda/warp_reduce.cuh"

namespace rnn_ext::gpu::persistent_detail {

namespace cg = cooperative_groups;

#ifndef RNN_EXT_SIMT_EMULATION
// The block's dynamic shared memory (the emulation provides its own).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem_[];
  return smem_;
}
#endif

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 8;  // output columns per block
constexpr int kRows = 4;  // batch rows per row group
constexpr int kAcc = kRows * kCols;
static_assert(kAcc == 32, "the reduce-scatter maps accumulator l to lane l");

// ---------------------------------------------------------------------------------------------
// Vector loads (conversions and the nonlinearity: cuda/elementwise.cuh)

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
// (k and shared-memory offsets fit in int: the slice is at most 227 KiB.)
struct Split {
  int wk;              // warps per row group (they split k): 1, 2, 4 or 8
  int group;           // this warp's row group within a pass
  int kw;              // this warp's share of k
  int lane;
  int rows_per_pass;
  int kfirst;          // first k of this thread (in elements; a multiple of V)
  int kstride;         // distance between this thread's k (elements)
};

template <typename T>
__device__ __forceinline__ Split make_split(int wk) {
  constexpr int V = 16 / sizeof(T);
  Split s;
  const int warp = threadIdx.x >> 5;
  s.wk = wk;
  s.lane = threadIdx.x & 31;
  s.group = warp / wk;
  s.kw = warp - s.group * wk;
  s.rows_per_pass = (kWarps / wk) * kRows;
  s.kfirst = (s.kw * 32 + s.lane) * V;
  s.kstride = 32 * wk * V;
  return s;
}

// acc[r * kCols + c] += sum over this thread's k < K of x[(r0 + r) * ldx + k] * ws[c * ldw + k],
// rows r0 + r >= B contributing nothing.
template <typename T>
__device__ __forceinline__ void accumulate(float (&acc)[kAcc], const T* x, int64_t ldx,
                                           int64_t r0, int64_t B, const T* ws, int ldw, int K,
                                           const Split& sp) {
  constexpr int V = 16 / sizeof(T);
  const T* xrow[kRows];
  bool valid[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    valid[r] = r0 + r < B;
    xrow[r] = x + (valid[r] ? r0 + r : 0) * ldx;
  }
  for (int k = sp.kfirst; k < K; k += sp.kstride) {
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

// ---------------------------------------------------------------------------------------------
// Block products.  Both policies compute, for the rows [pass0, pass0 + rows_per_pass()) of a
// pass, out[r, j0 + c] = sum_k [x | h][r, k] slice[c, k] over k < K_in (x, when the cell
// projects) then k < H (h), and call epi(r, j, sum) once for every r < B, j < H of the pass,
// each from one thread.  pass() is called by every thread of the block (it __syncthreads).
// compute == false: no product, epi(r, j, 0) (the backward's first super-step).

// P1: the slice in shared memory, FMA in fp32 (see the file comment).
template <typename T>
struct FmaProduct {
  T* ws;
  float* red;
  int ldw, K_in, j0, H;
  Split sp;

  __device__ __forceinline__ void init(unsigned char* smem, const T* w_in, int64_t k_in,
                                       const T* w_hh, int64_t h, int64_t j0_, int wk) {
    K_in = static_cast<int>(k_in);
    H = static_cast<int>(h);
    j0 = static_cast<int>(j0_);
    ldw = K_in + H;
    ws = reinterpret_cast<T*>(smem);                                     // kCols x ldw
    red = reinterpret_cast<float*>(smem + kCols * ldw * sizeof(T));      // kWarps x 32
    if (K_in > 0) load_slice(ws, ldw, 0, w_in, K_in, j0, H);
    load_slice(ws, ldw, K_in, w_hh, H, j0, H);
    sp = make_split<T>(wk);
  }
  __device__ __forceinline__ int rows_per_pass() const { return sp.rows_per_pass; }

  template <typename Epi>
  __device__ __forceinline__ void pass(const T* x, int64_t ldx, const T* h, int64_t ldh,
                                       int64_t pass0, int64_t B, bool compute, Epi&& epi) {
    const int64_t r0 = pass0 + static_cast<int64_t>(sp.group) * kRows;
    float sum = 0.f;
    if (compute) {  // block-uniform
      float acc[kAcc];
#pragma unroll
      for (int a = 0; a < kAcc; ++a) acc[a] = 0.f;
      // k over [x | h] (one code path for both segments: fewer registers)
#pragma unroll 1
      for (int seg = K_in > 0 ? 0 : 1; seg < 2; ++seg) {
        const bool in = seg == 0;
        accumulate(acc, in ? x : h, in ? ldx : ldh, r0, B, in ? ws : ws + K_in, ldw,
                   in ? K_in : H, sp);
      }
      sum = reduce_group(acc, red, sp);
    }
    const int64_t r = r0 + sp.lane / kCols;
    const int j = j0 + sp.lane % kCols;
    if (sp.kw == 0 && r < B && j < H) epi(r, j, sum);
  }
};

// P3: tensor cores.  The block's 8 columns are one n8 tile of mma.sync; warp w owns the
// k-tiles kt = w, w + 8, w + 16, ... of [x | h] (kK = 16 elements for fp16/bf16, 8 for tf32)
// and keeps their B fragments -- its part of the weight slice -- in registers for the whole
// sequence (at most kMaxKTiles per warp).  Per pass (up to 8 m-tiles of 16 rows), a warp loads
// the A fragments of its k-tiles straight from L2 (__ldcg), accumulates 16x8 fp32 C fragments
// per m-tile, and writes them to shared memory; then every thread sums the 8 warps' partials
// of 4 outputs and runs the epilogue.
// A-fragment loads: registers 0 and 2 of a thread hold the same row at k offsets kHalf apart
// (16 bytes for fp16/bf16 and for tf32), so loading them as the fragment layout places them
// takes one 4-byte load each, two half-used 32-byte sectors per row.  A dot product does not
// care which k pairs with which as long as A and B agree: the k-tile is read in the order
// "thread q's registers 0 and 2 are memory k = 2*kColOf*q .. +2*kColOf-1", one 8-byte load per
// row (registers 0 and 2 from it), and the B fragments follow the same order at init.
// kNarrow (PersistentPrefs::narrow_a_loads, RNN_EXT_CUDA_MMA_NARROW_A=1; a kernel of its own)
// keeps the layout's own order and its 4-byte loads, so the two can be measured against each
// other on a GPU (bench/NOTES.md).
// Fragment layouts (PTX ISA, mma.m16n8k16 f16/bf16 and m16n8k8 tf32), g = lane / 4,
// q = lane % 4:
//   A (row-major 16 x kK):   16-bit: regs (g, 2q..2q+1), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)
//                            tf32:   (g, q), (g+8, q), (g, q+4), (g+8, q+4)
//   B (kK x 8, "col"):       16-bit: (k 2q..2q+1, n g), (k 2q+8..2q+9, n g);  tf32: (q, g), (q+4, g)
//   C (16 x 8 fp32):         (g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1)
constexpr int kMaxKTiles = 16;   // per warp: K_in + H <= 8 * 16 * kK
constexpr int kMmaRows = 128;    // rows per pass: 8 m-tiles

template <typename T>
struct MmaTraits;
template <>
struct MmaTraits<__nv_bfloat16> {
  static constexpr int kK = 16;
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(RNN_EXT_SIMT_EMULATION)
    simt::mma(simt::Mma::kBF16, c, a, b);
#else
    __trap();  // the host never selects this variant below sm_80
#endif
  }
};
template <>
struct MmaTraits<__half> {
  static constexpr int kK = 16;
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(RNN_EXT_SIMT_EMULATION)
    simt::mma(simt::Mma::kF16, c, a, b);
#else
    __trap();
#endif
  }
};
template <>
struct MmaTraits<float> {
  static constexpr int kK = 8;
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(RNN_EXT_SIMT_EMULATION)
    simt::mma(simt::Mma::kTF32, c, a, b);
#else
    __trap();
#endif
  }
};

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
#elif defined(RNN_EXT_SIMT_EMULATION)
  r = simt::cvt_rna_tf32(v);
#else
  r = __float_as_uint(v);
#endif
  return r;
}

// Two consecutive elements p[0], p[1] as one fragment register (zero when !ok): 16-bit types
// load them as one 32-bit word; float (tf32) loads p[0] only (its fragments hold one element
// per register) -- see frag().
template <typename T>
__device__ __forceinline__ uint32_t frag(const T* p, bool ok, bool cached) {
  if (!ok) return 0u;
  if constexpr (sizeof(T) == 2) {
    const unsigned* w = reinterpret_cast<const unsigned*>(p);
    return cached ? __ldg(w) : __ldcg(w);
  } else {
    return to_tf32(cached ? __ldg(p) : __ldcg(p));
  }
}

// Two fragment registers from one 8-byte load at p (both zero when !ok): 16-bit types two
// elements each (p[0..1], p[2..3]), float (tf32) one each (p[0], p[1]).  p 8-byte aligned.
template <typename T>
__device__ __forceinline__ void frag_pair(const T* p, bool ok, uint32_t& lo, uint32_t& hi) {
  if (!ok) {
    lo = hi = 0u;
    return;
  }
  const uint2 v = __ldcg(reinterpret_cast<const uint2*>(p));
  if constexpr (sizeof(T) == 2) {
    lo = v.x;
    hi = v.y;
  } else {
    lo = to_tf32(__uint_as_float(v.x));
    hi = to_tf32(__uint_as_float(v.y));
  }
}

// kALoad: how the A fragments are loaded: 0 = one 8-byte load per two registers, m-tile after
// m-tile (the default); 1 = the mma layout's own order, 4-byte loads (kNarrow); 2 = as 0, but
// the loads of a group of kAGroup m-tiles issued before their mmas (P3b, bench/NOTES.md).
constexpr int kAGroup = 2;

template <typename T, int kALoad>
struct MmaProduct {
  static constexpr bool kNarrow = kALoad == 1;
  static constexpr int kK = MmaTraits<T>::kK;
  // 16-bit: a register holds columns (2q, 2q+1) and the second half-tile starts at +8;
  // tf32: a register holds column q and the second half starts at +4.
  static constexpr int kColOf = sizeof(T) == 2 ? 2 : 1;
  static constexpr int kHalf = kK / 2;
  uint32_t b[kMaxKTiles][2];
  float* red;  // kWarps x kMmaRows x kCols
  int K_in, KT, j0, H;
  int warp, g, q;

  // memory k offsets (within a k-tile) of this thread's registers 0 and 2 of A, and of its
  // registers 0 and 1 of B: the layout's own (kNarrow), or the 8-byte-load order
  __device__ __forceinline__ int k_lo() const { return kNarrow ? kColOf * q : 2 * kColOf * q; }
  __device__ __forceinline__ int k_hi() const {
    return kNarrow ? kColOf * q + kHalf : 2 * kColOf * q + kColOf;
  }

  __device__ __forceinline__ void init(unsigned char* smem, const T* w_in, int64_t k_in,
                                       const T* w_hh, int64_t h, int64_t j0_, int /*wk*/) {
    K_in = static_cast<int>(k_in);
    H = static_cast<int>(h);
    j0 = static_cast<int>(j0_);
    KT = (K_in + H) / kK;
    red = reinterpret_cast<float*>(smem);
    warp = threadIdx.x >> 5;
    g = (threadIdx.x & 31) >> 2;
    q = threadIdx.x & 3;
    const int j = j0 + g;  // this thread's column of B
#pragma unroll
    for (int s = 0; s < kMaxKTiles; ++s) {
      const int kt = warp + 8 * s;
      const bool live = kt < KT && j < H;
      const int k = kt * kK;
      const bool in = k < K_in;
      const T* row = in ? w_in + static_cast<int64_t>(j) * K_in + k
                        : w_hh + static_cast<int64_t>(j) * H + (k - K_in);
      b[s][0] = frag(row + k_lo(), live, true);
      b[s][1] = frag(row + k_hi(), live, true);
    }
  }
  __device__ __forceinline__ int rows_per_pass() const { return kMmaRows; }

  template <typename Epi>
  __device__ __forceinline__ void pass(const T* x, int64_t ldx, const T* h, int64_t ldh,
                                       int64_t pass0, int64_t B, bool compute, Epi&& epi) {
    const int64_t rows = B - pass0 < kMmaRows ? B - pass0 : kMmaRows;
    const int mts = static_cast<int>((rows + 15) / 16);  // m-tiles in this pass
    if (!compute) {
      for (int i = threadIdx.x; i < rows * kCols; i += kThreads) {
        const int64_t r = pass0 + i / kCols;
        const int j = j0 + i % kCols;
        if (j < H) epi(r, j, 0.f);
      }
      return;
    }
    float acc[kMmaRows / 16][4];
#pragma unroll
    for (int m = 0; m < kMmaRows / 16; ++m) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][e] = 0.f;
    }
#pragma unroll
    for (int s = 0; s < kMaxKTiles; ++s) {
      const int kt = warp + 8 * s;
      if (kt < KT) {  // warp-uniform
        const int k = kt * kK;
        const bool in = k < K_in;
        const T* src = in ? x + k : h + (k - K_in);
        const int64_t ld = in ? ldx : ldh;
        if constexpr (kALoad == 2) {
#pragma unroll
          for (int m0 = 0; m0 < kMmaRows / 16; m0 += kAGroup) {
            if (m0 < mts) {  // block-uniform
              uint32_t a[kAGroup][4];
#pragma unroll
              for (int u = 0; u < kAGroup; ++u) {  // the group's loads, all in flight
                const int64_t ra = pass0 + (m0 + u) * 16 + g, rb = ra + 8;
                const bool va = m0 + u < mts && ra < B, vb = m0 + u < mts && rb < B;
                frag_pair(src + (va ? ra : 0) * ld + k_lo(), va, a[u][0], a[u][2]);
                frag_pair(src + (vb ? rb : 0) * ld + k_lo(), vb, a[u][1], a[u][3]);
              }
#pragma unroll
              for (int u = 0; u < kAGroup; ++u) {
                if (m0 + u < mts) MmaTraits<T>::mma(acc[m0 + u], a[u], b[s]);
              }
            }
          }
        } else {
#pragma unroll
          for (int m = 0; m < kMmaRows / 16; ++m) {
            if (m < mts) {  // block-uniform
              const int64_t ra = pass0 + m * 16 + g, rb = ra + 8;
              const T* pa = src + (ra < B ? ra : 0) * ld + k_lo();
              const T* pb = src + (rb < B ? rb : 0) * ld + k_lo();
              uint32_t a[4];
              if constexpr (kNarrow) {
                a[0] = frag(pa, ra < B, false);
                a[1] = frag(pb, rb < B, false);
                a[2] = frag(pa + kHalf, ra < B, false);
                a[3] = frag(pb + kHalf, rb < B, false);
              } else {
                frag_pair(pa, ra < B, a[0], a[2]);
                frag_pair(pb, rb < B, a[1], a[3]);
              }
              MmaTraits<T>::mma(acc[m], a, b[s]);
            }
          }
        }
      }
    }
    // partials -> shared memory, then each thread sums 4 outputs over the warps
#pragma unroll
    for (int m = 0; m < kMmaRows / 16; ++m) {
      if (m < mts) {
        float* r0 = red + (warp * kMmaRows + m * 16 + g) * kCols + 2 * q;
        *reinterpret_cast<float2*>(r0) = make_float2(acc[m][0], acc[m][1]);
        *reinterpret_cast<float2*>(r0 + 8 * kCols) = make_float2(acc[m][2], acc[m][3]);
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < mts * 16 * kCols; i += kThreads) {
      const int64_t r = pass0 + i / kCols;
      const int j = j0 + i % kCols;
      if (r < B && j < H) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += red[w * kMmaRows * kCols + i];
        epi(r, j, sum);
      }
    }
    __syncthreads();  // red is reused by the next pass
  }
};

template <typename T, bool kMma, int kALoad>
using Product = std::conditional_t<kMma, MmaProduct<T, kALoad>, FmaProduct<T>>;

// blocks_per_cell = row_groups x ceil(H / 8): block b of a cell computes column slice
// b % ceil(H/8) for the rows [g rows_per_group, min(B, (g + 1) rows_per_group)), g = b /
// ceil(H/8) (P5; one group of all rows by default).
struct ForwardParams {
  PersistentForward a;
  int blocks_per_cell;
  int wk;
  int64_t supersteps;  // T + the largest delay
  int row_groups = 1;
  int64_t rows_per_group = INT64_MAX;
};

struct BackwardParams {
  PersistentBackward a;
  int blocks_per_cell;
  int wk;
  int row_groups = 1;
  int64_t rows_per_group = INT64_MAX;
};

// This block's column slice (j0) and rows [r_lo, r_hi) within its cell.  (32-bit rows in the
// split kernels: persistent_row_groups splits only batches below 2^31 rows.)
template <bool kSplit>
struct BlockPlace {
  using Row = std::conditional_t<kSplit, int, int64_t>;
  int64_t j0;
  Row r_lo, r_hi;
};

__device__ __forceinline__ BlockPlace<true> block_place(int cidx, int blocks_per_cell,
                                                        int row_groups, int64_t rows_per_group,
                                                        int64_t B) {
  const int b = static_cast<int>(blockIdx.x) - cidx * blocks_per_cell;
  const int cols = blocks_per_cell / row_groups;
  const int g = b / cols;
  const int rpg = static_cast<int>(rows_per_group);
  const int r_lo = g * rpg;
  // (r_lo + rpg <= row_groups * rows_per_group < 2^31: persistent_row_groups sees to it)
  const int r_hi = r_lo + rpg < static_cast<int>(B) ? r_lo + rpg : static_cast<int>(B);
  return {static_cast<int64_t>(b - g * cols) * kCols, r_lo, r_hi};
}

template <bool kSplit>
__device__ __forceinline__ BlockPlace<kSplit> place_of(int cidx, int blocks_per_cell,
                                                       int row_groups, int64_t rows_per_group,
                                                       int64_t B) {
  if constexpr (kSplit) {
    return block_place(cidx, blocks_per_cell, row_groups, rows_per_group, B);
  } else {
    return {static_cast<int64_t>(blockIdx.x - cidx * blocks_per_cell) * kCols, 0, B};
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels

// __grid_constant__: the cell table is indexed by a block-dependent value without a copy to
// local memory (sm_70+).
// kALoad: the tensor-core variant's A loads (MmaProduct: 0 8-byte, 1 4-byte, 2 grouped).
// kSplit: P5's row groups (p.row_groups > 1); a kernel of its own so that the launch without
// them keeps its registers (the row range costs some: ptxas spilled in the forward kernels).
template <typename T, bool kMma, int kALoad = 0, bool kSplit = false>
__global__ void __launch_bounds__(kThreads, 2)
    persistent_forward_kernel(const __grid_constant__ ForwardParams p) {
  unsigned char* const smem = dynamic_smem();
  const int cidx = static_cast<int>(blockIdx.x) / p.blocks_per_cell;
  const PersistentCell& cell = p.a.cell[cidx];
  const int64_t H = p.a.H, B = p.a.B, steps = p.a.T, ld = cell.ld;
  const auto place = place_of<kSplit>(cidx, p.blocks_per_cell, p.row_groups, p.rows_per_group, B);
  const int64_t j0 = place.j0;
  const bool project = cell.w_ih != nullptr;

  // 1. The block's weight slice into shared memory / registers, once.
  Product<T, kMma, kALoad> prod;
  prod.init(smem, static_cast<const T*>(cell.w_ih), project ? cell.K_in : 0,
            static_cast<const T*>(cell.w_hh), H, j0, p.wk);
  const T* const b_hh = static_cast<const T*>(cell.b_hh);
  const T* const b_ih = project ? static_cast<const T*>(cell.b_ih) : nullptr;
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
      const bool last = i == steps - 1;
      for (int64_t pass = place.r_lo; pass < place.r_hi; pass += prod.rows_per_pass()) {
        prod.pass(xt, cell.ld_x, hprev, ldh, pass, place.r_hi, true, [&](int64_t r, int j, float sum) {
          T* const zp = zt + r * ld + j;
          float z = project ? 0.f : to_acc(__ldcg(zp));  // P_t, or the in-kernel projection
          if (b_hh != nullptr) z += to_acc(b_hh[j]);
          if (b_ih != nullptr) z += to_acc(b_ih[j]);
          const T v = from_acc<T>(act(z + sum, relu));
          *zp = v;
          if (hn != nullptr && last) hn[r * H + j] = v;
        });
      }
    }
    if (s + 1 < p.supersteps) grid.sync();
  }
}

template <typename T, bool kMma, int kALoad = 0, bool kSplit = false>
__global__ void __launch_bounds__(kThreads, 2)
    persistent_backward_kernel(const __grid_constant__ BackwardParams p) {
  unsigned char* const smem = dynamic_smem();
  const int cidx = static_cast<int>(blockIdx.x) / p.blocks_per_cell;
  const PersistentBackwardCell& cell = p.a.cell[cidx];
  const int64_t H = p.a.H, B = p.a.B, steps = p.a.T, ld = p.a.ld;
  const auto place = place_of<kSplit>(cidx, p.blocks_per_cell, p.row_groups, p.rows_per_group, B);
  const int64_t j0 = place.j0;

  Product<T, kMma, kALoad> prod;  // the slice of W_hh^T: row j of it is column j of W_hh
  prod.init(smem, nullptr, 0, static_cast<const T*>(cell.wt_hh), H, j0, p.wk);
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
    const int64_t t = cell.reverse ? i : steps - 1 - i;   // valid for i < steps
    const int64_t tp = cell.reverse ? i - 1 : steps - i;  // valid for i > 0
    const T* const dzp = i > 0 ? dz + tp * B * ld : nullptr;
    for (int64_t pass = place.r_lo; pass < place.r_hi; pass += prod.rows_per_pass()) {
      prod.pass(nullptr, 0, dzp, ld, pass, place.r_hi, i > 0, [&](int64_t r, int j, float sum) {
        float gsum = i > 0 ? sum : dh[r * H + j];
        if (i < steps) {
          const int64_t o = (t * B + r) * ld + j;
          if (dy != nullptr) gsum += to_acc(dy[o]);
          dz[o] = from_acc<T>(act_backward(gsum, to_acc(h[o]), relu));
        } else {
          dh[r * H + j] = gsum;
        }
      });
    }
    if (i < steps) grid.sync();
  }
}

__global__ void __launch_bounds__(kThreads) grid_barrier_kernel(int64_t steps) {
  cg::grid_group grid = cg::this_grid();
  for (int64_t i = 0; i < steps; ++i) grid.sync();
}


// Warps per row group for B rows: as few passes as possible, and for small B the spare warps
// split k instead of idling.
int warps_per_group(int64_t B) {
  if (B <= kRows) return 8;
  if (B <= 2 * kRows) return 4;
  if (B <= 4 * kRows) return 2;
  return 1;
}

}  // namespace rnn_ext::gpu::persistent_detail
