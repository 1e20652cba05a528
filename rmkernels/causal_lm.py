"""Per-token log-probs (and entropy) of a Hugging Face causal LM without its logits.

``rmk.causal_lm_logprobs(model, input_ids, attention_mask)`` runs the model's backbone (its
``base_model``: embeddings, decoder layers, final norm), takes the final hidden states and
applies ``rmk.token_logprobs`` with the LM head (``model.get_output_embeddings()``), so the
``[B, T, V]`` logits tensor of ``model(...).logits`` is never built. It is what the PPO / GRPO
loop needs for the policy and for the frozen reference model.
"""
import torch

from rmkernels.ops.token_logprobs import token_logprobs

_IGNORE = -100


def _backbone(model):
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        get_decoder = getattr(model, "get_decoder", None)
        base = get_decoder() if get_decoder is not None else None
    if base is None or base is model:
        raise ValueError(f"model ({type(model).__name__}) has no separate backbone (base_model / get_decoder()): "
                         "pass an HF *ForCausalLM model")
    return base


def _check_head_config(model):
    cfg = getattr(model, "config", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if softcap:
        raise NotImplementedError(f"{type(model).__name__} soft-caps its logits (final_logit_softcapping="
                                  f"{softcap}); causal_lm_logprobs computes plain softmax log-probs")
    return float(getattr(cfg, "logit_scale", 1.0) or 1.0)  # Cohere multiplies its logits by logit_scale


def causal_lm_logprobs(model, input_ids, attention_mask=None, *, response_length=None, temperature=1.0,
                       return_entropy=False, position_ids=None, backend=None, **model_kwargs):
    """Log-probabilities of each token of ``input_ids`` given the tokens before it, under an HF
    causal LM, computed from its final hidden states and LM head without the model's logits.

    Args:
        model: an HF ``*ForCausalLM`` (anything with ``base_model`` and
            ``get_output_embeddings()``), e.g. ``LlamaForCausalLM``, ``Qwen2ForCausalLM``.
        input_ids: ``[B, T]`` prompt + response token ids.
        attention_mask: ``[B, T]`` (left or right padding); positions whose token has mask 0
            give log-prob 0 and entropy 0 (and no gradient). None: every token counts.
        response_length: R: only the last R tokens (verl's ``responses``): returns ``[B, R]``;
            None: tokens 1..T-1, ``[B, T - 1]``.
        temperature: the logits are divided by it (verl / OpenRLHF's rollout temperature).
        return_entropy: also return the per-token entropy of the same distributions.
        position_ids, model_kwargs: passed to the backbone (verl computes position ids from
            the mask for left padding; HF models derive them from the cache otherwise).
        backend: of ``rmk.token_logprobs``.

    Returns ``logprobs`` (or ``(logprobs, entropy)``), float32, equal to
    ``log_softmax(model(input_ids, attention_mask).logits / temperature)`` at the next token,
    with autograd to the model's parameters (LM head included). Models whose logits are not a
    plain linear map of the last hidden state (``final_logit_softcapping``) raise
    ``NotImplementedError``; Cohere's ``logit_scale`` is folded into the temperature.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    B, T = input_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}], got {tuple(attention_mask.shape)}")
    R = T - 1 if response_length is None else int(response_length)
    if not 0 <= R <= T - 1:
        raise ValueError(f"response_length must be in [0, T - 1] = [0, {T - 1}], got {response_length}")
    scale = _check_head_config(model)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model ({type(model).__name__}) has no output embeddings (LM head)")
    out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden[:, T - R - 1:T - 1]  # the state before each predicted token (a view)
    targets = input_ids[:, T - R:]
    if attention_mask is not None:
        targets = torch.where(attention_mask[:, T - R:] != 0, targets, torch.full_like(targets, _IGNORE))
    weight = head.weight
    bias = getattr(head, "bias", None)
    if hidden.dtype != weight.dtype:  # e.g. an fp32 norm output with a bf16 head
        hidden = hidden.to(weight.dtype)
    return token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature / scale,
                          return_entropy=return_entropy, ignore_index=_IGNORE, backend=backend)
