"""Baselines written in the project from the published semantics (BENCHMARKS.md).

For every op three providers that do not use rmkernels:

``hf``      what the libraries do today:
            pooling  - HF ``*ForSequenceClassification``: the score head on every token,
                       then the last non-pad token gathered (``(arange(T) * mask).argmax(-1)``);
            bt       - TRL ``RewardTrainer``: ``-logsigmoid(c - r - m).mean()
                       + coef * mean((c + r) ** 2)`` in eager PyTorch;
            pair     - both of the above on TRL's concatenated [chosen; rejected] batch;
            gae      - OpenRLHF ``compute_approx_kl``/``compute_reward`` (the score scattered
                       at the last action token), verl's mask-aware
                       ``for t in reversed(range(T))`` GAE loop and verl's ``masked_whiten``
                       (with its host-side ``mask_sum`` checks, as verl has them).
``torch``   the best vectorized eager PyTorch we could write for the same contract
            (gather B rows before the head; a chunked, O(B*T)-work linear scan for GAE).
``compile`` the ``torch`` version under ``torch.compile`` (built per shape, see ``compiled``).

All of them follow docs/ops.md's contract (fp32 results, the rightmost non-zero mask position,
GAE over valid positions only, zeros at masked positions), so every benchmark can check a
provider's output against ``backend="reference"`` before it times it.
"""
import functools
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F


# =======================================================================================
# 1. Last-token value-head pooling:  fn(hidden [B,T,H], weight [K,H], bias [K], mask [B,T])
# =======================================================================================
def hf_last_index(mask):
    """HF ``*ForSequenceClassification``: rightmost non-pad position via argmax of
    ``arange(T) * non_pad_mask`` (transformers >= 4.47, ``last_non_pad_token``)."""
    T = mask.shape[-1]
    token_indices = torch.arange(T, device=mask.device, dtype=torch.int32)
    return (token_indices * mask.to(torch.int32)).argmax(-1)


def pooling_hf(hidden, weight, bias, mask):
    """The head on all B*T tokens (``self.score(hidden_states)``), then the gather."""
    logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    B = hidden.shape[0]
    pooled = logits[torch.arange(B, device=hidden.device), hf_last_index(mask)]
    return pooled.float()


def pooling_torch(hidden, weight, bias, mask):
    """Gather the B last rows first, then the head in fp32."""
    B = hidden.shape[0]
    rows = hidden[torch.arange(B, device=hidden.device), hf_last_index(mask)]
    return F.linear(rows.float(), weight.float(), None if bias is None else bias.float())


# =======================================================================================
# 2. Bradley-Terry loss:  fn(chosen [B], rejected [B], margin [B] or None, center_coef)
# =======================================================================================
def bt_hf(chosen, rejected, margin, center_coef):
    """TRL ``RewardTrainer.compute_loss``."""
    if margin is not None:
        loss = -F.logsigmoid(chosen - rejected - margin).mean()
    else:
        loss = -F.logsigmoid(chosen - rejected).mean()
    if center_coef:
        loss = loss + center_coef * torch.mean((chosen + rejected) ** 2)
    return loss


def bt_torch(chosen, rejected, margin, center_coef):
    """One elementwise expression and one mean (softplus(-d) == -logsigmoid(d), stable)."""
    c, r = chosen.float(), rejected.float()
    d = c - r if margin is None else c - r - margin
    per = F.softplus(-d)
    if center_coef:
        per = per + center_coef * (c + r).square()
    return per.mean()


# =======================================================================================
# 2b. Pairwise head + loss: fn(hidden [2B,T,H], weight, bias, mask [2B,T], margin, coef)
#     rows 0..B-1 chosen, B..2B-1 rejected (TRL's collator layout)
# =======================================================================================
def pair_hf(hidden, weight, bias, mask, margin, center_coef):
    rewards = pooling_hf(hidden, weight, bias, mask)[:, 0]
    chosen, rejected = torch.chunk(rewards, 2)
    return bt_hf(chosen, rejected, margin, center_coef), chosen, rejected


def pair_torch(hidden, weight, bias, mask, margin, center_coef):
    rewards = pooling_torch(hidden, weight, bias, mask)[:, 0]
    chosen, rejected = torch.chunk(rewards, 2)
    return bt_torch(chosen, rejected, margin, center_coef), chosen, rejected


# =======================================================================================
# 3. PPO rewards + GAE + whitening:
#    fn(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator)
#      -> (advantages, returns, rewards, kl), each [B, T] fp32
# =======================================================================================
def _approx_kl(logprobs, ref_logprobs, kl_estimator):
    x = logprobs.float() - ref_logprobs.float()
    if kl_estimator in ("k1", "kl"):
        return x
    if kl_estimator == "abs":
        return x.abs()
    if kl_estimator in ("k2", "mse"):
        return 0.5 * x.square()
    if kl_estimator == "k3":
        return torch.exp(-x) - 1 + x
    raise ValueError(f"kl_estimator {kl_estimator!r}")


def gae_hf(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator="k1", eps=1e-8):
    """OpenRLHF reward shaping + verl's GAE loop + verl's masked_whiten, eager."""
    # OpenRLHF compute_approx_kl (masked) + compute_reward
    action_mask = mask.bool()
    kl = _approx_kl(logprobs, ref_logprobs, kl_estimator) * action_mask
    kl_reward = -kl_coef * kl
    T = mask.shape[1]
    eos_indices = T - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    r = scores.float() * action_mask.any(dim=1)  # a row with no action token gets no score
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=r.unsqueeze(1))
    rewards = last_reward + kl_reward
    # verl compute_gae_advantage_return (mask-aware: observation tokens are skipped)
    values = values.float()
    response_mask = mask.float()
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        for t in reversed(range(T)):
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = (advantages + values) * response_mask
        advantages = _verl_masked_whiten(advantages, response_mask, eps) * response_mask
    return advantages, returns, rewards, kl


def _verl_masked_whiten(values, mask, eps):
    """verl.utils.torch_functional.masked_whiten (shift_mean=True, unbiased masked_var)."""
    mean = (values * mask).sum() / mask.sum()
    centered = values - mean
    variance = (centered ** 2 * mask).sum() / mask.sum()
    mask_sum = mask.sum()
    if mask_sum == 0:  # verl raises here; the contract wants zeros instead
        return torch.zeros_like(values)
    if mask_sum == 1:
        return torch.zeros_like(values)
    variance = variance * (mask_sum / (mask_sum - 1))
    return (values - mean) * torch.rsqrt(variance + eps)


def _scan_seq(a, u):
    """G_t = u_t + a_t * G_{t+1} (G_T = 0) along dim 0, sequentially over dim 0; also
    P_t = prod_{j >= t} a_j. Each step is one vectorized op over the other dims."""
    g, p = u[-1], a[-1]
    gs, ps = [g], [p]
    for t in range(u.shape[0] - 2, -1, -1):
        g = torch.addcmul(u[t], a[t], g)
        p = a[t] * p
        gs.append(g)
        ps.append(p)
    return torch.stack(gs[::-1]), torch.stack(ps[::-1])


def linear_scan_rev(a, u, chunk=16):
    """Solve G_t = u_t + a_t G_{t+1}, G_T = 0, along the last dim of [B, T] in O(B*T) work
    and about ``chunk * log_chunk(T)`` vectorized steps: each chunk of ``chunk`` positions is
    scanned with a zero carry-in (all chunks at once), the chunks' carries are the same
    recurrence one level up (recursively), and a last pass adds ``P_t * carry``.
    Stable for any a (no division, no cumprod underflow tricks)."""
    T = u.shape[-1]
    if T <= chunk:
        g, _ = _scan_seq(a.movedim(-1, 0), u.movedim(-1, 0))
        return g.movedim(0, -1)
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:  # identity positions at the end: a = 1, u = 0 (G beyond the end is 0)
        a = F.pad(a, (0, pad), value=1.0)
        u = F.pad(u, (0, pad))
    # [chunk, B, n]: position-in-chunk first so each sequential step reads a contiguous slab
    a3 = a.unflatten(-1, (n, chunk)).movedim(-1, 0).contiguous()
    u3 = u.unflatten(-1, (n, chunk)).movedim(-1, 0).contiguous()
    g, p = _scan_seq(a3, u3)                         # local scans, zero carry-in
    first = linear_scan_rev(p[0], g[0], chunk)       # G at each chunk's first position
    carry = F.pad(first[..., 1:], (0, 1))            # carry into chunk k = G at chunk k+1's start
    g = torch.addcmul(g, p, carry.unsqueeze(0))
    return g.movedim(0, -1).flatten(-2)[..., :T]


def gae_torch(logprobs, ref_logprobs, values, scores, mask, kl_coef, gamma, lam, kl_estimator="k1", eps=1e-8,
              chunk=16):
    """Vectorized eager version of the same contract: no loop over T, no host sync."""
    B, T = mask.shape
    valid = mask.bool()
    m = valid.float()
    kl = _approx_kl(logprobs, ref_logprobs, kl_estimator) * m
    pos = torch.arange(T, device=mask.device)
    has = valid.any(dim=1)
    last = torch.where(valid, pos, -1).amax(dim=1).clamp_min(0)
    rewards = (-kl_coef * kl).scatter_add(1, last[:, None], (scores.float() * has)[:, None])
    values = values.float()
    # value of the next valid position (0 after the last one): compact each row's valid
    # values in order (slot = number of valid positions before), then the next valid value
    # after t sits in slot cumsum(m)[t]. (A reverse cummin of indices is the obvious way, but
    # aten's CPU cummin is ~10x slower than this.)
    count = valid.cumsum(1)
    slot = torch.where(valid, count - 1, T + 1)
    compact = values.new_zeros(B, T + 2).scatter_(1, slot, values)
    v_next = compact.gather(1, count)
    # GAE over valid positions: G_t = m_t delta_t + (m_t gamma lam + 1 - m_t) G_{t+1}
    u = (rewards + gamma * v_next - values) * m
    a = torch.where(valid, gamma * lam, 1.0)
    adv = linear_scan_rev(a, u, chunk) * m
    returns = (adv + values) * m
    # whitening over all valid positions, no host sync; n <= 1 gives zeros
    n = m.sum()
    mean = adv.sum() / n
    var = ((adv - mean).square() * m).sum() / (n - 1)
    white = (adv - mean) * torch.rsqrt(var + eps) * m
    adv = torch.where(n > 1, white, torch.zeros_like(white))
    return adv, returns, rewards, kl


# =======================================================================================
# torch.compile of the torch versions
# =======================================================================================
# =======================================================================================
# 5. Critic-free GRPO advantages:  fn(token_level_rewards [B,T], response_mask [B,T], index, eps)
#    index: verl's uid column, a numpy object array of uid strings (one per response)
# =======================================================================================
def grpo_hf(token_level_rewards, response_mask, index, eps=1e-6):
    """verl 0.9 ``compute_grpo_outcome_advantage`` (the default): a Python loop over the
    responses filling uid -> list dictionaries, torch.mean / torch.std per group, a second
    loop writing each advantage, then ``scores.unsqueeze(-1) * response_mask``."""
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                st = torch.stack(id2score[idx])
                id2mean[idx], id2std[idx] = torch.mean(st), torch.std(st)
        for i in range(bsz):
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
        return scores.unsqueeze(-1) * response_mask


def grpo_verl_vectorized(token_level_rewards, response_mask, index, eps=1e-6):
    """verl 0.9 ``compute_grpo_vectorized_outcome_advantage``: ``as_torch_index`` (a failed
    numeric coercion of the strings, then ``np.unique(..., return_inverse=True)``, a sort of
    the uid strings, then the ids copied to the scores' device) and ``group_mean_std``
    (index_add_ sums on that device, singletons mean 0 / std 1, variance floor 0 since verl
    PR 6348)."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        dev = scores.device
        arr = np.asarray(index, dtype=object).reshape(-1)
        try:
            g = torch.from_numpy(arr.astype(np.int64)).to(dev)
        except (ValueError, TypeError):
            g = torch.from_numpy(np.unique(arr, return_inverse=True)[1].astype(np.int64, copy=False)).to(dev)
        G = int(torch.max(g).item()) + 1 if g.numel() else 0
        count = torch.zeros(G, device=dev).index_add_(0, g, torch.ones_like(scores))
        s1 = torch.zeros(G, device=dev).index_add_(0, g, scores)
        mean = s1 / count.clamp_min(1.0)
        centered = scores - mean[g]
        var = torch.zeros(G, device=dev).index_add_(0, g, centered * centered) / (count - 1.0).clamp_min(1.0)
        std = torch.sqrt(torch.clamp(var, min=0.0))
        single = count <= 1.0
        if torch.any(single):
            mean, std = mean.clone(), std.clone()
            mean[single], std[single] = 0.0, 1.0
        scalars = (scores - mean[g]) / (std[g] + eps)
        return scalars.unsqueeze(-1) * response_mask


def uid_ids(index):
    """uid labels -> int64 ids in first-seen order, one dict pass (no sort)."""
    first = dict.fromkeys(index)
    code = dict(zip(first, range(len(first))))
    return torch.from_numpy(np.fromiter(map(code.__getitem__, index), dtype=np.int64, count=len(index)))


def grpo_torch_core(token_level_rewards, ids, response_mask, eps=1e-6):
    """The tensor part of the best eager GRPO we could write: index_add_ statistics over ids
    in [0, B) (no host sync for G), two-pass variance, one ``where`` for the [B, T] write."""
    scores = token_level_rewards.sum(dim=-1)
    zeros = scores.new_zeros(scores.shape[0])
    count = zeros.index_add(0, ids, torch.ones_like(scores))[ids]
    mean = zeros.index_add(0, ids, scores)[ids] / count
    d = scores - mean
    std = torch.sqrt(zeros.index_add(0, ids, d * d)[ids] / (count - 1).clamp_min(1))
    one = count <= 1
    seq = torch.where(one, scores, d) / (torch.where(one, torch.ones_like(std), std) + eps)
    return torch.where(response_mask, seq[:, None], torch.zeros((), dtype=seq.dtype))


def grpo_torch(token_level_rewards, response_mask, index, eps=1e-6):
    return grpo_torch_core(token_level_rewards, uid_ids(index).to(token_level_rewards.device), response_mask, eps)


def rpp_hf(token_level_rewards, response_mask, gamma=1.0, eps=1e-8):
    """verl 0.9's compute_reinforce_plus_plus_outcome_advantage as verl writes it: a Python loop
    over the time steps (the return carried over positions whose mask is 0), then masked_whiten
    and ``* response_mask``. Returns (advantages, returns)."""
    m = response_mask.to(token_level_rewards.dtype)
    returns = torch.zeros_like(token_level_rewards)
    running = 0
    for t in reversed(range(token_level_rewards.shape[1])):
        new = token_level_rewards[:, t] + gamma * running
        returns[:, t] = new * m[:, t]
        running = new * m[:, t] + running * (1 - m[:, t])
    return _verl_masked_whiten(returns, m, eps) * m, returns


def rpp_torch(token_level_rewards, response_mask, gamma=1.0, eps=1e-8):
    """The same, vectorized: the carried return as a linear scan (a = gamma at valid positions, 1
    at masked ones; u = the masked rewards), then the masked whitening."""
    m = response_mask.to(token_level_rewards.dtype)
    a = torch.where(response_mask, torch.full_like(m, gamma), torch.ones_like(m))
    returns = linear_scan_rev(a, token_level_rewards * m) * m
    return _verl_masked_whiten(returns, m, eps) * m, returns


def remax_hf(token_level_rewards, reward_baselines, response_mask):
    """verl 0.9's compute_remax_outcome_advantage as verl writes it. Returns (advantages, returns)."""
    m = response_mask.to(token_level_rewards.dtype)
    returns = (token_level_rewards * m).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    return returns - reward_baselines.unsqueeze(-1) * m, returns


TORCH_FNS = {"pooling": pooling_torch, "bt": bt_torch, "pair": pair_torch, "gae": gae_torch, "grpo": grpo_torch_core,
             "rpp": rpp_torch, "remax": remax_hf}
HF_FNS = {"pooling": pooling_hf, "bt": bt_hf, "pair": pair_hf, "gae": gae_hf, "grpo": grpo_hf, "rpp": rpp_hf,
          "remax": remax_hf}


def compiled(op):
    """A fresh ``torch.compile`` of the ``torch`` version of `op` (one per shape, so a run
    over many shapes never hits the recompile limit; ``dynamic=False``: each named shape is
    specialised, as a training job with fixed shapes would be)."""
    fn = TORCH_FNS[op]
    if op == "gae":
        fn = functools.partial(fn)  # kl_coef etc. stay Python constants
    return torch.compile(fn, dynamic=False)
