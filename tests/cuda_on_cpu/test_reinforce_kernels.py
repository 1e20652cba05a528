"""csrc/cuda/reinforce.cu's launcher runs on the CPU (AddressSanitizer, ThreadSanitizer), against
the reference backend of reinforce_kernel: REINFORCE++ (the whitened returns) and ReMax (the
returns minus a baseline) with ragged sizes (rows shorter and longer than a warp's 128-position
chunk, T = 0 and 1, B = 0), every mask kind (empty rows, single-token rows, holes, left padding,
column-major strides), strided rewards, every rewards dtype the launcher takes, gamma 0 / 0.9 /
1; one cooperative launch per call (the emulated device's 16 resident blocks, so a warp takes
several rows and each thread several elements); rows split into pieces (a batch of few long
rows: reinforce_plan, at the binding's segment length and scaled down); NaN rewards; the
workspace written in the launch across concurrent blocks under ThreadSanitizer."""
import pytest
import torch
from test_gae import assert_overflows_as_the_loop, loop_gae, overflow_inputs
from test_reinforce import scan_atol
from utils import assert_close, make_mask, tolerance

from rmkernels.ops import group_adv as gops

from .emu import DTYPE_CODE, Program

pytestmark = pytest.mark.cuda_on_cpu


SEGMENT_T = 1024  # reinforce.cuh's kReinforceSegmentT, what the binding passes


def plan_of(dtype, remax, B, T, segment_t=SEGMENT_T):
    """(blocks, segments, seg_len) of reinforce_plan on the emulated device (16 resident blocks
    of 8 warps)."""
    prog = Program()
    out = prog.out((3,), torch.int64)
    prog.call("rmk_reinforce_plan", DTYPE_CODE[dtype], int(remax), B, T, segment_t, out)
    res = prog.run()
    assert res.rcs == [0], res.rcs
    return tuple(res[out].tolist())


def _workspace(B, plan, remax):
    """reinforce.cuh's reinforce_workspace float64 (AddressSanitizer reports a launcher that
    writes past it)."""
    pieces = B * plan[1]
    return (0 if remax else 3 + 3 * pieces) + (2 * pieces if plan[1] > 1 else 0)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def launch(rewards, mask, baselines=None, gamma=1.0, unbiased=True, eps=1e-8, variant="asan", counts=False,
           segment_t=SEGMENT_T, plan=None):
    """(rcs, advantages, returns[, issued]) of launch_reinforce as the binding calls it (rewards and
    mask with their own strides, baselines contiguous in the arithmetic dtype or None, the plan of
    reinforce_plan with segment_t unless given, a NaN-filled workspace: the kernel zeroes what it
    sums into)."""
    B, T = rewards.shape
    acc = _acc(rewards.dtype)
    remax = baselines is not None
    if plan is None:
        plan = plan_of(rewards.dtype, remax, B, T, segment_t)
    prog = Program()
    n_ws = _workspace(B, plan, remax)
    ws = prog.out((n_ws,), torch.float64) if n_ws else None
    adv, ret = prog.out((B, T), acc), prog.out((B, T), acc)
    if counts:
        before, after = prog.out((3,), torch.int64), prog.out((3,), torch.int64)
        prog.call("rmk_emu_counts", before)
    prog.call("rmk_reinforce", DTYPE_CODE[rewards.dtype], prog.inp(rewards), rewards.stride(0), rewards.stride(1),
              prog.inp(mask), mask.stride(0), mask.stride(1), None if baselines is None else prog.inp(baselines), B, T,
              float(gamma), bool(unbiased), float(eps), *plan, ws, adv, ret)
    if counts:
        prog.call("rmk_emu_counts", after)
    res = prog.run(variant)
    out = (res.rcs, res[adv], res[ret])
    if counts:
        out += ((res[after] - res[before]).tolist(),)
    return out


def check(rewards, mask, baselines=None, what="", gamma=1.0, unbiased=True, variant="asan", segment_t=SEGMENT_T):
    rcs, adv, ret = launch(rewards, mask, baselines, gamma, unbiased, variant=variant, segment_t=segment_t)
    assert rcs == [0], rcs
    e_adv, e_ret = gops.reinforce_kernel("reference", rewards, mask, baselines, float(gamma), bool(unbiased), 1e-8)
    # the warp scan composes the maps in another order than the sequential recurrence, and the
    # whitening's float64 sums run in another order (Chan's per-row update, atomics)
    rtol, atol = max(tolerance(torch.float32)[0], 1e-5), scan_atol(rewards.shape[1])
    if rewards.dtype == torch.float64:
        rtol = atol = 1e-10
    assert adv.dtype == e_adv.dtype and ret.dtype == e_ret.dtype
    assert_close(ret, e_ret, rtol=rtol, atol=atol, name=f"returns {what}")
    assert_close(adv, e_adv, rtol=rtol, atol=atol, name=f"advantages {what}")
    if baselines is None:
        assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0), f"masked positions not 0 {what}"
    return adv, ret


def _case(B, T, kind="mixed", col_major=False, dtype=torch.float32, strided=False):
    r = torch.randn(B, 2 * T if strided else T).to(dtype)
    if strided:
        r = r[:, ::2]
    mask = make_mask(kind, B, T)
    if col_major:
        mask = mask.t().contiguous().t()
    return r, mask


@pytest.mark.parametrize("remax", [False, True], ids=["reinforce_pp", "remax"])
def test_reinforce_matches_reference(remax):
    """Ragged sizes around the 128-position chunk, every mask kind and layout, gamma 0 / 0.9 / 1,
    both variances."""
    sizes = [(1, 5), (3, 1), (37, 128), (59, 129), (300, 13), (7, 700)]
    for i, (B, T) in enumerate(sizes):
        kind = ["right", "left", "holes", "mixed"][i % 4]
        r, mask = _case(B, T, kind, col_major=bool(i % 2), strided=bool(i % 3 == 1))
        base = torch.randn(B) if remax else None
        for gamma in (0.0, 0.9, 1.0):
            check(r, mask, base, f"B={B} T={T} {kind} gamma={gamma}", gamma=gamma, unbiased=bool(i % 2 == 0))


@pytest.mark.parametrize("gamma,T", [(1.1, 1500), (2.0, 200), (1e30, 40)])
def test_discount_above_one_overflows_as_the_loop_does(gamma, T):
    """gamma > 1 (tests/test_gae.py's test of the same name): the lanes' and the pieces'
    aggregates are overflowed products of discounts; inf times the row end's carry of 0 gave
    NaN where the loop gives 0, a finite value or inf. One warp a row, and rows in pieces."""
    r, mask = overflow_inputs(T)
    exact, _ = loop_gae(r, torch.zeros_like(r), mask, gamma, 1.0)
    for segment_t in (SEGMENT_T, 128):
        rcs, _, ret = launch(r, mask, gamma=gamma, segment_t=segment_t)
        assert rcs == [0], rcs
        assert_overflows_as_the_loop(ret, exact, f"returns, plan {plan_of(r.dtype, False, *r.shape, segment_t)}")


def test_reinforce_plan_splits_only_few_long_rows():
    """reinforce_plan: rows shorter than 2 * segment_t, or more rows than half the grid's warps
    (16 blocks x 8 warps here), are one warp each; otherwise a row is split into pieces of at least
    segment_t positions (a multiple of the 128-position chunk) as far as the warps go around; the
    grid is what the largest phase needs, at most the 16 resident blocks."""
    f32 = torch.float32
    assert plan_of(f32, False, 4, 2047) == (16, 1, 2047)
    assert plan_of(f32, False, 2, 9000) == (16, 9, 1024)          # ceil(9000 / 1024) pieces
    assert plan_of(f32, True, 40, 4096) == (16, 3, 1408)           # 128 warps // 40 rows = 3 pieces
    assert plan_of(f32, False, 65, 4096) == (16, 1, 4096)          # 128 // 65 = 1: no split
    assert plan_of(f32, False, 3, 1000, segment_t=128) == (12, 8, 128)  # 3000 elements: 12 blocks
    assert plan_of(f32, False, 50, 300, segment_t=128) == (16, 2, 256)  # the last piece 44 positions
    assert plan_of(f32, False, 2, 5) == (1, 1, 5)                  # 2 * 5 elements: one block
    assert plan_of(f32, False, 0, 5) == (1, 1, 5)


@pytest.mark.parametrize("remax", [False, True], ids=["reinforce_pp", "remax"])
def test_reinforce_split_rows_match_reference(remax):
    """Rows split into pieces, one warp each, with the carries of the pieces to the right from
    their aggregates: at the binding's segment length (2 x 9000) and scaled down to 128 (pieces of
    one chunk, of two with a partial last, every mask kind and layout, strided rewards, rows with
    no valid position, gamma 0 / 0.9 / 1)."""
    check(torch.randn(2, 9000), make_mask("holes", 2, 9000), torch.randn(2) if remax else None, "2x9000",
          gamma=1.0)
    for i, (B, T) in enumerate([(3, 1000), (20, 700), (50, 300), (1, 257)]):
        kind = ["right", "left", "holes", "mixed"][i % 4]
        r, mask = _case(B, T, kind, col_major=bool(i % 2), strided=bool(i % 2 == 0))
        base = torch.randn(B) if remax else None
        for gamma in (0.0, 0.9, 1.0):
            check(r, mask, base, f"B={B} T={T} {kind} gamma={gamma} split", gamma=gamma, unbiased=bool(i % 2),
                  segment_t=128)


def test_reinforce_rejects_a_malformed_plan():
    """A plan whose pieces are not whole chunks, or with no blocks, is cudaErrorInvalidValue (1)
    before anything runs."""
    r, mask = _case(3, 600)
    for plan in ((16, 3, 200), (0, 1, 600), (16, 0, 600)):
        rcs, _, _ = launch(r, mask, plan=plan)
        assert rcs == [1], (plan, rcs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_reinforce_dtypes(dtype):
    """Every rewards dtype of the launcher: float64 runs in float64, the others in float32."""
    r, mask = _case(41, 150, "holes", dtype=dtype)
    check(r, mask, None, f"reinforce_pp {dtype}", gamma=0.95)
    check(r, mask, torch.randn(41).to(_acc(dtype)), f"remax {dtype}")


def test_reinforce_edges():
    """B = 0 (nothing launched), T = 0 (nothing to write), no valid token anywhere and a single
    valid token in the batch (REINFORCE++: all-zero advantages, never NaN), a full mask."""
    for remax in (False, True):
        base = (lambda B: torch.randn(B)) if remax else (lambda B: None)
        rcs, adv, ret = launch(torch.zeros(0, 7), torch.zeros(0, 7, dtype=torch.bool), base(0))
        assert rcs == [0] and adv.shape == (0, 7)
        rcs, adv, ret = launch(torch.zeros(9, 0), torch.zeros(9, 0, dtype=torch.bool), base(9))
        assert rcs == [0] and adv.shape == (9, 0)
        r = torch.randn(20, 33)
        none = torch.zeros(20, 33, dtype=torch.bool)
        adv, ret = check(r, none, base(20), f"no valid token remax={remax}")
        one = none.clone()
        one[4, 17] = True
        adv, ret = check(r, one, base(20), f"one valid token remax={remax}")
        if not remax:
            assert torch.all(adv == 0) and ret[4, 17] == r[4, 17]
        check(r, torch.ones(20, 33, dtype=torch.bool), base(20), f"full mask remax={remax}", gamma=0.99)


def test_reinforce_nan_reward():
    """A NaN reward at a valid position: ReMax keeps it in its row (at and left of it); REINFORCE++
    spreads it over every valid position through the whitening, as masked_whiten. A NaN at a
    masked position is ignored."""
    B, T = 30, 40
    r, mask = _case(B, T, "right")
    mask[5, :20] = True
    mask[5, 20:] = False
    r[5, 10] = float("nan")
    r[0, 3] = float("nan")  # row 0 has no valid token (make_mask)
    check(r, mask, torch.randn(B), "remax NaN")
    rcs, adv, ret = launch(r, mask, torch.randn(B))
    assert torch.isnan(ret[5, :11]).all() and not torch.isnan(ret[5, 11:]).any()
    assert not torch.isnan(ret[torch.arange(B) != 5]).any()
    rcs, adv, ret = launch(r, mask)
    assert rcs == [0] and torch.isnan(adv[mask]).all() and torch.all(adv[~mask] == 0)


def test_reinforce_is_one_cooperative_launch_per_call():
    """One cooperative launch and nothing else on the stream (no memset: the kernel zeroes the
    NaN-filled workspace), for rows shorter and longer than a chunk and more rows than warps."""
    for B, T, seg in ((5, 3, SEGMENT_T), (300, 257, SEGMENT_T), (6, 1000, 128)):  # the last: split rows
        r, mask = _case(B, T)
        for base in (None, torch.randn(B)):
            rcs, adv, ret, issued = launch(r, mask, base, gamma=0.9, counts=True, segment_t=seg)
            assert rcs == [0, 0, 0]
            assert issued == [0, 1, 0], f"B={B} T={T}: launches, cooperative launches, memsets = {issued}"
            e_adv, _ = gops.reinforce_kernel("reference", r, mask, base, 0.9, True, 1e-8)
            assert_close(adv, e_adv, rtol=1e-5, atol=1e-5, name=f"advantages B={B} T={T}")


@pytest.mark.parametrize("remax", [False, True], ids=["reinforce_pp", "remax"])
def test_reinforce_race_free_under_thread_sanitizer(remax):
    """The workspace zeroing, the rows' statistics and the batch atomics, the centred squares and
    the apply, each after a grid sync, across the 16 concurrent blocks, under ThreadSanitizer."""
    B, T = 300, 140
    r, mask = _case(B, T, col_major=True)
    check(r, mask, torch.randn(B) if remax else None, f"tsan remax={remax}", gamma=0.9, variant="tsan")
    r, mask = _case(10, 600, col_major=True)  # split rows: the aggregates, a grid sync, the carries
    check(r, mask, torch.randn(10) if remax else None, f"tsan split remax={remax}", gamma=0.9, variant="tsan",
          segment_t=128)
