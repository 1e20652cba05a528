// C entry point of csrc/cuda/reinforce.cuh's launcher for the CUDA-on-CPU tests (called with
// ctypes: parameters are int64_t, double or pointers only; it returns the cudaError_t).
#include "../../../csrc/cuda/reinforce.cuh"

using namespace rmkernels::cuda;

extern "C" {
// plan_out: int64 [3] = (blocks, segments, seg_len) of reinforce_plan with segment_t.
int64_t rmk_reinforce_plan(int64_t dtype, int64_t remax, int64_t B, int64_t T, int64_t segment_t, int64_t* plan_out) {
  ReinforcePlan plan;
  const cudaError_t err = reinforce_plan(static_cast<DType>(dtype), remax != 0, B, T, segment_t, &plan);
  plan_out[0] = plan.blocks;
  plan_out[1] = plan.segments;
  plan_out[2] = plan.seg_len;
  return err;
}

// The plan (blocks, segments, seg_len) as rmk_reinforce_plan gave it (or a malformed one: the
// launcher must refuse it).
int64_t rmk_reinforce(int64_t dtype, const void* rw, int64_t r0, int64_t r1, const void* mask, int64_t m0, int64_t m1,
                      const void* baselines, int64_t B, int64_t T, double gamma, int64_t unbiased, double eps,
                      int64_t blocks, int64_t segments, int64_t seg_len, double* workspace, void* adv, void* ret) {
  const ReinforcePlan plan{static_cast<unsigned int>(blocks), segments, seg_len};
  return launch_reinforce(static_cast<DType>(dtype), Strided2D{rw, r0, r1}, Strided2D{mask, m0, m1}, baselines, B, T,
                          gamma, unbiased != 0, eps, plan, workspace, adv, ret, nullptr);
}
}
