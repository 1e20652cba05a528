// Torch binding of the CUDA group-advantage kernels: checks, allocation, the current stream,
// launch (no host synchronisation: the kernel zeroes its workspace itself; one cooperative launch).
#include <torch/library.h>

#include "group_adv.cuh"
#include "rmkernels/codes.h"
#include "rmkernels/cuda_binding.h"
#include "rmkernels/op_checks.h"

namespace rmkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> group_advantages_cuda(const at::Tensor& scores, const at::Tensor& group_ids,
                                                         const at::Tensor& mask, int64_t estimator, double eps,
                                                         bool unbiased, int64_t single, double f_norm,
                                                         double whiten_eps) {
  check_group_advantages_args(scores, group_ids, mask, estimator, single, eps, f_norm, whiten_eps);
  const int64_t B = scores.size(0);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t T = mask.size(1);
  const auto s = scores.contiguous();
  const auto ids = group_ids.contiguous();
  auto seq = at::empty({B}, s.options());
  auto adv = at::empty({B, T}, s.options());
  auto stats = at::empty({cuda::group_advantages_workspace(B)}, s.options().dtype(at::kDouble));
  RMK_CUDA_CHECK(cuda::launch_group_advantages(cuda_dtype(s), s.data_ptr(), ids.data_ptr<int64_t>(),
                                               mask.data_ptr<bool>(), B, T, mask.stride(0), mask.stride(1), estimator,
                                               eps, unbiased, single, f_norm, whiten_eps, stats.data_ptr<double>(),
                                               seq.data_ptr(),
                                               adv.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return {seq, adv};
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CUDA, m) {
  m.impl("group_advantages_kernel", &group_advantages_cuda);
}

}  // namespace rmkernels
