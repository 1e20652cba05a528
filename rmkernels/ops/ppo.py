"""PPO KL-penalized rewards, GAE advantages and whitening (SPEC section 3).

``rmk.ppo_advantages`` turns a batch of rollouts into PPO targets in one call: the
per-token KL penalty, the rewards (score at the last valid token), verl's mask-aware GAE
(masked positions, e.g. tool/observation tokens of a multi-turn rollout, are skipped by
the recurrence), the returns and the whitened advantages. ``rmk.masked_whiten`` is the
whitening on its own.

Ops (``torch.ops.rmkernels.*``):

======================================  ================================================
``ppo_gae(lp, ref, v, scores, mask, ...)``  (advantages, returns, rewards, kl, row_stats):
                                        unwhitened advantages; ``row_stats`` [B, 2]
                                        float64 = (count, sum of A) of each row
``masked_row_stats(x, mask)``           [B, 2] float64 (count, sum of x) per row
``masked_centered_sq(x, mask, totals)`` [B] float64, sum of (x - mean)^2 per row, with
                                        mean = totals[1] / totals[0]
``masked_whiten_apply(x, mask, totals, sq, ...)``  the whitened x (0 where masked)
``ppo_advantages(...)``                 the fused op: ppo_gae + whitening, one process
``masked_whiten(...)``                  the fused whitening, one process
``*_kernel``                            the C++ CPU / CUDA kernels behind ``cpu``/``cuda``
======================================  ================================================

Whitening is two-pass and deterministic: the per-row (count, sum) partials are summed in
float64 on the device (``totals``), which gives the mean; the per-row sums of squared
deviations from that mean are summed the same way (``sq``), which gives the variance. The
statistics never leave the device (no host synchronisation: CUDA-graph capturable). With a
``process_group``, ``totals`` and ``sq`` are all-reduced between the steps, so every rank
whitens with the statistics of the whole batch.
"""
import math
from collections import namedtuple
from typing import Optional, Tuple

import torch
from torch import Tensor

from rmkernels import _backend, _checks
from rmkernels._library import acc_dtype, define_kernel_op, eager_fast_path

PPOAdvantages = namedtuple("PPOAdvantages", ["advantages", "returns", "rewards", "kl"])

# KL estimators: name -> (kernel code, clamp of x = logprobs - ref_logprobs, clamp of the
# result). The kernels take the code; a clamp of 0 means none.
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "kl", "mse", "low_var_kl")
_EST_CODE = {"k1": 0, "kl": 0, "abs": 1, "k2": 2, "mse": 2, "k3": 3, "low_var_kl": 3}
# verl's low_var_kl: k3 of x clamped to +-20, result clamped to +-10.
_LOW_VAR_X_CLAMP = 20.0
_LOW_VAR_KL_CLAMP = 10.0
DEFAULT_WHITEN_EPS = 1e-8  # TRL / OpenRLHF / verl masked_whiten

# ---------------------------------------------------------------------------------------
# Kernel ops (C++ CPU / CUDA implementations in csrc/)
# ---------------------------------------------------------------------------------------
_gae_kernel = define_kernel_op(
    "ppo_gae_kernel(Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor scores, Tensor mask, "
    "float kl_coef, float gamma, float lam, int estimator, float x_clamp, float kl_clamp, float score_clip) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_row_stats_kernel = define_kernel_op("masked_row_stats_kernel(Tensor x, Tensor mask) -> Tensor")
_centered_sq_kernel = define_kernel_op("masked_centered_sq_kernel(Tensor x, Tensor mask, Tensor totals) -> Tensor")
_whiten_apply_kernel = define_kernel_op(
    "masked_whiten_apply_kernel(Tensor x, Tensor mask, Tensor totals, Tensor sq, bool shift_mean, bool unbiased, "
    "float eps) -> Tensor")


def _gae_fake(logprobs, values):
    B, T = logprobs.shape
    acc = acc_dtype(values.dtype)
    outs = tuple(logprobs.new_empty(B, T, dtype=acc) for _ in range(4))
    return outs + (logprobs.new_empty(B, 2, dtype=torch.float64),)


@torch.library.register_fake("rmkernels::ppo_gae_kernel")
def _(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, estimator, x_clamp, kl_clamp, score_clip):
    return _gae_fake(logprobs, values)


@torch.library.register_fake("rmkernels::masked_row_stats_kernel")
def _(x, mask):
    return x.new_empty(x.shape[0], 2, dtype=torch.float64)


@torch.library.register_fake("rmkernels::masked_centered_sq_kernel")
def _(x, mask, totals):
    return x.new_empty(x.shape[0], dtype=torch.float64)


@torch.library.register_fake("rmkernels::masked_whiten_apply_kernel")
def _(x, mask, totals, sq, shift_mean, unbiased, eps):
    return x.new_empty(x.shape, dtype=acc_dtype(x.dtype))


# ---------------------------------------------------------------------------------------
# Reference implementation (pure PyTorch, the ground truth)
# ---------------------------------------------------------------------------------------
def _kl_reference(x, code, x_clamp, kl_clamp):
    if x_clamp > 0:
        x = x.clamp(-x_clamp, x_clamp)
    if code == 0:
        kl = x
    elif code == 1:
        kl = x.abs()
    elif code == 2:
        kl = 0.5 * x * x
    else:
        kl = torch.exp(-x) - 1 + x
    if kl_clamp > 0:
        kl = kl.clamp(-kl_clamp, kl_clamp)
    return kl


def _reference_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, code, x_clamp, kl_clamp,
                   score_clip):
    """verl's mask-aware GAE, written as the recurrence over T (vectorized over rows)."""
    acc = acc_dtype(values.dtype)
    B, T = values.shape
    valid = mask != 0
    zero = torch.zeros((), dtype=acc, device=values.device)
    kl = _kl_reference(logprobs.to(acc) - ref_logprobs.to(acc), code, x_clamp, kl_clamp)
    kl = torch.where(valid, kl, zero)
    s = scores.to(acc)
    if score_clip > 0:
        s = s.clamp(-score_clip, score_clip)
    rewards = -kl_coef * kl
    pos = torch.arange(T, device=values.device).expand(B, T)
    last = torch.where(valid, pos, torch.full_like(pos, -1)).amax(dim=1) if T > 0 else pos.new_full((B,), -1)
    rewards = torch.where(pos == last[:, None], rewards + s[:, None], rewards)  # no match when last = -1
    rewards = torch.where(valid, rewards, zero)
    v = values.to(acc)
    adv = torch.zeros(B, T, dtype=acc, device=values.device)
    next_v = torch.zeros(B, dtype=acc, device=values.device)
    next_a = torch.zeros(B, dtype=acc, device=values.device)
    gl = gamma * lam
    for t in reversed(range(T)):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_v - v[:, t]
        a = delta + gl * next_a
        adv[:, t] = torch.where(m, a, zero)
        next_v = torch.where(m, v[:, t], next_v)
        next_a = torch.where(m, a, next_a)
    returns = torch.where(valid, adv + v, zero)
    return adv, returns, rewards, kl, _reference_row_stats(adv, valid)


def _reference_row_stats(x, mask):
    valid = mask != 0
    xs = torch.where(valid, x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    return torch.stack([valid.sum(1, dtype=torch.float64), xs.sum(1)], dim=1)


def _mean_of(totals):
    n = totals[0]
    return n, torch.where(n > 0, totals[1] / n.clamp_min(1), torch.zeros_like(n))


def _reference_centered_sq(x, mask, totals):
    _, mean = _mean_of(totals)
    d = torch.where(mask != 0, x.to(torch.float64) - mean, torch.zeros((), dtype=torch.float64, device=x.device))
    return (d * d).sum(1)


def _reference_whiten_apply(x, mask, totals, sq, shift_mean, unbiased, eps):
    acc = acc_dtype(x.dtype)
    n, mean = _mean_of(totals)
    den = n - 1 if unbiased else n
    ok = n > 1  # n <= 1: zero advantages, never NaN
    var = sq[0] / torch.where(ok, den, torch.ones_like(den))
    rstd = torch.rsqrt(var + eps).to(acc)
    mean_a = mean.to(acc)
    out = (x.to(acc) - mean_a) * rstd
    if not shift_mean:
        out = out + mean_a
    zero = torch.zeros((), dtype=acc, device=x.device)
    return torch.where((mask != 0) & ok, out, zero)


# ---------------------------------------------------------------------------------------
# Public ops: route to the backend
# ---------------------------------------------------------------------------------------
def _triton():
    from rmkernels.triton import ppo

    return ppo


def _estimator_args(kl_estimator, kl_clamp, score_clip):
    code = _EST_CODE[kl_estimator]
    x_clamp = 0.0
    kc = float(kl_clamp) if kl_clamp is not None else 0.0
    if kl_estimator == "low_var_kl":
        x_clamp = _LOW_VAR_X_CLAMP
        kc = _LOW_VAR_KL_CLAMP if kl_clamp is None else min(kc, _LOW_VAR_KL_CLAMP)
    sc = float(score_clip) if score_clip is not None else 0.0
    return code, x_clamp, kc, sc


def _gae_dispatch(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator, kl_clamp,
                  score_clip, backend):
    code, x_clamp, kc, sc = _estimator_args(kl_estimator, kl_clamp, score_clip)
    scores = scores.to(acc_dtype(values.dtype)).contiguous()
    args = (logprobs, ref_logprobs, values, scores, mask, float(kl_coef), float(gamma), float(lam), code, x_clamp,
            kc, sc)
    if backend == "reference":
        return _reference_gae(*args)
    if backend == "triton":
        return _triton().ppo_gae(*args)
    return _gae_kernel(*args)


def _row_stats_dispatch(x, mask, backend):
    if backend == "reference":
        return _reference_row_stats(x, mask)
    if backend == "triton":
        return _triton().masked_row_stats(x, mask)
    return _row_stats_kernel(x, mask)


def _centered_sq_dispatch(x, mask, totals, backend):
    if backend == "reference":
        return _reference_centered_sq(x, mask, totals)
    if backend == "triton":
        return _triton().masked_centered_sq(x, mask, totals)
    return _centered_sq_kernel(x, mask, totals)


def _apply_dispatch(x, mask, totals, sq, shift_mean, unbiased, eps, backend):
    if backend == "reference":
        return _reference_whiten_apply(x, mask, totals, sq, shift_mean, unbiased, eps)
    if backend == "triton":
        return _triton().masked_whiten_apply(x, mask, totals, sq, shift_mean, unbiased, eps)
    return _whiten_apply_kernel(x, mask, totals, sq, shift_mean, unbiased, eps)


def _whiten_local(x, mask, row_stats, shift_mean, unbiased, eps, backend):
    """Whitening of a [B, T] batch from its per-row (count, sum) partials, one process."""
    totals = row_stats.sum(0)
    sq = _centered_sq_dispatch(x, mask, totals, backend).sum(0, keepdim=True)
    return _apply_dispatch(x, mask, totals, sq, shift_mean, unbiased, eps, backend)


def _ppo_advantages_forward(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator,
                            kl_clamp, score_clip, whiten, shift_mean, unbiased, eps, backend):
    adv, ret, rew, kl, rows = _gae_dispatch(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam,
                                            kl_estimator, kl_clamp, score_clip, backend)
    if whiten:
        adv = _whiten_local(adv, mask, rows, shift_mean, unbiased, eps, backend)
    return adv, ret, rew, kl


def _masked_whiten_forward(x, mask, shift_mean, unbiased, eps, backend):
    rows = _row_stats_dispatch(x, mask, backend)
    return _whiten_local(x, mask, rows, shift_mean, unbiased, eps, backend)


@torch.library.custom_op("rmkernels::ppo_gae", mutates_args=())
def ppo_gae_op(logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, scores: Tensor, mask: Tensor,
               kl_coef: float, gamma: float, lam: float, kl_estimator: str, kl_clamp: Optional[float],
               score_clip: Optional[float], backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """KL, rewards, unwhitened GAE advantages and returns, and the per-row whitening
    partials (count, sum of A) as float64 [B, 2]. mask is bool [B, T]."""
    return _gae_dispatch(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator,
                         kl_clamp, score_clip, backend)


@ppo_gae_op.register_fake
def _(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator, kl_clamp, score_clip,
      backend):
    return _gae_fake(logprobs, values)


@torch.library.custom_op("rmkernels::masked_row_stats", mutates_args=())
def masked_row_stats_op(x: Tensor, mask: Tensor, backend: str) -> Tensor:
    """float64 [B, 2]: (number of valid positions, sum of x over them) of each row."""
    return _row_stats_dispatch(x, mask, backend)


@masked_row_stats_op.register_fake
def _(x, mask, backend):
    return x.new_empty(x.shape[0], 2, dtype=torch.float64)


@torch.library.custom_op("rmkernels::masked_centered_sq", mutates_args=())
def masked_centered_sq_op(x: Tensor, mask: Tensor, totals: Tensor, backend: str) -> Tensor:
    """float64 [B]: sum over the valid positions of each row of (x - mean)^2, with
    mean = totals[1] / totals[0] (0 when totals[0] is 0); totals is float64 [2]."""
    return _centered_sq_dispatch(x, mask, totals, backend)


@masked_centered_sq_op.register_fake
def _(x, mask, totals, backend):
    return x.new_empty(x.shape[0], dtype=torch.float64)


@torch.library.custom_op("rmkernels::masked_whiten_apply", mutates_args=())
def masked_whiten_apply_op(x: Tensor, mask: Tensor, totals: Tensor, sq: Tensor, shift_mean: bool, unbiased: bool,
                           eps: float, backend: str) -> Tensor:
    """(x - mean) * rsqrt(var + eps) (+ mean if not shift_mean) at valid positions, 0
    elsewhere, from totals = (n, sum) float64 [2] and sq = sum of squared deviations [1];
    var = sq / (n - 1 if unbiased else n). n <= 1 gives all zeros."""
    return _apply_dispatch(x, mask, totals, sq, shift_mean, unbiased, eps, backend)


@masked_whiten_apply_op.register_fake
def _(x, mask, totals, sq, shift_mean, unbiased, eps, backend):
    return x.new_empty(x.shape, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("rmkernels::ppo_advantages", mutates_args=())
def ppo_advantages_op(logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, scores: Tensor, mask: Tensor,
                      kl_coef: float, gamma: float, lam: float, kl_estimator: str, kl_clamp: Optional[float],
                      score_clip: Optional[float], whiten: bool, shift_mean: bool, unbiased: bool, eps: float,
                      backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused op of one process: (advantages, returns, rewards, kl), each [B, T]."""
    return _ppo_advantages_forward(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator,
                                   kl_clamp, score_clip, whiten, shift_mean, unbiased, eps, backend)


@ppo_advantages_op.register_fake
def _(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator, kl_clamp, score_clip,
      whiten, shift_mean, unbiased, eps, backend):
    return _gae_fake(logprobs, values)[:4]


@torch.library.custom_op("rmkernels::masked_whiten", mutates_args=())
def masked_whiten_op(x: Tensor, mask: Tensor, shift_mean: bool, unbiased: bool, eps: float, backend: str) -> Tensor:
    """The fused whitening of one process, x and mask [B, T] (mask bool)."""
    return _masked_whiten_forward(x, mask, shift_mean, unbiased, eps, backend)


@masked_whiten_op.register_fake
def _(x, mask, shift_mean, unbiased, eps, backend):
    return x.new_empty(x.shape, dtype=acc_dtype(x.dtype))


# What the public functions call: the public ops, or their bodies in plain eager mode (no
# gradients: the inputs are used detached)
_ppo_advantages = eager_fast_path(torch.ops.rmkernels.ppo_advantages, _ppo_advantages_forward)
_masked_whiten = eager_fast_path(torch.ops.rmkernels.masked_whiten, _masked_whiten_forward)
_ppo_gae = eager_fast_path(torch.ops.rmkernels.ppo_gae, _gae_dispatch)
_masked_row_stats = eager_fast_path(torch.ops.rmkernels.masked_row_stats, _row_stats_dispatch)
_masked_centered_sq = eager_fast_path(torch.ops.rmkernels.masked_centered_sq, _centered_sq_dispatch)
_masked_whiten_apply = eager_fast_path(torch.ops.rmkernels.masked_whiten_apply, _apply_dispatch)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def _check_mask(name, mask, shape, device):
    _checks.check_tensor(name, mask, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (like the other inputs), got {list(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0  # the kernels read bool masks


def _check_optional_positive(name, value):
    if value is None:
        return None
    return _checks.check_float(name, value, lo=0.0, lo_open=True, hi=float("inf"), hi_open=True)


def _check_process_group(process_group):
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(process_group).__name__}")
    return process_group


def _all_reduce(t, process_group):
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    return t


def _whiten_distributed(x, mask, row_stats, shift_mean, unbiased, eps, backend, process_group):
    """Whitening with the statistics of every rank: the float64 partials are all-reduced
    on the device, between the ops (no host synchronisation)."""
    totals = _all_reduce(row_stats.sum(0), process_group)
    sq = _masked_centered_sq(x, mask, totals, backend).sum(0, keepdim=True)
    sq = _all_reduce(sq, process_group)
    return _masked_whiten_apply(x, mask, totals, sq, shift_mean, unbiased, eps, backend)


def _common_float_dtype(**tensors):
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        return None
    out = torch.float64 if torch.float64 in dtypes else torch.float32
    return out


def ppo_advantages(logprobs, ref_logprobs, values, scores, mask, *, kl_coef, gamma=1.0, lam=0.95,
                   kl_estimator="k1", kl_clamp=None, score_clip=None, whiten=True, shift_mean=True,
                   unbiased=True, eps=DEFAULT_WHITEN_EPS, process_group=None, backend=None):
    """KL-penalized rewards, GAE advantages (whitened) and returns of a PPO batch.

    Args:
        logprobs, ref_logprobs, values: ``[B, T]`` over the response tokens (fp32/bf16/fp16,
            fp64 computes and returns fp64). Any strides.
        scores: ``[B]`` sequence-level rewards (any float dtype).
        mask: ``[B, T]`` bool/int/float, non-zero at action tokens. May have holes
            (multi-turn tool/observation tokens), left or right padding, empty rows.
        kl_coef: the KL penalty coefficient (e.g. ``AdaptiveKLController(...).value``).
        gamma: discount, ``>= 0``; lam: GAE lambda in ``[0, 1]``.
        kl_estimator: with ``x = logprobs - ref_logprobs``: ``"k1"``/``"kl"`` = x,
            ``"abs"`` = |x|, ``"k2"``/``"mse"`` = 0.5 x^2, ``"k3"`` = exp(-x) - 1 + x,
            ``"low_var_kl"`` = k3 of x clamped to +-20, clamped to +-10 (verl; a smaller
            ``kl_clamp`` also applies).
        kl_clamp: clamp the per-token KL to ``[-c, c]`` (None: no clamp).
        score_clip: clamp the scores to ``[-c, c]`` (None: no clamp).
        whiten: whiten the advantages over all valid positions of the batch (and of every
            rank of ``process_group``). ``shift_mean=False`` adds the mean back;
            ``unbiased`` divides by n - 1 (else n); ``eps`` is added to the variance.
            With n <= 1 valid positions the advantages are all 0 (never NaN, no error).
        process_group: a ``torch.distributed`` group: the whitening statistics are
            all-reduced over it (every rank gets the statistics of the whole batch).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None/``"auto"``.

    Returns:
        ``PPOAdvantages(advantages, returns, rewards, kl)``, each ``[B, T]`` float32 (fp64
        for fp64 inputs), 0 at masked positions. ``rewards = -kl_coef * kl`` plus the
        (clipped) score at the last valid position of the row; ``A_t = delta_t + gamma *
        lam * A_next`` with ``delta_t = r_t + gamma * V_next - V_t`` over valid positions
        only (``V_next``, ``A_next`` of the next valid position, 0 after the last);
        ``returns = A + V`` before whitening. A row with no valid token is all zeros. No
        gradient flows: the inputs are used detached.

    No host synchronisation happens (the op can be captured in a CUDA graph).
    """
    _checks.check_tensor("logprobs", logprobs, ndims=2, dtypes=_checks.FLOAT_DTYPES)
    dev = logprobs.device
    B, T = logprobs.shape
    _checks.check_tensor("ref_logprobs", ref_logprobs, ndims=2, dtypes=_checks.FLOAT_DTYPES, device=dev)
    _checks.check_tensor("values", values, ndims=2, dtypes=_checks.FLOAT_DTYPES, device=dev)
    for name, t in (("ref_logprobs", ref_logprobs), ("values", values)):
        if tuple(t.shape) != (B, T):
            raise ValueError(f"{name} must have shape [B, T] = [{B}, {T}] (from logprobs), got {list(t.shape)}")
    _checks.check_tensor("scores", scores, ndims=1, dtypes=_checks.FLOAT_DTYPES, device=dev)
    if scores.shape[0] != B:
        raise ValueError(f"scores must have shape [B] = [{B}] (from logprobs), got {list(scores.shape)}")
    mask = _check_mask("mask", mask, (B, T), dev)
    kl_coef = _checks.check_float("kl_coef", kl_coef, lo=float("-inf"), hi=float("inf"), lo_open=True,
                                  hi_open=True)
    gamma = _checks.check_float("gamma", gamma, lo=0.0, hi=float("inf"), hi_open=True)
    lam = _checks.check_float("lam", lam, lo=0.0, hi=1.0)
    if not isinstance(kl_estimator, str):
        raise TypeError(f"kl_estimator must be a str, one of {KL_ESTIMATORS}, got {type(kl_estimator).__name__}")
    _checks.check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    kl_clamp = _check_optional_positive("kl_clamp", kl_clamp)
    score_clip = _check_optional_positive("score_clip", score_clip)
    whiten = _checks.check_bool("whiten", whiten)
    shift_mean = _checks.check_bool("shift_mean", shift_mean)
    unbiased = _checks.check_bool("unbiased", unbiased)
    eps = _checks.check_float("eps", eps, lo=0.0, hi=float("inf"), hi_open=True)
    process_group = _check_process_group(process_group)
    be = _backend.resolve(backend, dev)

    # Targets, not a graph: the op never sees autograd.
    logprobs, ref_logprobs, values, scores = (t.detach() for t in (logprobs, ref_logprobs, values, scores))
    common = _common_float_dtype(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values)
    if common is not None:  # mixed dtypes: the kernels read one storage dtype
        logprobs, ref_logprobs, values = (t.to(common) for t in (logprobs, ref_logprobs, values))
    if process_group is None:
        out = _ppo_advantages(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator,
                              kl_clamp, score_clip, whiten, shift_mean, unbiased, eps, be)
        return PPOAdvantages(*out)
    adv, ret, rew, kl, rows = _ppo_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam,
                                       kl_estimator, kl_clamp, score_clip, be)
    if whiten:
        adv = _whiten_distributed(adv, mask, rows, shift_mean, unbiased, eps, be, process_group)
    return PPOAdvantages(adv, ret, rew, kl)


def masked_whiten(x, mask, *, shift_mean=True, unbiased=True, eps=DEFAULT_WHITEN_EPS, process_group=None,
                  backend=None):
    """Whiten ``x`` over the positions where ``mask`` is non-zero (TRL/verl ``masked_whiten``).

    ``mean = sum(m x) / n``, ``var = sum(m (x - mean)^2) / (n - 1 if unbiased else n)``,
    ``out = (x - mean) * rsqrt(var + eps)`` (``+ mean`` if not ``shift_mean``) at valid
    positions and 0 at masked ones. With n <= 1 valid positions the output is all zeros
    (never NaN, no error). ``x``: any shape (at least 1-D), any float dtype; ``mask``: the
    same shape, bool/int/float. Returns float32 (fp64 for fp64 ``x``) of ``x``'s shape. With
    ``process_group`` the statistics are those of every rank's elements together. No
    gradient flows; no host synchronisation.
    """
    _checks.check_tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must be at least 1-D, got shape {list(x.shape)}")
    mask = _check_mask("mask", mask, x.shape, x.device)
    shift_mean = _checks.check_bool("shift_mean", shift_mean)
    unbiased = _checks.check_bool("unbiased", unbiased)
    eps = _checks.check_float("eps", eps, lo=0.0, hi=float("inf"), hi_open=True)
    process_group = _check_process_group(process_group)
    be = _backend.resolve(backend, x.device)
    shape = x.shape
    x2 = x.detach().reshape(math.prod(shape[:-1]), shape[-1])  # rows = all leading dims
    m2 = mask.reshape(x2.shape)
    if process_group is None:
        out = _masked_whiten(x2, m2, shift_mean, unbiased, eps, be)
    else:
        rows = _masked_row_stats(x2, m2, be)
        out = _whiten_distributed(x2, m2, rows, shift_mean, unbiased, eps, be, process_group)
    return out.reshape(shape)
