"""csrc/cuda/group_adv.cu's launchers run on the CPU (AddressSanitizer), against the reference
backend of the kernel ops: the group advantages with every estimator, single rule and std
flavour on tests/test_group_advantages.py's groups (ragged sizes, groups of one, sparse
shuffled ids), masks (empty, full, right/left/holes, column-major strides) and scores (ties,
exact zeros); float32/float64 scores (the launcher's dtypes; bf16/fp16 scores reach it
converted by the Python layer, and the launcher refuses them); B = 0 / T = 0; one
cooperative launch per call (its grid the emulated device's 16 resident blocks, grid-stride
loops over more responses and elements than it has threads); ids out of range and NaN
scores. ThreadSanitizer runs of the zeroing, atomics, ballots and warp sums across the
concurrent blocks and their grid syncs. (REINFORCE++'s return runs gae_kernel:
tests/cuda_on_cpu's PPO kernel tests cover it.)"""
import pytest
import torch
from test_group_advantages import equal_reward_groups, make_groups, make_scores, run_layouts
from utils import assert_close, make_mask, tolerance

from rmkernels import _codes
from rmkernels.ops import group_adv as gops

from .emu import DTYPE_CODE, Program, _span_elems

pytestmark = pytest.mark.cuda_on_cpu

ESTIMATORS = list(_codes.GROUP_ESTIMATORS)
SINGLES = list(_codes.GROUP_SINGLES)
def _workspace(B):
    """group_adv.cuh's group_advantages_workspace(B) float64 (AddressSanitizer reports a launcher
    that writes past it)."""
    return 6 * B + 4


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _args(estimator, single, unbiased, eps, f_norm, whiten_eps=1e-8):
    return (int(_codes.GROUP_ESTIMATORS[estimator]), float(eps), bool(unbiased), int(_codes.GROUP_SINGLES[single]),
            float(f_norm), float(whiten_eps))


def launch_group(scores, ids, mask, estimator="grpo", single="zero", unbiased=True, eps=1e-6, f_norm=2.0,
                 variant="asan", dtype_code=None, mask_at=0):
    """(rcs, seq [B], adv [B, T]) of launch_group_advantages as the binding calls it (scores
    contiguous float32/float64, mask with its own strides, a NaN-filled workspace: the
    launcher zeroes it). ``mask_at``: the mask pointer that many bytes into its buffer, which
    then holds that many bytes before the mask's first element (a view that starts off a word
    boundary; the buffer itself is malloc's, 16-byte aligned)."""
    B, T = mask.shape
    prog = Program()
    if mask_at:
        span = _span_elems(mask)
        pad = torch.zeros(mask_at + span, dtype=torch.bool)
        pad[mask_at:] = mask.as_strided((span,), (1,))
        mask_arg = (prog.inp(pad), mask_at)
    else:
        mask_arg = prog.inp(mask)
    stats = prog.out((_workspace(B),), torch.float64)
    seq, adv = prog.out((B,), scores.dtype), prog.out((B, T), scores.dtype)
    est, e, unb, sgl, fn, we = _args(estimator, single, unbiased, eps, f_norm)
    code = DTYPE_CODE[scores.dtype] if dtype_code is None else dtype_code
    prog.call("rmk_group_advantages", code, prog.inp(scores), prog.inp(ids), mask_arg, B, T, mask.stride(0),
              mask.stride(1), est, e, unb, sgl, fn, we, stats, seq, adv)
    res = prog.run(variant)
    return res.rcs, res[seq], res[adv]


def reference_group(scores, ids, mask, estimator="grpo", single="zero", unbiased=True, eps=1e-6, f_norm=2.0):
    args = _args(estimator, single, unbiased, eps, f_norm)
    return gops.group_advantages_kernel("reference", scores, ids, mask, *args)


def check_group(scores, ids, mask, what="", variant="asan", mask_at=0, **kw):
    rcs, seq, adv = launch_group(scores, ids, mask, variant=variant, mask_at=mask_at, **kw)
    assert rcs == [0], rcs
    e_seq, e_adv = reference_group(scores, ids, mask, **kw)
    # tests/test_group_advantages.py's tolerances (float64 sums in another order)
    rtol, atol = tolerance(scores.dtype)
    rtol, atol = max(rtol, 1e-6), max(atol, 1e-6)
    assert seq.dtype == e_seq.dtype and adv.dtype == e_adv.dtype
    assert_close(seq, e_seq, rtol=rtol, atol=atol, name=f"seq {what}")
    assert_close(adv, e_adv, rtol=rtol, atol=atol, name=f"adv {what}")
    assert torch.all(adv[~mask] == 0), f"masked positions not 0 {what}"


def _case(B, T, dtype=torch.float32, kind="holes", col_major=False, token=False):
    scores = make_scores(B, T if token else None, torch.float32)
    if token:  # the Python layer sums token rewards into scores before the kernel
        scores = scores.sum(-1)
    mask = make_mask(kind, B, T)
    if col_major:
        mask = mask.t().contiguous().t()
    return scores.to(dtype), make_groups(B), mask


@pytest.mark.parametrize("single", SINGLES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_estimators(estimator, single):
    """Every estimator and single rule, both std flavours, ragged sizes, mask kinds and
    layouts (B = 97 and 300: the one-thread-per-response statistics within one or two blocks'
    threads and the partial warp at the end; opo's warp per response for 300 rows over the
    128 warps of the 16-block grid, so a warp takes 2-3 rows)."""
    for i, (B, T) in enumerate([(1, 5), (59, 37), (97, 1), (300, 13)]):
        kind = ["right", "left", "holes"][i % 3]
        scores, ids, mask = _case(B, T, kind=kind, col_major=bool(i % 2), token=bool(i % 2))
        check_group(scores, ids, mask, f"{estimator} {single} B={B} T={T}", estimator=estimator, single=single,
                    unbiased=bool(i % 2 == 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_group_dtypes(dtype):
    """float32/float64 scores run in their own dtype; bf16/fp16 scores reach the launcher as
    float32 (rmkernels/ops/group_adv.py converts them), as the binding requires."""
    B, T = 97, 59
    scores, ids, mask = _case(B, T)
    scores = scores.to(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        scores = scores.float()
    for est in ("grpo", "opo", "gpg"):
        check_group(scores, ids, mask, f"{est} {dtype}", estimator=est, eps=1e-4, f_norm=1.0)


def test_group_low_precision_dtype_codes_are_refused():
    scores, ids, mask = _case(5, 3)
    for dtype in (torch.bfloat16, torch.float16):
        rcs, _, _ = launch_group(scores, ids, mask, dtype_code=DTYPE_CODE[dtype])
        assert rcs[0] != 0, f"{dtype} scores must be refused (cudaErrorInvalidValue), got {rcs}"


def test_group_empty_batch_and_empty_rows():
    """B = 0: nothing launched, success. T = 0: seq is written, adv is empty."""
    for est in ESTIMATORS:
        rcs, seq, adv = launch_group(torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                                     torch.zeros(0, 7, dtype=torch.bool), estimator=est)
        assert rcs == [0] and seq.shape == (0,) and adv.shape == (0, 7)
        scores, ids, mask = _case(59, 0)
        check_group(scores, ids, mask, f"{est} T=0", estimator=est)


def test_group_many_blocks_and_one_group():
    """The broadcast over many more elements than the grid has threads (B * T = 300 * 257
    elements, 16 blocks of 256 threads: each thread loops 19 times), one group of all B rows
    (every atomic on one group's slots) and all-distinct groups of one."""
    B, T = 300, 257
    scores, _, mask = _case(B, T, kind="holes", col_major=True)
    for ids, name in ((torch.full((B,), 7, dtype=torch.int64), "one group"),
                      (torch.randperm(B), "groups of one")):
        for est in ("grpo", "opo", "gpg", "rloo"):
            check_group(scores, ids, mask, f"{est} {name}", estimator=est, single="self")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_group_broadcast_layouts(dtype):
    """Phase (3b) in 16-byte items (Vec16: T a multiple of 4 float32 / 2 float64 outputs, mask
    rows contiguous and on a word boundary; the items per thread in rounds of kU = 4) and one
    element per item for every mask that does not allow it: row strides not a multiple of the
    word, a mask one byte off its word boundary (the same strides), column-major. Masks of
    every kind, bytes read as words in both byte orders' worth of patterns (holes)."""
    n = 4 if dtype == torch.float32 else 2
    for B, T in [(600, 128), (97, n), (300, 3 * n), (41, 16 * n)]:
        scores, ids, mask = _case(B, T, dtype, kind="holes")
        wide = make_mask("mixed", B, T + n)
        layouts = {"contiguous": (mask, 0), "row stride T + n": (wide[:, :T], 0),
                   "row stride T + 1": (make_mask("left", B, T + 1)[:, 1:], 0),
                   "one byte off": (wide[:, :T], 1), "column-major": (mask.t().contiguous().t(), 0)}
        for name, (m, at) in layouts.items():
            for est in ("grpo", "opo"):
                check_group(scores, ids, m, f"{est} {dtype} B={B} T={T} {name}", estimator=est, mask_at=at)


def test_group_runs_of_equal_ids():
    """verl's layout, a prompt's responses side by side: phases (1) and (2) sum each run of
    equal ids within a warp before one atomic (warp_run_sum), and phase (0) zeroes only the
    named groups' statistics when the first ids come in runs (codes::kGroupZeroSample; the
    workspace starts as NaN). Runs of random sizes (1 to 6, across warp boundaries), of 8
    (G = 8), of 45 (longer than a warp), runs then the rest shuffled and the reverse, a run of
    ids outside [0, B) in the middle, and a NaN score inside a run."""
    B, T = 300, 5
    scores, _, mask = _case(B, T, kind="holes")
    bad_run = torch.arange(B) // 8
    bad_run[20:28] = B + 1  # a whole run of one bad id: NaN rows, no other group touched
    cases = run_layouts(B)
    for name, ids in cases.items():
        for est in ("grpo", "dr_grpo", "rloo", "gpg", "opo"):
            check_group(scores, ids, mask, f"{est} {name}", estimator=est, single="self")
    rcs, seq, adv = launch_group(scores, bad_run, mask, estimator="grpo")
    assert rcs == [0] and torch.isnan(seq[20:28]).all()
    keep = torch.ones(B, dtype=torch.bool)
    keep[20:28] = False
    e_seq, e_adv = reference_group(scores[keep], torch.unique(bad_run[keep], return_inverse=True)[1], mask[keep])
    assert_close(seq[keep], e_seq, rtol=1e-6, atol=1e-6, name="grpo beside a run of bad ids")
    assert_close(adv[keep], e_adv, rtol=1e-6, atol=1e-6, name="grpo beside a run of bad ids")
    nan_scores = scores.clone()
    nan_scores[43] = float("nan")  # inside the run of rows 40-47
    check_group(nan_scores, torch.arange(B) // 8, mask, "grpo NaN inside a run", estimator="grpo")


def test_equal_rewards_give_exact_zeros():
    """tests/test_group_advantages.py's equal-reward groups through the CUDA kernel: advantage
    exactly 0 by every estimator (float64 atomics of float32 values add exactly in any order),
    in both of phase (0)'s ways (rows shuffled, and sorted into runs)."""
    scores, ids = equal_reward_groups()
    mask = torch.ones(len(ids), 8, dtype=torch.bool)
    order = torch.argsort(ids, stable=True)
    for layout, (s, i) in {"shuffled": (scores, ids), "runs": (scores[order], ids[order])}.items():
        for est in ESTIMATORS:
            rcs, seq, adv = launch_group(s, i, mask, estimator=est)
            assert rcs == [0] and torch.equal(seq, torch.zeros_like(seq)), (est, layout, seq)
            assert torch.equal(adv, torch.zeros_like(adv)), (est, layout)


def test_gpg_all_zero_scores_give_zeros():
    """GPG's alpha = B / max(count of non-zero scores, 1): with every score 0 the count is 0 and
    the advantages are zeros, as the reference gives (tests/test_group_advantages.py checks the
    CPU backends; without the max the kernel gave NaN: mutation testing)."""
    B, T = 6, 5
    scores, ids = torch.zeros(B), torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[4, 2:] = False
    rcs, seq, adv = launch_group(scores, ids, mask, estimator="gpg")
    e_seq, e_adv = reference_group(scores, ids, mask, estimator="gpg")
    assert rcs == [0] and torch.equal(seq, e_seq) and torch.equal(adv, e_adv), (seq, e_seq)
    assert torch.equal(seq, torch.zeros(B))


def test_group_ids_out_of_range_and_nan_scores():
    """An id outside [0, B) gives a NaN row (group_adv.cuh) and touches no other group
    (reinforce_pp_baseline: the whitening spreads the NaN to every row with a valid token, and
    rows without one are 0); a NaN score makes its own group NaN only."""
    B, T = 40, 9
    scores, ids, mask = _case(B, T)
    mask[3] = True
    for est in ESTIMATORS:
        bad = ids.clone()
        bad[3], bad[5] = -1, B
        rcs, seq, adv = launch_group(scores, bad, mask, estimator=est)
        assert rcs == [0]
        if est == "reinforce_pp_baseline":  # batch-wide statistics, as SPEC allows; a row without a
            has = mask.any(1)                # valid token is 0 even with a bad id (row 5 may be one)
            assert torch.isnan(seq[has]).all() and torch.all(seq[~has] == 0), est
            assert torch.isnan(adv[mask]).all() and torch.all(adv[~mask] == 0), est
            continue
        assert torch.isnan(seq[[3, 5]]).all() and torch.isnan(adv[3]).all(), est
        if est == "gpg":  # alpha counts every nonzero score of the batch: not a subset's
            continue
        keep = (ids != ids[3]) & (ids != ids[5])  # the other groups, as a batch of their own
        sub_ids = torch.unique(ids[keep], return_inverse=True)[1]
        e_seq, e_adv = reference_group(scores[keep], sub_ids, mask[keep], estimator=est)
        assert_close(seq[keep], e_seq, rtol=1e-6, atol=1e-6, name=f"{est} other groups")
        assert_close(adv[keep], e_adv, rtol=1e-6, atol=1e-6, name=f"{est} other groups")
    nan_scores = scores.clone()
    nan_scores[7] = float("nan")
    for est in ("grpo", "opo", "gpg", "rloo", "dr_grpo"):
        check_group(nan_scores, ids, mask, f"{est} NaN score", estimator=est)


def test_reinforce_pp_baseline_non_finite_score_in_empty_row():
    """A NaN or inf score alone in its group, in a row with no valid token, takes part in nothing
    (group_adv::row_copies: the whitening sums were len * value, 0 * NaN = NaN, which made every
    row of the batch NaN): the outputs are those of a 0 score there, and match the reference."""
    B, T = 23, 7
    for dtype in (torch.float32, torch.float64):
        scores, ids, mask = _case(B, T, dtype)
        mask[0] = True
        free = sorted(set(range(B)) - set(ids.tolist()))
        if free:  # (no free id: every row is a group of its own)
            ids[B - 2] = free[0]  # a group of one
        mask[B - 2] = False
        for single in ("zero", "self"):
            kw = dict(estimator="reinforce_pp_baseline", single=single)
            _, c_seq, c_adv = launch_group(scores, ids, mask, **kw)
            for bad in (float("nan"), float("inf")):
                dirty = scores.clone()
                dirty[B - 2] = bad
                rcs, seq, adv = launch_group(dirty, ids, mask, **kw)
                assert rcs == [0]
                assert torch.isfinite(seq).all() and torch.isfinite(adv).all(), (dtype, bad, single)
                assert torch.equal(seq, c_seq) and torch.equal(adv, c_adv), (dtype, bad, single)
                check_group(dirty, ids, mask, f"{dtype} score {bad} single={single}", **kw)


def test_group_is_one_cooperative_launch_per_call():
    """Each estimator: one cooperative launch and nothing else on the stream (no memset: the
    kernel zeroes its workspace, which the test fills with NaN), whatever B and T."""
    for B, T in ((5, 3), (300, 257)):
        scores, ids, mask = _case(B, T)
        for est in ESTIMATORS:
            prog = Program()
            before, after = prog.out((3,), torch.int64), prog.out((3,), torch.int64)
            stats = prog.out((_workspace(B),), torch.float64)
            seq, adv = prog.out((B,), scores.dtype), prog.out((B, T), scores.dtype)
            prog.call("rmk_emu_counts", before)
            prog.call("rmk_group_advantages", DTYPE_CODE[scores.dtype], prog.inp(scores), prog.inp(ids),
                      prog.inp(mask), B, T, mask.stride(0), mask.stride(1), *_args(est, "zero", True, 1e-6, 2.0),
                      stats, seq, adv)
            prog.call("rmk_emu_counts", after)
            res = prog.run()
            assert res.rcs == [0, 0, 0]
            issued = (res[after] - res[before]).tolist()
            assert issued == [0, 1, 0], f"{est} B={B} T={T}: launches, cooperative launches, memsets = {issued}"
            e_seq, e_adv = reference_group(scores, ids, mask, estimator=est)
            assert_close(res[adv], e_adv, rtol=1e-6, atol=1e-6, name=f"adv {est} B={B} T={T}")


def test_group_run_zeroing_race_free_under_thread_sanitizer():
    """Phase (0) when the first ids come in runs: each run stores its group's zeros, and a group
    in several runs (here the ids after the first 64 rows are shuffled, so each group's rows are
    spread over the 16 concurrent blocks) is stored by each of them at once: relaxed stores,
    which ThreadSanitizer accepts (plain ones it reports)."""
    B, T = 300, 11
    scores, _, mask = _case(B, T, col_major=True)
    ids = torch.arange(B) // 8
    ids[64:] = ids[64:][torch.randperm(B - 64, generator=torch.Generator().manual_seed(5))]
    check_group(scores, ids, mask, "tsan run zeroing", variant="tsan", estimator="grpo")


@pytest.mark.parametrize("estimator", ["grpo", "opo", "gpg", "reinforce_pp_baseline"])
def test_group_race_free_under_thread_sanitizer(estimator):
    """The workspace zeroing, the atomics, gpg's ballot and opo's warp sums of the
    statistics, the centred-squares pass and the broadcast, each after a grid sync, across
    the 16 concurrent blocks of the cooperative launch, under ThreadSanitizer."""
    B, T = 300, 11
    scores, ids, mask = _case(B, T, col_major=True)
    check_group(scores, ids, mask, f"tsan {estimator}", variant="tsan", estimator=estimator)
