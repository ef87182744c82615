// csrc/cuda_glue.cpp's entry points as a Python module, for running the whole CUDA backend --
// glue and kernels -- on CPU tensors (tests/test_cuda_emulated.py).  Test-only.
#include <torch/extension.h>

#include "rnn_ext.h"
#include "cuda/rnn_persistent.h"

namespace rnn_ext {
std::string set_cuda_kernel_mode(const std::string& name);
std::string last_cuda_kernel_used(bool backward);
int64_t last_cuda_wavefront_layers();
int64_t set_cuda_row_split_max(int64_t groups);
int64_t last_cuda_row_groups(bool backward);
std::string last_cuda_persistent_variant(bool backward);
}  // namespace rnn_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", [](const at::Tensor& input, const at::Tensor& hx,
                      const std::vector<at::Tensor>& weights,
                      const std::optional<at::Tensor>& batch_sizes, bool has_biases,
                      int64_t num_layers, bool bidirectional, bool relu, double dropout,
                      bool train, bool need_grad) {
    return rnn_ext::rnn_forward_cuda(input, hx, weights, batch_sizes, has_biases, num_layers,
                                     bidirectional, relu, dropout, train, need_grad);
  });
  m.def("backward", [](const at::Tensor& input, const at::Tensor& hx,
                       const std::vector<at::Tensor>& weights,
                       const std::optional<at::Tensor>& batch_sizes, const at::Tensor& output,
                       const at::Tensor& workspace, const at::Tensor& noise,
                       const std::optional<at::Tensor>& grad_output,
                       const std::optional<at::Tensor>& grad_hy, bool has_biases,
                       int64_t num_layers, bool bidirectional, bool relu,
                       std::vector<bool> mask) {
    return rnn_ext::rnn_backward_cuda(input, hx, weights, batch_sizes, output, workspace, noise,
                                      grad_output, grad_hy, has_biases, num_layers,
                                      bidirectional, relu, {mask[0], mask[1], mask[2]});
  });
  m.def("backward_per_sample",
        [](const at::Tensor& input, const at::Tensor& hx, const std::vector<at::Tensor>& weights,
           const std::optional<at::Tensor>& batch_sizes, const at::Tensor& output,
           const at::Tensor& workspace, const at::Tensor& noise,
           const std::optional<at::Tensor>& grad_output,
           const std::optional<at::Tensor>& grad_hy, bool has_biases, int64_t num_layers,
           bool bidirectional, bool relu, std::vector<bool> mask, int64_t groups,
           double scale) {
          return rnn_ext::rnn_backward_per_sample_cuda(
              input, hx, weights, batch_sizes, output, workspace, noise, grad_output, grad_hy,
              has_biases, num_layers, bidirectional, relu, {mask[0], mask[1], mask[2]}, groups,
              scale);
        });
  m.def("set_kernel", &rnn_ext::set_cuda_kernel_mode);
  m.def("kernel_used",
        [](const std::string& phase) { return rnn_ext::last_cuda_kernel_used(phase == "backward"); });
  m.def("wavefront_layers", &rnn_ext::last_cuda_wavefront_layers);
  m.def("set_row_split", &rnn_ext::set_cuda_row_split_max);
  m.def("row_groups_used",
        [](const std::string& phase) { return rnn_ext::last_cuda_row_groups(phase == "backward"); });
  m.def("row_groups", [](int max_groups, int64_t B, int64_t blocks, int64_t max_coresident,
                         int64_t align) {
    int64_t rows = 0;
    const int R = rnn_ext::gpu::persistent_row_groups(max_groups, B, blocks, max_coresident,
                                                      align, &rows);
    return std::make_tuple(R, rows);
  });
  m.def("variant", [](const std::string& phase) {
    return rnn_ext::last_cuda_persistent_variant(phase == "backward");
  });
}
