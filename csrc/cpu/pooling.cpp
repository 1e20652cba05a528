// C++ CPU kernels of the last-token value-head pooling (docs/ops.md section 1).
//
//   last_token_index_kernel(mask[B, T])                      -> index[B] int64 (-1: none)
//   last_token_reward_fwd_kernel(hidden, weight, bias, index) -> rewards[B, K]
//   last_token_reward_bwd_kernel(grad, hidden, weight, index, ...) -> grads
//
// hidden is [B, T, H] (any strides, unit stride on H) or packed [N, H]; for packed input
// `index` holds global rows, which is the same as a [B, N, H] view with batch stride 0.
// weight / bias arrive as contiguous float32 (float64 for double hidden): the Python layer
// converts the small [K, H] head once, so only the hidden dtype is dispatched here. Every
// argument is checked before anything runs (check_head_args); an index value outside [0, T)
// (N for packed input) is "no valid token": NaN rewards, no read, no gradient.
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "rmkernels/cpu_common.h"
#include "rmkernels/op_checks.h"

namespace rmkernels {
namespace {

struct HiddenView {
  int64_t B, T, H, sB, sT;
};

HiddenView hidden_view(const at::Tensor& hidden, int64_t B) {
  if (hidden.dim() == 3) {
    return {hidden.size(0), hidden.size(1), hidden.size(2), hidden.stride(0), hidden.stride(1)};
  }
  return {B, hidden.size(0), hidden.size(1), 0, hidden.stride(0)};  // packed [N, H]
}

template <typename mask_t>
void index_rows(const mask_t* mask, int64_t B, int64_t T, int64_t s0, int64_t s1, int64_t* out) {
  at::parallel_for(0, B, grain_of(T), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const mask_t* row = mask + b * s0;
      int64_t idx = -1;
      for (int64_t t = T - 1; t >= 0; --t) {  // rightmost non-zero: scan from the right
        if (row[t * s1] != mask_t(0)) { idx = t; break; }
      }
      out[b] = idx;
    }
  });
}

at::Tensor last_token_index_cpu(const at::Tensor& mask) {
  check_dim(mask, "attention_mask", 2);
  TORCH_CHECK_TYPE(!mask.is_complex(), "attention_mask must be bool, integer or float, got ", mask.scalar_type());
  const int64_t B = mask.size(0), T = mask.size(1);
  auto out = at::empty({B}, mask.options().dtype(at::kLong));
  if (B == 0) return out;
  if (mask.scalar_type() == at::kBool) {
    index_rows(mask.data_ptr<bool>(), B, T, mask.stride(0), mask.stride(1), out.data_ptr<int64_t>());
  } else {
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, mask.scalar_type(), "last_token_index_cpu", [&] {
      index_rows(mask.data_ptr<scalar_t>(), B, T, mask.stride(0), mask.stride(1), out.data_ptr<int64_t>());
    });
  }
  return out;
}

template <typename scalar_t>
void reward_fwd_impl(const at::Tensor& hidden, const HiddenView& v, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const int64_t* idx, at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t B = out.size(0), K = out.size(1);
  const scalar_t* x = hidden.data_ptr<scalar_t>();
  const acc* w = weight.data_ptr<acc>();
  const acc* bptr = bias.has_value() ? bias->data_ptr<acc>() : nullptr;
  acc* o = out.data_ptr<acc>();
  at::parallel_for(0, B, grain_of(K * v.H), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t t = idx[b];
      if (t < 0 || t >= v.T) {  // no valid token: NaN, and no read
        for (int64_t k = 0; k < K; ++k) o[b * K + k] = std::numeric_limits<acc>::quiet_NaN();
        continue;
      }
      const scalar_t* row = x + b * v.sB + t * v.sT;
      for (int64_t k = 0; k < K; ++k) {
        const acc* wk = w + k * v.H;
        acc s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t h = 0; h < v.H; ++h) s += static_cast<acc>(row[h]) * wk[h];
        o[b * K + k] = s + (bptr ? bptr[k] : acc(0));
      }
    }
  });
}

at::Tensor last_token_reward_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& index) {
  check_last_token_args(hidden, weight, bias, index);
  const int64_t B = index.size(0), K = weight.size(0);
  const HiddenView v = hidden_view(hidden, B);
  auto out = at::empty({B, K}, weight.options());
  if (B == 0 || K == 0) return out;
  RMK_DISPATCH_FLOATS(hidden.scalar_type(), "last_token_reward_fwd_cpu", [&] {
    reward_fwd_impl<scalar_t>(hidden, v, weight, bias, index.data_ptr<int64_t>(), out);
  });
  return out;
}

// Packed hidden [N, H]: the tokens the index names (those in [0, N)) must be distinct, one last
// token per sequence; grad_hidden's rows are written once each (by different threads), so a
// repeated token would get one row's gradient, not their sum. The Python op's data check
// (pooling.py _check_distinct_tokens) is the same rule; this is the kernel op's, on the CPU.
void check_distinct_tokens(const int64_t* idx, int64_t B, int64_t N) {
  std::vector<int64_t> named;
  named.reserve(B);
  for (int64_t b = 0; b < B; ++b) {
    if (idx[b] >= 0 && idx[b] < N) named.push_back(idx[b]);
  }
  std::sort(named.begin(), named.end());
  const auto it = std::adjacent_find(named.begin(), named.end());
  if (it == named.end()) return;
  std::string rows;
  for (int64_t b = 0; b < B; ++b) {
    if (idx[b] == *it) rows += (rows.empty() ? "" : ", ") + std::to_string(b);
  }
  TORCH_CHECK_VALUE(false, "index: rows ", rows, " name the same packed token (", *it,
                    "); each sequence has its own last token");
}

template <typename scalar_t>
void reward_bwd_impl(const at::Tensor& grad, const at::Tensor& hidden, const HiddenView& v,
                     const at::Tensor& weight, const int64_t* idx, int64_t B, int64_t K, at::Tensor* g_hidden,
                     at::Tensor* g_weight, at::Tensor* g_bias) {
  using acc = acc_t<scalar_t>;
  const scalar_t* x = hidden.data_ptr<scalar_t>();
  const acc* w = weight.data_ptr<acc>();
  const acc* g = grad.data_ptr<acc>();
  auto valid = [&](int64_t b) { return idx[b] >= 0 && idx[b] < v.T; };
  if (g_hidden) {
    // grad_hidden[b, idx_b, :] = sum_k g[b, k] * W[k, :]; zero elsewhere, in g_hidden's own
    // strides (grad_buffer: hidden's, or contiguous for an overlapping view). Rows of a packed
    // batch never share a token (check_distinct_tokens), so the writes of different b never overlap.
    const int64_t gsB = hidden.dim() == 3 ? g_hidden->stride(0) : 0;
    const int64_t gsT = hidden.dim() == 3 ? g_hidden->stride(1) : g_hidden->stride(0);
    scalar_t* gx = g_hidden->data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_of(K * v.H), [&](int64_t lo, int64_t hi) {
      std::vector<acc> tmp(v.H);
      for (int64_t b = lo; b < hi; ++b) {
        if (!valid(b)) continue;
        std::fill(tmp.begin(), tmp.end(), acc(0));
        acc* tp = tmp.data();
        for (int64_t k = 0; k < K; ++k) {
          const acc gk = g[b * K + k];
          const acc* wk = w + k * v.H;
#pragma omp simd
          for (int64_t h = 0; h < v.H; ++h) tp[h] += gk * wk[h];
        }
        scalar_t* out = gx + b * gsB + idx[b] * gsT;
        for (int64_t h = 0; h < v.H; ++h) out[h] = static_cast<scalar_t>(tp[h]);
      }
    });
  }
  if (g_weight) {
    // grad_W[k, h] = sum_b g[b, k] * x[b, idx_b, h]: split over h, fixed order over b
    // (deterministic).
    acc* gw = g_weight->data_ptr<acc>();
    at::parallel_for(0, v.H, kElemGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t b = 0; b < B; ++b) {
        if (!valid(b)) continue;
        const scalar_t* row = x + b * v.sB + idx[b] * v.sT;
        for (int64_t k = 0; k < K; ++k) {
          const acc gk = g[b * K + k];
          acc* gwk = gw + k * v.H;
#pragma omp simd
          for (int64_t h = lo; h < hi; ++h) gwk[h] += gk * static_cast<acc>(row[h]);
        }
      }
    });
  }
  if (g_bias) {
    acc* gb = g_bias->data_ptr<acc>();
    for (int64_t b = 0; b < B; ++b) {
      if (!valid(b)) continue;
      for (int64_t k = 0; k < K; ++k) gb[k] += g[b * K + k];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> last_token_reward_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& index,
    bool need_hidden, bool need_weight, bool need_bias) {
  check_last_token_args(hidden, weight, std::nullopt, index);
  const int64_t B = index.size(0), K = weight.size(0);
  check_dense(grad, "grad", {B, K}, weight.scalar_type(), hidden.device());
  const HiddenView v = hidden_view(hidden, B);
  if (need_hidden && hidden.dim() == 2) check_distinct_tokens(index.data_ptr<int64_t>(), B, v.T);
  OutputPages pages;  // grad_hidden zeroed and written in huge pages when fresh (cpu_common.h)
  at::Tensor g_hidden =
      need_hidden ? grad_buffer(hidden, [&](at::IntArrayRef sizes, at::IntArrayRef strides,
                                            const at::TensorOptions& options) {
        return pages.empty_strided(sizes, strides, options);
      })
                  : at::empty({0}, hidden.options());
  at::Tensor g_weight = need_weight ? at::zeros({K, v.H}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor g_bias = need_bias ? at::zeros({K}, weight.options()) : at::empty({0}, weight.options());
  if (B == 0 || K == 0) return {g_hidden, g_weight, g_bias};
  RMK_DISPATCH_FLOATS(hidden.scalar_type(), "last_token_reward_bwd_cpu", [&] {
    reward_bwd_impl<scalar_t>(grad, hidden, v, weight, index.data_ptr<int64_t>(), B, K,
                              need_hidden ? &g_hidden : nullptr, need_weight ? &g_weight : nullptr,
                              need_bias ? &g_bias : nullptr);
  });
  return {g_hidden, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CPU, m) {
  m.impl("last_token_index_kernel", &last_token_index_cpu);
  m.impl("last_token_reward_fwd_kernel", &last_token_reward_fwd_cpu);
  m.impl("last_token_reward_bwd_kernel", &last_token_reward_bwd_cpu);
}

}  // namespace rmkernels
