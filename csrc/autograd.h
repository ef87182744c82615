// The eager entry point of the whole stack with autograd (csrc/autograd.cpp).
#pragma once

#include <functional>

#include "rnn_ext.h"

namespace rnn_ext {

// output and h_n of the stack, like torch._VF.rnn_tanh / rnn_relu (dense seq-first input, or
// packed data with batch_sizes).  With grad mode on and any tensor argument requiring grad,
// the results carry one autograd node whose backward runs the rnn_backward op.
std::tuple<at::Tensor, at::Tensor> rnn(const at::Tensor& input, const at::Tensor& hx,
                                       at::TensorList weights,
                                       const std::optional<at::Tensor>& batch_sizes,
                                       bool has_biases, int64_t num_layers, bool bidirectional,
                                       bool relu, double dropout, bool train);

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
