// Large CPU buffers recycled across calls (csrc/cpu/recycle.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rnn_ext::cpu {

// An uninitialised contiguous CPU tensor.  The memory of a large one returns to a pool when its
// last storage reference goes, and a later request of the same byte size reuses it instead of
// fresh pages from the OS: a training loop allocates the same outputs, workspace and gradients
// every step and drops them before the next.
at::Tensor recycled_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees the idle memory of the pool; returns its size in bytes.
int64_t release_recycled();

// Bytes of idle memory the pool holds.
int64_t recycled_idle_bytes();

}  // namespace rnn_ext::cpu
