#include "cpu/activation.h"
#include "cpu/activation_avx2.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>


namespace rnn_ext::cpu {

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RNN_EXT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RNN_EXT_CLONES
#endif

#ifdef RNN_EXT_AVX2
RNN_EXT_TARGET_AVX2 void tanh_row_f32_avx2(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, tanh8(_mm256_loadu_ps(x + j)));
  if (j < n) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tail, x + j, (n - j) * sizeof(float));
    _mm256_store_ps(tail, tanh8(_mm256_load_ps(tail)));
    std::memcpy(x + j, tail, (n - j) * sizeof(float));
  }
}
#endif

void tanh_row_f32(float* x, int64_t n) {
#ifdef RNN_EXT_AVX2
  if (cpu_has_avx2_fma()) {
    tanh_row_f32_avx2(x, n);
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) x[j] = std::tanh(x[j]);
}

RNN_EXT_CLONES void relu_row_f32(float* __restrict x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] < 0.f ? 0.f : x[j];
}

void relu_row_f64(double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] < 0.0 ? 0.0 : x[j];
}

void tanh_row_f64(double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::tanh(x[j]);
}

RNN_EXT_CLONES void act_backward_row_f32(bool relu, const float* __restrict dh,
                                         const float* __restrict h, float* __restrict dz,
                                         int64_t n) {
  if (relu) {
    for (int64_t j = 0; j < n; ++j) dz[j] = h[j] <= 0.f ? 0.f : dh[j];
  } else {
    for (int64_t j = 0; j < n; ++j) dz[j] = dh[j] * (1.f - h[j] * h[j]);
  }
}

void act_backward_row_f64(bool relu, const double* dh, const double* h, double* dz, int64_t n) {
  if (relu) {
    for (int64_t j = 0; j < n; ++j) dz[j] = h[j] <= 0.0 ? 0.0 : dh[j];
  } else {
    for (int64_t j = 0; j < n; ++j) dz[j] = dh[j] * (1.0 - h[j] * h[j]);
  }
}

// Rows in parallel through torch's pool once a block is large enough to pay for it.
constexpr int64_t kGrain = 1 << 14;

template <typename F>
void for_rows(int64_t rows, int64_t cols, const F& f) {
  if (rows * cols < 2 * kGrain || rows < 2) {
    for (int64_t i = 0; i < rows; ++i) f(i);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) f(i);
  });
}

}  // namespace

void tanh_inplace(float* x, int64_t rows, int64_t cols, int64_t ld) {
  for_rows(rows, cols, [&](int64_t i) { tanh_row_f32(x + i * ld, cols); });
}
void tanh_inplace(double* x, int64_t rows, int64_t cols, int64_t ld) {
  for_rows(rows, cols, [&](int64_t i) { tanh_row_f64(x + i * ld, cols); });
}
void relu_inplace(float* x, int64_t rows, int64_t cols, int64_t ld) {
  for_rows(rows, cols, [&](int64_t i) { relu_row_f32(x + i * ld, cols); });
}
void relu_inplace(double* x, int64_t rows, int64_t cols, int64_t ld) {
  for_rows(rows, cols, [&](int64_t i) { relu_row_f64(x + i * ld, cols); });
}

template <>
void act_backward<float>(bool relu, const float* dh, int64_t ld_dh, const float* h,
                         int64_t ld_h, float* dz, int64_t ld_dz, int64_t rows, int64_t cols) {
  for_rows(rows, cols, [&](int64_t i) {
    act_backward_row_f32(relu, dh + i * ld_dh, h + i * ld_h, dz + i * ld_dz, cols);
  });
}
template <>
void act_backward<double>(bool relu, const double* dh, int64_t ld_dh, const double* h,
                          int64_t ld_h, double* dz, int64_t ld_dz, int64_t rows, int64_t cols) {
  for_rows(rows, cols, [&](int64_t i) {
    act_backward_row_f64(relu, dh + i * ld_dh, h + i * ld_h, dz + i * ld_dz, cols);
  });
}

}  // namespace rnn_ext::cpu
