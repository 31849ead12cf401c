// CPU kernel of paca_kernels::conv_cluster_logits: the official convolutional clustering head
// (P2CConv2d) in one pass, for inference (schema and semantics: csrc/registration.cpp).
//
//   t0 = GELU(depthwise_kxk(x) + dw_bias)        x read as the (H, W, C) image it already is
//   t1 = GELU(t0 . W1^T + b1)                    the first 1x1 conv, C -> C
//   logits = t1 . W2^T (+ b2)                    the second 1x1 conv, C -> M, stored (B, M, N)
//
// The unfused PyTorch head writes and re-reads three (B, C, H, W) intermediates, runs GELU as two
// separate passes and hands MKL 1x1 convolutions with a short reduction (K = C = 96 at stage 1),
// where its tiles are load/store bound. Here each task takes a band of image rows (a tile of about
// 256 patches plus its (k-1)/2-row halo), keeps t0/t1 in cache, applies GELU in registers and
// feeds the register-blocked products of cpu/math. Everything accumulates in float32 (float64
// for float64 inputs), also for half/bfloat16 inputs, which the unfused path rounds after every op.
// The result does not depend on the thread count (each logit is computed by exactly one task, in a
// fixed order).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "cpu/cpu_ops.h"
#include "cpu/fused/conv_front.h"
#include "cpu/output_pool.h"
#include "cpu/math/dwconv.h"
#include "cpu/math/kernels.h"
#include "cpu/math/packing.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"
#include "cpu/math/tensor_access.h"

namespace paca_kernels {
using namespace cpu;
namespace {

constexpr const char* kOp = "paca_kernels::conv_cluster_logits";
// Patches per task (a band of whole image rows): t0, t1 (tile x C) and the logits tile (tile x M)
// stay in L2 between the three stages.
constexpr int64_t kTilePatches = 256;

// The head's parameters as contiguous acc_t: the (C,)-shaped biases, the depthwise weight
// transposed to (k*k, C), and the 1x1 convs' weights (C, C) and (M, C) packed as the right-hand
// sides of the products (C, C) and (C, M).
template <typename acc_t>
struct HeadParams {
  std::vector<acc_t> dw_t, dw_b, b1, b2;
  PackedMatrix<acc_t> w1_t, w2_t;  // (C, C) and (C, M)
  bool has_dw_b = false, has_b2 = false;
  // bf16: the 1x1 convs as bf16 products with float32 sums (PackedMatrix).
  HeadParams(const at::Tensor& w1, const at::Tensor& w2, bool bf16)
      : w1_t(w1, ScratchSlot::kCall0, bf16), w2_t(w2, ScratchSlot::kCall1, bf16) {}
};

template <typename scalar_t>
void conv_cluster_logits_kernel(const at::Tensor& x, int64_t H, int64_t W, int64_t k,
                                const HeadParams<at::opmath_type<scalar_t>>& prm, int64_t M,
                                at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const Strides sx(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();

  // Rows per band: about kTilePatches patches.
  const auto split = row_bands(B, H, W, kTilePatches);
  const int64_t rows = split.first, bands = split.second;
  const int64_t in_w = W + k - 1;

  // float32 with contiguous channels: the convolution reads x in place and applies the GELU as it
  // stores (AVX2 build); otherwise a zero-padded float32/float64 copy of the band is convolved.
  const DwDirectFn direct = std::is_same_v<scalar_t, float> && sx[2] == 1
                                ? float32_kernels().dwconv_direct : nullptr;

  parallel_for(0, B * bands, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> band(ScratchSlot::kTask0, direct ? 0 : (rows + k - 1) * in_w * C),
        t0(ScratchSlot::kTask1, rows * W * C), t1(ScratchSlot::kTask2, rows * W * C),
        lt(ScratchSlot::kTask3, rows * W * M);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / bands, y0 = (task % bands) * rows;
      const int64_t nr = std::min(rows, H - y0), nt = nr * W, n0 = y0 * W;
      const acc_t* dw_b = prm.has_dw_b ? prm.dw_b.data() : nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (direct != nullptr) {
          // Channel sweeps, no prefetch (cached = true) although x comes from memory: the 7 x 7
          // kernel keeps 7 of x's rows in use, so most reads hit L2 anyway; pixel groups measured
          // no faster (PaCa-ViT-Tiny inference, B = 8: 0.97x), nor did the prefetch (1.02x without).
          direct(xp + b * sx[0], sx[1], 0, H, W, y0, nr, prm.dw_t.data(), dw_b, nullptr,
                 /*gelu=*/true, t0.data(), C, k, /*cached=*/true);
        }
      }
      if (direct == nullptr) {
        load_band(xp, sx, b, y0, nr, H, W, C, k, band.data());
        dwconv_band(band.data(), in_w, prm.dw_t.data(), dw_b, t0.data(), nr, W, C, k);
        gelu_inplace(t0.data(), nt * C);
      }
      prm.w1_t.linear(t0.data(), C, t1.data(), C, nt, prm.b1.data(), /*gelu=*/true);
      prm.w2_t.linear(t1.data(), C, lt.data(), M, nt, prm.has_b2 ? prm.b2.data() : nullptr,
                      /*gelu=*/false);
      // (nt, M) tile -> out[b, :, n0 : n0 + nt], per cluster one contiguous run.
      scalar_t* ob = op + b * M * N + n0;
      if constexpr (std::is_same_v<scalar_t, float>) {
        transpose(lt.data(), M, nt, M, ob, N);
      } else {
        // Blocks of 32 patches keep the block's tile rows in L1 while it is read column by column.
        for (int64_t i0 = 0; i0 < nt; i0 += 32) {
          const int64_t i1 = std::min(nt, i0 + 32);
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t i = i0; i < i1; ++i) ob[m * N + i] = static_cast<scalar_t>(lt[i * M + m]);
          }
        }
      }
    }
  });
}

}  // namespace

// Declared in cpu/cpu_ops.h: the layer composite (fused/conv_paca_layer.cpp) calls it directly.
at::Tensor conv_cluster_logits_cpu(const at::Tensor& x, int64_t H, int64_t W,
                                   const at::Tensor& dw_weight,
                                   const std::optional<at::Tensor>& dw_bias, const at::Tensor& w1,
                                   const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                   const std::optional<at::Tensor>& b2) {
  const int64_t k = check_grid_and_depthwise(kOp, x, H, W, dw_weight, "dw_weight");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(w2.dim() == 4, kOp, ": expected w2 of shape (M, C, 1, 1), got ", w2.sizes());
  const int64_t M = w2.size(0);
  check_param(kOp, w1, x, {C, C, 1, 1}, "w1");
  check_param(kOp, w2, x, {M, C, 1, 1}, "w2");
  check_param(kOp, dw_bias, x, {C}, "dw_bias");
  check_param(kOp, b1, x, {C}, "b1");
  check_param(kOp, b2, x, {M}, "b2");

  at::Tensor out = empty_output({B, M, N}, x.options());
  if (B * M == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_cluster_logits",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    HeadParams<acc_t> prm(w1.reshape({C, C}), w2.reshape({M, C}),
                          std::is_same_v<scalar_t, at::BFloat16>);
    prm.dw_t = transposed<acc_t>(dw_weight.reshape({C, k * k}));
    if (dw_bias) {
      prm.dw_b = to_vector<acc_t>(*dw_bias);
      prm.has_dw_b = true;
    }
    prm.b1 = b1 ? to_vector<acc_t>(*b1) : std::vector<acc_t>(C, acc_t(0));
    if (b2) {
      prm.b2 = to_vector<acc_t>(*b2);
      prm.has_b2 = true;
    }
    conv_cluster_logits_kernel<scalar_t>(x, H, W, k, prm, M, out);
  });
  return out;
}

}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("conv_cluster_logits", &paca_kernels::conv_cluster_logits_cpu);
}
