// CPU kernel of paca_kernels::cached_linear (schema and semantics: csrc/registration.cpp):
// y = x W^T + b by ATen's matrix product (MKL), into memory from the CPU kernels' output cache.
//
// Why: the PaCa-ViT MLP's hidden activations are the largest tensors of a training step (at
// PaCa-ViT-Tiny's first stage, B = 8: (25088, 384) float32, 38.5 MB). With glibc's malloc every
// allocation of 32 MiB or more is freshly mapped, so the product that writes one first takes a page
// fault per 4 KiB page: on the development machine (a virtual machine, about 1 us a fault)
// fc1's product took 17-20 ms inside a training step against 5 ms into mapped memory, and the
// product giving fc2's input gradient the same. The output cache (cpu/output_pool.h) hands back
// the blocks the previous step freed. The products themselves are ATen's (the same calls and
// bits as torch.nn.functional.linear: addmm with a bias, mm without).

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/check.h"
#include "cpu/output_pool.h"

namespace paca_kernels {
namespace {

constexpr const char* kCachedLinearOp = "paca_kernels::cached_linear";

at::Tensor cached_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  check_supported_float(x, kCachedLinearOp, "x");
  TORCH_CHECK(x.dim() >= 1, kCachedLinearOp, ": expected x of shape (..., K), got a 0-d tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), kCachedLinearOp,
              ": expected weight of shape (O, K) with K = x.size(-1) = ", x.size(-1), ", got ",
              weight.sizes());
  const int64_t K = x.size(-1), O = weight.size(0);
  check_same_dtype(weight, x, kCachedLinearOp, "weight", "x");
  check_same_device(weight, x, kCachedLinearOp, "weight", "x");
  if (bias) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({O}), kCachedLinearOp,
                ": expected bias of shape (O,) = (", O, ",), got ", bias->sizes());
    check_same_dtype(*bias, x, kCachedLinearOp, "bias", "x");
    check_same_device(*bias, x, kCachedLinearOp, "bias", "x");
  }
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = O;
  at::Tensor out = cpu::empty_output(sizes, x.options());
  // reshape: a view where x's rows allow one (any strides along K), else a copy.
  const at::Tensor x2 = x.reshape({-1, K});
  at::Tensor out2 = out.view({-1, O});
  if (bias) {
    at::addmm_out(out2, *bias, x2, weight.t());
  } else {
    at::mm_out(out2, x2, weight.t());
  }
  return out;
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CPU, m) {
  m.impl("cached_linear", &paca_kernels::cached_linear_cpu);
}
