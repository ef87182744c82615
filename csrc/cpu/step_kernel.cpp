#include "cpu/step_kernel.h"

#include <ATen/Parallel.h>
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

// One MR x 16 block of C over the full K.
template <int MR>
RNN_EXT_TARGET_AVX2 void block(int64_t K, const float* A, int64_t lda, const float* Bp,
                               int64_t ldb, float* C, int64_t ldc, int64_t ncols,
                               bool accumulate, StepAct act) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm256_setzero_ps();
    acc1[r] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(Bp + k * 16);
    const __m256 b1 = _mm256_loadu_ps(Bp + k * 16 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      acc0[r] = _mm256_fmadd_ps(a, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(a, b1, acc1[r]);
    }
  }
  if (ncols == 16) {
    // Full block: the epilogue in registers (bias/projection add, nonlinearity, store).
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * ldc;
      __m256 v0 = acc0[r], v1 = acc1[r];
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
    }
    return;
  }
  // Last, partial column block: through a tile (a fully unrolled copy keeps the accumulators
  // out of memory in the loop above).
  alignas(32) float tile[MR][16];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(tile[r], acc0[r]);
    _mm256_store_ps(tile[r] + 8, acc1[r]);
  }
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * ldc;
    float* out = tile[r];
    if (accumulate) {
      for (int64_t j = 0; j < ncols; ++j) out[j] += c[j];
    }
    // the same vector kernels as everywhere else, so results do not depend on the path
    if (act == StepAct::kTanh) {
      tanh_inplace(out, 1, ncols, 16);
    } else if (act == StepAct::kRelu) {
      relu_inplace(out, 1, ncols, 16);
    }
    std::memcpy(c, out, ncols * sizeof(float));
  }
}

using BlockFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                         int64_t, bool, StepAct);
constexpr BlockFn kBlocks[7] = {nullptr,  block<1>, block<2>, block<3>,
                                block<4>, block<5>, block<6>};

void column_blocks(int64_t jb0, int64_t jb1, int64_t M, int64_t N, int64_t K, const float* A,
                   int64_t lda, const float* Bp, float* C, int64_t ldc, bool accumulate,
                   StepAct act) {
  for (int64_t jb = jb0; jb < jb1; ++jb) {
    const int64_t j = jb * 16;
    const int64_t ncols = std::min<int64_t>(16, N - j);
    // Rows in blocks of at most 6, balanced (8 rows: 4 + 4, not 6 + 2: a 2-row block is
    // load-bound).
    int64_t blocks_left = (M + 5) / 6;
    for (int64_t r = 0; r < M; --blocks_left) {
      const int64_t mr = (M - r + blocks_left - 1) / blocks_left;
      kBlocks[mr](K, A + r * lda, lda, Bp + jb * K * 16, 16, C + r * ldc + j, ldc, ncols,
                  accumulate, act);
      r += mr;
    }
  }
}

}  // namespace

void step_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
               float* C, int64_t ldc, bool accumulate, StepAct act) {
  if (M <= 0 || N <= 0) return;
  const int64_t nblocks = (N + 15) / 16;
  // Column blocks over torch's threads once a step is worth a parallel region (inline when
  // already inside one: the direction / wavefront tasks).
  if (M * N * K >= (int64_t(1) << 19) && nblocks > 1) {
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      column_blocks(b0, b1, M, N, K, A, lda, Bp, C, ldc, accumulate, act);
    });
  } else {
    column_blocks(0, nblocks, M, N, K, A, lda, Bp, C, ldc, accumulate, act);
  }
}

#else

bool step_kernel_available() { return false; }

void step_gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t,
               bool, StepAct) {
  TORCH_INTERNAL_ASSERT(false, "rnn_ext: the step kernel needs AVX2");
}

#endif

}  // namespace rnn_ext::cpu
