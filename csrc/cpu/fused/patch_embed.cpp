// CPU kernel of paca_kernels::patch_embed (schema and semantics: csrc/registration.cpp): a
// PaCa-ViT stem or stage transition (DownsampleV1: a k x k conv of stride s, then a LayerNorm over
// the output channels) from channels-last pixels to channels-last pixels, in inference.
//
// Through PyTorch it is a oneDNN convolution (which reorders the weight to its blocked layout on
// every call: 4.4 MB for the 320 -> 384 transition), two permutes and a LayerNorm over a strided
// view, which copies. Measured inside PaCa-ViT-Small at B = 1 (2 threads), the 320 -> 384
// convolution alone took 1.6-1.9 ms for 108 MFLOP (60 GF/s). Here the conv is one matrix product
// per block of output pixels: the block's k x k x C input patches gathered tap by tap (each tap a
// contiguous run of C channels, so the gather is a copy) times the weight, packed once and kept
// across calls (PackCache) with its reduction steps in the same tap-major order, then the bias and
// the LayerNorm on the block's rows while they are in cache. Every output pixel is computed by one
// task in a fixed order: results do not depend on the thread count.

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
#include "cpu/output_pool.h"
#include "cpu/math/kernels.h"
#include "cpu/math/layernorm.h"
#include "cpu/math/packing.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"
#include "cpu/math/tensor_access.h"

namespace paca_kernels {
using namespace cpu;
namespace {

constexpr const char* kEmbedOp = "paca_kernels::patch_embed";
// Gathered patches per block: about 1 MiB of them (rows x k*k*C float32), so that the product reads
// each packed weight panel once for many rows, and the block stays in a 2 MiB L2 beside a panel.
constexpr int64_t kPatchBytes = int64_t(1) << 20;
constexpr int64_t kMaxBlockRows = 512;
// Channels per tap below which the gather converts value by value (a call of the vectorised
// conversion per tap costs more than it saves for the stem's 3 channels).
constexpr int64_t kMinVectorRun = 32;
// The weight's cache entry for the tap-major order (PackedMatrix's tag).
constexpr int64_t kTapMajorTag = 1;

template <typename acc_t>
struct EmbedNorm {
  bool on = false;
  std::vector<acc_t> weight, bias;  // empty: no affine part
  acc_t eps = 0;
  // row (n values) = LayerNorm(row) * weight + bias, in place, with the overflow-free statistics
  // of cpu/math/layernorm.h.
  void apply(acc_t* row, int64_t n) const {
    const LayerNormStats<acc_t> st = layer_norm_stats(row, n, eps);
    for (int64_t c = 0; c < n; ++c) {
      acc_t v = (row[c] * st.inv_scale - st.mean) * st.rstd;
      if (!weight.empty()) v *= weight[c];
      if (!bias.empty()) v += bias[c];
      row[c] = v;
    }
  }
};

template <typename scalar_t>
void patch_embed_kernel(const at::Tensor& x, int64_t k, int64_t stride, int64_t padding,
                        const PackedMatrix<at::opmath_type<scalar_t>>& wm,
                        const at::opmath_type<scalar_t>* bias,
                        const EmbedNorm<at::opmath_type<scalar_t>>& norm, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using out_t = scalar_t;
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t Ho = out.size(1), Wo = out.size(2), Co = out.size(3);
  const int64_t P = Ho * Wo, K = k * k * C;
  const Strides sx(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  constexpr bool kInPlace = std::is_same_v<out_t, acc_t>;  // products straight into `out`
  // Rows per block: kPatchBytes of patches, a multiple of 8 (the products' row tile), evened out
  // over the image's P pixels so that no block is a sliver. A function of the shapes only.
  // At most kMaxBlockRows rows: with a narrow K (the stem's 3 x 3 x 3) a 1 MiB block would be
  // thousands of rows whose outputs no longer fit in L2 beside the patches.
  const int64_t cap = std::clamp<int64_t>(kPatchBytes / (K * int64_t(sizeof(acc_t))) / 8 * 8, 8,
                                          kMaxBlockRows);
  const int64_t nblk = (P + cap - 1) / cap;
  const int64_t rb = std::min<int64_t>(P, ((P + nblk - 1) / nblk + 7) / 8 * 8);
  const int64_t nb = (P + rb - 1) / rb;
  // Column groups when the blocks are fewer than two per thread (B = 1 at the later stages: one
  // block of 49 pixels): each task then multiplies its block by a slice of the weight's columns
  // (whole 32-column pairs of panels). A column of the product is the same sum whichever slice
  // computes it, so the bits do not depend on this (nor on the thread count it follows).
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  int64_t cg = 1;
  while (B * nb * cg < want && Co / (2 * cg) >= 32) cg *= 2;
  std::vector<int64_t> cb(static_cast<size_t>(cg + 1));
  for (int64_t g = 0; g <= cg; ++g) cb[g] = g == cg ? Co : (Co * g / cg) / 32 * 32;
  // Where the products go: `out` itself for float32 and float64; otherwise float32 rows, per task
  // (one column group: normalised and converted there) or for the whole output (several: the
  // LayerNorm needs all of a row's columns, so it and the conversion come after the tasks).
  const bool late = cg > 1;
  const Scratch<acc_t> whole(ScratchSlot::kCall1, !kInPlace && late ? B * P * Co : 0);
  out_t* const op = out.mutable_data_ptr<out_t>();
  acc_t* dst_all = whole.data();
  if constexpr (kInPlace) dst_all = op;

  parallel_for(0, B * nb * cg, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> a(ScratchSlot::kTask0, rb * K);
    const Scratch<acc_t> rows_buf(ScratchSlot::kTask1, !kInPlace && !late ? rb * Co : 0);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t g = task % cg, blk = task / cg % nb, b = task / cg / nb;
      const int64_t p0 = blk * rb, rows = std::min(rb, P - p0);
      // The patches of pixels p0 .. p0 + rows - 1: row r holds tap t = ky*k + kx's C channels at
      // t*C (zero where the tap falls in the padding).
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t oy = (p0 + r) / Wo, ox = (p0 + r) % Wo;
        acc_t* arow = a.data() + r * K;
        for (int64_t ky = 0; ky < k; ++ky) {
          const int64_t iy = oy * stride - padding + ky;
          for (int64_t kx = 0; kx < k; ++kx) {
            const int64_t ix = ox * stride - padding + kx;
            acc_t* d = arow + (ky * k + kx) * C;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) {
              std::fill(d, d + C, acc_t(0));
              continue;
            }
            const scalar_t* s = xp + b * sx[0] + iy * sx[1] + ix * sx[2];
            if (sx[3] == 1) {
              if constexpr (std::is_same_v<scalar_t, acc_t>) {
                std::copy(s, s + C, d);
              } else if (C >= kMinVectorRun) {
                convert_row(s, d, C);
              } else {
                for (int64_t c = 0; c < C; ++c) d[c] = static_cast<acc_t>(s[c]);
              }
            } else {
              for (int64_t c = 0; c < C; ++c) d[c] = static_cast<acc_t>(s[c * sx[3]]);
            }
          }
        }
      }
      const int64_t c0 = cb[g], c1 = cb[g + 1];
      acc_t* const dst = kInPlace || late ? dst_all + (b * P + p0) * Co : rows_buf.data();
      if (cg == 1) {
        wm.linear(a.data(), K, dst, Co, rows, bias, /*gelu=*/false);
      } else {
        wm.linear_cols(a.data(), K, dst + c0, Co, rows, c0, c1, bias ? bias + c0 : nullptr,
                       /*gelu=*/false);
      }
      if (late) continue;
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* row = dst + r * Co;
        if (norm.on) norm.apply(row, Co);
        if constexpr (!kInPlace) convert_row(row, op + (b * P + p0 + r) * Co, Co);
      }
    }
  });
  if (!late || (!norm.on && kInPlace)) return;
  // The LayerNorm (and the conversion) of every output row, after all its column groups.
  parallel_for(0, B * P, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      acc_t* row = dst_all + r * Co;
      if (norm.on) norm.apply(row, Co);
      if constexpr (!kInPlace) convert_row(row, op + r * Co, Co);
    }
  });
}

at::Tensor patch_embed_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t stride, int64_t padding,
                           bool norm, const std::optional<at::Tensor>& norm_weight,
                           const std::optional<at::Tensor>& norm_bias, double eps) {
  check_dim(x_in, 4, kEmbedOp, "x", "(B, H, W, C) (channels last)");
  check_supported_float(x_in, kEmbedOp, "x");
  // Channels not contiguous (the stem's (B, 3, H, W) image viewed channels last): one copy to
  // channels last first, so that the gather copies runs of channels instead of reading each value
  // a plane apart (in PaCa-ViT-Small at B = 1, the strided gather made the stem's first conv twice
  // as slow as the copy and the contiguous gather together).
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK(C > 0, kEmbedOp, ": expected C > 0 channels, got x of shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == C && weight.size(2) == weight.size(3) &&
                  weight.size(2) > 0 && weight.size(0) > 0,
              kEmbedOp, ": expected weight of shape (Co, ", C, ", k, k) with Co, k > 0, got ",
              weight.sizes());
  const int64_t Co = weight.size(0), k = weight.size(2);
  check_param(kEmbedOp, weight, x, {Co, C, k, k}, "weight");
  check_param(kEmbedOp, bias, x, {Co}, "bias");
  check_param(kEmbedOp, norm_weight, x, {Co}, "norm_weight");
  check_param(kEmbedOp, norm_bias, x, {Co}, "norm_bias");
  TORCH_CHECK(stride > 0 && padding >= 0, kEmbedOp, ": expected stride > 0 and padding >= 0, got ",
              stride, " and ", padding);
  TORCH_CHECK(norm || (!norm_weight && !norm_bias), kEmbedOp,
              ": norm_weight and norm_bias are only taken with norm=True");
  TORCH_CHECK(!norm || eps >= 0, kEmbedOp, ": expected eps >= 0, got ", eps);
  TORCH_CHECK(H + 2 * padding >= k && W + 2 * padding >= k, kEmbedOp, ": the ", k, "x", k,
              " kernel does not fit the padded ", H, "x", W, " image (padding ", padding, ")");
  const int64_t Ho = (H + 2 * padding - k) / stride + 1, Wo = (W + 2 * padding - k) / stride + 1;
  at::Tensor out = empty_output({B, Ho, Wo, Co}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_embed", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // bf16 x (a bf16 model, or autocast): the conv as bf16 products with float32 sums, as the bf16
    // convolution computes it; the bias and the LayerNorm in float32.
    constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
    // The weight as the right-hand side with its reduction steps tap-major, (Co, k*k*C): the
    // order of the gathered patches. Keyed by the (Co, C*k*k) view of the parameter when it is
    // contiguous (a permuted copy is no key: it is new on every call).
    const at::Tensor key = weight.is_contiguous() ? weight.view({Co, C * k * k})
                                                  : weight.reshape({Co, C * k * k});
    const PackedMatrix<acc_t> wm(key, ScratchSlot::kCall0, kBf16, kTapMajorTag, [&] {
      return weight.permute({0, 2, 3, 1}).reshape({Co, k * k * C});
    });
    std::vector<acc_t> bv;
    if (bias) bv = to_vector<acc_t>(*bias);
    EmbedNorm<acc_t> nm;
    nm.on = norm;
    nm.eps = static_cast<acc_t>(eps);
    if (norm_weight) nm.weight = to_vector<acc_t>(*norm_weight);
    if (norm_bias) nm.bias = to_vector<acc_t>(*norm_bias);
    patch_embed_kernel<scalar_t>(x, k, stride, padding, wm, bias ? bv.data() : nullptr, nm, out);
  });
  return out;
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("patch_embed", &paca_kernels::patch_embed_cpu);
}
