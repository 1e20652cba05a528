"""Whitening across data-parallel ranks (docs/ops.md): with ``process_group`` every rank
whitens with the statistics of the whole batch, so two processes holding half the rows
each get exactly what one process gets on the full batch.

Two processes on the gloo backend (localhost, a free port), spawned with
torch.multiprocessing; each writes its result to a file that the test compares with the
single-process result.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from utils import assert_close

import rmkernels as rmk

WORLD = 2


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_batch(seed, B=10, T=37):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    scores = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7  # holes
    mask[1] = False  # an empty row
    mask[6, :20] = False  # left padding
    x = 5 + 3 * torch.randn(B, T, generator=g)
    return lp, ref, values, scores, mask, x


KW = dict(kl_coef=0.05, gamma=0.99, lam=0.9, kl_estimator="k3")


def _rows(rank, B):
    half = B // WORLD
    return slice(rank * half, (rank + 1) * half if rank < WORLD - 1 else B)


CONFIGS = [(be, unbiased, shift_mean) for be in ("reference", "cpu") for unbiased, shift_mean in
           ((True, True), (False, False))]


def _worker(rank, port, seed, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        lp, ref, values, scores, mask, x = _make_batch(seed)
        s = _rows(rank, lp.shape[0])
        results = {}
        for backend, unbiased, shift_mean in CONFIGS:
            out = rmk.ppo_advantages(lp[s], ref[s], values[s], scores[s], mask[s], unbiased=unbiased,
                                     shift_mean=shift_mean, process_group=dist.group.WORLD, backend=backend, **KW)
            w = rmk.masked_whiten(x[s], mask[s], unbiased=unbiased, shift_mean=shift_mean,
                                  process_group=dist.group.WORLD, backend=backend)
            results[(backend, unbiased, shift_mean)] = {"ppo": tuple(out), "whiten": w}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_whitening_across_two_ranks(tmp_path):
    """One spawn of 2 gloo processes runs every configuration (spawning is the slow part)."""
    if not rmk._ext.CPP_AVAILABLE:
        pytest.fail("the C++ extension is not built")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    mp.spawn(_worker, args=(_free_port(), seed, str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(os.path.join(tmp_path, f"rank{rank}.pt")) for rank in range(WORLD)]
    lp, ref, values, scores, mask, x = _make_batch(seed)
    for backend, unbiased, shift_mean in CONFIGS:
        what = f"{backend}, unbiased={unbiased}, shift_mean={shift_mean}"
        full = rmk.ppo_advantages(lp, ref, values, scores, mask, unbiased=unbiased, shift_mean=shift_mean,
                                  backend=backend, **KW)
        full_w = rmk.masked_whiten(x, mask, unbiased=unbiased, shift_mean=shift_mean, backend=backend)
        # Without the all-reduce each rank would whiten with its own statistics: make sure
        # the data tells the difference.
        s0 = _rows(0, x.shape[0])
        local = rmk.masked_whiten(x[s0], mask[s0], unbiased=unbiased, shift_mean=shift_mean, backend=backend)
        assert not torch.allclose(local, full_w[s0], atol=1e-3)
        for rank in range(WORLD):
            res = got[rank][(backend, unbiased, shift_mean)]
            s = _rows(rank, x.shape[0])
            for name, a, e in zip(rmk.PPOAdvantages._fields, res["ppo"], full):
                assert_close(a, e[s], rtol=1e-6, atol=1e-6, name=f"rank {rank} {name} ({what})")
            assert_close(res["whiten"], full_w[s], rtol=1e-6, atol=1e-6, name=f"rank {rank} masked_whiten ({what})")


def _agg_worker(rank, port, seed, out_dir):
    """Each rank: its share of a minibatch (the first rank's responses shorter), a linear layer
    under DDP, the loss of each --loss-agg mode with ppo_core.data_parallel_agg's counts; saves
    the counts and the gradient DDP leaves (the average over the ranks)."""
    from rmkernels_train import ppo_core as core
    from rmkernels_train.utils import Dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, mask, w0 = _agg_batch(seed)
        s = _rows(rank, x.shape[0])
        layer = torch.nn.Linear(x.shape[-1], 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(w0)
        ddp = torch.nn.parallel.DistributedDataParallel(layer)
        agg = core.data_parallel_agg(mask[s], Dist(rank, WORLD))
        results = {"counts": (agg.dp_size, agg.batch_num_tokens, agg.global_batch_size)}
        for mode in core.LOSS_AGG_MODES:
            layer.zero_grad()
            loss = core.agg_loss(ddp(x[s]).squeeze(-1), mask[s], mode, horizon=7, dp=agg)
            loss.backward()
            results[mode] = layer.weight.grad.clone()
        torch.save(results, os.path.join(out_dir, f"agg{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _agg_batch(seed, B=9, T=11, D=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[: B // WORLD, T // 3:] = False  # rank 0's responses are shorter
    mask[B - 1] = False  # a response with no valid token
    return x, mask, torch.randn(1, D, generator=g, dtype=torch.float64)


def test_loss_agg_under_ddp_is_the_whole_minibatchs(tmp_path):
    """Under torchrun (``--advantage gae``) each rank's --loss-agg loss takes the whole minibatch's
    counts (``ppo_core.data_parallel_agg``, an all-reduce): the gradient DDP averages over two
    gloo ranks with unequal response lengths equals one process's gradient of the whole
    minibatch's loss, in every mode."""
    from rmkernels_train import ppo_core as core

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    mp.spawn(_agg_worker, args=(_free_port(), seed, str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(os.path.join(tmp_path, f"agg{rank}.pt")) for rank in range(WORLD)]
    x, mask, w0 = _agg_batch(seed)
    m = mask.double()
    assert got[0]["counts"] == got[1]["counts"] == (WORLD, m.sum().item(), (m.sum(-1) > 0).sum().item())
    for mode in core.LOSS_AGG_MODES:
        w = w0.clone().requires_grad_()
        core.agg_loss((x @ w.T).squeeze(-1), mask, mode, horizon=7).backward()
        for rank in range(WORLD):
            assert_close(got[rank][mode], w.grad, rtol=1e-10, atol=1e-12, name=f"rank {rank} {mode}")


# ---------------------------------------------------------------------------------------
# The critic-free step under torchrun (rmkernels-train ppo --advantage grpo|rloo|...)
# ---------------------------------------------------------------------------------------
RL_PROMPTS = ["sort 312: ", "sort 907: ", "sort 551: ", "sort 846: "]  # one length: no left padding
RL_STEP = dict(num_generations=3, kl_coef=0.3, max_new_tokens=6, temperature=1.0, max_grad_norm=1e9,
               reward="model", check=False)
# (estimator, options): every loss aggregation, the KL as a loss and in the reward, the entropy
# bonus, dual-clip, two epochs (the second update clips against the rollout's log-probs)
RL_CONFIGS = [("grpo", dict(kl_mode="loss", kl_estimator="k3", loss_agg="token-mean", entropy_coef=0.01,
                            ppo_epochs=2)),
              ("rloo", dict(kl_mode="loss", kl_estimator="k1", loss_agg="token-sum", clip_ratio_c=3.0,
                            ppo_epochs=2)),
              ("reinforce_pp", dict(kl_mode="reward", kl_estimator="k3", loss_agg="seq-mean-token-mean")),
              ("remax", dict(kl_mode="loss", kl_estimator="k2", loss_agg="seq-mean-token-sum-norm"))]
# the metrics that are means over the responses (or the whole batch's loss): the same over 2 ranks
RL_SAME = ("score", "reward", "kl", "ended", "response_length", "loss", "pg_loss", "grad_norm")


def _rl_tokenizer():
    from rmkernels_train.data import SORT_ALPHABET
    from rmkernels_train.tokenizer import build_char_tokenizer

    return build_char_tokenizer(SORT_ALPHABET)


def _fake_sample(policy, prompt_ids, tokenizer, *, max_new_tokens, temperature=1.0, greedy=False):
    """A stand-in for grpo.sample: the k-th response to a prompt in a call is a fixed function of
    (prompt, k, greedy), whatever else the batch holds, so two ranks holding half the prompts
    each sample exactly the rows one process samples; about a third end without an EOS."""
    from rmkernels_train.ppo_core import Rollout

    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    seen, rows, masks = {}, [], []
    for p in prompt_ids:
        k = seen[tuple(p)] = seen.get(tuple(p), -1) + 1
        key = sum(t * 131 ** i for i, t in enumerate(p)) % (2 ** 31) + 7 * k + (100_003 if greedy else 0)
        g = torch.Generator().manual_seed(key)
        resp = torch.tensor(digits)[torch.randint(0, 10, (max_new_tokens,), generator=g)]
        end = int(torch.randint(1, max_new_tokens + 4, (), generator=g))  # past the end: no EOS
        m = torch.ones(max_new_tokens, dtype=torch.long)
        if end <= max_new_tokens:
            resp[end - 1] = tokenizer.eos_token_id
            resp[end:] = tokenizer.pad_token_id
            m[end:] = 0
        rows.append(torch.cat([torch.tensor(p), resp]))
        masks.append(m)
    seq, mask = torch.stack(rows), torch.stack(masks)
    P = len(prompt_ids[0])
    return Rollout(seq, torch.cat([torch.ones(len(rows), P, dtype=torch.long), mask], 1), mask, P)


def _fake_rm_scores(model, roll, tokenizer, backend=None):
    resp = roll.sequences[:, roll.prompt_len:].float() * roll.response_mask
    return (resp * torch.arange(1, resp.shape[1] + 1)).sum(1) % 7 - 3.0


def _rl_run(estimator, opts, prompts, dist_=None):
    """One grpo.rl_step of a fixed policy (SGD: the update is the gradient itself) on ``prompts``;
    returns (metrics, parameters after)."""
    from rmkernels_train import grpo, sft

    tok = _rl_tokenizer()
    torch.manual_seed(0)
    policy = sft.build_policy(tok, layers=1, hidden=16)
    ref = sft.build_policy(tok, layers=1, hidden=16)
    ref.load_state_dict(policy.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.requires_grad_(False)
    ids = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    rec = grpo.rl_step(policy, ref, None, opt, tok, prompts, ids, estimator=estimator, dist=dist_,
                       generator=torch.Generator().manual_seed(1), **RL_STEP, **opts)
    return rec, {k: v.detach().clone() for k, v in policy.state_dict().items()}


def _rl_worker(rank, port, out_dir):
    from rmkernels_train import grpo
    from rmkernels_train.utils import Dist, TrainingError

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    grpo.sample, grpo.rm_scores = _fake_sample, _fake_rm_scores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        half = len(RL_PROMPTS) // WORLD
        mine = RL_PROMPTS[rank * half:(rank + 1) * half]
        out = {est: _rl_run(est, opts, mine, Dist(rank, WORLD)) for est, opts in RL_CONFIGS}
        # A loss that is not finite on rank 1 only: both ranks stop with the error, none is left
        # in the gradients' all-reduce (gloo would fail it with "Connection closed by peer").
        if rank == 1:
            policy_loss = grpo.core.ppo_policy_loss
            grpo.core.ppo_policy_loss = lambda *a, **k: (lambda o: (o[0] * float("nan"), *o[1:]))(policy_loss(*a, **k))
        try:
            _rl_run(*RL_CONFIGS[0], mine, Dist(rank, WORLD))
            out["nan_stop"] = None
        except TrainingError as e:
            out["nan_stop"] = str(e)
        torch.save(out, os.path.join(out_dir, f"rl{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_critic_free_step_on_two_ranks_is_the_whole_batchs(tmp_path, monkeypatch):
    """rmkernels-train ppo's critic-free step under torchrun: two gloo ranks, each with half the
    prompts (all their responses), make the update one process makes on the whole batch -- the
    parameters after it, on both ranks, and the step's metrics -- for every estimator family
    (group: grpo, rloo; token: reinforce_pp whitened over both ranks, remax), every loss
    aggregation, both KL modes, the entropy bonus, dual-clip and two epochs. The no-EOS floor is
    the whole batch's lowest reward. Without the ranks' exchange (each rank on its own half)
    the parameters differ. A loss that is not finite on one rank stops both."""
    from rmkernels_train import grpo

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_rl_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(os.path.join(tmp_path, f"rl{rank}.pt")) for rank in range(WORLD)]
    for rank in range(WORLD):  # rank 1's loss alone was not finite: both stopped
        assert "the RL loss is not finite" in (got[rank].pop("nan_stop") or ""), rank
    monkeypatch.setattr(grpo, "sample", _fake_sample)
    monkeypatch.setattr(grpo, "rm_scores", _fake_rm_scores)
    for est, opts in RL_CONFIGS:
        rec, params = _rl_run(est, opts, RL_PROMPTS)
        _, alone = _rl_run(est, opts, RL_PROMPTS[:len(RL_PROMPTS) // WORLD])
        assert rec["ended"] < 1.0, "some responses must end without an EOS (the floor)"
        assert any(not torch.allclose(alone[k], params[k], rtol=1e-4, atol=1e-3) for k in params), est
        for rank in range(WORLD):
            r_rec, r_params = got[rank][est]
            for k in RL_SAME:
                assert r_rec[k] == pytest.approx(rec[k], rel=1e-4, abs=1e-5), (est, rank, k, r_rec[k], rec[k])
            assert r_rec["updates"] == rec["updates"]
            for k in params:
                # float32 sums in another order, through an update of lr 0.5 and a second epoch
                assert_close(r_params[k], params[k], rtol=1e-4, atol=1e-5, name=f"{est} rank {rank} {k}")
