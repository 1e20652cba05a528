"""Critic-free group advantages: GRPO, Dr. GRPO, RLOO, OPO, GPG, REINFORCE++(-baseline)
(SPEC section 5).

``rmk.group_advantages`` compares the responses sampled for the same prompt: per group g
(the responses with the same group id) with n members, sum s, mean mu = s / n and std sigma,

=========================  ==========================================================
``grpo``                   (r - mu) / (sigma + eps)
``dr_grpo``                r - mu
``rloo``                   (n r - s) / (n - 1)         (leave-one-out mean as baseline)
``opo``                    r - sum(len r) / sum(len)   (len = valid tokens of the row)
``gpg``                    alpha (r - mu) / f_norm,    alpha = B / max(count_nonzero(r), 1)
``reinforce_pp_baseline``  r - mu, then whitened over all valid tokens of the batch
=========================  ==========================================================

and broadcasts the per-sequence value over the valid tokens. A group of one response is
the ``single`` rule: ``"zero"`` (verl's loops) takes mu = 0, sigma = 1 and a zero
leave-one-out / length baseline, so the response keeps its score (``grpo``: r / (1 + eps),
``gpg``: alpha r / f_norm); ``"self"`` makes the response its own baseline (mu = r), so its
advantage is 0 (verl's ``rloo_vectorized``; OpenRLHF's ``r - mean`` of a group of one).
``rmk.reinforce_pp_returns`` is REINFORCE++'s masked discounted return.

Ops (``torch.ops.rmkernels.*``):

=============================================  =============================================
``group_advantages(scores, ids, mask, ...)``   (seq_advantages [B], advantages [B, T]): the
                                               public op (``scores`` already [B] float32/64)
``group_advantages_kernel(...)``               the C++ CPU / CUDA kernel (Triton:
                                               ``rmkernels.triton.group_adv``)
``reinforce_pp_returns(rewards, mask, ...)``   returns [B, T], the public op
``reinforce_pp_returns_kernel(...)``           its C++ CPU / CUDA kernel
=============================================  =============================================

Every backend computes the group statistics in float64 (count, sum, then the centred sum
of squares from the mean: two passes, no cancellation; OPO's sums of len and len r; GPG's
nonzero count) and the per-sequence formula in float64, rounded once to the output dtype
(float32, float64 for float64 inputs). No host synchronisation: the statistics live in
device buffers indexed by group id, so ids must lie in [0, B) (``rmk.group_ids`` makes such
ids from any labels). A NaN score makes its own group NaN and nothing else (``gpg``'s
count of nonzero scores counts it as nonzero, as ``torch.count_nonzero`` does; the
``reinforce_pp_baseline`` whitening spreads it over the batch, as any whitening does).
"""
from collections import namedtuple

import numpy as np
import torch
from torch import Tensor

from rmkernels import _backend, _checks
from rmkernels._codes import GROUP_ESTIMATORS, GROUP_SINGLES, GroupEstimator, GroupSingle
from rmkernels._library import acc_dtype, define_kernel_op, eager_fast_path
from rmkernels.ops import ppo as _ppo

GroupAdvantages = namedtuple("GroupAdvantages", ["seq_advantages", "advantages"])

DEFAULT_EPS = 1e-6  # verl's epsilon of the GRPO std
DEFAULT_WHITEN_EPS = 1e-8  # verl's masked_whiten (reinforce_pp_baseline)

# ---------------------------------------------------------------------------------------
# Kernel ops (C++ CPU / CUDA implementations: csrc/cpu/group_adv.cpp, csrc/cuda/group_adv*)
# ---------------------------------------------------------------------------------------
_group_kernel = define_kernel_op(
    "group_advantages_kernel(Tensor scores, Tensor group_ids, Tensor mask, int estimator, float eps, "
    "bool unbiased, int single, float f_norm) -> (Tensor, Tensor)")
_returns_kernel = define_kernel_op("reinforce_pp_returns_kernel(Tensor rewards, Tensor mask, float gamma) -> Tensor")


def _group_fake(scores, mask):
    B, T = mask.shape
    acc = acc_dtype(scores.dtype)
    return scores.new_empty(B, dtype=acc), scores.new_empty(B, T, dtype=acc)


@torch.library.register_fake("rmkernels::group_advantages_kernel")
def _(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm):
    return _group_fake(scores, mask)


@torch.library.register_fake("rmkernels::reinforce_pp_returns_kernel")
def _(rewards, mask, gamma):
    return rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards.dtype))


# ---------------------------------------------------------------------------------------
# Reference implementation (pure PyTorch, vectorised over groups: index_add_ by group id)
# ---------------------------------------------------------------------------------------
def _reference_group(scores, group_ids, mask, code, eps, unbiased, single, f_norm):
    """The ground truth. scores [B] (float32/64), group_ids int [B] in [0, B), mask bool [B, T]."""
    acc = acc_dtype(scores.dtype)
    B, T = mask.shape
    f64 = torch.float64
    dev = scores.device
    r = scores.to(f64)
    g = group_ids.long()
    n = torch.zeros(B, dtype=f64, device=dev).index_add_(0, g, torch.ones_like(r))[g]
    s = torch.zeros(B, dtype=f64, device=dev).index_add_(0, g, r)[g]
    one = n <= 1  # a group of one (every row's group has n >= 1)
    mu_single = r if single == GroupSingle.SELF else torch.zeros_like(r)
    mu = torch.where(one, mu_single, s / n)
    base = r - mu
    if code == GroupEstimator.GRPO:
        d = r - s / n
        sq = torch.zeros(B, dtype=f64, device=dev).index_add_(0, g, d * d)[g]
        den = n - 1 if unbiased else n
        sigma = torch.where(one, torch.ones_like(r), torch.sqrt(sq / torch.where(one, torch.ones_like(den), den)))
        seq = base / (sigma + eps)
    elif code == GroupEstimator.RLOO:
        seq = torch.where(one, base, (n * r - s) / torch.where(one, torch.ones_like(n), n - 1))
    elif code == GroupEstimator.OPO:
        length = mask.sum(1, dtype=f64)
        ls = torch.zeros(B, dtype=f64, device=dev).index_add_(0, g, length)[g]
        lrs = torch.zeros(B, dtype=f64, device=dev).index_add_(0, g, length * r)[g]
        seq = torch.where(one, base, r - lrs / ls)
    elif code == GroupEstimator.GPG:
        alpha = B / torch.count_nonzero(r).clamp_min(1).to(f64)
        seq = alpha * base / f_norm
    else:  # DR_GRPO, REINFORCE_PP_BASELINE (whitened by the caller)
        seq = base
    seq = seq.to(acc)
    adv = torch.where(mask, seq[:, None], torch.zeros((), dtype=acc, device=dev))
    return seq, adv


def _reference_returns(rewards, mask, gamma):
    """REINFORCE++'s return, a recurrence over T from the right (vectorised over rows):
    R_t = r_t + gamma R_next at valid positions, R_next carried unchanged over masked ones."""
    acc = acc_dtype(rewards.dtype)
    B, T = rewards.shape
    r = rewards.to(acc)
    out = torch.zeros(B, T, dtype=acc, device=rewards.device)
    run = torch.zeros(B, dtype=acc, device=rewards.device)
    zero = torch.zeros((), dtype=acc, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        new = r[:, t] + gamma * run
        out[:, t] = torch.where(m, new, zero)
        run = torch.where(m, new, run)
    return out


# ---------------------------------------------------------------------------------------
# Public ops: route to the backend
# ---------------------------------------------------------------------------------------
def _triton():
    from rmkernels.triton import group_adv

    return group_adv


def _group_dispatch(scores, group_ids, mask, code, eps, unbiased, single, f_norm, backend):
    args = (scores, group_ids, mask, int(code), float(eps), bool(unbiased), int(single), float(f_norm))
    if backend == "reference":
        return _reference_group(*args)
    if backend == "triton":
        return _triton().group_advantages(*args)
    return _group_kernel(*args)


def _whiten_rows(seq, adv, mask, unbiased, eps, backend):
    """reinforce_pp_baseline: masked_whiten's statistics over the valid tokens of ``adv``
    (its building blocks in ops/ppo.py: row partials, centred squares, apply), applied to the
    [B, T] advantages and to the per-sequence values (0 for rows with no valid token)."""
    rows = _ppo._row_stats_dispatch(adv, mask, backend)
    totals = rows.sum(0)
    sq = _ppo._centered_sq_dispatch(adv, mask, totals, backend).sum(0, keepdim=True)
    adv_w = _ppo._apply_dispatch(adv, mask, totals, sq, True, unbiased, eps, backend)
    has = (rows[:, 0] > 0)[:, None]
    seq_w = _ppo._apply_dispatch(seq[:, None], has, totals, sq, True, unbiased, eps, backend)[:, 0]
    return seq_w, adv_w


def _group_advantages_forward(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm, whiten_eps,
                              backend):
    code = GROUP_ESTIMATORS[estimator]
    seq, adv = _group_dispatch(scores, group_ids, mask, code, eps, unbiased, GROUP_SINGLES[single], f_norm, backend)
    if code == GroupEstimator.REINFORCE_PP_BASELINE:
        seq, adv = _whiten_rows(seq, adv, mask, unbiased, whiten_eps, backend)
    return seq, adv


def _returns_dispatch(rewards, mask, gamma, backend):
    if backend == "reference":
        return _reference_returns(rewards, mask, float(gamma))
    if backend == "triton":
        return _triton().reinforce_pp_returns(rewards, mask, float(gamma))
    return _returns_kernel(rewards, mask, float(gamma))


@torch.library.custom_op("rmkernels::group_advantages", mutates_args=())
def group_advantages_op(scores: Tensor, group_ids: Tensor, mask: Tensor, estimator: str, eps: float,
                        unbiased: bool, single: str, f_norm: float, whiten_eps: float,
                        backend: str) -> tuple[Tensor, Tensor]:
    """(seq_advantages [B], advantages [B, T]) from scores [B] (float32/64), int64 group ids
    in [0, B) and a bool mask [B, T]."""
    return _group_advantages_forward(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm, whiten_eps,
                                     backend)


@group_advantages_op.register_fake
def _(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm, whiten_eps, backend):
    return _group_fake(scores, mask)


@torch.library.custom_op("rmkernels::reinforce_pp_returns", mutates_args=())
def reinforce_pp_returns_op(token_rewards: Tensor, mask: Tensor, gamma: float, backend: str) -> Tensor:
    """REINFORCE++ returns [B, T] of token rewards [B, T] (any float dtype) and a bool mask."""
    return _returns_dispatch(token_rewards, mask, gamma, backend)


@reinforce_pp_returns_op.register_fake
def _(token_rewards, mask, gamma, backend):
    return token_rewards.new_empty(token_rewards.shape, dtype=acc_dtype(token_rewards.dtype))


_group_advantages = eager_fast_path(torch.ops.rmkernels.group_advantages, _group_advantages_forward)
_reinforce_pp_returns = eager_fast_path(torch.ops.rmkernels.reinforce_pp_returns, _returns_dispatch)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def group_ids(uids):
    """Dense int64 group ids (0 .. G-1) of ``uids``: equal labels get equal ids.

    ``uids``: a numpy array (object array of strings as verl passes its ``uid`` column, or
    any dtype), a list/tuple of hashables, or a 1-D integer tensor. Labels get ids in the
    order they first appear, from a dict pass (no sort: ``np.unique`` sorts the strings, the
    most expensive part of verl's vectorized estimators). For a numpy object array the dict
    pass runs over the runs of equal neighbours only (one vectorised ``!=`` of neighbours
    first): verl lists a prompt's responses next to each other, so that is one dict entry per
    prompt, ~4x faster at 65,536 uids; any order gives the same ids. Numeric numpy arrays and
    tensors are factorised with ``np.unique`` / ``torch.unique`` (sorted order; on a GPU
    ``torch.unique`` synchronises). Returns a CPU int64 tensor (the tensor's device for a
    tensor).
    """
    if isinstance(uids, Tensor):
        if uids.dim() != 1 or uids.dtype.is_floating_point or uids.dtype.is_complex:
            raise ValueError(f"uids as a tensor must be 1-D integer, got {uids.dtype} of shape {list(uids.shape)}")
        return torch.unique(uids, return_inverse=True)[1].long()
    if isinstance(uids, np.ndarray):
        if uids.ndim != 1:
            raise ValueError(f"uids must be 1-D, got shape {list(uids.shape)}")
        if uids.dtype != object and uids.dtype.kind in "biuf":
            return torch.from_numpy(np.unique(uids, return_inverse=True)[1].astype(np.int64).reshape(-1))
        if uids.dtype == object and uids.shape[0] > 1:
            return _ids_by_runs(uids)
    elif not isinstance(uids, (list, tuple)):
        raise TypeError(f"uids must be a numpy array, a list/tuple of hashables or an integer tensor, "
                        f"got {type(uids).__name__}")
    return torch.from_numpy(_dict_ids(uids))


def _dict_ids(labels):
    """int64 ids of ``labels`` in first-seen order: one dict pass, hashing in C."""
    try:
        first = dict.fromkeys(labels)
    except TypeError as e:
        raise TypeError(f"uids must hold hashable labels: {e}") from None
    code = dict(zip(first, range(len(first))))
    return np.fromiter(map(code.__getitem__, labels), dtype=np.int64, count=len(labels))


def _ids_by_runs(uids):
    """``_dict_ids`` of a numpy object array, computed over its runs of equal neighbours."""
    n = uids.shape[0]
    new_run = uids[1:] != uids[:-1]
    if new_run.dtype != np.bool_:  # labels whose != is not a bool (arrays, ...): the plain dict pass
        return torch.from_numpy(_dict_ids(uids))
    starts = np.flatnonzero(np.concatenate(([True], new_run)))
    run_ids = _dict_ids(uids[starts])
    return torch.from_numpy(np.repeat(run_ids, np.diff(np.append(starts, n))))


def _check_group_ids(group_ids, B, dev):
    if not isinstance(group_ids, Tensor):
        group_ids = group_ids_fn(group_ids).to(dev)
    _checks.check_tensor("group_ids", group_ids, ndims=1, dtypes=_checks.INDEX_DTYPES, device=dev)
    if group_ids.shape[0] != B:
        raise ValueError(f"group_ids must have shape [B] = [{B}] (from scores), got {list(group_ids.shape)}")
    if _checks.data_checks_enabled(dev) and B > 0:
        bad = (group_ids < 0) | (group_ids >= B)
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten().tolist()
            raise ValueError(f"group_ids must lie in [0, B) = [0, {B}) (rmk.group_ids makes such ids from any "
                             f"labels); rows {_checks.rows_str(rows)} are out of range")
    return group_ids.long().contiguous()


group_ids_fn = group_ids


def group_advantages(scores, group_ids, mask=None, *, estimator="grpo", eps=DEFAULT_EPS, unbiased=True,
                     single="zero", f_norm=1.0, whiten_eps=DEFAULT_WHITEN_EPS, backend=None):
    """Critic-free advantages of responses grouped by prompt (GRPO and relatives).

    Args:
        scores: ``[B]`` sequence rewards, or ``[B, T]`` token-level rewards (summed over all
            T, as verl's ``token_level_rewards.sum(-1)``). Any float dtype.
        group_ids: ``[B]`` int32/int64 tensor, ids in ``[0, B)`` in any order, any group
            sizes (``rmk.group_ids(uids)`` makes them from labels); a numpy array / list of
            labels is mapped with ``rmk.group_ids`` first.
        mask: ``[B, T]`` bool/int/float, non-zero at response tokens (holes allowed), or None:
            every position of ``[B, T]`` token rewards is valid, or, for ``[B]`` scores,
            ``advantages`` is ``[B, 1]``.
        estimator: ``"grpo"``, ``"dr_grpo"``, ``"rloo"``, ``"opo"``, ``"gpg"`` or
            ``"reinforce_pp_baseline"`` (formulas in the module docstring).
        eps: added to the group std (``grpo``; verl 1e-6, OpenRLHF 1e-9, TRL 1e-4).
        unbiased: the std (and the ``reinforce_pp_baseline`` whitening variance) divides by
            n - 1 (verl, OpenRLHF, TRL) or by n.
        single: a group of one: ``"zero"`` (mu = 0, sigma = 1, zero baselines: the response
            keeps its score; verl's loops) or ``"self"`` (its own baseline: advantage 0).
        f_norm: ``gpg``'s normaliser (verl's ``f_norm``).
        whiten_eps: ``reinforce_pp_baseline``: added to the whitening variance (verl's
            ``masked_whiten``, 1e-8).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None/``"auto"``.

    Returns:
        ``GroupAdvantages(seq_advantages [B], advantages [B, T])``, float32 (float64 for
        float64 scores); ``advantages[b, t] = seq_advantages[b]`` where the mask is non-zero
        and exactly 0 elsewhere (also when the value is NaN; verl's ``* mask`` would give NaN
        there). ``reinforce_pp_baseline``: both are the whitened values (mean and variance
        over all valid tokens, n <= 1 valid tokens give zeros); a row with no valid token
        gets 0. No gradient flows; no host synchronisation (ids out of range are checked for
        CPU tensors, and on a GPU with ``rmk.checks(True)``; unchecked they give NaN rows on
        the GPU backends).
    """
    _checks.check_tensor("scores", scores, ndims=(1, 2), dtypes=_checks.FLOAT_DTYPES)
    dev = scores.device
    B = scores.shape[0]
    if not isinstance(estimator, str) or estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(GROUP_ESTIMATORS)}, got {estimator!r}")
    if not isinstance(single, str) or single not in GROUP_SINGLES:
        raise ValueError(f"single must be one of {tuple(GROUP_SINGLES)}, got {single!r}")
    eps = _checks.check_float("eps", eps, lo=0.0, hi=float("inf"), hi_open=True)
    unbiased = _checks.check_bool("unbiased", unbiased)
    f_norm = _checks.check_float("f_norm", f_norm, lo=0.0, lo_open=True, hi=float("inf"), hi_open=True)
    whiten_eps = _checks.check_float("whiten_eps", whiten_eps, lo=0.0, hi=float("inf"), hi_open=True)
    if mask is None:
        T = scores.shape[1] if scores.dim() == 2 else 1
        mask = torch.ones((), dtype=torch.bool, device=dev).expand(B, T)  # no copy: stride 0
    else:
        _checks.check_tensor("mask", mask, ndims=2, device=dev)
        if mask.shape[0] != B or (scores.dim() == 2 and mask.shape != scores.shape):
            want = list(scores.shape) if scores.dim() == 2 else f"[{B}, T]"
            raise ValueError(f"mask must have shape {want} (from scores), got {list(mask.shape)}")
        mask = _ppo._check_mask("mask", mask, mask.shape, dev)
    gids = _check_group_ids(group_ids, B, dev)
    be = _backend.resolve(backend, dev)
    scores = scores.detach()
    acc = acc_dtype(scores.dtype)
    s = scores.sum(-1, dtype=acc) if scores.dim() == 2 else scores.to(acc)
    out = _group_advantages(s.contiguous(), gids, mask, estimator, eps, unbiased, single, f_norm, whiten_eps, be)
    return GroupAdvantages(*out)


def reinforce_pp_returns(token_rewards, mask=None, *, gamma=1.0, backend=None):
    """REINFORCE++'s discounted return (verl's ``compute_reinforce_plus_plus_outcome_advantage``).

    From the right, over the valid positions only: ``R_t = r_t + gamma * R_next`` where
    ``R_next`` is the return of the next valid position (0 after the last), carried
    unchanged over positions whose mask is 0 (multi-turn observation tokens); 0 at masked
    positions (their rewards are ignored). ``token_rewards``: ``[B, T]`` any float dtype and
    strides; ``mask``: ``[B, T]`` bool/int/float, or None (every position valid: the plain
    reverse discounted cumulative sum, ReMax's return with ``gamma=1``). Returns float32 [B, T]
    (float64 for float64 rewards). No gradient, no host synchronisation.
    """
    _checks.check_tensor("token_rewards", token_rewards, ndims=2, dtypes=_checks.FLOAT_DTYPES)
    dev = token_rewards.device
    if mask is None:
        mask = torch.ones((), dtype=torch.bool, device=dev).expand(token_rewards.shape)
    else:
        mask = _ppo._check_mask("mask", mask, token_rewards.shape, dev)
    gamma = _checks.check_float("gamma", gamma, lo=0.0, hi=float("inf"), hi_open=True)
    be = _backend.resolve(backend, dev)
    return _reinforce_pp_returns(token_rewards.detach(), mask, gamma, be)
