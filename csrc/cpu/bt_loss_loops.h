// Loop kernels of the Bradley-Terry loss (bt_loss.cpp), compiled once per variant of
// cpu_simd.h (simd_variants.h): no include guard, no includes; bt_loss.cpp includes what
// they use first.

// w_i l_i of n pairs, l = -(1 - e) logsigmoid(d) - e logsigmoid(-d) + coef (c + r)^2 with
// d = c - r - m. logsigmoid(+-d) = min(+-d, 0) - log1p(exp(-|d|)): one exp and one log1p
// serve both terms. kM / kW: per-pair margin / weights arrays, else the scalars mv / wv.
template <bool kM, bool kW, typename A>
void pair_losses(const A* c, const A* r, const A* m, const A* w, A mv, A wv, A e, A coef, int64_t n,
                 A* __restrict__ out) {
  const bool center = coef != A(0);  // never 0 * inf when the coefficient is 0
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A d = c[i] - r[i] - (kM ? m[i] : mv);
    const A lp = vecmath::log1p_unit(vecmath::exp_nonpos(-std::abs(d)));
    const A l = -(A(1) - e) * ((d < A(0) ? d : A(0)) - lp) - e * ((-d < A(0) ? -d : A(0)) - lp);
    const A s = c[i] + r[i];
    out[i] = (kW ? w[i] : wv) * (center ? l + coef * s * s : l);
  }
}

// Gradients of n pairs: with dl/dd = -(1 - e) sigmoid(-d) + e sigmoid(d) and the centering
// term 2 coef (c + r), g_c = g (dl/dd + center), g_r = g (center - dl/dd), where g is the
// upstream gradient (grad[i] for "none", else scale) times the pair's weight.
template <bool kM, bool kW, bool kNone, typename A>
void pair_grads(const A* c, const A* r, const A* m, const A* w, const A* grad, A mv, A wv, A e, A coef, A scale,
                int64_t n, A* __restrict__ g_c, A* __restrict__ g_r) {
  const bool center_on = coef != A(0);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A d = c[i] - r[i] - (kM ? m[i] : mv);
    // sigmoid(d) and sigmoid(-d) from one exp of a non-positive number
    const A z = vecmath::exp_nonpos(-std::abs(d));
    const A inv = A(1) / (A(1) + z);
    const A zinv = z * inv;
    const A s_pos = d >= A(0) ? inv : zinv;   // sigmoid(d)
    const A s_neg = d >= A(0) ? zinv : inv;   // sigmoid(-d)
    const A dl_dd = -(A(1) - e) * s_neg + e * s_pos;
    const A center = center_on ? A(2) * coef * (c[i] + r[i]) : A(0);
    const A g = (kNone ? grad[i] : scale) * (kW ? w[i] : wv);
    g_c[i] = g * (dl_dd + center);
    g_r[i] = g * (center - dl_dd);
  }
}
