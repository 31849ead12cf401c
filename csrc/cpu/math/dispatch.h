// The runtime dispatch interface of the CPU kernels: the table of float32 kernels (Float32Kernels)
// and the functions by which each ISA's translation unit fills it in.
//
// The extension is compiled for the baseline x86-64 ISA (SSE2), so that one wheel runs anywhere.
// Each float32 hot spot (small matrix products, exp, row max, GELU, transpose, the depthwise
// convolution) therefore exists more than once, one translation unit per ISA, each compiled once
// with its own flags (CMakeLists.txt, set_source_files_properties), as in ATen's
// aten/src/ATen/native/cpu/README.md:
//
//   kernels_baseline.cpp  no ISA flags     the portable templates (portable.h, gelu.h, dwconv.h)
//   kernels_avx2.cpp      -mavx2 -mfma     AVX2+FMA intrinsics: products, exp, row max, GELU,
//                                          transpose, depthwise convolution
//   kernels_avx512.cpp    -mavx512f ...    AVX-512 products, exp, row max, softmax rows,
//                                          GELU, depthwise convolution, bf16 <-> float32
//                                          conversions (the transpose stays AVX2); same bits
//   kernels_avx512bf16.cpp -mavx512bf16 ... bf16 products (vdpbf16ps) on packed bf16 weights
//   kernels_amx.cpp       -mamx-bf16 ...   the same bf16 products on AMX tiles (tdpbf16ps)
//
// dispatch.cpp picks the build once, from cpuid (and the PACA_KERNELS_CPU_ISA cap), and the ops
// reach it through the inline front ends of kernels.h. float64 (gradcheck, reference precision)
// always takes the portable templates. The baseline and the vector float32 builds may differ in
// the last bits (FMA), each one is deterministic; the AVX-512 and AVX2 builds give the same bits.
//
// ODR RULE for the ISA translation units (kernels_avx2.cpp, kernels_avx512.cpp, kernels_avx512bf16.cpp,
// kernels_amx.cpp):
//   An inline function or template instantiated in a TU compiled with -mavx2 / -mavx512f is
//   emitted as a COMDAT (weak) symbol; if a baseline TU instantiates the same entity, the linker
//   keeps ONE copy, possibly the AVX-512 one, which would then run (and crash with SIGILL) on
//   CPUs without AVX-512. Therefore:
//   1. An ISA TU includes only <immintrin.h> (its intrinsics are extern gnu_inline always_inline:
//      never emitted out of line), the C headers it needs for types, this header (types and
//      declarations, no function bodies), gelu_coefficients.h (constexpr data, internal linkage)
//      and, in the AVX-512 TUs, avx512_lanes.h (16-lane helpers in an unnamed namespace: each TU
//      its own internal copy).
//      Never ATen, never the portable headers (portable.h, gelu.h, dwconv.h, kernels.h, ...), never
//      a <algorithm>-style header whose templates (std::min, ...) it would instantiate.
//   2. Its code lives in an unnamed namespace inside its own namespace (paca_kernels::cpu::avx2,
//      ::avx512): internal linkage, so no symbol of it can be merged with another TU's. The only
//      external symbol is its register_kernels() below.
//   3. Helpers it needs (min/max, masks) are written locally, inside that unnamed namespace.
//   Baseline TUs (the op files, kernels_baseline.cpp, dispatch.cpp) share the inline functions of
//   the portable headers freely: they are all compiled with the same flags.
//
// Compile flags per TU must not change the float32 bits either: the ISA TUs use explicit FMA
// intrinsics where they fuse, and no mul + add expression that -ffp-contract could fuse
// differently than under the target attributes the code was first written with (the contraction
// mode is a global flag, the same for -m flags and target attributes).
#pragma once

#include <cstdint>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PACA_X86_DISPATCH 1  // cpuid-based selection of the AVX2 / AVX-512 builds
#else
#define PACA_X86_DISPATCH 0  // other compilers and architectures: the baseline build only
#endif

namespace paca_kernels::cpu {

// C[r, :] = act(bias + sum_t A[r, t] P[t, :]) with P packed by PackedMatrix (packing.h).
using GemmPackedFn = void (*)(const float* A, int64_t lda, const float* P, float* C, int64_t ldc,
                              int64_t rows, int64_t T, int64_t cols, const float* bias, bool gelu);
// C[r, :] (+)= sum_k A[r, k] * B[k, :] (gemm_nn_impl in portable.h).
using GemmNNFn = void (*)(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                          int64_t ldc, int64_t rows, int64_t K, int64_t cols, bool accumulate);
// C[k, :] += sum_r A[r, k] * B[r, :] (gemm_tn_acc_impl in portable.h).
using GemmTNFn = void (*)(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                          int64_t ldc, int64_t rows, int64_t K, int64_t cols);
// out[i] = exp(in[i] - shift), returns their sum.
using ExpFn = float (*)(const float* in, float shift, float* out, int64_t n);
// out[r, i] = exp(in[r, i] - shift[i]) * scale[i] for rows r < rows of n values (in row r at
// in + r * ldi, out likewise): the per-column softmax of patch-major logits (cluster_pool's
// backward), each element the exp of exp_shifted and the same product (the same bits). With
// ds != nullptr, also the softmax backward in the same pass: grad[r, i] = out[r, i] * (ds[r, i] -
// rd[i]) (ds row r at ds + r * ldd, grad likewise), the product of that sub and mul (same bits).
using ExpColsFn = void (*)(const float* in, int64_t ldi, int64_t rows, int64_t n,
                           const float* shift, const float* scale, float* out, int64_t ldo,
                           const float* ds, int64_t ldd, const float* rd, float* grad,
                           int64_t ldg);
// Maximum of n values, NaN skipped.
using MaxFn = float (*)(const float* x, int64_t n);
// The softmax numerators of rows r < rows of n values, in place: s[r, i] = exp(s[r, i] - mx[r]),
// mx[r] the row's maximum (NaN skipped), sum[r] the sum of its exponentials (row r at s + r * lds):
// row_max then exp_shifted of each row, the same bits.
using ExpRowsFn = void (*)(float* s, int64_t lds, int64_t rows, int64_t n, float* mx, float* sum);
// The softmax of rows r < rows and its backward in place (softmax_bwd_row_impl in portable.h of
// each row: p[r] at p + r * ldp, ds[r] at ds + r * ldd).
using SoftmaxBwdRowsFn = void (*)(float* p, int64_t ldp, float* ds, int64_t ldd, int64_t rows,
                                  int64_t n);
// The same backward from the forward's softmax numerators: e[r] (at e + r * lde) and sum[r] as
// exp_minus_row_max_rows left them; writes P = e / sum into p and dS into ds (dP on entry). The
// bits of SoftmaxBwdRowsFn on the scores the e came from (softmax_bwd_saved_row_impl).
using SoftmaxBwdSavedRowsFn = void (*)(const float* e, int64_t lde, const float* sum, float* p,
                                       int64_t ldp, float* ds, int64_t ldd, int64_t rows,
                                       int64_t n);
// dst[c * ldd + r] = src[r * lds + c].
using TransposeFn = void (*)(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                             int64_t ldd);
// x[i] = GELU(x[i]).
using GeluFn = void (*)(float* x, int64_t n);
// Depthwise convolution of a zero-padded band (dwconv_band_impl in dwconv.h).
using DwFn = void (*)(const float* in, int64_t in_w, const float* wt, const float* bias, float* out,
                      int64_t rows, int64_t W, int64_t C, int64_t k);
// Depthwise convolution read straight from the image, GELU optional (dwconv_rows_impl in dwconv.h).
// `cached`: whether img's rows are already in cache (L2), which picks the order of the tiles (the
// results do not depend on it): false, pixel groups one after the other, all channels of each,
// the next output row's new input row prefetched (the image streams from memory in order: the
// MLP's forward at PaCa-ViT-Tiny's first stage, B = 8, 1.6x faster than the channel sweeps); true,
// a sweep along the row per block of channels, no prefetch (rows in L2: the MLP backward's g,
// 1.25x faster than pixel groups).
using DwDirectFn = void (*)(const float* img, int64_t px, int64_t y_base, int64_t H, int64_t W,
                            int64_t y0, int64_t rows, const float* wt, const float* bias,
                            const float* in_bias, bool gelu, float* out, int64_t C, int64_t k,
                            bool cached);

// y[r, :] = LayerNorm(x[r, :]) * w + b for the rows r < rows of n > 0 values (x[r, c] at
// x[r * ldx + c], y likewise; y may be x): biased variance, eps, w and b optional (nullptr). The
// statistics are layernorm.h's overflow-free ones: the row scaled by the power of two 2^s near its
// largest magnitude (NaN skipped), s clamped to [min_exp, 100] (layer_norm_min_exp(eps)), then
// mean and variance of the scaled row; an infinite or NaN row gives NaN, as torch's layer_norm.
using LayerNormRowsFn = void (*)(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows,
                                 int64_t n, const float* w, const float* b, float eps,
                                 int min_exp);

// dst[i] = the float32 value of the bf16 bit pattern src[i] (exact).
using Bf16ToF32Fn = void (*)(const uint16_t* src, float* dst, int64_t n);
// dst[i] = src[i] rounded to bf16, nearest even, NaN to 0x7FC0: c10::BFloat16(float), bit for bit.
using F32ToBf16Fn = void (*)(const float* src, uint16_t* dst, int64_t n);

// C[r, :] = act(bias + sum_t bf16(A[r, t]) P[t, :]) with P a weight packed as bfloat16 pair panels
// by PackedMatrix (packing.h; layout in kernels_avx512bf16.cpp): A float32 rounded to bf16 (nearest
// even) as it is read, the sums in float32.
using GemmPackedBf16Fn = void (*)(const float* A, int64_t lda, const uint16_t* P, float* C,
                                  int64_t ldc, int64_t rows, int64_t T, int64_t cols,
                                  const float* bias, bool gelu);

// bf16 pair panels (PackedMatrix, gemm_packed_bf16) hold their pairs of reduction steps rounded up
// to a multiple of this, the padding pair-rows zero: the AMX kernel then reads whole tiles of 16
// pairs (32 steps) and the zero rows add nothing.
constexpr int64_t kBf16PairPad = 16;

// Reduction steps per packed panel in the vector builds' products: a 256 x 16 float panel is
// 16 KiB, half of a 32 KiB L1d. The AVX2 and AVX-512 products chunk their sums alike (data only).
constexpr int64_t kPanelSteps = 256;

// The float32 kernels of one build. Filled by the register_kernels() functions below, in order
// baseline, then avx2, then avx512 (each overwrites what its ISA improves on).
struct Float32Kernels {
  const char* isa = "baseline";  // the build chosen: "baseline", "avx2" or "avx512"
  GemmNNFn gemm_nn = nullptr;
  GemmTNFn gemm_tn_acc = nullptr;
  ExpFn exp_shifted = nullptr;
  ExpColsFn exp_shifted_cols = nullptr;
  MaxFn row_max = nullptr;
  // The attention's softmax rows, forward and backward. The vector builds run several rows at a
  // time (one row alone is a chain of dependent operations), each row in its one-row order.
  ExpRowsFn exp_minus_row_max_rows = nullptr;
  SoftmaxBwdRowsFn softmax_bwd_rows = nullptr;
  SoftmaxBwdSavedRowsFn softmax_bwd_saved_rows = nullptr;
  GemmPackedFn gemm_packed = nullptr;  // vector builds only (PackedMatrix falls back to gemm_nn)
  TransposeFn transpose = nullptr;
  GeluFn gelu = nullptr;
  DwFn dwconv_band = nullptr;
  DwDirectFn dwconv_direct = nullptr;  // vector builds only (the baseline copies a padded band)
  // The LayerNorm of token rows (the fused MLP's prologue). The AVX-512 build keeps the AVX2 one
  // (8 lanes: the two builds give the same bits; the baseline's portable sums may differ in the
  // last bits).
  LayerNormRowsFn layer_norm_rows = nullptr;
  // The bf16 <-> float32 conversions of the kernels' inputs and outputs (bf16 models, autocast).
  Bf16ToF32Fn bf16_to_f32 = nullptr;
  F32ToBf16Fn f32_to_bf16 = nullptr;
  // The bfloat16 products: "amx" (AMX-BF16 tiles), "avx512bf16" (vdpbf16ps), or nullptr where the
  // CPU (or the PACA_KERNELS_CPU_ISA cap) has neither; the bf16 products then run in the float32
  // kernels on the bf16-rounded weights (PackedMatrix).
  const char* bf16_isa = nullptr;
  GemmPackedBf16Fn gemm_packed_bf16 = nullptr;
};

// Each ISA's translation unit. baseline: fills every entry but the vector-only ones. avx2 /
// avx512: overwrite their kernels and return true, or return false (touching nothing) when the TU
// was compiled without its ISA flags (non-GCC/Clang compilers, other architectures).
namespace baseline {
void register_kernels(Float32Kernels& k);
}
namespace avx2 {
bool register_kernels(Float32Kernels& k);
}
namespace avx512 {
bool register_kernels(Float32Kernels& k);
}
namespace avx512bf16 {  // the bf16 products only (gemm_packed_bf16, bf16_isa)
bool register_kernels(Float32Kernels& k);
}
namespace amx {  // the bf16 products on AMX tiles; false where the CPU or the OS has none
bool register_kernels(Float32Kernels& k);
}

// The build for this CPU (dispatch.cpp): AVX-512 products where the CPU has AVX-512F, else AVX2+FMA,
// else the baseline, and the bf16 products on top where the CPU has AVX512-BF16 (on AMX tiles where
// it also has AMX-BF16 and the OS grants it); PACA_KERNELS_CPU_ISA=baseline, =avx2, =avx512 or
// =avx512bf16 in the environment caps the choice.
// Callers use float32_kernels() (kernels.h), which computes it once.
Float32Kernels select_float32_kernels();

// The name of the build the kernels run in this process ("baseline", "avx2" or "avx512", or with
// the bf16 products on top "avx512bf16" or "amx"): the choice float32_kernels() made (making it now
// if no kernel ran yet). Exposed as the op paca_kernels::cpu_isa() so that Python reports the real
// choice, not a re-derivation of it.
const char* selected_isa();

}  // namespace paca_kernels::cpu
