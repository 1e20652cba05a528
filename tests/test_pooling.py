"""Last-token value-head pooling (docs/ops.md): every backend against the reference."""

import pytest
import torch
from utils import TRITON_INTERPRET, assert_close, assert_close_vs_lowp, backend_params, skip_unless_available, tolerance

import rmkernels as rmk
from rmkernels.ops import pooling

LOWP = (torch.bfloat16, torch.float16)


def _dtypes(backend, device):
    # numpy (the Triton interpreter's engine) has no bfloat16: the interpreter runs fp32 and fp16.
    if backend == "triton" and device == "cpu":
        return (torch.float32, torch.float16)
    return (torch.float32, torch.bfloat16, torch.float16)


def _shapes():
    # ragged sizes; the interpreter is slow, so it gets the small half
    if TRITON_INTERPRET:
        return [(3, 1, 59, 1), (5, 7, 256, 3), (2, 97, 59, 1)]
    return [(3, 1, 59, 1), (5, 7, 256, 3), (4, 97, 59, 1), (2, 1025, 256, 2), (3, 97, 4096, 1), (1, 7, 4096, 2)]


def _mask(kind, B, T, device):
    """attention masks of every layout: each row keeps at least one valid token."""
    lengths = torch.randint(1, T + 1, (B,), device=device)
    pos = torch.arange(T, device=device)
    if kind == "right":
        m = pos[None, :] < lengths[:, None]
    elif kind == "left":
        m = pos[None, :] >= (T - lengths)[:, None]
    else:  # holes: random zeros inside (multi-turn / tool tokens), pad == eos style tails
        m = torch.rand(B, T, device=device) > 0.4
        m[torch.arange(B), torch.randint(0, T, (B,), device=device)] = True
    return m.to(torch.int64)


def _head(K, H, device, bias=True):
    w = torch.randn(K, H, device=device) / H**0.5
    b = torch.randn(K, device=device) if bias else None
    return w, b


def _run(backend, hidden, w, b, g_out=None, **pos):
    h = hidden.detach().clone().requires_grad_(True)
    wt = w.detach().clone().requires_grad_(True)
    bt = b.detach().clone().requires_grad_(True) if b is not None else None
    r = rmk.last_token_reward(h, wt, bt, backend=backend, **pos)
    g_out = torch.randn_like(r) if g_out is None else g_out
    grads = torch.autograd.grad(r, [t for t in (h, wt, bt) if t is not None], g_out)
    return r, grads, g_out


def _hf_path(hidden, w, b, index):
    """The HF way: the head on every token, then the gather (independent of the kernels)."""
    scores = hidden.double() @ w.double().t() + (b.double() if b is not None else 0)
    return scores[torch.arange(hidden.shape[0]), index]


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("mask_kind", ["right", "left", "holes"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_vs_reference(backend, device, mask_kind, bias):
    skip_unless_available(backend, device)
    for B, T, H, K in _shapes():
        for dtype in _dtypes(backend, device):
            hidden = torch.randn(B, T, H, device=device).to(dtype)
            w, b = _head(K, H, device, bias)
            mask = _mask(mask_kind, B, T, device)
            r, grads, g_out = _run(backend, hidden, w, b, attention_mask=mask)
            assert r.dtype == torch.float32 and r.shape == (B, K)
            # ground truth: fp64 head on every token, gathered at the rightmost valid token
            index = torch.where(mask != 0, torch.arange(T, device=device), -1).amax(1)
            expected = _hf_path(hidden, w, b, index)
            ref_r, ref_grads, _ = _run("reference", hidden.double(), w.double(), b.double() if bias else None,
                                       attention_mask=mask)
            assert_close(ref_r, expected, rtol=1e-12, atol=1e-12, name="reference vs head-on-every-token")
            # gradients against the fp64 reference with the same upstream gradient
            h64 = hidden.double().requires_grad_(True)
            w64 = w.double().requires_grad_(True)
            b64 = b.double().requires_grad_(True) if bias else None
            r64 = rmk.last_token_reward(h64, w64, b64, attention_mask=mask, backend="reference")
            ref_grads = torch.autograd.grad(r64, [t for t in (h64, w64, b64) if t is not None], g_out.double())
            names = ["rewards", "grad_hidden", "grad_weight", "grad_bias"]
            if dtype in LOWP:
                # STYLE.md's rule: at most 2x plain PyTorch's error at the same precision
                lowp = (hidden @ w.to(dtype).t()).float()[torch.arange(B), index] + (b if bias else 0)
                assert_close_vs_lowp(r, expected, lowp, name=f"rewards {dtype}", floor=1e-4)
                gh_lowp = torch.zeros_like(hidden)
                gh_lowp[torch.arange(B), index] = (g_out.to(dtype) @ w.to(dtype))
                assert_close_vs_lowp(grads[0], ref_grads[0], gh_lowp, name=f"grad_hidden {dtype}", floor=1e-4)
                rtol, atol = tolerance(dtype)
                for n, a, e in zip(names[2:], grads[1:], ref_grads[1:]):
                    assert_close(a, e, rtol=rtol, atol=atol * max(1.0, B ** 0.5), name=f"{n} {dtype}")
            else:
                assert_close(r, expected, rtol=2e-5, atol=2e-5, name="rewards")
                for n, a, e in zip(names[1:], grads, ref_grads):
                    assert_close(a, e, rtol=2e-5, atol=2e-5, name=n)
            assert grads[0].dtype == dtype and grads[1].dtype == w.dtype


GRAD_SUBSETS = [("hidden",), ("weight",), ("bias",), ("weight", "bias"), ("hidden", "bias")]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("wanted", GRAD_SUBSETS, ids="+".join)
def test_backward_of_some_inputs_vs_reference(backend, device, wanted):
    """Only some inputs require grad (a frozen backbone training its value head alone, a frozen
    head): the backward kernel is asked for those alone (need_hidden / need_weight / need_bias)
    and must give the same gradients as the fp64 reference asked for all of them."""
    skip_unless_available(backend, device)
    for B, T, H, K in _shapes()[:4]:
        hidden = torch.randn(B, T, H, device=device)
        w, b = _head(K, H, device)
        mask = _mask("holes", B, T, device)
        g_out = torch.randn(B, K, device=device)
        inputs = {"hidden": hidden.clone().requires_grad_("hidden" in wanted),
                  "weight": w.clone().requires_grad_("weight" in wanted),
                  "bias": b.clone().requires_grad_("bias" in wanted)}
        r = rmk.last_token_reward(inputs["hidden"], inputs["weight"], inputs["bias"], attention_mask=mask,
                                  backend=backend)
        grads = torch.autograd.grad(r, [inputs[n] for n in wanted], g_out)
        _, ref_grads, _ = _run("reference", hidden.double(), w.double(), b.double(), g_out.double(),
                               attention_mask=mask)
        ref = dict(zip(("hidden", "weight", "bias"), ref_grads))
        for n, g in zip(wanted, grads):
            assert_close(g, ref[n], rtol=2e-5, atol=2e-5, name=f"grad_{n} with only {wanted} requiring grad")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_lengths_and_packed(backend, device):
    skip_unless_available(backend, device)
    B, T, H, K = 6, 33, 59, 2
    hidden = torch.randn(B, T, H, device=device)
    w, b = _head(K, H, device)
    lengths = torch.randint(1, T + 1, (B,), device=device, dtype=torch.int32)
    r, grads, g_out = _run(backend, hidden, w, b, lengths=lengths)
    mask = torch.arange(T, device=device)[None] < lengths[:, None].long()
    r_mask, grads_mask, _ = _run("reference", hidden, w, b, g_out, attention_mask=mask)
    for n, a, e in zip(["grad_hidden", "grad_weight", "grad_bias"], grads, grads_mask):
        assert_close(a, e, rtol=2e-5, atol=2e-5, name=f"lengths vs mask {n}")
    assert_close(r, r_mask, rtol=2e-5, atol=2e-5, name="lengths vs mask")
    # packed: the same sequences concatenated without padding
    for cu_dtype in (torch.int32, torch.int64):
        packed = torch.cat([hidden[i, : lengths[i]] for i in range(B)])
        cu = torch.zeros(B + 1, dtype=cu_dtype, device=device)
        cu[1:] = torch.cumsum(lengths, 0)
        p = packed.detach().clone().requires_grad_(True)
        wt, bt = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        rp = rmk.last_token_reward(p, wt, bt, cu_seqlens=cu, backend=backend)
        assert_close(rp, r_mask, rtol=2e-5, atol=2e-5, name="packed vs padded")
        gp = torch.autograd.grad(rp, (p, wt, bt), g_out)
        gh_padded = torch.cat([grads[0][i, : lengths[i]] for i in range(B)])
        assert_close(gp[0], gh_padded, rtol=2e-5, atol=2e-5, name="packed grad_hidden")
        assert_close(gp[1], grads[1], rtol=2e-5, atol=2e-5, name="packed grad_weight")
        assert_close(gp[2], grads[2], rtol=2e-5, atol=2e-5, name="packed grad_bias")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_strided_hidden_no_copy_and_grad_layout(backend, device):
    skip_unless_available(backend, device)
    B, T, H, K = 4, 19, 64, 1
    w, b = _head(K, H, device)
    mask = _mask("holes", B, T, device)
    base = torch.randn(T, B, H + 8, device=device)
    # a slice of a wider buffer (not dense) and a dense [T, B, H] buffer seen as [B, T, H]
    for hidden in (base[:, :, :H].transpose(0, 1), torch.randn(T, B, H, device=device).transpose(0, 1)):
        assert not hidden.is_contiguous() and hidden.stride(-1) == 1
        assert pooling.check_head(hidden, w, b) is hidden  # no copy
        r, grads, g_out = _run(backend, hidden, w, b, attention_mask=mask)
        r_ref, grads_ref, _ = _run("reference", hidden.contiguous(), w, b, g_out, attention_mask=mask)
        assert_close(r, r_ref, rtol=2e-5, atol=2e-5, name="strided rewards")
        assert_close(grads[0], grads_ref[0], rtol=2e-5, atol=2e-5, name="strided grad_hidden")
        assert grads[0].shape == hidden.shape and grads[0].dtype == hidden.dtype
    # a dense permuted layout keeps its strides in grad_hidden
    dense = torch.randn(T, B, H, device=device).transpose(0, 1)
    _, grads, _ = _run(backend, dense, w, b, attention_mask=mask)
    assert grads[0].stride() == dense.stride()


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_no_valid_token_gives_nan_and_no_gradient(backend, device):
    """Rows with index -1 (no valid token) at the op level: NaN rewards, nothing read,
    zero gradients, other rows untouched."""
    skip_unless_available(backend, device)
    B, T, H, K = 5, 9, 33, 2
    hidden = torch.randn(B, T, H, device=device, requires_grad=True)
    w = torch.randn(K, H, device=device, requires_grad=True)
    b = torch.randn(K, device=device, requires_grad=True)
    index = torch.tensor([3, -1, 8, -1, 0], device=device)
    r = torch.ops.rmkernels.last_token_reward(hidden, w, b, index, backend)
    assert torch.isnan(r[[1, 3]]).all() and torch.isfinite(r[[0, 2, 4]]).all()
    r_ref = torch.ops.rmkernels.last_token_reward(hidden, w, b, index, "reference")
    assert_close(r, r_ref, rtol=2e-5, atol=2e-5)
    g = torch.randn(B, K, device=device)
    gh, gw, gb = torch.autograd.grad(r, (hidden, w, b), g)
    assert gh[[1, 3]].abs().sum() == 0
    valid = torch.tensor([0, 2, 4], device=device)
    assert_close(gw, g[valid].t() @ hidden[valid, index[valid]].detach(), rtol=2e-5, atol=2e-5, name="grad_weight")
    assert_close(gb, g[valid].sum(0), rtol=2e-5, atol=2e-5, name="grad_bias")


def test_no_valid_token_raises_on_cpu_naming_rows():
    hidden, (w, b) = torch.randn(4, 6, 8), _head(1, 8, "cpu")
    mask = torch.ones(4, 6, dtype=torch.int64)
    mask[1] = 0
    mask[3] = 0
    with pytest.raises(ValueError, match=r"attention_mask: rows 1, 3 have no valid token"):
        rmk.last_token_reward(hidden, w, b, attention_mask=mask)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 6\]: rows 0, 2 have 0, 7"):
        rmk.last_token_reward(hidden, w, b, lengths=torch.tensor([0, 3, 7, 6]))
    packed = torch.randn(10, 8)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        rmk.last_token_reward(packed, w, b, cu_seqlens=torch.tensor([1, 5, 10]))
    with pytest.raises(ValueError, match=r"cu_seqlens must end at N = 10"):
        rmk.last_token_reward(packed, w, b, cu_seqlens=torch.tensor([0, 5, 9]))
    with pytest.raises(ValueError, match=r"non-decreasing: rows 1 end before"):
        rmk.last_token_reward(packed, w, b, cu_seqlens=torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match=r"cu_seqlens: rows 1 have no valid token"):
        rmk.last_token_reward(packed, w, b, cu_seqlens=torch.tensor([0, 5, 5, 10]))


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_last_token_index(backend, device):
    skip_unless_available(backend, device)
    B, T = 7, 23
    for kind in ("right", "left", "holes"):
        mask = _mask(kind, B, T, device)
        expected = torch.tensor([max(i for i in range(T) if mask[b, i]) for b in range(B)], device=device)
        for m in (mask, mask.bool(), mask.to(torch.int32), mask.to(torch.uint8), mask.float()):
            assert torch.equal(rmk.last_token_index(m, backend=backend), expected)
        # strided mask
        wide = torch.zeros(B, 2 * T, dtype=torch.int64, device=device)
        wide[:, ::2] = mask
        assert torch.equal(rmk.last_token_index(wide[:, ::2], backend=backend), expected)
    # HF's pad-id rule: rightmost non-pad token, pad == eos included
    pad = 0
    ids = torch.randint(1, 50, (B, T), device=device)
    ids[:, -3:] = pad
    ids[0, 5] = pad  # a pad inside the sequence does not matter
    hf = (torch.arange(T, device=device) * (ids != pad)).argmax(-1)
    assert torch.equal(rmk.last_token_index(input_ids=ids, pad_token_id=pad, backend=backend), hf)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_negative_mask_values_are_valid_tokens(backend, device):
    """"Non-zero" is the rule (docs/ops.md section 1): a negative mask value marks a valid token
    in integer and float masks, on every backend, for the index and the pooled reward (a
    mutation to "> 0" in the reference's index or the float-mask path passed before)."""
    skip_unless_available(backend, device)
    mask = torch.tensor([[1, 1, -1, 0], [0, -2, 0, 0], [1, 0, 0, 0]], device=device)
    want = torch.tensor([2, 1, 0], device=device)
    for m in (mask, mask.to(torch.int32), mask.to(torch.int8), mask.float(), mask.double()):
        assert torch.equal(rmk.last_token_index(m, backend=backend), want), m.dtype
    hidden = torch.randn(3, 4, 5, device=device)
    w = torch.randn(1, 5, device=device)
    for m in (mask, mask.float()):
        got = rmk.last_token_reward(hidden, w, attention_mask=m, backend=backend)
        exp = hidden[torch.arange(3), want] @ w.t()
        assert_close(got.reshape(-1), exp.reshape(-1), rtol=1e-5, atol=1e-5, name=f"reward, {m.dtype} mask")


def test_last_token_index_lengths_cu_seqlens():
    assert rmk.last_token_index(lengths=torch.tensor([3, 1, 5])).tolist() == [2, 0, 4]
    assert rmk.last_token_index(cu_seqlens=torch.tensor([0, 3, 4, 9], dtype=torch.int32)).tolist() == [2, 3, 8]
    with pytest.raises(ValueError, match="give exactly one of"):
        rmk.last_token_index(torch.ones(2, 3), lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="pad_token_id"):
        rmk.last_token_index(input_ids=torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend):
    skip_unless_available(backend, "cpu")
    B, T, H, K = 3, 5, 7, 2
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(K, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(K, dtype=torch.float64, requires_grad=True)
    mask = _mask("holes", B, T, "cpu")
    assert torch.autograd.gradcheck(
        lambda h, w, b: rmk.last_token_reward(h, w, b, attention_mask=mask, backend=backend), (hidden, w, b))
    packed = torch.randn(9, H, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4, 5, 9])
    assert torch.autograd.gradcheck(
        lambda h, w: rmk.last_token_reward(h, w, cu_seqlens=cu, backend=backend), (packed, w))


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_opcheck(backend, device):
    skip_unless_available(backend, device)
    B, T, H, K = 4, 9, 40, 2
    hidden = torch.randn(B, T, H, device=device, requires_grad=True)
    w = torch.randn(K, H, device=device, requires_grad=True)
    b = torch.randn(K, device=device, requires_grad=True)
    mask = _mask("holes", B, T, device)
    index = rmk.last_token_index(mask)
    ops = torch.ops.rmkernels
    torch.library.opcheck(ops.last_token_index.default, (mask, backend))
    torch.library.opcheck(ops.last_token_reward.default, (hidden, w, b, index, backend))
    torch.library.opcheck(ops.last_token_reward.default, (hidden, w, None, index, backend))
    torch.library.opcheck(ops.last_token_reward.default,
                          (hidden.reshape(-1, H), w, b, index + T * torch.arange(B, device=device), backend))
    g = torch.randn(B, K, device=device)
    for needs in [(True, True, True), (False, True, False), (True, False, False)]:
        torch.library.opcheck(ops.last_token_reward_backward.default,
                              (g, hidden.detach(), w.detach(), index, *needs, backend))
    if backend in ("cpu", "cuda"):
        w32 = w.detach().float().contiguous()
        torch.library.opcheck(ops.last_token_index_kernel.default, (mask,))
        torch.library.opcheck(ops.last_token_reward_fwd_kernel.default, (hidden.detach(), w32, b.detach(), index))
        torch.library.opcheck(ops.last_token_reward_bwd_kernel.default,
                              (g, hidden.detach(), w32, index, True, True, True))


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_torch_compile_fullgraph(backend, device):
    skip_unless_available(backend, device)
    torch._dynamo.reset()
    B, T, H, K = 3, 11, 32, 1
    hidden = torch.randn(B, T, H, device=device, requires_grad=True)
    w = torch.randn(K, H, device=device, requires_grad=True)
    mask = _mask("left", B, T, device)
    lengths = torch.randint(1, T + 1, (B,), device=device)

    def f(h, w, m, n):
        return (rmk.last_token_reward(h, w, attention_mask=m, backend=backend).sum()
                + rmk.last_token_reward(h, w, lengths=n, backend=backend).sum())

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if TRITON_INTERPRET else "inductor")
    out = compiled(hidden, w, mask, lengths)
    gh, gw = torch.autograd.grad(out, (hidden, w))
    out_e = f(hidden, w, mask, lengths)
    gh_e, gw_e = torch.autograd.grad(out_e, (hidden, w))
    assert_close(out, out_e, rtol=1e-5, atol=1e-5)
    assert_close(gh, gh_e, rtol=1e-5, atol=1e-5)
    assert_close(gw, gw_e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_empty_batch_and_empty_time(backend, device):
    """B = 0 gives [0, K] and zero head gradients; T = 0 (every row empty by shape) gives NaN
    rewards, an empty grad_hidden and zero head gradients (the NaN rows pick no token)."""
    skip_unless_available(backend, device)
    w, b = (t.detach().requires_grad_(True) for t in _head(2, 8, device))
    r = rmk.last_token_reward(torch.randn(0, 5, 8, device=device), w, b,
                              attention_mask=torch.zeros(0, 5, dtype=torch.long, device=device), backend=backend)
    assert r.shape == (0, 2)
    gw, gb = torch.autograd.grad(r.sum(), (w, b))
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))
    r = rmk.last_token_reward(torch.randn(0, 8, device=device), w, b,
                              cu_seqlens=torch.zeros(1, dtype=torch.long, device=device), backend=backend)
    assert r.shape == (0, 2)
    h = torch.randn(3, 0, 8, device=device, requires_grad=True)
    r = rmk.last_token_reward(h, w, b, attention_mask=torch.zeros(3, 0, dtype=torch.long, device=device),
                              backend=backend)
    assert r.shape == (3, 2) and torch.isnan(r).all()
    gh, gw = torch.autograd.grad(r.sum(), (h, w))
    assert gh.shape == (3, 0, 8) and torch.equal(gw, torch.zeros_like(w))
    assert rmk.last_token_index(torch.zeros(0, 4, device=device), backend=backend).shape == (0,)


@pytest.mark.parametrize("call,exc,match", [
    (lambda h, w, b, m: rmk.last_token_reward(h[0, 0], w, b, attention_mask=m),
     ValueError, r"hidden_states must be 2-D or 3-D"),
    (lambda h, w, b, m: rmk.last_token_reward(h.long(), w, b, attention_mask=m),
     TypeError, r"hidden_states must have dtype"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w[:, :-1], b, attention_mask=m),
     ValueError, r"weight must be \[K, H\] with H = 16"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w[0], b, attention_mask=m), ValueError, r"weight must be 2-D"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b[:1], attention_mask=m),
     ValueError, r"bias must be \[K\] = \[2\]"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b, attention_mask=m[:, :-1]),
     ValueError, r"attention_mask must have shape \[B, T\] = \[3, 5\]"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b, attention_mask=m[0]), ValueError, r"attention_mask must be 2-D"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b, lengths=torch.ones(3)), TypeError, r"lengths must have dtype"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b, lengths=torch.ones(4, dtype=torch.long)),
     ValueError, r"lengths must have shape \[B\] = \[3\]"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b, attention_mask=m, lengths=torch.ones(3, dtype=torch.long)),
     ValueError, r"give exactly one of"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b), ValueError, r"got none"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b, cu_seqlens=torch.tensor([0, 5])),
     ValueError, r"cu_seqlens goes with packed"),
    (lambda h, w, b, m: rmk.last_token_reward(h[0], w, b, attention_mask=m),
     ValueError, r"packed hidden_states \[N, H\] needs cu_seqlens"),
    (lambda h, w, b, m: rmk.last_token_reward(h[0], w, b, cu_seqlens=torch.tensor([0, 2, 5.0])),
     TypeError, r"cu_seqlens must have dtype"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w.to("meta"), b, attention_mask=m), ValueError, r"weight is on meta"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b, attention_mask=m.to("meta")),
     ValueError, r"attention_mask is on meta"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b, attention_mask=m, backend="fast"),
     ValueError, r"backend must be one of"),
    (lambda h, w, b, m: rmk.last_token_reward(h, w, b, attention_mask=m, backend="cuda"),
     RuntimeError, r"'cuda' is not available for cpu tensors.*Available: cpu, reference"),
    (lambda h, w, b, m: rmk.last_token_reward(h, "w", b, attention_mask=m),
     TypeError, r"weight must be a torch.Tensor"),
])
def test_bad_input(call, exc, match):
    h = torch.randn(3, 5, 16)
    w, b = _head(2, 16, "cpu")
    m = torch.ones(3, 5, dtype=torch.long)
    with pytest.raises(exc, match=match):
        call(h, w, b, m)


def test_backend_selection(monkeypatch):
    h, (w, b) = torch.randn(2, 3, 8), _head(1, 8, "cpu")
    m = torch.ones(2, 3)
    from rmkernels import _backend

    assert _backend.resolve(None, h.device) == "cpu"  # auto on CPU: the C++ kernels
    assert _backend.resolve("auto", h.device) == "cpu"
    with rmk.use_backend("reference"):
        assert _backend.resolve(None, h.device) == "reference"
        assert _backend.resolve("auto", h.device) == "reference"  # "auto" is None: the default
        assert _backend.resolve("cpu", h.device) == "cpu"  # an explicit argument wins
    monkeypatch.setenv("RMKERNELS_BACKEND", "reference")
    assert _backend.resolve(None, h.device) == "reference"
    assert _backend.resolve("auto", h.device) == "reference"
    monkeypatch.setenv("RMKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="RMKERNELS_BACKEND"):
        rmk.last_token_reward(h, w, b, attention_mask=m)
    monkeypatch.delenv("RMKERNELS_BACKEND")
    with pytest.raises(ValueError, match="use_backend"):
        with rmk.use_backend("gpu"):
            pass
    assert "reference" in rmk.available_backends("cpu")


def test_checks_mode_toggle():
    from rmkernels import _checks

    dev = torch.device("cuda")  # only the flag logic: no tensor is made
    assert not _checks.data_checks_enabled(dev)
    with rmk.checks(True):
        assert _checks.data_checks_enabled(dev)
        with rmk.checks(False):
            assert not _checks.data_checks_enabled(dev)
        assert _checks.data_checks_enabled(dev)
    assert not _checks.data_checks_enabled(dev)
    assert _checks.data_checks_enabled(torch.device("cpu"))  # always for CPU tensors


def test_module_matches_linear_state_dict():
    lin = torch.nn.Linear(16, 3, bias=True)
    head = rmk.LastTokenRewardHead(16, num_labels=3, bias=True)
    head.load_state_dict(lin.state_dict())
    h = torch.randn(4, 6, 16)
    m = _mask("left", 4, 6, "cpu")
    idx = rmk.last_token_index(m)
    assert_close(head(h, attention_mask=m), lin(h)[torch.arange(4), idx], rtol=1e-5, atol=1e-5)
    assert "num_labels=3" in repr(head)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_no_valid_token_nan_without_checks_and_raise_with():
    h, w = torch.randn(3, 4, 8, device="cuda"), torch.randn(1, 8, device="cuda")
    m = torch.ones(3, 4, device="cuda", dtype=torch.long)
    m[2] = 0
    r = rmk.last_token_reward(h, w, attention_mask=m)
    assert torch.isnan(r[2]).all() and torch.isfinite(r[:2]).all()
    with rmk.checks(True), pytest.raises(ValueError, match="rows 2 have no valid token"):
        rmk.last_token_reward(h, w, attention_mask=m)
    r = rmk.last_token_reward(h, w, lengths=torch.tensor([4, 9, 0], device="cuda"))  # out of range: NaN, no read
    assert torch.isnan(r[1:]).all() and torch.isfinite(r[0]).all()


@pytest.mark.parametrize("backend,device", backend_params())
def test_wide_head_tiles_k(backend, device):
    """K = 150 outputs (more than one K tile of the Triton grad_weight kernel, MAX_PARAM_BLOCK_K
    = 64; the forward's (b, k) pairs on a 1-D grid): forward and every gradient vs reference."""
    skip_unless_available(backend, device)
    B, T, H, K = 3, 5, 24, 150
    hidden = torch.randn(B, T, H, device=device)
    w, b = _head(K, H, device)
    lengths = torch.tensor([5, 1, 3], device=device)
    r, grads, g_out = _run(backend, hidden, w, b, lengths=lengths)
    r_ref, grads_ref, _ = _run("reference", hidden, w, b, g_out=g_out, lengths=lengths)
    assert_close(r, r_ref, rtol=2e-5, atol=2e-5, name="rewards")
    for name, g, g_ref in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, grads_ref):
        assert_close(g, g_ref, rtol=2e-5, atol=2e-5, name=name)
