// The nonlinearities of the recurrence, applied in place to a (rows x cols) block with row
// stride ld, and their derivatives.  float tanh is a vectorised kernel of our own (compiled for
// AVX-512, AVX2 and baseline x86-64, picked at load time); double uses std::tanh.
#pragma once

#include <cstdint>

namespace rnn_ext::cpu {

// x <- act(x).  relu keeps NaN (like torch.relu).
void tanh_inplace(float* x, int64_t rows, int64_t cols, int64_t ld);
void tanh_inplace(double* x, int64_t rows, int64_t cols, int64_t ld);
void relu_inplace(float* x, int64_t rows, int64_t cols, int64_t ld);
void relu_inplace(double* x, int64_t rows, int64_t cols, int64_t ld);

// dz = dh * act'(from h = act(z)):  tanh: dh * (1 - h*h);  relu: h > 0 ? dh : 0 (NaN passes,
// as torch's threshold_backward does).  dh, h and dz are (rows x cols) with their own strides.
template <typename T>
void act_backward(bool relu, const T* dh, int64_t ld_dh, const T* h, int64_t ld_h, T* dz,
                  int64_t ld_dz, int64_t rows, int64_t cols);

}  // namespace rnn_ext::cpu
