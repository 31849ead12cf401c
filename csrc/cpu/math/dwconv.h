// Depthwise k x k convolution over channels-last image rows, shared by the clustering head
// (fused/conv_cluster_logits.cpp) and the MLP ops (fused/mlp_dwconv.cpp, fused/mlp_fused.cpp):
// the portable templates (float64, and float32 in the baseline build) and the front ends that send
// float32 to the kernels dispatched for this CPU (kernels_avx2.cpp, kernels_avx512.cpp). Baseline
// translation units only (ODR rule in dispatch.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/math/kernels.h"
#include "cpu/math/portable.h"

namespace paca_kernels::cpu {

// ---- depthwise k x k convolution of one band of rows -------------------------------------------
//
// out[r, j, :] = bias + sum_{ky, kx} in[r + ky, j + kx, :] * wt[ky * k + kx, :], with `in` the
// zero-padded band ((rows + k - 1) x (W + k - 1) x C) and wt the taps transposed to (k*k, C), so
// the inner loop is a contiguous multiply-add over channels (vectorised).
template <typename T>
PACA_ALWAYS_INLINE void dwconv_band_impl(const T* in, int64_t in_w, const T* wt, const T* bias,
                                         T* out, int64_t rows, int64_t W, int64_t C, int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < W; ++j) {
      T* o = out + (r * W + j) * C;
      for (int64_t c = 0; c < C; ++c) o[c] = bias ? bias[c] : T(0);
      for (int64_t ky = 0; ky < k; ++ky) {
        const T* irow = in + ((r + ky) * in_w + j) * C;
        const T* wrow = wt + ky * k * C;
        for (int64_t kx = 0; kx < k; ++kx) {
          const T* iv = irow + kx * C;
          const T* wv = wrow + kx * C;
          for (int64_t c = 0; c < C; ++c) o[c] += iv[c] * wv[c];
        }
      }
    }
  }
}

// The same convolution read straight from the image (no padded copy): pixel (y, j) at
// img[((y - y_base)*W + j)*px] (channels contiguous), each pixel's window clipped to the image, so
// the sums are those of the padded band without its exact-zero terms. u = x + in_bias is
// convolved when in_bias is given (the zero padding stays unbiased). The portable counterpart of
// dwconv_direct_f32_avx2 (kernels_avx2.cpp) (float64, and float32 in the baseline build), GELU left to the caller.
template <typename T>
void dwconv_rows_impl(const T* img, int64_t px, int64_t y_base, int64_t H, int64_t W, int64_t y0,
                      int64_t rows, const T* wt, const T* bias, const T* in_bias, T* out,
                      int64_t C, int64_t k) {
  const int64_t pad = (k - 1) / 2;
  std::vector<T> u(static_cast<size_t>(C));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = y0 + r;
    const int64_t ky0 = std::max<int64_t>(0, pad - y), ky1 = std::min<int64_t>(k, H + pad - y);
    for (int64_t j = 0; j < W; ++j) {
      const int64_t kx0 = std::max<int64_t>(0, pad - j), kx1 = std::min<int64_t>(k, W + pad - j);
      T* o = out + (r * W + j) * C;
      for (int64_t c = 0; c < C; ++c) o[c] = bias ? bias[c] : T(0);
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        for (int64_t kx = kx0; kx < kx1; ++kx) {
          const T* iv = img + ((y - pad + ky - y_base) * W + (j - pad + kx)) * px;
          const T* wv = wt + (ky * k + kx) * C;
          if (in_bias != nullptr) {
            for (int64_t c = 0; c < C; ++c) u[c] = iv[c] + in_bias[c];
            iv = u.data();
          }
          for (int64_t c = 0; c < C; ++c) o[c] += iv[c] * wv[c];
        }
      }
    }
  }
}

inline void dwconv_band(const float* in, int64_t in_w, const float* wt, const float* bias,
                        float* out, int64_t rows, int64_t W, int64_t C, int64_t k) {
  float32_kernels().dwconv_band(in, in_w, wt, bias, out, rows, W, C, k);
}
inline void dwconv_band(const double* in, int64_t in_w, const double* wt, const double* bias,
                        double* out, int64_t rows, int64_t W, int64_t C, int64_t k) {
  dwconv_band_impl(in, in_w, wt, bias, out, rows, W, C, k);
}

// Depthwise convolution of image rows y0 .. y0 + rows - 1 read in place (see dwconv_rows_impl),
// GELU applied if `gelu`: the vector kernel for float32 where available (`cached`: whether img's
// rows are in cache already, DwDirectFn in dispatch.h; the results do not depend on it).
inline void dwconv_rows(const float* img, int64_t px, int64_t y_base, int64_t H, int64_t W,
                        int64_t y0, int64_t rows, const float* wt, const float* bias,
                        const float* in_bias, bool gelu, float* out, int64_t C, int64_t k,
                        bool cached) {
  if (const DwDirectFn direct = float32_kernels().dwconv_direct) {
    direct(img, px, y_base, H, W, y0, rows, wt, bias, in_bias, gelu, out, C, k, cached);
    return;
  }
  dwconv_rows_impl(img, px, y_base, H, W, y0, rows, wt, bias, in_bias, out, C, k);
  if (gelu) gelu_inplace(out, rows * W * C);
}
inline void dwconv_rows(const double* img, int64_t px, int64_t y_base, int64_t H, int64_t W,
                        int64_t y0, int64_t rows, const double* wt, const double* bias,
                        const double* in_bias, bool gelu, double* out, int64_t C, int64_t k,
                        bool /*cached*/) {
  dwconv_rows_impl(img, px, y_base, H, W, y0, rows, wt, bias, in_bias, out, C, k);
  if (gelu) gelu_inplace(out, rows * W * C);
}

}  // namespace paca_kernels::cpu
