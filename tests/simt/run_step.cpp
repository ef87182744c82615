// Calls one launcher of the per-step CUDA kernels (csrc/cuda/rnn_kernels.cu, compiled here in
// full: kernels and launchers) under the host-thread emulation, for tests/test_cuda_emulated.py.
//
//   run_step DIR
//
// DIR/spec.txt, one item per line:
//   kind forward_step|backward_step|gather_rows        dtype float|double|half|bfloat16
//   arg NAME VALUE       an integer argument of the launcher (see below)
//   buffer NAME SIZE     a storage-dtype buffer, from DIR/NAME.f64 (float64)
//   acc NAME SIZE        an accumulation-dtype buffer (fp32, fp64 for double): backward's dh
//   ptr NAME REF         a pointer argument: BUFFER, BUFFER+OFFSET (elements) or "-" (null)
//   segment DST_ROW SRC_ROW ROWS SRC                       (gather_rows)
// forward_step:  ptrs w_hh b_hh cont_rows h0 z; args ld_cont cont ld_h0 ld_z rows H relu
// backward_step: ptrs wt_hh dz_in dh dy_next h_next dz_next; args rows_in rows_next ld H relu
// gather_rows:   ptrs src0 src1 dst; args ld0 ld1 ld_dst cols
// Every buffer is written back to DIR/NAME.out.f64; the launcher's return code is printed.
#include "../../csrc/cuda/rnn_kernels.cu"

#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using namespace rnn_ext::gpu;

namespace {

template <typename T>
T from_f64(double v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return static_cast<T>(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
}
template <typename T>
double to_f64(T v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return static_cast<double>(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

struct Store {
  std::map<std::string, std::vector<unsigned char>> raw;
  std::map<std::string, bool> acc;
  std::map<std::string, size_t> n;
};

template <typename T>
int run(const std::string& dir, std::map<std::string, std::string>& kind,
        std::map<std::string, int64_t>& args, std::map<std::string, std::string>& ptrs,
        std::vector<std::pair<std::string, std::pair<bool, size_t>>>& decl,
        std::vector<CopySegment>& segs, DType dt) {
  using A = acc_t<T>;
  Store st;
  for (auto& [name, spec] : decl) {
    const size_t n = spec.second;
    std::vector<double> init(n);
    std::ifstream f(dir + "/" + name + ".f64", std::ios::binary);
    f.read(reinterpret_cast<char*>(init.data()), static_cast<std::streamsize>(n * 8));
    if (static_cast<size_t>(f.gcount()) != n * 8) throw std::runtime_error("short " + name);
    const size_t es = spec.first ? sizeof(A) : sizeof(T);
    auto& raw = st.raw[name];
    raw.resize(n * es + 16);
    st.acc[name] = spec.first;
    st.n[name] = n;
    for (size_t i = 0; i < n; ++i) {
      if (spec.first) {
        const A v = static_cast<A>(init[i]);
        std::memcpy(raw.data() + i * es, &v, es);
      } else {
        const T v = from_f64<T>(init[i]);
        std::memcpy(raw.data() + i * es, &v, es);
      }
    }
  }
  auto P = [&](const char* key) -> void* {
    auto it = ptrs.find(key);
    if (it == ptrs.end() || it->second == "-") return nullptr;
    const std::string& ref = it->second;
    const auto plus = ref.find('+');
    const std::string name = ref.substr(0, plus);
    const size_t off = plus == std::string::npos ? 0 : std::stoull(ref.substr(plus + 1));
    const size_t es = st.acc.at(name) ? sizeof(A) : sizeof(T);
    return st.raw.at(name).data() + off * es;
  };
  auto I = [&](const char* key) { return args.at(key); };
  cudaError_t err = cudaSuccess;
  const std::string k = kind["kind"];
  if (k == "forward_step") {
    err = forward_step(dt, P("w_hh"), P("b_hh"), P("cont_rows"), I("ld_cont"), I("cont"), P("h0"),
                       I("ld_h0"), P("z"), I("ld_z"), I("rows"), I("H"), I("relu") != 0, nullptr);
  } else if (k == "backward_step") {
    err = backward_step(dt, P("wt_hh"), P("dz_in"), I("rows_in"), P("dh"), P("dy_next"),
                        P("h_next"), P("dz_next"), I("rows_next"), I("ld"), I("H"),
                        I("relu") != 0, nullptr);
  } else if (k == "gather_rows") {
    err = gather_rows(dt, P("src0"), I("ld0"), P("src1"), I("ld1"), P("dst"), I("ld_dst"),
                      I("cols"), segs.data(), static_cast<int64_t>(segs.size()), nullptr);
  } else {
    throw std::runtime_error("unknown kind " + k);
  }
  std::printf("%d\n", static_cast<int>(err));
  for (auto& [name, spec] : decl) {
    const size_t n = st.n[name];
    std::vector<double> out(n);
    for (size_t i = 0; i < n; ++i) {
      if (spec.first) {
        A v;
        std::memcpy(&v, st.raw[name].data() + i * sizeof(A), sizeof(A));
        out[i] = static_cast<double>(v);
      } else {
        T v;
        std::memcpy(&v, st.raw[name].data() + i * sizeof(T), sizeof(T));
        out[i] = to_f64<T>(v);
      }
    }
    std::ofstream f(dir + "/" + name + ".out.f64", std::ios::binary);
    f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(n * 8));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: run_step DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  std::ifstream spec(dir + "/spec.txt");
  std::map<std::string, std::string> kind, ptrs;
  std::map<std::string, int64_t> args;
  std::vector<std::pair<std::string, std::pair<bool, size_t>>> decl;
  std::vector<CopySegment> segs;
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
    } else if (key == "arg") {
      std::string name;
      int64_t v;
      is >> name >> v;
      args[name] = v;
    } else if (key == "ptr") {
      std::string name, ref;
      is >> name >> ref;
      ptrs[name] = ref;
    } else if (key == "segment") {
      CopySegment s{};
      is >> s.dst_row >> s.src_row >> s.rows >> s.src;
      segs.push_back(s);
    } else {
      std::string v;
      is >> v;
      kind[key] = v;
    }
  }
  try {
    const std::string d = kind["dtype"];
    if (d == "float") return run<float>(dir, kind, args, ptrs, decl, segs, DType::kFloat);
    if (d == "double") return run<double>(dir, kind, args, ptrs, decl, segs, DType::kDouble);
    if (d == "half") return run<__half>(dir, kind, args, ptrs, decl, segs, DType::kHalf);
    if (d == "bfloat16") {
      return run<__nv_bfloat16>(dir, kind, args, ptrs, decl, segs, DType::kBFloat16);
    }
    std::fprintf(stderr, "unknown dtype %s\n", d.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  }
  return 1;
}
