// Host API of the cluster_pool CUDA kernels (csrc/cuda/launchers.h): dtype dispatch onto the
// kernels, plans and launch sequences of cluster_pool.cuh, launched on the caller's stream.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/cluster_pool.cuh"
#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace paca_kernels::cuda {

using namespace pool;  // the kernels and launch sequences of cluster_pool.cuh

bool cluster_pool_fwd_plan(DType dtype, int64_t B, int64_t M, int64_t N, int64_t C, int num_sms,
                           size_t max_smem, int64_t force_splits, PoolFwdPlan* plan) {
  bool ok = false;
  dispatch_dtype(dtype, [&](auto tag) {
    ok = make_fwd_plan<decltype(tag)>(B, M, N, C, num_sms, max_smem, force_splits, plan);
    return cudaSuccess;
  });
  return ok;
}

int64_t cluster_pool_fwd_workspace_elems(const PoolFwdArgs& args, const PoolFwdPlan& plan) {
  return fwd_workspace(args, plan);
}

cudaError_t cluster_pool_fwd(const PoolFwdArgs& args, const PoolFwdPlan& plan, float* workspace,
                             cudaStream_t stream) {
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return pool_fwd_run<decltype(tag)>(args, plan, workspace, CudaRuntime{stream});
  });
}

size_t cluster_pool_bwd_smem_bytes(DType dtype, int64_t C, size_t max_smem) {
  size_t smem = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int cfg = choose_config([&](int c) { return bwd_smem<T>(c, C); }, max_smem);
    if (cfg >= 0) smem = bwd_smem<T>(cfg, C);
    return cudaSuccess;
  });
  return smem;
}

int64_t cluster_pool_bwd_workspace_elems(const PoolBwdArgs& args) { return bwd_workspace(args); }

cudaError_t cluster_pool_bwd(const PoolBwdArgs& args, float* workspace, size_t max_smem,
                             cudaStream_t stream) {
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return pool_bwd_run<decltype(tag)>(args, workspace, max_smem, CudaRuntime{stream});
  });
}

}  // namespace paca_kernels::cuda
