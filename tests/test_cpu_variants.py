"""The C++ CPU loop kernels are compiled once per x86-64 level (baseline, AVX2, AVX-512) and
picked at run time (csrc/include/rmkernels/cpu_simd.h). Every variant this machine can run
must give the same numbers: bitwise for the element-wise results, to the last float64 bits of
a sum for the whitening statistics. Each variant runs in its own process
(RMKERNELS_CPU_ISA is read once per process)."""
import os
import subprocess
import sys

import pytest
import torch
from utils import assert_close, skip_unless_available, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a child process: fixed inputs through the cpu backend, results saved to argv[1].
_CHILD = r"""
import sys
import torch
import rmkernels as rmk
from rmkernels import _ext

g = torch.Generator().manual_seed(int(sys.argv[2]))
out = {"isa": _ext.CPU_ISA}
# Bradley-Terry: 2 blocks + a tail, d over the whole range, strided and bf16 inputs.
B = 2 * 1024 + 77
c = (torch.randn(B, generator=g) * 30).requires_grad_()
r = (torch.randn(B, generator=g) * 30).requires_grad_()
m, w = torch.rand(B, generator=g), torch.rand(B, generator=g) + 0.1
for red in ("none", "mean"):
    loss = rmk.bradley_terry_loss(c, r, margin=m, weights=w, label_smoothing=0.1, center_coef=0.01,
                                  reduction=red, backend="cpu")
    gc, gr = torch.autograd.grad(loss.sum(), (c, r))
    out[f"bt_{red}"], out[f"bt_{red}_gc"], out[f"bt_{red}_gr"] = loss.detach(), gc, gr
cs = torch.randn(B, 2, generator=g)[:, 0].bfloat16()
out["bt_strided_bf16"] = rmk.bradley_terry_loss(cs, cs.flip(0), reduction="none", backend="cpu")
# PPO: ragged masks with holes, every KL estimator, with and without whitening.
Bp, T = 13, 301
lp, ref, v = (torch.randn(Bp, T, generator=g) for _ in range(3))
mask = torch.rand(Bp, T, generator=g) > 0.2
mask[3] = False
scores = torch.randn(Bp, generator=g)
for est in ("k1", "abs", "k2", "k3", "low_var_kl"):
    for whiten in (False, True):
        res = rmk.ppo_advantages(lp * 3, ref, v, scores, mask, kl_coef=0.1, gamma=0.99, lam=0.95,
                                 kl_estimator=est, whiten=whiten, backend="cpu")
        for name, t in res._asdict().items():
            out[f"ppo_{est}_{whiten}_{name}"] = t
out["whiten"] = rmk.masked_whiten(v.t(), mask.t(), backend="cpu")  # strided rows
# Group advantages: a [B, T] output over the streaming-store threshold (base: plain stores, v3:
# 32-byte, v4: 64-byte streaming stores), ids in runs; a strided mask (written in place).
Bg = 4099
ids = torch.randint(0, Bg // 4, (Bg,), generator=g).sort().values
gs = torch.randn(Bg, generator=g)
gm = torch.rand(Bg, 517, generator=g) > 0.3
for est in ("grpo", "dr_grpo", "rloo", "opo", "gpg"):
    out[f"group_{est}_seq"], out[f"group_{est}_adv"] = rmk.group_advantages(gs, ids, gm, estimator=est, backend="cpu")
    out[f"group_{est}_strided"] = rmk.group_advantages(gs[:97], ids[:97] % 97, gm[:97, ::3], estimator=est,
                                                       backend="cpu").advantages
# Token log-probs: the loops of the online log-sum-exp and of the logit gradients, with a bias
# holding -inf entries (a whole small-chunk's worth too), temperature, ignored targets, entropy.
N, H, V = 203, 24, 517
h = torch.randn(N, H, generator=g).requires_grad_()
wv = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
bias = torch.randn(V, generator=g)
bias[torch.randint(0, V, (40,), generator=g)] = float("-inf")
bias[128:192] = float("-inf")
tg = torch.randint(0, V, (N,), generator=g)
tg[::17] = -100
lp, ent = rmk.token_logprobs(h, wv, tg, bias=bias, temperature=0.7, return_entropy=True, backend="cpu")
gh, gw = torch.autograd.grad((lp * 0.3 + ent).sum(), (h, wv))
out["lp_logprobs"], out["lp_entropy"], out["lp_grad_hidden"], out["lp_grad_weight"] = lp.detach(), ent.detach(), gh, gw
torch.save(out, sys.argv[1])
"""

VARIANTS = ["base", "v3", "v4"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    skip_unless_available("cpu", "cpu")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    got = {}
    for isa in VARIANTS:
        path = tmp_path_factory.mktemp(isa) / "out.pt"
        env = subprocess_env(RMKERNELS_CPU_ISA=isa)
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(seed)], capture_output=True, text=True,
                              env=env, cwd=ROOT)
        assert proc.returncode == 0, f"RMKERNELS_CPU_ISA={isa} (seed {seed}):\n{proc.stderr[-3000:]}"
        got[isa] = torch.load(path)
    return got


def test_token_logprobs_with_neg_inf_logits_are_not_nan(results):
    for key in ("lp_logprobs", "lp_entropy", "lp_grad_hidden", "lp_grad_weight"):
        assert not results["base"][key].isnan().any(), key


def test_isa_cap_takes_effect(results):
    assert results["base"]["isa"] == "baseline"
    assert results["v3"]["isa"] in ("baseline", "x86-64-v3 (AVX2)")  # v3 when the CPU has it


@pytest.mark.parametrize("isa", VARIANTS[1:])
def test_variants_agree(results, isa):
    base, other = results["base"], results[isa]
    for key, expected in base.items():
        if key == "isa":
            continue
        actual = other[key]
        whitened = key == "whiten" or (key.startswith("ppo_") and "_True_advantages" in key)
        if whitened:  # mean / variance are float64 sums split over the vector lanes
            assert_close(actual, expected, rtol=1e-6, atol=1e-6, name=f"{key} ({isa} vs base)")
        elif key.startswith("lp_"):  # float32 sums over the vocabulary, split over the vector lanes
            assert torch.equal(actual.isinf(), expected.isinf()), f"{key}: inf positions differ ({isa} vs base)"
            assert_close(actual, expected, rtol=2e-5, atol=2e-5, name=f"{key} ({isa} vs base)")
        else:
            assert torch.equal(actual.isnan(), expected.isnan()), f"{key}: NaN positions differ ({isa} vs base)"
            assert torch.equal(actual.nan_to_num(), expected.nan_to_num()), \
                f"{key}: {isa} differs from the baseline variant, max abs diff " \
                f"{(actual.double() - expected.double()).abs().nan_to_num().max().item():.3e}"


def test_an_unknown_isa_cap_is_said_not_ignored():
    """RMKERNELS_CPU_ISA=<not base, v3 or v4>: one warning at import naming it (the C++ side
    ignores it, so a typo silently ran the best variant)."""
    env = subprocess_env(RMKERNELS_CPU_ISA="avx2")
    proc = subprocess.run([sys.executable, "-c", "import rmkernels"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("RMKERNELS_CPU_ISA='avx2' is not one of base, v3, v4: ignored") == 1, proc.stderr
    env["RMKERNELS_CPU_ISA"] = "v3"
    proc = subprocess.run([sys.executable, "-W", "error", "-c", "import rmkernels"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0 and "RMKERNELS_CPU_ISA" not in proc.stderr, proc.stderr
