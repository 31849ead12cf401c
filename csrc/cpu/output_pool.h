// The CPU kernels' large outputs come from a bounded cache of freed blocks (output_pool.cpp).
//
// Why: an output of a few MiB or more is, with glibc's malloc, fresh memory on nearly every call
// (allocations of 32 MiB and up are always mmapped, and freed heap memory above the trim threshold
// is returned to the system), so the kernel that writes it first takes a page fault per 4 KiB
// page. On the development machine (a virtual machine) that is about 1 microsecond a page:
// allocating and filling a 38 MiB tensor took 10.7 ms against 1.1 ms for refilling one already
// mapped, and the fused MLP convolution of PaCa-ViT-Tiny's first stage in training (B = 8)
// 15.7 ms against 6.8 ms with malloc told to keep its memory. A training step allocates the same
// outputs step after step, so a block freed by one step is what the next one asks for.
//
// empty_output() is at::empty for the CPU kernels' outputs: contiguous, uninitialised. Outputs
// of at least kPoolMinBytes take their storage from the pool's allocator (the tensor is an
// ordinary resizable CPU tensor; its storage's deleter hands the block back); smaller ones, and
// every output when the pool is off, come from at::empty. Freed blocks are kept, keyed by their
// size rounded up to 64 KiB, up to a cap on the bytes kept (PACA_KERNELS_CPU_OUTPUT_CACHE_MB,
// default 1024; 0 turns the pool off); a block that would exceed it is freed at once. The cache
// only ever holds memory that no tensor uses, and cpu_output_cache_clear() (the op of the same
// name) gives it all back.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>

namespace paca_kernels::cpu {

constexpr size_t kPoolMinBytes = size_t(256) << 10;

// A contiguous CPU tensor of `sizes` with options' dtype, uninitialised (filled with NaN under
// torch.utils.deterministic.fill_uninitialized_memory, as at::empty is).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes held by the cache (freed blocks, no tensor's), and the cap on them.
int64_t cpu_output_cache_bytes();
int64_t cpu_output_cache_limit();
// Frees every cached block; returns the bytes given back.
int64_t cpu_output_cache_clear();

}  // namespace paca_kernels::cpu
