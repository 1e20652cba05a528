// Shared helpers for the C++ CPU kernels (torch side).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "rmkernels/scalar_math.h"

namespace rmkernels {

// Arithmetic is float32 for fp32/bf16/fp16 inputs and float64 for fp64 inputs (so that
// gradcheck in double precision is meaningful): acc_t<T>, defined in scalar_math.h.

// Grain sizes for at::parallel_for, one policy for every loop: a chunk holds at least
// kElemGrain elements of work, so that a small batch runs on the calling thread. Waking the
// pool costs microseconds, and while another process holds the other cores a parallel region
// can wait a scheduler slice for its workers: rmk.masked_whiten of a [37, 9] batch on 2
// threads, one core busy, took 0.027 ms at the median and 15.6 ms on average with rows split
// one by one (scratch measurement, 2026-12-01).
constexpr int64_t kElemGrain = 4096;

// The grain, in items (rows, groups of rows, blocks), of a loop whose items hold `work`
// elements each.
inline int64_t grain_of(int64_t work) { return std::max<int64_t>(1, kElemGrain / std::max<int64_t>(work, 1)); }

// The outputs of one kernel call that writes each of them whole (csrc/cpu/memory.cpp): empty()
// is at::empty, and an output of at least a transparent huge page that is not resident yet (a
// fresh block) is advised for huge pages while the call writes it, so that its first stores
// fault in 2 MiB pages, not 4 KiB ones; the advice is withdrawn when this goes out of scope,
// after the writes. Every [B, T] output of the CPU kernels is made here, and pooling's [B, T, H]
// gradient of the hidden states:
//   OutputPages pages;
//   auto adv = pages.empty({B, T}, opts);
class OutputPages {
 public:
  OutputPages() = default;
  OutputPages(const OutputPages&) = delete;
  OutputPages& operator=(const OutputPages&) = delete;
  ~OutputPages();
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);
  // The same, in the given strides (the gradient of pooling's hidden states: grad_buffer's
  // layout, op_checks.h, zero-filled and then written at one row per sequence).
  at::Tensor empty_strided(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options);

 private:
  at::Tensor advised(at::Tensor out);
  std::vector<std::pair<void*, int64_t>> advised_;
};

// OutputPages' advice for the n bytes at p (advise), or its withdrawal (!advise): true when
// given (at least one huge page inside, not resident, Linux in THP mode madvise, torch's
// THP_MEM_ALLOC_ENABLE unset).
bool advise_huge_pages(void* p, int64_t n, bool advise);

// Whether [p, p + n) is resident: the pages at a quarter, half and three quarters of it are
// (mincore; true off Linux).
bool resident(const void* p, int64_t n);

}  // namespace rmkernels

// Every floating dtype the kernels take: fp32, fp64, bf16, fp16.
#define RMK_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
