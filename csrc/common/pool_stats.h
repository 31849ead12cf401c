// cluster_pool's saved softmax statistics for the one case with nothing to pool: C = 0 channels.
// Shared by the CPU kernels and the CUDA glue, so that every device returns the same stats.
#pragma once

#include <ATen/core/Tensor.h>

#include <limits>

namespace paca_kernels {

// stats (B, M, 2) of logits (B, M, N), N > 0: (max_n logits, sum_n exp(logits - max)), in stats'
// dtype, with sum = 0 for a row whose logits are all -inf (as the kernels store it). Used when
// C = 0: out and pooled are empty but the stats are still defined; the kernels are not launched.
inline void pool_stats_without_channels(const at::Tensor& logits, at::Tensor& stats) {
  const at::Tensor l = logits.to(stats.scalar_type());
  const at::Tensor mx = l.amax(-1);
  at::Tensor s = l.sub(mx.unsqueeze(-1)).exp().sum(-1);
  s.masked_fill_(mx.eq(-std::numeric_limits<double>::infinity()), 0.0);
  stats.select(2, 0).copy_(mx);
  stats.select(2, 1).copy_(s);
}

}  // namespace paca_kernels
