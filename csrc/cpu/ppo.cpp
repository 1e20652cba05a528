// C++ CPU kernels of the PPO rewards / GAE / KL / whitening (docs/ops.md sections 3 and 4).
//
//   ppo_gae_kernel(lp, ref, values, scores, mask, kl_coef, gamma, lam, estimator, x_clamp,
//                  kl_clamp, score_clip)  -> (advantages, returns, rewards, kl, row_stats)
//   gae_kernel(rewards, values, mask, gamma, lam, returns) -> (advantages, returns or [0])
//   kl_estimate_kernel(lp, ref, mask?, estimator, x_clamp, kl_clamp) -> kl
//   masked_row_stats_kernel(x, mask)                   -> [B, 2] float64 (count, sum)
//   masked_centered_sq_kernel(x, mask, totals)         -> [B] float64 sum (x - mean)^2
//   masked_whiten_apply_kernel(x, mask, totals, sq, shift_mean, unbiased, eps) -> whitened x
//   reinforce_kernel(rewards, mask, baselines?, gamma, unbiased, eps) -> (advantages, returns):
//                  REINFORCE++ (no baselines: the returns whitened) or ReMax (returns - baseline)
//
// The [B, T] float inputs of one op share one floating dtype (the Python layer converts mixed
// inputs) and may have any strides; mask is bool [B, T] (any strides); scores arrive as a
// contiguous [B] tensor in the arithmetic dtype. Outputs are contiguous [B, T] in the
// arithmetic dtype (float32, float64 for double input). A clamp of 0 means no clamp. The
// recurrence over T is one sequential pass per row from the right (rows in parallel); the
// element-wise parts are vectorised loops (ppo_loops.h, in the CPU's variant: RMK_SIMD).
// gae_kernel is the recurrence of ppo_gae_kernel over given token rewards, kl_estimate_kernel
// its KL pass: the same loops.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "rmkernels/codes.h"
#include "rmkernels/cpu_common.h"
#include "rmkernels/cpu_simd.h"
#include "rmkernels/cpu_vec_math.h"
#include "rmkernels/op_checks.h"
#include "rmkernels/scalar_math.h"

namespace rmkernels {
namespace {

struct GaeParams {
  double kl_coef, gamma, lam;
  int64_t estimator;
  double x_clamp, kl_clamp, score_clip;
};

struct Strides2 {
  int64_t s0, s1;
};

// Rows are processed in groups of kLanes: the recurrence over T from the right is a chain of
// dependent multiply-adds within a row (A_t = delta_t + gamma * lam * A_next), so one row at a
// time is bound by their latency, while kLanes independent rows interleaved position by
// position overlap. Each row gets exactly the sequential arithmetic (masked positions compute
// a value that is selected away), so results do not depend on grouping.
constexpr int64_t kLanes = 4;

#define RMK_LOOPS_HEADER "ppo_loops.h"
#include "simd_variants.h"  // kl_row, gae_recurrence, masked_count_sum, centered_sq_row, whiten_row

template <typename scalar_t>
void row_count_sum(const scalar_t* x, int64_t sx, const uint8_t* m, int64_t sm, int64_t T, double* out) {
  if (sx == 1 && sm == 1) {
    RMK_SIMD(masked_count_sum<true, scalar_t>)(x, 1, m, 1, T, out);
  } else {
    RMK_SIMD(masked_count_sum<false, scalar_t>)(x, sx, m, sm, T, out);
  }
}

// Rows are interleaved only while they lie less than kInterleaveRowBytes apart in every array.
// Further apart, the kLanes lines an array reads or writes at one position fall into the same
// few L1 sets (rows 4 KiB apart: one set); when the five arrays also sit at the same offset
// within a page (large tensors are separate mmaps, all at the same page offset) their lines
// overflow the set's ways and the loop thrashes. Measured on one thread of the 2-core AMD EPYC
// runner: a stand-alone copy of the loop over arrays at the same page offset, one row at a
// time vs 4 interleaved, 1.4-2.1 vs 7.5-8.5 ns per element at T = 1024 .. 32768 (float32),
// equal at T = 512, 3.6 vs 3.8 at T = 256, 4.9 vs 3.8 at T = 128 (interleaving wins). This
// kernel (before -> after, rewards and values at one page offset, outputs recycled): 5-20%
// faster at T = 256 .. 32768, unchanged at T = 128 (benchmarks/NOTES.md, CPU tuning log 8).
constexpr int64_t kInterleaveRowBytes = 1024;

inline bool interleave_rows(std::initializer_list<int64_t> row_bytes) {
  for (int64_t b : row_bytes) {
    if (b >= kInterleaveRowBytes || b <= -kInterleaveRowBytes) return false;
  }
  return true;
}

// The recurrence of the nl (<= kLanes) rows b0 .. b0 + nl - 1 over the token rewards rew
// (strides sr): all lanes interleaved when the group is full and the rows are short
// (interleave_rows), else row by row. kRet: the returns are written too (ret may be null
// otherwise).
template <bool kRet, typename scalar_t, typename rew_t>
void gae_group(const scalar_t* val, Strides2 sv, const uint8_t* mask, Strides2 sm, const rew_t* rew, Strides2 sr,
               int64_t b0, int64_t nl, int64_t T, acc_t<scalar_t> gamma, acc_t<scalar_t> gl, acc_t<scalar_t>* adv,
               acc_t<scalar_t>* ret) {
  const bool short_rows = interleave_rows({sv.s0 * int64_t(sizeof(scalar_t)), sm.s0, sr.s0 * int64_t(sizeof(rew_t)),
                                           T * int64_t(sizeof(acc_t<scalar_t>))});
  if (nl == kLanes && short_rows) {
    if (sv.s1 == 1 && sm.s1 == 1 && sr.s1 == 1) {
      RMK_SIMD(gae_recurrence<kLanes, true, kRet, scalar_t, rew_t>)(val, sv, mask, sm, rew, sr, b0, T, gamma, gl,
                                                                    adv, ret);
    } else {
      RMK_SIMD(gae_recurrence<kLanes, false, kRet, scalar_t, rew_t>)(val, sv, mask, sm, rew, sr, b0, T, gamma, gl,
                                                                     adv, ret);
    }
  } else {
    for (int64_t b = b0; b < b0 + nl; ++b) {
      RMK_SIMD(gae_recurrence<1, false, kRet, scalar_t, rew_t>)(val, sv, mask, sm, rew, sr, b, T, gamma, gl, adv,
                                                                ret);
    }
  }
}

// KL of row b (and its rewards with kRewards), with the unit-stride loop when it applies.
template <int64_t kEst, bool kMask, bool kRewards, typename scalar_t>
void kl_of_row(const scalar_t* lp, Strides2 slp, const scalar_t* rf, Strides2 srf, const uint8_t* mask, Strides2 sm,
               int64_t b, int64_t T, acc_t<scalar_t> kl_coef, acc_t<scalar_t> x_clamp, acc_t<scalar_t> kl_clamp,
               acc_t<scalar_t>* kl, acc_t<scalar_t>* rew) {
  const scalar_t* lpr = lp + b * slp.s0;
  const scalar_t* rfr = rf + b * srf.s0;
  const uint8_t* mr = kMask ? mask + b * sm.s0 : nullptr;
  acc_t<scalar_t>* o_rew = kRewards ? rew + b * T : nullptr;
  if (slp.s1 == 1 && srf.s1 == 1 && (!kMask || sm.s1 == 1)) {
    RMK_SIMD(kl_row<kEst, true, kMask, kRewards, scalar_t>)(lpr, 1, rfr, 1, mr, 1, T, kl_coef, x_clamp, kl_clamp,
                                                            kl + b * T, o_rew);
  } else {
    RMK_SIMD(kl_row<kEst, false, kMask, kRewards, scalar_t>)(lpr, slp.s1, rfr, srf.s1, mr, kMask ? sm.s1 : 0, T,
                                                             kl_coef, x_clamp, kl_clamp, kl + b * T, o_rew);
  }
}

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
  at::parallel_for(0, n_groups, 1, [&](int64_t g_lo, int64_t g_hi) {
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

Strides2 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

// A bool mask as bytes (0 / 1): the loops test `!= 0` on uint8_t, which GCC vectorises
// (a select on a loaded `bool` it does not).
const uint8_t* mask_bytes(const at::Tensor& mask) { return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()); }

// Calls f(std::integral_constant<int64_t, estimator>) for a checked estimator code.
template <typename F> void with_estimator(int64_t estimator, F&& f) {
  switch (estimator) {
    case codes::kK1: f(std::integral_constant<int64_t, codes::kK1>{}); break;
    case codes::kAbs: f(std::integral_constant<int64_t, codes::kAbs>{}); break;
    case codes::kK2: f(std::integral_constant<int64_t, codes::kK2>{}); break;
    default: f(std::integral_constant<int64_t, codes::kK3>{}); break;
  }
}

// The checks every PPO kernel op shares: a float [B, T] main input on the CPU, the others of
// its shape, dtype and device, a bool [B, T] mask.
void check_mask(const at::Tensor& mask, const char* name, int64_t B, int64_t T, const at::Device& dev) {
  check_bt(mask, name, B, T, dev);
  check_dtype(mask, name, at::kBool);
}

void check_main(const at::Tensor& t, const char* name) {
  check_dim(t, name, 2);
  check_float_input(t, name);
  check_device(t, name, at::Device(at::kCPU));
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& main, const char* main_name) {
  check_bt(t, name, main.size(0), main.size(1), main.device());
  check_same_dtype(t, name, main, main_name);
}

void check_kl_options(int64_t estimator, double x_clamp, double kl_clamp) {
  check_code(estimator, "estimator", codes::kK1, codes::kK3);
  TORCH_CHECK(x_clamp >= 0 && kl_clamp >= 0, "x_clamp and kl_clamp must be >= 0 (0 = no clamp), got ", x_clamp,
              ", ", kl_clamp);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_gae_cpu(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& values, const at::Tensor& scores,
    const at::Tensor& mask, double kl_coef, double gamma, double lam, int64_t estimator, double x_clamp,
    double kl_clamp, double score_clip) {
  check_main(values, "values");
  const int64_t B = values.size(0), T = values.size(1);
  check_like(logprobs, "logprobs", values, "values");
  check_like(ref_logprobs, "ref_logprobs", values, "values");
  check_mask(mask, "mask", B, T, values.device());
  check_kl_options(estimator, x_clamp, kl_clamp);
  TORCH_CHECK(score_clip >= 0, "score_clip must be >= 0 (0 = no clamp), got ", score_clip);
  const auto acc_type = acc_scalar_type(values.scalar_type());
  check_dense(scores, "scores", {B}, acc_type, values.device());
  auto opts = values.options().dtype(acc_type);
  auto adv = at::empty({B, T}, opts), ret = at::empty({B, T}, opts);
  auto rew = at::empty({B, T}, opts), kl = at::empty({B, T}, opts);
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
  check_main(values, "values");
  const int64_t B = values.size(0), T = values.size(1);
  check_like(rewards, "rewards", values, "values");
  check_mask(mask, "mask", B, T, values.device());
  auto opts = values.options().dtype(acc_scalar_type(values.scalar_type()));
  auto adv = at::empty({B, T}, opts);
  auto ret = returns ? at::empty({B, T}, opts) : at::empty({0}, opts);
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
    at::parallel_for(0, (B + kLanes - 1) / kLanes, 1, [&](int64_t g_lo, int64_t g_hi) {
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

// The per-token KL estimate (docs/ops.md section 4): ppo_gae_kernel's KL pass; 0 where mask is 0.
at::Tensor kl_estimate_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                           const std::optional<at::Tensor>& mask, int64_t estimator, double x_clamp,
                           double kl_clamp) {
  check_main(logprobs, "logprobs");
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  check_like(ref_logprobs, "ref_logprobs", logprobs, "logprobs");
  if (mask.has_value()) check_mask(*mask, "mask", B, T, logprobs.device());
  check_kl_options(estimator, x_clamp, kl_clamp);
  auto kl = at::empty({B, T}, logprobs.options().dtype(acc_scalar_type(logprobs.scalar_type())));
  if (B == 0 || T == 0) return kl;
  RMK_DISPATCH_FLOATS(logprobs.scalar_type(), "kl_estimate_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc xc = static_cast<acc>(x_clamp), kc = static_cast<acc>(kl_clamp);
    const scalar_t* lp = logprobs.data_ptr<scalar_t>();
    const scalar_t* rf = ref_logprobs.data_ptr<scalar_t>();
    const Strides2 slp = strides_of(logprobs), srf = strides_of(ref_logprobs);
    const uint8_t* m = mask.has_value() ? mask_bytes(*mask) : nullptr;
    const Strides2 sm = mask.has_value() ? strides_of(*mask) : Strides2{0, 0};
    acc* out = kl.data_ptr<acc>();
    with_estimator(estimator, [&](auto est) {
      constexpr int64_t kEst = decltype(est)::value;
      at::parallel_for(0, B, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(T, 1)), [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          if (m) {
            kl_of_row<kEst, true, false, scalar_t>(lp, slp, rf, srf, m, sm, b, T, acc(0), xc, kc, out, nullptr);
          } else {
            kl_of_row<kEst, false, false, scalar_t>(lp, slp, rf, srf, m, sm, b, T, acc(0), xc, kc, out, nullptr);
          }
        }
      });
    });
  });
  return kl;
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
inline double mean_of(const double* totals) { return math::whiten_mean(totals[0], totals[1]); }

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
  const math::Whiten w = math::whiten_of(totals[0], totals[1], sq[0], unbiased, eps);
  if (!w.ok) {  // n <= 1: all zeros, never NaN
    std::fill(out, out + B * T, acc(0));
    return;
  }
  const acc rstd = static_cast<acc>(w.rstd);
  const acc mean_a = static_cast<acc>(w.mean);
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
  check_main(x, "x");
  check_mask(mask, "mask", x.size(0), x.size(1), x.device());
}

void check_totals(const at::Tensor& totals, const char* name, int64_t n) {
  check_shape(totals, name, {n});
  check_dtype(totals, name, at::kDouble);
  check_device(totals, name, at::Device(at::kCPU));
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
  auto out = at::empty({B, T}, x.options().dtype(acc_scalar_type(x.scalar_type())));
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

// ---------------------------------------------------------------------------------------
// REINFORCE++ and ReMax (reinforce_kernel, docs/ops.md section 5): the return of gae_kernel
// (values 0, lam 1), then REINFORCE++'s whitening or ReMax's baseline.
// ---------------------------------------------------------------------------------------
// ReMax, rows in parallel: the return written at every position (carried over masked ones, as
// verl's reverse cumulative sum of the masked rewards), the baseline subtracted where valid. (Four
// rows interleaved, as gae_group, measured no faster here: 60 vs 57-59 ms at [65536, 128], where
// the fresh output pages dominate.)
template <typename scalar_t>
void remax_rows(const scalar_t* rew, Strides2 sr, const uint8_t* mask, Strides2 sm, const acc_t<scalar_t>* base,
                int64_t B, int64_t T, acc_t<scalar_t> gamma, acc_t<scalar_t>* adv, acc_t<scalar_t>* ret) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
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
  at::parallel_for(0, (B + kLanes - 1) / kLanes, 1, [&](int64_t g_lo, int64_t g_hi) {
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
  m.impl("ppo_gae_kernel", &ppo_gae_cpu);
  m.impl("gae_kernel", &gae_cpu);
  m.impl("kl_estimate_kernel", &kl_estimate_cpu);
  m.impl("masked_row_stats_kernel", &masked_row_stats_cpu);
  m.impl("masked_centered_sq_kernel", &masked_centered_sq_cpu);
  m.impl("masked_whiten_apply_kernel", &masked_whiten_apply_cpu);
  m.impl("reinforce_kernel", &reinforce_cpu);
}

}  // namespace rmkernels
