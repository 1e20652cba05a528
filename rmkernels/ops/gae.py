"""Building blocks of the PPO targets (docs/ops.md, "Building blocks"): GAE over given
token rewards (``rmk.gae``) and the per-token KL estimate (``rmk.kl_estimate``).

``rmk.ppo_advantages`` is KL (``kl_reference`` / the estimators here) + score + the GAE
recurrence (``gae_recurrence`` here) + whitening; the adapters use these two directly.

Ops (``torch.ops.rmkernels.*``):

==========================================  ===============================================
``gae(rewards, values, mask, gamma, lam)``  (advantages, returns), unwhitened
``kl_estimate(lp, ref, mask, estimator, clamp)``  the per-token KL estimate
``gae_kernel`` / ``kl_estimate_kernel``     the C++ CPU / CUDA kernels behind cpu/cuda;
                                            ``gae_kernel(..., returns)``: without returns
                                            only the advantages are written (the second
                                            output is an empty [0] tensor: REINFORCE++)
==========================================  ===============================================
"""
import torch

from rmkernels import _backend, _checks
from rmkernels._codes import KL_ESTIMATORS, LOW_VAR_KL_CLAMP, LOW_VAR_X_CLAMP, KLEstimator
from rmkernels._library import acc_dtype, acc_scalar, detached
from rmkernels._registry import Kernel, Op

KL_ESTIMATOR_NAMES = tuple(KL_ESTIMATORS)


# ---------------------------------------------------------------------------------------
# Reference implementation (pure PyTorch, the ground truth)
# ---------------------------------------------------------------------------------------
def kl_reference(x, code, x_clamp, kl_clamp):
    """The KL estimator ``code`` (``KLEstimator``) of x = logprobs - ref_logprobs (x_clamp clamps
    x first, kl_clamp the result; :func:`clamp_sym`)."""
    x = clamp_sym(x, x_clamp)
    if code == KLEstimator.K1:
        kl = x
    elif code == KLEstimator.ABS:
        kl = x.abs()
    elif code == KLEstimator.K2:
        kl = 0.5 * x * x
    else:
        kl = torch.exp(-x) - 1 + x
    return clamp_sym(kl, kl_clamp)


def clamp_sym(x, c):
    """x clamped to [-c, c], the clamp held as the kernels hold it (``acc_scalar``: rounded to
    x's dtype, the arithmetic dtype); a clamp of 0 there is none (scalar_math.h ``clamp_sym``:
    a direct kernel-op call's 1e-300 on float32 clamps nothing on every backend)."""
    c = acc_scalar(c, x.dtype)
    return x.clamp(-c, c) if c > 0 else x


def gae_recurrence(rewards, values, valid, gamma, lam):
    """verl's mask-aware GAE over the valid positions of each row, from the right:
    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next`` with
    ``V_next``, ``A_next`` those of the next valid position (0 after the last). ``rewards``
    and ``values`` [B, T] in the arithmetic dtype. Returns (advantages, returns), 0 where not
    ``valid``."""
    B, T = values.shape
    acc = values.dtype
    zero = torch.zeros((), dtype=acc, device=values.device)
    adv = torch.zeros(B, T, dtype=acc, device=values.device)
    next_v = torch.zeros(B, dtype=acc, device=values.device)
    next_a = torch.zeros(B, dtype=acc, device=values.device)
    gl = gamma * lam
    for t in reversed(range(T)):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gl * next_a
        adv[:, t] = torch.where(m, a, zero)
        next_v = torch.where(m, values[:, t], next_v)
        next_a = torch.where(m, a, next_a)
    returns = torch.where(valid, adv + values, zero)
    return adv, returns


def _reference_gae(rewards, values, mask, gamma, lam, returns):
    acc = acc_dtype(values.dtype)
    adv, ret = gae_recurrence(rewards.to(acc), values.to(acc), mask != 0, gamma, lam)
    return adv, ret if returns else ret.new_empty(0)


def _reference_kl(logprobs, ref_logprobs, mask, estimator, x_clamp, kl_clamp):
    acc = acc_dtype(logprobs.dtype)
    kl = kl_reference(logprobs.to(acc) - ref_logprobs.to(acc), estimator, x_clamp, kl_clamp)
    if mask is not None:
        kl = torch.where(mask != 0, kl, torch.zeros((), dtype=acc, device=kl.device))
    return kl.contiguous()


def estimator_args(estimator, clamp):
    """(code, x_clamp, kl_clamp) of the kernels for an estimator name and a result clamp (None:
    none); ``low_var_kl`` is k3 of x clamped to +-LOW_VAR_X_CLAMP, clamped to +-LOW_VAR_KL_CLAMP
    (or to a smaller ``clamp``)."""
    x_clamp = 0.0
    kc = float(clamp) if clamp is not None else 0.0
    if estimator == "low_var_kl":
        x_clamp = LOW_VAR_X_CLAMP
        kc = LOW_VAR_KL_CLAMP if clamp is None else min(kc, LOW_VAR_KL_CLAMP)
    return int(KL_ESTIMATORS[estimator]), x_clamp, kc


# ---------------------------------------------------------------------------------------
# Kernels and ops
# ---------------------------------------------------------------------------------------
def _gae_kernel_fake(rewards, values, mask, gamma, lam, returns):
    adv = values.new_empty(values.shape, dtype=acc_dtype(values.dtype))
    return adv, adv.new_empty(values.shape if returns else (0,))


def _gae_fake(rewards, values, mask, gamma, lam, *_):
    """The public gae's (advantages, returns): the kernel's with returns."""
    return _gae_kernel_fake(rewards, values, mask, gamma, lam, True)


def _kl_fake(logprobs, *_):
    return logprobs.new_empty(logprobs.shape, dtype=acc_dtype(logprobs.dtype))


gae_kernel = Kernel("gae_kernel", reference=_reference_gae, triton="ppo:gae", fake=_gae_kernel_fake)
kl_estimate_kernel = Kernel("kl_estimate_kernel", reference=_reference_kl, triton="ppo:kl_estimate", fake=_kl_fake)


def check_2d(name, t, shape=None, device=None, dtypes=_checks.FLOAT_DTYPES):
    """A [B, T] tensor argument (of ``shape`` when given)."""
    _checks.check_tensor(name, t, ndims=2, dtypes=dtypes, device=device)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (like the other inputs), got {list(t.shape)}")


def check_discount(gamma, lam=None):
    """``gamma`` >= 0 (finite) and ``lam`` in [0, 1] (when given), as floats: the one check of
    the discount options, in the public functions and the ops' check hooks alike."""
    gamma = _checks.check_nonneg("gamma", gamma)
    return gamma if lam is None else (gamma, _checks.check_float("lam", lam, lo=0.0, hi=1.0))


def check_clamp(name, value):
    """A clamp option: None (no clamp) or a finite value > 0, also in float32 (the kernels'
    arithmetic for fp32 / bf16 / fp16 inputs, where a clamp that rounds to 0 would be none)."""
    if value is None:
        return None
    v = _checks.check_float(name, value, lo=0.0, lo_open=True, hi=float("inf"), hi_open=True)
    if not acc_scalar(v, torch.float32) > 0:
        raise ValueError(f"{name} must be None or > 0 in float32 (the kernels' arithmetic), got {v!r}, which "
                         f"rounds to 0 there")
    return v


def _check_gae(rewards, values, mask, gamma, lam, backend):
    check_2d("rewards", rewards)
    check_2d("values", values, rewards.shape, rewards.device, (rewards.dtype,))
    check_2d("mask", mask, rewards.shape, rewards.device, (torch.bool,))
    check_discount(gamma, lam)


def _check_kl(logprobs, ref_logprobs, mask, estimator, clamp, backend):
    check_2d("logprobs", logprobs)
    check_2d("ref_logprobs", ref_logprobs, logprobs.shape, logprobs.device, (logprobs.dtype,))
    if mask is not None:
        check_2d("mask", mask, logprobs.shape, logprobs.device, (torch.bool,))
    check_estimator("estimator", estimator)
    check_clamp("clamp", clamp)


def _prepare_kl(logprobs, ref_logprobs, mask, estimator, clamp):
    return (logprobs, ref_logprobs, mask) + estimator_args(estimator, clamp)


# What the public functions call: the public ops, or their bodies in plain eager mode (no
# gradients: the inputs are used detached)
_gae = Op("gae", kernel=gae_kernel, prepare=lambda r, v, m, gamma, lam: (r, v, m, float(gamma), float(lam), True),
          fake=_gae_fake, check=_check_gae)
_kl_estimate = Op("kl_estimate", kernel=kl_estimate_kernel, prepare=_prepare_kl, fake=_kl_fake, check=_check_kl)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def check_estimator(name, estimator):
    if not isinstance(estimator, str):
        raise TypeError(f"{name} must be a str, one of {KL_ESTIMATOR_NAMES}, got {type(estimator).__name__}")
    return _checks.check_choice(name, estimator, KL_ESTIMATOR_NAMES)


def check_mask(name, mask, shape, device):
    """A mask of ``shape`` (bool/int/float) as the bool mask the kernels read."""
    _checks.check_tensor(name, mask, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (like the other inputs), got {list(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0


def common_float_dtype(*tensors):
    """The dtype mixed float inputs are brought to (float64 if one is float64, else float32),
    or None when they share one."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return None
    return torch.float64 if torch.float64 in dtypes else torch.float32


def gae(token_rewards, values, mask, *, gamma=1.0, lam=0.95, backend=None):
    """GAE advantages and returns of given per-token rewards (no whitening, no KL, no score).

    Args:
        token_rewards, values: ``[B, T]`` (fp32/bf16/fp16; fp64 computes and returns fp64; mixed
            dtypes are brought to one). Any strides.
        mask: ``[B, T]`` bool/int/float, non-zero at the positions the recurrence runs over
            (holes, left or right padding and empty rows allowed).
        gamma: discount, ``>= 0``; lam: GAE lambda in ``[0, 1]``.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None/``"auto"``.

    Returns ``(advantages, returns)``, each ``[B, T]`` float32 (fp64 for fp64 inputs), 0 at
    masked positions: verl's mask-aware recurrence over the valid positions of each row,
    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``, with
    ``V_next``, ``A_next`` those of the next valid position (0 after the last), and
    ``returns = A + V``. Rewards and values at masked positions are never read. The same
    recurrence as ``rmk.ppo_advantages`` (which adds the KL penalty, the score and the
    whitening). No gradient flows: the inputs are used detached. No host synchronisation.
    """
    check_2d("token_rewards", token_rewards)
    B, T = token_rewards.shape
    dev = token_rewards.device
    check_2d("values", values, (B, T), dev)
    mask = check_mask("mask", mask, (B, T), dev)
    gamma, lam = check_discount(gamma, lam)
    be = _backend.resolve(backend, dev)
    rewards, values = detached(token_rewards), detached(values)
    common = common_float_dtype(rewards, values)
    if common is not None:  # mixed dtypes: the kernels read one storage dtype
        rewards, values = rewards.to(common), values.to(common)
    return _gae(rewards, values, mask, gamma, lam, be)


def kl_estimate(logprobs, ref_logprobs, mask=None, *, estimator="k1", clamp=None, backend=None):
    """Per-token KL estimate of ``x = logprobs - ref_logprobs`` (forward values only).

    Args:
        logprobs, ref_logprobs: the same shape, at least 1-D (``[B, T]`` typically; fp32/bf16/
            fp16, fp64 computes and returns fp64; mixed dtypes are brought to one). Any strides.
        mask: None, or the same shape, bool/int/float: the estimate is 0 where it is 0.
        estimator: ``"k1"``/``"kl"`` = x, ``"abs"`` = |x|, ``"k2"``/``"mse"`` = 0.5 x^2,
            ``"k3"`` = exp(-x) - 1 + x, ``"low_var_kl"`` = k3 of x clamped to +-20, clamped to
            +-10 (verl; a smaller ``clamp`` also applies).
        clamp: clamp the estimate to ``[-c, c]`` (None: no clamp), ``c > 0``.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None/``"auto"``.

    Returns the estimate, float32 (fp64 for fp64 inputs), of the inputs' shape: the ``kl``
    that ``rmk.ppo_advantages`` computes. No gradient flows (the frameworks' straight-through
    gradients stay in ``rmkernels.integrations``). No host synchronisation.
    """
    _checks.check_tensor("logprobs", logprobs, dtypes=_checks.FLOAT_DTYPES)
    if logprobs.dim() < 1:
        raise ValueError(f"logprobs must be at least 1-D, got shape {list(logprobs.shape)}")
    shape, dev = logprobs.shape, logprobs.device
    _checks.check_tensor("ref_logprobs", ref_logprobs, dtypes=_checks.FLOAT_DTYPES, device=dev)
    if ref_logprobs.shape != shape:
        raise ValueError(f"ref_logprobs must have shape {list(shape)} (from logprobs), got {list(ref_logprobs.shape)}")
    if mask is not None:
        mask = check_mask("mask", mask, shape, dev)
    check_estimator("estimator", estimator)
    clamp = check_clamp("clamp", clamp)
    be = _backend.resolve(backend, dev)
    lp, ref = detached(logprobs), detached(ref_logprobs)
    common = common_float_dtype(lp, ref)
    if common is not None:
        lp, ref = lp.to(common), ref.to(common)
    if lp.dim() == 2:  # already rows: no views (a reshape costs ~1-2 us of host time)
        return _kl_estimate(lp, ref, mask, estimator, clamp, be)
    rows = (-1, shape[-1]) if shape[-1] > 0 else (int(torch.Size(shape[:-1]).numel()), 0)
    lp, ref = lp.reshape(rows), ref.reshape(rows)
    if mask is not None:
        mask = mask.reshape(rows)
    return _kl_estimate(lp, ref, mask, estimator, clamp, be).reshape(shape)
