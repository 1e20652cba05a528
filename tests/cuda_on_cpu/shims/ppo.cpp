// C entry points of csrc/cuda/ppo.cuh's launchers for the CUDA-on-CPU tests (called with
// ctypes: parameters are int64_t, double or pointers only; each returns the cudaError_t).
#include "../../../csrc/cuda/ppo.cuh"

using namespace rmkernels::cuda;

extern "C" {
int64_t rmk_ppo_gae(int64_t dtype, const void* lp, int64_t lp0, int64_t lp1, const void* rf, int64_t rf0, int64_t rf1,
                    const void* val, int64_t v0, int64_t v1, const void* scores, const void* mask, int64_t m0,
                    int64_t m1, int64_t B, int64_t T, double kl_coef, double gamma, double lam, int64_t estimator,
                    double x_clamp, double kl_clamp, double score_clip, void* adv, void* ret, void* rew, void* kl,
                    double* stats, int64_t n_seg, int64_t seg_len, void* agg, int64_t* seg_last, void* carry,
                    int64_t* last) {
  const PPOGaeParams p{kl_coef, gamma, lam, static_cast<int>(estimator), x_clamp, kl_clamp, score_clip};
  return launch_ppo_gae(static_cast<DType>(dtype), Strided2D{lp, lp0, lp1}, Strided2D{rf, rf0, rf1},
                        Strided2D{val, v0, v1}, scores, Strided2D{mask, m0, m1}, B, T, p, adv, ret, rew, kl, stats,
                        PPOSegments{n_seg, seg_len, agg, seg_last, carry, last}, nullptr);
}
int64_t rmk_masked_row_stats(int64_t dtype, const void* x, int64_t x0, int64_t x1, const void* mask, int64_t m0,
                             int64_t m1, int64_t B, int64_t T, double* stats) {
  return launch_masked_row_stats(static_cast<DType>(dtype), Strided2D{x, x0, x1}, Strided2D{mask, m0, m1}, B, T, stats,
                                 nullptr);
}
int64_t rmk_masked_centered_sq(int64_t dtype, const void* x, int64_t x0, int64_t x1, const void* mask, int64_t m0,
                               int64_t m1, int64_t B, int64_t T, const double* totals, double* out) {
  return launch_masked_centered_sq(static_cast<DType>(dtype), Strided2D{x, x0, x1}, Strided2D{mask, m0, m1}, B, T,
                                   totals, out, nullptr);
}
int64_t rmk_masked_whiten_apply(int64_t dtype, const void* x, int64_t x0, int64_t x1, const void* mask, int64_t m0,
                                int64_t m1, int64_t B, int64_t T, const double* totals, const double* sq,
                                int64_t shift_mean, int64_t unbiased, double eps, void* out) {
  return launch_masked_whiten_apply(static_cast<DType>(dtype), Strided2D{x, x0, x1}, Strided2D{mask, m0, m1}, B, T,
                                    totals, sq, shift_mean != 0, unbiased != 0, eps, out, nullptr);
}
int64_t rmk_gae(int64_t dtype, const void* rw, int64_t r0, int64_t r1, const void* val, int64_t v0, int64_t v1,
                const void* mask, int64_t m0, int64_t m1, int64_t B, int64_t T, double gamma, double lam, void* adv,
                void* ret, int64_t n_seg, int64_t seg_len, void* agg, int64_t* seg_last, void* carry,
                int64_t* last) {
  return launch_gae(static_cast<DType>(dtype), Strided2D{rw, r0, r1}, Strided2D{val, v0, v1},
                    Strided2D{mask, m0, m1}, B, T, gamma, lam, adv, ret,
                    PPOSegments{n_seg, seg_len, agg, seg_last, carry, last}, nullptr);
}
int64_t rmk_kl_estimate(int64_t dtype, const void* lp, int64_t lp0, int64_t lp1, const void* rf, int64_t rf0,
                        int64_t rf1, const void* mask, int64_t m0, int64_t m1, int64_t B, int64_t T,
                        int64_t estimator, double x_clamp, double kl_clamp, void* kl) {
  return launch_kl_estimate(static_cast<DType>(dtype), Strided2D{lp, lp0, lp1}, Strided2D{rf, rf0, rf1},
                            static_cast<const bool*>(mask), m0, m1, B, T, static_cast<int>(estimator), x_clamp,
                            kl_clamp, kl, nullptr);
}
}
