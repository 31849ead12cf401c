// The AVX512-BF16 matrix products (see dispatch.h): C = act(bias + A . B) with A float32 rounded to
// bfloat16 as it is read, B a weight packed once as bfloat16 pair panels (packing.h), the sums in
// float32 (vdpbf16ps). This is the only translation unit compiled with -mavx512bf16 (CMakeLists.txt);
// it follows the ODR rule of dispatch.h: nothing but intrinsics, C types and data headers included,
// everything in an unnamed namespace inside paca_kernels::cpu::avx512bf16, register_kernels() the
// only external symbol.
//
// Why this shape. vdpbf16ps multiplies 16 pairs of bf16 by 16 pairs and adds both products to 16
// float32 sums: two reduction steps per instruction, twice the multiply-adds of vfmadd231ps at the
// same issue rate. The right-hand side is therefore packed by pairs of reduction steps: panel p
// holds columns 16p..16p+15, and its pair-row s the 32 bf16 (step 2s, col 0), (step 2s+1, col 0),
// (step 2s, col 1), ... so one 64-byte load feeds 16 columns for two steps; the left-hand side's
// two steps are one 32-bit broadcast. A register tile of R rows x 2 panels (24 sums at R = 12)
// needs 2 loads and R broadcasts per 2R instructions, so the loads do not bound it. The rows of A
// are rounded to bf16 (round to nearest even, vcvtneps2bf16) once per block of 48 rows x 256
// steps into a 24 KiB buffer on the stack, which then stays in L1 while every panel passes by.
#include <immintrin.h>

#include <cstdint>

#include "cpu/math/dispatch.h"
#include "cpu/math/avx512_lanes.h"

namespace paca_kernels::cpu::avx512bf16 {

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

#define PACA_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Rows of A rounded per block, and reduction steps per block (even, so that blocks start on a
// pair): 48 x 256 bf16 = 24 KiB.
constexpr int64_t kRowBlock = 48;
constexpr int64_t kStepBlock = kPanelSteps;
static_assert(kStepBlock % 2 == 0, "blocks of reduction steps must hold whole pairs");

// dst[i, 0 : 2 * pairs] = bf16(A[i, 0 : steps]) for i < rows, zero past `steps` (an odd last
// step is paired with a zero). dst rows are 2 * pairs long.
inline void round_rows(const float* A, int64_t lda, int64_t rows, int64_t steps, int64_t pairs,
                       uint16_t* dst) {
  const int64_t width = 2 * pairs;
  for (int64_t i = 0; i < rows; ++i) {
    const float* a = A + i * lda;
    uint16_t* d = dst + i * width;
    int64_t t = 0;
    for (; t + 16 <= steps; t += 16) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(a + t));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + t), reinterpret_cast<const __m256i&>(h));
    }
    if (t < width) {  // the ragged end, with the zero that pairs an odd last step
      const __m512 v = _mm512_maskz_loadu_ps(lanes_mask16(imin(16, steps - t)), a + t);
      const __m256bh h = _mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(d + t, static_cast<__mmask16>(lanes_mask16(width - t)),
                               reinterpret_cast<const __m256i&>(h));
    }
  }
}

// R rows x NV panels of C over the pair-rows [0, kp) of this step block. `first`: start from the
// bias (or zero) instead of C; `last`: apply GELU (if gelu) and store. `mask`: valid lanes of the
// last panel (its padding columns are computed from zeros but never stored).
template <int R, int NV>
PACA_ALWAYS_INLINE void tile(const uint16_t* a, int64_t a_width, const uint16_t* const* panels,
                             int64_t kp, float* C, int64_t ldc, const float* bias, bool first,
                             bool last, bool gelu, __mmask16 mask) {
  __m512 acc[R][NV];
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? mask : __mmask16(0xFFFF);
      if (first) {
        acc[i][v] = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, bias + 16 * v);
      } else {
        acc[i][v] = _mm512_maskz_loadu_ps(m, C + i * ldc + 16 * v);
      }
    }
  }
  for (int64_t s = 0; s < kp; ++s) {
    __m512i bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_si512(panels[v] + 32 * s);
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      int32_t pair;
      __builtin_memcpy(&pair, a + i * a_width + 2 * s, sizeof(pair));
      const __m512i av = _mm512_set1_epi32(pair);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        acc[i][v] = _mm512_dpbf16_ps(acc[i][v], reinterpret_cast<const __m512bh&>(av),
                                     reinterpret_cast<const __m512bh&>(bv[v]));
      }
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      if (last && gelu) acc[i][v] = gelu_avx512(acc[i][v]);
      _mm512_mask_storeu_ps(C + i * ldc + 16 * v, v == NV - 1 ? mask : __mmask16(0xFFFF),
                            acc[i][v]);
    }
  }
}

// All R-row tiles of one or two panels: 12-row tiles, then one tile of the remaining rows.
template <int NV>
inline void panel_rows(const uint16_t* a, int64_t a_width, const uint16_t* const* panels,
                       int64_t kp, float* C, int64_t ldc, int64_t rows, const float* bias,
                       bool first, bool last, bool gelu, __mmask16 mask) {
  int64_t r = 0;
  for (; r + 12 <= rows; r += 12) {
    tile<12, NV>(a + r * a_width, a_width, panels, kp, C + r * ldc, ldc, bias, first, last, gelu,
                 mask);
  }
  const uint16_t* ar = a + r * a_width;
  float* cr = C + r * ldc;
#define PACA_TAIL(R)                                                                  \
  case R:                                                                             \
    tile<R, NV>(ar, a_width, panels, kp, cr, ldc, bias, first, last, gelu, mask);     \
    break;
  switch (rows - r) {
    PACA_TAIL(11) PACA_TAIL(10) PACA_TAIL(9) PACA_TAIL(8) PACA_TAIL(7) PACA_TAIL(6)
    PACA_TAIL(5) PACA_TAIL(4) PACA_TAIL(3) PACA_TAIL(2) PACA_TAIL(1)
    default: break;
  }
#undef PACA_TAIL
}

// C[r, :] = act(bias + sum_t bf16(A[r, t]) P[t, :]) for r < rows, P packed by pairs (see the top
// of this file; panel p starts at P + p * pairs * 32, pairs = (T + 1) / 2 rounded up to a multiple
// of kBf16PairPad). Row blocks of A are rounded once, then
// every panel pair passes over them, one block of steps at a time (C holds the partial sums between
// step blocks). Each output is one fixed chain of vdpbf16ps: the bits do not depend on the thread
// count or on how the caller splits the rows.
void gemm_packed_bf16(const float* A, int64_t lda, const uint16_t* P, float* C, int64_t ldc,
                      int64_t rows, int64_t T, int64_t cols, const float* bias, bool gelu) {
  const int64_t pairs_total = ((T + 1) / 2 + kBf16PairPad - 1) / kBf16PairPad * kBf16PairPad;
  const int64_t npanel = (cols + 15) / 16;
  alignas(64) uint16_t abuf[kRowBlock * kStepBlock];
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t rb = imin(kRowBlock, rows - r0);
    for (int64_t t0 = 0; t0 < T; t0 += kStepBlock) {
      const int64_t kc = imin(kStepBlock, T - t0);
      const int64_t kp = (kc + 1) / 2;
      round_rows(A + r0 * lda + t0, lda, rb, kc, kp, abuf);
      const bool first = t0 == 0, last = t0 + kc == T;
      for (int64_t p = 0; p < npanel; p += 2) {
        const uint16_t* panels[2] = {P + (p * pairs_total + t0 / 2) * 32,
                                     P + ((p + 1) * pairs_total + t0 / 2) * 32};
        const int64_t j = 16 * p;
        const float* bj = bias == nullptr ? nullptr : bias + j;
        float* cj = C + r0 * ldc + j;
        if (p + 1 < npanel) {
          const __mmask16 mask = lanes_mask16(imin(16, cols - j - 16));
          panel_rows<2>(abuf, 2 * kp, panels, kp, cj, ldc, rb, bj, first, last, gelu, mask);
        } else {
          const __mmask16 mask = lanes_mask16(imin(16, cols - j));
          panel_rows<1>(abuf, 2 * kp, panels, kp, cj, ldc, rb, bj, first, last, gelu, mask);
        }
      }
    }
  }
}

#undef PACA_ALWAYS_INLINE

}  // namespace

bool register_kernels(Float32Kernels& k) {
  k.gemm_packed_bf16 = gemm_packed_bf16;
  k.bf16_isa = "avx512bf16";
  return true;
}
#else   // compiled without -mavx512bf16 (another compiler or architecture): no bf16 build
bool register_kernels(Float32Kernels&) { return false; }
#endif

}  // namespace paca_kernels::cpu::avx512bf16
