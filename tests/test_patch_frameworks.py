"""patch_verl / unpatch_verl (rmkernels.integrations.verl) and patch_openrlhf / unpatch_openrlhf
(rmkernels.integrations.openrlhf) on stand-in framework modules, and get_cumulative_returns against
OpenRLHF's published loop.

verl is not installed in CI; the stand-in has what patch_verl touches in verl 0.9.1's
``verl.trainer.ppo.core_algos``: the estimator functions (module attributes), the
``ADV_ESTIMATOR_REGISTRY`` that ``register_adv_est`` fills with them, ``get_adv_estimator_fn`` and
``kl_penalty``; its functions raise if called, so a call that still reaches verl fails the test.
``compute_advantage`` below dispatches as ``verl.trainer.ppo.ray_trainer.compute_advantage`` does
(GAE and GRPO through the module attribute, the others through the registry). The real
ray_trainer ran with and without the patch outside CI (scripts/compare_patch_verl.py,
benchmarks/results/patch-verl-comparison.txt); OpenRLHF's experience maker likewise
(scripts/compare_patch_openrlhf.py, benchmarks/results/patch-openrlhf-comparison.txt)."""
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from test_group_advantages import make_groups
from utils import make_mask

from rmkernels.integrations import openrlhf as ro
from rmkernels.integrations import verl as rv

VERL_ONLY = ("compute_gdpo_outcome_advantage", "compute_grpo_passk_outcome_advantage")


def _never(name):
    def fn(*args, **kwargs):
        raise AssertionError(f"verl's {name} was called")
    fn.__name__ = name
    return fn


@pytest.fixture
def verl(monkeypatch):
    """A stand-in verl 0.9.1 in sys.modules (removed after the test, the patch undone)."""
    pkg = types.ModuleType("verl")
    pkg.__version__ = "0.9.1"
    pkg.__path__ = []
    core = types.ModuleType("verl.trainer.ppo.core_algos")
    core.ADV_ESTIMATOR_REGISTRY = {}
    for key, name in [*rv.PATCHED_ESTIMATORS.items(), ("gdpo", VERL_ONLY[0]), ("grpo_passk", VERL_ONLY[1])]:
        setattr(core, name, _never(name))
        core.ADV_ESTIMATOR_REGISTRY[key] = getattr(core, name)
    core.kl_penalty = _never("kl_penalty")
    core.get_adv_estimator_fn = lambda key: core.ADV_ESTIMATOR_REGISTRY[key]
    trainer = types.ModuleType("verl.trainer")
    trainer.__path__ = []
    ppo = types.ModuleType("verl.trainer.ppo")
    ppo.__path__ = []
    ppo.core_algos = core
    trainer.ppo = ppo
    pkg.trainer = trainer
    for name, mod in (("verl", pkg), ("verl.trainer", trainer), ("verl.trainer.ppo", ppo),
                      ("verl.trainer.ppo.core_algos", core)):
        monkeypatch.setitem(sys.modules, name, mod)
    yield pkg
    rv.unpatch_verl()


def compute_advantage(core, data, est, gamma=1.0, lam=1.0, config=None):
    """verl 0.9.1 ray_trainer.compute_advantage's dispatch."""
    b = data["batch"]
    if est == "gae":
        return core.compute_gae_advantage_return(token_level_rewards=b["token_level_rewards"], values=b["values"],
                                                 response_mask=b["response_mask"], gamma=gamma, lam=lam)
    if est == "grpo":
        return core.compute_grpo_outcome_advantage(token_level_rewards=b["token_level_rewards"],
                                                   response_mask=b["response_mask"], index=data["uid"],
                                                   norm_adv_by_std_in_grpo=True)
    kwargs = {"token_level_rewards": b["token_level_rewards"], "response_mask": b["response_mask"], "config": config,
              "index": data["uid"]}
    if "reward_baselines" in b:
        kwargs["reward_baselines"] = b["reward_baselines"]
    return core.get_adv_estimator_fn(est)(**kwargs)


def _data(est, B=37, T=11):
    ids = make_groups(B)
    mask = make_mask("holes", B, T).float()
    mask[:, 0] = 1
    b = {"token_level_rewards": torch.randn(B, T) * mask, "response_mask": mask, "values": torch.randn(B, T)}
    if est == "remax":
        b["reward_baselines"] = torch.randn(B)
    return {"batch": b, "uid": np.array([f"uid-{int(i)}" for i in ids], dtype=object)}


def _direct(est, data, gamma, lam, config):
    """The drop-in called directly, as the patched verl should call it."""
    b = data["batch"]
    fn = getattr(rv, rv.PATCHED_ESTIMATORS[est])
    if est == "gae":
        return fn(b["token_level_rewards"], b["values"], b["response_mask"], gamma, lam)
    if est == "reinforce_plus_plus":
        return fn(b["token_level_rewards"], b["response_mask"], config=config)
    if est == "remax":
        return fn(b["token_level_rewards"], b["reward_baselines"], b["response_mask"])
    return fn(b["token_level_rewards"], b["response_mask"], data["uid"])


@pytest.mark.parametrize("est", list(rv.PATCHED_ESTIMATORS))
def test_verl_dispatch_reaches_the_dropin(verl, est):
    core = verl.trainer.ppo.core_algos
    data = _data(est)
    config = {"gamma": 0.95}
    with pytest.raises(AssertionError, match="was called"):
        compute_advantage(core, data, est, 0.95, 0.9, config)  # unpatched: the stand-in's function
    assert rv.patch_verl() == list(rv.PATCHED_ESTIMATORS)
    adv, ret = compute_advantage(core, data, est, 0.95, 0.9, config)
    want_adv, want_ret = _direct(est, data, 0.95, 0.9, config)
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=0)
    torch.testing.assert_close(ret, want_ret, rtol=0, atol=0)
    assert adv.shape == data["batch"]["response_mask"].shape


def test_patch_replaces_only_its_names_and_unpatch_restores(verl):
    core = verl.trainer.ppo.core_algos
    before = dict(core.ADV_ESTIMATOR_REGISTRY)
    attrs = {name: getattr(core, name) for name in [*rv.PATCHED_ESTIMATORS.values(), *VERL_ONLY, "kl_penalty"]}
    rv.patch_verl()
    for key, name in rv.PATCHED_ESTIMATORS.items():
        assert getattr(core, name) is getattr(rv, name)
        assert core.ADV_ESTIMATOR_REGISTRY[key] is getattr(rv, name)
    assert core.kl_penalty is rv.kl_penalty
    for key, name in (("gdpo", VERL_ONLY[0]), ("grpo_passk", VERL_ONLY[1])):
        assert core.ADV_ESTIMATOR_REGISTRY[key] is before[key] and getattr(core, name) is attrs[name]
    assert rv.patch_verl() == list(rv.PATCHED_ESTIMATORS)  # twice: a no-op
    rv.unpatch_verl()
    assert core.ADV_ESTIMATOR_REGISTRY == before
    assert all(core.ADV_ESTIMATOR_REGISTRY[k] is v for k, v in before.items())
    assert all(getattr(core, name) is fn for name, fn in attrs.items())
    rv.unpatch_verl()  # not patched: a no-op
    assert all(getattr(core, name) is fn for name, fn in attrs.items())


def test_a_users_registry_override_is_left_alone(verl):
    core = verl.trainer.ppo.core_algos

    def mine(**kwargs):
        return "mine"

    core.ADV_ESTIMATOR_REGISTRY["rloo"] = mine
    served = rv.patch_verl()
    assert "rloo" not in served and core.ADV_ESTIMATOR_REGISTRY["rloo"] is mine
    assert core.get_adv_estimator_fn("grpo_vectorized") is rv.compute_grpo_vectorized_outcome_advantage
    core.ADV_ESTIMATOR_REGISTRY["opo"] = mine  # changed after the patch: unpatch keeps it
    rv.unpatch_verl()
    assert core.ADV_ESTIMATOR_REGISTRY["opo"] is mine and core.ADV_ESTIMATOR_REGISTRY["rloo"] is mine
    assert core.ADV_ESTIMATOR_REGISTRY["grpo"] is core.compute_grpo_outcome_advantage
    assert core.compute_grpo_outcome_advantage.__name__ == "compute_grpo_outcome_advantage"
    assert core.compute_grpo_outcome_advantage is not rv.compute_grpo_outcome_advantage


def test_another_verl_version_warns(verl):
    verl.__version__ = "0.10.0"
    with pytest.warns(UserWarning, match="verl 0.9.1; this is verl 0.10.0"):
        rv.patch_verl()
    rv.unpatch_verl()
    verl.__version__ = "0.9.3"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rv.patch_verl()


def test_without_verl_the_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)  # import verl raises ImportError
    monkeypatch.delitem(sys.modules, "verl.trainer.ppo", raising=False)
    with pytest.raises(ImportError, match=r"pip install verl==0\.9\.1"):
        rv.patch_verl()


# --- OpenRLHF ------------------------------------------------------------------------------

def openrlhf_cumulative_returns(rewards, action_mask, gamma):
    """OpenRLHF 0.11.2 RemoteExperienceMaker.get_cumulative_returns, as published."""
    response_length = rewards.size(1)
    returns = torch.zeros_like(rewards)
    cumulative_return = torch.zeros(rewards.size(0), device=rewards.device)
    if action_mask is not None:
        rewards = action_mask * rewards
    for t in reversed(range(response_length)):
        cumulative_return = rewards[:, t] + gamma * cumulative_return
        returns[:, t] = cumulative_return
    return returns


@pytest.mark.parametrize("kind", ["holes", "right", "left", "mixed", "full"])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_get_cumulative_returns_is_openrlhfs(kind, gamma):
    for B, T in ((13, 17), (1, 1), (6, 40)):
        mask = make_mask(kind, B, T).float()
        rewards = torch.randn(B, T)
        got = ro.get_cumulative_returns(rewards, mask, gamma)
        want = openrlhf_cumulative_returns(rewards, mask, gamma)
        assert got.dtype == torch.float32 and got.shape == (B, T)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)  # every position, holes included
        got64 = ro.get_cumulative_returns(rewards.double(), mask.double(), gamma)
        want64 = openrlhf_cumulative_returns(rewards.double(), mask.double(), gamma)
        assert got64.dtype == torch.float64
        torch.testing.assert_close(got64, want64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ro.get_cumulative_returns(rewards, None, gamma),
                               openrlhf_cumulative_returns(rewards, None, gamma), rtol=2e-6, atol=2e-6)


def test_get_cumulative_returns_checks_its_arguments():
    with pytest.raises(ValueError, match="rewards"):
        ro.get_cumulative_returns(torch.randn(5), None, 1.0)
    with pytest.raises(ValueError, match="action_mask"):
        ro.get_cumulative_returns(torch.randn(2, 5), torch.ones(2, 4), 1.0)
    with pytest.raises(ValueError, match="gamma"):
        ro.get_cumulative_returns(torch.randn(2, 5), torch.ones(2, 5), -1.0)


@pytest.fixture
def openrlhf(monkeypatch):
    """A stand-in openrlhf.trainer.ppo_utils.experience_maker: the module attributes and the
    RemoteExperienceMaker methods patch_openrlhf replaces, each raising if called."""
    mod_name = "openrlhf.trainer.ppo_utils.experience_maker"
    em = types.ModuleType(mod_name)
    for name in ("compute_approx_kl", "compute_reward"):
        fn = _never(name)
        fn.__module__ = "openrlhf.models.utils"
        setattr(em, name, fn)

    def method(name):
        def m(self, *args, **kwargs):
            raise AssertionError(f"OpenRLHF's {name} was called")
        m.__name__, m.__module__ = name, mod_name
        return m

    em.RemoteExperienceMaker = type("RemoteExperienceMaker", (), {
        "__module__": mod_name, "get_advantages_and_returns": method("get_advantages_and_returns"),
        "get_cumulative_returns": method("get_cumulative_returns"), "other": method("other")})
    parents = {}
    for name in ("openrlhf", "openrlhf.trainer", "openrlhf.trainer.ppo_utils"):
        parents[name] = types.ModuleType(name)
        parents[name].__path__ = []
        monkeypatch.setitem(sys.modules, name, parents[name])
    parents["openrlhf.trainer.ppo_utils"].experience_maker = em
    monkeypatch.setitem(sys.modules, mod_name, em)
    yield em
    ro.unpatch_openrlhf()


def test_patch_openrlhf_serves_the_experience_maker(openrlhf):
    em = openrlhf
    cls = em.RemoteExperienceMaker
    before = {k: cls.__dict__[k] for k in ("get_advantages_and_returns", "get_cumulative_returns", "other")}
    funcs = {k: getattr(em, k) for k in ("compute_approx_kl", "compute_reward")}
    maker = cls()
    B, T = 9, 12
    mask = make_mask("holes", B, T).float()
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    with pytest.raises(AssertionError, match="was called"):
        maker.get_cumulative_returns(rewards, mask, 0.9)
    served = ro.patch_openrlhf()
    assert served == ["compute_approx_kl", "compute_reward", "get_advantages_and_returns", "get_cumulative_returns"]
    assert em.compute_approx_kl is ro.compute_approx_kl and em.compute_reward is ro.compute_reward
    got = maker.get_cumulative_returns(rewards, mask, 0.9)  # the experience maker's call
    torch.testing.assert_close(got, openrlhf_cumulative_returns(rewards, mask, 0.9), rtol=2e-6, atol=2e-6)
    adv, ret = maker.get_advantages_and_returns(values, rewards, mask, 0.99, 0.95)
    want_adv, want_ret = ro.get_advantages_and_returns(values, rewards, mask, 0.99, 0.95)
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=0)
    torch.testing.assert_close(ret, want_ret, rtol=0, atol=0)
    leaf = rewards.clone().requires_grad_(True)
    assert not maker.get_cumulative_returns(leaf, mask, 1.0).requires_grad  # no grad, as OpenRLHF's method
    with pytest.raises(AssertionError, match="other was called"):
        maker.other()  # untouched
    assert ro.patch_openrlhf() == served  # twice: a no-op
    ro.unpatch_openrlhf()
    assert all(cls.__dict__[k] is v for k, v in before.items())
    assert all(getattr(em, k) is v for k, v in funcs.items())
    ro.unpatch_openrlhf()  # not patched: a no-op


def test_patch_openrlhf_leaves_someone_elses_replacement(openrlhf):
    em = openrlhf

    def mine(self, *args):
        return "mine"

    em.RemoteExperienceMaker.get_cumulative_returns = mine
    served = ro.patch_openrlhf()
    assert "get_cumulative_returns" not in served
    assert em.RemoteExperienceMaker.__dict__["get_cumulative_returns"] is mine
    ro.unpatch_openrlhf()
    assert em.RemoteExperienceMaker.__dict__["get_cumulative_returns"] is mine


def test_without_openrlhf_the_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openrlhf", None)
    with pytest.raises(ImportError, match=r"pip install openrlhf==0\.11\.2"):
        ro.patch_openrlhf()


def test_the_trl_integration_without_trl_names_the_install(monkeypatch):
    """``import rmkernels.integrations.trl`` without TRL: an ImportError with the install line (it
    was a bare "No module named 'trl'"), as patch_verl / patch_openrlhf give."""
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    monkeypatch.delitem(sys.modules, "rmkernels.integrations.trl", raising=False)
    with pytest.raises(ImportError, match=r"rmkernels.integrations.trl needs TRL \(.*\): pip install trl \(tested "
                                          r"with trl 1.16.0"):
        importlib.import_module("rmkernels.integrations.trl")
