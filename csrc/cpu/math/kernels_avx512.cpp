// The AVX-512 float32 kernels (see dispatch.h): the matrix products, exp, row max, the softmax
// backward rows, GELU, the depthwise convolution and the bf16 <-> float32 conversions; the
// transpose of the AVX-512 build is the AVX2 one. This is the only translation unit compiled with
// -mavx512f -mavx2 -mfma (CMakeLists.txt); it follows the ODR rule of dispatch.h: nothing but intrinsics, C types and
// data headers included, everything in an unnamed namespace inside paca_kernels::cpu::avx512,
// register_kernels() the only external symbol.
#include <immintrin.h>

#include <cstdint>

#include "cpu/math/dispatch.h"
#include "cpu/math/avx512_lanes.h"

namespace paca_kernels::cpu::avx512 {

#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// GCC 12's avx512fintrin.h warns that the pass-through operand of its own max/min intrinsics "may
// be used uninitialized" (an _mm512_undefined_ps(), by design).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

#define PACA_ALWAYS_INLINE inline __attribute__((always_inline))

// Local helpers instead of std::min / std::max: no template of a shared header is instantiated
// here (see the ODR rule in dispatch.h).
constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- AVX-512 products ---------------------------------------------------------------------------
//
// The same products with 16-lane registers, on CPUs with AVX-512F. On the development machine (an
// AMD EPYC whose cores execute a 512-bit FMA as two 256-bit halves, so that the peak is the AVX2
// one) a 6 x 16 register tile ran the clustering head's and the attention's linears at 107-114
// GF/s on one core against 83-99 for the AVX2 6 x 16 tile (hot caches, same packed panels): half
// the instructions per FMA, the broadcast folded into the load, masked edges in hardware. Every
// output is the same chain of fused multiply-adds in the same order as in the AVX2 tiles, and GELU
// the same operations lane by lane, so the two builds give the same bits (tests compare them).

// tile_avx2 with 16-lane vectors: C[R x (16*NV)] (+)= sum_{t < T} A(i, t) * B[t, cols], A(i, t)
// at A[i * a_row + t * a_red]. `mask` limits the last vector's loads (of B when kMaskB, of C and
// init) and stores to the valid columns of a ragged edge; masked-off lanes are never read.
template <int R, int NV, bool kMasked, bool kMaskB = kMasked>
inline void tile_avx512(const float* A, int64_t a_row, int64_t a_red,
                                           const float* B, int64_t ldb, float* C, int64_t ldc,
                                           int64_t T, bool accumulate, __mmask16 mask,
                                           const float* init = nullptr, bool gelu = false) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
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
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      bv[v] = (kMaskB && v == NV - 1) ? _mm512_maskz_loadu_ps(mask, b + 16 * v)
                                        : _mm512_loadu_ps(b + 16 * v);
    }
    const float* a = A + t * a_red;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * a_row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
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

// All column tiles of R rows: 32 columns at a time, then a 16-wide or masked edge; a rest of 33
// to 48 columns (attention head widths 40 and 48, the 100 clusters as 32 + 32 + 36) as one
// 3-vector tile instead of a 2-vector tile and a 1-vector edge: one pass over A's broadcasts
// instead of two, and 3R independent accumulators where the lone 1-vector edge had R (too few to
// cover the FMA latency). Each output is the same FMA chain either way (same bits).
template <int R>
inline void row_block_avx512(const float* A, int64_t a_row, int64_t a_red,
                                                const float* B, int64_t ldb, float* C,
                                                int64_t ldc, int64_t T, int64_t cols,
                                                bool accumulate) {
  int64_t j = 0;
  for (; j + 32 <= cols && !(cols - j > 32 && cols - j <= 48); j += 32) {
    tile_avx512<R, 2, false>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate, 0xFFFF);
  }
  const int64_t rem = cols - j;
  if (rem == 0) return;
  if (rem == 48) {
    tile_avx512<R, 3, false>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate, 0xFFFF);
    return;
  }
  if (rem > 32) {
    tile_avx512<R, 3, true>(A, a_row, a_red, B + j, ldb, C + j, ldc, T, accumulate,
                            lanes_mask16(rem - 32));
    return;
  }
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
inline void panel_rows_avx512(const float* A, int64_t a_row, int64_t a_red,
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

// Two adjacent packed panels at once: C[R x 32] (+)= A[R x T] * [p0 | p1] (each T x 16, row
// stride 16, zero-padded), the second panel's columns limited by `mask1` (loads of C and init,
// stores; its padding lanes are read but never stored). 2R accumulators: one 6 x 16 tile keeps only
// six FMA chains in flight and loads a broadcast per FMA, about 60 % of the FMA peak measured on
// this machine's cores (Intel, two 512-bit FMA ports); R = 8 rows x 2 panels keeps 16 chains and
// loads 10 values per 16 FMAs. Each output is the same chain of FMAs in the same order as in the
// one-panel tiles (t ascending; where the reduction is cut into chunks, the partial sums are only
// stored and reloaded, exactly), so the results are bit-identical.
// kTransA: A(i, t) at A[t * lda + i] (the transposed left operand of gemm_tn_acc: the tile's R
// broadcasts of a step are adjacent) instead of A[i * lda + t].
template <int R, bool kMasked1, bool kTransA = false>
inline void tile_panels2_avx512(const float* A, int64_t lda, const float* p0, const float* p1,
                                float* C, int64_t ldc, int64_t T, bool accumulate, __mmask16 mask1,
                                const float* init, bool gelu) {
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    if (!accumulate) {
      acc0[i] = init == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(init);
      acc1[i] = init == nullptr ? _mm512_setzero_ps()
                : kMasked1      ? _mm512_maskz_loadu_ps(mask1, init + 16)
                                : _mm512_loadu_ps(init + 16);
    } else {
      acc0[i] = _mm512_loadu_ps(C + i * ldc);
      acc1[i] = kMasked1 ? _mm512_maskz_loadu_ps(mask1, C + i * ldc + 16)
                         : _mm512_loadu_ps(C + i * ldc + 16);
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const __m512 b0 = _mm512_load_ps(p0 + 16 * t);
    const __m512 b1 = _mm512_load_ps(p1 + 16 * t);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(kTransA ? A[t * lda + i] : A[i * lda + t]);
      acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    if (gelu) {
      acc0[i] = gelu_avx512(acc0[i]);
      acc1[i] = gelu_avx512(acc1[i]);
    }
    _mm512_storeu_ps(C + i * ldc, acc0[i]);
    if (kMasked1) {
      _mm512_mask_storeu_ps(C + i * ldc + 16, mask1, acc1[i]);
    } else {
      _mm512_storeu_ps(C + i * ldc + 16, acc1[i]);
    }
  }
}

// All rows of A against two adjacent panels: 8-row tiles, then the rest.
template <bool kMasked1, bool kTransA = false>
inline void panels2_rows_avx512(const float* A, int64_t lda, const float* p0, const float* p1,
                                float* C, int64_t ldc, int64_t rows, int64_t T, bool accumulate,
                                __mmask16 mask1, const float* init, bool gelu) {
  constexpr int kRows = 8;
  const int64_t row_step = kTransA ? 1 : lda;  // A's offset between rows
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    tile_panels2_avx512<kRows, kMasked1, kTransA>(A + r * row_step, lda, p0, p1, C + r * ldc, ldc,
                                                  T, accumulate, mask1, init, gelu);
  }
  const float* Ar = A + r * row_step;
  float* Cr = C + r * ldc;
#define PACA_PANELS2_TAIL(R)                                                                       \
  case R:                                                                                          \
    tile_panels2_avx512<R, kMasked1, kTransA>(Ar, lda, p0, p1, Cr, ldc, T, accumulate, mask1,      \
                                              init, gelu);                                         \
    break;
  switch (rows - r) {
    PACA_PANELS2_TAIL(7)
    PACA_PANELS2_TAIL(6)
    PACA_PANELS2_TAIL(5)
    PACA_PANELS2_TAIL(4)
    PACA_PANELS2_TAIL(3)
    PACA_PANELS2_TAIL(2)
    PACA_PANELS2_TAIL(1)
    default: break;
  }
#undef PACA_PANELS2_TAIL
}

// gemm_avx2 with the 16-lane tiles: B packed per call into 16-column panels of kPanelSteps
// reduction steps when it is too big to stay in L1, else read in place (32-column tiles).
inline void gemm_avx512(const float* A, int64_t a_row, int64_t a_red,
                                           const float* B, int64_t ldb, float* C, int64_t ldc,
                                           int64_t rows, int64_t T, int64_t cols,
                                           bool accumulate) {
  if (rows >= 12 && T * cols > 8192) {
    // Two panels (32 columns) at a time through the 8 x 32 tiles (16 FMA chains; the 6 x 16 tile
    // of one panel keeps 6 and ran at about 60 % of the FMA peak), the last odd panel alone. Each
    // output is the same FMA chain, t ascending, either way (a chunk's partial sums are stored and
    // reloaded exactly), so the bits do not change. A's layout: a_red == 1 (gemm_nn) or
    // a_row == 1 (gemm_tn_acc); anything else takes the one-panel tiles.
    alignas(64) float panel[kPanelSteps * 16];
    int64_t j = 0;
    if (a_red == 1 || a_row == 1) {
      // Half the chunk: both panels together (2 x 8 KiB) take the one panel's 16 KiB of L1.
      constexpr int64_t kSteps2 = kPanelSteps / 2;
      float* const pa = panel;
      float* const pb = panel + kSteps2 * 16;
      const int64_t lda = a_red == 1 ? a_row : a_red;
      for (; j + 16 < cols; j += 32) {
        const int64_t w1 = imin(16, cols - j - 16);
        const __mmask16 mask1 = lanes_mask16(w1);
        for (int64_t t0 = 0; t0 < T; t0 += kSteps2) {
          const int64_t kc = imin(kSteps2, T - t0);
          const float* Bt = B + t0 * ldb + j;
          for (int64_t t = 0; t < kc; ++t) {  // the second panel zero-padded past w1
            _mm512_store_ps(pa + 16 * t, _mm512_loadu_ps(Bt + t * ldb));
            _mm512_store_ps(pb + 16 * t, _mm512_maskz_loadu_ps(mask1, Bt + t * ldb + 16));
          }
          const float* At = A + t0 * a_red;
          const bool acc = accumulate || t0 > 0;
          if (a_red == 1) {
            if (w1 == 16) {
              panels2_rows_avx512<false>(At, lda, pa, pb, C + j, ldc, rows, kc, acc, mask1,
                                         nullptr, false);
            } else {
              panels2_rows_avx512<true>(At, lda, pa, pb, C + j, ldc, rows, kc, acc, mask1,
                                        nullptr, false);
            }
          } else if (w1 == 16) {
            panels2_rows_avx512<false, true>(At, lda, pa, pb, C + j, ldc, rows, kc, acc, mask1,
                                             nullptr, false);
          } else {
            panels2_rows_avx512<true, true>(At, lda, pa, pb, C + j, ldc, rows, kc, acc, mask1,
                                            nullptr, false);
          }
        }
      }
    }
    for (; j < cols; j += 16) {
      const int64_t w = imin(16, cols - j);
      const __mmask16 mask = lanes_mask16(w);
      for (int64_t t0 = 0; t0 < T; t0 += kPanelSteps) {
        const int64_t kc = imin(kPanelSteps, T - t0);
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
  // 8-row blocks (16-24 FMA chains; the attention's blocks of 48 query rows are six of them),
  // then 6-row ones: the same FMA chain per output either way.
  for (; r + 8 <= rows; r += 8) {
    row_block_avx512<8>(A + r * a_row, a_row, a_red, B, ldb, C + r * ldc, ldc, T, cols,
                        accumulate);
  }
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

// gemm_packed_f32_avx2 with the 16-lane tiles, on the same packed panels (PackedMatrix): two
// panels (32 columns) at a time, then a last single panel.
void gemm_packed_f32_avx512(const float* A, int64_t lda, const float* P,
                                               float* C, int64_t ldc, int64_t rows, int64_t T,
                                               int64_t cols, const float* bias, bool gelu) {
  int64_t j0 = 0;
  for (; j0 + 16 < cols; j0 += 32) {
    const int64_t w1 = imin(16, cols - j0 - 16);
    const __mmask16 mask1 = lanes_mask16(w1);
    const float* panel0 = P + (j0 / 16) * T * 16;
    const float* panel1 = panel0 + T * 16;
    const float* init = bias == nullptr ? nullptr : bias + j0;
    for (int64_t t0 = 0; t0 < T; t0 += kPanelSteps) {
      const int64_t kc = imin(kPanelSteps, T - t0);
      const bool acc = t0 > 0;
      const bool act = gelu && t0 + kc == T;
      if (w1 == 16) {
        panels2_rows_avx512<false>(A + t0, lda, panel0 + 16 * t0, panel1 + 16 * t0, C + j0, ldc, rows,
                                   kc, acc, mask1, init, act);
      } else {
        panels2_rows_avx512<true>(A + t0, lda, panel0 + 16 * t0, panel1 + 16 * t0, C + j0, ldc, rows,
                                  kc, acc, mask1, init, act);
      }
    }
  }
  for (int64_t j = j0; j < cols; j += 16) {
    const int64_t w = imin(16, cols - j);
    const __mmask16 mask = lanes_mask16(w);
    const float* panel = P + (j / 16) * T * 16;
    const float* init = bias == nullptr ? nullptr : bias + j;
    for (int64_t t0 = 0; t0 < T; t0 += kPanelSteps) {
      const int64_t kc = imin(kPanelSteps, T - t0);
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

void gemm_nn_f32_avx512(const float* A, int64_t lda, const float* B,
                                           int64_t ldb, float* C, int64_t ldc, int64_t rows,
                                           int64_t K, int64_t cols, bool accumulate) {
  gemm_avx512(A, lda, 1, B, ldb, C, ldc, rows, K, cols, accumulate);
}

void gemm_tn_acc_f32_avx512(const float* A, int64_t lda, const float* B,
                                               int64_t ldb, float* C, int64_t ldc, int64_t rows,
                                               int64_t K, int64_t cols) {
  gemm_avx512(A, 1, lda, B, ldb, C, ldc, K, rows, cols, /*accumulate=*/true);
}

// ---- AVX-512 elementwise kernels -----------------------------------------------------------------
//
// exp, row max, GELU and the depthwise convolution of kernels_avx2.cpp on 16-lane registers. On the
// bf16 paths (AMX products) these float32 passes were most of the fused kernels' time, run 8 lanes
// at a time. Each lane computes exactly what the AVX2 kernel computes for it (the same operations in
// the same order; the exp sum is accumulated in the AVX2 kernel's 8-lane order), so the two builds
// still give the same bits (tests/ops compare them).

// exp_avx2 on 16 lanes: the same Cephes exp, operation by operation.
PACA_ALWAYS_INLINE __m512 exp_avx512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3365f), hi = _mm512_set1_ps(88.3762f);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  const __m512 kf = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y =
      _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i k = _mm512_cvtps_epi32(kf);
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(127)), 23);
  __m512 z = _mm512_mul_ps(y, _mm512_castsi512_ps(bits));  // y * 2^k
  z = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), z, _mm512_setzero_ps());
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), z, x);  // NaN stays NaN
}

// Lanes 8-15 (AVX512F has no 32-bit-lane extract of a 256-bit half; the 64-bit one moves the same bits).
PACA_ALWAYS_INLINE __m256 high_half(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

// lane_sum8 of kernels_avx2.cpp: the eight lanes added in its fixed order (the same bits).
PACA_ALWAYS_INLINE float lane_sum8(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}

// The softmax rows below run R rows at a time. One row alone is latency-bound: its maxima, its
// exp sum and its sum of e o dP are each a chain of dependent vector operations (a 100-wide
// attention row: 7 vectors, so every pass is a few dozen cycles of latency for a few cycles of
// work). R rows give R independent chains. Each row still takes its values in the one-row order,
// so every row gets the bits it gets alone (and the AVX2 kernel's: tests compare the builds).

// Row maxima of R rows (row r at x + r * ld), NaN entries skipped (max_ps(v, m) returns m when v
// is NaN). m holds no NaN, so the shuffle reduction gives the lane loop's value (a zero of either
// sign at most differs in sign, which exp(s - max) ignores).
template <int R>
PACA_ALWAYS_INLINE void row_max_block_avx512(const float* x, int64_t ld, int64_t n, float* mx) {
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
  __m512 m[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) m[r] = neg_inf;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) m[r] = _mm512_max_ps(_mm512_loadu_ps(x + r * ld + i), m[r]);
  }
  if (i < n) {
    const __mmask16 mask = lanes_mask16(n - i);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      m[r] = _mm512_max_ps(_mm512_mask_loadu_ps(neg_inf, mask, x + r * ld + i), m[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) mx[r] = _mm512_reduce_max_ps(m[r]);
}

// exp_shifted_f32_avx2 with 16-lane exps, R rows at a time: out[r, i] = exp(in[r, i] - shift[r]),
// sum[r] their sum. The sum keeps the AVX2 kernel's 8 partial sums, each taking its elements in
// the same order (the low then the high half of each 16-lane vector), and combines them as it
// does: the same bits.
template <int R>
PACA_ALWAYS_INLINE void exp_shifted_block_avx512(const float* in, int64_t ldi, const float* shift,
                                                 float* out, int64_t ldo, int64_t n, float* sum) {
  __m512 sh[R];
  __m256 acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    sh[r] = _mm512_set1_ps(shift[r]);
    acc[r] = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(in + r * ldi + i), sh[r]));
      _mm512_storeu_ps(out + r * ldo + i, e);
      acc[r] = _mm256_add_ps(acc[r], _mm512_castps512_ps256(e));
      acc[r] = _mm256_add_ps(acc[r], high_half(e));
    }
  }
  if (i < n) {
    const int64_t rest = n - i;
    const __mmask16 m = lanes_mask16(rest);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, in + r * ldi + i), sh[r]));
      _mm512_mask_storeu_ps(out + r * ldo + i, m, e);
      const __m512 ev = _mm512_maskz_mov_ps(m, e);  // valid lanes only, as the AVX2 tail
      acc[r] = _mm256_add_ps(acc[r], _mm512_castps512_ps256(ev));
      if (rest > 8) acc[r] = _mm256_add_ps(acc[r], high_half(ev));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) sum[r] = lane_sum8(acc[r]);
}

// exp_shifted_cols (dispatch.h) on 16 lanes: each lane the exp of exp_shifted, then the product
// (the same bits as the AVX2 kernel).
template <bool kGrad>
inline void exp_shifted_cols_avx512(const float* in, int64_t ldi, int64_t rows, int64_t n,
                                    const float* shift, const float* scale, float* out,
                                    int64_t ldo, const float* ds, int64_t ldd, const float* rd,
                                    float* grad, int64_t ldg) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = in + r * ldi;
    float* o = out + r * ldo;
    const float* d = kGrad ? ds + r * ldd : nullptr;
    float* g = kGrad ? grad + r * ldg : nullptr;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : lanes_mask16(n - i);
      const __m512 e = exp_avx512(
          _mm512_sub_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, shift + i)));
      const __m512 s = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(m, scale + i));
      _mm512_mask_storeu_ps(o + i, m, s);
      if (kGrad) {  // the softmax backward from the registers: a sub and a mul, as AVX2's
        _mm512_mask_storeu_ps(g + i, m,
                              _mm512_mul_ps(s, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, d + i),
                                                             _mm512_maskz_loadu_ps(m, rd + i))));
      }
    }
  }
}
void exp_shifted_cols_f32_avx512(const float* in, int64_t ldi, int64_t rows, int64_t n,
                                 const float* shift, const float* scale, float* out, int64_t ldo,
                                 const float* ds, int64_t ldd, const float* rd, float* grad,
                                 int64_t ldg) {
  if (ds != nullptr) {
    exp_shifted_cols_avx512<true>(in, ldi, rows, n, shift, scale, out, ldo, ds, ldd, rd, grad,
                                  ldg);
  } else {
    exp_shifted_cols_avx512<false>(in, ldi, rows, n, shift, scale, out, ldo, ds, ldd, rd, grad,
                                   ldg);
  }
}

float exp_shifted_f32_avx512(const float* in, float shift, float* out, int64_t n) {
  float sum;
  exp_shifted_block_avx512<1>(in, 0, &shift, out, 0, n, &sum);
  return sum;
}

float row_max_f32_avx512(const float* x, int64_t n) {
  float mx;
  row_max_block_avx512<1>(x, 0, n, &mx);
  return mx;
}

// exp_minus_row_max_rows (dispatch.h): four rows at a time.
void exp_minus_row_max_rows_f32_avx512(float* s, int64_t lds, int64_t rows, int64_t n, float* mx,
                                       float* sum) {
  constexpr int kR = 4;
  int64_t r = 0;
  for (; r + kR <= rows; r += kR) {
    float* sr = s + r * lds;
    row_max_block_avx512<kR>(sr, lds, n, mx + r);
    exp_shifted_block_avx512<kR>(sr, lds, mx + r, sr, lds, n, sum + r);
  }
  for (; r < rows; ++r) {
    float* sr = s + r * lds;
    row_max_block_avx512<1>(sr, lds, n, mx + r);
    exp_shifted_block_avx512<1>(sr, lds, mx + r, sr, lds, n, sum + r);
  }
}

// The softmax backward rows' last pass: P = e * inv[r] into p (p may be e) and
// dS = P o (dP - d[r]) over dP in ds, for R rows (16 lanes, masked at the row's end).
template <int R>
PACA_ALWAYS_INLINE void softmax_bwd_last_pass_avx512(const float* e, int64_t lde, const float* inv,
                                                     const float* d, float* p, int64_t ldp,
                                                     float* ds, int64_t ldd, int64_t n) {
  __m512 iv[R], dv0[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    iv[r] = _mm512_set1_ps(inv[r]);
    dv0[r] = _mm512_set1_ps(d[r]);
  }
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xFFFF) : lanes_mask16(n - i);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* dr = ds + r * ldd + i;
      const __m512 pv = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, e + r * lde + i), iv[r]);
      _mm512_mask_storeu_ps(p + r * ldp + i, mask, pv);
      const __m512 dv = _mm512_maskz_loadu_ps(mask, dr);
      _mm512_mask_storeu_ps(dr, mask, _mm512_mul_ps(pv, _mm512_sub_ps(dv, dv0[r])));
    }
  }
}

// softmax_bwd_row_f32_avx2 on 16 lanes, R rows at a time, the same bits: the sums of e and of
// e o dP go into 8-lane accumulators, low half then high half, as the AVX2 kernel adds its vectors
// (a high half wholly past n is not added, as the AVX2 loop ends before it).
template <int R>
PACA_ALWAYS_INLINE void softmax_bwd_block_avx512(float* p, int64_t ldp, float* ds, int64_t ldd,
                                                 int64_t n) {
  float mx[R];
  row_max_block_avx512<R>(p, ldp, n, mx);
  __m512 sh[R];
  __m256 acc[R], accd[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    sh[r] = _mm512_set1_ps(mx[r]);
    acc[r] = _mm256_setzero_ps();
    accd[r] = _mm256_setzero_ps();
  }
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xFFFF) : lanes_mask16(n - i);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* pr = p + r * ldp + i;
      const __m512 s = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, pr), sh[r]);
      const __m512 e = _mm512_maskz_mov_ps(mask, exp_avx512(s));  // valid lanes only
      _mm512_mask_storeu_ps(pr, mask, e);
      const __m512 dv = _mm512_maskz_loadu_ps(mask, ds + r * ldd + i);
      acc[r] = _mm256_add_ps(acc[r], _mm512_castps512_ps256(e));
      accd[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(e), _mm512_castps512_ps256(dv), accd[r]);
      if (n - i > 8) {
        acc[r] = _mm256_add_ps(acc[r], high_half(e));
        accd[r] = _mm256_fmadd_ps(high_half(e), high_half(dv), accd[r]);
      }
    }
  }
  float inv[R], d[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    inv[r] = 1.0f / lane_sum8(acc[r]);
    d[r] = lane_sum8(accd[r]) * inv[r];
  }
  softmax_bwd_last_pass_avx512<R>(p, ldp, inv, d, p, ldp, ds, ldd, n);
}

// softmax_bwd_block_avx512 from the forward's numerators e and their sums (softmax_bwd_saved_rows,
// dispatch.h): the same sums of e o dP in the same lanes and order, and the same last pass, so the
// bits of the block that recomputes e.
template <int R>
PACA_ALWAYS_INLINE void softmax_bwd_saved_block_avx512(const float* e, int64_t lde,
                                                       const float* sum, float* p, int64_t ldp,
                                                       float* ds, int64_t ldd, int64_t n) {
  __m256 accd[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) accd[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xFFFF) : lanes_mask16(n - i);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 ev = _mm512_maskz_loadu_ps(mask, e + r * lde + i);
      const __m512 dv = _mm512_maskz_loadu_ps(mask, ds + r * ldd + i);
      accd[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(ev), _mm512_castps512_ps256(dv), accd[r]);
      if (n - i > 8) accd[r] = _mm256_fmadd_ps(high_half(ev), high_half(dv), accd[r]);
    }
  }
  float inv[R], d[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    inv[r] = 1.0f / sum[r];
    d[r] = lane_sum8(accd[r]) * inv[r];
  }
  softmax_bwd_last_pass_avx512<R>(e, lde, inv, d, p, ldp, ds, ldd, n);
}

void softmax_bwd_saved_rows_f32_avx512(const float* e, int64_t lde, const float* sum, float* p,
                                       int64_t ldp, float* ds, int64_t ldd, int64_t rows,
                                       int64_t n) {
  constexpr int kR = 4;
  int64_t r = 0;
  for (; r + kR <= rows; r += kR) {
    softmax_bwd_saved_block_avx512<kR>(e + r * lde, lde, sum + r, p + r * ldp, ldp, ds + r * ldd,
                                       ldd, n);
  }
  for (; r < rows; ++r) {
    softmax_bwd_saved_block_avx512<1>(e + r * lde, lde, sum + r, p + r * ldp, ldp, ds + r * ldd,
                                      ldd, n);
  }
}

// softmax_bwd_rows (dispatch.h): four rows at a time.
void softmax_bwd_rows_f32_avx512(float* p, int64_t ldp, float* ds, int64_t ldd, int64_t rows,
                                 int64_t n) {
  constexpr int kR = 4;
  int64_t r = 0;
  for (; r + kR <= rows; r += kR) softmax_bwd_block_avx512<kR>(p + r * ldp, ldp, ds + r * ldd, ldd, n);
  for (; r < rows; ++r) softmax_bwd_block_avx512<1>(p + r * ldp, ldp, ds + r * ldd, ldd, n);
}

void gelu_f32_avx512(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, gelu_avx512(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 m = lanes_mask16(n - i);
    _mm512_mask_storeu_ps(x + i, m, gelu_avx512(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

constexpr int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// dw_tile_avx2 on 16-lane vectors: P output pixels x NV vectors of 16 channels accumulated in
// registers over the nky x nkx taps of their window (see there for `in`, `in_row`, `in_px`, `wt`).
template <int P, int NV, bool kMasked, bool kInBias>
PACA_ALWAYS_INLINE void dw_tile_avx512(const float* in, int64_t in_row, int64_t in_px,
                                       const float* wt, int64_t nky, int64_t nkx, int64_t k,
                                       const float* bias, const float* in_bias, bool gelu,
                                       float* out, int64_t C, __mmask16 mask) {
  __m512 acc[P][NV];
  [[maybe_unused]] __m512 ib[NV];
  const auto load = [mask](const float* p, bool m) {
    return m ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p);
  };
  for (int v = 0; v < NV; ++v) {
    const bool m = kMasked && v == NV - 1;
    const __m512 b0 = bias == nullptr ? _mm512_setzero_ps() : load(bias + 16 * v, m);
    for (int p = 0; p < P; ++p) acc[p][v] = b0;
    if constexpr (kInBias) ib[v] = load(in_bias + 16 * v, m);
  }
  for (int64_t ky = 0; ky < nky; ++ky) {
    for (int64_t kx = 0; kx < nkx; ++kx) {
      const float* wv = wt + (ky * k + kx) * C;
      const float* iv = in + ky * in_row + kx * in_px;
      for (int v = 0; v < NV; ++v) {
        const bool m = kMasked && v == NV - 1;
        const __m512 w = load(wv + 16 * v, m);
        for (int p = 0; p < P; ++p) {
          __m512 xv = load(iv + p * in_px + 16 * v, m);
          if constexpr (kInBias) xv = _mm512_add_ps(xv, ib[v]);
          acc[p][v] = _mm512_fmadd_ps(xv, w, acc[p][v]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int v = 0; v < NV; ++v) {
      float* op = out + p * C + 16 * v;
      const __m512 r = gelu ? gelu_avx512(acc[p][v]) : acc[p][v];
      if (kMasked && v == NV - 1) {
        _mm512_mask_storeu_ps(op, mask, r);
      } else {
        _mm512_storeu_ps(op, r);
      }
    }
  }
}

// All channel tiles of P adjacent output pixels (32 channels at a time, then the edge).
template <int P, bool kInBias>
PACA_ALWAYS_INLINE void dw_pixels_avx512(const float* in, int64_t in_row, int64_t in_px,
                                         const float* wt, int64_t nky, int64_t nkx, int64_t k,
                                         const float* bias, const float* in_bias, bool gelu,
                                         float* out, int64_t C) {
  const auto at = [](const float* p, int64_t c) { return p ? p + c : nullptr; };
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    dw_tile_avx512<P, 2, false, kInBias>(in + c, in_row, in_px, wt + c, nky, nkx, k, at(bias, c),
                                         at(in_bias, c), gelu, out + c, C, 0xFFFF);
  }
  const int64_t rem = C - c;
  if (rem == 0) return;
  if (rem > 16) {
    dw_tile_avx512<P, 2, true, kInBias>(in + c, in_row, in_px, wt + c, nky, nkx, k, at(bias, c),
                                        at(in_bias, c), gelu, out + c, C,
                                        lanes_mask16(rem - 16));
  } else {
    dw_tile_avx512<P, 1, true, kInBias>(in + c, in_row, in_px, wt + c, nky, nkx, k, at(bias, c),
                                        at(in_bias, c), gelu, out + c, C, lanes_mask16(rem));
  }
}

void dwconv_band_f32_avx512(const float* in, int64_t in_w, const float* wt, const float* bias,
                            float* out, int64_t rows, int64_t W, int64_t C, int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    int64_t j = 0;
    for (; j + 4 <= W; j += 4) {
      dw_pixels_avx512<4, false>(in + (r * in_w + j) * C, in_w * C, C, wt, k, k, k, bias,
                                 nullptr, false, out + (r * W + j) * C, C);
    }
    for (; j < W; ++j) {
      dw_pixels_avx512<1, false>(in + (r * in_w + j) * C, in_w * C, C, wt, k, k, k, bias,
                                 nullptr, false, out + (r * W + j) * C, C);
    }
  }
}

// dw_slide_avx2 on 16-lane vectors: P adjacent output pixels of one image row x 16 channels, the
// K weight vectors of a tap row in registers, each input vector loaded once (see there).
template <int K, int P, bool kMasked, bool kInBias>
PACA_ALWAYS_INLINE void dw_slide_avx512(const float* in, int64_t in_row, int64_t in_px,
                                        const float* wt, int64_t nky, int ilo, int ihi,
                                        const float* bias, const float* in_bias, bool gelu,
                                        float* out, int64_t C, __mmask16 mask) {
  constexpr int kPad = (K - 1) / 2;
  const auto load = [mask](const float* p) {
    return kMasked ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p);
  };
  const __m512 b0 = bias == nullptr ? _mm512_setzero_ps() : load(bias);
  __m512 acc[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) acc[p] = b0;
  [[maybe_unused]] __m512 ib;
  if constexpr (kInBias) ib = load(in_bias);
  for (int64_t ky = 0; ky < nky; ++ky) {
    const float* irow = in + ky * in_row;
    __m512 w[K];
#pragma GCC unroll 16
    for (int kx = 0; kx < K; ++kx) w[kx] = load(wt + (ky * K + kx) * C);
#pragma GCC unroll 32
    for (int i = 0; i < P + K - 1; ++i) {
      if (i < ilo || i >= ihi) continue;
      __m512 xv = load(irow + (i - kPad) * in_px);
      if constexpr (kInBias) xv = _mm512_add_ps(xv, ib);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        if (i - p >= 0 && i - p < K) acc[p] = _mm512_fmadd_ps(xv, w[i - p], acc[p]);
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    const __m512 r = gelu ? gelu_avx512(acc[p]) : acc[p];
    if constexpr (kMasked) {
      _mm512_mask_storeu_ps(out + p * C, mask, r);
    } else {
      _mm512_storeu_ps(out + p * C, r);
    }
  }
}

// dw_row_slide_avx2 with the 16-lane tiles: one output row of a K-wide depthwise convolution, the
// tiles in the order `cached` asks for (DwDirectFn in dispatch.h; no output's sum depends on it).
template <int K, int P, bool kInBias>
void dw_row_slide_avx512(const float* in, int64_t in_row, int64_t in_px, int64_t W,
                         const float* wt, int64_t nky, const float* bias, const float* in_bias,
                         bool gelu, float* out, int64_t C, bool cached) {
  constexpr int kPad = (K - 1) / 2;
  const auto at = [](const float* p, int64_t c) { return p ? p + c : nullptr; };
  // The tile of P pixels from column j0 (moved left at the row's end) and 16 channels from c.
  const auto tile = [&](int64_t j0, int64_t c) __attribute__((always_inline)) {
    const bool masked = C - c < 16;
    const __mmask16 mask = lanes_mask16(imin(16, C - c));
    const int64_t j = imin(j0, W - P);
    const int ilo = static_cast<int>(imax(0, kPad - j));
    const int ihi = static_cast<int>(imin(P + K - 1, W + kPad - j));
    const float* ip = in + j * in_px + c;
    float* op = out + j * C + c;
    if (!cached) {
      // The image streams from memory: the lines of the next output row's new input row this
      // tile reads, into L2, so that they have arrived when the next output row needs them (the
      // MLP's forward at PaCa-ViT-Tiny's first stage, B = 8: 1.45x; on rows already in cache it
      // only cost time). A prefetch never faults, so the row past the image's last one is harmless.
      const float* pf = ip + nky * in_row - kPad * in_px;
      for (int i = ilo; i < ihi; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + i * in_px), _MM_HINT_T1);
      }
    }
    if (masked) {
      dw_slide_avx512<K, P, true, kInBias>(ip, in_row, in_px, wt + c, nky, ilo, ihi, at(bias, c),
                                           at(in_bias, c), gelu, op, C, mask);
    } else {
      dw_slide_avx512<K, P, false, kInBias>(ip, in_row, in_px, wt + c, nky, ilo, ihi,
                                            at(bias, c), at(in_bias, c), gelu, op, C, mask);
    }
  };
  if (cached) {
    for (int64_t c = 0; c < C; c += 16) {
      for (int64_t j0 = 0; j0 < W; j0 += P) tile(j0, c);
    }
  } else {
    for (int64_t j0 = 0; j0 < W; j0 += P) {
      for (int64_t c = 0; c < C; c += 16) tile(j0, c);
    }
  }
}

// dwconv_direct_avx2 with the 16-lane tiles (the same cases, the same sums).
template <bool kInBias>
void dwconv_direct_avx512(const float* img, int64_t px, int64_t y_base, int64_t H, int64_t W,
                          int64_t y0, int64_t rows, const float* wt, const float* bias,
                          const float* in_bias, bool gelu, float* out, int64_t C, int64_t k,
                          bool cached) {
  const int64_t pad = (k - 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = y0 + r;
    const int64_t ky0 = imax(0, pad - y), ky1 = imin(k, H + pad - y);
    const int64_t row0 = y - pad + ky0 - y_base;
    float* orow = out + r * W * C;
    if (k == 7 && W >= 7) {
      dw_row_slide_avx512<7, 7, kInBias>(img + row0 * W * px, W * px, px, W, wt + ky0 * k * C,
                                         ky1 - ky0, bias, in_bias, gelu, orow, C, cached);
      continue;
    }
    if (k == 5 && W >= 8) {
      dw_row_slide_avx512<5, 8, kInBias>(img + row0 * W * px, W * px, px, W, wt + ky0 * k * C,
                                         ky1 - ky0, bias, in_bias, gelu, orow, C, cached);
      continue;
    }
    if (k == 3 && W >= 8) {
      dw_row_slide_avx512<3, 8, kInBias>(img + row0 * W * px, W * px, px, W, wt + ky0 * k * C,
                                         ky1 - ky0, bias, in_bias, gelu, orow, C, cached);
      continue;
    }
    int64_t j = 0;
    while (j < W) {
      if (j >= pad && j + 4 <= W - pad) {
        dw_pixels_avx512<4, kInBias>(img + (row0 * W + j - pad) * px, W * px, px,
                                     wt + ky0 * k * C, ky1 - ky0, k, k, bias, in_bias, gelu,
                                     orow + j * C, C);
        j += 4;
      } else {
        const int64_t kx0 = imax(0, pad - j), kx1 = imin(k, W + pad - j);
        dw_pixels_avx512<1, kInBias>(img + (row0 * W + j - pad + kx0) * px, W * px, px,
                                     wt + (ky0 * k + kx0) * C, ky1 - ky0, kx1 - kx0, k, bias,
                                     in_bias, gelu, orow + j * C, C);
        j += 1;
      }
    }
  }
}

void dwconv_direct_f32_avx512(const float* img, int64_t px, int64_t y_base, int64_t H, int64_t W,
                              int64_t y0, int64_t rows, const float* wt, const float* bias,
                              const float* in_bias, bool gelu, float* out, int64_t C, int64_t k,
                              bool cached) {
  if (in_bias != nullptr) {
    dwconv_direct_avx512<true>(img, px, y_base, H, W, y0, rows, wt, bias, in_bias, gelu, out, C,
                               k, cached);
  } else {
    dwconv_direct_avx512<false>(img, px, y_base, H, W, y0, rows, wt, bias, nullptr, gelu, out, C,
                                k, cached);
  }
}

// bf16 -> float32: the 16 bits moved to the top of each lane (exact).
void bf16_to_f32_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  for (; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    __builtin_memcpy(dst + i, &u, 4);
  }
}

// float32 -> bf16 as c10::BFloat16(float) does it: u + 0x7FFF + (bit 16 of u), the top 16 bits
// (round to nearest even), and 0x7FC0 for NaN. Integer arithmetic, so denormals round like any
// other value (vcvtneps2bf16 would flush them to zero).
PACA_ALWAYS_INLINE __m256i f32_to_bf16_16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

void f32_to_bf16_avx512(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), f32_to_bf16_16(_mm512_loadu_ps(src + i)));
  }
  if (i < n) {
    alignas(32) uint16_t tmp[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp),
                       f32_to_bf16_16(_mm512_maskz_loadu_ps(lanes_mask16(n - i), src + i)));
    for (int64_t j = 0; j < n - i; ++j) dst[i + j] = tmp[j];
  }
}

#undef PACA_ALWAYS_INLINE

}  // namespace

bool register_kernels(Float32Kernels& k) {
  k.gemm_nn = gemm_nn_f32_avx512;
  k.gemm_tn_acc = gemm_tn_acc_f32_avx512;
  k.gemm_packed = gemm_packed_f32_avx512;
  k.exp_shifted = exp_shifted_f32_avx512;
  k.exp_shifted_cols = exp_shifted_cols_f32_avx512;
  k.row_max = row_max_f32_avx512;
  k.softmax_bwd_rows = softmax_bwd_rows_f32_avx512;
  k.softmax_bwd_saved_rows = softmax_bwd_saved_rows_f32_avx512;
  k.exp_minus_row_max_rows = exp_minus_row_max_rows_f32_avx512;
  k.gelu = gelu_f32_avx512;
  k.dwconv_band = dwconv_band_f32_avx512;
  k.dwconv_direct = dwconv_direct_f32_avx512;
  k.bf16_to_f32 = bf16_to_f32_avx512;
  k.f32_to_bf16 = f32_to_bf16_avx512;
  k.isa = "avx512";
  return true;
}
#else   // compiled without -mavx512f (another compiler or architecture): no AVX-512 build
bool register_kernels(Float32Kernels&) { return false; }
#endif

}  // namespace paca_kernels::cpu::avx512
