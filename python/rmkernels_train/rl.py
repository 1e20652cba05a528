"""The default RL run of ``rmkernels-train ppo``: reward model, warm start, critic-free RL,
with the task success measured by a checker before RL and at every evaluation.

    rmkernels-train ppo                         # the default: --advantage grpo
    rmkernels-train ppo --reward checker        # control: the checker is the reward
    rmkernels-train ppo --advantage rloo        # another critic-free estimator (dr_grpo, opo, gpg, ...)
    rmkernels-train ppo --advantage reinforce_pp  # REINFORCE++ (or remax: the greedy response as baseline)
    rmkernels-train ppo --advantage gae         # PPO with a value model and GAE
    torchrun --nproc_per_node 2 -m rmkernels_train ppo   # data parallel (any estimator; CriticFreeTrainer)

The pipeline (every piece is cached in ``--output-dir``, so a second run reuses it):

1. the default reward model of ``rmkernels-train reward`` (``<output-dir>/reward_model``),
   unless ``--reward-model`` is given;
2. the warm start (:mod:`rmkernels_train.sft`, ``<output-dir>/warm_start``) unless
   ``--policy`` is given: a tiny Llama trained for a few supervised steps on correct answers,
   stopped while it solves about a third of the held-out prompts;
3. critic-free RL (:mod:`rmkernels_train.grpo`) against the reward model, with the KL to the
   warm-start policy in the loss: one on-policy step per rollout batch by default, or
   ``--ppo-epochs`` x ``--minibatches`` clipped updates (``--clip-range``, ``--clip-range-high``,
   ``--clip-ratio-c``'s dual-clip), the token losses aggregated as ``--loss-agg`` says;
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
import time

import torch

from rmkernels._codes import GROUP_ESTIMATORS
from rmkernels_train.grpo import CRITIC_FREE, KL_LOSS_ALIASES, KL_LOSS_ESTIMATORS
from rmkernels_train.utils import TrainingError

ADVANTAGES = (*CRITIC_FREE, "gae")
REWARDS = ("model", "checker")
KL_MODES = ("loss", "reward")

# The defaults of the options of `rmkernels-train ppo` that depend on --advantage: the
# critic-free run (issue 17's measured recipe, 1000 steps) and PPO with GAE. Each of these
# options defaults to None in the parser, so that "given on the command line" is known: an
# option in only one table belongs to that path alone, and the other path refuses it when it is
# given (resolve_defaults) instead of ignoring it. Options whose default is None here are off unless
# given (--kl-clamp, --score-clip, --missing-eos-penalty).
# --clip-range (CLIP_RANGE), --clip-range-high (default: --clip-range), --clip-ratio-c (default
# off: None) and --loss-agg (token-mean) are both paths' with one default (in the parser).
CLIP_RANGE = 0.2
CRITIC_FREE_DEFAULTS = {"steps": 1000, "lr": 3e-4, "kl_coef": 0.5, "kl_estimator": "k3", "batch_size": 16,
                        "ppo_epochs": 1, "minibatches": 1, "num_generations": 8, "reward": "model",
                        "kl_mode": "loss", "warm_start_steps": 100, "eval_every": 100, "eval_prompts": 500}
GAE_DEFAULTS = {"steps": 80, "lr": 1e-3, "kl_coef": 0.05, "kl_estimator": "k1", "batch_size": 32,
                "ppo_epochs": 4, "minibatches": 2, "value_lr": 1e-3, "clip_range_value": 0.2,
                "vf_coef": 0.5, "gamma": 1.0, "lam": 0.95, "adaptive_kl": False, "kl_target": 1.0,
                "kl_horizon": 2000.0, "kl_clamp": None, "score_clip": None, "whiten": True, "shift_mean": True,
                "unbiased": True, "missing_eos_penalty": None}
# The command-line spelling of the options whose flag is not --<dest>.
FLAGS = {"whiten": "--no-whiten", "shift_mean": "--no-shift-mean", "unbiased": "--biased-whiten"}


def flag(dest):
    return FLAGS.get(dest, "--" + dest.replace("_", "-"))


def add_arguments(p):
    """The options of the default run (added to ``rmkernels-train ppo``'s parser)."""
    g = p.add_argument_group("the RL run (critic-free estimators, warm start, task success; --advantage gae: PPO "
                             "as configured above, from --policy or a random init, and it refuses the options "
                             "below but --advantage)")
    g.add_argument("--advantage", choices=ADVANTAGES, default="grpo",
                   help="grpo, dr_grpo, rloo, opo, gpg, reinforce_pp_baseline: critic-free, the rewards compared "
                        "within the --num-generations responses to each prompt (rmk.group_advantages), no value "
                        "model; reinforce_pp: each response's token returns whitened over the batch "
                        "(rmk.reinforce_pp_advantages); remax: its returns minus the reward of the prompt's greedy "
                        "response (rmk.remax_advantages); gae: PPO with a value model (rmk.ppo_advantages)")
    g.add_argument("--num-generations", type=int, default=None, metavar="G",
                   help="responses sampled per prompt; default 8 (--batch-size counts prompts; 1 is allowed for "
                        "reinforce_pp and remax)")
    g.add_argument("--reward", choices=REWARDS, default=None,
                   help="model (the default): the reward model's score; checker: 1 if the response is exactly the "
                        "sorted digits, else 0 (a control: is the reward model the bottleneck?)")
    g.add_argument("--kl-mode", choices=KL_MODES, default=None,
                   help="loss (the default): kl-coef x the --kl-estimator KL to the reference, a loss term; reward: "
                        "kl-coef x the k1 KL of each response subtracted from its reward (per token for "
                        "reinforce_pp and remax; the logged kl is that k1, and --kl-estimator is refused)")
    g.add_argument("--warm-start-steps", type=int, default=None, metavar="N",
                   help="supervised steps of the built-in policy on correct answers before RL, default 100 (cached "
                        "in <output-dir>/warm_start; 0 = RL from a random init)")
    g.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="steps between task evaluations; default 100")
    g.add_argument("--eval-prompts", type=int, default=None, metavar="N",
                   help="held-out prompts of each task evaluation (at most 500, the default)")


def resolve_defaults(a):
    """Refuse the options of the other path given on the command line (they would be ignored),
    then fill the options left at None with the defaults of the chosen estimator. The other
    path's own options stay None."""
    gae = a.advantage == "gae"
    mine, other = (GAE_DEFAULTS, CRITIC_FREE_DEFAULTS) if gae else (CRITIC_FREE_DEFAULTS, GAE_DEFAULTS)
    given = [k for k in other if k not in mine and getattr(a, k, None) is not None]
    if given:
        names = ", ".join(flag(k) for k in given)
        if gae:
            raise TrainingError(f"{names}: options of the critic-free run (--advantage "
                                f"{'|'.join(CRITIC_FREE)}), which --advantage gae does not use: it scores each "
                                f"rollout with the reward model, puts the KL penalty in the reward "
                                f"(rmk.ppo_advantages) and has no warm start or task evaluations")
        raise TrainingError(f"{names}: options of --advantage gae (PPO with a value model and GAE), which the "
                            f"critic-free --advantage {a.advantage} does not use")
    if not gae and a.kl_mode == "reward" and a.kl_estimator is not None:
        raise TrainingError("--kl-estimator: with --kl-mode reward the critic-free run subtracts the k1 KL from "
                            "the rewards (and logs it as kl); --kl-estimator is the estimator of --kl-mode loss")
    for k, v in mine.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.clip_range_high is None:
        a.clip_range_high = a.clip_range
    if not gae:
        a.kl_estimator = KL_LOSS_ALIASES.get(a.kl_estimator, a.kl_estimator)


def check_args(a):
    if a.advantage == "gae":
        return
    from rmkernels_train import trainer as T
    from rmkernels_train.data import DEFAULT_HELD_OUT

    for name in ("num_generations", "eval_every", "eval_prompts"):
        T.check_int(name, getattr(a, name), low=1)
    # the built-in task's held-out prompts: more would be silently the same 500
    T.check_int("eval_prompts", a.eval_prompts, high=DEFAULT_HELD_OUT)
    if a.advantage in GROUP_ESTIMATORS and a.num_generations < 2:
        raise TrainingError(f"--num-generations must be >= 2 for --advantage {a.advantage} (the advantages compare "
                            f"the responses to one prompt), got {a.num_generations}")
    T.check_int("warm_start_steps", a.warm_start_steps, low=0)
    if a.reward == "checker" and a.prompts is not None:
        raise TrainingError("--reward checker checks the built-in sorting task: it cannot be used with --prompts")
    if a.kl_estimator not in KL_LOSS_ESTIMATORS:
        raise TrainingError(f"--kl-estimator {a.kl_estimator}: the critic-free run's KL loss takes k1, k2 or k3 "
                            f"(or their aliases {', '.join(f'{k} = {v}' for k, v in KL_LOSS_ALIASES.items())})")


def check_minibatches(a, prompts):
    """The critic-free run cuts each step's responses (``prompts`` x --num-generations) into
    --minibatches equal minibatches (``ppo_core.minibatch_indices``)."""
    n = prompts * a.num_generations
    if n % a.minibatches:
        raise TrainingError(f"--minibatches {a.minibatches}: the {n} responses of each step ({prompts} prompts x "
                            f"--num-generations {a.num_generations}) do not split into {a.minibatches} equal "
                            f"minibatches")


def _fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


# Options that fix what each step samples and trains on: they must not change on --resume. One
# rule for both paths (check_resume_options): --advantage first, then these and the options of
# the path alone (the entries of its table above that the other path does not have).
# (--reward-model too: the objective; with another vocabulary the checkpoint's policy would not
# even fit. Paths compare as real paths: trainer.check_resume_args.)
RESUME_FIXED_COMMON = ("seed", "batch_size", "max_new_tokens", "temperature", "prompts", "policy",
                       "policy_layers", "policy_hidden", "kl_estimator", "kl_coef", "lr", "world_size",
                       "reward_model", "ppo_epochs", "minibatches", "clip_range", "clip_range_high", "clip_ratio_c",
                       "loss_agg", "entropy_coef", "max_grad_norm")


def saved_options(saved):
    """The options of a checkpoint's run (its ``args``) as this version names them: an older
    checkpoint lacks --clip-range-high (it clipped at --clip-range on both sides), --clip-ratio-c
    (no dual-clip: None), --loss-agg (token-mean) and --entropy-coef (0: no entropy term), and
    an older critic-free one holds None for --ppo-epochs, --minibatches and --clip-range (it made
    one on-policy update: the defaults of CRITIC_FREE_DEFAULTS and the parser)."""
    from rmkernels_train.ppo_core import LOSS_AGG_MODES

    s = dict(saved)
    if s.get("advantage", "gae") != "gae":
        for k in ("ppo_epochs", "minibatches"):
            if s.get(k) is None:
                s[k] = CRITIC_FREE_DEFAULTS[k]
        if s.get("clip_range") is None:
            s["clip_range"] = CLIP_RANGE
    if s.get("clip_range_high") is None:
        s["clip_range_high"] = s.get("clip_range")
    s.setdefault("clip_ratio_c", None)
    s.setdefault("loss_agg", LOSS_AGG_MODES[0])
    s.setdefault("entropy_coef", 0.0)
    return s


def resume_fixed(advantage):
    mine, other = (GAE_DEFAULTS, CRITIC_FREE_DEFAULTS) if advantage == "gae" else (CRITIC_FREE_DEFAULTS,
                                                                                   GAE_DEFAULTS)
    return RESUME_FIXED_COMMON + tuple(k for k in mine if k not in other)


def check_resume_options(state, a, world_size, reward_dir=None, digests=None):
    """The options of the checkpoint's run (``state["args"]`` of its ``trainer_state.json``)
    against this run's, before any weight is loaded: a changed option is named (a policy of
    another size or the other path's checkpoint would otherwise look like a damaged file);
    then its data files and reward model (``digests``: this run's ``T.data_digests``, computed
    once)."""
    from rmkernels_train import trainer as T

    saved = state["args"]
    if saved.get("advantage", "gae") != a.advantage:  # older gae checkpoints may lack the option
        raise TrainingError(f"--resume: --advantage was {saved.get('advantage')!r} in the checkpoint's run and is "
                            f"{a.advantage!r} now: a checkpoint of one estimator cannot continue as another (use "
                            f"another --output-dir)")
    T.check_resume_args(saved_options(saved), a, resume_fixed(a.advantage), world_size)
    T.check_resume_data(state, a, reward_dir, digests)


# What a resumed run reads of an eval row of metrics.jsonl (evaluate's changes, finish's
# summary): a row without these numbers is skipped by read_metrics
EVAL_METRICS = {"eval": ("score", "task_success", "task_success_sampled", "kl", "prompts")}


class CriticFreeTrainer:
    """One invocation of ``rmkernels-train ppo --advantage <a critic-free estimator>``:
    :meth:`setup` (reward model, warm start, prompts, optimizer, resume), the task evaluation
    before RL, then per step :meth:`train_step` and an evaluation every ``--eval-every``
    steps; checkpoints (``checkpoint-<step>/``, from the shared skeleton) on the way and
    :meth:`finish` at the end.

    Under torchrun (data parallel) each step's ``--batch-size`` x ``world_size`` prompts are
    drawn from (seed, step) as one process would draw that many, and each rank takes its
    ``--batch-size`` of them with all their ``--num-generations`` responses (a group never spans
    ranks); the update is the whole batch's (``grpo.rl_step``'s ``dist``) and the parameters stay
    identical on every rank (checked at the end). Rank 0 trains the warm start (the others
    receive its weights) and writes the files; each evaluation is split over the ranks."""

    def __init__(self, args, dist, log):
        from rmkernels_train import trainer as T

        self.a, self.dist, self.log = args, dist, log
        self.out_dir = args.output_dir
        self.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        self.step, self.steps_this_run, self.last_ckpt, self.evals = 0, 0, None, []
        self.times = {}
        # rank 0's files besides checkpoints: a failed write stops every rank with one line
        self.writes = T.MainWrites(dist)

    # -- set-up ---------------------------------------------------------------------------
    def setup(self):
        from rmkernels_train import sft, task
        from rmkernels_train import trainer as T
        from rmkernels_train.model import load_tokenizer
        from rmkernels_train.ppo import (
            encode_prompts,
            fitting_prompts,
            load_policy,
            load_run_reward_model,
            run_prompts,
            run_reward_model,
        )
        from rmkernels_train.utils import MetricsWriter, broadcast_parameters

        a, dist = self.a, self.dist
        self.writes.now(self.prepare_output_dir)
        if not a.resume and T.list_checkpoints(self.out_dir)[0]:
            raise TrainingError(f"{self.out_dir} already has checkpoints: pass --resume to continue, or another "
                                f"--output-dir")
        # --prompts read first: a file that is empty or not JSON lines stops the run before the
        # default reward model is trained (minutes)
        train_prompts, held = task.task_prompts()
        self.train_prompts, prompt_lines = run_prompts(a, train_prompts)
        t = time.time()
        reward_dir = run_reward_model(a, self.out_dir, dist, T.threads_for(a, True), self.log)
        self.times["reward_model"] = time.time() - t
        self.reward_dir = reward_dir
        self.tokenizer = tok = load_tokenizer(reward_dir)
        if tok.eos_token_id is None:
            raise TrainingError(f"the tokenizer in {reward_dir} has no eos token: responses could never end")
        self.reward_model = load_run_reward_model(a, reward_dir, tok).to(dist.device)
        self.reward_model.requires_grad_(False)
        self.reward_model.eval()
        # what this run read (the data files, the reward model), for its checkpoints; once read: its errors first
        self.data_sha256 = T.data_digests(a, reward_dir, dist=dist)
        self.held_prompts = held[:a.eval_prompts]
        if dist.enabled and a.batch_size * dist.world_size > len(self.train_prompts):
            raise TrainingError(f"--batch-size {a.batch_size} x {dist.world_size} processes is more than the "
                                f"{len(self.train_prompts)} prompts of {a.prompts or 'the built-in task'}: each step "
                                f"gives every process --batch-size different prompts (lower --batch-size)")
        if a.batch_size > len(self.train_prompts):  # each step samples prompts without replacement
            check_minibatches(a, len(self.train_prompts))
            self.log(f"warning: --batch-size {a.batch_size} is more than the {len(self.train_prompts)} prompts of "
                     f"{a.prompts}: each step uses all {len(self.train_prompts)} prompts once")
        t = time.time()
        if a.policy is not None:
            policy = load_policy(a.policy, tok, self.log)
            self.warm_info = {"policy": a.policy}
        elif a.warm_start_steps > 0 and a.resume and T.list_checkpoints(self.out_dir)[0]:
            # the checkpoint holds the policy and the reference: the warm-start cache is not read
            # (a run with no intact checkpoint stops below)
            policy = sft.build_policy(tok, layers=a.policy_layers, hidden=a.policy_hidden)
            self.warm_info = {**(sft.read_cache_meta(self.out_dir)[0] or {}), "from_checkpoint": True}
        elif a.warm_start_steps > 0:
            settings = {**sft.DEFAULTS, "steps": a.warm_start_steps, "layers": a.policy_layers,
                        "hidden": a.policy_hidden, "seed": a.seed}
            # rank 0 trains it (or loads its cache) while the others wait; its weights reach them below
            warm = self.writes.now(lambda: sft.warm_start(self.out_dir, tok, train_prompts, settings, log=self.log))
            policy, self.warm_info = warm if warm is not None else (
                sft.build_policy(tok, layers=a.policy_layers, hidden=a.policy_hidden), None)
            self.warm_info = dist.broadcast_object(self.warm_info)
        else:
            torch.manual_seed(a.seed)
            policy = sft.build_policy(tok, layers=a.policy_layers, hidden=a.policy_hidden)
            self.warm_info = {"random_init": True}
        self.times["warm_start"] = time.time() - t
        self.policy = policy.to(dist.device)
        broadcast_parameters(self.policy, dist)  # every rank starts from rank 0's weights
        self.ref = copy.deepcopy(self.policy)
        self.ref.requires_grad_(False)
        self.ref.eval()
        self.policy.train()
        # each prompt + --max-new-tokens must fit the models (one rule for both paths)
        self.train_ids = fitting_prompts(a, tok, (self.policy, self.reward_model), self.train_prompts, prompt_lines,
                                         self.log)
        self.held_ids = encode_prompts(self.held_prompts, tok)
        self.optimizer = self.make_optimizer()
        if a.resume:
            self.step, self.last_ckpt, loaded = T.find_resume_checkpoint(self.out_dir, self.load_checkpoint, self.log,
                                                                         dist)
            self.policy.load_state_dict(loaded[1]["policy"], strict=False)
            self.ref.load_state_dict(loaded[1]["ref_policy"], strict=False)
            self.optimizer.load_state_dict(loaded[1]["optimizer"])
            self.log(f"resuming from {self.last_ckpt} (step {self.step})")
        self.writer = self.writes.now(lambda: MetricsWriter(self.metrics_path,
                                                            resume_step=self.step if a.resume else None,
                                                            required=EVAL_METRICS))
        # rank 0 read them; every rank decides alike whether to evaluate before RL
        self.evals = dist.broadcast_object(
            [r for r in self.writer.records if r.get("split") == "eval" and r["step"] <= self.step]
            if self.writer is not None else None)

    def prepare_output_dir(self):
        """The output directory (rank 0), without what killed checkpoint writes left in it."""
        from rmkernels_train import trainer as T

        T.make_output_dir(self.out_dir)
        T.remove_stale_checkpoint_dirs(self.out_dir, self.log)

    def make_optimizer(self):
        return torch.optim.AdamW(self.policy.parameters(), lr=self.a.lr, weight_decay=0.0)

    # -- checkpoints ----------------------------------------------------------------------
    def write_checkpoint(self, tmp):
        from rmkernels_train import trainer as T

        self.policy.save_pretrained(os.path.join(tmp, "policy"))
        T.fault_point("checkpoint-write")
        self.tokenizer.save_pretrained(os.path.join(tmp, "policy"))
        self.ref.save_pretrained(os.path.join(tmp, "ref_policy"))
        torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        state = {"step": self.step, "data_sha256": self.data_sha256,
                 "args": {**vars(self.a), "world_size": self.dist.world_size}}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)

    def load_checkpoint(self, path):
        """Read and check every file of a checkpoint (nothing is changed yet)."""
        from rmkernels_train import trainer as T

        state = T.read_trainer_state(path)
        check_resume_options(state, self.a, self.dist.world_size, self.reward_dir, self.data_sha256)
        tensors = {}
        for name, module in (("policy", self.policy), ("ref_policy", self.ref)):
            file = f"{name}/model.safetensors"
            tensors[name] = T.load_safetensors(os.path.join(path, file), name=file)
            T.check_state_dict(module, tensors[name], file)
        tensors["optimizer"] = T.load_torch_state(os.path.join(path, "optimizer.pt"))
        T.check_optimizer_state(self.make_optimizer, tensors["optimizer"])
        return state, tensors

    def checkpoint(self):
        from rmkernels_train import trainer as T

        self.writes.check()  # not after a failed metrics.jsonl line (every rank stops here with its line)
        # never a checkpoint of NaN / infinite weights (one rule for both paths)
        T.check_finite_before_saving(self.dist, self.step, self.last_ckpt, ("policy", self.policy))
        # rank 0 writes; every rank learns whether it could (a disk full stops every rank with one line)
        self.last_ckpt = T.save_checkpoint_on_main(self.dist, self.out_dir, self.step, self.write_checkpoint,
                                                   self.a.save_total_limit)

    # -- evaluation and steps -------------------------------------------------------------
    def evaluate(self):
        from rmkernels_train import grpo

        a = self.a
        ev = grpo.evaluate(self.policy, self.ref, self.reward_model, self.tokenizer, self.held_prompts, self.held_ids,
                           max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed + 1,
                           backend=a.backend, dist=self.dist)
        rec = {"step": self.step, "split": "eval", **ev}
        if self.evals:  # how the reward-model score and the task success moved since RL began
            rec["score_change"] = ev["score"] - self.evals[0]["score"]
            rec["task_success_change"] = ev["task_success"] - self.evals[0]["task_success"]
        self.writes(lambda r: self.writer.write(r), rec)
        self.evals.append(rec)
        self.log(f"eval step {self.step}: task success {ev['task_success']:.3f} greedy, "
                 f"{ev['task_success_sampled']:.3f} sampled ({ev['prompts']} held-out prompts); reward-model score "
                 f"{ev['score']:.3f}; KL {ev['kl']:.3f}; reward model ranks right over wrong {_fmt(ev['rm_auc'])}")
        return rec

    def train_step(self):
        from rmkernels_train import grpo
        from rmkernels_train import trainer as T

        a, step, dist = self.a, self.step, self.dist
        self.writes.check()  # a failed metrics.jsonl line of rank 0 stops every rank before this step's update
        # Every step's randomness comes from (seed, step, rank): a resumed run does what the
        # uninterrupted run would have done. The step's prompts come from (seed, step) alone: one
        # draw of --batch-size x world_size prompts, of which each rank takes its own --batch-size.
        world, rank = dist.world_size, dist.rank
        torch.manual_seed(a.seed * 1_000_003 + step * world + rank)
        rng = random.Random(a.seed * 1_000_003 + step)
        idx = rng.sample(range(len(self.train_prompts)), min(a.batch_size * world, len(self.train_prompts)))
        if dist.enabled:
            idx = idx[rank * a.batch_size:(rank + 1) * a.batch_size]
        # the minibatches' permutations: their own generator, seeded from (seed, step, rank) too
        gen = torch.Generator().manual_seed(a.seed * 7919 + step * world + rank)
        r = grpo.rl_step(self.policy, self.ref, self.reward_model, self.optimizer, self.tokenizer,
                         [self.train_prompts[i] for i in idx], [self.train_ids[i] for i in idx],
                         num_generations=a.num_generations, estimator=a.advantage, reward=a.reward,
                         kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, kl_mode=a.kl_mode,
                         max_new_tokens=a.max_new_tokens, temperature=a.temperature, max_grad_norm=a.max_grad_norm,
                         backend=a.backend, check=a.prompts is None, ppo_epochs=a.ppo_epochs,
                         minibatches=a.minibatches, clip_range=a.clip_range, clip_range_high=a.clip_range_high,
                         loss_agg=a.loss_agg, entropy_coef=a.entropy_coef, generator=gen,
                         clip_ratio_c=a.clip_ratio_c, dist=dist)
        # diverged weights stop the run here (one line), not the next step's sampling
        T.check_finite_after_update(dist, step + 1, self.last_ckpt, ("policy", self.policy))
        if not math.isfinite(r["kl"]):
            raise TrainingError(f"step {step + 1}: the KL to the reference is {r['kl']}; lower --lr")
        return {"step": step + 1, "split": "train", **r}

    # -- the run ----------------------------------------------------------------------------
    def run(self):
        from rmkernels_train import trainer as T
        from rmkernels_train.ppo_core import NonFiniteLogits

        t_all, cpu0 = time.time(), time.process_time()
        self.setup()
        try:
            return self._run(t_all, cpu0)
        except NonFiniteLogits:  # a diverged policy: one line, not multinomial's traceback
            raise T.nonfinite_logits(self.step, self.last_ckpt) from None

    def _run(self, t_all, cpu0):
        from rmkernels_train import trainer as T

        a = self.a
        if not self.evals:
            self.evaluate()  # the task success before RL
        t_rl = time.time()
        bar = self.log.bar = T.progress_bar(a, self.dist, total=a.steps, initial=self.step, desc=f"rl ({a.advantage})")
        try:
            while self.step < a.steps and (a.stop_after is None or self.steps_this_run < a.stop_after):
                rec = self.train_step()
                self.step += 1
                self.steps_this_run += 1
                T.fault_point("step")
                # rank 0 (self.writer: None on the others); a failure stops every rank at the next check
                self.writes(lambda r: self.writer.write(r), rec)
                if bar is not None:
                    bar.set_postfix(score=f"{rec['score']:.2f}", ok=_fmt(rec["train_success"], 2),
                                    kl=f"{rec['kl']:.3f}", refresh=False)
                    bar.update(1)
                if self.step % a.eval_every == 0 or self.step == a.steps:
                    self.evaluate()
                if self.step % a.save_every == 0 or self.step == a.steps:
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()
            self.log.bar = None
        self.times["rl"] = time.time() - t_rl
        self.times["total"] = time.time() - t_all
        self.times["process_cpu"] = time.process_time() - cpu0
        return self.finish()

    def finish(self):
        from rmkernels_train import trainer as T

        if self.last_ckpt != T.checkpoint_path(self.out_dir, self.step):  # --stop-after
            self.checkpoint()
        T.check_ranks_hold_the_same(self.dist, self.policy)
        # rank 0's files, then every rank learns whether they were written
        self.writes.now(self.write_outputs)
        return 0

    def write_outputs(self):
        """The final policy, the plot, final.json and the last line (rank 0)."""
        from rmkernels_train import trainer as T
        from rmkernels_train.utils import plot_curves

        a = self.a
        with T.atomic_dir(os.path.join(a.output_dir, "policy")) as tmp:
            self.policy.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        if a.plot:
            plot_curves(self.metrics_path, os.path.join(a.output_dir, "curves.png"),
                        keys=("task_success", "task_success_sampled", "score", "kl"),
                        title=f"rmkernels-train ppo --advantage {a.advantage} --reward {a.reward}")
        first, last = self.evals[0], self.evals[-1]
        d_score, d_ok = last["score"] - first["score"], last["task_success"] - first["task_success"]
        verdict = together(d_score, d_ok, a.reward, noise(first["task_success"], last["task_success"], last["prompts"]))
        summary = {"advantage": a.advantage, "reward": a.reward, "seed": a.seed, "steps": self.step,
                   "done": self.step >= a.steps, "before": first, "after": last, "verdict": verdict,
                   "warm_start": self.warm_info, "reward_model": self.reward_dir, "checkpoint": self.last_ckpt,
                   "world_size": self.dist.world_size, "time_s": {k: round(v, 1) for k, v in self.times.items()}}
        T.write_final(a.output_dir, summary)
        status = T.run_status(self.step, a.steps, self.steps_this_run, "--steps")
        procs = f"{self.dist.world_size} processes, parameters identical on every rank. " if self.dist.enabled else ""
        print(f"rmkernels-train ppo: {status}{self.step} {a.advantage} steps (RL {self.times['rl']:.0f} s in this "
              f"run). Held-out task success (greedy), step {first['step']} -> {last['step']}: "
              f"{first['task_success']:.3f} -> {last['task_success']:.3f} ({d_ok:+.3f}); sampled "
              f"{first['task_success_sampled']:.3f} -> {last['task_success_sampled']:.3f}; reward-model score "
              f"{first['score']:.3f} -> {last['score']:.3f} ({d_score:+.3f}); KL to the warm start {last['kl']:.3f}. "
              f"{verdict} {procs}Outputs in {a.output_dir}", flush=True)
        return 0


def noise(p0, p1, n):
    """Two standard errors of the difference of two success rates measured on ``n`` prompts:
    a change of the task success smaller than this is indistinguishable from sampling noise."""
    return 2.0 * math.sqrt((p0 * (1 - p0) + p1 * (1 - p1)) / max(n, 1))


def together(d_score, d_success, reward="model", tol=0.02):
    """One sentence on how the reward-model score and the task success moved; ``tol`` is the
    change of the task success below which it counts as unchanged (:func:`noise`)."""
    if reward == "checker":
        return "(The checker was the reward: the reward model did not steer this run.)"
    if d_success > tol:
        if d_score > 0:
            return "The reward-model score and the task success rose together."
        return "The task success rose while the reward-model score did not."
    if d_score > 0 and d_success < -tol:
        return ("WARNING: the reward-model score rose while the task success fell: the policy is exploiting the "
                "reward model (reward hacking); raise --kl-coef or lower --lr.")
    if d_score > 0:
        return (f"The reward-model score rose; the task success did not move beyond its noise ({tol:.3f}): if that "
                f"lasts, the policy is finding what the reward model over-scores (reward hacking).")
    return "Neither the reward-model score nor the task success rose."
