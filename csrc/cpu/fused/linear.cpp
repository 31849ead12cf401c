// CPU kernel of paca_kernels::linear (schema and semantics: csrc/registration.cpp): y = x W^T + b
// in inference, for the layers left outside the fused blocks (PaCaViT's classifier head).
//
// Why not torch's linear: at B = 1 the head is a (1, C) x (C, classes) product whose cost is
// reading the weight. torch reads the float32 weight (1.5 MB for PaCa-ViT-Tiny's 384 x 1000), and in
// bf16 (a bf16 model, or autocast, which also casts the float32 weight on every call) its bf16
// path repacks it on every call: in the PaCa-ViT-Tiny forward at B = 1 the head took 0.34 ms in a
// bf16 model and 0.49 ms under autocast, against 0.18 ms in float32. Here the weight is packed
// once while it is unchanged (PackedMatrix with PackCache: bf16 pair panels for bf16 products,
// 16-column float32 panels otherwise) and the products run on the dispatched kernels.
//
// Few rows (the head at small batches) are split by output columns (16-column panels), many rows
// by row blocks. Each output is computed by one task, its sum over K in the kernels' fixed order,
// whatever the split: results do not depend on the thread count.

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
#include "cpu/math/packing.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"
#include "cpu/math/tensor_access.h"
#include "cpu/output_pool.h"

namespace paca_kernels {
using namespace cpu;
namespace {

constexpr const char* kLinearOp = "paca_kernels::linear";
// Rows per task when the rows are split; at most this many rows are split by columns instead.
constexpr int64_t kLinearRows = 32;

template <typename scalar_t>
void linear_kernel(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = x.size(-1), O = weight.size(0), R = x.numel() / K;
  // bf16 x: bf16 products with float32 sums, as a bf16 linear (or autocast's) computes them.
  const bool bf16 = std::is_same_v<scalar_t, at::BFloat16>;
  const PackedMatrix<acc_t> wt(weight, ScratchSlot::kCall0, bf16);  // W^T (K, O)
  std::vector<acc_t> bv;
  if (bias) bv = to_vector<acc_t>(*bias);
  const acc_t* b = bias ? bv.data() : nullptr;
  constexpr bool kAcc = std::is_same_v<scalar_t, acc_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  // The rows as acc_t (a copy only for bf16 / fp16 x, made by the task that reads them when rows
  // are split) and the outputs in acc_t (written straight into out for float32 / float64, else
  // rounded per task).
  const Scratch<acc_t> xa(ScratchSlot::kCall1, kAcc ? 0 : R * K), ya(ScratchSlot::kCall2, kAcc ? 0 : R * O);
  const acc_t* A;
  acc_t* Y;
  if constexpr (kAcc) {
    A = xp;
    Y = op;
  } else {
    A = xa.data();
    Y = ya.data();
  }
  if (R <= kLinearRows) {
    // Every task reads all R rows: converted once here (at most kLinearRows rows).
    if constexpr (!kAcc) convert_row(xp, xa.data(), R * K);
    const int64_t panels = (O + 15) / 16;
    // A grain of panels worth waking a thread for: about kGrainSize multiply-adds per task.
    const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, 16 * K * R));
    parallel_for(0, panels, grain, [&](int64_t lo, int64_t hi) {
      const int64_t c0 = lo * 16, c1 = std::min(O, hi * 16);
      wt.linear_cols(A, K, Y + c0, O, R, c0, c1, b == nullptr ? nullptr : b + c0, false);
      if constexpr (!kAcc) {
        for (int64_t r = 0; r < R; ++r) convert_row(Y + r * O + c0, op + r * O + c0, c1 - c0);
      }
    });
  } else {
    const int64_t blocks = (R + kLinearRows - 1) / kLinearRows;
    parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
      const int64_t r0 = lo * kLinearRows, r1 = std::min(R, hi * kLinearRows);
      if constexpr (!kAcc) convert_row(xp + r0 * K, xa.data() + r0 * K, (r1 - r0) * K);
      wt.linear(A + r0 * K, K, Y + r0 * O, O, r1 - r0, b, false);
      if constexpr (!kAcc) convert_row(Y + r0 * O, op + r0 * O, (r1 - r0) * O);
    });
  }
}

at::Tensor linear_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias) {
  check_supported_float(x_in, kLinearOp, "x");
  TORCH_CHECK(x_in.dim() >= 1, kLinearOp, ": expected x of shape (..., K), got a 0-d tensor");
  const int64_t K = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 2, kLinearOp, ": expected weight of shape (O, K), got ", weight.sizes());
  const int64_t O = weight.size(0);
  check_param(kLinearOp, weight, x_in, {O, K}, "weight");
  check_param(kLinearOp, bias, x_in, {O}, "bias");
  std::vector<int64_t> sizes(x_in.sizes().begin(), x_in.sizes().end());
  sizes.back() = O;
  at::Tensor out = empty_output(sizes, x_in.options());
  if (out.numel() == 0) return out;
  if (K == 0) {  // an empty sum: the bias, or zeros
    return bias ? out.copy_(bias->to(out.scalar_type()).expand_as(out)) : out.zero_();
  }
  const at::Tensor x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear", [&] {
    linear_kernel<scalar_t>(x, weight, bias, out);
  });
  return out;
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("linear", &paca_kernels::linear_cpu);
}
