"""csrc/cuda/ppo.cu's launchers run on the CPU (AddressSanitizer), against the reference
backend: PPO GAE with every KL estimator and option, mask kinds (empty, single-token, full
rows, holes), dtypes, strided inputs, rows over several 1024-position chunks, the long-row
segment mode (3 launches) at the bindings' segment length and scaled down, B = 0 / T = 0; the
three whitening launchers chained as the bindings chain them; the plain GAE (gae_kernel) and
KL estimate (kl_estimate_kernel) launchers against docs/ops.md section 3's loop and formulas."""
import pytest
import torch
from test_gae import assert_overflows_as_the_loop, last_valid, loop_gae, overflow_inputs
from utils import MASK_KINDS, assert_close, make_mask, tolerance

import rmkernels as rmk
from rmkernels import _codes

from .emu import DTYPE_CODE, Program

pytestmark = pytest.mark.cuda_on_cpu

ESTIMATORS = ["k1", "abs", "k2", "k3", "kl", "mse", "low_var_kl"]
FIELDS = ("advantages", "returns", "rewards", "kl")


def make_inputs(B, T, dtype=torch.float32):
    lp = -torch.rand(B, T) * 3
    ref = lp + 0.5 * torch.randn(B, T)
    values = torch.randn(B, T)
    scores = 2 * torch.randn(B)
    return lp.to(dtype), ref.to(dtype), values.to(dtype), scores


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _estimator_args(name, kl_clamp, score_clip):
    """The launcher's (estimator, x_clamp, kl_clamp, score_clip) for a public estimator name
    (rmkernels/_codes.py)."""
    low_var = name == "low_var_kl"
    return (int(_codes.KL_ESTIMATORS[name]), _codes.LOW_VAR_X_CLAMP if low_var else 0.0,
            _codes.LOW_VAR_KL_CLAMP if low_var else float(kl_clamp or 0.0), float(score_clip or 0.0))


def launch_gae(lp, ref, values, scores, mask, *, kl_coef=0.05, gamma=1.0, lam=0.95, kl_estimator="k1",
               kl_clamp=None, score_clip=None, seg_len=None, variant="asan"):
    """(advantages, returns, rewards, kl, stats [B, 2]) from launch_ppo_gae; seg_len: the
    segment mode with that segment length (the binding uses SEGMENT_T for long rows)."""
    dtype = values.dtype
    acc = _acc(dtype)
    B, T = values.shape
    n_seg = 1 if seg_len is None else max(1, -(-T // seg_len))
    prog = Program()
    est, x_clamp, kc, sc = _estimator_args(kl_estimator, kl_clamp, score_clip)
    outs = [prog.out((B, T), acc) for _ in range(4)]
    stats = prog.out((B, n_seg, 2), torch.float64)
    if seg_len is None:
        scratch = [None, None, None, None]
    else:
        scratch = [prog.out((B, n_seg, 4), acc), prog.out((B, n_seg), torch.int64, fill=0x5A),
                   prog.out((B, n_seg, 2), acc), prog.out((B,), torch.int64, fill=0x5A)]
    prog.call("rmk_ppo_gae", DTYPE_CODE[dtype], prog.inp(lp), lp.stride(0), lp.stride(1), prog.inp(ref),
              ref.stride(0), ref.stride(1), prog.inp(values), values.stride(0), values.stride(1),
              prog.inp(scores.to(acc)), prog.inp(mask), mask.stride(0), mask.stride(1), B, T, kl_coef, gamma, lam,
              est, x_clamp, kc, sc, *outs, stats, n_seg, seg_len or 0, *scratch)
    res = prog.run(variant)
    assert res.rcs == [0], res.rcs
    return [res[o] for o in outs] + [res[stats].sum(1)]


def reference_gae(lp, ref, values, scores, mask, **kw):
    kw.pop("seg_len", None)
    kw.pop("variant", None)
    out = rmk.ppo_advantages(lp, ref, values, scores.to(_acc(values.dtype)), mask, whiten=False,
                             backend="reference", **{"kl_coef": 0.05, **kw})
    adv = out.advantages.double()
    stats = torch.stack([mask.sum(1).double(), (adv * mask).sum(1)], 1)
    return list(out) + [stats]


def check_gae(inputs, mask, what="", **kw):
    got = launch_gae(*inputs, mask, **kw)
    want = reference_gae(*inputs, mask, **kw)
    dtype = inputs[2].dtype
    rtol, atol = tolerance(dtype) if dtype in (torch.float32, torch.float64) else tolerance(torch.float32)
    for name, a, e in zip(FIELDS, got, want):
        assert a.dtype == e.dtype, f"{name}: {a.dtype} != {e.dtype}"
        assert_close(a, e, rtol=rtol, atol=atol, name=f"{name} {what}")
    T = mask.shape[1]
    assert_close(got[4], want[4], rtol=rtol, atol=atol * max(1.0, T ** 0.5), name=f"stats {what}")


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("est", ESTIMATORS)
def test_gae_estimators_masks(est, kind):
    B, T = 9, 97
    inputs = make_inputs(B, T)
    check_gae(inputs, make_mask(kind, B, T), f"{est} {kind}", kl_estimator=est, gamma=0.99, lam=0.9)


OPTIONS = [{"kl_clamp": 0.3}, {"score_clip": 1.0}, {"gamma": 0.5, "lam": 0.0}, {"gamma": 1.0, "lam": 1.0},
           {"kl_coef": 0.0}, {"kl_estimator": "k3", "kl_clamp": 0.2, "score_clip": 0.5}]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_gae_options(opts):
    B, T = 6, 45
    check_gae(make_inputs(B, T), make_mask("holes", B, T), str(opts), **opts)


@pytest.mark.parametrize("T", [0, 1, 2, 17, 1025, 2500])
def test_gae_lengths(T):
    """Rows over several 1024-position chunks of the block walk (1025: one position past)."""
    B = 5
    check_gae(make_inputs(B, T), make_mask("mixed", B, T), f"T={T}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_gae_dtypes(dtype):
    B, T = 5, 300
    check_gae(make_inputs(B, T, dtype), make_mask("holes", B, T), str(dtype), kl_estimator="k3")


def test_gae_strided_inputs():
    B, T = 4, 150
    lp, ref, values, scores = make_inputs(B, 2 * T)
    mask = make_mask("left", B, 2 * T)
    check_gae((lp[:, ::2], ref.t().contiguous().t()[:, :T], values[:, 1::2], scores), mask[:, T:], "strided")
    cm = make_mask("right", T, B).t()  # a column-major mask
    lp, ref, values, scores = make_inputs(B, T)
    check_gae((lp.t().contiguous().t(), ref, values, scores), cm, "column-major")


@pytest.mark.parametrize("seg_len,T", [(300, 1025), (1024, 1025), (1, 19), (5, 23), (4096, 2 * 4096 + 5)])
@pytest.mark.parametrize("kind", ["holes", "mixed"])
def test_gae_segment_mode(seg_len, T, kind):
    """The long-row mode: per-segment aggregates, one thread per row composing the carries,
    each segment with its carries. (4096, 8197) is what the binding launches for B = 3
    long rows on a GPU with more than 1 SM (SEGMENT_T = 4096); the others scale it down."""
    assert _codes.SEGMENT_T == 4096
    B = 3 if T > 5000 else 5
    inputs = make_inputs(B, T)
    mask = make_mask(kind, B, T)
    if T >= 300:
        mask[3 % B, : T - 2] = False  # the last valid positions in the last segment only
    check_gae(inputs, mask, f"seg_len={seg_len}", seg_len=seg_len, gamma=0.99, lam=0.95, kl_estimator="k2")


def test_gae_segment_mode_many_rows():
    """More rows than the 128 threads of one carry block: the carry kernel's grid has 2 blocks
    (and the last one exits threads past B)."""
    B, T = 129, 4
    check_gae(make_inputs(B, T), make_mask("mixed", B, T), "carry grid", seg_len=2)


def test_gae_wide_batch():
    """Many one-block rows (the binding's launch for wide batches, scaled down from 4096)."""
    B, T = 200, 33
    check_gae(make_inputs(B, T), make_mask("mixed", B, T), "wide")


@pytest.mark.parametrize("gamma,T", [(1.1, 1500), (2.0, 200), (1e30, 40)])
def test_gae_discount_above_one_overflows_as_the_loop_does(gamma, T):
    """gamma > 1 (tests/test_gae.py's test of the same name): the chunk and block scans and the
    segments' carries compose overflowed products of discounts (alpha = (gamma lam)^k); inf times
    a state of 0 gave NaN where the loop gives 0, a finite value or inf. ppo_gae with the score
    (the only reward: kl_coef 0) and plain GAE, by rows and in segments."""
    r, mask = overflow_inputs(T)
    B = r.shape[0]
    values = torch.zeros(B, T)
    exact, _ = loop_gae(r, values, mask, gamma, 1.0)
    scores = torch.rand(B) + 0.5
    exact_s, _ = loop_gae(torch.zeros(B, T).index_put_((torch.arange(B), last_valid(mask)), scores), values, mask,
                          gamma, 1.0)
    lp = torch.randn(B, T)
    for seg_len in (None, 256, 32):
        adv, ret = launch_plain_gae(r, values, mask, gamma, 1.0, seg_len=seg_len)
        assert_overflows_as_the_loop(adv, exact, f"gae advantages seg_len={seg_len}")
        assert_overflows_as_the_loop(ret, exact, f"gae returns seg_len={seg_len}")
        adv = launch_gae(lp, lp, values, scores, mask, kl_coef=0.0, gamma=gamma, lam=1.0, seg_len=seg_len)[0]
        assert_overflows_as_the_loop(adv, exact_s, f"ppo_gae advantages seg_len={seg_len}")


def test_gae_empty_batch_and_bad_arguments():
    prog = Program()
    z = prog.inp(torch.randn(0, 4))
    m = prog.inp(torch.ones(0, 4, dtype=torch.bool))
    base = [0, z, 4, 1, z, 4, 1, z, 4, 1, prog.inp(torch.randn(0)), m, 4, 1, 0, 4, 0.05, 1.0, 0.95]
    outs = [prog.out((0, 4), torch.float32) for _ in range(4)] + [prog.out((0, 2), torch.float64)]
    prog.call("rmk_ppo_gae", *base, 0, 0.0, 0.0, 0.0, *outs, 1, 0, None, None, None, None)
    lp = prog.inp(torch.randn(2, 4))
    mm = prog.inp(torch.ones(2, 4, dtype=torch.bool))
    sc = prog.inp(torch.randn(2))
    bad = [0, lp, 4, 1, lp, 4, 1, lp, 4, 1, sc, mm, 4, 1, 2, 4, 0.05, 1.0, 0.95]
    outs2 = [prog.out((2, 4), torch.float32) for _ in range(4)] + [prog.out((2, 2), torch.float64)]
    prog.call("rmk_ppo_gae", *bad, 4, 0.0, 0.0, 0.0, *outs2, 1, 0, None, None, None, None)  # estimator 4
    prog.call("rmk_ppo_gae", *bad, 0, 0.0, 0.0, 0.0, *outs2, 2, 2, None, None, None, None)  # no scratch
    prog.call("rmk_ppo_gae", *bad, 0, 0.0, 0.0, 0.0, *outs2, 0, 2, None, None, None, None)  # n_seg 0
    assert prog.run().rcs == [0, 1, 1, 1]


@pytest.mark.parametrize("seg_len", [None, 100])
def test_gae_race_free_under_thread_sanitizer(seg_len):
    B, T = 3, 300
    check_gae(make_inputs(B, T), make_mask("holes", B, T), "tsan", seg_len=seg_len, variant="tsan")


# ---- whitening ------------------------------------------------------------------------
def launch_whiten(x, mask, shift_mean, unbiased, eps=1e-8, variant="asan"):
    """The bindings' chain: per-row (count, sum) -> host totals -> per-row centered squares
    -> host sum -> apply. Returns (stats, sq rows, out)."""
    B, T = x.shape
    dt = DTYPE_CODE[x.dtype]
    prog = Program()
    stats = prog.out((B, 2), torch.float64)
    prog.call("rmk_masked_row_stats", dt, prog.inp(x), x.stride(0), x.stride(1), prog.inp(mask), mask.stride(0),
              mask.stride(1), B, T, stats)
    res = prog.run(variant)
    assert res.rcs == [0]
    st = res[stats]
    totals = st.sum(0)
    prog = Program()
    sq = prog.out((B,), torch.float64)
    prog.call("rmk_masked_centered_sq", dt, prog.inp(x), x.stride(0), x.stride(1), prog.inp(mask), mask.stride(0),
              mask.stride(1), B, T, prog.inp(totals), sq)
    res = prog.run(variant)
    assert res.rcs == [0]
    sq_rows = res[sq]
    prog = Program()
    out = prog.out((B, T), _acc(x.dtype))
    prog.call("rmk_masked_whiten_apply", dt, prog.inp(x), x.stride(0), x.stride(1), prog.inp(mask), mask.stride(0),
              mask.stride(1), B, T, prog.inp(totals), prog.inp(sq_rows.sum(0, keepdim=True)), shift_mean, unbiased,
              eps, out)
    res = prog.run(variant)
    assert res.rcs == [0]
    return st, sq_rows, res[out]


def check_whiten(x, mask, shift_mean=True, unbiased=True, variant="asan"):
    st, sq_rows, out = launch_whiten(x, mask, shift_mean, unbiased, variant=variant)
    x64, m = x.double(), mask
    want_st = torch.stack([m.sum(1).double(), (x64 * m).sum(1)], 1)
    T = x.shape[1]
    assert_close(st, want_st, rtol=1e-12, atol=1e-9 * max(1, T), name="row stats")
    n = m.sum().double()
    mean = (x64 * m).sum() / n if n > 0 else torch.zeros((), dtype=torch.float64)
    assert_close(sq_rows, (((x64 - mean) ** 2) * m).sum(1), rtol=1e-10, atol=1e-9 * max(1, T), name="centered sq")
    want = rmk.masked_whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased, backend="reference")
    rtol, atol = tolerance(x.dtype) if x.dtype in (torch.float32, torch.float64) else tolerance(torch.float32)
    assert out.dtype == want.dtype
    assert_close(out, want, rtol=rtol, atol=atol, name="whitened")


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_chain(shift_mean, unbiased):
    B, T = 7, 97
    x = torch.randn(B, T) * 3 + 1
    check_whiten(x, make_mask("holes", B, T), shift_mean, unbiased)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_whiten_dtypes_and_long_rows(dtype):
    """T = 2500: the apply kernel's 8 blocks per row stride over T (8 * 256 < 2500)."""
    B, T = 3, 2500
    check_whiten((torch.randn(B, T) * 2).to(dtype), make_mask("mixed", B, T))


def test_whiten_strided_small_n_and_empty():
    B, T = 5, 60
    big = torch.randn(B, 2 * T)
    check_whiten(big[:, ::2], make_mask("left", B, 2 * T)[:, ::2])
    one = torch.zeros(B, T, dtype=torch.bool)
    one[2, 7] = True  # n = 1: all zeros, never NaN
    st, sq, out = launch_whiten(torch.randn(B, T), one, True, True)
    assert (out == 0).all()
    st, sq, out = launch_whiten(torch.randn(B, 0), torch.zeros(B, 0, dtype=torch.bool), True, True)
    assert (st == 0).all() and (sq == 0).all() and out.shape == (B, 0)


def test_whiten_race_free_under_thread_sanitizer():
    B, T = 3, 600
    check_whiten(torch.randn(B, T), make_mask("holes", B, T), variant="tsan")


# ---- gae_kernel / kl_estimate_kernel launchers (docs/ops.md section 4) --------------------------
def gae_loop(rewards, values, mask, gamma, lam):
    """docs/ops.md section 3's mask-aware recurrence written as the plain loop over valid positions
    from the right (fp64): V_next and A_next are those of the next valid position (0 past the
    last); 0 at masked positions."""
    r, v, m = rewards.double(), values.double(), mask.bool()
    B, T = v.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        a_next = v_next = 0.0
        for t in reversed(range(T)):
            if not m[b, t]:
                continue
            delta = r[b, t].item() + gamma * v_next - v[b, t].item()
            a_next = delta + gamma * lam * a_next
            v_next = v[b, t].item()
            adv[b, t] = a_next
    return adv, (adv + v) * m


def launch_plain_gae(rewards, values, mask, gamma, lam, seg_len=None, variant="asan", returns=True):
    """(advantages, returns) of launch_gae; without ``returns`` a null returns pointer (REINFORCE++'s
    use): (advantages, None)."""
    dtype = values.dtype
    acc = _acc(dtype)
    B, T = values.shape
    n_seg = 1 if seg_len is None else max(1, -(-T // seg_len))
    prog = Program()
    adv, ret = prog.out((B, T), acc), (prog.out((B, T), acc) if returns else None)
    if seg_len is None:
        scratch = [None, None, None, None]
    else:
        scratch = [prog.out((B, n_seg, 4), acc), prog.out((B, n_seg), torch.int64, fill=0x5A),
                   prog.out((B, n_seg, 2), acc), prog.out((B,), torch.int64, fill=0x5A)]
    prog.call("rmk_gae", DTYPE_CODE[dtype], prog.inp(rewards), rewards.stride(0), rewards.stride(1),
              prog.inp(values), values.stride(0), values.stride(1), prog.inp(mask), mask.stride(0), mask.stride(1),
              B, T, gamma, lam, adv, ret, n_seg, seg_len or 0, *scratch)
    res = prog.run(variant)
    assert res.rcs == [0], res.rcs
    return res[adv], (res[ret] if returns else None)


def check_plain_gae(rewards, values, mask, gamma=0.99, lam=0.95, what="", **kw):
    got = launch_plain_gae(rewards, values, mask, gamma, lam, **kw)
    want = gae_loop(rewards, values, mask, gamma, lam)
    if hasattr(rmk, "gae"):  # the library's reference, when this checkout has the public op
        ref = rmk.gae(rewards, values, mask, gamma=gamma, lam=lam, backend="reference")
        for a, e in zip(ref, want):
            assert_close(a, e, rtol=1e-5, atol=1e-5, name=f"reference vs loop {what}")
    dtype = values.dtype
    rtol, atol = tolerance(dtype) if dtype in (torch.float32, torch.float64) else tolerance(torch.float32)
    for name, a, e in zip(("advantages", "returns"), got, want):
        assert a.dtype == _acc(dtype)
        assert_close(a, e, rtol=rtol, atol=atol, name=f"{name} {what}")


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("T", [0, 1, 45, 1025])
def test_plain_gae(kind, T):
    B = 5
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    check_plain_gae(rewards, values, make_mask(kind, B, T), what=f"{kind} T={T}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_plain_gae_dtypes_strided(dtype):
    B, T = 4, 130
    big = torch.randn(B, 2 * T).to(dtype)
    values = torch.randn(T, B).to(dtype).t()
    check_plain_gae(big[:, ::2], values, make_mask("holes", T, B).t(), gamma=1.0, lam=1.0, what=str(dtype))


@pytest.mark.parametrize("seg_len,T", [(300, 1025), (1, 19), (4096, 2 * 4096 + 5)])
def test_plain_gae_segment_mode(seg_len, T):
    B = 3
    check_plain_gae(torch.randn(B, T), torch.randn(B, T), make_mask("mixed", B, T), seg_len=seg_len,
                    what=f"seg_len={seg_len}")


@pytest.mark.parametrize("seg_len,T", [(None, 97), (300, 1025)])
def test_plain_gae_without_returns(seg_len, T):
    """A null returns pointer: only the advantages are written, the same as with returns (bit for
    bit; a write through the null pointer would stop the worker)."""
    B = 4
    rewards, values, mask = torch.randn(B, T), torch.randn(B, T), make_mask("holes", B, T)
    adv, _ = launch_plain_gae(rewards, values, mask, 0.99, 1.0, seg_len=seg_len)
    adv_only, none = launch_plain_gae(rewards, values, mask, 0.99, 1.0, seg_len=seg_len, returns=False)
    assert none is None and torch.equal(adv_only, adv)


def test_plain_gae_race_free_under_thread_sanitizer():
    B, T = 3, 300
    check_plain_gae(torch.randn(B, T), torch.randn(B, T), make_mask("holes", B, T), seg_len=100, variant="tsan")


def kl_formula(lp, ref, mask, est, x_clamp, kl_clamp):
    x = lp.double() - ref.double()
    if x_clamp > 0:
        x = x.clamp(-x_clamp, x_clamp)
    k = {0: x, 1: x.abs(), 2: 0.5 * x * x, 3: torch.exp(-x) - 1 + x}[est]
    if kl_clamp > 0:
        k = k.clamp(-kl_clamp, kl_clamp)
    return k if mask is None else k * mask


def launch_kl(lp, ref, mask, est, x_clamp=0.0, kl_clamp=0.0, variant="asan"):
    B, T = lp.shape
    prog = Program()
    kl = prog.out((B, T), _acc(lp.dtype))
    mbuf = prog.inp(mask) if mask is not None else None
    m0, m1 = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    prog.call("rmk_kl_estimate", DTYPE_CODE[lp.dtype], prog.inp(lp), lp.stride(0), lp.stride(1), prog.inp(ref),
              ref.stride(0), ref.stride(1), mbuf, m0, m1, B, T, est, x_clamp, kl_clamp, kl)
    res = prog.run(variant)
    assert res.rcs == [0], res.rcs
    return res[kl]


@pytest.mark.parametrize("est", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_kl_estimate(est, dtype):
    code, x_clamp, kc, _ = _estimator_args(est, 0.4 if est == "k2" else None, None)
    for B, T in ((5, 97), (2, 1025), (0, 7), (3, 0)):
        lp = (-torch.rand(B, T) * 3).to(dtype)
        ref = (lp.float() + torch.randn(B, T)).to(dtype)
        for mask in (make_mask("holes", B, T), None):
            got = launch_kl(lp, ref, mask, code, x_clamp, kc)
            want = kl_formula(lp, ref, mask, code, x_clamp, kc)
            if hasattr(rmk, "kl_estimate") and B and T and est != "low_var_kl" and not kc:
                lib = rmk.kl_estimate(lp, ref, mask=mask, estimator=est, backend="reference")
                assert_close(lib, want, rtol=1e-5, atol=1e-5, name="reference vs formula")
            r, a = tolerance(dtype) if dtype in (torch.float32, torch.float64) else tolerance(torch.float32)
            assert got.dtype == _acc(dtype)
            assert_close(got, want, rtol=r, atol=a, name=f"kl {est} {dtype}")


def test_kl_estimate_strided_and_tsan():
    B, T = 4, 600
    lp, ref = torch.randn(T, B).t(), torch.randn(B, 2 * T)[:, ::2]
    mask = make_mask("left", B, T)
    got = launch_kl(lp, ref, mask, 3, variant="tsan")
    assert_close(got, kl_formula(lp, ref, mask, 3, 0.0, 0.0), rtol=2e-5, atol=2e-5, name="kl strided")
