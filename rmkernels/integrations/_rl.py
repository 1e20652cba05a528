"""Shared pieces of the RL-framework adapters (verl, OpenRLHF, TRL PPO).

Every adapter computes its numbers with the fused ops :func:`rmkernels.ppo_advantages`
and :func:`rmkernels.masked_whiten`. Two small devices let one op serve every framework:

* **Token-level rewards through the fused GAE.** ``ppo_advantages`` builds the rewards
  as ``-kl_coef * kl + score``. With ``logprobs = 0``, ``ref_logprobs = R``, the ``k1``
  estimator, ``kl_coef = 1`` and zero scores, ``kl = -R`` and the rewards are exactly
  ``R`` (a negation is exact), so any per-token reward tensor (verl's
  ``token_level_rewards``, OpenRLHF's shaped rewards) runs through the fused recurrence.
* **KL estimators with a gradient.** The fused op gives values, never gradients (its
  outputs are targets). Where a framework's KL estimate is used inside a loss, the
  adapter returns ``g - g.detach() + value``: the value of the fused op, the gradient of
  ``g``, the framework's own differentiable formula (or k2's, for verl's ``"+"`` forms).
  ``g`` is only built when autograd is recording and an input requires grad.
"""
import math
import numbers

import torch

import rmkernels as rmk


def as_float(name, value):
    """A Python float from a real number (numpy scalars included) or a 1-element tensor / numpy
    array (verl types gamma/lam as tensors; its configs hand out numpy scalars)."""
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy" and hasattr(value, "size"):
        if value.size != 1 if not isinstance(value, torch.Tensor) else value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def check_2d(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, response_length], got shape {tuple(t.shape)}")
    return t


def check_same_shape(ref_name, ref, **others):
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def zeros_like_2d(t):
    """A [B, T] float32 zero tensor that costs no memory (stride 0)."""
    return torch.zeros((), dtype=torch.float32, device=t.device).expand(t.shape)


def token_reward_gae(rewards, values, mask, *, gamma, lam, whiten, unbiased=True, shift_mean=True,
                     process_group=None):
    """GAE of arbitrary per-token ``rewards`` [B, T] with ``rmk.ppo_advantages`` (the mask-aware
    recurrence of SPEC 3 over the positions where ``mask`` is non-zero). Returns the
    ``PPOAdvantages`` of the fused op (its ``rewards`` equal the given ones at valid positions)."""
    B = rewards.shape[0]
    return rmk.ppo_advantages(
        zeros_like_2d(rewards), rewards, values, torch.zeros(B, dtype=torch.float32, device=rewards.device), mask,
        kl_coef=1.0, gamma=gamma, lam=lam, kl_estimator="k1", whiten=whiten, unbiased=unbiased,
        shift_mean=shift_mean, process_group=process_group)


def fused_kl(logprob, ref_logprob, estimator, mask=None, kl_clamp=None):
    """The fused op's per-token KL estimate of two same-shape tensors of any rank (>= 1);
    0 where ``mask`` is 0. Computed in float32 (float64 for float64 inputs)."""
    shape = logprob.shape
    if logprob.dim() == 0:
        raise ValueError("log-probabilities must be at least 1-D, got a 0-d tensor")
    lp = logprob.detach().reshape(math.prod(shape[:-1]), shape[-1])
    ref = ref_logprob.detach().reshape(lp.shape)
    m = torch.ones((), dtype=torch.bool, device=lp.device).expand(lp.shape) if mask is None else mask.reshape(lp.shape)
    out = rmk.ppo_advantages(lp, ref, zeros_like_2d(lp), torch.zeros(lp.shape[0], dtype=torch.float32, device=lp.device),
                             m, kl_coef=0.0, gamma=1.0, lam=1.0, kl_estimator=estimator, kl_clamp=kl_clamp,
                             whiten=False)
    return out.kl.reshape(shape)


def needs_grad(*tensors):
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(value, grad_source):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def straight_through(value, grad_source):
    """``value`` in the forward pass, the gradient of ``grad_source`` in the backward pass.

    Unlike the frameworks' ``g - g.detach() + value``, an infinite ``g`` does not turn the
    value into NaN (inf - inf); its gradient still flows as autograd's of ``g``."""
    if grad_source is None:
        return value
    return _StraightThrough.apply(value.to(grad_source.dtype).expand(grad_source.shape), grad_source)
