// Kernels of paca_kernels::p2c_attention_fwd / _bwd (schemas and semantics: csrc/registration.cpp)
// and their launch sequences, templated on the element type and on the runtime that launches them:
// csrc/cuda/p2c_attention.cu instantiates them with CudaRuntime (host API: launchers.h); the tests
// compile the float32 path with a host compiler and run it on CPU threads. No torch headers.
//
// Few keys (M <= 256), many queries (N patches): a CTA takes BN queries of one (batch, head) and
// does the whole row softmax over M in one pass; parallelism comes from the query tiles, which is
// what the small B*h of detection/segmentation shapes needs. The keys/values are streamed through
// shared memory in chunks of KC keys (bounded shared memory at M = 256, d = 128, on sm_80 too);
// the BN x M score block stays in shared memory as float. No N x M matrix reaches global memory.
// Forward: when the key and value rows are contiguous and 16-byte aligned, the chunks are double
// buffered with cp.async (the next chunk loads while the current one's product runs); otherwise
// (strided or misaligned inputs) one buffer and synchronous loads. The backward loads its key/value
// chunks the same way (double buffered where aligned, one buffer and synchronous loads otherwise).
//
// fp16/bf16: every product on tensor cores (WMMA 16x16x16, float accumulation); M and d are padded
// with zeros to multiples of 16 (padded keys get probability 0). float32: fp32 FMA, padding to 4.
//
// Forward, per CTA:  S = q.k^T (chunks of keys) ; P = exp(S*scale - max) / sum ; O = P.v (chunks).
// Backward, per CTA, from q, k, v and dO alone (nothing saved by the forward), in two sweeps over
// the key chunks of each query tile:
//   1. S = q.k^T*scale and dP = dO.v^T per chunk; per row, online: m = max S, l = sum exp(S - m),
//      sum exp(S - m) dP; then D = rowsum(P o dP) = (sum exp(S - m) dP) / l.
//   2. S and dP again, P = exp(S - m) / l, dS = P o (dP - D), dq += dS.k (kept in shared memory,
//      times scale at the end), dv_c = P^T.dO, dk_c = dS^T.q.
// P and D thus come from the same scores and dP, as in PyTorch's softmax backward: S - m is exact
// (exp(S - lse) with a saved fp32 lse carries ~|S| * 2^-24 relative error into P), and a saturated
// row (P one-hot) gives dS = 0 exactly (D = rowsum(dO o O) from the rounded output does not cancel
// dP). D needs the whole row before any dS, hence the first sweep: it recomputes the S and dP
// products once more (7 block products per chunk instead of 5) rather than hold a BN x M block of
// each in shared memory, which M = 256, d = 128 leaves no room for.
// dk/dv are sums over N: fp32 atomics into a (B, M, H, D) buffer, or (deterministic) each CTA owns a
// fixed group of query tiles and a private (B, M, H, D) slice of partial sums that a second kernel
// adds in group order (bitwise reproducible). That kernel also applies scale to dk and converts.

#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

// A namespace per op: the tests include both headers in one translation unit.
namespace paca_kernels::cuda::p2c {
namespace {

constexpr int kThreads = 128;  // 4 warps per CTA
constexpr int kWarps = kThreads / kWarp;
// Resident CTAs per multiprocessor the register allocation must allow (<= 128 registers/thread);
// without it ptxas picks lower register targets for some kernels and spills.
constexpr int kMinCtas = 4;

// Tile sizes per element type: tensor-core tiles for fp16/bf16, smaller FMA tiles for float32.
template <typename T>
struct P2CTiles {
  static constexpr bool kTC = !std::is_same_v<T, float>;
  static constexpr Mma kMma = kTC ? Mma::kHalf : Mma::kSimt;
  static constexpr int kFwdBN = kTC ? 64 : 32;  // queries per CTA, forward
  static constexpr int kFwdKC = kTC ? 64 : 32;  // keys per chunk, forward
  static constexpr int kBwdBN = kTC ? 64 : 32;  // queries per CTA, backward
  static constexpr int kBwdKC = 32;             // keys per chunk, backward
  static constexpr int kPadUnit = kTC ? 16 : 4;                  // M and d are padded to this
  static constexpr int kLdPad = 16 / static_cast<int>(sizeof(T));  // +16 bytes per smem row
};

// Shared-memory layout of the forward (host and device compute the same offsets).
struct FwdLayout {
  int Mp, Dp, ldq, ldkv, lds, ldp;
  size_t off_kv, off_kv2, off_s, off_p, total;
  template <typename T>
  __host__ __device__ static FwdLayout make(int64_t M, int64_t D) {
    using Tl = P2CTiles<T>;
    FwdLayout l{};
    l.Mp = static_cast<int>(round_up(M, Tl::kPadUnit));
    l.Dp = static_cast<int>(round_up(D, Tl::kPadUnit));
    l.ldq = l.Dp + Tl::kLdPad;
    l.ldkv = l.Dp + Tl::kLdPad;
    l.lds = static_cast<int>(imax(l.Mp, l.Dp)) + 4;  // scores, then the float output block
    l.ldp = l.Mp + Tl::kLdPad;
    const size_t q = align128(sizeof(T) * Tl::kFwdBN * l.ldq);
    const size_t kv = align128(sizeof(T) * Tl::kFwdKC * l.ldkv);
    const size_t s = align128(sizeof(float) * Tl::kFwdBN * l.lds);
    const size_t p = align128(sizeof(T) * Tl::kFwdBN * l.ldp);
    // Two key/value chunk buffers: cp.async fills one while the other is read (double buffering;
    // every dtype x M <= kMaxKeys x D <= kMaxHeadDim still fits sm_80's 163 KiB: the budget test).
    l.off_kv = q;
    l.off_kv2 = q + kv;
    l.off_s = q + 2 * kv;
    l.off_p = q + 2 * kv + s;
    l.total = q + 2 * kv + s + p;
    return l;
  }
};

struct BwdLayout {
  int Mp, Dp, ldq, ldkv, ldc, ldp, ldf;
  size_t off_do, off_k, off_v, off_k2, off_v2, off_s, off_dp, off_p, off_ds, off_dq, off_stage, off_stats,
      total;
  template <typename T>
  __host__ __device__ static BwdLayout make(int64_t M, int64_t D) {
    using Tl = P2CTiles<T>;
    constexpr int BN = Tl::kBwdBN, KC = Tl::kBwdKC;
    BwdLayout l{};
    l.Mp = static_cast<int>(round_up(M, Tl::kPadUnit));
    l.Dp = static_cast<int>(round_up(D, Tl::kPadUnit));
    l.ldq = l.Dp + Tl::kLdPad;
    l.ldkv = l.Dp + Tl::kLdPad;
    l.ldc = KC + 4;
    l.ldp = KC + Tl::kLdPad;
    l.ldf = l.Dp + 4;
    size_t off = 0;
    auto take = [&off](size_t bytes) {
      const size_t at = off;
      off += align128(bytes);
      return at;
    };
    take(sizeof(T) * BN * l.ldq);  // q at offset 0
    l.off_do = take(sizeof(T) * BN * l.ldq);
    l.off_k = take(sizeof(T) * KC * l.ldkv);
    l.off_v = take(sizeof(T) * KC * l.ldkv);
    // The second key/value chunk buffers of the cp.async double buffering (the budget test holds
    // every configuration to sm_80's 163 KiB).
    l.off_k2 = take(sizeof(T) * KC * l.ldkv);  // off_k2 - off_k == off_v2 - off_v
    l.off_v2 = take(sizeof(T) * KC * l.ldkv);
    l.off_s = take(sizeof(float) * BN * l.ldc);
    l.off_dp = take(sizeof(float) * BN * l.ldc);
    l.off_p = take(sizeof(T) * BN * l.ldp);
    l.off_ds = take(sizeof(T) * BN * l.ldp);
    l.off_dq = take(sizeof(float) * BN * l.ldf);
    l.off_stage = take(sizeof(float) * KC * l.ldf);
    l.off_stats = take(sizeof(float) * 3 * BN);  // per row: max, then 1 / sum, and D
    l.total = off;
    return l;
  }
};

// ---- forward -----------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinCtas)
    p2c_fwd_kernel(const P2CFwdArgs a) {
  using Tl = P2CTiles<T>;
  constexpr int BN = Tl::kFwdBN, KC = Tl::kFwdKC;
  unsigned char* smem = dynamic_smem();
  const FwdLayout L = FwdLayout::make<T>(a.M, a.D);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sKV = reinterpret_cast<T*>(smem + L.off_kv);
  T* sKV2 = reinterpret_cast<T*>(smem + L.off_kv2);
  float* sS = reinterpret_cast<float*>(smem + L.off_s);
  T* sP = reinterpret_cast<T*>(smem + L.off_p);

  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int M = static_cast<int>(a.M), D = static_cast<int>(a.D);

  for (int64_t bh = blockIdx.y; bh < a.B * a.H; bh += gridDim.y) {
    const int64_t b = bh / a.H, hd = bh % a.H;
    load_tile<kThreads>(sQ, L.ldq, q + b * a.sq[0] + hd * a.sq[2], a.sq[1], a.sq[3], n0, a.N, D,
                        BN, L.Dp, 0.f);
    const T* kb = k + b * a.sk[0] + hd * a.sk[2];
    const T* vb = v + b * a.sv[0] + hd * a.sv[2];
    // Row softmax over the M real keys (padded keys get probability 0), one warp per row. An all
    // -inf (or NaN) row gives NaN, as torch.softmax does.
    // One exp per score: each lane keeps its exponentials in its own score slots (m = lane + 32 i,
    // the same in every loop), so the normalisation reads them back without synchronisation.
    auto softmax = [&]() {
      for (int r = warp; r < BN; r += kWarps) {
        float* srow = sS + r * L.lds;
        float mx = -INFINITY;
        for (int m = lane; m < M; m += kWarp) mx = fmaxf(mx, srow[m] * a.scale);
        mx = warp_max(mx);
        float sum = 0.f;
        for (int m = lane; m < M; m += kWarp) {
          const float e = expf(srow[m] * a.scale - mx);
          srow[m] = e;
          sum += e;
        }
        sum = warp_sum(sum);
        const float inv = 1.f / sum;
        T* prow = sP + r * L.ldp;
        for (int m = lane; m < L.Mp; m += kWarp) prow[m] = from_float<T>(m < M ? srow[m] * inv : 0.f);
        if (lane == 0 && n0 + r < a.N) a.lse[bh * a.N + n0 + r] = mx + logf(sum);
      }
    };
    if (async_loadable(kb, a.sk[1], a.sk[3], sKV, L.ldkv, L.Dp) &&
        async_loadable(vb, a.sv[1], a.sv[3], sKV, L.ldkv, L.Dp)) {
      // Double-buffered cp.async: one sequence of 2 * chunks loads (the key chunks, then the value
      // chunks), chunk j into buffer j % 2; chunk j + 1 is in flight while chunk j's product runs
      // (the first value chunk loads during the last key chunk's product and the softmax).
      const int chunks = static_cast<int>(cdiv(L.Mp, KC));
      auto issue = [&](int j) {
        const bool is_v = j >= chunks;
        const int k0 = (is_v ? j - chunks : j) * KC;
        load_tile_async<kThreads>(j % 2 ? sKV2 : sKV, L.ldkv, is_v ? vb : kb,
                                  is_v ? a.sv[1] : a.sk[1], k0, M, D,
                                  static_cast<int>(imin(KC, L.Mp - k0)), L.Dp);
        cp_async_commit();
      };
      issue(0);
#pragma unroll 1
      for (int j = 0; j < 2 * chunks; ++j) {
        if (j == chunks) {  // every key chunk's product is in sS: softmax, P into sP
          __syncthreads();
          softmax();
        }
        __syncthreads();  // chunk j - 1's product has finished reading the buffer chunk j + 1 takes
        if (j + 1 < 2 * chunks) {
          issue(j + 1);
          cp_async_wait<1>();  // this thread's copies of chunk j have landed
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();  // ... and every thread's
        const T* buf = j % 2 ? sKV2 : sKV;
        if (j < chunks) {
          const int k0 = j * KC, kc = static_cast<int>(imin(KC, L.Mp - k0));
          block_gemm<Tl::kMma, Lay::kRow, Lay::kCol, kThreads>(sS + k0, L.lds, sQ, L.ldq, buf,
                                                               L.ldkv, BN, kc, L.Dp, false);
        } else {
          const int k0 = (j - chunks) * KC, kc = static_cast<int>(imin(KC, L.Mp - k0));
          block_gemm<Tl::kMma, Lay::kRow, Lay::kRow, kThreads>(sS, L.lds, sP + k0, L.ldp, buf,
                                                               L.ldkv, BN, L.Dp, kc, k0 > 0);
        }
      }
      __syncthreads();  // the output block is complete
    } else {
      // Synchronous loads (strided or misaligned keys/values): one chunk buffer.
      // S = q.k^T, KC keys at a time.
      for (int k0 = 0; k0 < L.Mp; k0 += KC) {
        const int kc = static_cast<int>(imin(KC, L.Mp - k0));
        __syncthreads();  // the previous chunk's product has finished reading sKV
        load_tile<kThreads>(sKV, L.ldkv, kb, a.sk[1], a.sk[3], k0, M, D, kc, L.Dp, 0.f);
        __syncthreads();
        block_gemm<Tl::kMma, Lay::kRow, Lay::kCol, kThreads>(sS + k0, L.lds, sQ, L.ldq, sKV,
                                                             L.ldkv, BN, kc, L.Dp, false);
      }
      __syncthreads();
      softmax();
      __syncthreads();
      // O = P.v, accumulated in float over the key chunks; sS (dead now) holds the BN x Dp block.
      for (int k0 = 0; k0 < L.Mp; k0 += KC) {
        const int kc = static_cast<int>(imin(KC, L.Mp - k0));
        load_tile<kThreads>(sKV, L.ldkv, vb, a.sv[1], a.sv[3], k0, M, D, kc, L.Dp, 0.f);
        __syncthreads();
        block_gemm<Tl::kMma, Lay::kRow, Lay::kRow, kThreads>(sS, L.lds, sP + k0, L.ldp, sKV,
                                                             L.ldkv, BN, L.Dp, kc, k0 > 0);
        __syncthreads();  // before the next chunk overwrites sKV / before the output is read
      }
    }
    // out (B, N, H, D) contiguous.
    for (int idx = threadIdx.x; idx < BN * D; idx += kThreads) {
      const int r = idx / D, j = idx - r * D;
      const int64_t n = n0 + r;
      if (n < a.N) out[((b * a.N + n) * a.H + hd) * a.D + j] = from_float<T>(sS[r * L.lds + j]);
    }
    __syncthreads();  // the next (b, head) reuses shared memory
  }
}

// ---- backward ----------------------------------------------------------------------------------

// S * scale rounded to float and never contracted into an FMA with the subtraction that follows:
// the backward computes it in both sweeps (the row max, then every exponent) and needs the same bits
// each time, so that the maximal score gives exp(0) = 1 exactly.
__device__ __forceinline__ float scaled_score(float s, float scale) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(s, scale);
#else
  return s * scale;  // the host build (CPU emulation) does not contract across statements' roundings
#endif
}

// Tiles [tile_begin, tile_end) of query rows of one CTA; its dk/dv partial sums go to `acc_k` /
// `acc_v`: atomically (shared (B, M, H, D) buffer) or, deterministic, into the CTA group's private
// slice (written by its first tile, added to by the next ones, in tile order).
// kAsync: keys and values pass bwd_async_loadable (the host checks): double-buffered cp.async chunk
// loads; else synchronous loads. Two instantiations rather than a run-time branch: the branch's
// extra live registers made ptxas spill the fp16/bf16 kernels.
template <typename T, bool kAsync>
__global__ void __launch_bounds__(kThreads, kMinCtas)
    p2c_bwd_kernel(const P2CBwdArgs a, float* ws_k, float* ws_v, int64_t tiles_per_cta) {
  using Tl = P2CTiles<T>;
  constexpr int BN = Tl::kBwdBN, KC = Tl::kBwdKC;
  unsigned char* smem = dynamic_smem();
  const BwdLayout L = BwdLayout::make<T>(a.M, a.D);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = reinterpret_cast<T*>(smem + L.off_do);
  T* sK = reinterpret_cast<T*>(smem + L.off_k);
  T* sV = reinterpret_cast<T*>(smem + L.off_v);
  float* sS = reinterpret_cast<float*>(smem + L.off_s);
  float* sdP = reinterpret_cast<float*>(smem + L.off_dp);
  T* sP = reinterpret_cast<T*>(smem + L.off_p);
  T* sdS = reinterpret_cast<T*>(smem + L.off_ds);
  float* sdQ = reinterpret_cast<float*>(smem + L.off_dq);
  float* sStage = reinterpret_cast<float*>(smem + L.off_stage);
  float* sMax = reinterpret_cast<float*>(smem + L.off_stats);  // row max of S*scale
  float* sSum = sMax + BN;  // sum exp(S*scale - max) while sweeping; then its inverse
  float* sD = sMax + 2 * BN;  // sum exp(S*scale - max) dP while sweeping; then D

  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* g = static_cast<const T*>(a.grad_out);
  T* dq = static_cast<T*>(a.dq);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int M = static_cast<int>(a.M), D = static_cast<int>(a.D);
  const int64_t tiles = cdiv(a.N, BN);
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * tiles_per_cta;
  const int64_t tile_end = imin(tiles, tile_begin + tiles_per_cta);
  const int64_t slice = a.deterministic ? a.B * a.M * a.H * a.D : 0;  // elements per group slice
  float* acc_k = ws_k + static_cast<int64_t>(blockIdx.x) * slice;
  float* acc_v = ws_v + static_cast<int64_t>(blockIdx.x) * slice;

  for (int64_t bh = blockIdx.y; bh < a.B * a.H; bh += gridDim.y) {
    const int64_t b = bh / a.H, hd = bh % a.H;
    // Contiguous, 16-byte aligned keys and values: the chunks are double buffered with cp.async
    // (chunk c in sK/sV for even c, in the second pair, `pair` elements further on, for odd c;
    // chunk c + 1 loads during chunk c's products). Otherwise synchronous loads into sK/sV.
    // (The source pointers are recomputed where used: fewer registers live across the products.)
    constexpr bool async = kAsync;
    const int pair = static_cast<int>((L.off_k2 - L.off_k) / sizeof(T));  // = off_v2 - off_v
    const int chunks = static_cast<int>(cdiv(L.Mp, KC));
    // Step j of a tile's 2 * chunks steps (both sweeps) takes key chunk j % chunks, in buffer j % 2.
    auto issue = [&](int j) {  // step j's keys and values, one cp.async group
      const int shift = j % 2 != 0 ? pair : 0;
      const int k0 = (j % chunks) * KC;
      const int kc = static_cast<int>(imin(KC, L.Mp - k0));
      load_tile_async2<kThreads>(sK + shift, sV + shift, L.ldkv, k + b * a.sk[0] + hd * a.sk[2],
                                 a.sk[1], v + b * a.sv[0] + hd * a.sv[2], a.sv[1], k0, M, D, kc,
                                 L.Dp);
      cp_async_commit();
    };
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t n0 = tile * BN;
      load_tile<kThreads>(sQ, L.ldq, q + b * a.sq[0] + hd * a.sq[2], a.sq[1], a.sq[3], n0, a.N, D,
                          BN, L.Dp, 0.f);
      load_tile<kThreads>(sdO, L.ldq, g + b * a.sg[0] + hd * a.sg[2], a.sg[1], a.sg[3], n0, a.N, D,
                          BN, L.Dp, 0.f);
      for (int idx = threadIdx.x; idx < BN * L.Dp; idx += kThreads) sdQ[(idx / L.Dp) * L.ldf +
                                                                        idx % L.Dp] = 0.f;
      // Running row statistics of the first sweep (padded rows: q = 0 there, finite scores).
      for (int r = threadIdx.x; r < BN; r += kThreads) {
        sMax[r] = -INFINITY;
        sSum[r] = 0.f;
        sD[r] = 0.f;
      }
#pragma unroll 1
      for (int j = 0; j < 2 * chunks; ++j) {
        const int k0 = (j < chunks ? j : j - chunks) * KC;
        const int kc = static_cast<int>(imin(KC, L.Mp - k0));
        __syncthreads();  // sK/sV/sS/sdP/sP/sdS/sStage free again (and the stores above visible)
        const int shift = async && j % 2 != 0 ? pair : 0;
        const T* cK = sK + shift;  // this step's keys and values
        const T* cV = sV + shift;
        if constexpr (kAsync) {
          // Step j + 1 into the buffers step j - 1 used (read before the sync above); the first
          // step also issues step 0 itself. One issue site (a second inlined copy made ptxas spill).
#pragma unroll 1
          for (int j1 = j == 0 ? 0 : j + 1; j1 <= j + 1 && j1 < 2 * chunks; ++j1) issue(j1);
          if (j + 1 < 2 * chunks) {
            cp_async_wait<1>();
          } else {
            cp_async_wait<0>();
          }
        } else {
          load_tile<kThreads>(sK, L.ldkv, k + b * a.sk[0] + hd * a.sk[2], a.sk[1], a.sk[3], k0, M,
                              D, kc, L.Dp, 0.f);
          load_tile<kThreads>(sV, L.ldkv, v + b * a.sv[0] + hd * a.sv[2], a.sv[1], a.sv[3], k0, M,
                              D, kc, L.Dp, 0.f);
        }
        __syncthreads();
        block_gemm<Tl::kMma, Lay::kRow, Lay::kCol, kThreads>(sS, L.ldc, sQ, L.ldq, cK, L.ldkv, BN,
                                                             kc, L.Dp, false);
        block_gemm<Tl::kMma, Lay::kRow, Lay::kCol, kThreads>(sdP, L.ldc, sdO, L.ldq, cV, L.ldkv,
                                                             BN, kc, L.Dp, false);
        __syncthreads();
        if (j < chunks) {  // the statistics sweep
          // One warp per row: fold this chunk's real keys into m, l and sum exp(S - m) dP, rescaling
          // the sums by exp(m_old - m_new) when the max grows. Bitwise the same S*scale as the second
          // sweep (same products, scaled_score), so exp(S*scale - m) is exactly 1 at the max.
          const bool last = j + 1 == chunks;
          for (int r = warp; r < BN; r += kWarps) {
            const float* srow = sS + r * L.ldc;
            const float* dprow = sdP + r * L.ldc;
            const int cend = static_cast<int>(imin(kc, M - k0));  // this chunk's real keys
            float mx = -INFINITY;
#pragma unroll 1
            for (int c = lane; c < cend; c += kWarp) {
              mx = fmaxf(mx, scaled_score(srow[c], a.scale));
            }
            const float m_old = sMax[r];
            const float m_new = fmaxf(m_old, warp_max(mx));
            float l = 0.f, dn = 0.f;
#pragma unroll 1
            for (int c = lane; c < cend; c += kWarp) {
              const float e = expf(scaled_score(srow[c], a.scale) - m_new);
              l += e;
              dn += e * dprow[c];
            }
            l = warp_sum(l);
            dn = warp_sum(dn);
            if (lane == 0) {
              // m_old = m_new (also both -inf: nothing summed yet): no rescaling.
              const float alpha = m_old == m_new ? 1.f : expf(m_old - m_new);
              l += alpha * sSum[r];
              dn += alpha * sD[r];
              sMax[r] = m_new;
              sSum[r] = last ? 1.f / l : l;
              sD[r] = last ? dn / l : dn;
            }
          }
          continue;  // the next step's first sync orders these stores before any read
        }
        // P and dS; padded rows and keys get exactly 0 so they add nothing to dk/dv/dq.
        for (int idx = threadIdx.x; idx < BN * kc; idx += kThreads) {
          const int r = idx / kc, c = idx - r * kc;
          const bool valid = n0 + r < a.N && k0 + c < M;
          const float p = valid ? expf(scaled_score(sS[r * L.ldc + c], a.scale) - sMax[r]) * sSum[r] : 0.f;
          const float ds = valid ? p * (sdP[r * L.ldc + c] - sD[r]) : 0.f;
          sP[r * L.ldp + c] = from_float<T>(p);
          sdS[r * L.ldp + c] = from_float<T>(ds);
        }
        __syncthreads();
        // dq += dS.k ; dv_c = P^T.dO (the dq and stage products write different buffers).
        block_gemm<Tl::kMma, Lay::kRow, Lay::kRow, kThreads>(sdQ, L.ldf, sdS, L.ldp, cK, L.ldkv,
                                                             BN, L.Dp, kc, true);
        block_gemm<Tl::kMma, Lay::kCol, Lay::kRow, kThreads>(sStage, L.ldf, sP, L.ldp, sdO, L.ldq,
                                                             kc, L.Dp, BN, false);
        for (int pass = 0; pass < 2; ++pass) {
          if (pass == 1) {
            __syncthreads();  // the dv flush has read sStage
            block_gemm<Tl::kMma, Lay::kCol, Lay::kRow, kThreads>(sStage, L.ldf, sdS, L.ldp, sQ,
                                                                 L.ldq, kc, L.Dp, BN, false);
          }
          __syncthreads();
          float* accp = pass == 0 ? acc_v : acc_k;
          for (int idx = threadIdx.x; idx < kc * D; idx += kThreads) {
            const int r = idx / D, j = idx - r * D;
            const int64_t m = k0 + r;
            if (m >= M) continue;
            float* dst = accp + ((b * a.M + m) * a.H + hd) * a.D + j;
            const float val = sStage[r * L.ldf + j];
            if (!a.deterministic) {
              atomicAdd(dst, val);
            } else if (tile == tile_begin) {
              *dst = val;
            } else {
              *dst += val;  // this CTA's own slice: no other writer
            }
          }
        }
      }
      __syncthreads();  // sdQ complete
      T* dq_base = dq + (b * a.N * a.H + hd) * a.D;
      for (int idx = threadIdx.x; idx < BN * D; idx += kThreads) {
        const int r = idx / D, j = idx - r * D;
        const int64_t n = n0 + r;
        if (n < a.N) dq_base[n * a.H * a.D + j] = from_float<T>(sdQ[r * L.ldf + j] * a.scale);
      }
      __syncthreads();  // the next tile reuses shared memory
    }
  }
}

// dk = scale * sum_g ws_k[g], dv = sum_g ws_v[g] in group order g = 0..groups-1, converted to T.
template <typename T>
__global__ void __launch_bounds__(256)
    p2c_reduce_kernel(const float* ws_k, const float* ws_v, int64_t groups, int64_t count,
                      float scale, T* dk, T* dv) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += stride) {
    float sk = 0.f, sv = 0.f;
    for (int64_t gi = 0; gi < groups; ++gi) {
      sk += ws_k[gi * count + e];
      sv += ws_v[gi * count + e];
    }
    dk[e] = from_float<T>(sk * scale);
    dv[e] = from_float<T>(sv);
  }
}

// Query tiles per CTA in the backward: 1 with atomics; deterministic: enough groups of tiles to give
// ~2 CTAs per multiprocessor, each group reducing into its own slice.
template <typename T>
int64_t bwd_tiles_per_cta(const P2CBwdArgs& a, int num_sms) {
  const int64_t tiles = cdiv(a.N, P2CTiles<T>::kBwdBN);
  if (!a.deterministic || tiles == 0) return 1;
  const int64_t groups = imin(tiles, imax(1, cdiv(2 * static_cast<int64_t>(num_sms), a.B * a.H)));
  return cdiv(tiles, groups);
}

template <typename T>
int64_t bwd_workspace(const P2CBwdArgs& a, int num_sms) {
  const int64_t count = a.B * a.M * a.H * a.D;
  if (!a.deterministic || a.N == 0) return 2 * count;  // one (zeroed) buffer pair
  const int64_t tiles = cdiv(a.N, P2CTiles<T>::kBwdBN);
  return 2 * count * cdiv(tiles, bwd_tiles_per_cta<T>(a, num_sms));
}

int64_t reduce_blocks(int64_t count) { return imax(1, imin(cdiv(count, 256), 8192)); }

// Whether every (batch, head) of a (B, M, H, D) tensor with strides s has contiguous, 16-byte
// aligned rows: the backward's cp.async condition (the shared-memory side always holds: 128-byte
// aligned buffers, rows of a multiple of 16 bytes, Dp a multiple of the 16-byte chunk).
template <typename T>
bool bwd_async_loadable(const void* p, const int64_t (&s)[4]) {
  const int64_t e = static_cast<int64_t>(sizeof(T));
  return s[3] == 1 && reinterpret_cast<uintptr_t>(p) % 16 == 0 && (s[0] * e) % 16 == 0 &&
         (s[1] * e) % 16 == 0 && (s[2] * e) % 16 == 0;
}


// ---- host side: launch sequences over a runtime (CudaRuntime, or the tests' CPU emulation) -------

template <typename T, typename Runtime>
cudaError_t p2c_fwd_run(const P2CFwdArgs& args, const Runtime& rt) {
  if (args.B * args.N * args.H == 0 || args.D == 0 || args.M == 0) return cudaSuccess;
  const size_t smem = FwdLayout::make<T>(args.M, args.D).total;
  const dim3 grid(static_cast<unsigned>(cdiv(args.N, P2CTiles<T>::kFwdBN)),
                  static_cast<unsigned>(imin(args.B * args.H, kMaxGridYZ)));
  return rt.launch(p2c_fwd_kernel<T>, grid, dim3(kThreads), smem, args);
}

// workspace: bwd_workspace<T>(args, num_sms) floats (dk partials, then dv partials).
template <typename T, typename Runtime>
cudaError_t p2c_bwd_run(const P2CBwdArgs& args, float* workspace, int num_sms, const Runtime& rt) {
  if (args.B * args.H * args.D == 0 || args.M == 0) return cudaSuccess;
  const int64_t count = args.B * args.M * args.H * args.D;
  const int64_t per_buffer = bwd_workspace<T>(args, num_sms) / 2;
  float* ws_k = workspace;
  float* ws_v = workspace + per_buffer;
  cudaError_t err = cudaSuccess;
  if (args.N == 0 || !args.deterministic) {
    // Atomics accumulate into zeros; with no queries nothing flows into k and v.
    err = rt.zero(workspace, sizeof(float) * 2 * count);
    if (err != cudaSuccess) return err;
  }
  if (args.N > 0) {
    const int64_t tpc = bwd_tiles_per_cta<T>(args, num_sms);
    const int64_t tiles = cdiv(args.N, P2CTiles<T>::kBwdBN);
    const dim3 grid(static_cast<unsigned>(cdiv(tiles, tpc)),
                    static_cast<unsigned>(imin(args.B * args.H, kMaxGridYZ)));
    const size_t smem = BwdLayout::make<T>(args.M, args.D).total;
    err = bwd_async_loadable<T>(args.k, args.sk) && bwd_async_loadable<T>(args.v, args.sv)
              ? rt.launch(p2c_bwd_kernel<T, true>, grid, dim3(kThreads), smem, args, ws_k, ws_v, tpc)
              : rt.launch(p2c_bwd_kernel<T, false>, grid, dim3(kThreads), smem, args, ws_k, ws_v,
                          tpc);
    if (err != cudaSuccess) return err;
  }
  const int64_t groups = per_buffer / count;
  return rt.launch(p2c_reduce_kernel<T>, dim3(static_cast<unsigned>(reduce_blocks(count))), dim3(256),
                   size_t{0}, static_cast<const float*>(ws_k), static_cast<const float*>(ws_v), groups,
                   count, args.scale, static_cast<T*>(args.dk), static_cast<T*>(args.dv));
}

}  // namespace
}  // namespace paca_kernels::cuda::p2c
