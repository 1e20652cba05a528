// C entry points of csrc/cuda/group_adv.cuh's launchers for the CUDA-on-CPU tests (called with
// ctypes: parameters are int64_t, double or pointers only; each returns the cudaError_t).
#include "../../../csrc/cuda/group_adv.cuh"

using namespace rmkernels::cuda;

extern "C" {
int64_t rmk_group_advantages(int64_t dtype, const void* scores, const int64_t* group_ids, const bool* mask, int64_t B,
                             int64_t T, int64_t ms0, int64_t ms1, int64_t estimator, double eps, int64_t unbiased,
                             int64_t single, double f_norm, double whiten_eps, double* stats, void* seq, void* adv) {
  return launch_group_advantages(static_cast<DType>(dtype), scores, group_ids, mask, B, T, ms0, ms1, estimator, eps,
                                 unbiased != 0, single, f_norm, whiten_eps, stats, seq, adv, nullptr);
}
}
