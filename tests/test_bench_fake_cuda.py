"""The benchmark runner as a lent GPU runs it (``benchmarks/run.py --device cuda``), here, on a
stand-in CUDA device (tests/fake_cuda.py): every provider but rmkernels' cuda and triton
backends runs on tensors that say ``cuda:0``, and must not mix in CPU tensors.

Why: on the H200 lent on 2026-11-30 three of the grpo baselines (verl's vectorized GRPO, the
torch version and its torch.compile) stopped at their first call, ``index_add_`` of a CPU
``torch.zeros(G)`` with GPU scores; the stage's minutes went by with no baseline measured.
The timings are stubbed (each call made once): what is checked is that each provider runs on
the GPU's tensors and matches the reference there, the check ``benchmarks/run.py`` makes
before timing anything.
"""
import csv

import fake_cuda as fake_cuda_mod
import pytest
import torch
from fake_cuda import FakeCudaTensor, fake_cuda

from benchmarks import run, timing

# the baselines each op must have checked on the GPU (rmkernels' own cuda/triton providers need one)
BASELINES = {
    "pooling": {"hf", "torch", "compile"},
    "bt": {"hf", "torch", "compile"},
    "pair": {"hf", "torch", "compile"},
    "gae": {"hf", "torch", "compile"},
    "grpo": {"verl-vec", "torch", "compile"},
    "rpp": {"hf", "torch", "compile"},
    "remax": {"hf", "compile"},
    "e2e": {"hf", "rmk"},
}


def _once(f):
    setup, fn = timing._as_pair(f)
    if setup is None:
        fn()
    else:
        fn(setup())


def _stub_timing(monkeypatch):
    """The runner's GPU-only calls stubbed: timings call each function once, the floors are
    fixed numbers."""
    def measure(fns, device="cpu", counts=None, **kw):
        for f in fns.values():
            _once(f)
        if counts is not None:
            counts.update({k: 1 for k in fns})
        return {k: (1.0, 1.0, 1.0) for k in fns}

    monkeypatch.setattr(timing, "measure_interleaved", measure)
    monkeypatch.setattr(timing, "device_time", lambda f, **kw: (_once(f), (1.0, 1.0, 1.0))[1])
    monkeypatch.setattr(timing, "peak_memory_mib", lambda f, device="cpu": (_once(f), float("nan"))[1])
    monkeypatch.setattr(timing, "copy_bandwidth_gbps", lambda: ((4000.0,) * 3, (0.5,) * 3))
    monkeypatch.setattr(timing, "empty_launch_ms", lambda: (0.003,) * 3)


@pytest.fixture
def standin_gpu(monkeypatch):
    """The stubbed timings on the stand-in GPU, rmkernels' cuda and triton backends
    unavailable (the reference runs in their place); compile runs eagerly (Dynamo does not
    trace the stand-in's tensor subclass)."""
    _stub_timing(monkeypatch)
    with torch.compiler.set_stance("force_eager"), fake_cuda_mod.gpu():
        yield


def test_standin_device_rules():
    """The stand-in raises where a GPU raises and runs what a GPU runs (else the test below
    could not fail, or fail for nothing), the second time too (it keeps each op's device rule
    for the devices, dtypes and shapes it was called with: fake_cuda._rule_key)."""
    with fake_cuda():
        x = torch.randn(6).to("cuda")
        assert isinstance(x, FakeCudaTensor) and x.device == torch.device("cuda", 0) and x.is_cuda
        for _ in range(2):
            for bad in (lambda: x + torch.ones(6), lambda: torch.zeros(6).index_add_(0, torch.arange(6), x),
                        lambda: torch.where(x > 0, x, torch.ones(6)), lambda: torch.cat([x, torch.ones(2)]),
                        lambda: x + torch.ones(1)):
                with pytest.raises(RuntimeError, match="device"):
                    bad()
            # what a GPU allows: CPU scalars, CPU indices, factories on x.device, .item(), autograd
            y = torch.where(x > 0, x, torch.zeros(())) + x[torch.tensor([1, 0, 2, 3, 4, 5])] + torch.ones(())
            z = torch.zeros(6, device=x.device).index_add_(0, torch.arange(6, device=x.device), y)
            assert z.device == x.device and isinstance(z.sum().item(), float)
            w = torch.ones(6, device="cuda", requires_grad=True)
            (g,) = torch.autograd.grad((w * x).sum(), w)
            assert g.device == x.device and torch.equal(g.elem, x.elem)
            assert x.cpu().device.type == "cpu" and torch.equal(x.cpu(), x.elem)
            assert [t.device.type for t in x.split(4)] == ["cuda"] * 2 and len(x[:3].split(4)) == 1


@pytest.mark.parametrize("op", run.ALL_OPS)
def test_runner_on_a_gpu(op, standin_gpu, tmp_path, capsys):
    out = tmp_path / "bench"
    assert run.main(["--device", "cuda", "--tiny", "--quick", "--ops", op, "--out", str(out), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "!!" not in err, f"a provider failed on the GPU's tensors:\n{err}"
    with open(out / "stand-in-gpu.csv") as f:
        checks = {r["provider"]: float(r["median"]) for r in csv.DictReader(f)
                  if r["op"] == op and r["metric"] == "correct"}
    assert BASELINES[op] <= set(checks), f"{op}: checked {sorted(checks)}, expected at least {sorted(BASELINES[op])}"
    assert all(v == 1.0 for v in checks.values()), checks


@pytest.mark.triton
@pytest.mark.parametrize("op", ["grpo", "rpp", "remax"])
def test_runner_rmk_triton_on_a_gpu(op, monkeypatch, tmp_path, capsys):
    """The GPU check's rmk-only bench calls (``--providers rmk-triton ...``, the floors of grpo
    timed with them) with the Triton backend on the stand-in GPU, kernels in the interpreter."""
    fake_cuda_mod.require_interpreter()
    _stub_timing(monkeypatch)
    out = tmp_path / "bench"
    with fake_cuda_mod.gpu(triton=True):
        rc = run.main(["--device", "cuda", "--tiny", "--quick", "--ops", op, "--out", str(out), "--no-plots",
                       "--providers", "rmk-cuda", "rmk-cuda-op", "rmk-triton", "rmk-triton-op"])
    err = capsys.readouterr().err
    assert rc == 0 and "!!" not in err, err
    with open(out / "stand-in-gpu.csv") as f:
        rows = list(csv.DictReader(f))
    checked = {r["provider"] for r in rows if r["op"] == op and r["metric"] == "correct" and r["median"] == "1"}
    assert checked == ({"rmk-triton", "rmk-triton-op"} if op == "grpo" else {"rmk-triton"}), checked
    if op == "grpo":
        assert {"write-once", "read-inputs"} <= {r["provider"] for r in rows}, sorted({r["provider"] for r in rows})


def _gpu_check_ops():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check_ops.py")
    spec = importlib.util.spec_from_file_location("gpu_check_ops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_gpu_check_ops_on_a_gpu(backend, monkeypatch, capsys):
    """scripts/gpu_check_ops.py's sanitize stage (every public op, forward and backward, the
    calls the sanitizers and the CUDA-graph stage make) on the stand-in GPU: the reference
    backend here, and the Triton backend in the interpreter (the triton pass of .ci/run)."""
    if backend == "triton":
        fake_cuda_mod.require_interpreter()
    mod = _gpu_check_ops()
    monkeypatch.setattr(mod, "BACKENDS", (backend,))
    with fake_cuda_mod.gpu(triton=backend == "triton"):
        rc = mod.cmd_sanitize()
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("ok ") == len(mod._cases("cpu")), out


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_gpu_check_profile_runs_on_a_gpu(backend, monkeypatch, capsys):
    """scripts/gpu_check_ops.py's profile command (what ncu wraps in gpu_check.sh) on the
    stand-in GPU, at small shapes: every estimator and backend it names runs."""
    if backend == "triton":
        fake_cuda_mod.require_interpreter()
    mod = _gpu_check_ops()
    monkeypatch.setattr(mod, "BACKENDS", (backend,))
    monkeypatch.setattr(mod, "PROFILE_SHAPES", ((37, 5, 4), (40, 1, 8)))
    with fake_cuda_mod.gpu(triton=backend == "triton"):
        rc = mod.cmd_profile()
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("ok ") == len(mod.PROFILE_SHAPES), out
