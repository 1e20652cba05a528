"""The framework drop-ins (rmkernels.integrations: verl, OpenRLHF, TRL) called as the
frameworks call them on a GPU: every tensor input on the stand-in GPU of tests/fake_cuda.py
(verl's uid column stays a numpy array), rmkernels' reference backend in place of its
kernels. Each output must be on the GPU and equal the same call's output on the CPU (whose
values the drop-in tests check against the frameworks' formulas)."""
import types

import fake_cuda
import pytest
import torch
from test_group_adv_dropins import _batch
from utils import assert_close

from rmkernels.integrations import openrlhf, trl_ppo, verl, verl_linear_ce
from rmkernels.integrations import openrlhf_critic_free as orl
from rmkernels.integrations import trl_critic_free as trl


def _ppo_batch(B=9, T=15):
    lp = -torch.rand(B, T) * 3
    ref = lp + torch.randn(B, T) * 0.3
    mask = torch.arange(T).expand(B, T) < torch.randint(1, T + 1, (B,))[:, None]
    mask[1] = False
    return lp, ref, torch.randn(B, T), torch.randn(B), mask


def _cases():
    out = {}
    for name in ("compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage",
                 "compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage",
                 "compute_opo_outcome_advantage", "compute_gpg_outcome_advantage",
                 "compute_reinforce_plus_plus_baseline_outcome_advantage"):
        out[f"verl.{name}"] = lambda name=name: ((lambda t, m, i: getattr(verl, name)(t, m, i)), _batch())
    out["verl.dr_grpo"] = lambda: ((lambda t, m, i: verl.compute_grpo_outcome_advantage(
        t, m, i, norm_adv_by_std_in_grpo=False)), _batch())
    out["verl.compute_reinforce_plus_plus_outcome_advantage"] = lambda: ((
        lambda t, m: verl.compute_reinforce_plus_plus_outcome_advantage(
            t, m, config=types.SimpleNamespace(gamma=0.97))), _batch()[:2])
    out["verl.compute_remax_outcome_advantage"] = lambda: (
        verl.compute_remax_outcome_advantage, (_batch()[0], torch.randn(83), _batch()[1].bool()))
    out["verl.compute_gae_advantage_return"] = lambda: (
        (lambda r, v, m: verl.compute_gae_advantage_return(r, v, m, 0.99, 0.95)), _ppo_batch()[1:3] + (
            _ppo_batch()[4].float(),))
    for kl in ("k1", "k2", "k3", "k3+"):
        out[f"verl.kl_penalty[{kl}]"] = lambda kl=kl: ((lambda a, b: verl.kl_penalty(a, b, kl)), _ppo_batch()[:2])
    out["openrlhf.compute_approx_kl"] = lambda: ((lambda a, b, m: openrlhf.compute_approx_kl(
        a, b, kl_estimator="k3", action_mask=m)), (*_ppo_batch()[:2], _ppo_batch()[4]))
    out["openrlhf.compute_reward"] = lambda: ((lambda r, kl, m: openrlhf.compute_reward(
        r, 0.05, kl, action_mask=m, reward_clip_range=(-1.0, 1.0))), (torch.randn(9), *_ppo_batch()[:1],
                                                                      _ppo_batch()[4]))
    out["openrlhf.get_advantages_and_returns"] = lambda: ((lambda v, r, m: openrlhf.get_advantages_and_returns(
        v, r, m, 0.99, 0.95)), (*_ppo_batch()[1:3], _ppo_batch()[4]))
    out["openrlhf.normalize_advantages"] = lambda: (openrlhf.normalize_advantages, (_ppo_batch()[2], _ppo_batch()[4]))
    for mode in ("rloo", "reinforce_baseline", "dr_grpo", "group_norm", "flash_reinforce"):
        out[f"openrlhf.shape_rewards[{mode}]"] = lambda mode=mode: ((lambda r: orl.shape_rewards(r, 4, mode)),
                                                                    (torch.randn(28),))
    for scale in ("group", "batch", "none"):
        out[f"trl.grpo_advantages[{scale}]"] = lambda scale=scale: ((lambda r: trl.grpo_advantages(r, 4, scale)),
                                                                    (torch.randn(28),))
    out["trl.rloo_advantages"] = lambda: ((lambda r: trl.rloo_advantages(r, 4, True)), (torch.randn(28),))
    out["trl.grpo_advantages_normalize_then_sum"] = lambda: (
        (lambda r: trl.grpo_advantages_normalize_then_sum(r, 4, [1.0, 0.5])), (torch.randn(28, 2),))
    out["trl_ppo.masked_whiten"] = lambda: (trl_ppo.masked_whiten, (_ppo_batch()[2], _ppo_batch()[4]))
    out["trl_ppo.compute_rewards_and_advantages"] = lambda: ((
        lambda lp, ref, v, s, n: trl_ppo.compute_rewards_and_advantages(lp, ref, v, s, n, kl_coef=0.07,
                                                                      kl_estimator="k3", whiten_rewards=True)),
        (*_ppo_batch()[:4], torch.randint(-1, 15, (9,))))
    out["verl_linear_ce.linear_cross_entropy"] = lambda: ((lambda h, w, y: verl_linear_ce.linear_cross_entropy(
        h, w, y, temperature=0.7)), (torch.randn(2, 5, 16), torch.randn(33, 16), torch.randint(0, 33, (2, 5))))
    return out


CASES = _cases()


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "_fields") or hasattr(out, "__dataclass_fields__"):
        return _tensors(tuple(vars(out).values()) if hasattr(out, "__dict__") else tuple(out))
    return []


@pytest.mark.parametrize("name", sorted(CASES))
def test_dropin_on_a_gpu(name):
    fn, args = CASES[name]()
    want = _tensors(fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args]))
    assert want, f"{name}: no tensor output"
    with fake_cuda.gpu():
        got = _tensors(fn(*[a.to("cuda") if isinstance(a, torch.Tensor) else a for a in args]))
        assert [t.device.type for t in got] == ["cuda"] * len(want), f"{name}: outputs on {[t.device for t in got]}"
        got = [t.cpu() for t in got]
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, rtol=1e-5, atol=1e-5, name=f"{name} output {i}")

