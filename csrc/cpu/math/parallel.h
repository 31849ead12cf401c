// Parallel loop of the CPU kernels over torch's intra-op threads. Baseline translation units only
// (ODR rule in dispatch.h).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace paca_kernels::cpu {


// Multiply-adds per parallel task; same value as at::internal::GRAIN_SIZE, which lives in the
// heavy ATen/TensorIterator.h.
constexpr int64_t kGrainSize = 32768;

// ---- parallel loops ----------------------------------------------------------------------------
//
// f(lo, hi) over disjoint chunks covering [begin, end), on torch's intra-op threads (OpenMP in
// torch's CPU builds; CMakeLists.txt compiles with -fopenmp so at::parallel_for's pragma is live
// in these files). at::parallel_for hands each thread one fixed slice; here the threads claim
// chunks of at least `grain` iterations from a shared counter until none are left. On a shared
// or virtualised machine two cores running the same work routinely differ by 5-10% over a few
// milliseconds (measured: 0.3-0.7 ms of a 6 ms phase of p2c_attention_proj at B = 8), and with a
// fixed slice the faster thread spins at the closing barrier for the whole difference; claiming
// chunks bounds that wait by one chunk. Every kernel writes disjoint outputs, or per-task partials
// reduced in a fixed order, so neither the split nor which thread runs a chunk changes a result.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t nthr = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (nthr <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  // About 8 chunks per thread (never below the grain): fine enough that the last chunks even
  // out the threads, coarse enough that each chunk's setup (scratch lookup, row loads) is noise.
  const int64_t chunk = std::max<int64_t>(grain, n / (nthr * 8));
  std::atomic<int64_t> next{begin};
  at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t lo = next.fetch_add(chunk, std::memory_order_relaxed);
      if (lo >= end) break;
      f(lo, std::min(end, lo + chunk));
    }
  });
}

}  // namespace paca_kernels::cpu
