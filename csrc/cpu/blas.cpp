#include "cpu/blas.h"

#include <ATen/ATen.h>
#include <dlfcn.h>

#include <climits>
#include <type_traits>

namespace rnn_ext::cpu {

namespace {

// Fortran BLAS (LP64): column-major, every argument by pointer.
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const float*, const float*, const int*, const float*, const int*,
                         const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const double*, const double*, const int*, const double*, const int*,
                         const double*, double*, const int*);

struct Blas {
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;
  Blas() {
    // torch is loaded (we link against it), so its BLAS symbols are visible to the process.
    sgemm = reinterpret_cast<sgemm_t>(dlsym(RTLD_DEFAULT, "sgemm_"));
    dgemm = reinterpret_cast<dgemm_t>(dlsym(RTLD_DEFAULT, "dgemm_"));
  }
};

const Blas& blas() {
  static const Blas b;
  return b;
}

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

template <typename T>
void gemm_aten(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // op(A) is m x k; A itself is (k x m) when transposed.
  auto A = trans_a ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                   : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  auto Bm = trans_b ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) {
    // BLAS semantics: C is not read when beta == 0 (it may hold NaN garbage).
    auto prod = at::mm(A, Bm);
    if (alpha != T(1)) prod.mul_(alpha);
    C.copy_(prod);
  } else {
    C.addmm_(A, Bm, beta, alpha);
  }
}

// A product too small for a BLAS call to pay: a plain loop (a BLAS call costs ~1 us here and
// MKL may wake its threads for it; the walkthrough's sizes are all such products).
constexpr int64_t kSmallProduct = 1 << 12;  // m n k multiply-adds

template <typename T>
void gemm_small(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T acc = T(0);
      for (int64_t p = 0; p < k; ++p) {
        acc += (trans_a ? a[p * lda + i] : a[i * lda + p]) *
               (trans_b ? b[j * ldb + p] : b[p * ldb + j]);
      }
      T& out = c[i * ldc + j];
      out = beta == T(0) ? alpha * acc : alpha * acc + beta * out;
    }
  }
}

}  // namespace

bool direct_blas_available() { return blas().sgemm != nullptr && blas().dgemm != nullptr; }

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    // Empty sum: C = beta * C.
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if (m * n * k <= kSmallProduct) {
    gemm_small<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const auto& bl = blas();
  const bool direct = std::is_same_v<T, float> ? bl.sgemm != nullptr : bl.dgemm != nullptr;
  // Leading dimensions must be >= the row length even when a dimension is 1.
  const int64_t lda_ = std::max<int64_t>(lda, std::max<int64_t>(1, trans_a ? m : k));
  const int64_t ldb_ = std::max<int64_t>(ldb, std::max<int64_t>(1, trans_b ? k : n));
  const int64_t ldc_ = std::max<int64_t>(ldc, std::max<int64_t>(1, n));
  if (!direct || !fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda_) ||
      !fits_int(ldb_) || !fits_int(ldc_)) {
    gemm_aten<T>(trans_a, trans_b, m, n, k, alpha, a, lda_, b, ldb_, beta, c, ldc_);
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb_), LDB = static_cast<int>(lda_),
            LDC = static_cast<int>(ldc_);
  if constexpr (std::is_same_v<T, float>) {
    bl.sgemm(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else {
    bl.dgemm(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  }
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*,
                           int64_t, const double*, int64_t, double, double*, int64_t);

}  // namespace rnn_ext::cpu
