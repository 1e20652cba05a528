"""Tests of the Bradley-Terry loss (docs/ops.md; the pairwise head and the ranking loss have
their own files: test_pairwise.py, test_ranking.py).

``sample_inputs`` feeds the correctness, gradient and opcheck tests alike."""
import math

import pytest
import torch
import torch.nn.functional as F
from utils import (
    TRITON_INTERPRET,
    assert_close,
    assert_close_vs_lowp,
    backend_params,
    cpu_backend_params,
    opcheck_test,
    skip_unless_available,
    tolerance,
)

import rmkernels as rmk
from rmkernels.ops import bt_loss as bt

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [1, 7, 97, 1025]
REDUCTIONS = ["mean", "sum", "none"]
# Interpreted Triton is slow (one Python-level program per row): fewer, smaller cases there.
if TRITON_INTERPRET:
    SIZES = [1, 7, 97]


# Loss options that change the arithmetic: each term of the formula alone, then all of them.
OPTION_SETS = {
    "plain": {},
    "margin_float": {"margin": 0.37},
    "margin_tensor": {"margin": "tensor"},
    "smoothing": {"label_smoothing": 0.2},
    "center": {"center_coef": 0.05},
    "weights_tensor": {"weights": "tensor"},
    "weights_float": {"weights": 2.5},
    "all": {"margin": "tensor", "label_smoothing": 0.1, "center_coef": 0.01, "weights": "tensor"},
}


def loss_options(name, B, device="cpu", dtype=torch.float32):
    """Materialize an OPTION_SETS entry: "tensor" becomes a fresh [B] tensor of ``dtype``."""
    opts = dict(OPTION_SETS[name])
    if opts.get("margin") == "tensor":
        opts["margin"] = torch.rand(B, device=device, dtype=dtype)
    if opts.get("weights") == "tensor":
        opts["weights"] = torch.rand(B, device=device, dtype=dtype) + 0.1
    return opts


def _pair(B, dtype, device, scale=2.0):
    c = (torch.randn(B, device=device) * scale).to(dtype).requires_grad_()
    r = (torch.randn(B, device=device) * scale).to(dtype).requires_grad_()
    return c, r


def _loss_and_grads(fn, inputs, *args, **kwargs):
    """fn(*inputs, ...) and the gradients of a random projection of it w.r.t. the inputs."""
    out = fn(*inputs, *args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    proj = torch.randn_like(out)
    grads = torch.autograd.grad((out * proj).sum(), inputs)
    return out, grads, proj



def sample_inputs(B, dtype, device, opt="plain", scale=2.0):
    """(chosen, rejected, options) of one case: [B] rewards requiring grad and the loss options
    of OPTION_SETS[opt] (tensors materialized)."""
    c, r = _pair(B, dtype, device, scale)
    return c, r, loss_options(opt, B, device)

# ---------------------------------------------------------------------------------------
# The reference itself against the contract's formula written out independently (autograd of the
# plain expression), so that the ground truth is checked too.
# ---------------------------------------------------------------------------------------
def _spec_formula(c, r, margin=None, label_smoothing=0.0, center_coef=0.0, weights=None, reduction="mean"):
    m = 0.0 if margin is None else margin
    w = torch.ones_like(c) if weights is None else (weights if torch.is_tensor(weights) else torch.full_like(c,
                                                                                                     weights))
    d = c - r - m
    e = label_smoothing
    loss = -(1 - e) * F.logsigmoid(d) - e * F.logsigmoid(-d) + center_coef * (c + r) ** 2
    if reduction == "none":
        return w * loss
    if reduction == "sum":
        return (w * loss).sum()
    return (w * loss).sum() / w.sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", list(OPTION_SETS))
def test_reference_is_the_spec_formula(opt, reduction):
    B = 53
    c, r = _pair(B, torch.float64, "cpu")
    opts = loss_options(opt, B, "cpu")
    opts = {k: v.double() if torch.is_tensor(v) else v for k, v in opts.items()}
    out, grads, proj = _loss_and_grads(rmk.bradley_terry_loss, (c, r), reduction=reduction, backend="reference",
                                       **opts)
    exp = _spec_formula(c, r, reduction=reduction, **opts)
    exp_grads = torch.autograd.grad((exp * proj).sum(), (c, r))
    assert_close(out, exp, rtol=1e-12, atol=1e-12, name="loss")
    for g, e, n in zip(grads, exp_grads, ("grad_chosen", "grad_rejected")):
        assert_close(g, e, rtol=1e-12, atol=1e-12, name=n)


def test_mean_equals_trl_loss():
    """The contract: "mean" with no weights is TRL's -logsigmoid(c - r - m).mean() + coef * mean((c + r)^2)."""
    c, r = _pair(64, torch.float64, "cpu")
    m = torch.rand(64, dtype=torch.float64)
    out = rmk.bradley_terry_loss(c, r, margin=m, center_coef=0.01, backend="reference")
    trl = -F.logsigmoid(c - r - m).mean() + 0.01 * torch.mean((c + r) ** 2)
    assert_close(out, trl, rtol=1e-12, atol=1e-12, name="loss")


# ---------------------------------------------------------------------------------------
# Each backend against the reference: forward and both gradients
# ---------------------------------------------------------------------------------------
def _check_bt_vs_reference(backend, device, B, dtype, reduction, opt):
    c, r = _pair(B, dtype, device)
    opts = loss_options(opt, B, device)
    out, grads, proj = _loss_and_grads(rmk.bradley_terry_loss, (c, r), reduction=reduction, backend=backend,
                                       **opts)
    exp = rmk.bradley_terry_loss(c, r, reduction=reduction, backend="reference", **opts)
    exp_grads = torch.autograd.grad((exp * proj).sum(), (c, r))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc and out.shape == ((B,) if reduction == "none" else ())
    rtol, atol = tolerance(acc)
    assert_close(out, exp, rtol=rtol, atol=atol, name="loss")
    for g, e, n in zip(grads, exp_grads, ("grad_chosen", "grad_rejected")):
        assert g.dtype == dtype
        assert_close(g, e, rtol=tolerance(dtype)[0], atol=tolerance(dtype)[1], name=n)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", SIZES)
def test_bt_matches_reference(backend, device, B, dtype, reduction):
    skip_unless_available(backend, device)
    _check_bt_vs_reference(backend, device, B, dtype, reduction, "all")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", list(OPTION_SETS))
def test_bt_options_match_reference(backend, device, opt, reduction):
    skip_unless_available(backend, device)
    _check_bt_vs_reference(backend, device, 97, torch.float32, reduction, opt)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("wanted", ["chosen", "rejected"])
def test_bt_one_gradient_matches_reference(backend, device, wanted, reduction):
    """Only one side requires grad (the other's rewards come from a frozen model): the backward
    kernel is asked for that gradient alone and must give the reference's."""
    skip_unless_available(backend, device)
    for B in SIZES:
        c, r = _pair(B, torch.float32, device)
        c.requires_grad_(wanted == "chosen")
        r.requires_grad_(wanted == "rejected")
        opts = loss_options("all", B, device)
        out = rmk.bradley_terry_loss(c, r, reduction=reduction, backend=backend, **opts)
        proj = torch.randn_like(out)
        (g,) = torch.autograd.grad((out * proj).sum(), (c if wanted == "chosen" else r,))
        c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
        opts64 = {k: v.double() if torch.is_tensor(v) else v for k, v in opts.items()}
        exp = rmk.bradley_terry_loss(c64, r64, reduction=reduction, backend="reference", **opts64)
        exp_grads = dict(zip(("chosen", "rejected"), torch.autograd.grad((exp * proj.double()).sum(), (c64, r64))))
        assert_close(g, exp_grads[wanted], rtol=2e-5, atol=2e-6, name=f"grad_{wanted} alone")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bt_low_precision_error(backend, device, dtype):
    """flash-attention's rule: error vs fp64 at most 2x that of plain PyTorch in the low dtype."""
    skip_unless_available(backend, device)
    B = 257
    c, r = _pair(B, dtype, device)
    m = torch.rand(B, device=device)
    out, grads, proj = _loss_and_grads(rmk.bradley_terry_loss, (c, r), margin=m, center_coef=0.01,
                                       backend=backend)
    c64, r64 = (t.detach().double().requires_grad_() for t in (c, r))
    exp = -F.logsigmoid(c64 - r64 - m.double()).mean() + 0.01 * torch.mean((c64 + r64) ** 2)
    exp_grads = torch.autograd.grad(exp * proj.double(), (c64, r64))
    cl, rl = (t.detach().clone().requires_grad_() for t in (c, r))
    low = -F.logsigmoid(cl - rl - m.to(dtype)).mean() + 0.01 * torch.mean((cl + rl) ** 2)
    low_grads = torch.autograd.grad(low * proj.to(dtype), (cl, rl))
    assert_close_vs_lowp(out, exp, low, name="loss")
    for g, e, lg, n in zip(grads, exp_grads, low_grads, ("grad_chosen", "grad_rejected")):
        assert_close_vs_lowp(g, e, lg, name=n)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_bt_huge_margins_are_finite(backend, device, dtype, smoothing):
    """|d| up to 1e30: finite loss and gradients (chosen + rejected = 0 keeps the centering
    term itself finite), equal to the asymptotes."""
    skip_unless_available(backend, device)
    big = torch.tensor([5e29, -5e29, 5e20, -5e20, 3.0, -1e10], device=device)
    c = big.to(dtype).requires_grad_()
    r = (-big).to(dtype).requires_grad_()
    for reduction in REDUCTIONS:
        out, grads, proj = _loss_and_grads(rmk.bradley_terry_loss, (c, r), label_smoothing=smoothing,
                                           center_coef=0.1, reduction=reduction, backend=backend)
        assert torch.isfinite(out).all(), f"{reduction}: loss {out}"
        for g in grads:
            assert torch.isfinite(g).all(), f"{reduction}: grad {g}"
        exp = rmk.bradley_terry_loss(c, r, label_smoothing=smoothing, center_coef=0.1, reduction=reduction,
                                     backend="reference")
        assert_close(out, exp, rtol=1e-5, atol=1e-6, name="loss")
    # d = 1e30 (chosen far ahead): loss e * 1e30 (0 without smoothing); d = -1e30: (1 - e) * 1e30
    none = rmk.bradley_terry_loss(c, r, label_smoothing=smoothing, reduction="none", backend=backend)
    d = (c - r).detach().double()
    assert_close(none[:2], torch.where(d[:2] > 0, smoothing * d[:2], -(1 - smoothing) * d[:2]).to(none.dtype),
                 rtol=1e-5, atol=0, name="asymptote")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_bt_transcendentals_over_the_whole_range(backend, device, smoothing):
    """Per-pair losses and gradients for d swept over [-100, 100] in fp32 (the exp underflow
    at -87 included), against the fp64 reference. Where |d| < 80 each loss is checked
    relatively, 1e-6: the tiny losses log1p(exp(-d)) ~ 1e-35 of a confident pair too (the CPU
    kernel's own vectorised exp / log1p must keep log1p's relative precision)."""
    skip_unless_available(backend, device)
    d = torch.linspace(-100, 100, 40001, device=device)
    d = torch.cat([d, torch.tensor([-87.5, -87.0, -86.9, 86.9, 87.0, 87.5, 0.0, -0.0, 1e-7, -1e-7], device=device)])
    c = (d / 2).requires_grad_()
    r = (-d / 2).requires_grad_()
    out, grads, proj = _loss_and_grads(rmk.bradley_terry_loss, (c, r), label_smoothing=smoothing, reduction="none",
                                       backend=backend)
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    exp = rmk.bradley_terry_loss(c64, r64, label_smoothing=smoothing, reduction="none", backend="reference")
    exp_grads = torch.autograd.grad((exp * proj.double()).sum(), (c64, r64))
    inner = (c - r).detach().abs() < 80
    assert_close(out[inner], exp[inner], rtol=1e-6, atol=0, name="loss, |d| < 80")
    assert_close(out, exp, rtol=1e-6, atol=1e-30, name="loss")
    # dl/dd = -(1 - e) sigmoid(-d) + e sigmoid(d) cancels where the two terms meet: fp32
    # rounding of terms of size ~|proj| is the absolute floor there. Without smoothing, proj x
    # sigmoid(-d) near |d| = 80 can be subnormal, where fp32 keeps 1.4e-45 absolute, not 1e-6
    # relative: the 1e-6 is measured against the smallest normal at least (the H200's CUDA
    # kernel, 2026-12-04: -2.33588e-40 for -2.33589e-40, one subnormal step).
    subnormal_floor = 1e-6 * torch.finfo(torch.float32).smallest_normal
    for g, e, n in zip(grads, exp_grads, ("grad_chosen", "grad_rejected")):
        assert_close(g[inner], e[inner], rtol=1e-6,
                     atol=subnormal_floor if smoothing == 0 else 2e-7 * proj.abs().max().item(),
                     name=f"{n}, |d| < 80")
        assert_close(g, e, rtol=1e-6, atol=1e-30 if smoothing == 0 else 2e-7 * proj.abs().max().item(), name=n)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_bt_nan_stays_in_its_row(backend, device):
    skip_unless_available(backend, device)
    c, r = _pair(9, torch.float32, device)
    with torch.no_grad():
        c[3] = float("nan")
    out, grads, _ = _loss_and_grads(rmk.bradley_terry_loss, (c, r), reduction="none", backend=backend)
    assert torch.isnan(out[3]) and torch.isfinite(out[torch.arange(9) != 3]).all()
    for g in grads:
        assert torch.isnan(g[3]) and torch.isfinite(g[torch.arange(9) != 3]).all()
    out, grads, _ = _loss_and_grads(rmk.bradley_terry_loss, (c, r), reduction="mean", backend=backend)
    assert torch.isnan(out)
    for g in grads:  # the mean divides by sum(w), which the NaN reward does not touch
        assert torch.isfinite(g[torch.arange(9) != 3]).all()


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_bt_layouts(backend, device):
    """[B, 1] inputs, strided [B] views and mixed dtypes give the [B] result, with grads in the
    inputs' own shapes and dtypes."""
    skip_unless_available(backend, device)
    B = 33
    both = torch.randn(B, 2, device=device, requires_grad=True)  # rewards[:, 0] has stride 2
    c1 = torch.randn(B, 1, device=device, requires_grad=True)
    r_bf = torch.randn(B, device=device).bfloat16().requires_grad_()
    out = rmk.bradley_terry_loss(both[:, 0], both[:, 1], reduction="none", backend=backend)
    exp = rmk.bradley_terry_loss(both[:, 0].detach().contiguous(), both[:, 1].detach().contiguous(),
                                 reduction="none", backend="reference")
    assert_close(out, exp, rtol=2e-5, atol=2e-5)
    (g,) = torch.autograd.grad(out.sum(), both)
    both_ref = both.detach().clone().requires_grad_(True)  # the reference's gradients, contiguous views
    exp_out = rmk.bradley_terry_loss(both_ref[:, 0].contiguous(), both_ref[:, 1].contiguous(), reduction="none",
                                     backend="reference")
    (g_exp,) = torch.autograd.grad(exp_out.sum(), both_ref)
    assert g.shape == both.shape
    assert_close(g, g_exp, rtol=2e-5, atol=2e-5, name="grad of strided [B] views")
    out = rmk.bradley_terry_loss(c1, r_bf, reduction="none", backend=backend)
    assert out.shape == (B,)
    exp = rmk.bradley_terry_loss(c1.detach()[:, 0], r_bf.detach().float(), reduction="none", backend="reference")
    assert_close(out, exp, rtol=2e-5, atol=2e-5)
    gc, gr = torch.autograd.grad(out.sum(), (c1, r_bf))
    assert gc.shape == (B, 1) and gc.dtype == torch.float32
    assert gr.shape == (B,) and gr.dtype == torch.bfloat16
    c_ref, r_ref = c1.detach()[:, 0].clone().requires_grad_(True), r_bf.detach().float().requires_grad_(True)
    gc_exp, gr_exp = torch.autograd.grad(rmk.bradley_terry_loss(c_ref, r_ref, reduction="none",
                                                                backend="reference").sum(), (c_ref, r_ref))
    assert_close(gc[:, 0], gc_exp, rtol=2e-5, atol=2e-5, name="grad of [B, 1] chosen")
    assert_close(gr.float(), gr_exp.bfloat16().float(), rtol=0, atol=0, name="bf16 grad of rejected")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_bt_empty_batch(backend, device):
    """B = 0: "sum" is 0, "mean" is NaN (an empty mean, as torch.mean), "none" is [0]."""
    skip_unless_available(backend, device)
    c, r = _pair(0, torch.float32, device)
    s = rmk.bradley_terry_loss(c, r, reduction="sum", backend=backend)
    m = rmk.bradley_terry_loss(c, r, reduction="mean", backend=backend)
    n = rmk.bradley_terry_loss(c, r, reduction="none", backend=backend)
    assert s.shape == () and s.item() == 0.0
    assert m.shape == () and math.isnan(m.item())
    assert n.shape == (0,)
    gc, gr = torch.autograd.grad(s, (c, r))
    assert gc.shape == (0,) and gr.shape == (0,)


def test_cpu_reduction_is_deterministic():
    c, r = _pair(65536, torch.float32, "cpu")
    w = torch.rand(65536)
    a = rmk.bradley_terry_loss(c, r, weights=w, backend="cpu")
    b = rmk.bradley_terry_loss(c, r, weights=w, backend="cpu")
    assert torch.equal(a, b)
    exp = rmk.bradley_terry_loss(c.double(), r.double(), weights=w.double(), backend="reference")
    assert_close(a, exp, rtol=1e-6, atol=1e-6)


@pytest.mark.triton
def test_triton_large_batch():
    """B = 65536 in one program: the chunked loop of the reduction kernels."""
    skip_unless_available("triton", "cpu")
    B = 65536
    c, r = _pair(B, torch.float32, "cpu")
    w = torch.rand(B)
    for red in ("mean", "sum"):
        out, grads, proj = _loss_and_grads(rmk.bradley_terry_loss, (c, r), weights=w, reduction=red,
                                           backend="triton")
        exp = rmk.bradley_terry_loss(c.double(), r.double(), weights=w.double(), reduction=red,
                                     backend="reference")
        assert_close(out, exp, rtol=1e-5, atol=1e-6, name=red)
        g64 = bt._reference_bt_bwd(proj.double().reshape(()), c.detach().double(), r.detach().double(), None,
                                   w.double(), 0.0, 1.0, 0.0, 0.0, bt.REDUCTIONS[red], True, True)
        for g, e in zip(grads, g64):
            assert_close(g, e, rtol=1e-5, atol=1e-9, name=f"{red} grad")


# ---------------------------------------------------------------------------------------
# gradcheck (fp64), opcheck, torch.compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, reduction):
    skip_unless_available(backend, "cpu")
    B = 6
    c, r, _ = sample_inputs(B, torch.float64, "cpu", scale=1.0)
    m, w = torch.rand(B, dtype=torch.float64), torch.rand(B, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda c, r: rmk.bradley_terry_loss(c, r, margin=m, weights=w, label_smoothing=0.1, center_coef=0.05,
                                            reduction=reduction, backend=backend), (c, r))


def _opcheck_cases(device):
    """(op name, arguments but the backend) of each public op of this file."""
    B = 5
    c, r, _ = sample_inputs(B, torch.float32, device)
    m, w = torch.rand(B, device=device), torch.rand(B, device=device)
    cases = []
    for red in REDUCTIONS:
        grad = torch.randn(B if red == "none" else (), device=device)
        cases += [
            ("bradley_terry_loss", (c, r, m, w, 0.0, 1.0, 0.1, 0.01, red)),
            ("bradley_terry_loss_backward",
             (grad, c.detach(), r.detach(), m, w, 0.0, 1.0, 0.1, 0.01, red, True, True)),
        ]
    grad = torch.randn((), device=device)
    cases += [
        ("bradley_terry_loss", (c, r, None, None, 0.3, 2.0, 0.0, 0.0, "sum")),
        ("bradley_terry_loss_backward",
         (grad, c.detach(), r.detach(), None, None, 0.5, 1.0, 0.0, 0.0, "mean", False, True)),
    ]
    return cases


test_opcheck_public_ops = opcheck_test(_opcheck_cases)


def _kernel_opcheck_cases(device):
    """(op name, arguments) of the kernel ops: every reduction code, bf16 inputs, strided
    chosen / rejected views with only one gradient wanted."""
    B = 7
    c, r = torch.randn(B, device=device), torch.randn(B, device=device)
    m, w = torch.rand(B, device=device), torch.rand(B, device=device)
    cases = []
    for red in range(3):
        grad = torch.randn(B if red == 0 else (), device=device)
        g4 = grad[:4] if red == 0 else grad
        cases += [
            ("bt_loss_fwd_kernel", (c, r, m, w, 0.0, 1.0, 0.1, 0.01, red)),
            ("bt_loss_fwd_kernel", (c.bfloat16(), r.bfloat16(), None, None, 0.5, 2.0, 0.0, 0.0, red)),
            ("bt_loss_bwd_kernel", (grad, c, r, m, w, 0.0, 1.0, 0.1, 0.01, red, True, True)),
            ("bt_loss_bwd_kernel", (g4, c[::2], torch.randn(8, device=device)[::2], None, None, 0.0, 1.0, 0.0, 0.0,
                                    red, True, False)),
        ]
    return cases


test_opcheck_kernel_ops = opcheck_test(_kernel_opcheck_cases, kernel_ops=True)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    skip_unless_available(backend, "cpu")
    B = 4

    def bt_fn(c, r, m, w):
        return rmk.bradley_terry_loss(c, r, margin=m, weights=w, label_smoothing=0.1, center_coef=0.01,
                                      backend=backend)

    c, r, _ = sample_inputs(B, torch.float32, "cpu")
    m, w = torch.rand(B), torch.rand(B)
    compiled = torch.compile(bt_fn, fullgraph=True, backend="aot_eager")
    out, exp = compiled(c, r, m, w), bt_fn(c, r, m, w)
    assert_close(out, exp, rtol=1e-6, atol=1e-6, name="bt_fn")
    for g, e in zip(torch.autograd.grad(out, (c, r)), torch.autograd.grad(exp, (c, r))):
        assert_close(g, e, rtol=1e-6, atol=1e-6, name="bt_fn grad")


# ---------------------------------------------------------------------------------------
# Bad inputs: a clear error that names the argument, before any kernel runs
# ---------------------------------------------------------------------------------------
def _bt_bad_cases():
    B = 4
    c, r = torch.randn(B), torch.randn(B)
    return [
        # the broadcast trap: [B, 1] - [B] silently makes [B, B] in plain PyTorch
        (dict(chosen=torch.randn(B, B), rejected=r), ValueError, r"chosen must be \[B\] or \[B, 1\]"),
        (dict(chosen=c, rejected=torch.randn(B, 2)), ValueError, r"rejected must be \[B\] or \[B, 1\]"),
        (dict(chosen=c[:, None], rejected=r, margin=torch.rand(B, 1)), ValueError, "margin"),
        (dict(chosen=c, rejected=r, weights=torch.rand(1, B)), ValueError, "weights"),
        (dict(chosen=c, rejected=r, margin=torch.rand(B + 1)), ValueError, r"margin must be a float or a \[B\]"),
        (dict(chosen=c, rejected=r, weights=torch.rand(B - 1)), ValueError, r"weights must be a float or a \[B\]"),
        (dict(chosen=c, rejected=torch.randn(B + 1)), ValueError, "rejected must have the same batch size"),
        (dict(chosen=torch.randn(()), rejected=r), ValueError, "chosen must be 1-D or 2-D"),
        (dict(chosen=torch.randn(B, 1, 1), rejected=r), ValueError, "chosen must be 1-D or 2-D"),
        (dict(chosen=c, rejected=r, label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(chosen=c, rejected=r, label_smoothing=0.5), ValueError, "label_smoothing"),
        (dict(chosen=c, rejected=r, label_smoothing=float("nan")), ValueError, "label_smoothing"),
        (dict(chosen=c, rejected=r, label_smoothing="0.1"), TypeError, "label_smoothing"),
        (dict(chosen=c, rejected=r, center_coef=-1.0), ValueError, "center_coef"),
        (dict(chosen=c, rejected=r, reduction="avg"), ValueError, "reduction"),
        (dict(chosen=c, rejected=r, reduction=None), ValueError, "reduction"),
        (dict(chosen=c.long(), rejected=r), TypeError, "chosen must have dtype"),
        (dict(chosen=c, rejected=r.int()), TypeError, "rejected must have dtype"),
        (dict(chosen=c, rejected=r, margin=torch.ones(B, dtype=torch.long)), TypeError, "margin must have dtype"),
        (dict(chosen=c, rejected=r, margin="0.1"), TypeError, "margin must be a float or a"),
        (dict(chosen=c, rejected=r, weights=[1.0] * B), TypeError, "weights must be a float or a"),
        (dict(chosen=c, rejected=r, margin=float("inf")), ValueError, "margin"),
        (dict(chosen=c.tolist(), rejected=r), TypeError, "chosen must be a torch.Tensor"),
        (dict(chosen=c, rejected=r, backend="gpu"), ValueError, "backend"),
        # device mismatch (a meta tensor stands in for another device on a CPU-only machine)
        (dict(chosen=c, rejected=torch.randn(B, device="meta")), ValueError, "rejected is on meta"),
        (dict(chosen=c, rejected=r, margin=torch.rand(B, device="meta")), ValueError, "margin is on meta"),
        (dict(chosen=c, rejected=r, weights=torch.rand(B, device="meta")), ValueError, "weights is on meta"),
    ]


@pytest.mark.parametrize("case", range(len(_bt_bad_cases())))
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_bt_bad_inputs(case, backend):
    """Every CPU backend refuses each bad input in the op layer (the C++ kernel's own checks
    would hide a gap there on the default backend only)."""
    skip_unless_available(backend, "cpu")
    kwargs, exc, match = _bt_bad_cases()[case]
    chosen, rejected = kwargs.pop("chosen"), kwargs.pop("rejected")
    kwargs.setdefault("backend", backend)
    with pytest.raises(exc, match=match):
        rmk.bradley_terry_loss(chosen, rejected, **kwargs)


def test_bt_error_says_expected_and_given():
    with pytest.raises(ValueError) as info:
        rmk.bradley_terry_loss(torch.randn(3, 3), torch.randn(3))
    assert "(3, 3)" in str(info.value) and "[B, 1]" in str(info.value)
    with pytest.raises(ValueError) as info:
        rmk.bradley_terry_loss(torch.randn(3), torch.randn(3), label_smoothing=0.7)
    assert "0.7" in str(info.value) and "0.5" in str(info.value)


@pytest.mark.parametrize("path", ["op", "eager"])
def test_wrapper_adds_no_copies(path, monkeypatch):
    """Forward and backward of bradley_terry_loss on [B, 1] fp32 inputs with a fp32 margin
    dispatch the loss op and its backward op (path "op") or, on the eager fast path (forced on
    under the logging mode, which otherwise turns it off), the two kernel ops, and nothing but
    views around them (each is one kernel launch on the GPU paths)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rmkernels import _library

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    if path == "eager":
        skip_unless_available("cpu", "cpu")
        monkeypatch.setattr(_library, "use_eager_path", lambda *a: True)
    c = torch.randn(16, 1, requires_grad=True)
    r = torch.randn(16, 1, requires_grad=True)
    m, seed = torch.rand(16), torch.ones(())
    with Log() as log:
        loss = rmk.bradley_terry_loss(c, r, margin=m, center_coef=0.01, backend="cpu")
        torch.autograd.grad(loss, (c, r), seed)
    views = {"aten.squeeze", "aten.unsqueeze", "aten.view", "aten.detach", "aten.alias", "aten.promote_types"}
    heavy = [op for op in log.ops if op not in views]
    expected = {"op": ["rmkernels.bradley_terry_loss", "rmkernels.bradley_terry_loss_backward"],
                "eager": ["rmkernels.bt_loss_fwd_kernel", "rmkernels.bt_loss_bwd_kernel"]}[path]
    assert heavy == expected, str(log.ops)
