"""The eager fast path (``rmkernels._library.eager_fast_path``).

In plain eager mode every public function runs its public op's body (the backend routing)
directly, in a ``torch.autograd.Function`` made of the op's own ``setup_context`` and
backward, instead of dispatching ``torch.ops.rmkernels.<op>``. Here: both paths give the
same bits (outputs, gradients, dtypes, strides), on every backend; the public ops are used
wherever the fast path is not safe (compile, fake tensors, modes, functorch, subclasses,
``RMKERNELS_EAGER_FAST_PATH=0``); gradcheck through the fast path.
"""
import subprocess
import sys

import pytest
import torch
from torch.autograd.profiler import profile
from utils import backend_params, skip_unless_available, subprocess_env

import rmkernels as rmk
from rmkernels import _library

REDUCTIONS = ["mean", "sum", "none"]
PUBLIC_OPS = {"last_token_index", "check_mask_index", "last_token_reward", "bradley_terry_loss", "pairwise_reward_loss",
              "ranking_loss", "ppo_advantages", "masked_whiten"}


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def _fresh(t):
    """A copy of an input, requiring grad as the original does (leaf of its own graph)."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().clone().requires_grad_(t.requires_grad)
    return t


def _outputs_and_grads(fn, inputs, use):
    """fn(*inputs) as a tuple, then the gradients w.r.t. the inputs that require grad, from
    fixed random upstream gradients of the outputs numbered in `use` (the others unused)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = ()
    if wrt and use and torch.is_grad_enabled():
        gen = torch.Generator().manual_seed(1234)
        used = [outs[i] for i in use]
        seeds = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in used]
        grads = torch.autograd.grad(used, wrt, seeds)
    return outs + grads


def _on_both_paths(fn, inputs, use=(0,), grad_mode=torch.enable_grad):
    """(fast, op): `_outputs_and_grads` on the fast path (checked to be taken) and with the
    public ops forced, each on its own copy of `inputs`."""
    real, taken = _library.use_eager_path, []

    def spy(*args):
        taken.append(real(*args))
        return taken[-1]

    results = []
    for predicate in (spy, lambda *args: False):
        copies = [_fresh(t) for t in inputs]
        with pytest.MonkeyPatch.context() as m, grad_mode():
            m.setattr(_library, "use_eager_path", predicate)
            results.append(_outputs_and_grads(fn, copies, use))
    assert taken and all(taken), "the fast path was not taken in plain eager mode"
    return results


def _bits(t):
    if t.is_floating_point():
        return t.detach().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t.detach()


def _assert_same(fast, op, what):
    assert len(fast) == len(op), what
    for i, (a, b) in enumerate(zip(fast, op)):
        name = f"{what}: output {i}"
        assert (a.dtype, a.shape, a.stride(), a.device) == (b.dtype, b.shape, b.stride(), b.device), (
            f"{name}: {a.dtype} {tuple(a.shape)} {a.stride()} vs {b.dtype} {tuple(b.shape)} {b.stride()}")
        assert a.requires_grad == b.requires_grad, f"{name}: requires_grad {a.requires_grad} vs {b.requires_grad}"
        assert torch.equal(_bits(a), _bits(b)), f"{name}: the fast path and the op path differ"


def _float_dtypes(backend, device):
    # numpy (the Triton interpreter's engine) has no bfloat16
    if backend == "triton" and device == "cpu":
        return (torch.float32, torch.float64)
    return (torch.float32, torch.float64, torch.bfloat16)


def _ragged_mask(B, T, device):
    m = torch.rand(B, T, device=device) > 0.4
    m[torch.arange(B, device=device), torch.randint(0, T, (B,), device=device)] = True  # every row keeps a token
    return m.long()


def _public_ops_called(fn):
    """Names of the public ops (not the kernel ops) that the dispatcher saw while fn ran."""
    with profile() as prof:
        fn()
    names = {e.name.split("::", 1)[1] for e in prof.function_events if e.name.startswith("rmkernels::")}
    return {n.removesuffix("_backward") for n in names if not n.endswith("_kernel")}


# ---------------------------------------------------------------------------------------
# Same bits on both paths, every public function and backend
# ---------------------------------------------------------------------------------------
POOL_NEEDS = [("hidden", "weight", "bias"), ("hidden",), ("weight", "bias"), ("weight",), ()]


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("position", ["attention_mask", "lengths", "cu_seqlens"])
def test_last_token_reward_same_bits(backend, device, position):
    skip_unless_available(backend, device)
    for dtype in _float_dtypes(backend, device):
        for needs in POOL_NEEDS:
            for bias in (True, False):
                B, T, H, K = torch.randint(1, 6, ()).item(), torch.randint(1, 20, ()).item(), 33, 2
                hidden = torch.randn(B, T, H, device=device).to(dtype)
                lengths = torch.randint(1, T + 1, (B,), device=device)
                pos = {"attention_mask": _ragged_mask(B, T, device), "lengths": lengths}.get(position)
                if position == "cu_seqlens":  # packed [N, H]
                    pos = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
                    hidden = hidden.reshape(B * T, H)[: int(pos[-1])]
                w = torch.randn(K, H, device=device).to(dtype)
                b = torch.randn(K, device=device).to(dtype) if bias else None
                for name, t in (("hidden", hidden), ("weight", w), ("bias", b)):
                    if t is not None:
                        t.requires_grad_(name in needs)
                fast, op = _on_both_paths(
                    lambda h, w, b, pos=pos: rmk.last_token_reward(h, w, b, backend=backend, **{position: pos}),
                    (hidden, w, b))
                _assert_same(fast, op, f"{dtype} needs={needs} bias={bias}")


BT_OPTIONS = [
    {},
    {"margin": "tensor", "weights": "tensor", "label_smoothing": 0.1, "center_coef": 0.01},
    {"margin": 0.3, "weights": 2.0, "center_coef": 0.05},
]


def _bt_options(opts, B, device):
    return {k: (torch.rand(B, device=device) + 0.1 if v == "tensor" else v) for k, v in opts.items()}


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bradley_terry_loss_same_bits(backend, device, reduction):
    skip_unless_available(backend, device)
    for dtype in _float_dtypes(backend, device):
        for i, opts in enumerate(BT_OPTIONS):
            for needs in (("chosen", "rejected"), ("chosen",), ("rejected",)):
                B = torch.randint(1, 40, ()).item()
                shape = (B, 1) if i == 1 else (B,)  # [B, 1] inputs: views on the way in
                c = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_("chosen" in needs)
                r = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_("rejected" in needs)
                kw = _bt_options(opts, B, device)
                fast, op = _on_both_paths(
                    lambda c, r, kw=kw: rmk.bradley_terry_loss(c, r, reduction=reduction, backend=backend, **kw),
                    (c, r))
                _assert_same(fast, op, f"{dtype} {opts} needs={needs}")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_pairwise_reward_loss_same_bits(backend, device, reduction):
    """Including the backward of the rewards alone (no gradient reaches the loss: the op's
    backward gets a materialized zero grad_loss) and of the loss alone."""
    skip_unless_available(backend, device)
    uses = {"loss": (0,), "chosen rewards": (1,), "all": (0, 1, 2)}
    for dtype in _float_dtypes(backend, device):
        for what, use in uses.items():
            for needs, bias in ((("hidden", "weight", "bias"), True), (("hidden",), False), (("weight",), True)):
                B, T, H = torch.randint(1, 5, ()).item(), torch.randint(1, 12, ()).item(), 24
                hidden = torch.randn(2 * B, T, H, device=device).to(dtype).requires_grad_("hidden" in needs)
                w = (torch.randn(1, H, device=device) / H ** 0.5).to(dtype).requires_grad_("weight" in needs)
                b = torch.randn(1, device=device).to(dtype).requires_grad_("bias" in needs) if bias else None
                mask = _ragged_mask(2 * B, T, device)
                kw = _bt_options(BT_OPTIONS[1], B, device)
                fast, op = _on_both_paths(
                    lambda h, w, b, mask=mask, kw=kw: rmk.pairwise_reward_loss(
                        h, w, b, attention_mask=mask, reduction=reduction, backend=backend, **kw),
                    (hidden, w, b), use=use)
                _assert_same(fast, op, f"{dtype} backward of {what} needs={needs} bias={bias}")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ranking_loss_same_bits(backend, device, reduction):
    skip_unless_available(backend, device)
    for dtype in _float_dtypes(backend, device):
        for ragged in (False, True):
            B, K = torch.randint(1, 9, ()).item(), torch.randint(2, 7, ()).item()
            x = torch.randn(B, K, device=device).to(dtype).requires_grad_()
            nc = torch.randint(0, K + 1, (B,), device=device) if ragged else None
            fast, op = _on_both_paths(
                lambda x, nc=nc: rmk.ranking_loss(x, num_candidates=nc, reduction=reduction, backend=backend), (x,))
            _assert_same(fast, op, f"{dtype} ragged={ragged}")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_no_autograd_recording_same_bits(backend, device, grad_mode):
    """Inputs requiring grad but autograd off: the op's body is called directly."""
    skip_unless_available(backend, device)
    B, T, H = 3, 7, 16
    hidden = torch.randn(2 * B, T, H, device=device, requires_grad=True)
    w = torch.randn(1, H, device=device, requires_grad=True)
    mask = _ragged_mask(2 * B, T, device)
    calls = [
        lambda h, w: rmk.last_token_reward(h, w, attention_mask=mask, backend=backend),
        lambda h, w: rmk.pairwise_reward_loss(h, w, attention_mask=mask, backend=backend),
        lambda h, w: rmk.bradley_terry_loss(h[:B, 0, 0], h[B:, 0, 0], backend=backend),
        lambda h, w: rmk.ranking_loss(h[:, 0, :4], backend=backend),
    ]
    for fn in calls:
        fast, op = _on_both_paths(fn, (hidden, w), grad_mode=grad_mode)
        _assert_same(fast, op, grad_mode.__name__)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_autocast_same_bits(backend, device):
    """Autocast reaches the op's body on both paths (it has no autocast rule of its own)."""
    skip_unless_available(backend, device)
    B, T, H = 3, 5, 16
    hidden = torch.randn(2 * B, T, H, device=device, requires_grad=True)
    w = torch.randn(1, H, device=device, requires_grad=True)
    mask = _ragged_mask(2 * B, T, device)

    def fn(h, w):
        with torch.autocast(device, dtype=torch.bfloat16):
            r = rmk.last_token_reward(h, w, attention_mask=mask, backend=backend)
            return r, rmk.bradley_terry_loss(r[:B], r[B:], backend=backend)

    fast, op = _on_both_paths(fn, (hidden, w), use=(1,))
    _assert_same(fast, op, "autocast")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_ops_without_gradients_same_bits(backend, device):
    skip_unless_available(backend, device)
    for dtype in (torch.float32, torch.float64):
        B, T = torch.randint(1, 6, ()).item(), torch.randint(1, 40, ()).item()
        lp, ref, v = (torch.randn(B, T, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        scores = torch.randn(B, device=device, dtype=dtype)
        mask = torch.rand(B, T, device=device) > 0.3
        for kw in ({}, {"whiten": False, "kl_estimator": "low_var_kl", "score_clip": 1.0},
                   {"kl_estimator": "k3", "kl_clamp": 2.0, "shift_mean": False, "unbiased": False, "gamma": 0.9}):
            fast, op = _on_both_paths(
                lambda lp, ref, v, scores=scores, mask=mask, kw=kw: tuple(rmk.ppo_advantages(
                    lp, ref, v, scores, mask, kl_coef=0.05, backend=backend, **kw)), (lp, ref, v), use=())
            _assert_same(fast, op, f"ppo_advantages {dtype} {kw}")
        for kw in ({}, {"shift_mean": False, "unbiased": False}):
            fast, op = _on_both_paths(
                lambda x, mask=mask, kw=kw: rmk.masked_whiten(x, mask.int(), backend=backend, **kw), (v,), use=())
            _assert_same(fast, op, f"masked_whiten {dtype} {kw}")
        fast, op = _on_both_paths(
            lambda r, v, mask=mask: rmk.gae(r, v, mask, gamma=0.9, lam=0.8, backend=backend), (lp, v), use=())
        _assert_same(fast, op, f"gae {dtype}")
        for kw in ({}, {"estimator": "low_var_kl", "clamp": 3.0}, {"estimator": "k2", "mask": mask}):
            fast, op = _on_both_paths(
                lambda lp, ref, kw=kw: rmk.kl_estimate(lp, ref, backend=backend, **kw), (lp, ref), use=())
            _assert_same(fast, op, f"kl_estimate {dtype} {kw}")
    mask = _ragged_mask(5, 17, device)
    ids = torch.randint(1, 9, (5, 17), device=device)
    ids[:, -3:] = 0
    for fn in (lambda m: rmk.last_token_index(m, backend=backend),
               lambda m: rmk.last_token_index(m.float(), backend=backend),
               lambda m: rmk.last_token_index(input_ids=ids, pad_token_id=0, backend=backend)):
        fast, op = _on_both_paths(fn, (mask,), use=())
        _assert_same(fast, op, "last_token_index")


# ---------------------------------------------------------------------------------------
# Which path is taken
# ---------------------------------------------------------------------------------------
def _call_every_function(backward=True):
    """Every public function on small CPU inputs (cpu backend), with the backward."""
    h = torch.randn(4, 5, 8, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(1, 8))  # a Parameter is a plain tensor here
    mask = _ragged_mask(4, 5, "cpu")
    r = rmk.last_token_reward(h, w, attention_mask=mask)
    loss = (rmk.bradley_terry_loss(r[:2, 0], r[2:, 0]) + rmk.pairwise_reward_loss(h, w, attention_mask=mask)[0]
            + rmk.ranking_loss(r.reshape(2, 2)))
    if backward:
        torch.autograd.grad(loss, (h, w))
    x = torch.randn(2, 6)
    rmk.ppo_advantages(x, x, x, x[:, 0], x > 0, kl_coef=0.1)
    rmk.masked_whiten(x, x > 0)
    return loss


def test_eager_mode_skips_the_public_ops(monkeypatch):
    skip_unless_available("cpu", "cpu")
    assert _public_ops_called(_call_every_function) == set()
    monkeypatch.setattr(_library, "EAGER_FAST_PATH", False)  # what RMKERNELS_EAGER_FAST_PATH=0 sets
    assert _public_ops_called(_call_every_function) == PUBLIC_OPS


def test_modes_use_the_public_ops():
    skip_unless_available("cpu", "cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert _public_ops_called(_call_every_function) == PUBLIC_OPS
    with torch.device("cpu"):  # a torch function mode
        assert _public_ops_called(_call_every_function) == PUBLIC_OPS
    # fake tensors (pooling is left out: its data checks of CPU tensors need real values)
    with FakeTensorMode():
        c, r = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
        x = torch.randn(2, 6)

        def fn():
            loss = rmk.bradley_terry_loss(c, r, reduction="none").sum() + rmk.ranking_loss(c.reshape(2, 3))
            torch.autograd.grad(loss, (c, r))
            out = rmk.ppo_advantages(x, x, x, x[:, 0], x > 0, kl_coef=0.1).advantages + rmk.masked_whiten(x, x > 0)
            assert type(loss).__name__ == "FakeTensor" and type(out).__name__ == "FakeTensor"

        assert _public_ops_called(fn) == {"bradley_terry_loss", "ranking_loss", "ppo_advantages", "masked_whiten"}


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_functorch_and_tracing_use_the_public_ops():
    """The public ops have no functorch rule: under torch.func transforms (and jit tracing)
    the fast path is off, so the op (and its error or its rule) decides."""
    seen = []

    def f(x):
        seen.append(_library.use_eager_path(x))
        return x.sum()

    x = torch.randn(3)
    torch.func.grad(f)(x)
    torch.func.vmap(f)(x[None])
    torch.jit.trace(f, (x,), check_trace=False)
    assert seen and not any(seen)
    assert _library.use_eager_path(x, torch.nn.Parameter(x), None, 1.0, "cpu")


def test_subclasses_use_the_public_ops():
    skip_unless_available("cpu", "cpu")

    class Sub(torch.Tensor):
        pass

    c = torch.randn(5).as_subclass(Sub).requires_grad_()
    r = torch.randn(5, requires_grad=True)
    assert not _library.use_eager_path(r, c)
    called = _public_ops_called(lambda: torch.autograd.grad(rmk.bradley_terry_loss(c, r), (c, r)))
    assert called == {"bradley_terry_loss"}


def test_dead_functorch_wrappers_use_the_public_ops():
    """A tensor that left a torch.func transform (a "dead" wrapper) is unwrapped by
    ``autograd.Function.apply``'s Python layer, which the fast path skips (it calls the C apply):
    such an argument sends the call to the public op, and the result and gradient are those of a
    plain tensor."""
    skip_unless_available("cpu", "cpu")
    leaked = []

    def f(x):
        leaked.append(x)
        return x.sum()

    x = torch.randn(6)
    torch.func.grad(f)(x)
    dead = leaked[0]
    assert type(dead) is torch.Tensor and torch._C._functorch.is_functorch_wrapped_tensor(dead)
    assert not _library.use_eager_path(dead) and _library.use_eager_path(x)
    r = torch.randn(6, requires_grad=True)
    called = _public_ops_called(lambda: torch.autograd.grad(rmk.bradley_terry_loss(dead, r), (r,)))
    assert called == {"bradley_terry_loss"}
    (want,) = torch.autograd.grad(rmk.bradley_terry_loss(x, r), (r,))
    (got,) = torch.autograd.grad(rmk.bradley_terry_loss(dead, r), (r,))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_env_switch_read_at_import():
    code = ("import torch, rmkernels as rmk; from rmkernels import _library; "
            "c = torch.randn(4, requires_grad=True); "
            "print(_library.EAGER_FAST_PATH, type(rmk.bradley_terry_loss(c, c.detach()).grad_fn).__name__)")
    out = {}
    for value in ("0", "1", None):
        env = subprocess_env(RMKERNELS_EAGER_FAST_PATH=value)  # None: unset
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        out[value] = res.stdout.split()
    assert out["0"] == ["False", "GeneratedBackwardFor_rmkernels_bradley_terry_loss_defaultBackward"]
    assert out["1"] == out[None] == ["True", "bradley_terry_loss_eagerBackward"]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_graph_holds_the_public_ops(backend):
    """torch.compile(fullgraph=True) traces the public ops (never the fast path), and the
    compiled function matches eager (the fast path) in value and gradient."""
    skip_unless_available(backend, "cpu")
    torch._dynamo.reset()
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    h = torch.randn(4, 5, 8, requires_grad=True)
    w = torch.randn(1, 8, requires_grad=True)
    mask = _ragged_mask(4, 5, "cpu")
    x = torch.randn(2, 6)

    def f(h, w, mask, x):
        r = rmk.last_token_reward(h, w, attention_mask=mask, backend=backend)
        loss = (rmk.bradley_terry_loss(r[:2, 0], r[2:, 0], backend=backend)
                + rmk.pairwise_reward_loss(h, w, attention_mask=mask, backend=backend)[0]
                + rmk.ranking_loss(r.reshape(2, 2), backend=backend))
        adv = rmk.ppo_advantages(x, x, x, x[:, 0], x > 0, kl_coef=0.1, backend=backend).advantages
        return loss, adv + rmk.masked_whiten(x, x > 0, backend=backend)

    got = torch.compile(f, fullgraph=True, backend=record)(h, w, mask, x)
    for name in PUBLIC_OPS:
        assert any(f"rmkernels.{name}" in t for t in targets), f"{name} is not in the graph: {targets}"
    assert not any("eager" in t for t in targets)
    expect = f(h, w, mask, x)
    for g, e in zip(got, expect):
        assert torch.equal(g, e)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got[0], (h, w)),
                                                 torch.autograd.grad(expect[0], (h, w))))


# ---------------------------------------------------------------------------------------
# Autograd details of the fast path
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64_through_the_fast_path(backend):
    skip_unless_available(backend, "cpu")
    f64 = dict(dtype=torch.float64, requires_grad=True)
    h, w, b = torch.randn(4, 3, 5, **f64), torch.randn(1, 5, **f64), torch.randn(1, **f64)
    c, r, x = torch.randn(6, **f64), torch.randn(6, **f64), torch.randn(3, 4, **f64)
    mask = _ragged_mask(4, 3, "cpu")
    m, wt, nc = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5, torch.tensor([4, 1, 3])
    cases = [
        (lambda h, w, b: rmk.last_token_reward(h, w, b, attention_mask=mask, backend=backend), (h, w, b)),
        (lambda c, r: rmk.bradley_terry_loss(c, r, margin=m, weights=wt, label_smoothing=0.1, center_coef=0.05,
                                             reduction="none", backend=backend), (c, r)),
        (lambda h, w, b: rmk.pairwise_reward_loss(h, w, b, attention_mask=mask, margin=0.2, center_coef=0.05,
                                                  backend=backend), (h, w, b)),
        (lambda h, w: rmk.pairwise_reward_loss(h, w, attention_mask=mask, backend=backend)[1], (h, w)),
        (lambda x: rmk.ranking_loss(x, num_candidates=nc, reduction="sum", backend=backend), (x,)),
    ]
    for fn, inputs in cases:
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        assert type(out.grad_fn).__name__.endswith("_eagerBackward") or type(
            out.grad_fn.next_functions[0][0]).__name__.endswith("_eagerBackward")
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_backward_gets_the_same_need_flags(backend, monkeypatch):
    """The need_* flags that reach the backward routing (kernel or reference) are those of
    the op path, for every subset of inputs requiring grad."""
    skip_unless_available(backend, "cpu")
    from rmkernels.ops import bt_loss, pooling

    # the backward kernels' implementation of this backend (the reference function, or the kernel op)
    attr = "reference" if backend == "reference" else "op"
    targets = {"pool": (pooling.bwd_kernel, 3), "bt": (bt_loss.bwd_kernel, 2)}
    flags = []
    for kernel, n in targets.values():
        real = getattr(kernel, attr)
        monkeypatch.setattr(kernel, attr, lambda *a, real=real, n=n: flags.append(a[-n:]) or real(*a))
    mask = _ragged_mask(4, 6, "cpu")
    for needs in POOL_NEEDS:
        h, w, b = torch.randn(4, 6, 8), torch.randn(1, 8), torch.randn(1)
        for name, t in (("hidden", h), ("weight", w), ("bias", b)):
            t.requires_grad_(name in needs)
        expected = tuple(name in needs for name in ("hidden", "weight", "bias"))
        flags.clear()
        _on_both_paths(lambda h, w, b: rmk.last_token_reward(h, w, b, attention_mask=mask, backend=backend), (h, w, b))
        assert flags == ([expected] * 2 if needs else []), (needs, flags)
        flags.clear()
        _on_both_paths(lambda h, w, b: rmk.pairwise_reward_loss(h, w, b, attention_mask=mask, backend=backend),
                       (h, w, b), use=(0, 1))
        assert flags == ([(True, True), expected] * 2 if needs else []), (needs, flags)
    for needs in ((True, True), (True, False), (False, True)):
        c, r = torch.randn(5).requires_grad_(needs[0]), torch.randn(5).requires_grad_(needs[1])
        flags.clear()
        _on_both_paths(lambda c, r: rmk.bradley_terry_loss(c, r, backend=backend), (c, r))
        assert flags == [needs, needs]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "op"])
def test_differentiable_once_on_both_paths(fast, monkeypatch):
    """Like the op's (whose backward op has no autograd), the fast path's backward is not
    differentiable: create_graph=True then a second backward raises."""
    monkeypatch.setattr(_library, "EAGER_FAST_PATH", fast)
    c, r = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    (g,) = torch.autograd.grad(rmk.bradley_terry_loss(c, r, backend="reference"), c, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), c)
