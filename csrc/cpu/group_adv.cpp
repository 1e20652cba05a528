// C++ CPU kernels of the critic-free group advantages (docs/ops.md section 5).
//
//   group_advantages_kernel(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm)
//       -> (seq_advantages [B], advantages [B, T])
//   reinforce_pp_returns_kernel(rewards, mask, gamma) -> returns [B, T]
//
// group_advantages: scores arrive as a contiguous [B] tensor in the arithmetic dtype (float32,
// float64 for double input: the Python layer sums token rewards), group_ids as contiguous int64
// [B] with ids in [0, B) (checked here), mask as bool [B, T] with any strides. Sequential passes
// over the B scores gather the float64 group statistics into buffers indexed by group id (count
// and sum; opo's lengths; grpo's centred squares from the mean, turned into the std once per
// group; gpg's nonzero count), a pass writes the per-sequence values (the formula of
// rmkernels/group_adv_math.h, shared with CUDA), and the [B, T] broadcast runs over rows in
// parallel, vectorised (group_adv_loops.h).
// The passes over B touch 8-40 bytes per response; the [B, T] write is the cost.
//
// reinforce_pp_returns: R_t = r_t + gamma R_next over the valid positions of a row from the
// right, R_next carried unchanged over masked positions, 0 written there; rows in parallel.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "rmkernels/codes.h"
#include "rmkernels/cpu_common.h"
#include "rmkernels/cpu_simd.h"
#include "rmkernels/group_adv_math.h"

namespace rmkernels {
namespace {

#define RMK_LOOPS_HEADER "group_adv_loops.h"
#include "simd_variants.h"  // broadcast_row, count_row

const uint8_t* mask_bytes(const at::Tensor& mask) { return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()); }

template <typename acc>
void group_impl(const acc* r, const int64_t* ids, const uint8_t* mask, int64_t sm0, int64_t sm1, int64_t B,
                int64_t T, int64_t est, double eps, bool unbiased, int64_t single, double f_norm, acc* seq, acc* adv) {
  using group_adv::GroupStats;
  const bool unit = sm1 == 1;
  const bool grpo = est == codes::kGrpo, opo = est == codes::kOpo;
  // Per group slot: count, sum; grpo: the centred squares, then the std; opo: sums of len, len r.
  std::vector<double> n(static_cast<size_t>(B), 0.0), s(static_cast<size_t>(B), 0.0);
  std::vector<double> sq(grpo ? static_cast<size_t>(B) : 0, 0.0);
  std::vector<double> ls(opo ? static_cast<size_t>(B) : 0, 0.0), lrs(opo ? static_cast<size_t>(B) : 0, 0.0);
  std::vector<double> len(opo ? static_cast<size_t>(B) : 0);
  if (opo) {
    at::parallel_for(0, B, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const uint8_t* mr = mask + b * sm0;
        len[b] = static_cast<double>(unit ? RMK_SIMD(count_row<true>)(mr, 1, T) : RMK_SIMD(count_row<false>)(mr, sm1, T));
      }
    });
  }
  int64_t nonzero = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t g = ids[b];
    TORCH_CHECK(g >= 0 && g < B, "group_ids must lie in [0, B) = [0, ", B, "), got ", g, " at row ", b);
    const double x = static_cast<double>(r[b]);
    n[g] += 1;
    s[g] += x;
    if (opo) {
      ls[g] += len[b];
      lrs[g] += len[b] * x;
    }
    nonzero += x != 0;  // NaN counts, as torch.count_nonzero
  }
  if (grpo) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t g = ids[b];
      const double d = static_cast<double>(r[b]) - s[g] / n[g];
      sq[g] += d * d;
    }
    for (int64_t g = 0; g < B; ++g) {  // once per group: sq becomes the std
      if (n[g] > 0) sq[g] = group_adv::sigma_of(GroupStats{n[g], s[g], sq[g], 0, 0}, unbiased);
    }
  }
  const double alpha = static_cast<double>(B) / static_cast<double>(std::max<int64_t>(nonzero, 1));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t g = ids[b];
    const GroupStats gs{n[g], s[g], 0, opo ? ls[g] : 0, opo ? lrs[g] : 0};
    seq[b] = static_cast<acc>(group_adv::value(static_cast<double>(r[b]), gs, grpo ? sq[g] : 1.0, est, eps, single,
                                               f_norm, alpha));
  }
  if (T == 0) return;
  at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const uint8_t* mr = mask + b * sm0;
      if (unit) {
        RMK_SIMD(broadcast_row<true, acc>)(mr, 1, T, seq[b], adv + b * T);
      } else {
        RMK_SIMD(broadcast_row<false, acc>)(mr, sm1, T, seq[b], adv + b * T);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> group_advantages_cpu(const at::Tensor& scores, const at::Tensor& group_ids,
                                                        const at::Tensor& mask, int64_t estimator, double eps,
                                                        bool unbiased, int64_t single, double f_norm) {
  TORCH_CHECK(scores.dim() == 1 && (scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble),
              "scores must be a float32/float64 [B] tensor (the Python layer sums and converts), got ",
              scores.scalar_type(), " ", scores.sizes());
  const int64_t B = scores.size(0);
  TORCH_CHECK(group_ids.dim() == 1 && group_ids.size(0) == B && group_ids.scalar_type() == at::kLong,
              "group_ids must be int64 [B] = [", B, "], got ", group_ids.scalar_type(), " ", group_ids.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.scalar_type() == at::kBool,
              "mask must be bool [B, T] with B = ", B, ", got ", mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(estimator >= codes::kGrpo && estimator <= codes::kReinforcePPBaseline, "unknown estimator code ",
              estimator);
  TORCH_CHECK(single == codes::kSingleZero || single == codes::kSingleSelf, "unknown single code ", single);
  const int64_t T = mask.size(1);
  const auto s = scores.contiguous();
  const auto ids = group_ids.contiguous();
  auto seq = at::empty({B}, s.options());
  auto adv = at::empty({B, T}, s.options());
  if (B == 0) return {seq, adv};
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "group_advantages_cpu", [&] {
    group_impl<scalar_t>(s.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), mask_bytes(mask), mask.stride(0),
                         mask.stride(1), B, T, estimator, eps, unbiased, single, f_norm, seq.data_ptr<scalar_t>(),
                         adv.data_ptr<scalar_t>());
  });
  return {seq, adv};
}

template <typename scalar_t>
void returns_impl(const scalar_t* r, int64_t sr0, int64_t sr1, const uint8_t* mask, int64_t sm0, int64_t sm1,
                  int64_t B, int64_t T, double gamma, acc_t<scalar_t>* out) {
  using acc = acc_t<scalar_t>;
  const acc g = static_cast<acc>(gamma);
  at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const scalar_t* rr = r + b * sr0;
      const uint8_t* mr = mask + b * sm0;
      acc* o = out + b * T;
      acc run = 0;
      for (int64_t t = T - 1; t >= 0; --t) {
        const acc next = static_cast<acc>(rr[t * sr1]) + g * run;
        const bool valid = mr[t * sm1] != 0;
        o[t] = valid ? next : acc(0);
        run = valid ? next : run;
      }
    }
  });
}

at::Tensor reinforce_pp_returns_cpu(const at::Tensor& rewards, const at::Tensor& mask, double gamma) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, T], got ", rewards.sizes());
  TORCH_CHECK(mask.sizes() == rewards.sizes() && mask.scalar_type() == at::kBool,
              "mask must be bool with rewards' shape ", rewards.sizes(), ", got ", mask.scalar_type(), " ",
              mask.sizes());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto acc_type = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({B, T}, rewards.options().dtype(acc_type));
  if (B == 0 || T == 0) return out;
  RMK_DISPATCH_FLOATS(rewards.scalar_type(), "reinforce_pp_returns_cpu", [&] {
    returns_impl<scalar_t>(rewards.data_ptr<scalar_t>(), rewards.stride(0), rewards.stride(1), mask_bytes(mask),
                           mask.stride(0), mask.stride(1), B, T, gamma, out.data_ptr<acc_t<scalar_t>>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CPU, m) {
  m.impl("group_advantages_kernel", &group_advantages_cpu);
  m.impl("reinforce_pp_returns_kernel", &reinforce_pp_returns_cpu);
}

}  // namespace rmkernels
