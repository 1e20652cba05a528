// Argument checks and gradient allocation of the kernel ops (torch side: the C++ CPU
// implementations and the CUDA bindings). `torch.ops.rmkernels.*_kernel` is public: compile, export and dispatch modes call
// it, and so can anyone, so every implementation checks every argument it indexes (rank,
// sizes against the others, dtype, device, contiguity it assumes, option codes) with a
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE (Python sees ValueError / TypeError, as from the public
// functions) that names the argument, before it allocates or launches anything. Index
// *values* (last-token indices) are never trusted: the kernels treat an index outside
// [0, T) as "no valid token".
#pragma once
#include <ATen/ATen.h>
#include <c10/util/strides.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "rmkernels/codes.h"

namespace rmkernels {

// The arithmetic (accumulation) dtype of the kernels for an input dtype: float64 for
// float64, float32 for fp32 / bf16 / fp16: the dtype form of acc_t<T> (scalar_math.h).
inline at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A dtype as Python spells it (float32, bool, bfloat16...), for the messages.
inline std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// A Tensor argument given None reaches the kernel op as an undefined tensor: name it before
// anything reads its dtype or sizes (which would raise "Unimplemented scalar type" or see [0]).
inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), name, " must be a tensor, got None");
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  TORCH_CHECK_TYPE(is_kernel_float(t.scalar_type()), name, " must be float32, float64, bfloat16 or float16, got ",
                   dtype_name(t.scalar_type()));
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  check_defined(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype_name(dtype), ", got ",
                   dtype_name(t.scalar_type()));
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                   dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

inline void check_device(const at::Tensor& t, const char* name, const at::Device& dev) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.device() == dev, name, " must be on ", dev, ", got ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (the Python layer makes it so), got strides ",
                    t.strides());
}

// A dense operand the kernels index as a contiguous array: shape, dtype, device, contiguity.
inline void check_dense(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                        const at::Device& dev) {
  check_shape(t, name, shape);
  check_dtype(t, name, dtype);
  check_device(t, name, dev);
  check_contiguous(t, name);
}

inline void check_dense(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape,
                        at::ScalarType dtype, const at::Device& dev) {
  if (t.has_value()) check_dense(*t, name, shape, dtype, dev);
}

// An option code in [lo, hi] (rmkernels/_codes.py, codes.h).
inline void check_code(int64_t code, const char* name, int64_t lo, int64_t hi) {
  TORCH_CHECK_VALUE(code >= lo && code <= hi, name, " code must be in [", lo, ", ", hi, "], got ", code);
}

// Float options, one rule each: the ranges of the public functions (rmkernels/ops/*.py, docs/ops.md;
// the Triton host functions call those Python rules). NaN fails every check.
inline void check_finite_option(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), name, " must be finite, got ", v);
}

inline void check_nonneg_option(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, name, " must be finite and >= 0, got ", v);
}

inline void check_positive_option(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v > 0, name, " must be finite and > 0, got ", v);
}

// The discount options of the GAE-family kernels: gamma finite and >= 0, lam in [0, 1]
// (ops/gae.py: check_discount).
inline void check_discount(double gamma, double lam) {
  check_nonneg_option(gamma, "gamma");
  TORCH_CHECK_VALUE(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
}

// The scalar options of the Bradley-Terry kernels (ops/bt_loss.py: check_loss_scalars): a finite
// margin and weight, label_smoothing in [0, 0.5), center_coef finite and >= 0.
inline void check_bt_options(double margin_value, double weight_value, double label_smoothing, double center_coef) {
  check_finite_option(margin_value, "margin_value");
  check_finite_option(weight_value, "weight_value");
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing < 0.5, "label_smoothing must be in [0, 0.5), got ",
                    label_smoothing);
  check_nonneg_option(center_coef, "center_coef");
}

// The float options of group_advantages_kernel (ops/group_adv.py: check_group_scalars).
inline void check_group_options(double eps, double f_norm, double whiten_eps) {
  check_nonneg_option(eps, "eps");
  check_positive_option(f_norm, "f_norm");
  check_nonneg_option(whiten_eps, "whiten_eps");
}

// The sampling temperature of the token log-probs kernels (ops/token_logprobs.py:
// check_temperature): finite and > 0 with 1 / temperature finite in float32 (the logits are
// scaled by it in the arithmetic dtype).
inline void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0 &&
                        1.0 / temperature <= static_cast<double>(std::numeric_limits<float>::max()),
                    "temperature must be finite and > 0 with 1 / temperature finite in float32 (temperature >= ",
                    1.0 / static_cast<double>(std::numeric_limits<float>::max()), "), got ", temperature);
}

// A [B, T] operand with any strides (negative strides cannot occur in a torch tensor).
inline void check_bt(const at::Tensor& t, const char* name, int64_t B, int64_t T, const at::Device& dev) {
  check_dim(t, name, 2);
  TORCH_CHECK_VALUE(t.size(0) == B && t.size(1) == T, name, " must be [B, T] = [", B, ", ", T, "], got ", t.sizes());
  check_device(t, name, dev);
}

// The arguments of the last-token head kernels (last_token_reward_fwd/bwd_kernel, CPU and
// CUDA): hidden [B, T, H] or packed [N, H] (unit stride on H), weight [K, H] and bias [K]
// contiguous in the arithmetic dtype, index int64 [B] contiguous, all on hidden's device.
inline void check_last_token_args(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& index) {
  check_defined(hidden, "hidden");
  TORCH_CHECK_VALUE(hidden.dim() == 2 || hidden.dim() == 3, "hidden_states must be [B, T, H] or packed [N, H], got ",
                    hidden.sizes());
  check_float_input(hidden, "hidden_states");
  TORCH_CHECK_VALUE(hidden.size(-1) <= 1 || hidden.stride(-1) == 1,
                    "hidden_states needs a unit stride on H, got strides ", hidden.strides());
  const auto dev = hidden.device();
  const auto acc = acc_scalar_type(hidden.scalar_type());
  check_dim(weight, "weight", 2);
  check_dense(weight, "weight", {weight.size(0), hidden.size(-1)}, acc, dev);
  check_dense(bias, "bias", {weight.size(0)}, acc, dev);
  check_dim(index, "index", 1);
  check_dtype(index, "index", at::kLong);
  check_device(index, "index", dev);
  check_contiguous(index, "index");
  if (hidden.dim() == 3) {
    TORCH_CHECK_VALUE(index.size(0) == hidden.size(0), "index must have B = hidden_states.size(0) = ", hidden.size(0),
                      " rows, got ", index.size(0));
  }
}

// The arguments of group_advantages_kernel (CPU and CUDA): scores float32/float64 [B] (the
// Python layer sums token rewards and converts), group_ids int64 [B], mask bool [B, T] with any
// strides, all on scores' device, the estimator and single codes and the float options. The id *values* are the
// kernels' business (CPU: an error; CUDA: NaN rows for ids outside [0, B)).
inline void check_group_advantages_args(const at::Tensor& scores, const at::Tensor& group_ids,
                                        const at::Tensor& mask, int64_t estimator, int64_t single, double eps,
                                        double f_norm, double whiten_eps) {
  check_dim(scores, "scores", 1);
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
                   "scores must be float32 or float64 (the Python layer sums and converts), got ",
                   dtype_name(scores.scalar_type()));
  const int64_t B = scores.size(0);
  const auto dev = scores.device();
  check_dim(group_ids, "group_ids", 1);
  TORCH_CHECK_VALUE(group_ids.size(0) == B, "group_ids must have B = scores.size(0) = ", B, " rows, got ",
                    group_ids.size(0));
  check_dtype(group_ids, "group_ids", at::kLong);
  check_device(group_ids, "group_ids", dev);
  check_dim(mask, "mask", 2);
  TORCH_CHECK_VALUE(mask.size(0) == B, "mask must be [B, T] with B = scores.size(0) = ", B, ", got ", mask.sizes());
  check_dtype(mask, "mask", at::kBool);
  check_device(mask, "mask", dev);
  check_code(estimator, "estimator", codes::kGrpo, codes::kReinforcePPBaseline);
  check_code(single, "single", codes::kSingleZero, codes::kSingleSelf);
  check_group_options(eps, f_norm, whiten_eps);
}

// The checks every PPO-family kernel op shares (CPU and CUDA): a float [B, T] main input on the
// backend's device, the others of its shape, dtype and device, a bool [B, T] mask, the KL options.
inline void check_ppo_main(const at::Tensor& t, const char* name, bool cuda) {
  check_dim(t, name, 2);
  check_float_input(t, name);
  if (cuda) {
    TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  } else {
    check_device(t, name, at::Device(at::kCPU));
  }
}

inline void check_ppo_like(const at::Tensor& t, const char* name, const at::Tensor& main, const char* main_name) {
  check_bt(t, name, main.size(0), main.size(1), main.device());
  check_same_dtype(t, name, main, main_name);
}

inline void check_bool_mask(const at::Tensor& mask, const char* name, int64_t B, int64_t T, const at::Device& dev) {
  check_bt(mask, name, B, T, dev);
  check_dtype(mask, name, at::kBool);
}

// masked_whiten's kernel ops: x float [B, T] on the backend's device, mask bool [B, T] beside it.
inline void check_ppo_x_mask(const at::Tensor& x, const at::Tensor& mask, bool cuda) {
  check_ppo_main(x, "x", cuda);
  check_bool_mask(mask, "mask", x.size(0), x.size(1), x.device());
}

// A clamp of the kernels: finite and >= 0, 0 = no clamp (the public functions' None; they take a
// finite value > 0 otherwise: ops/gae.py check_clamp).
inline void check_clamp_option(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, name, " must be finite and >= 0 (0 = no clamp), got ", v);
}

inline void check_kl_options(int64_t estimator, double x_clamp, double kl_clamp) {
  check_code(estimator, "estimator", codes::kK1, codes::kK3);
  check_clamp_option(x_clamp, "x_clamp");
  check_clamp_option(kl_clamp, "kl_clamp");
}

// The arguments of ppo_gae_kernel (CPU and CUDA): values, logprobs, ref_logprobs float [B, T] of
// one dtype on the backend's device (any strides), mask bool [B, T], scores [B] contiguous in the
// arithmetic dtype; kl_coef finite, the discount options, the KL options and the score_clip clamp.
inline void check_ppo_gae_args(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& values,
                               const at::Tensor& scores, const at::Tensor& mask, double kl_coef, double gamma,
                               double lam, int64_t estimator, double x_clamp, double kl_clamp, double score_clip,
                               bool cuda) {
  check_ppo_main(values, "values", cuda);
  const int64_t B = values.size(0), T = values.size(1);
  check_ppo_like(logprobs, "logprobs", values, "values");
  check_ppo_like(ref_logprobs, "ref_logprobs", values, "values");
  check_bool_mask(mask, "mask", B, T, values.device());
  check_finite_option(kl_coef, "kl_coef");
  check_discount(gamma, lam);
  check_kl_options(estimator, x_clamp, kl_clamp);
  check_clamp_option(score_clip, "score_clip");
  check_dense(scores, "scores", {B}, acc_scalar_type(values.scalar_type()), values.device());
}

// The arguments of gae_kernel (CPU and CUDA): values float [B, T] on the backend's device, rewards
// of its shape and dtype, mask bool [B, T] (any strides), and the discount options.
inline void check_gae_args(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                           double lam, bool cuda) {
  check_ppo_main(values, "values", cuda);
  check_ppo_like(rewards, "rewards", values, "values");
  check_bool_mask(mask, "mask", values.size(0), values.size(1), values.device());
  check_discount(gamma, lam);
}

// The arguments of reinforce_kernel (CPU and CUDA): rewards float [B, T] with any strides, mask
// bool [B, T] with any strides, baselines (ReMax) [B] contiguous in the arithmetic dtype or
// absent (REINFORCE++), all on rewards' device; gamma finite and >= 0, eps finite and >= 0.
inline void check_reinforce_args(const at::Tensor& rewards, const at::Tensor& mask,
                                 const std::optional<at::Tensor>& baselines, double gamma, double eps) {
  check_dim(rewards, "token_rewards", 2);
  check_float_input(rewards, "token_rewards");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  check_bool_mask(mask, "mask", B, T, rewards.device());
  check_dense(baselines, "baselines", {B}, acc_scalar_type(rewards.scalar_type()), rewards.device());
  check_nonneg_option(gamma, "gamma");
  check_nonneg_option(eps, "eps");
}

// A fresh tensor of t's shape and dtype for t's gradient (rmkernels/_layout.py: grad_buffer, the
// same rule): t's strides when t is non-overlapping and dense, else contiguous. An overlapping
// view (x.unfold(1, 8, 1)) has no layout a fresh tensor can share, and empty_like would invent
// one from the sorted strides, with the last dimension possibly not innermost.
// `empty(sizes, strides, options)` makes the memory (the C++ CPU kernels: OutputPages, which
// has the zeroing and the kernel's writes done in huge pages); the default is at::empty_strided.
template <typename Empty>
inline at::Tensor grad_buffer(const at::Tensor& t, Empty&& empty) {
  at::Tensor g = t.is_non_overlapping_and_dense() ? empty(t.sizes(), t.strides(), t.options())
                                                  : empty(t.sizes(), c10::contiguous_strides(t.sizes()), t.options());
  return g.zero_();
}

inline at::Tensor grad_buffer(const at::Tensor& t) {
  return grad_buffer(t, [](at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
    return at::empty_strided(sizes, strides, options);
  });
}

}  // namespace rmkernels
