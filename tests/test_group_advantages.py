"""Critic-free group advantages and REINFORCE++ returns (docs/ops.md section 5).

The reference is checked against the frameworks' published formulas, written here as they
are written there (verl 0.9's per-response loops with uid dictionaries, OpenRLHF's
``reshape(-1, n)`` group statistics); each backend is checked against the reference on
ragged batches (random group sizes in any order, groups of one, scores [B] or token rewards
[B, T], masks with holes, empty rows, non-contiguous masks), every estimator and option,
fp32/fp64/bf16; NaN isolation, empty batches, opcheck, torch.compile, the eager path, bad
inputs, and ``rmk.group_ids``.

Triton tests run under TRITON_INTERPRET=1 in their own process (``-m triton``).
"""
from collections import defaultdict

import numpy as np
import pytest
import torch
from utils import (
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
from rmkernels import _codes
from rmkernels.ops import group_adv as gops

ESTIMATORS = ["grpo", "dr_grpo", "rloo", "opo", "gpg", "reinforce_pp_baseline"]
SINGLES = ["zero", "self"]


def make_groups(B, *, max_size=6, shuffle=True):
    """int64 ids in [0, B): random group sizes (groups of one included), ids drawn sparse
    (not 0..G-1) and rows in random order (shuffle=False: each group's rows together, verl's
    layout)."""
    if B == 0:
        return torch.zeros(0, dtype=torch.int64)
    sizes = torch.randint(1, max_size + 1, (B,))
    ends = sizes.cumsum(0)
    n = int(torch.searchsorted(ends, B)) + 1  # the groups that cover B rows
    sizes = sizes[:n].clone()
    sizes[-1] -= int(ends[n - 1]) - B
    labels = torch.randperm(B)[:n]  # sparse ids in [0, B)
    ids = labels.repeat_interleave(sizes)
    return ids[torch.randperm(B)] if shuffle else ids


def run_layouts(B, head=64):
    """Id layouts of the group-advantage kernels' run paths ({name: ids}, B > head): runs of 1-6,
    8 and 45 rows; the first ``head`` rows in runs of 8 and the rest shuffled (the zeroing rule's
    sample sees runs: each run zeroes its group), and the reverse (it does not: the whole
    workspace is zeroed)."""
    perm = torch.randperm(B - head, generator=torch.Generator().manual_seed(3))
    runs_then_shuffled = torch.arange(B) // 8
    runs_then_shuffled[head:] = runs_then_shuffled[head:][perm]
    shuffled_then_runs = torch.arange(B) // 8
    shuffled_then_runs[:B - head] = shuffled_then_runs[:B - head][perm]
    return {"runs of 1-6": make_groups(B, shuffle=False), "runs of 8": torch.arange(B) // 8,
            "runs of 45": torch.arange(B) // 45, "runs, then shuffled": runs_then_shuffled,
            "shuffled, then runs": shuffled_then_runs}


def make_scores(B, T=None, dtype=torch.float32):
    """Scores with ties and exact zeros (gpg counts nonzeros, groups with zero variance)."""
    base = torch.randint(-2, 3, (B,)).float() * 0.5 + (torch.rand(B) < 0.5) * torch.randn(B)
    if T is None:
        return base.to(dtype)
    tok = torch.zeros(B, T)
    if T:
        tok[:, -1] = base
        tok += (torch.rand(B, T) < 0.1) * 0.1 * torch.randn(B, T)
    return tok.to(dtype)


# ---------------------------------------------------------------------------------------
# The frameworks' published formulas (verl 0.9 core_algos.py loops, OpenRLHF, TRL)
# ---------------------------------------------------------------------------------------
def verl_loop(token_level_rewards, response_mask, index, estimator, epsilon=1e-6, f_norm=1.0):
    """verl's compute_{grpo,rloo,opo,gpg,reinforce_plus_plus_baseline}_outcome_advantage."""
    scores = token_level_rewards.sum(dim=-1)
    response_length = response_mask.sum(dim=-1)
    id2score, id2len = defaultdict(list), defaultdict(list)
    bsz = scores.shape[0]
    m = torch.count_nonzero(scores)
    alpha = bsz / m.clamp(min=1).to(scores.dtype)  # verl's int / int tensor is float32; here scores' dtype
    for i in range(bsz):
        id2score[index[i]].append(scores[i])
        id2len[index[i]].append(response_length[i])
    mean, std, bsl = {}, {}, {}
    for idx in id2score:
        if len(id2score[idx]) == 1:  # verl's torch.tensor(1.0) is float32: 1 + eps rounds; here in scores' dtype
            mean[idx], std[idx], bsl[idx] = (torch.tensor(v, dtype=scores.dtype) for v in (0.0, 1.0, 0.0))
        else:
            st = torch.stack(id2score[idx])
            mean[idx], std[idx] = torch.mean(st), torch.std(st)
            ln = torch.stack(id2len[idx])
            bsl[idx] = (ln * st).sum() / ln.sum()
    out = scores.clone()
    for i in range(bsz):
        k = index[i]
        n = len(id2score[k])
        if estimator == "grpo":
            out[i] = (scores[i] - mean[k]) / (std[k] + epsilon)
        elif estimator in ("dr_grpo", "reinforce_pp_baseline"):
            out[i] = scores[i] - mean[k]
        elif estimator == "rloo":
            if n > 1:
                out[i] = scores[i] * n / (n - 1) - mean[k] * n / (n - 1)
        elif estimator == "opo":
            out[i] = scores[i] - bsl[k]
        elif estimator == "gpg":
            out[i] = alpha * (scores[i] - mean[k]) / f_norm
    adv = out.unsqueeze(-1) * response_mask
    if estimator == "reinforce_pp_baseline":  # verl_F.masked_whiten, unbiased, eps 1e-8
        mk = response_mask.to(adv.dtype)
        mu = (adv * mk).sum() / (mk.sum() + 1e-8)
        var = (((adv - mu) ** 2) * mk).sum() / (mk.sum() + 1e-8) * (mk.sum() / (mk.sum() - 1))
        adv = (adv - mu) * torch.rsqrt(var + 1e-8) * mk
    return adv


def verl_reinforce_pp_returns(token_level_rewards, response_mask, gamma):
    returns = torch.zeros_like(token_level_rewards)
    running = 0
    for t in reversed(range(token_level_rewards.shape[1])):
        new = token_level_rewards[:, t] + gamma * running
        returns[:, t] = new * response_mask[:, t]
        running = new * response_mask[:, t] + running * (1 - response_mask[:, t])
    return returns


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("B", [1, 59, 97])
def test_reference_matches_verl_loops(estimator, B):
    T = 13
    tok = make_scores(B, T, torch.float64)
    mask = make_mask("holes", B, T)
    mask[:, -1] |= torch.rand(B) < 0.5
    ids = make_groups(B)
    index = np.array([f"uid-{int(i)}" for i in ids], dtype=object)
    expect = verl_loop(tok, mask.double(), index, estimator)
    seq, adv = rmk.group_advantages(tok, rmk.group_ids(index), mask, estimator=estimator, backend="reference")
    if estimator == "opo":  # a group whose rows have no valid token: verl's 0/0 NaN times the mask
        expect = torch.where(mask, expect, torch.zeros(()))
    # verl's masked_mean divides by (count + 1e-8): a constant batch (B = 1) whitens its ~1e-10
    # mean error times rsqrt(0 + 1e-8) = 1e4; the op's mean is exact
    tol = 1e-4 if estimator == "reinforce_pp_baseline" else 1e-10
    assert_close(adv, expect, rtol=tol, atol=tol, name=estimator)
    if estimator not in ("reinforce_pp_baseline", "opo"):  # opo: lengths from the mask
        assert_close(seq, verl_loop(tok, torch.ones(B, 1, dtype=torch.float64), index, estimator)[:, 0],
                     rtol=1e-10, atol=1e-10, name="seq")


@pytest.mark.parametrize("mode", ["rloo", "reinforce_baseline", "dr_grpo", "group_norm"])
def test_reference_matches_openrlhf(mode):
    n, P = 4, 23
    r = make_scores(n * P, dtype=torch.float64)
    rewards = r.reshape(-1, n)
    if mode == "rloo":
        expect = rewards - (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)
        est, eps = "rloo", 0.0
    elif mode == "group_norm":
        expect = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)
        est, eps = "grpo", 1e-9
    else:
        expect = rewards - rewards.mean(-1, keepdim=True)
        est, eps = "dr_grpo", 0.0
    ids = torch.arange(n * P) // n
    seq, _ = rmk.group_advantages(r, ids, estimator=est, eps=eps, backend="reference")
    assert_close(seq, expect.reshape(-1), rtol=1e-10, atol=1e-10, name=mode)


def test_reference_matches_trl_grpo_scaling():
    G, P = 8, 9
    r = make_scores(G * P, dtype=torch.float64)
    grouped = r.view(-1, G)
    mean = grouped.mean(1).repeat_interleave(G)
    std = grouped.std(1).repeat_interleave(G)
    seq, _ = rmk.group_advantages(r, torch.arange(G * P) // G, estimator="grpo", eps=1e-4, backend="reference")
    assert_close(seq, (r - mean) / (std + 1e-4), rtol=1e-10, atol=1e-10, name="trl group")


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reference_returns_match_verl(gamma):
    B, T = 7, 31
    r = torch.randn(B, T, dtype=torch.float64)
    mask = make_mask("holes", B, T)
    got = rmk.reinforce_pp_returns(r, mask, gamma=gamma, backend="reference")
    assert_close(got, verl_reinforce_pp_returns(r, mask.double(), gamma), rtol=1e-12, atol=1e-12, name="returns")
    # ReMax's return: the plain reverse cumulative sum of r * mask (mask=None: every position valid)
    if gamma == 1.0:
        remax = (r * mask).flip(-1).cumsum(-1).flip(-1)
        assert_close(rmk.reinforce_pp_returns(r * mask, gamma=1.0, backend="reference"), remax, rtol=1e-12,
                     atol=1e-12, name="remax")


# ---------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------
def _sizes(backend):
    # odd B: column-major masks (below); even B with T a multiple of 4: row-major masks that the
    # CUDA kernel writes in 16-byte items
    return [(1, 5), (7, 16), (33, 45)] if backend == "triton" else [(1, 5), (59, 33), (97, 130), (1025, 7),
                                                                     (64, 128), (96, 12)]


def _dtypes(backend):
    return [torch.float32, torch.float64] if backend == "triton" else [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_backend_matches_reference(backend, device, estimator):
    skip_unless_available(backend, device)
    for B, T in _sizes(backend):
        for dtype in _dtypes(backend):
            for single in SINGLES:
                token = bool(torch.rand(()) < 0.5)
                scores = make_scores(B, T if token else None, dtype).to(device)
                mask = make_mask(["right", "left", "holes"][B % 3], B, T, device)
                if B % 2:
                    mask = mask.t().contiguous().t()  # column-major strides
                ids = make_groups(B).to(device)
                kw = dict(estimator=estimator, single=single, unbiased=bool(B % 2), eps=1e-6, f_norm=2.0)
                got = rmk.group_advantages(scores, ids, mask, backend=backend, **kw)
                exp = rmk.group_advantages(scores, ids, mask, backend="reference", **kw)
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                rtol, atol = tolerance(torch.float64 if dtype == torch.float64 else torch.float32)
                rtol, atol = max(rtol, 1e-6), max(atol, 1e-6)  # float64 sums in another order
                where = f"{estimator} B={B} T={T} {dtype} single={single}"
                assert got.seq_advantages.dtype == acc and got.advantages.dtype == acc
                assert got.advantages.is_contiguous()
                assert_close(got.seq_advantages, exp.seq_advantages, rtol=rtol, atol=atol, name=f"seq {where}")
                assert_close(got.advantages, exp.advantages, rtol=rtol, atol=atol, name=f"adv {where}")
                assert torch.all(got.advantages[~mask] == 0), where


@pytest.mark.parametrize("backend,device", backend_params())
def test_reinforce_pp_baseline_whitening_edges(backend, device):
    """The kernels whiten reinforce_pp_baseline from the rows' values and lengths (C++ CPU,
    CUDA, Triton), the reference over [B, T]: rows without a valid token get 0
    (seq too), a batch with at most one valid token is all 0, never NaN; ragged lengths."""
    skip_unless_available(backend, device)
    B, T = 37, 11
    scores = make_scores(B, None, torch.float32).to(device)
    ids = make_groups(B).to(device)
    cases = {"ragged, empty rows": make_mask("holes", B, T), "one valid token": torch.zeros(B, T, dtype=torch.bool),
             "no valid token": torch.zeros(B, T, dtype=torch.bool), "T = 0": torch.zeros(B, 0, dtype=torch.bool)}
    cases["ragged, empty rows"][::5] = False
    cases["one valid token"][3, 4] = True
    for name, mask in cases.items():
        mask = mask.to(device)
        for unbiased in (True, False):
            kw = dict(estimator="reinforce_pp_baseline", unbiased=unbiased)
            got = rmk.group_advantages(scores, ids, mask, backend=backend, **kw)
            exp = rmk.group_advantages(scores, ids, mask, backend="reference", **kw)
            where = f"{name} unbiased={unbiased}"
            assert_close(got.seq_advantages, exp.seq_advantages, rtol=1e-5, atol=1e-6, name=f"seq {where}")
            assert_close(got.advantages, exp.advantages, rtol=1e-5, atol=1e-6, name=f"adv {where}")
            assert not got.advantages.isnan().any() and not got.seq_advantages.isnan().any(), where
            empty = ~mask.any(1)
            assert torch.all(got.seq_advantages[empty] == 0), where
            if int(mask.sum()) <= 1:
                assert torch.all(got.seq_advantages == 0) and torch.all(got.advantages == 0), where
            else:
                assert got.seq_advantages[~empty].abs().sum() > 0, where


def _kernel_args(B, T, estimator, device="cpu", *, unbiased=True, single="zero"):
    """Arguments of the kernel op group_advantages_kernel: [B] scores (+3: a nonzero mean),
    ragged groups in any order, a mask with holes and empty rows."""
    scores = (make_scores(B, None, torch.float32) + 3.0).to(device)
    ids = make_groups(B).to(device)
    mask = make_mask("holes", B, T, device)
    mask[::6] = False
    code = _codes.GROUP_ESTIMATORS[estimator]
    return (scores, ids, mask, int(code), 1e-6, unbiased, int(_codes.GROUP_SINGLES[single]), 2.0, 1e-8)


def _nan_allocations(module, monkeypatch):
    """Every torch.empty of `module` (a host function's buffers) starts as NaN: fresh memory is
    often zeros, which would hide a slot the kernel reads without zeroing it."""
    empty = torch.empty
    monkeypatch.setattr(module.torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


@pytest.mark.triton
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_triton_phases_over_many_programs(estimator, monkeypatch):
    """The Triton kernel's phases are loops strided by the grid. On a GPU they run in one launch
    of PROGRAMS_PER_SM programs per multiprocessor with grid barriers between them; the
    interpreter runs programs one after the other (a barrier would wait forever), so here the
    single launch has one program and the phases also run one launch each over 2, 3 and 7
    programs: 600 rows are
    3 steps of the 256-row loops, and 600 x 40 is 10 tiles of 64 x 64 (phase 5). Every way
    matches the reference. Every buffer the host function allocates starts as NaN (fresh memory
    is often zeros): the kernel zeroes the workspace's slots it reads itself."""
    skip_unless_available("triton", "cpu")
    from rmkernels.triton import group_adv as tga

    _nan_allocations(tga, monkeypatch)
    B, T = 600, 40
    for unbiased, single in ((True, "zero"), (False, "self")):
        args = _kernel_args(B, T, estimator, unbiased=unbiased, single=single)
        e_seq, e_adv = gops.group_advantages_kernel("reference", *args)
        for programs, fused in ((None, True), (2, False), (3, False), (7, False)):
            seq, adv = tga.group_advantages(*args, programs=programs, fused=fused)
            where = f"{estimator} unbiased={unbiased} single={single} programs={programs} fused={fused}"
            assert_close(seq, e_seq, rtol=1e-6, atol=1e-6, name=f"seq {where}")
            assert_close(adv, e_adv, rtol=1e-6, atol=1e-6, name=f"adv {where}")
    with pytest.raises(ValueError, match="wait forever at its first barrier"):
        tga.group_advantages(*args, programs=2, fused=True)


@pytest.mark.triton
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_triton_runs_of_equal_ids(estimator, monkeypatch):
    """verl's layout, a prompt's responses side by side: the Triton kernel sums each run of equal
    ids within a step of rows (a segmented scan) before one atomic, and zeroes only the named
    groups' statistics (the first ids come in runs: rmkernels._codes.GROUP_ZERO_SAMPLE; every
    buffer the host function allocates starts as NaN). Runs of 1-6 rows, of 8, of 45 (across
    the 256-row steps and opo's 512-row tiles), runs of 8 then the rest shuffled (the sample
    sees runs) and the reverse, a run of ids outside [0, B) (NaN rows, no other group touched)
    and a NaN score inside a run, over one program and over 2 and 3 programs a phase."""
    skip_unless_available("triton", "cpu")
    from rmkernels.triton import group_adv as tga

    _nan_allocations(tga, monkeypatch)
    B, T = 600, 5
    base = list(_kernel_args(B, T, estimator))
    bad = torch.arange(B) // 8
    bad[252:260] = B + 1  # a run of one bad id across the step boundary at row 256
    nan_scores = base[0].clone()
    nan_scores[43] = float("nan")  # inside the run of rows 40-47
    cases = {name: (base[0], ids) for name, ids in run_layouts(B).items()}
    cases.update({"NaN inside a run": (nan_scores, torch.arange(B) // 8), "a run of bad ids": (base[0], bad)})
    for name, (scores, ids) in cases.items():
        args = (scores, ids, *base[2:])
        keep = ids < B  # the reference backend has no rule for bad ids: the other rows as a batch
        sub = (scores[keep], torch.unique(ids[keep], return_inverse=True)[1], args[2][keep], *args[3:])
        e_seq, e_adv = gops.group_advantages_kernel("reference", *sub)
        for programs, fused in ((None, True), (2, False), (3, False)):
            seq, adv = tga.group_advantages(*args, programs=programs, fused=fused)
            where = f"{estimator} {name} programs={programs} fused={fused}"
            if not keep.all():
                if estimator == "reinforce_pp_baseline":  # the whitening spreads the NaN (docs/ops.md)
                    continue
                assert torch.isnan(seq[~keep]).all(), where
                if estimator == "gpg":  # alpha counts every nonzero score of the batch
                    continue
                seq, adv = seq[keep], adv[keep]
            assert_close(seq, e_seq, rtol=1e-6, atol=1e-6, name=f"seq {where}")
            assert_close(adv, e_adv, rtol=1e-6, atol=1e-6, name=f"adv {where}")


def _profiled(call):
    """call()'s outputs and the names of the kernels the GPU ran for it, called once before
    (compiled, warm)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = call()
        torch.cuda.synchronize()
    return out, [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
@pytest.mark.parametrize("B,T", [(70_001, 67), (65_537, 128)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cuda_kernel_is_one_launch_at_scale(estimator, B, T):
    """The CUDA kernel op is one cooperative launch and nothing else on the GPU (no memset), on a
    batch larger than the grid the device holds at once (70,001 x 67 = 4.7M elements: every
    phase loops grid-stride; 65,537 x 128: the [B, T] write in 16-byte items), and matches the
    reference there."""
    skip_unless_available("cuda", "cuda")
    args = _kernel_args(B, T, estimator, "cuda")
    # warm first: the occupancy query is cached
    (seq, adv), on_gpu = _profiled(lambda: torch.ops.rmkernels.group_advantages_kernel(*args))
    assert len(on_gpu) == 1 and "group_advantages_kernel" in on_gpu[0], on_gpu
    e_seq, e_adv = gops.group_advantages_kernel("reference", *args)
    assert_close(seq, e_seq, rtol=1e-6, atol=1e-6, name=f"seq {estimator}")
    assert_close(adv, e_adv, rtol=1e-6, atol=1e-6, name=f"adv {estimator}")


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_triton_kernel_is_one_launch_at_scale(estimator):
    """The Triton kernel is one cooperative launch of PROGRAMS_PER_SM programs per multiprocessor
    and nothing else on the GPU (no memset), its phases separated by grid barriers, on a batch larger than
    one pass of the grid (70,001 x 67: every phase loops), and matches the reference there; so
    do its phases launched one by one (the way the interpreter tests them)."""
    skip_unless_available("triton", "cuda")
    from rmkernels.triton import group_adv as tga

    args = _kernel_args(70_001, 67, estimator, "cuda")
    (seq, adv), on_gpu = _profiled(lambda: gops.group_advantages_kernel("triton", *args))  # compiled first
    assert len(on_gpu) == 1 and "_group_adv_kernel" in on_gpu[0], on_gpu
    e_seq, e_adv = gops.group_advantages_kernel("reference", *args)
    assert_close(seq, e_seq, rtol=1e-6, atol=1e-6, name=f"seq {estimator}")
    assert_close(adv, e_adv, rtol=1e-6, atol=1e-6, name=f"adv {estimator}")
    for _ in range(3):  # again: the barrier's state is where the last call left it
        seq, adv = tga.group_advantages(*args)
    assert_close(adv, e_adv, rtol=1e-6, atol=1e-6, name=f"adv {estimator}, 4th call")
    seq, adv = tga.group_advantages(*args, programs=7, fused=False)
    assert_close(seq, e_seq, rtol=1e-6, atol=1e-6, name=f"seq {estimator}, one launch a phase")
    assert_close(adv, e_adv, rtol=1e-6, atol=1e-6, name=f"adv {estimator}, one launch a phase")


@pytest.mark.parametrize("layout", ["verl", "shuffled"])
def test_cpu_streamed_outputs_and_run_layouts(layout):
    """The C++ CPU kernel's paths by size and layout: [B, T] outputs over its streaming-store
    threshold (8 MiB: built in 8 KiB tiles, so rows of odd length split across tiles and start
    unaligned; a column-major mask), one column with a million rows (the flat loop), and ids in
    runs of equal neighbours (verl's layout: the statistics add one run at a time) or shuffled
    (runs of one). float32 outputs equal the reference to one float32 ulp (same float64 sums, same
    order, the formula applied as a r + c; reinforce_pp_baseline's whitening to float32
    rounding); float64 to its last bits."""
    skip_unless_available("cpu", "cpu")
    for B, T, dtype in [(4099, 517, torch.float32), (2100, 501, torch.float64), (2**20 + 3, 1, torch.float64)]:
        assert B * T * (4 if dtype == torch.float32 else 8) > 8 * 2**20  # over the streaming threshold
        ids = make_groups(B, max_size=9, shuffle=layout == "shuffled")
        scores = make_scores(B, dtype=dtype)
        mask = make_mask("holes", B, T)
        if dtype == torch.float64 and T > 1:
            mask = mask.t().contiguous().t()
        for estimator in ESTIMATORS if T > 1 else ["grpo", "rloo"]:  # T = 1: the layout is what is tested
            for single in SINGLES:
                kw = dict(estimator=estimator, single=single, f_norm=2.0)
                got = rmk.group_advantages(scores, ids, mask, backend="cpu", **kw)
                exp = rmk.group_advantages(scores, ids, mask, backend="reference", **kw)
                # float32: the same float64 statistics in the same order, but the kernel applies
                # the formula as a r + c (group_adv_math.h's coef_of / apply), whose float64 result
                # can differ from the reference's in its last bits: rounded to float32 that is at
                # most one float32 ulp (2**-23 relative; 1e-12 absolute where the value cancels
                # to ~0). The reinforce_pp_baseline whitening's float64 sums are split over lanes.
                rtol = atol = 1e-12
                if dtype == torch.float32:
                    rtol = 1e-6 if estimator == "reinforce_pp_baseline" else 2.0**-23
                    atol = 1e-6 if estimator == "reinforce_pp_baseline" else 1e-12
                where = f"{layout} {estimator} B={B} T={T} {dtype} single={single}"
                assert_close(got.seq_advantages, exp.seq_advantages, rtol=rtol, atol=atol, name=f"seq {where}")
                assert_close(got.advantages, exp.advantages, rtol=rtol, atol=atol, name=f"adv {where}")


@pytest.mark.parametrize("backend,device", backend_params())
def test_returns_match_reference(backend, device):
    skip_unless_available(backend, device)
    for B, T in _sizes(backend):
        for dtype in _dtypes(backend):
            for gamma in (1.0, 0.95):
                r = torch.randn(B, T + 3, device=device).to(dtype)[:, 3:]  # non-contiguous rows
                mask = make_mask("holes", B, T, device)
                got = rmk.reinforce_pp_returns(r, mask, gamma=gamma, backend=backend)
                exp = rmk.reinforce_pp_returns(r, mask, gamma=gamma, backend="reference")
                rtol, atol = tolerance(torch.float64 if dtype == torch.float64 else torch.float32)
                assert_close(got, exp, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5), name=f"returns {B}x{T} {dtype}")
            got = rmk.reinforce_pp_returns(r, None, backend=backend)
            assert_close(got, rmk.reinforce_pp_returns(r, None, backend="reference"), rtol=1e-5, atol=1e-5,
                         name="mask=None")


@pytest.mark.parametrize("backend,device", backend_params())
def test_returns_are_gae_with_zero_values(backend, device):
    """REINFORCE++'s return is GAE's advantage with values 0 and lam 1 (the same rule over
    holes: R_next carried over masked positions, 0 there), the route every backend takes:
    bit for bit equal to rmk.gae's advantages with explicit zero values, on masks with holes,
    empty and full rows, gamma 0 (signed zeros included) to 1, and equal to verl's loop."""
    skip_unless_available(backend, device)
    # the interpreter steps every program through every position in Python: fewer rows there
    sizes = ((1, 1), (9, 33), (4, 130)) if backend == "triton" and TRITON_INTERPRET else ((1, 1), (59, 33), (97, 130))
    for dtype in (torch.float32, torch.float64):
        for B, T in sizes:
            r = torch.randn(B, T, dtype=dtype, device=device)
            r[torch.rand(B, T, device=device) < 0.1] = -0.0
            mask = make_mask("holes", B, T, device)
            for gamma in (1.0, 0.95, 0.5, 0.0):
                got = rmk.reinforce_pp_returns(r, mask, gamma=gamma, backend=backend)
                adv, _ = rmk.gae(r, torch.zeros_like(r), mask, gamma=gamma, lam=1.0, backend=backend)
                bits = torch.int64 if dtype == torch.float64 else torch.int32
                assert torch.equal(got.view(bits), adv.view(bits)), f"{backend} {dtype} {B}x{T} gamma={gamma}"
                assert_close(got, verl_reinforce_pp_returns(r.double(), mask.double(), gamma), rtol=1e-5, atol=1e-5,
                             name=f"verl {dtype} {B}x{T} gamma={gamma}")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_nan_stays_in_its_group(backend, device):
    skip_unless_available(backend, device)
    B, T = 40, 9
    ids = (torch.arange(B) // 4)[torch.randperm(B)].to(device)
    scores = torch.randn(B, device=device)
    victim = int(torch.randint(0, B, ()).item())
    scores[victim] = float("nan")
    mask = make_mask("holes", B, T, device)
    # opo's baseline of a group with no valid token at all is 0 / 0 (the formula, as verl's): NaN
    # sequence advantages without any NaN input; "holes" masks give such groups now and then
    group_len = torch.zeros(B, dtype=torch.int64, device=device).index_add_(0, ids, mask.sum(1))[ids]
    for est in ESTIMATORS[:-1]:  # reinforce_pp_baseline whitens over the batch
        seq, adv = rmk.group_advantages(scores, ids, mask, estimator=est, backend=backend)
        same = ids == ids[victim]
        if est == "opo":
            assert torch.isnan(seq[group_len == 0]).all(), est
            same = same | (group_len == 0)
        assert torch.isnan(seq[same]).all(), est
        assert not torch.isnan(seq[~same]).any(), est
        assert not torch.isnan(adv[~same]).any() and torch.all(adv[~mask] == 0), est
        clean = scores.clone()
        clean[victim] = 1.0  # nonzero, as NaN is for gpg's batch count of nonzero scores
        ref = rmk.group_advantages(clean, ids, mask, estimator=est, backend=backend).seq_advantages
        assert_close(seq[~same], ref[~same], rtol=1e-6, atol=1e-6, name=est)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_reinforce_pp_baseline_non_finite_score_in_empty_row(backend, device):
    """reinforce_pp_baseline whitens over the valid tokens of the batch: a NaN or inf score alone
    in its group, in a row with no valid token, takes part in nothing. The kernels summed the
    statistics as len * value, 0 * NaN = NaN, which made every row of the batch NaN (C++ CPU,
    CUDA and Triton; the reference was right): every output must be that of a 0 score there."""
    skip_unless_available(backend, device)
    B, T = 23, 7
    for dtype in (torch.float32, torch.float64):
        scores = torch.randn(B, dtype=dtype, device=device)
        ids = (torch.arange(B, device=device) // 3).clamp(max=6)
        mask = make_mask("holes", B, T, device)
        mask[0] = True
        victim = B - 2
        ids[victim] = B - 1  # a group of one (in a bigger group the NaN is the group's: documented)
        mask[victim] = False
        for bad in (float("nan"), float("inf"), float("-inf")):
            for single in ("zero", "self"):
                kw = dict(estimator="reinforce_pp_baseline", single=single, backend=backend)
                dirty = scores.clone()
                dirty[victim] = bad
                seq, adv = rmk.group_advantages(dirty, ids, mask, **kw)
                clean = rmk.group_advantages(scores, ids, mask, **kw)
                where = f"{dtype} score {bad} single={single}"
                assert torch.isfinite(seq).all() and torch.isfinite(adv).all(), where
                if device == "cpu":  # one order of the sums every call: bit for bit
                    assert torch.equal(seq, clean.seq_advantages) and torch.equal(adv, clean.advantages), where
                else:  # a GPU kernel's float64 atomics add in the order the warps come: last bits vary by call
                    tol = 1e-12 if dtype == torch.float64 else 1e-6
                    assert_close(seq, clean.seq_advantages, rtol=tol, atol=tol, name=where)
                    assert_close(adv, clean.advantages, rtol=tol, atol=tol, name=where)
                assert seq[victim] == 0 and seq[~mask.any(1)].eq(0).all(), where


def equal_reward_groups(device="cpu"):
    """(scores, ids): groups of 16, 7, 8, 9 and 2 responses, each of one reward that float32 does
    not hold exactly (0.1, 0.7, 1/3, 1000.01, -2.3; the first four are groups whose float32 mean
    is not the reward, so float32 statistics give a std of ~1e-8 to ~1e-4), rows shuffled."""
    values = [0.1, 0.7, 1 / 3, 1000.01, -2.3]
    sizes = [16, 7, 8, 9, 2]
    scores = torch.cat([torch.full((n,), v) for v, n in zip(values, sizes)])
    ids = torch.repeat_interleave(torch.arange(len(sizes)) * 7, torch.tensor(sizes))
    perm = torch.randperm(len(ids))
    return scores[perm].to(device), ids[perm].to(device)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_equal_rewards_give_exact_zeros(backend, device):
    """A group of equal rewards has advantage exactly 0 by every estimator (float64 sums of
    float32 values are exact, so the mean is the reward), where the frameworks' float32
    statistics give noise divided by std + eps (docs: verl_critic_free, openrlhf_critic_free)."""
    skip_unless_available(backend, device)
    scores, ids = equal_reward_groups(device)
    mask = torch.ones(len(ids), 5, dtype=torch.bool, device=device)  # opo: every group has tokens
    for est in ESTIMATORS:
        for eps in (1e-6, 0.0):
            seq, adv = rmk.group_advantages(scores, ids, mask, estimator=est, eps=eps, backend=backend)
            if est == "grpo" and eps == 0.0:
                assert torch.isnan(seq).all(), "grpo, eps 0: 0 / 0"
                continue
            assert torch.equal(seq, torch.zeros_like(seq)), (est, eps, seq)
            assert torch.equal(adv, torch.zeros_like(adv)), (est, eps)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("layout", ["expanded", "transposed"])
def test_equal_token_reward_rows_give_exact_zeros_in_any_layout(backend, device, layout):
    """Equal rows of [B, T] token rewards score alike whatever the layout, so a group of them has
    advantage exactly 0. torch sums the rows of a transposed or expanded float32 [B, T] across
    rows, where the last rows round differently (B = 5, T = 7 here: the fifth row one ulp off),
    and grpo divides that ulp by std + eps (found by the long fuzz profile: 0.0228 and -0.091
    for a group of five equal rows, eps 1e-6)."""
    skip_unless_available(backend, device)
    gen = torch.Generator().manual_seed(0)
    B, T = 5, 7
    row = torch.randn(1, T, generator=gen) * torch.exp(torch.randn(1, T, generator=gen) * 3)
    if layout == "expanded":
        scores = row.to(device).expand(B, T)
    else:
        scores = row.repeat(B, 1).t().contiguous().t().to(device)
    assert scores.stride(0) < scores.stride(1)
    ids = torch.zeros(B, dtype=torch.int64, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    for est in ESTIMATORS:
        seq, adv = rmk.group_advantages(scores, ids, mask, estimator=est, eps=1e-6, unbiased=False,
                                        backend=backend)
        assert torch.equal(seq, torch.zeros_like(seq)), (est, seq)
        assert torch.equal(adv, torch.zeros_like(adv)), est


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_empty_batches(backend, device):
    skip_unless_available(backend, device)
    for B, T in [(0, 5), (0, 0), (3, 0)]:
        ids = torch.zeros(B, dtype=torch.int64, device=device)
        scores = torch.randn(B, device=device)
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
        for est in ESTIMATORS:
            seq, adv = rmk.group_advantages(scores, ids, mask, estimator=est, backend=backend)
            assert seq.shape == (B,) and adv.shape == (B, T)
            # T = 0: the per-sequence values still exist (opo: no valid token, 0 / 0; the
            # reinforce_pp_baseline whitening of no token: 0), as the reference gives them
            want = rmk.group_advantages(scores, ids, mask, estimator=est, backend="reference").seq_advantages
            assert_close(seq, want, rtol=1e-6, atol=1e-6, name=f"{est} seq, B={B} T={T}")
        if B:
            r = scores.double()
            grpo = rmk.group_advantages(scores, ids, mask, backend=backend).seq_advantages
            assert_close(grpo, ((r - r.mean()) / (r.std() + 1e-6)).float(), rtol=1e-6, atol=1e-6, name="grpo, T=0")
        out = rmk.reinforce_pp_returns(torch.randn(B, T, device=device), torch.ones(B, T, device=device),
                                       backend=backend)
        assert out.shape == (B, T)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_single_rules_and_mask_none(backend, device):
    skip_unless_available(backend, device)
    scores = torch.tensor([1.5, -2.0, 3.0, 0.5], device=device)
    ids = torch.tensor([0, 1, 1, 3], device=device)  # two groups of one
    zero = rmk.group_advantages(scores, ids, estimator="rloo", backend=backend)
    assert zero.advantages.shape == (4, 1)
    assert_close(zero.seq_advantages[[0, 3]], scores[[0, 3]], rtol=0, atol=0, name="zero keeps the score")
    selfr = rmk.group_advantages(scores, ids, estimator="grpo", single="self", backend=backend)
    assert torch.all(selfr.seq_advantages[[0, 3]] == 0)
    grpo = rmk.group_advantages(scores, ids, estimator="grpo", backend=backend).seq_advantages
    assert_close(grpo[[0, 3]], scores[[0, 3]] / (1 + 1e-6), rtol=1e-6, atol=1e-7, name="zero: sigma 1")
    tok = torch.randn(4, 6, device=device)
    out = rmk.group_advantages(tok, ids, backend=backend)  # mask None: every token valid
    assert_close(out.advantages, out.seq_advantages[:, None].expand(4, 6), rtol=0, atol=0, name="broadcast")


# ---------------------------------------------------------------------------------------
# opcheck, torch.compile, the eager path
# ---------------------------------------------------------------------------------------
def _op_samples(device):
    """(op name, arguments but the backend) of each op of this file."""
    B, T = 11, 7
    scores = make_scores(B).to(device)
    ids = make_groups(B).to(device)
    mask = make_mask("holes", B, T)
    mask[:, 0] = True  # no NaN outputs (opo's 0/0 of a group without tokens): opcheck compares without equal_nan
    mask = mask.to(device)
    r = torch.randn(B, T, device=device)
    return [("reinforce_pp_returns", (r, mask, 0.9))] + [
        ("group_advantages_kernel", (scores, ids, mask, int(gops.GROUP_ESTIMATORS[e]), 1e-6, True, s, 2.0, 1e-8))
        for e, s in zip(ESTIMATORS, [0, 1, 0, 1, 0, 1])] + [
        ("group_advantages", (scores, ids, mask, e, 1e-6, True, s, 2.0, 1e-8))
        for e, s in zip(ESTIMATORS, ["zero", "self"] * 3)]


test_opcheck = opcheck_test(_op_samples)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    skip_unless_available(backend, "cpu")
    B, T = 12, 10
    tok = make_scores(B, T)
    ids = make_groups(B)
    mask = make_mask("holes", B, T)

    def f(tok, ids, mask):
        seq, adv = rmk.group_advantages(tok, ids, mask, estimator="grpo", backend=backend)
        _, adv2 = rmk.group_advantages(tok.sum(-1), ids, mask, estimator="reinforce_pp_baseline", backend=backend)
        return seq, adv, adv2, rmk.reinforce_pp_returns(tok, mask, gamma=0.99, backend=backend)

    assert_compiled_matches(f, tok, ids, mask)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_eager_path_same_bits_as_the_op(backend, monkeypatch):
    skip_unless_available(backend, "cpu")
    B, T = 30, 17
    tok, ids, mask = make_scores(B, T), make_groups(B), make_mask("holes", B, T)
    fast = [rmk.group_advantages(tok, ids, mask, estimator=e, backend=backend) for e in ESTIMATORS]
    fast.append(rmk.reinforce_pp_returns(tok, mask, backend=backend))
    monkeypatch.setattr(rmk._library, "EAGER_FAST_PATH", False)
    slow = [rmk.group_advantages(tok, ids, mask, estimator=e, backend=backend) for e in ESTIMATORS]
    slow.append(rmk.reinforce_pp_returns(tok, mask, backend=backend))
    for a, b in zip(fast, slow):
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)  # same bits (opo may give NaN)


# ---------------------------------------------------------------------------------------
# rmk.group_ids
# ---------------------------------------------------------------------------------------
def test_group_ids():
    uids = np.array(["b", "a", "b", "c", "a"], dtype=object)
    assert rmk.group_ids(uids).tolist() == [0, 1, 0, 2, 1]  # first-seen order
    # runs of equal neighbours (verl's layout) and any order give the dict pass's ids
    labels = np.array([f"u{int(i)}" for i in torch.randint(0, 30, (200,)).sort().values], dtype=object)
    for arr in (labels, labels[np.random.permutation(200)], labels[::-1]):
        expect = {}
        assert rmk.group_ids(arr).tolist() == [expect.setdefault(u, len(expect)) for u in arr]
        assert rmk.group_ids(list(arr)).tolist() == rmk.group_ids(arr).tolist()
    assert rmk.group_ids(["x", ("t", 1), "x", ("t", 1)]).tolist() == [0, 1, 0, 1]
    assert rmk.group_ids(np.array([7, 3, 7])).tolist() == [1, 0, 1]
    assert rmk.group_ids(torch.tensor([9, 2, 9, 4])).tolist() == [2, 0, 2, 1]
    assert rmk.group_ids([]).shape == (0,)
    assert rmk.group_ids(np.array([], dtype=object)).dtype == torch.int64
    # labels given straight to group_advantages are mapped the same way
    s = torch.randn(5)
    assert torch.equal(rmk.group_advantages(s, uids, backend="reference").seq_advantages,
                       rmk.group_advantages(s, rmk.group_ids(uids), backend="reference").seq_advantages)
    with pytest.raises(TypeError, match="hashable"):
        rmk.group_ids([[1], [2]])
    with pytest.raises(TypeError, match="uids"):
        rmk.group_ids("abc")
    with pytest.raises(ValueError, match="uids"):
        rmk.group_ids(torch.zeros(3))


class _Label:
    """A label with its own __hash__ / __eq__ (Python code runs inside the compiled pass)."""

    def __init__(self, k):
        self.k = k

    def __hash__(self):
        return hash(self.k % 3)  # collisions on purpose

    def __eq__(self, other):
        return isinstance(other, _Label) and self.k == other.k


def _label_pool(rng):
    nan = float("nan")
    s = "uid-shared"
    return [s, "uid-shared"[:3] + "-shared", "a", "b", "", None, 0, 1, 1.0, True, False, 2**70, -1.5, nan,
            float("nan"), (1, "t"), ("x",), b"bytes", frozenset({1}), _Label(1), _Label(4), _Label(1)] + \
        [f"u{int(i)}" for i in rng.integers(0, 40, 8)]


@pytest.mark.parametrize("seed", range(40))
def test_group_ids_compiled_and_fallback_equal_the_dict_pass(seed, monkeypatch):
    """rmk.group_ids of numpy object arrays (the compiled neighbour-then-hash pass, and the
    numpy/dict fallback without the extension) gives the ids of a plain dict pass over the
    labels, whatever the order, the runs, the label types (str, None, int, float, NaN objects,
    1 == 1.0 == True, tuples, objects whose __eq__ is Python code) and the array's strides."""
    rng = np.random.default_rng(seed)
    pool = _label_pool(rng)
    n = int(rng.integers(0, 300))
    picks = rng.integers(0, len(pool), n)
    if seed % 2:  # verl's layout: runs of the same object
        picks = np.repeat(picks[: max(n // 4, 1)], 4)[:n]
    arr = np.empty(len(picks), dtype=object)
    arr[:] = [pool[i] for i in picks]
    views = [arr, arr[::-1], arr[::2], arr[1:]]
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(gops, "_ids_from_objects", None)
        for v in views:
            expect = {}
            want = [expect.setdefault(k, len(expect)) for k in v.tolist()]
            assert rmk.group_ids(v).tolist() == want, (seed, fallback)


class _Str(str):
    """A str subclass with its own hash: not an exact str, so never hashed ahead."""

    def __hash__(self):
        return hash(str(self)) ^ 1


@pytest.mark.parametrize("layout", ["runs", "shuffled"])
def test_group_ids_compiled_prefetching_pass(layout):
    """Arrays of 2^19 labels and more take the compiled pass's prefetching path (exact str
    hashes taken ahead, table slots fetched early): the ids still equal a dict pass's, for uid
    strings (distinct objects of equal value too), str subclasses with their own hash, ints,
    objects whose __eq__ is Python code, in runs and shuffled, every stride; and an unhashable
    label deep in the array still raises."""
    skip_unless_available("cpu", "cpu")
    rng = np.random.default_rng(7)
    n = (1 << 19) + 4099
    uids = [f"uid-{i:06d}" for i in range(n // 8)]
    pool = uids + [s + "" for s in uids[:500]] + [_Str(s) for s in uids[:300]] + list(range(200)) + \
        [_Label(k) for k in range(50)] + [None, float("nan"), 1.0, True]
    picks = rng.integers(0, len(pool), n // 8 + 1)
    picks = np.repeat(picks, 8)[:n] if layout == "runs" else rng.integers(0, len(pool), n)
    arr = np.empty(n, dtype=object)
    arr[:] = [pool[i] for i in picks]
    c_only = np.array([x if type(x) in (str, int, float, bool, type(None)) else "c" for x in arr], dtype=object)
    for v in (arr, arr[::-1], arr[1:], c_only, c_only[::-1]):  # each above the prefetch threshold
        expect = {}
        want = [expect.setdefault(k, len(expect)) for k in v.tolist()]
        assert gops._ids_of_objects(v).tolist() == want, (layout, v.strides)
    # labels whose hash and == are C code (str, int, float, bool, None) stay in the compiled pass;
    # the others (str subclasses, _Label) hand the array to the Python pass over a copy
    assert gops._ids_from_objects(c_only) is not None and gops._ids_from_objects(arr) is None
    arr[n - 20] = [1, 2]
    with pytest.raises(TypeError, match="hashable"):
        rmk.group_ids(arr)


def test_group_ids_compiled_errors():
    skip_unless_available("cpu", "cpu")
    for bad in ([1, 2], {"a": 1}, np.zeros(2)):
        arr = np.empty(3, dtype=object)
        arr[:] = ["a", "a", None]
        arr[1] = bad
        with pytest.raises(TypeError, match="hashable"):
            rmk.group_ids(arr)

    class Boom:
        def __hash__(self):
            return 0

        def __eq__(self, other):
            raise RuntimeError("eq failed")

    arr = np.empty(2, dtype=object)
    arr[:] = [Boom(), Boom()]
    with pytest.raises(RuntimeError, match="eq failed"):  # the label's own error, as a dict raises it
        rmk.group_ids(arr)
    with pytest.raises(RuntimeError, match="eq failed"):
        dict.fromkeys(arr.tolist())
    with pytest.raises(TypeError, match="numpy object array"):
        gops._ids_from_objects(np.zeros(3))


_HOSTILE_LABELS = {
    # a label whose __eq__ frees the buffer the compiled pass reads (numpy's resize without its
    # reference check): a segfault when the pass read it by raw pointer
    "resize": """
class L:
    def __init__(self, k): self.k = k
    def __hash__(self): return 7
    def __eq__(self, o):
        A.resize(1, refcheck=False)
        return False
A = np.array([L(i) for i in range(2000)], dtype=object)
want = list(range(2000))
""",
    # an ndarray subclass whose __array_interface__ describes more memory than it holds
    "subclass": """
class Fake(np.ndarray):
    @property
    def __array_interface__(self):
        d = dict(np.ndarray.__array_interface__.__get__(self)); d["shape"] = (10**6,); return d
A = np.array(["a", "b", "a"], dtype=object).view(Fake)
want = [0, 1, 0]
""",
}


@pytest.mark.parametrize("case", list(_HOSTILE_LABELS))
def test_group_ids_hostile_labels_and_arrays(case):
    """rmk.group_ids survives labels and arrays that lie (in a subprocess: a crash would be a
    segfault): the compiled pass reads exact numpy.ndarray objects only and hands arrays with
    labels whose == is Python code to the Python pass over a copy."""
    import subprocess
    import sys

    code = "import numpy as np, rmkernels as rmk\n" + _HOSTILE_LABELS[case] + \
        "got = rmk.group_ids(A).tolist()\nassert got == want, got\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


def test_group_ids_raw_pass_refuses_other_objects():
    skip_unless_available("cpu", "cpu")

    class X:
        __array_interface__ = {"typestr": "|O", "shape": (3,), "data": (0, False), "strides": None}

    with pytest.raises(TypeError, match=r"numpy.ndarray \(not a subclass\)"):
        gops._ids_from_objects(X())
    with pytest.raises(ValueError, match="meta tensor"):
        rmk.group_ids(torch.tensor([1, 2, 1], device="meta"))


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
BAD = [
    (dict(scores=torch.zeros(4, 2, 1)), ValueError, "scores"),
    (dict(scores=torch.zeros(4, dtype=torch.int64)), TypeError, "scores"),
    (dict(group_ids=torch.zeros(3, dtype=torch.int64)), ValueError, "group_ids"),
    (dict(group_ids=torch.zeros(4)), TypeError, "group_ids"),
    (dict(group_ids=torch.tensor([0, 1, 4, 1])), ValueError, "group_ids"),
    (dict(group_ids=torch.tensor([0, -1, 2, 1])), ValueError, "group_ids"),
    (dict(mask=torch.ones(3, 5)), ValueError, "mask"),
    (dict(mask=torch.ones(4)), ValueError, "mask"),
    (dict(estimator="ppo"), ValueError, "estimator"),
    (dict(single="drop"), ValueError, "single"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(unbiased=1), TypeError, "unbiased"),
    (dict(f_norm=0.0), ValueError, "f_norm"),
    (dict(backend="tpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("bad,exc,name", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_inputs(bad, exc, name):
    args = dict(scores=torch.zeros(4), group_ids=torch.tensor([0, 0, 1, 1]), mask=torch.ones(4, 5))
    kw = {}
    for k, v in bad.items():
        (args if k in args else kw)[k] = v
    with pytest.raises(exc, match=name):
        rmk.group_advantages(args["scores"], args["group_ids"], args["mask"], **kw)


def test_bad_returns_inputs():
    with pytest.raises(ValueError, match="token_rewards"):
        rmk.reinforce_pp_returns(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="mask"):
        rmk.reinforce_pp_returns(torch.zeros(3, 4), torch.ones(3, 5))
    with pytest.raises(ValueError, match="gamma"):
        rmk.reinforce_pp_returns(torch.zeros(3, 4), torch.ones(3, 4), gamma=-0.5)


def test_direct_op_calls_check_their_arguments():
    """torch.ops.rmkernels.group_advantages / reinforce_pp_returns called directly: the check hook
    names the bad argument on every path (the ids range is a data check of CPU tensors)."""
    op = torch.ops.rmkernels.group_advantages
    s, ids, m = torch.randn(4), torch.tensor([0, 0, 1, 1]), torch.ones(4, 3, dtype=torch.bool)
    args = (s, ids, m, "grpo", 1e-6, True, "zero", 1.0, 1e-8, "cpu")
    op(*args)
    for i, bad, exc, name in [(1, ids.float(), TypeError, "group_ids"), (1, torch.tensor([0, 4, 1, 1]), ValueError,
                                                                         "group_ids"),
                              (2, m.float(), TypeError, "mask"), (0, torch.randn(5), ValueError, "group_ids"),
                              (3, "ppo", ValueError, "estimator"), (6, "one", ValueError, "single"),
                              (9, "gpu", ValueError, "backend")]:
        with pytest.raises(exc, match=name):
            op(*args[:i], bad, *args[i + 1:])
    with pytest.raises(TypeError, match="mask"):
        torch.ops.rmkernels.reinforce_pp_returns(torch.randn(2, 3), torch.ones(2, 3), 1.0, "cpu")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_gpg_counts_a_nan_score_as_nonzero(backend, device):
    """GPG's alpha = B / (the batch's nonzero scores) counts a NaN score (as verl's
    ``count_nonzero`` does): scores [1, NaN, 0, 2] in groups {0, 1}, {2, 3} give alpha 4 / 3 and
    group 1 ±4/3 (a kernel that skipped NaN gave ±2; the NaN test above compared gpg with
    nothing)."""
    skip_unless_available(backend, device)
    s = torch.tensor([1.0, float("nan"), 0.0, 2.0], device=device)
    ids = torch.tensor([0, 0, 1, 1], device=device)
    seq = rmk.group_advantages(s, ids, estimator="gpg", backend=backend).seq_advantages
    assert torch.isnan(seq[:2]).all()
    assert_close(seq[2:].cpu(), torch.tensor([-4 / 3, 4 / 3]), rtol=1e-6, atol=0, name="gpg")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_gpg_all_zero_scores_give_zeros(backend, device):
    """A batch whose scores are all 0 (no response solved anything): alpha = B / max(0, 1) and
    every advantage 0, never B / 0 * 0 = NaN (verl's clamp; only the fuzz suite caught a
    mutation that dropped it)."""
    skip_unless_available(backend, device)
    s = torch.zeros(6, device=device)
    ids = torch.tensor([0, 0, 1, 1, 1, 2], device=device)
    out = rmk.group_advantages(s, ids, torch.ones(6, 3, dtype=torch.bool, device=device), estimator="gpg",
                               backend=backend)
    assert (out.seq_advantages == 0).all() and (out.advantages == 0).all()
