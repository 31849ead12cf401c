// CPU kernel of paca_kernels::conv_paca_layer (schema and semantics: csrc/registration.cpp): a whole
// PaCa layer with the convolutional clustering head, in inference, as one op call.
//
// It is the three fused kernels in sequence (conv_cluster_logits -> cluster_pool_fwd ->
// p2c_attention_proj), called directly rather than as three Python-level ops: at PaCa-ViT-Tiny's
// stages 2-3 (B = 8) the layer's Python between them (module walks, backend selection, three
// dispatches, a torch.softmax for z) was 2-3.5 % of its time (alternating pairs against the raw op
// calls), run on the calling thread while the other threads waited. The assignment probabilities
// z = softmax(logits over N) that the official layer returns are computed by one parallel pass
// right after the pooling, while the logits are still in the last-level cache.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cpu/cpu_ops.h"
#include "cpu/math/kernels.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"
#include "cpu/math/softmax.h"

namespace paca_kernels {
using namespace cpu;
namespace {

// z[r, :] = softmax(logits[r, :]) for the B*M rows of contiguous logits (B, M, N), computed as
// torch.softmax does (exp(l - max), times 1 / sum) rather than as exp(l - lse) from the pooling's
// logsumexp, which is one pass fewer but carries lse's rounding (about 1 ulp of a number near
// log N) into every probability: up to 1e-6 relative error against 1e-7. The row is in L1 for the
// three passes, and the exponentials dominate. A row with NaN, +inf, or no finite logit gives NaN,
// as torch.softmax does.
template <typename scalar_t>
void probabilities_kernel(const at::Tensor& logits, at::Tensor& z) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  const int64_t rows = logits.size(0) * logits.size(1), N = logits.size(2);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  scalar_t* zp = z.mutable_data_ptr<scalar_t>();
  parallel_for(0, rows, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(N, 1)),
               [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> buf(ScratchSlot::kTask0, kSame ? 0 : N);
    for (int64_t r = lo; r < hi; ++r) {
      const acc_t* src;
      acc_t* dst;
      if constexpr (kSame) {
        src = lp + r * N;
        dst = zp + r * N;
      } else {
        convert_row(lp + r * N, buf.data(), N);
        src = dst = buf.data();
      }
      // row_max skips NaN entries; exp(NaN - mx) then poisons the sum and so the whole row.
      const acc_t inv = acc_t(1) / exp_minus_row_max(src, dst, N).sum;
      for (int64_t i = 0; i < N; ++i) dst[i] *= inv;
      if constexpr (!kSame) {
        convert_row(buf.data(), zp + r * N, N);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> conv_paca_layer_cpu(
    const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& dw_weight,
    const std::optional<at::Tensor>& dw_bias, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    double eps, const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
    const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias,
    const at::Tensor& v_weight, const std::optional<at::Tensor>& v_bias,
    const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias, int64_t num_heads,
    double scale, bool probs, const std::optional<at::Tensor>& residual) {
  // Each stage checks its own arguments; its messages name the op whose part failed.
  at::Tensor logits = conv_cluster_logits_cpu(x, H, W, dw_weight, dw_bias, w1, b1, w2, b2);
  const auto pooled = cluster_pool_fwd_cpu(logits, x, norm_weight, norm_bias, eps);
  at::Tensor assign = logits;
  if (probs) {
    // Before the attention, while the logits are still in the last-level cache.
    assign = at::empty_like(logits);
    if (logits.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                      "conv_paca_layer", [&] {
        probabilities_kernel<scalar_t>(logits, assign);
      });
    }
  }
  at::Tensor out = p2c_attention_proj_cpu(x, std::get<0>(pooled), q_weight, q_bias, k_weight,
                                          k_bias, v_weight, v_bias, proj_weight, proj_bias,
                                          num_heads, scale, residual);
  return {out, assign};
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("conv_paca_layer", &paca_kernels::conv_paca_layer_cpu);
}
