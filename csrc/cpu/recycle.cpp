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
// (rnn_ext.empty_cpu_cache()).  Requests under kMinBytes go to torch's CPU allocator: malloc
// keeps such blocks in its heap anyway.
#include "cpu/recycle.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include <c10/util/Exception.h>

namespace rnn_ext::cpu {

namespace {

constexpr size_t kMinBytes = size_t{1} << 20;
constexpr uint64_t kMaxAge = 64;  // requests an idle block waits to be reused

int64_t limit_bytes() {
  static const int64_t limit = [] {
    const char* v = std::getenv("RNN_EXT_CPU_RECYCLE_MB");
    long long mb = 512;
    if (v != nullptr && *v != '\0') {
      char* end = nullptr;
      mb = std::strtoll(v, &end, 10);
      if (end == v) mb = 512;  // not a number: the default
    }
    mb = std::clamp<long long>(mb, 0, int64_t{1} << 30);
    return static_cast<int64_t>(mb) << 20;
  }();
  return limit;
}

// Each block carries its bookkeeping in a header just before the memory handed out, so that a
// DataPtr's context is its data pointer (a "simple" DataPtr, as torch's own CPU allocator makes:
// copy-on-write clones accept only those).  64 bytes keep alloc_cpu's alignment.
struct Block {
  size_t nbytes;
  uint64_t idle_since = 0;
};
constexpr size_t kHeader = 64;
static_assert(sizeof(Block) <= kHeader, "the block header must fit before the data");

char* data_of(Block* b) { return reinterpret_cast<char*>(b) + kHeader; }
Block* block_of(void* data) {
  return reinterpret_cast<Block*>(static_cast<char*>(data) - kHeader);
}

struct Pool {
  std::mutex mutex;
  std::vector<Block*> idle;  // oldest first
  int64_t idle_bytes = 0;
  uint64_t clock = 0;
};

Pool* g_pool = nullptr;

Pool& pool() {
  static Pool* p = [] {
    g_pool = new Pool;  // never destroyed: storages may be freed during static destruction
    // fork: the forking thread takes the mutex first, so the child never inherits it locked
    // by another thread, nor the pool half-updated (e.g. a DataLoader worker forked mid-step)
    pthread_atfork([] { g_pool->mutex.lock(); }, [] { g_pool->mutex.unlock(); },
                   [] { g_pool->mutex.unlock(); });
    return g_pool;
  }();
  return *p;
}

void free_block(Block* b) {
  b->~Block();
  c10::free_cpu(b);
}

// Frees the idle blocks [0, n) (the oldest), with the lock held.
void drop_oldest(Pool& p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    p.idle_bytes -= static_cast<int64_t>(p.idle[i]->nbytes);
    free_block(p.idle[i]);
  }
  p.idle.erase(p.idle.begin(), p.idle.begin() + static_cast<std::ptrdiff_t>(n));
}

// The deleter of every recycled storage's memory: back to the pool.  (Never throws: a deleter
// runs in destructors.)
void give_back(void* data) {
  Block* b = block_of(data);
  c10::profiledCPUMemoryReporter().Delete(data);  // (as torch's CPU allocator reports)
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  b->idle_since = p.clock;
  try {
    p.idle.push_back(b);
  } catch (...) {  // no memory for the list: free the block instead of keeping it
    free_block(b);
    return;
  }
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
      void* raw = nullptr;
      try {
        raw = c10::alloc_cpu(kHeader + nbytes);
      } catch (const c10::Error&) {  // out of memory: without the idle blocks, once more
        if (release_recycled() == 0) throw;
        raw = c10::alloc_cpu(kHeader + nbytes);
      }
      b = new (raw) Block{nbytes};
    }
    char* data = data_of(b);
    c10::profiledCPUMemoryReporter().New(data, nbytes);
    return {data, data, &give_back, c10::Device(c10::DeviceType::CPU)};
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
