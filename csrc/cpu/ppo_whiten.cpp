// C++ CPU kernels of masked_whiten (docs/ops.md section 3): per-row partials, then the
// element-wise apply.
//
//   masked_row_stats_kernel(x, mask)                   -> [B, 2] float64 (count, sum)
//   masked_centered_sq_kernel(x, mask, totals)         -> [B] float64 sum (x - mean)^2
//   masked_whiten_apply_kernel(x, mask, totals, sq, shift_mean, unbiased, eps) -> whitened x
#include "ppo_common.h"

namespace rmkernels {
namespace {

template <typename scalar_t>
void row_stats_impl(const scalar_t* x, Strides2 sx, const uint8_t* mask, Strides2 sm, int64_t B, int64_t T,
                    double* stats) {
  at::parallel_for(0, B, grain_of(T), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      row_count_sum<scalar_t>(x + b * sx.s0, sx.s1, mask + b * sm.s0, sm.s1, T, stats + 2 * b);
    }
  });
}

void check_totals(const at::Tensor& totals, const char* name, int64_t n) {
  check_shape(totals, name, {n});
  check_dtype(totals, name, at::kDouble);
  check_device(totals, name, at::Device(at::kCPU));
}

at::Tensor masked_row_stats_cpu(const at::Tensor& x, const at::Tensor& mask) {
  check_ppo_x_mask(x, mask, /*cuda=*/false);
  const int64_t B = x.size(0), T = x.size(1);
  auto stats = at::empty({B, 2}, x.options().dtype(at::kDouble));
  if (B == 0) return stats;
  RMK_DISPATCH_FLOATS(x.scalar_type(), "masked_row_stats_cpu", [&] {
    row_stats_impl<scalar_t>(x.data_ptr<scalar_t>(), strides_of(x), mask_bytes(mask), strides_of(mask), B, T,
                             stats.data_ptr<double>());
  });
  return stats;
}

at::Tensor masked_centered_sq_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& totals) {
  check_ppo_x_mask(x, mask, /*cuda=*/false);
  check_totals(totals, "totals", 2);
  const int64_t B = x.size(0), T = x.size(1);
  auto out = at::empty({B}, x.options().dtype(at::kDouble));
  if (B == 0) return out;
  const auto tot = totals.contiguous();
  const double mean = mean_of(tot.data_ptr<double>());
  RMK_DISPATCH_FLOATS(x.scalar_type(), "masked_centered_sq_cpu", [&] {
    centered_sq_impl<scalar_t>(x.data_ptr<scalar_t>(), strides_of(x), mask_bytes(mask), strides_of(mask), B, T,
                               mean, out.data_ptr<double>());
  });
  return out;
}

at::Tensor masked_whiten_apply_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& totals,
                                   const at::Tensor& sq, bool shift_mean, bool unbiased, double eps) {
  check_ppo_x_mask(x, mask, /*cuda=*/false);
  check_totals(totals, "totals", 2);
  check_totals(sq, "sq", 1);
  check_nonneg_option(eps, "eps");
  const int64_t B = x.size(0), T = x.size(1);
  OutputPages pages;  // the [B, T] outputs in huge pages while they are written (cpu_common.h)
  auto out = pages.empty({B, T}, x.options().dtype(acc_scalar_type(x.scalar_type())));
  if (B == 0 || T == 0) return out;
  const auto tot = totals.contiguous();
  const auto sqc = sq.contiguous();
  RMK_DISPATCH_FLOATS(x.scalar_type(), "masked_whiten_apply_cpu", [&] {
    whiten_apply_impl<scalar_t>(x.data_ptr<scalar_t>(), strides_of(x), mask_bytes(mask), strides_of(mask), B, T,
                                tot.data_ptr<double>(), sqc.data_ptr<double>(), shift_mean, unbiased, eps,
                                out.data_ptr<acc_t<scalar_t>>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CPU, m) {
  m.impl("masked_row_stats_kernel", &masked_row_stats_cpu);
  m.impl("masked_centered_sq_kernel", &masked_centered_sq_cpu);
  m.impl("masked_whiten_apply_kernel", &masked_whiten_apply_cpu);
}

}  // namespace rmkernels
