"""PPO KL-penalized rewards, GAE advantages and whitening (docs/ops.md, "PPO advantages").

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

import torch

from rmkernels import _backend, _checks
from rmkernels._library import acc_dtype, as_dtype, detached
from rmkernels._registry import Kernel, Op
from rmkernels.ops.gae import (
    check_clamp,
    check_discount,
    check_estimator,
    check_mask,
    clamp_sym,
    common_float_dtype,
    estimator_args,
    gae_recurrence,
    kl_reference,
)

PPOAdvantages = namedtuple("PPOAdvantages", ["advantages", "returns", "rewards", "kl"])

DEFAULT_WHITEN_EPS = 1e-8  # TRL / OpenRLHF / verl masked_whiten


# ---------------------------------------------------------------------------------------
# Reference implementation (pure PyTorch, the ground truth)
# ---------------------------------------------------------------------------------------
def _reference_ppo_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, code, x_clamp, kl_clamp,
                       score_clip):
    """KL + score at the last valid position + the mask-aware GAE (``gae_recurrence``)."""
    acc = acc_dtype(values.dtype)
    B, T = values.shape
    valid = mask != 0
    zero = torch.zeros((), dtype=acc, device=values.device)
    kl = kl_reference(logprobs.to(acc) - ref_logprobs.to(acc), code, x_clamp, kl_clamp)
    kl = torch.where(valid, kl, zero)
    s = clamp_sym(scores.to(acc), score_clip)
    rewards = -kl_coef * kl
    pos = torch.arange(T, device=values.device).expand(B, T)
    last = torch.where(valid, pos, torch.full_like(pos, -1)).amax(dim=1) if T > 0 else pos.new_full((B,), -1)
    rewards = torch.where(pos == last[:, None], rewards + s[:, None], rewards)  # no match when last = -1
    rewards = torch.where(valid, rewards, zero)
    adv, returns = gae_recurrence(rewards, values.to(acc), valid, gamma, lam)
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
# Kernels and ops
# ---------------------------------------------------------------------------------------
def _gae_fake(logprobs, ref_logprobs, values, *_):
    B, T = logprobs.shape
    acc = acc_dtype(values.dtype)
    outs = tuple(logprobs.new_empty(B, T, dtype=acc) for _ in range(4))
    return outs + (logprobs.new_empty(B, 2, dtype=torch.float64),)


def _row_stats_fake(x, *_):
    return x.new_empty(x.shape[0], 2, dtype=torch.float64)


def _centered_sq_fake(x, *_):
    return x.new_empty(x.shape[0], dtype=torch.float64)


def _whitened_fake(x, *_):
    return x.new_empty(x.shape, dtype=acc_dtype(x.dtype))


ppo_gae_kernel = Kernel("ppo_gae_kernel", reference=_reference_ppo_gae, triton="ppo:ppo_gae", fake=_gae_fake)
row_stats_kernel = Kernel("masked_row_stats_kernel", reference=_reference_row_stats, triton="ppo:masked_row_stats",
                          fake=_row_stats_fake)
centered_sq_kernel = Kernel("masked_centered_sq_kernel", reference=_reference_centered_sq,
                            triton="ppo:masked_centered_sq", fake=_centered_sq_fake)
whiten_apply_kernel = Kernel("masked_whiten_apply_kernel", reference=_reference_whiten_apply,
                             triton="ppo:masked_whiten_apply", fake=_whitened_fake)


def _prepare_ppo_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator, kl_clamp,
                     score_clip):
    code, x_clamp, kc = estimator_args(kl_estimator, kl_clamp)
    sc = float(score_clip) if score_clip is not None else 0.0
    scores = as_dtype(scores, acc_dtype(values.dtype)).contiguous()
    return (logprobs, ref_logprobs, values, scores, mask, float(kl_coef), float(gamma), float(lam), code, x_clamp,
            kc, sc)


def _whiten_local(x, mask, row_stats, shift_mean, unbiased, eps, backend):
    """Whitening of a [B, T] batch from its per-row (count, sum) partials, one process."""
    totals = row_stats.sum(0)
    sq = centered_sq_kernel(backend, x, mask, totals).sum(0, keepdim=True)
    return whiten_apply_kernel(backend, x, mask, totals, sq, shift_mean, unbiased, eps)


def _ppo_advantages_body(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator,
                         kl_clamp, score_clip, whiten, shift_mean, unbiased, eps, backend):
    adv, ret, rew, kl, rows = _ppo_gae.body(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam,
                                            kl_estimator, kl_clamp, score_clip, backend)
    if whiten:
        adv = _whiten_local(adv, mask, rows, shift_mean, unbiased, eps, backend)
    return adv, ret, rew, kl


def masked_whiten_body(x, mask, shift_mean, unbiased, eps, backend):
    rows = row_stats_kernel(backend, x, mask)
    return _whiten_local(x, mask, rows, shift_mean, unbiased, eps, backend)


def _check_x_mask(x, mask, x_name="x"):
    _checks.check_tensor(x_name, x, ndims=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor("mask", mask, ndims=2, dtypes=(torch.bool,), device=x.device)
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of {x_name} {list(x.shape)}, got {list(mask.shape)}")


def _check_stats(name, t, n, device):
    _checks.check_tensor(name, t, ndims=1, dtypes=(torch.float64,), device=device)
    if t.shape[0] != n:
        raise ValueError(f"{name} must be float64 [{n}], got shape {list(t.shape)}")


def check_ppo_options(kl_coef, gamma, lam, kl_estimator, kl_clamp, score_clip):
    """The options of the PPO advantages (public function and check hooks alike), as floats."""
    kl_coef = check_kl_coef(kl_coef)
    gamma, lam = check_discount(gamma, lam)
    check_estimator("kl_estimator", kl_estimator)
    return kl_coef, gamma, lam, check_clamp("kl_clamp", kl_clamp), check_clamp("score_clip", score_clip)


def check_kl_coef(kl_coef):
    """``kl_coef`` finite (any sign), as a float (also the Triton host function's rule)."""
    return _checks.check_float("kl_coef", kl_coef, lo=float("-inf"), hi=float("inf"), lo_open=True, hi_open=True)


def check_whiten_options(shift_mean, unbiased, eps):
    """The whitening options (public functions and check hooks alike)."""
    return (_checks.check_bool("shift_mean", shift_mean), _checks.check_bool("unbiased", unbiased),
            _checks.check_nonneg("eps", eps))


def _check_ppo_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator, kl_clamp,
                   score_clip, *_):
    _checks.check_tensor("logprobs", logprobs, ndims=2, dtypes=_checks.FLOAT_DTYPES)
    B, T = logprobs.shape
    for name, t in (("ref_logprobs", ref_logprobs), ("values", values)):
        _checks.check_tensor(name, t, ndims=2, dtypes=(logprobs.dtype,), device=logprobs.device)
        if tuple(t.shape) != (B, T):
            raise ValueError(f"{name} must have shape [B, T] = [{B}, {T}] (from logprobs), got {list(t.shape)}")
    _checks.check_tensor("scores", scores, ndims=1, dtypes=_checks.FLOAT_DTYPES, device=logprobs.device)
    if scores.shape[0] != B:
        raise ValueError(f"scores must have shape [B] = [{B}] (from logprobs), got {list(scores.shape)}")
    _check_x_mask(logprobs, mask, "logprobs")
    check_ppo_options(kl_coef, gamma, lam, kl_estimator, kl_clamp, score_clip)


def _check_ppo_advantages(*args):
    _check_ppo_gae(*args[:11])
    _checks.check_bool("whiten", args[11])
    check_whiten_options(*args[12:15])


# What the public functions call: the public ops, or their bodies in plain eager mode (no
# gradients: the inputs are used detached)
_ppo_gae = Op("ppo_gae", kernel=ppo_gae_kernel, prepare=_prepare_ppo_gae, fake=_gae_fake, check=_check_ppo_gae)
_masked_row_stats = Op("masked_row_stats", kernel=row_stats_kernel, fake=_row_stats_fake,
                       check=lambda x, mask, backend: _check_x_mask(x, mask))
_masked_centered_sq = Op(
    "masked_centered_sq", kernel=centered_sq_kernel, fake=_centered_sq_fake,
    check=lambda x, mask, totals, backend: (_check_x_mask(x, mask), _check_stats("totals", totals, 2, x.device)))
_masked_whiten_apply = Op(
    "masked_whiten_apply", kernel=whiten_apply_kernel, fake=_whitened_fake,
    check=lambda x, mask, totals, sq, shift_mean, unbiased, eps, backend: (
        _check_x_mask(x, mask), _check_stats("totals", totals, 2, x.device), _check_stats("sq", sq, 1, x.device),
        check_whiten_options(shift_mean, unbiased, eps)))
_ppo_advantages = Op("ppo_advantages", body=_ppo_advantages_body, fake=lambda *a: _gae_fake(*a)[:4],
                     check=_check_ppo_advantages)
_masked_whiten = Op("masked_whiten", body=masked_whiten_body, fake=_whitened_fake,
                    check=lambda x, mask, shift_mean, unbiased, eps, backend: (
                        _check_x_mask(x, mask), check_whiten_options(shift_mean, unbiased, eps)))


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
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
    mask = check_mask("mask", mask, (B, T), dev)
    kl_coef, gamma, lam, kl_clamp, score_clip = check_ppo_options(kl_coef, gamma, lam, kl_estimator, kl_clamp,
                                                                  score_clip)
    whiten = _checks.check_bool("whiten", whiten)
    shift_mean, unbiased, eps = check_whiten_options(shift_mean, unbiased, eps)
    process_group = _check_process_group(process_group)
    be = _backend.resolve(backend, dev)

    # Targets, not a graph: the op never sees autograd.
    logprobs, ref_logprobs, values, scores = map(detached, (logprobs, ref_logprobs, values, scores))
    common = common_float_dtype(logprobs, ref_logprobs, values)
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

    With ``m`` the mask as 0 / 1 (non-zero = valid: a float mask's values are not weights) and
    ``n = sum(m)``: ``mean = sum(m x) / n``, ``var = sum(m (x - mean)^2) / (n - 1 if unbiased
    else n)``, ``out = (x - mean) * rsqrt(var + eps)`` (``+ mean`` if not ``shift_mean``) at
    valid positions and 0 at masked ones. With n <= 1 valid positions the output is all zeros
    (never NaN, no error). ``x``: any shape (at least 1-D), any float dtype; ``mask``: the
    same shape, bool/int/float. Returns float32 (fp64 for fp64 ``x``) of ``x``'s shape. With
    ``process_group`` the statistics are those of every rank's elements together. No
    gradient flows; no host synchronisation.
    """
    _checks.check_tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must be at least 1-D, got shape {list(x.shape)}")
    mask = check_mask("mask", mask, x.shape, x.device)
    shift_mean, unbiased, eps = check_whiten_options(shift_mean, unbiased, eps)
    process_group = _check_process_group(process_group)
    be = _backend.resolve(backend, x.device)
    shape = x.shape
    x2 = detached(x)
    if x2.dim() != 2:  # rows = all leading dims (a [B, T] x is rows already: no views, ~1-2 us each)
        x2 = x2.reshape(math.prod(shape[:-1]), shape[-1])
        mask = mask.reshape(x2.shape)
    if process_group is None:
        out = _masked_whiten(x2, mask, shift_mean, unbiased, eps, be)
    else:
        rows = _masked_row_stats(x2, mask, be)
        out = _whiten_distributed(x2, mask, rows, shift_mean, unbiased, eps, be, process_group)
    return out if out.shape == shape else out.reshape(shape)
