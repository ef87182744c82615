// The persistent recurrence kernels' launchers (declared in cuda/rnn_persistent.h, which says
// what they compute; the device code is cuda/rnn_persistent_device.cuh).  Pure CUDA (no torch
// header).
#include "cuda/rnn_persistent.h"
#include "cuda/rnn_persistent_device.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace rnn_ext::gpu {

namespace {

using namespace persistent_detail;

// ---------------------------------------------------------------------------------------------
// Host side

// The kernel of a variant, typed (for the launch) and untyped (for the attribute queries).
// a_load: the tensor-core variant's A loads (MmaProduct's kALoad: 0 8-byte, 1 4-byte, 2
// grouped; a_load_of below); split: P5's row groups (with the 8-byte loads only:
// apply_row_groups keeps R = 1 otherwise).
template <typename T>
auto forward_kernel(bool mma, int a_load, bool split = false) {
  if (split) {
    return mma ? &persistent_forward_kernel<T, true, 0, true>
               : &persistent_forward_kernel<T, false, 0, true>;
  }
  if (!mma) return &persistent_forward_kernel<T, false>;
  return a_load == 1   ? &persistent_forward_kernel<T, true, 1>
         : a_load == 2 ? &persistent_forward_kernel<T, true, 2>
                       : &persistent_forward_kernel<T, true>;
}
template <typename T>
auto backward_kernel(bool mma, int a_load, bool split = false) {
  if (split) {
    return mma ? &persistent_backward_kernel<T, true, 0, true>
               : &persistent_backward_kernel<T, false, 0, true>;
  }
  if (!mma) return &persistent_backward_kernel<T, false>;
  return a_load == 1   ? &persistent_backward_kernel<T, true, 1>
         : a_load == 2 ? &persistent_backward_kernel<T, true, 2>
                       : &persistent_backward_kernel<T, true>;
}
template <typename T>
const void* kernel_of(bool backward, bool mma, int a_load) {
  return backward ? reinterpret_cast<const void*>(backward_kernel<T>(mma, a_load))
                  : reinterpret_cast<const void*>(forward_kernel<T>(mma, a_load));
}
int a_load_of(const PersistentPrefs& prefs) {
  return prefs.narrow_a_loads ? 1 : prefs.grouped_a_loads ? 2 : 0;
}

// Whether the tensor-core variant applies: asked for, a dtype it has (fp32 only as TF32, only
// when allowed), k-tiles that do not straddle the two segments, the slice within the
// registers kept for it, and an sm_80+ device.
template <typename T>
bool use_mma(const PersistentPrefs& prefs, int64_t H, int64_t K_in, int cc_major) {
  constexpr int64_t kK = MmaTraits<T>::kK;
  return prefs.tensor_cores && (sizeof(T) == 2 || prefs.allow_tf32) && cc_major >= 8 &&
         H % kK == 0 && K_in % kK == 0 && (K_in + H) / kK <= 8 * kMaxKTiles;
}

// Lets `kernel` (attributes fa) take `smem` bytes of dynamic shared memory (above the default
// 48 KiB it must be allowed per kernel function) and returns its resident blocks per SM.
cudaError_t prepare_kernel(const void* kernel, const cudaFuncAttributes& fa, int smem,
                           int* per_sm) {
  if (smem > fa.maxDynamicSharedSizeBytes) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, kThreads, smem);
}

template <typename T>
cudaError_t plan_t(int64_t H, int cells, int64_t K_in, bool backward,
                   const PersistentPrefs& prefs, PersistentPlan* plan) {
  *plan = PersistentPlan{};
  plan->threads = kThreads;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int coop = 0, optin = 0, sms = 0, major = 0;
  if ((err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev)) != cudaSuccess)
    return err;
  if ((err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) !=
      cudaSuccess)
    return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
    return err;
  if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) !=
      cudaSuccess)
    return err;
  plan->mma = use_mma<T>(prefs, H, K_in, major);
  const int64_t bpc = (H + kCols - 1) / kCols;
  const int64_t blocks = static_cast<int64_t>(cells) * bpc;
  plan->blocks = blocks > 0x7fffffffLL ? 0x7fffffff : static_cast<int>(blocks);
  plan->smem_bytes =
      plan->mma ? static_cast<int64_t>(kWarps) * kMmaRows * kCols * sizeof(float)
                : static_cast<int64_t>(kCols) * (K_in + H) * static_cast<int64_t>(sizeof(T)) +
                      kWarps * 32 * static_cast<int64_t>(sizeof(float));
  const void* kernel = kernel_of<T>(backward, plan->mma, a_load_of(prefs));
  cudaFuncAttributes fa{};
  if ((err = cudaFuncGetAttributes(&fa, kernel)) != cudaSuccess) return err;
  plan->registers = fa.numRegs;
  if (!coop) {
    plan->status = PersistentStatus::kNoCooperative;
    return cudaSuccess;
  }
  if (plan->smem_bytes > optin) {
    plan->status = PersistentStatus::kSharedMemory;
    return cudaSuccess;
  }
  int per_sm = 0;
  err = prepare_kernel(kernel, fa, static_cast<int>(plan->smem_bytes), &per_sm);
  if (err != cudaSuccess) return err;
  plan->max_coresident = per_sm * sms;
  if (blocks > plan->max_coresident) plan->status = PersistentStatus::kCoResidency;
  return cudaSuccess;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// P5: the row groups of a feasible plan (persistent_row_groups), applied to the plan's block
// count; the rows per group for the kernel's parameters.  The block product's row tile: 16
// (an m-tile) for the tensor-core variant, kRows for FMA.
// The split kernel is a function of its own: its dynamic shared memory is allowed and its
// co-residency asked here (the plan's are the unsplit kernel's); any error: no groups.
int apply_row_groups(const PersistentPrefs& prefs, int64_t B, const void* split_kernel,
                     PersistentPlan* plan, int64_t* rows_per_group) {
  *rows_per_group = B;
  const int want = a_load_of(prefs) != 0 && plan->mma ? 1 : prefs.max_row_groups;
  int64_t unused = 0;
  if (persistent_row_groups(want, B, plan->blocks, plan->max_coresident,
                            plan->mma ? 16 : kRows, &unused) <= 1) {
    return 1;
  }
  int dev = 0, sms = 0, per_sm = 0;
  cudaFuncAttributes fa{};
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaFuncGetAttributes(&fa, split_kernel) != cudaSuccess ||
      prepare_kernel(split_kernel, fa, static_cast<int>(plan->smem_bytes), &per_sm) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  const int64_t coresident = std::min<int64_t>(plan->max_coresident,
                                               static_cast<int64_t>(per_sm) * sms);
  const int R = persistent_row_groups(want, B, plan->blocks, coresident,
                                      plan->mma ? 16 : kRows, rows_per_group);
  plan->blocks *= R;
  return R;
}

// The cooperative launch of a feasible plan; a launch refused for size (occupancy said yes,
// the launch no, e.g. another context holds SMs) enqueues nothing and reports kCoResidency.
// (The emulation in tests/simt/ runs the grid on host threads instead.)
template <typename Params>
cudaError_t launch(void (*kernel)(Params), const PersistentPlan& plan, Params& params,
                   cudaStream_t stream, PersistentStatus* status) {
#ifdef RNN_EXT_SIMT_EMULATION
  (void)stream;
  simt::launch(static_cast<unsigned>(plan.blocks), kThreads, static_cast<size_t>(plan.smem_bytes),
               [&] { kernel(params); });
  *status = PersistentStatus::kLaunched;
  return cudaSuccess;
#else
  void* kargs[] = {&params};
  cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                                dim3(plan.blocks), dim3(kThreads), kargs,
                                                static_cast<size_t>(plan.smem_bytes), stream);
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    *status = PersistentStatus::kCoResidency;
    return cudaSuccess;
  }
  *status = err == cudaSuccess ? PersistentStatus::kLaunched : PersistentStatus::kCoResidency;
  return err;
#endif
}

// A feasible plan's launch, with P5's row groups where the prefs ask for them and they fit
// (apply_row_groups): kernel(split) is the kernel, params(blocks per cell, groups, rows per
// group) its parameters.  A launch with groups refused for co-residency (another context holds
// SMs) is made once more without them.  *used_row_groups (may be null): the groups launched.
template <typename KernelOf, typename ParamsOf>
cudaError_t launch_grouped(const PersistentPrefs& prefs, int64_t B, int cells,
                           PersistentPlan plan, KernelOf&& kernel, ParamsOf&& params,
                           int* used_row_groups, cudaStream_t stream, PersistentStatus* status) {
  int64_t rows = B;
  int R = apply_row_groups(prefs, B, reinterpret_cast<const void*>(kernel(true)), &plan, &rows);
  auto prm = params(plan.blocks / cells, R, rows);
  cudaError_t err = launch(kernel(R > 1), plan, prm, stream, status);
  if (err == cudaSuccess && R > 1 && *status == PersistentStatus::kCoResidency) {
    plan.blocks /= R;
    R = 1;
    prm = params(plan.blocks / cells, 1, B);
    err = launch(kernel(false), plan, prm, stream, status);
  }
  if (used_row_groups != nullptr) *used_row_groups = R;
  return err;
}

template <typename T>
cudaError_t persistent_forward_t(const PersistentForward& a, cudaStream_t stream,
                                 PersistentStatus* status, bool* used_mma) {
  constexpr int64_t V = 16 / sizeof(T);
  if (a.T <= 0 || a.B <= 0 || a.H <= 0) {
    *status = PersistentStatus::kEmpty;
    return cudaSuccess;
  }
  bool ok = a.cells >= 1 && a.cells <= kMaxPersistentCells && a.H % V == 0;
  int64_t K_in = 0, max_delay = 0;
  for (int c = 0; c < a.cells && ok; ++c) {
    const PersistentCell& cell = a.cell[c];
    ok = cell.ld % V == 0 && cell.ld >= a.H && cell.delay >= 0 && aligned16(cell.w_hh) &&
         aligned16(cell.h0) && aligned16(cell.out) && aligned16(cell.hn);
    if (ok && cell.w_ih != nullptr) {
      ok = cell.K_in > 0 && cell.K_in % V == 0 && cell.ld_x % V == 0 && cell.ld_x >= cell.K_in &&
           aligned16(cell.w_ih) && aligned16(cell.x);
      K_in = std::max(K_in, cell.K_in);
    }
    max_delay = std::max<int64_t>(max_delay, cell.delay);
  }
  if (!ok) {
    *status = PersistentStatus::kUnaligned;
    return cudaSuccess;
  }
  PersistentPlan plan;
  cudaError_t err = plan_t<T>(a.H, a.cells, K_in, false, a.prefs, &plan);
  if (err != cudaSuccess) return err;
  if (plan.status != PersistentStatus::kLaunched) {
    *status = plan.status;
    return cudaSuccess;
  }
  if (used_mma != nullptr) *used_mma = plan.mma;
  return launch_grouped(
      a.prefs, a.B, a.cells, plan,
      [&](bool split) { return forward_kernel<T>(plan.mma, a_load_of(a.prefs), split); },
      [&](int blocks_per_cell, int R, int64_t rows) {
        return ForwardParams{a, blocks_per_cell, warps_per_group(rows), a.T + max_delay, R, rows};
      },
      a.used_row_groups, stream, status);
}

template <typename T>
cudaError_t persistent_backward_t(const PersistentBackward& a, cudaStream_t stream,
                                  PersistentStatus* status, bool* used_mma) {
  constexpr int64_t V = 16 / sizeof(T);
  if (a.T <= 0 || a.B <= 0 || a.H <= 0) {
    *status = PersistentStatus::kEmpty;
    return cudaSuccess;
  }
  bool ok = (a.cells == 1 || a.cells == 2) && a.H % V == 0 && a.ld % V == 0 && a.ld >= a.H;
  for (int c = 0; c < a.cells && ok; ++c) {
    const PersistentBackwardCell& cell = a.cell[c];
    ok = aligned16(cell.wt_hh) && aligned16(cell.dz) && cell.h != nullptr &&
         cell.dh != nullptr;
  }
  if (!ok) {
    *status = PersistentStatus::kUnaligned;
    return cudaSuccess;
  }
  PersistentPlan plan;
  cudaError_t err = plan_t<T>(a.H, a.cells, 0, true, a.prefs, &plan);
  if (err != cudaSuccess) return err;
  if (plan.status != PersistentStatus::kLaunched) {
    *status = plan.status;
    return cudaSuccess;
  }
  if (used_mma != nullptr) *used_mma = plan.mma;
  return launch_grouped(
      a.prefs, a.B, a.cells, plan,
      [&](bool split) { return backward_kernel<T>(plan.mma, a_load_of(a.prefs), split); },
      [&](int blocks_per_cell, int R, int64_t rows) {
        return BackwardParams{a, blocks_per_cell, warps_per_group(rows), R, rows};
      },
      a.used_row_groups, stream, status);
}

template <typename F>
cudaError_t dispatch_persistent(DType dtype, F&& f, PersistentStatus* status) {
  switch (dtype) {
    case DType::kFloat:
      return f(float{});
    case DType::kHalf:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    case DType::kDouble:
      break;
  }
  *status = PersistentStatus::kUnsupportedDType;
  return cudaSuccess;
}

}  // namespace

cudaError_t persistent_forward(DType dtype, const PersistentForward& args, cudaStream_t stream,
                               PersistentStatus* status, bool* used_mma) {
  *status = PersistentStatus::kUnsupportedDType;
  if (used_mma != nullptr) *used_mma = false;
  return dispatch_persistent(
      dtype,
      [&](auto tag) {
        return persistent_forward_t<decltype(tag)>(args, stream, status, used_mma);
      },
      status);
}

cudaError_t persistent_backward(DType dtype, const PersistentBackward& args,
                                cudaStream_t stream, PersistentStatus* status, bool* used_mma) {
  *status = PersistentStatus::kUnsupportedDType;
  if (used_mma != nullptr) *used_mma = false;
  return dispatch_persistent(
      dtype,
      [&](auto tag) {
        return persistent_backward_t<decltype(tag)>(args, stream, status, used_mma);
      },
      status);
}

int persistent_row_groups(int max_groups, int64_t B, int64_t blocks, int64_t max_coresident,
                          int64_t align, int64_t* rows_per_group) {
  *rows_per_group = B;
  if (max_groups <= 1 || B <= 0 || B > 0x7fffffffLL || blocks <= 0 || align <= 0) return 1;
  int64_t R = std::min<int64_t>(max_groups, max_coresident / blocks);
  R = std::min<int64_t>(R, B / align);  // at least one full row tile per group
  if (R <= 1) return 1;
  int64_t per = (B + R - 1) / R;
  per = (per + align - 1) / align * align;  // whole row tiles
  R = (B + per - 1) / per;                  // (no empty group)
  if (R <= 1 || R * per > 0x7fffffffLL) return 1;  // (the split kernels' 32-bit row ends)
  *rows_per_group = per;
  return static_cast<int>(R);
}

cudaError_t persistent_plan(DType dtype, int64_t H, int cells, int64_t K_in, bool backward,
                            const PersistentPrefs& prefs, PersistentPlan* plan) {
  PersistentStatus st = PersistentStatus::kLaunched;
  const cudaError_t err = dispatch_persistent(
      dtype,
      [&](auto tag) { return plan_t<decltype(tag)>(H, cells, K_in, backward, prefs, plan); },
      &st);
  if (st == PersistentStatus::kUnsupportedDType) {
    *plan = PersistentPlan{};
    plan->status = st;
  }
  return err;
}

cudaError_t grid_barrier_benchmark(int blocks, int64_t steps, cudaStream_t stream,
                                   double* us_per_sync) {
  *us_per_sync = 0;
  if (blocks <= 0 || steps <= 0) return cudaErrorInvalidValue;
#ifdef RNN_EXT_SIMT_EMULATION
  (void)stream;
  return cudaErrorNotSupported;  // a timing: nothing to emulate
#else
  cudaEvent_t e0, e1;
  cudaError_t err = cudaEventCreate(&e0);
  if (err != cudaSuccess) return err;
  if ((err = cudaEventCreate(&e1)) != cudaSuccess) {
    cudaEventDestroy(e0);
    return err;
  }
  int64_t n = 1;  // warm-up launch with one barrier, then the timed one
  void* kargs[] = {&n};
  err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&grid_barrier_kernel),
                                    dim3(blocks), dim3(kThreads), kargs, 0, stream);
  if (err == cudaSuccess) err = cudaEventRecord(e0, stream);
  if (err == cudaSuccess) {
    n = steps;
    err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&grid_barrier_kernel),
                                      dim3(blocks), dim3(kThreads), kargs, 0, stream);
  }
  if (err == cudaSuccess) err = cudaEventRecord(e1, stream);
  if (err == cudaSuccess) err = cudaEventSynchronize(e1);
  float ms = 0;
  if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, e0, e1);
  if (err == cudaSuccess) *us_per_sync = 1000.0 * ms / static_cast<double>(steps);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return err;
#endif
}

}  // namespace rnn_ext::gpu
