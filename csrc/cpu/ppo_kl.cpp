// C++ CPU kernel of the per-token KL estimate (docs/ops.md section 4): ppo_gae_kernel's KL pass.
//
//   kl_estimate_kernel(lp, ref, mask?, estimator, x_clamp, kl_clamp) -> kl
#include "ppo_common.h"

namespace rmkernels {
namespace {

// The per-token KL estimate (docs/ops.md section 4): ppo_gae_kernel's KL pass; 0 where mask is 0.
at::Tensor kl_estimate_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                           const std::optional<at::Tensor>& mask, int64_t estimator, double x_clamp,
                           double kl_clamp) {
  check_main(logprobs, "logprobs");
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  check_ppo_like(ref_logprobs, "ref_logprobs", logprobs, "logprobs");
  if (mask.has_value()) check_bool_mask(*mask, "mask", B, T, logprobs.device());
  check_kl_options(estimator, x_clamp, kl_clamp);
  OutputPages pages;  // the [B, T] outputs in huge pages while they are written (cpu_common.h)
  auto kl = pages.empty({B, T}, logprobs.options().dtype(acc_scalar_type(logprobs.scalar_type())));
  if (B == 0 || T == 0) return kl;
  RMK_DISPATCH_FLOATS(logprobs.scalar_type(), "kl_estimate_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc xc = static_cast<acc>(x_clamp), kc = static_cast<acc>(kl_clamp);
    const scalar_t* lp = logprobs.data_ptr<scalar_t>();
    const scalar_t* rf = ref_logprobs.data_ptr<scalar_t>();
    const Strides2 slp = strides_of(logprobs), srf = strides_of(ref_logprobs);
    const uint8_t* m = mask.has_value() ? mask_bytes(*mask) : nullptr;
    const Strides2 sm = mask.has_value() ? strides_of(*mask) : Strides2{0, 0};
    acc* out = kl.data_ptr<acc>();
    with_estimator(estimator, [&](auto est) {
      constexpr int64_t kEst = decltype(est)::value;
      at::parallel_for(0, B, grain_of(T), [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          if (m) {
            kl_of_row<kEst, true, false, scalar_t>(lp, slp, rf, srf, m, sm, b, T, acc(0), xc, kc, out, nullptr);
          } else {
            kl_of_row<kEst, false, false, scalar_t>(lp, slp, rf, srf, m, sm, b, T, acc(0), xc, kc, out, nullptr);
          }
        }
      });
    });
  });
  return kl;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CPU, m) {
  m.impl("kl_estimate_kernel", &kl_estimate_cpu);
}

}  // namespace rmkernels
