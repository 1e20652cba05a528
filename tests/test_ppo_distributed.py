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
