// Input validation shared by the CPU and CUDA kernels of paca_kernels.
//
// Every check raises through TORCH_CHECK, which surfaces in Python as RuntimeError with the
// op name first so a user can tell which call failed from the message alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace paca_kernels {

// Tensor has exactly `dim` dimensions.
inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": expected ", name, " to have ", dim, " dimensions ", layout,
              ", got shape ", t.sizes());
}

// float64, float32, float16 or bfloat16: the dtypes every kernel supports.
inline void check_supported_float(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": expected ", name, " to be float64, float32, float16 or bfloat16, got ", st);
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": expected ", name_a, " and ", name_b,
              " to have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected ", name_a, " and ", name_b,
              " on the same device, got ", a.device(), " and ", b.device());
}

// size(dim) of `t` equals `expected` (a size taken from another input).
inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", what, " mismatch: expected ", expected,
              ", got ", t.size(dim), " (shape ", t.sizes(), ")");
}

// Optional LayerNorm affine parameter: shape (C,), dtype of `ref` or float32, same device.
inline void check_affine(const std::optional<at::Tensor>& p, const at::Tensor& ref, int64_t C,
                         const char* op, const char* name) {
  if (!p.has_value()) return;
  const at::Tensor& t = *p;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": expected ", name, " of shape (", C,
              ",) matching the channel dim of x, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type() || t.scalar_type() == at::kFloat, op,
              ": expected ", name, " to have dtype ", ref.scalar_type(), " (like x) or float32, got ",
              t.scalar_type());
  check_same_device(t, ref, op, name, "x");
}

// A module parameter a fused kernel reads (converted to its accumulation dtype): exactly `shape`,
// floating, on x's device.
inline void check_param(const char* op, const at::Tensor& p, const at::Tensor& x,
                        at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(p.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ",
              p.sizes());
  TORCH_CHECK(p.is_floating_point(), op, ": expected ", name, " to be floating, got ",
              p.scalar_type());
  check_same_device(p, x, op, name, "x");
}
inline void check_param(const char* op, const std::optional<at::Tensor>& p, const at::Tensor& x,
                        at::IntArrayRef shape, const char* name) {
  if (p) check_param(op, *p, x, shape, name);
}

// Accumulation dtype of the kernels for inputs of t's dtype: float64 stays float64, everything
// else accumulates in float32 (the dtype of the saved pooled/lse/stats tensors).
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- per-op argument checks, the same for every device ------------------------------------------
// (Device-specific limits, such as the dtypes a device's kernels take or what fits on chip, are
// checked by the device's glue on top of these.)

// p2c_attention_fwd/bwd: q (B, N, h, d), k and v (B, M, h, d) with M > 0, one dtype, one device.
inline void check_p2c_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const char* op) {
  check_dim(q, 4, op, "q", "(B, N, h, d)");
  check_dim(k, 4, op, "k", "(B, M, h, d)");
  check_dim(v, 4, op, "v", "(B, M, h, d)");
  check_same_dtype(q, k, op, "q", "k");
  check_same_dtype(q, v, op, "q", "v");
  check_same_device(q, k, op, "q", "k");
  check_same_device(q, v, op, "q", "v");
  check_size(k, 0, q.size(0), op, "batch size B of k (B, M, h, d) vs q (B, N, h, d)");
  check_size(k, 2, q.size(2), op, "number of heads h of k (B, M, h, d) vs q (B, N, h, d)");
  check_size(k, 3, q.size(3), op, "head dim d of k (B, M, h, d) vs q (B, N, h, d)");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": expected k and v to have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(1) > 0, op, ": expected at least one cluster (M > 0), got k of shape ",
              k.sizes());
}

// p2c_attention_bwd: the forward's arguments, plus grad_out shaped like q, of q's dtype and device.
inline void check_p2c_bwd_args(const at::Tensor& grad_out, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_p2c_args(q, k, v, op);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), op, ": expected grad_out of the shape of q ", q.sizes(),
              ", got ", grad_out.sizes());
  check_same_dtype(grad_out, q, op, "grad_out", "q");
  check_same_device(grad_out, q, op, "grad_out", "q");
}

// cluster_pool_fwd: logits (B, M, N) and x (B, N, C) of one dtype and device, N, C > 0, the
// optional LayerNorm affine (C,), eps >= 0.
inline void check_pool_args(const at::Tensor& logits, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps, const char* op) {
  check_dim(logits, 3, op, "logits", "(B, M, N)");
  check_dim(x, 3, op, "x", "(B, N, C)");
  check_same_dtype(logits, x, op, "logits", "x");
  check_same_device(logits, x, op, "logits", "x");
  const int64_t B = logits.size(0), N = logits.size(2), C = x.size(2);
  check_size(x, 0, B, op, "batch size B of x (B, N, C) vs logits (B, M, N)");
  check_size(x, 1, N, op, "number of patches N of x (B, N, C) vs logits (B, M, N)");
  // A softmax over no patches is undefined (0/0); C = 0 channels is served (empty out, zero dlogits).
  TORCH_CHECK(N > 0, op, ": expected N > 0 patches, got N=", N, " (logits of shape ", logits.sizes(),
              ")");
  check_affine(weight, x, C, op, "weight");
  check_affine(bias, x, C, op, "bias");
  TORCH_CHECK(eps >= 0, op, ": expected eps >= 0, got ", eps);
}

// cluster_pool_bwd: the forward's arguments, plus grad_out (B, M, C) of x's dtype and the saved
// pooled (B, M, C) and stats (B, M, 2) in the accumulation dtype.
inline void check_pool_bwd_args(const at::Tensor& grad_out, const at::Tensor& logits,
                                const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                const at::Tensor& pooled, const at::Tensor& stats, double eps,
                                const char* op) {
  check_pool_args(logits, x, weight, std::nullopt, eps, op);
  check_same_dtype(grad_out, x, op, "grad_out", "x");
  check_same_device(grad_out, x, op, "grad_out", "x");
  check_same_device(pooled, x, op, "pooled", "x");
  check_same_device(stats, x, op, "stats", "x");
  const int64_t B = logits.size(0), M = logits.size(1), C = x.size(2);
  const at::ScalarType acc = acc_dtype(x);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == M &&
                  grad_out.size(2) == C,
              op, ": expected grad_out of shape (B, M, C) = (", B, ", ", M, ", ", C, "), got ",
              grad_out.sizes());
  TORCH_CHECK(pooled.sizes() == grad_out.sizes() && pooled.scalar_type() == acc, op,
              ": expected pooled of shape (B, M, C) = ", grad_out.sizes(), " and dtype ", acc,
              ", got shape ", pooled.sizes(), " and dtype ", pooled.scalar_type());
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == B && stats.size(1) == M && stats.size(2) == 2 &&
                  stats.scalar_type() == acc,
              op, ": expected stats of shape (B, M, 2) = (", B, ", ", M, ", 2) and dtype ", acc,
              ", got shape ", stats.sizes(), " and dtype ", stats.scalar_type());
}

}  // namespace paca_kernels
