// The paca_kernels operator library: every schema is defined here, in one place, so that the
// CPU (csrc/cpu) and CUDA (csrc/cuda) kernels, the Python fake/autograd registrations and
// torch.compile all agree on one signature. Kernels are attached per dispatch key with
// TORCH_LIBRARY_IMPL in their own translation units.
//
// Shapes: B batch, N = H*W patches, M clusters, C channels, h heads, d = C/h head dim.
// "acc" is the accumulation dtype: float64 for float64 inputs, float32 otherwise
// (float32, float16, bfloat16). All ops are functional: outputs never alias inputs.
//
// cluster_pool_fwd(logits, x, weight, bias, eps) -> (out, pooled, stats)
//   logits (B, M, N), x (B, N, C) same floating dtype; weight, bias optional (C,) LayerNorm
//   affine (dtype of x or float32).
//   stats[b,m,0]  (B, M, 2) acc = max_n logits[b,m,n]                      (the row max, mx)
//   stats[b,m,1]                = sum_n exp(logits[b,m,n] - mx)           (the row sum, s)
//   pooled[b,m,:] (B, M, C) acc = sum_n exp(logits[b,m,n] - mx) / s * x[b,n,:]
//                               (softmax over N, then weighted sum; online softmax, one pass;
//                               bf16 x on a CPU kernel with bf16 products: the weights
//                               exp(logits - mx) rounded to bf16 for the products, float32 sums,
//                               as autocast's bf16 matmul of the assignment and x)
//   out[b,m,:]    (B, M, C) dtype of x = LayerNorm_C(pooled[b,m,:], eps, biased variance)
//                               * weight + bias (each when given)
//   The max and the sum are kept apart (not as lse = mx + log s) so that the backward's
//   S = exp(logits - mx) / s is as accurate as torch.softmax at any logit magnitude: in float32 a
//   rounded lse of 1e4 would put 2e-4 relative error into S, dlogits and grad_x.
//   Rows whose logits are all -inf give mx = -inf, s = 0 and NaN pooled/out (like torch.softmax).
//   pooled and stats are what the backward needs; they are not differentiable.
//
// cluster_pool_bwd(grad_out, logits, x, weight, pooled, stats, eps)
//     -> (grad_logits, grad_x, grad_weight, grad_bias)
//   Gradient of out of cluster_pool_fwd given grad_out (B, M, C) and the saved pooled/stats.
//   grad_logits (B, M, N) dtype of logits, contiguous, except from the CPU kernel for float32/
//   float64 logits with unit stride over M (M, N > 1): then patch-major, strides (N*M, 1, M), the
//   logits' own layout (the fake kernel states the same rule); grad_x (B, N, C) dtype of x;
//   grad_weight, grad_bias (C,) dtype of weight (dtype of x when weight is None); they are
//   always computed and the autograd wrapper drops them when weight/bias were None.
//
// p2c_attention_fwd(q, k, v, scale) -> (out, lse)
//   q (B, N, h, d) patch queries; k, v (B, M, h, d) cluster keys/values; same dtype.
//   lse[b,i,n]   (B, h, N) acc = logsumexp_m (scale * q[b,n,i,:] . k[b,m,i,:])
//   out[b,n,i,:] (B, N, h, d) dtype of q
//                             = sum_m exp(scale * q[b,n,i,:] . k[b,m,i,:] - lse[b,i,n]) * v[b,m,i,:]
//   lse is a statistic for callers; the backward does not take it (see below).
//
// p2c_attention_bwd(grad_out, q, k, v, scale, deterministic) -> (grad_q, grad_k, grad_v)
//   Gradient of out of p2c_attention_fwd(q, k, v, scale) given grad_out (B, N, h, d);
//   grad_q/grad_k/grad_v have the shapes and dtypes of q/k/v. The kernels recompute the scores
//   s = scale * q.k^T and, from them alone, P = exp(s - rowmax s) / rowsum, dP = grad_out.v^T,
//   D = rowsum(P o dP) and dS = P o (dP - D), as PyTorch's softmax backward does: nothing saved by
//   the forward enters, so P is exact to the rounding of s (an fp32 lse at |s| ~ 1e4 would carry
//   ~|s| * 2^-24 relative error into P) and a saturated row (P one-hot) gives dS = 0 exactly (D
//   from the rounded output would not cancel dP). deterministic=True forbids atomics in the
//   reduction over N for grad_k/grad_v (bitwise reproducible results).
//
// p2c_attention_saved_fwd(q, k, v, scale) -> (out, exp_scores, exp_sums)       (CPU kernels only)
//   out as p2c_attention_fwd's; exp_scores (B, h, N, M) acc = exp(s - rowmax s) and exp_sums
//   (B, h, N) acc their sums over M, with s = scale * q.k^T: the training forward of the cpu
//   backend, which keeps the softmax numerators for the backward (the memory of the softmax a
//   PyTorch composition saves) instead of recomputing them.
// p2c_attention_saved_bwd(grad_out, q, k, v, exp_scores, exp_sums, scale) -> (grad_q, grad_k, grad_v)
//   p2c_attention_bwd's gradients from the saved numerators: one product fewer (the scores) and
//   no exp; the same bits as p2c_attention_bwd (the forward computed the numerators as the
//   backward would). Deterministic (the CPU reduction over N is in a fixed order).
//
// conv_cluster_logits(x, H, W, dw_weight, dw_bias, w1, b1, w2, b2) -> logits
//   The official convolutional clustering head (P2CConv2d with GELU) in one pass, inference only
//   (no autograd: callers use the unfused modules when gradients are needed).
//   x (B, N, C) patch tokens of an H x W grid (N = H*W); dw_weight (C, 1, k, k), k odd, zero
//   padding (k-1)/2; w1 (C, C, 1, 1); w2 (M, C, 1, 1); biases (C,), (C,), (M,) optional.
//   logits[b,m,n] (B, M, N) dtype of x
//     = (GELU(GELU(depthwise_conv(x) + dw_bias) . w1^T + b1) . w2^T + b2)[b, n, m]
//   with exact (erf) GELU, accumulated in acc.
//
// mlp_dwconv(x, H, W, weight, bias, in_bias, shortcut, gelu) -> y
//   The depthwise conv of the PaCa-ViT MLP (DWConv, with its shortcut) and the GELU after it, in
//   one pass, optionally with the bias of the fc1 before it; inference only (no autograd).
//   x (B, N, C) tokens of an H x W grid; weight (C, 1, k, k), k odd, zero padding (k-1)/2;
//   bias, in_bias (C,) optional. With u = x + in_bias:
//   y[b,n,c] (B, N, C) dtype of x = act(depthwise_conv(u) + bias + (u if shortcut))[b, n, c],
//   act = exact GELU if gelu else identity, accumulated in acc. Differentiable through
//   mlp_dwconv_bwd (float32 and float64).
//
// mlp_dwconv_bwd(grad_y, x, H, W, weight, bias, in_bias, shortcut, gelu)
//     -> (grad_x, grad_weight, grad_bias, grad_in_bias)
//   Gradient of y of mlp_dwconv given grad_y (B, N, C); x float32 or float64. With
//   z = depthwise_conv(u) + bias + (u if shortcut) recomputed from x and g = grad_y * act'(z):
//   grad_x (B, N, C) = depthwise_conv_transposed(g) + (g if shortcut); grad_weight (C, 1, k, k)
//   = sum_{b,y,x} g * u shifted by the tap; grad_bias (C,) = sum g; grad_in_bias (C,) = sum grad_x
//   (each in its parameter's dtype; grad_bias/grad_in_bias are computed for a None bias/in_bias
//   too, in weight's dtype, and dropped by the autograd formula). Deterministic: per-task partial
//   sums reduced in a fixed order (no atomics), independent of the thread count.
//
// mlp_fused(x, H, W, fc1_weight, fc1_bias, dw_weight, dw_bias, shortcut, gelu, fc2_weight,
//           fc2_bias, norm=False, norm_weight=None, norm_bias=None, eps=1e-5, residual=False,
//           bf16_products=False) -> out
//   The whole PaCa-ViT MLP (fc1, DWConv with optional shortcut, GELU or identity, fc2) without
//   its hidden activations ever leaving the cache; inference only (no autograd). Optionally with
//   the pre-norm block's ends around it: x + mlp(LayerNorm(x)).
//   x (B, N, C) tokens of an H x W grid; fc1_weight (Hd, C); dw_weight (Hd, 1, k, k), k odd, zero
//   padding (k-1)/2; fc2_weight (Co, Hd); biases (Hd,), (Hd,), (Co,) optional; norm_weight,
//   norm_bias (C,) optional (only with norm). With a = LayerNorm_C(x, eps, biased variance)
//   * norm_weight + norm_bias if norm else x, rounded to the modules' dtype r (bf16 if
//   bf16_products, else x's dtype), u = a . fc1_weight^T + fc1_bias (B, N, Hd),
//   g = act(depthwise_conv(u) + dw_bias + (u if shortcut)) and m = g . fc2_weight^T + fc2_bias,
//   accumulated in acc: out (B, N, Co) dtype of x = x + round_r(m) if residual (Co == C), else
//   round_r(m). bf16_products (float32 or bfloat16 x): the products in bf16 as for bf16 x (CPU
//   autocast's semantics for an fp32 model: fc1's input and the MLP's output in bf16, the
//   LayerNorm and the residual stream in float32).

// p2c_attention_proj(x, c, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight,
//                    proj_bias, num_heads, scale) -> out
//   The attention of a PaCa layer after the pooling, in one pass, inference only (no autograd):
//   the q/k/v projections, patch-to-cluster attention over all heads and the output projection,
//   with no (B, N, C) intermediate in memory. x (B, N, C) patch tokens; c (B, M, C) cluster
//   tokens, M > 0; q/k/v_weight (h*d, C); proj_weight (Co, h*d); biases (h*d,), (Co,) optional.
//   With q = x . q_weight^T + q_bias, k and v likewise from c, each viewed (B, *, h, d), and
//   o = softmax(scale * q . k^T over M) . v per head, viewed (B, N, h*d):
//   out (B, N, Co) dtype of x = o . proj_weight^T + proj_bias, accumulated in acc (k and v too).
//   With residual (B, N, Co), of x's dtype or float32 for bfloat16/float16 x (a pre-norm block's
//   residual stream, under autocast float32): out (B, N, Co) dtype of residual = residual +
//   (o . proj_weight^T + proj_bias rounded to x's dtype), summed in acc.
//
// conv_paca_layer(x, H, W, dw_weight, dw_bias, w1, b1, w2, b2, norm_weight, norm_bias, eps,
//                 q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias,
//                 num_heads, scale, probs) -> (out, assign)
//   A whole PaCa layer with the convolutional clustering head, inference only (no autograd): with
//   logits = conv_cluster_logits(x, H, W, dw_weight, dw_bias, w1, b1, w2, b2) (B, M, N), M > 0,
//   c = cluster_pool_fwd(logits, x, norm_weight, norm_bias, eps).out (B, M, C) and
//   out = p2c_attention_proj(x, c, q_weight, ..., proj_bias, num_heads, scale) (B, N, Co);
//   assign (B, M, N) dtype of x = softmax(logits over N) (the layer's z) if probs, else logits.
//   residual: as p2c_attention_proj's (out then in residual's dtype).

// patch_embed(x, weight, bias, stride, padding, norm, norm_weight, norm_bias, eps) -> out
//   A PaCa-ViT stem or stage transition in one pass (DownsampleV1: a conv, then a LayerNorm over
//   the output channels), channels last in and out; inference only (no autograd).
//   x (B, H, W, C) pixels (any strides: a channels-last view of an image or of tokens); weight
//   (Co, C, k, k); bias (Co,) optional; zero padding `padding` on every side, stride `stride`;
//   Ho = (H + 2 padding - k) / stride + 1, Wo likewise. With y = conv2d(x, weight, bias) (B, Ho,
//   Wo, Co), accumulated in acc: out (B, Ho, Wo, Co) contiguous, dtype of x = LayerNorm over Co
//   of y (biased variance, eps, optional affine norm_weight/norm_bias) if norm, else y.
//
// layer_norm(x, weight, bias, eps, dtype=None) -> out
//   LayerNorm over the last dimension, inference only (no autograd): x (..., C), C > 0, any
//   strides; weight, bias (C,) optional. out (..., C) contiguous, dtype `dtype` (x's by default;
//   bfloat16 or float16 for float32 x: the normalised values rounded, as a float32 LayerNorm
//   followed by autocast's cast) = (x - mean) / sqrt(var + eps) * weight + bias per row, biased
//   variance, accumulated in acc with the overflow-free statistics (the row scaled by a power of
//   two near its largest magnitude first); a row with inf or NaN gives NaN.
//
// linear(x, weight, bias) -> out
//   A linear layer in inference (no autograd): x (..., K), any strides; weight (O, K); bias (O,)
//   optional; out (..., O) contiguous, dtype of x = x W^T + b, summed in acc (bf16 x: products of
//   bf16 values, x and the weight rounded to bf16, float32 sums, as a bf16 linear; fp16 x: float32
//   products of the float32 weight).
//
// cached_linear(x, weight, bias) -> out                                  (CPU kernel only)
//   out (..., O) = x W^T + b, contiguous, as torch.nn.functional.linear computes it (ATen's addmm /
//   mm, the same bits), written into memory from the CPU kernels' output cache (cpu/output_pool.h),
//   so that a large output is not freshly mapped memory on every call. Differentiable (autograd in
//   Python: paca_kernels/ops/cached_linear.py; the input gradient through cached_linear again).
//   x (..., K) any strides; weight (O, K) and bias (O,) of x's dtype and device.

#include <Python.h>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <memory>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/math/dispatch.h"
#include "cpu/output_pool.h"

namespace {
// cpu_isa() -> str: the build the C++ CPU kernels run ("baseline", "avx2", "avx512", and with the
// bf16 products "avx512bf16" or "amx"), chosen once
// per process from cpuid and PACA_KERNELS_CPU_ISA at first use. Device-independent (no tensors),
// so its kernel is given with the schema.
std::string cpu_isa() { return paca_kernels::cpu::selected_isa(); }
// cpu_output_cache() -> (int cached, int limit): the bytes the CPU kernels' output cache holds
// (freed blocks no tensor uses) and its cap (cpu/output_pool.h); cpu_output_cache_clear() -> int
// frees them all and returns how many bytes that gave back. Device-independent, as cpu_isa.
std::tuple<int64_t, int64_t> cpu_output_cache() {
  return {paca_kernels::cpu::cpu_output_cache_bytes(), paca_kernels::cpu::cpu_output_cache_limit()};
}
int64_t cpu_output_cache_clear() { return paca_kernels::cpu::cpu_output_cache_clear(); }
// _cpu_empty_output(size, dtype) -> Tensor: an uninitialised CPU tensor from the kernels' output
// path (cpu/output_pool.h: cached blocks from 256 KiB), so that the tests can check what it hands
// out. Private (leading underscore), device-independent as cpu_isa.
at::Tensor cpu_empty_output(c10::IntArrayRef size, at::ScalarType dtype) {
  return paca_kernels::cpu::empty_output(size, at::TensorOptions().dtype(dtype));
}

// The inference-only ops (no backward) and what their callers run instead when gradients are wanted.
struct InferenceOnlyOp {
  const char* name;
  const char* instead;
};
constexpr InferenceOnlyOp kInferenceOnly[] = {
    {"conv_cluster_logits",
     "PaCaAttention runs the clustering head's modules when gradients are needed"},
    {"mlp_fused", "Mlp runs its modules when gradients are needed"},
    {"p2c_attention_proj",
     "PaCaAttention runs its q/k/v/proj modules and p2c_attention when gradients are needed"},
    {"patch_embed", "DownsampleV1 runs its modules when gradients are needed"},
    {"conv_paca_layer",
     "PaCaAttention runs its modules and autograd ops when gradients are needed"},
    {"layer_norm", "PaCaBlock runs its LayerNorm modules when gradients are needed"},
    {"linear", "PaCaViT runs its head module when gradients are needed"},
};

// An Error node (its backward raises `msg`) as the autograd graph holds nodes: a shared_ptr up to
// torch 2.12, an intrusive_ptr since. E is a template parameter so that only the branch of the
// torch in use is instantiated.
using NodePtr = decltype(torch::autograd::Edge::function);
template <typename E, typename P>
P error_node(std::string msg, torch::autograd::edge_list&& edges) {
  if constexpr (std::is_same_v<P, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<E>(std::move(msg), std::move(edges));
  } else {
    return c10::make_intrusive<E>(std::move(msg), std::move(edges));
  }
}

// The Autograd kernel of the inference-only ops, in C++. A Python one (torch.library's
// register_autograd) ran on every call outside inference_mode, also under no_grad: measured 12 us
// per call against 4.5 us with this one (mlp_fused on a tiny input), about 30 calls per
// PaCa-ViT forward. The kernels run below autograd; where grad mode is on and an input requires
// grad, the outputs get a node whose backward raises (the op has none: its callers run the
// modules when gradients are wanted), as the Python formula did.
void inference_only_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                             torch::jit::Stack* stack) {
  std::vector<at::Tensor> wanted;
  if (c10::GradMode::is_enabled()) {
    for (const c10::IValue& v : torch::jit::last(*stack, op.schema().arguments().size())) {
      if (v.isTensor() && v.toTensor().requires_grad()) wanted.push_back(v.toTensor());
    }
  }
  {
    // Below autograd only, not below ADInplaceOrView: the views a kernel makes of a weight
    // (reshape, slice) must share its version counter, which the packed-weight cache reads
    // (cpu/math/pack_cache.h) to see in-place updates.
    at::AutoDispatchBelowAutograd guard;
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
  }
  if (wanted.empty()) return;
  const std::string& full = op.schema().name();  // "paca_kernels::<name>"
  const std::string_view name = std::string_view(full).substr(full.find("::") + 2);
  const char* instead = "";
  for (const InferenceOnlyOp& e : kInferenceOnly) {
    if (name == e.name) instead = e.instead;
  }
  const NodePtr node = error_node<torch::autograd::Error, NodePtr>(
      full + " is inference-only (no backward); " + instead,
      torch::autograd::collect_next_edges(wanted));
  for (const c10::IValue& v : torch::jit::last(*stack, op.schema().returns().size())) {
    if (v.isTensor() && v.toTensor().is_floating_point()) {
      torch::autograd::set_history(v.toTensor(), node);
    }
  }
}
}  // namespace

TORCH_LIBRARY(paca_kernels, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_output_cache() -> (int cached, int limit)", &cpu_output_cache);
  m.def("cpu_output_cache_clear() -> int", &cpu_output_cache_clear);
  m.def("_cpu_empty_output(int[] size, ScalarType dtype) -> Tensor", &cpu_empty_output);
  m.def(
      "cluster_pool_fwd(Tensor logits, Tensor x, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor out, Tensor pooled, Tensor stats)");
  m.def(
      "cluster_pool_bwd(Tensor grad_out, Tensor logits, Tensor x, Tensor? weight, "
      "Tensor pooled, Tensor stats, float eps)"
      " -> (Tensor grad_logits, Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "p2c_attention_fwd(Tensor q, Tensor k, Tensor v, float scale)"
      " -> (Tensor out, Tensor lse)");
  m.def(
      "p2c_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, float scale, "
      "bool deterministic)"
      " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "p2c_attention_saved_fwd(Tensor q, Tensor k, Tensor v, float scale)"
      " -> (Tensor out, Tensor exp_scores, Tensor exp_sums)");
  m.def(
      "p2c_attention_saved_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor exp_scores, "
      "Tensor exp_sums, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "conv_cluster_logits(Tensor x, int H, int W, Tensor dw_weight, Tensor? dw_bias, Tensor w1, "
      "Tensor? b1, Tensor w2, Tensor? b2) -> Tensor");
  m.def(
      "mlp_dwconv(Tensor x, int H, int W, Tensor weight, Tensor? bias, Tensor? in_bias, "
      "bool shortcut, bool gelu) -> Tensor");
  m.def(
      "mlp_dwconv_bwd(Tensor grad_y, Tensor x, int H, int W, Tensor weight, Tensor? bias, "
      "Tensor? in_bias, bool shortcut, bool gelu)"
      " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_in_bias)");
  m.def(
      "mlp_fused(Tensor x, int H, int W, Tensor fc1_weight, Tensor? fc1_bias, Tensor dw_weight, "
      "Tensor? dw_bias, bool shortcut, bool gelu, Tensor fc2_weight, Tensor? fc2_bias, "
      "bool norm=False, Tensor? norm_weight=None, Tensor? norm_bias=None, float eps=1e-05, "
      "bool residual=False, bool bf16_products=False) -> Tensor");
  m.def(
      "p2c_attention_proj(Tensor x, Tensor c, Tensor q_weight, Tensor? q_bias, Tensor k_weight, "
      "Tensor? k_bias, Tensor v_weight, Tensor? v_bias, Tensor proj_weight, Tensor? proj_bias, "
      "int num_heads, float scale, Tensor? residual=None) -> Tensor");
  m.def(
      "patch_embed(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, bool norm, "
      "Tensor? norm_weight, Tensor? norm_bias, float eps) -> Tensor");
  m.def(
      "conv_paca_layer(Tensor x, int H, int W, Tensor dw_weight, Tensor? dw_bias, Tensor w1, "
      "Tensor? b1, Tensor w2, Tensor? b2, Tensor? norm_weight, Tensor? norm_bias, float eps, "
      "Tensor q_weight, Tensor? q_bias, Tensor k_weight, Tensor? k_bias, Tensor v_weight, "
      "Tensor? v_bias, Tensor proj_weight, Tensor? proj_bias, int num_heads, float scale, "
      "bool probs, Tensor? residual=None) -> (Tensor out, Tensor assign)");
  m.def(
      "layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, ScalarType? dtype=None) "
      "-> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("cached_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(paca_kernels, Autograd, m) {
  for (const InferenceOnlyOp& e : kInferenceOnly) {
    m.impl(e.name, torch::CppFunction::makeFromBoxedFunction<&inference_only_autograd>());
  }
}

// `import paca_kernels._C` only has to dlopen this library: the static initialisers above
// register the ops with the dispatcher. The module itself is empty, so no pybind11 or
// libtorch_python is needed (faster builds, no Python-binding ABI coupling).
namespace {
PyModuleDef paca_module = {
    PyModuleDef_HEAD_INIT,
    "_C",                                                            // m_name
    "paca_kernels operator library (ops live in torch.ops.paca_kernels)",  // m_doc
    -1,                                                              // m_size
    nullptr,                                                         // m_methods
    nullptr,                                                         // m_slots
    nullptr,                                                         // m_traverse
    nullptr,                                                         // m_clear
    nullptr,                                                         // m_free
};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&paca_module); }
