// C++ CPU kernels of the token log-probs / entropy from hidden states (docs/ops.md section 6).
//
//   token_logprobs_fwd_kernel(hidden, weight, bias, targets, temperature, ignore_index, tc, vc)
//       -> (logprobs, entropy, lse) [B, T]
//   token_logprobs_bwd_kernel(grad_lp, grad_ent, hidden, weight, bias, targets, lse, entropy, ...)
//       -> (grad_hidden, grad_weight, grad_bias)
//
// The chunk loops and the GEMMs (MKL through ATen, bf16/fp16 chunks upcast to float32) are
// rmkernels/token_logprobs_chunks.h; this file holds the element-wise passes over a tile
// (vectorised rows, rows split over threads) and the targets' range check.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "rmkernels/cpu_common.h"
#include "rmkernels/cpu_simd.h"
#include "rmkernels/cpu_vec_math.h"
#include "rmkernels/token_logprobs_chunks.h"

namespace rmkernels {

#define RMK_LOOPS_HEADER "token_logprobs_loops.h"
#include "simd_variants.h"  // lp_stats_row, lp_grad_row

namespace {


struct CpuTiles {
  static constexpr bool kNativeLowpGemm = false;

  template <typename acc>
  static void stats(const lp::StatsArgs<acc>& a) {
    at::parallel_for(0, a.rows, grain_of(a.cols), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const acc* raw = a.tile + i * a.cols;
        RMK_SIMD(lp_stats_row<acc>)(raw, a.bias, a.cols, a.inv_temp, a.first, a.m + i, a.s + i, a.u + i);
        const int64_t t = a.targets[i] - a.v0;
        if (t >= 0 && t < a.cols) a.zt[i] = (raw[t] + (a.bias ? a.bias[t] : acc(0))) * a.inv_temp;
      }
    });
  }

  template <typename acc>
  static void grad_logits(const lp::GradArgs<acc>& a) {
    const std::vector<acc> no_bias(a.bias ? 0 : a.cols, acc(0));
    const acc* bias = a.bias ? a.bias : no_bias.data();
    at::parallel_for(0, a.rows, grain_of(a.cols), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        acc* row = a.tile + i * a.cols;
        const int64_t t = a.targets[i];
        if (t == a.ignore_index || t < 0 || t >= a.vocab) {
          std::fill(row, row + a.cols, acc(0));
          continue;
        }
        const acc gl = a.gl[i], ge = a.ge ? a.ge[i] : acc(0);
        RMK_SIMD(lp_grad_row<acc>)(row, bias, a.cols, a.inv_temp, a.lse[i], a.entropy[i], gl, ge);
        const int64_t j = t - a.v0;
        if (j >= 0 && j < a.cols) row[j] += gl * a.inv_temp;
      }
    });
  }

  // Looks at the rows of the chunk that take no part (few, or cheap next to the GEMMs): a copy
  // of the chunk with them zeroed only when one of them holds a NaN or inf.
  static bool dropped_rows_finite(const at::Tensor& x, const at::Tensor& keep) {
    const bool* k = keep.data_ptr<bool>();
    const int64_t rows = x.size(0), H = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
    bool ok = true;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "token_logprobs_dropped_rows", [&] {
      const scalar_t* p = x.data_ptr<scalar_t>();
      for (int64_t i = 0; i < rows && ok; ++i) {
        if (k[i * keep.stride(0)]) continue;
        for (int64_t j = 0; j < H && ok; ++j) ok = std::isfinite(p[i * s0 + j * s1]);
      }
    });
    return ok;
  }
};

// Never an out-of-bounds vocabulary read (verl #5349): the Python layer raises ValueError
// first; a direct call of the kernel op fails here.
void check_targets(const at::Tensor& targets, int64_t vocab, int64_t ignore_index) {
  const int64_t* t = targets.data_ptr<int64_t>();
  const int64_t n = targets.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(t[i] == ignore_index || (t[i] >= 0 && t[i] < vocab), "token_logprobs: targets must be in [0, ",
                      vocab, ") or ignore_index = ", ignore_index, "; targets[", i, "] = ", t[i]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      const at::Tensor& targets, double temperature,
                                                                      int64_t ignore_index, int64_t tc, int64_t vc) {
  lp::check_args(hidden, weight, bias, targets, temperature, tc, vc);
  check_targets(targets, weight.size(0), ignore_index);
  return lp::forward<CpuTiles>(hidden, weight, bias, targets, temperature, ignore_index, tc, vc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_bwd_cpu(
    const at::Tensor& grad_lp, const std::optional<at::Tensor>& grad_ent, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t tc, int64_t vc, bool need_hidden,
    bool need_weight, bool need_bias) {
  lp::check_args(hidden, weight, bias, targets, temperature, tc, vc);
  check_targets(targets, weight.size(0), ignore_index);
  return lp::backward<CpuTiles>(grad_lp, grad_ent, hidden, weight, bias, targets, lse, entropy, temperature,
                                ignore_index, tc, vc, need_hidden, need_weight, need_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CPU, m) {
  m.impl("token_logprobs_fwd_kernel", &token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd_kernel", &token_logprobs_bwd_cpu);
}

}  // namespace rmkernels
