// LayerNorm statistics of one row that neither overflow nor underflow, for the cluster_pool
// kernels (cluster_pool.cpp: the forward's epilogue and the backward's LayerNorm part; the fused
// layer, fused/conv_paca_layer.cpp, reaches them through cluster_pool_fwd_cpu). Baseline
// translation units only (ODR rule in dispatch.h).
//
// Why: squaring a pooled row of magnitude 1e20 overflows float32 (var = inf, rstd = 0, and the
// LayerNorm returned exactly the bias: finite and wrong), and a row of 1e-20 squares to nothing.
// The row is divided by a power of two near its largest magnitude first, so the squares stay in
// range; LayerNorm is invariant under that (with eps scaled alike):
//     q = p / scale,  xhat = (q - mean_q) / sqrt(var_q + eps / scale^2) = (p - mean_p) / sqrt(var_p + eps)
// and dividing by a power of two is exact, so ordinary rows give the same bits as unscaled code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace paca_kernels::cpu {

// The lowest exponent s of the scale 2^s below (layer_norm_scale) for eps: so that eps / scale^2
// stays finite (scale >= sqrt(eps) * 2^-41 or so: for rows far below sqrt(eps), eps dominates
// their variance anyway) and 1 / scale is a normal number. The dispatched float32 LayerNorm
// kernels (dispatch.h, layer_norm_rows) clamp their scale's exponent to it too.
template <typename T>
inline int layer_norm_min_exp(T eps) {
  using L = std::numeric_limits<T>;
  int lo = L::min_exponent + 30;
  if (eps > T(0)) {
    int k = 0;
    std::frexp(std::sqrt(eps), &k);
    lo = std::max(lo, k - 41);
  }
  return lo;
}

// The power of two dividing a row whose largest magnitude is amax: about amax (q in [-2, 2]),
// its exponent clamped to [layer_norm_min_exp(eps), max_exponent - 28]. A zero, infinite or NaN
// row keeps scale 1 (an inf or NaN then gives NaN, as torch's layer_norm does).
template <typename T>
inline T layer_norm_scale(T amax, T eps) {
  using L = std::numeric_limits<T>;
  if (!(amax > T(0)) || !(amax <= L::max())) return T(1);
  int e = 0;
  std::frexp(amax, &e);  // amax in [2^(e-1), 2^e)
  return std::ldexp(T(1), std::clamp(e - 1, layer_norm_min_exp(eps), L::max_exponent - 28));
}

template <typename T>
struct LayerNormStats {
  T inv_scale;  // 1 / scale (a power of two)
  T mean;       // mean of q = p * inv_scale
  T rstd;       // 1 / sqrt(var(q) + eps * inv_scale^2); xhat = (p * inv_scale - mean) * rstd,
                // and the rstd of p itself is rstd * inv_scale
};

// sum_i a[i] (b == nullptr) or sum_i a[i] * b[i], in eight interleaved partials combined as
// layer_norm_stats combines its own: a single running sum is a serial chain of dependent adds (the
// backward's LayerNorm part, three such sums per row, was a tenth of cluster_pool's backward at
// C = 192), the partials vectorise, and the fixed order keeps the result reproducible.
template <typename T>
inline T sum_interleaved(const T* a, const T* b, int64_t n) {
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  if (b == nullptr) {
    for (; i + 8 <= n; i += 8) {
      for (int j = 0; j < 8; ++j) part[j] += a[i + j];
    }
    for (; i < n; ++i) part[0] += a[i];
  } else {
    for (; i + 8 <= n; i += 8) {
      for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
    }
    for (; i < n; ++i) part[0] += a[i] * b[i];
  }
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

// Statistics of the row p (n > 0 values, biased variance, two passes). The sums run in eight
// interleaved partials: the compiler vectorises them (a single running sum is a serial chain of
// dependent adds, which made the LayerNorm epilogue a fifth of the forward), and the fixed order
// keeps results reproducible.
template <typename T>
inline LayerNormStats<T> layer_norm_stats(const T* p, int64_t n, T eps) {
  // The largest magnitude, NaN skipped (it poisons the sums), in eight interleaved partial maxima
  // (one running maximum was a serial chain: a fifth of cluster_pool_fwd at C = 320, B = 8, bf16;
  // the maximum is exact, so the partials give the same value).
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] = std::max(part[j], std::abs(p[i + j]));
  }
  for (; i < n; ++i) part[0] = std::max(part[0], std::abs(p[i]));
  T amax = part[0];
  for (int j = 1; j < 8; ++j) amax = std::max(amax, part[j]);
  const T inv = T(1) / layer_norm_scale(amax, eps);
  std::fill(part, part + 8, T(0));
  i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] += p[i + j] * inv;
  }
  for (; i < n; ++i) part[0] += p[i] * inv;
  const T mean =
      (((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]))) /
      static_cast<T>(n);
  std::fill(part, part + 8, T(0));
  i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const T d = p[i + j] * inv - mean;
      part[j] += d * d;
    }
  }
  for (; i < n; ++i) part[0] += (p[i] * inv - mean) * (p[i] * inv - mean);
  const T var =
      (((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]))) /
      static_cast<T>(n);
  // eps / scale^2 underflows for huge rows: floored at the smallest normal number, which only
  // matters for an exactly constant row (var = 0, every deviation 0), where it keeps 0 * rstd = 0.
  const T eps_q = std::max(eps * inv * inv, std::numeric_limits<T>::min());
  return {inv, mean, T(1) / std::sqrt(var + eps_q)};
}

// y[r, :] = LayerNorm(x[r, :]) * w + b for rows r < rows of n values (w, b optional): the portable
// form of the dispatched layer_norm_rows (dispatch.h), for float64 and the baseline build.
template <typename T>
inline void layer_norm_rows_impl(const T* x, int64_t ldx, T* y, int64_t ldy, int64_t rows,
                                 int64_t n, const T* w, const T* b, T eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    T* yr = y + r * ldy;
    const LayerNormStats<T> st = layer_norm_stats(xr, n, eps);
    for (int64_t c = 0; c < n; ++c) {
      T v = (xr[c] * st.inv_scale - st.mean) * st.rstd;
      if (w != nullptr) v *= w[c];
      if (b != nullptr) v += b[c];
      yr[c] = v;
    }
  }
}

}  // namespace paca_kernels::cpu
