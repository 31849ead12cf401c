// Host entry points of the paca_kernels CUDA kernels (csrc/cuda/*.cu): plain launchers over raw
// device pointers, element strides and sizes (all int64), so that the .cu files compile with nvcc
// alone and never see a torch header. The torch glue (csrc/cuda/torch_glue.cpp) checks inputs,
// allocates outputs and workspaces with torch's caching allocator, and calls these on the current
// stream of the current device (it holds a device guard).
//
// Semantics are those of the schemas in csrc/registration.cpp (accumulation in float32 for every
// dtype here: float32, float16, bfloat16). Outputs are written contiguous; inputs are read through
// their strides (stride 0 included). Every launcher returns cudaSuccess, or the CUDA error of the
// failing call (cudaGetLastError() after each launch), for the glue to raise.
//
// Shapes: B batch, N patches, M clusters, C channels, H heads, D head dim.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/limits.h"

namespace paca_kernels::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest shapes the kernels hold on chip (kMaxKeys, kMaxHeadDim, kMaxChannels,
// kMaxChannelsSmallSmem): cuda/limits.h, which setup.py also reads for Python.

// ---- p2c_attention -----------------------------------------------------------------------------

struct P2CFwdArgs {
  DType dtype;
  int64_t B, N, M, H, D;
  float scale;
  const void* q;  // (B, N, H, D), strides sq
  int64_t sq[4];
  const void* k;  // (B, M, H, D)
  int64_t sk[4];
  const void* v;  // (B, M, H, D)
  int64_t sv[4];
  void* out;   // (B, N, H, D) contiguous, dtype
  float* lse;  // (B, H, N) contiguous
};

struct P2CBwdArgs {
  DType dtype;
  int64_t B, N, M, H, D;
  float scale;
  bool deterministic;  // dk/dv reduced over N in a fixed order (no atomics): bitwise reproducible
  const void* q;
  int64_t sq[4];
  const void* k;
  int64_t sk[4];
  const void* v;
  int64_t sv[4];
  const void* grad_out;  // (B, N, H, D)
  int64_t sg[4];
  void* dq;  // (B, N, H, D) contiguous, dtype
  void* dk;  // (B, M, H, D) contiguous, dtype
  void* dv;  // (B, M, H, D) contiguous, dtype
};

// Dynamic shared memory of one CTA (bytes) for these sizes; the glue compares it with the device's
// opt-in limit before launching.
size_t p2c_attention_fwd_smem_bytes(DType dtype, int64_t M, int64_t D);
size_t p2c_attention_bwd_smem_bytes(DType dtype, int64_t M, int64_t D);

// float32 elements of scratch the backward needs (dk and dv partial sums); num_sms: the device's
// multiprocessor count (sizes the deterministic split of N).
int64_t p2c_attention_bwd_workspace_elems(const P2CBwdArgs& args, int num_sms);

cudaError_t p2c_attention_fwd(const P2CFwdArgs& args, cudaStream_t stream);
cudaError_t p2c_attention_bwd(const P2CBwdArgs& args, float* workspace, int num_sms,
                              cudaStream_t stream);

// ---- cluster_pool ------------------------------------------------------------------------------

struct PoolFwdArgs {
  DType dtype;
  int64_t B, M, N, C;
  float eps;
  const void* logits;  // (B, M, N), strides sl
  int64_t sl[3];
  const void* x;  // (B, N, C)
  int64_t sx[3];
  const float* weight;  // (C,) contiguous float32, or nullptr
  const float* bias;    // (C,) contiguous float32, or nullptr
  void* out;            // (B, M, C) contiguous, dtype
  float* pooled;        // (B, M, C) contiguous
  float* stats;         // (B, M, 2) contiguous: row max, row sum of exp(logits - max)
};

// How the forward is split: CTA tile sizes, and the number of N splits (flash-decoding style, for
// small B*M; 1 = no split, no workspace).
struct PoolFwdPlan {
  int config;     // which compiled tile configuration
  int64_t splits;
  int64_t chunk;  // patches per split (a multiple of the N tile)
  size_t smem;    // dynamic shared memory per CTA (bytes)
};

// Returns false when no configuration fits in max_smem bytes of shared memory per CTA.
// force_splits > 0 imposes the number of splits (clamped to the number of N tiles).
bool cluster_pool_fwd_plan(DType dtype, int64_t B, int64_t M, int64_t N, int64_t C, int num_sms,
                           size_t max_smem, int64_t force_splits, PoolFwdPlan* plan);
// float32 scratch elements of the split path: (B, splits, M) maxima and sums, (B, splits, M, C)
// accumulators; 0 when plan.splits == 1.
int64_t cluster_pool_fwd_workspace_elems(const PoolFwdArgs& args, const PoolFwdPlan& plan);
cudaError_t cluster_pool_fwd(const PoolFwdArgs& args, const PoolFwdPlan& plan, float* workspace,
                             cudaStream_t stream);

struct PoolBwdArgs {
  DType dtype;
  bool param_fp32;  // dweight/dbias are float32 (else dtype)
  int64_t B, M, N, C;
  float eps;
  const void* grad_out;  // (B, M, C)
  int64_t sg[3];
  const void* logits;  // (B, M, N)
  int64_t sl[3];
  const void* x;  // (B, N, C)
  int64_t sx[3];
  const float* weight;  // (C,) contiguous float32, or nullptr
  const float* pooled;  // (B, M, C) from the forward
  int64_t sp[3];
  const float* stats;  // (B, M, 2) from the forward: row max, row sum
  int64_t sst[3];
  void* dlogits;  // (B, M, N) contiguous, dtype
  void* dx;       // (B, N, C) contiguous, dtype
  void* dweight;  // (C,), float32 when param_fp32 else dtype
  void* dbias;    // (C,)
};

// Returns 0 when no configuration fits in max_smem bytes (the glue then raises).
size_t cluster_pool_bwd_smem_bytes(DType dtype, int64_t C, size_t max_smem);
// float32 scratch elements: dP (B, M, C), rowdot (B, M), and per row-group partial sums of
// dweight/dbias (fixed-order reduction: the backward is deterministic).
int64_t cluster_pool_bwd_workspace_elems(const PoolBwdArgs& args);
cudaError_t cluster_pool_bwd(const PoolBwdArgs& args, float* workspace, size_t max_smem,
                             cudaStream_t stream);

}  // namespace paca_kernels::cuda
