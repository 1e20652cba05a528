// Shared helpers for the C++ CPU kernels (torch side).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>
#include <vector>

namespace rmkernels {

// Arithmetic is float32 for fp32/bf16/fp16 inputs and float64 for fp64 inputs (so that
// gradcheck in double precision is meaningful).
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

// Grain sizes for at::parallel_for: rows are cheap to split; these are large enough that
// the thread-pool overhead (~us) stays under the work of a chunk.
constexpr int64_t kRowGrain = 1;
constexpr int64_t kElemGrain = 4096;

}  // namespace rmkernels

// RMK_SIMD_CLONES on a function with `#pragma omp simd` loops compiles it three times, for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline, and picks the one the CPU
// runs at load time (GCC function multiversioning, an ifunc): the wheel stays portable and
// the loops get the machine's vector width. Every clone does the same operations in the
// same order (no FMA contraction under -std=c++17), so the results are bitwise identical on
// every CPU. Elsewhere (Clang, other architectures) it is a no-op.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define RMK_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RMK_SIMD_CLONES
#endif

// Every floating dtype the kernels take: fp32, fp64, bf16, fp16.
#define RMK_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
