// Torch bindings of the CUDA group-advantage kernels: checks, allocation, the current stream,
// launch (no host synchronisation: the workspace is zeroed on the stream).
#include <torch/library.h>

#include "group_adv.cuh"
#include "rmkernels/codes.h"
#include "rmkernels/cuda_binding.h"
#include "rmkernels/op_checks.h"

namespace rmkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> group_advantages_cuda(const at::Tensor& scores, const at::Tensor& group_ids,
                                                         const at::Tensor& mask, int64_t estimator, double eps,
                                                         bool unbiased, int64_t single, double f_norm) {
  check_group_advantages_args(scores, group_ids, mask, estimator, single);
  const int64_t B = scores.size(0);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t T = mask.size(1);
  const auto s = scores.contiguous();
  const auto ids = group_ids.contiguous();
  auto seq = at::empty({B}, s.options());
  auto adv = at::empty({B, T}, s.options());
  auto stats = at::empty({B * 5 + 1}, s.options().dtype(at::kDouble));
  RMK_CUDA_CHECK(cuda::launch_group_advantages(cuda_dtype(s), s.data_ptr(), ids.data_ptr<int64_t>(),
                                               mask.data_ptr<bool>(), B, T, mask.stride(0), mask.stride(1), estimator,
                                               eps, unbiased, single, f_norm, stats.data_ptr<double>(), seq.data_ptr(),
                                               adv.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return {seq, adv};
}

at::Tensor reinforce_pp_returns_cuda(const at::Tensor& rewards, const at::Tensor& mask, double gamma) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, T], got ", rewards.sizes());
  TORCH_CHECK(mask.sizes() == rewards.sizes() && mask.scalar_type() == at::kBool,
              "mask must be bool with rewards' shape ", rewards.sizes(), ", got ", mask.scalar_type(), " ",
              mask.sizes());
  const c10::cuda::CUDAGuard guard(rewards.device());
  const auto acc = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty(rewards.sizes(), rewards.options().dtype(acc));
  RMK_CUDA_CHECK(cuda::launch_reinforce_pp_returns(cuda_dtype(rewards), rewards.data_ptr(), rewards.stride(0),
                                                   rewards.stride(1), mask.data_ptr<bool>(), mask.stride(0),
                                                   mask.stride(1), rewards.size(0), rewards.size(1), gamma,
                                                   out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CUDA, m) {
  m.impl("group_advantages_kernel", &group_advantages_cuda);
  m.impl("reinforce_pp_returns_kernel", &reinforce_pp_returns_cuda);
}

}  // namespace rmkernels
