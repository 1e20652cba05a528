// C++ CPU kernels of the PPO rewards / GAE / whitening (SPEC section 3).
//
//   ppo_gae_kernel(lp, ref, values, scores, mask, kl_coef, gamma, lam, estimator, x_clamp,
//                  kl_clamp, score_clip)  -> (advantages, returns, rewards, kl, row_stats)
//   masked_row_stats_kernel(x, mask)                   -> [B, 2] float64 (count, sum)
//   masked_centered_sq_kernel(x, mask, totals)         -> [B] float64 sum (x - mean)^2
//   masked_whiten_apply_kernel(x, mask, totals, sq, shift_mean, unbiased, eps) -> whitened x
//
// lp / ref / values share one floating dtype (the Python layer converts mixed inputs) and
// may have any strides; mask is bool [B, T] (any strides); scores arrive as a contiguous
// [B] tensor in the arithmetic dtype. Outputs are contiguous [B, T] in the arithmetic dtype
// (float32, float64 for double input). A clamp of 0 means no clamp. The recurrence over T is
// one sequential pass per row from the right (rows in parallel); the element-wise parts are
// vectorised loops (ppo_loops.h, in the CPU's variant: RMK_SIMD).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "rmkernels/cpu_common.h"
#include "rmkernels/cpu_simd.h"
#include "rmkernels/cpu_vec_math.h"

namespace rmkernels {
namespace {

enum Estimator : int64_t { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };

struct GaeParams {
  double kl_coef, gamma, lam;
  int64_t estimator;
  double x_clamp, kl_clamp, score_clip;
};

template <typename acc>
inline acc clamp_sym(acc v, acc c) {
  return c > 0 ? std::min(std::max(v, -c), c) : v;  // NaN stays NaN (min/max keep the first)
}

template <int64_t kEst, typename acc>
inline acc kl_of(acc x, acc x_clamp, acc kl_clamp) {
  x = clamp_sym(x, x_clamp);
  acc k;
  if constexpr (kEst == kK1) {
    k = x;
  } else if constexpr (kEst == kAbs) {
    k = std::abs(x);
  } else if constexpr (kEst == kK2) {
    k = acc(0.5) * x * x;
  } else {
    k = vecmath::exp_any(-x) - acc(1) + x;
  }
  return clamp_sym(k, kl_clamp);
}

struct Strides2 {
  int64_t s0, s1;
};

// Per group of kLanes rows: pass 1, per row, the element-wise part (KL and rewards; no
// dependence between positions: vectorised), then the score at the last valid position;
// pass 2, the recurrence over T from the right, the kLanes rows interleaved position by
// position: A_t = delta_t + gamma * lam * A_next is a chain of dependent multiply-adds
// within a row, so one row at a time is bound by their latency, while independent rows
// overlap; pass 3, per row, the whitening partials (count, sum of A) over the row just
// written (still in cache; vectorised). Each row gets exactly the sequential arithmetic
// (masked positions compute a value that is selected away), so results do not depend on
// grouping.
constexpr int64_t kLanes = 4;

#define RMK_LOOPS_HEADER "ppo_loops.h"
#include "simd_variants.h"  // kl_rewards_row, gae_recurrence, masked_count_sum, centered_sq_row, whiten_row

template <typename scalar_t>
void row_count_sum(const scalar_t* x, int64_t sx, const uint8_t* m, int64_t sm, int64_t T, double* out) {
  if (sx == 1 && sm == 1) {
    RMK_SIMD(masked_count_sum<true, scalar_t>)(x, 1, m, 1, T, out);
  } else {
    RMK_SIMD(masked_count_sum<false, scalar_t>)(x, sx, m, sm, T, out);
  }
}

template <int64_t kEst, typename scalar_t>
void gae_rows(const scalar_t* lp, Strides2 slp, const scalar_t* rf, Strides2 srf, const scalar_t* val, Strides2 sv,
              const acc_t<scalar_t>* scores, const uint8_t* mask, Strides2 sm, int64_t B, int64_t T, const GaeParams& p,
              acc_t<scalar_t>* adv, acc_t<scalar_t>* ret, acc_t<scalar_t>* rew, acc_t<scalar_t>* kl, double* stats) {
  using acc = acc_t<scalar_t>;
  const acc kl_coef = static_cast<acc>(p.kl_coef), gamma = static_cast<acc>(p.gamma);
  const acc gl = static_cast<acc>(p.gamma * p.lam);
  const acc x_clamp = static_cast<acc>(p.x_clamp), kl_clamp = static_cast<acc>(p.kl_clamp);
  const acc score_clip = static_cast<acc>(p.score_clip);
  const bool unit = slp.s1 == 1 && srf.s1 == 1 && sm.s1 == 1;
  const bool unit2 = sv.s1 == 1 && sm.s1 == 1;
  const int64_t n_groups = (B + kLanes - 1) / kLanes;
  at::parallel_for(0, n_groups, 1, [&](int64_t g_lo, int64_t g_hi) {
    for (int64_t g = g_lo; g < g_hi; ++g) {
      const int64_t b0 = g * kLanes;
      const int64_t nl = std::min(kLanes, B - b0);
      // Pass 1: kl and rewards of each row, then the score at its last valid position.
      for (int64_t b = b0; b < b0 + nl; ++b) {
        const scalar_t* lpr = lp + b * slp.s0;
        const scalar_t* rfr = rf + b * srf.s0;
        const uint8_t* mr = mask + b * sm.s0;
        if (unit) {
          RMK_SIMD(kl_rewards_row<kEst, true, scalar_t>)(lpr, 1, rfr, 1, mr, 1, T, kl_coef, x_clamp, kl_clamp,
                                                         kl + b * T, rew + b * T);
        } else {
          RMK_SIMD(kl_rewards_row<kEst, false, scalar_t>)(lpr, slp.s1, rfr, srf.s1, mr, sm.s1, T, kl_coef,
                                                          x_clamp, kl_clamp, kl + b * T, rew + b * T);
        }
        for (int64_t t = T - 1; t >= 0; --t) {
          if (mr[t * sm.s1]) {
            rew[b * T + t] = rew[b * T + t] + clamp_sym(scores[b], score_clip);
            break;
          }
        }
      }
      // Pass 2: the recurrence, rows interleaved.
      if (nl == kLanes) {
        if (unit2) {
          RMK_SIMD(gae_recurrence<kLanes, true, scalar_t>)(val, sv, mask, sm, b0, T, gamma, gl, rew, adv, ret);
        } else {
          RMK_SIMD(gae_recurrence<kLanes, false, scalar_t>)(val, sv, mask, sm, b0, T, gamma, gl, rew, adv, ret);
        }
      } else {
        for (int64_t b = b0; b < b0 + nl; ++b) {
          RMK_SIMD(gae_recurrence<1, false, scalar_t>)(val, sv, mask, sm, b, T, gamma, gl, rew, adv, ret);
        }
      }
      // Pass 3: the whitening partials of each row.
      for (int64_t b = b0; b < b0 + nl; ++b) {
        row_count_sum<acc>(adv + b * T, 1, mask + b * sm.s0, sm.s1, T, stats + 2 * b);
      }
    }
  });
}

Strides2 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

// A bool mask as bytes (0 / 1): the loops test `!= 0` on uint8_t, which GCC vectorises
// (a select on a loaded `bool` it does not).
const uint8_t* mask_bytes(const at::Tensor& mask) { return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()); }

void check_bt(const at::Tensor& t, const char* name, int64_t B, int64_t T) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T, name, " must be [B, T] = [", B, ", ", T, "], got ",
              t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_gae_cpu(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& values, const at::Tensor& scores,
    const at::Tensor& mask, double kl_coef, double gamma, double lam, int64_t estimator, double x_clamp,
    double kl_clamp, double score_clip) {
  TORCH_CHECK(values.dim() == 2, "values must be [B, T]");
  const int64_t B = values.size(0), T = values.size(1);
  check_bt(logprobs, "logprobs", B, T);
  check_bt(ref_logprobs, "ref_logprobs", B, T);
  check_bt(mask, "mask", B, T);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool (the Python layer converts it)");
  TORCH_CHECK(logprobs.scalar_type() == values.scalar_type() && ref_logprobs.scalar_type() == values.scalar_type(),
              "logprobs, ref_logprobs and values must share one dtype");
  TORCH_CHECK(estimator >= 0 && estimator <= 3, "unknown KL estimator code ", estimator);
  const auto acc_type = values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == B && scores.scalar_type() == acc_type && scores.is_contiguous(),
              "scores must be a contiguous [B] tensor in the arithmetic dtype");
  auto opts = values.options().dtype(acc_type);
  auto adv = at::empty({B, T}, opts), ret = at::empty({B, T}, opts);
  auto rew = at::empty({B, T}, opts), kl = at::empty({B, T}, opts);
  auto stats = at::empty({B, 2}, values.options().dtype(at::kDouble));
  if (B == 0) return {adv, ret, rew, kl, stats};
  const GaeParams p{kl_coef, gamma, lam, estimator, x_clamp, kl_clamp, score_clip};
  RMK_DISPATCH_FLOATS(values.scalar_type(), "ppo_gae_cpu", [&] {
    using acc = acc_t<scalar_t>;
    auto run = [&](auto est) {
      gae_rows<decltype(est)::value, scalar_t>(
          logprobs.data_ptr<scalar_t>(), strides_of(logprobs), ref_logprobs.data_ptr<scalar_t>(),
          strides_of(ref_logprobs), values.data_ptr<scalar_t>(), strides_of(values), scores.data_ptr<acc>(),
          mask_bytes(mask), strides_of(mask), B, T, p, adv.data_ptr<acc>(), ret.data_ptr<acc>(),
          rew.data_ptr<acc>(), kl.data_ptr<acc>(), stats.data_ptr<double>());
    };
    switch (estimator) {
      case kK1: run(std::integral_constant<int64_t, kK1>{}); break;
      case kAbs: run(std::integral_constant<int64_t, kAbs>{}); break;
      case kK2: run(std::integral_constant<int64_t, kK2>{}); break;
      default: run(std::integral_constant<int64_t, kK3>{}); break;
    }
  });
  return {adv, ret, rew, kl, stats};
}

// ---------------------------------------------------------------------------------------
// Whitening: per-row partials, then the element-wise apply.
// ---------------------------------------------------------------------------------------
// The row loops are branch-free selects, vectorised (RMK_SIMD, ppo_loops.h); each row's sums are
// taken by one thread and summed over rows in order by the caller: results do not depend on
// the number of threads. (The float64 lane split of a row's sum follows the vector width of
// the CPU: across CPUs the statistics may differ in their last float64 bits.)
template <typename scalar_t>
void row_stats_impl(const scalar_t* x, Strides2 sx, const uint8_t* mask, Strides2 sm, int64_t B, int64_t T,
                    double* stats) {
  at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      row_count_sum<scalar_t>(x + b * sx.s0, sx.s1, mask + b * sm.s0, sm.s1, T, stats + 2 * b);
    }
  });
}

// mean of totals = (n, sum): 0 when n is 0.
inline double mean_of(const double* totals) { return totals[0] > 0 ? totals[1] / totals[0] : 0.0; }

template <typename scalar_t>
void centered_sq_impl(const scalar_t* x, Strides2 sx, const uint8_t* mask, Strides2 sm, int64_t B, int64_t T,
                      double mean, double* out) {
  at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const scalar_t* xr = x + b * sx.s0;
      const uint8_t* mr = mask + b * sm.s0;
      out[b] = sx.s1 == 1 && sm.s1 == 1 ? RMK_SIMD(centered_sq_row<true, scalar_t>)(xr, 1, mr, 1, T, mean)
                                        : RMK_SIMD(centered_sq_row<false, scalar_t>)(xr, sx.s1, mr, sm.s1, T, mean);
    }
  });
}

template <typename scalar_t>
void whiten_apply_impl(const scalar_t* x, Strides2 sx, const uint8_t* mask, Strides2 sm, int64_t B, int64_t T,
                       const double* totals, const double* sq, bool shift_mean, bool unbiased, double eps,
                       acc_t<scalar_t>* out) {
  using acc = acc_t<scalar_t>;
  const double n = totals[0];
  if (!(n > 1)) {  // n <= 1: all zeros, never NaN
    std::fill(out, out + B * T, acc(0));
    return;
  }
  const double var = sq[0] / (unbiased ? n - 1 : n);
  const acc rstd = static_cast<acc>(1.0 / std::sqrt(var + eps));
  const acc mean_a = static_cast<acc>(mean_of(totals));
  const acc add_back = shift_mean ? acc(0) : mean_a;
  const bool unit = sx.s1 == 1 && sm.s1 == 1;
  at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const scalar_t* xr = x + b * sx.s0;
      const uint8_t* mr = mask + b * sm.s0;
      if (unit) {
        RMK_SIMD(whiten_row<true, scalar_t>)(xr, 1, mr, 1, T, mean_a, rstd, add_back, out + b * T);
      } else {
        RMK_SIMD(whiten_row<false, scalar_t>)(xr, sx.s1, mr, sm.s1, T, mean_a, rstd, add_back, out + b * T);
      }
    }
  });
}

void check_x_mask(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2, "x must be [B, T], got ", x.sizes());
  TORCH_CHECK(mask.sizes() == x.sizes(), "mask must have x's shape ", x.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool (the Python layer converts it)");
}

void check_totals(const at::Tensor& totals, const char* name, int64_t n) {
  TORCH_CHECK(totals.dim() == 1 && totals.size(0) == n && totals.scalar_type() == at::kDouble,
              name, " must be a float64 tensor of shape [", n, "], got ", totals.sizes(), " ", totals.scalar_type());
}

at::Tensor masked_row_stats_cpu(const at::Tensor& x, const at::Tensor& mask) {
  check_x_mask(x, mask);
  const int64_t B = x.size(0), T = x.size(1);
  auto stats = at::empty({B, 2}, x.options().dtype(at::kDouble));
  if (B == 0) return stats;
  RMK_DISPATCH_FLOATS(x.scalar_type(), "masked_row_stats_cpu", [&] {
    row_stats_impl<scalar_t>(x.data_ptr<scalar_t>(), strides_of(x), mask_bytes(mask), strides_of(mask), B, T,
                             stats.data_ptr<double>());
  });
  return stats;
}

at::Tensor masked_centered_sq_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& totals) {
  check_x_mask(x, mask);
  check_totals(totals, "totals", 2);
  const int64_t B = x.size(0), T = x.size(1);
  auto out = at::empty({B}, x.options().dtype(at::kDouble));
  if (B == 0) return out;
  const auto tot = totals.contiguous();
  const double mean = mean_of(tot.data_ptr<double>());
  RMK_DISPATCH_FLOATS(x.scalar_type(), "masked_centered_sq_cpu", [&] {
    centered_sq_impl<scalar_t>(x.data_ptr<scalar_t>(), strides_of(x), mask_bytes(mask), strides_of(mask), B, T,
                               mean, out.data_ptr<double>());
  });
  return out;
}

at::Tensor masked_whiten_apply_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& totals,
                                   const at::Tensor& sq, bool shift_mean, bool unbiased, double eps) {
  check_x_mask(x, mask);
  check_totals(totals, "totals", 2);
  check_totals(sq, "sq", 1);
  const int64_t B = x.size(0), T = x.size(1);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({B, T}, x.options().dtype(acc_type));
  if (B == 0 || T == 0) return out;
  const auto tot = totals.contiguous();
  const auto sqc = sq.contiguous();
  RMK_DISPATCH_FLOATS(x.scalar_type(), "masked_whiten_apply_cpu", [&] {
    whiten_apply_impl<scalar_t>(x.data_ptr<scalar_t>(), strides_of(x), mask_bytes(mask), strides_of(mask), B, T,
                                tot.data_ptr<double>(), sqc.data_ptr<double>(), shift_mean, unbiased, eps,
                                out.data_ptr<acc_t<scalar_t>>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CPU, m) {
  m.impl("ppo_gae_kernel", &ppo_gae_cpu);
  m.impl("masked_row_stats_kernel", &masked_row_stats_cpu);
  m.impl("masked_centered_sq_kernel", &masked_centered_sq_cpu);
  m.impl("masked_whiten_apply_kernel", &masked_whiten_apply_cpu);
}

}  // namespace rmkernels
