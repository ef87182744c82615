// Row-major GEMM on raw pointers for the CPU kernels.
//
//   C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C[m, n]     (ld* = row strides)
//
// It calls the BLAS that torch itself links (MKL's sgemm_/dgemm_, found at run time in the
// process), so a small per-step product costs no ATen dispatch.  Where the process has no such
// symbol, or a size does not fit BLAS's 32-bit integers, it falls back to at::mm on views of the
// same memory: slower for tiny products, identical in meaning.
#pragma once

#include <cstdint>

namespace rnn_ext::cpu {

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// True when gemm() calls BLAS directly (for the benchmark's and tests' reports).
bool direct_blas_available();

}  // namespace rnn_ext::cpu
