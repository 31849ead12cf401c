// Small dense building blocks shared by the CPU kernels of paca_kernels (csrc/cpu/*.cpp).
//
// The extension is compiled for the baseline x86-64 ISA (SSE2), so that one wheel runs anywhere.
// Each float32 hot spot (small matrix products, exp, row max, GELU, transpose) therefore exists
// twice: a portable template that the compiler auto-vectorises for the baseline ISA (axpy-shaped
// loops, no floating-point reductions to reassociate without -ffast-math), and an AVX2+FMA kernel
// with intrinsics, compiled with a target attribute and selected at run time from cpuid
// (Float32Kernels). The matrix products exist a third time, with AVX-512 intrinsics, for CPUs
// that have AVX-512F; they give the AVX2 products' bits. float64 (gradcheck, reference precision)
// always uses the portable templates. The baseline and the vector float32 builds may differ in the
// last bits (FMA), each one is deterministic.
//
// Everything lives in an unnamed namespace: each translation unit gets its own copy, and no
// symbol leaks or clashes between the kernel files.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PACA_X86_DISPATCH 1
#define PACA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PACA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PACA_X86_DISPATCH 0
#define PACA_TARGET_AVX2
#define PACA_ALWAYS_INLINE inline
#endif

namespace paca_kernels {
namespace {

// Multiply-adds per parallel task; same value as at::internal::GRAIN_SIZE, which lives in the
// heavy ATen/TensorIterator.h.
constexpr int64_t kGrainSize = 32768;

// ---- parallel loops ----------------------------------------------------------------------------
//
// f(lo, hi) over disjoint chunks covering [begin, end), on torch's intra-op threads (OpenMP in
// torch's CPU builds; CMakeLists.txt compiles with -fopenmp so at::parallel_for's pragma is live
// in these files). at::parallel_for hands each thread one fixed slice; here the threads claim
// chunks of at least `grain` iterations from a shared counter until none are left. On a shared
// or virtualised machine two cores running the same work routinely differ by 5-10% over a few
// milliseconds (measured: 0.3-0.7 ms of a 6 ms phase of p2c_attention_proj at B = 8), and with a
// fixed slice the faster thread spins at the closing barrier for the whole difference; claiming
// chunks bounds that wait by one chunk. Every kernel writes disjoint outputs, or per-task partials
// reduced in a fixed order, so neither the split nor which thread runs a chunk changes a result.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t nthr = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (nthr <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  // About 8 chunks per thread (never below the grain): fine enough that the last chunks even
  // out the threads, coarse enough that each chunk's setup (scratch lookup, row loads) is noise.
  const int64_t chunk = std::max<int64_t>(grain, n / (nthr * 8));
  std::atomic<int64_t> next{begin};
  at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t lo = next.fetch_add(chunk, std::memory_order_relaxed);
      if (lo >= end) break;
      f(lo, std::min(end, lo + chunk));
    }
  });
}

// Element strides of a tensor of rank <= 4, as int64 so that > 2^31-element tensors index
// correctly. Reading through strides (instead of .contiguous()) avoids copying big inputs and
// handles expanded (stride-0) gradients.
struct Strides {
  int64_t s[4] = {0, 0, 0, 0};
  explicit Strides(const at::Tensor& t) {
    for (int64_t i = 0; i < t.dim(); ++i) s[i] = t.stride(i);
  }
  int64_t operator[](int64_t i) const { return s[i]; }
};

// exp for float32 that vectorises: Cephes' expf (range reduction by ln 2, degree-5 polynomial,
// ~1 ulp for the arguments <= 0 that softmax uses), on 8-lane GCC vector types so that it compiles
// to SIMD code in both builds (std::exp stays a scalar libm call without -ffast-math, and scalar
// code with ?: selects is not if-converted under the default -ftrapping-math).
// exp(-inf) = 0, NaN propagates, results below FLT_MIN flush to 0 (irrelevant softmax weights),
// arguments above ~88.38 saturate at ~2.4e38 (softmax arguments are <= 0).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // the 32-byte vector helpers are always inlined
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

PACA_ALWAYS_INLINE v8f exp_v8(v8f x) {
  const v8f lo = v8f{} + -87.3365f;  // exp(lo) ~ FLT_MIN: the exponent k stays >= -126
  const v8f hi = v8f{} + 88.3762f;   // k stays <= 127
  const v8f rnd = v8f{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to integer
  v8f xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v8f kf = (xc * 1.44269504088896341f + rnd) - rnd;
  const v8f r = (xc - kf * 0.693359375f) - kf * -2.12194440e-4f;  // ln 2 split in two
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v8i k = __builtin_convertvector(kf, v8i);
  const v8f y = p * reinterpret_cast<v8f>((k + 127) << 23);  // p * 2^k
  const v8f z = x < lo ? v8f{} : y;
  return x != x ? x : z;
}

// out[i] = exp(in[i] - shift), i < n (in == out allowed); returns sum_i out[i] (in a fixed order).
PACA_ALWAYS_INLINE float exp_shifted_impl(const float* in, float shift, float* out, int64_t n) {
  v8f acc = v8f{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v;
    std::memcpy(&v, in + i, sizeof(v));
    v = exp_v8(v - shift);
    acc += v;
    std::memcpy(out + i, &v, sizeof(v));
  }
  float tail = 0.0f;
  if (i < n) {
    v8f v = v8f{};
    for (int64_t j = 0; j < n - i; ++j) v[j] = in[i + j] - shift;
    v = exp_v8(v);
    for (int64_t j = 0; j < n - i; ++j) {
      out[i + j] = v[j];
      tail += v[j];
    }
  }
  return (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail;
}
#pragma GCC diagnostic pop
#else
PACA_ALWAYS_INLINE float exp_shifted_impl(const float* in, float shift, float* out, int64_t n) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += (out[i] = std::exp(in[i] - shift));
  return sum;
}
#endif

PACA_ALWAYS_INLINE double exp_shifted_impl(const double* in, double shift, double* out, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += (out[i] = std::exp(in[i] - shift));
  return sum;
}

// C[r, :] (+)= sum_k A[r, k] * B[k, :] for r < rows; A (rows x K, row stride lda), B (K x cols,
// row stride ldb), C (rows x cols, row stride ldc), all row-major. Four rows of C are updated
// per pass over B so each loaded B row feeds four FMA streams; the inner loop over cols is an
// axpy, which auto-vectorises without reassociation.
template <typename T>
PACA_ALWAYS_INLINE void gemm_nn_impl(const T* __restrict A, int64_t lda, const T* __restrict B,
                                     int64_t ldb, T* __restrict C, int64_t ldc, int64_t rows,
                                     int64_t K, int64_t cols, bool accumulate) {
  if (!accumulate) {
    for (int64_t r = 0; r < rows; ++r) std::fill(C + r * ldc, C + r * ldc + cols, T(0));
  }
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    T* __restrict c0 = C + r * ldc;
    T* __restrict c1 = c0 + ldc;
    T* __restrict c2 = c1 + ldc;
    T* __restrict c3 = c2 + ldc;
    const T* a = A + r * lda;
    for (int64_t k = 0; k < K; ++k) {
      const T a0 = a[k], a1 = a[lda + k], a2 = a[2 * lda + k], a3 = a[3 * lda + k];
      const T* __restrict b = B + k * ldb;
      for (int64_t j = 0; j < cols; ++j) {
        const T bj = b[j];
        c0[j] += a0 * bj;
        c1[j] += a1 * bj;
        c2[j] += a2 * bj;
        c3[j] += a3 * bj;
      }
    }
  }
  for (; r < rows; ++r) {
    T* __restrict c0 = C + r * ldc;
    const T* a = A + r * lda;
    for (int64_t k = 0; k < K; ++k) {
      const T a0 = a[k];
      const T* __restrict b = B + k * ldb;
      for (int64_t j = 0; j < cols; ++j) c0[j] += a0 * b[j];
    }
  }
}

// C[k, :] += sum_r A[r, k] * B[r, :] for k < K (C = C + A^T B); A (rows x K, lda),
// B (rows x cols, ldb), C (K x cols, ldc). Four rows of A/B per pass over C, so each C row is
// loaded and stored once per four rank-1 updates. Accumulation order over r is fixed (the row
// order), which keeps results independent of threading.
template <typename T>
PACA_ALWAYS_INLINE void gemm_tn_acc_impl(const T* __restrict A, int64_t lda, const T* __restrict B,
                                         int64_t ldb, T* __restrict C, int64_t ldc, int64_t rows,
                                         int64_t K, int64_t cols) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T* a = A + r * lda;
    const T* __restrict b0 = B + r * ldb;
    const T* __restrict b1 = b0 + ldb;
    const T* __restrict b2 = b1 + ldb;
    const T* __restrict b3 = b2 + ldb;
    for (int64_t k = 0; k < K; ++k) {
      const T a0 = a[k], a1 = a[lda + k], a2 = a[2 * lda + k], a3 = a[3 * lda + k];
      T* __restrict c = C + k * ldc;
      for (int64_t j = 0; j < cols; ++j) {
        c[j] = (((c[j] + a0 * b0[j]) + a1 * b1[j]) + a2 * b2[j]) + a3 * b3[j];
      }
    }
  }
  for (; r < rows; ++r) {
    const T* a = A + r * lda;
    const T* __restrict b0 = B + r * ldb;
    for (int64_t k = 0; k < K; ++k) {
      const T a0 = a[k];
      T* __restrict c = C + k * ldc;
      for (int64_t j = 0; j < cols; ++j) c[j] += a0 * b0[j];
    }
  }
}

// Maximum of n values (NaN entries are skipped; they propagate through the exp instead).
// Eight independent partial maxima let the compiler vectorise without reassociation concerns
// (max is exact, so the order does not change the result).
template <typename T>
PACA_ALWAYS_INLINE T row_max_impl(const T* x, int64_t n) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T part[8] = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] = x[i + j] > part[j] ? x[i + j] : part[j];
  }
  for (; i < n; ++i) part[0] = x[i] > part[0] ? x[i] : part[0];
  T m = part[0];
  for (int j = 1; j < 8; ++j) m = part[j] > m ? part[j] : m;
  return m;
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols.
template <typename T>
void transpose_impl(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  // Blocks of 32 source rows keep their lines in L1 while they are read column by column.
  for (int64_t r0 = 0; r0 < rows; r0 += 32) {
    const int64_t r1 = std::min(rows, r0 + 32);
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
  }
}

// ---- GELU (exact, erf form) -------------------------------------------------------------------
//
// gelu(v) = 0.5 v (1 + erf(v / sqrt 2)), with erf by a rational approximation fitted for this
// library: with x = clamp(v / (4 sqrt 2), -1, 1) and s = x^2,
//   erf(v / sqrt 2) ~ x P(s) / Q(s),  P of degree 6, Q of degree 5 (Q(0) = 1),
// a near-minimax fit of erf on [0, 4] (error 5e-9 in exact arithmetic; float32 evaluation with
// FMAs: at most 3.2e-7 against erf, about 5 ulp of 1). Outside |v / sqrt 2| <= 4, erf is +-1 to
// within 1.5e-8: the clamped x = +-1 gives exactly +-1 (P6 was nudged by 36 ulp so that x P(1) /
// Q(1) rounds to 1; the portable version selects +-1 explicitly), so gelu(v) = v for large v and
// exactly 0 for large negative v, as in PyTorch. NaN propagates (the clamps keep a NaN operand).
// Cost: 12 FMAs, one division and 6 other operations per vector, about half of an erf built on
// exp (Abramowitz & Stegun 7.1.26, which this replaced: it was two fifths of the depthwise conv's
// time in the clustering head). The division is exact IEEE, so the bits do not depend on the
// CPU vendor (the approximate reciprocal vrcpps does).
constexpr float kGeluScale = 0.17677669529663688f;  // 1 / (4 sqrt 2)
constexpr float kGeluP[7] = {4.513516902923584f,  11.735678672790527f, 55.687477111816406f,
                             62.475337982177734f, 102.60752868652344f, 21.178483963012695f,
                             -1.0047216415405273f};
constexpr float kGeluQ[6] = {1.0f, 7.933460235595703f, 29.04918098449707f, 63.214317321777344f,
                             86.22904968261719f, 69.76728820800781f};

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
PACA_ALWAYS_INLINE v8f gelu_v8(v8f v) {
  const v8f one = v8f{} + 1.0f, neg_one = v8f{} - 1.0f;
  v8f x = v * kGeluScale;
  x = x < neg_one ? neg_one : x;  // a NaN compares false and stays
  x = x > one ? one : x;
  const v8f s = x * x;
  v8f p = v8f{} + kGeluP[6];
  for (int i = 5; i >= 0; --i) p = p * s + kGeluP[i];
  v8f q = v8f{} + kGeluQ[5];
  for (int i = 4; i >= 0; --i) q = q * s + kGeluQ[i];
  v8f e = x * p / q;
  e = s >= one ? x : e;  // saturated: erf = +-1 exactly, whatever the rounding above
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

// ---- float32 entry points: the baseline build of the templates, and AVX2+FMA kernels --------

using GemmPackedFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t,
                              int64_t, int64_t, const float*, bool);
using GemmNNFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                          int64_t, int64_t, bool);
using GemmTNFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                          int64_t, int64_t);
using ExpFn = float (*)(const float*, float, float*, int64_t);
using MaxFn = float (*)(const float*, int64_t);
using TransposeFn = void (*)(const float*, int64_t, int64_t, int64_t, float*, int64_t);
using GeluFn = void (*)(float*, int64_t);

void gemm_nn_f32_base(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, int64_t rows, int64_t K, int64_t cols, bool accumulate) {
  gemm_nn_impl<float>(A, lda, B, ldb, C, ldc, rows, K, cols, accumulate);
}
void gemm_tn_acc_f32_base(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                          int64_t ldc, int64_t rows, int64_t K, int64_t cols) {
  gemm_tn_acc_impl<float>(A, lda, B, ldb, C, ldc, rows, K, cols);
}
float exp_shifted_f32_base(const float* in, float shift, float* out, int64_t n) {
  return exp_shifted_impl(in, shift, out, n);
}
float row_max_f32_base(const float* x, int64_t n) { return row_max_impl(x, n); }
void gelu_f32_base(float* x, int64_t n) { gelu_impl(x, n); }
void transpose_f32_base(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                        int64_t ldd) {
  transpose_impl(src, lds, rows, cols, dst, ldd);
}

#if PACA_X86_DISPATCH
// The same Cephes exp as exp_v8, with FMAs (the compiler does not contract a*b+c here).
PACA_TARGET_AVX2 inline __m256 exp_avx2(__m256 x) {
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

PACA_TARGET_AVX2 float exp_shifted_f32_avx2(const float* in, float shift, float* out, int64_t n) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(in + i), sh));
    acc = _mm256_add_ps(acc, e);
    _mm256_storeu_ps(out + i, e);
  }
  if (i < n) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(in + i, mask), sh));
    _mm256_maskstore_ps(out + i, mask, e);
    acc = _mm256_add_ps(acc, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));  // valid lanes only
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
         ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}

PACA_TARGET_AVX2 float row_max_f32_avx2(const float* x, int64_t n) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m = neg_inf;
  int64_t i = 0;
  // max_ps(v, m) returns m when v is NaN: NaN entries are skipped, as in row_max_impl.
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(x + i), m);
  if (i < n) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 v =
        _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(x + i, mask), _mm256_castsi256_ps(mask));
    m = _mm256_max_ps(v, m);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = lanes[0];
  for (int j = 1; j < 8; ++j) r = lanes[j] > r ? lanes[j] : r;
  return r;
}

// GELU with FMAs: the rational erf of gelu_v8 (see there), P and Q evaluated side by side.
PACA_TARGET_AVX2 PACA_ALWAYS_INLINE __m256 gelu_avx2(__m256 v) {
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

PACA_TARGET_AVX2 void gelu_f32_avx2(float* x, int64_t n) {
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
PACA_TARGET_AVX2 inline void tile_avx2(const float* A, int64_t a_row, int64_t a_red,
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
PACA_TARGET_AVX2 inline void row_block_avx2(const float* A, int64_t a_row, int64_t a_red,
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
PACA_TARGET_AVX2 inline void panel_rows_avx2(const float* A, int64_t a_row, int64_t a_red,
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

// Reduction steps per packed panel: a 256 x 16 float panel is 16 KiB, half of a 32 KiB L1d.
constexpr int64_t kPanelSteps = 256;

PACA_TARGET_AVX2 inline void gemm_avx2(const float* A, int64_t a_row, int64_t a_red,
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
      const int64_t w = std::min<int64_t>(16, cols - j);
      const int64_t last = w > 8 ? w - 8 : w;  // valid lanes of the last vector
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(last)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      for (int64_t t0 = 0; t0 < T; t0 += kPanelSteps) {
        const int64_t kc = std::min(kPanelSteps, T - t0);
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
PACA_TARGET_AVX2 void gemm_packed_f32_avx2(const float* A, int64_t lda, const float* P, float* C,
                                           int64_t ldc, int64_t rows, int64_t T, int64_t cols,
                                           const float* bias, bool gelu) {
  for (int64_t j = 0; j < cols; j += 16) {
    const int64_t w = std::min<int64_t>(16, cols - j);
    const int64_t last = w > 8 ? w - 8 : w;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(last)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const float* panel = P + (j / 16) * T * 16;
    const float* init = bias == nullptr ? nullptr : bias + j;
    for (int64_t t0 = 0; t0 < T; t0 += kPanelSteps) {
      const int64_t kc = std::min(kPanelSteps, T - t0);
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

PACA_TARGET_AVX2 void gemm_nn_f32_avx2(const float* A, int64_t lda, const float* B, int64_t ldb,
                                       float* C, int64_t ldc, int64_t rows, int64_t K,
                                       int64_t cols, bool accumulate) {
  // C[r, :] (+)= sum_k A[r, k] B[k, :]
  gemm_avx2(A, lda, 1, B, ldb, C, ldc, rows, K, cols, accumulate);
}

PACA_TARGET_AVX2 void gemm_tn_acc_f32_avx2(const float* A, int64_t lda, const float* B,
                                           int64_t ldb, float* C, int64_t ldc, int64_t rows,
                                           int64_t K, int64_t cols) {
  // C[k, :] += sum_r A[r, k] B[r, :]: C has K rows, the reduction runs over the `rows` rows.
  gemm_avx2(A, 1, lda, B, ldb, C, ldc, K, rows, cols, /*accumulate=*/true);
}

// dst[c * ldd + r] = src[r * lds + c]: 8 x 8 blocks transposed in registers (the clustering head's
// logits tile into the (M, N) output rows, the keys into their per-head (d x M) layout), the ragged
// edges by the scalar loop.
PACA_TARGET_AVX2 void transpose_f32_avx2(const float* src, int64_t lds, int64_t rows,
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

// ---- AVX-512 products ---------------------------------------------------------------------------
//
// The same products with 16-lane registers, on CPUs with AVX-512F. On the development machine (an
// AMD EPYC whose cores execute a 512-bit FMA as two 256-bit halves, so that the peak is the AVX2
// one) a 6 x 16 register tile ran the clustering head's and the attention's linears at 107-114
// GF/s on one core against 83-99 for the AVX2 6 x 16 tile (hot caches, same packed panels): half
// the instructions per FMA, the broadcast folded into the load, masked edges in hardware. Every
// output is the same chain of fused multiply-adds in the same order as in the AVX2 tiles, and GELU
// the same operations lane by lane, so the two builds give the same bits (tests compare them).
#define PACA_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))

// Lanes l < n of a 16-lane mask (0 <= n <= 16).
PACA_TARGET_AVX512 inline __mmask16 lanes_mask16(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}

// gelu_avx2 on 16 lanes: the same operations, so the same bits lane by lane.
PACA_TARGET_AVX512 PACA_ALWAYS_INLINE __m512 gelu_avx512(__m512 v) {
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

// tile_avx2 with 16-lane vectors: C[R x (16*NV)] (+)= sum_{t < T} A(i, t) * B[t, cols], A(i, t)
// at A[i * a_row + t * a_red]. `mask` limits the last vector's loads (of B when kMaskB, of C and
// init) and stores to the valid columns of a ragged edge; masked-off lanes are never read.
template <int R, int NV, bool kMasked, bool kMaskB = kMasked>
PACA_TARGET_AVX512 inline void tile_avx512(const float* A, int64_t a_row, int64_t a_red,
                                           const float* B, int64_t ldb, float* C, int64_t ldc,
                                           int64_t T, bool accumulate, __mmask16 mask,
                                           const float* init = nullptr, bool gelu = false) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const bool edge = kMasked && v == NV - 1;
      if (!accumulate) {
        acc[i][v] = init == nullptr ? _mm512_setzero_ps()
                    : edge          ? _mm512_maskz_loadu_ps(mask, init + 16 * v)
                                    : _mm512_loadu_ps(init + 16 * v);
      } else {
        acc[i][v] = edge ? _mm512_maskz_loadu_ps(mask, C + i * ldc + 16 * v)
                         : _mm512_loadu_ps(C + i * ldc + 16 * v);
      }
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* b = B + t * ldb;
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      bv[v] = (kMaskB && v == NV - 1) ? _mm512_maskz_loadu_ps(mask, b + 16 * v)
                                        : _mm512_loadu_ps(b + 16 * v);
    }
    const float* a = A + t * a_red;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * a_row]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      if (gelu) acc[i][v] = gelu_avx512(acc[i][v]);
      if (kMasked && v == NV - 1) {
        _mm512_mask_storeu_ps(C + i * ldc + 16 * v, mask, acc[i][v]);
      } else {
        _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
      }
    }
  }
}

// All column tiles of R rows: 32 columns at a time, then a 16-wide or masked edge.
template <int R>
PACA_TARGET_AVX512 inline void row_block_avx512(const float* A, int64_t a_row, int64_t a_red,
                                                const float* B, int64_t ldb, float* C,
                                                int64_t ldc, int64_t T, int64_t cols,
                                                bool accumulate) {
  int64_t j = 0;
  for (; j + 32 <= cols; j += 32) {
    tile_avx512<R, 2, false>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate, 0xFFFF);
  }
  const int64_t rem = cols - j;
  if (rem == 0) return;
  if (rem == 16) {
    tile_avx512<R, 1, false>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate, 0xFFFF);
  } else if (rem > 16) {
    tile_avx512<R, 2, true>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate,
                            lanes_mask16(rem - 16));
  } else {
    tile_avx512<R, 1, true>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate,
                            lanes_mask16(rem));
  }
}

// One packed panel (T x 16, row stride 16, zero-padded) against all rows of A: 6-row tiles, then
// the rest. The padding lanes are read (no masked loads of B) but never stored.
template <bool kMasked>
PACA_TARGET_AVX512 inline void panel_rows_avx512(const float* A, int64_t a_row, int64_t a_red,
                                                 const float* panel, float* C, int64_t ldc,
                                                 int64_t rows, int64_t T, bool accumulate,
                                                 __mmask16 mask, const float* init = nullptr,
                                                 bool gelu = false) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) {
    tile_avx512<6, 1, kMasked, false>(A + r * a_row, a_row, a_red, panel, 16, C + r * ldc, ldc,
                                      T, accumulate, mask, init, gelu);
  }
  const float* Ar = A + r * a_row;
  float* Cr = C + r * ldc;
#define PACA_PANEL_TAIL(R)                                                                        \
  case R:                                                                                         \
    tile_avx512<R, 1, kMasked, false>(Ar, a_row, a_red, panel, 16, Cr, ldc, T, accumulate, mask,  \
                                      init, gelu);                                                \
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

// gemm_avx2 with the 16-lane tiles: B packed per call into 16-column panels of kPanelSteps
// reduction steps when it is too big to stay in L1, else read in place (32-column tiles).
PACA_TARGET_AVX512 inline void gemm_avx512(const float* A, int64_t a_row, int64_t a_red,
                                           const float* B, int64_t ldb, float* C, int64_t ldc,
                                           int64_t rows, int64_t T, int64_t cols,
                                           bool accumulate) {
  if (rows >= 12 && T * cols > 8192) {
    alignas(64) float panel[kPanelSteps * 16];
    for (int64_t j = 0; j < cols; j += 16) {
      const int64_t w = std::min<int64_t>(16, cols - j);
      const __mmask16 mask = lanes_mask16(w);
      for (int64_t t0 = 0; t0 < T; t0 += kPanelSteps) {
        const int64_t kc = std::min(kPanelSteps, T - t0);
        const float* Bt = B + t0 * ldb + j;
        for (int64_t t = 0; t < kc; ++t) {  // zero-padded past w (read unmasked by the tiles)
          _mm512_store_ps(panel + 16 * t, _mm512_maskz_loadu_ps(mask, Bt + t * ldb));
        }
        const float* At = A + t0 * a_red;
        const bool acc = accumulate || t0 > 0;
        if (w == 16) {
          panel_rows_avx512<false>(At, a_row, a_red, panel, C + j, ldc, rows, kc, acc, mask);
        } else {
          panel_rows_avx512<true>(At, a_row, a_red, panel, C + j, ldc, rows, kc, acc, mask);
        }
      }
    }
    return;
  }
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) {
    row_block_avx512<6>(A + r * a_row, a_row, a_red, B, ldb, C + r * ldc, ldc, T, cols,
                        accumulate);
  }
  const float* Ar = A + r * a_row;
  float* Cr = C + r * ldc;
  switch (rows - r) {
    case 5: row_block_avx512<5>(Ar, a_row, a_red, B, ldb, Cr, ldc, T, cols, accumulate); break;
    case 4: row_block_avx512<4>(Ar, a_row, a_red, B, ldb, Cr, ldc, T, cols, accumulate); break;
    case 3: row_block_avx512<3>(Ar, a_row, a_red, B, ldb, Cr, ldc, T, cols, accumulate); break;
    case 2: row_block_avx512<2>(Ar, a_row, a_red, B, ldb, Cr, ldc, T, cols, accumulate); break;
    case 1: row_block_avx512<1>(Ar, a_row, a_red, B, ldb, Cr, ldc, T, cols, accumulate); break;
    default: break;
  }
}

// gemm_packed_f32_avx2 with the 16-lane tiles, on the same packed panels (PackedMatrix).
PACA_TARGET_AVX512 void gemm_packed_f32_avx512(const float* A, int64_t lda, const float* P,
                                               float* C, int64_t ldc, int64_t rows, int64_t T,
                                               int64_t cols, const float* bias, bool gelu) {
  for (int64_t j = 0; j < cols; j += 16) {
    const int64_t w = std::min<int64_t>(16, cols - j);
    const __mmask16 mask = lanes_mask16(w);
    const float* panel = P + (j / 16) * T * 16;
    const float* init = bias == nullptr ? nullptr : bias + j;
    for (int64_t t0 = 0; t0 < T; t0 += kPanelSteps) {
      const int64_t kc = std::min(kPanelSteps, T - t0);
      const bool acc = t0 > 0;
      const bool act = gelu && t0 + kc == T;
      const float* a = A + t0;
      const float* pt = panel + 16 * t0;
      if (w == 16) {
        panel_rows_avx512<false>(a, lda, 1, pt, C + j, ldc, rows, kc, acc, mask, init, act);
      } else {
        panel_rows_avx512<true>(a, lda, 1, pt, C + j, ldc, rows, kc, acc, mask, init, act);
      }
    }
  }
}

PACA_TARGET_AVX512 void gemm_nn_f32_avx512(const float* A, int64_t lda, const float* B,
                                           int64_t ldb, float* C, int64_t ldc, int64_t rows,
                                           int64_t K, int64_t cols, bool accumulate) {
  gemm_avx512(A, lda, 1, B, ldb, C, ldc, rows, K, cols, accumulate);
}

PACA_TARGET_AVX512 void gemm_tn_acc_f32_avx512(const float* A, int64_t lda, const float* B,
                                               int64_t ldb, float* C, int64_t ldc, int64_t rows,
                                               int64_t K, int64_t cols) {
  gemm_avx512(A, 1, lda, B, ldb, C, ldc, K, rows, cols, /*accumulate=*/true);
}
#endif  // PACA_X86_DISPATCH

// The float32 kernels for this CPU, chosen once (cpuid) on first use: AVX-512 products where the
// CPU has AVX-512F (the rest stays AVX2), else AVX2+FMA, else the baseline build.
// PACA_KERNELS_CPU_ISA=baseline or =avx2 in the environment caps the choice (so that the tests can
// exercise every build on an AVX-512 machine).
struct Float32Kernels {
  const char* isa = "baseline";  // the build chosen: "baseline", "avx2" or "avx512"
  GemmNNFn gemm_nn = gemm_nn_f32_base;
  GemmTNFn gemm_tn_acc = gemm_tn_acc_f32_base;
  ExpFn exp_shifted = exp_shifted_f32_base;
  MaxFn row_max = row_max_f32_base;
  GemmPackedFn gemm_packed = nullptr;  // AVX2 build only (PackedMatrix falls back to gemm_nn)
  TransposeFn transpose = transpose_f32_base;
  GeluFn gelu = gelu_f32_base;

  static const Float32Kernels& get() {
    static const Float32Kernels k = [] {
      Float32Kernels r;
#if PACA_X86_DISPATCH
      const char* isa = std::getenv("PACA_KERNELS_CPU_ISA");
      const bool forced_baseline = isa != nullptr && std::strcmp(isa, "baseline") == 0;
      const bool forced_avx2 = isa != nullptr && std::strcmp(isa, "avx2") == 0;
      __builtin_cpu_init();
      if (!forced_baseline && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        r.gemm_nn = gemm_nn_f32_avx2;
        r.gemm_tn_acc = gemm_tn_acc_f32_avx2;
        r.exp_shifted = exp_shifted_f32_avx2;
        r.row_max = row_max_f32_avx2;
        r.gemm_packed = gemm_packed_f32_avx2;
        r.transpose = transpose_f32_avx2;
        r.gelu = gelu_f32_avx2;
        r.isa = "avx2";
        if (!forced_avx2 && __builtin_cpu_supports("avx512f")) {  // the products only
          r.gemm_nn = gemm_nn_f32_avx512;
          r.gemm_tn_acc = gemm_tn_acc_f32_avx512;
          r.gemm_packed = gemm_packed_f32_avx512;
          r.isa = "avx512";
        }
      }
#endif
      return r;
    }();
    return k;
  }
};

// Type-generic front ends: float32 goes through the dispatched kernels, float64 (the gradcheck
// and reference-precision path) through the plain template.
inline void gemm_nn(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                    int64_t ldc, int64_t rows, int64_t K, int64_t cols, bool accumulate) {
  Float32Kernels::get().gemm_nn(A, lda, B, ldb, C, ldc, rows, K, cols, accumulate);
}
inline void gemm_nn(const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                    int64_t ldc, int64_t rows, int64_t K, int64_t cols, bool accumulate) {
  gemm_nn_impl<double>(A, lda, B, ldb, C, ldc, rows, K, cols, accumulate);
}
inline void gemm_tn_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                        int64_t ldc, int64_t rows, int64_t K, int64_t cols) {
  Float32Kernels::get().gemm_tn_acc(A, lda, B, ldb, C, ldc, rows, K, cols);
}
inline void gemm_tn_acc(const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                        int64_t ldc, int64_t rows, int64_t K, int64_t cols) {
  gemm_tn_acc_impl<double>(A, lda, B, ldb, C, ldc, rows, K, cols);
}
// out[i] = exp(in[i] - shift) for i < n (in == out allowed); returns the sum of the out[i].
inline float exp_shifted(const float* in, float shift, float* out, int64_t n) {
  return Float32Kernels::get().exp_shifted(in, shift, out, n);
}
inline double exp_shifted(const double* in, double shift, double* out, int64_t n) {
  return exp_shifted_impl(in, shift, out, n);
}
// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols.
inline void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                      int64_t ldd) {
  Float32Kernels::get().transpose(src, lds, rows, cols, dst, ldd);
}
inline void transpose(const double* src, int64_t lds, int64_t rows, int64_t cols, double* dst,
                      int64_t ldd) {
  transpose_impl(src, lds, rows, cols, dst, ldd);
}
// x[i] = GELU(x[i]) (exact erf form) for i < n.
inline void gelu_inplace(float* x, int64_t n) { Float32Kernels::get().gelu(x, n); }
// Maximum of n values; NaN entries are skipped (they propagate through the exp instead).
inline float row_max(const float* x, int64_t n) { return Float32Kernels::get().row_max(x, n); }
inline double row_max(const double* x, int64_t n) { return row_max_impl(x, n); }

// A parameter tensor as a contiguous std::vector of acc_t (any dtype and strides in).
template <typename acc_t>
std::vector<acc_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = c.const_data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + c.numel());
}

// A 2-D weight (out, in) as its transpose (in, out), row-major: the right-hand side of x . W^T.
// A plain loop through the strides: materialising the transpose with ATen (.t().contiguous()) cost
// about 80 us per call for the 320 x 49 depthwise taps of PaCa-ViT-Tiny's third stage (measured),
// spent on the calling thread before the kernel's parallel region starts.
template <typename acc_t>
std::vector<acc_t> transposed(const at::Tensor& t2d) {
  // Only a dtype conversion can copy here (none for acc_t weights).
  const at::Tensor c = t2d.to(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t rows = c.size(0), cols = c.size(1), s0 = c.stride(0), s1 = c.stride(1);
  const acc_t* p = c.const_data_ptr<acc_t>();
  std::vector<acc_t> out(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = p[i * s0 + j * s1];
  }
  return out;
}

// ---- scratch memory ----------------------------------------------------------------------------
//
// The kernels need temporaries of 100 KiB to a few MiB on every call: packed weights, keys and
// values, per-task tiles. Allocated per call, blocks that big come from mmap (glibc's threshold is
// 128 KiB), and the kernel zeroes and page-faults them in again every time: at PaCa-ViT-Tiny's
// third stage (B = 8) that was about 1 ms of a 9 ms p2c_attention_proj, spent on the calling
// thread while the other threads waited. Each thread instead keeps one grow-only buffer per slot,
// reused by every later call on that thread. A kernel gives each of its live temporaries its own
// slot (the calling thread also runs tasks: its slots for the whole call and the tasks' slots must
// differ). Requests above kScratchMaxBytes are allocated per call (and freed) instead, so a one-off
// huge input does not pin its memory to the thread. Contents are uninitialised.
enum class ScratchSlot : int {
  kCall0, kCall1, kCall2, kCall3, kCall4, kCall5,  // for the whole call (weights, k/v)
  kTask0, kTask1, kTask2, kTask3, kTask4,          // inside parallel tasks
  kCount
};
constexpr size_t kScratchMaxBytes = size_t(16) << 20;

struct ScratchPool {
  struct Buf {
    void* p = nullptr;
    size_t bytes = 0;
  };
  Buf buf[static_cast<int>(ScratchSlot::kCount)];
  ScratchPool() = default;
  ScratchPool(const ScratchPool&) = delete;
  ScratchPool& operator=(const ScratchPool&) = delete;
  ~ScratchPool() {
    for (Buf& b : buf) std::free(b.p);
  }
  // The thread's buffer for `slot`, at least `bytes` long (64-byte aligned).
  static void* get(ScratchSlot slot, size_t bytes) {
    thread_local ScratchPool pool;
    Buf& b = pool.buf[static_cast<int>(slot)];
    if (b.bytes < bytes) {
      std::free(b.p);
      b.p = nullptr;
      b.bytes = 0;
      const size_t rounded = (bytes + 65535) / 65536 * 65536;
      b.p = std::aligned_alloc(64, rounded);
      if (b.p == nullptr) throw std::bad_alloc();
      b.bytes = rounded;
    }
    return b.p;
  }
};

// n uninitialised values of a trivial type T: the thread's buffer for `slot`, or an owned
// allocation when n * sizeof(T) > kScratchMaxBytes. Valid until the next Scratch of the same slot
// on the same thread.
template <typename T>
class Scratch {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_default_constructible_v<T>);

 public:
  Scratch(ScratchSlot slot, int64_t n) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    if (bytes > kScratchMaxBytes) {
      own_.reset(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
      p_ = own_.get();
    } else {
      p_ = static_cast<T*>(ScratchPool::get(slot, bytes));
    }
  }
  T* data() const { return p_; }
  T& operator[](int64_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
  std::unique_ptr<T[]> own_;
};

// The constant right-hand side B = W^T (T x cols) of the products x . W^T with a linear layer's
// weight W (cols x T, any dtype and strides), multiplied by many row blocks. For float32 with the
// AVX2 kernels it is kept only as 16-column panels (each T x 16 contiguous, the last one
// zero-padded), filled straight from W's rows: no transposed copy of W is made, and the products
// skip the per-call packing. Otherwise it is kept as the plain row-major W^T. linear() gives the
// same bits either way. The storage is the calling thread's scratch `slot` (see Scratch); big
// matrices are packed by all threads.
template <typename T>
struct PackedMatrix {
  int64_t steps = 0, cols = 0;
  bool packed = false;  // 16-column panels (float32 + AVX2), else plain W^T (steps x cols)
  Scratch<T> store;

  PackedMatrix(const at::Tensor& weight, ScratchSlot slot)
      : steps(weight.size(1)),
        cols(weight.size(0)),
        packed(std::is_same_v<T, float> && Float32Kernels::get().gemm_packed != nullptr),
        store(slot, packed ? (cols + 15) / 16 * 16 * weight.size(1) : weight.numel()) {
    // W (cols x steps) as contiguous T: the weight itself when it already is (no copy).
    const at::Tensor w = weight.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* src = w.const_data_ptr<T>();
    T* dst = store.data();
    // One task per 16-column panel (or per 16 columns of the plain layout); in parallel only when
    // the matrix is big enough to pay for waking the threads.
    const int64_t ntask = (cols + 15) / 16;
    const auto fill = [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t o0 = p * 16, o1 = std::min<int64_t>(cols, o0 + 16);
        if (packed) {  // W's row o is column o % 16 of panel o / 16
          T* panel = dst + p * steps * 16;
          if (o1 - o0 == 16) {  // a whole panel: the transpose of W's 16 rows, in 8 x 8 blocks
            transpose(src + o0 * steps, steps, 16, steps, panel, 16);
            continue;
          }
          for (int64_t i = 0; i < steps; ++i) {
            T* d = panel + i * 16;
            for (int64_t o = o0; o < o1; ++o) d[o - o0] = src[o * steps + i];
            for (int64_t o = o1; o < o0 + 16; ++o) d[o - o0] = T(0);  // padding of the last panel
          }
        } else {
          for (int64_t i = 0; i < steps; ++i) {
            for (int64_t o = o0; o < o1; ++o) dst[i * cols + o] = src[o * steps + i];
          }
        }
      }
    };
    if (cols * steps >= 65536) {
      parallel_for(0, ntask, 1, fill);
    } else {
      fill(0, ntask);
    }
  }
  // C[r, :] = act(bias + sum_t A[r, t] B[t, :]) for r < rows (A row stride lda, C row stride
  // ldc): a linear layer, bias (cols,) or nullptr, act GELU if gelu else the identity. The packed
  // kernel starts its sums from the bias and applies GELU as it stores them (no passes over C
  // before and after); the other builds do those passes. Both give the bits of the bias copy + accumulate + gelu_inplace sequence.
  void linear(const T* A, int64_t lda, T* C, int64_t ldc, int64_t rows, const T* bias,
              bool gelu) const {
    if constexpr (std::is_same_v<T, float>) {
      if (packed) {
        Float32Kernels::get().gemm_packed(A, lda, store.data(), C, ldc, rows, steps, cols, bias,
                                          gelu);
        return;
      }
    }
    if (bias != nullptr) {
      for (int64_t r = 0; r < rows; ++r) std::copy(bias, bias + cols, C + r * ldc);
    }
    gemm_nn(A, lda, store.data(), cols, C, ldc, rows, steps, cols, bias != nullptr);
    if (gelu) {
      for (int64_t r = 0; r < rows; ++r) gelu_inplace(C + r * ldc, cols);
    }
  }
};

// Sum of a[i] * b[i] in a fixed order (eight interleaved partial sums, then combined): the same
// inputs always give the same bits.
template <typename T>
inline T row_dot(const T* a, const T* b, int64_t n) {
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  }
  for (; i < n; ++i) part[0] += a[i] * b[i];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

}  // namespace
}  // namespace paca_kernels
