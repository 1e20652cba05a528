// Torch bindings of the CUDA Bradley-Terry / ranking loss kernels: checks, allocation, the
// current stream, launch.
#include <torch/library.h>

#include "bt_loss.cuh"
#include "rmkernels/cuda_binding.h"

namespace rmkernels {
namespace {

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

cuda::BTPairs bt_pairs(const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
                       const std::optional<at::Tensor>& weights, double margin_value, double weight_value,
                       double label_smoothing, double center_coef) {
  TORCH_CHECK(chosen.dim() == 1 && rejected.dim() == 1 && chosen.size(0) == rejected.size(0),
              "chosen and rejected must be [B] tensors of one B");
  TORCH_CHECK(chosen.scalar_type() == rejected.scalar_type(), "chosen and rejected must have one dtype");
  for (const auto* t : {&margin, &weights}) {
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == acc_type(chosen) && (*t)->is_contiguous() &&
                                    (*t)->numel() == chosen.size(0)),
                "margin / weights must be contiguous [B] tensors in the arithmetic dtype");
  }
  return {chosen.data_ptr(), rejected.data_ptr(), chosen.stride(0), rejected.stride(0), ptr_or_null(margin),
          ptr_or_null(weights), margin_value, weight_value, label_smoothing, center_coef, chosen.size(0)};
}

cuda::Reduction reduction_of(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 2, "reduction code must be 0 (none), 1 (mean) or 2 (sum), got ", code);
  return static_cast<cuda::Reduction>(code);
}

at::Tensor bt_loss_fwd_cuda(const at::Tensor& chosen, const at::Tensor& rejected,
                            const std::optional<at::Tensor>& margin, const std::optional<at::Tensor>& weights,
                            double margin_value, double weight_value, double label_smoothing, double center_coef,
                            int64_t reduction) {
  const c10::cuda::CUDAGuard guard(chosen.device());
  const auto pairs = bt_pairs(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                              center_coef);
  const auto red = reduction_of(reduction);
  auto opts = chosen.options().dtype(acc_type(chosen));
  auto loss = red == cuda::Reduction::kNone ? at::empty({chosen.size(0)}, opts) : at::empty({}, opts);
  RMK_CUDA_CHECK(cuda::launch_bt_loss_fwd(cuda_dtype(chosen), pairs, red, loss.data_ptr(),
                                          c10::cuda::getCurrentCUDAStream()));
  return loss;
}

std::tuple<at::Tensor, at::Tensor> bt_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& chosen,
                                                    const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
                                                    const std::optional<at::Tensor>& weights, double margin_value,
                                                    double weight_value, double label_smoothing, double center_coef,
                                                    int64_t reduction, bool need_chosen, bool need_rejected) {
  const c10::cuda::CUDAGuard guard(chosen.device());
  const auto pairs = bt_pairs(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                              center_coef);
  const auto red = reduction_of(reduction);
  const int64_t B = chosen.size(0);
  TORCH_CHECK(grad.scalar_type() == acc_type(chosen) && grad.is_contiguous() &&
                  grad.numel() == (red == cuda::Reduction::kNone ? B : 1),
              "grad must be contiguous, in the arithmetic dtype, one element per loss element");
  auto g_c = at::empty({need_chosen ? B : 0}, chosen.options());
  auto g_r = at::empty({need_rejected ? B : 0}, chosen.options());
  RMK_CUDA_CHECK(cuda::launch_bt_loss_bwd(cuda_dtype(chosen), pairs, red, grad.data_ptr(),
                                          need_chosen ? g_c.data_ptr() : nullptr,
                                          need_rejected ? g_r.data_ptr() : nullptr,
                                          c10::cuda::getCurrentCUDAStream()));
  return {g_c, g_r};
}

const int64_t* candidates_ptr(const std::optional<at::Tensor>& nc, int64_t B) {
  if (!nc.has_value()) return nullptr;
  TORCH_CHECK(nc->scalar_type() == at::kLong && nc->is_contiguous() && nc->dim() == 1 && nc->size(0) == B,
              "num_candidates must be a contiguous int64 [B] tensor");
  return nc->data_ptr<int64_t>();
}

at::Tensor ranking_loss_fwd_cuda(const at::Tensor& rewards, const std::optional<at::Tensor>& num_candidates) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, K]");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.size(0), K = rewards.size(1);
  auto out = at::empty({B}, rewards.options().dtype(acc_type(rewards)));
  RMK_CUDA_CHECK(cuda::launch_ranking_loss_fwd(cuda_dtype(rewards), rewards.data_ptr(),
                                               candidates_ptr(num_candidates, B), B, K, rewards.stride(0),
                                               rewards.stride(1), out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor ranking_loss_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& rewards,
                                 const std::optional<at::Tensor>& num_candidates) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, K]");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.size(0), K = rewards.size(1);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == B && grad_rows.is_contiguous() &&
                  grad_rows.scalar_type() == acc_type(rewards),
              "grad_rows must be a contiguous [B] tensor in the arithmetic dtype");
  auto out = at::empty({B, K}, rewards.options());
  RMK_CUDA_CHECK(cuda::launch_ranking_loss_bwd(cuda_dtype(rewards), grad_rows.data_ptr(), rewards.data_ptr(),
                                               candidates_ptr(num_candidates, B), B, K, rewards.stride(0),
                                               rewards.stride(1), out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CUDA, m) {
  m.impl("bt_loss_fwd_kernel", &bt_loss_fwd_cuda);
  m.impl("bt_loss_bwd_kernel", &bt_loss_bwd_cuda);
  m.impl("ranking_loss_fwd_kernel", &ranking_loss_fwd_cuda);
  m.impl("ranking_loss_bwd_kernel", &ranking_loss_bwd_cuda);
}

}  // namespace rmkernels
