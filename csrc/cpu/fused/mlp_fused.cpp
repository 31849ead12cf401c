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

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "cpu/fused/conv_front.h"
#include "cpu/math/dwconv.h"
#include "cpu/math/kernels.h"
#include "cpu/math/packing.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"
#include "cpu/math/tensor_access.h"

namespace paca_kernels {
using namespace cpu;
namespace {

template <typename scalar_t>
void mlp_fused_kernel(const at::Tensor& x, int64_t H, int64_t W, int64_t k,
                      const PackedMatrix<at::opmath_type<scalar_t>>& w1_t,
                      const at::opmath_type<scalar_t>* b1,
                      const std::vector<at::opmath_type<scalar_t>>& wt,
                      const at::opmath_type<scalar_t>* dw_b, bool gelu,
                      const PackedMatrix<at::opmath_type<scalar_t>>& w2_t,
                      const at::opmath_type<scalar_t>* b2, int64_t Hd, int64_t Co,
                      at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int64_t pad = (k - 1) / 2;
  const Strides sx(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();  // (B, N, Co) contiguous
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
  while (B * parts < want && (H + 2 * parts - 1) / (2 * parts) >= min_chunk) parts *= 2;
  const int64_t chunk = (H + parts - 1) / parts;
  constexpr bool kInPlaceA = std::is_same_v<scalar_t, acc_t>;
  const bool x_direct = kInPlaceA && sx[2] == 1;  // fc1 reads x's rows in place
  const int64_t cap = nr + 2 * pad;               // hidden rows held at once

  parallel_for(0, B * parts, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> hbuf(ScratchSlot::kTask0, cap * W * Hd), g(ScratchSlot::kTask1, nr * W * Hd),
        xa(ScratchSlot::kTask2, x_direct ? 0 : cap * W * C),
        ob(ScratchSlot::kTask3, kInPlaceA ? 0 : nr * W * Co);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / parts, ya = (task % parts) * chunk;
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
            std::memmove(hbuf.data(), hbuf.data() + (need_lo - h_lo) * W * Hd,
                         sizeof(acc_t) * keep * W * Hd);
          }
          h_lo = need_lo;
          h_hi = need_lo + keep;
        }
        if (need_hi > h_hi) {  // fc1 (without its bias) for the rows entering the window
          const int64_t nt = (need_hi - h_hi) * W;
          const int64_t n0 = h_hi * W;
          const acc_t* a;
          int64_t lda;
          if (x_direct) {
            if constexpr (kInPlaceA) a = xp + b * sx[0] + n0 * sx[1];
            lda = sx[1];
          } else {
            const scalar_t* xb = xp + b * sx[0] + n0 * sx[1];
            for (int64_t i = 0; i < nt; ++i) {
              if (sx[2] == 1) {  // a row at a time (vectorised bf16 -> float32)
                convert_row(xb + i * sx[1], xa.data() + i * C, C);
                continue;
              }
              for (int64_t c = 0; c < C; ++c) {
                xa[i * C + c] = static_cast<acc_t>(xb[i * sx[1] + c * sx[2]]);
              }
            }
            a = xa.data();
            lda = C;
          }
          w1_t.linear(a, lda, hbuf.data() + (h_hi - h_lo) * W * Hd, Hd, nt, nullptr,
                      /*gelu=*/false);
          h_hi = need_hi;
        }
        dwconv_rows(hbuf.data(), Hd, h_lo, H, W, y, rows, wt.data(), dw_b, b1, gelu, g.data(), Hd,
                    k);
        const int64_t nt = rows * W;
        acc_t* dst;
        if constexpr (kInPlaceA) {
          dst = op + (b * N + y * W) * Co;
        } else {
          dst = ob.data();
        }
        w2_t.linear(g.data(), Hd, dst, Co, nt, b2, /*gelu=*/false);
        if constexpr (!kInPlaceA) {
          convert_row(dst, op + (b * N + y * W) * Co, nt * Co);
        }
      }
    }
  });
}

at::Tensor mlp_fused_cpu(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& fc1_weight,
                         const std::optional<at::Tensor>& fc1_bias, const at::Tensor& dw_weight,
                         const std::optional<at::Tensor>& dw_bias, bool shortcut, bool gelu,
                         const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias) {
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
  const int64_t B = x.size(0), N = x.size(1);
  at::Tensor out = at::empty({B, N, Co}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // bf16 inputs (a bf16 model, or autocast): fc1 and fc2 as bf16 products with float32 sums,
    // as the bf16 linears compute them; the conv, GELU and the hidden rows stay float32.
    constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
    const PackedMatrix<acc_t> w1_t(fc1_weight, ScratchSlot::kCall0, kBf16);  // fc1^T (C, hidden)
    const PackedMatrix<acc_t> w2_t(fc2_weight, ScratchSlot::kCall1, kBf16);  // fc2^T (hidden, out)
    std::vector<acc_t> wt = transposed<acc_t>(dw_weight.reshape({Hd, k * k}));  // (k*k, hidden)
    if (shortcut) {
      const int64_t centre = (k / 2) * k + k / 2;
      for (int64_t c = 0; c < Hd; ++c) wt[centre * Hd + c] += acc_t(1);
    }
    std::vector<acc_t> b1v, dbv, b2v;
    if (fc1_bias) b1v = to_vector<acc_t>(*fc1_bias);
    if (dw_bias) dbv = to_vector<acc_t>(*dw_bias);
    if (fc2_bias) b2v = to_vector<acc_t>(*fc2_bias);
    mlp_fused_kernel<scalar_t>(x, H, W, k, w1_t, fc1_bias ? b1v.data() : nullptr, wt,
                               dw_bias ? dbv.data() : nullptr, gelu, w2_t,
                               fc2_bias ? b2v.data() : nullptr, Hd, Co, out);
  });
  return out;
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("mlp_fused", &paca_kernels::mlp_fused_cpu);
}
