// The float32 / float64 front ends of the CPU kernels: float32 goes through the kernels dispatched
// for this CPU (dispatch.h), float64 (the gradcheck and reference-precision path) through the
// portable templates (portable.h, gelu.h). Baseline translation units only (ODR rule in dispatch.h).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "cpu/math/dispatch.h"
#include "cpu/math/gelu.h"
#include "cpu/math/layernorm.h"
#include "cpu/math/portable.h"

namespace paca_kernels::cpu {

// The float32 kernels for this CPU, chosen once (cpuid) on first use: see select_float32_kernels.
inline const Float32Kernels& float32_kernels() {
  static const Float32Kernels k = select_float32_kernels();
  return k;
}

inline void gemm_nn(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                    int64_t ldc, int64_t rows, int64_t K, int64_t cols, bool accumulate) {
  float32_kernels().gemm_nn(A, lda, B, ldb, C, ldc, rows, K, cols, accumulate);
}
inline void gemm_nn(const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                    int64_t ldc, int64_t rows, int64_t K, int64_t cols, bool accumulate) {
  gemm_nn_impl<double>(A, lda, B, ldb, C, ldc, rows, K, cols, accumulate);
}
inline void gemm_tn_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                        int64_t ldc, int64_t rows, int64_t K, int64_t cols) {
  float32_kernels().gemm_tn_acc(A, lda, B, ldb, C, ldc, rows, K, cols);
}
inline void gemm_tn_acc(const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                        int64_t ldc, int64_t rows, int64_t K, int64_t cols) {
  gemm_tn_acc_impl<double>(A, lda, B, ldb, C, ldc, rows, K, cols);
}
// out[i] = exp(in[i] - shift) for i < n (in == out allowed); returns the sum of the out[i].
inline float exp_shifted(const float* in, float shift, float* out, int64_t n) {
  return float32_kernels().exp_shifted(in, shift, out, n);
}
inline double exp_shifted(const double* in, double shift, double* out, int64_t n) {
  return exp_shifted_impl(in, shift, out, n);
}
// out[r, i] = exp(in[r, i] - shift[i]) * scale[i] for rows r < rows of n values (row r at
// in + r * ldi, out + r * ldo): each element the exp exp_shifted computes and the same product.
// With ds (row r at ds + r * ldd), also the softmax backward in the same pass: grad[r, i] =
// out[r, i] * (ds[r, i] - rd[i]) (row r at grad + r * ldg).
inline void exp_shifted_cols(const float* in, int64_t ldi, int64_t rows, int64_t n,
                             const float* shift, const float* scale, float* out, int64_t ldo,
                             const float* ds = nullptr, int64_t ldd = 0,
                             const float* rd = nullptr, float* grad = nullptr, int64_t ldg = 0) {
  float32_kernels().exp_shifted_cols(in, ldi, rows, n, shift, scale, out, ldo, ds, ldd, rd, grad,
                                     ldg);
}
inline void exp_shifted_cols(const double* in, int64_t ldi, int64_t rows, int64_t n,
                             const double* shift, const double* scale, double* out, int64_t ldo,
                             const double* ds = nullptr, int64_t ldd = 0,
                             const double* rd = nullptr, double* grad = nullptr, int64_t ldg = 0) {
  exp_shifted_cols_impl(in, ldi, rows, n, shift, scale, out, ldo, ds, ldd, rd, grad, ldg);
}
// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols.
inline void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                      int64_t ldd) {
  float32_kernels().transpose(src, lds, rows, cols, dst, ldd);
}
inline void transpose(const double* src, int64_t lds, int64_t rows, int64_t cols, double* dst,
                      int64_t ldd) {
  transpose_impl(src, lds, rows, cols, dst, ldd);
}
// The softmax numerators of rows r < rows of n values (row r at s + r * lds), in place:
// s[r, i] = exp(s[r, i] - mx[r]) with mx[r] the row's maximum (NaN entries skipped), and sum[r]
// the sum of its exponentials: exp_minus_row_max (softmax.h) of each row, the same bits. An all
// -inf (or +inf/NaN) row gives NaN.
inline void exp_minus_row_max_rows(float* s, int64_t lds, int64_t rows, int64_t n, float* mx,
                                   float* sum) {
  float32_kernels().exp_minus_row_max_rows(s, lds, rows, n, mx, sum);
}
inline void exp_minus_row_max_rows(double* s, int64_t lds, int64_t rows, int64_t n, double* mx,
                                   double* sum) {
  exp_minus_row_max_rows_impl(s, lds, rows, n, mx, sum);
}
// Attention rows' softmax and its backward, in place, for rows r < rows (p[r] at p + r * ldp,
// ds[r] at ds + r * ldd): p holds the scores s (n) on entry and P = softmax(s) on return (an all
// -inf, +inf or NaN row gives NaN, as torch.softmax does); ds holds dP = dO.v^T on entry and
// dS = P o (dP - rowsum(P o dP)) on return (the rank-one part from the same P and dP it
// multiplies, so a one-hot row gives dS = 0 exactly). The sums in a fixed order per row.
inline void softmax_bwd_rows(float* p, int64_t ldp, float* ds, int64_t ldd, int64_t rows,
                             int64_t n) {
  float32_kernels().softmax_bwd_rows(p, ldp, ds, ldd, rows, n);
}
inline void softmax_bwd_rows(double* p, int64_t ldp, double* ds, int64_t ldd, int64_t rows,
                             int64_t n) {
  for (int64_t r = 0; r < rows; ++r) softmax_bwd_row_impl(p + r * ldp, ds + r * ldd, n);
}
// softmax_bwd_rows from the forward's softmax numerators instead of the scores: e[r] (at
// e + r * lde) and sum[r] as exp_minus_row_max_rows left them; P = e / sum is written to p (p may
// be e) and ds goes from dP to dS. The same bits as softmax_bwd_rows on the scores e came from.
inline void softmax_bwd_saved_rows(const float* e, int64_t lde, const float* sum, float* p,
                                   int64_t ldp, float* ds, int64_t ldd, int64_t rows, int64_t n) {
  float32_kernels().softmax_bwd_saved_rows(e, lde, sum, p, ldp, ds, ldd, rows, n);
}
inline void softmax_bwd_saved_rows(const double* e, int64_t lde, const double* sum, double* p,
                                   int64_t ldp, double* ds, int64_t ldd, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    softmax_bwd_saved_row_impl(e + r * lde, sum[r], p + r * ldp, ds + r * ldd, n);
  }
}
// x[i] = GELU(x[i]) (exact erf form) for i < n.
inline void gelu_inplace(float* x, int64_t n) { float32_kernels().gelu(x, n); }
// Maximum of n values; NaN entries are skipped (they propagate through the exp instead).
inline float row_max(const float* x, int64_t n) { return float32_kernels().row_max(x, n); }
inline double row_max(const double* x, int64_t n) { return row_max_impl(x, n); }

// y[r, :] = LayerNorm(x[r, :]) * w + b for rows r < rows of n values (dispatch.h, layer_norm_rows;
// w, b optional): float32 through the dispatched kernels, float64 through the portable statistics.
inline void layer_norm_rows(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows,
                            int64_t n, const float* w, const float* b, float eps) {
  float32_kernels().layer_norm_rows(x, ldx, y, ldy, rows, n, w, b, eps, layer_norm_min_exp(eps));
}
inline void layer_norm_rows(const double* x, int64_t ldx, double* y, int64_t ldy, int64_t rows,
                            int64_t n, const double* w, const double* b, double eps) {
  layer_norm_rows_impl(x, ldx, y, ldy, rows, n, w, b, eps);
}

// dst[i] = D(src[i]) for i < n, with static_cast's bits: bf16 <-> float32 through the dispatched
// conversions (vectorised in the AVX-512 build: the fused kernels' bf16 inputs and outputs),
// anything else element by element.
template <typename S, typename D>
inline void convert_row(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<D, float>) {
    float32_kernels().bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else if constexpr (std::is_same_v<S, float> && std::is_same_v<D, c10::BFloat16>) {
    float32_kernels().f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<D>(src[i]);
  }
}

// p[i] = p[i] rounded to T (bf16 or fp16, to nearest even) and back, for i < n: the value a module
// in T would hand on. bf16 through the dispatched conversions (the op files are compiled for the
// baseline ISA, where an element loop of c10::BFloat16 conversions is slow) with tmp (n values).
template <typename T>
inline void round_through(float* p, int64_t n, c10::BFloat16* tmp) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    convert_row(p, tmp, n);
    convert_row(tmp, p, n);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(static_cast<T>(p[i]));
  }
}

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

}  // namespace paca_kernels::cpu
