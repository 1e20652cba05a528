"""The fused reward-model head: last-token pooling + value head + Bradley-Terry loss
(docs/ops.md, "Pairwise Bradley-Terry loss").

Ops (``torch.ops.rmkernels.*``):

==========================================  ===============================================
``pairwise_reward_loss(...)``               (loss, rewards [2B]): pooling + head + loss
``pairwise_reward_loss_backward(...)``      (grad_hidden, grad_weight, grad_bias)
==========================================  ===============================================

Both are composed of the routing of the pooling ops (``pooling.pool_forward`` /
``pool_backward``) and of the Bradley-Terry ops (``bt_loss.bt_forward`` / ``bt_backward``):
no kernel of their own.
"""
import torch

from rmkernels import _backend, _checks
from rmkernels._codes import REDUCTIONS
from rmkernels._library import acc_dtype, as_dtype
from rmkernels._registry import Autograd, Op
from rmkernels.ops import pooling
from rmkernels.ops.bt_loss import bt_backward, bt_forward, check_loss_args, check_loss_scalars, loss_options, loss_shape


def _forward(hidden, weight, bias, index, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
             reduction, backend):
    rewards = pooling.pool_forward(hidden, weight, bias, index, backend).reshape(-1)
    B = rewards.shape[0] // 2
    loss = bt_forward(rewards[:B], rewards[B:], margin, weights, margin_value, weight_value, label_smoothing,
                      center_coef, reduction, backend)
    return loss, rewards


def _backward_body(grad_loss, grad_rewards, rewards, hidden, weight, index, margin, weights, margin_value,
                   weight_value, label_smoothing, center_coef, reduction, need_hidden, need_weight, need_bias,
                   backend):
    B = rewards.shape[0] // 2
    g_c, g_r = bt_backward(grad_loss, rewards[:B], rewards[B:], margin, weights, margin_value, weight_value,
                           label_smoothing, center_coef, reduction, True, True, backend)
    g = torch.cat([g_c, g_r])
    if grad_rewards is not None:
        g = g + grad_rewards
    return pooling.pool_backward(g[:, None], hidden, weight, index, need_hidden, need_weight, need_bias, backend)


def _check_pairs(hidden, weight, bias, index, margin, weights, reduction):
    pooling.check_pool_args(hidden, weight, bias, index)
    if weight.shape[0] != 1:
        raise ValueError(f"weight must be [1, H] (one reward per sequence), got {tuple(weight.shape)}")
    if index.shape[0] % 2:
        raise ValueError(f"index must hold 2B rows (B chosen, then B rejected), got {index.shape[0]}")
    check_loss_args(index.shape[0] // 2, hidden.device, acc_dtype(hidden.dtype), margin, weights, reduction)


def _check_forward(hidden, weight, bias, index, margin, weights, margin_value, weight_value, label_smoothing,
                   center_coef, reduction, backend):
    _check_pairs(hidden, weight, bias, index, margin, weights, reduction)
    check_loss_scalars(margin_value, weight_value, label_smoothing, center_coef)


def _check_backward(grad_loss, grad_rewards, rewards, hidden, weight, index, margin, weights, margin_value,
                    weight_value, label_smoothing, center_coef, reduction, need_hidden, need_weight, need_bias,
                    backend):
    _check_pairs(hidden, weight, None, index, margin, weights, reduction)
    check_loss_scalars(margin_value, weight_value, label_smoothing, center_coef)
    acc = acc_dtype(hidden.dtype)
    n = index.shape[0]
    _checks.check_tensor("rewards", rewards, ndims=1, dtypes=(acc,), device=hidden.device)
    if rewards.shape[0] != n:
        raise ValueError(f"rewards must have shape [2B] = [{n}], got {tuple(rewards.shape)}")
    shape = loss_shape(rewards[: n // 2], REDUCTIONS[reduction])
    _checks.check_tensor("grad_loss", grad_loss, dtypes=_checks.FLOAT_DTYPES, device=hidden.device)
    if tuple(grad_loss.shape) != shape:
        raise ValueError(f"grad_loss must have shape {list(shape)} (the loss'), got {list(grad_loss.shape)}")
    _checks.check_tensor("grad_rewards", grad_rewards, ndims=1, dtypes=_checks.FLOAT_DTYPES, device=hidden.device,
                         allow_none=True)
    if grad_rewards is not None and grad_rewards.shape[0] != n:
        raise ValueError(f"grad_rewards must have shape [2B] = [{n}], got {tuple(grad_rewards.shape)}")


def _fake(hidden, weight, bias, index, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
          reduction, backend):
    acc = acc_dtype(hidden.dtype)
    rewards = hidden.new_empty(index.shape[0], dtype=acc)
    return hidden.new_empty(loss_shape(rewards[: index.shape[0] // 2], REDUCTIONS[reduction]), dtype=acc), rewards


def _backward_fake(grad_loss, grad_rewards, rewards, hidden, weight, index, margin, weights, margin_value,
                   weight_value, label_smoothing, center_coef, reduction, need_hidden, need_weight, need_bias,
                   backend):
    return pooling.grads_fake(hidden, weight.new_empty(weight.shape, dtype=acc_dtype(hidden.dtype)), need_hidden,
                              need_weight, need_bias)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, index, margin, weights = inputs[:6]
    ctx.save_for_backward(hidden, weight, index, margin, weights, output[1])
    ctx.scalars = inputs[6:]
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(pairwise_backward, ctx, grad_loss, grad_rewards):
    hidden, weight, index, margin, weights, rewards = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    *scalars, backend = ctx.scalars
    if grad_loss is None:
        grad_loss = torch.zeros_like(rewards[: rewards.shape[0] // 2] if scalars[-1] == "none" else rewards[0])
    g_h, g_w, g_b = pairwise_backward(grad_loss, grad_rewards, rewards, hidden, weight, index, margin, weights,
                                      *scalars, need_h, need_w, need_b, backend)
    return (g_h if need_h else None, as_dtype(g_w, weight.dtype) if need_w else None,
            as_dtype(g_b, ctx.bias_dtype) if need_b else None) + (None,) * 9


# What the public function calls: the public op, or its body in plain eager mode
_pairwise_reward_loss_backward = Op("pairwise_reward_loss_backward", body=_backward_body, fake=_backward_fake,
                                    check=_check_backward)
_pairwise_reward_loss = Op("pairwise_reward_loss", body=_forward, fake=_fake, check=_check_forward,
                           autograd=Autograd("pairwise_reward_loss_backward", _setup_context, _backward))


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
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
    hidden_states = pooling.check_head(hidden_states, weight, bias)
    if weight.shape[0] != 1:
        raise ValueError(f"weight must be [1, H] (one reward per sequence) for the pairwise loss, "
                         f"got {tuple(weight.shape)}")
    if hidden_states.dim() == 3:
        n_rows = hidden_states.shape[0]
    else:
        _checks.check_tensor("cu_seqlens", cu_seqlens, ndims=1, dtypes=_checks.INDEX_DTYPES,
                             device=hidden_states.device)
        n_rows = max(cu_seqlens.shape[0] - 1, 0)
    if n_rows % 2:  # (the message is formatted here only: formatting a size under torch.compile
        # guards it to its value, a recompilation per batch size)
        what = (f"hidden_states has {n_rows} rows" if hidden_states.dim() == 3 else
                f"cu_seqlens has {cu_seqlens.shape[0]} entries = {n_rows} sequences + 1")
        raise ValueError(f"hidden_states must hold 2B sequences (B chosen, then B rejected); {what}, an odd number")
    B, device = n_rows // 2, hidden_states.device
    opts = loss_options(margin, weights, label_smoothing, center_coef, reduction, B, device,
                         acc_dtype(hidden_states.dtype))
    be = _backend.resolve(backend, device)
    index = pooling.resolve_index(hidden_states, attention_mask=attention_mask, lengths=lengths, cu_seqlens=cu_seqlens,
                                backend=be)
    loss, rewards = _pairwise_reward_loss(hidden_states, weight, bias, index, *opts, be)
    return loss, rewards[:B], rewards[B:]
