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

// The formula in two stages: the coefficients of a group, once per group (coef_of), then the
// value of each response from its score (apply):
//     value = (k * base) / d,  base = r * a - c  (a == 0: base = r - r, the response is its own
//     baseline),  k = alpha for gpg, 1 otherwise.
// The float64 operations are those of the reference formulas (rmkernels/ops/group_adv.py): the
// extra ones are exact (r * 1 = r, 1 * x = x, x / 1 = x, NaN, inf and -0 included), so a kernel
// may evaluate coef_of once per group and apply once per response (the CPU kernel), or both per
// element (value, the CUDA kernel): the same bits.
struct GroupCoef {
  double a, c, d;
};

// sigma = sigma_of(g, unbiased) (grpo only). A group of one (n <= 1): mean 0 (kSingleZero) or
// r (kSingleSelf: a = 0), std 1, zero baselines.
RMK_HD GroupCoef coef_of(GroupStats g, double sigma, int64_t estimator, double eps, int64_t single, double f_norm) {
  using namespace codes;
  const bool one = !(g.n > 1);
  // the mean as the baseline: s / n, or a group of one's rule
  const GroupCoef mean = one ? GroupCoef{single == kSingleSelf ? 0.0 : 1.0, 0.0, 1.0} : GroupCoef{1.0, g.s / g.n, 1.0};
  switch (estimator) {
    case kGrpo:
      return GroupCoef{mean.a, mean.c, sigma + eps};
    case kRloo:  // leave-one-out: (n r - s) / (n - 1)
      return one ? mean : GroupCoef{g.n, g.s, g.n - 1};
    case kOpo:  // length-weighted mean: r - sum(len r) / sum(len)
      return one ? mean : GroupCoef{1.0, g.lrs / g.ls, 1.0};
    case kGpg:
      return GroupCoef{mean.a, mean.c, f_norm};
    default:  // kDrGrpo, kReinforcePPBaseline (whitened afterwards by the kernels: math::whiten_of)
      return mean;
  }
}

// The value of a response with score r; k = alpha = B / max(count_nonzero, 1) for gpg, else 1.
// NaN scores propagate to their group.
// (The coefficients come as scalars: a loop that gathers them stays vectorisable.)
RMK_HD double apply(double r, double a, double c, double d, double k) {
  const double base = a == 0 ? r - r : r * a - c;
  return (k * base) / d;
}

// The advantage of a response with score r in its group (sigma = sigma_of(g, unbiased), used
// by grpo only). alpha = B / max(count_nonzero, 1) (gpg only).
RMK_HD double value(double r, GroupStats g, double sigma, int64_t estimator, double eps, int64_t single,
                    double f_norm, double alpha) {
  const GroupCoef c = coef_of(g, sigma, estimator, eps, single, f_norm);
  return apply(r, c.a, c.c, c.d, estimator == codes::kGpg ? alpha : 1.0);
}

// A row's part in reinforce_pp_baseline's whitening over the valid tokens of the batch: row b
// holds len valid copies of its value x, so it adds len * x to the batch's sums (x: the value or
// its centred square). A row without a valid token (len = 0) adds exactly 0, whatever x is: a
// product would give 0 * NaN = NaN for a NaN or inf score there and spread it to every row of
// the batch (docs/ops.md section 5: a NaN score changes only its own group). The CPU kernel
// (whiten_seq) and the CUDA kernel sum through it; the Triton kernel writes the same select.
RMK_HD double row_copies(double len, double x) { return len > 0 ? len * x : 0.0; }

}  // namespace group_adv
}  // namespace rmkernels
