// Loop kernels compiled once per x86-64 level, picked at run time.
//
// The C++ CPU kernels' inner loops (`#pragma omp simd`, branch-free, the exp / log1p of
// cpu_vec_math.h) live in csrc/cpu/*_loops.h. csrc/cpu/simd_variants.h compiles such a header
// three times, into namespaces simd_base (the baseline x86-64 the wheel targets), simd_v3
// (x86-64-v3: AVX2 + FMA) and simd_v4 (x86-64-v4: AVX-512), with `#pragma GCC target`, and
// RMK_SIMD(fn<...>) is the variant of fn for the CPU this process runs on (cpu_isa()). So one
// portable build uses the machine's vector width: 4 floats per instruction on the baseline, 8
// or 16 above it. The build has -ffp-contract=off: element-wise loops do the same operations
// in every variant, bitwise identical results on every CPU. A vectorised sum (`omp simd
// reduction`) splits over the vector's lanes, so its last bits can differ between variants
// (never between runs or thread counts with one variant).
//
// RMKERNELS_CPU_ISA=base|v3|v4 (read once, at the first kernel call or import) caps the
// variant, e.g. to compare them; `python -m rmkernels.info` prints the one in use. Other
// compilers and architectures get the baseline variant only.
#pragma once

namespace rmkernels {

enum class Isa : int { kBase = 0, kV3 = 3, kV4 = 4 };

// The variant used by this process: the best the CPU supports, capped by RMKERNELS_CPU_ISA.
Isa cpu_isa();
const char* cpu_isa_name();

}  // namespace rmkernels

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__)
#define RMK_SIMD_MULTIVERSION 1
#define RMK_SIMD(...)                                                                           \
  (::rmkernels::cpu_isa() == ::rmkernels::Isa::kV4   ? &simd_v4::__VA_ARGS__                   \
   : ::rmkernels::cpu_isa() == ::rmkernels::Isa::kV3 ? &simd_v3::__VA_ARGS__                   \
                                                     : &simd_base::__VA_ARGS__)
#else
#define RMK_SIMD_MULTIVERSION 0
#define RMK_SIMD(...) (&simd_base::__VA_ARGS__)
#endif
