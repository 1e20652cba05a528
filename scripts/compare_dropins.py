"""Compare the other drop-ins with the frameworks' own functions, on random ragged inputs.

The critic-free advantage drop-ins are scripts/compare_frameworks.py's; this script takes the
other functions of rmkernels/integrations/ listed below (not verl_linear_ce, whose counterpart is
verl's Triton kernel) and the rmkernels_train.ppo_core losses that docs/rl.md gives as verl's,
and runs each against the real function of the framework on random inputs: masks
with holes, all-masked rows, length-1 rows, left and right padding, float32 and float64
(bfloat16 where the drop-in takes it), values and gradients. It prints one line per function and
dtype: the number of cases and the largest difference relative to max(|theirs|, 1) (NaN == NaN
and equal infinities count as equal), for the values and the gradients. Where a drop-in
documents another precision (bfloat16 inputs computed in float32) the line also gives each
side's distance to the framework's own code on float64 copies of the inputs ("exact").

- verl 0.9.1 ``core_algos`` (loaded as compare_frameworks.py loads it, heavy imports stubbed):
  ``compute_gae_advantage_return``, ``kl_penalty`` (every name and "+" form),
  ``kl_penalty_forward``, the KL controllers, ``agg_loss`` (5 modes, with dp_size /
  batch_num_tokens / global_batch_size) against ``ppo_core.agg_loss``, ``compute_value_loss``
  against ``ppo_core.ppo_value_loss`` and ``compute_policy_loss_vanilla`` against
  ``ppo_core.ppo_policy_loss`` (dual-clip included);
- OpenRLHF 0.11.2 (as compare_frameworks.py loads it): ``compute_approx_kl``, ``compute_reward``,
  ``get_advantages_and_returns``, and ``normalize_advantages`` end to end through the real
  ``compute_advantages_and_returns`` (estimator ``gae``);
- TRL 1.12.0's PPO trainer file (TRL >= 1.13 has none), from a path given with
  ``--trl-ppo-file`` (skipped otherwise; nothing is downloaded), loaded by compare_trl_ppo.py's
  ``load``: ``masked_whiten`` and ``PPOTrainer.train``'s steps 3-6 executed as they are in the
  file, against ``trl_ppo.masked_whiten`` / ``compute_rewards_and_advantages`` (here on ragged
  batches with empty and length-1 responses, every output, float32 / float64 / bfloat16);
- TRL 1.16 ``trl.RewardTrainer`` against ``integrations.trl.RewardTrainer`` and unpatched
  transformers ``*ForSequenceClassification`` against ``integrations.hf.patch_hf_reward_model``,
  on tiny random models (skipped when trl / datasets / accelerate are not installed).

Not part of the test suite (CI tests the drop-ins against the published formulas and, where TRL
is a test requirement, against TRL). In a scratch environment:

    python -m venv /tmp/fw && . /tmp/fw/bin/activate
    pip install torch==2.13.0 numpy'<2.4' omegaconf transformers datasets accelerate
    pip install --no-deps verl==0.9.1 openrlhf==0.11.2 trl==1.16.0
    pip download --no-deps trl==1.12.0 -d /tmp/trl112 && unzip -q /tmp/trl112/*.whl -d /tmp/trl112/src
    pip install --no-build-isolation -e .      # from the repository root
    python scripts/compare_dropins.py --trl-ppo-file /tmp/trl112/src/trl/experimental/ppo/ppo_trainer.py
"""
import argparse
import contextlib
import copy
import importlib.util
import io
import math
import os
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace as NS
from unittest.mock import MagicMock

import numpy as np
import torch

import rmkernels  # noqa: F401  (fails early when the package is not installed)

DTYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rel(a, b, where=None):
    """max |a - b| / max(|b|, 1) (both NaN, or the same infinity: 0), at ``where`` only if given."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    a, b = torch.broadcast_tensors(a, b)
    if where is not None:
        where = torch.broadcast_to(torch.as_tensor(where, dtype=torch.bool), a.shape)
        a, b = a[where], b[where]
    same = (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & (a == b))
    d = ((a - b).abs() / b.abs().clamp(min=1)).masked_fill(same, 0).nan_to_num(float("inf"))
    return float(d.max()) if d.numel() else 0.0


class Table:
    """Per line: the number of cases and the largest difference of each column."""

    def __init__(self, title):
        self.title, self.rows = title, {}

    def add(self, key, **cols):
        row = self.rows.setdefault(key, {"cases": 0})
        row["cases"] += 1
        for c, v in cols.items():
            row[c] = max(row.get(c, 0.0), v)

    def print(self):
        print(f"\n{self.title}")
        print(f"  {'function':66s} {'cases':>6s} {'values':>9s} {'grads':>9s}")
        for key, row in self.rows.items():
            grads = f"{row['grads']:9.2e}" if "grads" in row else f"{'-':>9s}"
            line = f"  {key:66s} {row['cases']:6d} {row['values']:9.2e} {grads}"
            if "ours_exact" in row:
                line += f"   exact: ours {row['ours_exact']:.2e}, theirs {row['theirs_exact']:.2e}"
            print(line)


def ragged_mask(B, T, g, kind):
    """A 0/1 float mask [B, T]: right padding with holes, right padding, left padding, or holes
    only; row 0 all masked and row 1 of length 1 when B >= 3."""
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    if B >= 3:
        lengths[0], lengths[1] = 0, 1
    ar = torch.arange(T)[None]
    m = ar >= (T - lengths[:, None]) if kind == "left" else ar < lengths[:, None]
    if kind in ("right_holes", "holes_only"):
        holes = torch.rand(B, T, generator=g) < 0.2
        m = (~holes if kind == "holes_only" else m & ~holes)
        if B >= 3:
            m[0] = False
    return m.float()


MASK_KINDS = ("right_holes", "right", "left", "holes_only")


def _size(g, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=g))


def _grads(fn, inputs, weight, *args, **kwargs):
    """fn(*inputs, *args, **kwargs) and the gradients of (output * weight).sum() in float64 w.r.t.
    inputs."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs, *args, **kwargs)
    (out.double() * weight).sum().backward()
    return out, [x.grad for x in xs]


# ---------------------------------------------------------------- verl 0.9.1

def compare_verl(ca, n):
    from rmkernels.integrations import verl as rv
    from rmkernels_train import ppo_core as core

    t = Table("verl 0.9.1 core_algos (values at the valid positions; the drop-ins' masked positions are checked "
              "to be 0)")
    g = torch.Generator().manual_seed(10)
    skipped = 0
    for i in range(n):
        B, T = _size(g, 1, 10), _size(g, 1, 18)
        mask = ragged_mask(B, T, g, MASK_KINDS[i % 4])
        if mask.sum() < 2:  # verl raises there (documented: the drop-in returns zeros)
            skipped += 1
            continue
        valid = mask != 0
        rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1
        last = (mask * torch.arange(1, T + 1)).argmax(-1)
        rewards[torch.arange(B), last] += torch.randn(B, generator=g, dtype=torch.float64) * 2
        values = torch.randn(B, T, generator=g, dtype=torch.float64)
        gamma, lam = (1.0, 0.99, 0.9, 0.0)[i % 4], (0.95, 1.0, 0.0, 0.5)[(i // 4) % 4]
        m = mask.to((torch.float32, torch.int64, torch.float64)[i % 3])
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            r, v = rewards.to(dt), values.to(dt)
            want = ca.compute_gae_advantage_return(r, v, m, gamma, lam)
            got = rv.compute_gae_advantage_return(r, v, m, gamma, lam)
            for x in got:
                assert bool((x[~valid] == 0).all()), "compute_gae_advantage_return: a masked position is not 0"
            d = max(rel(x, y, valid) for x, y in zip(got, want))
            cols = {}
            if dt == torch.bfloat16:  # the drop-in computes in float32 (documented)
                exact = ca.compute_gae_advantage_return(r.double(), v.double(), m.double(), gamma, lam)
                cols = dict(ours_exact=max(rel(x, e, valid) for x, e in zip(got, exact)),
                            theirs_exact=max(rel(x, e, valid) for x, e in zip(want, exact)))
            t.add(f"compute_gae_advantage_return {DTYPE[dt]}", values=d, **cols)

    # kl_penalty / kl_penalty_forward: every name, the "+" forms; same shapes and broadcast ones
    names = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
    shapes = [((4, 7), (4, 7)), ((9,), (9,)), ((), ()), ((2, 3, 5), (2, 3, 5)), ((4, 6), (1, 6)),
              ((4, 1), (1, 6)), ((4, 6), ()), ((2, 3, 4), (3, 1))]
    for i in range(max(1, n // 4)):
        sa, sb = shapes[i % len(shapes)]
        scale = (0.05, 0.5, 3.0, 15.0)[i % 4]
        lp64 = -torch.rand(sa, generator=g, dtype=torch.float64) * 3
        ref64 = lp64.mean() + torch.randn(sb, generator=g, dtype=torch.float64) * scale
        if i % 5 == 0 and lp64.numel() > 2 and ref64.numel() > 2:
            lp64.view(-1)[0] = -math.inf
            ref64.view(-1)[1] = -math.inf
        w = torch.randn(torch.broadcast_shapes(sa, sb), generator=g, dtype=torch.float64)
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            lp, ref = lp64.to(dt), ref64.to(dt)
            finite = torch.isfinite(lp.double() - ref.double())
            for name in names + tuple(k + "+" for k in names):
                for fname in ("kl_penalty", "kl_penalty_forward"):
                    if fname == "kl_penalty_forward" and name.endswith("+"):
                        continue
                    # the "+" forms differ at an infinite log-ratio (documented): their values at the
                    # finite ones only, their gradients where every log-ratio is finite
                    where = finite if name.endswith("+") else None
                    wo, (wl, wr) = _grads(getattr(ca, fname), (lp, ref), w, name)
                    go, (gl, gr) = _grads(getattr(rv, fname), (lp, ref), w, name)
                    assert go.dtype == wo.dtype and go.shape == wo.shape, (fname, name, go.dtype, wo.dtype)
                    cols = {}
                    if dt == torch.bfloat16:
                        exact = getattr(ca, fname)(lp.double(), ref.double(), name)
                        cols = dict(ours_exact=rel(go, exact, finite), theirs_exact=rel(wo, exact, finite))
                    if where is None or bool(finite.all()):
                        cols["grads"] = max(rel(gl, wl), rel(gr, wr))
                    t.add(f"{fname}[{name}] {DTYPE[dt]}", values=rel(go, wo, where), **cols)

    # KL controllers
    rng = np.random.default_rng(0)
    for _ in range(max(1, n // 4)):
        init = float(rng.choice([0.0, 0.01, 0.2, 1.0]))
        target, horizon = float(rng.choice([0.1, 6.0, 1e-3])), float(rng.choice([1.0, 100.0, 10000.0]))
        a, b = ca.AdaptiveKLController(init, target, horizon), rv.AdaptiveKLController(init, target, horizon)
        d = 0.0
        for step in range(20):
            kl = float(rng.standard_normal() * 5)
            kl = torch.tensor(kl) if step % 7 == 3 else kl
            nsteps = int(rng.integers(0, 512))
            a.update(kl, nsteps)
            b.update(kl, nsteps)
            d = max(d, rel(torch.tensor(float(b.value)), torch.tensor(float(a.value))))
        t.add("AdaptiveKLController (20 updates)", values=d)
    for coef in (0.0, 0.1, 0.3):
        f1, f2 = ca.FixedKLController(coef), rv.FixedKLController(coef)
        f1.update(1.0, 3)
        f2.update(1.0, 3)
        t.add("FixedKLController", values=abs(f1.value - f2.value))
    for cfg in (NS(type="fixed", kl_coef=0.1), NS(type="adaptive", kl_coef=0.1, target_kl=6, horizon=1000)):
        c1, c2 = ca.get_kl_controller(cfg), rv.get_kl_controller(cfg)
        assert type(c2).__name__ == type(c1).__name__
        c1.update(3.0, 64)
        c2.update(3.0, 64)
        t.add("get_kl_controller", values=abs(float(c1.value) - float(c2.value)))

    # agg_loss, compute_value_loss, compute_policy_loss_vanilla against ppo_core
    class ActorCfg(dict):  # what compute_policy_loss_vanilla reads of verl's ActorConfig
        __getattr__ = dict.__getitem__

    for i in range(n):
        B, T = _size(g, 1, 8), _size(g, 1, 12)
        mb = ragged_mask(B, T, g, MASK_KINDS[i % 4]).bool()
        if not mb.any():
            mb[-1, 0] = True  # verl gives NaN for a batch with no valid token (the drop-in 0: documented)
        mask = (mb, mb.float(), mb.long())[i % 3]
        for dt in (torch.float32, torch.float64):
            for use_dp in (False, True):
                kw, dp = {}, None
                if use_dp:
                    dp_size = _size(g, 2, 5)
                    tokens = float(mb.sum()) + _size(g, 0, 20)
                    rows = float((mb.sum(-1) > 0).sum()) + _size(g, 0, 4)
                    dp = core.DataParallelAgg(dp_size, tokens, rows)
                    kw = dict(dp_size=dp_size, batch_num_tokens=tokens, global_batch_size=rows)
                horizon = None if i % 2 else T + 3
                if horizon is not None:
                    kw["loss_scale_factor"] = horizon
                sfx = f"{DTYPE[dt]}{' dp' if use_dp else ''}"
                for mode in core.LOSS_AGG_MODES:
                    L = torch.randn(B, T, generator=g, dtype=dt)
                    wo, (wg,) = _grads(ca.agg_loss, (L,), 1.0, mask, mode, **kw)
                    go, (gg,) = _grads(core.agg_loss, (L,), 1.0, mask, mode, horizon=horizon, dp=dp)
                    t.add(f"agg_loss[{mode}] {sfx}", values=rel(go, wo), grads=rel(gg, wg))

                    vp, ret, vold = (torch.randn(B, T, generator=g, dtype=dt) for _ in range(3))
                    c = (0.2, 0.5, 5.0)[i % 3]
                    a, b = vp.clone().requires_grad_(), vp.clone().requires_grad_()
                    wl, wc = ca.compute_value_loss(a, ret, vold, mask, c, loss_agg_mode=mode, **kw)
                    gl, gc = core.ppo_value_loss(b, vold, ret, mask, c, loss_agg=mode, horizon=horizon, dp=dp)
                    wl.backward()
                    gl.backward()
                    t.add(f"compute_value_loss[{mode}] {sfx}",
                          values=max(rel(gl, wl), rel(gc, wc)), grads=rel(b.grad, a.grad))

                    old = -torch.rand(B, T, generator=g, dtype=dt) * 3
                    new = old + torch.randn(B, T, generator=g, dtype=dt) * (0.05, 0.3, 1.0)[i % 3]
                    adv = torch.randn(B, T, generator=g, dtype=dt)
                    low = (0.2, 0.1, 0.28)[i % 3]
                    high = (None, 0.28, 0.2)[(i // 3) % 3]
                    cc = (3.0, 1.5, 10.0)[(i // 2) % 3]
                    cfg = ActorCfg(clip_ratio=low, clip_ratio_low=None, clip_ratio_high=high, clip_ratio_c=cc,
                                   global_batch_info=kw)
                    a, b = new.clone().requires_grad_(), new.clone().requires_grad_()
                    wl, met = ca.compute_policy_loss_vanilla(old, a, adv, mask, loss_agg_mode=mode, config=cfg)
                    gl, gcf, _, gcl = core.ppo_policy_loss(b, old, adv, mask, low, clip_range_high=high,
                                                           loss_agg=mode, horizon=horizon, clip_ratio_c=cc,
                                                           return_clipfrac_lower=True, dp=dp)
                    wl.backward()
                    gl.backward()
                    d = max(rel(gl, wl), rel(gcf, torch.tensor(met["actor/pg_clipfrac"])),
                            rel(gcl, torch.tensor(met["actor/pg_clipfrac_lower"])))
                    t.add(f"compute_policy_loss_vanilla[{mode}] {sfx}", values=d,
                          grads=rel(b.grad, a.grad))
    t.print()
    print(f"  ({skipped} GAE batches with fewer than 2 valid tokens left out: verl raises there, the drop-in gives "
          "zeros. ppo_policy_loss's approx KL is 0.5 (log ratio)^2, verl's ppo_kl the mean of -(log ratio): "
          "another metric, not compared. compute_value_loss: the loss and the clip fraction; "
          "compute_policy_loss_vanilla: the loss, pg_clipfrac and pg_clipfrac_lower, clip_ratio_c 1.5, 3 and 10, "
          "clip-higher; dp: dp_size, batch_num_tokens, global_batch_size)")


# ---------------------------------------------------------------- OpenRLHF 0.11.2

def _reward(kl, r, compute_reward, kl_coef, action_mask, clip):
    return compute_reward(r, kl_coef, kl, action_mask=action_mask, reward_clip_range=clip)


def compare_openrlhf(em, n):
    from rmkernels.integrations import openrlhf as ro

    mu = sys.modules["openrlhf.models.utils"]
    Experience = sys.modules["openrlhf.trainer.ppo_utils.experience"].Experience
    real_gae = em.RemoteExperienceMaker.get_advantages_and_returns
    t = Table("OpenRLHF 0.11.2 (all positions; compute_approx_kl unbiased_gradient: exact = its value without "
              "unbiased_gradient)")
    g = torch.Generator().manual_seed(20)
    shapes = [((4, 7), (4, 7)), ((9,), (9,)), ((), ()), ((2, 3, 5), (2, 3, 5)), ((4, 6), (1, 6)),
              ((4, 1), (1, 6)), ((6,), (4, 6))]
    for i in range(max(1, n // 4)):
        sa, sb = shapes[i % len(shapes)]
        scale = (0.05, 0.5, 3.0, 12.0)[i % 4]
        lp64 = -torch.rand(sa, generator=g, dtype=torch.float64) * 3
        base64 = lp64.mean() + torch.randn(sb, generator=g, dtype=torch.float64) * scale
        old64 = lp64 + torch.randn(sa, generator=g, dtype=torch.float64) * scale / 2
        w = torch.randn(torch.broadcast_shapes(sa, sb), generator=g, dtype=torch.float64)
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            lp, base, old = lp64.to(dt), base64.to(dt), old64.to(dt)
            for est in ("k1", "k2", "k3"):
                for unb, with_old in ((False, False), (True, False), (True, True)):
                    inputs = (lp, base, old) if with_old else (lp, base)
                    wo, wgs = _grads(mu.compute_approx_kl, inputs, w, kl_estimator=est, unbiased_gradient=unb)
                    go, ggs = _grads(ro.compute_approx_kl, inputs, w, kl_estimator=est, unbiased_gradient=unb)
                    assert go.dtype == wo.dtype and go.shape == wo.shape
                    gd = max(rel(x, y) for x, y in zip(ggs, wgs) if y is not None)
                    cols = {}
                    if unb:  # the value is the estimator's, as without unbiased_gradient (OpenRLHF's docstring)
                        plain = mu.compute_approx_kl(lp, base, kl_estimator=est)
                        cols = dict(ours_exact=rel(go, plain), theirs_exact=rel(wo, plain))
                    t.add(f"compute_approx_kl[{est}{', unbiased' if unb else ''}{', old' if with_old else ''}] "
                          f"{DTYPE[dt]}", values=rel(go, wo), grads=gd, **cols)
    for i in range(n):
        B, T = _size(g, 1, 9), _size(g, 1, 15)
        m = ragged_mask(B, T, g, MASK_KINDS[i % 4]).to((torch.bool, torch.float32, torch.int64)[i % 3])
        kl_coef, clip = (0.05, 0.0, -0.1, 1.0)[i % 4], (None, (-1.0, 1.0), (0.0, 0.5))[i % 3]
        w = torch.randn(B, T, generator=g, dtype=torch.float64)
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            kl = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).to(dt)
            r = (torch.randn(B, generator=g, dtype=torch.float64) * 2).to(dt)
            wo, (wk, wr) = _grads(_reward, (kl, r), w, mu.compute_reward, kl_coef, m, clip)
            go, (gk, gr) = _grads(_reward, (kl, r), w, ro.compute_reward, kl_coef, m, clip)
            t.add(f"compute_reward {DTYPE[dt]}", values=rel(go, wo), grads=max(rel(gk, wk), rel(gr, wr)))

        V64 = torch.randn(B, T, generator=g, dtype=torch.float64)
        R64 = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
        gamma, lambd = (1.0, 0.99, 0.9, 0.0)[i % 4], (0.95, 1.0, 0.0, 0.5)[(i // 4) % 4]
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            V, R = V64.to(dt), R64.to(dt)
            want = real_gae(None, V, R, m, gamma, lambd)
            got = ro.get_advantages_and_returns(V, R, m, gamma, lambd)
            cols = {}
            if dt == torch.bfloat16:  # the drop-in computes in float32 (documented)
                exact = real_gae(None, V.double(), R.double(), m, gamma, lambd)
                cols = dict(ours_exact=max(rel(x, e) for x, e in zip(got, exact)),
                            theirs_exact=max(rel(x, e) for x, e in zip(want, exact)))
            t.add(f"get_advantages_and_returns {DTYPE[dt]}", values=max(rel(x, y) for x, y in zip(got, want)),
                  **cols)
        mn = m if i % 5 else None
        want = real_gae(None, V64.float(), R64.float(), mn, gamma, lambd)
        got = ro.get_advantages_and_returns(V64.float(), R64.float(), mn, gamma, lambd)
        t.add("get_advantages_and_returns fp32 action_mask=None" if mn is None else
              "get_advantages_and_returns fp32 (again)", values=max(rel(x, y) for x, y in zip(got, want)))

    # normalize_advantages (and compute_reward, get_advantages_and_returns) end to end: the real
    # compute_advantages_and_returns, estimator gae, experiences of several shapes
    for i in range(n):
        kl_coef, no_std = (0.05, 0.0, 0.2)[i % 3], i % 4 == 3
        gamma, lambd = (1.0, 0.99)[i % 2], (0.95, 1.0)[i % 2]
        exps, mine, idx = [], [], 0
        for _ in range(_size(g, 1, 4)):
            B, T = _size(g, 1, 5), _size(g, 1, 12)
            mb = ragged_mask(B, T, g, MASK_KINDS[_size(g, 0, 4)]).bool()
            if not mb.any():
                mb[0, 0] = True
            rew, kl = torch.randn(B, generator=g), torch.randn(B, T, generator=g) * 0.1
            vals = torch.randn(B, T, generator=g)
            exps.append(Experience(index=list(range(idx, idx + B)), rewards=rew.clone(), action_mask=mb.clone(),
                                   kl=kl.clone(), values=vals.clone(), info={}))
            mine.append((rew, kl, vals, mb))
            idx += B
        maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
        maker.advantage_estimator = "gae"
        maker.kl_ctl = NS(value=kl_coef)
        args = NS(rollout=NS(n_samples_per_prompt=1), reward=NS(clip_range=None),
                  algo=NS(advantage=NS(estimator="gae", gamma=gamma, lambd=lambd, no_std_norm=no_std)))
        maker.strategy, maker.args = NS(args=args), args
        exact = maker.compute_advantages_and_returns(
            [Experience(index=e.index, rewards=e.rewards.double(), action_mask=e.action_mask, kl=e.kl.double(),
                        values=e.values.double(), info={}) for e in exps])
        out = maker.compute_advantages_and_returns(exps)
        advs, rets, masks = [], [], []
        for rew, kl, vals, mb in mine:
            a, r = ro.get_advantages_and_returns(vals, ro.compute_reward(rew, kl_coef, kl, action_mask=mb), mb,
                                                 gamma, lambd)
            advs.append(a)
            rets.append(r)
            masks.append(mb)
        for eps in (1e-8, 0.0):
            normed = ro.normalize_advantages(advs, masks, no_advantage_std_norm=no_std, eps=eps)
            d, de, dt_ = 0.0, 0.0, 0.0
            for e, x, a, r, mb in zip(out, exact, normed, rets, masks):
                assert bool((a[~mb] == 0).all()), "normalize_advantages: a masked position is not 0"
                d = max(d, rel(a, e.advantages, mb), rel(r, e.returns))
                de = max(de, rel(a, x.advantages, mb), rel(r, x.returns))
                dt_ = max(dt_, rel(e.advantages, x.advantages, mb), rel(e.returns, x.returns))
            if no_std and eps == 0.0:
                continue
            t.add(f"normalize_advantages (end to end{', no_std_norm' if no_std else ''}{', eps=0' if eps == 0 else ''})"
                  " fp32", values=d, ours_exact=de, theirs_exact=dt_)
    t.print()
    print("  (compute_approx_kl with unbiased_gradient: OpenRLHF returns value.detach() + g - g.detach(), which "
          "rounds the value in float32 where g = w (log ratio)^2 / 2 is large; the drop-in returns the value itself "
          "(its straight-through op); the drop-in's docstring names the infinite case (inf - inf there), not this "
          "rounding)")
    print("  (normalize_advantages end to end: the real compute_advantages_and_returns, estimator gae, on 1-3 "
          "experiences of several shapes, against compute_reward -> get_advantages_and_returns -> "
          "normalize_advantages; advantages at the valid positions (the drop-in's masked ones are checked to be 0), "
          "returns everywhere; exact: OpenRLHF on float64 copies. The drop-in divides by sqrt(var + eps), eps 1e-8 "
          "by default, where OpenRLHF clamps var at 1e-8 (documented: a relative difference of 5e-9 / var); the "
          "eps=0 line is the same comparison without it)")
    for name in ("ray", "deepspeed"):  # load_openrlhf's stubs: accelerate (the RewardTrainer's) looks for them
        if isinstance(sys.modules.get(name), MagicMock):
            sys.modules.pop(name, None)


# ---------------------------------------------------------------- TRL 1.12.0's PPO trainer file

def compare_trl_ppo(load, path, n):
    from rmkernels.integrations import trl_ppo

    ns, block = load(path)

    def trl_block(lp, ref, values, scores, seq, est, kl_coef, whiten, gamma, lam):
        args = NS(kl_estimator=est, kl_coef=kl_coef, whiten_rewards=whiten, gamma=gamma, lam=lam)
        env = dict(ns, responses=torch.zeros(lp.shape), sequence_lengths=seq.clone(), logprobs=lp.clone(),
                   ref_logprobs=ref.clone(), values=values.clone(), scores=scores.clone(), args=args,
                   INVALID_LOGPROB=trl_ppo.INVALID_LOGPROB, empty_cache=lambda: None)
        with torch.no_grad():
            exec(block, env)
        return env

    t = Table("TRL 1.12.0 ppo_trainer.py (masked_whiten; PPOTrainer.train's steps 3-6, as compare_trl_ppo.py loads "
              "them)")
    g = torch.Generator().manual_seed(30)
    for i in range(n):
        B, T = _size(g, 1, 8), _size(g, 1, 15)
        m = torch.rand(B, T, generator=g) < (0.3, 0.7, 0.95)[i % 3]
        if m.sum() < 2:  # TRL's unbiased variance divides by zero (documented: the drop-in gives zeros)
            continue
        mask = (m, m.float(), m.long())[i % 3]
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            x = (torch.randn(B, T, generator=g, dtype=torch.float64) * 3 + 1).to(dt)
            for shift in (True, False):
                want = ns["masked_whiten"](x, mask, shift)
                got = trl_ppo.masked_whiten(x, mask, shift)
                assert bool((got[~m] == 0).all()), "masked_whiten: a masked position is not 0"
                cols = {}
                if dt == torch.bfloat16:  # the drop-in computes in float32 (documented)
                    exact = ns["masked_whiten"](x.double(), mask, shift)
                    cols = dict(ours_exact=rel(got, exact, m), theirs_exact=rel(want, exact, m))
                t.add(f"masked_whiten[shift_mean={shift}] {DTYPE[dt]} (valid positions)", values=rel(got, want, m),
                      **cols)
    fields = ("advantages", "returns", "rewards", "kl", "non_score_reward", "logprobs", "ref_logprobs", "values")
    for i in range(n):
        B, T = _size(g, 1, 8), _size(g, 1, 15)
        seq = torch.randint(-1, T, (B,), generator=g)
        if B >= 3:
            seq[0], seq[1], seq[2] = -1, 0, T - 1  # empty, length 1, full
        if int((seq + 1).clamp(min=0).sum()) < 2:
            continue
        lp64 = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
        ref64 = lp64 + torch.randn(B, T, generator=g, dtype=torch.float64) * (0.1, 0.5, 2.0)[i % 3]
        v64, s64 = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
        kl_coef, gamma, lam = (0.05, 0.2, 0.0)[i % 3], (1.0, 0.99, 0.9)[i % 3], (0.95, 1.0, 0.0)[(i // 3) % 3]
        for est in ("k1", "k3"):
            for whiten in (False, True):
                for dt in (torch.float32, torch.float64, torch.bfloat16):
                    lp, ref, v, s = (x.to(dt) for x in (lp64, ref64, v64, s64))
                    exact = trl_block(*(x.double() for x in (lp, ref, v, s)), seq, est, kl_coef, whiten, gamma, lam)
                    env = trl_block(lp, ref, v, s, seq, est, kl_coef, whiten, gamma, lam)
                    out = trl_ppo.compute_rewards_and_advantages(lp, ref, v, s, seq, kl_coef=kl_coef, kl_estimator=est,
                                                                 gamma=gamma, lam=lam, whiten_rewards=whiten)
                    for f in ("padding_mask", "padding_mask_p1"):
                        assert torch.equal(getattr(out, f), env[f]), f
                    cols = {}
                    if dt != torch.float64:
                        cols = dict(ours_exact=max(rel(getattr(out, f), exact[f]) for f in fields),
                                    theirs_exact=max(rel(env[f], exact[f]) for f in fields))
                    t.add(f"compute_rewards_and_advantages[{est}{', whiten_rewards' if whiten else ''}] {DTYPE[dt]}",
                          values=max(rel(getattr(out, f), env[f]) for f in fields), **cols)
    t.print()
    print("  (compute_rewards_and_advantages: every output of steps 3-6 (advantages, returns, rewards, kl, "
          "non_score_reward, logprobs, ref_logprobs, values) at every position; padding masks equal)")


# ---------------------------------------------------------------- TRL 1.16 RewardTrainer, transformers

def compare_reward_trainer(quick):
    import datasets
    import transformers
    import trl

    from rmkernels.integrations.trl import RewardTrainer
    from rmkernels_train.tokenizer import build_char_tokenizer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    def model_for(kind, tok):
        kw = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=1)
        if kind == "llama":
            cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                           **kw)
        else:
            cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **kw)
        torch.manual_seed(0)
        return transformers.AutoModelForSequenceClassification.from_config(cfg)

    def dataset(n, margin, seed):
        g = torch.Generator().manual_seed(seed)
        rows = []
        for i in range(n):
            a = "".join(str(int(d)) for d in torch.randint(0, 10, (_size(g, 1, 12),), generator=g))
            row = {"prompt": f"sort {a}: ", "chosen": "".join(sorted(a)),
                   "rejected": a[::-1] + str(i % 10) * _size(g, 0, 4)}
            if margin:
                row["margin"] = float(torch.rand(1, generator=g)) * 2 - 0.5
            rows.append(row)
        return datasets.Dataset.from_list(rows)

    def loss_grads(tr, b):
        tr.model.train()
        tr.model.zero_grad(set_to_none=True)
        loss = tr.compute_loss(tr.model, dict(b))
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in tr.model.named_parameters() if p.grad is not None}

    t = Table(f"TRL {trl.__version__} RewardTrainer (tiny random models, 3 SGD steps; transformers "
              f"{transformers.__version__})")
    tok = build_char_tokenizer("0123456789 sort:")
    tok_eos = build_char_tokenizer("0123456789 sort:")
    tok_eos.pad_token = tok_eos.eos_token
    cases = [("llama", "pad", tok, False, None), ("llama", "pad", tok, True, 0.01),
             ("llama", "pad=eos", tok_eos, True, None), ("gpt2", "pad", tok, False, 0.01),
             ("gpt2", "pad=eos", tok_eos, True, None)]
    if quick:
        cases = cases[:2]
    with tempfile.TemporaryDirectory() as d:
        for kind, tk_name, tk, margin, coef in cases:
            ds = dataset(16, margin, seed=len(kind))
            model = model_for(kind, tk)
            cfg = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=3, learning_rate=0.05,
                       optim="sgd", report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
                       dataloader_num_workers=0, seed=0, bf16=False, center_rewards_coefficient=coef)
            ref = trl.RewardTrainer(model=copy.deepcopy(model), args=trl.RewardConfig(output_dir=d + "/a", **cfg),
                                    train_dataset=ds, eval_dataset=ds, processing_class=tk)
            ours = RewardTrainer(model=copy.deepcopy(model), args=trl.RewardConfig(output_dir=d + "/b", **cfg),
                                 train_dataset=ds, eval_dataset=ds, processing_class=tk)
            key = f"RewardTrainer {kind} {tk_name}{' margin' if margin else ''}{f' center {coef}' if coef else ''} fp32"
            vd, gd = 0.0, 0.0
            for b, _ in zip(ref.get_train_dataloader(), range(2)):
                la, ga = loss_grads(ref, b)
                lb, gb = loss_grads(ours, b)
                assert set(ga) == set(gb)
                vd, gd = max(vd, rel(lb, la)), max(gd, max(rel(gb[k], ga[k]) for k in ga))
            for k in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens"):
                vd = max(vd, rel(torch.tensor(ours._metrics["train"][k], dtype=torch.float64),
                                 torch.tensor(ref._metrics["train"][k], dtype=torch.float64)))
            ref._metrics["train"].clear()
            ours._metrics["train"].clear()
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the trainers' log lines
                warnings.simplefilter("ignore")
                ea, eb = ref.evaluate(), ours.evaluate()
                for k in ea:
                    if not k.endswith(("runtime", "per_second", "preparation_time")):
                        vd = max(vd, rel(torch.tensor(eb[k]), torch.tensor(ea[k])))
                ref.train()
                ours.train()
            la = [h["loss"] for h in ref.state.log_history if "loss" in h]
            lb = [h["loss"] for h in ours.state.log_history if "loss" in h]
            vd = max(vd, rel(torch.tensor(lb), torch.tensor(la)))
            gd = max(gd, max(rel(q, p) for p, q in zip(ref.model.parameters(), ours.model.parameters())))
            t.add(key, values=vd, grads=gd)
    t.print()
    print("  (values: compute_loss on 2 batches, the logged metrics, evaluate(), the 3 logged train losses; grads: "
          "compute_loss's gradients and the weights after 3 SGD steps)")


def compare_hf(quick):
    import transformers

    from rmkernels.integrations import hf as rhf

    transformers.logging.set_verbosity_error()
    V, PAD = 50, 0

    def configs(num_labels, problem):
        kw = dict(vocab_size=V, pad_token_id=PAD, num_labels=num_labels, problem_type=problem)
        small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
        yield "llama", transformers.LlamaConfig(num_key_value_heads=2, max_position_embeddings=64, **small, **kw)
        yield "qwen2", transformers.Qwen2Config(num_key_value_heads=2, max_position_embeddings=64, **small, **kw)
        yield "gpt2", transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **kw)
        if not quick:
            yield "gpt_neox", transformers.GPTNeoXConfig(max_position_embeddings=64, **small, **kw)
            yield "opt", transformers.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=64, word_embed_proj_dim=32, **kw)
            yield "bloom", transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **kw)

    def batch(g, B, T, kind):
        ids = torch.randint(1, V, (B, T), generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        ar = torch.arange(T)[None]
        am = ar >= (T - lengths[:, None]) if kind == "left" else ar < lengths[:, None]
        if kind == "right":
            am[1] = True  # a full row
        ids = ids.masked_fill(~am, PAD)
        if kind == "allpad":
            ids[0], am[0] = PAD, False
        return ids, am.long()

    t = Table(f"transformers {transformers.__version__} *ForSequenceClassification, unpatched (tiny random models)")
    g = torch.Generator().manual_seed(40)
    for num_labels, problem in ((1, "regression"), (3, "single_label_classification"),
                                (3, "multi_label_classification"), (1, None)):
        for name, cfg in configs(num_labels, problem):
            torch.manual_seed(0)
            cls = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
            for dt in (torch.float32, torch.bfloat16):
                base = copy.deepcopy(cls).to(dt)
                ours = rhf.patch_hf_reward_model(copy.deepcopy(base))
                for kind in ("right", "left", "allpad"):
                    B = 5
                    ids, am = batch(g, B, 9, kind)
                    if num_labels == 1:
                        labels = torch.randn(B, generator=g)
                    elif problem == "single_label_classification":
                        labels = torch.randint(0, num_labels, (B,), generator=g)
                    else:
                        labels = (torch.rand(B, num_labels, generator=g) > 0.5).float()
                    res = []
                    for mdl in (base, ours):
                        mdl.zero_grad(set_to_none=True)
                        out = mdl(input_ids=ids, attention_mask=am, labels=labels)
                        (out.loss.float() + (out.logits.float() * 0.37).sum()).backward()
                        grads = {k: p.grad.clone() for k, p in mdl.named_parameters() if p.grad is not None}
                        tup = mdl(input_ids=ids, attention_mask=am, return_dict=False)
                        res.append((out, grads, tup))
                    (bo, bg, bt), (oo, og, ot) = res
                    assert set(og) == set(bg) and oo.logits.dtype == bo.logits.dtype and len(ot) == len(bt)
                    t.add(f"patch_hf_reward_model {name} {problem or 'labels=1 default'} {DTYPE[dt]}",
                          values=max(rel(oo.logits, bo.logits), rel(oo.loss, bo.loss), rel(ot[0], bt[0])),
                          grads=max(rel(og[k], bg[k]) for k in bg))
                rhf.unpatch_hf_reward_model(ours)
    t.print()
    print("  (values: logits, loss and return_dict=False logits; right / left padding and a row of pad tokens; "
          "grads: every parameter's)")


# ---------------------------------------------------------------- main

def _have(*names):
    return [n for n in names if importlib.util.find_spec(n) is None]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=200, help="random batches per function (default 200)")
    p.add_argument("--trl-ppo-file", default=None,
                   help="TRL 1.12.0's trl/experimental/ppo/ppo_trainer.py (from its wheel); without it the TRL PPO "
                        "comparison is skipped")
    p.add_argument("--quick", action="store_true", help="fewer models in the RewardTrainer / HF comparisons")
    a = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compare_frameworks as cf  # the frameworks' loaders, shared with compare_frameworks.py
    import compare_trl_ppo as cp  # and TRL 1.12.0's PPO code, shared with compare_trl_ppo.py

    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    print(f"torch {torch.__version__}, {a.cases} random cases per function; largest |ours - theirs| / "
          "max(|theirs|, 1)")
    compare_verl(cf.load_verl(), a.cases)
    compare_openrlhf(cf.load_openrlhf(), a.cases)
    if a.trl_ppo_file:
        compare_trl_ppo(cp.load, a.trl_ppo_file, a.cases)
    else:
        print("\nTRL 1.12.0 ppo_trainer.py: skipped (no --trl-ppo-file)")
    missing = _have("trl", "datasets", "accelerate", "transformers")
    if missing:
        print(f"\nTRL RewardTrainer: skipped ({', '.join(missing)} not installed)")
    else:
        compare_reward_trainer(a.quick)
    if _have("transformers"):
        print("\npatch_hf_reward_model: skipped (transformers not installed)")
    else:
        compare_hf(a.quick)
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
