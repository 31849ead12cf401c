// GELU (exact, erf form), portable: float32 on 8-lane GCC vector types (the baseline build's
// kernel, kernels_baseline.cpp) and float64 (gelu_inplace). The coefficients and their error
// analysis: gelu_coefficients.h. Baseline translation units only (ODR rule in dispatch.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/math/gelu_coefficients.h"
#include "cpu/math/portable.h"

namespace paca_kernels::cpu {

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// erf(v / sqrt 2) by the rational approximation (gelu_coefficients.h: at most 3.2e-7 from erf), on
// GCC vectors of any width V: GELU below, and GELU's derivative in the MLP backward
// (mlp_dwconv_bwd.cpp, also 16 lanes wide in its AVX-512 clone).
template <typename V>
PACA_ALWAYS_INLINE V erf_scaled_vec(V v) {
  const V one = V{} + 1.0f, neg_one = V{} - 1.0f;
  V x = v * kGeluScale;
  x = x < neg_one ? neg_one : x;  // a NaN compares false and stays
  x = x > one ? one : x;
  const V s = x * x;
  V p = V{} + kGeluP[6];
  for (int i = 5; i >= 0; --i) p = p * s + kGeluP[i];
  V q = V{} + kGeluQ[5];
  for (int i = 4; i >= 0; --i) q = q * s + kGeluQ[i];
  const V e = x * p / q;
  return s >= one ? x : e;  // saturated: erf = +-1 exactly, whatever the rounding above
}

PACA_ALWAYS_INLINE v8f gelu_v8(v8f v) {
  const v8f e = erf_scaled_vec(v);
  const v8f hv = 0.5f * v;
  return hv * e + hv;
}

PACA_ALWAYS_INLINE void gelu_impl(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v;
    std::memcpy(&v, x + i, sizeof(v));
    v = gelu_v8(v);
    std::memcpy(x + i, &v, sizeof(v));
  }
  if (i < n) {
    v8f v = v8f{};
    for (int64_t j = 0; j < n - i; ++j) v[j] = x[i + j];
    v = gelu_v8(v);
    for (int64_t j = 0; j < n - i; ++j) x[i + j] = v[j];
  }
}
#pragma GCC diagnostic pop
#else
PACA_ALWAYS_INLINE void gelu_impl(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678f));
}
#endif

inline void gelu_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5 * x[i] * (1.0 + std::erf(x[i] * 0.70710678118654752440));
}

}  // namespace paca_kernels::cpu
