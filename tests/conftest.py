import os
import sys

import pytest
import torch

# In-tree runs (python setup.py build_ext --inplace) find the training package too; CI
# installs the project with `pip install -e .`, where this changes nothing.
_PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
if _PYTHON_DIR not in sys.path:
    sys.path.insert(0, _PYTHON_DIR)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the printed seed on failure."""
    seed = int(os.environ.get("RMKERNELS_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                item.add_report_section("call", "seed", f"RMKERNELS_TEST_SEED={v} reproduces this test's inputs")


# ---------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1: tl.minimum / tl.maximum (and the tl.min / tl.max reductions built on
# them) without propagate_nan=ALL return the other operand of a NaN, as a GPU's min / max
# instructions do. Triton 3.6's interpreter computes them with np.minimum / np.maximum, which keep
# the NaN: a kernel that relied on that passed here and failed on an H200 (the token log-probs'
# rows of only -inf logits, 2026-12-04).
# ---------------------------------------------------------------------------------------
def _interpreter_min_max_as_on_a_gpu():
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    builder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin)
    builder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax)


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        _interpreter_min_max_as_on_a_gpu()


# ---------------------------------------------------------------------------------------
# Every torch.library.opcheck a test runs on an rmkernels op also runs that call under
# torch.compile(fullgraph=True) (aot_eager: the same kernels) and wants the eager outputs
# exactly (utils.assert_compiled_matches with rtol = atol = 0): opcheck checks the schema, the
# fake and the autograd registration, not that dynamo traces the op whole. So every op with
# opcheck samples (public and kernel ops) is compiled.
# ---------------------------------------------------------------------------------------
_OPCHECK = torch.library.opcheck


def _compiled_call_matches_eager(op, args, kwargs):
    from utils import assert_compiled_matches

    tensors = [a.detach() for a in args if isinstance(a, torch.Tensor)]

    def call(*ts):
        it = iter(ts)
        return op(*[next(it) if isinstance(a, torch.Tensor) else a for a in args], **kwargs)

    # a fresh dynamo cache each time (one code object, call, compiled for every op)
    assert_compiled_matches(call, *tensors, rtol=0, atol=0, backend="aot_eager",
                            name=f"{op} under torch.compile(fullgraph=True)")


def _opcheck_and_compile(op, args, kwargs=None, *a, **kw):
    result = _OPCHECK(op, args, kwargs, *a, **kw)
    if isinstance(op, torch._ops.OpOverload) and op.namespace == "rmkernels":
        _compiled_call_matches_eager(op, args, kwargs or {})
    return result


torch.library.opcheck = _opcheck_and_compile


# ---------------------------------------------------------------------------------------
# --standin-gpu: the GPU tests (-m cuda) on tests/fake_cuda.py's stand-in GPU
# ---------------------------------------------------------------------------------------
STANDIN_UNSUPPORTED = {
    "test_eager_path": "the stand-in's dispatch modes turn the eager fast path off",
    "opcheck": "torch.library.opcheck does not take the stand-in's tensor subclass",
    "compile": "torch.compile does not trace the stand-in's tensor subclass",
    "is_one_launch_at_scale": "it counts the kernels a GPU runs (the profiler's CUDA events) at a GPU's batch size",
}


def pytest_addoption(parser):
    parser.addoption("--standin-gpu", action="store_true",
                     help="run the GPU tests (-m cuda) on the stand-in GPU of tests/fake_cuda.py: GPU tensors "
                          "whose data is on the CPU, torch's device rules checked op by op; the cuda backend is "
                          "unavailable, the triton backend runs in the interpreter under TRITON_INTERPRET=1")


def pytest_configure(config):
    if config.getoption("--standin-gpu"):
        torch.cuda.is_available = lambda: True  # before the test modules read it (tests/utils.HAS_CUDA)


@pytest.fixture(autouse=True)
def _standin_gpu(request):
    if not request.config.getoption("--standin-gpu"):
        yield
        return
    for key, why in STANDIN_UNSUPPORTED.items():
        if key in request.node.nodeid:
            pytest.skip(f"needs a real GPU: {why}")
    import fake_cuda

    with fake_cuda.gpu(triton=os.environ.get("TRITON_INTERPRET", "0") == "1"):
        yield
