"""verl's critic-free advantage estimators (verl 0.9 ``core_algos.py``), on the fused group ops.

Replace the import and keep the calls::

    # from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from rmkernels.integrations.verl import compute_grpo_outcome_advantage

(re-exported by :mod:`rmkernels.integrations.verl`; ``import`` does not import verl). Same
names, arguments and numbers as verl 0.9.x, computed by :func:`rmkernels.group_advantages`
/ :func:`rmkernels.reinforce_pp_advantages` / :func:`rmkernels.remax_advantages` in one call:
``index`` (verl's ``uid`` column, a numpy object array of strings, or any labels) is mapped to
group ids with
:func:`rmkernels.group_ids` (one compiled pass, a hash lookup per run of equal uids, no sort), no
Python loop over responses or groups.

Conventions kept from verl: scores are ``token_level_rewards.sum(-1)`` over every position;
the GRPO std is unbiased with ``epsilon`` (1e-6) added to it; a group of one response has
mean 0 and std 1 (its advantage is its score, ``/(1 + epsilon)`` for GRPO) in the loop
estimators, and advantage 0 in ``compute_rloo_vectorized_outcome_advantage`` (verl's
``* (c > 1)``); GPG's ``alpha = bsz / max(count_nonzero(scores), 1)`` (NaN counts as nonzero);
REINFORCE++(-baseline) whiten with verl's ``masked_whiten`` (unbiased variance, eps 1e-8) over
all valid tokens; REINFORCE++'s return is carried over positions whose mask is 0 (multi-turn
observation tokens); ReMax's return is the reverse cumulative sum of ``rewards * mask``.

Where the numbers differ, on purpose:

* outputs are float32 (float64 for float64 rewards); verl's dtype follows its ops' type
  promotion (mostly the rewards' dtype; float64 from ``compute_rloo_vectorized_outcome_advantage``
  for bfloat16 rewards; ReMax promotes the rewards with the baselines);
* positions where ``response_mask`` is 0 are exactly 0 even when a group's value is NaN
  (verl's ``NaN * 0`` is NaN), and a reward at such a position enters no return (a NaN or inf
  there spreads through verl's ``rewards * mask``);
* the whitening of a batch with at most one valid token gives zeros where verl's
  ``masked_whiten`` raises;
* the group statistics are float64 sums (verl: float32 ``torch.mean`` / ``torch.std``, and
  float32 whatever the input in its vectorized GRPO), lengths are exact counts (verl sums a
  bfloat16 mask in bfloat16: rounded above 256 tokens; and with a bfloat16 mask its
  whitening's n / (n - 1) is a bfloat16 number: 1.0007x the scale at 60 tokens). On random
  batches the two agree to float32 rounding. Where float32 statistics round, these are the
  exact ones, and a group whose spread is near the rewards' float32 rounding (|r| * 6e-8) can
  differ by O(1): a group of equal rewards that float32 does not hold exactly gives advantage
  0 here and float32 noise divided by ``std + epsilon`` in verl's GRPO (0.64 for 15 rewards of
  7.16 at ``epsilon`` 1e-6; with ``epsilon`` 0, +-0.9 in verl, 0 / 0 = NaN here, as for
  rewards float32 does hold), and two rewards one float32 step apart at 1000 give +-0.69 here
  and [0, 0.98] in verl; rewards 1000 +- 0.01 in groups of 4-16 differ by up to ~4e-2
  (audits of 2026-12-01 and 2026-12-03 against verl 0.9.1);
* refused where verl computes: ``epsilon < 0`` (GRPO) and ``f_norm <= 0`` (GPG) are a
  ``ValueError`` naming the option;
* a REINFORCE++ return of an infinite reward is inf at every earlier valid position (verl's
  ``inf * 0`` at the reward's own position makes its return NaN there); the whitening of
  REINFORCE++-baseline advantages that are all equal (one response) gives exact 0 where verl's
  float32 gives about -6e-4;
* labels: rows are grouped by equal labels (Python ``==`` and ``hash``, as verl's loop
  estimators do); verl's ``compute_grpo_vectorized_outcome_advantage`` factorises with
  ``as_torch_index``, which puts ``"1"`` and ``"01"`` or ``1.0`` and ``1.0000001`` in one
  group and truncates float labels. A ``torch.Tensor`` index is grouped by value (verl's loop
  estimators raise ``KeyError`` on one, and its loop RLOO uses no baseline).

Compared with the real verl 0.9.1 functions by ``scripts/compare_frameworks.py``, edge cases
included (output in ``benchmarks/results/framework-comparison.txt``).
"""
import torch

import rmkernels as rmk
from rmkernels import _checks
from rmkernels.integrations._rl import as_float, check_2d, check_same_shape

__all__ = [
    "compute_gpg_outcome_advantage",
    "compute_grpo_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_opo_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_remax_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
]


def _ids(index, rewards):
    """verl's ``index`` (uid labels: numpy array, list or tensor) as int64 group ids in [0, B)."""
    if index is None:
        raise TypeError("index must be the uid of each response (numpy array, list or tensor), got None")
    ids = rmk.group_ids(index)
    if ids.shape[0] != rewards.shape[0]:
        raise ValueError(f"index must have one label per response ({rewards.shape[0]}), got {ids.shape[0]}")
    return ids.to(rewards.device, non_blocking=True)


def _group(token_level_rewards, response_mask, index, estimator, **kw):
    check_2d("token_level_rewards", token_level_rewards)
    check_same_shape("token_level_rewards", token_level_rewards, response_mask=response_mask)
    _, adv = rmk.group_advantages(token_level_rewards, _ids(index, token_level_rewards), response_mask,
                                  estimator=estimator, **kw)
    return adv, adv


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None):
    """verl's GRPO (``AdvantageEstimator.GRPO``): per uid group, ``(score - mean) / (std + epsilon)``
    (unbiased std; ``norm_adv_by_std_in_grpo=False``: Dr. GRPO's ``score - mean``); a group of
    one: mean 0, std 1. Returns ``(advantages, advantages)``, ``[bs, response_length]``."""
    if norm_adv_by_std_in_grpo:
        eps = _checks.check_nonneg("epsilon", as_float("epsilon", epsilon))  # the error names verl's option
        return _group(token_level_rewards, response_mask, index, "grpo", eps=eps)
    return _group(token_level_rewards, response_mask, index, "dr_grpo")


def compute_grpo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                              norm_adv_by_std_in_grpo=True, config=None):
    """verl's vectorized GRPO (``AdvantageEstimator.GRPO_VECTORIZED``, after verl PR 6348: no
    variance floor): the same numbers as :func:`compute_grpo_outcome_advantage`."""
    return compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon,
                                          norm_adv_by_std_in_grpo, config)


def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    """verl's RLOO: ``score * n / (n - 1) - mean * n / (n - 1)`` = ``(n score - sum) / (n - 1)``
    per group of n; a group of one keeps its score."""
    return _group(token_level_rewards, response_mask, index, "rloo")


def compute_rloo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None,
                                              **kwargs):
    """verl's vectorized RLOO: as :func:`compute_rloo_outcome_advantage`, but a group of one
    gets advantage 0 (verl's ``* (c > 1)``)."""
    return _group(token_level_rewards, response_mask, index, "rloo", single="self")


def compute_opo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    """verl's OPO: ``score - sum(len * score) / sum(len)`` over the group (len = the number of
    non-zero ``response_mask`` positions); a group of one keeps its score."""
    return _group(token_level_rewards, response_mask, index, "opo")


def compute_gpg_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, f_norm=1.0, alpha=1.0,
                                  config=None, **kwargs):
    """verl's GPG: ``alpha * (score - mean) / f_norm`` with ``alpha = bsz / max(count_nonzero(scores), 1)``
    (verl overrides the ``alpha`` argument the same way); a group of one: mean 0."""
    return _group(token_level_rewards, response_mask, index, "gpg", f_norm=as_float("f_norm", f_norm))


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                                           config=None, **kwargs):
    """verl's REINFORCE++-baseline: ``score - group mean`` on every valid token, whitened over all
    valid tokens of the batch (``masked_whiten``: unbiased variance, eps 1e-8)."""
    return _group(token_level_rewards, response_mask, index, "reinforce_pp_baseline")


def _gamma(config):
    if config is None:
        raise TypeError("config must carry gamma (verl's AlgoConfig), got None")
    gamma = config.get("gamma") if isinstance(config, dict) else getattr(config, "gamma", None)
    if gamma is None:
        raise ValueError("config.gamma is missing")
    return as_float("config.gamma", gamma)


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config=None, **kwargs):
    """verl's REINFORCE++: the discounted return ``R_t = r_t + gamma R_next`` from the right over
    the valid tokens (carried unchanged over tokens whose mask is 0, 0 written there;
    ``gamma = config.gamma``), whitened over all valid tokens (unbiased, eps 1e-8):
    :func:`rmkernels.reinforce_pp_advantages`, one op (one launch on CUDA).
    Returns ``(advantages, returns)``."""
    check_2d("token_level_rewards", token_level_rewards)
    check_same_shape("token_level_rewards", token_level_rewards, response_mask=response_mask)
    return tuple(rmk.reinforce_pp_advantages(token_level_rewards, response_mask, gamma=_gamma(config)))


def compute_remax_outcome_advantage(token_level_rewards, reward_baselines, response_mask, config=None, **kwargs):
    """verl's ReMax: ``returns`` = reverse cumulative sum of ``token_level_rewards * response_mask``
    (on every position, as verl), ``advantages = returns - reward_baselines[:, None] * response_mask``:
    :func:`rmkernels.remax_advantages`, one op (one launch on CUDA). ``reward_baselines`` is
    ``[bs]``, or 0-d (one baseline for every response, as verl's broadcast takes it). The mask is
    read as 0 / 1 (non-zero = valid, as verl's masks are); rewards at masked positions are ignored
    (verl's ``NaN * 0`` would spread a NaN there)."""
    check_2d("token_level_rewards", token_level_rewards)
    check_same_shape("token_level_rewards", token_level_rewards, response_mask=response_mask)
    bs = token_level_rewards.shape[0]
    if isinstance(reward_baselines, torch.Tensor) and reward_baselines.dim() == 0:
        reward_baselines = reward_baselines.expand(bs)  # one baseline for every response, as verl's broadcast
    if not isinstance(reward_baselines, torch.Tensor) or reward_baselines.shape != (bs,):
        got = tuple(reward_baselines.shape) if isinstance(reward_baselines, torch.Tensor) else type(reward_baselines)
        raise ValueError(f"reward_baselines must be a [bs] = [{bs}] tensor (or 0-d), got {got}")
    return tuple(rmk.remax_advantages(token_level_rewards, reward_baselines, response_mask))
