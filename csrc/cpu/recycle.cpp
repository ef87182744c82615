// Recycling of the CPU kernels' large buffers.
//
// Why: every training step allocates the same buffers (outputs, the workspace backward needs,
// dz, input and weight gradients, and for DP training per-sample gradients, B times each weight)
// and drops them before the next step.  glibc hands such large blocks back to the OS when they
// are freed (mmap, or a heap trim), so each step touches fresh pages, a page fault per 4 KiB:
// on the project's VMs allocating and filling 55 MB took 17 ms, refilling the same 55 MB
// 1.3 ms (bench/NOTES.md).
//
// How: the tensors get their memory from an allocator of their own.  When the last reference
// to a storage goes away, its memory returns to this pool instead of to malloc; a later request
// of the same byte size takes it back (each time a new storage: nothing of the old one can be
// observed, and the memory is never handed out while any storage holds it).  Idle memory is
// freed when it has not been reused within kMaxAge requests, beyond RNN_EXT_CPU_RECYCLE_MB
// megabytes in all (default 512; 0 turns recycling off), or by release_recycled()
// (rnn_ext.empty_cpu_cache()).  Requests
// under kMinBytes go to torch's CPU allocator: malloc keeps such blocks in its heap anyway.
#include "cpu/recycle.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include <c10/util/Exception.h>

namespace rnn_ext::cpu {

namespace {

constexpr size_t kMinBytes = size_t{1} << 20;
constexpr uint64_t kMaxAge = 64;  // requests an idle block waits to be reused

int64_t limit_bytes() {
  static const int64_t limit = [] {
    const char* v = std::getenv("RNN_EXT_CPU_RECYCLE_MB");
    const int64_t mb = v != nullptr && *v != '\0' ? std::stoll(v) : 512;
    return mb > 0 ? mb << 20 : 0;
  }();
  return limit;
}

struct Block {
  void* data;
  size_t nbytes;
  uint64_t idle_since = 0;
};

struct Pool {
  std::mutex mutex;
  std::vector<Block*> idle;  // oldest first
  int64_t idle_bytes = 0;
  uint64_t clock = 0;
};

Pool& pool() {
  static Pool* p = [] {
    // A fork while another thread holds the mutex would leave it locked in the child forever
    // (e.g. a DataLoader worker forked mid-step): the child starts with a fresh one (its idle
    // blocks are the child's own copies, still valid).
    pthread_atfork(nullptr, nullptr, [] { new (&pool().mutex) std::mutex(); });
    return new Pool;  // never destroyed: storages may be freed during static destruction
  }();
  return *p;
}

void free_block(Block* b) {
  c10::free_cpu(b->data);
  delete b;
}

// Frees the idle blocks [0, n) (the oldest), with the lock held.
void drop_oldest(Pool& p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    p.idle_bytes -= static_cast<int64_t>(p.idle[i]->nbytes);
    free_block(p.idle[i]);
  }
  p.idle.erase(p.idle.begin(), p.idle.begin() + static_cast<std::ptrdiff_t>(n));
}

// The deleter of every recycled storage's memory: back to the pool.
void give_back(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  c10::profiledCPUMemoryReporter().Delete(b->data);  // (as torch's CPU allocator reports)
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  b->idle_since = p.clock;
  p.idle.push_back(b);
  p.idle_bytes += static_cast<int64_t>(b->nbytes);
  size_t n = 0;
  for (int64_t bytes = p.idle_bytes; bytes > limit_bytes() && n < p.idle.size(); ++n) {
    bytes -= static_cast<int64_t>(p.idle[n]->nbytes);
  }
  drop_oldest(p, n);
}

struct RecyclingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    const int64_t limit = limit_bytes();
    if (nbytes < kMinBytes || static_cast<int64_t>(nbytes) > limit) {
      return c10::GetCPUAllocator()->allocate(nbytes);
    }
    Block* b = nullptr;
    {
      Pool& p = pool();
      std::lock_guard<std::mutex> lock(p.mutex);
      ++p.clock;
      size_t old = 0;  // blocks idle for too long (the list is oldest first)
      while (old < p.idle.size() && p.clock - p.idle[old]->idle_since > kMaxAge) ++old;
      drop_oldest(p, old);
      for (size_t i = p.idle.size(); i-- > 0;) {  // the most recently returned first
        if (p.idle[i]->nbytes == nbytes) {
          b = p.idle[i];
          p.idle.erase(p.idle.begin() + static_cast<std::ptrdiff_t>(i));
          p.idle_bytes -= static_cast<int64_t>(nbytes);
          break;
        }
      }
    }
    if (b == nullptr) {
      void* data = nullptr;
      try {
        data = c10::alloc_cpu(nbytes);
      } catch (const c10::Error&) {  // out of memory: without the idle blocks, once more
        if (release_recycled() == 0) throw;
        data = c10::alloc_cpu(nbytes);
      }
      b = new Block{data, nbytes};
    }
    c10::profiledCPUMemoryReporter().New(b->data, nbytes);
    return {b->data, b, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

RecyclingAllocator& allocator() {
  static RecyclingAllocator* a = new RecyclingAllocator;  // storages keep a pointer to it
  return *a;
}

}  // namespace

at::Tensor recycled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_generic(sizes, &allocator(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                              std::nullopt));
}

int64_t release_recycled() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  const int64_t freed = p.idle_bytes;
  drop_oldest(p, p.idle.size());
  return freed;
}

int64_t recycled_idle_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return p.idle_bytes;
}

}  // namespace rnn_ext::cpu
