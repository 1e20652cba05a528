// Torch binding of the CUDA REINFORCE-family kernel: checks, allocation, the current stream,
// launch (no host synchronisation: the kernel zeroes its workspace itself; one cooperative launch;
// the plan splits the rows of a batch of few long rows, reinforce.cuh).
#include <torch/library.h>

#include "reinforce.cuh"
#include "rmkernels/cuda_binding.h"
#include "rmkernels/op_checks.h"

namespace rmkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> reinforce_cuda(const at::Tensor& rewards, const at::Tensor& mask,
                                                  const std::optional<at::Tensor>& baselines, double gamma,
                                                  bool unbiased, double eps) {
  check_reinforce_args(rewards, mask, baselines, gamma, eps);
  TORCH_CHECK_VALUE(rewards.is_cuda(), "token_rewards must be a CUDA tensor, got ", rewards.device());
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto opts = rewards.options().dtype(acc_scalar_type(rewards.scalar_type()));
  auto adv = at::empty({B, T}, opts);
  auto ret = at::empty({B, T}, opts);
  const bool remax = baselines.has_value();
  cuda::ReinforcePlan plan;
  RMK_CUDA_CHECK(cuda::reinforce_plan(cuda_dtype(rewards), remax, B, T, cuda::kReinforceSegmentT, &plan));
  const int64_t n_ws = cuda::reinforce_workspace(B, plan, remax);
  at::Tensor ws;
  if (n_ws > 0) ws = at::empty({n_ws}, opts.dtype(at::kDouble));
  RMK_CUDA_CHECK(cuda::launch_reinforce(
      cuda_dtype(rewards), {rewards.data_ptr(), rewards.stride(0), rewards.stride(1)},
      {mask.data_ptr(), mask.stride(0), mask.stride(1)}, remax ? baselines->data_ptr() : nullptr, B, T, gamma,
      unbiased, eps, plan, ws.defined() ? ws.data_ptr<double>() : nullptr, adv.data_ptr(), ret.data_ptr(),
      c10::cuda::getCurrentCUDAStream()));
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CUDA, m) {
  m.impl("reinforce_kernel", &reinforce_cuda);
}

}  // namespace rmkernels
