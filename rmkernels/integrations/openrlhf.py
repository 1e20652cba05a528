"""OpenRLHF's PPO reward shaping, KL and GAE, backed by the fused ops.

Replace the import and keep the calls::

    # from openrlhf.models.utils import compute_approx_kl, compute_reward
    from rmkernels.integrations.openrlhf import compute_approx_kl, compute_reward

and for the experience maker's GAE, its REINFORCE returns and its batch normalisation of the
advantages::

    from rmkernels.integrations.openrlhf import get_advantages_and_returns, get_cumulative_returns
    from rmkernels.integrations.openrlhf import normalize_advantages

To make OpenRLHF's own trainer use them without editing OpenRLHF, call :func:`patch_openrlhf`
in its driver process (the experience maker's KL, reward, GAE and returns).

Same names, arguments (positional and keyword, same defaults) and numbers as **OpenRLHF
0.11.2** (``openrlhf.models.utils``, ``openrlhf.trainer.ppo_utils.experience_maker``; the
version compared, function by function, on random inputs with holes, empty rows, infinities
and every option), computed with :func:`rmkernels.ppo_advantages` / :func:`rmkernels.masked_whiten`.
``import rmkernels.integrations.openrlhf`` does not import OpenRLHF.

OpenRLHF's conventions, kept:

* ``compute_approx_kl`` computes in float32 (``.float()``), clamps every estimate to
  [-10, 10] and, for ``k3``, the log-ratio at -10 first; ``unbiased_gradient=True`` keeps the
  value and takes the gradient of ``w * k2`` (``w = exp(log_probs - log_probs_old)`` clamped
  at 10, detached).
* ``compute_reward`` adds the score at the last position whose ``action_mask`` is non-zero
  (a row with no valid position gets it at the last column, as OpenRLHF's ``argmax`` of an
  all-zero row does) and leaves ``-kl_coef * kl`` at every other position, masked or not.
* ``get_advantages_and_returns`` is **not** mask-aware: values and rewards are multiplied by
  the mask, then the plain recurrence runs over every position (a hole in the mask is a
  zero-value, zero-reward step). Returns are ``A + mask * V``.
* the batch normalisation of the advantages divides by the biased standard deviation,
  ``rsqrt(max(var, 1e-8))``.
* ``compute_reward`` is differentiable as OpenRLHF's sum is: ``-kl_coef`` for ``kl``, 1 for
  ``r`` at the position that gets it (the fused op's rewards carry no graph; the gradient is
  passed straight through).

Where the numbers differ, on purpose: ``normalize_advantages`` returns 0 at masked positions
(OpenRLHF shifts and scales them too; its losses mask them), and ignores whatever value a
masked position holds (OpenRLHF's ``sum(A * mask)`` turns a NaN or inf there into NaN
everywhere). ``compute_approx_kl`` where ``log_probs - log_probs_base`` is infinite with
``unbiased_gradient=True``: OpenRLHF's straight-through ``v + s - s.detach()`` gives NaN
(``inf - inf``), the adapter the clamped value; where it is finite, OpenRLHF's float32 ``v + s -
s.detach()`` rounds the value when ``s`` is large (up to 2.4e-5 relative in
``scripts/compare_dropins.py``'s cases), the adapter returns the estimator's value itself.
``normalize_advantages`` adds ``eps = 1e-8`` to the variance
where OpenRLHF clamps it at 1e-8 (relative difference ``5e-9 / var``; up to a factor sqrt(2)
for a batch whose variance is below 1e-8). ``compute_reward`` takes a position as an action where
``action_mask`` is non-zero (OpenRLHF's ``.long()`` makes 0.3 a non-action; it builds 0/1 masks).
Refused with an error that names them, where OpenRLHF computes: integer ``r`` or ``kl``
tensors, ``lambd`` outside [0, 1], a negative or non-finite ``gamma``, values that broadcast
(``[1, A]`` for ``[B, A]``), a packed sample with ``num_actions[i] = 0``.
"""
import math
import warnings

import torch

import rmkernels as rmk
from rmkernels.integrations._rl import (
    as_float,
    check_2d,
    check_same_shape,
    fused_kl,
    needs_grad,
    straight_through,
    token_reward_gae,
)

__all__ = ["compute_approx_kl", "compute_reward", "get_advantages_and_returns", "get_cumulative_returns",
           "normalize_advantages", "patch_openrlhf", "unpatch_openrlhf"]

OPENRLHF_VERSION_CHECKED = "0.11.2"
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CLAMP = 10.0  # OpenRLHF clamps every estimate to [-10, 10] ...
K3_LOG_RATIO_MIN = -10.0  # ... and the k3 log-ratio at -10 before the exp
KL_IS_WEIGHT_CLIP = 10.0  # unbiased_gradient: the importance weight's upper bound


def _openrlhf_kl_formula(log_ratio, kl_estimator):
    """OpenRLHF's differentiable estimate of a float32 log-ratio (the gradient path)."""
    if kl_estimator == "k1":
        value = log_ratio
    elif kl_estimator == "k2":
        value = log_ratio ** 2 / 2.0
    else:
        x = log_ratio.clamp(min=K3_LOG_RATIO_MIN)
        value = (-x).exp() - 1 + x
    return value.clamp(min=-KL_CLAMP, max=KL_CLAMP)


def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False,
                      *, action_mask=None):
    """OpenRLHF's per-token KL estimate between the actor and the initial model, float32.

    ``kl_estimator``: ``"k1"`` = x, ``"k2"`` = x^2 / 2, ``"k3"`` = exp(-x) - 1 + x with
    x = log_probs - log_probs_base clamped at -10 (k3 only); every estimate is clamped to
    [-10, 10]. ``unbiased_gradient=True``: the same value, the gradient of ``w * x^2 / 2`` with
    ``w = exp(log_probs - log_probs_old)`` clamped at 10 and detached (1 without
    ``log_probs_old``). The tensors may broadcast, as in OpenRLHF.

    ``action_mask`` (keyword only; older OpenRLHF): the log-ratio is multiplied by it first.
    A ``log_probs_old`` that is not a tensor (``compute_approx_kl(lp, base, "k3")``, the older
    positional order) is a ``TypeError``; OpenRLHF ignores it and computes k1.

    The value comes from the fused op; when an input requires grad (OpenRLHF's
    ``use_kl_loss``), the gradient is that of OpenRLHF's formula, clamps included.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if log_probs_old is not None and not isinstance(log_probs_old, torch.Tensor):
        # OpenRLHF ignores it without unbiased_gradient, so compute_approx_kl(lp, base, "k3") silently
        # computes k1 there: refused here
        raise TypeError(f"log_probs_old (the third positional argument) must be a torch.Tensor or None, got "
                        f"{type(log_probs_old).__name__}; pass kl_estimator= by keyword")
    for name, t in (("log_probs", log_probs), ("log_probs_base", log_probs_base), ("action_mask", action_mask)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    try:
        shape = torch.broadcast_shapes(log_probs.shape, log_probs_base.shape,
                                       *(() if action_mask is None else (action_mask.shape,)))
    except RuntimeError:
        raise ValueError(f"log_probs {tuple(log_probs.shape)}, log_probs_base {tuple(log_probs_base.shape)}"
                         + ("" if action_mask is None else f" and action_mask {tuple(action_mask.shape)}")
                         + " do not broadcast together") from None
    flat = (1, 1) if len(shape) == 0 else (math.prod(shape[:-1]), shape[-1])
    lp, base = log_probs.detach().float(), log_probs_base.detach().float()
    if kl_estimator == "k3" or action_mask is not None:
        # the clamp (and the older mask) act on the float32 log-ratio: one pass to build it
        x = lp - base
        if action_mask is not None:
            x = x * action_mask
        lp, base = x.clamp(min=K3_LOG_RATIO_MIN) if kl_estimator == "k3" else x, torch.zeros((), device=x.device)
    lp, base = lp.expand(shape).reshape(flat), base.expand(shape).reshape(flat)
    value = fused_kl(lp, base, kl_estimator, kl_clamp=KL_CLAMP).reshape(shape)
    if not needs_grad(log_probs, log_probs_base):
        return value
    log_ratio = log_probs.float() - log_probs_base.float()
    if action_mask is not None:
        log_ratio = log_ratio * action_mask
    if not unbiased_gradient:
        g = _openrlhf_kl_formula(log_ratio, kl_estimator)
    else:
        w = 1.0
        if log_probs_old is not None:
            w = (log_probs.float() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
        g = w * (log_ratio ** 2 / 2.0)
    return straight_through(value, g)


def _eos_score_rows(r, kl, action_mask, kl_coef):
    """OpenRLHF's rewards of one padded batch [B, T]."""
    out = rmk.ppo_advantages(kl, torch.zeros((), dtype=kl.dtype, device=kl.device).expand(kl.shape),
                             torch.zeros((), dtype=torch.float32, device=kl.device).expand(kl.shape),
                             r.reshape(-1), action_mask, kl_coef=kl_coef, gamma=1.0, lam=1.0,
                             kl_estimator="k1", whiten=False)
    valid = action_mask != 0
    acc = out.rewards.dtype  # the op's arithmetic dtype: float32, float64 for a float64 kl
    rewards = torch.where(valid, out.rewards, -kl_coef * kl.to(acc))
    if kl.shape[1] > 0:  # a row with no valid action: OpenRLHF's argmax(all zeros) puts r at the end
        empty = ~valid.any(dim=1)
        rewards[:, -1] += torch.where(empty, r.reshape(-1).to(acc), torch.zeros_like(rewards[:, -1]))
    if needs_grad(kl, r) and kl.shape[1] > 0:
        # the fused op's outputs are targets, without a graph; OpenRLHF's sum is differentiable:
        # -kl_coef per token of kl, 1 for r at the position that gets it
        T = kl.shape[1]
        last = T - 1 - valid.flip(1).to(torch.uint8).argmax(1, keepdim=True)  # T - 1 for an empty row too
        score = torch.zeros_like(rewards).scatter(1, last, r.reshape(-1, 1).to(acc))
        rewards = straight_through(rewards, -kl_coef * kl.to(acc) + score)
    return rewards.to(kl.dtype)


def compute_reward(r, kl_coef, kl, action_mask=None, reward_clip_range=None, *, num_actions=None):
    """Per-token rewards ``-kl_coef * kl`` plus the score ``r`` at each row's last action
    (OpenRLHF 0.11.2's signature; ``num_actions``, keyword only, serves the packed lists of
    older OpenRLHF).

    Args:
        r: ``[B]`` scores (a float is broadcast).
        kl_coef: the KL coefficient; values <= 0 mean no penalty.
        kl: ``[B, A]`` per-token KL, or (packed samples, older OpenRLHF) a list of 1-D tensors
            with ``num_actions`` their lengths (the score goes at ``num_actions[i] - 1``).
        action_mask: ``[B, A]`` (required with a tensor ``kl``).
        reward_clip_range: ``(lo, hi)``: ``r`` is clamped to it first.
        num_actions: keyword only, with a list ``kl``.

    Returns a tensor of ``kl``'s shape and dtype (or a list, for a list ``kl``). Computed in
    float32 and rounded once to that dtype: with a bf16 / fp16 ``kl`` (OpenRLHF's own pipeline
    passes float32) a value may land one step of that dtype from OpenRLHF's, which rounds
    ``-kl_coef * kl`` and the sum separately.
    """
    kl_coef = as_float("kl_coef", kl_coef)
    if kl_coef <= 0.0:
        kl_coef = 0.0
    packed = isinstance(kl, (list, tuple))
    if not packed:
        check_2d("kl", kl)
    if not isinstance(r, torch.Tensor):
        n, dev = (len(kl), kl[0].device if kl else None) if packed else (kl.shape[0], kl.device)
        r = torch.full((n,), as_float("r", r), dtype=torch.float32, device=dev)
    if packed:
        return _compute_reward_packed(r, kl_coef, kl, num_actions, reward_clip_range)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if action_mask is None:
        raise ValueError("compute_reward needs action_mask with a [B, A] kl tensor (num_actions goes with a list kl)")
    check_same_shape("kl", kl, action_mask=action_mask)
    if r.numel() != kl.shape[0]:
        raise ValueError(f"r must have one score per row of kl ({kl.shape[0]}), got shape {tuple(r.shape)}")
    return _eos_score_rows(r, kl, action_mask, kl_coef)


def _compute_reward_packed(r, kl_coef, kl, num_actions, reward_clip_range):
    if num_actions is None or len(num_actions) != len(kl):
        raise ValueError("a list kl needs num_actions, one length per sequence")
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    lengths = [int(n) for n in num_actions]
    if not kl:
        return []
    T = max(k.shape[0] for k in kl)
    dev, dtype = kl[0].device, kl[0].dtype
    padded = torch.zeros(len(kl), T, dtype=dtype, device=dev)
    mask = torch.zeros(len(kl), T, dtype=torch.bool, device=dev)
    for i, (k, n) in enumerate(zip(kl, lengths)):
        if not 1 <= n <= k.shape[0]:
            raise ValueError(f"num_actions[{i}] = {n} must be in [1, {k.shape[0]}] (the length of kl[{i}])")
        padded[i, :k.shape[0]] = k
        mask[i, :n] = True
    rows = _eos_score_rows(r, padded, mask, kl_coef)
    return [rows[i, :k.shape[0]] for i, k in enumerate(kl)]


def get_advantages_and_returns(values, rewards, action_mask, gamma, lambd):
    """OpenRLHF's GAE (``advantage_estimator="gae"``), unwhitened.

    ``values``, ``rewards``, ``action_mask``: ``[B, A]`` (or, packed samples, lists of 1-D
    tensors, the mask then unused as in OpenRLHF). Values and rewards are multiplied by the
    mask, then ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lambd *
    A_{t+1}`` over every position. Returns ``(advantages, returns)`` float32 (float64 for
    float64 inputs), ``returns = A + V``.
    """
    gamma, lambd = as_float("gamma", gamma), as_float("lambd", lambd)
    if isinstance(values, (list, tuple)):
        if not isinstance(rewards, (list, tuple)) or len(rewards) != len(values):
            raise ValueError("packed samples: values and rewards must be lists of the same length")
        if not values:
            return [], []
        T = max(v.shape[0] for v in values)
        dev = values[0].device
        V = torch.zeros(len(values), T, dtype=torch.float32, device=dev)
        R = torch.zeros(len(values), T, dtype=torch.float32, device=dev)
        for i, (v, r) in enumerate(zip(values, rewards)):
            check_same_shape(f"values[{i}]", v, **{f"rewards[{i}]": r})
            V[i, :v.shape[0]] = v
            R[i, :r.shape[0]] = r
        # trailing zero rewards and values leave the earlier positions unchanged
        out = token_reward_gae(R, V, torch.ones((), dtype=torch.bool, device=dev).expand(V.shape),
                               gamma=gamma, lam=lambd, whiten=False)
        n = [v.shape[0] for v in values]
        return [out.advantages[i, :k] for i, k in enumerate(n)], [out.returns[i, :k] for i, k in enumerate(n)]
    check_2d("values", values)
    check_same_shape("values", values, rewards=rewards, action_mask=action_mask)
    if action_mask is not None:
        values = action_mask * values
        rewards = action_mask * rewards
    everywhere = torch.ones((), dtype=torch.bool, device=values.device).expand(values.shape)
    out = token_reward_gae(rewards, values, everywhere, gamma=gamma, lam=lambd, whiten=False)
    return out.advantages, out.returns


def get_cumulative_returns(rewards, action_mask, gamma):
    """OpenRLHF's REINFORCE returns (``RemoteExperienceMaker.get_cumulative_returns``: the
    estimators ``reinforce``, ``rloo``, ``reinforce_baseline``, ``group_norm``, ``dr_grpo``,
    ``flash_reinforce``), one fused op instead of its loop over the positions.

    ``rewards``, ``action_mask``: ``[B, A]`` (the mask may be None). As in OpenRLHF the rewards
    are multiplied by the mask, then ``R_t = r_t + gamma * R_{t+1}`` over **every** position
    (not mask-aware: a hole in the mask is a zero-reward step that is discounted, and gets its
    return written). Returns ``R``, float32 (float64 for float64 rewards).
    """
    gamma = as_float("gamma", gamma)
    check_2d("rewards", rewards)
    check_same_shape("rewards", rewards, action_mask=action_mask)
    if action_mask is not None:
        rewards = action_mask * rewards
    zeros = torch.zeros((), dtype=rewards.dtype, device=rewards.device).expand(rewards.shape)
    everywhere = torch.ones((), dtype=torch.bool, device=rewards.device).expand(rewards.shape)
    return token_reward_gae(rewards, zeros, everywhere, gamma=gamma, lam=1.0, whiten=False).advantages


def normalize_advantages(advantages, action_mask, *, no_advantage_std_norm=False, eps=1e-8, process_group=None):
    """OpenRLHF's normalisation of the GAE/REINFORCE advantages over the whole rollout batch.

    ``advantages``, ``action_mask``: ``[B, A]`` tensors, or lists of them (one per experience,
    possibly of different lengths: the statistics are over all of them together).
    ``mean = sum(m A) / n``, ``var = sum(m (A - mean)^2) / n`` (biased), ``A = (A - mean) *
    rsqrt(var + eps)``; ``no_advantage_std_norm=True`` only subtracts the mean. With
    ``process_group`` the statistics are those of every rank (all-reduced on the device).
    Returns the same structure, float32, 0 at masked positions; the values at masked
    positions (NaN, inf, anything) never reach the statistics.
    """
    is_list = isinstance(advantages, (list, tuple))
    advs = list(advantages) if is_list else [advantages]
    masks = list(action_mask) if is_list else [action_mask]
    if len(advs) != len(masks):
        raise ValueError(f"{len(advs)} advantage tensors but {len(masks)} action masks")
    if not advs:
        return []
    for i, (a, m) in enumerate(zip(advs, masks)):
        check_same_shape(f"advantages[{i}]", a, **{f"action_mask[{i}]": m})
    flat = torch.cat([a.reshape(-1).float() for a in advs])
    fmask = torch.cat([(m.reshape(-1) != 0) for m in masks])
    if no_advantage_std_norm:
        # where(), not flat * fmask: a NaN or inf at a masked position must not reach the sum
        stats = torch.stack([torch.where(fmask, flat, torch.zeros_like(flat)).sum(), fmask.sum().float()]).double()
        if process_group is not None:
            torch.distributed.all_reduce(stats, group=process_group)
        mean = (stats[0] / stats[1].clamp(min=1)).float()
        out = torch.where(fmask, flat - mean, torch.zeros_like(flat))
    else:
        out = rmk.masked_whiten(flat, fmask, shift_mean=True, unbiased=False, eps=eps, process_group=process_group)
    pieces, start = [], 0
    for a in advs:
        pieces.append(out[start:start + a.numel()].reshape(a.shape))
        start += a.numel()
    return pieces if is_list else pieces[0]


def _experience_maker_method(fn):
    """``fn`` as a method of OpenRLHF's ``RemoteExperienceMaker`` (``self`` unused; no grad, as
    OpenRLHF's methods)."""
    @torch.no_grad()
    def method(self, *args, **kwargs):
        return fn(*args, **kwargs)

    method.__name__ = method.__qualname__ = fn.__name__
    method.__doc__ = fn.__doc__
    method.__wrapped__ = fn
    return method


# (module attribute, module-level replacement) and (RemoteExperienceMaker method, replacement)
_PATCHED_FUNCTIONS = {"compute_approx_kl": compute_approx_kl, "compute_reward": compute_reward}
_PATCHED_METHODS = {"get_advantages_and_returns": _experience_maker_method(get_advantages_and_returns),
                    "get_cumulative_returns": _experience_maker_method(get_cumulative_returns)}
_ORIGINALS = {}  # ("attr" | "method", name) -> OpenRLHF's object, while patched


def _experience_maker():
    try:
        from openrlhf.trainer.ppo_utils import experience_maker
    except ImportError as e:
        raise ImportError(f"patch_openrlhf needs OpenRLHF (checked against OpenRLHF {OPENRLHF_VERSION_CHECKED}: "
                          f"pip install openrlhf=={OPENRLHF_VERSION_CHECKED}); importing its experience maker "
                          f"failed: {e}") from e
    return experience_maker


def patch_openrlhf():
    """Make a running OpenRLHF trainer use these drop-ins, without editing OpenRLHF: in
    ``openrlhf.trainer.ppo_utils.experience_maker``, ``compute_approx_kl`` and ``compute_reward``
    (module attributes, looked up at each call by ``make_experience`` /
    ``compute_advantages_and_returns``) and ``RemoteExperienceMaker``'s
    ``get_advantages_and_returns`` (GAE) and ``get_cumulative_returns`` (the REINFORCE family),
    OpenRLHF's loops over the response positions, become the fused ones here. ::

        import rmkernels.integrations.openrlhf as rmk_openrlhf
        rmk_openrlhf.patch_openrlhf()    # in the driver, before the trainer is built

    The experience maker runs in the driver, so that process is the one to patch (Ray workers
    keep OpenRLHF's functions; the KL loss of ``use_kl_loss`` runs there). What stays
    OpenRLHF's: the critic-free reward shaping and the advantages' normalisation (vectorised
    already; their drop-ins are ``openrlhf_critic_free.shape_rewards`` and
    :func:`normalize_advantages`). Modules that imported a name before keep the object they
    imported; a method or attribute already replaced by someone else is left as it is.
    Patching twice is a no-op; :func:`unpatch_openrlhf` restores OpenRLHF's. Returns the names
    now served by rmkernels. An OpenRLHF other than 0.11.x gets a ``UserWarning``."""
    em = _experience_maker()
    try:
        from importlib.metadata import version
        installed = version("openrlhf")
    except Exception:  # a source checkout without metadata: nothing to compare
        installed = None
    if installed is not None and not installed.startswith("0.11."):
        warnings.warn(f"rmkernels' OpenRLHF drop-ins follow OpenRLHF {OPENRLHF_VERSION_CHECKED}; this is "
                      f"OpenRLHF {installed}: check their signatures against it", UserWarning, stacklevel=2)
    served = []
    for kind, holder, table in _patch_sites(em):
        for name, new in table.items():
            current = vars(holder).get(name)
            if current is new:
                served.append(name)
            elif current is not None and getattr(current, "__module__", "").startswith("openrlhf"):
                _ORIGINALS[(kind, name)] = current
                setattr(holder, name, new)
                served.append(name)
    return served


def _patch_sites(em):
    return (("attr", em, _PATCHED_FUNCTIONS), ("method", em.RemoteExperienceMaker, _PATCHED_METHODS))


def unpatch_openrlhf():
    """Undo :func:`patch_openrlhf` (what was changed since by someone else is left as it is). A
    no-op when not patched."""
    if not _ORIGINALS:
        return
    sites = {kind: (holder, table) for kind, holder, table in _patch_sites(_experience_maker())}
    for (kind, name), original in list(_ORIGINALS.items()):
        holder, table = sites[kind]
        if vars(holder).get(name) is table[name]:
            setattr(holder, name, original)
    _ORIGINALS.clear()
