"""Triton kernels of the last-token pooling (docs/ops.md section 1).

Bytes moved: forward reads B*H hidden elements (one row per sequence) + K*H weights + B
indices and writes B*K floats; backward writes the B picked rows of grad_hidden (the zero
fill is a memset) and re-reads them once for grad_weight.
"""
import torch
import triton
import triton.language as tl

from rmkernels._layout import grad_buffer
from rmkernels.triton._common import FLOAT_DTYPES, acc_dtype, block_size, check_tensor, to_store

# Elements of H per step: 1024 fp32 = 4 KiB per program and iteration, which keeps 4 warps
# busy with 8 elements each; smaller rows are covered by a smaller power of two.
MAX_BLOCK_H = 1024
# Mask elements per step of the index scan.
MAX_BLOCK_T = 1024
# Registers of the [BLOCK_K, BLOCK_H] accumulator of the grad_weight kernel are capped here,
# and K is tiled by at most MAX_PARAM_BLOCK_K rows (a value head has K = 1..a few; a
# vocabulary-sized K must not become one tile: Triton caps a tensor at 2^20 elements).
MAX_PARAM_TILE = 4096
MAX_PARAM_BLOCK_K = 64


@triton.jit
def _last_token_index_kernel(
    mask_ptr, index_ptr,  # pointers: mask [B, T] (bool/int), index [B] int64
    T, stride_b, stride_t,  # sizes and strides, in elements
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    best = tl.full([BLOCK_T], -1, tl.int64)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        m = tl.load(mask_ptr + b * stride_b + offs.to(tl.int64) * stride_t, mask=offs < T, other=0)
        best = tl.maximum(best, tl.where(m != 0, offs.to(tl.int64), -1))
    tl.store(index_ptr + b, tl.max(best, axis=0))


@triton.jit
def _reward_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, index_ptr, out_ptr,  # pointers
    T, H, K, stride_b, stride_t,  # sizes; hidden strides (unit stride on H)
    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # One program per (b, k), b-major, on a 1-D grid: grid axis 1 is limited to 65535 on
    # CUDA, and K can be a vocabulary (a last-token LM head).
    bk = tl.program_id(0).to(tl.int64)
    b = bk // K
    k = bk % K
    t = tl.load(index_ptr + b)
    valid = (t >= 0) & (t < T)
    row = hidden_ptr + b * stride_b + tl.where(valid, t, 0) * stride_t
    acc_ty = weight_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
    acc = tl.zeros([BLOCK_H], dtype=acc_ty)
    for start in range(0, H, BLOCK_H):
        offs = start + tl.arange(0, BLOCK_H)
        in_h = offs < H
        x = tl.load(row + offs, mask=in_h & valid, other=0.0).to(acc_ty)
        w = tl.load(weight_ptr + k * H + offs, mask=in_h, other=0.0)
        acc += x * w
    r = tl.sum(acc, axis=0)
    if HAS_BIAS:
        r += tl.load(bias_ptr + k)
    r = tl.where(valid, r, float("nan"))
    tl.store(out_ptr + bk, r)


@triton.jit
def _reward_bwd_hidden_kernel(
    grad_ptr, weight_ptr, index_ptr, grad_hidden_ptr,  # pointers
    T, H, K, gstride_b, gstride_t,  # sizes; grad_hidden strides
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs < H
    t = tl.load(index_ptr + b)
    valid = (t >= 0) & (t < T)
    acc = tl.zeros([BLOCK_H], dtype=weight_ptr.dtype.element_ty)
    for k in range(0, K):
        k64 = tl.zeros([], tl.int64) + k  # k * H passes 2^31 for a large head (a plain loop index is 32-bit)
        g = tl.load(grad_ptr + b * K + k64)
        acc += g * tl.load(weight_ptr + k64 * H + offs, mask=in_h, other=0.0)
    out = grad_hidden_ptr + b * gstride_b + tl.where(valid, t, 0) * gstride_t
    tl.store(out + offs, to_store(acc, grad_hidden_ptr.dtype.element_ty), mask=in_h & valid)


@triton.jit
def _reward_bwd_params_kernel(
    grad_ptr, hidden_ptr, index_ptr, grad_weight_ptr, grad_bias_ptr,  # pointers
    B, T, H, K, stride_b, stride_t,  # sizes; hidden strides
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_k = tl.program_id(0)  # K tiles on axis 0 (no 65535 limit), H tiles on axis 1
    pid_h = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_h = offs_h < H
    in_k = offs_k < K
    acc_ty = grad_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_K, BLOCK_H], dtype=acc_ty)
    acc_b = tl.zeros([BLOCK_K], dtype=acc_ty)
    for b in range(0, B):  # fixed order over the batch: deterministic
        b64 = tl.zeros([], tl.int64) + b  # 64-bit offsets (a plain loop index is 32-bit)
        t = tl.load(index_ptr + b64)
        valid = (t >= 0) & (t < T)
        g = tl.load(grad_ptr + b64 * K + offs_k, mask=in_k & valid, other=0.0)
        acc_b += g
        if NEED_WEIGHT:
            row = hidden_ptr + b64 * stride_b + tl.where(valid, t, 0) * stride_t
            x = tl.load(row + offs_h, mask=in_h & valid, other=0.0).to(acc_ty)
            acc += g[:, None] * x[None, :]
    if NEED_WEIGHT:
        ptrs = grad_weight_ptr + offs_k[:, None].to(tl.int64) * H + offs_h[None, :]
        tl.store(ptrs, acc, mask=in_k[:, None] & in_h[None, :])
    if NEED_BIAS:
        if pid_h == 0:
            tl.store(grad_bias_ptr + offs_k, acc_b, mask=in_k)


def _hidden_geometry(hidden):
    """(T, H, stride_b, stride_t): a packed [N, H] batch is a [B, N, H] view with stride_b 0."""
    if hidden.dim() == 3:
        return hidden.shape[1], hidden.shape[2], hidden.stride(0), hidden.stride(1)
    return hidden.shape[0], hidden.shape[1], 0, hidden.stride(0)


def _check_head(hidden, weight, bias, index):
    """The kernel ops' checks (op_checks.h: check_last_token_args), as ValueError / TypeError."""
    check_tensor("hidden_states", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden_states must be [B, T, H] or packed [N, H], got shape {list(hidden.shape)}")
    if hidden.shape[-1] > 1 and hidden.stride(-1) != 1:
        raise ValueError(f"hidden_states needs a unit stride on H, got strides {list(hidden.stride())}")
    dev, acc = hidden.device, acc_dtype(hidden.dtype)
    check_tensor("weight", weight, dims=2, dtype=acc, device=dev, contiguous=True)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [K, H] with H = {hidden.shape[-1]} (hidden_states' last dim), got shape "
                         f"{list(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=weight.shape[:1], dtype=acc, device=dev, contiguous=True)
    check_tensor("index", index, dims=1, dtype=torch.int64, device=dev, contiguous=True)
    if hidden.dim() == 3 and index.shape[0] != hidden.shape[0]:
        raise ValueError(f"index must have B = hidden_states.size(0) = {hidden.shape[0]} rows, got {index.shape[0]}")


def last_token_index(mask):
    check_tensor("attention_mask", mask, dims=2)
    if mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool, integer or float, got {mask.dtype}")
    B, T = mask.shape
    index = torch.empty(B, dtype=torch.int64, device=mask.device)
    if B == 0:
        return index
    _last_token_index_kernel[(B,)](mask, index, T, mask.stride(0), mask.stride(1), BLOCK_T=block_size(T, MAX_BLOCK_T))
    return index


def last_token_reward_fwd(hidden, weight, bias, index):
    _check_head(hidden, weight, bias, index)
    B, K = index.shape[0], weight.shape[0]
    T, H, sb, st = _hidden_geometry(hidden)
    out = torch.empty(B, K, dtype=weight.dtype, device=hidden.device)
    if B == 0 or K == 0:
        return out
    _reward_fwd_kernel[(B * K,)](
        hidden, weight, bias if bias is not None else weight, index, out,
        T, H, K, sb, st, HAS_BIAS=bias is not None, BLOCK_H=block_size(H, MAX_BLOCK_H))
    return out


def last_token_reward_bwd(grad, hidden, weight, index, need_hidden, need_weight, need_bias):
    _check_head(hidden, weight, None, index)
    B, K = index.shape[0], weight.shape[0]
    check_tensor("grad", grad, shape=(B, K), dtype=weight.dtype, device=hidden.device, contiguous=True)
    T, H, sb, st = _hidden_geometry(hidden)
    g_hidden = grad_buffer(hidden) if need_hidden else hidden.new_empty(0)
    g_weight = weight.new_empty(K, H) if need_weight else weight.new_empty(0)
    g_bias = weight.new_empty(K) if need_bias else weight.new_empty(0)
    if need_hidden and B > 0 and H > 0:
        gsb, gst = (g_hidden.stride(0), g_hidden.stride(1)) if hidden.dim() == 3 else (0, g_hidden.stride(0))
        block_h = block_size(H, MAX_BLOCK_H)
        _reward_bwd_hidden_kernel[(B, triton.cdiv(H, block_h))](
            grad, weight, index, g_hidden, T, H, K, gsb, gst, BLOCK_H=block_h)
    if need_weight or need_bias:
        block_k = min(triton.next_power_of_2(max(K, 1)), MAX_PARAM_BLOCK_K)
        block_h = block_size(min(H, max(MAX_PARAM_TILE // block_k, 16)), MAX_BLOCK_H)
        grid = (max(1, triton.cdiv(K, block_k)), max(1, triton.cdiv(H, block_h)))
        _reward_bwd_params_kernel[grid](
            grad, hidden, index, g_weight if need_weight else grad, g_bias if need_bias else grad,
            B, T, H, K, sb, st, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias,
            BLOCK_K=block_k, BLOCK_H=block_h)
    return g_hidden, g_weight, g_bias
