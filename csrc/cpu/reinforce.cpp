// C++ CPU kernel of REINFORCE++ and ReMax (docs/ops.md section 5):
//
//   reinforce_kernel(rewards, mask, baselines?, gamma, unbiased, eps) -> (advantages, returns):
//                  REINFORCE++ (no baselines: the returns whitened) or ReMax (returns - baseline)
#include "ppo_common.h"

namespace rmkernels {
namespace {

// ReMax, rows in parallel: the return written at every position (carried over masked ones, as
// verl's reverse cumulative sum of the masked rewards), the baseline subtracted where valid. (Four
// rows interleaved, as gae_group, measured no faster here: 60 vs 57-59 ms at [65536, 128], where
// the fresh output pages dominate.)
template <typename scalar_t>
void remax_rows(const scalar_t* rew, Strides2 sr, const uint8_t* mask, Strides2 sm, const acc_t<scalar_t>* base,
                int64_t B, int64_t T, acc_t<scalar_t> gamma, acc_t<scalar_t>* adv, acc_t<scalar_t>* ret) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, B, grain_of(T), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const scalar_t* rr = rew + b * sr.s0;
      const uint8_t* mr = mask + b * sm.s0;
      acc* o_ret = ret + b * T;
      acc* o_adv = adv + b * T;
      const acc bl = base[b];
      acc R = acc(0);
      for (int64_t t = T - 1; t >= 0; --t) {
        const bool valid = mr[t * sm.s1] != 0;
        if (valid) R = static_cast<acc>(rr[t * sr.s1]) + gamma * R;
        o_ret[t] = R;
        o_adv[t] = valid ? R - bl : R;
      }
    }
  });
}

// REINFORCE++: per group of kLanes rows the recurrence (gae_group, values a stride-0 zero), then
// each row's whitening partials while it is still in cache; the batch's totals and centred
// squares summed over rows in order, and the whitening apply (the loops of masked_whiten).
template <typename scalar_t>
void reinforce_pp_rows(const scalar_t* rew, Strides2 sr, const uint8_t* mask, Strides2 sm, int64_t B, int64_t T,
                       acc_t<scalar_t> gamma, bool unbiased, double eps, acc_t<scalar_t>* adv,
                       acc_t<scalar_t>* ret) {
  using acc = acc_t<scalar_t>;
  const scalar_t zero = scalar_t(0);
  std::vector<double> rows(static_cast<size_t>(2 * B)), sq_rows(static_cast<size_t>(B));
  at::parallel_for(0, (B + kLanes - 1) / kLanes, grain_of(kLanes * T), [&](int64_t g_lo, int64_t g_hi) {
    for (int64_t grp = g_lo; grp < g_hi; ++grp) {
      const int64_t b0 = grp * kLanes, nl = std::min(kLanes, B - b0);
      gae_group<false, scalar_t, scalar_t>(&zero, Strides2{0, 0}, mask, sm, rew, sr, b0, nl, T, gamma, gamma, ret,
                                           nullptr);
      for (int64_t b = b0; b < b0 + nl; ++b) {
        row_count_sum<acc>(ret + b * T, 1, mask + b * sm.s0, sm.s1, T, rows.data() + 2 * b);
      }
    }
  });
  double totals[2] = {0.0, 0.0};
  for (int64_t b = 0; b < B; ++b) {
    totals[0] += rows[2 * b];
    totals[1] += rows[2 * b + 1];
  }
  centered_sq_impl<acc>(ret, Strides2{T, 1}, mask, sm, B, T, mean_of(totals), sq_rows.data());
  double sq = 0.0;
  for (int64_t b = 0; b < B; ++b) sq += sq_rows[b];
  whiten_apply_impl<acc>(ret, Strides2{T, 1}, mask, sm, B, T, totals, &sq, true, unbiased, eps, adv);
}

std::tuple<at::Tensor, at::Tensor> reinforce_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                                                 const std::optional<at::Tensor>& baselines, double gamma,
                                                 bool unbiased, double eps) {
  check_reinforce_args(rewards, mask, baselines, gamma, eps);
  check_device(rewards, "token_rewards", at::Device(at::kCPU));
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto opts = rewards.options().dtype(acc_scalar_type(rewards.scalar_type()));
  auto adv = at::empty({B, T}, opts);
  auto ret = at::empty({B, T}, opts);
  if (B == 0 || T == 0) return {adv, ret};
  RMK_DISPATCH_FLOATS(rewards.scalar_type(), "reinforce_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const uint8_t* m = mask_bytes(mask);
    const Strides2 sr = strides_of(rewards), sm = strides_of(mask);
    if (baselines.has_value()) {
      remax_rows<scalar_t>(r, sr, m, sm, baselines->data_ptr<acc>(), B, T, static_cast<acc>(gamma),
                           adv.data_ptr<acc>(), ret.data_ptr<acc>());
    } else {
      reinforce_pp_rows<scalar_t>(r, sr, m, sm, B, T, static_cast<acc>(gamma), unbiased, eps, adv.data_ptr<acc>(),
                                  ret.data_ptr<acc>());
    }
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CPU, m) {
  m.impl("reinforce_kernel", &reinforce_cpu);
}

}  // namespace rmkernels
