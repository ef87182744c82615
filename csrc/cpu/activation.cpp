#include "cpu/activation.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace rnn_ext::cpu {

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RNN_EXT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RNN_EXT_CLONES
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define RNN_EXT_AVX2 1
#define RNN_EXT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

#ifdef RNN_EXT_AVX2
// tanh in float, 8 lanes at once (AVX2 + FMA).  Error about 2 ulp (tests/ measure it against
// torch.tanh over a dense sweep).  Branch-free:
//   |x| < 0.4:  odd Taylor series to x^13 (the next term is below 2^-27 relative);
//   otherwise:  sign(x) * (1 - 2 / (exp(2|x|) + 1)), exp by range reduction to |r| <= ln2/2
//               and a degree-7 Taylor polynomial; |x| is capped at 10 (float tanh rounds to
//               exactly 1 from about 9.011 on; exp(20) is far inside the float range).
// NaN propagates (the selects keep it), +-inf gives +-1.
RNN_EXT_TARGET_AVX2 inline __attribute__((always_inline)) __m256 tanh8(__m256 x) {
  const __m256 sign_mask = _mm256_set1_ps(-0.f);
  const __m256 a = _mm256_andnot_ps(sign_mask, x);
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 s = _mm256_set1_ps(21844.f / 6081075.f);
  s = _mm256_fmadd_ps(s, x2, _mm256_set1_ps(-1382.f / 155925.f));
  s = _mm256_fmadd_ps(s, x2, _mm256_set1_ps(62.f / 2835.f));
  s = _mm256_fmadd_ps(s, x2, _mm256_set1_ps(-17.f / 315.f));
  s = _mm256_fmadd_ps(s, x2, _mm256_set1_ps(2.f / 15.f));
  s = _mm256_fmadd_ps(s, x2, _mm256_set1_ps(-1.f / 3.f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(x, x2), s, x);

  // min(a, 10) with NaN kept: _mm256_min_ps returns the second operand when either is NaN.
  const __m256 ac = _mm256_min_ps(_mm256_set1_ps(10.f), a);
  const __m256 y = _mm256_add_ps(ac, ac);  // >= 0
  const __m256 nf = _mm256_floor_ps(_mm256_fmadd_ps(y, _mm256_set1_ps(1.44269504088896341f),
                                                    _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), y);
  r = _mm256_fmadd_ps(nf, _mm256_set1_ps(2.12194440e-4f), r);  // ln2 = 0.693359375 - 2.12e-4
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i n = _mm256_cvttps_epi32(nf);  // 0..29 (garbage for NaN, masked by p = NaN)
  const __m256 scale =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
  const __m256 e = _mm256_mul_ps(p, scale);
  const __m256 one = _mm256_set1_ps(1.f);
  __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, one)));
  big = _mm256_or_ps(big, _mm256_and_ps(sign_mask, x));
  // a < 0.4 (ordered: false for NaN, which then takes `big`, itself NaN)
  return _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.4f), _CMP_LT_OQ));
}

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
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) {
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
