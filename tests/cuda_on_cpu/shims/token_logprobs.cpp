// C entry points of csrc/cuda/token_logprobs.cuh's launchers for the CUDA-on-CPU tests (called
// with ctypes: parameters are int64_t, double or pointers only; each returns the cudaError_t).
#include "../../../csrc/cuda/token_logprobs.cuh"

using namespace rmkernels::cuda;

extern "C" {
int64_t rmk_lp_stats(int64_t acc, const void* tile, int64_t rows, int64_t cols, const void* bias, double inv_temp,
                     const int64_t* targets, int64_t v0, int64_t first, void* m, void* s, void* u, void* zt) {
  return launch_lp_stats(static_cast<DType>(acc), tile, rows, cols, bias, inv_temp, targets, v0, first != 0, m, s, u,
                         zt, nullptr);
}
int64_t rmk_lp_grad_logits(int64_t acc, void* tile, int64_t rows, int64_t cols, const void* bias, double inv_temp,
                           const int64_t* targets, int64_t v0, int64_t vocab, int64_t ignore_index, const void* lse,
                           const void* entropy, const void* gl, const void* ge) {
  return launch_lp_grad_logits(static_cast<DType>(acc), tile, rows, cols, bias, inv_temp, targets, v0, vocab,
                               ignore_index, lse, entropy, gl, ge, nullptr);
}
}
