// The weight-gradient products of the float32 CPU backward: sums of outer products of rows,
//
//   C[i, j] = sum over the rows r of  A[r, i] * B[r, j]        i < M, j < N
//
// i.e. C = A^T B for A (K x M) and B (K x N), row-major: dW_ih = dZ^T X and dW_hh = dZ^T H_prev
// over all steps and batch rows, or over one sample's steps for its per-sample gradients.  The
// rows come as spans (a pointer and a row stride for each operand), so the operands are read
// where they lie: H_prev is the previous step's output (one span for the steps t >= 1, one for
// h_0), and one sample's rows are every B-th row of the batch: no gather.
//
// BLAS packs both operands before multiplying, which at these shapes (M, N up to a few hundred,
// K in the thousands, or one sample's T steps) costs about as much as the arithmetic (measured
// on the Intel Xeon VM, bench/NOTES.md "Weight-gradient products").  This kernel reads them in
// place: K in chunks of kOuterChunk rows, whose slices of A and B stay in L1 while register
// tiles of C (AVX-512: up to 6 rows x 64 columns in 24 zmm; AVX2: 3 x 32 in 12 ymm) sum their
// products.  Every element of C sums each chunk's products in row order with one FMA each,
// starting from zero, then adds the chunk's sum to C: the AVX2 and AVX-512 tiles give bitwise
// the same results (and so does any split of the columns or rows of C into tiles).  The
// threaded form's results depend on its number of parts (the thread count, and whether it runs
// inside a parallel region); the products left to BLAS are MKL's, whose code differs by CPU.
#pragma once

#include <cstdint>

namespace rnn_ext::cpu {

// Rows [0, rows) of A (a, row stride lda) and of B (b, row stride ldb).  (Templated for the
// float64 path, which forms the same products through BLAS.)
template <typename T>
struct RowSpanT {
  const T* a;
  int64_t lda;
  const T* b;
  int64_t ldb;
  int64_t rows;
};
using RowSpan = RowSpanT<float>;

constexpr int64_t kOuterChunk = 64;

// True when this CPU runs the kernel (AVX2 and FMA).
bool outer_sum_available();

// Whether the weight gradients of an (M x N) product go through outer_sum (else BLAS):
// RNN_EXT_CPU_WGRAD = "blas" (never) / "kernel" (always, where available) / unset: where
// M N <= RNN_EXT_CPU_WGRAD_MAX (default 128 x 128; measured, bench/NOTES.md).
bool use_outer_sum(int64_t M, int64_t N);

// C (M x N, row stride ldc) = sum over the rows of spans[0..n), added to C when accumulate,
// else replacing it; on the calling thread.
void outer_sum(const RowSpan* spans, int64_t n, int64_t M, int64_t N, float* C, int64_t ldc,
               bool accumulate);

// The same product (C replaced), as the weight gradients use it: with `threaded`, on torch's
// intra-op threads, the rows split into at most get_num_threads() parts of at least
// kOuterPartRows rows (the split depends only on the row count and the thread count, and the
// parts' sums are added in order: the same result on every run with the same thread count);
// else on the calling thread.  Products with few columns (N < 32 <= M) are formed as
// C^T = B^T A, whose tiles fill the vector registers, and transposed into C.
void outer_product(const RowSpan* spans, int64_t n, int64_t M, int64_t N, float* C, int64_t ldc,
                   bool threaded);

// acc[e] += src[e], e < n (vectorised where the CPU allows).
void add_to(float* acc, const float* src, int64_t n);

constexpr int64_t kOuterPartRows = 256;

// Column sums (the bias gradients): dst[j] = sum over r < rows of src[r * ld + j], j < cols,
// added in double in row order and rounded once (bitwise the plain loop), vectorised where the
// CPU allows.
void column_sums(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst);

}  // namespace rnn_ext::cpu
