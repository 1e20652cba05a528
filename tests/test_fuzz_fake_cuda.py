"""Every public op of tests/test_fuzz.py's SPECS, with the reference backend, on the stand-in
GPU of tests/fake_cuda.py: each drawn input (every layout, every option the spec draws) moved
to the GPU, forward and backward. The outputs and gradients must be on the GPU and equal the
same calls on the CPU: the Python layer of the ops (argument checks, layouts, the size
policies, the autograd wrappers) makes no tensor on the CPU for GPU inputs. (The cuda and
triton kernels behind that layer need a real GPU: scripts/gpu_check.sh.)"""
import fake_cuda
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import _COMMON, SPECS, _params
from utils import assert_close

GPU_FUZZ = settings(max_examples=3, derandomize=True, **_COMMON)
TRITON_GPU_FUZZ = settings(max_examples=2, derandomize=True, **_COMMON)


def _to_gpu(x):
    if isinstance(x, torch.Tensor):
        return x.to("cuda")
    if isinstance(x, dict):
        return {k: _to_gpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in x):
        return type(x)(_to_gpu(v) for v in x)
    return x


def _run(spec, case, grads, backend="reference", dtype=None):
    bases, views = {}, {}
    for name, a in case["args"].items():
        base = a.base.to(dtype or a.dtype)
        if base.device != case["device"]:
            base = base.to(case["device"])
        bases[name] = base.requires_grad_(grads)
        views[name] = a.view(bases[name])
    res = spec.run(case, views, backend)
    g = None
    if grads:
        diff = [r for r in res if r.requires_grad]
        if diff:
            gen = torch.Generator().manual_seed(1234)
            weights = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(r.device, r.dtype) for r in diff]
            total = sum((r * w).sum() for r, w in zip(diff, weights))
            g = torch.autograd.grad(total, list(bases.values()), allow_unused=True)
    return list(res), [x for x in (g or ()) if x is not None]


def _run_on_gpu(spec, case, grads, backend="reference"):
    """_run with every tensor of the case on the stand-in GPU: (outputs and gradients back on
    the CPU, the devices they had)."""
    with fake_cuda.gpu(triton=backend == "triton"):
        gpu_case = {k: (v if k == "args" else _to_gpu(v)) for k, v in case.items()}
        got, got_g = _run(spec, dict(gpu_case, device=torch.device("cuda")), grads, backend=backend)
        where = [t.device.type for t in got + got_g]
        return [t.cpu() for t in got], [t.cpu() for t in got_g], where


@pytest.mark.parametrize("op,layout", _params())
@GPU_FUZZ
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_reference_on_a_gpu(op, layout, data, seed):
    spec = SPECS[op]
    case = spec.draw(data, torch.Generator().manual_seed(seed), layout)
    grads = spec.differentiable and bool(case["args"])
    with spec.context(case):
        want, want_g = _run(spec, dict(case, device=torch.device("cpu")), grads)
        got, got_g, where = _run_on_gpu(spec, case, grads)
    assert where == ["cuda"] * len(where), f"{op}: outputs/gradients on {where}"
    assert len(got) == len(want) and len(got_g) == len(want_g)
    for i, (a, e) in enumerate(zip(got + got_g, want + want_g)):
        if a.is_floating_point():
            assert_close(a, e, rtol=1e-6, atol=1e-6, name=f"{op} output/grad {i}")
        else:
            assert torch.equal(a, e), f"{op} output {i}"


@pytest.mark.triton
@pytest.mark.parametrize("op,layout", _params())
@TRITON_GPU_FUZZ
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_triton_on_a_gpu(op, layout, data, seed):
    """The Triton backend's host code (grids, workspaces, the size policies, the autograd
    wrappers) on stand-in GPU tensors, its kernels run by the interpreter, against the float64
    reference on the CPU with the spec's tolerance: what the backend allocates or reads is on
    the GPU."""
    fake_cuda.require_interpreter()
    spec = SPECS[op]
    case = spec.draw(data, torch.Generator().manual_seed(seed), layout)
    grads = spec.differentiable and bool(case["args"])
    dtype = next(iter(case["args"].values())).dtype if case["args"] else torch.float32
    with spec.context(case):
        want, want_g = _run(spec, dict(case, device=torch.device("cpu")), grads, dtype=torch.float64)
        got, got_g, where = _run_on_gpu(spec, case, grads, backend="triton")
    assert where == ["cuda"] * len(where), f"{op}: outputs/gradients on {where}"
    assert len(got) == len(want) and len(got_g) == len(want_g)
    for what, pairs in (("output", zip(got, want)), ("grad", zip(got_g, want_g))):
        rtol, atol = spec.tol(dtype, what)
        for i, (a, e) in enumerate(pairs):
            if a.is_floating_point():
                assert_close(a, e.to(a.dtype), rtol=rtol, atol=atol, name=f"{op} {what} {i}")
            else:
                assert torch.equal(a, e), f"{op} {what} {i}"
