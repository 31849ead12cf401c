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
#include <vector>

#include "common/check.h"
#include "cpu/cpu_math.h"

namespace paca_kernels {
namespace {

constexpr const char* kOp = "paca_kernels::conv_cluster_logits";
// Patches per task (a band of whole image rows): t0, t1 (tile x C) and the logits tile (tile x M)
// stay in L2 between the three stages.
constexpr int64_t kTilePatches = 256;

// ---- GELU (exact, erf form) -------------------------------------------------------------------
//
// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, below float32's resolution of GELU's
// output), with the vectorised exp of cpu_math.h; PyTorch's vectorised CPU erf uses the same
// approximation. gelu(v) = 0.5 v (1 + erf(v / sqrt 2)).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
PACA_ALWAYS_INLINE v8f gelu_v8(v8f v) {
  const v8f u = v * 0.70710678118654752f;
  const v8f a = u < 0.0f ? -u : u;
  const v8f t = 1.0f / (1.0f + 0.3275911f * a);
  v8f p = v8f{} + 1.061405429f;
  p = p * t + -1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t + -0.284496736f;
  p = p * t + 0.254829592f;
  p = p * t;
  const v8f e = 1.0f - p * exp_v8(-a * a);  // erf(|u|)
  const v8f erf_u = u < 0.0f ? -e : e;
  return 0.5f * v * (1.0f + erf_u);
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

using DwFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t,
                      int64_t, int64_t);
using GeluFn = void (*)(float*, int64_t);

void dwconv_band_f32_base(const float* in, int64_t in_w, const float* wt, const float* bias,
                          float* out, int64_t rows, int64_t W, int64_t C, int64_t k) {
  dwconv_band_impl(in, in_w, wt, bias, out, rows, W, C, k);
}
void gelu_f32_base(float* x, int64_t n) { gelu_impl(x, n); }

#if PACA_X86_DISPATCH
// AVX2+FMA: P output pixels x NV vectors of 8 channels are accumulated in registers over all
// k*k taps (each tap's weight vectors are loaded once and reused for the P pixels), instead of
// reloading and storing the output row for every tap.
template <int P, int NV, bool kMasked>
PACA_TARGET_AVX2 PACA_ALWAYS_INLINE void dw_tile_avx2(const float* in, int64_t in_w,
                                                      const float* wt, const float* bias,
                                                      float* out, int64_t C, int64_t k,
                                                      __m256i mask) {
  __m256 acc[P][NV];
  for (int v = 0; v < NV; ++v) {
    const __m256 b0 = bias == nullptr ? _mm256_setzero_ps()
                      : (kMasked && v == NV - 1) ? _mm256_maskload_ps(bias + 8 * v, mask)
                                                 : _mm256_loadu_ps(bias + 8 * v);
    for (int p = 0; p < P; ++p) acc[p][v] = b0;
  }
  for (int64_t ky = 0; ky < k; ++ky) {
    for (int64_t kx = 0; kx < k; ++kx) {
      const float* wv = wt + (ky * k + kx) * C;
      const float* iv = in + (ky * in_w + kx) * C;
      for (int v = 0; v < NV; ++v) {
        const bool m = kMasked && v == NV - 1;
        const __m256 w = m ? _mm256_maskload_ps(wv + 8 * v, mask) : _mm256_loadu_ps(wv + 8 * v);
        for (int p = 0; p < P; ++p) {
          const float* ip = iv + p * C + 8 * v;
          const __m256 xv = m ? _mm256_maskload_ps(ip, mask) : _mm256_loadu_ps(ip);
          acc[p][v] = _mm256_fmadd_ps(xv, w, acc[p][v]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int v = 0; v < NV; ++v) {
      float* op = out + p * C + 8 * v;
      if (kMasked && v == NV - 1) {
        _mm256_maskstore_ps(op, mask, acc[p][v]);
      } else {
        _mm256_storeu_ps(op, acc[p][v]);
      }
    }
  }
}

// All channel tiles of P adjacent output pixels (16 channels at a time, then a masked edge).
template <int P>
PACA_TARGET_AVX2 PACA_ALWAYS_INLINE void dw_pixels_avx2(const float* in, int64_t in_w,
                                                        const float* wt, const float* bias,
                                                        float* out, int64_t C, int64_t k) {
  const __m256i full = _mm256_set1_epi32(-1);
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    dw_tile_avx2<P, 2, false>(in + c, in_w, wt + c, bias ? bias + c : nullptr, out + c, C, k, full);
  }
  const int64_t rem = C - c;
  if (rem == 0) return;
  const int64_t last = rem > 8 ? rem - 8 : rem;
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(last)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (rem > 8) {
    dw_tile_avx2<P, 2, true>(in + c, in_w, wt + c, bias ? bias + c : nullptr, out + c, C, k, mask);
  } else {
    dw_tile_avx2<P, 1, true>(in + c, in_w, wt + c, bias ? bias + c : nullptr, out + c, C, k, mask);
  }
}

PACA_TARGET_AVX2 void dwconv_band_f32_avx2(const float* in, int64_t in_w, const float* wt,
                                           const float* bias, float* out, int64_t rows,
                                           int64_t W, int64_t C, int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    int64_t j = 0;
    for (; j + 4 <= W; j += 4) {
      dw_pixels_avx2<4>(in + (r * in_w + j) * C, in_w, wt, bias, out + (r * W + j) * C, C, k);
    }
    for (; j < W; ++j) {
      dw_pixels_avx2<1>(in + (r * in_w + j) * C, in_w, wt, bias, out + (r * W + j) * C, C, k);
    }
  }
}
// GELU with FMAs and exp_avx2 (same A&S 7.1.26 erf as gelu_v8).
PACA_TARGET_AVX2 PACA_ALWAYS_INLINE __m256 gelu_avx2(__m256 v) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 u = _mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f));
  const __m256 a = _mm256_andnot_ps(sign, u);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                                 _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 ex = exp_avx2(_mm256_mul_ps(_mm256_xor_ps(a, sign), a));  // exp(-a^2)
  const __m256 e = _mm256_fnmadd_ps(p, ex, _mm256_set1_ps(1.0f));       // erf(|u|)
  const __m256 erf_u = _mm256_or_ps(e, _mm256_and_ps(u, sign));          // erf(u), odd
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
#endif

struct HeadKernels {
  DwFn dwconv = dwconv_band_f32_base;
  GeluFn gelu = gelu_f32_base;
  static const HeadKernels& get() {
    static const HeadKernels k = [] {
      HeadKernels r;
#if PACA_X86_DISPATCH
      // Same switch as Float32Kernels: the gemm_nn picked there decides whether this CPU and
      // PACA_KERNELS_CPU_ISA allow the AVX2 build.
      if (Float32Kernels::get().gemm_nn != gemm_nn_f32_base) {
        r.dwconv = dwconv_band_f32_avx2;
        r.gelu = gelu_f32_avx2;
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
inline void gelu_inplace(float* x, int64_t n) { HeadKernels::get().gelu(x, n); }

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

// The (C,)-, (k*k, C)-, (C, C)- and (C, M)-shaped parameters as contiguous acc_t, transposed so
// that every product reads its right-hand side row by row.
template <typename acc_t>
struct HeadParams {
  std::vector<acc_t> dw_t, dw_b, w1_t, b1, w2_t, b2;
  bool has_dw_b = false, has_b2 = false;
};

template <typename acc_t>
std::vector<acc_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = c.const_data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + c.numel());
}

template <typename acc_t>
std::vector<acc_t> transposed(const at::Tensor& t2d) {
  return to_vector<acc_t>(t2d.t());  // .contiguous() inside to_vector materialises the transpose
}

template <typename scalar_t>
void conv_cluster_logits_kernel(const at::Tensor& x, int64_t H, int64_t W, int64_t k,
                                const HeadParams<at::opmath_type<scalar_t>>& prm, int64_t M,
                                at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const Strides sx(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();

  // Rows per band: about kTilePatches patches, but enough bands for every thread when B is small.
  int64_t rows = std::clamp<int64_t>(kTilePatches / W, 1, H);
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  while (rows > 1 && B * ((H + rows - 1) / rows) < want) rows = (rows + 1) / 2;
  const int64_t bands = (H + rows - 1) / rows;
  const int64_t in_w = W + k - 1;

  parallel_for(0, B * bands, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> band((rows + k - 1) * in_w * C), t0(rows * W * C), t1(rows * W * C),
        lt(rows * W * M);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / bands, y0 = (task % bands) * rows;
      const int64_t nr = std::min(rows, H - y0), nt = nr * W, n0 = y0 * W;
      load_band(xp, sx, b, y0, nr, H, W, C, k, band.data());
      dwconv_band(band.data(), in_w, prm.dw_t.data(), prm.has_dw_b ? prm.dw_b.data() : nullptr,
                  t0.data(), nr, W, C, k);
      gelu_inplace(t0.data(), nt * C);
      for (int64_t i = 0; i < nt; ++i) std::copy(prm.b1.begin(), prm.b1.end(), t1.data() + i * C);
      gemm_nn(t0.data(), C, prm.w1_t.data(), C, t1.data(), C, nt, C, C, /*accumulate=*/true);
      gelu_inplace(t1.data(), nt * C);
      if (prm.has_b2) {
        for (int64_t i = 0; i < nt; ++i) std::copy(prm.b2.begin(), prm.b2.end(), lt.data() + i * M);
      }
      gemm_nn(t1.data(), C, prm.w2_t.data(), M, lt.data(), M, nt, C, M, prm.has_b2);
      // (nt, M) tile -> out[b, :, n0 : n0 + nt], per cluster one contiguous run. Blocks of 32
      // patches keep the block's tile rows in L1 while it is read column by column.
      for (int64_t i0 = 0; i0 < nt; i0 += 32) {
        const int64_t i1 = std::min(nt, i0 + 32);
        for (int64_t m = 0; m < M; ++m) {
          scalar_t* orow = op + (b * M + m) * N + n0;
          for (int64_t i = i0; i < i1; ++i) orow[i] = static_cast<scalar_t>(lt[i * M + m]);
        }
      }
    }
  });
}

// The argument checks shared by the two conv ops (op: the name their messages start with).

// One parameter: its shape, a floating dtype, x's device.
void check_param(const char* op, const at::Tensor& p, const at::Tensor& x, at::IntArrayRef shape,
                 const char* name) {
  TORCH_CHECK(p.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ",
              p.sizes());
  TORCH_CHECK(p.is_floating_point(), op, ": expected ", name, " to be floating, got ",
              p.scalar_type());
  check_same_device(p, x, op, name, "x");
}
void check_param(const char* op, const std::optional<at::Tensor>& p, const at::Tensor& x,
                 at::IntArrayRef shape, const char* name) {
  if (p) check_param(op, *p, x, shape, name);
}

// x (B, N, C) floating tokens of an H x W grid (N = H*W, C > 0) and a depthwise weight
// (C, 1, k, k) with k odd; returns k.
int64_t check_grid_and_depthwise(const char* op, const at::Tensor& x, int64_t H, int64_t W,
                                 const at::Tensor& dw, const char* dw_name) {
  check_dim(x, 3, op, "x", "(B, N, C)");
  check_supported_float(x, op, "x");
  const int64_t N = x.size(1), C = x.size(2);
  TORCH_CHECK(H > 0 && W > 0 && H * W == N, op, ": expected H * W == N with H, W > 0, got H=", H,
              ", W=", W, ", N=", N);
  TORCH_CHECK(C > 0, op, ": expected C > 0 channels");
  TORCH_CHECK(dw.dim() == 4 && dw.size(2) == dw.size(3) && dw.size(2) % 2 == 1, op, ": expected ",
              dw_name, " of shape (C, 1, k, k) with k odd, got ", dw.sizes());
  const int64_t k = dw.size(2);
  check_param(op, dw, x, {C, 1, k, k}, dw_name);
  return k;
}

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
    HeadParams<acc_t> prm;
    prm.dw_t = transposed<acc_t>(dw_weight.reshape({C, k * k}));
    if (dw_bias) {
      prm.dw_b = to_vector<acc_t>(*dw_bias);
      prm.has_dw_b = true;
    }
    prm.w1_t = transposed<acc_t>(w1.reshape({C, C}));
    prm.b1 = b1 ? to_vector<acc_t>(*b1) : std::vector<acc_t>(C, acc_t(0));
    prm.w2_t = transposed<acc_t>(w2.reshape({M, C}));
    if (b2) {
      prm.b2 = to_vector<acc_t>(*b2);
      prm.has_b2 = true;
    }
    conv_cluster_logits_kernel<scalar_t>(x, H, W, k, prm, M, out);
  });
  return out;
}

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
  // Rows per band: about 128 outputs (the hidden width C is 4x the block width), but enough bands
  // for every thread when B is small. The band split never changes a result (each output is
  // computed by one task, in a fixed order).
  int64_t rows = std::clamp<int64_t>(128 / W, 1, H);
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  while (rows > 1 && B * ((H + rows - 1) / rows) < want) rows = (rows + 1) / 2;
  const int64_t bands = (H + rows - 1) / rows;
  const int64_t in_w = W + k - 1;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // write the output in place

  parallel_for(0, B * bands, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> band((rows + k - 1) * in_w * C), tmp(kDirect ? 0 : rows * W * C);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / bands, y0 = (task % bands) * rows;
      const int64_t nr = std::min(rows, H - y0), n0 = y0 * W;
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

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("conv_cluster_logits", &paca_kernels::conv_cluster_logits_cpu);
  m.impl("mlp_dwconv", &paca_kernels::mlp_dwconv_cpu);
}
