"""Critic-free group advantages: GRPO, Dr. GRPO, RLOO, OPO, GPG, REINFORCE++(-baseline)
(docs/ops.md section 5).

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
``rmk.reinforce_pp_returns`` is REINFORCE++'s masked discounted return: the GAE recurrence of
``ops/gae.py`` with V = 0 and lam = 1, the same hole rule (carried over masked positions, 0
there), so it runs ``gae_kernel`` on every backend (values a stride-0 zero tensor, no memory)
with ``returns=False``: only its advantages are written (GAE's returns would be the same
numbers again). ``rmk.reinforce_pp_advantages`` adds REINFORCE++'s whitening of those returns and
``rmk.remax_advantages`` ReMax's baseline, each one op (``reinforce_kernel``: one cooperative
launch on CUDA, ``csrc/cuda/reinforce.cu``).

Ops (``torch.ops.rmkernels.*``):

=============================================  =============================================
``group_advantages(scores, ids, mask, ...)``   (seq_advantages [B], advantages [B, T]): the
                                               public op (``scores`` already [B] float32/64)
``group_advantages_kernel(...)``               the C++ CPU / CUDA kernel (Triton:
                                               ``rmkernels.triton.group_adv``)
``reinforce_pp_returns(rewards, mask, ...)``   returns [B, T], the public op (``gae_kernel``)
``reinforce_advantages(rewards, mask, base,     (advantages, returns) [B, T]: REINFORCE++ (no
...)``                                          baselines: the returns whitened) or ReMax
``reinforce_kernel(...)``                       its C++ CPU / CUDA kernel (Triton:
                                               ``rmkernels.triton.ppo.reinforce``)
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

from rmkernels import _backend, _checks, _ext
from rmkernels._codes import GROUP_ESTIMATORS, GROUP_SINGLES, GroupEstimator, GroupSingle
from rmkernels._library import acc_dtype, as_dtype, detached
from rmkernels._registry import Kernel, Op
from rmkernels.ops.gae import check_2d, check_discount, check_mask, gae_kernel, gae_recurrence
from rmkernels.ops.ppo import centered_sq_kernel, masked_whiten_body, row_stats_kernel, whiten_apply_kernel

GroupAdvantages = namedtuple("GroupAdvantages", ["seq_advantages", "advantages"])
ReinforceAdvantages = namedtuple("ReinforceAdvantages", ["advantages", "returns"])

DEFAULT_EPS = 1e-6  # verl's epsilon of the GRPO std
DEFAULT_WHITEN_EPS = 1e-8  # verl's masked_whiten (reinforce_pp_baseline)

# ---------------------------------------------------------------------------------------
# Reference implementation (pure PyTorch, vectorised over groups: index_add_ by group id)
# ---------------------------------------------------------------------------------------
def _reference_group(scores, group_ids, mask, code, eps, unbiased, single, f_norm, whiten_eps):
    """The ground truth. scores [B] (float32/64), group_ids int [B] in [0, B), mask bool [B, T];
    reinforce_pp_baseline whitened over the [B, T] advantages (``_whiten_rows``)."""
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
    else:  # DR_GRPO, REINFORCE_PP_BASELINE (whitened below)
        seq = base
    seq = seq.to(acc)
    adv = torch.where(mask, seq[:, None], torch.zeros((), dtype=acc, device=dev))
    if code == GroupEstimator.REINFORCE_PP_BASELINE:
        seq, adv = _whiten_rows(seq, adv, mask, unbiased, whiten_eps)
    return seq, adv


def _reference_reinforce(token_rewards, mask, baselines, gamma, unbiased, eps):
    """REINFORCE++ (no baselines: gae_recurrence's return, whitened by masked_whiten's body on the
    reference kernels) or ReMax (the return at every position, minus the baseline where valid)."""
    acc = acc_dtype(token_rewards.dtype)
    r = token_rewards.to(acc)
    valid = mask != 0
    if baselines is None:
        ret, _ = gae_recurrence(r, torch.zeros_like(r), valid, gamma, 1.0)
        return masked_whiten_body(ret, mask, True, unbiased, eps, "reference"), ret
    B, T = r.shape
    ret = torch.empty_like(r)
    R = torch.zeros(B, dtype=acc, device=r.device)
    for t in reversed(range(T)):
        R = torch.where(valid[:, t], r[:, t] + gamma * R, R)
        ret[:, t] = R
    return torch.where(valid, ret - baselines.to(acc)[:, None], ret), ret


# ---------------------------------------------------------------------------------------
# Kernels and ops (C++ CPU / CUDA: csrc/cpu/group_adv.cpp, csrc/cuda/group_adv*; Triton:
# rmkernels/triton/group_adv.py)
# ---------------------------------------------------------------------------------------
def _group_fake(scores, group_ids, mask, *_):
    B, T = mask.shape
    acc = acc_dtype(scores.dtype)
    return scores.new_empty(B, dtype=acc), scores.new_empty(B, T, dtype=acc)


def _returns_fake(rewards, *_):
    return rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards.dtype))


group_advantages_kernel = Kernel("group_advantages_kernel", reference=_reference_group,
                                 triton="group_adv:group_advantages", fake=_group_fake)


def _reinforce_fake(token_rewards, *_):
    acc = acc_dtype(token_rewards.dtype)
    return (token_rewards.new_empty(token_rewards.shape, dtype=acc),
            token_rewards.new_empty(token_rewards.shape, dtype=acc))


reinforce_kernel = Kernel("reinforce_kernel", reference=_reference_reinforce, triton="ppo:reinforce",
                          fake=_reinforce_fake)


def _whiten_rows(seq, adv, mask, unbiased, eps):
    """reinforce_pp_baseline's whitening as the reference does it: masked_whiten's statistics
    over the valid tokens of ``adv`` (its kernels in ops/ppo.py: row partials, centred squares,
    apply), applied to the [B, T] advantages and to the per-sequence values (0 for rows with no
    valid token). (The C++ CPU, CUDA and Triton kernels get the same statistics from the rows'
    values and lengths, without a pass over [B, T].)"""
    rows = row_stats_kernel("reference", adv, mask)
    totals = rows.sum(0)
    sq = centered_sq_kernel("reference", adv, mask, totals).sum(0, keepdim=True)
    adv_w = whiten_apply_kernel("reference", adv, mask, totals, sq, True, unbiased, eps)
    has = (rows[:, 0] > 0)[:, None]
    seq_w = whiten_apply_kernel("reference", seq[:, None], has, totals, sq, True, unbiased, eps)[:, 0]
    return seq_w, adv_w


def _group_advantages_body(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm, whiten_eps, backend):
    code = GROUP_ESTIMATORS[estimator]
    return group_advantages_kernel(backend, scores, group_ids, mask, int(code), float(eps), bool(unbiased),
                                   int(GROUP_SINGLES[single]), float(f_norm), float(whiten_eps))


def _check_ids_range(group_ids, B):
    """The data check of the ids (CPU tensors; GPU tensors with rmk.checks(True))."""
    if B > 0 and _checks.data_checks_enabled(group_ids.device):
        lo, hi = _checks.min_max(group_ids)  # one pass; the rows only on failure
        if lo < 0 or hi >= B:
            rows = torch.nonzero((group_ids < 0) | (group_ids >= B)).flatten().tolist()
            raise ValueError(f"group_ids must lie in [0, B) = [0, {B}) (rmk.group_ids makes such ids from any "
                             f"labels); rows {_checks.rows_str(rows)} are out of range")


def check_group_options(estimator, eps, unbiased, single, f_norm, whiten_eps):
    """The options of the group advantages (public function and check hook alike): returns
    eps, unbiased, f_norm and whiten_eps checked."""
    if not isinstance(estimator, str) or estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(GROUP_ESTIMATORS)}, got {estimator!r}")
    if not isinstance(single, str) or single not in GROUP_SINGLES:
        raise ValueError(f"single must be one of {tuple(GROUP_SINGLES)}, got {single!r}")
    unbiased = _checks.check_bool("unbiased", unbiased)
    eps, f_norm, whiten_eps = check_group_scalars(eps, f_norm, whiten_eps)
    return eps, unbiased, f_norm, whiten_eps


def check_group_scalars(eps, f_norm, whiten_eps):
    """The float options of the group advantages: ``eps`` and ``whiten_eps`` finite and >= 0,
    ``f_norm`` finite and > 0, as floats (the public function, the check hook and the Triton
    host function; the C++ kernels: op_checks.h, check_group_options)."""
    return (_checks.check_nonneg("eps", eps),
            _checks.check_float("f_norm", f_norm, lo=0.0, lo_open=True, hi=float("inf"), hi_open=True),
            _checks.check_nonneg("whiten_eps", whiten_eps))


def _check_group_op(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm, whiten_eps, backend):
    _checks.check_tensor("scores", scores, ndims=1, dtypes=(torch.float32, torch.float64))
    B = scores.shape[0]
    _checks.check_tensor("group_ids", group_ids, ndims=1, dtypes=(torch.int64,), device=scores.device)
    _checks.check_tensor("mask", mask, ndims=2, dtypes=(torch.bool,), device=scores.device)
    if group_ids.shape[0] != B or mask.shape[0] != B:
        raise ValueError(f"group_ids [B] and mask [B, T] must have B = {B} rows (from scores), got "
                         f"{list(group_ids.shape)} and {list(mask.shape)}")
    check_group_options(estimator, eps, unbiased, single, f_norm, whiten_eps)
    _check_ids_range(group_ids, B)


def _returns_body(token_rewards, mask, gamma, backend):
    """REINFORCE++'s return ``R_t = r_t + gamma R_next`` over the valid positions, carried over
    masked ones: GAE's advantages with values 0 and lam 1 (ops/gae.py, the same hole rule)."""
    zeros = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device).expand(token_rewards.shape)
    return gae_kernel(backend, token_rewards, zeros, mask, float(gamma), 1.0, False)[0]


def _check_returns_op(token_rewards, mask, gamma, backend):
    check_2d("token_rewards", token_rewards)
    check_2d("mask", mask, token_rewards.shape, token_rewards.device, (torch.bool,))
    check_discount(gamma)


def _check_reinforce_op(token_rewards, mask, baselines, gamma, unbiased, eps, backend):
    check_2d("token_rewards", token_rewards)
    check_2d("mask", mask, token_rewards.shape, token_rewards.device, (torch.bool,))
    if baselines is not None:
        B = token_rewards.shape[0]
        _checks.check_tensor("baselines", baselines, ndims=1, dtypes=(acc_dtype(token_rewards.dtype),),
                             device=token_rewards.device)
        if baselines.shape[0] != B:
            raise ValueError(f"baselines must have shape [B] = [{B}] (from token_rewards), got "
                             f"{list(baselines.shape)}")
    check_reinforce_options(gamma, unbiased, eps)


def check_reinforce_options(gamma, unbiased, eps):
    """REINFORCE++ / ReMax's options (public functions and check hook alike), checked."""
    return (check_discount(gamma), _checks.check_bool("unbiased", unbiased),
            _checks.check_nonneg("eps", eps))


def _prepare_reinforce(token_rewards, mask, baselines, gamma, unbiased, eps):
    if baselines is not None:
        baselines = baselines.contiguous()
    return token_rewards, mask, baselines, float(gamma), bool(unbiased), float(eps)


# What the public functions call: the public ops, or their bodies in plain eager mode (no
# gradients: the inputs are used detached)
_group_advantages = Op("group_advantages", body=_group_advantages_body, fake=_group_fake, check=_check_group_op)
_reinforce_pp_returns = Op("reinforce_pp_returns", body=_returns_body, fake=_returns_fake, check=_check_returns_op)
_reinforce_advantages = Op("reinforce_advantages", kernel=reinforce_kernel, prepare=_prepare_reinforce,
                           fake=_reinforce_fake, check=_check_reinforce_op)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def group_ids(uids):
    """Dense int64 group ids (0 .. G-1) of ``uids``: equal labels get equal ids.

    ``uids``: a numpy array (object array of strings as verl passes its ``uid`` column, or
    any dtype), a list/tuple of hashables, or a 1-D integer tensor. Labels get ids in the
    order they first appear, with Python dict semantics (the same object, or equal hashes and
    ``==``; no sort: ``np.unique`` sorts the strings, the most expensive part of verl's
    vectorized estimators). A numpy object array goes through the compiled
    ``rmkernels._C.group_ids_from_objects``: each label is compared with its neighbour by
    pointer first (verl repeats one str object for a prompt's responses), so a run of equal
    neighbours costs one hash-table lookup (0.23 ms at 65,536 uids in verl's order,
    benchmarks/NOTES.md). It takes labels whose hash and ``==`` run no Python code (exact str,
    int, float, bool, None: verl's uids); with any other label (a str subclass, an object with
    its own ``__eq__``), and without the extension, a dict pass over the runs of equal
    neighbours of a copy of the array gives the same ids. Numeric numpy arrays and tensors are
    factorised with ``np.unique`` / ``torch.unique`` (sorted order; on a GPU
    ``torch.unique`` synchronises). Unhashable labels raise ``TypeError``. Returns a CPU int64
    tensor (the tensor's device for a tensor).
    """
    if isinstance(uids, Tensor):
        if uids.dim() != 1 or uids.dtype.is_floating_point or uids.dtype.is_complex:
            raise ValueError(f"uids as a tensor must be 1-D integer, got {uids.dtype} of shape {list(uids.shape)}")
        if uids.device.type == "meta":
            raise ValueError("uids as a tensor must hold data (a meta tensor has none): its ids depend on its values")
        return torch.unique(uids, return_inverse=True)[1].long()
    if isinstance(uids, np.ndarray):
        if uids.ndim != 1:
            raise ValueError(f"uids must be 1-D, got shape {list(uids.shape)}")
        if uids.dtype != object and uids.dtype.kind in "biuf":
            return torch.from_numpy(np.unique(uids, return_inverse=True)[1].astype(np.int64).reshape(-1))
        if uids.dtype == object and uids.shape[0] > 1:
            return _ids_of_objects(uids)
    elif not isinstance(uids, (list, tuple)):
        raise TypeError(f"uids must be a numpy array, a list/tuple of hashables or an integer tensor, "
                        f"got {type(uids).__name__}")
    return torch.from_numpy(_dict_ids(uids))


def _hashable_error(e):
    return TypeError(f"uids must hold hashable labels: {e}")


def _dict_ids(labels):
    """int64 ids of ``labels`` in first-seen order: one dict pass, hashing in C."""
    try:
        first = dict.fromkeys(labels)
    except TypeError as e:
        raise _hashable_error(e) from None
    code = dict(zip(first, range(len(first))))
    return np.fromiter(map(code.__getitem__, labels), dtype=np.int64, count=len(labels))


# rmkernels._C.group_ids_from_objects (csrc/cpu/group_adv_ids.cpp), None without the extension
_ids_from_objects = getattr(_ext._C, "group_ids_from_objects", None) if _ext.CPP_AVAILABLE else None


def _ids_of_objects(uids):
    """``_dict_ids`` of a 1-D numpy object array with more than one label: the compiled pass when
    the extension is built and every label is one whose hash and == run no Python code (exact
    str, int, float, bool, None: csrc/cpu/group_adv_ids.cpp), else ``_ids_by_runs`` over a copy
    of the array (the copy holds its labels: their ``__eq__`` may change the caller's array)."""
    uids = uids.view(np.ndarray)  # numpy's own __array_interface__, not a subclass's
    if _ids_from_objects is None:
        return _ids_by_runs(uids.copy())
    try:
        ids = _ids_from_objects(uids)
    except TypeError as e:
        raise _hashable_error(e) from None
    if ids is None:  # a label whose hash or == is Python code
        return _ids_by_runs(uids.copy())
    return torch.frombuffer(ids, dtype=torch.int64)  # shares the bytearray


def _ids_by_runs(uids):
    """``_dict_ids`` of a numpy object array, computed over its runs of equal neighbours."""
    n = uids.shape[0]
    try:
        new_run = uids[1:] != uids[:-1]
    except (TypeError, ValueError):  # labels whose != raises or is not a truth value (arrays, ...)
        new_run = None
    if new_run is None or new_run.dtype != np.bool_:  # ... or is not a bool: the plain dict pass
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
    _check_ids_range(group_ids, B)
    return as_dtype(group_ids, torch.int64).contiguous()


group_ids_fn = group_ids


def group_advantages(scores, group_ids, mask=None, *, estimator="grpo", eps=DEFAULT_EPS, unbiased=True,
                     single="zero", f_norm=1.0, whiten_eps=DEFAULT_WHITEN_EPS, backend=None):
    """Critic-free advantages of responses grouped by prompt (GRPO and relatives).

    Args:
        scores: ``[B]`` sequence rewards, or ``[B, T]`` token-level rewards (summed over all
            T, as verl's ``token_level_rewards.sum(-1)``, in float32 for float32 / bf16 / fp16;
            every row the same way in any layout, so equal rows get equal scores). Any float dtype.
        group_ids: ``[B]`` int32/int64 tensor, ids in ``[0, B)`` in any order, any group
            sizes (``rmk.group_ids(uids)`` makes them from labels); a numpy array / list of
            labels is mapped with ``rmk.group_ids`` first.
        mask: ``[B, T]`` bool/int/float, non-zero at response tokens (holes allowed), or None:
            every position of ``[B, T]`` token rewards is valid, or, for ``[B]`` scores,
            ``advantages`` is ``[B, 1]``.
        estimator: ``"grpo"``, ``"dr_grpo"``, ``"rloo"``, ``"opo"``, ``"gpg"`` or
            ``"reinforce_pp_baseline"`` (formulas in the module docstring). ``opo`` of a group
            none of whose responses has a valid token is 0 / 0: NaN (verl's formula).
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
    eps, unbiased, f_norm, whiten_eps = check_group_options(estimator, eps, unbiased, single, f_norm, whiten_eps)
    if mask is None:
        T = scores.shape[1] if scores.dim() == 2 else 1
        mask = torch.ones((), dtype=torch.bool, device=dev).expand(B, T)  # no copy: stride 0
    else:
        _checks.check_tensor("mask", mask, ndims=2, device=dev)
        if mask.shape[0] != B or (scores.dim() == 2 and mask.shape != scores.shape):
            want = list(scores.shape) if scores.dim() == 2 else f"[{B}, T]"
            raise ValueError(f"mask must have shape {want} (from scores), got {list(mask.shape)}")
        mask = check_mask("mask", mask, mask.shape, dev)
    gids = _check_group_ids(group_ids, B, dev)
    be = _backend.resolve(backend, dev)
    scores = detached(scores)
    acc = acc_dtype(scores.dtype)
    if scores.dim() == 2:
        if min(scores.shape) > 1 and scores.stride(0) <= scores.stride(1):
            # Rows not outermost in memory (a transposed or expanded [B, T]): torch's float32 row
            # sum then runs across rows, and a row's rounding depends on its position, so equal
            # responses would score an ulp apart, which grpo's division by a group std near 0
            # turns into advantages of ~0.1. The rows of a row-major copy are summed alike.
            scores = scores.contiguous()
        s = scores.sum(-1, dtype=acc)
    else:
        s = as_dtype(scores, acc)
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
        mask = check_mask("mask", mask, token_rewards.shape, dev)
    gamma = check_discount(gamma)
    be = _backend.resolve(backend, dev)
    return _reinforce_pp_returns(detached(token_rewards), mask, gamma, be)


def _reinforce_inputs(token_rewards, mask):
    _checks.check_tensor("token_rewards", token_rewards, ndims=2, dtypes=_checks.FLOAT_DTYPES)
    dev = token_rewards.device
    if mask is None:
        return torch.ones((), dtype=torch.bool, device=dev).expand(token_rewards.shape)
    return check_mask("mask", mask, token_rewards.shape, dev)


def reinforce_pp_advantages(token_rewards, mask=None, *, gamma=1.0, unbiased=True, eps=DEFAULT_WHITEN_EPS,
                            backend=None):
    """REINFORCE++'s advantages and returns in one op (verl's
    ``compute_reinforce_plus_plus_outcome_advantage``; one cooperative launch on CUDA).

    ``returns`` is :func:`reinforce_pp_returns` (the discounted return over the valid positions,
    carried over masked ones, 0 there); ``advantages`` are the returns whitened over all valid
    positions of the batch: ``(R - mean) * rsqrt(var + eps)`` with the variance unbiased (verl;
    ``unbiased=False``: the population variance of OpenRLHF 0.11's ``reinforce``, which clamps it
    at 1e-8 instead of adding eps and leaves masked positions unzeroed), 0 at masked positions
    and everywhere when the batch has at most one valid position (``masked_whiten``'s rule,
    never NaN).
    ``token_rewards``: ``[B, T]`` any float dtype and strides; ``mask``: ``[B, T]``
    bool/int/float (non-zero = valid) or None (all valid). Returns
    ``ReinforceAdvantages(advantages, returns)``, float32 (float64 for float64 rewards). No
    gradient, no host synchronisation.
    """
    mask = _reinforce_inputs(token_rewards, mask)
    gamma, unbiased, eps = check_reinforce_options(gamma, unbiased, eps)
    be = _backend.resolve(backend, token_rewards.device)
    return ReinforceAdvantages(*_reinforce_advantages(detached(token_rewards), mask, None, gamma, unbiased, eps, be))


def remax_advantages(token_rewards, baselines, mask=None, *, backend=None):
    """ReMax's advantages and returns in one op (verl's ``compute_remax_outcome_advantage``;
    one launch on CUDA).

    ``returns[b, t]`` is the sum of the rewards at the valid positions ``>= t`` (verl's reverse
    cumulative sum of ``token_level_rewards * response_mask``, written at every position, masked
    ones included); ``advantages = returns - baselines[b]`` where the mask is non-zero and
    ``returns`` elsewhere (verl's ``returns - baselines * mask``). Rewards at masked positions
    are ignored (verl multiplies them by the mask: a NaN there would spread). ``baselines``:
    ``[B]`` (the reward of the greedy response), any float dtype. Returns
    ``ReinforceAdvantages(advantages, returns)``, float32 (float64 for float64 rewards). No
    gradient, no host synchronisation.
    """
    mask = _reinforce_inputs(token_rewards, mask)
    B = token_rewards.shape[0]
    _checks.check_tensor("baselines", baselines, ndims=1, dtypes=_checks.FLOAT_DTYPES, device=token_rewards.device)
    if baselines.shape[0] != B:
        raise ValueError(f"baselines must have shape [B] = [{B}] (from token_rewards), got {list(baselines.shape)}")
    base = as_dtype(detached(baselines), acc_dtype(token_rewards.dtype)).contiguous()
    be = _backend.resolve(backend, token_rewards.device)
    return ReinforceAdvantages(*_reinforce_advantages(detached(token_rewards), mask, base, 1.0, True,
                                                      DEFAULT_WHITEN_EPS, be))
