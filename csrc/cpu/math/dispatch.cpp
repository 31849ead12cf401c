// Selection of the float32 kernels for this CPU (see dispatch.h). Compiled for the baseline ISA.
#include "cpu/math/dispatch.h"

#include "cpu/math/kernels.h"

#include <cstdlib>
#include <cstring>

namespace paca_kernels::cpu {

Float32Kernels select_float32_kernels() {
  Float32Kernels r;
  baseline::register_kernels(r);
#if PACA_X86_DISPATCH
  // PACA_KERNELS_CPU_ISA=baseline, =avx2, =avx512 or =avx512bf16 caps the choice (so that the
  // tests can exercise every build on an AVX-512 machine).
  const char* isa = std::getenv("PACA_KERNELS_CPU_ISA");
  const bool forced_baseline = isa != nullptr && std::strcmp(isa, "baseline") == 0;
  const bool forced_avx2 = isa != nullptr && std::strcmp(isa, "avx2") == 0;
  const bool forced_avx512 = isa != nullptr && std::strcmp(isa, "avx512") == 0;
  const bool forced_avx512bf16 = isa != nullptr && std::strcmp(isa, "avx512bf16") == 0;
  __builtin_cpu_init();
  if (!forced_baseline && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      avx2::register_kernels(r)) {
    // The products, exp, row max, GELU and the convolution on 16 lanes; the transpose stays AVX2.
    if (!forced_avx2 && __builtin_cpu_supports("avx512f") && avx512::register_kernels(r) &&
        !forced_avx512 && __builtin_cpu_supports("avx512bf16") &&
        __builtin_cpu_supports("avx512bw")) {
      // The bf16 products (AMD Zen 4, Intel Cooper Lake and later), on AMX tiles where there are
      // some (Intel Sapphire Rapids and later: there vdpbf16ps is no faster than float32 FMAs).
      if (avx512bf16::register_kernels(r) && !forced_avx512bf16) amx::register_kernels(r);
    }
  }
#endif
  return r;
}

// The bf16 products' build where there is one ("amx", "avx512bf16": they come on top of the AVX-512
// build), else the float32 build.
const char* selected_isa() {
  const Float32Kernels& k = float32_kernels();
  return k.bf16_isa != nullptr ? k.bf16_isa : k.isa;
}

}  // namespace paca_kernels::cpu
