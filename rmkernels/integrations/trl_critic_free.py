"""TRL's GRPO and RLOO advantages (TRL 1.16 ``GRPOTrainer`` / ``RLOOTrainer``,
``multi_objective_aggregation="sum_then_normalize"``), on :func:`rmkernels.group_advantages`.

Conventions kept from TRL: the rewards are grouped in consecutive blocks of
``num_generations`` (TRL's ``rewards.view(-1, num_generations)``); GRPO subtracts the group
mean and, by ``scale_rewards``, divides by the group std (``"group"``, TRL's default; ``True``
is ``"group"``), by the std of the whole batch (``"batch"``) or by nothing (``"none"`` /
``False``, Dr. GRPO), always with eps 1e-4 added to the (unbiased) std; RLOO subtracts the
leave-one-out mean ``(sum - r) / (n - 1)`` and, with ``normalize_advantages``, whitens the
advantages over the batch (``(a - mean) / (std + 1e-4)``, unbiased). ``num_generations == 1``
gives zero advantages, as TRL does.

Unscorable completions, as TRL marks them: a NaN reward (every reward function returned
None). TRL leaves them out of every statistic (``nanmean`` / its ``nanstd``) and gives them
advantage 0; so do these functions: an unscorable completion becomes a group of its own
(group ids below), the scorable ones of a prompt keep one group. A prompt with one scorable
completion gives it advantage 0 (TRL: 0 / 0, then ``nan_to_num``), and RLOO's whitening
leaves those out too, as TRL's NaN does. An infinite reward is not unscorable: it spoils its
prompt's statistics (and with ``"batch"`` or RLOO's whitening, the batch's), and TRL's last
step, ``nan_to_num``, turns what comes out into 0 or +-float max; the same here (tested).

:func:`grpo_advantages` takes the rewards TRL's ``"sum_then_normalize"`` (the default
``multi_objective_aggregation``) normalises: the weighted ``nansum`` over the reward functions,
NaN where all of them are NaN. :func:`grpo_advantages_normalize_then_sum` takes the ``[N, K]``
rewards per function and the weights of ``"normalize_then_sum"``: each function normalised
within the groups (mean, std + 1e-4, its own NaN left out), the weighted ``nansum``, then
normalised over the batch (``scale_rewards`` plays no part there, as in TRL).

Where the numbers differ: the statistics are float64 (TRL's float32), so where float32 rounds
these are the exact ones. A group of equal rewards that float32 does not hold exactly (0.1)
gives advantage 0 here and float32 noise divided by ``std + 1e-4`` in TRL (7e-5 to 1e-3 with
one reward function and rewards near 0.1, 9.4e-3 for 16 rewards of 6.42: the noise grows with
the rewards' size; up to ~0.7 with three bfloat16 reward functions at an offset of 1000); two
rewards one float32 step apart at 1000 give +-0.21 here and [0, 0.38] in TRL; rewards
1000 +- 0.01 in groups of 4-16 differ by up to ~4e-2 (audits of 2026-12-01 and 2026-12-03
against TRL 1.16.0's advantage code, run in a scratch environment; CI tests these functions
against TRL's published formulas).
"""
import torch

import rmkernels as rmk

__all__ = ["grpo_advantages", "grpo_advantages_normalize_then_sum", "rloo_advantages"]

TRL_EPS = 1e-4


def _check(rewards, num_generations):
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a 1-D tensor (one reward per completion)")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor (NaN marks an unscorable completion), "
                        f"got {rewards.dtype}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}")
    if rewards.shape[0] % num_generations:
        raise ValueError(f"rewards must hold a multiple of num_generations = {num_generations}, "
                         f"got {rewards.shape[0]}")


def _group_ids(rewards, num_generations):
    """Group ids in ``[0, N)``: a scorable completion gets the index of its prompt's first
    scorable completion, an unscorable (NaN) one its own index. Distinct groups get distinct
    ids because every index names either itself or the scorable ones of its prompt."""
    n = rewards.shape[0]
    index = torch.arange(n, device=rewards.device)
    nan = torch.isnan(rewards)
    first = torch.where(nan, n, index).view(-1, num_generations).amin(1).repeat_interleave(num_generations)
    return torch.where(nan, index, first)


def _nanstd(t):
    """TRL's ``nanstd`` over all of ``t``: the unbiased std of the non-NaN values, NaN for
    fewer than two."""
    mean = torch.nanmean(t)
    count = (~torch.isnan(t)).sum()
    var = torch.nanmean((t - mean) ** 2) * count / (count - 1)
    return torch.where(count > 1, var, torch.full_like(var, float("nan"))).sqrt()


def grpo_advantages(rewards, num_generations, scale_rewards="group"):
    """TRL ``GRPOTrainer``'s advantages of ``[N]`` rewards (``num_generations`` per prompt,
    consecutive; NaN marks an unscorable completion). Returns ``[N]`` float32 (float64 for
    float64 rewards)."""
    _check(rewards, num_generations)
    if scale_rewards is True:
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    ids = _group_ids(rewards, num_generations)
    if scale_rewards == "group":
        adv = rmk.group_advantages(rewards, ids, estimator="grpo", eps=TRL_EPS, single="self").seq_advantages
    else:
        adv = rmk.group_advantages(rewards, ids, estimator="dr_grpo", single="self").seq_advantages
        if scale_rewards == "batch":
            std = _nanstd(rewards.to(adv.dtype)) if rewards.numel() > 1 else adv.new_zeros(())
            adv = adv / (std + TRL_EPS)
    return torch.nan_to_num(adv, nan=0.0)


def grpo_advantages_normalize_then_sum(rewards_per_func, num_generations, reward_weights=None):
    """TRL ``GRPOTrainer``'s advantages with ``multi_objective_aggregation="normalize_then_sum"``
    of ``[N, K]`` rewards (K reward functions; NaN where a function returned None), with
    ``reward_weights`` ``[K]`` (default all 1). Returns ``[N]`` float32 (float64 for float64
    rewards)."""
    if not isinstance(rewards_per_func, torch.Tensor) or rewards_per_func.dim() != 2 or rewards_per_func.shape[1] < 1:
        raise ValueError("rewards_per_func must be a 2-D tensor [completions, reward functions] with at least one "
                         "function")
    n, k = rewards_per_func.shape
    _check(rewards_per_func[:, 0], num_generations)
    acc = torch.promote_types(rewards_per_func.dtype, torch.float32)
    if reward_weights is None:
        w = torch.ones(k, dtype=acc, device=rewards_per_func.device)
    else:
        w = torch.as_tensor(reward_weights, dtype=acc, device=rewards_per_func.device)
        if w.shape != (k,):
            raise ValueError(f"reward_weights must hold one weight per reward function ({k}), got shape "
                             f"{tuple(w.shape)}")
    # every function's groups in one call: column j's ids shifted by j * N
    cols = rewards_per_func.t().reshape(-1)
    ids = torch.cat([_group_ids(rewards_per_func[:, j], num_generations) + j * n for j in range(k)])
    per_func = rmk.group_advantages(cols, ids, estimator="grpo", eps=TRL_EPS, single="self").seq_advantages
    rewards = (per_func.view(k, n).t() * w).nansum(dim=1)
    rewards = torch.where(torch.isnan(rewards_per_func).all(dim=1), torch.full_like(rewards, float("nan")), rewards)
    std = _nanstd(rewards) if rewards.numel() > 1 else rewards.new_zeros(())
    return torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std + TRL_EPS), nan=0.0)


def rloo_advantages(rewards, num_generations, normalize_advantages=False):
    """TRL ``RLOOTrainer``'s advantages of ``[N]`` rewards (KL already subtracted, as TRL does
    before this step; NaN marks an unscorable completion). Returns ``[N]`` float32 (float64
    for float64 rewards)."""
    _check(rewards, num_generations)
    if num_generations == 1:  # TRL: zeros, before and after its whitening
        return torch.zeros_like(rewards, dtype=torch.promote_types(rewards.dtype, torch.float32))
    ids = _group_ids(rewards, num_generations)
    adv = rmk.group_advantages(rewards, ids, estimator="rloo", single="self").seq_advantages
    if normalize_advantages:
        # TRL whitens over the advantages that are not NaN: not the unscorable completions,
        # and not a prompt's only scorable one (its 0 / 0)
        size = torch.zeros_like(ids).scatter_add_(0, ids, torch.ones_like(ids))[ids]
        adv = torch.where(size > 1, adv, torch.full_like(adv, float("nan")))
        adv = (adv - torch.nanmean(adv)) / (_nanstd(adv) + TRL_EPS)
    return torch.nan_to_num(adv, nan=0.0)
