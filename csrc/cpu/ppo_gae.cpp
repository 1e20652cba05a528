// C++ CPU kernels of PPO's rewards and GAE (docs/ops.md sections 3 and 4):
//
//   ppo_gae_kernel(lp, ref, values, scores, mask, kl_coef, gamma, lam, estimator, x_clamp,
//                  kl_clamp, score_clip)  -> (advantages, returns, rewards, kl, row_stats)
//   gae_kernel(rewards, values, mask, gamma, lam, returns) -> (advantages, returns or [0])
//
// scores arrive as a contiguous [B] tensor in the arithmetic dtype. gae_kernel is the
// recurrence of ppo_gae_kernel over given token rewards. Layouts and dtypes: ppo_common.h.
#include "ppo_common.h"

namespace rmkernels {
namespace {

// Per group of kLanes rows: pass 1, per row, the KL and the rewards (vectorised), then the
// score at the row's last valid position; pass 2, the recurrence (gae_group); pass 3, per
// row, the whitening partials (count, sum of A) over the row just written (still in cache).
template <int64_t kEst, typename scalar_t>
void gae_rows(const scalar_t* lp, Strides2 slp, const scalar_t* rf, Strides2 srf, const scalar_t* val, Strides2 sv,
              const acc_t<scalar_t>* scores, const uint8_t* mask, Strides2 sm, int64_t B, int64_t T, const GaeParams& p,
              acc_t<scalar_t>* adv, acc_t<scalar_t>* ret, acc_t<scalar_t>* rew, acc_t<scalar_t>* kl, double* stats) {
  using acc = acc_t<scalar_t>;
  const acc kl_coef = static_cast<acc>(p.kl_coef), gamma = static_cast<acc>(p.gamma);
  const acc gl = static_cast<acc>(p.gamma * p.lam);
  const acc x_clamp = static_cast<acc>(p.x_clamp), kl_clamp = static_cast<acc>(p.kl_clamp);
  const acc score_clip = static_cast<acc>(p.score_clip);
  const int64_t n_groups = (B + kLanes - 1) / kLanes;
  at::parallel_for(0, n_groups, grain_of(kLanes * T), [&](int64_t g_lo, int64_t g_hi) {
    for (int64_t g = g_lo; g < g_hi; ++g) {
      const int64_t b0 = g * kLanes;
      const int64_t nl = std::min(kLanes, B - b0);
      for (int64_t b = b0; b < b0 + nl; ++b) {
        kl_of_row<kEst, true, true, scalar_t>(lp, slp, rf, srf, mask, sm, b, T, kl_coef, x_clamp, kl_clamp, kl, rew);
        const uint8_t* mr = mask + b * sm.s0;
        for (int64_t t = T - 1; t >= 0; --t) {
          if (mr[t * sm.s1]) {
            rew[b * T + t] = rew[b * T + t] + math::clamp_sym(scores[b], score_clip);
            break;
          }
        }
      }
      gae_group<true, scalar_t, acc>(val, sv, mask, sm, rew, Strides2{T, 1}, b0, nl, T, gamma, gl, adv, ret);
      for (int64_t b = b0; b < b0 + nl; ++b) {
        row_count_sum<acc>(adv + b * T, 1, mask + b * sm.s0, sm.s1, T, stats + 2 * b);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_gae_cpu(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& values, const at::Tensor& scores,
    const at::Tensor& mask, double kl_coef, double gamma, double lam, int64_t estimator, double x_clamp,
    double kl_clamp, double score_clip) {
  check_ppo_gae_args(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, estimator, x_clamp, kl_clamp,
                     score_clip, /*cuda=*/false);
  const int64_t B = values.size(0), T = values.size(1);
  const auto acc_type = acc_scalar_type(values.scalar_type());
  auto opts = values.options().dtype(acc_type);
  OutputPages pages;  // the [B, T] outputs in huge pages while they are written (cpu_common.h)
  auto adv = pages.empty({B, T}, opts), ret = pages.empty({B, T}, opts);
  auto rew = pages.empty({B, T}, opts), kl = pages.empty({B, T}, opts);
  auto stats = at::empty({B, 2}, values.options().dtype(at::kDouble));
  if (B == 0) return {adv, ret, rew, kl, stats};
  const GaeParams p{kl_coef, gamma, lam, estimator, x_clamp, kl_clamp, score_clip};
  RMK_DISPATCH_FLOATS(values.scalar_type(), "ppo_gae_cpu", [&] {
    using acc = acc_t<scalar_t>;
    with_estimator(estimator, [&](auto est) {
      gae_rows<decltype(est)::value, scalar_t>(
          logprobs.data_ptr<scalar_t>(), strides_of(logprobs), ref_logprobs.data_ptr<scalar_t>(),
          strides_of(ref_logprobs), values.data_ptr<scalar_t>(), strides_of(values), scores.data_ptr<acc>(),
          mask_bytes(mask), strides_of(mask), B, T, p, adv.data_ptr<acc>(), ret.data_ptr<acc>(),
          rew.data_ptr<acc>(), kl.data_ptr<acc>(), stats.data_ptr<double>());
    });
  });
  return {adv, ret, rew, kl, stats};
}

// GAE over given token rewards (docs/ops.md section 4): ppo_gae_kernel's recurrence, nothing else.
// Without `returns` the second output is an empty [0] tensor and only the advantages are
// written (REINFORCE++'s return: values 0, lam 1).
std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam, bool returns) {
  check_gae_args(rewards, values, mask, gamma, lam, /*cuda=*/false);
  const int64_t B = values.size(0), T = values.size(1);
  auto opts = values.options().dtype(acc_scalar_type(values.scalar_type()));
  OutputPages pages;  // the [B, T] outputs in huge pages while they are written (cpu_common.h)
  auto adv = pages.empty({B, T}, opts);
  auto ret = returns ? pages.empty({B, T}, opts) : at::empty({0}, opts);
  if (B == 0 || T == 0) return {adv, ret};
  RMK_DISPATCH_FLOATS(values.scalar_type(), "gae_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc g = static_cast<acc>(gamma), gl = static_cast<acc>(gamma * lam);
    const scalar_t* val = values.data_ptr<scalar_t>();
    const scalar_t* rew = rewards.data_ptr<scalar_t>();
    const uint8_t* m = mask_bytes(mask);
    const Strides2 sv = strides_of(values), sm = strides_of(mask), sr = strides_of(rewards);
    acc* a = adv.data_ptr<acc>();
    acc* r = returns ? ret.data_ptr<acc>() : nullptr;
    at::parallel_for(0, (B + kLanes - 1) / kLanes, grain_of(kLanes * T), [&](int64_t g_lo, int64_t g_hi) {
      for (int64_t grp = g_lo; grp < g_hi; ++grp) {
        const int64_t b0 = grp * kLanes, nl = std::min(kLanes, B - b0);
        if (returns) {
          gae_group<true, scalar_t, scalar_t>(val, sv, m, sm, rew, sr, b0, nl, T, g, gl, a, r);
        } else {
          gae_group<false, scalar_t, scalar_t>(val, sv, m, sm, rew, sr, b0, nl, T, g, gl, a, r);
        }
      }
    });
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CPU, m) {
  m.impl("ppo_gae_kernel", &ppo_gae_cpu);
  m.impl("gae_kernel", &gae_cpu);
}

}  // namespace rmkernels
