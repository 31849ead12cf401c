// Device helpers shared by the paca_kernels CUDA kernels: dtype conversion, warp reductions,
// shared-memory carving, strided tile loads (synchronous, and cp.async for sm_80+), and one block-level matrix product from shared memory
// that runs on tensor cores (WMMA: fp16/bf16 16x16x16, or TF32 16x16x8 on float operands) or on
// plain FMA (float32 inputs: "fp32 with fp32 math").
//
// Everything is in an unnamed namespace: each .cu file gets its own copy, no symbol clashes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/launchers.h"

namespace paca_kernels::cuda {
namespace {

constexpr int kWarp = 32;

// ---- dtypes ------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- small integer helpers (host and device) ---------------------------------------------------

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
__host__ __device__ constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Shared-memory regions are carved from one dynamic buffer at 128-byte boundaries (WMMA needs
// 32-byte aligned tile pointers; 128 also keeps regions on separate cache lines).
__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) & ~size_t(127); }

// ---- warp reductions (butterfly: every lane gets the same, order-fixed result) ------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- strided tile loads ------------------------------------------------------------------------

// The CPU emulation counts which path each tile load takes: 0 element loads, 1 16-byte loads,
// 2 cp.async (load_tile_async) (tests/backends/cuda_emulation.cpp).
#ifndef PACA_KERNELS_TRACE_LOAD
#define PACA_KERNELS_TRACE_LOAD(path)  // 0 element loads, 1 16-byte loads, 2 cp.async
#endif

// 16 bytes from global to registers and from registers to shared memory (aligned). The host-compiler
// build (CPU emulation) copies bytes instead of punning types.
template <typename T, int kN>
__device__ __forceinline__ void copy16(T (&dst)[kN], const T* src) {
  static_assert(sizeof(T) * kN == 16, "16 bytes");
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
  std::memcpy(dst, src, 16);
#endif
}
template <typename T, int kN>
__device__ __forceinline__ void store16(T* dst, const T (&src)[kN]) {
  static_assert(sizeof(T) * kN == 16, "16 bytes");
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
  std::memcpy(dst, src, 16);
#endif
}

// Calls visit(r, c) for this thread's chunks of a rows x cols tile: chunks of `width` elements of a
// row vary fastest across threads (kThreads chunks apart), so contiguous rows load coalesced. No
// division per chunk: the thread's (row, column) indices advance by a constant step computed once.
template <int kThreads, typename Visit>
__device__ __forceinline__ void for_each_chunk(int rows, int cols, int width, Visit&& visit) {
  const int per_row = cols / width;  // chunks per row (the callers make cols % width == 0)
  const int total = rows * per_row;
  int r = static_cast<int>(threadIdx.x) / per_row;
  int c = (static_cast<int>(threadIdx.x) - r * per_row) * width;
  const int step_r = kThreads / per_row;
  const int step_c = (kThreads - step_r * per_row) * width;
#pragma unroll 1  // one chunk in flight per thread: the tile kernels are near their register cap
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    visit(r, c);
    r += step_r;
    c += step_c;
    if (c >= cols) {
      c -= cols;
      ++r;
    }
  }
}

// dst[r * ld + c] = src(row0 + r, c) for r < rows, c < cols (cols is the padded width), where
// src(i, j) = base[i * s_row + j * s_col] when i < row_end and j < col_end, else `fill`.
// Chunks of 16 bytes of the source (kVec elements of a row) vary fastest across threads, so
// contiguous rows load coalesced. Vectorised when the source rows are contiguous (s_col == 1) and
// every chunk is 16-byte aligned (base and row stride; cols a multiple of kVec): one 16-byte load per
// chunk (a 16-byte store too when the types match and the destination rows are aligned), element
// loads for the chunks that straddle col_end; otherwise (strided or misaligned sources) element
// loads throughout (for_each_chunk: no division per element). 64-bit offsets.
template <int kThreads, typename TSrc, typename TDst>
__device__ __forceinline__ void load_tile(TDst* dst, int ld, const TSrc* base, int64_t s_row,
                                          int64_t s_col, int64_t row0, int64_t row_end,
                                          int64_t col_end, int rows, int cols, float fill) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(TSrc));
  if (rows <= 0 || cols <= 0) return;
  const bool vec = s_col == 1 && cols % kVec == 0 &&
                   reinterpret_cast<uintptr_t>(base) % 16 == 0 &&
                   (s_row * static_cast<int64_t>(sizeof(TSrc))) % 16 == 0;
  PACA_KERNELS_TRACE_LOAD(vec);
  if (vec) {
    const bool vec_store = std::is_same_v<TSrc, TDst> &&
                           reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
                           (static_cast<int64_t>(ld) * static_cast<int64_t>(sizeof(TDst))) % 16 == 0;
    for_each_chunk<kThreads>(rows, cols, kVec, [&](int r, int c) {
      const int64_t i = row0 + r;
      TDst* d = dst + r * ld + c;
      const TSrc* src = base + i * s_row + c;
      if (i < row_end && c + kVec <= col_end) {
        alignas(16) TSrc e[kVec];
        copy16(e, src);
        if constexpr (std::is_same_v<TSrc, TDst>) {
          if (vec_store) {
            store16(d, e);
          } else {
#pragma unroll
            for (int k = 0; k < kVec; ++k) d[k] = e[k];
          }
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) d[k] = from_float<TDst>(to_float(e[k]));
        }
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          d[k] = from_float<TDst>(i < row_end && c + k < col_end ? to_float(src[k]) : fill);
        }
      }
    });
  } else {
    for_each_chunk<kThreads>(rows, cols, 1, [&](int r, int c) {
      const int64_t i = row0 + r;
      float val = fill;
      if (i < row_end && c < col_end) val = to_float(base[i * s_row + c * s_col]);
      dst[r * ld + c] = from_float<TDst>(val);
    });
  }
}

// ---- asynchronous tile loads (cp.async, sm_80+) ---------------------------------------------------

// cp.async.cg.shared.global with a 16-byte copy size: `src_bytes` (0..16) bytes from global memory,
// the rest of the 16 destination bytes zero-filled (src_bytes = 0: 16 zero bytes, nothing read).
// dst and src 16-byte aligned. commit_group closes the copies issued since the last commit into a
// group; wait_group<N> blocks until at most N of this thread's committed groups are still in flight
// (it does not wait for uncommitted copies). Visibility to the other threads of the CTA needs a
// __syncthreads after the wait, as for ordinary shared-memory stores. Below sm_80 (the glue refuses
// those devices) a synchronous copy stands in. The host-compiler build (the tests' CPU emulation,
// tests/backends/cuda_emulation.cpp) defines these three functions itself, before including this
// header, with the same semantics (copies deferred until the wait that covers them).
#if defined(__CUDACC__)
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  unsigned char* dd = static_cast<unsigned char*>(dst);
  const unsigned char* ss = static_cast<const unsigned char*>(src);
  for (int i = 0; i < 16; ++i) dd[i] = i < src_bytes ? ss[i] : 0;
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int kN>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kN) : "memory");
#endif
}
#endif

// Whether load_tile_async can load rows of `base` (element stride s_col, row stride s_row) into a
// destination of leading dimension `ld` elements, `cols` (padded) columns: contiguous rows, every
// 16-byte chunk of source and destination aligned. The same condition as load_tile's vector path
// with matching types (a 16-byte store).
template <typename T>
__device__ __forceinline__ bool async_loadable(const T* base, int64_t s_row, int64_t s_col,
                                               const T* dst, int ld, int cols) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  return s_col == 1 && cols % kVec == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0 &&
         (s_row * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
         (static_cast<int64_t>(ld) * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

// load_tile (same arguments, same result in shared memory, fill 0) for sources that pass
// async_loadable: one cp.async per 16-byte chunk, zero-filled past row_end and col_end; the caller
// commits the group and waits for it (cp_async_wait, then __syncthreads) before reading dst.
template <int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* dst, int ld, const T* base, int64_t s_row,
                                                int64_t row0, int64_t row_end, int64_t col_end,
                                                int rows, int cols) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if (rows <= 0 || cols <= 0) return;
  PACA_KERNELS_TRACE_LOAD(2);
  for_each_chunk<kThreads>(rows, cols, kVec, [&](int r, int c) {
    const int64_t i = row0 + r;
    const int64_t left = i < row_end ? imax(0, imin(kVec, col_end - c)) : 0;  // elements to read
    const T* src = left > 0 ? base + i * s_row + c : base;  // a valid address when nothing is read
    cp_async16(dst + r * ld + c, src, static_cast<int>(left) * static_cast<int>(sizeof(T)));
  });
}

// Two tiles of the same shape (rows x cols, leading dimension ld, same row range), e.g. a key and a
// value chunk, by cp.async in one walk (one set of indices for both): load_tile_async twice.
template <int kThreads, typename T>
__device__ __forceinline__ void load_tile_async2(T* dst0, T* dst1, int ld, const T* base0,
                                                 int64_t s_row0, const T* base1, int64_t s_row1,
                                                 int64_t row0, int64_t row_end, int64_t col_end,
                                                 int rows, int cols) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if (rows <= 0 || cols <= 0) return;
  PACA_KERNELS_TRACE_LOAD(2);
  PACA_KERNELS_TRACE_LOAD(2);
  for_each_chunk<kThreads>(rows, cols, kVec, [&](int r, int c) {
    const int64_t i = row0 + r;
    const int64_t left = i < row_end ? imax(0, imin(kVec, col_end - c)) : 0;
    const int bytes = static_cast<int>(left) * static_cast<int>(sizeof(T));
    cp_async16(dst0 + r * ld + c, left > 0 ? base0 + i * s_row0 + c : base0, bytes);
    cp_async16(dst1 + r * ld + c, left > 0 ? base1 + i * s_row1 + c : base1, bytes);
  });
}

// ---- block matrix product from shared memory ---------------------------------------------------

enum class Mma { kSimt, kHalf, kTf32 };
enum class Lay { kRow, kCol };

// C (R x Cc, float, leading dim ldc) = A (R x K) . B (K x Cc)  [+ C when accumulate], all in shared
// memory, computed by the whole CTA (kThreads threads; call it from every thread, uniformly).
//   A(r, k) = kRow ? A[r * lda + k] : A[k * lda + r];   B(k, c) = kRow ? B[k * ldb + c] : B[c * ldb + k]
// kHalf: T is __half/__nv_bfloat16; R, Cc, K multiples of 16; lda/ldb multiples of 8.
// kTf32: T is float (rounded to TF32 in the fragments); R, Cc multiples of 16, K of 8; ld multiples
//        of 4. Tile pointers must be 32-byte aligned: callers keep row/column offsets multiples of 16
//        elements (8 for TF32 K offsets) from 128-byte aligned bases.
// kSimt: T is float; any sizes; fp32 fused multiply-adds in the order k = 0..K-1.
// Each output element (or 16x16 output tile) is owned by one thread (warp): no atomics, fixed order.
template <Mma kMma, Lay kLA, Lay kLB, int kThreads, typename T>
__device__ __forceinline__ void block_gemm(float* C, int ldc, const T* A, int lda, const T* B,
                                           int ldb, int R, int Cc, int K, bool accumulate) {
  if constexpr (kMma == Mma::kSimt) {
    static_assert(std::is_same_v<T, float>, "the FMA path multiplies float operands");
    // A 2x2 register block per thread halves the shared-memory reads per multiply-add.
    const int R2 = (R + 1) / 2, C2 = (Cc + 1) / 2;
    for (int idx = threadIdx.x; idx < R2 * C2; idx += kThreads) {
      const int r = (idx / C2) * 2, c = (idx - (idx / C2) * C2) * 2;
      const bool r1 = r + 1 < R, c1 = c + 1 < Cc;
      float a00 = 0.f, a01 = 0.f, a10 = 0.f, a11 = 0.f;
      if (accumulate) {
        a00 = C[r * ldc + c];
        if (c1) a01 = C[r * ldc + c + 1];
        if (r1) a10 = C[(r + 1) * ldc + c];
        if (r1 && c1) a11 = C[(r + 1) * ldc + c + 1];
      }
      for (int k = 0; k < K; ++k) {
        // Out-of-range rows/columns read a valid neighbour (clamped) and are never stored.
        const int rr = r1 ? r + 1 : r, cc = c1 ? c + 1 : c;
        const float x0 = kLA == Lay::kRow ? A[r * lda + k] : A[k * lda + r];
        const float x1 = kLA == Lay::kRow ? A[rr * lda + k] : A[k * lda + rr];
        const float y0 = kLB == Lay::kRow ? B[k * ldb + c] : B[c * ldb + k];
        const float y1 = kLB == Lay::kRow ? B[k * ldb + cc] : B[cc * ldb + k];
        a00 = fmaf(x0, y0, a00);
        a01 = fmaf(x0, y1, a01);
        a10 = fmaf(x1, y0, a10);
        a11 = fmaf(x1, y1, a11);
      }
      C[r * ldc + c] = a00;
      if (c1) C[r * ldc + c + 1] = a01;
      if (r1) C[(r + 1) * ldc + c] = a10;
      if (r1 && c1) C[(r + 1) * ldc + c + 1] = a11;
    }
  } else {
#if !defined(__CUDACC__) && !defined(PACA_KERNELS_EMULATED_WMMA)
    // A host-compiler build has no tensor cores unless it supplies an nvcuda::wmma of its own (the
    // tests' CPU emulation does: tests/backends/cuda_emulation.cpp).
    static_assert(kMma == Mma::kSimt, "tensor-core products need nvcc or an emulated nvcuda::wmma");
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // bf16 and TF32 fragments need sm_80; the glue refuses older devices
#else
    namespace wmma = nvcuda::wmma;
    constexpr bool kTf32 = kMma == Mma::kTf32;
    static_assert(!kTf32 || std::is_same_v<T, float>, "TF32 fragments load float operands");
    static_assert(kTf32 || !std::is_same_v<T, float>, "kHalf multiplies fp16/bf16 operands");
    using FragT = std::conditional_t<kTf32, wmma::precision::tf32, T>;
    constexpr int kK = kTf32 ? 8 : 16;
    using LA = std::conditional_t<kLA == Lay::kRow, wmma::row_major, wmma::col_major>;
    using LB = std::conditional_t<kLB == Lay::kRow, wmma::row_major, wmma::col_major>;
    constexpr int kWarps = kThreads / kWarp;
    const int warp = threadIdx.x / kWarp;
    const int tiles_c = Cc / 16, tiles = (R / 16) * tiles_c;
    for (int t = warp; t < tiles; t += kWarps) {
      const int i = (t / tiles_c) * 16, j = (t % tiles_c) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc;
      float* cp = C + i * ldc + j;
      if (accumulate) {
        wmma::load_matrix_sync(acc, cp, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.f);
      }
      // Unrolled by 2 only: the K loop is short, and a full unroll hoists every fragment load and
      // exceeds the 128 registers of two 256-thread CTAs per multiprocessor (ptxas then spills).
#pragma unroll 2
      for (int k = 0; k < K; k += kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, FragT, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, kK, FragT, LB> b;
        wmma::load_matrix_sync(a, kLA == Lay::kRow ? A + i * lda + k : A + k * lda + i, lda);
        wmma::load_matrix_sync(b, kLB == Lay::kRow ? B + k * ldb + j : B + j * ldb + k, ldb);
        if constexpr (kTf32) {
#pragma unroll
          for (int e = 0; e < a.num_elements; ++e) a.x[e] = wmma::__float_to_tf32(a.x[e]);
#pragma unroll
          for (int e = 0; e < b.num_elements; ++e) b.x[e] = wmma::__float_to_tf32(b.x[e]);
        }
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(cp, acc, ldc, wmma::mem_row_major);
    }
#endif
  }
}

// ---- launch helpers ----------------------------------------------------------------------------

// Which kernels have had their dynamic shared-memory limit raised (cudaFuncSetAttribute, a
// per-function, per-device setting), so that each (kernel, device) pays for it once, not on every
// launch. Lock-free: a fixed table of slots per device filled by compare-and-swap; two threads that
// race on a new kernel both set the attribute (idempotent) and one of them records it. A kernel that
// finds no free slot (more than kSlots kernels with over 48 KiB) sets the attribute on every launch.
// The attribute is set to the most the device allows (queried once per device), so one setting
// serves every size a later launch of that kernel may need.
struct SmemOptInCache {
  static constexpr int kDevices = 64, kSlots = 64;
  std::atomic<const void*> kernels[kDevices][kSlots] = {};
  std::atomic<int> max_smem[kDevices] = {};  // 0: not queried yet

  // query(device) -> the device's opt-in maximum (bytes, > 0) or a negative error;
  // set(kernel, bytes) -> cudaError_t. Returns the first error, else cudaSuccess.
  template <typename Query, typename Set>
  cudaError_t ensure(int device, const void* kernel, Query&& query, Set&& set) {
    if (device < 0 || device >= kDevices) {
      const int bytes = query(device);
      return bytes < 0 ? static_cast<cudaError_t>(-bytes) : set(kernel, bytes);
    }
    std::atomic<const void*>* slots = kernels[device];
    int free_slot = -1;
    for (int i = 0; i < kSlots; ++i) {
      const void* k = slots[i].load(std::memory_order_acquire);
      if (k == kernel) return cudaSuccess;
      if (k == nullptr) {
        free_slot = i;
        break;
      }
    }
    int bytes = max_smem[device].load(std::memory_order_relaxed);
    if (bytes <= 0) {
      bytes = query(device);
      if (bytes < 0) return static_cast<cudaError_t>(-bytes);
      max_smem[device].store(bytes, std::memory_order_relaxed);
    }
    const cudaError_t err = set(kernel, bytes);
    if (err != cudaSuccess || free_slot < 0) return err;
    for (int i = free_slot; i < kSlots; ++i) {  // record it in the first free slot
      const void* expected = nullptr;
      if (slots[i].compare_exchange_strong(expected, kernel, std::memory_order_acq_rel)) break;
      if (expected == kernel) break;  // another thread recorded it
    }
    return cudaSuccess;
  }
};

#if defined(__CUDACC__)
inline SmemOptInCache& smem_opt_in_cache() {
  static SmemOptInCache cache;  // per translation unit (unnamed namespace): its own kernels
  return cache;
}

// The CTA's dynamic shared memory (one buffer; the kernels carve it with their layouts).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char smem_[];
  return smem_;
}

// How the kernels' host code (the *_run templates of the .cuh files) reaches the GPU: launches on
// one stream. The tests substitute a CPU emulation with the same interface (launch, zero).
struct CudaRuntime {
  cudaStream_t stream;

  template <typename... KArgs, typename... Args>
  cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                     Args&&... args) const {
    if (smem > 48 * 1024) {  // above the 48 KiB default needs an opt-in, once per kernel and device
      int device = 0;
      cudaError_t err = cudaGetDevice(&device);
      if (err != cudaSuccess) return err;
      err = smem_opt_in_cache().ensure(
          device, reinterpret_cast<const void*>(kernel),
          [](int dev) {
            int bytes = 0;
            const cudaError_t e =
                cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
            return e != cudaSuccess ? -static_cast<int>(e) : bytes;
          },
          [kernel](const void*, int bytes) {
            return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
          });
      if (err != cudaSuccess) return err;
    }
    kernel<<<grid, block, smem, stream>>>(static_cast<Args&&>(args)...);
    return cudaGetLastError();  // configuration errors surface here, not at the launch
  }

  cudaError_t zero(void* ptr, size_t bytes) const {
    return cudaMemsetAsync(ptr, 0, bytes, stream);
  }
};
#else
unsigned char* dynamic_smem();  // defined by the host-compiler build (CPU emulation)
#endif

// gridDim.y and gridDim.z are limited to 65535: kernels loop over the rest (grid-stride). The CPU
// emulation defines PACA_KERNELS_EMULATED_GRID_LIMIT and its own (run-time settable) kMaxGridYZ, so
// that its tests reach the grid-stride loops with a few CTAs.
#if !defined(PACA_KERNELS_EMULATED_GRID_LIMIT)
constexpr int64_t kMaxGridYZ = 65535;
#endif

// Calls f(T{}) with T the element type of `dtype` (float, __half, __nv_bfloat16).
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace paca_kernels::cuda
