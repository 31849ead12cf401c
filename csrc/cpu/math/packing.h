// PackedMatrix: a linear layer's weight packed as the right-hand side of the products (16-column
// panels for the vector builds' gemm_packed, bf16 pair panels for gemm_packed_bf16): once per call,
// or once for as long as the weight is unchanged in inference (PackCache, pack_cache.h). Baseline translation units only
// (ODR rule in dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "cpu/math/kernels.h"
#include "cpu/math/pack_cache.h"
#include "cpu/math/parallel.h"
#include "cpu/math/scratch.h"

namespace paca_kernels::cpu {

// Pair-rows of a bf16 pair panel over `steps` reduction steps: (steps + 1) / 2 rounded up to a
// multiple of kBf16PairPad.
inline int64_t bf16_panel_pairs(int64_t steps) {
  return ((steps + 1) / 2 + kBf16PairPad - 1) / kBf16PairPad * kBf16PairPad;
}

// pack_bf16_panels from values already rounded to bf16 (their bit patterns): the same layout, the
// rounding done beforehand by a vector pass (convert_row) instead of element by element here.
inline void pack_bf16_panels(const uint16_t* src, int64_t so, int64_t st, int64_t cols,
                             int64_t steps, uint16_t* dst) {
  const int64_t pairs = bf16_panel_pairs(steps);
  for (int64_t p = 0; p < (cols + 15) / 16; ++p) {
    uint16_t* panel = dst + p * pairs * 32;
    const int64_t o0 = 16 * p, w = std::min<int64_t>(16, cols - o0);
    for (int64_t s = 0; s < pairs; ++s) {
      uint16_t* row = panel + 32 * s;
      for (int64_t h = 0; h < 2; ++h) {
        const int64_t t = 2 * s + h;
        if (t >= steps) {
          for (int64_t c = 0; c < 16; ++c) row[2 * c + h] = 0;
          continue;
        }
        const uint16_t* sp = src + o0 * so + t * st;
        for (int64_t c = 0; c < w; ++c) row[2 * c + h] = sp[c * so];
        for (int64_t c = w; c < 16; ++c) row[2 * c + h] = 0;
      }
    }
  }
}

// Packs B = W^T for gemm_packed_bf16, W (cols x steps) read as src[o * so + t * st] in float32,
// rounded to bf16 (nearest even): panel p (16 columns) at dst + p * bf16_panel_pairs(steps) * 32,
// its pair-row s holding (W[16p + c, 2s], W[16p + c, 2s + 1]) at 32 * s + 2 * c, zero past W.
// For operands made inside a kernel (the attention's keys and values), on the calling thread.
inline void pack_bf16_panels(const float* src, int64_t so, int64_t st, int64_t cols, int64_t steps,
                             uint16_t* dst) {
  const int64_t pairs = bf16_panel_pairs(steps);
  for (int64_t p = 0; p < (cols + 15) / 16; ++p) {
    uint16_t* panel = dst + p * pairs * 32;
    for (int64_t s = 0; s < pairs; ++s) {
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t o = 16 * p + c;
        for (int64_t h = 0; h < 2; ++h) {
          const int64_t t = 2 * s + h;
          panel[32 * s + 2 * c + h] =
              o < cols && t < steps ? c10::BFloat16(src[o * so + t * st]).x : uint16_t(0);
        }
      }
    }
  }
}

// The constant right-hand side B = W^T (T x cols) of the products x . W^T with a linear layer's
// weight W (cols x T, any dtype and strides), multiplied by many row blocks. For float32 with the
// AVX2 kernels it is kept only as 16-column panels (each T x 16 contiguous, the last one
// zero-padded), filled straight from W's rows: no transposed copy of W is made, and the products
// skip the per-call packing. Otherwise it is kept as the plain row-major W^T. linear() gives the
// same bits either way. The storage is the calling thread's scratch `slot` (see Scratch); big
// matrices are packed by all threads.
//
// bf16_products (float32 only: the kernels' bfloat16 inputs, a bf16 model or autocast) asks for
// the products of bfloat16 operands with float32 sums, as the bf16 matmuls they replace compute
// them. With AVX512-BF16 (gemm_packed_bf16) W is packed as bf16 pair panels (16 columns, two
// reduction steps interleaved: the layout of kernels_avx512bf16.cpp) and A is rounded to bf16 as
// the kernel reads it. Without it W is rounded to bf16 values and packed as above for the float32
// kernels, and A is used unrounded (rounding it would need a copy, and only makes the result less
// exact); the results then differ from the AVX512-BF16 build's by about one bf16 rounding of A.
template <typename T>
struct PackedMatrix {
  int64_t steps = 0, cols = 0;
  bool packed = false;  // 16-column panels (float32 + AVX2), else plain W^T (steps x cols)
  bool bf16 = false;    // bf16 pair panels for gemm_packed_bf16 (float32 + AVX512-BF16)
  // The packed matrix kept across calls (PackCache, pack_cache.h) when the weight is unchanged
  // since an earlier call, else null and the packing is in `store`.
  std::shared_ptr<void> cached;
  Scratch<T> store;
  T* data_ = nullptr;  // cached or store

  PackedMatrix(const at::Tensor& weight, ScratchSlot slot, bool bf16_products = false)
      : PackedMatrix(weight, slot, bf16_products, 0, [&] { return weight; }) {}

  // The matrix values() (cols x steps, any dtype and strides: called only when a packing is
  // needed) with `key` for the cache: a 2-D view of the parameter the values are made from, with
  // key's shape, and `tag` > 0 telling its layout apart from key's own values'. For a weight used
  // with its reduction steps reordered (patch_embed.cpp: a conv weight (Co, C, k, k) as
  // (Co, k*k*C), keyed by its view (Co, C*k*k)), so the reordered copy is made and packed once
  // while the parameter is unchanged rather than on every call.
  template <typename Values>
  PackedMatrix(const at::Tensor& key, ScratchSlot slot, bool bf16_products, int64_t tag,
               Values&& values)
      : steps(key.size(1)),
        cols(key.size(0)),
        packed(std::is_same_v<T, float> && float32_kernels().gemm_packed != nullptr),
        bf16(std::is_same_v<T, float> && bf16_products &&
             float32_kernels().gemm_packed_bf16 != nullptr),
        store(slot, 0) {
    const int64_t n = bf16     ? (cols + 15) / 16 * 16 * bf16_pairs(steps)
                      : packed ? (cols + 15) / 16 * 16 * steps
                               : cols * steps;
    const size_t bytes = static_cast<size_t>(n) * sizeof(T);
    bool want = false;
    if (PackCache::usable(key)) {
      // The layout, the values (rounded to bf16 or not), T and the values' order: one cache
      // entry each.
      const int64_t layout = (bf16 ? 1 : packed ? 2 : 3) + (bf16_products ? 4 : 0) +
                             (sizeof(T) == 8 ? 8 : 0) + 16 * tag;
      PackCache& cache = PackCache::instance();
      cached = cache.find(key, layout, bytes, want);
      if (cached) {
        data_ = static_cast<T*>(cached.get());
        return;
      }
      if (want) {
        std::shared_ptr<void> buf = PackCache::allocate(bytes);
        data_ = static_cast<T*>(buf.get());
        pack(values(), bf16_products);
        cache.store(key, layout, buf, bytes);
        cached = std::move(buf);
        return;
      }
    }
    store = Scratch<T>(slot, n);
    data_ = store.data();
    pack(values(), bf16_products);
  }
  PackedMatrix(const PackedMatrix&) = delete;
  PackedMatrix& operator=(const PackedMatrix&) = delete;

  // Packs W into data_ (the layout chosen by the constructor).
  void pack(const at::Tensor& weight, bool bf16_products) {
    if (bf16) {
      pack_bf16(weight);
      return;
    }
    // W (cols x steps) as contiguous T: the weight itself when it already is (no copy); for bf16
    // products without AVX512-BF16, its values rounded to bf16.
    const at::Tensor w =
        (std::is_same_v<T, float> && bf16_products && weight.scalar_type() != at::kBFloat16
             ? weight.to(at::kBFloat16)
             : weight)
            .to(c10::CppTypeToScalarType<T>::value)
            .contiguous();
    const T* src = w.const_data_ptr<T>();
    T* dst = data_;
    // One task per 16-column panel (or per 16 columns of the plain layout); in parallel only when
    // the matrix is big enough to pay for waking the threads.
    const int64_t ntask = (cols + 15) / 16;
    const auto fill = [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t o0 = p * 16, o1 = std::min<int64_t>(cols, o0 + 16);
        if (packed) {  // W's row o is column o % 16 of panel o / 16
          T* panel = dst + p * steps * 16;
          if (o1 - o0 == 16) {  // a whole panel: the transpose of W's 16 rows, in 8 x 8 blocks
            transpose(src + o0 * steps, steps, 16, steps, panel, 16);
            continue;
          }
          for (int64_t i = 0; i < steps; ++i) {
            T* d = panel + i * 16;
            for (int64_t o = o0; o < o1; ++o) d[o - o0] = src[o * steps + i];
            for (int64_t o = o1; o < o0 + 16; ++o) d[o - o0] = T(0);  // padding of the last panel
          }
        } else {
          for (int64_t i = 0; i < steps; ++i) {
            for (int64_t o = o0; o < o1; ++o) dst[i * cols + o] = src[o * steps + i];
          }
        }
      }
    };
    if (cols * steps >= 65536) {
      parallel_for(0, ntask, 1, fill);
    } else {
      fill(0, ntask);
    }
  }
  static int64_t bf16_pairs(int64_t steps) { return bf16_panel_pairs(steps); }
  // W as bf16 pair panels: panel p, pair-row s holds (W[16p + c, 2s], W[16p + c, 2s + 1]) for
  // c < 16 at 32 * s + 2 * c, zero past W's columns, past an odd last step and in the padding
  // pair-rows.
  void pack_bf16(const at::Tensor& weight) {
    // A bf16 weight (a bf16 model) is read as it is; any other is read as float32 and rounded
    // (c10::BFloat16 rounds to nearest even, as vcvtneps2bf16 does for A). No conversion of a
    // whole bf16 weight to float32 and back: on a bf16 model that was most of the packing time.
    const bool is_bf16 = weight.scalar_type() == at::kBFloat16;
    const at::Tensor w = (is_bf16 ? weight : weight.to(at::kFloat)).contiguous();
    const uint16_t* src16 = is_bf16 ? reinterpret_cast<const uint16_t*>(w.const_data_ptr()) : nullptr;
    const float* src32 = is_bf16 ? nullptr : w.const_data_ptr<float>();
    uint16_t* dst = reinterpret_cast<uint16_t*>(data_);
    const int64_t pairs = bf16_pairs(steps), ntask = (cols + 15) / 16;
    const auto fill = [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        uint16_t* panel = dst + p * pairs * 32;
        for (int64_t c = 0; c < 16; ++c) {
          const int64_t o = 16 * p + c;
          for (int64_t t = 0; t < 2 * pairs; ++t) {
            uint16_t v = 0;
            if (o < cols && t < steps) {
              v = src16 != nullptr ? src16[o * steps + t] : c10::BFloat16(src32[o * steps + t]).x;
            }
            panel[(t / 2) * 32 + 2 * c + (t % 2)] = v;
          }
        }
      }
    };
    if (cols * steps >= 65536) {
      parallel_for(0, ntask, 1, fill);
    } else {
      fill(0, ntask);
    }
  }

  // linear() restricted to the output columns c0 .. c1 - 1 (c0 a multiple of 16, c1 <= cols; C
  // and bias point at column c0): the products of those columns' panels only, with the bits
  // linear() gives for them. For a task that owns a slice of a layer's outputs (mlp_fused's
  // channel groups).
  void linear_cols(const T* A, int64_t lda, T* C, int64_t ldc, int64_t rows, int64_t c0,
                   int64_t c1, const T* bias, bool gelu) const {
    TORCH_CHECK(c0 % 16 == 0 && 0 <= c0 && c0 < c1 && c1 <= cols,
                "PackedMatrix::linear_cols: bad column range ", c0, "..", c1, " of ", cols);
    if constexpr (std::is_same_v<T, float>) {
      if (bf16) {
        float32_kernels().gemm_packed_bf16(
            A, lda, reinterpret_cast<const uint16_t*>(data_) + (c0 / 16) * bf16_pairs(steps) * 32,
            C, ldc, rows, steps, c1 - c0, bias, gelu);
        return;
      }
      if (packed) {
        float32_kernels().gemm_packed(A, lda, data_ + (c0 / 16) * steps * 16, C, ldc, rows, steps,
                                      c1 - c0, bias, gelu);
        return;
      }
    }
    if (bias != nullptr) {
      for (int64_t r = 0; r < rows; ++r) std::copy(bias, bias + (c1 - c0), C + r * ldc);
    }
    gemm_nn(A, lda, data_ + c0, cols, C, ldc, rows, steps, c1 - c0, bias != nullptr);
    if (gelu) {
      for (int64_t r = 0; r < rows; ++r) gelu_inplace(C + r * ldc, c1 - c0);
    }
  }

  // C[r, :] = act(bias + sum_t A[r, t] B[t, :]) for r < rows (A row stride lda, C row stride
  // ldc): a linear layer, bias (cols,) or nullptr, act GELU if gelu else the identity. The packed
  // kernel starts its sums from the bias and applies GELU as it stores them (no passes over C
  // before and after); the other builds do those passes. Both give the bits of the bias copy + accumulate + gelu_inplace sequence.
  void linear(const T* A, int64_t lda, T* C, int64_t ldc, int64_t rows, const T* bias,
              bool gelu) const {
    if constexpr (std::is_same_v<T, float>) {
      if (bf16) {
        float32_kernels().gemm_packed_bf16(A, lda, reinterpret_cast<const uint16_t*>(data_),
                                           C, ldc, rows, steps, cols, bias, gelu);
        return;
      }
      if (packed) {
        float32_kernels().gemm_packed(A, lda, data_, C, ldc, rows, steps, cols, bias,
                                          gelu);
        return;
      }
    }
    if (bias != nullptr) {
      for (int64_t r = 0; r < rows; ++r) std::copy(bias, bias + cols, C + r * ldc);
    }
    gemm_nn(A, lda, data_, cols, C, ldc, rows, steps, cols, bias != nullptr);
    if (gelu) {
      for (int64_t r = 0; r < rows; ++r) gelu_inplace(C + r * ldc, cols);
    }
  }
};

}  // namespace paca_kernels::cpu
