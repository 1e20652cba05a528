"""Triton kernels of the critic-free group advantages (docs/ops.md section 5).

``group_advantages``: three launches after one zero fill of the float64 workspace, no host
synchronisation.

1. ``_group_stats_kernel`` (BLOCK_B rows a program): float64 atomics into a zeroed [B, 5]
   buffer indexed by group id: count, sum (and, for ``opo``, the rows' lengths and length x
   score; for ``gpg``, the batch's nonzero count into one more float64);
2. ``_group_sq_kernel`` (``grpo`` only): the centred squares (r - mean)^2 of each group, from
   the mean of pass 1 (two passes: no cancellation);
3. ``_group_write_kernel`` ([row block, T block] programs): the per-sequence formula (the
   arithmetic of ``rmkernels/group_adv_math.h``, float64) and the [B, T] broadcast under the
   mask; the first T block also writes ``seq_advantages``.

Bytes moved: 16 B per response in passes 1-2 (24 B with the opo lengths, which read the
mask once more), the mask once and the [B, T] output once in pass 3. ``reinforce_pp_baseline``
is then whitened by ops/ppo.py's Triton whitening kernels (three more passes over [B, T]; the
C++ CPU and CUDA kernels whiten from the rows' values and lengths instead). Atomics make the
float64 sums' order vary between runs in their last bits (float32 outputs are unaffected in
practice).

``reinforce_pp_returns`` runs ``rmkernels.triton.ppo.gae`` (values 0, lam 1; ops/group_adv.py).
"""
import torch
import triton
import triton.language as tl

from rmkernels._codes import GroupEstimator, GroupSingle
from rmkernels.triton._common import acc_dtype, scalar, split_float

_GRPO = tl.constexpr(int(GroupEstimator.GRPO))
_RLOO = tl.constexpr(int(GroupEstimator.RLOO))
_OPO = tl.constexpr(int(GroupEstimator.OPO))
_GPG = tl.constexpr(int(GroupEstimator.GPG))
_SELF = tl.constexpr(int(GroupSingle.SELF))

BLOCK_B = 128  # rows per program of the statistics passes
WRITE_BLOCK_B = 16  # rows x ...
WRITE_BLOCK_T = 256  # ... positions per program of the broadcast
NSTATS = 5  # count, sum, centred squares, sum of lengths, sum of length x score
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
    r_ptr, ids_ptr, mask_ptr, stats_ptr, nz_ptr,  # r [B] acc, ids int64 [B], bool mask [B, T], float64 [B, 5], [1]
    B, T, s_m0, s_m1,
    EST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    offs, inb, r, ok, st = _group_rows(r_ptr, ids_ptr, stats_ptr, B, BLOCK_B)
    tl.atomic_add(st, tl.where(ok, 1.0, 0.0).to(tl.float64), mask=ok)
    tl.atomic_add(st + 1, r, mask=ok)
    if EST == _OPO:
        length = tl.zeros([BLOCK_B], tl.float64)
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T).to(tl.int64)
            m = tl.load(mask_ptr + offs[:, None] * s_m0 + t[None, :] * s_m1, mask=inb[:, None] & (t < T)[None, :],
                        other=0) != 0
            length += tl.sum(tl.where(m, 1.0, 0.0).to(tl.float64), axis=1)
        tl.atomic_add(st + 3, length, mask=ok)
        tl.atomic_add(st + 4, length * r, mask=ok)
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
    EST: tl.constexpr, UNBIASED: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # an id out of range: NaN (checked on the host for CPU tensors)
    offs, inb, r, ok, st = _group_rows(r_ptr, ids_ptr, stats_ptr, B, BLOCK_B)
    pid_t = tl.program_id(1)
    acc_ty = seq_ptr.dtype.element_ty
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
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = inb[:, None] & (t < T)[None, :]
    m = tl.load(mask_ptr + offs[:, None] * s_m0 + t[None, :] * s_m1, mask=inside, other=0) != 0
    out = tl.where(m, v[:, None], tl.zeros([BLOCK_B, BLOCK_T], acc_ty))
    tl.store(adv_ptr + offs[:, None] * T + t[None, :], out, mask=inside)


def group_advantages(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm, whiten_eps):
    """Host function with the kernel op's signature (rmkernels::group_advantages_kernel);
    reinforce_pp_baseline is then whitened by the Triton whitening kernels of ops/ppo.py."""
    B, T = mask.shape
    dev = scores.device
    acc = acc_dtype(scores.dtype)
    seq = torch.empty(B, dtype=acc, device=dev)
    adv = torch.empty(B, T, dtype=acc, device=dev)
    if B == 0:
        return seq, adv
    r = scores.to(acc).contiguous()
    ids = group_ids.to(torch.int64).contiguous()
    work = torch.zeros(B * NSTATS + 1, dtype=torch.float64, device=dev)  # one fill: the [B, 5] stats, gpg's count
    stats, nz = work[: B * NSTATS].view(B, NSTATS), work[B * NSTATS:]
    est = int(estimator)
    block_t = max(16, min(WRITE_BLOCK_T, triton.next_power_of_2(max(T, 1))))
    grid = (triton.cdiv(B, BLOCK_B),)
    _group_stats_kernel[grid](r, ids, mask, stats, nz, B, T, mask.stride(0), mask.stride(1), EST=est,
                              BLOCK_B=BLOCK_B, BLOCK_T=block_t)
    if est == int(GroupEstimator.GRPO):
        _group_sq_kernel[grid](r, ids, stats, B, BLOCK_B=BLOCK_B)
    wgrid = (triton.cdiv(B, WRITE_BLOCK_B), max(1, triton.cdiv(T, block_t)))
    _group_write_kernel[wgrid](r, ids, mask, stats, nz, seq, adv, B, T, mask.stride(0), mask.stride(1),
                               *split_float(eps), *split_float(f_norm), EST=est, UNBIASED=bool(unbiased),
                               SINGLE=int(single),
                               BLOCK_B=WRITE_BLOCK_B, BLOCK_T=block_t)
    if est == int(GroupEstimator.REINFORCE_PP_BASELINE):
        from rmkernels.ops.group_adv import _whiten_rows  # (ops imports this module lazily)

        seq, adv = _whiten_rows(seq, adv, mask, unbiased, float(whiten_eps), "triton")
    return seq, adv
