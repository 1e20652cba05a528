"""End-to-end tests of `rmkernels-train ppo` on CPU: a short run raises the reward model's
score with a finite KL, resume continues exactly, bad input stops with a message, and a
2-process torchrun (gloo) run whitens the advantages across ranks and ends in sync; a disk full
on rank 0 alone while it writes a checkpoint stops both ranks with one line (no traceback, no
hang) and --resume goes on from the last intact checkpoint; so does a disk full while rank 0 alone
writes a line of metrics.jsonl, final.json or curves.png, or a failed default reward model run
(trained on rank 0 alone)."""
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from utils import assert_one_line_each, run_two_ranks, subprocess_env  # noqa: E402

from rmkernels_train import ppo_core as core  # noqa: E402
from rmkernels_train.ppo import main  # noqa: E402

GAE = ["--advantage", "gae"]  # these tests are about PPO with GAE (the default is critic-free: test_train_rl.py)
FAST = GAE + ["--threads", "1", "--no-progress", "--no-plot"]


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory):
    """A small reward model trained by `rmkernels-train reward` on the built-in sorting task."""
    from rmkernels_train.reward import main as reward_main

    out = tmp_path_factory.mktemp("rm")
    rc = reward_main(["--output-dir", str(out), "--hidden-size", "32", "--layers", "2",
                      "--default-train-pairs", "1600", "--batch-size", "32", "--threads", "1",
                      "--no-progress", "--no-plot", "--eval-every", "1000", "--seed", "1"])
    assert rc == 0
    with open(out / "final.json") as f:
        return json.load(f)["checkpoint"]


# ---------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------
def test_ppo_losses_match_their_formulas():
    B, T = 5, 7
    lp, old, adv, mask = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T), torch.rand(B, T) > 0.3
    loss, clipfrac, _ = core.ppo_policy_loss(lp, old, adv, mask, 0.2)
    r = (lp - old).exp()
    per = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    # float32 means of O(1) terms summed in another order: an absolute bar at their scale (a mean
    # near 0, 3e-4 for RMKERNELS_TEST_SEED=410347413, failed allclose's relative one)
    torch.testing.assert_close(loss, per[mask].mean(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(clipfrac, ((-adv * r.clamp(0.8, 1.2)) > (-adv * r))[mask].float().mean())
    # the approx KL metric is 0.5 (log ratio)^2 of the raw log ratio, also beyond the +-20 that
    # the ratio's exp is clamped to (no test had a log ratio that large)
    one = torch.ones(1, 1)
    assert core.ppo_policy_loss(torch.tensor([[30.0]]), torch.zeros(1, 1), one, one > 0, 0.2)[2].item() == 450.0
    v, v_old, ret = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    vloss, _ = core.ppo_value_loss(v, v_old, ret, mask, 0.1)
    vc = v_old + (v - v_old).clamp(-0.1, 0.1)
    torch.testing.assert_close(vloss, 0.5 * torch.maximum((v - ret) ** 2, (vc - ret) ** 2)[mask].mean(),
                               rtol=1e-5, atol=1e-6)


def _ragged_mask(B, T, g):
    """Right-padded responses of random lengths, row 0 with no valid token, the last with one
    at least."""
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = 0, max(int(lengths[-1]), 1)
    return torch.arange(T)[None] < lengths[:, None]


def test_minibatch_indices_cover_every_row_once():
    """Each epoch's minibatches are equal slices of one permutation; a count that does not divide
    the rows is refused (before, 6 rows in 4 minibatches gave 6 slices of 1, and 32 in 3 left 2
    rows out of every epoch)."""
    gen = torch.Generator().manual_seed(0)
    for n, k in ((8, 1), (8, 2), (12, 3), (6, 6)):
        parts = core.minibatch_indices(n, k, gen)
        assert len(parts) == k and all(len(p) == n // k for p in parts)
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
    for n, k in ((6, 4), (32, 3), (4, 0)):
        with pytest.raises(ValueError, match="must divide"):
            core.minibatch_indices(n, k, gen)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
def test_agg_loss_follows_verls_formulas(mask_dtype):
    """verl 0.9.1's ``agg_loss`` (trainer/ppo/core_algos.py) with dp_size 1, written out:
    token-mean = sum(x m) / sum(m); token-sum = sum(x m); the seq-mean modes average over the responses with a valid
    token (a fully masked one counts in no mean) each response's token sum (seq-mean-token-sum),
    that sum over its token count + 1e-8 (seq-mean-token-mean), or the token sum over the horizon
    (seq-mean-token-sum-norm: the mask's width unless given). Values and gradients."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, T = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 13, (1,), generator=g))
        x = torch.randn(B, T, generator=g, dtype=torch.float64)
        mask = _ragged_mask(B, T, g).to(mask_dtype)
        for mode in core.LOSS_AGG_MODES:
            xg = x.clone().requires_grad_()
            got = core.agg_loss(xg, mask, mode)
            want = _verl_agg(x, mask, mode)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=mode)
            # the gradient of the same formula: 0 at masked positions and in the empty row
            xw = x.clone().requires_grad_()
            _verl_agg(xw, mask, mode).backward()
            got.backward()
            torch.testing.assert_close(xg.grad, xw.grad, rtol=1e-12, atol=1e-12, msg=mode)
            assert (xg.grad[~mask.bool()] == 0).all()
        sums = (x * mask.double()).sum(-1)
        torch.testing.assert_close(core.agg_loss(x, mask, "seq-mean-token-sum-norm", horizon=32),
                                   sums[mask.bool().any(-1)].mean() / 32, rtol=1e-12, atol=1e-12)
    # token-mean is the masked mean the loops used before --loss-agg, bit for bit
    x, mask = torch.randn(6, 5), torch.rand(6, 5) > 0.4
    assert torch.equal(core.agg_loss(x, mask), core.masked_mean(x, mask))
    # a batch without any valid token: 0 (verl: NaN)
    for mode in core.LOSS_AGG_MODES:
        assert core.agg_loss(x, torch.zeros_like(mask), mode).item() == 0.0


def _verl_agg(x, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """verl 0.9.1's agg_loss for float64 ``x``, written out: its 1e-8 is added to the token count
    in the mask's dtype (a bool or integer count becomes float32, torch's default)."""
    m = mask.double()
    sums = (x * m).sum(-1)
    if mode == "token-mean":
        return (x * m).sum() / (m.sum() if batch_num_tokens is None else batch_num_tokens) * dp_size
    if mode == "token-sum":
        return (x * m).sum() * dp_size
    seq_mask = (m.sum(-1) > 0).double()  # the responses with a valid token
    if global_batch_size is None:
        global_batch_size = seq_mask.sum()
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        loss = (sums * seq_mask).sum() / global_batch_size * dp_size
        return loss / mask.shape[-1] if mode == "seq-mean-token-sum-norm" else loss
    assert mode == "seq-mean-token-mean"
    return (sums / (mask.sum(-1) + 1e-8).double() * seq_mask).sum() / global_batch_size * dp_size


def test_agg_loss_across_ranks():
    """``dp`` (``DataParallelAgg``): a minibatch cut into shares of unequal response lengths, one
    per rank; each rank's loss is verl's agg_loss with dp_size and the whole minibatch's counts,
    the mean of the ranks' losses is the whole minibatch's loss and the mean of their gradients
    (what DDP applies) its gradient, in every mode. Without ``dp`` (each rank's own mean) the
    token-mean and seq-mean gradients differ: the data tells the two apart."""
    g = torch.Generator().manual_seed(3)
    for case in range(12):
        ranks = (2, 3)[case % 2]
        B, T = 3 * ranks + int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(2, 14, (1,), generator=g))
        x = torch.randn(B, T, generator=g, dtype=torch.float64)
        mask = _ragged_mask(B, T, g)
        mask[: B // ranks, T // 2:] = False  # the first rank's responses are shorter
        cuts = [B * r // ranks for r in range(ranks + 1)]
        shares = [slice(cuts[r], cuts[r + 1]) for r in range(ranks)]
        m = mask.double()
        dp = core.DataParallelAgg(ranks, m.sum().item(), (m.sum(-1) > 0).sum().item())
        for mode in core.LOSS_AGG_MODES:
            whole = x.clone().requires_grad_()
            want = core.agg_loss(whole, mask, mode)
            want.backward()
            torch.testing.assert_close(want, _verl_agg(x, mask, mode), rtol=1e-12, atol=1e-12, msg=mode)
            losses, grads, local_grads = [], [], []
            for s in shares:
                xs = x[s].clone().requires_grad_()
                loss = core.agg_loss(xs, mask[s], mode, dp=dp)
                torch.testing.assert_close(loss, _verl_agg(x[s], mask[s], mode, ranks, dp.batch_num_tokens,
                                                           dp.global_batch_size), rtol=1e-12, atol=1e-12, msg=mode)
                loss.backward()
                losses.append(loss.detach())
                grads.append(xs.grad)
                xl = x[s].clone().requires_grad_()
                core.agg_loss(xl, mask[s], mode).backward()
                local_grads.append(xl.grad)
            torch.testing.assert_close(torch.stack(losses).mean(), want.detach(), rtol=1e-12, atol=1e-12, msg=mode)
            torch.testing.assert_close(torch.cat(grads) / ranks, whole.grad, rtol=1e-12, atol=1e-12, msg=mode)
            if mode != "token-sum":  # the per-rank means weigh the ranks' tokens / responses unequally
                assert not torch.allclose(torch.cat(local_grads) / ranks, whole.grad, rtol=1e-6, atol=1e-9), mode
    # no valid token anywhere: 0, as in one process
    empty = torch.zeros(4, 3, dtype=torch.bool)
    for mode in core.LOSS_AGG_MODES:
        assert core.agg_loss(torch.ones(4, 3), empty, mode, dp=core.DataParallelAgg(2, 0.0, 0.0)).item() == 0.0


def test_data_parallel_agg_in_one_process():
    """One process (no torchrun): no data-parallel scaling, the losses stay those of one rank."""
    from rmkernels_train.utils import Dist
    assert core.data_parallel_agg(torch.ones(2, 3, dtype=torch.bool), Dist()) is None
    assert core.data_parallel_agg(torch.ones(2, 3, dtype=torch.bool), None) is None


def test_policy_loss_clips_higher_and_aggregates():
    """clip_range below, clip_range_high above (DAPO): the clipped surrogate with (1 - 0.1, 1 +
    0.3), aggregated by --loss-agg; the clip fraction stays a token mean; the value loss
    aggregates with the same mode."""
    g = torch.Generator().manual_seed(1)
    B, T = 6, 7
    lp, old = torch.randn(B, T, generator=g) * 0.3, torch.randn(B, T, generator=g) * 0.3
    adv, mask = torch.randn(B, T, generator=g), _ragged_mask(B, T, g)
    r = (lp - old).exp()
    l1, l2 = -adv * r, -adv * r.clamp(0.9, 1.3)
    per = torch.maximum(l1, l2)
    assert bool(((r > 1.2) & (r < 1.3) & mask & (adv > 0)).any())  # where 0.2 would clip and 0.3 does not
    for mode in core.LOSS_AGG_MODES:
        loss, clipfrac, _ = core.ppo_policy_loss(lp, old, adv, mask, 0.1, 0.3, mode, horizon=9)
        torch.testing.assert_close(loss, core.agg_loss(per, mask, mode, horizon=9))
        torch.testing.assert_close(clipfrac, (l2 > l1)[mask].float().mean())
    sym, _, _ = core.ppo_policy_loss(lp, old, adv, mask, 0.2)
    assert torch.equal(sym, core.ppo_policy_loss(lp, old, adv, mask, 0.2, 0.2)[0])
    assert not torch.allclose(sym, core.ppo_policy_loss(lp, old, adv, mask, 0.2, 0.3)[0])
    v, v_old, ret = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    vc = v_old + (v - v_old).clamp(-0.1, 0.1)
    vper = torch.maximum((v - ret) ** 2, (vc - ret) ** 2)
    vloss, _ = core.ppo_value_loss(v, v_old, ret, mask, 0.1, "seq-mean-token-mean")
    torch.testing.assert_close(vloss, 0.5 * core.agg_loss(vper, mask, "seq-mean-token-mean"))


def test_value_loss_follows_verls_formula():
    """verl 0.9.1's ``compute_value_loss`` written out (``clip_by_value(V, V_old - c, V_old + c)``):
    the loss in every --loss-agg mode, its gradient, and the clip fraction, exactly; with a clip
    range nothing reaches, the clip fraction is 0 (V_old + clip(V - V_old) rounds away from V for
    about a third of the tokens, which a comparison of the two squares would count)."""
    g = torch.Generator().manual_seed(4)
    for case in range(20):
        B, T = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 13, (1,), generator=g))
        v, v_old, ret = (torch.randn(B, T, generator=g) * 3 for _ in range(3))
        mask = _ragged_mask(B, T, g)
        c = (0.1, 0.5, 100.0)[case % 3]
        for mode in core.LOSS_AGG_MODES:
            vg = v.clone().requires_grad_()
            loss, clipfrac = core.ppo_value_loss(vg, v_old, ret, mask, c, mode)
            vw = v.clone().requires_grad_()
            clipped = torch.max(torch.min(vw, v_old + c), v_old - c)
            l1, l2 = (vw - ret) ** 2, (clipped - ret) ** 2
            want = 0.5 * _verl_agg(torch.max(l1, l2).double(), mask, mode).float()
            torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6, msg=mode)
            loss.backward()
            want.backward()
            torch.testing.assert_close(vg.grad, vw.grad, rtol=1e-6, atol=1e-6, msg=mode)
            m = mask.float()
            assert torch.equal(clipfrac, ((l2 > l1).float() * m).sum() / m.sum())  # verl's masked_mean
            if c == 100.0:
                assert clipfrac.item() == 0.0


def _verl_policy_loss(lp, old, adv, mask, low, high, c, mode, horizon=None):
    """verl 0.9.1's ``compute_policy_loss_vanilla`` (trainer/ppo/core_algos.py), written out with
    its names, dp_size 1: the log ratio clamped to +-20, the clipped surrogate, then dual-clip's
    cap ``-A c`` where A < 0. Returns (loss, pg_clipfrac, pg_clipfrac_lower)."""
    m = mask.double()
    negative_approx_kl = torch.clamp(lp - old, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - low, 1 + high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = (torch.gt(pg_losses2, pg_losses1).double() * m).sum() / m.sum()
    pg_losses3 = -adv * c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = (torch.gt(clip_pg_losses1, pg_losses3).double() * (adv < 0).double() * m).sum() / m.sum()
    pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
    if mode == "seq-mean-token-sum-norm" and horizon is not None:
        return _verl_agg(pg_losses, mask, "seq-mean-token-sum") / horizon, pg_clipfrac, pg_clipfrac_lower
    return _verl_agg(pg_losses, mask, mode), pg_clipfrac, pg_clipfrac_lower


def test_dual_clip_follows_verls_formula():
    """clip_ratio_c: verl's dual-clip (``_verl_policy_loss``) on random ragged batches with
    advantages of both signs (some exactly 0), log ratios up to beyond +-20 (verl's clamp), with and
    without clip_range_high, every --loss-agg: the loss, its gradients and both clip fractions."""
    g = torch.Generator().manual_seed(2)
    binds = clamped = 0
    for case in range(40):
        B, T = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 13, (1,), generator=g))
        scale = (0.05, 0.5, 2.0, 15.0)[case % 4]  # 15: some log ratios beyond +-20
        lp = torch.randn(B, T, generator=g, dtype=torch.float64) * scale
        old = torch.randn(B, T, generator=g, dtype=torch.float64) * scale
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
        adv[torch.rand(B, T, generator=g) < 0.1] = 0.0
        mask = _ragged_mask(B, T, g)
        low, high, c = 0.2, (None, 0.28)[case % 2], (1.5, 3.0, 10.0)[case % 3]
        binds += int(((adv < 0) & mask & ((lp - old).exp() > c)).sum())
        clamped += int((((lp - old).abs() > 20) & mask).sum())
        for mode in core.LOSS_AGG_MODES:
            for horizon in ((None, 16) if mode == "seq-mean-token-sum-norm" else (None,)):
                lg, og = lp.clone().requires_grad_(), old.clone().requires_grad_()
                loss, clipfrac, _, lower = core.ppo_policy_loss(lg, og, adv, mask, low, high, mode, horizon,
                                                                clip_ratio_c=c, return_clipfrac_lower=True)
                lw, ow = lp.clone().requires_grad_(), old.clone().requires_grad_()
                want, want_cf, want_lower = _verl_policy_loss(lw, ow, adv, mask, low, low if high is None else high,
                                                              c, mode, horizon)
                msg = f"case {case}, {mode}, horizon {horizon}"
                torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12, msg=msg)
                (loss + 0.0).backward()
                want.backward()
                torch.testing.assert_close(lg.grad, lw.grad, rtol=1e-12, atol=1e-12, msg=msg)
                torch.testing.assert_close(og.grad, ow.grad, rtol=1e-12, atol=1e-12, msg=msg)
                torch.testing.assert_close(clipfrac, want_cf.to(clipfrac.dtype), msg=msg)
                torch.testing.assert_close(lower, want_lower.to(lower.dtype), msg=msg)
                # where dual-clip binds the token has no gradient through the ratio
                assert (lg.grad[(adv < 0) & mask & ((lp - old).clamp(-20, 20).exp() * (-adv) > -adv * c)] == 0).all()
    assert binds > 20 and clamped > 5  # the cases reach dual-clip and the clamp


def test_dual_clip_off_is_the_loss_of_before():
    """clip_ratio_c=None (the default) is the clipped surrogate of before, bit for bit in value and
    gradient where |log ratio| <= 20 (the clamp is the identity there); its lower clip fraction is 0.
    Beyond 20 the ratio is exp(+-20): finite, where the unclamped ratio overflows float32."""
    g = torch.Generator().manual_seed(3)
    lp, old = torch.randn(7, 9, generator=g) * 3, torch.randn(7, 9, generator=g) * 3
    adv, mask = torch.randn(7, 9, generator=g), _ragged_mask(7, 9, g)
    for mode in core.LOSS_AGG_MODES:
        for high in (None, 0.3):
            lg, lo = lp.clone().requires_grad_(), lp.clone().requires_grad_()
            loss, clipfrac, kl, lower = core.ppo_policy_loss(lg, old, adv, mask, 0.2, high, mode,
                                                             return_clipfrac_lower=True)
            r = torch.exp(lo - old)  # the loss before dual-clip, as it was written
            l1, l2 = -adv * r, -adv * torch.clamp(r, 0.8, 1.2 if high is None else 1.3)
            before = core.agg_loss(torch.maximum(l1, l2), mask, mode)
            assert torch.equal(loss, before), mode
            loss.backward()
            before.backward()
            assert torch.equal(lg.grad, lo.grad), mode
            assert lower.item() == 0.0
            assert core.ppo_policy_loss(lp, old, adv, mask, 0.2, high, mode)[1:] == (clipfrac, kl)
    # log ratios of +-100: exp overflows float32 unclamped; clamped to +-20 the loss is finite
    big = torch.tensor([[100.0, 100.0, -100.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    for c, tok1 in ((None, math.exp(20.0)), (3.0, 3.0)):  # token 1: A < 0, ratio e^20, capped at 3 by dual-clip
        loss, *_ = core.ppo_policy_loss(big, torch.zeros(1, 3), adv, torch.ones(1, 3), 0.2, clip_ratio_c=c)
        torch.testing.assert_close(loss.item(), (-1.2 + tok1 + 0.8) / 3, rtol=1e-6, atol=0)
        big.grad = None
        loss.backward()
        assert torch.equal(big.grad, torch.zeros(1, 3))  # clipped, capped or beyond the clamp: no gradient


@pytest.mark.parametrize("c", [1.0, 0.5, 0.0, -3.0, float("nan"), float("inf")])
def test_dual_clip_bound_must_be_above_1(c):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"clip_ratio_c must be a finite number > 1"):
        core.ppo_policy_loss(x, x, x, x > -1, 0.2, clip_ratio_c=c)


def test_reward_scores_pool_as_hf_when_pad_is_eos():
    """A pad == eos tokenizer: the reward trainer drops the trailing EOS (HF's pad-id rule), so
    the rollouts' scores are read before the EOS too, where HF's *ForSequenceClassification
    reads them; with a pad token of its own, at the last valid token (the EOS)."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForSequenceClassification

    eos = 3
    cfg = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, num_labels=1, pad_token_id=eos)
    rm = LlamaForSequenceClassification(cfg).eval()
    seq = torch.tensor([[5, 6, 7, 8, eos, eos, eos], [5, 9, 10, 11, 12, 13, eos], [5, 6, 7, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    roll = core.Rollout(sequences=seq, attention_mask=mask, response_mask=mask[:, 2:], prompt_len=2)
    pad_is_eos = SimpleNamespace(pad_token_id=eos, eos_token_id=eos)
    got = core.reward_scores(rm.model, rm.score.weight, None, roll, pad_token_id=core.scoring_pad_id(pad_is_eos))
    with torch.no_grad():
        hf = rm(input_ids=seq, attention_mask=mask).logits[:, 0]
    assert torch.allclose(got, hf, atol=1e-6), (got, hf)
    own_pad = SimpleNamespace(pad_token_id=0, eos_token_id=eos)
    assert core.scoring_pad_id(own_pad) is None
    at_eos = core.reward_scores(rm.model, rm.score.weight, None, roll)
    assert not torch.allclose(at_eos[:2], hf[:2]) and torch.allclose(at_eos[2], hf[2], atol=1e-6)


def test_generate_masks_stop_at_first_eos():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    policy = LlamaForCausalLM(cfg)
    ids, mask = core.left_pad([[2, 3, 4], [2, 5]], 0)
    assert ids.tolist() == [[2, 3, 4], [0, 2, 5]] and mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    for _ in range(5):
        roll = core.generate(policy, ids, mask, max_new_tokens=6, eos_token_id=1, pad_token_id=0)
        resp = roll.sequences[:, 3:]
        assert resp.shape == (2, 6)
        for b in range(2):
            row, m = resp[b].tolist(), roll.response_mask[b].tolist()
            end = row.index(1) + 1 if 1 in row else 6
            assert m == [1] * end + [0] * (6 - end)
            assert all(t == 0 for t in row[end:])
    # log-probs from one forward pass over the finished sequences (positions as generate numbers them)
    lp = core.policy_logprobs(policy, roll)
    assert lp.shape == (2, 6) and (lp <= 0).all()


def _tiny_lm(vocab=20, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg)


def _sample(policy, ids, mask, seed, **kw):
    torch.manual_seed(seed)
    return core.generate(policy, ids, mask, max_new_tokens=8, eos_token_id=1, pad_token_id=0, **kw).sequences


def test_generate_ignores_the_policys_generation_config(tmp_path):
    """Rollouts are sampled from the softmax at --temperature that the PPO log-probs assume: a
    --policy whose generation_config.json holds a repetition_penalty, top_p, ... samples the same
    tokens as the same weights without it (audit: a repetition_penalty 5 changed them)."""
    from rmkernels_train.ppo import load_policy
    from rmkernels_train.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("0123456789 sort:")
    plain = _tiny_lm(vocab=len(tok))
    plain.config.pad_token_id, plain.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    plain.save_pretrained(tmp_path / "plain")
    plain.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, top_p=0.5, top_k=3,
                                   temperature=0.3, do_sample=True)
    plain.save_pretrained(tmp_path / "reppen")
    assert json.loads((tmp_path / "reppen" / "generation_config.json").read_text())["repetition_penalty"] == 5.0
    a, b = load_policy(str(tmp_path / "plain"), tok), load_policy(str(tmp_path / "reppen"), tok)
    ids, mask = core.left_pad([[tok.bos_token_id, 3, 4, 5], [tok.bos_token_id, 6]] * 4, tok.pad_token_id)
    for seed in range(3):
        for kw in ({}, {"temperature": 0.7}, {"top_k": 1}):
            x = _sample(a, ids, mask, seed, **kw)
            assert torch.equal(x, _sample(b, ids, mask, seed, **kw)), (seed, kw)
    assert b.generation_config.repetition_penalty == 5.0  # the policy's own config is left as it was


def test_generate_samples_the_whole_vocabulary():
    """No top-k unless asked: transformers' default top_k (50) is not applied by the back door
    (a policy of 200 tokens with equal logits samples more than 50 distinct ones)."""
    policy = _tiny_lm(vocab=200)
    with torch.no_grad():
        policy.lm_head.weight.zero_()
    ids, mask = core.left_pad([[2, 3]] * 32, 0)
    seen = set(_sample(policy, ids, mask, 0)[:, 2:].flatten().tolist())
    assert len(seen) > 50, len(seen)


def test_generate_stops_on_non_finite_logits():
    """A diverged policy (NaN or overflowing logits) raises NonFiniteLogits, which the trainers
    turn into one line; not torch.multinomial's "probability tensor contains inf/nan"."""
    policy = _tiny_lm()
    ids, mask = core.left_pad([[2, 3, 4], [2, 5]], 0)
    for bad in (float("nan"), 1e38):
        with torch.no_grad():
            policy.lm_head.weight.fill_(bad)
        with pytest.raises(core.NonFiniteLogits):
            _sample(policy, ids, mask, 0, temperature=0.5)
    assert policy.training  # its mode restored


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
def test_short_run_raises_the_score(reward_model, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--reward-model", reward_model, "--output-dir", str(out), "--steps", "30", "--batch-size", "24",
               "--adaptive-kl", "--kl-target", "4", "--kl-horizon", "500", "--threads", "1", "--no-progress"] + GAE)
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    recs = _records(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 31))
    first, last = [r["score"] for r in recs[:6]], [r["score"] for r in recs[-6:]]
    rise = statistics.mean(last) - statistics.mean(first)
    noise = (statistics.stdev(first) + statistics.stdev(last)) / 2  # step-to-step spread of the mean score
    assert rise > max(0.2, 3 * noise), (f"the score did not rise: first 6 steps {first}, last 6 steps {last} "
                                        f"(rise {rise:.3f}, step-to-step spread {noise:.3f})")
    assert all(torch.isfinite(torch.tensor([r["kl"], r["kl_coef"], r["vf_loss"], r["pg_loss"]])).all() for r in recs)
    assert recs[-1]["kl"] > 0
    assert len({round(r["kl_coef"], 8) for r in recs}) > 1  # the adaptive controller moved
    assert "mean reward-model score" in printed.out and "->" in printed.out
    assert (out / "curves.png").stat().st_size > 0
    with open(out / "final.json") as f:  # the --output-dir help lists it for both paths
        final = json.load(f)
    assert final["advantage"] == "gae" and final["steps"] == 30 and final["done"]
    assert final["score_first"] == pytest.approx(statistics.mean(r["score"] for r in recs[:7]))
    assert final["score_last"] == pytest.approx(statistics.mean(r["score"] for r in recs[-7:]))
    assert final["kl"] == recs[-1]["kl"] and final["checkpoint"].endswith("checkpoint-30")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "policy")
    AutoTokenizer.from_pretrained(out / "policy")


def test_clip_range_high_and_loss_agg_reach_the_gae_update(reward_model, tmp_path, capsys, monkeypatch):
    """--advantage gae passes --clip-range-high, --clip-ratio-c and --loss-agg (horizon
    --max-new-tokens; no data-parallel counts in one process) to the policy loss and --loss-agg
    to the value loss; --clip-range-high
    defaults to --clip-range, --clip-ratio-c to None (off); clipfrac_lower is logged with it only."""
    calls = {"policy": [], "value": []}
    real_p, real_v = core.ppo_policy_loss, core.ppo_value_loss

    def policy_loss(*args, **kwargs):
        calls["policy"].append((*args[4:], kwargs.get("clip_ratio_c"), kwargs["dp"]))
        return real_p(*args, **kwargs)

    def value_loss(*args, **kwargs):
        calls["value"].append((*args[4:], kwargs["dp"]))
        return real_v(*args, **kwargs)

    monkeypatch.setattr(core, "ppo_policy_loss", policy_loss)
    monkeypatch.setattr(core, "ppo_value_loss", value_loss)
    common = ["--reward-model", reward_model, "--batch-size", "4", "--max-new-tokens", "5", "--ppo-epochs", "1",
              "--minibatches", "2", "--steps", "1", "--clip-range", "0.1"] + FAST
    assert main(common + ["--output-dir", str(tmp_path / "a"), "--clip-range-high", "0.3", "--loss-agg",
                          "seq-mean-token-mean", "--clip-ratio-c", "2.5"]) == 0
    assert calls["policy"] == [(0.1, 0.3, "seq-mean-token-mean", 5, 2.5, None)] * 2  # one process: no dp
    assert calls["value"] == [(0.2, "seq-mean-token-mean", 5, None)] * 2
    rec, = _records(tmp_path / "a" / "metrics.jsonl")
    assert 0.0 <= rec["clipfrac_lower"] <= 1.0
    calls["policy"].clear()
    assert main(common + ["--output-dir", str(tmp_path / "b")]) == 0
    assert calls["policy"] == [(0.1, 0.1, "token-mean", 5, None, None)] * 2
    assert "clipfrac_lower" not in _records(tmp_path / "b" / "metrics.jsonl")[0]
    capsys.readouterr()


def test_resume_continues_exactly(reward_model, tmp_path, capsys):
    common = ["--reward-model", reward_model, "--batch-size", "8", "--max-new-tokens", "5", "--ppo-epochs", "2",
              "--save-every", "100"] + FAST
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert main(common + ["--output-dir", str(a), "--steps", "4"]) == 0
    assert main(common + ["--output-dir", str(b), "--steps", "2"]) == 0
    assert main(common + ["--output-dir", str(b), "--steps", "4", "--resume"]) == 0
    capsys.readouterr()
    ra, rb = _records(a / "metrics.jsonl"), _records(b / "metrics.jsonl")
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        for k in ("score", "kl", "kl_coef", "pg_loss", "vf_loss"):
            assert x[k] == y[k], f"step {x['step']}: {k} {x[k]} (straight) != {y[k]} (resumed)"
    from safetensors.torch import load_file

    wa = load_file(a / "checkpoint-4" / "policy" / "model.safetensors")
    wb = load_file(b / "checkpoint-4" / "policy" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert main(common + ["--output-dir", str(b), "--steps", "6", "--resume", "--seed", "5"]) == 1
    assert "--seed was 0 in the checkpoint's run and is 5 now" in capsys.readouterr().err


def test_default_reward_model_dir_is_reused(reward_model, tmp_path, capsys):
    """Without --reward-model the loop uses <output-dir>/reward_model (training it when absent)."""
    out = tmp_path / "run"
    (out / "reward_model").mkdir(parents=True)
    (out / "reward_model" / "final.json").write_text(json.dumps({"checkpoint": reward_model}))
    assert main(["--output-dir", str(out), "--steps", "1", "--batch-size", "4", "--ppo-epochs", "1"] + FAST) == 0
    assert len(_records(out / "metrics.jsonl")) == 1


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_reward_model_may_be_a_reward_runs_output_dir(reward_model, tmp_path, capsys, advantage):
    """--reward-model <a reward run's --output-dir> (what `rmkernels-train reward --output-dir D`
    was given) stands for the final checkpoint that run's final.json names, said in the log (it
    was a tokenizer error naming no file); a relative path there is taken in that directory."""
    run = tmp_path / "rm_run"
    shutil.copytree(reward_model, run / "checkpoint-50")
    (run / "final.json").write_text(json.dumps({"checkpoint": "elsewhere/rm_run/checkpoint-50"}))
    argv = ["--advantage", advantage, "--reward-model", str(run), "--output-dir", str(tmp_path / "o"),
            "--steps", "1", "--batch-size", "4", "--threads", "1", "--no-progress", "--no-plot"]
    argv += ["--ppo-epochs", "1", "--max-new-tokens", "4"] if advantage == "gae" else \
        ["--num-generations", "2", "--warm-start-steps", "0", "--eval-prompts", "8"]
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"--reward-model {run}: the final checkpoint of that reward run, {run / 'checkpoint-50'}" in err, err
    (run / "final.json").write_text("{")  # a cut summary: one line naming it
    assert main(argv[:5] + [str(tmp_path / "o2")] + argv[6:]) == 1
    err = capsys.readouterr().err
    assert f"--reward-model {run}: a training output directory; its summary {run / 'final.json'}" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--reward-model", "/nonexistent"], "--reward-model /nonexistent: not a directory"),
    (GAE + ["--lam", "1.5"], "--lam must be in [0, 1]"),
    (["--kl-coef", "-1"], "--kl-coef must be"),
    (GAE + ["--minibatches", "64", "--batch-size", "8"], "--minibatches 64 must divide --batch-size 8"),
    (GAE + ["--minibatches", "3", "--batch-size", "8"], "--minibatches 3 must divide --batch-size 8"),
    (["--temperature", "1e-40"], "--temperature must be >= 2.93874e-39 (1 / temperature finite in float32"),
    (GAE + ["--temperature", "1e-40"], "--temperature must be >= 2.93874e-39"),
    (["--prompts", "/nonexistent.jsonl"], "no such file"),
    (["--backend", "fast"], "--backend must be one of"),
])
def test_bad_options_stop_with_a_message(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_unavailable_backend_is_refused_up_front(advantage, tmp_path, capsys, monkeypatch):
    """A backend that cannot run on this machine's tensors (cuda or triton without a GPU) is
    refused with the reason by the check of --backend, before any model is built. Where every
    backend runs (a GPU with triton), triton is made to look uninstalled."""
    import rmkernels as rmk
    from rmkernels import _backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    missing = [b for b, why in rmk.backend_report(device).items() if why is not None]
    if not missing:
        monkeypatch.setattr(_backend, "_TRITON_INSTALLED", False)
        monkeypatch.setattr(_backend, "_TRITON_WHY", "triton is not installed (pip install triton==3.6.0)")
        missing = [b for b, why in rmk.backend_report(device).items() if why is not None]
        assert missing == ["triton"], missing
    for b in missing:
        assert main(["--backend", b, "--advantage", advantage, "--output-dir", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert f"--backend {b} cannot run here" in err and "Available: " in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_prompts_and_resume_without_checkpoint(reward_model, tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "sort 12: "}\n{"text": "x"}\n')
    args = ["--reward-model", reward_model, "--prompts", str(bad), "--output-dir", str(tmp_path / "o")]
    assert main(args + FAST) == 1
    assert f"{bad}:2: each line needs" in capsys.readouterr().err
    assert main(["--reward-model", reward_model, "--output-dir", str(tmp_path / "none"), "--resume"] + FAST) == 1
    assert "--resume: no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--kl-estimator", "k7"])


def test_two_processes_whiten_across_ranks(reward_model, tmp_path):
    out = tmp_path / "ddp"
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rmkernels_train", "ppo", "--reward-model", reward_model, "--output-dir", str(out),
           "--steps", "3", "--batch-size", "6", "--max-new-tokens", "5", "--ppo-epochs", "1"] + FAST
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es), parameters identical on every rank" in proc.stdout
    recs = _records(out / "metrics.jsonl")
    assert len(recs) == 3
    for r in recs:
        # whitened with the statistics of both ranks: mean 0 and (unbiased) variance 1 over the
        # whole batch, while each rank's own share is off-centre
        assert abs(r["adv_mean"]) < 1e-4 and abs(r["adv_var"] - 1) < 1e-3, r
        assert len(r["adv_mean_per_rank"]) == 2
    assert max(abs(m) for r in recs for m in r["adv_mean_per_rank"]) > 1e-3


def test_disk_full_on_rank_0_alone_is_one_line_and_resumes(reward_model, tmp_path):
    """ENOSPC while rank 0 alone writes the step-4 checkpoint of a 2-rank run: rank 0 stops with
    the one line naming it, rank 1 (waiting for rank 0 to finish the checkpoint: gloo closed the
    connection under it, with a traceback) with the same line prefixed "rank 0: "; no
    checkpoint-4 (nor a temporary directory) is left and --resume goes on from checkpoint-2."""
    out = tmp_path / "ddp"
    argv = ["ppo", "--reward-model", reward_model, "--output-dir", out, "--steps", "4", "--save-every", "2",
            "--batch-size", "6", "--max-new-tokens", "5", "--ppo-epochs", "1"] + FAST
    fault = {"RMKERNELS_TRAIN_FAULT": "checkpoint-write:2:ENOSPC", "RMKERNELS_TRAIN_FAULT_RANK": "0"}
    ranks = run_two_ranks(argv, tmp_path, fault, timeout=300)
    line = (f"cannot write {out / 'checkpoint-4'} (No space left on device); the checkpoints already written are "
            f"intact (free some space and resume with --resume)")
    assert_one_line_each(ranks, "rmkernels-train ppo", [line, f"rank 0: {line}"])
    assert sorted(d for d in os.listdir(out) if d != "metrics.jsonl") == ["checkpoint-2"], os.listdir(out)
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "rmkernels_train", *map(str, argv), "--resume"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipping" not in proc.stderr and "resuming from" in proc.stderr, proc.stderr[-3000:]
    assert [r["step"] for r in _records(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / "policy" / "model.safetensors").is_file()


# (fault, the file it names, files left): a disk full while rank 0 alone appends the step-1 line of
# metrics.jsonl (every rank stops at step 2's all-reduce), the step-2 line (at the check before
# checkpoint-2), or writes final.json or curves.png at the end (the last checkpoint is written by then)
RANK0_WRITES = [("metrics-write:1:ENOSPC", "metrics.jsonl", ["metrics.jsonl"]),
                ("metrics-write:2:ENOSPC", "metrics.jsonl", ["metrics.jsonl"]),
                ("final-write:1:ENOSPC", "final.json", ["checkpoint-2", "checkpoint-4", "metrics.jsonl", "policy"]),
                ("plot-write:1:ENOSPC", "curves.png", ["checkpoint-2", "checkpoint-4", "metrics.jsonl", "policy"])]


@pytest.mark.slow
@pytest.mark.parametrize("fault,name,left", RANK0_WRITES, ids=[f[0].split(":")[0] + f[0].split(":")[1]
                                                                for f in RANK0_WRITES])
def test_a_failed_write_of_rank_0_alone_stops_every_rank_with_one_line(reward_model, tmp_path, fault, name, left):
    """A disk full while rank 0 alone writes a file besides the checkpoints (metrics.jsonl each
    step, curves.png and final.json at the end): rank 0 stops with the one line naming it, rank 1
    with the same line prefixed "rank 0: " (before: rank 0 stopped alone, with a traceback for
    final.json and curves.png, and rank 1 died in its next collective with gloo's "Connection
    closed by peer" traceback); no hang, and no checkpoint written after the failed line."""
    out = tmp_path / "o"
    fast = [a for a in FAST if a != "--no-plot" or name != "curves.png"]
    argv = ["ppo", "--reward-model", reward_model, "--output-dir", out, "--steps", "4", "--save-every", "2",
            "--batch-size", "6", "--max-new-tokens", "5", "--ppo-epochs", "1"] + fast
    ranks = run_two_ranks(argv, tmp_path, {"RMKERNELS_TRAIN_FAULT": fault, "RMKERNELS_TRAIN_FAULT_RANK": "0"})
    line = f"cannot write {out / name} (No space left on device)"
    assert_one_line_each(ranks, "rmkernels-train ppo", [line, f"rank 0: {line}"])
    assert sorted(os.listdir(out)) == left, sorted(os.listdir(out))


@pytest.mark.slow
def test_a_failed_default_reward_model_stops_every_rank_with_one_line(tmp_path):
    """Without --reward-model rank 0 trains the default reward model while rank 1 waits: when
    that run fails (here its first line of metrics.jsonl finds the disk full), rank 0 stops with
    its line after the run's own, rank 1 with rank 0's prefixed "rank 0: " (before: rank 1 died
    in the barrier it waited in, with gloo's "Connection closed by peer" traceback)."""
    out = tmp_path / "o"
    argv = ["ppo", "--output-dir", out, "--steps", "2", "--batch-size", "6", "--max-new-tokens", "5"] + FAST
    ranks = run_two_ranks(argv, tmp_path, {"RMKERNELS_TRAIN_FAULT": "metrics-write:1:ENOSPC",
                                           "RMKERNELS_TRAIN_FAULT_RANK": "0"})
    line = ("training the default reward model failed (exit status 1); see the messages above, or pass "
            "--reward-model DIR")
    (rc0, err0), (rc1, err1) = ranks
    metrics = out / "reward_model" / "metrics.jsonl"
    assert rc0 == 1 and "Traceback" not in err0, err0[-3000:]
    assert [ln for ln in err0.splitlines() if ": error" in ln] == [
        f"rmkernels-train reward: error: cannot write {metrics} (No space left on device)",
        f"rmkernels-train ppo: error (rank 0): {line}"], err0[-3000:]
    assert rc1 == 1 and "Traceback" not in err1, err1[-3000:]
    assert [ln for ln in err1.splitlines() if ": error" in ln] == [
        f"rmkernels-train ppo: error (rank 1): rank 0: {line}"], err1[-3000:]
