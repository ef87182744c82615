// The recurrent step of the float32 CPU path: a small GEMM with the nonlinearity fused in.
//
//   C[r, j] = act(C[r, j] + sum_k A[r, k] * Bp[k, j])      r < M, j < N
//
// Bp is the (K x N) right operand packed by pack_panel: column blocks of 16, each a contiguous
// (K x 16) slab, zero-padded past N:
// W_hh^T for the forward step (act = tanh/relu), W_hh itself for the backward step
// (act = none, C overwritten instead of accumulated).  An AVX2+FMA register-blocked kernel
// (6 rows x 16 columns of C in 12 ymm accumulators; on AVX-512 cores up to 8 rows x 32 columns
// in 16 zmm accumulators): at the per-step sizes of an RNN (a few to a few hundred
// rows) it is several times faster than a BLAS call on the first project machine's MKL, and the
// nonlinearity runs while the block is still in registers.
#pragma once

#include <cstdint>

namespace rnn_ext::cpu {

enum class StepAct { kNone, kTanh, kRelu };

// True when this CPU runs the kernel (AVX2 and FMA); otherwise callers use BLAS.
bool step_kernel_available();

// The instruction set a step with this K runs on: "avx512" (AVX-512 F/DQ/VL cores, every K,
// unless the environment variable RNN_EXT_CPU_ISA=avx2 asks for AVX2), "avx2", or "none" (no
// step kernel).  Both give bitwise the same results.
const char* step_kernel_isa(int64_t K);

// Whether the CPU kernels may use AVX-512 (F/DQ/VL) at all: the CPU has it and
// RNN_EXT_CPU_ISA is not "avx2".
bool avx512_enabled();

inline int64_t panel_width(int64_t n) { return (n + 15) / 16 * 16; }

// dst (K * panel_width(N) floats) <- src viewed as (K x N) with row stride lds (or, with
// transpose, src is (N x K) and the operand is its transpose), packed as step_gemm reads it.
void pack_panel(const float* src, int64_t lds, int64_t K, int64_t N, bool transpose, float* dst);

// accumulate: C += A Bp before act; otherwise C = A Bp before act.
void step_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
               float* C, int64_t ldc, bool accumulate, StepAct act);

// The 16-column blocks [jb0, jb1) of step_gemm's C (columns 16 jb0 .. min(N, 16 jb1)), on the
// calling thread: one member's share of a step computed by a team of threads.
void step_gemm_blocks(int64_t jb0, int64_t jb1, int64_t M, int64_t N, int64_t K, const float* A,
                      int64_t lda, const float* Bp, float* C, int64_t ldc, bool accumulate,
                      StepAct act);

}  // namespace rnn_ext::cpu
