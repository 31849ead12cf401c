// The AVX2+FMA float32 kernels (see dispatch.h): matrix products (register-blocked tiles, packed
// panels), exp, row max, GELU, transpose and the depthwise convolution. This is the only
// translation unit compiled with -mavx2 -mfma (CMakeLists.txt); it follows the ODR rule of
// dispatch.h: nothing but intrinsics, C types and data headers included, everything in an unnamed
// namespace inside paca_kernels::cpu::avx2, register_kernels() the only external symbol.
#include <immintrin.h>

#include <cstdint>

#include "cpu/math/dispatch.h"
#include "cpu/math/gelu_coefficients.h"

namespace paca_kernels::cpu::avx2 {

#if defined(__AVX2__) && defined(__FMA__)
namespace {

#define PACA_ALWAYS_INLINE inline __attribute__((always_inline))

// Local helpers instead of std::min / std::max: no template of a shared header is instantiated
// here (see the ODR rule in dispatch.h).
constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// The eight lanes of a partial-sum vector added in the fixed order every row sum of this file (and
// of the AVX-512 file, which keeps these eight lanes) uses.
inline float lane_sum8(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}

// The same Cephes exp as exp_v8, with FMAs (the compiler does not contract a*b+c here).
inline __m256 exp_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365f), hi = _mm256_set1_ps(88.3762f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 kf = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y =
      _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i k = _mm256_cvtps_epi32(kf);
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23);
  const __m256 pow2k = _mm256_castsi256_ps(bits);  // 2^k
  __m256 z = _mm256_mul_ps(y, pow2k);
  z = _mm256_blendv_ps(z, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));  // underflow
  return _mm256_blendv_ps(z, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));             // NaN stays NaN
}

// The softmax rows run R rows at a time (as in kernels_avx512.cpp): one row alone is a chain of
// dependent vector operations per pass; R rows are R independent chains, each row taking its
// values in the one-row order (the same bits).

// out[r, i] = exp(in[r, i] - shift[r]) for R rows, sum[r] their sum (element i in lane i mod 8,
// one vector at a time in order, the tail's lanes past n zero).
template <int R>
inline __attribute__((always_inline)) void exp_shifted_block_avx2(const float* in, int64_t ldi,
                                                                  const float* shift, float* out,
                                                                  int64_t ldo, int64_t n,
                                                                  float* sum) {
  __m256 sh[R], acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    sh[r] = _mm256_set1_ps(shift[r]);
    acc[r] = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(in + r * ldi + i), sh[r]));
      acc[r] = _mm256_add_ps(acc[r], e);
      _mm256_storeu_ps(out + r * ldo + i, e);
    }
  }
  if (i < n) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(in + r * ldi + i, mask), sh[r]));
      _mm256_maskstore_ps(out + r * ldo + i, mask, e);
      acc[r] = _mm256_add_ps(acc[r], _mm256_and_ps(e, _mm256_castsi256_ps(mask)));  // valid lanes
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) sum[r] = lane_sum8(acc[r]);
}

float exp_shifted_f32_avx2(const float* in, float shift, float* out, int64_t n) {
  float sum;
  exp_shifted_block_avx2<1>(in, 0, &shift, out, 0, n, &sum);
  return sum;
}

// layer_norm_rows (dispatch.h) on 8 lanes: per row the largest magnitude (NaN skipped), the
// power-of-two scale from its exponent bits (layer_norm_scale's value, without frexp), then the
// sums of the scaled row and of its squared deviations (element i in lane i mod 8, the lanes
// added as lane_sum8), and y = ((x * inv - mean) * rstd) * w + b with explicit FMAs.
//
// R rows at a time (ln_rows_block): each pass of one row is a chain of dependent maxima or FMAs
// (12 steps of 4 cycles at C = 96), so a row alone waits on latency; R independent rows advance
// together, each with its own chain in the same order, so every row gets the bits it gets alone.
template <int R>
inline void ln_rows_block(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n,
                          const float* w, const float* b, float eps, int min_exp) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const int64_t tail = n % 8, body = n - tail;
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(tail)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 maskf = _mm256_castsi256_ps(mask);
  const float inv_n = 1.0f / static_cast<float>(n);
  // Largest magnitudes: max_ps(v, m) returns m when v is NaN (masked-off lanes load 0).
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < body; i += 8) {
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + r * ldx + i), abs_mask), acc[r]);
    }
  }
  if (tail) {
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_max_ps(
          _mm256_and_ps(_mm256_maskload_ps(x + r * ldx + body, mask), abs_mask), acc[r]);
    }
  }
  __m256 iv[R], mv[R];
  float inv[R];
  for (int r = 0; r < R; ++r) {
    alignas(32) float l[8];
    _mm256_store_ps(l, acc[r]);
    float amax = l[0];
    for (int j = 1; j < 8; ++j) amax = l[j] > amax ? l[j] : amax;
    inv[r] = 1.0f;
    if (amax > 0.0f && amax <= 3.40282347e+38f) {  // else (0, inf): scale 1, as layer_norm_scale
      uint32_t bits;
      __builtin_memcpy(&bits, &amax, 4);
      int e = static_cast<int>((bits >> 23) & 0xffu) - 127;  // amax in [2^e, 2^(e+1))
      e = e < min_exp ? min_exp : (e > 100 ? 100 : e);
      const uint32_t ib = static_cast<uint32_t>(127 - e) << 23;  // 2^-e, a normal number
      __builtin_memcpy(&inv[r], &ib, 4);
    }
    iv[r] = _mm256_set1_ps(inv[r]);
    acc[r] = _mm256_setzero_ps();
  }
  for (int64_t i = 0; i < body; i += 8) {
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + i), iv[r], acc[r]);
  }
  if (tail) {
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_maskload_ps(x + r * ldx + body, mask), iv[r], acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    mv[r] = _mm256_set1_ps(lane_sum8(acc[r]) * inv_n);
    acc[r] = _mm256_setzero_ps();
  }
  for (int64_t i = 0; i < body; i += 8) {
    for (int r = 0; r < R; ++r) {
      const __m256 d = _mm256_fmsub_ps(_mm256_loadu_ps(x + r * ldx + i), iv[r], mv[r]);
      acc[r] = _mm256_fmadd_ps(d, d, acc[r]);
    }
  }
  if (tail) {
    for (int r = 0; r < R; ++r) {
      const __m256 d = _mm256_and_ps(
          _mm256_fmsub_ps(_mm256_maskload_ps(x + r * ldx + body, mask), iv[r], mv[r]), maskf);
      acc[r] = _mm256_fmadd_ps(d, d, acc[r]);
    }
  }
  __m256 rv[R];
  for (int r = 0; r < R; ++r) {
    const float var = lane_sum8(acc[r]) * inv_n;
    float eps_q = eps * inv[r] * inv[r];
    eps_q = eps_q > 1.17549435e-38f ? eps_q : 1.17549435e-38f;  // FLT_MIN, as layer_norm_stats
    rv[r] = _mm256_set1_ps(1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(var + eps_q))));
  }
  // Every row's statistics are in registers before any row is written (y may be x).
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const bool last = i == body;
    const __m256 wv = w == nullptr ? one : last ? _mm256_maskload_ps(w + i, mask) : _mm256_loadu_ps(w + i);
    const __m256 bv = b == nullptr ? zero : last ? _mm256_maskload_ps(b + i, mask) : _mm256_loadu_ps(b + i);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx;
      const __m256 xv = last ? _mm256_maskload_ps(xr + i, mask) : _mm256_loadu_ps(xr + i);
      const __m256 v = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_fmsub_ps(xv, iv[r], mv[r]), rv[r]), wv, bv);
      if (last) {
        _mm256_maskstore_ps(y + r * ldy + i, mask, v);
      } else {
        _mm256_storeu_ps(y + r * ldy + i, v);
      }
    }
  }
}

void layer_norm_rows_f32_avx2(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows,
                              int64_t n, const float* w, const float* b, float eps, int min_exp) {
  constexpr int kR = 4;
  int64_t r = 0;
  for (; r + kR <= rows; r += kR) {
    ln_rows_block<kR>(x + r * ldx, ldx, y + r * ldy, ldy, n, w, b, eps, min_exp);
  }
  for (; r < rows; ++r) ln_rows_block<1>(x + r * ldx, ldx, y + r * ldy, ldy, n, w, b, eps, min_exp);
}

// exp_shifted_cols (dispatch.h): out[r, i] = exp(in[r, i] - shift[i]) * scale[i], 8 lanes at a
// time (each lane the exp of exp_shifted_f32_avx2, then the product: the same bits).
// With ds: grad = out * (ds - rd) from the registers (a sub and a mul: the bits of the portable
// loop).
template <bool kGrad>
inline void exp_shifted_cols_avx2(const float* in, int64_t ldi, int64_t rows, int64_t n,
                                  const float* shift, const float* scale, float* out, int64_t ldo,
                                  const float* ds, int64_t ldd, const float* rd, float* grad,
                                  int64_t ldg) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = in + r * ldi;
    float* o = out + r * ldo;
    const float* d = kGrad ? ds + r * ldd : nullptr;
    float* g = kGrad ? grad + r * ldg : nullptr;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(shift + i)));
      const __m256 s = _mm256_mul_ps(e, _mm256_loadu_ps(scale + i));
      _mm256_storeu_ps(o + i, s);
      if (kGrad) {
        _mm256_storeu_ps(
            g + i, _mm256_mul_ps(s, _mm256_sub_ps(_mm256_loadu_ps(d + i), _mm256_loadu_ps(rd + i))));
      }
    }
    if (i < n) {
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)), lane);
      const __m256 e = exp_avx2(
          _mm256_sub_ps(_mm256_maskload_ps(a + i, mask), _mm256_maskload_ps(shift + i, mask)));
      const __m256 s = _mm256_mul_ps(e, _mm256_maskload_ps(scale + i, mask));
      _mm256_maskstore_ps(o + i, mask, s);
      if (kGrad) {
        _mm256_maskstore_ps(g + i, mask,
                            _mm256_mul_ps(s, _mm256_sub_ps(_mm256_maskload_ps(d + i, mask),
                                                           _mm256_maskload_ps(rd + i, mask))));
      }
    }
  }
}
void exp_shifted_cols_f32_avx2(const float* in, int64_t ldi, int64_t rows, int64_t n,
                               const float* shift, const float* scale, float* out, int64_t ldo,
                               const float* ds, int64_t ldd, const float* rd, float* grad,
                               int64_t ldg) {
  if (ds != nullptr) {
    exp_shifted_cols_avx2<true>(in, ldi, rows, n, shift, scale, out, ldo, ds, ldd, rd, grad, ldg);
  } else {
    exp_shifted_cols_avx2<false>(in, ldi, rows, n, shift, scale, out, ldo, ds, ldd, rd, grad, ldg);
  }
}

// Row maxima of R rows (row r at x + r * ld). max_ps(v, m) returns m when v is NaN: NaN entries
// are skipped, as in row_max_impl.
template <int R>
inline __attribute__((always_inline)) void row_max_block_avx2(const float* x, int64_t ld,
                                                              int64_t n, float* mx) {
  const __m256 neg_inf = _mm256_set1_ps(-__builtin_inff());
  __m256 m[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) m[r] = neg_inf;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) m[r] = _mm256_max_ps(_mm256_loadu_ps(x + r * ld + i), m[r]);
  }
  if (i < n) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 v = _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(x + r * ld + i, mask),
                                        _mm256_castsi256_ps(mask));
      m[r] = _mm256_max_ps(v, m[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m[r]);
    float v = lanes[0];
    for (int j = 1; j < 8; ++j) v = lanes[j] > v ? lanes[j] : v;
    mx[r] = v;
  }
}

float row_max_f32_avx2(const float* x, int64_t n) {
  float mx;
  row_max_block_avx2<1>(x, 0, n, &mx);
  return mx;
}

// exp_minus_row_max_rows (dispatch.h): four rows at a time.
void exp_minus_row_max_rows_f32_avx2(float* s, int64_t lds, int64_t rows, int64_t n, float* mx,
                                     float* sum) {
  constexpr int kR = 4;
  int64_t r = 0;
  for (; r + kR <= rows; r += kR) {
    float* sr = s + r * lds;
    row_max_block_avx2<kR>(sr, lds, n, mx + r);
    exp_shifted_block_avx2<kR>(sr, lds, mx + r, sr, lds, n, sum + r);
  }
  for (; r < rows; ++r) {
    float* sr = s + r * lds;
    row_max_block_avx2<1>(sr, lds, n, mx + r);
    exp_shifted_block_avx2<1>(sr, lds, mx + r, sr, lds, n, sum + r);
  }
}

// The softmax backward rows' last pass: P = e * inv[r] into p (p may be e) and
// dS = P o (dP - d[r]) over dP in ds, for R rows (8 lanes, masked at the row's end).
template <int R>
inline __attribute__((always_inline)) void softmax_bwd_last_pass_avx2(
    const float* e, int64_t lde, const float* inv, const float* d, float* p, int64_t ldp, float* ds,
    int64_t ldd, int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 iv[R], dv0[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    iv[r] = _mm256_set1_ps(inv[r]);
    dv0[r] = _mm256_set1_ps(d[r]);
  }
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(imin(n - i, 8))), lane);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* dr = ds + r * ldd + i;
      const __m256 pv = _mm256_mul_ps(_mm256_maskload_ps(e + r * lde + i, mask), iv[r]);
      _mm256_maskstore_ps(p + r * ldp + i, mask, pv);
      const __m256 dv = _mm256_maskload_ps(dr, mask);
      _mm256_maskstore_ps(dr, mask, _mm256_mul_ps(pv, _mm256_sub_ps(dv, dv0[r])));
    }
  }
}

// softmax_bwd_row_impl with 8-lane vectors, R rows at a time: e = exp(s - max), its sum and
// sum(e o dP) in one pass (element i in lane i mod 8, one vector at a time in order, the tail's
// lanes past n zero, the lanes combined as in exp_shifted), then P = e / sum and
// dS = P o (dP - D), D = sum(e o dP) / sum.
template <int R>
inline __attribute__((always_inline)) void softmax_bwd_block_avx2(float* p, int64_t ldp, float* ds,
                                                                  int64_t ldd, int64_t n) {
  float mx[R];
  row_max_block_avx2<R>(p, ldp, n, mx);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 sh[R], acc[R], accd[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    sh[r] = _mm256_set1_ps(mx[r]);
    acc[r] = _mm256_setzero_ps();
    accd[r] = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* pr = p + r * ldp + i;
      const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(pr), sh[r]));
      _mm256_storeu_ps(pr, e);
      acc[r] = _mm256_add_ps(acc[r], e);
      accd[r] = _mm256_fmadd_ps(e, _mm256_loadu_ps(ds + r * ldd + i), accd[r]);
    }
  }
  if (i < n) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)), lane);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* pr = p + r * ldp + i;
      const __m256 e = _mm256_and_ps(exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(pr, mask), sh[r])),
                                     _mm256_castsi256_ps(mask));  // valid lanes only
      _mm256_maskstore_ps(pr, mask, e);
      acc[r] = _mm256_add_ps(acc[r], e);
      accd[r] = _mm256_fmadd_ps(e, _mm256_maskload_ps(ds + r * ldd + i, mask), accd[r]);
    }
  }
  float inv[R], d[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    inv[r] = 1.0f / lane_sum8(acc[r]);
    d[r] = lane_sum8(accd[r]) * inv[r];
  }
  softmax_bwd_last_pass_avx2<R>(p, ldp, inv, d, p, ldp, ds, ldd, n);
}

// softmax_bwd_block_avx2 from the forward's numerators e and their sums (softmax_bwd_saved_rows,
// dispatch.h): the same sums of e o dP and the same last pass, so the same bits.
template <int R>
inline __attribute__((always_inline)) void softmax_bwd_saved_block_avx2(
    const float* e, int64_t lde, const float* sum, float* p, int64_t ldp, float* ds, int64_t ldd,
    int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 accd[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) accd[r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      accd[r] = _mm256_fmadd_ps(_mm256_loadu_ps(e + r * lde + i), _mm256_loadu_ps(ds + r * ldd + i),
                                accd[r]);
    }
  }
  if (i < n) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)), lane);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      accd[r] = _mm256_fmadd_ps(_mm256_maskload_ps(e + r * lde + i, mask),
                                _mm256_maskload_ps(ds + r * ldd + i, mask), accd[r]);
    }
  }
  float inv[R], d[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    inv[r] = 1.0f / sum[r];
    d[r] = lane_sum8(accd[r]) * inv[r];
  }
  softmax_bwd_last_pass_avx2<R>(e, lde, inv, d, p, ldp, ds, ldd, n);
}

void softmax_bwd_saved_rows_f32_avx2(const float* e, int64_t lde, const float* sum, float* p,
                                     int64_t ldp, float* ds, int64_t ldd, int64_t rows,
                                     int64_t n) {
  constexpr int kR = 4;
  int64_t r = 0;
  for (; r + kR <= rows; r += kR) {
    softmax_bwd_saved_block_avx2<kR>(e + r * lde, lde, sum + r, p + r * ldp, ldp, ds + r * ldd,
                                     ldd, n);
  }
  for (; r < rows; ++r) {
    softmax_bwd_saved_block_avx2<1>(e + r * lde, lde, sum + r, p + r * ldp, ldp, ds + r * ldd,
                                    ldd, n);
  }
}

// softmax_bwd_rows (dispatch.h): two rows at a time (16 ymm registers: three per row in flight,
// plus the exp's temporaries).
void softmax_bwd_rows_f32_avx2(float* p, int64_t ldp, float* ds, int64_t ldd, int64_t rows,
                               int64_t n) {
  constexpr int kR = 2;
  int64_t r = 0;
  for (; r + kR <= rows; r += kR) softmax_bwd_block_avx2<kR>(p + r * ldp, ldp, ds + r * ldd, ldd, n);
  for (; r < rows; ++r) softmax_bwd_block_avx2<1>(p + r * ldp, ldp, ds + r * ldd, ldd, n);
}

// GELU with FMAs: the rational erf of gelu_v8 (see there), P and Q evaluated side by side.
PACA_ALWAYS_INLINE __m256 gelu_avx2(__m256 v) {
  // max(c, x) and min(c, x) return x when x is NaN, so a NaN flows through to the result.
  __m256 x = _mm256_mul_ps(v, _mm256_set1_ps(kGeluScale));
  x = _mm256_min_ps(_mm256_set1_ps(1.0f), _mm256_max_ps(_mm256_set1_ps(-1.0f), x));
  const __m256 s = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(kGeluP[6]);
  __m256 q = _mm256_set1_ps(kGeluQ[5]);
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(kGeluP[5]));
  q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(kGeluQ[4]));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(kGeluP[4]));
  q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(kGeluQ[3]));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(kGeluP[3]));
  q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(kGeluQ[2]));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(kGeluP[2]));
  q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(kGeluQ[1]));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(kGeluP[1]));
  q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(kGeluQ[0]));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(kGeluP[0]));
  // x = +-1 (saturated) gives exactly +-1 here: P6 is tuned for it (tests check gelu(v) = v and 0
  // exactly in the tails).
  const __m256 erf_u = _mm256_div_ps(_mm256_mul_ps(x, p), q);
  const __m256 hv = _mm256_mul_ps(v, _mm256_set1_ps(0.5f));
  return _mm256_fmadd_ps(hv, erf_u, hv);
}

void gelu_f32_avx2(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu_avx2(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(x + i, mask, gelu_avx2(_mm256_maskload_ps(x + i, mask)));
  }
}

// Register-blocked tile: C[R x (8*NV)] (+)= sum_{t < T} A(i, t) * B[t, cols], with A(i, t) at
// A[i * a_row + t * a_red] (so one kernel serves A.B and A^T.B). The R*NV accumulators stay in
// registers for the whole reduction; each step loads NV vectors of B and broadcasts R values of A
// (compute-bound rather than load/store-bound like an axpy loop). `mask` limits the last vector
// to the valid columns of a ragged edge; kMaskB = false reads B's last vector whole anyway (a
// zero-padded packed panel: the extra lanes only reach accumulator lanes that are never stored,
// and an unmasked load costs less than vmaskmovps).
//
// init (the tile's 8*NV columns of a bias row, or nullptr for zeros) starts the sums when not
// accumulating; gelu applies GELU to the sums as they are stored (the same bits as storing them and
// running gelu_inplace after).
template <int R, int NV, bool kMasked, bool kMaskB = kMasked>
inline void tile_avx2(const float* A, int64_t a_row, int64_t a_red,
                                       const float* B, int64_t ldb, float* C, int64_t ldc,
                                       int64_t T, bool accumulate, __m256i mask,
                                       const float* init = nullptr, bool gelu = false) {
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      if (!accumulate) {
        acc[i][v] = init == nullptr ? _mm256_setzero_ps()
                    : (kMasked && v == NV - 1) ? _mm256_maskload_ps(init + 8 * v, mask)
                                               : _mm256_loadu_ps(init + 8 * v);
      } else if (kMasked && v == NV - 1) {
        acc[i][v] = _mm256_maskload_ps(C + i * ldc + 8 * v, mask);
      } else {
        acc[i][v] = _mm256_loadu_ps(C + i * ldc + 8 * v);
      }
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* b = B + t * ldb;
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      bv[v] = (kMaskB && v == NV - 1) ? _mm256_maskload_ps(b + 8 * v, mask)
                                        : _mm256_loadu_ps(b + 8 * v);
    }
    const float* a = A + t * a_red;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * a_row);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  // The ragged last vector goes out through a stack copy and scalar stores: vmaskmovps stores
  // are slow on AMD cores (they were a tenth of the time of a 100-column product).
  [[maybe_unused]] const int valid =
      kMasked ? __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(mask))) : 8;
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      if (gelu) acc[i][v] = gelu_avx2(acc[i][v]);
      if (kMasked && v == NV - 1) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, acc[i][v]);
        float* dst = C + i * ldc + 8 * v;
        for (int l = 0; l < valid; ++l) dst[l] = lanes[l];
      } else {
        _mm256_storeu_ps(C + i * ldc + 8 * v, acc[i][v]);
      }
    }
  }
}

// All column tiles of R rows: 16 columns at a time, then a (masked) 8- or 16-wide edge.
template <int R>
inline void row_block_avx2(const float* A, int64_t a_row, int64_t a_red,
                                            const float* B, int64_t ldb, float* C, int64_t ldc,
                                            int64_t T, int64_t cols, bool accumulate) {
  const __m256i full = _mm256_set1_epi32(-1);
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) {
    tile_avx2<R, 2, false>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate, full);
  }
  const int64_t rem = cols - j;
  if (rem == 0) return;
  if (rem == 8) {  // a whole vector (d = 40 heads at PaCa-ViT's third stage): no masks
    tile_avx2<R, 1, false>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate, full);
    return;
  }
  const int64_t last = rem > 8 ? rem - 8 : rem;  // valid lanes of the last vector
  const __m256i mask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(last)),
                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (rem > 8) {
    tile_avx2<R, 2, true>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate, mask);
  } else {
    tile_avx2<R, 1, true>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate, mask);
  }
}

// One packed panel (T x 8*NV, row stride 16, zero-padded to 16 columns) against all rows of A:
// 6-row tiles, then the rest.
template <int NV, bool kMasked>
inline void panel_rows_avx2(const float* A, int64_t a_row, int64_t a_red,
                                             const float* panel, float* C, int64_t ldc,
                                             int64_t rows, int64_t T, bool accumulate,
                                             __m256i mask, const float* init = nullptr,
                                             bool gelu = false) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) {
    tile_avx2<6, NV, kMasked, false>(A + r * a_row, a_row, a_red, panel, 16, C + r * ldc, ldc, T,
                                     accumulate, mask, init, gelu);
  }
  const float* Ar = A + r * a_row;
  float* Cr = C + r * ldc;
#define PACA_PANEL_TAIL(R)                                                                        \
  case R:                                                                                         \
    tile_avx2<R, NV, kMasked, false>(Ar, a_row, a_red, panel, 16, Cr, ldc, T, accumulate, mask,   \
                                     init, gelu);                                                 \
    break;
  switch (rows - r) {
    PACA_PANEL_TAIL(5)
    PACA_PANEL_TAIL(4)
    PACA_PANEL_TAIL(3)
    PACA_PANEL_TAIL(2)
    PACA_PANEL_TAIL(1)
    default: break;
  }
#undef PACA_PANEL_TAIL
}

inline void gemm_avx2(const float* A, int64_t a_row, int64_t a_red,
                                       const float* B, int64_t ldb, float* C, int64_t ldc,
                                       int64_t rows, int64_t T, int64_t cols, bool accumulate) {
  // 6 x 16 tiles: 12 accumulators + 2 B vectors + 1 broadcast fill the 16 ymm registers, and
  // each step issues 8 loads for 12 FMAs.
  //
  // When B (T x cols) is too big to stay in L1 while all row tiles pass over it (the pooling's
  // x tile, the clustering head's weights: 100-400 KiB), each row tile would stream its 16
  // columns of B from L2 again, with a large row stride. So B is cut into panels of 16 columns
  // by kPanelSteps reduction steps, each packed contiguous once (it then stays in L1) and used
  // by every row tile before the next one is packed. The accumulators are stored and reloaded
  // between the reduction chunks, which keeps every output's sum in the same order as the
  // unpacked loop: both paths give the same bits.
  if (rows >= 12 && T * cols > 8192) {
    alignas(64) float panel[kPanelSteps * 16];
    for (int64_t j = 0; j < cols; j += 16) {
      const int64_t w = imin(16, cols - j);
      const int64_t last = w > 8 ? w - 8 : w;  // valid lanes of the last vector
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(last)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      for (int64_t t0 = 0; t0 < T; t0 += kPanelSteps) {
        const int64_t kc = imin(kPanelSteps, T - t0);
        const float* Bt = B + t0 * ldb + j;
        if (w == 16) {
          for (int64_t t = 0; t < kc; ++t) {
            _mm256_store_ps(panel + 16 * t, _mm256_loadu_ps(Bt + t * ldb));
            _mm256_store_ps(panel + 16 * t + 8, _mm256_loadu_ps(Bt + t * ldb + 8));
          }
        } else {
          for (int64_t t = 0; t < kc; ++t) {
            for (int64_t c = 0; c < w; ++c) panel[16 * t + c] = Bt[t * ldb + c];
            for (int64_t c = w; c < 16; ++c) panel[16 * t + c] = 0.0f;  // read unmasked
          }
        }
        const float* At = A + t0 * a_red;
        const bool acc = accumulate || t0 > 0;
        if (w == 16) {
          panel_rows_avx2<2, false>(At, a_row, a_red, panel, C + j, ldc, rows, kc, acc, mask);
        } else if (w > 8) {
          panel_rows_avx2<2, true>(At, a_row, a_red, panel, C + j, ldc, rows, kc, acc, mask);
        } else {
          panel_rows_avx2<1, true>(At, a_row, a_red, panel, C + j, ldc, rows, kc, acc, mask);
        }
      }
    }
    return;
  }
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) {
    row_block_avx2<6>(A + r * a_row, a_row, a_red, B, ldb, C + r * ldc, ldc, T, cols, accumulate);
  }
  const float* Ar = A + r * a_row;
  float* Cr = C + r * ldc;
  switch (rows - r) {
    case 5: row_block_avx2<5>(Ar, a_row, a_red, B, ldb, Cr, ldc, T, cols, accumulate); break;
    case 4: row_block_avx2<4>(Ar, a_row, a_red, B, ldb, Cr, ldc, T, cols, accumulate); break;
    case 3: row_block_avx2<3>(Ar, a_row, a_red, B, ldb, Cr, ldc, T, cols, accumulate); break;
    case 2: row_block_avx2<2>(Ar, a_row, a_red, B, ldb, Cr, ldc, T, cols, accumulate); break;
    case 1: row_block_avx2<1>(Ar, a_row, a_red, B, ldb, Cr, ldc, T, cols, accumulate); break;
    default: break;
  }
}

// C[r, :] = act(bias + sum_t A[r, t] P[t, :]) with P pre-packed by PackedMatrix (16-column
// panels, each T x 16 contiguous): gemm_avx2's panel path without packing on every call, for the
// constant weights that every task of a kernel multiplies by. Same sums in the same order as
// gemm_nn. bias (cols,) or nullptr: the sums start from it (as if C's rows held it and were
// accumulated into). gelu: GELU applied to the finished sums as they are stored.
void gemm_packed_f32_avx2(const float* A, int64_t lda, const float* P, float* C,
                                           int64_t ldc, int64_t rows, int64_t T, int64_t cols,
                                           const float* bias, bool gelu) {
  for (int64_t j = 0; j < cols; j += 16) {
    const int64_t w = imin(16, cols - j);
    const int64_t last = w > 8 ? w - 8 : w;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(last)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const float* panel = P + (j / 16) * T * 16;
    const float* init = bias == nullptr ? nullptr : bias + j;
    for (int64_t t0 = 0; t0 < T; t0 += kPanelSteps) {
      const int64_t kc = imin(kPanelSteps, T - t0);
      const bool acc = t0 > 0;  // later chunks add to the stored partial sums
      const bool act = gelu && t0 + kc == T;  // after the last chunk of the reduction
      const float* a = A + t0;
      const float* pt = panel + 16 * t0;
      if (w == 16) {
        panel_rows_avx2<2, false>(a, lda, 1, pt, C + j, ldc, rows, kc, acc, mask, init, act);
      } else if (w > 8) {
        panel_rows_avx2<2, true>(a, lda, 1, pt, C + j, ldc, rows, kc, acc, mask, init, act);
      } else {
        panel_rows_avx2<1, true>(a, lda, 1, pt, C + j, ldc, rows, kc, acc, mask, init, act);
      }
    }
  }
}

void gemm_nn_f32_avx2(const float* A, int64_t lda, const float* B, int64_t ldb,
                                       float* C, int64_t ldc, int64_t rows, int64_t K,
                                       int64_t cols, bool accumulate) {
  // C[r, :] (+)= sum_k A[r, k] B[k, :]
  gemm_avx2(A, lda, 1, B, ldb, C, ldc, rows, K, cols, accumulate);
}

void gemm_tn_acc_f32_avx2(const float* A, int64_t lda, const float* B,
                                           int64_t ldb, float* C, int64_t ldc, int64_t rows,
                                           int64_t K, int64_t cols) {
  // C[k, :] += sum_r A[r, k] B[r, :]: C has K rows, the reduction runs over the `rows` rows.
  gemm_avx2(A, 1, lda, B, ldb, C, ldc, K, rows, cols, /*accumulate=*/true);
}

// dst[c * ldd + r] = src[r * lds + c]: 8 x 8 blocks transposed in registers (the clustering head's
// logits tile into the (M, N) output rows, the keys into their per-head (d x M) layout), the ragged
// edges by the scalar loop.
void transpose_f32_avx2(const float* src, int64_t lds, int64_t rows,
                                         int64_t cols, float* dst, int64_t ldd) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t r = 0; r < r8; r += 8) {
    for (int64_t c = 0; c < c8; c += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(src + (r + i) * lds + c);
      // Standard 8x8 transpose: unpack pairs, shuffle quads, swap 128-bit halves.
      const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
      const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
      const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
      const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      _mm256_storeu_ps(dst + (c + 0) * ldd + r, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(dst + (c + 1) * ldd + r, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(dst + (c + 2) * ldd + r, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(dst + (c + 3) * ldd + r, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(dst + (c + 4) * ldd + r, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(dst + (c + 5) * ldd + r, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(dst + (c + 6) * ldd + r, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(dst + (c + 7) * ldd + r, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (int64_t c = c8; c < cols; ++c) {
      for (int64_t i = 0; i < 8; ++i) dst[c * ldd + r + i] = src[(r + i) * lds + c];
    }
  }
  for (int64_t r = r8; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}


// AVX2+FMA: P output pixels x NV vectors of 8 channels are accumulated in registers over the
// nky x nkx taps of their window (each tap's weight vectors are loaded once and reused for the P
// pixels), instead of reloading and storing the output row for every tap.
//
// `in` is the first tap of pixel 0, `in_row`/`in_px` the float offsets between image rows and
// between pixels, `wt` the weight of that first tap in the (k*k, C) table: so the same tile reads a
// zero-padded band (all k x k taps) or the image itself, with the window clipped to the taps that
// fall inside it (the skipped taps would add exact zeros, so both give the same bits).
// kInBias: u = x + in_bias is convolved (added as each input vector is loaded, the band's rounding).
// gelu: GELU applied to the accumulators before they are stored (one pass fewer over the output).
template <int P, int NV, bool kMasked, bool kInBias>
PACA_ALWAYS_INLINE void dw_tile_avx2(const float* in, int64_t in_row,
                                                      int64_t in_px, const float* wt, int64_t nky,
                                                      int64_t nkx, int64_t k, const float* bias,
                                                      const float* in_bias, bool gelu, float* out,
                                                      int64_t C, __m256i mask) {
  __m256 acc[P][NV];
  [[maybe_unused]] __m256 ib[NV];
  for (int v = 0; v < NV; ++v) {
    const bool m = kMasked && v == NV - 1;
    const __m256 b0 = bias == nullptr ? _mm256_setzero_ps()
                      : m ? _mm256_maskload_ps(bias + 8 * v, mask) : _mm256_loadu_ps(bias + 8 * v);
    for (int p = 0; p < P; ++p) acc[p][v] = b0;
    if constexpr (kInBias) {
      ib[v] = m ? _mm256_maskload_ps(in_bias + 8 * v, mask) : _mm256_loadu_ps(in_bias + 8 * v);
    }
  }
  for (int64_t ky = 0; ky < nky; ++ky) {
    for (int64_t kx = 0; kx < nkx; ++kx) {
      const float* wv = wt + (ky * k + kx) * C;
      const float* iv = in + ky * in_row + kx * in_px;
      for (int v = 0; v < NV; ++v) {
        const bool m = kMasked && v == NV - 1;
        const __m256 w = m ? _mm256_maskload_ps(wv + 8 * v, mask) : _mm256_loadu_ps(wv + 8 * v);
        for (int p = 0; p < P; ++p) {
          const float* ip = iv + p * in_px + 8 * v;
          __m256 xv = m ? _mm256_maskload_ps(ip, mask) : _mm256_loadu_ps(ip);
          if constexpr (kInBias) xv = _mm256_add_ps(xv, ib[v]);
          acc[p][v] = _mm256_fmadd_ps(xv, w, acc[p][v]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int v = 0; v < NV; ++v) {
      float* op = out + p * C + 8 * v;
      const __m256 r = gelu ? gelu_avx2(acc[p][v]) : acc[p][v];
      if (kMasked && v == NV - 1) {
        _mm256_maskstore_ps(op, mask, r);
      } else {
        _mm256_storeu_ps(op, r);
      }
    }
  }
}

// All channel tiles of P adjacent output pixels (16 channels at a time, then a masked edge).
template <int P, bool kInBias>
PACA_ALWAYS_INLINE void dw_pixels_avx2(const float* in, int64_t in_row,
                                                        int64_t in_px, const float* wt,
                                                        int64_t nky, int64_t nkx, int64_t k,
                                                        const float* bias, const float* in_bias,
                                                        bool gelu, float* out, int64_t C) {
  const __m256i full = _mm256_set1_epi32(-1);
  const auto at = [](const float* p, int64_t c) { return p ? p + c : nullptr; };
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    dw_tile_avx2<P, 2, false, kInBias>(in + c, in_row, in_px, wt + c, nky, nkx, k, at(bias, c),
                                       at(in_bias, c), gelu, out + c, C, full);
  }
  const int64_t rem = C - c;
  if (rem == 0) return;
  const int64_t last = rem > 8 ? rem - 8 : rem;
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(last)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (rem > 8) {
    dw_tile_avx2<P, 2, true, kInBias>(in + c, in_row, in_px, wt + c, nky, nkx, k, at(bias, c),
                                      at(in_bias, c), gelu, out + c, C, mask);
  } else {
    dw_tile_avx2<P, 1, true, kInBias>(in + c, in_row, in_px, wt + c, nky, nkx, k, at(bias, c),
                                      at(in_bias, c), gelu, out + c, C, mask);
  }
}

void dwconv_band_f32_avx2(const float* in, int64_t in_w, const float* wt,
                                           const float* bias, float* out, int64_t rows,
                                           int64_t W, int64_t C, int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    int64_t j = 0;
    for (; j + 4 <= W; j += 4) {
      dw_pixels_avx2<4, false>(in + (r * in_w + j) * C, in_w * C, C, wt, k, k, k, bias, nullptr,
                               false, out + (r * W + j) * C, C);
    }
    for (; j < W; ++j) {
      dw_pixels_avx2<1, false>(in + (r * in_w + j) * C, in_w * C, C, wt, k, k, k, bias, nullptr,
                               false, out + (r * W + j) * C, C);
    }
  }
}

// Sliding-window tile for a compile-time kernel width K: P adjacent output pixels of one image row
// x 8 channels. Per tap row, the K weight vectors are loaded once into registers and each input
// pixel once, then feeds every output whose window holds it (up to K of the P accumulators): P + K
// - 1 input loads and K weight loads for P * K FMAs (P = 7, K = 7: 20 loads for 49 FMAs), where
// dw_tile_avx2 loads an input vector and a weight for every FMA or two. The depthwise convolution
// is load-bound otherwise.
//
// `in` is the first valid tap row at output pixel 0's column (the window's columns are at offsets
// (i - pad) * in_px, i < P + K - 1); inputs i < ilo or i >= ihi lie outside the image and are
// skipped, exactly as dw_tile_avx2 clips the window (their taps would add exact zeros). Each
// output's sum runs over the taps in the same order (ky, then kx) as dw_tile_avx2: same bits.
template <int K, int P, bool kMasked, bool kInBias>
PACA_ALWAYS_INLINE void dw_slide_avx2(const float* in, int64_t in_row,
                                                       int64_t in_px, const float* wt,
                                                       int64_t nky, int ilo, int ihi,
                                                       const float* bias, const float* in_bias,
                                                       bool gelu, float* out, int64_t C,
                                                       __m256i mask) {
  constexpr int kPad = (K - 1) / 2;
  const auto load = [mask](const float* p) {
    return kMasked ? _mm256_maskload_ps(p, mask) : _mm256_loadu_ps(p);
  };
  const __m256 b0 = bias == nullptr ? _mm256_setzero_ps() : load(bias);
  __m256 acc[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) acc[p] = b0;
  [[maybe_unused]] __m256 ib;
  if constexpr (kInBias) ib = load(in_bias);
  for (int64_t ky = 0; ky < nky; ++ky) {
    const float* irow = in + ky * in_row;
    __m256 w[K];
#pragma GCC unroll 16
    for (int kx = 0; kx < K; ++kx) w[kx] = load(wt + (ky * K + kx) * C);
#pragma GCC unroll 32
    for (int i = 0; i < P + K - 1; ++i) {
      if (i < ilo || i >= ihi) continue;
      __m256 xv = load(irow + (i - kPad) * in_px);
      if constexpr (kInBias) xv = _mm256_add_ps(xv, ib);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        // Output p takes input i through tap kx = i - p (increasing kx order, as i increases).
        if (i - p >= 0 && i - p < K) acc[p] = _mm256_fmadd_ps(xv, w[i - p], acc[p]);
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    const __m256 r = gelu ? gelu_avx2(acc[p]) : acc[p];
    if constexpr (kMasked) {
      _mm256_maskstore_ps(out + p * C, mask, r);
    } else {
      _mm256_storeu_ps(out + p * C, r);
    }
  }
}

// One output row (W pixels, all C channels) of a K-wide depthwise convolution by sliding tiles of P
// pixels; a last tile that would stick out is moved left to end at the row's end (it recomputes a
// few outputs, with the same bits). Needs W >= P. `in` is the first valid tap row at column 0, `wt`
// that tap row's weights, out the row's first output (pixel stride C). The order of the tiles
// (`cached`: see DwDirectFn in dispatch.h) changes no output's sum.
template <int K, int P, bool kInBias>
void dw_row_slide_avx2(const float* in, int64_t in_row, int64_t in_px,
                                        int64_t W, const float* wt, int64_t nky,
                                        const float* bias, const float* in_bias, bool gelu,
                                        float* out, int64_t C, bool cached) {
  constexpr int kPad = (K - 1) / 2;
  const auto at = [](const float* p, int64_t c) { return p ? p + c : nullptr; };
  // The tile of P pixels from column j0 (moved left at the row's end) and 8 channels from c.
  const auto tile = [&](int64_t j0, int64_t c) __attribute__((always_inline)) {
    const bool masked = C - c < 8;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(C - c)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const int64_t j = imin(j0, W - P);
    // Window inputs i (column j - pad + i) that fall inside the image.
    const int ilo = static_cast<int>(imax(0, kPad - j));
    const int ihi = static_cast<int>(imin(P + K - 1, W + kPad - j));
    const float* ip = in + j * in_px + c;
    float* op = out + j * C + c;
    if (!cached) {  // from memory: the next output row's new input row (see the AVX-512 build)
      const float* pf = ip + nky * in_row - kPad * in_px;
      for (int i = ilo; i < ihi; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + i * in_px), _MM_HINT_T1);
      }
    }
    if (masked) {
      dw_slide_avx2<K, P, true, kInBias>(ip, in_row, in_px, wt + c, nky, ilo, ihi, at(bias, c),
                                         at(in_bias, c), gelu, op, C, mask);
    } else {
      dw_slide_avx2<K, P, false, kInBias>(ip, in_row, in_px, wt + c, nky, ilo, ihi, at(bias, c),
                                          at(in_bias, c), gelu, op, C, mask);
    }
  };
  if (cached) {
    for (int64_t c = 0; c < C; c += 8) {
      for (int64_t j0 = 0; j0 < W; j0 += P) tile(j0, c);
    }
  } else {
    for (int64_t j0 = 0; j0 < W; j0 += P) {
      for (int64_t c = 0; c < C; c += 8) tile(j0, c);
    }
  }
}

// Image rows y0 .. y0 + rows - 1 of the depthwise convolution, read straight from the image
// (float32, channels contiguous, `px` floats between pixels, pixel (y, j) at
// img[((y - y_base)*W + j)*px]: img may hold only the rows from y_base on): no padded copy. Each
// pixel's window is clipped to the image. Kernel widths 3, 5 and 7 go through the sliding tiles
// above; other widths take pixels whose window is whole (all but the (k-1)/2 columns at each side)
// four at a time, the others one by one.
template <bool kInBias>
void dwconv_direct_avx2(const float* img, int64_t px, int64_t y_base, int64_t H,
                                         int64_t W, int64_t y0, int64_t rows, const float* wt,
                                         const float* bias, const float* in_bias, bool gelu,
                                         float* out, int64_t C, int64_t k, bool cached) {
  const int64_t pad = (k - 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = y0 + r;
    const int64_t ky0 = imax(0, pad - y), ky1 = imin(k, H + pad - y);
    const int64_t row0 = y - pad + ky0 - y_base;  // first valid tap row, relative to img
    float* orow = out + r * W * C;
    // The common kernel widths slide (7: the clustering head, 3: the MLP's DWConv).
    if (k == 7 && W >= 7) {
      dw_row_slide_avx2<7, 7, kInBias>(img + row0 * W * px, W * px, px, W, wt + ky0 * k * C,
                                       ky1 - ky0, bias, in_bias, gelu, orow, C, cached);
      continue;
    }
    if (k == 5 && W >= 8) {
      dw_row_slide_avx2<5, 8, kInBias>(img + row0 * W * px, W * px, px, W, wt + ky0 * k * C,
                                       ky1 - ky0, bias, in_bias, gelu, orow, C, cached);
      continue;
    }
    if (k == 3 && W >= 8) {
      dw_row_slide_avx2<3, 8, kInBias>(img + row0 * W * px, W * px, px, W, wt + ky0 * k * C,
                                       ky1 - ky0, bias, in_bias, gelu, orow, C, cached);
      continue;
    }
    int64_t j = 0;
    while (j < W) {
      if (j >= pad && j + 4 <= W - pad) {
        dw_pixels_avx2<4, kInBias>(img + (row0 * W + j - pad) * px, W * px, px, wt + ky0 * k * C,
                                   ky1 - ky0, k, k, bias, in_bias, gelu, orow + j * C, C);
        j += 4;
      } else {
        const int64_t kx0 = imax(0, pad - j), kx1 = imin(k, W + pad - j);
        dw_pixels_avx2<1, kInBias>(img + (row0 * W + j - pad + kx0) * px, W * px, px,
                                   wt + (ky0 * k + kx0) * C, ky1 - ky0, kx1 - kx0, k, bias,
                                   in_bias, gelu, orow + j * C, C);
        j += 1;
      }
    }
  }
}

void dwconv_direct_f32_avx2(const float* img, int64_t px, int64_t y_base,
                                             int64_t H, int64_t W, int64_t y0, int64_t rows,
                                             const float* wt, const float* bias,
                                             const float* in_bias, bool gelu, float* out,
                                             int64_t C, int64_t k, bool cached) {
  if (in_bias != nullptr) {
    dwconv_direct_avx2<true>(img, px, y_base, H, W, y0, rows, wt, bias, in_bias, gelu, out, C, k,
                             cached);
  } else {
    dwconv_direct_avx2<false>(img, px, y_base, H, W, y0, rows, wt, bias, nullptr, gelu, out, C, k,
                              cached);
  }
}

#undef PACA_ALWAYS_INLINE

}  // namespace

bool register_kernels(Float32Kernels& k) {
  k.gemm_nn = gemm_nn_f32_avx2;
  k.gemm_tn_acc = gemm_tn_acc_f32_avx2;
  k.exp_shifted = exp_shifted_f32_avx2;
  k.exp_shifted_cols = exp_shifted_cols_f32_avx2;
  k.row_max = row_max_f32_avx2;
  k.softmax_bwd_rows = softmax_bwd_rows_f32_avx2;
  k.softmax_bwd_saved_rows = softmax_bwd_saved_rows_f32_avx2;
  k.exp_minus_row_max_rows = exp_minus_row_max_rows_f32_avx2;
  k.gemm_packed = gemm_packed_f32_avx2;
  k.transpose = transpose_f32_avx2;
  k.gelu = gelu_f32_avx2;
  k.dwconv_band = dwconv_band_f32_avx2;
  k.dwconv_direct = dwconv_direct_f32_avx2;
  k.layer_norm_rows = layer_norm_rows_f32_avx2;
  k.isa = "avx2";
  return true;
}
#else   // compiled without -mavx2 -mfma (another compiler or architecture): no AVX2 build
bool register_kernels(Float32Kernels&) { return false; }
#endif

}  // namespace paca_kernels::cpu::avx2
