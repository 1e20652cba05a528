"""The critic-free drop-ins (rmkernels.integrations.verl / openrlhf_critic_free /
trl_critic_free) against the frameworks' published formulas, written here as the frameworks
write them (verl 0.9 core_algos.py, OpenRLHF 0.11 experience_maker.py, TRL 1.x GRPOTrainer /
RLOOTrainer). The same drop-ins were compared against the real verl 0.9.1 functions outside
CI (see the group-advantages section of the README)."""
import types

import numpy as np
import pytest
import torch
from test_group_advantages import (
    make_groups,
    verl_loop,
    verl_reinforce_pp_returns,
)
from utils import assert_close, make_mask

from rmkernels.integrations import openrlhf_critic_free as orl
from rmkernels.integrations import trl_critic_free as trl
from rmkernels.integrations import verl as rv


def _batch(B=83, T=21):
    ids = make_groups(B)
    index = np.array([f"{int(i):08x}-uid" for i in ids], dtype=object)
    mask = make_mask("holes", B, T)
    mask[:, 0] = True  # every response has a token (verl's opo would give 0/0 otherwise)
    tlr = torch.zeros(B, T)
    tlr[:, -1] = (torch.rand(B) < 0.5).float() + 0.3 * torch.randn(B) * (torch.rand(B) < 0.5)
    tlr += 0.01 * torch.randn(B, T) * mask
    return tlr, mask.float(), index


VERL = [("compute_grpo_outcome_advantage", "grpo", {}),
        ("compute_grpo_vectorized_outcome_advantage", "grpo", {}),
        ("compute_rloo_outcome_advantage", "rloo", {}),
        ("compute_opo_outcome_advantage", "opo", {}),
        ("compute_gpg_outcome_advantage", "gpg", {"f_norm": 2.0}),
        ("compute_reinforce_plus_plus_baseline_outcome_advantage", "reinforce_pp_baseline", {})]


@pytest.mark.parametrize("name,estimator,kw", VERL, ids=[v[0] for v in VERL])
def test_verl_group_estimators(name, estimator, kw):
    tlr, mask, index = _batch()
    adv, ret = getattr(rv, name)(tlr, mask, index, **kw)
    expect = verl_loop(tlr, mask, index, estimator, **kw)
    tol = 2e-4 if estimator in ("grpo", "reinforce_pp_baseline") else 2e-6  # float32 std of small groups
    assert_close(adv, expect, rtol=tol, atol=tol, name=name)
    assert adv is ret


def test_verl_dr_grpo_and_rloo_vectorized():
    tlr, mask, index = _batch()
    adv, _ = rv.compute_grpo_outcome_advantage(tlr, mask, index, norm_adv_by_std_in_grpo=False)
    assert_close(adv, verl_loop(tlr, mask, index, "dr_grpo"), rtol=2e-6, atol=2e-6, name="dr_grpo")
    # verl's rloo_vectorized: ((c * s - sum) / (c - 1).clamp_min(1)) * (c > 1): groups of one get 0
    scores = tlr.sum(-1)
    inv = torch.from_numpy(np.unique(index, return_inverse=True)[1])
    c = torch.bincount(inv)[inv].float()
    expect = ((c * scores - torch.bincount(inv, weights=scores)[inv]) / (c - 1).clamp_min(1)) * (c > 1)
    adv, _ = rv.compute_rloo_vectorized_outcome_advantage(tlr, mask, index)
    assert_close(adv, expect.unsqueeze(-1) * mask, rtol=2e-6, atol=2e-6, name="rloo_vectorized")


def test_verl_reinforce_pp_and_remax():
    tlr, mask, _ = _batch()
    cfg = types.SimpleNamespace(gamma=0.97)
    adv, ret = rv.compute_reinforce_plus_plus_outcome_advantage(tlr, mask, config=cfg)
    want_ret = verl_reinforce_pp_returns(tlr, mask, 0.97)
    assert_close(ret, want_ret, rtol=1e-6, atol=1e-6, name="returns")
    n = mask.sum()
    mean = (want_ret * mask).sum() / n
    var = (((want_ret - mean) ** 2) * mask).sum() / (n - 1)
    assert_close(adv, (want_ret - mean) * torch.rsqrt(var + 1e-8) * mask, rtol=1e-5, atol=1e-5, name="whitened")
    with pytest.raises(TypeError, match="config"):
        rv.compute_reinforce_plus_plus_outcome_advantage(tlr, mask)
    base = torch.randn(tlr.shape[0])
    for m in (mask, mask.bool(), mask.long(), mask.float()):  # the mask dtypes verl's callers pass
        adv, ret = rv.compute_remax_outcome_advantage(tlr, base, m)
        want_ret = (tlr * m).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
        assert_close(ret, want_ret, rtol=1e-6, atol=1e-6, name=f"remax returns, {m.dtype} mask")
        assert_close(adv, want_ret - base.unsqueeze(-1) * m, rtol=1e-6, atol=1e-6, name=f"remax advantages, {m.dtype}")
    base0 = torch.tensor(0.37)  # 0-d: one baseline for every response (verl's unsqueeze broadcasts it)
    adv, ret = rv.compute_remax_outcome_advantage(tlr, base0, mask)
    want_ret = (tlr * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    assert_close(adv, want_ret - base0.unsqueeze(-1) * mask, rtol=1e-6, atol=1e-6, name="remax, a 0-d baseline")
    with pytest.raises(ValueError, match=r"reward_baselines must be .* got \(\d+, 1\)"):  # verl: a [bs, bs, T] result
        rv.compute_remax_outcome_advantage(tlr, base[:, None], mask)


def test_verl_grpo_epsilon_is_used():
    """A non-default epsilon reaches the op: (s - mean) / (std + epsilon), verl's formula (a
    mutation that dropped it, so 1e-6 was always used, passed before)."""
    tlr = torch.zeros(4, 3)
    tlr[:, -1] = torch.tensor([1.0, 0.0, 3.0, 1.0])
    mask = torch.ones(4, 3)
    index = np.array(["a", "a", "b", "b"], dtype=object)
    for eps in (0.5, 0.0, 1e-6):
        for fn in (rv.compute_grpo_outcome_advantage, rv.compute_grpo_vectorized_outcome_advantage):
            adv, _ = fn(tlr, mask, index, epsilon=eps)
            s = tlr[:, -1].reshape(2, 2)
            want = ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + eps)).reshape(4, 1).expand(4, 3)
            assert_close(adv, want, rtol=1e-6, atol=1e-6, name=f"{fn.__name__} epsilon={eps}")


def test_verl_errors():
    tlr, mask, index = _batch(B=6)
    with pytest.raises(TypeError, match="index"):
        rv.compute_grpo_outcome_advantage(tlr, mask, None)
    with pytest.raises(ValueError, match="index"):
        rv.compute_grpo_outcome_advantage(tlr, mask, index[:5])
    with pytest.raises(ValueError, match="response_mask"):
        rv.compute_rloo_outcome_advantage(tlr, mask[:, :3], index)
    # verl computes with these; refused here (the module docstring says so)
    with pytest.raises(ValueError, match=r"^epsilon must be in \[0.0, inf\)"):
        rv.compute_grpo_outcome_advantage(tlr, mask, index, epsilon=-1e-3)
    with pytest.raises(ValueError, match="f_norm"):
        rv.compute_gpg_outcome_advantage(tlr, mask, index, f_norm=-2.0)


@pytest.mark.parametrize("mode", ["rloo", "reinforce_baseline", "dr_grpo", "group_norm", "flash_reinforce", "gae"])
@pytest.mark.parametrize("n", [1, 4])
def test_openrlhf_shaping(mode, n):
    P = 13
    raw = torch.randn(n * P)
    rewards = raw.reshape(-1, n)
    if mode == "rloo":  # OpenRLHF experience_maker.py, as written there
        baseline = (rewards.sum(-1, keepdim=True) - rewards) / (n - 1) if n > 1 else None
        expect = rewards - baseline if n > 1 else torch.zeros_like(rewards)
    elif mode in ("reinforce_baseline", "dr_grpo"):
        expect = rewards - rewards.mean(-1, keepdim=True)
    elif mode == "group_norm":
        expect = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9) if n > 1 \
            else torch.zeros_like(rewards)  # OpenRLHF: 0/0 NaN; here 0 (documented)
    elif mode == "flash_reinforce":
        expect = rewards - rewards.mean()
    else:
        expect = rewards
    got = orl.shape_rewards(raw, n, mode)
    assert_close(got, expect.reshape(-1), rtol=1e-5, atol=1e-5, name=mode)
    # rewards in at least float32, every mode (the unshaped "gae" / "reinforce" too)
    low = orl.shape_rewards(raw.to(torch.bfloat16), n, mode)
    assert low.dtype == torch.float32, (mode, low.dtype)
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        orl.shape_rewards(torch.randn(7), 2, mode)
    with pytest.raises(ValueError, match="advantage_estimator"):
        orl.shape_rewards(raw, n, "ppo")


def _trl_rewards(G, P, unscorable):
    """P prompts x G rewards; with ``unscorable``, NaN (TRL's unscorable completion) at random
    places, one prompt with none scorable, one with a single scorable completion and an
    infinite reward (not unscorable: TRL's nan_to_num makes it 0 or +-float max)."""
    rewards = torch.randn(P * G)
    if unscorable and G > 1:
        rewards[torch.rand(P * G) < 0.2] = float("nan")
        rewards[:G] = float("nan")
        rewards[G:2 * G - 1] = float("nan")
        rewards[2 * G + 1] = float("inf")
    elif unscorable:
        rewards[::3] = float("nan")
        rewards[4] = -float("inf")
    return rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("G", [1, 8])
@pytest.mark.parametrize("unscorable", [False, True])
def test_trl_grpo(scale, G, unscorable):
    from trl.trainer.utils import nanstd  # TRL's own

    rewards = _trl_rewards(G, 7, unscorable)
    # TRL 1.16 GRPOTrainer._generate_and_score_completions, "sum_then_normalize", as written there
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    mode = {True: "group", False: "none"}.get(scale, scale)
    if mode in ("group", "none"):
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0) if G > 1 else torch.zeros_like(rewards)
    else:
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    expect = rewards - mean
    if mode != "none":
        expect = expect / (std + 1e-4)
    expect = torch.nan_to_num(expect, nan=0.0)
    assert_close(trl.grpo_advantages(rewards, G, scale), expect, rtol=1e-5, atol=1e-5, name=str(scale))


@pytest.mark.parametrize("G", [1, 8])
@pytest.mark.parametrize("weights", [None, [0.5, -2.0, 1.0]])
def test_trl_grpo_normalize_then_sum(G, weights):
    from trl.trainer.utils import nanstd  # TRL's own

    P, K = 7, 3
    rewards_per_func = torch.stack([_trl_rewards(G, P, True) for _ in range(K)], dim=1)
    rewards_per_func[3 * G] = float("nan")  # a completion no function scored
    rewards_per_func[0, 1] = 2.5  # a prompt that one function alone scores once
    w = torch.ones(K) if weights is None else torch.tensor(weights)
    # TRL 1.16 GRPOTrainer._generate_and_score_completions, "normalize_then_sum", as written there
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    grouped = rewards_per_func.view(-1, G, K)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, K)
    rewards = (reward_k * w.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    expect = torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4), nan=0.0)
    got = trl.grpo_advantages_normalize_then_sum(rewards_per_func, G, weights)
    assert_close(got, expect, rtol=1e-5, atol=1e-5, name=f"normalize_then_sum G={G}")
    with pytest.raises(ValueError, match="reward_weights"):
        trl.grpo_advantages_normalize_then_sum(rewards_per_func, G, [1.0, 2.0])
    with pytest.raises(ValueError, match="rewards_per_func"):
        trl.grpo_advantages_normalize_then_sum(rewards_per_func[:, 0], G)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("unscorable", [False, True])
def test_trl_rloo(normalize, G, unscorable):
    from trl.trainer.utils import nanstd  # TRL's own

    rewards = _trl_rewards(G, 9, unscorable)
    grouped = rewards.view(-1, G)  # TRL 1.16 RLOOTrainer, as written there
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    if G > 1:
        adv = rewards - ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    else:
        adv = torch.zeros_like(rewards)
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-4)
    adv = torch.nan_to_num(adv, nan=0.0)
    assert_close(trl.rloo_advantages(rewards, G, normalize), adv, rtol=1e-5, atol=1e-5, name="rloo")
    with pytest.raises(ValueError, match="num_generations"):
        trl.rloo_advantages(rewards, 0)
    with pytest.raises(TypeError, match="rewards"):
        trl.rloo_advantages(torch.ones(8, dtype=torch.int64), 4)


def test_verl_exports_every_estimator():
    """`from rmkernels.integrations.verl import *` gives verl's PPO functions and every
    critic-free estimator (its __all__ names them all, and each resolves)."""
    from rmkernels.integrations import verl_critic_free

    names = {"compute_gae_advantage_return", "kl_penalty", *(n for n, _, _ in VERL),
             "compute_reinforce_plus_plus_outcome_advantage", "compute_remax_outcome_advantage"}
    assert names <= set(rv.__all__) and set(verl_critic_free.__all__) <= set(rv.__all__)
    ns = {}
    exec("from rmkernels.integrations.verl import *", ns)
    for name in rv.__all__:
        assert ns[name] is getattr(rv, name), name


def test_each_frameworks_eps_and_switches_where_they_matter():
    """Each framework's own eps, on a group whose spread is of its size (std ~1 elsewhere, where
    1e-6 against 1e-9 is below every tolerance: a swapped eps went unseen), float64 so that it
    is the eps that decides; and vectorized GRPO's norm_adv_by_std_in_grpo (tested only on the
    loop version)."""
    spread = torch.tensor([0.0, 2e-6], dtype=torch.float64)
    std = 2e-6 / 2 ** 0.5  # the unbiased std of the pair
    tlr, mask = spread.reshape(2, 1), torch.ones(2, 1)
    for name in ("compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage"):
        adv, _ = getattr(rv, name)(tlr, mask, np.array(["a", "a"], dtype=object))
        assert_close(adv[:, 0], torch.tensor([-1e-6, 1e-6], dtype=torch.float64) / (std + 1e-6), rtol=1e-9,
                     atol=0, name=f"verl {name}: epsilon 1e-6")
        adv, _ = getattr(rv, name)(torch.tensor([[0.0], [2.0]]), mask, np.array(["a", "a"], dtype=object),
                                   norm_adv_by_std_in_grpo=False)
        assert_close(adv[:, 0], torch.tensor([-1.0, 1.0]), rtol=0, atol=0, name=f"verl {name}: Dr. GRPO")
    assert_close(orl.shape_rewards(spread, 2, "group_norm"), torch.tensor([-1e-6, 1e-6], dtype=torch.float64) /
                 (std + 1e-9), rtol=1e-9, atol=0, name="OpenRLHF group_norm: eps 1e-9")
    assert_close(trl.grpo_advantages(spread, 2, "group"), torch.tensor([-1e-6, 1e-6], dtype=torch.float64) /
                 (std + 1e-4), rtol=1e-9, atol=0, name="TRL GRPO: eps 1e-4")


def test_trl_rloo_normalize_leaves_a_lone_scorable_completion_out():
    """TRL's RLOO with normalize_advantages: a prompt with one scorable completion has no
    leave-one-out baseline (NaN, then 0) and takes no part in the whitening. test_trl_rloo's
    unscorable batches hold an infinite reward, which makes TRL's whitening NaN everywhere, so
    that case compared zeros with zeros."""
    r = torch.tensor([1.0, 2.0, 4.0, 7.0, float("nan"), 3.0])  # prompt 2: one scorable completion
    adv = torch.tensor([-1.0, 1.0, -3.0, 3.0])  # the others' leave-one-out advantages
    got = trl.rloo_advantages(r, 2, normalize_advantages=True)
    assert_close(got[:4], (adv - adv.mean()) / (adv.std() + 1e-4), rtol=1e-6, atol=1e-6, name="rloo")
    assert got[4] == 0 and got[5] == 0
