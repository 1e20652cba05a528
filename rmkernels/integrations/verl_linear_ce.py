"""Drop-in for verl's fused ``linear_cross_entropy`` (``verl.utils.kernel.linear_cross_entropy``).

    # from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy
    from rmkernels.integrations.verl_linear_ce import linear_cross_entropy
    log_probs, entropy = linear_cross_entropy(hidden_states, lm_head.weight, labels, temperature, "none")

Same signature as verl's (0.5 - 0.9: ``hidden, weight, labels, temperature=1.0,
reduction="none", dist_process_group=None``) and the same results: per-token log-probs
(``-cross_entropy``, so never positive here; verl #2656) and entropies of
``softmax(hidden @ weight.T / temperature)``, flattened to ``[num_tokens]``, with gradients
from both. Computed by ``rmk.token_logprobs`` (any backend: also on CPU tensors, bf16/fp16 with
float32 arithmetic). Differences: labels outside ``[0, V)`` raise ``ValueError`` where data
checks run (always for CPU tensors; on a GPU with ``RMKERNELS_CHECK=1`` or ``rmk.checks(True)``,
docs/ops.md "Conventions"; without them such a label gives NaN, never an out-of-bounds read,
where verl reads out of bounds, #5349); a label of -100 gives a log-prob of 0 **and an entropy
of 0**, neither with a gradient (verl has no ignore index and computes the entropy whatever the
label); ``dist_process_group`` (a vocabulary-sharded head) is not supported yet and raises
``NotImplementedError``. ``reduction`` "sum" / "mean" reduce the log-probs over the tokens (the
entropy stays per token, as in verl).
"""
from rmkernels.ops.token_logprobs import token_logprobs


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None,
                         *, backend=None):
    """verl's ``linear_cross_entropy``: ``(logprobs, entropy)`` of ``labels`` under
    ``softmax(hidden @ weight.T / temperature)``; see the module docstring."""
    if dist_process_group is not None:
        raise NotImplementedError("dist_process_group (a vocabulary-parallel lm_head) is not supported by "
                                  "rmkernels' linear_cross_entropy yet; gather the head or use verl's kernel")
    if not isinstance(reduction, str) or reduction.lower() not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be one of ('none', 'sum', 'mean') in any case (verl lowercases it), "
                         f"got {reduction!r}")
    reduction = reduction.lower()
    hidden2 = hidden.reshape(-1, hidden.shape[-1]) if hidden.dim() != 2 else hidden
    lp, ent = token_logprobs(hidden2, weight, labels.reshape(-1), temperature=float(temperature),
                             return_entropy=True, backend=backend)
    if reduction == "sum":
        lp = lp.sum()
    elif reduction == "mean":
        lp = lp.mean()
    return lp, ent
