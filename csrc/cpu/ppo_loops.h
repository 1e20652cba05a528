// Loop kernels of the PPO rewards / GAE / KL / whitening (ppo_common.h), compiled once per variant of
// cpu_simd.h (simd_variants.h): no include guard, no includes; ppo_common.h includes what they
// use first. Masks arrive as bytes (0 / 1) and are tested with `!= 0`: GCC vectorises a
// select on a loaded byte, not on a loaded `bool`.

// Pass 1 of one row: the KL estimate at every position (0 where masked) and, with kRewards,
// the KL-penalised rewards -kl_coef * kl (the score is added by the caller). kUnit: every
// position stride is 1 (the usual layout). kMask: a mask is given (else every position is
// valid; mr is not read).
template <int64_t kEst, bool kUnit, bool kMask, bool kRewards, typename scalar_t>
void kl_row(const scalar_t* lpr, int64_t slp, const scalar_t* rfr, int64_t srf, const uint8_t* mr, int64_t sm,
            int64_t T, acc_t<scalar_t> kl_coef, acc_t<scalar_t> x_clamp, acc_t<scalar_t> kl_clamp,
            acc_t<scalar_t>* __restrict__ o_kl, acc_t<scalar_t>* __restrict__ o_rew) {
  using acc = acc_t<scalar_t>;
  if (kUnit) slp = srf = sm = 1;
#pragma omp simd
  for (int64_t t = 0; t < T; ++t) {
    const acc x = static_cast<acc>(lpr[t * slp]) - static_cast<acc>(rfr[t * srf]);
    const acc k = math::kl_estimate<kEst>(x, x_clamp, kl_clamp);
    const bool valid = kMask ? mr[t * sm] != 0 : true;
    o_kl[t] = valid ? k : acc(0);
    if (kRewards) o_rew[t] = valid ? -kl_coef * k : acc(0);
  }
}

// Pass 2 of L rows b0 .. b0 + L - 1, interleaved (fully unrolled: the carries stay in
// registers): the GAE recurrence over the token rewards `rew` (rew_t: the arithmetic type for
// the rewards of pass 1, the input dtype for gae_kernel's; strides sr). Masked positions
// compute a value that is selected away (their rewards and values never reach a valid one).
// kUnit: unit position strides of values, mask and rewards. kRet: the returns are written
// (`ret` is not touched otherwise: REINFORCE++'s return is the advantages alone).
template <int L, bool kUnit, bool kRet, typename scalar_t, typename rew_t>
void gae_recurrence(const scalar_t* val, Strides2 sv, const uint8_t* mask, Strides2 sm, const rew_t* rew,
                    Strides2 sr, int64_t b0, int64_t T, acc_t<scalar_t> gamma, acc_t<scalar_t> gl,
                    acc_t<scalar_t>* adv, acc_t<scalar_t>* ret) {
  using acc = acc_t<scalar_t>;
  const int64_t sv1 = kUnit ? 1 : sv.s1, sm1 = kUnit ? 1 : sm.s1, sr1 = kUnit ? 1 : sr.s1;
  const scalar_t* vr[L];
  const uint8_t* mr[L];
  const rew_t* rr[L];
  acc* ar[L];
  acc* tr[L];
  acc next_v[L], next_a[L];
#pragma GCC unroll 8
  for (int l = 0; l < L; ++l) {
    vr[l] = val + (b0 + l) * sv.s0;
    mr[l] = mask + (b0 + l) * sm.s0;
    rr[l] = rew + (b0 + l) * sr.s0;
    ar[l] = adv + (b0 + l) * T;
    tr[l] = kRet ? ret + (b0 + l) * T : nullptr;
    next_v[l] = next_a[l] = acc(0);
  }
  for (int64_t t = T - 1; t >= 0; --t) {
#pragma GCC unroll 8
    for (int l = 0; l < L; ++l) {
      const bool valid = mr[l][t * sm1] != 0;
      const acc v = static_cast<acc>(vr[l][t * sv1]);
      const acc delta = static_cast<acc>(rr[l][t * sr1]) + gamma * next_v[l] - v;
      const acc a = delta + gl * next_a[l];
      ar[l][t] = valid ? a : acc(0);
      if (kRet) tr[l][t] = valid ? a + v : acc(0);
      next_v[l] = valid ? v : next_v[l];
      next_a[l] = valid ? a : next_a[l];
    }
  }
}

// (count, sum) of x over the valid positions of one row, in float64 (vectorised: the sums
// are split over the lanes of the vector width of the variant the CPU runs, see
// rmkernels/cpu_simd.h).
template <bool kUnit, typename scalar_t>
void masked_count_sum(const scalar_t* x, int64_t sx, const uint8_t* m, int64_t sm, int64_t T,
                                      double* out) {
  if (kUnit) sx = sm = 1;
  double cnt = 0, sum = 0;
#pragma omp simd reduction(+ : cnt, sum)
  for (int64_t t = 0; t < T; ++t) {
    const bool valid = m[t * sm] != 0;
    cnt += valid ? 1.0 : 0.0;
    sum += valid ? static_cast<double>(static_cast<acc_t<scalar_t>>(x[t * sx])) : 0.0;
  }
  out[0] = cnt;
  out[1] = sum;
}

// sum over the valid positions of one row of (x - mean)^2, float64 (vectorised as
// masked_count_sum).
template <bool kUnit, typename scalar_t>
double centered_sq_row(const scalar_t* x, int64_t sx, const uint8_t* m, int64_t sm, int64_t T,
                                       double mean) {
  if (kUnit) sx = sm = 1;
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < T; ++t) {
    const double d = static_cast<double>(static_cast<acc_t<scalar_t>>(x[t * sx])) - mean;
    s += m[t * sm] != 0 ? d * d : 0.0;
  }
  return s;
}

// One row of the whitening: (x - mean) * rstd + add_back where valid, 0 elsewhere.
template <bool kUnit, typename scalar_t>
void whiten_row(const scalar_t* xr, int64_t sx, const uint8_t* mr, int64_t sm, int64_t T,
                                acc_t<scalar_t> mean, acc_t<scalar_t> rstd, acc_t<scalar_t> add_back,
                                acc_t<scalar_t>* __restrict__ o) {
  using acc = acc_t<scalar_t>;
  if (kUnit) sx = sm = 1;
#pragma omp simd
  for (int64_t t = 0; t < T; ++t) {
    const acc y = (static_cast<acc>(xr[t * sx]) - mean) * rstd + add_back;
    o[t] = mr[t * sm] != 0 ? y : acc(0);
  }
}
