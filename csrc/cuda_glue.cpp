// The CUDA backend's torch-facing side: rnn_forward_cuda / rnn_backward_cuda (registered under
// the CUDA key in csrc/ops.cpp).  Same algorithm and conventions as csrc/cpu/rnn_cpu.cpp:
//
//   forward, per layer and direction:
//     1. one GEMM (cuBLAS through ATen) for the input projection of every step, b_ih folded
//        in, written into this direction's columns of the layer output (row stride D*H);
//     2. per step one fused kernel: z += b_hh + h_prev W_hh^T, z = act(z), in place
//        (cuda/rnn_kernels.cu);
//     3. h_n gathered with one kernel.
//   backward, per layer and direction: per step one fused kernel (dh = dz W_hh for the step
//   just done, then dh += dy, dz = dh * act'(h) for the next), then dW_ih = dZ^T X,
//   dW_hh = dZ^T H_prev (H_prev gathered by a kernel), db = column sums of dZ, and
//   dX = dZ [W_ih_0; W_ih_1] as ATen GEMMs.
//
// Everything is enqueued on the current stream of the input's device; nothing synchronises
// with the host (batch_sizes is a CPU tensor and is read on the host), so forward and backward
// can be captured in a CUDA graph.  fp16/bf16 stay in their dtype in memory; the kernels
// accumulate in fp32 (fp64 for double) and cuBLAS accumulates in fp32.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#ifdef RNN_EXT_SIMT_EMULATION
// tests/simt/: this file on CPU tensors, with the kernels run on host threads
#include "glue_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/rnn_kernels.h"
#include "cuda/rnn_persistent.h"
#include "rnn_ext.h"

namespace rnn_ext {

namespace {

gpu::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return gpu::DType::kFloat;
    case at::kDouble:
      return gpu::DType::kDouble;
    case at::kHalf:
      return gpu::DType::kHalf;
    case at::kBFloat16:
      return gpu::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "rnn_ext: unsupported dtype on CUDA: ", t);
  }
}

// The kernels' accumulation dtype (the dtype of the backward's dh buffer).
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err != cudaErrorInvalidValue, "rnn_ext: ", what,
              ": problem too large for the CUDA kernel's grid");
  C10_CUDA_CHECK(err);
}

// Raw pointer `elements` elements past p (elements of `size` bytes).
inline const void* advance(const void* p, int64_t elements, int64_t size) {
  return p == nullptr ? nullptr : static_cast<const char*>(p) + elements * size;
}
inline void* advance(void* p, int64_t elements, int64_t size) {
  return p == nullptr ? nullptr : static_cast<char*>(p) + elements * size;
}

// Steps in the order a direction processes them.
inline int64_t step_at(const Geometry& g, int64_t d, int64_t i) {
  return d == 0 ? i : g.T - 1 - i;
}

// Appends a copy of `rows` rows, merging it with the previous segment when both continue it.
void add_segment(std::vector<gpu::CopySegment>& segs, int64_t dst_row, int32_t src,
                 int64_t src_row, int64_t rows) {
  if (rows <= 0) return;
  if (!segs.empty()) {
    auto& last = segs.back();
    if (last.src == src && last.dst_row + last.rows == dst_row &&
        last.src_row + last.rows == src_row) {
      last.rows += rows;
      return;
    }
  }
  segs.push_back(gpu::CopySegment{dst_row, src_row, rows, src});
}

// h_n of direction d: row r is the output row of r's last processed step (source 0), or row r
// of h0 (source 1) when r never ran.  Mirrors gather_final in csrc/cpu/rnn_cpu.cpp.
std::vector<gpu::CopySegment> final_segments(const Geometry& g, int64_t d) {
  std::vector<gpu::CopySegment> segs;
  for (int64_t r = 0; r < g.B; ++r) {
    int64_t t_last = -1;
    if (d == 1) {
      if (g.batch[0] > r) t_last = 0;
    } else {
      // batch is non-increasing: the first t with batch[t] <= r, minus one
      int64_t lo = 0, hi = g.T;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (g.batch[mid] > r) lo = mid + 1; else hi = mid;
      }
      t_last = lo - 1;
    }
    if (t_last >= 0) {
      add_segment(segs, r, 0, g.offset[t_last] + r, 1);
    } else {
      add_segment(segs, r, 1, r, 1);
    }
  }
  return segs;
}

// For dW_hh: the hidden state each row of each step started from, as (N, H) rows: the output
// row of the previous processed step (source 0) for rows that continue, row r of h0 (source 1)
// for the others.  Mirrors gather_prev in csrc/cpu/rnn_cpu.cpp; a dense input gives 2 segments.
std::vector<gpu::CopySegment> prev_segments(const Geometry& g, int64_t d) {
  std::vector<gpu::CopySegment> segs;
  for (int64_t t = 0; t < g.T; ++t) {
    const int64_t rows = g.batch[t];
    const bool has_prev = d == 0 ? t > 0 : t < g.T - 1;
    const int64_t tp = d == 0 ? t - 1 : t + 1;
    const int64_t cont = has_prev ? std::min(rows, g.batch[tp]) : 0;
    add_segment(segs, g.offset[t], 0, has_prev ? g.offset[tp] : 0, cont);
    add_segment(segs, g.offset[t] + cont, 1, cont, rows - cont);
  }
  return segs;
}

void gather(gpu::DType dt, const std::vector<gpu::CopySegment>& segs, const void* src0,
            int64_t ld0, const void* src1, int64_t ld1, void* dst, int64_t ld_dst, int64_t cols,
            cudaStream_t stream) {
  check_launch(gpu::gather_rows(dt, src0, ld0, src1, ld1, dst, ld_dst, cols, segs.data(),
                                static_cast<int64_t>(segs.size()), stream),
               "gather");
}

std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// Input-to-hidden weights of layer l stacked over directions: (D*H, I_l), for dX = dZ W.
at::Tensor stacked_w_ih(const Geometry& g, const std::vector<at::Tensor>& w, int64_t l) {
  const int64_t pc = g.weights_per_cell();
  if (g.D == 1) return w[l * pc];
  return at::cat({w[(l * g.D) * pc], w[(l * g.D + 1) * pc]}, 0);
}

// ---------------------------------------------------------------------------------------------
// Which recurrence kernels run (issue 5): "step" (one fused kernel per step), "persistent" (the
// persistent kernels where feasible, else the step path; their tensor-core variant where it
// applies), "persistent_fma" (the same with the FMA variant only), "auto" (the default: as
// "persistent" where it measured faster than the step path, see auto_prefers_persistent).
// RNN_EXT_CUDA_KERNEL sets the initial value.
enum class KernelMode : int { kStep = 0, kAuto = 1, kPersistent = 2, kPersistentFma = 3 };
enum class KernelUsed : int { kNone = 0, kStep = 1, kPersistent = 2, kMixed = 3 };

// "auto": the persistent kernels for B <= 64, and for H <= 256 up to B = 128; the step path
// elsewhere.  Measured on an H200 (bench/RESULTS.md, 2026-11-30; T=512, L=2, I=H, fp32 and
// bf16, forward and training): persistent 1.5-4x faster than the step path at every point
// with B <= 32, and at B = 128 for H = 256; slower at B = 128 for H >= 512 (fp32 H=512: 15.8
// against 10.9 ms).  B = 33-127 was not measured (64: interpolated crossover, bench/NOTES.md).
bool auto_prefers_persistent(int64_t B, int64_t H) {
  return B <= 64 || (H <= 256 && B <= 128);
}

bool parse_kernel_mode(const std::string& name, KernelMode* mode) {
  if (name == "step") {
    *mode = KernelMode::kStep;
  } else if (name == "auto") {
    *mode = KernelMode::kAuto;
  } else if (name == "persistent") {
    *mode = KernelMode::kPersistent;
  } else if (name == "persistent_fma") {
    *mode = KernelMode::kPersistentFma;
  } else {
    return false;
  }
  return true;
}

const char* kernel_mode_name(KernelMode m) {
  switch (m) {
    case KernelMode::kAuto:
      return "auto";
    case KernelMode::kPersistent:
      return "persistent";
    case KernelMode::kPersistentFma:
      return "persistent_fma";
    case KernelMode::kStep:
      break;
  }
  return "step";
}

std::atomic<int>& kernel_mode_state() {
  static std::atomic<int> mode{[] {
    KernelMode m = KernelMode::kAuto;
    const char* env = std::getenv("RNN_EXT_CUDA_KERNEL");
    if (env != nullptr && *env != '\0' && !parse_kernel_mode(env, &m)) {
      TORCH_WARN("rnn_ext: ignoring RNN_EXT_CUDA_KERNEL=", env,
                 " (expected auto, step, persistent or persistent_fma); using auto");
      m = KernelMode::kAuto;
    }
    return static_cast<int>(m);
  }()};
  return mode;
}

std::atomic<int> last_kernel_used{static_cast<int>(KernelUsed::kNone)};

std::atomic<int> last_backward_kernel_used{static_cast<int>(KernelUsed::kNone)};
std::atomic<int> last_wavefront_layers{0};
// Which persistent variants the last forward / backward ran: bit 0 FMA, bit 1 tensor cores.
std::atomic<int> last_variant[2] = {0, 0};
// The most row groups (P5) of the last forward's / backward's persistent launches (0: none).
std::atomic<int> last_row_groups[2] = {0, 0};

// P5 (bench/NOTES.md; experimental until measured on a GPU): RNN_EXT_CUDA_ROW_SPLIT=N lets a
// persistent launch split each cell's batch rows into up to N row groups, each with its own
// copy of the cell's column blocks, as co-residency allows (more SMs share the L2 reads of
// h_{t-1} at small H).  1 (the default) = off.
constexpr int kMaxRowSplit = 64;
std::atomic<int>& row_split_state() {
  static std::atomic<int> v{[] {
    const char* env = std::getenv("RNN_EXT_CUDA_ROW_SPLIT");
    if (env == nullptr || *env == '\0') return 1;
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (*end != '\0' || n < 1 || n > kMaxRowSplit) {
      TORCH_WARN("rnn_ext: ignoring RNN_EXT_CUDA_ROW_SPLIT=", env, " (expected 1 .. ",
                 kMaxRowSplit, ")");
      return 1;
    }
    return static_cast<int>(n);
  }()};
  return v;
}

// Whether the environment variable `name` is "1" (read where called: once, into a static).
bool env_flag(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && std::string(env) == "1";
}

// The persistent kernels' variant preferences for this call: tensor cores unless the switch
// says "persistent_fma"; float32 on them only as TF32, only when torch allows TF32 matmuls, and
// not under "auto": on the H200 (bench/RESULTS.md, 2026-11-30) the TF32 variant measured
// slower than the exact-fp32 FMA one at 22 of issue 5's 24 fp32 points (forward B=128 H=256:
// 19.0 against 6.6 ms), so "auto" runs float32 exactly; "persistent" still takes TF32.
gpu::PersistentPrefs current_prefs() {
  gpu::PersistentPrefs prefs;
  const auto mode = static_cast<KernelMode>(kernel_mode_state().load());
  prefs.tensor_cores = mode != KernelMode::kPersistentFma;
  // torch's precision setting for CUDA matmuls, whichever API set it (allow_tf32,
  // set_float32_matmul_precision or fp32_precision).  Not allowTF32CuBLAS(): that legacy getter
  // raises once the new fp32_precision API has been used.
  prefs.allow_tf32 = mode != KernelMode::kAuto &&
                     at::globalContext().float32Precision(at::Float32Backend::CUDA,
                                                          at::Float32Op::MATMUL) ==
                         at::Float32Precision::TF32;
  // RNN_EXT_CUDA_MMA_NARROW_A=1: the tensor-core variant's A fragments as 4-byte loads in the
  // mma layout's order (the layout before the 8-byte loads; to measure the two on a GPU)
  static const bool narrow_a = env_flag("RNN_EXT_CUDA_MMA_NARROW_A");
  prefs.narrow_a_loads = narrow_a;
  // RNN_EXT_CUDA_MMA_GROUPED_A=1 (P3b, experimental until measured on a GPU): the 8-byte A loads
  // of a group of m-tiles issued before their mmas
  static const bool grouped_a = env_flag("RNN_EXT_CUDA_MMA_GROUPED_A");
  prefs.grouped_a_loads = grouped_a;
  prefs.max_row_groups = row_split_state().load();
  return prefs;
}

// Most layers of a unidirectional stack one persistent forward launch runs as a wavefront
// (1 = one launch per layer).  RNN_EXT_CUDA_WAVEFRONT sets the initial value.
std::atomic<int>& wavefront_max_state() {
  static std::atomic<int> v{[] {
    const char* env = std::getenv("RNN_EXT_CUDA_WAVEFRONT");
    if (env == nullptr || *env == '\0') return gpu::kMaxPersistentCells;
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (*end != '\0' || n < 1 || n > gpu::kMaxPersistentCells) {
      TORCH_WARN("rnn_ext: ignoring RNN_EXT_CUDA_WAVEFRONT=", env, " (expected 1 .. ",
                 gpu::kMaxPersistentCells, ")");
      return gpu::kMaxPersistentCells;
    }
    return static_cast<int>(n);
  }()};
  return v;
}

// The wavefront moves the projection of the layers above the first from one large GEMM into
// the recurrence: every column block then also reads x_t, i.e. ceil(H / 8) * B * H elements
// more per super-step through L2.  Above this many bytes that costs more than the barriers it
// saves (bench/NOTES.md, P4: ~8 MiB at ~5.5 TB/s is ~1.5 us, about one barrier plus its
// latency chain), and the layers run one launch each.  RNN_EXT_CUDA_WAVEFRONT_BYTES overrides.
int64_t wavefront_max_bytes() {
  static const int64_t v = [] {
    const char* env = std::getenv("RNN_EXT_CUDA_WAVEFRONT_BYTES");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long n = std::strtoll(env, &end, 10);
      if (*end == '\0' && n >= 0) return static_cast<int64_t>(n);
      TORCH_WARN("rnn_ext: ignoring RNN_EXT_CUDA_WAVEFRONT_BYTES=", env,
                 " (expected a non-negative integer)");
    }
    return static_cast<int64_t>(8) << 20;
  }();
  return v;
}

KernelUsed used_of(int bits) {
  return bits == 0   ? KernelUsed::kNone
         : bits == 1 ? KernelUsed::kStep
         : bits == 2 ? KernelUsed::kPersistent
                     : KernelUsed::kMixed;
}

// Whether the switch lets the persistent kernels run for this call at all: not "step", batch
// within "auto"'s limit, a dtype they have, and a uniform batch (dense, or packed with equal
// lengths).
bool persistent_wanted(const Geometry& g, at::ScalarType st) {
  const auto mode = static_cast<KernelMode>(kernel_mode_state().load());
  if (mode == KernelMode::kStep || g.N == 0 || st == at::kDouble) return false;
  if (mode == KernelMode::kAuto && !auto_prefers_persistent(g.B, g.H)) return false;
  for (int64_t t = 0; t < g.T; ++t) {
    if (g.batch[t] != g.B || g.offset[t] != t * g.B) return false;
  }
  return true;
}

// The cell table of a persistent forward launch from layer l: n == 1, both directions of
// layer l (delay 0, the second reversed); n > 1, layers l .. l+n-1 of a unidirectional stack as
// a wavefront (cell k = layer l+k, delay k, projecting its input from layer l+k-1's output
// when k > 0).  Every cell writes h_n of its layer.
template <typename OutOf>
gpu::PersistentForward forward_cells(const Geometry& g, const std::vector<at::Tensor>& w,
                                     int64_t l, int64_t n, const at::Tensor& h0, at::Tensor& hy,
                                     OutOf&& out_of) {
  const int64_t pc = g.weights_per_cell();
  gpu::PersistentForward a;
  a.T = g.T;
  a.B = g.B;
  a.H = g.H;
  a.relu = g.relu;
  const int64_t cells = n == 1 ? g.D : n;
  a.cells = static_cast<int>(cells);
  for (int64_t k = 0; k < cells; ++k) {
    const int64_t m = n == 1 ? l : l + k;           // layer
    const int64_t d = n == 1 ? k : 0;               // direction
    const int64_t base = (m * g.D + d) * pc;
    const at::Tensor out = out_of(m);
    gpu::PersistentCell& c = a.cell[k];
    if (n > 1 && k > 0) {
      c.w_ih = w[base].const_data_ptr();
      c.b_ih = g.has_biases ? w[base + 2].const_data_ptr() : nullptr;
      c.x = out_of(m - 1).const_data_ptr();
      c.K_in = g.H;
      c.ld_x = g.H;
    }
    c.w_hh = w[base + 1].const_data_ptr();
    c.b_hh = g.has_biases ? w[base + 3].const_data_ptr() : nullptr;
    c.h0 = h0[m * g.D + d].const_data_ptr();
    c.out = advance(out.data_ptr(), d * g.H, out.element_size());
    c.ld = g.D * g.H;
    c.hn = hy[m * g.D + d].data_ptr();
    c.reverse = d == 1;
    c.delay = n == 1 ? 0 : static_cast<int>(k);
  }
  return a;
}

// Runs the forward recurrence from layer l on with the persistent kernel, where feasible:
//   - a unidirectional stack without dropout, where the in-kernel projection's extra L2
//     traffic is small (wavefront_max_bytes): layers l .. l+n-1 in one wavefront launch, n as
//     large as the switch (wavefront_max_state), the cell table and co-residency allow; layer l
//     reads its projection from its output buffer (computed by the caller), layers above
//     project their input inside the kernel;
//   - otherwise layer l alone, both directions in one launch.
// h_n of every layer it ran is written by the kernel.  Returns the number of layers run (0:
// nothing enqueued, the caller runs the step path for layer l).  out_of(m) is layer m's output
// buffer (N, D*H).  *variant |= 1 (FMA) or 2 (tensor cores) for what ran.
template <typename OutOf>
int64_t try_persistent_forward(const Geometry& g, gpu::DType dt, const std::vector<at::Tensor>& w,
                               int64_t l, const at::Tensor& h0, at::Tensor& hy, bool use_dropout,
                               OutOf&& out_of, const gpu::PersistentPrefs& prefs, int* variant,
                               int* row_groups, cudaStream_t stream) {
  int64_t n = 1;
  const int64_t extra_bytes =  // L2 traffic of the in-kernel projection per super-step
      (g.H + 7) / 8 * g.B * g.H * static_cast<int64_t>(gpu::storage_size(dt));
  if (g.D == 1 && !use_dropout && extra_bytes <= wavefront_max_bytes()) {
    n = std::min<int64_t>(g.L - l, wavefront_max_state().load());
    if (n > 1) {
      gpu::PersistentPlan plan;  // co-residency of a projecting cell's variant
      C10_CUDA_CHECK(gpu::persistent_plan(dt, g.H, 1, g.H, false, prefs, &plan));
      const int64_t bpc = (g.H + 7) / 8;
      n = plan.status == gpu::PersistentStatus::kLaunched ||
                  plan.status == gpu::PersistentStatus::kCoResidency
              ? std::max<int64_t>(1, std::min<int64_t>(n, plan.max_coresident / bpc))
              : 1;
    }
  }
  for (;;) {
    gpu::PersistentForward a = forward_cells(g, w, l, n, h0, hy, out_of);
    a.prefs = prefs;
    int groups = 1;
    a.used_row_groups = &groups;
    gpu::PersistentStatus status = gpu::PersistentStatus::kUnsupportedDType;
    bool mma = false;
    C10_CUDA_CHECK(gpu::persistent_forward(dt, a, stream, &status, &mma));
    if (status == gpu::PersistentStatus::kLaunched) {
      *variant |= mma ? 2 : 1;
      *row_groups = std::max(*row_groups, groups);
      return n;
    }
    if (n == 1) return 0;
    n = 1;  // e.g. an unaligned weight of an upper layer: layer l on its own
  }
}

// Backpropagation through time of layer l, both directions in one persistent launch, where
// feasible: dZ (this layer's columns) receives dz of every step, dh (D, B, H) fp32 holds d h_n
// on entry and d h0 on exit.  wt[d] = W_hh^T of direction d.  False: nothing enqueued.
// *variant |= 1 (FMA) or 2 (tensor cores) for what ran.
bool try_persistent_backward(const Geometry& g, gpu::DType dt, const std::vector<at::Tensor>& wt,
                             const at::Tensor& layer_out, const at::Tensor& dY, at::Tensor& dZ,
                             at::Tensor& dh, const gpu::PersistentPrefs& prefs, int* variant,
                             int* row_groups, cudaStream_t stream) {
  const int64_t es = layer_out.element_size();
  gpu::PersistentBackward a;
  a.T = g.T;
  a.B = g.B;
  a.H = g.H;
  a.ld = g.D * g.H;
  a.relu = g.relu;
  a.cells = static_cast<int>(g.D);
  a.prefs = prefs;
  for (int64_t d = 0; d < g.D; ++d) {
    gpu::PersistentBackwardCell& c = a.cell[d];
    c.wt_hh = wt[d].const_data_ptr();
    c.h = advance(layer_out.const_data_ptr(), d * g.H, es);
    c.dy = dY.defined() ? advance(dY.const_data_ptr(), d * g.H, es) : nullptr;
    c.dz = advance(dZ.data_ptr(), d * g.H, es);
    c.dh = dh[d].data_ptr<float>();
    c.reverse = d == 1;
  }
  int groups = 1;
  a.used_row_groups = &groups;
  gpu::PersistentStatus status = gpu::PersistentStatus::kUnsupportedDType;
  bool mma = false;
  C10_CUDA_CHECK(gpu::persistent_backward(dt, a, stream, &status, &mma));
  if (status != gpu::PersistentStatus::kLaunched) return false;
  *variant |= mma ? 2 : 1;
  *row_groups = std::max(*row_groups, groups);
  return true;
}

}  // namespace

std::string set_cuda_kernel_mode(const std::string& name) {
  KernelMode m;
  TORCH_CHECK(parse_kernel_mode(name, &m), "rnn_ext.set_cuda_kernel: unknown kernel '", name,
              "'; expected one of 'auto', 'step', 'persistent', 'persistent_fma'");
  const int prev = kernel_mode_state().exchange(static_cast<int>(m));
  return kernel_mode_name(static_cast<KernelMode>(prev));
}

namespace {
std::string used_name(int used) {
  switch (static_cast<KernelUsed>(used)) {
    case KernelUsed::kStep:
      return "step";
    case KernelUsed::kPersistent:
      return "persistent";
    case KernelUsed::kMixed:
      return "mixed";
    case KernelUsed::kNone:
      break;
  }
  return "none";
}
}  // namespace

// (The arguments of these are validated by their callers in csrc/ops.cpp.)
std::string last_cuda_kernel_used(bool backward) {
  return used_name(backward ? last_backward_kernel_used.load() : last_kernel_used.load());
}

int64_t set_cuda_wavefront_max(int64_t layers) {
  return wavefront_max_state().exchange(static_cast<int>(layers));
}

int64_t last_cuda_wavefront_layers() { return last_wavefront_layers.load(); }

int64_t last_cuda_row_groups(bool backward) { return last_row_groups[backward ? 1 : 0].load(); }

// RNN_EXT_CUDA_ROW_SPLIT's value, set (clamped to 1 .. kMaxRowSplit); returns the previous one.
// No op: the emulated glue's tests set it (tests/simt/glue_module.cpp).
int64_t set_cuda_row_split_max(int64_t groups) {
  const int64_t g = std::min<int64_t>(std::max<int64_t>(groups, 1), kMaxRowSplit);
  return row_split_state().exchange(static_cast<int>(g));
}

std::string last_cuda_persistent_variant(bool backward) {
  const int v = last_variant[backward ? 1 : 0].load();
  return v == 0 ? "none" : v == 1 ? "fma" : v == 2 ? "mma" : "mixed";
}

ForwardResult rnn_forward_cuda(const at::Tensor& input, const at::Tensor& hx,
                               at::TensorList weights,
                               const std::optional<at::Tensor>& batch_sizes, bool has_biases,
                               int64_t num_layers, bool bidirectional, bool relu,
                               double dropout, bool train, bool need_grad) {
  // The ATen calls below must not be autocast: this op decides its own precision.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Geometry g =
      geometry(input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu);
  check_dropout(dropout, train, num_layers);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const gpu::DType dt = kernel_dtype(input.scalar_type());
  const int64_t es = input.element_size();
  const int64_t H = g.H, DH = g.D * g.H, pc = g.weights_per_cell();
  const auto opts = input.options();
  const bool use_dropout = train && dropout > 0 && g.L > 1;

  const at::Tensor x = input.contiguous().view({g.N, g.I});
  const at::Tensor h0 = hx.contiguous();
  const std::vector<at::Tensor> w = contiguous(weights);
  at::Tensor output = g.packed ? at::empty({g.N, DH}, opts) : at::empty({g.T, g.B, DH}, opts);
  at::Tensor hy = at::empty({g.L * g.D, g.B, g.H}, opts);
  at::Tensor ws = need_grad ? at::empty({g.L - 1, g.N, DH}, opts) : at::empty({0}, opts);
  at::Tensor noise = (need_grad && use_dropout) ? at::empty({g.L - 1, g.N, DH}, opts)
                                                : at::empty({0}, opts);
  // Layer m's output: the module output for the last layer, the saved workspace when backward
  // will need it, else one of two scratch buffers (layers of equal parity share one: in a
  // wavefront, layer m+2 writes row t at super-step t+m+2, after layer m's last use of it at
  // t+m+1 -- layer m+1 reading it -- and the kernel writes h_n itself).
  at::Tensor scratch[2];
  auto out_of = [&](int64_t m) -> at::Tensor {
    if (m == g.L - 1) return output.view({g.N, DH});
    if (need_grad) return ws[m];
    if (!scratch[m % 2].defined()) scratch[m % 2] = at::empty({g.N, DH}, opts);
    return scratch[m % 2];
  };
  const bool persistent_ok = persistent_wanted(g, input.scalar_type());
  const gpu::PersistentPrefs prefs = current_prefs();
  at::Tensor layer_in = x;
  int used = 0;     // bit 0: a step-path recurrence ran, bit 1: a persistent one
  int variant = 0;  // bit 0: the persistent FMA variant ran, bit 1: the tensor-core one
  int row_groups = 0;  // the most row groups (P5) of a persistent launch (0: none ran)
  int64_t deepest = 0;
  for (int64_t l = 0; l < g.L;) {
    at::Tensor layer_out = out_of(l);
    // 1. projection of every step, b_ih folded in (b_hh is added by the recurrence kernels),
    //    into each direction's columns of the layer output (row stride D*H).
    for (int64_t d = 0; d < g.D; ++d) {
      const int64_t base = (l * g.D + d) * pc;
      at::Tensor out_d = layer_out.narrow(1, d * H, H);  // (N, H), row stride D*H
      if (g.has_biases) {
        at::addmm_out(out_d, w[base + 2], layer_in, w[base].t());
      } else {
        at::mm_out(out_d, layer_in, w[base].t());
      }
    }
    // 2. recurrence: persistent (layers l .. l+n-1, or both directions of layer l, h_n
    //    written by the kernel) where selected and feasible, else one fused kernel per step
    //    and direction and a gather of h_n.
    int64_t n = persistent_ok
                    ? try_persistent_forward(g, dt, w, l, h0, hy, use_dropout, out_of, prefs,
                                             &variant, &row_groups, stream)
                    : 0;
    if (n > 0) {
      used |= 2;
      deepest = std::max(deepest, n);
    } else {
      n = 1;
      if (g.N > 0) used |= 1;
      for (int64_t d = 0; d < g.D; ++d) {
        const int64_t base = (l * g.D + d) * pc;
        void* out_p = advance(layer_out.data_ptr(), d * H, es);
        const void* h0_p = h0[l * g.D + d].data_ptr();  // (B, H) contiguous
        const void* whh = w[base + 1].data_ptr();
        const void* bhh = g.has_biases ? w[base + 3].data_ptr() : nullptr;
        for (int64_t i = 0; i < g.T; ++i) {
          const int64_t t = step_at(g, d, i);
          const int64_t rows = g.batch[t];
          if (rows == 0) continue;
          int64_t cont = 0;
          const void* prev = nullptr;
          if (i > 0) {
            // Forward: batch[tp] >= rows, all rows continue.  Reverse: only batch[tp] <= rows
            // rows continue; the others start here from h0.
            const int64_t tp = step_at(g, d, i - 1);
            cont = std::min(rows, g.batch[tp]);
            prev = advance(static_cast<const void*>(out_p), g.offset[tp] * DH, es);
          }
          check_launch(gpu::forward_step(dt, whh, bhh, prev, DH, cont, h0_p, H,
                                         advance(out_p, g.offset[t] * DH, es), DH, rows, H,
                                         relu, stream),
                       "forward step");
        }
        // 3. h_n of this direction.
        gather(dt, final_segments(g, d), out_p, DH, h0_p, H, hy[l * g.D + d].data_ptr(), H, H,
               stream);
      }
    }
    l += n;
    if (l < g.L) {
      layer_in = out_of(l - 1);
      if (use_dropout) {  // n == 1 here: no wavefront with dropout
        at::Tensor nz = dropout_noise(layer_in, dropout);
        if (need_grad) noise[l - 1].copy_(nz);
        layer_in = layer_in * nz;
      }
    }
  }
  if (used != 0) {
    last_kernel_used.store(static_cast<int>(used_of(used)));
    last_wavefront_layers.store(static_cast<int>(deepest));
    last_variant[0].store(variant);
    last_row_groups[0].store(row_groups);
  }
  return {output, hy, ws, noise};
}

namespace {

// The rows each group of batch rows owns in packed (ragged) data, for the per-group weight
// gradients: group k's rows gathered in step order and zero-padded to the longest group's
// count K (group 0's: batch sizes never increase).  idx: (groups * K) row numbers on the
// device; pad: (groups * K, 1) bool, true at the padding, which repeats a row of the group
// itself (never another sample's) and whose dz is zeroed.  Built on the host from the host
// batch sizes and copied to the device once per backward call (a synchronous copy from
// pageable memory: this path is not for CUDA-graph capture).
struct GroupRows {
  int64_t K = 0;
  at::Tensor idx, pad;
};

GroupRows group_rows(const Geometry& g, int64_t groups, const at::Device& device) {
  GroupRows r;
  const int64_t gs = g.B / groups;
  for (int64_t t = 0; t < g.T; ++t) r.K += std::min(gs, g.batch[t]);
  at::Tensor idx = at::empty({groups * r.K}, at::TensorOptions().dtype(at::kLong));
  at::Tensor pad = at::empty({groups * r.K, 1}, at::TensorOptions().dtype(at::kBool));
  int64_t* ip = idx.data_ptr<int64_t>();
  bool* pp = pad.data_ptr<bool>();
  for (int64_t k = 0; k < groups; ++k) {
    const int64_t r0 = k * gs, r1 = r0 + gs;
    int64_t q = k * r.K;
    for (int64_t t = 0; t < g.T; ++t) {
      for (int64_t row = r0; row < std::min(r1, g.batch[t]); ++row, ++q) {
        ip[q] = g.offset[t] + row;
        pp[q] = false;
      }
    }
    for (; q < (k + 1) * r.K; ++q) {
      ip[q] = r0;  // step 0 holds every row of the batch: the group's own first row
      pp[q] = true;
    }
  }
  r.idx = idx.to(device);
  r.pad = pad.to(device);
  return r;
}

// Per-group weight and bias gradients of one direction of one layer (per-sample gradients
// when every group is one sample): group k sums, over its own rows only, dz^T x (-> gw_ih[k]),
// dz^T h_prev (-> gw_hh[k]) and dz (-> gb[k], when defined).  dz: (N, H) view with row stride
// D*H; x: (N, in) and prev: (N, H) contiguous.  The products are batched GEMMs, cuBLAS through
// torch (at::bmm_out on strided views) -- no hand-written GEMM kernel: cuBLAS' batched GEMM is
// what this shape wants.  Dense input: row t*B + b, so group k's rows form a (T, gs) block of
// the (T, groups, gs) row grid; with one sample per group (gs == 1) the reshapes below are
// views (dz as (B, H, T), x as (B, T, in): nothing copied), with gs > 1 they copy the group's
// rows together.  Packed input: the group's rows gathered and zero-padded (group_rows).
void group_weight_grads_cuda(const Geometry& g, int64_t groups, const GroupRows* rows,
                             const at::Tensor& dz, const at::Tensor& x, const at::Tensor& prev,
                             at::Tensor& gw_ih, at::Tensor& gw_hh, at::Tensor* gb) {
  if (groups == 0) return;  // (an empty batch)
  const int64_t H = g.H, in = x.size(1);
  at::Tensor zg, xg, pg;  // (groups, K, *)
  if (!g.packed) {
    const int64_t gs = g.B / groups;
    auto by_group = [&](const at::Tensor& t, int64_t cols) {
      return t.view({g.T, groups, gs, cols}).transpose(0, 1).reshape({groups, g.T * gs, cols});
    };
    zg = by_group(dz, H);
    xg = by_group(x, in);
    pg = by_group(prev, H);
  } else {
    zg = dz.index_select(0, rows->idx).masked_fill_(rows->pad, 0).view({groups, rows->K, H});
    xg = x.index_select(0, rows->idx).view({groups, rows->K, in});
    pg = prev.index_select(0, rows->idx).view({groups, rows->K, H});
  }
  const at::Tensor zt = zg.transpose(1, 2);  // (groups, H, K)
  at::bmm_out(gw_ih, zt, xg);
  at::bmm_out(gw_hh, zt, pg);
  if (gb != nullptr) at::sum_out(*gb, zg, {1});
}

// rnn_backward_cuda (groups == kSummedGradients: summed weight gradients) and
// rnn_backward_per_sample_cuda (groups checked >= 0: one weight gradient per group of batch
// rows): the same BPTT, only the weight gradients differ.
BackwardResult backward_cuda(const at::Tensor& input, const at::Tensor& hx,
                             at::TensorList weights, const std::optional<at::Tensor>& batch_sizes,
                             const at::Tensor& output, const at::Tensor& workspace,
                             const at::Tensor& noise_in,
                             const std::optional<at::Tensor>& grad_output,
                             const std::optional<at::Tensor>& grad_hy, bool has_biases,
                             int64_t num_layers, bool bidirectional, bool relu,
                             std::array<bool, 3> output_mask, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Geometry g =
      geometry(input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu);
  const int64_t H = g.H, DH = g.D * g.H, pc = g.weights_per_cell();
  check_backward_args(g, hx, output, workspace, noise_in, grad_output, grad_hy);
  if (groups != kSummedGradients) check_groups(g, groups);
  const bool has_go = grad_output.has_value() && grad_output->defined();
  const bool has_ghy = grad_hy.has_value() && grad_hy->defined();
  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto st = input.scalar_type();
  const gpu::DType dt = kernel_dtype(st);
  const int64_t es = input.element_size();
  const auto opts = input.options();
  const bool need_input = output_mask[0], need_hx = output_mask[1], need_w = output_mask[2];

  const at::Tensor x = input.contiguous().view({g.N, g.I});
  const at::Tensor h0 = hx.contiguous();
  const std::vector<at::Tensor> w = contiguous(weights);
  const at::Tensor out_top = output.to(st).contiguous().view({g.N, DH});
  const at::Tensor ws = workspace.to(st).contiguous().view({g.L - 1, g.N, DH});
  const at::Tensor noise =
      noise_in.numel() > 0 ? noise_in.to(st).contiguous().view({g.L - 1, g.N, DH}) : noise_in;
  const at::Tensor ghy = has_ghy ? grad_hy->to(st).contiguous() : at::Tensor();

  at::Tensor grad_hx = need_hx ? at::empty_like(h0) : at::empty({0}, opts);
  std::vector<at::Tensor> grad_w;
  GroupRows rows;  // packed per-group gradients: each group's own rows
  if (need_w) {
    for (const auto& wi : w) {
      if (groups < 0) {
        grad_w.push_back(at::empty_like(wi));
      } else {  // one gradient per group, stacked on a leading dimension
        std::vector<int64_t> sizes(wi.sizes().begin(), wi.sizes().end());
        sizes.insert(sizes.begin(), groups);
        grad_w.push_back(at::empty(sizes, wi.options()));
      }
    }
    if (groups > 0 && g.packed) rows = group_rows(g, groups, input.device());
  }
  // dY: gradient w.r.t. the current layer's output (N, D*H); undefined = zero.
  at::Tensor dY = has_go ? grad_output->to(st).contiguous().view({g.N, DH}) : at::Tensor();
  at::Tensor dZ = at::empty({g.N, DH}, opts);
  // d h per direction, in the accumulation dtype (fp32 for half/bf16)
  at::Tensor dh = at::empty({g.D, g.B, H}, opts.dtype(acc_dtype(st)));
  at::Tensor prev = need_w ? at::empty({g.N, H}, opts) : at::Tensor();
  at::Tensor grad_input;
  const bool persistent_ok = persistent_wanted(g, st);
  const gpu::PersistentPrefs prefs = current_prefs();
  int used = 0;     // bit 0: a step-path BPTT ran, bit 1: a persistent one
  int variant = 0;  // bit 0: the persistent FMA variant ran, bit 1: the tensor-core one
  int row_groups = 0;  // the most row groups (P5) of a persistent launch (0: none ran)

  for (int64_t l = g.L - 1; l >= 0; --l) {
    const at::Tensor layer_out = l == g.L - 1 ? out_top : ws[l];
    at::Tensor layer_in = x;
    if (l > 0) {
      layer_in = ws[l - 1];
      if (noise.numel() > 0) layer_in = layer_in * noise[l - 1];
    }
    std::vector<at::Tensor> wt(g.D);  // W_hh^T per direction: dh = dz W_hh
    for (int64_t d = 0; d < g.D; ++d) wt[d] = w[(l * g.D + d) * pc + 1].t().contiguous();
    if (has_ghy) {
      dh.copy_(ghy.narrow(0, l * g.D, g.D));
    } else {
      dh.zero_();
    }
    // Both directions in one persistent launch where selected and feasible, else one fused
    // kernel per step and direction.
    const bool persistent =
        persistent_ok &&
        try_persistent_backward(g, dt, wt, layer_out, dY, dZ, dh, prefs, &variant, &row_groups,
                                stream);
    used |= persistent ? 2 : (g.N > 0 ? 1 : 0);
    for (int64_t d = 0; d < g.D; ++d) {
      const int64_t base = (l * g.D + d) * pc;
      const void* h_out = advance(layer_out.const_data_ptr(), d * H, es);
      const void* dy = dY.defined() ? advance(dY.const_data_ptr(), d * H, es) : nullptr;
      void* dz = advance(dZ.data_ptr(), d * H, es);
      const void* h0_p = h0[l * g.D + d].const_data_ptr();
      // Processing index i runs T-1 .. 0; the kernel for i does dh = dz_i W_hh and the
      // pointwise part of i-1.  The first call (rows_in = 0) does the pointwise part of T-1.
      for (int64_t i = g.T; i >= 0 && !persistent; --i) {
        const int64_t rows_in = i < g.T ? g.batch[step_at(g, d, i)] : 0;
        const void* dz_in =
            i < g.T ? advance(static_cast<const void*>(dz), g.offset[step_at(g, d, i)] * DH, es)
                    : nullptr;
        int64_t rows_next = 0;
        const void* dy_next = nullptr;
        const void* h_next = nullptr;
        void* dz_next = nullptr;
        if (i > 0) {
          const int64_t tn = step_at(g, d, i - 1);
          const int64_t o = g.offset[tn] * DH;
          rows_next = g.batch[tn];
          dy_next = advance(dy, o, es);
          h_next = advance(h_out, o, es);
          dz_next = advance(dz, o, es);
        }
        if (std::max(rows_in, rows_next) == 0) continue;
        check_launch(gpu::backward_step(dt, wt[d].const_data_ptr(), dz_in, rows_in,
                                        dh[d].data_ptr(), dy_next, h_next, dz_next, rows_next,
                                        DH, H, relu, stream),
                     "backward step");
      }
      if (need_hx) grad_hx[l * g.D + d].copy_(dh[d]);
      if (need_w) {
        // dW_ih = dZ^T X ; dW_hh = dZ^T H_prev ; db = sum over rows of dZ (summed, or per
        // group of batch rows)
        const at::Tensor dZd = dZ.narrow(1, d * H, H);
        gather(dt, prev_segments(g, d), h_out, DH, h0_p, H, prev.data_ptr(), H, H, stream);
        if (groups >= 0) {
          group_weight_grads_cuda(g, groups, &rows, dZd, layer_in, prev, grad_w[base],
                                  grad_w[base + 1], g.has_biases ? &grad_w[base + 2] : nullptr);
        } else {
          at::mm_out(grad_w[base], dZd.t(), layer_in);
          at::mm_out(grad_w[base + 1], dZd.t(), prev);
          if (g.has_biases) at::sum_out(grad_w[base + 2], dZd, {0});
        }
        if (g.has_biases) grad_w[base + 3].copy_(grad_w[base + 2]);
      }
    }
    if (l == 0 && !need_input) break;
    // gradient w.r.t. this layer's input: sum over directions of dZ_d W_ih_d, one GEMM
    at::Tensor dX = at::mm(dZ, stacked_w_ih(g, w, l));
    if (l > 0) {
      if (noise.numel() > 0) dX.mul_(noise[l - 1]);
      dY = dX;
    } else {
      grad_input = dX.view(input.sizes());
    }
  }
  if (used != 0) {
    last_backward_kernel_used.store(static_cast<int>(used_of(used)));
    last_variant[1].store(variant);
    last_row_groups[1].store(row_groups);
  }
  if (!grad_input.defined()) grad_input = at::empty({0}, opts);
  return {grad_input, grad_hx, grad_w};
}

}  // namespace

BackwardResult rnn_backward_cuda(const at::Tensor& input, const at::Tensor& hx,
                                 at::TensorList weights,
                                 const std::optional<at::Tensor>& batch_sizes,
                                 const at::Tensor& output, const at::Tensor& workspace,
                                 const at::Tensor& noise,
                                 const std::optional<at::Tensor>& grad_output,
                                 const std::optional<at::Tensor>& grad_hy, bool has_biases,
                                 int64_t num_layers, bool bidirectional, bool relu,
                                 std::array<bool, 3> output_mask) {
  return backward_cuda(input, hx, weights, batch_sizes, output, workspace, noise, grad_output,
                       grad_hy, has_biases, num_layers, bidirectional, relu, output_mask,
                       kSummedGradients);
}

PerSampleResult rnn_backward_per_sample_cuda(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& output,
    const at::Tensor& workspace, const at::Tensor& noise,
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_hy,
    bool has_biases, int64_t num_layers, bool bidirectional, bool relu,
    std::array<bool, 3> output_mask, int64_t groups, double scale) {
  check_per_sample_scale(scale);
  auto [gi, ghx, gw] =
      backward_cuda(input, hx, weights, batch_sizes, output, workspace, noise, grad_output,
                    grad_hy, has_biases, num_layers, bidirectional, relu,
                    {output_mask[0], output_mask[1], true}, groups);
  // the summed gradients first (sums over the groups, unscaled), then the per-group ones
  // scaled in place
  std::vector<at::Tensor> summed;
  if (output_mask[2]) {
    for (const auto& t : gw) summed.push_back(t.sum(0));
  }
  if (scale != 1.0) {
    for (auto& t : gw) t.mul_(scale);
  }
  return {gi, ghx, gw, summed};
}

#ifndef RNN_EXT_SIMT_EMULATION  // (diagnostics that need a real device)
namespace {

// Diagnostics of the persistent kernels for tests and bench/NOTES.md (CUDA builds only):
//   _cuda_persistent_plan(dtype, H, cells, K_in=0, backward=False, tensor_cores=True,
//                         allow_tf32=False)
//       -> [blocks, threads, smem_bytes, max_coresident, registers, status (0 = feasible),
//           mma (1 = the tensor-core variant)]  on the current device (cells: directions, or
//          layers of a wavefront; K_in: the widest in-kernel projection, H for a wavefront of
//          more than one layer)
//   _cuda_grid_barrier_us(blocks, steps) -> microseconds per grid.sync() of `blocks` blocks
//                                           (synchronises; not for use inside a model)
std::vector<int64_t> cuda_persistent_plan(at::ScalarType dtype, int64_t H, int64_t cells,
                                          int64_t K_in, bool backward, bool tensor_cores,
                                          bool allow_tf32) {
  TORCH_CHECK(cells >= 1 && cells <= (backward ? 2 : gpu::kMaxPersistentCells),
              "rnn_ext: cells must be in 1 .. ", backward ? 2 : gpu::kMaxPersistentCells);
  TORCH_CHECK(H > 0 && K_in >= 0, "rnn_ext: H must be positive and K_in non-negative");
  gpu::PersistentPrefs prefs;
  prefs.tensor_cores = tensor_cores;
  prefs.allow_tf32 = allow_tf32;
  const gpu::PersistentPrefs current = current_prefs();  // (the kernel whose registers count)
  prefs.narrow_a_loads = current.narrow_a_loads;
  prefs.grouped_a_loads = current.grouped_a_loads;
  gpu::PersistentPlan plan;
  C10_CUDA_CHECK(gpu::persistent_plan(kernel_dtype(dtype), H, static_cast<int>(cells), K_in,
                                      backward, prefs, &plan));
  return {plan.blocks, plan.threads, plan.smem_bytes, plan.max_coresident, plan.registers,
          static_cast<int64_t>(plan.status), plan.mma ? 1 : 0};
}

double cuda_grid_barrier_us(int64_t blocks, int64_t steps) {
  TORCH_CHECK(blocks > 0 && blocks <= 0x7fffffff && steps > 0,
              "rnn_ext: blocks and steps must be positive");
  double us = 0;
  C10_CUDA_CHECK(gpu::grid_barrier_benchmark(static_cast<int>(blocks), steps,
                                             c10::cuda::getCurrentCUDAStream(), &us));
  return us;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnn_ext, m) {
  m.def("_cuda_persistent_plan(ScalarType dtype, int H, int cells, int K_in=0, "
        "bool backward=False, bool tensor_cores=True, bool allow_tf32=False) -> int[]",
        &cuda_persistent_plan);
  m.def("_cuda_grid_barrier_us(int blocks, int steps) -> float", &cuda_grid_barrier_us);
}

#endif

}  // namespace rnn_ext
