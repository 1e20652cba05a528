"""Triton kernels of the PPO rewards / GAE / KL / whitening (docs/ops.md sections 3 and 4).

``_ppo_gae_kernel``: one program per row. It finds the row's last valid position, then
walks the row from the right in blocks of BLOCK_T; inside a block the two recurrences are
parallel scans (``tl.associative_scan(..., reverse=True)``) of affine maps
``C_t = a_t * C_{t+1} + b_t`` with the state of the block to the right carried in:

* ``V_next``: ``(a, b) = (0, V_u)`` at a valid position u, ``(1, 0)`` (identity) at a
  masked one, scanned over u = t + 1 (the values and mask are loaded shifted by one), so
  the scan gives the value of the next valid position after t, exactly;
* ``A``: ``(a, b) = (gamma * lam, delta_t)`` at a valid position, identity at a masked one.

``gae`` (token rewards given) runs the same kernel with ``TOKEN_REWARDS``: the rewards are
read instead of computed from the KL and the score. ``kl_estimate`` is element-wise.

Bytes moved by the GAE kernel: logprobs, ref_logprobs, values once (the shifted re-read of
values and mask hits the cache), the mask twice, the four [B, T] outputs once, 16 B of
partials per row. The whitening reads the advantages twice (partials, then the apply) and
writes them once.
"""
import torch
import triton
import triton.language as tl

from rmkernels import _checks, _codes
from rmkernels.ops.gae import check_discount
from rmkernels.ops.group_adv import check_reinforce_options
from rmkernels.ops.ppo import check_kl_coef, check_whiten_options
from rmkernels.triton._common import (
    FLOAT_DTYPES,
    KL_ABS,
    KL_K1,
    KL_K2,
    MODE_ROW,
    MODE_SEGMENT_AGGREGATE,
    MODE_SEGMENT_FINAL,
    acc_dtype,
    block_size,
    check_code,
    check_tensor,
    clamp_sym,
    exp,
    scalar,
    split_float,
)

# Positions per step of the row walk: 1024 fp32 per array keeps 4 warps busy with 8
# elements each and the scans in registers; short rows use a smaller power of two.
MAX_BLOCK_T = 1024
# Long rows in a batch too small to fill the GPU are split into segments (the policy:
# rmkernels._codes.num_gae_segments, shared with the CUDA binding).
FORCE_SEGMENT_T = None  # tests: segment every row with this length (any device)
# Elements per program of the element-wise whitening apply and of the KL estimate.
APPLY_BLOCK = 1024
# Rows per step of _reinforce_totals_kernel's loop over the [B, 3] row statistics.
TOTALS_BLOCK = 1024


@triton.jit
def _scale(a, x):
    # a * x, except that x = 0 gives 0 * x whatever a is: a composed map's a is a product of
    # discounts, which overflows to inf for gamma > 1 over long rows, and inf * 0 would be NaN
    # where the sequential recurrence (a finite gamma times a state of 0, step by step) gives 0.
    # For a finite a >= 0 it is a * x bit for bit (csrc/cuda/affine_scan.cuh's scale).
    return tl.where(x == 0, 0.0, a).to(x.dtype) * x


@triton.jit
def _affine_rcombine(a1, b1, a2, b2):
    # Reverse scan: (a1, b1) is the map accumulated from the right, (a2, b2) the element to
    # its left; the result applies the right part first: x -> a2 * (a1 * x + b1) + b2.
    # Plain IEEE arithmetic, like the sequential recurrence, but for the zero state of _scale.
    return a1 * a2, _scale(a2, b1) + b2


@triton.jit
def _select_rcombine(a1, b1, a2, b2):
    # The V_next scan selects a value: a valid position (a2 = 0) forgets its right side
    # exactly, so an inf V there cannot turn into 0 * inf = NaN.
    return a1 * a2, tl.where(a2 == 0, b2, a2 * b1 + b2)


@triton.jit
def _select_apply(a, b, x):
    return tl.where(a == 0, b, a * x + b)


@triton.jit
def _affine2_rcombine(a1, b1, c1, a2, b2, c2):
    # Two right-hand sides of the same affine maps (see _affine_rcombine).
    return a1 * a2, _scale(a2, b1) + b2, _scale(a2, c1) + c2


@triton.jit
def _kl_value(x, x_clamp, kl_clamp, EST: tl.constexpr):
    """The KL estimator EST (a rmkernels._codes.KLEstimator) of x, x clamped to +-x_clamp first,
    the result to +-kl_clamp (0 = no clamp)."""
    x = clamp_sym(x, x_clamp)
    if EST == KL_K1:
        k = x
    elif EST == KL_ABS:
        k = tl.abs(x)
    elif EST == KL_K2:
        k = 0.5 * x * x
    else:  # KL_K3
        k = exp(-x) - 1.0 + x  # libdevice's on a GPU (tl.exp's ex2.approx loses precision with |x|)
    return clamp_sym(k.to(x.dtype), kl_clamp)


# _ppo_gae_kernel's MODE: a rmkernels._codes.GaeSegmentMode (one program per row, or per (row,
# segment) for long rows). TOKEN_REWARDS (gae): lp_ptr holds the token rewards; ref_ptr,
# scores_ptr, rew_ptr, kl_ptr and stats_ptr are not read nor written. WRITE_RET: the returns
# are written to ret_ptr (gae without returns: not touched).
@triton.jit
def _ppo_gae_kernel(
    lp_ptr, ref_ptr, v_ptr, scores_ptr, mask_ptr,  # inputs: [B, T] x3 (any strides), [B], bool [B, T]
    adv_ptr, ret_ptr, rew_ptr, kl_ptr, stats_ptr,  # outputs: contiguous [B, T] x4, float64 [B, S, 2]
    agg_ptr, seg_last_ptr, carry_ptr, last_ptr,  # segments: [B, S, 4] acc, [B, S] i64, [B, S, 2] acc, [B] i64
    T, SEG, s_lp0, s_lp1, s_rf0, s_rf1, s_v0, s_v1, s_m0, s_m1,  # sizes (SEG: positions per segment), strides
    kl_coef, kl_coef_lo, gamma, gamma_lo, gl, gl_lo,  # scalars as (hi, lo) fp32 pairs; gl = gamma * lam
    x_clamp, x_clamp_lo, kl_clamp, kl_clamp_lo, score_clip, score_clip_lo,  # clamps (0 = none)
    EST: tl.constexpr, MODE: tl.constexpr, TOKEN_REWARDS: tl.constexpr, WRITE_RET: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1).to(tl.int64)
    n_seg = tl.num_programs(1).to(tl.int64)
    acc_ty = adv_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
    lane = tl.arange(0, BLOCK_T)
    t_lo = seg * SEG
    t_hi = tl.minimum(t_lo + SEG, T)  # this program covers [t_lo, t_hi)
    kl_coef = scalar(kl_coef, kl_coef_lo, acc_ty)
    gamma = scalar(gamma, gamma_lo, acc_ty)
    gl = scalar(gl, gl_lo, acc_ty)
    x_clamp = scalar(x_clamp, x_clamp_lo, acc_ty)
    kl_clamp = scalar(kl_clamp, kl_clamp_lo, acc_ty)
    if TOKEN_REWARDS:
        score = tl.zeros([], acc_ty)
    else:
        score = clamp_sym(tl.load(scores_ptr + b).to(acc_ty), scalar(score_clip, score_clip_lo, acc_ty))
    # The last valid position of the row gets the score (of the segment, for an aggregate,
    # which leaves the score out: the carry kernel adds it).
    if MODE == MODE_SEGMENT_FINAL:
        last = tl.load(last_ptr + b)
        carry_a = tl.load(carry_ptr + (b * n_seg + seg) * 2).to(acc_ty)
        carry_v = tl.load(carry_ptr + (b * n_seg + seg) * 2 + 1).to(acc_ty)
    else:
        if TOKEN_REWARDS and MODE == MODE_ROW:  # no score: the last valid position is not needed
            seg_last = tl.full([], -1, tl.int64)
        else:
            best = tl.full([BLOCK_T], -1, tl.int64)
            for start in range(t_lo, t_hi, BLOCK_T):
                offs = start + lane.to(tl.int64)
                m = tl.load(mask_ptr + b * s_m0 + offs * s_m1, mask=offs < t_hi, other=0)
                best = tl.maximum(best, tl.where(m != 0, offs, -1))
            seg_last = tl.max(best, axis=0)
        if MODE == MODE_ROW:
            last = seg_last
        else:
            last = tl.full([], -1, tl.int64)
        carry_a = tl.zeros([], acc_ty)  # C = A of the nearest valid position right of the block
        carry_v = tl.zeros([], acc_ty)  # D = V of the nearest valid position right of the block
    carry_e = tl.zeros([], acc_ty)  # aggregate: coefficient of delta at the segment's last valid position
    alpha = tl.full([], 1.0, acc_ty)  # aggregate: product of the maps' a
    v_first = tl.zeros([], acc_ty)  # aggregate: V of the segment's first valid position
    cnt = tl.zeros([BLOCK_T], tl.float64)
    tot = tl.zeros([BLOCK_T], tl.float64)
    n_blocks = tl.cdiv(t_hi - t_lo, BLOCK_T)
    for i in range(0, n_blocks):
        start = t_lo + (tl.zeros([], tl.int64) + n_blocks - 1 - i) * BLOCK_T  # right to left, 64-bit
        offs = start + lane
        inb = offs < t_hi
        m = tl.load(mask_ptr + b * s_m0 + offs * s_m1, mask=inb, other=0) != 0
        # V_next(t) = D(t + 1), D(u) = V of the nearest valid position >= u; positions from
        # t_hi on enter through the carry.
        offs1 = offs + 1
        inb1 = offs1 < t_hi
        m1 = tl.load(mask_ptr + b * s_m0 + offs1 * s_m1, mask=inb1, other=0) != 0
        v1 = tl.load(v_ptr + b * s_v0 + offs1 * s_v1, mask=inb1 & m1, other=0.0).to(acc_ty)
        one = tl.full([BLOCK_T], 1.0, acc_ty)
        zero = tl.zeros([BLOCK_T], acc_ty)
        sa, sb = tl.associative_scan((tl.where(m1, zero, one), tl.where(m1, v1, zero)), 0, _select_rcombine,
                                     reverse=True)
        v_next = _select_apply(sa, sb, carry_v)
        # KL and rewards (or the given token rewards).
        v = tl.load(v_ptr + b * s_v0 + offs * s_v1, mask=m, other=0.0).to(acc_ty)
        if TOKEN_REWARDS:
            k = zero
            r = tl.load(lp_ptr + b * s_lp0 + offs * s_lp1, mask=m, other=0.0).to(acc_ty)
        else:
            lp = tl.load(lp_ptr + b * s_lp0 + offs * s_lp1, mask=m, other=0.0).to(acc_ty)
            rf = tl.load(ref_ptr + b * s_rf0 + offs * s_rf1, mask=m, other=0.0).to(acc_ty)
            k = tl.where(m, _kl_value(lp - rf, x_clamp, kl_clamp, EST), zero)
            r = -kl_coef * k
            r = tl.where(offs == last, r + score, r)
        r = tl.where(m, r, zero)
        # A_t = delta_t + gamma * lam * A_next over valid positions.
        delta = r + gamma * v_next - v
        qm = tl.where(m, zero + gl, one)
        qd = tl.where(m, delta, zero)
        if MODE == MODE_SEGMENT_AGGREGATE:
            qe_in = tl.where(offs == seg_last, one, zero)
            qa, qb, qe = tl.associative_scan((qm, qd, qe_in), 0, _affine2_rcombine, reverse=True)
            e = _scale(qa, carry_e) + qe
            carry_e = tl.sum(tl.where(lane == 0, e, zero), axis=0)
            alpha = alpha * tl.sum(tl.where(lane == 0, qa, zero), axis=0)
            v_first = tl.sum(tl.where(lane == 0, tl.where(m, v, v_next), zero), axis=0)  # D(start)
        else:
            qa, qb = tl.associative_scan((qm, qd), 0, _affine_rcombine, reverse=True)
        a = _scale(qa, carry_a) + qb
        carry_v = tl.sum(tl.where(lane == 0, v_next, zero), axis=0)
        carry_a = tl.sum(tl.where(lane == 0, a, zero), axis=0)
        if MODE != MODE_SEGMENT_AGGREGATE:
            adv = tl.where(m, a, zero)
            out = b * T + offs
            if not TOKEN_REWARDS:
                tl.store(kl_ptr + out, k, mask=inb)
                tl.store(rew_ptr + out, r, mask=inb)
            tl.store(adv_ptr + out, adv, mask=inb)
            if WRITE_RET:
                tl.store(ret_ptr + out, tl.where(m, a + v, zero), mask=inb)
            cnt += tl.where(m, 1.0, 0.0).to(tl.float64)
            tot += adv.to(tl.float64)
    if MODE == MODE_SEGMENT_AGGREGATE:
        # C(t_lo) = alpha * C_in + gamma * e * D_in + c0 (+ e * score if the row's last valid
        # position is here); D(t_lo) = v_first if the segment has a valid position, else D_in.
        agg = agg_ptr + (b * n_seg + seg) * 4
        tl.store(agg, alpha)
        tl.store(agg + 1, carry_e)
        tl.store(agg + 2, carry_a)
        tl.store(agg + 3, v_first)
        tl.store(seg_last_ptr + b * n_seg + seg, seg_last)
    elif not TOKEN_REWARDS:
        tl.store(stats_ptr + (b * n_seg + seg) * 2, tl.sum(cnt, axis=0))
        tl.store(stats_ptr + (b * n_seg + seg) * 2 + 1, tl.sum(tot, axis=0))


@triton.jit
def _gae_carry_kernel(
    agg_ptr, seg_last_ptr, scores_ptr, carry_ptr, last_ptr,  # [B, S, 4], [B, S], [B], out [B, S, 2], out [B]
    S, gamma, gamma_lo, score_clip, score_clip_lo,
    TOKEN_REWARDS: tl.constexpr,  # gae: no score (scores_ptr is not read)
):
    """One program per row: the row's last valid position, and from the right the carries
    (C, D) that enter each segment, composed from the segments' aggregates."""
    b = tl.program_id(0).to(tl.int64)
    acc_ty = agg_ptr.dtype.element_ty
    gamma = scalar(gamma, gamma_lo, acc_ty)
    if TOKEN_REWARDS:
        score = tl.zeros([], acc_ty)
    else:
        score = clamp_sym(tl.load(scores_ptr + b).to(acc_ty), scalar(score_clip, score_clip_lo, acc_ty))
    last = tl.full([], -1, tl.int64)
    for i in range(0, S):
        last = tl.maximum(last, tl.load(seg_last_ptr + b * S + i))
    tl.store(last_ptr + b, last)
    c = tl.zeros([], acc_ty)
    d = tl.zeros([], acc_ty)
    for i in range(0, S):
        s = tl.zeros([], tl.int64) + S - 1 - i
        tl.store(carry_ptr + (b * S + s) * 2, c)
        tl.store(carry_ptr + (b * S + s) * 2 + 1, d)
        sl = tl.load(seg_last_ptr + b * S + s)
        agg = agg_ptr + (b * S + s) * 4
        alpha = tl.load(agg)
        e = tl.load(agg + 1)
        c0 = tl.load(agg + 2)
        vf = tl.load(agg + 3)
        has = sl >= 0
        c0 = tl.where(has, tl.where(sl == last, c0 + _scale(e, score), c0), c0)
        # a segment with no valid position passes through; alpha and e may have overflowed (gamma > 1)
        c = tl.where(has, _scale(alpha, c) + _scale(gamma * e, d) + c0, c)
        d = tl.where(has, vf, d)


@triton.jit
def _row_stats_kernel(
    x_ptr, mask_ptr, stats_ptr,  # x [B, T] (any strides), bool mask [B, T], float64 [B, 2]
    T, s_x0, s_x1, s_m0, s_m1,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cnt = tl.zeros([BLOCK_T], tl.float64)
    tot = tl.zeros([BLOCK_T], tl.float64)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T).to(tl.int64)
        m = tl.load(mask_ptr + b * s_m0 + offs * s_m1, mask=offs < T, other=0) != 0
        x = tl.load(x_ptr + b * s_x0 + offs * s_x1, mask=m, other=0.0)
        cnt += tl.where(m, 1.0, 0.0).to(tl.float64)
        tot += tl.where(m, x.to(tl.float64), 0.0)
    tl.store(stats_ptr + 2 * b, tl.sum(cnt, axis=0))
    tl.store(stats_ptr + 2 * b + 1, tl.sum(tot, axis=0))


@triton.jit
def _whiten_mean(n, s):
    """math::whiten_mean: the mean of n values of sum s, 0 when n is 0."""
    return tl.where(n > 0, s / tl.maximum(n, 1.0), 0.0)


@triton.jit
def _mean_of(totals_ptr):
    n = tl.load(totals_ptr)
    return n, _whiten_mean(n, tl.load(totals_ptr + 1))


@triton.jit
def _centered_sq_kernel(
    x_ptr, mask_ptr, totals_ptr, out_ptr,  # x [B, T], bool mask [B, T], float64 [2], float64 [B]
    T, s_x0, s_x1, s_m0, s_m1,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    _, mean = _mean_of(totals_ptr)
    acc = tl.zeros([BLOCK_T], tl.float64)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T).to(tl.int64)
        m = tl.load(mask_ptr + b * s_m0 + offs * s_m1, mask=offs < T, other=0) != 0
        x = tl.load(x_ptr + b * s_x0 + offs * s_x1, mask=m, other=0.0).to(tl.float64)
        d = tl.where(m, x - mean, 0.0)
        acc += d * d
    tl.store(out_ptr + b, tl.sum(acc, axis=0))


@triton.jit
def _whiten_params(n, mean, sq, eps, UNBIASED: tl.constexpr):
    """math::whiten_of (scalar_math.h) in float64, from a batch's count, mean and centred squares:
    (ok, rstd); ok = n > 1 (else every whitened value is 0, never NaN)."""
    ok = n > 1
    if UNBIASED:
        den = n - 1.0
    else:
        den = n
    var = sq / tl.where(ok, den, 1.0)
    return ok, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _whiten_apply_kernel(
    x_ptr, mask_ptr, totals_ptr, sq_ptr, out_ptr,  # x [B, T], bool mask, float64 [2], [1], out [B, T]
    T, s_x0, s_x1, s_m0, s_m1, eps, eps_lo,
    SHIFT_MEAN: tl.constexpr, UNBIASED: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc_ty = out_ptr.dtype.element_ty
    n, mean = _mean_of(totals_ptr)
    ok, rstd = _whiten_params(n, mean, tl.load(sq_ptr), scalar(eps, eps_lo, tl.float64), UNBIASED)
    rstd = rstd.to(acc_ty)
    mean_a = mean.to(acc_ty)
    inb = offs < T
    m = tl.load(mask_ptr + b * s_m0 + offs * s_m1, mask=inb, other=0) != 0
    x = tl.load(x_ptr + b * s_x0 + offs * s_x1, mask=m, other=0.0).to(acc_ty)
    y = (x - mean_a) * rstd
    if not SHIFT_MEAN:
        y = y + mean_a
    y = tl.where(m, tl.where(ok, y, 0.0), 0.0)
    tl.store(out_ptr + b * T + offs, y.to(acc_ty), mask=inb)


@triton.jit
def _kl_estimate_kernel(
    lp_ptr, ref_ptr, mask_ptr, out_ptr,  # [B, T] x2 (any strides), bool [B, T] (any strides), out contiguous
    T, s_lp0, s_lp1, s_rf0, s_rf1, s_m0, s_m1,  # size, strides
    x_clamp, x_clamp_lo, kl_clamp, kl_clamp_lo,  # clamps as (hi, lo) fp32 pairs (0 = none)
    EST: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (B, cdiv(T, BLOCK)): kl[b, t] = the estimate EST of logprobs - ref_logprobs, 0 where
    the mask is 0. Bytes moved: both inputs (and the mask) read once, kl written once."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc_ty = out_ptr.dtype.element_ty
    inb = offs < T
    if HAS_MASK:
        m = (tl.load(mask_ptr + b * s_m0 + offs * s_m1, mask=inb, other=0) != 0) & inb
    else:
        m = inb
    lp = tl.load(lp_ptr + b * s_lp0 + offs * s_lp1, mask=m, other=0.0).to(acc_ty)
    rf = tl.load(ref_ptr + b * s_rf0 + offs * s_rf1, mask=m, other=0.0).to(acc_ty)
    k = _kl_value(lp - rf, scalar(x_clamp, x_clamp_lo, acc_ty), scalar(kl_clamp, kl_clamp_lo, acc_ty), EST)
    tl.store(out_ptr + b * T + offs, tl.where(m, k, tl.zeros([BLOCK], acc_ty)), mask=inb)


# REINFORCE++ / ReMax (reinforce_kernel, ops/group_adv.py): one program per row walks it from the
# right in blocks of BLOCK_T, the return a reverse scan of the maps (gamma, r) at valid positions
# and the identity at masked ones. REMAX: the return at every position and return - baseline where
# valid; else the return under the mask and the row's whitening partials (count, sum and the
# centred squares about the row's mean, M2: each block's from its values in registers, combined
# from block to block by Chan et al.'s pairwise update), so that the batch's centred squares need
# no second pass over [B, T] (_reinforce_totals_kernel).
@triton.jit
def _reinforce_kernel(
    rew_ptr, mask_ptr, base_ptr,  # inputs: [B, T] (any strides), bool [B, T], [B] (REMAX)
    adv_ptr, ret_ptr, stats_ptr,  # outputs: contiguous [B, T] x2 (REMAX), float64 [B, 3] (else)
    T, s_r0, s_r1, s_m0, s_m1, gamma, gamma_lo,
    REMAX: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc_ty = ret_ptr.dtype.element_ty
    lane = tl.arange(0, BLOCK_T)
    gamma = scalar(gamma, gamma_lo, acc_ty)
    if REMAX:
        base = tl.load(base_ptr + b).to(acc_ty)
    carry = tl.zeros([], acc_ty)  # the return just right of the block
    n = tl.zeros([], tl.float64)  # the row's count, sum, mean and M2 so far (not REMAX)
    tot = tl.zeros([], tl.float64)
    mean = tl.zeros([], tl.float64)
    m2 = tl.zeros([], tl.float64)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_blocks):
        start = (tl.zeros([], tl.int64) + n_blocks - 1 - i) * BLOCK_T  # right to left, 64-bit
        offs = start + lane
        inb = offs < T
        m = tl.load(mask_ptr + b * s_m0 + offs * s_m1, mask=inb, other=0) != 0
        r = tl.load(rew_ptr + b * s_r0 + offs * s_r1, mask=m, other=0.0).to(acc_ty)
        one = tl.full([BLOCK_T], 1.0, acc_ty)
        zero = tl.zeros([BLOCK_T], acc_ty)
        qa, qb = tl.associative_scan((tl.where(m, zero + gamma, one), tl.where(m, r, zero)), 0, _affine_rcombine,
                                     reverse=True)
        R = _scale(qa, carry) + qb
        carry = tl.sum(tl.where(lane == 0, R, zero), axis=0)
        out = b * T + offs
        if REMAX:
            tl.store(ret_ptr + out, R, mask=inb)
            tl.store(adv_ptr + out, tl.where(m, R - base, R), mask=inb)
        else:
            ret = tl.where(m, R, zero)
            tl.store(ret_ptr + out, ret, mask=inb)
            x = ret.to(tl.float64)
            c = tl.sum(tl.where(m, 1.0, 0.0).to(tl.float64), axis=0)
            s_blk = tl.sum(x, axis=0)
            mean_blk = s_blk / tl.maximum(c, 1.0)
            dev = tl.where(m, x - mean_blk, 0.0)
            q = tl.sum(dev * dev, axis=0)
            nn = n + c
            d = mean_blk - mean
            w = c / tl.maximum(nn, 1.0)
            m2 = m2 + q + d * d * (n * w)
            mean = mean + d * w
            n = nn
            tot = tot + s_blk
    if not REMAX:
        tl.store(stats_ptr + b * 3, n)
        tl.store(stats_ptr + b * 3 + 1, tot)
        tl.store(stats_ptr + b * 3 + 2, m2)


@triton.jit
def _moments_of_rows(n_ptr, x_ptr, m2_ptr, stride, B,
                     X_IS_SUM: tl.constexpr, HAS_M2: tl.constexpr, BLOCK: tl.constexpr):
    """(n, total, sq) of a batch whose row b holds n_b values (n_ptr[b * stride]) with sum x_b
    (X_IS_SUM) or mean x_b (else), and centred sum of squares M2_b (HAS_M2; else 0: n_b copies of
    one value): the count sum_b n_b, the sum of the values, and their centred squares
    sum_b M2_b + n_b (mean_b - mean)^2 (rows with n_b = 0 add nothing). Float64, loops of BLOCK
    rows: a pass over B, not over [B, T] (REINFORCE++'s and reinforce_pp_baseline's whitening)."""
    lane = tl.arange(0, BLOCK)
    n_acc = tl.zeros([BLOCK], tl.float64)
    s_acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, B, BLOCK):
        rows = start + lane
        inb = rows < B
        nb = tl.load(n_ptr + rows * stride, mask=inb, other=0.0).to(tl.float64)
        xb = tl.load(x_ptr + rows * stride, mask=inb, other=0.0).to(tl.float64)
        n_acc += nb
        if X_IS_SUM:
            s_acc += xb
        else:
            s_acc += nb * xb
    n = tl.sum(n_acc, axis=0)
    total = tl.sum(s_acc, axis=0)
    mean = _whiten_mean(n, total)
    q_acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, B, BLOCK):
        rows = start + lane
        inb = rows < B
        nb = tl.load(n_ptr + rows * stride, mask=inb, other=0.0).to(tl.float64)
        xb = tl.load(x_ptr + rows * stride, mask=inb, other=0.0).to(tl.float64)
        if X_IS_SUM:
            d = xb / tl.maximum(nb, 1.0) - mean
        else:
            d = xb - mean
        q = nb * (d * d)
        if HAS_M2:
            q += tl.load(m2_ptr + rows * stride, mask=inb, other=0.0)
        q_acc += tl.where(nb > 0, q, 0.0)
    return n, total, tl.sum(q_acc, axis=0)


@triton.jit
def _reinforce_totals_kernel(
    stats_ptr, totals_ptr, sq_ptr,  # float64 [B, 3] (n, sum, M2 per row) -> [2] (n, sum), [1]
    B, BLOCK: tl.constexpr,
):
    """One program: the batch's count, sum and centred squares from the rows' (_moments_of_rows),
    in the input format of _whiten_apply_kernel."""
    n, total, sq = _moments_of_rows(stats_ptr, stats_ptr + 1, stats_ptr + 2, 3, B, True, True, BLOCK)
    tl.store(totals_ptr, n)
    tl.store(totals_ptr + 1, total)
    tl.store(sq_ptr, sq)


def _num_segments(B, T, device):
    """Programs per row (rmkernels._codes.num_gae_segments, the policy the CUDA binding uses
    too); FORCE_SEGMENT_T (tests) segments every row with that length on any device."""
    if FORCE_SEGMENT_T is not None:
        return max(1, triton.cdiv(T, FORCE_SEGMENT_T)), FORCE_SEGMENT_T
    if device.type != "cuda" or T < 2 * _codes.SEGMENT_T:
        return 1, _codes.SEGMENT_T
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _codes.num_gae_segments(B, T, sms), _codes.SEGMENT_T


def _check_main(name, t):
    check_tensor(name, t, dims=2, dtypes=FLOAT_DTYPES)


def _check_like(name, t, main, main_name):
    check_tensor(name, t, shape=main.shape, device=main.device)
    if t.dtype != main.dtype:
        raise TypeError(f"{name} must have the dtype of {main_name} ({main.dtype}), got {t.dtype}")


def _check_mask(name, mask, main):
    check_tensor(name, mask, shape=main.shape, dtype=torch.bool, device=main.device)


def _check_clamps(**clamps):
    """The kernels' clamps: finite and >= 0, 0 = no clamp (op_checks.h check_clamp_option)."""
    for name, c in clamps.items():
        _checks.check_nonneg(name, c)


def _gae_launch(lp, rf, values, scores, mask, B, T, scalars, est, token_rewards, adv, ret, rew, kl, stats_shape):
    """The GAE launches of ppo_gae and gae: one program per row, or the three launches of the
    segmented scan. ``ret`` None: the returns are not written. Returns the stats tensor
    ([B, S, 2] float64) or None for token rewards."""
    dev = values.device
    acc = adv.dtype
    S, seg_t = _num_segments(B, T, dev)
    seg_len = max(T, 1) if S == 1 else seg_t
    block_t = block_size(min(T, seg_len), MAX_BLOCK_T)
    strides = (lp.stride(0), lp.stride(1), rf.stride(0), rf.stride(1), values.stride(0), values.stride(1),
               mask.stride(0), mask.stride(1))
    stats = None if token_rewards else torch.empty(B, S, 2, dtype=torch.float64, device=dev)
    any_buf = adv  # a live buffer for the pointers a launch does not use
    st = stats if stats is not None else any_buf
    sc = scores if scores is not None else any_buf
    write_ret = ret is not None
    ret = ret if write_ret else any_buf
    if S == 1:
        _ppo_gae_kernel[(B, 1)](
            lp, rf, values, sc, mask, adv, ret, rew, kl, st, any_buf, st, any_buf, st,
            T, seg_len, *strides, *scalars, EST=est, MODE=int(_codes.GaeSegmentMode.ROW), TOKEN_REWARDS=token_rewards,
            WRITE_RET=write_ret, BLOCK_T=block_t)
        return stats
    agg = torch.empty(B, S, 4, dtype=acc, device=dev)
    seg_last = torch.empty(B, S, dtype=torch.int64, device=dev)
    carry = torch.empty(B, S, 2, dtype=acc, device=dev)
    last = torch.empty(B, dtype=torch.int64, device=dev)
    for mode in (int(_codes.GaeSegmentMode.SEGMENT_AGGREGATE), int(_codes.GaeSegmentMode.SEGMENT_FINAL)):
        _ppo_gae_kernel[(B, S)](
            lp, rf, values, sc, mask, adv, ret, rew, kl, st, agg, seg_last, carry, last,
            T, seg_len, *strides, *scalars, EST=est, MODE=mode, TOKEN_REWARDS=token_rewards, WRITE_RET=write_ret,
            BLOCK_T=block_t)
        if mode == _codes.GaeSegmentMode.SEGMENT_AGGREGATE:
            _gae_carry_kernel[(B,)](agg, seg_last, sc, carry, last, S, *scalars[2:4], *scalars[10:12],
                                    TOKEN_REWARDS=token_rewards)
    return stats


def ppo_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, estimator, x_clamp, kl_clamp,
            score_clip):
    _check_main("values", values)
    _check_like("logprobs", logprobs, values, "values")
    _check_like("ref_logprobs", ref_logprobs, values, "values")
    _check_mask("mask", mask, values)
    check_code("estimator", estimator, _codes.KLEstimator)
    _check_clamps(x_clamp=x_clamp, kl_clamp=kl_clamp, score_clip=score_clip)
    check_kl_coef(kl_coef)
    check_discount(gamma, lam)
    B, T = values.shape
    dev = values.device
    acc = acc_dtype(values.dtype)
    check_tensor("scores", scores, shape=(B,), dtype=acc, device=dev, contiguous=True)
    adv, ret, rew, kl = (torch.empty(B, T, dtype=acc, device=dev) for _ in range(4))
    if B == 0:
        return adv, ret, rew, kl, torch.empty(B, 2, dtype=torch.float64, device=dev)
    scalars = (*split_float(kl_coef), *split_float(gamma), *split_float(gamma * lam), *split_float(x_clamp),
               *split_float(kl_clamp), *split_float(score_clip))
    stats = _gae_launch(logprobs, ref_logprobs, values, scores, mask, B, T, scalars, int(estimator), False, adv, ret,
                        rew, kl, None)
    return adv, ret, rew, kl, stats.sum(1) if stats.shape[1] > 1 else stats.view(B, 2)


def gae(rewards, values, mask, gamma, lam, returns):
    """GAE over given token rewards (docs/ops.md section 4): (advantages, returns), contiguous [B, T] in
    the arithmetic dtype, 0 at masked positions; without ``returns`` the second output is an empty
    [0] tensor and only the advantages are written. ppo_gae's kernel with TOKEN_REWARDS."""
    _check_main("values", values)
    _check_like("rewards", rewards, values, "values")
    _check_mask("mask", mask, values)
    check_discount(gamma, lam)
    B, T = values.shape
    acc = acc_dtype(values.dtype)
    adv = torch.empty(B, T, dtype=acc, device=values.device)
    ret = torch.empty((B, T) if returns else (0,), dtype=acc, device=values.device)
    if B == 0 or T == 0:
        return adv, ret
    scalars = (*split_float(0.0), *split_float(gamma), *split_float(gamma * lam), *split_float(0.0),
               *split_float(0.0), *split_float(0.0))
    _gae_launch(rewards, rewards, values, None, mask, B, T, scalars, int(_codes.KLEstimator.K1), True, adv,
                ret if returns else None, adv, adv, None)
    return adv, ret


def kl_estimate(logprobs, ref_logprobs, mask, estimator, x_clamp, kl_clamp):
    """The per-token KL estimate (docs/ops.md section 4): contiguous [B, T] in the arithmetic dtype, 0
    where mask (bool [B, T] or None) is 0."""
    _check_main("logprobs", logprobs)
    _check_like("ref_logprobs", ref_logprobs, logprobs, "logprobs")
    if mask is not None:
        _check_mask("mask", mask, logprobs)
    check_code("estimator", estimator, _codes.KLEstimator)
    _check_clamps(x_clamp=x_clamp, kl_clamp=kl_clamp)
    B, T = logprobs.shape
    out = torch.empty(B, T, dtype=acc_dtype(logprobs.dtype), device=logprobs.device)
    if B == 0 or T == 0:
        return out
    block = block_size(T, APPLY_BLOCK)
    ms = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    _kl_estimate_kernel[(B, triton.cdiv(T, block))](
        logprobs, ref_logprobs, mask if mask is not None else logprobs, out, T, logprobs.stride(0),
        logprobs.stride(1), ref_logprobs.stride(0), ref_logprobs.stride(1), *ms, *split_float(x_clamp),
        *split_float(kl_clamp), EST=int(estimator), HAS_MASK=mask is not None, BLOCK=block)
    return out


def _check_x_mask(x, mask):
    _check_main("x", x)
    _check_mask("mask", mask, x)


def _check_totals(name, t, n, device):
    check_tensor(name, t, shape=(n,), dtype=torch.float64, device=device)


def masked_row_stats(x, mask):
    _check_x_mask(x, mask)
    B, T = x.shape
    stats = torch.empty(B, 2, dtype=torch.float64, device=x.device)
    if B == 0:
        return stats
    _row_stats_kernel[(B,)](x, mask, stats, T, x.stride(0), x.stride(1), mask.stride(0), mask.stride(1),
                            BLOCK_T=block_size(T, MAX_BLOCK_T))
    return stats


def masked_centered_sq(x, mask, totals):
    _check_x_mask(x, mask)
    _check_totals("totals", totals, 2, x.device)
    B, T = x.shape
    out = torch.empty(B, dtype=torch.float64, device=x.device)
    if B == 0:
        return out
    _centered_sq_kernel[(B,)](x, mask, totals.contiguous(), out, T, x.stride(0), x.stride(1), mask.stride(0),
                              mask.stride(1), BLOCK_T=block_size(T, MAX_BLOCK_T))
    return out


def masked_whiten_apply(x, mask, totals, sq, shift_mean, unbiased, eps):
    _check_x_mask(x, mask)
    _check_totals("totals", totals, 2, x.device)
    _check_totals("sq", sq, 1, x.device)
    check_whiten_options(shift_mean, unbiased, eps)
    B, T = x.shape
    out = torch.empty(B, T, dtype=acc_dtype(x.dtype), device=x.device)
    if B == 0 or T == 0:
        return out
    block = block_size(T, APPLY_BLOCK)
    _whiten_apply_kernel[(B, triton.cdiv(T, block))](
        x, mask, totals.contiguous(), sq.contiguous(), out, T, x.stride(0), x.stride(1), mask.stride(0),
        mask.stride(1), *split_float(eps), SHIFT_MEAN=bool(shift_mean), UNBIASED=bool(unbiased), BLOCK=block)
    return out


def reinforce(rewards, mask, baselines, gamma, unbiased, eps):
    """REINFORCE++ (``baselines`` None: the returns whitened over the valid positions) or ReMax
    (the returns at every position, minus ``baselines`` where valid): (advantages, returns),
    contiguous [B, T] in the arithmetic dtype. ``_reinforce_kernel`` (ReMax: one launch); for
    REINFORCE++ then ``_reinforce_totals_kernel`` (the batch's statistics from the rows') and
    masked_whiten's apply kernel: three launches, the returns re-read once."""
    _check_main("token_rewards", rewards)
    _check_mask("mask", mask, rewards)
    B, T = rewards.shape
    dev = rewards.device
    acc = acc_dtype(rewards.dtype)
    if baselines is not None:
        check_tensor("baselines", baselines, shape=(B,), dtype=acc, device=dev, contiguous=True)
    check_reinforce_options(gamma, unbiased, eps)
    adv = torch.empty(B, T, dtype=acc, device=dev)
    ret = torch.empty(B, T, dtype=acc, device=dev)
    if B == 0 or T == 0:
        return adv, ret
    remax = baselines is not None
    stats = adv if remax else torch.empty(B, 3, dtype=torch.float64, device=dev)
    _reinforce_kernel[(B,)](rewards, mask, baselines if remax else adv, adv, ret, stats, T, rewards.stride(0),
                            rewards.stride(1), mask.stride(0), mask.stride(1), *split_float(gamma), REMAX=remax,
                            BLOCK_T=block_size(T, MAX_BLOCK_T))
    if remax:
        return adv, ret
    totals = torch.empty(2, dtype=torch.float64, device=dev)
    sq = torch.empty(1, dtype=torch.float64, device=dev)
    _reinforce_totals_kernel[(1,)](stats, totals, sq, B, BLOCK=block_size(B, TOTALS_BLOCK))
    return masked_whiten_apply(ret, mask, totals, sq, True, unbiased, eps), ret
