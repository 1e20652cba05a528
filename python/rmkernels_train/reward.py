"""``rmkernels-train reward``: train a reward model with the fused Bradley-Terry op.

    rmkernels-train reward                                 # built-in default, no network
    rmkernels-train reward --model DIR --data train.jsonl --eval-data test.jsonl --bf16
    torchrun --nproc_per_node 2 -m rmkernels_train reward  # DDP (gloo on CPU, NCCL on GPU)

The model is an HF ``*ForSequenceClassification`` (``num_labels=1``) patched with
``rmk.patch_hf_reward_model``; each batch (rows ``0..B-1`` chosen, ``B..2B-1`` rejected)
goes through ``rmk.pairwise_reward_loss``: the ``score`` head at each sequence's last token
and the Bradley-Terry loss in one op. Per step the progress bar and ``metrics.jsonl`` get
the loss, the pairwise accuracy (chosen reward > rejected reward) and the mean reward margin
(chosen - rejected); so does every evaluation on the held-out pairs.

Output directory: ``metrics.jsonl``, ``curves.png``, ``final.json`` and
``checkpoint-<step>/`` (an HF checkpoint: ``config.json``, ``model.safetensors``, the
tokenizer; plus ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pt`` and
``trainer_state.json``), each written under a temporary name and renamed.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
import time

import torch

from rmkernels_train import data as D
from rmkernels_train import model as M
from rmkernels_train.tokenizer import build_char_tokenizer
from rmkernels_train.utils import (MetricsWriter, TrainingError, atomic_dir, atomic_write_text, param_digest,
                                   plot_curves, rng_state, seed_everything, set_rng_state, setup_distributed,
                                   teardown_distributed)

PROG = "rmkernels-train reward"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Arguments that must not change on --resume: they fix which pairs each step sees.
RESUME_FIXED = ("data", "eval_data", "batch_size", "grad_accum", "seed", "world_size", "max_length",
                "default_train_pairs")


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description="Train a reward model with the fused Bradley-Terry op "
                                "(rmk.pairwise_reward_loss). With no options: the built-in default (generated "
                                "data, a tiny random-init Llama), no network needed.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR", help="local HF checkpoint (causal LM or *ForSequenceClassification); "
                   "default: a random-init tiny Llama over a character tokenizer")
    g.add_argument("--data", metavar="FILE", help="preference JSONL (prompt/chosen/rejected, or TRL's "
                   "conversational format); default: the built-in 'sort the digits' pairs")
    g.add_argument("--eval-data", metavar="FILE", help="held-out preference JSONL (default: --eval-fraction of "
                   "--data, or the built-in held-out pairs)")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="share of --data held out when there is no "
                   "--eval-data")
    g.add_argument("--max-length", type=int, default=None, help="drop pairs with a sequence longer than this "
                   "(tokens)")
    g.add_argument("--margin-column", default="margin", help="JSONL field with each pair's BT margin (used when "
                   "present)")
    g.add_argument("--default-train-pairs", type=int, default=16000, help="size of the built-in training set")
    g.add_argument("--hidden-size", type=int, default=M.DEFAULT_SIZE["hidden_size"],
                   help="built-in model: hidden size")
    g.add_argument("--layers", type=int, default=M.DEFAULT_SIZE["num_hidden_layers"],
                   help="built-in model: layers")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="preference pairs per device per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 for the built-in "
                   "model, 1e-5 with --model)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=30)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop after N optimizer steps in this "
                   "invocation, with a checkpoint (for time-limited jobs; continue with --resume)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("loss (rmk.pairwise_reward_loss)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="e in -(1-e) logsig(d) - e logsig(-d)")
    g.add_argument("--center-coef", type=float, default=0.0, help="center_coef * (chosen + rejected)^2 "
                   "(TRL's center_rewards_coefficient)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/reward")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    g.add_argument("--eval-every", type=int, default=100, help="optimizer steps between evaluations")
    g.add_argument("--save-every", type=int, default=250, help="optimizer steps between checkpoints")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (oldest deleted first)")
    g.add_argument("--eval-batch-size", type=int, default=100)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights); meant for GPUs")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for the built-in "
                   "model, which is too small to gain from intra-op threads and loses much to OpenMP contention "
                   "on a shared CPU; torch's choice with --model)")
    g.add_argument("--backend", default=None, help="rmkernels backend (default: the fastest available)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="no curves.png at the end")
    return p


def check_args(args):
    for name in ("batch_size", "grad_accum", "eval_every", "save_every", "eval_batch_size", "save_total_limit"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "stop_after", "max_length", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not 0 <= args.label_smoothing < 0.5:
        raise TrainingError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.center_coef < 0:
        raise TrainingError(f"--center-coef must be >= 0, got {args.center_coef}")
    if args.lr is None:
        args.lr = 1e-3 if args.model is None else 1e-5
    if not args.lr > 0 or not args.epochs > 0:
        raise TrainingError("--lr and --epochs must be > 0")
    if args.model is not None and not os.path.isdir(args.model):
        raise TrainingError(f"--model {args.model}: not a directory (give a local HF checkpoint directory)")
    if args.eval_data is None and args.data is not None and not 0 < args.eval_fraction < 1:
        raise TrainingError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
def list_checkpoints(output_dir):
    """[(step, path)] of complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.exists(os.path.join(path, "trainer_state.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def save_checkpoint(output_dir, step, model, tokenizer, optimizer, scheduler, state, keep):
    final = os.path.join(output_dir, f"checkpoint-{step}")
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng_state.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
        import random

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


def tokenize(args, records, tokenizer, what, log):
    pairs, dropped = D.tokenize_pairs(records, tokenizer, args.max_length)
    if dropped:
        log(f"{what}: dropped {dropped} of {len(records)} pairs longer than --max-length {args.max_length}")
    if not pairs:
        raise TrainingError(f"{what}: no pairs left (all are longer than --max-length {args.max_length})")
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
@torch.no_grad()
def evaluate(model, pairs, args, dist, pad_id, autocast):
    """Loss, accuracy and margin over all held-out pairs (every rank takes a share)."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, correct, margin sum, n
    for bt in D.batches(pairs, args.eval_batch_size, seed=0, epoch=0, rank=dist.rank,
                        world_size=dist.world_size, shuffle=False, drop_last=False):
        batch = D.collate(bt, pad_id)
        with autocast():
            loss, c, r = M.pairwise_forward(model, batch, label_smoothing=args.label_smoothing,
                                            center_coef=args.center_coef, device=dist.device)
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
def train(args, dist, log):
    t_start = time.time()
    out_dir = args.output_dir
    resume_from = None
    if args.resume:
        ckpts = list_checkpoints(out_dir)
        if not ckpts:
            raise TrainingError(f"--resume: no checkpoint-<step> directory with a trainer_state.json in {out_dir}")
        resume_from = ckpts[-1][1]
    elif list_checkpoints(out_dir):
        raise TrainingError(f"{out_dir} already has checkpoints: pass --resume to continue, or another "
                            f"--output-dir")
    dist.barrier()

    seed_everything(args.seed)
    train_recs, held_recs, what = load_records(args, log)
    log(what)
    state = None
    if resume_from is not None:
        with open(os.path.join(resume_from, "trainer_state.json")) as f:
            state = json.load(f)
        saved = state["args"]
        for k in RESUME_FIXED:
            now = dist.world_size if k == "world_size" else getattr(args, k)
            if saved.get(k) != now:
                raise TrainingError(f"--resume: {k} was {saved.get(k)!r} in the checkpoint's run and is {now!r} "
                                    f"now; it must stay the same")
        tokenizer = M.load_tokenizer(resume_from)
    else:
        tokenizer = make_tokenizer(args, train_recs, held_recs)
    train_pairs = tokenize(args, train_recs, tokenizer, "train", log)
    held_pairs = tokenize(args, held_recs, tokenizer, "eval", log)
    if state is not None:
        model = M.load_reward_model(resume_from)
        log(f"resuming from {resume_from} (step {state['step']})")
    elif args.model is not None:
        model = M.load_reward_model(args.model)
    else:
        longest = max(len(p[k]) for p in train_pairs + held_pairs for k in ("chosen_ids", "rejected_ids"))
        model = M.build_tiny_reward_model(tokenizer, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                                          intermediate_size=2 * args.hidden_size,
                                          max_position_embeddings=max(128, longest))
    M.prepare_reward_model(model, tokenizer, backend=args.backend)
    model.to(dist.device)
    model.train()
    if dist.world_size * args.batch_size > len(train_pairs):
        raise TrainingError(f"{len(train_pairs)} training pairs are fewer than one step's batch "
                            f"({dist.world_size} ranks x --batch-size {args.batch_size})")

    steps_per_epoch = len(train_pairs) // (args.batch_size * dist.world_size) // args.grad_accum
    if steps_per_epoch < 1:
        raise TrainingError(f"{len(train_pairs)} training pairs give no full optimizer step with --batch-size "
                            f"{args.batch_size} x --grad-accum {args.grad_accum} x {dist.world_size} ranks")
    total = args.max_steps or max(1, int(args.epochs * steps_per_epoch))

    ddp_model = model
    if dist.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, total))
    step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    if state is not None:
        optimizer.load_state_dict(torch.load(os.path.join(resume_from, "optimizer.pt"), weights_only=False))
        scheduler.load_state_dict(torch.load(os.path.join(resume_from, "scheduler.pt"), weights_only=False))
        set_rng_state(torch.load(os.path.join(resume_from, "rng_state.pt"), weights_only=False))
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        elapsed_before = state.get("elapsed_s", 0.0)

    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
    metrics = MetricsWriter(os.path.join(out_dir, "metrics.jsonl"), resume_step=step if state else None) \
        if dist.is_main else None
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {type(model).__name__}, {n_params / 1e6:.2f}M parameters; {total} optimizer steps of "
        f"{args.batch_size * args.grad_accum * dist.world_size} pairs ({dist.world_size} rank(s), device "
        f"{dist.device}); output in {out_dir}")

    autocast = (lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16)) if args.bf16 else \
        (lambda: torch.autocast(dist.device.type, enabled=False))
    bar = None
    if dist.is_main and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc="reward", dynamic_ncols=True, file=sys.stderr)

    def run_state():
        return {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "total_steps": total,
                "elapsed_s": elapsed_before + time.time() - t_start,
                "args": {**vars(args), "world_size": dist.world_size}}

    last_ckpt = resume_from  # known on every rank (only rank 0 writes)

    def checkpoint():
        nonlocal last_ckpt
        if dist.is_main:
            save_checkpoint(out_dir, step, model, tokenizer, optimizer, scheduler, run_state(),
                            args.save_total_limit)
        last_ckpt = os.path.join(out_dir, f"checkpoint-{step}")
        dist.barrier()

    def do_eval():
        ev = evaluate(model, held_pairs, args, dist, tokenizer.pad_token_id, autocast)
        if dist.is_main:
            metrics.write({"split": "eval", "step": step, "epoch": round(epoch + batch_in_epoch /
                                                                        max(1, steps_per_epoch), 4), **ev})
            msg = (f"eval step {step}: loss {ev['loss']:.4f}  accuracy {ev['accuracy']:.4f}  "
                   f"margin {ev['margin']:.3f}  ({ev['pairs']} held-out pairs)")
            bar.write(msg, file=sys.stderr) if bar else log(msg)
        return ev

    steps_this_run = 0
    last_eval_step = None
    ev = None
    if state is None:  # the untrained model's numbers: the curves start at chance
        ev = do_eval()
        last_eval_step = 0
    while step < total and (args.stop_after is None or steps_this_run < args.stop_after):
        micro = list(D.batches(train_pairs, args.batch_size, seed=args.seed, epoch=epoch, rank=dist.rank,
                               world_size=dist.world_size))
        micro = micro[:steps_per_epoch * args.grad_accum]
        while batch_in_epoch < steps_per_epoch and step < total and \
                (args.stop_after is None or steps_this_run < args.stop_after):
            group = micro[batch_in_epoch * args.grad_accum:(batch_in_epoch + 1) * args.grad_accum]
            sums = [0.0, 0.0, 0.0, 0.0]
            for i, bt in enumerate(group):
                batch = D.collate(bt, tokenizer.pad_token_id)
                sync = i == len(group) - 1 or not dist.enabled
                ctx = ddp_model.no_sync() if not sync else _nullcontext()
                with ctx:
                    with autocast():
                        loss, c, r = M.pairwise_forward(ddp_model, batch, label_smoothing=args.label_smoothing,
                                                        center_coef=args.center_coef, device=dist.device)
                    (loss / len(group)).backward()
                n = len(bt)
                sums[0] += float(loss.detach()) * n
                sums[1] += float((c.detach() > r.detach()).sum())
                sums[2] += float((c.detach() - r.detach()).sum())
                sums[3] += n
            loss_sum, correct, margin_sum, n = dist.sum(sums)
            rec = {"split": "train", "step": step + 1, "loss": loss_sum / n, "accuracy": correct / n,
                   "margin": margin_sum / n, "lr": scheduler.get_last_lr()[0]}
            # The gradient norm (after DDP's all-reduce: the same on every rank), clipped if asked.
            rec["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                    args.max_grad_norm or float("inf")))
            bad = "loss" if not math.isfinite(rec["loss"]) else "grad_norm" if not math.isfinite(rec["grad_norm"]) \
                else None
            if bad is not None:  # stop before the optimizer step: the weights and checkpoints stay good
                where = (f"the last good checkpoint is {last_ckpt} (resume with --resume)" if last_ckpt else
                         "no checkpoint had been written yet")
                what = "loss" if bad == "loss" else f"gradient norm (loss {rec['loss']:.4g})"
                raise TrainingError(f"{what} is {rec[bad]} at step {step + 1} (epoch {epoch}); stopped before the "
                                    f"optimizer step; {where}. Try a lower --lr.")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_run += 1
            batch_in_epoch += 1
            rec["epoch"] = round(epoch + batch_in_epoch / steps_per_epoch, 4)
            rec["time_s"] = round(elapsed_before + time.time() - t_start, 2)
            if dist.is_main:
                metrics.write(rec)
                if bar:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}",
                                    margin=f"{rec['margin']:.2f}", refresh=False)
                    bar.update(1)
            if step % args.eval_every == 0 or step == total:
                ev = do_eval()
                last_eval_step = step
            if step % args.save_every == 0 or step == total:
                checkpoint()
        if batch_in_epoch >= steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
    if bar:
        bar.close()
    if last_eval_step != step:
        ev = do_eval()
    if last_ckpt != os.path.join(out_dir, f"checkpoint-{step}"):
        checkpoint()
    digests = dist.gather_object(param_digest(model))
    if len(set(digests)) != 1:
        raise TrainingError(f"DDP ranks ended with different parameters: {digests}")
    summary = {"step": step, "total_steps": total, "done": step >= total, "eval": ev, "world_size": dist.world_size,
               "param_digests": digests, "checkpoint": last_ckpt,
               "train_time_s": round(elapsed_before + time.time() - t_start, 1)}
    if dist.is_main:
        atomic_write_text(os.path.join(out_dir, "final.json"), json.dumps(summary, indent=1) + "\n")
        if not args.no_plot:
            plot_curves(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "curves.png"),
                        title=f"reward model: {what.split(':')[0]}")
        status = "done" if step >= total else f"stopped after {steps_this_run} steps (--stop-after); --resume goes on"
        log(f"{status}: step {step}/{total} in {summary['train_time_s']:.0f} s; held-out pairwise accuracy "
            f"{ev['accuracy']:.4f}, loss {ev['loss']:.4f}, margin {ev['margin']:.3f} ({ev['pairs']} pairs); "
            f"checkpoint {last_ckpt}")
    return summary


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None):
    args = build_parser().parse_args(argv)
    dist = None
    try:
        check_args(args)
        threads = args.threads or (1 if args.model is None else None)
        if threads:
            torch.set_num_threads(threads)
        dist = setup_distributed(args.device)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Writing model shards" bars inside ours

        def log(msg):
            if dist.is_main:
                print(f"[{PROG}] {msg}", file=sys.stderr, flush=True)

        train(args, dist, log)
        return 0
    except TrainingError as e:
        rank = f" (rank {dist.rank})" if dist is not None and dist.enabled else ""
        print(f"{PROG}: error{rank}: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
