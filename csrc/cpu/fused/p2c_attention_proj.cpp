// CPU kernel of paca_kernels::p2c_attention_proj (schema and semantics: csrc/registration.cpp):
// the whole attention of a PaCa layer after the pooling. Inference only.
//
// Through PyTorch the rest of the layer is five ops: q = x.Wq^T + bq over the N patches, k and v
// over the M cluster tokens, the attention, and proj = o.Wp^T + bp. q and o are (B, N, C) tensors
// written to memory and read back, and each linear with a bias first broadcasts
// the bias into a freshly allocated output (at PaCa-ViT-Tiny's second stage, B = 8, fp32, one
// thread: 2 ms per patch linear for that copy, mostly page faults of the new 4.8 MB tensor). Here
// k and v are computed straight into the per-head packed layout the attention reads, and then each
// task takes a block of query rows of one image through the whole chain, all heads: the rows' q,
// scores and o live in a few tens of KiB of cache, the weights stay packed in L2, and the only
// tensor written is the output. Every output row is computed by one task in a fixed order: results
// do not depend on the thread count.

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
#include "cpu/output_pool.h"
#include "cpu/math/kernels.h"
#include "cpu/math/packing.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"
#include "cpu/math/tensor_access.h"

namespace paca_kernels {
using namespace cpu;
namespace {

constexpr const char* kProjOp = "paca_kernels::p2c_attention_proj";
// Query rows per task: enough rows to amortise each pass over the packed weights (C x C, up to a
// few hundred KiB), few enough that the q, score and o tiles stay in L1/L2.
constexpr int64_t kProjBlock = 64;
constexpr int64_t kMaxProjBlock = 72;  // kProjBlock evened out and rounded up to a multiple of 6

// A linear layer's weights as the kernel uses them: W^T (in x out) packed, and the bias (or none).
template <typename acc_t>
struct PackedLinear {
  PackedMatrix<acc_t> wt;
  std::vector<acc_t> bias;
  // bf16: bf16 products with float32 sums (PackedMatrix).
  PackedLinear(const at::Tensor& w, const std::optional<at::Tensor>& b, ScratchSlot slot,
               bool bf16)
      : wt(w, slot, bf16) {
    if (b) bias = to_vector<acc_t>(*b);
  }
  // Y[r, :] = A[r, :] . W^T + bias for r < rows (A row stride lda, Y row stride ldy).
  void apply(const acc_t* A, int64_t lda, acc_t* Y, int64_t ldy, int64_t rows) const {
    wt.linear(A, lda, Y, ldy, rows, bias.empty() ? nullptr : bias.data(), /*gelu=*/false);
  }
};

// The optional residual epilogue (p2c_attention_proj's residual): out rows = residual rows +
// the projection's rows y (rows x Co, acc_t) rounded to x's dtype first (as the proj module gives
// them), summed in acc_t and stored in the residual's dtype (x's, or float32 for bf16 / fp16 x:
// a pre-norm block's residual stream under autocast). tmp: rows * Co values of scratch.
template <typename scalar_t>
void add_residual_rows(at::opmath_type<scalar_t>* y, int64_t rows, int64_t Co,
                       const at::Tensor& res, int64_t b, int64_t n0, at::Tensor& out,
                       at::opmath_type<scalar_t>* tmp) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    round_through<scalar_t>(y, rows * Co, reinterpret_cast<c10::BFloat16*>(tmp));
  }
  const Strides sr(res);
  const int64_t N = out.size(1);
  const auto add = [&](auto* rp, auto* op) {
    using res_t = std::remove_const_t<std::remove_pointer_t<decltype(rp)>>;
    for (int64_t r = 0; r < rows; ++r) {
      const res_t* rr = rp + b * sr[0] + (n0 + r) * sr[1];
      res_t* orow = op + (b * N + n0 + r) * Co;
      acc_t* yr = y + r * Co;
      if constexpr (std::is_same_v<res_t, acc_t>) {
        if (sr[2] == 1) {
          for (int64_t c = 0; c < Co; ++c) orow[c] = yr[c] + rr[c];
          continue;
        }
        for (int64_t c = 0; c < Co; ++c) orow[c] = yr[c] + rr[c * sr[2]];
      } else {
        if (sr[2] == 1) {
          convert_row(rr, tmp, Co);
        } else {
          for (int64_t c = 0; c < Co; ++c) tmp[c] = static_cast<acc_t>(rr[c * sr[2]]);
        }
        for (int64_t c = 0; c < Co; ++c) yr[c] += tmp[c];
        convert_row(yr, orow, Co);
      }
    }
  };
  if (res.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    add(res.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  } else if constexpr (std::is_same_v<acc_t, float>) {
    add(res.const_data_ptr<float>(), out.mutable_data_ptr<float>());  // float32 stream (autocast)
  }
}

template <typename scalar_t>
void p2c_proj_kernel(const at::Tensor& x, const at::Tensor& c,
                     const PackedLinear<at::opmath_type<scalar_t>>& lq,
                     const PackedLinear<at::opmath_type<scalar_t>>& lk,
                     const PackedLinear<at::opmath_type<scalar_t>>& lv,
                     const PackedLinear<at::opmath_type<scalar_t>>& lp, int64_t H, double scale,
                     const at::Tensor* residual, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = c.size(1);
  const int64_t HD = lq.wt.cols, D = HD / H, Co = lp.wt.cols;
  const Strides sx(x), sc_(c);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* cp = c.const_data_ptr<scalar_t>();
  // (B, N, Co) contiguous, x's dtype (the residual's with one: written by add_residual_rows).
  scalar_t* op = residual == nullptr ? out.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t sc = static_cast<acc_t>(scale);

  // Keys and values of the M cluster tokens, k = c . Wk^T + bk and v = c . Wv^T + bv (M x h*d per
  // image, in acc_t: never rounded to the input dtype), laid out as the attention reads them: the
  // keys scaled and transposed (h*d x M per image: head hd's d x M block at row hd*d), the values
  // per head (M x d per (image, head)). One task per (image, k or v).
  //
  // bf16 inputs with bf16 products (AVX512-BF16 or AMX): the attention's two products are bf16
  // products too, as under autocast (q . k^T and the probabilities times v are bf16 matmuls there):
  // the keys (scaled) and the values are packed per (image, head) as bf16 pair panels instead, k^T
  // as the right-hand side (d steps x M columns) of the scores, v (M steps x d columns) of the
  // output. The scores, the softmax and the sums stay float32; the unnormalised probabilities
  // (exp(s - max) <= 1) are rounded to bf16 as the product reads them.
  constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;  // then acc_t is float
  const bool bf16_attn = kBf16 && float32_kernels().gemm_packed_bf16 != nullptr;
  // Sizes of one (image, head)'s panels, in acc_t (two bf16 a value; multiples of 64 bytes).
  const int64_t kpan = (M + 15) / 16 * 16 * bf16_panel_pairs(D);
  const int64_t vpan = (D + 15) / 16 * 16 * bf16_panel_pairs(M);
  const Scratch<acc_t> kt(ScratchSlot::kCall4, bf16_attn ? B * H * kpan : B * HD * M),
      vv(ScratchSlot::kCall5, bf16_attn ? B * H * vpan : B * M * HD);
  parallel_for(0, 2 * B, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> ca(ScratchSlot::kTask0, M * C), kb(ScratchSlot::kTask1, M * HD);
    // k or v rounded to bf16 in one vector pass, then laid out as panels (bf16 attention only).
    const Scratch<uint16_t> kb16(ScratchSlot::kTask2, bf16_attn ? M * HD : 0);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / 2;
      const bool is_k = task % 2 == 0;
      const scalar_t* cb = cp + b * sc_[0];
      for (int64_t m = 0; m < M; ++m) {
        if (sc_[2] == 1) {
          convert_row(cb + m * sc_[1], ca.data() + m * C, C);
          continue;
        }
        for (int64_t j = 0; j < C; ++j) ca[m * C + j] = static_cast<acc_t>(cb[m * sc_[1] + j * sc_[2]]);
      }
      if (!is_k) {
        // Each head's values as one contiguous (M x d) block: the attention's B operand then
        // spans 100 adjacent rows in cache, not 100 rows h*d apart.
        lv.apply(ca.data(), C, kb.data(), HD, M);
        if constexpr (kBf16) {
          if (bf16_attn) {  // W = v^T (d x M): W[j, m] = v[m, j]
            convert_row(kb.data(), reinterpret_cast<c10::BFloat16*>(kb16.data()), M * HD);
            for (int64_t hd = 0; hd < H; ++hd) {
              pack_bf16_panels(kb16.data() + hd * D, 1, HD, D, M,
                               reinterpret_cast<uint16_t*>(vv.data() + (b * H + hd) * vpan));
            }
            continue;
          }
        }
        for (int64_t hd = 0; hd < H; ++hd) {
          acc_t* dst = vv.data() + (b * H + hd) * M * D;
          for (int64_t m = 0; m < M; ++m) {
            std::copy(kb.data() + m * HD + hd * D, kb.data() + m * HD + (hd + 1) * D, dst + m * D);
          }
        }
        continue;
      }
      lk.apply(ca.data(), C, kb.data(), HD, M);
      for (int64_t i = 0; i < M * HD; ++i) kb[i] *= sc;
      if constexpr (kBf16) {
        if (bf16_attn) {  // W = k (M x d): W[m, j] = k[m, j]
          convert_row(kb.data(), reinterpret_cast<c10::BFloat16*>(kb16.data()), M * HD);
          for (int64_t hd = 0; hd < H; ++hd) {
            pack_bf16_panels(kb16.data() + hd * D, HD, 1, M, D,
                             reinterpret_cast<uint16_t*>(kt.data() + (b * H + hd) * kpan));
          }
          continue;
        }
      }
      transpose(kb.data(), HD, M, HD, kt.data() + b * HD * M, M);
    }
  });

  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  const bool x_direct = kSame && sx[2] == 1;  // the q projection reads x's rows in place
  // Blocks of about kProjBlock rows, evened out (N = 784: 12 x 66 + 58 rather than 12 x 64 + 16)
  // so that the last block of each image is not a sliver, and rounded to the 6-row tiles of the
  // products. The split depends on N only, never on the thread count.
  const int64_t nblk0 = (N + kProjBlock - 1) / kProjBlock;
  const int64_t blk = std::min<int64_t>(kMaxProjBlock, ((N + nblk0 - 1) / nblk0 + 5) / 6 * 6);
  const int64_t nblk = (N + blk - 1) / blk;
  parallel_for(0, B * nblk, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> xa(ScratchSlot::kTask0, x_direct ? 0 : blk * C),
        qb(ScratchSlot::kTask1, blk * HD), s(ScratchSlot::kTask2, blk * M),
        ob(ScratchSlot::kTask3, blk * HD),
        yb(ScratchSlot::kTask4, kSame && residual == nullptr ? 0 : 2 * blk * Co);
    acc_t mx[kMaxProjBlock], inv[kMaxProjBlock];
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / nblk, n0 = (task % nblk) * blk;
      const int64_t rows = std::min(blk, N - n0);
      // q = x . Wq^T + bq for the block's rows, all heads (rows x h*d).
      const scalar_t* xr = xp + b * sx[0] + n0 * sx[1];
      const acc_t* a;
      int64_t lda;
      if (x_direct) {
        if constexpr (kSame) a = xr;
        lda = sx[1];
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          if (sx[2] == 1) {
            convert_row(xr + i * sx[1], xa.data() + i * C, C);
            continue;
          }
          for (int64_t c = 0; c < C; ++c) xa[i * C + c] = static_cast<acc_t>(xr[i * sx[1] + c * sx[2]]);
        }
        a = xa.data();
        lda = C;
      }
      lq.apply(a, lda, qb.data(), HD, rows);
      // Per head: scores over the M clusters, softmax, times v, into the head's columns of o.
      const GemmPackedBf16Fn bf16_gemm = float32_kernels().gemm_packed_bf16;
      for (int64_t hd = 0; hd < H; ++hd) {
        bool done = false;
        if constexpr (kBf16) {
          if (bf16_attn) {
            bf16_gemm(qb.data() + hd * D, HD,
                      reinterpret_cast<const uint16_t*>(kt.data() + (b * H + hd) * kpan),
                      s.data(), M, rows, D, M, nullptr, false);
            done = true;
          }
        }
        if (!done) {
          gemm_nn(qb.data() + hd * D, HD, kt.data() + (b * HD + hd * D) * M, M, s.data(), M, rows,
                  D, M, /*accumulate=*/false);
        }
        // An all -inf (or +inf/NaN) row gives NaN, as torch.softmax does. inv holds the rows'
        // sums until it is inverted.
        exp_minus_row_max_rows(s.data(), M, rows, M, mx, inv);
        for (int64_t i = 0; i < rows; ++i) inv[i] = acc_t(1) / inv[i];
        acc_t* oh = ob.data() + hd * D;
        if (done) {
          if constexpr (kBf16) {
            bf16_gemm(s.data(), M,
                      reinterpret_cast<const uint16_t*>(vv.data() + (b * H + hd) * vpan), oh, HD,
                      rows, M, D, nullptr, false);
          }
        } else {
          gemm_nn(s.data(), M, vv.data() + (b * H + hd) * M * D, D, oh, HD, rows, M, D,
                  /*accumulate=*/false);
        }
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < D; ++j) oh[i * HD + j] *= inv[i];
        }
      }
      // out = o . Wp^T + bp, straight into the output rows when they are acc_t.
      acc_t* dst = yb.data();
      if constexpr (kSame) {
        if (residual == nullptr) dst = op + (b * N + n0) * Co;
      }
      lp.apply(ob.data(), HD, dst, Co, rows);
      if (residual != nullptr) {
        add_residual_rows<scalar_t>(dst, rows, Co, *residual, b, n0, out, yb.data() + blk * Co);
      } else if constexpr (!kSame) {
        convert_row(dst, op + (b * N + n0) * Co, rows * Co);
      }
    }
  });
}

}  // namespace

// Declared in cpu/cpu_ops.h: the layer composite (fused/conv_paca_layer.cpp) calls it directly.
at::Tensor p2c_attention_proj_cpu(const at::Tensor& x, const at::Tensor& c,
                                  const at::Tensor& q_weight,
                                  const std::optional<at::Tensor>& q_bias,
                                  const at::Tensor& k_weight,
                                  const std::optional<at::Tensor>& k_bias,
                                  const at::Tensor& v_weight,
                                  const std::optional<at::Tensor>& v_bias,
                                  const at::Tensor& proj_weight,
                                  const std::optional<at::Tensor>& proj_bias, int64_t num_heads,
                                  double scale, const std::optional<at::Tensor>& residual) {
  check_dim(x, 3, kProjOp, "x", "(B, N, C)");
  check_supported_float(x, kProjOp, "x");
  check_dim(c, 3, kProjOp, "c", "(B, M, C)");
  check_same_dtype(x, c, kProjOp, "x", "c");
  check_same_device(x, c, kProjOp, "x", "c");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = c.size(1);
  check_size(c, 0, B, kProjOp, "batch size B of c (B, M, C) vs x (B, N, C)");
  check_size(c, 2, C, kProjOp, "channels C of c (B, M, C) vs x (B, N, C)");
  TORCH_CHECK(M > 0, kProjOp, ": expected at least one cluster (M > 0), got c of shape ",
              c.sizes());
  TORCH_CHECK(C > 0, kProjOp, ": expected C > 0 channels, got x of shape ", x.sizes());
  TORCH_CHECK(q_weight.dim() == 2 && q_weight.size(0) > 0, kProjOp,
              ": expected q_weight of shape (h*d, C) with h*d > 0, got ", q_weight.sizes());
  const int64_t HD = q_weight.size(0);
  TORCH_CHECK(num_heads > 0 && HD % num_heads == 0, kProjOp, ": expected num_heads > 0 dividing ",
              "h*d = ", HD, " (the rows of q_weight), got num_heads = ", num_heads);
  check_param(kProjOp, q_weight, x, {HD, C}, "q_weight");
  check_param(kProjOp, q_bias, x, {HD}, "q_bias");
  check_param(kProjOp, k_weight, x, {HD, C}, "k_weight");
  check_param(kProjOp, k_bias, x, {HD}, "k_bias");
  check_param(kProjOp, v_weight, x, {HD, C}, "v_weight");
  check_param(kProjOp, v_bias, x, {HD}, "v_bias");
  TORCH_CHECK(proj_weight.dim() == 2 && proj_weight.size(1) == HD && proj_weight.size(0) > 0,
              kProjOp, ": expected proj_weight of shape (out, h*d) with h*d = ", HD,
              " and out > 0, got ", proj_weight.sizes());
  const int64_t Co = proj_weight.size(0);
  check_param(kProjOp, proj_weight, x, {Co, HD}, "proj_weight");
  check_param(kProjOp, proj_bias, x, {Co}, "proj_bias");
  if (residual) {
    const bool low = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() ||
                    (low && residual->scalar_type() == at::kFloat),
                kProjOp, ": expected residual of x's dtype (", x.scalar_type(),
                ") or float32 with bfloat16/float16 x, got ", residual->scalar_type());
    check_same_device(x, *residual, kProjOp, "x", "residual");
    TORCH_CHECK(residual->dim() == 3 && residual->size(0) == B && residual->size(1) == N &&
                    residual->size(2) == Co,
                kProjOp, ": expected residual of shape (B, N, out) = (", B, ", ", N, ", ", Co,
                "), got ", residual->sizes());
  }
  at::Tensor out =
      empty_output({B, N, Co}, residual ? x.options().dtype(residual->scalar_type()) : x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "p2c_attention_proj",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // bf16 inputs: the four projections as bf16 products (float32 sums), as the bf16 linears they
    // replace; the attention itself (scores, softmax, times v) stays float32, which autocast
    // would round to bf16 around its two matmuls.
    constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
    const PackedLinear<acc_t> lq(q_weight, q_bias, ScratchSlot::kCall0, kBf16),
        lk(k_weight, k_bias, ScratchSlot::kCall1, kBf16),
        lv(v_weight, v_bias, ScratchSlot::kCall2, kBf16),
        lp(proj_weight, proj_bias, ScratchSlot::kCall3, kBf16);
    p2c_proj_kernel<scalar_t>(x, c, lq, lk, lv, lp, num_heads, scale,
                              residual ? &*residual : nullptr, out);
  });
  return out;
}

}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("p2c_attention_proj", &paca_kernels::p2c_attention_proj_cpu);
}
