"""Per-token log-probs (and entropy) of a Hugging Face causal LM without its logits.

``rmk.causal_lm_logprobs(model, input_ids, attention_mask)`` runs the model's backbone (its
``base_model``: embeddings, decoder layers, final norm), takes the final hidden states and
applies ``rmk.token_logprobs`` with the LM head (``model.get_output_embeddings()``), so the
``[B, T, V]`` logits tensor of ``model(...).logits`` is never built. It is what the PPO / GRPO
loop needs for the policy and for the frozen reference model.
"""
import torch

from rmkernels import _checks
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


# What transformers' *ForCausalLM models (5.24) do between the backbone's last hidden state and
# the softmax, by model type (of the config or its text config): ("hidden" | "logits", the config
# attribute, "mul" | "div"). The same attribute means different things in different models
# (Granite divides its logits by ``logits_scaling``, HyperCLOVA X multiplies them, MiniCPM3
# divides its hidden states), so the attributes are read for these model types only.
HEAD_RULES = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"),
                    ("logits", "logit_scale", "mul")),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared",
                     "granite4_vision", "granite4_vision_text", "granite_docling", "granite_docling_text"),
                    ("logits", "logits_scaling", "div")),
    **dict.fromkeys(("hyperclovax", "hyperclovax_vision_v2"), ("logits", "logits_scaling", "mul")),
    "minicpm3": ("hidden", "logits_scaling", "div"),
    "falcon_h1": ("logits", "lm_head_multiplier", "mul"),
    **dict.fromkeys(("inkling_text", "inkling_mm_model"), ("hidden", "logits_mup_width_multiplier", "div")),
}
# model type -> the attribute N of "logits[..., :N]" (the softmax over the head's first N rows)
VOCAB_LIMITS = dict.fromkeys(("inkling_text", "inkling_mm_model"), "unpadded_vocab_size")
# tanh soft-capping of the output logits, any model type (Gemma 2/3n, nanochat: final_logit_softcapping;
# RecurrentGemma: logits_soft_cap; xLSTM: output_logit_soft_cap): not a linear map of the hidden state,
# refused. (attn_/router_ soft-caps act inside the model, before the hidden state: not the head's.)
LOGIT_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# attributes that rescale the logits in some model: set (not 1) on a model type without a rule,
# refused rather than guessed
SCALING_ATTRIBUTES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "logits_mup_width_multiplier",
                      "output_multiplier", "unpadded_vocab_size")


def _configs(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return [text] if text is cfg else [text, cfg]


def _config_value(configs, name):
    for cfg in configs:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def _check_head_config(model):
    """(hidden_op, logit_scale, vocab): what the model's forward does to the last hidden state
    (None, or ("mul" | "div", value)), the factor it applies to the LM head's output, the number
    of vocabulary rows its softmax covers (None: all); ``NotImplementedError`` for soft-capped
    logits and for a scaling attribute on a model type without a rule."""
    configs = _configs(model)
    name = type(model).__name__
    for attr in LOGIT_SOFTCAPS:
        cap = _config_value(configs, attr)
        if cap:
            raise NotImplementedError(f"{name} soft-caps its logits ({attr}={cap}); causal_lm_logprobs computes "
                                      "plain softmax log-probs")
    types = [getattr(c, "model_type", None) for c in configs]
    rule = next((HEAD_RULES[t] for t in types if t in HEAD_RULES), None)
    limit = next((VOCAB_LIMITS[t] for t in types if t in VOCAB_LIMITS), None)
    for attr in SCALING_ATTRIBUTES:
        value = _config_value(configs, attr)
        if value is not None and value != 1 and (rule is None or attr != rule[1]) and attr != limit:
            raise NotImplementedError(f"{name} (model type {types[0]!r}) has {attr}={value}, which rescales the "
                                      "logits in some models; causal_lm_logprobs knows no rule for this model type "
                                      "(rmkernels.causal_lm.HEAD_RULES)")
    hidden_op, logit_scale = None, 1.0
    if rule is not None:
        where, attr, op = rule
        value = float(_config_value(configs, attr) or 1.0)
        if where == "hidden":
            hidden_op = (op, value)
        else:
            logit_scale = value if op == "mul" else 1.0 / value
    vocab = _config_value(configs, limit) if limit is not None else None
    return hidden_op, logit_scale, (int(vocab) if vocab is not None else None)


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
    with autograd to the model's parameters (LM head included). What a model's forward does
    between its last hidden state and the softmax follows ``HEAD_RULES`` by model type (Cohere's
    ``logit_scale``, Granite's and HyperCLOVA X's ``logits_scaling``, FalconH1's
    ``lm_head_multiplier``: folded into the temperature; MiniCPM3's and Inkling's scaling of the
    hidden states: applied to them; Inkling's ``unpadded_vocab_size``: the head's first rows).
    ``NotImplementedError`` for models that soft-cap their logits (``LOGIT_SOFTCAPS``: Gemma
    2-4's ``final_logit_softcapping``, ...) and for a model type without a rule whose config
    sets one of the ``SCALING_ATTRIBUTES`` (not guessed: the same name means different things).
    """
    if not callable(getattr(model, "get_output_embeddings", None)):
        raise TypeError(f"model must be an HF *ForCausalLM (with get_output_embeddings()), got "
                        f"{type(model).__name__}")
    _checks.check_tensor("input_ids", input_ids, ndims=2, dtypes=_checks.INDEX_DTYPES)
    B, T = input_ids.shape
    if attention_mask is not None:
        _checks.check_tensor("attention_mask", attention_mask, ndims=2, device=input_ids.device)
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}], got {tuple(attention_mask.shape)}")
    R = T - 1 if response_length is None else _checks.check_int("response_length", response_length)
    if not 0 <= R <= T - 1:
        raise ValueError(f"response_length must be in [0, T - 1] = [0, {T - 1}], got {response_length}")
    hidden_op, scale, vocab = _check_head_config(model)
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
    if vocab is not None and vocab < weight.shape[0]:  # the forward keeps the first `vocab` logits
        weight = weight[:vocab]
        bias = bias[:vocab] if bias is not None else None
    if hidden_op is not None:  # the forward's own op, in its dtype (MiniCPM3, Inkling)
        hidden = hidden * hidden_op[1] if hidden_op[0] == "mul" else hidden / hidden_op[1]
    if hidden.dtype != weight.dtype:  # e.g. an fp32 norm output with a bf16 head
        hidden = hidden.to(weight.dtype)
    return token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature / scale,
                          return_entropy=return_entropy, ignore_index=_IGNORE, backend=backend)
