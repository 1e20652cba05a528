"""Run OpenRLHF's own experience maker with ``rmkernels.integrations.openrlhf.patch_openrlhf()`` and
without.

``patch_openrlhf()`` replaces ``compute_approx_kl`` / ``compute_reward`` in
``openrlhf.trainer.ppo_utils.experience_maker`` and ``RemoteExperienceMaker``'s
``get_advantages_and_returns`` / ``get_cumulative_returns``. This script loads OpenRLHF 0.11.2's
experience maker as scripts/compare_frameworks.py does (its ray / deepspeed imports stubbed, the
file itself as published) and, on random batches of experiences (out of prompt order, masks
with holes, KL terms, values), calls the real
``RemoteExperienceMaker.compute_advantages_and_returns`` for every advantage estimator, once
unpatched and once patched, and prints per estimator the largest difference of the advantages
and returns (valid positions, relative to max(|OpenRLHF's|, 1)), the names served by rmkernels
and how many times the fused GAE / returns op (``token_reward_gae``) ran in each mode. Not
part of the test suite (CI tests patch_openrlhf on a stand-in module). In a scratch environment
with the packages of compare_frameworks.py's docstring:

    python scripts/compare_patch_openrlhf.py
"""
import argparse
import os
import sys
from types import SimpleNamespace as NS

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_frameworks as cf  # noqa: E402  (its loader: OpenRLHF with heavy imports stubbed)

import rmkernels.integrations.openrlhf as ro  # noqa: E402

ESTIMATORS = ("gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce")


def _experiences(Experience, g, n):
    """1-4 experiences of a batch of prompts x n samples, the rows shuffled across them."""
    prompts = int(torch.randint(1, 9, (1,), generator=g))
    N, T = prompts * n, int(torch.randint(1, 25, (1,), generator=g))
    mask = torch.rand(N, T, generator=g) < 0.8
    mask[:, 0] = True
    perm = torch.randperm(N, generator=g)
    k = max(1, N // int(torch.randint(1, 5, (1,), generator=g)))
    exps = []
    for c in [perm[i:i + k] for i in range(0, N, k)]:
        B = len(c)
        exps.append(Experience(index=c.tolist(), rewards=torch.randn(B, generator=g), action_mask=mask[c].clone(),
                               kl=0.1 * torch.randn(B, T, generator=g), values=torch.randn(B, T, generator=g),
                               info={}))
    return exps


def _copy(Experience, exps):
    return [Experience(index=list(e.index), rewards=e.rewards.clone(), action_mask=e.action_mask.clone(),
                       kl=e.kl.clone(), values=e.values.clone(), info={}) for e in exps]


def _rel(theirs, ours, mask):
    d = (theirs.double() - ours.double()).abs() / theirs.double().abs().clamp(min=1.0)
    return d[mask.bool()].max().item() if mask.any() else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=50, help="random batches per estimator (default 50)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    em = cf.load_openrlhf()
    from openrlhf.trainer.ppo_utils.experience import Experience

    ro.unpatch_openrlhf()
    print(f"OpenRLHF experience_maker (0.11.2 as published, heavy imports stubbed), torch {torch.__version__}, "
          f"{args.batches} random batches each (1-8 prompts x 1-8 samples, T 1-24, rows shuffled over 1-4 "
          "experiences, KL coefficient 0.05, gamma 0.99 / lambd 0.95 for gae, 1.0 otherwise); largest "
          "|patched - OpenRLHF| / max(|OpenRLHF|, 1) at the valid positions")
    print(f"\n  {'estimator':<20} {'advantages':>11} {'returns':>11}  fused calls unpatched / patched; "
          "served by rmkernels when patched")
    fused = ro.token_reward_gae
    calls = [0]

    def counted(*a, **k):
        calls[0] += 1
        return fused(*a, **k)

    ro.token_reward_gae = counted
    g = torch.Generator().manual_seed(args.seed)
    for est in ESTIMATORS:
        worst, served, ncalls = [0.0, 0.0], set(), [0, 0]
        for _ in range(args.batches):
            n = int(torch.randint(2 if est in ("rloo", "group_norm") else 1, 9, (1,), generator=g))
            exps = _experiences(Experience, g, n)
            gamma, lambd = (0.99, 0.95) if est == "gae" else (1.0, 1.0)
            outs = []
            for patched in (False, True):
                if patched:
                    served.update(ro.patch_openrlhf())
                calls[0] = 0
                maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
                maker.advantage_estimator = est
                maker.kl_ctl = NS(value=0.05)
                a = NS(rollout=NS(n_samples_per_prompt=n), reward=NS(clip_range=None),
                       algo=NS(advantage=NS(estimator=est, gamma=gamma, lambd=lambd, no_std_norm=False)))
                maker.strategy, maker.args = NS(args=a), a
                outs.append(maker.compute_advantages_and_returns(_copy(Experience, exps)))
                ncalls[patched] += calls[0]
                ro.unpatch_openrlhf()
            for theirs, ours in zip(*outs):
                m = theirs.action_mask
                worst = [max(worst[0], _rel(theirs.advantages, ours.advantages, m)),
                         max(worst[1], _rel(theirs.returns, ours.returns, m))]
        print(f"  {est:<20} {worst[0]:11.2e} {worst[1]:11.2e}  {ncalls[0]} / {ncalls[1]}; {', '.join(sorted(served))}")
    print(f"\nnames served by rmkernels after patch_openrlhf(): {', '.join(ro.patch_openrlhf())}")
    ro.unpatch_openrlhf()


if __name__ == "__main__":
    main()
