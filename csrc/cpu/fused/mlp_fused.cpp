// CPU kernel of paca_kernels::mlp_fused (schema and semantics: csrc/registration.cpp):
// out = fc2(act(dwconv(fc1(x)))) for the PaCa-ViT MLP (DWConv with its
// shortcut, act = exact GELU or identity), in inference. The hidden activations are 4x wider than
// the tokens: through PyTorch each of them (fc1's output, the conv's, the GELU's) is a fresh
// tensor of B*N*4C values written to and read back from memory (at PaCa-ViT-Tiny's first stage,
// B = 8: 38.5 MB each, which glibc maps fresh and page-faults in on every call). Here they never
// leave the cache: each task walks down the image rows of its chunk, `nr` output rows at a time,
// computing fc1 for the rows that enter the conv's window (rows already computed for the previous
// step are kept, so a hidden row is computed once per chunk), the conv + GELU for the nr rows, and
// fc2 for them straight into the output. fc1's bias is added as the conv loads its input (so the
// zero padding stays unbiased, as for the module), the shortcut is folded into the centre tap.
// Every output is computed by one task in a fixed order: results do not depend on the thread count.
//
// With the block's ends (norm, residual: PaCaBlock's x + mlp(norm2(x)) in one call) the LayerNorm
// runs first, one parallel pass over the rows into a scratch buffer fc1 then reads (the dispatched
// 8-lane LayerNorm, cpu/math/dispatch.h), and the residual is added as each output row is written
// (after rounding the MLP's output as the modules would: to bf16 under autocast or in a bf16
// model). In the PaCa-ViT-Tiny forward at B = 1 that took 4 % (fp32, bf16) to 6 % (autocast)
// off the whole model against PyTorch's LayerNorm and add around the MLP (in-process A/B), the
// layer_norm and add calls, their tensors and, under autocast, the cast of the norm's output gone.
//
// Small images at small batches (B = 1 at 14 x 14: one image of 14 rows) give too few row chunks
// for the threads, and each chunk boundary recomputes k - 1 hidden rows (4-row chunks of a 14-row
// image computed fc1 for 20 rows, and the two threads got 19 and 15 rows' work). There the hidden
// channels are split instead (channel groups, mlp_groups below): the depthwise conv and GELU are
// per channel, so a group's fc1 columns, conv and GELU need no other group's, and its slice of
// fc2's reduction gives a partial output; the partials are summed in group order afterwards. No
// hidden row is computed twice and the groups are equal work. The number of groups depends on the
// shapes only, so results still do not depend on the thread count.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "cpu/fused/conv_front.h"
#include "cpu/output_pool.h"
#include "cpu/math/dwconv.h"
#include "cpu/math/kernels.h"
#include "cpu/math/layernorm.h"
#include "cpu/math/packing.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"
#include "cpu/math/tensor_access.h"

namespace paca_kernels {
using namespace cpu;
namespace {

// Images of at most this many rows are split into channel groups at small batches (mlp_groups).
constexpr int64_t kMlpGroupMaxRows = 32;

// Channel groups for (B, H, hidden): 1 (rows split only) unless the batch is small and the
// image short, where row chunks would be few and their recomputed rows costly; then enough groups
// for 4 tasks with B images (each group at least 16 channels, the packed panels' width). A
// function of the shapes only (the bits depend on it).
int64_t mlp_groups(int64_t B, int64_t H, int64_t Hd) {
  if (B >= 4 || H > kMlpGroupMaxRows) return 1;
  int64_t g = B == 1 ? 4 : 2;
  while (g > 1 && Hd < 16 * g) g /= 2;
  return g;
}

// Group g's hidden channels are [bounds[g], bounds[g + 1]): near-equal slices, each boundary a
// multiple of 16 (so a slice of the packed fc1 is whole panels).
std::vector<int64_t> mlp_group_bounds(int64_t Hd, int64_t G) {
  std::vector<int64_t> b(static_cast<size_t>(G + 1));
  for (int64_t g = 0; g <= G; ++g) b[g] = g == G ? Hd : (Hd * g / G) / 16 * 16;
  return b;
}

// What one channel group needs: its fc2 slice (fc2_weight[:, h0:h1], packed on its own as the
// right-hand side of the partial product), its conv taps (k*k, h1 - h0), its bias slices.
template <typename acc_t>
struct MlpGroup {
  int64_t h0 = 0, h1 = 0;
  std::unique_ptr<PackedMatrix<acc_t>> w2;
  std::vector<acc_t> wt;
};

// The optional ends of the MLP (mlp_fused's norm, residual and bf16_products): the LayerNorm in
// front of fc1 and the residual add after fc2, as a pre-norm transformer block has them around
// its MLP (PaCaBlock: x + mlp(norm2(x))), and where the values are rounded as the modules would
// round them.
template <typename acc_t>
struct MlpEnds {
  bool norm = false;
  std::vector<acc_t> norm_weight, norm_bias;  // empty: no affine part
  acc_t eps = 0;
  bool residual = false;
  // The modules' dtype around the MLP is bf16 with float32 x (bf16 products: CPU autocast): the
  // MLP's output is rounded to bf16 before the residual add.
  bool bf16 = false;
};

template <typename scalar_t>
void mlp_fused_kernel(const at::Tensor& x, int64_t H, int64_t W, int64_t k,
                      const PackedMatrix<at::opmath_type<scalar_t>>& w1_t,
                      const at::opmath_type<scalar_t>* b1,
                      const std::vector<MlpGroup<at::opmath_type<scalar_t>>>& groups,
                      const at::opmath_type<scalar_t>* dw_b, bool gelu,
                      const at::opmath_type<scalar_t>* b2, int64_t Co,
                      const MlpEnds<at::opmath_type<scalar_t>>& ends, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int64_t G = static_cast<int64_t>(groups.size());
  const int64_t pad = (k - 1) / 2;
  const Strides sx(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();  // (B, N, Co) contiguous
  int64_t Hmax = 0;
  for (const auto& grp : groups) Hmax = std::max(Hmax, grp.h1 - grp.h0);
  // Output rows per step: about 128 tokens, so that the step's hidden rows ((nr + k - 1) x W x 4C)
  // stay in L2. Chunks of rows per task: whole images when there are enough of them for every
  // thread, else halves, quarters... (a chunk boundary costs k - 1 recomputed hidden rows).
  const int64_t nr = std::clamp<int64_t>(128 / W, 1, H);
  int64_t parts = 1;
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  // Halving stops at chunks of 4 rows (or k): below that the k - 1 recomputed hidden rows per
  // chunk cost more than a second thread gains. (It stopped at nr rows: at B = 1 the 14 x 14 stage
  // was one task, the MLP ran on one core of two.)
  const int64_t min_chunk = std::max<int64_t>(4, k);
  while (B * G * parts < want && (H + 2 * parts - 1) / (2 * parts) >= min_chunk) parts *= 2;
  const int64_t chunk = (H + parts - 1) / parts;
  constexpr bool kInPlaceA = std::is_same_v<scalar_t, acc_t>;
  // With the norm, fc1's input is LayerNorm(x) (acc_t, contiguous), computed by one parallel pass
  // first: the tasks' rows overlap (k - 1 hidden rows recomputed per chunk boundary, and with
  // channel groups every group reads every row), so normalising rows as the tasks load them did
  // the LayerNorm up to G + 1 times per row (measured: the prologue then cost more than
  // PyTorch's layer_norm and add together). (Not rounded to bf16 for the products: they round
  // their left-hand side as they read it, or use it unrounded where the CPU has no bf16
  // products: packing.h.)
  const Scratch<acc_t> xn(ScratchSlot::kCall6, ends.norm ? B * N * C : 0);
  if (ends.norm) {
    const bool affine_w = !ends.norm_weight.empty(), affine_b = !ends.norm_bias.empty();
    const acc_t* nw = affine_w ? ends.norm_weight.data() : nullptr;
    const acc_t* nb = affine_b ? ends.norm_bias.data() : nullptr;
    parallel_for(0, B * N, std::max<int64_t>(1, kGrainSize / (8 * C)), [&](int64_t lo, int64_t hi) {
      // Rows of one image at a time: x's rows read where they are when they are acc_t and
      // contiguous over C, else converted into xn first and normalised there.
      for (int64_t r0 = lo; r0 < hi;) {
        const int64_t b = r0 / N, r1 = std::min(hi, (b + 1) * N);
        const scalar_t* xr = xp + b * sx[0] + (r0 - b * N) * sx[1];
        acc_t* yr = xn.data() + r0 * C;
        if constexpr (kInPlaceA) {
          if (sx[2] == 1) {
            layer_norm_rows(xr, sx[1], yr, C, r1 - r0, C, nw, nb, ends.eps);
            r0 = r1;
            continue;
          }
        }
        for (int64_t r = 0; r < r1 - r0; ++r) {
          if (sx[2] == 1) {
            convert_row(xr + r * sx[1], yr + r * C, C);
          } else {
            for (int64_t c = 0; c < C; ++c) yr[r * C + c] = static_cast<acc_t>(xr[r * sx[1] + c * sx[2]]);
          }
        }
        layer_norm_rows(yr, C, yr, C, r1 - r0, C, nw, nb, ends.eps);
        r0 = r1;
      }
    });
  }
  // fc1 reads its input rows in place (x's, or the normalised ones), else converts them.
  const bool x_direct = ends.norm || (kInPlaceA && sx[2] == 1);
  // The MLP's output rows s (rows x Co, acc_t, tokens n0 .. of image b) as the block continues
  // with them: rounded to the modules' dtype (bf16 under autocast; x's in a bf16 or fp16 model,
  // whose residual add sums two rounded values), plus x's rows (the residual), into dst (x's dtype;
  // dst may be s itself where x's dtype is acc_t). tmp: Co values of scratch (x's row, rounding).
  const auto finish = [&](acc_t* s, int64_t b, int64_t n0, int64_t rows, scalar_t* dst,
                          acc_t* tmp) {
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* sr = s + r * Co;
      if constexpr (std::is_same_v<acc_t, float>) {
        auto* t16 = reinterpret_cast<c10::BFloat16*>(tmp);
        if (ends.bf16) {
          round_through<c10::BFloat16>(sr, Co, t16);
        } else if (ends.residual && !kInPlaceA) {
          round_through<scalar_t>(sr, Co, t16);
        }
      }
      if (ends.residual) {
        const scalar_t* xr = xp + b * sx[0] + (n0 + r) * sx[1];
        if (sx[2] != 1) {
          for (int64_t c = 0; c < Co; ++c) sr[c] += static_cast<acc_t>(xr[c * sx[2]]);
        } else if constexpr (kInPlaceA) {
          for (int64_t c = 0; c < Co; ++c) sr[c] += xr[c];
        } else {
          convert_row(xr, tmp, Co);
          for (int64_t c = 0; c < Co; ++c) sr[c] += tmp[c];
        }
      }
      if constexpr (!kInPlaceA) {
        convert_row(sr, dst + r * Co, Co);
      } else if (dst != sr) {
        std::copy(sr, sr + Co, dst + r * Co);
      }
    }
  };
  const int64_t cap = nr + 2 * pad;               // hidden rows held at once
  // With one group, the output rows straight into `out` (float32, float64) or through a
  // per-step buffer (bf16, fp16); with several, each group's partial product into its plane of
  // `part` (G x B x N x Co, fc2's bias in group 0's), summed below.
  const Scratch<acc_t> part(ScratchSlot::kCall5, G > 1 ? G * B * N * Co : 0);
  const bool direct_out = kInPlaceA && G == 1;

  parallel_for(0, B * parts * G, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> hbuf(ScratchSlot::kTask0, cap * W * Hmax), g(ScratchSlot::kTask1, nr * W * Hmax),
        xa(ScratchSlot::kTask2, x_direct ? 0 : cap * W * C),
        ob(ScratchSlot::kTask3, direct_out || G > 1 ? 0 : nr * W * Co),
        tmp(ScratchSlot::kTask4, ends.residual || ends.bf16 ? Co : 0);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t gi = task % G, b = task / G / parts, ya = (task / G % parts) * chunk;
      const MlpGroup<acc_t>& grp = groups[gi];
      const int64_t Hg = grp.h1 - grp.h0;
      const int64_t yb = std::min(H, ya + chunk);
      if (ya >= yb) continue;
      int64_t h_lo = std::max<int64_t>(0, ya - pad), h_hi = h_lo;  // hidden rows in hbuf
      for (int64_t y = ya; y < yb; y += nr) {
        const int64_t rows = std::min(nr, yb - y);
        const int64_t need_lo = std::max<int64_t>(0, y - pad);
        const int64_t need_hi = std::min<int64_t>(H, y + rows + pad);
        if (need_lo > h_lo) {  // drop the rows above the window, keep the overlap
          const int64_t keep = std::max<int64_t>(0, h_hi - need_lo);
          if (keep > 0) {
            std::memmove(hbuf.data(), hbuf.data() + (need_lo - h_lo) * W * Hg,
                         sizeof(acc_t) * keep * W * Hg);
          }
          h_lo = need_lo;
          h_hi = need_lo + keep;
        }
        if (need_hi > h_hi) {  // fc1 (without its bias) for the rows entering the window
          const int64_t nt = (need_hi - h_hi) * W;
          const int64_t n0 = h_hi * W;
          const acc_t* a;
          int64_t lda;
          if (ends.norm) {
            a = xn.data() + (b * N + n0) * C;
            lda = C;
          } else if (x_direct) {
            if constexpr (kInPlaceA) a = xp + b * sx[0] + n0 * sx[1];
            lda = sx[1];
          } else {
            const scalar_t* xb = xp + b * sx[0] + n0 * sx[1];
            for (int64_t i = 0; i < nt; ++i) {
              if (sx[2] == 1) {  // a row at a time (vectorised bf16 -> float32)
                convert_row(xb + i * sx[1], xa.data() + i * C, C);
              } else {
                for (int64_t c = 0; c < C; ++c) {
                  xa[i * C + c] = static_cast<acc_t>(xb[i * sx[1] + c * sx[2]]);
                }
              }
            }
            a = xa.data();
            lda = C;
          }
          acc_t* hrow = hbuf.data() + (h_hi - h_lo) * W * Hg;
          if (G == 1) {
            w1_t.linear(a, lda, hrow, Hg, nt, nullptr, /*gelu=*/false);
          } else {
            w1_t.linear_cols(a, lda, hrow, Hg, nt, grp.h0, grp.h1, nullptr, /*gelu=*/false);
          }
          h_hi = need_hi;
        }
        // hbuf's rows were just written by fc1's product: in cache.
        dwconv_rows(hbuf.data(), Hg, h_lo, H, W, y, rows, grp.wt.data(),
                    dw_b ? dw_b + grp.h0 : nullptr, b1 ? b1 + grp.h0 : nullptr, gelu, g.data(), Hg,
                    k, /*cached=*/true);
        const int64_t nt = rows * W;
        acc_t* dst;
        if (G > 1) {
          dst = part.data() + ((gi * B + b) * N + y * W) * Co;
        } else if constexpr (kInPlaceA) {
          dst = op + (b * N + y * W) * Co;
        } else {
          dst = ob.data();
        }
        grp.w2->linear(g.data(), Hg, dst, Co, nt, gi == 0 ? b2 : nullptr, /*gelu=*/false);
        if (G == 1) {
          scalar_t* orow = op + (b * N + y * W) * Co;
          if (ends.residual || ends.bf16) {
            finish(dst, b, y * W, nt, orow, tmp.data());
          } else if constexpr (!kInPlaceA) {
            convert_row(dst, orow, nt * Co);
          }
        }
      }
    }
  });
  if (G == 1) return;
  // out = ((part_0 + part_1) + part_2) + ..., token rows in parallel (each row summed once, in
  // group order: the bits do not depend on the thread count).
  const int64_t plane = B * N * Co;
  parallel_for(0, B * N, 64, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> row(ScratchSlot::kTask0, kInPlaceA ? 0 : Co),
        tmp(ScratchSlot::kTask1, ends.residual || ends.bf16 ? Co : 0);
    for (int64_t r = lo; r < hi; ++r) {
      acc_t* s = kInPlaceA ? reinterpret_cast<acc_t*>(op) + r * Co : row.data();
      const acc_t* p0 = part.data() + r * Co;
      for (int64_t c = 0; c < Co; ++c) s[c] = p0[c];
      for (int64_t gi = 1; gi < G; ++gi) {
        const acc_t* pg = part.data() + gi * plane + r * Co;
        for (int64_t c = 0; c < Co; ++c) s[c] += pg[c];
      }
      if (ends.residual || ends.bf16) {
        finish(s, r / N, r % N, 1, op + r * Co, tmp.data());
      } else if constexpr (!kInPlaceA) {
        convert_row(s, op + r * Co, Co);
      }
    }
  });
}

at::Tensor mlp_fused_cpu(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& fc1_weight,
                         const std::optional<at::Tensor>& fc1_bias, const at::Tensor& dw_weight,
                         const std::optional<at::Tensor>& dw_bias, bool shortcut, bool gelu,
                         const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                         bool norm, const std::optional<at::Tensor>& norm_weight,
                         const std::optional<at::Tensor>& norm_bias, double eps, bool residual,
                         bool bf16_products) {
  constexpr const char* kMlpOp = "paca_kernels::mlp_fused";
  check_dim(x, 3, kMlpOp, "x", "(B, N, C)");
  const int64_t C = x.size(2);
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.size(1) == C, kMlpOp,
              ": expected fc1_weight of shape (hidden, C) with C = ", C, ", got ",
              fc1_weight.sizes());
  const int64_t Hd = fc1_weight.size(0);
  TORCH_CHECK(fc2_weight.dim() == 2 && fc2_weight.size(1) == Hd, kMlpOp,
              ": expected fc2_weight of shape (out, hidden) with hidden = ", Hd, ", got ",
              fc2_weight.sizes());
  const int64_t Co = fc2_weight.size(0);
  const int64_t k = check_grid_and_depthwise(kMlpOp, x, H, W, dw_weight, "dw_weight", Hd);
  TORCH_CHECK(Hd > 0 && Co > 0, kMlpOp, ": expected hidden and out widths > 0, got ", Hd, " and ",
              Co);
  check_param(kMlpOp, fc1_weight, x, {Hd, C}, "fc1_weight");
  check_param(kMlpOp, fc1_bias, x, {Hd}, "fc1_bias");
  check_param(kMlpOp, dw_bias, x, {Hd}, "dw_bias");
  check_param(kMlpOp, fc2_weight, x, {Co, Hd}, "fc2_weight");
  check_param(kMlpOp, fc2_bias, x, {Co}, "fc2_bias");
  check_param(kMlpOp, norm_weight, x, {C}, "norm_weight");
  check_param(kMlpOp, norm_bias, x, {C}, "norm_bias");
  TORCH_CHECK(norm || (!norm_weight && !norm_bias), kMlpOp,
              ": norm_weight and norm_bias are the LayerNorm's (norm=True)");
  TORCH_CHECK(!residual || Co == C, kMlpOp, ": residual=True needs out width == C, got ", Co,
              " and C = ", C);
  TORCH_CHECK(!bf16_products || x.scalar_type() == at::kFloat ||
                  x.scalar_type() == at::kBFloat16,
              kMlpOp, ": bf16_products=True takes float32 or bfloat16 x, got ", x.scalar_type());
  const int64_t B = x.size(0), N = x.size(1);
  at::Tensor out = empty_output({B, N, Co}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // bf16 inputs (a bf16 model, or autocast): fc1 and fc2 as bf16 products with float32 sums,
    // as the bf16 linears compute them; the conv, GELU and the hidden rows stay float32.
    // bf16_products with float32 x (CPU autocast, with the norm and residual around the MLP):
    // the same products, the rest in float32.
    const bool bf16 = std::is_same_v<scalar_t, at::BFloat16> || bf16_products;
    const PackedMatrix<acc_t> w1_t(fc1_weight, ScratchSlot::kCall0, bf16);  // fc1^T (C, hidden)
    std::vector<acc_t> wt = transposed<acc_t>(dw_weight.reshape({Hd, k * k}));  // (k*k, hidden)
    if (shortcut) {
      const int64_t centre = (k / 2) * k + k / 2;
      for (int64_t c = 0; c < Hd; ++c) wt[centre * Hd + c] += acc_t(1);
    }
    const int64_t G = mlp_groups(B, H, Hd);
    const std::vector<int64_t> bounds = mlp_group_bounds(Hd, G);
    std::vector<MlpGroup<acc_t>> groups(static_cast<size_t>(G));
    for (int64_t gi = 0; gi < G; ++gi) {
      MlpGroup<acc_t>& grp = groups[gi];
      grp.h0 = bounds[gi];
      grp.h1 = bounds[gi + 1];
      // fc2^T (hidden, out), or its rows h0 .. h1 - 1 (a view of fc2_weight's columns: its own
      // PackCache entry).
      grp.w2 = std::make_unique<PackedMatrix<acc_t>>(
          G == 1 ? fc2_weight : fc2_weight.slice(1, grp.h0, grp.h1),
          static_cast<ScratchSlot>(static_cast<int>(ScratchSlot::kCall1) + gi), bf16);
      if (G == 1) {
        grp.wt = std::move(wt);
        break;
      }
      const int64_t Hg = grp.h1 - grp.h0;
      grp.wt.resize(static_cast<size_t>(k * k * Hg));
      for (int64_t t = 0; t < k * k; ++t) {
        std::copy(wt.begin() + t * Hd + grp.h0, wt.begin() + t * Hd + grp.h1,
                  grp.wt.begin() + t * Hg);
      }
    }
    std::vector<acc_t> b1v, dbv, b2v;
    if (fc1_bias) b1v = to_vector<acc_t>(*fc1_bias);
    if (dw_bias) dbv = to_vector<acc_t>(*dw_bias);
    if (fc2_bias) b2v = to_vector<acc_t>(*fc2_bias);
    MlpEnds<acc_t> ends;
    ends.norm = norm;
    if (norm_weight) ends.norm_weight = to_vector<acc_t>(*norm_weight);
    if (norm_bias) ends.norm_bias = to_vector<acc_t>(*norm_bias);
    ends.eps = static_cast<acc_t>(eps);
    ends.residual = residual;
    ends.bf16 = bf16_products && std::is_same_v<scalar_t, float>;
    mlp_fused_kernel<scalar_t>(x, H, W, k, w1_t, fc1_bias ? b1v.data() : nullptr, groups,
                               dw_bias ? dbv.data() : nullptr, gelu,
                               fc2_bias ? b2v.data() : nullptr, Co, ends, out);
  });
  return out;
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("mlp_fused", &paca_kernels::mlp_fused_cpu);
}
