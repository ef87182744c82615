// Runs one launch of the persistent kernels (csrc/cuda/rnn_persistent_device.cuh) under the
// host-thread emulation (simt_emulation.h), for tests/test_cuda_emulated.py.
//
//   run_persistent DIR
//
// DIR/spec.txt, one item per line:
//   kind forward|backward          dtype float|half|bfloat16        mma 0|1
//   T <steps>  B <rows>  H <hidden>  relu 0|1  ld <row stride>   (ld: backward only)
//   buffer NAME SIZE     a storage-dtype buffer, initialised from DIR/NAME.f32 (float32)
//   acc NAME SIZE        a float32 buffer (the backward's dh), from DIR/NAME.f32
//   blocks N             launch only the first N blocks (default: all); with the other blocks'
//                        columns of what they would have written prefilled, one block can run
//                        a wide layer on few host threads
//   cell key=value ...   one cell; pointers are NAME or NAME+OFFSET (elements), "-" = null
//     forward:  w_ih b_ih x K_in ld_x w_hh b_hh h0 out ld hn reverse delay
//     backward: wt_hh h dy dz dh reverse
// The launch is what the launchers in rnn_persistent.cu would enqueue: cells * ceil(H / 8)
// blocks of 256 threads, the variant's shared memory, warps_per_group(B), T + the largest delay
// super-steps.  Every buffer is written back to DIR/NAME.out.f32 (float32).
#include "cuda/rnn_persistent_device.cuh"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using namespace rnn_ext::gpu;
using namespace rnn_ext::gpu::persistent_detail;

namespace {

struct Buffers {
  std::map<std::string, std::vector<unsigned char>> data;  // raw storage
  std::map<std::string, int> elem;                          // bytes per element
  std::map<std::string, size_t> size;
};

std::vector<float> read_f32(const std::string& path, size_t n) {
  std::vector<float> v(n);
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * 4));
  if (static_cast<size_t>(f.gcount()) != n * 4) throw std::runtime_error("short " + path);
  return v;
}

template <typename T>
T from_f32(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}
template <typename T>
float to_f32(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
void* resolve(Buffers& bufs, const std::string& ref) {
  if (ref == "-") return nullptr;
  const auto plus = ref.find('+');
  const std::string name = ref.substr(0, plus);
  const size_t off = plus == std::string::npos ? 0 : std::stoull(ref.substr(plus + 1));
  auto it = bufs.data.find(name);
  if (it == bufs.data.end()) throw std::runtime_error("no buffer " + name);
  return it->second.data() + off * bufs.elem[name];
}

unsigned grid_of(std::map<std::string, std::string>& kv, int64_t all) {
  auto it = kv.find("blocks");
  const int64_t n = it == kv.end() ? all : std::min<int64_t>(all, std::stoll(it->second));
  return static_cast<unsigned>(n);
}

template <typename T>
int run(const std::string& dir, std::map<std::string, std::string>& kv,
        std::vector<std::pair<std::string, std::pair<bool, size_t>>>& decl,
        std::vector<std::map<std::string, std::string>>& cells) {
  Buffers bufs;
  for (auto& [name, spec] : decl) {
    const bool acc = spec.first;
    const size_t n = spec.second;
    const std::vector<float> init = read_f32(dir + "/" + name + ".f32", n);
    const int es = acc ? 4 : static_cast<int>(sizeof(T));
    auto& raw = bufs.data[name];
    raw.resize(n * es + 16);
    // keep the 16-byte alignment the launchers require
    bufs.elem[name] = es;
    bufs.size[name] = n;
    for (size_t i = 0; i < n; ++i) {
      if (acc) {
        std::memcpy(raw.data() + i * 4, &init[i], 4);
      } else {
        const T v = from_f32<T>(init[i]);
        std::memcpy(raw.data() + i * es, &v, es);
      }
    }
  }
  const int64_t T_ = std::stoll(kv["T"]), B = std::stoll(kv["B"]), H = std::stoll(kv["H"]);
  const bool relu = kv["relu"] == "1", mma = kv["mma"] == "1";
  const int bpc = static_cast<int>((H + kCols - 1) / kCols);
  auto get = [](std::map<std::string, std::string>& c, const char* k, const char* dflt) {
    auto it = c.find(k);
    return it == c.end() ? std::string(dflt) : it->second;
  };
  if (kv["kind"] == "forward") {
    ForwardParams p{};
    p.a.cells = static_cast<int>(cells.size());
    p.a.T = T_;
    p.a.B = B;
    p.a.H = H;
    p.a.relu = relu;
    int64_t K_in = 0, max_delay = 0;
    for (size_t k = 0; k < cells.size(); ++k) {
      auto& c = cells[k];
      PersistentCell& pc = p.a.cell[k];
      pc.w_ih = resolve<T>(bufs, get(c, "w_ih", "-"));
      pc.b_ih = resolve<T>(bufs, get(c, "b_ih", "-"));
      pc.x = resolve<T>(bufs, get(c, "x", "-"));
      pc.K_in = std::stoll(get(c, "K_in", "0"));
      pc.ld_x = std::stoll(get(c, "ld_x", "0"));
      pc.w_hh = resolve<T>(bufs, get(c, "w_hh", "-"));
      pc.b_hh = resolve<T>(bufs, get(c, "b_hh", "-"));
      pc.h0 = resolve<T>(bufs, get(c, "h0", "-"));
      pc.out = resolve<T>(bufs, get(c, "out", "-"));
      pc.ld = std::stoll(get(c, "ld", "0"));
      pc.hn = resolve<T>(bufs, get(c, "hn", "-"));
      pc.reverse = get(c, "reverse", "0") == "1";
      pc.delay = std::stoi(get(c, "delay", "0"));
      if (pc.w_ih != nullptr) K_in = std::max(K_in, pc.K_in);
      max_delay = std::max<int64_t>(max_delay, pc.delay);
    }
    p.blocks_per_cell = bpc;
    p.wk = warps_per_group(B);
    p.supersteps = T_ + max_delay;
    const size_t smem = mma ? static_cast<size_t>(kWarps) * kMmaRows * kCols * 4
                            : static_cast<size_t>(kCols) * (K_in + H) * sizeof(T) + kWarps * 32 * 4;
    simt::launch(grid_of(kv, p.a.cells * bpc), kThreads, smem, [&] {
      if (mma) {
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
      auto& c = cells[k];
      PersistentBackwardCell& pc = p.a.cell[k];
      pc.wt_hh = resolve<T>(bufs, get(c, "wt_hh", "-"));
      pc.h = resolve<T>(bufs, get(c, "h", "-"));
      pc.dy = resolve<T>(bufs, get(c, "dy", "-"));
      pc.dz = resolve<T>(bufs, get(c, "dz", "-"));
      pc.dh = static_cast<float*>(resolve<T>(bufs, get(c, "dh", "-")));
      pc.reverse = get(c, "reverse", "0") == "1";
    }
    p.blocks_per_cell = bpc;
    p.wk = warps_per_group(B);
    const size_t smem = mma ? static_cast<size_t>(kWarps) * kMmaRows * kCols * 4
                            : static_cast<size_t>(kCols) * H * sizeof(T) + kWarps * 32 * 4;
    simt::launch(grid_of(kv, p.a.cells * bpc), kThreads, smem, [&] {
      if (mma) {
        persistent_backward_kernel<T, true>(p);
      } else {
        persistent_backward_kernel<T, false>(p);
      }
    });
  }
  for (auto& [name, spec] : decl) {
    const size_t n = bufs.size[name];
    const int es = bufs.elem[name];
    std::vector<float> out(n);
    for (size_t i = 0; i < n; ++i) {
      if (es == 4 && (spec.first || sizeof(T) == 4)) {
        std::memcpy(&out[i], bufs.data[name].data() + i * 4, 4);
      } else {
        T v;
        std::memcpy(&v, bufs.data[name].data() + i * es, es);
        out[i] = to_f32<T>(v);
      }
    }
    std::ofstream f(dir + "/" + name + ".out.f32", std::ios::binary);
    f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(n * 4));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: run_persistent DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  std::ifstream spec(dir + "/spec.txt");
  if (!spec) {
    std::fprintf(stderr, "no %s/spec.txt\n", dir.c_str());
    return 2;
  }
  std::map<std::string, std::string> kv;
  std::vector<std::pair<std::string, std::pair<bool, size_t>>> decl;
  std::vector<std::map<std::string, std::string>> cells;
  std::string line;
  while (std::getline(spec, line)) {
    std::istringstream is(line);
    std::string key;
    if (!(is >> key)) continue;
    if (key == "buffer" || key == "acc") {
      std::string name;
      size_t n;
      is >> name >> n;
      decl.push_back({name, {key == "acc", n}});
    } else if (key == "cell") {
      std::map<std::string, std::string> c;
      std::string item;
      while (is >> item) {
        const auto eq = item.find('=');
        c[item.substr(0, eq)] = item.substr(eq + 1);
      }
      cells.push_back(c);
    } else {
      std::string v;
      is >> v;
      kv[key] = v;
    }
  }
  try {
    if (kv["dtype"] == "float") return run<float>(dir, kv, decl, cells);
    if (kv["dtype"] == "half") return run<__half>(dir, kv, decl, cells);
    if (kv["dtype"] == "bfloat16") return run<__nv_bfloat16>(dir, kv, decl, cells);
    std::fprintf(stderr, "unknown dtype %s\n", kv["dtype"].c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  }
  return 1;
}
