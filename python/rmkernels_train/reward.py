"""``rmkernels-train reward``: train a reward model with the fused Bradley-Terry op.

    rmkernels-train reward                                 # built-in default, no network
    rmkernels-train reward --model DIR --data train.jsonl --eval-data test.jsonl --bf16
    torchrun --nproc_per_node 2 -m rmkernels_train reward  # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node 8 -m rmkernels_train reward --model DIR --fsdp --packing --bf16

The model is an HF ``*ForSequenceClassification`` (``num_labels=1``) patched with
``rmk.patch_hf_reward_model``; each batch (rows ``0..B-1`` chosen, ``B..2B-1`` rejected)
goes through ``rmk.pairwise_reward_loss``: the ``score`` head at each sequence's last token
and the Bradley-Terry loss in one op. Per step the progress bar and ``metrics.jsonl`` get
the loss, the pairwise accuracy (chosen reward > rejected reward) and the mean reward margin
(chosen - rejected); so does every evaluation on the held-out pairs. Training records also
carry the step's gradient norm, learning rate and ``tokens`` (the real, non-pad tokens of the
step's pairs over all ranks); ``final.json`` has each rank's memory (``memory_per_rank``;
with ``--profile-memory N`` on the CPU also the peak of the live tensor bytes over the first N
steps, ``peak_live_tensors_MiB``: :mod:`rmkernels_train.memory`).

Output directory: ``metrics.jsonl``, ``curves.png``, ``final.json`` and
``checkpoint-<step>/`` (an HF checkpoint: ``config.json``, ``model.safetensors``, the
tokenizer; plus ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pt`` -- read back with
``weights_only=True`` -- and ``trainer_state.json``), written atomically (see
:mod:`rmkernels_train.trainer`, the skeleton this command is built on).

``--packing`` (:mod:`rmkernels_train.packing`) packs each micro-batch's sequences into one
row without pad tokens (``cu_seqlens``, position ids restarting per sequence, attention
within each sequence only); the losses are those of the padded batches. ``--fsdp``
(:mod:`rmkernels_train.fsdp`) shards the model with FSDP2 under torchrun, built on the meta
device and filled shard by shard (no rank holds the whole model); its checkpoints
hold the model and optimizer as a sharded ``torch.distributed.checkpoint`` directory
(``sharded/``) instead of ``model.safetensors`` / ``optimizer.pt``, and the last checkpoint
of each invocation also gets ``model.safetensors``, gathered on rank 0 (an HF checkpoint).
See docs/reward-training.md.
"""
import argparse
import contextlib
import json
import math
import os
import random
import time

import torch

from rmkernels_train import data as D
from rmkernels_train import fsdp as F
from rmkernels_train import model as M
from rmkernels_train import packing as P
from rmkernels_train import trainer as T
from rmkernels_train.memory import LiveTensorProfile
from rmkernels_train.tokenizer import build_char_tokenizer
from rmkernels_train.utils import (
    MetricsWriter,
    TrainingError,
    env_world_size,
    one_line,
    param_digest,
    plot_curves,
    rng_state,
    seed_everything,
    set_rng_state,
)

PROG = "rmkernels-train reward"
# Arguments that must not change on --resume: they fix which pairs each step sees.
# The model and its optimizer (--model, --fsdp, --lr, --weight-decay; the built-in model's
# --hidden-size and --layers, checked when it is the built-in one) must not change either: a new
# value would be ignored (the checkpoint's model and optimizer state win) or not fit. Nor the
# update each step makes: the loss (--label-smoothing, --center-coef), the schedule
# (--warmup-steps: the scheduler's lambda is rebuilt from it) and the clipping (--max-grad-norm):
# a resumed run is one that a single command gives. Each changed one is named
# (trainer.check_resume_args); paths compare as real paths.
RESUME_FIXED = ("data", "eval_data", "batch_size", "grad_accum", "seed", "world_size", "max_length", "model",
                "fsdp", "lr", "weight_decay", "label_smoothing", "center_coef", "warmup_steps", "max_grad_norm")
# ... and those of them that only count in some runs (checked only there, so that a checkpoint
# whose run recorded an unused default still resumes): the built-in model's sizes, the
# built-in data's size, --data's margin field and held-out share.
BUILT_IN_FIXED = ("hidden_size", "layers")
# The built-in model's defaults (the options default to None in the parser, so that "given on
# the command line" is known: with --model they are refused, not ignored).
BUILT_IN_DEFAULTS = {"hidden_size": M.DEFAULT_SIZE["hidden_size"], "layers": M.DEFAULT_SIZE["num_hidden_layers"],
                     "default_train_pairs": 16000}
# --data's defaults (None in the parser for the same reason: without --data they are refused).
DATA_DEFAULTS = {"eval_fraction": 0.05, "margin_column": "margin"}
# --max-length when not given: TRL's RewardConfig default, lowered to the model's maximum
# position count when that is smaller. One very long line must not make a batch allocate
# gigabytes: longer pairs are dropped (and counted), as TRL does.
DEFAULT_MAX_LENGTH = 1024


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description="Train a reward model with the fused Bradley-Terry op "
                                "(rmk.pairwise_reward_loss). With no options: the built-in default (generated "
                                "data, a tiny random-init Llama), no network needed.",
                                formatter_class=T.HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR", help="local HF checkpoint (causal LM or *ForSequenceClassification); "
                   "default: a random-init tiny Llama over a character tokenizer")
    g.add_argument("--data", metavar="FILE", help="preference JSONL (prompt/chosen/rejected, or TRL's "
                   "conversational format); default: the built-in 'sort the digits' pairs")
    g.add_argument("--eval-data", metavar="FILE", help="held-out preference JSONL (default: --eval-fraction of "
                   "--data, or the built-in held-out pairs)")
    g.add_argument("--eval-fraction", type=float, default=None, help="share of --data held out when there is no "
                   "--eval-data; default 0.05 (refused without --data or with --eval-data)")
    g.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                   help=f"drop pairs with a sequence longer than this, and say how many (default: "
                        f"{DEFAULT_MAX_LENGTH}, or the model's max_position_embeddings when smaller)")
    g.add_argument("--margin-column", default=None, metavar="FIELD",
                   help="JSONL field of --data with each pair's BT margin (used when present); default 'margin' "
                        "(refused without --data)")
    g.add_argument("--default-train-pairs", type=int, default=None, metavar="N",
                   help="size of the built-in training set; default 16000 (refused with --data)")
    g.add_argument("--hidden-size", type=int, default=None,
                   help=f"built-in model: hidden size, a multiple of {2 * M.DEFAULT_SIZE['num_attention_heads']}; "
                        f"default {BUILT_IN_DEFAULTS['hidden_size']} (refused with --model)")
    g.add_argument("--layers", type=int, default=None,
                   help=f"built-in model: layers; default {BUILT_IN_DEFAULTS['layers']} (refused with --model)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="preference pairs per device per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 for the built-in "
                   "model, 1e-5 with --model)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, default=30, help="linear warm-up steps (then cosine to 10%% of --lr)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping; "
                   "negative values are refused)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs")
    g.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps (overrides --epochs)")
    g = p.add_argument_group("loss (rmk.pairwise_reward_loss)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="e in -(1-e) logsig(d) - e logsig(-d)")
    g.add_argument("--center-coef", type=float, default=0.0, help="center_coef * (chosen + rejected)^2 "
                   "(TRL's center_rewards_coefficient)")
    g = p.add_argument_group("evaluation and precision")
    g.add_argument("--eval-every", type=int, default=100, metavar="N", help="optimizer steps between evaluations")
    g.add_argument("--eval-batch-size", type=int, default=100, help="held-out pairs per device per batch")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights); with --fsdp a mixed-precision "
                   "policy (bf16 compute, fp32 gradient reduction); meant for GPUs")
    g = p.add_argument_group("scale (docs/reward-training.md)")
    g.add_argument("--packing", action="store_true", help="pack each micro-batch's sequences into one row without "
                   "pad tokens (attention stays within each sequence; same losses as padded batches)")
    g.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over the "
                   "torchrun ranks (FSDP2, per decoder layer and the root); sharded checkpoints")
    g.add_argument("--profile-memory", type=int, default=None, metavar="STEPS",
                   help="CPU: count the live bytes of torch's CPU allocator from the start, record them "
                        "(torch.profiler, profile_memory) over the first STEPS steps of this invocation, and put "
                        "their peak per rank in final.json's memory_per_rank (peak_live_tensors_MiB: the CPU "
                        "analogue of a GPU's max_memory_allocated; slows those steps; for benchmarks)")
    T.add_run_args(p, output_dir="runs/reward", save_every=250)
    return p


def resolve_defaults(args):
    """Refuse the options that this run would ignore when given on the command line (the
    built-in model's with --model, the built-in data's with --data, --data's without it,
    --eval-fraction with --eval-data), then fill the options left at None that the run uses."""
    ignored = []
    if args.model is not None:
        ignored += [("hidden_size", "--model gives the model"), ("layers", "--model gives the model")]
    if args.data is not None:
        ignored.append(("default_train_pairs", "--data gives the training pairs"))
    else:
        ignored += [("eval_fraction", "it is a share of --data, and there is no --data"),
                    ("margin_column", "it names a field of --data, and there is no --data")]
    if args.eval_data is not None:
        ignored.append(("eval_fraction", "--eval-data gives the held-out pairs"))
    for name, why in ignored:
        if getattr(args, name) is not None:
            raise TrainingError(f"--{name.replace('_', '-')} would be ignored: {why}")
    if args.model is None:
        for k in ("hidden_size", "layers"):
            if getattr(args, k) is None:
                setattr(args, k, BUILT_IN_DEFAULTS[k])
    if args.data is None and args.default_train_pairs is None:
        args.default_train_pairs = BUILT_IN_DEFAULTS["default_train_pairs"]
    if args.data is not None:
        if args.margin_column is None:
            args.margin_column = DATA_DEFAULTS["margin_column"]
        if args.eval_data is None and args.eval_fraction is None:
            args.eval_fraction = DATA_DEFAULTS["eval_fraction"]


def check_args(args):
    resolve_defaults(args)
    for name in ("batch_size", "grad_accum", "eval_every", "eval_batch_size", "layers", "default_train_pairs",
                 "max_steps", "max_length", "profile_memory"):
        T.check_int(name, getattr(args, name), low=1)
    heads = M.DEFAULT_SIZE["num_attention_heads"]
    if args.hidden_size is not None and (args.hidden_size < 1 or args.hidden_size % (2 * heads)):
        raise TrainingError(f"--hidden-size must be a positive multiple of {2 * heads} (the built-in model's "
                            f"{heads} attention heads, each of an even size for the rotary embedding), got "
                            f"{args.hidden_size}")
    T.check_int("warmup_steps", args.warmup_steps, low=0)
    if not 0 <= args.label_smoothing < 0.5:  # (nan fails too)
        raise TrainingError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    T.check_finite("center_coef", args.center_coef, low=0)
    if args.lr is None:
        args.lr = 1e-3 if args.model is None else 1e-5
    T.check_finite("lr", args.lr, low=0, low_open=True)
    T.check_finite("epochs", args.epochs, low=0, low_open=True)
    T.check_finite("weight_decay", args.weight_decay, low=0)
    T.check_finite("max_grad_norm", args.max_grad_norm, low=0)  # 0: no clipping
    if args.model is not None and not os.path.isdir(args.model):
        raise TrainingError(f"--model {args.model}: not a directory (give a local HF checkpoint directory)")
    if args.eval_fraction is not None:
        T.check_finite("eval_fraction", args.eval_fraction, low=0, low_open=True, high=1, high_open=True)
    if args.fsdp and env_world_size() < 2:
        raise TrainingError("--fsdp shards the model over the ranks of a torchrun job: launch it with torchrun "
                            "--nproc_per_node N (N >= 2)")
    if args.fsdp:
        F.check_torch()


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
# What a resumed run takes of an eval row of metrics.jsonl (a row without these numbers is
# skipped by read_metrics, and the evaluation at the checkpoint's step is then made again)
EVAL_METRICS = {"eval": ("loss", "accuracy", "margin", "pairs")}


def make_optimizer(model, args):
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def write_checkpoint(tmp, model, tokenizer, optimizer, scheduler, state):
    """The files of one checkpoint, into the temporary directory ``tmp``."""
    model.save_pretrained(tmp, safe_serialization=True)
    T.fault_point("checkpoint-write")
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(rng_state(), os.path.join(tmp, "rng_state.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1)


def write_sharded_checkpoint(tmp, trainer, hf_state):
    """The rank-0 files of an --fsdp checkpoint (the shards are already in ``tmp/sharded``):
    config, tokenizer, scheduler, RNG and trainer state, and with ``hf_state`` (the gathered
    model) ``model.safetensors``."""
    if hf_state is not None:
        F.save_hf(tmp, trainer.model, hf_state)
    else:
        cfg = trainer.model.config
        archs = cfg.architectures
        cfg.architectures = [F.original_class(trainer.model).__name__]
        try:
            cfg.save_pretrained(tmp)
        finally:
            cfg.architectures = archs
    T.fault_point("checkpoint-write")
    trainer.tokenizer.save_pretrained(tmp)
    torch.save(trainer.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(rng_state(), os.path.join(tmp, "rng_state.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(trainer.run_state(), f, indent=1)


def _load_small_state(path):
    """Scheduler and RNG state of a checkpoint, checked."""
    scheduler = T.load_torch_state(os.path.join(path, "scheduler.pt"))
    if not (isinstance(scheduler, dict) and isinstance(scheduler.get("last_epoch"), int)
            and isinstance(scheduler.get("base_lrs"), list)):
        raise T.CheckpointError("scheduler.pt is not a learning-rate scheduler's state")
    rng = T.load_torch_state(os.path.join(path, "rng_state.pt"))
    try:
        random.Random().setstate(rng["python"])
        torch.Generator().set_state(rng["torch"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise T.CheckpointError(f"rng_state.pt is not a saved RNG state ({one_line(e)})") from None
    return scheduler, rng


class DamagedShards(Exception):
    """An --fsdp checkpoint whose shards, once read into the sharded model, hold non-finite
    weights (every checkpoint is written with finite ones): :meth:`RewardTrainer.setup` sets
    up again from the next older checkpoint."""


def load_sharded_checkpoint(path, args):
    """:func:`load_checkpoint` for an --fsdp checkpoint: everything but the shards is read and
    checked here (the shards are loaded into the sharded model and optimizer once they exist:
    ``model`` is the checkpoint's config, ``optimizer`` the shard directory)."""
    from transformers import AutoConfig

    state = T.read_trainer_state(path, int_keys=("epoch", "batch_in_epoch"))
    T.read_json(os.path.join(path, "config.json"))
    shards = os.path.join(path, F.DCP_DIR)
    if not os.path.isfile(os.path.join(shards, ".metadata")):
        raise T.CheckpointError(f"{F.DCP_DIR}/.metadata is missing (an incomplete sharded state)")
    try:
        F.read_sharded_metadata(shards)
    except ValueError as e:
        raise T.CheckpointError(f"{F.DCP_DIR}/.metadata: {e}") from None
    except OSError as e:
        raise T.unreadable(os.path.join(shards, ".metadata"), e) from None
    try:
        tokenizer = M.load_tokenizer(path)
        cfg = AutoConfig.from_pretrained(path)
    except (TrainingError, OSError, ValueError) as e:
        raise T.CheckpointError(one_line(e)) from None
    scheduler, rng = _load_small_state(path)
    return {"state": state, "model": cfg, "tokenizer": tokenizer, "optimizer": shards, "scheduler": scheduler,
            "rng": rng, "sharded": True}


def check_resume_options(state, args, world_size):
    """The options of the checkpoint's run against this run's (:data:`RESUME_FIXED`, and
    :data:`BUILT_IN_FIXED` with the built-in model): a changed one stops the run, named."""
    fixed = RESUME_FIXED + (BUILT_IN_FIXED if args.model is None else ())
    if args.data is None:
        fixed += ("default_train_pairs",)
    else:
        fixed += ("margin_column",) + (("eval_fraction",) if args.eval_data is None else ())
    T.check_resume_args(state["args"], args, fixed, world_size)
    T.check_resume_data(state, args)


def load_checkpoint(path, args, world_size=1):
    """Read every file a resume uses and check it; a damaged or missing one raises
    :class:`~rmkernels_train.trainer.CheckpointError`. Returns a dict: ``state`` (the trainer
    state), ``model``, ``tokenizer``, ``optimizer`` (an AdamW over the model with its saved
    state), ``scheduler`` (the scheduler's state dict) and ``rng``."""
    # the options first: a changed one (--fsdp, --hidden-size, ...) is named and stops the run,
    # never taken for damage (which would skip this checkpoint for an older one)
    check_resume_options(T.read_trainer_state(path, int_keys=("epoch", "batch_in_epoch")), args, world_size)
    if args.fsdp:
        return load_sharded_checkpoint(path, args)
    state = T.read_trainer_state(path, int_keys=("epoch", "batch_in_epoch"))
    T.read_json(os.path.join(path, "config.json"))
    T.load_safetensors(os.path.join(path, "model.safetensors"), tensors=False)  # complete? (read below)
    # every weight in the file, with its shape, and nothing else: checked on the architecture
    # (built on the meta device, no memory) before loading, which would initialise a missing
    # weight randomly and go on
    try:
        with torch.device("meta"):
            skeleton = M.reward_model_from_config(path, what="checkpoint")
    except TrainingError as e:
        raise T.CheckpointError(str(e)) from None
    T.check_safetensors_fit(skeleton, os.path.join(path, "model.safetensors"))
    del skeleton
    try:
        tokenizer = M.load_tokenizer(path)
        model = M.load_reward_model(path, what="checkpoint", use_safetensors=True)
    except TrainingError as e:
        raise T.CheckpointError(str(e)) from None
    # resuming would train from NaN (and call this checkpoint the last good one)
    T.check_finite_parameters(model, "model.safetensors")
    optimizer_state = T.load_torch_state(os.path.join(path, "optimizer.pt"))
    T.check_optimizer_state(lambda: make_optimizer(model, args), optimizer_state)
    scheduler, rng = _load_small_state(path)
    return {"state": state, "model": model, "tokenizer": tokenizer, "optimizer": optimizer_state,
            "scheduler": scheduler, "rng": rng}


# ---------------------------------------------------------------------------------------
# Data and model set-up
# ---------------------------------------------------------------------------------------
def load_records(args, log):
    """(train records, eval records, description) before tokenisation."""
    if args.data is None:
        if args.eval_data is not None:
            raise TrainingError("--eval-data needs --data (the built-in default has its own held-out pairs)")
        train, held = D.default_datasets(n_train=args.default_train_pairs)
        return train, held, (f"built-in 'sort the digits' preference pairs: {len(train)} train, "
                             f"{len(held)} held out")
    train = D.load_jsonl(args.data, args.margin_column)
    if args.eval_data is not None:
        held = D.load_jsonl(args.eval_data, args.margin_column)
        if (held[0]["margin"] is None) != (train[0]["margin"] is None):
            log(f"note: margins are used in training only when both files have the {args.margin_column!r} field")
            for r in held:
                r["margin"] = None
    else:
        order = list(range(len(train)))
        random.Random(args.seed).shuffle(order)
        n_eval = max(1, int(round(len(train) * args.eval_fraction)))
        if len(train) - n_eval < 1:
            raise TrainingError(f"{args.data}: {len(train)} pairs are too few to hold out {n_eval} for evaluation; "
                                f"give --eval-data")
        held = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in sorted(order[n_eval:])]
    return train, held, f"{args.data}: {len(train)} train pairs, {len(held)} held out"


def make_tokenizer(args, train, held):
    if args.model is not None:
        return M.load_tokenizer(args.model)
    if args.data is None:
        return build_char_tokenizer(D.SORT_ALPHABET)
    probe = build_char_tokenizer("")  # renders conversational data with the built-in chat template
    texts = [D.render(r, f, probe) for r in train + held for f in ("chosen", "rejected")]
    return build_char_tokenizer(texts)


def max_length(args, model_dir):
    """``(limit, description)``: ``--max-length``, or the default (see DEFAULT_MAX_LENGTH)."""
    if args.max_length is not None:
        return args.max_length, f"--max-length {args.max_length}"
    positions = M.max_positions(model_dir) if model_dir is not None else None
    if positions is not None and positions < DEFAULT_MAX_LENGTH:
        return positions, f"the model's max_position_embeddings ({positions}; set --max-length to change)"
    return DEFAULT_MAX_LENGTH, f"the default --max-length {DEFAULT_MAX_LENGTH}"


def tokenize(records, tokenizer, limit, limit_text, what, log):
    pairs, dropped = D.tokenize_pairs(records, tokenizer, limit)
    if dropped:
        log(f"{what}: dropped {dropped} of {len(records)} pairs with a sequence longer than {limit} tokens "
            f"({limit_text})")
    if not pairs:
        raise TrainingError(f"{what}: no pairs left (all are longer than {limit} tokens: {limit_text})")
    same = D.count_identical(pairs)
    if same:
        log(f"warning: {what}: {same} of {len(pairs)} pairs have chosen == rejected (the same tokens): they "
            f"cannot be ranked, teach nothing and count as wrong in the accuracy")
    return pairs


def lr_lambda(warmup, total):
    def f(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        frac = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))) * 0.9 + 0.1  # cosine to 10%

    return f


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
def forward_pairs(model, pairs, args, pad_id, device):
    """``(loss, chosen_rewards, rejected_rewards)`` of a micro-batch of pairs: packed with
    --packing (:mod:`rmkernels_train.packing`), else padded (TRL's layout)."""
    kw = {"label_smoothing": args.label_smoothing, "center_coef": args.center_coef, "device": device}
    if args.packing:
        return P.packed_forward(model, P.pack(pairs), **kw)
    return M.pairwise_forward(model, D.collate(pairs, pad_id), **kw)


@torch.no_grad()
def evaluate(model, pairs, args, dist, pad_id, autocast):
    """Loss, accuracy and margin over all held-out pairs (every rank takes a share). Under
    --fsdp every forward is collective: a rank without a share of the last batch runs one
    pair again and does not count it."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, correct, margin sum, n
    mine = list(D.batches(pairs, args.eval_batch_size, seed=0, epoch=0, rank=dist.rank,
                          world_size=dist.world_size, shuffle=False, drop_last=False))
    rounds = len(mine)
    if args.fsdp:
        rounds = -(-len(pairs) // (args.eval_batch_size * dist.world_size))
    for i in range(rounds):
        bt = mine[i] if i < len(mine) else None
        with autocast():
            loss, c, r = forward_pairs(model, bt or pairs[:1], args, pad_id, dist.device)
        if bt is None:
            continue
        n = len(bt)
        sums[0] += float(loss) * n
        sums[1] += float((c > r).sum())
        sums[2] += float((c - r).sum())
        sums[3] += n
    model.train(was_training)
    loss_sum, correct, margin_sum, n = dist.sum(sums)
    return {"loss": loss_sum / n, "accuracy": correct / n, "margin": margin_sum / n, "pairs": int(n)}


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
class RewardTrainer:
    """One invocation of ``rmkernels-train reward``: :meth:`setup` (resume, data, model,
    optimizer), :meth:`run` (the step loop with evaluations and checkpoints) and
    :meth:`finish` (final evaluation, checkpoint, summary)."""

    def __init__(self, args, dist, log):
        self.args, self.dist, self.log = args, dist, log
        self.out_dir = args.output_dir
        self.t_start = time.time()
        self.step = self.epoch = self.batch_in_epoch = 0
        self.elapsed_before = 0.0
        self.steps_this_run = 0
        self.last_eval_step, self.ev = None, None
        self.last_ckpt = None  # known on every rank (only rank 0 writes)
        self.metrics = None
        # rank 0's files besides checkpoints: a failed write stops every rank with one line
        self.writes = T.MainWrites(dist)
        self.bar = None
        self.start_rss = F.peak_rss_mib()  # memory_per_rank in final.json
        self.train_rss = None
        # resident memory at points of the run (memory_per_rank's rss_marks_MiB): what the model
        # build, DDP's wrapper, the first step's activations and the steps add
        self.rss_marks = {"start": F.rss_mib()}
        # --profile-memory: the live tensor bytes (rmkernels_train.memory), started in run()
        self.live = LiveTensorProfile() if args.profile_memory else None
        self.held_at_first_step = None
        if self.live is not None and dist.device.type != "cpu":
            raise TrainingError(f"--profile-memory measures CPU tensors; on {dist.device.type} final.json's "
                                f"memory_per_rank has the allocator's own peak (peak_cuda_MiB)")

    # -- set-up ---------------------------------------------------------------------------
    def setup(self):
        """Everything before the first step, in an order that keeps the random streams of
        earlier versions (the same seed trains the same model)."""
        damaged = {}
        while True:
            resumed = self.find_resume(damaged)
            seed_everything(self.args.seed)
            self.load_data(resumed, again=bool(damaged))
            self.rss_marks["data"] = F.rss_mib()
            self.build_model(resumed)
            self.rss_marks["model"] = F.rss_mib()
            try:
                self.build_optimizer(resumed)
            except DamagedShards as e:  # every rank: the check is collective
                damaged[self.last_ckpt] = str(e)  # set up again from the next older checkpoint
                continue
            break
        self.open_metrics(resumed)
        args, dist = self.args, self.dist
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {type(self.model).__name__}, {n_params / 1e6:.2f}M parameters; {self.total} optimizer "
                 f"steps of {args.batch_size * args.grad_accum * dist.world_size} pairs ({dist.world_size} rank(s), "
                 f"device {dist.device}); output in {self.out_dir}")
        # --bf16: autocast, or under --fsdp the mixed-precision policy (F.shard) instead
        self.autocast = (lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16)) \
            if args.bf16 and not args.fsdp else (lambda: torch.autocast(dist.device.type, enabled=False))

    def find_resume(self, damaged=None):
        """With --resume the newest intact checkpoint, read and checked (:func:`load_checkpoint`),
        passing over those in ``damaged`` ({path: reason}); without, None (and an output
        directory with checkpoints is refused)."""
        args, dist = self.args, self.dist
        if dist.is_main:
            T.remove_stale_checkpoint_dirs(self.out_dir, self.log)
        dist.barrier()  # a checkpoint put back by rank 0 is there before any rank looks
        resumed = None
        if args.resume:
            _, self.last_ckpt, resumed = T.find_resume_checkpoint(
                self.out_dir, lambda p: load_checkpoint(p, args, dist.world_size), self.log, dist, damaged)
        elif T.list_checkpoints(self.out_dir)[0]:
            raise TrainingError(f"{self.out_dir} already has checkpoints: pass --resume to continue, or another "
                                f"--output-dir")
        dist.barrier()
        return resumed

    def load_data(self, resumed, again=False):
        """The train and held-out pairs, tokenized (the checkpoint's tokenizer on resume).
        ``again``: a second set-up (an --fsdp resume passing over a damaged checkpoint), whose
        description of the data, the same, is not logged twice."""
        args, log = self.args, self.log
        train_recs, held_recs, self.what = load_records(args, log)
        # what this run read, for its checkpoints (once read: its errors first); the ranks compared
        self.data_sha256 = T.data_digests(args, dist=self.dist)
        if not again:
            log(self.what)
        if resumed is not None:
            self.tokenizer = resumed["tokenizer"]
            limit, limit_text = max_length(args, self.last_ckpt)
        else:
            self.tokenizer = make_tokenizer(args, train_recs, held_recs)
            limit, limit_text = max_length(args, args.model)
        self.train_pairs = tokenize(train_recs, self.tokenizer, limit, limit_text, "train", log)
        self.held_pairs = tokenize(held_recs, self.tokenizer, limit, limit_text, "eval", log)
        self._setup_schedule()

    def build_model(self, resumed):
        """The checkpoint's model, --model, or the built-in tiny Llama; patched, on the device,
        wrapped in DDP under torchrun (or sharded with --fsdp: :meth:`build_sharded_model`)."""
        args, dist = self.args, self.dist
        if args.fsdp:
            return self.build_sharded_model(resumed)
        if resumed is not None:
            model = resumed["model"]
            self.log(f"resuming from {self.last_ckpt} (step {resumed['state']['step']})")
        elif args.model is not None:
            model = M.load_reward_model(args.model)
            M.check_vocab(model, self.tokenizer, "--model", args.model)
        else:
            model = self.build_default_model()
        self.prepare_model(model)
        model.to(dist.device)
        model.train()
        self.model = self.ddp_model = model
        if dist.enabled:
            self.rss_marks["model_before_ddp"] = F.rss_mib()
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)

    def build_default_model(self):
        """The built-in tiny Llama (random init from the torch RNG), sized for the data."""
        args = self.args
        longest = max(len(p[k]) for p in self.train_pairs + self.held_pairs for k in ("chosen_ids", "rejected_ids"))
        return M.build_tiny_reward_model(self.tokenizer, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                                         intermediate_size=2 * args.hidden_size,
                                         max_position_embeddings=max(128, longest))

    def prepare_model(self, model):
        """Patch the model for the fused loss (and the packed forward with --packing)."""
        args = self.args
        M.prepare_reward_model(model, self.tokenizer, backend=args.backend)
        if args.packing:
            flash = P.flash_available(self.dist.device, args.bf16)
            P.enable_packing(model, flash=flash)
            self.log("--packing: attention through " + ("flash-attention's varlen kernel" if flash else
                     "torch SDPA once per sequence (flash-attention needs a GPU, --bf16 and flash_attn)"))

    def build_sharded_model(self, resumed):
        """--fsdp: the model is built on the meta device, sharded, and only then given memory
        (each rank its shards) and values: the built-in model's by replaying its constructor's
        initialisation tensor by tensor (the same values and RNG draws as the DDP run),
        --model's by reading each rank's rows of the safetensors checkpoint (and initialising a
        new ``score`` head as ``from_pretrained`` does), a resumed run's from the sharded
        checkpoint (in :meth:`build_optimizer`, which passes over shards with non-finite
        weights: :class:`DamagedShards`). No rank holds the whole model."""
        args, dist = self.args, self.dist
        index = plan = None
        if resumed is not None:
            from transformers import AutoModelForSequenceClassification

            # the architecture only: the weights come from the shards (build_optimizer)
            model, _ = F.build_on_meta(lambda: AutoModelForSequenceClassification.from_config(
                resumed["model"], dtype=torch.float32))
        elif args.model is not None:
            model, _ = F.build_on_meta(lambda: M.reward_model_from_config(args.model))
            M.check_vocab(model, self.tokenizer, "--model", args.model)
            index = F.checkpoint_index(args.model, model)
            plan = F.record_missing_init(model, set(index) & {n for n, _ in model.named_parameters()})
            if plan.param_names():
                self.log(f"--model {args.model}: new weights, initialised: {', '.join(plan.param_names())}")
        else:
            model, plan = F.build_on_meta(self.build_default_model, record_init=True)
        self.prepare_model(model)
        model.train()
        self.model = self.ddp_model = model
        F.shard(model, dist, bf16=args.bf16)  # in place: the root's forward stays the patched one
        if index is not None:
            F.load_shards(model, index)
        if plan is not None:
            F.init_shards(model, plan)

    def build_optimizer(self, resumed):
        """AdamW and the warm-up + cosine schedule; on resume their states, the RNG state and
        the position in the data."""
        args = self.args
        self.optimizer = make_optimizer(self.model, args)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(args.warmup_steps, self.total))
        if resumed is not None:
            if resumed.get("sharded"):
                self.load_shards(resumed["optimizer"])
                # the check a non-sharded resume makes before choosing the checkpoint, made here
                # (the shards are read only once the model is sharded): setup() passes over a
                # damaged one to the next older checkpoint, as a non-sharded resume does
                bad = T.nonfinite_parameter_on_any_rank(self.dist, ("", self.model))
                if bad is not None:
                    raise DamagedShards(f"{F.DCP_DIR} holds non-finite values ({bad} has NaN or inf)")
                self.log(f"resuming from {self.last_ckpt} (step {resumed['state']['step']}, sharded)")
            else:
                self.optimizer.load_state_dict(resumed["optimizer"])
            self.scheduler.load_state_dict(resumed["scheduler"])
            set_rng_state(resumed["rng"])
            st = resumed["state"]
            self.step, self.epoch, self.batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
            self.elapsed_before = float(st.get("elapsed_s", 0.0))

    def load_shards(self, path):
        """The shards of an --fsdp checkpoint into the sharded model and optimizer; every rank
        learns whether every rank could read them (one all-reduce): damage on any rank
        (:class:`~rmkernels_train.fsdp.UnreadableShards`: a shard cut short or deleted after it
        was listed) is :class:`DamagedShards` on every rank (set-up passes over the checkpoint),
        another error stops every rank; no rank is left in a collective the others skip."""
        error = None
        try:
            F.load_sharded(path, self.model, self.optimizer)
        except TrainingError as e:
            error = e
        damaged = isinstance(error, F.UnreadableShards)
        n_damaged, n_other = self.dist.sum([float(damaged), float(error is not None and not damaged)])
        if n_other:
            raise error if error is not None and not damaged else TrainingError(
                f"--resume: another rank could not read the sharded state in {path}")
        if n_damaged:
            why = error.reason if damaged else "another rank could not read its part"
            raise DamagedShards(f"{F.DCP_DIR} cannot be read ({why})")

    def open_metrics(self, resumed):
        """metrics.jsonl (rank 0): new, or on resume cut back to the checkpoint's step; the
        resumed run's evaluation at that step is not repeated."""
        dist = self.dist
        # the first file of the run: nothing is created before the data and the model are read
        self.writes.now(T.make_output_dir, self.out_dir)
        self.metrics = self.writes.now(MetricsWriter, os.path.join(self.out_dir, "metrics.jsonl"),
                                       self.step if resumed is not None else None, EVAL_METRICS)
        if resumed is not None:
            kept = dist.broadcast_object(self.metrics.records if dist.is_main else None)
            evals = [r for r in kept if r.get("split") == "eval" and r.get("step") == self.step]
            if evals:
                self.last_eval_step = self.step
                self.ev = {k: evals[-1][k] for k in EVAL_METRICS["eval"]}

    def _setup_schedule(self):
        args, dist = self.args, self.dist
        if dist.world_size * args.batch_size > len(self.train_pairs):
            raise TrainingError(f"{len(self.train_pairs)} training pairs are fewer than one step's batch "
                                f"({dist.world_size} ranks x --batch-size {args.batch_size})")
        self.steps_per_epoch = len(self.train_pairs) // (args.batch_size * dist.world_size) // args.grad_accum
        if self.steps_per_epoch < 1:
            raise TrainingError(f"{len(self.train_pairs)} training pairs give no full optimizer step with "
                                f"--batch-size {args.batch_size} x --grad-accum {args.grad_accum} x "
                                f"{dist.world_size} ranks")
        self.total = args.max_steps or max(1, int(args.epochs * self.steps_per_epoch))

    # -- pieces of the loop ---------------------------------------------------------------
    def elapsed(self):
        return self.elapsed_before + time.time() - self.t_start

    def run_state(self):
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "total_steps": self.total, "elapsed_s": self.elapsed(), "data_sha256": self.data_sha256,
                "args": {**vars(self.args), "world_size": self.dist.world_size}}

    def checkpoint(self):
        self.writes.check()  # not after a failed metrics.jsonl line (every rank stops here with its line)
        # never a checkpoint of NaN / infinite weights (so last_ckpt is always a good one)
        T.check_finite_before_saving(self.dist, self.step, self.last_ckpt, ("", self.model))
        if self.last_eval_step == self.step and not all(math.isfinite(self.ev[k]) for k in ("loss", "margin")):
            where = (f"the last good checkpoint is {self.last_ckpt} (resume with --resume)" if self.last_ckpt
                     else "no checkpoint had been written")
            raise TrainingError(f"the evaluation at step {self.step} gives a {self.ev['loss']} loss (the weights "
                                f"overflow the forward); not saved; {where}. Try a lower --lr.")
        if self.args.fsdp:
            return self.sharded_checkpoint()
        # rank 0 writes; every rank learns whether it could (a disk full stops every rank with one line)
        self.last_ckpt = T.save_checkpoint_on_main(
            self.dist, self.out_dir, self.step,
            lambda tmp: write_checkpoint(tmp, self.model, self.tokenizer, self.optimizer, self.scheduler,
                                         self.run_state()),
            self.args.save_total_limit)

    def sharded_checkpoint(self):
        """An --fsdp checkpoint: every rank writes its shards into the temporary directory rank 0
        made; rank 0 adds the rest and renames it into place. The last checkpoint of the
        invocation also gets the whole model gathered on rank 0 (``model.safetensors``)."""
        dist = self.dist
        hf_state = None
        if not self.may_continue():
            hf_state = F.full_state_dict(self.model)  # collective
            if dist.is_main:
                names = [n for n, _ in self.model.named_parameters()]
                self.final_digest = F.state_digest(hf_state, names)

        # every rank writes its shards into rank 0's temporary directory, then rank 0 the rest; a
        # disk full on any rank (save_sharded is collective) stops every rank with one line
        self.last_ckpt = T.save_checkpoint_on_main(
            dist, self.out_dir, self.step, lambda tmp: write_sharded_checkpoint(tmp, self, hf_state),
            self.args.save_total_limit,
            every_rank=lambda tmp: F.save_sharded(os.path.join(tmp, F.DCP_DIR), self.model, self.optimizer))
        if hf_state is not None:  # every rank (rank 0's hf_state is the model, the others' {})
            self.hf_step = self.step

    def evaluate(self):
        ev = evaluate(self.model, self.held_pairs, self.args, self.dist, self.tokenizer.pad_token_id, self.autocast)
        if self.dist.is_main:
            epoch = round(self.epoch + self.batch_in_epoch / max(1, self.steps_per_epoch), 4)
            self.writes(self.metrics.write, {"split": "eval", "step": self.step, "epoch": epoch, **ev})
            self.log(f"eval step {self.step}: loss {ev['loss']:.4f}  accuracy {ev['accuracy']:.4f}  "
                     f"margin {ev['margin']:.3f}  ({ev['pairs']} held-out pairs)")
        self.ev, self.last_eval_step = ev, self.step
        return ev

    def train_step(self, group):
        """Forward and backward of the micro-batches of one optimizer step, then the optimizer
        step. Returns the step's metrics record. A non-finite loss or gradient norm stops the
        run before the optimizer step (weights and checkpoints stay good)."""
        args, dist = self.args, self.dist
        sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss * n, correct, margin sum, n, tokens
        for i, bt in enumerate(group):
            sync = i == len(group) - 1 or not dist.enabled
            if args.fsdp:  # reduce-scatter the gradients after the last micro-batch only
                self.model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or args.fsdp else self.ddp_model.no_sync():
                first = i == 0 and self.steps_this_run == 0
                if first:
                    self.rss_marks["step1_before_forward"] = F.rss_mib()
                    if self.live is not None:  # what the live bytes at the first step's start are made of
                        self.held_at_first_step = F.held_bytes(self.model, self.optimizer, self.ddp_model if
                                                               self.ddp_model is not self.model else None)
                with self.autocast():
                    loss, c, r = forward_pairs(self.ddp_model, bt, args, self.tokenizer.pad_token_id, dist.device)
                if first:  # the activations autograd keeps (and under FSDP the root's gathered parameters)
                    self.rss_marks["step1_after_forward"] = F.rss_mib()
                (loss / len(group)).backward()
            c, r = c.detach(), r.detach()
            sums[0] += float(loss.detach()) * len(bt)
            sums[1] += float((c > r).sum())
            sums[2] += float((c - r).sum())
            sums[3] += len(bt)
            sums[4] += sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in bt)
        # with the step's sums, whether rank 0's last write failed (metrics.jsonl): every rank stops
        # here, before the optimizer step, with one line (no collective of its own)
        loss_sum, correct, margin_sum, n, tokens, failed = dist.sum(sums + [self.writes.failed])
        self.writes.check(failed)
        rec = {"split": "train", "step": self.step + 1, "loss": loss_sum / n, "accuracy": correct / n,
               "margin": margin_sum / n, "lr": self.scheduler.get_last_lr()[0], "tokens": int(tokens)}
        # The gradient norm (after DDP's all-reduce, or over FSDP's shards: the same on every
        # rank), clipped if asked.
        rec["grad_norm"] = F.clip_grad_norm(self.model.parameters(), args.max_grad_norm or float("inf"))
        for key in ("loss", "grad_norm"):
            if not math.isfinite(rec[key]):
                where = (f"the last good checkpoint is {self.last_ckpt} (resume with --resume)" if self.last_ckpt
                         else "no checkpoint had been written yet")
                what = "loss" if key == "loss" else f"gradient norm (loss {rec['loss']:.4g})"
                raise TrainingError(f"{what} is {rec[key]} at step {self.step + 1} (epoch {self.epoch}); stopped "
                                    f"before the optimizer step; {where}. Try a lower --lr.")
        try:
            self.optimizer.step()
        except RuntimeError as e:  # AdamW's step size lr / (1 - beta1^t) beyond float32
            if "overflow" not in str(e):
                raise
            raise TrainingError(f"the optimizer step {self.step + 1} overflows ({one_line(e)}): --lr {args.lr} "
                                f"is far too large") from None
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.steps_this_run += 1
        self.batch_in_epoch += 1
        rec["epoch"] = round(self.epoch + self.batch_in_epoch / self.steps_per_epoch, 4)
        rec["time_s"] = round(self.elapsed(), 2)
        self.train_rss = F.peak_rss_mib()
        self.rss_marks["step1" if self.steps_this_run == 1 else "last_step"] = F.rss_mib()
        T.fault_point("step")
        return rec

    def record(self, rec):
        if not self.dist.is_main:
            return
        self.writes(self.metrics.write, rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}",
                                 margin=f"{rec['margin']:.2f}", refresh=False)
            self.bar.update(1)

    def may_continue(self):
        stop = self.args.stop_after
        return self.step < self.total and (stop is None or self.steps_this_run < stop)

    def epoch_groups(self):
        """This rank's micro-batches of the current epoch, grouped per optimizer step."""
        args = self.args
        micro = list(D.batches(self.train_pairs, args.batch_size, seed=args.seed, epoch=self.epoch,
                               rank=self.dist.rank, world_size=self.dist.world_size))
        return [micro[i * args.grad_accum:(i + 1) * args.grad_accum] for i in range(self.steps_per_epoch)]

    # -- the run ----------------------------------------------------------------------------
    def run(self):
        if self.live is not None:
            try:
                self.live.enable()
            except RuntimeError as e:
                raise TrainingError(f"--profile-memory: {e}") from None
        try:
            return self._run()
        finally:
            if self.live is not None:
                self.live.stop()  # (done already unless the run failed)

    def _run(self):
        self.setup()
        args = self.args
        if self.step == 0 and self.last_eval_step is None:  # the untrained model: the curves start at chance
            self.evaluate()
        self.bar = self.log.bar = T.progress_bar(args, self.dist, total=self.total, initial=self.step, desc="reward")
        if self.live is not None:
            self.live.begin()
        try:
            while self.may_continue():
                groups = self.epoch_groups()
                while self.batch_in_epoch < self.steps_per_epoch and self.may_continue():
                    with self.live.step(self.step + 1) if self.live is not None else contextlib.nullcontext():
                        rec = self.train_step(groups[self.batch_in_epoch])
                    if self.live is not None and self.live.active and self.steps_this_run >= args.profile_memory:
                        self.live.stop()
                    self.record(rec)
                    if self.step % args.eval_every == 0 or self.step == self.total:
                        self.evaluate()
                    if self.step % args.save_every == 0 or self.step == self.total:
                        self.checkpoint()
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        finally:
            if self.bar is not None:
                self.bar.close()
            self.bar = self.log.bar = None
        return self.finish()

    def finish(self):
        args, dist = self.args, self.dist
        if self.last_eval_step != self.step:
            self.evaluate()
        if self.last_ckpt != T.checkpoint_path(self.out_dir, self.step) or (
                args.fsdp and getattr(self, "hf_step", None) != self.step):
            # --fsdp resumed at its last step (nothing left to train): that checkpoint is written
            # again with the gathered model (model.safetensors, which a checkpoint written
            # mid-run lacks) and final.json's digest; the rewrite replaces it atomically
            self.checkpoint()
        if args.fsdp:  # one model, sharded: the digest of the whole model gathered for the HF checkpoint
            digests = [dist.broadcast_object(getattr(self, "final_digest", None))]
        else:
            digests = dist.gather_object(param_digest(self.model))
        if len(set(digests)) != 1:
            raise TrainingError(f"DDP ranks ended with different parameters: {digests}")
        ev = self.ev
        live = None
        if self.live is not None:
            live = {**self.live.stop(), "held_at_first_step_MiB": {
                k: round(v / 2**20, 2) for k, v in (self.held_at_first_step or {}).items()}}
        summary = {"step": self.step, "total_steps": self.total, "done": self.step >= self.total, "eval": ev,
                   "world_size": dist.world_size, "fsdp": args.fsdp, "packing": args.packing,
                   "param_digests": digests, "checkpoint": self.last_ckpt,
                   "train_time_s": round(self.elapsed(), 1),
                   "memory_per_rank": dist.gather_object(F.memory_report(
                       self.model, self.optimizer, dist.device, start_rss=self.start_rss, train_rss=self.train_rss,
                       marks=self.rss_marks, ddp_model=self.ddp_model if self.ddp_model is not self.model else None,
                       live=live))}
        # rank 0's files, then every rank learns whether they were written (cli_main's barrier,
        # a collective, follows: a rank 0 that stopped alone would leave the others in it)
        self.writes.now(self.write_outputs, summary)
        return summary

    def write_outputs(self, summary):
        """final.json, the plot and the last line (rank 0)."""
        args, ev = self.args, self.ev
        T.write_final(self.out_dir, summary)
        if args.plot:
            plot_curves(os.path.join(self.out_dir, "metrics.jsonl"), os.path.join(self.out_dir, "curves.png"),
                        title=f"reward model: {self.what.split(':')[0]}")
        status = "done" if self.step >= self.total else T.stopped_early(self.steps_this_run)
        head = f"{status}: step {self.step}/{self.total}"
        if self.step > self.total:  # resumed with a smaller --max-steps / --epochs
            head = T.past_the_end(self.step, self.total, "--max-steps / --epochs")
        self.log(f"{head} in {summary['train_time_s']:.0f} s; held-out pairwise "
                 f"accuracy {ev['accuracy']:.4f}, loss {ev['loss']:.4f}, margin {ev['margin']:.3f} "
                 f"({ev['pairs']} pairs); checkpoint {self.last_ckpt}")


def train(args, dist, log):
    """Run ``rmkernels-train reward`` with parsed and checked ``args``; returns the summary
    written to ``final.json``."""
    return RewardTrainer(args, dist, log).run()


def main(argv=None):
    return T.cli_main(PROG, build_parser(), check_args, train, argv, built_in=lambda a: a.model is None)


if __name__ == "__main__":
    import sys

    sys.exit(main())
