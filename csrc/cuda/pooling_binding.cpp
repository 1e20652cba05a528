// Torch bindings of the CUDA pooling kernels: checks, allocation, the current stream, launch.
#include <torch/library.h>

#include "pooling.cuh"
#include "rmkernels/cuda_binding.h"
#include "rmkernels/op_checks.h"

namespace rmkernels {
namespace {

at::Tensor last_token_index_cuda(const at::Tensor& mask) {
  check_dim(mask, "attention_mask", 2);
  TORCH_CHECK_TYPE(!at::isFloatingType(mask.scalar_type()), "the CUDA index kernel takes bool/int masks");
  const c10::cuda::CUDAGuard guard(mask.device());
  auto index = at::empty({mask.size(0)}, mask.options().dtype(at::kLong));
  RMK_CUDA_CHECK(cuda::launch_last_token_index(mask.data_ptr(), static_cast<int>(mask.element_size()),
                                               mask.size(0), mask.size(1), mask.stride(0), mask.stride(1),
                                               index.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return index;
}

struct View {
  int64_t T, H, sB, sT;
};
View view_of(const at::Tensor& h) {
  if (h.dim() == 3) return {h.size(1), h.size(2), h.stride(0), h.stride(1)};
  return {h.size(0), h.size(1), 0, h.stride(0)};
}

at::Tensor last_token_reward_fwd_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& index) {
  check_last_token_args(hidden, weight, bias, index);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t B = index.size(0), K = weight.size(0);
  const View v = view_of(hidden);
  auto rewards = at::empty({B, K}, weight.options());
  RMK_CUDA_CHECK(cuda::launch_last_token_reward_fwd(cuda_dtype(hidden), hidden.data_ptr(), weight.data_ptr(),
                                                    ptr_or_null(bias), index.data_ptr<int64_t>(), rewards.data_ptr(),
                                                    B, v.T, v.H, K, v.sB, v.sT, c10::cuda::getCurrentCUDAStream()));
  return rewards;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> last_token_reward_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& index,
    bool need_hidden, bool need_weight, bool need_bias) {
  check_last_token_args(hidden, weight, std::nullopt, index);
  const int64_t B = index.size(0), K = weight.size(0);
  check_dense(grad, "grad", {B, K}, weight.scalar_type(), hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const View v = view_of(hidden);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor g_hidden = need_hidden ? grad_buffer(hidden) : at::empty({0}, hidden.options());
  at::Tensor g_weight = need_weight ? at::empty({K, v.H}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor g_bias = need_bias ? at::empty({K}, weight.options()) : at::empty({0}, weight.options());
  if (need_hidden) {
    const int64_t gsB = hidden.dim() == 3 ? g_hidden.stride(0) : 0;
    const int64_t gsT = hidden.dim() == 3 ? g_hidden.stride(1) : g_hidden.stride(0);
    RMK_CUDA_CHECK(cuda::launch_last_token_reward_bwd_hidden(cuda_dtype(hidden), grad.data_ptr(), weight.data_ptr(),
                                                             index.data_ptr<int64_t>(), g_hidden.data_ptr(), B, v.T,
                                                             v.H, K, gsB, gsT, stream));
  }
  if (need_weight || need_bias) {
    if (B == 0) {  // nothing to reduce: the kernel is not launched, the sums are zero
      g_weight.zero_();
      g_bias.zero_();
    } else {
      RMK_CUDA_CHECK(cuda::launch_last_token_reward_bwd_params(
          cuda_dtype(hidden), grad.data_ptr(), hidden.data_ptr(), index.data_ptr<int64_t>(),
          need_weight ? g_weight.data_ptr() : nullptr, need_bias ? g_bias.data_ptr() : nullptr, B, v.T, v.H, K, v.sB,
          v.sT, stream));
    }
  }
  return {g_hidden, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CUDA, m) {
  m.impl("last_token_index_kernel", &last_token_index_cuda);
  m.impl("last_token_reward_fwd_kernel", &last_token_reward_fwd_cuda);
  m.impl("last_token_reward_bwd_kernel", &last_token_reward_bwd_cuda);
}

}  // namespace rmkernels
