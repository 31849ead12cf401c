// CPU kernel of paca_kernels::mlp_dwconv_bwd, the backward of paca_kernels::mlp_dwconv (schema and
// semantics: csrc/registration.cpp; forward kernel: fused/mlp_dwconv.cpp). With u = x + in_bias,
// z = depthwise_kxk(u) + bias (+ u if shortcut) and y = act(z) on the (B, N, C) tokens of an H x W
// grid, given grad_y:
//
//   g            = grad_y * act'(z)                         (act' = GELU' or 1)
//   grad_bias    = sum_{b,n} g
//   grad_weight  [c, ky, kx] = sum_{b,y,x} g[b,y,x,c] * u[b, y+ky-p, x+kx-p, c]   (zero outside)
//   grad_x       = depthwise_kxk(g) with the kernel flipped (its transpose) + g if shortcut
//   grad_in_bias = sum_{b,n} grad_x
//
// What it keeps and what it recomputes: the forward saves nothing but its input x (which autograd
// holds anyway, as the output of fc1's matrix product); z is recomputed here, band by band, from a
// zero-padded copy of u that also feeds the weight gradient. Saving z instead would add a
// (B, N, C) write to every training forward and a read here, for a 3x3 depthwise conv that costs
// about as much as that pass over memory.
//
// One pass per task, a band of image rows of one image (a fixed number of rows per band, set by
// the shape alone): g for the band's rows and a halo of (k - 1) / 2 rows on each side (the halo's g
// is recomputed by both bands that need it), chunk by chunk from u's zero-padded rows (which also
// feed the weight gradient), partial sums of grad_bias and grad_weight over the band's own rows,
// then grad_x of the band as the flipped convolution of g and its partial sum for grad_in_bias.
// So nothing but grad_x leaves the cache: x and grad_y are read once, grad_x written once. The
// partials are reduced in task order at the end: no atomics, and since the bands do not depend on
// the thread count, neither do the bits of the result.
//
// float32: the GELU derivative on GCC vectors (the erf approximation of gelu_coefficients.h and
// a Cephes exp), the weight gradient register-blocked, both compiled twice from one template: 8
// lanes in the baseline build, 16 in an AVX-512 clone (target attribute) picked once from the
// ISA the library selected; the convolutions through the dispatched float32 kernels of
// cpu/math/dwconv.h. float64: the same loops, scalar erf/exp.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "cpu/fused/conv_front.h"
#include "cpu/output_pool.h"
#include "cpu/math/dispatch.h"
#include "cpu/math/dwconv.h"
#include "cpu/math/gelu.h"
#include "cpu/math/gelu_coefficients.h"
#include "cpu/math/kernels.h"
#include "cpu/math/parallel.h"
#include "cpu/math/portable.h"
#include "cpu/math/scratch.h"
#include "cpu/math/tensor_access.h"

// The GCC vector helpers below are always inlined (no vector crosses a call boundary): the ABI
// note GCC gives for their 32/64-byte vector returns does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace paca_kernels {
using namespace cpu;
namespace {

constexpr const char* kOp = "paca_kernels::mlp_dwconv_bwd";
// Rows per band: about this many patches (fixed by the shape alone, see the header comment); the
// halo of g recomputed per band is 2 (k - 1) / 2 rows.
constexpr int64_t kBandPatches = 2048;
// Rows of u/z/g per step inside a band: about this many patches, and at least k - 1 rows (u's halo
// of k - 1 rows is copied again for every step). Small, so that a step's u, z, g and grad_x rows
// stay in L2 together: 256 patches (4 rows at PaCa-ViT-Tiny's first stage, C = 384: about 1.5 MB in
// all) ran 6-32 % slower than this at the MLP shapes of Tiny's first three stages (B = 8, 2
// threads), the same within 5 % at the clustering heads' 7 x 7 ones (A/B of two builds, alternating
// processes); one row everywhere lost 11 % at the fourth stage and 16 % at the first head.
constexpr int64_t kChunkPatches = 64;

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

// GELU'(v) = Phi(v) + v phi(v) = 0.5 (1 + erf(v / sqrt 2)) + v exp(-v^2 / 2) / sqrt(2 pi), with
// erf and exp those of the forward (gelu.h's erf_scaled_vec, portable.h's exp_vec), here on the
// vector type V (VI: its int32 vector) so that the AVX-512 clone runs them 16 lanes wide.
template <typename V, typename VI>
PACA_ALWAYS_INLINE V gelu_grad_vec(V v) {
  const V e = erf_scaled_vec(v);
  const V phi = exp_vec<V, VI>(-0.5f * v * v) * 0.3989422804014327f;
  return 0.5f * e + 0.5f + v * phi;
}

// g[i] = gy[i] * GELU'(z[i]) for i < n, L lanes at a time.
template <typename V, typename VI>
PACA_ALWAYS_INLINE void gelu_grad_mul(const float* gy, const float* z, float* g, int64_t n) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V zv, gv;
    // gy streams from memory (it is the largest input); 4 KiB ahead hides the latency the
    // hardware prefetcher leaves between this loop's short runs (1 thread, PaCa-ViT-Tiny's first
    // stage at B = 8: 37 -> 33 ms).
    __builtin_prefetch(gy + i + 1024);
    std::memcpy(&zv, z + i, sizeof(zv));
    std::memcpy(&gv, gy + i, sizeof(gv));
    gv = gv * gelu_grad_vec<V, VI>(zv);
    std::memcpy(g + i, &gv, sizeof(gv));
  }
  if (i < n) {
    V zv = V{}, gv = V{};
    for (int64_t j = 0; j < n - i; ++j) {
      zv[j] = z[i + j];
      gv[j] = gy[i + j];
    }
    gv = gv * gelu_grad_vec<V, VI>(zv);
    for (int64_t j = 0; j < n - i; ++j) g[i + j] = gv[j];
  }
}

template <typename V, typename VI>
PACA_ALWAYS_INLINE void gelu_grad_mul(const double* gy, const double* z, double* g, int64_t n) {
  constexpr double kInvSqrt2 = 0.70710678118654752440, kInvSqrt2Pi = 0.39894228040143267794;
  for (int64_t i = 0; i < n; ++i) {
    const double v = z[i];
    g[i] = gy[i] * (0.5 * (1.0 + std::erf(v * kInvSqrt2)) + v * std::exp(-0.5 * v * v) * kInvSqrt2Pi);
  }
}

// part_w[ky * K + kx, c] += sum over the nr x W patches of g[., c] * u[. + (ky, kx), c] (float32):
// for each block of L channels (V: 8 or 16 lanes) and each row of taps, the K sums stay in
// registers over all the patches (one load of g serves K taps, and nothing is stored until the
// end), instead of a load-add-store of part_w per patch and tap.
template <typename V, int K>
PACA_ALWAYS_INLINE void dw_accumulate(const float* band, int64_t in_w, const float* g,
                                      float* part_w, int64_t nr, int64_t W, int64_t C) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  int64_t c0 = 0;
  for (; c0 + L <= C; c0 += L) {
    for (int ky = 0; ky < K; ++ky) {
      V acc[K];
      for (int kx = 0; kx < K; ++kx) acc[kx] = V{};
      for (int64_t r = 0; r < nr; ++r) {
        const float* grow = g + r * W * C + c0;
        const float* urow = band + (r + ky) * in_w * C + c0;
        for (int64_t j = 0; j < W; ++j) {
          V gv;
          std::memcpy(&gv, grow + j * C, sizeof(gv));
          for (int kx = 0; kx < K; ++kx) {
            V uv;
            std::memcpy(&uv, urow + (j + kx) * C, sizeof(uv));
            acc[kx] += gv * uv;
          }
        }
      }
      for (int kx = 0; kx < K; ++kx) {
        float* wv = part_w + (ky * K + kx) * C + c0;
        for (int64_t l = 0; l < L; ++l) wv[l] += acc[kx][l];
      }
    }
  }
  for (; c0 < C; ++c0) {  // the channel tail, one at a time
    for (int ky = 0; ky < K; ++ky) {
      for (int kx = 0; kx < K; ++kx) {
        float a = 0.0f;
        for (int64_t r = 0; r < nr; ++r) {
          for (int64_t j = 0; j < W; ++j) {
            a += g[(r * W + j) * C + c0] * band[((r + ky) * in_w + j + kx) * C + c0];
          }
        }
        part_w[(ky * K + kx) * C + c0] += a;
      }
    }
  }
}

// Pass 1's arithmetic for one band of nr rows (nt = nr * W patches): g = gy * act'(z) into g,
// part_b[c] += g, part_w[tap, c] += g * u at the tap's offset, u the zero-padded band
// ((nr + k - 1) x in_w x C). The channel loops are `omp simd` (vectorised in every build, at the
// width of the function's target).
template <typename T, typename V, typename VI>
PACA_ALWAYS_INLINE void grad_band_impl(const T* band, int64_t in_w, const T* gy, const T* z,
                                       bool gelu, T* g, T* part_b, T* part_w, int64_t nr,
                                       int64_t W, int64_t C, int64_t k) {
  const int64_t nt = nr * W;
  if (gelu) {
    gelu_grad_mul<V, VI>(gy, z, g, nt * C);
  } else {
    std::memcpy(g, gy, sizeof(T) * nt * C);
  }
  if (part_w == nullptr) return;  // halo rows: g only (their sums belong to the neighbouring band)
  for (int64_t i = 0; i < nt; ++i) {
    const T* gv = g + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) part_b[c] += gv[c];
  }
  if constexpr (std::is_same_v<T, float>) {
    // Register-blocked for the kernel sizes PaCa-ViT uses (3 in the MLP, 7 in the head).
    if (k == 3) return dw_accumulate<V, 3>(band, in_w, g, part_w, nr, W, C);
    if (k == 5) return dw_accumulate<V, 5>(band, in_w, g, part_w, nr, W, C);
    if (k == 7) return dw_accumulate<V, 7>(band, in_w, g, part_w, nr, W, C);
  }
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t j = 0; j < W; ++j) {
      const T* gv = g + (r * W + j) * C;
      for (int64_t ky = 0; ky < k; ++ky) {
        const T* urow = band + ((r + ky) * in_w + j) * C;
        T* wrow = part_w + ky * k * C;
        for (int64_t kx = 0; kx < k; ++kx) {
          const T* uv = urow + kx * C;
          T* wv = wrow + kx * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) wv[c] += gv[c] * uv[c];
        }
      }
    }
  }
}

using GradBandF32 = void (*)(const float*, int64_t, const float*, const float*, bool, float*,
                             float*, float*, int64_t, int64_t, int64_t, int64_t);

void grad_band_f32_base(const float* band, int64_t in_w, const float* gy, const float* z,
                        bool gelu, float* g, float* part_b, float* part_w, int64_t nr, int64_t W,
                        int64_t C, int64_t k) {
  grad_band_impl<float, v8f, v8i>(band, in_w, gy, z, gelu, g, part_b, part_w, nr, W, C, k);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// The same template compiled for AVX-512 (the callees are always_inline and target-neutral, so
// they inline into this clone). Only called where the library selected an AVX-512 build.
__attribute__((target("avx512f,avx2,fma"))) void grad_band_f32_avx512(
    const float* band, int64_t in_w, const float* gy, const float* z, bool gelu, float* g,
    float* part_b, float* part_w, int64_t nr, int64_t W, int64_t C, int64_t k) {
  grad_band_impl<float, v16f, v16i>(band, in_w, gy, z, gelu, g, part_b, part_w, nr, W, C, k);
}
#endif

GradBandF32 select_grad_band_f32() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  const std::string_view isa = selected_isa();
  if (isa.substr(0, 6) == "avx512" || isa == "amx") return &grad_band_f32_avx512;
#endif
  return &grad_band_f32_base;
}

inline void grad_band(const float* band, int64_t in_w, const float* gy, const float* z, bool gelu,
                      float* g, float* part_b, float* part_w, int64_t nr, int64_t W, int64_t C,
                      int64_t k) {
  static const GradBandF32 fn = select_grad_band_f32();
  fn(band, in_w, gy, z, gelu, g, part_b, part_w, nr, W, C, k);
}
inline void grad_band(const double* band, int64_t in_w, const double* gy, const double* z,
                      bool gelu, double* g, double* part_b, double* part_w, int64_t nr, int64_t W,
                      int64_t C, int64_t k) {
  grad_band_impl<double, v8f, v8i>(band, in_w, gy, z, gelu, g, part_b, part_w, nr, W, C, k);
}

// Sums of the per-task rows parts (tasks x len) in task order: out[i] = sum_t parts[t * len + i].
template <typename T>
std::vector<T> reduce_parts(const std::vector<T>& parts, int64_t tasks, int64_t len) {
  std::vector<T> out(static_cast<size_t>(len), T(0));
  for (int64_t t = 0; t < tasks; ++t) {
    const T* p = parts.data() + t * len;
    for (int64_t i = 0; i < len; ++i) out[i] += p[i];
  }
  return out;
}

template <typename T>
at::Tensor vector_to_tensor(const std::vector<T>& v, at::IntArrayRef shape, const at::Tensor& like,
                            at::ScalarType dtype) {
  at::Tensor t = at::empty(shape, like.options().dtype(c10::CppTypeToScalarType<T>::value));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<T>());
  return dtype == t.scalar_type() ? t : t.to(dtype);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_dwconv_bwd_kernel(
    const at::Tensor& gy_in, const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_bias,
    bool shortcut, bool gelu) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int64_t k = weight.size(2), kk = k * k, in_w = W + k - 1;
  // grad_y of the MLP is contiguous (fc2's backward); a stride-0 or strided one is copied once.
  const at::Tensor gy = gy_in.contiguous();
  const Strides sx(x);
  const T* xp = x.const_data_ptr<T>();
  const T* gyp = gy.const_data_ptr<T>();

  // Forward taps (k*k, C) with the shortcut as the identity tap; the backward's taps flipped.
  std::vector<T> wt = transposed<T>(weight.reshape({C, kk}));
  std::vector<T> wt_flip(wt.size());
  for (int64_t t = 0; t < kk; ++t) {
    std::copy(wt.begin() + t * C, wt.begin() + (t + 1) * C, wt_flip.begin() + (kk - 1 - t) * C);
  }
  if (shortcut) {
    const int64_t centre = (k / 2) * k + k / 2;
    for (int64_t c = 0; c < C; ++c) {
      wt[centre * C + c] += T(1);
      wt_flip[centre * C + c] += T(1);
    }
  }
  std::vector<T> bv, ibv;
  if (bias) bv = to_vector<T>(*bias);
  if (in_bias) ibv = to_vector<T>(*in_bias);

  // Bands of `rows` image rows, fixed by the shape alone (see the header comment).
  const int64_t pad = (k - 1) / 2;
  const int64_t bands = (H + std::clamp<int64_t>(kBandPatches / W, 1, H) - 1) /
                        std::clamp<int64_t>(kBandPatches / W, 1, H);
  const int64_t rows = (H + bands - 1) / bands, tasks = B * bands;
  // Rows of g computed per step: about kChunkPatches patches and at least k - 1 rows, so that u's
  // padded chunk, z and g's rolling buffer stay in L2.
  const int64_t chunk = std::clamp<int64_t>(std::max(kChunkPatches / W, k - 1), 1, rows + 2 * pad);
  at::Tensor grad_x = empty_output({B, N, C}, x.options());
  T* dxp = grad_x.mutable_data_ptr<T>();

  // One pass per band [y0, y1): g for rows [gs, ge) = the band and its halo of pad rows (the
  // halo's g is recomputed by both bands that need it), chunk by chunk; partial sums of grad_bias
  // and grad_weight over the band's own rows; grad_x of the rows whose g neighbourhood is complete
  // after each chunk, as the flipped convolution of g, and its partial sum for grad_in_bias. g
  // lives in a rolling buffer of chunk + 2 pad rows (the rows grad_x still needs are moved to its
  // front after each chunk), so the band can be tall (little halo) and g still stays in L2.
  const int64_t part_len = (kk + 1 + (in_bias ? 1 : 0)) * C;
  std::vector<T> parts(static_cast<size_t>(tasks * part_len), T(0));
  parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
    const Scratch<T> band(ScratchSlot::kTask0, (chunk + k - 1) * in_w * C),
        z(ScratchSlot::kTask1, chunk * W * C), g(ScratchSlot::kTask2, (chunk + 2 * pad) * W * C);
    T* gbuf = g.data();
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / bands, y0 = (task % bands) * rows, y1 = std::min(H, y0 + rows);
      const int64_t gs = std::max<int64_t>(0, y0 - pad), ge = std::min(H, y1 + pad);
      T* part = parts.data() + task * part_len;
      int64_t gbase = gs, next_dx = y0;  // gbuf's first row; the next row of grad_x to write
      for (int64_t r0 = gs; r0 < ge;) {
        // A chunk never straddles a band edge: its rows either all count or none does.
        const int64_t edge = r0 < y0 ? y0 : (r0 < y1 ? y1 : ge);
        const int64_t nr = std::min(chunk, edge - r0);
        const bool own = r0 >= y0 && r0 < y1;
        load_band(xp, sx, b, r0, nr, H, W, C, k, band.data(), in_bias ? ibv.data() : nullptr);
        dwconv_band(band.data(), in_w, wt.data(), bias ? bv.data() : nullptr, z.data(), nr, W, C, k);
        grad_band(band.data(), in_w, gyp + (b * N + r0 * W) * C, z.data(), gelu,
                  gbuf + (r0 - gbase) * W * C, part + kk * C, own ? part : nullptr, nr, W, C, k);
        r0 += nr;
        // grad_x rows y need g rows y - pad .. y + pad (inside the image).
        const int64_t dx_end = r0 == ge ? y1 : std::min(y1, r0 - pad);
        if (dx_end > next_dx) {
          const int64_t off = (b * N + next_dx * W) * C, n = (dx_end - next_dx) * W;
          // g's rolling buffer is in L2 (cached: channel sweeps).
          dwconv_rows(gbuf, C, gbase, H, W, next_dx, dx_end - next_dx, wt_flip.data(), nullptr,
                      nullptr, /*gelu=*/false, dxp + off, C, k, /*cached=*/true);
          if (in_bias) {
            T* pib = part + (kk + 1) * C;
            for (int64_t i = 0; i < n; ++i) {
              const T* d = dxp + off + i * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) pib[c] += d[c];
            }
          }
          next_dx = dx_end;
        }
        const int64_t keep = std::max(gbase, next_dx - pad);  // g rows below are done with
        if (keep > gbase && r0 < ge) {
          std::memmove(gbuf, gbuf + (keep - gbase) * W * C, sizeof(T) * (r0 - keep) * W * C);
          gbase = keep;
        }
      }
    }
  });

  // Fixed-order reductions of the partials; the parameter gradients in their parameters' dtypes.
  const std::vector<T> s1 = reduce_parts(parts, tasks, part_len);
  std::vector<T> dw(static_cast<size_t>(C * kk));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < kk; ++t) dw[c * kk + t] = s1[t * C + c];
  }
  const std::vector<T> db(s1.begin() + kk * C, s1.begin() + (kk + 1) * C);
  const at::Tensor grad_w = vector_to_tensor(dw, {C, 1, k, k}, x, weight.scalar_type());
  const at::Tensor grad_b = vector_to_tensor(db, {C}, x, bias ? bias->scalar_type() : weight.scalar_type());
  at::Tensor grad_ib;
  if (in_bias) {
    const std::vector<T> dib(s1.begin() + (kk + 1) * C, s1.end());
    grad_ib = vector_to_tensor(dib, {C}, x, in_bias->scalar_type());
  } else {
    grad_ib = at::zeros({C}, weight.options());  // no in_bias: nothing to differentiate
  }
  return {grad_x, grad_w, grad_b, grad_ib};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_dwconv_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_bias,
    bool shortcut, bool gelu) {
  const int64_t k = check_grid_and_depthwise(kOp, x, H, W, weight, "weight");
  const int64_t C = x.size(2);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
              ": expected x of dtype float32 or float64 (the backward has no half-precision "
              "kernel), got ", x.scalar_type());
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(), kOp,
              ": expected grad_y of the shape and dtype of x ", x.sizes(), " ", x.scalar_type(),
              ", got ", grad_y.sizes(), " ", grad_y.scalar_type());
  check_same_device(grad_y, x, kOp, "grad_y", "x");
  check_param(kOp, bias, x, {C}, "bias");
  check_param(kOp, in_bias, x, {C}, "in_bias");
  (void)k;
  if (x.numel() == 0) {
    return {at::zeros_like(x), at::zeros_like(weight), at::zeros({C}, weight.options()),
            at::zeros({C}, weight.options())};
  }
  if (x.scalar_type() == at::kDouble) {
    return mlp_dwconv_bwd_kernel<double>(grad_y, x, H, W, weight, bias, in_bias, shortcut, gelu);
  }
  return mlp_dwconv_bwd_kernel<float>(grad_y, x, H, W, weight, bias, in_bias, shortcut, gelu);
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("mlp_dwconv_bwd", &paca_kernels::mlp_dwconv_bwd_cpu);
}
