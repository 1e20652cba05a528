"""Triton kernels of the critic-free group advantages (docs/ops.md section 5).

``group_advantages``: three launches after one zero fill of the float64 workspace (four for
``reinforce_pp_baseline``), no host synchronisation.

1. ``_group_stats_kernel`` (BLOCK_B rows a program): float64 atomics into a zeroed [B, 5]
   buffer indexed by group id: count, sum (and, for ``opo``, the rows' lengths and length x
   score; for ``gpg``, the batch's nonzero count into one more float64; for
   ``reinforce_pp_baseline``, the rows' lengths into their own [B]);
2. ``_group_sq_kernel`` (``grpo`` only): the centred squares (r - mean)^2 of each group, from
   the mean of pass 1 (two passes: no cancellation);
3. ``_group_write_kernel`` ([row block, T block] programs): the per-sequence formula (the
   arithmetic of ``rmkernels/group_adv_math.h``, float64) and the [B, T] broadcast under the
   mask; the first T block also writes ``seq_advantages``. ``reinforce_pp_baseline`` splits it:
   the values first, then ``_rppb_whiten_kernel`` (one program) whitens them over the batch's
   valid tokens from the rows' lengths (as the C++ CPU and CUDA kernels: a pass over B, not over
   [B, T]), then the broadcast of the whitened values.

Bytes moved: 16 B per response in passes 1-2 (24 B with the opo / reinforce_pp_baseline
lengths, which read the mask once more), the mask once and the [B, T] output once in pass 3.
Atomics make the float64 sums' order vary between runs in their last bits (float32 outputs are
unaffected in practice).

``reinforce_pp_returns`` runs ``rmkernels.triton.ppo.gae`` (values 0, lam 1; ops/group_adv.py).
"""
import torch
import triton
import triton.language as tl

from rmkernels._codes import GroupEstimator, GroupSingle
from rmkernels.triton._common import acc_dtype, block_size, scalar, split_float
from rmkernels.triton.ppo import _moments_of_rows, _whiten_mean, _whiten_params

_GRPO = tl.constexpr(int(GroupEstimator.GRPO))
_RLOO = tl.constexpr(int(GroupEstimator.RLOO))
_OPO = tl.constexpr(int(GroupEstimator.OPO))
_GPG = tl.constexpr(int(GroupEstimator.GPG))
_RPPB = tl.constexpr(int(GroupEstimator.REINFORCE_PP_BASELINE))
_SELF = tl.constexpr(int(GroupSingle.SELF))

BLOCK_B = 128  # rows per program of the statistics passes
WRITE_BLOCK_B = 16  # rows x ...
WRITE_BLOCK_T = 256  # ... positions per program of the broadcast
NSTATS = 5  # count, sum, centred squares, sum of lengths, sum of length x score
WHITEN_BLOCK = 1024  # rows per step of _rppb_whiten_kernel's loops
# _group_write_kernel's modes: the value and its [B, T] broadcast; the value only; the broadcast
# of the values in seq (reinforce_pp_baseline, whitened in between)
_WRITE_ALL, _WRITE_SEQ, _WRITE_FROM_SEQ = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_NSTATS = tl.constexpr(NSTATS)


@triton.jit
def _group_rows(r_ptr, ids_ptr, stats_ptr, B, BLOCK_B: tl.constexpr):
    """The program's BLOCK_B rows (axis 0): their offsets, which are in bounds, the scores in
    float64, which ids lie in [0, B), and each row's group slot in the [B, NSTATS] statistics."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    inb = offs < B
    r = tl.load(r_ptr + offs, mask=inb, other=0.0).to(tl.float64)
    g = tl.load(ids_ptr + offs, mask=inb, other=0)
    ok = inb & (g >= 0) & (g < B)
    return offs, inb, r, ok, stats_ptr + g * _NSTATS


@triton.jit
def _group_stats_kernel(
    r_ptr, ids_ptr, mask_ptr, stats_ptr, nz_ptr, len_ptr,  # r [B] acc, ids int64 [B], bool mask [B, T],
    B, T, s_m0, s_m1,                                      # float64 [B, 5], [1], [B] (reinforce_pp_baseline)
    EST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    offs, inb, r, ok, st = _group_rows(r_ptr, ids_ptr, stats_ptr, B, BLOCK_B)
    tl.atomic_add(st, tl.where(ok, 1.0, 0.0).to(tl.float64), mask=ok)
    tl.atomic_add(st + 1, r, mask=ok)
    if EST == _OPO or EST == _RPPB:  # the rows' lengths
        length = tl.zeros([BLOCK_B], tl.float64)
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T).to(tl.int64)
            m = tl.load(mask_ptr + offs[:, None] * s_m0 + t[None, :] * s_m1, mask=inb[:, None] & (t < T)[None, :],
                        other=0) != 0
            length += tl.sum(tl.where(m, 1.0, 0.0).to(tl.float64), axis=1)
        if EST == _OPO:
            tl.atomic_add(st + 3, length, mask=ok)
            tl.atomic_add(st + 4, length * r, mask=ok)
        else:
            tl.store(len_ptr + offs, length, mask=inb)
    if EST == _GPG:
        nz = tl.sum(tl.where(inb & (r != 0), 1.0, 0.0).to(tl.float64), axis=0)  # NaN counts, as count_nonzero
        tl.atomic_add(nz_ptr, nz)


@triton.jit
def _group_sq_kernel(
    r_ptr, ids_ptr, stats_ptr,
    B, BLOCK_B: tl.constexpr,
):
    _, _, r, ok, st = _group_rows(r_ptr, ids_ptr, stats_ptr, B, BLOCK_B)
    n = tl.load(st, mask=ok, other=1.0)
    s = tl.load(st + 1, mask=ok, other=0.0)
    d = r - s / n
    tl.atomic_add(st + 2, d * d, mask=ok)


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
def _group_write_kernel(
    r_ptr, ids_ptr, mask_ptr, stats_ptr, nz_ptr, seq_ptr, adv_ptr,
    B, T, s_m0, s_m1, eps, eps_lo, f_norm, f_norm_lo,
    EST: tl.constexpr, UNBIASED: tl.constexpr, SINGLE: tl.constexpr, MODE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """MODE _WRITE_ALL: each row's value into seq (first T block) and its broadcast under the mask
    into adv; _WRITE_SEQ: the values only (grid (row blocks, 1)); _WRITE_FROM_SEQ: the broadcast
    of the values already in seq."""
    # an id out of range: NaN (checked on the host for CPU tensors)
    offs, inb, r, ok, st = _group_rows(r_ptr, ids_ptr, stats_ptr, B, BLOCK_B)
    pid_t = tl.program_id(1)
    acc_ty = seq_ptr.dtype.element_ty
    if MODE == _WRITE_FROM_SEQ:
        v = tl.load(seq_ptr + offs, mask=inb, other=0.0)
    else:
        nan = float("nan")
        n = tl.load(st, mask=ok, other=nan)
        s = tl.load(st + 1, mask=ok, other=nan)
        sq = tl.load(st + 2, mask=ok, other=nan)
        ls = tl.load(st + 3, mask=ok, other=nan)
        lrs = tl.load(st + 4, mask=ok, other=nan)
        alpha = B / tl.maximum(tl.load(nz_ptr), 1.0)
        v = _group_value(r, n, s, sq, ls, lrs, alpha, scalar(eps, eps_lo, tl.float64),
                         scalar(f_norm, f_norm_lo, tl.float64), EST, UNBIASED, SINGLE)
        v = tl.where(ok, v, nan).to(acc_ty)
        if pid_t == 0:
            tl.store(seq_ptr + offs, v, mask=inb)
    if MODE != _WRITE_SEQ:
        t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        inside = inb[:, None] & (t < T)[None, :]
        m = tl.load(mask_ptr + offs[:, None] * s_m0 + t[None, :] * s_m1, mask=inside, other=0) != 0
        out = tl.where(m, v[:, None], tl.zeros([BLOCK_B, BLOCK_T], acc_ty))
        tl.store(adv_ptr + offs[:, None] * T + t[None, :], out, mask=inside)


@triton.jit
def _rppb_whiten_kernel(
    seq_ptr, len_ptr,  # acc [B] (the rows' values, whitened in place), float64 [B] (their lengths)
    B, eps, eps_lo,
    UNBIASED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: reinforce_pp_baseline's values whitened over the valid tokens of the batch
    (csrc/cpu/group_adv.cpp's whiten_seq): row b holds len[b] valid copies of seq[b], so the count,
    sum and centred squares are sums over the rows of len[b] * ..., no pass over [B, T]; rows
    without a valid token get 0, as every row when the batch has at most one valid token."""
    acc_ty = seq_ptr.dtype.element_ty
    lane = tl.arange(0, BLOCK)
    n, total, sq = _moments_of_rows(len_ptr, seq_ptr, len_ptr, 1, B, False, False, BLOCK)
    mean = _whiten_mean(n, total)
    ok, rstd = _whiten_params(n, mean, sq, scalar(eps, eps_lo, tl.float64), UNBIASED)
    mean_a = mean.to(acc_ty)
    rstd_a = rstd.to(acc_ty)
    for start in range(0, B, BLOCK):
        rows = start + lane
        inb = rows < B
        x = tl.load(seq_ptr + rows, mask=inb, other=0.0)
        has = tl.load(len_ptr + rows, mask=inb, other=0.0) > 0
        y = tl.where(has, (x - mean_a) * rstd_a, tl.zeros([BLOCK], acc_ty))
        tl.store(seq_ptr + rows, tl.where(ok, y, tl.zeros([BLOCK], acc_ty)), mask=inb)


def group_advantages(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm, whiten_eps):
    """Host function with the kernel op's signature (rmkernels::group_advantages_kernel)."""
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
    rppb = est == int(GroupEstimator.REINFORCE_PP_BASELINE)
    # one fill: the [B, 5] stats, gpg's count (reinforce_pp_baseline: then the rows' lengths, written whole)
    work = torch.zeros(B * NSTATS + 1 + (B if rppb else 0), dtype=torch.float64, device=dev)
    stats, nz = work[: B * NSTATS].view(B, NSTATS), work[B * NSTATS: B * NSTATS + 1]
    lengths = work[B * NSTATS + 1:] if rppb else nz
    block_t = max(16, min(WRITE_BLOCK_T, triton.next_power_of_2(max(T, 1))))
    grid = (triton.cdiv(B, BLOCK_B),)
    _group_stats_kernel[grid](r, ids, mask, stats, nz, lengths, B, T, mask.stride(0), mask.stride(1), EST=est,
                              BLOCK_B=BLOCK_B, BLOCK_T=block_t)
    if est == int(GroupEstimator.GRPO):
        _group_sq_kernel[grid](r, ids, stats, B, BLOCK_B=BLOCK_B)

    def write(mode, t_blocks):
        _group_write_kernel[(triton.cdiv(B, WRITE_BLOCK_B), t_blocks)](
            r, ids, mask, stats, nz, seq, adv, B, T, mask.stride(0), mask.stride(1), *split_float(eps),
            *split_float(f_norm), EST=est, UNBIASED=bool(unbiased), SINGLE=int(single), MODE=mode,
            BLOCK_B=WRITE_BLOCK_B, BLOCK_T=block_t)

    t_blocks = max(1, triton.cdiv(T, block_t))
    if not rppb:
        write(_WRITE_ALL, t_blocks)
        return seq, adv
    # reinforce_pp_baseline: the values, their whitening from the rows' lengths, the broadcast
    write(_WRITE_SEQ, 1)
    _rppb_whiten_kernel[(1,)](seq, lengths, B, *split_float(whiten_eps), UNBIASED=bool(unbiased),
                              BLOCK=block_size(B, WHITEN_BLOCK))
    if T > 0:
        write(_WRITE_FROM_SEQ, t_blocks)
    return seq, adv
