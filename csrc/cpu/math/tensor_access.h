// Reading tensors from the CPU kernels: element strides, and parameters as contiguous vectors.
// Baseline translation units only (ODR rule in dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>

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

// A parameter tensor as a contiguous std::vector of acc_t (any dtype and strides in).
template <typename acc_t>
std::vector<acc_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = c.const_data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + c.numel());
}

// A 2-D weight (out, in) as its transpose (in, out), row-major: the right-hand side of x . W^T.
// A plain loop through the strides: materialising the transpose with ATen (.t().contiguous()) cost
// about 80 us per call for the 320 x 49 depthwise taps of PaCa-ViT-Tiny's third stage (measured),
// spent on the calling thread before the kernel's parallel region starts.
template <typename acc_t>
std::vector<acc_t> transposed(const at::Tensor& t2d) {
  // Only a dtype conversion can copy here (none for acc_t weights).
  const at::Tensor c = t2d.to(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t rows = c.size(0), cols = c.size(1), s0 = c.stride(0), s1 = c.stride(1);
  const acc_t* p = c.const_data_ptr<acc_t>();
  std::vector<acc_t> out(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = p[i * s0 + j * s1];
  }
  return out;
}

}  // namespace paca_kernels::cpu
