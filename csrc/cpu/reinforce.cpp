// C++ CPU kernel of REINFORCE++ and ReMax (docs/ops.md section 5):
//
//   reinforce_kernel(rewards, mask, baselines?, gamma, unbiased, eps) -> (advantages, returns):
//                  REINFORCE++ (no baselines: the returns whitened) or ReMax (returns - baseline)
#include "ppo_common.h"

namespace rmkernels {
namespace {

// ReMax of the L rows b0 .. b0 + L - 1, interleaved position by position (fully unrolled: the
// carries stay in registers): the return written at every position (carried over masked ones, as
// verl's reverse cumulative sum of the masked rewards), the baseline subtracted where valid. Each
// row gets exactly the one-row arithmetic, so results do not depend on grouping. kUnit: unit
// position strides of rewards and mask.
template <int L, bool kUnit, typename scalar_t>
void remax_group(const scalar_t* rew, Strides2 sr, const uint8_t* mask, Strides2 sm, const acc_t<scalar_t>* base,
                 int64_t b0, int64_t T, acc_t<scalar_t> gamma, acc_t<scalar_t>* adv, acc_t<scalar_t>* ret) {
  using acc = acc_t<scalar_t>;
  const int64_t sr1 = kUnit ? 1 : sr.s1, sm1 = kUnit ? 1 : sm.s1;
  const scalar_t* rr[L];
  const uint8_t* mr[L];
  acc* ar[L];
  acc* tr[L];
  acc R[L], bl[L];
#pragma GCC unroll 16
  for (int l = 0; l < L; ++l) {
    rr[l] = rew + (b0 + l) * sr.s0;
    mr[l] = mask + (b0 + l) * sm.s0;
    ar[l] = adv + (b0 + l) * T;
    tr[l] = ret + (b0 + l) * T;
    bl[l] = base[b0 + l];
    R[l] = acc(0);
  }
  for (int64_t t = T - 1; t >= 0; --t) {
#pragma GCC unroll 16
    for (int l = 0; l < L; ++l) {
      const bool valid = mr[l][t * sm1] != 0;
      const acc r = static_cast<acc>(rr[l][t * sr1]) + gamma * R[l];
      R[l] = valid ? r : R[l];
      tr[l][t] = R[l];
      ar[l][t] = valid ? R[l] - bl[l] : R[l];
    }
  }
}

// Rows per remax_group. One row at a time the loop is bound by the latency of its chain of
// multiply-adds (one per position); 16 independent rows overlap. Measured (2026-12-02, one thread
// of the 2-core AMD EPYC runner, [65536, 128] float32, outputs in recycled memory; benchmarks/
// NOTES.md, CPU tuning log): a stand-alone copy of the loop, one row 29 ms, 4 rows 28, 8 rows 21,
// 16 rows 19; this kernel 27.7 -> 19.5 ms. Interleaved only for short rows (interleave_rows: rows
// >= 1 KiB apart put the L rows' lines at one position into the same L1 sets).
constexpr int kRemaxLanes = 16;

// ReMax, groups of kRemaxLanes rows in parallel (remax_group).
template <typename scalar_t>
void remax_rows(const scalar_t* rew, Strides2 sr, const uint8_t* mask, Strides2 sm, const acc_t<scalar_t>* base,
                int64_t B, int64_t T, acc_t<scalar_t> gamma, acc_t<scalar_t>* adv, acc_t<scalar_t>* ret) {
  const bool unit = sr.s1 == 1 && sm.s1 == 1;
  const bool short_rows = interleave_rows({sr.s0 * int64_t(sizeof(scalar_t)), sm.s0,
                                           T * int64_t(sizeof(acc_t<scalar_t>))});
  at::parallel_for(0, (B + kRemaxLanes - 1) / kRemaxLanes, grain_of(kRemaxLanes * T), [&](int64_t g_lo, int64_t g_hi) {
    for (int64_t grp = g_lo; grp < g_hi; ++grp) {
      const int64_t b0 = grp * kRemaxLanes, nl = std::min<int64_t>(kRemaxLanes, B - b0);
      lanes_or_rows<kRemaxLanes>(b0, nl, short_rows, unit, [&](auto lanes, auto unit_tag, int64_t b) {
        remax_group<decltype(lanes)::value, decltype(unit_tag)::value, scalar_t>(rew, sr, mask, sm, base, b, T, gamma,
                                                                                adv, ret);
      });
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
  OutputPages pages;  // the [B, T] outputs in huge pages while they are written (cpu_common.h)
  auto adv = pages.empty({B, T}, opts);
  auto ret = pages.empty({B, T}, opts);
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
