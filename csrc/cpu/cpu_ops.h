// The CPU implementations of the paca_kernels ops that another CPU op calls directly (without a
// round trip through the dispatcher): conv_paca_layer (fused/conv_paca_layer.cpp) is these three in
// sequence.
// Schemas and semantics: csrc/registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace paca_kernels {

// fused/conv_cluster_logits.cpp
at::Tensor conv_cluster_logits_cpu(const at::Tensor& x, int64_t H, int64_t W,
                                   const at::Tensor& dw_weight,
                                   const std::optional<at::Tensor>& dw_bias, const at::Tensor& w1,
                                   const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                   const std::optional<at::Tensor>& b2);

// cluster_pool.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_pool_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);

// fused/p2c_attention_proj.cpp
at::Tensor p2c_attention_proj_cpu(const at::Tensor& x, const at::Tensor& c,
                                  const at::Tensor& q_weight,
                                  const std::optional<at::Tensor>& q_bias,
                                  const at::Tensor& k_weight,
                                  const std::optional<at::Tensor>& k_bias,
                                  const at::Tensor& v_weight,
                                  const std::optional<at::Tensor>& v_bias,
                                  const at::Tensor& proj_weight,
                                  const std::optional<at::Tensor>& proj_bias, int64_t num_heads,
                                  double scale,
                                  const std::optional<at::Tensor>& residual = std::nullopt);

}  // namespace paca_kernels
