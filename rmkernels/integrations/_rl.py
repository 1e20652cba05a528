"""Shared pieces of the RL-framework adapters (verl, OpenRLHF, TRL PPO).

Every adapter computes its numbers with the public ops: :func:`rmkernels.ppo_advantages`,
:func:`rmkernels.gae` (GAE over any per-token rewards: verl's ``token_level_rewards``,
OpenRLHF's shaped rewards), :func:`rmkernels.kl_estimate` and :func:`rmkernels.masked_whiten`.

**KL estimators with a gradient.** ``kl_estimate`` gives values, never gradients. Where a
framework's KL estimate is used inside a loss, the adapter returns ``g - g.detach() +
value``: the value of the fused op, the gradient of ``g``, the framework's own differentiable
formula (or k2's, for verl's ``"+"`` forms). ``g`` is only built when autograd is recording
and an input requires grad.
"""
import numbers
from collections import namedtuple

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


GAEResult = namedtuple("GAEResult", ["advantages", "returns"])


def token_reward_gae(rewards, values, mask, *, gamma, lam, whiten, unbiased=True, process_group=None):
    """GAE of arbitrary per-token ``rewards`` [B, T] (``rmk.gae``: the mask-aware recurrence
    over the positions where ``mask`` is non-zero), the advantages whitened over the valid
    positions when ``whiten`` (``rmk.masked_whiten`` with the mean shifted, as every caller's
    framework does, over every rank of ``process_group``).
    Returns ``GAEResult(advantages, returns)``."""
    adv, ret = rmk.gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten:
        adv = rmk.masked_whiten(adv, mask, unbiased=unbiased, process_group=process_group)
    return GAEResult(adv, ret)


def fused_kl(logprob, ref_logprob, estimator, mask=None, kl_clamp=None):
    """``rmk.kl_estimate`` of two same-shape tensors of any rank (>= 1); 0 where ``mask`` is 0.
    Computed in float32 (float64 for float64 inputs)."""
    if logprob.dim() == 0:
        raise ValueError("log-probabilities must be at least 1-D, got a 0-d tensor")
    return rmk.kl_estimate(logprob, ref_logprob, mask, estimator=estimator, clamp=kl_clamp)


def _category(dtype):
    return 3 if dtype.is_complex else 2 if dtype.is_floating_point else 0 if dtype == torch.bool else 1


def result_dtype(a, b):
    """``torch.result_type(a, b)`` for two tensors, spelled with ``torch.promote_types`` so that
    ``torch.compile(fullgraph=True)`` traces it (``result_type`` returns a dtype, which dynamo
    cannot put in a graph: a graph break). Torch's rule: a 0-d tensor beside a dimensioned one
    counts only when its category (bool < integer < floating < complex) is higher."""
    if (a.dim() == 0) != (b.dim() == 0):
        zero, dimmed = (a, b) if a.dim() == 0 else (b, a)
        if _category(zero.dtype) <= _category(dimmed.dtype):
            return dimmed.dtype
        if zero.dtype.is_complex and dimmed.dtype.is_floating_point:  # the float's complex twin
            return torch.promote_types(dimmed.dtype, torch.complex32)
        return zero.dtype
    return torch.promote_types(a.dtype, b.dtype)


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
