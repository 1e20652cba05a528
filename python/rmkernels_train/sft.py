"""A short supervised warm start of the tiny policy on correct answers of the built-in task.

RL needs a policy that sometimes solves the task: from a random init, sampled responses are
almost never right and the reward model is asked to score strings it never saw. The warm
start trains a tiny Llama (``policy_config``) with next-token cross-entropy on the response
tokens (the sorted digits and the EOS) of the reward model's *training* prompts, for a few
steps only: it stops while the policy is still mediocre (about a third of the held-out
prompts solved greedily), so that RL has something to improve.

The result is cached in ``<output-dir>/warm_start/`` (an HF checkpoint with the tokenizer and
``warm_start.json``, which records the settings): a later run with the same settings loads
it (safetensors only) instead of training again; a damaged cache is logged and trained again.
"""
import json
import os
import random
import time

import torch
import torch.nn.functional as F

from rmkernels_train import model as M
from rmkernels_train import trainer as T
from rmkernels_train.trainer import atomic_dir
from rmkernels_train.utils import TrainingError, one_line

# The warm start of the default run (issue 17's measured recipe).
DEFAULTS = {"steps": 100, "batch_size": 32, "lr": 1e-3, "layers": 2, "hidden": 64, "seed": 0}


# Attention heads of the built-in policy (both paths, warm start or not): --policy-hidden must
# be a multiple of twice it, each head of an even size for the rotary embedding (ppo.check_args).
POLICY_HEADS = 4


def build_policy(tokenizer, *, layers, hidden):
    """A random-init tiny ``LlamaForCausalLM`` over ``tokenizer`` (seed the torch RNG first)."""
    from transformers import LlamaForCausalLM

    from rmkernels_train.model import tiny_llama_config

    cfg = tiny_llama_config(tokenizer, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=POLICY_HEADS,
                            intermediate_size=2 * hidden)
    return LlamaForCausalLM(cfg)


def _batch(prompts, tokenizer, task_answer):
    """Right-padded ``<bos> prompt answer <eos>`` sequences and a loss mask on answer + eos."""
    seqs, starts = [], []
    for p in prompts:
        head = [tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"]
        tail = tokenizer(task_answer(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(head + tail)
        starts.append(len(head))
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        loss_mask[i, st:len(s)] = True
    return ids, attn, loss_mask


def train_warm_start(tokenizer, prompts, *, steps, batch_size, lr, layers, hidden, seed, device="cpu", log=None):
    """Train the warm-start policy; returns ``(policy, seconds)``."""
    from rmkernels_train.task import answer

    torch.manual_seed(seed)
    policy = build_policy(tokenizer, layers=layers, hidden=hidden).to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    rng = random.Random(seed)
    t0 = time.time()
    policy.train()
    for step in range(steps):
        ids, attn, lmask = _batch(rng.sample(prompts, batch_size), tokenizer, answer)
        ids, attn, lmask = ids.to(device), attn.to(device), lmask.to(device)
        logits = policy(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        target = ids[:, 1:]
        m = lmask[:, 1:]
        loss = F.cross_entropy(logits[m].float(), target[m])
        if not torch.isfinite(loss):
            raise TrainingError(f"warm start: the loss is {loss.item()} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if log is not None and (step + 1) % 50 == 0:
            log(f"warm start step {step + 1}/{steps}: loss {loss.item():.4f}")
    policy.eval()
    return policy, time.time() - t0


def read_cache_meta(out_dir):
    """``(meta, None)``: the ``warm_start.json`` object of the cache in ``<out_dir>/warm_start``;
    ``(None, why)`` when it is damaged; ``(None, None)`` when there is no cache."""
    path = os.path.join(out_dir, "warm_start", "warm_start.json")
    if not os.path.lexists(os.path.join(out_dir, "warm_start")):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None, "warm_start.json is missing"
    except (OSError, ValueError, RecursionError) as e:
        return None, f"warm_start.json is not readable JSON ({type(e).__name__})"
    if not isinstance(meta, dict):
        return None, "warm_start.json is not a JSON object"
    return meta, None


def warm_start(out_dir, tokenizer, prompts, settings, *, device="cpu", log=None):
    """The warm-start policy of ``settings`` (keys of :data:`DEFAULTS`), loaded from
    ``<out_dir>/warm_start`` when it was trained there with the same settings, else trained
    and saved there. Returns ``(policy, info)``; ``info`` is the recorded ``warm_start.json``
    plus ``"cached": bool``."""
    from transformers import LlamaForCausalLM

    path = os.path.join(out_dir, "warm_start")
    settings = {k: settings[k] for k in DEFAULTS}
    meta, why = read_cache_meta(out_dir)
    if meta is not None:
        if meta.get("settings") == settings and meta.get("vocab_size") == len(tokenizer):
            try:  # safetensors only: nothing in an output directory can run code
                policy = LlamaForCausalLM.from_pretrained(path, use_safetensors=True, **M.FROM_PRETRAINED).to(device)
                # from_pretrained initialises a missing weight randomly and goes on; NaN weights load
                T.check_safetensors_fit(policy, os.path.join(path, "model.safetensors"))
                T.check_finite_parameters(policy, "model.safetensors")
            except T.CheckpointError as e:
                why = f"its model is damaged ({e})"
            except Exception as e:  # noqa: BLE001 (a truncated or missing file: SafetensorError, OSError, ...)
                why = f"its model cannot be loaded ({type(e).__name__}: {one_line(e, 160)})"
            else:
                policy.eval()
                return policy, {**meta, "cached": True}
        else:
            why = f"it was trained with other settings ({meta.get('settings')})"
    if why is not None and log is not None:
        log(f"{path}: {why}: training it again")
    if log is not None:
        log(f"warm start: {settings['steps']} supervised steps of {settings['batch_size']} correct answers "
            f"(a {settings['layers']}-layer, hidden-{settings['hidden']} Llama) into {path}")
    policy, seconds = train_warm_start(tokenizer, prompts, device=device, log=log, **settings)
    meta = {"settings": settings, "vocab_size": len(tokenizer), "train_time_s": round(seconds, 2)}
    with atomic_dir(path) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "warm_start.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return policy, {**meta, "cached": False}
