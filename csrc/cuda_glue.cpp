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
#include <c10/cuda/CUDAStream.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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
// Which recurrence kernel the forward runs (issue 5): "step" (one fused kernel per step, the
// default until the persistent kernel is verified on a GPU), "persistent" (one cooperative
// launch per layer where feasible, else the step path), "auto" (persistent where feasible and
// B <= kAutoMaxBatch).  RNN_EXT_CUDA_KERNEL sets the initial value.
enum class KernelMode : int { kStep = 0, kAuto = 1, kPersistent = 2 };
enum class KernelUsed : int { kNone = 0, kStep = 1, kPersistent = 2, kMixed = 3 };
constexpr int64_t kAutoMaxBatch = 128;

bool parse_kernel_mode(const std::string& name, KernelMode* mode) {
  if (name == "step") {
    *mode = KernelMode::kStep;
  } else if (name == "auto") {
    *mode = KernelMode::kAuto;
  } else if (name == "persistent") {
    *mode = KernelMode::kPersistent;
  } else {
    return false;
  }
  return true;
}

const char* kernel_mode_name(KernelMode m) {
  return m == KernelMode::kAuto ? "auto" : m == KernelMode::kPersistent ? "persistent" : "step";
}

std::atomic<int>& kernel_mode_state() {
  static std::atomic<int> mode{[] {
    KernelMode m = KernelMode::kStep;
    const char* env = std::getenv("RNN_EXT_CUDA_KERNEL");
    if (env != nullptr && *env != '\0' && !parse_kernel_mode(env, &m)) {
      TORCH_WARN("rnn_ext: ignoring RNN_EXT_CUDA_KERNEL=", env,
                 " (expected auto, step or persistent); using step");
      m = KernelMode::kStep;
    }
    return static_cast<int>(m);
  }()};
  return mode;
}

std::atomic<int> last_kernel_used{static_cast<int>(KernelUsed::kNone)};

// Runs the recurrence of both directions of one layer with the persistent kernel when the
// switch asks for it and it is feasible; false (nothing enqueued) otherwise.  The layer output
// must already hold the projections.  Uniform batch only (dense, or packed with equal lengths).
bool try_persistent_forward(const Geometry& g, gpu::DType dt, const std::vector<at::Tensor>& w,
                            int64_t l, const at::Tensor& h0, at::Tensor& layer_out,
                            cudaStream_t stream) {
  const auto mode = static_cast<KernelMode>(kernel_mode_state().load());
  if (mode == KernelMode::kStep) return false;
  if (mode == KernelMode::kAuto && g.B > kAutoMaxBatch) return false;
  for (int64_t t = 0; t < g.T; ++t) {
    if (g.batch[t] != g.B || g.offset[t] != t * g.B) return false;
  }
  const int64_t pc = g.weights_per_cell(), es = layer_out.element_size();
  gpu::PersistentForward a;
  a.T = g.T;
  a.B = g.B;
  a.H = g.H;
  a.ld = g.D * g.H;
  a.D = static_cast<int>(g.D);
  a.relu = g.relu;
  for (int64_t d = 0; d < g.D; ++d) {
    const int64_t base = (l * g.D + d) * pc;
    a.dir[d].w_hh = w[base + 1].const_data_ptr();
    a.dir[d].b_hh = g.has_biases ? w[base + 3].const_data_ptr() : nullptr;
    a.dir[d].h0 = h0[l * g.D + d].const_data_ptr();
    a.dir[d].out = advance(layer_out.data_ptr(), d * g.H, es);
  }
  gpu::PersistentStatus status = gpu::PersistentStatus::kUnsupportedDType;
  C10_CUDA_CHECK(gpu::persistent_forward(dt, a, stream, &status));
  return status == gpu::PersistentStatus::kLaunched;
}

}  // namespace

std::string set_cuda_kernel_mode(const std::string& name) {
  KernelMode m;
  TORCH_CHECK(parse_kernel_mode(name, &m), "rnn_ext.set_cuda_kernel: unknown kernel '", name,
              "'; expected one of 'auto', 'step', 'persistent'");
  const int prev = kernel_mode_state().exchange(static_cast<int>(m));
  return kernel_mode_name(static_cast<KernelMode>(prev));
}

std::string last_cuda_kernel_used() {
  switch (static_cast<KernelUsed>(last_kernel_used.load())) {
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
  at::Tensor scratch[2];  // layer outputs when nothing is saved
  at::Tensor layer_in = x;
  int used = 0;  // bit 0: a step-path recurrence ran, bit 1: a persistent one
  for (int64_t l = 0; l < g.L; ++l) {
    at::Tensor layer_out;
    if (l == g.L - 1) {
      layer_out = output.view({g.N, DH});
    } else if (need_grad) {
      layer_out = ws[l];
    } else {
      if (!scratch[l % 2].defined()) scratch[l % 2] = at::empty({g.N, DH}, opts);
      layer_out = scratch[l % 2];
    }
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
    // 2. recurrence: both directions in one persistent launch where selected and feasible,
    //    else one fused kernel per step and direction.
    const bool persistent =
        g.N > 0 && try_persistent_forward(g, dt, w, l, h0, layer_out, stream);
    if (g.N > 0) used |= persistent ? 2 : 1;
    for (int64_t d = 0; d < g.D; ++d) {
      const int64_t base = (l * g.D + d) * pc;
      void* out_p = advance(layer_out.data_ptr(), d * H, es);
      const void* h0_p = h0[l * g.D + d].data_ptr();  // (B, H) contiguous
      const void* whh = w[base + 1].data_ptr();
      const void* bhh = g.has_biases ? w[base + 3].data_ptr() : nullptr;
      for (int64_t i = 0; i < g.T && !persistent; ++i) {
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
                                       advance(out_p, g.offset[t] * DH, es), DH, rows, H, relu,
                                       stream),
                     "forward step");
      }
      // 3. h_n of this direction.
      gather(dt, final_segments(g, d), out_p, DH, h0_p, H, hy[l * g.D + d].data_ptr(), H, H,
             stream);
    }
    if (l < g.L - 1) {
      layer_in = layer_out;
      if (use_dropout) {
        at::Tensor nz = dropout_noise(layer_in, dropout);
        if (need_grad) noise[l].copy_(nz);
        layer_in = layer_in * nz;
      }
    }
  }
  if (used != 0) {
    last_kernel_used.store(static_cast<int>(used == 1   ? KernelUsed::kStep
                                            : used == 2 ? KernelUsed::kPersistent
                                                        : KernelUsed::kMixed));
  }
  return {output, hy, ws, noise};
}

BackwardResult rnn_backward_cuda(const at::Tensor& input, const at::Tensor& hx,
                                 at::TensorList weights,
                                 const std::optional<at::Tensor>& batch_sizes,
                                 const at::Tensor& output, const at::Tensor& workspace,
                                 const at::Tensor& noise_in,
                                 const std::optional<at::Tensor>& grad_output,
                                 const std::optional<at::Tensor>& grad_hy, bool has_biases,
                                 int64_t num_layers, bool bidirectional, bool relu,
                                 std::array<bool, 3> output_mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Geometry g =
      geometry(input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu);
  const int64_t H = g.H, DH = g.D * g.H, pc = g.weights_per_cell();
  check_backward_args(g, hx, output, workspace, noise_in, grad_output, grad_hy);
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
  if (need_w) {
    for (const auto& wi : w) grad_w.push_back(at::empty_like(wi));
  }
  // dY: gradient w.r.t. the current layer's output (N, D*H); undefined = zero.
  at::Tensor dY = has_go ? grad_output->to(st).contiguous().view({g.N, DH}) : at::Tensor();
  at::Tensor dZ = at::empty({g.N, DH}, opts);
  at::Tensor dh = at::empty({g.B, H}, opts.dtype(acc_dtype(st)));  // fp32 for half/bf16
  at::Tensor prev = need_w ? at::empty({g.N, H}, opts) : at::Tensor();
  at::Tensor grad_input;

  for (int64_t l = g.L - 1; l >= 0; --l) {
    const at::Tensor layer_out = l == g.L - 1 ? out_top : ws[l];
    at::Tensor layer_in = x;
    if (l > 0) {
      layer_in = ws[l - 1];
      if (noise.numel() > 0) layer_in = layer_in * noise[l - 1];
    }
    for (int64_t d = 0; d < g.D; ++d) {
      const int64_t base = (l * g.D + d) * pc;
      const at::Tensor wt_hh = w[base + 1].t().contiguous();  // W_hh^T: dh = dz W_hh
      const void* wt = wt_hh.data_ptr();
      const void* h_out = advance(layer_out.const_data_ptr(), d * H, es);
      const void* dy = dY.defined() ? advance(dY.const_data_ptr(), d * H, es) : nullptr;
      void* dz = advance(dZ.data_ptr(), d * H, es);
      const void* h0_p = h0[l * g.D + d].const_data_ptr();
      if (has_ghy) {
        dh.copy_(ghy[l * g.D + d]);
      } else {
        dh.zero_();
      }
      // Processing index i runs T-1 .. 0; the kernel for i does dh = dz_i W_hh and the
      // pointwise part of i-1.  The first call (rows_in = 0) does the pointwise part of T-1.
      for (int64_t i = g.T; i >= 0; --i) {
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
        check_launch(gpu::backward_step(dt, wt, dz_in, rows_in, dh.data_ptr(), dy_next, h_next,
                                        dz_next, rows_next, DH, H, relu, stream),
                     "backward step");
      }
      if (need_hx) grad_hx[l * g.D + d].copy_(dh);
      if (need_w) {
        // dW_ih = dZ^T X ; dW_hh = dZ^T H_prev ; db = sum over rows of dZ
        const at::Tensor dZd = dZ.narrow(1, d * H, H);
        at::mm_out(grad_w[base], dZd.t(), layer_in);
        gather(dt, prev_segments(g, d), h_out, DH, h0_p, H, prev.data_ptr(), H, H, stream);
        at::mm_out(grad_w[base + 1], dZd.t(), prev);
        if (g.has_biases) {
          at::sum_out(grad_w[base + 2], dZd, {0});
          grad_w[base + 3].copy_(grad_w[base + 2]);
        }
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
  if (!grad_input.defined()) grad_input = at::empty({0}, opts);
  return {grad_input, grad_hx, grad_w};
}

namespace {

// Diagnostics of the persistent kernel for tests and bench/NOTES.md (CUDA builds only):
//   _cuda_persistent_plan(dtype, H, D) -> [blocks, threads, smem_bytes, max_coresident,
//                                          registers, status (0 = feasible)]  on the current device
//   _cuda_grid_barrier_us(blocks, steps) -> microseconds per grid.sync() of `blocks` blocks
//                                           (synchronises; not for use inside a model)
std::vector<int64_t> cuda_persistent_plan(at::ScalarType dtype, int64_t H, int64_t D) {
  TORCH_CHECK(D == 1 || D == 2, "rnn_ext: D must be 1 or 2");
  gpu::PersistentPlan plan;
  C10_CUDA_CHECK(gpu::persistent_forward_plan(kernel_dtype(dtype), H, static_cast<int>(D), &plan));
  return {plan.blocks, plan.threads, plan.smem_bytes, plan.max_coresident, plan.registers,
          static_cast<int64_t>(plan.status)};
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
  m.def("_cuda_persistent_plan(ScalarType dtype, int H, int D) -> int[]", &cuda_persistent_plan);
  m.def("_cuda_grid_barrier_us(int blocks, int steps) -> float", &cuda_grid_barrier_us);
}

}  // namespace rnn_ext
