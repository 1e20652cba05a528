// The per-sequence formula of the critic-free group advantages (SPEC section 5), shared by the
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

// The advantage of a response with score r in its group. alpha = B / max(count_nonzero, 1)
// (gpg only). A group of one (n <= 1): mean 0 (kSingleZero) or r (kSingleSelf), std 1, zero
// baselines; NaN scores propagate to their group.
RMK_HD double value(double r, GroupStats g, int64_t estimator, double eps, bool unbiased, int64_t single,
                    double f_norm, double alpha) {
  using namespace codes;
  const bool one = !(g.n > 1);
  const double mu = one ? (single == kSingleSelf ? r : 0.0) : g.s / g.n;
  const double base = r - mu;
  switch (estimator) {
    case kGrpo: {
      const double sigma = one ? 1.0 : sqrt(g.sq / (unbiased ? g.n - 1 : g.n));
      return base / (sigma + eps);
    }
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
