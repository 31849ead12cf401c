// torch glue of the CUDA kernels: TORCH_LIBRARY_IMPL(paca_kernels, CUDA, m) for the four schemas
// of csrc/registration.cpp. Checks the inputs (same messages as the CPU kernels), allocates the
// outputs and float32 workspaces with torch's caching allocator, and calls the raw-pointer launchers
// of csrc/cuda/*.cu on the current stream of the inputs' device (under a device guard).
//
// Supported dtypes: float32, float16, bfloat16 (float64 is the reference/CPU backends' job).
// Compiled only when CMake builds the CUDA kernels (PACA_KERNELS_BUILD_CUDA).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <tuple>

#include "common/check.h"
#include "common/pool_stats.h"
#include "cuda/launchers.h"

namespace paca_kernels {
namespace {

constexpr const char* kPoolFwdOp = "paca_kernels::cluster_pool_fwd (CUDA)";
constexpr const char* kPoolBwdOp = "paca_kernels::cluster_pool_bwd (CUDA)";
constexpr const char* kP2CFwdOp = "paca_kernels::p2c_attention_fwd (CUDA)";
constexpr const char* kP2CBwdOp = "paca_kernels::p2c_attention_bwd (CUDA)";

cuda::DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": the CUDA kernels support float32, float16 and bfloat16, got ", name,
                  " of dtype ", t.scalar_type(), " (the reference backend runs float64)");
  }
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": expected ", name, " on a CUDA device, got ", t.device());
}

// Properties of a device, queried once per device (the attribute queries are driver calls: not on
// every op call) in a thread-safe per-device table. `device` is the inputs' device, the one the
// guard has made current.
struct DeviceInfo {
  int major = 0, minor = 0;
  int num_sms = 0;
  size_t max_smem = 0;  // opt-in dynamic shared memory per CTA, bytes
};

constexpr int kMaxDevices = 64;

DeviceInfo device_info(c10::DeviceIndex device, const char* op) {
  static std::atomic<bool> ready[kMaxDevices] = {};
  static DeviceInfo infos[kMaxDevices];
  static std::mutex mutex;  // the first query per device only; a query that throws leaves it unset
  const int dev = static_cast<int>(device);
  TORCH_CHECK(dev >= 0 && dev < kMaxDevices, op, ": device index ", dev, " out of range");
  if (!ready[dev].load(std::memory_order_acquire)) {
    const std::lock_guard<std::mutex> lock(mutex);
    if (!ready[dev].load(std::memory_order_relaxed)) {
      DeviceInfo info;
      int smem = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, dev));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, dev));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, dev));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
      info.max_smem = static_cast<size_t>(smem);
      infos[dev] = info;
      ready[dev].store(true, std::memory_order_release);
    }
  }
  const DeviceInfo& info = infos[dev];
  // bf16 and TF32 tensor-core fragments (and the compiled archs, sm_80 and newer) need it.
  TORCH_CHECK(info.major >= 8, op, ": the CUDA kernels need compute capability 8.0 or newer, device ",
              dev, " is ", info.major, ".", info.minor);
  return info;
}

template <size_t K>
void copy_strides(const at::Tensor& t, int64_t (&dst)[K]) {
  for (size_t i = 0; i < K; ++i) dst[i] = t.stride(static_cast<int64_t>(i));
}

at::Tensor float_workspace(int64_t elems, const at::Tensor& like) {
  return at::empty({elems > 0 ? elems : 1}, like.options().dtype(at::kFloat));
}

// ---- p2c_attention -----------------------------------------------------------------------------

void check_p2c_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const char* op) {
  check_cuda(q, op, "q");
  check_p2c_args(q, k, v, op);
  TORCH_CHECK(k.size(1) <= cuda::kMaxKeys, op, ": holds all keys on chip: expected M <= ",
              cuda::kMaxKeys, ", got k of shape ", k.sizes());
  TORCH_CHECK(q.size(3) <= cuda::kMaxHeadDim, op, ": expected head dim d <= ", cuda::kMaxHeadDim,
              ", got q of shape ", q.sizes());
}

std::tuple<at::Tensor, at::Tensor> p2c_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale) {
  check_p2c_inputs(q, k, v, kP2CFwdOp);
  const cuda::DType dtype = kernel_dtype(q, kP2CFwdOp, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3), M = k.size(1);
  at::Tensor out = at::empty({B, N, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    // Only d == 0 leaves lse non-empty: every score is 0, so lse = log M (out is empty).
    if (lse.numel() > 0) lse.fill_(std::log(static_cast<double>(M)));
    return {out, lse};
  }
  const DeviceInfo info = device_info(q.device().index(), kP2CFwdOp);
  const size_t smem = cuda::p2c_attention_fwd_smem_bytes(dtype, M, D);
  TORCH_CHECK(smem <= info.max_smem, kP2CFwdOp, ": needs ", smem,
              " bytes of shared memory per block for M=", M, ", d=", D, "; the device allows ",
              info.max_smem);
  cuda::P2CFwdArgs a{};
  a.dtype = dtype;
  a.B = B, a.N = N, a.M = M, a.H = H, a.D = D;
  a.scale = static_cast<float>(scale);
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  copy_strides(q, a.sq);
  copy_strides(k, a.sk);
  copy_strides(v, a.sv);
  a.out = out.mutable_data_ptr();
  a.lse = lse.mutable_data_ptr<float>();
  C10_CUDA_CHECK(cuda::p2c_attention_fwd(a, c10::cuda::getCurrentCUDAStream().stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> p2c_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    double scale, bool deterministic) {
  // The dtype first: an unsupported one is reported as such, not as a mismatch of saved tensors.
  const cuda::DType dtype = kernel_dtype(q, kP2CBwdOp, "q");
  check_p2c_inputs(q, k, v, kP2CBwdOp);
  check_p2c_bwd_args(grad_out, q, k, v, kP2CBwdOp);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3), M = k.size(1);
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (B * H * D == 0) return {dq, dk, dv};
  if (N == 0) {  // no queries: nothing flows into k and v
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const DeviceInfo info = device_info(q.device().index(), kP2CBwdOp);
  const size_t smem = cuda::p2c_attention_bwd_smem_bytes(dtype, M, D);
  TORCH_CHECK(smem <= info.max_smem, kP2CBwdOp, ": needs ", smem,
              " bytes of shared memory per block for M=", M, ", d=", D, "; the device allows ",
              info.max_smem);
  cuda::P2CBwdArgs a{};
  a.dtype = dtype;
  a.B = B, a.N = N, a.M = M, a.H = H, a.D = D;
  a.scale = static_cast<float>(scale);
  a.deterministic = deterministic;
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  a.grad_out = grad_out.const_data_ptr();
  copy_strides(q, a.sq);
  copy_strides(k, a.sk);
  copy_strides(v, a.sv);
  copy_strides(grad_out, a.sg);
  // dq, dk, dv are freshly allocated: contiguous (B, *, h, d), as the launcher expects.
  a.dq = dq.mutable_data_ptr();
  a.dk = dk.mutable_data_ptr();
  a.dv = dv.mutable_data_ptr();
  at::Tensor ws = float_workspace(cuda::p2c_attention_bwd_workspace_elems(a, info.num_sms), q);
  C10_CUDA_CHECK(cuda::p2c_attention_bwd(a, ws.mutable_data_ptr<float>(), info.num_sms,
                                         c10::cuda::getCurrentCUDAStream().stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

// ---- cluster_pool ------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_pool_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  const char* op = kPoolFwdOp;
  check_cuda(x, op, "x");
  check_pool_args(logits, x, weight, bias, eps, op);
  const int64_t B = logits.size(0), M = logits.size(1), N = logits.size(2), C = x.size(2);
  TORCH_CHECK(C <= cuda::kMaxChannels, op, ": holds a cluster's channels on chip: expected C <= ",
              cuda::kMaxChannels, ", got x of shape ", x.sizes());
  const cuda::DType dtype = kernel_dtype(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());

  at::Tensor out = at::empty({B, M, C}, x.options());
  at::Tensor pooled = at::empty({B, M, C}, x.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({B, M, 2}, x.options().dtype(at::kFloat));
  if (B * M == 0) return {out, pooled, stats};
  if (C == 0) {  // nothing to pool: out and pooled are empty, the softmax stats still defined
    pool_stats_without_channels(logits, stats);
    return {out, pooled, stats};
  }
  // (C,) vectors: converting once is negligible and lets the kernels read float32 only.
  std::optional<at::Tensor> w, bi;
  if (weight.has_value()) w = weight->to(at::kFloat).contiguous();
  if (bias.has_value()) bi = bias->to(at::kFloat).contiguous();

  const DeviceInfo info = device_info(x.device().index(), op);
  cuda::PoolFwdPlan plan{};
  TORCH_CHECK(cuda::cluster_pool_fwd_plan(dtype, B, M, N, C, info.num_sms, info.max_smem,
                                          /*force_splits=*/0, &plan),
              op, ": no tile configuration fits the device's ", info.max_smem,
              " bytes of shared memory per block for C=", C);
  cuda::PoolFwdArgs a{};
  a.dtype = dtype;
  a.B = B, a.M = M, a.N = N, a.C = C;
  a.eps = static_cast<float>(eps);
  a.logits = logits.const_data_ptr();
  a.x = x.const_data_ptr();
  copy_strides(logits, a.sl);
  copy_strides(x, a.sx);
  a.weight = w ? w->const_data_ptr<float>() : nullptr;
  a.bias = bi ? bi->const_data_ptr<float>() : nullptr;
  a.out = out.mutable_data_ptr();
  a.pooled = pooled.mutable_data_ptr<float>();
  a.stats = stats.mutable_data_ptr<float>();
  at::Tensor ws = float_workspace(cuda::cluster_pool_fwd_workspace_elems(a, plan), x);
  C10_CUDA_CHECK(cuda::cluster_pool_fwd(a, plan, ws.mutable_data_ptr<float>(),
                                        c10::cuda::getCurrentCUDAStream().stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, pooled, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cluster_pool_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& pooled, const at::Tensor& stats,
    double eps) {
  const char* op = kPoolBwdOp;
  // The dtype first: an unsupported one is reported as such, not as a mismatch of saved tensors.
  const cuda::DType dtype = kernel_dtype(x, op, "x");
  check_cuda(x, op, "x");
  check_pool_bwd_args(grad_out, logits, x, weight, pooled, stats, eps, op);
  const int64_t B = logits.size(0), M = logits.size(1), N = logits.size(2), C = x.size(2);
  TORCH_CHECK(C <= cuda::kMaxChannels, op, ": holds a cluster's channels on chip: expected C <= ",
              cuda::kMaxChannels, ", got x of shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());

  const at::ScalarType pdtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  at::Tensor dlogits = at::empty({B, M, N}, logits.options());
  at::Tensor dx = at::empty({B, N, C}, x.options());
  at::Tensor dweight = at::empty({C}, x.options().dtype(pdtype));
  at::Tensor dbias = at::empty({C}, x.options().dtype(pdtype));
  if (B * M == 0 || C == 0) {  // no clusters, or no channels: nothing flows back
    dlogits.zero_();
    dx.zero_();
    dweight.zero_();
    dbias.zero_();
    return {dlogits, dx, dweight, dbias};
  }
  std::optional<at::Tensor> w;
  if (weight.has_value()) w = weight->to(at::kFloat).contiguous();

  const DeviceInfo info = device_info(x.device().index(), op);
  const size_t smem = cuda::cluster_pool_bwd_smem_bytes(dtype, C, info.max_smem);
  TORCH_CHECK(smem > 0, op, ": no tile configuration fits the device's ", info.max_smem,
              " bytes of shared memory per block for C=", C,
              " (C <= ", cuda::kMaxChannelsSmallSmem, " fits every supported GPU)");
  cuda::PoolBwdArgs a{};
  a.dtype = dtype;
  a.param_fp32 = pdtype == at::kFloat;
  a.B = B, a.M = M, a.N = N, a.C = C;
  a.eps = static_cast<float>(eps);
  a.grad_out = grad_out.const_data_ptr();
  a.logits = logits.const_data_ptr();
  a.x = x.const_data_ptr();
  a.weight = w ? w->const_data_ptr<float>() : nullptr;
  a.pooled = pooled.const_data_ptr<float>();
  a.stats = stats.const_data_ptr<float>();
  copy_strides(grad_out, a.sg);
  copy_strides(logits, a.sl);
  copy_strides(x, a.sx);
  copy_strides(pooled, a.sp);
  copy_strides(stats, a.sst);
  a.dlogits = dlogits.mutable_data_ptr();
  a.dx = dx.mutable_data_ptr();
  a.dweight = dweight.mutable_data_ptr();
  a.dbias = dbias.mutable_data_ptr();
  at::Tensor ws = float_workspace(cuda::cluster_pool_bwd_workspace_elems(a), x);
  C10_CUDA_CHECK(cuda::cluster_pool_bwd(a, ws.mutable_data_ptr<float>(), info.max_smem,
                                        c10::cuda::getCurrentCUDAStream().stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dlogits, dx, dweight, dbias};
}

}  // namespace
}  // namespace paca_kernels

TORCH_LIBRARY_IMPL(paca_kernels, CUDA, m) {
  m.impl("cluster_pool_fwd", &paca_kernels::cluster_pool_fwd_cuda);
  m.impl("cluster_pool_bwd", &paca_kernels::cluster_pool_bwd_cuda);
  m.impl("p2c_attention_fwd", &paca_kernels::p2c_attention_fwd_cuda);
  m.impl("p2c_attention_bwd", &paca_kernels::p2c_attention_bwd_cuda);
}
