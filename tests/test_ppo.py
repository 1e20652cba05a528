"""PPO KL-penalized rewards, GAE advantages and whitening (docs/ops.md).

Each backend against the reference (itself checked against the plain TRL/OpenRLHF loop
written from their published formulas), every estimator and option, random masks
(contiguous, left-padded, with holes, empty and single-token rows), opcheck,
torch.compile, bad inputs (the KL controllers: test_kl_control.py).

Triton tests run under TRITON_INTERPRET=1 in their own process (``-m triton``); there the
block of the row walk is shrunk so that short rows still cross several blocks.
"""

import pytest
import torch
from utils import (
    MASK_KINDS,
    TRITON_INTERPRET,
    assert_close,
    assert_compiled_matches,
    backend_params,
    cpu_backend_params,
    make_mask,
    opcheck_test,
    poison_,
    skip_unless_available,
    tolerance,
)

import rmkernels as rmk

ESTIMATORS = ["k1", "abs", "k2", "k3", "kl", "mse", "low_var_kl"]


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch):
    """Under the interpreter, blocks of 16 positions: rows of a few dozen tokens cross
    several blocks, so the carries between blocks are tested."""
    if TRITON_INTERPRET:
        from rmkernels.triton import ppo as tppo

        monkeypatch.setattr(tppo, "MAX_BLOCK_T", 16)
        monkeypatch.setattr(tppo, "APPLY_BLOCK", 16)


def _shape(backend, T_cpu):
    """(B, T) for a test: the interpreter gets short rows."""
    if backend == "triton":
        return 4, min(T_cpu, 45)
    return 9, T_cpu


def make_inputs(B, T, dtype=torch.float32, device="cpu"):
    lp = -torch.rand(B, T, device=device) * 3
    ref = lp + 0.5 * torch.randn(B, T, device=device)
    values = torch.randn(B, T, device=device)
    scores = 2 * torch.randn(B, device=device)
    return lp.to(dtype), ref.to(dtype), values.to(dtype), scores.to(dtype)


def run_both(backend, device, inputs, mask, **kw):
    out = rmk.ppo_advantages(*inputs, mask, backend=backend, **kw)
    ref = rmk.ppo_advantages(*inputs, mask, backend="reference", **kw)
    return out, ref


def check_outputs(out, ref, dtype, what="", rtol=None, atol=None):
    r, a = tolerance(dtype) if dtype in (torch.float64, torch.float32) else tolerance(torch.float32)
    rtol, atol = rtol or r, atol or a
    for name, x, y in zip(PPO_FIELDS, out, ref):
        assert x.dtype == y.dtype, f"{name}: dtype {x.dtype} != {y.dtype}"
        assert_close(x, y, rtol=rtol, atol=atol, name=f"{name} {what}")


PPO_FIELDS = rmk.PPOAdvantages._fields


# ---------------------------------------------------------------------------------------
# The reference against the published loops
# ---------------------------------------------------------------------------------------
def _openrlhf_style(lp, ref, values, scores, mask, kl_coef, gamma, lam):
    """OpenRLHF/TRL from their published formulas, right-padded rows: k1 KL masked by the
    action mask, the score added at the last action token, rewards and values zeroed at
    padding, then the plain loop `for t in reversed(range(T))` over every position."""
    m = mask.float()
    kl = (lp - ref) * m
    B, T = lp.shape
    eos = T - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(1, eos, scores[:, None])
    rewards = (-kl_coef * kl + last_reward) * m
    values = values * m
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def _trl_masked_whiten(values, mask, shift_mean=True):
    """TRL's masked_whiten (unbiased variance with Bessel's correction), masked to 0."""
    m = mask.float()
    mean = (values * m).sum() / m.sum()
    centered = values - mean
    var = (centered ** 2 * m).sum() / m.sum()
    var = var * m.sum() / (m.sum() - 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_matches_trl_openrlhf_loop_right_padded(backend, gamma, lam):
    skip_unless_available(backend, "cpu")
    B, T = 8, 67
    lp, ref, values, scores = make_inputs(B, T, torch.float64)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    values = torch.where(mask, values, torch.full_like(values, 123.0))  # garbage at padding
    adv, ret = _openrlhf_style(lp, ref, values, scores, mask, 0.05, gamma, lam)
    out = rmk.ppo_advantages(lp, ref, values, scores, mask, kl_coef=0.05, gamma=gamma, lam=lam, whiten=False,
                             backend=backend)
    m = mask.double()
    assert_close(out.advantages, adv * m, rtol=1e-10, atol=1e-10, name="advantages vs the loop")
    assert_close(out.returns, ret * m, rtol=1e-10, atol=1e-10, name="returns vs the loop")
    w = rmk.ppo_advantages(lp, ref, values, scores, mask, kl_coef=0.05, gamma=gamma, lam=lam, backend=backend)
    assert_close(w.advantages, _trl_masked_whiten(adv, mask), rtol=1e-9, atol=1e-9, name="whitened vs TRL")


def test_reference_hand_example():
    """A row with a hole, computed by hand: mask [1, 0, 1, 1, 0], gamma=0.5, lam=0.5."""
    lp = torch.tensor([[0.1, 9.0, 0.3, -0.2, 9.0]], dtype=torch.float64)
    ref = torch.zeros_like(lp)
    v = torch.tensor([[1.0, 50.0, 2.0, 3.0, 70.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0]])
    out = rmk.ppo_advantages(lp, ref, v, torch.tensor([4.0], dtype=torch.float64), mask, kl_coef=1.0, gamma=0.5,
                             lam=0.5, whiten=False, backend="reference")
    r = [-0.1, 0.0, -0.3, 0.2 + 4.0, 0.0]
    d3 = r[3] + 0.5 * 0 - 3.0
    a3 = d3
    d2 = r[2] + 0.5 * 3.0 - 2.0
    a2 = d2 + 0.25 * a3
    d0 = r[0] + 0.5 * 2.0 - 1.0  # V_next of position 0 is that of position 2 (1 is a hole)
    a0 = d0 + 0.25 * a2
    expect = torch.tensor([[a0, 0.0, a2, a3, 0.0]], dtype=torch.float64)
    assert_close(out.rewards, torch.tensor([r], dtype=torch.float64), rtol=1e-12, atol=1e-12, name="rewards")
    assert_close(out.advantages, expect, rtol=1e-12, atol=1e-12, name="advantages")
    assert_close(out.returns, (expect + v) * mask, rtol=1e-12, atol=1e-12, name="returns")
    assert_close(out.kl, torch.tensor([[0.1, 0, 0.3, -0.2, 0]], dtype=torch.float64), rtol=1e-12, atol=1e-12,
                 name="kl")


@pytest.mark.parametrize("est", ESTIMATORS)
def test_reference_estimator_formulas(est):
    x = torch.linspace(-30, 30, 121, dtype=torch.float64)[None, :]
    mask = torch.ones_like(x, dtype=torch.bool)
    out = rmk.ppo_advantages(x, torch.zeros_like(x), torch.zeros_like(x), torch.zeros(1, dtype=torch.float64), mask,
                             kl_coef=1.0, kl_estimator=est, whiten=False, backend="reference")
    expect = {"k1": x, "kl": x, "abs": x.abs(), "k2": 0.5 * x ** 2, "mse": 0.5 * x ** 2,
              "k3": torch.exp(-x) - 1 + x,
              "low_var_kl": (torch.exp(-x.clamp(-20, 20)) - 1 + x.clamp(-20, 20)).clamp(-10, 10)}[est]
    assert_close(out.kl, expect, rtol=1e-12, atol=1e-12, name=f"{est} kl")


# ---------------------------------------------------------------------------------------
# Backends against the reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("est", ESTIMATORS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_backend_estimators_masks(backend, device, est, kind):
    skip_unless_available(backend, device)
    B, T = _shape(backend, 97)
    inputs = make_inputs(B, T, device=device)
    mask = make_mask(kind, B, T, device)
    out, ref = run_both(backend, device, inputs, mask, kl_coef=0.1, kl_estimator=est)
    check_outputs(out, ref, torch.float32, f"({backend}, {est}, {kind})")


OPTIONS = [
    dict(whiten=False),
    dict(whiten=True, shift_mean=False),
    dict(whiten=True, unbiased=False),
    dict(whiten=True, shift_mean=False, unbiased=False, eps=1e-3),
    dict(kl_clamp=0.3, score_clip=0.5, gamma=0.9, lam=0.8),
    dict(kl_estimator="low_var_kl", kl_clamp=0.5),
    dict(gamma=1.0, lam=1.0, whiten=False),
    dict(gamma=0.0, lam=0.0),
    dict(gamma=1.5, lam=0.0, whiten=False),
    dict(kl_coef=-0.3, kl_estimator="k3"),
]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_backend_options(backend, device, opts):
    skip_unless_available(backend, device)
    B, T = _shape(backend, 130)
    inputs = make_inputs(B, T, device=device)
    mask = make_mask("mixed", B, T, device)
    kw = dict(kl_coef=0.2)
    kw.update(opts)
    out, ref = run_both(backend, device, inputs, mask, **kw)
    check_outputs(out, ref, torch.float32, str(opts))


@pytest.mark.parametrize("backend,device", backend_params())
# The interpreter (triton tests on CPU) is slow: it covers block carries with T <= 45;
# the compiled backends get the long rows.
@pytest.mark.parametrize("T", [0, 1, 2, 17, 45] if TRITON_INTERPRET else [0, 1, 2, 17, 1025, 2500])
def test_backend_lengths(backend, device, T):
    skip_unless_available(backend, device)
    B = 5
    inputs = make_inputs(B, T, device=device)
    mask = make_mask("holes", B, T, device)
    out, ref = run_both(backend, device, inputs, mask, kl_coef=0.05, gamma=1.0, lam=0.99)
    for x in out:
        assert x.shape == (B, T)
    # Long rows with lam close to 1 accumulate fp32 rounding over thousands of steps.
    check_outputs(out, ref, torch.float32, f"T={T}", rtol=1e-4 if T > 1000 else None,
                  atol=1e-4 if T > 1000 else None)


@pytest.mark.parametrize("backend,device", backend_params())
# Under the interpreter a scaled-down version (test_triton_segmented_rows covers the long-row path).
@pytest.mark.parametrize("B,T", [(2, 2048), (64, 33)] if TRITON_INTERPRET else [(2, 32768), (4096, 33)])
def test_backend_long_rows_and_wide_batches(backend, device, B, T):
    skip_unless_available(backend, device)
    inputs = make_inputs(B, T, device=device)
    mask = make_mask("mixed", B, T, device)
    out, ref = run_both(backend, device, inputs, mask, kl_coef=0.05, gamma=0.999, lam=0.95, kl_estimator="k3")
    check_outputs(out, ref, torch.float32, f"B={B}, T={T}", rtol=1e-4, atol=1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("T", [20, 45, 96])
def test_triton_segmented_rows(device, kind, T, monkeypatch):
    """The long-row path of the Triton backend (rows split into segments: aggregates, a
    carry kernel, then each segment with its carries), forced onto short rows."""
    skip_unless_available("triton", device)
    from rmkernels.triton import ppo as tppo

    monkeypatch.setattr(tppo, "FORCE_SEGMENT_T", 32 if TRITON_INTERPRET else 1024)
    if not TRITON_INTERPRET:
        T = T * 100
    B = 5
    inputs = make_inputs(B, T, device=device)
    mask = make_mask(kind, B, T, device)
    for opts in (dict(kl_estimator="k1"), dict(kl_estimator="k3", gamma=0.9, lam=0.0, score_clip=1.0)):
        out, ref = run_both("triton", device, inputs, mask, kl_coef=0.1, **opts)
        check_outputs(out, ref, torch.float32, f"segmented {kind} T={T} {opts}", rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_backend_dtypes(backend, device, dtype):
    skip_unless_available(backend, device)
    B, T = _shape(backend, 77)
    inputs = make_inputs(B, T, dtype, device)
    mask = make_mask("mixed", B, T, device)
    out, ref = run_both(backend, device, inputs, mask, kl_coef=0.1, kl_estimator="k3", kl_clamp=2.0,
                        score_clip=3.0, gamma=0.97)
    assert out.advantages.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_outputs(out, ref, dtype, str(dtype))


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_backend_empty_and_single_rows(backend, device):
    skip_unless_available(backend, device)
    B, T = 4, 23
    lp, ref, values, scores = make_inputs(B, T, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[1, 5] = True
    mask[3, 22] = True
    out = rmk.ppo_advantages(lp, ref, values, scores, mask, kl_coef=0.1, whiten=False, backend=backend)
    for name, x in zip(PPO_FIELDS, out):
        assert torch.all(x[0] == 0) and torch.all(x[2] == 0), f"{name}: rows with no valid token must be 0"
        assert torch.isfinite(x).all()
    for b, t in ((1, 5), (3, 22)):
        kl = lp[b, t] - ref[b, t]
        a = scores[b] - 0.1 * kl - values[b, t]
        assert torch.allclose(out.kl[b, t], kl)
        assert torch.allclose(out.advantages[b, t], a, atol=1e-6)
        assert torch.allclose(out.returns[b, t], a + values[b, t], atol=1e-6)
    # Whitened: n = 2 works; n = 1 and n = 0 give zeros, never NaN.
    w = rmk.ppo_advantages(lp, ref, values, scores, mask, kl_coef=0.1, backend=backend)
    assert torch.isfinite(w.advantages).all()
    one = mask.clone()
    one[3] = False
    for m in (one, torch.zeros_like(mask)):
        for unbiased in (True, False):
            w = rmk.ppo_advantages(lp, ref, values, scores, m, kl_coef=0.1, unbiased=unbiased, shift_mean=False,
                                   backend=backend)
            assert torch.equal(w.advantages, torch.zeros_like(w.advantages)), "n <= 1 must give zero advantages"


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_backend_empty_batch(backend, device):
    skip_unless_available(backend, device)
    for B, T in ((0, 5), (3, 0), (0, 0)):
        lp, ref, values, scores = make_inputs(B, T, device=device)
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
        out = rmk.ppo_advantages(lp, ref, values, scores, mask, kl_coef=0.1, backend=backend)
        assert all(x.shape == (B, T) and x.dtype == torch.float32 for x in out)
        assert rmk.masked_whiten(values, mask, backend=backend).shape == (B, T)


@pytest.mark.parametrize("backend,device", backend_params())
def test_backend_strided_inputs_and_int_masks(backend, device):
    skip_unless_available(backend, device)
    B, T = _shape(backend, 61)
    lp, ref, values, scores = make_inputs(T, B, device=device)  # transposed views: strides (1, B)
    lp, ref, values = lp.t(), ref.t(), values.t()
    scores = torch.randn(2 * B, device=device)[::2]
    mask = make_mask("holes", B, T, device)
    for m in (mask, mask.int(), mask.float(), mask.to(torch.uint8)):
        out, expect = run_both(backend, device, (lp, ref, values, scores), m, kl_coef=0.1)
        check_outputs(out, expect, torch.float32, f"mask {m.dtype}")


@pytest.mark.parametrize("backend,device", backend_params())
def test_backend_contiguous_inputs_and_a_column_major_mask(backend, device):
    """The opposite of the test above: row-major log-probs and values with a mask that is not
    unit-stride along T (built [T, B] and transposed), in every mask dtype, through
    ``ppo_advantages`` and ``kl_estimate`` (the C++ KL loop's unit-stride path once read such a
    mask with stride 1: mutation testing)."""
    skip_unless_available(backend, device)
    B, T = _shape(backend, 37)
    lp, ref, values, scores = make_inputs(B, T, device=device)
    mask = make_mask("holes", B, T, device).t().contiguous().t()
    assert lp.is_contiguous() and mask.stride(1) != 1
    for m in (mask, mask.int().t().contiguous().t(), mask.float().t().contiguous().t()):
        assert m.stride(1) != 1
        for est in ("k1", "k3"):
            out, expect = run_both(backend, device, (lp, ref, values, scores), m, kl_coef=0.1, kl_estimator=est)
            check_outputs(out, expect, torch.float32, f"mask {m.dtype} {m.stride()} {est}")
            got = rmk.kl_estimate(lp, ref, mask=m, estimator=est, backend=backend)
            want = rmk.kl_estimate(lp, ref, mask=m, estimator=est, backend="reference")
            assert_close(got, want, rtol=1e-5, atol=1e-6, name=f"kl_estimate mask {m.dtype} {est}")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_nan_stays_in_its_row(backend, device):
    skip_unless_available(backend, device)
    B, T = 4, 30
    lp, ref, values, scores = make_inputs(B, T, device=device)
    mask = make_mask("right", B, T, device)
    mask[2] = True
    lp[2, 10] = float("nan")
    lp[3, 0] = float("nan")  # at a masked position of row 3: ignored
    mask[3, 0] = False
    out = rmk.ppo_advantages(lp, ref, values, scores, mask, kl_coef=0.1, whiten=False, backend=backend)
    clean = rmk.ppo_advantages(lp.nan_to_num(0.0), ref, values, scores, mask, kl_coef=0.1, whiten=False,
                               backend=backend)
    for name, x, y in zip(PPO_FIELDS, out, clean):
        others = [0, 1, 3]
        assert torch.isfinite(x[others]).all(), f"{name}: NaN leaked to another row"
        assert torch.equal(x[others], y[others])
    assert torch.isnan(out.advantages[2, :11]).all(), "NaN must reach the positions whose recurrence it enters"
    assert torch.isfinite(out.advantages[2, 11:]).all()


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_nan_and_inf_values(backend, device):
    """NaN/inf in values follow the formula's IEEE arithmetic exactly like the sequential
    loop: with lam = 0, gamma * lam * A_next = 0 * NaN is still NaN, so a NaN reaches every
    valid position left of it; an inf V reaches the previous valid position through V_next
    (inf), but V_next further left is another position's value, not 0 * inf. The parallel
    scans of the GPU paths must give the same NaN/inf pattern."""
    skip_unless_available(backend, device)
    T = 40
    lp, ref, values, scores = make_inputs(3, T, device=device)
    mask = torch.ones(3, T, dtype=torch.bool, device=device)
    mask[:, 20:23] = False  # a hole just left of the bad value
    values[0, 23] = float("nan")
    values[1, 23] = float("inf")
    for gamma, lam in ((0.9, 0.0), (0.9, 0.5), (0.0, 0.5)):
        out, expect = run_both(backend, device, (lp, ref, values, scores), mask, kl_coef=0.1, gamma=gamma, lam=lam,
                               whiten=False)
        for name, x, e in zip(PPO_FIELDS, out, expect):
            what = f"{name} gamma={gamma} lam={lam}"
            inf = torch.isinf(e)
            assert torch.equal(torch.isinf(x), inf) and torch.equal(x[inf], e[inf]), f"{what}: inf pattern"
            assert_close(x.masked_fill(inf, 0), e.masked_fill(inf, 0), rtol=2e-5, atol=2e-5, name=what)
        assert torch.isfinite(out.advantages[2]).all(), "a clean row stays clean"
        assert torch.isfinite(out.advantages[:2, 24:]).all(), "nothing right of the bad value changes"
    nan = torch.isnan(out.advantages[0])
    assert nan[:20].all() and nan[23] and not nan[20:23].any()


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_inputs_requiring_grad(backend, device):
    skip_unless_available(backend, device)
    B, T = 3, 20
    inputs = [t.requires_grad_() for t in make_inputs(B, T, device=device)]
    mask = make_mask("right", B, T, device)
    out = rmk.ppo_advantages(*inputs, mask, kl_coef=0.1, backend=backend)
    assert not any(x.requires_grad for x in out), "the outputs are targets: no gradient"
    assert not rmk.masked_whiten(inputs[2], mask, backend=backend).requires_grad


@pytest.mark.parametrize("backend,device", backend_params())
def test_outputs_written_everywhere(backend, device):
    """The kernels must write every element (masked ones included): check against poisoned
    memory reuse by running twice into fresh allocations after a poisoned one."""
    skip_unless_available(backend, device)
    B, T = _shape(backend, 50)
    inputs = make_inputs(B, T, device=device)
    mask = make_mask("holes", B, T, device)
    for _ in range(2):
        poison_(torch.empty(4 * B * T + 64, device=device))  # the allocator may hand this memory out again
        out, ref = run_both(backend, device, inputs, mask, kl_coef=0.1)
        check_outputs(out, ref, torch.float32, "after poison")


# ---------------------------------------------------------------------------------------
# masked_whiten
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_whiten(backend, device, shift_mean, unbiased):
    """Against torch.var in float64 of the same input values: float32 arithmetic whatever the
    input dtype (a bf16 / fp16 input is read exactly), so the float32 tolerance for all."""
    skip_unless_available(backend, device)
    B, T = _shape(backend, 203)
    # numpy (the Triton interpreter's engine) has no bfloat16
    lowp = (torch.float16,) if backend == "triton" and device == "cpu" else (torch.bfloat16, torch.float16)
    for dtype in (torch.float32, *lowp):
        x = (3 + 2 * torch.randn(B, T, device=device)).to(dtype)
        mask = make_mask("mixed", B, T, device)
        out = rmk.masked_whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased, backend=backend)
        sel = x[mask].double()
        mean = sel.mean()
        var = sel.var(unbiased=unbiased)
        expect = (x.double() - mean) * torch.rsqrt(var + 1e-8) + (0 if shift_mean else mean)
        expect = torch.where(mask, expect, torch.zeros_like(expect))
        assert out.dtype == torch.float32
        assert_close(out, expect, rtol=2e-5, atol=2e-5, name=f"masked_whiten of {dtype} vs torch.var")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_masked_whiten_shapes_and_small_n(backend, device):
    skip_unless_available(backend, device)
    x = torch.randn(2, 3, 7, device=device, dtype=torch.float64)
    mask = torch.rand(2, 3, 7, device=device) > 0.4
    out = rmk.masked_whiten(x, mask, backend=backend)
    expect = rmk.masked_whiten(x.reshape(6, 7), mask.reshape(6, 7), backend="reference").reshape(2, 3, 7)
    assert out.shape == x.shape and out.dtype == torch.float64
    assert_close(out, expect, rtol=1e-10, atol=1e-10, name="3-D x")
    v = torch.randn(11, device=device)
    mv = torch.rand(11, device=device) > 0.5
    mv[0] = True
    assert_close(rmk.masked_whiten(v, mv, backend=backend), rmk.masked_whiten(v, mv, backend="reference"),
                 rtol=2e-5, atol=2e-5, name="1-D x")
    for n in (0, 1):
        m = torch.zeros(4, 9, dtype=torch.bool, device=device)
        m.view(-1)[:n] = True
        for unbiased in (True, False):
            o = rmk.masked_whiten(torch.randn(4, 9, device=device), m, unbiased=unbiased, shift_mean=False,
                                  backend=backend)
            assert torch.equal(o, torch.zeros_like(o)), f"n={n}: zeros, never NaN"


# ---------------------------------------------------------------------------------------
# opcheck, torch.compile
# ---------------------------------------------------------------------------------------
def _op_samples(device):
    """(op name, arguments but the backend) of each op of this file."""
    B, T = 3, 19
    lp, ref, values, scores = make_inputs(B, T, device=device)
    mask = make_mask("holes", B, T, device)
    scores_acc = scores.float()
    x = torch.randn(B, T, device=device)
    totals = torch.tensor([7.0, 1.5], dtype=torch.float64, device=device)
    sq = torch.tensor([3.0], dtype=torch.float64, device=device)
    return list(dict(
        ppo_gae=(lp, ref, values, scores, mask, 0.1, 1.0, 0.95, "k3", 5.0, None),
        ppo_advantages=(lp, ref, values, scores, mask, 0.1, 0.99, 0.95, "k1", None, 2.0, True, False, True, 1e-8),
        masked_whiten=(x, mask, True, False, 1e-8),
        masked_row_stats=(x, mask),
        masked_centered_sq=(x, mask, totals),
        masked_whiten_apply=(x, mask, totals, sq, False, True, 1e-8),
        ppo_gae_kernel=(lp, ref, values, scores_acc, mask, 0.1, 1.0, 0.95, 3, 0.0, 10.0, 2.0),
        masked_row_stats_kernel=(x, mask),
        masked_centered_sq_kernel=(x, mask, totals),
        masked_whiten_apply_kernel=(x, mask, totals, sq, True, True, 1e-8),
    ).items())


test_opcheck = opcheck_test(_op_samples)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    skip_unless_available(backend, "cpu")
    B, T = 4, 33
    lp, ref, values, scores = make_inputs(B, T)
    mask = make_mask("holes", B, T)

    def f(lp, ref, values, scores, mask):
        out = rmk.ppo_advantages(lp, ref, values, scores, mask, kl_coef=0.1, kl_estimator="low_var_kl",
                                 score_clip=1.0, backend=backend)
        return out.advantages, out.returns, rmk.masked_whiten(out.rewards, mask, shift_mean=False, backend=backend)

    assert_compiled_matches(f, lp, ref, values, scores, mask)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def _good(B=3, T=5):
    lp, ref, values, scores = make_inputs(B, T)
    return dict(logprobs=lp, ref_logprobs=ref, values=values, scores=scores,
                mask=torch.ones(B, T, dtype=torch.bool))


BAD = [
    (dict(ref_logprobs=torch.zeros(3, 6)), ValueError, "ref_logprobs"),
    (dict(values=torch.zeros(3, 5, 1)), ValueError, "values"),
    (dict(values=torch.zeros(2, 5)), ValueError, "values"),
    (dict(logprobs=torch.zeros(3, 5, dtype=torch.int64)), TypeError, "logprobs"),
    (dict(scores=torch.zeros(4)), ValueError, "scores"),
    (dict(scores=torch.zeros(3, 1)), ValueError, "scores"),
    (dict(mask=torch.ones(3, 4)), ValueError, "mask"),
    (dict(mask=[[1] * 5] * 3), TypeError, "mask"),
    (dict(logprobs=None), TypeError, "logprobs"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator"),
    (dict(kl_estimator=None), TypeError, "kl_estimator"),
    (dict(gamma=-0.1), ValueError, "gamma"),
    (dict(lam=1.5), ValueError, "lam"),
    (dict(lam=-0.01), ValueError, "lam"),
    (dict(lam=float("nan")), ValueError, "lam"),
    (dict(kl_coef="0.1"), TypeError, "kl_coef"),
    (dict(kl_coef=float("inf")), ValueError, "kl_coef"),
    (dict(kl_clamp=0.0), ValueError, "kl_clamp"),
    (dict(score_clip=-1.0), ValueError, "score_clip"),
    (dict(whiten=1), TypeError, "whiten"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(process_group="world"), (ValueError, TypeError), "process_group"),
    (dict(backend="tpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("change,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs(change, exc, name):
    kw = _good()
    kw.update(kl_coef=0.1)
    kw.update(change)
    pos = [kw.pop(k) for k in ("logprobs", "ref_logprobs", "values", "scores", "mask")]
    with pytest.raises(exc, match=name):
        rmk.ppo_advantages(*pos, **kw)


def test_bad_inputs_masked_whiten():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mask"):
        rmk.masked_whiten(x, torch.ones(3, 5))
    with pytest.raises(TypeError, match="x"):
        rmk.masked_whiten(x.long(), torch.ones(3, 4))
    with pytest.raises(ValueError, match="x"):
        rmk.masked_whiten(torch.tensor(1.0), torch.tensor(True))
    with pytest.raises(TypeError, match="unbiased"):
        rmk.masked_whiten(x, torch.ones(3, 4), unbiased="yes")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        rmk.masked_whiten(x, torch.ones(3, 4), backend="cuda")


def test_kernel_op_rejects_bad_arguments():
    """The C++ kernels check what the Python layer guarantees (a second line of defence)."""
    if not rmk._ext.CPP_AVAILABLE:
        pytest.fail("the C++ extension is not built")
    lp, ref, values, scores = make_inputs(2, 3)
    with pytest.raises(TypeError, match="mask must be bool"):
        torch.ops.rmkernels.ppo_gae_kernel(lp, ref, values, scores, torch.ones(2, 3), 0.1, 1.0, 0.9, 0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="estimator"):
        torch.ops.rmkernels.ppo_gae_kernel(lp, ref, values, scores, torch.ones(2, 3, dtype=torch.bool), 0.1, 1.0, 0.9,
                                           7, 0.0, 0.0, 0.0)
