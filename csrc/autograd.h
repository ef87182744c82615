// The eager entry point of the whole stack with autograd (csrc/autograd.cpp).
#pragma once

#include <functional>
#include <memory>

#include "rnn_ext.h"

namespace rnn_ext {

// Per-sample gradients (DP training: rnn_ext.per_sample_gradients, Opacus).  The backward runs
// the rnn_backward_per_sample op once: take() gets every batch row's weight gradients (one
// (B, *weight.shape) tensor per weight, rows in the op's order, times scale(), read at backward
// time), and the weights' ordinary gradients are their (unscaled) sums.
struct PerSampleSink {
  std::function<double()> scale;
  std::function<void(std::vector<at::Tensor>)> take;
};

// output and h_n of the stack, like torch._VF.rnn_tanh / rnn_relu (dense seq-first input, or
// packed data with batch_sizes).  With grad mode on and any tensor argument requiring grad,
// the results carry one autograd node whose backward runs the rnn_backward op (or, with a
// per_sample sink, rnn_backward_per_sample).
std::tuple<at::Tensor, at::Tensor> rnn(const at::Tensor& input, const at::Tensor& hx,
                                       at::TensorList weights,
                                       const std::optional<at::Tensor>& batch_sizes,
                                       bool has_biases, int64_t num_layers, bool bidirectional,
                                       bool relu, double dropout, bool train,
                                       std::shared_ptr<PerSampleSink> per_sample = nullptr);

struct Config {
  bool has_biases;
  int64_t num_layers;
  bool bidirectional;
  bool relu;
};

// The backward under create_graph=True: (grad_input, grad_hx, grads of the weights), each
// differentiable; undefined where not needed.  `saved` is (input, hx, batch_sizes or
// undefined, output, workspace, noise, weights...).
using DifferentiableBackward = std::function<BackwardResult(
    const std::vector<at::Tensor>& saved, const Config& config, bool need_input, bool need_hx,
    const std::vector<bool>& need_weights, const at::Tensor& grad_output,
    const at::Tensor& grad_hy)>;

void set_differentiable_backward(DifferentiableBackward fn);

}  // namespace rnn_ext
