"""OpenRLHF's critic-free reward shaping (``--advantage_estimator rloo | reinforce_baseline |
dr_grpo | group_norm | flash_reinforce``), on :func:`rmkernels.group_advantages`.

OpenRLHF (0.11, ``experience_maker.py``) shapes the sequence rewards before the returns: it
reshapes the batch's rewards (in prompt order) to ``[-1, n_samples_per_prompt]`` and, per row
of that view,

* ``rloo``: ``r - (sum - r) / (n - 1)`` (= the leave-one-out advantage ``(n r - sum) / (n - 1)``);
* ``reinforce_baseline``, ``dr_grpo``: ``r - mean``;
* ``group_norm``: ``(r - mean) / (std + 1e-9)`` (unbiased std);
* ``flash_reinforce`` (0.11.2): ``r - mean`` with the mean of the whole batch (one group).

:func:`shape_rewards` returns those shaped rewards, flat, in the same order. Conventions kept:
groups are consecutive blocks of ``n_samples_per_prompt`` (group ids ``arange(N) // n``, no
labels); eps 1e-9 added to the unbiased std; rewards in at least float32. The returns and the
global whitening that follow in OpenRLHF (``get_cumulative_returns``, the population-variance
normalisation of ``reinforce_baseline``) are :mod:`rmkernels.integrations.openrlhf`'s.
Compared with the real ``RemoteExperienceMaker.compute_advantages_and_returns`` of OpenRLHF
0.11.2 by ``scripts/compare_frameworks.py`` (its heavy imports stubbed; random batches,
experiences out of prompt order; output in ``benchmarks/results/framework-comparison.txt``):
on random batches the returns agree to float32 rounding (``group_norm`` to a few 1e-6
relative). These statistics are float64, OpenRLHF's float32: where float32 rounds they are the
exact ones. A group of equal rewards that float32 does not hold exactly (0.1) gives 0 here and,
in OpenRLHF's ``group_norm``, float32 noise divided by ``std + 1e-9``: up to +-119 in groups of
8-16; two rewards one float32 step apart at 1000 give +-0.71 here and [0, 1.0] in
``group_norm``; rewards 1000 +- 0.01 in groups of 4-16 differ by up to ~4e-2 (audits of
2026-12-01 and 2026-12-03; the script's edge cases show one seed).

Where the numbers differ: with ``n_samples_per_prompt == 1`` every shaped reward is 0 (groups
of one are their own baseline, ``single="self"``); OpenRLHF's ``rloo`` and ``group_norm``
divide 0 by 0 there (NaN). Estimators without shaping (``gae``, ``reinforce``) return the
rewards unchanged, as OpenRLHF does.
"""
import torch

import rmkernels as rmk

__all__ = ["SHAPED_ESTIMATORS", "shape_rewards"]

# OpenRLHF's estimator -> (group_advantages estimator, eps)
_SHAPING = {"rloo": ("rloo", 0.0), "reinforce_baseline": ("dr_grpo", 0.0), "dr_grpo": ("dr_grpo", 0.0),
            "group_norm": ("grpo", 1e-9), "flash_reinforce": ("dr_grpo", 0.0)}
SHAPED_ESTIMATORS = tuple(_SHAPING)
_UNSHAPED = ("gae", "reinforce")


def shape_rewards(rewards, n_samples_per_prompt, advantage_estimator):
    """The shaped sequence rewards of OpenRLHF's ``advantage_estimator`` (module docstring).

    Args:
        rewards: ``[N]`` (or ``[N, 1]``) sequence rewards, prompt-major: responses ``i * n ..
            (i + 1) * n - 1`` answer prompt ``i``. N must be a multiple of n.
        n_samples_per_prompt: n, the responses per prompt.
        advantage_estimator: ``"rloo"``, ``"reinforce_baseline"``, ``"dr_grpo"``,
            ``"group_norm"``, ``"flash_reinforce"`` (or ``"gae"`` / ``"reinforce"``: no shaping).

    Returns: ``[N]`` shaped rewards, float32 (float64 for float64 rewards).
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if isinstance(n_samples_per_prompt, bool) or not isinstance(n_samples_per_prompt, int) or n_samples_per_prompt < 1:
        raise ValueError(f"n_samples_per_prompt must be a positive int, got {n_samples_per_prompt!r}")
    r = rewards.reshape(-1)
    if r.shape[0] % n_samples_per_prompt:
        raise ValueError(f"rewards must hold a multiple of n_samples_per_prompt = {n_samples_per_prompt} rewards, "
                         f"got {r.shape[0]}")
    if advantage_estimator in _UNSHAPED:
        return r.to(torch.promote_types(r.dtype, torch.float32))
    if advantage_estimator not in _SHAPING:
        raise ValueError(f"advantage_estimator must be one of {SHAPED_ESTIMATORS + _UNSHAPED}, "
                         f"got {advantage_estimator!r}")
    est, eps = _SHAPING[advantage_estimator]
    if advantage_estimator == "flash_reinforce":  # the batch is the group
        ids = torch.zeros(r.shape[0], dtype=torch.int64, device=r.device)
    else:
        ids = torch.arange(r.shape[0], device=r.device) // n_samples_per_prompt
    return rmk.group_advantages(r, ids, estimator=est, eps=eps, single="self").seq_advantages
