// Shared helpers for the C++ CPU kernels (torch side).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>
#include <vector>

#include "rmkernels/scalar_math.h"

namespace rmkernels {

// Arithmetic is float32 for fp32/bf16/fp16 inputs and float64 for fp64 inputs (so that
// gradcheck in double precision is meaningful): acc_t<T>, defined in scalar_math.h.

// Grain sizes for at::parallel_for: rows are cheap to split; these are large enough that
// the thread-pool overhead (~us) stays under the work of a chunk.
constexpr int64_t kRowGrain = 1;
constexpr int64_t kElemGrain = 4096;

}  // namespace rmkernels

// Every floating dtype the kernels take: fp32, fp64, bf16, fp16.
#define RMK_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
