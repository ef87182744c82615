// The per-step kernels and launchers, compiled for the emulation (see simt_emulation.h).
#include "../../csrc/cuda/rnn_kernels.cu"
