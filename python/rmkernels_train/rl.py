"""The default RL run of ``rmkernels-train ppo``: reward model, warm start, critic-free RL,
with the task success measured by a checker before RL and at every evaluation.

    rmkernels-train ppo                         # the default: --advantage grpo
    rmkernels-train ppo --reward checker        # control: the checker is the reward
    rmkernels-train ppo --advantage rloo        # another critic-free estimator
    rmkernels-train ppo --advantage gae         # PPO with a value model and GAE

The pipeline (every piece is cached in ``--output-dir``, so a second run reuses it):

1. the default reward model of ``rmkernels-train reward`` (``<output-dir>/reward_model``),
   unless ``--reward-model`` is given;
2. the warm start (:mod:`rmkernels_train.sft`, ``<output-dir>/warm_start``) unless
   ``--policy`` is given: a tiny Llama trained for a few supervised steps on correct answers,
   stopped while it solves about a third of the held-out prompts;
3. critic-free RL (:mod:`rmkernels_train.grpo`) against the reward model, with the KL to the
   warm-start policy in the loss;
4. the held-out task success before RL, every ``--eval-every`` steps and at the end, next to
   the reward model's score: ``metrics.jsonl`` rows with ``"split": "eval"``. The run ends by
   printing the task success before and after, and whether the reward-model score and the task
   success moved together (when the score rises and the success does not, the policy is
   exploiting the reward model: reward hacking).
"""
import copy
import json
import math
import os
import random
import sys
import time

import torch

from rmkernels_train.utils import TrainingError

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "gae")
REWARDS = ("model", "checker")
KL_MODES = ("loss", "reward")

# Defaults of the critic-free run (issue 17's measured recipe); `--advantage gae` keeps the
# PPO defaults of ppo.py.
CRITIC_FREE_DEFAULTS = {"steps": 400, "lr": 3e-4, "kl_coef": 0.5, "kl_estimator": "k3", "batch_size": 16}


def add_arguments(p):
    """The options of the default run (added to ``rmkernels-train ppo``'s parser)."""
    g = p.add_argument_group("the RL run (critic-free estimators, warm start, task success)")
    g.add_argument("--advantage", choices=ADVANTAGES, default="grpo",
                   help="grpo/dr_grpo/rloo: critic-free, rewards compared within the --num-generations responses "
                        "to each prompt (rmk.group_advantages), no value model; gae: PPO with a value model "
                        "(rmk.ppo_advantages)")
    g.add_argument("--num-generations", type=int, default=8, metavar="G",
                   help="responses sampled per prompt (critic-free estimators; --batch-size counts prompts)")
    g.add_argument("--reward", choices=REWARDS, default="model",
                   help="model: the reward model's score; checker: 1 if the response is exactly the sorted "
                        "digits, else 0 (a control: is the reward model the bottleneck?)")
    g.add_argument("--kl-mode", choices=KL_MODES, default="loss",
                   help="loss: kl-coef x the --kl-estimator KL to the reference, a loss term; reward: kl-coef x "
                        "the k1 KL of each response subtracted from its reward")
    g.add_argument("--warm-start-steps", type=int, default=100,
                   help="supervised steps of the default policy on correct answers before RL (cached in "
                        "<output-dir>/warm_start; 0 = RL from a random init)")
    g.add_argument("--eval-every", type=int, default=100, help="steps between task evaluations")
    g.add_argument("--eval-prompts", type=int, default=500,
                   help="held-out prompts of each task evaluation (at most 500)")


def resolve_defaults(a):
    """Fill the options left at None with the defaults of the chosen estimator."""
    if a.advantage != "gae":
        for k, v in CRITIC_FREE_DEFAULTS.items():
            if getattr(a, k, None) is None:
                setattr(a, k, v)


def check_args(a):
    for name in ("num_generations", "eval_every", "eval_prompts"):
        if getattr(a, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.advantage != "gae" and a.num_generations < 2:
        raise TrainingError(f"--num-generations must be >= 2 for --advantage {a.advantage} (the advantages compare "
                            f"the responses to one prompt), got {a.num_generations}")
    if a.warm_start_steps < 0:
        raise TrainingError(f"--warm-start-steps must be >= 0, got {a.warm_start_steps}")
    if a.reward == "checker" and a.prompts is not None:
        raise TrainingError("--reward checker checks the built-in sorting task: it cannot be used with --prompts")
    if a.kl_estimator not in ("k1", "k2", "k3") and a.advantage != "gae":
        raise TrainingError(f"--kl-estimator {a.kl_estimator}: the critic-free run's KL loss takes k1, k2 or k3")


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"


def run(a, dist):
    """The critic-free run (``a.advantage`` in grpo/dr_grpo/rloo), single process."""
    from rmkernels_train import grpo, sft, task
    from rmkernels_train.model import load_reward_model, load_tokenizer
    from rmkernels_train.ppo import default_prompts, encode_prompts, load_prompts, train_default_reward_model
    from rmkernels_train.utils import MetricsWriter, atomic_dir, atomic_write_text, plot_curves

    if dist.enabled:
        raise TrainingError(f"--advantage {a.advantage} runs in one process (use --advantage gae under torchrun)")
    t_all = time.time()
    cpu0 = time.process_time()
    os.makedirs(a.output_dir, exist_ok=True)

    def log(msg):
        print(f"[rmkernels-train ppo] {msg}", file=sys.stderr, flush=True)

    t_rm = time.time()
    reward_dir = a.reward_model or train_default_reward_model(a.output_dir, dist, a.threads)
    rm_seconds = time.time() - t_rm
    tokenizer = load_tokenizer(reward_dir)
    reward_model = load_reward_model(reward_dir).to(dist.device)
    reward_model.requires_grad_(False)
    reward_model.eval()
    train_prompts, held_prompts = task.task_prompts()
    if a.prompts:
        train_prompts = load_prompts(a.prompts)
    held_prompts = held_prompts[:a.eval_prompts]
    t_ws = time.time()
    if a.policy is not None:
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(a.policy).to(dist.device)
        ws_info = {"policy": a.policy}
    elif a.warm_start_steps > 0:
        settings = {**sft.DEFAULTS, "steps": a.warm_start_steps, "layers": a.policy_layers,
                    "hidden": a.policy_hidden, "seed": a.seed}
        policy, ws_info = sft.warm_start(a.output_dir, tokenizer, task.task_prompts()[0], settings,
                                         device=dist.device, log=log)
    else:
        torch.manual_seed(a.seed)
        policy = sft.build_policy(tokenizer, layers=a.policy_layers, hidden=a.policy_hidden).to(dist.device)
        ws_info = {"random_init": True}
    ws_seconds = time.time() - t_ws
    ref = copy.deepcopy(policy)
    ref.requires_grad_(False)
    ref.eval()
    policy.train()
    train_ids = encode_prompts(train_prompts, tokenizer)
    held_ids = encode_prompts(held_prompts, tokenizer)
    if any(len(p) == 0 for p in train_ids):
        raise TrainingError("a prompt tokenizes to no tokens")

    metrics_path = os.path.join(a.output_dir, "metrics.jsonl")
    writer = MetricsWriter(metrics_path)
    ev_kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed + 1, backend=a.backend)

    def do_eval(step):
        ev = grpo.evaluate(policy, ref, reward_model, tokenizer, held_prompts, held_ids, **ev_kw)
        rec = {"step": step, "split": "eval", **ev}
        if evals:
            rec["score_change"] = ev["score"] - evals[0]["score"]
            rec["task_success_change"] = ev["task_success"] - evals[0]["task_success"]
        writer.write(rec)
        evals.append(rec)
        msg = (f"eval step {step}: task success {ev['task_success']:.3f} greedy, {ev['task_success_sampled']:.3f} "
               f"sampled ({ev['prompts']} held-out prompts); reward-model score {ev['score']:.3f}; KL {ev['kl']:.3f}; "
               f"reward model ranks right over wrong {_fmt(ev['rm_auc'])}")
        (pbar.write(msg, file=sys.stderr) if pbar is not None else log(msg))
        return rec

    evals, pbar = [], None
    do_eval(0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=0.0)
    rng = random.Random(a.seed)
    t_rl = time.time()
    if a.progress:
        from tqdm import tqdm

        pbar = tqdm(total=a.steps, desc=f"rl ({a.advantage})", dynamic_ncols=True, file=sys.stderr)
    for step in range(a.steps):
        torch.manual_seed(a.seed * 1_000_003 + step)
        idx = rng.sample(range(len(train_prompts)), min(a.batch_size, len(train_prompts)))
        r = grpo.rl_step(policy, ref, reward_model, optimizer, tokenizer, [train_prompts[i] for i in idx],
                         [train_ids[i] for i in idx], num_generations=a.num_generations, estimator=a.advantage,
                         reward=a.reward, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, kl_mode=a.kl_mode,
                         max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                         max_grad_norm=a.max_grad_norm, backend=a.backend)
        if not math.isfinite(r["kl"]):
            raise TrainingError(f"step {step + 1}: the KL to the reference is {r['kl']}; lower --lr")
        writer.write({"step": step + 1, "split": "train", **r})
        if pbar is not None:
            pbar.set_postfix(score=f"{r['score']:.2f}", ok=f"{r['train_success']:.2f}", kl=f"{r['kl']:.3f}",
                             refresh=False)
            pbar.update(1)
        if (step + 1) % a.eval_every == 0 and step + 1 != a.steps:
            do_eval(step + 1)
    last = do_eval(a.steps)
    if pbar is not None:
        pbar.close()
    rl_seconds = time.time() - t_rl
    with atomic_dir(os.path.join(a.output_dir, "policy")) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if a.plot:
        plot_curves(metrics_path, os.path.join(a.output_dir, "curves.png"),
                    keys=("task_success", "task_success_sampled", "score", "kl"),
                    title=f"rmkernels-train ppo --advantage {a.advantage} --reward {a.reward}")
    first = evals[0]
    d_score, d_ok = last["score"] - first["score"], last["task_success"] - first["task_success"]
    verdict = together(d_score, d_ok, a.reward)
    summary = {"advantage": a.advantage, "reward": a.reward, "seed": a.seed, "steps": a.steps,
               "before": first, "after": last, "verdict": verdict, "warm_start": ws_info,
               "reward_model": reward_dir, "time_s": {"reward_model": round(rm_seconds, 1),
                                                      "warm_start": round(ws_seconds, 1), "rl": round(rl_seconds, 1),
                                                      "total": round(time.time() - t_all, 1),
                                                      "process_cpu": round(time.process_time() - cpu0, 1)}}
    atomic_write_text(os.path.join(a.output_dir, "final.json"), json.dumps(summary, indent=1) + "\n")
    print(f"rmkernels-train ppo: {a.steps} {a.advantage} steps in {rl_seconds:.0f} s. Held-out task success "
          f"(greedy): {first['task_success']:.3f} -> {last['task_success']:.3f} ({d_ok:+.3f}); sampled "
          f"{first['task_success_sampled']:.3f} -> {last['task_success_sampled']:.3f}; reward-model score "
          f"{first['score']:.3f} -> {last['score']:.3f} ({d_score:+.3f}); KL to the warm start {last['kl']:.3f}. "
          f"{verdict} Outputs in {a.output_dir}", flush=True)
    return 0


def together(d_score, d_success, reward="model", tol=0.02):
    """One sentence on how the reward-model score and the task success moved."""
    if reward == "checker":
        return "(The checker was the reward: the reward model did not steer this run.)"
    if d_score > 0 and d_success > tol:
        return "The reward-model score and the task success rose together."
    if d_score > 0 and d_success <= tol:
        return ("WARNING: the reward-model score rose but the task success did not: the policy is exploiting the "
                "reward model (reward hacking); raise --kl-coef or lower --lr.")
    if d_success > tol:
        return "The task success rose while the reward-model score did not."
    return "Neither the reward-model score nor the task success rose."
