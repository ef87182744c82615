// Host launcher of the persistent forward recurrence kernel (csrc/cuda/rnn_persistent.cu).
// Pure CUDA (no torch header), like cuda/rnn_kernels.h.
//
// One cooperative launch runs the whole recurrence of one layer, both directions at once: the
// grid holds D * ceil(H / 8) blocks; block b of direction d keeps W_hh[8b : 8b+8, :] of that
// direction in shared memory for the whole sequence and, per step, computes those 8 columns of
//   h_t = act(P_t + b_hh + h_{t-1} W_hh^T)
// for every batch row (fp32 accumulation), in place over the projection P_t, then waits at a
// grid-wide barrier (cooperative_groups grid.sync()).
//
// Scope (everything else returns *launched = false so the caller runs the per-step path):
//   - float, half and bfloat16 storage (double falls back);
//   - uniform batch only (dense input, or a PackedSequence whose sequences all have the same
//     length): step t owns rows [t*B, (t+1)*B) of the layer output;
//   - H a multiple of 16 / sizeof(element) and every pointer 16-byte aligned (vector loads);
//   - all D * ceil(H / 8) blocks co-resident (occupancy x SM count), shared memory within the
//     device's opt-in limit, and a device that supports cooperative launches.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/rnn_kernels.h"

namespace rnn_ext::gpu {

// One direction of one layer.
struct PersistentDirection {
  const void* w_hh;  // (H, H) contiguous
  const void* b_hh;  // (H) or null
  const void* h0;    // (B, H) contiguous: the initial hidden state of this direction
  void* out;         // this direction's first column of the layer output: row r of step t is
                     // out + (t * B + r) * ld; holds P_t (b_ih folded in) on entry, h_t on exit
};

struct PersistentForward {
  PersistentDirection dir[2];
  int64_t T = 0;   // steps
  int64_t B = 0;   // rows per step (uniform)
  int64_t H = 0;   // hidden size
  int64_t ld = 0;  // row stride of out, in elements (D * H)
  int D = 1;       // directions (1 or 2); direction 1 runs t = T-1 .. 0
  bool relu = false;
};

// Why a call did not launch (for the caller's diagnostics).
enum class PersistentStatus : int {
  kLaunched = 0,
  kUnsupportedDType = 1,   // double
  kUnaligned = 2,          // H % (16 / element size) != 0 or a pointer not 16-byte aligned
  kNoCooperative = 3,      // the device cannot launch cooperative kernels
  kSharedMemory = 4,       // the W_hh slice does not fit the per-block shared memory
  kCoResidency = 5,        // not all blocks can be resident at once
  kEmpty = 6,              // nothing to do (T, B or H is 0): nothing enqueued, nothing needed
};

// Checks feasibility on the current device and, when feasible, enqueues the kernel on `stream`
// (no host synchronisation).  *status says what happened; the return value is the CUDA error of
// the queries / the launch (cudaSuccess when it simply was not feasible).
cudaError_t persistent_forward(DType dtype, const PersistentForward& args, cudaStream_t stream,
                               PersistentStatus* status);

// The shape of the launch for (dtype, H, D) on the current device, without launching: blocks,
// threads per block, dynamic shared memory per block, and the most blocks that can be
// co-resident.  For tests, the benchmark notes and diagnostics.
struct PersistentPlan {
  int blocks = 0;
  int threads = 0;
  int64_t smem_bytes = 0;
  int max_coresident = 0;
  int registers = 0;  // per thread, from cudaFuncGetAttributes
  PersistentStatus status = PersistentStatus::kLaunched;  // kLaunched = feasible
};
cudaError_t persistent_forward_plan(DType dtype, int64_t H, int D, PersistentPlan* plan);

// Microbenchmark of the grid barrier alone: one cooperative launch of `blocks` blocks of 256
// threads doing `steps` grid.sync()s, timed with CUDA events on `stream` (this one synchronises
// with the host).  *us_per_sync = elapsed / steps.  For bench/NOTES.md's floor.
cudaError_t grid_barrier_benchmark(int blocks, int64_t steps, cudaStream_t stream,
                                   double* us_per_sync);

}  // namespace rnn_ext::gpu
