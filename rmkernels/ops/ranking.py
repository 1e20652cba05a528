"""InstructGPT's K-wise ranking loss (docs/ops.md, "Pairwise Bradley-Terry loss").

Ops (``torch.ops.rmkernels.*``):

==========================================  ===============================================
``ranking_loss(...)``                       K-wise ranking loss
``ranking_loss_backward(...)``              grad_rewards [B, K]
``ranking_loss_fwd_kernel`` / ``ranking_loss_bwd_kernel``  the C++ CPU / CUDA kernels
==========================================  ===============================================

The kernels compute the per-row losses (and take per-row gradients); the reduction over rows
is PyTorch around them.
"""
import torch
import torch.nn.functional as F

from rmkernels import _backend, _checks
from rmkernels._codes import REDUCTIONS
from rmkernels._library import acc_dtype, as_dtype
from rmkernels._registry import Autograd, Kernel, Op


# ---------------------------------------------------------------------------------------
# Reference implementation (pure PyTorch, the ground truth)
# ---------------------------------------------------------------------------------------
def _candidates(num_candidates, B, K, device):
    if num_candidates is None:
        return torch.full((B,), K, dtype=torch.int64, device=device)
    return num_candidates.long().clamp(0, K)


def _reference_ranking_fwd(rewards, num_candidates):
    """Row loss: mean over pairs i < j < n_b of -logsigmoid(r_i - r_j); 0 when n_b < 2."""
    B, K = rewards.shape
    r = rewards.to(acc_dtype(rewards.dtype))
    n = _candidates(num_candidates, B, K, r.device)
    pos = torch.arange(K, device=r.device)
    pair = (pos[:, None] < pos[None, :]) & (pos[None, None, :] < n[:, None, None])  # [B, K(i), K(j)]
    nll = -F.logsigmoid(r[:, :, None] - r[:, None, :])
    # the row sums in float64, as every kernel's (each term in the arithmetic dtype)
    total = torch.where(pair, nll, torch.zeros((), dtype=r.dtype, device=r.device)).sum((1, 2), dtype=torch.float64)
    n_pairs = (n * (n - 1) // 2).to(torch.float64)
    return torch.where(n >= 2, total / n_pairs.clamp(min=1), torch.zeros_like(total)).to(r.dtype)


def _reference_ranking_bwd(grad_rows, rewards, num_candidates):
    B, K = rewards.shape
    r = rewards.to(acc_dtype(rewards.dtype))
    n = _candidates(num_candidates, B, K, r.device)
    pos = torch.arange(K, device=r.device)
    pair = (pos[:, None] < pos[None, :]) & (pos[None, None, :] < n[:, None, None])
    n_pairs = (n * (n - 1) // 2).to(r.dtype).clamp(min=1)
    # rows with no pair get no gradient (also when "mean" over no ranked row divides by 0)
    scale = torch.where(n >= 2, grad_rows.to(r.dtype) / n_pairs, torch.zeros((), dtype=r.dtype, device=r.device))
    # d/dx of -logsigmoid(x) is -sigmoid(-x), with x = r_i - r_j: +1 on r_i, -1 on r_j
    s = torch.where(pair, -torch.sigmoid(r[:, None, :] - r[:, :, None]), torch.zeros((), dtype=r.dtype,
                                                                                        device=r.device))
    # each candidate's float64 sum of its terms, then times the row's scale, as every kernel
    # (so an infinite upstream gradient gives the kernels' +-inf, and inf * 0 = NaN where a
    # candidate's terms sum to 0, e.g. past num_candidates)
    d = (s.sum(2, dtype=torch.float64) - s.sum(1, dtype=torch.float64)).to(r.dtype)
    return (d * scale[:, None]).to(rewards.dtype)


# ---------------------------------------------------------------------------------------
# Kernels and ops
# ---------------------------------------------------------------------------------------
def _grad_fake(grad, rewards, *_):
    return torch.empty_like(rewards, memory_format=torch.contiguous_format)


fwd_kernel = Kernel("ranking_loss_fwd_kernel", reference=_reference_ranking_fwd, triton="bt_loss:ranking_loss_fwd",
                    fake=lambda rewards, nc: rewards.new_empty(rewards.shape[0], dtype=acc_dtype(rewards.dtype)))
bwd_kernel = Kernel("ranking_loss_bwd_kernel", reference=_reference_ranking_bwd, triton="bt_loss:ranking_loss_bwd",
                    fake=_grad_fake)


def _ranked_rows(rewards, num_candidates, dtype):
    """How many rows have at least two candidates (the rows that "mean" averages over), as a
    0-dim ``dtype`` tensor (made in ``dtype``: one fill, no cast, when every row has K)."""
    if num_candidates is None:
        return torch.full((), rewards.shape[0] if rewards.shape[1] >= 2 else 0, dtype=dtype, device=rewards.device)
    return (num_candidates.clamp(max=rewards.shape[1]) >= 2).sum().to(dtype)


def _dense(num_candidates):
    """The kernels read ``num_candidates`` as a contiguous int64 [B] (a direct op call may pass a
    strided or expanded one; the public function passes it contiguous: a no-op)."""
    return None if num_candidates is None else num_candidates.contiguous()


def _forward(rewards, num_candidates, reduction, backend):
    rows = fwd_kernel(backend, rewards, _dense(num_candidates))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / _ranked_rows(rewards, num_candidates, rows.dtype)


def _backward_body(grad, rewards, num_candidates, reduction, backend):
    acc = acc_dtype(rewards.dtype)
    if reduction == "none":
        g_rows = as_dtype(grad, acc).contiguous()
    else:
        g = as_dtype(grad, acc)
        if reduction == "mean":
            g = g / _ranked_rows(rewards, num_candidates, acc)
        g_rows = g.expand(rewards.shape[0]).contiguous()
    return bwd_kernel(backend, g_rows, rewards, _dense(num_candidates))


def check_num_candidates(num_candidates, B, K, device, dtypes=_checks.INDEX_DTYPES):
    """Shape, dtype and (data check) range of ``num_candidates``."""
    _checks.check_tensor("num_candidates", num_candidates, ndims=1, dtypes=dtypes, device=device)
    if num_candidates.shape[0] != B:
        raise ValueError(f"num_candidates must be [B] = [{B}] (from rewards), got shape "
                         f"{tuple(num_candidates.shape)}")
    if _checks.data_checks_enabled(device):
        bad = _checks.true_rows((num_candidates < 0) | (num_candidates > K))
        if bad.numel():
            vals = ", ".join(str(int(num_candidates[i])) for i in bad[:10])
            raise ValueError(f"num_candidates must be in [0, K = {K}]: rows {_checks.rows_str(bad)} have {vals}")


def _check_forward(rewards, num_candidates, reduction, backend):
    _checks.check_tensor("rewards", rewards, ndims=2, dtypes=_checks.FLOAT_DTYPES)
    if num_candidates is not None:  # the kernels read int64
        check_num_candidates(num_candidates, rewards.shape[0], rewards.shape[1], rewards.device, (torch.int64,))
    _checks.check_choice("reduction", reduction, tuple(REDUCTIONS))


def _check_backward(grad, rewards, num_candidates, reduction, backend):
    _check_forward(rewards, num_candidates, reduction, backend)
    _checks.check_tensor("grad", grad, dtypes=_checks.FLOAT_DTYPES, device=rewards.device)
    shape = (rewards.shape[0],) if reduction == "none" else ()
    if tuple(grad.shape) != shape:
        raise ValueError(f"grad must have shape {list(shape)} (the loss'), got {list(grad.shape)}")


def _setup_context(ctx, inputs, output):
    rewards, num_candidates, reduction, backend = inputs
    ctx.save_for_backward(rewards, num_candidates)
    ctx.reduction, ctx.backend = reduction, backend


def _backward(rank_backward, ctx, grad):
    rewards, num_candidates = ctx.saved_tensors
    g = rank_backward(grad, rewards, num_candidates, ctx.reduction, ctx.backend)
    return g, None, None, None


def _fake(rewards, num_candidates, reduction, backend):
    shape = (rewards.shape[0],) if reduction == "none" else ()
    return rewards.new_empty(shape, dtype=acc_dtype(rewards.dtype))


# What the public function calls: the public op, or its body in plain eager mode
_ranking_loss_backward = Op("ranking_loss_backward", body=_backward_body, check=_check_backward, fake=_grad_fake)
_ranking_loss = Op("ranking_loss", body=_forward, fake=_fake, check=_check_forward,
                   autograd=Autograd("ranking_loss_backward", _setup_context, _backward))


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
def ranking_loss(rewards, *, num_candidates=None, reduction="mean", backend=None):
    """InstructGPT's K-wise ranking loss: all pairs of K ranked responses in one op.

    Args:
        rewards: ``[B, K]`` (any float dtype, any strides), column 0 the best response and
            column K-1 the worst.
        num_candidates: None (every row has K), or an int ``[B]`` tensor: row b ranks only its
            first ``num_candidates[b]`` columns (ragged K; the other columns are ignored and get
            zero gradient). Values must be in ``[0, K]`` (checked for CPU tensors; clamped on a
            GPU).
        reduction: ``"mean"`` over the rows with at least two candidates, ``"sum"``, ``"none"``
            (``[B]``).

    The loss of a row is the mean of ``-logsigmoid(r_i - r_j)`` over all pairs ``i < j <
    num_candidates[b]``. A row with fewer than two candidates has no pair: its loss is 0 and it
    is left out of the ``"mean"`` over rows (so such padding rows do not dilute the loss); a
    batch with no such row (or B = 0) gives NaN for "mean", as an empty ``torch.mean``. With
    K = 2 this equals ``bradley_terry_loss(rewards[:, 0], rewards[:, 1])``. The kernels sum a
    row's pair terms in float64 (each term in float32, or float64 for float64 inputs), so large K
    keeps float32 precision.
    """
    _checks.check_tensor("rewards", rewards, ndims=2, dtypes=_checks.FLOAT_DTYPES)
    B, K = rewards.shape
    if num_candidates is not None:
        check_num_candidates(num_candidates, B, K, rewards.device)
        num_candidates = as_dtype(num_candidates, torch.int64).contiguous()  # the kernels read int64
    _checks.check_choice("reduction", reduction, tuple(REDUCTIONS))
    be = _backend.resolve(backend, rewards.device)
    return _ranking_loss(rewards, num_candidates, reduction, be)
