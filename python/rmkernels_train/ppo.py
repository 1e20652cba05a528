"""``rmkernels-train ppo``: PPO against a reward model, with the fused advantages.

Each step:

1. rollouts: ``generate`` samples a response to each prompt from the policy;
2. per-token log-probs of the policy and of the frozen reference policy, the value model's
   values, and the reward model's score of each sequence (``rmk.last_token_reward`` on the
   last valid token);
3. ``rmk.ppo_advantages``: the KL-penalised rewards, GAE advantages (whitened over the whole
   batch -- of every rank under torchrun, through ``process_group``) and returns, in one op;
4. PPO epochs over minibatches: the clipped policy loss and the clipped value loss;
5. the KL coefficient follows ``rmk.AdaptiveKLController`` (or stays fixed).

With no options it runs the built-in default: prompts of the "sort these digits" task of
``rmkernels-train reward``, the reward model that command trains by default (trained first,
into ``<output-dir>/reward_model``, unless ``--reward-model`` is given), a random-init tiny
Llama policy, all on CPU in a few minutes; the mean score of the policy's responses rises,
and the run prints it.

Outputs in ``--output-dir``: ``metrics.jsonl`` (one line per step), ``curves.png``,
``checkpoint/`` (written atomically every ``--save-every`` steps and at the end; ``--resume``
continues from it exactly: the sampling of each step is seeded from (seed, step, rank)), and
``policy/`` (the final policy as an HF checkpoint with its tokenizer).
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch

from rmkernels_train.utils import TrainingError

KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "kl", "mse", "low_var_kl")


def build_parser():
    p = argparse.ArgumentParser(
        prog="rmkernels-train ppo",
        description="PPO against a reward model with the fused advantages (rmk.ppo_advantages).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models and data")
    g.add_argument("--reward-model", metavar="DIR", default=None,
                   help="reward model trained by `rmkernels-train reward` (an HF *ForSequenceClassification "
                        "checkpoint with its tokenizer); default: train the built-in one first")
    g.add_argument("--policy", metavar="DIR", default=None,
                   help="initial policy (HF causal-LM checkpoint sharing the reward model's tokenizer); "
                        "default: a random-init tiny Llama")
    g.add_argument("--prompts", metavar="FILE", default=None,
                   help='JSONL file with a "prompt" string per line; default: the built-in sorting prompts')
    g.add_argument("--output-dir", default="runs/ppo", help="metrics, curves, checkpoints")
    g.add_argument("--policy-layers", type=int, default=2, help="layers of the default tiny policy")
    g.add_argument("--policy-hidden", type=int, default=64, help="hidden size of the default tiny policy")
    g = p.add_argument_group("rollouts")
    g.add_argument("--steps", type=int, default=None,
                   help="RL steps (rollout + update); default 400 critic-free, 80 with --advantage gae")
    g.add_argument("--batch-size", type=int, default=None,
                   help="critic-free: prompts per step (each sampled --num-generations times), default 16; "
                        "--advantage gae: rollouts per step per process, default 32")
    g.add_argument("--max-new-tokens", type=int, default=8)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--missing-eos-penalty", type=float, default=None,
                   help="subtracted from the score of a response with no EOS (TRL's option)")
    g = p.add_argument_group("advantages (rmk.ppo_advantages)")
    g.add_argument("--kl-estimator", choices=KL_ESTIMATORS, default=None,
                   help="default k3 (critic-free, a loss term), k1 (--advantage gae, in the reward)")
    g.add_argument("--kl-coef", type=float, default=None,
                   help="(initial) KL coefficient; default 0.5 critic-free, 0.05 with --advantage gae")
    g.add_argument("--adaptive-kl", action="store_true", help="adapt the KL coefficient (Ziegler et al.)")
    g.add_argument("--kl-target", type=float, default=1.0, help="target KL (nats per response) of --adaptive-kl")
    g.add_argument("--kl-horizon", type=float, default=2000.0, help="horizon (samples) of --adaptive-kl")
    g.add_argument("--kl-clamp", type=float, default=None, help="clamp the per-token KL to [-c, c]")
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lam", type=float, default=0.95)
    g.add_argument("--score-clip", type=float, default=None, help="clamp the scores to [-c, c]")
    g.add_argument("--no-whiten", dest="whiten", action="store_false", help="do not whiten the advantages")
    g.add_argument("--no-shift-mean", dest="shift_mean", action="store_false",
                   help="whitening keeps the advantages' mean")
    g.add_argument("--biased-whiten", dest="unbiased", action="store_false",
                   help="whitening divides the variance by n, not n - 1")
    g = p.add_argument_group("PPO update")
    g.add_argument("--ppo-epochs", type=int, default=4)
    g.add_argument("--minibatches", type=int, default=2, help="minibatches per PPO epoch")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate of the policy; default 3e-4 critic-free, 1e-3 with --advantage gae")
    g.add_argument("--value-lr", type=float, default=1e-3, help="learning rate of the value model")
    g.add_argument("--clip-range", type=float, default=0.2)
    g.add_argument("--clip-range-value", type=float, default=0.2)
    g.add_argument("--vf-coef", type=float, default=0.5)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint")
    g.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (and at the end)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (the tiny default models run fastest on one; 0 = torch's "
                        "default)")
    g.add_argument("--backend", default=None, help="rmkernels backend (reference, cpu, cuda, triton; default auto)")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="do not write curves.png")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    from rmkernels_train import rl

    rl.add_arguments(p)
    return p


# PPO-with-GAE defaults of the options whose default depends on --advantage
GAE_DEFAULTS = {"steps": 80, "lr": 1e-3, "kl_coef": 0.05, "kl_estimator": "k1", "batch_size": 32}


def check_args(a):
    from rmkernels_train import rl

    rl.resolve_defaults(a)
    for k, v in GAE_DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    rl.check_args(a)

    def positive(name, v):
        if not v > 0:
            raise TrainingError(f"--{name} must be > 0, got {v}")

    for name in ("steps", "batch_size", "max_new_tokens", "ppo_epochs", "minibatches", "save_every",
                 "policy_layers", "policy_hidden"):
        positive(name.replace("_", "-"), getattr(a, name))
    for name in ("temperature", "lr", "value_lr", "clip_range", "clip_range_value", "kl_target", "kl_horizon",
                 "max_grad_norm"):
        v = getattr(a, name)
        if not (math.isfinite(v) and v > 0):
            raise TrainingError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
    if not (math.isfinite(a.kl_coef) and a.kl_coef >= 0):
        raise TrainingError(f"--kl-coef must be a finite number >= 0, got {a.kl_coef}")
    if not (math.isfinite(a.vf_coef) and a.vf_coef >= 0):
        raise TrainingError(f"--vf-coef must be a finite number >= 0, got {a.vf_coef}")
    if not 0.0 <= a.gamma:
        raise TrainingError(f"--gamma must be >= 0, got {a.gamma}")
    if not 0.0 <= a.lam <= 1.0:
        raise TrainingError(f"--lam must be in [0, 1], got {a.lam}")
    if a.backend is not None:
        import rmkernels as rmk

        if a.backend not in tuple(rmk.BACKENDS) + ("auto",):
            raise TrainingError(f"--backend must be one of {', '.join(rmk.BACKENDS)} or auto, got {a.backend!r}")
    if a.threads < 0:
        raise TrainingError(f"--threads must be >= 0, got {a.threads}")
    for name in ("kl_clamp", "score_clip"):
        v = getattr(a, name)
        if v is not None and not v > 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    if a.minibatches > a.batch_size:
        raise TrainingError(f"--minibatches ({a.minibatches}) cannot exceed --batch-size ({a.batch_size})")
    for name in ("reward_model", "policy"):
        v = getattr(a, name)
        if v is not None and not os.path.isdir(v):
            raise TrainingError(f"--{name.replace('_', '-')} {v}: not a directory")
    if a.prompts is not None and not os.path.isfile(a.prompts):
        raise TrainingError(f"--prompts {a.prompts}: no such file")


# ---------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------
def load_prompts(path):
    """Prompt strings of a JSONL file (``{"prompt": str}`` per line, blank lines skipped)."""
    prompts = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainingError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
                raise TrainingError(f"{path}:{i}: each line needs a non-empty string field \"prompt\"")
            prompts.append(rec["prompt"])
    if not prompts:
        raise TrainingError(f"{path}: no prompts")
    return prompts


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
    checkpoint directory it reports in ``final.json``. An earlier finished run is reused."""
    rm_dir = os.path.join(out_dir, "reward_model")
    summary_path = os.path.join(rm_dir, "final.json")
    if dist.is_main and not os.path.isfile(summary_path):
        import subprocess

        print(f"rmkernels-train ppo: no --reward-model given: training the default reward model "
              f"(rmkernels-train reward) into {rm_dir}", file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
        cmd = [sys.executable, "-m", "rmkernels_train", "reward", "--output-dir", rm_dir, "--no-progress"]
        if threads > 0:
            cmd += ["--threads", str(threads)]
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            raise TrainingError(f"training the default reward model failed (exit status {rc}); see the messages "
                                f"above, or pass --reward-model DIR")
    dist.barrier()
    try:
        with open(summary_path) as f:
            ckpt = json.load(f)["checkpoint"]
    except (OSError, ValueError, KeyError) as e:
        raise TrainingError(f"cannot read the default reward model's summary {summary_path}: {e}") from None
    return ckpt


def load_models(a, dist, reward_dir):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from rmkernels_train.model import load_reward_model, load_tokenizer, tiny_llama_config
    from rmkernels_train.ppo_core import ValueModel

    tokenizer = load_tokenizer(reward_dir)
    if tokenizer.eos_token_id is None:
        raise TrainingError(f"the tokenizer in {reward_dir} has no eos token: responses could never end")
    reward_model = load_reward_model(reward_dir)
    backbone_rm = reward_model.base_model
    head = getattr(reward_model, "score", None)
    if head is None or not hasattr(head, "weight"):
        raise TrainingError(f"--reward-model {reward_dir}: no linear `score` head found on "
                            f"{type(reward_model).__name__}")
    torch.manual_seed(a.seed)  # the same initial weights on every rank
    if a.policy is not None:
        try:
            policy = AutoModelForCausalLM.from_pretrained(a.policy)
        except Exception as e:
            raise TrainingError(f"--policy {a.policy}: cannot load a causal LM: {str(e).splitlines()[0]}") from None
        if policy.get_input_embeddings().num_embeddings < len(tokenizer):
            raise TrainingError(f"--policy {a.policy}: its vocabulary ({policy.get_input_embeddings().num_embeddings})"
                                f" is smaller than the reward model's tokenizer ({len(tokenizer)})")
    else:
        cfg = tiny_llama_config(tokenizer, hidden_size=a.policy_hidden, num_hidden_layers=a.policy_layers,
                                num_attention_heads=4, intermediate_size=2 * a.policy_hidden)
        policy = LlamaForCausalLM(cfg)
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
# Options that fix what each step samples: they must not change on --resume.
RESUME_FIXED = ("seed", "batch_size", "max_new_tokens", "temperature", "prompts", "policy", "world_size",
                "ppo_epochs", "minibatches")


def save_checkpoint(path, step, policy, ref, value_model, optimizer, kl_ctl, tokenizer, args, world_size):
    from rmkernels_train.utils import atomic_dir

    with atomic_dir(path) as tmp:
        policy.save_pretrained(os.path.join(tmp, "policy"))
        ref.save_pretrained(os.path.join(tmp, "ref_policy"))
        tokenizer.save_pretrained(os.path.join(tmp, "policy"))
        torch.save({"value_model": value_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "kl_coef": kl_ctl.value, "step": step}, os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump({**vars(args), "world_size": world_size}, f, indent=1, sort_keys=True)


def check_resume_args(path, args, world_size):
    try:
        with open(os.path.join(path, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise TrainingError(f"--resume: cannot read {path}/args.json: {e}") from None
    now = {**vars(args), "world_size": world_size}
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_FIXED
               if saved.get(k) != now[k]]
    if changed:
        raise TrainingError("--resume: these options differ from the checkpoint's run, which would change what "
                            "each step samples: " + "; ".join(changed))


def load_checkpoint(path, policy, ref, value_model, optimizer):
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise TrainingError(f"--resume: no checkpoint at {path}")
    try:
        for model, sub in ((policy, "policy"), (ref, "ref_policy")):
            state = load_file(os.path.join(path, sub, "model.safetensors"))
            missing, unexpected = model.load_state_dict(state, strict=False)
            # tied / non-persistent buffers aside, every parameter must come back
            missing = [k for k in missing if k in dict(model.named_parameters())]
            if missing or unexpected:
                raise TrainingError(f"--resume: {path}/{sub} does not match the model (missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]})")
        st = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
        value_model.load_state_dict(st["value_model"])
        optimizer.load_state_dict(st["optimizer"])
    except (OSError, KeyError, RuntimeError) as e:
        raise TrainingError(f"--resume: cannot read the checkpoint in {path}: {str(e).splitlines()[0]}") from None
    return st["step"], st["kl_coef"]


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
def run(a):
    import rmkernels as rmk
    from rmkernels_train import ppo_core as core
    from rmkernels_train.utils import (MetricsWriter, plot_curves, setup_distributed, teardown_distributed)

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bars
    dist = setup_distributed(a.device)
    try:
        return _run(a, rmk, core, dist, MetricsWriter, plot_curves)
    finally:
        teardown_distributed()


def _run(a, rmk, core, dist, MetricsWriter, plot_curves):
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.makedirs(a.output_dir, exist_ok=True)
    reward_dir = a.reward_model or train_default_reward_model(a.output_dir, dist, a.threads)
    tokenizer, policy, ref, value_model, reward_model = load_models(a, dist, reward_dir)
    prompts = load_prompts(a.prompts) if a.prompts else default_prompts()
    prompt_ids = encode_prompts(prompts, tokenizer)
    if any(len(p) == 0 for p in prompt_ids):
        raise TrainingError("a prompt tokenizes to no tokens")

    t_start = time.time()  # PPO time (after the reward model is trained and every model loaded)
    params = [{"params": list(policy.parameters()), "lr": a.lr},
              {"params": list(value_model.parameters()), "lr": a.value_lr}]
    optimizer = torch.optim.AdamW(params, weight_decay=0.0)
    ckpt = os.path.join(a.output_dir, "checkpoint")
    start_step, kl_coef = 0, a.kl_coef
    if a.resume:
        if os.path.isdir(ckpt):
            check_resume_args(ckpt, a, dist.world_size)
        start_step, kl_coef = load_checkpoint(ckpt, policy, ref, value_model, optimizer)
        if start_step >= a.steps:
            raise TrainingError(f"--resume: the checkpoint is at step {start_step}, --steps is {a.steps}: "
                                f"nothing left to do (raise --steps)")
    kl_ctl = (rmk.AdaptiveKLController(kl_coef, a.kl_target, a.kl_horizon) if a.adaptive_kl
              else rmk.FixedKLController(kl_coef))
    group = torch.distributed.group.WORLD if dist.enabled else None
    policy_ddp = DDP(policy) if dist.enabled else policy
    value_ddp = DDP(value_model) if dist.enabled else value_model
    metrics_path = os.path.join(a.output_dir, "metrics.jsonl")
    writer = MetricsWriter(metrics_path, resume_step=start_step if a.resume else None) if dist.is_main else None

    pbar = None
    if dist.is_main and a.progress:
        from tqdm import tqdm

        pbar = tqdm(total=a.steps, initial=start_step, desc="ppo", dynamic_ncols=True, file=sys.stderr)
    head = reward_model.score
    backbone_rm = reward_model.base_model
    n_prompts = len(prompt_ids)
    for step in range(start_step, a.steps):
        t0 = time.time()
        # Every step's randomness comes from (seed, step, rank): a resumed run samples what the
        # uninterrupted run would have sampled.
        torch.manual_seed(a.seed * 1_000_003 + step * dist.world_size + dist.rank)
        idx = torch.randint(0, n_prompts, (a.batch_size,)).tolist()
        p_ids, p_mask = core.left_pad([prompt_ids[i] for i in idx], tokenizer.pad_token_id, dist.device)
        roll = core.generate(policy, p_ids, p_mask, max_new_tokens=a.max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             temperature=a.temperature)
        with torch.no_grad():
            old_logprobs = core.policy_logprobs(policy, roll, a.temperature)
            ref_logprobs = core.policy_logprobs(ref, roll, a.temperature)
            old_values = value_model(roll)
            scores = core.reward_scores(backbone_rm, head.weight, getattr(head, "bias", None), roll,
                                        backend=a.backend)
            raw_scores = scores
            if a.missing_eos_penalty is not None:
                has_eos = (roll.sequences[:, roll.prompt_len:] == tokenizer.eos_token_id).any(dim=1)
                scores = scores - a.missing_eos_penalty * (~has_eos).float()
            adv = rmk.ppo_advantages(old_logprobs, ref_logprobs, old_values, scores, roll.response_mask,
                                     kl_coef=kl_ctl.value, gamma=a.gamma, lam=a.lam, kl_estimator=a.kl_estimator,
                                     kl_clamp=a.kl_clamp, score_clip=a.score_clip, whiten=a.whiten,
                                     shift_mean=a.shift_mean, unbiased=a.unbiased, process_group=group,
                                     backend=a.backend)
        mask = roll.response_mask
        seq_kl = adv.kl.sum(dim=1)  # the estimator's KL per response (0 at masked tokens)
        stats = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
        n_updates = 0
        gen = torch.Generator().manual_seed(a.seed * 7919 + step * dist.world_size + dist.rank)
        for _ in range(a.ppo_epochs):
            for mb in core.minibatch_indices(a.batch_size, a.minibatches, gen):
                sub = core.select(roll, mb)
                new_logprobs = core.policy_logprobs(policy_ddp, sub, a.temperature)
                new_values = value_ddp(sub)
                pg_loss, clipfrac, approx_kl = core.ppo_policy_loss(new_logprobs, old_logprobs[mb],
                                                                    adv.advantages[mb], mask[mb], a.clip_range)
                vf_loss, _ = core.ppo_value_loss(new_values, old_values[mb], adv.returns[mb], mask[mb],
                                                 a.clip_range_value)
                loss = pg_loss + a.vf_coef * vf_loss
                finite = torch.isfinite(loss.detach()).double().reshape(1)
                if dist.enabled:  # every rank stops together (no rank left waiting in an all-reduce)
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if not bool(finite.item()):
                    raise TrainingError(f"step {step + 1}: the PPO loss is not finite (here {loss.item()}); lower "
                                        f"--lr or --kl-coef, or set --score-clip")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(policy.parameters()) + list(value_model.parameters()),
                                               a.max_grad_norm)
                optimizer.step()
                stats["pg_loss"] += pg_loss.item()
                stats["vf_loss"] += vf_loss.item()
                stats["clipfrac"] += clipfrac.item()
                stats["approx_kl"] += approx_kl.item()
                n_updates += 1
        # Whitening diagnostics: over the whole batch (every rank) the whitened advantages have mean
        # 0 and variance 1; one rank's share alone does not, when the statistics were all-reduced.
        m = mask.double()
        n_loc, s1_loc = m.sum().item(), (adv.advantages.double() * m).sum().item()
        n_all, s1_all, s2_all = dist.sum([n_loc, s1_loc, (adv.advantages.double() ** 2 * m).sum().item()])
        adv_mean = s1_all / max(n_all, 1.0)
        adv_var = (s2_all - n_all * adv_mean ** 2) / max(n_all - 1.0, 1.0)
        rank_means = dist.gather_object(s1_loc / max(n_loc, 1.0))
        local = [raw_scores.mean().item(), seq_kl.mean().item(), mask.float().sum(1).mean().item()] + \
                [v / max(n_updates, 1) for v in stats.values()]
        score, kl, resp_len, pg, vf, cf, akl = dist.mean(local)
        if not math.isfinite(kl):
            raise TrainingError(f"step {step + 1}: the KL to the reference is {kl}; lower --lr")
        coef_used = kl_ctl.value
        kl_ctl.update(kl, a.batch_size * dist.world_size)
        rec = {"step": step + 1, "split": "train", "score": score, "kl": kl, "kl_coef": coef_used,
               "pg_loss": pg, "vf_loss": vf, "clipfrac": cf, "policy_kl": akl, "response_length": resp_len,
               "adv_mean": adv_mean, "adv_var": adv_var, "adv_mean_per_rank": rank_means,
               "time": time.time() - t0}
        if writer is not None:
            writer.write(rec)
        if pbar is not None:
            pbar.set_postfix(score=f"{score:.3f}", kl=f"{kl:.3f}", kl_coef=f"{coef_used:.4f}")
            pbar.update(1)
        if (step + 1) % a.save_every == 0 or step + 1 == a.steps:
            if dist.is_main:
                save_checkpoint(ckpt, step + 1, policy, ref, value_model, optimizer, kl_ctl, tokenizer, a,
                                dist.world_size)
            dist.barrier()
    if pbar is not None:
        pbar.close()
    from rmkernels_train.utils import param_digest

    digests = dist.gather_object((param_digest(policy), param_digest(value_model)))
    if len(set(digests)) != 1:
        raise TrainingError(f"DDP ranks ended with different parameters: {digests}")
    if dist.is_main:
        from rmkernels_train.utils import atomic_dir, read_metrics

        with atomic_dir(os.path.join(a.output_dir, "policy")) as tmp:
            policy.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if a.plot:
            plot_curves(metrics_path, os.path.join(a.output_dir, "curves.png"),
                        keys=("score", "kl", "kl_coef", "vf_loss"), title="rmkernels-train ppo")
        recs = [r for r in read_metrics(metrics_path) if r.get("split") == "train"]
        k = max(1, min(10, len(recs) // 4))
        first = sum(r["score"] for r in recs[:k]) / k
        last = sum(r["score"] for r in recs[-k:]) / k
        print(f"rmkernels-train ppo: {len(recs)} steps (PPO {time.time() - t_start:.0f}s in this run); mean reward-model score "
              f"of the policy's responses: first {k} steps {first:.3f} -> last {k} steps {last:.3f} "
              f"({last - first:+.3f}); KL to the reference {recs[-1]['kl']:.3f}, kl_coef "
              f"{recs[-1]['kl_coef']:.4f}; {dist.world_size} process(es), parameters identical on every rank. "
              f"Outputs in {a.output_dir}", flush=True)
    return 0


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        check_args(a)
        if a.advantage != "gae":
            from rmkernels_train import rl
            from rmkernels_train.utils import setup_distributed, teardown_distributed

            if a.threads > 0:
                torch.set_num_threads(a.threads)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            dist = setup_distributed(a.device)
            try:
                return rl.run(a, dist)
            finally:
                teardown_distributed()
        return run(a)
    except TrainingError as e:
        print(f"rmkernels-train ppo: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
