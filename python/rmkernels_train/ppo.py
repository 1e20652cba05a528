"""``rmkernels-train ppo``: PPO against a reward model, with the fused advantages.

Each step:

1. rollouts: ``generate`` samples a response to each prompt from the policy;
2. per-token log-probs of the policy and of the frozen reference policy, the value model's
   values, and the reward model's score of each sequence (``rmk.last_token_reward`` on the
   last valid token);
3. ``rmk.ppo_advantages``: the KL-penalised rewards, GAE advantages (whitened over the whole
   batch -- of every rank under torchrun, through ``process_group``) and returns, in one op;
4. PPO epochs over minibatches: the clipped policy loss (``--clip-range`` below,
   ``--clip-range-high`` above, and ``--clip-ratio-c``'s dual-clip when given) and the clipped
   value loss, both aggregated as ``--loss-agg`` says (``ppo_core.agg_loss``, verl's
   loss_agg_mode; token-mean by default), less ``--entropy-coef`` times the policy's entropy
   aggregated the same way (default 0);
5. the KL coefficient follows ``rmk.AdaptiveKLController`` (or stays fixed).

This is the ``--advantage gae`` path; the default, critic-free run (GRPO and its relatives) is
:mod:`rmkernels_train.rl`. With ``--advantage gae`` and no other option it runs on prompts of
the "sort these digits" task of ``rmkernels-train reward``, the reward model that command trains
by default (trained first, into ``<output-dir>/reward_model``, unless ``--reward-model`` is
given) and a random-init tiny Llama policy, all on CPU in a few minutes; the mean score of the
policy's responses rises, and the run prints it.

Outputs in ``--output-dir``: ``metrics.jsonl`` (one line per step), ``curves.png``, ``final.json``
(the run's summary: steps, the mean score of the first and last steps, the last KL and kl_coef),
``checkpoint-<step>/`` (written atomically every ``--save-every`` steps and at the end, the
last ``--save-total-limit`` kept; ``--resume`` continues from the newest intact one exactly:
the sampling of each step is seeded from (seed, step, rank)), and ``policy/`` (the final
policy as an HF checkpoint with its tokenizer). A checkpoint holds ``policy/`` and
``ref_policy/`` (HF, safetensors), ``value_model.safetensors``, ``optimizer.pt`` (read back
with ``weights_only=True``) and ``trainer_state.json``. The options, checkpoints and resume
come from the shared skeleton, :mod:`rmkernels_train.trainer`.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch

from rmkernels._codes import KL_ESTIMATORS
from rmkernels.ops.gae import check_clamp
from rmkernels_train import trainer as T
from rmkernels_train.utils import FLOAT32_MAX, TrainingError, one_line, open_data_text

PROG = "rmkernels-train ppo"
# The built-in policy's size (None in the parser: with --policy they are refused, not ignored).
POLICY_DEFAULTS = {"policy_layers": 2, "policy_hidden": 64}


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        description="RL against a reward model with the fused advantages: critic-free (--advantage grpo, the "
                    "default, and its relatives: rmk.group_advantages and friends, no value model) or PPO with a "
                    "value model (--advantage gae: rmk.ppo_advantages). With no options: the built-in default (the "
                    "default reward model, trained first; a tiny Llama policy, warm-started on the task; GRPO).",
        formatter_class=T.HelpFormatter)
    g = p.add_argument_group("models and data")
    g.add_argument("--reward-model", metavar="DIR", default=None,
                   help="reward model trained by `rmkernels-train reward` (an HF *ForSequenceClassification "
                        "checkpoint with its tokenizer, or a reward run's --output-dir: its final checkpoint); "
                        "default: train the built-in one first")
    g.add_argument("--policy", metavar="DIR", default=None,
                   help="initial policy (HF causal-LM checkpoint sharing the reward model's tokenizer); "
                        "default: a tiny Llama, warm-started on the task (critic-free) or random-init (gae)")
    g.add_argument("--prompts", metavar="FILE", default=None,
                   help='JSONL file with a "prompt" string per line; default: the built-in sorting prompts (with a '
                        'file, the critic-free run trains on the reward model alone: the checker only judges the '
                        'built-in task, train_success is null; the task evaluations stay on the built-in prompts)')
    g.add_argument("--policy-layers", type=int, default=None,
                   help=f"layers of the default tiny policy; default {POLICY_DEFAULTS['policy_layers']} (refused "
                        f"with --policy)")
    g.add_argument("--policy-hidden", type=int, default=None,
                   help=f"hidden size of the default tiny policy (a multiple of 8: its 4 attention heads, each of an "
                        f"even size); default "
                        f"{POLICY_DEFAULTS['policy_hidden']} (refused with --policy)")
    g = p.add_argument_group("rollouts")
    g.add_argument("--steps", type=int, default=None,
                   help="RL steps (rollout + update); default 1000 critic-free, 80 with --advantage gae")
    g.add_argument("--batch-size", type=int, default=None,
                   help="critic-free: prompts per step per process (each sampled --num-generations times), "
                        "default 16; --advantage gae: rollouts per step per process, default 32")
    g.add_argument("--max-new-tokens", type=int, default=8, help="longest response (tokens); each prompt's tokens "
                   "plus this must fit the models' max_position_embeddings")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    g.add_argument("--missing-eos-penalty", type=float, default=None,
                   help="subtracted from the score of a response with no EOS (TRL's option; --advantage gae only: "
                        "the critic-free run gives such a response a reward below the batch's lowest)")
    g = p.add_argument_group("advantages (rmk.ppo_advantages)")
    g.add_argument("--kl-estimator", choices=tuple(KL_ESTIMATORS), default=None,
                   help="per-token KL estimator (k1 = kl, abs, k2 = mse, k3, low_var_kl); default k3 critic-free "
                        "(a loss term: k1, k2 or k3 and their aliases; k3 = low_var_kl there, computed as verl's KL "
                        "loss does: the log ratio clamped to +-20, the value to +-10; not with --kl-mode reward, "
                        "which applies k1), k1 with --advantage gae (the penalty in the reward; k3 unclamped, "
                        "low_var_kl clamped)")
    g.add_argument("--kl-coef", type=float, default=None,
                   help="(initial) KL coefficient; default 0.5 critic-free, 0.05 with --advantage gae")
    g.add_argument("--adaptive-kl", action="store_true", default=None,
                   help="adapt the KL coefficient (Ziegler et al.; --advantage gae only)")
    g.add_argument("--kl-target", type=float, default=None,
                   help="target KL (nats per response) of --adaptive-kl; default 1.0 (--advantage gae only)")
    g.add_argument("--kl-horizon", type=float, default=None,
                   help="horizon (samples) of --adaptive-kl; default 2000 (--advantage gae only)")
    g.add_argument("--kl-clamp", type=float, default=None,
                   help="clamp the per-token KL to [-c, c] (--advantage gae only)")
    g.add_argument("--gamma", type=float, default=None, help="discount of GAE; default 1.0 (--advantage gae only)")
    g.add_argument("--lam", type=float, default=None, help="lambda of GAE; default 0.95 (--advantage gae only)")
    g.add_argument("--score-clip", type=float, default=None,
                   help="clamp the scores to [-c, c] (--advantage gae only)")
    g.add_argument("--no-whiten", dest="whiten", action="store_false", default=None,
                   help="do not whiten the advantages (--advantage gae only)")
    g.add_argument("--no-shift-mean", dest="shift_mean", action="store_false", default=None,
                   help="whitening divides by the std but keeps the advantages' mean (--advantage gae only)")
    g.add_argument("--biased-whiten", dest="unbiased", action="store_false", default=None,
                   help="whitening divides the variance by n, not n - 1 (--advantage gae only)")
    from rmkernels_train import rl
    from rmkernels_train.ppo_core import LOSS_AGG_MODES

    g = p.add_argument_group("PPO update (both paths, except --value-lr, --clip-range-value and --vf-coef: "
                             "--advantage gae only, the critic-free run refuses them)")
    g.add_argument("--ppo-epochs", type=int, default=None,
                   help="passes over each step's rollouts (sampled, scored and given advantages once); default 4 "
                        "with --advantage gae, 1 critic-free (verl's ppo_epochs, TRL's num_iterations)")
    g.add_argument("--minibatches", type=int, default=None,
                   help="minibatches per epoch, one optimizer step each: each epoch cuts a random permutation "
                        "of the rollouts into this many equal ones (it must divide the rollouts of a step: "
                        "--batch-size with --advantage gae, --batch-size x --num-generations critic-free); default 2 "
                        "with --advantage gae, 1 critic-free (there the advantages are the whole batch's, "
                        "computed first, so a minibatch may hold part of a prompt's group, as in verl). "
                        "Critic-free with one epoch and one minibatch: one on-policy step (ratio 1)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate of the policy; default 3e-4 critic-free, 1e-3 with --advantage gae")
    g.add_argument("--value-lr", type=float, default=None, help="learning rate of the value model; default 1e-3")
    g.add_argument("--clip-range", type=float, default=rl.CLIP_RANGE,
                   help="the ratio's clip below: 1 - this (verl's clip_ratio_low, TRL's epsilon), and above unless "
                        "--clip-range-high is given; the clipped surrogate's ratio is against the log-probs of the "
                        "policy that sampled the rollouts")
    g.add_argument("--clip-range-high", type=float, default=None,
                   help="the ratio's clip above: 1 + this (DAPO's clip-higher: verl's clip_ratio_high, TRL's "
                        "epsilon_high); default --clip-range")
    g.add_argument("--clip-ratio-c", type=float, default=None, metavar="C",
                   help="dual-clip PPO (verl's clip_ratio_c; verl's default is 3): where an advantage is negative, "
                        "the policy loss of a token is also capped at -advantage x C, so a ratio far above the clip "
                        "range cannot make an unbounded loss; must be > 1; default off")
    g.add_argument("--clip-range-value", type=float, default=None, help="value clip range; default 0.2")
    g.add_argument("--vf-coef", type=float, default=None, help="weight of the value loss; default 0.5")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--entropy-coef", type=float, default=0.0,
                   help="weight of the entropy bonus: the loss minus this times the policy's token entropy on the "
                        "rollouts, aggregated as --loss-agg (verl's entropy_coeff, OpenRLHF's entropy_loss_coef); "
                        "default 0 (no entropy term; > 0 also logs the token-mean entropy as entropy)")
    g.add_argument("--loss-agg", choices=LOSS_AGG_MODES, default=LOSS_AGG_MODES[0],
                   help="how the token losses of a minibatch become its loss (verl's loss_agg_mode): token-mean "
                        "(the default: over every response token), token-sum (their sum), seq-mean-token-sum "
                        "(each response's sum, averaged over the responses), seq-mean-token-mean (each response's "
                        "mean, averaged: the original GRPO), seq-mean-token-sum-norm (Dr. GRPO: seq-mean-token-sum "
                        "over the constant --max-new-tokens). It aggregates the policy loss, and the KL loss term "
                        "(critic-free) or the value loss (gae), as verl does (TRL's loss_type grpo, bnpo / dapo, "
                        "dr_grpo are close to seq-mean-token-mean, token-mean, seq-mean-token-sum-norm: docs/rl.md). "
                        "Under torchrun the counts are those of the whole minibatch over every rank, as in verl")
    rl.add_arguments(p)
    T.add_run_args(p, output_dir="runs/ppo", save_every=20)
    return p


def refuse_ignored(a):
    """Options given on the command line that this run would ignore are refused (before the
    defaults are filled in): the built-in policy's size with --policy; with --advantage gae,
    --adaptive-kl's options without it and the whitening variants with --no-whiten."""
    ignored = []
    if a.policy is not None:
        ignored += [(k, "--policy gives the policy") for k in POLICY_DEFAULTS]
    if a.advantage == "gae":
        if not a.adaptive_kl:
            ignored += [(k, "these options configure --adaptive-kl, which is off") for k in ("kl_target", "kl_horizon")]
        if a.whiten is False:
            ignored += [(k, "--no-whiten turns whitening off") for k in ("shift_mean", "unbiased")]
    from rmkernels_train.rl import flag

    given = [(k, why) for k, why in ignored if getattr(a, k, None) is not None]
    if given:
        raise TrainingError(f"{', '.join(flag(k) for k, _ in given)} would be ignored: {given[0][1]}")
    for k, v in POLICY_DEFAULTS.items():
        if a.policy is None and getattr(a, k) is None:
            setattr(a, k, v)


# The float options applied to float32 tensors (a scalar beyond float32's range fails deep
# inside torch: "value cannot be converted to type float without overflow", or an inf that makes
# NaN probabilities), with the largest value each may take (above the checks of check_args):
# float32's largest; the temperature's 1 / temperature must be a normal float32 (the logits are
# divided by it); the lr's AdamW's first step size, lr / (1 - beta1), must be finite.
FLOAT32_BOUNDS = {
    **{k: (FLOAT32_MAX, "the largest float32") for k in (
        "clip_range", "clip_range_high", "clip_ratio_c", "clip_range_value", "kl_coef", "vf_coef", "gamma",
        "entropy_coef", "kl_clamp", "score_clip", "missing_eos_penalty", "max_grad_norm")},
    "temperature": (1.0 / float(torch.finfo(torch.float32).tiny), "1 / temperature must be a normal float32"),
    **{k: (FLOAT32_MAX * (1 - 0.9), "AdamW's first step, lr / (1 - beta1 = 0.9), must be finite in float32")
       for k in ("lr", "value_lr")},
}


def check_float32_range(a):
    """Each option of :data:`FLOAT32_BOUNDS` within its bound (in absolute value)."""
    from rmkernels_train.rl import flag

    for k, (high, why) in FLOAT32_BOUNDS.items():
        v = getattr(a, k, None)
        if v is not None and abs(v) > high:
            raise TrainingError(f"{flag(k)} {v:g}: too large, at most {high:.4g} in absolute value ({why}; it is "
                                f"applied to float32 tensors)")


def check_args(a):
    from rmkernels_train import rl

    refuse_ignored(a)
    rl.resolve_defaults(a)  # the defaults that depend on --advantage
    rl.check_args(a)

    def positive(name, v):
        if not v > 0:
            raise TrainingError(f"--{name} must be > 0, got {v}")

    # the options of the other path are None (rl.resolve_defaults): nothing to check
    for name in ("steps", "batch_size", "max_new_tokens", "ppo_epochs", "minibatches", "policy_layers",
                 "policy_hidden"):
        if getattr(a, name) is not None:
            positive(name.replace("_", "-"), getattr(a, name))
    for name in ("temperature", "lr", "value_lr", "clip_range", "clip_range_high", "clip_range_value", "kl_target",
                 "kl_horizon", "max_grad_norm"):
        T.check_finite(name, getattr(a, name), low=0, low_open=True)
    from rmkernels_train.ppo_core import check_clip_ratio_c

    try:  # the policy loss's own rule, checked at start-up
        check_clip_ratio_c(a.clip_ratio_c, "--clip-ratio-c")
    except ValueError as e:
        raise TrainingError(f"{e}; leave it out to turn dual-clip off") from None
    from rmkernels.ops.token_logprobs import check_temperature

    try:  # the log-probs' own rule (rmk.token_logprobs), checked before any model is trained
        check_temperature(a.temperature)
    except ValueError as e:
        raise TrainingError(f"--{e}") from None
    for name in ("kl_coef", "vf_coef", "gamma", "entropy_coef"):
        T.check_finite(name, getattr(a, name), low=0)
    if a.lam is not None and not 0.0 <= a.lam <= 1.0:  # (nan fails too)
        raise TrainingError(f"--lam must be in [0, 1], got {a.lam}")
    for name in ("kl_clamp", "score_clip"):
        T.check_finite(name, getattr(a, name), low=0, low_open=True)
        if getattr(a, name) is not None:
            try:  # the ops' own rule (> 0 in float32 too), as the ops would refuse it at the first step
                check_clamp(name, getattr(a, name))
            except ValueError as e:
                raise TrainingError(f"--{name.replace('_', '-')}: {e}") from None
    T.check_finite("missing_eos_penalty", a.missing_eos_penalty)
    check_float32_range(a)
    from rmkernels_train.sft import POLICY_HEADS

    if a.policy_hidden is not None and a.policy_hidden % (2 * POLICY_HEADS):
        raise TrainingError(f"--policy-hidden must be a multiple of {2 * POLICY_HEADS} (the built-in policy's "
                            f"{POLICY_HEADS} attention heads a layer, each of an even size for the rotary "
                            f"embedding), got {a.policy_hidden}")
    if a.advantage == "gae" and a.batch_size % a.minibatches:
        raise TrainingError(f"--minibatches {a.minibatches} must divide --batch-size {a.batch_size} (each epoch cuts "
                            f"the rollouts into equal minibatches, as verl requires)")
    if a.advantage != "gae":
        rl.check_minibatches(a, a.batch_size)
    for name in ("reward_model", "policy"):
        v = getattr(a, name)
        if v is not None and not os.path.isdir(v):
            raise TrainingError(f"--{name.replace('_', '-')} {v}: not a directory")
    if a.policy is not None:  # before the default reward model is trained (minutes)
        from rmkernels_train.model import check_causal_lm_dir

        check_causal_lm_dir(a.policy)
    # what --data takes: anything that exists and is not a directory (a pipe, a FIFO, /dev/stdin)
    if a.prompts is not None and os.path.isdir(a.prompts):
        raise TrainingError(f"--prompts {a.prompts}: is a directory (give a JSONL file)")
    if a.prompts is not None and not os.path.exists(a.prompts):
        raise TrainingError(f"--prompts {a.prompts}: no such file")
    check_kl_horizon(a, int(os.environ.get("WORLD_SIZE", "1")))  # the processes setup_distributed joins


def check_kl_horizon(a, world_size):
    """--adaptive-kl (rmk.AdaptiveKLController, after each step) multiplies the KL coefficient by
    ``1 + clip(KL / --kl-target - 1, -0.2, 0.2) x n / --kl-horizon``, ``n`` the step's responses
    over every process (--batch-size x ``world_size``: step_record's update). A horizon of
    ``0.2 n`` or less lets that factor reach 0 or below: the coefficient would turn negative (a
    KL bonus), and --resume refuses such a checkpoint. Refused at start-up."""
    if not a.adaptive_kl:
        return
    n = a.batch_size * world_size
    if 1.0 - 0.2 * n / a.kl_horizon <= 0.0:  # the controller's smallest factor, computed as it does
        procs = f" x {world_size} processes" if world_size > 1 else ""
        raise TrainingError(f"--kl-horizon {a.kl_horizon:g} must be > 0.2 x the {n} responses of each step "
                            f"(--batch-size {a.batch_size}{procs}) = {0.2 * n:g}: --adaptive-kl multiplies the KL "
                            f"coefficient by 1 + clip(KL / --kl-target - 1, -0.2, 0.2) x {n} / --kl-horizon after "
                            f"each step, which would reach 0 or below (a negative coefficient)")


# ---------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------
def load_prompts(path, with_lines=False):
    """Prompt strings of a JSONL file (``{"prompt": str}`` per line, blank lines skipped).
    ``with_lines``: returns ``(prompts, line numbers)`` (for :func:`fitting_prompts`' messages)."""
    from rmkernels_train.data import check_text, parse_json_line

    prompts, lines = [], []
    try:
        with open_data_text(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = parse_json_line(line, f"{path}:{i}")
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
                    raise TrainingError(f"{path}:{i}: each line needs a non-empty string field \"prompt\"")
                check_text(rec["prompt"], f"{path}:{i}", "prompt")
                prompts.append(rec["prompt"])
                lines.append(i)
    except UnicodeDecodeError as e:
        raise TrainingError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None
    except OSError as e:
        raise TrainingError(f"--prompts {path}: cannot read it ({e.strerror or e})") from None
    if not prompts:
        raise TrainingError(f"{path}: no prompts")
    return (prompts, lines) if with_lines else prompts


def model_positions(*models):
    """The fewest positions (``max_position_embeddings`` or its other names) of ``models``'
    configs, or None when none says."""
    found = []
    for m in models:
        cfg = getattr(m, "config", None)
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                found.append(v)
                break
    return min(found) if found else None


def run_prompts(a, default):
    """``(prompts, line numbers)`` of the run: ``--prompts`` read once, else ``default`` (its
    line numbers None)."""
    return load_prompts(a.prompts, with_lines=True) if a.prompts else (default, None)


def fitting_prompts(a, tokenizer, models, prompts, lines, log=None):
    """``prompts`` (:func:`run_prompts`) as token ids (:func:`encode_prompts`), each checked to
    fit the models with ``--max-new-tokens`` of response: a prompt whose tokens plus
    --max-new-tokens exceed the fewest positions of ``models`` is refused with FILE:LINE (its
    character length first, so that a huge line is refused without tokenizing it), and so is a
    --max-new-tokens that leaves no room. Prompts with text the tokenizer does not know (its
    unknown token: the built-in character tokenizer's ``<unk>``) are counted in a warning
    through ``log``, with the first one's FILE:LINE."""
    from rmkernels_train.data import longest_token_chars

    positions = model_positions(*models)
    if positions is not None and a.max_new_tokens >= positions:
        raise TrainingError(f"--max-new-tokens {a.max_new_tokens}: the models take at most {positions} positions "
                            f"(prompt + response); give at most {positions - 2}")
    room = None if positions is None else positions - a.max_new_tokens
    wheres = ([f"{a.prompts}:{i}" for i in lines] if lines is not None
              else [f"built-in prompt {i + 1}" for i in range(len(prompts))])
    if room is not None:
        max_chars = room * longest_token_chars(tokenizer)
        for where, p in zip(wheres, prompts):
            if len(p) > max_chars:
                raise TrainingError(f"{where}: the prompt has {len(p)} characters, more than the models' positions "
                                    f"can hold (at most {max_chars} characters: the response needs room too)")
    ids = encode_prompts(prompts, tokenizer)
    for where, x in zip(wheres, ids):
        if len(x) == 0:
            raise TrainingError(f"{where}: the prompt tokenizes to no tokens")
        if room is not None and len(x) > room:
            raise TrainingError(f"{where}: the prompt has {len(x)} tokens; with --max-new-tokens {a.max_new_tokens} "
                                f"that is more than the models' {positions} positions")
    unk = tokenizer.unk_token_id
    unknown = [where for where, x in zip(wheres, ids) if unk is not None and unk in x]
    if unknown and log is not None:
        log(f"warning: {len(unknown)} of {len(ids)} prompts hold text the tokenizer does not know (read as "
            f"{tokenizer.unk_token}; the first: {unknown[0]}): the policy and the reward model see that token there")
    return ids


def default_prompts():
    from rmkernels_train.data import default_datasets

    train, _ = default_datasets()
    return [r["prompt"] for r in train]


def encode_prompts(prompts, tokenizer):
    """Token ids of each prompt: ``<bos>`` + the text, no ``<eos>`` (the response follows, as
    in the sequences the reward model was trained on)."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + x for x in ids]


def train_default_reward_model(out_dir, dist, threads):
    """``rmkernels-train reward`` with its defaults, into ``<out_dir>/reward_model``, run once
    (rank 0, in a single-process subprocess; the other ranks wait). Returns the final
    checkpoint directory it reports in ``final.json`` (a relative one is taken as the
    ``checkpoint-<step>`` in ``<out_dir>/reward_model``, so a run resumes from any working
    directory). An earlier finished run is reused."""
    rm_dir = os.path.join(out_dir, "reward_model")
    summary_path = os.path.join(rm_dir, "final.json")

    def train_it():
        if os.path.isfile(summary_path):
            return
        import subprocess

        print(f"rmkernels-train ppo: no --reward-model given: training the default reward model "
              f"(rmkernels-train reward) into {rm_dir}", file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
        cmd = [sys.executable, "-m", "rmkernels_train", "reward", "--output-dir", rm_dir, "--no-progress",
               "--threads", str(threads)]
        if T.list_checkpoints(rm_dir)[0]:  # an earlier, interrupted run: continue it
            cmd.append("--resume")
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            raise TrainingError(f"training the default reward model failed (exit status {rc}); see the messages "
                                f"above, or pass --reward-model DIR")

    # rank 0 trains it while the others wait; a failure (of the run, or its disk) stops every
    # rank with one line, not rank 0 alone (the others would die in the collective after)
    T.MainWrites(dist).now(train_it)
    return final_checkpoint(rm_dir, "the default reward model's summary")


def final_checkpoint(run_dir, what):
    """The final checkpoint that a finished ``rmkernels-train reward`` run in ``run_dir`` reports
    in its ``final.json`` (a relative path there is taken as the ``checkpoint-<step>`` in
    ``run_dir``: the run recorded it relative to the directory it ran in)."""
    summary_path = os.path.join(run_dir, "final.json")
    try:
        with open(summary_path) as f:
            ckpt = json.load(f)["checkpoint"]
        if not isinstance(ckpt, str):
            raise ValueError(f"'checkpoint' is {ckpt!r}, not a path")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainingError(f"cannot read {what} {summary_path}: {e}") from None
    if not os.path.isabs(ckpt):
        ckpt = os.path.join(run_dir, os.path.basename(os.path.normpath(ckpt)))
    if not os.path.isdir(ckpt):
        raise TrainingError(f"{what} {summary_path} names the final checkpoint {ckpt}, which is not there (deleted "
                            f"or moved): pass that reward model's checkpoint directory as --reward-model, or train "
                            f"it again")
    return ckpt


def run_reward_model(a, out_dir, dist, threads, log):
    """The reward model directory of a ``rmkernels-train ppo`` run (both paths): ``--reward-model``
    (a reward run's ``--output-dir`` stands for the final checkpoint its ``final.json`` names,
    said through ``log``), or the default one, trained first (:func:`train_default_reward_model`)."""
    path = a.reward_model
    if path is None:
        return train_default_reward_model(out_dir, dist, threads)
    if (os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json"))
            and os.path.exists(os.path.join(path, "final.json"))):
        ckpt = final_checkpoint(path, f"--reward-model {path}: a training output directory; its summary")
        log(f"--reward-model {path}: the final checkpoint of that reward run, {ckpt}")
        return ckpt
    return path


def load_run_reward_model(a, reward_dir, tokenizer):
    """The reward model of a ``rmkernels-train ppo`` run (both paths): ``--reward-model``, or the
    default one in ``<output-dir>/reward_model`` (safetensors only: nothing in an output
    directory can run code), with the linear ``score`` head the rewards come from and an
    embedding that covers ``tokenizer`` (the run's, from ``reward_dir``)."""
    from rmkernels_train.model import check_vocab, load_reward_model

    if a.reward_model is not None:
        what, model = "--reward-model", load_reward_model(reward_dir, what="--reward-model", trained=True)
    else:
        what = "the default reward model"
        model = load_reward_model(reward_dir, what=what, use_safetensors=True, trained=True)
    head = getattr(model, "score", None)
    if head is None or not hasattr(head, "weight"):
        raise TrainingError(f"{what} {reward_dir}: no linear `score` head found on {type(model).__name__}")
    bad = T.nonfinite_parameter(("", model))
    if bad is not None:  # every score (and the value model it starts) would be NaN
        raise TrainingError(f"{what} {reward_dir}: its weights are not finite ({bad} has NaN or inf)")
    check_vocab(model, tokenizer, what, reward_dir)
    return model


def load_policy(path, tokenizer, log=None):
    """``--policy``: a causal LM whose vocabulary is the reward model's tokenizer's (both paths);
    an embedding padded past the tokenizer is cut to it (said through ``log``)."""
    from transformers import AutoModelForCausalLM

    from rmkernels_train.model import FROM_PRETRAINED, check_vocab, vocab_rows

    try:
        policy, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **FROM_PRETRAINED)
    except Exception as e:  # noqa: BLE001 (transformers raises many types)
        raise TrainingError(f"--policy {path}: cannot load a causal LM: {one_line(e)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # e.g. a *ForSequenceClassification checkpoint: its LM head would be random
        raise TrainingError(f"--policy {path}: not a causal-LM checkpoint: it lacks {len(missing)} weight(s), "
                            f"which would be initialised randomly ({', '.join(missing[:3])})")
    check_vocab(policy, tokenizer, "--policy", path)  # the reward model's tokenizer
    rows, size = vocab_rows(policy), len(tokenizer)
    if rows is not None and rows > size:
        # an embedding padded past the tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens): the rows
        # past it are ids the tokenizer cannot decode and the reward model cannot score, so the
        # policy keeps the tokenizer's rows (LM head and embedding, tied or not) and never samples them
        policy.resize_token_embeddings(size)
        (log or print)(f"--policy {path}: its vocabulary ({rows} token embeddings) is padded past the tokenizer's "
                       f"({size} tokens); the policy keeps the first {size} (the padded ids are never sampled)")
    return policy


def load_models(a, dist, reward_dir, log=None):
    from rmkernels_train.model import load_tokenizer
    from rmkernels_train.ppo_core import ValueModel
    from rmkernels_train.sft import build_policy

    tokenizer = load_tokenizer(reward_dir)
    if tokenizer.eos_token_id is None:
        raise TrainingError(f"the tokenizer in {reward_dir} has no eos token: responses could never end")
    reward_model = load_run_reward_model(a, reward_dir, tokenizer)
    backbone_rm = reward_model.base_model
    head = reward_model.score
    torch.manual_seed(a.seed)  # the same initial weights on every rank
    if a.policy is not None:
        policy = load_policy(a.policy, tokenizer, log)
    else:
        policy = build_policy(tokenizer, layers=a.policy_layers, hidden=a.policy_hidden)
    ref = copy.deepcopy(policy)
    # The value model starts from the reward model (as TRL and OpenRLHF do): its backbone, and
    # the score head as the value head.
    value_model = ValueModel(copy.deepcopy(backbone_rm), backbone_rm.config.hidden_size)
    with torch.no_grad():
        value_model.value_head.weight.copy_(head.weight.float())
        value_model.value_head.bias.zero_()
    for m in (ref, reward_model):
        m.requires_grad_(False)
        m.eval()
    dev = dist.device
    return tokenizer, policy.to(dev), ref.to(dev), value_model.to(dev), reward_model.to(dev)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
def write_checkpoint(tmp, policy, ref, value_model, optimizer, tokenizer, state):
    """The files of one checkpoint, into the temporary directory ``tmp``."""
    from safetensors.torch import save_file

    policy.save_pretrained(os.path.join(tmp, "policy"))
    T.fault_point("checkpoint-write")
    tokenizer.save_pretrained(os.path.join(tmp, "policy"))
    ref.save_pretrained(os.path.join(tmp, "ref_policy"))
    save_file({k: v.contiguous() for k, v in value_model.state_dict().items()},
              os.path.join(tmp, "value_model.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)


# What write_outputs reads of each train row of metrics.jsonl (a row without them is skipped)
TRAIN_METRICS = {"train": ("score", "kl", "kl_coef")}


def load_checkpoint(path, policy, ref, value_model, make_optimizer, args=None, world_size=1, reward_dir=None,
                    digests=None):
    """Read and check every file of the checkpoint ``path`` against the models (nothing is
    changed yet; ``digests``: the run's ``T.data_digests``, for the resume check); a damaged
    or missing file raises
    :class:`~rmkernels_train.trainer.CheckpointError`. Returns ``(state, tensors)`` for
    :func:`apply_checkpoint`."""
    state = T.read_trainer_state(path)
    if args is not None:  # the options first: a changed one is named, not taken for a damaged file
        from rmkernels_train.rl import check_resume_options

        check_resume_options(state, args, world_size, reward_dir, digests)
    kl_coef = state.get("kl_coef")
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not math.isfinite(kl_coef) \
            or kl_coef < 0:
        raise T.CheckpointError(f"trainer_state.json: 'kl_coef' is {kl_coef!r}, not a finite number >= 0")
    tensors = {}
    for name, module, file in (("policy", policy, "policy/model.safetensors"),
                               ("ref_policy", ref, "ref_policy/model.safetensors"),
                               ("value_model", value_model, "value_model.safetensors")):
        tensors[name] = T.load_safetensors(os.path.join(path, file), name=file)
        T.check_state_dict(module, tensors[name], file)
    tensors["optimizer"] = T.load_torch_state(os.path.join(path, "optimizer.pt"))
    T.check_optimizer_state(make_optimizer, tensors["optimizer"])
    return state, tensors


def apply_checkpoint(loaded, policy, ref, value_model, optimizer):
    """Put a checked checkpoint (:func:`load_checkpoint`) into the models and optimizer."""
    _, tensors = loaded
    for name, module in (("policy", policy), ("ref_policy", ref), ("value_model", value_model)):
        module.load_state_dict(tensors[name], strict=False)
    optimizer.load_state_dict(tensors["optimizer"])


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
class PPOTrainer:
    """One invocation of ``rmkernels-train ppo``: :meth:`setup` (models, prompts, optimizer,
    resume), then per step :meth:`rollout` (sample, score, advantages), :meth:`update` (PPO
    epochs) and :meth:`record`; checkpoints on the way and :meth:`finish` at the end."""

    def __init__(self, args, dist, log):
        import rmkernels as rmk
        from rmkernels_train import ppo_core as core

        self.a, self.dist, self.log = args, dist, log
        self.rmk, self.core = rmk, core
        self.out_dir = args.output_dir
        self.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        self.step = 0
        self.steps_this_run = 0
        self.last_ckpt = None
        # rank 0's files besides checkpoints: a failed write stops every rank with one line
        self.writes = T.MainWrites(dist)

    # -- set-up ---------------------------------------------------------------------------
    def setup(self):
        from torch.nn.parallel import DistributedDataParallel as DDP

        from rmkernels_train.utils import MetricsWriter

        a, dist = self.a, self.dist
        self.writes.now(self.prepare_output_dir)
        if not a.resume and T.list_checkpoints(self.out_dir)[0]:
            raise TrainingError(f"{self.out_dir} already has checkpoints: pass --resume to continue, or another "
                                f"--output-dir")
        # --prompts read first: a file that is empty or not JSON lines stops the run before the
        # default reward model is trained (minutes)
        prompts, lines = run_prompts(a, None if a.prompts else default_prompts())
        reward_dir = self.reward_dir = run_reward_model(a, self.out_dir, dist, T.threads_for(a, True), self.log)
        self.tokenizer, self.policy, self.ref, self.value_model, self.reward_model = load_models(a, dist, reward_dir,
                                                                                                 self.log)
        # what this run read (the data files, the reward model), for its checkpoints; once read: its errors first
        self.data_sha256 = T.data_digests(a, reward_dir, dist=dist)
        self.prompt_ids = fitting_prompts(a, self.tokenizer, (self.policy, self.reward_model), prompts, lines,
                                           self.log)
        self.optimizer = self.make_optimizer()
        kl_coef = a.kl_coef
        if a.resume:
            self.step, self.last_ckpt, loaded = T.find_resume_checkpoint(
                self.out_dir, lambda p: load_checkpoint(p, self.policy, self.ref, self.value_model,
                                                        self.make_optimizer, a, dist.world_size, reward_dir,
                                                        self.data_sha256),
                self.log, dist)
            apply_checkpoint(loaded, self.policy, self.ref, self.value_model, self.optimizer)
            kl_coef = loaded[0]["kl_coef"]
            self.log(f"resuming from {self.last_ckpt} (step {self.step})")
        self.kl_ctl = (self.rmk.AdaptiveKLController(kl_coef, a.kl_target, a.kl_horizon) if a.adaptive_kl
                       else self.rmk.FixedKLController(kl_coef))
        self.group = torch.distributed.group.WORLD if dist.enabled else None
        self.policy_ddp = DDP(self.policy) if dist.enabled else self.policy
        self.value_ddp = DDP(self.value_model) if dist.enabled else self.value_model
        self.writer = self.writes.now(MetricsWriter, self.metrics_path, self.step if a.resume else None)

    def prepare_output_dir(self):
        """The output directory (rank 0), without what killed checkpoint writes left in it."""
        T.make_output_dir(self.out_dir)
        T.remove_stale_checkpoint_dirs(self.out_dir, self.log)

    def make_optimizer(self):
        params = [{"params": list(self.policy.parameters()), "lr": self.a.lr},
                  {"params": list(self.value_model.parameters()), "lr": self.a.value_lr}]
        return torch.optim.AdamW(params, weight_decay=0.0)

    # -- one step -------------------------------------------------------------------------
    def rollout(self, step):
        """Sample this step's responses and compute their log-probs, values, scores and the
        advantages. Returns a dict of tensors."""
        a, dist, core, tok = self.a, self.dist, self.core, self.tokenizer
        # Every step's randomness comes from (seed, step, rank): a resumed run samples what the
        # uninterrupted run would have sampled.
        torch.manual_seed(a.seed * 1_000_003 + step * dist.world_size + dist.rank)
        idx = torch.randint(0, len(self.prompt_ids), (a.batch_size,)).tolist()
        p_ids, p_mask = core.left_pad([self.prompt_ids[i] for i in idx], tok.pad_token_id, dist.device)
        error = None
        try:
            roll = core.generate(self.policy, p_ids, p_mask, max_new_tokens=a.max_new_tokens,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 temperature=a.temperature)
        except core.NonFiniteLogits:  # a diverged policy (its logits overflow on some prompts)
            error = T.nonfinite_logits(step, self.last_ckpt)
        T.share_outcome(dist, error)  # every rank stops together (a collective under torchrun)
        head = self.reward_model.score
        with torch.no_grad():
            old_logprobs = core.policy_logprobs(self.policy, roll, a.temperature)
            ref_logprobs = core.policy_logprobs(self.ref, roll, a.temperature)
            old_values = self.value_model(roll)
            raw_scores = core.reward_scores(self.reward_model.base_model, head.weight, getattr(head, "bias", None),
                                            roll, backend=a.backend, pad_token_id=core.scoring_pad_id(tok))
            scores = raw_scores
            if a.missing_eos_penalty is not None:
                has_eos = (roll.sequences[:, roll.prompt_len:] == tok.eos_token_id).any(dim=1)
                scores = scores - a.missing_eos_penalty * (~has_eos).float()
            adv = self.rmk.ppo_advantages(old_logprobs, ref_logprobs, old_values, scores, roll.response_mask,
                                          kl_coef=self.kl_ctl.value, gamma=a.gamma, lam=a.lam,
                                          kl_estimator=a.kl_estimator, kl_clamp=a.kl_clamp, score_clip=a.score_clip,
                                          whiten=a.whiten, shift_mean=a.shift_mean, unbiased=a.unbiased,
                                          process_group=self.group, backend=a.backend)
        return {"roll": roll, "old_logprobs": old_logprobs, "old_values": old_values, "raw_scores": raw_scores,
                "adv": adv}

    def update(self, step, r):
        """The PPO epochs over minibatches of the rollouts. Returns the mean losses."""
        a, dist, core = self.a, self.dist, self.core
        roll, adv, mask = r["roll"], r["adv"], r["roll"].response_mask
        stats = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
        bonus = a.entropy_coef > 0
        if bonus:  # the entropy, logged only with --entropy-coef
            stats["entropy"] = 0.0
        if a.clip_ratio_c is not None:  # dual-clip's own clip fraction, logged only when it is on
            stats["clipfrac_lower"] = 0.0
        n_updates = 0
        gen = torch.Generator().manual_seed(a.seed * 7919 + step * dist.world_size + dist.rank)
        params = list(self.policy.parameters()) + list(self.value_model.parameters())
        for _ in range(a.ppo_epochs):
            for mb in core.minibatch_indices(a.batch_size, a.minibatches, gen):
                sub = core.select(roll, mb)
                new_logprobs = core.policy_logprobs(self.policy_ddp, sub, a.temperature, return_entropy=bonus)
                if bonus:
                    new_logprobs, entropy = new_logprobs
                new_values = self.value_ddp(sub)
                dp = core.data_parallel_agg(mask[mb], dist)  # under torchrun: the whole minibatch's counts
                pg_loss, clipfrac, approx_kl, clipfrac_lower = core.ppo_policy_loss(
                    new_logprobs, r["old_logprobs"][mb], adv.advantages[mb], mask[mb], a.clip_range,
                    a.clip_range_high, a.loss_agg, a.max_new_tokens, clip_ratio_c=a.clip_ratio_c,
                    return_clipfrac_lower=True, dp=dp)
                vf_loss, _ = core.ppo_value_loss(new_values, r["old_values"][mb], adv.returns[mb], mask[mb],
                                                 a.clip_range_value, a.loss_agg, a.max_new_tokens, dp=dp)
                loss = pg_loss + a.vf_coef * vf_loss
                if bonus:
                    term, entropy_mean = core.entropy_bonus(entropy, mask[mb], a.entropy_coef, a.loss_agg,
                                                            a.max_new_tokens, dp=dp)
                    loss = loss + term
                    stats["entropy"] += entropy_mean.item()
                # every rank stops together (no rank left waiting in an all-reduce)
                if dist.any(not bool(torch.isfinite(loss.detach()))):
                    raise TrainingError(f"step {step + 1}: the PPO loss is not finite (here {loss.item()}); lower "
                                        f"--lr or --kl-coef, or set --score-clip")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
                self.optimizer.step()
                stats["pg_loss"] += pg_loss.item()
                stats["vf_loss"] += vf_loss.item()
                stats["clipfrac"] += clipfrac.item()
                stats["approx_kl"] += approx_kl.item()
                if "clipfrac_lower" in stats:
                    stats["clipfrac_lower"] += clipfrac_lower.item()
                n_updates += 1
        # diverged weights stop every rank here (one line), not the next step's sampling
        T.check_finite_after_update(dist, step + 1, self.last_ckpt, ("policy", self.policy),
                                    ("value_model", self.value_model))
        return {k: v / max(n_updates, 1) for k, v in stats.items()}

    def step_record(self, step, r, stats, t0):
        """The metrics of one step (means over every rank); updates the KL controller."""
        a, dist = self.a, self.dist
        mask, adv = r["roll"].response_mask, r["adv"]
        seq_kl = adv.kl.sum(dim=1)  # the estimator's KL per response (0 at masked tokens)
        # Whitening diagnostics: over the whole batch (every rank) the whitened advantages have mean
        # 0 and variance 1; one rank's share alone does not, when the statistics were all-reduced.
        m = mask.double()
        n_loc, s1_loc = m.sum().item(), (adv.advantages.double() * m).sum().item()
        # with the step's sums, whether rank 0's last write failed (the previous step's line of
        # metrics.jsonl): every rank stops here with one line (no collective of its own); and each
        # rank's mean advantage, at its own index of a world-size vector (the sum gathers them)
        own_mean = [0.0] * dist.world_size
        own_mean[dist.rank] = s1_loc / max(n_loc, 1.0)
        n_all, s1_all, s2_all, failed, *rank_means = dist.sum(
            [n_loc, s1_loc, (adv.advantages.double() ** 2 * m).sum().item(), self.writes.failed] + own_mean)
        self.writes.check(failed)
        adv_mean = s1_all / max(n_all, 1.0)
        adv_var = (s2_all - n_all * adv_mean ** 2) / max(n_all - 1.0, 1.0)
        extra = [k for k in ("clipfrac_lower", "entropy") if k in stats]  # with --clip-ratio-c, --entropy-coef
        local = [r["raw_scores"].mean().item(), seq_kl.mean().item(), mask.float().sum(1).mean().item()] + \
            [stats[k] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", *extra)]
        score, kl, resp_len, pg, vf, cf, akl, *extra_values = dist.mean(local)
        if not math.isfinite(kl):
            raise TrainingError(f"step {step + 1}: the KL to the reference is {kl}; lower --lr")
        coef_used = self.kl_ctl.value
        self.kl_ctl.update(kl, a.batch_size * dist.world_size)
        return {"step": step + 1, "split": "train", "score": score, "kl": kl, "kl_coef": coef_used,
                "pg_loss": pg, "vf_loss": vf, "clipfrac": cf, "policy_kl": akl, **dict(zip(extra, extra_values)),
                "response_length": resp_len, "adv_mean": adv_mean, "adv_var": adv_var,
                "adv_mean_per_rank": rank_means, "time": time.time() - t0}

    def checkpoint(self):
        a = self.a
        self.writes.check()  # not after a failed metrics.jsonl line (every rank stops here with its line)
        # never a checkpoint of NaN / infinite weights (so last_ckpt is always a good one)
        T.check_finite_before_saving(self.dist, self.step, self.last_ckpt, ("policy", self.policy),
                                     ("value_model", self.value_model))
        state = {"step": self.step, "kl_coef": self.kl_ctl.value, "data_sha256": self.data_sha256,
                 "args": {**vars(a), "world_size": self.dist.world_size}}
        # rank 0 writes; every rank learns whether it could (a disk full stops every rank with one line)
        self.last_ckpt = T.save_checkpoint_on_main(
            self.dist, self.out_dir, self.step,
            lambda tmp: write_checkpoint(tmp, self.policy, self.ref, self.value_model, self.optimizer,
                                         self.tokenizer, state),
            a.save_total_limit)

    # -- the run ----------------------------------------------------------------------------
    def run(self):
        self.setup()
        a = self.a
        self.t_start = time.time()  # PPO time (after the reward model is trained and every model loaded)
        bar = self.log.bar = T.progress_bar(a, self.dist, total=a.steps, initial=self.step, desc="ppo")
        try:
            while self.step < a.steps and (a.stop_after is None or self.steps_this_run < a.stop_after):
                t0 = time.time()
                r = self.rollout(self.step)
                stats = self.update(self.step, r)
                rec = self.step_record(self.step, r, stats, t0)
                self.step += 1
                self.steps_this_run += 1
                T.fault_point("step")
                # rank 0 (self.writer: None on the others); a failure stops every rank at the next check
                self.writes(lambda r: self.writer.write(r), rec)
                if bar is not None:
                    bar.set_postfix(score=f"{rec['score']:.3f}", kl=f"{rec['kl']:.3f}",
                                    kl_coef=f"{rec['kl_coef']:.4f}")
                    bar.update(1)
                if self.step % a.save_every == 0 or self.step == a.steps:
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()
            self.log.bar = None
        return self.finish()

    def finish(self):
        dist = self.dist
        if self.last_ckpt != T.checkpoint_path(self.out_dir, self.step):  # --stop-after
            self.checkpoint()
        T.check_ranks_hold_the_same(dist, self.policy, self.value_model)
        # rank 0's files, then every rank learns whether they were written (cli_main's barrier,
        # a collective, follows: a rank 0 that stopped alone would leave the others in it)
        self.writes.now(self.write_outputs)
        return 0

    def write_outputs(self):
        """The final policy, the plot, final.json and the last line (rank 0)."""
        from rmkernels_train.utils import plot_curves, read_metrics

        a, dist = self.a, self.dist
        with T.atomic_dir(os.path.join(a.output_dir, "policy")) as tmp:
            self.policy.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        if a.plot:
            plot_curves(self.metrics_path, os.path.join(a.output_dir, "curves.png"),
                        keys=("score", "kl", "kl_coef", "vf_loss"), title=PROG)
        recs = [r for r in read_metrics(self.metrics_path, required=TRAIN_METRICS) if r.get("split") == "train"]
        if not recs:
            return 0
        k = max(1, min(10, len(recs) // 4))
        first = sum(r["score"] for r in recs[:k]) / k
        last = sum(r["score"] for r in recs[-k:]) / k
        status = T.run_status(self.step, a.steps, self.steps_this_run, "--steps")
        summary = {"advantage": "gae", "seed": a.seed, "steps": self.step, "done": self.step >= a.steps,
                   "steps_averaged": k, "score_first": first, "score_last": last, "kl": recs[-1]["kl"],
                   "kl_coef": recs[-1]["kl_coef"], "world_size": dist.world_size, "reward_model": self.reward_dir,
                   "checkpoint": self.last_ckpt}
        T.write_final(a.output_dir, summary)
        print(f"{PROG}: {status}{len(recs)} steps (PPO {time.time() - self.t_start:.0f}s in this run); mean "
              f"reward-model score of the policy's responses: first {k} steps {first:.3f} -> last {k} steps "
              f"{last:.3f} ({last - first:+.3f}); KL to the reference {recs[-1]['kl']:.3f}, kl_coef "
              f"{recs[-1]['kl_coef']:.4f}; {dist.world_size} process(es), parameters identical on every rank. "
              f"Outputs in {a.output_dir}", flush=True)
        return 0


def train(args, dist, log):
    if args.advantage != "gae":  # critic-free: the default RL run (rmkernels_train.rl)
        from rmkernels_train.rl import CriticFreeTrainer

        return CriticFreeTrainer(args, dist, log).run()
    return PPOTrainer(args, dist, log).run()


def main(argv=None):
    return T.cli_main(PROG, build_parser(), check_args, train, argv, built_in=lambda a: a.policy is None)


if __name__ == "__main__":
    sys.exit(main())
