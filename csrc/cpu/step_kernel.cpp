#include "cpu/step_kernel.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

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

}  // namespace

void step_gemm_blocks(int64_t jb0, int64_t jb1, int64_t M, int64_t N, int64_t K, const float* A,
                      int64_t lda, const float* Bp, float* C, int64_t ldc, bool accumulate,
                      StepAct act) {
  if (M <= 0 || jb1 <= jb0) return;
  column_blocks(jb0, jb1, M, N, K, A, lda, Bp, C, ldc, accumulate, act);
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

}  // namespace rnn_ext::cpu
