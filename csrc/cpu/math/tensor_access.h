// Reading tensors from the CPU kernels: element strides, and parameters as contiguous vectors.
// Baseline translation units only (ODR rule in dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace paca_kernels::cpu {

// Element strides of a tensor of rank <= 4, as int64 so that > 2^31-element tensors index
// correctly. Reading through strides (instead of .contiguous()) avoids copying big inputs and
// handles expanded (stride-0) gradients.
struct Strides {
  int64_t s[4] = {0, 0, 0, 0};
  explicit Strides(const at::Tensor& t) {
    for (int64_t i = 0; i < t.dim(); ++i) s[i] = t.stride(i);
  }
  int64_t operator[](int64_t i) const { return s[i]; }
};

// Element i of a (floating) tensor's data at `p`, of dtype st, as acc_t.
template <typename acc_t>
inline acc_t element_as(const void* p, at::ScalarType st, int64_t i) {
  switch (st) {
    case at::kFloat:
      return static_cast<acc_t>(static_cast<const float*>(p)[i]);
    case at::kDouble:
      return static_cast<acc_t>(static_cast<const double*>(p)[i]);
    case at::kBFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
    case at::kHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    default:
      break;
  }
  TORCH_CHECK(false, "paca_kernels: expected a floating parameter, got ", st);
  return acc_t(0);
}

// A parameter tensor (rank <= 2) as a contiguous std::vector of acc_t in row-major order, any
// floating dtype and strides in. Read element by element, without ATen ops: a .to(dtype) of a
// bf16 model's bias is four dispatcher calls and an allocation (about 8 us), on the calling
// thread before the kernel's parallel region, and a bf16 PaCa-ViT-Tiny forward reads about 115
// such parameters (measured: 0.2 ms of a 24 ms forward at B = 1 in the profiler's aten::to rows
// alone). The conversions are exact (float and bf16/half to float32, anything to float64).
template <typename acc_t>
std::vector<acc_t> to_vector(const at::Tensor& t) {
  TORCH_CHECK(t.dim() <= 2, "paca_kernels: expected a parameter of rank <= 2, got ", t.sizes());
  const int64_t rows = t.dim() == 2 ? t.size(0) : 1, cols = t.dim() == 0 ? 1 : t.size(-1);
  const int64_t s0 = t.dim() == 2 ? t.stride(0) : 0, s1 = t.dim() == 0 ? 0 : t.stride(-1);
  const void* p = t.const_data_ptr();
  const at::ScalarType st = t.scalar_type();
  std::vector<acc_t> out(static_cast<size_t>(rows * cols));
  if (st == c10::CppTypeToScalarType<acc_t>::value && s1 == 1 && (rows == 1 || s0 == cols)) {
    const acc_t* a = static_cast<const acc_t*>(p);
    std::copy(a, a + rows * cols, out.begin());
    return out;
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      out[i * cols + j] = element_as<acc_t>(p, st, i * s0 + j * s1);
    }
  }
  return out;
}

// A 2-D weight (out, in) as its transpose (in, out), row-major: the right-hand side of x . W^T.
// A plain loop through the strides: materialising the transpose with ATen (.t().contiguous()) cost
// about 80 us per call for the 320 x 49 depthwise taps of PaCa-ViT-Tiny's third stage (measured),
// spent on the calling thread before the kernel's parallel region starts; other dtypes are
// converted element by element as to_vector does.
template <typename acc_t>
std::vector<acc_t> transposed(const at::Tensor& t2d) {
  const int64_t rows = t2d.size(0), cols = t2d.size(1), s0 = t2d.stride(0), s1 = t2d.stride(1);
  std::vector<acc_t> out(static_cast<size_t>(rows * cols));
  if (t2d.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) {
    const acc_t* p = t2d.const_data_ptr<acc_t>();
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = p[i * s0 + j * s1];
    }
    return out;
  }
  const void* p = t2d.const_data_ptr();
  const at::ScalarType st = t2d.scalar_type();
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      out[j * rows + i] = element_as<acc_t>(p, st, i * s0 + j * s1);
    }
  }
  return out;
}

}  // namespace paca_kernels::cpu
