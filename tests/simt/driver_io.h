// What the emulation drivers (run_persistent.cpp, run_step.cpp) share: the job directory's
// spec.txt as lines of tokens, and named buffers in a storage dtype T (or an accumulation
// dtype A for "acc" buffers), read from DIR/NAME.f64 and written back to DIR/NAME.out.f64.
// Test-only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace simt_io {

template <typename T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return static_cast<T>(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
}
template <typename T>
double to_double(T v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return static_cast<double>(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

// DIR/spec.txt, one vector of whitespace-separated tokens per non-empty line.
inline std::vector<std::vector<std::string>> read_spec(const std::string& dir) {
  std::ifstream f(dir + "/spec.txt");
  if (!f) throw std::runtime_error("no " + dir + "/spec.txt");
  std::vector<std::vector<std::string>> lines;
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream is(line);
    std::vector<std::string> toks;
    for (std::string t; is >> t;) toks.push_back(t);
    if (!toks.empty()) lines.push_back(toks);
  }
  return lines;
}

template <typename T, typename A>
class Buffers {
 public:
  // Reads DIR/NAME.f64 (n float64 values) into a buffer of T, or of A when acc.
  void load(const std::string& dir, const std::string& name, size_t n, bool acc) {
    std::vector<double> init(n);
    std::ifstream f(dir + "/" + name + ".f64", std::ios::binary);
    f.read(reinterpret_cast<char*>(init.data()), static_cast<std::streamsize>(n * 8));
    if (static_cast<size_t>(f.gcount()) != n * 8) throw std::runtime_error("short " + name);
    Buf& b = bufs_[name];
    b.acc = acc;
    b.n = n;
    b.raw.resize(n * size(b) + 16);  // operator new's 16-byte alignment, as cudaMalloc's
    for (size_t i = 0; i < n; ++i) {
      if (acc) {
        store(b, i, static_cast<A>(init[i]));
      } else {
        store(b, i, from_double<T>(init[i]));
      }
    }
    order_.push_back(name);
  }
  // "NAME", "NAME+OFFSET" (elements) or "-" (null).
  void* ptr(const std::string& ref) {
    if (ref == "-") return nullptr;
    const auto plus = ref.find('+');
    const std::string name = ref.substr(0, plus);
    const size_t off = plus == std::string::npos ? 0 : std::stoull(ref.substr(plus + 1));
    auto it = bufs_.find(name);
    if (it == bufs_.end()) throw std::runtime_error("no buffer " + name);
    return it->second.raw.data() + off * size(it->second);
  }
  // Every buffer to DIR/NAME.out.f64.
  void write_back(const std::string& dir) {
    for (const std::string& name : order_) {
      const Buf& b = bufs_.at(name);
      std::vector<double> out(b.n);
      for (size_t i = 0; i < b.n; ++i) {
        out[i] = b.acc ? static_cast<double>(load_as<A>(b, i)) : to_double(load_as<T>(b, i));
      }
      std::ofstream f(dir + "/" + name + ".out.f64", std::ios::binary);
      f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(b.n * 8));
    }
  }

 private:
  struct Buf {
    std::vector<unsigned char> raw;
    size_t n = 0;
    bool acc = false;
  };
  static size_t size(const Buf& b) { return b.acc ? sizeof(A) : sizeof(T); }
  template <typename V>
  static void store(Buf& b, size_t i, V v) {
    std::memcpy(b.raw.data() + i * sizeof(V), &v, sizeof(V));
  }
  template <typename V>
  static V load_as(const Buf& b, size_t i) {
    V v;
    std::memcpy(&v, b.raw.data() + i * sizeof(V), sizeof(V));
    return v;
  }
  std::map<std::string, Buf> bufs_;
  std::vector<std::string> order_;
};

}  // namespace simt_io
