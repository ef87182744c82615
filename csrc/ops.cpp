// Registers the extension's operators: schemas in TORCH_LIBRARY, one TORCH_LIBRARY_IMPL per
// backend.  The fake (meta) kernels and the autograd that torch.compile/export trace are
// registered from Python (rnn_ext/ops.py); eager calls get their autograd node from
// csrc/autograd.cpp.
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cpu/activation.h"
#include "cpu/blas.h"
#include "cpu/recycle.h"
#include "cpu/step_kernel.h"
#include "cpu/wgrad_kernel.h"
#include "rnn_ext.h"
#ifdef RNN_EXT_WITH_CUDA
#include "cuda/rnn_persistent.h"
#endif

// (The Python module rnn_ext._C, whose import loads this library, is csrc/python.cpp.)

namespace rnn_ext {

// The most layers one persistent CUDA forward launch runs as a wavefront.
constexpr int64_t kMaxWavefrontLayers = 8;

#ifdef RNN_EXT_WITH_CUDA
static_assert(kMaxWavefrontLayers == gpu::kMaxPersistentCells, "one limit");
// The CUDA recurrence kernel switches (csrc/cuda_glue.cpp); arguments validated here.
std::string set_cuda_kernel_mode(const std::string& name);
std::string last_cuda_kernel_used(bool backward);
int64_t set_cuda_wavefront_max(int64_t layers);
int64_t last_cuda_wavefront_layers();
std::string last_cuda_persistent_variant(bool backward);
#endif

namespace {
// set_cuda_kernel(name) -> the previous setting; cuda_kernel_used(phase) -> what the last CUDA
// forward's / backward's recurrence ran ("step", "persistent", "mixed", or "none" before any /
// without CUDA); set_cuda_wavefront(layers) -> the previous most layers per persistent forward
// launch; cuda_wavefront_layers() -> the deepest wavefront of the last CUDA forward (0: none
// persistent); cuda_persistent_variant(phase) -> which persistent variant the last CUDA
// forward / backward ran ("fma", "mma" (tensor cores), "mixed", "none").  A CPU-only build
// validates and keeps the settings, and reports "none" / 0.

// "forward" -> false, "backward" -> true; anything else raises.
bool is_backward_phase(const char* fn, const std::string& phase) {
  TORCH_CHECK(phase == "forward" || phase == "backward", "rnn_ext.", fn,
              ": phase must be 'forward' or 'backward', got '", phase, "'");
  return phase == "backward";
}
void check_wavefront_layers(int64_t layers) {
  TORCH_CHECK(layers >= 1 && layers <= kMaxWavefrontLayers,
              "rnn_ext.set_cuda_wavefront: layers must be in 1 .. ", kMaxWavefrontLayers, ", got ",
              layers);
}

#ifdef RNN_EXT_WITH_CUDA
std::string set_cuda_kernel(const std::string& name) { return set_cuda_kernel_mode(name); }
std::string cuda_kernel_used(const std::string& phase) {
  return last_cuda_kernel_used(is_backward_phase("cuda_kernel_used", phase));
}
int64_t set_cuda_wavefront(int64_t layers) {
  check_wavefront_layers(layers);
  return set_cuda_wavefront_max(layers);
}
int64_t cuda_wavefront_layers() { return last_cuda_wavefront_layers(); }
std::string cuda_persistent_variant(const std::string& phase) {
  return last_cuda_persistent_variant(is_backward_phase("cuda_persistent_variant", phase));
}
#else
std::string set_cuda_kernel(const std::string& name) {
  static std::string current = [] {  // as the CUDA build: RNN_EXT_CUDA_KERNEL, else "auto"
    const char* env = std::getenv("RNN_EXT_CUDA_KERNEL");
    const std::string v = env != nullptr ? env : "";
    return v == "step" || v == "persistent" || v == "persistent_fma" ? v : std::string("auto");
  }();
  TORCH_CHECK(name == "auto" || name == "step" || name == "persistent" || name == "persistent_fma",
              "rnn_ext.set_cuda_kernel: unknown kernel '", name,
              "'; expected one of 'auto', 'step', 'persistent', 'persistent_fma'");
  std::string prev = current;
  current = name;
  return prev;
}
std::string cuda_kernel_used(const std::string& phase) {
  is_backward_phase("cuda_kernel_used", phase);
  return "none";
}
int64_t set_cuda_wavefront(int64_t layers) {
  static int64_t current = [] {  // as the CUDA build: RNN_EXT_CUDA_WAVEFRONT, else 8
    const char* env = std::getenv("RNN_EXT_CUDA_WAVEFRONT");
    const int64_t v = env != nullptr ? std::atoll(env) : 0;
    return v >= 1 && v <= kMaxWavefrontLayers ? v : kMaxWavefrontLayers;
  }();
  check_wavefront_layers(layers);
  const int64_t prev = current;
  current = layers;
  return prev;
}
int64_t cuda_wavefront_layers() { return 0; }
std::string cuda_persistent_variant(const std::string& phase) {
  is_backward_phase("cuda_persistent_variant", phase);
  return "none";
}
#endif
bool cpu_direct_blas() { return cpu::direct_blas_available(); }
int64_t empty_cpu_cache() { return cpu::release_recycled(); }
std::string cpu_step_kernel_isa(int64_t K) { return cpu::step_kernel_isa(K); }
int64_t cpu_cache_idle_bytes() { return cpu::recycled_idle_bytes(); }
// The CPU nonlinearity kernels on their own, for the kernel tests and benchmarks.
at::Tensor cpu_activation(const at::Tensor& x, bool relu) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "rnn_ext::_cpu_activation takes a float32 or float64 CPU tensor");
  at::Tensor y = x.contiguous().clone();
  const int64_t n = y.numel();
  if (y.scalar_type() == at::kFloat) {
    relu ? cpu::relu_inplace(y.data_ptr<float>(), 1, n, n) : cpu::tanh_inplace(y.data_ptr<float>(), 1, n, n);
  } else {
    relu ? cpu::relu_inplace(y.data_ptr<double>(), 1, n, n) : cpu::tanh_inplace(y.data_ptr<double>(), 1, n, n);
  }
  return y;
}
// How the float32 backward forms an (M x N) weight gradient: "avx512" / "avx2" (the
// outer-product kernel, csrc/cpu/wgrad_kernel.h) or "blas".
std::string cpu_weight_product(int64_t M, int64_t N) {
  if (!cpu::use_outer_sum(M, N)) return "blas";
  return cpu::avx512_enabled() ? "avx512" : "avx2";
}
// The outer-product kernel on its own (a^T b for a (K, M), b (K, N), float32, rows at any
// stride), for the kernel tests and benchmarks: on torch's threads or the calling one.
at::Tensor cpu_outer_product(const at::Tensor& a, const at::Tensor& b, bool threaded) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == at::kFloat &&
                  b.scalar_type() == at::kFloat && a.dim() == 2 && b.dim() == 2 &&
                  a.size(0) == b.size(0) && (a.stride(1) == 1 || a.size(1) <= 1) &&
                  (b.stride(1) == 1 || b.size(1) <= 1),
              "rnn_ext::_cpu_outer_product takes float32 CPU matrices (K, M) and (K, N) with "
              "unit column stride");
  // (without AVX2 and FMA: the kernel's plain loops, which give the same results)
  at::Tensor c = at::empty({a.size(1), b.size(1)}, a.options());
  const cpu::RowSpan rows{a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(), b.stride(0),
                          a.size(0)};
  cpu::outer_product(&rows, 1, a.size(1), b.size(1), c.data_ptr<float>(), b.size(1), threaded);
  return c;
}
bool built_with_cuda() {
#ifdef RNN_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(rnn_ext, m) {
  // The whole stack (all layers, both directions) in one call.  `input` is (T, B, I), or the
  // (N, I) data of a PackedSequence with its `batch_sizes`; `hx` is (L*D, B, H); `weights` are
  // torch.nn.RNN's _flat_weights.  Returns output, h_n, the workspace backward needs (empty
  // unless need_grad) and the dropout noise it used (empty unless need_grad and dropout).
  m.def(
      "rnn_forward(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes, "
      "bool has_biases, int num_layers, bool bidirectional, bool relu, float dropout, "
      "bool train, bool need_grad) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  // Backpropagation through time.  output_mask = [input, hx, weights] says which gradients to
  // form; the others come back empty.
  m.def(
      "rnn_backward(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes, "
      "Tensor output, Tensor workspace, Tensor noise, Tensor? grad_output, Tensor? grad_hy, "
      "bool has_biases, int num_layers, bool bidirectional, bool relu, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor[])");
  // rnn_backward with one weight gradient per group of batch rows: grad_weights[i] is
  // (groups, *weights[i].shape), the sum over the rows [k*B/groups, (k+1)*B/groups) and all
  // their steps, times `scale` (groups == B: per-sample gradients, for DP training; scale: the
  // batch size Opacus multiplies a mean loss's per-sample gradients by).  output_mask =
  // [input, hx, summed]; summed_weights: the usual summed, unscaled weight gradients when
  // asked (formed from the per-group ones), else empty.  CPU and CUDA (the CUDA one so far
  // run only under the SIMT emulation).
  m.def(
      "rnn_backward_per_sample(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes, "
      "Tensor output, Tensor workspace, Tensor noise, Tensor? grad_output, Tensor? grad_hy, "
      "bool has_biases, int num_layers, bool bidirectional, bool relu, bool[3] output_mask, "
      "int groups, float scale=1.0) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor[] grad_weights, Tensor[] summed_weights)");
  // Forward-mode AD: the tangents of (output, h_n) for the tangents of input, hx and each
  // weight (None: zero), from a forward run with need_grad (its output, workspace and noise).
  m.def(
      "rnn_jvp(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes, Tensor output, "
      "Tensor workspace, Tensor noise, Tensor? input_t, Tensor? hx_t, Tensor?[] weights_t, "
      "bool has_biases, int num_layers, bool bidirectional, bool relu) -> (Tensor, Tensor)");
  m.def("cpu_direct_blas() -> bool", &cpu_direct_blas);
  // The CPU kernels' recycled buffers (csrc/cpu/recycle.cpp): free the idle ones (returns the
  // bytes freed), and how many bytes are idle.
  m.def("empty_cpu_cache() -> int", &empty_cpu_cache);
  // The instruction set of the float32 CPU step kernel for a step with this K (= H).
  m.def("_cpu_step_kernel_isa(int K) -> str", &cpu_step_kernel_isa);
  // How the float32 backward forms an (M x N) weight gradient, and that kernel on its own.
  m.def("_cpu_weight_product(int M, int N) -> str", &cpu_weight_product);
  m.def("_cpu_outer_product(Tensor a, Tensor b, bool threaded) -> Tensor", &cpu_outer_product);
  m.def("cpu_cache_idle_bytes() -> int", &cpu_cache_idle_bytes);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("_cpu_activation(Tensor x, bool relu) -> Tensor", &cpu_activation);
  m.def("set_cuda_kernel(str name) -> str", &set_cuda_kernel);
  m.def("cuda_kernel_used(str phase=\"forward\") -> str", &cuda_kernel_used);
  m.def("set_cuda_wavefront(int layers) -> int", &set_cuda_wavefront);
  m.def("cuda_wavefront_layers() -> int", &cuda_wavefront_layers);
  m.def("cuda_persistent_variant(str phase=\"forward\") -> str", &cuda_persistent_variant);
}

TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) {
  m.impl("rnn_forward", &rnn_forward_cpu);
  m.impl("rnn_backward", &rnn_backward_cpu);
  m.impl("rnn_backward_per_sample", &rnn_backward_per_sample_cpu);
  m.impl("rnn_jvp", &rnn_jvp_cpu);
}

#ifdef RNN_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(rnn_ext, CUDA, m) {
  m.impl("rnn_forward", &rnn_forward_cuda);
  m.impl("rnn_backward", &rnn_backward_cuda);
  m.impl("rnn_backward_per_sample", &rnn_backward_per_sample_cuda);
}
#endif

}  // namespace rnn_ext
