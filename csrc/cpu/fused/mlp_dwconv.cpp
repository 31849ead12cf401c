// CPU kernel of paca_kernels::mlp_dwconv (schema and semantics: csrc/registration.cpp):
// y = act(depthwise_kxk(u) + bias [+ u]) with u = x [+ in_bias] on (B, N, C) tokens: the DWConv (+ shortcut) and GELU of the PaCa-ViT MLP, and optionally the bias of the fc1
// before it (fc1 then runs as a plain matrix product, without the pass that broadcasts its bias
// into the output). Through PyTorch this is a transpose to NCHW, a
// depthwise convolution on a channels-last-strided input (oneDNN's slowest case: about a quarter of
// PaCa-ViT-Tiny's CPU inference time, for 1 % of its FLOPs), a transpose back, the shortcut add
// and the GELU, each a pass over the 4x-wide hidden activations. Here: one pass per band of image
// rows, with the shortcut folded into the centre tap (w_centre + 1, so it costs nothing) and the
// GELU applied while the band's outputs are in cache.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/check.h"
#include "cpu/fused/conv_front.h"
#include "cpu/output_pool.h"
#include "cpu/math/dwconv.h"
#include "cpu/math/kernels.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"
#include "cpu/math/tensor_access.h"

namespace paca_kernels {
using namespace cpu;
namespace {

template <typename scalar_t>
void mlp_dwconv_kernel(const at::Tensor& x, int64_t H, int64_t W, int64_t k,
                       const std::vector<at::opmath_type<scalar_t>>& wt,
                       const at::opmath_type<scalar_t>* bias,
                       const at::opmath_type<scalar_t>* in_bias, bool gelu, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(2);
  const Strides sx(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();  // (B, N, C) contiguous
  // Rows per band: about 128 outputs (the hidden width C is 4x the block width). The band split
  // never changes a result (each output is computed by one task, in a fixed order).
  const auto split = row_bands(B, H, W, 128);
  const int64_t rows = split.first, bands = split.second;
  const int64_t in_w = W + k - 1;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // write the output in place

  // float32 with contiguous channels (AVX2 build): convolve x in place, GELU as the outputs are
  // stored, no padded copy of the band.
  const DwDirectFn direct = std::is_same_v<scalar_t, float> && sx[2] == 1
                                ? float32_kernels().dwconv_direct : nullptr;

  parallel_for(0, B * bands, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> band(ScratchSlot::kTask0, direct ? 0 : (rows + k - 1) * in_w * C),
        tmp(ScratchSlot::kTask1, kDirect ? 0 : rows * W * C);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / bands, y0 = (task % bands) * rows;
      const int64_t nr = std::min(rows, H - y0), n0 = y0 * W;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (direct != nullptr) {
          // x streams from memory (cached = false: pixel groups in order).
          direct(xp + b * sx[0], sx[1], 0, H, W, y0, nr, wt.data(), bias, in_bias, gelu,
                 op + (b * H * W + n0) * C, C, k, /*cached=*/false);
          continue;
        }
      }
      load_band(xp, sx, b, y0, nr, H, W, C, k, band.data(), in_bias);
      acc_t* dst;
      if constexpr (kDirect) {
        dst = op + (b * H * W + n0) * C;
      } else {
        dst = tmp.data();
      }
      dwconv_band(band.data(), in_w, wt.data(), bias, dst, nr, W, C, k);
      if (gelu) gelu_inplace(dst, nr * W * C);
      if constexpr (!kDirect) {
        scalar_t* o = op + (b * H * W + n0) * C;
        for (int64_t i = 0; i < nr * W * C; ++i) o[i] = static_cast<scalar_t>(dst[i]);
      }
    }
  });
}

at::Tensor mlp_dwconv_cpu(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& in_bias, bool shortcut, bool gelu) {
  constexpr const char* kMlpOp = "paca_kernels::mlp_dwconv";
  const int64_t k = check_grid_and_depthwise(kMlpOp, x, H, W, weight, "weight");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_param(kMlpOp, bias, x, {C}, "bias");
  check_param(kMlpOp, in_bias, x, {C}, "in_bias");
  at::Tensor out = empty_output({B, N, C}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_dwconv", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Taps as (k*k, C); the shortcut is the identity tap, added to the centre one.
    std::vector<acc_t> wt = transposed<acc_t>(weight.reshape({C, k * k}));
    if (shortcut) {
      const int64_t centre = (k / 2) * k + k / 2;
      for (int64_t c = 0; c < C; ++c) wt[centre * C + c] += acc_t(1);
    }
    std::vector<acc_t> bv, ibv;
    if (bias) bv = to_vector<acc_t>(*bias);
    if (in_bias) ibv = to_vector<acc_t>(*in_bias);
    mlp_dwconv_kernel<scalar_t>(x, H, W, k, wt, bias ? bv.data() : nullptr,
                                in_bias ? ibv.data() : nullptr, gelu, out);
  });
  return out;
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("mlp_dwconv", &paca_kernels::mlp_dwconv_cpu);
}
