// Torch-facing declarations shared by the op registration (csrc/ops.cpp), the CPU kernels
// (csrc/cpu/) and the CUDA glue (csrc/cuda_glue.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace rnn_ext {

// Everything the kernels need to know about one call, checked once (see geometry()).
//
// Time steps are laid out like a PackedSequence: step t owns rows
// [offset[t], offset[t] + batch[t]) of the (N, features) data, and batch[] never increases.
// A dense (T, B, I) input is the special case batch[t] == B for every t.
struct Geometry {
  int64_t T = 0;            // time steps
  int64_t B = 0;            // batch (rows of hx)
  int64_t N = 0;            // total rows = sum(batch)
  int64_t I = 0;            // input features of layer 0
  int64_t H = 0;            // hidden size
  int64_t L = 0;            // layers
  int64_t D = 1;            // directions
  bool packed = false;
  bool has_biases = true;
  bool relu = false;
  std::vector<int64_t> batch;   // rows active at step t
  std::vector<int64_t> offset;  // first row of step t

  int64_t weights_per_cell() const { return has_biases ? 4 : 2; }
  int64_t layer_input_size(int64_t layer) const { return layer == 0 ? I : D * H; }
};

// Validates the arguments of rnn_forward / rnn_backward (shapes, dtypes, devices, batch sizes)
// and returns the geometry.  Raises torch's messages where torch.nn.RNN has one.
Geometry geometry(const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                  const std::optional<at::Tensor>& batch_sizes, bool has_biases,
                  int64_t num_layers, bool bidirectional, bool relu);

// The checks of rnn_backward's extra arguments against the forward's geometry.
void check_backward_args(const Geometry& g, const at::Tensor& hx, const at::Tensor& output,
                         const at::Tensor& workspace, const at::Tensor& noise,
                         const std::optional<at::Tensor>& grad_output,
                         const std::optional<at::Tensor>& grad_hy);

// aten's check of the dropout probability, made where aten's RNN applies dropout.
void check_dropout(double dropout, bool train, int64_t num_layers);

// Draws the dropout noise that at::dropout would draw for `like` (scaled by 1/(1-p), zero
// where dropped), from the default generator of like's device.
at::Tensor dropout_noise(const at::Tensor& like, double p);

// Returns: output, h_n, workspace (pre-dropout outputs of layers 0..L-2, for backward; empty
// unless need_grad), dropout noise (one per layer boundary; empty unless need_grad and dropout).
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// Returns: grad_input (empty unless asked), grad_hx (empty unless asked), grad of every weight
// (empty list unless asked).
using BackwardResult = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

ForwardResult rnn_forward_cpu(const at::Tensor& input, const at::Tensor& hx,
                              at::TensorList weights,
                              const std::optional<at::Tensor>& batch_sizes, bool has_biases,
                              int64_t num_layers, bool bidirectional, bool relu,
                              double dropout, bool train, bool need_grad);

BackwardResult rnn_backward_cpu(const at::Tensor& input, const at::Tensor& hx,
                                at::TensorList weights,
                                const std::optional<at::Tensor>& batch_sizes,
                                const at::Tensor& output, const at::Tensor& workspace,
                                const at::Tensor& noise,
                                const std::optional<at::Tensor>& grad_output,
                                const std::optional<at::Tensor>& grad_hy, bool has_biases,
                                int64_t num_layers, bool bidirectional, bool relu,
                                std::array<bool, 3> output_mask);

// The backward with one weight gradient per group of batch rows (per-sample gradients when
// groups == B): grad_weights[i] is (groups, *weights[i].shape), group k the sum over the batch
// rows [k*B/groups, (k+1)*B/groups) and all their steps, times `scale`.  output_mask = [input,
// hx, summed]: summed asks for the ordinary (summed, unscaled) weight gradients as well, formed
// from the per-group ones while they are in cache (else an empty list).
using PerSampleResult =
    std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

PerSampleResult rnn_backward_per_sample_cpu(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& output,
    const at::Tensor& workspace, const at::Tensor& noise,
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_hy,
    bool has_biases, int64_t num_layers, bool bidirectional, bool relu,
    std::array<bool, 3> output_mask, int64_t groups, double scale);

// groups must be >= 0 and divide the batch (0 only for an empty batch).
void check_groups(const Geometry& g, int64_t groups);
// scale must be finite and nonzero (the summed gradients are divided by it).
void check_per_sample_scale(double scale);
// Forward-mode AD: the tangents of output and h_n (same shapes) for the tangents of input, hx
// and each weight (undefined / nullopt: zero), from a forward run with need_grad (its output,
// workspace and noise).  CPU only (see rnn_ext/ops.py for the other devices).
using JvpResult = std::tuple<at::Tensor, at::Tensor>;

// The checks of rnn_jvp's tangents: each has its primal's shape, and one per weight.
void check_jvp_args(const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                    const std::optional<at::Tensor>& input_t,
                    const std::optional<at::Tensor>& hx_t,
                    const c10::List<std::optional<at::Tensor>>& weights_t);

JvpResult rnn_jvp_cpu(const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                      const std::optional<at::Tensor>& batch_sizes, const at::Tensor& output,
                      const at::Tensor& workspace, const at::Tensor& noise,
                      const std::optional<at::Tensor>& input_t,
                      const std::optional<at::Tensor>& hx_t,
                      const c10::List<std::optional<at::Tensor>>& weights_t, bool has_biases,
                      int64_t num_layers, bool bidirectional, bool relu);

// The backends' internal `groups` value for the summed weight gradients of rnn_backward (never
// accepted from rnn_backward_per_sample's caller, whose groups are always checked).
constexpr int64_t kSummedGradients = INT64_MIN;

#ifdef RNN_EXT_WITH_CUDA
ForwardResult rnn_forward_cuda(const at::Tensor& input, const at::Tensor& hx,
                               at::TensorList weights,
                               const std::optional<at::Tensor>& batch_sizes, bool has_biases,
                               int64_t num_layers, bool bidirectional, bool relu,
                               double dropout, bool train, bool need_grad);

BackwardResult rnn_backward_cuda(const at::Tensor& input, const at::Tensor& hx,
                                 at::TensorList weights,
                                 const std::optional<at::Tensor>& batch_sizes,
                                 const at::Tensor& output, const at::Tensor& workspace,
                                 const at::Tensor& noise,
                                 const std::optional<at::Tensor>& grad_output,
                                 const std::optional<at::Tensor>& grad_hy, bool has_biases,
                                 int64_t num_layers, bool bidirectional, bool relu,
                                 std::array<bool, 3> output_mask);

// rnn_backward_per_sample_cpu's counterpart: the same BPTT as rnn_backward_cuda, then each
// group's weight and bias gradients as batched GEMMs over its own rows (csrc/cuda_glue.cpp).
PerSampleResult rnn_backward_per_sample_cuda(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& output,
    const at::Tensor& workspace, const at::Tensor& noise,
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_hy,
    bool has_biases, int64_t num_layers, bool bidirectional, bool relu,
    std::array<bool, 3> output_mask, int64_t groups, double scale);
#endif

}  // namespace rnn_ext
