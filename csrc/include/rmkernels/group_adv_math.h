// The per-sequence formula of the critic-free group advantages (docs/ops.md section 5), shared by the
// C++ CPU kernel (csrc/cpu/group_adv.cpp) and the CUDA kernel (csrc/cuda/group_adv.cu): one
// definition of the rule for both. The Python reference (rmkernels/ops/group_adv.py) and the
// Triton kernel (rmkernels/triton/group_adv.py) write the same arithmetic. Plain C++ (no torch,
// no CUDA headers): RMK_HD marks it __host__ __device__ under nvcc.
#pragma once
#include <cmath>
#include <cstdint>

#include "rmkernels/codes.h"

#if defined(__CUDACC__)
#define RMK_HD __host__ __device__ __forceinline__
#else
#define RMK_HD inline
#endif

namespace rmkernels {
namespace group_adv {

// Statistics of one group, all float64: n members, sum s of their scores, centred sum of
// squares sq (grpo only), sum of lengths ls and of length * score lrs (opo only).
struct GroupStats {
  double n, s, sq, ls, lrs;
};

// The std of a group of n >= 2 members from its centred sum of squares (grpo); 1 for a group
// of one. A kernel may evaluate it once per group or once per response: the same bits.
RMK_HD double sigma_of(GroupStats g, bool unbiased) {
  return g.n > 1 ? sqrt(g.sq / (unbiased ? g.n - 1 : g.n)) : 1.0;
}

// The advantage of a response with score r in its group (sigma = sigma_of(g, unbiased), used
// by grpo only). alpha = B / max(count_nonzero, 1) (gpg only). A group of one (n <= 1): mean 0
// (kSingleZero) or r (kSingleSelf), std 1, zero baselines; NaN scores propagate to their group.
RMK_HD double value(double r, GroupStats g, double sigma, int64_t estimator, double eps, int64_t single,
                    double f_norm, double alpha) {
  using namespace codes;
  const bool one = !(g.n > 1);
  const double mu = one ? (single == kSingleSelf ? r : 0.0) : g.s / g.n;
  const double base = r - mu;
  switch (estimator) {
    case kGrpo:
      return base / (sigma + eps);
    case kRloo:
      return one ? base : (g.n * r - g.s) / (g.n - 1);
    case kOpo:
      return one ? base : r - g.lrs / g.ls;
    case kGpg:
      return alpha * base / f_norm;
    default:  // kDrGrpo, kReinforcePPBaseline (whitened afterwards by the Python layer)
      return base;
  }
}

}  // namespace group_adv
}  // namespace rmkernels
