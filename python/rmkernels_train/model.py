"""Reward models: the built-in tiny Llama, loading a local HF checkpoint, and the forward
that goes through the fused ops.

Every reward model here is an HF ``*ForSequenceClassification`` model (``num_labels=1``)
patched with ``rmk.patch_hf_reward_model``: its ``score`` head runs at the last token only,
and ``model(input_ids=..., attention_mask=..., pairwise_loss={...})`` returns the fused
``rmk.pairwise_reward_loss`` of a TRL-layout batch. The saved checkpoint is a plain HF one
(``AutoModelForSequenceClassification.from_pretrained`` loads it).
"""
import os

import torch

import rmkernels as rmk
from rmkernels_train.tokenizer import check_chat_template
from rmkernels_train.utils import TrainingError, one_line

# The built-in default: a Llama-style model, random init, small enough for a 2-core CPU.
# What every from_pretrained of a model here passes: no Hub kernels. transformers 5.25 swaps layers
# for kernels from the Hugging Face Hub by default whenever the `kernels` package is installed (a
# dependency of it from that version): code fetched at run time, other arithmetic than the model's
# own, and on a GPU-less process with a stand-in device a crash in its capability query. These runs
# load local checkpoints and compute with the model's layers and rmkernels' ops only.
FROM_PRETRAINED = {"use_kernels": False}
DEFAULT_SIZE = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}


def tiny_llama_config(tokenizer, *, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=128):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_attention_heads, max_position_embeddings=max_position_embeddings,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, num_labels=1, tie_word_embeddings=False)


def build_tiny_reward_model(tokenizer, **size):
    """A random-init ``LlamaForSequenceClassification`` over ``tokenizer``'s vocabulary
    (initialised from the current torch RNG: seed first)."""
    from transformers import LlamaForSequenceClassification

    cfg = tiny_llama_config(tokenizer, **{**DEFAULT_SIZE, **size})
    return LlamaForSequenceClassification(cfg)


# The files a saved HF tokenizer consists of (any one suffices for AutoTokenizer to try).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")


def load_tokenizer(path):
    """The tokenizer saved in the directory ``path``; a directory without one (a training run's
    output directory, say) or one transformers cannot read is a :class:`TrainingError` naming
    it."""
    from transformers import AutoTokenizer

    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        from rmkernels_train.trainer import list_checkpoints

        ckpts = list_checkpoints(path)[0]
        hint = (f": it looks like a training output directory; pass one of its checkpoints, such as "
                f"{ckpts[-1][1]}" if ckpts else "")
        raise TrainingError(f"cannot load a tokenizer from {path}: it has none of the tokenizer files "
                            f"({', '.join(TOKENIZER_FILES[:2])}, ...){hint}")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types (OSError, ValueError, ...); their lines joined
        raise TrainingError(f"cannot load a tokenizer from {path}: {one_line(e)}") from None
    check_chat_template(tok, path)  # a template that does not parse: one line naming its file
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TrainingError(f"the tokenizer in {path} has neither a pad nor an eos token; add a pad token")
        # pad == eos: data.tokenize_pairs drops a trailing eos, so that the trainer pools where HF's
        # *ForSequenceClassification does (the last token that is not the pad token)
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def max_positions(path):
    """The longest sequence the HF model in ``path`` takes (``max_position_embeddings`` or
    its other names in the config), or None when the config does not say."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception:  # load_reward_model reports a bad config with its own message
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def checkpoint_config(path, what):
    """The config of the local HF checkpoint directory ``path`` (``what`` names it in the
    errors: not a directory, a config.json that does not read)."""
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise TrainingError(f"{what} {path}: not a directory (give a local HF checkpoint directory)")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 (transformers raises many types)
        raise TrainingError(f"{what} {path}: cannot read its config.json: {one_line(e)}") from None


# The weight files transformers' from_pretrained reads from a local directory (one file, or an
# index of shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_causal_lm_dir(path, what="--policy"):
    """What can be known of a causal-LM checkpoint directory without loading it: a readable
    config.json of an architecture transformers has a causal LM for, and a weight file. Run with
    the argument checks, so that a wrong --policy stops the run before the default reward model
    is trained (minutes); the load itself (``load_policy``) still checks the weights."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = checkpoint_config(path, what)
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TrainingError(f"{what} {path}: transformers has no causal LM for its model_type {cfg.model_type!r}")
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise TrainingError(f"{what} {path}: no weights in it (none of {', '.join(WEIGHT_FILES)})")
    return cfg


def reward_config(path, *, what="--model"):
    """``(config, kwargs)`` of the HF checkpoint directory ``path`` as a reward model: a
    ``*ForSequenceClassification`` checkpoint as is (it must have one label), another one
    (a causal LM) with ``num_labels=1`` in ``kwargs`` (its ``score`` head is new).
    ``what`` names the directory in error messages."""
    cfg = checkpoint_config(path, what)
    archs = getattr(cfg, "architectures", None) or []
    is_seq_cls = any(a.endswith("ForSequenceClassification") for a in archs)
    if is_seq_cls and cfg.num_labels != 1:
        raise TrainingError(f"{what} {path}: a reward model has one output, this checkpoint has num_labels="
                            f"{cfg.num_labels}")
    return cfg, ({} if is_seq_cls else {"num_labels": 1})


def load_reward_model(path, *, dtype=torch.float32, what="--model", use_safetensors=None, trained=False):
    """An HF checkpoint directory as a reward model: a ``*ForSequenceClassification``
    checkpoint loads as is (it must have one label); a causal-LM checkpoint gets a new,
    randomly initialised ``score`` head (transformers says which weights are new). The
    weights are loaded in float32 (the optimizer's master copy; ``--bf16`` is autocast).
    ``what`` names the directory in error messages (``--model``, ``checkpoint``, ...);
    ``use_safetensors=True`` loads ``model.safetensors`` only. (``--fsdp`` builds the model
    on the meta device and loads it shard by shard instead: :func:`reward_model_from_config`
    and :mod:`rmkernels_train.fsdp`.) ``trained=True`` (a reward model to score with, not to
    train): the checkpoint must hold every weight, the ``score`` head too; a causal LM, or
    any checkpoint whose weights would be initialised randomly, is refused."""
    from transformers import AutoModelForSequenceClassification

    _, kwargs = reward_config(path, what=what)
    if trained and kwargs.get("num_labels") == 1:
        raise TrainingError(f"{what} {path}: not a trained reward model (a *ForSequenceClassification "
                            f"checkpoint); it would get a randomly initialised score head (train one with "
                            f"`rmkernels-train reward --model {path}`)")
    if use_safetensors is not None:
        kwargs["use_safetensors"] = use_safetensors
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                                         **kwargs, **FROM_PRETRAINED)
    except Exception as e:
        raise TrainingError(f"{what} {path}: cannot load it as a sequence-classification model: "
                            f"{one_line(e)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if trained and missing:
        raise TrainingError(f"{what} {path}: not a trained reward model: the checkpoint lacks {len(missing)} "
                            f"weight(s), which would be initialised randomly ({', '.join(missing[:3])})")
    body = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if body:  # only the new score head may be missing (a causal LM's checkpoint)
        raise TrainingError(f"{what} {path}: the checkpoint lacks {len(body)} weight(s) of the model besides its "
                            f"score head, which would be initialised randomly ({', '.join(body[:3])})")
    return model


# The sequence-classification heads' parameter names in transformers (``score`` of the decoder
# models, ``classifier`` of the encoders): what a causal LM's checkpoint lacks as a reward model.
HEAD_PREFIXES = ("score.", "classifier.")


def vocab_rows(model):
    """The number of token embeddings of ``model`` (None when it has no embedding table)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    return n if isinstance(n, int) else None


def check_vocab(model, tokenizer, what, path):
    """The model's token embeddings must cover ``tokenizer`` (every id it makes indexes a row):
    refused otherwise with one line naming ``what`` (the option), ``path`` and both sizes."""
    n = vocab_rows(model)
    size = len(tokenizer)
    if n is not None and n < size:
        raise TrainingError(f"{what} {path}: its vocabulary ({n} token embeddings) is smaller than the tokenizer's "
                            f"({size} tokens): token ids {n} to {size - 1} would index past its embedding")


def reward_model_from_config(path, *, dtype=torch.float32, what="--model"):
    """The architecture of :func:`load_reward_model`'s model, without its weights (randomly
    initialised by the constructor; under :func:`rmkernels_train.fsdp.params_on_meta`, on
    the meta device)."""
    from transformers import AutoModelForSequenceClassification

    cfg, kwargs = reward_config(path, what=what)
    for k, v in kwargs.items():
        setattr(cfg, k, v)
    try:
        return AutoModelForSequenceClassification.from_config(cfg, dtype=dtype)
    except Exception as e:
        raise TrainingError(f"{what} {path}: cannot build it as a sequence-classification model: "
                            f"{one_line(e)}") from None


def prepare_reward_model(model, tokenizer, *, backend=None):
    """Set the pad id the HF head needs and patch the model to pool with the attention mask
    through the rmkernels ops. Returns the model."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    try:
        rmk.patch_hf_reward_model(model, last_token="attention_mask", backend=backend)
    except TypeError as e:
        raise TrainingError(f"this model cannot be used: {e}") from None
    return model


def pairwise_forward(model, batch, *, label_smoothing=0.0, center_coef=0.0, device=None):
    """Run a TRL-layout batch (from :func:`rmkernels_train.data.collate`) through a prepared
    reward model (or its DDP wrapper). Returns ``(loss, chosen_rewards, rejected_rewards)``."""
    device = device or next(model.parameters()).device
    margin = batch.get("margin")
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
                pairwise_loss={"margin": margin.to(device) if margin is not None else None,
                               "label_smoothing": label_smoothing, "center_coef": center_coef})
    rewards = out.logits.squeeze(-1)
    B = rewards.shape[0] // 2
    return out.loss, rewards[:B], rewards[B:]
