// The cache of freed output blocks of the CPU kernels (output_pool.h says why and what).

#include "cpu/output_pool.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#if !defined(_WIN32)
#include <pthread.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace paca_kernels::cpu {
namespace {

constexpr size_t kRound = size_t(64) << 10;  // block sizes are multiples of this
constexpr size_t kAlign = 64;

// The cap from PACA_KERNELS_CPU_OUTPUT_CACHE_MB (default 1024 MiB; 0 turns the pool off; an
// unparsable value is an error at the first use, not a silent default).
size_t cap_from_env() {
  const char* env = std::getenv("PACA_KERNELS_CPU_OUTPUT_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
              "PACA_KERNELS_CPU_OUTPUT_CACHE_MB must be a whole number of MiB (0 turns the CPU "
              "output cache off), got '", env, "'");
  return static_cast<size_t>(mb) << 20;
}

// One allocation: the memory and its rounded size. Also the DataPtr's context.
struct Block {
  void* ptr;
  size_t bytes;
};

class OutputPool final : public c10::Allocator {
 public:
  OutputPool() : cap_(cap_from_env()) {
#if !defined(_WIN32)
    // A fork while another thread holds the lock must not leave the child's copy locked.
    pthread_atfork([] { instance().mu_.lock(); }, [] { instance().mu_.unlock(); },
                   [] { instance().mu_.unlock(); });
#endif
  }

  // Never destroyed: tensors freed during interpreter shutdown still hand their blocks back.
  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

  bool enabled() const { return cap_ > 0; }
  size_t cap() const { return cap_; }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kRound - 1) / kRound * kRound;
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        block = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
      }
    }
    if (block == nullptr) {
      void* p = std::aligned_alloc(kAlign, bytes);
      if (p == nullptr) {
        // Give the cache back to the system and try once more before failing.
        clear();
        p = std::aligned_alloc(kAlign, bytes);
      }
      TORCH_CHECK(p != nullptr, "paca_kernels: out of memory allocating a CPU output of ", n,
                  " bytes");
      block = new Block{p, bytes};
    }
    return {block->ptr, block, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &OutputPool::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

  size_t clear() {
    std::vector<Block*> drop;
    size_t freed = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& entry : free_) {
        drop.insert(drop.end(), entry.second.begin(), entry.second.end());
        entry.second.clear();
      }
      freed = cached_;
      cached_ = 0;
    }
    for (Block* b : drop) {
      std::free(b->ptr);
      delete b;
    }
    return freed;
  }

 private:
  // The storage's deleter: keep the block while the cache has room, else free it.
  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    OutputPool& pool = instance();
    {
      std::lock_guard<std::mutex> lock(pool.mu_);
      if (pool.cached_ + block->bytes <= pool.cap_) {
        pool.free_[block->bytes].push_back(block);
        pool.cached_ += block->bytes;
        return;
      }
    }
    std::free(block->ptr);
    delete block;
  }

  const size_t cap_;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<Block*>> free_;
  size_t cached_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  OutputPool& pool = OutputPool::instance();
  if (nbytes < kPoolMinBytes || !pool.enabled() || options.device().type() != c10::DeviceType::CPU) {
    return at::empty(sizes, options);
  }
  at::Tensor out = at::detail::empty_generic(sizes, &pool, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                             options.dtype().toScalarType(),
                                             c10::MemoryFormat::Contiguous);
  // torch.utils.deterministic.fill_uninitialized_memory (with deterministic algorithms on): at::empty
  // then fills new memory with NaN (integers: their largest value), so that an element a kernel
  // fails to write shows (paca_kernels.testing.poisoned_outputs). A cached block holds an earlier
  // output's values, which would hide such an element, so it is filled alike.
  const at::Context& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory()) {
    if (out.is_floating_point() || out.is_complex()) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else if (out.scalar_type() == at::kBool) {
      out.fill_(true);
    } else {
      AT_DISPATCH_INTEGRAL_TYPES(out.scalar_type(), "empty_output_poison",
                                 [&] { out.fill_(std::numeric_limits<scalar_t>::max()); });
    }
  }
  return out;
}


int64_t cpu_output_cache_bytes() { return static_cast<int64_t>(OutputPool::instance().cached()); }
int64_t cpu_output_cache_limit() { return static_cast<int64_t>(OutputPool::instance().cap()); }
int64_t cpu_output_cache_clear() { return static_cast<int64_t>(OutputPool::instance().clear()); }

}  // namespace paca_kernels::cpu
