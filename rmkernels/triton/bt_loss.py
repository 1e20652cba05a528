"""Triton kernels of the Bradley-Terry and K-wise ranking losses (docs/ops.md section 2).

Host functions have the signatures of the kernel ops in ``rmkernels/ops/bt_loss.py``.

Bytes moved: the Bradley-Terry forward reads the B chosen and B rejected rewards (+ B margins
and B weights when given) and writes one float (or B for ``"none"``); the backward reads
the same and writes 2B gradients. One launch each way: for ``"mean"``/``"sum"`` the forward
is a single program that walks B in chunks (a fixed-order reduction: deterministic, no
atomics), and so is the backward of a weighted ``"mean"``, which needs ``sum(w)`` first.
The ranking kernels run one program per row over tiles of the [K, K] pair matrix.

The scalar options (margin_value, weight_value, label_smoothing, center_coef) are kernel
arguments. Compiled Triton passes a Python float as float32, so each goes as an (hi, lo) float32
pair (``_common.split_float``, as the PPO and group-advantage kernels) and is rebuilt in the
arithmetic dtype: float64 inputs keep ~48 bits of each option (on a GPU, before this, they were
rounded to float32 and the float64 tests failed there).
"""
import torch
import triton
import triton.language as tl

from rmkernels import _codes
from rmkernels.ops.bt_loss import check_loss_scalars
from rmkernels.triton._common import (
    FLOAT_DTYPES,
    REDUCE_MEAN,
    REDUCE_NONE,
    acc_dtype,
    block_size,
    check_code,
    check_tensor,
    exp,
    log1p,
    scalar,
    split_float,
    to_store,
)

# Pairs per step of the Bradley-Terry kernels: 1024 fp32 per operand keeps 4 warps busy
# with 8 elements each; small batches get a smaller power of two.
MAX_BLOCK_B = 1024
# Side of the square tile of the [K, K] pair matrix in the ranking kernels: 32 x 32 = 1024
# pairs per step, the same register budget as a Bradley-Terry step.
MAX_BLOCK_K = 32


@triton.jit
def _log_sigmoid(x):
    """min(x, 0) - log1p(exp(-|x|)): no overflow for any x."""
    return tl.minimum(x, 0.0) - log1p(exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    z = exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _load_pairs(chosen_ptr, rejected_ptr, margin_ptr, weights_ptr, offs, B, stride_c, stride_r,
                margin_value, weight_value, acc_ty: tl.constexpr,
                HAS_MARGIN: tl.constexpr, HAS_WEIGHTS: tl.constexpr):
    """(in_b, c, r, m, w) of the pairs at `offs`, upcast to the arithmetic dtype."""
    in_b = offs < B
    offs64 = offs.to(tl.int64)
    c = tl.load(chosen_ptr + offs64 * stride_c, mask=in_b, other=0.0).to(acc_ty)
    r = tl.load(rejected_ptr + offs64 * stride_r, mask=in_b, other=0.0).to(acc_ty)
    if HAS_MARGIN:
        m = tl.load(margin_ptr + offs64, mask=in_b, other=0.0)
    else:
        m = tl.zeros_like(c) + margin_value
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + offs64, mask=in_b, other=0.0)
    else:
        w = tl.where(in_b, tl.zeros_like(c) + weight_value, 0.0)
    return in_b, c, r, m, w


@triton.jit
def _pair_loss(c, r, m, label_smoothing, center_coef, HAS_CENTER: tl.constexpr):
    """-(1 - e) logsigmoid(d) - e logsigmoid(-d) (+ coef (c + r)^2), d = c - r - m, per pair
    (rmkernels/scalar_math.h: bt_pair_loss). The e term is left out when e = 0, so that
    d = +inf gives the formula's 0, not 0 * -inf = NaN."""
    d = c - r - m
    sp = log1p(exp(-tl.abs(d)))  # shared by logsigmoid(d) and logsigmoid(-d)
    pos = -(1.0 - label_smoothing) * (tl.minimum(d, 0.0) - sp)
    loss = tl.where(label_smoothing != 0, pos - label_smoothing * (tl.minimum(-d, 0.0) - sp), pos)
    if HAS_CENTER:
        loss += center_coef * (c + r) * (c + r)
    return loss


@triton.jit
def _bt_fwd_kernel(
    chosen_ptr, rejected_ptr, margin_ptr, weights_ptr, out_ptr,  # pointers ([B] each; out [] or [B])
    B, stride_c, stride_r,  # size and the strides of chosen / rejected, in elements
    margin_value, margin_value_lo, weight_value, weight_value_lo,  # scalars as (hi, lo) fp32 pairs
    label_smoothing, label_smoothing_lo, center_coef, center_coef_lo,  # (_common.split_float)
    HAS_MARGIN: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_CENTER: tl.constexpr,
    REDUCTION: tl.constexpr,  # a rmkernels._codes.Reduction: none (grid over B), mean / sum (one program)
    BLOCK: tl.constexpr,
):
    acc_ty = out_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
    margin_value = scalar(margin_value, margin_value_lo, acc_ty)
    weight_value = scalar(weight_value, weight_value_lo, acc_ty)
    label_smoothing = scalar(label_smoothing, label_smoothing_lo, acc_ty)
    center_coef = scalar(center_coef, center_coef_lo, acc_ty)
    if REDUCTION == REDUCE_NONE:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_b, c, r, m, w = _load_pairs(chosen_ptr, rejected_ptr, margin_ptr, weights_ptr, offs, B, stride_c,
                                       stride_r, margin_value, weight_value, acc_ty, HAS_MARGIN, HAS_WEIGHTS)
        loss = _pair_loss(c, r, m, label_smoothing, center_coef, HAS_CENTER)
        tl.store(out_ptr + offs.to(tl.int64), w * loss, mask=in_b)
    else:
        # float64 sums: a float32 lane summing B / BLOCK pairs loses ~1e-5 relative at 2^22 pairs
        acc_l = tl.zeros([BLOCK], dtype=tl.float64)
        acc_w = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, B, BLOCK):  # fixed order: deterministic
            offs = start + tl.arange(0, BLOCK)
            in_b, c, r, m, w = _load_pairs(chosen_ptr, rejected_ptr, margin_ptr, weights_ptr, offs, B, stride_c,
                                           stride_r, margin_value, weight_value, acc_ty, HAS_MARGIN, HAS_WEIGHTS)
            loss = _pair_loss(c, r, m, label_smoothing, center_coef, HAS_CENTER)
            acc_l += tl.where(in_b, w * loss, 0.0).to(tl.float64)
            acc_w += w.to(tl.float64)
        total = tl.sum(acc_l, axis=0)
        if REDUCTION == REDUCE_MEAN:
            total = total / tl.sum(acc_w, axis=0)  # B = 0: 0 / 0 = NaN, as an empty mean
        tl.store(out_ptr, total.to(acc_ty))


@triton.jit
def _bt_bwd_block(
    start, grad_ptr, chosen_ptr, rejected_ptr, margin_ptr, weights_ptr, grad_c_ptr, grad_r_ptr,
    B, stride_c, stride_r, scale, margin_value, weight_value, label_smoothing, center_coef,
    HAS_MARGIN: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_CENTER: tl.constexpr, PER_PAIR_GRAD: tl.constexpr,
    NEED_C: tl.constexpr, NEED_R: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_ty = grad_ptr.dtype.element_ty
    offs = start + tl.arange(0, BLOCK)
    in_b, c, r, m, w = _load_pairs(chosen_ptr, rejected_ptr, margin_ptr, weights_ptr, offs, B, stride_c, stride_r,
                                   margin_value, weight_value, acc_ty, HAS_MARGIN, HAS_WEIGHTS)
    d = c - r - m
    dl_dd = -(1.0 - label_smoothing) * _sigmoid(-d) + label_smoothing * _sigmoid(d)  # scalar_math.h: bt_pair_dloss
    if HAS_CENTER:
        center = 2.0 * center_coef * (c + r)
    else:
        center = tl.zeros_like(c)
    if PER_PAIR_GRAD:
        g = tl.load(grad_ptr + offs.to(tl.int64), mask=in_b, other=0.0) * w
    else:
        g = scale * w
    if NEED_C:
        tl.store(grad_c_ptr + offs.to(tl.int64), to_store(g * (dl_dd + center), grad_c_ptr.dtype.element_ty),
                 mask=in_b)
    if NEED_R:
        tl.store(grad_r_ptr + offs.to(tl.int64), to_store(g * (center - dl_dd), grad_r_ptr.dtype.element_ty),
                 mask=in_b)


@triton.jit
def _bt_bwd_kernel(
    grad_ptr, chosen_ptr, rejected_ptr, margin_ptr, weights_ptr,  # inputs (grad: [] or [B])
    grad_c_ptr, grad_r_ptr,  # outputs [B], in the dtype of chosen
    B, stride_c, stride_r,  # size and strides of chosen / rejected
    margin_value, margin_value_lo, weight_value, weight_value_lo,  # scalars as (hi, lo) fp32 pairs
    label_smoothing, label_smoothing_lo, center_coef, center_coef_lo,  # (_common.split_float)
    HAS_MARGIN: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_CENTER: tl.constexpr,
    REDUCTION: tl.constexpr, NEED_C: tl.constexpr, NEED_R: tl.constexpr,
    SINGLE_PROGRAM: tl.constexpr,  # weighted mean: one program computes sum(w), then every pair
    BLOCK: tl.constexpr,
):
    acc_ty = grad_ptr.dtype.element_ty
    margin_value = scalar(margin_value, margin_value_lo, acc_ty)
    weight_value = scalar(weight_value, weight_value_lo, acc_ty)
    label_smoothing = scalar(label_smoothing, label_smoothing_lo, acc_ty)
    center_coef = scalar(center_coef, center_coef_lo, acc_ty)
    scale = tl.load(grad_ptr)  # the upstream gradient of a reduced loss (unused for "none")
    if REDUCTION == REDUCE_MEAN:
        if HAS_WEIGHTS:
            acc_w = tl.zeros([BLOCK], dtype=tl.float64)
            for start in range(0, B, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                acc_w += tl.load(weights_ptr + offs.to(tl.int64), mask=offs < B, other=0.0).to(tl.float64)
            scale = (scale.to(tl.float64) / tl.sum(acc_w, axis=0)).to(acc_ty)
        else:
            scale = scale / (B * weight_value)
    if SINGLE_PROGRAM:
        for start in range(0, B, BLOCK):
            _bt_bwd_block(start, grad_ptr, chosen_ptr, rejected_ptr, margin_ptr, weights_ptr, grad_c_ptr, grad_r_ptr,
                          B, stride_c, stride_r, scale, margin_value, weight_value, label_smoothing, center_coef,
                          HAS_MARGIN, HAS_WEIGHTS, HAS_CENTER, REDUCTION == REDUCE_NONE, NEED_C, NEED_R, BLOCK)
    else:
        _bt_bwd_block(tl.program_id(0) * BLOCK, grad_ptr, chosen_ptr, rejected_ptr, margin_ptr, weights_ptr,
                      grad_c_ptr, grad_r_ptr, B, stride_c, stride_r, scale, margin_value, weight_value,
                      label_smoothing, center_coef, HAS_MARGIN, HAS_WEIGHTS, HAS_CENTER, REDUCTION == REDUCE_NONE,
                      NEED_C, NEED_R, BLOCK)


def _flags(margin, weights, center_coef):
    return dict(HAS_MARGIN=margin is not None, HAS_WEIGHTS=weights is not None, HAS_CENTER=center_coef != 0)


def _check_pairs(chosen, rejected, margin, weights, reduction, margin_value, weight_value, label_smoothing,
                 center_coef):
    """The kernel ops' checks (csrc/cpu/bt_loss.cpp: check_pair; op_checks.h: check_bt_options),
    as ValueError / TypeError."""
    check_tensor("chosen", chosen, dims=1, dtypes=FLOAT_DTYPES)
    check_tensor("rejected", rejected, shape=chosen.shape, dtype=chosen.dtype, device=chosen.device)
    acc = acc_dtype(chosen.dtype)
    for name, t in (("margin", margin), ("weights", weights)):
        if t is not None:
            check_tensor(name, t, shape=chosen.shape, dtype=acc, device=chosen.device, contiguous=True)
    check_code("reduction", reduction, _codes.Reduction)
    check_loss_scalars(margin_value, weight_value, label_smoothing, center_coef)
    return acc


def bt_loss_fwd(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
                reduction):
    acc = _check_pairs(chosen, rejected, margin, weights, reduction, margin_value, weight_value, label_smoothing,
                       center_coef)
    B = chosen.shape[0]
    none = reduction == _codes.Reduction.NONE
    out = torch.empty((B,) if none else (), dtype=acc, device=chosen.device)
    if none and B == 0:
        return out
    block = block_size(B, MAX_BLOCK_B)
    grid = (triton.cdiv(B, block),) if none else (1,)
    _bt_fwd_kernel[grid](
        chosen, rejected, margin if margin is not None else out, weights if weights is not None else out, out,
        B, chosen.stride(0), rejected.stride(0), *split_float(margin_value), *split_float(weight_value),
        *split_float(label_smoothing), *split_float(center_coef), REDUCTION=reduction, BLOCK=block,
        **_flags(margin, weights, center_coef))
    return out


def bt_loss_bwd(grad, chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
                reduction, need_chosen, need_rejected):
    acc = _check_pairs(chosen, rejected, margin, weights, reduction, margin_value, weight_value, label_smoothing,
                       center_coef)
    B = chosen.shape[0]
    if reduction == _codes.Reduction.NONE:
        check_tensor("grad", grad, shape=(B,), dtype=acc, device=chosen.device, contiguous=True)
    else:
        check_tensor("grad", grad, dtype=acc, device=chosen.device)
        if grad.numel() != 1:
            raise ValueError(f"grad of a reduced loss must have one element, got shape {list(grad.shape)}")
    g_c = torch.empty(B if need_chosen else 0, dtype=chosen.dtype, device=chosen.device)
    g_r = torch.empty(B if need_rejected else 0, dtype=chosen.dtype, device=chosen.device)
    if B == 0 or not (need_chosen or need_rejected):
        return g_c, g_r
    block = block_size(B, MAX_BLOCK_B)
    single = reduction == _codes.Reduction.MEAN and weights is not None
    grid = (1,) if single else (triton.cdiv(B, block),)
    _bt_bwd_kernel[grid](
        grad, chosen, rejected, margin if margin is not None else grad, weights if weights is not None else grad,
        g_c if need_chosen else grad, g_r if need_rejected else grad,
        B, chosen.stride(0), rejected.stride(0), *split_float(margin_value), *split_float(weight_value),
        *split_float(label_smoothing), *split_float(center_coef), REDUCTION=reduction, NEED_C=need_chosen,
        NEED_R=need_rejected, SINGLE_PROGRAM=single,
        BLOCK=block, **_flags(margin, weights, center_coef))
    return g_c, g_r


@triton.jit
def _candidates(nc_ptr, b, K, HAS_NC: tl.constexpr):
    """Columns ranked in row b: num_candidates[b] clamped to [0, K], or K (int64)."""
    n = K + tl.zeros([], tl.int64)
    if HAS_NC:
        n = tl.minimum(tl.maximum(tl.load(nc_ptr + b), 0), K)
    return n


@triton.jit
def _ranking_fwd_kernel(
    rewards_ptr, nc_ptr, out_ptr,  # rewards [B, K], num_candidates [B] int64, row losses [B]
    K, stride_b, stride_k,  # sizes and strides of rewards
    HAS_NC: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc_ty = out_ptr.dtype.element_ty
    n = _candidates(nc_ptr, b, K, HAS_NC)
    row = rewards_ptr + b * stride_b
    # each pair term in acc_ty, their sums in float64 (the C++ kernels' rule: a float32 sum of
    # K(K-1)/2 terms drifts for large K)
    acc = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float64)
    for i0 in range(0, n, BLOCK_K):
        offs_i = i0 + tl.arange(0, BLOCK_K)
        ri = tl.load(row + offs_i.to(tl.int64) * stride_k, mask=offs_i < n, other=0.0).to(acc_ty)
        for j0 in range(i0, n, BLOCK_K):  # tiles on or above the diagonal hold every pair i < j
            offs_j = j0 + tl.arange(0, BLOCK_K)
            rj = tl.load(row + offs_j.to(tl.int64) * stride_k, mask=offs_j < n, other=0.0).to(acc_ty)
            pair = (offs_i[:, None] < offs_j[None, :]) & (offs_j[None, :] < n)
            acc += tl.where(pair, -_log_sigmoid(ri[:, None] - rj[None, :]), 0.0).to(tl.float64)
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    n_pairs = (n * (n - 1) // 2).to(tl.float64)
    tl.store(out_ptr + b, tl.where(n >= 2, total / tl.maximum(n_pairs, 1.0), 0.0).to(acc_ty))


@triton.jit
def _ranking_bwd_kernel(
    grad_ptr, rewards_ptr, nc_ptr, out_ptr,  # grad_rows [B], rewards [B, K], num_candidates, grad [B, K]
    K, stride_b, stride_k,  # sizes and strides of rewards (out is contiguous)
    HAS_NC: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc_ty = grad_ptr.dtype.element_ty
    n = _candidates(nc_ptr, b, K, HAS_NC)
    n_pairs = (n * (n - 1) // 2).to(acc_ty)
    scale = tl.where(n >= 2, tl.load(grad_ptr + b) / tl.maximum(n_pairs, 1.0), 0.0)
    row = rewards_ptr + b * stride_b
    for i0 in range(0, K, BLOCK_K):
        offs_i = i0 + tl.arange(0, BLOCK_K)
        ri = tl.load(row + offs_i.to(tl.int64) * stride_k, mask=offs_i < n, other=0.0).to(acc_ty)
        g = tl.zeros([BLOCK_K], dtype=tl.float64)  # float64 sums, as the forward's
        for j0 in range(0, n, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            rj = tl.load(row + offs_j.to(tl.int64) * stride_k, mask=offs_j < n, other=0.0).to(acc_ty)
            x = ri[:, None] - rj[None, :]
            valid = (offs_i[:, None] < n) & (offs_j[None, :] < n)
            # j < i: d/dr_i -logsigmoid(r_j - r_i) = sigmoid(x); j > i: -sigmoid(-x)
            term = tl.where(offs_j[None, :] < offs_i[:, None], _sigmoid(x), -_sigmoid(-x))
            term = tl.where(valid & (offs_j[None, :] != offs_i[:, None]), term, 0.0)
            g += tl.sum(term.to(tl.float64), axis=1)
        tl.store(out_ptr + b * K + offs_i, to_store(scale * g.to(acc_ty), out_ptr.dtype.element_ty), mask=offs_i < K)


def _check_ranking(rewards, num_candidates):
    check_tensor("rewards", rewards, dims=2, dtypes=FLOAT_DTYPES)
    if num_candidates is not None:
        check_tensor("num_candidates", num_candidates, shape=rewards.shape[:1], dtype=torch.int64,
                     device=rewards.device, contiguous=True)
    return acc_dtype(rewards.dtype)


def ranking_loss_fwd(rewards, num_candidates):
    acc = _check_ranking(rewards, num_candidates)
    B, K = rewards.shape
    out = torch.empty(B, dtype=acc, device=rewards.device)
    if B == 0:
        return out
    _ranking_fwd_kernel[(B,)](
        rewards, num_candidates if num_candidates is not None else out, out, K, rewards.stride(0), rewards.stride(1),
        HAS_NC=num_candidates is not None, BLOCK_K=block_size(K, MAX_BLOCK_K, floor=2))
    return out


def ranking_loss_bwd(grad_rows, rewards, num_candidates):
    acc = _check_ranking(rewards, num_candidates)
    check_tensor("grad_rows", grad_rows, shape=rewards.shape[:1], dtype=acc, device=rewards.device, contiguous=True)
    B, K = rewards.shape
    out = torch.empty(B, K, dtype=rewards.dtype, device=rewards.device)
    if B == 0 or K == 0:
        return out
    _ranking_bwd_kernel[(B,)](
        grad_rows, rewards, num_candidates if num_candidates is not None else grad_rows, out, K, rewards.stride(0),
        rewards.stride(1), HAS_NC=num_candidates is not None, BLOCK_K=block_size(K, MAX_BLOCK_K, floor=2))
    return out
