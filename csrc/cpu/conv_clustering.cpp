// CPU kernel of paca_kernels::conv_cluster_logits: the official convolutional clustering head
// (P2CConv2d) in one pass, for inference (schema and semantics: csrc/registration.cpp).
//
//   t0 = GELU(depthwise_kxk(x) + dw_bias)        x read as the (H, W, C) image it already is
//   t1 = GELU(t0 . W1^T + b1)                    the first 1x1 conv, C -> C
//   logits = t1 . W2^T (+ b2)                    the second 1x1 conv, C -> M, stored (B, M, N)
//
// The unfused PyTorch head writes and re-reads three (B, C, H, W) intermediates, runs GELU as two
// separate passes and hands MKL 1x1 convolutions with a short reduction (K = C = 96 at stage 1),
// where its tiles are load/store bound. Here each task takes a band of image rows (a tile of about
// 256 patches plus its (k-1)/2-row halo), keeps t0/t1 in cache, applies GELU in registers and
// feeds the register-blocked products of cpu_math.h. Everything accumulates in float32 (float64
// for float64 inputs), also for half/bfloat16 inputs, which the unfused path rounds after every op.
// The result does not depend on the thread count (each logit is computed by exactly one task, in a
// fixed order).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "common/check.h"
#include "cpu/cpu_math.h"
#include "cpu/cpu_ops.h"

namespace paca_kernels {
namespace {

constexpr const char* kOp = "paca_kernels::conv_cluster_logits";
// Patches per task (a band of whole image rows): t0, t1 (tile x C) and the logits tile (tile x M)
// stay in L2 between the three stages.
constexpr int64_t kTilePatches = 256;

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
// dwconv_direct_avx2 (float64, and float32 in the baseline build), GELU left to the caller.
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

using DwFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t,
                      int64_t, int64_t);
using DwDirectFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            const float*, const float*, const float*, bool, float*, int64_t,
                            int64_t);

void dwconv_band_f32_base(const float* in, int64_t in_w, const float* wt, const float* bias,
                          float* out, int64_t rows, int64_t W, int64_t C, int64_t k) {
  dwconv_band_impl(in, in_w, wt, bias, out, rows, W, C, k);
}

#if PACA_X86_DISPATCH

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
PACA_TARGET_AVX2 PACA_ALWAYS_INLINE void dw_tile_avx2(const float* in, int64_t in_row,
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
PACA_TARGET_AVX2 PACA_ALWAYS_INLINE void dw_pixels_avx2(const float* in, int64_t in_row,
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

PACA_TARGET_AVX2 void dwconv_band_f32_avx2(const float* in, int64_t in_w, const float* wt,
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
PACA_TARGET_AVX2 PACA_ALWAYS_INLINE void dw_slide_avx2(const float* in, int64_t in_row,
                                                       int64_t in_px, const float* wt,
                                                       int64_t nky, int ilo, int ihi,
                                                       const float* bias, const float* in_bias,
                                                       bool gelu, float* out, int64_t C,
                                                       __m256i mask) {
  constexpr int kPad = (K - 1) / 2;
  const auto load = [mask](const float* p) PACA_TARGET_AVX2 {
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
// that tap row's weights, out the row's first output (pixel stride C).
template <int K, int P, bool kInBias>
PACA_TARGET_AVX2 void dw_row_slide_avx2(const float* in, int64_t in_row, int64_t in_px,
                                        int64_t W, const float* wt, int64_t nky,
                                        const float* bias, const float* in_bias, bool gelu,
                                        float* out, int64_t C) {
  constexpr int kPad = (K - 1) / 2;
  const auto at = [](const float* p, int64_t c) { return p ? p + c : nullptr; };
  for (int64_t c = 0; c < C; c += 8) {
    const bool masked = C - c < 8;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(C - c)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t j0 = 0; j0 < W; j0 += P) {
      const int64_t j = std::min<int64_t>(j0, W - P);
      // Window inputs i (column j - pad + i) that fall inside the image.
      const int ilo = static_cast<int>(std::max<int64_t>(0, kPad - j));
      const int ihi = static_cast<int>(std::min<int64_t>(P + K - 1, W + kPad - j));
      const float* ip = in + j * in_px + c;
      float* op = out + j * C + c;
      if (masked) {
        dw_slide_avx2<K, P, true, kInBias>(ip, in_row, in_px, wt + c, nky, ilo, ihi, at(bias, c),
                                           at(in_bias, c), gelu, op, C, mask);
      } else {
        dw_slide_avx2<K, P, false, kInBias>(ip, in_row, in_px, wt + c, nky, ilo, ihi, at(bias, c),
                                            at(in_bias, c), gelu, op, C, mask);
      }
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
PACA_TARGET_AVX2 void dwconv_direct_avx2(const float* img, int64_t px, int64_t y_base, int64_t H,
                                         int64_t W, int64_t y0, int64_t rows, const float* wt,
                                         const float* bias, const float* in_bias, bool gelu,
                                         float* out, int64_t C, int64_t k) {
  const int64_t pad = (k - 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = y0 + r;
    const int64_t ky0 = std::max<int64_t>(0, pad - y), ky1 = std::min<int64_t>(k, H + pad - y);
    const int64_t row0 = y - pad + ky0 - y_base;  // first valid tap row, relative to img
    float* orow = out + r * W * C;
    // The common kernel widths slide (7: the clustering head, 3: the MLP's DWConv).
    if (k == 7 && W >= 7) {
      dw_row_slide_avx2<7, 7, kInBias>(img + row0 * W * px, W * px, px, W, wt + ky0 * k * C,
                                       ky1 - ky0, bias, in_bias, gelu, orow, C);
      continue;
    }
    if (k == 5 && W >= 8) {
      dw_row_slide_avx2<5, 8, kInBias>(img + row0 * W * px, W * px, px, W, wt + ky0 * k * C,
                                       ky1 - ky0, bias, in_bias, gelu, orow, C);
      continue;
    }
    if (k == 3 && W >= 8) {
      dw_row_slide_avx2<3, 8, kInBias>(img + row0 * W * px, W * px, px, W, wt + ky0 * k * C,
                                       ky1 - ky0, bias, in_bias, gelu, orow, C);
      continue;
    }
    int64_t j = 0;
    while (j < W) {
      if (j >= pad && j + 4 <= W - pad) {
        dw_pixels_avx2<4, kInBias>(img + (row0 * W + j - pad) * px, W * px, px, wt + ky0 * k * C,
                                   ky1 - ky0, k, k, bias, in_bias, gelu, orow + j * C, C);
        j += 4;
      } else {
        const int64_t kx0 = std::max<int64_t>(0, pad - j), kx1 = std::min<int64_t>(k, W + pad - j);
        dw_pixels_avx2<1, kInBias>(img + (row0 * W + j - pad + kx0) * px, W * px, px,
                                   wt + (ky0 * k + kx0) * C, ky1 - ky0, kx1 - kx0, k, bias,
                                   in_bias, gelu, orow + j * C, C);
        j += 1;
      }
    }
  }
}

PACA_TARGET_AVX2 void dwconv_direct_f32_avx2(const float* img, int64_t px, int64_t y_base,
                                             int64_t H, int64_t W, int64_t y0, int64_t rows,
                                             const float* wt, const float* bias,
                                             const float* in_bias, bool gelu, float* out,
                                             int64_t C, int64_t k) {
  if (in_bias != nullptr) {
    dwconv_direct_avx2<true>(img, px, y_base, H, W, y0, rows, wt, bias, in_bias, gelu, out, C, k);
  } else {
    dwconv_direct_avx2<false>(img, px, y_base, H, W, y0, rows, wt, bias, nullptr, gelu, out, C, k);
  }
}

#endif

struct HeadKernels {
  DwFn dwconv = dwconv_band_f32_base;
  // The unpadded float32 convolution; none in the baseline build (which copies a padded band).
  DwDirectFn dwconv_direct = nullptr;
  static const HeadKernels& get() {
    static const HeadKernels k = [] {
      HeadKernels r;
#if PACA_X86_DISPATCH
      // Same switch as Float32Kernels: the gemm_nn picked there decides whether this CPU and
      // PACA_KERNELS_CPU_ISA allow the AVX2 build.
      if (Float32Kernels::get().gemm_nn != gemm_nn_f32_base) {
        r.dwconv = dwconv_band_f32_avx2;
        r.dwconv_direct = dwconv_direct_f32_avx2;
      }
#endif
      return r;
    }();
    return k;
  }
};

inline void dwconv_band(const float* in, int64_t in_w, const float* wt, const float* bias,
                        float* out, int64_t rows, int64_t W, int64_t C, int64_t k) {
  HeadKernels::get().dwconv(in, in_w, wt, bias, out, rows, W, C, k);
}
inline void dwconv_band(const double* in, int64_t in_w, const double* wt, const double* bias,
                        double* out, int64_t rows, int64_t W, int64_t C, int64_t k) {
  dwconv_band_impl(in, in_w, wt, bias, out, rows, W, C, k);
}

// Depthwise convolution of image rows y0 .. y0 + rows - 1 read in place (see dwconv_rows_impl),
// GELU applied if `gelu`: the AVX2 kernel for float32 where available.
inline void dwconv_rows(const float* img, int64_t px, int64_t y_base, int64_t H, int64_t W,
                        int64_t y0, int64_t rows, const float* wt, const float* bias,
                        const float* in_bias, bool gelu, float* out, int64_t C, int64_t k) {
  if (const DwDirectFn direct = HeadKernels::get().dwconv_direct) {
    direct(img, px, y_base, H, W, y0, rows, wt, bias, in_bias, gelu, out, C, k);
    return;
  }
  dwconv_rows_impl(img, px, y_base, H, W, y0, rows, wt, bias, in_bias, out, C, k);
  if (gelu) gelu_inplace(out, rows * W * C);
}
inline void dwconv_rows(const double* img, int64_t px, int64_t y_base, int64_t H, int64_t W,
                        int64_t y0, int64_t rows, const double* wt, const double* bias,
                        const double* in_bias, bool gelu, double* out, int64_t C, int64_t k) {
  dwconv_rows_impl(img, px, y_base, H, W, y0, rows, wt, bias, in_bias, out, C, k);
  if (gelu) gelu_inplace(out, rows * W * C);
}

// How the B images of an H x W grid are cut into bands of whole rows, one band per task: about
// `tokens` patches per band, halved until there are two bands per thread (small B), then evened
// out (H = 28, 9 rows: 4 x 7 rather than 3 x 9 + 1) so that no task is a sliver. Returns
// {rows per band, bands per image}.
inline std::pair<int64_t, int64_t> row_bands(int64_t B, int64_t H, int64_t W, int64_t tokens) {
  int64_t rows = std::clamp<int64_t>(tokens / W, 1, H);
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  while (rows > 1 && B * ((H + rows - 1) / rows) < want) rows = (rows + 1) / 2;
  const int64_t bands = (H + rows - 1) / rows;
  return {(H + bands - 1) / bands, bands};  // ceil(H / that) is `bands` again
}

// ---- the fused head ---------------------------------------------------------------------------

// The zero-padded band of image rows y0 - pad .. y0 + nr + pad - 1 of image b of x (B, N, C), read
// through its strides, as acc_t ((nr + k - 1) x (W + k - 1) x C): the input of dwconv_band.
//
// in_bias (C,), if given, is added to every pixel inside the image (not to the zero padding): the
// band is then that of x + in_bias, e.g. of a linear layer's output whose bias was left out.
template <typename scalar_t, typename acc_t>
void load_band(const scalar_t* xp, const Strides& sx, int64_t b, int64_t y0, int64_t nr, int64_t H,
               int64_t W, int64_t C, int64_t k, acc_t* band, const acc_t* in_bias = nullptr) {
  const int64_t pad = (k - 1) / 2, in_w = W + k - 1;
  for (int64_t r = 0; r < nr + k - 1; ++r) {
    const int64_t y = y0 - pad + r;
    acc_t* drow = band + r * in_w * C;
    if (y < 0 || y >= H) {
      std::fill(drow, drow + in_w * C, acc_t(0));
      continue;
    }
    std::fill(drow, drow + pad * C, acc_t(0));
    std::fill(drow + (pad + W) * C, drow + in_w * C, acc_t(0));
    acc_t* dst = drow + pad * C;
    const scalar_t* xr = xp + b * sx[0] + y * W * sx[1];
    if (sx[2] == 1 && sx[1] == C) {  // the image row is one contiguous run of W * C values
      for (int64_t i = 0; i < W * C; ++i) dst[i] = static_cast<acc_t>(xr[i]);
    } else if (sx[2] == 1) {
      for (int64_t j = 0; j < W; ++j) {
        for (int64_t c = 0; c < C; ++c) dst[j * C + c] = static_cast<acc_t>(xr[j * sx[1] + c]);
      }
    } else {
      for (int64_t j = 0; j < W; ++j) {
        for (int64_t c = 0; c < C; ++c) dst[j * C + c] = static_cast<acc_t>(xr[j * sx[1] + c * sx[2]]);
      }
    }
    if (in_bias != nullptr) {
      for (int64_t j = 0; j < W; ++j) {
        for (int64_t c = 0; c < C; ++c) dst[j * C + c] += in_bias[c];
      }
    }
  }
}

// The head's parameters as contiguous acc_t: the (C,)-shaped biases, the depthwise weight
// transposed to (k*k, C), and the 1x1 convs' weights (C, C) and (M, C) packed as the right-hand
// sides of the products (C, C) and (C, M).
template <typename acc_t>
struct HeadParams {
  std::vector<acc_t> dw_t, dw_b, b1, b2;
  PackedMatrix<acc_t> w1_t, w2_t;  // (C, C) and (C, M)
  bool has_dw_b = false, has_b2 = false;
  HeadParams(const at::Tensor& w1, const at::Tensor& w2)
      : w1_t(w1, ScratchSlot::kCall0), w2_t(w2, ScratchSlot::kCall1) {}
};

template <typename scalar_t>
void conv_cluster_logits_kernel(const at::Tensor& x, int64_t H, int64_t W, int64_t k,
                                const HeadParams<at::opmath_type<scalar_t>>& prm, int64_t M,
                                at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const Strides sx(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();

  // Rows per band: about kTilePatches patches.
  const auto split = row_bands(B, H, W, kTilePatches);
  const int64_t rows = split.first, bands = split.second;
  const int64_t in_w = W + k - 1;

  // float32 with contiguous channels: the convolution reads x in place and applies the GELU as it
  // stores (AVX2 build); otherwise a zero-padded float32/float64 copy of the band is convolved.
  const DwDirectFn direct = std::is_same_v<scalar_t, float> && sx[2] == 1
                                ? HeadKernels::get().dwconv_direct : nullptr;

  parallel_for(0, B * bands, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> band(ScratchSlot::kTask0, direct ? 0 : (rows + k - 1) * in_w * C),
        t0(ScratchSlot::kTask1, rows * W * C), t1(ScratchSlot::kTask2, rows * W * C),
        lt(ScratchSlot::kTask3, rows * W * M);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / bands, y0 = (task % bands) * rows;
      const int64_t nr = std::min(rows, H - y0), nt = nr * W, n0 = y0 * W;
      const acc_t* dw_b = prm.has_dw_b ? prm.dw_b.data() : nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (direct != nullptr) {
          direct(xp + b * sx[0], sx[1], 0, H, W, y0, nr, prm.dw_t.data(), dw_b, nullptr,
                 /*gelu=*/true, t0.data(), C, k);
        }
      }
      if (direct == nullptr) {
        load_band(xp, sx, b, y0, nr, H, W, C, k, band.data());
        dwconv_band(band.data(), in_w, prm.dw_t.data(), dw_b, t0.data(), nr, W, C, k);
        gelu_inplace(t0.data(), nt * C);
      }
      prm.w1_t.linear(t0.data(), C, t1.data(), C, nt, prm.b1.data(), /*gelu=*/true);
      prm.w2_t.linear(t1.data(), C, lt.data(), M, nt, prm.has_b2 ? prm.b2.data() : nullptr,
                      /*gelu=*/false);
      // (nt, M) tile -> out[b, :, n0 : n0 + nt], per cluster one contiguous run.
      scalar_t* ob = op + b * M * N + n0;
      if constexpr (std::is_same_v<scalar_t, float>) {
        transpose(lt.data(), M, nt, M, ob, N);
      } else {
        // Blocks of 32 patches keep the block's tile rows in L1 while it is read column by column.
        for (int64_t i0 = 0; i0 < nt; i0 += 32) {
          const int64_t i1 = std::min(nt, i0 + 32);
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t i = i0; i < i1; ++i) ob[m * N + i] = static_cast<scalar_t>(lt[i * M + m]);
          }
        }
      }
    }
  });
}

// The argument checks shared by the two conv ops (op: the name their messages start with).

// x (B, N, C) floating tokens of an H x W grid (N = H*W, C > 0) and a depthwise weight
// (channels, 1, k, k) with k odd (channels: C unless given, e.g. the MLP's hidden width); returns k.
int64_t check_grid_and_depthwise(const char* op, const at::Tensor& x, int64_t H, int64_t W,
                                 const at::Tensor& dw, const char* dw_name,
                                 int64_t channels = -1) {
  check_dim(x, 3, op, "x", "(B, N, C)");
  check_supported_float(x, op, "x");
  const int64_t N = x.size(1), C = x.size(2);
  TORCH_CHECK(H > 0 && W > 0 && H * W == N, op, ": expected H * W == N with H, W > 0, got H=", H,
              ", W=", W, ", N=", N);
  TORCH_CHECK(C > 0, op, ": expected C > 0 channels");
  const int64_t ch = channels < 0 ? C : channels;
  TORCH_CHECK(dw.dim() == 4 && dw.size(2) == dw.size(3) && dw.size(2) % 2 == 1, op, ": expected ",
              dw_name, " of shape (", ch, ", 1, k, k) with k odd, got ", dw.sizes());
  const int64_t k = dw.size(2);
  check_param(op, dw, x, {ch, 1, k, k}, dw_name);
  return k;
}

}  // namespace

// Declared in cpu/cpu_ops.h: the layer composite (paca_layer.cpp) calls it directly.
at::Tensor conv_cluster_logits_cpu(const at::Tensor& x, int64_t H, int64_t W,
                                   const at::Tensor& dw_weight,
                                   const std::optional<at::Tensor>& dw_bias, const at::Tensor& w1,
                                   const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                   const std::optional<at::Tensor>& b2) {
  const int64_t k = check_grid_and_depthwise(kOp, x, H, W, dw_weight, "dw_weight");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(w2.dim() == 4, kOp, ": expected w2 of shape (M, C, 1, 1), got ", w2.sizes());
  const int64_t M = w2.size(0);
  check_param(kOp, w1, x, {C, C, 1, 1}, "w1");
  check_param(kOp, w2, x, {M, C, 1, 1}, "w2");
  check_param(kOp, dw_bias, x, {C}, "dw_bias");
  check_param(kOp, b1, x, {C}, "b1");
  check_param(kOp, b2, x, {M}, "b2");

  at::Tensor out = at::empty({B, M, N}, x.options());
  if (B * M == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_cluster_logits",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    HeadParams<acc_t> prm(w1.reshape({C, C}), w2.reshape({M, C}));
    prm.dw_t = transposed<acc_t>(dw_weight.reshape({C, k * k}));
    if (dw_bias) {
      prm.dw_b = to_vector<acc_t>(*dw_bias);
      prm.has_dw_b = true;
    }
    prm.b1 = b1 ? to_vector<acc_t>(*b1) : std::vector<acc_t>(C, acc_t(0));
    if (b2) {
      prm.b2 = to_vector<acc_t>(*b2);
      prm.has_b2 = true;
    }
    conv_cluster_logits_kernel<scalar_t>(x, H, W, k, prm, M, out);
  });
  return out;
}

namespace {

// ---- the MLP's depthwise conv -----------------------------------------------------------------
//
// paca_kernels::mlp_dwconv: y = act(depthwise_kxk(u) + bias [+ u]) with u = x [+ in_bias] on (B, N, C)
// tokens: the DWConv (+ shortcut) and GELU of the PaCa-ViT MLP, and optionally the bias of the fc1
// before it (fc1 then runs as a plain matrix product, without the pass that broadcasts its bias
// into the output). Through PyTorch this is a transpose to NCHW, a
// depthwise convolution on a channels-last-strided input (oneDNN's slowest case: about a quarter of
// PaCa-ViT-Tiny's CPU inference time, for 1 % of its FLOPs), a transpose back, the shortcut add
// and the GELU, each a pass over the 4x-wide hidden activations. Here: one pass per band of image
// rows, with the shortcut folded into the centre tap (w_centre + 1, so it costs nothing) and the
// GELU applied while the band's outputs are in cache.
template <typename scalar_t>
void mlp_dwconv_kernel(const at::Tensor& x, int64_t H, int64_t W, int64_t k,
                       const std::vector<at::opmath_type<scalar_t>>& wt,
                       const at::opmath_type<scalar_t>* bias,
                       const at::opmath_type<scalar_t>* in_bias, bool gelu, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(2);
  const Strides sx(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();  // (B, N, C) contiguous
  // Rows per band: about 128 outputs (the hidden width C is 4x the block width). The band split
  // never changes a result (each output is computed by one task, in a fixed order).
  const auto split = row_bands(B, H, W, 128);
  const int64_t rows = split.first, bands = split.second;
  const int64_t in_w = W + k - 1;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // write the output in place

  // float32 with contiguous channels (AVX2 build): convolve x in place, GELU as the outputs are
  // stored, no padded copy of the band.
  const DwDirectFn direct = std::is_same_v<scalar_t, float> && sx[2] == 1
                                ? HeadKernels::get().dwconv_direct : nullptr;

  parallel_for(0, B * bands, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> band(ScratchSlot::kTask0, direct ? 0 : (rows + k - 1) * in_w * C),
        tmp(ScratchSlot::kTask1, kDirect ? 0 : rows * W * C);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / bands, y0 = (task % bands) * rows;
      const int64_t nr = std::min(rows, H - y0), n0 = y0 * W;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (direct != nullptr) {
          direct(xp + b * sx[0], sx[1], 0, H, W, y0, nr, wt.data(), bias, in_bias, gelu,
                 op + (b * H * W + n0) * C, C, k);
          continue;
        }
      }
      load_band(xp, sx, b, y0, nr, H, W, C, k, band.data(), in_bias);
      acc_t* dst;
      if constexpr (kDirect) {
        dst = op + (b * H * W + n0) * C;
      } else {
        dst = tmp.data();
      }
      dwconv_band(band.data(), in_w, wt.data(), bias, dst, nr, W, C, k);
      if (gelu) gelu_inplace(dst, nr * W * C);
      if constexpr (!kDirect) {
        scalar_t* o = op + (b * H * W + n0) * C;
        for (int64_t i = 0; i < nr * W * C; ++i) o[i] = static_cast<scalar_t>(dst[i]);
      }
    }
  });
}

at::Tensor mlp_dwconv_cpu(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& in_bias, bool shortcut, bool gelu) {
  constexpr const char* kMlpOp = "paca_kernels::mlp_dwconv";
  const int64_t k = check_grid_and_depthwise(kMlpOp, x, H, W, weight, "weight");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_param(kMlpOp, bias, x, {C}, "bias");
  check_param(kMlpOp, in_bias, x, {C}, "in_bias");
  at::Tensor out = at::empty({B, N, C}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_dwconv", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Taps as (k*k, C); the shortcut is the identity tap, added to the centre one.
    std::vector<acc_t> wt = transposed<acc_t>(weight.reshape({C, k * k}));
    if (shortcut) {
      const int64_t centre = (k / 2) * k + k / 2;
      for (int64_t c = 0; c < C; ++c) wt[centre * C + c] += acc_t(1);
    }
    std::vector<acc_t> bv, ibv;
    if (bias) bv = to_vector<acc_t>(*bias);
    if (in_bias) ibv = to_vector<acc_t>(*in_bias);
    mlp_dwconv_kernel<scalar_t>(x, H, W, k, wt, bias ? bv.data() : nullptr,
                                in_bias ? ibv.data() : nullptr, gelu, out);
  });
  return out;
}

// ---- the whole MLP -----------------------------------------------------------------------------
//
// paca_kernels::mlp_fused: out = fc2(act(dwconv(fc1(x)))) for the PaCa-ViT MLP (DWConv with its
// shortcut, act = exact GELU or identity), in inference. The hidden activations are 4x wider than
// the tokens: through PyTorch each of them (fc1's output, the conv's, the GELU's) is a fresh
// tensor of B*N*4C values written to and read back from memory (at PaCa-ViT-Tiny's first stage,
// B = 8: 38.5 MB each, which glibc maps fresh and page-faults in on every call). Here they never
// leave the cache: each task walks down the image rows of its chunk, `nr` output rows at a time,
// computing fc1 for the rows that enter the conv's window (rows already computed for the previous
// step are kept, so a hidden row is computed once per chunk), the conv + GELU for the nr rows, and
// fc2 for them straight into the output. fc1's bias is added as the conv loads its input (so the
// zero padding stays unbiased, as for the module), the shortcut is folded into the centre tap.
// Every output is computed by one task in a fixed order: results do not depend on the thread count.
template <typename scalar_t>
void mlp_fused_kernel(const at::Tensor& x, int64_t H, int64_t W, int64_t k,
                      const PackedMatrix<at::opmath_type<scalar_t>>& w1_t,
                      const at::opmath_type<scalar_t>* b1,
                      const std::vector<at::opmath_type<scalar_t>>& wt,
                      const at::opmath_type<scalar_t>* dw_b, bool gelu,
                      const PackedMatrix<at::opmath_type<scalar_t>>& w2_t,
                      const at::opmath_type<scalar_t>* b2, int64_t Hd, int64_t Co,
                      at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int64_t pad = (k - 1) / 2;
  const Strides sx(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();  // (B, N, Co) contiguous
  // Output rows per step: about 128 tokens, so that the step's hidden rows ((nr + k - 1) x W x 4C)
  // stay in L2. Chunks of rows per task: whole images when there are enough of them for every
  // thread, else halves, quarters... (a chunk boundary costs k - 1 recomputed hidden rows).
  const int64_t nr = std::clamp<int64_t>(128 / W, 1, H);
  int64_t parts = 1;
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  while (B * parts < want && (H + 2 * parts - 1) / (2 * parts) >= nr) parts *= 2;
  const int64_t chunk = (H + parts - 1) / parts;
  constexpr bool kInPlaceA = std::is_same_v<scalar_t, acc_t>;
  const bool x_direct = kInPlaceA && sx[2] == 1;  // fc1 reads x's rows in place
  const int64_t cap = nr + 2 * pad;               // hidden rows held at once

  parallel_for(0, B * parts, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<acc_t> hbuf(ScratchSlot::kTask0, cap * W * Hd), g(ScratchSlot::kTask1, nr * W * Hd),
        xa(ScratchSlot::kTask2, x_direct ? 0 : cap * W * C),
        ob(ScratchSlot::kTask3, kInPlaceA ? 0 : nr * W * Co);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / parts, ya = (task % parts) * chunk;
      const int64_t yb = std::min(H, ya + chunk);
      if (ya >= yb) continue;
      int64_t h_lo = std::max<int64_t>(0, ya - pad), h_hi = h_lo;  // hidden rows in hbuf
      for (int64_t y = ya; y < yb; y += nr) {
        const int64_t rows = std::min(nr, yb - y);
        const int64_t need_lo = std::max<int64_t>(0, y - pad);
        const int64_t need_hi = std::min<int64_t>(H, y + rows + pad);
        if (need_lo > h_lo) {  // drop the rows above the window, keep the overlap
          const int64_t keep = std::max<int64_t>(0, h_hi - need_lo);
          if (keep > 0) {
            std::memmove(hbuf.data(), hbuf.data() + (need_lo - h_lo) * W * Hd,
                         sizeof(acc_t) * keep * W * Hd);
          }
          h_lo = need_lo;
          h_hi = need_lo + keep;
        }
        if (need_hi > h_hi) {  // fc1 (without its bias) for the rows entering the window
          const int64_t nt = (need_hi - h_hi) * W;
          const int64_t n0 = h_hi * W;
          const acc_t* a;
          int64_t lda;
          if (x_direct) {
            if constexpr (kInPlaceA) a = xp + b * sx[0] + n0 * sx[1];
            lda = sx[1];
          } else {
            const scalar_t* xb = xp + b * sx[0] + n0 * sx[1];
            for (int64_t i = 0; i < nt; ++i) {
              for (int64_t c = 0; c < C; ++c) {
                xa[i * C + c] = static_cast<acc_t>(xb[i * sx[1] + c * sx[2]]);
              }
            }
            a = xa.data();
            lda = C;
          }
          w1_t.linear(a, lda, hbuf.data() + (h_hi - h_lo) * W * Hd, Hd, nt, nullptr,
                      /*gelu=*/false);
          h_hi = need_hi;
        }
        dwconv_rows(hbuf.data(), Hd, h_lo, H, W, y, rows, wt.data(), dw_b, b1, gelu, g.data(), Hd,
                    k);
        const int64_t nt = rows * W;
        acc_t* dst;
        if constexpr (kInPlaceA) {
          dst = op + (b * N + y * W) * Co;
        } else {
          dst = ob.data();
        }
        w2_t.linear(g.data(), Hd, dst, Co, nt, b2, /*gelu=*/false);
        if constexpr (!kInPlaceA) {
          scalar_t* o = op + (b * N + y * W) * Co;
          for (int64_t i = 0; i < nt * Co; ++i) o[i] = static_cast<scalar_t>(dst[i]);
        }
      }
    }
  });
}

at::Tensor mlp_fused_cpu(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& fc1_weight,
                         const std::optional<at::Tensor>& fc1_bias, const at::Tensor& dw_weight,
                         const std::optional<at::Tensor>& dw_bias, bool shortcut, bool gelu,
                         const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias) {
  constexpr const char* kMlpOp = "paca_kernels::mlp_fused";
  check_dim(x, 3, kMlpOp, "x", "(B, N, C)");
  const int64_t C = x.size(2);
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.size(1) == C, kMlpOp,
              ": expected fc1_weight of shape (hidden, C) with C = ", C, ", got ",
              fc1_weight.sizes());
  const int64_t Hd = fc1_weight.size(0);
  TORCH_CHECK(fc2_weight.dim() == 2 && fc2_weight.size(1) == Hd, kMlpOp,
              ": expected fc2_weight of shape (out, hidden) with hidden = ", Hd, ", got ",
              fc2_weight.sizes());
  const int64_t Co = fc2_weight.size(0);
  const int64_t k = check_grid_and_depthwise(kMlpOp, x, H, W, dw_weight, "dw_weight", Hd);
  TORCH_CHECK(Hd > 0 && Co > 0, kMlpOp, ": expected hidden and out widths > 0, got ", Hd, " and ",
              Co);
  check_param(kMlpOp, fc1_weight, x, {Hd, C}, "fc1_weight");
  check_param(kMlpOp, fc1_bias, x, {Hd}, "fc1_bias");
  check_param(kMlpOp, dw_bias, x, {Hd}, "dw_bias");
  check_param(kMlpOp, fc2_weight, x, {Co, Hd}, "fc2_weight");
  check_param(kMlpOp, fc2_bias, x, {Co}, "fc2_bias");
  const int64_t B = x.size(0), N = x.size(1);
  at::Tensor out = at::empty({B, N, Co}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PackedMatrix<acc_t> w1_t(fc1_weight, ScratchSlot::kCall0);  // fc1_weight^T (C, hidden)
    const PackedMatrix<acc_t> w2_t(fc2_weight, ScratchSlot::kCall1);  // fc2_weight^T (hidden, out)
    std::vector<acc_t> wt = transposed<acc_t>(dw_weight.reshape({Hd, k * k}));  // (k*k, hidden)
    if (shortcut) {
      const int64_t centre = (k / 2) * k + k / 2;
      for (int64_t c = 0; c < Hd; ++c) wt[centre * Hd + c] += acc_t(1);
    }
    std::vector<acc_t> b1v, dbv, b2v;
    if (fc1_bias) b1v = to_vector<acc_t>(*fc1_bias);
    if (dw_bias) dbv = to_vector<acc_t>(*dw_bias);
    if (fc2_bias) b2v = to_vector<acc_t>(*fc2_bias);
    mlp_fused_kernel<scalar_t>(x, H, W, k, w1_t, fc1_bias ? b1v.data() : nullptr, wt,
                               dw_bias ? dbv.data() : nullptr, gelu, w2_t,
                               fc2_bias ? b2v.data() : nullptr, Hd, Co, out);
  });
  return out;
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("conv_cluster_logits", &paca_kernels::conv_cluster_logits_cpu);
  m.impl("mlp_dwconv", &paca_kernels::mlp_dwconv_cpu);
  m.impl("mlp_fused", &paca_kernels::mlp_fused_cpu);
}
