"""Gradients for every layout the forward accepts, and the kernels' numerics at the edges
(issue 12 items 2 and 7).

* Every backward equals autograd of the plain formula for transposed, sliced, expanded,
  ``unfold`` and ``as_strided``-overlapping hidden states, through ``last_token_reward`` and
  ``pairwise_reward_loss`` (grad_hidden is allocated with hidden's strides only when they are
  non-overlapping and dense: ``rmkernels._layout.grad_buffer``).
* ``bradley_terry_loss(inf, 0)`` is the formula's 0 (not 0 * -inf = NaN), gradients too.
* The ``"mean"`` / ``"sum"`` reductions keep a relative error ~1e-7 at 2^22 pairs.
* bf16 gradients are rounded to nearest (ties to even) on every backend, the Triton
  interpreter included.
"""
import pytest
import torch
import torch.nn.functional as F

import rmkernels as rmk
from tests.utils import assert_close, backend_params, skip_unless_available


def _layouts(B, T, H):
    """name -> (base tensor (leaf), function base -> hidden [B, T, H] view)."""
    return {
        "contiguous": (torch.randn(B, T, H), lambda x: x),
        "transposed": (torch.randn(T, B, H), lambda x: x.transpose(0, 1)),
        "sliced": (torch.randn(B, T + 3, H + 5), lambda x: x[:, 1:T + 1, 2:H + 2]),
        "expanded": (torch.randn(1, T, H), lambda x: x.expand(B, T, H)),
        "expanded over T": (torch.randn(B, 1, H), lambda x: x.expand(B, T, H)),
        "unfold": (torch.randn(B, T + H - 1), lambda x: x.unfold(1, H, 1)),
        "as_strided overlap": (torch.randn(B * 3 + T * 2 + H), lambda x: x.as_strided((B, T, H), (3, 2, 1))),
    }


LAYOUTS = list(_layouts(2, 2, 2))


def _plain_last_token(hidden, weight, bias, mask):
    """The formula with plain autograd: the head on each row's rightmost valid token."""
    T = hidden.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    idx = torch.where(mask != 0, pos, torch.full_like(pos, -1)).amax(1)
    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    out = rows.to(weight.dtype) @ weight.t()
    return out + bias if bias is not None else out


def _mask(B, T):
    mask = torch.zeros(B, T)
    for b in range(B):
        n = int(torch.randint(1, T + 1, ()))
        if b % 2:
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_last_token_reward_grads_every_layout(backend, device, layout):
    skip_unless_available(backend, device)
    B, T, H, K = 6, 9, 16, 3
    base, view = _layouts(B, T, H)[layout]
    base = base.to(device).requires_grad_(True)
    weight = torch.randn(K, H, device=device, requires_grad=True)
    bias = torch.randn(K, device=device, requires_grad=True)
    mask = _mask(B, T).to(device)
    mask[0] = 1  # row 0 picks the last token, where views overlap most
    out = rmk.last_token_reward(view(base), weight, bias, attention_mask=mask, backend=backend)
    g_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [base, weight, bias], g_out)
    exp_out = _plain_last_token(view(base), weight, bias, mask)
    exp = torch.autograd.grad(exp_out, [base, weight, bias], g_out)
    assert_close(out, exp_out, rtol=2e-5, atol=2e-5, name=f"rewards ({layout})")
    for name, g, e in zip(("grad_hidden (of the base)", "grad_weight", "grad_bias"), got, exp):
        assert_close(g, e, rtol=2e-5, atol=2e-5, name=f"{name} ({layout}, {backend})")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("layout", ["transposed", "unfold", "as_strided overlap", "expanded"])
def test_pairwise_reward_loss_grads_every_layout(backend, device, layout):
    skip_unless_available(backend, device)
    B2, T, H = 8, 7, 16
    base, view = _layouts(B2, T, H)[layout]
    base = base.to(device).requires_grad_(True)
    weight = torch.randn(1, H, device=device, requires_grad=True)
    mask = _mask(B2, T).to(device)
    loss, chosen, rejected = rmk.pairwise_reward_loss(view(base), weight, attention_mask=mask, backend=backend)
    got = torch.autograd.grad(loss, [base, weight])
    r = _plain_last_token(view(base), weight, None, mask)[:, 0]
    exp_loss = -F.logsigmoid(r[: B2 // 2] - r[B2 // 2:]).mean()
    exp = torch.autograd.grad(exp_loss, [base, weight])
    assert_close(loss, exp_loss, rtol=2e-5, atol=2e-5, name=f"loss ({layout})")
    for name, g, e in zip(("grad_hidden (of the base)", "grad_weight"), got, exp):
        assert_close(g, e, rtol=2e-5, atol=2e-5, name=f"{name} ({layout}, {backend})")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_grad_hidden_layout(backend, device):
    """grad_hidden keeps hidden's strides when they are non-overlapping and dense (a transposed
    batch), else it is contiguous (an overlapping view has no layout to share)."""
    skip_unless_available(backend, device)
    B, T, H = 3, 5, 8
    w = torch.randn(1, H, device=device)
    idx = torch.tensor([4, 2, 0], device=device)
    g = torch.ones(B, 1, device=device)
    ops = torch.ops.rmkernels
    for hidden, strides in ((torch.randn(T, B, H, device=device).transpose(0, 1), (H, B * H, 1)),
                            (torch.randn(B, T + H - 1, device=device).unfold(1, H, 1), (T * H, H, 1))):
        g_h, _, _ = ops.last_token_reward_backward(g, hidden, w, idx, True, False, False, backend)
        assert g_h.stride() == strides, f"grad_hidden strides {g_h.stride()}, expected {strides}"


# ---------------------------------------------------------------------------------------
# Bradley-Terry numerics
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bt_loss_infinite_margin_is_the_formula(backend, device, reduction):
    """bradley_terry_loss(inf, 0) = -logsigmoid(inf) = 0 (not 0 * -inf = NaN); with label
    smoothing e > 0 the formula gives e * inf = inf; gradients are finite where the formula's are."""
    skip_unless_available(backend, device)
    inf = float("inf")
    c = torch.tensor([inf, 0.0, 1.0, -inf], device=device, requires_grad=True)
    r = torch.tensor([0.0, -inf, 0.5, 0.0], device=device, requires_grad=True)
    loss = rmk.bradley_terry_loss(c, r, reduction=reduction, backend=backend)
    per_pair = torch.tensor([0.0, 0.0, -F.logsigmoid(torch.tensor(0.5)).item(), inf])
    expect = {"none": per_pair, "mean": per_pair.mean(), "sum": per_pair.sum()}[reduction]
    assert_close(loss, expect.to(device), rtol=1e-6, atol=1e-6, name=f"loss {reduction}")
    if reduction == "none":
        gc, gr = torch.autograd.grad(loss[:3].sum(), [c, r])
        sig = torch.sigmoid(torch.tensor(-0.5)).item()
        assert_close(gc, torch.tensor([0.0, 0.0, -sig, 0.0], device=device), rtol=1e-6, atol=1e-6, name="grad c")
        assert_close(gr, torch.tensor([0.0, 0.0, sig, 0.0], device=device), rtol=1e-6, atol=1e-6, name="grad r")
    smoothed = rmk.bradley_terry_loss(c.detach()[:1], r.detach()[:1], label_smoothing=0.1, reduction="none",
                                      backend=backend)
    assert smoothed.item() == inf


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bt_loss_reduction_precision_at_large_batch(backend, device, reduction):
    """At 2^22 pairs the reduced loss stays within ~1e-7 relative of a float64 sum of the
    float64 per-pair losses (a float32 running sum over the blocks lost 5e-5)."""
    skip_unless_available(backend, device)
    n = 1 << 22 if backend != "triton" or device == "cuda" else 1 << 18
    c = torch.randn(n, device=device) + 1.0
    r = torch.randn(n, device=device)
    w = torch.rand(n, device=device)
    d = (c - r).double()
    per_pair = -F.logsigmoid(d)
    for weights in (None, w):
        got = rmk.bradley_terry_loss(c, r, weights=weights, reduction=reduction, backend=backend).double()
        pw = per_pair * (weights.double() if weights is not None else 1.0)
        exp = pw.sum() / (weights.double().sum() if weights is not None else n) if reduction == "mean" else pw.sum()
        rel = ((got - exp).abs() / exp.abs()).item()
        assert rel < 1e-6, f"{reduction} (weights={weights is not None}): relative error {rel:.2e} at n={n}"


# ---------------------------------------------------------------------------------------
# bf16 rounding of the gradients the kernels store
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_params())
def test_bf16_grad_hidden_rounds_to_nearest(backend, device):
    """grad_hidden in bf16 is the fp32 gradient rounded to nearest (what `.to(torch.bfloat16)`
    gives), on every backend: under the Triton interpreter a plain cast truncates.

    The backends sum the K products in their own order, so their fp32 row may differ from any
    one fp32 reference by the fp32 rounding bound; an element whose exact value lies within that
    bound of a bf16 rounding midpoint may round either way (seen once in ~150 draws on the cpu
    backend). Every other element must equal the exact value rounded to nearest."""
    skip_unless_available(backend, device)
    B, T, H, K = 4, 6, 64, 3
    hidden = torch.randn(B, T, H, device=device).to(torch.bfloat16)
    w = torch.randn(K, H, device=device)
    idx = torch.tensor([5, 0, 3, 2], device=device)
    g = torch.randn(B, K, device=device)
    g_h, _, _ = torch.ops.rmkernels.last_token_reward_backward(g, hidden, w, idx, True, False, False, backend)
    rows = g.double() @ w.double()  # exact enough: float64
    bound = 2 * K * torch.finfo(torch.float32).eps * (g.double().abs() @ w.double().abs())
    lo, hi = (rows - bound).to(torch.bfloat16), (rows + bound).to(torch.bfloat16)
    zero_elsewhere = torch.ones(B, T, dtype=torch.bool, device=device)
    zero_elsewhere[torch.arange(B, device=device), idx] = False
    assert not g_h[zero_elsewhere].any(), "grad_hidden is nonzero off the pooled positions"
    got = g_h[torch.arange(B, device=device), idx]
    within = (got >= lo) & (got <= hi)
    assert within.all(), (
        f"{int((~within).sum())} bf16 elements are not the fp32 gradient rounded to nearest")
    # the test has teeth: most elements are unambiguous (lo == hi), so truncation fails it
    assert (lo == hi).float().mean() > 0.9


@pytest.mark.parametrize("backend,device", backend_params())
def test_bf16_loss_grads_round_to_nearest(backend, device):
    skip_unless_available(backend, device)
    n = 999
    c = torch.randn(n, device=device).to(torch.bfloat16)
    r = torch.randn(n, device=device).to(torch.bfloat16)
    grad = torch.randn(n, device=device)
    ops = torch.ops.rmkernels
    g_c, g_r = ops.bradley_terry_loss_backward(grad, c, r, None, None, 0.0, 1.0, 0.0, 0.0, "none", True, True,
                                               backend)
    e_c, e_r = ops.bradley_terry_loss_backward(grad, c.float(), r.float(), None, None, 0.0, 1.0, 0.0, 0.0, "none",
                                               True, True, backend)
    assert torch.equal(g_c, e_c.to(torch.bfloat16)) and torch.equal(g_r, e_r.to(torch.bfloat16))
    rewards = torch.randn(37, 5, device=device).to(torch.bfloat16)
    g_rows = torch.randn(37, device=device)
    got = ops.ranking_loss_backward(g_rows, rewards, None, "none", backend)
    exp = ops.ranking_loss_backward(g_rows, rewards.float(), None, "none", backend)
    assert torch.equal(got, exp.to(torch.bfloat16))
