// CUDA's built-ins on host threads, for running csrc/cuda/rnn_persistent_device.cuh on a machine
// without a GPU (tests/test_cuda_emulated.py).  Every CUDA thread of a launch is a std::thread;
// __syncthreads, warp shuffles and the grid barrier are std::barriers, so the kernels' own code
// -- index math, passes, reductions, epilogues, the super-step schedule -- runs unchanged, with
// the synchronisation CUDA guarantees and no more.  mma.sync is emulated from the fragment
// layouts the PTX ISA documents (written from the ISA, independently of the kernels' loads).
// Not part of the extension; compiled only by the tests.
#pragma once

// The real headers first (types, fp16/bf16 conversions), so that the macros below cannot
// break their declarations (threadIdx & co.) when the kernels' file includes them again.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __align__
#define __global__
#define __device__
// A kernel's static __shared__ array becomes a function-local static: shared by the threads of
// a block, and correct because launch_blocks() runs one block at a time (the persistent
// kernels, whose blocks must all be resident, use dynamic shared memory only).
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))

namespace simt {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};

struct Warp {
  std::barrier<> bar{32};
  uint64_t vals[32] = {};
  uint32_t a[32][4] = {}, b[32][2] = {};
  float c[32][4] = {};
};

struct Block {
  explicit Block(unsigned threads, size_t smem_bytes)
      : bar(threads), warps(threads / 32), smem(smem_bytes + 16) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
};

struct Ctx {
  Dim thread_idx, block_idx, block_dim, grid_dim;
  Block* block = nullptr;
  std::barrier<>* grid = nullptr;
};

inline Ctx& ctx() {
  static thread_local Ctx c;
  return c;
}
inline int lane() { return static_cast<int>(ctx().thread_idx.x & 31); }
inline Warp& warp() { return *ctx().block->warps[ctx().thread_idx.x >> 5]; }

template <typename T>
T shfl_xor(T v, int offset) {
  static_assert(sizeof(T) <= 8, "shuffle of a register");
  Warp& w = warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.vals[lane()] = bits;
  w.bar.arrive_and_wait();
  const uint64_t got = w.vals[lane() ^ offset];
  w.bar.arrive_and_wait();  // nobody overwrites vals before every lane has read
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

// mma.sync.aligned.{m16n8k16 f16/bf16, m16n8k8 tf32}.row.col.f32, fp32 accumulate.
enum class Mma { kF16, kBF16, kTF32 };

inline float decode16(uint16_t bits, Mma kind) {
  if (kind == Mma::kBF16) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

// Element e (0 = low half) of a fragment register: tf32 holds one float, f16/bf16 two.
inline float element(Mma kind, uint32_t word, int e) {
  if (kind == Mma::kTF32) {
    float f;
    std::memcpy(&f, &word, 4);
    return f;
  }
  return decode16(static_cast<uint16_t>(word >> (16 * e)), kind);
}

// The element of register `reg` of lane (g, q) at position `e` (0 = low half) of an A, B or C
// fragment, per the PTX ISA's "Matrix Fragments for mma.m16n8k16 / m16n8k8" (floating point).
inline void a_pos(Mma kind, int g, int q, int reg, int e, int* row, int* col) {
  if (kind == Mma::kTF32) {  // a0: (g, q), a1: (g+8, q), a2: (g, q+4), a3: (g+8, q+4)
    *row = g + ((reg & 1) ? 8 : 0);
    *col = q + ((reg & 2) ? 4 : 0);
    return;
  }
  const int i = reg * 2 + e;  // a0..a7
  *row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
  *col = q * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
inline void b_pos(Mma kind, int g, int q, int reg, int e, int* row, int* col) {
  *col = g;
  if (kind == Mma::kTF32) {  // b0: (q, g), b1: (q+4, g)
    *row = q + (reg ? 4 : 0);
    return;
  }
  const int i = reg * 2 + e;  // b0..b3
  *row = q * 2 + (i & 1) + (i >= 2 ? 8 : 0);
}
inline void c_pos(int g, int q, int i, int* row, int* col) {
  *row = g + (i >= 2 ? 8 : 0);
  *col = q * 2 + (i & 1);
}

inline void mma(Mma kind, float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Warp& w = warp();
  const int l = lane();
  for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
  for (int i = 0; i < 2; ++i) w.b[l][i] = b[i];
  w.bar.arrive_and_wait();
  const int K = kind == Mma::kTF32 ? 8 : 16;
  float A[16][16], B[16][8];
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln >> 2, q = ln & 3;
    const int per = kind == Mma::kTF32 ? 1 : 2;
    for (int reg = 0; reg < 4; ++reg) {
      for (int e = 0; e < per; ++e) {
        int r, cc;
        a_pos(kind, g, q, reg, e, &r, &cc);
        A[r][cc] = element(kind, w.a[ln][reg], e);
      }
    }
    for (int reg = 0; reg < 2; ++reg) {
      for (int e = 0; e < per; ++e) {
        int r, cc;
        b_pos(kind, g, q, reg, e, &r, &cc);
        B[r][cc] = element(kind, w.b[ln][reg], e);
      }
    }
  }
  const int g = l >> 2, q = l & 3;
  for (int i = 0; i < 4; ++i) {
    int r, cc;
    c_pos(g, q, i, &r, &cc);
    double s = c[i];
    for (int k = 0; k < K; ++k) s += static_cast<double>(A[r][k]) * B[k][cc];
    c[i] = static_cast<float>(s);
  }
  w.bar.arrive_and_wait();  // fragments stay until every lane has computed
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (the low 13 bits
// of the result are zero).  NaN/Inf pass unchanged.
inline uint32_t cvt_rna_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  u += 0x1000u;  // half of the dropped 13 bits: ties go away from zero (sign-magnitude)
  return u & 0xffffe000u;
}

// Runs kernel(args...) on grid x block host threads with `smem_bytes` of dynamic shared
// memory per block.  Returns after every thread finished.
template <typename F>
void launch(unsigned grid, unsigned block, size_t smem_bytes, F&& kernel) {
  std::barrier<> grid_bar(static_cast<std::ptrdiff_t>(grid) * block);
  std::vector<std::unique_ptr<Block>> blocks;
  for (unsigned b = 0; b < grid; ++b) blocks.push_back(std::make_unique<Block>(block, smem_bytes));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(grid) * block);
  for (unsigned b = 0; b < grid; ++b) {
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, b, t] {
        Ctx& c = ctx();
        c.thread_idx = {t, 0, 0};
        c.block_idx = {b, 0, 0};
        c.block_dim = {block, 1, 1};
        c.grid_dim = {grid, 1, 1};
        c.block = blocks[b].get();
        c.grid = &grid_bar;
        kernel();
      });
    }
  }
  for (auto& th : threads) th.join();
}

// A non-cooperative launch: the blocks of `grid` one after another (CUDA promises no order
// and no concurrency between them), each on `block` host threads.
template <typename F>
void launch_blocks(dim3 grid, unsigned block, F&& kernel) {
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block blk(block, 0);
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
          threads.emplace_back([&, t] {
            Ctx& c = ctx();
            c.thread_idx = {t, 0, 0};
            c.block_idx = {x, y, z};
            c.block_dim = {block, 1, 1};
            c.grid_dim = {grid.x, grid.y, grid.z};
            c.block = &blk;
            c.grid = nullptr;
            kernel();
          });
        }
        for (auto& th : threads) th.join();
      }
    }
  }
}

inline cudaError_t last_error() { return cudaSuccess; }  // emulated launches cannot fail late

// The device the launchers' feasibility queries see: an H100 SXM / H200 by default (132 SMs,
// 227 KiB opt-in shared memory per block, 228 KiB per SM, 64 K registers per SM, sm_90).
// SIMT_SMS overrides the SM count, so that tests can make co-residency bind.
struct Device {
  int sms = 132, optin = 227 * 1024, smem_per_sm = 228 * 1024, major = 9, coop = 1;
  int regs_per_thread = 128;  // what ptxas reports for the persistent kernels (NOTES.md)
};
inline Device& device() {
  static Device d = [] {
    Device v;
    if (const char* e = std::getenv("SIMT_SMS")) v.sms = std::atoi(e);
    return v;
  }();
  return d;
}
inline cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t device_get_attribute(int* v, cudaDeviceAttr attr, int /*dev*/) {
  const Device& d = device();
  switch (attr) {
    case cudaDevAttrCooperativeLaunch: *v = d.coop; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = d.optin; break;
    case cudaDevAttrMultiProcessorCount: *v = d.sms; break;
    case cudaDevAttrComputeCapabilityMajor: *v = d.major; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
inline cudaError_t func_get_attributes(cudaFuncAttributes* fa, const void* /*kernel*/) {
  *fa = cudaFuncAttributes{};
  fa->numRegs = device().regs_per_thread;
  fa->maxDynamicSharedSizeBytes = 48 * 1024;
  return cudaSuccess;
}
inline cudaError_t func_set_attribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t occupancy(int* n, const void* /*kernel*/, int threads, size_t smem) {
  const Device& d = device();
  const int by_regs = 65536 / (d.regs_per_thread * threads);
  const int by_smem = d.smem_per_sm / static_cast<int>(smem + 1024);  // + 1 KiB reserved per block
  *n = std::min(by_regs, by_smem);
  return cudaSuccess;
}

}  // namespace simt

#define cudaGetLastError() ::simt::last_error()
#define cudaGetDevice(...) ::simt::get_device(__VA_ARGS__)
#define cudaDeviceGetAttribute(...) ::simt::device_get_attribute(__VA_ARGS__)
#define cudaFuncGetAttributes(...) ::simt::func_get_attributes(__VA_ARGS__)
#define cudaFuncSetAttribute(...) ::simt::func_set_attribute(__VA_ARGS__)
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor(...) ::simt::occupancy(__VA_ARGS__)

#define threadIdx (::simt::ctx().thread_idx)
#define blockIdx (::simt::ctx().block_idx)
#define blockDim (::simt::ctx().block_dim)
#define gridDim (::simt::ctx().grid_dim)

inline void __syncthreads() { ::simt::ctx().block->bar.arrive_and_wait(); }
template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int offset) {
  return ::simt::shfl_xor(v, offset);
}
// A GPU faults on a load that is not aligned to its size (8 and 16 bytes for the vector
// types): so does the emulation, instead of reading it as the host would.
template <typename T>
inline const T* simt_aligned_load_ptr(const T* p, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % sizeof(T) != 0) {
    std::fprintf(stderr, "simt: %s of %zu bytes at a misaligned address %p\n", what, sizeof(T),
                 static_cast<const void*>(p));
    std::abort();
  }
  return p;
}
template <typename T>
inline T __ldcg(const T* p) { return *simt_aligned_load_ptr(p, "__ldcg"); }
template <typename T>
inline T __ldg(const T* p) { return *simt_aligned_load_ptr(p, "__ldg"); }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
[[noreturn]] inline void __trap() { std::abort(); }

inline unsigned char* dynamic_smem() {
  auto& v = ::simt::ctx().block->smem;
  const uintptr_t p = reinterpret_cast<uintptr_t>(v.data());
  return v.data() + ((16 - p % 16) % 16);  // __align__(16)
}

namespace cooperative_groups {
struct grid_group {
  void sync() { ::simt::ctx().grid->arrive_and_wait(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups
