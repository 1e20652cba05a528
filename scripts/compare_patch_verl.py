"""Run verl's own trainer functions with ``rmkernels.integrations.verl.patch_verl()`` and without.

``patch_verl()`` replaces verl's advantage estimators (module attributes and registry entries of
``verl.trainer.ppo.core_algos``) and ``core_algos.kl_penalty`` with the drop-ins. This script
imports the real ``verl.trainer.ppo.ray_trainer`` (no stubs: it needs ray, torchdata, peft,
pillow, cachetools, fastapi, uvicorn besides verl's own requirements) and, on random batches
(a ``DataProto`` with uid strings in random order, masks with holes), calls

- ``ray_trainer.compute_advantage(data, adv_estimator=..., gamma, lam, config=AlgoConfig(...))``
  for every estimator of ``PATCHED_ESTIMATORS``, the way verl's trainer calls it;
- ``ray_trainer.apply_kl_penalty(data, FixedKLController, kl_penalty=...)`` for every KL name;

once unpatched and once patched, and prints per estimator the largest difference of the
advantages and returns (at the valid positions, relative to max(|verl's|, 1)), and that each
patched call went to rmkernels and each unpatched one to verl. Not part of the test suite
(CI tests patch_verl on a stand-in core_algos module). In a scratch environment:

    python -m venv /tmp/fw && . /tmp/fw/bin/activate
    pip install torch==2.13.0 numpy'<2.4' omegaconf transformers tensordict ray codetiming pillow \\
        peft cachetools fastapi uvicorn orjson
    pip install --no-deps verl==0.9.1 torchdata
    pip install --no-build-isolation -e .      # from the repository root
    python scripts/compare_patch_verl.py
"""
import argparse
import importlib.util
import sys

import numpy as np
import torch

import rmkernels  # noqa: F401  (fails early when the package is not installed)
import rmkernels.integrations.verl as rv

KL_NAMES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


def _load():
    if importlib.util.find_spec("verl") is None:
        sys.exit("verl is not installed: pip install --no-deps verl==0.9.1 (and the packages the docstring lists)")
    try:
        import verl
        from verl.protocol import DataProto
        from verl.trainer.config import AlgoConfig
        from verl.trainer.ppo import core_algos, ray_trainer
    except ImportError as e:
        sys.exit(f"verl's ray_trainer does not import ({e}): install the packages the docstring lists")
    return verl, DataProto, AlgoConfig, core_algos, ray_trainer


def _batch(DataProto, est, B, T, G, rng):
    uid = np.array([f"prompt-{i // G}-{rng.integers(10**9)}" for i in range(0, B, G) for _ in range(G)],
                   dtype=object)[:B]
    uid = uid[rng.permutation(B)]
    mask = torch.from_numpy(rng.random((B, T)) < 0.8).float()
    mask[:, 0] = 1  # every response has a token (verl's opo divides by the lengths)
    last = (mask * torch.arange(T)).argmax(-1)
    scores = torch.zeros(B, T)
    scores[torch.arange(B), last] = torch.from_numpy(rng.standard_normal(B)).float()
    tlr = scores + 0.01 * torch.from_numpy(rng.standard_normal((B, T))).float() * mask
    tensors = {"token_level_rewards": tlr, "token_level_scores": scores, "response_mask": mask,
               "values": torch.from_numpy(rng.standard_normal((B, T))).float(),
               "old_log_probs": -torch.from_numpy(rng.random((B, T)) * 3).float(),
               "ref_log_prob": -torch.from_numpy(rng.random((B, T)) * 3).float()}
    if est == "remax":
        tensors["reward_baselines"] = torch.from_numpy(rng.standard_normal(B)).float()
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": uid})


def _rel(theirs, ours, mask):
    d = (theirs - ours).abs() / theirs.abs().clamp(min=1.0)
    return d[mask.bool()].max().item() if mask.any() else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=50, help="random batches per estimator and KL name (default 50)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    verl, DataProto, AlgoConfig, core_algos, ray_trainer = _load()
    rv.unpatch_verl()
    print(f"verl {verl.__version__}, torch {torch.__version__}, {args.batches} random batches each (B 64-160, "
          "T 1-40, G 1-8, uids shuffled); largest |patched - verl| / max(|verl|, 1) at the valid positions")
    rng = np.random.default_rng(args.seed)
    gamma, lam = 0.97, 0.9
    config = AlgoConfig(gamma=gamma, lam=lam)
    print(f"\nray_trainer.compute_advantage (gamma {gamma}, lam {lam})")
    print(f"  {'estimator':<30} {'advantages':>11} {'returns':>11}  called")
    for est, fn_name in rv.PATCHED_ESTIMATORS.items():
        worst, called = [0.0, 0.0], set()
        for _ in range(args.batches):
            B, T, G = int(rng.integers(64, 161)), int(rng.integers(1, 41)), int(rng.integers(1, 9))
            seed = int(rng.integers(2**31))
            outs = []
            for patched in (False, True):
                data = _batch(DataProto, est, B, T, G, np.random.default_rng(seed))
                if patched:
                    served = rv.patch_verl()
                    assert est in served, (est, served)
                fn = getattr(core_algos, fn_name) if est in ("gae", "grpo") else core_algos.get_adv_estimator_fn(est)
                called.add(("rmkernels" if patched else "verl", fn.__module__.split(".")[0]))
                out = ray_trainer.compute_advantage(data, adv_estimator=est, gamma=gamma, lam=lam, config=config)
                b = out.batch
                outs.append((b["advantages"].clone(), b["returns"].clone(), b["response_mask"]))
                rv.unpatch_verl()
            (ta, tr, m), (oa, orr, _) = outs
            worst = [max(worst[0], _rel(ta, oa, m)), max(worst[1], _rel(tr, orr, m))]
        ok = all(want == got for want, got in called)
        print(f"  {est:<30} {worst[0]:11.2e} {worst[1]:11.2e}  {'as expected' if ok else sorted(called)}")
    print("\nray_trainer.apply_kl_penalty (FixedKLController(0.05)): token_level_rewards, the reward_kl_penalty metric")
    print(f"  {'kl_penalty':<30} {'rewards':>11} {'metric':>11}  called")
    for name in KL_NAMES:
        worst, called = [0.0, 0.0], set()
        for _ in range(args.batches):
            B, T, G = int(rng.integers(64, 161)), int(rng.integers(1, 41)), 1
            seed = int(rng.integers(2**31))
            outs = []
            for patched in (False, True):
                data = _batch(DataProto, "kl", B, T, G, np.random.default_rng(seed))
                if patched:
                    rv.patch_verl()
                called.add(("rmkernels" if patched else "verl", core_algos.kl_penalty.__module__.split(".")[0]))
                data, metrics = ray_trainer.apply_kl_penalty(data, core_algos.FixedKLController(0.05), kl_penalty=name)
                outs.append((data.batch["token_level_rewards"].clone(), metrics["actor/reward_kl_penalty"],
                             data.batch["response_mask"]))
                rv.unpatch_verl()
            (tr, tk, m), (orr, ok_, _) = outs
            worst = [max(worst[0], _rel(tr, orr, m)), max(worst[1], abs(tk - ok_) / max(abs(tk), 1.0))]
        ok = all(want == got for want, got in called)
        print(f"  {name:<30} {worst[0]:11.2e} {worst[1]:11.2e}  {'as expected' if ok else sorted(called)}")
    print(f"\nregistry names served by rmkernels after patch_verl(): {', '.join(rv.patch_verl())}")
    rv.unpatch_verl()


if __name__ == "__main__":
    main()
