// The portable float32/float64 kernels: plain C++ that the compiler auto-vectorises for the ISA of
// the translation unit including it (axpy-shaped loops, no floating-point reductions to reassociate
// without -ffast-math). The baseline float32 build (kernels_baseline.cpp) and every float64 path
// (the op files, through kernels.h) use them. Baseline translation units only: see the ODR rule in
// dispatch.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PACA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PACA_ALWAYS_INLINE inline
#endif

namespace paca_kernels::cpu {

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

// The same on GCC vectors of any width V (VI: the int32 vector of the same lane count): exp_v8
// below, and the 16-lane AVX-512 clone of the MLP backward (mlp_dwconv_bwd.cpp).
template <typename V, typename VI>
PACA_ALWAYS_INLINE V exp_vec(V x) {
  const V lo = V{} + -87.3365f;  // exp(lo) ~ FLT_MIN: the exponent k stays >= -126
  const V hi = V{} + 88.3762f;   // k stays <= 127
  const V rnd = V{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to integer
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V kf = (xc * 1.44269504088896341f + rnd) - rnd;
  const V r = (xc - kf * 0.693359375f) - kf * -2.12194440e-4f;  // ln 2 split in two
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI k = __builtin_convertvector(kf, VI);
  const V y = p * reinterpret_cast<V>((k + 127) << 23);  // p * 2^k
  const V z = x < lo ? V{} : y;
  return x != x ? x : z;
}

PACA_ALWAYS_INLINE v8f exp_v8(v8f x) { return exp_vec<v8f, v8i>(x); }

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
// out[r, i] = exp(in[r, i] - shift[i]) * scale[i] (exp_shifted_cols in kernels.h): each element
// the exp of exp_shifted_impl (exp_v8 lane by lane) times its column's scale; with ds, also
// grad[r, i] = out[r, i] * (ds[r, i] - rd[i]).
PACA_ALWAYS_INLINE void exp_shifted_cols_impl(const float* in, int64_t ldi, int64_t rows, int64_t n,
                                              const float* shift, const float* scale, float* out,
                                              int64_t ldo, const float* ds, int64_t ldd,
                                              const float* rd, float* grad, int64_t ldg) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = in + r * ldi;
    float* o = out + r * ldo;
    for (int64_t i = 0; i < n; i += 8) {
      const int64_t w = n - i < 8 ? n - i : 8;
      v8f v = v8f{};
      for (int64_t j = 0; j < w; ++j) v[j] = a[i + j] - shift[i + j];
      v = exp_v8(v);
      for (int64_t j = 0; j < w; ++j) o[i + j] = v[j] * scale[i + j];
    }
    if (ds != nullptr) {
      const float* d = ds + r * ldd;
      float* g = grad + r * ldg;
      for (int64_t i = 0; i < n; ++i) g[i] = o[i] * (d[i] - rd[i]);
    }
  }
}
#pragma GCC diagnostic pop
#else
PACA_ALWAYS_INLINE float exp_shifted_impl(const float* in, float shift, float* out, int64_t n) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += (out[i] = std::exp(in[i] - shift));
  return sum;
}
PACA_ALWAYS_INLINE void exp_shifted_cols_impl(const float* in, int64_t ldi, int64_t rows, int64_t n,
                                              const float* shift, const float* scale, float* out,
                                              int64_t ldo, const float* ds, int64_t ldd,
                                              const float* rd, float* grad, int64_t ldg) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      out[r * ldo + i] = std::exp(in[r * ldi + i] - shift[i]) * scale[i];
      if (ds != nullptr) grad[r * ldg + i] = out[r * ldo + i] * (ds[r * ldd + i] - rd[i]);
    }
  }
}
#endif

PACA_ALWAYS_INLINE void exp_shifted_cols_impl(const double* in, int64_t ldi, int64_t rows,
                                              int64_t n, const double* shift, const double* scale,
                                              double* out, int64_t ldo, const double* ds,
                                              int64_t ldd, const double* rd, double* grad,
                                              int64_t ldg) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      out[r * ldo + i] = std::exp(in[r * ldi + i] - shift[i]) * scale[i];
      if (ds != nullptr) grad[r * ldg + i] = out[r * ldo + i] * (ds[r * ldd + i] - rd[i]);
    }
  }
}

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

// The softmax numerators of rows r < rows (row r at s + r * lds), in place: mx[r] = row_max,
// s[r, i] = exp(s[r, i] - mx[r]), sum[r] their sum (exp_minus_row_max_rows in kernels.h).
template <typename T>
PACA_ALWAYS_INLINE void exp_minus_row_max_rows_impl(T* s, int64_t lds, int64_t rows, int64_t n,
                                                    T* mx, T* sum) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = s + r * lds;
    mx[r] = row_max_impl(row, n);
    sum[r] = exp_shifted_impl(row, mx[r], row, n);
  }
}

// The softmax backward of one attention row from its softmax numerators (softmax_bwd_saved_rows
// in kernels.h): e = exp(s - max s) (n) and their sum as exp_shifted_impl gave them; p receives
// P = e / sum (p == e allowed), ds holds dP on entry and dS = P o (dP - D) on return,
// D = sum(e o dP) / sum in eight partial sums combined in a fixed order. A one-hot row (e = 1 at
// j, 0 elsewhere) gives dS = 0 exactly: sum = 1, D = dP_j.
template <typename T>
PACA_ALWAYS_INLINE void softmax_bwd_saved_row_impl(const T* e, T sum, T* p, T* ds, int64_t n) {
  const T inv = T(1) / sum;
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) part[i % 8] += e[i] * ds[i];
  const T d =
      (((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]))) * inv;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = e[i] * inv;
    ds[i] = p[i] * (ds[i] - d);
  }
}

// The softmax of one attention row and its backward, in place (softmax_bwd_rows in kernels.h):
// p holds the scores s on entry, P = exp(s - max s) / sum on return; ds holds dP on entry,
// dS = P o (dP - D) on return, D = sum(P o dP). The exponentials and their sum come from
// exp_shifted_impl, as the forward's (the same P), then softmax_bwd_saved_row_impl.
template <typename T>
PACA_ALWAYS_INLINE void softmax_bwd_row_impl(T* p, T* ds, int64_t n) {
  const T sum = exp_shifted_impl(p, row_max_impl(p, n), p, n);
  softmax_bwd_saved_row_impl(p, sum, p, ds, n);
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

}  // namespace paca_kernels::cpu
