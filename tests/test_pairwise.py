"""Tests of the fused reward-model head: pooling + value head + Bradley-Terry loss
(``rmk.pairwise_reward_loss``, docs/ops.md).

``sample_inputs`` feeds the correctness, gradient and opcheck tests alike."""
import pytest
import torch
import torch.nn.functional as F
from test_bt_loss import REDUCTIONS
from utils import (
    TRITON_INTERPRET,
    assert_close,
    backend_params,
    cpu_backend_params,
    opcheck_test,
    skip_unless_available,
    tolerance,
)

import rmkernels as rmk


def sample_inputs(B, T, H, dtype, device, *, bias=True):
    """(hidden [2B, T, H], weight [1, H], bias [1] or None, lengths [2B], mask [2B, T]) of one
    case, the float tensors requiring grad."""
    h = torch.randn(2 * B, T, H, device=device).to(dtype).requires_grad_()
    W = (torch.randn(1, H, device=device) / H ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(1, device=device).to(dtype).requires_grad_() if bias else None
    lengths = torch.randint(1, T + 1, (2 * B,), device=device)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).long()  # right padding
    return h, W, b, lengths, mask


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pairwise_equals_composed(backend, device, reduction, dtype):
    """pairwise_reward_loss == last_token_reward followed by bradley_terry_loss (loss, rewards
    and every gradient), and both == the float64 reference on float64 copies of the inputs (the
    fused op and its composition share the pooling and loss routing: a bug of both would pass
    the first comparison)."""
    skip_unless_available(backend, device)
    B, T, H = (7, 9, 24) if TRITON_INTERPRET else (33, 17, 40)
    h, W, b, _, mask = sample_inputs(B, T, H, dtype, device)
    m, w = torch.rand(B, device=device), torch.rand(B, device=device) + 0.1
    opts = dict(margin=m, weights=w, label_smoothing=0.1, center_coef=0.01, reduction=reduction)
    loss, rc, rr = rmk.pairwise_reward_loss(h, W, b, attention_mask=mask, backend=backend, **opts)
    assert rc.shape == (B,) and rr.shape == (B,) and rc.dtype == torch.float32
    proj = torch.randn_like(loss)
    grads = torch.autograd.grad((loss * proj).sum() + 0.3 * rc.sum() - 0.2 * rr.sum(), (h, W, b))

    rewards = rmk.last_token_reward(h, W, b, attention_mask=mask, backend=backend)
    exp = rmk.bradley_terry_loss(rewards[:B], rewards[B:], backend=backend, **opts)
    exp_grads = torch.autograd.grad((exp * proj).sum() + 0.3 * rewards[:B].sum() - 0.2 * rewards[B:].sum(),
                                    (h, W, b))
    assert_close(loss, exp, rtol=2e-5, atol=2e-5, name="loss")
    assert_close(rc, rewards[:B, 0], rtol=2e-5, atol=2e-5, name="chosen_rewards")
    assert_close(rr, rewards[B:, 0], rtol=2e-5, atol=2e-5, name="rejected_rewards")
    for g, e, n in zip(grads, exp_grads, ("grad_hidden", "grad_weight", "grad_bias")):
        assert g.dtype == dtype and g.shape == e.shape
        assert_close(g, e, rtol=tolerance(dtype)[0], atol=tolerance(dtype)[1], name=n)

    h64, W64, b64 = (t.detach().double().requires_grad_() for t in (h, W, b))
    opts64 = dict(opts, margin=m.double(), weights=w.double())
    loss64, rc64, rr64 = rmk.pairwise_reward_loss(h64, W64, b64, attention_mask=mask, backend="reference", **opts64)
    grads64 = torch.autograd.grad((loss64 * proj.double()).sum() + 0.3 * rc64.sum() - 0.2 * rr64.sum(),
                                  (h64, W64, b64))
    # The loss and the rewards are float32 whatever the input dtype (fp32 arithmetic on the same
    # input values): float32's tolerance. The gradients are rounded to the input dtype: for bf16
    # one ulp of it, 2^-7 relative (the rounding is at most half of it; measured: 3.9e-3), and an
    # atol of 1e-5 for fp32's own rounding of sums that cancel (tolerance(bf16)'s atol of 2e-2
    # would exceed most grad_hidden elements, ~1e-2).
    rtol, atol = tolerance(torch.float32)
    g_rtol, g_atol = (2 ** -7, 1e-5) if dtype == torch.bfloat16 else (rtol, atol)
    assert_close(loss, loss64, rtol=rtol, atol=atol, name="loss vs float64 reference")
    assert_close(rc, rc64, rtol=rtol, atol=atol, name="chosen_rewards vs float64 reference")
    assert_close(rr, rr64, rtol=rtol, atol=atol, name="rejected_rewards vs float64 reference")
    for g, e, n in zip(grads, grads64, ("grad_hidden", "grad_weight", "grad_bias")):
        assert_close(g, e, rtol=g_rtol, atol=g_atol, name=f"{n} vs float64 reference")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_pairwise_equals_hf_path(backend, device):
    """Same numbers as the HF path on the same weights: the head on every token, a gather at
    the last token, TRL's loss (float64 so the two paths agree to rounding)."""
    skip_unless_available(backend, device)
    B, T, H = 6, 11, 16
    dtype = torch.float64 if backend != "triton" or TRITON_INTERPRET else torch.float32
    h, W, b, lengths, mask = sample_inputs(B, T, H, dtype, device)
    m = torch.rand(B, device=device, dtype=dtype)
    coef = 0.01
    loss, rc, rr = rmk.pairwise_reward_loss(h, W, b, attention_mask=mask, margin=m, center_coef=coef,
                                            backend=backend)
    grads = torch.autograd.grad(loss, (h, W, b))

    scores = h @ W.t() + b  # [2B, T, 1]: HF *ForSequenceClassification
    last = mask.sum(1) - 1
    pooled = scores[torch.arange(2 * B, device=device), last, 0]
    c, r = pooled[:B], pooled[B:]
    trl = -F.logsigmoid(c - r - m).mean() + coef * torch.mean((c + r) ** 2)
    trl_grads = torch.autograd.grad(trl, (h, W, b))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    assert_close(loss, trl, name="loss", **tol)
    assert_close(rc, c, name="chosen_rewards", **tol)
    assert_close(rr, r, name="rejected_rewards", **tol)
    for g, e, n in zip(grads, trl_grads, ("grad_hidden", "grad_weight", "grad_bias")):
        assert_close(g, e, name=n, **tol)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_pairwise_packed_equals_padded(backend, device):
    skip_unless_available(backend, device)
    B, T, H = 5, 7, 12
    h, W, b, lengths, mask = sample_inputs(B, T, H, torch.float32, device)
    packed = torch.cat([h[i, : lengths[i]] for i in range(2 * B)]).detach().requires_grad_()
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    out = rmk.pairwise_reward_loss(packed, W, b, cu_seqlens=cu, margin=0.1, backend=backend)
    exp = rmk.pairwise_reward_loss(h, W, b, lengths=lengths, margin=0.1, backend=backend)
    for o, e in zip(out, exp):
        assert_close(o, e, rtol=2e-5, atol=2e-5)
    g_packed, gW = torch.autograd.grad(out[0], (packed, W))
    g_h, gW_exp = torch.autograd.grad(exp[0], (h, W))
    assert_close(g_packed, torch.cat([g_h[i, : lengths[i]] for i in range(2 * B)]), rtol=2e-5, atol=2e-5)
    assert_close(gW, gW_exp, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_pairwise_saves_no_score_tensor(backend, device):
    """Autograd keeps the inputs, the [2B] index and [2B]/[B] per-pair tensors only: no
    [2B, T] score tensor, no [2B, H] rows."""
    skip_unless_available(backend, device)
    B, T, H = 4, 9, 16
    h, W, b, _, mask = sample_inputs(B, T, H, torch.float32, device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = rmk.pairwise_reward_loss(h, W, b, attention_mask=mask, margin=torch.rand(B, device=device),
                                              backend=backend)
    assert saved, "nothing was saved: the hook did not see the op"
    for t in saved:
        is_input = any(t.data_ptr() == x.data_ptr() for x in (h, W)) and t.shape in (h.shape, W.shape)
        assert is_input or t.numel() <= 2 * B, f"autograd keeps a {tuple(t.shape)} tensor"
    torch.autograd.grad(loss, h)  # the saved tensors are enough for the backward


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_pairwise_empty_row_is_nan(backend, device):
    """A sequence with no valid token: NaN reward and loss (GPU without checks), ValueError on
    CPU tensors (the data checks of last_token_reward)."""
    skip_unless_available(backend, device)
    h, W, b, _, mask = sample_inputs(3, 5, 8, torch.float32, device)
    mask[4] = 0
    if device == "cpu":
        with pytest.raises(ValueError, match="attention_mask"):
            rmk.pairwise_reward_loss(h, W, b, attention_mask=mask, backend=backend)
    else:
        loss, rc, rr = rmk.pairwise_reward_loss(h, W, b, attention_mask=mask, reduction="none", backend=backend)
        assert torch.isnan(rr[1]) and torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_pairwise_empty_batch(backend, device):
    skip_unless_available(backend, device)
    h, W, b, _, mask = sample_inputs(0, 5, 8, torch.float32, device)
    loss, rc, rr = rmk.pairwise_reward_loss(h, W, b, attention_mask=mask, reduction="sum", backend=backend)
    assert loss.shape == () and loss.item() == 0 and rc.shape == (0,) and rr.shape == (0,)
    g_h, g_w = torch.autograd.grad(loss, (h, W))
    assert g_h.shape == h.shape and g_w.shape == W.shape and not g_w.any()


def test_pairwise_bad_inputs():
    h, W, b, lengths, mask = sample_inputs(3, 5, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight must be \\[1, H\\]"):
        rmk.pairwise_reward_loss(h, torch.randn(2, 8), lengths=lengths)
    with pytest.raises(ValueError, match="hidden_states must hold 2B sequences"):
        rmk.pairwise_reward_loss(h[:5], W, b, lengths=lengths[:5])
    with pytest.raises(ValueError, match="cu_seqlens"):
        rmk.pairwise_reward_loss(torch.randn(12, 8), W, cu_seqlens=torch.tensor([0, 4, 8, 12]))
    with pytest.raises(ValueError, match="margin must be a float or a \\[B\\] = \\[3\\]"):
        rmk.pairwise_reward_loss(h, W, b, lengths=lengths, margin=torch.rand(6))
    with pytest.raises(ValueError, match="attention_mask"):
        rmk.pairwise_reward_loss(h, W, b, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="give exactly one of"):
        rmk.pairwise_reward_loss(h, W, b)
    with pytest.raises(ValueError, match="label_smoothing"):
        rmk.pairwise_reward_loss(h, W, b, lengths=lengths, label_smoothing=0.6)
    with pytest.raises(ValueError, match="reduction"):
        rmk.pairwise_reward_loss(h, W, b, lengths=lengths, reduction="mean_pairs")
    with pytest.raises(ValueError, match="weight must be \\[K, H\\]"):
        rmk.pairwise_reward_loss(h, torch.randn(1, 7), lengths=lengths)
    with pytest.raises(TypeError, match="hidden_states must have dtype"):
        rmk.pairwise_reward_loss(h.long(), W, lengths=lengths)
    with pytest.raises(ValueError, match="weights is on meta"):
        rmk.pairwise_reward_loss(h, W, b, lengths=lengths, weights=torch.rand(3, device="meta"))
    with pytest.raises(ValueError, match=r"weights must be a float or a \[B\] = \[3\]"):
        rmk.pairwise_reward_loss(h, W, b, lengths=lengths, weights=torch.rand(3, 1))


# ---------------------------------------------------------------------------------------
# gradcheck (fp64), opcheck, torch.compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, reduction):
    skip_unless_available(backend, "cpu")
    h, W, b, _, _ = sample_inputs(2, 3, 2, torch.float64, "cpu")
    lengths = torch.tensor([3, 2, 3, 1])
    assert torch.autograd.gradcheck(
        lambda h, W, b: rmk.pairwise_reward_loss(h, W, b, lengths=lengths, margin=0.2, center_coef=0.05,
                                                 label_smoothing=0.1, reduction=reduction, backend=backend),
        (h, W, b))


def _opcheck_cases(device):
    """(op name, arguments but the backend) of each public op of this file."""
    B = 5
    m, w = torch.rand(B, device=device), torch.rand(B, device=device)
    h, W, bias, _, _ = sample_inputs(B, 4, 8, torch.float32, device)
    index = torch.tensor([3, 1, 0, 2, 3, 3, 2, 1, 0, 3], device=device)
    grad = torch.randn((), device=device)
    return [
        ("pairwise_reward_loss", (h, W, bias, index, m, w, 0.0, 1.0, 0.1, 0.01, "mean")),
        ("pairwise_reward_loss", (h, W, None, index, None, None, 0.2, 1.0, 0.0, 0.0, "none")),
        ("pairwise_reward_loss_backward",
         (grad, torch.randn(2 * B, device=device), torch.randn(2 * B, device=device), h.detach(), W.detach(),
          index, m, w, 0.0, 1.0, 0.1, 0.01, "mean", True, True, True)),
        ("pairwise_reward_loss_backward",
         (torch.randn(B, device=device), None, torch.randn(2 * B, device=device), h.detach(), W.detach(), index,
          None, None, 0.0, 1.0, 0.0, 0.0, "none", True, False, False)),
    ]


test_opcheck_public_ops = opcheck_test(_opcheck_cases)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    skip_unless_available(backend, "cpu")
    B, T, H = 4, 6, 8

    def pair_fn(h, W, b, mask, m):
        loss, rc, rr = rmk.pairwise_reward_loss(h, W, b, attention_mask=mask, margin=m, center_coef=0.01,
                                                backend=backend)
        return loss + 0.1 * (rc - rr).sum()

    m = torch.rand(B)
    h, W, b, _, mask = sample_inputs(B, T, H, torch.float32, "cpu")
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (2 * B, 1))).long()
    compiled = torch.compile(pair_fn, fullgraph=True, backend="aot_eager")
    out, exp = compiled(h, W, b, mask, m), pair_fn(h, W, b, mask, m)
    assert_close(out, exp, rtol=1e-6, atol=1e-6, name="pair_fn")
    for g, e in zip(torch.autograd.grad(out, (h, W, b)), torch.autograd.grad(exp, (h, W, b))):
        assert_close(g, e, rtol=1e-6, atol=1e-6, name="pair_fn grad")


def test_torch_compile_inductor():
    """The default backend (Inductor) over the fused head + loss, forward and backward."""
    skip_unless_available("cpu", "cpu")
    h = torch.randn(6, 5, 8, requires_grad=True)
    W = torch.randn(1, 8, requires_grad=True)
    lengths = torch.tensor([5, 3, 1, 2, 5, 4])

    def fn(h, W):
        return rmk.pairwise_reward_loss(h, W, lengths=lengths, center_coef=0.01)[0]

    out = torch.compile(fn, fullgraph=True)(h, W)
    exp = fn(h, W)
    assert_close(out, exp, rtol=1e-6, atol=1e-6)
    for g, e in zip(torch.autograd.grad(out, (h, W)), torch.autograd.grad(exp, (h, W))):
        assert_close(g, e, rtol=1e-6, atol=1e-6)
