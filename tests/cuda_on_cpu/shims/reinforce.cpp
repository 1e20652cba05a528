// C entry point of csrc/cuda/reinforce.cuh's launcher for the CUDA-on-CPU tests (called with
// ctypes: parameters are int64_t, double or pointers only; it returns the cudaError_t).
#include "../../../csrc/cuda/reinforce.cuh"

using namespace rmkernels::cuda;

extern "C" {
int64_t rmk_reinforce(int64_t dtype, const void* rw, int64_t r0, int64_t r1, const void* mask, int64_t m0, int64_t m1,
                      const void* baselines, int64_t B, int64_t T, double gamma, int64_t unbiased, double eps,
                      double* workspace, void* adv, void* ret) {
  return launch_reinforce(static_cast<DType>(dtype), Strided2D{rw, r0, r1}, Strided2D{mask, m0, m1}, baselines, B, T,
                          gamma, unbiased != 0, eps, workspace, adv, ret, nullptr);
}
}
