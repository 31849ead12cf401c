// CPU kernel of paca_kernels::layer_norm (schema and semantics: csrc/registration.cpp): LayerNorm
// over the last dimension, in inference, for the pre-norm blocks' first LayerNorm (PaCaBlock's
// norm1, whose output the fused attention ops read; the block's second half takes its LayerNorm
// inside mlp_fused).
//
// Why not torch's layer_norm: the rows go through the dispatched 8-lane kernel
// (cpu/math/dispatch.h, layer_norm_rows, layernorm.h's overflow-free statistics) into an output
// from the kernels' pool (cpu/output_pool.h), and under CPU autocast the float32 stream is
// normalised straight into bf16 (dtype), the cast before the fused op in the same pass.
// Every row is computed alone: results do not depend on the thread count.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "cpu/math/kernels.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"
#include "cpu/math/tensor_access.h"
#include "cpu/output_pool.h"

namespace paca_kernels {
using namespace cpu;
namespace {

constexpr const char* kLnOp = "paca_kernels::layer_norm";
// Rows per inner step: their float32 copy stays in L1/L2.
constexpr int64_t kLnRows = 16;

template <typename scalar_t, typename out_t>
void layer_norm_kernel(const at::Tensor& x, const at::opmath_type<scalar_t>* w,
                       const at::opmath_type<scalar_t>* b, at::opmath_type<scalar_t> eps,
                       at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(-1), R = x.numel() / C;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  constexpr bool kInAcc = std::is_same_v<scalar_t, acc_t>, kOutAcc = std::is_same_v<out_t, acc_t>;
  parallel_for(0, R, std::max<int64_t>(1, kGrainSize / (8 * C)), [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> buf(ScratchSlot::kTask0, kInAcc && kOutAcc ? 0 : kLnRows * C);
    for (int64_t r0 = lo; r0 < hi; r0 += kLnRows) {
      const int64_t rows = std::min(kLnRows, hi - r0);
      const acc_t* src;
      if constexpr (kInAcc) {
        src = xp + r0 * C;
      } else {
        convert_row(xp + r0 * C, buf.data(), rows * C);
        src = buf.data();
      }
      if constexpr (kOutAcc) {
        layer_norm_rows(src, C, op + r0 * C, C, rows, C, w, b, eps);
      } else {
        layer_norm_rows(src, C, buf.data(), C, rows, C, w, b, eps);
        convert_row(buf.data(), op + r0 * C, rows * C);
      }
    }
  });
}

at::Tensor layer_norm_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps,
                          std::optional<at::ScalarType> dtype) {
  check_supported_float(x_in, kLnOp, "x");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) > 0, kLnOp,
              ": expected x of shape (..., C) with C > 0, got ", x_in.sizes());
  const int64_t C = x_in.size(-1);
  check_param(kLnOp, weight, x_in, {C}, "weight");
  check_param(kLnOp, bias, x_in, {C}, "bias");
  const at::ScalarType xt = x_in.scalar_type(), ot = dtype.value_or(xt);
  TORCH_CHECK(ot == xt || (xt == at::kFloat && (ot == at::kBFloat16 || ot == at::kHalf)), kLnOp,
              ": dtype is x's (", xt, "), or bfloat16 / float16 for float32 x, got ", ot);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = empty_output(x.sizes(), x.options().dtype(ot));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt, "layer_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> wv, bv;
    if (weight) wv = to_vector<acc_t>(*weight);
    if (bias) bv = to_vector<acc_t>(*bias);
    const acc_t* w = weight ? wv.data() : nullptr;
    const acc_t* b = bias ? bv.data() : nullptr;
    const acc_t e = static_cast<acc_t>(eps);
    if (ot == xt) {
      layer_norm_kernel<scalar_t, scalar_t>(x, w, b, e, out);
    } else if (ot == at::kBFloat16) {  // float32 x (checked above)
      layer_norm_kernel<scalar_t, c10::BFloat16>(x, w, b, e, out);
    } else {
      layer_norm_kernel<scalar_t, c10::Half>(x, w, b, e, out);
    }
  });
  return out;
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("layer_norm", &paca_kernels::layer_norm_cpu);
}
