// Vectorised nonlinearities on AVX2 registers, shared by the activation loops
// (activation.cpp) and the step kernel's epilogue (step_kernel.cpp), so that both paths give
// bitwise the same values.  Only for x86-64 GCC/Clang; RNN_EXT_AVX2 says whether it is there.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RNN_EXT_AVX2 1
#define RNN_EXT_TARGET_AVX2 __attribute__((target("avx2,fma")))

namespace rnn_ext::cpu {

// Whether this CPU runs the AVX2 + FMA code (checked once).
inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

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
  // (the sign of x OR-ed in: a no-op except at x = -0, where the fma gives +0; torch's tanh
  // keeps -0)
  const __m256 sx = _mm256_and_ps(sign_mask, x);
  const __m256 small = _mm256_or_ps(_mm256_fmadd_ps(_mm256_mul_ps(x, x2), s, x), sx);

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
  big = _mm256_or_ps(big, sx);
  // a < 0.4 (ordered: false for NaN, which then takes `big`, itself NaN)
  return _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.4f), _CMP_LT_OQ));
}

// relu with NaN kept: max(x, 0) would drop NaN; x < 0 ? 0 : x keeps it.
RNN_EXT_TARGET_AVX2 inline __attribute__((always_inline)) __m256 relu8(__m256 x) {
  const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_andnot_ps(neg, x);
}

// --- The same on AVX-512 (F + DQ) registers, 16 lanes: every lane runs the same operations
// as tanh8 / relu8 (IEEE-exact ops, the same min / floor / conversion / select semantics), so
// the results are bitwise those of the AVX2 functions.
#define RNN_EXT_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))

RNN_EXT_TARGET_AVX512 inline __attribute__((always_inline)) __m512 tanh16(__m512 x) {
  const __m512 sign_mask = _mm512_set1_ps(-0.f);
  const __m512 a = _mm512_andnot_ps(sign_mask, x);
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 s = _mm512_set1_ps(21844.f / 6081075.f);
  s = _mm512_fmadd_ps(s, x2, _mm512_set1_ps(-1382.f / 155925.f));
  s = _mm512_fmadd_ps(s, x2, _mm512_set1_ps(62.f / 2835.f));
  s = _mm512_fmadd_ps(s, x2, _mm512_set1_ps(-17.f / 315.f));
  s = _mm512_fmadd_ps(s, x2, _mm512_set1_ps(2.f / 15.f));
  s = _mm512_fmadd_ps(s, x2, _mm512_set1_ps(-1.f / 3.f));
  const __m512 sx = _mm512_and_ps(sign_mask, x);
  const __m512 small = _mm512_or_ps(_mm512_fmadd_ps(_mm512_mul_ps(x, x2), s, x), sx);

  // min(a, 10) with NaN kept: like _mm256_min_ps, the second operand when either is NaN
  const __m512 ac = _mm512_min_ps(_mm512_set1_ps(10.f), a);
  const __m512 y = _mm512_add_ps(ac, ac);  // >= 0
  const __m512 nf = _mm512_roundscale_ps(
      _mm512_fmadd_ps(y, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // floor
  __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fmadd_ps(nf, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i n = _mm512_cvttps_epi32(nf);
  const __m512 scale =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
  const __m512 e = _mm512_mul_ps(p, scale);
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 big = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
  big = _mm512_or_ps(big, sx);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.4f), _CMP_LT_OQ), big,
                              small);
}

RNN_EXT_TARGET_AVX512 inline __attribute__((always_inline)) __m512 relu16(__m512 x) {
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(neg, x, _mm512_setzero_ps());
}

}  // namespace rnn_ext::cpu
#endif
