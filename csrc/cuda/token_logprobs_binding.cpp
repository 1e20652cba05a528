// Torch binding of the CUDA token log-probs / entropy (docs/ops.md section 6): the chunk driver
// (rmkernels/token_logprobs_chunks.h) with cuBLAS GEMMs through ATen (bf16/fp16 operands on
// tensor cores with float32 output: at::mm's out_dtype) and the element-wise passes of
// token_logprobs.cu, on the current stream. Targets are not checked here (that would need a
// device-to-host copy): an out-of-range one gives a NaN log-prob and is never read.
#include <torch/library.h>

#include "rmkernels/cuda_binding.h"
#include "rmkernels/token_logprobs_chunks.h"
#include "token_logprobs.cuh"

namespace rmkernels {
namespace {

template <typename acc>
cuda::DType acc_tag() {
  return std::is_same<acc, double>::value ? cuda::DType::kFloat64 : cuda::DType::kFloat32;
}

struct CudaTiles {
  static constexpr bool kNativeLowpGemm = true;

  template <typename acc>
  static void stats(const lp::StatsArgs<acc>& a) {
    RMK_CUDA_CHECK(cuda::launch_lp_stats(acc_tag<acc>(), a.tile, a.rows, a.cols, a.bias, a.inv_temp, a.targets, a.v0,
                                         a.first, a.m, a.s, a.u, a.zt, c10::cuda::getCurrentCUDAStream()));
  }

  template <typename acc>
  static void grad_logits(const lp::GradArgs<acc>& a) {
    RMK_CUDA_CHECK(cuda::launch_lp_grad_logits(acc_tag<acc>(), a.tile, a.rows, a.cols, a.bias, a.inv_temp, a.targets,
                                               a.v0, a.vocab, a.ignore_index, a.lse, a.entropy, a.gl, a.ge,
                                               c10::cuda::getCurrentCUDAStream()));
  }

  // Unknown without a device-to-host copy: the driver masks every chunk's dropped rows.
  static bool dropped_rows_finite(const at::Tensor&, const at::Tensor&) { return false; }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cuda(const at::Tensor& hidden,
                                                                       const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       const at::Tensor& targets, double temperature,
                                                                       int64_t ignore_index, int64_t tc, int64_t vc) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return lp::forward<CudaTiles>(hidden, weight, bias, targets, temperature, ignore_index, tc, vc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_bwd_cuda(
    const at::Tensor& grad_lp, const std::optional<at::Tensor>& grad_ent, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t tc, int64_t vc, bool need_hidden,
    bool need_weight, bool need_bias) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return lp::backward<CudaTiles>(grad_lp, grad_ent, hidden, weight, bias, targets, lse, entropy, temperature,
                                 ignore_index, tc, vc, need_hidden, need_weight, need_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CUDA, m) {
  m.impl("token_logprobs_fwd_kernel", &token_logprobs_fwd_cuda);
  m.impl("token_logprobs_bwd_kernel", &token_logprobs_bwd_cuda);
}

}  // namespace rmkernels
