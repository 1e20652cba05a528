"""The kernel ops of docs/ops.md section 4: ``gae_kernel`` (GAE over given token rewards) and
``kl_estimate_kernel`` (the per-token KL estimate), on every backend that runs here.

They are ppo_gae's recurrence and KL pass on their own, so each must equal
``rmk.ppo_advantages(..., whiten=False)`` on the same backend: ``gae_kernel(rewards, values,
mask)`` its advantages / returns when ``rewards`` is that call's ``rewards`` output (bit for
bit: the same arithmetic), and ``kl_estimate_kernel`` its ``kl`` output, for every estimator
and clamp. Also against a plain recurrence written here, for every input dtype.
"""
import pytest
import torch

import rmkernels as rmk
from rmkernels import _codes
from tests.utils import TRITON_INTERPRET, assert_close, backend_params, make_mask, poison_, skip_unless_available


def _triton_ppo():
    from rmkernels.triton import ppo

    return ppo


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch):
    """Under the interpreter, blocks of 16 positions: rows cross several blocks, so the
    carries between blocks are tested."""
    if TRITON_INTERPRET:
        monkeypatch.setattr(_triton_ppo(), "MAX_BLOCK_T", 16)
        monkeypatch.setattr(_triton_ppo(), "APPLY_BLOCK", 16)


def gae_kernel(backend, rewards, values, mask, gamma, lam, returns=True):
    if backend == "triton":
        return _triton_ppo().gae(rewards, values, mask, gamma, lam, returns)
    return torch.ops.rmkernels.gae_kernel(rewards, values, mask, gamma, lam, returns)


def kl_kernel(backend, lp, ref, mask, code, x_clamp, kl_clamp):
    if backend == "triton":
        return _triton_ppo().kl_estimate(lp, ref, mask, code, x_clamp, kl_clamp)
    return torch.ops.rmkernels.kl_estimate_kernel(lp, ref, mask, code, x_clamp, kl_clamp)


def _kl_args(name, clamp):
    """(code, x_clamp, kl_clamp) of a public estimator name, as ppo_advantages sets them."""
    code = int(_codes.KL_ESTIMATORS[name])
    kc = 0.0 if clamp is None else float(clamp)
    if name == "low_var_kl":
        return code, _codes.LOW_VAR_X_CLAMP, (_codes.LOW_VAR_KL_CLAMP if clamp is None
                                              else min(kc, _codes.LOW_VAR_KL_CLAMP))
    return code, 0.0, kc


def strided(x, layout):
    """x ([B, T]) with the same values in another layout."""
    B, T = x.shape
    if layout == "contiguous":
        return x
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "sliced":  # every other position of a wider buffer, rows padded
        buf = torch.full((B, 2 * T + 3), float("nan"), dtype=x.dtype, device=x.device)
        buf[:, : 2 * T : 2] = x
        return buf[:, : 2 * T : 2]
    raise ValueError(layout)


def gae_plain(rewards, values, mask, gamma, lam):
    """The mask-aware recurrence (docs/ops.md section 3), one row at a time, in the arithmetic dtype."""
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    r, v = rewards.to(acc), values.to(acc)
    adv = torch.zeros(r.shape, dtype=acc)
    ret = torch.zeros(r.shape, dtype=acc)
    for b in range(r.shape[0]):
        next_v = torch.zeros((), dtype=acc)
        next_a = torch.zeros((), dtype=acc)
        for t in reversed(range(r.shape[1])):
            if mask[b, t]:
                a = r[b, t] + gamma * next_v - v[b, t] + gamma * lam * next_a
                adv[b, t], ret[b, t] = a, a + v[b, t]
                next_v, next_a = v[b, t], a
    return adv, ret


def _exact(actual, expected, name):
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.is_contiguous(), f"{name} must be contiguous"
    assert_close(actual, expected, rtol=0, atol=0, name=name)


ESTIMATORS = ["k1", "abs", "k2", "k3", "low_var_kl"]
CLAMPS = [None, 0.3]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["mixed", "holes", "full"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_gae_kernel_equals_ppo_advantages(backend, device, dtype, kind, layout):
    skip_unless_available(backend, device)
    B, T = (5, 59) if backend == "triton" else (7, 97)
    lp, ref, values = (torch.randn(B, T, device=device).to(dtype) for _ in range(3))
    scores = torch.randn(B, device=device)
    mask = make_mask(kind, B, T, device)
    gamma, lam = 0.97, 0.9
    out = rmk.ppo_advantages(lp, ref, values, scores, mask, kl_coef=0.1, gamma=gamma, lam=lam, whiten=False,
                             kl_estimator="k3", backend=backend)
    # the rewards output is in the arithmetic dtype; values upcast to it exactly
    acc = out.rewards.dtype
    rewards, vals = strided(out.rewards, layout), strided(values.to(acc), layout)
    m = strided(mask, layout) if layout != "sliced" else mask
    adv, ret = gae_kernel(backend, rewards, vals, m, gamma, lam)
    _exact(adv, out.advantages, f"advantages ({dtype}, {kind}, {layout})")
    _exact(ret, out.returns, f"returns ({dtype}, {kind}, {layout})")
    adv_only, none = gae_kernel(backend, rewards, vals, m, gamma, lam, returns=False)  # REINFORCE++'s use
    _exact(adv_only, out.advantages, f"advantages without returns ({dtype}, {kind}, {layout})")
    assert none.shape == (0,) and none.dtype == acc


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_gae_kernel_every_dtype_against_plain_recurrence(backend, device, dtype):
    """The kernel reads rewards and values in their own dtype (no upcast copy by the caller)."""
    skip_unless_available(backend, device)
    B, T = 6, 45
    rewards = torch.randn(B, T, device=device).to(dtype)
    values = torch.randn(B, T, device=device).to(dtype)
    mask = make_mask("mixed", B, T, device)
    rewards[~mask] = float("nan")  # masked rewards never reach a valid position
    adv, ret = gae_kernel(backend, rewards, values, mask, 0.99, 0.95)
    e_adv, e_ret = gae_plain(rewards.cpu(), values.cpu(), mask.cpu(), 0.99, 0.95)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert adv.dtype == e_adv.dtype
    assert_close(adv, e_adv, rtol=tol, atol=tol, name=f"advantages {dtype}")
    assert_close(ret, e_ret, rtol=tol, atol=tol, name=f"returns {dtype}")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_kl_estimate_kernel_equals_ppo_advantages(backend, device, estimator, clamp, dtype):
    skip_unless_available(backend, device)
    B, T = (4, 37) if backend == "triton" else (7, 111)
    lp = (2 * torch.randn(B, T, device=device)).to(dtype)
    ref = (2 * torch.randn(B, T, device=device)).to(dtype)
    lp[0, :3] = torch.tensor([30.0, -30.0, 0.0])  # past low_var_kl's x clamp
    values = torch.randn(B, T, device=device).to(dtype)
    mask = make_mask("holes", B, T, device)
    out = rmk.ppo_advantages(lp, ref, values, torch.randn(B, device=device), mask, kl_coef=0.1, whiten=False,
                             kl_estimator=estimator, kl_clamp=clamp, backend=backend)
    code, xc, kc = _kl_args(estimator, clamp)
    for layout in ("contiguous", "transposed", "sliced"):
        m = strided(mask, layout) if layout != "sliced" else mask
        kl = kl_kernel(backend, strided(lp, layout), strided(ref, layout), m, code, xc, kc)
        _exact(kl, out.kl, f"kl ({estimator}, clamp={clamp}, {dtype}, {layout})")
    # no mask: every position valid
    full = rmk.ppo_advantages(lp, ref, values, torch.randn(B, device=device), torch.ones_like(mask), kl_coef=0.1,
                              whiten=False, kl_estimator=estimator, kl_clamp=clamp, backend=backend)
    _exact(kl_kernel(backend, lp, ref, None, code, xc, kc), full.kl, f"kl without mask ({estimator})")


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_shapes(backend, device):
    skip_unless_available(backend, device)
    for B, T in ((0, 7), (3, 0), (0, 0)):
        x = torch.randn(B, T, device=device)
        m = torch.ones(B, T, dtype=torch.bool, device=device)
        adv, ret = gae_kernel(backend, x, x, m, 1.0, 0.95)
        adv_only, none = gae_kernel(backend, x, x, m, 1.0, 0.95, returns=False)
        assert adv_only.shape == (B, T) and none.shape == (0,)
        kl = kl_kernel(backend, x, x, m, int(_codes.KLEstimator.K3), 0.0, 0.0)
        kl2 = kl_kernel(backend, x, x, None, int(_codes.KLEstimator.K1), 0.0, 0.0)
        for t in (adv, ret, kl, kl2):
            assert t.shape == (B, T) and t.dtype == torch.float32


@pytest.mark.parametrize("backend,device", backend_params())
def test_masked_positions_are_zero_and_isolated(backend, device):
    """NaN / inf at masked positions stay there; every masked output is 0."""
    skip_unless_available(backend, device)
    B, T = 4, 33
    lp, ref, rewards, values = (torch.randn(B, T, device=device) for _ in range(4))
    mask = make_mask("holes", B, T, device)
    for t in (lp, rewards, values):
        t[~mask] = float("inf")
    ref[~mask] = float("nan")
    adv, ret = gae_kernel(backend, rewards, values, mask, 0.9, 0.8)
    kl = kl_kernel(backend, lp, ref, mask, int(_codes.KLEstimator.K3), 0.0, 0.0)
    for name, t in (("advantages", adv), ("returns", ret), ("kl", kl)):
        assert torch.isfinite(t).all(), f"{name}: a masked inf/NaN leaked"
        assert (t[~mask] == 0).all(), f"{name} must be 0 at masked positions"


@pytest.mark.parametrize("backend,device", backend_params())
def test_long_rows(backend, device, monkeypatch):
    """Long rows; on Triton the segmented scan (aggregate, carry, final launches), forced onto
    short rows by scaling the segment length down."""
    skip_unless_available(backend, device)
    if backend == "triton":
        monkeypatch.setattr(_triton_ppo(), "FORCE_SEGMENT_T", 32 if TRITON_INTERPRET else 1024)
        B, T = 5, (97 if TRITON_INTERPRET else 9000)
    else:
        B, T = 9, 5003
    lp, ref, values = (torch.randn(B, T, device=device) for _ in range(3))
    for kind in ("mixed", "holes"):
        mask = make_mask(kind, B, T, device)
        if kind == "mixed" and T > 40:
            mask[1] = False
            mask[1, 31:33] = True  # valid positions only around a segment border
        out = rmk.ppo_advantages(lp, ref, values, torch.randn(B, device=device), mask, kl_coef=0.05, gamma=0.999,
                                 lam=0.95, whiten=False, backend=backend)
        adv, ret = gae_kernel(backend, out.rewards, values, mask, 0.999, 0.95)
        adv_only, _ = gae_kernel(backend, out.rewards, values, mask, 0.999, 0.95, returns=False)
        assert torch.equal(adv_only, adv), f"advantages without returns (long rows, {kind})"
        # Segmented (Triton), ppo_gae adds the score through the segments' carries, gae reads it
        # in the rewards: the same numbers up to float32 rounding, not bit for bit.
        assert_close(adv, out.advantages, rtol=2e-5, atol=2e-5, name=f"advantages (long rows, {kind})")
        assert_close(ret, out.returns, rtol=2e-5, atol=2e-5, name=f"returns (long rows, {kind})")


def test_outputs_are_fresh_and_fully_written():
    """Poisoned inputs at masked positions and a poisoned reuse of memory: every output
    element is written (no uninitialised memory shows)."""
    B, T = 5, 64
    rewards = poison_(torch.empty(B, T))
    values = poison_(torch.empty(B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    adv, ret = torch.ops.rmkernels.gae_kernel(rewards, values, mask, 1.0, 1.0, True)
    assert (adv == 0).all() and (ret == 0).all()
    adv, _ = torch.ops.rmkernels.gae_kernel(rewards, values, mask, 1.0, 1.0, False)
    assert (adv == 0).all()


def test_opcheck():
    B, T = 3, 17
    x, y = torch.randn(B, T), torch.randn(B, T)
    m = torch.rand(B, T) > 0.3
    for returns in (True, False):
        torch.library.opcheck(torch.ops.rmkernels.gae_kernel.default, (x, y, m, 0.99, 0.95, returns))
    torch.library.opcheck(torch.ops.rmkernels.kl_estimate_kernel.default, (x, y, m, 3, 0.0, 2.0))
    torch.library.opcheck(torch.ops.rmkernels.kl_estimate_kernel.default, (x, y, None, 1, 20.0, 0.0))


def test_compile_fullgraph():
    B, T = 3, 17
    x, y = torch.randn(B, T), torch.randn(B, T)
    m = torch.rand(B, T) > 0.3

    def f(x, y, m):
        adv, ret = torch.ops.rmkernels.gae_kernel(x, y, m, 0.99, 0.95, True)
        adv_only, _ = torch.ops.rmkernels.gae_kernel(x, y, m, 0.99, 0.95, False)
        return adv, ret, adv_only, torch.ops.rmkernels.kl_estimate_kernel(x, y, m, 2, 0.0, 0.0)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y, m)
    for g, e in zip(got, f(x, y, m)):
        assert torch.equal(g, e)


@pytest.mark.parametrize("backend,device", backend_params())
def test_bad_arguments_raise(backend, device):
    """Every argument is checked before a launch: a clear error naming it."""
    skip_unless_available(backend, device)
    err = (ValueError, TypeError)  # every backend: C++ raises through TORCH_CHECK_VALUE / _TYPE
    B, T = 3, 8
    x = torch.randn(B, T, device=device)
    m = torch.ones(B, T, dtype=torch.bool, device=device)
    bad_gae = {
        "rewards": (torch.randn(B, T + 1, device=device), x, m),
        "values": (x, torch.randn(B, T, 2, device=device), m),
        "rewards dtype": (x.double(), x, m),
        "mask": (x, x, m.float()),
        "mask shape": (x, x, m[:, :-1]),
        "values int": (x.long(), x.long(), m),
    }
    for what, args in bad_gae.items():
        with pytest.raises(err):
            gae_kernel(backend, *args, 1.0, 0.95)
            pytest.fail(f"gae_kernel accepted a bad {what}")
    bad_kl = {
        "estimator": (x, x, m, 7, 0.0, 0.0),
        "negative estimator": (x, x, m, -1, 0.0, 0.0),
        "ref shape": (x, torch.randn(B + 1, T, device=device), m, 0, 0.0, 0.0),
        "ref dtype": (x, x.half(), m, 0, 0.0, 0.0),
        "mask dtype": (x, x, m.long(), 0, 0.0, 0.0),
        "negative clamp": (x, x, m, 0, -1.0, 0.0),
    }
    for what, args in bad_kl.items():
        with pytest.raises(err):
            kl_kernel(backend, *args)
            pytest.fail(f"kl_estimate_kernel accepted a bad {what}")
