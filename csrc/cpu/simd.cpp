// cpu_isa(): which compiled variant of the loop kernels this process uses (cpu_simd.h).
#include "rmkernels/cpu_simd.h"

#include <cstdlib>
#include <cstring>

namespace rmkernels {
namespace {

Isa detect() {
#if RMK_SIMD_MULTIVERSION
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") &&
                  __builtin_cpu_supports("movbe");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  Isa best = v4 ? Isa::kV4 : (v3 ? Isa::kV3 : Isa::kBase);
  if (const char* cap = std::getenv("RMKERNELS_CPU_ISA")) {
    Isa want = best;
    if (std::strcmp(cap, "base") == 0) want = Isa::kBase;
    if (std::strcmp(cap, "v3") == 0) want = Isa::kV3;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
#else
  return Isa::kBase;
#endif
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = detect();
  return isa;
}

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::kV4: return "x86-64-v4 (AVX-512)";
    case Isa::kV3: return "x86-64-v3 (AVX2)";
    default: return "baseline";
  }
}

}  // namespace rmkernels
