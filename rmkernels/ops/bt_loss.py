"""Pairwise Bradley-Terry reward loss, the fused reward-model head, K-wise ranking loss
(SPEC section 2).

With ``d_i = chosen_i - rejected_i - margin_i`` and ``e = label_smoothing``::

    l_i = -(1 - e) * logsigmoid(d_i) - e * logsigmoid(-d_i) + center_coef * (chosen_i + rejected_i)^2

``"mean"`` = ``sum(w_i l_i) / sum(w_i)``, ``"sum"`` = ``sum(w_i l_i)``, ``"none"`` = ``w_i l_i``
(``[B]``; with ``weights=None`` that is ``l_i``).

Ops (``torch.ops.rmkernels.*``):

==========================================  ===============================================
``bradley_terry_loss(...)``                 the loss (scalar, or [B] for "none")
``bradley_terry_loss_backward(...)``        (grad_chosen, grad_rejected)
``pairwise_reward_loss(...)``               (loss, rewards [2B]): pooling + head + loss
``pairwise_reward_loss_backward(...)``      (grad_hidden, grad_weight, grad_bias)
``ranking_loss(...)``                       K-wise ranking loss
``ranking_loss_backward(...)``              grad_rewards [B, K]
``bt_loss_fwd_kernel`` / ``bt_loss_bwd_kernel`` / ``ranking_loss_fwd_kernel`` /
``ranking_loss_bwd_kernel``                 the C++ CPU / CUDA kernels behind cpu/cuda
==========================================  ===============================================

Kernel-level conventions: ``chosen``/``rejected`` are 1-D ``[B]`` tensors of one floating dtype
and any stride; ``margin``/``weights`` are None or contiguous ``[B]`` tensors in the arithmetic
dtype (float32, float64 for float64 inputs); when None, the scalars ``margin_value`` /
``weight_value`` stand for every pair. ``reduction`` is an int code there (``REDUCTIONS``).
"""
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rmkernels import _backend, _checks
from rmkernels._library import acc_dtype, define_kernel_op, eager_fast_path
from rmkernels.ops import pooling as _pool

# Integer codes of the reductions, as the kernels see them.
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

# ---------------------------------------------------------------------------------------
# Kernel ops (C++ CPU / CUDA implementations in csrc/)
# ---------------------------------------------------------------------------------------
_BT_ARGS = ("Tensor chosen, Tensor rejected, Tensor? margin, Tensor? weights, float margin_value, "
            "float weight_value, float label_smoothing, float center_coef, int reduction")
_bt_fwd_kernel = define_kernel_op(f"bt_loss_fwd_kernel({_BT_ARGS}) -> Tensor")
_bt_bwd_kernel = define_kernel_op(
    f"bt_loss_bwd_kernel(Tensor grad, {_BT_ARGS}, bool need_chosen, bool need_rejected) -> (Tensor, Tensor)")
_rank_fwd_kernel = define_kernel_op("ranking_loss_fwd_kernel(Tensor rewards, Tensor? num_candidates) -> Tensor")
_rank_bwd_kernel = define_kernel_op(
    "ranking_loss_bwd_kernel(Tensor grad_rows, Tensor rewards, Tensor? num_candidates) -> Tensor")


def _loss_shape(chosen, reduction_code):
    return (chosen.shape[0],) if reduction_code == REDUCTIONS["none"] else ()


@torch.library.register_fake("rmkernels::bt_loss_fwd_kernel")
def _bt_fwd_kernel_fake(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                        center_coef, reduction):
    return chosen.new_empty(_loss_shape(chosen, reduction), dtype=acc_dtype(chosen.dtype))


def _bt_bwd_fake_impl(chosen, need_chosen, need_rejected):
    B = chosen.shape[0]
    return (chosen.new_empty(B if need_chosen else 0, dtype=chosen.dtype),
            chosen.new_empty(B if need_rejected else 0, dtype=chosen.dtype))


@torch.library.register_fake("rmkernels::bt_loss_bwd_kernel")
def _bt_bwd_kernel_fake(grad, chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                        center_coef, reduction, need_chosen, need_rejected):
    return _bt_bwd_fake_impl(chosen, need_chosen, need_rejected)


@torch.library.register_fake("rmkernels::ranking_loss_fwd_kernel")
def _rank_fwd_kernel_fake(rewards, num_candidates):
    return rewards.new_empty(rewards.shape[0], dtype=acc_dtype(rewards.dtype))


@torch.library.register_fake("rmkernels::ranking_loss_bwd_kernel")
def _rank_bwd_kernel_fake(grad_rows, rewards, num_candidates):
    return torch.empty_like(rewards, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------
# Reference implementation (pure PyTorch, the ground truth)
# ---------------------------------------------------------------------------------------
def _per_pair(t, value, like):
    return t.to(like.dtype) if t is not None else torch.full_like(like, value)


def _reference_bt_fwd(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                      center_coef, reduction):
    acc = acc_dtype(chosen.dtype)
    c, r = chosen.to(acc), rejected.to(acc)
    m, w = _per_pair(margin, margin_value, c), _per_pair(weights, weight_value, c)
    d = c - r - m
    e = label_smoothing
    loss = -(1 - e) * F.logsigmoid(d)
    if e != 0:  # never 0 * logsigmoid(-inf) = NaN: bradley_terry_loss(inf, 0) is the formula's 0
        loss = loss - e * F.logsigmoid(-d)
    if center_coef != 0:  # (c + r)^2 may be inf where |c| is huge: never multiply it by 0
        loss = loss + center_coef * (c + r) ** 2
    if reduction == REDUCTIONS["none"]:
        return w * loss
    if reduction == REDUCTIONS["sum"]:
        return (w * loss).sum()
    return (w * loss).sum() / w.sum()


def _reference_bt_bwd(grad, chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                      center_coef, reduction, need_chosen, need_rejected):
    acc = acc_dtype(chosen.dtype)
    c, r = chosen.to(acc), rejected.to(acc)
    m, w = _per_pair(margin, margin_value, c), _per_pair(weights, weight_value, c)
    d = c - r - m
    e = label_smoothing
    dl_dd = -(1 - e) * torch.sigmoid(-d) + e * torch.sigmoid(d)  # d/dd logsigmoid(d) = sigmoid(-d)
    center = 2 * center_coef * (c + r) if center_coef != 0 else torch.zeros_like(c)
    g = grad.to(acc) * w
    if reduction == REDUCTIONS["mean"]:
        g = g / w.sum()
    g_c, g_r = _bt_bwd_fake_impl(chosen, False, False)
    if need_chosen:
        g_c = (g * (dl_dd + center)).to(chosen.dtype)
    if need_rejected:
        g_r = (g * (-dl_dd + center)).to(chosen.dtype)
    return g_c, g_r


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
    total = torch.where(pair, nll, torch.zeros((), dtype=r.dtype, device=r.device)).sum((1, 2))
    n_pairs = (n * (n - 1) // 2).to(r.dtype)
    return torch.where(n >= 2, total / n_pairs.clamp(min=1), torch.zeros_like(total))


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
    s = s * scale[:, None, None]
    return (s.sum(2) - s.sum(1)).to(rewards.dtype)


# ---------------------------------------------------------------------------------------
# Public ops: route to the backend
# ---------------------------------------------------------------------------------------
def _triton():
    from rmkernels.triton import bt_loss

    return bt_loss


def _bt_forward(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
                reduction, backend):
    args = (chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
            REDUCTIONS[reduction])
    if backend == "reference":
        return _reference_bt_fwd(*args)
    if backend == "triton":
        return _triton().bt_loss_fwd(*args)
    return _bt_fwd_kernel(*args)


def _bt_backward(grad, chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                 center_coef, reduction, need_chosen, need_rejected, backend):
    g = grad.to(acc_dtype(chosen.dtype)).contiguous()
    args = (g, chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
            REDUCTIONS[reduction], need_chosen, need_rejected)
    if backend == "reference":
        return _reference_bt_bwd(*args)
    if backend == "triton":
        return _triton().bt_loss_bwd(*args)
    return _bt_bwd_kernel(*args)


@torch.library.custom_op("rmkernels::bradley_terry_loss", mutates_args=())
def bradley_terry_loss_op(chosen: Tensor, rejected: Tensor, margin: Optional[Tensor], weights: Optional[Tensor],
                          margin_value: float, weight_value: float, label_smoothing: float, center_coef: float,
                          reduction: str, backend: str) -> Tensor:
    """Bradley-Terry loss of [B] chosen/rejected rewards (one dtype, any stride); a scalar, or
    [B] for ``reduction="none"``, in the arithmetic dtype."""
    return _bt_forward(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                       center_coef, reduction, backend)


@bradley_terry_loss_op.register_fake
def _(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef, reduction,
      backend):
    return chosen.new_empty(_loss_shape(chosen, REDUCTIONS[reduction]), dtype=acc_dtype(chosen.dtype))


@torch.library.custom_op("rmkernels::bradley_terry_loss_backward", mutates_args=())
def bradley_terry_loss_backward_op(grad: Tensor, chosen: Tensor, rejected: Tensor, margin: Optional[Tensor],
                                   weights: Optional[Tensor], margin_value: float, weight_value: float,
                                   label_smoothing: float, center_coef: float, reduction: str,
                                   need_chosen: bool, need_rejected: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """(grad_chosen, grad_rejected), [B] each in the inputs' dtype; one that is not needed
    comes back empty."""
    return _bt_backward(grad, chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                        center_coef, reduction, need_chosen, need_rejected, backend)


@bradley_terry_loss_backward_op.register_fake
def _(grad, chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
      reduction, need_chosen, need_rejected, backend):
    return _bt_bwd_fake_impl(chosen, need_chosen, need_rejected)


def _bt_setup_context(ctx, inputs, output):
    chosen, rejected, margin, weights = inputs[:4]
    ctx.save_for_backward(chosen, rejected, margin, weights)
    ctx.scalars = inputs[4:]  # margin_value, weight_value, label_smoothing, center_coef, reduction, backend


def _bt_autograd_backward(bt_backward, ctx, grad):
    """Autograd backward; ``bt_backward`` is the public backward op, or its body (the eager
    path). So for the other ops' ``*_autograd_backward``."""
    chosen, rejected, margin, weights = ctx.saved_tensors
    need_c, need_r = ctx.needs_input_grad[:2]
    *scalars, backend = ctx.scalars
    g_c, g_r = bt_backward(grad, chosen, rejected, margin, weights, *scalars, need_c, need_r, backend)
    return (g_c if need_c else None, g_r if need_r else None) + (None,) * 8


bradley_terry_loss_op.register_autograd(partial(_bt_autograd_backward, torch.ops.rmkernels.bradley_terry_loss_backward),
                                        setup_context=_bt_setup_context)


def _pairwise_forward(hidden, weight, bias, index, margin, weights, margin_value, weight_value, label_smoothing,
                      center_coef, reduction, backend):
    rewards = _pool._pool_forward(hidden, weight, bias, index, backend).reshape(-1)
    B = rewards.shape[0] // 2
    loss = _bt_forward(rewards[:B], rewards[B:], margin, weights, margin_value, weight_value, label_smoothing,
                       center_coef, reduction, backend)
    return loss, rewards


def _pairwise_backward(grad_loss, grad_rewards, rewards, hidden, weight, index, margin, weights, margin_value,
                       weight_value, label_smoothing, center_coef, reduction, need_hidden, need_weight, need_bias,
                       backend):
    B = rewards.shape[0] // 2
    g_c, g_r = _bt_backward(grad_loss, rewards[:B], rewards[B:], margin, weights, margin_value, weight_value,
                            label_smoothing, center_coef, reduction, True, True, backend)
    g = torch.cat([g_c, g_r])
    if grad_rewards is not None:
        g = g + grad_rewards
    return _pool._pool_backward(g[:, None], hidden, weight, index, need_hidden, need_weight, need_bias, backend)


@torch.library.custom_op("rmkernels::pairwise_reward_loss", mutates_args=())
def pairwise_reward_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], index: Tensor,
                            margin: Optional[Tensor], weights: Optional[Tensor], margin_value: float,
                            weight_value: float, label_smoothing: float, center_coef: float, reduction: str,
                            backend: str) -> Tuple[Tensor, Tensor]:
    """(loss, rewards [2B]): the value head ``weight`` [1, H] on the token ``index[b]`` of each
    of the 2B rows of ``hidden`` (rows 0..B-1 chosen, B..2B-1 rejected), then the
    Bradley-Terry loss of the two halves."""
    return _pairwise_forward(hidden, weight, bias, index, margin, weights, margin_value, weight_value,
                             label_smoothing, center_coef, reduction, backend)


@pairwise_reward_loss_op.register_fake
def _(hidden, weight, bias, index, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
      reduction, backend):
    acc = acc_dtype(hidden.dtype)
    rewards = hidden.new_empty(index.shape[0], dtype=acc)
    return hidden.new_empty(_loss_shape(rewards[: index.shape[0] // 2], REDUCTIONS[reduction]), dtype=acc), rewards


@torch.library.custom_op("rmkernels::pairwise_reward_loss_backward", mutates_args=())
def pairwise_reward_loss_backward_op(grad_loss: Tensor, grad_rewards: Optional[Tensor], rewards: Tensor,
                                     hidden: Tensor, weight: Tensor, index: Tensor, margin: Optional[Tensor],
                                     weights: Optional[Tensor], margin_value: float, weight_value: float,
                                     label_smoothing: float, center_coef: float, reduction: str,
                                     need_hidden: bool, need_weight: bool, need_bias: bool,
                                     backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) of ``pairwise_reward_loss``, from the gradient of
    the loss and (optionally) of the returned rewards. ``rewards`` is the forward's [2B]
    output: the only thing the backward keeps besides the inputs and the index."""
    return _pairwise_backward(grad_loss, grad_rewards, rewards, hidden, weight, index, margin, weights,
                              margin_value, weight_value, label_smoothing, center_coef, reduction, need_hidden,
                              need_weight, need_bias, backend)


@pairwise_reward_loss_backward_op.register_fake
def _(grad_loss, grad_rewards, rewards, hidden, weight, index, margin, weights, margin_value, weight_value,
      label_smoothing, center_coef, reduction, need_hidden, need_weight, need_bias, backend):
    return _pool._bwd_fake_impl(hidden, weight.new_empty(weight.shape, dtype=acc_dtype(hidden.dtype)),
                                need_hidden, need_weight, need_bias)


def _pairwise_setup_context(ctx, inputs, output):
    hidden, weight, bias, index, margin, weights = inputs[:6]
    ctx.save_for_backward(hidden, weight, index, margin, weights, output[1])
    ctx.scalars = inputs[6:]
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _pairwise_autograd_backward(pairwise_backward, ctx, grad_loss, grad_rewards):
    hidden, weight, index, margin, weights, rewards = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    *scalars, backend = ctx.scalars
    if grad_loss is None:
        grad_loss = torch.zeros_like(rewards[: rewards.shape[0] // 2] if scalars[-1] == "none" else rewards[0])
    g_h, g_w, g_b = pairwise_backward(grad_loss, grad_rewards, rewards, hidden, weight, index, margin, weights,
                                      *scalars, need_h, need_w, need_b, backend)
    return (g_h if need_h else None, g_w.to(weight.dtype) if need_w else None,
            g_b.to(ctx.bias_dtype) if need_b else None) + (None,) * 9


pairwise_reward_loss_op.register_autograd(
    partial(_pairwise_autograd_backward, torch.ops.rmkernels.pairwise_reward_loss_backward),
    setup_context=_pairwise_setup_context)


def _rank_forward(rewards, num_candidates, reduction, backend):
    if backend == "reference":
        rows = _reference_ranking_fwd(rewards, num_candidates)
    elif backend == "triton":
        rows = _triton().ranking_loss_fwd(rewards, num_candidates)
    else:
        rows = _rank_fwd_kernel(rewards, num_candidates)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / _ranked_rows(rewards, num_candidates).to(rows.dtype)


def _rank_backward(grad, rewards, num_candidates, reduction, backend):
    acc = acc_dtype(rewards.dtype)
    if reduction == "none":
        g_rows = grad.to(acc).contiguous()
    else:
        g = grad.to(acc)
        if reduction == "mean":
            g = g / _ranked_rows(rewards, num_candidates).to(acc)
        g_rows = g.expand(rewards.shape[0]).contiguous()
    if backend == "reference":
        return _reference_ranking_bwd(g_rows, rewards, num_candidates)
    if backend == "triton":
        return _triton().ranking_loss_bwd(g_rows, rewards, num_candidates)
    return _rank_bwd_kernel(g_rows, rewards, num_candidates)


@torch.library.custom_op("rmkernels::ranking_loss", mutates_args=())
def ranking_loss_op(rewards: Tensor, num_candidates: Optional[Tensor], reduction: str, backend: str) -> Tensor:
    """K-wise ranking loss of ``rewards`` [B, K] (column 0 the best); see ``ranking_loss``."""
    return _rank_forward(rewards, num_candidates, reduction, backend)


def _ranked_rows(rewards, num_candidates):
    """How many rows have at least two candidates (the rows that "mean" averages over)."""
    if num_candidates is None:
        return torch.full((), rewards.shape[0] if rewards.shape[1] >= 2 else 0, device=rewards.device)
    return (num_candidates.clamp(max=rewards.shape[1]) >= 2).sum()


@ranking_loss_op.register_fake
def _(rewards, num_candidates, reduction, backend):
    shape = (rewards.shape[0],) if reduction == "none" else ()
    return rewards.new_empty(shape, dtype=acc_dtype(rewards.dtype))


@torch.library.custom_op("rmkernels::ranking_loss_backward", mutates_args=())
def ranking_loss_backward_op(grad: Tensor, rewards: Tensor, num_candidates: Optional[Tensor], reduction: str,
                             backend: str) -> Tensor:
    """grad_rewards [B, K] (contiguous, rewards' dtype) of ``ranking_loss``."""
    return _rank_backward(grad, rewards, num_candidates, reduction, backend)


@ranking_loss_backward_op.register_fake
def _(grad, rewards, num_candidates, reduction, backend):
    return torch.empty_like(rewards, memory_format=torch.contiguous_format)


def _rank_setup_context(ctx, inputs, output):
    rewards, num_candidates, reduction, backend = inputs
    ctx.save_for_backward(rewards, num_candidates)
    ctx.reduction, ctx.backend = reduction, backend


def _rank_autograd_backward(rank_backward, ctx, grad):
    rewards, num_candidates = ctx.saved_tensors
    g = rank_backward(grad, rewards, num_candidates, ctx.reduction, ctx.backend)
    return g, None, None, None


ranking_loss_op.register_autograd(partial(_rank_autograd_backward, torch.ops.rmkernels.ranking_loss_backward),
                                  setup_context=_rank_setup_context)

# What the public functions call: the public ops, or their bodies in plain eager mode
_bradley_terry_loss = eager_fast_path(torch.ops.rmkernels.bradley_terry_loss, _bt_forward, _bt_setup_context,
                                      partial(_bt_autograd_backward, _bt_backward))
_pairwise_reward_loss = eager_fast_path(
    torch.ops.rmkernels.pairwise_reward_loss, _pairwise_forward, _pairwise_setup_context,
    partial(_pairwise_autograd_backward, _pairwise_backward))
_ranking_loss = eager_fast_path(torch.ops.rmkernels.ranking_loss, _rank_forward, _rank_setup_context,
                                partial(_rank_autograd_backward, _rank_backward))


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def _check_pair_rewards(chosen, rejected):
    """chosen/rejected: [B] or [B, 1] floating tensors of one device and one B. Returns [B]
    views in their common dtype (a [B, 1] input is never broadcast against a [B] one)."""
    _checks.check_tensor("chosen", chosen, ndims=(1, 2), dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor("rejected", rejected, ndims=(1, 2), dtypes=_checks.FLOAT_DTYPES, device=chosen.device)
    for name, t in (("chosen", chosen), ("rejected", rejected)):
        if t.dim() == 2 and t.shape[1] != 1:
            raise ValueError(f"{name} must be [B] or [B, 1] rewards, got shape {tuple(t.shape)} (a [B, K] input "
                             f"would broadcast to a [B, B] loss)")
    if chosen.shape[0] != rejected.shape[0]:
        raise ValueError(f"rejected must have the same batch size B as chosen, got chosen {tuple(chosen.shape)} "
                         f"and rejected {tuple(rejected.shape)}")
    dtype = torch.promote_types(chosen.dtype, rejected.dtype)
    flat = [t.squeeze(1) if t.dim() == 2 else t for t in (chosen, rejected)]  # views both ways
    return [t.to(dtype) for t in flat]


def _per_pair_arg(name, value, B, device, acc, default):
    """A float (or None = `default`) or a [B] floating tensor -> (tensor or None, scalar)."""
    if value is None:
        return None, default
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] != B:  # never broadcast a [B, 1] against [B]
            raise ValueError(f"{name} must be a float or a [B] = [{B}] tensor, got shape {tuple(value.shape)}")
        _checks.check_tensor(name, value, dtypes=_checks.FLOAT_DTYPES, device=device)
        return value.detach().to(acc).contiguous(), default  # data: no gradient flows to it
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(value).__name__}")
    return None, _checks.check_float(name, value, lo=float("-inf"), hi=float("inf"), lo_open=True, hi_open=True)


def _loss_options(margin, weights, label_smoothing, center_coef, reduction, B, device, acc):
    """Checked (margin, weights, margin_value, weight_value, label_smoothing, center_coef, reduction)."""
    e = _checks.check_float("label_smoothing", label_smoothing, lo=0.0, hi=0.5, hi_open=True)
    coef = _checks.check_float("center_coef", 0.0 if center_coef is None else center_coef, lo=0.0, hi=float("inf"),
                               hi_open=True)
    _checks.check_choice("reduction", reduction, tuple(REDUCTIONS))
    m, m_value = _per_pair_arg("margin", margin, B, device, acc, 0.0)
    w, w_value = _per_pair_arg("weights", weights, B, device, acc, 1.0)
    return m, w, m_value, w_value, e, coef, reduction


def bradley_terry_loss(chosen, rejected, *, margin=None, label_smoothing=0.0, center_coef=0.0, weights=None,
                       reduction="mean", backend=None):
    """Pairwise Bradley-Terry reward loss (TRL's RewardTrainer loss), fused forward and backward.

    With ``d = chosen - rejected - margin`` and ``e = label_smoothing``, per pair
    ``l = -(1 - e) * logsigmoid(d) - e * logsigmoid(-d) + center_coef * (chosen + rejected)^2``
    (logsigmoid is stable for any |d|: finite at 1e30).

    Args:
        chosen, rejected: ``[B]`` or ``[B, 1]`` rewards (fp32/bf16/fp16/fp64; different dtypes
            are promoted to a common one). Any other shape is a ``ValueError``: ``[B, 1] - [B]``
            never silently broadcasts to ``[B, B]`` here.
        margin: None, a float, or a ``[B]`` tensor (TRL's ``margin`` column). No gradient.
        label_smoothing: ``e`` in ``[0, 0.5)`` (conservative / cDPO-style smoothing).
        center_coef: TRL's ``center_rewards_coefficient`` (>= 0; None = 0).
        weights: None, a float, or a ``[B]`` tensor of per-pair weights. No gradient.
        reduction: ``"mean"`` = ``sum(w l) / sum(w)``, ``"sum"`` = ``sum(w l)``, ``"none"`` =
            ``w * l`` (``[B]``).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None/``"auto"``.

    Returns the loss, float32 (float64 for float64 inputs): a scalar, or ``[B]`` for "none".
    B = 0 gives 0 for "sum", NaN for "mean" (an empty mean, as ``torch.mean``) and ``[0]``
    for "none". Gradients flow to chosen and rejected, in their dtypes.
    """
    c, r = _check_pair_rewards(chosen, rejected)
    B, device = c.shape[0], c.device
    opts = _loss_options(margin, weights, label_smoothing, center_coef, reduction, B, device, acc_dtype(c.dtype))
    be = _backend.resolve(backend, device)
    return _bradley_terry_loss(c, r, *opts, be)


def pairwise_reward_loss(hidden_states, weight, bias=None, *, attention_mask=None, lengths=None, cu_seqlens=None,
                         margin=None, label_smoothing=0.0, center_coef=0.0, weights=None, reduction="mean",
                         backend=None):
    """The whole reward-model head in one op: last-token pooling + value head + Bradley-Terry loss.

    Rows ``0..B-1`` of the batch are the chosen responses and rows ``B..2B-1`` the rejected
    ones (TRL's collator layout). ``hidden_states`` is ``[2B, T, H]`` with ``attention_mask``
    ``[2B, T]`` or ``lengths`` ``[2B]``, or packed ``[N, H]`` with ``cu_seqlens`` ``[2B + 1]``
    (see ``last_token_reward``). ``weight`` is ``[1, H]`` (one reward per sequence), ``bias``
    ``[1]`` or None. The loss options are those of ``bradley_terry_loss``.

    Returns ``(loss, chosen_rewards [B], rejected_rewards [B])``, float32 (float64 for float64
    hidden states). The rewards are for accuracy logging and are differentiable too.
    The backward writes grad_hidden (zero but at the 2B picked tokens), grad_weight and
    grad_bias directly: neither a [2B, T] score tensor nor any [2B, H] tensor is kept, only
    the inputs, the [2B] token index and the [2B] rewards.
    """
    hidden_states = _pool.check_head(hidden_states, weight, bias)
    if weight.shape[0] != 1:
        raise ValueError(f"weight must be [1, H] (one reward per sequence) for the pairwise loss, "
                         f"got {tuple(weight.shape)}")
    if hidden_states.dim() == 3:
        n_rows = hidden_states.shape[0]
        what = f"hidden_states has {n_rows} rows"
    else:
        _checks.check_tensor("cu_seqlens", cu_seqlens, ndims=1, dtypes=_checks.INDEX_DTYPES,
                             device=hidden_states.device)
        n_rows = max(cu_seqlens.shape[0] - 1, 0)
        what = f"cu_seqlens has {cu_seqlens.shape[0]} entries = {n_rows} sequences + 1"
    if n_rows % 2:
        raise ValueError(f"hidden_states must hold 2B sequences (B chosen, then B rejected); {what}, an odd number")
    B, device = n_rows // 2, hidden_states.device
    opts = _loss_options(margin, weights, label_smoothing, center_coef, reduction, B, device,
                         acc_dtype(hidden_states.dtype))
    be = _backend.resolve(backend, device)
    index = _pool.resolve_index(hidden_states, attention_mask=attention_mask, lengths=lengths, cu_seqlens=cu_seqlens,
                                backend=be)
    loss, rewards = _pairwise_reward_loss(hidden_states, weight, bias, index, *opts, be)
    return loss, rewards[:B], rewards[B:]


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
    K = 2 this equals ``bradley_terry_loss(rewards[:, 0], rewards[:, 1])``.
    """
    _checks.check_tensor("rewards", rewards, ndims=2, dtypes=_checks.FLOAT_DTYPES)
    B, K = rewards.shape
    if num_candidates is not None:
        _checks.check_tensor("num_candidates", num_candidates, ndims=1, dtypes=_checks.INDEX_DTYPES,
                             device=rewards.device)
        if num_candidates.shape[0] != B:
            raise ValueError(f"num_candidates must be [B] = [{B}] (from rewards), got shape "
                             f"{tuple(num_candidates.shape)}")
        if _checks.data_checks_enabled(rewards.device):
            bad = torch.nonzero((num_candidates < 0) | (num_candidates > K)).flatten()
            if bad.numel():
                vals = ", ".join(str(int(num_candidates[i])) for i in bad[:10])
                raise ValueError(f"num_candidates must be in [0, K = {K}]: rows {_checks.rows_str(bad)} have {vals}")
        num_candidates = num_candidates.to(torch.int64).contiguous()  # the kernels read int64
    _checks.check_choice("reduction", reduction, tuple(REDUCTIONS))
    be = _backend.resolve(backend, rewards.device)
    return _ranking_loss(rewards, num_candidates, reduction, be)
