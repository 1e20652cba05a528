"""csrc/cuda/pooling.cu's launchers run on the CPU (AddressSanitizer), against the reference
backend: every dtype, mask kind and mask width, strided and packed hidden states, rows with
no valid token, B = 0 / T = 0, forward and backward."""
import pytest
import torch
from utils import assert_close, tolerance

import rmkernels as rmk

from .emu import DTYPE_CODE, Program

pytestmark = pytest.mark.cuda_on_cpu

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (B, T, H, K): ragged sizes; H = 1025 walks H in more than one pass of 256 threads and more
# than the 4 blocks along H of the grad_hidden kernel (grid-stride over gridDim.y).
SHAPES = [(3, 97, 59, 1), (2, 33, 1025, 2), (1, 1, 7, 3), (4, 5, 256, 1)]


def _mask(kind, B, T):
    pos = torch.arange(T)[None].expand(B, T)
    n = torch.randint(1, T + 1, (B,))
    if kind == "right":
        return pos < n[:, None]
    if kind == "left":
        return pos >= (T - n)[:, None]
    m = torch.rand(B, T) < 0.5
    m[torch.arange(B), torch.randint(0, T, (B,))] = True  # at least one valid token per row
    return m


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_all(hidden, w, b, mask, grad, *, packed_rows=None, need=(True, True, True), variant="asan"):
    """index, rewards and the three gradients from the launchers, as the CUDA bindings call
    them (hidden [B, T, H] with a unit stride on H, or packed [N, H] with packed_rows=B)."""
    dtype = hidden.dtype
    prog = Program()
    B = packed_rows if packed_rows is not None else hidden.shape[0]
    if packed_rows is None:
        T, H = hidden.shape[1], hidden.shape[2]
        sB, sT = hidden.stride(0), hidden.stride(1)
        gsB, gsT = T * H, H
        gh_shape = (B, T, H)
    else:
        T, H = hidden.shape
        sB, sT, gsB, gsT = 0, hidden.stride(0), 0, H
        gh_shape = (T, H)
    K = w.shape[0]
    m = mask if packed_rows is None else None
    h_buf = prog.inp(hidden)
    w_buf = prog.inp(w)
    b_buf = prog.inp(b) if b is not None else None
    if m is not None:
        idx = prog.out((B,), torch.int64, fill=0x5A)
        mbytes = m.element_size()
        prog.call("rmk_last_token_index", prog.inp(m), mbytes, B, T, m.stride(0), m.stride(1), idx)
    else:
        idx = prog.inp(mask)  # packed: the caller's global row index
    rew = prog.out((B, K), _acc(dtype))
    prog.call("rmk_last_token_reward_fwd", DTYPE_CODE[dtype], h_buf, w_buf, b_buf, idx, rew, B, T, H, K, sB, sT)
    g_buf = prog.inp(grad)
    gh = prog.out(gh_shape, dtype, fill=0) if need[0] else None
    gw = prog.out((K, H), _acc(dtype)) if need[1] else None
    gb = prog.out((K,), _acc(dtype)) if need[2] else None
    if gh is not None:
        prog.call("rmk_last_token_reward_bwd_hidden", DTYPE_CODE[dtype], g_buf, w_buf, idx, gh, B, T, H, K, gsB, gsT)
    prog.call("rmk_last_token_reward_bwd_params", DTYPE_CODE[dtype], g_buf, h_buf, idx, gw, gb, B, T, H, K, sB, sT)
    res = prog.run(variant)
    assert all(rc == 0 for rc in res.rcs), res.rcs
    out = {"rewards": res[rew]}
    if m is not None:
        out["index"] = res[idx]
    for name, buf in (("grad_hidden", gh), ("grad_weight", gw), ("grad_bias", gb)):
        if buf is not None:
            out[name] = res[buf]
    return out


def _reference(hidden, w, b, mask, grad, **index_kw):
    h = hidden.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True) if b is not None else None
    r = rmk.last_token_reward(h, w64, b64, backend="reference", **index_kw)
    grads = torch.autograd.grad(r, [t for t in (h, w64, b64) if t is not None], grad.double())
    out = {"rewards": r.detach(), "grad_hidden": grads[0], "grad_weight": grads[1]}
    if b is not None:
        out["grad_bias"] = grads[2]
    return out


def _compare(got, want, dtype, B):
    rtol, atol = tolerance(dtype)
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        rtol, atol = max(rtol, 2e-5), max(atol, 2e-5)
    for name, e in want.items():
        a = got[name]
        # fp32 sums over B rows (grad_weight) and H (rewards): the tolerance grows like sqrt(n)
        scale = max(1.0, B ** 0.5) if name in ("grad_weight", "grad_bias") else 1.0
        if name == "grad_hidden":
            assert a.dtype == dtype
            r2, a2 = tolerance(dtype)
            assert_close(a, e, rtol=max(r2, 2e-5), atol=max(a2, 2e-5), name=f"{name} {dtype}")
        else:
            assert_close(a, e, rtol=rtol, atol=atol * scale, name=f"{name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["right", "left", "holes"])
def test_forward_backward_vs_reference(dtype, mask_kind):
    for i, (B, T, H, K) in enumerate(SHAPES):
        hidden = torch.randn(B, T, H).to(dtype)
        w = torch.randn(K, H, dtype=_acc(dtype)) / H ** 0.5
        b = torch.randn(K, dtype=_acc(dtype)) if i % 2 == 0 else None
        mask = _mask(mask_kind, B, T)
        grad = torch.randn(B, K, dtype=_acc(dtype))
        got = _launch_all(hidden, w, b, mask, grad)
        want = _reference(hidden, w, b, mask, grad, attention_mask=mask)
        assert torch.equal(got["index"], rmk.last_token_index(mask)), "index"
        _compare(got, want, dtype, B)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int16, torch.int32, torch.int64])
def test_index_mask_widths_and_strided_masks(mask_dtype):
    B, T = 5, 1025  # more than one pass of 256 threads over T
    base = _mask("holes", B, 2 * T).to(mask_dtype)
    if mask_dtype != torch.bool:  # any nonzero value is a valid token, a negative one too (mask != 0)
        base = base * (torch.randint(1, 4, base.shape) * (torch.randint(0, 2, base.shape) * 2 - 1)).to(mask_dtype)
    for m in (base[:, :T], base[:, ::2], base.t().contiguous().t()[:, :T]):
        prog = Program()
        idx = prog.out((B,), torch.int64, fill=0x5A)
        prog.call("rmk_last_token_index", prog.inp(m), m.element_size(), B, T, m.stride(0), m.stride(1), idx)
        res = prog.run()
        assert res.rcs == [0]
        want = torch.where(m != 0, torch.arange(T), -1).amax(1)
        assert torch.equal(res[idx], want)


def test_strided_hidden():
    B, T, H, K = 3, 45, 97, 2
    big = torch.randn(B, 2 * T, H + 6)
    hidden = big[:, ::2, 3:3 + H]  # sB = 2T(H+6), sT = 2(H+6), unit stride on H
    assert hidden.stride(2) == 1 and not hidden.is_contiguous()
    w, b = torch.randn(K, H), torch.randn(K)
    mask = _mask("left", B, T)
    grad = torch.randn(B, K)
    got = _launch_all(hidden, w, b, mask, grad)
    _compare(got, _reference(hidden, w, b, mask, grad, attention_mask=mask), torch.float32, B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_rows(dtype):
    lengths = torch.tensor([5, 1, 37, 12])
    B, H, K = len(lengths), 70, 2
    N = int(lengths.sum())
    packed = torch.randn(N, H).to(dtype)
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    index = cu[1:] - 1  # global rows
    w, b = torch.randn(K, H), torch.randn(K)
    grad = torch.randn(B, K)
    got = _launch_all(packed, w, b, index, grad, packed_rows=B)
    _compare(got, _reference(packed, w, b, None, grad, cu_seqlens=cu), dtype, B)


def test_rows_without_valid_token_nan_and_no_gradient():
    B, T, H, K = 4, 19, 33, 2
    hidden, w, b = torch.randn(B, T, H), torch.randn(K, H), torch.randn(K)
    mask = _mask("holes", B, T)
    mask[1] = False
    mask[3] = False
    grad = torch.randn(B, K)
    got = _launch_all(hidden, w, b, mask, grad)
    assert got["index"][1] == -1 and got["index"][3] == -1
    assert torch.isnan(got["rewards"][[1, 3]]).all() and not torch.isnan(got["rewards"][[0, 2]]).any()
    assert (got["grad_hidden"][[1, 3]] == 0).all()
    ok = mask.any(1)
    want = _reference(hidden[ok], w, b, mask[ok], grad[ok], attention_mask=mask[ok])
    assert_close(got["rewards"][ok], want["rewards"], rtol=2e-5, atol=2e-5, name="valid rows")
    assert_close(got["grad_weight"], want["grad_weight"], rtol=2e-5, atol=2e-5, name="grad_weight")
    assert_close(got["grad_bias"], want["grad_bias"], rtol=2e-5, atol=2e-5, name="grad_bias")


@pytest.mark.parametrize("need", [(True, False, True), (False, True, False), (False, False, False)])
def test_backward_null_outputs(need):
    B, T, H, K = 2, 9, 300, 3
    hidden, w, b = torch.randn(B, T, H), torch.randn(K, H), torch.randn(K)
    mask, grad = _mask("right", B, T), torch.randn(B, K)
    got = _launch_all(hidden, w, b, mask, grad, need=need)
    want = _reference(hidden, w, b, mask, grad, attention_mask=mask)
    for name, n in zip(("grad_hidden", "grad_weight", "grad_bias"), need):
        assert (name in got) == n
        if n:
            assert_close(got[name], want[name], rtol=2e-5, atol=2e-5, name=name)


def test_empty_batch_and_empty_time():
    # B = 0: every launcher returns without a launch (a 0-block grid is a CUDA error)
    prog = Program()
    w, g = prog.inp(torch.randn(2, 8)), prog.inp(torch.randn(0, 2))
    idx = prog.out((0,), torch.int64)
    prog.call("rmk_last_token_index", prog.inp(torch.ones(0, 5, dtype=torch.bool)), 1, 0, 5, 5, 1, idx)
    rew = prog.out((0, 2), torch.float32)
    h = prog.inp(torch.randn(0, 5, 8))
    prog.call("rmk_last_token_reward_fwd", 0, h, w, None, idx, rew, 0, 5, 8, 2, 40, 8)
    prog.call("rmk_last_token_reward_bwd_hidden", 0, g, w, idx, prog.out((0, 5, 8), torch.float32), 0, 5, 8, 2, 40, 8)
    gw, gb = prog.out((2, 8), torch.float32), prog.out((2,), torch.float32)
    prog.call("rmk_last_token_reward_bwd_params", 0, g, h, idx, gw, gb, 0, 5, 8, 2, 40, 8)
    res = prog.run()
    assert res.rcs == [0, 0, 0, 0]
    assert (res[gw] == 0).all() and (res[gb] == 0).all()  # sums over no rows
    # T = 0: index -1 everywhere, NaN rewards, zero parameter gradients
    B, H, K = 3, 8, 2
    prog = Program()
    idx = prog.out((B,), torch.int64, fill=0x5A)
    prog.call("rmk_last_token_index", prog.inp(torch.ones(B, 0, dtype=torch.bool)), 1, B, 0, 0, 1, idx)
    rew = prog.out((B, K), torch.float32)
    h, w = prog.inp(torch.randn(B, 0, H)), prog.inp(torch.randn(K, H))
    prog.call("rmk_last_token_reward_fwd", 0, h, w, None, idx, rew, B, 0, H, K, 0, H)
    gw = prog.out((K, H), torch.float32)
    prog.call("rmk_last_token_reward_bwd_params", 0, prog.inp(torch.randn(B, K)), h, idx, gw, None, B, 0, H, K, 0, H)
    res = prog.run()
    assert res.rcs == [0, 0, 0]
    assert (res[idx] == -1).all() and torch.isnan(res[rew]).all() and (res[gw] == 0).all()


def test_bad_arguments_return_errors():
    prog = Program()
    idx = prog.out((2,), torch.int64)
    prog.call("rmk_last_token_index", prog.inp(torch.ones(2, 3, dtype=torch.bool)), 3, 2, 3, 3, 1, idx)
    prog.call("rmk_last_token_reward_fwd", 7, None, None, None, None, None, 2, 3, 4, 1, 12, 4)
    assert prog.run().rcs == [1, 1]  # cudaErrorInvalidValue: mask width 3, dtype code 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_race_free_under_thread_sanitizer(dtype):
    """The block reductions and the per-thread writes are ordered by the kernels' barriers."""
    B, T, H, K = 2, 300, 520, 2
    hidden = torch.randn(B, T, H).to(dtype)
    w, b = torch.randn(K, H), torch.randn(K)
    mask, grad = _mask("holes", B, T), torch.randn(B, K)
    got = _launch_all(hidden, w, b, mask, grad, variant="tsan")
    _compare(got, _reference(hidden, w, b, mask, grad, attention_mask=mask), dtype, B)
