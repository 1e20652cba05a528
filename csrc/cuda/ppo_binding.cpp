// Torch bindings of the CUDA PPO kernels: checks, allocation, the current stream, launch.
// No host synchronisation: the statistics stay on the device (CUDA-graph capturable).
#include <torch/library.h>

#include "ppo.cuh"
#include "rmkernels/cuda_binding.h"

namespace rmkernels {
namespace {

// Long rows are split into segments of this many positions (one block each) when the batch
// has fewer than 2 rows per SM: gae-xl (B = 32, T = 32768) then runs 256 blocks, not 32.
// 4096 positions = 4 chunks of the block walk, enough to amortise the 3 launches.
constexpr int64_t kSegmentT = 4096;

int64_t num_segments(int64_t B, int64_t T, const at::Device& dev) {
  if (T < 2 * kSegmentT) return 1;
  int sms = 0;  // a device attribute query: no synchronisation, allowed during graph capture
  RMK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev.index()));
  if (B >= 2 * static_cast<int64_t>(sms)) return 1;
  return (T + kSegmentT - 1) / kSegmentT;
}

cuda::Strided2D strided(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_bt(const at::Tensor& t, const char* name, int64_t B, int64_t T, const at::Device& dev) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T, name, " must be [B, T] = [", B, ", ", T, "], got ",
              t.sizes());
  TORCH_CHECK(t.device() == dev, name, " must be on ", dev, ", got ", t.device());
}

void check_stats(const at::Tensor& t, const char* name, int64_t n, const at::Device& dev) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kDouble && t.is_contiguous() &&
                  t.device() == dev,
              name, " must be a contiguous float64 [", n, "] tensor on ", dev, ", got ", t.sizes(), " ",
              t.scalar_type(), " on ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_gae_cuda(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& values, const at::Tensor& scores,
    const at::Tensor& mask, double kl_coef, double gamma, double lam, int64_t estimator, double x_clamp,
    double kl_clamp, double score_clip) {
  TORCH_CHECK(values.dim() == 2, "values must be [B, T]");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t B = values.size(0), T = values.size(1);
  const auto dev = values.device();
  check_bt(logprobs, "logprobs", B, T, dev);
  check_bt(ref_logprobs, "ref_logprobs", B, T, dev);
  check_bt(mask, "mask", B, T, dev);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool (the Python layer converts it)");
  TORCH_CHECK(logprobs.scalar_type() == values.scalar_type() && ref_logprobs.scalar_type() == values.scalar_type(),
              "logprobs, ref_logprobs and values must share one dtype");
  TORCH_CHECK(estimator >= 0 && estimator <= 3, "unknown KL estimator code ", estimator);
  const auto acc = acc_type_of(values);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == B && scores.scalar_type() == acc && scores.is_contiguous() &&
                  scores.device() == dev,
              "scores must be a contiguous [B] tensor in the arithmetic dtype on ", dev);
  auto opts = values.options().dtype(acc);
  auto adv = at::empty({B, T}, opts), ret = at::empty({B, T}, opts);
  auto rew = at::empty({B, T}, opts), kl = at::empty({B, T}, opts);
  const int64_t n_seg = num_segments(B, T, dev);
  auto stats = at::empty({B, n_seg, 2}, values.options().dtype(at::kDouble));
  cuda::PPOSegments seg{n_seg, kSegmentT, nullptr, nullptr, nullptr, nullptr};
  at::Tensor agg, seg_last, carry, last;
  if (n_seg > 1) {
    agg = at::empty({B, n_seg, 4}, opts);
    carry = at::empty({B, n_seg, 2}, opts);
    seg_last = at::empty({B, n_seg}, values.options().dtype(at::kLong));
    last = at::empty({B}, values.options().dtype(at::kLong));
    seg = {n_seg, kSegmentT, agg.data_ptr(), seg_last.data_ptr<int64_t>(), carry.data_ptr(), last.data_ptr<int64_t>()};
  }
  const cuda::PPOGaeParams p{kl_coef, gamma, lam, static_cast<int>(estimator), x_clamp, kl_clamp, score_clip};
  RMK_CUDA_CHECK(cuda::launch_ppo_gae(cuda_dtype(values), strided(logprobs), strided(ref_logprobs), strided(values),
                                      scores.data_ptr(), strided(mask), B, T, p, adv.data_ptr(), ret.data_ptr(),
                                      rew.data_ptr(), kl.data_ptr(), stats.data_ptr<double>(), seg,
                                      c10::cuda::getCurrentCUDAStream()));
  if (n_seg > 1) stats = stats.sum(1);  // per-row partials for the whitening (deterministic)
  else stats = stats.view({B, 2});
  return {adv, ret, rew, kl, stats};
}

void check_x_mask(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2, "x must be [B, T], got ", x.sizes());
  check_bt(mask, "mask", x.size(0), x.size(1), x.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool (the Python layer converts it)");
}

at::Tensor masked_row_stats_cuda(const at::Tensor& x, const at::Tensor& mask) {
  check_x_mask(x, mask);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stats = at::empty({x.size(0), 2}, x.options().dtype(at::kDouble));
  RMK_CUDA_CHECK(cuda::launch_masked_row_stats(cuda_dtype(x), strided(x), strided(mask), x.size(0), x.size(1),
                                               stats.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()));
  return stats;
}

at::Tensor masked_centered_sq_cuda(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& totals) {
  check_x_mask(x, mask);
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
  check_x_mask(x, mask);
  check_stats(totals, "totals", 2, x.device());
  check_stats(sq, "sq", 1, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_type_of(x)));
  RMK_CUDA_CHECK(cuda::launch_masked_whiten_apply(cuda_dtype(x), strided(x), strided(mask), x.size(0), x.size(1),
                                                  totals.data_ptr<double>(), sq.data_ptr<double>(), shift_mean,
                                                  unbiased, eps, out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CUDA, m) {
  m.impl("ppo_gae_kernel", &ppo_gae_cuda);
  m.impl("masked_row_stats_kernel", &masked_row_stats_cuda);
  m.impl("masked_centered_sq_kernel", &masked_centered_sq_cuda);
  m.impl("masked_whiten_apply_kernel", &masked_whiten_apply_cuda);
}

}  // namespace rmkernels
