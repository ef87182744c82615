// Host launchers of the persistent recurrence kernels (csrc/cuda/rnn_persistent.cu).
// Pure CUDA (no torch header), like cuda/rnn_kernels.h.
//
// Forward.  One cooperative launch runs the whole recurrence of up to kMaxPersistentCells
// "cells" (a cell = one direction of one layer).  Each cell gets ceil(H / 8) blocks; a block
// keeps its slice of the cell's weights -- rows j0 .. j0+7 of W_hh and, for a cell that projects
// its own input, of W_ih -- in shared memory for the whole sequence and, per step, computes
// those 8 columns of
//   h_t = act(P_t + b_hh + h_{t-1} W_hh^T)         P_t precomputed in `out` (b_ih folded in)
//   h_t = act(x_t W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T)                  in-kernel projection
// for every batch row (fp32 accumulation), then waits at a grid-wide barrier (cooperative
// groups' grid.sync()).  Time runs in super-steps: cell c processes its step i = s - delay_c at
// super-step s, so
//   - both directions of one layer are two cells with delay 0 (the second reversed);
//   - a layer wavefront is cells l = 0 .. n-1 of a unidirectional stack with delay l, cell l > 0
//     reading x_t from cell l-1's output, which cell l-1 wrote at super-step s-1: n layers cost
//     T + n - 1 barriers instead of n T.
//
// Backward.  One cooperative launch runs backpropagation through time of one layer, both
// directions (cells), with W_hh^T's slice in shared memory:
//   super-step 0:           dz_t0 = (dh_in + dy_t0) * act'(h_t0)
//   super-step i (1..T-1):  dz_ti = (dz_t(i-1) W_hh + dy_ti) * act'(h_ti)
//   super-step T:           dh_out = dz_t(T-1) W_hh                          (= d h0)
// where t0, t1, ... is the direction's processing order reversed (T-1 .. 0 for a forward cell).
// The same arithmetic as the per-step path (cuda/rnn_kernels.h, backward_step): dh in fp32,
// dz stored in the storage dtype and multiplied from there.
//
// Scope (everything else returns a status other than kLaunched and enqueues nothing, so the
// caller runs the per-step path):
//   - float, half and bfloat16 storage (double falls back);
//   - uniform batch: step t owns rows [t*B, (t+1)*B) of every buffer;
//   - H (and K_in) a multiple of 16 / sizeof(element), row strides too, every pointer 16-byte
//     aligned (vector loads);
//   - all blocks co-resident (occupancy x SM count), shared memory within the device's opt-in
//     limit, and a device that supports cooperative launches.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/rnn_kernels.h"

namespace rnn_ext::gpu {

constexpr int kMaxPersistentCells = 8;

// One direction of one layer in a forward launch.
struct PersistentCell {
  // In-kernel input projection (the upper layers of a wavefront).  w_ih == nullptr: `out`
  // already holds P_t (b_ih folded in) on entry, and x, K_in, ld_x, b_ih are unused.
  const void* w_ih = nullptr;  // (H, K_in) contiguous
  const void* b_ih = nullptr;  // (H) or null
  const void* x = nullptr;     // row r of step t at x + (t * B + r) * ld_x, K_in columns
  int64_t K_in = 0;
  int64_t ld_x = 0;
  const void* w_hh = nullptr;  // (H, H) contiguous
  const void* b_hh = nullptr;  // (H) or null
  const void* h0 = nullptr;    // (B, H) contiguous: the initial hidden state
  void* out = nullptr;         // row r of step t at out + (t * B + r) * ld: h_t on exit
  int64_t ld = 0;
  void* hn = nullptr;          // (B, H) contiguous, or null: receives h of the last step
  bool reverse = false;        // processes t = T-1 .. 0
  int delay = 0;               // processes step i at super-step i + delay
};

// Which block product runs (bench/NOTES.md: P1 = FMA with the slice in shared memory, P3 =
// tensor cores with the slice in registers).
struct PersistentPrefs {
  bool tensor_cores = true;  // mma.sync where it applies (sm_80+, sizes below); else FMA
  bool allow_tf32 = false;   // float32 on tensor cores as TF32 (torch's allow_tf32); else FMA
  // P3 only: load the A fragments in the mma layout's own k order, one 4-byte load per
  // register, instead of one 8-byte load per two registers (rnn_persistent_device.cuh; kept
  // to measure the two against each other)
  bool narrow_a_loads = false;
  // P3b only (bench/NOTES.md; experimental until measured on a GPU): the 8-byte A loads of a
  // group of m-tiles issued before their mmas (ignored with narrow_a_loads)
  bool grouped_a_loads = false;
  // P5 (bench/NOTES.md): split each cell's batch rows into up to this many row groups, each a
  // copy of the cell's column blocks computing only its rows, as far as co-residency allows
  // (more SMs share the L2 reads of h_{t-1} at small H).  1 = off, the launch above.
  int max_row_groups = 1;
};

struct PersistentForward {
  PersistentCell cell[kMaxPersistentCells];
  PersistentPrefs prefs;
  int* used_row_groups = nullptr;  // out (may be null): P5's row groups of the launch
  int cells = 0;
  int64_t T = 0;  // steps
  int64_t B = 0;  // rows per step (uniform)
  int64_t H = 0;  // hidden size
  bool relu = false;
};

// One direction of one layer in a backward launch.  All buffers but dh in the storage dtype.
struct PersistentBackwardCell {
  const void* wt_hh = nullptr;  // W_hh^T, (H, H) contiguous (dh_prev = dz W_hh)
  const void* h = nullptr;      // the layer's output: row r of step t at h + (t * B + r) * ld
  const void* dy = nullptr;     // gradient w.r.t. that output, same layout; null = zero
  void* dz = nullptr;           // out: gradient w.r.t. the pre-activation, same layout
  float* dh = nullptr;          // (B, H) fp32: in, d h of the last step; out, d h0
  bool reverse = false;         // the cell ran t = T-1 .. 0 forward (so backward runs 0 .. T-1)
};

struct PersistentBackward {
  PersistentBackwardCell cell[2];
  PersistentPrefs prefs;
  int* used_row_groups = nullptr;  // out (may be null): P5's row groups of the launch
  int cells = 0;
  int64_t T = 0, B = 0, H = 0;
  int64_t ld = 0;  // row stride of h, dy, dz (elements)
  bool relu = false;
};

// Why a call did not launch (for the caller's diagnostics).
enum class PersistentStatus : int {
  kLaunched = 0,
  kUnsupportedDType = 1,   // double
  kUnaligned = 2,          // a size or stride not a multiple of 16 / element size, a pointer
                           // not 16-byte aligned, or a malformed cell table
  kNoCooperative = 3,      // the device cannot launch cooperative kernels
  kSharedMemory = 4,       // the weight slice does not fit the per-block shared memory
  kCoResidency = 5,        // not all blocks can be resident at once
  kEmpty = 6,              // nothing to do (T, B or H is 0): nothing enqueued, nothing needed
};

// Check feasibility on the current device and, when feasible, enqueue the kernel on `stream`
// (no host synchronisation).  *status says what happened; the return value is the CUDA error
// of the queries / the launch (cudaSuccess when it simply was not feasible).  The caller
// guarantees the hazards the kernels rely on: a cell never writes rows another cell reads in
// the same super-step (true for the two layouts described above).
// *used_mma (may be null): whether the launch runs the tensor-core variant.
cudaError_t persistent_forward(DType dtype, const PersistentForward& args, cudaStream_t stream,
                               PersistentStatus* status, bool* used_mma = nullptr);
cudaError_t persistent_backward(DType dtype, const PersistentBackward& args,
                                cudaStream_t stream, PersistentStatus* status,
                                bool* used_mma = nullptr);

// P5's row groups for a launch of `blocks` blocks (cells x column blocks) over B rows, at most
// `max_groups` and `max_coresident / blocks`, each group a multiple of `align` rows (the
// block product's row tile) and at least that many: returns R >= 1 and the rows per group in
// *rows_per_group (B when R == 1).
int persistent_row_groups(int max_groups, int64_t B, int64_t blocks, int64_t max_coresident,
                          int64_t align, int64_t* rows_per_group);

// The shape of a launch on the current device, without launching: `cells` cells of hidden size
// H, the widest projecting cell K_in columns wide (0: none projects), forward or backward
// kernel, the variant `prefs` selects.  blocks, threads per block, dynamic shared memory per
// block, the most blocks that can be co-resident, registers per thread, the variant.  For the glue's choice of wavefront depth, tests,
// the benchmark notes and diagnostics.
struct PersistentPlan {
  int blocks = 0;
  int threads = 0;
  int64_t smem_bytes = 0;
  int max_coresident = 0;
  int registers = 0;  // per thread, from cudaFuncGetAttributes
  bool mma = false;   // the tensor-core variant
  PersistentStatus status = PersistentStatus::kLaunched;  // kLaunched = feasible
};
cudaError_t persistent_plan(DType dtype, int64_t H, int cells, int64_t K_in, bool backward,
                            const PersistentPrefs& prefs, PersistentPlan* plan);

// Microbenchmark of the grid barrier alone: one cooperative launch of `blocks` blocks of 256
// threads doing `steps` grid.sync()s, timed with CUDA events on `stream` (this one synchronises
// with the host).  *us_per_sync = elapsed / steps.  For bench/NOTES.md's floor.
cudaError_t grid_barrier_benchmark(int blocks, int64_t steps, cudaStream_t stream,
                                   double* us_per_sync);

}  // namespace rnn_ext::gpu
