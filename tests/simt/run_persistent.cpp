// Runs one launch of the persistent kernels (csrc/cuda/rnn_persistent_device.cuh) under the
// host-thread emulation (simt_emulation.h), for tests/test_cuda_emulated.py.
//
//   run_persistent DIR
//
// DIR/spec.txt, one item per line:
//   kind forward|backward          dtype float|half|bfloat16        mma 0|1
//   T <steps>  B <rows>  H <hidden>  relu 0|1  ld <row stride>   (ld: backward only)
//   buffer NAME SIZE     a storage-dtype buffer, initialised from DIR/NAME.f64 (float64)
//   acc NAME SIZE        a float32 buffer (the backward's dh), from DIR/NAME.f64
//   blocks N             launch only the first N blocks (default: all); with the other blocks'
//                        columns of what they would have written prefilled, one block can run
//                        a wide layer on few host threads
//   row_groups R rows P  P5: each cell's column blocks R times, group g computing rows
//                        [g P, min(B, (g + 1) P)) (default: one group of all rows)
//   cell key=value ...   one cell; pointers are NAME or NAME+OFFSET (elements), "-" = null
//     forward:  w_ih b_ih x K_in ld_x w_hh b_hh h0 out ld hn reverse delay
//     backward: wt_hh h dy dz dh reverse
// The launch is what the launchers in rnn_persistent.cu would enqueue: cells * ceil(H / 8)
// blocks of 256 threads, the variant's shared memory, warps_per_group(B), T + the largest delay
// super-steps.  Every buffer is written back to DIR/NAME.out.f64 (driver_io.h).
#include "cuda/rnn_persistent_device.cuh"
#include "driver_io.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

using namespace rnn_ext::gpu;
using namespace rnn_ext::gpu::persistent_detail;

namespace {

using Cell = std::map<std::string, std::string>;

std::string get(const Cell& c, const char* k, const char* dflt) {
  auto it = c.find(k);
  return it == c.end() ? std::string(dflt) : it->second;
}

template <typename T>
void run(const std::string& dir, const std::vector<std::vector<std::string>>& spec) {
  simt_io::Buffers<T, float> bufs;
  std::map<std::string, std::string> kv;
  std::vector<Cell> cells;
  for (const auto& l : spec) {
    if (l[0] == "buffer" || l[0] == "acc") {
      bufs.load(dir, l.at(1), std::stoull(l.at(2)), l[0] == "acc");
    } else if (l[0] == "cell") {
      Cell c;
      for (size_t i = 1; i < l.size(); ++i) {
        const auto eq = l[i].find('=');
        c[l[i].substr(0, eq)] = l[i].substr(eq + 1);
      }
      cells.push_back(c);
    } else {
      kv[l[0]] = l.at(1);
    }
  }
  const int64_t T_ = std::stoll(kv["T"]), B = std::stoll(kv["B"]), H = std::stoll(kv["H"]);
  const bool relu = kv["relu"] == "1", mma = kv["mma"] == "1";
  const bool narrow = kv.count("narrow") != 0 && kv["narrow"] == "1";  // narrow_a_loads
  const bool grouped = kv.count("grouped") != 0 && kv["grouped"] == "1";  // grouped_a_loads
  const int R = kv.count("row_groups") ? std::stoi(kv["row_groups"]) : 1;
  const int64_t rows = R > 1 ? std::stoll(kv.at("rows")) : B;
  const int bpc = static_cast<int>((H + kCols - 1) / kCols) * R;
  const int64_t all = static_cast<int64_t>(cells.size()) * bpc;
  const unsigned grid = static_cast<unsigned>(
      kv.count("blocks") ? std::min<int64_t>(all, std::stoll(kv["blocks"])) : all);
  auto P = [&](const Cell& c, const char* k) { return bufs.ptr(get(c, k, "-")); };
  if (kv["kind"] == "forward") {
    ForwardParams p{};
    p.a.cells = static_cast<int>(cells.size());
    p.a.T = T_;
    p.a.B = B;
    p.a.H = H;
    p.a.relu = relu;
    int64_t K_in = 0, max_delay = 0;
    for (size_t k = 0; k < cells.size(); ++k) {
      const Cell& c = cells[k];
      PersistentCell& pc = p.a.cell[k];
      pc.w_ih = P(c, "w_ih");
      pc.b_ih = P(c, "b_ih");
      pc.x = P(c, "x");
      pc.K_in = std::stoll(get(c, "K_in", "0"));
      pc.ld_x = std::stoll(get(c, "ld_x", "0"));
      pc.w_hh = P(c, "w_hh");
      pc.b_hh = P(c, "b_hh");
      pc.h0 = P(c, "h0");
      pc.out = P(c, "out");
      pc.ld = std::stoll(get(c, "ld", "0"));
      pc.hn = P(c, "hn");
      pc.reverse = get(c, "reverse", "0") == "1";
      pc.delay = std::stoi(get(c, "delay", "0"));
      if (pc.w_ih != nullptr) K_in = std::max(K_in, pc.K_in);
      max_delay = std::max<int64_t>(max_delay, pc.delay);
    }
    p.blocks_per_cell = bpc;
    p.wk = warps_per_group(rows);
    p.supersteps = T_ + max_delay;
    p.row_groups = R;
    p.rows_per_group = R > 1 ? rows : INT64_MAX;
    const size_t smem = mma ? static_cast<size_t>(kWarps) * kMmaRows * kCols * 4
                            : static_cast<size_t>(kCols) * (K_in + H) * sizeof(T) + kWarps * 32 * 4;
    simt::launch(grid, kThreads, smem, [&] {
      if (R > 1) {  // P5's kernels (no narrow variant)
        if (mma) {
          persistent_forward_kernel<T, true, 0, true>(p);
        } else {
          persistent_forward_kernel<T, false, 0, true>(p);
        }
      } else if (mma && narrow) {
        persistent_forward_kernel<T, true, 1>(p);
      } else if (mma && grouped) {
        persistent_forward_kernel<T, true, 2>(p);
      } else if (mma) {
        persistent_forward_kernel<T, true>(p);
      } else {
        persistent_forward_kernel<T, false>(p);
      }
    });
  } else {
    BackwardParams p{};
    p.a.cells = static_cast<int>(cells.size());
    p.a.T = T_;
    p.a.B = B;
    p.a.H = H;
    p.a.ld = std::stoll(kv["ld"]);
    p.a.relu = relu;
    for (size_t k = 0; k < cells.size(); ++k) {
      const Cell& c = cells[k];
      PersistentBackwardCell& pc = p.a.cell[k];
      pc.wt_hh = P(c, "wt_hh");
      pc.h = P(c, "h");
      pc.dy = P(c, "dy");
      pc.dz = P(c, "dz");
      pc.dh = static_cast<float*>(P(c, "dh"));
      pc.reverse = get(c, "reverse", "0") == "1";
    }
    p.blocks_per_cell = bpc;
    p.wk = warps_per_group(rows);
    p.row_groups = R;
    p.rows_per_group = R > 1 ? rows : INT64_MAX;
    const size_t smem = mma ? static_cast<size_t>(kWarps) * kMmaRows * kCols * 4
                            : static_cast<size_t>(kCols) * H * sizeof(T) + kWarps * 32 * 4;
    simt::launch(grid, kThreads, smem, [&] {
      if (R > 1) {
        if (mma) {
          persistent_backward_kernel<T, true, 0, true>(p);
        } else {
          persistent_backward_kernel<T, false, 0, true>(p);
        }
      } else if (mma && narrow) {
        persistent_backward_kernel<T, true, 1>(p);
      } else if (mma && grouped) {
        persistent_backward_kernel<T, true, 2>(p);
      } else if (mma) {
        persistent_backward_kernel<T, true>(p);
      } else {
        persistent_backward_kernel<T, false>(p);
      }
    });
  }
  bufs.write_back(dir);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: run_persistent DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  try {
    const auto spec = simt_io::read_spec(dir);
    std::string dtype;
    for (const auto& l : spec) {
      if (l[0] == "dtype") dtype = l.at(1);
    }
    if (dtype == "float") {
      run<float>(dir, spec);
    } else if (dtype == "half") {
      run<__half>(dir, spec);
    } else if (dtype == "bfloat16") {
      run<__nv_bfloat16>(dir, spec);
    } else {
      throw std::runtime_error("unknown dtype " + dtype);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
