"""Token log-probabilities and entropy straight from hidden states (docs/ops.md section 6).

``rmk.token_logprobs(hidden, weight, targets)`` is ``log_softmax((hidden @ weight.T + bias) /
temperature)`` gathered at ``targets`` (and, with ``return_entropy=True``, the entropy of the
same distribution), without ever holding the ``[N, V]`` logits: the kernels walk the
vocabulary in chunks with an online log-sum-exp, and the backward recomputes each chunk's
logits. What autograd keeps is the inputs plus two floats per token (log-sum-exp, entropy).

Per token, with ``z = (h . W^T + b) / temperature`` and ``p = softmax(z)``::

    logprob = z[target] - lse(z)          (clamped at 0: never positive by rounding)
    entropy = lse(z) - sum_v p_v z_v      (clamped at 0)
    dz_v    = g_lp (1[v = target] - p_v) - g_ent p_v (log p_v + entropy)

A logit of -inf (a banned or padded vocabulary entry) has p_v = 0, and its terms p_v z_v and
p_v log p_v are 0 (their limit), not 0 * -inf = NaN: every backend drops them where p_v is 0
(the reference and the GPU kernels by a select on p_v == 0, the CPU loops by clamping the exp's
argument; both let a NaN through), and the online log-sum-exp shifts a chunk with no finite
logit yet by 0 instead of its max -inf. A row whose logits are all -inf: lse -inf, NaN
log-prob, entropy and logit gradient (docs/ops.md section 6).

and the gradients of ``h``, ``W``, ``b`` are ``dz / temperature`` pushed through the linear
map (three GEMMs of ``[N, V]`` by ``[V, H]`` in all, plus the logits' recomputation).

Ops (``torch.ops.rmkernels.*``):

=================================  ======================================================
``token_logprobs(hidden, weight, bias, targets, temperature, ignore_index, backend)``
                                   (logprobs, entropy, lse), each [B, T] float32 (fp64 for fp64)
``token_logprobs_backward(...)``   (grad_hidden, grad_weight, grad_bias)
``token_logprobs_fwd_kernel``,     the C++ CPU / CUDA kernels behind ``cpu``/``cuda``: GEMMs
``token_logprobs_bwd_kernel``      by ATen (MKL / cuBLAS) on [token_chunk, vocab_chunk] tiles
=================================  ======================================================

Vocabulary-parallel heads (``process_group``, not implemented yet): each rank would pass its
shard ``weight[V/P, H]`` and a ``vocab_start`` offset; the per-token statistics the kernels
keep (running max, sum of exp, sum of exp * logit, target logit) combine across ranks with one
all-reduce of the max and one of the three rescaled sums (the online log-sum-exp is
associative), and the backward needs only the global ``lse``/``entropy``, which are already
arguments of the backward kernels. So the addition is a ``vocab_start`` argument of the
kernels (targets outside the shard contribute nothing) and the two all-reduces here.
"""
import torch

from rmkernels import _backend, _checks
from rmkernels._library import acc_dtype, as_dtype
from rmkernels._registry import Autograd, Kernel, Op

# ---------------------------------------------------------------------------------------
# Size policy (one place, used by every chunked backend)
# ---------------------------------------------------------------------------------------
# The chunked backends hold one [token_chunk, vocab_chunk] tile of logits in the arithmetic
# dtype (and, in the backward, the same tile of logit gradients, computed in place) plus one
# [vocab_chunk, H] slice of the weight and its gradient. CPU: 2^22 elements (16 MiB fp32),
# small next to the [V, H] weight gradient, large enough that MKL runs at full speed (a
# 1024 x 4096 x 512 GEMM is within ~5% of the whole [N, V] one, measured 1 thread).
# GPU: 2^26 elements (256 MiB fp32), enough work per GEMM to fill an H100/H200.
VOCAB_CHUNK = {"cpu": 4096, "cuda": 8192}
TILE_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 26}


def chunk_sizes(n_tokens, vocab, device_type):
    """(token_chunk, vocab_chunk) of the chunked kernels for ``n_tokens`` tokens and a
    vocabulary of ``vocab``."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    vc = max(1, min(vocab, VOCAB_CHUNK[kind]))
    tc = max(1, min(max(n_tokens, 1), TILE_ELEMS[kind] // vc))
    return tc, vc


# ---------------------------------------------------------------------------------------
# Kernels (schemas in ops/_schemas.py; C++ CPU / CUDA implementations in csrc/)
# ---------------------------------------------------------------------------------------
# hidden [N, H] or [B, T, H] (unit stride on H); weight [V, H] in hidden's dtype; bias [V] in the
# arithmetic dtype or None; targets int64 contiguous, hidden's leading shape. Outputs: logprobs,
# entropy, lse shaped like targets, contiguous, in the arithmetic dtype. A target outside [0, V)
# other than ignore_index is an error in the CPU kernel (TORCH_CHECK) and NaN in the CUDA / Triton
# kernels (no sync); it is never read. token_chunk / vocab_chunk: chunk_sizes (the Triton forward,
# one fused pass, does not use them).
# Backward: grad_logprobs / grad_entropy (None: 0) shaped like targets, contiguous, arithmetic
# dtype. Returns grad_hidden (hidden's shape, contiguous, hidden's dtype), grad_weight (weight's
# dtype), grad_bias [V] (arithmetic dtype); a gradient not needed is an empty tensor.
def _fwd_fake(hidden, weight, bias, targets, temperature, ignore_index, *rest):
    acc = acc_dtype(hidden.dtype)
    return tuple(hidden.new_empty(targets.shape, dtype=acc) for _ in range(3))


def _grads_fake(hidden, weight, need_hidden, need_weight, need_bias):
    acc = acc_dtype(hidden.dtype)
    g_hidden = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    g_weight = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    g_bias = weight.new_empty(weight.shape[0], dtype=acc) if need_bias else weight.new_empty(0, dtype=acc)
    return g_hidden, g_weight, g_bias


def _bwd_fake(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
              *rest):
    # the kernel op ends with (..., need_hidden, need_weight, need_bias), the public op with backend
    need_hidden, need_weight, need_bias = rest[-4:-1] if isinstance(rest[-1], str) else rest[-3:]
    return _grads_fake(hidden, weight, need_hidden, need_weight, need_bias)


# ---------------------------------------------------------------------------------------
# Reference implementation (pure PyTorch, the ground truth: the full logits)
# ---------------------------------------------------------------------------------------
def _reference_logits(hidden, weight, bias, temperature):
    acc = acc_dtype(hidden.dtype)
    z = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    return z / temperature


def valid_targets(targets, vocab, ignore_index):
    """The tokens that take part: a target in ``[0, vocab)`` other than ``ignore_index`` (the
    reference's and the Triton host's rule; the C++ driver's: token_logprobs_chunks.h,
    valid_targets)."""
    return (targets != ignore_index) & (targets >= 0) & (targets < vocab)


def _valid_targets(targets, vocab, ignore_index):
    valid = valid_targets(targets, vocab, ignore_index)
    return valid, torch.where(valid, targets, torch.zeros_like(targets))


def _finite_where_p0(p, logp):
    """log p read as 0 where p == 0 (a -inf logit: log p = -inf, and 0 * -inf would be NaN; such
    an entry adds nothing to the entropy or to a gradient, lim p log p = 0). A select on p == 0,
    so a NaN p (a NaN input) keeps its NaN."""
    return torch.where(p == 0, torch.zeros((), dtype=logp.dtype, device=logp.device), logp)


def _p_logp(p, logp):
    """p log p, 0 where p == 0 (-inf logits)."""
    return p * _finite_where_p0(p, logp)


def _reference_fwd(hidden, weight, bias, targets, temperature, ignore_index, token_chunk=0, vocab_chunk=0):
    z = _reference_logits(hidden, weight, bias, temperature)  # [..., V]
    V = weight.shape[0]
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[..., None]
    entropy = -_p_logp(logp.exp(), logp).sum(-1)
    valid, safe = _valid_targets(targets, V, ignore_index)
    lp = logp.gather(-1, safe[..., None]).squeeze(-1)
    bad = (targets != ignore_index) & ~valid  # out of range: NaN, as the GPU kernels give
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp = torch.where(valid, lp.clamp(max=0), torch.where(bad, torch.full_like(lp, float("nan")), zero))
    entropy = torch.where(targets != ignore_index, entropy.clamp(min=0), zero)
    return lp, entropy, lse


def _reference_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature,
                   ignore_index, token_chunk, vocab_chunk, need_hidden, need_weight, need_bias):
    z = _reference_logits(hidden, weight, bias, temperature)
    V = weight.shape[0]
    valid, safe = _valid_targets(targets, V, ignore_index)
    logp = z - lse[..., None]
    p = logp.exp()
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    g_lp = torch.where(valid, grad_logprobs, zero)
    dz = -g_lp[..., None] * p
    dz.scatter_add_(-1, safe[..., None], g_lp[..., None])
    if grad_entropy is not None:
        g_ent = torch.where(valid, grad_entropy, zero)
        dz = dz - g_ent[..., None] * p * (_finite_where_p0(p, logp) + entropy[..., None])
    # A token that takes no part gets no gradient and gives none, whatever its hidden state (a
    # padded position's may be NaN): its dz row is 0 by a select (its p may be NaN, 0 * NaN), and
    # its hidden row is read as 0 in grad_weight's product.
    dz = torch.where(valid[..., None], dz, zero) / temperature
    g_hidden, g_weight, g_bias = _grads_fake(hidden, weight, False, False, False)
    if need_hidden:
        g_hidden = (dz @ weight.to(z.dtype)).to(hidden.dtype)
    if need_weight:
        x = hidden.to(z.dtype).masked_fill(~valid[..., None], 0)
        g_weight = (dz.reshape(-1, V).t() @ x.reshape(-1, hidden.shape[-1])).to(weight.dtype)
    if need_bias:
        g_bias = dz.reshape(-1, V).sum(0)
    return g_hidden, g_weight, g_bias


fwd_kernel = Kernel("token_logprobs_fwd_kernel", reference=_reference_fwd, triton="token_logprobs:token_logprobs_fwd",
                    fake=_fwd_fake)
bwd_kernel = Kernel("token_logprobs_bwd_kernel", reference=_reference_bwd, triton="token_logprobs:token_logprobs_bwd",
                    fake=_bwd_fake)


# ---------------------------------------------------------------------------------------
# Public ops (declared once: the registry builds the custom ops, autograd and eager path)
# ---------------------------------------------------------------------------------------
def _bias_acc(hidden, bias):
    return as_dtype(bias, acc_dtype(hidden.dtype)).contiguous() if bias is not None else None


def _chunks(hidden, targets, weight):
    return chunk_sizes(targets.numel(), weight.shape[0], hidden.device.type)


def _prepare_forward(hidden, weight, bias, targets, temperature, ignore_index):
    return (hidden, weight, _bias_acc(hidden, bias), targets.contiguous(), temperature, ignore_index,
            *_chunks(hidden, targets, weight))


def _prepare_backward(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature,
                      ignore_index, need_hidden, need_weight, need_bias):
    acc = acc_dtype(hidden.dtype)
    g_lp = as_dtype(grad_logprobs, acc).contiguous()
    g_ent = as_dtype(grad_entropy, acc).contiguous() if grad_entropy is not None else None
    return (g_lp, g_ent, hidden, weight, _bias_acc(hidden, bias), targets.contiguous(), lse.contiguous(),
            entropy.contiguous(), temperature, ignore_index, *_chunks(hidden, targets, weight), need_hidden,
            need_weight, need_bias)


def _check_forward_args(hidden, weight, bias, targets, temperature, ignore_index, backend):
    """The check hook of direct op calls: the same checks as the public function, and the unit
    stride on H that the public function makes (by a copy) and every backend's kernel reads."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if isinstance(t, torch.Tensor) and t.dim() in (2, 3) and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride on H when the op is called directly, got strides "
                             f"{t.stride()} (rmk.token_logprobs makes a copy)")
    check_inputs(hidden, weight, targets, bias, temperature, ignore_index)
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must have dtype int64, got {_checks._dtype_name(targets.dtype)}")


def _check_backward_args(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature,
                         ignore_index, need_hidden, need_weight, need_bias, backend):
    _check_forward_args(hidden, weight, bias, targets, temperature, ignore_index, backend)
    acc = (acc_dtype(hidden.dtype),)  # lse and entropy: the forward's outputs, in the arithmetic dtype
    for name, t in (("grad_logprobs", grad_logprobs), ("grad_entropy", grad_entropy), ("lse", lse),
                    ("entropy", entropy)):
        _checks.check_tensor(name, t, dtypes=_checks.FLOAT_DTYPES if name.startswith("grad") else acc,
                             device=hidden.device, allow_none=name == "grad_entropy")
        if t is not None and tuple(t.shape) != tuple(targets.shape):
            raise ValueError(f"{name} must have targets' shape {tuple(targets.shape)}, got {tuple(t.shape)}")


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.set_materialize_grads(False)  # an unused entropy output costs its backward nothing
    ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(lp_backward, ctx, grad_logprobs, grad_entropy, _grad_lse):
    """Autograd backward; ``lp_backward`` is the public backward op, or its body (the eager
    path). The lse output is an internal result (no gradient flows from it)."""
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    g_h, g_w, g_b = lp_backward(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy,
                                ctx.temperature, ctx.ignore_index, need_h, need_w, need_b, ctx.backend)
    return (g_h if need_h else None, g_w if need_w else None, as_dtype(g_b, ctx.bias_dtype) if need_b else None,
            None, None, None, None)


_token_logprobs_backward = Op("token_logprobs_backward", kernel=bwd_kernel, prepare=_prepare_backward,
                              fake=_bwd_fake, check=_check_backward_args)
_token_logprobs = Op("token_logprobs", kernel=fwd_kernel, prepare=_prepare_forward, fake=_fwd_fake,
                     check=_check_forward_args,
                     autograd=Autograd("token_logprobs_backward", _setup_context, _backward))


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
def _check_targets(targets, vocab, ignore_index):
    """ValueError naming the first bad positions if a target is outside [0, V) and not
    ignore_index (always for CPU tensors; on a GPU with ``rmk.checks(True)``)."""
    if targets.numel() == 0 or not _checks.data_checks_enabled(targets.device):
        return
    lo, hi = _checks.min_max(targets)  # one pass: all in [0, V) (the rest only otherwise)
    if lo >= 0 and hi < vocab:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        where = torch.nonzero(bad)[:5]
        vals = ", ".join(f"{tuple(w.tolist())}: {int(targets[tuple(w.tolist())])}" for w in where)
        raise ValueError(f"targets must be in [0, V) = [0, {vocab}) or ignore_index = {ignore_index}; "
                         f"{int(bad.sum())} are not, first at {vals}")


# The smallest temperature whose 1 / temperature is finite in float32 (~2.94e-39): every
# backend scales the logits by 1 / temperature in the arithmetic dtype.
MIN_TEMPERATURE = 1.0 / float(torch.finfo(torch.float32).max)


def check_temperature(temperature):
    """``temperature`` finite and > 0 with ``1 / temperature`` finite in float32 (>=
    ``MIN_TEMPERATURE``), as a float: the one rule of the public function, the ops' check hooks
    and the Triton host functions (the C++ kernels: op_checks.h, check_temperature)."""
    t = _checks.check_float("temperature", temperature, lo=0.0, lo_open=True, hi=float("inf"), hi_open=True)
    if t < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:.6g} (1 / temperature finite in float32: the "
                         f"logits are scaled by it), got {temperature!r}")
    return t


def check_inputs(hidden, weight, targets, bias, temperature, ignore_index):
    """Validate the arguments of ``token_logprobs``; returns (hidden, weight, targets,
    temperature) ready for the ops (unit stride on H, int64 targets)."""
    _checks.check_tensor("hidden", hidden, ndims=(2, 3), dtypes=_checks.FLOAT_DTYPES)
    dev = hidden.device
    _checks.check_tensor("weight", weight, ndims=2, device=dev)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {_checks._dtype_name(hidden.dtype)}, "
                        f"got {_checks._dtype_name(weight.dtype)}")
    H = hidden.shape[-1]
    if H < 1:
        raise ValueError(f"hidden must have H >= 1 features (its last dim), got shape {tuple(hidden.shape)}")
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, H] with H = {H} (hidden's last dim), got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have V >= 1 rows, got {tuple(weight.shape)}")
    V = weight.shape[0]
    _checks.check_tensor("bias", bias, ndims=1, dtypes=_checks.FLOAT_DTYPES, device=dev, allow_none=True)
    if bias is not None and bias.shape[0] != V:
        raise ValueError(f"bias must be [V] = [{V}], got {tuple(bias.shape)}")
    _checks.check_tensor("targets", targets, dtypes=_checks.INDEX_DTYPES, device=dev)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    temperature = check_temperature(temperature)
    ignore_index = _checks.check_int("ignore_index", ignore_index)
    if H > 1 and hidden.stride(-1) != 1:
        hidden = hidden.contiguous()  # the kernels need a unit stride on H
    if H > 1 and weight.stride(-1) != 1:
        weight = weight.contiguous()
    targets = as_dtype(targets, torch.int64).contiguous()
    _check_targets(targets, V, ignore_index)
    return hidden, weight, targets, temperature


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False,
                   ignore_index=-100, backend=None):
    """Log-probabilities of ``targets`` (and the entropy) under ``softmax((hidden @ weight.T +
    bias) / temperature)``, without materialising the ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` final hidden states (any strides with a unit stride
            on H: no copy), fp32/bf16/fp16 (fp64 computes and returns fp64, for gradcheck).
        weight: ``[V, H]`` LM head (``model.get_output_embeddings().weight``), hidden's dtype.
        targets: int64 (or int32) with hidden's leading shape: the token whose log-prob is
            taken at each position (for a causal LM: the next token).
        bias: ``[V]`` or None.
        temperature: > 0 and finite, with ``1 / temperature`` finite in float32 (>= ~2.94e-39,
            ``MIN_TEMPERATURE``); the logits are divided by it (verl / OpenRLHF sampling
            temperature).
        return_entropy: also return the per-token entropy ``-sum_v p_v log p_v``.
        ignore_index: targets equal to it give log-prob 0 and entropy 0 and no gradient (the
            positions of prompt / padding tokens); their hidden states take part in nothing, so
            a NaN or inf there reaches no output and no gradient.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None/``"auto"``.

    Returns:
        ``logprobs`` (or ``(logprobs, entropy)``) shaped like ``targets``, float32 (float64 for
        float64 inputs). A log-prob is never positive and the entropy never negative (both
        clamped where rounding would cross 0); neither is NaN for finite inputs whose scaled
        logits ``(hidden @ weight.T + bias) / temperature`` are finite in the arithmetic dtype,
        or -inf with at least one finite logit per row.

    -inf logits (a bias of -inf on banned or padded vocabulary entries) are allowed: such an
    entry has probability 0 and adds nothing to the entropy or to any gradient. A target whose
    own logit is -inf gets log-prob -inf and a finite gradient (that of ``z[target] - lse``). A
    row whose logits are all -inf has no distribution: NaN log-prob and entropy (as
    ``torch.log_softmax``), and a NaN gradient that reaches its hidden row and all of the weight
    and bias gradients (as torch's autograd); give it ``ignore_index``. NaN inputs still give NaN.

    Arithmetic is float32 whatever the input dtype, except in the GEMMs on a GPU: the CPU
    backend upcasts each bf16/fp16 chunk; the cuda and triton ones run bf16/fp16 GEMMs with
    float32 output, and their backward rounds dz (the logits' gradient) to the input dtype for
    its two products (docs/ops.md section 6). Gradients flow to hidden,
    weight and bias from both outputs, in their dtypes. A target outside ``[0, V)`` other than
    ``ignore_index`` is a ``ValueError`` before any kernel runs (for CPU tensors always, on a GPU
    with ``rmk.checks(True)``; unchecked on a GPU, such a position gives NaN and is never read).
    Memory: one ``[token_chunk, vocab_chunk]`` tile (``chunk_sizes``) besides the outputs and the
    gradients; autograd keeps the inputs and two floats per token.
    """
    hidden, weight, targets, temperature = check_inputs(hidden, weight, targets, bias, temperature, ignore_index)
    return_entropy = _checks.check_bool("return_entropy", return_entropy)
    be = _backend.resolve(backend, hidden.device)
    lp, entropy, _ = _token_logprobs(hidden, weight, bias, targets, temperature, int(ignore_index), be)
    return (lp, entropy) if return_entropy else lp
