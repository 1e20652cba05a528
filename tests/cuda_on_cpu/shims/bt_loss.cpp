// C entry points of csrc/cuda/bt_loss.cuh's launchers for the CUDA-on-CPU tests (called with
// ctypes: parameters are int64_t, double or pointers only; each returns the cudaError_t).
#include "../../../csrc/cuda/bt_loss.cuh"

using namespace rmkernels::cuda;

namespace {
BTPairs pairs(const void* chosen, const void* rejected, int64_t sc, int64_t sr, const void* margin,
              const void* weights, double margin_value, double weight_value, double smoothing, double coef,
              int64_t B) {
  return BTPairs{chosen, rejected, sc, sr, margin, weights, margin_value, weight_value, smoothing, coef, B};
}
}  // namespace

extern "C" {
int64_t rmk_bt_loss_fwd(int64_t dtype, const void* chosen, const void* rejected, int64_t sc, int64_t sr,
                        const void* margin, const void* weights, double margin_value, double weight_value,
                        double smoothing, double coef, int64_t B, int64_t reduction, void* loss) {
  return launch_bt_loss_fwd(static_cast<DType>(dtype),
                            pairs(chosen, rejected, sc, sr, margin, weights, margin_value, weight_value, smoothing,
                                  coef, B),
                            static_cast<Reduction>(reduction), loss, nullptr);
}
int64_t rmk_bt_loss_bwd(int64_t dtype, const void* chosen, const void* rejected, int64_t sc, int64_t sr,
                        const void* margin, const void* weights, double margin_value, double weight_value,
                        double smoothing, double coef, int64_t B, int64_t reduction, const void* grad,
                        void* grad_chosen, void* grad_rejected) {
  return launch_bt_loss_bwd(static_cast<DType>(dtype),
                            pairs(chosen, rejected, sc, sr, margin, weights, margin_value, weight_value, smoothing,
                                  coef, B),
                            static_cast<Reduction>(reduction), grad, grad_chosen, grad_rejected, nullptr);
}
int64_t rmk_ranking_loss_fwd(int64_t dtype, const void* rewards, const int64_t* num_candidates, int64_t B, int64_t K,
                             int64_t sB, int64_t sK, void* row_loss) {
  return launch_ranking_loss_fwd(static_cast<DType>(dtype), rewards, num_candidates, B, K, sB, sK, row_loss, nullptr);
}
int64_t rmk_ranking_loss_bwd(int64_t dtype, const void* grad_rows, const void* rewards, const int64_t* num_candidates,
                             int64_t B, int64_t K, int64_t sB, int64_t sK, void* grad_rewards) {
  return launch_ranking_loss_bwd(static_cast<DType>(dtype), grad_rows, rewards, num_candidates, B, K, sB, sK,
                                 grad_rewards, nullptr);
}
}
