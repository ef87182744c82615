#include "cpu/activation.h"

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

// tanh in float, written so that the compiler vectorises the loop that calls it (no branches,
// no library calls).  Error about 2 ulp (tests/test_kernels.py measures it against torch.tanh).
//   |x| < 0.4:  odd Taylor series to x^13 (the next term is below 2^-27 relative);
//   otherwise:  sign(x) * (1 - 2 / (exp(2|x|) + 1)), exp by range reduction to |r| <= ln2/2 and
//               a degree-7 Taylor polynomial; |x| is capped at 9, where tanh rounds to 1.
inline __attribute__((always_inline)) float tanh_f32(float x) {
  const float a = std::fabs(x);
  const float x2 = x * x;
  float small = 21844.f / 6081075.f;
  small = small * x2 - 1382.f / 155925.f;
  small = small * x2 + 62.f / 2835.f;
  small = small * x2 - 17.f / 315.f;
  small = small * x2 + 2.f / 15.f;
  small = small * x2 - 1.f / 3.f;
  small = x + x * x2 * small;

  const float ac = a > 9.f ? 9.f : a;  // NaN stays NaN
  const float y = 2.f * ac;
  const float n = std::floor(y * 1.44269504088896341f + 0.5f);
  const float r = (y - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 = 0.693359375 - 2.1219e-4
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = p * scale;
  const float big = std::copysign(1.f - 2.f / (e + 1.f), x);
  return a < 0.4f ? small : big;
}

RNN_EXT_CLONES void tanh_row_f32(float* __restrict x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = tanh_f32(x[j]);
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
