// C++ CPU kernels of the Bradley-Terry and K-wise ranking losses (SPEC section 2).
//
//   bt_loss_fwd_kernel(chosen, rejected, margin?, weights?, margin_value, weight_value,
//                      label_smoothing, center_coef, reduction)     -> loss ([] or [B])
//   bt_loss_bwd_kernel(grad, <same>, need_chosen, need_rejected)   -> (grad_chosen, grad_rejected)
//   ranking_loss_fwd_kernel(rewards[B, K], num_candidates?)         -> row losses [B]
//   ranking_loss_bwd_kernel(grad_rows[B], rewards, num_candidates?) -> grad_rewards [B, K]
//
// chosen / rejected are [B] of one floating dtype and any stride; margin / weights are None
// or contiguous [B] in the arithmetic dtype (the Python layer converts them), else the
// scalars margin_value / weight_value hold for every pair. num_candidates is int64 [B].
// The sums over B are taken in fixed chunks, in a fixed order: deterministic, whatever the
// number of threads.
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "rmkernels/cpu_common.h"

namespace rmkernels {
namespace {

// Reduction codes (rmkernels/ops/bt_loss.py: REDUCTIONS).
constexpr int64_t kReduceNone = 0;
constexpr int64_t kReduceMean = 1;

// Pairs per partial sum of the reductions: the rounding error of a sum grows with
// kSumChunk + B / kSumChunk instead of B.
constexpr int64_t kSumChunk = 1024;

// logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)): no overflow for any x (finite at |x| = 1e30).
template <typename A> inline A log_sigmoid(A x) {
  return (x < A(0) ? x : A(0)) - std::log1p(std::exp(-std::abs(x)));
}

// sigmoid(x) without overflow: exp of a non-positive number only.
template <typename A> inline A sigmoid(A x) {
  const A z = std::exp(-std::abs(x));
  return x >= A(0) ? A(1) / (A(1) + z) : z / (A(1) + z);
}

template <typename A> struct BTParams {
  const A* margin;   // [B] or null: margin_value
  const A* weights;  // [B] or null: weight_value
  A margin_value, weight_value, e, coef;
  A m(int64_t i) const { return margin ? margin[i] : margin_value; }
  A w(int64_t i) const { return weights ? weights[i] : weight_value; }
};

// l = -(1 - e) logsigmoid(d) - e logsigmoid(-d) + coef (c + r)^2, d = c - r - m.
template <typename A> inline A pair_loss(A c, A r, A m, A e, A coef) {
  const A d = c - r - m;
  A l = -(A(1) - e) * log_sigmoid(d) - e * log_sigmoid(-d);
  if (coef != A(0)) l += coef * (c + r) * (c + r);  // never 0 * inf when the coefficient is 0
  return l;
}

// (sum_i f(i)) over [0, B) in chunks of kSumChunk summed in order: deterministic.
template <typename A, typename F> A chunked_sum(int64_t B, F&& f) {
  const int64_t n_chunks = (B + kSumChunk - 1) / kSumChunk;
  std::vector<A> partial(n_chunks, A(0));
  at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      A s = 0;
      const int64_t end = std::min(B, (k + 1) * kSumChunk);
      for (int64_t i = k * kSumChunk; i < end; ++i) s += f(i);
      partial[k] = s;
    }
  });
  A s = 0;
  for (A p : partial) s += p;
  return s;
}

template <typename S>
void bt_fwd_impl(const S* c, int64_t sc, const S* r, int64_t sr, const BTParams<acc_t<S>>& p, int64_t B,
                 int64_t reduction, acc_t<S>* out) {
  using A = acc_t<S>;
  auto wl = [&](int64_t i) {
    return p.w(i) * pair_loss<A>(static_cast<A>(c[i * sc]), static_cast<A>(r[i * sr]), p.m(i), p.e, p.coef);
  };
  if (reduction == kReduceNone) {
    at::parallel_for(0, B, kElemGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) out[i] = wl(i);
    });
    return;
  }
  const A total = chunked_sum<A>(B, wl);
  if (reduction == kReduceMean) {
    const A wsum = p.weights ? chunked_sum<A>(B, [&](int64_t i) { return p.weights[i]; })
                             : static_cast<A>(B) * p.weight_value;
    out[0] = total / wsum;  // B = 0: 0 / 0 = NaN, as an empty mean
  } else {
    out[0] = total;
  }
}

template <typename A> BTParams<A> bt_params(const std::optional<at::Tensor>& margin,
                                            const std::optional<at::Tensor>& weights, double margin_value,
                                            double weight_value, double e, double coef) {
  for (const auto* t : {&margin, &weights}) {
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == c10::CppTypeToScalarType<A>::value &&
                                    (*t)->is_contiguous()),
                "margin / weights must be contiguous in the arithmetic dtype");
  }
  return {margin.has_value() ? margin->data_ptr<A>() : nullptr,
          weights.has_value() ? weights->data_ptr<A>() : nullptr,
          static_cast<A>(margin_value), static_cast<A>(weight_value), static_cast<A>(e), static_cast<A>(coef)};
}

void check_pair(const at::Tensor& chosen, const at::Tensor& rejected) {
  TORCH_CHECK(chosen.dim() == 1 && rejected.dim() == 1 && chosen.size(0) == rejected.size(0),
              "chosen and rejected must be [B] tensors of one B");
  TORCH_CHECK(chosen.scalar_type() == rejected.scalar_type(), "chosen and rejected must have one dtype");
}

at::Tensor bt_loss_fwd_cpu(const at::Tensor& chosen, const at::Tensor& rejected,
                           const std::optional<at::Tensor>& margin, const std::optional<at::Tensor>& weights,
                           double margin_value, double weight_value, double label_smoothing, double center_coef,
                           int64_t reduction) {
  check_pair(chosen, rejected);
  const int64_t B = chosen.size(0);
  const auto acc_type = chosen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = reduction == kReduceNone ? at::empty({B}, chosen.options().dtype(acc_type))
                                      : at::empty({}, chosen.options().dtype(acc_type));
  RMK_DISPATCH_FLOATS(chosen.scalar_type(), "bt_loss_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto p = bt_params<A>(margin, weights, margin_value, weight_value, label_smoothing, center_coef);
    bt_fwd_impl<scalar_t>(chosen.data_ptr<scalar_t>(), chosen.stride(0), rejected.data_ptr<scalar_t>(),
                          rejected.stride(0), p, B, reduction, out.data_ptr<A>());
  });
  return out;
}

template <typename S>
void bt_bwd_impl(const acc_t<S>* grad, const S* c, int64_t sc, const S* r, int64_t sr,
                 const BTParams<acc_t<S>>& p, int64_t B, int64_t reduction, S* g_c, S* g_r) {
  using A = acc_t<S>;
  A scale = reduction == kReduceNone ? A(1) : grad[0];
  if (reduction == kReduceMean) {
    const A wsum = p.weights ? chunked_sum<A>(B, [&](int64_t i) { return p.weights[i]; })
                             : static_cast<A>(B) * p.weight_value;
    scale /= wsum;
  }
  at::parallel_for(0, B, kElemGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const A ci = static_cast<A>(c[i * sc]), ri = static_cast<A>(r[i * sr]);
      const A d = ci - ri - p.m(i);
      // dl/dd = -(1 - e) sigmoid(-d) + e sigmoid(d); the centering term adds 2 coef (c + r) to both.
      const A dl_dd = -(A(1) - p.e) * sigmoid(-d) + p.e * sigmoid(d);
      const A center = p.coef != A(0) ? A(2) * p.coef * (ci + ri) : A(0);
      const A g = (reduction == kReduceNone ? grad[i] : scale) * p.w(i);
      if (g_c) g_c[i] = static_cast<S>(g * (dl_dd + center));
      if (g_r) g_r[i] = static_cast<S>(g * (center - dl_dd));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bt_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& chosen,
                                                   const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
                                                   const std::optional<at::Tensor>& weights, double margin_value,
                                                   double weight_value, double label_smoothing, double center_coef,
                                                   int64_t reduction, bool need_chosen, bool need_rejected) {
  check_pair(chosen, rejected);
  const int64_t B = chosen.size(0);
  TORCH_CHECK(grad.is_contiguous() && grad.numel() == (reduction == kReduceNone ? B : 1),
              "grad must be contiguous with one element per loss element");
  auto g_c = at::empty({need_chosen ? B : 0}, chosen.options());
  auto g_r = at::empty({need_rejected ? B : 0}, chosen.options());
  if (B == 0 || !(need_chosen || need_rejected)) return {g_c, g_r};
  RMK_DISPATCH_FLOATS(chosen.scalar_type(), "bt_loss_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    TORCH_CHECK(grad.scalar_type() == c10::CppTypeToScalarType<A>::value, "grad must be in the arithmetic dtype");
    const auto p = bt_params<A>(margin, weights, margin_value, weight_value, label_smoothing, center_coef);
    bt_bwd_impl<scalar_t>(grad.data_ptr<A>(), chosen.data_ptr<scalar_t>(), chosen.stride(0),
                          rejected.data_ptr<scalar_t>(), rejected.stride(0), p, B, reduction,
                          need_chosen ? g_c.data_ptr<scalar_t>() : nullptr,
                          need_rejected ? g_r.data_ptr<scalar_t>() : nullptr);
  });
  return {g_c, g_r};
}

// ---------------------------------------------------------------------------------------
// K-wise ranking loss: row b ranks its first n_b = num_candidates[b] columns (best first).
// ---------------------------------------------------------------------------------------
inline int64_t candidates(const int64_t* nc, int64_t b, int64_t K) {
  return nc ? std::min(std::max(nc[b], int64_t(0)), K) : K;
}

template <typename S>
void ranking_fwd_impl(const S* x, int64_t sB, int64_t sK, const int64_t* nc, int64_t B, int64_t K,
                      acc_t<S>* out) {
  using A = acc_t<S>;
  at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const S* row = x + b * sB;
      const int64_t n = candidates(nc, b, K);
      A total = 0;
      for (int64_t i = 0; i < n; ++i) {
        const A ri = static_cast<A>(row[i * sK]);
        for (int64_t j = i + 1; j < n; ++j) total -= log_sigmoid(ri - static_cast<A>(row[j * sK]));
      }
      out[b] = n >= 2 ? total / static_cast<A>(n * (n - 1) / 2) : A(0);
    }
  });
}

template <typename S>
void ranking_bwd_impl(const acc_t<S>* grad, const S* x, int64_t sB, int64_t sK, const int64_t* nc, int64_t B,
                      int64_t K, S* out) {
  using A = acc_t<S>;
  at::parallel_for(0, B, kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const S* row = x + b * sB;
      const int64_t n = candidates(nc, b, K);
      const A scale = n >= 2 ? grad[b] / static_cast<A>(n * (n - 1) / 2) : A(0);
      for (int64_t i = 0; i < K; ++i) {
        A g = 0;
        if (i < n) {
          const A ri = static_cast<A>(row[i * sK]);
          // pairs (j, i) with j < i: d/dr_i -logsigmoid(r_j - r_i) = sigmoid(r_i - r_j);
          // pairs (i, j) with j > i: d/dr_i -logsigmoid(r_i - r_j) = -sigmoid(r_j - r_i).
          for (int64_t j = 0; j < i; ++j) g += sigmoid(ri - static_cast<A>(row[j * sK]));
          for (int64_t j = i + 1; j < n; ++j) g -= sigmoid(static_cast<A>(row[j * sK]) - ri);
        }
        out[b * K + i] = static_cast<S>(scale * g);
      }
    }
  });
}

const int64_t* candidates_ptr(const std::optional<at::Tensor>& nc, int64_t B) {
  if (!nc.has_value()) return nullptr;
  TORCH_CHECK(nc->scalar_type() == at::kLong && nc->is_contiguous() && nc->dim() == 1 && nc->size(0) == B,
              "num_candidates must be a contiguous int64 [B] tensor");
  return nc->data_ptr<int64_t>();
}

at::Tensor ranking_loss_fwd_cpu(const at::Tensor& rewards, const std::optional<at::Tensor>& num_candidates) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, K]");
  const int64_t B = rewards.size(0), K = rewards.size(1);
  const auto acc_type = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({B}, rewards.options().dtype(acc_type));
  const int64_t* nc = candidates_ptr(num_candidates, B);
  if (B == 0) return out;
  RMK_DISPATCH_FLOATS(rewards.scalar_type(), "ranking_loss_fwd_cpu", [&] {
    ranking_fwd_impl<scalar_t>(rewards.data_ptr<scalar_t>(), rewards.stride(0), rewards.stride(1), nc, B, K,
                               out.data_ptr<acc_t<scalar_t>>());
  });
  return out;
}

at::Tensor ranking_loss_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& rewards,
                                const std::optional<at::Tensor>& num_candidates) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, K]");
  const int64_t B = rewards.size(0), K = rewards.size(1);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == B && grad_rows.is_contiguous(),
              "grad_rows must be a contiguous [B] tensor");
  auto out = at::empty({B, K}, rewards.options());
  const int64_t* nc = candidates_ptr(num_candidates, B);
  if (B == 0 || K == 0) return out;
  RMK_DISPATCH_FLOATS(rewards.scalar_type(), "ranking_loss_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    TORCH_CHECK(grad_rows.scalar_type() == c10::CppTypeToScalarType<A>::value,
                "grad_rows must be in the arithmetic dtype");
    ranking_bwd_impl<scalar_t>(grad_rows.data_ptr<A>(), rewards.data_ptr<scalar_t>(), rewards.stride(0),
                               rewards.stride(1), nc, B, K, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CPU, m) {
  m.impl("bt_loss_fwd_kernel", &bt_loss_fwd_cpu);
  m.impl("bt_loss_bwd_kernel", &bt_loss_bwd_cpu);
  m.impl("ranking_loss_fwd_kernel", &ranking_loss_fwd_cpu);
  m.impl("ranking_loss_bwd_kernel", &ranking_loss_bwd_cpu);
}

}  // namespace rmkernels
