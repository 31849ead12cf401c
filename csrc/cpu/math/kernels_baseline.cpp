// The baseline float32 build of the kernels (see dispatch.h): the portable templates, compiled
// without ISA flags, so that it runs on any x86-64 (SSE2) CPU or another architecture.
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cpu/math/dispatch.h"
#include "cpu/math/dwconv.h"
#include "cpu/math/gelu.h"
#include "cpu/math/layernorm.h"
#include "cpu/math/portable.h"

#if defined(__GNUC__)
// exp_v8 and gelu_v8 (portable.h, gelu.h) pass 32-byte GCC vectors; they are always inlined, so
// the ABI note about passing them without AVX never applies.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace paca_kernels::cpu::baseline {
namespace {

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
void exp_shifted_cols_f32_base(const float* in, int64_t ldi, int64_t rows, int64_t n,
                               const float* shift, const float* scale, float* out, int64_t ldo,
                               const float* ds, int64_t ldd, const float* rd, float* grad,
                               int64_t ldg) {
  exp_shifted_cols_impl(in, ldi, rows, n, shift, scale, out, ldo, ds, ldd, rd, grad, ldg);
}
float row_max_f32_base(const float* x, int64_t n) { return row_max_impl(x, n); }
void exp_minus_row_max_rows_f32_base(float* s, int64_t lds, int64_t rows, int64_t n, float* mx,
                                     float* sum) {
  exp_minus_row_max_rows_impl(s, lds, rows, n, mx, sum);
}
void softmax_bwd_rows_f32_base(float* p, int64_t ldp, float* ds, int64_t ldd, int64_t rows,
                               int64_t n) {
  for (int64_t r = 0; r < rows; ++r) softmax_bwd_row_impl(p + r * ldp, ds + r * ldd, n);
}
void softmax_bwd_saved_rows_f32_base(const float* e, int64_t lde, const float* sum, float* p,
                                     int64_t ldp, float* ds, int64_t ldd, int64_t rows,
                                     int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    softmax_bwd_saved_row_impl(e + r * lde, sum[r], p + r * ldp, ds + r * ldd, n);
  }
}
void gelu_f32_base(float* x, int64_t n) { gelu_impl(x, n); }
void transpose_f32_base(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                        int64_t ldd) {
  transpose_impl(src, lds, rows, cols, dst, ldd);
}
void dwconv_band_f32_base(const float* in, int64_t in_w, const float* wt, const float* bias,
                          float* out, int64_t rows, int64_t W, int64_t C, int64_t k) {
  dwconv_band_impl(in, in_w, wt, bias, out, rows, W, C, k);
}

void layer_norm_rows_f32_base(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows,
                              int64_t n, const float* w, const float* b, float eps, int) {
  layer_norm_rows_impl(x, ldx, y, ldy, rows, n, w, b, eps);
}

void bf16_to_f32_base(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(c10::BFloat16(src[i], c10::BFloat16::from_bits()));
}
void f32_to_bf16_base(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]).x;
}

}  // namespace

void register_kernels(Float32Kernels& k) {
  k.isa = "baseline";
  k.gemm_nn = gemm_nn_f32_base;
  k.gemm_tn_acc = gemm_tn_acc_f32_base;
  k.exp_shifted = exp_shifted_f32_base;
  k.exp_shifted_cols = exp_shifted_cols_f32_base;
  k.row_max = row_max_f32_base;
  k.exp_minus_row_max_rows = exp_minus_row_max_rows_f32_base;
  k.softmax_bwd_rows = softmax_bwd_rows_f32_base;
  k.softmax_bwd_saved_rows = softmax_bwd_saved_rows_f32_base;
  k.gemm_packed = nullptr;
  k.transpose = transpose_f32_base;
  k.gelu = gelu_f32_base;
  k.dwconv_band = dwconv_band_f32_base;
  k.dwconv_direct = nullptr;
  k.layer_norm_rows = layer_norm_rows_f32_base;
  k.bf16_to_f32 = bf16_to_f32_base;
  k.f32_to_bf16 = f32_to_bf16_base;
}

}  // namespace paca_kernels::cpu::baseline
