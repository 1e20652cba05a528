"""Triton kernel of the critic-free group advantages (docs/ops.md section 5).

``group_advantages`` is one launch on a GPU, no memset before it and no host synchronisation:
``_group_adv_kernel`` runs the phases of ``csrc/cuda/group_adv.cu`` in order, each a loop over
its work strided by the grid, with a grid barrier (``_grid_barrier``) between them:

0. the float64 workspace's slots that the launch reads are zeroed: gpg's nonzero count,
   reinforce_pp_baseline's whitening count, sum and centred squares (its row lengths are each
   written in phase 1), and the groups' statistics: when the first ids come in runs
   (``rmkernels._codes.GROUP_ZERO_SAMPLE``) only those of the groups that rows name, each run
   of equal ids storing its group's once, else all [B, 5];
1. float64 atomics into the statistics slot of each group id: count, sum (``opo``: the rows'
   lengths and length x score; ``gpg``: the batch's nonzero count; ``reinforce_pp_baseline``:
   each row's length stored), each run of equal ids within a step of rows (verl's layout: a
   prompt's responses side by side) summed first (a segmented scan), one atomic a run;
2. ``grpo`` only: the centred squares (r - mean)^2 of each group from the complete means (two
   passes: no cancellation), summed over runs as in phase 1;
3. 4. ``reinforce_pp_baseline`` only: the whitening count and sum of the valid tokens, then their
   centred squares, from the rows' values and lengths (a row holds len copies of its value, as
   the C++ kernels' whitening: passes over B, not over [B, T]);
5. the rows' values: the per-sequence formula (the arithmetic of ``rmkernels/group_adv_math.h``,
   float64, rounded once; ``reinforce_pp_baseline`` then whitened) into ``seq_advantages``;
6. the [B, T] broadcast in [row block, T block] tiles: each row's value read back from
   ``seq_advantages``, written under the mask (the formula and its gathers of the groups'
   statistics run once per row, in phase 5, not once per tile).

The barrier needs every program resident at once: the launch is cooperative
(``launch_cooperative_grid``) with ``PROGRAMS_PER_SM`` (2) programs of 8 warps per
multiprocessor at most, the kernel compiled with at most ``MAX_REGISTERS`` (128) registers a
thread so that they fit (``resident_programs``). Its state is a
uint32 per device and stream that every barrier returns to where it was (``_semaphore``), so it
needs no reset between calls (in a CUDA-graph capture: a fresh one, its zero fill captured).
Under the interpreter (``TRITON_INTERPRET=1``) programs run one after the other, so the single
launch has one program; ``programs=`` / ``fused=False`` (tests) run each phase as its own
launch of many programs instead, with no barrier: the same code.

Bytes moved: 16-24 B per response in phases 1-5, the mask once (twice for ``opo`` and
``reinforce_pp_baseline``) and the [B, T] output once in phase 6. Atomics make the float64 sums'
order vary between runs in their last bits (float32 outputs are unaffected in practice).

``reinforce_pp_returns`` runs ``rmkernels.triton.ppo.gae`` (values 0, lam 1; ops/group_adv.py).
"""
import torch
import triton
import triton.language as tl

from rmkernels._codes import GROUP_ZERO_MAX_HEADS, GROUP_ZERO_SAMPLE, GroupEstimator, GroupSingle
from rmkernels.ops.group_adv import check_group_scalars
from rmkernels.triton._common import acc_dtype, block_size, check_code, check_tensor, interpreting, scalar, split_float
from rmkernels.triton.ppo import _whiten_mean, _whiten_params

_GRPO = tl.constexpr(int(GroupEstimator.GRPO))
_RLOO = tl.constexpr(int(GroupEstimator.RLOO))
_OPO = tl.constexpr(int(GroupEstimator.OPO))
_GPG = tl.constexpr(int(GroupEstimator.GPG))
_RPPB = tl.constexpr(int(GroupEstimator.REINFORCE_PP_BASELINE))
_SELF = tl.constexpr(int(GroupSingle.SELF))
_ZERO_SAMPLE, _ZERO_MAX_HEADS = tl.constexpr(GROUP_ZERO_SAMPLE), tl.constexpr(GROUP_ZERO_MAX_HEADS)

NSTATS = 5  # count, sum, centred squares, sum of lengths, sum of length x score
_NSTATS = tl.constexpr(NSTATS)
# after the [B, 5] statistics: gpg's nonzero count, reinforce_pp_baseline's whitening count,
# sum and centred squares, then (reinforce_pp_baseline) the rows' lengths [B]
_NONZERO, _WHITEN, _ROW_LEN = tl.constexpr(0), tl.constexpr(1), tl.constexpr(4)
EXTRA = 4
_EXTRA = tl.constexpr(EXTRA)
# the phases (module docstring); a launch runs phases FIRST..LAST
ZERO, SUMS, SQUARES, WHITEN_SUMS, WHITEN_SQUARES, ROWS, WRITE = range(7)
_ZERO, _SUMS, _SQUARES = tl.constexpr(ZERO), tl.constexpr(SUMS), tl.constexpr(SQUARES)
_WHITEN_SUMS, _WHITEN_SQUARES = tl.constexpr(WHITEN_SUMS), tl.constexpr(WHITEN_SQUARES)
_ROWS, _WRITE = tl.constexpr(ROWS), tl.constexpr(WRITE)

NUM_WARPS = 8
# Programs a cooperative launch puts on each multiprocessor (all must be resident at once).
# Registers are what limit a program of NUM_WARPS warps here (its shared memory is a few KiB):
# every sm_80+ multiprocessor has 64K 32-bit registers, so the kernel is compiled with at most
# MAX_REGISTERS a thread (128), and PROGRAMS_PER_SM programs fit. Uncapped, ptxas gave the
# kernel 42-126 registers, 168-249 for opo / reinforce_pp_baseline with a contiguous mask
# before their length pass counted in int32 over half-tiles (LEN_B); capped, none spills
# (tests/test_gpu_readiness.py checks every launch configuration for sm_90).
PROGRAMS_PER_SM = 2
MAX_REGISTERS = 65536 // (PROGRAMS_PER_SM * NUM_WARPS * 32) // 8 * 8  # allocated 8 a thread at a time
BLOCK_B = 256  # rows a step of phases 0-5
TILE = 4096  # elements of a phase-6 tile: (TILE // BLOCK_T) rows x BLOCK_T positions
# (opo / reinforce_pp_baseline's phase 1 counts the rows' lengths in steps of LEN_B = half a
# tile's rows, min(TILE // BLOCK_T // 2, BLOCK_B): its mask tile and scans within the cap)
MAX_BLOCK_T = 256


def phases(estimator):
    """The phases an estimator runs (code of rmkernels._codes.GroupEstimator)."""
    est = int(estimator)
    extra = {int(GroupEstimator.GRPO): [SQUARES],
             int(GroupEstimator.REINFORCE_PP_BASELINE): [WHITEN_SUMS, WHITEN_SQUARES]}.get(est, [])
    return [ZERO, SUMS, *extra, ROWS, WRITE]


def workspace_size(B, estimator):
    """float64 elements of the workspace: [B, 5] statistics, 4 scalars, the rows' lengths
    (reinforce_pp_baseline)."""
    rppb = int(estimator) == int(GroupEstimator.REINFORCE_PP_BASELINE)
    return B * NSTATS + EXTRA + (B if rppb else 0)


@triton.jit
def _grid_barrier(sem_ptr):
    """Every program of the launch waits here until all have arrived, their earlier stores and
    atomics visible to all after it. A sense-reversing barrier on one uint32: program 0 adds
    2^31 - (P - 1), the P - 1 others add 1, so the top bit flips when the last one arrives and
    the low bits come back to what they were (no reset between barriers or calls). Only with
    every program resident at once (a cooperative launch)."""
    tl.debug_barrier()  # the program's threads are done with the phase before its release
    sem = sem_ptr.to(tl.pointer_type(tl.uint32))
    one = tl.full([], 1, tl.uint32)
    if tl.program_id(0) == 0:
        nb = tl.full([], 0x80000000, tl.uint32) - (tl.num_programs(0).to(tl.uint32) - one)
    else:
        nb = one
    old = tl.atomic_add(sem, nb, sem="release")
    flipped = False
    while not flipped:
        cur = tl.atomic_add(sem, 0, sem="acquire")  # compiled to an acquire load
        flipped = ((old ^ cur) & 0x80000000) != 0
    tl.debug_barrier()


@triton.jit
def _after(phase, sem_ptr, LAST: tl.constexpr, BARRIER: tl.constexpr):
    """The barrier that ends phase `phase`, if the launch runs on past it."""
    if BARRIER and phase < LAST:
        _grid_barrier(sem_ptr)


@triton.jit
def _group_value(r, n, s, sq, ls, lrs, alpha, eps, f_norm,
                 EST: tl.constexpr, UNBIASED: tl.constexpr, SINGLE: tl.constexpr):
    """rmkernels/group_adv_math.h's sigma_of() and value(), float64."""
    one = n <= 1.0
    if SINGLE == _SELF:
        mu1 = r
    else:
        mu1 = tl.zeros_like(r)
    mu = tl.where(one, mu1, s / n)
    base = r - mu
    if EST == _GRPO:
        if UNBIASED:
            den = n - 1.0
        else:
            den = n
        sigma = tl.where(one, 1.0, tl.sqrt(sq / tl.where(one, 1.0, den)))
        v = base / (sigma + eps)
    elif EST == _RLOO:
        v = tl.where(one, base, (n * r - s) / tl.where(one, 1.0, n - 1.0))
    elif EST == _OPO:
        v = tl.where(one, base, r - lrs / ls)
    elif EST == _GPG:
        v = alpha * base / f_norm
    else:  # dr_grpo, reinforce_pp_baseline
        v = base
    return v



@triton.jit
def _row_value(r_ptr, ids_ptr, stats_ptr, rows, inb, B, alpha, eps, f_norm,
               EST: tl.constexpr, UNBIASED: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr):
    """The per-sequence values of rows (int64) from their groups' statistics, rounded to ACC;
    NaN for a row whose id lies outside [0, B) (checked on the host for CPU tensors). The
    statistics were written in this launch by other programs: loaded at L2 (.cg), never
    through a multiprocessor's L1 that may hold a line from before a barrier."""
    nan = float("nan")
    r = tl.load(r_ptr + rows, mask=inb, other=0.0).to(tl.float64)
    g = tl.load(ids_ptr + rows, mask=inb, other=0)
    ok = inb & (g >= 0) & (g < B)
    st = stats_ptr + g * _NSTATS
    n = tl.load(st, mask=ok, other=nan, cache_modifier=".cg")
    s = tl.load(st + 1, mask=ok, other=nan, cache_modifier=".cg")
    sq = tl.load(st + 2, mask=ok, other=nan, cache_modifier=".cg")
    ls = tl.load(st + 3, mask=ok, other=nan, cache_modifier=".cg")
    lrs = tl.load(st + 4, mask=ok, other=nan, cache_modifier=".cg")
    v = _group_value(r, n, s, sq, ls, lrs, alpha, eps, f_norm, EST, UNBIASED, SINGLE)
    return tl.where(ok, v, nan).to(ACC)


@triton.jit
def _whiten_moments(r_ptr, ids_ptr, stats, row_len, pid, nprog, B, alpha, eps, f_norm, mean,
                    EST: tl.constexpr, UNBIASED: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_B: tl.constexpr, CENTRED: tl.constexpr):
    """reinforce_pp_baseline's whitening moments over this program's rows, row b holding len[b]
    valid copies of its value (rounded to ACC, as written): (sum of len, sum of len x value), or
    with CENTRED (sum of len x (value - mean)^2, 0)."""
    a = tl.zeros([BLOCK_B], tl.float64)
    b = tl.zeros([BLOCK_B], tl.float64)
    for start in range(pid * BLOCK_B, B, nprog * BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B).to(tl.int64)
        inb = rows < B
        v = _row_value(r_ptr, ids_ptr, stats, rows, inb, B, alpha, eps, f_norm, EST, UNBIASED, SINGLE,
                       ACC).to(tl.float64)
        length = tl.load(row_len + rows, mask=inb, other=0.0, cache_modifier=".cg")
        # a row without a valid token (and a row past B: length 0) adds exactly 0, whatever its
        # value: a select, not 0 * NaN (the C++ kernels' group_adv::row_copies)
        has = length > 0
        if CENTRED:
            d = v - mean
            a += tl.where(has, length * (d * d), 0.0)
        else:
            a += length
            b += tl.where(has, length * v, 0.0)
    return tl.sum(a, axis=0), tl.sum(b, axis=0)


@triton.jit
def _seg_add(av, a_start, bv, b_start):
    """The combine of a forward segmented sum: a segment begins where its start flag is set."""
    return tl.where(b_start, bv, av + bv), a_start | b_start


@triton.jit
def _run_sum(x, start):
    """x summed from the start of each run (start: a run's first row) to each row: the run's
    last row holds the run's sum."""
    total, _ = tl.associative_scan((x, start), 0, _seg_add)
    return total


@triton.jit
def _runs(ids_ptr, rows, B, BLOCK: tl.constexpr):
    """The ids of BLOCK consecutive rows (int64; -1 past B), whether each lies in [0, B), and
    whether each starts / ends a run of equal ids within these rows (verl's layout puts a
    prompt's responses side by side): a run's sums go to its group in one atomic from its last
    row, not one a row. A run across two steps is two runs."""
    inb = rows < B
    g = tl.load(ids_ptr + rows, mask=inb, other=-1)
    ok = inb & (g >= 0) & (g < B)
    prev = tl.load(ids_ptr + rows - 1, mask=inb & (rows > 0), other=-1)
    nxt = tl.load(ids_ptr + rows + 1, mask=rows + 1 < B, other=-1)
    lane = tl.arange(0, BLOCK)
    return g, ok, prev != g, (lane == BLOCK - 1) | (nxt != g)  # the scan starts a run at lane 0 anyway


@triton.jit
def _sums_step(r_ptr, ids_ptr, mask_ptr, stats, extra, row_len, rows, B, T, s_m0, s_m1,
               EST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Phase 1 for BLOCK consecutive rows (int64): count and sum of each run of equal ids into
    its group's slots (opo: lengths and length x score; reinforce_pp_baseline: the rows' lengths
    stored; gpg: the nonzero count)."""
    inb = rows < B
    g, ok, start, end = _runs(ids_ptr, rows, B, BLOCK)
    score = tl.load(r_ptr + rows, mask=inb, other=0.0).to(tl.float64)
    r = tl.where(ok, score, 0.0)  # a row outside [0, B) adds to nothing (its run is of its bad id)
    st = stats + g * _NSTATS
    tail = ok & end
    tl.atomic_add(st, _run_sum(tl.where(ok, 1.0, 0.0).to(tl.float64), start), mask=tail)
    tl.atomic_add(st + 1, _run_sum(r, start), mask=tail)
    if EST == _OPO or EST == _RPPB:
        length = tl.zeros(rows.shape, tl.int32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            m = tl.load(mask_ptr + rows[:, None] * s_m0 + t[None, :] * s_m1,
                        mask=inb[:, None] & (t < T)[None, :], other=0) != 0
            length += tl.sum(m.to(tl.int32), axis=1)
        length = length.to(tl.float64)  # counted in int32: fewer registers than float64 (T < 2^31)
        if EST == _OPO:
            tl.atomic_add(st + 3, _run_sum(length, start), mask=tail)
            tl.atomic_add(st + 4, _run_sum(length * r, start), mask=tail)
        else:
            tl.store(row_len + rows, length, mask=inb)
    if EST == _GPG:  # NaN counts as nonzero, as torch.count_nonzero
        nz = tl.sum(tl.where(inb & (score != 0), 1.0, 0.0).to(tl.float64), axis=0)
        tl.atomic_add(extra + _NONZERO, nz)


@triton.jit
def _group_adv_kernel(
    r_ptr, ids_ptr, mask_ptr, work_ptr, sem_ptr, seq_ptr, adv_ptr,  # r [B] acc, ids int64 [B], bool mask [B, T],
    B, T, s_m0, s_m1,                                               # float64 workspace, uint32 semaphore,
    eps, eps_lo, f_norm, f_norm_lo, weps, weps_lo,                  # seq [B], adv [B, T] (acc)
    EST: tl.constexpr, UNBIASED: tl.constexpr, SINGLE: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, BARRIER: tl.constexpr,
    BLOCK_B: tl.constexpr, TILE_B: tl.constexpr, BLOCK_T: tl.constexpr, LEN_B: tl.constexpr,
):
    """Phases FIRST..LAST of the module docstring, each a loop strided by the grid; BARRIER: a
    grid barrier between them (a cooperative launch), else FIRST == LAST (one launch a phase)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc_ty = seq_ptr.dtype.element_ty
    stats = work_ptr
    extra = work_ptr + tl.cast(B, tl.int64) * _NSTATS
    row_len = extra + _ROW_LEN
    lane = tl.arange(0, BLOCK_B).to(tl.int64)
    eps_v = scalar(eps, eps_lo, tl.float64)
    f_norm_v = scalar(f_norm, f_norm_lo, tl.float64)

    if FIRST <= _ZERO and _ZERO <= LAST:
        # The scalars, and the groups' statistics by rmkernels._codes.GROUP_ZERO_SAMPLE's rule (the
        # same sample of ids, so the same choice, in every program): ids in runs: only the
        # statistics of the groups that rows name, each run of equal ids storing its group's once
        # (a group in several runs has its zeros stored by each, maybe at once: relaxed atomic
        # exchanges on the bits of 0.0, no data race; a slot no row names is never read);
        # otherwise all [B, 5] slots.
        if pid == 0:
            tl.store(extra + tl.arange(0, _EXTRA), tl.zeros([_EXTRA], tl.float64))
        smp = tl.arange(0, _ZERO_SAMPLE).to(tl.int64)
        s_id = tl.load(ids_ptr + smp, mask=smp < B, other=-1)
        s_prev = tl.load(ids_ptr + smp - 1, mask=(smp > 0) & (smp < B), other=-1)
        sample_heads = tl.sum(((smp < B) & ((smp == 0) | (s_prev != s_id))).to(tl.int32), axis=0)
        if sample_heads <= _ZERO_MAX_HEADS:
            for start in range(pid * BLOCK_B, B, nprog * BLOCK_B):
                g, ok, run_start, _ = _runs(ids_ptr, start + lane, B, BLOCK_B)
                head = ok & run_start  # the run's first row in the batch, not only in this step
                slot = (stats + g * _NSTATS).to(tl.pointer_type(tl.int64))
                for k in tl.static_range(_NSTATS):
                    tl.atomic_xchg(slot + k, tl.zeros([BLOCK_B], tl.int64), mask=head, sem="relaxed")
        else:
            n_work = tl.cast(B, tl.int64) * _NSTATS
            for first in range(pid * BLOCK_B, n_work, nprog * BLOCK_B):  # int64 (start is int32 above)
                offs = first + lane
                tl.store(stats + offs, tl.zeros([BLOCK_B], tl.float64), mask=offs < n_work)
        _after(_ZERO, sem_ptr, LAST, BARRIER)

    if FIRST <= _SUMS and _SUMS <= LAST:
        if EST == _OPO or EST == _RPPB:  # the rows' lengths read from the mask: [LEN_B, BLOCK_T] at a time
            for start in range(pid * LEN_B, B, nprog * LEN_B):
                rows = start + tl.arange(0, LEN_B).to(tl.int64)
                _sums_step(r_ptr, ids_ptr, mask_ptr, stats, extra, row_len, rows, B, T, s_m0, s_m1, EST, LEN_B,
                           BLOCK_T)
        else:
            for start in range(pid * BLOCK_B, B, nprog * BLOCK_B):
                _sums_step(r_ptr, ids_ptr, mask_ptr, stats, extra, row_len, start + lane, B, T, s_m0, s_m1, EST,
                           BLOCK_B, BLOCK_T)
        _after(_SUMS, sem_ptr, LAST, BARRIER)

    if EST == _GRPO and FIRST <= _SQUARES and _SQUARES <= LAST:
        for start in range(pid * BLOCK_B, B, nprog * BLOCK_B):
            rows = start + lane
            g, ok, run_start, end = _runs(ids_ptr, rows, B, BLOCK_B)
            r = tl.load(r_ptr + rows, mask=ok, other=0.0).to(tl.float64)
            st = stats + g * _NSTATS
            n = tl.load(st, mask=ok, other=1.0, cache_modifier=".cg")
            s = tl.load(st + 1, mask=ok, other=0.0, cache_modifier=".cg")
            d = r - s / n
            tl.atomic_add(st + 2, _run_sum(tl.where(ok, d * d, 0.0), run_start), mask=ok & end)
        _after(_SQUARES, sem_ptr, LAST, BARRIER)

    alpha = B / tl.maximum(tl.load(extra + _NONZERO, cache_modifier=".cg"), 1.0)
    if EST == _RPPB and FIRST <= _WHITEN_SUMS and _WHITEN_SUMS <= LAST:
        cnt, tot = _whiten_moments(r_ptr, ids_ptr, stats, row_len, pid, nprog, B, alpha, eps_v, f_norm_v, 0.0,
                                   EST, UNBIASED, SINGLE, acc_ty, BLOCK_B, False)
        tl.atomic_add(extra + _WHITEN, cnt)
        tl.atomic_add(extra + _WHITEN + 1, tot)
        _after(_WHITEN_SUMS, sem_ptr, LAST, BARRIER)

    if EST == _RPPB and FIRST <= _WHITEN_SQUARES and _WHITEN_SQUARES <= LAST:
        mean = _whiten_mean(tl.load(extra + _WHITEN, cache_modifier=".cg"),
                            tl.load(extra + _WHITEN + 1, cache_modifier=".cg"))
        sq, _ = _whiten_moments(r_ptr, ids_ptr, stats, row_len, pid, nprog, B, alpha, eps_v, f_norm_v, mean,
                                EST, UNBIASED, SINGLE, acc_ty, BLOCK_B, True)
        tl.atomic_add(extra + _WHITEN + 2, sq)
        _after(_WHITEN_SQUARES, sem_ptr, LAST, BARRIER)

    if FIRST <= _ROWS and _ROWS <= LAST:
        if EST == _RPPB:
            n_w = tl.load(extra + _WHITEN, cache_modifier=".cg")
            w_mean = _whiten_mean(n_w, tl.load(extra + _WHITEN + 1, cache_modifier=".cg"))
            w_ok, w_rstd = _whiten_params(n_w, w_mean, tl.load(extra + _WHITEN + 2, cache_modifier=".cg"),
                                          scalar(weps, weps_lo, tl.float64), UNBIASED)
            mean_a = w_mean.to(acc_ty)
            rstd_a = w_rstd.to(acc_ty)
        for start in range(pid * BLOCK_B, B, nprog * BLOCK_B):
            rows = start + lane
            inb = rows < B
            v = _row_value(r_ptr, ids_ptr, stats, rows, inb, B, alpha, eps_v, f_norm_v, EST, UNBIASED, SINGLE,
                           acc_ty)
            if EST == _RPPB:
                has = tl.load(row_len + rows, mask=inb, other=0.0, cache_modifier=".cg") > 0
                zero = tl.zeros([BLOCK_B], acc_ty)
                v = tl.where(w_ok, tl.where(has, (v - mean_a) * rstd_a, zero), zero)
            tl.store(seq_ptr + rows, v, mask=inb)
        _after(_ROWS, sem_ptr, LAST, BARRIER)

    if FIRST <= _WRITE and _WRITE <= LAST:
        t_blocks = tl.cdiv(T, BLOCK_T)  # T = 0: no tiles
        n_tiles = tl.cdiv(B, TILE_B) * t_blocks
        row_lane = tl.arange(0, TILE_B).to(tl.int64)
        for tile in range(pid, n_tiles, nprog):
            tb = tile % t_blocks
            rows = (tile // t_blocks).to(tl.int64) * TILE_B + row_lane
            inb = rows < B
            v = tl.load(seq_ptr + rows, mask=inb, other=0.0, cache_modifier=".cg")  # written in phase 5
            t = tb.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
            inside = inb[:, None] & (t < T)[None, :]
            m = tl.load(mask_ptr + rows[:, None] * s_m0 + t[None, :] * s_m1, mask=inside, other=0) != 0
            out = tl.where(m, v[:, None], tl.zeros([TILE_B, BLOCK_T], acc_ty))
            tl.store(adv_ptr + rows[:, None] * T + t[None, :], out, mask=inside)


_SEMAPHORES = {}  # (device index, stream) -> int32 [1], the barrier's uint32
_SM_COUNT = {}


def _semaphore(device):
    """The barrier's state for launches on the current stream of device (a persistent zeroed
    int32: every barrier leaves its low bits as it found them, so it is never reset). One per
    stream: launches on one stream run one after the other, launches on two streams may run at
    once and must not share it. While a CUDA graph is captured, a fresh one (its zero fill is
    captured and runs before the kernel at each replay; memory first made in a capture holds
    nothing until a replay, so it is never kept for eager launches)."""
    if device.type != "cuda" or interpreting() or torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    sem = _SEMAPHORES.get(key)
    if sem is None:
        sem = _SEMAPHORES[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return sem


def resident_programs(device):
    """Programs a cooperative launch may have on device: PROGRAMS_PER_SM per multiprocessor (the
    kernel is compiled with at most MAX_REGISTERS registers a thread, so that many fit at once;
    the driver refuses a cooperative launch that does not fit, with an error, never a hang); 1
    under the interpreter, which runs the programs one after the other."""
    if device.type != "cuda" or interpreting():
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx] * PROGRAMS_PER_SM


def _check_args(scores, group_ids, mask, estimator, single, eps, f_norm, whiten_eps):
    """The kernel op's checks (op_checks.h: check_group_advantages_args, check_group_options), as
    ValueError / TypeError naming the argument. The id *values* are not checked (no host sync):
    an id outside [0, B) gives its row NaN."""
    check_tensor("scores", scores, dims=1, dtypes=(torch.float32, torch.float64))
    B, dev = scores.shape[0], scores.device
    check_tensor("group_ids", group_ids, dims=1, dtype=torch.int64, device=dev)
    if group_ids.shape[0] != B:
        raise ValueError(f"group_ids must have B = scores.size(0) = {B} rows, got {group_ids.shape[0]}")
    check_tensor("mask", mask, dims=2, dtype=torch.bool, device=dev)
    if mask.shape[0] != B:
        raise ValueError(f"mask must be [B, T] with B = scores.size(0) = {B}, got {list(mask.shape)}")
    check_code("estimator", estimator, GroupEstimator)
    check_code("single", single, GroupSingle)
    check_group_scalars(eps, f_norm, whiten_eps)


def group_advantages(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm, whiten_eps, *,
                     programs=None, fused=True):
    """Host function with the kernel op's signature (rmkernels::group_advantages_kernel): one
    launch of at most ``resident_programs`` programs. Tests only: ``programs`` sets the grid;
    ``fused=False`` launches each phase on its own (no barrier, any number of programs: how the
    interpreter runs a grid of many programs through the phases)."""
    _check_args(scores, group_ids, mask, estimator, single, eps, f_norm, whiten_eps)
    B, T = mask.shape
    dev = scores.device
    acc = acc_dtype(scores.dtype)
    seq = torch.empty(B, dtype=acc, device=dev)
    adv = torch.empty(B, T, dtype=acc, device=dev)
    if B == 0:
        return seq, adv
    r = scores.to(acc).contiguous()
    ids = group_ids.to(torch.int64).contiguous()
    est = int(estimator)
    work = torch.empty(workspace_size(B, est), dtype=torch.float64, device=dev)  # phase 0 zeroes what is read
    block_t = block_size(T, MAX_BLOCK_T)
    tile_b = TILE // block_t
    # the most programs any phase has work for: row blocks of phases 0-5, tiles of phase 6
    work_items = max(triton.cdiv(B * NSTATS, BLOCK_B),
                     triton.cdiv(B, tile_b) * max(1, triton.cdiv(T, block_t)))
    if programs is None:
        programs = resident_programs(dev)
    programs = max(1, min(int(programs), work_items))
    if fused and programs > 1 and interpreting():
        raise ValueError(f"a fused launch of {programs} programs would wait forever at its first barrier under "
                         "the Triton interpreter (it runs programs one after the other): programs=1 or fused=False")

    def launch(first, last, barrier, sem):
        kw = {} if interpreting() else dict(maxnreg=MAX_REGISTERS, launch_cooperative_grid=barrier)
        _group_adv_kernel[(programs,)](
            r, ids, mask, work, sem, seq, adv, B, T, mask.stride(0), mask.stride(1), *split_float(eps),
            *split_float(f_norm), *split_float(whiten_eps), EST=est, UNBIASED=bool(unbiased), SINGLE=int(single),
            FIRST=first, LAST=last, BARRIER=barrier, BLOCK_B=BLOCK_B, TILE_B=tile_b, BLOCK_T=block_t,
            LEN_B=min(tile_b // 2, BLOCK_B),  # opo / reinforce_pp_baseline's length steps (above)
            num_warps=NUM_WARPS, **kw)

    if fused:
        launch(ZERO, WRITE, True, _semaphore(dev))
    else:
        for ph in phases(est):
            launch(ph, ph, False, work)
    return seq, adv
