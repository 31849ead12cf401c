// CPU emulation of the CUDA execution model, to run the float32 (FMA) path of the kernels in
// csrc/cuda/*.cuh without a GPU (tests/backends/test_cuda_emulation.py builds this with the host compiler
// and calls it through ctypes).
//
// A CTA is block.x std::threads; __syncthreads is a std::barrier over them, __syncwarp and the warp
// shuffles a barrier per warp of 32; CTAs run one after another on the same threads. Dynamic shared memory and the
// kernels' workspaces are filled with NaN bytes before use, so a read of something never written
// shows up in the results. The kernels, their shared-memory layouts and the launch sequences
// (*_run templates) are the production code; only the runtime underneath is emulated. The tensor-core
// paths (fp16/bf16, TF32) need nvcc and are not covered.

#include <cuda_runtime.h>  // host declarations only (dim3, cudaError_t) under a host compiler

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- the CUDA built-ins the kernels use ------------------------------------------------------------

namespace emu {
struct Cta {
  explicit Cta(unsigned threads) : all(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    shuffle.resize(threads);
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shuffle;  // one slot per thread
};
thread_local Cta* cta = nullptr;
alignas(128) unsigned char smem[256 * 1024];
}  // namespace emu

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 gridDim;
dim3 blockDim;

inline void __syncthreads() { emu::cta->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::cta->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = threadIdx.x, base = t & ~31u;
  emu::cta->shuffle[t] = v;
  __syncwarp();
  const float r = emu::cta->shuffle[base + ((t - base) ^ static_cast<unsigned>(lane_mask))];
  __syncwarp();  // every lane has read before the slots are reused
  return r;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

// Host-compiler builds see no launch bounds (occupancy hints only).
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

#include "cuda/cluster_pool.cuh"
#include "cuda/p2c_attention.cuh"

namespace paca_kernels::cuda {
namespace {
unsigned char* dynamic_smem() { return emu::smem; }
}  // namespace
}  // namespace paca_kernels::cuda

namespace {

using namespace paca_kernels::cuda;
using namespace paca_kernels::cuda::p2c;
using namespace paca_kernels::cuda::pool;

// The runtime interface of CudaRuntime (common.cuh), on CPU threads.
struct EmuRuntime {
  template <typename... KArgs, typename... Args>
  cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) const {
    if (smem > sizeof(emu::smem) || block.y != 1 || block.z != 1) return cudaErrorInvalidValue;
    const std::tuple<std::decay_t<KArgs>...> params(static_cast<Args&&>(args)...);
    gridDim = grid;
    blockDim = block;
    // block.x threads run every CTA in turn (thread creation dominates otherwise); the barrier
    // between CTAs keeps one CTA's shared memory from the next.
    emu::Cta cta(block.x);
    std::vector<std::thread> threads;
    threads.reserve(block.x);
    for (unsigned t = 0; t < block.x; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = dim3(t);
        emu::cta = &cta;
        for (unsigned z = 0; z < grid.z; ++z) {
          for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
              if (t == 0) std::memset(emu::smem, 0xff, smem);  // NaN: unwritten shared memory shows
              cta.all.arrive_and_wait();
              blockIdx = dim3(x, y, z);
              std::apply(kernel, params);
              cta.all.arrive_and_wait();
            }
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    return cudaSuccess;
  }
  cudaError_t zero(void* ptr, size_t bytes) const {
    std::memset(ptr, 0, bytes);
    return cudaSuccess;
  }
};

template <size_t K>
void copy(const int64_t* src, int64_t (&dst)[K]) {
  for (size_t i = 0; i < K; ++i) dst[i] = src[i];
}

std::vector<float> nan_workspace(int64_t elems) {
  std::vector<float> ws(static_cast<size_t>(elems > 0 ? elems : 1));
  std::memset(ws.data(), 0xff, ws.size() * sizeof(float));
  return ws;
}

}  // namespace

extern "C" {

int emu_p2c_fwd(int64_t B, int64_t N, int64_t M, int64_t H, int64_t D, float scale, const float* q,
                const int64_t* sq, const float* k, const int64_t* sk, const float* v, const int64_t* sv,
                float* out, float* lse) {
  P2CFwdArgs a{};
  a.dtype = DType::kFloat32;
  a.B = B, a.N = N, a.M = M, a.H = H, a.D = D;
  a.scale = scale;
  a.q = q, a.k = k, a.v = v;
  copy(sq, a.sq);
  copy(sk, a.sk);
  copy(sv, a.sv);
  a.out = out;
  a.lse = lse;
  return static_cast<int>(p2c_fwd_run<float>(a, EmuRuntime{}));
}

int emu_p2c_bwd(int64_t B, int64_t N, int64_t M, int64_t H, int64_t D, float scale, int deterministic,
                int num_sms, const float* q, const int64_t* sq, const float* k, const int64_t* sk,
                const float* v, const int64_t* sv, const float* out, const int64_t* so, const float* g,
                const int64_t* sg, const float* lse, const int64_t* sl, float* dq, float* dk, float* dv) {
  P2CBwdArgs a{};
  a.dtype = DType::kFloat32;
  a.B = B, a.N = N, a.M = M, a.H = H, a.D = D;
  a.scale = scale;
  a.deterministic = deterministic != 0;
  a.q = q, a.k = k, a.v = v, a.out = out, a.grad_out = g, a.lse = lse;
  copy(sq, a.sq);
  copy(sk, a.sk);
  copy(sv, a.sv);
  copy(so, a.so);
  copy(sg, a.sg);
  copy(sl, a.sl);
  a.dq = dq, a.dk = dk, a.dv = dv;
  std::vector<float> ws = nan_workspace(bwd_workspace<float>(a, num_sms));
  return static_cast<int>(p2c_bwd_run<float>(a, ws.data(), num_sms, EmuRuntime{}));
}

// Returns the tile configuration used (>= 0), or -1 when none fits max_smem; splits_out: N splits.
int emu_pool_fwd(int64_t B, int64_t M, int64_t N, int64_t C, float eps, const float* logits,
                 const int64_t* sl, const float* x, const int64_t* sx, const float* weight,
                 const float* bias, float* out, float* pooled, float* lse, int num_sms, int64_t max_smem,
                 int64_t force_splits, int64_t* splits_out) {
  PoolFwdArgs a{};
  a.dtype = DType::kFloat32;
  a.B = B, a.M = M, a.N = N, a.C = C;
  a.eps = eps;
  a.logits = logits, a.x = x, a.weight = weight, a.bias = bias;
  copy(sl, a.sl);
  copy(sx, a.sx);
  a.out = out, a.pooled = pooled, a.lse = lse;
  PoolFwdPlan plan{};
  if (!make_fwd_plan<float>(B, M, N, C, num_sms, static_cast<size_t>(max_smem), force_splits, &plan)) {
    return -1;
  }
  *splits_out = plan.splits;
  std::vector<float> ws = nan_workspace(fwd_workspace(a, plan));
  if (pool_fwd_run<float>(a, plan, ws.data(), EmuRuntime{}) != cudaSuccess) return -2;
  return plan.config;
}

int emu_pool_bwd(int64_t B, int64_t M, int64_t N, int64_t C, float eps, const float* g, const int64_t* sg,
                 const float* logits, const int64_t* sl, const float* x, const int64_t* sx,
                 const float* weight, const float* pooled, const int64_t* sp, const float* lse,
                 const int64_t* sls, float* dlogits, float* dx, float* dweight, float* dbias,
                 int64_t max_smem) {
  PoolBwdArgs a{};
  a.dtype = DType::kFloat32;
  a.param_fp32 = true;
  a.B = B, a.M = M, a.N = N, a.C = C;
  a.eps = eps;
  a.grad_out = g, a.logits = logits, a.x = x, a.weight = weight, a.pooled = pooled, a.lse = lse;
  copy(sg, a.sg);
  copy(sl, a.sl);
  copy(sx, a.sx);
  copy(sp, a.sp);
  copy(sls, a.sls);
  a.dlogits = dlogits, a.dx = dx, a.dweight = dweight, a.dbias = dbias;
  std::vector<float> ws = nan_workspace(bwd_workspace(a));
  return static_cast<int>(pool_bwd_run<float>(a, ws.data(), static_cast<size_t>(max_smem), EmuRuntime{}));
}

// Shared memory of the three tile configurations (to force each one through max_smem).
void emu_pool_smem(int64_t C, int64_t* fwd3, int64_t* bwd3) {
  for (int c = 0; c < 3; ++c) {
    fwd3[c] = static_cast<int64_t>(fwd_smem<float>(c, C));
    bwd3[c] = static_cast<int64_t>(bwd_smem<float>(c, C));
  }
}

}  // extern "C"
