// Loop kernels of the token log-probs / entropy (token_logprobs.cpp): one row of a tile,
// compiled once per variant of cpu_simd.h (simd_variants.h): no include guard, no includes.
// z = (raw + bias) * inv_temp is recomputed in each pass (cheaper than a store and a load).

// Forward: the row's max, then sum exp(z - m_new) and sum exp(z - m_new) (z - m_new), merged
// into the running (m, s, u) of the row (rescaled by exp(m_old - m_new)).
// -inf logits (banned / padded vocabulary entries) add nothing: e = 0, and e * d is 0 where e is
// 0 (d = -inf there, 0 * -inf = NaN; vecmath::exp_nonpos_xexp, whose select keeps a NaN). A row
// with no finite logit yet (m_new = -inf: this chunk and the ones before all -inf) is shifted by 0
// instead of m_new (-inf - -inf = NaN): its s and u stay 0, m -inf, and the next chunk with a
// finite logit starts them afresh (s == 0: nothing to rescale, dm = -inf would give 0 * -inf).
template <typename acc>
void lp_stats_row(const acc* __restrict__ raw, const acc* __restrict__ bias, int64_t cols, acc inv_temp,
                  bool first, acc* m, acc* s, acc* u) {
  acc mx = -std::numeric_limits<acc>::infinity();
  if (bias) {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < cols; ++j) {
      const acc z = (raw[j] + bias[j]) * inv_temp;
      mx = z > mx ? z : mx;
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < cols; ++j) {
      const acc z = raw[j] * inv_temp;
      mx = z > mx ? z : mx;
    }
  }
  const acc m_new = first ? mx : (*m > mx ? *m : mx);
  const acc shift = m_new == -std::numeric_limits<acc>::infinity() ? acc(0) : m_new;
  acc se = 0, su = 0;
  if (bias) {
#pragma omp simd reduction(+ : se, su)
    for (int64_t j = 0; j < cols; ++j) {
      const acc d = (raw[j] + bias[j]) * inv_temp - shift;
      acc e, ed;
      vecmath::exp_nonpos_xexp(d, e, ed);
      se += e;
      su += ed;
    }
  } else {
#pragma omp simd reduction(+ : se, su)
    for (int64_t j = 0; j < cols; ++j) {
      const acc d = raw[j] * inv_temp - shift;
      acc e, ed;
      vecmath::exp_nonpos_xexp(d, e, ed);
      se += e;
      su += ed;
    }
  }
  if (first || *s == acc(0)) {
    *s = se;
    *u = su;
  } else {
    const acc dm = *m - m_new;  // <= 0
    const acc a = dm == acc(0) ? acc(1) : vecmath::exp_nonpos(dm);
    *u = a * (*u + dm * *s) + su;
    *s = a * *s + se;
  }
  *m = m_new;
}

// Backward: raw logits -> dz / temperature in place (the target's +gl added by the caller).
// bias is never null here (the caller passes zeros): GCC 12 vectorises this loop with the bias
// load and not without it ("control flow in loop"). log p is clamped where p is 0
// (vecmath::exp_nonpos_arg): a -inf logit (log p = -inf) adds 0, not 0 * -inf = NaN; NaN stays
// NaN. (A select on p == 0, after the exp, made this loop ~25% slower in L2 on AVX-512.)
template <typename acc>
void lp_grad_row(acc* __restrict__ row, const acc* __restrict__ bias, int64_t cols, acc inv_temp, acc lse, acc ent,
                 acc gl, acc ge) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const acc lp = (row[j] + bias[j]) * inv_temp - lse;
    const acc p = vecmath::exp_nonpos(lp < acc(0) ? lp : acc(0));  // p <= 1: lp > 0 only by rounding
    const acc l = vecmath::exp_nonpos_arg(lp);
    row[j] = -(p * (gl + ge * (l + ent))) * inv_temp;
  }
}
