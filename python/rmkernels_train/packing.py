"""``--packing``: padding-free reward-model batches.

A micro-batch of B preference pairs becomes one row of N = sum of the 2B sequence lengths
tokens (chosen sequences first, then the rejected ones: the layout
``rmk.pairwise_reward_loss`` expects), with no pad token anywhere:

- ``cu_seqlens`` ``[2B + 1]`` (int32) marks where each sequence starts and ends;
- ``position_ids`` restart at 0 at each sequence (RoPE / learned positions see exactly what
  a padded batch gives them);
- attention never crosses a sequence boundary. With flash-attention installed and the model
  loaded with ``attn_implementation="flash_attention_2"`` (GPU), the varlen kernel gets the
  ``cu_seqlens`` directly. Everywhere else the attention implementation
  :data:`ATTN_IMPLEMENTATION` registered here runs torch's scaled-dot-product attention once
  per sequence (causal, its own keys only): exact, and it costs sum(L_i^2) rather than the
  padded batch's 2B * max(L)^2 or a block-diagonal mask's N^2.

The decoder's last hidden states ``[N, H]`` then go through
``rmk.pairwise_reward_loss(..., cu_seqlens=...)``: the ``score`` head runs on the 2B last
tokens only, and the Bradley-Terry loss in the same op. All of it happens inside the root
module's forward (:func:`enable_packing` installs it), so DDP and FSDP hooks see one forward.
"""
import itertools

import torch

ATTN_IMPLEMENTATION = "rmk_packed_sdpa"
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def pack(pairs):
    """A micro-batch of tokenized pairs (``chosen_ids``, ``rejected_ids``, ``margin``) as one
    padding-free row: ``input_ids`` / ``position_ids`` ``[1, N]`` int64, ``cu_seqlens``
    ``[2B + 1]`` int32, ``max_seqlen`` (int), ``margin`` ``[B]`` float32 or None, and
    ``tokens`` = N."""
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    if not len(seqs) or int(lengths.min()) < 1:
        raise ValueError("pack: every sequence needs at least one token")
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=cu[1:])
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    # position of each token in its own sequence: global index - start of its sequence
    starts = torch.repeat_interleave(cu[:-1], lengths)
    pos = torch.arange(int(cu[-1]), dtype=torch.int64) - starts
    margin = None
    if pairs[0]["margin"] is not None:
        margin = torch.tensor([p["margin"] for p in pairs], dtype=torch.float32)
    return {"input_ids": ids[None], "position_ids": pos[None], "cu_seqlens": cu.to(torch.int32),
            "max_seqlen": int(lengths.max()), "margin": margin, "tokens": int(cu[-1])}


def _packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of a packed row, one sequence at a time (query/key/value ``[1, heads, N, d]``):
    each sequence attends causally to its own tokens only. Needs the ``cu_seq_lens_q`` the
    packed forward passes; any other call is refused (no silent unmasked fallback)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    if cu is None or query.shape[0] != 1:
        raise RuntimeError(f"attention implementation {ATTN_IMPLEMENTATION!r} runs packed rows only (the "
                           f"--packing forward); this call has no cu_seq_lens_q or a batch of {query.shape[0]}")
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"):
        kwargs.pop(k, None)
    bounds = cu.tolist()
    outs = []
    for s, e in itertools.pairwise(bounds):
        o, _ = sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                      dropout=dropout, scaling=scaling, is_causal=True, **kwargs)
        outs.append(o)  # [1, L, heads, d]
    return torch.cat(outs, dim=1), None


def _register():
    from transformers import AttentionInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, _packed_sdpa)


def uses_flash(model):
    return getattr(model.config, "_attn_implementation", None) in FLASH_IMPLEMENTATIONS


def flash_available(device, bf16):
    """Whether --packing can use flash-attention's varlen kernel: a CUDA device, bf16 compute
    (flash-attention has no float32 kernel) and the ``flash_attn`` package installed."""
    import importlib.util

    return device.type == "cuda" and bf16 and importlib.util.find_spec("flash_attn") is not None


def enable_packing(model, *, flash=False):
    """Give a model prepared by :func:`rmkernels_train.model.prepare_reward_model` (patched with
    ``rmk.patch_hf_reward_model``) a packed forward: ``model(input_ids=[1, N],
    position_ids=[1, N], cu_seqlens=[2B + 1], max_seqlen=L, pairwise_loss={...})`` returns the
    fused loss and the 2B rewards as ``logits`` ``[2B, 1]``. ``flash=True`` switches the model
    to ``flash_attention_2`` (see :func:`flash_available`); otherwise, unless it already runs
    flash-attention, its attention implementation becomes :data:`ATTN_IMPLEMENTATION` (all its
    forwards must then be packed ones). Returns the model."""
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    import rmkernels as rmk

    if getattr(model, "_rmk_packed", False):
        return model
    if flash and not uses_flash(model):
        model.set_attn_implementation("flash_attention_2")
    if not uses_flash(model):
        _register()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    patched = model.forward  # rmk.patch_hf_reward_model's forward (kept for non-packed calls)
    backend = model._rmk_options["backend"]

    def forward(*args, cu_seqlens=None, max_seqlen=None, **kwargs):
        if cu_seqlens is None:
            return patched(*args, **kwargs)
        pairwise = kwargs.pop("pairwise_loss", None) or {}
        input_ids, position_ids = kwargs.pop("input_ids"), kwargs.pop("position_ids")
        kwargs.pop("use_cache", None)
        if kwargs or args:
            raise TypeError(f"the packed forward takes input_ids, position_ids, cu_seqlens, max_seqlen and "
                            f"pairwise_loss only, got {sorted(kwargs)}")
        cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
        max_len = int(max_seqlen) if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
        hidden = model.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                                  use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len,
                                  max_length_k=max_len).last_hidden_state[0]
        loss, chosen, rejected = rmk.pairwise_reward_loss(hidden, model.score.weight, model.score.bias,
                                                          cu_seqlens=cu, backend=backend,
                                                          **{k: v for k, v in pairwise.items() if v is not None})
        # logits [2B, 1] made by cat, not a view (FSDP2 warns when a module returns a view)
        return SequenceClassifierOutputWithPast(loss=loss, logits=torch.cat([chosen[:, None], rejected[:, None]]))

    model.forward = forward
    model._rmk_packed = True
    return model


def packed_forward(model, batch, *, label_smoothing=0.0, center_coef=0.0, device=None):
    """:func:`rmkernels_train.model.pairwise_forward` for a :func:`pack` batch through a model
    (or its DDP / FSDP wrapper) after :func:`enable_packing`. Returns ``(loss, chosen_rewards,
    rejected_rewards)``."""
    device = device or next(model.parameters()).device
    margin = batch["margin"]
    out = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                cu_seqlens=batch["cu_seqlens"].to(device), max_seqlen=batch["max_seqlen"],
                pairwise_loss={"margin": margin.to(device) if margin is not None else None,
                               "label_smoothing": label_smoothing, "center_coef": center_coef})
    rewards = out.logits.squeeze(-1)
    B = rewards.shape[0] // 2
    return out.loss, rewards[:B], rewards[B:]
