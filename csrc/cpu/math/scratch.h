// Per-thread scratch buffers of the CPU kernels. Baseline translation units only (ODR rule in
// dispatch.h).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>

namespace paca_kernels::cpu {

// ---- scratch memory ----------------------------------------------------------------------------
//
// The kernels need temporaries of 100 KiB to a few MiB on every call: packed weights, keys and
// values, per-task tiles. Allocated per call, blocks that big come from mmap (glibc's threshold is
// 128 KiB), and the kernel zeroes and page-faults them in again every time: at PaCa-ViT-Tiny's
// third stage (B = 8) that was about 1 ms of a 9 ms p2c_attention_proj, spent on the calling
// thread while the other threads waited. Each thread instead keeps one grow-only buffer per slot,
// reused by every later call on that thread. A kernel gives each of its live temporaries its own
// slot (the calling thread also runs tasks: its slots for the whole call and the tasks' slots must
// differ). The pool is one per thread for the whole extension (ScratchPool::get is an inline
// function with external linkage): an op that calls another op's kernel (fused/conv_paca_layer.cpp)
// must not hold a Scratch across that call. Requests above kScratchMaxBytes are allocated per call (and freed) instead, so a one-off
// huge input does not pin its memory to the thread. Contents are uninitialised.
enum class ScratchSlot : int {
  kCall0, kCall1, kCall2, kCall3, kCall4, kCall5, kCall6,  // for the whole call (weights, k/v)
  kTask0, kTask1, kTask2, kTask3, kTask4,          // inside parallel tasks
  kCount
};
constexpr size_t kScratchMaxBytes = size_t(16) << 20;

struct ScratchPool {
  struct Buf {
    void* p = nullptr;
    size_t bytes = 0;
  };
  Buf buf[static_cast<int>(ScratchSlot::kCount)];
  ScratchPool() = default;
  ScratchPool(const ScratchPool&) = delete;
  ScratchPool& operator=(const ScratchPool&) = delete;
  ~ScratchPool() {
    for (Buf& b : buf) std::free(b.p);
  }
  // The thread's buffer for `slot`, at least `bytes` long (64-byte aligned).
  static void* get(ScratchSlot slot, size_t bytes) {
    thread_local ScratchPool pool;
    Buf& b = pool.buf[static_cast<int>(slot)];
    if (b.bytes < bytes) {
      std::free(b.p);
      b.p = nullptr;
      b.bytes = 0;
      const size_t rounded = (bytes + 65535) / 65536 * 65536;
      b.p = std::aligned_alloc(64, rounded);
      if (b.p == nullptr) throw std::bad_alloc();
      b.bytes = rounded;
    }
    return b.p;
  }
};

// n uninitialised values of a trivial type T: the thread's buffer for `slot`, or an owned
// allocation when n * sizeof(T) > kScratchMaxBytes. Valid until the next Scratch of the same slot
// on the same thread.
template <typename T>
class Scratch {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_default_constructible_v<T>);

 public:
  Scratch(ScratchSlot slot, int64_t n) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    if (bytes > kScratchMaxBytes) {
      own_.reset(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
      p_ = own_.get();
    } else {
      p_ = static_cast<T*>(ScratchPool::get(slot, bytes));
    }
  }
  T* data() const { return p_; }
  T& operator[](int64_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
  std::unique_ptr<T[]> own_;
};

}  // namespace paca_kernels::cpu
