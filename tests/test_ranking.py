"""Tests of InstructGPT's K-wise ranking loss (``rmk.ranking_loss``, docs/ops.md).

``sample_inputs`` feeds the correctness, gradient and opcheck tests alike."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from test_bt_loss import DTYPES, REDUCTIONS, _loss_and_grads
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

RANK_SHAPES = [(1, 2), (7, 4), (97, 9), (13, 45)]  # (B, K); K = 45 spans two 32-wide tiles
RANK_DTYPES = DTYPES
# Interpreted Triton is slow (one Python-level program per row): fewer, smaller cases there.
if TRITON_INTERPRET:
    RANK_SHAPES = [(1, 2), (7, 4), (3, 37)]
    RANK_DTYPES = [torch.float32, torch.bfloat16]


def sample_inputs(B, K, dtype, device, ragged, scale=2.0):
    """(rewards [B, K] requiring grad, num_candidates [B] int64 or None) of one case."""
    x = (torch.randn(B, K, device=device) * scale).to(dtype).requires_grad_()
    nc = torch.randint(0, K + 1, (B,), device=device) if ragged else None
    return x, nc


def _ranking_loops(x, nc):
    """The InstructGPT loss written as plain loops over rows and pairs (fp64)."""
    rows = []
    for b in range(x.shape[0]):
        n = int(nc[b])
        pairs = [-F.logsigmoid(x[b, i] - x[b, j]) for i, j in itertools.combinations(range(n), 2)]
        rows.append(torch.stack(pairs).mean() if pairs else x.new_zeros(()))
    return torch.stack(rows) if rows else x.new_zeros(0)


def test_ranking_reference_is_the_loop():
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    nc = torch.tensor([6, 0, 1, 2, 3, 4, 5, 6, 2])
    out, grads, proj = _loss_and_grads(rmk.ranking_loss, (x,), num_candidates=nc, reduction="none",
                                       backend="reference")
    exp = _ranking_loops(x, nc)
    assert_close(out, exp, rtol=1e-12, atol=1e-12)
    assert_close(grads[0], torch.autograd.grad((exp * proj).sum(), x)[0], rtol=1e-12, atol=1e-12)
    mean = rmk.ranking_loss(x, num_candidates=nc, backend="reference")
    assert_close(mean, exp[nc >= 2].mean(), rtol=1e-12, atol=1e-12, name="mean over ranked rows")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", RANK_DTYPES, ids=str)
@pytest.mark.parametrize("B,K", RANK_SHAPES)
@pytest.mark.parametrize("ragged", [False, True])
def test_ranking_matches_reference(backend, device, B, K, dtype, reduction, ragged):
    skip_unless_available(backend, device)
    x, nc = sample_inputs(B, K, dtype, device, ragged)
    out, grads, proj = _loss_and_grads(rmk.ranking_loss, (x,), num_candidates=nc, reduction=reduction,
                                       backend=backend)
    exp = rmk.ranking_loss(x, num_candidates=nc, reduction=reduction, backend="reference")
    exp_grads = torch.autograd.grad((exp * proj).sum(), x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(out, exp, rtol=tolerance(acc)[0], atol=tolerance(acc)[1], name="loss")
    assert grads[0].dtype == dtype
    assert_close(grads[0], exp_grads[0], rtol=tolerance(dtype)[0], atol=tolerance(dtype)[1], name="grad")
    if nc is not None:  # columns beyond num_candidates get exactly zero gradient
        beyond = torch.arange(K, device=device)[None, :] >= nc[:, None]
        assert (grads[0][beyond] == 0).all()


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_ranking_large_k_keeps_precision(backend, device):
    """A row's K(K-1)/2 pair terms are summed in float64 by every kernel (the cpu kernel summed
    them one by one in float32: equal rewards gave 0.6899 for log 2 at K = 1000, 0.3356 at
    K = 10000). Equal rewards give log 2 and the gradients k - (n - 1) / 2 over the pairs to
    float32 rounding; random rewards match float64 to 1e-6."""
    skip_unless_available(backend, device)
    # the interpreter steps through every tile pair in Python: 500 there (still 16 tiles of
    # MAX_BLOCK_K a row, 125K pair terms; a float32 sum of them drifts past rtol 1e-6 too)
    K = 500 if TRITON_INTERPRET else 3000
    n = torch.tensor([K, K - 1], device=device)
    x = torch.zeros(2, K, device=device, requires_grad=True)
    out, (g,), proj = _loss_and_grads(rmk.ranking_loss, (x,), num_candidates=n, reduction="none", backend=backend)
    assert_close(out, torch.full((2,), math.log(2), dtype=torch.float64), rtol=1e-6, atol=0, name="equal rewards")
    k = torch.arange(K, dtype=torch.float64)
    n64 = n.double().cpu()[:, None]
    exp_g = torch.where(k < n64, (k - (n64 - 1) / 2) / (n64 * (n64 - 1) / 2), 0.0) * proj.double().cpu()[:, None]
    # (atol: a reward's K - 1 terms cancel near the middle of the row; float32 terms there)
    assert_close(g, exp_g, rtol=1e-5, atol=1e-5 * exp_g.abs().max().item(), name="equal rewards grad")
    x = (torch.randn(2, K, device=device) * 2).requires_grad_()
    out, (g,), proj = _loss_and_grads(rmk.ranking_loss, (x,), num_candidates=n, reduction="none", backend=backend)
    x64 = x.detach().double().requires_grad_()
    exp = rmk.ranking_loss(x64, num_candidates=n, reduction="none", backend="reference")
    (exp_g,) = torch.autograd.grad((exp * proj.double()).sum(), x64)
    assert_close(out, exp, rtol=1e-6, atol=0, name="random rewards")
    assert_close(g, exp_g, rtol=1e-5, atol=1e-5 * exp_g.abs().max().item(), name="random rewards grad")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_ranking_k2_equals_bradley_terry(backend, device):
    skip_unless_available(backend, device)
    x = torch.randn(31, 2, device=device, requires_grad=True)
    for reduction in REDUCTIONS:
        out, (g,), proj = _loss_and_grads(rmk.ranking_loss, (x,), reduction=reduction, backend=backend)
        exp = rmk.bradley_terry_loss(x[:, 0], x[:, 1], reduction=reduction, backend=backend)
        (g_exp,) = torch.autograd.grad((exp * proj).sum(), x)
        assert_close(out, exp, rtol=2e-6, atol=2e-6, name=reduction)
        assert_close(g, g_exp, rtol=2e-6, atol=2e-6, name=f"{reduction} grad")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_ranking_edge_cases(backend, device):
    """B = 0, K = 0 / 1, rows with < 2 candidates: 0 loss, left out of the mean; a batch with
    no ranked row has a NaN mean (an empty mean)."""
    skip_unless_available(backend, device)
    assert rmk.ranking_loss(torch.randn(0, 4, device=device), reduction="none", backend=backend).shape == (0,)
    assert rmk.ranking_loss(torch.randn(0, 4, device=device), reduction="sum", backend=backend).item() == 0
    x = torch.randn(3, 1, device=device, requires_grad=True)
    out = rmk.ranking_loss(x, reduction="none", backend=backend)
    assert (out == 0).all()
    assert math.isnan(rmk.ranking_loss(x, backend=backend).item())
    x = torch.randn(4, 3, device=device, requires_grad=True)
    nc = torch.tensor([3, 1, 0, 2], device=device)
    mean = rmk.ranking_loss(x, num_candidates=nc, backend=backend)
    rows = rmk.ranking_loss(x, num_candidates=nc, reduction="none", backend=backend)
    assert rows[1] == 0 and rows[2] == 0
    assert_close(mean, (rows[0] + rows[3]) / 2, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(mean, x)
    assert (g[1:3] == 0).all() and (g[3, 2] == 0)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_ranking_infinite_upstream_gradient(backend, device):
    """Every backend multiplies a candidate's summed derivative by the row's upstream gradient
    (the reference too, which once multiplied every pair term and got inf * 0 = NaN on
    candidates with a non-zero derivative): +-inf where that sum is not 0, NaN past
    num_candidates (inf * 0), 0 on rows with < 2 candidates."""
    skip_unless_available(backend, device)
    x = torch.tensor([[3.0, 1.0, 0.5, -2.0], [1.0, 0.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0]], device=device,
                     requires_grad=True)
    nc = torch.tensor([4, 2, 1], device=device)
    rows = rmk.ranking_loss(x, num_candidates=nc, reduction="none", backend=backend)
    (g,) = torch.autograd.grad(rows, x, torch.full_like(rows, math.inf))
    (d,) = torch.autograd.grad(rmk.ranking_loss(x, num_candidates=nc, reduction="none", backend="reference"), x,
                               torch.ones(3, device=device))
    assert (d[0] != 0).all() and (d[1, :2] != 0).all()
    want = torch.cat([d[:2].cpu() * math.inf, torch.zeros(1, 4)])  # row 1: [+-inf, +-inf, nan, nan]
    torch.testing.assert_close(g.cpu(), want, equal_nan=True)


def test_ranking_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        rmk.ranking_loss(torch.randn(4))
    with pytest.raises(TypeError, match="rewards must have dtype"):
        rmk.ranking_loss(x.long())
    with pytest.raises(ValueError, match=r"num_candidates must be \[B\] = \[4\]"):
        rmk.ranking_loss(x, num_candidates=torch.tensor([3, 3]))
    with pytest.raises(TypeError, match="num_candidates must have dtype"):
        rmk.ranking_loss(x, num_candidates=torch.ones(4))
    with pytest.raises(ValueError, match=r"num_candidates must be in \[0, K = 3\]: rows 1, 2 have 4, -1"):
        rmk.ranking_loss(x, num_candidates=torch.tensor([3, 4, -1, 0]))
    with pytest.raises(ValueError, match="reduction"):
        rmk.ranking_loss(x, reduction="batchmean")
    with pytest.raises(ValueError, match="num_candidates is on meta"):
        rmk.ranking_loss(x, num_candidates=torch.ones(4, dtype=torch.long, device="meta"))


# ---------------------------------------------------------------------------------------
# gradcheck (fp64), opcheck, torch.compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, reduction):
    skip_unless_available(backend, "cpu")
    x, _ = sample_inputs(5, 4, torch.float64, "cpu", False, scale=1.0)
    nc = torch.tensor([4, 1, 3, 2, 0])
    assert torch.autograd.gradcheck(
        lambda x: rmk.ranking_loss(x, num_candidates=nc, reduction=reduction, backend=backend), (x,))


def _opcheck_cases(device):
    """(op name, arguments but the backend) of each public op of this file."""
    B = 5
    x, _ = sample_inputs(B, 4, torch.float32, device, False, scale=1.0)
    nc = torch.tensor([4, 1, 3, 2, 0], device=device)
    grad = torch.randn((), device=device)
    return [("ranking_loss", (x, nc, red)) for red in REDUCTIONS] + [
        ("ranking_loss", (x, None, "mean")),
        ("ranking_loss_backward", (grad, x.detach(), nc, "mean")),
        ("ranking_loss_backward", (torch.randn(B, device=device), x.detach(), None, "none")),
    ]


test_opcheck_public_ops = opcheck_test(_opcheck_cases)


def _kernel_opcheck_cases(device):
    """(op name, arguments) of the kernel ops, a column-major x included."""
    B = 7
    x, _ = sample_inputs(B, 3, torch.float32, device, False)
    x = x.detach()
    nc = torch.tensor([3, 2, 1, 0, 3, 2, 3], device=device)
    return [("ranking_loss_fwd_kernel", (x, nc)),
            ("ranking_loss_fwd_kernel", (x.t().contiguous().t(), None)),
            ("ranking_loss_bwd_kernel", (torch.randn(B, device=device), x, nc))]


test_opcheck_kernel_ops = opcheck_test(_kernel_opcheck_cases, kernel_ops=True)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    skip_unless_available(backend, "cpu")

    def rank_fn(x, nc):
        return rmk.ranking_loss(x, num_candidates=nc, backend=backend)

    x, _ = sample_inputs(4, 5, torch.float32, "cpu", False, scale=1.0)
    nc = torch.tensor([5, 2, 0, 3])
    compiled = torch.compile(rank_fn, fullgraph=True, backend="aot_eager")
    out, exp = compiled(x, nc), rank_fn(x, nc)
    assert_close(out, exp, rtol=1e-6, atol=1e-6, name="rank_fn")
    for g, e in zip(torch.autograd.grad(out, (x,)), torch.autograd.grad(exp, (x,))):
        assert_close(g, e, rtol=1e-6, atol=1e-6, name="rank_fn grad")
