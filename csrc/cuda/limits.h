// Size limits of the paca_kernels CUDA kernels: the largest shapes they hold on chip. The one
// source of these numbers: the kernels and the torch glue include this header (nvcc and the host
// compiler alike: plain constexpr, no CUDA header), and setup.py parses it (a strict
// `constexpr int64_t kName = <integer>;` per line, the build fails if one is missing) into
// _build_info.json's "limits": {"cuda": {...}}, which Python reads with
// paca_kernels._ext.kernel_limits("cuda"). Keep each definition on one line in that form.
#pragma once

#include <cstdint>

namespace paca_kernels::cuda {

constexpr int64_t kMaxKeys = 256;       // p2c_attention: M, all keys on chip
constexpr int64_t kMaxHeadDim = 128;    // p2c_attention: D
constexpr int64_t kMaxChannels = 1024;  // cluster_pool: C (more shared memory than sm_80 has above
                                        // kMaxChannelsSmallSmem for the backward: see
                                        // cluster_pool_bwd_smem_bytes)
// cluster_pool: C up to which the backward fits every supported GPU's shared memory (sm_80's
// 163 KiB per block); above it, up to kMaxChannels, it needs ~200 KiB (sm_90 has 227 KiB).
constexpr int64_t kMaxChannelsSmallSmem = 512;

// Opt-in dynamic shared memory per block of the supported GPUs (bytes): sm_80 (A100) 163 KiB, sm_90
// (H100/H200) 227 KiB. Every configuration the launchers can choose within the limits above fits
// sm_80, except the cluster_pool backward above kMaxChannelsSmallSmem, which fits sm_90
// (tests/backends/test_cuda_compile.py enumerates them through the launchers' own sizing code).
constexpr int64_t kSmemPerBlockSm80 = 166912;
constexpr int64_t kSmemPerBlockSm90 = 232448;

}  // namespace paca_kernels::cuda
