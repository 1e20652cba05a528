"""The building blocks (docs/ops.md, "Building blocks"): ``rmk.gae`` over given token rewards
and ``rmk.kl_estimate``.

The reference against plain per-row loops written from the formulas; every backend against
the reference (ragged sizes, every mask kind, strided and mixed-dtype inputs); both against
``rmk.ppo_advantages`` (which is KL + score + GAE + whitening); opcheck, torch.compile, bad
inputs. Triton tests run under TRITON_INTERPRET=1 in their own process (``-m triton``).
"""
import math

import pytest
import torch
from test_ppo import ESTIMATORS
from utils import (
    MASK_KINDS,
    TRITON_INTERPRET,
    assert_close,
    assert_compiled_matches,
    backend_params,
    make_mask,
    opcheck_test,
    skip_unless_available,
    tolerance,
)

import rmkernels as rmk

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def sample_inputs(B, T, dtype=torch.float32, device="cpu", kind="holes"):
    """(token_rewards, values, mask, logprobs, ref_logprobs) of one test case: fresh random numbers
    (the per-test seed of conftest.py)."""
    rewards = torch.randn(B, T).to(device, dtype)
    values = torch.randn(B, T).to(device, dtype)
    lp = (-torch.rand(B, T) * 3).to(device, dtype)
    ref = (lp.float().cpu() + 0.7 * torch.randn(B, T)).to(device, dtype)
    return rewards, values, make_mask(kind, B, T, device), lp, ref


def _cases(backend, device, dtype, kind="holes"):
    """The (B, T, sample_inputs) cases of a backend-against-reference test: ragged sizes, the
    interpreter's short ones for triton. Skips first when the backend cannot run here."""
    skip_unless_available(backend, device)
    sizes = [(4, 45), (3, 17)] if backend == "triton" else [(9, 97), (5, 1025), (7, 59), (1, 1)]
    return [(B, T, sample_inputs(B, T, dtype, device, kind)) for B, T in sizes]


def loop_gae(rewards, values, mask, gamma, lam):
    """verl's mask-aware GAE, one row and one position at a time, in float64."""
    r, v, m = rewards.double().cpu(), values.double().cpu(), mask.cpu()
    adv = torch.zeros_like(r)
    for b in range(r.shape[0]):
        next_v = next_a = 0.0
        for t in reversed(range(r.shape[1])):
            if not m[b, t]:
                continue
            a = float(r[b, t]) + gamma * next_v - float(v[b, t]) + gamma * lam * next_a
            adv[b, t] = a
            next_v, next_a = float(v[b, t]), a
    return adv, torch.where(m, adv + v, torch.zeros(()).double())


def loop_kl(lp, ref, estimator, clamp=None):
    x = (lp.double() - ref.double()).cpu()
    if estimator == "low_var_kl":
        x = x.clamp(-20, 20)
        clamp = 10.0 if clamp is None else min(clamp, 10.0)
    out = torch.empty_like(x)
    for i, xi in enumerate(x.flatten().tolist()):
        out.view(-1)[i] = {"k1": xi, "kl": xi, "abs": abs(xi), "k2": 0.5 * xi * xi, "mse": 0.5 * xi * xi,
                           "k3": math.exp(-xi) - 1 + xi, "low_var_kl": math.exp(-xi) - 1 + xi}[estimator]
    return out.clamp(-clamp, clamp) if clamp is not None else out


# ---------------------------------------------------------------------------------------
# The reference is the formula
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_reference_gae_is_the_loop(kind, gamma, lam):
    rewards, values, mask, _, _ = sample_inputs(6, 23, torch.float64, kind=kind)
    adv, ret = rmk.gae(rewards, values, mask, gamma=gamma, lam=lam, backend="reference")
    exp_adv, exp_ret = loop_gae(rewards, values, mask, gamma, lam)
    assert_close(adv, exp_adv, rtol=1e-12, atol=1e-12, name="advantages")
    assert_close(ret, exp_ret, rtol=1e-12, atol=1e-12, name="returns")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp", [None, 0.3, 50.0])  # 50: low_var_kl stays within its own +-10
def test_reference_kl_is_the_formula(estimator, clamp):
    _, _, mask, lp, ref = sample_inputs(5, 31, torch.float64)
    ref = ref * 10  # big log-ratios: the low_var_kl clamps are active
    out = rmk.kl_estimate(lp, ref, mask, estimator=estimator, clamp=clamp, backend="reference")
    exp = torch.where(mask, loop_kl(lp, ref, estimator, clamp), torch.zeros(()).double())
    assert_close(out, exp, rtol=1e-12, atol=1e-12)
    unmasked = rmk.kl_estimate(lp, ref, estimator=estimator, clamp=clamp, backend="reference")
    assert_close(unmasked, loop_kl(lp, ref, estimator, clamp), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_ppo_advantages_is_kl_score_gae_whitening(backend, device):
    """ppo_advantages = kl_estimate + the score at the last valid token + gae (+ whitening)."""
    skip_unless_available(backend, device)
    rewards, values, mask, lp, ref = sample_inputs(6, 40, torch.float64, device)
    scores = torch.randn(6, dtype=torch.float64, device=device)
    out = rmk.ppo_advantages(lp, ref, values, scores, mask, kl_coef=0.1, gamma=0.9, lam=0.8, kl_estimator="k3",
                             whiten=False, backend=backend)
    kl = rmk.kl_estimate(lp, ref, mask, estimator="k3", backend=backend)
    assert_close(out.kl, kl, rtol=1e-12, atol=1e-12, name="kl")
    adv, ret = rmk.gae(out.rewards, values, mask, gamma=0.9, lam=0.8, backend=backend)
    assert_close(out.advantages, adv, rtol=1e-12, atol=1e-12, name="advantages")
    assert_close(out.returns, ret, rtol=1e-12, atol=1e-12, name="returns")


# ---------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------
def _arith_dtype(dtype):
    """The dtype whose tolerance a kernel's output is held to: the reference runs on float64 copies
    of the same (rounded) inputs and the kernels compute and write float32 for bf16 / fp16 inputs,
    so only float32's rounding separates them (the input dtype's tolerance let a bf16 accumulator
    pass)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_gae_matches_reference(backend, device, dtype, kind):
    rtol, atol = tolerance(_arith_dtype(dtype))
    for B, T, (rewards, values, mask, _, _) in _cases(backend, device, dtype, kind):
        for gamma, lam in ((1.0, 0.95), (0.97, 1.0)):
            out = rmk.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
            exp = rmk.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam, backend="reference")
            for o, e, name in zip(out, exp, ("advantages", "returns")):
                assert o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                assert o.is_contiguous()
                # the recurrence sums up to T terms: the tolerance grows with sqrt(T)
                assert_close(o, e, rtol=rtol * 4, atol=atol * math.sqrt(T) * 4, name=f"{name} {B}x{T}")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_estimate_matches_reference(backend, device, dtype, estimator):
    rtol, atol = tolerance(_arith_dtype(dtype))
    for B, T, (_, _, mask, lp, ref) in _cases(backend, device, dtype):
        for clamp, m in ((None, mask), (0.5, None)):
            out = rmk.kl_estimate(lp, ref, m, estimator=estimator, clamp=clamp, backend=backend)
            exp = rmk.kl_estimate(lp.double(), ref.double(), m, estimator=estimator, clamp=clamp,
                                  backend="reference")
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert_close(out, exp, rtol=rtol, atol=atol, name=f"{estimator} {B}x{T} clamp={clamp}")


def assert_overflows_as_the_loop(actual, exact, name):
    """``actual`` (float32) against the float64 loop's ``exact``: no NaN; inf with the loop's sign
    where ``exact`` is beyond float32's range by more than 1e-3; close (rtol 1e-4: float32 over
    a thousand steps) where it is within it by more than 1e-3. Between the two either is right."""
    a, e = actual.double().cpu(), exact.double().cpu()
    top = torch.finfo(torch.float32).max
    assert not a.isnan().any(), f"{name}: NaN at {a.isnan().nonzero()[:5].tolist()} where the loop has none"
    over, under = e.abs() > top * (1 + 1e-3), e.abs() < top * (1 - 1e-3)
    assert over.any() and under.any(), f"{name}: the case should overflow somewhere, not everywhere"
    assert torch.equal(a[over], e[over].sign() * math.inf), f"{name}: not inf where the loop overflows"
    assert_close(a[under], e[under], rtol=1e-4, atol=0.0, name=name)


OVERFLOW_CASES = [(1.1, 1500), (2.0, 200), (1e30, 40)]  # (gamma, T)


def _overflow_params():
    """backend_params x OVERFLOW_CASES, plus Triton's forced long-row segments (the CUDA kernel's
    segments are its binding's choice; tests/cuda_on_cpu runs both of its paths). In the
    interpreter (segments of 32) the segmented case leaves out T = 1500: gamma 2 over 200
    positions overflows the carries across segments as well, in a fifth of the time (the
    segmented 1500 took 111 s there)."""
    out = []
    for gamma, T in OVERFLOW_CASES:
        for p in backend_params(include_reference=True):
            be, dev = p.values
            out.append(pytest.param(be, dev, False, gamma, T, id=f"{gamma}-{T}-{p.id}", marks=p.marks))
            if be == "triton" and not (TRITON_INTERPRET and T > 1000):
                out.append(pytest.param(be, dev, True, gamma, T, id=f"{gamma}-{T}-{p.id}-segments", marks=p.marks))
    return out


@pytest.mark.parametrize("backend,device,segmented,gamma,T", _overflow_params())
def test_discount_above_one_overflows_as_the_loop_does(backend, device, segmented, gamma, T, monkeypatch):
    """gamma > 1 (accepted, like the frameworks) makes the returns grow as gamma^k. The scan
    kernels compose products of discounts, which overflow to inf long before the returns do
    (1.1^1024); an inf times a state of 0 gave NaN (Triton, and CUDA in its chunk carries and
    long rows) where the loop gives 0, finite values or inf. Rewards of one sign and of order 1
    here (a spike, uniform ones, uniform ones over holes), values 0, so that every return has
    the rewards' sign and an overflowed product of discounts only ever multiplies a state that
    overflows with it. Outside these, a scan can differ from the loop: rewards of both signs can
    meet as inf - inf (NaN where the loop keeps one inf), and a tiny state times an overflowed
    product gives inf where the loop's value is finite (docs/ops.md section 3)."""
    skip_unless_available(backend, device)
    if segmented:
        from rmkernels.triton import ppo as tppo

        monkeypatch.setattr(tppo, "FORCE_SEGMENT_T", 32 if device == "cpu" else 1024)
    r, mask = overflow_inputs(T)
    B = r.shape[0]
    values = torch.zeros(B, T)
    exact_adv, _ = loop_gae(r, values, mask, gamma, 1.0)
    dev = lambda x: x.to(device)  # noqa: E731
    adv, ret = rmk.gae(dev(r), dev(values), dev(mask), gamma=gamma, lam=1.0, backend=backend)
    assert_overflows_as_the_loop(adv, exact_adv, f"gae advantages ({backend})")
    assert_overflows_as_the_loop(ret, exact_adv, f"gae returns ({backend})")
    rpp = rmk.reinforce_pp_returns(dev(r), dev(mask), gamma=gamma, backend=backend)
    assert_overflows_as_the_loop(rpp, exact_adv, f"reinforce++ returns ({backend})")
    # ppo_advantages: the score at the last valid position is the only reward (kl_coef 0)
    scores = torch.rand(B) + 0.5
    lp = torch.randn(B, T)
    exact, _ = loop_gae(torch.zeros(B, T).index_put_((torch.arange(B), last_valid(mask)), scores), values, mask,
                        gamma, 1.0)
    out = rmk.ppo_advantages(dev(lp), dev(lp), dev(values), dev(scores), dev(mask), kl_coef=0.0, gamma=gamma, lam=1.0,
                             whiten=False, backend=backend)
    assert_overflows_as_the_loop(out.advantages, exact, f"ppo_advantages ({backend})")


def overflow_inputs(T):
    """(rewards, mask) [4, T] of the gamma > 1 tests: of one sign per row and of order 1 (a
    spike; uniform ones; uniform ones, negated, over holes and a masked tail)."""
    r = torch.zeros(4, T)
    r[0, T // 3] = 1.0
    r[1:] = torch.rand(3, T)
    r[3] = -r[3]
    mask = torch.ones(4, T, dtype=torch.bool)
    mask[2:, ::3] = False
    mask[2:, -5:] = False
    return r, mask


def last_valid(mask):
    """Each row's last valid position (every row here has one)."""
    T = mask.shape[1]
    return T - 1 - mask.flip(1).int().argmax(1)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_strided_and_mixed_inputs(backend, device):
    """Transposed / sliced inputs and int/float masks give what contiguous ones do; mixed
    dtypes are brought to one."""
    skip_unless_available(backend, device)
    B, T = (4, 33) if backend == "triton" else (7, 70)
    rewards, values, mask, lp, ref = sample_inputs(B, T, torch.float32, device)
    wide = torch.randn(T, 2 * B, device=device)
    r_t = wide[:, ::2].t()  # [B, T], neither stride is 1
    r_t.copy_(rewards)
    exp = rmk.gae(rewards, values, mask, backend=backend)
    for got in (rmk.gae(r_t, values, mask.int(), backend=backend),
                rmk.gae(rewards, values.t().contiguous().t(), mask.float(), backend=backend)):
        for g, e in zip(got, exp):
            assert torch.equal(g, e)
    mixed = rmk.gae(rewards.bfloat16(), values, mask, backend=backend)
    expm = rmk.gae(rewards.bfloat16().float(), values, mask, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(mixed, expm))
    kl = rmk.kl_estimate(lp.t().contiguous().t(), ref, mask, estimator="k3", backend=backend)
    assert torch.equal(kl, rmk.kl_estimate(lp, ref, mask, estimator="k3", backend=backend))
    # any rank >= 1: rows of the last dim
    kl3 = rmk.kl_estimate(lp.reshape(B, 1, T), ref.reshape(B, 1, T), estimator="k2", backend=backend)
    assert kl3.shape == (B, 1, T)
    assert torch.equal(kl3.reshape(B, T), rmk.kl_estimate(lp, ref, estimator="k2", backend=backend))


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_empty_and_no_gradient(backend, device):
    skip_unless_available(backend, device)
    for B, T in ((0, 5), (3, 0)):
        r = torch.randn(B, T, device=device, requires_grad=True)
        adv, ret = rmk.gae(r, r, torch.ones(B, T, dtype=torch.bool, device=device), backend=backend)
        assert adv.shape == ret.shape == (B, T) and not adv.requires_grad
        kl = rmk.kl_estimate(r, r, backend=backend)
        assert kl.shape == (B, T) and not kl.requires_grad


# ---------------------------------------------------------------------------------------
# opcheck, compile, errors
# ---------------------------------------------------------------------------------------
def _op_samples(device):
    rewards, values, mask, lp, ref = sample_inputs(3, 11, device=device)
    samples = [("gae", (rewards, values, mask, 0.9, 0.95))]
    for m in (mask, None):
        samples += [("kl_estimate", (lp, ref, m, "low_var_kl", 3.0)), ("kl_estimate", (lp, ref, m, "k1", None))]
    samples += [("gae_kernel", (rewards, values, mask, 0.9, 0.95, returns)) for returns in (True, False)]
    return samples + [("kl_estimate_kernel", (lp, ref, mask, 3, 20.0, 10.0))]


test_opcheck = opcheck_test(_op_samples)  # every backend (the kernel ops: cpu / cuda)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_compile_fullgraph(backend, device):
    skip_unless_available(backend, device)
    rewards, values, mask, lp, ref = sample_inputs(4, 19, device=device)

    def f(r, v, m, lp, ref):
        adv, ret = rmk.gae(r, v, m, gamma=0.9, backend=backend)
        return adv, ret, rmk.kl_estimate(lp, ref, m, estimator="k3", clamp=2.0, backend=backend)

    assert_compiled_matches(f, rewards, values, mask, lp, ref, rtol=0, atol=0, backend="aot_eager")


BAD = [
    (lambda r, v, m: rmk.gae(r[0], v, m), ValueError, "token_rewards must be 2-D"),
    (lambda r, v, m: rmk.gae(r, v[:, 1:], m), ValueError, "values must have shape"),
    (lambda r, v, m: rmk.gae(r, v, m[:, 1:]), ValueError, "mask must have shape"),
    (lambda r, v, m: rmk.gae(r.long(), v, m), TypeError, "token_rewards must have dtype"),
    (lambda r, v, m: rmk.gae(r, v, m, gamma=-1.0), ValueError, "gamma must be in"),
    (lambda r, v, m: rmk.gae(r, v, m, lam=1.5), ValueError, "lam must be in"),
    (lambda r, v, m: rmk.gae(r, v, m, lam="0.9"), TypeError, "lam must be a real number"),
    (lambda r, v, m: rmk.gae(r, v, m, backend="fast"), ValueError, "backend must be one of"),
    (lambda r, v, m: rmk.kl_estimate(r, v[:, 1:]), ValueError, "ref_logprobs must have shape"),
    (lambda r, v, m: rmk.kl_estimate(r, v, m[:1]), ValueError, "mask must have shape"),
    (lambda r, v, m: rmk.kl_estimate(r, v, estimator="k4"), ValueError, "estimator must be one of"),
    (lambda r, v, m: rmk.kl_estimate(r, v, estimator=3), TypeError, "estimator must be a str"),
    (lambda r, v, m: rmk.kl_estimate(r, v, clamp=0.0), ValueError, "clamp must be in"),
    (lambda r, v, m: rmk.kl_estimate(r[0, 0], v[0, 0]), ValueError, "logprobs must be at least 1-D"),
    (lambda r, v, m: rmk.kl_estimate(r, v.double()[None]), ValueError, "ref_logprobs must have shape"),
]


@pytest.mark.parametrize("fn,exc,match", BAD)
def test_bad_inputs(fn, exc, match):
    r, v = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(exc, match=match):
        fn(r, v, torch.ones(3, 8, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_direct_op_calls_check_their_arguments(backend):
    """torch.ops.rmkernels.gae / kl_estimate called directly: a clear error naming the
    argument, before any kernel, on every backend."""
    r, v, m = torch.randn(3, 8), torch.randn(3, 8), torch.ones(3, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="values must have shape"):
        torch.ops.rmkernels.gae(r, v[:2], m, 1.0, 0.95, backend)
    with pytest.raises(TypeError, match="mask must have dtype"):
        torch.ops.rmkernels.gae(r, v, m.int(), 1.0, 0.95, backend)
    with pytest.raises(ValueError, match="estimator must be one of"):
        torch.ops.rmkernels.kl_estimate(r, v, m, "k9", None, backend)
    with pytest.raises(TypeError, match="ref_logprobs must have dtype"):
        torch.ops.rmkernels.kl_estimate(r, v.double(), None, "k1", None, backend)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_any_nonzero_mask_value_is_a_valid_token(backend, device):
    """An integer mask marks a valid token by any nonzero value, negative ones included (the
    rule is mask != 0, as for HF attention masks): the same results as its bool mask on every
    op that takes one. No test had a negative entry, so `> 0` would have passed."""
    skip_unless_available(backend, device)
    B, T = 5, 9
    rewards, values, mask, lp, ref = (t.to(device) for t in sample_inputs(B, T, torch.float32, kind="holes"))
    mask[:, 0] = True  # a token in every row (the pooling refuses rows without one)
    signs = (torch.randint(1, 4, (B, T)) * (torch.randint(0, 2, (B, T)) * 2 - 1)).to(device)
    as_int = mask.to(torch.int64) * signs
    assert (as_int < 0).any()
    scores = torch.randn(B, device=device)
    calls = [lambda m: rmk.gae(rewards, values, m, backend=backend),
             lambda m: rmk.kl_estimate(lp, ref, m, estimator="k3", backend=backend),
             lambda m: rmk.masked_whiten(rewards, m, backend=backend),
             lambda m: rmk.ppo_advantages(lp, ref, values, scores, m, kl_coef=0.1, backend=backend).advantages,
             lambda m: rmk.reinforce_pp_returns(rewards, m, backend=backend),
             lambda m: rmk.group_advantages(scores, torch.arange(B, device=device) // 2, m, backend=backend)[1]]
    for i, call in enumerate(calls):
        want, got = call(mask), call(as_int)
        for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            assert torch.equal(w, g), f"call {i}"
    hidden, weight = torch.randn(B, T, 4, device=device), torch.randn(1, 4, device=device)
    assert torch.equal(rmk.last_token_reward(hidden, weight, attention_mask=as_int, backend=backend),
                       rmk.last_token_reward(hidden, weight, attention_mask=mask, backend=backend))


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_mixed_float64_inputs_compute_in_float64(backend, device):
    """One float64 input among float32 ones: the op computes and returns float64 (the rule of
    ops.gae.common_float_dtype), for gae, kl_estimate and ppo_advantages; the numbers are the
    float64 ones, not float32's (a mutation that sent mixed inputs to float32 passed before)."""
    skip_unless_available(backend, device)
    rewards, values, mask, lp, ref = sample_inputs(4, 9, torch.float64, device)
    rewards = rewards + 1e-9  # float32 cannot hold these
    f32 = values.float()
    out = rmk.gae(rewards, f32, mask, gamma=0.99, lam=0.9, backend=backend)
    want = rmk.gae(rewards, f32.double(), mask, gamma=0.99, lam=0.9, backend="reference")
    for o, w in zip(out, want):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, w, rtol=1e-12, atol=1e-12)
    kl = rmk.kl_estimate(lp, ref.float(), mask, estimator="k3", backend=backend)
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl, rmk.kl_estimate(lp, ref.float().double(), mask, estimator="k3",
                                                   backend="reference"), rtol=1e-12, atol=1e-12)
    scores = torch.randn(4, dtype=torch.float64, device=device)
    adv = rmk.ppo_advantages(lp.float(), ref.float(), values, scores, mask, kl_coef=0.1, backend=backend)
    want = rmk.ppo_advantages(lp.float().double(), ref.float().double(), values, scores, mask, kl_coef=0.1,
                              backend="reference")
    for o, w in zip(adv, want):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, w, rtol=1e-10, atol=1e-10)
