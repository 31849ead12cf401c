// CPU emulation of the CUDA execution model, to run the kernels of csrc/cuda/*.cuh without a GPU
// (tests/backends/test_cuda_emulation.py builds this with the host compiler and calls it through
// ctypes): the float32 (FMA) path and the tensor-core paths (fp16/bf16 WMMA, TF32 WMMA).
//
// A CTA is block.x std::threads; __syncthreads is a std::barrier over them, __syncwarp and the warp
// shuffles a barrier per warp of 32; CTAs run one after another on the same threads. Dynamic shared
// memory and the kernels' workspaces are filled with NaN bytes before use, so a read of something
// never written shows up in the results. The kernels, their shared-memory layouts and the launch
// sequences (*_run templates) are the production code; only the runtime underneath is emulated:
//
// - __half / __nv_bfloat16 are the CUDA toolkit's own types and host conversions (cuda_fp16.h,
//   cuda_bf16.h): round to nearest even, as the GPU's __float2half_rn / __float2bfloat16_rn.
// - nvcuda::wmma (below) has the API the kernels use: fragment, load_matrix_sync,
//   store_matrix_sync, fill_fragment, mma_sync, __float_to_tf32. Fragments are opaque on the GPU;
//   here element e of lane l is element i = e * 32 + l of the fragment's tile in row-major order
//   (rows x cols: 16 x K for matrix_a, K x 16 for matrix_b, 16 x 16 for the accumulator), which the
//   API permits (elementwise operations on .x are the only layout-independent uses, and the kernels
//   make no other). mma_sync is warp-collective: the lanes publish their A and B elements to a
//   per-warp scratch, and each lane computes its accumulator elements as a float32 fused
//   multiply-add chain over k = 0..K-1 starting from C. On the GPU the products of fp16/bf16/TF32
//   operands are exact in float32 too; the tensor core's summation order is unspecified, so the
//   emulated sums differ from the GPU's by float32 rounding only.
// - __float_to_tf32 is cvt.rna.tf32.f32: 10-bit mantissa, round to nearest, ties away from zero.
//
// Not emulated: real GPU memory ordering and timing.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // host declarations only (dim3, cudaError_t) under a host compiler

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- the CUDA built-ins the kernels use ------------------------------------------------------------

namespace emu {
constexpr int kMmaScratch = 2 * 16 * 16;  // floats per warp: one A and one B tile
struct Cta {
  explicit Cta(unsigned threads) : all(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    shuffle.resize(threads);
    mma.resize(static_cast<size_t>((threads + 31) / 32) * kMmaScratch);
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shuffle;  // one slot per thread
  std::vector<float> mma;      // per warp: the A and B tiles of an mma_sync
};
thread_local Cta* cta = nullptr;
alignas(128) unsigned char smem[256 * 1024];
// The grid-stride limit of gridDim.y / gridDim.z the launch sequences plan with (65535 on the GPU);
// the tests lower it to reach the kernels' grid-stride loops with a few CTAs.
int64_t grid_yz_limit = 65535;
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

// ---- nvcuda::wmma on CPU threads (layout and arithmetic: see the top of this file) -----------------

namespace emu {
inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
T from_f(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}
}  // namespace emu

namespace nvcuda::wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int m, int n, int k>
struct tile_dims;
template <int m, int n, int k>
struct tile_dims<matrix_a, m, n, k> {
  static constexpr int rows = m, cols = k;
};
template <int m, int n, int k>
struct tile_dims<matrix_b, m, n, k> {
  static constexpr int rows = k, cols = n;
};
template <int m, int n, int k>
struct tile_dims<accumulator, m, n, k> {
  static constexpr int rows = m, cols = n;
};
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;  // TF32 fragments hold floats (rounded by __float_to_tf32)
};

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = tile_dims<Use, m, n, k>::rows, cols = tile_dims<Use, m, n, k>::cols;
  static_assert(rows * cols % 32 == 0 && rows * cols <= 16 * 16, "a warp's tile");
  using element_type = typename storage<T>::type;
  enum { num_elements = rows * cols / 32 };
  element_type x[num_elements];
};

// cvt.rna.tf32.f32: keep 10 mantissa bits, round to nearest, ties away from zero (NaN kept).
inline float __float_to_tf32(float in) {
  if (std::isnan(in)) return in;
  uint32_t u;
  std::memcpy(&u, &in, 4);
  u = (u + 0x1000u) & ~0x1fffu;
  float out;
  std::memcpy(&out, &u, 4);
  return out;
}

template <typename Use, int m, int n, int k, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, m, n, k, T, Layout>& f, const V& v) {
  using E = typename fragment<Use, m, n, k, T, Layout>::element_type;
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = emu::from_f<E>(static_cast<float>(v));
}

// matrix_a / matrix_b: the layout is the fragment's type.
template <typename Use, int m, int n, int k, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, m, n, k, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>);
  using F = fragment<Use, m, n, k, T, Layout>;
  static_assert(std::is_same_v<std::remove_cv_t<P>, typename F::element_type>, "pointer type");
  const unsigned lane = threadIdx.x % 32;
  for (int e = 0; e < F::num_elements; ++e) {
    const int i = e * 32 + static_cast<int>(lane), r = i / F::cols, c = i % F::cols;
    f.x[e] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
  }
  __syncwarp();  // warp-collective, as on the GPU
}

template <int m, int n, int k>
void load_matrix_sync(fragment<accumulator, m, n, k, float>& f, const float* p, unsigned ldm,
                      layout_t layout) {
  using F = fragment<accumulator, m, n, k, float>;
  const unsigned lane = threadIdx.x % 32;
  for (int e = 0; e < F::num_elements; ++e) {
    const int i = e * 32 + static_cast<int>(lane), r = i / F::cols, c = i % F::cols;
    f.x[e] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
  __syncwarp();
}

template <int m, int n, int k>
void store_matrix_sync(float* p, const fragment<accumulator, m, n, k, float>& f, unsigned ldm,
                       layout_t layout) {
  using F = fragment<accumulator, m, n, k, float>;
  const unsigned lane = threadIdx.x % 32;
  for (int e = 0; e < F::num_elements; ++e) {
    const int i = e * 32 + static_cast<int>(lane), r = i / F::cols, c = i % F::cols;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
  __syncwarp();
}

// D = A.B + C (D may be C), warp-collective.
template <int m, int n, int k, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, m, n, k, float>& d, const fragment<matrix_a, m, n, k, T, LA>& a,
              const fragment<matrix_b, m, n, k, T, LB>& b, const fragment<accumulator, m, n, k, float>& c) {
  using FA = fragment<matrix_a, m, n, k, T, LA>;
  using FB = fragment<matrix_b, m, n, k, T, LB>;
  using FC = fragment<accumulator, m, n, k, float>;
  const unsigned lane = threadIdx.x % 32;
  float* sa = emu::cta->mma.data() + static_cast<size_t>(threadIdx.x / 32) * emu::kMmaScratch;
  float* sb = sa + 16 * 16;
  for (int e = 0; e < FA::num_elements; ++e) sa[e * 32 + lane] = emu::to_f(a.x[e]);  // row-major m x k
  for (int e = 0; e < FB::num_elements; ++e) sb[e * 32 + lane] = emu::to_f(b.x[e]);  // row-major k x n
  __syncwarp();
  float out[FC::num_elements];
  for (int e = 0; e < FC::num_elements; ++e) {
    const int i = e * 32 + static_cast<int>(lane), r = i / n, col = i % n;
    float acc = c.x[e];
    for (int kk = 0; kk < k; ++kk) acc = std::fma(sa[r * k + kk], sb[kk * n + col], acc);
    out[e] = acc;
  }
  __syncwarp();  // every lane has read the scratch before it is reused
  for (int e = 0; e < FC::num_elements; ++e) d.x[e] = out[e];
}
}  // namespace nvcuda::wmma

// Which path each tile load takes (per thread: [0] element loads, [1] 16-byte loads, [2] cp.async
// tile loads); [3] counts the 16-byte cp.async copies themselves.
namespace emu {
std::atomic<int64_t> tile_loads[4] = {};
}  // namespace emu
#define PACA_KERNELS_TRACE_LOAD(path) (++emu::tile_loads[static_cast<int>(path)])

// cp.async (common.cuh declares these for nvcc only): each thread queues its copies; commit closes
// the queued ones into a group; wait<N> performs this thread's oldest committed groups until at
// most N remain. The copies land late, as on the GPU, so a kernel that reads a buffer before the
// wait that covers it reads the NaN bytes shared memory is filled with (or the previous chunk).
// A copy still queued when the kernel returns (uncommitted, or committed and never waited for)
// fails the launch (emu::cp_async_leftover).
namespace emu {
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;
};
thread_local std::vector<AsyncCopy> cp_queued;                // issued, not yet committed
thread_local std::vector<std::vector<AsyncCopy>> cp_groups;  // committed, oldest first
std::atomic<int64_t> cp_async_leftover{0};
inline void cp_perform(const AsyncCopy& c) {
  std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
  std::memset(static_cast<unsigned char*>(c.dst) + c.bytes, 0, static_cast<size_t>(16 - c.bytes));
}
}  // namespace emu
namespace paca_kernels::cuda {
namespace {
inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 ||
      src_bytes < 0 || src_bytes > 16) {
    std::abort();  // the PTX instruction's requirements
  }
  ++emu::tile_loads[3];
  emu::cp_queued.push_back({dst, src, src_bytes});
}
inline void cp_async_commit() {
  emu::cp_groups.push_back(std::move(emu::cp_queued));
  emu::cp_queued.clear();
}
template <int kN>
void cp_async_wait() {
  static_assert(kN >= 0);
  while (emu::cp_groups.size() > static_cast<size_t>(kN)) {
    for (const emu::AsyncCopy& c : emu::cp_groups.front()) emu::cp_perform(c);
    emu::cp_groups.erase(emu::cp_groups.begin());
  }
}
}  // namespace
}  // namespace paca_kernels::cuda

#define PACA_KERNELS_EMULATED_WMMA 1
#define PACA_KERNELS_EMULATED_GRID_LIMIT 1
namespace paca_kernels::cuda {
namespace {
// common.cuh's kMaxGridYZ, settable at run time here (emu_set_grid_limit).
int64_t& kMaxGridYZ = emu::grid_yz_limit;
}  // namespace
}  // namespace paca_kernels::cuda

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
    // The launch limits of the GPU (and the lower grid-stride limit the tests may set): a launch
    // sequence that plans a larger grid is rejected here as the GPU would reject it.
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u ||
        static_cast<int64_t>(grid.y) > emu::grid_yz_limit || static_cast<int64_t>(grid.z) > emu::grid_yz_limit) {
      return cudaErrorInvalidConfiguration;
    }
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
              if (!emu::cp_queued.empty() || !emu::cp_groups.empty()) {
                ++emu::cp_async_leftover;  // copies the kernel never waited for
                emu::cp_queued.clear();
                emu::cp_groups.clear();
              }
              cta.all.arrive_and_wait();
            }
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    if (emu::cp_async_leftover.exchange(0) != 0) return cudaErrorLaunchFailure;
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

DType dtype_of(int code) { return static_cast<DType>(code); }  // 0 float32, 1 float16, 2 bfloat16

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float16, 2 bfloat16 (launchers.h DType); tensors of that dtype except lse, stats,
// pooled, weight, bias, dweight and dbias (float32), as the torch glue passes them.

int emu_p2c_fwd(int dtype, int64_t B, int64_t N, int64_t M, int64_t H, int64_t D, float scale, const void* q,
                const int64_t* sq, const void* k, const int64_t* sk, const void* v, const int64_t* sv,
                void* out, float* lse) {
  P2CFwdArgs a{};
  a.dtype = dtype_of(dtype);
  a.B = B, a.N = N, a.M = M, a.H = H, a.D = D;
  a.scale = scale;
  a.q = q, a.k = k, a.v = v;
  copy(sq, a.sq);
  copy(sk, a.sk);
  copy(sv, a.sv);
  a.out = out;
  a.lse = lse;
  return static_cast<int>(dispatch_dtype(a.dtype, [&](auto tag) {
    return p2c_fwd_run<decltype(tag)>(a, EmuRuntime{});
  }));
}

int emu_p2c_bwd(int dtype, int64_t B, int64_t N, int64_t M, int64_t H, int64_t D, float scale,
                int deterministic, int num_sms, const void* q, const int64_t* sq, const void* k,
                const int64_t* sk, const void* v, const int64_t* sv, const void* g, const int64_t* sg,
                void* dq, void* dk, void* dv) {
  P2CBwdArgs a{};
  a.dtype = dtype_of(dtype);
  a.B = B, a.N = N, a.M = M, a.H = H, a.D = D;
  a.scale = scale;
  a.deterministic = deterministic != 0;
  a.q = q, a.k = k, a.v = v, a.grad_out = g;
  copy(sq, a.sq);
  copy(sk, a.sk);
  copy(sv, a.sv);
  copy(sg, a.sg);
  a.dq = dq, a.dk = dk, a.dv = dv;
  return static_cast<int>(dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    std::vector<float> ws = nan_workspace(bwd_workspace<T>(a, num_sms));
    return p2c_bwd_run<T>(a, ws.data(), num_sms, EmuRuntime{});
  }));
}

// Returns the tile configuration used (>= 0), -1 when none fits max_smem, -2 when a launch failed;
// splits_out: N splits.
int emu_pool_fwd(int dtype, int64_t B, int64_t M, int64_t N, int64_t C, float eps, const void* logits,
                 const int64_t* sl, const void* x, const int64_t* sx, const float* weight, const float* bias,
                 void* out, float* pooled, float* stats, int num_sms, int64_t max_smem, int64_t force_splits,
                 int64_t* splits_out) {
  PoolFwdArgs a{};
  a.dtype = dtype_of(dtype);
  a.B = B, a.M = M, a.N = N, a.C = C;
  a.eps = eps;
  a.logits = logits, a.x = x, a.weight = weight, a.bias = bias;
  copy(sl, a.sl);
  copy(sx, a.sx);
  a.out = out, a.pooled = pooled, a.stats = stats;
  int result = -1;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    PoolFwdPlan plan{};
    if (!make_fwd_plan<T>(B, M, N, C, num_sms, static_cast<size_t>(max_smem), force_splits, &plan)) {
      return cudaSuccess;
    }
    *splits_out = plan.splits;
    std::vector<float> ws = nan_workspace(fwd_workspace(a, plan));
    result = pool_fwd_run<T>(a, plan, ws.data(), EmuRuntime{}) == cudaSuccess ? plan.config : -2;
    return cudaSuccess;
  });
  return result;
}

int emu_pool_bwd(int dtype, int64_t B, int64_t M, int64_t N, int64_t C, float eps, const void* g,
                 const int64_t* sg, const void* logits, const int64_t* sl, const void* x, const int64_t* sx,
                 const float* weight, const float* pooled, const int64_t* sp, const float* stats,
                 const int64_t* sst, void* dlogits, void* dx, float* dweight, float* dbias, int64_t max_smem) {
  PoolBwdArgs a{};
  a.dtype = dtype_of(dtype);
  a.param_fp32 = true;
  a.B = B, a.M = M, a.N = N, a.C = C;
  a.eps = eps;
  a.grad_out = g, a.logits = logits, a.x = x, a.weight = weight, a.pooled = pooled, a.stats = stats;
  copy(sg, a.sg);
  copy(sl, a.sl);
  copy(sx, a.sx);
  copy(sp, a.sp);
  copy(sst, a.sst);
  a.dlogits = dlogits, a.dx = dx, a.dweight = dweight, a.dbias = dbias;
  std::vector<float> ws = nan_workspace(bwd_workspace(a));
  return static_cast<int>(dispatch_dtype(a.dtype, [&](auto tag) {
    return pool_bwd_run<decltype(tag)>(a, ws.data(), static_cast<size_t>(max_smem), EmuRuntime{});
  }));
}

// Shared memory of the three tile configurations (to force each one through max_smem).
void emu_pool_smem(int dtype, int64_t C, int64_t* fwd3, int64_t* bwd3) {
  dispatch_dtype(dtype_of(dtype), [&](auto tag) {
    using T = decltype(tag);
    for (int c = 0; c < 3; ++c) {
      fwd3[c] = static_cast<int64_t>(fwd_smem<T>(c, C));
      bwd3[c] = static_cast<int64_t>(bwd_smem<T>(c, C));
    }
    return cudaSuccess;
  });
}

// The gridDim.y / gridDim.z limit the launch sequences plan with and the emulated launches enforce.
void emu_set_grid_limit(int64_t limit) { emu::grid_yz_limit = limit; }

// SmemOptInCache (common.cuh: CudaRuntime raises a kernel's shared-memory limit once per kernel and
// device): `threads` threads each ask for `kernels` distinct kernels on `device`, `rounds` times;
// counts[0] = attribute settings, counts[1] = device queries. Returns 0, or the first error.
int emu_opt_in_cache(int device, int kernels, int threads, int rounds, int64_t* counts) {
  static SmemOptInCache cache;  // persists across calls, as the per-TU cache does in a process
  std::atomic<int64_t> sets{0}, queries{0};
  std::atomic<int> error{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int r = 0; r < rounds; ++r) {
        for (int k = 0; k < kernels; ++k) {
          const void* kernel = reinterpret_cast<const void*>(static_cast<uintptr_t>(0x1000 + 16 * k));
          const cudaError_t err = cache.ensure(
              device, kernel, [&](int) { return ++queries, 232448; },
              [&](const void*, int bytes) {
                ++sets;
                return bytes == 232448 ? cudaSuccess : cudaErrorInvalidValue;
              });
          if (err != cudaSuccess) error = static_cast<int>(err);
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  counts[0] = sets;
  counts[1] = queries;
  return error;
}

// Tile loads since the last call, per thread: counts[0] element loads, counts[1] 16-byte loads,
// counts[2] cp.async tile loads (load_tile_async); counts[3] the 16-byte cp.async copies.
void emu_tile_loads(int64_t* counts) {
  for (int i = 0; i < 4; ++i) counts[i] = emu::tile_loads[i].exchange(0);
}

// The emulated conversions, for the tests to compare with torch's: out[i] = float(T(in[i])).
void emu_round(int dtype, const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == 1) out[i] = __half2float(__float2half_rn(in[i]));
    if (dtype == 2) out[i] = __bfloat162float(__float2bfloat16_rn(in[i]));
    if (dtype == 3) out[i] = nvcuda::wmma::__float_to_tf32(in[i]);
  }
}

}  // extern "C"
