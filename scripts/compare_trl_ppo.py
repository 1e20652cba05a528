"""Compare ``rmkernels.integrations.trl_ppo`` with TRL's own PPO code, on random batches.

Not part of the test suite (CI checks the drop-in against TRL's formulas written out in
tests/test_adapters.py). TRL's PPO trainer lived in ``trl.experimental.ppo`` up to TRL 1.12
(1.13 removed it), so this reads 1.12.0's ``ppo_trainer.py`` from the wheel, without installing
it (its imports would need that TRL): its ``masked_mean`` / ``masked_var`` / ``masked_whiten``
are run as they are, and ``PPOTrainer.train``'s steps 3-6 (padding masks, rewards, whitening,
GAE) as the lines they are in the file, found by their first and last statements. It prints
the largest absolute difference of each output (float64 TRL against the float32 drop-in).

    pip download --no-deps trl==1.12.0 -d /tmp/trl112
    unzip -q /tmp/trl112/trl-1.12.0-*.whl 'trl/*' -d /tmp/trl112/src
    python scripts/compare_trl_ppo.py /tmp/trl112/src/trl/experimental/ppo/ppo_trainer.py [--batches 300]
"""
import argparse
import ast
from types import SimpleNamespace as NS

import torch

from rmkernels.integrations import trl_ppo

FIRST = "response_idxs = torch.arange(responses.shape[1]"
LAST = "advantages = torch.masked_fill(advantages, padding_mask, 0)"


def load(path):
    """(the masked_* functions, the code of steps 3-6 dedented) of TRL's ppo_trainer.py."""
    src = open(path).read()
    ns = {"torch": torch}
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and node.name in ("masked_mean", "masked_var", "masked_whiten"):
            exec(compile(ast.Module([node], []), path, "exec"), ns)
    lines = src.split("\n")
    start = next(i for i, line in enumerate(lines) if FIRST in line)
    end = next(i for i, line in enumerate(lines) if LAST in line)
    indent = len(lines[start]) - len(lines[start].lstrip())
    return ns, compile("\n".join(line[indent:] for line in lines[start:end + 1]), path, "exec")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ppo_trainer", help="TRL 1.12.0's trl/experimental/ppo/ppo_trainer.py")
    p.add_argument("--batches", type=int, default=300)
    a = p.parse_args(argv)
    ns, block = load(a.ppo_trainer)
    g = torch.Generator().manual_seed(0)
    worst = {}
    for _ in range(a.batches):
        B, T = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
        lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
        ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
        values = torch.randn(B, T, generator=g, dtype=torch.float64)
        scores = torch.randn(B, generator=g, dtype=torch.float64)
        seq = torch.randint(0, T, (B,), generator=g)  # TRL's sequence_lengths: the last real token
        for est in ("k1", "k3"):
            for whiten in (False, True):
                args = NS(kl_estimator=est, kl_coef=0.05, whiten_rewards=whiten, gamma=1.0, lam=0.95)
                env = dict(ns, responses=torch.zeros(B, T), sequence_lengths=seq.clone(), logprobs=lp.clone(),
                           ref_logprobs=ref.clone(), values=values.clone(), scores=scores.clone(), args=args,
                           INVALID_LOGPROB=trl_ppo.INVALID_LOGPROB)
                exec(block, env)
                out = trl_ppo.compute_rewards_and_advantages(
                    lp.float(), ref.float(), values.float(), scores.float(), seq, kl_coef=0.05, kl_estimator=est,
                    gamma=1.0, lam=0.95, whiten_rewards=whiten)
                for name in ("rewards", "advantages", "returns"):
                    d = (getattr(out, name).double() - env[name]).abs().max().item()
                    key = f"compute_rewards_and_advantages {name} ({est}, whiten_rewards={whiten})"
                    worst[key] = max(worst.get(key, 0.0), d)
        x = torch.randn(B, T, generator=g, dtype=torch.float64)
        m = torch.rand(B, T, generator=g) > 0.3
        if m.sum() >= 2:  # TRL's unbiased variance needs two tokens
            for shift in (True, False):
                got = trl_ppo.masked_whiten(x.float(), m, shift_mean=shift)
                want = ns["masked_whiten"](x, m.double(), shift_mean=shift)
                key = f"masked_whiten (shift_mean={shift}), at the mask"
                worst[key] = max(worst.get(key, 0.0), ((got.double() - want) * m).abs().max().item())
    print(f"rmkernels.integrations.trl_ppo against TRL 1.12.0's code, {a.batches} random batches "
          f"(B 2-6, T 2-11), largest |difference|:")
    for k, v in worst.items():
        print(f"  {k}: {v:.2g}")


if __name__ == "__main__":
    main()
