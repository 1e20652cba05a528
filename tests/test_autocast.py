"""The ops under torch.autocast: the same dtype and the same numbers as outside it, on every backend
(an op computes in float32 for float32 inputs whatever the autocast region; the reference's
matmuls used to run in autocast's dtype and return bf16 log-probs, 7.5e-2 off), through the
public functions (the eager fast path) and through torch.ops.rmkernels, forward and backward."""
import pytest
import torch
from utils import backend_params, skip_unless_available

import rmkernels as rmk

AUTOCAST = [torch.bfloat16, torch.float16]


def _cases(device):
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 4, 9, 16, 37
    hidden = torch.randn(B, T, H, generator=g).to(device)
    w_head, b_head = torch.randn(1, H, generator=g).to(device), torch.randn(1, generator=g).to(device)
    w_lm = torch.randn(V, H, generator=g).to(device)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1, 6:] = 0
    return {
        "token_logprobs": (lambda h, w, be: rmk.token_logprobs(h, w, targets, return_entropy=True, backend=be),
                           (hidden, w_lm)),
        "last_token_reward": (lambda h, w, be: rmk.last_token_reward(h, w, b_head, attention_mask=mask, backend=be),
                              (hidden, w_head)),
        "pairwise_reward_loss": (lambda h, w, be: rmk.pairwise_reward_loss(h, w, b_head, attention_mask=mask,
                                                                           backend=be), (hidden, w_head)),
    }


def _run(fn, leaves, backend):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves, backend)
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
    return outs, torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
def test_autocast_changes_nothing(backend, device, dtype):
    skip_unless_available(backend, device)
    for name, (fn, leaves) in _cases(device).items():
        want, want_grads = _run(fn, leaves, backend)
        with torch.autocast(device, dtype=dtype):
            got, got_grads = _run(fn, leaves, backend)
        for g, w in zip(got + got_grads, want + want_grads):
            assert g.dtype == w.dtype == torch.float32, (name, g.dtype, w.dtype)
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{name} {backend} under autocast {dtype}")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_autocast_direct_op(backend, device):
    skip_unless_available(backend, device)
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(11, 16, generator=g).to(device), torch.randn(29, 16, generator=g).to(device)
    targets = torch.randint(0, 29, (11,), generator=g).to(device)
    args = (hidden, weight, None, targets, 1.0, -100, backend)
    want = torch.ops.rmkernels.token_logprobs(*args)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = torch.ops.rmkernels.token_logprobs(*args)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
