// The pieces the C++ CPU kernels of the PPO family share (ppo_gae.cpp, ppo_kl.cpp, ppo_whiten.cpp,
// reinforce.cpp: docs/ops.md sections 3 to 5): the loops of ppo_loops.h in every SIMD variant,
// the row-group recurrence (gae_group), the KL of one row, the whitening passes, the layout
// helpers and the argument checks. One file per op family so that a parallel build compiles
// them side by side: one ppo.cpp was the build's critical path (85 s of the 105 s clean build
// with MAX_JOBS=2 on the 2-core runner; each other file 0-18 s).
//
// The [B, T] float inputs of one op share one floating dtype (the Python layer converts mixed
// inputs) and may have any strides; mask is bool [B, T] (any strides). Outputs are contiguous
// [B, T] in the arithmetic dtype (float32, float64 for double input). A clamp of 0 means no
// clamp. The recurrence over T is one sequential pass per row from the right (rows in
// parallel); the element-wise parts are vectorised loops (ppo_loops.h, in the CPU's variant:
// RMK_SIMD).
#pragma once

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

// The one rule of the row recurrences (GAE, REINFORCE++, ReMax) for the nl (<= L) rows b0 ..
// b0 + nl - 1: a full group of short rows (interleave_rows) runs as L interleaved lanes, with
// the unit-stride loop when `unit`; anything else runs row by row (strided loop). `row_loop` is
// called as row_loop(lanes, unit_tag, b) with std::integral_constant lanes (L or 1) and
// std::bool_constant unit_tag, so that each call names its instantiation at compile time.
template <int L, typename RowLoop>
inline void lanes_or_rows(int64_t b0, int64_t nl, bool short_rows, bool unit, RowLoop&& row_loop) {
  if (nl == L && short_rows) {
    if (unit) {
      row_loop(std::integral_constant<int, L>{}, std::true_type{}, b0);
    } else {
      row_loop(std::integral_constant<int, L>{}, std::false_type{}, b0);
    }
  } else {
    for (int64_t b = b0; b < b0 + nl; ++b) row_loop(std::integral_constant<int, 1>{}, std::false_type{}, b);
  }
}

// The recurrence of the nl (<= kLanes) rows b0 .. b0 + nl - 1 over the token rewards rew
// (strides sr), by lanes_or_rows. kRet: the returns are written too (ret may be null
// otherwise).
template <bool kRet, typename scalar_t, typename rew_t>
void gae_group(const scalar_t* val, Strides2 sv, const uint8_t* mask, Strides2 sm, const rew_t* rew, Strides2 sr,
               int64_t b0, int64_t nl, int64_t T, acc_t<scalar_t> gamma, acc_t<scalar_t> gl, acc_t<scalar_t>* adv,
               acc_t<scalar_t>* ret) {
  const bool short_rows = interleave_rows({sv.s0 * int64_t(sizeof(scalar_t)), sm.s0, sr.s0 * int64_t(sizeof(rew_t)),
                                           T * int64_t(sizeof(acc_t<scalar_t>))});
  lanes_or_rows<kLanes>(b0, nl, short_rows, sv.s1 == 1 && sm.s1 == 1 && sr.s1 == 1, [&](auto lanes, auto unit,
                                                                                         int64_t b) {
    RMK_SIMD(gae_recurrence<decltype(lanes)::value, decltype(unit)::value, kRet, scalar_t, rew_t>)(
        val, sv, mask, sm, rew, sr, b, T, gamma, gl, adv, ret);
  });
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

inline Strides2 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

// A bool mask as bytes (0 / 1): the loops test `!= 0` on uint8_t, which GCC vectorises
// (a select on a loaded `bool` it does not).
inline const uint8_t* mask_bytes(const at::Tensor& mask) {
  return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
}

// Calls f(std::integral_constant<int64_t, estimator>) for a checked estimator code.
template <typename F> void with_estimator(int64_t estimator, F&& f) {
  switch (estimator) {
    case codes::kK1: f(std::integral_constant<int64_t, codes::kK1>{}); break;
    case codes::kAbs: f(std::integral_constant<int64_t, codes::kAbs>{}); break;
    case codes::kK2: f(std::integral_constant<int64_t, codes::kK2>{}); break;
    default: f(std::integral_constant<int64_t, codes::kK3>{}); break;
  }
}

// The checks of the PPO family's CPU kernel ops (op_checks.h): the main input on the CPU.
inline void check_main(const at::Tensor& t, const char* name) { check_ppo_main(t, name, /*cuda=*/false); }

// ---------------------------------------------------------------------------------------
// Whitening passes (masked_whiten's kernels, and REINFORCE++'s whitening).
// ---------------------------------------------------------------------------------------
// The row loops are branch-free selects, vectorised (RMK_SIMD, ppo_loops.h); each row's sums are
// taken by one thread and summed over rows in order by the caller: results do not depend on
// the number of threads. (The float64 lane split of a row's sum follows the vector width of
// the CPU: across CPUs the statistics may differ in their last float64 bits.)

// mean of totals = (n, sum): 0 when n is 0.
inline double mean_of(const double* totals) { return math::whiten_mean(totals[0], totals[1]); }

template <typename scalar_t>
void centered_sq_impl(const scalar_t* x, Strides2 sx, const uint8_t* mask, Strides2 sm, int64_t B, int64_t T,
                      double mean, double* out) {
  at::parallel_for(0, B, grain_of(T), [&](int64_t lo, int64_t hi) {
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
  at::parallel_for(0, B, grain_of(T), [&](int64_t lo, int64_t hi) {
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

}  // namespace
}  // namespace rmkernels
