// Loop kernels of the Bradley-Terry loss (bt_loss.cpp), compiled once per variant of
// cpu_simd.h (simd_variants.h): no include guard, no includes; bt_loss.cpp includes what
// they use first.

// w_i l_i of n pairs, l = -(1 - e) logsigmoid(d) - e logsigmoid(-d) + coef (c + r)^2 with
// d = c - r - m (math::bt_pair_loss: one exp and one log1p serve both terms, vectorised).
// kM / kW: per-pair margin / weights arrays, else the scalars mv / wv.
template <bool kM, bool kW, typename A>
void pair_losses(const A* c, const A* r, const A* m, const A* w, A mv, A wv, A e, A coef, int64_t n,
                 A* __restrict__ out) {
  const bool center = coef != A(0);  // never 0 * inf when the coefficient is 0
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A d = c[i] - r[i] - (kM ? m[i] : mv);
    const A l = math::bt_pair_loss(d, e);
    const A s = c[i] + r[i];
    out[i] = (kW ? w[i] : wv) * (center ? l + coef * s * s : l);
  }
}

// Gradients of n pairs: with dl/dd = -(1 - e) sigmoid(-d) + e sigmoid(d) (math::bt_pair_dloss:
// one exp of a non-positive number for both sigmoids) and the centering
// term 2 coef (c + r), g_c = g (dl/dd + center), g_r = g (center - dl/dd), where g is the
// upstream gradient (grad[i] for "none", else scale) times the pair's weight.
template <bool kM, bool kW, bool kNone, typename A>
void pair_grads(const A* c, const A* r, const A* m, const A* w, const A* grad, A mv, A wv, A e, A coef, A scale,
                int64_t n, A* __restrict__ g_c, A* __restrict__ g_r) {
  const bool center_on = coef != A(0);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A d = c[i] - r[i] - (kM ? m[i] : mv);
    const A dl_dd = math::bt_pair_dloss(d, e);
    const A center = center_on ? A(2) * coef * (c[i] + r[i]) : A(0);
    const A g = (kNone ? grad[i] : scale) * (kW ? w[i] : wv);
    g_c[i] = g * (dl_dd + center);
    g_r[i] = g * (center - dl_dd);
  }
}
