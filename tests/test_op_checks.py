"""Checks that hold in every mode and on every call path (issue 12, items 3 and 4).

* Data checks (rows with no valid token, out-of-range lengths, malformed ``cu_seqlens``,
  out-of-range ``num_candidates``) raise for CPU tensors in eager mode and under
  ``torch.compile(fullgraph=True)`` alike: they run inside the ops (``rmkernels/ops/pooling.py``'s
  index ops, the ops' check hooks), not in the traced Python around them.
* A public op called directly (``torch.ops.rmkernels.<op>(..., backend)``) with inconsistent
  arguments raises a ``ValueError``/``TypeError`` naming the argument before any kernel runs,
  on every backend (the registry runs the op's check hook in the op body).
"""
import pytest
import torch
from utils import cpu_backend_params, skip_unless_available

import rmkernels as rmk

COMPILE_BACKENDS = ["eager", "aot_eager"]


def _compiled(fn, backend):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


def _pool_inputs():
    h, w = torch.randn(3, 6, 8), torch.randn(1, 8)
    mask = torch.ones(3, 6, dtype=torch.long)
    return h, w, mask


DATA_CASES = {
    "mask row with no token": (
        lambda h, w, m: rmk.last_token_reward(h, w, attention_mask=m * torch.tensor([[1], [0], [1]])),
        "attention_mask: rows 1 have no valid token"),
    "negative length": (
        lambda h, w, m: rmk.last_token_reward(h, w, lengths=torch.tensor([5, 6, -1])),
        r"lengths must be in \[1, 6\]: rows 2 have -1"),
    "length past T": (
        lambda h, w, m: rmk.last_token_reward(h, w, lengths=torch.tensor([5, 9, 1])),
        r"lengths must be in \[1, 6\]: rows 1 have 9"),
    "cu_seqlens not from 0": (
        lambda h, w, m: rmk.last_token_reward(h.reshape(18, 8)[:10], w, cu_seqlens=torch.tensor([2, 5, 3, 10])),
        "cu_seqlens must start at 0"),
    "cu_seqlens decreasing": (
        lambda h, w, m: rmk.last_token_reward(h.reshape(18, 8)[:10], w, cu_seqlens=torch.tensor([0, 5, 3, 10])),
        "cu_seqlens must be non-decreasing"),
    "cu_seqlens short of N": (
        lambda h, w, m: rmk.last_token_reward(h.reshape(18, 8)[:10], w, cu_seqlens=torch.tensor([0, 5, 7, 9])),
        "cu_seqlens must end at N = 10"),
    "pairwise mask row with no token": (
        lambda h, w, m: rmk.pairwise_reward_loss(h[:2], w, attention_mask=m[:2] * torch.tensor([[1], [0]])),
        "attention_mask: rows 1 have no valid token"),
    "last_token_index lengths": (
        lambda h, w, m: rmk.last_token_index(lengths=torch.tensor([0, 2])), r"lengths must be >= 1: rows 0 have 0"),
    "last_token_index input_ids": (
        lambda h, w, m: rmk.last_token_index(input_ids=torch.zeros(2, 4, dtype=torch.long), pad_token_id=0),
        "input_ids: rows 0, 1 have no valid token"),
    "ranking num_candidates": (
        lambda h, w, m: rmk.ranking_loss(h[:, :, 0], num_candidates=torch.tensor([2, 7, 3])),
        r"num_candidates must be in \[0, K = 6\]: rows 1 have 7"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
@pytest.mark.parametrize("mode", ["eager"] + COMPILE_BACKENDS)
def test_data_checks_in_every_mode(case, mode):
    fn, match = DATA_CASES[case]
    h, w, m = _pool_inputs()
    run = fn if mode == "eager" else _compiled(fn, mode)
    with pytest.raises(ValueError, match=match):
        run(h, w, m)


@pytest.mark.parametrize("mode", COMPILE_BACKENDS)
def test_compiled_valid_inputs_still_run(mode):
    """The checks do not reject good inputs under compile, and give eager's numbers."""
    h, w, m = _pool_inputs()
    m[0, 4:] = 0

    def fn(h, w, m):
        return (rmk.last_token_reward(h, w, attention_mask=m), rmk.last_token_reward(h, w, lengths=m.sum(1)),
                rmk.last_token_reward(h.reshape(18, 8), w, cu_seqlens=torch.tensor([0, 4, 10, 18])))

    for got, exp in zip(_compiled(fn, mode)(h, w, m), fn(h, w, m)):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("source", ["attention_mask", "lengths", "cu_seqlens"])
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_pooling_does_not_recompile_per_length(source, backend):
    """A new sequence length is a new value of a dynamic dimension, not a new graph: the index
    ops take the token count as a SymInt (an int in their schemas guarded T to each value, so a
    patched HF reward model compiled once per padded length and, past torch's recompile limit
    of 8, silently ran eagerly)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)

    def fn(h, w, m):
        if source == "attention_mask":
            return rmk.last_token_reward(h, w, attention_mask=m)
        if source == "lengths":
            return rmk.last_token_reward(h, w, lengths=m.sum(1))
        lens = m.sum(1)
        cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        return rmk.last_token_reward(h[m.bool()], w, cu_seqlens=cu)

    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for T in (5, 7, 9, 11, 13, 6):
        h, w = torch.randn(3, T, 8), torch.randn(1, 8)
        m = torch.ones(3, T, dtype=torch.long)
        m[0, T - 2:] = 0
        m[2, 1:] = 0
        if source == "cu_seqlens":  # every packed sequence ends at the last of its tokens
            m = torch.ones(3, T, dtype=torch.long)
        torch.testing.assert_close(compiled(h, w, m), fn(h, w, m), rtol=0, atol=0)
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 6 sequence lengths"


@pytest.mark.parametrize("source", ["attention_mask", "cu_seqlens"])
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_pairwise_loss_does_not_recompile_per_batch_size(source, backend):
    """A new batch size is not a new graph either (the odd-rows message was formatted before the
    check, which guarded the row count to its value: a compilation per batch size)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)

    def fn(h, w, m):
        if source == "attention_mask":
            return rmk.pairwise_reward_loss(h, w, attention_mask=m, label_smoothing=0.1)
        lens = m.sum(1)
        cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        return rmk.pairwise_reward_loss(h.reshape(-1, h.shape[-1]), w, cu_seqlens=cu, label_smoothing=0.1)

    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for B in (2, 3, 4, 6, 5, 7):
        h, w = torch.randn(2 * B, 6, 8), torch.randn(1, 8)
        m = torch.ones(2 * B, 6, dtype=torch.long)
        if source == "attention_mask":
            m[0, 3:] = 0
        for got, want in zip(compiled(h, w, m), fn(h, w, m)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 6 batch sizes"


def _bool_mask(b, t):
    return torch.ones(b, t, dtype=torch.bool)


# public op -> (inputs of size n, the call): n runs over 5 values; under compile the varying
# dimension must stay dynamic (a guard on its value would compile a graph per size).
SIZE_CASES = {
    "token_logprobs N": (lambda n: (torch.randn(n, 8), torch.randn(11, 8), torch.randint(0, 11, (n,))),
                         lambda h, w, t: rmk.token_logprobs(h, w, t, return_entropy=True)),
    "token_logprobs V": (lambda n: (torch.randn(6, 8), torch.randn(n, 8), torch.randint(0, 3, (6,))),
                         lambda h, w, t: rmk.token_logprobs(h, w, t)),
    "bradley_terry_loss B": (lambda n: (torch.randn(n), torch.randn(n), torch.rand(n)),
                             lambda c, r, m: rmk.bradley_terry_loss(c, r, margin=m)),
    "ranking_loss B": (lambda n: (torch.randn(n, 4),), lambda r: rmk.ranking_loss(r)),
    "ranking_loss K": (lambda n: (torch.randn(3, n),), lambda r: rmk.ranking_loss(r)),
    "group_advantages B": (lambda n: (torch.randn(4 * n), torch.arange(n).repeat_interleave(4), torch.ones(4 * n, 6)),
                           lambda s, g, m: rmk.group_advantages(s, g, m, estimator="rloo").advantages),
    "group_advantages T": (lambda n: (torch.randn(8), torch.arange(2).repeat_interleave(4), torch.ones(8, n)),
                           lambda s, g, m: rmk.group_advantages(s, g, m).advantages),
    "ppo_advantages T": (lambda n: (torch.randn(4, n), torch.randn(4, n), torch.randn(4, n), torch.randn(4),
                                    _bool_mask(4, n)),
                         lambda lp, ref, v, sc, m: rmk.ppo_advantages(lp, ref, v, sc, m, kl_coef=0.1)[0]),
    "ppo_advantages B": (lambda n: (torch.randn(n, 5), torch.randn(n, 5), torch.randn(n, 5), torch.randn(n),
                                    _bool_mask(n, 5)),
                         lambda lp, ref, v, sc, m: rmk.ppo_advantages(lp, ref, v, sc, m, kl_coef=0.1)[0]),
    "gae T": (lambda n: (torch.randn(4, n), torch.randn(4, n), _bool_mask(4, n)), lambda r, v, m: rmk.gae(r, v, m)[0]),
    "kl_estimate T": (lambda n: (torch.randn(4, n), torch.randn(4, n), _bool_mask(4, n)),
                      lambda a, b, m: rmk.kl_estimate(a, b, m, estimator="k3")),
    "masked_whiten T": (lambda n: (torch.randn(4, n), _bool_mask(4, n)), lambda x, m: rmk.masked_whiten(x, m)),
    "reinforce_pp_advantages T": (lambda n: (torch.randn(4, n), torch.ones(4, n)),
                                  lambda r, m: rmk.reinforce_pp_advantages(r, m).advantages),
    "remax_advantages T": (lambda n: (torch.randn(4, n), torch.randn(4), torch.ones(4, n)),
                           lambda r, b, m: rmk.remax_advantages(r, b, m).advantages),
    "last_token_index input_ids T": (lambda n: (torch.randint(1, 5, (4, n)),),
                                     lambda ids: rmk.last_token_index(input_ids=ids, pad_token_id=0)),
}


@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_compiled_public_ops_do_not_recompile_per_size(case):
    from torch._dynamo.testing import CompileCounterWithBackend

    make, fn = SIZE_CASES[case]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for n in (3, 5, 7, 9, 6):
        args = make(n)
        torch.testing.assert_close(compiled(*args), fn(*args), rtol=0, atol=0, equal_nan=True)
    assert counter.frame_count <= 2, f"{case}: {counter.frame_count} compilations for 5 sizes"


BACKENDS = ["reference", "cpu", "triton"]


def _direct_cases():
    h, w = torch.randn(2, 5, 8), torch.randn(1, 8)
    idx = torch.tensor([4, 2])
    c, r = torch.randn(4), torch.randn(4)
    x, mask = torch.randn(3, 7), torch.ones(3, 7, dtype=torch.bool)
    gid = torch.tensor([0, 0, 1])
    ops = torch.ops.rmkernels
    return {
        # issue 12's repro: an index far longer than B (a SIGSEGV in the kernel before)
        "index longer than B": (lambda be: ops.last_token_reward(h, w, None, torch.full((200000,), 4), be),
                                ValueError, r"index must have shape \[B\] = \[2\]"),
        "index dtype": (lambda be: ops.last_token_reward(h, w, None, idx.int(), be), TypeError,
                        "index must have dtype"),
        "weight shorter than H": (lambda be: ops.last_token_reward(h, w[:, :4], None, idx, be), ValueError,
                                  "weight must be"),
        "bias of wrong K": (lambda be: ops.last_token_reward(h, w, torch.randn(3), idx, be), ValueError,
                            r"bias must be \[K\]"),
        "hidden without unit stride": (lambda be: ops.last_token_reward(h.transpose(1, 2), w[:, :5], None, idx, be),
                                       ValueError, "unit stride"),
        "backward grad shape": (
            lambda be: ops.last_token_reward_backward(torch.randn(3, 1), h, w, idx, True, True, True, be),
            ValueError, r"grad must have shape \[2, 1\]"),
        "last_token_index mask rank": (lambda be: ops.last_token_index(mask[0], be), ValueError, "mask must be 2-D"),
        "bt margin shorter than B": (
            lambda be: ops.bradley_terry_loss(c, r, torch.randn(2), None, 0.0, 1.0, 0.0, 0.0, "mean", be),
            ValueError, r"margin must have shape \[B\] = \[4\]"),
        "bt weights dtype": (
            lambda be: ops.bradley_terry_loss(c, r, None, torch.rand(4).double(), 0.0, 1.0, 0.0, 0.0, "mean", be),
            TypeError, "weights must have dtype"),
        "bt margin_value inf": (
            lambda be: ops.bradley_terry_loss(c, r, None, None, float("inf"), 1.0, 0.0, 0.0, "mean", be),
            ValueError, "margin_value must be in .*got inf"),
        "pairwise weight_value NaN": (
            lambda be: ops.pairwise_reward_loss(h, w, None, torch.tensor([4, 2]), None, None, 0.0, float("nan"),
                                                0.0, 0.0, "mean", be),
            ValueError, "weight_value must be in .*got nan"),
        "bt reduction": (lambda be: ops.bradley_terry_loss(c, r, None, None, 0.0, 1.0, 0.0, 0.0, "avg", be),
                         ValueError, "reduction must be one of"),
        "bt rejected length": (lambda be: ops.bradley_terry_loss(c, r[:3], None, None, 0.0, 1.0, 0.0, 0.0, "sum", be),
                               ValueError, "rejected must have the shape of chosen"),
        "bt backward grad": (
            lambda be: ops.bradley_terry_loss_backward(torch.ones(4), c, r, None, None, 0.0, 1.0, 0.0, 0.0, "mean",
                                                       True, True, be),
            ValueError, r"grad must have shape \[\]"),
        "pairwise odd rows": (
            lambda be: ops.pairwise_reward_loss(torch.randn(3, 5, 8), w, None, torch.tensor([1, 2, 3]), None, None,
                                                0.0, 1.0, 0.0, 0.0, "mean", be),
            ValueError, "index must hold 2B rows"),
        "pairwise backward rewards": (
            lambda be: ops.pairwise_reward_loss_backward(torch.ones(()), None, torch.randn(5), h, w, idx, None, None,
                                                         0.0, 1.0, 0.0, 0.0, "mean", True, True, True, be),
            ValueError, r"rewards must have shape \[2B\] = \[2\]"),
        "ranking num_candidates": (
            lambda be: ops.ranking_loss(torch.randn(3, 4), torch.tensor([1, 2]), "mean", be), ValueError,
            r"num_candidates must be \[B\] = \[3\]"),
        "ranking num_candidates range": (
            lambda be: ops.ranking_loss(torch.randn(2, 4), torch.tensor([1, 9]), "mean", be), ValueError,
            r"num_candidates must be in \[0, K = 4\]"),
        "ppo values shape": (
            lambda be: ops.ppo_advantages(x, x, x[:2], x[:, 0], mask, 0.1, 1.0, 0.95, "k1", None, None, True, True,
                                          True, 1e-8, be),
            ValueError, r"values must have shape \[B, T\] = \[3, 7\]"),
        "ppo mask dtype": (
            lambda be: ops.ppo_gae(x, x, x, x[:, 0], mask.int(), 0.1, 1.0, 0.95, "k1", None, None, be),
            TypeError, "mask must have dtype"),
        "ppo estimator": (
            lambda be: ops.ppo_gae(x, x, x, x[:, 0], mask, 0.1, 1.0, 0.95, "k7", None, None, be),
            ValueError, "kl_estimator must be one of"),
        "ranking backward grad": (
            lambda be: ops.ranking_loss_backward(torch.ones(3), torch.randn(3, 4), None, "mean", be), ValueError,
            r"grad must have shape \[\] \(the loss'\), got \[3\]"),
        "ranking backward num_candidates": (
            lambda be: ops.ranking_loss_backward(torch.ones(()), torch.randn(3, 4), torch.tensor([1, 2]), "mean", be),
            ValueError, r"num_candidates must be \[B\] = \[3\]"),
        "row stats mask shape": (lambda be: ops.masked_row_stats(x, mask[:, :3], be), ValueError,
                                 r"mask must have the shape of x \[3, 7\], got \[3, 3\]"),
        "whiten apply sq": (
            lambda be: ops.masked_whiten_apply(x, mask, torch.zeros(2, dtype=torch.float64),
                                               torch.zeros(3, dtype=torch.float64), True, True, 1e-8, be),
            ValueError, r"sq must be float64 \[1\], got shape \[3\]"),
        "whiten apply eps": (
            lambda be: ops.masked_whiten_apply(x, mask, torch.zeros(2, dtype=torch.float64),
                                               torch.zeros(1, dtype=torch.float64), True, True, -1.0, be),
            ValueError, "eps must be in"),
        "whiten totals": (
            lambda be: ops.masked_centered_sq(x, mask, torch.zeros(3, dtype=torch.float64), be), ValueError,
            r"totals must be float64 \[2\]"),
        "whiten mask shape": (lambda be: ops.masked_whiten(x, mask[:, :3], True, True, 1e-8, be), ValueError,
                              "mask must have the shape of x"),
        "ppo mask shape": (lambda be: ops.ppo_gae(x, x, x, x[:, 0], mask[:, :3], 0.1, 1.0, 0.95, "k1", None, None, be),
                           ValueError, r"mask must have the shape of logprobs \["),
        "unknown backend": (lambda be: ops.masked_whiten(x, mask, True, True, 1e-8, "fast"), ValueError,
                            "backend must be one of"),
        # the options the public functions check, checked by the ops' hooks too (one function each)
        "group eps": (lambda be: ops.group_advantages(x[:, 0], gid, mask, "grpo", -1.0, True, "zero", 1.0, 1e-8, be),
                      ValueError, "eps must be in"),
        "group f_norm": (lambda be: ops.group_advantages(x[:, 0], gid, mask, "gpg", 1e-6, True, "zero", 0.0, 1e-8, be),
                         ValueError, "f_norm must be in"),
        "group whiten_eps": (
            lambda be: ops.group_advantages(x[:, 0], gid, mask, "reinforce_pp_baseline", 1e-6, True, "zero", 1.0,
                                            float("nan"), be),
            ValueError, "whiten_eps must be in"),
        "returns gamma": (lambda be: ops.reinforce_pp_returns(x, mask, -1.0, be), ValueError, "gamma must be in"),
        "gae lam": (lambda be: ops.gae(x, x, mask, 1.0, 2.0, be), ValueError, "lam must be in"),
        "kl clamp": (lambda be: ops.kl_estimate(x, x, mask, "k1", -1.0, be), ValueError, "clamp must be in"),
        "ppo kl_coef": (
            lambda be: ops.ppo_gae(x, x, x, x[:, 0], mask, float("nan"), 1.0, 0.95, "k1", None, None, be),
            ValueError, "kl_coef must be in"),
        "ppo whiten eps": (
            lambda be: ops.ppo_advantages(x, x, x, x[:, 0], mask, 0.1, 1.0, 0.95, "k1", None, None, True, True,
                                          True, -1.0, be),
            ValueError, "eps must be in"),
        "whiten eps": (lambda be: ops.masked_whiten(x, mask, True, True, float("nan"), be), ValueError,
                       "eps must be in"),
        "bt label_smoothing": (
            lambda be: ops.bradley_terry_loss(c, r, None, None, 0.0, 1.0, 0.7, 0.0, "mean", be),
            ValueError, "label_smoothing must be in"),
        "pairwise center_coef": (
            lambda be: ops.pairwise_reward_loss(torch.randn(4, 5, 8), w, None, torch.tensor([1, 2, 3, 4]), None, None,
                                                0.0, 1.0, 0.0, -1.0, "mean", be),
            ValueError, "center_coef must be in"),
        "logprobs weight stride": (
            lambda be: ops.token_logprobs(torch.randn(5, 4), torch.randn(4, 7).t(), None, torch.zeros(5).long(), 1.0,
                                          -100, be),
            ValueError, "weight needs a unit stride on H"),
        "logprobs backward lse dtype": (
            lambda be: ops.token_logprobs_backward(torch.randn(2, 3), None, torch.randn(2, 3, 4), torch.randn(5, 4),
                                                   None, torch.ones(2, 3).long(), torch.randn(2, 3).double(),
                                                   torch.randn(2, 3), 1.0, -100, True, True, True, be),
            TypeError, r"lse must have dtype in \(float32\), got float64"),
        "logprobs backward entropy dtype": (
            lambda be: ops.token_logprobs_backward(torch.randn(2, 3), None, torch.randn(2, 3, 4), torch.randn(5, 4),
                                                   None, torch.ones(2, 3).long(), torch.randn(2, 3),
                                                   torch.randn(2, 3).half(), 1.0, -100, True, True, True, be),
            TypeError, r"entropy must have dtype in \(float32\), got float16"),
        "logprobs temperature tiny": (
            lambda be: ops.token_logprobs(torch.randn(5, 4), torch.randn(7, 4), None, torch.zeros(5).long(), 1e-300,
                                          -100, be),
            ValueError, "temperature must be >= 2.93874e-39"),
        "logprobs no features": (
            lambda be: ops.token_logprobs(torch.randn(5, 0), torch.randn(7, 0), None, torch.zeros(5).long(), 1.0,
                                          -100, be),
            ValueError, "hidden must have H >= 1"),
    }


# _direct_cases whose error comes from the data (not raised where there is none: meta tensors,
# FakeTensorMode)
DATA_DEPENDENT = {"ranking num_candidates range"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_direct_cases()))
def test_direct_calls_check_arguments(case, backend):
    """The check runs in the op body before the backend is used: the same error on every
    backend (also "triton" and "cpu" where they could not run these tensors)."""
    fn, exc, match = _direct_cases()[case]
    with pytest.raises(exc, match=match):
        fn(backend)


@pytest.mark.parametrize("case", sorted(set(_direct_cases()) - DATA_DEPENDENT))
def test_fake_calls_check_arguments(case):
    """The ops' fakes run the same checks (those that need no data) before returning shapes:
    under FakeTensorMode, what torch.compile and export trace with, a bad call raises the error
    of an eager call, not an output shaped from a wrong argument."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn, exc, match = _direct_cases()[case]
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc, match=match):
        fn("cpu")


def test_meta_inputs_are_checked():
    """A meta tensor among CPU ones sends a call to the op's fake: it raises instead of returning
    uninitialised CPU tensors; all-meta calls get the argument checks; the kernel ops' fakes
    check that their tensors share a device."""
    ops = torch.ops.rmkernels
    s, ids, m = torch.randn(4), torch.tensor([0, 0, 1, 1]), torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"must be on one device, got scores on cpu, group_ids on meta, mask on cpu$"):
        ops.group_advantages(s, ids.to("meta"), m, "grpo", 1e-6, True, "zero", 1.0, 1e-8, "cpu")
    with pytest.raises(ValueError, match="one device, got scores on cpu, group_ids on cpu, mask on meta$"):
        ops.group_advantages_kernel(s, ids, m.to("meta"), 0, 1e-6, True, 0, 1.0, 1e-8)
    with pytest.raises(ValueError, match="one device"):
        ops.reinforce_kernel(torch.randn(2, 3, device="meta"), torch.ones(2, 3, dtype=torch.bool), None, 1.0, True,
                             1e-8)
    meta = [t.to("meta") for t in (s, ids, m)]
    with pytest.raises(ValueError, match=r"group_ids \[B\] and mask \[B, T\] must have B = 4"):
        ops.group_advantages(meta[0], meta[1][:3], meta[2], "grpo", 1e-6, True, "zero", 1.0, 1e-8, "cpu")
    with pytest.raises(ValueError, match="estimator must be one of"):
        ops.group_advantages(*meta, "nope", 1e-6, True, "zero", 1.0, 1e-8, "cpu")
    seq, adv = ops.group_advantages(*meta, "grpo", 1e-6, True, "zero", 1.0, 1e-8, "cpu")  # a good call: shapes
    assert seq.shape == (4,) and adv.shape == (4, 3) and seq.device.type == "meta"


def test_per_pair_tensors_of_any_stride_in_direct_calls():
    """bradley_terry_loss called directly with strided [B] margin / weights: every backend gives
    the reference's loss (the op makes them contiguous; the C++ kernel refused them before)."""
    ops = torch.ops.rmkernels
    c, r = torch.randn(6), torch.randn(6)
    margin, weights = torch.randn(12)[::2], torch.rand(12)[1::2]
    want = ops.bradley_terry_loss(c, r, margin.contiguous(), weights.contiguous(), 0.0, 1.0, 0.1, 0.0, "sum",
                                  "reference")
    for be in ("reference", "cpu"):
        got = ops.bradley_terry_loss(c, r, margin, weights, 0.0, 1.0, 0.1, 0.0, "sum", be)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_index_of_any_stride_in_direct_calls(backend):
    """last_token_reward(_backward) and pairwise_reward_loss called directly with a strided or
    expanded index: every backend gives the reference's numbers with a contiguous copy (the op
    makes it contiguous; the C++ kernel refused it with a message blaming the Python layer, the
    Triton host function with another error)."""
    skip_unless_available(backend, "cpu")
    ops = torch.ops.rmkernels
    h, w = torch.randn(4, 5, 8), torch.randn(1, 8)
    g = torch.randn(4, 1)
    for index in (torch.tensor([1, 0, 2, 0, 3, 0, 4, 0])[::2], torch.tensor([3]).expand(4)):
        dense = index.contiguous()
        torch.testing.assert_close(ops.last_token_reward(h, w, None, index, backend),
                                   ops.last_token_reward(h, w, None, dense, "reference"))
        for got, want in zip(ops.last_token_reward_backward(g, h, w, index, True, True, True, backend),
                             ops.last_token_reward_backward(g, h, w, dense, True, True, True, "reference")):
            torch.testing.assert_close(got, want)
        bt = (None, None, 0.0, 1.0, 0.1, 0.0, "mean")
        for got, want in zip(ops.pairwise_reward_loss(h, w, None, index, *bt, backend),
                             ops.pairwise_reward_loss(h, w, None, dense, *bt, "reference")):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_token_logprobs_temperature_range(backend):
    """rmk.token_logprobs refuses a temperature whose 1 / temperature overflows float32 (it gave
    NaN log-probs and entropies); the smallest allowed one gives finite numbers for finite
    scaled logits."""
    from rmkernels.ops.token_logprobs import MIN_TEMPERATURE

    skip_unless_available(backend, "cpu")
    h, w, t = torch.randn(2, 3, 4) * 1e-39, torch.randn(5, 4), torch.tensor([[1, 4, 0], [0, 2, 3]])
    for bad in (1e-300, 1e-39, MIN_TEMPERATURE / 2):
        with pytest.raises(ValueError, match="temperature must be >= 2.93874e-39"):
            rmk.token_logprobs(h, w, t, temperature=bad, backend=backend)
    lp, ent = rmk.token_logprobs(h, w, t, temperature=MIN_TEMPERATURE, return_entropy=True, backend=backend)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


def test_last_token_index_pad_token_id():
    ids = torch.tensor([[1, 2, 0], [3, 0, 0]])
    assert rmk.last_token_index(input_ids=ids, pad_token_id=0).tolist() == [1, 0]
    import numpy as np

    assert rmk.last_token_index(input_ids=ids, pad_token_id=np.int64(0)).tolist() == [1, 0]
    for bad in (0.5, "0", torch.tensor([0, 1]), torch.tensor(0), True):
        with pytest.raises(TypeError, match="pad_token_id must be an int"):
            rmk.last_token_index(input_ids=ids, pad_token_id=bad)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_integer_options_out_of_range(backend):
    """An integer option past int64 (what the kernels take) is a ValueError naming it on every
    backend (``ignore_index=2**63`` was the dispatcher's "Expected a value of type 'int'" on cpu
    and ran on the reference; 2**64 a bare OverflowError); a ``pad_token_id`` outside the range of
    the ids' dtype is one too (2**32 against int32 ids compared as 0 and picked the token before
    the 0s; 256 against uint8 ids the same)."""
    skip_unless_available(backend, "cpu")
    h, w, t = torch.randn(2, 3), torch.randn(5, 3), torch.tensor([1, 4])
    for bad in (2**63, 2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=rf"ignore_index must fit in int64 .*got {bad}"):
            rmk.token_logprobs(h, w, t, ignore_index=bad, backend=backend)
    lp = rmk.token_logprobs(h, w, t, ignore_index=-(2**63), backend=backend)
    torch.testing.assert_close(lp, rmk.token_logprobs(h, w, t, backend="reference"))
    for dtype, bad in ((torch.int32, 2**32), (torch.int32, -(2**31) - 1), (torch.uint8, 256), (torch.uint8, -1),
                       (torch.int16, 2**15)):
        ids = torch.tensor([[5, 7, 0, 0]], dtype=dtype)
        with pytest.raises(ValueError, match=rf"pad_token_id must lie in the range of input_ids' dtype .*got {bad}"):
            rmk.last_token_index(input_ids=ids, pad_token_id=bad, backend=backend)
        assert rmk.last_token_index(input_ids=ids, pad_token_id=0, backend=backend).tolist() == [1]
    with pytest.raises(ValueError, match="pad_token_id must fit in int64"):
        rmk.last_token_index(input_ids=torch.tensor([[5, 0]]), pad_token_id=2**64, backend=backend)
    ids = torch.tensor([[5, 7, 0, 0]], dtype=torch.int32)
    assert rmk.last_token_index(input_ids=ids, pad_token_id=2**31 - 1, backend=backend).tolist() == [3]


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamps_that_round_to_zero_in_float32(backend, dtype):
    """A clamp the checks took (> 0) but float32 holds as 0 (1e-300): the C++ kernels read 0 as
    no clamp while the reference clamped to +-0, so cpu and reference disagreed. The public
    functions refuse it, naming the option; a kernel op given it directly clamps as the kernels
    hold it (rounded to the arithmetic dtype, 0 = none) on every backend (float64 inputs: the C++
    kernels and the reference; Triton holds host floats in float32's range)."""
    from rmkernels._registry import KERNELS

    skip_unless_available(backend, "cpu")
    g = torch.Generator().manual_seed(0)
    lp, ref, v = (torch.randn(3, 5, generator=g, dtype=dtype) for _ in range(3))
    sc, m = torch.tensor([3.0, -2.0, 0.5], dtype=dtype), torch.ones(3, 5, dtype=torch.bool)
    def ppo(**kw):
        return rmk.ppo_advantages(lp, ref, v, sc, m, kl_coef=0.1, backend=backend, **kw)

    for name, call in (("score_clip", lambda c: ppo(score_clip=c)), ("kl_clamp", lambda c: ppo(kl_clamp=c)),
                       ("clamp", lambda c: rmk.kl_estimate(lp, ref, m, clamp=c, backend=backend))):
        for bad in (1e-300, 1e-46):
            with pytest.raises(ValueError, match=rf"{name} must be None or > 0 in float32 .*rounds to 0"):
                call(bad)
        call(1e-45)  # float32's smallest subnormal: a clamp
    kl = rmk.kl_estimate(lp, ref, m, clamp=1e-45, backend=backend)
    assert kl.abs().max().item() <= 1.5e-45
    tiny = 1e-300
    if backend == "triton" and dtype == torch.float64:
        return  # the Triton kernels take host floats as two float32s (_common.scalar): 1e-300 is 0 there
    for name, args in (("kl_estimate_kernel", (lp, ref, m, 0, tiny, tiny)),
                       ("ppo_gae_kernel", (lp, ref, v, sc, m, 0.1, 1.0, 0.95, 2, tiny, tiny, tiny))):
        k = KERNELS[name]
        want = k.reference(*args)
        got = k(backend, *args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    kl = KERNELS["kl_estimate_kernel"].reference(lp, ref, m, 0, tiny, tiny)
    if dtype == torch.float32:  # no clamp: the k1 values themselves
        torch.testing.assert_close(kl, lp - ref)
    else:  # 1e-300 is a clamp in float64
        assert kl.abs().max().item() <= tiny


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_packed_index_names_distinct_tokens(backend):
    """A direct call of the pooling ops with packed hidden [N, H] and an index that names one
    token twice: the forward gathered it twice, the backward wrote that token's gradient once
    (one row's, not their sum). It is a ValueError naming the rows (a data check, so for CPU
    tensors always); indices outside [0, N) (no valid token) may repeat, and so may a position
    in different rows of [B, T, H] hidden states."""
    skip_unless_available(backend, "cpu")
    ops = torch.ops.rmkernels
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 3, generator=g), torch.randn(2, 3, generator=g)
    idx = torch.tensor([4, 1, 4, -1])
    with pytest.raises(ValueError, match=r"index: rows 0, 2 name the same packed token \(4\)"):
        ops.last_token_reward(h, w, None, idx, backend)
    with pytest.raises(ValueError, match=r"index: rows 0, 2 name the same packed token \(4\)"):
        ops.last_token_reward_backward(torch.ones(4, 2), h, w, idx, True, True, True, backend)
    with pytest.raises(ValueError, match=r"index: rows 0, 2 name the same packed token \(4\)"):
        ops.pairwise_reward_loss(h, w[:1], None, idx, None, None, 0.0, 1.0, 0.0, 0.0, "mean", backend)
    ok = torch.tensor([4, -1, 1, -1, 6])
    hr = h.clone().requires_grad_()
    r = ops.last_token_reward(hr, w, None, ok, backend)
    (gh,) = torch.autograd.grad(r.nan_to_num().sum(), hr)
    want = torch.zeros_like(h)
    want[4], want[1] = w.sum(0), w.sum(0)
    torch.testing.assert_close(gh, want)
    h3 = torch.randn(3, 4, 3, generator=g)
    torch.testing.assert_close(ops.last_token_reward(h3, w, None, torch.tensor([2, 2, 2]), backend),
                               h3[:, 2] @ w.t())


def test_packed_index_kernel_op_checks_distinct_tokens():
    """The C++ CPU kernel op of the backward checks it too (its rows are written by different
    threads, once each)."""
    skip_unless_available("cpu", "cpu")
    ops = torch.ops.rmkernels
    h, w = torch.randn(6, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"index: rows 1, 3 name the same packed token \(5\)"):
        ops.last_token_reward_bwd_kernel(torch.ones(4, 2), h, w, torch.tensor([0, 5, -3, 5]), True, False, False)
    gh = ops.last_token_reward_bwd_kernel(torch.ones(4, 2), h, w, torch.tensor([0, 5, -3, 9]), True, False, False)[0]
    assert torch.equal(gh[0], w.sum(0)) and torch.equal(gh[5], w.sum(0)) and gh[1:5].abs().sum() == 0


def test_direct_index_ops_check_data():
    ops = torch.ops.rmkernels
    with pytest.raises(ValueError, match="lengths must be in"):
        ops.lengths_index(torch.tensor([1, 0]), 4)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        ops.cu_seqlens_index(torch.tensor([1, 3]), 3)
    with pytest.raises(ValueError, match="mask: rows 1 have no valid token"):
        ops.check_mask_index(torch.tensor([0, -1]), 4, "mask")
    with pytest.raises(TypeError, match="lengths must have dtype"):
        ops.lengths_index(torch.tensor([1.0]), 4)
    assert torch.equal(ops.lengths_index(torch.tensor([1, 4]), 4), torch.tensor([0, 3]))
    assert torch.equal(ops.cu_seqlens_index(torch.tensor([0, 1, 3]), 3), torch.tensor([0, 2]))


def test_gpu_data_checks_need_no_sync_unless_enabled(monkeypatch):
    """The data checks of non-CPU tensors run only with rmk.checks(True) (a host sync): the
    index ops ask ``data_checks_enabled`` for the tensors' device."""
    from rmkernels import _checks

    seen = []
    real = _checks.data_checks_enabled
    monkeypatch.setattr(_checks, "data_checks_enabled", lambda device: seen.append(device.type) or real(device))
    h, w, m = _pool_inputs()
    rmk.last_token_reward(h, w, attention_mask=m)
    rmk.last_token_reward(h, w, lengths=m.sum(1))
    assert seen == ["cpu", "cpu"]
    assert real(torch.device("cuda")) is False  # no checks (no sync) for GPU tensors by default
    with rmk.checks(True):
        assert real(torch.device("cuda")) is True


def test_opcheck_index_ops():
    """The index ops (which hold the data checks) pass opcheck: fake, schema, autograd
    registration, and no output aliasing an input (check_mask_index's body returns its input
    on the eager fast path; the op returns a copy)."""
    ops = torch.ops.rmkernels
    torch.library.opcheck(ops.lengths_index.default, (torch.tensor([1, 4, 2]), 4))
    torch.library.opcheck(ops.lengths_index.default, (torch.tensor([1, 4, 2], dtype=torch.int32), -1))
    torch.library.opcheck(ops.cu_seqlens_index.default, (torch.tensor([0, 1, 3, 7]), 7))
    torch.library.opcheck(ops.cu_seqlens_index.default, (torch.tensor([0, 1, 3, 7], dtype=torch.int32), -1))
    torch.library.opcheck(ops.check_mask_index.default, (torch.tensor([0, 3, 2]), 4, "attention_mask"))
    index = torch.tensor([0, 3])
    assert ops.check_mask_index(index, 4, "m") is not index


def test_direct_call_backend_must_fit_the_tensors():
    """A direct call's backend must run on its tensors (the public functions' rule and message,
    ``rmk.backend_report``): "cuda" on CPU tensors ran the C++ CPU kernel, "triton" on CPU tensors
    without the interpreter failed inside Triton ("0 active drivers")."""
    ops = torch.ops.rmkernels
    c, r = torch.randn(4), torch.randn(4)
    args = (c, r, None, None, 0.0, 1.0, 0.0, 0.0, "mean")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available for cpu tensors: .*Available: cpu"):
        ops.bradley_terry_loss(*args, "cuda")
    if rmk.backend_report("cpu")["triton"] is not None:  # no interpreter in this process
        with pytest.raises(RuntimeError, match=r"backend 'triton' is not available for cpu tensors"):
            ops.bradley_terry_loss(*args, "triton")
    want = ops.bradley_terry_loss(*args, "reference")
    torch.testing.assert_close(ops.bradley_terry_loss(*args, "cpu"), want)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_ranking_num_candidates_of_any_stride_in_direct_calls(backend):
    """ranking_loss(_backward) called directly with a strided or expanded num_candidates: the
    numbers of a contiguous copy (the cpu kernel refused it, blaming the Python layer)."""
    skip_unless_available(backend, "cpu")
    ops = torch.ops.rmkernels
    rw = torch.randn(3, 4)
    for nc in (torch.tensor([4, 4, 2, 2, 3, 3])[::2], torch.tensor([3]).expand(3)):
        dense = nc.contiguous()
        for red in ("mean", "none"):
            torch.testing.assert_close(ops.ranking_loss(rw, nc, red, backend), ops.ranking_loss(rw, dense, red,
                                                                                                 "reference"))
            g = torch.randn(3) if red == "none" else torch.tensor(1.3)
            torch.testing.assert_close(ops.ranking_loss_backward(g, rw, nc, red, backend),
                                       ops.ranking_loss_backward(g, rw, dense, red, "reference"))


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_options_past_float32_range(backend, dtype):
    """Clamps and margins the checks accept but float32 cannot hold (1e39, 1e300): every backend
    holds them as the kernels do (past float32's range: +-inf, no clamp) and gives the float64
    reference's numbers; the reference raised torch's overflow error for float32 inputs."""
    skip_unless_available(backend, "cpu")
    g = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(3, 5, generator=g, dtype=dtype) * 30, -torch.rand(3, 5, generator=g, dtype=dtype)
    v, sc = torch.randn(3, 5, generator=g, dtype=dtype), torch.randn(3, generator=g, dtype=dtype) * 1e3
    m = torch.rand(3, 5, generator=g) > 0.2
    for big in (1e39, 1e300):
        def run(be, cast, big=big):
            c = (lambda t: t.to(torch.float64)) if cast else (lambda t: t)
            return [rmk.kl_estimate(c(lp), c(ref), m, estimator="k3", clamp=big, backend=be),
                    *rmk.ppo_advantages(c(lp), c(ref), c(v), c(sc), m, kl_coef=0.1, kl_clamp=big, score_clip=big,
                                        backend=be)[:2],
                    rmk.bradley_terry_loss(c(sc), c(sc.flip(0)), margin=big / 1e300, backend=be)]
        for got, want in zip(run(backend, False), run("reference", True)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        if dtype == torch.float32:
            loss = rmk.bradley_terry_loss(sc, sc.flip(0), margin=big, backend=backend)
            assert loss.item() == float("inf")  # a margin past float32's range: d = -inf, loss inf


def test_numpy_scalars_are_options_like_python_numbers():
    """An option given as a NumPy scalar (``np.float32(0.1)``, a value read from a numpy
    config or array) is taken as the Python number it holds, on every public function that
    takes a number: it was refused ("kl_coef must be a float, got float32", while np.float64,
    a float subclass, passed). Bools, strings and tensors are still refused, naming the option."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 6, 5, 4, 7
    lp, ref, val = (torch.randn(B, T, generator=g) for _ in range(3))
    scores, mask = torch.randn(B, generator=g), torch.ones(B, T, dtype=torch.bool)
    f32 = np.float32(0.1)
    same = [
        (lambda x: rmk.ppo_advantages(lp, ref, val, scores, mask, kl_coef=x, gamma=np.float32(0.99), lam=x,
                                      eps=np.float64(1e-8)).advantages,
         lambda x: rmk.ppo_advantages(lp, ref, val, scores, mask, kl_coef=x, gamma=float(np.float32(0.99)), lam=x,
                                      eps=1e-8).advantages),
        (lambda x: rmk.gae(lp, val, mask, gamma=x, lam=np.float16(0.5))[0],
         lambda x: rmk.gae(lp, val, mask, gamma=x, lam=0.5)[0]),
        (lambda x: rmk.bradley_terry_loss(scores, lp[:, 0], margin=x, label_smoothing=x, center_coef=x),
         None),
        (lambda x: rmk.group_advantages(scores, torch.arange(B) // 2, eps=x, f_norm=np.int64(3))[0],
         lambda x: rmk.group_advantages(scores, torch.arange(B) // 2, eps=x, f_norm=3)[0]),
        (lambda x: rmk.reinforce_pp_returns(lp, mask, gamma=x), None),
    ]
    for numpy_call, python_call in same:
        python_call = python_call or numpy_call
        torch.testing.assert_close(numpy_call(f32), python_call(float(f32)), rtol=0, atol=0)
    hidden, weight = torch.randn(B, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (B,), generator=g)
    targets[0] = -100
    torch.testing.assert_close(
        rmk.token_logprobs(hidden, weight, targets, temperature=np.float32(0.5), ignore_index=np.int64(-100)),
        rmk.token_logprobs(hidden, weight, targets, temperature=0.5, ignore_index=-100), rtol=0, atol=0)
    ids = torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0]])
    assert rmk.last_token_index(input_ids=ids, pad_token_id=np.int64(0)).tolist() == [1, 0]
    for bad, kind in ((True, "bool"), ("0.1", "str"), (torch.tensor(0.1), "Tensor"), (np.bool_(True), "bool")):
        with pytest.raises(TypeError, match=f"kl_coef must be a real number .*got {kind}"):
            rmk.ppo_advantages(lp, ref, val, scores, mask, kl_coef=bad)
    with pytest.raises(TypeError, match=r"ignore_index must be an int, got -100.0"):
        rmk.token_logprobs(hidden, weight, targets, ignore_index=-100.0)


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_an_unavailable_backend_is_explained_once(name, monkeypatch):
    """The error for a backend that cannot run says why once (it was said a second time in the
    list of the other backends), lists the available ones, and for triton without triton
    installed, on CPU tensors, says the interpreter is needed too (it said only "pip install
    triton", after which the call failed again for another reason)."""
    from rmkernels import _backend

    x = torch.randn(4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    if name == "triton":
        monkeypatch.setattr(_backend, "_TRITON_INSTALLED", False)
        monkeypatch.setattr(_backend, "_TRITON_WHY", "triton is not installed (pip install triton==3.6.0)")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = rmk.backend_report("cpu")[name]
    if why is None:
        pytest.skip(f"{name} runs on CPU tensors here")
    with pytest.raises(RuntimeError) as e:
        rmk.gae(x, x, mask, backend=name)
    msg = str(e.value)
    assert msg.startswith(f"rmkernels backend {name!r} is not available for cpu tensors: {why}. Available: "), msg
    assert msg.count(why) == 1 and f"{name}: " not in msg, msg
    if name == "triton":
        assert why == ("triton is not installed (pip install triton==3.6.0), and on cpu tensors it runs only under "
                       "TRITON_INTERPRET=1"), why


def test_rmkernels_check_must_be_0_or_1(monkeypatch):
    """RMKERNELS_CHECK (the data checks of GPU tensors) other than 0 / 1 is an error naming it,
    as RMKERNELS_BACKEND's is (it was read as 0: "true" or "yes" turned the checks off)."""
    from rmkernels import _checks

    gpu = torch.device("cuda")  # only the device's type is read: no GPU needed
    for value, on in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("RMKERNELS_CHECK", value)
        assert _checks.data_checks_enabled(gpu) is on
    monkeypatch.setenv("RMKERNELS_CHECK", "yes")
    with pytest.raises(ValueError, match="RMKERNELS_CHECK must be 0 or 1, got 'yes'"):
        _checks.data_checks_enabled(gpu)
    assert _checks.data_checks_enabled(torch.device("cpu"))  # CPU tensors: always checked


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_min_max_of_the_data_checks(dtype):
    """_checks.min_max: the (min, max) the group-id and target range checks read, as ints."""
    from rmkernels import _checks

    for _ in range(5):
        n = int(torch.randint(1, 2000, ()))
        x = torch.randint(-10**6, 10**6, (n,), dtype=dtype)
        lo, hi = _checks.min_max(x)
        assert (lo, hi) == (int(x.min()), int(x.max())) and type(lo) is int and type(hi) is int
    assert _checks.min_max(torch.tensor([[7]], dtype=dtype)) == (7, 7)
