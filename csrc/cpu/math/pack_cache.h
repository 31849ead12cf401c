// PackCache: the packed right-hand sides of PackedMatrix (packing.h), kept across calls for weights
// that do not change between them. Baseline translation units only (ODR rule in dispatch.h).
//
// Why. Every fused inference kernel packs its weights on every call (bf16 pair panels, or 16-column
// float32 panels): a scalar pass over each weight, on the calling thread, before its parallel
// region. In bf16 inference at B = 1 that packing is a few per cent of the whole model's time (the
// products themselves, on AMX, are short). A model's weights are the same tensors call after call,
// so their packed form is kept here and reused while the weight is unchanged.
//
// When a weight counts as unchanged. The key is the weight's storage (held by a weak reference, so
// that a freed storage's address can never alias a new one while the entry lives), its data
// pointer, sizes, strides and dtype, and the packed layout; the entry also records the tensor's
// version counter (tensor._version, shared with its views), which every in-place update through
// the tensor or a view of it bumps (optimizer steps, load_state_dict, copy_ under no_grad). A hit
// needs all of them equal and the storage alive. NOT seen: writes that bypass the version counter
// (through `w.data`, which has a counter of its own, or through another framework sharing the
// memory): code that writes weights that way should run with PACA_KERNELS_WEIGHT_CACHE=0 (the
// cache off), or bump the version (e.g. an in-place op on the parameter itself under no_grad).
//
// When it is used. Only outside grad mode (inference: torch.no_grad, torch.inference_mode), never
// for inference tensors (no version counter), and only from the second call that sees the same
// weight unchanged: the first call records the key and packs into the per-thread scratch as before,
// so a weight made fresh on every call (a product, a cast) never allocates a cache buffer.
//
// Bounds. At most one entry per (storage view, layout); entries whose storage died are dropped at
// the next insertion; the packed bytes are capped (PACA_KERNELS_WEIGHT_CACHE_MB, default 256 MiB),
// the least recently used entries going first. A buffer in use by a running kernel is held by a
// shared_ptr, so eviction by another thread never frees it under that kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <unordered_map>

namespace paca_kernels::cpu {

class PackCache {
 public:
  // The process-wide cache (an inline function: one instance for the whole extension).
  static PackCache& instance() {
    static PackCache cache;
    return cache;
  }

  // Whether `w` may be looked up now: the cache is on, grad mode is off, and w is a strided CPU
  // tensor with storage and a version counter (not an inference tensor) of rank 2.
  static bool usable(const at::Tensor& w) {
    return enabled() && !c10::GradMode::is_enabled() && w.defined() && w.dim() == 2 &&
           w.layout() == at::kStrided && w.device().is_cpu() && !w.is_inference() &&
           w.has_storage() && w.numel() > 0;
  }

  // The packed buffer of (w, layout) if w is unchanged since it was stored (nullptr otherwise).
  // `want` is set when the caller should pack into a fresh buffer and store() it (the second
  // unchanged sighting); the first sighting only records the key.
  std::shared_ptr<void> find(const at::Tensor& w, int64_t layout, size_t bytes, bool& want) {
    const Key key = key_of(w, layout);
    const uint32_t version = w.unsafeGetTensorImpl()->version_counter().current_version();
    std::lock_guard<std::mutex> lock(mu_);
    want = false;
    auto it = map_.find(key);
    if (it != map_.end() && (it->second.storage.expired() || it->second.version != version ||
                             it->second.bytes != bytes)) {
      // Changed (or a dead storage's address): start over from a first sighting.
      drop(it);
      it = map_.end();
    }
    if (it == map_.end()) {
      map_.emplace(key, Entry(w.storage().getWeakStorageImpl(), version, bytes, ++tick_));
      if (map_.size() >= prune_at_) {  // amortised: drop dead storages' keys
        evict();
        prune_at_ = 2 * map_.size() > kPruneMin ? 2 * map_.size() : kPruneMin;
      }
      return nullptr;
    }
    it->second.last_use = ++tick_;
    if (it->second.buf) return it->second.buf;
    want = bytes <= cap_bytes();
    return nullptr;
  }

  // Stores the buffer packed for (w, layout) after find() asked for it (want == true).
  void store(const at::Tensor& w, int64_t layout, std::shared_ptr<void> buf, size_t bytes) {
    const Key key = key_of(w, layout);
    const uint32_t version = w.unsafeGetTensorImpl()->version_counter().current_version();
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key);
    if (it == map_.end() || it->second.version != version || it->second.storage.expired() ||
        it->second.bytes != bytes) {
      return;  // changed meanwhile: not stored
    }
    if (it->second.buf) {
      held_ -= it->second.bytes;
    }
    it->second.buf = std::move(buf);
    held_ += bytes;
    evict();
  }

  // A 64-byte aligned buffer of `bytes` bytes for store().
  static std::shared_ptr<void> allocate(size_t bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (p == nullptr) throw std::bad_alloc();
    return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  }

  // Bytes of packed weights held, and entries (for the tests).
  size_t held_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    map_.clear();
    held_ = 0;
  }

 private:
  struct Key {
    const void* storage;
    const void* data;
    int64_t size0, size1, stride0, stride1;
    int64_t dtype_layout;  // the weight's dtype and the packed layout
    bool operator==(const Key& o) const {
      return storage == o.storage && data == o.data && size0 == o.size0 && size1 == o.size1 &&
             stride0 == o.stride0 && stride1 == o.stride1 && dtype_layout == o.dtype_layout;
    }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      size_t h = std::hash<const void*>()(k.data);
      for (const int64_t v : {k.size0, k.size1, k.stride0, k.stride1, k.dtype_layout}) {
        h = h * 1000003u ^ std::hash<int64_t>()(v);
      }
      return h;
    }
  };
  struct Entry {
    Entry(c10::weak_intrusive_ptr<c10::StorageImpl> s, uint32_t v, size_t b, uint64_t t)
        : storage(std::move(s)), version(v), bytes(b), last_use(t) {}
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    uint32_t version;
    size_t bytes;
    uint64_t last_use;
    std::shared_ptr<void> buf;  // null after the first sighting
  };
  using Map = std::unordered_map<Key, Entry, KeyHash>;

  static Key key_of(const at::Tensor& w, int64_t layout) {
    return {w.storage().unsafeGetStorageImpl(), w.const_data_ptr(), w.size(0), w.size(1),
            w.stride(0), w.stride(1), static_cast<int64_t>(w.scalar_type()) * 64 + layout};
  }
  static bool enabled() {
    static const bool on = [] {
      const char* v = std::getenv("PACA_KERNELS_WEIGHT_CACHE");
      return v == nullptr || std::strcmp(v, "0") != 0;
    }();
    return on;
  }
  static size_t cap_bytes() {
    static const size_t cap = [] {
      const char* v = std::getenv("PACA_KERNELS_WEIGHT_CACHE_MB");
      const long mb = v != nullptr ? std::strtol(v, nullptr, 10) : 256;
      return static_cast<size_t>(mb > 0 ? mb : 0) << 20;
    }();
    return cap;
  }
  void drop(Map::iterator it) {
    if (it->second.buf) held_ -= it->second.bytes;
    map_.erase(it);
  }
  // Drops the entries of dead storages, then the least recently used buffers while over the cap.
  // Entries without a buffer (first sightings) are small; they go with their storage, and the
  // oldest of them when the map grows past kMaxEntries.
  void evict() {
    for (auto it = map_.begin(); it != map_.end();) {
      if (it->second.storage.expired()) {
        if (it->second.buf) held_ -= it->second.bytes;
        it = map_.erase(it);
      } else {
        ++it;
      }
    }
    while (held_ > cap_bytes() || map_.size() > kMaxEntries) {
      auto oldest = map_.end();
      for (auto it = map_.begin(); it != map_.end(); ++it) {
        if ((held_ > cap_bytes() && !it->second.buf)) continue;
        if (oldest == map_.end() || it->second.last_use < oldest->second.last_use) oldest = it;
      }
      if (oldest == map_.end()) break;
      drop(oldest);
    }
  }

  static constexpr size_t kMaxEntries = 4096, kPruneMin = 256;
  size_t prune_at_ = kPruneMin;
  std::mutex mu_;
  Map map_;
  size_t held_ = 0;
  uint64_t tick_ = 0;
};

}  // namespace paca_kernels::cpu
