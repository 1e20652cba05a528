// C++ CPU kernels of the Bradley-Terry and K-wise ranking losses (docs/ops.md section 2).
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
// number of threads. Every argument is checked before anything runs; the formulas are those of
// rmkernels/scalar_math.h, shared with the CUDA kernels.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "rmkernels/codes.h"
#include "rmkernels/cpu_common.h"
#include "rmkernels/cpu_simd.h"
#include "rmkernels/cpu_vec_math.h"
#include "rmkernels/op_checks.h"
#include "rmkernels/scalar_math.h"

namespace rmkernels {
namespace {

using codes::kReduceMean;
using codes::kReduceNone;
using codes::kReduceSum;

template <typename A> struct BTParams {
  const A* margin;   // [B] or null: margin_value
  const A* weights;  // [B] or null: weight_value
  A margin_value, weight_value, e, coef;
};

// The Bradley-Terry loops run over blocks of kBlock pairs. Each block first gets its
// chosen / rejected rewards as contiguous arrays in the arithmetic dtype (the inputs
// themselves when they already are: fp32 with unit stride), then one `#pragma omp simd`
// loop (bt_loss_loops.h, in the CPU's variant: RMK_SIMD) computes the block with the
// branch-free exp / log1p of cpu_vec_math.h (libm for fp64), so the transcendental part is
// vectorised. Sums are taken per block in 8 fixed lanes, then over blocks in order in float64:
// deterministic whatever the number of threads or the vector width, and the relative error of
// the "mean" / "sum" stays at the float32 rounding of the block sums (~1e-7 at 2^22 pairs and
// beyond, where a float32 sum over 4096 blocks loses 5e-5).
constexpr int64_t kBlock = 1024;

// n elements of p (stride s) as a contiguous array in the arithmetic dtype: p itself when it
// already is one, else converted into buf.
template <typename S> const acc_t<S>* as_acc(const S* p, int64_t s, int64_t n, acc_t<S>* buf) {
  if constexpr (std::is_same_v<S, acc_t<S>>) {
    if (s == 1) return p;
  }
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t<S>>(p[i * s]);
  return buf;
}

// sum of x[0..n) in 8 lanes (x[i] goes to lane i % 8), the lanes added pairwise: a fixed order.
template <typename A> A lane_sum(const A* x, int64_t n) {
  A lane[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) lane[j] += x[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) lane[j] += x[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

#define RMK_LOOPS_HEADER "bt_loss_loops.h"
#include "simd_variants.h"  // pair_losses, pair_grads: simd_base / simd_v3 / simd_v4

// Calls f(std::bool_constant<margin != null>, std::bool_constant<weights != null>).
template <typename A, typename F> void with_mw(const BTParams<A>& p, F&& f) {
  if (p.margin) {
    if (p.weights) f(std::true_type{}, std::true_type{}); else f(std::true_type{}, std::false_type{});
  } else {
    if (p.weights) f(std::false_type{}, std::true_type{}); else f(std::false_type{}, std::false_type{});
  }
}

// sum of the weights, in float64 (blocks of lane sums, as the losses).
template <typename A> double weight_sum(const BTParams<A>& p, int64_t B) {
  if (!p.weights) return static_cast<double>(B) * static_cast<double>(p.weight_value);
  const int64_t n_blocks = (B + kBlock - 1) / kBlock;
  double s = 0;
  for (int64_t k = 0; k < n_blocks; ++k) s += lane_sum(p.weights + k * kBlock, std::min(kBlock, B - k * kBlock));
  return s;
}

template <typename S>
void bt_fwd_impl(const S* c, int64_t sc, const S* r, int64_t sr, const BTParams<acc_t<S>>& p, int64_t B,
                 int64_t reduction, acc_t<S>* out) {
  using A = acc_t<S>;
  const int64_t n_blocks = (B + kBlock - 1) / kBlock;
  std::vector<A> partial(reduction == kReduceNone ? 0 : n_blocks);
  at::parallel_for(0, n_blocks, grain_of(kBlock), [&](int64_t lo, int64_t hi) {
    A cb[kBlock], rb[kBlock], lb[kBlock];
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t i0 = k * kBlock, n = std::min(kBlock, B - i0);
      const A* cc = as_acc(c + i0 * sc, sc, n, cb);
      const A* rr = as_acc(r + i0 * sr, sr, n, rb);
      A* o = reduction == kReduceNone ? out + i0 : lb;
      with_mw(p, [&](auto has_m, auto has_w) {
        RMK_SIMD(pair_losses<decltype(has_m)::value, decltype(has_w)::value, A>)(
            cc, rr, p.margin ? p.margin + i0 : nullptr, p.weights ? p.weights + i0 : nullptr, p.margin_value,
            p.weight_value, p.e, p.coef, n, o);
      });
      if (reduction != kReduceNone) partial[k] = lane_sum(lb, n);
    }
  });
  if (reduction == kReduceNone) return;
  double total = 0;
  for (A s : partial) total += static_cast<double>(s);
  out[0] = static_cast<A>(reduction == kReduceMean ? total / weight_sum(p, B) : total);  // B = 0, mean: 0 / 0 = NaN
}

template <typename A> BTParams<A> bt_params(const std::optional<at::Tensor>& margin,
                                            const std::optional<at::Tensor>& weights, double margin_value,
                                            double weight_value, double e, double coef) {
  return {margin.has_value() ? margin->data_ptr<A>() : nullptr,
          weights.has_value() ? weights->data_ptr<A>() : nullptr,
          static_cast<A>(margin_value), static_cast<A>(weight_value), static_cast<A>(e), static_cast<A>(coef)};
}

// The arguments every Bradley-Terry kernel op shares (as the CUDA binding's bt_pairs).
void check_pair(const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
                const std::optional<at::Tensor>& weights, int64_t reduction, double margin_value, double weight_value,
                double label_smoothing, double center_coef) {
  check_dim(chosen, "chosen", 1);
  check_float_input(chosen, "chosen");
  check_shape(rejected, "rejected", chosen.sizes());
  check_same_dtype(rejected, "rejected", chosen, "chosen");
  const auto dev = chosen.device();
  check_device(rejected, "rejected", dev);
  const auto acc = acc_scalar_type(chosen.scalar_type());
  check_dense(margin, "margin", {chosen.size(0)}, acc, dev);
  check_dense(weights, "weights", {chosen.size(0)}, acc, dev);
  check_code(reduction, "reduction", kReduceNone, kReduceSum);
  check_bt_options(margin_value, weight_value, label_smoothing, center_coef);
}

at::Tensor bt_loss_fwd_cpu(const at::Tensor& chosen, const at::Tensor& rejected,
                           const std::optional<at::Tensor>& margin, const std::optional<at::Tensor>& weights,
                           double margin_value, double weight_value, double label_smoothing, double center_coef,
                           int64_t reduction) {
  check_pair(chosen, rejected, margin, weights, reduction, margin_value, weight_value, label_smoothing, center_coef);
  const int64_t B = chosen.size(0);
  const auto acc_type = acc_scalar_type(chosen.scalar_type());
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
  constexpr bool kDirect = std::is_same_v<S, A>;  // gradients written in place, no conversion
  A scale = reduction == kReduceNone ? A(1) : grad[0];
  if (reduction == kReduceMean) scale = static_cast<A>(static_cast<double>(scale) / weight_sum(p, B));
  const int64_t n_blocks = (B + kBlock - 1) / kBlock;
  at::parallel_for(0, n_blocks, grain_of(kBlock), [&](int64_t lo, int64_t hi) {
    A cb[kBlock], rb[kBlock], gcb[kBlock], grb[kBlock];
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t i0 = k * kBlock, n = std::min(kBlock, B - i0);
      const A* cc = as_acc(c + i0 * sc, sc, n, cb);
      const A* rr = as_acc(r + i0 * sr, sr, n, rb);
      A* oc = gcb;
      A* orr = grb;
      if constexpr (kDirect) {
        if (g_c) oc = g_c + i0;
        if (g_r) orr = g_r + i0;
      }
      with_mw(p, [&](auto has_m, auto has_w) {
        constexpr bool kM = decltype(has_m)::value, kW = decltype(has_w)::value;
        const A* m = p.margin ? p.margin + i0 : nullptr;
        const A* w = p.weights ? p.weights + i0 : nullptr;
        if (reduction == kReduceNone) {
          RMK_SIMD(pair_grads<kM, kW, true, A>)(cc, rr, m, w, grad + i0, p.margin_value, p.weight_value, p.e,
                                                p.coef, scale, n, oc, orr);
        } else {
          RMK_SIMD(pair_grads<kM, kW, false, A>)(cc, rr, m, w, nullptr, p.margin_value, p.weight_value, p.e,
                                                 p.coef, scale, n, oc, orr);
        }
      });
      if constexpr (!kDirect) {
        if (g_c) for (int64_t i = 0; i < n; ++i) g_c[i0 + i] = static_cast<S>(gcb[i]);
        if (g_r) for (int64_t i = 0; i < n; ++i) g_r[i0 + i] = static_cast<S>(grb[i]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bt_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& chosen,
                                                   const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
                                                   const std::optional<at::Tensor>& weights, double margin_value,
                                                   double weight_value, double label_smoothing, double center_coef,
                                                   int64_t reduction, bool need_chosen, bool need_rejected) {
  check_pair(chosen, rejected, margin, weights, reduction, margin_value, weight_value, label_smoothing, center_coef);
  const int64_t B = chosen.size(0);
  if (reduction == kReduceNone) {
    check_dense(grad, "grad", {B}, acc_scalar_type(chosen.scalar_type()), chosen.device());
  } else {
    check_defined(grad, "grad");
    TORCH_CHECK_VALUE(grad.numel() == 1, "grad of a reduced loss must have one element, got shape ", grad.sizes());
    check_dtype(grad, "grad", acc_scalar_type(chosen.scalar_type()));
    check_device(grad, "grad", chosen.device());
  }
  auto g_c = at::empty({need_chosen ? B : 0}, chosen.options());
  auto g_r = at::empty({need_rejected ? B : 0}, chosen.options());
  if (B == 0 || !(need_chosen || need_rejected)) return {g_c, g_r};
  RMK_DISPATCH_FLOATS(chosen.scalar_type(), "bt_loss_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
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
// Each pair term is computed in acc_t; a row's sums of them (n(n-1)/2 terms in the forward, n - 1
// per column in the backward) accumulate in float64, as in the CUDA and Triton kernels: a float32
// sum of K(K-1)/2 terms drifts (equal rewards gave 0.6899 for log 2 at K = 1000, 0.3356 at 10000).
// The terms of one candidate's pairs go through a [K] buffer first: that loop vectorises in
// acc_t, and the float64 sum runs over the buffer (with the float64 sum in the term loop itself
// nothing vectorised: 2.3-2.7x the time at K = 16 and 64). Same bits as summing in that loop.
// ---------------------------------------------------------------------------------------
inline int64_t candidates(const int64_t* nc, int64_t b, int64_t K) {
  return nc ? std::min(std::max(nc[b], int64_t(0)), K) : K;
}

template <typename S>
void ranking_fwd_impl(const S* x, int64_t sB, int64_t sK, const int64_t* nc, int64_t B, int64_t K,
                      acc_t<S>* out) {
  using A = acc_t<S>;
  at::parallel_for(0, B, grain_of(K * K), [&](int64_t lo, int64_t hi) {
    std::vector<A> buf(static_cast<size_t>(K));
    A* t = buf.data();
    for (int64_t b = lo; b < hi; ++b) {
      const S* row = x + b * sB;
      const int64_t n = candidates(nc, b, K);
      double total = 0;
      for (int64_t i = 0; i < n; ++i) {
        const A ri = static_cast<A>(row[i * sK]);
        for (int64_t j = i + 1; j < n; ++j) t[j] = math::log_sigmoid(ri - static_cast<A>(row[j * sK]));
        for (int64_t j = i + 1; j < n; ++j) total -= t[j];
      }
      out[b] = n >= 2 ? static_cast<A>(total / static_cast<double>(n * (n - 1) / 2)) : A(0);
    }
  });
}

template <typename S>
void ranking_bwd_impl(const acc_t<S>* grad, const S* x, int64_t sB, int64_t sK, const int64_t* nc, int64_t B,
                      int64_t K, S* out) {
  using A = acc_t<S>;
  at::parallel_for(0, B, grain_of(K * K), [&](int64_t lo, int64_t hi) {
    std::vector<A> buf(static_cast<size_t>(K));
    A* t = buf.data();
    for (int64_t b = lo; b < hi; ++b) {
      const S* row = x + b * sB;
      const int64_t n = candidates(nc, b, K);
      const A scale = n >= 2 ? grad[b] / static_cast<A>(n * (n - 1) / 2) : A(0);
      for (int64_t i = 0; i < K; ++i) {
        double g = 0;
        if (i < n) {
          const A ri = static_cast<A>(row[i * sK]);
          // pairs (j, i) with j < i: d/dr_i -logsigmoid(r_j - r_i) = sigmoid(r_i - r_j);
          // pairs (i, j) with j > i: d/dr_i -logsigmoid(r_i - r_j) = -sigmoid(r_j - r_i).
          for (int64_t j = 0; j < i; ++j) t[j] = math::sigmoid(ri - static_cast<A>(row[j * sK]));
          for (int64_t j = 0; j < i; ++j) g += t[j];
          for (int64_t j = i + 1; j < n; ++j) t[j] = math::sigmoid(static_cast<A>(row[j * sK]) - ri);
          for (int64_t j = i + 1; j < n; ++j) g -= t[j];
        }
        out[b * K + i] = static_cast<S>(scale * static_cast<A>(g));
      }
    }
  });
}

void check_rewards(const at::Tensor& rewards) {
  check_dim(rewards, "rewards", 2);
  check_float_input(rewards, "rewards");
}

const int64_t* candidates_ptr(const std::optional<at::Tensor>& nc, int64_t B, const at::Device& dev) {
  if (!nc.has_value()) return nullptr;
  check_dense(*nc, "num_candidates", {B}, at::kLong, dev);
  return nc->data_ptr<int64_t>();
}

at::Tensor ranking_loss_fwd_cpu(const at::Tensor& rewards, const std::optional<at::Tensor>& num_candidates) {
  check_rewards(rewards);
  const int64_t B = rewards.size(0), K = rewards.size(1);
  const int64_t* nc = candidates_ptr(num_candidates, B, rewards.device());
  auto out = at::empty({B}, rewards.options().dtype(acc_scalar_type(rewards.scalar_type())));
  if (B == 0) return out;
  RMK_DISPATCH_FLOATS(rewards.scalar_type(), "ranking_loss_fwd_cpu", [&] {
    ranking_fwd_impl<scalar_t>(rewards.data_ptr<scalar_t>(), rewards.stride(0), rewards.stride(1), nc, B, K,
                               out.data_ptr<acc_t<scalar_t>>());
  });
  return out;
}

at::Tensor ranking_loss_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& rewards,
                                const std::optional<at::Tensor>& num_candidates) {
  check_rewards(rewards);
  const int64_t B = rewards.size(0), K = rewards.size(1);
  check_dense(grad_rows, "grad_rows", {B}, acc_scalar_type(rewards.scalar_type()), rewards.device());
  const int64_t* nc = candidates_ptr(num_candidates, B, rewards.device());
  auto out = at::empty({B, K}, rewards.options());
  if (B == 0 || K == 0) return out;
  RMK_DISPATCH_FLOATS(rewards.scalar_type(), "ranking_loss_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
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
