// One softmax row's numerators: the layer's assignment probabilities (fused/conv_paca_layer.cpp),
// rows of N patches. (The attention's short rows go through exp_minus_row_max_rows of kernels.h,
// several rows at a time, with the same bits per row.) Baseline translation units only (ODR rule
// in dispatch.h).
#pragma once

#include <cstdint>

#include "cpu/math/kernels.h"

namespace paca_kernels::cpu {

template <typename T>
struct RowExp {
  T max;  // the row's maximum (NaN entries skipped)
  T sum;  // sum of the exponentials
};

// The numerator of a softmax row with its maximum subtracted: out[i] = exp(in[i] - max) for i < n
// (in == out allowed). An all -inf (or +inf/NaN) row gives NaN, as torch.softmax does: row_max
// skips NaN entries, and exp(NaN - max) then poisons the sum and so the whole row.
template <typename T>
inline RowExp<T> exp_minus_row_max(const T* in, T* out, int64_t n) {
  const T mx = row_max(in, n);
  return {mx, exp_shifted(in, mx, out, n)};
}

}  // namespace paca_kernels::cpu
