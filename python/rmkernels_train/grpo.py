"""The critic-free RL loop of the default run (GRPO and its relatives), and the task evaluation.

Each step:

1. ``prompts_per_step`` prompts, each sampled ``num_generations`` times from the policy;
2. the reward of each response: the reward model's score (``rmk.last_token_reward`` on the
   last valid token), or the checker's 0/1 with ``--reward checker``; a response that never
   ended (no EOS) gets a reward below the batch's lowest -- the reward model never saw one and
   would score it at random;
3. ``rmk.group_advantages``: each response's reward against the other responses to the same
   prompt (``grpo``: minus the group mean, over the group std; also ``dr_grpo``, ``rloo``,
   ``opo``, ``gpg``, ``reinforce_pp_baseline``); or the REINFORCE-family token advantages of
   each response's reward at its last token (``reinforce_pp``: ``rmk.reinforce_pp_advantages``,
   the return whitened over the batch; ``remax``: ``rmk.remax_advantages``, minus the reward of
   the prompt's greedy response, sampled each step); no value model;
4. the update: by default one on-policy gradient step (ratio 1): the policy-gradient loss with
   those advantages on every response token, plus ``kl_coef`` times the KL to the warm-start
   policy (k3 by default, as a loss term) -- or, with ``kl_mode="reward"``, the k1 KL of each
   response subtracted from its reward before the advantages (per token for ``reinforce_pp`` and
   ``remax``). With ``ppo_epochs`` > 1 or ``minibatches`` > 1 (``--ppo-epochs``,
   ``--minibatches``: verl's ppo_epochs and mini-batches, TRL's num_iterations) the log-probs of
   the sampling policy are computed once, then each epoch cuts a random permutation of the
   responses into minibatches, one optimizer step each, on PPO's clipped surrogate against those
   log-probs (``1 - clip_range``, ``1 + clip_range_high``: DAPO's clip-higher; ``clip_ratio_c``:
   verl's dual-clip, off by default) plus the KL term.
   The advantages are the whole batch's, computed before, so a minibatch may hold part of a
   prompt's group (as in verl). The policy loss and the KL term are aggregated by
   ``ppo_core.agg_loss`` (``--loss-agg``, verl's loss_agg_mode; token-mean by default), and
   ``--entropy-coef`` > 0 subtracts that times the policy's entropy, aggregated the same way.

The task evaluation (:func:`evaluate`) runs on the held-out prompts: the fraction solved by the
greedy response (``task_success``) and by one sampled response (``task_success_sampled``), the
reward model's mean score of the sampled responses and their KL to the reference, and how well
the reward model separates correct from wrong responses (``rm_auc``).
"""
import time

import torch

from rmkernels._codes import GROUP_ESTIMATORS
from rmkernels_train import ppo_core as core
from rmkernels_train.task import ResponseDecoder, checker_scores

# The REINFORCE-family estimators: token-level returns of each response on its own
# (rmk.reinforce_pp_advantages: the returns whitened over the batch; rmk.remax_advantages: the
# returns minus the reward of the prompt's greedy response, sampled for it each step).
TOKEN_ESTIMATORS = ("reinforce_pp", "remax")
# Estimators that need no value model (rmk.group_advantages, then the two above); "gae" is PPO
# with a critic.
CRITIC_FREE = (*GROUP_ESTIMATORS, *TOKEN_ESTIMATORS)
# --kl-estimator -> the name of rmkernels.integrations.verl.kl_penalty (value from the fused op,
# gradient of the estimator's formula); verl's "low_var_kl" is k3 with its log ratio clamped to
# +-20 and its value to +-10 (the value clamp binds, and the term's gradient is 0, where a token's
# log-prob under the policy is more than ~2.6 below the reference's).
KL_LOSS_ESTIMATORS = {"k1": "k1", "k2": "k2", "k3": "low_var_kl"}
# The other names of --kl-estimator the critic-free run takes (rmkernels' names: kl = k1,
# mse = k2, low_var_kl = k3); rl.resolve_defaults turns them into the names above.
KL_LOSS_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


def group_advantages(scores, group_ids, mask, estimator, backend=None):
    """Token advantages ``[B, T]`` of the critic-free ``estimator``: ``rmk.group_advantages``
    (docs/ops.md section 5) of the responses' rewards grouped by prompt, 0 at masked positions."""
    import rmkernels as rmk

    return rmk.group_advantages(scores, group_ids, mask, estimator=estimator, backend=backend).advantages


def token_rewards(rewards, mask, kl_k1=None, kl_coef=0.0):
    """``[B, T]`` float32 token rewards of the REINFORCE-family estimators: each response's reward
    at its last valid token (none for a response without one), minus ``kl_coef`` times the
    per-token k1 KL ``kl_k1`` at every valid token when given (``--kl-mode reward``: REINFORCE++'s
    KL in the reward, as verl and OpenRLHF put it)."""
    m = mask.bool()
    B, T = m.shape
    has = m.any(1)
    last = (T - 1) - m.flip(1).to(torch.uint8).argmax(1)  # the last valid position (any row with one)
    tok = torch.zeros(B, T, dtype=torch.float32, device=m.device)
    tok[torch.arange(B, device=m.device), last] = torch.where(has, rewards.float(), torch.zeros_like(rewards.float()))
    if kl_k1 is not None:
        tok = tok - kl_coef * torch.where(m, kl_k1.float(), torch.zeros_like(tok))
    return tok


def token_advantages(rewards, mask, estimator, *, baselines=None, kl_k1=None, kl_coef=0.0, backend=None,
                     process_group=None):
    """Token advantages ``[B, T]`` of ``reinforce_pp`` (``rmk.reinforce_pp_advantages`` of
    :func:`token_rewards`, gamma 1: the return whitened over every valid token of the batch) or
    ``remax`` (``rmk.remax_advantages``: the return minus ``baselines``, the reward of each
    response's greedy counterpart). With ``process_group`` (torchrun) ``reinforce_pp`` whitens
    over every rank's valid tokens: ``rmk.reinforce_pp_returns`` then ``rmk.masked_whiten`` with
    the group (the same whitening rule: unbiased, its eps, 0 at masked positions and for a batch
    of at most one valid token); ``remax`` needs no other rank."""
    import rmkernels as rmk

    tok = token_rewards(rewards, mask, kl_k1, kl_coef)
    if estimator == "remax":
        return rmk.remax_advantages(tok, baselines, mask, backend=backend).advantages
    if process_group is not None:
        returns = rmk.reinforce_pp_returns(tok, mask, gamma=1.0, backend=backend)
        return rmk.masked_whiten(returns, mask, process_group=process_group, backend=backend)
    return rmk.reinforce_pp_advantages(tok, mask, gamma=1.0, backend=backend).advantages


def kl_per_token(logprobs, ref_logprobs, estimator):
    from rmkernels.integrations.verl import kl_penalty

    return kl_penalty(logprobs, ref_logprobs, KL_LOSS_ESTIMATORS[KL_LOSS_ALIASES.get(estimator, estimator)])


def sample(policy, prompt_ids, tokenizer, *, max_new_tokens, temperature=1.0, greedy=False):
    p_ids, p_mask = core.left_pad(prompt_ids, tokenizer.pad_token_id, next(policy.parameters()).device)
    # top_k=1 is greedy decoding through the same generate call
    return core.generate(policy, p_ids, p_mask, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_k=1 if greedy else 0)


def rm_scores(reward_model, roll, tokenizer, backend=None):
    head = reward_model.score
    return core.reward_scores(reward_model.base_model, head.weight, getattr(head, "bias", None), roll,
                              backend=backend, pad_token_id=core.scoring_pad_id(tokenizer))


def ended(roll, eos_token_id):
    return (roll.sequences[:, roll.prompt_len:] == eos_token_id).any(dim=1)


def penalise_unended(rewards, has_eos, dist=None):
    """Rewards of responses with no EOS set to the batch's lowest reward minus 1. ``dist``
    (torchrun): the lowest over every rank's batch (an all-reduce; collective), as one process
    would find it on the whole batch."""
    if dist is not None and dist.enabled:
        low = rewards.detach().amin().reshape(1).clone() if rewards.numel() else \
            torch.full((1,), float("inf"), dtype=rewards.dtype, device=rewards.device)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        return torch.where(has_eos, rewards, low[0] - 1.0)
    if bool(has_eos.all()):
        return rewards
    floor = rewards.min() - 1.0
    return torch.where(has_eos, rewards, floor)


def rollout_rewards(roll, prompts, reward, reward_model, tokenizer, decoder, backend=None, check=True, dist=None):
    """(rewards, reward-model scores, checker 0/1, ended) of the responses of ``roll`` to
    ``prompts``: the rewards are the checker's 0/1 with ``reward="checker"``, else the scores
    with the no-EOS floor (:func:`penalise_unended`, over every rank's batch with ``dist``).
    ``check=False`` (prompts of a ``--prompts`` file, which the checker of the built-in task
    cannot judge): no checker, its 0/1 is None."""
    correct = checker_scores(prompts, roll.sequences[:, roll.prompt_len:], decoder) \
        if check or reward == "checker" else None
    has_eos = ended(roll, tokenizer.eos_token_id)
    scores = rm_scores(reward_model, roll, tokenizer, backend)
    rewards = correct.clone() if reward == "checker" else penalise_unended(scores, has_eos, dist)
    return rewards, scores, correct, has_eos


def auc(scores, correct):
    """P(score of a correct response > score of a wrong one), ties 1/2; None without both kinds."""
    pos, neg = scores[correct], scores[~correct]
    if len(pos) == 0 or len(neg) == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def shard(n, rank, world_size):
    """The rows ``[lo, hi)`` of ``n`` that rank ``rank`` of ``world_size`` takes: contiguous
    shares, the first ``n % world_size`` one row longer (so the ranks' shares, in rank order,
    are the rows in order)."""
    q, r = divmod(n, world_size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


@torch.no_grad()
def evaluate(policy, ref, reward_model, tokenizer, prompts, prompt_ids, *, max_new_tokens, temperature,
             seed, backend=None, dist=None):
    """Task success (greedy and sampled) on ``prompts``, with the reward model's view of the
    same responses. Deterministic for a given ``seed`` (it restores the torch RNG after).
    ``dist`` (torchrun): each rank evaluates its contiguous share of the prompts (:func:`shard`,
    sampled with ``seed`` + 7919 x rank) and every rank gets the metrics of all of them
    (collective: every rank calls it)."""
    rank, world = (dist.rank, dist.world_size) if dist is not None and dist.enabled else (0, 1)
    lo, hi = shard(len(prompts), rank, world)
    rows = _sample_every_rank(dist, lambda: _eval_rows(
        policy, ref, reward_model, tokenizer, prompts[lo:hi], prompt_ids[lo:hi], max_new_tokens=max_new_tokens,
        temperature=temperature, seed=seed + 7919 * rank, backend=backend))
    if world > 1:
        shares = dist.gather_object(rows)
        rows = {k: [x for share in shares for x in share[k]] for k in rows}
    return eval_metrics(rows)


def _eval_rows(policy, ref, reward_model, tokenizer, prompts, prompt_ids, *, max_new_tokens, temperature, seed,
               backend):
    """Per prompt (lists): greedy and sampled response solved, the reward model's scores of
    both, the sampled response's k1 KL and whether it ended."""
    keys = ("ok_greedy", "ok_sampled", "score_greedy", "score_sampled", "kl", "ended")
    if not prompts:  # a rank with no share (fewer prompts than ranks)
        return {k: [] for k in keys}
    decoder = ResponseDecoder(tokenizer)
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        greedy = sample(policy, prompt_ids, tokenizer, max_new_tokens=max_new_tokens, greedy=True)
        sampled = sample(policy, prompt_ids, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature)
    finally:
        torch.set_rng_state(rng)
    ok_g = checker_scores(prompts, greedy.sequences[:, greedy.prompt_len:], decoder).bool()
    ok_s = checker_scores(prompts, sampled.sequences[:, sampled.prompt_len:], decoder).bool()
    s_greedy = rm_scores(reward_model, greedy, tokenizer, backend)
    s_sampled = rm_scores(reward_model, sampled, tokenizer, backend)
    logp = core.fused_policy_logprobs(policy, sampled, temperature)
    ref_logp = core.fused_policy_logprobs(ref, sampled, temperature)
    m = sampled.response_mask.float()
    kl = ((logp - ref_logp) * m).sum(1)  # k1 per response: unbiased for KL(policy || ref)
    cols = (ok_g, ok_s, s_greedy, s_sampled, kl, ended(sampled, tokenizer.eos_token_id))
    return {k: v.cpu().tolist() for k, v in zip(keys, cols)}


def eval_metrics(rows):
    """The evaluation's metrics from :func:`_eval_rows`' lists (one process's, or every rank's
    joined in rank order)."""
    ok_g, ok_s = torch.tensor(rows["ok_greedy"], dtype=torch.bool), torch.tensor(rows["ok_sampled"], dtype=torch.bool)
    s_sampled = torch.tensor(rows["score_sampled"], dtype=torch.float32)
    n = len(ok_g)

    def mean(key):
        return torch.tensor(rows[key], dtype=torch.float32).mean().item()

    return {"task_success": int(ok_g.sum()) / n, "task_success_sampled": int(ok_s.sum()) / n,
            "score": s_sampled.mean().item(), "score_greedy": mean("score_greedy"), "kl": mean("kl"),
            "ended_sampled": mean("ended"), "rm_auc": auc(s_sampled, ok_s),
            "score_correct": s_sampled[ok_s].mean().item() if ok_s.any() else None,
            "score_wrong": s_sampled[~ok_s].mean().item() if (~ok_s).any() else None,
            "prompts": n}


def _logprobs(policy, roll, temperature, entropy):
    """(log-probs, entropy or None) of the policy on the rollout's responses."""
    out = core.fused_policy_logprobs(policy, roll, temperature, return_entropy=entropy)
    return out if entropy else (out, None)


def _rows(t, rows):
    return t if rows is None else t[rows]


def _sample_every_rank(dist, fn):
    """``fn()`` (sampling); under torchrun every rank learns whether any rank's policy gave
    non-finite logits and all stop together (``trainer.share_outcome``: that rank raises its
    :class:`ppo_core.NonFiniteLogits`, the others a one-line error naming it), so that no rank
    waits in a collective the failed one never reaches."""
    if dist is None or not dist.enabled:
        return fn()
    from rmkernels_train import trainer as T

    out, error = None, None
    try:
        out = fn()
    except core.NonFiniteLogits as e:
        error = e
    T.share_outcome(dist, error)
    return out


# The metrics of rl_step that are means over the responses (or over the updates): under torchrun
# each is the mean of the ranks' means (every rank holds as many responses, and makes as many updates).
_MEAN_METRICS = ("score", "reward", "kl", "train_success", "ended", "loss", "pg_loss", "grad_norm", "clipfrac",
                 "policy_kl", "entropy", "clipfrac_lower", "response_length")


def rl_step(policy, ref, reward_model, optimizer, tokenizer, prompts, prompt_ids, *, num_generations, estimator,
            reward, kl_coef, kl_estimator, kl_mode, max_new_tokens, temperature, max_grad_norm, backend=None,
            check=True, ppo_epochs=1, minibatches=1, clip_range=0.2, clip_range_high=None, loss_agg="token-mean",
            entropy_coef=0.0, generator=None, clip_ratio_c=None, dist=None):
    """One critic-free step on ``prompts`` (each sampled ``num_generations`` times). Returns
    the step's metrics. ``check=False``: the prompts are not the built-in task's (``--prompts``),
    the checker does not run and ``train_success`` is None.

    The rollouts are sampled, scored and given advantages once; then ``ppo_epochs`` passes, each
    over ``minibatches`` minibatches of the responses (a random permutation from ``generator``,
    torch's global RNG when None, cut by ``ppo_core.minibatch_indices``: ``minibatches`` must
    divide the responses; one minibatch is the whole batch in its order), one optimizer step per
    minibatch on the clipped surrogate (``clip_range`` below, ``clip_range_high`` above, default
    ``clip_range``; ``clip_ratio_c``: dual-clip, ``ppo_core.ppo_policy_loss``, None = off) against
    the log-probs of the policy that sampled them, plus the KL loss term,
    both aggregated by ``ppo_core.agg_loss`` (``loss_agg``; the horizon of
    ``seq-mean-token-sum-norm`` is ``max_new_tokens``). ``entropy_coef`` > 0 subtracts that
    times the policy's token entropy, aggregated the same way, from the loss
    (``ppo_core.entropy_bonus``, verl's entropy_coeff) and logs its token mean as ``entropy``.
    With one update (the defaults) the step is on-policy (ratio 1) and its one forward pass gives
    the rollout-time log-probs too. With ``clip_ratio_c`` the metrics hold ``clipfrac_lower`` too
    (dual-clip's clip fraction).

    ``dist`` (a ``utils.Dist`` of a torchrun job; None or one process: nothing of this): this
    rank's ``prompts`` are its share of the step's, each prompt's ``num_generations`` responses
    on this rank, so the group estimators need no other rank; ``reinforce_pp`` whitens over
    every rank's tokens (:func:`token_advantages`); each loss is aggregated with the counts of
    the whole minibatch over the ranks (``ppo_core.data_parallel_agg``) and the gradients are
    averaged (``ppo_core.average_gradients``), so every rank applies the update one process would
    make on the whole batch; the metrics are means over the ranks. Collective: every rank calls
    it with as many prompts."""
    core.check_clip_ratio_c(clip_ratio_c)
    t0 = time.time()
    G = num_generations
    rep_prompts = [p for p in prompts for _ in range(G)]
    rep_ids = [p for p in prompt_ids for _ in range(G)]
    roll = _sample_every_rank(dist, lambda: sample(policy, rep_ids, tokenizer, max_new_tokens=max_new_tokens,
                                                   temperature=temperature))
    mask = roll.response_mask
    n = mask.shape[0]  # minibatch_indices refuses a count of minibatches that does not divide it
    group_ids = torch.arange(len(prompts), device=mask.device).repeat_interleave(G)
    decoder = ResponseDecoder(tokenizer)
    with torch.no_grad():
        ref_logp = core.fused_policy_logprobs(ref, roll, temperature)
        rewards, scores, correct, has_eos = rollout_rewards(roll, rep_prompts, reward, reward_model, tokenizer,
                                                            decoder, backend, check, dist)
        baselines = None
        if estimator == "remax":  # the reward of each prompt's greedy response, for its G samples
            greedy = _sample_every_rank(dist, lambda: sample(policy, prompt_ids, tokenizer,
                                                             max_new_tokens=max_new_tokens, greedy=True))
            base = rollout_rewards(greedy, prompts, reward, reward_model, tokenizer, decoder, backend, check,
                                   dist)[0]
            baselines = base.float().repeat_interleave(G)
    single = ppo_epochs == 1 and minibatches == 1
    bonus = entropy_coef > 0
    if single:  # the one update's forward pass: its log-probs (detached) are the rollout's
        logp, ent = _logprobs(policy, roll, temperature, bonus)
        kl_tok = kl_per_token(logp, ref_logp, kl_estimator)
        old_logp, old_kl = logp.detach(), kl_tok.detach()
    else:
        with torch.no_grad():
            old_logp = core.fused_policy_logprobs(policy, roll, temperature)
            old_kl = kl_per_token(old_logp, ref_logp, kl_estimator)
    k1_tok = (old_logp - ref_logp) * mask if kl_mode == "reward" else None
    # the KL that was applied, per response: the loss term's estimator, or the k1 in the rewards
    seq_kl = (old_kl * mask).sum(1) if k1_tok is None else k1_tok.sum(1)
    # each response's reward less its KL (kl_mode "reward"): what the group estimators compare
    seq_rewards = rewards if k1_tok is None else rewards - kl_coef * k1_tok.sum(1)
    if estimator in TOKEN_ESTIMATORS:  # the KL per token in the token rewards instead
        group = torch.distributed.group.WORLD if dist is not None and dist.enabled else None
        tok_adv = token_advantages(rewards, mask, estimator, baselines=baselines, kl_k1=k1_tok, kl_coef=kl_coef,
                                   backend=backend, process_group=group)
    else:
        tok_adv = group_advantages(seq_rewards, group_ids, mask, estimator, backend)
    kl_loss = kl_mode == "loss" and kl_coef > 0
    stats = {"loss": 0.0, "pg_loss": 0.0, "grad_norm": 0.0, "clipfrac": 0.0, "policy_kl": 0.0,
             **({"entropy": 0.0} if bonus else {})}
    if clip_ratio_c is not None:  # dual-clip's own clip fraction, logged only when it is on
        stats["clipfrac_lower"] = 0.0
    updates = 0
    for _ in range(ppo_epochs):
        # the advantages are the whole batch's: a minibatch may hold part of a group (as in verl)
        for rows in ([None] if minibatches == 1 else core.minibatch_indices(n, minibatches, generator)):
            m = _rows(mask, rows)
            if not single:
                logp, ent = _logprobs(policy, roll if rows is None else core.select(roll, rows), temperature,
                                      bonus)
                kl_tok = kl_per_token(logp, _rows(ref_logp, rows), kl_estimator) if kl_loss else None
            dp = core.data_parallel_agg(m, dist)  # under torchrun: the whole minibatch's counts
            pg_loss, clipfrac, approx_kl, clipfrac_lower = core.ppo_policy_loss(
                logp, _rows(old_logp, rows), _rows(tok_adv, rows), m, clip_range, clip_range_high, loss_agg,
                max_new_tokens, clip_ratio_c=clip_ratio_c, return_clipfrac_lower=True, dp=dp)
            loss = pg_loss
            if kl_loss:
                loss = loss + kl_coef * core.agg_loss(kl_tok, m, loss_agg, max_new_tokens, dp=dp)
            if bonus:
                term, entropy = core.entropy_bonus(ent, m, entropy_coef, loss_agg, max_new_tokens, dp=dp)
                loss = loss + term
                stats["entropy"] += entropy.item()
            finite = bool(torch.isfinite(loss.detach()))
            if dist is not None:  # every rank stops together (none left in the all-reduce)
                finite = not dist.any(not finite)
            if not finite:
                from rmkernels_train.utils import TrainingError

                raise TrainingError(f"the RL loss is not finite (here {loss.item()}); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            core.average_gradients(policy.parameters(), dist)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
            optimizer.step()
            for k, v in (("loss", loss), ("pg_loss", pg_loss), ("grad_norm", grad_norm), ("clipfrac", clipfrac),
                         ("policy_kl", approx_kl), ("clipfrac_lower", clipfrac_lower)):
                if k in stats:
                    stats[k] += v.item()
            updates += 1
    rec = {"score": scores.mean().item(), "reward": seq_rewards.mean().item(), "kl": seq_kl.mean().item(),
           "train_success": None if correct is None else correct.mean().item(),
           "ended": has_eos.float().mean().item(), **{k: v / updates for k, v in stats.items()},
           "updates": updates, "response_length": mask.float().sum(1).mean().item()}
    if dist is not None and dist.enabled:  # one all-reduce: the means over the ranks
        keys = [k for k in _MEAN_METRICS if rec.get(k) is not None]
        rec.update(zip(keys, dist.mean([rec[k] for k in keys])))
    rec["time"] = time.time() - t0
    return rec
