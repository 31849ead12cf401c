// Host API of the p2c_attention CUDA kernels (csrc/cuda/launchers.h): dtype dispatch onto the
// kernels and launch sequences of p2c_attention.cuh, launched on the caller's stream.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launchers.h"
#include "cuda/p2c_attention.cuh"

namespace paca_kernels::cuda {

using namespace p2c;  // the kernels and launch sequences of p2c_attention.cuh

size_t p2c_attention_fwd_smem_bytes(DType dtype, int64_t M, int64_t D) {
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    bytes = FwdLayout::make<decltype(tag)>(M, D).total;
    return cudaSuccess;
  });
  return bytes;
}

size_t p2c_attention_bwd_smem_bytes(DType dtype, int64_t M, int64_t D) {
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    bytes = BwdLayout::make<decltype(tag)>(M, D).total;
    return cudaSuccess;
  });
  return bytes;
}

int64_t p2c_attention_bwd_workspace_elems(const P2CBwdArgs& args, int num_sms) {
  int64_t elems = 0;
  dispatch_dtype(args.dtype, [&](auto tag) {
    elems = bwd_workspace<decltype(tag)>(args, num_sms);
    return cudaSuccess;
  });
  return elems;
}

cudaError_t p2c_attention_fwd(const P2CFwdArgs& args, cudaStream_t stream) {
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return p2c_fwd_run<decltype(tag)>(args, CudaRuntime{stream});
  });
}

cudaError_t p2c_attention_bwd(const P2CBwdArgs& args, float* workspace, int num_sms,
                              cudaStream_t stream) {
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return p2c_bwd_run<decltype(tag)>(args, workspace, num_sms, CudaRuntime{stream});
  });
}

}  // namespace paca_kernels::cuda
