"""Test helpers shared by every op's tests."""
import os

import torch

import rmkernels as rmk

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


def subprocess_env(**overrides):
    """The environment of a child Python process that imports this checkout: ``os.environ`` with
    ``PYTHONPATH`` = the checkout (``rmkernels``), its ``python/`` folder (``rmkernels_train``) and
    then the ``PYTHONPATH`` already set, if any; then ``overrides``, where a value of None removes
    the variable (``subprocess_env(TRITON_INTERPRET=None)``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_ROOT, os.path.join(_ROOT, "python")] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def kernel_backends(device):
    """The non-reference backends that the tests compare with the reference on `device`:
    each is either run, or skipped with the reason it cannot run here."""
    return ["cpu", "triton"] if device == "cpu" else ["cuda", "triton"]


def skip_unless_available(backend, device):
    """pytest.skip with the reason when `backend` cannot run on `device` here."""
    import pytest

    if device == "cuda" and not HAS_CUDA:
        pytest.skip(f"{backend} on CUDA tensors needs a GPU (none here)")
    why = rmk.backend_report(device)[backend]
    if why is None:
        return
    if backend == "triton" and device == "cpu":
        pytest.skip("triton on CPU tensors runs only under TRITON_INTERPRET=1 (no GPU here); "
                    ".ci/run runs the triton tests in their own process with it set")
    if backend == "cpu" and not rmk._ext.CPP_AVAILABLE:
        pytest.fail(f"the C++ extension is not built: {why}")  # never a silent skip
    pytest.skip(f"{backend} backend needs a GPU: {why}")


def cpu_backend_params():
    """The backends that run on CPU tensors here, for pytest.mark.parametrize("backend", ...):
    reference, cpu, and triton (under TRITON_INTERPRET=1: marked triton, so it runs in the
    interpreter's pytest process)."""
    import pytest

    return ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)]


def backend_params(include_reference=False):
    """(backend, device) pairs for pytest.mark.parametrize, with readable ids."""
    import pytest

    pairs = []
    for dev in ["cpu", "cuda"]:
        for be in (["reference"] if include_reference else []) + kernel_backends(dev):
            marks = []
            if be == "triton":
                marks.append(pytest.mark.triton)
            if dev == "cuda":
                marks.append(pytest.mark.cuda)
            pairs.append(pytest.param(be, dev, id=f"{be}-{dev}", marks=marks))
    return pairs


def tolerance(dtype):
    """(rtol, atol) for fp32 arithmetic against the fp64 reference, per input dtype."""
    return {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}[dtype]


def assert_close(actual, expected, *, rtol, atol, name="output", equal_nan=True, magnitude=None):
    """allclose that says, on failure, how many elements differ, where, and the NaN/inf
    mismatches. ``magnitude`` (shaped like ``expected``): the size the relative tolerance applies
    to where it exceeds ``|expected|``, for a value that is a sum of larger terms (the gradient of
    a base tensor under an expanded or overlapping view: the sum of ``|terms|``), whose rounding
    error scales with those terms, not with what is left after they cancel."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    msgs = []
    if equal_nan and not torch.equal(nan_a, nan_e):
        bad = torch.nonzero(nan_a != nan_e)
        msgs.append(f"NaN mismatch at {bad.shape[0]} positions, first {bad[:5].tolist()}")
    inf_mismatch = torch.isinf(a) != torch.isinf(e)
    if inf_mismatch.any():
        msgs.append(f"inf mismatch at {int(inf_mismatch.sum())} positions, "
                    f"first {torch.nonzero(inf_mismatch)[:5].tolist()}")
    both = ~(nan_a | nan_e)
    diff = (a - e).abs()
    tol = atol + rtol * (e.abs() if magnitude is None else torch.maximum(e.abs(), magnitude.detach().double().cpu()))
    bad = both & ~((diff <= tol) | (a == e))  # equal infinities are equal
    if bad.any():
        where = torch.nonzero(bad)
        first = tuple(where[0].tolist())
        msgs.append(
            f"{int(bad.sum())}/{a.numel()} elements differ beyond rtol={rtol}, atol={atol}; max abs diff "
            f"{diff[both].max().item():.3e}; first at {first}: actual {a[first].item():.6g}, "
            f"expected {e[first].item():.6g}")
    assert not msgs, f"{name}: " + "; ".join(msgs)


def assert_compiled_matches(f, *args, rtol=1e-6, atol=1e-6, backend="inductor", name="compiled"):
    """``torch.compile(f, fullgraph=True, backend=backend)`` (from a fresh dynamo cache) gives
    what ``f`` gives eagerly, output by output (a tensor or a tuple / list of them), in the same
    dtype, within (rtol, atol)."""
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend=backend)(*args)
    expect = f(*args)
    got, expect = ((o,) if isinstance(o, torch.Tensor) else tuple(o) for o in (got, expect))
    assert len(got) == len(expect), f"{name}: {len(got)} outputs, eager: {len(expect)}"
    for i, (g, e) in enumerate(zip(got, expect)):
        assert g.dtype == e.dtype, f"{name} output {i}: {g.dtype}, eager: {e.dtype}"
        assert_close(g, e, rtol=rtol, atol=atol, name=f"{name} output {i}")


def assert_close_vs_lowp(actual, expected64, lowp_torch, *, name="output", factor=2.0, floor=1e-6):
    """flash-attention's rule: the kernel's error against the fp64 reference may be at most
    `factor` times the error of plain PyTorch at the same low precision (plus a small floor).
    Non-finite values must match the reference's exactly (NaN where it is NaN, the same inf);
    the errors are taken over the reference's finite entries, plain PyTorch's over those where
    it is finite too (an overflow of plain PyTorch's must not widen the bar to inf)."""
    a, e, low = actual.double(), expected64.double(), lowp_torch.double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    fin = torch.isfinite(e)
    same_nonfinite = torch.equal(torch.isnan(a), torch.isnan(e)) and torch.equal(a[torch.isinf(e)], e[torch.isinf(e)])
    assert same_nonfinite and bool(torch.isfinite(a[fin]).all()), (
        f"{name}: non-finite values differ from the fp64 reference ({int(torch.isnan(a).sum())} NaN against "
        f"{int(torch.isnan(e).sum())}, {int((~torch.isfinite(a[fin])).sum())} non-finite where it is finite)")
    err = (a - e)[fin].abs().max().item() if bool(fin.any()) else 0.0
    both = fin & torch.isfinite(low)
    base = (low - e)[both].abs().max().item() if bool(both.any()) else 0.0
    assert err <= factor * base + floor, (
        f"{name}: max error {err:.3e} vs fp64 reference exceeds {factor}x plain PyTorch's {base:.3e} (+{floor})")


MASK_KINDS = ["right", "left", "holes", "mixed"]  # the kinds of make_mask


def make_mask(kind, B, T, device="cpu"):
    """A random [B, T] bool mask, the one of every PPO, GAE and group-advantage test.

    ``kind``: "right" (a valid prefix of random length, 0 to T), "left" (left-padded: a valid
    suffix of random length), "holes" (a random-length prefix of which each position is valid
    with probability 0.6: multi-turn tool/observation tokens inside the response) or "mixed"
    (row b of the kind ``("right", "left", "holes")[b % 3]``). Whatever the kind, row 0 has no
    valid token and row 1 a single one when B >= 3, and row 2 is full when B >= 4 (so that at
    least one row stays random). ``"full"``: every position valid, no special rows."""
    if T == 0:
        return torch.zeros(B, 0, dtype=torch.bool, device=device)
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool, device=device)
    pos = torch.arange(T).expand(B, T)
    lengths = torch.randint(0, T + 1, (B,))
    if kind == "right":
        m = pos < lengths[:, None]
    elif kind == "left":
        m = pos >= (T - lengths)[:, None]
    elif kind == "holes":
        m = (torch.rand(B, T) < 0.6) & (pos < lengths[:, None])
    elif kind == "mixed":
        m = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            m[b] = make_mask(("right", "left", "holes")[b % 3], 1, T)[0]
    else:
        raise ValueError(f"make_mask: kind must be right, left, holes, mixed or full, got {kind!r}")
    if B >= 3:
        m[0] = False  # a row with no valid token
        m[1] = False
        m[1, torch.randint(0, T, ()).item()] = True  # a single-token row
    if B >= 4:
        m[2] = True  # a full row
    return m.to(device)


# The backends whose kernels are the kernel ops (rmkernels::*_kernel) themselves: the C++ CPU
# and CUDA kernels. A kernel op takes no backend argument; it runs the kernel of its tensors'
# device.
COMPILED_BACKENDS = ("cpu", "cuda")


def opcheck_ops(samples, backend):
    """torch.library.opcheck on each (name, args) of ``samples``, ``name`` an op of
    torch.ops.rmkernels: a public op with ``backend`` appended to ``args``; a kernel op
    (``*_kernel``) as it is, and only when ``backend`` is one of COMPILED_BACKENDS."""
    for name, args in samples:
        op = getattr(torch.ops.rmkernels, name).default
        if not name.endswith("_kernel"):
            torch.library.opcheck(op, (*args, backend))
        elif backend in COMPILED_BACKENDS:
            torch.library.opcheck(op, args)


def opcheck_test(samples, *, kernel_ops=False):
    """The opcheck test of an op family, for its test module to bind to a ``test_*`` name
    (``test_opcheck = opcheck_test(_op_samples)``): for each (backend, device) of
    ``backend_params(include_reference=True)``, skip_unless_available, then
    ``opcheck_ops(samples(device), backend)``. ``kernel_ops=True``: for the COMPILED_BACKENDS
    only (``samples`` gives kernel ops alone)."""
    import pytest

    params = [p for p in backend_params(include_reference=not kernel_ops)
              if not kernel_ops or p.values[0] in COMPILED_BACKENDS]

    @pytest.mark.parametrize("backend,device", params)
    def test(backend, device):
        skip_unless_available(backend, device)
        opcheck_ops(samples(device), backend)

    test.__doc__ = f"torch.library.opcheck of the ops of {samples.__module__}.{samples.__name__}(device)."
    return test


def poison_(t):
    """Fill with NaN (floats) or a sentinel so that unwritten elements show."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(-12345)


def run_two_ranks(argv, cwd, env_extra=None, timeout=300):
    """The 2 ranks of ``python -m rmkernels_train *argv`` started directly, with the
    environment torchrun gives them (gloo on CPU), so that each rank's exit status and stderr
    are its own (torchrun stops the other ranks once one fails). Returns
    ``[(returncode, stderr)]`` by rank; a rank still running after ``timeout`` seconds (a hang)
    fails the test."""
    import socket
    import subprocess
    import sys

    import pytest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                         LOCAL_WORLD_SIZE="2", **(env_extra or {}))
    cmd = [sys.executable, "-m", "rmkernels_train", *map(str, argv)]
    procs = [subprocess.Popen(cmd, cwd=cwd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        errs = [p.communicate()[1][-1500:] for p in procs]
        pytest.fail(f"a rank hangs (still running after {timeout} s): {errs}")


def assert_one_line_each(ranks, prog, lines):
    """Every rank of ``ranks`` (:func:`run_two_ranks`) exited with status 1 without a traceback,
    its only error line being ``f"{prog}: error (rank R): {lines[R]}"``."""
    for rank, (rc, err) in enumerate(ranks):
        assert rc == 1 and "Traceback" not in err, (rank, rc, err[-3000:])
        got = [ln for ln in err.splitlines() if ": error" in ln]
        assert got == [f"{prog}: error (rank {rank}): {lines[rank]}"], (rank, err[-3000:])
