#include "cpu/step_kernel.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/activation.h"
#include "cpu/activation_avx2.h"

namespace rnn_ext::cpu {

void pack_panel(const float* src, int64_t lds, int64_t K, int64_t N, bool transpose, float* dst) {
  // Column blocks of 16, each a contiguous (K x 16) slab: the kernel streams one slab per
  // block of C.
  for (int64_t jb = 0; jb < (N + 15) / 16; ++jb) {
    for (int64_t k = 0; k < K; ++k) {
      float* row = dst + (jb * K + k) * 16;
      for (int64_t jj = 0; jj < 16; ++jj) {
        const int64_t j = jb * 16 + jj;
        row[jj] = j >= N ? 0.f : (transpose ? src[j * lds + k] : src[k * lds + j]);
      }
    }
  }
}

#ifdef RNN_EXT_AVX2

bool step_kernel_available() { return cpu_has_avx2_fma(); }

namespace {

// The epilogue of one row of one 16-column block of C, in registers where the block is full
// (projection add, nonlinearity, store); a partial last block goes through a tile, with the
// same vector kernels as everywhere else so that results do not depend on the path.
RNN_EXT_TARGET_AVX2 inline void epilogue(__m256 v0, __m256 v1, float* c, int64_t ncols,
                                         bool accumulate, StepAct act) {
  if (ncols == 16) {
    if (accumulate) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(c));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(c + 8));
    }
    if (act == StepAct::kTanh) {
      v0 = tanh8(v0);
      v1 = tanh8(v1);
    } else if (act == StepAct::kRelu) {
      v0 = relu8(v0);
      v1 = relu8(v1);
    }
    _mm256_storeu_ps(c, v0);
    _mm256_storeu_ps(c + 8, v1);
    return;
  }
  alignas(32) float out[16];
  _mm256_store_ps(out, v0);
  _mm256_store_ps(out + 8, v1);
  if (accumulate) {
    for (int64_t j = 0; j < ncols; ++j) out[j] += c[j];
  }
  if (act == StepAct::kTanh) {
    tanh_inplace(out, 1, ncols, 16);
  } else if (act == StepAct::kRelu) {
    relu_inplace(out, 1, ncols, 16);
  }
  std::memcpy(c, out, ncols * sizeof(float));
}

// An MR x (16 NB) block of C over the full K: NB adjacent 16-column blocks at once, 2 MR NB
// independent accumulators (<= 12 ymm).  NB = 1 for MR >= 4 rows; a block of 1-3 rows takes
// several column blocks at once, or its few accumulator chains would leave the FMA units
// waiting on their latency (at B = 1 one column block has only 2 chains).  `ncols` counts the
// columns of the last of the NB blocks (the only one that may be partial).
template <int MR, int NB>
RNN_EXT_TARGET_AVX2 void block(int64_t K, const float* A, int64_t lda, const float* Bp,
                               float* C, int64_t ldc, int64_t ncols, bool accumulate,
                               StepAct act) {
  __m256 acc[MR][2 * NB];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int q = 0; q < 2 * NB; ++q) acc[r][q] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[2 * NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {  // the slabs of the NB column blocks, each (K x 16)
      b[2 * n] = _mm256_loadu_ps(Bp + (n * K + k) * 16);
      b[2 * n + 1] = _mm256_loadu_ps(Bp + (n * K + k) * 16 + 8);
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
#pragma GCC unroll 8
      for (int q = 0; q < 2 * NB; ++q) acc[r][q] = _mm256_fmadd_ps(a, b[q], acc[r][q]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) {
      epilogue(acc[r][2 * n], acc[r][2 * n + 1], C + r * ldc + n * 16,
               n == NB - 1 ? ncols : 16, accumulate, act);
    }
  }
}

using BlockFn = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                         bool, StepAct);
// kBlocks[MR]: one column block of MR rows (3-6 rows: a part of M >= 4).  kNarrow[MR][NB]: NB column blocks of
// MR = 1..3 rows; kWidest[MR]: the largest NB that keeps the accumulators within 12 registers.
constexpr BlockFn kBlocks[7] = {nullptr,     block<1, 1>, block<2, 1>, block<3, 1>,
                                block<4, 1>, block<5, 1>, block<6, 1>};
constexpr BlockFn kNarrow[4][5] = {
    {nullptr, nullptr, nullptr, nullptr, nullptr},
    {nullptr, block<1, 1>, block<1, 2>, block<1, 3>, block<1, 4>},
    {nullptr, block<2, 1>, block<2, 2>, block<2, 3>, nullptr},
    {nullptr, block<3, 1>, block<3, 2>, nullptr, nullptr}};
constexpr int64_t kWidest[4] = {0, 4, 3, 2};

void column_blocks(int64_t jb0, int64_t jb1, int64_t M, int64_t N, int64_t K, const float* A,
                   int64_t lda, const float* Bp, float* C, int64_t ldc, bool accumulate,
                   StepAct act) {
  // Rows in blocks of at most 6, balanced (8 rows: 4 + 4, not 6 + 2: a 2-row block is
  // load-bound); fewer than 4 rows take several column blocks at once.
  if (M < 4) {  // one row block, several column blocks at a time
    for (int64_t jb = jb0; jb < jb1;) {
      const int64_t nb = std::min(kWidest[M], jb1 - jb);
      const int64_t last_j = (jb + nb - 1) * 16;
      kNarrow[M][nb](K, A, lda, Bp + jb * K * 16, C + jb * 16, ldc,
                     std::min<int64_t>(16, N - last_j), accumulate, act);
      jb += nb;
    }
    return;
  }
  for (int64_t jb = jb0; jb < jb1; ++jb) {
    const int64_t j = jb * 16;
    const int64_t ncols = std::min<int64_t>(16, N - j);
    int64_t blocks_left = (M + 5) / 6;
    for (int64_t r = 0; r < M; --blocks_left) {
      const int64_t mr = (M - r + blocks_left - 1) / blocks_left;
      kBlocks[mr](K, A + r * lda, lda, Bp + jb * K * 16, C + r * ldc + j, ldc, ncols,
                  accumulate, act);
      r += mr;
    }
  }
}

// --- AVX-512 ---------------------------------------------------------------------------------
// The same blocks on zmm registers: one 16-column block per register (twice the FMA width of
// AVX2 on cores with two 512-bit FMA units) and 32 registers, so blocks of up to 8 rows x 2-4
// column blocks (<= 16 accumulators).  Every element of C still sums its K products in the order
// k = 0, 1, ... with one FMA each, and the epilogue runs the AVX2 epilogue's operations on 16
// lanes (tanh16 / relu16; a partial block takes the AVX2 epilogue on its halves): the results are
// bitwise those of the AVX2 blocks.  Used at every K where the CPU has AVX-512 (bench/NOTES.md,
// V14: with the 16-lane epilogue 20-35 % faster than the AVX2 blocks at H = 16-256 on the Intel
// Xeon VM; with the AVX2 epilogue on two halves they had lost at H = 64, where the epilogue, not
// the FMAs, bounds the step).

enum class Isa { kAvx2, kAvx512 };

// The CPU's AVX-512 F/DQ/VL, and RNN_EXT_CPU_ISA: "avx2" never uses the AVX-512 blocks; unset
// (or anything else) uses them where the CPU has them.
Isa isa_choice() {
  static const Isa isa = [] {
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("avx512vl") && cpu_has_avx2_fma())) {
      return Isa::kAvx2;
    }
    const char* v = std::getenv("RNN_EXT_CPU_ISA");
    return v != nullptr && std::string(v) == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
  }();
  return isa;
}

// (GCC 12 warns that its own _mm256_undefined_ps, inside _mm512_extractf32x8_ps, is used
// uninitialised: the extract writes every lane)

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int MR, int NB>
RNN_EXT_TARGET_AVX512 void block512(int64_t K, const float* A, int64_t lda, const float* Bp,
                                    float* C, int64_t ldc, int64_t ncols, bool accumulate,
                                    StepAct act) {
  __m512 acc[MR][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) acc[r][n] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NB];
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) b[n] = _mm512_loadu_ps(Bp + (n * K + k) * 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
#pragma GCC unroll 4
      for (int n = 0; n < NB; ++n) acc[r][n] = _mm512_fmadd_ps(a, b[n], acc[r][n]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) {
      float* c = C + r * ldc + n * 16;
      if (n == NB - 1 && ncols < 16) {  // a partial block: the AVX2 epilogue on the halves
        epilogue(_mm512_castps512_ps256(acc[r][n]), _mm512_extractf32x8_ps(acc[r][n], 1), c,
                 ncols, accumulate, act);
        continue;
      }
      // a full block in one register: the same operations per lane as the AVX2 epilogue
      __m512 v = acc[r][n];
      if (accumulate) v = _mm512_add_ps(v, _mm512_loadu_ps(c));
      if (act == StepAct::kTanh) {
        v = tanh16(v);
      } else if (act == StepAct::kRelu) {
        v = relu16(v);
      }
      _mm512_storeu_ps(c, v);
    }
  }
}
#pragma GCC diagnostic pop

// kBlocks512[MR][NB]: MR = 1..8 rows, NB = 1..4 column blocks (MR NB <= 16 accumulators; the
// others are never reached, nor instantiated).
template <int MR, int NB>
constexpr BlockFn block512_if_fits() {
  if constexpr (MR * NB <= 16) {
    return block512<MR, NB>;
  } else {
    return nullptr;
  }
}
template <int MR>
constexpr std::array<BlockFn, 5> row512() {
  return {nullptr, block512_if_fits<MR, 1>(), block512_if_fits<MR, 2>(),
          block512_if_fits<MR, 3>(), block512_if_fits<MR, 4>()};
}
constexpr std::array<BlockFn, 5> kBlocks512[9] = {
    {}, row512<1>(), row512<2>(), row512<3>(), row512<4>(),
    row512<5>(), row512<6>(), row512<7>(), row512<8>()};

void column_blocks512(int64_t jb0, int64_t jb1, int64_t M, int64_t N, int64_t K, const float* A,
                      int64_t lda, const float* Bp, float* C, int64_t ldc, bool accumulate,
                      StepAct act) {
  // Rows in balanced blocks of at most 8; column blocks 2 at a time (up to 4 for 1-4 rows,
  // whose few accumulator chains would otherwise wait on the FMA latency).
  const int64_t widest = M <= 4 ? 4 : 2;
  for (int64_t jb = jb0; jb < jb1;) {
    const int64_t nb = std::min(widest, jb1 - jb);
    const int64_t last_j = (jb + nb - 1) * 16;
    const int64_t ncols = std::min<int64_t>(16, N - last_j);
    int64_t blocks_left = (M + 7) / 8;
    for (int64_t r = 0; r < M; --blocks_left) {
      const int64_t mr = (M - r + blocks_left - 1) / blocks_left;
      kBlocks512[mr][nb](K, A + r * lda, lda, Bp + jb * K * 16, C + r * ldc + jb * 16, ldc,
                         ncols, accumulate, act);
      r += mr;
    }
    jb += nb;
  }
}

}  // namespace

void step_gemm_blocks(int64_t jb0, int64_t jb1, int64_t M, int64_t N, int64_t K, const float* A,
                      int64_t lda, const float* Bp, float* C, int64_t ldc, bool accumulate,
                      StepAct act) {
  if (M <= 0 || jb1 <= jb0) return;
  if (avx512_enabled()) {
    column_blocks512(jb0, jb1, M, N, K, A, lda, Bp, C, ldc, accumulate, act);
  } else {
    column_blocks(jb0, jb1, M, N, K, A, lda, Bp, C, ldc, accumulate, act);
  }
}

#else

bool step_kernel_available() { return false; }

void step_gemm_blocks(int64_t, int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                      const float*, float*, int64_t, bool, StepAct) {
  TORCH_INTERNAL_ASSERT(false, "rnn_ext: the step kernel needs AVX2");
}

#endif

void step_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
               float* C, int64_t ldc, bool accumulate, StepAct act) {
  // (one thread: several threads split a step's column blocks as a team, csrc/cpu/rnn_cpu.cpp)
  step_gemm_blocks(0, (N + 15) / 16, M, N, K, A, lda, Bp, C, ldc, accumulate, act);
}

bool avx512_enabled() {
#ifdef RNN_EXT_AVX2
  return step_kernel_available() && isa_choice() != Isa::kAvx2;
#else
  return false;
#endif
}

const char* step_kernel_isa(int64_t /*K: every K runs the same blocks now*/) {
  if (!step_kernel_available()) return "none";
  return avx512_enabled() ? "avx512" : "avx2";
}

}  // namespace rnn_ext::cpu
