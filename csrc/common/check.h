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

}  // namespace paca_kernels
