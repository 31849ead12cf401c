// CPU kernel of paca_kernels::cluster_pool_fwd (schema and semantics: csrc/registration.cpp).
//
// One task per (b, m) row: an online softmax over N (running max and running sum, the
// accumulator rescaled whenever the max grows) accumulates softmax(logits) . x in a single pass,
// then LayerNorm over C. This is the algorithm the fast kernels use; here it is written plainly
// and reads inputs through their strides, so non-contiguous and expanded (stride-0) inputs work
// without copies.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common/check.h"

namespace paca_kernels {
namespace {

constexpr const char* kOp = "paca_kernels::cluster_pool_fwd";
// Multiply-adds per parallel task; same value as at::internal::GRAIN_SIZE, which lives in the
// heavy ATen/TensorIterator.h.
constexpr int64_t kGrainSize = 32768;

// Element strides of a 3-d tensor, as int64 so that > 2^31-element tensors index correctly.
struct Strides3 {
  int64_t s0, s1, s2;
  explicit Strides3(const at::Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
};

template <typename scalar_t>
void cluster_pool_fwd_kernel(const at::Tensor& logits, const at::Tensor& x,
                             const at::Tensor* weight, const at::Tensor* bias, double eps,
                             at::Tensor& out, at::Tensor& pooled, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), M = logits.size(1), N = logits.size(2), C = x.size(2);
  const Strides3 sl(logits), sx(x);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  // weight/bias were converted to contiguous acc_t by the caller (they are only (C,)).
  const acc_t* wp = weight ? weight->const_data_ptr<acc_t>() : nullptr;
  const acc_t* bp = bias ? bias->const_data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* pp = pooled.mutable_data_ptr<acc_t>();
  acc_t* lsep = lse.mutable_data_ptr<acc_t>();
  const acc_t eps_acc = static_cast<acc_t>(eps);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // Each row costs ~N*C multiply-adds.
  const int64_t grain = std::max<int64_t>(1, kGrainSize / (N * C));
  at::parallel_for(0, B * M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / M, m = row % M;
      const scalar_t* lrow = lp + b * sl.s0 + m * sl.s1;
      const scalar_t* xb = xp + b * sx.s0;
      acc_t* prow = pp + row * C;  // pooled is freshly allocated, hence contiguous

      // Online softmax: invariant prow = sum_{n seen} exp(l_n - mx) * x_n, s = sum exp(l_n - mx).
      std::fill(prow, prow + C, acc_t(0));
      acc_t mx = kNegInf, s = 0;
      for (int64_t n = 0; n < N; ++n) {
        const acc_t l = static_cast<acc_t>(lrow[n * sl.s2]);
        // exp(-inf - mx) is 0: skipping keeps an all -inf prefix from producing (-inf) - (-inf).
        if (l == kNegInf) continue;
        if (l > mx) {
          const acc_t r = std::exp(mx - l);  // 0 on the first finite logit (mx = -inf)
          s *= r;
          for (int64_t c = 0; c < C; ++c) prow[c] *= r;
          mx = l;
        }
        const acc_t p = std::exp(l - mx);  // NaN logits propagate NaN, like torch.softmax
        s += p;
        const scalar_t* xrow = xb + n * sx.s1;
        for (int64_t c = 0; c < C; ++c) prow[c] += p * static_cast<acc_t>(xrow[c * sx.s2]);
      }
      // s == 0 only for all -inf rows: lse = -inf and 0/0 = NaN pooled, as torch does.
      lsep[row] = mx + std::log(s);
      const acc_t inv_s = acc_t(1) / s;
      for (int64_t c = 0; c < C; ++c) prow[c] *= inv_s;

      // LayerNorm over C (two passes over the row, biased variance).
      acc_t mean = 0;
      for (int64_t c = 0; c < C; ++c) mean += prow[c];
      mean /= static_cast<acc_t>(C);
      acc_t var = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = prow[c] - mean;
        var += d * d;
      }
      var /= static_cast<acc_t>(C);
      const acc_t rstd = acc_t(1) / std::sqrt(var + eps_acc);
      scalar_t* orow = op + row * C;
      for (int64_t c = 0; c < C; ++c) {
        acc_t y = (prow[c] - mean) * rstd;
        if (wp) y *= wp[c];
        if (bp) y += bp[c];
        orow[c] = static_cast<scalar_t>(y);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_pool_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_dim(logits, 3, kOp, "logits", "(B, M, N)");
  check_dim(x, 3, kOp, "x", "(B, N, C)");
  check_supported_float(x, kOp, "x");
  check_same_dtype(logits, x, kOp, "logits", "x");
  check_same_device(logits, x, kOp, "logits", "x");
  const int64_t B = logits.size(0), M = logits.size(1), N = logits.size(2), C = x.size(2);
  check_size(x, 0, B, kOp, "batch size B of x (B, N, C) vs logits (B, M, N)");
  check_size(x, 1, N, kOp, "number of patches N of x (B, N, C) vs logits (B, M, N)");
  TORCH_CHECK(N > 0 && C > 0, kOp, ": expected N > 0 patches and C > 0 channels, got N=", N,
              ", C=", C);
  check_affine(weight, x, C, kOp, "weight");
  check_affine(bias, x, C, kOp, "bias");
  TORCH_CHECK(eps >= 0, kOp, ": expected eps >= 0, got ", eps);

  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, M, C}, x.options());
  at::Tensor pooled = at::empty({B, M, C}, x.options().dtype(acc));
  at::Tensor lse = at::empty({B, M}, x.options().dtype(acc));
  if (B * M == 0) return {out, pooled, lse};

  // (C,) vectors: converting once is negligible and lets the kernel read one dtype.
  std::optional<at::Tensor> w, bi;
  if (weight.has_value()) w = weight->to(acc).contiguous();
  if (bias.has_value()) bi = bias->to(acc).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cluster_pool_fwd",
                                  [&] {
                                    cluster_pool_fwd_kernel<scalar_t>(
                                        logits, x, w ? &*w : nullptr, bi ? &*bi : nullptr, eps,
                                        out, pooled, lse);
                                  });
  return {out, pooled, lse};
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("cluster_pool_fwd", &paca_kernels::cluster_pool_fwd_cpu);
}
