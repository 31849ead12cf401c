// CPU kernels of paca_kernels::p2c_attention_fwd / p2c_attention_bwd (schemas and semantics:
// csrc/registration.cpp).
//
// Patch-to-cluster attention has few keys (M clusters, at most a few hundred) and many queries
// (N patches). So, per (batch, head), the keys and values are packed once into small contiguous
// accumulation-typed buffers that stay in cache, and the queries are streamed in blocks of
// kQueryBlock rows: scores = q.k^T (scale folded into the packed keys), row softmax over M, times
// v. The (N, M) score matrix only ever exists one block at a time. The inputs are read through
// their strides (q may be a view of a fused qkv projection), outputs are written contiguous.
//
// Backward (flash-attention style: nothing but q, k, v and dO is read; every row's whole score
// vector sits in the block buffer, since M is small):
//   s = scale * q.k^T,  P = exp(s - rowmax s) / rowsum,  dP = dO.v^T,
//   D_n = rowsum_m(P o dP),  dS = P o (dP - D),
//   dq = scale * dS.k,  dk = scale * sum_n dS^T.q,  dv = sum_n P^T.dO.
// P and D come from the backward's own scores, as in PyTorch's softmax backward: s - rowmax is
// exact, where exp(s - lse) with a saved fp32 lse carries its rounding (~|s| * 2^-24 relative, 6e-4
// at |s| ~ 1e4) into P; and D = rowsum(P o dP) cancels dP exactly in a saturated row (P one-hot:
// dS = 0), where <dO, O> from the stored (rounded) output does not.
// dq rows belong to one task. dk/dv are reductions over N: each task owns a fixed chunk of
// kChunkRows queries and writes a partial (M, d) sum, and the partials are added in chunk order
// afterwards. The chunking depends only on N, never on the thread count, so the result is
// bitwise reproducible: the backward is always deterministic on CPU.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/check.h"
#include "cpu/output_pool.h"
#include "cpu/math/kernels.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"
#include "cpu/math/tensor_access.h"

namespace paca_kernels {
using namespace cpu;
namespace {

constexpr const char* kFwdOp = "paca_kernels::p2c_attention_fwd";
constexpr const char* kBwdOp = "paca_kernels::p2c_attention_bwd";
constexpr const char* kSavedFwdOp = "paca_kernels::p2c_attention_saved_fwd";
constexpr const char* kSavedBwdOp = "paca_kernels::p2c_attention_saved_bwd";
// Query rows per inner block: the block's scores (kQueryBlock x M) and its q/dO rows stay in L1/L2.
// A multiple of the products' 6-row register tiles (32 had left a 2-row tile per block, 10 % of the
// backward's product time at PaCa-ViT-Tiny stage 3), and long enough that the backward's dk/dv
// products (reductions over the block's rows into (M, d) partials that they load and store once
// per block) reduce over more rows per load.
constexpr int64_t kQueryBlock = 48;
// Query rows per backward task (one partial dk/dv buffer each), a multiple of kQueryBlock. Fixed,
// so that the reduction order does not depend on the number of threads.
constexpr int64_t kChunkRows = 5 * kQueryBlock;

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_supported_float(q, op, "q");
  check_p2c_args(q, k, v, op);
}

// Copies head `hd` of batch `b` of a (B, M, h, d) tensor into dst as acc_t, scaled by `mul`:
// transposed (d x M, for scores = q.k^T as an axpy over M) or as is (M x d).
template <typename scalar_t, typename acc_t>
void pack_head(const scalar_t* src, const Strides& st, int64_t b, int64_t hd, int64_t M, int64_t D,
               acc_t mul, bool transpose, acc_t* dst) {
  const scalar_t* base = src + b * st[0] + hd * st[2];
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (st[3] == 1) {  // contiguous head vectors: the vector transpose, then the scale
      if (transpose) {
        cpu::transpose(base, st[1], M, D, dst, M);
        if (mul != acc_t(1)) {
          for (int64_t e = 0; e < M * D; ++e) dst[e] *= mul;
        }
      } else {
        for (int64_t m = 0; m < M; ++m) {
          const scalar_t* row = base + m * st[1];
          for (int64_t j = 0; j < D; ++j) dst[m * D + j] = row[j] * mul;
        }
      }
      return;
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* row = base + m * st[1];
    for (int64_t j = 0; j < D; ++j) {
      const acc_t val = static_cast<acc_t>(row[j * st[3]]) * mul;
      if (transpose) {
        dst[j * M + m] = val;
      } else {
        dst[m * D + j] = val;
      }
    }
  }
}

// Rows n0 .. n0+rows-1 of head hd of batch b of a (B, N, h, d) tensor into dst (rows x D) as acc_t.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* src, const Strides& st, int64_t b, int64_t hd, int64_t n0,
               int64_t rows, int64_t D, acc_t* dst) {
  const scalar_t* base = src + b * st[0] + hd * st[2] + n0 * st[1];
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = base + i * st[1];
    for (int64_t j = 0; j < D; ++j) dst[i * D + j] = static_cast<acc_t>(row[j * st[3]]);
  }
}

// Rows n0 .. n0+rows-1 of head hd of batch b as an acc_t matrix: in place (returning its row
// stride) when the tensor already holds contiguous acc_t head vectors, else copied into buf.
template <typename scalar_t, typename acc_t>
std::pair<const acc_t*, int64_t> rows_as_acc(const scalar_t* src, const Strides& st, int64_t b,
                                             int64_t hd, int64_t n0, int64_t rows, int64_t D,
                                             acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (st[3] == 1) return {src + b * st[0] + hd * st[2] + n0 * st[1], st[1]};
  }
  load_rows(src, st, b, hd, n0, rows, D, buf);
  return {buf, D};
}

// out = softmax(scale q.k^T) v; lse (B, h, N) when lse is given; when exp_scores is given (the
// saving forward, p2c_attention_saved_fwd), the softmax numerators e = exp(s - rowmax s) into it
// (B, h, N, M) and their row sums into exp_sums (B, h, N), the values the backward would recompute.
template <typename scalar_t>
void p2c_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                    at::Tensor& out, at::Tensor* lse, at::Tensor* exp_scores,
                    at::Tensor* exp_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3), M = k.size(1);
  const Strides sq(q), sk(k), sv(v);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();  // (B, N, h, d) contiguous
  acc_t* lp = lse ? lse->mutable_data_ptr<acc_t>() : nullptr;  // (B, h, N) contiguous
  acc_t* ep = exp_scores ? exp_scores->mutable_data_ptr<acc_t>() : nullptr;  // (B, h, N, M)
  acc_t* esp = exp_sums ? exp_sums->mutable_data_ptr<acc_t>() : nullptr;     // (B, h, N)
  const acc_t sc = static_cast<acc_t>(scale);

  // Query rows n0 .. n0 + rows - 1 of head (b, hd), rows <= kQueryBlock: scores, softmax (its
  // log-sum-exp into lse), times v, normalised into the output rows.
  const auto block = [&](int64_t b, int64_t hd, int64_t n0, int64_t rows, const acc_t* ktp,
                         const acc_t* vvp, acc_t* qbuf, acc_t* obuf, acc_t* sbuf) {
    const int64_t bh = b * H + hd;
    const auto [qa, ldq] = rows_as_acc(qp, sq, b, hd, n0, rows, D, qbuf);
    // The saving forward computes the block's scores in place in exp_scores.
    if (ep != nullptr) sbuf = ep + (bh * N + n0) * M;
    gemm_nn(qa, ldq, ktp, M, sbuf, M, rows, D, M, /*accumulate=*/false);
    // Softmax over M with the max subtracted, the block's rows at once; an all -inf (or
    // +inf/NaN) row gives NaN, as torch.softmax does. inv holds the rows' sums until it is
    // inverted.
    acc_t mx[kQueryBlock], inv[kQueryBlock];
    exp_minus_row_max_rows(sbuf, M, rows, M, mx, inv);
    for (int64_t i = 0; i < rows; ++i) {
      if (lp != nullptr) lp[bh * N + n0 + i] = mx[i] + std::log(inv[i]);
      if (esp != nullptr) esp[bh * N + n0 + i] = inv[i];
      inv[i] = acc_t(1) / inv[i];
    }
    scalar_t* out0 = op + ((b * N + n0) * H + hd) * D;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      // Straight into the output rows (row stride h*d), normalised in place.
      gemm_nn(sbuf, M, vvp, D, out0, H * D, rows, M, D, /*accumulate=*/false);
      for (int64_t i = 0; i < rows; ++i) {
        acc_t* orow = out0 + i * H * D;
        for (int64_t j = 0; j < D; ++j) orow[j] *= inv[i];
      }
    } else {
      gemm_nn(sbuf, M, vvp, D, obuf, D, rows, M, D, /*accumulate=*/false);
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* orow = out0 + i * H * D;
        const acc_t* src = obuf + i * D;
        for (int64_t j = 0; j < D; ++j) orow[j] = static_cast<scalar_t>(src[j] * inv[i]);
      }
    }
  };

  if (N <= kChunkRows && B * H >= 4 * at::get_num_threads()) {
    // Few queries per head (PaCa-ViT-Tiny's third stage at 224^2) and heads enough to share out:
    // one task per (b, head) packs its own keys and values into its scratch, where they stay in
    // cache, instead of a separate pass writing every head's to memory first. Each output row is
    // computed as on the other path (same bits).
    parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
      const Scratch<acc_t> work(ScratchSlot::kTask0,
                                2 * kQueryBlock * D + kQueryBlock * M + 2 * M * D);
      acc_t* qbuf = work.data();
      acc_t* obuf = qbuf + kQueryBlock * D;
      acc_t* sbuf = obuf + kQueryBlock * D;
      acc_t* ktp = sbuf + kQueryBlock * M;
      acc_t* vvp = ktp + M * D;
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / H, hd = bh % H;
        pack_head(kp, sk, b, hd, M, D, sc, /*transpose=*/true, ktp);
        pack_head(vp, sv, b, hd, M, D, acc_t(1), /*transpose=*/false, vvp);
        for (int64_t n0 = 0; n0 < N; n0 += kQueryBlock) {
          block(b, hd, n0, std::min(kQueryBlock, N - n0), ktp, vvp, qbuf, obuf, sbuf);
        }
      }
    });
    return;
  }

  // Packed keys (scaled, d x M) and values (M x d) per (b, head): B*h*M*d elements each, small
  // (uninitialised scratch: a zero-filled std::vector cost a pass over them on the calling thread).
  const Scratch<acc_t> kt(ScratchSlot::kCall0, B * H * M * D), vv(ScratchSlot::kCall1, B * H * M * D);
  const int64_t pack_grain = std::max<int64_t>(1, kGrainSize / (M * D));
  parallel_for(0, B * H, pack_grain, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, hd = bh % H;
      pack_head(kp, sk, b, hd, M, D, sc, /*transpose=*/true, kt.data() + bh * M * D);
      pack_head(vp, sv, b, hd, M, D, acc_t(1), /*transpose=*/false, vv.data() + bh * M * D);
    }
  });

  const int64_t nblk = (N + kQueryBlock - 1) / kQueryBlock;
  // One task = one query block of one (b, head): ~2 * kQueryBlock * M * D multiply-adds.
  const int64_t grain = std::max<int64_t>(1, kGrainSize / (2 * kQueryBlock * M * D));
  parallel_for(0, B * H * nblk, grain, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> qbuf(ScratchSlot::kTask0, kQueryBlock * D),
        obuf(ScratchSlot::kTask1, kQueryBlock * D), s(ScratchSlot::kTask2, kQueryBlock * M);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t bh = task / nblk, blk = task % nblk;
      const int64_t b = bh / H, hd = bh % H;
      const int64_t n0 = blk * kQueryBlock, rows = std::min(kQueryBlock, N - n0);
      block(b, hd, n0, rows, kt.data() + bh * M * D, vv.data() + bh * M * D, qbuf.data(),
            obuf.data(), s.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> p2c_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale) {
  check_inputs(q, k, v, kFwdOp);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = empty_output({B, N, H, D}, q.options());
  at::Tensor lse = empty_output({B, H, N}, q.options().dtype(acc));
  if (out.numel() == 0) {
    // Only d == 0 leaves lse non-empty: every score is 0, so lse = log M (out is empty).
    if (lse.numel() > 0) lse.fill_(std::log(static_cast<double>(k.size(1))));
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "p2c_attention_fwd",
                                  [&] {
                                    p2c_fwd_kernel<scalar_t>(q, k, v, scale, out, &lse, nullptr,
                                                             nullptr);
                                  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> p2c_attention_saved_fwd_cpu(const at::Tensor& q,
                                                                           const at::Tensor& k,
                                                                           const at::Tensor& v,
                                                                           double scale) {
  check_inputs(q, k, v, kSavedFwdOp);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3), M = k.size(1);
  const at::TensorOptions acc = q.options().dtype(acc_dtype(q));
  at::Tensor out = empty_output({B, N, H, D}, q.options());
  at::Tensor exp_scores = empty_output({B, H, N, M}, acc);
  at::Tensor exp_sums = empty_output({B, H, N}, acc);
  if (exp_sums.numel() == 0) return {out, exp_scores, exp_sums};
  if (D == 0) {  // every score is 0: e = 1, sum = M (out is empty)
    exp_scores.fill_(1);
    exp_sums.fill_(static_cast<double>(M));
    return {out, exp_scores, exp_sums};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "p2c_attention_saved_fwd", [&] {
                                    p2c_fwd_kernel<scalar_t>(q, k, v, scale, out, nullptr,
                                                             &exp_scores, &exp_sums);
                                  });
  return {out, exp_scores, exp_sums};
}

// The gradients; exp_scores / exp_sums (the saving forward's numerators and their sums) given or
// both null: with them the scores and their exps are read rather than recomputed, which gives the
// same bits (the forward computed them with the same products and row kernels, in the same blocks).
template <typename scalar_t>
void p2c_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, double scale, at::Tensor& dq, at::Tensor& dk,
                    at::Tensor& dv, const at::Tensor* exp_scores, const at::Tensor* exp_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3), M = k.size(1);
  const Strides sq(q), sk(k), sv(v), sg(grad_out);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  scalar_t* dqp = dq.mutable_data_ptr<scalar_t>();  // all three (B, *, h, d) contiguous
  scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();
  const acc_t sc = static_cast<acc_t>(scale);
  const int64_t MD = M * D;
  const acc_t* ep = exp_scores ? exp_scores->const_data_ptr<acc_t>() : nullptr;  // (B, h, N, M)
  const acc_t* esp = exp_sums ? exp_sums->const_data_ptr<acc_t>() : nullptr;      // (B, h, N)

  // Query rows [n_begin, n_end) of head (b, hd): their dq rows written, dS^T.q and P^T.dO added to
  // dkc and dvc (M x d); kt/vt/ks the head's packed keys and values (below).
  const auto rows_pass = [&](int64_t b, int64_t hd, int64_t n_begin, int64_t n_end,
                             const acc_t* ktp, const acc_t* vtp, const acc_t* ksp, acc_t* dkc,
                             acc_t* dvc, acc_t* qbuf, acc_t* gbuf, acc_t* dqbuf, acc_t* p,
                             acc_t* ds) {
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, n_end - n0);
      const auto [qa, ldq] = rows_as_acc(qp, sq, b, hd, n0, rows, D, qbuf);
      const auto [ga, ldg] = rows_as_acc(gp, sg, b, hd, n0, rows, D, gbuf);
      // dP = dO.v^T
      gemm_nn(ga, ldg, vtp, M, ds, M, rows, D, M, /*accumulate=*/false);
      // P = softmax of each row of s, as the forward computed it (an all -inf row gives NaN),
      // and dS = P o (dP - D), D_i = rowsum(P o dP): the softmax Jacobian's rank-one part,
      // from the same P and dP that it multiplies, so a one-hot row gives dS = 0 exactly.
      if (ep != nullptr) {  // from the forward's exps
        const int64_t row0 = (b * H + hd) * N + n0;
        softmax_bwd_saved_rows(ep + row0 * M, M, esp + row0, p, M, ds, M, rows, M);
      } else {  // s = q.(scale k)^T recomputed
        gemm_nn(qa, ldq, ktp, M, p, M, rows, D, M, /*accumulate=*/false);
        softmax_bwd_rows(p, M, ds, M, rows, M);
      }
      scalar_t* dq0 = dqp + ((b * N + n0) * H + hd) * D;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        gemm_nn(ds, M, ksp, D, dq0, H * D, rows, M, D, /*accumulate=*/false);
      } else {
        gemm_nn(ds, M, ksp, D, dqbuf, D, rows, M, D, /*accumulate=*/false);
        for (int64_t i = 0; i < rows; ++i) {
          scalar_t* dst = dq0 + i * H * D;
          for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(dqbuf[i * D + j]);
        }
      }
      gemm_tn_acc(ds, M, qa, ldq, dkc, D, rows, M, D);
      gemm_tn_acc(p, M, ga, ldg, dvc, D, rows, M, D);
    }
  };
  // dk = scale * sum_n dS^T.q and dv from the summed (M x d) accumulators, into (B, M, h, d).
  // The sums are written as 0 + sum, as a reduction from zero leaves them (a -0 becomes +0), so
  // a head summed by one task gives the bits of one reduced from chunk partials.
  const auto write_dkdv = [&](int64_t b, int64_t hd, const acc_t* dks, const acc_t* dvs) {
    for (int64_t m = 0; m < M; ++m) {
      scalar_t* dkr = dkp + ((b * M + m) * H + hd) * D;
      scalar_t* dvr = dvp + ((b * M + m) * H + hd) * D;
      for (int64_t j = 0; j < D; ++j) {
        dkr[j] = static_cast<scalar_t>((acc_t(0) + dks[m * D + j]) * sc);
        dvr[j] = static_cast<scalar_t>(acc_t(0) + dvs[m * D + j]);
      }
    }
  };
  // Head (b, hd)'s keys and values packed for the products: k^T scaled (d x M) for the scores,
  // v^T (d x M) for dP = dO.v^T, and k scaled (M x d) for dq = dS.(scale k).
  const auto pack_kv = [&](int64_t b, int64_t hd, acc_t* ktp, acc_t* vtp, acc_t* ksp) {
    if (ep == nullptr) pack_head(kp, sk, b, hd, M, D, sc, /*transpose=*/true, ktp);
    pack_head(vp, sv, b, hd, M, D, acc_t(1), /*transpose=*/true, vtp);
    pack_head(kp, sk, b, hd, M, D, sc, /*transpose=*/false, ksp);
  };

  const int64_t nchunk = (N + kChunkRows - 1) / kChunkRows;
  if (nchunk == 1) {
    // Few queries per head (N <= kChunkRows: PaCa-ViT-Tiny's third stage at 224^2): one task per
    // (b, head) packs its own keys and values into its scratch (where they stay in cache, instead
    // of a separate pass writing every head's to memory) and sums dk / dv itself, in the order
    // the chunked path uses, written straight to the outputs (the same bits).
    parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
      constexpr int64_t blk = kQueryBlock;
      const Scratch<acc_t> work(ScratchSlot::kTask0, 3 * blk * D + 2 * blk * M + 5 * MD);
      acc_t* qbuf = work.data();
      acc_t* gbuf = qbuf + blk * D;
      acc_t* dqbuf = gbuf + blk * D;
      acc_t* p = dqbuf + blk * D;
      acc_t* ds = p + blk * M;
      acc_t* ktp = ds + blk * M;
      acc_t* vtp = ktp + MD;
      acc_t* ksp = vtp + MD;
      acc_t* dks = ksp + MD;
      acc_t* dvs = dks + MD;
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / H, hd = bh % H;
        pack_kv(b, hd, ktp, vtp, ksp);
        std::fill(dks, dks + MD, acc_t(0));
        std::fill(dvs, dvs + MD, acc_t(0));
        rows_pass(b, hd, 0, N, ktp, vtp, ksp, dks, dvs, qbuf, gbuf, dqbuf, p, ds);
        write_dkdv(b, hd, dks, dvs);
      }
    });
    return;
  }

  // Per-call packing for the chunked path: every (b, head)'s keys and values, shared by its chunks.
  const Scratch<acc_t> kt(ScratchSlot::kCall0, B * H * MD), vt(ScratchSlot::kCall1, B * H * MD),
      ks(ScratchSlot::kCall2, B * H * MD);
  parallel_for(0, B * H, std::max<int64_t>(1, kGrainSize / MD), [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      pack_kv(bh / H, bh % H, kt.data() + bh * MD, vt.data() + bh * MD, ks.data() + bh * MD);
    }
  });

  // Partial sums over each chunk's queries: dS^T.q (scaled at the end) and P^T.dO.
  const Scratch<acc_t> dk_part(ScratchSlot::kCall3, B * H * nchunk * MD),
      dv_part(ScratchSlot::kCall4, B * H * nchunk * MD);
  const int64_t grain = std::max<int64_t>(1, kGrainSize / (5 * kChunkRows * MD));
  parallel_for(0, B * H * nchunk, grain, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> qbuf(ScratchSlot::kTask0, kQueryBlock * D),
        gbuf(ScratchSlot::kTask1, kQueryBlock * D), dqbuf(ScratchSlot::kTask2, kQueryBlock * D),
        p(ScratchSlot::kTask3, kQueryBlock * M), ds(ScratchSlot::kTask4, kQueryBlock * M);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t bh = task / nchunk, chunk = task % nchunk;
      const int64_t b = bh / H, hd = bh % H;
      acc_t* dkc = dk_part.data() + task * MD;
      acc_t* dvc = dv_part.data() + task * MD;
      std::fill(dkc, dkc + MD, acc_t(0));
      std::fill(dvc, dvc + MD, acc_t(0));
      rows_pass(b, hd, chunk * kChunkRows, std::min(N, (chunk + 1) * kChunkRows),
                kt.data() + bh * MD, vt.data() + bh * MD, ks.data() + bh * MD, dkc, dvc,
                qbuf.data(), gbuf.data(), dqbuf.data(), p.data(), ds.data());
    }
  });

  // Fixed-order reduction of the chunk partials into dk, dv (B, M, h, d).
  parallel_for(0, B * H, std::max<int64_t>(1, kGrainSize / (nchunk * MD)),
                   [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> dks(ScratchSlot::kTask0, MD), dvs(ScratchSlot::kTask1, MD);
    for (int64_t bh = lo; bh < hi; ++bh) {
      std::fill(dks.data(), dks.data() + MD, acc_t(0));
      std::fill(dvs.data(), dvs.data() + MD, acc_t(0));
      for (int64_t c = 0; c < nchunk; ++c) {
        const acc_t* pk = dk_part.data() + (bh * nchunk + c) * MD;
        const acc_t* pv = dv_part.data() + (bh * nchunk + c) * MD;
        for (int64_t e = 0; e < MD; ++e) {
          dks[e] += pk[e];
          dvs[e] += pv[e];
        }
      }
      write_dkdv(bh / H, bh % H, dks.data(), dvs.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> p2c_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    double scale, bool deterministic) {
  // `deterministic` needs no special path: the CPU reduction over N is always in a fixed order.
  check_supported_float(q, kBwdOp, "q");
  check_p2c_bwd_args(grad_out, q, k, v, kBwdOp);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);

  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(k.sizes(), k.options());
  at::Tensor dv = empty_output(v.sizes(), v.options());
  if (B * H * D == 0) return {dq, dk, dv};
  if (N == 0) {  // no queries: nothing flows into k and v
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "p2c_attention_bwd",
                                  [&] {
                                    p2c_bwd_kernel<scalar_t>(grad_out, q, k, v, scale, dq, dk, dv,
                                                             nullptr, nullptr);
                                  });
  return {dq, dk, dv};
}

// p2c_attention_saved_bwd: exp_scores (B, h, N, M) and exp_sums (B, h, N) contiguous, of the
// accumulation dtype, on q's device: what p2c_attention_saved_fwd returned for these q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> p2c_attention_saved_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& exp_scores, const at::Tensor& exp_sums, double scale) {
  check_supported_float(q, kSavedBwdOp, "q");
  check_p2c_bwd_args(grad_out, q, k, v, kSavedBwdOp);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3), M = k.size(1);
  const at::ScalarType acc = acc_dtype(q);
  // The saved tensors as the saving forward returned them: contiguous, acc dtype, q's device.
  const auto check_saved = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name,
                               const char* dims) {
    TORCH_CHECK(t.sizes() == shape && t.is_contiguous() && t.scalar_type() == acc &&
                    t.device() == q.device(),
                kSavedBwdOp, ": expected ", name, " contiguous ", dims, " = ", shape, " of dtype ",
                acc, " on ", q.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ",
                t.device(), t.is_contiguous() ? "" : " (not contiguous)");
  };
  check_saved(exp_scores, {B, H, N, M}, "exp_scores", "(B, h, N, M)");
  check_saved(exp_sums, {B, H, N}, "exp_sums", "(B, h, N)");

  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(k.sizes(), k.options());
  at::Tensor dv = empty_output(v.sizes(), v.options());
  if (B * H * D == 0) return {dq, dk, dv};
  if (N == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "p2c_attention_saved_bwd", [&] {
                                    p2c_bwd_kernel<scalar_t>(grad_out, q, k, v, scale, dq, dk, dv,
                                                             &exp_scores, &exp_sums);
                                  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("p2c_attention_fwd", &paca_kernels::p2c_attention_fwd_cpu);
  m.impl("p2c_attention_bwd", &paca_kernels::p2c_attention_bwd_cpu);
  m.impl("p2c_attention_saved_fwd", &paca_kernels::p2c_attention_saved_fwd_cpu);
  m.impl("p2c_attention_saved_bwd", &paca_kernels::p2c_attention_saved_bwd_cpu);
}
