"""Triton kernels of the PPO rewards / GAE / whitening (SPEC section 3).

``_ppo_gae_kernel``: one program per row. It finds the row's last valid position, then
walks the row from the right in blocks of BLOCK_T; inside a block the two recurrences are
parallel scans (``tl.associative_scan(..., reverse=True)``) of affine maps
``C_t = a_t * C_{t+1} + b_t`` with the state of the block to the right carried in:

* ``V_next``: ``(a, b) = (0, V_u)`` at a valid position u, ``(1, 0)`` (identity) at a
  masked one, scanned over u = t + 1 (the values and mask are loaded shifted by one), so
  the scan gives the value of the next valid position after t, exactly;
* ``A``: ``(a, b) = (gamma * lam, delta_t)`` at a valid position, identity at a masked one.

Bytes moved by the GAE kernel: logprobs, ref_logprobs, values once (the shifted re-read of
values and mask hits the cache), the mask twice, the four [B, T] outputs once, 16 B of
partials per row. The whitening reads the advantages twice (partials, then the apply) and
writes them once.
"""
import numpy as np
import torch
import triton
import triton.language as tl

# Positions per step of the row walk: 1024 fp32 per array keeps 4 warps busy with 8
# elements each and the scans in registers; short rows use a smaller power of two.
MAX_BLOCK_T = 1024
# Long rows in a batch too small to fill the GPU are split into segments of this many
# positions, one program each (aggregate, carry, final: three launches instead of one);
# 4096 positions = 4 steps of the walk, enough work per program to hide the extra launches.
SEGMENT_T = 4096
FORCE_SEGMENT_T = None  # tests: segment every row with this length
# Elements per program of the element-wise whitening apply.
APPLY_BLOCK = 1024


def _block(n, cap):
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


@triton.jit
def _clamp_sym(x, c):
    """x clamped to [-c, c] when c > 0; NaN stays NaN (comparisons with NaN are false)."""
    y = tl.where(x < -c, -c, tl.where(x > c, c, x))
    return tl.where(c > 0, y, x)


@triton.jit
def _scalar(hi, lo, ty):
    """A host float passed as two fp32 scalars (Triton passes Python floats as fp32): hi + lo
    carries ~48 bits, enough for float64 inputs."""
    return (tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)).to(ty)


@triton.jit
def _affine_rcombine(a1, b1, a2, b2):
    # Reverse scan: (a1, b1) is the map accumulated from the right, (a2, b2) the element to
    # its left; the result applies the right part first: x -> a2 * (a1 * x + b1) + b2.
    # Plain IEEE arithmetic, like the sequential recurrence.
    return a1 * a2, a2 * b1 + b2


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
    return a1 * a2, a2 * b1 + b2, a2 * c1 + c2


# Modes of _ppo_gae_kernel (one program per row, or per (row, segment) for long rows).
MODE_ROW = 0  # the whole row, carries start at 0: writes everything
MODE_SEGMENT_AGGREGATE = 1  # a segment with zero carries: writes its aggregate only
MODE_SEGMENT_FINAL = 2  # a segment with the carries of the segments to its right: writes everything


@triton.jit
def _ppo_gae_kernel(
    lp_ptr, ref_ptr, v_ptr, scores_ptr, mask_ptr,  # inputs: [B, T] x3 (any strides), [B], bool [B, T]
    adv_ptr, ret_ptr, rew_ptr, kl_ptr, stats_ptr,  # outputs: contiguous [B, T] x4, float64 [B, S, 2]
    agg_ptr, seg_last_ptr, carry_ptr, last_ptr,  # segments: [B, S, 4] acc, [B, S] i64, [B, S, 2] acc, [B] i64
    T, SEG, s_lp0, s_lp1, s_rf0, s_rf1, s_v0, s_v1, s_m0, s_m1,  # sizes (SEG: positions per segment), strides
    kl_coef, kl_coef_lo, gamma, gamma_lo, gl, gl_lo,  # scalars as (hi, lo) fp32 pairs; gl = gamma * lam
    x_clamp, x_clamp_lo, kl_clamp, kl_clamp_lo, score_clip, score_clip_lo,  # clamps (0 = none)
    EST: tl.constexpr, MODE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1).to(tl.int64)
    n_seg = tl.num_programs(1).to(tl.int64)
    acc_ty = adv_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
    lane = tl.arange(0, BLOCK_T)
    t_lo = seg * SEG
    t_hi = tl.minimum(t_lo + SEG, T)  # this program covers [t_lo, t_hi)
    kl_coef = _scalar(kl_coef, kl_coef_lo, acc_ty)
    gamma = _scalar(gamma, gamma_lo, acc_ty)
    gl = _scalar(gl, gl_lo, acc_ty)
    x_clamp = _scalar(x_clamp, x_clamp_lo, acc_ty)
    kl_clamp = _scalar(kl_clamp, kl_clamp_lo, acc_ty)
    score = _clamp_sym(tl.load(scores_ptr + b).to(acc_ty), _scalar(score_clip, score_clip_lo, acc_ty))
    # The last valid position of the row gets the score (of the segment, for an aggregate,
    # which leaves the score out: the carry kernel adds it).
    if MODE == 2:
        last = tl.load(last_ptr + b)
        carry_a = tl.load(carry_ptr + (b * n_seg + seg) * 2).to(acc_ty)
        carry_v = tl.load(carry_ptr + (b * n_seg + seg) * 2 + 1).to(acc_ty)
    else:
        best = tl.full([BLOCK_T], -1, tl.int64)
        for start in range(t_lo, t_hi, BLOCK_T):
            offs = start + lane.to(tl.int64)
            m = tl.load(mask_ptr + b * s_m0 + offs * s_m1, mask=offs < t_hi, other=0)
            best = tl.maximum(best, tl.where(m != 0, offs, -1))
        seg_last = tl.max(best, axis=0)
        if MODE == 0:
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
        # KL and rewards.
        lp = tl.load(lp_ptr + b * s_lp0 + offs * s_lp1, mask=m, other=0.0).to(acc_ty)
        rf = tl.load(ref_ptr + b * s_rf0 + offs * s_rf1, mask=m, other=0.0).to(acc_ty)
        v = tl.load(v_ptr + b * s_v0 + offs * s_v1, mask=m, other=0.0).to(acc_ty)
        x = _clamp_sym(lp - rf, x_clamp)
        if EST == 0:
            k = x
        elif EST == 1:
            k = tl.abs(x)
        elif EST == 2:
            k = 0.5 * x * x
        else:
            k = tl.exp(-x) - 1.0 + x
        k = tl.where(m, _clamp_sym(k.to(acc_ty), kl_clamp), zero)
        r = -kl_coef * k
        r = tl.where(offs == last, r + score, r)
        r = tl.where(m, r, zero)
        # A_t = delta_t + gamma * lam * A_next over valid positions.
        delta = r + gamma * v_next - v
        qm = tl.where(m, zero + gl, one)
        qd = tl.where(m, delta, zero)
        if MODE == 1:
            qe_in = tl.where(offs == seg_last, one, zero)
            qa, qb, qe = tl.associative_scan((qm, qd, qe_in), 0, _affine2_rcombine, reverse=True)
            e = qa * carry_e + qe
            carry_e = tl.sum(tl.where(lane == 0, e, zero), axis=0)
            alpha = alpha * tl.sum(tl.where(lane == 0, qa, zero), axis=0)
            v_first = tl.sum(tl.where(lane == 0, tl.where(m, v, v_next), zero), axis=0)  # D(start)
        else:
            qa, qb = tl.associative_scan((qm, qd), 0, _affine_rcombine, reverse=True)
        a = qa * carry_a + qb
        carry_v = tl.sum(tl.where(lane == 0, v_next, zero), axis=0)
        carry_a = tl.sum(tl.where(lane == 0, a, zero), axis=0)
        if MODE != 1:
            adv = tl.where(m, a, zero)
            out = b * T + offs
            tl.store(kl_ptr + out, k, mask=inb)
            tl.store(rew_ptr + out, r, mask=inb)
            tl.store(adv_ptr + out, adv, mask=inb)
            tl.store(ret_ptr + out, tl.where(m, a + v, zero), mask=inb)
            cnt += tl.where(m, 1.0, 0.0).to(tl.float64)
            tot += adv.to(tl.float64)
    if MODE == 1:
        # C(t_lo) = alpha * C_in + gamma * e * D_in + c0 (+ e * score if the row's last valid
        # position is here); D(t_lo) = v_first if the segment has a valid position, else D_in.
        agg = agg_ptr + (b * n_seg + seg) * 4
        tl.store(agg, alpha)
        tl.store(agg + 1, carry_e)
        tl.store(agg + 2, carry_a)
        tl.store(agg + 3, v_first)
        tl.store(seg_last_ptr + b * n_seg + seg, seg_last)
    else:
        tl.store(stats_ptr + (b * n_seg + seg) * 2, tl.sum(cnt, axis=0))
        tl.store(stats_ptr + (b * n_seg + seg) * 2 + 1, tl.sum(tot, axis=0))


@triton.jit
def _gae_carry_kernel(
    agg_ptr, seg_last_ptr, scores_ptr, carry_ptr, last_ptr,  # [B, S, 4], [B, S], [B], out [B, S, 2], out [B]
    S, gamma, gamma_lo, score_clip, score_clip_lo,
):
    """One program per row: the row's last valid position, and from the right the carries
    (C, D) that enter each segment, composed from the segments' aggregates."""
    b = tl.program_id(0).to(tl.int64)
    acc_ty = agg_ptr.dtype.element_ty
    gamma = _scalar(gamma, gamma_lo, acc_ty)
    score = _clamp_sym(tl.load(scores_ptr + b).to(acc_ty), _scalar(score_clip, score_clip_lo, acc_ty))
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
        c0 = tl.where(has, tl.where(sl == last, c0 + e * score, c0), c0)
        c = tl.where(has, alpha * c + gamma * e * d + c0, c)  # a segment with no valid position passes through
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
def _mean_of(totals_ptr):
    n = tl.load(totals_ptr)
    s = tl.load(totals_ptr + 1)
    return n, tl.where(n > 0, s / tl.maximum(n, 1.0), 0.0)


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
def _whiten_apply_kernel(
    x_ptr, mask_ptr, totals_ptr, sq_ptr, out_ptr,  # x [B, T], bool mask, float64 [2], [1], out [B, T]
    T, s_x0, s_x1, s_m0, s_m1, eps, eps_lo,
    SHIFT_MEAN: tl.constexpr, UNBIASED: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc_ty = out_ptr.dtype.element_ty
    n, mean = _mean_of(totals_ptr)
    ok = n > 1  # n <= 1: all zeros, never NaN
    if UNBIASED:
        den = n - 1.0
    else:
        den = n
    var = tl.load(sq_ptr) / tl.where(ok, den, 1.0)
    rstd = (1.0 / tl.sqrt(var + _scalar(eps, eps_lo, tl.float64))).to(acc_ty)
    mean_a = mean.to(acc_ty)
    inb = offs < T
    m = tl.load(mask_ptr + b * s_m0 + offs * s_m1, mask=inb, other=0) != 0
    x = tl.load(x_ptr + b * s_x0 + offs * s_x1, mask=m, other=0.0).to(acc_ty)
    y = (x - mean_a) * rstd
    if not SHIFT_MEAN:
        y = y + mean_a
    y = tl.where(m, tl.where(ok, y, 0.0), 0.0)
    tl.store(out_ptr + b * T + offs, y.to(acc_ty), mask=inb)


def _split(v):
    """(hi, lo) fp32 pair of a host float (see _scalar)."""
    hi = float(np.float32(v))
    return hi, float(np.float32(float(v) - hi))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_segments(B, T, device):
    """Programs per row: 1, or cdiv(T, SEGMENT_T) when the batch has too few rows to fill the
    GPU (fewer than 2 per SM) and the rows are long."""
    if FORCE_SEGMENT_T is not None:
        return max(1, triton.cdiv(T, FORCE_SEGMENT_T))
    if device.type != "cuda" or T < 2 * SEGMENT_T:
        return 1
    if B >= 2 * torch.cuda.get_device_properties(device).multi_processor_count:
        return 1
    return triton.cdiv(T, SEGMENT_T)


def ppo_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, estimator, x_clamp, kl_clamp,
            score_clip):
    B, T = values.shape
    dev = values.device
    acc = _acc(values.dtype)
    adv, ret, rew, kl = (torch.empty(B, T, dtype=acc, device=dev) for _ in range(4))
    if B == 0:
        return adv, ret, rew, kl, torch.empty(B, 2, dtype=torch.float64, device=dev)
    S = _num_segments(B, T, dev)
    seg_len = T if S == 1 else (FORCE_SEGMENT_T or SEGMENT_T)
    block_t = _block(min(T, seg_len), MAX_BLOCK_T)
    strides = (logprobs.stride(0), logprobs.stride(1), ref_logprobs.stride(0), ref_logprobs.stride(1),
               values.stride(0), values.stride(1), mask.stride(0), mask.stride(1))
    scalars = (*_split(kl_coef), *_split(gamma), *_split(gamma * lam), *_split(x_clamp), *_split(kl_clamp),
               *_split(score_clip))
    stats = torch.empty(B, S, 2, dtype=torch.float64, device=dev)
    if S == 1:
        _ppo_gae_kernel[(B, 1)](
            logprobs, ref_logprobs, values, scores, mask, adv, ret, rew, kl, stats, adv, stats, adv, stats,
            T, max(T, 1), *strides, *scalars, EST=int(estimator), MODE=MODE_ROW, BLOCK_T=block_t)
        return adv, ret, rew, kl, stats.view(B, 2)
    agg = torch.empty(B, S, 4, dtype=acc, device=dev)
    seg_last = torch.empty(B, S, dtype=torch.int64, device=dev)
    carry = torch.empty(B, S, 2, dtype=acc, device=dev)
    last = torch.empty(B, dtype=torch.int64, device=dev)
    for mode in (MODE_SEGMENT_AGGREGATE, MODE_SEGMENT_FINAL):
        _ppo_gae_kernel[(B, S)](
            logprobs, ref_logprobs, values, scores, mask, adv, ret, rew, kl, stats, agg, seg_last, carry, last,
            T, seg_len, *strides, *scalars, EST=int(estimator), MODE=mode, BLOCK_T=block_t)
        if mode == MODE_SEGMENT_AGGREGATE:
            _gae_carry_kernel[(B,)](agg, seg_last, scores, carry, last, S, *_split(gamma), *_split(score_clip))
    return adv, ret, rew, kl, stats.sum(1)


def masked_row_stats(x, mask):
    B, T = x.shape
    stats = torch.empty(B, 2, dtype=torch.float64, device=x.device)
    if B == 0:
        return stats
    _row_stats_kernel[(B,)](x, mask, stats, T, x.stride(0), x.stride(1), mask.stride(0), mask.stride(1),
                            BLOCK_T=_block(T, MAX_BLOCK_T))
    return stats


def masked_centered_sq(x, mask, totals):
    B, T = x.shape
    out = torch.empty(B, dtype=torch.float64, device=x.device)
    if B == 0:
        return out
    _centered_sq_kernel[(B,)](x, mask, totals.contiguous(), out, T, x.stride(0), x.stride(1), mask.stride(0),
                              mask.stride(1), BLOCK_T=_block(T, MAX_BLOCK_T))
    return out


def masked_whiten_apply(x, mask, totals, sq, shift_mean, unbiased, eps):
    B, T = x.shape
    out = torch.empty(B, T, dtype=_acc(x.dtype), device=x.device)
    if B == 0 or T == 0:
        return out
    block = _block(T, APPLY_BLOCK)
    _whiten_apply_kernel[(B, triton.cdiv(T, block))](
        x, mask, totals.contiguous(), sq.contiguous(), out, T, x.stride(0), x.stride(1), mask.stride(0),
        mask.stride(1), *_split(eps), SHIFT_MEAN=bool(shift_mean), UNBIASED=bool(unbiased), BLOCK=block)
    return out
