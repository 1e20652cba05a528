"""Kernel ops of the SPEC section 4 building blocks: GAE over given token rewards and the
per-token KL estimate (C++ CPU: ``csrc/cpu/ppo.cpp``; CUDA: ``csrc/cuda/ppo_binding.cpp``;
Triton host functions: ``rmkernels.triton.ppo.gae`` / ``kl_estimate``).

Schemas and fakes only: the public ops ``rmk.gae`` / ``rmk.kl_estimate`` route to them.

``gae_kernel(rewards, values, mask, gamma, lam) -> (advantages, returns)``: rewards and values
``[B, T]`` of one float dtype, any strides; mask bool ``[B, T]``; outputs contiguous float32
(float64 for float64 inputs), 0 at masked positions (verl's mask-aware recurrence, SPEC
section 3).

``kl_estimate_kernel(logprobs, ref_logprobs, mask, estimator, x_clamp, kl_clamp) -> kl``:
``[B, T]`` of one float dtype, any strides; mask bool ``[B, T]`` or None; ``estimator`` a
``rmkernels._codes.KLEstimator`` code; clamps 0 = none (``x_clamp`` clamps
``x = logprobs - ref_logprobs`` first, ``kl_clamp`` the result); contiguous float32 (float64
for float64), 0 where mask is 0.
"""
import torch

from rmkernels._library import acc_dtype, define_kernel_op

gae_kernel = define_kernel_op(
    "gae_kernel(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)")
kl_estimate_kernel = define_kernel_op(
    "kl_estimate_kernel(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, int estimator, float x_clamp, "
    "float kl_clamp) -> Tensor")


@torch.library.register_fake("rmkernels::gae_kernel")
def _(rewards, values, mask, gamma, lam):
    B, T = values.shape
    acc = acc_dtype(values.dtype)
    return values.new_empty(B, T, dtype=acc), values.new_empty(B, T, dtype=acc)


@torch.library.register_fake("rmkernels::kl_estimate_kernel")
def _(logprobs, ref_logprobs, mask, estimator, x_clamp, kl_clamp):
    return logprobs.new_empty(logprobs.shape, dtype=acc_dtype(logprobs.dtype))
