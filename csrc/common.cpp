// Argument checks and helpers shared by every backend.
#include <cmath>
#include "rnn_ext.h"

#include <limits>
#include <sstream>

namespace rnn_ext {

namespace {

std::string shape_str(at::IntArrayRef s, bool as_tuple) {
  std::ostringstream o;
  o << (as_tuple ? "(" : "[");
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (as_tuple ? ")" : "]");
  return o.str();
}

}  // namespace

Geometry geometry(const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                  const std::optional<at::Tensor>& batch_sizes, bool has_biases,
                  int64_t num_layers, bool bidirectional, bool relu) {
  Geometry g;
  g.packed = batch_sizes.has_value() && batch_sizes->defined();
  g.has_biases = has_biases;
  g.relu = relu;
  g.L = num_layers;
  g.D = bidirectional ? 2 : 1;
  TORCH_CHECK(num_layers > 0, "num_layers must be greater than zero");
  const int64_t per_cell = g.weights_per_cell();
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == g.L * g.D * per_cell, "rnn_ext: expected ",
              g.L * g.D * per_cell, " weight tensors for num_layers=", g.L,
              ", bidirectional=", bidirectional, ", has_biases=", has_biases, ", got ",
              weights.size());

  const int64_t expected_dim = g.packed ? 2 : 3;
  TORCH_CHECK(input.dim() == expected_dim, "input must have ", expected_dim,
              " dimensions, got ", input.dim());

  // Devices, as aten's RNN reports them (check_attributes: the hidden state first).
  TORCH_CHECK(hx.device() == input.device(),
              "Input and hidden tensors are not at the same device, found input tensor at ",
              input.device(), " and hidden tensor at ", hx.device());
  for (const auto& w : weights) {
    TORCH_CHECK(w.device() == input.device(),
                "Input and parameter tensors are not at the same device, found input tensor at ",
                input.device(), " and parameter tensor at ", w.device());
  }

  // aten checks the sequence length next (before any dtype or shape check of its own).
  TORCH_CHECK(g.packed || input.size(0) > 0, "Expected sequence length to be larger than 0 in RNN");

  // Dtypes: one floating dtype for everything (torch's matmul message where it has one).
  const auto wdtype = weights[0].scalar_type();
  const auto it = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      it == at::kFloat || it == at::kDouble || it == at::kHalf || it == at::kBFloat16,
      "rnn_ext: expected a floating-point input (float32, float64, float16 or bfloat16), got ",
      input.scalar_type());
  for (const auto& w : weights) {
    TORCH_CHECK(w.scalar_type() == wdtype, "rnn_ext: all weights must have one dtype, got ",
                wdtype, " and ", w.scalar_type());
  }
  TORCH_CHECK(input.scalar_type() == wdtype, "mat1 and mat2 must have the same dtype, but got ",
              input.scalar_type(), " and ", wdtype);
  TORCH_CHECK(hx.scalar_type() == wdtype, "mat1 and mat2 must have the same dtype, but got ",
              hx.scalar_type(), " and ", wdtype);

  TORCH_CHECK(weights[0].dim() == 2 && weights[1].dim() == 2,
              "rnn_ext: weight_ih and weight_hh must be 2-D, got ", weights[0].dim(), "-D and ",
              weights[1].dim(), "-D");
  g.H = weights[1].size(0);
  g.I = input.size(-1);
  TORCH_CHECK(g.H > 0, "hidden_size must be greater than zero");
  TORCH_CHECK(weights[0].size(1) == g.I, "input.size(-1) must be equal to input_size. Expected ",
              weights[0].size(1), ", got ", g.I);
  TORCH_CHECK(g.I > 0, "input_size must be greater than zero");

  // Time steps.
  if (g.packed) {
    const auto& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "rnn_ext: batch_sizes must be a 1-D int64 CPU tensor, as PackedSequence holds it");
    auto bsc = bs.contiguous();
    const int64_t* p = bsc.data_ptr<int64_t>();
    g.T = bsc.numel();
    int64_t total = 0;
    for (int64_t t = 0; t < g.T; ++t) {
      TORCH_CHECK(p[t] >= 0, "rnn_ext: batch_sizes must be non-negative, got ", p[t]);
      TORCH_CHECK(t == 0 || p[t] <= p[t - 1],
                  "rnn_ext: batch_sizes must not increase (a PackedSequence is sorted by length), "
                  "got ", p[t - 1 >= 0 ? t - 1 : 0], " then ", p[t], " at step ", t);
      g.batch.push_back(p[t]);
      g.offset.push_back(total);
      TORCH_CHECK(p[t] <= std::numeric_limits<int64_t>::max() - total,
                  "rnn_ext: batch_sizes overflow int64 when summed");
      total += p[t];
    }
    TORCH_CHECK(total == input.size(0), "rnn_ext: batch_sizes sum to ", total,
                " but the packed data has ", input.size(0), " rows");
    g.N = total;
    g.B = g.T > 0 ? g.batch[0] : 0;
  } else {
    g.T = input.size(0);
    g.B = input.size(1);
    g.N = g.T * g.B;
    g.batch.assign(g.T, g.B);
    for (int64_t t = 0; t < g.T; ++t) g.offset.push_back(t * g.B);
  }
  TORCH_CHECK(g.T > 0, "Expected sequence length to be larger than 0 in RNN");

  const std::vector<int64_t> expected_hx{g.L * g.D, g.B, g.H};
  TORCH_CHECK(hx.sizes() == at::IntArrayRef(expected_hx), "Expected hidden size ",
              shape_str(expected_hx, true), ", got ", shape_str(hx.sizes(), false));

  // Weight shapes, in torch.nn.RNN's order: w_ih, w_hh[, b_ih, b_hh] per (layer, direction).
  for (int64_t l = 0; l < g.L; ++l) {
    for (int64_t d = 0; d < g.D; ++d) {
      const int64_t base = (l * g.D + d) * per_cell;
      const std::vector<int64_t> ih{g.H, g.layer_input_size(l)}, hh{g.H, g.H}, b{g.H};
      TORCH_CHECK(weights[base].sizes() == at::IntArrayRef(ih), "rnn_ext: weight_ih of layer ",
                  l, " must have shape ", shape_str(ih, true), ", got ",
                  shape_str(weights[base].sizes(), false));
      TORCH_CHECK(weights[base + 1].sizes() == at::IntArrayRef(hh),
                  "rnn_ext: weight_hh of layer ", l, " must have shape ", shape_str(hh, true),
                  ", got ", shape_str(weights[base + 1].sizes(), false));
      if (has_biases) {
        for (int k = 2; k < 4; ++k) {
          TORCH_CHECK(weights[base + k].sizes() == at::IntArrayRef(b), "rnn_ext: bias of layer ",
                      l, " must have shape ", shape_str(b, true), ", got ",
                      shape_str(weights[base + k].sizes(), false));
        }
      }
    }
  }
  return g;
}

void check_backward_args(const Geometry& g, const at::Tensor& hx, const at::Tensor& output,
                         const at::Tensor& workspace, const at::Tensor& noise,
                         const std::optional<at::Tensor>& grad_output,
                         const std::optional<at::Tensor>& grad_hy) {
  const int64_t DH = g.D * g.H;
  TORCH_CHECK(output.numel() == g.N * DH, "rnn_ext: output has ", output.numel(),
              " elements, expected ", g.N * DH);
  TORCH_CHECK(workspace.numel() == (g.L - 1) * g.N * DH,
              "rnn_ext: the workspace does not match (was the forward run with need_grad?)");
  TORCH_CHECK(noise.numel() == 0 || noise.numel() == (g.L - 1) * g.N * DH,
              "rnn_ext: the dropout noise does not match the forward");
  if (grad_output.has_value() && grad_output->defined()) {
    TORCH_CHECK(grad_output->sizes() == output.sizes(), "rnn_ext: grad_output has shape ",
                grad_output->sizes(), ", expected ", output.sizes());
  }
  if (grad_hy.has_value() && grad_hy->defined()) {
    TORCH_CHECK(grad_hy->sizes() == hx.sizes(), "rnn_ext: grad_hy has the wrong size");
  }
}

void check_groups(const Geometry& g, int64_t groups) {
  TORCH_CHECK(groups >= 0 && (groups == 0 ? g.B == 0 : g.B % groups == 0),
              "rnn_ext: per-sample gradients: groups must divide the batch size ", g.B,
              " (and be positive for a non-empty batch), got ", groups);
}

void check_per_sample_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale) && scale != 0.0,
              "rnn_ext: per-sample gradients: scale must be finite and nonzero, got ", scale);
}

void check_jvp_args(const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                    const std::optional<at::Tensor>& input_t,
                    const std::optional<at::Tensor>& hx_t,
                    const c10::List<std::optional<at::Tensor>>& weights_t) {
  auto check = [](const std::optional<at::Tensor>& t, const at::Tensor& like, const char* what) {
    if (!t.has_value() || !t->defined()) return;
    TORCH_CHECK(t->sizes() == like.sizes(), "rnn_ext::rnn_jvp: the tangent of ", what,
                " has shape ", t->sizes(), ", expected ", like.sizes());
    TORCH_CHECK(t->device() == like.device(), "rnn_ext::rnn_jvp: the tangent of ", what,
                " is on ", t->device(), ", expected ", like.device());
    TORCH_CHECK(t->is_floating_point(), "rnn_ext::rnn_jvp: the tangent of ", what,
                " must be a floating point tensor, got ", t->scalar_type());
  };
  check(input_t, input, "input");
  check(hx_t, hx, "hx");
  TORCH_CHECK(weights_t.size() == weights.size(), "rnn_ext::rnn_jvp: expected ", weights.size(),
              " weight tangents (one per weight, None for zero), got ", weights_t.size());
  for (size_t i = 0; i < weights.size(); ++i) check(weights_t.get(i), weights[i], "a weight");
}

void check_dropout(double dropout, bool train, int64_t num_layers) {
  TORCH_CHECK(!(train && num_layers > 1 && dropout != 0) || (dropout >= 0 && dropout <= 1),
              "dropout probability has to be between 0 and 1, but got ", dropout);
}

at::Tensor dropout_noise(const at::Tensor& like, double p) {
  // The same draws as at::dropout (aten/src/ATen/native/Dropout.cpp): p == 1 draws nothing and
  // drops everything; otherwise bernoulli(1 - p) scaled by 1 / (1 - p).
  if (p >= 1.0) return at::zeros_like(like, at::MemoryFormat::Contiguous);
  auto noise = at::empty_like(like, at::MemoryFormat::Contiguous);
  if (like.numel() == 0) return noise;
  noise.bernoulli_(1.0 - p);
  noise.div_(1.0 - p);
  return noise;
}

}  // namespace rnn_ext
