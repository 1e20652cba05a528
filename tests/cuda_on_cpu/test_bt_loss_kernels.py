"""csrc/cuda/bt_loss.cu's launchers run on the CPU (AddressSanitizer), against the reference
backend: the Bradley-Terry loss for every dtype, reduction and option set (margin / weights
as tensors or floats, label smoothing, centering), strided inputs, B = 0, a batch past the
grid cap (grid-stride loop); the ranking loss for ragged (B, K), candidate counts, strided
rewards; forward and backward."""
import math

import pytest
import torch
from test_bt_loss import OPTION_SETS, loss_options
from utils import assert_close, tolerance

import rmkernels as rmk

from .emu import DTYPE_CODE, Program

pytestmark = pytest.mark.cuda_on_cpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [1, 7, 97, 1025]
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # bt_loss.cuh Reduction


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _options(name, B, dtype):
    """test_bt_loss.py's option set ``name``, its tensors in the launcher's dtype."""
    return loss_options(name, B, dtype=_acc(dtype))


def _bt_launch(c, r, opts, reduction, grad, variant="asan", need=(True, True)):
    dtype = c.dtype
    B = c.shape[0]
    prog = Program()
    m, w = opts.get("margin"), opts.get("weights")
    pairs = [DTYPE_CODE[dtype], prog.inp(c), prog.inp(r), c.stride(0), r.stride(0),
             prog.inp(m) if torch.is_tensor(m) else None, prog.inp(w) if torch.is_tensor(w) else None,
             float(m) if m is not None and not torch.is_tensor(m) else 0.0,
             float(w) if w is not None and not torch.is_tensor(w) else 1.0,
             float(opts.get("label_smoothing", 0.0)), float(opts.get("center_coef", 0.0)), B, REDUCTIONS[reduction]]
    loss = prog.out((B,) if reduction == "none" else (), _acc(dtype))
    prog.call("rmk_bt_loss_fwd", *pairs, loss)
    gc = prog.out((B,), dtype) if need[0] else None
    gr = prog.out((B,), dtype) if need[1] else None
    prog.call("rmk_bt_loss_bwd", *pairs, prog.inp(grad), gc, gr)
    res = prog.run(variant)
    assert res.rcs == [0, 0], res.rcs
    return res[loss], (res[gc] if gc is not None else None), (res[gr] if gr is not None else None)


def _bt_reference(c, r, opts, reduction, grad):
    c64 = c.double().requires_grad_(True)
    r64 = r.double().requires_grad_(True)
    o = {k: (v.double() if torch.is_tensor(v) else v) for k, v in opts.items()}
    loss = rmk.bradley_terry_loss(c64, r64, reduction=reduction, backend="reference", **o)
    gc, gr = torch.autograd.grad(loss, (c64, r64), grad.double())
    return loss.detach(), gc, gr


def _check_bt(c, r, opts, reduction, variant="asan"):
    B, dtype = c.shape[0], c.dtype
    grad = torch.randn((B,) if reduction == "none" else (), dtype=_acc(dtype))
    got = _bt_launch(c, r, opts, reduction, grad, variant)
    want = _bt_reference(c, r, opts, reduction, grad)
    rtol, atol = tolerance(dtype)
    if dtype != torch.float64:
        rtol, atol = max(rtol, 2e-5), max(atol, 2e-5)
    # a sum over B fp32 terms: the error grows like sqrt(B)
    scale = max(1.0, B ** 0.5) if reduction != "none" else 1.0
    assert_close(got[0], want[0], rtol=rtol, atol=atol * scale, name=f"loss {reduction} {dtype}")
    for name, a, e in (("grad_chosen", got[1], want[1]), ("grad_rejected", got[2], want[2])):
        assert a.dtype == dtype
        assert_close(a, e, rtol=rtol, atol=atol, name=f"{name} {reduction} {dtype}")


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bt_matches_reference(dtype, reduction):
    for B in SIZES:
        c, r = (torch.randn(B) * 2).to(dtype), (torch.randn(B) * 2).to(dtype)
        _check_bt(c, r, {}, reduction)


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("opt", list(OPTION_SETS))
def test_bt_options_match_reference(opt, reduction):
    B = 97
    c, r = torch.randn(B) * 2, torch.randn(B) * 2
    _check_bt(c, r, _options(opt, B, torch.float32), reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bt_strided_inputs(dtype):
    B = 301
    base = (torch.randn(B, 3) * 2).to(dtype)
    c, r = base[:, 0], base[:, 2]  # stride 3, sharing one allocation
    _check_bt(c, r, _options("all", B, dtype), "mean")
    big = (torch.randn(2 * B) * 2).to(dtype)
    _check_bt(big[::2], big[1::2], {}, "none")


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_bt_one_gradient(need):
    B = 40
    c, r = torch.randn(B), torch.randn(B)
    grad = torch.randn(())
    got = _bt_launch(c, r, {}, "sum", grad, need=need)
    want = _bt_reference(c, r, {}, "sum", grad)
    for a, e, n in zip(got[1:], want[1:], need):
        if n:
            assert_close(a, e, rtol=2e-5, atol=2e-5, name="grad")
        else:
            assert a is None


def test_bt_empty_batch():
    # kNone: no launch; kMean: one block over no pairs gives 0 / 0 = NaN; kSum: 0; no backward.
    for reduction, want in (("mean", float("nan")), ("sum", 0.0)):
        prog = Program()
        loss = prog.out((), torch.float32)
        args = [0, prog.inp(torch.randn(0)), prog.inp(torch.randn(0)), 1, 1, None, None, 0.0, 1.0, 0.0, 0.0, 0,
                REDUCTIONS[reduction]]
        prog.call("rmk_bt_loss_fwd", *args, loss)
        prog.call("rmk_bt_loss_bwd", *args, prog.inp(torch.ones(())), prog.out((0,), torch.float32),
                  prog.out((0,), torch.float32))
        res = prog.run()
        assert res.rcs == [0, 0]
        got = res[loss].item()
        assert (got != got) if want != want else got == want
    prog = Program()
    prog.call("rmk_bt_loss_fwd", 0, None, None, 1, 1, None, None, 0.0, 1.0, 0.0, 0.0, 0, 0,
              prog.out((0,), torch.float32))
    assert prog.run().rcs == [0]


def test_bt_grid_stride_past_the_grid_cap():
    """kNone and an unweighted kSum backward launch min(1056, ceil(B / 256)) blocks; a batch
    past 1056 * 256 pairs makes every thread take more than one pair."""
    B = 1056 * 256 + 301
    c, r = torch.randn(B) * 2, torch.randn(B) * 2
    _check_bt(c, r, {"margin": 0.1}, "none")
    _check_bt(c, r, {"label_smoothing": 0.1}, "sum")


def test_bt_race_free_under_thread_sanitizer():
    B = 700
    c, r = torch.randn(B) * 2, torch.randn(B) * 2
    for reduction in ("mean", "none"):
        _check_bt(c, r, _options("all", B, torch.float32), reduction, variant="tsan")


# ---- ranking loss ---------------------------------------------------------------------
RANK_SHAPES = [(1, 2), (7, 4), (97, 9), (13, 45)]  # (B, K); K = 45 > 32 lanes


def _rank_launch(x, nc, grad_rows, variant="asan"):
    dtype = x.dtype
    B, K = x.shape
    prog = Program()
    xb = prog.inp(x)
    ncb = prog.inp(nc) if nc is not None else None
    rows = prog.out((B,), _acc(dtype))
    prog.call("rmk_ranking_loss_fwd", DTYPE_CODE[dtype], xb, ncb, B, K, x.stride(0), x.stride(1), rows)
    gx = prog.out((B, K), dtype)
    prog.call("rmk_ranking_loss_bwd", DTYPE_CODE[dtype], prog.inp(grad_rows), xb, ncb, B, K, x.stride(0), x.stride(1),
              gx)
    res = prog.run(variant)
    assert res.rcs == [0, 0], res.rcs
    return res[rows], res[gx]


def _rank_reference(x, nc, grad_rows):
    x64 = x.double().requires_grad_(True)
    rows = rmk.ranking_loss(x64, num_candidates=nc, reduction="none", backend="reference")
    (g,) = torch.autograd.grad(rows, (x64,), grad_rows.double())
    return rows.detach(), g


def _check_rank(x, nc, variant="asan"):
    B = x.shape[0]
    grad_rows = torch.randn(B, dtype=_acc(x.dtype))
    got = _rank_launch(x, nc, grad_rows, variant)
    # the launcher clamps the counts to [0, K] (the public function rejects them on CPU)
    want = _rank_reference(x, nc.clamp(0, x.shape[1]) if nc is not None else None, grad_rows)
    rtol, atol = tolerance(x.dtype)
    if x.dtype != torch.float64:
        rtol, atol = max(rtol, 2e-5), max(atol, 2e-5)
    assert_close(got[0], want[0], rtol=rtol, atol=atol, name=f"row losses {x.dtype}")
    assert got[1].dtype == x.dtype
    assert_close(got[1], want[1], rtol=rtol, atol=atol, name=f"grad_rewards {x.dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranking_matches_reference(dtype):
    for B, K in RANK_SHAPES:
        x = (torch.randn(B, K) * 2).to(dtype)
        _check_rank(x, None)
        nc = torch.randint(-1, K + 2, (B,))  # out-of-range counts are clamped to [0, K]
        _check_rank(x, nc)


def test_ranking_large_k_keeps_precision():
    """A row's pair terms are summed in double (each lane's, then the warp's): a float32 lane
    summed ~K^2/64 of them one by one. Equal rewards give log 2; random ones match float64."""
    K = 2048
    x = torch.zeros(2, K)
    x[1] = torch.randn(K) * 2
    nc = torch.tensor([K, K - 1])
    grad_rows = torch.randn(2)
    rows, g = _rank_launch(x, nc, grad_rows)
    want_rows, want_g = _rank_reference(x, nc, grad_rows)
    assert abs(rows[0].item() - math.log(2)) <= 1e-6 * math.log(2), rows[0].item()
    assert_close(rows, want_rows, rtol=1e-6, atol=0, name="row losses")
    assert_close(g, want_g, rtol=1e-5, atol=1e-5 * want_g.abs().max().item(), name="grad_rewards")


def test_ranking_strided_rewards():
    B, K = 37, 6
    x = torch.randn(K, B).t()  # column-major
    _check_rank(x, torch.randint(0, K + 1, (B,)))
    big = torch.randn(B, 2 * K + 1)
    _check_rank(big[:, 1::2], None)


def test_ranking_empty():
    prog = Program()
    prog.call("rmk_ranking_loss_fwd", 0, prog.inp(torch.randn(0, 3)), None, 0, 3, 3, 1, prog.out((0,), torch.float32))
    prog.call("rmk_ranking_loss_bwd", 0, prog.inp(torch.randn(4)), prog.inp(torch.randn(4, 0)), None, 4, 0, 0, 1,
              prog.out((4, 0), torch.float32))
    assert prog.run().rcs == [0, 0]
    # K = 0 forward: every row has no pair, loss 0
    prog = Program()
    rows = prog.out((3,), torch.float32)
    prog.call("rmk_ranking_loss_fwd", 0, prog.inp(torch.randn(3, 0)), None, 3, 0, 0, 1, rows)
    res = prog.run()
    assert res.rcs == [0] and (res[rows] == 0).all()


def test_ranking_race_free_under_thread_sanitizer():
    x = torch.randn(20, 35)
    _check_rank(x, torch.randint(0, 36, (20,)), variant="tsan")
