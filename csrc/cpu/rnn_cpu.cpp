// The CPU kernels: forward of the whole stack in one call, and its backward (BPTT).
//
// Per layer and direction the forward is
//   1. one GEMM for the input projection of every time step, both biases folded in, written
//      straight into this direction's columns of the layer output;
//   2. the recurrence: per step, one BLAS call accumulates h_{t-1} W_hh^T onto that step's
//      projection in place, then the nonlinearity runs in place.  No allocation, no ATen op
//      per step.
// The backward walks the steps in the opposite order (dh -> dz -> dh W_hh), keeps every dz, and
// then forms the weight and bias gradients and the input gradient as a few large GEMMs.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "cpu/activation.h"
#include "cpu/blas.h"
#include "rnn_ext.h"

namespace rnn_ext {

namespace {

using cpu::gemm;

template <typename T>
struct Cell {
  const T* w_ih;  // (H, I_l)
  const T* w_hh;  // (H, H)
  const T* b_ih;  // (H) or null
  const T* b_hh;  // (H) or null
};

template <typename T>
Cell<T> cell(const std::vector<at::Tensor>& w, const Geometry& g, int64_t l, int64_t d) {
  const int64_t base = (l * g.D + d) * g.weights_per_cell();
  Cell<T> c{w[base].data_ptr<T>(), w[base + 1].data_ptr<T>(), nullptr, nullptr};
  if (g.has_biases) {
    c.b_ih = w[base + 2].data_ptr<T>();
    c.b_hh = w[base + 3].data_ptr<T>();
  }
  return c;
}

// Steps in the order a direction processes them.
inline int64_t step_at(const Geometry& g, int64_t d, int64_t i) { return d == 0 ? i : g.T - 1 - i; }

template <typename T>
void activate(const Geometry& g, T* z, int64_t rows, int64_t ld) {
  if (g.relu) {
    cpu::relu_inplace(z, rows, g.H, ld);
  } else {
    cpu::tanh_inplace(z, rows, g.H, ld);
  }
}

// One direction of one layer.  x: (N, I_l) contiguous; out: this direction's columns of the
// (N, D*H) layer output (row stride D*H); h0: (B, H) contiguous.
template <typename T>
void layer_forward(const Geometry& g, int64_t d, const Cell<T>& c, const T* x, int64_t in_size,
                   const T* h0, T* out) {
  const int64_t H = g.H, ld = g.D * g.H;
  // 1. projection of all steps, biases folded in.
  T beta = T(0);
  if (c.b_ih != nullptr) {
    for (int64_t r = 0; r < g.N; ++r) {
      T* row = out + r * ld;
      for (int64_t j = 0; j < H; ++j) row[j] = c.b_ih[j] + c.b_hh[j];
    }
    beta = T(1);
  }
  gemm<T>(false, true, g.N, H, in_size, T(1), x, in_size, c.w_ih, in_size, beta, out, ld);

  // 2. recurrence.
  for (int64_t i = 0; i < g.T; ++i) {
    const int64_t t = step_at(g, d, i);
    const int64_t rows = g.batch[t];
    if (rows == 0) continue;
    T* z = out + g.offset[t] * ld;
    if (i == 0) {
      gemm<T>(false, true, rows, H, H, T(1), h0, H, c.w_hh, H, T(1), z, ld);
    } else {
      const int64_t tp = step_at(g, d, i - 1);  // previous step in processing order
      // Forward: batch[tp] >= rows, all rows continue.  Reverse: only batch[tp] <= rows rows
      // continue; the others start here from h0.
      const int64_t cont = std::min(rows, g.batch[tp]);
      gemm<T>(false, true, cont, H, H, T(1), out + g.offset[tp] * ld, ld, c.w_hh, H, T(1), z,
              ld);
      if (cont < rows) {
        gemm<T>(false, true, rows - cont, H, H, T(1), h0 + cont * H, H, c.w_hh, H, T(1),
                z + cont * ld, ld);
      }
    }
    activate(g, z, rows, ld);
  }
}

// h_n of one direction: each row's state after its last processed step.
template <typename T>
void gather_final(const Geometry& g, int64_t d, const T* out, const T* h0, T* hn) {
  const int64_t H = g.H, ld = g.D * g.H;
  for (int64_t r = 0; r < g.B; ++r) {
    const T* src = h0 + r * H;  // rows that never ran (batch 0 steps) keep h0
    if (d == 1) {
      if (g.batch[0] > r) src = out + (g.offset[0] + r) * ld;
    } else {
      // last step t with batch[t] > r
      int64_t lo = 0, hi = g.T;  // batch is non-increasing: find the first t with batch[t] <= r
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (g.batch[mid] > r) lo = mid + 1; else hi = mid;
      }
      if (lo > 0) src = out + (g.offset[lo - 1] + r) * ld;
    }
    std::copy(src, src + H, hn + r * H);
  }
}

// The hidden state each row of each step started from, gathered into (N, H): what W_hh was
// multiplied with, for dW_hh.
template <typename T>
void gather_prev(const Geometry& g, int64_t d, const T* out, const T* h0, T* prev) {
  const int64_t H = g.H, ld = g.D * g.H;
  for (int64_t i = 0; i < g.T; ++i) {
    const int64_t t = step_at(g, d, i);
    const int64_t rows = g.batch[t];
    int64_t cont = 0;
    const T* src = nullptr;
    if (i > 0) {
      const int64_t tp = step_at(g, d, i - 1);
      cont = std::min(rows, g.batch[tp]);
      src = out + g.offset[tp] * ld;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T* s = r < cont ? src + r * ld : h0 + r * H;
      std::copy(s, s + H, prev + (g.offset[t] + r) * H);
    }
  }
}

template <typename T>
ForwardResult forward_impl(const Geometry& g, const at::Tensor& input, const at::Tensor& hx,
                           const std::vector<at::Tensor>& w, double dropout, bool train,
                           bool need_grad) {
  const int64_t DH = g.D * g.H;
  const auto opts = input.options();
  const bool use_dropout = train && dropout > 0 && g.L > 1;
  at::Tensor x = input.contiguous();
  at::Tensor h0 = hx.contiguous();
  at::Tensor output = g.packed ? at::empty({g.N, DH}, opts) : at::empty({g.T, g.B, DH}, opts);
  at::Tensor hy = at::empty({g.L * g.D, g.B, g.H}, opts);
  at::Tensor ws = need_grad ? at::empty({g.L - 1, g.N, DH}, opts) : at::empty({0}, opts);
  at::Tensor noise = (need_grad && use_dropout) ? at::empty({g.L - 1, g.N, DH}, opts)
                                                : at::empty({0}, opts);
  at::Tensor scratch[2];  // layer outputs when nothing is saved
  at::Tensor layer_in = x;
  for (int64_t l = 0; l < g.L; ++l) {
    at::Tensor layer_out;
    if (l == g.L - 1) {
      layer_out = output;
    } else if (need_grad) {
      layer_out = ws[l];
    } else {
      if (!scratch[l % 2].defined()) scratch[l % 2] = at::empty({g.N, DH}, opts);
      layer_out = scratch[l % 2];
    }
    const int64_t in_size = g.layer_input_size(l);
    for (int64_t d = 0; d < g.D; ++d) {
      const T* h0_ld = h0.data_ptr<T>() + (l * g.D + d) * g.B * g.H;
      T* out_d = layer_out.data_ptr<T>() + d * g.H;
      layer_forward<T>(g, d, cell<T>(w, g, l, d), layer_in.data_ptr<T>(), in_size, h0_ld, out_d);
      gather_final<T>(g, d, out_d, h0_ld, hy.data_ptr<T>() + (l * g.D + d) * g.B * g.H);
    }
    if (l < g.L - 1) {
      layer_in = layer_out.view({g.N, DH});
      if (use_dropout) {
        at::Tensor nz = dropout_noise(layer_in, dropout);
        if (need_grad) noise[l].copy_(nz);
        layer_in = layer_in * nz;
      }
    }
  }
  return {output, hy, ws, noise};
}

template <typename T>
BackwardResult backward_impl(const Geometry& g, const at::Tensor& input, const at::Tensor& hx,
                             const std::vector<at::Tensor>& w, const at::Tensor& output,
                             const at::Tensor& ws, const at::Tensor& noise,
                             const at::Tensor& grad_output, const at::Tensor& grad_hy,
                             const std::array<bool, 3>& mask) {
  const int64_t H = g.H, DH = g.D * g.H;
  const auto opts = input.options();
  const bool need_input = mask[0], need_hx = mask[1], need_w = mask[2];
  at::Tensor x = input.contiguous().view({g.N, g.I});
  at::Tensor h0 = hx.contiguous();
  at::Tensor out_top = output.contiguous().view({g.N, DH});
  at::Tensor ghy = grad_hy.defined() ? grad_hy.contiguous() : at::Tensor();

  at::Tensor grad_hx = need_hx ? at::empty_like(h0) : at::empty({0}, opts);
  std::vector<at::Tensor> grad_w;
  if (need_w) {
    for (const auto& wi : w) grad_w.push_back(at::empty_like(wi));
  }
  // dY: gradient w.r.t. the current layer's output (N, D*H).
  at::Tensor dY = grad_output.defined() ? grad_output.contiguous().view({g.N, DH})
                                        : at::zeros({g.N, DH}, opts);
  at::Tensor dZ = at::empty({g.N, DH}, opts);
  at::Tensor dh = at::empty({g.B, H}, opts);
  at::Tensor prev = need_w ? at::empty({g.N, H}, opts) : at::Tensor();
  at::Tensor grad_input;

  for (int64_t l = g.L - 1; l >= 0; --l) {
    const at::Tensor layer_out = l == g.L - 1 ? out_top : ws[l];
    at::Tensor layer_in = x;
    if (l > 0) {
      layer_in = ws[l - 1];
      if (noise.numel() > 0) layer_in = layer_in * noise[l - 1];
    }
    const int64_t in_size = g.layer_input_size(l);
    for (int64_t d = 0; d < g.D; ++d) {
      const auto c = cell<T>(w, g, l, d);
      const T* h_out = layer_out.data_ptr<T>() + d * H;
      const T* dy = dY.data_ptr<T>() + d * H;
      T* dz = dZ.data_ptr<T>() + d * H;
      T* dhp = dh.data_ptr<T>();
      if (ghy.defined()) {
        dh.copy_(ghy[l * g.D + d]);
      } else {
        dh.zero_();
      }
      for (int64_t i = g.T - 1; i >= 0; --i) {
        const int64_t t = step_at(g, d, i);
        const int64_t rows = g.batch[t];
        if (rows == 0) continue;
        const int64_t o = g.offset[t];
        // dh += dy_t
        for (int64_t r = 0; r < rows; ++r) {
          const T* src = dy + (o + r) * DH;
          T* dst = dhp + r * H;
          for (int64_t j = 0; j < H; ++j) dst[j] += src[j];
        }
        cpu::act_backward<T>(g.relu, dhp, H, h_out + o * DH, DH, dz + o * DH, DH, rows, H);
        // dh_{prev} = dz W_hh
        gemm<T>(false, false, rows, H, H, T(1), dz + o * DH, DH, c.w_hh, H, T(0), dhp, H);
      }
      if (need_hx) {
        std::copy(dhp, dhp + g.B * H, grad_hx.data_ptr<T>() + (l * g.D + d) * g.B * H);
      }
      if (need_w) {
        const int64_t base = (l * g.D + d) * g.weights_per_cell();
        // dW_ih = dZ^T X ; dW_hh = dZ^T H_prev ; db = sum over rows of dZ
        gemm<T>(true, false, H, in_size, g.N, T(1), dz, DH, layer_in.data_ptr<T>(), in_size,
                T(0), grad_w[base].data_ptr<T>(), in_size);
        gather_prev<T>(g, d, h_out, h0.data_ptr<T>() + (l * g.D + d) * g.B * H,
                       prev.data_ptr<T>());
        gemm<T>(true, false, H, H, g.N, T(1), dz, DH, prev.data_ptr<T>(), H, T(0),
                grad_w[base + 1].data_ptr<T>(), H);
        if (g.has_biases) {
          at::sum_out(grad_w[base + 2], dZ.narrow(1, d * H, H), {0});
          grad_w[base + 3].copy_(grad_w[base + 2]);
        }
      }
    }
    if (l == 0 && !need_input) break;
    // gradient w.r.t. this layer's input: sum over directions of dZ_d W_ih_d
    at::Tensor dX = at::empty({g.N, in_size}, opts);
    for (int64_t d = 0; d < g.D; ++d) {
      const auto c = cell<T>(w, g, l, d);
      gemm<T>(false, false, g.N, in_size, H, T(1), dZ.data_ptr<T>() + d * H, DH, c.w_ih,
              in_size, d == 0 ? T(0) : T(1), dX.data_ptr<T>(), in_size);
    }
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

bool is_reduced(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

std::vector<at::Tensor> as_dtype(at::TensorList ts, at::ScalarType dt) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.to(dt).contiguous());
  return out;
}

at::Tensor opt_to(const std::optional<at::Tensor>& t, at::ScalarType dt) {
  return t.has_value() && t->defined() ? t->to(dt) : at::Tensor();
}

}  // namespace

ForwardResult rnn_forward_cpu(const at::Tensor& input, const at::Tensor& hx,
                              at::TensorList weights,
                              const std::optional<at::Tensor>& batch_sizes, bool has_biases,
                              int64_t num_layers, bool bidirectional, bool relu,
                              double dropout, bool train, bool need_grad) {
  // The ATen calls below must not be autocast: this op decides its own precision.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Geometry g =
      geometry(input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu);
  const auto dt = input.scalar_type();
  if (is_reduced(dt)) {
    // float16 / bfloat16: compute in float32, round the results (as torch's CPU RNN accumulates
    // its matmuls in float32).
    auto [out, hy, ws, noise] =
        forward_impl<float>(g, input.to(at::kFloat), hx.to(at::kFloat),
                            as_dtype(weights, at::kFloat), dropout, train, need_grad);
    return {out.to(dt), hy.to(dt), ws.to(dt), noise.to(dt)};
  }
  std::vector<at::Tensor> w = as_dtype(weights, dt);
  if (dt == at::kDouble) return forward_impl<double>(g, input, hx, w, dropout, train, need_grad);
  return forward_impl<float>(g, input, hx, w, dropout, train, need_grad);
}

BackwardResult rnn_backward_cpu(const at::Tensor& input, const at::Tensor& hx,
                                at::TensorList weights,
                                const std::optional<at::Tensor>& batch_sizes,
                                const at::Tensor& output, const at::Tensor& workspace,
                                const at::Tensor& noise,
                                const std::optional<at::Tensor>& grad_output,
                                const std::optional<at::Tensor>& grad_hy, bool has_biases,
                                int64_t num_layers, bool bidirectional, bool relu,
                                std::array<bool, 3> output_mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Geometry g =
      geometry(input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu);
  const int64_t DH = g.D * g.H;
  TORCH_CHECK(output.numel() == g.N * DH, "rnn_ext: output has ", output.numel(),
              " elements, expected ", g.N * DH);
  TORCH_CHECK(workspace.numel() == (g.L - 1) * g.N * DH,
              "rnn_ext: the workspace does not match (was the forward run with need_grad?)");
  TORCH_CHECK(noise.numel() == 0 || noise.numel() == (g.L - 1) * g.N * DH,
              "rnn_ext: the dropout noise does not match the forward");
  if (grad_output.has_value() && grad_output->defined()) {
    TORCH_CHECK(grad_output->numel() == g.N * DH, "rnn_ext: grad_output has the wrong size");
  }
  if (grad_hy.has_value() && grad_hy->defined()) {
    TORCH_CHECK(grad_hy->sizes() == hx.sizes(), "rnn_ext: grad_hy has the wrong size");
  }
  const auto dt = input.scalar_type();
  const auto ct = is_reduced(dt) ? at::kFloat : dt;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    return backward_impl<T>(g, input.to(ct), hx.to(ct), as_dtype(weights, ct), output.to(ct),
                            workspace.to(ct), noise.to(ct), opt_to(grad_output, ct),
                            opt_to(grad_hy, ct), output_mask);
  };
  BackwardResult r = ct == at::kDouble ? run(double{}) : run(float{});
  if (ct != dt) {
    auto& [gi, ghx, gw] = r;
    gi = gi.to(dt);
    ghx = ghx.to(dt);
    for (size_t i = 0; i < gw.size(); ++i) gw[i] = gw[i].to(weights[i].scalar_type());
  }
  return r;
}

}  // namespace rnn_ext
