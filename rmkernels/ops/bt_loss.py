"""Pairwise Bradley-Terry reward loss (docs/ops.md, "Pairwise Bradley-Terry loss").

With ``d_i = chosen_i - rejected_i - margin_i`` and ``e = label_smoothing``::

    l_i = -(1 - e) * logsigmoid(d_i) - e * logsigmoid(-d_i) + center_coef * (chosen_i + rejected_i)^2

``"mean"`` = ``sum(w_i l_i) / sum(w_i)``, ``"sum"`` = ``sum(w_i l_i)``, ``"none"`` = ``w_i l_i``
(``[B]``; with ``weights=None`` that is ``l_i``).

Ops (``torch.ops.rmkernels.*``):

==========================================  ===============================================
``bradley_terry_loss(...)``                 the loss (scalar, or [B] for "none")
``bradley_terry_loss_backward(...)``        (grad_chosen, grad_rejected)
``bt_loss_fwd_kernel`` / ``bt_loss_bwd_kernel``  the C++ CPU / CUDA kernels behind cpu/cuda
==========================================  ===============================================

Kernel-level conventions: ``chosen``/``rejected`` are 1-D ``[B]`` tensors of one floating dtype
and any stride; ``margin``/``weights`` are None or contiguous ``[B]`` tensors in the arithmetic
dtype (float32, float64 for float64 inputs); when None, the scalars ``margin_value`` /
``weight_value`` stand for every pair. ``reduction`` is a ``Reduction`` code there
(``rmkernels/_codes.py``).
"""
import torch
import torch.nn.functional as F

from rmkernels import _backend, _checks
from rmkernels._codes import REDUCTIONS, Reduction
from rmkernels._library import acc_dtype, acc_scalar, as_dtype, detached
from rmkernels._registry import Autograd, Kernel, Op


# ---------------------------------------------------------------------------------------
# Reference implementation (pure PyTorch, the ground truth)
# ---------------------------------------------------------------------------------------
def loss_shape(chosen, reduction_code):
    """The loss' shape: [B] for "none", a scalar otherwise."""
    return (chosen.shape[0],) if reduction_code == Reduction.NONE else ()


def grads_fake(chosen, need_chosen, need_rejected):
    """(grad_chosen, grad_rejected) of the backward, each empty when not needed."""
    B = chosen.shape[0]
    return (chosen.new_empty(B if need_chosen else 0, dtype=chosen.dtype),
            chosen.new_empty(B if need_rejected else 0, dtype=chosen.dtype))


def _per_pair(t, value, like):
    return t.to(like.dtype) if t is not None else torch.full_like(like, acc_scalar(value, like.dtype))


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
    if reduction == Reduction.NONE:
        return w * loss
    if reduction == Reduction.SUM:
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
    if reduction == Reduction.MEAN:
        g = g / w.sum()
    g_c, g_r = grads_fake(chosen, False, False)
    if need_chosen:
        g_c = (g * (dl_dd + center)).to(chosen.dtype)
    if need_rejected:
        g_r = (g * (-dl_dd + center)).to(chosen.dtype)
    return g_c, g_r


# ---------------------------------------------------------------------------------------
# Kernels and ops
# ---------------------------------------------------------------------------------------
def _fwd_fake(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
              reduction):
    return chosen.new_empty(loss_shape(chosen, reduction), dtype=acc_dtype(chosen.dtype))


fwd_kernel = Kernel("bt_loss_fwd_kernel", reference=_reference_bt_fwd, triton="bt_loss:bt_loss_fwd", fake=_fwd_fake)
bwd_kernel = Kernel("bt_loss_bwd_kernel", reference=_reference_bt_bwd, triton="bt_loss:bt_loss_bwd",
                    fake=lambda grad, chosen, *args: grads_fake(chosen, *args[-2:]))


def _contiguous(t):
    return None if t is None else t.contiguous()  # per-pair tensors: the kernels read them densely


def _prepare_forward(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
                     reduction):
    return (chosen, rejected, _contiguous(margin), _contiguous(weights), margin_value, weight_value, label_smoothing,
            center_coef, int(REDUCTIONS[reduction]))


def _prepare_backward(grad, chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                      center_coef, reduction, need_chosen, need_rejected):
    return (as_dtype(grad, acc_dtype(chosen.dtype)).contiguous(), chosen, rejected, _contiguous(margin),
            _contiguous(weights), margin_value, weight_value, label_smoothing, center_coef, int(REDUCTIONS[reduction]),
            need_chosen, need_rejected)


_FINITE = dict(lo=float("-inf"), hi=float("inf"), lo_open=True, hi_open=True)


def check_loss_scalars(margin_value, weight_value, label_smoothing, center_coef):
    """The scalar options of a BT loss, checked by the public functions (``loss_options``) and
    by the ops' check hooks and the Triton host functions alike: a finite margin and weight,
    ``label_smoothing`` in [0, 0.5), ``center_coef`` >= 0 (None: 0). Returns them as floats.
    The messages name the ops' arguments (``margin_value``, ``weight_value``), as the C++
    kernels' checks do; the public functions name ``margin`` / ``weights`` in their own check
    (``_per_pair_arg``) before this one runs."""
    return (_checks.check_float("margin_value", margin_value, **_FINITE),
            _checks.check_float("weight_value", weight_value, **_FINITE),
            _checks.check_float("label_smoothing", label_smoothing, lo=0.0, hi=0.5, hi_open=True),
            _checks.check_nonneg("center_coef", 0.0 if center_coef is None else center_coef))


def check_loss_args(B, device, acc, margin, weights, reduction):
    """The direct-call checks of the per-pair tensors and the reduction of a BT op."""
    for name, t in (("margin", margin), ("weights", weights)):
        _checks.check_tensor(name, t, ndims=1, dtypes=(acc,), device=device, allow_none=True)
        if t is not None and t.shape[0] != B:
            raise ValueError(f"{name} must have shape [B] = [{B}], got {tuple(t.shape)}")
    _checks.check_choice("reduction", reduction, tuple(REDUCTIONS))


def _check_forward(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
                   reduction, backend):
    _checks.check_tensor("chosen", chosen, ndims=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor("rejected", rejected, ndims=1, dtypes=(chosen.dtype,), device=chosen.device)
    if rejected.shape != chosen.shape:
        raise ValueError(f"rejected must have the shape of chosen {tuple(chosen.shape)}, got {tuple(rejected.shape)}")
    check_loss_args(chosen.shape[0], chosen.device, acc_dtype(chosen.dtype), margin, weights, reduction)
    check_loss_scalars(margin_value, weight_value, label_smoothing, center_coef)


def _check_backward(grad, chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                    center_coef, reduction, need_chosen, need_rejected, backend):
    _check_forward(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
                   reduction, backend)
    _checks.check_tensor("grad", grad, dtypes=_checks.FLOAT_DTYPES, device=chosen.device)
    shape = loss_shape(chosen, REDUCTIONS[reduction])
    if tuple(grad.shape) != shape:
        raise ValueError(f"grad must have shape {list(shape)} (the loss'), got {list(grad.shape)}")


def _setup_context(ctx, inputs, output):
    chosen, rejected, margin, weights = inputs[:4]
    ctx.save_for_backward(chosen, rejected, margin, weights)
    ctx.scalars = inputs[4:]  # margin_value, weight_value, label_smoothing, center_coef, reduction, backend


def _backward(bt_backward, ctx, grad):
    """Autograd backward; ``bt_backward`` is the public backward op, or its body (the eager
    path). So for the other ops' autograd backwards."""
    chosen, rejected, margin, weights = ctx.saved_tensors
    need_c, need_r = ctx.needs_input_grad[:2]
    *scalars, backend = ctx.scalars
    g_c, g_r = bt_backward(grad, chosen, rejected, margin, weights, *scalars, need_c, need_r, backend)
    return (g_c if need_c else None, g_r if need_r else None) + (None,) * 8


# What the public functions call: the public ops, or their bodies in plain eager mode
_bradley_terry_loss_backward = Op(
    "bradley_terry_loss_backward", kernel=bwd_kernel, prepare=_prepare_backward, check=_check_backward,
    fake=lambda grad, chosen, *args: grads_fake(chosen, *args[-3:-1]))
_bradley_terry_loss = Op(
    "bradley_terry_loss", kernel=fwd_kernel, prepare=_prepare_forward, check=_check_forward,
    fake=lambda chosen, *args: chosen.new_empty(loss_shape(chosen, REDUCTIONS[args[-2]]),
                                                dtype=acc_dtype(chosen.dtype)),
    autograd=Autograd("bradley_terry_loss_backward", _setup_context, _backward))


def bt_forward(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
               reduction, backend):
    """The routing of ``bradley_terry_loss`` (for ops composed of it)."""
    return _bradley_terry_loss.body(chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing,
                                    center_coef, reduction, backend)


def bt_backward(grad, chosen, rejected, margin, weights, margin_value, weight_value, label_smoothing, center_coef,
                reduction, need_chosen, need_rejected, backend):
    """The routing of ``bradley_terry_loss_backward`` (for ops composed of it)."""
    return _bradley_terry_loss_backward.body(grad, chosen, rejected, margin, weights, margin_value, weight_value,
                                             label_smoothing, center_coef, reduction, need_chosen, need_rejected,
                                             backend)


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
    dtype = chosen.dtype if chosen.dtype == rejected.dtype else torch.promote_types(chosen.dtype, rejected.dtype)
    flat = [t.squeeze(1) if t.dim() == 2 else t for t in (chosen, rejected)]  # views both ways
    return [as_dtype(t, dtype) for t in flat]


def _per_pair_arg(name, value, B, device, acc, default):
    """A float (or None = `default`) or a [B] floating tensor -> (tensor or None, scalar)."""
    if value is None:
        return None, default
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] != B:  # never broadcast a [B, 1] against [B]
            raise ValueError(f"{name} must be a float or a [B] = [{B}] tensor, got shape {tuple(value.shape)}")
        _checks.check_tensor(name, value, dtypes=_checks.FLOAT_DTYPES, device=device)
        return as_dtype(detached(value), acc).contiguous(), default  # data: no gradient flows to it
    if not _checks.is_real(value):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(value).__name__}")
    return None, _checks.check_float(name, value, **_FINITE)


def loss_options(margin, weights, label_smoothing, center_coef, reduction, B, device, acc):
    """Checked (margin, weights, margin_value, weight_value, label_smoothing, center_coef, reduction)."""
    m, m_value = _per_pair_arg("margin", margin, B, device, acc, 0.0)
    w, w_value = _per_pair_arg("weights", weights, B, device, acc, 1.0)
    m_value, w_value, e, coef = check_loss_scalars(m_value, w_value, label_smoothing, center_coef)
    _checks.check_choice("reduction", reduction, tuple(REDUCTIONS))
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
    opts = loss_options(margin, weights, label_smoothing, center_coef, reduction, B, device, acc_dtype(c.dtype))
    be = _backend.resolve(backend, device)
    return _bradley_terry_loss(c, r, *opts, be)
