"""Property-based tests (hypothesis) of every public op: the ``cpu`` backend against the
``reference`` backend, forward and backward, on generated inputs; and the ``triton`` backend
the same way under the interpreter (``-m triton``, fewer examples, bfloat16 left out: numpy has
none). ``test_every_custom_op_is_fuzzed``: every custom op is run by some spec.

What is generated, per op: sizes with 0 and 1 and ragged values, dtypes (fp32, bf16, fp16,
fp64), every option of the op, and the memory layout of the tensor inputs: contiguous,
transposed (the first two dimensions swapped in memory), sliced (every other row, an offset
into the last dimension), expanded (stride 0 on the first dimension), and, for the pooling
ops, overlapping tokens (``x.unfold(1, H, 1)``'s layout: token stride 1). Gradients are taken
with respect to the *base* tensor the view was made from, so a backward that writes a view's
gradient as if it were contiguous shows up. The reference runs on float64 copies of the
same values; the comparison uses the input dtype's tolerance (``tests/utils.tolerance``),
relative, for the gradient of a base that a view reads more than once (expanded, overlapping),
to the sum of |the terms| autograd adds into it (``_grad_magnitudes``: bf16 terms that cancel
leave a sum far smaller than their rounding errors).

Profiles: ``ci`` (default; a bounded, deterministic example count: ``derandomize=True``, no
example database) and ``long`` (many more examples, random), selected with
``RMKERNELS_FUZZ_PROFILE=long python -m pytest tests/test_fuzz.py``.

Adding an op: write an ``OpSpec`` (a strategy drawing its inputs, and a function that runs
the op on a backend and returns its output tensors) and add it to ``SPECS``; ops that have
not landed yet are listed only when ``rmkernels`` has them. An ``OpSpec`` may name its own
tolerance (``tol``: the one the op's own tests use, e.g. fp32 arithmetic on bf16 inputs) and a
``context`` held around both backends' forward and backward (``token_logprobs`` patches its
chunk sizes so that small vocabularies span several chunks). ``rmk.group_ids`` is not a custom
op; it has property tests of its own (ids by first appearance / sorted value).
"""
import contextlib
import dataclasses
import os
from collections.abc import Callable
from unittest import mock

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in requirements-test.txt")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import assert_close, tolerance

import rmkernels as rmk
from rmkernels._codes import GROUP_ESTIMATORS, GROUP_SINGLES
from rmkernels.ops import token_logprobs as tlp

_COMMON = {"deadline": None, "database": None, "print_blob": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture]}
settings.register_profile("rmk-fuzz-ci", max_examples=8, derandomize=True, **_COMMON)
settings.register_profile("rmk-fuzz-long", max_examples=400, **_COMMON)
PROFILE = os.environ.get("RMKERNELS_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"RMKERNELS_FUZZ_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
FUZZ = settings(settings.get_profile(f"rmk-fuzz-{PROFILE}"))

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


# ---------------------------------------------------------------------------------------
# Tensors with a given layout
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Arg:
    """A floating tensor input: ``base`` (the leaf, float64 values) and ``view(base)`` the
    tensor of ``shape`` in the drawn layout."""
    base: torch.Tensor
    view: Callable
    dtype: torch.dtype

    def make(self, dtype=None, requires_grad=False):
        base = self.base.to(dtype or self.dtype).requires_grad_(requires_grad)
        return base, self.view(base)


def _layout_arg(gen, shape, layout, dtype, scale=1.0):
    """Values rounded to ``dtype`` first, so the float64 reference sees exactly the same numbers."""
    shape = tuple(shape)
    rank = len(shape)
    if layout == "transposed" and rank >= 2:
        base_shape = (shape[1], shape[0]) + shape[2:]
        view = lambda b: b.transpose(0, 1)
    elif layout == "sliced" and rank >= 1:
        base_shape = (2 * shape[0],) + shape[1:-1] + (shape[-1] + 3,) if rank >= 2 else (2 * shape[0],)
        n_last = shape[-1]
        view = (lambda b: b[::2][..., 1:1 + n_last]) if rank >= 2 else (lambda b: b[::2])
    elif layout == "expanded" and rank >= 1:
        base_shape = (1,) + shape[1:]
        view = lambda b: b.expand(shape)
    elif layout == "overlapping" and rank == 3:
        B, T, H = shape  # x.unfold(1, H, 1) of a [B, T + H - 1] tensor: token t holds elements t .. t+H-1
        strides = (T - 1 + H, 1, 1)
        base_shape = (max(B * (T - 1 + H), 1),)
        view = lambda b: b.as_strided(shape, strides)
    else:
        base_shape, view = shape, (lambda b: b)
    base = (torch.randn(base_shape, generator=gen, dtype=torch.float64) * scale).to(dtype).double()
    return Arg(base, view, dtype)


def _mask(gen, B, T, kind):
    """[B, T] bool: right padding, left padding, or holes; every row has a valid token."""
    if T == 0:
        return torch.zeros(B, 0, dtype=torch.bool)
    n = torch.randint(1, T + 1, (B,), generator=gen)
    pos = torch.arange(T).expand(B, T)
    if kind == "left":
        return pos >= (T - n)[:, None]
    mask = pos < n[:, None]
    if kind == "holes":
        mask &= torch.rand(B, T, generator=gen) > 0.3
        mask[torch.arange(B), n - 1] = True
    return mask


def _ragged(lo, hi):
    return st.one_of(st.sampled_from([lo, min(lo + 1, hi), hi]), st.integers(lo, hi))


# ---------------------------------------------------------------------------------------
# Op specs
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class OpSpec:
    draw: Callable  # (data, gen, layout) -> case dict: "args" (name -> Arg) + anything the run needs
    run: Callable  # (case, tensors: name -> tensor, backend) -> tuple of output tensors
    layouts: tuple = tuple(LAYOUTS)
    differentiable: bool = True
    # (input dtype, "output" | "grad") -> (rtol, atol); default: tests/utils.tolerance(dtype)
    tol: Callable = lambda dtype, what: tolerance(dtype)
    # case -> context manager held around both backends' forward and backward (e.g. a chunk policy)
    context: Callable = lambda case: contextlib.nullcontext()


def _index_kwargs(data, gen, B, T, allow_packed=True):
    kinds = ["mask-right", "mask-left", "mask-holes", "lengths"] + (["cu_seqlens"] if allow_packed else [])
    kind = data.draw(st.sampled_from(kinds), label="index")
    if T == 0:  # no length is valid; an empty mask gives NaN rewards (SPEC), no error
        kind = "mask-right"
    if kind.startswith("mask"):
        m = _mask(gen, B, T, kind.split("-")[1])
        return kind, {"attention_mask": m.to(data.draw(st.sampled_from([torch.bool, torch.int64, torch.float32]),
                                                      label="mask dtype"))}
    if kind == "lengths":
        return kind, {"lengths": torch.randint(min(1, T), T + 1, (B,), generator=gen)}
    lens = torch.randint(1, T + 1, (B,), generator=gen)
    cu = torch.zeros(B + 1, dtype=data.draw(st.sampled_from([torch.int32, torch.int64]), label="cu dtype"))
    cu[1:] = torch.cumsum(lens, 0)
    return kind, {"cu_seqlens": cu}


def _draw_pooling(data, gen, layout, *, pairwise):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    B = data.draw(_ragged(0, 5), label="B")
    rows = 2 * B if pairwise else B
    T = data.draw(_ragged(0 if layout != "overlapping" else 1, 19), label="T")
    H = data.draw(st.sampled_from([1, 2, 8, 33, 64]), label="H")
    if layout == "overlapping":
        H = max(H, 2)
    K = 1 if pairwise else data.draw(st.sampled_from([1, 2, 3]), label="K")
    kind, index = _index_kwargs(data, gen, rows, T, allow_packed=layout in ("contiguous", "sliced"))
    if kind == "cu_seqlens":  # packed [N, H]
        hidden = _layout_arg(gen, (int(index["cu_seqlens"][-1]), H), layout, dtype)
    else:
        hidden = _layout_arg(gen, (rows, T, H), layout, dtype)
    case = {"args": {"hidden": hidden, "weight": _layout_arg(gen, (K, H), "contiguous", dtype, 0.5)},
            "index": index}
    if data.draw(st.booleans(), label="bias"):
        case["args"]["bias"] = _layout_arg(gen, (K,), "contiguous", dtype)
    if pairwise:
        case["loss"] = _draw_loss_options(data, gen, B, dtype)
    return case


def _draw_loss_options(data, gen, B, dtype):
    opts = {"reduction": data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
            "label_smoothing": data.draw(st.sampled_from([0.0, 0.1, 0.45]), label="label_smoothing"),
            "center_coef": data.draw(st.sampled_from([0.0, 0.01, 1.0]), label="center_coef")}
    margin = data.draw(st.sampled_from(["none", "float", "tensor"]), label="margin")
    if margin == "float":
        opts["margin"] = 0.75
    elif margin == "tensor":
        opts["margin"] = torch.randn(B, generator=gen, dtype=torch.float64).to(dtype)
    if data.draw(st.booleans(), label="weights"):
        opts["weights"] = torch.rand(B, generator=gen, dtype=torch.float64).to(dtype)
    return opts


def _run_last_token_reward(case, t, backend):
    return (rmk.last_token_reward(t["hidden"], t["weight"], t.get("bias"), **case["index"], backend=backend),)


def _run_pairwise(case, t, backend):
    loss = {k: (v.to(t["hidden"].dtype) if isinstance(v, torch.Tensor) else v) for k, v in case["loss"].items()}
    return rmk.pairwise_reward_loss(t["hidden"], t["weight"], t.get("bias"), **case["index"], **loss,
                                    backend=backend)


def _draw_index_only(data, gen, layout):
    B = data.draw(_ragged(0, 6), label="B")
    T = data.draw(_ragged(1, 23), label="T")  # T = 0: no valid token to point at (an error for every input kind)
    kind = data.draw(st.sampled_from(["mask", "input_ids", "lengths", "cu_seqlens"]), label="by")
    mask = _mask(gen, B, T, data.draw(st.sampled_from(["right", "left", "holes"]), label="mask kind"))
    if kind == "mask":
        return {"args": {}, "kw": {"attention_mask": _with_layout(mask, layout)}}
    if kind == "input_ids":
        ids = torch.where(mask, torch.randint(1, 50, (B, T), generator=gen), torch.zeros((), dtype=torch.int64))
        return {"args": {}, "kw": {"input_ids": _with_layout(ids, layout), "pad_token_id": 0}}
    lens = torch.randint(min(1, T), T + 1, (B,), generator=gen)
    if kind == "lengths":
        return {"args": {}, "kw": {"lengths": lens}}
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lens, 0)
    return {"args": {}, "kw": {"cu_seqlens": cu}}


def _with_layout(t, layout):
    """The same values as ``t`` [B, T] in another memory layout (index inputs: no gradient)."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        big = torch.zeros((2 * t.shape[0], t.shape[1] + 3), dtype=t.dtype)
        big[::2][:, 1:1 + t.shape[1]] = t
        return big[::2][:, 1:1 + t.shape[1]]
    if layout == "expanded" and t.shape[0] > 0:
        return t[:1].expand(t.shape)
    return t


def _draw_bt(data, gen, layout):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    B = data.draw(_ragged(0, 40), label="B")
    scale = data.draw(st.sampled_from([1.0, 30.0]), label="scale")
    return {"args": {"chosen": _layout_arg(gen, (B,), layout, dtype, scale),
                     "rejected": _layout_arg(gen, (B,), layout, dtype, scale)},
            "loss": _draw_loss_options(data, gen, B, dtype)}


def _run_bt(case, t, backend):
    loss = {k: (v.to(t["chosen"].dtype) if isinstance(v, torch.Tensor) else v) for k, v in case["loss"].items()}
    return (rmk.bradley_terry_loss(t["chosen"], t["rejected"], **loss, backend=backend),)


def _draw_ranking(data, gen, layout):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    B = data.draw(_ragged(0, 9), label="B")
    K = data.draw(_ragged(1, 7), label="K")
    case = {"args": {"rewards": _layout_arg(gen, (B, K), layout, dtype, 2.0)},
            "reduction": data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")}
    if data.draw(st.booleans(), label="ragged K"):
        case["num_candidates"] = torch.randint(0, K + 1, (B,), generator=gen)
    return case


def _run_ranking(case, t, backend):
    return (rmk.ranking_loss(t["rewards"], num_candidates=case.get("num_candidates"), reduction=case["reduction"],
                             backend=backend),)


KL_ESTIMATORS = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"]


def _draw_ppo_inputs(data, gen, layout, names, B=None, T=None):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    B = data.draw(_ragged(0, 6), label="B") if B is None else B
    T = data.draw(_ragged(0, 29), label="T") if T is None else T
    args = {n: _layout_arg(gen, (B, T), layout, dtype) for n in names}
    mask = _mask(gen, B, T, data.draw(st.sampled_from(["right", "left", "holes"]), label="mask kind"))
    if B and data.draw(st.booleans(), label="empty row"):
        mask[data.draw(st.integers(0, B - 1), label="empty row index")] = False
    mask_dtype = data.draw(st.sampled_from([torch.bool, torch.int64, torch.float32]), label="mask dtype")
    return dtype, B, T, args, _with_layout(mask.to(mask_dtype), layout)


def _draw_ppo(data, gen, layout):
    dtype, B, _, args, mask = _draw_ppo_inputs(data, gen, layout, ["logprobs", "ref_logprobs", "values"])
    args["scores"] = _layout_arg(gen, (B,), "sliced" if layout == "sliced" else "contiguous", dtype, 2.0)
    opts = {"kl_coef": data.draw(st.sampled_from([0.0, 0.05, 1.0]), label="kl_coef"),
            "gamma": data.draw(st.sampled_from([1.0, 0.99, 0.0]), label="gamma"),
            "lam": data.draw(st.sampled_from([0.95, 1.0, 0.0]), label="lam"),
            "kl_estimator": data.draw(st.sampled_from(KL_ESTIMATORS), label="kl_estimator"),
            "kl_clamp": data.draw(st.sampled_from([None, 0.5, 10.0]), label="kl_clamp"),
            "score_clip": data.draw(st.sampled_from([None, 1.0]), label="score_clip"),
            "whiten": data.draw(st.booleans(), label="whiten"),
            "shift_mean": data.draw(st.booleans(), label="shift_mean"),
            "unbiased": data.draw(st.booleans(), label="unbiased"),
            "eps": data.draw(st.sampled_from([1e-8, 1e-3]), label="eps")}
    return {"args": args, "mask": mask, "opts": opts}


def _run_ppo(case, t, backend):
    out = rmk.ppo_advantages(t["logprobs"], t["ref_logprobs"], t["values"], t["scores"], case["mask"], **case["opts"],
                             backend=backend)
    return tuple(out)


def _draw_whiten(data, gen, layout):
    _, _, _, args, mask = _draw_ppo_inputs(data, gen, layout, ["x"])
    return {"args": args, "mask": mask,
            "opts": {"shift_mean": data.draw(st.booleans(), label="shift_mean"),
                     "unbiased": data.draw(st.booleans(), label="unbiased"),
                     "eps": data.draw(st.sampled_from([1e-8, 1e-3]), label="eps")}}


def _run_whiten(case, t, backend):
    return (rmk.masked_whiten(t["x"], case["mask"], **case["opts"], backend=backend),)


# Ops that compute in float32 (float64 for float64 inputs) from the inputs as they are, whatever
# their dtype: the bar is the float32 / float64 tolerance, floored (sums in another order), not the
# input dtype's (a bf16 input's 2e-2 would accept an output 1% off).
def _acc_tol(floor):
    def tol(dtype, what):
        rtol, atol = tolerance(torch.float64 if dtype == torch.float64 else torch.float32)
        return max(rtol, floor), max(atol, floor)
    return tol


SPECS = {
    "last_token_reward": OpSpec(lambda d, g, lay: _draw_pooling(d, g, lay, pairwise=False), _run_last_token_reward,
                                layouts=(*LAYOUTS, "overlapping")),
    "pairwise_reward_loss": OpSpec(lambda d, g, lay: _draw_pooling(d, g, lay, pairwise=True), _run_pairwise,
                                   layouts=(*LAYOUTS, "overlapping")),
    "last_token_index": OpSpec(_draw_index_only, lambda case, t, be: (rmk.last_token_index(**case["kw"], backend=be),),
                               differentiable=False),
    "bradley_terry_loss": OpSpec(_draw_bt, _run_bt, layouts=("contiguous", "sliced", "expanded")),
    "ranking_loss": OpSpec(_draw_ranking, _run_ranking),
    "ppo_advantages": OpSpec(_draw_ppo, _run_ppo, differentiable=False, tol=_acc_tol(1e-5)),
    "masked_whiten": OpSpec(_draw_whiten, _run_whiten, differentiable=False, tol=_acc_tol(1e-5)),
}

# Ops that land later (docs/ops.md sections 4-5): listed once rmkernels has them.
if hasattr(rmk, "gae"):
    def _draw_gae(data, gen, layout):
        _, _, _, args, mask = _draw_ppo_inputs(data, gen, layout, ["token_rewards", "values"])
        return {"args": args, "mask": mask, "opts": {"gamma": data.draw(st.sampled_from([1.0, 0.99, 0.0])),
                                                     "lam": data.draw(st.sampled_from([0.95, 1.0, 0.0]))}}

    SPECS["gae"] = OpSpec(_draw_gae, lambda case, t, be: tuple(rmk.gae(t["token_rewards"], t["values"], case["mask"],
                                                                       **case["opts"], backend=be)),
                          differentiable=False, tol=_acc_tol(1e-5))
if hasattr(rmk, "kl_estimate"):
    def _draw_kl(data, gen, layout):
        _, _, _, args, mask = _draw_ppo_inputs(data, gen, layout, ["logprobs", "ref_logprobs"])
        return {"args": args, "mask": mask if data.draw(st.booleans(), label="mask") else None,
                "opts": {"estimator": data.draw(st.sampled_from(KL_ESTIMATORS), label="estimator"),
                         "clamp": data.draw(st.sampled_from([None, 0.5, 10.0]), label="clamp")}}

    SPECS["kl_estimate"] = OpSpec(_draw_kl, lambda case, t, be: (rmk.kl_estimate(t["logprobs"], t["ref_logprobs"],
                                                                                 case["mask"], **case["opts"],
                                                                                 backend=be),),
                                  differentiable=False, tol=_acc_tol(1e-5))


# Critic-free group advantages (docs/ops.md section 5). No gradient flows through either op. The
# cpu backend computes in float64 and rounds once (float32, float64 for float64 inputs), so the
# bar is the float32/float64 tolerance, floored at 1e-6 (float64 sums in another order; the
# reinforce_pp_baseline whitening runs in float32): tests/test_group_advantages.py's.
def _draw_group_ids(data, gen, B):
    """Group ids of B rows in any order, ids anywhere in [0, B) (not dense), as a tensor, an
    int32 tensor, ``rmk.group_ids`` of string labels, or the labels themselves."""
    kind = data.draw(st.sampled_from(["random", "singletons", "one group", "pairs"]), label="groups")
    if kind == "singletons":
        g = torch.arange(B)
    elif kind == "one group":
        g = torch.zeros(B, dtype=torch.int64)
    elif kind == "pairs":  # groups of two, one group of one when B is odd
        g = torch.arange(B) // 2
    else:
        g = torch.randint(0, max(data.draw(_ragged(1, max(B, 1)), label="G"), 1), (B,), generator=gen)
    g = torch.randperm(max(B, 1), generator=gen)[g]  # relabel: any ids in [0, B)
    g = g[torch.randperm(B, generator=gen)]  # any row order
    given = data.draw(st.sampled_from(["int64", "int32", "group_ids", "labels"]), label="ids as")
    if given == "int32":
        return g.to(torch.int32)
    if given in ("group_ids", "labels"):
        labels = [f"prompt-{i}" for i in g.tolist()]
        return rmk.group_ids(labels) if given == "group_ids" else labels
    return g


def _draw_group_adv(data, gen, layout):
    token = data.draw(st.booleans(), label="token rewards")
    B = data.draw(_ragged(0, 12), label="B")
    if token:  # scores [B, T], summed over T; the mask has scores' shape
        dtype, B, T, args, mask = _draw_ppo_inputs(data, gen, layout, ["scores"], B=B)
    else:
        dtype, B, T, _, mask = _draw_ppo_inputs(data, gen, layout, [], B=B)
        args = {"scores": _layout_arg(gen, (B,), layout, dtype, 2.0)}
    if data.draw(st.booleans(), label="zero scores"):  # gpg counts the nonzero scores
        base = args["scores"].base
        base[torch.rand(base.shape, generator=gen) < 0.4] = 0.0
    if data.draw(st.booleans(), label="mask=None"):
        mask = None
    opts = {"single": data.draw(st.sampled_from(sorted(GROUP_SINGLES)), label="single"),
            "unbiased": data.draw(st.booleans(), label="unbiased"),
            "eps": data.draw(st.sampled_from([1e-6, 1e-9, 1e-4, 0.1]), label="eps"),
            "f_norm": data.draw(st.sampled_from([1.0, 2.5]), label="f_norm"),
            "whiten_eps": data.draw(st.sampled_from([1e-8, 1e-3]), label="whiten_eps")}
    return {"args": args, "ids": _draw_group_ids(data, gen, B), "mask": mask, "opts": opts}


def _run_group_adv(case, t, backend):
    """Every estimator on each drawn input (cheap at these sizes, and no estimator is left to
    chance): outputs 2 i, 2 i + 1 are (seq_advantages, advantages) of GROUP_ESTIMATOR_NAMES[i]."""
    return tuple(out for est in GROUP_ESTIMATOR_NAMES
                 for out in rmk.group_advantages(t["scores"], case["ids"], case["mask"], estimator=est,
                                                 **case["opts"], backend=backend))


GROUP_ESTIMATOR_NAMES = sorted(GROUP_ESTIMATORS)


def _draw_rpp_returns(data, gen, layout):
    _, _, _, args, mask = _draw_ppo_inputs(data, gen, layout, ["token_rewards"])
    return {"args": args, "mask": None if data.draw(st.booleans(), label="mask=None") else mask,
            "gamma": data.draw(st.sampled_from([1.0, 0.99, 0.5, 0.0]), label="gamma")}


def _run_rpp_returns(case, t, backend):
    return (rmk.reinforce_pp_returns(t["token_rewards"], case["mask"], gamma=case["gamma"], backend=backend),)


def _draw_reinforce(data, gen, layout):
    dtype, B, _, args, mask = _draw_ppo_inputs(data, gen, layout, ["token_rewards"])
    args["baselines"] = _layout_arg(gen, (B,), "sliced" if layout == "sliced" else "contiguous", dtype, 2.0)
    return {"args": args, "mask": None if data.draw(st.booleans(), label="mask=None") else mask,
            "gamma": data.draw(st.sampled_from([1.0, 0.99, 0.5, 0.0]), label="gamma"),
            "unbiased": data.draw(st.booleans(), label="unbiased"),
            "eps": data.draw(st.sampled_from([1e-8, 1e-3]), label="eps")}


def _run_reinforce_pp(case, t, backend):
    return tuple(rmk.reinforce_pp_advantages(t["token_rewards"], case["mask"], gamma=case["gamma"],
                                             unbiased=case["unbiased"], eps=case["eps"], backend=backend))


def _run_remax(case, t, backend):
    return tuple(rmk.remax_advantages(t["token_rewards"], t["baselines"], case["mask"], backend=backend))


SPECS["group_advantages"] = OpSpec(_draw_group_adv, _run_group_adv, differentiable=False, tol=_acc_tol(1e-6))
SPECS["reinforce_pp_returns"] = OpSpec(_draw_rpp_returns, _run_rpp_returns, differentiable=False,
                                       tol=_acc_tol(1e-5))
SPECS["reinforce_pp_advantages"] = OpSpec(_draw_reinforce, _run_reinforce_pp, differentiable=False,
                                          tol=_acc_tol(1e-5))
SPECS["remax_advantages"] = OpSpec(_draw_reinforce, _run_remax, differentiable=False, tol=_acc_tol(1e-5))


# Token log-probs from hidden states (docs/ops.md section 6): forward and the gradients of hidden,
# weight and bias from both outputs. The chunk policy is drawn too: the default one (one
# vocabulary chunk at these sizes) or a tiny one (VOCAB_CHUNK / TILE_ELEMS patched), so V spans
# several vocabulary chunks (a ragged last one) and N several token chunks.
def _token_logprobs_tol(dtype, what):
    """tests/test_token_logprobs.py's bars: fp32 outputs 10x, gradients 50x the fp32 atol
    (V-long sums); fp16/bf16 inputs are computed in fp32 on the rounded values, so the outputs
    meet a fp32-like bar and the gradients (fp32, rounded once to the input dtype) the dtype's."""
    if dtype == torch.float64:
        return (1e-10, 1e-10) if what == "output" else (1e-10, 5e-10)
    if dtype == torch.float32:
        return (2e-5, 2e-4) if what == "output" else (2e-5, 1e-3)
    return (5e-4, 5e-4) if what == "output" else tolerance(dtype)


@contextlib.contextmanager
def _chunk_policy(case):
    chunks = case["chunks"]
    if chunks is None:
        yield
        return
    vocab_chunk, token_chunk = chunks
    with mock.patch.dict(tlp.VOCAB_CHUNK, {"cpu": vocab_chunk}), \
            mock.patch.dict(tlp.TILE_ELEMS, {"cpu": vocab_chunk * token_chunk}):
        assert tlp.chunk_sizes(10**6, 10**6, "cpu") == (token_chunk, vocab_chunk)  # the patch is what runs
        yield


def _draw_token_logprobs(data, gen, layout):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    if data.draw(st.sampled_from([2, 3]), label="hidden rank") == 2:
        lead = (data.draw(_ragged(0, 13), label="N"),)
    else:
        lead = (data.draw(_ragged(0, 3), label="B"), data.draw(_ragged(0, 7), label="T"))
    H = data.draw(st.sampled_from([1, 2, 5, 17, 33]), label="H")
    V = data.draw(_ragged(1, 37), label="V")
    args = {"hidden": _layout_arg(gen, (*lead, H), layout, dtype),
            "weight": _layout_arg(gen, (V, H), data.draw(st.sampled_from(["contiguous", "sliced"]), label="weight"),
                                  dtype, 0.5)}
    if data.draw(st.booleans(), label="bias"):
        args["bias"] = _layout_arg(gen, (V,), "contiguous", dtype)
    ignore_index = data.draw(st.sampled_from([-100, -1, 0, 2]), label="ignore_index")
    targets = torch.randint(0, V, lead, generator=gen)
    targets[torch.rand(lead, generator=gen) < 0.25] = ignore_index
    return {"args": args, "targets": targets, "ignore_index": ignore_index,
            "temperature": data.draw(st.sampled_from([1.0, 0.7, 2.5]), label="temperature"),
            "return_entropy": data.draw(st.booleans(), label="return_entropy"),
            "chunks": data.draw(st.sampled_from([None, (3, 2), (7, 5), (16, 1)]), label="(vocab, token) chunk")}


def _run_token_logprobs(case, t, backend):
    out = rmk.token_logprobs(t["hidden"], t["weight"], case["targets"], bias=t.get("bias"),
                             temperature=case["temperature"], return_entropy=case["return_entropy"],
                             ignore_index=case["ignore_index"], backend=backend)
    return tuple(out) if case["return_entropy"] else (out,)


SPECS["token_logprobs"] = OpSpec(_draw_token_logprobs, _run_token_logprobs, tol=_token_logprobs_tol,
                                 context=_chunk_policy)


# ---------------------------------------------------------------------------------------
# The property: cpu == reference, forward and backward
# ---------------------------------------------------------------------------------------
def _check(spec, case, backend="cpu"):
    with spec.context(case):
        _check_in_context(spec, case, backend)


def _grad_magnitudes(args, g_views):
    """Per base element, the sum of |the reference's gradient| over the view elements that read
    it: where a view reads an element more than once (expanded, overlapping), autograd sums
    their gradients, each rounded to the input dtype, into that element's, and the rounding error
    of that sum scales with these terms, not with their (possibly cancelling) sum. For a view
    that reads each element once it is |the gradient| itself."""
    out = {}
    for name, g in g_views.items():
        if g is not None:
            base = torch.zeros_like(args[name].base, requires_grad=True)
            out[name] = torch.autograd.grad(args[name].view(base), base, grad_outputs=g.abs())[0]
    return out


def _check_in_context(spec, case, backend_under_test="cpu"):
    args = case["args"]
    grads = spec.differentiable and bool(args)
    out = {}
    for backend, dtype in ((backend_under_test, None), ("reference", torch.float64)):
        bases, views = {}, {}
        for name, a in args.items():
            bases[name], views[name] = a.make(dtype, requires_grad=grads)
        res = spec.run(case, views, backend)
        gen = torch.Generator().manual_seed(1234)
        g_bases = None
        if grads:
            diff = [r for r in res if r.requires_grad]
            weights = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(r.dtype) for r in diff]
            if diff:
                total = sum((r * w).sum() for r, w in zip(diff, weights))
                g = torch.autograd.grad(total, list(bases.values()) + list(views.values()), allow_unused=True)
                g_bases = dict(zip(bases, g[:len(bases)]))
                if backend == "reference":
                    magnitudes = _grad_magnitudes(args, dict(zip(views, g[len(bases):])))
        out[backend] = (res, g_bases)
    dtype = next(iter(args.values())).dtype if args else torch.float32
    rtol, atol = spec.tol(dtype, "output")
    (got, got_g), (exp, exp_g) = out[backend_under_test], out["reference"]
    assert len(got) == len(exp)
    for i, (a, e) in enumerate(zip(got, exp)):
        if a.is_floating_point():
            assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), f"output {i}: {a.dtype}"
            assert_close(a, e, rtol=rtol, atol=atol, name=f"output {i}")
        else:
            assert a.dtype == e.dtype and torch.equal(a, e), f"output {i}: {a} != {e}"
    assert (got_g is None) == (exp_g is None)
    rtol, atol = spec.tol(dtype, "grad")
    for name in got_g or {}:
        a, e = got_g[name], exp_g[name]
        assert (a is None) == (e is None), f"grad {name}: one backend gives none"
        if a is not None:
            assert a.dtype == args[name].dtype
            assert_close(a, e, rtol=rtol, atol=atol, name=f"grad {name}", magnitude=magnitudes.get(name))


def _params():
    return [pytest.param(op, layout, id=f"{op}-{layout}") for op, spec in SPECS.items() for layout in spec.layouts]


@pytest.mark.parametrize("op,layout", _params())
@FUZZ
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_cpu_matches_reference(op, layout, data, seed):
    spec = SPECS[op]
    _check(spec, spec.draw(data, torch.Generator().manual_seed(seed), layout))


# Under the Triton interpreter a call costs ~10-100x a compiled one: fewer examples, the same
# derandomized draws (CI) or random ones (long profile).
FUZZ_TRITON = settings(FUZZ, max_examples=6 if PROFILE == "ci" else 100)


@pytest.mark.triton
@pytest.mark.parametrize("op,layout", _params())
@FUZZ_TRITON
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_triton_matches_reference(op, layout, data, seed):
    """The same property for the Triton backend on CPU tensors (TRITON_INTERPRET=1). bfloat16
    inputs are left out: the interpreter runs on numpy, which has no bfloat16."""
    from utils import TRITON_INTERPRET

    if not TRITON_INTERPRET:
        pytest.skip("triton on CPU tensors runs only under TRITON_INTERPRET=1 (no GPU here)")
    spec = SPECS[op]
    case = spec.draw(data, torch.Generator().manual_seed(seed), layout)
    hypothesis.assume(all(a.dtype != torch.bfloat16 for a in case["args"].values()))
    _check(spec, case, "triton")


_LABELS = st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b", "prompt-7", ""]),
                   st.tuples(st.sampled_from(["t", "u"]), st.integers(0, 1)))


@FUZZ
@given(labels=st.lists(_LABELS, max_size=12), container=st.sampled_from(["list", "tuple", "object array"]))
def test_group_ids_of_labels(labels, container):
    """rmk.group_ids of hashable labels: int64 ids 0 .. G-1 numbered by first appearance, so equal
    labels <-> equal ids (the first row of each new label gets the next id)."""
    uids = {"list": labels, "tuple": tuple(labels)}.get(container)
    if container == "object array":
        uids = np.empty(len(labels), dtype=object)
        for i, label in enumerate(labels):  # element by element: a tuple label stays one element
            uids[i] = label
    ids = rmk.group_ids(uids)
    assert ids.dtype == torch.int64 and ids.shape == (len(labels),)
    first_seen = {}
    assert ids.tolist() == [first_seen.setdefault(u, len(first_seen)) for u in labels]


@FUZZ
@given(values=st.lists(st.integers(-2**40, 2**40) | st.sampled_from([0, 1, 5]), max_size=12),
       container=st.sampled_from(["int64 tensor", "int32 tensor", "int64 numpy", "float numpy"]))
def test_group_ids_of_numbers(values, container):
    """Numeric numpy arrays and integer tensors: ids numbered in sorted order of the values
    (np.unique / torch.unique), so again equal values <-> equal ids, dense 0 .. G-1."""
    if container == "int32 tensor":
        values = [v % 2**31 for v in values]
    uids = {"int64 tensor": lambda: torch.tensor(values, dtype=torch.int64),
            "int32 tensor": lambda: torch.tensor(values, dtype=torch.int32),
            "int64 numpy": lambda: np.array(values, dtype=np.int64),
            "float numpy": lambda: np.array(values, dtype=np.float64)}[container]()
    ids = rmk.group_ids(uids)
    rank = {v: i for i, v in enumerate(sorted(set(uids.tolist())))}
    assert ids.dtype == torch.int64 and ids.shape == (len(values),)
    assert ids.tolist() == [rank[v] for v in uids.tolist()]


def test_every_public_op_is_fuzzed():
    """A new public op (a function of rmkernels.__all__ backed by a custom op) needs an OpSpec."""
    not_ops = {"available_backends", "backend_report", "use_backend", "checks", "patch_hf_reward_model",
               "unpatch_hf_reward_model",
               # not custom ops: group_ids factorises labels on the host (its own property tests
               # above); causal_lm_logprobs runs a model and hands its hidden states to
               # token_logprobs, which has an OpSpec
               "group_ids", "causal_lm_logprobs"}
    public = {n for n in rmk.__all__ if callable(getattr(rmk, n)) and n[0].islower() and n not in not_ops}
    assert public <= set(SPECS), f"public ops without a fuzz spec: {sorted(public - set(SPECS))}"


# The torch.ops.rmkernels public ops that no function of rmkernels.__all__ is named after, and
# the OpSpec whose run goes through them (backwards: the differentiable specs take gradients;
# the index ops: last_token_reward / last_token_index by attention_mask, lengths, cu_seqlens;
# the whitening building blocks: masked_whiten; ppo_gae: ppo_advantages).
FUZZED_THROUGH = {
    "bradley_terry_loss_backward": "bradley_terry_loss", "last_token_reward_backward": "last_token_reward",
    "pairwise_reward_loss_backward": "pairwise_reward_loss", "ranking_loss_backward": "ranking_loss",
    "token_logprobs_backward": "token_logprobs", "check_mask_index": "last_token_index",
    "cu_seqlens_index": "last_token_index", "lengths_index": "last_token_index", "masked_row_stats": "masked_whiten",
    "masked_centered_sq": "masked_whiten", "masked_whiten_apply": "masked_whiten", "ppo_gae": "ppo_advantages",
    "reinforce_advantages": "reinforce_pp_advantages",
}


def test_every_custom_op_is_fuzzed():
    """Every public custom op (ops/_schemas.py's PUBLIC_OPS) has an OpSpec of its own or is run
    by one (FUZZED_THROUGH); a new op in neither fails here."""
    from rmkernels.ops._schemas import PUBLIC_OPS

    missing = sorted(n for n in PUBLIC_OPS if n not in SPECS and FUZZED_THROUGH.get(n) not in SPECS)
    assert not missing, f"custom ops no fuzz spec runs: {missing}"
