"""TRL's PPO reward and advantage computation (``PPOTrainer.train``, steps 3-6), backed by
the fused ops. TRL's PPO trainer lived in ``trl.trainer`` and then ``trl.experimental.ppo``
up to TRL 1.12 (1.13 removed it); the numbers here are those of 1.12.0's code.

TRL computes the rewards, advantages and returns inline in ``PPOTrainer.train`` with a
Python loop over the response length; this module gives that block as one function, and
TRL's ``masked_whiten``::

    # from trl.experimental.ppo.ppo_trainer import masked_whiten   (trl.trainer.utils in older TRL)
    from rmkernels.integrations.trl_ppo import masked_whiten, compute_rewards_and_advantages

    out = compute_rewards_and_advantages(logprobs, ref_logprobs, values, scores, sequence_lengths,
                                         kl_coef=args.kl_coef, kl_estimator=args.kl_estimator,
                                         gamma=args.gamma, lam=args.lam, whiten_rewards=args.whiten_rewards)

TRL's conventions, kept (they differ from verl's and OpenRLHF's):

* ``sequence_lengths[b]`` is the index of the last real response token (TRL's
  ``first_true_indices(response == pad) - 1``; -1 for an empty response).
* log-probs after that token are set to ``INVALID_LOGPROB`` (1.0), so the KL is 0 there;
  values are kept one position further (``padding_mask_p1``) and zeroed after it.
* the score goes **one past** the last real token (``sequence_lengths + 1``) when that
  position exists, else at the last token.
* GAE runs over every position with next value ``values[t + 1]``; advantages are whitened
  over the real tokens with the **unbiased** variance, then set to 0 at padding.
* ``kl_estimator``: ``"k1"`` = log p - log q, ``"k3"`` = exp(log q - log p) - 1 - (log q - log p).

Where the numbers differ, on purpose: the computed tensors (``advantages``, ``returns``,
``rewards``, ``kl``, ``non_score_reward``) are float32 for bfloat16 / float16 inputs (float64 for
float64), where TRL's stay in the inputs' dtype: TRL's bfloat16 steps round each intermediate
(about 4e-3 relative each; in audits of 2026-12-03 on random [6, 10] batches of log-probs in
[-4, 0], advantages up to 0.03 and the k3 KL up to 0.41 apart, all of it TRL's rounding: these
outputs matched TRL's block run in float64 on the same bf16 inputs to 1e-6). A batch with
at most one real token gets advantages 0
(TRL's unbiased variance divides by 0 there: NaN, and a ``ValueError`` when every response is
empty; the fused op never looks at the count on the host). ``masked_whiten`` takes a position
where ``mask`` is non-zero (TRL weights by the mask's value; its masks are 0/1), returns 0 where
it is 0, and refuses a mask that broadcasts (``[1, T]`` for ``[B, T]`` values).

``import rmkernels.integrations.trl_ppo`` does not import trl.
"""
from collections import namedtuple

import torch

import rmkernels as rmk
from rmkernels.integrations._rl import as_float, check_2d, check_same_shape, token_reward_gae

__all__ = ["INVALID_LOGPROB", "masked_whiten", "compute_rewards_and_advantages", "TRLPPOTargets"]

INVALID_LOGPROB = 1.0

TRLPPOTargets = namedtuple("TRLPPOTargets", [
    "advantages", "returns", "rewards", "kl", "non_score_reward",
    "logprobs", "ref_logprobs", "values", "padding_mask", "padding_mask_p1"])


def masked_whiten(values, mask, shift_mean=True):
    """TRL's ``masked_whiten``: ``(x - mean) * rsqrt(var + 1e-8)`` over ``mask`` (unbiased var),
    ``+ mean`` if not ``shift_mean``; float32 (float64 for float64 values), and 0 where ``mask``
    is 0 (TRL leaves shifted values there and fills them with 0 itself right after). No gradient
    flows (``rmk.masked_whiten``: advantages are targets): TRL's PPO calls it under
    ``torch.no_grad()``; TRL's own function is differentiable, so do not put this one in a loss."""
    return rmk.masked_whiten(values, mask, shift_mean=shift_mean, unbiased=True, eps=1e-8)


def compute_rewards_and_advantages(logprobs, ref_logprobs, values, scores, sequence_lengths, *, kl_coef,
                                   kl_estimator="k1", gamma=1.0, lam=0.95, whiten_rewards=False):
    """TRL PPO's steps "3. padding masks", "4. compute rewards", "5. whiten rewards" and
    "6. compute advantages and returns" in fused ops.

    Args:
        logprobs, ref_logprobs: ``[B, T]`` log-probs of the response tokens (policy and
            reference); padding positions may hold anything (they become ``INVALID_LOGPROB``).
        values: ``[B, T]`` value-model outputs at the response positions.
        scores: ``[B]`` reward-model scores (after TRL's ``missing_eos_penalty``, if any).
        sequence_lengths: ``[B]`` int, index of each response's last real token.

    Returns ``TRLPPOTargets``: ``advantages`` (whitened, 0 at padding), ``returns``,
    ``rewards``, ``kl``, ``non_score_reward = -kl_coef * kl``, the masked ``logprobs``,
    ``ref_logprobs`` and ``values`` that TRL's PPO epochs use, and ``padding_mask`` /
    ``padding_mask_p1`` (True at padding) for the policy and value losses.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, values=values)
    if kl_estimator not in ("k1", "k3"):
        raise ValueError(f"kl_estimator must be 'k1' or 'k3' (TRL's choices), got {kl_estimator!r}")
    kl_coef, gamma, lam = as_float("kl_coef", kl_coef), as_float("gamma", gamma), as_float("lam", lam)
    B, T = logprobs.shape
    if not isinstance(sequence_lengths, torch.Tensor) or tuple(sequence_lengths.shape) != (B,):
        raise ValueError(f"sequence_lengths must be a [B] = [{B}] integer tensor")
    if not isinstance(scores, torch.Tensor) or scores.numel() != B:
        raise ValueError(f"scores must be a tensor of B = {B} scores")
    scores = scores.reshape(B)
    idx = torch.arange(T, device=logprobs.device).expand(B, T)
    seq = sequence_lengths.to(logprobs.device).long()
    padding_mask = idx > seq.unsqueeze(1)
    padding_mask_p1 = idx > (seq + 1).unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    values = torch.masked_fill(values, padding_mask_p1, 0)
    # Over the positions up to sequence_lengths + 1 the mask-aware recurrence of the fused op is
    # TRL's plain one (nothing after them contributes), and "the last valid position" is TRL's
    # score position min(sequence_lengths + 1, T - 1). The KL is 0 at that extra position,
    # where both log-probs are INVALID_LOGPROB.
    valid_p1 = ~padding_mask_p1
    out = rmk.ppo_advantages(logprobs, ref_logprobs, values, scores, valid_p1, kl_coef=kl_coef, gamma=gamma,
                             lam=lam, kl_estimator=kl_estimator, whiten=False)
    rewards, adv, returns = out.rewards, out.advantages, out.returns
    if whiten_rewards:
        rewards = rmk.masked_whiten(rewards, valid_p1, shift_mean=False, unbiased=True, eps=1e-8)
        again = token_reward_gae(rewards, values, valid_p1, gamma=gamma, lam=lam, whiten=False)
        adv, returns = again.advantages, again.returns
    advantages = rmk.masked_whiten(adv, ~padding_mask, shift_mean=True, unbiased=True, eps=1e-8)
    return TRLPPOTargets(advantages, returns, rewards, out.kl, -kl_coef * out.kl, logprobs, ref_logprobs, values,
                         padding_mask, padding_mask_p1)
