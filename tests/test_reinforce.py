"""REINFORCE++ and ReMax advantages in one op (``rmk.reinforce_pp_advantages``,
``rmk.remax_advantages``; docs/ops.md section 5).

The reference is checked against verl 0.9's formulas written here as verl writes them (the
REINFORCE++ loop over time steps with ``masked_whiten``, ReMax's flip-cumsum-flip); each backend
against the reference on ragged batches (rows shorter and longer than the kernels' blocks, empty
and single-token rows, holes, left padding, strided rewards, column-major and int/float masks,
mask None), gamma 0 / 0.9 / 1, both variances, fp32/fp64/bf16; the edges (B = 0, T = 0, at most
one valid token); NaN; opcheck, torch.compile, the eager path, bad inputs and direct op calls.
The CUDA kernel runs through the CUDA-on-CPU layer in tests/cuda_on_cpu/test_reinforce_kernels.py.

Triton tests run under TRITON_INTERPRET=1 in their own process (``-m triton``).
"""
import pytest
import torch
from test_group_advantages import verl_reinforce_pp_returns
from utils import (
    MASK_KINDS,
    TRITON_INTERPRET,
    assert_close,
    assert_compiled_matches,
    backend_params,
    cpu_backend_params,
    make_mask,
    opcheck_test,
    skip_unless_available,
    tolerance,
)

import rmkernels as rmk


def verl_reinforce_pp(token_level_rewards, response_mask, gamma):
    """verl 0.9 compute_reinforce_plus_plus_outcome_advantage: the loop over time steps
    (test_group_advantages.verl_reinforce_pp_returns), then verl_F.masked_whiten (unbiased
    variance, eps 1e-8) and ``* response_mask``."""
    returns = verl_reinforce_pp_returns(token_level_rewards, response_mask, gamma)
    mean = (returns * response_mask).sum() / response_mask.sum()
    var = (((returns - mean) ** 2) * response_mask).sum() / response_mask.sum()
    var = var * response_mask.sum() / (response_mask.sum() - 1)
    return (returns - mean) * torch.rsqrt(var + 1e-8) * response_mask, returns


def verl_remax(token_level_rewards, reward_baselines, response_mask):
    """verl 0.9 compute_remax_outcome_advantage."""
    returns = (token_level_rewards * response_mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    return returns - reward_baselines.unsqueeze(-1) * response_mask, returns


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reference_matches_verl(gamma):
    B, T = 9, 41
    r = torch.randn(B, T, dtype=torch.float64)
    mask = make_mask("mixed", B, T)
    adv, ret = rmk.reinforce_pp_advantages(r, mask, gamma=gamma, backend="reference")
    w_adv, w_ret = verl_reinforce_pp(r, mask.double(), gamma)
    assert_close(ret, w_ret, rtol=1e-12, atol=1e-12, name="reinforce++ returns")
    assert_close(adv, w_adv, rtol=1e-10, atol=1e-10, name="reinforce++ advantages")
    base = torch.randn(B, dtype=torch.float64)
    adv, ret = rmk.remax_advantages(r, base, mask, backend="reference")
    w_adv, w_ret = verl_remax(r, base, mask.double())
    assert_close(ret, w_ret, rtol=1e-12, atol=1e-12, name="remax returns")
    assert_close(adv, w_adv, rtol=1e-12, atol=1e-12, name="remax advantages")


def test_reference_is_returns_then_masked_whiten():
    """REINFORCE++'s returns are rmk.reinforce_pp_returns, its advantages rmk.masked_whiten of them
    (population variance with unbiased=False: OpenRLHF's global whitening)."""
    B, T = 13, 29
    r = torch.randn(B, T)
    mask = make_mask("holes", B, T)
    for unbiased in (True, False):
        for eps in (1e-8, 0.5):
            adv, ret = rmk.reinforce_pp_advantages(r, mask, gamma=0.95, unbiased=unbiased, eps=eps,
                                                   backend="reference")
            want_ret = rmk.reinforce_pp_returns(r, mask, gamma=0.95, backend="reference")
            assert torch.equal(ret, want_ret)
            want = rmk.masked_whiten(want_ret, mask, unbiased=unbiased, eps=eps, backend="reference")
            assert torch.equal(adv, want)


# ---------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------
def _sizes(backend):
    # the interpreter runs a program per row, each ~70 ms at T = 45: fewer rows there
    return [(1, 5), (7, 16), (9 if TRITON_INTERPRET else 33, 45), (3, 1100)] if backend == "triton" else \
        [(1, 5), (59, 33), (97, 130), (1025, 7), (5, 2100)]


def _dtypes(backend):
    return [torch.float32, torch.float64] if backend == "triton" else [torch.float32, torch.float64, torch.bfloat16]


def scan_atol(T):
    """The absolute tolerance of float32 returns over T positions between two summation orders
    (the backends' parallel scans against the reference's sequential recurrence): the rounding
    of a sum of T terms grows with T (about 6e-8 * T for these unit-variance rewards, whose
    returns are about sqrt(T)); 4e-7 * T leaves a factor ~6, and never below 1e-5."""
    return max(1e-5, 4e-7 * T)


def _mask_layouts(mask, i):
    """The mask as bool, column-major bool, int64 or float32 (the public ops accept any)."""
    return [mask, mask.t().contiguous().t(), mask.long(), mask.float()][i % 4]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("remax,unbiased", [(False, True), (False, False), (True, None)],
                         ids=["reinforce_pp-unbiased", "reinforce_pp-biased", "remax"])
def test_backend_matches_reference(backend, device, remax, unbiased):
    """Each case (size, dtype, gamma) takes the next mask kind, and the next mask layout every
    four cases: in 16 cases every kind meets every layout (REINFORCE++ has 24 to 45 cases; ReMax,
    without the gamma loop, 15 on CPU and 8 under Triton). REINFORCE++ runs all of them with either
    variance, a parameter: it was the case counter's parity, which also picked the kind and the
    layout, so right / holes masks met the biased variance only, left / mixed ones the unbiased
    one, and each kind had one layout."""
    skip_unless_available(backend, device)
    i = 0
    for B, T in _sizes(backend):
        for dtype in _dtypes(backend):
            for gamma in (None,) if remax else (1.0, 0.9, 0.0):  # ReMax has no discount
                i += 1
                r = torch.randn(B, T + 3, device=device).to(dtype)[:, 3:]  # non-contiguous rows
                kind = MASK_KINDS[i % 4]
                mask = _mask_layouts(make_mask(kind, B, T, device), i // 4)
                if remax:
                    base = torch.randn(B, device=device).to(dtype)
                    got = rmk.remax_advantages(r, base, mask, backend=backend)
                    exp = rmk.remax_advantages(r, base, mask, backend="reference")
                else:
                    got = rmk.reinforce_pp_advantages(r, mask, gamma=gamma, unbiased=unbiased, backend=backend)
                    exp = rmk.reinforce_pp_advantages(r, mask, gamma=gamma, unbiased=unbiased, backend="reference")
                rtol, atol = tolerance(torch.float64 if dtype == torch.float64 else torch.float32)
                rtol, atol = max(rtol, 1e-5), max(atol, scan_atol(T) if dtype != torch.float64 else 1e-10)
                where = f"{B}x{T} {dtype} gamma={gamma} {kind} mask {mask.dtype} {mask.stride()}"
                for name, a, e in zip(("advantages", "returns"), got, exp):
                    assert a.dtype == e.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                    assert_close(a, e, rtol=rtol, atol=atol, name=f"{name} {where}")
                if not remax:
                    assert torch.all(got.advantages[mask == 0] == 0) and torch.all(got.returns[mask == 0] == 0)
        r = torch.randn(B, T, device=device)
        for got, exp in ((rmk.reinforce_pp_advantages(r, None, backend=backend),
                          rmk.reinforce_pp_advantages(r, None, backend="reference")),
                         (rmk.remax_advantages(r, r[:, 0], None, backend=backend),
                          rmk.remax_advantages(r, r[:, 0], None, backend="reference"))):
            for a, e in zip(got, exp):
                assert_close(a, e, rtol=1e-5, atol=scan_atol(T), name="mask=None")


def test_cpu_remax_rows_do_not_depend_on_grouping():
    """The CPU kernel runs ReMax 16 short rows at a time, interleaved (csrc/cpu/reinforce.cpp:
    remax_group), and a lone row (the batch's remainder, a batch of one, long rows) by itself:
    every row gets the same bits either way, for every dtype and mask layout."""
    if not rmk._ext.CPP_AVAILABLE:
        pytest.fail("the C++ extension is not built")
    for i, (B, T) in enumerate([(37, 9), (48, 100), (33, 300)]):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            r = torch.randn(B, T + 2).to(dtype)[:, 2:]
            base = torch.randn(B).to(dtype)
            mask = _mask_layouts(make_mask(["holes", "mixed", "left"][i], B, T, "cpu"), i)
            adv, ret = rmk.remax_advantages(r, base, mask, backend="cpu")
            for b in range(B):
                a1, r1 = rmk.remax_advantages(r[b:b + 1], base[b:b + 1], mask[b:b + 1], backend="cpu")
                assert torch.equal(adv[b:b + 1], a1) and torch.equal(ret[b:b + 1], r1), (B, T, dtype, b)


@pytest.mark.triton
@pytest.mark.parametrize("unbiased", [True, False])
def test_triton_batch_statistics_span_row_blocks(monkeypatch, unbiased):
    """Triton's REINFORCE++ takes the batch's statistics from the rows' (count, sum, M2) in one
    program that loops over the rows TOTALS_BLOCK at a time; at 16 per block, 75 rows are five
    blocks, the last partial. Rows of different means (the between-row term of the centred
    squares matters) and rows with no valid position (they add nothing)."""
    skip_unless_available("triton", "cpu")
    from rmkernels.triton import ppo as triton_ppo

    monkeypatch.setattr(triton_ppo, "TOTALS_BLOCK", 16)
    B, T = 75, 40
    r = torch.randn(B, T) + 4 * torch.randn(B, 1)
    mask = make_mask("mixed", B, T)
    mask[::7] = False
    got = rmk.reinforce_pp_advantages(r, mask, gamma=0.95, unbiased=unbiased, backend="triton")
    exp = rmk.reinforce_pp_advantages(r, mask, gamma=0.95, unbiased=unbiased, backend="reference")
    for name, a, e in zip(("advantages", "returns"), got, exp):
        assert_close(a, e, rtol=1e-5, atol=scan_atol(T), name=name)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_edges(backend, device):
    """B = 0 and T = 0 give empty outputs of the right shapes; a batch with no valid token or a
    single one gives all-zero REINFORCE++ advantages (never NaN) and its returns; ReMax with no
    valid token is all zeros."""
    skip_unless_available(backend, device)
    for B, T in [(0, 5), (0, 0), (3, 0)]:
        r = torch.randn(B, T, device=device)
        m = torch.ones(B, T, dtype=torch.bool, device=device)
        for out in (rmk.reinforce_pp_advantages(r, m, backend=backend),
                    rmk.remax_advantages(r, torch.randn(B, device=device), m, backend=backend)):
            assert out.advantages.shape == (B, T) and out.returns.shape == (B, T)
    r = torch.randn(6, 9, device=device)
    none = torch.zeros(6, 9, dtype=torch.bool, device=device)
    adv, ret = rmk.reinforce_pp_advantages(r, none, backend=backend)
    assert torch.all(adv == 0) and torch.all(ret == 0)
    adv, ret = rmk.remax_advantages(r, torch.randn(6, device=device), none, backend=backend)
    assert torch.all(adv == 0) and torch.all(ret == 0)
    one = none.clone()
    one[2, 4] = True
    adv, ret = rmk.reinforce_pp_advantages(r, one, gamma=0.5, backend=backend)
    assert torch.all(adv == 0) and ret[2, 4] == r[2, 4] and torch.count_nonzero(ret) == 1


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_nan_rewards(backend, device):
    """A NaN reward at a valid position: ReMax keeps it in its row, at and left of it; REINFORCE++
    spreads it through the whitening to every valid position (masked positions stay 0). A NaN at
    a masked position is ignored by both (verl's ``r * mask`` would spread it)."""
    skip_unless_available(backend, device)
    B, T = 12, 20
    r = torch.randn(B, T, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, 15:] = False
    r[3, 17] = float("nan")  # masked: ignored
    adv, ret = rmk.remax_advantages(r, torch.zeros(B, device=device), mask, backend=backend)
    assert not torch.isnan(adv).any() and not torch.isnan(ret).any()
    adv, ret = rmk.reinforce_pp_advantages(r, mask, backend=backend)
    assert not torch.isnan(adv).any()
    r[5, 8] = float("nan")
    adv, ret = rmk.remax_advantages(r, torch.zeros(B, device=device), mask, backend=backend)
    assert torch.isnan(ret[5, :9]).all() and not torch.isnan(ret[5, 9:]).any()
    assert not torch.isnan(ret[torch.arange(B, device=device) != 5]).any()
    adv, ret = rmk.reinforce_pp_advantages(r, mask, backend=backend)
    assert torch.isnan(adv[mask]).all() and torch.all(adv[~mask] == 0)


# ---------------------------------------------------------------------------------------
# opcheck, torch.compile, the eager path
# ---------------------------------------------------------------------------------------
def _op_samples(device):
    B, T = 11, 7
    r = torch.randn(B, T, device=device)
    mask = make_mask("holes", B, T).to(device)
    base = torch.randn(B, device=device)
    return [("reinforce_kernel", (r, mask, None, 0.9, True, 1e-8)),
            ("reinforce_kernel", (r, mask, base, 1.0, True, 1e-8)),
            ("reinforce_advantages", (r, mask, None, 0.9, False, 1e-3)),
            ("reinforce_advantages", (r, mask, base, 1.0, True, 1e-8))]


test_opcheck = opcheck_test(_op_samples)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    skip_unless_available(backend, "cpu")
    B, T = 12, 10
    r = torch.randn(B, T)
    mask = make_mask("holes", B, T)
    base = torch.randn(B)

    def f(r, base, mask):
        return (*rmk.reinforce_pp_advantages(r, mask, gamma=0.99, backend=backend),
                *rmk.remax_advantages(r, base, mask, backend=backend))

    assert_compiled_matches(f, r, base, mask)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_eager_path_same_bits_as_the_op(backend, monkeypatch):
    skip_unless_available(backend, "cpu")
    B, T = 30, 17
    r, base, mask = torch.randn(B, T), torch.randn(B), make_mask("holes", B, T)

    def run():
        return (*rmk.reinforce_pp_advantages(r, mask, backend=backend), *rmk.remax_advantages(r, base, mask,
                                                                                               backend=backend))

    fast = run()
    monkeypatch.setattr(rmk._library, "EAGER_FAST_PATH", False)
    for x, y in zip(fast, run()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------
def test_bad_inputs():
    r, m = torch.zeros(3, 4), torch.ones(3, 4)
    cases = [
        (lambda: rmk.reinforce_pp_advantages(torch.zeros(3), m), ValueError, "token_rewards"),
        (lambda: rmk.reinforce_pp_advantages(r.long(), m), TypeError, "token_rewards"),
        (lambda: rmk.reinforce_pp_advantages(r, torch.ones(3, 5)), ValueError, "mask"),
        (lambda: rmk.reinforce_pp_advantages(r, m, gamma=-0.5), ValueError, "gamma"),
        (lambda: rmk.reinforce_pp_advantages(r, m, gamma=float("nan")), ValueError, "gamma"),
        (lambda: rmk.reinforce_pp_advantages(r, m, eps=-1.0), ValueError, "eps"),
        (lambda: rmk.reinforce_pp_advantages(r, m, unbiased="yes"), TypeError, "unbiased"),
        (lambda: rmk.reinforce_pp_advantages(r, m, backend="tpu"), ValueError, "backend"),
        (lambda: rmk.remax_advantages(r, torch.zeros(2), m), ValueError, "baselines"),
        (lambda: rmk.remax_advantages(r, torch.zeros(3, 1), m), ValueError, "baselines"),
        (lambda: rmk.remax_advantages(r, torch.zeros(3, dtype=torch.long), m), TypeError, "baselines"),
        (lambda: rmk.remax_advantages(r, [0.0, 0.0, 0.0], m), TypeError, "baselines"),
        (lambda: rmk.remax_advantages(r, torch.zeros(3), torch.ones(4, 4)), ValueError, "mask"),
    ]
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()


def test_direct_op_calls_check_their_arguments():
    """torch.ops.rmkernels.reinforce_advantages called directly: the check hook names the bad
    argument on every backend path, before any kernel runs."""
    op = torch.ops.rmkernels.reinforce_advantages
    r, m, base = torch.randn(4, 3), torch.ones(4, 3, dtype=torch.bool), torch.randn(4)
    args = (r, m, base, 1.0, True, 1e-8, "cpu")
    op(*args)
    for be in ("cpu", "reference"):
        for i, bad, exc, name in [(1, m.float(), TypeError, "mask"), (1, m[:2], ValueError, "mask"),
                                  (2, torch.randn(5), ValueError, "baselines"),
                                  (2, base.double(), TypeError, "baselines"), (3, -1.0, ValueError, "gamma"),
                                  (5, float("inf"), ValueError, "eps"), (0, torch.randn(4), ValueError,
                                                                         "token_rewards")]:
            bad_args = (*args[:i], bad, *args[i + 1:-1], be)
            with pytest.raises(exc, match=name):
                op(*bad_args)
    with pytest.raises(ValueError, match="backend"):
        op(*args[:-1], "gpu")


@pytest.mark.cuda
@pytest.mark.parametrize("remax", [False, True], ids=["reinforce_pp", "remax"])
def test_cuda_kernel_is_one_launch_at_scale(remax):
    """The CUDA kernel op is one cooperative launch and nothing else on the GPU (no memset), on a
    batch larger than the grid the device holds at once (70,001 x 67 = 4.7M elements: every
    phase loops grid-stride) and on few long rows (B = 40, T = 9000: a warp walks 71 chunks), and
    matches the reference there."""
    skip_unless_available("cuda", "cuda")
    from torch.profiler import ProfilerActivity, profile

    from rmkernels.ops import group_adv as gops

    for B, T in ((70_001, 67), (40, 9000)):
        r = torch.randn(B, T, device="cuda")
        mask = make_mask("holes", B, T, "cuda")
        args = (r, mask, torch.randn(B, device="cuda") if remax else None, 0.99, True, 1e-8)
        torch.ops.rmkernels.reinforce_kernel(*args)  # warm: the occupancy query is cached
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            adv, ret = torch.ops.rmkernels.reinforce_kernel(*args)
            torch.cuda.synchronize()
        on_gpu = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(on_gpu) == 1 and "reinforce_kernel" in on_gpu[0], on_gpu
        e_adv, e_ret = gops.reinforce_kernel("reference", *args)
        assert_close(ret, e_ret, rtol=1e-5, atol=scan_atol(T), name=f"returns {B}x{T}")
        assert_close(adv, e_adv, rtol=1e-5, atol=scan_atol(T), name=f"advantages {B}x{T}")


@pytest.mark.parametrize("backend", [p for p in cpu_backend_params() if p != "reference"])
def test_op_with_baselines_and_a_discount_matches_reference(backend):
    """The op takes a baseline and a discount together (remax_advantages fixes gamma at 1, so
    only a direct call reaches this): over holes, the return carried unchanged over a masked
    position, as the kernels do, on the reference too (a mutation that discounted the carry
    there passed before)."""
    skip_unless_available(backend, "cpu")
    op = torch.ops.rmkernels.reinforce_advantages
    r = torch.tensor([[1.0, 5.0, 2.0]])
    mask = torch.tensor([[True, False, True]])
    base = torch.tensor([0.5])
    for be in ("reference", backend):
        adv, ret = op(r, mask, base, 0.5, True, 1e-8, be)
        # 1 + 0.5 * 2 at t=0, the 2 carried over the masked t=1 (ReMax writes returns everywhere;
        # advantages are returns - baseline at valid positions, the returns elsewhere)
        torch.testing.assert_close(ret, torch.tensor([[2.0, 2.0, 2.0]]), msg=be)
        torch.testing.assert_close(adv, torch.tensor([[1.5, 2.0, 1.5]]), msg=be)
    for gamma in (0.0, 0.5, 0.9):
        B, T = 9, 17
        r = torch.randn(B, T)
        mask = make_mask("holes", B, T)
        base = torch.randn(B)
        got = op(r, mask, base, gamma, True, 1e-8, backend)
        exp = op(r, mask, base, gamma, True, 1e-8, "reference")
        for name, a, e in zip(("advantages", "returns"), got, exp):
            assert_close(a, e, rtol=1e-5, atol=scan_atol(T), name=f"{name} gamma={gamma}")
