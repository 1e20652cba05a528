"""TRL's GRPO and RLOO advantages (TRL 1.x ``GRPOTrainer`` / ``RLOOTrainer``), on
:func:`rmkernels.group_advantages`.

Conventions kept from TRL: the rewards are grouped in consecutive blocks of
``num_generations`` (TRL's ``rewards.view(-1, num_generations)``); GRPO subtracts the group
mean and, by ``scale_rewards``, divides by the group std (``"group"``, TRL's default; ``True``
is ``"group"``), by the std of the whole batch (``"batch"``) or by nothing (``"none"`` /
``False``, Dr. GRPO), always with eps 1e-4 added to the (unbiased) std; RLOO subtracts the
leave-one-out mean ``(sum - r) / (n - 1)`` and, with ``normalize_advantages``, whitens the
advantages over the batch (``(a - mean) / (std + 1e-4)``, unbiased). ``num_generations == 1``
gives zero advantages, as TRL does.

Where the numbers differ: TRL marks unscorable completions NaN and leaves them out of the
group statistics (``nanmean``/``nanstd``) before zeroing their advantage; here a NaN reward
makes its own group NaN (the other groups are untouched). Pass finite rewards.
"""
import torch

import rmkernels as rmk

__all__ = ["grpo_advantages", "rloo_advantages"]

TRL_EPS = 1e-4


def _check(rewards, num_generations):
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a 1-D tensor (one reward per completion)")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}")
    if rewards.shape[0] % num_generations:
        raise ValueError(f"rewards must hold a multiple of num_generations = {num_generations}, "
                         f"got {rewards.shape[0]}")
    return torch.arange(rewards.shape[0], device=rewards.device) // num_generations


def grpo_advantages(rewards, num_generations, scale_rewards="group"):
    """TRL ``GRPOTrainer``'s advantages of ``[N]`` rewards (``num_generations`` per prompt,
    consecutive). Returns ``[N]`` float32 (float64 for float64 rewards)."""
    ids = _check(rewards, num_generations)
    if scale_rewards is True:
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    if scale_rewards == "group":
        return rmk.group_advantages(rewards, ids, estimator="grpo", eps=TRL_EPS, single="self").seq_advantages
    if scale_rewards not in ("batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    adv = rmk.group_advantages(rewards, ids, estimator="dr_grpo", single="self").seq_advantages
    if scale_rewards == "batch":
        std = rewards.to(adv.dtype).std() if rewards.numel() > 1 else adv.new_zeros(())
        adv = adv / (std + TRL_EPS)
    return adv


def rloo_advantages(rewards, num_generations, normalize_advantages=False):
    """TRL ``RLOOTrainer``'s advantages of ``[N]`` rewards (KL already subtracted, as TRL does
    before this step). Returns ``[N]`` float32 (float64 for float64 rewards)."""
    ids = _check(rewards, num_generations)
    adv = rmk.group_advantages(rewards, ids, estimator="rloo", single="self").seq_advantages
    if normalize_advantages:
        adv = (adv - adv.mean()) / (adv.std() + TRL_EPS)
    return adv
