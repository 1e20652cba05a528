// Torch bindings of the CUDA Bradley-Terry / ranking loss kernels: checks, allocation, the
// current stream, launch.
#include <torch/library.h>

#include "bt_loss.cuh"
#include "rmkernels/cuda_binding.h"
#include "rmkernels/op_checks.h"

namespace rmkernels {
namespace {

at::ScalarType acc_type(const at::Tensor& t) { return acc_scalar_type(t.scalar_type()); }

cuda::BTPairs bt_pairs(const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
                       const std::optional<at::Tensor>& weights, double margin_value, double weight_value,
                       double label_smoothing, double center_coef) {
  check_dim(chosen, "chosen", 1);
  check_float_input(chosen, "chosen");
  check_shape(rejected, "rejected", chosen.sizes());
  check_same_dtype(rejected, "rejected", chosen, "chosen");
  check_device(rejected, "rejected", chosen.device());
  check_dense(margin, "margin", {chosen.size(0)}, acc_type(chosen), chosen.device());
  check_dense(weights, "weights", {chosen.size(0)}, acc_type(chosen), chosen.device());
  check_bt_options(margin_value, weight_value, label_smoothing, center_coef);
  return {chosen.data_ptr(), rejected.data_ptr(), chosen.stride(0), rejected.stride(0), ptr_or_null(margin),
          ptr_or_null(weights), margin_value, weight_value, label_smoothing, center_coef, chosen.size(0)};
}

codes::Reduction reduction_of(int64_t code) {
  check_code(code, "reduction", codes::kReduceNone, codes::kReduceSum);
  return static_cast<codes::Reduction>(code);
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
  auto loss = red == codes::kReduceNone ? at::empty({chosen.size(0)}, opts) : at::empty({}, opts);
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
  if (red == codes::kReduceNone) {
    check_dense(grad, "grad", {B}, acc_type(chosen), chosen.device());
  } else {
    check_defined(grad, "grad");
    TORCH_CHECK_VALUE(grad.numel() == 1, "grad of a reduced loss must have one element, got shape ", grad.sizes());
    check_dtype(grad, "grad", acc_type(chosen));
    check_device(grad, "grad", chosen.device());
  }
  auto g_c = at::empty({need_chosen ? B : 0}, chosen.options());
  auto g_r = at::empty({need_rejected ? B : 0}, chosen.options());
  RMK_CUDA_CHECK(cuda::launch_bt_loss_bwd(cuda_dtype(chosen), pairs, red, grad.data_ptr(),
                                          need_chosen ? g_c.data_ptr() : nullptr,
                                          need_rejected ? g_r.data_ptr() : nullptr,
                                          c10::cuda::getCurrentCUDAStream()));
  return {g_c, g_r};
}

const int64_t* candidates_ptr(const std::optional<at::Tensor>& nc, int64_t B, const at::Device& dev) {
  if (!nc.has_value()) return nullptr;
  check_dense(*nc, "num_candidates", {B}, at::kLong, dev);
  return nc->data_ptr<int64_t>();
}

void check_rewards(const at::Tensor& rewards) {
  check_dim(rewards, "rewards", 2);
  check_float_input(rewards, "rewards");
}

at::Tensor ranking_loss_fwd_cuda(const at::Tensor& rewards, const std::optional<at::Tensor>& num_candidates) {
  check_rewards(rewards);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.size(0), K = rewards.size(1);
  auto out = at::empty({B}, rewards.options().dtype(acc_type(rewards)));
  RMK_CUDA_CHECK(cuda::launch_ranking_loss_fwd(cuda_dtype(rewards), rewards.data_ptr(),
                                               candidates_ptr(num_candidates, B, rewards.device()), B, K, rewards.stride(0),
                                               rewards.stride(1), out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor ranking_loss_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& rewards,
                                 const std::optional<at::Tensor>& num_candidates) {
  check_rewards(rewards);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.size(0), K = rewards.size(1);
  check_dense(grad_rows, "grad_rows", {B}, acc_type(rewards), rewards.device());
  auto out = at::empty({B, K}, rewards.options());
  RMK_CUDA_CHECK(cuda::launch_ranking_loss_bwd(cuda_dtype(rewards), grad_rows.data_ptr(), rewards.data_ptr(),
                                               candidates_ptr(num_candidates, B, rewards.device()), B, K, rewards.stride(0),
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
