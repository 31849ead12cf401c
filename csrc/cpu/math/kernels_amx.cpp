// The AMX-BF16 matrix products (see dispatch.h): gemm_packed_bf16 on the same bf16 pair panels as
// the AVX512-BF16 kernel (kernels_avx512bf16.cpp), through the tile unit where the CPU has one
// (Intel Sapphire Rapids and later; AMD Zen 4 has AVX512-BF16 but no AMX). This is the only
// translation unit compiled with -mamx-tile -mamx-bf16 (CMakeLists.txt); it follows the ODR rule of
// dispatch.h: nothing but intrinsics, C headers and data headers included, everything in an unnamed
// namespace inside paca_kernels::cpu::amx, register_kernels() the only external symbol.
//
// Why. On such a CPU vdpbf16ps issues at half the rate of vfmadd231ps (one port instead of two),
// so the AVX512-BF16 products are no faster than float32 ones; a tdpbf16ps multiplies a 16 x 32
// bf16 tile by a 32 x 16 one into 16 x 16 float32 sums, 16 times the work of a vdpbf16ps. The bf16
// pair panels are already the layout the tile unit wants for its right-hand side (16 pair-rows of
// 16 columns x 2 steps, 64 bytes a row), so the packing is shared; the left-hand side is rounded to
// bf16 by blocks of 32 rows x up to 1024 steps into a buffer on the stack (zero rows and steps past
// the ends, so every tile is whole), and each 32 x 32 block of the output is four accumulator tiles
// kept in the tile registers over the whole block of steps. The sums are stored through a 4 KiB
// bounce buffer, where the bias, GELU (float32, AVX-512) and the ragged edges are applied.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#include "cpu/math/dispatch.h"
#include "cpu/math/avx512_lanes.h"

namespace paca_kernels::cpu::amx {

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512BW__) && defined(__linux__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

#define PACA_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr int64_t kRows = 32;         // rows of A per block: two 16-row tiles
constexpr int64_t kStepBlock = 1024;  // reduction steps per block (a multiple of 32)
static_assert(kStepBlock % (2 * kBf16PairPad) == 0, "step blocks must hold whole tiles");

// The tile configuration (palette 1): tiles 0-3 the 16 x 16 float32 sums, 4-5 the A tiles
// (16 rows x 32 bf16), 6-7 the B tiles (16 pair-rows x 16 columns x 2). Every tile is 16 rows of
// 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// dst[i, 0 : width] = bf16(A[i, 0 : steps]) for i < rows, zero past `steps` and for the rows
// rows <= i < kRows. width is a multiple of 32.
inline void round_block(const float* A, int64_t lda, int64_t rows, int64_t steps, int64_t width,
                        uint16_t* dst) {
  for (int64_t i = 0; i < kRows; ++i) {
    uint16_t* d = dst + i * width;
    if (i >= rows) {
      for (int64_t t = 0; t < width; t += 32) _mm512_store_si512(d + t, _mm512_setzero_si512());
      continue;
    }
    const float* a = A + i * lda;
    for (int64_t t = 0; t < width; t += 16) {
      const __m512 v = t + 16 <= steps ? _mm512_loadu_ps(a + t)
                       : t < steps     ? _mm512_maskz_loadu_ps(lanes_mask16(steps - t), a + t)
                                       : _mm512_setzero_ps();
      const __m256bh h = _mm512_cvtneps_pbh(v);
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + t), reinterpret_cast<const __m256i&>(h));
    }
  }
}

// C = act(bias + A . B) (see GemmPackedBf16Fn), on the tile unit.
void gemm_packed_bf16_amx(const float* A, int64_t lda, const uint16_t* P, float* C, int64_t ldc,
                          int64_t rows, int64_t T, int64_t cols, const float* bias, bool gelu) {
  const int64_t pairs_total = ((T + 1) / 2 + kBf16PairPad - 1) / kBf16PairPad * kBf16PairPad;
  const int64_t npanel = (cols + 15) / 16;
  alignas(64) uint16_t abuf[kRows * kStepBlock];
  alignas(64) float bounce[kRows * 32];
  configure_tiles();
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t rb = imin(kRows, rows - r0);
    for (int64_t t0 = 0; t0 < T; t0 += kStepBlock) {
      const int64_t kc = imin(kStepBlock, T - t0);
      const int64_t width = (kc + 31) / 32 * 32;  // steps in abuf's rows: whole 32-step tiles
      round_block(A + r0 * lda + t0, lda, rb, kc, width, abuf);
      const bool first = t0 == 0, last = t0 + kc == T;
      for (int64_t p = 0; p < npanel; p += 2) {
        const int64_t j = 16 * p, w = imin(32, cols - j);  // this block's columns
        float* cj = C + r0 * ldc + j;
        if (first) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {  // the partial sums of the earlier step blocks, kept in C
          for (int64_t i = 0; i < kRows; ++i) {
            for (int64_t h = 0; h < 32; h += 16) {
              const __mmask16 m = i < rb ? lanes_mask16(imin(16, w - h > 0 ? w - h : 0)) : 0;
              _mm512_store_ps(bounce + i * 32 + h, _mm512_maskz_loadu_ps(m, cj + i * ldc + h));
            }
          }
          _tile_loadd(0, bounce, 128);
          _tile_loadd(1, bounce + 16, 128);
          _tile_loadd(2, bounce + 16 * 32, 128);
          _tile_loadd(3, bounce + 16 * 32 + 16, 128);
        }
        // The second panel of a ragged last pair is the first one again (its sums are never
        // stored): every tile op stays whole, reading only packed memory.
        const uint16_t* b0 = P + (p * pairs_total + t0 / 2) * 32;
        const uint16_t* b1 = p + 1 < npanel ? P + ((p + 1) * pairs_total + t0 / 2) * 32 : b0;
        for (int64_t k = 0; k < width; k += 32) {
          _tile_loadd(4, abuf + k, width * 2);
          _tile_loadd(5, abuf + 16 * width + k, width * 2);
          _tile_loadd(6, b0 + k * 16, 64);  // 16 pair-rows of 32 bf16 from pair k / 2
          _tile_loadd(7, b1 + k * 16, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, bounce, 128);
        _tile_stored(1, bounce + 16, 128);
        _tile_stored(2, bounce + 16 * 32, 128);
        _tile_stored(3, bounce + 16 * 32 + 16, 128);
        for (int64_t i = 0; i < rb; ++i) {
          for (int64_t h = 0; h < w; h += 16) {
            const __mmask16 m = lanes_mask16(imin(16, w - h));
            __m512 v = _mm512_load_ps(bounce + i * 32 + h);
            if (last) {
              if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + j + h));
              if (gelu) v = gelu_avx512(v);
            }
            _mm512_mask_storeu_ps(cj + i * ldc + h, m, v);
          }
        }
      }
    }
  }
  _tile_release();
}

#undef PACA_ALWAYS_INLINE

// Whether the CPU has AMX-BF16 and the OS lets this process use the tile data (Linux 5.16+ asks
// each process to request it: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)).
bool amx_usable() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace

bool register_kernels(Float32Kernels& k) {
  if (!amx_usable()) return false;
  k.gemm_packed_bf16 = gemm_packed_bf16_amx;
  k.bf16_isa = "amx";
  return true;
}
#else   // compiled without AMX (another compiler, architecture or OS): no AMX build
bool register_kernels(Float32Kernels&) { return false; }
#endif

}  // namespace paca_kernels::cpu::amx
