// CPU kernels of paca_kernels::cluster_pool_fwd and cluster_pool_bwd (schemas and semantics:
// csrc/registration.cpp; the backward math is spelled out in paca_kernels/ops/cluster_pool.py).
//
// Forward: an online softmax over N (running max and running sum, the accumulator rescaled
// whenever the max grows) accumulates softmax(logits) . x in a single pass, then LayerNorm over C.
// Backward: one streaming pass over N. Inputs are read through their strides, so non-contiguous
// and expanded (stride-0) inputs work without copies; outputs are written contiguous.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/pool_stats.h"
#include "cpu/cpu_ops.h"
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

constexpr const char* kOp = "paca_kernels::cluster_pool_fwd";
constexpr const char* kBwdOp = "paca_kernels::cluster_pool_bwd";
// Patches per tile: the tile's x rows (kPatchTile x C) and weights (M x kPatchTile) stay in cache
// while the products with them are formed (forward P.x; backward x.dP^T and S^T.dP).
constexpr int64_t kPatchTile = 256;
// Patches per forward task (one partial softmax state per split, merged in split order).
constexpr int64_t kSplitRows = 1024;
// A small batch is cut finer, so that the forward has tasks for every thread: at least kMinTasks
// (b, split) tasks where splits of kMinSplitRows patches or more allow it (4: more splits cost more
// in the merge than they gain on 2 cores, measured). At B = 1 the 224² stages
// 2-3 (N = 784, 196) were one task each, the pooling ran on one core of two (measured: 2.0 ms per
// Tiny forward with one thread, 1.76 with two).
constexpr int64_t kMinTasks = 4;
constexpr int64_t kMinSplitRows = 48;

// Patches per forward split for B images of N patches: kSplitRows, or for a small batch N cut into
// equal splits (see kMinTasks). A function of B and N alone, never of the thread count, so that a
// call's bits do not depend on the threads.
inline int64_t split_rows(int64_t B, int64_t N) {
  int64_t nsplit = (N + kSplitRows - 1) / kSplitRows;
  if (B * nsplit < kMinTasks) {
    nsplit = std::max(nsplit, std::min((kMinTasks + B - 1) / B, std::max<int64_t>(1, N / kMinSplitRows)));
  }
  return std::max<int64_t>(1, (N + nsplit - 1) / nsplit);
}

// Patches per tile for a run of n patches: the run cut into equal tiles of at most kPatchTile,
// rounded up to 16 (a vector panel), so that no tile is a short tail: N = 784 (224² stage 2) gives
// tiles of 208, 208, 208, 160 instead of 256, 256, 256, 16. A function of n alone, so the results
// do not depend on the thread count.
inline int64_t balanced_tile(int64_t n) {
  const int64_t tiles = std::max<int64_t>(1, (n + kPatchTile - 1) / kPatchTile);
  const int64_t t = (n + tiles - 1) / tiles;
  return std::min(kPatchTile, (t + 15) / 16 * 16);
}

// Rows n0 .. n0+nt of x[b] as an acc_t matrix with leading dimension ldx: read in place when x is
// already acc_t with contiguous rows (x_direct), else converted into buf (nt x C).
template <typename scalar_t, typename acc_t, typename Strides>
const acc_t* x_tile(const scalar_t* xp, const Strides& sx, int64_t b, int64_t n0, int64_t nt,
                    int64_t C, bool x_direct, acc_t* buf, int64_t& ldx) {
  if (x_direct) {
    ldx = sx[1];
    return reinterpret_cast<const acc_t*>(xp + b * sx[0] + n0 * sx[1]);
  }
  for (int64_t i = 0; i < nt; ++i) {
    const scalar_t* xr = xp + b * sx[0] + (n0 + i) * sx[1];
    if (sx[2] == 1) {  // a row at a time (vectorised bf16 -> float32: the same values)
      convert_row(xr, buf + i * C, C);
      continue;
    }
    for (int64_t c = 0; c < C; ++c) buf[i * C + c] = static_cast<acc_t>(xr[c * sx[2]]);
  }
  ldx = C;
  return buf;
}

// Rows n0 .. n0+nt of a bf16 x[b] (channels contiguous, row stride ldx) as the right-hand side of
// gemm_packed_bf16: the bf16 pair panels of packing.h (panel p = channels 16p .. 16p+15, pair-row s
// = patches 2s and 2s+1 interleaved), zero past C, past an odd last patch and in the padding
// pair-rows. A 32-bit word per (channel, pair of patches), a panel row of 16 at a time: the
// compiler vectorises it (the per-element packer of packing.h would cost about what the bf16
// products save).
inline void pack_x_pairs(const c10::BFloat16* xb, int64_t ldx, int64_t nt, int64_t C,
                         uint32_t* dst) {
  const int64_t pairs = bf16_panel_pairs(nt), panels = (C + 15) / 16;
  const uint16_t* x = reinterpret_cast<const uint16_t*>(xb);
  for (int64_t s = 0; s < pairs; ++s) {
    const uint16_t* r0 = 2 * s < nt ? x + 2 * s * ldx : nullptr;
    const uint16_t* r1 = 2 * s + 1 < nt ? x + (2 * s + 1) * ldx : nullptr;
    for (int64_t p = 0; p < panels; ++p) {
      uint32_t* o = dst + (p * pairs + s) * 16;
      const int64_t c0 = 16 * p, w = std::min<int64_t>(16, C - c0);
      if (r0 != nullptr && r1 != nullptr && w == 16) {
        for (int64_t c = 0; c < 16; ++c) {
          o[c] = uint32_t(r0[c0 + c]) | (uint32_t(r1[c0 + c]) << 16);
        }
        continue;
      }
      for (int64_t c = 0; c < 16; ++c) {
        const uint32_t lo = r0 != nullptr && c < w ? r0[c0 + c] : 0;
        const uint32_t hi = r1 != nullptr && c < w ? r1[c0 + c] : 0;
        o[c] = lo | (hi << 16);
      }
    }
  }
}

// The logits of tile (b, n0 .. n0+nt) in one of the two orientations of the kernels, as acc_t:
//   cluster-major (M x nt, row m = cluster m's logits over the tile's patches), the forward's
//     online softmax runs along these rows;
//   patch-major (nt x M, row i = the M logits of patch n0+i), the backward's: its products take
//     S^T (nt x M) as their left operand.
// Read in place when the logits already are acc_t with unit stride in that orientation (ld = their
// row stride). The clustering heads give patch-major logits (strides (N M, 1, M): a channels-last
// 1x1 convolution's output, or (x.W)^T): the forward's cluster-major tile is then transposed by the
// vector kernel (8 x 8 blocks), not gathered one element at a time at a stride of 4 M bytes, which
// had been most of the kernels' own (non-product) time. Anything else is gathered into buf.
//
// Logits of another dtype (a bf16 model, autocast) are converted a dense run at a time (the
// vectorised conversion: the same values) when either orientation has unit stride; from the other
// orientation through `tmp` (nt x M values; nullptr: gathered value by value) and the transpose.
template <typename scalar_t, typename acc_t, typename Strides>
const acc_t* logits_tile(const scalar_t* lp, const Strides& sl, int64_t b, int64_t n0, int64_t nt,
                         int64_t M, bool patch_major, acc_t* buf, int64_t& ld,
                         acc_t* tmp = nullptr) {
  const scalar_t* base = lp + b * sl[0] + n0 * sl[2];
  // Unit stride along the rows of the wanted orientation (over N cluster-major, over M patch-major).
  const int64_t along = patch_major ? sl[1] : sl[2], across = patch_major ? sl[2] : sl[1];
  const int64_t rows = patch_major ? nt : M, cols = patch_major ? M : nt;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (along == 1) {
      ld = across;
      return base;
    }
    if (across == 1) {  // the other orientation is dense: one vector transpose
      transpose(base, along, cols, rows, buf, cols);
      ld = cols;
      return buf;
    }
  } else {
    if (along == 1) {
      for (int64_t r = 0; r < rows; ++r) convert_row(base + r * across, buf + r * cols, cols);
      ld = cols;
      return buf;
    }
    if (across == 1 && tmp != nullptr) {  // convert the dense orientation, then transpose it
      for (int64_t c = 0; c < cols; ++c) convert_row(base + c * along, tmp + c * rows, rows);
      transpose(tmp, rows, cols, rows, buf, cols);
      ld = cols;
      return buf;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) buf[r * cols + c] = static_cast<acc_t>(base[r * across + c * along]);
  }
  ld = cols;
  return buf;
}

// The M logits rows of a tile are M short runs far apart (row stride N), too many streams for
// the hardware prefetchers: ask for the next tile's run of each row while this one is processed.
template <typename scalar_t>
inline void prefetch_next_tile(const scalar_t* row_tile, int64_t stride, int64_t nt,
                               int64_t next) {
#if defined(__GNUC__)
  if (stride != 1) return;  // strided logits: leave it to the hardware
  const scalar_t* nxt = row_tile + nt;
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));  // elements per line
  for (int64_t i = 0; i < next; i += kLine) __builtin_prefetch(nxt + i);
#endif
}

// The product over a tile reads its x rows at a row stride of 4 C bytes, one cache line per row for
// each 16-column panel, a pattern the hardware prefetchers follow poorly (the loads waiting on x
// were a fifth of the product's time). Rows [rows * part / parts, rows * (part + 1) / parts) are
// requested here, one slice per cluster row while the tile's exponentials are computed, so the
// whole tile is on its way before the product starts.
template <typename T>
inline void prefetch_rows_slice(const T* base, int64_t ld, int64_t rows, int64_t cols,
                                int64_t part, int64_t parts) {
#if defined(__GNUC__)
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  const int64_t r0 = rows * part / parts, r1 = rows * (part + 1) / parts;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < cols; c += kLine) __builtin_prefetch(base + r * ld + c);
  }
#endif
}

// The epilogue of one cluster row: prow (C, the unnormalised sum exp(l - mx) . x, in place) is
// divided by the softmax denominator s, the row's stats (mx, s) are stored (stats_out[0], [1]),
// then LayerNorm over C (biased variance, two passes, overflow-free: cpu/math/layernorm.h) into orow. The backward recomputes
// S = exp(l - mx) / s from them: l - mx is exact, whereas exp(l - lse) with a rounded
// lse = mx + log s would carry |lse| * 2^-24 relative error (2e-4 at logits of 1e4).
// A row with no finite logit (mx = -inf) gives s = 0 and NaN pooled/out, as torch.softmax does.
template <typename scalar_t, typename acc_t>
inline void finish_row(acc_t* prow, acc_t mx, acc_t s, const acc_t* wp, const acc_t* bp,
                       acc_t eps, int64_t C, acc_t* stats_out, scalar_t* orow) {
  if (!(mx > -std::numeric_limits<acc_t>::infinity())) {
    s = acc_t(0);
    std::fill(prow, prow + C, std::numeric_limits<acc_t>::quiet_NaN());
  }
  stats_out[0] = mx;
  stats_out[1] = s;
  const acc_t inv_s = acc_t(1) / s;
  for (int64_t c = 0; c < C; ++c) prow[c] *= inv_s;
  const LayerNormStats<acc_t> st = layer_norm_stats(prow, C, eps);
  const acc_t inv = st.inv_scale, mean = st.mean, rstd = st.rstd;
  if (wp && bp) {
    for (int64_t c = 0; c < C; ++c) {
      orow[c] = static_cast<scalar_t>((prow[c] * inv - mean) * rstd * wp[c] + bp[c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      acc_t y = (prow[c] * inv - mean) * rstd;
      if (wp) y *= wp[c];
      if (bp) y += bp[c];
      orow[c] = static_cast<scalar_t>(y);
    }
  }
}

// Forward. Parallel over (b, split of N): each task streams its split_rows patches in tiles of
// kPatchTile and keeps, for all M clusters at once, the online-softmax state (running max, running
// sum, and the (M, C) accumulator rescaled whenever a row's max grows). Handling every cluster
// per tile means each x row is read (and converted) once per task, not M times, and the update
// acc += P.x_tile is a register-blocked product. The splits (flash-decoding style: enough tasks
// even at batch 1) are merged per cluster in split order, then LayerNorm over C. The split size
// depends only on B and N, so results do not depend on the thread count. With a single split
// (N <= kSplitRows and B >= kMinTasks: the 224² stages 2-4 at B >= 4) the task accumulates straight
// into `pooled` and finishes its rows itself while they are still in cache: no partial buffers, no
// second pass.
template <typename scalar_t>
void cluster_pool_fwd_kernel(const at::Tensor& logits, const at::Tensor& x,
                             const at::opmath_type<scalar_t>* wp,
                             const at::opmath_type<scalar_t>* bp, double eps, at::Tensor& out,
                             at::Tensor& pooled, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), M = logits.size(1), N = logits.size(2), C = x.size(2);
  const Strides sl(logits), sx(x);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  // wp/bp: the LayerNorm's weight and bias as acc_t (C,), or nullptr.
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* pp = pooled.mutable_data_ptr<acc_t>();
  acc_t* stp = stats.mutable_data_ptr<acc_t>();  // (B, M, 2) contiguous
  const acc_t eps_acc = static_cast<acc_t>(eps);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // x rows are used in place when they already are contiguous acc_t vectors (no copy).
  const bool x_direct = std::is_same_v<scalar_t, acc_t> && sx[2] == 1;
  // bf16 x (a bf16 model, or autocast) where the CPU multiplies bf16: the pooling product as bf16
  // products with float32 sums, as autocast's bf16 matmul of the assignment and x computes it (the
  // tile's unnormalised probabilities exp(l - max) <= 1 rounded to bf16 as the kernel reads them,
  // x bf16 already); the softmax, its sums and the LayerNorm stay float32.
  constexpr bool kBf16In = std::is_same_v<scalar_t, at::BFloat16>;
  const bool bf16_prod = kBf16In && sx[2] == 1 && float32_kernels().gemm_packed_bf16 != nullptr;
  const int64_t srows = split_rows(B, N);
  const int64_t nsplit = (N + srows - 1) / srows;
  const int64_t MC = M * C;
  // Per (b, split): accumulator (M x C), running max (M) and running sum (M).
  const bool single = nsplit == 1;
  const Scratch<acc_t> acc_part(ScratchSlot::kCall0, single ? 0 : B * nsplit * MC),
      mx_part(ScratchSlot::kCall1, B * nsplit * M), sum_part(ScratchSlot::kCall2, B * nsplit * M);
  parallel_for(0, B * nsplit, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> xbuf(ScratchSlot::kTask0, x_direct || bf16_prod ? 0 : kPatchTile * C),
        pt(ScratchSlot::kTask1, M * kPatchTile),
        lconv(ScratchSlot::kTask2, std::is_same_v<scalar_t, acc_t> ? 0 : M * kPatchTile),
        tmp(ScratchSlot::kTask4, bf16_prod ? M * C : 0);
    const Scratch<uint32_t> xpk(ScratchSlot::kTask3,
                                bf16_prod ? (C + 15) / 16 * bf16_panel_pairs(kPatchTile) * 16 : 0);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / nsplit, split = task % nsplit;
      // pooled is freshly allocated, hence contiguous.
      acc_t* acc = single ? pp + task * MC : acc_part.data() + task * MC;
      acc_t* mx = mx_part.data() + task * M;
      acc_t* sum = sum_part.data() + task * M;
      std::fill(mx, mx + M, kNegInf);
      std::fill(sum, sum + M, acc_t(0));
      const int64_t s_begin = split * srows, s_end = std::min(N, s_begin + srows);
      const int64_t tile = balanced_tile(s_end - s_begin);
      for (int64_t n0 = s_begin; n0 < s_end; n0 += tile) {
        const int64_t nt = std::min(tile, s_end - n0);
        int64_t ldx = 0;
        const acc_t* xa =
            bf16_prod ? nullptr : x_tile(xp, sx, b, n0, nt, C, x_direct, xbuf.data(), ldx);
        // The tile's logits, cluster-major (rows of nt): in place, or transposed/converted into pt,
        // whose rows are then exponentiated in place.
        int64_t ldl;
        const acc_t* lt =
            logits_tile(lp, sl, b, n0, nt, M, /*patch_major=*/false, pt.data(), ldl, lconv.data());
        const bool in_place = lt != pt.data();
        for (int64_t m = 0; m < M; ++m) {
          if (in_place) {
            prefetch_next_tile(lt + m * ldl, 1, nt, std::min(tile, s_end - n0 - nt));
          }
          if (x_direct) prefetch_rows_slice(xa, ldx, nt, C, m, M);
          acc_t* prow = pt.data() + m * nt;
          const acc_t* lsrc = lt + m * ldl;
          const acc_t tile_mx = row_max(lsrc, nt);
          acc_t tile_sum;
          if (!(tile_mx > kNegInf)) {
            // Everything -inf so far in this tile (or NaN only): weights exp(-inf) = 0, but a
            // NaN must still poison the row like torch.softmax; exp(NaN - 0) does that.
            tile_sum = exp_shifted(lsrc, mx[m] > kNegInf ? mx[m] : acc_t(0), prow, nt);
          } else {
            if (tile_mx > mx[m]) {
              // exp(-inf) = 0 on the first finite tile: acc and sum are 0 anyway.
              const acc_t r = std::exp(mx[m] - tile_mx);
              sum[m] *= r;
              if (n0 != s_begin) {  // acc is written (not read) by the first tile's product
                acc_t* arow = acc + m * C;
                for (int64_t c = 0; c < C; ++c) arow[c] *= r;
              }
              mx[m] = tile_mx;
            }
            tile_sum = exp_shifted(lsrc, mx[m], prow, nt);
          }
          sum[m] += tile_sum;
        }
        // The first tile overwrites acc (no zero fill, no reads).
        if constexpr (kBf16In) {
          if (bf16_prod) {
            pack_x_pairs(xp + b * sx[0] + n0 * sx[1], sx[1], nt, C, xpk.data());
            acc_t* dst = n0 == s_begin ? acc : tmp.data();
            float32_kernels().gemm_packed_bf16(pt.data(), nt,
                                               reinterpret_cast<const uint16_t*>(xpk.data()), dst,
                                               C, M, nt, C, nullptr, /*gelu=*/false);
            if (n0 != s_begin) {
              for (int64_t i = 0; i < MC; ++i) acc[i] += tmp[i];
            }
            continue;
          }
        }
        gemm_nn(pt.data(), nt, xa, ldx, acc, C, M, nt, C, /*accumulate=*/n0 != s_begin);
      }
      if (single) {
        for (int64_t m = 0; m < M; ++m) {
          finish_row(acc + m * C, mx[m], sum[m], wp, bp, eps_acc, C, stp + 2 * (b * M + m),
                     op + (b * M + m) * C);
        }
      }
    }
  });
  if (single) return;

  // Merge the splits (in split order), normalise, LayerNorm.
  const int64_t merge_grain = std::max<int64_t>(1, kGrainSize / (nsplit * C + 4 * C));
  parallel_for(0, B * M, merge_grain, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t b = row / M, m = row % M;
      acc_t gmx = kNegInf;
      for (int64_t k = 0; k < nsplit; ++k) {
        const acc_t v = mx_part[(b * nsplit + k) * M + m];
        gmx = v > gmx ? v : gmx;
      }
      acc_t* prow = pp + row * C;  // pooled is freshly allocated, hence contiguous
      std::fill(prow, prow + C, acc_t(0));
      acc_t s = 0;
      for (int64_t k = 0; k < nsplit; ++k) {
        const int64_t t = b * nsplit + k;
        // Splits whose logits were all -inf have mx = -inf and contribute exp(-inf) = 0 (the
        // row with no finite logit at all is handled below).
        const acc_t wgt = std::exp(mx_part[t * M + m] - gmx);
        s += wgt * sum_part[t * M + m];
        const acc_t* arow = acc_part.data() + t * MC + m * C;
        for (int64_t c = 0; c < C; ++c) prow[c] += wgt * arow[c];
      }
      finish_row(prow, gmx, s, wp, bp, eps_acc, C, stp + 2 * row, op + row * C);
    }
  });
}

}  // namespace

// Declared in cpu/cpu_ops.h: the layer composite (fused/conv_paca_layer.cpp) calls it directly.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_pool_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_supported_float(x, kOp, "x");
  check_pool_args(logits, x, weight, bias, eps, kOp);
  const int64_t B = logits.size(0), M = logits.size(1), C = x.size(2);

  const at::ScalarType acc = acc_dtype(x);
  at::Tensor out = empty_output({B, M, C}, x.options());
  at::Tensor pooled = empty_output({B, M, C}, x.options().dtype(acc));
  at::Tensor stats = empty_output({B, M, 2}, x.options().dtype(acc));
  if (B * M == 0) return {out, pooled, stats};
  if (C == 0) {  // nothing to pool: out and pooled are empty, the softmax stats still defined
    pool_stats_without_channels(logits, stats);
    return {out, pooled, stats};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cluster_pool_fwd",
                                  [&] {
                                    // (C,) vectors in the accumulation dtype (tensor_access.h).
                                    using acc_t = at::opmath_type<scalar_t>;
                                    std::vector<acc_t> wv, bv;
                                    if (weight.has_value()) wv = to_vector<acc_t>(*weight);
                                    if (bias.has_value()) bv = to_vector<acc_t>(*bias);
                                    cluster_pool_fwd_kernel<scalar_t>(
                                        logits, x, weight ? wv.data() : nullptr,
                                        bias ? bv.data() : nullptr, eps, out, pooled, stats);
                                  });
  return {out, pooled, stats};
}

namespace {

// out (rows x nt, row stride nt) = A (rows x C, contiguous) . x^T, x (nt x C, row stride ldx):
// the backward's dS = dP.x^T. x^T is written into xt (at least ceil(nt / 16) * 16 * C values) as
// the 16-column panels of the vector builds' packed product (panel p: the transpose of x rows
// 16p .. 16p+15, zero-padded past nt), which then reads it as it reads a packed weight; a
// transpose of x rows in cache, where the plain product would copy x^T into its panels again.
// The baseline and float64 builds take a plain x^T (C x nt) and gemm_nn.
inline void product_with_x_transposed(const float* A, int64_t rows, int64_t C, const float* x,
                                      int64_t ldx, int64_t nt, float* xt, float* out) {
  const auto packed = float32_kernels().gemm_packed;
  if (packed == nullptr) {
    transpose(x, ldx, nt, C, xt, nt);
    gemm_nn(A, C, xt, nt, out, nt, rows, C, nt, /*accumulate=*/false);
    return;
  }
  for (int64_t j = 0; j < nt; j += 16) {
    const int64_t w = std::min<int64_t>(16, nt - j);
    float* panel = xt + (j / 16) * C * 16;
    if (w < 16) std::fill(panel, panel + C * 16, 0.0f);
    transpose(x + j * ldx, ldx, w, C, panel, 16);
  }
  packed(A, C, xt, out, nt, rows, C, nt, /*bias=*/nullptr, /*gelu=*/false);
}
inline void product_with_x_transposed(const double* A, int64_t rows, int64_t C, const double* x,
                                      int64_t ldx, int64_t nt, double* xt, double* out) {
  transpose(x, ldx, nt, C, xt, nt);
  gemm_nn(A, C, xt, nt, out, nt, rows, C, nt, /*accumulate=*/false);
}

// ---- backward ---------------------------------------------------------------------------------
//
// Phase 1, on the small (B, M, C) rows: LayerNorm backward gives dP (the gradient w.r.t. pooled),
// rowdot[b, m] = <dP, pooled> = rowsum(S o dS) (so the softmax backward needs no extra pass over
// N), and per-batch partial sums of dweight/dbias.
// Phase 2, float32/float64 with patch-major logits (the clustering heads' layout, unit stride over
// M): the tiles are (nt x M) rows and dlogits is returned in that layout (no transposes; see the
// pass in cluster_pool_bwd_kernel). Otherwise:
// Phase 2, one streaming pass over N in tiles of kPatchTile patches, parallel over (b, tile), in
// the cluster-major orientation of the output dlogits (M x nt), so that its rows are written once,
// in order (a patch-major tile transposed into dlogits's rows cost three times the products' share
// of the time: 32-byte pieces of 100 lines of fresh memory):
//   dS   = dP.x^T                         (M x C).(C x nt): x^T packed as the product's 16-column
//                                         panels straight from the x rows (a transpose in cache)
//   S    = exp(logits - max) / sum        the vector exp along each cluster's row
//   dlogits = S o (dS - rowdot)           elementwise, straight into dlogits's rows
//   dx   = S^T.dP                         (nt x M).(M x C), accumulated in the output tile
// Cost per tile: 4 nt M C flops in the two products against about 6 nt M elementwise operations and
// a transpose of nt C (and of nt M for patch-major logits, the clustering heads' layout), all in
// cache, so at C = 96-384 the products are nearly all of it. Each tile's dlogits columns and dx
// rows are written by exactly one task: no atomics, and no reduction whose order could depend on
// the thread count.
// Whether cluster_pool_bwd returns dlogits patch-major (strides (N*M, 1, M), the logits' own
// orientation) rather than contiguous (B, M, N): for float32/float64 x and logits with unit stride
// over M (the clustering heads' layout), M, N > 1. The C++ op's fake kernel (ops/_registration.py,
// dlogits_patch_major) states the same rule.
bool dlogits_patch_major(const at::Tensor& logits, const at::Tensor& x) {
  const bool same = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  return same && logits.scalar_type() == x.scalar_type() && logits.size(1) > 1 &&
         logits.size(2) > 1 && logits.stride(1) == 1;
}

template <typename scalar_t, typename param_t>
void cluster_pool_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& logits,
                             const at::Tensor& x, const at::opmath_type<scalar_t>* wp,
                             const at::Tensor& pooled, const at::Tensor& stats, double eps,
                             at::Tensor& dlogits, at::Tensor& dx, at::Tensor& dweight,
                             at::Tensor& dbias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), M = logits.size(1), N = logits.size(2), C = x.size(2);
  const Strides sg(grad_out), sl(logits), sx(x), sp(pooled), sst(stats);
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* pp = pooled.const_data_ptr<acc_t>();
  const acc_t* stp = stats.const_data_ptr<acc_t>();
  // wp: the LayerNorm's weight as acc_t (C,), or nullptr.
  const acc_t eps_acc = static_cast<acc_t>(eps);

  // Phase 1. dP (B, M, C), an operand of both products; per (b, m): rowdot, the softmax max and
  // 1 / sum.
  const Scratch<acc_t> dp(ScratchSlot::kCall0, B * M * C), rowdot(ScratchSlot::kCall2, B * M), smax(ScratchSlot::kCall3, B * M),
      sinv(ScratchSlot::kCall4, B * M), dwb_part(ScratchSlot::kCall5, 2 * B * C);
  // The patch-major pass of phase 2 reads dP^T per batch: each phase-1 task transposes the dP rows
  // it wrote (in parallel, while they are in cache).
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const bool patch_major = kSameType && dlogits_patch_major(logits, x);
  const Scratch<acc_t> dpt(ScratchSlot::kCall6, patch_major ? B * C * M : 0);
  const int64_t ln_grain = std::max<int64_t>(1, kGrainSize / (8 * M * C));
  parallel_for(0, B, ln_grain, [&](int64_t lo, int64_t hi) {
    // Every loop over C below is elementwise or one of sum_interleaved's sums, so that it
    // vectorises (a running scalar sum per row is a serial chain of adds).
    std::vector<acc_t> pbuf(C), gobuf(C), xhat(C), g(C);
    for (int64_t b = lo; b < hi; ++b) {
      acc_t* dwb = dwb_part.data() + 2 * b * C;  // dweight partial, then dbias partial
      acc_t* dbb = dwb + C;
      std::fill(dwb, dwb + 2 * C, acc_t(0));
      for (int64_t m = 0; m < M; ++m) {
        const acc_t* psrc = pp + b * sp[0] + m * sp[1];
        const acc_t* prow = psrc;  // pooled's row, in place when contiguous
        if (sp[2] != 1) {
          for (int64_t c = 0; c < C; ++c) pbuf[c] = psrc[c * sp[2]];
          prow = pbuf.data();
        }
        const scalar_t* gsrc = gp + b * sg[0] + m * sg[1];
        acc_t* go = gobuf.data();
        if (sg[2] == 1) {
          for (int64_t c = 0; c < C; ++c) go[c] = static_cast<acc_t>(gsrc[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) go[c] = static_cast<acc_t>(gsrc[c * sg[2]]);
        }
        // Overflow-free statistics (cpu/math/layernorm.h): xhat from the scaled row, and the
        // rstd of pooled itself, rstd_q / scale, for dP.
        const LayerNormStats<acc_t> st = layer_norm_stats(prow, C, eps_acc);
        const acc_t inv = st.inv_scale, mean = st.mean, rstd = st.rstd * inv;
        for (int64_t c = 0; c < C; ++c) {
          xhat[c] = (prow[c] * inv - mean) * st.rstd;
          dwb[c] += go[c] * xhat[c];
          dbb[c] += go[c];
        }
        // g = grad_out * weight (the gradient w.r.t. xhat); grad_out itself without a weight.
        const acc_t* gw = go;
        if (wp != nullptr) {
          for (int64_t c = 0; c < C; ++c) g[c] = go[c] * wp[c];
          gw = g.data();
        }
        const acc_t mean_g = sum_interleaved<acc_t>(gw, nullptr, C) / static_cast<acc_t>(C);
        const acc_t mean_gx = sum_interleaved(gw, xhat.data(), C) / static_cast<acc_t>(C);
        acc_t* dprow = dp.data() + (b * M + m) * C;
        for (int64_t c = 0; c < C; ++c) dprow[c] = rstd * (gw[c] - mean_g - xhat[c] * mean_gx);
        rowdot[b * M + m] = sum_interleaved(dprow, prow, C);
        const acc_t* st2 = stp + b * sst[0] + m * sst[1];
        smax[b * M + m] = st2[0];
        sinv[b * M + m] = acc_t(1) / st2[sst[2]];
      }
      if (patch_major) transpose(dp.data() + b * M * C, C, M, C, dpt.data() + b * C * M, M);
    }
  });
  {
    param_t* dwp = dweight.mutable_data_ptr<param_t>();
    param_t* dbp = dbias.mutable_data_ptr<param_t>();
    for (int64_t c = 0; c < C; ++c) {
      acc_t sw = 0, sb = 0;
      for (int64_t b = 0; b < B; ++b) {  // fixed order over the batch
        sw += dwb_part[2 * b * C + c];
        sb += dwb_part[2 * b * C + C + c];
      }
      dwp[c] = static_cast<param_t>(sw);
      dbp[c] = static_cast<param_t>(sb);
    }
  }

  // Phase 2.
  scalar_t* dlp = dlogits.mutable_data_ptr<scalar_t>();  // (B, M, N): contiguous or patch-major
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();       // (B, N, C) contiguous
  // x rows are used in place when they already are contiguous acc_t vectors (no copy).
  const bool x_direct = std::is_same_v<scalar_t, acc_t> && sx[2] == 1;
  if constexpr (kSameType) {
    if (patch_major) {
      // Patch-major logits (unit stride over M: the clustering heads' layout) and dlogits in that
      // layout (dlogits_patch_major): every tile works on (nt x M) rows, as the logits arrive and
      // dlogits leaves, so that nothing is transposed:
      //   dS^T = x.dP^T         (nt x C).(C x M), dP^T transposed once per batch
      //   S    = exp(logits - max) / sum, per column, and dlogits = S o (dS - rowdot) into
      //          dlogits's rows, in one pass (exp_shifted_cols)
      //   dx   = S.dP           (nt x M).(M x C), straight into dx's rows
      // Every element is computed as in the cluster-major pass below (the same exp and products,
      // each sum in the same order), so both give the same bits.
      const int64_t tile = balanced_tile(N);
      const int64_t ntile = (N + tile - 1) / tile;
      const int64_t grain = std::max<int64_t>(1, kGrainSize / (2 * M * C * kPatchTile));
      const int64_t ldd = dlogits.stride(2);  // M
      parallel_for(0, B * ntile, grain, [&](int64_t lo, int64_t hi) {
        const Scratch<acc_t> xbuf(ScratchSlot::kTask0, x_direct ? 0 : kPatchTile * C),
            sbuf(ScratchSlot::kTask2, M * kPatchTile), dsbuf(ScratchSlot::kTask3, M * kPatchTile);
        acc_t* sm = sbuf.data();   // S (nt x M)
        acc_t* ds = dsbuf.data();  // dS^T (nt x M)
        for (int64_t task = lo; task < hi; ++task) {
          const int64_t b = task / ntile, n0 = (task % ntile) * tile;
          const int64_t nt = std::min(tile, N - n0);
          int64_t ldx;
          const acc_t* xa = x_tile(xp, sx, b, n0, nt, C, x_direct, xbuf.data(), ldx);
          gemm_nn(xa, ldx, dpt.data() + b * C * M, M, ds, M, nt, C, M, /*accumulate=*/false);
          const scalar_t* lt = lp + b * sl[0] + n0 * sl[2];
          // S and dlogits = S o (dS - rowdot) in one pass, into dlogits's rows.
          exp_shifted_cols(lt, sl[2], nt, M, smax.data() + b * M, sinv.data() + b * M, sm, M, ds, M,
                           rowdot.data() + b * M, dlp + b * dlogits.stride(0) + n0 * ldd, ldd);
          gemm_nn(sm, M, dp.data() + b * M * C, C, dxp + (b * N + n0) * C, C, nt, M, C,
                  /*accumulate=*/false);
        }
      });
      return;
    }
  }
  // bf16 x (a bf16 model, or autocast) where the CPU multiplies bf16: the pooling product as bf16
  // products with float32 sums, as autocast's bf16 matmul of the assignment and x computes it (the
  // tile's unnormalised probabilities exp(l - max) <= 1 rounded to bf16 as the kernel reads them,
  // x bf16 already); the softmax, its sums and the LayerNorm stay float32.
  constexpr bool kBf16In = std::is_same_v<scalar_t, at::BFloat16>;
  const bool bf16_prod = kBf16In && sx[2] == 1 && float32_kernels().gemm_packed_bf16 != nullptr;
  const int64_t tile = balanced_tile(N);
  const int64_t ntile = (N + tile - 1) / tile;
  const int64_t xt_size = (kPatchTile + 15) / 16 * 16 * C;  // x^T, panels padded to 16 columns
  const int64_t grain = std::max<int64_t>(1, kGrainSize / (2 * M * C * kPatchTile));
  parallel_for(0, B * ntile, grain, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> xbuf(ScratchSlot::kTask0, x_direct ? 0 : kPatchTile * C),
        xtbuf(ScratchSlot::kTask1, xt_size), sbuf(ScratchSlot::kTask2, M * kPatchTile),
        dsbuf(ScratchSlot::kTask3, M * kPatchTile),
        dxb(ScratchSlot::kTask4, kSameType ? 0 : kPatchTile * C);
    acc_t* sm = sbuf.data();   // the logits, then S (M x nt)
    acc_t* ds = dsbuf.data();  // dS (M x nt)
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / ntile, n0 = (task % ntile) * tile;
      const int64_t nt = std::min(tile, N - n0);
      int64_t ldx;
      const acc_t* xa = x_tile(xp, sx, b, n0, nt, C, x_direct, xbuf.data(), ldx);
      // dS = dP.x^T (M x nt).
      product_with_x_transposed(dp.data() + b * M * C, M, C, xa, ldx, nt, xtbuf.data(), ds);
      int64_t ldl;
      const acc_t* lt = logits_tile(lp, sl, b, n0, nt, M, /*patch_major=*/false, sm, ldl);
      for (int64_t m = 0; m < M; ++m) {
        // S = exp(logits - max) / sum from the forward's stats: logits - max is exact, so S is
        // as accurate as torch.softmax's at any logit magnitude. An all -inf row (max = -inf,
        // sum = 0) gives NaN, like the reference.
        acc_t* srow = sm + m * nt;
        exp_shifted(lt + m * ldl, smax[b * M + m], srow, nt);
        const acc_t inv_sum = sinv[b * M + m], rd = rowdot[b * M + m];
        const acc_t* dsr = ds + m * nt;
        scalar_t* dlr = dlp + (b * M + m) * N + n0;
        for (int64_t i = 0; i < nt; ++i) {
          const acc_t sv = srow[i] * inv_sum;
          srow[i] = sv;
          dlr[i] = static_cast<scalar_t>(sv * (dsr[i] - rd));
        }
      }
      // dx = S^T.dP, accumulated straight into the output when it has the acc dtype.
      scalar_t* dxr = dxp + (b * N + n0) * C;
      acc_t* dxa = kSameType ? reinterpret_cast<acc_t*>(dxr) : dxb.data();
      std::fill(dxa, dxa + nt * C, acc_t(0));
      gemm_tn_acc(sm, nt, dp.data() + b * M * C, C, dxa, C, M, nt, C);
      if constexpr (!kSameType) {
        for (int64_t e = 0; e < nt * C; ++e) dxr[e] = static_cast<scalar_t>(dxb[e]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cluster_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& pooled, const at::Tensor& stats,
    double eps) {
  check_supported_float(x, kBwdOp, "x");
  check_pool_bwd_args(grad_out, logits, x, weight, pooled, stats, eps, kBwdOp);
  const int64_t B = logits.size(0), M = logits.size(1), N = logits.size(2), C = x.size(2);
  const at::ScalarType pdtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  // dlogits in the logits' orientation where the fast path serves it (dlogits_patch_major).
  at::Tensor dlogits = dlogits_patch_major(logits, x)
                           ? empty_output({B, N, M}, logits.options()).transpose(1, 2)
                           : empty_output({B, M, N}, logits.options());
  at::Tensor dx = empty_output({B, N, C}, x.options());
  at::Tensor dweight = empty_output({C}, x.options().dtype(pdtype));
  at::Tensor dbias = empty_output({C}, x.options().dtype(pdtype));
  if (B * M == 0 || C == 0) {  // no clusters, or no channels: nothing flows back
    dlogits.zero_();
    dx.zero_();
    dweight.zero_();
    dbias.zero_();
    return {dlogits, dx, dweight, dbias};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cluster_pool_bwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        std::vector<acc_t> wv;
        if (weight.has_value()) wv = to_vector<acc_t>(*weight);
        const acc_t* wptr = weight ? wv.data() : nullptr;
        if (pdtype == x.scalar_type()) {
          cluster_pool_bwd_kernel<scalar_t, scalar_t>(grad_out, logits, x, wptr, pooled, stats, eps,
                                                      dlogits, dx, dweight, dbias);
        } else {  // float32 LayerNorm parameters with half/bfloat16 activations
          cluster_pool_bwd_kernel<scalar_t, float>(grad_out, logits, x, wptr, pooled, stats, eps,
                                                   dlogits, dx, dweight, dbias);
        }
      });
  return {dlogits, dx, dweight, dbias};
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("cluster_pool_fwd", &paca_kernels::cluster_pool_fwd_cpu);
  m.impl("cluster_pool_bwd", &paca_kernels::cluster_pool_bwd_cpu);
}
