// Torch bindings of the CUDA PPO kernels: checks, allocation, the current stream, launch.
// No host synchronisation: the statistics stay on the device (CUDA-graph capturable).
#include <torch/library.h>

#include "ppo.cuh"
#include "rmkernels/codes.h"
#include "rmkernels/cuda_binding.h"
#include "rmkernels/op_checks.h"

namespace rmkernels {
namespace {

// Blocks per row of the GAE kernels: the segment policy of codes.h (codes::num_gae_segments).
int64_t num_segments(int64_t B, int64_t T, const at::Device& dev) {
  if (T < 2 * codes::kSegmentT) return 1;  // no device query needed
  int sms = 0;  // a device attribute query: no synchronisation, allowed during graph capture
  RMK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev.index()));
  return codes::num_gae_segments(B, T, sms);
}

// Scratch of the segmented scan (n_seg > 1), owned by the caller for the launch's duration.
struct SegmentScratch {
  at::Tensor agg, seg_last, carry, last;
  cuda::PPOSegments seg;
  SegmentScratch(int64_t B, int64_t n_seg, const at::TensorOptions& acc_opts) {
    seg = {n_seg, codes::kSegmentT, nullptr, nullptr, nullptr, nullptr};
    if (n_seg == 1) return;
    agg = at::empty({B, n_seg, 4}, acc_opts);
    carry = at::empty({B, n_seg, 2}, acc_opts);
    seg_last = at::empty({B, n_seg}, acc_opts.dtype(at::kLong));
    last = at::empty({B}, acc_opts.dtype(at::kLong));
    seg = {n_seg, codes::kSegmentT, agg.data_ptr(), seg_last.data_ptr<int64_t>(), carry.data_ptr(),
           last.data_ptr<int64_t>()};
  }
};

cuda::Strided2D strided(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

void check_stats(const at::Tensor& t, const char* name, int64_t n, const at::Device& dev) {
  check_dense(t, name, {n}, at::kDouble, dev);
}

// The checks of the PPO family's CUDA kernel ops (op_checks.h): the main input on a CUDA device.
void check_main(const at::Tensor& t, const char* name) { check_ppo_main(t, name, /*cuda=*/true); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_gae_cuda(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& values, const at::Tensor& scores,
    const at::Tensor& mask, double kl_coef, double gamma, double lam, int64_t estimator, double x_clamp,
    double kl_clamp, double score_clip) {
  check_ppo_gae_args(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, estimator, x_clamp, kl_clamp,
                     score_clip, /*cuda=*/true);
  const int64_t B = values.size(0), T = values.size(1);
  const auto dev = values.device();
  const auto acc = acc_scalar_type(values.scalar_type());
  const c10::cuda::CUDAGuard guard(dev);
  auto opts = values.options().dtype(acc);
  auto adv = at::empty({B, T}, opts), ret = at::empty({B, T}, opts);
  auto rew = at::empty({B, T}, opts), kl = at::empty({B, T}, opts);
  const int64_t n_seg = num_segments(B, T, dev);
  auto stats = at::empty({B, n_seg, 2}, values.options().dtype(at::kDouble));
  SegmentScratch scratch(B, n_seg, opts);
  const cuda::PPOGaeParams p{kl_coef, gamma, lam, static_cast<int>(estimator), x_clamp, kl_clamp, score_clip};
  RMK_CUDA_CHECK(cuda::launch_ppo_gae(cuda_dtype(values), strided(logprobs), strided(ref_logprobs), strided(values),
                                      scores.data_ptr(), strided(mask), B, T, p, adv.data_ptr(), ret.data_ptr(),
                                      rew.data_ptr(), kl.data_ptr(), stats.data_ptr<double>(), scratch.seg,
                                      c10::cuda::getCurrentCUDAStream()));
  if (n_seg > 1) stats = stats.sum(1);  // per-row partials for the whitening (deterministic)
  else stats = stats.view({B, 2});
  return {adv, ret, rew, kl, stats};
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam, bool returns) {
  check_gae_args(rewards, values, mask, gamma, lam, /*cuda=*/true);
  const int64_t B = values.size(0), T = values.size(1);
  const auto dev = values.device();
  const c10::cuda::CUDAGuard guard(dev);
  auto opts = values.options().dtype(acc_scalar_type(values.scalar_type()));
  auto adv = at::empty({B, T}, opts);
  auto ret = returns ? at::empty({B, T}, opts) : at::empty({0}, opts);  // without returns: [0], not written
  const int64_t n_seg = num_segments(B, T, dev);
  SegmentScratch scratch(B, n_seg, opts);
  RMK_CUDA_CHECK(cuda::launch_gae(cuda_dtype(values), strided(rewards), strided(values), strided(mask), B, T, gamma,
                                  lam, adv.data_ptr(), returns ? ret.data_ptr() : nullptr, scratch.seg,
                                  c10::cuda::getCurrentCUDAStream()));
  return {adv, ret};
}

at::Tensor kl_estimate_cuda(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                            const std::optional<at::Tensor>& mask, int64_t estimator, double x_clamp,
                            double kl_clamp) {
  check_main(logprobs, "logprobs");
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto dev = logprobs.device();
  check_ppo_like(ref_logprobs, "ref_logprobs", logprobs, "logprobs");
  if (mask.has_value()) check_bool_mask(*mask, "mask", B, T, dev);
  check_kl_options(estimator, x_clamp, kl_clamp);
  const c10::cuda::CUDAGuard guard(dev);
  auto kl = at::empty({B, T}, logprobs.options().dtype(acc_scalar_type(logprobs.scalar_type())));
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  RMK_CUDA_CHECK(cuda::launch_kl_estimate(cuda_dtype(logprobs), strided(logprobs), strided(ref_logprobs), m,
                                          mask.has_value() ? mask->stride(0) : 0,
                                          mask.has_value() ? mask->stride(1) : 0, B, T, static_cast<int>(estimator),
                                          x_clamp, kl_clamp, kl.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return kl;
}

at::Tensor masked_row_stats_cuda(const at::Tensor& x, const at::Tensor& mask) {
  check_ppo_x_mask(x, mask, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stats = at::empty({x.size(0), 2}, x.options().dtype(at::kDouble));
  RMK_CUDA_CHECK(cuda::launch_masked_row_stats(cuda_dtype(x), strided(x), strided(mask), x.size(0), x.size(1),
                                               stats.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()));
  return stats;
}

at::Tensor masked_centered_sq_cuda(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& totals) {
  check_ppo_x_mask(x, mask, /*cuda=*/true);
  check_stats(totals, "totals", 2, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kDouble));
  RMK_CUDA_CHECK(cuda::launch_masked_centered_sq(cuda_dtype(x), strided(x), strided(mask), x.size(0), x.size(1),
                                                 totals.data_ptr<double>(), out.data_ptr<double>(),
                                                 c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor masked_whiten_apply_cuda(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& totals,
                                    const at::Tensor& sq, bool shift_mean, bool unbiased, double eps) {
  check_ppo_x_mask(x, mask, /*cuda=*/true);
  check_stats(totals, "totals", 2, x.device());
  check_stats(sq, "sq", 1, x.device());
  check_nonneg_option(eps, "eps");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_scalar_type(x.scalar_type())));
  RMK_CUDA_CHECK(cuda::launch_masked_whiten_apply(cuda_dtype(x), strided(x), strided(mask), x.size(0), x.size(1),
                                                  totals.data_ptr<double>(), sq.data_ptr<double>(), shift_mean,
                                                  unbiased, eps, out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CUDA, m) {
  m.impl("ppo_gae_kernel", &ppo_gae_cuda);
  m.impl("gae_kernel", &gae_cuda);
  m.impl("kl_estimate_kernel", &kl_estimate_cuda);
  m.impl("masked_row_stats_kernel", &masked_row_stats_cuda);
  m.impl("masked_centered_sq_kernel", &masked_centered_sq_cuda);
  m.impl("masked_whiten_apply_kernel", &masked_whiten_apply_cuda);
}

}  // namespace rmkernels
