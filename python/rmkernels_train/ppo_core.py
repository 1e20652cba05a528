"""PPO building blocks: rollouts with ``generate``, per-token log-probs and values, the
reward model's score through ``rmk.last_token_reward``, the clipped PPO losses (the policy's
with DAPO's clip-higher, ``clip_range_high``, and verl's dual-clip, ``clip_ratio_c``) and how
token losses are aggregated into one (:func:`agg_loss`, ``--loss-agg``: verl's
``loss_agg_mode``), shared by both RL paths.

Layout of a rollout batch (``B`` sequences)::

    sequences       [B, P + R]   left-padded prompt | response (pad after the first EOS)
    attention_mask  [B, P + R]   1 on prompt tokens and on response tokens up to the EOS
    response_mask   [B, R]       the response part of attention_mask: the actions
    logprobs        [B, R]       log pi(response_t | prefix) of the policy, ref_logprobs of
                                 the frozen reference; values [B, R] are the value model's
                                 estimates of the state before each action

Positions are ``cumsum(attention_mask) - 1``, as ``generate`` numbers left-padded prompts, so
a forward pass over the finished sequence sees each token where generation saw it.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import rmkernels as rmk


def position_ids(attention_mask):
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Rollout:
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int


def left_pad(prompts, pad_token_id, device=None):
    """Token-id lists -> (input_ids, attention_mask) [B, P], left-padded (generation appends
    on the right, so every prompt must end at the same column)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


class NonFiniteLogits(RuntimeError):
    """:func:`generate` met next-token logits with a NaN or +inf (a diverged policy): the
    probabilities of those rows are not a distribution. The trainers turn it into one line."""


class _FiniteGuard:
    """The last logits processor of :func:`generate`: a row whose scores hold a NaN or +inf, or
    are all -inf (softmax would make NaN probabilities, which ``torch.multinomial`` refuses with a traceback
    on CPU and a device-side assert on CUDA) is replaced by zeros, and the fact is kept on the
    device (no synchronisation per token); :func:`generate` raises :class:`NonFiniteLogits`
    after. Other rows are left as they are (a -inf is a masked token)."""

    def __init__(self):
        self.bad = None

    def __call__(self, input_ids, scores):
        # a NaN, a +inf, or no finite score at all (every token at -inf)
        bad = torch.isnan(scores).any(-1, keepdim=True) | ~torch.isfinite(scores.amax(-1, keepdim=True))
        self.bad = bad.any() if self.bad is None else self.bad | bad.any()
        return torch.where(bad, torch.zeros_like(scores), scores)


def sampling_config(*, max_new_tokens, eos_token_id, pad_token_id):
    """The ``GenerationConfig`` of the rollouts: sampling, at least one and at most
    ``max_new_tokens`` new tokens, and nothing else. Temperature and top-k are not in it: they
    are :func:`generate`'s own logits processors (top_k 0 is set, not left unset: transformers'
    default is 50)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                            min_new_tokens=1, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@torch.no_grad()
def generate(policy, prompt_ids, prompt_mask, *, max_new_tokens, eos_token_id, pad_token_id, temperature=1.0,
             top_k=0):
    """Sample responses with ``policy.generate`` and build the masks. The response ends at the
    first EOS (included); tokens after it are padding (mask 0).

    Sampling is the trainer's alone: :func:`sampling_config` (the EOS is masked at the first
    token), then the logits divided by ``temperature`` and, with ``top_k`` > 0, cut to the top k
    (transformers' own warpers), then softmax. The policy's own ``generation_config`` (a
    checkpoint's ``generation_config.json``: ``repetition_penalty``, ``top_p``, ...) is set
    aside for the call (transformers fills every setting left unset from it), so that the
    responses are sampled from the distribution the PPO log-probs assume. Non-finite logits (a
    diverged policy) raise :class:`NonFiniteLogits`."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

    was_training = policy.training
    policy.eval()
    config = sampling_config(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    guard = _FiniteGuard()
    # custom processors run after generate's own (min_new_tokens) and before its warpers (none
    # with this config): the guard sees the very scores that softmax will
    processors = LogitsProcessorList(([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) +
                                     ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + [guard])
    own = getattr(policy, "generation_config", None)
    policy.generation_config = config
    try:
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                              logits_processor=processors)
    finally:
        policy.generation_config = own
        policy.train(was_training)
    if guard.bad is not None and bool(guard.bad):
        raise NonFiniteLogits("the policy's next-token logits are not finite (NaN or +inf)")
    P = prompt_ids.shape[1]
    response = out[:, P:]
    if response.shape[1] < max_new_tokens:  # every row stopped early: pad to a fixed width
        response = F.pad(response, (0, max_new_tokens - response.shape[1]), value=pad_token_id)
    is_eos = response == eos_token_id
    # 1 up to and including the first EOS
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    response = torch.where(after_eos, torch.full_like(response, pad_token_id), response)
    sequences = torch.cat([prompt_ids, response], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), response_mask], dim=1)
    return Rollout(sequences, attention_mask, response_mask, P)


def response_logprobs(logits, sequences, prompt_len, temperature=1.0, return_entropy=False):
    """log pi(token_t) of the response tokens [B, R] from causal-LM logits [B, P + R, V]; with
    ``return_entropy``, also the entropy [B, R] of each of those distributions (a -inf logit
    adds 0 to it)."""
    logits = logits[:, prompt_len - 1:-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    labels = sequences[:, prompt_len:]
    logp_all = F.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, 2, labels.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    return logp, -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)


def policy_logprobs(policy, rollout, temperature=1.0, return_entropy=False):
    """log pi(token_t) of the response tokens [B, R] (and with ``return_entropy`` their entropy)
    through the model's ``forward`` and its logits. For a policy wrapped in DDP: its forward is
    what syncs the gradients."""
    out = policy(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                 position_ids=position_ids(rollout.attention_mask), use_cache=False)
    return response_logprobs(out.logits, rollout.sequences, rollout.prompt_len, temperature, return_entropy)


def fused_policy_logprobs(policy, rollout, temperature=1.0, return_entropy=False):
    """log pi(token_t) of the response tokens [B, R] (0 after the EOS; with ``return_entropy``
    also their entropy, 0 after the EOS) with ``rmk.causal_lm_logprobs``: the backbone's final
    hidden states and the LM head through the fused ``rmk.token_logprobs``, never the [B, T, V]
    logits. For an unwrapped HF causal LM."""
    R = rollout.sequences.shape[1] - rollout.prompt_len
    return rmk.causal_lm_logprobs(policy, rollout.sequences, rollout.attention_mask, response_length=R,
                                  temperature=temperature, return_entropy=return_entropy,
                                  position_ids=position_ids(rollout.attention_mask))


class ValueModel(nn.Module):
    """A transformer backbone with a per-token value head: ``values[b, t]`` estimates the return
    from the state before response token t (read at the position of the previous token)."""

    def __init__(self, backbone, hidden_size):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)

    def forward(self, rollout):
        h = self.backbone(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                          position_ids=position_ids(rollout.attention_mask), use_cache=False).last_hidden_state
        P = rollout.prompt_len
        return self.value_head(h[:, P - 1:-1].float()).squeeze(-1)


def scoring_pad_id(tokenizer):
    """The ``pad_token_id`` of :func:`reward_scores` for ``tokenizer``: its pad token when that is
    also its EOS (the reward model then scores before the EOS, as HF does), else None (the last
    valid token, the EOS itself)."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None and pad == tokenizer.eos_token_id else None


@torch.no_grad()
def reward_scores(backbone, head_weight, head_bias, rollout, backend=None, pad_token_id=None):
    """The reward model's score of each full sequence: its value head on the hidden state of the
    last valid token (the EOS, or the last generated token when there is none), with
    ``rmk.last_token_reward`` -- B rows, never the head on every token. Float32 [B].
    ``pad_token_id`` (:func:`scoring_pad_id`): the last valid token that is not it, HF's
    *ForSequenceClassification rule, which the reward trainer follows for a pad == eos tokenizer
    (``data.tokenize_pairs`` drops a trailing pad-id token): the token before the EOS, where the
    reward model was trained to score."""
    h = backbone(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                 position_ids=position_ids(rollout.attention_mask), use_cache=False).last_hidden_state
    mask = rollout.attention_mask
    if pad_token_id is not None:
        mask = mask.bool() & (rollout.sequences != pad_token_id)
    return rmk.last_token_reward(h, head_weight, head_bias, attention_mask=mask, backend=backend)[:, 0]


def masked_mean(x, mask):
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


# --loss-agg: how the token losses [B, T] become the loss (verl's loss_agg_mode; the first is
# the default).
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class DataParallelAgg:
    """A minibatch's share of a data-parallel one (verl 0.9.1's ``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``): ``dp_size`` ranks whose gradients DDP averages, ``batch_num_tokens``
    valid tokens and ``global_batch_size`` responses with a valid token over every rank's
    minibatch. :func:`agg_loss` then scales each rank's loss so that the averaged gradient is that
    of the whole minibatch aggregated in one process."""
    dp_size: int
    batch_num_tokens: float
    global_batch_size: float


def data_parallel_agg(mask, dist):
    """The :class:`DataParallelAgg` of this rank's minibatch ``mask`` [B, T] (a sum over the ranks:
    collective, every rank calls it), None in one process (``dist.enabled`` False)."""
    if dist is None or not dist.enabled:
        return None
    m = mask.to(torch.float64)
    tokens, rows = dist.sum([m.sum().item(), (m.sum(-1) > 0).sum().item()])
    return DataParallelAgg(dist.world_size, tokens, rows)


def average_gradients(params, dist):
    """Under torchrun (``dist.enabled``): replace each parameter's gradient by its mean over the
    ranks, as DDP does, in one all-reduce of one flat buffer (collective: every rank calls it
    after its backward; a parameter without a gradient counts as zeros, and has one after).
    The critic-free path's log-probs go through ``rmk.causal_lm_logprobs`` (the backbone and the
    LM head's weight, not the model's ``forward``), which a DDP wrapper would not see; with the
    losses scaled by :func:`agg_loss`'s ``dp``, the averaged gradient is that of the whole
    batch's loss in one process. One process: nothing."""
    if dist is None or not dist.enabled:
        return
    params = [p for p in params if p.requires_grad]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= dist.world_size
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(g).to(g.dtype)
        i += n


def agg_loss(loss_mat, mask, mode="token-mean", horizon=None, dp=None):
    """The loss of the token losses ``loss_mat`` [B, T] at the valid positions of ``mask``,
    aggregated as verl 0.9.1's ``agg_loss`` (``loss_agg_mode``):

    - ``token-mean`` (the default): the mean over every valid token of the batch
      (:func:`masked_mean`; a long response weighs more than a short one);
    - ``token-sum``: the sum over every valid token of the batch;
    - ``seq-mean-token-sum``: each response's token sum, averaged over the responses;
    - ``seq-mean-token-mean`` (the original GRPO): each response's token mean (its sum over its
      token count + 1e-8, verl's, which keeps a response with no valid token finite), averaged
      over the responses;
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): ``seq-mean-token-sum`` divided by the constant
      ``horizon``, default ``T`` (verl's: the response-length dimension, i.e. the run's
      ``--max-new-tokens``).

    The seq-mean modes leave out the responses with no valid token (they count in no mean, as
    in verl). A batch without any valid token gives 0 (verl: NaN, its 0 / 0).

    ``dp`` (a :class:`DataParallelAgg`, from :func:`data_parallel_agg`; None: one process) makes
    this rank's loss verl's with ``dp_size`` ranks: the token mean divides by the valid tokens of
    every rank's minibatch, the seq-mean modes by their responses, and the loss is multiplied by
    ``dp_size``, so that DDP's average of the ranks' gradients is the gradient of the whole
    minibatch's loss (for ``token-sum``: its sum over every rank)."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"agg_loss: mode must be one of {', '.join(LOSS_AGG_MODES)}, got {mode!r}")
    if mode == "token-mean" and dp is None:
        return masked_mean(loss_mat, mask)
    m = mask.to(loss_mat.dtype)
    scale = 1 if dp is None else dp.dp_size
    if mode in ("token-mean", "token-sum"):
        total = (loss_mat * m).sum()
        if mode == "token-mean":
            total = total / max(dp.batch_num_tokens, 1.0)
        return total * scale
    tokens = m.sum(-1)
    seq = (loss_mat * m).sum(-1)
    if mode == "seq-mean-token-mean":  # verl adds its 1e-8 in the mask's dtype (bool: float32)
        seq = seq / (mask.sum(-1) + 1e-8).to(loss_mat.dtype)
    has = (tokens > 0).to(loss_mat.dtype)
    rows = has.sum().clamp(min=1.0) if dp is None else max(dp.global_batch_size, 1.0)
    loss = (seq * has).sum() / rows * scale
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if horizon is None else horizon)
    return loss


# verl clamps the log ratio to +-LOG_RATIO_CLAMP before its exp (compute_policy_loss_vanilla):
# a finite ratio and loss for any pair of log-probs; where |log ratio| <= 20 it changes nothing.
LOG_RATIO_CLAMP = 20.0


def check_clip_ratio_c(clip_ratio_c, name="clip_ratio_c"):
    """Dual-clip's bound must be a finite number > 1 (verl asserts > 1: at 1 or below it would cut
    into the clipped surrogate itself). None (dual-clip off) passes."""
    if clip_ratio_c is not None and not (math.isfinite(clip_ratio_c) and clip_ratio_c > 1.0):
        raise ValueError(f"{name} must be a finite number > 1 (dual-clip PPO caps the loss of a token with a "
                         f"negative advantage at -advantage x {name}), got {clip_ratio_c}")


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range, clip_range_high=None,
                    loss_agg="token-mean", horizon=None, clip_ratio_c=None, return_clipfrac_lower=False, dp=None):
    """The clipped surrogate: ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with ``r =
    exp(clamp(logp - logp_old, -20, 20))``, ``eps_low = clip_range`` and ``eps_high =
    clip_range_high`` (default ``clip_range``; larger: DAPO's clip-higher), aggregated by
    :func:`agg_loss` (``loss_agg``, ``horizon``, ``dp``): verl 0.9.1's ``compute_policy_loss_vanilla``.

    The log ratio is clamped to [-20, 20] before the exp, as verl does: nothing changes where
    |log ratio| <= 20 (values and gradients); beyond, the ratio stays finite and the token gets no
    gradient through it.

    ``clip_ratio_c`` (None: off) turns on dual-clip PPO (Ye et al. 2019, verl's ``clip_ratio_c``):
    where ``A < 0`` the token loss is also capped at ``-A clip_ratio_c``, i.e. ``min(-A c,
    max(-A r, -A clip(r, ...)))``, so a ratio far above ``1 + eps_high`` on a token with a negative
    advantage cannot make an unbounded loss (its gradient is then 0). It must be a finite number
    > 1 (``ValueError`` otherwise). Tokens with ``A >= 0`` are unchanged.

    Returns (loss, clip fraction, approx KL(old || new)); with ``return_clipfrac_lower``, also the
    lower clip fraction: the fraction of valid tokens where dual-clip binds (``A < 0`` and the
    clipped surrogate above ``-A clip_ratio_c``; verl's ``pg_clipfrac_lower``), 0 when
    ``clip_ratio_c`` is None. The metrics are token means whatever ``loss_agg`` is; the clip
    fraction counts the tokens where the ratio's clip binds, as before dual-clip; approx KL is
    ``0.5 (logp - logp_old)^2`` of the unclamped log ratio."""
    check_clip_ratio_c(clip_ratio_c)
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    clipped = torch.maximum(loss1, loss2)
    per_token = clipped
    if clip_ratio_c is not None:
        loss3 = -advantages * clip_ratio_c
        per_token = torch.where(advantages < 0, torch.minimum(loss3, clipped), clipped)
    loss = agg_loss(per_token, mask, loss_agg, horizon, dp)
    with torch.no_grad():
        clipfrac = masked_mean((loss2 > loss1).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
        if not return_clipfrac_lower:
            return loss, clipfrac, approx_kl
        if clip_ratio_c is None:
            clipfrac_lower = torch.zeros_like(clipfrac)
        else:
            clipfrac_lower = masked_mean(((clipped > loss3) & (advantages < 0)).float(), mask)
    return loss, clipfrac, approx_kl, clipfrac_lower


def entropy_bonus(entropy, mask, entropy_coef, loss_agg="token-mean", horizon=None, dp=None):
    """The term added to the policy loss for ``--entropy-coef``: ``-entropy_coef`` times the
    token entropies ``entropy`` [B, T] aggregated by :func:`agg_loss` (verl's ``entropy_coeff``:
    ``pg_loss - entropy_coeff * agg_loss(entropy)``). Returns (term, token-mean entropy: a
    metric, whatever ``loss_agg`` is)."""
    term = -entropy_coef * agg_loss(entropy, mask, loss_agg, horizon, dp)
    with torch.no_grad():
        mean = masked_mean(entropy, mask)
    return term, mean


def ppo_value_loss(values, old_values, returns, mask, clip_range_value, loss_agg="token-mean", horizon=None,
                   dp=None):
    """The clipped value loss: ``0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``,
    aggregated by :func:`agg_loss` (as verl aggregates its value loss: with the policy loss's
    ``loss_agg_mode``). Returns (loss, clip fraction: the token mean of where the clipped term is
    the larger, verl's ``vf_clipfrac``). ``V`` itself is clipped, as verl's ``compute_value_loss``
    and TRL's PPO do: a value inside the range is its own clipped value, so the clip fraction
    counts no unclipped token (``V_old + clip(V - V_old, -c, c)`` rounds to another number for
    about a third of them)."""
    clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    l1 = (values - returns) ** 2
    l2 = (clipped - returns) ** 2
    loss = 0.5 * agg_loss(torch.maximum(l1, l2), mask, loss_agg, horizon, dp)
    with torch.no_grad():
        clipfrac = masked_mean((l2 > l1).float(), mask)
    return loss, clipfrac


def minibatch_indices(n, n_minibatches, generator):
    """The rows of each minibatch of one epoch: a random permutation of ``range(n)`` (from
    ``generator``) cut into ``n_minibatches`` slices of ``n // n_minibatches`` rows, which must
    divide ``n`` (both RL paths check ``--minibatches`` so at start-up): every row once."""
    if n_minibatches < 1 or n % n_minibatches:
        raise ValueError(f"minibatch_indices: n_minibatches ({n_minibatches}) must divide the {n} rows")
    perm = torch.randperm(n, generator=generator)
    size = max(1, n // n_minibatches)
    return [perm[i:i + size] for i in range(0, n - size + 1, size)]


def select(rollout, idx):
    return Rollout(rollout.sequences[idx], rollout.attention_mask[idx], rollout.response_mask[idx], rollout.prompt_len)
