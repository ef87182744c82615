// Host launchers of the CUDA kernels (csrc/cuda/rnn_kernels.cu).  Pure CUDA: no torch header,
// so the .cu compiles alone with nvcc; the torch-facing side is csrc/cuda_glue.cpp.
//
// Every launcher takes raw device pointers, element counts / strides in elements (64-bit), the
// storage dtype and a stream; it enqueues its kernels on that stream (never synchronises, so it
// can be captured in a CUDA graph), skips the launch when there is nothing to do, and returns
// cudaGetLastError() after its launches (cudaErrorInvalidValue for sizes it cannot grid).
//
// Storage dtypes: float, double, half (__half) and bfloat16 (__nv_bfloat16).  Arithmetic is in
// "acc" precision: double for double, float for the others.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace rnn_ext::gpu {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// Size in bytes of one stored element / one accumulator element.
inline int64_t storage_size(DType t) {
  return t == DType::kDouble ? 8 : t == DType::kFloat ? 4 : 2;
}
inline int64_t acc_size(DType t) { return t == DType::kDouble ? 8 : 4; }

// One forward step of one direction of one layer, in place:
//   z[r, :] = act(z[r, :] + b_hh + hprev[r, :] W_hh^T)          for r < rows
// where z (rows x H, row stride ld_z) holds the input projection of this step (b_ih folded in)
// and hprev row r is row r of `cont_rows` (row stride ld_cont) for r < cont, and row r of `h0`
// (row stride ld_h0) for cont <= r < rows.  w_hh is (H, H) contiguous, b_hh (H) or null.
// z must not overlap the hprev rows.  act = tanh, or relu (NaN kept) when relu.
cudaError_t forward_step(DType dtype, const void* w_hh, const void* b_hh, const void* cont_rows,
                         int64_t ld_cont, int64_t cont, const void* h0, int64_t ld_h0, void* z,
                         int64_t ld_z, int64_t rows, int64_t H, bool relu, cudaStream_t stream);

// One backward step (BPTT) of one direction of one layer, fused with the pointwise part of the
// step processed next:
//   g[r, :] = dz_in[r, :] W_hh                  for r < rows_in   (the matvec; wt_hh = W_hh^T,
//                                                                   (H, H) contiguous)
//   g[r, :] = dh[r, :]                          for rows_in <= r  (rows the step did not touch)
//   for r < rows_next:  dz_next[r] = (g[r] + dy_next[r]) * act'(h_next[r])
//   for rows_next <= r < max(rows_in, rows_next):  dh[r] = g[r]
// dz_in, dy_next, h_next, dz_next have row stride ld (storage dtype); dy_next may be null
// (zero); dh is (>= max rows, H) contiguous in acc precision.  rows_in == 0 starts the
// recursion (dz_next from dh + dy only); rows_next == 0 ends it (dh then holds d h0).
// act'(h) = 1 - h*h for tanh, (h <= 0 ? 0 : 1) for relu (NaN passes).  dz_in must not overlap
// dz_next.
cudaError_t backward_step(DType dtype, const void* wt_hh, const void* dz_in, int64_t rows_in,
                          void* dh, const void* dy_next, const void* h_next, void* dz_next,
                          int64_t rows_next, int64_t ld, int64_t H, bool relu,
                          cudaStream_t stream);

// A run of rows copied by gather_rows: dst rows [dst_row, dst_row + rows) from rows
// [src_row, src_row + rows) of source `src` (0 or 1).
struct CopySegment {
  int64_t dst_row;
  int64_t src_row;
  int64_t rows;
  int32_t src;
};

// dst[dst_row + i, :cols] = src_k[src_row + i, :cols] for every segment (row strides in
// elements).  Any number of segments (launched in chunks).
cudaError_t gather_rows(DType dtype, const void* src0, int64_t ld0, const void* src1,
                        int64_t ld1, void* dst, int64_t ld_dst, int64_t cols,
                        const CopySegment* segments, int64_t num_segments, cudaStream_t stream);

}  // namespace rnn_ext::gpu
