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
// Every buffer is written back to DIR/NAME.out.f64 (driver_io.h); the launcher's return code is
// printed.
#include "../../csrc/cuda/rnn_kernels.cu"
#include "driver_io.h"

#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

using namespace rnn_ext::gpu;

namespace {

template <typename T>
void run(const std::string& dir, const std::vector<std::vector<std::string>>& spec, DType dt) {
  simt_io::Buffers<T, acc_t<T>> bufs;
  std::map<std::string, std::string> kind, ptrs;
  std::map<std::string, int64_t> args;
  std::vector<CopySegment> segs;
  for (const auto& l : spec) {
    if (l[0] == "buffer" || l[0] == "acc") {
      bufs.load(dir, l.at(1), std::stoull(l.at(2)), l[0] == "acc");
    } else if (l[0] == "arg") {
      args[l.at(1)] = std::stoll(l.at(2));
    } else if (l[0] == "ptr") {
      ptrs[l.at(1)] = l.at(2);
    } else if (l[0] == "segment") {
      segs.push_back(CopySegment{std::stoll(l.at(1)), std::stoll(l.at(2)), std::stoll(l.at(3)),
                                 static_cast<int32_t>(std::stoi(l.at(4)))});
    } else {
      kind[l[0]] = l.at(1);
    }
  }
  auto P = [&](const char* key) {
    auto it = ptrs.find(key);
    return it == ptrs.end() ? nullptr : bufs.ptr(it->second);
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
  bufs.write_back(dir);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: run_step DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  try {
    const auto spec = simt_io::read_spec(dir);
    std::string d;
    for (const auto& l : spec) {
      if (l[0] == "dtype") d = l.at(1);
    }
    if (d == "float") {
      run<float>(dir, spec, DType::kFloat);
    } else if (d == "double") {
      run<double>(dir, spec, DType::kDouble);
    } else if (d == "half") {
      run<__half>(dir, spec, DType::kHalf);
    } else if (d == "bfloat16") {
      run<__nv_bfloat16>(dir, spec, DType::kBFloat16);
    } else {
      throw std::runtime_error("unknown dtype " + d);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
