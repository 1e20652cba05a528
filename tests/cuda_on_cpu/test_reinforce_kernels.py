"""csrc/cuda/reinforce.cu's launcher runs on the CPU (AddressSanitizer, ThreadSanitizer), against
the reference backend of reinforce_kernel: REINFORCE++ (the whitened returns) and ReMax (the
returns minus a baseline) with ragged sizes (rows shorter and longer than a warp's 128-position
chunk, T = 0 and 1, B = 0), every mask kind (empty rows, single-token rows, holes, left padding,
column-major strides), strided rewards, every rewards dtype the launcher takes, gamma 0 / 0.9 /
1; one cooperative launch per call (the emulated device's 16 resident blocks, so a warp takes
several rows and each thread several elements); NaN rewards; the workspace written in the launch
across concurrent blocks under ThreadSanitizer."""
import pytest
import torch
from test_reinforce import scan_atol
from utils import assert_close, make_mask, tolerance

from rmkernels.ops import group_adv as gops

from .emu import DTYPE_CODE, Program

pytestmark = pytest.mark.cuda_on_cpu


def _workspace(B):
    """reinforce.cuh's reinforce_workspace(B) float64 (AddressSanitizer reports a launcher that
    writes past it)."""
    return 3 * B + 3


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def launch(rewards, mask, baselines=None, gamma=1.0, unbiased=True, eps=1e-8, variant="asan", counts=False):
    """(rcs, advantages, returns[, issued]) of launch_reinforce as the binding calls it (rewards and
    mask with their own strides, baselines contiguous in the arithmetic dtype or None, a
    NaN-filled workspace: the kernel zeroes what it sums into)."""
    B, T = rewards.shape
    acc = _acc(rewards.dtype)
    prog = Program()
    ws = prog.out((_workspace(B),), torch.float64)
    adv, ret = prog.out((B, T), acc), prog.out((B, T), acc)
    if counts:
        before, after = prog.out((3,), torch.int64), prog.out((3,), torch.int64)
        prog.call("rmk_emu_counts", before)
    prog.call("rmk_reinforce", DTYPE_CODE[rewards.dtype], prog.inp(rewards), rewards.stride(0), rewards.stride(1),
              prog.inp(mask), mask.stride(0), mask.stride(1), None if baselines is None else prog.inp(baselines), B, T,
              float(gamma), bool(unbiased), float(eps), None if baselines is not None else ws, adv, ret)
    if counts:
        prog.call("rmk_emu_counts", after)
    res = prog.run(variant)
    out = (res.rcs, res[adv], res[ret])
    if counts:
        out += ((res[after] - res[before]).tolist(),)
    return out


def check(rewards, mask, baselines=None, what="", gamma=1.0, unbiased=True, variant="asan"):
    rcs, adv, ret = launch(rewards, mask, baselines, gamma, unbiased, variant=variant)
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
    for B, T in ((5, 3), (300, 257)):
        r, mask = _case(B, T)
        for base in (None, torch.randn(B)):
            rcs, adv, ret, issued = launch(r, mask, base, gamma=0.9, counts=True)
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
