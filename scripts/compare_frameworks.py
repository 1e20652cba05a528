"""Compare the critic-free drop-ins with the frameworks' own code, on random batches.

Not part of the test suite (CI tests the drop-ins against the published formulas, written out in
tests/test_group_adv_dropins.py): this runs the real verl 0.9.1 ``core_algos`` advantage
functions and OpenRLHF 0.11.2's ``RemoteExperienceMaker.compute_advantages_and_returns``, loaded
from their installed source files with their heavy imports (ray, deepspeed, tensordict, their
config classes) replaced by stubs, and prints the largest difference of each drop-in, relative
to max(|x|, 1). Then edge cases where float32 statistics round (groups of equal rewards that
float32 does not hold exactly, rewards with a large offset, a bfloat16 mask over long
responses): each side's distance to the framework's own code run in float64. TRL's functions
are compared in CI (TRL is a test requirement).

In a scratch environment (the frameworks' own dependencies are not needed):

    python -m venv /tmp/fw && . /tmp/fw/bin/activate
    pip install torch==2.13.0 numpy'<2.4' omegaconf transformers
    pip install --no-deps verl==0.9.1 openrlhf==0.11.2
    pip install --no-build-isolation -e .      # from the repository root
    python scripts/compare_frameworks.py [--batches 200]
"""
import argparse
import importlib.util
import logging
import os
import sys
import types
from types import SimpleNamespace as NS
from unittest.mock import MagicMock

import numpy as np
import torch

import rmkernels  # noqa: F401  (fails early when the package is not installed)
from rmkernels.integrations import openrlhf_critic_free as orl
from rmkernels.integrations import verl_critic_free as rv


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name} is not installed: pip install --no-deps verl==0.9.1 openrlhf==0.11.2 (see the docstring)")
    return list(spec.submodule_search_locations)[0]


def _stub_package(name):
    mod = types.ModuleType(name)
    mod.__path__ = []
    sys.modules[name] = mod
    return mod


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_verl():
    """verl 0.9.1's core_algos, with verl.utils' groupwise and torch_functional (real files)."""
    root = _package_dir("verl")
    for pkg in ("verl", "verl.utils", "verl.trainer", "verl.trainer.ppo", "verl.workers"):
        _stub_package(pkg)
    # a class of its own: compute_policy_loss_vanilla asserts its config is no AlgoConfig
    sys.modules["verl.trainer.config"] = NS(AlgoConfig=type("AlgoConfig", (), {}))
    sys.modules["verl.workers.config"] = NS(ActorConfig=object)
    sys.modules["verl.utils.import_utils"] = NS(deprecated=lambda *a, **k: (lambda f: f))
    sys.modules["verl.utils.device"] = NS(get_device_name=lambda: "cpu", get_torch_device=lambda: torch.cuda)
    sys.modules.setdefault("tensordict", NS(TensorDict=object))
    groupwise = _load("verl.utils.groupwise", os.path.join(root, "utils", "groupwise.py"))
    sys.modules["verl.utils"].as_torch_index = groupwise.as_torch_index
    sys.modules["verl.utils"].group_mean_std = groupwise.group_mean_std
    _load("verl.utils.torch_functional", os.path.join(root, "utils", "torch_functional.py"))
    sys.modules["verl.utils"].torch_functional = sys.modules["verl.utils.torch_functional"]
    return _load("verl.trainer.ppo.core_algos", os.path.join(root, "trainer", "ppo", "core_algos.py"))


def load_openrlhf():
    """OpenRLHF 0.11.2's experience_maker, with its experience, models.utils and length_penalty."""
    root = _package_dir("openrlhf")
    for pkg in ("openrlhf", "openrlhf.models", "openrlhf.trainer", "openrlhf.trainer.ppo_utils", "openrlhf.utils"):
        _stub_package(pkg)
    for name in ("ray", "deepspeed", "openrlhf.trainer.ray", "openrlhf.trainer.ray.launcher",
                 "openrlhf.utils.seqlen_balancing"):
        sys.modules[name] = MagicMock()
    sys.modules["openrlhf.utils.logging_utils"] = NS(init_logger=logging.getLogger)
    _load("openrlhf.utils.utils", os.path.join(root, "utils", "utils.py"))
    _load("openrlhf.models.utils", os.path.join(root, "models", "utils.py"))
    _load("openrlhf.trainer.ppo_utils.experience", os.path.join(root, "trainer", "ppo_utils", "experience.py"))
    _load("openrlhf.trainer.ppo_utils.length_penalty", os.path.join(root, "trainer", "ppo_utils", "length_penalty.py"))
    return _load("openrlhf.trainer.ppo_utils.experience_maker",
                 os.path.join(root, "trainer", "ppo_utils", "experience_maker.py"))


def rel_diff(a, b):
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = ((a - b).abs() / b.abs().clamp(min=1)).masked_fill(both_nan, 0)
    return float(d.nan_to_num(float("inf")).max()) if d.numel() else 0.0


def verl_batch(g):
    """Random verl batch: ragged groups (sizes 1-9, groups of one), uids as numpy strings in
    shuffled order, a mask with holes, token rewards at the last valid token (verl's layout)."""
    sizes = torch.randint(1, 10, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    ids = ids[torch.randperm(len(ids), generator=g)]
    B, T = len(ids), int(torch.randint(1, 24, (1,), generator=g))
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    mask = mask * (torch.rand(B, T, generator=g) > 0.1)  # holes (tool tokens)
    scores = torch.randn(B, generator=g).round(decimals=1)  # ties, exact zeros
    tlr = torch.zeros(B, T)
    last = (mask * torch.arange(1, T + 1)).argmax(-1)
    tlr[torch.arange(B), last] = scores * (mask.sum(-1) > 0)
    uids = np.array([f"uid-{int(i)}" for i in ids], dtype=object)
    return tlr, mask, uids


def compare_verl(ca, batches):
    """At the valid positions; at masked ones the drop-ins give exact zeros (documented), where
    verl's ``x * mask`` gives NaN for a NaN x (OPO's group whose responses have no valid token).
    ReMax at every position (its returns are defined there, in verl and in the drop-in)."""
    cfg = NS(gamma=0.97, norm_adv_by_std_in_grpo=True)
    worst = {}
    state = {}

    def note(name, got, want, everywhere=False):
        valid = torch.ones_like(state["mask"], dtype=torch.bool) if everywhere else state["mask"] != 0
        for x, y in zip(got, want):
            if not bool((x[~valid] == 0).all()):
                raise AssertionError(f"{name}: a masked position is not 0")
            worst[name] = max(worst.get(name, 0.0), rel_diff(x[valid], y[valid]))

    g = torch.Generator().manual_seed(0)
    for _ in range(batches):
        tlr, mask, uids = verl_batch(g)
        state["mask"] = mask
        for name in ("compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage",
                     "compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage",
                     "compute_opo_outcome_advantage", "compute_gpg_outcome_advantage",
                     "compute_reinforce_plus_plus_baseline_outcome_advantage"):
            note(name, getattr(rv, name)(tlr, mask, uids), getattr(ca, name)(tlr, mask, uids, config=cfg))
        note("compute_grpo_outcome_advantage[dr_grpo]",
             rv.compute_grpo_outcome_advantage(tlr, mask, uids, norm_adv_by_std_in_grpo=False),
             ca.compute_grpo_outcome_advantage(tlr, mask, uids, norm_adv_by_std_in_grpo=False))
        note("compute_reinforce_plus_plus_outcome_advantage",
             rv.compute_reinforce_plus_plus_outcome_advantage(tlr, mask, config=cfg),
             ca.compute_reinforce_plus_plus_outcome_advantage(tlr, mask, config=cfg))
        baselines = torch.randn(tlr.shape[0], generator=g)
        note("compute_remax_outcome_advantage",
             rv.compute_remax_outcome_advantage(tlr, baselines, mask.bool()),
             ca.compute_remax_outcome_advantage(tlr, baselines, mask.bool()), everywhere=True)
    return worst


def openrlhf_returns(em, est, rewards, mask, n, g):
    """The returns of OpenRLHF's ``compute_advantages_and_returns`` (gamma 1: the shaped reward on
    every valid token), the experiences out of prompt order."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    N, T = mask.shape
    perm = torch.randperm(N, generator=g)
    k = max(1, N // 3)
    chunks = [perm[i:i + k] for i in range(0, N, k)]
    exps = [Experience(index=c.tolist(), rewards=rewards[c].clone(), action_mask=mask[c].clone(),
                       kl=torch.zeros(len(c), T), values=torch.zeros(len(c), T), info={}) for c in chunks]
    maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
    maker.advantage_estimator = est
    maker.kl_ctl = NS(value=0.0)
    args = NS(rollout=NS(n_samples_per_prompt=n), reward=NS(clip_range=None),
              algo=NS(advantage=NS(estimator=est, gamma=1.0, lambd=1.0, no_std_norm=True)))
    maker.strategy, maker.args = NS(args=args), args
    real = torch.empty(N, T, dtype=torch.float64)
    for c, e in zip(chunks, maker.compute_advantages_and_returns(exps)):
        real[c] = e.returns.double()
    return real


def compare_openrlhf(em, batches):
    worst = {}
    g = torch.Generator().manual_seed(1)
    for seed in range(batches):
        for est in ("rloo", "reinforce_baseline", "dr_grpo", "group_norm", "flash_reinforce", "reinforce"):
            n = (1, 2, 4, 8)[seed % 4]
            if n == 1 and est in ("rloo", "group_norm"):  # OpenRLHF divides 0 by 0 there (documented)
                continue
            N, T = n * (1 + seed % 7), 1 + seed % 9
            rewards = torch.randn(N, generator=g)
            mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (N,), generator=g)[:, None]).float()
            real = openrlhf_returns(em, est, rewards, mask, n, g)
            ours = orl.shape_rewards(rewards, n, est)[:, None] * mask  # returns at gamma 1: the shaped reward
            worst[est] = max(worst.get(est, 0.0), rel_diff(ours, real))
    return worst


def _err(x, exact, mask):
    """max |x - exact| at the valid positions (NaN where either is NaN there)."""
    d = (x.double() - exact.double()).abs()[mask != 0]
    return float(d.max()) if d.numel() else 0.0


# verl's vectorized GRPO computes its statistics in float32 whatever the input (group_mean_std):
# its exact values are those of the loop GRPO in float64 (the same formula).
_EXACT = {"compute_grpo_vectorized_outcome_advantage": "compute_grpo_outcome_advantage"}


def edge_cases(ca, em):
    """Inputs where float32 statistics round: each side's largest |x - exact| at the valid
    positions, ``exact`` being the framework's own code on float64 copies of the inputs (for
    verl's vectorized GRPO, its loop GRPO: ``_EXACT``)."""
    g = torch.Generator().manual_seed(2)
    B, T, G = 64, 4, 8
    uids = np.array([f"uid-{i // G}" for i in range(B)], dtype=object)
    full = torch.ones(B, T)
    equal = torch.zeros(B, T)
    equal[:, -1] = 0.1  # groups of equal rewards that float32 does not hold exactly
    offset = torch.zeros(B, T)
    offset[:, -1] = 1000 + 0.01 * torch.randn(B, generator=g)  # a large offset, a small spread
    T_long = 700  # lengths above 256: a bfloat16 mask's sums round
    long_mask = (torch.arange(T_long)[None] < torch.randint(300, T_long + 1, (B,), generator=g)[:, None]).float()
    long_r = torch.zeros(B, T_long)
    long_r[:, 0] = torch.randn(B, generator=g)
    cfg = NS(gamma=1.0, norm_adv_by_std_in_grpo=True)
    rows = []
    verl_cases = [("equal rewards 0.1, groups of 8", equal, full,
                   ("compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage",
                    "compute_reinforce_plus_plus_baseline_outcome_advantage")),
                  ("rewards 1000 +- 0.01, groups of 8", offset, full,
                   ("compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage", "compute_opo_outcome_advantage",
                    "compute_gpg_outcome_advantage", "compute_reinforce_plus_plus_baseline_outcome_advantage")),
                  ("bfloat16 mask, 300-700 valid tokens", long_r, long_mask,
                   ("compute_opo_outcome_advantage", "compute_reinforce_plus_plus_baseline_outcome_advantage"))]
    for case, r, m, names in verl_cases:
        mk = m.bfloat16() if "bfloat16" in case else m
        for name in names:
            exact_fn = _EXACT.get(name, name)
            exact = getattr(ca, exact_fn)(r.double(), m.double(), uids, config=cfg)[0]
            ours = getattr(rv, name)(r, mk, uids, config=cfg)[0]
            theirs = getattr(ca, name)(r, mk, uids, config=cfg)[0]
            rows.append((case, name, _err(ours, exact, m), _err(theirs, exact, m)))
    for case, r in (("equal rewards 0.1, groups of 8", equal), ("rewards 1000 +- 0.01, groups of 8", offset)):
        seq = r[:, -1].clone()
        for est in ("group_norm", "rloo"):
            exact = openrlhf_returns(em, est, seq.double(), full.double(), G, torch.Generator().manual_seed(3))
            theirs = openrlhf_returns(em, est, seq, full, G, torch.Generator().manual_seed(3))
            ours = orl.shape_rewards(seq, G, est)[:, None] * full
            rows.append((case, f"OpenRLHF {est}", _err(ours, exact, full), _err(theirs, exact, full)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=200)
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {a.batches} random batches each; largest |ours - theirs| / max(|theirs|, 1)")
    for title, load, compare in (("verl 0.9.1 core_algos", load_verl, compare_verl),
                                 ("OpenRLHF 0.11.2 compute_advantages_and_returns", load_openrlhf, compare_openrlhf)):
        print(f"\n{title}")
        for name, d in sorted(compare(load(), a.batches).items()):
            print(f"  {name:58s} {d:.2e}")
    print("\nEdge cases: largest |x - exact| at the valid positions, exact = the framework's own code on float64 "
          "copies of the inputs (verl's loop GRPO for its vectorized one, which computes in float32 whatever the "
          "input)")
    print(f"  {'case':36s} {'function':58s} {'ours':>9s} {'theirs':>9s}")
    for case, name, ours, theirs in edge_cases(sys.modules["verl.trainer.ppo.core_algos"],
                                               sys.modules["openrlhf.trainer.ppo_utils.experience_maker"]):
        print(f"  {case:36s} {name:58s} {ours:9.2e} {theirs:9.2e}")


if __name__ == "__main__":
    main()
