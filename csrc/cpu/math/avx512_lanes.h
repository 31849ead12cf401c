// 16-lane helpers shared by the AVX-512 translation units (kernels_avx512.cpp,
// kernels_avx512bf16.cpp, kernels_amx.cpp): the lane mask and the exact (erf) GELU.
//
// ODR rule (dispatch.h): this header holds intrinsics and internal-linkage functions only (an
// unnamed namespace, so every TU that includes it has its own copies, never merged with another
// TU's), includes nothing but <immintrin.h>, <cstdint> and constexpr data, and is empty unless the
// TU is compiled with -mavx512f. Baseline TUs must not include it.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/math/gelu_coefficients.h"

#if defined(__AVX512F__)
namespace paca_kernels::cpu {
namespace {

// Lanes l < n of a 16-lane mask (0 <= n <= 16).
inline __mmask16 lanes_mask16(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// gelu_avx2 (kernels_avx2.cpp) on 16 lanes: the same operations, so the same bits lane by lane.
inline __attribute__((always_inline)) __m512 gelu_avx512(__m512 v) {
  __m512 x = _mm512_mul_ps(v, _mm512_set1_ps(kGeluScale));
  x = _mm512_min_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_set1_ps(-1.0f), x));
  const __m512 s = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(kGeluP[6]);
  __m512 q = _mm512_set1_ps(kGeluQ[5]);
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(kGeluP[5]));
  q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(kGeluQ[4]));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(kGeluP[4]));
  q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(kGeluQ[3]));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(kGeluP[3]));
  q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(kGeluQ[2]));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(kGeluP[2]));
  q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(kGeluQ[1]));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(kGeluP[1]));
  q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(kGeluQ[0]));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(kGeluP[0]));
  const __m512 erf_u = _mm512_div_ps(_mm512_mul_ps(x, p), q);
  const __m512 hv = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(hv, erf_u, hv);
}

}  // namespace
}  // namespace paca_kernels::cpu
#endif  // __AVX512F__
