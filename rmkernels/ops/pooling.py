"""Last-token value-head pooling (docs/ops.md, "Last-token value-head pooling").

``rmk.last_token_reward`` applies a linear value head to the last valid token of each
sequence: B rows, never all B*T tokens (which is what HF ``*ForSequenceClassification``
does before gathering). ``rmk.last_token_index`` gives the index of that token.

Ops (``torch.ops.rmkernels.*``):

=================================  ======================================================
``last_token_index(mask, backend)``  rightmost non-zero of each mask row, -1 if none
``last_token_reward(hidden, weight, bias, index, backend)``  rewards [B, K]
``last_token_reward_backward(...)``  (grad_hidden, grad_weight, grad_bias)
``lengths_index(lengths, n_tokens)``  ``length - 1`` of each row, checked
``cu_seqlens_index(cu_seqlens, n)``   ``cu_seqlens[b + 1] - 1`` of each row, checked
``check_mask_index(index, T, name)``  the index of a mask, checked (rows with no token)
``*_kernel``                         the C++ CPU / CUDA kernels behind ``cpu``/``cuda``
=================================  ======================================================

The ``*_index`` ops hold the data checks (rows with no valid token, out-of-range lengths,
malformed ``cu_seqlens``): they run inside the op, so in every mode (eager,
``torch.compile``, export) for CPU tensors, and for GPU tensors with ``rmk.checks(True)``.
"""

import torch
from torch import Tensor

from rmkernels import _backend, _checks
from rmkernels._layout import grad_buffer
from rmkernels._library import acc_dtype, as_dtype
from rmkernels._registry import Autograd, Kernel, Op


# ---------------------------------------------------------------------------------------
# Reference implementation (pure PyTorch, the ground truth)
# ---------------------------------------------------------------------------------------
def _valid_rows(hidden, index):
    n_tokens = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
    valid = (index >= 0) & (index < n_tokens)
    return valid, index.clamp(0, max(n_tokens - 1, 0))


def _gather_rows(hidden, index):
    """hidden[b, index[b]] (or hidden[index[b]] for packed input) as [B, H]; rows with no
    valid token are zero (and never read out of bounds)."""
    valid, safe = _valid_rows(hidden, index)
    B, H = index.shape[0], hidden.shape[-1]
    n_tokens = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
    if n_tokens == 0:
        return hidden.new_zeros(B, H), valid
    rows = hidden[torch.arange(B, device=hidden.device), safe] if hidden.dim() == 3 else hidden[safe]
    return torch.where(valid[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device)), valid


def _reference_index(mask):
    B, T = mask.shape
    if T == 0:
        return torch.full((B,), -1, dtype=torch.int64, device=mask.device)
    pos = torch.arange(T, device=mask.device).expand(B, T)
    return torch.where(mask != 0, pos, torch.full_like(pos, -1)).amax(dim=1)


def _reference_fwd(hidden, weight, bias, index):
    rows, valid = _gather_rows(hidden, index)
    out = rows.to(weight.dtype) @ weight.t()
    if bias is not None:
        out = out + bias
    return torch.where(valid[:, None], out, torch.full_like(out, float("nan")))


def _reference_bwd(grad, hidden, weight, index, need_hidden, need_weight, need_bias):
    rows, valid = _gather_rows(hidden, index)
    g = torch.where(valid[:, None], grad, torch.zeros_like(grad))  # invalid rows give nothing
    g_hidden, g_weight, g_bias = grads_fake(hidden, weight, False, False, False)
    if need_hidden:
        g_hidden = grad_buffer(hidden)
        g_rows = (g @ weight).to(hidden.dtype)
        b_idx = torch.nonzero(valid).flatten()
        if hidden.dim() == 3:
            g_hidden[b_idx, index[b_idx]] = g_rows[b_idx]
        else:
            g_hidden[index[b_idx]] = g_rows[b_idx]
    if need_weight:
        g_weight = g.t() @ rows.to(weight.dtype)
    if need_bias:
        g_bias = g.sum(0)
    return g_hidden, g_weight, g_bias


def grads_fake(hidden, weight, need_hidden, need_weight, need_bias):
    """(grad_hidden, grad_weight, grad_bias) of the backward, each empty when not needed."""
    g_hidden = grad_buffer(hidden, zero=False) if need_hidden else hidden.new_empty(0)
    g_weight = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    g_bias = weight.new_empty(weight.shape[0]) if need_bias else weight.new_empty(0)
    return g_hidden, g_weight, g_bias


# ---------------------------------------------------------------------------------------
# Kernels and ops
# ---------------------------------------------------------------------------------------
def _index_fake(mask, *_):
    return mask.new_empty(mask.shape[0], dtype=torch.int64)


index_kernel = Kernel("last_token_index_kernel", reference=_reference_index, triton="pooling:last_token_index",
                      fake=_index_fake)
fwd_kernel = Kernel("last_token_reward_fwd_kernel", reference=_reference_fwd, triton="pooling:last_token_reward_fwd",
                    fake=lambda hidden, weight, bias, index: hidden.new_empty(index.shape[0], weight.shape[0],
                                                                              dtype=weight.dtype))
bwd_kernel = Kernel("last_token_reward_bwd_kernel", reference=_reference_bwd, triton="pooling:last_token_reward_bwd",
                    fake=lambda grad, hidden, weight, index, nh, nw, nb: grads_fake(hidden, weight, nh, nw, nb))


def _check_mask_arg(mask, backend):
    _checks.check_tensor("mask", mask, ndims=2)
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be bool, integer or float, got {mask.dtype}")


def _check_index_arg(index, device):
    _checks.check_tensor("index", index, ndims=1, dtypes=(torch.int64,), device=device)


def check_pool_args(hidden, weight, bias, index):
    """The direct-call checks of the pooling ops' (hidden, weight, bias, index)."""
    hidden = check_head(hidden, weight, bias, contiguous=False)
    _check_index_arg(index, hidden.device)
    if hidden.dim() == 3 and index.shape[0] != hidden.shape[0]:
        raise ValueError(f"index must have shape [B] = [{hidden.shape[0]}] (from hidden), got {tuple(index.shape)}")
    if hidden.shape[-1] > 1 and hidden.stride(-1) != 1:
        raise ValueError(f"hidden must have a unit stride on its last dim H, got strides {hidden.stride()}")
    if hidden.dim() == 2 and index.shape[0] > 1 and _checks.data_checks_enabled(index.device):
        _check_distinct_tokens(index, hidden.shape[0])


def _check_distinct_tokens(index, n_tokens):
    """Packed hidden [N, H]: the tokens ``index`` names (those in [0, N)) are distinct, one last
    token per sequence (what ``cu_seqlens`` gives); the backward writes each one's gradient
    once, so a repeated token would get one row's gradient, not their sum (a data check)."""
    named = index[(index >= 0) & (index < n_tokens)]
    s = named.sort().values
    repeated = s[1:][s[1:] == s[:-1]]
    if repeated.numel():
        rows = torch.nonzero(torch.isin(index, repeated)).flatten()
        raise ValueError(f"index: rows {_checks.rows_str(rows)} name the same packed token "
                         f"({_checks.rows_str(repeated.unique())}); each sequence has its own last token")


def _check_grad(name, grad, shape, device):
    _checks.check_tensor(name, grad, dtypes=_checks.FLOAT_DTYPES, device=device)
    if tuple(grad.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(grad.shape)}")


def _check_reward_backward(grad, hidden, weight, index, need_hidden, need_weight, need_bias, backend):
    check_pool_args(hidden, weight, None, index)
    _check_grad("grad", grad, (index.shape[0], weight.shape[0]), hidden.device)


def _head_params(hidden, weight, bias):
    acc = acc_dtype(hidden.dtype)
    w = as_dtype(weight, acc).contiguous()
    b = as_dtype(bias, acc).contiguous() if bias is not None else None
    return w, b


def _prepare_forward(hidden, weight, bias, index):
    w, b = _head_params(hidden, weight, bias)
    return hidden, w, b, index.contiguous()  # a direct call may pass a strided / expanded index


def _prepare_backward(grad, hidden, weight, index, need_hidden, need_weight, need_bias):
    w, _ = _head_params(hidden, weight, None)
    return as_dtype(grad, w.dtype).contiguous(), hidden, w, index.contiguous(), need_hidden, need_weight, need_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, index, backend = inputs
    ctx.save_for_backward(hidden, weight, index)
    ctx.backend = backend
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(pool_backward, ctx, grad):
    """Autograd backward; ``pool_backward`` is the public backward op, or its body (the
    eager path)."""
    hidden, weight, index = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    g_h, g_w, g_b = pool_backward(grad, hidden, weight, index, need_h, need_w, need_b, ctx.backend)
    return (g_h if need_h else None, as_dtype(g_w, weight.dtype) if need_w else None,
            as_dtype(g_b, ctx.bias_dtype) if need_b else None, None, None)


def _reward_fake(hidden, weight, bias, index, backend):
    return hidden.new_empty(index.shape[0], weight.shape[0], dtype=acc_dtype(hidden.dtype))


def _reward_backward_fake(grad, hidden, weight, index, need_hidden, need_weight, need_bias, backend):
    return grads_fake(hidden, weight.new_empty(weight.shape, dtype=acc_dtype(hidden.dtype)), need_hidden,
                      need_weight, need_bias)


# What the public functions call: the public ops, or their bodies in plain eager mode
_last_token_index = Op("last_token_index", kernel=index_kernel, fake=_index_fake, check=_check_mask_arg)
_last_token_reward_backward = Op("last_token_reward_backward", kernel=bwd_kernel, prepare=_prepare_backward,
                                 fake=_reward_backward_fake, check=_check_reward_backward)
_last_token_reward = Op("last_token_reward", kernel=fwd_kernel, prepare=_prepare_forward, fake=_reward_fake,
                        check=lambda hidden, weight, bias, index, backend: check_pool_args(hidden, weight, bias, index),
                        autograd=Autograd("last_token_reward_backward", _setup_context, _backward))


def pool_forward(hidden, weight, bias, index, backend):
    """The routing of ``last_token_reward``: rewards [B, K] in the arithmetic dtype (for ops
    composed of it)."""
    return _last_token_reward.body(hidden, weight, bias, index, backend)


def pool_backward(grad, hidden, weight, index, need_hidden, need_weight, need_bias, backend):
    """The routing of ``last_token_reward_backward`` (for ops composed of it)."""
    return _last_token_reward_backward.body(grad, hidden, weight, index, need_hidden, need_weight, need_bias, backend)


# ---------------------------------------------------------------------------------------
# Index ops: the position arguments -> the index of each row's last valid token, with the
# data checks (in the op, so they run in every mode)
# ---------------------------------------------------------------------------------------
def _lengths_index_body(lengths, n_tokens):
    lengths = lengths.long()
    ok = lengths >= 1
    if n_tokens >= 0:
        ok &= lengths <= n_tokens
    if _checks.data_checks_enabled(lengths.device):
        bad = _checks.true_rows(~ok)
        if bad.numel():
            limit = f"in [1, {n_tokens}]" if n_tokens >= 0 else ">= 1"
            vals = ", ".join(str(int(lengths[i])) for i in bad[:10])
            raise ValueError(f"lengths must be {limit}: rows {_checks.rows_str(bad)} have {vals}")
    return torch.where(ok, lengths - 1, torch.full_like(lengths, -1))


def _cu_seqlens_index_body(cu_seqlens, n_tokens):
    cu = cu_seqlens.long()
    start, end = cu[:-1], cu[1:]
    ok = (end > start) & (start >= 0)
    if n_tokens >= 0:
        ok &= end <= n_tokens
    if _checks.data_checks_enabled(cu.device):
        if int(cu[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {int(cu[0])}")
        if n_tokens >= 0 and int(cu[-1]) != n_tokens:
            raise ValueError(f"cu_seqlens must end at N = {n_tokens} (hidden_states rows), got {int(cu[-1])}")
        bad = _checks.true_rows(end < start)
        if bad.numel():
            raise ValueError(f"cu_seqlens must be non-decreasing: rows {_checks.rows_str(bad)} end before they start")
        bad = _checks.true_rows(~ok)
        if bad.numel():
            raise ValueError(f"cu_seqlens: rows {_checks.rows_str(bad)} have no valid token (empty sequences)")
    return torch.where(ok, end - 1, torch.full_like(end, -1))


def _check_mask_index_body(index, n_tokens, name):
    if n_tokens > 0 and _checks.data_checks_enabled(index.device):
        bad = _checks.true_rows(index < 0)
        if bad.numel():
            what = "every token is pad_token_id" if name == "input_ids" else "all zero"
            raise ValueError(f"{name}: rows {_checks.rows_str(bad)} have no valid token ({what})")
    return index  # the op path clones it (an op's output never aliases an input)


def _check_lengths_arg(lengths, n_tokens):
    _checks.check_tensor("lengths", lengths, ndims=1, dtypes=_checks.INDEX_DTYPES)


def _check_cu_seqlens_arg(cu_seqlens, n_tokens):
    _checks.check_tensor("cu_seqlens", cu_seqlens, ndims=1, dtypes=_checks.INDEX_DTYPES)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must have shape [B + 1] (starting at 0), got shape (0,)")


def _check_index_of_mask(index, n_tokens, name):
    _check_index_arg(index, None)


_lengths_index = Op("lengths_index", body=_lengths_index_body, check=_check_lengths_arg,
                    fake=lambda lengths, n_tokens: lengths.new_empty(lengths.shape, dtype=torch.int64))
_cu_seqlens_index = Op("cu_seqlens_index", body=_cu_seqlens_index_body, check=_check_cu_seqlens_arg,
                       fake=lambda cu, n_tokens: cu.new_empty(cu.shape[0] - 1, dtype=torch.int64))
_check_mask_index = Op("check_mask_index", body=_check_mask_index_body, check=_check_index_of_mask,
                       fake=lambda index, n_tokens, name: torch.empty_like(index))


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def _count_given(**sources):
    given = [k for k, v in sources.items() if v is not None]
    if len(given) != 1:
        names = ", ".join(sources)
        raise ValueError(f"give exactly one of {names}; got {', '.join(given) if given else 'none'}")
    return given[0]


def _mask_index(mask, name, n_rows, n_tokens, device, backend):
    _checks.check_tensor(name, mask, ndims=2, device=device)
    if mask.shape[0] != n_rows or mask.shape[1] != n_tokens:
        raise ValueError(f"{name} must have shape [B, T] = [{n_rows}, {n_tokens}] (from hidden_states), "
                         f"got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        mask = mask != 0  # the kernels test integer/bool elements against zero
    return _check_mask_index(_last_token_index(mask, backend), n_tokens, name)


def _lengths_arg_index(lengths, n_rows, n_tokens, device):
    _checks.check_tensor("lengths", lengths, ndims=1, dtypes=_checks.INDEX_DTYPES, device=device)
    if n_rows is not None and lengths.shape[0] != n_rows:
        raise ValueError(f"lengths must have shape [B] = [{n_rows}] (from hidden_states), got {tuple(lengths.shape)}")
    return _lengths_index(lengths, -1 if n_tokens is None else n_tokens)


def _cu_seqlens_arg_index(cu_seqlens, n_rows, n_tokens, device):
    _checks.check_tensor("cu_seqlens", cu_seqlens, ndims=1, dtypes=_checks.INDEX_DTYPES, device=device)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must have shape [B + 1] (starting at 0), got shape (0,)")
    if n_rows is not None and cu_seqlens.shape[0] != n_rows + 1:
        raise ValueError(f"cu_seqlens must have shape [B + 1] = [{n_rows + 1}], got {tuple(cu_seqlens.shape)}")
    return _cu_seqlens_index(cu_seqlens, -1 if n_tokens is None else n_tokens)


def resolve_index(hidden_states, *, attention_mask=None, lengths=None, cu_seqlens=None, backend="reference"):
    """Validate the pooling inputs' position arguments against ``hidden_states`` and return
    the int64 [B] index of each row's last valid token (global rows for packed input).

    Shared by every op that pools (``last_token_reward``, ``pairwise_reward_loss``)."""
    source = _count_given(attention_mask=attention_mask, lengths=lengths, cu_seqlens=cu_seqlens)
    dev = hidden_states.device
    if hidden_states.dim() == 2:
        if source != "cu_seqlens":
            raise ValueError(f"packed hidden_states [N, H] needs cu_seqlens, got {source}")
        return _cu_seqlens_arg_index(cu_seqlens, None, hidden_states.shape[0], dev)
    if source == "cu_seqlens":
        raise ValueError(f"cu_seqlens goes with packed hidden_states [N, H], got shape {tuple(hidden_states.shape)}")
    B, T = hidden_states.shape[:2]
    if source == "lengths":
        return _lengths_arg_index(lengths, B, T, dev)
    return _mask_index(attention_mask, "attention_mask", B, T, dev, backend)


def check_head(hidden_states, weight, bias, contiguous=True):
    """Checks of a value head (weight [K, H], bias [K] or None) against hidden_states; with
    ``contiguous``, a hidden_states without a unit stride on H comes back as a copy that has one."""
    _checks.check_tensor("hidden_states", hidden_states, ndims=(2, 3), dtypes=_checks.FLOAT_DTYPES)
    dev = hidden_states.device
    _checks.check_tensor("weight", weight, ndims=2, dtypes=_checks.FLOAT_DTYPES, device=dev)
    if weight.shape[1] != hidden_states.shape[-1]:
        raise ValueError(f"weight must be [K, H] with H = {hidden_states.shape[-1]} (hidden_states' last dim), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have K >= 1 rows, got {tuple(weight.shape)}")
    _checks.check_tensor("bias", bias, ndims=1, dtypes=_checks.FLOAT_DTYPES, device=dev, allow_none=True)
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [K] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if contiguous and hidden_states.shape[-1] > 1 and hidden_states.stride(-1) != 1:
        hidden_states = hidden_states.contiguous()  # the kernels need a unit stride on H
    return hidden_states


def last_token_reward(hidden_states, weight, bias=None, *, attention_mask=None, lengths=None, cu_seqlens=None,
                      backend=None):
    """Value head on the last valid token of each sequence: float32 ``[B, K]`` rewards.

    Args:
        hidden_states: ``[B, T, H]`` (any strides with a unit stride on H: no copy), or packed
            ``[N, H]`` with ``cu_seqlens``. fp32/bf16/fp16 (fp64 computes in fp64 and returns
            fp64, for gradcheck).
        weight: ``[K, H]`` (an ``nn.Linear(H, K)`` weight); bias: ``[K]`` or None.
        attention_mask: ``[B, T]`` bool/int/float; the picked token is the rightmost non-zero
            position (right or left padding, pad == eos, masks with holes).
        lengths: ``[B]`` int, right padding: the picked token is ``length - 1``.
        cu_seqlens: ``[B + 1]`` int32/int64 offsets into packed ``[N, H]`` hidden states.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None/``"auto"``.

    A row with no valid token gives NaN rewards (no out-of-bounds read). For CPU tensors, and
    on a GPU with ``rmk.checks(True)``/``RMKERNELS_CHECK=1``, such a row, an out-of-range length
    or a malformed ``cu_seqlens`` raises ``ValueError`` naming the rows instead. T = 0 with
    ``attention_mask`` gives NaN rewards ``[B, K]`` without raising; with ``lengths`` no length
    is valid (they must be in [1, T]), so B > 0 rows raise that ``ValueError`` on CPU. Gradients
    flow to hidden_states (at the picked rows only), weight and bias; rows with no valid token
    contribute nothing.
    """
    hidden_states = check_head(hidden_states, weight, bias)
    be = _backend.resolve(backend, hidden_states.device)
    index = resolve_index(hidden_states, attention_mask=attention_mask, lengths=lengths, cu_seqlens=cu_seqlens,
                          backend=be)
    return _last_token_reward(hidden_states, weight, bias, index, be)


def last_token_index(attention_mask=None, *, input_ids=None, pad_token_id=None, lengths=None, cu_seqlens=None,
                     backend=None):
    """int64 ``[B]`` index of each sequence's last valid token.

    Exactly one of: ``attention_mask`` ``[B, T]`` (rightmost non-zero), ``input_ids`` with
    ``pad_token_id`` (rightmost non-pad token: HF ``*ForSequenceClassification``'s rule),
    ``lengths`` ``[B]`` (``length - 1``), ``cu_seqlens`` ``[B + 1]`` (the global row
    ``cu_seqlens[b + 1] - 1`` of the packed batch). A row with no valid token gets -1; for CPU
    tensors (and with ``rmk.checks(True)`` on a GPU) it raises ``ValueError`` naming the rows.
    """
    source = _count_given(attention_mask=attention_mask, input_ids=input_ids, lengths=lengths,
                          cu_seqlens=cu_seqlens)
    if source == "lengths":
        return _lengths_arg_index(lengths, None, None, lengths.device if isinstance(lengths, Tensor) else None)
    if source == "cu_seqlens":
        dev = cu_seqlens.device if isinstance(cu_seqlens, Tensor) else None
        return _cu_seqlens_arg_index(cu_seqlens, None, None, dev)
    if source == "input_ids":
        if pad_token_id is None:
            raise ValueError("input_ids needs pad_token_id (the rightmost non-pad token is picked)")
        pad_token_id = _checks.check_int("pad_token_id", pad_token_id, " (a token id)")
        _checks.check_tensor("input_ids", input_ids, ndims=2)
        if not (input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool):
            info = torch.iinfo(input_ids.dtype)  # torch would compare a wrapped value
            if not info.min <= pad_token_id <= info.max:
                raise ValueError(f"pad_token_id must lie in the range of input_ids' dtype "
                                 f"{_checks._dtype_name(input_ids.dtype)} [{info.min}, {info.max}], "
                                 f"got {pad_token_id}")
        mask, name = input_ids != pad_token_id, "input_ids"
    else:
        _checks.check_tensor("attention_mask", attention_mask, ndims=2)
        mask, name = attention_mask, "attention_mask"
    be = _backend.resolve(backend, mask.device)
    return _mask_index(mask, name, mask.shape[0], mask.shape[1], mask.device, be)
