"""The verl / OpenRLHF / TRL-PPO adapters against the frameworks' published formulas.

The frameworks are not installed in CI (verl and OpenRLHF pull ray, deepspeed, vllm, ...;
TRL 1.x no longer ships its PPO trainer), so each framework's semantics is written below as a
plain per-element reference (float64, as the frameworks' own code reads), from the source of
the versions the adapters were compared against, function by function, with the real
packages installed (pip, outside the repository):

- verl 0.9.1 ``trainer/ppo/core_algos.py``: ``compute_gae_advantage_return``,
  ``kl_penalty`` / ``kl_penalty_forward``, the KL controllers,
  ``utils/torch_functional.masked_whiten``;
- OpenRLHF 0.11.2 ``models/utils.py`` (``compute_approx_kl`` with its clamps,
  ``compute_reward``) and ``trainer/ppo_utils/experience_maker.py`` (GAE, normalisation);
- TRL ``trainer/ppo_trainer.py`` (0.12 - 0.2x), steps 3-6 of ``train``.

Inputs are random, with masks that have holes, left and right padding and empty rows.
"""
import math

import pytest
import torch
from utils import assert_close

import rmkernels as rmk
from rmkernels.integrations import openrlhf, trl_ppo, verl

RTOL = ATOL = 2e-5
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the adapters on the cuda backend)")])]


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def ragged_mask(B, T, *, holes=True, empty_rows=True, left_pad=False):
    """Right-padded responses of random lengths, optionally with holes inside (multi-turn
    observation tokens), left padding, and some rows with no valid token."""
    lengths = torch.randint(1, T + 1, (B,))
    mask = torch.arange(T).expand(B, T) < lengths[:, None]
    if left_pad:
        start = torch.randint(0, T, (B,))
        mask = mask & (torch.arange(T).expand(B, T) >= start[:, None])
    if holes:
        mask = mask & (torch.rand(B, T) > 0.25)
    if empty_rows and B >= 3:
        mask[1] = False
    if int(mask.sum()) < 2 and T >= 2:
        # at most one valid token in the batch is the degenerate case (whitening's variance
        # 0 / 0: verl raises, the fused op gives zeros), which has tests of its own; left
        # padding with holes drew it in 144 of 20,000 seeds of a [9, 31] batch
        mask[0, -2:] = True
    return mask


def batch(B=7, T=23, **mask_kw):
    lp = -torch.rand(B, T, dtype=torch.float64) * 3
    ref = lp + torch.randn(B, T, dtype=torch.float64) * 0.3
    values = torch.randn(B, T, dtype=torch.float64)
    scores = torch.randn(B, dtype=torch.float64) * 2
    return lp, ref, values, scores, ragged_mask(B, T, **mask_kw)


def f32(*ts, device="cpu"):
    return [t.float().to(device) for t in ts]


# ---------------------------------------------------------------------------------------
# Reference formulas (float64, one element at a time)
# ---------------------------------------------------------------------------------------
def ref_masked_whiten(x, mask, *, unbiased, shift_mean=True, eps=1e-8):
    """TRL / verl masked_whiten: masked mean and variance (Bessel-corrected if unbiased),
    (x - mean) * rsqrt(var + eps) applied to every element."""
    m = mask.double()
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    if unbiased:
        var = var * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out + mean if not shift_mean else out


def ref_verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl: walk each row from the right; at a masked token the carried next value and
    advantage stay those of the next valid token. Whitened over the valid tokens."""
    B, T = values.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(T)):
            delta = token_level_rewards[b, t] + gamma * next_v - values[b, t]
            a = delta + gamma * lam * next_a
            if response_mask[b, t]:
                next_v, next_a = float(values[b, t]), float(a)
            adv[b, t] = next_a
    returns = adv + values
    return ref_masked_whiten(adv, response_mask, unbiased=True), returns


def ref_verl_kl(lp, ref, name):
    base = name[:-1] if name.endswith("+") else name
    if base in ("kl", "k1"):
        return lp - ref
    if base == "abs":
        return (lp - ref).abs()
    if base in ("mse", "k2"):
        return 0.5 * (lp - ref) ** 2
    kl = (ref - lp).clamp(-20, 20)
    return (kl.exp() - kl - 1).clamp(-10, 10)


def ref_verl_kl_penalty(lp, ref, name):
    """verl's kl_penalty with autograd: a "+" form (but k2's) takes k2's gradient."""
    fwd = ref_verl_kl(lp, ref, name)
    if not name.endswith("+") or name in ("mse+", "k2+"):
        return fwd
    k2 = 0.5 * (lp - ref) ** 2
    return k2 - k2.detach() + fwd.detach()


def ref_openrlhf_kl(lp, base, est, mask=None, *, old=None, unbiased_gradient=False):
    """OpenRLHF 0.11.2 compute_approx_kl: k3's log-ratio clamped at -10, every estimate to
    [-10, 10]; unbiased_gradient: the value, the gradient of w * x^2 / 2 (w = exp(lp - old)
    clamped at 10, detached)."""
    x = lp.double() - base.double()
    if mask is not None:
        x = x * mask
    if est == "k1":
        v = x
    elif est == "k2":
        v = x * x / 2
    else:
        xc = x.clamp(min=-10)
        v = (-xc).exp() - 1 + xc
    v = v.clamp(-10, 10)
    if not unbiased_gradient:
        return v
    w = 1.0 if old is None else (lp.double() - old.double()).exp().clamp(max=10).detach()
    s = w * (x * x / 2)
    return v.detach() + s - s.detach()


def ref_openrlhf_reward(r, kl_coef, kl, mask, clip=None):
    kl_coef = max(kl_coef, 0.0)
    if clip:
        r = r.clamp(clip[0], clip[1])
    out = -kl_coef * kl.double()
    B, T = kl.shape
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        out[b, idx[-1] if idx else T - 1] += r[b]  # argmax of an all-zero row is 0 -> the last column
    return out


def _plain_gae(rewards, values, gamma, lam):
    """The published GAE loop over every position (no mask): (advantages, returns), fp64."""
    B, T = values.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    last = torch.zeros(B, dtype=torch.float64)
    for t in reversed(range(T)):
        nv = values[:, t + 1] if t < T - 1 else torch.zeros(B, dtype=torch.float64)
        last = rewards[:, t] + gamma * nv - values[:, t] + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values


def ref_openrlhf_gae(values, rewards, mask, gamma, lambd):
    """OpenRLHF: values and rewards multiplied by the mask, then plain GAE over every position."""
    if mask is not None:
        values, rewards = values * mask, rewards * mask
    return _plain_gae(rewards, values, gamma, lambd)


def ref_openrlhf_normalize(advs, masks, std_norm=True):
    a = torch.cat([x.reshape(-1).double() for x in advs])
    m = torch.cat([x.reshape(-1).double() for x in masks])
    n = m.sum()
    mean = (a * m).sum() / n
    rstd = ((((a - mean) ** 2) * m).sum() / n).clamp(min=1e-8).rsqrt() if std_norm else 1.0
    return [(x.double() - mean) * rstd for x in advs]


def ref_trl(lp, ref, values, scores, seq_len, kl_coef, est, gamma, lam, whiten_rewards):
    """TRL PPOTrainer.train, steps 3-6."""
    B, T = lp.shape
    idx = torch.arange(T).expand(B, T)
    pad = idx > seq_len[:, None]
    pad1 = idx > (seq_len + 1)[:, None]
    lp = lp.masked_fill(pad, 1.0)
    ref = ref.masked_fill(pad, 1.0)
    values = values.masked_fill(pad1, 0)
    logr = ref - lp
    kl = -logr if est == "k1" else (logr.exp() - 1) - logr
    rewards = -kl_coef * kl
    for b in range(B):
        end = int(seq_len[b]) + 1 if int(seq_len[b]) + 1 < T else int(seq_len[b])
        rewards[b, end] += scores[b]
    if whiten_rewards:
        rewards = ref_masked_whiten(rewards, ~pad1, unbiased=True, shift_mean=False).masked_fill(pad1, 0)
    adv, returns = _plain_gae(rewards, values, gamma, lam)
    adv = ref_masked_whiten(adv, ~pad, unbiased=True).masked_fill(pad, 0)
    return adv, returns, rewards, kl


def at(t, mask):
    return torch.where(mask.bool(), t.double(), torch.zeros((), dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# verl
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_verl_gae_matches(gamma, lam, left_pad, device):
    lp, ref, values, scores, mask = batch(9, 31, left_pad=left_pad)
    rewards = torch.randn_like(values)
    adv, ret = verl.compute_gae_advantage_return(*f32(rewards, values, mask, device=device), gamma, lam)
    assert adv.device.type == device
    e_adv, e_ret = ref_verl_gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    assert_close(adv, at(e_adv, mask), rtol=RTOL, atol=ATOL, name="advantages")
    assert_close(ret, at(e_ret, mask), rtol=RTOL, atol=ATOL, name="returns")


def test_verl_gae_tensor_gamma_and_degenerate_batches():
    lp, ref, values, scores, mask = batch(4, 9)
    r = torch.randn_like(values)
    a1, _ = verl.compute_gae_advantage_return(*f32(r, values), mask, torch.tensor(0.9), torch.tensor(0.8))
    a2, _ = verl.compute_gae_advantage_return(*f32(r, values), mask, float(torch.tensor(0.9)), float(torch.tensor(0.8)))
    assert torch.equal(a1, a2)
    one = torch.zeros(4, 9, dtype=torch.bool)
    one[2, 3] = True  # a single valid token: verl raises, the fused op gives zeros (documented)
    for m in (one, torch.zeros(4, 9, dtype=torch.bool)):
        adv, ret = verl.compute_gae_advantage_return(*f32(r, values), m, 1.0, 0.95)
        assert torch.equal(adv, torch.zeros_like(adv))
        assert torch.isfinite(ret).all()
    with pytest.raises(ValueError, match="values"):
        verl.compute_gae_advantage_return(r.float(), values[:, :5].float(), mask, 1.0, 0.95)
    # NaN / inf rewards and values at masked positions are never read (verl's whitening sums them)
    holes = mask.clone()
    holes[:, 4] = False
    r2, v2 = r.clone(), values.clone()
    r2[:, 4], v2[:, 4] = math.nan, math.inf
    a_bad, ret_bad = verl.compute_gae_advantage_return(*f32(r2, v2), holes, 0.95, 0.9)
    a_ok, ret_ok = verl.compute_gae_advantage_return(*f32(r, values), holes, 0.95, 0.9)
    assert torch.equal(a_bad, a_ok) and torch.equal(ret_bad, ret_ok)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", verl.KL_PENALTIES)
def test_verl_kl_penalty_values_and_gradients(name, device):
    B, T = 5, 17
    lp = (-torch.rand(B, T, dtype=torch.float64) * 4)
    ref = lp + torch.randn(B, T, dtype=torch.float64) * 2
    ref[0, :3] = lp[0, :3] + torch.tensor([25.0, -25.0, 13.0], dtype=torch.float64)  # the clamps of k3
    lp32, ref32 = lp.float().to(device).requires_grad_(), ref.float().to(device).requires_grad_()
    lp64, ref64 = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    out = verl.kl_penalty(lp32, ref32, name)
    exp = ref_verl_kl_penalty(lp64, ref64, name)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    assert_close(out, exp, rtol=RTOL, atol=ATOL, name=f"{name} value")
    w = torch.randn(B, T, dtype=torch.float64)
    (out * w.float().to(device)).sum().backward()
    (exp * w).sum().backward()
    assert_close(lp32.grad, lp64.grad, rtol=1e-4, atol=1e-4, name=f"{name} d/dlogprob")
    assert_close(ref32.grad, ref64.grad, rtol=1e-4, atol=1e-4, name=f"{name} d/dref")
    with torch.no_grad():
        assert_close(verl.kl_penalty(lp.float().to(device), ref.float().to(device), name), exp.detach(),
                     rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["kl", "low_var_kl", "k3+", "mse"])
def test_verl_kl_penalty_compiles_fullgraph(name):
    """verl's kl_penalty compiles with fullgraph=True, so the drop-in must too: the output dtype
    is computed with promote_types (torch.result_type broke the graph). Values and gradients equal
    eager."""
    lp = (-torch.rand(4, 9) * 3).requires_grad_()
    ref = (lp.detach() + torch.randn(4, 9)).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: verl.kl_penalty(a, b, name), fullgraph=True, backend="aot_eager")
    out = compiled(lp, ref)
    g = torch.autograd.grad(out.sum(), (lp, ref))
    exp = verl.kl_penalty(lp, ref, name)
    g_exp = torch.autograd.grad(exp.sum(), (lp, ref))
    assert_close(out, exp, rtol=0, atol=0)
    for got, want in zip(g, g_exp):
        assert_close(got, want, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert_close(compiled(lp, ref), exp, rtol=0, atol=0)


def test_result_dtype_is_torch_result_type():
    from rmkernels.integrations._rl import result_dtype

    dtypes = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
              torch.float64, torch.complex64, torch.complex128]
    for da in dtypes:
        for db in dtypes:
            for sa in ((), (3,)):
                for sb in ((), (3,)):
                    a, b = torch.zeros(sa, dtype=da), torch.zeros(sb, dtype=db)
                    assert result_dtype(a, b) == torch.result_type(a, b), (da, db, sa, sb)


def test_verl_kl_penalty_straight_through_differs_from_plain_k3():
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0, -0.5]])
    plain = verl.kl_penalty(lp, ref, "k3")
    (g_plain,) = torch.autograd.grad(plain.sum(), lp)
    st = verl.kl_penalty(lp, ref, "k3+")
    (g_st,) = torch.autograd.grad(st.sum(), lp)
    assert torch.allclose(plain, st)
    assert torch.allclose(g_st, (lp - ref).detach())  # k2's gradient
    assert not torch.allclose(g_plain, g_st)


def test_verl_kl_penalty_shapes_dtypes_errors():
    lp = -torch.rand(3, 4, 5)
    ref = -torch.rand(3, 4, 5)
    assert_close(verl.kl_penalty(lp, ref, "low_var_kl"), ref_verl_kl(lp.double(), ref.double(), "k3"),
                 rtol=RTOL, atol=ATOL)
    out = verl.kl_penalty(lp.bfloat16(), ref.bfloat16(), "k1")
    assert out.dtype == torch.bfloat16
    assert_close(verl.kl_penalty_forward(lp, ref, "k2"), ref_verl_kl(lp.double(), ref.double(), "k2"),
                 rtol=RTOL, atol=ATOL)
    with pytest.raises(NotImplementedError, match="kl_penalty='k3\\+'"):  # verl's kl_penalty_forward raises too
        verl.kl_penalty_forward(lp, ref, "k3+")
    with pytest.raises(NotImplementedError):
        verl.kl_penalty(lp, ref, "full")
    with pytest.raises(NotImplementedError, match="k4"):
        verl.kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="ref_logprob"):
        verl.kl_penalty(lp, ref[:, :2], "k1")


def test_verl_kl_controllers():
    from types import SimpleNamespace

    ctl = verl.get_kl_controller(SimpleNamespace(type="adaptive", kl_coef=0.2, target_kl=6.0, horizon=10000))
    value = 0.2
    for kl, n in [(12.0, 256), (1.0, 512), (6.3, 64), (100.0, 10000)]:
        ctl.update(kl, n)
        value *= 1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * n / 10000  # Ziegler et al. 2019
        assert ctl.value == pytest.approx(value, rel=1e-12)
    fixed = verl.get_kl_controller(SimpleNamespace(type="fixed", kl_coef=0.05))
    fixed.update(50.0, 100)
    fixed.update(None, None)  # verl's update takes anything and does nothing
    assert fixed.value == 0.05
    with pytest.raises(NotImplementedError):
        verl.get_kl_controller(SimpleNamespace(type="pid", kl_coef=0.05))


def test_verl_kl_controller_settings_and_nan():
    """The settings verl 0.9.1 accepts (negative coefficients and targets, numpy scalars, a
    fractional horizon), its refusals (horizon <= 0 in the factory), and a NaN KL that must not
    poison the coefficient (verl's would be NaN for the rest of the run)."""
    from types import SimpleNamespace

    import numpy as np

    def verl_update(value, target, horizon, kl, n):  # verl: np.clip(kl / target - 1, -.2, .2)
        return value * (1 + min(max(kl / target - 1, -0.2), 0.2) * n / horizon)

    for coef, target, horizon in [(-0.1, 6.0, 100), (0.2, -6.0, 100), (0.2, 6.0, 0.5), (0, 6, 1),
                                  (np.float32(0.05), np.float64(3.0), np.int64(500))]:
        ctl = verl.get_kl_controller(SimpleNamespace(type="adaptive", kl_coef=coef, target_kl=target, horizon=horizon))
        value = float(coef)
        for kl, n in [(12.0, 256), (1.0, 512), (np.float64(6.3), np.int64(64))]:
            ctl.update(kl, n)
            value = verl_update(value, float(target), float(horizon), float(kl), float(n))
            assert ctl.value == pytest.approx(value, rel=1e-12)
        with pytest.warns(RuntimeWarning, match="NaN"):
            ctl.update(float("nan"), 64)
        assert ctl.value == pytest.approx(value, rel=1e-12)
        ctl.update(float("inf"), 10)  # an infinite KL is a reading: the error clips at +0.2
        assert ctl.value == pytest.approx(value * (1 + (0.2 if target > 0 else -0.2) * 10 / float(horizon)))
    for kl_coef in (-0.05, 0, np.float32(0.05)):
        assert verl.get_kl_controller(SimpleNamespace(type="fixed", kl_coef=kl_coef)).value == float(kl_coef)
    for horizon in (0, -5):
        with pytest.raises(ValueError, match="horizon"):
            verl.get_kl_controller(SimpleNamespace(type="adaptive", kl_coef=0.1, target_kl=6.0, horizon=horizon))
    with pytest.raises(ValueError, match="target_kl"):
        verl.AdaptiveKLController(0.1, 0.0, 100)
    rmk_ctl = rmk.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=100)
    with pytest.warns(RuntimeWarning, match="NaN"):
        assert rmk_ctl.update(float("nan"), 64) == 0.2
    assert rmk_ctl.value == 0.2
    with pytest.raises(ValueError, match="n_steps"):
        rmk_ctl.update(1.0, float("nan"))


def test_verl_accepts_what_verl_accepts():
    """0-d tensors, broadcastable shapes, numpy scalars for gamma/lam (verl 0.9.1 takes them all)."""
    import numpy as np

    lp, ref, values, scores, mask = batch(3, 17)
    r = torch.randn(3, 17, dtype=torch.float64)
    v1 = values[:1]  # [1, 17] values broadcast over the batch
    exp_adv, exp_ret = ref_verl_gae(r, v1.expand(3, 17), mask, 0.9, 0.8)
    for gamma, lam in [(np.float32(0.9), np.float64(0.8)), (torch.tensor(0.9), torch.tensor([0.8])), (0.9, 0.8)]:
        adv, ret = verl.compute_gae_advantage_return(r.float(), v1.float(), mask, gamma, lam)
        assert adv.shape == (3, 17)
        assert_close(adv, at(exp_adv, mask), rtol=1e-4, atol=1e-4, name="advantages")
        assert_close(ret, at(exp_ret, mask), rtol=1e-4, atol=1e-4, name="returns")
    with pytest.raises(TypeError, match="gamma"):
        verl.compute_gae_advantage_return(r.float(), v1.float(), mask, "0.9", 0.8)
    with pytest.raises(ValueError, match="2-D"):
        verl.compute_gae_advantage_return(r[0].float(), values[0].float(), mask[0], 0.9, 0.8)
    for name in verl.KL_PENALTIES:
        a = torch.tensor(-1.5, requires_grad=True)
        out = verl.kl_penalty(a, torch.tensor(-0.25), name)
        exp = ref_verl_kl_penalty(torch.tensor(-1.5, dtype=torch.float64, requires_grad=True),
                                  torch.tensor(-0.25, dtype=torch.float64), name)
        assert out.shape == () and out.item() == pytest.approx(exp.item(), rel=1e-6)
        lp32, ref1 = lp.float().requires_grad_(), ref[:1].float().requires_grad_()
        lp64, ref64 = lp.clone().requires_grad_(), ref[:1].clone().requires_grad_()
        out, exp = verl.kl_penalty(lp32, ref1, name), ref_verl_kl_penalty(lp64, ref64, name)
        assert out.shape == lp.shape
        assert_close(out, exp, rtol=RTOL, atol=ATOL, name=f"{name} broadcast value")
        out.sum().backward()
        exp.sum().backward()
        assert_close(ref1.grad, ref64.grad, rtol=1e-4, atol=1e-4, name=f"{name} broadcast gradient")


@pytest.mark.parametrize("name", verl.KL_PENALTIES)
def test_verl_kl_penalty_on_infinite_inputs(name):
    """log p or log q = -inf: the estimator's value (verl's "+" forms give NaN there, its own
    inf - inf; documented), and verl's gradient (k2's for "+": infinite where x is)."""
    inf = math.inf
    lp = torch.tensor([[-inf, -1.0, -2.0, -inf, -0.5]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -inf, -2.0, -inf, -3.0]], dtype=torch.float64)
    a, e = lp.float().requires_grad_(), lp.clone().requires_grad_()
    out = verl.kl_penalty(a, ref.float(), name)
    value = ref_verl_kl(e, ref, name)  # the estimator (what verl's non-"+" form returns)
    assert torch.equal(out.isnan(), value.isnan())
    finite = ~value.isnan()
    assert_close(out[finite], value[finite].detach(), rtol=1e-6, atol=0, name=f"{name} value")
    grad_src = 0.5 * (e - ref) ** 2 if name.endswith("+") and name not in ("mse+", "k2+") else value
    (g,) = torch.autograd.grad(out[finite].sum(), a)
    (ge,) = torch.autograd.grad(grad_src[finite].sum(), e)
    assert torch.equal(g.double().isnan(), ge.isnan())
    ok = ~ge.isnan()
    assert torch.equal(g[ok].isinf(), ge[ok].isinf())
    assert_close(g[ok], ge[ok], rtol=1e-6, atol=0, name=f"{name} gradient")


# ---------------------------------------------------------------------------------------
# OpenRLHF
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("grad_mode", ["plain", "unbiased", "unbiased_old"])
@pytest.mark.parametrize("call", ["positional", "keyword"])
def test_openrlhf_compute_approx_kl(est, grad_mode, call):
    """Log-ratios ~N(0, 2) (and a few far out): the clamps are active on a few % of the
    elements; values and gradients equal OpenRLHF 0.11.2's, positional and keyword calls."""
    B, T = 6, 19
    lp = -torch.rand(B, T, dtype=torch.float64) * 3
    base = lp - torch.randn(B, T, dtype=torch.float64) * 2
    base[0, :4] = lp[0, :4] - torch.tensor([30.0, -30.0, 11.0, -11.0], dtype=torch.float64)
    old = lp + torch.randn(B, T, dtype=torch.float64)
    old[1, :2] = lp[1, :2] - 5.0  # the importance weight's clamp at 10
    unbiased = grad_mode != "plain"
    o = old.float() if grad_mode == "unbiased_old" else None
    a = lp.float().requires_grad_()
    e = lp.clone().requires_grad_()
    if call == "positional":
        out = openrlhf.compute_approx_kl(a, base.float(), o, est, unbiased)
    else:
        out = openrlhf.compute_approx_kl(log_probs=a, log_probs_base=base.float(), log_probs_old=o,
                                         kl_estimator=est, unbiased_gradient=unbiased)
    exp = ref_openrlhf_kl(e, base.float().double(), est, old=None if o is None else o.double(),
                          unbiased_gradient=unbiased)
    assert out.dtype == torch.float32
    if est != "k1":
        assert (exp.detach().abs() == 10).sum() >= 2  # the clamp is exercised
    assert_close(out, exp, rtol=RTOL, atol=ATOL, name=f"{est} value")
    w = torch.randn_like(exp)
    (out * w.float()).sum().backward()
    (exp * w).sum().backward()
    assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-4, name=f"{est} gradient")
    with torch.no_grad():  # the values alone (the experience maker's call)
        assert_close(openrlhf.compute_approx_kl(lp.float(), base.float(), kl_estimator=est), exp.detach(),
                     rtol=RTOL, atol=ATOL)


def test_openrlhf_compute_approx_kl_signature_and_edges():
    lp, ref, values, scores, mask = batch(3, 8)
    # the third positional argument is log_probs_old (used only with unbiased_gradient)
    plain = openrlhf.compute_approx_kl(lp.float(), ref.float())
    assert torch.equal(openrlhf.compute_approx_kl(lp.float(), ref.float(), mask.float()), plain)
    assert torch.equal(openrlhf.compute_approx_kl(lp.float(), ref.float(), None, "k1", False), plain)
    # older OpenRLHF's action_mask, keyword only
    assert_close(openrlhf.compute_approx_kl(lp.float(), ref.float(), kl_estimator="k3", action_mask=mask.float()),
                 ref_openrlhf_kl(lp, ref, "k3", mask.double()), rtol=RTOL, atol=ATOL)
    assert_close(openrlhf.compute_approx_kl(lp.bfloat16(), ref.bfloat16(), kl_estimator="k1"),
                 lp.bfloat16().double() - ref.bfloat16().double(), rtol=RTOL, atol=ATOL)
    # infinite log-probabilities: the clamps hold (k3 of -inf is 10, as in OpenRLHF)
    inf = math.inf
    x = torch.tensor([[-inf, 0.0, -1.0, -inf]])
    y = torch.tensor([[0.0, -inf, -1.0, -inf]])
    for est, exp in [("k1", [-10, 10, 0, math.nan]), ("k2", [10, 10, 0, math.nan]), ("k3", [10, 10, 0, math.nan])]:
        out = openrlhf.compute_approx_kl(x, y, kl_estimator=est)
        assert torch.equal(out.isnan(), torch.tensor([[False, False, False, True]]))
        assert out[0, :3].tolist() == exp[:3], est
    # k3's log-ratio clamp at -10 holds in the gradient too: without it exp(-x) overflows float32
    # (x < -88) and the final clamp's zero gradient times inf is NaN
    x = torch.tensor([[-100.0, 0.5]], requires_grad=True)
    openrlhf.compute_approx_kl(x, torch.zeros(1, 2), kl_estimator="k3").sum().backward()
    assert x.grad[0, 0].item() == 0.0 and math.isclose(x.grad[0, 1].item(), 1 - math.exp(-0.5), rel_tol=1e-6)
    # 0-d and broadcast shapes, as OpenRLHF's arithmetic accepts
    assert openrlhf.compute_approx_kl(torch.tensor(-1.0), torch.tensor(-2.0), kl_estimator="k2").item() == 0.5
    assert openrlhf.compute_approx_kl(lp.float(), ref[:1].float()).shape == lp.shape
    with pytest.raises(ValueError, match="kl_estimator"):
        openrlhf.compute_approx_kl(lp, ref, kl_estimator="k9")
    with pytest.raises(TypeError, match="log_probs_old"):  # the older positional order
        openrlhf.compute_approx_kl(lp, ref, "k3")
    with pytest.raises(ValueError, match="broadcast"):
        openrlhf.compute_approx_kl(lp, ref[:, :3])


@pytest.mark.parametrize("kl_coef,clip", [(0.05, None), (0.2, (-1.0, 0.5)), (-0.3, None), (0.0, (-10, 10))])
def test_openrlhf_compute_reward(kl_coef, clip):
    lp, ref, values, scores, mask = batch(8, 21)
    kl = torch.randn(8, 21).float()
    out = openrlhf.compute_reward(scores.float(), kl_coef, kl, action_mask=mask, reward_clip_range=clip)
    exp = ref_openrlhf_reward(scores.float().double(), kl_coef, kl, mask, clip)
    assert out.dtype == kl.dtype and out.shape == kl.shape
    assert_close(out, exp, rtol=RTOL, atol=ATOL, name="rewards")
    # OpenRLHF 0.11.2's positional order: (r, kl_coef, kl, action_mask, reward_clip_range)
    assert torch.equal(openrlhf.compute_reward(scores.float(), kl_coef, kl, mask, clip), out)


@pytest.mark.parametrize("clip", [None, (-0.5, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_openrlhf_compute_reward_gradient(clip, dtype):
    """OpenRLHF's rewards are a differentiable sum: -kl_coef for every token of kl, 1 for r at
    the position that gets it (0 where the clip holds r; the last column of a row with no
    action). The fused op's rewards carry no graph: the adapter passed none (grad 0). float64
    inputs give float64 rewards, exact to float64 rounding (they raised a scatter dtype error)."""
    lp, ref, values, scores, mask = batch(6, 13)
    mask[2] = 0
    kl = torch.randn(6, 13, dtype=dtype, requires_grad=True)
    r = scores.to(dtype).clone().requires_grad_()
    out = openrlhf.compute_reward(r, 0.1, kl, mask, clip)
    assert out.dtype == dtype
    w = torch.randn(out.shape, dtype=torch.float64)
    gk, gr = torch.autograd.grad((out * w.to(dtype)).sum(), (kl, r))
    kl64, r64 = kl.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    want = ref_openrlhf_reward(r64, 0.1, kl64, mask, clip)
    ek, er = torch.autograd.grad((want * w).sum(), (kl64, r64))
    tol = RTOL if dtype == torch.float32 else 1e-12
    assert_close(out, want, rtol=tol, atol=tol, name="rewards")
    assert_close(gk, ek, rtol=tol, atol=tol, name="d/dkl")
    assert_close(gr, er, rtol=tol, atol=tol, name="d/dr")
    # packed lists, with a float score broadcast (the docstring's "a float is broadcast")
    kls = [torch.randn(n, requires_grad=True) for n in (4, 1, 6)]
    rows = openrlhf.compute_reward(1.5, 0.1, kls, num_actions=[4, 1, 3])
    for i, (k, n) in enumerate(zip(kls, [4, 1, 3])):
        exp = -0.1 * k.detach().double()
        exp[n - 1] += 1.5
        assert_close(rows[i], exp, rtol=RTOL, atol=ATOL, name=f"packed row {i}")
    grads = torch.autograd.grad(sum(x.sum() for x in rows), kls)
    assert all(torch.allclose(g, torch.full_like(g, -0.1)) for g in grads)


def test_openrlhf_compute_reward_packed_list():
    lens = [5, 1, 9, 4]
    n_act = [5, 1, 7, 2]
    kl = [torch.randn(n) for n in lens]
    r = torch.randn(4)
    out = openrlhf.compute_reward(r, 0.1, kl, num_actions=n_act)
    for i, (k, n) in enumerate(zip(kl, n_act)):
        exp = -0.1 * k.double()
        exp[n - 1] += r[i]
        assert_close(out[i], exp, rtol=RTOL, atol=ATOL, name=f"row {i}")


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("gamma,lambd", [(1.0, 0.95), (0.95, 0.9)])
def test_openrlhf_gae(gamma, lambd, left_pad):
    lp, ref, values, scores, mask = batch(7, 26, left_pad=left_pad)
    rewards = torch.randn_like(values)
    adv, ret = openrlhf.get_advantages_and_returns(*f32(values, rewards), mask.float(), gamma, lambd)
    e_adv, e_ret = ref_openrlhf_gae(values, rewards, mask.double(), gamma, lambd)
    assert_close(adv, e_adv, rtol=RTOL, atol=ATOL, name="advantages")
    assert_close(ret, e_ret, rtol=RTOL, atol=ATOL, name="returns")
    adv, ret = openrlhf.get_advantages_and_returns(*f32(values, rewards), None, gamma, lambd)
    e_adv, e_ret = ref_openrlhf_gae(values, rewards, None, gamma, lambd)
    assert_close(adv, e_adv, rtol=RTOL, atol=ATOL, name="advantages (no mask)")


def test_openrlhf_gae_packed_lists():
    lens = [3, 8, 1, 6]
    values = [torch.randn(n) for n in lens]
    rewards = [torch.randn(n) for n in lens]
    adv, ret = openrlhf.get_advantages_and_returns(values, rewards, None, 0.97, 0.9)
    for i in range(len(lens)):
        e_adv, e_ret = ref_openrlhf_gae(values[i][None].double(), rewards[i][None].double(), None, 0.97, 0.9)
        assert_close(adv[i], e_adv[0], rtol=RTOL, atol=ATOL, name=f"advantages[{i}]")
        assert_close(ret[i], e_ret[0], rtol=RTOL, atol=ATOL, name=f"returns[{i}]")


@pytest.mark.parametrize("std_norm", [True, False])
def test_openrlhf_normalize_advantages(std_norm):
    advs = [torch.randn(4, 11) * 3 + 1, torch.randn(5, 7) * 3 + 1]
    masks = [ragged_mask(4, 11), ragged_mask(5, 7)]
    out = openrlhf.normalize_advantages(advs, masks, no_advantage_std_norm=not std_norm)
    exp = ref_openrlhf_normalize(advs, masks, std_norm)
    for o, e, m in zip(out, exp, masks):
        assert_close(o, at(e, m), rtol=RTOL, atol=ATOL, name="normalized advantages")
    # whatever a masked position holds (NaN, inf) stays out of the statistics
    poisoned = [a.masked_fill(~m, v) for a, m, v in zip(advs, masks, (math.nan, math.inf))]
    for o, e, m in zip(openrlhf.normalize_advantages(poisoned, masks, no_advantage_std_norm=not std_norm), exp, masks):
        assert_close(o, at(e, m), rtol=RTOL, atol=ATOL, name="normalized advantages, NaN/inf at masked positions")
    single = openrlhf.normalize_advantages(advs[0], masks[0], no_advantage_std_norm=not std_norm)
    assert_close(single, at(ref_openrlhf_normalize(advs[:1], masks[:1], std_norm)[0], masks[0]),
                 rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------
# TRL PPO
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("est", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_trl_ppo_block(est, whiten_rewards, device):
    B, T = 9, 15
    lp, ref, values, scores, _ = batch(B, T)
    seq_len = torch.randint(-1, T, (B,))
    seq_len[0], seq_len[1], seq_len[2] = T - 1, T - 2, -1  # full length, score at the end, empty response
    out = trl_ppo.compute_rewards_and_advantages(*f32(lp, ref, values, scores, device=device),
                                                 seq_len.to(device), kl_coef=0.07,
                                                 kl_estimator=est, gamma=0.99, lam=0.9,
                                                 whiten_rewards=whiten_rewards)
    e_adv, e_ret, e_rew, e_kl = ref_trl(lp, ref, values, scores, seq_len, 0.07, est, 0.99, 0.9, whiten_rewards)
    assert_close(out.rewards, e_rew, rtol=RTOL, atol=ATOL, name="rewards")
    assert_close(out.kl, e_kl, rtol=RTOL, atol=ATOL, name="kl")
    assert_close(out.non_score_reward, -0.07 * e_kl, rtol=RTOL, atol=ATOL, name="non_score_reward")
    assert_close(out.returns, e_ret, rtol=RTOL, atol=ATOL, name="returns")
    assert_close(out.advantages, e_adv, rtol=RTOL, atol=ATOL, name="advantages")
    assert trl_ppo.INVALID_LOGPROB == 1.0  # TRL's (trl.trainer.ppo_trainer.INVALID_LOGPROB, TRL <= 1.12)
    assert (out.logprobs[out.padding_mask] == 1.0).all()
    assert (out.values[out.padding_mask_p1] == 0).all()


def test_trl_ppo_block_bfloat16_inputs():
    """bfloat16 inputs: the computed tensors are float32 (the module docstring says so; TRL's
    stay bfloat16), the numbers those of the inputs' values in float32; the masked inputs keep
    their dtype."""
    B, T = 6, 11
    lp, ref, values, scores, _ = batch(B, T)
    lp, ref, values, scores = (t.to(torch.bfloat16) for t in f32(lp, ref, values, scores))
    seq_len = torch.tensor([T - 1, 3, -1, 0, 7, T - 2])
    out = trl_ppo.compute_rewards_and_advantages(lp, ref, values, scores, seq_len, kl_coef=0.07)
    for name in ("advantages", "returns", "rewards", "kl", "non_score_reward"):
        assert getattr(out, name).dtype == torch.float32, name
    for name in ("logprobs", "ref_logprobs", "values"):
        assert getattr(out, name).dtype == torch.bfloat16, name
    e_adv, e_ret, e_rew, e_kl = ref_trl(*(t.double() for t in (lp, ref, values, scores)), seq_len, 0.07, "k1",
                                        1.0, 0.95, False)
    assert_close(out.rewards, e_rew, rtol=RTOL, atol=ATOL, name="rewards")
    assert_close(out.advantages, e_adv, rtol=RTOL, atol=ATOL, name="advantages")


def test_trl_masked_whiten_and_errors():
    x = torch.randn(6, 13)
    m = ragged_mask(6, 13)
    for shift in (True, False):
        assert_close(trl_ppo.masked_whiten(x, m, shift_mean=shift),
                     at(ref_masked_whiten(x.double(), m, unbiased=True, shift_mean=shift), m),
                     rtol=RTOL, atol=ATOL, name=f"masked_whiten shift_mean={shift}")
    lp = torch.randn(2, 3)
    with pytest.raises(ValueError, match="kl_estimator"):
        trl_ppo.compute_rewards_and_advantages(lp, lp, lp, torch.zeros(2), torch.tensor([1, 2]), kl_coef=0.1,
                                               kl_estimator="k2")
    with pytest.raises(ValueError, match="sequence_lengths"):
        trl_ppo.compute_rewards_and_advantages(lp, lp, lp, torch.zeros(2), torch.tensor([1]), kl_coef=0.1)


def test_trl_utils_agree_with_installed_trl():
    """Where TRL is installed, its own helpers give the sequence lengths this adapter expects."""
    utils = pytest.importorskip("trl.experimental.utils")
    if not hasattr(utils, "first_true_indices"):
        pytest.skip("this TRL has no first_true_indices")
    pad = 0
    responses = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 0, 0, 0], [4, 4, 4, 4, 4]])
    seq = utils.first_true_indices(responses == pad) - 1
    assert seq.tolist() == [2, -1, 4]


@pytest.mark.parametrize("B,T", [(0, 5), (3, 0)])
def test_empty_batches_give_empty_results(B, T):
    z, m = torch.zeros(B, T), torch.ones(B, T)
    for out in (*verl.compute_gae_advantage_return(z, z, m, 1.0, 0.95), verl.kl_penalty(z, z, "k3+"),
                openrlhf.compute_approx_kl(z, z, kl_estimator="k3"),
                *openrlhf.get_advantages_and_returns(z, z, m, 1.0, 0.95),
                openrlhf.normalize_advantages(z, m), openrlhf.compute_reward(torch.zeros(B), 0.1, z, action_mask=m),
                *trl_ppo.compute_rewards_and_advantages(z, z, z, torch.zeros(B), torch.zeros(B, dtype=torch.long),
                                                        kl_coef=0.1)[:5]):
        assert out.shape == (B, T)
