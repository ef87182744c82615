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
//
// Parallelism (torch's thread pool, so torch.set_num_threads rules): the large GEMMs use BLAS's
// threads; the recurrences, which are sequential in time, run side by side where they are
// independent:
//   * the two directions of a layer run concurrently;
//   * in a unidirectional stack the layers run as a wavefront over chunks of time steps: while
//     layer l computes chunk c, layer l+1 computes chunk c-1 (backward: the mirror image).
// Inside such a task BLAS runs single-threaded (it is called from a parallel region).
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <array>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "cpu/activation.h"
#include "cpu/blas.h"
#include "cpu/recycle.h"
#include "cpu/step_kernel.h"
#include "cpu/wgrad_kernel.h"
#include "rnn_ext.h"

namespace rnn_ext {

namespace {

using cpu::gemm;

// An uninitialised CPU tensor, allocated without a trip through the dispatcher: a dispatched
// at::empty costs microseconds, and the kernels need a dozen buffers per call, which at the
// walkthrough's sizes cost more than the arithmetic.  Large ones are recycled from earlier calls
// (cpu/recycle.h).  (Every element is written before use.)
at::Tensor new_tensor(at::IntArrayRef sizes, at::ScalarType dt) {
  return cpu::recycled_empty(sizes, dt);
}

template <typename T>
struct Cell {
  const T* w_ih;  // (H, I_l)
  const T* w_hh;  // (H, H)
  const T* b_ih;  // (H) or null
  const T* b_hh;  // (H) or null
  // float32 with the step kernel: W_hh packed as its panel (forward: W_hh^T; backward: W_hh)
  const T* panel = nullptr;
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

// Input projection of rows [r0, r1), biases folded in: out = x W_ih^T + b_ih + b_hh.
template <typename T>
void project(const Geometry& g, const Cell<T>& c, const T* x, int64_t in_size, T* out,
             int64_t r0, int64_t r1) {
  const int64_t H = g.H, ld = g.D * g.H;
  if (r1 <= r0) return;
  T beta = T(0);
  if (c.b_ih != nullptr) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = out + r * ld;
      for (int64_t j = 0; j < H; ++j) row[j] = c.b_ih[j] + c.b_hh[j];
    }
    beta = T(1);
  }
  gemm<T>(false, true, r1 - r0, H, in_size, T(1), x + r0 * in_size, in_size, c.w_ih, in_size,
          beta, out + r0 * ld, ld);
}

// Large steps with several threads free go to BLAS: its multi-threaded GEMM keeps the cores'
// FMA units busier than the single-stream step kernel does once a step is big enough.
bool blas_step(int64_t rows, int64_t H) {
  static const int64_t min_fma = [] {
    const char* v = std::getenv("RNN_EXT_STEP_BLAS_MIN");
    return v == nullptr ? (int64_t(1) << 17) : std::atoll(v);
  }();
  // (with fewer than 16 rows the step kernel measured at least as fast at every size tried)
  return rows >= 16 && rows * H * H >= min_fma && at::get_num_threads() > 1 &&
         !at::in_parallel_region();
}

// A recurrence computed by a team of torch's intra-op threads, one parallel region per
// recurrence (not one per step), only where nothing else runs concurrently (not inside the
// direction / wavefront tasks) and only for the float32 step kernel:
//  - kRows: the batch rows are independent recurrences: each member runs all the steps of its
//    own slice of rows, reading only the state it wrote itself (no barrier, no state moving
//    between cores); when the rows split evenly or every member gets >= RNN_EXT_TEAM_ROWS_MIN
//    rows (default 2; 0: never);
//  - kColumns: every member owns a range of 16-column blocks of h and computes those columns
//    of each step, then waits at a barrier (the next step reads all of h): for small batches.
// RNN_EXT_TEAM_MIN: the smallest step (rows x H x H multiply-adds) that uses a team.
enum class Team { kNone, kRows, kColumns };

Team team_kind(const Geometry& g) {
#ifdef _OPENMP
  static const int64_t min_fma = [] {
    const char* v = std::getenv("RNN_EXT_TEAM_MIN");
    return v == nullptr ? (int64_t(1) << 13) : std::atoll(v);
  }();
  static const int64_t min_rows = [] {
    const char* v = std::getenv("RNN_EXT_TEAM_ROWS_MIN");
    return v == nullptr ? int64_t(2) : std::max<int64_t>(0, std::atoll(v));
  }();
  const int64_t threads = at::get_num_threads();
  if (threads < 2 || at::in_parallel_region() || g.B * g.H * g.H < min_fma) return Team::kNone;
  if (min_rows > 0 && (g.B >= min_rows * threads || (g.B >= threads && g.B % threads == 0))) {
    return Team::kRows;
  }
  return g.H > 16 ? Team::kColumns : Team::kNone;
#else
  (void)g;
  return Team::kNone;
#endif
}

// f(member, members) on every member of a team of torch's intra-op threads; `barrier()` inside
// f synchronises the team.  (members may be fewer than asked for; 1 runs f inline.)
template <typename F>
void run_team(const F& f) {
#ifdef _OPENMP
#pragma omp parallel num_threads(at::get_num_threads())
  f(static_cast<int64_t>(omp_get_thread_num()), static_cast<int64_t>(omp_get_num_threads()));
#else
  f(int64_t(0), int64_t(1));
#endif
}

inline void barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// The 16-column blocks of an H-column state owned by member k of n.
struct Share {
  int64_t jb0, jb1, c0, c1;  // blocks [jb0, jb1), columns [c0, c1)
  Share(int64_t H, int64_t k, int64_t n) {
    const int64_t nb = (H + 15) / 16;
    jb0 = nb * k / n;
    jb1 = nb * (k + 1) / n;
    c0 = std::min(H, jb0 * 16);
    c1 = std::min(H, jb1 * 16);
  }
};

// The batch rows owned by member k of n in a row team.
struct RowShare {
  int64_t r0, r1;
  RowShare(int64_t B, int64_t k, int64_t n) : r0(B * k / n), r1(B * (k + 1) / n) {}
};

// A float32 recurrence with a packed W_hh on the team team_kind() picks: each member runs
// on_rows(its RowShare) or on_columns(its Share).  False (nothing run) when no team applies.
template <typename OnRows, typename OnColumns>
bool run_on_team(const Geometry& g, const float* panel, const OnRows& on_rows,
                 const OnColumns& on_columns) {
  switch (panel == nullptr ? Team::kNone : team_kind(g)) {
    case Team::kRows:
      run_team([&](int64_t k, int64_t n) { on_rows(RowShare(g.B, k, n)); });
      return true;
    case Team::kColumns:
      run_team([&](int64_t k, int64_t n) { on_columns(Share(g.H, k, n)); });
      return true;
    case Team::kNone:
      break;
  }
  return false;
}

// z (rows x H, row stride ld) = act(z + a W_hh^T), a: (rows x H) with row stride lda.
template <typename T>
void step_forward(const Geometry& g, const Cell<T>& c, const T* a, int64_t lda, int64_t rows,
                  T* z, int64_t ld) {
  if (rows == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (c.panel != nullptr && !blas_step(rows, g.H)) {
      cpu::step_gemm(rows, g.H, g.H, a, lda, c.panel, z, ld, true,
                     g.relu ? cpu::StepAct::kRelu : cpu::StepAct::kTanh);
      return;
    }
  }
  gemm<T>(false, true, rows, g.H, g.H, T(1), a, lda, c.w_hh, g.H, T(1), z, ld);
  activate(g, z, rows, ld);
}

// The steps [i0, i1) of a recurrence in this direction's processing order, on the batch rows
// [r0, r1) (rows are independent: each carries its own state):
// step(a, lda, rows, z) computes `rows` rows z of a step from their previous state a, then
// after_step() runs (the column team's barrier; nothing otherwise).
template <typename T, typename Step, typename After>
void walk_forward(const Geometry& g, int64_t d, const T* h0, T* out, int64_t i0, int64_t i1,
                  int64_t r0, int64_t r1, const Step& step, const After& after_step) {
  const int64_t H = g.H, ld = g.D * g.H;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t t = step_at(g, d, i);
    const int64_t hi = std::min(r1, g.batch[t]);  // rows [r0, hi) are active at step t
    if (hi <= r0) continue;  // (column team: r0 = 0, the same on every member)
    T* z = out + (g.offset[t] + r0) * ld;
    if (i == 0) {
      step(h0 + r0 * H, H, hi - r0, z);
    } else {
      const int64_t tp = step_at(g, d, i - 1);  // previous step in processing order
      // Forward: batch[tp] >= batch[t], all rows continue.  Reverse: only rows below batch[tp]
      // continue; the others start here from h0.
      const int64_t cont = std::max(r0, std::min(hi, g.batch[tp]));
      step(out + (g.offset[tp] + r0) * ld, ld, cont - r0, z);
      step(h0 + cont * H, H, hi - cont, out + (g.offset[t] + cont) * ld);
    }
    after_step();
  }
}

// The recurrence over steps [i0, i1) in this direction's processing order.
template <typename T>
void recur(const Geometry& g, int64_t d, const Cell<T>& c, const T* h0, T* out, int64_t i0,
           int64_t i1) {
  const int64_t H = g.H, ld = g.D * g.H;
  if constexpr (std::is_same_v<T, float>) {
    const auto act = g.relu ? cpu::StepAct::kRelu : cpu::StepAct::kTanh;
    const bool on_team = run_on_team(
        g, c.panel,
        [&](const RowShare& rs) {
          walk_forward<float>(
              g, d, h0, out, i0, i1, rs.r0, rs.r1,
              [&](const float* a, int64_t lda, int64_t rows, float* z) {
                cpu::step_gemm(rows, H, H, a, lda, c.panel, z, ld, true, act);
              },
              [] {});
        },
        [&](const Share& sh) {
          walk_forward<float>(
              g, d, h0, out, i0, i1, 0, g.B,
              [&](const float* a, int64_t lda, int64_t rows, float* z) {
                cpu::step_gemm_blocks(sh.jb0, sh.jb1, rows, H, H, a, lda, c.panel, z, ld, true,
                                      act);
              },
              [] { barrier(); });
        });
    if (on_team) return;
  }
  walk_forward<T>(
      g, d, h0, out, i0, i1, 0, g.B,
      [&](const T* a, int64_t lda, int64_t rows, T* z) {
        step_forward<T>(g, c, a, lda, rows, z, ld);
      },
      [] {});
}

// W_hh of every (layer, direction) packed for the float32 step kernel (transposed for the
// forward step), or nothing where the kernel does not apply.
template <typename T>
std::vector<at::Tensor> step_panels(const Geometry& g, const std::vector<at::Tensor>& w,
                                    bool transpose) {
  std::vector<at::Tensor> panels;
  if constexpr (std::is_same_v<T, float>) {
    if (!cpu::step_kernel_available()) return panels;
    for (int64_t l = 0; l < g.L; ++l) {
      for (int64_t d = 0; d < g.D; ++d) {
        at::Tensor p = new_tensor({g.H, cpu::panel_width(g.H)}, at::kFloat);
        cpu::pack_panel(cell<T>(w, g, l, d).w_hh, g.H, g.H, g.H, transpose, p.data_ptr<float>());
        panels.push_back(p);
      }
    }
  }
  return panels;
}

template <typename T>
Cell<T> cell_with_panel(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& panels,
                        const Geometry& g, int64_t l, int64_t d) {
  Cell<T> c = cell<T>(w, g, l, d);
  if (!panels.empty()) c.panel = panels[l * g.D + d].data_ptr<T>();
  return c;
}

// Whether independent recurrences (directions, the layer wavefront) run as concurrent tasks.
// Off by default: on the 2-vCPU machines this project is measured on, two FMA-bound streams
// share one core's units, and the tasks measured no faster than running the recurrences one
// after the other with the large steps on multi-threaded BLAS (bench/NOTES.md).  On by setting
// RNN_EXT_CPU_TASK_PARALLEL=1 (the tests run it both ways).
bool task_parallel() {
  static const bool on = [] {
    const char* v = std::getenv("RNN_EXT_CPU_TASK_PARALLEL");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

// Runs f(0..n-1) concurrently on torch's threads (inline when n == 1, single-threaded, or task
// parallelism is off).
template <typename F>
void run_tasks(int64_t n, const F& f) {
  if (n <= 1 || at::get_num_threads() < 2 || !task_parallel()) {
    for (int64_t k = 0; k < n; ++k) f(k);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) f(k);
  });
}

// Chunks of time steps for the layer wavefront: `count` chunks of `len` steps (the last may be
// shorter).  A wave costs one parallel region, so chunks are kept at >= 4 steps.
struct Chunks {
  int64_t len = 1, count = 1;
  Chunks(const Geometry& g) {
    count = std::max<int64_t>(1, std::min<int64_t>(16, g.T / 4));
    len = (g.T + count - 1) / count;
    count = (g.T + len - 1) / len;
  }
  int64_t begin(int64_t c, int64_t T) const { return std::min(T, c * len); }
  int64_t end(int64_t c, int64_t T) const { return std::min(T, (c + 1) * len); }
};

bool use_wavefront(const Geometry& g) {
  return task_parallel() && at::get_num_threads() > 1 && g.D == 1 && g.L > 1 && g.T >= 8;
}

// rows [r0, r1) of dst = a * b (dropout), all (N, DH) contiguous
template <typename T>
void mul_rows(T* dst, const T* a, const T* b, int64_t r0, int64_t r1, int64_t cols) {
  for (int64_t i = r0 * cols; i < r1 * cols; ++i) dst[i] = a[i] * b[i];
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
  const int64_t DH = g.D * g.H, L = g.L, layer_elems = g.N * DH;
  const auto dt = input.scalar_type();
  const bool use_dropout = train && dropout > 0 && L > 1;
  const bool wave = use_wavefront(g);
  at::Tensor x = input.contiguous();
  at::Tensor h0 = hx.contiguous();
  at::Tensor output = g.packed ? new_tensor({g.N, DH}, dt) : new_tensor({g.T, g.B, DH}, dt);
  at::Tensor hy = new_tensor({L * g.D, g.B, g.H}, dt);
  at::Tensor ws = need_grad ? new_tensor({L - 1, g.N, DH}, dt) : new_tensor({0}, dt);

  // Where layers 0..L-2 write: the saved workspace, or scratch (two alternating slots when
  // layers run one after the other, one per layer in the wavefront).
  const int64_t slots = need_grad || wave ? L - 1 : std::min<int64_t>(L - 1, 2);
  at::Tensor inter = need_grad ? ws : new_tensor({slots, g.N, DH}, dt);
  std::vector<T*> outs(L);
  for (int64_t l = 0; l < L; ++l) {
    outs[l] = l == L - 1 ? output.data_ptr<T>()
                         : inter.data_ptr<T>() + (need_grad || wave ? l : l % 2) * layer_elems;
  }
  // Dropout noise, drawn up front in layer order: the same draws as torch's layer-by-layer
  // at::dropout, since nothing else draws in between.
  std::vector<at::Tensor> noise(use_dropout ? L - 1 : 0);
  at::Tensor dropped = use_dropout ? new_tensor({L - 1, g.N, DH}, dt) : at::Tensor();
  for (int64_t l = 0; l + 1 < L && use_dropout; ++l) {
    noise[l] = dropout_noise(inter.select(0, 0), dropout);  // (only its shape and options)
  }
  // layer l > 0 reads the dropped-out output of layer l-1
  auto dropped_of = [&](int64_t l) { return dropped.data_ptr<T>() + (l - 1) * layer_elems; };
  auto layer_in = [&](int64_t l) -> const T* {
    if (l == 0) return x.data_ptr<T>();
    return use_dropout ? dropped_of(l) : outs[l - 1];
  };
  auto h0_of = [&](int64_t l, int64_t d) { return h0.data_ptr<T>() + (l * g.D + d) * g.B * g.H; };
  const std::vector<at::Tensor> panels = step_panels<T>(g, w, /*transpose=*/true);
  auto out_of = [&](int64_t l, int64_t d) { return outs[l] + d * g.H; };
  // h_n of layer l, read from its output while that is still there: without grad, layer l + 2
  // overwrites layer l's scratch slot.
  auto gather_layer = [&](int64_t l) {
    for (int64_t d = 0; d < g.D; ++d) {
      gather_final<T>(g, d, out_of(l, d), h0_of(l, d),
                      hy.data_ptr<T>() + (l * g.D + d) * g.B * g.H);
    }
  };

  if (wave) {
    const Chunks ch(g);
    for (int64_t wv = 0; wv < ch.count + L - 1; ++wv) {
      const int64_t l_lo = std::max<int64_t>(0, wv - ch.count + 1), l_hi = std::min(L - 1, wv);
      run_tasks(l_hi - l_lo + 1, [&](int64_t k) {
        const int64_t l = l_lo + k, c = wv - l;
        const int64_t i0 = ch.begin(c, g.T), i1 = ch.end(c, g.T);
        const int64_t r0 = g.offset[i0], r1 = i1 < g.T ? g.offset[i1] : g.N;
        if (l > 0 && use_dropout) {
          mul_rows<T>(dropped_of(l), outs[l - 1], noise[l - 1].data_ptr<T>(), r0, r1, DH);
        }
        const auto cl = cell_with_panel<T>(w, panels, g, l, 0);
        project<T>(g, cl, layer_in(l), g.layer_input_size(l), out_of(l, 0), r0, r1);
        recur<T>(g, 0, cl, h0_of(l, 0), out_of(l, 0), i0, i1);
      });
    }
    for (int64_t l = 0; l < L; ++l) gather_layer(l);  // (one slot per layer here)
  } else {
    for (int64_t l = 0; l < L; ++l) {
      if (l > 0 && use_dropout) {
        mul_rows<T>(dropped_of(l), outs[l - 1], noise[l - 1].data_ptr<T>(), 0, g.N, DH);
      }
      for (int64_t d = 0; d < g.D; ++d) {
        project<T>(g, cell<T>(w, g, l, d), layer_in(l), g.layer_input_size(l), out_of(l, d), 0,
                   g.N);
      }
      run_tasks(g.D, [&](int64_t d) {
        recur<T>(g, d, cell_with_panel<T>(w, panels, g, l, d), h0_of(l, d), out_of(l, d), 0, g.T);
      });
      gather_layer(l);
    }
  }
  at::Tensor saved_noise = (need_grad && use_dropout) ? at::stack(noise) : new_tensor({0}, dt);
  return {output, hy, ws, saved_noise};
}

// The rows of a gradient w.r.t. a layer's output, as backward reads them: row r of step t
// (packed row offset o = g.offset[t]) at p + o * so + t * st + r * sb.  Contiguous (N, D*H)
// rows: so = sb = D*H, st = 0.  A dense (T, B, D*H) tensor with unit column stride, read where
// it lies (the gradient of a batch_first output is a transposed view; an expanded one has zero
// strides): so = 0, st and sb its strides.
template <typename T>
struct GradRows {
  const T* p;
  int64_t so, st, sb;
  const T* row(int64_t o, int64_t t, int64_t r) const { return p + o * so + t * st + r * sb; }
  GradRows columns_from(int64_t c) const { return {p + c, so, st, sb}; }
};

// Whether backward reads grad_output t where it lies (GradRows): dense (T, B, D*H), unit
// column stride.  Packed (N, D*H) data, and other layouts, are made contiguous.
bool reads_in_place(const at::Tensor& t) {
  return t.defined() && t.dim() == 3 && t.stride(2) == 1;
}

// The BPTT steps [i0, i1) of one direction (walked backwards), on the batch rows [r0, r1) and
// the columns [c0, c1) of dh and dz: per step dh += dy_t and dz_t = dh act'(h_t) on those rows
// and columns, then sync() (the column team's barrier: the product needs every column of
// dz_t), then product(o, lo, hi): rows [lo, hi) of dh_prev = dz_t W_hh, on the columns the
// caller owns (o: the step's first row).  A column-team member's elementwise part reads only
// the columns of dh its own product wrote, so one barrier per step suffices.
template <typename T, typename Sync, typename Product>
void walk_backward(const Geometry& g, int64_t d, const T* h_out, const GradRows<T>& dy, T* dz,
                   T* dh, int64_t i0, int64_t i1, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                   const Sync& sync, const Product& product) {
  const int64_t H = g.H, DH = g.D * g.H, cols = c1 - c0;
  for (int64_t i = i1 - 1; i >= i0; --i) {
    const int64_t t = step_at(g, d, i);
    const int64_t hi = std::min(r1, g.batch[t]);
    if (hi <= r0) continue;  // (column team: r0 = 0, the same on every member)
    const int64_t o = g.offset[t];
    if (cols > 0) {
      for (int64_t r = r0; r < hi; ++r) {  // dh += dy_t
        const T* src = dy.row(o, t, r) + c0;
        T* dst = dh + r * H + c0;
        for (int64_t j = 0; j < cols; ++j) dst[j] += src[j];
      }
      cpu::act_backward<T>(g.relu, dh + r0 * H + c0, H, h_out + (o + r0) * DH + c0, DH,
                           dz + (o + r0) * DH + c0, DH, hi - r0, cols);
    }
    sync();
    product(o, r0, hi);
  }
}

// BPTT of one direction of one layer over steps [i0, i1) (processing order; walked backwards).
// dy: gradient w.r.t. this direction's output columns; dh: (B, H), carried.
// dh_prev = dz W_hh overwrites the rows active at the step; rows past them keep their value
// (they have not started, or are done).
template <typename T>
void bptt(const Geometry& g, int64_t d, const Cell<T>& c, const T* h_out,
          const GradRows<T>& dy, T* dz, T* dh, int64_t i0, int64_t i1) {
  const int64_t H = g.H, DH = g.D * g.H;
  if constexpr (std::is_same_v<T, float>) {
    const bool on_team = run_on_team(
        g, c.panel,
        [&](const RowShare& rs) {
          walk_backward<float>(
              g, d, h_out, dy, dz, dh, i0, i1, rs.r0, rs.r1, 0, H, [] {},
              [&](int64_t o, int64_t lo, int64_t hi) {
                cpu::step_gemm(hi - lo, H, H, dz + (o + lo) * DH, DH, c.panel, dh + lo * H, H,
                               false, cpu::StepAct::kNone);
              });
        },
        [&](const Share& sh) {
          walk_backward<float>(
              g, d, h_out, dy, dz, dh, i0, i1, 0, g.B, sh.c0, sh.c1, [] { barrier(); },
              [&](int64_t o, int64_t lo, int64_t hi) {
                cpu::step_gemm_blocks(sh.jb0, sh.jb1, hi - lo, H, H, dz + (o + lo) * DH, DH,
                                      c.panel, dh + lo * H, H, false, cpu::StepAct::kNone);
              });
        });
    if (on_team) return;
  }
  walk_backward<T>(g, d, h_out, dy, dz, dh, i0, i1, 0, g.B, 0, H, [] {},
                   [&](int64_t o, int64_t lo, int64_t hi) {
    const int64_t rows = hi - lo;  // (lo = 0 here)
    if constexpr (std::is_same_v<T, float>) {
      if (c.panel != nullptr && !blas_step(rows, H)) {
        cpu::step_gemm(rows, H, H, dz + o * DH, DH, c.panel, dh, H, false, cpu::StepAct::kNone);
        return;
      }
    }
    gemm<T>(false, false, rows, H, H, T(1), dz + o * DH, DH, c.w_hh, H, T(0), dh, H);
  });
}

// dst[j] = sum over rows r of src[r * ld + j] (j < cols), accumulated in double: the bias
// gradients, without the dispatch of an at::sum per bias at small sizes.
template <typename T>
void column_sums(const T* src, int64_t rows, int64_t cols, int64_t ld, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    cpu::column_sums(src, rows, cols, ld, dst);  // the same sums, vectorised
  } else {
    std::vector<double> acc(cols, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = src + r * ld;
      for (int64_t j = 0; j < cols; ++j) acc[j] += static_cast<double>(row[j]);
    }
    for (int64_t j = 0; j < cols; ++j) dst[j] = static_cast<T>(acc[j]);
  }
}

// The rows of dW_hh = dZ^T H_prev for dense input, H_prev read in place (no gather): the H_prev
// of every step but the first processed is the output of the step processed before it, that of
// the first is h_0.  dz and out (this direction's columns) share the row stride ld, h0 is
// (B, H).  The whole batch (sample < 0), or one sample's rows (every B-th row).
template <typename T>
std::array<cpu::RowSpanT<T>, 2> prev_spans_dense(const Geometry& g, int64_t d, const T* dz,
                                                 const T* out, int64_t ld, const T* h0,
                                                 int64_t sample = -1) {
  const int64_t step = g.B * ld;  // one step's rows
  const int64_t row = sample < 0 ? 0 : sample;
  const int64_t rows = g.T == 0 ? 0 : sample < 0 ? g.B : 1;  // per step
  if (rows == 0) return {};  // (no pointer formed past the buffers)
  const int64_t stride = sample < 0 ? ld : step;
  const int64_t later = (g.T - 1) * rows;  // the rows of the steps after the first
  dz += row * ld;
  out += row * ld;
  h0 += row * g.H;
  // one step on from dz / out, formed only when there are later steps (T = 1: none)
  const int64_t next = later > 0 ? step : 0;
  if (d == 0) return {{{dz + next, stride, out, stride, later}, {dz, stride, h0, g.H, rows}}};
  return {{{dz, stride, out + next, stride, later},
           {dz + (g.T - 1) * step, stride, h0, g.H, rows}}};
}

// Where one direction of one layer finds the operands of its weight gradients: dz (N, *) rows
// with stride ld (this direction's columns), the layer's input x (N, in_size) contiguous, and
// H_prev: gathered into prev (N, H) contiguous (packed input), or (prev null: dense input)
// read in place from out (this direction's output columns, row stride ld) and h0 (B, H).
// kernel_ih / kernel_hh: the float32 products go through the outer-product kernel, else BLAS.
template <typename T>
struct WeightOperands {
  const T* dz;
  int64_t ld;
  const T* x;
  int64_t in_size;
  const T* prev;
  const T* out;
  const T* h0;
  bool kernel_ih, kernel_hh;
};

// The rows of dW_hh = dZ^T H_prev: with prev null (dense input) op's dz against H_prev read in
// place from op.out / op.h0, for the whole batch or sample `sample`'s rows; else the K rows z
// (stride ldz) against the rows prev (stride ldp).  Two spans (the second may be empty).
template <typename T>
std::array<cpu::RowSpanT<T>, 2> hh_spans(const Geometry& g, int64_t d, const WeightOperands<T>& op,
                                         const T* z, int64_t ldz, const T* prev, int64_t ldp,
                                         int64_t K, int64_t sample = -1) {
  if (prev == nullptr) return prev_spans_dense<T>(g, d, op.dz, op.out, op.ld, op.h0, sample);
  return {{{z, ldz, prev, ldp, K}, {}}};
}

// C (M x N, row stride ldc) = alpha * the sum over the rows of spans[0..n) of A_r^T B_r: the
// float32 outer-product kernel (csrc/cpu/wgrad_kernel.h) where `kernel` says, else one BLAS
// call per span.  threaded: the product may use torch's threads (the summed gradients); else
// it runs on the calling thread (inside the per-sample groups' parallel loop, BLAS is serial).
template <typename T>
void weight_product(const cpu::RowSpanT<T>* spans, int64_t n, int64_t M, int64_t N, T alpha,
                    T* C, int64_t ldc, bool kernel, bool threaded) {
  if constexpr (std::is_same_v<T, float>) {
    if (kernel) {
      cpu::outer_product(spans, n, M, N, C, ldc, threaded);
      if (alpha != T(1)) {
        for (int64_t i = 0; i < M; ++i) {
          for (int64_t j = 0; j < N; ++j) C[i * ldc + j] *= alpha;
        }
      }
      return;
    }
  }
  T beta = T(0);
  for (int64_t s = 0; s < n; ++s) {
    if (spans[s].rows == 0) continue;
    gemm<T>(true, false, M, N, spans[s].rows, alpha, spans[s].a, spans[s].lda, spans[s].b,
            spans[s].ldb, beta, C, ldc);
    beta = T(1);
  }
  if (beta == T(0)) {  // no rows
    for (int64_t i = 0; i < M; ++i) std::fill_n(C + i * ldc, N, T(0));
  }
}

template <typename T>
void add_to(T* acc, const T* src, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    cpu::add_to(acc, src, n);
  } else {
    for (int64_t e = 0; e < n; ++e) acc[e] += src[e];
  }
}

// Per-group weight and bias gradients of one direction of one layer (the per-sample
// gradients of DP training when every group is one sample).  Group k owns the batch rows
// [k*gs, (k+1)*gs); its gradients sum, over the steps t and its rows r active at t (packed row
// offset[t] + r), dz^T x (W_ih), dz^T h_prev (W_hh) and dz (biases): only its own rows, never
// another sample's steps or padding.  Writes the k-th (H, in_size), (H, H), (H) blocks of
// gw_ih, gw_hh, gb (the bias block when g.has_biases), each times `scale`.  sums (may be
// null): the summed gradients [W_ih (H, in_size), W_hh (H, H), bias (H) when g.has_biases]
// (unscaled; zero for an empty batch), formed from each group's blocks while they are in
// cache: each thread's chunk of groups accumulates its own partial sums, added in chunk order
// at the end (the same result for the same thread count).  Groups run in parallel on torch's
// threads.
template <typename T>
void group_weight_grads(const Geometry& g, int64_t d, int64_t groups, const WeightOperands<T>& op,
                        T* gw_ih, T* gw_hh, T* gb, T scale, const std::array<T*, 3>* sums) {
  // (groups == 0: an empty batch, no group to form; the sums below come out zero)
  const int64_t H = g.H, gs = groups > 0 ? g.B / groups : 0, in_size = op.in_size;
  const int64_t n_ih = H * in_size, n_hh = H * H, n_b = g.has_biases ? H : 0;
  const int64_t n_all = n_ih + n_hh + n_b;
  // Dense input, one sample per group: sample k's rows are k, k + B, k + 2B, ...: one strided
  // product per weight, nothing copied.
  const bool strided = !g.packed && gs == 1;
  TORCH_INTERNAL_ASSERT(op.prev != nullptr || strided || groups == 0);  // (gathered otherwise)
  std::vector<std::vector<T>> partial(sums != nullptr ? groups : 0);  // by chunk start
  at::parallel_for(0, groups, 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> zb, xb, pb;  // this thread's gathered rows of a group
    T* acc = nullptr;
    if (sums != nullptr) {
      partial[k0].assign(n_all, T(0));
      acc = partial[k0].data();
    }
    for (int64_t k = k0; k < k1; ++k) {
      T* o_ih = gw_ih + k * n_ih;
      T* o_hh = gw_hh + k * n_hh;
      const T *z, *xs, *ps;
      int64_t ldz, ldx, ldp, K;
      if (strided) {
        z = op.dz + k * op.ld; ldz = g.B * op.ld;
        xs = op.x + k * in_size; ldx = g.B * in_size;
        ps = nullptr; ldp = 0;  // H_prev read in place (prev_spans_dense)
        K = g.T;
      } else {
        const int64_t r0 = k * gs, r1 = r0 + gs;
        K = 0;
        for (int64_t t = 0; t < g.T; ++t) K += std::max<int64_t>(0, std::min(r1, g.batch[t]) - r0);
        zb.resize(K * H); xb.resize(K * in_size); pb.resize(K * H);
        int64_t q = 0;
        for (int64_t t = 0; t < g.T; ++t) {
          for (int64_t r = r0; r < std::min(r1, g.batch[t]); ++r, ++q) {
            const int64_t row = g.offset[t] + r;
            std::copy_n(op.dz + row * op.ld, H, zb.data() + q * H);
            std::copy_n(op.x + row * in_size, in_size, xb.data() + q * in_size);
            std::copy_n(op.prev + row * H, H, pb.data() + q * H);
          }
        }
        z = zb.data(); ldz = H; xs = xb.data(); ldx = in_size; ps = pb.data(); ldp = H;
      }
      const cpu::RowSpanT<T> ih{z, ldz, xs, ldx, K};
      weight_product<T>(&ih, 1, H, in_size, scale, o_ih, in_size, op.kernel_ih, false);
      const auto hh = hh_spans<T>(g, d, op, z, ldz, ps, ldp, K, k);
      weight_product<T>(hh.data(), 2, H, H, scale, o_hh, H, op.kernel_hh, false);
      T* o_b = g.has_biases ? gb + k * H : nullptr;
      if (o_b != nullptr) {
        column_sums<T>(z, K, H, ldz, o_b);
        if (scale != T(1)) {
          for (int64_t j = 0; j < H; ++j) o_b[j] *= scale;
        }
      }
      if (acc != nullptr) {
        add_to<T>(acc, o_ih, n_ih);
        add_to<T>(acc + n_ih, o_hh, n_hh);
        if (o_b != nullptr) add_to<T>(acc + n_ih + n_hh, o_b, n_b);
      }
    }
  });
  if (sums == nullptr) return;
  std::vector<const T*> parts;
  for (const auto& p : partial) {
    if (!p.empty()) parts.push_back(p.data());
  }
  const T inv = T(1) / scale;
  at::parallel_for(0, n_all, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      T v = T(0);
      for (const T* p : parts) v += p[e];
      v = scale == T(1) ? v : v * inv;
      if (e < n_ih) {
        (*sums)[0][e] = v;
      } else if (e < n_ih + n_hh) {
        (*sums)[1][e - n_ih] = v;
      } else {
        (*sums)[2][e - n_ih - n_hh] = v;
      }
    }
  });
}

template <typename T>
BackwardResult backward_impl(const Geometry& g, const at::Tensor& input, const at::Tensor& hx,
                             const std::vector<at::Tensor>& w, const at::Tensor& output,
                             const at::Tensor& ws, const at::Tensor& noise,
                             const at::Tensor& grad_output, const at::Tensor& grad_hy,
                             const std::array<bool, 3>& mask, int64_t groups = -1,
                             T scale = T(1), std::vector<at::Tensor>* summed = nullptr) {
  const int64_t H = g.H, DH = g.D * g.H, L = g.L, layer_elems = g.N * DH;
  const auto dt = input.scalar_type();
  const bool need_input = mask[0], need_hx = mask[1], need_w = mask[2];
  const bool has_noise = noise.numel() > 0;
  const bool wave = use_wavefront(g);
  const at::Tensor x = input.contiguous();
  const at::Tensor h0 = hx.contiguous();
  const at::Tensor out_c = output.contiguous();
  // grad_output: read in place where its rows have unit column stride (GradRows)
  const bool go_in_place = reads_in_place(grad_output);
  const at::Tensor go = !grad_output.defined() || go_in_place ? grad_output
                                                              : grad_output.contiguous();
  const T* noise_p = has_noise ? noise.data_ptr<T>() : nullptr;  // (L-1, N, DH), contiguous

  // Per layer: its output, its dZ (N, D*H), the gradient w.r.t. its output dY (N, D*H).
  std::vector<const T*> outs(L);
  std::vector<T*> dZ(L), dY(L);
  std::vector<GradRows<T>> dy_rows(L);
  at::Tensor dz_all = new_tensor({L, g.N, DH}, dt);
  at::Tensor dy_inner = new_tensor({L - 1, g.N, DH}, dt);
  at::Tensor dy_last;
  for (int64_t l = 0; l < L; ++l) {
    outs[l] = l == L - 1 ? out_c.data_ptr<T>() : ws.data_ptr<T>() + l * layer_elems;
    dZ[l] = dz_all.data_ptr<T>() + l * layer_elems;
    if (l < L - 1) {
      dY[l] = dy_inner.data_ptr<T>() + l * layer_elems;
      dy_rows[l] = {dY[l], DH, 0, DH};
    }
  }
  // the last layer's dY: grad_output, only read (bptt takes dy as const), or zeros
  if (go_in_place) {
    dy_rows[L - 1] = {go.data_ptr<T>(), 0, go.stride(0), go.stride(1)};
  } else if (go.defined()) {
    dy_rows[L - 1] = {go.data_ptr<T>(), DH, 0, DH};
  } else {
    dy_last = new_tensor({g.N, DH}, dt);
    std::fill_n(dy_last.data_ptr<T>(), layer_elems, T(0));
    dy_rows[L - 1] = {dy_last.data_ptr<T>(), DH, 0, DH};
  }
  // dh per (layer, direction), starting from grad_hy; ends as grad_hx.
  at::Tensor dh = new_tensor({L * g.D, g.B, H}, dt);
  if (grad_hy.defined()) {
    const at::Tensor ghy = grad_hy.contiguous();
    std::copy_n(ghy.data_ptr<T>(), dh.numel(), dh.data_ptr<T>());
  } else {
    std::fill_n(dh.data_ptr<T>(), dh.numel(), T(0));
  }
  auto dh_of = [&](int64_t l, int64_t d) { return dh.data_ptr<T>() + (l * g.D + d) * g.B * H; };
  // dY_l rows [r0, r1) = (sum_d dZ_{l+1,d} W_ih_{l+1,d}) * noise_l
  auto input_grad_rows = [&](int64_t l, int64_t r0, int64_t r1) {
    if (r1 <= r0) return;
    T* dst = dY[l] + r0 * DH;
    for (int64_t d = 0; d < g.D; ++d) {
      gemm<T>(false, false, r1 - r0, DH, H, T(1), dZ[l + 1] + r0 * DH + d * H, DH,
              cell<T>(w, g, l + 1, d).w_ih, DH, d == 0 ? T(0) : T(1), dst, DH);
    }
    if (has_noise) {
      mul_rows<T>(dY[l], dY[l], noise_p + l * layer_elems, r0, r1, DH);
    }
  };
  const std::vector<at::Tensor> panels = step_panels<T>(g, w, /*transpose=*/false);
  auto run_bptt = [&](int64_t l, int64_t d, int64_t i0, int64_t i1) {
    bptt<T>(g, d, cell_with_panel<T>(w, panels, g, l, d), outs[l] + d * H,
            dy_rows[l].columns_from(d * H), dZ[l] + d * H, dh_of(l, d), i0, i1);
  };

  if (wave) {
    // Mirror of the forward wavefront: layer L-1 walks chunks from the last; layer l follows
    // one chunk behind layer l+1, whose dZ rows it turns into its own dY rows.
    const Chunks ch(g);
    for (int64_t wv = 0; wv < ch.count + L - 1; ++wv) {
      const int64_t j_lo = std::max<int64_t>(0, wv - ch.count + 1), j_hi = std::min(L - 1, wv);
      run_tasks(j_hi - j_lo + 1, [&](int64_t k) {
        const int64_t l = L - 1 - (j_lo + k), c = ch.count - 1 - (wv - (j_lo + k));
        const int64_t i0 = ch.begin(c, g.T), i1 = ch.end(c, g.T);
        const int64_t r0 = g.offset[i0], r1 = i1 < g.T ? g.offset[i1] : g.N;
        if (l < L - 1) input_grad_rows(l, r0, r1);
        run_bptt(l, 0, i0, i1);
      });
    }
  } else {
    for (int64_t l = L - 1; l >= 0; --l) {
      if (l < L - 1) input_grad_rows(l, 0, g.N);
      run_tasks(g.D, [&](int64_t d) { run_bptt(l, d, 0, g.T); });
    }
  }

  // Weight and bias gradients: large GEMMs over all steps.
  std::vector<at::Tensor> grad_w;
  if (need_w) {
    grad_w.reserve(w.size());
    for (const auto& wi : w) {
      // groups >= 0: one gradient per group of batch rows, stacked on a leading dimension
      std::vector<int64_t> sizes(wi.sizes().begin(), wi.sizes().end());
      if (groups >= 0) sizes.insert(sizes.begin(), groups);
      grad_w.push_back(new_tensor(sizes, dt));
      if (summed != nullptr) summed->push_back(new_tensor(wi.sizes(), dt));
    }
    // H_prev gathered for packed input and groups of several rows; dense input reads it in
    // place
    const bool gather = g.packed || (groups >= 0 && groups != g.B);
    at::Tensor prev = gather ? new_tensor({g.N, H}, dt) : at::Tensor();
    at::Tensor dropped = has_noise ? new_tensor({g.N, DH}, dt) : at::Tensor();
    for (int64_t l = 0; l < L; ++l) {
      const T* layer_in = l == 0 ? x.data_ptr<T>() : outs[l - 1];
      if (l > 0 && has_noise) {  // what layer l read: layer l-1's output after dropout
        mul_rows<T>(dropped.data_ptr<T>(), outs[l - 1], noise_p + (l - 1) * layer_elems, 0, g.N,
                    DH);
        layer_in = dropped.data_ptr<T>();
      }
      const int64_t in_size = g.layer_input_size(l);
      for (int64_t d = 0; d < g.D; ++d) {
        const int64_t base = (l * g.D + d) * g.weights_per_cell();
        const T* dz = dZ[l] + d * H;
        const T* h0_ld = h0.data_ptr<T>() + (l * g.D + d) * g.B * H;
        WeightOperands<T> op{dz, DH, layer_in, in_size, nullptr, outs[l] + d * H, h0_ld,
                             false, false};
        if constexpr (std::is_same_v<T, float>) {
          // float32: the products through the outer-product kernel where it is the faster
          // (csrc/cpu/wgrad_kernel.h)
          op.kernel_ih = cpu::use_outer_sum(H, in_size);
          op.kernel_hh = cpu::use_outer_sum(H, H);
        }
        if (gather) {
          gather_prev<T>(g, d, outs[l] + d * H, h0_ld, prev.data_ptr<T>());
          op.prev = prev.data_ptr<T>();
        }
        if (groups >= 0) {
          std::array<T*, 3> sums{};
          if (summed != nullptr) {
            sums = {(*summed)[base].data_ptr<T>(), (*summed)[base + 1].data_ptr<T>(),
                    g.has_biases ? (*summed)[base + 2].data_ptr<T>() : nullptr};
          }
          group_weight_grads<T>(g, d, groups, op, grad_w[base].data_ptr<T>(),
                                grad_w[base + 1].data_ptr<T>(),
                                g.has_biases ? grad_w[base + 2].data_ptr<T>() : nullptr, scale,
                                summed != nullptr ? &sums : nullptr);
          if (g.has_biases) {
            std::copy_n(grad_w[base + 2].data_ptr<T>(), groups * H,
                        grad_w[base + 3].data_ptr<T>());
            if (summed != nullptr) {
              std::copy_n(sums[2], H, (*summed)[base + 3].data_ptr<T>());
            }
          }
          continue;
        }
        // dW_ih = dZ^T X ; dW_hh = dZ^T H_prev ; db = column sums of dZ
        const cpu::RowSpanT<T> ih{dz, DH, layer_in, in_size, g.N};
        weight_product<T>(&ih, 1, H, in_size, T(1), grad_w[base].data_ptr<T>(), in_size,
                          op.kernel_ih, true);
        const auto hh = hh_spans<T>(g, d, op, dz, DH, op.prev, H, g.N);
        weight_product<T>(hh.data(), 2, H, H, T(1), grad_w[base + 1].data_ptr<T>(), H,
                          op.kernel_hh, true);
        if (g.has_biases) {
          column_sums<T>(dz, g.N, H, DH, grad_w[base + 2].data_ptr<T>());
          std::copy_n(grad_w[base + 2].data_ptr<T>(), H, grad_w[base + 3].data_ptr<T>());
        }
      }
    }
  }
  at::Tensor grad_input = new_tensor({0}, dt);
  if (need_input) {
    grad_input = new_tensor(input.sizes(), dt);  // (T, B, I) or (N, I): N x I rows either way
    for (int64_t d = 0; d < g.D; ++d) {
      gemm<T>(false, false, g.N, g.I, H, T(1), dZ[0] + d * H, DH, cell<T>(w, g, 0, d).w_ih, g.I,
              d == 0 ? T(0) : T(1), grad_input.data_ptr<T>(), g.I);
    }
  }
  at::Tensor grad_hx = need_hx ? dh : new_tensor({0}, dt);
  return {grad_input, grad_hx, grad_w};
}

// ---- Forward-mode AD (jvp) ----
//
// The tangent of h_t = act(z_t), z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh, is itself a
// linear recurrence with the forward's step:
//   dh_t = act'(z_t) * (dx_t W_ih^T + x_t dW_ih^T + db_ih + db_hh + h_{t-1} dW_hh^T
//                       + dh_{t-1} W_hh^T)
// Everything but the last product is known for all steps up front (the forward's outputs are
// saved), so per layer and direction it is a few large GEMMs for the input side of every step,
// then the recurrence of the forward with act' (from the saved h_t) in place of act.

// rows x columns [c0, c1) of dz (row stride ld) times act'(z), read from h = act(z) with the same
// layout: tanh: 1 - h^2; relu: 0 where h <= 0 (NaN passes, as torch's relu jvp).
template <typename T>
void mul_act_derivative(bool relu, const T* h, T* dz, int64_t rows, int64_t c0, int64_t c1,
                        int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* hr = h + r * ld;
    T* zr = dz + r * ld;
    if (relu) {
      for (int64_t j = c0; j < c1; ++j) zr[j] = hr[j] <= T(0) ? T(0) : zr[j];
    } else {
      for (int64_t j = c0; j < c1; ++j) zr[j] *= T(1) - hr[j] * hr[j];
    }
  }
}

// The tangent recurrence of one direction of one layer, on the forward's walk (packed
// continuation, teams): tan holds the input-side tangent of every step and ends as the
// tangent of the direction's output (same layout as h_out, the saved output); dh0: (B, H).
template <typename T>
void recur_tangent(const Geometry& g, int64_t d, const Cell<T>& c, const T* h_out, const T* dh0,
                   T* tan) {
  const int64_t H = g.H, ld = g.D * g.H;
  auto h_of = [&](const T* z) { return h_out + (z - tan); };  // the saved h_t of z's rows
  if constexpr (std::is_same_v<T, float>) {
    const bool on_team = run_on_team(
        g, c.panel,
        [&](const RowShare& rs) {
          walk_forward<float>(
              g, d, dh0, tan, 0, g.T, rs.r0, rs.r1,
              [&](const float* a, int64_t lda, int64_t rows, float* z) {
                if (rows == 0) return;
                cpu::step_gemm(rows, H, H, a, lda, c.panel, z, ld, true, cpu::StepAct::kNone);
                mul_act_derivative<float>(g.relu, h_of(z), z, rows, 0, H, ld);
              },
              [] {});
        },
        [&](const Share& sh) {
          walk_forward<float>(
              g, d, dh0, tan, 0, g.T, 0, g.B,
              [&](const float* a, int64_t lda, int64_t rows, float* z) {
                if (rows == 0) return;
                cpu::step_gemm_blocks(sh.jb0, sh.jb1, rows, H, H, a, lda, c.panel, z, ld, true,
                                      cpu::StepAct::kNone);
                mul_act_derivative<float>(g.relu, h_of(z), z, rows, sh.c0, sh.c1, ld);
              },
              [] { barrier(); });
        });
    if (on_team) return;
  }
  walk_forward<T>(
      g, d, dh0, tan, 0, g.T, 0, g.B,
      [&](const T* a, int64_t lda, int64_t rows, T* z) {
        if (rows == 0) return;
        bool done = false;
        if constexpr (std::is_same_v<T, float>) {
          if (c.panel != nullptr && !blas_step(rows, H)) {
            cpu::step_gemm(rows, H, H, a, lda, c.panel, z, ld, true, cpu::StepAct::kNone);
            done = true;
          }
        }
        if (!done) gemm<T>(false, true, rows, H, H, T(1), a, lda, c.w_hh, H, T(1), z, ld);
        mul_act_derivative<T>(g.relu, h_of(z), z, rows, 0, H, ld);
      },
      [] {});
}

// w_t: the weights' tangents (undefined: zero), in the compute dtype, contiguous.
template <typename T>
JvpResult jvp_impl(const Geometry& g, const at::Tensor& input, const at::Tensor& hx,
                   const std::vector<at::Tensor>& w, const at::Tensor& output,
                   const at::Tensor& ws, const at::Tensor& noise, const at::Tensor& input_t,
                   const at::Tensor& hx_t, const std::vector<at::Tensor>& w_t) {
  const int64_t H = g.H, DH = g.D * g.H, L = g.L, layer_elems = g.N * DH;
  const auto dt = input.scalar_type();
  const bool has_noise = noise.numel() > 0;
  const at::Tensor x = input.contiguous();
  const at::Tensor h0 = hx.contiguous();
  const at::Tensor out_c = output.contiguous();
  const at::Tensor x_t = input_t.defined() ? input_t.contiguous() : at::Tensor();
  at::Tensor dh0;
  if (hx_t.defined()) {
    dh0 = hx_t.contiguous();
  } else {
    dh0 = new_tensor({L * g.D, g.B, H}, dt);
    std::fill_n(dh0.data_ptr<T>(), dh0.numel(), T(0));
  }
  const T* noise_p = has_noise ? noise.data_ptr<T>() : nullptr;  // (L-1, N, DH)

  at::Tensor out_t = g.packed ? new_tensor({g.N, DH}, dt) : new_tensor({g.T, g.B, DH}, dt);
  at::Tensor hy_t = new_tensor({L * g.D, g.B, H}, dt);
  // tangents of layers 0..L-2 (only the previous layer's is read: two alternating slots)
  at::Tensor inner_t = new_tensor({std::min<int64_t>(L - 1, 2), g.N, DH}, dt);
  std::vector<const T*> outs(L);
  std::vector<T*> tans(L);
  for (int64_t l = 0; l < L; ++l) {
    outs[l] = l == L - 1 ? out_c.data_ptr<T>() : ws.data_ptr<T>() + l * layer_elems;
    tans[l] = l == L - 1 ? out_t.data_ptr<T>() : inner_t.data_ptr<T>() + (l % 2) * layer_elems;
  }
  at::Tensor dropped = has_noise ? new_tensor({2, g.N, DH}, dt) : at::Tensor();
  at::Tensor prev = new_tensor({g.N, H}, dt);
  const std::vector<at::Tensor> panels = step_panels<T>(g, w, /*transpose=*/true);
  auto tangent_of = [&](int64_t i) -> const T* {
    return w_t[i].defined() ? w_t[i].data_ptr<T>() : nullptr;
  };

  for (int64_t l = 0; l < L; ++l) {
    // what layer l reads, and its tangent (layer l-1's, after the same dropout mask)
    const T* xin = x.data_ptr<T>();
    const T* xin_t = x_t.defined() ? x_t.data_ptr<T>() : nullptr;
    if (l > 0) {
      xin = outs[l - 1];
      xin_t = tans[l - 1];
      if (has_noise) {
        T* dx = dropped.data_ptr<T>();
        T* dx_t = dx + layer_elems;
        mul_rows<T>(dx, outs[l - 1], noise_p + (l - 1) * layer_elems, 0, g.N, DH);
        mul_rows<T>(dx_t, tans[l - 1], noise_p + (l - 1) * layer_elems, 0, g.N, DH);
        xin = dx;
        xin_t = dx_t;
      }
    }
    const int64_t in_size = g.layer_input_size(l);
    for (int64_t d = 0; d < g.D; ++d) {
      const int64_t base = (l * g.D + d) * g.weights_per_cell();
      const Cell<T> c = cell_with_panel<T>(w, panels, g, l, d);
      T* tan = tans[l] + d * H;
      const T* dh0_ld = dh0.data_ptr<T>() + (l * g.D + d) * g.B * H;
      // the input side of every step: db_ih + db_hh + dx W_ih^T + x dW_ih^T + h_prev dW_hh^T
      const T* db_ih = g.has_biases ? tangent_of(base + 2) : nullptr;
      const T* db_hh = g.has_biases ? tangent_of(base + 3) : nullptr;
      T beta = T(0);
      if (db_ih != nullptr || db_hh != nullptr) {
        for (int64_t r = 0; r < g.N; ++r) {
          T* row = tan + r * DH;
          for (int64_t j = 0; j < H; ++j) {
            row[j] = (db_ih != nullptr ? db_ih[j] : T(0)) + (db_hh != nullptr ? db_hh[j] : T(0));
          }
        }
        beta = T(1);
      }
      if (g.N > 0) {
        if (xin_t != nullptr) {
          gemm<T>(false, true, g.N, H, in_size, T(1), xin_t, in_size, c.w_ih, in_size, beta, tan,
                  DH);
          beta = T(1);
        }
        if (const T* dw_ih = tangent_of(base)) {
          gemm<T>(false, true, g.N, H, in_size, T(1), xin, in_size, dw_ih, in_size, beta, tan, DH);
          beta = T(1);
        }
        if (const T* dw_hh = tangent_of(base + 1)) {
          gather_prev<T>(g, d, outs[l] + d * H, h0.data_ptr<T>() + (l * g.D + d) * g.B * H,
                         prev.data_ptr<T>());
          gemm<T>(false, true, g.N, H, H, T(1), prev.data_ptr<T>(), H, dw_hh, H, beta, tan, DH);
          beta = T(1);
        }
      }
      if (beta == T(0)) {  // no input-side tangent at all
        for (int64_t r = 0; r < g.N; ++r) std::fill_n(tan + r * DH, H, T(0));
      }
      recur_tangent<T>(g, d, c, outs[l] + d * H, dh0_ld, tan);
      gather_final<T>(g, d, tan, dh0_ld, hy_t.data_ptr<T>() + (l * g.D + d) * g.B * H);
    }
  }
  return {out_t, hy_t};
}

bool is_reduced(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// t in dtype dt, contiguous; t itself (no dispatch) when it already is.
at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) {
  if (t.scalar_type() == dt && t.is_contiguous()) return t;
  return t.to(dt).contiguous();
}

std::vector<at::Tensor> as_dtype(at::TensorList ts, at::ScalarType dt) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(as_dtype(t, dt));
  return out;
}

at::Tensor opt_to(const std::optional<at::Tensor>& t, at::ScalarType dt) {
  return t.has_value() && t->defined() ? as_dtype(*t, dt) : at::Tensor();
}

// grad_output in dtype dt: where backward reads it in place, as it is (no copy); else as
// as_dtype makes it.
at::Tensor grad_output_as(const std::optional<at::Tensor>& t, at::ScalarType dt) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->scalar_type() == dt && reads_in_place(*t) ? *t : as_dtype(*t, dt);
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
  check_dropout(dropout, train, num_layers);
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

namespace {
// rnn_backward_cpu (groups == kSummedGradients: summed weight gradients) and
// rnn_backward_per_sample_cpu (groups checked >= 0; summed: also the summed gradients).
BackwardResult backward_cpu(const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                            const std::optional<at::Tensor>& batch_sizes,
                            const at::Tensor& output, const at::Tensor& workspace,
                            const at::Tensor& noise, const std::optional<at::Tensor>& grad_output,
                            const std::optional<at::Tensor>& grad_hy, bool has_biases,
                            int64_t num_layers, bool bidirectional, bool relu,
                            std::array<bool, 3> output_mask, int64_t groups, double scale = 1.0,
                            std::vector<at::Tensor>* summed = nullptr) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Geometry g =
      geometry(input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu);
  check_backward_args(g, hx, output, workspace, noise, grad_output, grad_hy);
  if (groups != kSummedGradients) check_groups(g, groups);
  const auto dt = input.scalar_type();
  const auto ct = is_reduced(dt) ? at::kFloat : dt;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    return backward_impl<T>(g, as_dtype(input, ct), as_dtype(hx, ct), as_dtype(weights, ct),
                            as_dtype(output, ct), as_dtype(workspace, ct), as_dtype(noise, ct),
                            grad_output_as(grad_output, ct), opt_to(grad_hy, ct), output_mask,
                            groups,
                            static_cast<T>(scale), summed);
  };
  BackwardResult r = ct == at::kDouble ? run(double{}) : run(float{});
  if (ct != dt) {
    auto& [gi, ghx, gw] = r;
    gi = gi.to(dt);
    ghx = ghx.to(dt);
    for (size_t i = 0; i < gw.size(); ++i) gw[i] = gw[i].to(weights[i].scalar_type());
    if (summed != nullptr) {
      for (size_t i = 0; i < summed->size(); ++i) {
        (*summed)[i] = (*summed)[i].to(weights[i].scalar_type());
      }
    }
  }
  return r;
}
}  // namespace

BackwardResult rnn_backward_cpu(const at::Tensor& input, const at::Tensor& hx,
                                at::TensorList weights,
                                const std::optional<at::Tensor>& batch_sizes,
                                const at::Tensor& output, const at::Tensor& workspace,
                                const at::Tensor& noise,
                                const std::optional<at::Tensor>& grad_output,
                                const std::optional<at::Tensor>& grad_hy, bool has_biases,
                                int64_t num_layers, bool bidirectional, bool relu,
                                std::array<bool, 3> output_mask) {
  return backward_cpu(input, hx, weights, batch_sizes, output, workspace, noise, grad_output,
                      grad_hy, has_biases, num_layers, bidirectional, relu, output_mask,
                      kSummedGradients);
}

PerSampleResult rnn_backward_per_sample_cpu(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& output,
    const at::Tensor& workspace, const at::Tensor& noise,
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_hy,
    bool has_biases, int64_t num_layers, bool bidirectional, bool relu,
    std::array<bool, 3> output_mask, int64_t groups, double scale) {
  check_per_sample_scale(scale);
  std::vector<at::Tensor> summed;
  auto [gi, ghx, gw] =
      backward_cpu(input, hx, weights, batch_sizes, output, workspace, noise, grad_output,
                   grad_hy, has_biases, num_layers, bidirectional, relu,
                   {output_mask[0], output_mask[1], true}, groups, scale,
                   output_mask[2] ? &summed : nullptr);
  return {gi, ghx, gw, summed};
}

JvpResult rnn_jvp_cpu(const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                      const std::optional<at::Tensor>& batch_sizes, const at::Tensor& output,
                      const at::Tensor& workspace, const at::Tensor& noise,
                      const std::optional<at::Tensor>& input_t,
                      const std::optional<at::Tensor>& hx_t,
                      const c10::List<std::optional<at::Tensor>>& weights_t, bool has_biases,
                      int64_t num_layers, bool bidirectional, bool relu) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Geometry g =
      geometry(input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu);
  check_backward_args(g, hx, output, workspace, noise, std::nullopt, std::nullopt);
  check_jvp_args(input, hx, weights, input_t, hx_t, weights_t);
  const auto dt = input.scalar_type();
  const auto ct = is_reduced(dt) ? at::kFloat : dt;  // float16 / bfloat16: in float32
  std::vector<at::Tensor> w_t;
  for (size_t i = 0; i < weights_t.size(); ++i) {
    const std::optional<at::Tensor> t = weights_t.get(i);
    w_t.push_back(t.has_value() && t->defined() ? as_dtype(*t, ct) : at::Tensor());
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    return jvp_impl<T>(g, as_dtype(input, ct), as_dtype(hx, ct), as_dtype(weights, ct),
                       as_dtype(output, ct), as_dtype(workspace, ct), as_dtype(noise, ct),
                       opt_to(input_t, ct), opt_to(hx_t, ct), w_t);
  };
  JvpResult r = ct == at::kDouble ? run(double{}) : run(float{});
  if (ct != dt) r = {std::get<0>(r).to(dt), std::get<1>(r).to(dt)};
  return r;
}

}  // namespace rnn_ext
