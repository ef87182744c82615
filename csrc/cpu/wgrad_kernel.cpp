#include "cpu/wgrad_kernel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/activation_avx2.h"
#include "cpu/step_kernel.h"

namespace rnn_ext::cpu {

bool use_outer_sum(int64_t M, int64_t N) {
  static const int mode = [] {  // 0: by size, 1: never, 2: always
    const char* v = std::getenv("RNN_EXT_CPU_WGRAD");
    const std::string s = v != nullptr ? v : "";
    return s == "blas" ? 1 : s == "kernel" ? 2 : 0;
  }();
  static const int64_t max_elems = [] {
    const char* v = std::getenv("RNN_EXT_CPU_WGRAD_MAX");
    return v == nullptr ? int64_t(128 * 128) : std::max<int64_t>(0, std::atoll(v));
  }();
  if (mode == 1 || !outer_sum_available()) return false;
  return mode == 2 || M * N <= max_elems;
}

namespace {

// The plain loops, where the CPU has no AVX2 (and the meaning of the vector code): one chunk of
// rows, each element's products summed in row order from zero, then stored (store) or added to C.
void chunk_scalar(int64_t rows, const float* A, int64_t lda, const float* B, int64_t ldb,
                  int64_t M, int64_t N, float* C, int64_t ldc, bool store) {
  std::vector<float> acc(M * N, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = A + r * lda;
    const float* b = B + r * ldb;
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) acc[i * N + j] = std::fma(a[i], b[j], acc[i * N + j]);
    }
  }
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      float& c = C[i * ldc + j];
      c = store ? acc[i * N + j] : c + acc[i * N + j];
    }
  }
}

void column_sums_scalar(const float* src, int64_t rows, int64_t cols, int64_t ld, double* acc) {
  std::fill_n(acc, cols, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) acc[j] += static_cast<double>(src[r * ld + j]);
  }
}

}  // namespace

#ifdef RNN_EXT_AVX2

bool outer_sum_available() { return cpu_has_avx2_fma(); }

namespace {

// One MR x (16 NV) tile of C over `rows` rows (one chunk): acc = sum of the rows' products in
// row order, then C = acc (store) or C += acc.  `last` columns of the last register are used.
template <int MR, int NV>
RNN_EXT_TARGET_AVX512 void tile512(int64_t rows, const float* A, int64_t lda, const float* B,
                                   int64_t ldb, float* C, int64_t ldc, int64_t last, bool store) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) acc[i][q] = _mm512_setzero_ps();
  }
  const __mmask16 m = static_cast<__mmask16>(last >= 16 ? 0xFFFF : (1u << last) - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* br = B + r * ldb;
    __m512 b[NV];
#pragma GCC unroll 4
    for (int q = 0; q < NV - 1; ++q) b[q] = _mm512_loadu_ps(br + 16 * q);
    b[NV - 1] = _mm512_maskz_loadu_ps(m, br + 16 * (NV - 1));
    const float* ar = A + r * lda;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(ar[i]);
#pragma GCC unroll 4
      for (int q = 0; q < NV; ++q) acc[i][q] = _mm512_fmadd_ps(a, b[q], acc[i][q]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) {
      const __mmask16 mq = q == NV - 1 ? m : static_cast<__mmask16>(0xFFFF);
      const __m512 v = store ? acc[i][q]
                             : _mm512_add_ps(acc[i][q], _mm512_maskz_loadu_ps(mq, c + 16 * q));
      _mm512_mask_storeu_ps(c + 16 * q, mq, v);
    }
  }
}

// The same on AVX2: MR x (8 NV) in ymm registers.
template <int MR, int NV>
RNN_EXT_TARGET_AVX2 void tile256(int64_t rows, const float* A, int64_t lda, const float* B,
                                 int64_t ldb, float* C, int64_t ldc, int64_t last, bool store) {
  __m256 acc[MR][NV];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) acc[i][q] = _mm256_setzero_ps();
  }
  alignas(32) int32_t lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = l < last ? -1 : 0;
  const __m256i m = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  for (int64_t r = 0; r < rows; ++r) {
    const float* br = B + r * ldb;
    __m256 b[NV];
#pragma GCC unroll 4
    for (int q = 0; q < NV - 1; ++q) b[q] = _mm256_loadu_ps(br + 8 * q);
    b[NV - 1] = _mm256_maskload_ps(br + 8 * (NV - 1), m);
    const float* ar = A + r * lda;
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(ar + i);
#pragma GCC unroll 4
      for (int q = 0; q < NV; ++q) acc[i][q] = _mm256_fmadd_ps(a, b[q], acc[i][q]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
#pragma GCC unroll 4
    for (int q = 0; q < NV - 1; ++q) {
      const __m256 v = store ? acc[i][q] : _mm256_add_ps(acc[i][q], _mm256_loadu_ps(c + 8 * q));
      _mm256_storeu_ps(c + 8 * q, v);
    }
    float* cl = c + 8 * (NV - 1);
    const __m256 v =
        store ? acc[i][NV - 1] : _mm256_add_ps(acc[i][NV - 1], _mm256_maskload_ps(cl, m));
    _mm256_maskstore_ps(cl, m, v);
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                        int64_t, bool);

// kTiles512[MR][NV], MR = 1..6, NV = 1..4; kTiles256[MR][NV], MR = 1..3, NV = 1..4.
template <int MR>
constexpr std::array<TileFn, 5> row512() {
  return {nullptr, tile512<MR, 1>, tile512<MR, 2>, tile512<MR, 3>, tile512<MR, 4>};
}
template <int MR>
constexpr std::array<TileFn, 5> row256() {
  return {nullptr, tile256<MR, 1>, tile256<MR, 2>, tile256<MR, 3>, tile256<MR, 4>};
}
constexpr std::array<TileFn, 5> kTiles512[7] = {{},          row512<1>(), row512<2>(),
                                                row512<3>(), row512<4>(), row512<5>(),
                                                row512<6>()};
constexpr std::array<TileFn, 5> kTiles256[4] = {{}, row256<1>(), row256<2>(), row256<3>()};

struct Shape {
  const std::array<TileFn, 5>* tiles;
  int64_t max_rows, lanes;  // rows per tile, floats per register (4 registers per tile at most)
};

Shape shape() {
  static const Shape s = avx512_enabled() ? Shape{kTiles512, 6, 16} : Shape{kTiles256, 3, 8};
  return s;
}

// One chunk of rows: every tile of C.
void chunk(const Shape& sh, int64_t rows, const float* A, int64_t lda, const float* B,
           int64_t ldb, int64_t M, int64_t N, float* C, int64_t ldc, bool store) {
  const int64_t width = 4 * sh.lanes;
  for (int64_t j = 0; j < N; j += width) {
    const int64_t cols = std::min(width, N - j);
    const int64_t nv = (cols + sh.lanes - 1) / sh.lanes;
    const int64_t last = cols - (nv - 1) * sh.lanes;
    // rows of C in balanced tiles of at most max_rows
    int64_t tiles_left = (M + sh.max_rows - 1) / sh.max_rows;
    for (int64_t i = 0; i < M; --tiles_left) {
      const int64_t mr = (M - i + tiles_left - 1) / tiles_left;
      sh.tiles[mr][nv](rows, A + i, lda, B + j, ldb, C + i * ldc + j, ldc, last, store);
      i += mr;
    }
  }
}

// Column sums in double, 8 (AVX-512) or 4 (AVX2) columns per register, 4 registers at a time.
// (GCC 12 warns that its own _mm512_undefined_pd, inside _mm512_cvtps_pd, is used
// uninitialised: the conversion writes every lane)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
RNN_EXT_TARGET_AVX512 void column_sums512(const float* src, int64_t rows, int64_t cols,
                                          int64_t ld, double* acc) {
  int64_t j = 0;
  for (; j + 32 <= cols; j += 32) {
    __m512d s[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(),
                    _mm512_setzero_pd()};
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = src + r * ld + j;
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        s[q] = _mm512_add_pd(s[q], _mm512_cvtps_pd(_mm256_loadu_ps(row + 8 * q)));
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) _mm512_storeu_pd(acc + j + 8 * q, s[q]);
  }
  for (; j + 8 <= cols; j += 8) {
    __m512d s = _mm512_setzero_pd();
    for (int64_t r = 0; r < rows; ++r) {
      s = _mm512_add_pd(s, _mm512_cvtps_pd(_mm256_loadu_ps(src + r * ld + j)));
    }
    _mm512_storeu_pd(acc + j, s);
  }
  column_sums_scalar(src + j, rows, cols - j, ld, acc + j);  // the last columns
}

#pragma GCC diagnostic pop

RNN_EXT_TARGET_AVX2 void column_sums256(const float* src, int64_t rows, int64_t cols,
                                        int64_t ld, double* acc) {
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) {
    __m256d s[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(),
                    _mm256_setzero_pd()};
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = src + r * ld + j;
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        s[q] = _mm256_add_pd(s[q], _mm256_cvtps_pd(_mm_loadu_ps(row + 4 * q)));
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) _mm256_storeu_pd(acc + j + 4 * q, s[q]);
  }
  column_sums_scalar(src + j, rows, cols - j, ld, acc + j);  // the last columns
}

RNN_EXT_TARGET_AVX512 void add_to512(float* acc, const float* src, int64_t n) {
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    _mm512_storeu_ps(acc + e, _mm512_add_ps(_mm512_loadu_ps(acc + e), _mm512_loadu_ps(src + e)));
  }
  for (; e < n; ++e) acc[e] += src[e];
}

RNN_EXT_TARGET_AVX2 void add_to256(float* acc, const float* src, int64_t n) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    _mm256_storeu_ps(acc + e, _mm256_add_ps(_mm256_loadu_ps(acc + e), _mm256_loadu_ps(src + e)));
  }
  for (; e < n; ++e) acc[e] += src[e];
}

}  // namespace

#else

bool outer_sum_available() { return false; }

#endif

void add_to(float* acc, const float* src, int64_t n) {
#ifdef RNN_EXT_AVX2
  if (outer_sum_available()) {
    avx512_enabled() ? add_to512(acc, src, n) : add_to256(acc, src, n);
    return;
  }
#endif
  for (int64_t e = 0; e < n; ++e) acc[e] += src[e];
}

void outer_sum(const RowSpan* spans, int64_t n, int64_t M, int64_t N, float* C, int64_t ldc,
               bool accumulate) {
  if (M <= 0 || N <= 0) return;
  bool store = !accumulate;
  for (int64_t s = 0; s < n; ++s) {
    const RowSpan& sp = spans[s];
    for (int64_t r0 = 0; r0 < sp.rows; r0 += kOuterChunk) {
      const int64_t rows = std::min(kOuterChunk, sp.rows - r0);
      const float* a = sp.a + r0 * sp.lda;
      const float* b = sp.b + r0 * sp.ldb;
#ifdef RNN_EXT_AVX2
      if (outer_sum_available()) {
        chunk(shape(), rows, a, sp.lda, b, sp.ldb, M, N, C, ldc, store);
      } else
#endif
      {
        chunk_scalar(rows, a, sp.lda, b, sp.ldb, M, N, C, ldc, store);
      }
      store = false;
    }
  }
  if (store) {  // no rows at all
    for (int64_t i = 0; i < M; ++i) std::fill_n(C + i * ldc, N, 0.f);
  }
}

void column_sums(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  std::vector<double> acc(cols);
#ifdef RNN_EXT_AVX2
  if (outer_sum_available()) {
    avx512_enabled() ? column_sums512(src, rows, cols, ld, acc.data())
                     : column_sums256(src, rows, cols, ld, acc.data());
  } else
#endif
  {
    column_sums_scalar(src, rows, cols, ld, acc.data());
  }
  for (int64_t j = 0; j < cols; ++j) dst[j] = static_cast<float>(acc[j]);
}

namespace {

// The rows [r0, r1) of the concatenation of spans, as spans.
std::vector<RowSpan> slice(const RowSpan* spans, int64_t n, int64_t r0, int64_t r1) {
  std::vector<RowSpan> out;
  int64_t base = 0;
  for (int64_t s = 0; s < n && base < r1; ++s) {
    const RowSpan& sp = spans[s];
    const int64_t lo = std::max(r0, base), hi = std::min(r1, base + sp.rows);
    if (lo < hi) {
      out.push_back({sp.a + (lo - base) * sp.lda, sp.lda, sp.b + (lo - base) * sp.ldb, sp.ldb,
                     hi - lo});
    }
    base += sp.rows;
  }
  return out;
}

}  // namespace

void outer_product(const RowSpan* spans, int64_t n, int64_t M, int64_t N, float* C, int64_t ldc,
                   bool threaded) {
  if (M <= 0 || N <= 0) return;
  int64_t rows = 0;
  for (int64_t s = 0; s < n; ++s) rows += spans[s].rows;
  const bool transpose = N < 32 && M >= 32;
  const int64_t threads = !threaded || at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min(threads, rows / kOuterPartRows));
  if (parts == 1 && !transpose) {
    outer_sum(spans, n, M, N, C, ldc, /*accumulate=*/false);
    return;
  }
  // Part p's sum in partial[p] (transposed: N x M), then C = the parts' sums in order.
  std::vector<RowSpan> swapped;
  if (transpose) {
    for (int64_t s = 0; s < n; ++s) {
      swapped.push_back({spans[s].b, spans[s].ldb, spans[s].a, spans[s].lda, spans[s].rows});
    }
    spans = swapped.data();
  }
  const int64_t pm = transpose ? N : M, pn = transpose ? M : N;
  std::vector<float> partial(parts * pm * pn);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const std::vector<RowSpan> mine = slice(spans, n, rows * p / parts, rows * (p + 1) / parts);
      outer_sum(mine.data(), static_cast<int64_t>(mine.size()), pm, pn,
                partial.data() + p * pm * pn, pn, /*accumulate=*/false);
    }
  });
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      const int64_t e = transpose ? j * M + i : i * N + j;
      float v = partial[e];
      for (int64_t p = 1; p < parts; ++p) v += partial[p * pm * pn + e];
      C[i * ldc + j] = v;
    }
  }
}

}  // namespace rnn_ext::cpu
