// C entry points of csrc/cuda/pooling.cuh's launchers for the CUDA-on-CPU tests (called with
// ctypes: parameters are int64_t, double or pointers only; each returns the cudaError_t).
#include "../../../csrc/cuda/pooling.cuh"

using namespace rmkernels::cuda;

extern "C" {
int64_t rmk_last_token_index(const void* mask, int64_t elem_bytes, int64_t B, int64_t T, int64_t s0, int64_t s1,
                             int64_t* index) {
  return launch_last_token_index(mask, static_cast<int>(elem_bytes), B, T, s0, s1, index, nullptr);
}
int64_t rmk_last_token_reward_fwd(int64_t dtype, const void* hidden, const void* weight, const void* bias,
                                  const int64_t* index, void* rewards, int64_t B, int64_t T, int64_t H, int64_t K,
                                  int64_t sB, int64_t sT) {
  return launch_last_token_reward_fwd(static_cast<DType>(dtype), hidden, weight, bias, index, rewards, B, T, H, K, sB,
                                      sT, nullptr);
}
int64_t rmk_last_token_reward_bwd_hidden(int64_t dtype, const void* grad, const void* weight, const int64_t* index,
                                         void* grad_hidden, int64_t B, int64_t T, int64_t H, int64_t K, int64_t gsB,
                                         int64_t gsT) {
  return launch_last_token_reward_bwd_hidden(static_cast<DType>(dtype), grad, weight, index, grad_hidden, B, T, H, K,
                                             gsB, gsT, nullptr);
}
int64_t rmk_last_token_reward_bwd_params(int64_t dtype, const void* grad, const void* hidden, const int64_t* index,
                                         void* grad_weight, void* grad_bias, int64_t B, int64_t T, int64_t H, int64_t K,
                                         int64_t sB, int64_t sT) {
  return launch_last_token_reward_bwd_params(static_cast<DType>(dtype), grad, hidden, index, grad_weight, grad_bias, B,
                                             T, H, K, sB, sT, nullptr);
}
}
