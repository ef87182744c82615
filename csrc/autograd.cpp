// The eager autograd of the whole stack in C++: one torch::autograd::Function around the
// rnn_forward / rnn_backward ops (called through the dispatcher, so every backend, the
// profiler and dispatch modes see them).  Eager calls from rnn_ext/ops.py reach it through
// csrc/python.cpp; torch.compile and export trace the ops themselves, with the autograd
// registered for them in Python (rnn_ext/ops.py).  Both backwards call the same rnn_backward op;
// a double backward (create_graph=True) goes to the Python function installed with
// set_differentiable_backward(), which differentiates rnn_ext.reference.  With a per-sample
// sink (DP training) the backward runs rnn_backward_per_sample instead and hands the sink each
// batch row's weight gradients.
#include "autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <utility>

namespace rnn_ext {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnn_ext::rnn_forward", "")
          .typed<ForwardResult(const at::Tensor&, const at::Tensor&, at::TensorList,
                               const std::optional<at::Tensor>&, bool, int64_t, bool, bool,
                               double, bool, bool)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnn_ext::rnn_backward", "")
          .typed<BackwardResult(const at::Tensor&, const at::Tensor&, at::TensorList,
                                const std::optional<at::Tensor>&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, bool, int64_t, bool, bool,
                                std::array<bool, 3>)>();
  return op;
}

const auto& per_sample_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnn_ext::rnn_backward_per_sample", "")
          .typed<PerSampleResult(const at::Tensor&, const at::Tensor&, at::TensorList,
                                 const std::optional<at::Tensor>&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, bool, int64_t, bool, bool,
                                 std::array<bool, 3>, int64_t, double)>();
  return op;
}

// The per-sample sink of a node, kept in its saved_data (an IValue capsule).
struct SinkHolder : torch::CustomClassHolder {
  explicit SinkHolder(std::shared_ptr<PerSampleSink> s) : sink(std::move(s)) {}
  std::shared_ptr<PerSampleSink> sink;
};

DifferentiableBackward& differentiable_backward() {
  static DifferentiableBackward fn;
  return fn;
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Saved, in this order: input, hx, batch_sizes (undefined for dense input), output,
// workspace, noise, then the weights.
constexpr size_t kFirstWeight = 6;

}  // namespace

// (outside the anonymous namespace: its name is the node's name,
// "torch::autograd::CppNode<rnn_ext::RNNFunction>")
struct RNNFunction : public torch::autograd::Function<RNNFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& hx, at::TensorList weights,
                               const std::optional<at::Tensor>& batch_sizes, bool has_biases,
                               int64_t num_layers, bool bidirectional, bool relu,
                               double dropout, bool train,
                               std::shared_ptr<PerSampleSink> per_sample) {
    at::Tensor out, hy, ws, noise;
    {
      // below the autograd keys: the op's own (Python) autograd registration is for
      // torch.compile; here this Function is the autograd.
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, hy, ws, noise) =
          forward_op().call(input, hx, weights, batch_sizes, has_biases, num_layers,
                            bidirectional, relu, dropout, train, /*need_grad=*/true);
    }
    ctx->set_materialize_grads(false);
    variable_list saved{input, hx, batch_sizes.value_or(at::Tensor()), out, ws, noise};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(std::move(saved));
    ctx->saved_data["config"] = c10::List<int64_t>(
        {int64_t{has_biases}, num_layers, int64_t{bidirectional}, int64_t{relu}});
    if (per_sample) {
      ctx->saved_data["per_sample"] =
          at::IValue::make_capsule(c10::make_intrusive<SinkHolder>(std::move(per_sample)));
    }
    return {out, hy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const size_t nw = saved.size() - kFirstWeight;
    // Gradients for every forward argument: input, hx, each weight, batch_sizes, the six
    // non-tensor arguments and the sink (undefined where there is none).
    variable_list result(nw + 10);
    const at::Tensor& grad_output = grads[0];
    const at::Tensor& grad_hy = grads[1];
    const auto sink_it = ctx->saved_data.find("per_sample");
    const bool per_sample = sink_it != ctx->saved_data.end();
    if (!grad_output.defined() && !grad_hy.defined() && !per_sample) return result;

    const auto config = ctx->saved_data["config"].toIntList();
    const bool has_biases = config[0] != 0, bidirectional = config[2] != 0,
               relu = config[3] != 0;
    const int64_t num_layers = config[1];
    // Edge (input-gradient) indices: input 0, hx 1, weights from 2.
    std::vector<bool> need_w(nw);
    bool any_w = false;
    for (size_t i = 0; i < nw; ++i) any_w |= need_w[i] = ctx->needs_input_grad(2 + i);
    const bool need_input = ctx->needs_input_grad(0), need_hx = ctx->needs_input_grad(1);

    at::Tensor grad_input, grad_hx;
    std::vector<at::Tensor> grad_w;
    if (per_sample) {
      TORCH_CHECK(!at::GradMode::is_enabled(),
                  "rnn_ext: the backward that forms per-sample gradients "
                  "(rnn_ext.per_sample_gradients, Opacus) cannot be differentiated: "
                  "backward(create_graph=True) is not supported there");
      const auto& sink =
          c10::static_intrusive_pointer_cast<SinkHolder>(sink_it->second.toCapsule())->sink;
      const double scale = sink->scale ? sink->scale() : 1.0;
      const at::TensorList weights(saved.data() + kFirstWeight, nw);
      std::vector<at::Tensor> per_row;
      std::tie(grad_input, grad_hx, per_row, grad_w) = per_sample_op().call(
          saved[0], saved[1], weights, opt(saved[2]), saved[3], saved[4], saved[5],
          opt(grad_output), opt(grad_hy), has_biases, num_layers, bidirectional, relu,
          {need_input, need_hx, true}, saved[1].size(1), scale);
      sink->take(std::move(per_row));
    } else if (at::GradMode::is_enabled()) {  // create_graph: differentiable gradients
      TORCH_CHECK(differentiable_backward(),
                  "rnn_ext: no differentiable backward installed (import rnn_ext)");
      std::tie(grad_input, grad_hx, grad_w) = differentiable_backward()(
          saved, {has_biases, num_layers, bidirectional, relu}, need_input, need_hx, need_w,
          grad_output, grad_hy);
    } else {
      const at::TensorList weights(saved.data() + kFirstWeight, nw);
      std::tie(grad_input, grad_hx, grad_w) = backward_op().call(
          saved[0], saved[1], weights, opt(saved[2]), saved[3], saved[4], saved[5],
          opt(grad_output), opt(grad_hy), has_biases, num_layers, bidirectional, relu,
          {need_input, need_hx, any_w});
    }
    if (need_input) result[0] = grad_input;
    if (need_hx) result[1] = grad_hx;
    for (size_t i = 0; i < nw && i < grad_w.size(); ++i) {
      if (need_w[i]) result[2 + i] = grad_w[i];
    }
    return result;
  }
};

void set_differentiable_backward(DifferentiableBackward fn) {
  differentiable_backward() = std::move(fn);
}

std::tuple<at::Tensor, at::Tensor> rnn(const at::Tensor& input, const at::Tensor& hx,
                                       at::TensorList weights,
                                       const std::optional<at::Tensor>& batch_sizes,
                                       bool has_biases, int64_t num_layers, bool bidirectional,
                                       bool relu, double dropout, bool train,
                                       std::shared_ptr<PerSampleSink> per_sample) {
  bool need_grad = false;
  if (at::GradMode::is_enabled()) {
    need_grad = input.requires_grad() || hx.requires_grad();
    for (const auto& w : weights) need_grad = need_grad || w.requires_grad();
  }
  if (need_grad) {
    variable_list out = RNNFunction::apply(input, hx, weights, batch_sizes, has_biases,
                                           num_layers, bidirectional, relu, dropout, train,
                                           std::move(per_sample));
    return {out[0], out[1]};
  }
  at::AutoDispatchBelowADInplaceOrView below;
  auto [out, hy, ws, noise] = forward_op().call(input, hx, weights, batch_sizes, has_biases,
                                                num_layers, bidirectional, relu, dropout,
                                                train, /*need_grad=*/false);
  return {out, hy};
}

}  // namespace rnn_ext
