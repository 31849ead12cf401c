// Kernels of paca_kernels::cluster_pool_fwd / _bwd (schemas and semantics: csrc/registration.cpp)
// and their plans and launch sequences, templated on the element type and on the runtime that
// launches them: csrc/cuda/cluster_pool.cu instantiates them with CudaRuntime (host API:
// launchers.h); the tests compile the float32 path with a host compiler and run it on CPU threads.
// No torch headers.
//
// Forward: a CTA owns BM clusters of one batch element and the whole (padded) channel row, and
// streams over its range of N in tiles of BK patches with an online softmax (running max m,
// running sum l, float accumulator rescaled when the max grows):
//     m' = max(m, rowmax(t))   alpha = exp(m - m')   p = exp(t - m')
//     l' = alpha*l + rowsum(p)     acc' = alpha*acc + p.x_tile
// then pooled = acc / l, stats = (m, l) and the LayerNorm over C in the epilogue. When B * M/BM
// CTAs cannot fill the GPU, N is split across CTAs (flash-decoding style): each writes its partial
// (m, l, acc) and a second kernel merges them in split order (deterministic), then normalises.
//
// Backward (one streaming pass over N, deterministic):
//   1. per cluster row (B*M rows, small): LayerNorm backward
//        dP = rstd * (g - mean_c g - xhat * mean_c(g*xhat)),  g = grad_out * weight,
//      rowdot = <dP, pooled> (= rowsum(S o dS), so the softmax backward needs no extra pass), and
//      per row-group partial sums of dweight = sum grad_out*xhat and dbias = sum grad_out;
//   2. per tile of BK patches, all clusters in chunks of BM, with S = exp(logits - m) / l (the
//      forward's max and sum kept apart: logits - m is exact, where a rounded lse = m + log l of 1e4
//      would put 2e-4 relative error into S):
//        dS = dP.x^T,  dlogits = S o (dS - rowdot),  dx = sum_m S^T.dP
//      (each CTA owns its dlogits columns and dx rows: no atomics);
//   3. dweight/dbias: the row-group partials added in group order.
//
// Products: fp16/bf16 inputs run on tensor cores in TF32 (16x16x8, float accumulation): the
// probabilities and dP stay float (rounded to TF32, 10-bit mantissa) instead of being rounded to
// the input's half precision, which would degrade the saved pooled tokens and, through rowdot,
// dlogits (the Triton kernels made the same choice); x is exact in TF32. float32 inputs: fp32 FMA.

#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

// A namespace per op: the tests include both headers in one translation unit.
namespace paca_kernels::cuda::pool {
namespace {

constexpr int kThreads = 256;  // 8 warps per CTA
constexpr int kWarps = kThreads / kWarp;
// Resident CTAs per multiprocessor the register allocation must allow for the tile kernels
// (<= 128 registers/thread); without it ptxas picks lower register targets and spills.
constexpr int kMinCtas = 2;
// Shared memory a CTA should not exceed when a smaller tile configuration fits (occupancy).
constexpr size_t kPreferredSmem = 112 * 1024;
// Cluster rows per warp in the LayerNorm-backward kernel (one dweight/dbias partial per group).
constexpr int64_t kRowsPerGroup = 16;

template <typename T>
constexpr Mma pool_mma() {
  return std::is_same_v<T, float> ? Mma::kSimt : Mma::kTf32;
}
template <typename T>
constexpr int pad_unit() {
  return std::is_same_v<T, float> ? 4 : 16;
}

// Compiled tile configurations (clusters per CTA BM, patches per tile BK), largest first.
constexpr int kFwdBM[3] = {64, 32, 16};
constexpr int kFwdBK[3] = {32, 32, 16};
constexpr int kBwdBM[3] = {32, 32, 16};
constexpr int kBwdBK[3] = {64, 32, 16};

struct FwdLayout {
  int Cp, lda, ldl;
  size_t off_x, off_l, off_m, off_sum, off_alpha, total;
  __host__ __device__ static FwdLayout make(int64_t C, int pad, int BM, int BK) {
    FwdLayout l{};
    l.Cp = static_cast<int>(round_up(C, pad));
    l.lda = l.Cp + 4;  // accumulator and x tile rows
    l.ldl = BK + 4;    // logits / probabilities rows
    size_t off = align128(sizeof(float) * BM * l.lda);
    l.off_x = off;
    off += align128(sizeof(float) * BK * l.lda);
    l.off_l = off;
    off += align128(sizeof(float) * BM * l.ldl);
    l.off_m = off;
    off += align128(sizeof(float) * BM);
    l.off_sum = off;
    off += align128(sizeof(float) * BM);
    l.off_alpha = off;
    off += align128(sizeof(float) * BM);
    l.total = off;
    return l;
  }
};

struct BwdLayout {
  int Cp, ldx, lds;
  size_t off_dx, off_dp, off_s, off_ds, off_max, off_inv, off_rd, total;
  __host__ __device__ static BwdLayout make(int64_t C, int pad, int BM, int BK) {
    BwdLayout l{};
    l.Cp = static_cast<int>(round_up(C, pad));
    l.ldx = l.Cp + 4;
    l.lds = BK + 4;
    size_t off = align128(sizeof(float) * BK * l.ldx);  // x tile at 0
    l.off_dx = off;
    off += align128(sizeof(float) * BK * l.ldx);
    l.off_dp = off;
    off += align128(sizeof(float) * BM * l.ldx);
    l.off_s = off;
    off += align128(sizeof(float) * BM * l.lds);
    l.off_ds = off;
    off += align128(sizeof(float) * BM * l.lds);
    l.off_max = off;
    off += align128(sizeof(float) * BM);
    l.off_inv = off;
    off += align128(sizeof(float) * BM);
    l.off_rd = off;
    off += align128(sizeof(float) * BM);
    l.total = off;
    return l;
  }
};

// The power of two a pooled row is divided by before its LayerNorm statistics, so that the squares
// neither overflow (a row of 1e20: var = inf, and the LayerNorm returned the bias, finite and wrong)
// nor underflow (1e-20); LayerNorm is invariant under it with eps scaled alike, and the division is
// exact. The rule of csrc/cpu/math/layernorm.h (and of the Triton kernels and the reference):
// 2^floor(log2 amax), clamped to [max(2^floor(log2 sqrt(eps)) * 2^-40, 2^-95), 2^100] so that
// eps / scale^2 stays finite and 1 / scale normal; 1 for a zero, inf or NaN row.
__device__ __forceinline__ float layer_norm_scale(float amax, float eps) {
  if (!(amax > 0.f) || !(amax <= 3.40282347e38f)) return 1.f;
  int e = 0;
  frexpf(amax, &e);  // amax in [2^(e-1), 2^e)
  int lo = -95;
  if (eps > 0.f) {
    int k = 0;
    frexpf(sqrtf(eps), &k);
    lo = k - 41 > lo ? k - 41 : lo;
  }
  const int p = e - 1 < lo ? lo : (e - 1 > 100 ? 100 : e - 1);
  return ldexpf(1.f, p);
}

// Row statistics for the LayerNorm over C, one warp (lane owns columns lane, lane+32, ...):
// inv = 1 / scale, mean and rstd of q = row * inv; xhat = (row * inv - mean) * rstd, and the rstd
// of the row itself is rstd * inv.
struct LnStats {
  float inv, mean, rstd;
};
template <typename Load>
__device__ __forceinline__ LnStats layer_norm_stats(Load load, int64_t C, float eps) {
  const int lane = threadIdx.x % kWarp;
  float amax = 0.f;  // fmaxf skips NaN: a NaN still poisons the sums below
  for (int64_t c = lane; c < C; c += kWarp) amax = fmaxf(amax, fabsf(load(c)));
  const float inv = 1.f / layer_norm_scale(warp_max(amax), eps);
  float s = 0.f;
  for (int64_t c = lane; c < C; c += kWarp) s += load(c) * inv;
  const float mean = warp_sum(s) / static_cast<float>(C);
  float s2 = 0.f;
  for (int64_t c = lane; c < C; c += kWarp) {
    const float d = load(c) * inv - mean;
    s2 += d * d;
  }
  const float var = warp_sum(s2) / static_cast<float>(C);  // biased variance
  // eps / scale^2 underflows for huge rows: floored at FLT_MIN, which only matters for an exactly
  // constant row (every deviation 0, and 0 * rstd stays 0).
  const float eps_q = fmaxf(eps * inv * inv, 1.17549435e-38f);
  return {inv, mean, 1.f / sqrtf(var + eps_q)};
}

// Normalised pooled row -> LayerNorm over C -> out row; one warp, each lane owning columns
// c = lane, lane+32, ... of `row` (which it wrote itself: no synchronisation needed).
template <typename T>
__device__ __forceinline__ void layernorm_row(const float* row, int64_t C, float eps,
                                              const float* weight, const float* bias, T* out_row) {
  const int lane = threadIdx.x % kWarp;
  const LnStats st = layer_norm_stats([&](int64_t c) { return row[c]; }, C, eps);
  const float inv = st.inv, mean = st.mean, rstd = st.rstd;
  for (int64_t c = lane; c < C; c += kWarp) {
    float y = (row[c] * inv - mean) * rstd;
    if (weight != nullptr) y *= weight[c];
    if (bias != nullptr) y += bias[c];
    out_row[c] = from_float<T>(y);
  }
}

// ---- forward -----------------------------------------------------------------------------------

// grid (cluster blocks, min(B, 65535), splits). SPLIT=false: writes out, pooled, stats. SPLIT=true:
// writes the partial state part_m, part_l (B, S, M) and part_acc (B, S, M, C).
template <typename T, int BM, int BK, bool SPLIT>
__global__ void __launch_bounds__(kThreads, kMinCtas)
    pool_fwd_kernel(const PoolFwdArgs a, int64_t chunk, float* part_m, float* part_l,
                    float* part_acc) {
  unsigned char* smem = dynamic_smem();
  const FwdLayout L = FwdLayout::make(a.C, pad_unit<T>(), BM, BK);
  float* sAcc = reinterpret_cast<float*>(smem);
  float* sX = reinterpret_cast<float*>(smem + L.off_x);
  float* sL = reinterpret_cast<float*>(smem + L.off_l);
  float* sM = reinterpret_cast<float*>(smem + L.off_m);
  float* sSum = reinterpret_cast<float*>(smem + L.off_sum);
  float* sAlpha = reinterpret_cast<float*>(smem + L.off_alpha);

  const T* logits = static_cast<const T*>(a.logits);
  const T* x = static_cast<const T*>(a.x);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t split = blockIdx.z, splits = gridDim.z;
  const int64_t n_lo = split * chunk, n_hi = imin(a.N, n_lo + chunk);

  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    for (int idx = threadIdx.x; idx < BM * L.Cp; idx += kThreads) {
      sAcc[(idx / L.Cp) * L.lda + idx % L.Cp] = 0.f;
    }
    if (threadIdx.x < BM) {
      sM[threadIdx.x] = -INFINITY;
      sSum[threadIdx.x] = 0.f;
    }
    for (int64_t nb = n_lo; nb < n_hi; nb += BK) {
      __syncthreads();  // the previous tile's product has finished with sL / sX
      // Logits tile (BM x BK): -inf outside [m < M, n < n_hi] so it takes no weight.
      load_tile<kThreads>(sL, L.ldl, logits + b * a.sl[0] + nb * a.sl[2], a.sl[1], a.sl[2], m0,
                          a.M, n_hi - nb, BM, BK, -INFINITY);
      // x tile (BK x Cp): zeros outside.
      // Synchronous loads, not cp.async: the fp16/bf16 N tiles convert T -> float on the way to shared
      // memory and the logits tile fills -inf, which a cp.async byte copy (zero fill) cannot do; the
      // float32 x tile could, but stays on the synchronous path (not double buffered).
      load_tile<kThreads>(sX, L.lda, x + b * a.sx[0], a.sx[1], a.sx[2], nb, n_hi, a.C, BK, L.Cp,
                          0.f);
      __syncthreads();
      for (int r = warp; r < BM; r += kWarps) {
        float* lrow = sL + r * L.ldl;
        float tmax = -INFINITY;
        for (int c = lane; c < BK; c += kWarp) tmax = fmaxf(tmax, lrow[c]);
        tmax = warp_max(tmax);
        const float m_old = sM[r];
        const float m_new = fmaxf(m_old, tmax);
        // A row that has seen only -inf so far would give exp(-inf - -inf) = NaN: shift by 0
        // instead, so p and alpha are exactly 0. A NaN logit still poisons its row through p.
        const float m_safe = m_new == -INFINITY ? 0.f : m_new;
        float psum = 0.f;
        for (int c = lane; c < BK; c += kWarp) {
          const float p = expf(lrow[c] - m_safe);
          lrow[c] = p;
          psum += p;
        }
        psum = warp_sum(psum);
        const float alpha = expf(m_old - m_safe);
        __syncwarp();  // every lane has read sM[r] before lane 0 updates it
        if (lane == 0) {
          sM[r] = m_new;
          sSum[r] = sSum[r] * alpha + psum;
          sAlpha[r] = alpha;
        }
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < BM * L.Cp; idx += kThreads) {
        const int r = idx / L.Cp;
        sAcc[r * L.lda + (idx - r * L.Cp)] *= sAlpha[r];
      }
      __syncthreads();
      block_gemm<pool_mma<T>(), Lay::kRow, Lay::kRow, kThreads>(sAcc, L.lda, sL, L.ldl, sX, L.lda,
                                                                BM, L.Cp, BK, true);
    }
    __syncthreads();
    for (int r = warp; r < BM; r += kWarps) {
      const int64_t m = m0 + r;
      if (m >= a.M) continue;
      float* arow = sAcc + r * L.lda;
      if constexpr (SPLIT) {
        const int64_t prow = (b * splits + split) * a.M + m;
        if (lane == 0) {
          part_m[prow] = sM[r];
          part_l[prow] = sSum[r];
        }
        for (int64_t c = lane; c < a.C; c += kWarp) part_acc[prow * a.C + c] = arow[c];
      } else {
        // All logits -inf: l = 0, pooled = 0 * inf = NaN (as torch.softmax gives), stats (-inf, 0).
        const float l = sSum[r];
        const float inv = 1.f / l;
        const int64_t row = b * a.M + m;
        for (int64_t c = lane; c < a.C; c += kWarp) {
          const float p = arow[c] * inv;
          arow[c] = p;
          a.pooled[row * a.C + c] = p;
        }
        if (lane == 0) {
          a.stats[2 * row] = sM[r];
          a.stats[2 * row + 1] = l;
        }
        layernorm_row(arow, a.C, a.eps, a.weight, a.bias, static_cast<T*>(a.out) + row * a.C);
      }
    }
    __syncthreads();  // the next batch element reuses shared memory
  }
}

// Merges the S split states of each (b, m) row in split order, one warp per row:
//   m* = max_s m_s,  w_s = exp(m_s - m*),  l = sum_s w_s l_s,  pooled = sum_s w_s acc_s / l,
// then stats and the LayerNorm. A split that saw only -inf has m_s = -inf and weight 0.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_merge_kernel(const PoolFwdArgs a, int64_t splits, const float* part_m,
                      const float* part_l, const float* part_acc) {
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = a.B * a.M;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp; row < rows;
       row += stride) {
    const int64_t b = row / a.M, m = row % a.M;
    const int64_t base = b * splits * a.M + m;  // (b, s, m) = base + s * M
    float gmx = -INFINITY;
    for (int64_t s = lane; s < splits; s += kWarp) gmx = fmaxf(gmx, part_m[base + s * a.M]);
    gmx = warp_max(gmx);
    const float m_safe = gmx == -INFINITY ? 0.f : gmx;
    float l = 0.f;  // every lane sums in the same order: identical values, no reduction tree
    for (int64_t s = 0; s < splits; ++s) {
      l += expf(part_m[base + s * a.M] - m_safe) * part_l[base + s * a.M];
    }
    const float inv = 1.f / l;
    float* prow = a.pooled + row * a.C;
    for (int64_t c = lane; c < a.C; c += kWarp) {
      float acc = 0.f;
      for (int64_t s = 0; s < splits; ++s) {
        acc += expf(part_m[base + s * a.M] - m_safe) * part_acc[(base + s * a.M) * a.C + c];
      }
      prow[c] = acc * inv;
    }
    if (lane == 0) {
      a.stats[2 * row] = gmx;
      a.stats[2 * row + 1] = l;
    }
    layernorm_row(prow, a.C, a.eps, a.weight, a.bias, static_cast<T*>(a.out) + row * a.C);
  }
}

// ---- backward ----------------------------------------------------------------------------------

// LayerNorm backward per cluster row (one warp per group of kRowsPerGroup rows): dP, rowdot and
// the group's dweight/dbias partial sums (its own (C,) slices: no atomics).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_bwd_prep_kernel(const PoolBwdArgs a, float* dp, float* rowdot, float* dw_part,
                         float* db_part) {
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = a.B * a.M;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int64_t r_lo = group * kRowsPerGroup, r_hi = imin(rows, r_lo + kRowsPerGroup);
  if (r_lo >= rows) return;
  const T* go = static_cast<const T*>(a.grad_out);
  const float invC = 1.f / static_cast<float>(a.C);
  float* dwg = dw_part + group * a.C;
  float* dbg = db_part + group * a.C;
  for (int64_t row = r_lo; row < r_hi; ++row) {
    const int64_t b = row / a.M, m = row % a.M;
    const float* prow = a.pooled + b * a.sp[0] + m * a.sp[1];
    const T* grow = go + b * a.sg[0] + m * a.sg[1];
    // Overflow-free statistics (layer_norm_stats): xhat from the scaled row; the rstd of pooled
    // itself, for dP, is rstd_q * inv.
    const LnStats st = layer_norm_stats([&](int64_t c) { return prow[c * a.sp[2]]; }, a.C, a.eps);
    const float inv = st.inv, mean = st.mean, rstd_q = st.rstd, rstd = rstd_q * inv;
    float sg = 0.f, sgx = 0.f;
    for (int64_t c = lane; c < a.C; c += kWarp) {
      const float gout = to_float(grow[c * a.sg[2]]);
      const float xhat = (prow[c * a.sp[2]] * inv - mean) * rstd_q;
      const float gc = a.weight != nullptr ? gout * a.weight[c] : gout;
      sg += gc;
      sgx += gc * xhat;
      if (row == r_lo) {
        dwg[c] = gout * xhat;
        dbg[c] = gout;
      } else {
        dwg[c] += gout * xhat;
        dbg[c] += gout;
      }
    }
    const float mean_g = warp_sum(sg) * invC, mean_gx = warp_sum(sgx) * invC;
    float rd = 0.f;
    for (int64_t c = lane; c < a.C; c += kWarp) {
      const float p = prow[c * a.sp[2]];
      const float xhat = (p * inv - mean) * rstd_q;
      const float gout = to_float(grow[c * a.sg[2]]);
      const float gc = a.weight != nullptr ? gout * a.weight[c] : gout;
      const float d = rstd * (gc - mean_g - xhat * mean_gx);
      dp[row * a.C + c] = d;
      rd += d * p;
    }
    rd = warp_sum(rd);
    if (lane == 0) rowdot[row] = rd;
  }
}

// dweight[c], dbias[c] = sums of the group partials in group order, converted to P.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    pool_param_reduce_kernel(const float* dw_part, const float* db_part, int64_t groups,
                             int64_t C, P* dweight, P* dbias) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    float sw = 0.f, sb = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      sw += dw_part[g * C + c];
      sb += db_part[g * C + c];
    }
    dweight[c] = from_float<P>(sw);
    dbias[c] = from_float<P>(sb);
  }
}

// grid (N tiles, min(B, 65535)): BK patches of one batch element, all clusters in chunks of BM.
template <typename T, int BM, int BK>
__global__ void __launch_bounds__(kThreads, kMinCtas)
    pool_bwd_kernel(const PoolBwdArgs a, const float* dp, const float* rowdot) {
  unsigned char* smem = dynamic_smem();
  const BwdLayout L = BwdLayout::make(a.C, pad_unit<T>(), BM, BK);
  float* sX = reinterpret_cast<float*>(smem);
  float* sDX = reinterpret_cast<float*>(smem + L.off_dx);
  float* sDP = reinterpret_cast<float*>(smem + L.off_dp);
  float* sS = reinterpret_cast<float*>(smem + L.off_s);
  float* sDS = reinterpret_cast<float*>(smem + L.off_ds);
  float* sMax = reinterpret_cast<float*>(smem + L.off_max);
  float* sInv = reinterpret_cast<float*>(smem + L.off_inv);
  float* sRd = reinterpret_cast<float*>(smem + L.off_rd);

  const T* logits = static_cast<const T*>(a.logits);
  const T* x = static_cast<const T*>(a.x);
  T* dlogits = static_cast<T*>(a.dlogits);
  T* dx = static_cast<T*>(a.dx);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BK;

  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    load_tile<kThreads>(sX, L.ldx, x + b * a.sx[0], a.sx[1], a.sx[2], n0, a.N, a.C, BK, L.Cp, 0.f);
    for (int idx = threadIdx.x; idx < BK * L.Cp; idx += kThreads) {
      sDX[(idx / L.Cp) * L.ldx + idx % L.Cp] = 0.f;
    }
    for (int64_t m0 = 0; m0 < a.M; m0 += BM) {
      __syncthreads();  // the previous chunk is done with sDP / sS / sDS (and sX is visible)
      load_tile<kThreads>(sDP, L.ldx, dp + b * a.M * a.C, a.C, 1, m0, a.M, a.C, BM, L.Cp, 0.f);
      if (threadIdx.x < BM) {
        const int64_t m = m0 + threadIdx.x;
        float mx = 0.f, inv = 0.f;
        if (m < a.M) {
          const float* st = a.stats + b * a.sst[0] + m * a.sst[1];
          mx = st[0];
          inv = 1.f / st[a.sst[2]];
        }
        sMax[threadIdx.x] = mx;
        sInv[threadIdx.x] = inv;
        sRd[threadIdx.x] = m < a.M ? rowdot[b * a.M + m] : 0.f;
      }
      __syncthreads();
      // S = exp(logits - max) / sum, exactly 0 outside the real (m, n) range. An all -inf row
      // (max = -inf, sum = 0) gives NaN, like the reference.
      for (int idx = threadIdx.x; idx < BM * BK; idx += kThreads) {
        const int r = idx / BK, c = idx - r * BK;
        const int64_t m = m0 + r, n = n0 + c;
        float s = 0.f;
        if (m < a.M && n < a.N) {
          s = expf(to_float(logits[b * a.sl[0] + m * a.sl[1] + n * a.sl[2]]) - sMax[r]) * sInv[r];
        }
        sS[r * L.lds + c] = s;
      }
      // dS = dP.x^T (BM x BK), reduced over the channels.
      block_gemm<pool_mma<T>(), Lay::kRow, Lay::kCol, kThreads>(sDS, L.lds, sDP, L.ldx, sX, L.ldx,
                                                                BM, BK, L.Cp, false);
      __syncthreads();
      for (int idx = threadIdx.x; idx < BM * BK; idx += kThreads) {
        const int r = idx / BK, c = idx - r * BK;
        const int64_t m = m0 + r, n = n0 + c;
        if (m < a.M && n < a.N) {
          dlogits[(b * a.M + m) * a.N + n] =
              from_float<T>(sS[r * L.lds + c] * (sDS[r * L.lds + c] - sRd[r]));
        }
      }
      // dx += S^T.dP (BK x Cp), reduced over this chunk's clusters.
      block_gemm<pool_mma<T>(), Lay::kCol, Lay::kRow, kThreads>(sDX, L.ldx, sS, L.lds, sDP, L.ldx,
                                                                BK, L.Cp, BM, true);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BK * a.C; idx += kThreads) {
      const int r = idx / static_cast<int>(a.C), c = idx - r * static_cast<int>(a.C);
      const int64_t n = n0 + r;
      if (n < a.N) dx[(b * a.N + n) * a.C + c] = from_float<T>(sDX[r * L.ldx + c]);
    }
    __syncthreads();  // the next batch element reuses shared memory
  }
}

// ---- configuration choice ----------------------------------------------------------------------

template <typename T>
size_t fwd_smem(int config, int64_t C) {
  return FwdLayout::make(C, pad_unit<T>(), kFwdBM[config], kFwdBK[config]).total;
}
template <typename T>
size_t bwd_smem(int config, int64_t C) {
  return BwdLayout::make(C, pad_unit<T>(), kBwdBM[config], kBwdBK[config]).total;
}

// The largest configuration within kPreferredSmem (several CTAs per multiprocessor), else the
// largest that fits at all; -1 when none does.
template <typename SmemFn>
int choose_config(SmemFn smem_of, size_t max_smem) {
  for (int cfg = 0; cfg < 3; ++cfg) {
    if (smem_of(cfg) <= max_smem && smem_of(cfg) <= kPreferredSmem) return cfg;
  }
  for (int cfg = 0; cfg < 3; ++cfg) {
    if (smem_of(cfg) <= max_smem) return cfg;
  }
  return -1;
}

// ---- host side: plans and launch sequences over a runtime (CudaRuntime, or the tests' CPU emulation)

template <typename T>
bool make_fwd_plan(int64_t B, int64_t M, int64_t N, int64_t C, int num_sms, size_t max_smem,
                   int64_t force_splits, PoolFwdPlan* plan) {
  const int cfg = choose_config([&](int c) { return fwd_smem<T>(c, C); }, max_smem);
  if (cfg < 0) return false;
  const int64_t BM = kFwdBM[cfg], BK = kFwdBK[cfg];
  const int64_t n = imax(N, 1);
  const int64_t programs = imax(1, B * cdiv(M, BM));
  int64_t splits = force_splits;
  if (splits <= 0) {
    // Aim at ~2 waves of CTAs, keeping >= 4 tiles of N per split so that the merge stays cheap.
    splits = programs >= num_sms ? 1 : imin(cdiv(2 * static_cast<int64_t>(num_sms), programs),
                                            cdiv(n, 4 * BK));
  }
  splits = imax(1, imin(imin(splits, cdiv(n, BK)), kMaxGridYZ));
  const int64_t chunk = cdiv(cdiv(n, splits), BK) * BK;  // a whole number of tiles per split
  plan->config = cfg;
  plan->splits = cdiv(n, chunk);
  plan->chunk = chunk;
  plan->smem = fwd_smem<T>(cfg, C);
  return true;
}

inline int64_t fwd_workspace(const PoolFwdArgs& a, const PoolFwdPlan& plan) {
  return plan.splits <= 1 ? 0 : a.B * plan.splits * a.M * (2 + a.C);
}

template <typename T, int CFG, typename Runtime>
cudaError_t fwd_run_config(const PoolFwdArgs& a, const PoolFwdPlan& plan, float* ws,
                           const Runtime& rt) {
  constexpr int BM = kFwdBM[CFG], BK = kFwdBK[CFG];
  const dim3 grid(static_cast<unsigned>(cdiv(a.M, BM)), static_cast<unsigned>(imin(a.B, kMaxGridYZ)),
                  static_cast<unsigned>(plan.splits));
  if (plan.splits == 1) {
    return rt.launch(pool_fwd_kernel<T, BM, BK, false>, grid, dim3(kThreads), plan.smem, a,
                     plan.chunk, static_cast<float*>(nullptr), static_cast<float*>(nullptr),
                     static_cast<float*>(nullptr));
  }
  float* part_m = ws;  // (B, S, M)
  float* part_l = ws + a.B * plan.splits * a.M;  // (B, S, M)
  float* part_acc = ws + 2 * a.B * plan.splits * a.M;  // (B, S, M, C)
  cudaError_t err = rt.launch(pool_fwd_kernel<T, BM, BK, true>, grid, dim3(kThreads), plan.smem, a,
                              plan.chunk, part_m, part_l, part_acc);
  if (err != cudaSuccess) return err;
  const int64_t blocks = imax(1, imin(cdiv(a.B * a.M, kWarps), 65535));
  return rt.launch(pool_merge_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), size_t{0},
                   a, plan.splits, static_cast<const float*>(part_m),
                   static_cast<const float*>(part_l), static_cast<const float*>(part_acc));
}

// workspace: fwd_workspace(args, plan) floats.
template <typename T, typename Runtime>
cudaError_t pool_fwd_run(const PoolFwdArgs& a, const PoolFwdPlan& plan, float* ws,
                         const Runtime& rt) {
  if (a.B * a.M == 0 || a.N == 0 || a.C == 0) return cudaSuccess;
  switch (plan.config) {
    case 0:
      return fwd_run_config<T, 0>(a, plan, ws, rt);
    case 1:
      return fwd_run_config<T, 1>(a, plan, ws, rt);
    case 2:
      return fwd_run_config<T, 2>(a, plan, ws, rt);
  }
  return cudaErrorInvalidConfiguration;
}

inline int64_t bwd_workspace(const PoolBwdArgs& a) {
  const int64_t rows = a.B * a.M;
  return rows * a.C + rows + 2 * cdiv(rows, kRowsPerGroup) * a.C;
}

template <typename T, int CFG, typename Runtime>
cudaError_t bwd_run_config(const PoolBwdArgs& a, const float* dp, const float* rowdot,
                           const Runtime& rt) {
  constexpr int BM = kBwdBM[CFG], BK = kBwdBK[CFG];
  const dim3 grid(static_cast<unsigned>(cdiv(a.N, BK)), static_cast<unsigned>(imin(a.B, kMaxGridYZ)));
  return rt.launch(pool_bwd_kernel<T, BM, BK>, grid, dim3(kThreads), bwd_smem<T>(CFG, a.C), a, dp,
                   rowdot);
}

// workspace: bwd_workspace(args) floats: dP (B, M, C), rowdot (B, M), dweight and dbias partials.
template <typename T, typename Runtime>
cudaError_t pool_bwd_run(const PoolBwdArgs& a, float* workspace, size_t max_smem, const Runtime& rt) {
  const int64_t rows = a.B * a.M;
  if (rows == 0 || a.C == 0) return cudaSuccess;  // the glue zero-fills dx, dweight, dbias
  const int cfg = choose_config([&](int c) { return bwd_smem<T>(c, a.C); }, max_smem);
  if (cfg < 0) return cudaErrorInvalidConfiguration;  // the glue checks this first
  const int64_t groups = cdiv(rows, kRowsPerGroup);
  float* dp = workspace;
  float* rowdot = dp + rows * a.C;
  float* dw_part = rowdot + rows;
  float* db_part = dw_part + groups * a.C;
  cudaError_t err = rt.launch(pool_bwd_prep_kernel<T>, dim3(static_cast<unsigned>(cdiv(groups, kWarps))),
                              dim3(kThreads), size_t{0}, a, dp, rowdot, dw_part, db_part);
  if (err != cudaSuccess) return err;
  const dim3 pblocks(static_cast<unsigned>(cdiv(a.C, kThreads)));
  const float* dwc = dw_part;
  const float* dbc = db_part;
  if (a.param_fp32) {
    err = rt.launch(pool_param_reduce_kernel<float>, pblocks, dim3(kThreads), size_t{0}, dwc, dbc,
                    groups, a.C, static_cast<float*>(a.dweight), static_cast<float*>(a.dbias));
  } else {
    err = rt.launch(pool_param_reduce_kernel<T>, pblocks, dim3(kThreads), size_t{0}, dwc, dbc, groups,
                    a.C, static_cast<T*>(a.dweight), static_cast<T*>(a.dbias));
  }
  if (err != cudaSuccess || a.N == 0) return err;
  const float* dpc = dp;
  const float* rdc = rowdot;
  switch (cfg) {
    case 0:
      return bwd_run_config<T, 0>(a, dpc, rdc, rt);
    case 1:
      return bwd_run_config<T, 1>(a, dpc, rdc, rt);
    case 2:
      return bwd_run_config<T, 2>(a, dpc, rdc, rt);
  }
  return cudaErrorInvalidConfiguration;
}

}  // namespace
}  // namespace paca_kernels::cuda::pool
