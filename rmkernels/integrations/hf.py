"""Hugging Face ``*ForSequenceClassification`` reward models with the head applied at the
last token only.

HF's sequence-classification models run ``self.score`` (an ``nn.Linear(H, K)``) on every one
of the ``B * T`` hidden states and then keep one row per sequence. ::

    import rmkernels as rmk
    rmk.patch_hf_reward_model(model)     # rebinds model.forward (this instance only)
    out = model(input_ids=ids, attention_mask=mask)   # same logits, loss and gradients
    rmk.unpatch_hf_reward_model(model)   # back to the original forward

After :func:`patch_hf_reward_model` the same forward runs the backbone, picks each row's
token with HF's own rule and applies ``score`` to those ``B`` rows only through
``rmk.last_token_reward``. The patched forward also takes an optional ``pairwise_loss=``
dict; with it, the batch is read in TRL's layout (rows ``0..B-1`` chosen, ``B..2B-1``
rejected) and the returned ``loss`` is ``rmk.pairwise_reward_loss`` (the fused
Bradley-Terry op), ``logits`` the ``[2B, 1]`` rewards, float32 whatever the weights' dtype (the
loss is computed from them; TRL rounds a bf16 / fp16 model's rewards to its dtype before its
loss). Going through ``model(...)`` keeps DDP and accelerate wrappers working; patch before
``Accelerator.prepare`` (see :func:`patch_hf_reward_model`).

Supported: every decoder ``*ForSequenceClassification`` of transformers 5.24 (checked over
all 64 of them, tiny random configs: logits and gradients equal the unpatched model's; under
bf16 autocast they differ by about one bf16 ulp, ~2e-3, as the head's GEMM runs on B rows instead
of B * T): those
built on ``GenericForSequenceClassification`` (Llama, Qwen2/3, Mistral, Gemma, Phi3, ...),
GPT-2, and the 13 with their own class and the same pooling rule (``_OWN_CLASS_HEADS``:
GPT-NeoX/Pythia, OPT, BLOOM, Falcon, GPT-BigCode, GPT-Neo, MPT, BioGPT, CTRL, OpenAI-GPT,
Zamba, Zamba2, ModernBERT-decoder).
"""
import inspect

import torch
from torch import nn

from rmkernels.ops.pooling import last_token_reward

LAST_TOKEN_RULES = ("pad_id", "attention_mask")
_PAIRWISE_KEYS = ("margin", "label_smoothing", "center_coef", "weights", "reduction")


# Decoder *ForSequenceClassification classes of transformers 5.24 not built on
# GenericForSequenceClassification that pool the same way (the rightmost non-pad token):
# model_type -> the attribute holding the nn.Linear head. ModernBERT-decoder runs
# ``drop(head(h))`` (a per-token MLP) before its classifier: ``_PRE_HEAD``.
_OWN_CLASS_HEADS = {"biogpt": "score", "bloom": "score", "ctrl": "classifier", "falcon": "score",
                    "gpt_bigcode": "score", "gpt_neo": "score", "gpt_neox": "score", "modernbert-decoder": "classifier",
                    "mpt": "score", "openai-gpt": "score", "opt": "score", "zamba": "score", "zamba2": "score"}
_PRE_HEAD = {"modernbert-decoder": lambda model, h: model.drop(model.head(h))}
_NO_CACHE_OUTPUT = ("ctrl", "openai-gpt")  # return SequenceClassifierOutput (no cache field)


def _supported_classes():
    from transformers.modeling_layers import GenericForSequenceClassification
    from transformers.models.gpt2.modeling_gpt2 import GPT2ForSequenceClassification

    return GenericForSequenceClassification, GPT2ForSequenceClassification


def _head_name(model):
    """The attribute name of ``model``'s linear head, or None if the class is not supported."""
    if isinstance(model, _supported_classes()):
        return "score"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _OWN_CLASS_HEADS:
        return None
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    cls = getattr(transformers, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type, ""), None)
    return _OWN_CLASS_HEADS[model_type] if cls is not None and isinstance(model, cls) else None


def head_linear(head):
    """The ``nn.Linear`` that the head module ``head`` applies, or None: the head itself, or, for
    PEFT's ``ModulesToSaveWrapper`` (a ``task_type="SEQ_CLS"`` adapter trains a copy of the
    head: TRL's RewardTrainer with ``peft_config``), the copy its forward applies now: the first
    active adapter's, or the original head when adapters are disabled or an active one has no
    copy."""
    if isinstance(head, nn.Linear):
        return head
    copies, original = getattr(head, "modules_to_save", None), getattr(head, "original_module", None)
    if not isinstance(copies, nn.ModuleDict) or not isinstance(original, nn.Module):
        return None
    active = list(getattr(head, "active_adapters", None) or [])
    use_copy = not getattr(head, "disable_adapters", False) and active and all(a in copies for a in active)
    lin = copies[active[0]] if use_copy else original
    return lin if isinstance(lin, nn.Linear) else None


def _base_accepts(cls):
    """The keyword names the backbone's forward takes (None: any, it has ``**kwargs``)."""
    params = inspect.signature(cls.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def _options(model, last_token, backend, head):
    """What the patched forward reads on each call: the patch's options, the model's forward
    signature and the keyword names its backbone takes, computed here once (not in the forward,
    which ``torch.compile`` traces: no cache for dynamo to see through and warn about)."""
    return {"last_token": last_token, "backend": backend, "head": head,
            "signature": inspect.signature(type(model).forward), "base_accepts": _base_accepts(type(model.base_model))}


def is_patched(model):
    return "_rmk_options" in model.__dict__


def patch_hf_reward_model(model, *, last_token="pad_id", backend=None):
    """Make ``model`` (an HF ``*ForSequenceClassification`` instance) apply its ``score``
    head at the last token only, through ``rmk.last_token_reward``. Returns the model.

    Args:
        model: a decoder ``*ForSequenceClassification`` of transformers (every
            ``GenericForSequenceClassification`` subclass -- Llama, Qwen2, Mistral, ... --,
            GPT-2, and the 13 own-class decoders listed in the module docstring), whose head
            (``score``, or ``classifier``) is an ``nn.Linear``, or PEFT's
            ``ModulesToSaveWrapper`` of one (a ``SEQ_CLS`` LoRA / adapter model: the copy the
            wrapper applies, :func:`head_linear`; patch ``peft_model.get_base_model()``).
        last_token: ``"pad_id"`` (default) reproduces HF exactly: the rightmost token that is
            not ``config.pad_token_id``; a row of pads only picks position 0; with no pad id
            (batch size 1 only) or with ``inputs_embeds`` the last position. ``"attention_mask"``
            picks the rightmost position whose ``attention_mask`` is non-zero instead, which is
            right when pad == eos (HF's rule then skips a trailing eos); without a mask it
            falls back to the HF rule. A row whose mask is all zero is then a ``ValueError``
            naming the rows (HF's rule, which ignores the mask, gives it a value).
        backend: the rmkernels backend (None = fastest available).

    The outputs are those of the original forward (logits in the dtype ``score`` would give,
    loss with ``labels``, ``return_dict=False`` tuples, hidden states / attentions when asked)
    and so are the gradients. Patching twice is a no-op; :func:`unpatch_hf_reward_model`
    reverts it.

    Patch before anything wraps the instance's ``forward`` (accelerate's
    ``Accelerator.prepare`` with mixed precision sets an autocast wrapper there, and a
    ``transformers.Trainer`` calls it when training starts): a wrapper set on the instance calls the class's
    forward, which the patch would bypass, dropping the wrapper's autocast; such a model is
    refused (``TypeError``). Wrapping after the patch keeps both: the wrapper calls the patched
    forward. (DDP / FSDP wrap the module, not its ``forward``: either order works.)
    """
    if last_token not in LAST_TOKEN_RULES:
        raise ValueError(f"last_token must be one of {LAST_TOKEN_RULES}, got {last_token!r}")
    head = _head_name(model)
    if head is None:
        raise TypeError(f"patch_hf_reward_model supports the decoder *ForSequenceClassification models of transformers "
                        f"(GenericForSequenceClassification: Llama, Qwen2, Mistral, ...; GPT-2; "
                        f"{', '.join(sorted(_OWN_CLASS_HEADS))}), got {type(model).__name__}")
    if head_linear(getattr(model, head, None)) is None:
        raise TypeError(f"{type(model).__name__}.{head} must be an nn.Linear (or PEFT's ModulesToSaveWrapper of "
                        f"one), got {type(getattr(model, head, None))}")
    ours = model.__dict__.get("_rmk_forward")
    own = model.__dict__.get("forward")
    if ours is None and own is not None:
        what = getattr(getattr(own, "__func__", own), "__qualname__", type(own).__name__)
        raise TypeError(f"patch_hf_reward_model: this {type(model).__name__}'s forward is already replaced on the "
                        f"instance (by {what}; accelerate's Accelerator.prepare with mixed precision sets its autocast "
                        f"wrapper there), which calls the class's forward: the patch would bypass it and its autocast. "
                        f"Patch the model before wrapping it (before Accelerator.prepare, which a Trainer calls when "
                        f"training starts)")
    model._rmk_options = _options(model, last_token, backend, head)
    if ours is None:
        ours = model._rmk_forward = PatchedForward(model)
    if own is None:  # a first patch, or again after an unpatch that removed it
        model.forward = ours
    return model


def unpatch_hf_reward_model(model):
    """Undo :func:`patch_hf_reward_model` (a no-op on a model that is not patched). A wrapper set
    on the instance's ``forward`` after the patch (accelerate's autocast wrapper) stays: the
    patched forward it calls runs the class's forward from then on."""
    if not is_patched(model):
        return model
    del model.__dict__["_rmk_options"]
    if model.__dict__.get("forward") is model.__dict__["_rmk_forward"]:
        del model.__dict__["forward"], model.__dict__["_rmk_forward"]
    return model


def hf_last_token_index(input_ids, pad_token_id, batch_size, seq_len, device):
    """Index of the token HF ``*ForSequenceClassification`` pools, int64 ``[B]``: the
    rightmost non-pad token (0 for a row of pads only), or the last position when there is
    no pad id or no ``input_ids``."""
    if pad_token_id is None or input_ids is None:
        return torch.full((batch_size,), seq_len - 1, dtype=torch.int64, device=device)
    non_pad = (input_ids != pad_token_id).to(device)
    pos = torch.arange(input_ids.shape[-1], device=device, dtype=torch.int64)
    return (pos * non_pad).amax(-1)


def _bind(model, args, kwargs):
    signature = model._rmk_options["signature"]
    bound = signature.bind(model, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop("self", None)
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(p.name, {}))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL and named.get(p.name):
            raise TypeError(f"{type(model).__name__}.forward got unexpected positional arguments")
    return named


def _logits_dtype(hidden, weight):
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


class PatchedForward:
    """``model.forward`` after :func:`patch_hf_reward_model`: calls the patched forward with
    ``model`` (``__self__``, as a bound method's). Unlike a bound method of a function the
    model's class does not have, it pickles (as a reference to its model: ``pickle``,
    ``torch.save`` of the whole model, ``copy.deepcopy``, multiprocessing), so a patched model
    round-trips patched."""

    def __init__(self, model):
        self.__self__ = model

    def __call__(self, *args, **kwargs):
        model = self.__self__
        if not is_patched(model):  # unpatched while a wrapper set after the patch still calls this
            return type(model).forward(model, *args, **kwargs)
        return _patched_forward(model, *args, **kwargs)

    def __reduce__(self):
        return PatchedForward, (self.__self__,)

    def __repr__(self):
        return f"<rmkernels patched forward of {type(self.__self__).__name__}>"


def _patched_forward(self, *args, **kwargs):
    from transformers.modeling_outputs import (
        SequenceClassifierOutput,
        SequenceClassifierOutputWithPast,
    )

    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    pairwise = kwargs.pop("pairwise_loss", None)
    named = _bind(self, args, kwargs)
    labels = named.pop("labels", None)
    if pairwise is not None and labels is not None:
        raise ValueError("pairwise_loss and labels cannot be given together")
    opts = self._rmk_options

    base = self.base_model
    accepts = opts["base_accepts"]
    if accepts is not None:  # the own-class models' forwards take a few arguments their backbone does not
        named = {k: v for k, v in named.items() if k in accepts}
    if accepts is None or "return_dict" in accepts:
        # the backbone's outputs by name (hidden states, attentions, cache), whatever config.return_dict says
        named["return_dict"] = True
    outputs = base(**named)
    hidden = outputs[0]
    input_ids, inputs_embeds = named.get("input_ids"), named.get("inputs_embeds")
    batch_size, seq_len = hidden.shape[:2]
    pad_id = self.config.get_text_config().pad_token_id
    # HF's own checks and rule (transformers' GenericForSequenceClassification.forward).
    if pad_id is None and batch_size != 1:
        raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
    if pad_id is not None and input_ids is None and inputs_embeds is not None:
        # HF's warning, through the logger HF sends it from (that of the module defining the class's
        # forward; transformers' verbosity controls it; once per message, i.e. per class: warning_once)
        from transformers.utils import logging as hf_logging

        module = getattr(type(self).forward, "__module__", None) or ""
        hf_logging.get_logger(module if module.startswith("transformers.") else "transformers.modeling_layers") \
            .warning_once(f"{type(self).__name__} will not detect padding tokens in `inputs_embeds`. Results may be "
                          "unexpected if using padding tokens in conjunction with `inputs_embeds.`")
    mask = named.get("attention_mask")
    pool = {}
    if opts["last_token"] == "attention_mask" and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        pool["attention_mask"] = mask[:, -seq_len:].to(hidden.device)
    else:
        pool["lengths"] = hf_last_token_index(input_ids, pad_id, batch_size, seq_len, hidden.device) + 1

    head = head_linear(getattr(self, opts["head"]))
    if head is None:
        raise TypeError(f"{type(self).__name__}.{opts['head']} is no longer an nn.Linear (or PEFT's "
                        f"ModulesToSaveWrapper of one): got {type(getattr(self, opts['head']))}")
    pre_head = _PRE_HEAD.get(getattr(self.config, "model_type", None))
    if pre_head is not None:
        # a per-token MLP before the linear head: pick the rows first, run it on B rows only
        from rmkernels.ops.pooling import last_token_index

        idx = last_token_index(**pool, backend=opts["backend"])
        hidden = pre_head(self, hidden[torch.arange(batch_size, device=hidden.device), idx]).unsqueeze(1)
        pool = {"lengths": torch.ones(batch_size, dtype=torch.int64, device=hidden.device)}
    weight, bias = head.weight, head.bias
    if pairwise is not None:
        from rmkernels import (
            pairwise_reward_loss,  # the fused Bradley-Terry op (docs/ops.md section 2)
        )

        unknown = set(pairwise) - set(_PAIRWISE_KEYS)
        if unknown:
            raise ValueError(f"pairwise_loss: unknown keys {sorted(unknown)} (allowed: {list(_PAIRWISE_KEYS)})")
        if batch_size % 2:
            raise ValueError(f"pairwise_loss needs an even batch (B chosen rows then B rejected rows), got "
                             f"{batch_size} rows")
        loss, chosen, rejected = pairwise_reward_loss(hidden, weight, bias, backend=opts["backend"], **pool,
                                                      **{k: v for k, v in pairwise.items() if v is not None})
        logits = torch.cat([chosen[:, None], rejected[:, None]])  # [2B, 1], not a view (FSDP2 warns on views)
    else:
        logits = last_token_reward(hidden, weight, bias, backend=opts["backend"], **pool)
        logits = logits.to(_logits_dtype(hidden, weight))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)

    # the backbone's cache under its current name (``cache=``): ``past_key_values=`` is deprecated in
    # transformers 5 and warns on every call; ``.get`` reads the outputs without the deprecated alias
    get = outputs.get if hasattr(outputs, "get") else (lambda key: None)
    fields = {"loss": loss, "logits": logits, "hidden_states": get("hidden_states"), "attentions": get("attentions")}
    if getattr(self.config, "model_type", None) in _NO_CACHE_OUTPUT:
        out = SequenceClassifierOutput(**fields)
    else:
        cache_key = "cache" if "cache" in SequenceClassifierOutputWithPast.__dataclass_fields__ else "past_key_values"
        out = SequenceClassifierOutputWithPast(**fields, **{cache_key: get(cache_key)})
    return out if return_dict else out.to_tuple()
